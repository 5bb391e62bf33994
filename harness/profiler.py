"""`LatencyProfiler`: latency of samples of a model space, measured on a real device.

One `profile(sample)` call, top to bottom:
1. validate the sample against the space (InvalidSample names the label and the choices);
2. answer from memory if this profiler has seen the sample;
3. find the sample's graph hash in the cache's sample index, or freeze, export and hash it;
4. look the measurement up by (graph hash, input shapes, runtime settings, device
   fingerprint, agent version): a hit answers without touching the device;
5. otherwise the pool (harness.pool.device_pool) leases a device and lets the agent time the model
   there; the Measurement is stored and its statistic (median by default, ms) returned.
When the device cannot be reached, the fallback (harness.steps.fallback) answers. A failure raises
a typed error and stores nothing. `measure_many` takes the same steps for many samples.
"""
import logging
import threading
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Union

import torch

from devices.agent_result import AgentResult
from devices.errors import BadRequest, DeviceLost
from harness.steps.batch import answer_all
from harness.store.cache import Cache
from harness.store.key import MeasurementKey, canonical_json, digest, model_of
from harness.steps.decider import LimitDecider
from harness.store.decisions import Decision, check_limit
from harness.pool.device_pool import DeviceIdentity, MeasureRequest
from harness.export.graph import (DummyInput, ExportedModel, export_module, export_sample,
                            exported_space_fingerprint, input_signature)
from harness.steps.fallback import PredictionFallback
from harness.store.measurement import STATISTICS, Measurement
from harness.export.model_file import (ModelFile, ModelFilesOnly, ModelSource, NoSamples, Precision,
                                load_model)
from harness.paths import default_cache_path, harness_home
from harness.pool.pools import open_pool
from harness.metrics.profiler_base import Profiler
from harness.spaces.space import (ModelSpace, Sample, SampleValidator, checked_search_space,
                           sample_key, values_by_sample)

log = logging.getLogger(__name__)

DECISION_CHUNK = 50  # decide_many refits the latency model after every this many samples


class LatencyProfiler(Profiler):
    """Latency in milliseconds of samples of `space` on a real device.

    device: "local" (this machine), a registered device name, or "kind:K" for every
        registered device of kind K (jobs go to whichever is free, and fail over).
    statistic: what `profile()` returns: median (default), mean, p90, p99, min, max.
    settings: agent settings (agents.ort_agent.DEFAULT_SETTINGS, stop rules included); cache: a
        Cache, a path, or None for $HARNESS_HOME/cache.sqlite; isolation: "worker" (one agent
        process per session) or "process" (one per measurement, ~150 ms more each).
    timeout_s: how long one measurement may take, counted from the lease of its device.
    refresh: measure again even when the cache has a result (the old one is kept).
    max_strikes, quarantine_s: a device failing max_strikes times in a row is left alone for
        quarantine_s seconds (its jobs fail over to the others of its pool).
    farm: a Ray farm's address (harness.pool.ray_pool), with device="kind:K".
    fallback, predictor, offline: what answers when the device cannot be reached ("error"
        raises; "nn-meter" or "model" predict, see harness.steps.fallback); offline: never try it.
    precision: fp32, fp16, int8-dynamic or int8-static (calibration: an .npz of inputs, else
        random ones): models are converted on the host (harness.export.model_file); it is keyed.
    space=None, dummy_input=None: a profiler of model files only (`measure_model`).
    """

    def __init__(self, space: Optional[ModelSpace], dummy_input: Optional[DummyInput],
                 device: str = "local",
                 statistic: str = "median", *, settings: Optional[Mapping[str, Any]] = None,
                 cache: Union[Cache, str, Path, None] = None, isolation: str = "worker",
                 timeout_s: float = 300.0, refresh: bool = False,
                 home: Union[str, Path, None] = None, max_strikes: int = 3,
                 quarantine_s: float = 60.0, farm: Optional[str] = None,
                 fallback: str = "error", predictor: Union[str, Path, None] = None,
                 offline: bool = False, precision: str = "fp32",
                 calibration: Union[str, Path, None] = None):
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        if offline and fallback == "error":
            raise BadRequest("an offline profiler can only predict",
                             fix="pass fallback='nn-meter' (calibrate first) or fallback='model'")
        models_only = space is None or dummy_input is None  # measure_model only
        if space is None or dummy_input is None:  # no samples: a stand-in for the plumbing
            space, dummy_input = ModelFilesOnly(), torch.zeros(1)
        self.space, self.device, self.statistic, self.refresh = space, device, statistic, refresh
        self.home = harness_home(home)
        self.precision = Precision(precision, calibration)
        self.request = MeasureRequest.checked(dict(settings or {}, **self.precision.settings()),
                                              timeout_s)
        self.settings, self.settings_key = self.request.settings, self.request.settings_key
        self._validate = NoSamples() if models_only else SampleValidator(checked_search_space(space))
        self.dummy_input = dummy_input
        self.input_signature = input_signature(dummy_input)
        self._input_sig = canonical_json(self.input_signature)
        self.space_fingerprint = exported_space_fingerprint(space, self.input_signature)
        self.cache = cache if isinstance(cache, Cache) else Cache(cache or default_cache_path(self.home))
        self.counters: Counter = Counter()  # exports, measurements, cache_hits, device_s, ...
        self._memo: Dict[tuple, float] = {}  # sample values in label order -> statistic
        self._lock = threading.RLock()      # export and device threads share the above
        self._identity: Optional[DeviceIdentity] = None
        # device fingerprints a lookup answers from: the device's own (and its model's, the
        # key before identities had a unit); in a pool of a kind, every unit of its model the
        # cache knows (any free unit may measure a job)
        self._units: List[str] = []
        self.pool = open_pool(self.home, device, farm, isolation, max_strikes, quarantine_s)
        self.decider = LimitDecider(self)  # the device's latency model lives there
        self.fallback = PredictionFallback.of(self, fallback, predictor, offline, quarantine_s)

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
        request = self.request.with_settings(per_op=True) if per_op else self.request
        canonical = [self._validate(sample) for sample in samples]
        if self.fallback.active():
            return [self.fallback.answer(sample, None) for sample in canonical]
        results: List[Optional[Measurement]] = [None] * len(canonical)
        try:
            self._measure_all(canonical, results, progress, request)
        except DeviceLost as exc:  # what the lost device left unanswered falls back
            results = [r or self.fallback.answer(s, exc) for r, s in zip(results, canonical)]
        return results  # type: ignore[return-value]

    def decide(self, sample: Mapping[str, Any], limit_ms: float, confidence: float = 0.99) -> Decision:
        """Is the sample's median latency below `limit_ms`? Measured only until the interval of
        the median settles it (harness.store.decisions: how, and the error rate it guarantees)."""
        return self.decide_many([sample], limit_ms, confidence, progress=False)[0]

    def decide_many(self, samples: Iterable[Mapping[str, Any]], limit_ms: float,
                    confidence: float = 0.99, progress: Optional[bool] = None) -> List[Decision]:
        """decide() over many samples, in input order, pipelined and pooled like measure_many;
        the device's latency model refits between chunks as the measurements come in."""
        decisions = self.decider.start(*check_limit(limit_ms, confidence))
        canonical = [self._validate(sample) for sample in samples]
        results: List[Any] = []
        for start in range(0, len(canonical), DECISION_CHUNK):  # cache and model, then device
            answers = [decisions.known(start + i, s, self._indexed(s))
                       for i, s in enumerate(canonical[start:start + DECISION_CHUNK])]
            answer_all(canonical[start:start + DECISION_CHUNK], answers, progress=progress,
                       what=f"deciding on {self.device}", export=self._export,
                       cached=decisions.cached, pool=self.pool, request=decisions.request,
                       store=decisions.store)
            results += answers
            self.decider.learn()
        return decisions.finish(results)

    def measure_module(self, module: torch.nn.Module, dummy_input: DummyInput) -> Measurement:
        """Latency of any module (a block of a lookup table, say) on this profiler's device,
        through the same cache, keyed by its own graph hash and input shapes."""
        signature = input_signature(dummy_input)
        return self._measured(export_module(module.eval(), dummy_input), signature, {
            f"input{i}": item["shape"] for i, item in enumerate(signature)}, self.request)

    def measure_model(self, model: Union[ModelSource, ModelFile],
                      input_shapes: Optional[Mapping[str, List[int]]] = None,
                      per_op: bool = False) -> Measurement:
        """Latency of any ONNX model (a path, its bytes or a ModelFile) on this device, at this
        precision, through the same cache (its graph hash, input shapes, settings).
        `input_shapes` ({name: shape}) sizes its dynamic axes: one left out is a BadRequest."""
        loaded = model if isinstance(model, ModelFile) else load_model(model)
        shapes = loaded.resolved_shapes(input_shapes)
        return self._measured(loaded.exported(), loaded.signature(shapes), shapes,
                              self.request.with_settings(input_shapes=shapes, per_op=per_op))

    def identify(self) -> DeviceIdentity:
        """Who the device is, asked once a session (its identity is in every cache key); the
        memo is filled with what the cache holds for this space on it."""
        with self._lock:
            if self._identity is None:
                self._identity = self.pool.identify(self.request.timeout_s)
                self.cache.put_device(self._identity.fingerprint,
                                      dict(self._identity.facts.identity))
                log.info("%s is %s", self.device, self._identity.facts.identity.get("cpu_model"))
                self._units = self.cache.units_of_model(self._identity.fingerprint,
                                                        self._identity.model) \
                    if self.device.startswith("kind:") else list(dict.fromkeys(
                        [self._identity.fingerprint, digest(self._identity.model)]))
                if not self.refresh and self.request.settings["stop"] == "fixed":
                    for unit in reversed(self._units):  # the session's own unit wins
                        self._memo.update(values_by_sample(self.cache.statistics_by_sample(
                            self.space_fingerprint, self._input_sig, self.settings_key,
                            unit, self._identity.agent_version, self.statistic),
                            self._validate.labels))
            return self._identity

    def cache_key(self, graph: str) -> MeasurementKey:
        """The cache key a measurement of `graph` on this profiler's device is stored under."""
        return self._key(graph)

    def graph_hash(self, sample: Mapping[str, Any]) -> str:
        """The sample's graph hash (from the sample index, or by exporting it)."""
        canonical = self._validate(sample)
        return self._indexed(canonical) or self._export(canonical).graph_hash

    def close(self) -> None:
        """Stop the agents on the devices and release temporary files."""
        self.pool.close()

    def __enter__(self) -> "LatencyProfiler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the steps

    def _measure_all(self, samples: List[Sample], results: List[Optional[Measurement]],
                     progress: Optional[bool], request: MeasureRequest) -> None:
        """Steps 3-5 over many samples: the cache first, then the pool (harness.steps.batch)."""
        for index, sample in enumerate(samples):
            results[index] = None if self.refresh else self._cached(self._indexed(sample),
                                                                    request=request)
        answer_all(samples, results, what=f"profiling on {self.device}", progress=progress,
                   export=self._export,
                   cached=lambda g: None if self.refresh else self._cached(g, request=request),
                   pool=self.pool, request=request,
                   store=lambda result, exported: self._store(result, exported, self.input_signature))
        self._memo.update((tuple(sample.values()), result.statistic(self.statistic))
                          for sample, result in zip(samples, results) if result is not None)

    def _indexed(self, sample: Sample) -> Optional[str]:
        """Step 3: the sample's graph hash from the sample index (None if never exported)."""
        return self.cache.lookup_sample(self.space_fingerprint, self._input_sig, sample_key(sample))

    def _export(self, sample: Sample) -> ExportedModel:
        """Step 3: freeze, export and hash; the index learns sample -> graph hash (at another
        precision, the model is converted, keyed by the source's hash and the precision)."""
        exported = export_sample(self.space, sample, self.dummy_input, home=self.home)
        self.counters["exports"] += 1  # only the export thread counts exports
        self.cache.put_sample(self.space_fingerprint, self._input_sig, sample_key(sample),
                              exported.graph_hash)
        return self.precision.convert(exported, {f"input{i}": item["shape"]
                                                 for i, item in enumerate(self.input_signature)})

    def _measured(self, exported: ExportedModel, signature: List[Dict[str, Any]],
                  shapes: Mapping[str, List[int]], request: MeasureRequest) -> Measurement:
        """Steps 4-5 for one model: the cache, else the device (at this precision), stored."""
        cached = None if self.refresh else self._cached(exported.graph_hash,
                                                        canonical_json(signature), request)
        exported = exported if cached else self.precision.convert(exported, shapes)
        return cached or self._store(self.pool.measure(exported, request), exported, signature,
                                     request)

    def _cached(self, graph: Optional[str], input_sig: Optional[str] = None,
                request: Optional[MeasureRequest] = None) -> Optional[Measurement]:
        """Step 4: the cached measurement of a graph on this device (in a pool of a kind, on
        any unit of its model), if any."""
        request = request or self.request
        cached = None
        if graph is not None:
            self.identify()
            for unit in self._units:  # one not as precise as asked is measured again
                cached = self.cache.get(self._key(graph, input_sig, unit,
                                                  settings_key=request.settings_key))
                if cached is not None and request.accepts(cached):
                    break
                cached = None
        if cached is not None:
            with self._lock:  # the export thread and the caller's both ask the cache
                self.counters["cache_hits"] += 1
        return cached

    def _store(self, result: AgentResult, exported: ExportedModel,
               signature: List[Dict[str, Any]],
               request: Optional[MeasureRequest] = None) -> Measurement:
        """Step 5's end: stored under the fingerprint of the device that measured."""
        measured = Measurement.from_result(
            result, exported.graph_hash, signature, export_ms=exported.export_ms,
            model_sha256=exported.sha256, model_bytes=len(exported.onnx_bytes),
            isolation=self.pool.isolation)
        device_fp = digest(dict(result.facts.identity))
        if device_fp != self.identify().fingerprint:  # in a pool, devices of a kind may differ
            self.cache.put_device(device_fp, dict(result.facts.identity))
            with self._lock:
                if device_fp not in self._units and self.device.startswith("kind:") and \
                        model_of(result.facts.identity) == self.identify().model:
                    self._units.append(device_fp)
        self.cache.put(self._key(exported.graph_hash, canonical_json(signature), device_fp,
                                 result.agent_version,
                                 (request or self.request).settings_key), measured)
        with self._lock:  # device time spent, and what the fixed loop would have spent
            self.counters.update(measurements=1, device_s=measured.device_s,  # type: ignore[call-overload]
                                 fixed_loop_s=measured.fixed_loop_device_s)
        return measured

    def _key(self, graph: str, input_sig: Optional[str] = None, device_fp: Optional[str] = None,
             agent_version: Optional[str] = None,
             settings_key: Optional[str] = None) -> MeasurementKey:
        """The cache key of a graph; the device is the session's unless `device_fp` says."""
        identity = self.identify()
        return MeasurementKey(graph, input_sig or self._input_sig,
                              settings_key or self.settings_key,
                              device_fp or identity.fingerprint,
                              agent_version or identity.agent_version)


