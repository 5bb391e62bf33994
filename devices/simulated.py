"""Simulated devices: a farm's orchestration shown at the scale of a lab on one machine.

A simulated device (`transport = "sim"` in devices.toml) answers as our agent does, but runs
no model: each graph has a median latency drawn from a seeded distribution (by the device's
seed and the model's SHA-256, so every unit of one simulated model, and every rerun, gives
the same numbers), or, with `sim_costs = "graph"`, the sum of its operators' seeded costs
and a fixed cost per run (so that blocks add up to the networks they make, as on a real
device: lookup tables can be checked against an exact truth), each run a latency drawn
around it, and the agent's own timed loop
(agents.ort_agent.timed_loop, with its stop rules) runs on a virtual clock. The device then
sleeps for the time the loop would have taken and spends no CPU, so hundreds of them can be
served from a 2-core machine, and a farm's scheduling, leases, fail-over and bookkeeping
are measured, not the models.

A simulated device can be taken down and brought back while a farm runs (the soak test):
while the file `$HARNESS_HOME/sim-down/NAME` exists it answers every request as a lost
device does, after `lost_s` seconds. Each finished measurement is journalled in
`$HARNESS_HOME/sim-journal/NAME.jsonl`, so a soak test can count duplicated ones.
"""
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from agents.ort_agent import (AGENT_VERSION, AgentError, Timed, interleave, parse_settings,
                              rounds_stop, timed_loop)
from devices.agent_result import AgentResult, DeviceFacts
from devices.errors import (BadRequest, DeviceError, DeviceLost, MeasurementTimeout,
                            error_from_agent)
from devices.noise_trace import NoiseTrace
from devices.safe_files import replace_text

DOWN_FOLDER = "sim-down"
JOURNAL_FOLDER = "sim-journal"
CLOCK_FOLDER = "sim-clock"
COSTS = ("draw", "graph")  # a graph's latency: one seeded draw, or its operators' costs added
# "graph" costs, as shares of the model's median_ms: the fixed cost of a run, and a typical
# operator with weights (one without, e.g. an activation or an addition, costs a fifth of
# that); Identity and the other operators that do no work cost nothing
FIXED_SHARE, OPERATOR_SHARE, LIGHT_FACTOR = 0.05, 0.05, 0.2
FREE_OPERATORS = frozenset({"Identity", "Constant", "Shape", "Reshape", "Flatten", "Squeeze",
                            "Unsqueeze"})


def operators_cost_ms(onnx_bytes: bytes, median_ms: float, seed: int) -> float:
    """A graph's latency under "graph" costs: the fixed cost of a run plus each operator's
    cost, a seeded draw (from half to twice the typical one) by its type, its attributes and
    the shapes of its float weights. A block exported alone and the same block inside a
    network cost the same, so a network costs its blocks' costs plus one fixed cost.

    The exporter shares initializers that happen to be equal (two all-zero biases) through
    Identity nodes, across blocks too when a network is exported whole: such an Identity's
    output is read as the weight it aliases (as harness.export.graph's hash reads it), so
    the sharing changes no cost. A file that is not an ONNX graph is refused."""
    import onnx

    try:
        graph = onnx.load_from_string(onnx_bytes).graph
    except Exception as exc:  # onnx raises DecodeError and others on a file that is not ONNX
        raise BadRequest(f"a simulated device with graph costs could not read the model "
                         f"({type(exc).__name__}: {exc})") from None
    if not graph.node or not graph.output:
        raise BadRequest("a simulated device with graph costs was sent a model without "
                         "operators or outputs: not an ONNX graph it could run")
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}
    weights = {init.name: tuple(init.dims) for init in graph.initializer
               if init.data_type in floats}
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in weights:
            weights[node.output[0]] = weights[node.input[0]]
    total = median_ms * FIXED_SHARE
    for node in graph.node:
        if node.op_type in FREE_OPERATORS:
            continue
        shapes = tuple(weights[name] for name in node.input if name in weights)
        attributes = hashlib.sha256(b"".join(
            attribute.SerializeToString(deterministic=True) for attribute in
            sorted(node.attribute, key=lambda a: a.name))).hexdigest()
        draw = random.Random(f"{seed}:{node.op_type}:{shapes}:{attributes}").random()
        typical = median_ms * OPERATOR_SHARE * (1.0 if shapes else LIGHT_FACTOR)
        total += typical * 2.0 ** (2.0 * draw - 1.0)
    return total


@dataclass(frozen=True)
class SimulatedModel:
    """What a simulated device is: a name for its model, the median latency of a typical
    graph (graphs spread from half to twice it; under "graph" costs, the scale of a run's
    fixed cost and of its operators' costs, FIXED_SHARE and OPERATOR_SHARE of it), the spread
    of runs around a graph's median (coefficient of variation), the load time, the seed of
    all of it, the noise trace it replays, and how a graph's latency is made (`costs`)."""

    model: str
    median_ms: float = 20.0
    cv: float = 0.03
    load_ms: float = 50.0
    seed: int = 0
    noise: Optional[NoiseTrace] = None  # a recorded trace replayed (devices.noise_trace)
    costs: str = "draw"  # a graph's latency: "draw" (seeded by its hash) or "graph" (COSTS)
    _known: Dict[str, float] = field(default_factory=dict, init=False, compare=False,
                                     repr=False)  # graph costs read, by SHA-256

    def __post_init__(self) -> None:
        if self.costs not in COSTS:
            raise BadRequest(f"a simulated device's costs must be one of {', '.join(COSTS)}, "
                             f"got {self.costs!r}")
        for name in ("median_ms", "load_ms"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise BadRequest(f"a simulated device's {name} must be a positive number of "
                                 f"ms, got {value!r}")
        if not (isinstance(self.cv, (int, float)) and 0 <= self.cv < 1):
            raise BadRequest(f"a simulated device's cv must be from 0 to 1, got {self.cv!r}")

    def graph_median_ms(self, sha256: str, onnx_bytes: Optional[bytes] = None) -> float:
        """The median latency of one graph on this model: the same on every unit, every run.
        Under "graph" costs it is read from the model (`onnx_bytes`, needed the first time
        a graph is seen)."""
        if self.costs == "draw":
            draw = random.Random(f"{self.seed}:{sha256}").random()
            return self.median_ms * 2.0 ** (2.0 * draw - 1.0)
        if sha256 not in self._known:
            if onnx_bytes is None:
                raise BadRequest(f"graph {sha256[:12]} has not been seen by this simulated "
                                 "device: its costs come from the model file")
            self._known[sha256] = operators_cost_ms(onnx_bytes, self.median_ms, self.seed)
        return self._known[sha256]

    def read_costs(self, sha256: str, model_path: str) -> None:
        """Read a model file's costs (under "graph" costs; nothing to read otherwise)."""
        if self.costs == "graph" and sha256 not in self._known:
            self.graph_median_ms(sha256, Path(model_path).read_bytes())

    def runner(self, sha256: str, clock: "_VirtualClock") -> Callable[[], None]:
        """One run of the graph on the virtual clock: its true latency times the noise (the
        replayed trace's factor at that moment, else a draw of spread `cv`)."""
        graph_ms = self.graph_median_ms(sha256)
        draws = random.Random(f"{self.seed}:{sha256}:runs")  # equal on every rerun
        offset = random.Random(f"{self.seed}:trace").random() * 1e6  # where the trace starts
        noise = self.noise

        def run() -> None:
            if noise is not None:
                factor = noise.factor_at(offset + clock.now)
            else:
                factor = max(draws.gauss(1.0, self.cv), 0.1)
            clock.now += graph_ms * factor / 1e3

        return run

    def simulate(self, sha256: str, settings: Mapping[str, Any],
                 clock: Optional["_VirtualClock"] = None) -> "SimulatedRun":
        """What a measurement of the graph gives on this model under the agent's `settings`
        (checked): its runs through the agent's own timed loop, on a virtual clock (the
        device's, where it keeps one)."""
        clock = clock or _VirtualClock()
        run = self.runner(sha256, clock)
        clock.now += self.load_ms / 1e3  # loading the model takes the device's time too
        began = clock.now
        for _ in range(settings["warmup_runs"] + 1):
            run()
        warmup_s = clock.now - began
        samples, elapsed, stop = timed_loop(run, settings, clock)
        return SimulatedRun(self.graph_median_ms(sha256),
                            tuple(round(t * 1e3, 6) for t in samples),
                            self.load_ms, warmup_s * 1e3, elapsed * 1e3, dict(stop))


@dataclass(frozen=True)
class SimulatedRun:
    """One simulated measurement: every run's time, and how long the device was busy."""

    first_run_ms: float
    samples_ms: Tuple[float, ...]
    load_ms: float
    warmup_ms: float
    loop_ms: float
    stop: Dict[str, Any]

    @property
    def busy_s(self) -> float:
        return (self.load_ms + self.warmup_ms + self.loop_ms) / 1e3


def down_path(home: Path, name: str) -> Path:
    """The file whose presence takes simulated device `name` down."""
    return Path(home) / DOWN_FOLDER / name


def saved_clock_s(home: Path, name: str) -> float:
    """The virtual time (s) replaying device `name` stopped at in `home` (0 at first): where
    it goes on from, and what a benchmark reads its device time from."""
    try:
        now = float((Path(home) / CLOCK_FOLDER / name).read_text())
    except (OSError, ValueError):
        return 0.0
    return now if math.isfinite(now) and now >= 0 else 0.0


class SimulatedClient:
    """A DeviceClient (devices.agent_client) for a simulated device; see the module docstring."""

    def __init__(self, name: str, spec: SimulatedModel, home: Path, lost_s: float = 0.2):
        self.name = name
        self.spec = spec
        self.home = Path(home)
        self.lost_s = lost_s
        self.agent_version = AGENT_VERSION
        # A device replaying a noise trace keeps its own virtual time across measurements and
        # sessions (the trace goes on between them; kept in $HARNESS_HOME/sim-clock/NAME,
        # so a rerun in a fresh home is the same) and does not sleep: it is for statistics.
        self.clock = _VirtualClock(saved_clock_s(self.home, self.name))

    @property
    def device(self) -> str:
        return self.name

    def facts(self, deadline: float) -> DeviceFacts:
        self._check_up(deadline)
        return DeviceFacts(identity=self._identity(), state={"governors": [], "thermal": []})

    def measure(self, model_path: str, settings: Mapping[str, Any], deadline: float,
                sha256: Optional[str] = None) -> AgentResult:
        """Run the agent's timed loop on a virtual clock, then sleep as long as it took."""
        self._check_up(deadline)
        sha = sha256 or hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
        self.spec.read_costs(sha, model_path)
        try:
            checked = parse_settings(dict(settings))
        except AgentError as exc:
            raise BadRequest(exc.message) from None
        if checked.get("per_op") or checked.get("precision") not in (None, "fp32"):
            raise BadRequest(f"simulated device {self.name} has no per-operator profile and "
                             f"no precision variants", device=self.name,
                             fix="ask a real device for --ops and --precision")
        run = self.spec.simulate(sha, checked, self.clock if self.spec.noise else None)
        remaining = deadline - time.monotonic()
        if run.busy_s > remaining:
            time.sleep(max(remaining, 0.0))
            raise MeasurementTimeout(f"the simulated measurement takes {run.busy_s:.1f} s, "
                                     f"more than the time left", device=self.name)
        started = time.time()
        if self.spec.noise is None:
            time.sleep(run.busy_s)
        if down_path(self.home, self.name).exists():  # taken down while it measured
            raise DeviceLost(f"simulated device {self.name} went down mid-measurement",
                             device=self.name)
        self._journal(sha, started)
        answer = {
            "agent_version": AGENT_VERSION, "load_ms": run.load_ms,
            "first_run_ms": run.first_run_ms, "warmup_runs": checked["warmup_runs"],
            "warmup_ms": run.warmup_ms, "samples_ms": list(run.samples_ms),
            "loop_ms": run.loop_ms, "capped": run.stop["reason"] == "max_time",
            "stop": run.stop, "settings": checked, "controlled": {},
            "runtime": {"name": "simulated", "version": AGENT_VERSION,
                        "provider": checked["provider"]},
            "fingerprint": {"identity": self._identity(), "state": {}},
        }
        return AgentResult.parse(answer, self.name, AGENT_VERSION)

    def measure_rounds(self, models: Mapping[str, Tuple[str, str]], reference: Tuple[str, str],
                       settings: Mapping[str, Any], deadline: float
                       ) -> Tuple[Dict[str, AgentResult], Dict[str, DeviceError]]:
        """The agent's rounds schedule (agents.ort_agent.interleave) over the graphs on the
        device's virtual clock; sleeps as long as it took unless it replays a trace."""
        self._check_up(deadline)
        try:
            checked = parse_settings(dict(settings))
        except AgentError as exc:
            raise BadRequest(exc.message) from None
        self.spec.read_costs(reference[1], reference[0])  # the window's own fault if not
        errors: Dict[str, DeviceError] = {}
        for name, (path, sha) in models.items():
            try:
                self.spec.read_costs(sha, path)
            except BadRequest as exc:  # that model's error; the others go on
                errors[name] = exc
        models = {name: model for name, model in models.items() if name not in errors}
        if not models:
            return {}, errors
        clock = self.clock if self.spec.noise is not None else _VirtualClock()
        began = clock.now
        loads = len(models) * checked["model_sessions"] + checked["reference_sessions"]
        clock.now += self.spec.load_ms * loads / 1e3  # loading them takes time too

        def timed(name: str, sha: str) -> Timed:
            run = self.spec.runner(sha, clock)
            for _ in range(checked["warmup_runs"] + 1):
                run()
            return Timed(name, run, clock, checked["block_ms"],
                         discard_runs=checked["discard_runs"])

        ref = timed("reference", reference[1])
        timed_models = {name: timed(name, sha) for name, (_, sha) in models.items()}
        completed, loop_s, failed, reason = interleave(timed_models, ref, checked, clock)
        busy_s = clock.now - began
        if busy_s > deadline - time.monotonic():
            raise MeasurementTimeout(f"the simulated window takes {busy_s:.1f} s, more than "
                                     "the time left", device=self.name)
        if self.spec.noise is None:
            time.sleep(busy_s)
        candidates_ms = sum(ms for m in timed_models.values() for b in m.blocks for ms in b[3])
        results = {}
        for name, error in failed.items():  # as the agent answers a model failed mid-window
            errors[name] = error_from_agent(error, self.name)
        for name, model in timed_models.items():
            if name in failed:
                continue
            stop = rounds_stop(model, checked, completed, reason)
            answer = {
                "agent_version": AGENT_VERSION, "load_ms": self.spec.load_ms,
                "first_run_ms": self.spec.graph_median_ms(models[name][1]),
                "warmup_runs": checked["warmup_runs"], "warmup_ms": 0.0,
                "samples_ms": [ms for block in model.blocks for ms in block[3]],
                "loop_ms": loop_s * 1e3,
                # as the agent says it: the ci rule ran out of time before this model was known
                "capped": checked["stop"] == "ci" and stop["reason"] == "max_time",
                "stop": stop,
                "settings": checked, "controlled": {},
                "runtime": {"name": "simulated", "version": AGENT_VERSION,
                            "provider": checked["provider"]},
                "fingerprint": {"identity": self._identity(), "state": {}},
                "rounds": {"completed": completed, "k": model.k, "reference_k": ref.k,
                           "blocks": model.blocks, "reference_blocks": ref.blocks,
                           "candidates": len(models), "seed": checked["seed"],
                           "candidates_ms": candidates_ms, "reference_sha256": reference[1]}}
            results[name] = AgentResult.parse(answer, self.name, AGENT_VERSION)
        return results, errors

    def close(self) -> None:
        """Nothing runs anywhere for a simulated device; a replaying one keeps its clock."""
        if self.spec.noise is not None:
            (self.home / CLOCK_FOLDER).mkdir(parents=True, exist_ok=True)
            replace_text(self.home / CLOCK_FOLDER / self.name, repr(self.clock.now))

    def _identity(self) -> Dict[str, Any]:
        """The simulated model's identity plus this unit's name: each unit is its own device
        to the cache, as real boards are."""
        return {"system": "simulated", "model": self.spec.model,
                "median_ms": self.spec.median_ms, "cv": self.spec.cv, "seed": self.spec.seed,
                "unit": self.name, **({"costs": self.spec.costs}
                                      if self.spec.costs != "draw" else {})}

    def _journal(self, sha256: str, started: float) -> None:
        """One line per finished measurement in $HARNESS_HOME/sim-journal/NAME.jsonl: what
        a soak test counts duplicated measurements from."""
        folder = self.home / JOURNAL_FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{self.name}.jsonl", "a") as journal:
            journal.write(json.dumps({"sha256": sha256, "started": started,
                                      "ended": time.time()}) + "\n")

    def _check_up(self, deadline: float) -> None:
        if down_path(self.home, self.name).exists():
            time.sleep(max(min(self.lost_s, deadline - time.monotonic()), 0.0))
            raise DeviceLost(f"simulated device {self.name} is down",
                             device=self.name,
                             fix=f"remove {down_path(self.home, self.name)} to bring it back")


class _VirtualClock:
    """A clock the simulated runs advance; the agent's timed loop reads it as perf_counter."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def simulated_names(prefix: str, count: int) -> List[str]:
    """Names of `count` simulated units: PREFIX-000, PREFIX-001, ..."""
    width = max(3, len(str(count - 1)))
    return [f"{prefix}-{index:0{width}d}" for index in range(count)]
