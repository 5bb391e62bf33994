"""How a profiler decides limits: cache first, then the device's latency model, then the
device with the agent's "limit" stop rule (see harness.store.decisions for the guarantee).

`LimitDecider` lives as long as its profiler: it keeps the device's latency model, refits it
as measurements accumulate, and audits it (a share of the candidates the model would skip is
measured anyway; coverage and agreement are reported). A `DecisionRound` holds the steps of
one decide_many call, which the profiler runs through the same pipeline as a measurement.
"""
import random
from dataclasses import replace
from typing import Callable, Dict, List, Optional, Sequence

from devices.agent_result import AgentResult
from harness.export.graph import DummyInput, ExportedModel
from harness.pool.device_pool import MeasureRequest
from harness.predict.latency_model import (MIN_MEASUREMENTS, LatencyModel, ModelAudit,
                                           Prediction, featurizer, training_data)
from harness.spaces.space import ModelSpace, Sample, SampleValidator, checked_search_space
from harness.steps.counters import Counters
from harness.steps.export_step import SampleExport
from harness.steps.key_scope import KeyScope
from harness.store.cache import Cache
from harness.store.decisions import Decision, decision_from_samples
from harness.store.measurement import Measurement, Provenance, fixed_loop_estimate_s


class LimitDecider:
    """The decisions of one profiler: the device's latency model and its audit live here
    across calls, and `start` opens one round (a limit and a confidence) whose steps the
    profiler runs as it runs a measurement (see LatencyProfiler.decide_many).

    It is given what it uses: the space and its inputs (the model's features), the cache,
    the key scope (`scope()` identifies the device on first use; `base_scope` holds the
    parts known before), the export step, the profiler's request and counters, and the
    names of the devices (to find the identity they last measured with, offline)."""

    def __init__(self, space: ModelSpace, dummy_input: DummyInput, *, cache: Cache,
                 scope: Callable[[], KeyScope], base_scope: KeyScope, export: SampleExport,
                 request: MeasureRequest, counters: Counters, device: str, devices: List[str],
                 use_model: bool = True, model_coverage: float = 0.98,
                 audit_share: float = 0.05, seed: int = 0):
        self.space, self.dummy_input, self.cache = space, dummy_input, cache
        self.scope, self.base_scope, self.export = scope, base_scope, export
        self.request, self.counters = request, counters
        self.device, self.devices = device, devices
        self.use_model = use_model
        self.model_coverage = model_coverage
        self.audit_share = audit_share
        self.audit = ModelAudit()
        self.model: Optional[LatencyModel] = None
        self.model_note = "not fitted yet"
        self.labels = SampleValidator(checked_search_space(space)).labels
        self._rng = random.Random(seed)

    def refit(self, offline: bool = False) -> None:
        """Fit the device's model on every median the cache holds for this space on it
        (measurements, and decisions' medians). `offline`: without asking the device who it
        is (it cannot be reached): under the identity it last measured with."""
        if offline:
            found = self.cache.last_identity(self.devices)
            if found is None:
                self.model, self.model_note = None, "no measurement of this device"
                return
            device_fp, agent_version = found
        else:
            scope = self.scope()
            device_fp, agent_version = scope.device_fp, scope.agent_version
        base = self.base_scope
        keys = (base.space_fingerprint, base.input_sig, base.settings_key, device_fp,
                agent_version)
        medians = dict(self.cache.decided_medians_by_sample(*keys))
        medians.update(self.cache.statistics_by_sample(*keys, "median"))
        samples, values = training_data(medians, self.labels)
        model = LatencyModel(featurizer(self.space, self.dummy_input, self.labels))
        if model.fit(samples, values):
            self.model = model
            self.model_note = f"fitted on {model.n_fit} measured subnets"
        else:
            self.model = None
            self.model_note = (f"not fitted: {len(samples)} measured subnets, it needs "
                               f"{MIN_MEASUREMENTS}; the device answers meanwhile")

    def predicted_measurement(self, sample: Sample, coverage: float = 0.9
                              ) -> Optional[Measurement]:
        """The model's prediction as a Measurement (source "predicted", its interval at
        `coverage` in the provenance), or None when the model cannot answer."""
        if self.model is None:
            self.refit(offline=True)
        if self.model is None:
            return None
        prediction = self.model.predict(sample, coverage)
        point = self.model.predict_point(sample)
        interval = None if prediction is None else [prediction.low_ms, prediction.high_ms]
        return Measurement(samples_ms=(point,), source="predicted", device=self.device,
                           graph_hash="", input_signature=tuple(self.export.signature),
                           settings={"runtime": "latency model"},
                           provenance=Provenance(
                               predictor={"name": "device latency model",
                                          "interval_ms": interval, "coverage": coverage},
                               calibration={"device": self.device, "kind": "latency model",
                                            "note": self.model_note}))

    def learn(self) -> None:
        """Refit on what the device has measured since, when the model is in use."""
        if self.use_model:
            self.refit()

    def audits_skip(self) -> bool:
        """Count a skip the model would make; True when this one is measured anyway, for
        the audit (a share `audit_share` of them, drawn from a seeded generator)."""
        self.audit.skipped += 1
        return self._rng.random() < self.audit_share

    def start(self, limit_ms: float, confidence: float) -> "DecisionRound":
        if self.use_model and self.model is None:
            self.refit()
        return DecisionRound(self, limit_ms, confidence)


class DecisionRound:
    """One decide_many call's steps: `known` (cache, then model, before export), then the
    steps of a batch (harness.steps.batch.Answering): `export`, `cached` (by graph) and
    `store` (the device's runs under `request`), and `finish` (the audit)."""

    def __init__(self, decider: LimitDecider, limit_ms: float, confidence: float):
        self.decider, self.limit_ms, self.confidence = decider, limit_ms, confidence
        # the limit rule stops a loop as soon as the interval of the median settles the
        # limit: decisions time one model at a time, whatever the profiler's protocol
        self.request = decider.request.with_settings(stop="limit", limit_ms=limit_ms,
                                                     confidence=confidence, protocol="loop")
        self.export = decider.export
        self.audited: Dict[int, Prediction] = {}  # sample position -> the skipped prediction

    def known(self, position: int, sample: Sample, graph: Optional[str]) -> Optional[Decision]:
        """What answers without the device: the cache, or a clear prediction of the model
        (a share of those is measured anyway, for the audit)."""
        cached = self.cached(graph) if graph is not None else None
        if cached is not None or not self.decider.use_model or self.decider.model is None:
            return cached
        prediction = self.decider.model.predict(sample, self.decider.model_coverage)
        if prediction is None or prediction.low_ms <= self.limit_ms <= prediction.high_ms:
            return None
        if self.decider.audits_skip():
            self.audited[position] = prediction
            return None
        return Decision(below=prediction.high_ms < self.limit_ms, settled=True,
                        limit_ms=self.limit_ms, confidence=prediction.coverage,
                        interval_ms=(prediction.low_ms, prediction.high_ms),
                        median_ms=prediction.median_ms, runs=0, source="predicted",
                        device_s=0.0, graph_hash=graph or "", device=self.decider.device,
                        reason=f"model: {self.decider.model_note}")

    def cached(self, graph: str) -> Optional[Decision]:
        """A stored decision that settles this limit, or a stored measurement read against it
        (a full measurement answers even within the noise of the limit)."""
        cache = self.decider.cache
        key = self.decider.scope().key(graph)
        for stored in cache.decisions(key):
            if stored.settles(self.limit_ms, self.confidence):
                return stored.for_limit(self.limit_ms, self.confidence)
        measured = cache.get(key)
        if measured is None:
            return None
        return decision_from_samples(measured.samples_ms, self.limit_ms, self.confidence,
                                     source="cached", device_s=0.0, graph_hash=graph,
                                     device=measured.device, reason="a stored measurement")

    def store(self, result: AgentResult, exported: ExportedModel) -> Decision:
        """The device's runs as a decision, stored with them as evidence (never as a
        measurement)."""
        lease = result.lease or (0.0, 0.0)
        looks = result.stop.get("looks")
        decision = decision_from_samples(
            result.samples_ms, self.limit_ms, self.confidence, source="measured",
            device_s=lease[1] - lease[0], graph_hash=exported.graph_hash, device=result.device,
            reason="", looks=looks if isinstance(looks, int) else 1)
        decision = replace(decision, reason="the interval of the median excludes the limit"
                           if decision.settled else "the median sits within the noise of the "
                           "limit: measured to full precision" if result.stop.get("reason") ==
                           "precise" else f"stopped by {result.stop.get('reason')} unsettled")
        if result.stop.get("drift"):
            decision = replace(decision, reason=decision.reason + "; the runs drift")
        # stored under the device that measured, as measurements are
        key = self.decider.scope().key_of(result, exported.graph_hash)
        self.decider.cache.put_decision(key, decision, result.samples_ms)
        self.decider.counters.add(decisions=1, device_s=decision.device_s,
                                  fixed_loop_s=fixed_loop_estimate_s(
                                      decision.median_ms, decision.device_s, result.loop_ms))
        return decision

    def finish(self, results: Sequence[Decision]) -> List[Decision]:
        """Record the audit of the model's skips that were measured anyway; the results."""
        for position, prediction in self.audited.items():
            measured = results[position]
            self.decider.audit.record(prediction, measured.median_ms,
                                      agreed=measured.below == (prediction.high_ms < self.limit_ms))
        return list(results)
