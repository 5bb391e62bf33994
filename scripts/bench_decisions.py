#!/usr/bin/env python3
"""Device time per decision, side by side in one run: the fixed loop, precision stopping
(stop="ci"), limit-aware decisions, and limit-aware decisions with the device's latency model,
on `local` and on a test-farm board (an SSH board in a network namespace; needs root).

Ground truth is today's fixed loop (>= 50 runs and >= 1 s) on every subnet. Limits sit at
the population's p20, median and p80. Per device and strategy the table gives device-seconds
over the whole sweep (3 limits), the speed-up over the fixed loop, agreement with the ground
truth, and the worst disagreement's distance from the limit in units of the ground truth's
own 95% interval of the median (<= 1: the limit lies inside it, the truth itself cannot tell).
Then: the run-to-run CV of the median, pinned to one CPU, for fixed and ci-stopped loops; and
the latency model's held-out coverage and cost per prediction.

Every strategy starts from a cache holding the sample index but no measurement, so no
strategy reads another's results.

Usage: sudo python3 scripts/bench_decisions.py [--samples 300] [--size 64] [--no-board]
"""
import argparse
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

from benchlib import load_testfarm  # also puts the repository on sys.path

import numpy as np  # noqa: E402
import torch  # noqa: E402

from devices import registry  # noqa: E402
from harness import LatencyProfiler, random_samples  # noqa: E402
from harness.predict.latency_model import LatencyModel, featurizer  # noqa: E402
from harness.spaces.space import SampleValidator, checked_search_space  # noqa: E402
from harness.spaces import ProxylessSpace  # noqa: E402

CONFIDENCE = 0.99
PINNED = [1]
CI_MAX_TIME_MS = 20000.0  # --ci-max-time-ms
CV_SUBNETS = 5


def empty_copy(index: Path, folder: Path, name: str) -> Path:
    """A copy of the cache with its sample index and devices, but no result."""
    path = folder / f"{name}.sqlite"
    shutil.copyfile(index, path)
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM measurements")
        conn.execute("DELETE FROM decisions")
    return path


def run_device(device: str, home: Path, folder: Path, index: Path, space: Any, dummy: Any,
               samples: List[Dict[str, Any]]) -> Dict[str, Any]:
    def profiler(cache: Path, **settings: Any) -> LatencyProfiler:
        return LatencyProfiler(space, dummy, device=device, home=home, cache=cache,
                               settings=dict({"protocol": "loop"}, **settings))

    out: Dict[str, Any] = {"device": device}
    with profiler(empty_copy(index, folder, f"{device}-fixed")) as p:
        truth = p.measure_many(samples, progress=False)
    medians = np.array([m.median for m in truth])
    halves = np.array([max(m.median - m.median_interval()[0], m.median_interval()[1] - m.median)
                       for m in truth])
    limits = [float(np.percentile(medians, q)) for q in (20, 50, 80)]
    out["limits"] = limits
    out["median_ms"] = float(np.median(medians))
    fixed_s = sum(m.device_s for m in truth)

    def score(name: str, device_s: float, below: List[List[bool]]) -> None:
        agree, worst = 0, 0.0
        for limit, answers in zip(limits, below):
            for answer, median, half in zip(answers, medians, halves):
                if answer == (median < limit):
                    agree += 1
                else:
                    worst = max(worst, abs(median - limit) / max(half, 1e-9))
        total = len(limits) * len(samples)
        out.setdefault("rows", []).append((name, device_s, fixed_s / device_s, agree / total,
                                           total - agree, worst))

    score("fixed loop (ground truth)", fixed_s, [[m < limit for m in medians] for limit in limits])
    with profiler(empty_copy(index, folder, f"{device}-ci"), stop="ci",
                  max_time_ms=CI_MAX_TIME_MS) as p:
        ci = p.measure_many(samples, progress=False)
    score("stop=ci (+-1%)", sum(m.device_s for m in ci),
          [[m.median < limit for m in ci] for limit in limits])
    out["ci_runs"] = float(np.median([m.n for m in ci]))
    out["fixed_runs"] = float(np.median([m.n for m in truth]))
    out["fixed_rhw"] = float(np.median([m.relative_half_width for m in truth]))
    out["ci_reasons"] = dict(Counter((m.provenance.stop or {}).get("reason") for m in ci))
    out["ci_drift"] = sum(bool((m.provenance.stop or {}).get("drift")) for m in ci)
    for name, use_model in (("limit-aware", False), ("limit-aware + model", True)):
        with profiler(empty_copy(index, folder, f"{device}-{use_model}")) as p:
            p.decider.use_model = use_model
            answers, spent = [], 0.0
            for limit in limits:
                decisions = p.decide_many(samples, limit, CONFIDENCE, progress=False)
                answers.append([d.below for d in decisions])
                spent += sum(d.device_s for d in decisions)
            if use_model:
                out["audit"] = p.decider.audit.report()
                out["model_note"] = p.decider.model_note
                out["predicted"] = sum(d.source == "predicted" for d in decisions)
        score(name, spent, answers)
    out["cv"] = run_to_run_cv(profiler, index, folder, device, samples[:CV_SUBNETS])
    out["model"] = model_quality(space, dummy, samples, medians)
    return out


def run_to_run_cv(profiler: Any, index: Path, folder: Path, device: str,
                  samples: List[Dict[str, Any]], repeats: int = 5) -> Dict[str, float]:
    """CV of the median over repeated measurements of the same subnets, pinned to one CPU."""
    cvs: Dict[str, float] = {}
    for rule in ("fixed", "ci"):
        per_subnet = []
        for sample in samples:
            medians = []
            for repeat in range(repeats):
                with profiler(empty_copy(index, folder, f"{device}-cv-{rule}-{repeat}"),
                              stop=rule, cpu_affinity=PINNED,
                              max_time_ms=CI_MAX_TIME_MS if rule == "ci" else 20000.0) as p:
                    medians.append(p.measure(sample).median)
            per_subnet.append(statistics.stdev(medians) / statistics.mean(medians))
        cvs[rule] = float(np.mean(per_subnet))
    return cvs


def model_quality(space: Any, dummy: Any, samples: List[Dict[str, Any]],
                  medians: np.ndarray) -> Dict[str, float]:
    """The latency model fitted on half the ground truth: coverage on the other half at 90%
    and 95%, and the cost of one prediction."""
    labels = SampleValidator(checked_search_space(space)).labels
    half = len(samples) // 2
    model = LatencyModel(featurizer(space, dummy, labels))
    model.fit(samples[:half], list(medians[:half]))
    quality: Dict[str, float] = {}
    for coverage in (0.9, 0.95):
        hits = [p.low_ms <= m <= p.high_ms for p, m in
                ((model.predict(s, coverage), m) for s, m in zip(samples[half:], medians[half:]))
                if p is not None]
        quality[f"coverage@{coverage:.0%}"] = sum(hits) / len(hits) if hits else float("nan")
    started = time.perf_counter()
    for sample in samples[half:]:
        model.predict(sample, 0.95)
    quality["predict_ms"] = (time.perf_counter() - started) / (len(samples) - half) * 1e3
    return quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="input size in px (default 64)")
    parser.add_argument("--no-board", action="store_true", help="local only (no root needed)")
    parser.add_argument("--ci-max-time-ms", type=float, default=20000.0,
                        help="cap of the ci-stopped loop (default 20000, as the fixed loop's)")
    parser.add_argument("--cv-subnets", type=int, default=5)
    args = parser.parse_args()
    global CI_MAX_TIME_MS, CV_SUBNETS
    CI_MAX_TIME_MS, CV_SUBNETS = args.ci_max_time_ms, args.cv_subnets
    folder = Path(tempfile.mkdtemp(prefix="harness-bench-decisions-"))
    home = folder / "home"
    space, dummy = ProxylessSpace(), torch.randn(1, 3, args.size, args.size)
    samples = random_samples(space, args.samples, seed=12)
    started = time.monotonic()
    index = folder / "index.sqlite"
    with LatencyProfiler(space, dummy, home=home, cache=index) as p:
        for sample in samples:  # the sample index every strategy starts from
            p.graph_hash(sample)
    devices = ["local"]
    board = None
    if not args.no_board:
        testfarm = load_testfarm()
        key = testfarm.make_client_key(folder / "client")
        board = testfarm.Board(30, folder, key).start()
        registry.add_device(home, registry.DeviceConfig(
            name="board30", transport="ssh", address=f"root@{board.address}", key=str(key),
            python=sys.executable, workdir=board.workdir, lock=board.workdir + ".lock"))
        registry.trust_device(home, "board30", lambda *_: True)
        devices.append("board30")
    results = []
    try:
        for device in devices:  # each device's table as soon as it is done
            results.append(run_device(device, home, folder, index, space, dummy, samples))
            print_results(results[-1:], args, started)
    finally:
        if board is not None:
            board.destroy()
    if len(results) > 1:
        print_results(results, args, started)


def print_results(results: List[Dict[str, Any]], args: argparse.Namespace,
                  started: float) -> None:
    print(f"{'device':<9}{'strategy':<27}{'device-s':>9}{'speed-up':>9}{'agree':>9}"
          f"{'wrong':>6}{'worst/CI':>9}")
    print("-" * 78)
    for result in results:
        for name, spent, speedup, agree, wrong, worst in result["rows"]:
            print(f"{result['device']:<9}{name:<27}{spent:>9.1f}{speedup:>8.1f}x"
                  f"{agree:>9.2%}{wrong:>6}{worst:>9.2f}")
    print()
    for result in results:
        cv, model = result["cv"], result["model"]
        print(f"{result['device']}: limits {', '.join(f'{x:.3f}' for x in result['limits'])} ms "
              f"(p20, p50, p80); median runs per subnet: fixed {result['fixed_runs']:.0f}, "
              f"ci {result['ci_runs']:.0f}")
        print(f"  the fixed loop's own 95% interval of the median: +-{result['fixed_rhw']:.1%} "
              f"(median over subnets); ci loops stopped by {result['ci_reasons']}, "
              f"{result['ci_drift']} flagged drifting")
        print(f"  run-to-run CV of the median, pinned to CPU {PINNED}: fixed "
              f"{cv['fixed']:.2%}, ci {cv['ci']:.2%} (target: ci at most 0.5 points above)")
        print(f"  latency model held out: coverage {model['coverage@90%']:.1%} at 90%, "
              f"{model['coverage@95%']:.1%} at 95%; {model['predict_ms']:.3f} ms per prediction; "
              f"in the sweep: {result['model_note']}, {result['predicted']} predicted at the "
              f"last limit, audit {result['audit']}")
    print(f"\n{args.samples} ProxylessSpace subnets at {args.size} px, confidence {CONFIDENCE}, "
          f"ci loop capped at {CI_MAX_TIME_MS:.0f} ms; "
          f"targets: ci >= 3x less device time than fixed; limit-aware + model >= 10x, >= 99.5% "
          f"agreement, every disagreement within the truth's own interval (worst/CI <= 1); "
          f"{time.monotonic() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
