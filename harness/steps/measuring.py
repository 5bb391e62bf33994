"""Steps 3-5 of a profiler's measurement, given what they use (the export step, the cache,
the key scope, the counters, the request): what harness.steps.batch runs for each sample,
`one` for a model outside the space (a module, a model file), and `together` for many such
models timed in the same windows (a lookup table's blocks and wholes). `windows` cuts a
batch for interleaved rounds by the device's memory."""
import logging
import time
from dataclasses import dataclass, replace
from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar,
                    cast)

from agents.ort_agent import BLOCK_RUNS, runs_per_block
from devices.agent_client import AGENT_VERSION
from devices.agent_result import CLOCKS, AgentResult
from devices.errors import AgentProtocolError
from harness.export.graph import ExportedModel, export_module, input_signature
from harness.export.model_file import Precision
from harness.export.precision_check import CPU, check_on_cpu
from harness.pool.device_pool import DevicePool, MeasureRequest
from harness.spaces.space import values_by_sample
from harness.steps.counters import Counters
from harness.steps.export_step import SampleExport
from harness.steps.key_scope import KeyScope
from harness.store.cache import Cache
from harness.store.key import MeasurementKey, canonical_json, digest, settings_key
from harness.store.rounds import ReferenceLevel, block_statistic, block_times
from harness.errors import InvalidArgument
from harness.store.measurement import STATISTICS, Measurement

log = logging.getLogger(__name__)

# A loaded model takes about this many times its file's size on the device (weights, the
# runtime's arena, the inputs and outputs); a window holds at most WINDOW_BUDGET_BYTES of it,
# and at most WINDOW_MEMORY_SHARE of the memory the device said it had available
# (window_budget): the worker, its runtime and the reference need the rest, and the agent
# ends a worker that passes 90% of the device's RAM.
MEMORY_FACTOR = 4
WINDOW_BUDGET_BYTES = 512 * 2 ** 20
WINDOW_MEMORY_SHARE = 0.5
MAX_WINDOW_MODELS = 48


T = TypeVar("T")


def loaded_bytes(model: ExportedModel) -> int:
    """About how much of the device's memory one session of `model` takes (MEMORY_FACTOR
    times its file)."""
    return MEMORY_FACTOR * len(model.onnx_bytes)


def windows(items: Sequence[T], budget_bytes: int = WINDOW_BUDGET_BYTES,
            max_models: int = MAX_WINDOW_MODELS,
            model: Optional[Callable[[T], ExportedModel]] = None,
            sessions: int = 1) -> List[List[T]]:
    """`items` (models, or what `model` reads a model from) cut, in order, into windows
    whose models' loaded size, each loaded in `sessions` sessions (the agent's
    model_sessions), stays within the budget (a model larger than the budget alone) and that
    hold at most `max_models` each."""
    read = model or (lambda item: cast(ExportedModel, item))
    cut: List[List[T]] = []
    size = 0
    for item in items:
        need = sessions * loaded_bytes(read(item))
        if not cut or size + need > budget_bytes or len(cut[-1]) >= max_models:
            cut.append([])
            size = 0
        cut[-1].append(item)
        size += need
    return cut


def window_budget(state: Mapping[str, Any]) -> int:
    """The loaded bytes a window may hold on a device whose state (DeviceFacts.state) is
    `state`: WINDOW_BUDGET_BYTES, or WINDOW_MEMORY_SHARE of the memory the device said it had
    available where that is less (an agent before 2026-12-07 does not say)."""
    available = state.get("mem_available_kb")
    if isinstance(available, bool) or not isinstance(available, int) or available <= 0:
        return WINDOW_BUDGET_BYTES
    available = min(available, WINDOW_BUDGET_BYTES)  # kB: so large a figure changes nothing
    return min(WINDOW_BUDGET_BYTES, int(WINDOW_MEMORY_SHARE * available * 1024))


def window_request(request: MeasureRequest, window: Sequence[ExportedModel], block_runs: int,
                   budget_bytes: int = WINDOW_BUDGET_BYTES) -> MeasureRequest:
    """The request of a window of candidates (cut by `windows`): max_time_ms and timeout_s
    are per candidate, so the window's are that many times theirs; its blocks of
    `block_runs` timed runs (0: the window's probe chooses; see MeasurementSteps.block_runs);
    each candidate in the request's model_sessions, or in as many as the budget holds (one
    at least) where a model too large for them all goes alone, so that no window asks the
    device for more memory than the budget when one session of it would fit."""
    models = len(window)
    sessions = int(request.settings["model_sessions"])
    need = sum(loaded_bytes(model) for model in window)
    fitting = sessions if need * sessions <= budget_bytes else max(1, budget_bytes // need)
    if fitting < sessions:
        log.warning("model %s needs about %.0f MiB loaded: timed in %d session(s) instead of "
                    "model_sessions=%d, within the window's memory budget of %.0f MiB",
                    ", ".join(model.graph_hash[:12] for model in window), need / 2 ** 20,
                    fitting, sessions, budget_bytes / 2 ** 20)
    windowed = request.with_settings(max_time_ms=request.settings["max_time_ms"] * models,
                                     block_runs=block_runs, model_sessions=fitting)
    return replace(windowed, timeout_s=request.timeout_s * models,
                   still_needed=request.still_needed)


def reference_history_key(settings: Mapping[str, Any], clock: str, block_runs: int) -> str:
    """The key a device's history of reference blocks is kept under: the reference as it
    ran (the runtime settings, with its own inputs, at fp32, whatever the candidates' shapes
    and precision: one history for a device's every window), the agent's version, the clock
    its blocks are read by (agents.ort_agent.run_cpu_clock: the settings choose it, and a
    device whose thread clock fails the agent's probe falls back to the wall), the block
    length and the timed runs per block (the level is a low quantile of block minima, and
    the minimum of fewer runs lies higher), the runs a block throws away first (the first
    run after a switch of model runs slow) and the sessions the reference is loaded in (its
    blocks are a mixture of their draws), so that levels read one way never mix with
    another's."""
    return digest({"settings": settings_key(dict(settings, input_shapes=None, precision="fp32",
                                                 calibration=None)),
                   "agent_version": AGENT_VERSION, "clock": clock,
                   "block_ms": float(settings["block_ms"]), "block_runs": int(block_runs),
                   "discard_runs": int(settings["discard_runs"]),
                   # keyed only when more than one: one session keys as it did before
                   **({"reference_sessions": int(settings["reference_sessions"])}
                      if settings["reference_sessions"] != 1 else {})})


def check_statistic(statistic: Optional[str], settings: Mapping[str, Any]) -> str:
    """The statistic a profiler answers with under these settings: `statistic`, or by default
    the quiet-state latency of interleaved rounds ("quiet") and the median of a loop;
    InvalidArgument for one it cannot answer ("quiet" and "ratio" need interleaved rounds)."""
    if statistic is None:
        return "quiet" if settings["protocol"] == "rounds" else "median"
    if statistic not in STATISTICS:
        raise InvalidArgument(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    if statistic in ("quiet", "ratio") and settings["protocol"] != "rounds":
        raise InvalidArgument(f"the {statistic} statistic needs interleaved rounds",
                              fix="pass settings={'protocol': 'rounds'} (--protocol rounds)")
    return statistic


class MeasurementSteps:
    """Steps 3-5 of a measurement under one request (harness.steps.batch.Answering): `export`
    a sample, the `cached` measurement of a graph (on any unit the key scope answers from),
    and `store` a device's result under the device that measured it."""

    def __init__(self, export: SampleExport, cache: Cache, scope: Callable[[], KeyScope],
                 counters: Counters, isolation: str, refresh: bool, request: MeasureRequest,
                 reference: Callable[[], ExportedModel], old_way: bool = True,
                 budget: Optional[Callable[[], int]] = None):
        self.export, self.cache, self.scope, self.counters = export, cache, scope, counters
        self.isolation, self.refresh, self.request = isolation, refresh, request
        self.reference = reference  # timed beside the candidates with protocol "rounds"
        # whether a result timed one model at a time answers a request of rounds where none
        # of rounds is stored (not where the profiler answers with the ratio, which it has not)
        self.old_way = old_way
        self.budget = budget  # the device's window budget (window_budget), once identified

    def for_request(self, request: MeasureRequest) -> "MeasurementSteps":
        return MeasurementSteps(self.export, self.cache, self.scope, self.counters,
                                self.isolation, self.refresh, request, self.reference,
                                self.old_way, self.budget)

    def window_budget(self) -> int:
        """The loaded bytes one window may hold on this device (window_budget)."""
        return self.budget() if self.budget is not None else WINDOW_BUDGET_BYTES

    def stored_statistics(self, scope: KeyScope, statistic: str, labels: Sequence[str]
                          ) -> Dict[tuple, float]:
        """{sample values in label order: statistic} of every sample of the space whose
        newest measurement on `scope`'s units answers a loop request (none for rounds)."""
        known: Dict[tuple, float] = {}
        if self.refresh or self.request.settings["protocol"] != "loop":
            return known
        for unit in reversed(scope.units):  # the session's own unit wins
            known.update(values_by_sample(self.cache.statistics_by_sample(
                scope.space_fingerprint, scope.input_sig, self.request.settings_key, unit,
                scope.agent_version, statistic), labels))
        return known

    def cached(self, graph: Optional[str], input_sig: Optional[str] = None,
               old_way: bool = True) -> Optional[Measurement]:
        """Step 4: the newest stored measurement that answers the request, if any. Under
        rounds, where no result of rounds is stored, one timed one model at a time (made
        before rounds, with protocol="loop", on a farm) answers as it is and says so: its
        `protocol` is "loop", its quiet-state latency is its median (Measurement.statistic),
        and the profiler's first such answer logs a warning; refresh=True measures anew.
        Not with `old_way=False` (nor where the steps' `old_way` is off): blocks and the
        wholes they add up to must see the device in the same rounds."""
        if graph is None or self.refresh:
            return None
        keys = self.scope().lookup_keys(graph, input_sig=input_sig,
                                        settings_key=self.request.settings_key)
        for key in keys:
            cached = self.cache.newest(  # one not as precise as asked is measured again
                key, lambda m: self.request.accepts(m) and self._same_reference(m))
            if cached is not None:
                self.counters.add(cache_hits=1)
                return cached
        if not (self.old_way and old_way) or self.request.settings["protocol"] != "rounds":
            return None
        if any(self.cache.newest(key, lambda m: m.rounds is not None) for key in keys):
            return None  # measured in rounds already (beside another reference, less precise)
        for key in keys:
            cached = self.cache.newest(key, lambda m: self.request.accepts(m, old_way=True))
            if cached is not None:
                if self.counters.count_first("old_way_answers", cache_hits=1):
                    log.warning("answered from a measurement timed one model at a time (made "
                                "before rounds, with protocol='loop' or on a farm; its "
                                "Measurement.protocol says 'loop' and its median stands for "
                                "the quiet-state latency); pass refresh=True (--refresh) to "
                                "measure such samples again in rounds")
                return cached
        return None

    def _same_reference(self, cached: Measurement) -> bool:
        """A rounds request takes a result of rounds only beside the same reference model
        (a ratio is to its reference); any other request, any result."""
        if self.request.settings["protocol"] != "rounds" or cached.rounds is None:
            return True
        return cached.rounds.reference_sha256 == self.reference().sha256

    def store(self, result: AgentResult, exported: ExportedModel,
              signature: Optional[List[Dict[str, Any]]] = None) -> Measurement:
        """Step 5's end: the result as a Measurement, stored under the device that measured."""
        signature = signature or self.export.signature
        key = self.scope().key_of(result, exported.graph_hash, input_sig=canonical_json(signature),
                                  settings_key=self.request.settings_key)
        measured = Measurement.from_result(
            result, exported.graph_hash, signature, export_ms=exported.export_ms,
            convert_ms=exported.convert_ms, outside_backend=exported.outside_backend,
            model_sha256=exported.sha256, model_bytes=len(exported.onnx_bytes),
            isolation=self.isolation, reference_level=self.reference_level(key, result))
        measured = measured.with_flag(self.precision_flag(exported))
        if key.device_fp != self.scope().device_fp:  # in a pool, devices of a kind may differ
            self.cache.put_device(key.device_fp, dict(result.facts.identity))
        self.cache.put(key, measured)
        self.counters.add(measurements=1, device_s=measured.device_s,  # and the fixed loop's
                          fixed_loop_s=measured.fixed_loop_device_s)
        return measured

    def precision_flag(self, converted: ExportedModel) -> Optional[str]:
        """How many nodes of an fp16 or int8 model the CPU provider runs in fp32 (None: all
        at the precision asked, fp32 asked, or another provider, which this host may lack);
        stored with the measurement, so a cached answer says it too."""
        settings = self.request.settings
        precision = settings.get("precision") or "fp32"
        if precision == "fp32" or (settings.get("provider") or CPU) != CPU or \
                (settings.get("runtime") or "onnxruntime") != "onnxruntime":
            return None  # other runtimes run their own quantized kernels (their backend says)
        check = check_on_cpu(converted, precision)
        return None if check is None else check.flag()

    def reference_level(self, key: MeasurementKey, result: AgentResult
                        ) -> Optional[ReferenceLevel]:
        """For a result of interleaved rounds, the reference's quiet level from the device's
        history under the clock and k its window was read by (this window's reference blocks
        recorded first); else None."""
        if result.rounds is None:
            return None
        began = result.lease[0] if result.lease else time.time()  # the window's start
        blocks = [(block[2], block_statistic(block_times(block)), began + block[4])
                  for block in result.rounds.reference_blocks]
        return self.cache.reference_level(
            key.device_fp, self._reference_ran_as(result.rounds.clock, result.rounds.reference_k),
            result.rounds.reference_sha256, f"{began:.6f}", blocks)

    def known_reference(self) -> Tuple[Optional[float], int]:
        """The reference's quiet level the device's history shows so far (None: no history)
        and how many blocks it stands on, recording nothing: what a decision's limit is read
        against before its window. The history is the device's newest, by the clock and k it
        was read at (a device that answers by the wall has no history under the thread's
        clock)."""
        newest = self._newest_history()
        if newest is None:
            return None, 0
        return self.cache.known_reference(self.scope().device_fp,
                                          self._reference_ran_as(*newest),
                                          self.reference().sha256)

    def known_reference_level(self) -> Optional[float]:
        """known_reference's level alone."""
        return self.known_reference()[0]

    def block_runs(self) -> int:
        """The timed runs per block of this profiler's next window: the request's, if it
        fixes them; else the k whose blocks last block_ms at the reference's quiet level in
        the device's newest history (0 before the device's first window: that window's
        probe chooses). Three probe runs in every window would switch k between windows
        wherever the reference's run lies near block_ms / k, and a ratio of minima of 1 run
        reads otherwise than one of 2; a level of many blocks moves by tenths of a percent,
        so k stays put (scripts/benchmark-log.md, "k kept for the device"). In a pool, the
        device is the profiler's first (KeyScope.device_fp), whose k every unit then
        takes."""
        fixed = self.request.settings["block_runs"]
        if fixed is not None:
            return int(fixed)
        level, _ = self.known_reference()
        return 0 if level is None else runs_per_block(self.request.settings["block_ms"], level)

    def _newest_history(self) -> Optional[Tuple[str, int]]:
        """The clock and k of the device's newest reference history under this request and
        reference (None: none yet)."""
        keys = {self._reference_ran_as(clock, k): (clock, k)
                for clock in CLOCKS for k in BLOCK_RUNS}
        newest = self.cache.newest_history(self.scope().device_fp, list(keys),
                                           self.reference().sha256)
        return keys[newest] if newest is not None else None

    def window_request(self, window: Sequence[ExportedModel],
                       budget_bytes: Optional[int] = None) -> MeasureRequest:
        """The request of this profiler's next window, of these candidates (within the
        device's window budget unless `budget_bytes` is given)."""
        return window_request(self.request, window, self.block_runs(),
                              self.window_budget() if budget_bytes is None else budget_bytes)

    def _reference_ran_as(self, clock: str, block_runs: int) -> str:
        """The key of the reference's history under this profiler's request, a clock and
        blocks of `block_runs` timed runs (reference_history_key)."""
        return reference_history_key(self.request.settings, clock, block_runs)

    def together(self, modules: Sequence[Tuple[Any, Any]], samples: Sequence[ExportedModel],
                 pool: DevicePool, precision: Precision) -> List[Measurement]:
        """Steps 4-5 for modules ((module, its dummy input): blocks, identities) and samples
        exported already, together: each from the cache, else converted and, under the
        rounds protocol, timed in the same windows beside the reference, so that blocks and
        the wholes they add up to see the device at the same speed (one at a time in a
        loop). The modules' results then the samples'; the first failure is raised once the
        rest are stored."""
        models = [ModelToTime.of_module(module, dummy) for module, dummy in modules] + [
            ModelToTime(exported, self.export.signature, converted=True) for exported in samples]
        if self.request.settings["protocol"] != "rounds":
            return [self.one(m.exported, m.signature, None, pool, precision, m.module,
                             m.dummy_input, converted=m.converted) for m in models]
        results: List[Any] = [self.cached(m.exported.graph_hash, canonical_json(m.signature),
                                          old_way=False) for m in models]
        pending: Dict[Tuple[str, str], Tuple[ExportedModel, List[Dict[str, Any]]]] = {}
        for model, result in zip(models, results):
            if result is None:
                pending.setdefault(model.key, (model.exported if model.converted else
                                               precision.convert(model.exported, model.shapes,
                                                                 model.module, model.dummy_input,
                                                                 self.export.home),
                                               model.signature))
        answered: Dict[Tuple[str, str], Any] = {}
        for window in windows(list(pending.items()), self.window_budget(),
                              model=lambda item: item[1][0],
                              sessions=self.request.settings["model_sessions"]):
            candidates = [exported for _, (exported, _) in window]
            answers = pool.measure_rounds(candidates, self.reference(),
                                          self.window_request(candidates))
            for key, (exported, signature) in window:
                answer = answers.get(exported.graph_hash) or AgentProtocolError(
                    f"the device did not answer for {exported.graph_hash[:12]}")
                answered[key] = answer if isinstance(answer, Exception) else \
                    self.store(answer, exported, signature)
        results = [result if result is not None else answered[model.key]
                   for model, result in zip(models, results)]
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    def one(self, exported: ExportedModel, signature: List[Dict[str, Any]],
            shapes: Optional[Mapping[str, List[int]]], pool: DevicePool,
            precision: Precision, module: Optional[Callable[[], Any]] = None,
            dummy_input: Any = None, converted: bool = False) -> Measurement:
        """Steps 4-5 for one model outside the space: the cache, else the device (converted
        to the profiler's precision unless `converted` already; `shapes`: its inputs', else
        the signature's), stored."""
        shapes = shapes or {f"input{i}": item["shape"] for i, item in enumerate(signature)}
        cached = self.cached(exported.graph_hash, canonical_json(signature))
        if cached is not None:
            return cached
        if not converted:
            exported = precision.convert(exported, shapes, module, dummy_input,
                                         self.export.home)
        if self.request.settings["protocol"] != "rounds":
            return self.store(pool.measure(exported, self.request), exported, signature)
        # alone in a window beside the reference (the reference-paired window)
        answer = pool.measure_rounds([exported], self.reference(),
                                     self.window_request([exported]))[exported.graph_hash]
        if isinstance(answer, Exception):
            raise answer
        return self.store(answer, exported, signature)


@dataclass(frozen=True)
class ModelToTime:
    """A model `MeasurementSteps.together` times: exported, its input signature, and how to
    convert it (`module` builds it again for a runtime that converts from modules);
    `converted`: in the profiler's precision and format already (a sample's export)."""

    exported: ExportedModel
    signature: List[Dict[str, Any]]
    module: Optional[Callable[[], Any]] = None
    dummy_input: Any = None
    converted: bool = False

    @classmethod
    def of_module(cls, module: Any, dummy_input: Any) -> "ModelToTime":
        return cls(export_module(module.eval(), dummy_input), input_signature(dummy_input),
                   lambda: module, dummy_input)

    @property
    def key(self) -> Tuple[str, str]:
        return self.exported.graph_hash, canonical_json(self.signature)

    @property
    def shapes(self) -> Dict[str, List[int]]:
        return {f"input{i}": item["shape"] for i, item in enumerate(self.signature)}

