"""Limit-aware decisions: is a subnet's median latency below a limit, at a stated confidence,
for as little device time as that question needs.

`Decision` is the answer with its evidence. How a decision is reached, cheapest first:

1. a stored decision or measurement whose interval of the median already settles the limit
   (an interval that excludes the limit answers every later limit it also excludes);
2. the device's latency model (harness.predict.latency_model), when its conformal prediction
   interval lies clearly on one side of the limit (source "predicted");
3. the device itself, with the agent's "limit" stop rule: it runs until the interval of the
   median excludes the limit, or, when the median sits within the noise of the limit, until
   the median is known to `rel_ci` (the decision then says `settled=False`).

The error rate: the agent spends the allowed error 1 - confidence over its looks at the
data (look k may err with probability (1 - confidence) * 6 / (pi^2 k^2), and these sum to
1 - confidence), and the interval of the median is distribution-free (order statistics of
independent runs); so a settled measured decision is wrong with probability at most
1 - confidence, however many times it looked. Its interval is the one of its last look (at
that look's stricter confidence): the true median lies outside it with probability at most
1 - confidence whatever the limit, so a stored decision answers a later limit it excludes,
at a confidence no higher than the one it was reached at. A predicted decision carries the
model's split-conformal interval, whose coverage the model's audit reports.

A decision is never stored as a measurement, and a measurement is never made from one.
"""
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, Sequence, Tuple

from agents.ort_agent import look_confidence, median_interval, plain_number
from harness.errors import InvalidArgument

DECISION_SOURCES = ("measured", "cached", "predicted")


def check_limit(limit_ms: Any, confidence: Any) -> Tuple[float, float]:
    """The limit and confidence of a decision, checked (numpy scalars are numbers too):
    InvalidArgument names the bad one."""
    limit_ms, confidence = plain_number(limit_ms), plain_number(confidence)
    if not (isinstance(limit_ms, (int, float)) and not isinstance(limit_ms, bool)
            and math.isfinite(limit_ms) and limit_ms > 0):
        raise InvalidArgument(f"limit_ms must be a positive number of milliseconds, got {limit_ms!r}",
                         fix="pass the latency limit in ms, e.g. limit_ms=25.0")
    if not (isinstance(confidence, (int, float)) and not isinstance(confidence, bool)
            and 0 < confidence < 1):
        raise InvalidArgument(f"confidence must lie strictly between 0 and 1, got {confidence!r}",
                         fix="pass e.g. confidence=0.99")
    return float(limit_ms), float(confidence)


@dataclass(frozen=True)
class Decision:
    """Whether a subnet's median latency is below `limit_ms`, with the evidence.

    below: the answer. settled: the interval excludes the limit (False: the median sits
        within the noise of the limit; it was measured to full precision and `below` compares
        that median with the limit).
    interval_ms: the interval of the median at `confidence` (measured), or the model's
        prediction interval (predicted). median_ms: the point estimate. runs: timed runs
        behind it (0 for a prediction). device_s: device time this decision cost now (0 when
        answered from the cache or the model). source: measured, cached or predicted.
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

    def __post_init__(self) -> None:
        if self.source not in DECISION_SOURCES:
            raise ValueError(f"source must be one of {DECISION_SOURCES}, got {self.source!r}")

    def __bool__(self) -> bool:
        return self.below

    def settles(self, limit_ms: float, confidence: float) -> bool:
        """Whether this decision's evidence answers another limit at `confidence`. Runs too
        few for an interval of the median at its confidence (one run, say) settle nothing:
        their interval_ms is only their range (min, max), which says nothing of the median."""
        low, high = self.interval_ms
        return self.source != "predicted" and confidence <= self.confidence and \
            self.has_interval and (high < limit_ms or low > limit_ms)

    @property
    def has_interval(self) -> bool:
        """Whether interval_ms is an interval of the median at `confidence`: enough runs
        for one (a prediction's interval is the model's, and always one)."""
        return self.source == "predicted" or median_interval(
            range(self.runs), look_confidence(self.confidence, 1)) is not None

    def for_limit(self, limit_ms: float, confidence: float, source: str = "cached") -> "Decision":
        """This evidence, read against another limit (device time is not spent again)."""
        low, high = self.interval_ms
        return Decision(below=high < limit_ms if self.settles(limit_ms, confidence)
                        else self.median_ms < limit_ms,
                        settled=self.settles(limit_ms, confidence), limit_ms=limit_ms,
                        confidence=self.confidence, interval_ms=self.interval_ms,
                        median_ms=self.median_ms, runs=self.runs, source=source, device_s=0.0,
                        graph_hash=self.graph_hash, device=self.device, reason=self.reason)

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
        how = "" if self.settled else ", within the noise of the limit"
        return (f"Decision({word} {self.limit_ms:g} ms{how}: median {self.median_ms:.4g} ms in "
                f"[{self.interval_ms[0]:.4g}, {self.interval_ms[1]:.4g}] at "
                f"{self.confidence:.0%}, {self.source}, {self.runs} runs, {self.device_s:.2f} "
                f"device-s)")


def decision_from_samples(samples_ms: Sequence[float], limit_ms: float, confidence: float, *,
                          source: str, device_s: float, graph_hash: str, device: str,
                          reason: str, looks: int = 1) -> Decision:
    """A decision read from raw per-run times: settled when the interval of the median
    excludes the limit. Runs the agent looked at `looks` times before it stopped give the
    interval at the confidence of that last look (harness.store.decisions: the error rate), which
    holds for any limit, this one or a later one."""
    ordered = sorted(samples_ms)
    median = _median(ordered)
    interval = median_interval(ordered, look_confidence(confidence, max(looks, 1)))
    # Too few runs for an interval: their range is shown, and settles nothing (has_interval)
    low, high = interval if interval is not None else (ordered[0], ordered[-1])
    settled = interval is not None and (high < limit_ms or low > limit_ms)
    return Decision(below=high < limit_ms if settled else median < limit_ms, settled=settled,
                    limit_ms=limit_ms, confidence=confidence, interval_ms=(low, high),
                    median_ms=median, runs=len(ordered), source=source, device_s=device_s,
                    graph_hash=graph_hash, device=device, reason=reason)


def _median(ordered: Sequence[float]) -> float:
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def summary(decisions: Sequence[Decision]) -> Dict[str, Any]:
    """Counts and device time of a batch of decisions (for a CLI line or a search log)."""
    return {"below": sum(d.below for d in decisions),
            "above": sum(not d.below for d in decisions),
            "unsettled": sum(not d.settled for d in decisions),
            "by_source": {s: sum(d.source == s for d in decisions) for s in DECISION_SOURCES},
            "device_s": sum(d.device_s for d in decisions)}


