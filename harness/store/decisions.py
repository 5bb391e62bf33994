"""Limit-aware decisions: is a subnet's latency below a limit, at a stated confidence, for
as little device time as that question needs.

`Decision` is the answer with its evidence. How a decision is reached, cheapest first:

1. a stored decision or measurement whose interval already settles the limit (an interval
   that settles it answers every later limit it also settles);
2. the device's latency model (harness.predict.latency_model), when its jackknife+ prediction
   interval settles the limit as the device's three-way test does: under the indifference
   zone's top or over its bottom (source "predicted"; harness.steps.decider.model_verdict);
3. the device itself, with the agent's "limit" stop rule. In interleaved rounds (the
   default where a profiler measures in rounds) a batch of candidates is timed together
   beside the reference; as each candidate's kept ratios to the reference grow, the interval
   of its ratio, times the reference's quiet level, is tested against the limit, and a
   decided candidate leaves the rounds. Timed one at a time (protocol "loop"), the interval of the
   median of its runs is tested as the runs come.

The test is three-way, with an indifference zone of +-`indifference` x the limit (2% by
default): "below" once the interval lies under the zone's top, "above" once it lies over
its bottom (agents.ort_agent.limit_verdict), undecided when the budget (rounds, max_time_ms)
is spent first: `settled` is False and the decision says so, with its interval. A subnet
whose true latency lies inside the zone may be called either way; one outside it is called
wrongly only when the interval misses its latency.

In rounds, the interval tested is the interval of the ratio widened by the device's
between-window spread (the setting window_spread, 2% by default): one window is one draw
(its worker's loads, the device's mix of work), which moves every ratio in it alike and
which its rounds cannot average away. Cost cut-offs: a candidate whose rounds already agree
within that spread (agents.ort_agent.SPREAD_NARROW), or whose rounds' 90% interval lies inside
the indifference zone (NEAR_CONFIDENCE), leaves undecided, never called.

The error rate: the agent spends the allowed error 1 - confidence over its looks at the
data (look k may err with probability (1 - confidence) * 6 / (pi^2 k^2), and these sum to
1 - confidence), and the interval of the median is distribution-free (order statistics of
independent runs, or of independent rounds' ratios); so a settled measured decision on a
subnet outside the zone is wrong with probability at most 1 - confidence, however many
times it looked, plus, in rounds, the chance that the window's draw lies beyond
window_spread (on this project's host 2-12% of single windows did). Its
interval is the one of its last look (at that look's stricter confidence): the true value
lies outside it with probability at most 1 - confidence, so a stored decision answers a
later limit it settles, at a confidence no higher than its own.
A predicted decision carries the model's jackknife+ interval, whose coverage the
model's audit reports.

A decision is never stored as a measurement, and a measurement is never made from one; an
undecided result is returned, never stored.
"""
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Mapping, Sequence, Tuple

from agents.ort_agent import (INDIFFERENCE, limit_verdict, look_confidence,
                              median_interval, plain_number, widened)
from harness.errors import InvalidArgument

DECISION_SOURCES = ("measured", "cached", "predicted")


def check_limit(limit_ms: Any, confidence: Any, indifference: Any = INDIFFERENCE
                ) -> Tuple[float, float, float]:
    """The limit, confidence and indifference zone of a decision, checked (numpy scalars are
    numbers too): InvalidArgument names the bad one."""
    limit_ms, confidence = plain_number(limit_ms), plain_number(confidence)
    indifference = plain_number(indifference)
    if not (isinstance(limit_ms, (int, float)) and not isinstance(limit_ms, bool)
            and math.isfinite(limit_ms) and limit_ms > 0):
        raise InvalidArgument(f"limit_ms must be a positive number of milliseconds, got {limit_ms!r}",
                         fix="pass the latency limit in ms, e.g. limit_ms=25.0")
    if not (isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
            and 0 < confidence < 1):
        raise InvalidArgument(f"confidence must lie strictly between 0 and 1, got {confidence!r}",
                         fix="pass e.g. confidence=0.99")
    if not (isinstance(indifference, (int, float)) and not isinstance(indifference, bool)
            and 0 < indifference < 0.5):
        raise InvalidArgument("indifference must lie strictly between 0 and 0.5 (a share of "
                              f"the limit), got {indifference!r}",
                              fix="pass e.g. indifference=0.02: within +-2% of the limit "
                                  "either answer is right")
    return float(limit_ms), float(confidence), float(indifference)


@dataclass(frozen=True)
class Decision:
    """Whether a subnet's latency is below `limit_ms`, with the evidence.

    below: the answer. settled: decided (False: undecided when its budget ran out; `below`
        then compares its point estimate with the limit). indifference: the zone (a share of
        the limit) within which either answer counts as right; 0 for a strict test.
    interval_ms: the interval at `confidence` of the median (one model at a time) or of the
        quiet-state latency (interleaved rounds: the ratio's interval times the reference's
        quiet level), or the model's prediction interval (predicted). median_ms: the point
        estimate. runs: timed runs behind it (0 for a prediction). device_s: device time this
        decision cost now (0 when answered from the cache or the model; in rounds, its share
        of the window). source: measured, cached or predicted. window_spread: the
        between-window term its interval carries (rounds; 0 for a loop's runs), so that a
        stored decision answers only a request that allows no more.
    """

    below: bool
    settled: bool
    limit_ms: float
    confidence: float
    interval_ms: Tuple[float, float]
    median_ms: float
    runs: int
    source: str
    device_s: float
    graph_hash: str
    device: str
    reason: str
    created_at: float = field(default_factory=time.time)
    indifference: float = 0.0
    window_spread: float = 0.0

    def __post_init__(self) -> None:
        if self.source not in DECISION_SOURCES:
            raise ValueError(f"source must be one of {DECISION_SOURCES}, got {self.source!r}")

    def __bool__(self) -> bool:
        return self.below

    def settles(self, limit_ms: float, confidence: float, indifference: float = 0.0,
                window_spread: float = 0.0) -> bool:
        """Whether this decision's evidence answers another limit at `confidence`, with that
        indifference zone, for a request whose between-window term is `window_spread` (an
        interval made with a smaller one is too narrow for it). Runs too few for an interval
        at its confidence (one run, say) settle nothing: their interval_ms is only their
        range (min, max)."""
        return self.source != "predicted" and confidence <= self.confidence and \
            window_spread <= self.window_spread and \
            self.has_interval and self._verdict(limit_ms, indifference) is not None

    def _verdict(self, limit_ms: float, indifference: float) -> Any:
        return limit_verdict(self.interval_ms, self.median_ms, limit_ms, indifference)

    @property
    def has_interval(self) -> bool:
        """Whether interval_ms is an interval of the median at `confidence`: enough runs
        for one (a prediction's interval is the model's, and always one)."""
        return self.source == "predicted" or median_interval(
            range(self.runs), look_confidence(self.confidence, 1)) is not None

    def for_limit(self, limit_ms: float, confidence: float, indifference: float = 0.0,
                  source: str = "cached", window_spread: float = 0.0) -> "Decision":
        """This evidence, read against another limit (device time is not spent again)."""
        settled = self.settles(limit_ms, confidence, indifference, window_spread)
        return Decision(below=self._verdict(limit_ms, indifference) == "below" if settled
                        else self.median_ms < limit_ms,
                        settled=settled, limit_ms=limit_ms,
                        confidence=self.confidence, interval_ms=self.interval_ms,
                        median_ms=self.median_ms, runs=self.runs, source=source, device_s=0.0,
                        graph_hash=self.graph_hash, device=self.device, reason=self.reason,
                        indifference=indifference, window_spread=self.window_spread)

    def with_source(self, source: str) -> "Decision":
        """The same evidence from another source; a cached copy cost no device time now."""
        return replace(self, source=source, device_s=0.0 if source == "cached" else self.device_s)

    def to_dict(self) -> Dict[str, Any]:
        return dict(asdict(self), interval_ms=list(self.interval_ms))

    @classmethod
    def from_dict(cls, data: Dict[str, Any]) -> "Decision":
        return cls(**dict(data, interval_ms=tuple(data["interval_ms"])))

    def __repr__(self) -> str:
        word = "below" if self.below else "not below"
        how = "" if self.settled else ", undecided: the point estimate says"
        return (f"Decision({word} {self.limit_ms:g} ms{how}: median {self.median_ms:.4g} ms in "
                f"[{self.interval_ms[0]:.4g}, {self.interval_ms[1]:.4g}] at "
                f"{self.confidence:.0%}, {self.source}, {self.runs} runs, {self.device_s:.2f} "
                f"device-s)")


def decision_from_samples(samples_ms: Sequence[float], limit_ms: float, confidence: float, *,
                          source: str, device_s: float, graph_hash: str, device: str,
                          reason: str, looks: int = 1, indifference: float = 0.0,
                          window_spread: float = 0.0) -> Decision:
    """A decision read from raw per-run times: settled when the interval of the median says
    below or above the limit (with the indifference zone). Runs the agent looked at `looks`
    times before it stopped give the interval at the confidence of that last look
    (harness.store.decisions: the error rate), which holds for any limit. A request with a
    between-window term (`window_spread`, rounds) widens the interval by it, as the agent's
    limit rule does: a stored loop's window is one draw as a window of rounds is."""
    ordered = sorted(samples_ms)
    median = _median(ordered)
    interval = widened(median_interval(ordered, look_confidence(confidence, max(looks, 1))),
                       window_spread)
    verdict = limit_verdict(interval, median, limit_ms, indifference)
    # Too few runs for an interval: their range is shown, and settles nothing (has_interval)
    low, high = interval if interval is not None else (ordered[0], ordered[-1])
    return Decision(below=verdict == "below" if verdict else median < limit_ms,
                    settled=verdict is not None, limit_ms=limit_ms, confidence=confidence,
                    interval_ms=(low, high), median_ms=median, runs=len(ordered),
                    source=source, device_s=device_s, graph_hash=graph_hash, device=device,
                    reason=reason, indifference=indifference, window_spread=window_spread)


def decision_from_rounds(verdict: Mapping[str, Any], runs: int, *, source: str,
                         device_s: float, graph_hash: str, device: str) -> Decision:
    """A decision from the limit rule's last look at a candidate of interleaved rounds
    (agents.ort_agent.limit_look): the interval of its ratio to the reference, times the
    reference's quiet level the agent tested with, is the interval of its quiet-state
    latency. Without an interval (too few rounds) its point estimate, unsettled (an
    unsettled decision is never stored, so that point never settles a later limit)."""
    level, limit = float(verdict["level_ms"]), float(verdict["limit_ms"])
    ratio = verdict.get("ratio")
    interval = verdict.get("ratio_interval")
    quiet = float(ratio) * level if ratio is not None else math.nan
    low, high = (float(interval[0]) * level, float(interval[1]) * level) \
        if interval is not None else (quiet, quiet)
    outcome = verdict.get("outcome")
    spread = float(verdict.get("window_spread") or 0.0)
    zone = float(verdict["indifference"])
    reason = (f"the interval of the quiet-state latency says {outcome} (look "
              f"{verdict['looks']}, round {verdict['rounds']})" if outcome else
              f"undecided after {verdict['rounds']} rounds: its rounds agree within the "
              f"device's between-window spread (+-{spread:.1%}), and its interval, widened "
              "by that spread, still reaches into both sides of the indifference zone (a cost "
              "cut-off: more rounds would narrow only the part the window's draw does not "
              "move)" if verdict.get("left") == "spread" and _rounds_agree(verdict) else
              f"undecided after {verdict['rounds']} rounds: its rounds' 90% interval lies "
              f"inside the indifference zone (+-{zone:.1%} of the limit), where either answer "
              f"is right, and its interval, widened by the device's between-window spread "
              f"(+-{spread:.1%}), still reaches into both sides of the zone (a cost cut-off)"
              if verdict.get("left") == "spread" else
              f"undecided after {verdict['rounds']} rounds: the interval still reaches into "
              "both sides of the indifference zone" if interval is not None else
              f"undecided after {verdict['rounds']} rounds: too few kept for an interval (the "
              "device changed speed around most blocks)")
    return Decision(below=outcome == "below" if outcome else quiet < limit,
                    settled=outcome is not None, limit_ms=limit,
                    confidence=float(verdict["confidence"]), interval_ms=(low, high),
                    median_ms=quiet, runs=runs, source=source, device_s=device_s,
                    graph_hash=graph_hash, device=device, reason=reason,
                    indifference=zone, window_spread=spread)


def _rounds_agree(verdict: Mapping[str, Any]) -> bool:
    """Whether the first cost cut-off let a candidate leave (agents.ort_agent.limit_look,
    SPREAD_NARROW = 1): its rounds' interval (the tested one, unwidened) within the spread of
    its ratio; else the second did (its 90% interval inside the zone)."""
    spread, ratio = float(verdict["window_spread"]), float(verdict["ratio"])
    low, high = verdict["ratio_interval"]
    within = (float(low) * (1 + spread), float(high) * (1 - spread))
    return max(ratio - within[0], within[1] - ratio) <= spread * ratio * (1 + 1e-9)


def _median(ordered: Sequence[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def summary(decisions: Sequence[Decision]) -> Dict[str, Any]:
    """Counts and device time of a batch of decisions (for a CLI line or a search log)."""
    return {"below": sum(d.below and d.settled for d in decisions),
            "above": sum(not d.below and d.settled for d in decisions),
            "undecided": sum(not d.settled for d in decisions),
            "by_source": {s: sum(d.source == s for d in decisions) for s in DECISION_SOURCES},
            "device_s": sum(d.device_s for d in decisions)}


