"""What a device tells the host, as typed values checked once where they enter the host.

An agent (ours, or onnxruntime_perf_test behind its client) answers in JSON; everything it
says is untrusted until `AgentResult.parse` / `DeviceFacts.parse` has checked it. Past that
point the host works with these frozen values, never with the raw dicts.
"""
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from agents.ort_agent import cpu_time_plausible
from devices.errors import AgentProtocolError

# A per-run time beyond this (about 28 hours) is garbage, not a latency: refusing it keeps
# every statistic computed from the samples finite (a sum of 1e308s overflows to inf).
MAX_SAMPLE_MS = 1e8


def is_ms(value: object) -> bool:
    """A finite, non-negative time in milliseconds (bool is not a number here; an integer too
    large for a float is not a time either)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and finite(value) and 0 <= value <= MAX_SAMPLE_MS)


def finite(value: object) -> bool:
    """A number that is finite as a float (math.isfinite raises on ints beyond a float)."""
    try:
        return isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:
        return False


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


def _size(value: object) -> Optional[int]:
    """A byte count (whole, non-negative) or None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


@dataclass(frozen=True)
class OpRecord:
    """One graph node as onnxruntime's profiler saw it: the median of its kernel times over
    the profiled runs (ms), its op type and the execution provider that ran it; the byte
    counts are its output, its activations and its parameters where the profiler gives them."""

    name: str
    op_type: str
    provider: str
    median_ms: float
    runs: int
    output_bytes: Optional[int] = None
    activation_bytes: Optional[int] = None
    parameter_bytes: Optional[int] = None

    @classmethod
    def from_dict(cls, data: Any) -> "OpRecord":
        """Checked: ValueError names the bad field (an agent's answer, a stored record)."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a per-operator record is not an object: {str(data)[:100]}")
        for key in ("name", "op_type", "provider"):
            if not isinstance(data.get(key), str):
                raise ValueError(f"a per-operator record's {key} is not text")
        runs = data.get("runs")
        if not is_ms(data.get("median_ms")) or not (isinstance(runs, int) and runs > 0):
            raise ValueError(f"per-operator record {data['name']!r} has no median time or runs")
        return cls(name=data["name"], op_type=data["op_type"], provider=data["provider"],
                   median_ms=float(data["median_ms"]), runs=int(runs),
                   output_bytes=_size(data.get("output_bytes")),
                   activation_bytes=_size(data.get("activation_bytes")),
                   parameter_bytes=_size(data.get("parameter_bytes")))


@dataclass(frozen=True)
class OpProfile:
    """Per-operator profile of one model, from profiled runs apart from the timed ones:
    every node (in the order it first ran), the median whole run as the profiler saw it,
    onnxruntime's arena figures where its profiler reports them, and the trace events of the
    median profiled run (Chrome trace format, `ts` from that run's start, in us)."""

    runs: int
    run_median_ms: float
    nodes: Tuple[OpRecord, ...]
    arena: Mapping[str, int] = field(default_factory=dict)
    trace: Tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, data: Any) -> "OpProfile":
        """Checked: ValueError names the bad field."""
        if not isinstance(data, Mapping):
            raise ValueError("the per-operator profile is not an object")
        runs, nodes = data.get("runs"), data.get("nodes")
        if not (isinstance(runs, int) and runs > 0) or not is_ms(data.get("run_median_ms")) \
                or not isinstance(nodes, (list, tuple)):
            raise ValueError("the per-operator profile lacks runs, run_median_ms or nodes")
        arena = data.get("arena") or {}
        trace = data.get("trace") or []
        if not isinstance(arena, Mapping) or not isinstance(trace, (list, tuple)):
            raise ValueError("the per-operator profile's arena or trace is malformed")
        return cls(runs=runs, run_median_ms=float(data["run_median_ms"]),
                   nodes=tuple(OpRecord.from_dict(n) for n in nodes),
                   arena={str(k): v for k, v in arena.items() if _size(v) is not None},
                   trace=tuple(dict(e) for e in trace if isinstance(e, Mapping)))

    @property
    def sum_of_medians_ms(self) -> float:
        """The per-node medians added up: what the operators cost, without the runtime's
        own overhead between them (the whole run minus this)."""
        return sum(node.median_ms for node in self.nodes)

    def top(self, count: int) -> List[OpRecord]:
        """The `count` nodes that cost most, costliest first."""
        return sorted(self.nodes, key=lambda node: -node.median_ms)[:count]

    def by_provider(self) -> Dict[str, int]:
        """How many nodes each execution provider ran (a CPU fallback shows here)."""
        counts: Dict[str, int] = {}
        for node in self.nodes:
            counts[node.provider] = counts.get(node.provider, 0) + 1
        return counts

    def chrome_trace(self) -> Dict[str, Any]:
        """The median profiled run as a Chrome trace (Perfetto, chrome://tracing)."""
        return {"traceEvents": [dict(event) for event in self.trace],
                "displayTimeUnit": "ms"}


@dataclass(frozen=True)
class MemoryUse:
    """Resident memory of the agent's process around one measurement (MB): before the model
    was loaded (`baseline_rss_mb`), its peak while loading and its peak over the first,
    warm-up and timed runs. `peaks_reset` False: the kernel refused to reset the high-water
    mark, so each peak is the process's peak so far (an upper bound). `model_bytes`: the
    model file's size on the device."""

    model_bytes: int
    baseline_rss_mb: Optional[float] = None
    load_peak_mb: Optional[float] = None
    run_peak_mb: Optional[float] = None
    peaks_reset: bool = False

    @classmethod
    def from_dict(cls, data: Any) -> "MemoryUse":
        """Checked: ValueError names the bad field."""
        if not isinstance(data, Mapping) or _size(data.get("model_bytes")) is None:
            raise ValueError("the memory figures lack the model's size")
        figures: Dict[str, Optional[float]] = {}
        for key in ("baseline_rss_mb", "load_peak_mb", "run_peak_mb"):
            value = data.get(key)
            if value is not None and not is_ms(value):  # a finite, non-negative number
                raise ValueError(f"the memory figure {key} is not a size in MB")
            figures[key] = None if value is None else float(value)
        return cls(model_bytes=int(data["model_bytes"]), peaks_reset=data.get("peaks_reset") is True,
                   **figures)

    @property
    def peak_mb(self) -> Optional[float]:
        """The higher of the load and run peaks: what the model needs at most."""
        peaks = [p for p in (self.load_peak_mb, self.run_peak_mb) if p is not None]
        return max(peaks) if peaks else None

    @property
    def added_mb(self) -> Optional[float]:
        """The peak above the baseline: the memory the model itself cost the process."""
        peak = self.peak_mb
        if peak is None or self.baseline_rss_mb is None:
            return None
        return max(peak - self.baseline_rss_mb, 0.0)


# round, position, sequence number, runs (ms), start (s since the window began), and the
# runs' CPU times (ms) where the agent timed them by the thread's CPU clock, else ()
Block = Tuple[int, int, int, Tuple[float, ...], float, Tuple[float, ...]]
CLOCKS = ("wall", "thread_cpu")  # what a window's block statistics read (RoundsRecord.clock)


def _blocks(value: object, what: str) -> Tuple[Block, ...]:
    """Blocks of an interleaved window, checked; ValueError names what is wrong."""
    if not isinstance(value, list) or not value:
        raise ValueError(f"rounds.{what} is not a non-empty list of blocks")
    blocks = []
    for block in value:
        if not (isinstance(block, list) and len(block) in (5, 6)
                and all(isinstance(n, int) and not isinstance(n, bool) for n in block[:3])
                and isinstance(block[3], list) and block[3] and all(is_ms(s) for s in block[3])
                and is_ms(block[4])
                and (len(block) == 5 or (isinstance(block[5], list)
                                         and len(block[5]) == len(block[3])
                                         and all(is_ms(s) and cpu_time_plausible(s, w)
                                                 for s, w in zip(block[5], block[3]))))):
            raise ValueError(f"rounds.{what} holds a block that is not [round, position, "
                             f"sequence, [runs in ms], start in s(, [their CPU times in ms, "
                             f"each above 0 and at most its run's wall time] as many)]")
        cpu = tuple(float(s) for s in block[5]) if len(block) == 6 else ()
        blocks.append((block[0], block[1], block[2], tuple(float(s) for s in block[3]),
                       float(block[4]), cpu))
    return tuple(blocks)


def _block_list(block: Block) -> list:
    """A block as the agent sends it (the CPU times only where it has them)."""
    listed = [block[0], block[1], block[2], list(block[3]), block[4]]
    return listed + [list(block[5])] if block[5] else listed


@dataclass(frozen=True)
class RoundsRecord:
    """How a model was timed in interleaved rounds (agents.ort_agent.measure_rounds): its
    blocks and the reference model's blocks of the same window, each tagged with its round,
    its position in the round and its place in the window's sequence."""

    completed: int                        # rounds run in full
    k: int                                # timed runs per block of this model
    reference_k: int
    blocks: Tuple[Block, ...]
    reference_blocks: Tuple[Block, ...]
    candidates: int                       # models timed in the window
    seed: int
    candidates_ms: float = 0.0            # the timed runs of every candidate of the window
    reference_sha256: str = ""            # which reference model was timed beside it
    # what competed for the CPU during the window (agents.ort_agent.cpu_state): pressure,
    # steal, load, the lowest frequency; what the device exposes
    state: Mapping[str, float] = field(default_factory=dict)
    # "thread_cpu": the blocks carry each run's CPU time too, and their statistics read it
    # (agents.ort_agent.run_cpu_clock); "wall": the wall times
    clock: str = "wall"

    @classmethod
    def from_dict(cls, data: object) -> "RoundsRecord":
        if not isinstance(data, dict):
            raise ValueError("rounds is not an object")
        raw = [data.get(key) for key in ("completed", "k", "reference_k", "candidates", "seed")]
        counts = [n for n in raw if isinstance(n, int) and not isinstance(n, bool) and n >= 0]
        if len(counts) != len(raw):
            raise ValueError("rounds' completed, k, reference_k, candidates or seed is not a "
                             "whole number")
        candidates_ms = data.get("candidates_ms", 0.0)
        if not is_ms(candidates_ms):
            raise ValueError("rounds.candidates_ms is not a time in ms")
        reference = data.get("reference_sha256", "")
        if not isinstance(reference, str) or len(reference) > 64:
            raise ValueError("rounds.reference_sha256 is not a sha256 hex digest")
        state = data.get("state", {})
        if not isinstance(state, dict) or len(state) > 16 or not all(
                isinstance(key, str) and isinstance(value, (int, float))
                and not isinstance(value, bool) and finite(value)
                for key, value in state.items()):
            raise ValueError("rounds.state is not an object of finite numbers")
        clock = data.get("clock", "wall")
        if clock not in CLOCKS:
            raise ValueError(f"rounds.clock is not one of {', '.join(CLOCKS)}")
        blocks = _blocks(data.get("blocks"), "blocks")
        reference_blocks = _blocks(data.get("reference_blocks"), "reference_blocks")
        timed = {bool(block[5]) for block in blocks + reference_blocks}
        if timed != {clock == "thread_cpu"}:
            raise ValueError(f"rounds.clock is {clock}, but not every block has its runs' "
                             f"CPU times" if clock == "thread_cpu" else
                             "rounds.clock is wall, but blocks carry CPU times")
        return cls(counts[0], counts[1], counts[2], blocks, reference_blocks, counts[3],
                   counts[4], float(candidates_ms), reference, dict(state), clock)

    def share_of(self, samples_ms: Sequence[float]) -> float:
        """The share of the window's device time that is one candidate's, given its timed
        runs: those over every candidate's (a candidate that left the rounds early, decided
        or known, took less), or an equal share where the record does not say (older rows)."""
        if self.candidates_ms > 0:
            return min(sum(samples_ms) / self.candidates_ms, 1.0)
        return 1.0 / max(self.candidates, 1)

    def to_dict(self) -> Dict[str, Any]:
        return {"completed": self.completed, "k": self.k, "reference_k": self.reference_k,
                "blocks": [_block_list(block) for block in self.blocks],
                "reference_blocks": [_block_list(block) for block in self.reference_blocks],
                "candidates": self.candidates, "seed": self.seed,
                "candidates_ms": self.candidates_ms, "reference_sha256": self.reference_sha256,
                "state": dict(self.state), "clock": self.clock}


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
    memory: Optional[MemoryUse] = None
    ops: Optional[OpProfile] = None  # with settings per_op
    rounds: Optional[RoundsRecord] = None  # timed in interleaved rounds beside a reference

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
        memory = ops = rounds = None
        try:
            if answer.get("rounds") is not None:
                rounds = RoundsRecord.from_dict(answer["rounds"])
            if isinstance(answer.get("memory"), dict) and answer["memory"].get("available"):
                memory = MemoryUse.from_dict(answer["memory"])
            elif isinstance(answer.get("memory"), dict) and "model_bytes" in answer["memory"]:
                memory = MemoryUse(model_bytes=_size(answer["memory"]["model_bytes"]) or 0)
            if answer.get("ops") is not None:
                ops = OpProfile.from_dict(answer["ops"])
        except ValueError as exc:
            problems.append(str(exc))
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
                   stop=_dict(answer.get("stop")), memory=memory, ops=ops, rounds=rounds)


def _int_or_none(value: object) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _list(value: object) -> List[Any]:
    return list(value) if isinstance(value, list) else []


def _dict(value: object) -> Dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}
