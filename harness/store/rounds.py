"""What a window of interleaved rounds says about one model: its latency as a ratio to the
reference model timed beside it, and its quiet-state latency.

A window (agents.ort_agent.measure_rounds) times every candidate's block once per round in
a fresh random order, with reference blocks before, between and after them. The device's
speed changes (other tenants, frequency, heat), but it changes alike for a candidate and for
the reference blocks next to it in time, so the ratio of the two holds still where the raw
times do not:

- each block is summarised by a statistic of its k runs: the minimum by default (within a
  short block it is the run least disturbed by others), or the median. Where the agent
  timed each run by the thread's CPU clock too (`RoundsRecord.clock == "thread_cpu"`: one
  thread computing on the caller's, agents.ort_agent.run_cpu_clock), the statistic reads
  those CPU times: they leave out the time the thread waited while other work had its core,
  which no reference corrects (a burst hits a candidate's block and not its references');
  on this host, with a neighbour on the device's own core, that took the subnets
  re-measured within 5% of themselves from 72% to 100%, and the blocks dropped for a change
  of speed from 55-61% to 4% (README, "Measurements that hold on a noisy device");
- a candidate block's ratio is its statistic over the reference's at that block's time: the
  straight line through the statistics of its two nearest reference blocks (the one before
  and the one after it), read at the middle of its timed runs (agent 1.4; before, their
  mean, which charged a block beside one reference half of a steady change of speed); when
  those two differ by more than `speed_change`, the device changed speed between them and
  the block is dropped (counted, not hidden);
- the candidate's ratio is the median of its blocks' ratios over the rounds. Its 95%
  interval is the order-statistic interval of that median (distribution-free), widened on
  each side by a systematic term: how far the same ratio lies when the blocks are summarised
  by their other statistic (median instead of minimum, or the reverse). The order statistics
  cover the spread of the rounds, but not a bias of the block statistic itself (a burst
  over both references of a block, a candidate's block spanning another stretch of time
  than its references'). The two are independent estimates of two errors, so each side's
  half-width is the two added in quadrature, as the quiet-state latency's interval adds
  the level's. On the replayed traces, with the truth known (agent 1.6, 320 intervals a
  trace), the plain interval covered it for 95% (loaded) and 92% (idle), the term added in
  quadrature for 97% and 95%, and added whole (before) for 98% and 98%: above the 95 +- 2
  a 95% interval should hold, and as much as a sixth wider than it needs to be;
- the reference level is a low quantile of the reference blocks' statistics (the device's
  speed when least disturbed; over the device's history where one is kept); the
  quiet-state latency is ratio x level. The level is an estimate too (ReferenceLevel): its
  95% interval is the order-statistic interval of that quantile, widened on each side by how
  far the quantile of half the share lies below it (which low quantile is "quiet" is a
  choice; on a device whose low tail is spread, the choice moves the level). The quiet-state
  latency's interval carries both: their relative half-widths added in quadrature (two
  estimates from different blocks). Before, it was the ratio's interval times the level, as
  if the level were exact: on the replayed loaded trace a lone window's quiet interval then
  covered the truth for 68% of subnets (README, "Measurements that hold on a noisy device").
The spread of the reference blocks' wall-clock minima across the window is the device's
noise level, reported beside (what the device's users see, whichever clock the ratio reads).
"""
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from agents.ort_agent import (LEVEL_QUANTILE, SPEED_CHANGE, block_ratios, block_statistic,
                              block_times, median_interval, quantile, quantile_interval)
from devices.agent_result import RoundsRecord

BLOCK_STATISTICS = ("min", "median")
NOISY_DROPPED = 0.25    # flagged noisy when more of the blocks than this were dropped
NOISY_INTERVAL = 0.02   # ... or when the ratio's interval is wider than +-2%
# the fewest reference blocks that give the level a 95% interval (36 at the 10% quantile)
LEVEL_BLOCKS_NEEDED = next(n for n in range(2, 10000)
                           if quantile_interval(range(n), LEVEL_QUANTILE, 0.95) is not None)


@dataclass(frozen=True)
class ReferenceLevel:
    """The reference's quiet level: the LEVEL_QUANTILE quantile of its block statistics
    (over the device's history, or one window's), with its 95% interval (see the module
    docstring; always 95%: the history's level is read before a request's confidence is
    known)."""

    level_ms: float
    interval_ms: Tuple[float, float]
    blocks: int                # the blocks it stands on
    few_blocks: bool = False   # too few for a 95% interval: the interval is their range

    @classmethod
    def of(cls, values: Sequence[float]) -> "ReferenceLevel":
        """The level of these block statistics (ms; at least one)."""
        ordered = sorted(values)
        level = quantile(ordered, LEVEL_QUANTILE)
        interval = quantile_interval(ordered, LEVEL_QUANTILE, 0.95)
        low, high = interval or (ordered[0], ordered[-1])
        choice = level - quantile(ordered, LEVEL_QUANTILE / 2)  # which low quantile is quiet
        return cls(level_ms=level, interval_ms=(max(low - choice, 0.0), high + choice),
                   blocks=len(ordered), few_blocks=interval is None)

    @classmethod
    def stored(cls, level_ms: float, interval_ms: Tuple[float, float], blocks: int
               ) -> "ReferenceLevel":
        """A level as a measurement stored it (Provenance.reference_level)."""
        return cls(level_ms=level_ms, interval_ms=interval_ms, blocks=blocks,
                   few_blocks=blocks < LEVEL_BLOCKS_NEEDED)

    @classmethod
    def exact(cls, level_ms: float) -> "ReferenceLevel":
        """A level whose interval is unknown (stored before levels had intervals): taken as
        exact."""
        return cls(level_ms=level_ms, interval_ms=(level_ms, level_ms), blocks=0)


@dataclass(frozen=True)
class RoundsSummary:
    """One model's figures from a window of interleaved rounds (see the module docstring)."""

    ratio: float                          # median over rounds: block / reference at its time
    ratio_interval: Tuple[float, float]   # its 95% interval, systematic term included
    reference_level_ms: float             # a low quantile of the reference blocks
    quiet_ms: float                       # ratio x reference level
    quiet_interval_ms: Tuple[float, float]  # the ratio's and the level's intervals together
    rounds: int                           # blocks that gave a ratio
    dropped: int                          # blocks dropped for a speed change around them
    noise: float                          # CV of the reference blocks' wall-clock minima
    reference_share: float                # the reference's share of the window's timed runs
    block_statistic: str
    few_rounds: bool = False              # too few for a 95% interval: it is their range
    unfiltered: bool = False              # every block saw a change of speed: none dropped
    systematic: float = 0.0               # |ratio - the ratio by the other block statistic|
    clock: str = "wall"                   # what the block statistics read (RoundsRecord)
    level_blocks: int = 0                 # the reference blocks the level stands on (0: unknown)
    few_level_blocks: bool = False        # too few of them for a 95% interval of the level
    order_interval: Optional[Tuple[float, float]] = None  # the ratio's, without the term

    @property
    def relative_half_width(self) -> float:
        """Half the ratio's interval over the ratio (0.01: +-1%)."""
        low, high = self.ratio_interval
        return (high - low) / 2 / self.ratio if self.ratio > 0 else math.inf

    @property
    def statistical_half_width(self) -> float:
        """relative_half_width without the systematic term: what the agent's ci rule (the
        order-statistic interval of the median) stopped on."""
        if self.order_interval is None:  # made without it: the term taken off whole
            return self.relative_half_width - (self.systematic / self.ratio if self.ratio > 0
                                               else 0.0)
        low, high = self.order_interval
        return (high - low) / 2 / self.ratio if self.ratio > 0 else math.inf

    @property
    def noisy_reasons(self) -> List[str]:
        """Why the window was noisy for this model; empty when it was not."""
        reasons = []
        if self.unfiltered:
            reasons.append("noisy: the device changed speed around every block; the ratio "
                           "is of them all")
        if self.few_rounds:
            reasons.append(f"few rounds: {self.rounds} give no 95% interval of the ratio "
                           "(6 do)")
        if self.few_level_blocks:
            reasons.append(f"few reference blocks: {self.level_blocks} give no 95% interval "
                           f"of the reference's quiet level ({LEVEL_BLOCKS_NEEDED} do); the "
                           "quiet-state latency's interval spans their range")
        total = self.rounds + self.dropped
        if total and self.dropped / total > NOISY_DROPPED:
            reasons.append(f"noisy: {self.dropped} of {total} blocks dropped for a change of "
                           "speed around them")
        if self.relative_half_width > NOISY_INTERVAL:
            reasons.append(f"noisy: the ratio to the reference is known to "
                           f"+-{self.relative_half_width:.1%} only")
        return reasons

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


def summarise(record: RoundsRecord, statistic: str = "min", speed_change: float = SPEED_CHANGE,
              level: Optional[ReferenceLevel] = None, confidence: float = 0.95
              ) -> Optional[RoundsSummary]:
    """The model's figures from its window; `level`: the reference's level from a longer
    history (else this window's). None when no block gave a ratio."""
    references = sorted(record.reference_blocks, key=lambda block: block[2])
    ref_values = [block_statistic(block_times(block), statistic) for block in references]
    walls = [block_statistic(block[3], statistic) for block in references]
    kept = kept_ratios(record, statistic, speed_change)
    if kept is None:
        return None
    ordered, other, dropped, unfiltered = kept
    ratio = block_statistic(ordered, "median")
    # too few rounds for an interval at this confidence: the whole range, flagged as such
    interval = median_interval(ordered, confidence)
    few = interval is None
    plain = interval or (ordered[0], ordered[-1])
    systematic = abs(ratio - block_statistic(other, "median"))  # the same blocks, read anew
    low = max(ratio - math.hypot(ratio - plain[0], systematic), 0.0)
    high = ratio + math.hypot(plain[1] - ratio, systematic)
    if level is None:
        level = ReferenceLevel.of(ref_values)
    mean_ref = sum(walls) / len(walls)  # the device's noise: what its wall clock saw
    spread = math.sqrt(sum((v - mean_ref) ** 2 for v in walls) / len(walls))
    ref_ms = sum(sum(block[3]) for block in references)
    window_ms = ref_ms + record.candidates_ms
    return RoundsSummary(
        ratio=ratio, ratio_interval=(low, high), reference_level_ms=level.level_ms,
        quiet_ms=ratio * level.level_ms,
        quiet_interval_ms=product_interval(ratio, (low, high), level),
        rounds=len(ordered), dropped=dropped, noise=spread / mean_ref if mean_ref else 0.0,
        reference_share=ref_ms / window_ms if window_ms else 0.0, block_statistic=statistic,
        few_rounds=few, unfiltered=unfiltered, systematic=systematic, clock=record.clock,
        level_blocks=level.blocks, few_level_blocks=level.few_blocks, order_interval=plain)


def product_interval(ratio: float, ratio_interval: Tuple[float, float],
                     level: ReferenceLevel) -> Tuple[float, float]:
    """The interval of ratio x level (ms): on each side, the two intervals' relative
    half-widths added in quadrature (independent estimates: the candidate's blocks against
    their references, and the reference's low quantile over its own blocks)."""
    quiet = ratio * level.level_ms
    if ratio <= 0 or level.level_ms <= 0:
        return ratio_interval[0] * level.interval_ms[0], ratio_interval[1] * level.interval_ms[1]
    below = math.hypot(1 - ratio_interval[0] / ratio, 1 - level.interval_ms[0] / level.level_ms)
    above = math.hypot(ratio_interval[1] / ratio - 1, level.interval_ms[1] / level.level_ms - 1)
    return max(quiet * (1 - below), 0.0), quiet * (1 + above)


def kept_ratios(record: RoundsRecord, statistic: str, speed_change: float
                ) -> Optional[Tuple[List[float], List[float], int, bool]]:
    """The candidate's block ratios kept by `statistic` (sorted), the same blocks' ratios by
    the other block statistic (sorted), how many blocks were dropped, and whether every block
    saw a change of speed (then all are kept, flagged); None when no block gave a ratio."""
    paired = block_ratios(record.blocks, record.reference_blocks, statistic, speed_change)
    if not paired:
        return None
    other = "median" if statistic == "min" else "min"
    # the same blocks in the same order: which get a ratio depends on their sequence only
    others = block_ratios(record.blocks, record.reference_blocks, other, math.inf)
    unfiltered = not any(keep for _, keep in paired)
    kept = [(ratio, again) for (ratio, keep), (again, _) in zip(paired, others)
            if keep or unfiltered]
    return (sorted(r for r, _ in kept), sorted(a for _, a in kept), len(paired) - len(kept),
            unfiltered)
