"""`LatencyProfiler`: latency of samples of a model space, measured on a real device.

One `profile(sample)` call, top to bottom:
1. validate the sample against the space (InvalidSample names the label and the choices);
2. answer from memory if this profiler has seen the sample;
3. the sample's graph hash from the sample index, or freeze, export, hash (steps.export_step);
4. the measurement under its key (steps.key_scope: graph hash, input shapes, runtime
   settings, device fingerprint, agent version): a hit answers without the device;
5. otherwise the pool (harness.pool) leases a device and the agent times the model there;
   the Measurement is stored and its statistic (ms) returned: by default the quiet-state
   latency of interleaved rounds beside a reference, else a loop's median.
Steps 3-5 run for a whole batch at once (steps.batch) with steps.measuring's steps. When the
device cannot be reached, the fallback (steps.fallback) answers. A failure raises a typed
error and stores nothing.
"""
import logging
import threading
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from devices.errors import DeviceLost
from harness.export.graph import DummyInput, exported_space_fingerprint, input_signature
from harness.export.model_file import (ModelFile, ModelFilesOnly, ModelSource, NoSamples,
                                       Precision, load_model)
from harness.metrics.profiler_base import Profiler
from harness.paths import default_cache_path, harness_home
from harness.pool.device_pool import DeviceIdentity, DevicePool, MeasureRequest
from harness.pool.pools import open_pool, pool_interleaves
from harness.spaces.space import ModelSpace, SampleValidator, checked_search_space
from harness.steps.batch import answer_all
from harness.steps.counters import Counters
from harness.steps.decider import LimitDecider
from harness.steps.export_step import SampleExport
from harness.steps.fallback import Fallback, PredictionFallback
from harness.steps.key_scope import KeyScope
from harness.steps.measuring import MeasurementSteps, check_statistic, window_budget
from harness.steps.reference import Reference, default_protocol
from harness.steps.rounds import answer_in_rounds
from harness.store.cache import Cache
from harness.store.decisions import INDIFFERENCE, Decision, check_limit
from harness.store.key import MeasurementKey, canonical_json
from harness.store.measurement import Measurement

log = logging.getLogger(__name__)

DECISION_CHUNK = 50  # decide_many refits the latency model after every this many samples


class LatencyProfiler(Profiler):
    """Latency in milliseconds of samples of `space` on a real device.

    What: `space`, `dummy_input` (None, None: model files only, `measure_model`), `statistic`
        (what `profile()` returns: median, mean, p90, p99, min, max; with protocol "rounds",
        quiet or ratio; None: quiet in rounds, else median), `precision` (fp32, fp16,
        int8-dynamic, int8-static, with an .npz `calibration`), `runtime` (onnxruntime, litert,
        executorch, openvino; else settings'), converted on the host, keyed.
    Where: `device` ("local", a registered name, "kind:K": every device of kind K), or a
        `pool` opened already (harness.pool); else `isolation` ("worker", "process"),
        `max_strikes`, `quarantine_s` and `farm` (a Ray farm's address) open one.
    How: `settings` (agents.ort_agent.DEFAULT_SETTINGS, stop rules included; protocol
        "rounds" by default where the pool interleaves and a reference fits the inputs, else
        "loop": harness.steps.reference), `timeout_s` (one measurement, from the lease).
    Store and fallback: `cache` (a Cache, a path, None: $HARNESS_HOME/cache.sqlite), `refresh`
        (measure again; old results are kept), `fallback` (a harness.steps.fallback.Fallback,
        or its mode "error", "nn-meter", "model" with `predictor` and `offline`).
    `reference`: the model timed beside candidates in rounds (harness.steps.reference).
    """

    def __init__(self, space: Optional[ModelSpace], dummy_input: Optional[DummyInput],
                 device: str = "local", statistic: Optional[str] = None, *,
                 settings: Optional[Mapping[str, Any]] = None, timeout_s: float = 300.0,
                 precision: str = "fp32", calibration: Union[str, Path, None] = None,
                 runtime: Optional[str] = None,
                 pool: Optional[DevicePool] = None, isolation: str = "worker",
                 max_strikes: int = 3, quarantine_s: float = 60.0, farm: Optional[str] = None,
                 cache: Union[Cache, str, Path, None] = None, refresh: bool = False,
                 home: Union[str, Path, None] = None, fallback: Union[str, Fallback] = "error",
                 predictor: Union[str, Path, None] = None, offline: bool = False,
                 reference: Union[str, Path, bytes, None] = None):
        config = fallback if isinstance(fallback, Fallback) else \
            Fallback(fallback, predictor, offline, quarantine_s)
        models_only = space is None or dummy_input is None  # measure_model only
        if space is None or dummy_input is None:  # no samples: a stand-in for the plumbing
            space, dummy_input = ModelFilesOnly(), torch.zeros(1)
        self.space, self.device, self.home = space, device, harness_home(home)
        self.precision = Precision.of(precision, calibration, runtime, settings)
        self.request = MeasureRequest.checked(default_protocol(  # all checked before a pool opens
            dict(settings or {}, **self.precision.settings()), pool_interleaves(
                self.home, device, farm, isolation, pool), dummy_input, reference), timeout_s)
        self.settings, self.settings_key = self.request.settings, self.request.settings_key
        self.statistic = check_statistic(statistic, self.settings)
        self._validate = NoSamples() if models_only else SampleValidator(checked_search_space(space))
        self.dummy_input, self.input_signature = dummy_input, input_signature(dummy_input)
        self.space_fingerprint = exported_space_fingerprint(space, self.input_signature)
        self.cache = cache if isinstance(cache, Cache) else Cache(cache or default_cache_path(self.home))
        self.counters = Counters()  # exports, measurements, cache_hits, device_s, ...
        self.reference = Reference(dummy_input, self.home, reference, self.precision)  # rounds
        self.pool = pool or open_pool(self.home, device, farm, isolation, max_strikes, quarantine_s)
        self._memo: Dict[tuple, float] = {}  # sample values in label order -> statistic
        self._base_scope = KeyScope(self.space_fingerprint, canonical_json(self.input_signature),
                                    self.settings_key)
        self._scope: Optional[KeyScope] = None  # with the device's part, once identified
        self._identity: Optional[DeviceIdentity] = None
        self._identify_lock = threading.Lock()
        self.export = SampleExport(space, dummy_input, self._base_scope, self.cache,
                                   self.precision, self.home, self.counters)
        self.steps = MeasurementSteps(self.export, self.cache, self.key_scope, self.counters,
                                      self.pool.isolation, refresh, self.request, self.reference,
                                      old_way=self.statistic != "ratio",
                                      budget=lambda: window_budget(self.identify().facts.state))
        self.decider = LimitDecider(  # the device's latency model lives there
            space, dummy_input, steps=self.steps, base_scope=self._base_scope,
            statistic=self.statistic, device=device, devices=self.pool.devices or [device])
        self.fallback = PredictionFallback(
            config, space=space, dummy_input=dummy_input, device=device, home=self.home, cache=self.cache,
            devices=self.pool.devices, scope=self._base_scope, export=self.export, counters=self.counters,
            refresh=refresh, model=self.decider.predicted_measurement, statistic=self.statistic)

    refresh = property(lambda self: self.steps.refresh,  # the steps' setting, set from here
                       lambda self, value: setattr(self.steps, "refresh", value),
                       doc="Whether the cache is passed by (measured again; old results kept).")

    # ------------------------------------------------------------ the public calls

    def profile(self, sample: Mapping[str, Any]) -> float:
        """The statistic (ms) of one sample; from memory when this profiler has seen it."""
        memo_key = tuple(self._validate(sample).values())
        if memo_key in self._memo:
            return self._memo[memo_key]
        return self.measure(sample).statistic(self.statistic)

    def measure(self, sample: Mapping[str, Any], per_op: bool = False) -> Measurement:
        """The full Measurement (raw samples, statistics, provenance, memory, source); with
        `per_op`, its per-operator profile (`.ops`) from runs apart from the timed ones."""
        return self.measure_many([sample], progress=False, per_op=per_op)[0]

    def profile_many(self, samples: Iterable[Mapping[str, Any]],
                     progress: Optional[bool] = None) -> List[float]:
        """profile() over many samples, in input order."""
        return [m.statistic(self.statistic) for m in self.measure_many(samples, progress)]

    def measure_many(self, samples: Iterable[Mapping[str, Any]],
                     progress: Optional[bool] = None, per_op: bool = False) -> List[Measurement]:
        """measure() over many samples, in input order, with a progress bar on a terminal.
        Each result is stored as it completes (a sweep cut short resumes from the cache); the
        first failure is raised once the rest is done; a lost device's share falls back."""
        steps = self.steps.for_request(self.request.with_settings(  # per-op times: a loop's
            per_op=True, protocol="loop")) if per_op else self.steps
        canonical = [self._validate(sample) for sample in samples]      # step 1
        if self.fallback.active():
            return [self.fallback.answer(sample, None) for sample in canonical]
        results: List[Optional[Measurement]] = [None] * len(canonical)
        try:  # steps 3 and 4 (identifying the device), then 3-5 for the rest
            results = [steps.cached(self.export.indexed(sample)) for sample in canonical]
            if steps.request.settings["protocol"] == "rounds":  # together, beside a reference
                answer_in_rounds(canonical, results, steps, pool=self.pool,
                                 what=f"profiling on {self.device}", progress=progress)
            else:  # one model after another
                answer_all(canonical, results, steps, pool=self.pool, request=steps.request,
                           what=f"profiling on {self.device}", progress=progress)
        except DeviceLost as exc:  # what the lost device left unanswered falls back
            results = [r or self.fallback.answer(s, exc) for r, s in zip(results, canonical)]
        self._memo.update((tuple(sample.values()), result.statistic(self.statistic))
                          for sample, result in zip(canonical, results)
                          if result is not None and steps is self.steps)
        return results  # type: ignore[return-value]

    def decide(self, sample: Mapping[str, Any], limit_ms: float, confidence: float = 0.99,
               indifference: float = INDIFFERENCE) -> Decision:
        """Is the sample's latency below `limit_ms`, up to +-indifference x the limit? Measured
        until that is settled or its budget is spent (harness.store.decisions: the guarantee)."""
        return self.decide_many([sample], limit_ms, confidence, False, indifference)[0]

    def decide_many(self, samples: Iterable[Mapping[str, Any]], limit_ms: float,
                    confidence: float = 0.99, progress: Optional[bool] = None,
                    indifference: float = INDIFFERENCE) -> List[Decision]:
        """decide() over many samples, in input order: in rounds where this profiler measures in
        rounds (the decided leave them), else one at a time; the model refits between chunks."""
        decisions = self.decider.start(*check_limit(limit_ms, confidence, indifference))
        canonical = [self._validate(sample) for sample in samples]
        results: List[Optional[Decision]] = []
        for start in range(0, len(canonical), DECISION_CHUNK):  # cache and model, then device
            chunk = canonical[start:start + DECISION_CHUNK]
            answers = [decisions.known(start + i, s, self.export.indexed(s))
                       for i, s in enumerate(chunk)]
            decisions.answer(chunk, answers, self.pool, f"deciding on {self.device}", progress)
            results += answers
            self.decider.learn()
        return decisions.finish(results)

    def measure_module(self, module: torch.nn.Module, dummy_input: DummyInput) -> Measurement:
        """Latency of any module on this device, through the cache (its graph and inputs)."""
        return self.measure_modules([(module, dummy_input)])[0]

    def measure_modules(self, modules: Sequence[Tuple[torch.nn.Module, DummyInput]],
                        samples: Iterable[Mapping[str, Any]] = ()) -> List[Measurement]:
        """measure_module over many, and `samples`, together: in rounds, in the same windows
        (a table's blocks and the wholes they add up to see one speed). Modules', samples'."""
        return self.steps.together(modules, [self.export(self._validate(s)) for s in samples],
                                   self.pool, self.precision)

    def measure_model(self, model: Union[ModelSource, ModelFile],
                      input_shapes: Optional[Mapping[str, List[int]]] = None,
                      per_op: bool = False) -> Measurement:
        """Latency of any ONNX model (a path, its bytes or a ModelFile) on this device, at this
        precision, through the same cache (its graph hash, input shapes, settings).
        `input_shapes` ({name: shape}) sizes its dynamic axes: one left out is refused."""
        loaded = model if isinstance(model, ModelFile) else load_model(model)
        shapes = loaded.resolved_shapes(input_shapes)
        steps = self.steps.for_request(self.request.with_settings(
            input_shapes=shapes, per_op=per_op, **({"protocol": "loop"} if per_op else {})))
        return steps.one(loaded.exported(), loaded.signature(shapes), shapes, self.pool,
                         self.precision)

    def identify(self) -> DeviceIdentity:
        """Who the device is, asked once a session (its identity is in every cache key)."""
        self.key_scope()
        return self._identity  # type: ignore[return-value]

    def key_scope(self) -> KeyScope:
        """The keys on this profiler's device, identified on first use (then the memo is
        filled with what the cache holds for this space on it)."""
        with self._identify_lock:
            if self._scope is None:
                identity = self._identity = self.pool.identify(self.request.timeout_s)
                self.cache.put_device(identity.fingerprint, dict(identity.facts.identity))
                log.info("%s is %s", self.device, identity.facts.identity.get("cpu_model"))
                self._scope = self._base_scope.on_device(
                    identity.fingerprint, identity.agent_version, identity.model,
                    self.cache.units_of_model(identity.fingerprint, identity.model)
                    if self.device.startswith("kind:") else None)
                if self.request.settings["stop"] == "fixed":
                    self._memo.update(self.steps.stored_statistics(
                        self._scope, self.statistic, self._validate.labels))
            return self._scope

    def cache_key(self, graph: str) -> MeasurementKey:
        """The cache key a measurement of `graph` on this profiler's device is stored under."""
        return self.key_scope().key(graph)

    def graph_hash(self, sample: Mapping[str, Any]) -> str:
        """The sample's graph hash (from the sample index, or by exporting it)."""
        canonical = self._validate(sample)
        return self.export.indexed(canonical) or self.export(canonical).graph_hash

    def close(self) -> None:
        """Stop the agents on the devices and release temporary files."""
        self.pool.close()
