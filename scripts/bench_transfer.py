#!/usr/bin/env python3
"""Benchmark of transfer to a new device: another device's kernel predictors, corrected with
few measurements on the new one.

Reads two calibrations that `harness calibrate` (or scripts/bench_predict.py) stored: the
source device's (its kernel predictors, `calibrations/<source>/kernels`) and the target
device's (its measured training and held-out subnets, `training.json` / `holdout.json`, and
its own calibration's held-out report, for reference). For N = 10, 20, 50, 100 subnets
measured on the target (drawn from its training subnets, several draws each), the source's
kernel predictions are corrected two ways and scored on the target's held-out subnets:
- global: what `harness calibrate --device T --predictor <source>/kernels --no-kernels`
  stores (harness.campaigns.calibrate.fit_correction, chosen by leave-one-out): a scale,
  exp(a) * predicted^b, or a scale plus costs per kernel and per run ("overheads": a target
  that pays a cost per operator call the source does not, as an emulated board does); and
  the same without overheads (the correction before them);
- per type: one scale per kernel type (a conv costs relatively more on one CPU, an
  elementwise op on another), fitted by least squares on relative errors and shrunk towards
  the global scale (the shrinkage chosen by leave-one-out).
Prints the table of medians over the draws (+-5% / +-10% accuracy, RMSPE, Kendall tau) and
writes a PNG of +-10% accuracy against N. Target: >= 90% within +-10% after 20 measurements.
Where bench_predict.py measured the target's truth (truth.json beside its held-out subnets),
the held-out subnets are scored against it instead of their own measurements.

Usage: python scripts/bench_transfer.py --source-home DIR --source local
           --target-home DIR --target arm64 [--space harness.spaces:TinySpace]
           [--input-size PX] [--draws 5] [--png transfer.png] [--source-label TEXT]
           [--target-label TEXT]
"""
import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.predict.accuracy import accuracy_metrics  # noqa: E402
from harness.campaigns.calibrate import (NOT_ACTIVATED, corrected_or_miss,  # noqa: E402
                                         fit_correction)
from harness.export.graph import export_sample  # noqa: E402
from harness.predict.calibration import CALIBRATION_FILE, calibrations_folder  # noqa: E402
from harness.predict.nn_meter import load_predictor  # noqa: E402
from benchlib import space_at_input  # noqa: E402

COUNTS = (10, 20, 50, 100)
TARGET_ACC10 = 0.90
SHRINKAGE = (0.01, 0.1, 1.0, 10.0, 100.0)


def fit_type_scales(split: np.ndarray, measured: np.ndarray, shrink: float,
                    prior: float) -> np.ndarray:
    """Scales s (one per column of `split`, the per-type predictions) minimising the squared
    relative error of split @ s plus shrink * |s - prior|^2, kept non-negative."""
    a = split / measured[:, None]
    gram = a.T @ a
    weight = shrink * max(float(np.mean(np.diag(gram))), 1e-12)
    scales = np.linalg.solve(gram + weight * np.eye(len(gram)),
                             a.T @ np.ones(len(a)) + weight * prior)
    return np.clip(scales, 0.0, None)


def per_type_predictions(split: np.ndarray, measured: np.ndarray,
                         evaluate: np.ndarray) -> np.ndarray:
    """Per-type correction fitted on (split, measured), the shrinkage by leave-one-out."""
    totals = split.sum(axis=1)
    prior = float(np.exp(np.median(np.log(measured / totals))))
    best, best_error = SHRINKAGE[-1], math.inf
    for shrink in SHRINKAGE:
        errors = []
        for out in range(len(measured)):
            keep = np.arange(len(measured)) != out
            scales = fit_type_scales(split[keep], measured[keep], shrink, prior)
            errors.append((split[out] @ scales) / measured[out] - 1)
        error = float(np.sqrt(np.mean(np.square(errors))))
        if error < best_error:
            best, best_error = shrink, error
    return evaluate @ fit_type_scales(split, measured, best, prior)


def calibration_folder(home: Path, device: str) -> Path:
    """A device's stored calibration: the one in use, else the one calibrate() kept without
    making it the fallback (worse than its raw predictor on the held-out subnets: its
    kernels and measured subnets are what a transfer reads all the same)."""
    folder = calibrations_folder(home) / device
    kept = folder / NOT_ACTIVATED
    return kept if not (folder / CALIBRATION_FILE).exists() and kept.is_dir() else folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source-home", required=True)
    parser.add_argument("--source", default="local")
    parser.add_argument("--target-home", required=True)
    parser.add_argument("--target", default="arm64")
    parser.add_argument("--space", default="harness.spaces:TinySpace")
    parser.add_argument("--input-size", type=int,
                        help="input height and width the calibrations used (bench_predict.py "
                             "--input-size)")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--png", default="transfer.png")
    parser.add_argument("--source-label", help="what to call the source in the output "
                                               "(default: its device name)")
    parser.add_argument("--target-label", help="what to call the target (default: its name)")
    args = parser.parse_args()
    source_name, target_name = args.source_label or args.source, args.target_label or args.target

    space, args.space = space_at_input(parser, args.space, args.input_size)
    dummy = space.dummy_input()
    source = load_predictor(calibration_folder(Path(args.source_home), args.source) / "kernels")
    target = calibration_folder(Path(args.target_home), args.target)
    train = json.loads((target / "training.json").read_text())
    held = json.loads((target / "holdout.json").read_text())
    own = json.loads((target / CALIBRATION_FILE).read_text())["report"]["calibrated"]
    truth = json.loads((target / "truth.json").read_text()) if (
        target / "truth.json").exists() else None
    if truth is not None and (truth.get("samples") != held["samples"]
                              or truth.get("device") != args.target):
        parser.error(f"{target / 'truth.json'} is the truth of other held-out subnets or of "
                     "another device: run bench_predict.py for the target again")
    if truth is not None:  # the target's own calibration, scored the same way
        own = truth["calibrated_vs_truth"]

    def split_of(keys: Sequence[str]) -> Tuple[List[Dict[str, float]], np.ndarray]:
        """Each subnet's source prediction by kernel type, and its number of kernels."""
        rows, counts = [], []
        for key in keys:
            exported = export_sample(space, json.loads(key), dummy)
            kernels = source.kernels(exported.onnx_bytes, exported.sha256)
            rows.append(source.predict_by_type(kernels))
            counts.append(len(kernels))
        return rows, np.array(counts)
    (train_split, n_train), (held_split, n_held) = split_of(train["samples"]), \
        split_of(held["samples"])
    types = sorted({t for row in train_split + held_split for t in row})

    def matrix(rows: List[Dict[str, float]]) -> np.ndarray:
        return np.array([[row.get(t, 0.0) for t in types] for row in rows])
    x_train, x_held = matrix(train_split), matrix(held_split)
    y_train = np.array(train["measured_ms"], dtype=float)
    # scored against the truth where bench_predict.py measured one (a long interleaved
    # campaign, in each subnet's own reference level), else against the held-out measurements
    y_held = np.array(truth["truth_ms"] if truth else held["measured_ms"], dtype=float)
    raw_held = x_held.sum(axis=1)

    rng = np.random.default_rng(args.seed)
    methods = ("global", "no overheads", "per type")
    formulas: Dict[str, str] = {}  # the corrections fitted on every training subnet
    results: Dict[str, Dict[int, Dict[str, float]]] = {method: {} for method in methods}
    for count in COUNTS:
        if count > len(y_train):
            continue
        draws = 1 if count == len(y_train) else args.draws
        scores: Dict[str, List[Dict[str, float]]] = {method: [] for method in methods}
        for _ in range(draws):
            chosen = rng.choice(len(y_train), size=count, replace=False)
            for method, counts in (("global", n_train[chosen]), ("no overheads", None)):
                correction = fit_correction(x_train[chosen].sum(axis=1), y_train[chosen],
                                            counts)
                scores[method].append(accuracy_metrics(
                    [corrected_or_miss(correction, p, int(k)) for p, k in zip(raw_held, n_held)],
                    y_held))
                if count == len(y_train):
                    formulas[method] = correction.formula()
            scores["per type"].append(accuracy_metrics(
                per_type_predictions(x_train[chosen], y_train[chosen], x_held), y_held))
        for method, runs in scores.items():
            results[method][count] = {key: statistics.median(run[key] for run in runs)
                                      for key in ("acc5", "acc10", "rmspe", "kendall_tau")}

    uncorrected = accuracy_metrics(raw_held, y_held)
    print(f"\ntransfer {source_name} -> {target_name} ({args.space}): {source_name}'s kernel "
          f"predictors corrected with N subnets measured on {target_name}; {len(y_held)} "
          f"held-out subnets; median over {args.draws} draws of the N; scored against "
          + (f"the truth ({truth['truth_s']:g} s of interleaved rounds per subnet; its floor: "
             f"{truth['floor_text']})" if truth else "their measurements") + "\n")
    print(f"{'method':12} {'N':>4} {'+-5% acc':>9} {'+-10% acc':>10} {'RMSPE':>8} {'tau':>7}")
    print(f"{'uncorrected':12} {0:>4} {uncorrected['acc5']:>9.1%} {uncorrected['acc10']:>10.1%} "
          f"{uncorrected['rmspe']:>7.1f}% {uncorrected['kendall_tau']:>7.3f}")
    for method, by_count in results.items():
        for count, m in by_count.items():
            print(f"{method:12} {count:>4} {m['acc5']:>9.1%} {m['acc10']:>10.1%} "
                  f"{m['rmspe']:>7.1f}% {m['kendall_tau']:>7.3f}")
    print(f"{'own kernels':12} {len(y_train):>4} "
          f"{own['acc5']:>9.1%} {own['acc10']:>10.1%} {own['rmspe']:>7.1f}% "
          f"{own['kendall_tau']:>7.3f}   ({target_name}'s own calibration, kernels measured)")
    for method, formula in formulas.items():
        print(f"{method} on all {len(y_train)} training subnets: measured = {formula}")
    after20 = results["global"][20]["acc10"] if 20 in results["global"] else math.nan
    print(f"\ntarget >= {TARGET_ACC10:.0%} within +-10% after 20 measurements, by the "
          f"correction calibrate stores (global): "
          f"{'met' if after20 >= TARGET_ACC10 else 'NOT met'} ({after20:.1%})")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for method, by_count in results.items():
        axis.plot(list(by_count), [m["acc10"] * 100 for m in by_count.values()], "o-",
                  label=f"{source_name} kernels, {method} correction")
    axis.axhline(own["acc10"] * 100, color="gray", linestyle="--",
                 label=f"{target_name}'s own calibration ({len(y_train)} subnets + kernels)")
    axis.axhline(TARGET_ACC10 * 100, color="red", linestyle=":", label="target")
    axis.set_xscale("log")
    axis.set_xticks(list(COUNTS), [str(c) for c in COUNTS])
    axis.set_xlabel(f"subnets measured on {target_name}")
    axis.set_ylabel("held-out subnets within +-10% (%)")
    axis.set_ylim(0, 102)
    axis.set_title(f"transfer {source_name} -> {target_name}")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)
    print(f"PNG: {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
