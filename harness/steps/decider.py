"""How a profiler decides limits: cache first, then the device's latency model, then the
device with the agent's "limit" stop rule, in interleaved rounds where the profiler measures
in rounds (candidates leave the rounds as they are decided), else one model at a time (see
harness.store.decisions for the test and its guarantee).

`LimitDecider` lives as long as its profiler: it keeps the device's latency model (fitted on
the profiler's statistic: the quiet-state latency under rounds), refits it as measurements
accumulate, and audits it (a share of the candidates the model would skip is
measured anyway; coverage and agreement are reported). A `DecisionRound` holds the steps of
one decide_many call, which the profiler runs through the same pipelines as a measurement.
"""
import math
import random
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Sequence

from agents.ort_agent import limit_verdict
from devices.agent_result import AgentResult
from devices.errors import AgentProtocolError
from harness.export.graph import DummyInput, ExportedModel
from harness.pool.device_pool import DevicePool, MeasureRequest
from harness.predict.latency_model import (MIN_MEASUREMENTS, Featurizer, LatencyModel,
                                           ModelAudit, Prediction, training_data)
from harness.spaces.space import ModelSpace, Sample, SampleValidator, checked_search_space
from harness.steps.batch import answer_all
from harness.steps.key_scope import KeyScope
from harness.steps.measuring import WINDOW_BUDGET_BYTES, MeasurementSteps, window_request
from harness.steps.rounds import answer_in_rounds
from harness.store.decisions import Decision, decision_from_rounds, decision_from_samples
from harness.store.key import MeasurementKey
from harness.store.measurement import Measurement, Provenance, fixed_loop_estimate_s

# In rounds, a decision's budget: at most this many rounds (max_time_ms bounds them too)
DECISION_ROUNDS = 200
# In rounds, a decision's blocks last this long (ms; LimitDecider.block_ms): the first look
# needs as many kept blocks as the confidence and min_runs ask (10 at 99%) whatever their
# length, and most candidates are called at it, so short blocks make a call cheap (never
# longer than a measurement's, 10 ms by default, whose history they then join). A block lasts about
# DECISION_BLOCK_RUNS runs of the reference all the same, up to a measurement's length: the
# first runs after a switch of model run slower (at 224 px +18% and +10% for the first two),
# and a block of one run reads the switch with the model (the reference's too, which the
# ratio divides out: at 224 px a measurement's 10 ms blocks are one timed run, and they
# re-measured steadier than 20 ms blocks of two). Short blocks need a history of at
# least DECISION_HISTORY_BLOCKS reference blocks (see DecisionRound._block_ms).
DECISION_BLOCK_MS = 5.0
DECISION_BLOCK_RUNS = 3
DECISION_HISTORY_BLOCKS = 500


class LimitDecider:
    """The decisions of one profiler: the device's latency model and its audit live here
    across calls, and `start` opens one round (a limit and a confidence) whose steps the
    profiler runs as it runs a measurement (see LatencyProfiler.decide_many).

    It is given what it uses: the space and its inputs (the model's features), the
    profiler's measurement steps (its cache, key scope, export step, request, counters and
    reference; `steps.scope()` identifies the device on first use), `base_scope` (the key's
    parts known before), the statistic the model is fitted on, and the names of the devices
    (to find the identity they last measured with, offline)."""

    def __init__(self, space: ModelSpace, dummy_input: DummyInput, *, steps: MeasurementSteps,
                 base_scope: KeyScope, statistic: str, device: str, devices: List[str],
                 use_model: bool = True, model_coverage: float = 0.98,
                 audit_share: float = 0.05, block_ms: float = DECISION_BLOCK_MS,
                 budget_rounds: int = DECISION_ROUNDS, seed: int = 0):
        self.space, self.dummy_input, self.steps = space, dummy_input, steps
        self.cache, self.scope, self.export = steps.cache, steps.scope, steps.export
        self.counters, self.base_scope, self.statistic = steps.counters, base_scope, statistic
        self.device, self.devices = device, devices
        self.use_model = use_model
        self.model_coverage = model_coverage
        self.audit_share = audit_share
        self.block_ms = block_ms  # in rounds, a decision's blocks (see DECISION_BLOCK_MS)
        # in rounds, a decision's budget: this many rounds, or the request's if more
        self.budget_rounds = budget_rounds
        self.audit = ModelAudit()
        self.model: Optional[LatencyModel] = None
        self.model_note = "not fitted yet"
        self.labels = SampleValidator(checked_search_space(space)).labels
        self._rng = random.Random(seed)
        self._featurize: Optional[Featurizer] = None

    def refit(self, offline: bool = False) -> None:
        """Fit the device's model on every value the cache holds for this space on it (the
        statistic of measurements, and decisions' point estimates). `offline`: without asking
        the device who it is (it cannot be reached): under the identity it last measured
        with."""
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
        medians.update(self.cache.statistics_by_sample(*keys, self.statistic))
        samples, values = training_data(medians, self.labels)
        if self._featurize is None:  # counts every candidate block once: built on first use
            self._featurize = Featurizer(self.space, self.dummy_input, self.labels)
        model = LatencyModel(self._featurize)
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

    def start(self, limit_ms: float, confidence: float, indifference: float) -> "DecisionRound":
        if self.use_model and self.model is None:
            self.refit()
        return DecisionRound(self, limit_ms, confidence, indifference)


class DecisionRound:
    """One decide_many call's steps: `known` (cache, then model, before export), then the
    steps of a batch (harness.steps.batch.Answering): `export`, `cached` (by graph) and
    `store` (the device's runs under `request`), run by `answer` in interleaved rounds or
    one at a time, and `finish` (the audit)."""

    def __init__(self, decider: LimitDecider, limit_ms: float, confidence: float,
                 indifference: float):
        self.decider, self.limit_ms, self.confidence = decider, limit_ms, confidence
        self.indifference = indifference
        request = decider.steps.request
        self.in_rounds = request.settings["protocol"] == "rounds"
        self.request = request.with_settings(stop="limit", limit_ms=limit_ms,
                                             confidence=confidence, indifference=indifference)
        if self.in_rounds:  # the limit in units of the reference: by its known quiet level
            level, blocks = decider.steps.known_reference()
            self.request = self.request.with_settings(
                rounds=max(request.settings["rounds"], decider.budget_rounds),
                block_ms=self._block_ms(level, blocks, request.settings["block_ms"]),
                reference_level_ms=level)
        # the history holds blocks of the measurements' length only (_block_ms)
        self.joins_history = self.in_rounds and \
            self.request.settings["block_ms"] == request.settings["block_ms"]
        # the between-window term a stored decision's interval must carry to answer this one
        self.window_spread = float(self.request.settings["window_spread"]) \
            if self.in_rounds else 0.0
        self.export = decider.export
        self.reference = decider.steps.reference
        self.audited: Dict[int, Prediction] = {}  # sample position -> the skipped prediction

    def window_request(self, window: Sequence[ExportedModel],
                       budget_bytes: int = WINDOW_BUDGET_BYTES) -> MeasureRequest:
        """The request of this decision's next window, of these candidates: its blocks of
        the device's history's k where they join that history, else of the request's or the
        window's own probe's (MeasurementSteps.block_runs)."""
        runs = self.decider.steps.block_runs() if self.joins_history else \
            int(self.request.settings["block_runs"] or 0)
        return window_request(self.request, window, runs, budget_bytes)

    def window_budget(self) -> int:
        """The loaded bytes one of this decision's windows may hold on the device."""
        return self.decider.steps.window_budget()

    def _block_ms(self, level_ms: Optional[float], history_blocks: int,
                  measured_block_ms: float) -> float:
        """The length of this decision's blocks: the decider's (DECISION_BLOCK_MS), or about
        DECISION_BLOCK_RUNS runs of the reference (its level is one run's CPU time) if that
        is longer, and never longer than the measurements' blocks. Short blocks only where
        the device's history gives the level from DECISION_HISTORY_BLOCKS reference blocks
        or more. The level is a low quantile of the reference's block minima, and
        the minimum of fewer runs lies higher, so a short block's window joins no history
        and cannot read a level of its own: a new device's first decisions time the
        measurements' blocks, which join its history, until it holds enough to stand on
        (one window's level, kept for good, would put every later limit off by that
        window's draw)."""
        if level_ms is None or history_blocks < DECISION_HISTORY_BLOCKS:
            return measured_block_ms
        return min(measured_block_ms,
                   max(self.decider.block_ms, DECISION_BLOCK_RUNS * level_ms))

    def answer(self, samples: Sequence[Sample], results: List[Optional[Decision]],
               pool: DevicePool, what: str, progress: Optional[bool]) -> None:
        """Fill every None of `results` from the device: in interleaved rounds beside the
        reference (a decided candidate leaves them), else one model at a time."""
        if self.in_rounds:
            answer_in_rounds(samples, results, self, pool=pool, what=what, progress=progress)
        else:
            answer_all(samples, results, self, pool=pool, request=self.request, what=what,
                       progress=progress)

    def known(self, position: int, sample: Sample, graph: Optional[str]) -> Optional[Decision]:
        """What answers without the device: the cache, or a clear prediction of the model
        (a share of those is measured anyway, for the audit)."""
        cached = self.cached(graph) if graph is not None else None
        if cached is not None or not self.decider.use_model or self.decider.model is None:
            return cached
        prediction = self.decider.model.predict(sample, self.decider.model_coverage)
        below = model_verdict(prediction, self.limit_ms, self.indifference)
        if prediction is None or below is None:
            return None
        if self.decider.audits_skip():
            self.audited[position] = prediction
            return None
        return Decision(below=below, settled=True,
                        limit_ms=self.limit_ms, confidence=prediction.coverage,
                        interval_ms=(prediction.low_ms, prediction.high_ms),
                        median_ms=prediction.median_ms, runs=0, source="predicted",
                        device_s=0.0, graph_hash=graph or "", device=self.decider.device,
                        reason=f"model: {self.decider.model_note}",
                        indifference=self.indifference)

    def cached(self, graph: str) -> Optional[Decision]:
        """A stored decision that settles this limit, or a stored measurement read against it
        (a full measurement answers even within the noise of the limit)."""
        cache = self.decider.cache
        key = self.decider.scope().key(graph)
        for stored in cache.decisions(key):
            if stored.settles(self.limit_ms, self.confidence, self.indifference,
                              self.window_spread):
                return stored.for_limit(self.limit_ms, self.confidence, self.indifference,
                                        window_spread=self.window_spread)
        measured = cache.get(key)
        if measured is None or measured.rounds is not None:  # a window's runs are no loop's
            return None
        return decision_from_samples(measured.samples_ms, self.limit_ms, self.confidence,
                                     source="cached", device_s=0.0, graph_hash=graph,
                                     device=measured.device, reason="a stored measurement",
                                     indifference=self.indifference,
                                     window_spread=self.window_spread)

    def store(self, result: AgentResult, exported: ExportedModel) -> Decision:
        """The device's runs as a decision, stored with them as evidence (never as a
        measurement)."""
        key = self.decider.scope().key_of(result, exported.graph_hash)  # the device that measured
        if result.rounds is not None:
            decision = self._from_rounds(result, exported, key)
        else:
            decision = self._from_loop(result, exported)
        if decision.settled:  # an undecided result is evidence of nothing to keep
            self.decider.cache.put_decision(key, decision, result.samples_ms)
        timed_ms = result.loop_ms if result.rounds is None else sum(result.samples_ms)
        self.decider.counters.add(decisions=1, device_s=decision.device_s,
                                  fixed_loop_s=fixed_loop_estimate_s(
                                      decision.median_ms, decision.device_s, timed_ms))
        return decision

    def _from_loop(self, result: AgentResult, exported: ExportedModel) -> Decision:
        lease = result.lease or (0.0, 0.0)
        looks = result.stop.get("looks")
        decision = decision_from_samples(
            result.samples_ms, self.limit_ms, self.confidence, source="measured",
            device_s=lease[1] - lease[0], graph_hash=exported.graph_hash, device=result.device,
            reason="", looks=looks if isinstance(looks, int) else 1,
            indifference=self.indifference)
        decision = replace(decision, reason="the interval of the median settles the limit"
                           if decision.settled else "the median sits within the noise of the "
                           "limit: measured to full precision" if result.stop.get("reason") ==
                           "precise" else f"stopped by {result.stop.get('reason')}: undecided")
        if result.stop.get("drift"):
            decision = replace(decision, reason=decision.reason + "; the runs drift")
        return decision

    def _from_rounds(self, result: AgentResult, exported: ExportedModel,
                     key: MeasurementKey) -> Decision:
        """A candidate's decision from its window: its device time is the window's lease
        shared by how long each candidate ran in it (a decided one left early)."""
        assert result.rounds is not None
        lease = result.lease or (0.0, 0.0)
        share = result.rounds.share_of(result.samples_ms)
        if not _sound_verdict(result.stop):
            raise AgentProtocolError(f"{result.device} answered a decision's rounds without "
                                     "a sound verdict of the limit rule (its stop: "
                                     f"{str(dict(result.stop))[:200]})")
        if self.joins_history:  # the window's blocks join the device's history
            self.decider.steps.reference_level(key, result)
        return decision_from_rounds(result.stop, len(result.samples_ms), source="measured",
                                    device_s=(lease[1] - lease[0]) * share,
                                    graph_hash=exported.graph_hash, device=result.device)

    def finish(self, results: Sequence[Optional[Decision]]) -> List[Decision]:
        """Record the audit of the model's skips that were measured anyway; the results (every
        one answered: a failure was raised before)."""
        decided = [result for result in results if result is not None]
        assert len(decided) == len(results), "a decision was left unanswered"
        for position, prediction in self.audited.items():
            measured = decided[position]
            called = model_verdict(prediction, self.limit_ms, self.indifference)
            self.decider.audit.record(prediction, measured.median_ms,
                                      agreed=measured.below == called if measured.settled
                                      else None)
        return decided


def model_verdict(prediction: Optional[Prediction], limit_ms: float, indifference: float
                  ) -> Optional[bool]:
    """The latency model's call (True: below the limit), or None where its interval does not
    settle it: the device's own three-way test (agents.ort_agent.limit_verdict) on the
    prediction interval. Below when the interval lies under the zone's top, above when it
    lies over its bottom; both (the interval inside the zone, where either answer is right):
    the point prediction says which. A truth outside the zone lies outside an interval that
    calls it wrongly, so a call errs at most as often as the interval misses; reading the
    zone, the model also answers the candidates whose interval reaches into it from one
    side, which it measured before (on the replayed trace, 1.5-1.7x less device time). The
    interval is the model's, not widened by the device's between-window spread: its
    jackknife+ residuals are measured values' departures, windows' draws included."""
    if prediction is None:
        return None
    outcome = limit_verdict((prediction.low_ms, prediction.high_ms), prediction.median_ms,
                            limit_ms, indifference)
    return None if outcome is None else outcome == "below"


def _sound_verdict(stop: Mapping[str, Any]) -> bool:
    """Whether an agent's stop record carries the limit rule's verdict as numbers: positive
    finite level, limit and confidence, a finite ratio and ordered interval where given, an
    outcome of below, above or none, a window spread in [0, 0.5), and why the candidate left
    that agrees with its outcome."""
    def positive(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            math.isfinite(value) and value > 0

    interval = stop.get("ratio_interval")
    spread, left, outcome = stop.get("window_spread"), stop.get("left"), stop.get("outcome")
    consistent = (left == "settled") == (outcome is not None) and (
        left != "spread" or (positive(spread) and stop.get("ratio") is not None
                             and interval is not None))
    return stop.get("rule") == "rounds-limit" and consistent and \
        isinstance(spread, (int, float)) and not isinstance(spread, bool) and \
        0 <= spread < 0.5 and left in ("settled", "spread", None) and \
        all(positive(stop.get(k)) for k in ("level_ms", "limit_ms", "confidence",
                                             "indifference", "looks", "rounds")) and \
        stop.get("outcome") in ("below", "above", None) and \
        (stop.get("ratio") is None or positive(stop.get("ratio"))) and \
        (interval is None or (isinstance(interval, list) and len(interval) == 2 and
                              all(positive(v) for v in interval) and interval[0] <= interval[1]))
