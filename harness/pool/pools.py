"""Which pool measures for a profiler: this host's devices (LocalPool), or a kind of device
on a Ray farm (RayPool, an optional extra, imported only when a farm is asked for)."""
from pathlib import Path
from typing import Optional

from harness.pool.device_pool import DevicePool, LocalPool


def open_pool(home: Path, device: str, farm: Optional[str] = None, isolation: str = "worker",
              max_strikes: int = 3, quarantine_s: float = 60.0) -> DevicePool:
    """The pool for a device name or "kind:K" (with `farm`, the kind on that Ray farm)."""
    if farm is None:
        return LocalPool(home, device, isolation, max_strikes, quarantine_s)
    from harness.pool.ray_pool import farm_pool
    return farm_pool(farm, device, home, isolation)
