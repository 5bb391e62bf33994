"""How a profiler decides limits: cache first, then the device's latency model, then the
device with the agent's "limit" stop rule (see harness.store.decisions for the guarantee).

`LimitDecider` lives as long as its profiler: it keeps the device's latency model, refits it
as measurements accumulate, and audits it (a share of the candidates the model would skip is
measured anyway; coverage and agreement are reported). A `DecisionRound` holds the steps of
one decide_many call, which the profiler runs through the same pipeline as a measurement.
"""
import random
from dataclasses import replace
from typing import Any, Dict, List, Optional, Sequence

from devices.agent_result import AgentResult
from harness.store.key import MeasurementKey, canonical_json, digest
from harness.store.decisions import Decision, decision_from_samples
from harness.export.graph import ExportedModel
from harness.store.measurement import Measurement, Provenance, fixed_loop_estimate_s
from harness.predict.latency_model import (MIN_MEASUREMENTS, LatencyModel, ModelAudit, Prediction,
                                   featurizer, training_data)
from harness.spaces.space import Sample, SampleValidator, checked_search_space


class LimitDecider:
    """The decisions of one profiler: the device's latency model and its audit live here
    across calls, and `start` opens one round (a limit and a confidence) whose steps the
    profiler runs as it runs a measurement (see LatencyProfiler.decide_many)."""

    def __init__(self, profiler: Any, use_model: bool = True, model_coverage: float = 0.98,
                 audit_share: float = 0.05, seed: int = 0):
        self.profiler = profiler
        self.use_model = use_model
        self.model_coverage = model_coverage
        self.audit_share = audit_share
        self.audit = ModelAudit()
        self.model: Optional[LatencyModel] = None
        self.model_note = "not fitted yet"
        self.labels = SampleValidator(checked_search_space(profiler.space)).labels
        self._rng = random.Random(seed)

    def refit(self, offline: bool = False) -> None:
        """Fit the device's model on every median the cache holds for this space on it
        (measurements, and decisions' medians). `offline`: without asking the device who it
        is (it cannot be reached): under the identity it last measured with."""
        p = self.profiler
        if offline:
            found = p.cache.last_identity(getattr(p.pool, "devices", [p.device]))
            if found is None:
                self.model, self.model_note = None, "no measurement of this device"
                return
            device_fp, agent_version = found
        else:
            identity = p.identify()
            device_fp, agent_version = identity.fingerprint, identity.agent_version
        keys = (p.space_fingerprint, canonical_json(p.input_signature), p.settings_key,
                device_fp, agent_version)
        medians = dict(p.cache.decided_medians_by_sample(*keys))
        medians.update(p.cache.statistics_by_sample(*keys, "median"))
        samples, values = training_data(medians, self.labels)
        model = LatencyModel(featurizer(p.space, p.dummy_input, self.labels))
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
        p = self.profiler
        return Measurement(samples_ms=(point,), source="predicted", device=p.device,
                           graph_hash="", input_signature=tuple(p.input_signature),
                           settings={"runtime": "latency model"},
                           provenance=Provenance(
                               predictor={"name": "device latency model",
                                          "interval_ms": interval, "coverage": coverage},
                               calibration={"device": p.device, "kind": "latency model",
                                            "note": self.model_note}))

    def learn(self) -> None:
        """Refit on what the device has measured since, when the model is in use."""
        if self.use_model:
            self.refit()

    def start(self, limit_ms: float, confidence: float) -> "DecisionRound":
        if self.use_model and self.model is None:
            self.refit()
        return DecisionRound(self, limit_ms, confidence)


class DecisionRound:
    """One decide_many call's steps: `known` (cache, then model, before export), `cached`
    (after export, by graph), `request` and `store` (the device), `finish` (the audit)."""

    def __init__(self, decider: LimitDecider, limit_ms: float, confidence: float):
        self.decider, self.limit_ms, self.confidence = decider, limit_ms, confidence
        profiler = decider.profiler
        self.request = profiler.request.with_settings(stop="limit", limit_ms=limit_ms,
                                                      confidence=confidence)
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
        self.decider.audit.skipped += 1
        if self.decider._rng.random() < self.decider.audit_share:
            self.audited[position] = prediction
            return None
        return Decision(below=prediction.high_ms < self.limit_ms, settled=True,
                        limit_ms=self.limit_ms, confidence=prediction.coverage,
                        interval_ms=(prediction.low_ms, prediction.high_ms),
                        median_ms=prediction.median_ms, runs=0, source="predicted",
                        device_s=0.0, graph_hash=graph or "", device=self.decider.profiler.device,
                        reason=f"model: {self.decider.model_note}")

    def cached(self, graph: str) -> Optional[Decision]:
        """A stored decision that settles this limit, or a stored measurement read against it
        (a full measurement answers even within the noise of the limit)."""
        profiler = self.decider.profiler
        key = profiler.cache_key(graph)
        for stored in profiler.cache.decisions(key):
            if stored.settles(self.limit_ms, self.confidence):
                return stored.for_limit(self.limit_ms, self.confidence)
        measured = profiler.cache.get(key)
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
        p = self.decider.profiler  # stored under the device that measured, as measurements are
        key = MeasurementKey(exported.graph_hash, canonical_json(p.input_signature),
                             p.settings_key, digest(dict(result.facts.identity)),
                             result.agent_version)
        p.cache.put_decision(key, decision, result.samples_ms)
        with p._lock:
            p.counters.update(decisions=1, device_s=decision.device_s,
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
