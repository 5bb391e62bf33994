"""Which pool measures for a profiler: this host's devices (LocalPool), or a kind of device
on a Ray farm (RayPool, an optional extra, imported only when a farm is asked for)."""
from pathlib import Path
from typing import Optional

from devices.registry import devices_of_kind
from harness.pool.device_pool import DevicePool, LocalPool, interleaves


def pool_interleaves(home: Path, device: str, farm: Optional[str], isolation: str,
                     pool: Optional[DevicePool] = None) -> bool:
    """Whether the pool a profiler measures on (`pool`, or the one open_pool would open)
    times models together in interleaved rounds; known before any pool opens, so that
    settings are checked whole first. A farm measures one model per job; a pool of the
    user's own that does not say it interleaves does not."""
    if pool is not None:
        return bool(getattr(pool, "interleaves", False))
    if farm is not None:
        return False
    kind = device[len("kind:"):] if device.startswith("kind:") else None
    return interleaves(home, devices_of_kind(home, kind) if kind else [device], isolation)


def open_pool(home: Path, device: str, farm: Optional[str] = None, isolation: str = "worker",
              max_strikes: int = 3, quarantine_s: float = 60.0) -> DevicePool:
    """The pool for a device name or "kind:K" (with `farm`, the kind on that Ray farm)."""
    if farm is None:
        return LocalPool(home, device, isolation, max_strikes, quarantine_s)
    from harness.pool.ray_pool import farm_pool
    return farm_pool(farm, device, home, isolation)
