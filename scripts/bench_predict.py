#!/usr/bin/env python3
"""Benchmark of nn-Meter calibration: accuracy on held-out subnets measured on the device.

Calibrates nn-Meter to a device (default `local`) on N measured subnets of the built-in
space and reports, on M other subnets measured on the same device in the same run:
+-5% / +-10% accuracy, RMSPE and Kendall tau of the raw kernel-sum prediction and of the
calibrated one, side by side, beside the bound the device itself sets (the held-out subnets
measured a second time, compared with the first), and what a prediction costs per subnet.
Target: +-10% accuracy >= 95% after calibration on 100 subnets (100 held out).

Usage: python scripts/bench_predict.py [--samples 100] [--holdout 100] [--device local]
       [--space harness.spaces:ProxylessSpace] [--min-time-ms 1000] [--home DIR]
Runs in a new HARNESS_HOME unless --home is given (so it measures afresh).
"""
import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.accuracy import accuracy_metrics, render_report  # noqa: E402
from harness.calibrate import calibrate  # noqa: E402
from harness.export import export_sample  # noqa: E402
from harness.predict import NnMeterProfiler  # noqa: E402
from harness.profiler import LatencyProfiler  # noqa: E402
from harness.space import load_space, random_samples  # noqa: E402

TARGET_ACC10 = 0.95


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--device", default="local")
    parser.add_argument("--space", default="harness.spaces:ProxylessSpace")
    parser.add_argument("--min-time-ms", type=float, default=1000.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", help="HARNESS_HOME to use (default: a new temporary folder, "
                                       "kept so the scatter PNG can be looked at)")
    args = parser.parse_args()

    space = load_space(args.space)
    dummy = space.dummy_input()
    settings = {"min_time_ms": args.min_time_ms,
                "max_time_ms": max(20000.0, 2 * args.min_time_ms)}
    home = Path(args.home or tempfile.mkdtemp(prefix="bench-predict-"))
    started = time.monotonic()
    result = calibrate(space, dummy, args.device, args.samples, args.holdout,
                       space_name=args.space, seed=args.seed, settings=settings,
                       home=home, progress=True)
    calibrate_s = time.monotonic() - started

    # Cost of one prediction: kernel detection and regressors, on an exported subnet.
    predictor = NnMeterProfiler(space, dummy, calibration=result.calibration)
    predict_s = []
    for sample in random_samples(space, 10, seed=args.seed + 7):
        exported = export_sample(space, sample, dummy)
        begun = time.perf_counter()
        predictor.predict_exported(exported)
        predict_s.append(time.perf_counter() - begun)

    # How well the device agrees with itself: the held-out subnets measured a second time.
    # No predictor can beat this bound on +-10% accuracy.
    held = json.loads((result.folder / "holdout.json").read_text())
    with LatencyProfiler(space, dummy, args.device, settings=settings, home=home,
                         refresh=True) as profiler:
        again = profiler.measure_many([json.loads(s) for s in held["samples"]], progress=True)
    report = dict(result.report)
    report["re-measured (bound)"] = accuracy_metrics([m.median for m in again],
                                                      held["measured_ms"])
    calibrated = report["calibrated"]
    print(f"\nnn-Meter on {args.device}, {args.space}: calibrated on {args.samples} measured "
          f"subnets, evaluated on {args.holdout} held-out subnets measured in the same run\n")
    print(render_report(report))
    raw_name = next(name for name in report if name.startswith("nn-Meter"))
    raw = report[raw_name]
    print(f"\n{'metric':34} {'raw':>9} {'calibrated':>11} {'ratio':>7}")
    for key, label in (("acc10", "+-10% accuracy"), ("acc5", "+-5% accuracy")):
        ratio = calibrated[key] / raw[key] if raw[key] else float("inf")
        print(f"{label:34} {raw[key]:>9.1%} {calibrated[key]:>11.1%} {ratio:>7.2f}")
    print(f"{'RMSPE':34} {raw['rmspe']:>8.1f}% {calibrated['rmspe']:>10.1f}% "
          f"{calibrated['rmspe'] / raw['rmspe']:>7.2f}")
    measured = [measured for _, measured in result.holdout_points["calibrated"]]
    print(f"\nheld-out measured medians: {min(measured):.2f}-{max(measured):.2f} ms "
          f"(median {statistics.median(measured):.2f} ms)")
    print(f"correction: {result.calibration.kind}, a={result.calibration.intercept:.4f}, "
          f"b={result.calibration.slope:.4f}")
    print(f"prediction per subnet (after export): {statistics.median(predict_s) * 1e3:.1f} ms "
          f"median; whole calibration {calibrate_s:.0f} s")
    verdict = "met" if calibrated["acc10"] >= TARGET_ACC10 else "NOT met"
    print(f"target +-10% accuracy >= {TARGET_ACC10:.0%} after calibration: {verdict} "
          f"({calibrated['acc10']:.1%})")
    if result.png:
        print(f"scatter: {result.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
