"""What a device tells the host, as typed values checked once where they enter the host.

An agent (ours, or onnxruntime_perf_test behind its client) answers in JSON; everything it
says is untrusted until `AgentResult.parse` / `DeviceFacts.parse` has checked it. Past that
point the host works with these frozen values, never with the raw dicts.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from devices.errors import AgentProtocolError

# A per-run time beyond this (about 28 hours) is garbage, not a latency: refusing it keeps
# every statistic computed from the samples finite (a sum of 1e308s overflows to inf).
MAX_SAMPLE_MS = 1e8


def is_ms(value: object) -> bool:
    """A finite, non-negative time in milliseconds (bool is not a number here)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= MAX_SAMPLE_MS)


@dataclass(frozen=True)
class DeviceFacts:
    """Who a device is (`identity`: stable, part of every cache key) and its state now
    (governors, thermal zones, load: recorded, never keyed)."""

    identity: Mapping[str, Any]
    state: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, answer: Mapping[str, Any], device: str,
              extra_identity: Optional[Mapping[str, Any]] = None) -> "DeviceFacts":
        """Check an agent's fingerprint answer; `extra_identity` is what the transport adds."""
        identity = answer.get("identity")
        state = answer.get("state", {})
        if not isinstance(identity, dict) or not isinstance(state, dict):
            raise AgentProtocolError(f"the fingerprint answer has no identity: "
                                     f"{str(answer)[:300]}", device=device)
        return cls(identity=dict(identity, **(extra_identity or {})), state=dict(state))


@dataclass(frozen=True)
class DeviceControlReport:
    """What the host controlled around one run on a device (phones: waiting to cool, the
    big-core pinning, thermal zones before and after) and the flags it raised."""

    thermal_before: Tuple[Any, ...] = ()
    thermal_after: Tuple[Any, ...] = ()
    waited_s: float = 0.0
    max_temp_c: Optional[float] = None
    pinned_mask: Tuple[str, ...] = ()
    flags: Tuple[str, ...] = ()


def hottest_zone_c(zones: Any) -> Optional[float]:
    """The hottest of thermal zones as the agent and a phone's control report them
    ({"zone", "type", "temp_c"} each), in degrees C; None when none has a temperature."""
    return max((float(zone["temp_c"]) for zone in zones if isinstance(zone, Mapping)
                and isinstance(zone.get("temp_c"), (int, float))), default=None)


def pinned_text(mask: Any) -> str:
    """A phone's big-core pinning (the taskset mask its control runs the agent under), for
    people: 'mask 2'."""
    return "mask " + " ".join(map(str, mask))


@dataclass(frozen=True)
class AgentResult:
    """One measurement as the device reported it: every raw per-run time (ms) and how it was
    taken. `device` names the device that measured, `host` the farm host it hangs off; the
    pool that leased the device adds the lease window."""

    samples_ms: Tuple[float, ...]
    load_ms: float
    first_run_ms: Optional[float]
    loop_ms: float
    agent_version: str
    settings: Mapping[str, Any]
    runtime: Mapping[str, Any]
    facts: DeviceFacts
    device: str
    capped: bool = False
    warmup_runs: Optional[int] = None
    warmup_ms: Optional[float] = None
    inputs: Tuple[Any, ...] = ()
    controlled: Mapping[str, Any] = field(default_factory=dict)
    thermal_before: Tuple[Any, ...] = ()
    thermal_after: Tuple[Any, ...] = ()
    control: Optional[DeviceControlReport] = None
    host: Optional[str] = None
    lease: Optional[Tuple[float, float]] = None  # wall-clock seconds the device was leased
    stop: Mapping[str, Any] = field(default_factory=dict)  # how the timed loop stopped

    @classmethod
    def parse(cls, answer: Mapping[str, Any], device: str, expected_version: str,
              extra_identity: Optional[Mapping[str, Any]] = None) -> "AgentResult":
        """Check an agent's measurement answer field by field; AgentProtocolError lists every
        problem (a malformed answer is never stored as a latency)."""
        problems = []
        samples = answer.get("samples_ms")
        if not isinstance(samples, list) or not samples or not all(is_ms(s) for s in samples):
            problems.append(f"samples_ms is not a non-empty list of finite times in ms "
                            f"(at most {MAX_SAMPLE_MS:.0e})")
        for key in ("load_ms", "loop_ms"):
            if not is_ms(answer.get(key)):
                problems.append(f"{key} is not a time in ms")
        first_run = answer.get("first_run_ms")
        if first_run is not None and not is_ms(first_run):
            problems.append("first_run_ms is not a time in ms")
        for key in ("fingerprint", "runtime", "settings"):
            if not isinstance(answer.get(key), dict):
                problems.append(f"{key} is missing")
        if answer.get("agent_version") != expected_version:
            problems.append(f"agent_version is {answer.get('agent_version')!r}, "
                            f"expected {expected_version!r}")
        warmup_ms = answer.get("warmup_ms")
        if warmup_ms is not None and not is_ms(warmup_ms):
            problems.append("warmup_ms is not a time in ms")
        if problems:
            raise AgentProtocolError("the agent's measurement is malformed: "
                                     + "; ".join(problems), device=device)
        facts = DeviceFacts.parse(answer["fingerprint"], device, extra_identity)
        return cls(samples_ms=tuple(float(s) for s in samples or ()),
                   load_ms=float(answer["load_ms"]),
                   first_run_ms=None if first_run is None else float(first_run),
                   loop_ms=float(answer["loop_ms"]),
                   agent_version=str(answer["agent_version"]),
                   settings=dict(answer["settings"]), runtime=dict(answer["runtime"]),
                   facts=facts, device=device, capped=answer.get("capped") is True,
                   warmup_runs=_int_or_none(answer.get("warmup_runs")),
                   warmup_ms=None if warmup_ms is None else float(warmup_ms),
                   inputs=tuple(_list(answer.get("inputs"))),
                   controlled=_dict(answer.get("controlled")),
                   thermal_before=tuple(_list(answer.get("thermal_before"))),
                   thermal_after=tuple(_list(answer.get("thermal_after"))),
                   stop=_dict(answer.get("stop")))


def _int_or_none(value: object) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _list(value: object) -> List[Any]:
    return list(value) if isinstance(value, list) else []


def _dict(value: object) -> Dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}
