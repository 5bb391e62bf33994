"""The truth the accuracy benchmarks score against: each subnet's quiet-state latency from a
long interleaved campaign, with its own 95% interval and its re-measurement floor.

A campaign times the subnets in interleaved rounds beside the reference (harness's rounds
protocol) for at least `seconds` of device time per subnet (its own blocks; the reference's
come on top), in several passes that each load the models afresh (see `campaign`: a loaded
model's speed is a draw of its own), and keeps its results in cache files of its own, so a
later run of a benchmark reuses them (the campaign is by far the longest part). The floor is a second,
independent campaign on a subset (another cache, another seed): how far the truth itself
moves when measured again. Every table prints it beside its figures.

On a simulated device the truth is known exactly (the graph's latency at the trace's quiet
level): `exact_truth` gives it, and no campaign is needed.
"""
import math
import random
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from harness import LatencyProfiler

BLOCK_MS = 20.0
TRUTH_SETTINGS = {"protocol": "rounds", "stop": "fixed", "block_ms": BLOCK_MS,
                  "ref_gap_ms": 150.0, "cpu_affinity": None}


@dataclass(frozen=True)
class Truth:
    """One subnet's quiet-state latency (ms) and its interval (the range over the passes of
    a campaign; a simulated device's truth is exact), and the reference level (ms) it was
    converted with: quiet_ms / level_ms is its ratio to the reference."""

    quiet_ms: float
    low_ms: float
    high_ms: float
    level_ms: float = 1.0

    @property
    def half_width(self) -> float:
        """Half the interval over the value (0.01: +-1%)."""
        return (self.high_ms - self.low_ms) / 2 / self.quiet_ms


def pass_caches(cache: Path, passes: int = 5) -> List[Path]:
    """The cache files of a campaign's passes, named for the agent's version: one version's
    measurements do not answer another's, and its reference blocks (which history_level
    reads whatever their settings) must not mix with another's, read by another clock."""
    from agents.ort_agent import AGENT_VERSION

    return [cache.with_name(f"{cache.stem}-agent{AGENT_VERSION}-pass{n}{cache.suffix}")
            for n in range(passes)]


def campaign(space: Any, dummy: Any, samples: Sequence[Dict[str, Any]], *, device: str,
             home: Path, cache: Path, seconds: float, seed: int = 0, passes: int = 5,
             settings: Optional[Dict[str, Any]] = None) -> List[Truth]:
    """Each sample's truth, from `passes` campaigns of seconds / passes each (their caches
    beside `cache`; measured there first where they are not yet): the median over the
    passes of each subnet's ratio to the reference, times one reference level (the quiet
    level of the newest reference blocks of the passes, as a device's history keeps them:
    REFERENCE_HISTORY blocks, all from the last pass where it alone records that many; the
    level a strategy starting from this history reads its limits by).

    Why passes: each pass loads every model afresh, and a loaded model's speed is a draw of
    its own that holds for as long as it stays loaded (memory placement: six sessions of one
    subnet in one process, interleaved, ran up to 5.8% apart). One long window measures its
    draw very precisely (a 95% interval of +-0.1%) and moves 2% when loaded again; the
    median of several loads does not. Why one level: the reference's quiet level drifted by
    4-7% over the twenty minutes of a campaign on this host, while ratios held within 1%."""
    ratios: List[List[float]] = []
    for n, path in enumerate(pass_caches(cache, passes)):
        ratios.append(_one_pass(space, dummy, samples, device=device, home=home, cache=path,
                                seconds=seconds / passes, seed=seed * 1000 + n,
                                settings=settings))
    level = history_level(pass_caches(cache, passes))
    out = []
    for values in zip(*ratios):
        ordered = sorted(values)
        out.append(Truth(float(np.median(ordered)) * level, ordered[0] * level,
                         ordered[-1] * level, level))
    return out


def window_runs(cache: Path) -> Dict[str, int]:
    """{window, as a cache's reference history names it (its lease's start): the k its
    reference ran at} of a cache's measurements in rounds."""
    with closing(sqlite3.connect(f"file:{cache}?mode=ro", uri=True)) as conn:
        rows = conn.execute("SELECT json_extract(record, '$.provenance.lease[0]'), "
                            "json_extract(record, '$.rounds.reference_k') FROM measurements")
        return {f"{began:.6f}": int(k) for began, k in rows if began is not None and k is not None}


def history_block_runs(caches: Sequence[Path]) -> int:
    """The timed runs per block (k) the reference ran at in most of these caches' windows
    (0 if none says): the part of the campaign's history a profiler reads, as it keys it
    (harness.steps.measuring.reference_history_key)."""
    runs = [k for cache in caches for k in window_runs(cache).values()]
    return max(set(runs), key=runs.count) if runs else 0


def history_windows(cache: Path, block_runs: int) -> List[str]:
    """The windows of a cache whose reference ran at `block_runs` per block."""
    return [window for window, k in window_runs(cache).items() if k == block_runs]


def history_level(caches: Sequence[Path]) -> float:
    """The reference's quiet level over the newest blocks of these caches together, at the
    k of most of their windows, as harness reads a device's history
    (harness.store.cache.Cache.reference_level: one k's blocks)."""
    from harness.store.cache import REFERENCE_HISTORY
    from harness.store.rounds import LEVEL_QUANTILE, quantile

    runs = history_block_runs(caches)
    rows: List[Tuple[float, float]] = []
    for path in caches:
        windows = set(history_windows(path, runs))
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            rows += [(when, value) for window, when, value in conn.execute(
                "SELECT window, created_at, value FROM reference_blocks") if window in windows]
    newest = [value for _, value in sorted(rows)[-REFERENCE_HISTORY:]]
    return quantile(newest, LEVEL_QUANTILE)


def _one_pass(space: Any, dummy: Any, samples: Sequence[Dict[str, Any]], *, device: str,
              home: Path, cache: Path, seconds: float, seed: int,
              settings: Optional[Dict[str, Any]]) -> List[float]:
    """One pass: rounds enough for `seconds` of each subnet's own device time; each
    sample's ratio to the reference."""
    rounds = max(int(math.ceil(seconds * 1e3 / BLOCK_MS)), 30)
    chosen = dict(TRUTH_SETTINGS, **(settings or {}), rounds=rounds, seed=seed,
                  max_time_ms=seconds * 4e3)
    if chosen["max_time_ms"] < 1000.0:  # a short pass: below the agent's default min_time_ms
        chosen["min_time_ms"] = 0.0
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)  # other companions in each window, pass by pass
    with LatencyProfiler(space, dummy, device=device, home=home, cache=cache,
                         settings=chosen, statistic="quiet", timeout_s=seconds * 20 + 60
                         ) as profiler:
        measured = profiler.measure_many([samples[i] for i in order], progress=False)
    values = [0.0] * len(samples)
    for i, m in zip(order, measured):
        values[i] = m.statistic("ratio")
    return values


def floor(first: Sequence[Truth], again: Sequence[Truth]) -> Dict[str, float]:
    """How the truth moves when measured again: shares of subnets within 1% and 2%, the
    median difference and Kendall's tau between the two campaigns, in units of the
    reference (what a decision is read in); and how far the two campaigns' reference
    levels lie apart (what a number in ms moves besides)."""
    from scipy.stats import kendalltau

    ratios = [abs((b.quiet_ms / b.level_ms) / (a.quiet_ms / a.level_ms) - 1)
              for a, b in zip(first, again)]
    tau = kendalltau([t.quiet_ms for t in first], [t.quiet_ms for t in again])[0] \
        if len(ratios) > 2 else float("nan")
    return {"subnets": len(ratios), "within_1": float(np.mean([r <= 0.01 for r in ratios])),
            "within_2": float(np.mean([r <= 0.02 for r in ratios])),
            "median_diff": float(np.median(ratios)), "tau": float(tau),
            "half_width": float(np.median([t.half_width for t in first])),
            "levels": again[0].level_ms / first[0].level_ms - 1 if first else 0.0}


def recheck(space: Any, dummy: Any, samples: Sequence[Dict[str, Any]],
            truths: Sequence[Truth], *, device: str, home: Path, cache: Path, seconds: float,
            settings: Optional[Dict[str, Any]] = None) -> str:
    """How far the truth lies from one window now (one pass of `seconds` per subnet, in a
    worker of its own): the shift of each subnet's ratio to the reference, as a line for a
    table. A truth measured hours before, and one window's draw of the device (its
    worker's loads, the device's mix of work), move every ratio of a window alike: a
    decision made in one window lies about as far from the truth, in its own draw."""
    now = _one_pass(space, dummy, samples, device=device, home=home, cache=cache,
                    seconds=seconds, seed=7, settings=settings)
    shifts = np.array([ratio / (t.quiet_ms / t.level_ms) - 1 for ratio, t in zip(now, truths)])
    p10, p50, p90 = np.percentile(shifts, [10, 50, 90])
    return (f"the truth re-checked now in one window per subnet ({len(shifts)} subnets, "
            f"{seconds:g} s each): shift median {p50:+.2%} (p10 {p10:+.2%}, p90 {p90:+.2%}), "
            f"{np.mean(abs(shifts) <= 0.02):.0%} within 2%")


def exact_truth(spec: Any, sha256s: Sequence[str]) -> List[Truth]:
    """The truth on a simulated device (devices.simulated.SimulatedModel): exact."""
    return [Truth(v, v, v, 1.0) for v in (spec.graph_median_ms(sha) for sha in sha256s)]


def floor_text(result: Dict[str, float]) -> str:
    if not result:
        return "exact (simulated)"
    return (f"{result['within_2']:.0%} within 2% ({result['within_1']:.0%} within 1%, median "
            f"{result['median_diff']:.2%}, tau {result['tau']:.3f}, {result['subnets']:.0f} "
            f"subnets, in units of the reference; the passes' range +-"
            f"{result['half_width']:.2%}; the two campaigns' reference levels "
            f"{result['levels']:+.1%} apart)")
