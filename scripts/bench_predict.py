#!/usr/bin/env python3
"""Benchmark of nn-Meter calibration: accuracy on held-out subnets measured on the device.

Calibrates nn-Meter to a device (default `local`) on N measured subnets of the built-in
space and reports, on M other subnets measured on the same device in the same run:
+-5% / +-10% accuracy, RMSPE and Kendall tau of the raw kernel-sum prediction and of the
calibrated one, side by side, beside the bound the device itself sets (the held-out subnets
measured a second time, compared with the first), and what a prediction costs per subnet.
Targets: +-10% accuracy >= 95% after calibration on 100 subnets (100 held out), Kendall tau
no lower than the device's own re-measurement tau minus 0.03, and a prediction (after export)
in at most 10 ms per subnet. The prediction cost is reported four ways: a subnet never seen,
detected whole (nn-Meter's kernel detection runs, as for any exported model; the per-kernel
predictions are memoized from the subnets seen before); a subnet never seen of a space with
per-block terms, predicted from the pieces it was composed of (each piece detected once); a
subnet whose graph was seen (detection memoized, as in a search that revisits
architectures); and the uncached cost of the first subnet.

--arm64 starts an emulated arm64 board of the test farm (scripts/testfarm; needs root),
registers it as device `arm64` in the bench's HARNESS_HOME, calibrates on it and destroys it.
It is 100-500x slower than this machine: use a small input (--input-size 32) and short
--min-time-ms / --min-runs.

--runtime litert calibrates nn-Meter's TFLite CPU predictor (--predictor, default
cortexA76cpu_tflite21) to LiteRT measurements, and reports how the raw and calibrated
predictors rank the held-out subnets as measured on LiteRT and, beside, on onnxruntime.

Scored against the truth (scripts/benchtruth.py) too: the held-out subnets' quiet-state
latency from a long interleaved campaign (--truth-s of device time per subnet, kept in
--truth-dir for later runs, measured with the same runtime and session settings), each in
the reference level its calibration measurement was read with (the truth's ratio to the
reference times that level: a level that drifts between the two campaigns is not a
prediction error). Its floor, a second campaign on every 4th held-out subnet, is printed
beside; both are written to truth.json beside the held-out subnets (bench_transfer.py scores
against it). Subnets are measured in interleaved rounds (the default protocol) and calibrated to
the quiet-state latency unless --statistic says otherwise; --neighbour starts the
benchmarks' noisy neighbour for the whole run.

Usage: python scripts/bench_predict.py [--samples 100] [--holdout 100] [--device local]
       [--runtime onnxruntime|litert|executorch|openvino] [--predictor NAME]
       [--space harness.spaces:ProxylessSpace] [--input-size PX] [--min-time-ms 1000]
       [--min-runs N]
       [--opt-level disabled|basic|extended|all] [--statistic quiet|median|min] [--arm64]
       [--truth-s 4] [--truth-dir DIR] [--neighbour other-cores|same-core] [--home DIR]
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

from benchlib import Arm64Board, Neighbour, space_at_input  # noqa: E402
from benchtruth import campaign, floor, floor_text  # noqa: E402
from devices.safe_files import replace_text  # noqa: E402
from harness.predict.accuracy import accuracy_metrics, render_report  # noqa: E402
from harness.campaigns.calibrate import calibrate  # noqa: E402
from harness.export.graph import export_sample  # noqa: E402
from harness.predict.nn_meter import NnMeterProfiler  # noqa: E402
from harness.profiler import LatencyProfiler  # noqa: E402
from harness.spaces.space import random_samples  # noqa: E402

TARGET_ACC10 = 0.95
TARGET_TAU_GAP = 0.03
TARGET_PREDICT_MS = 10.0   # any exported graph never seen
TARGET_COMPOSED_MS = 1.0   # a never-seen subnet composed from its pieces
def prediction_costs(predictor: NnMeterProfiler, space: object, dummy: object,
                     seed: int) -> dict:
    """Median ms per subnet after export: never-seen subnets detected whole (what any
    exported model costs) and predicted from their pieces (a composed subnet of a space with
    per-block terms), both after 20 others warmed the memos; the same graphs again
    (detection memoized); and the very first subnet."""
    exported = [export_sample(space, sample, dummy)
                for sample in random_samples(space, 40, seed=seed)]

    def timed(models: list, whole: bool) -> list:
        costs = []
        for model in models:
            begun = time.perf_counter()
            if whole:
                predictor.predictor.predict(model.onnx_bytes, model.variant_key)
            else:
                predictor.predict_exported(model)
            costs.append((time.perf_counter() - begun) * 1e3)
        return costs
    first = timed(exported[:1], whole=True)
    timed(exported[1:20], whole=False)  # a search's first candidates: kernels it meets again
    new_whole = timed(exported[20:30], whole=True)
    new_composed = timed(exported[30:40], whole=False)
    seen = timed(exported[20:30], whole=True)
    return {"first subnet (nothing memoized)": first[0],
            "new subnet, whole graph (any model)": statistics.median(new_whole),
            "new subnet, composed (by its pieces)" if exported[0].pieces else
            "new subnet (not composed: whole graph)": statistics.median(new_composed),
            "seen graph (detection memoized)": statistics.median(seen)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--holdout", type=int, default=100)
    parser.add_argument("--device", default="local")
    parser.add_argument("--space", default="harness.spaces:ProxylessSpace")
    parser.add_argument("--input-size", type=int,
                        help="input height and width, for a space whose class takes "
                             "input_size (the built-in ones): a small one for slow boards")
    parser.add_argument("--min-time-ms", type=float, default=1000.0)
    parser.add_argument("--min-runs", type=int, help="runs per subnet at least")
    parser.add_argument("--opt-level", choices=("disabled", "basic", "extended", "all"),
                        help="onnxruntime graph optimisation level (default: the agent's, all): "
                             "another level is a cache-distinct device for scripts/bench_transfer.py")
    parser.add_argument("--arm64", action="store_true",
                        help="start an emulated arm64 board and calibrate on it")
    parser.add_argument("--statistic", choices=("quiet", "median", "min", "mean", "p90"),
                        default="quiet",
                        help="what is calibrated to and compared of each subnet's runs "
                             "(quiet: the quiet-state latency of interleaved rounds; the "
                             "others: a loop's)")
    parser.add_argument("--truth-s", type=float, default=4.0,
                        help="device time per held-out subnet of the truth campaign")
    parser.add_argument("--truth-dir", type=Path,
                        default=Path.home() / ".cache" / "harness-bench")
    parser.add_argument("--neighbour", choices=("other-cores", "same-core"),
                        help="the benchmarks' noisy neighbour, on for the whole run")
    parser.add_argument("--runtime", default="onnxruntime",
                        choices=("onnxruntime", "litert", "executorch", "openvino"),
                        help="the runtime the subnets are measured and calibrated on; with "
                             "another than onnxruntime, the official --predictor is corrected "
                             "(no device kernels: they are ONNX models), and the held-out "
                             "subnets are measured on onnxruntime too, to rank them side by side")
    parser.add_argument("--predictor", help="official nn-Meter predictor to correct (default "
                                            "with --runtime litert: cortexA76cpu_tflite21)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--home", help="HARNESS_HOME to use (default: a new temporary folder, "
                                       "kept so the scatter PNG can be looked at)")
    args = parser.parse_args()

    space, args.space = space_at_input(parser, args.space, args.input_size)
    dummy = space.dummy_input()
    settings = {"min_time_ms": args.min_time_ms,
                "max_time_ms": max(20000.0, 2 * args.min_time_ms)}
    if args.statistic != "quiet":  # a loop's statistic
        settings["protocol"] = "loop"
    else:  # rounds: a window's budget per candidate, as bench_noise gives it
        settings.update(min_time_ms=0.0, max_time_ms=0.9 * args.min_time_ms, rounds=100000)
    if args.neighbour:  # the agent on CPU 0, the neighbour on CPU 1 (other-cores) or 0
        settings["cpu_affinity"] = [0]
    if args.opt_level:
        settings["graph_optimization_level"] = args.opt_level
    if args.min_runs:
        settings.update(min_runs=args.min_runs, warmup_runs=min(args.min_runs, 3))
    if args.runtime != "onnxruntime":
        settings["runtime"] = args.runtime
        args.predictor = args.predictor or "cortexA76cpu_tflite21"
    home = Path(args.home or tempfile.mkdtemp(prefix="bench-predict-"))
    args.truth_dir.mkdir(parents=True, exist_ok=True)
    with Neighbour({None: None, "other-cores": "1", "same-core": "0"}[args.neighbour]):
        if not args.arm64:
            return run(args, space, dummy, settings, home, args.device)
        with Arm64Board() as board:
            return run(args, space, dummy, settings, home, board.register(home))


def truth_rows(args: argparse.Namespace, space: object, dummy: object, device: str,
               home: Path, samples: list, levels_ms: list, predicted: dict,
               pinned: dict) -> dict:
    """Each predictor's accuracy against the held-out subnets' truth (each in the reference
    level its calibration measurement was read with), and the truth's floor line."""
    session = "-".join(str(pinned[key]) for key in ("runtime", "graph_optimization_level")
                       if key in pinned)  # measured on another runtime or level: another truth
    name = (f"predict-{'arm64' if args.arm64 else device}-{type(space).__name__}-"
            f"{dummy.shape[-1]}px-{args.truth_s:g}s-{args.seed}{'-' + session if session else ''}")
    truths = campaign(space, dummy, samples, device=device, home=home, seconds=args.truth_s,
                      cache=args.truth_dir / f"truth-{name}.sqlite", settings=pinned)
    subset = list(range(0, len(samples), 4))
    again = campaign(space, dummy, [samples[i] for i in subset], device=device, home=home,
                     seconds=args.truth_s, cache=args.truth_dir / f"floor-{name}.sqlite", seed=1,
                     settings=pinned)
    truth_ms = [t.quiet_ms / t.level_ms * level for t, level in zip(truths, levels_ms)]
    rows = {f"{label} vs truth": accuracy_metrics(points, truth_ms)
            for label, points in predicted.items()}
    floor_figures = floor([truths[i] for i in subset], again)
    return {"rows": rows, "floor": floor_figures, "floor_text": floor_text(floor_figures),
            "truth_ms": truth_ms}


def run(args: argparse.Namespace, space: object, dummy: object, settings: dict, home: Path,
        device: str) -> int:
    started = time.monotonic()
    result = calibrate(space, dummy, device, args.samples, args.holdout,
                       space_name=args.space, seed=args.seed, settings=settings,
                       home=home, progress=True, statistic=args.statistic,
                       predictor=args.predictor)
    calibrate_s = time.monotonic() - started
    costs = prediction_costs(NnMeterProfiler(space, dummy, calibration=result.calibration),
                             space, dummy, args.seed + 7)

    # How well the device agrees with itself: the held-out subnets measured a second time.
    # No predictor can beat this bound on +-10% accuracy.
    held = json.loads((result.folder / "holdout.json").read_text())
    held_samples = [json.loads(s) for s in held["samples"]]
    levels_ms = None
    if args.statistic == "quiet":  # the levels the calibration's held-out measurements were
        # read with: its own results, from the cache, before they are measured again below
        with LatencyProfiler(space, dummy, device, settings=settings, home=home) as profiler:
            levels_ms = [m.provenance.reference_level_ms
                         for m in profiler.measure_many(held_samples, progress=False)]
    with LatencyProfiler(space, dummy, device, settings=settings, home=home,
                         refresh=True) as profiler:
        again = profiler.measure_many(held_samples, progress=True)

    report = dict(result.report)
    report["re-measured (bound)"] = accuracy_metrics(
        [m.statistic(args.statistic) for m in again], held["measured_ms"])
    raw_points = next(points for name, points in result.holdout_points.items()
                      if name.startswith("nn-Meter"))
    truth = truth_rows(args, space, dummy, device, home, held_samples, levels_ms,
                       {"calibrated": [p for p, _ in result.holdout_points["calibrated"]],
                        "raw": [p for p, _ in raw_points]},
                       {key: settings[key] for key in ("cpu_affinity", "runtime",
                                                       "graph_optimization_level")
                        if key in settings}) if levels_ms else None
    truth_file = result.folder / "truth.json"  # for bench_transfer.py to score against
    truth_file.unlink(missing_ok=True)  # an earlier run's truth is no truth of this one
    if truth:
        report.update(truth["rows"])
        replace_text(truth_file, json.dumps({
            "samples": held["samples"], "truth_ms": truth["truth_ms"],
            "floor_text": truth["floor_text"], "truth_s": args.truth_s, "device": device,
            "statistic": args.statistic, "runtime": args.runtime,
            "calibrated_vs_truth": truth["rows"]["calibrated vs truth"]}))
    if args.runtime != "onnxruntime":  # the same held-out subnets on onnxruntime: how the
        # predictors rank them there against here (Kendall tau in the onnxruntime row)
        ort_settings = {k: v for k, v in settings.items() if k != "runtime"}
        with LatencyProfiler(space, dummy, device, settings=ort_settings, home=home) as ort:
            on_ort = ort.measure_many(held_samples, progress=True)
        predicted = [p for p, _ in result.holdout_points["calibrated"]]
        for label, points in (("calibrated vs onnxruntime", predicted),
                              ("raw vs onnxruntime", [p for p, _ in raw_points])):
            report[label] = accuracy_metrics(points, [m.statistic(args.statistic)
                                                      for m in on_ort])
    calibrated = report["calibrated"]
    print(f"\nnn-Meter on {device}, {args.space}: calibrated on {args.samples} measured "
          f"subnets, evaluated on {args.holdout} held-out subnets measured in the same run "
          f"(each subnet's {args.statistic} run)\n")
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
    print(f"\nheld-out subnets as measured ({args.statistic} run): {min(measured):.2f}-"
          f"{max(measured):.2f} ms (median {statistics.median(measured):.2f} ms)")
    print(f"correction: {result.calibration.kind}: measured = "
          f"{result.calibration.correction.formula()}")
    print(f"whole calibration {calibrate_s:.0f} s")
    print(f"\n{'prediction per subnet, after export':42} {'ms':>8}")
    for label, value in costs.items():
        print(f"{label:42} {value:>8.2f}")
    bound = report["re-measured (bound)"]
    checks = [
        (f"+-10% accuracy >= {TARGET_ACC10:.0%}", calibrated["acc10"] >= TARGET_ACC10,
         f"{calibrated['acc10']:.1%}"),
        (f"Kendall tau >= re-measured tau - {TARGET_TAU_GAP}",
         calibrated["kendall_tau"] >= bound["kendall_tau"] - TARGET_TAU_GAP,
         f"{calibrated['kendall_tau']:.3f} vs {bound['kendall_tau']:.3f}"),
        *[(f"prediction <= {limit:g} ms ({label})", costs[label] <= limit,
           f"{costs[label]:.2f} ms") for label in costs if label.startswith("new subnet")
          for limit in [TARGET_COMPOSED_MS if "composed" in label else TARGET_PREDICT_MS]],
        (f"prediction <= {TARGET_PREDICT_MS:.0f} ms (seen graph)",
         costs["seen graph (detection memoized)"] <= TARGET_PREDICT_MS,
         f"{costs['seen graph (detection memoized)']:.2f} ms")]
    if truth:
        against = report["calibrated vs truth"]
        checks += [
            (f"+-10% of the truth >= {TARGET_ACC10:.0%}", against["acc10"] >= TARGET_ACC10,
             f"{against['acc10']:.1%}"),
            (f"Kendall tau against the truth >= the truth's own (its floor's "
             f"{truth['floor']['subnets']:.0f} subnets) - {TARGET_TAU_GAP}",
             against["kendall_tau"] >= truth["floor"]["tau"] - TARGET_TAU_GAP,
             f"{against['kendall_tau']:.3f} vs {truth['floor']['tau']:.3f}")]
        print(f"\nthe truth: {args.truth_s:g} s of device time per held-out subnet, each in "
              f"the reference level its calibration measurement was read with "
              f"({min(levels_ms):.3f}-{max(levels_ms):.3f} ms); its floor: "
              f"{truth['floor_text']}")
    print()
    for label, ok, value in checks:
        print(f"target {label}: {'met' if ok else 'NOT met'} ({value})")
    if result.png:
        print(f"scatter: {result.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
