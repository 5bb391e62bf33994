"""Profilers: a metric for any sample of a model space, `profile(sample) -> float`.

`LatencyProfiler` puts a real device in the loop. One `profile(sample)` call, top to bottom:

1. validate the sample against the space (InvalidSample names the label and the choices);
2. answer from memory if this profiler has seen the sample;
3. find the sample's graph hash in the cache's sample index, or freeze, export and hash it;
4. look the measurement up by (graph hash, input shapes, runtime settings, device
   fingerprint, agent version): a hit answers without touching the device;
5. otherwise lease the device (in a pool, a free one; on failure, the next), put the model
   there and let the agent time it; the Measurement is stored and its statistic (median by
   default, in ms) returned.

A failure raises a typed error and stores nothing. `measure_many` runs the same steps over
many samples, exporting ahead and measuring on every device of a pool in parallel.
"""
import json
import logging
import os
import queue
import tempfile
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from agents.ort_agent import AgentError, parse_settings
from devices.agent_client import AgentClient
from devices.errors import (AgentProtocolError, BadRequest, DeviceLost,
                            MeasurementTimeout, ThermalError)
from devices.registry import devices_of_kind, open_client
from harness.cache import Cache, MeasurementKey, canonical_json, digest
from harness.export import (OPSET, DummyInput, ExportedModel, export_module, export_sample,
                            input_signature)
from harness.farm import DeviceHealth, DeviceLease, lease_any
from harness.measurement import STATISTICS, Measurement
from harness.paths import default_cache_path, harness_home
from harness.space import (ModelSpace, Sample, SampleValidator, checked_search_space,
                           sample_key, space_fingerprint)

log = logging.getLogger("harness")

# Failures that say the device (not the model) is in trouble: strike it and fail over.
FAILOVER_ERRORS = (DeviceLost, MeasurementTimeout, ThermalError, AgentProtocolError)

# Settings that change what is measured (part of the cache key). The timing-loop settings
# (warm-up, run counts and times, input seed) change only how precisely, and are recorded in
# each Measurement instead.
RUNTIME_SETTINGS = ("intra_op_threads", "inter_op_threads", "graph_optimization_level",
                    "execution_mode", "provider", "input_shapes", "cpu_affinity")


FALLBACKS = ("error", "nn-meter")


class Profiler(ABC):
    """Computes a metric for samples of one model space: the interface a search filters on."""

    @abstractmethod
    def profile(self, sample: Mapping[str, Any]) -> float:
        """The metric of one sample."""


def resolve_settings(overrides: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """The agent's defaults with `overrides` applied, checked as the agent would check them."""
    try:
        return parse_settings(dict(overrides or {}))
    except AgentError as exc:
        raise BadRequest(exc.message) from None


class LatencyProfiler(Profiler):
    """Latency in milliseconds of samples of `space` on a real device.

    device: "local" (this machine), a registered device name, or "kind:K" for a pool of every
        registered device of kind K (jobs go to whichever is free, and fail over).
    statistic: which statistic `profile()` returns: median (default), mean, p90, p99, min, max.
    settings: agent settings (threads, optimisation level, warm-up, min_runs, min_time_ms,
        max_time_ms, ...); see agents.ort_agent.DEFAULT_SETTINGS.
    cache: a Cache, a path, or None for $HARNESS_HOME/cache.sqlite.
    isolation: "worker" keeps one agent process per device session; "process" starts a fresh
        one per measurement (crash isolation at ~150 ms more per measurement).
    timeout_s: how long one measurement may take, counted from when the device is leased.
    refresh: measure again even when the cache has a result (the old one is kept).
    max_strikes, quarantine_s: a device of a pool that fails max_strikes times in a row is
        left alone for quarantine_s seconds (its jobs fail over to the others), then retried.
    farm: the address of a Ray farm (see harness.ray_farm); with device="kind:K", every device
        of kind K on every host of the farm measures, results land in this cache.
    fallback: what to do when the device cannot be reached (DeviceLost): "error" raises,
        "nn-meter" answers with an nn-Meter prediction instead: corrected by the device's
        calibration (`harness calibrate`) if there is one, else `predictor` raw. Predicted
        results have source "predicted", name predictor and calibration, and are never
        stored in the cache.
    predictor: the nn-Meter predictor (official name, or folder) for an uncalibrated device.
    offline: never contact the device; answer from the cache (under the device identity its
        calibration recorded) or by prediction. Needs fallback="nn-meter".
    """

    def __init__(self, space: ModelSpace, dummy_input: DummyInput, device: str = "local",
                 statistic: str = "median", *, settings: Optional[Mapping[str, Any]] = None,
                 cache: Union[Cache, str, Path, None] = None, isolation: str = "worker",
                 timeout_s: float = 300.0, refresh: bool = False,
                 home: Union[str, Path, None] = None, max_strikes: int = 3,
                 quarantine_s: float = 60.0, farm: Optional[str] = None,
                 fallback: str = "error", predictor: Union[str, Path, None] = None,
                 offline: bool = False):
        if statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
        if offline and fallback != "nn-meter":
            raise BadRequest("an offline profiler can only predict",
                             fix="pass fallback='nn-meter' (and calibrate the device first)")
        self.fallback = fallback
        self.offline = offline
        self._fallback_predictor = predictor
        self._predictor: Optional[Any] = None  # the NnMeterProfiler, made on first need
        self._predictions: Dict[tuple, Measurement] = {}
        self._unreachable_until = 0.0  # predict without retrying the device until then
        self._retry_s = float(quarantine_s)
        self.space = space
        self.device = device
        self.statistic = statistic
        self.isolation = isolation
        self.timeout_s = float(timeout_s)
        self.refresh = refresh
        self.home = harness_home(home)
        self.settings = resolve_settings(settings)
        self._runtime_settings = {"runtime": "onnxruntime",
                                  **{k: self.settings[k] for k in RUNTIME_SETTINGS}}
        self._settings_key = digest(self._runtime_settings)
        self._validate = SampleValidator(checked_search_space(space))
        self._dummy_input = dummy_input
        self.input_signature = input_signature(dummy_input)
        self._input_sig = canonical_json(self.input_signature)
        self._space_fp = space_fingerprint(space, {"inputs": self.input_signature,
                                                   "opset": OPSET, "torch": torch.__version__})
        if isinstance(cache, Cache):
            self.cache = cache
        else:
            self.cache = Cache(cache if cache is not None else default_cache_path(self.home))
        self.counters: Counter = Counter()  # exports, measurements, cache_hits
        self._memo: Dict[tuple, float] = {}  # sample values in label order -> statistic
        self._clients: Dict[str, AgentClient] = {}
        self._farm = None
        if farm is not None:  # a multi-host farm on Ray: one slot per device it offers
            if not device.startswith("kind:"):
                raise BadRequest(f"a farm profiles kinds of devices, not {device!r}",
                                 fix="pass device='kind:K' with farm=...")
            from harness.ray_farm import RayFarmClient
            self._farm = RayFarmClient(farm, device[len("kind:"):], self.timeout_s, isolation)
            self.devices = [f"{device}#{slot}" for slot in range(self._farm.slots())]
        else:  # a name, or "kind:K" for every registered device of kind K (a pool)
            self.devices = (devices_of_kind(self.home, device[len("kind:"):])
                            if device.startswith("kind:") else [device])
        self.health = DeviceHealth(self.devices, max_strikes=max_strikes,
                                   quarantine_s=quarantine_s)
        self._lock = threading.RLock()  # pool threads share counters, memo and clients
        self._device_identity: Optional[Dict[str, Any]] = None
        self._device_fp: Optional[str] = None
        self._last_export_ms: Optional[float] = None
        self._staging = tempfile.TemporaryDirectory(prefix="harness-models-")
        self._finalizer = weakref.finalize(self, self._staging.cleanup)

    # ------------------------------------------------------------ the public calls

    def profile(self, sample: Mapping[str, Any]) -> float:
        """The chosen statistic (ms) of the sample's latency on the device."""
        memo_key = self._validate.values(sample)
        value = self._memo.get(memo_key)
        if value is not None:
            return value
        if self._predicting():
            return self.measure(sample).statistic(self.statistic)
        try:
            return self._profile_on_device(memo_key)
        except DeviceLost as exc:
            return self._fall_back(dict(zip(self._validate.labels, memo_key)),
                                   exc).statistic(self.statistic)

    def _profile_on_device(self, memo_key: tuple) -> float:
        if not self.refresh:
            if self._device_fp is None:
                self._learn_device()  # also loads every cached result of this space
                value = self._memo.get(memo_key)
                if value is not None:
                    self.counters["cache_hits"] += 1
                    return value
            # Measured by another process since this one loaded the cache?
            key = sample_key(dict(zip(self._validate.labels, memo_key)))
            value = self._cached_statistics(key).get(key)
            if value is not None:
                self.counters["cache_hits"] += 1
                self._memo[memo_key] = value
                return value
        return self._measure(dict(zip(self._validate.labels, memo_key))).statistic(self.statistic)

    def measure(self, sample: Mapping[str, Any]) -> Measurement:
        """The full Measurement (raw samples, statistics, provenance, source)."""
        canonical = self._validate(sample)
        if self._predicting():
            return self._fall_back(canonical, None)
        try:
            return self._measure(canonical)
        except DeviceLost as exc:
            return self._fall_back(canonical, exc)

    def profile_many(self, samples: Iterable[Mapping[str, Any]],
                     progress: Optional[bool] = None) -> List[float]:
        """profile() over many samples, in input order; an architecture is measured once."""
        return [m.statistic(self.statistic) for m in self.measure_many(samples, progress)]

    def measure_many(self, samples: Iterable[Mapping[str, Any]],
                     progress: Optional[bool] = None) -> List[Measurement]:
        """measure() over many samples, results in input order, with a progress bar (and ETA)
        on a terminal. Cached samples are answered first; the rest are exported in a
        background thread while the devices measure (on `local` the host is the device, so
        there export and measurement take turns), every device of a pool works in parallel,
        and samples of one architecture are measured once. Everything measured is stored as
        it completes, so a sweep cut short resumes from the cache. The first failure is
        raised once the other jobs have finished; with fallback="nn-meter", samples left
        unmeasured because the devices were lost are predicted."""
        samples = [self._validate(sample) for sample in samples]
        if self._predicting():
            return [self._fall_back(sample, None) for sample in samples]
        results: List[Optional[Measurement]] = [None] * len(samples)
        try:
            self._measure_all(samples, results, progress)
        except DeviceLost as exc:
            for index, sample in enumerate(samples):
                if results[index] is None:
                    results[index] = self._fall_back(sample, exc)
        return results  # type: ignore[return-value]

    def _measure_all(self, samples: List[Sample], results: List[Optional[Measurement]],
                     progress: Optional[bool]) -> None:
        from tqdm import tqdm

        pending = []
        for index, sample in enumerate(samples):
            cached = None if self.refresh else self._cached_measurement(sample)
            if cached is not None:
                results[index] = cached
            else:
                pending.append(index)
        with tqdm(total=len(samples), initial=len(samples) - len(pending), unit="subnet",
                  desc=f"profiling on {self.device}", disable=(not progress) if progress
                  is not None else None, leave=False) as bar:
            if pending and self.devices == ["local"]:
                for index in pending:
                    results[index] = self._measure(samples[index])
                    bar.update()
            elif pending:
                self._run_pool(samples, pending, results, bar)

    def _cached_measurement(self, sample: Sample) -> Optional[Measurement]:
        graph = self.cache.lookup_sample(self._space_fp, self._input_sig, sample_key(sample))
        cached = self.cache.get(self._key(graph)) if graph is not None else None
        if cached is not None:
            with self._lock:
                self.counters["cache_hits"] += 1
                self._memo[tuple(sample.values())] = cached.statistic(self.statistic)
        return cached

    def _run_pool(self, samples: List[Sample], pending: List[int],
                  results: List[Optional[Measurement]], bar: Any) -> None:
        """Export in one thread, measure in one thread per device; see measure_many."""
        self._key("")  # learn the device before the threads start
        jobs: "queue.Queue[Tuple[int, ExportedModel, List[str]]]" = queue.Queue(
            maxsize=2 * len(self.devices))
        twins: Dict[str, List[int]] = {}   # graph hash -> indices waiting for its result
        errors: Dict[int, Exception] = {}
        state = {"outstanding": 0, "exported_all": False}
        done = threading.Condition(self._lock)

        finished: Dict[str, Tuple[Optional[Measurement], Optional[Exception]]] = {}

        def finish(indices: List[int], measurement: Optional[Measurement],
                   error: Optional[Exception], graph: Optional[str] = None) -> None:
            with done:
                if graph is not None:
                    finished[graph] = (measurement, error)
                for position, index in enumerate(indices):
                    if error is not None:
                        errors[index] = error
                    else:
                        results[index] = measurement if position == 0 else \
                            measurement.with_source("cached")
                        self._memo[tuple(samples[index].values())] = \
                            measurement.statistic(self.statistic)
                state["outstanding"] -= 1
                bar.update(len(indices))
                done.notify_all()

        def export_all() -> None:
            for index in pending:
                try:
                    exported = self._export(samples[index])
                except Exception as exc:  # a broken subnet fails alone
                    with done:
                        state["outstanding"] += 1
                    finish([index], None, exc)
                    continue
                with done:
                    if exported.graph_hash in finished:  # its twin is measured already
                        measurement, error = finished[exported.graph_hash]
                        state["outstanding"] += 1
                        finish([index], measurement and measurement.with_source("cached"), error)
                        continue
                    if exported.graph_hash in twins:
                        twins[exported.graph_hash].append(index)
                        continue
                    twins[exported.graph_hash] = [index]
                    state["outstanding"] += 1
                jobs.put((index, exported, []))
            with done:
                state["exported_all"] = True
                done.notify_all()

        def work(device: str) -> None:
            while True:
                with done:
                    if state["exported_all"] and state["outstanding"] == 0:
                        return
                if device not in self.health.available():
                    if not self.health.available():  # the whole pool is down: fail what is left
                        try:
                            index, exported, _ = jobs.get(timeout=0.2)
                        except queue.Empty:
                            continue
                        finish(twins[exported.graph_hash], None, DeviceLost(
                            f"every device of {self.device} is quarantined"),
                            exported.graph_hash)
                    else:
                        time.sleep(0.2)
                    continue
                try:
                    index, exported, tried = jobs.get(timeout=0.2)
                except queue.Empty:
                    continue
                if device in tried:  # failed here already: leave it to another device
                    jobs.put((index, exported, tried))
                    time.sleep(0.2)
                    continue
                try:
                    measurement = self._measure_on_device(exported, self.input_signature, device)
                    self._store(measurement, self._input_sig)
                except FAILOVER_ERRORS as exc:
                    tried = tried + [device]
                    if len(set(tried)) < len(self.devices):
                        log.warning("%s failed (%s); the job goes to another device", device,
                                    exc.message)
                        jobs.put((index, exported, tried))
                        continue
                    finish(twins[exported.graph_hash], None, exc, exported.graph_hash)
                    continue
                except Exception as exc:  # the model's fault: no other device will do better
                    finish(twins[exported.graph_hash], None, exc, exported.graph_hash)
                    continue
                finish(twins[exported.graph_hash], measurement, None, exported.graph_hash)

        threads = [threading.Thread(target=export_all, name="harness-export", daemon=True)]
        threads += [threading.Thread(target=work, args=(d,), name=f"harness-{d}", daemon=True)
                    for d in self.devices]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[min(errors)]

    def measure_module(self, module: torch.nn.Module, dummy_input: DummyInput) -> Measurement:
        """Latency of any module (a block of a lookup table, say) on this profiler's device,
        through the same cache, keyed by its own graph hash and input shapes."""
        started = time.perf_counter()
        exported = export_module(module.eval(), dummy_input)
        self._last_export_ms = (time.perf_counter() - started) * 1e3
        input_sig = canonical_json(input_signature(dummy_input))
        key = self._key(exported.graph_hash, input_sig)
        if not self.refresh:
            cached = self.cache.get(key)
            if cached is not None:
                self.counters["cache_hits"] += 1
                return cached
        measurement = self._measure_on_device(exported, input_signature(dummy_input))
        self._store(measurement, input_sig)
        return measurement

    @property
    def space_fingerprint(self) -> str:
        """The fingerprint of the space, its input and the exporter: the sample index's key."""
        return self._space_fp

    def cache_key(self, graph: str) -> MeasurementKey:
        """The cache key a measurement of `graph` on this profiler's device is stored under
        (asks the device who it is, once)."""
        return self._key(graph)

    def graph_hash(self, sample: Mapping[str, Any]) -> str:
        """The sample's graph hash (from the sample index, or by exporting it)."""
        canonical = self._validate(sample)
        graph = self.cache.lookup_sample(self._space_fp, self._input_sig, sample_key(canonical))
        return graph if graph is not None else self._export(canonical).graph_hash

    def close(self) -> None:
        """Stop the agent on the device and release temporary files."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        self._finalizer()

    def __enter__(self) -> "LatencyProfiler":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ the nn-Meter fallback

    def _predicting(self) -> bool:
        """Answer by prediction without trying the device: offline, or the device was lost
        less than quarantine_s ago (a search then does not wait on a dead device per sample)."""
        return self.offline or time.monotonic() < self._unreachable_until

    def _fall_back(self, sample: Sample, cause: Optional[DeviceLost]) -> Measurement:
        """The answer when the device cannot be reached: raise (fallback "error"), or a cached
        measurement under the identity the device's calibration recorded, or a prediction."""
        if cause is not None:
            if self.fallback != "nn-meter":
                raise cause
            if not self._unreachable_until:
                log.warning("%s is unreachable (%s); answering with nn-Meter predictions, "
                            "retrying the device every %.0f s", self.device, cause.message,
                            self._retry_s)
            self._unreachable_until = time.monotonic() + self._retry_s
        memo_key = tuple(sample.values())
        if memo_key in self._predictions:
            return self._predictions[memo_key]
        predictor = self._nn_meter(cause)
        calibration = predictor.calibration
        graph = self.cache.lookup_sample(self._space_fp, self._input_sig, sample_key(sample))
        exported = None
        if graph is None:
            exported = self._export(sample)
            graph = exported.graph_hash
        if calibration is not None and not self.refresh and \
                calibration.settings_key == self._settings_key:
            cached = self.cache.get(MeasurementKey(graph, self._input_sig, self._settings_key,
                                                   calibration.device_fingerprint,
                                                   calibration.agent_version))
            if cached is not None:
                self.counters["cache_hits"] += 1
                return cached
        predicted = predictor.predict_exported(exported or self._export(sample))
        self.counters["predictions"] += 1
        self._predictions[memo_key] = predicted
        return predicted

    def _nn_meter(self, cause: Optional[DeviceLost]) -> Any:
        """The NnMeterProfiler of the fallback: calibrated for the device if it was."""
        if self._predictor is None:
            from harness.calibrate import load_calibration
            from harness.predict import NnMeterProfiler, PredictorError

            calibration = next((found for found in (load_calibration(name, self.home)
                                                    for name in self.devices) if found), None)
            if calibration is not None and calibration.space_fingerprint != self._space_fp:
                log.warning("the nn-Meter calibration of %s was fitted on another space or "
                            "input (%s); its correction may not carry over", calibration.device,
                            calibration.space or "unnamed")
            if calibration is None and self._fallback_predictor is None:
                why = "is unreachable" if cause is not None else "is offline"
                raise PredictorError(
                    f"{self.device} {why}, and there is no nn-Meter calibration for it or "
                    "predictor to fall back on",
                    fix=f"run 'harness calibrate --device {self.devices[0]} --space ...' while "
                        "it is reachable, or pass predictor=NAME_OR_FOLDER") from cause
            self._predictor = NnMeterProfiler(
                self.space, self._dummy_input,
                predictor=None if calibration is not None else self._fallback_predictor,
                calibration=calibration, device=self.device)
        return self._predictor

    # ------------------------------------------------------------ the steps

    def _measure(self, sample: Sample) -> Measurement:
        cached = None if self.refresh else self._cached_measurement(sample)
        if cached is not None:
            return cached
        exported = self._export(sample)  # also puts sample -> graph hash in the index
        if not self.refresh:  # the same architecture, measured under other labels?
            cached = self._cached_measurement(sample)
            if cached is not None:
                return cached
        measurement = self._measure_on_device(exported, self.input_signature)
        self._store(measurement, self._input_sig)
        self._memo[tuple(sample.values())] = measurement.statistic(self.statistic)
        return measurement

    def _store(self, measurement: Measurement, input_sig: str) -> None:
        """Store under the fingerprint of the device that measured."""
        identity = measurement.device_fingerprint
        device_fp = digest(identity)
        if device_fp != self._device_fp:
            self.cache.put_device(device_fp, identity)
            if len(self.devices) == 1:  # the device changed under us (say, a new runtime)
                log.warning("%s: device fingerprint changed during the session", self.device)
                self._device_identity, self._device_fp = identity, device_fp
        self.cache.put(self._key(measurement.graph_hash, input_sig, device_fp), measurement)

    def _export(self, sample: Sample) -> ExportedModel:
        started = time.perf_counter()
        exported = export_sample(self.space, sample, self._dummy_input)
        self._last_export_ms = (time.perf_counter() - started) * 1e3
        self.counters["exports"] += 1
        self.cache.put_sample(self._space_fp, self._input_sig, sample_key(sample),
                              exported.graph_hash)
        return exported

    def _key(self, graph: str, input_sig: Optional[str] = None,
             device_fp: Optional[str] = None) -> MeasurementKey:
        """The cache key of a graph; the device is the session's unless `device_fp` says."""
        if self._device_fp is None:
            self._learn_device()
        return MeasurementKey(graph, input_sig or self._input_sig, self._settings_key,
                              device_fp or self._device_fp, self._agent().agent_version)

    def _agent(self, device: Optional[str] = None) -> AgentClient:
        if self._farm is not None:
            return self._farm
        name = device or self.devices[0]
        with self._lock:
            if name not in self._clients:
                self._clients[name] = open_client(name, self.home, self.isolation)
            return self._clients[name]

    def _learn_device(self) -> None:
        """Ask the device who it is (once per session): its identity is in every cache key.
        In a pool, the first device that answers speaks for the kind."""
        answer, errors = None, []
        for name in self.health.available() or self.devices:
            try:
                with DeviceLease(self.home, name) as lease:
                    answer = self._agent(name).fingerprint(
                        deadline=lease.acquired_at + self.timeout_s)
                break
            except FAILOVER_ERRORS as exc:
                self.health.strike(name, exc)
                errors.append(exc)
                if len(self.devices) == 1:
                    raise
        if answer is None:
            raise errors[-1]
        self._device_identity = answer["identity"]
        self._device_fp = digest(self._device_identity)
        self.cache.put_device(self._device_fp, self._device_identity)
        log.info("%s: %s, onnxruntime %s", self.device, self._device_identity.get("cpu_model"),
                 self._device_identity.get("onnxruntime"))
        if not self.refresh:
            for text, value in self._cached_statistics().items():
                sample = json.loads(text)
                self._memo[tuple(sample[label] for label in self._validate.labels)] = value

    def _cached_statistics(self, sample: Optional[str] = None) -> Dict[str, float]:
        return self.cache.statistics_by_sample(
            self._space_fp, self._input_sig, self._settings_key, self._device_fp,
            self._agent().agent_version, self.statistic, sample=sample)

    def _lease(self, device: Optional[str], tried: List[str]) -> Tuple[str, DeviceLease]:
        """A leased device: `device` itself, or a free one of the pool not yet tried (waiting
        for the first if all are busy)."""
        candidates = [device] if device is not None else [
            d for d in self.health.available() if d not in tried]
        if not candidates:
            raise DeviceLost(f"no device of {self.device} is available: "
                             f"{', '.join(tried) or 'all'} failed or quarantined",
                             fix="check the devices ('harness devices check NAME')")
        lease = lease_any(self.home, candidates)
        return lease.device, lease

    def _measure_on_device(self, exported: ExportedModel, signature: List[Dict[str, Any]],
                           device: Optional[str] = None) -> Measurement:
        """Measure on `device`, or on whichever device of the pool is free, failing over to
        the others when one is lost, times out, is too hot or answers garbage."""
        path = Path(self._staging.name) / f"{exported.sha256}.{threading.get_ident()}.onnx"
        path.write_bytes(exported.onnx_bytes)
        tried: List[str] = []
        try:
            while True:
                name, lease = self._lease(device, tried)
                try:
                    leased_at = time.time()
                    result = self._agent(name).measure(str(path), self.settings,
                                                       deadline=lease.acquired_at + self.timeout_s,
                                                       sha256=exported.sha256)
                    released_at = time.time()
                    self.health.ok(name)
                    break
                except FAILOVER_ERRORS as exc:
                    self.health.strike(name, exc)
                    tried.append(name)
                    if device is not None or len(tried) >= len(self.devices):
                        raise
                    log.warning("%s failed (%s); failing over", name, exc.message)
                finally:
                    lease.__exit__(None, None, None)
        finally:
            path.unlink(missing_ok=True)
        with self._lock:
            self.counters["measurements"] += 1
        fingerprint = result["fingerprint"]
        provenance = {
            "capped": result.get("capped", False),
            "loop_ms": result["loop_ms"],
            "wall_ms": (released_at - leased_at) * 1e3,
            "lease": [leased_at, released_at],
            "warmup_runs": result.get("warmup_runs"),
            "warmup_ms": result.get("warmup_ms"),
            "runtime": result["runtime"],
            "controlled": result.get("controlled", {}),
            "inputs": result.get("inputs", []),
            "thermal_before": result.get("thermal_before", []),
            "thermal_after": result.get("thermal_after", []),
            "device_state": fingerprint.get("state", {}),
            "device_control": result.get("device_control"),
            "extra_flags": (result.get("device_control") or {}).get("flags", []),
            "export_ms": self._last_export_ms,
            "model_sha256": exported.sha256,
            "model_bytes": len(exported.onnx_bytes),
            "isolation": self.isolation,
            "host_pid": os.getpid(),
            "farm_host": result.get("host"),
        }
        return Measurement(samples_ms=tuple(result["samples_ms"]), source="measured",
                           device=result.get("device") or name, graph_hash=exported.graph_hash,
                           load_ms=result["load_ms"], first_run_ms=result["first_run_ms"],
                           input_signature=tuple(signature),
                           settings=result["settings"],
                           device_fingerprint=fingerprint["identity"],
                           agent_version=result["agent_version"], provenance=provenance)
