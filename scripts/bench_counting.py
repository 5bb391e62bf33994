#!/usr/bin/env python3
"""Benchmark of FLOPs counting on NNI's hub spaces: harness against NNI's FlopsProfiler.

For each space (ProxylessNAS, MobileNetV3Space, ShuffleNetSpace), in one run: the set-up
time of each profiler, microseconds per NEW sample (never profiled before; median over N)
right after set-up and again after --warm other samples (a search that has run a while),
and per repeated sample, and agreement: harness in NNI's convention against NNI's default
counts, and harness's MACs against NNI with bias, normalisation and activations switched
off, and against torch's FlopCounterMode / 2 on the frozen subnets (the reference).
Target: a new sample in at most 0.2 ms, at or under NNI.

With --lut, also the latency lookup table's additivity error on 10 subnets: uncorrected,
with the identity model's fixed cost subtracted, and with that cost scaled by the factor
fitted on 8 other whole subnets (targets: mean <= 10% on TinySpace at 32 px, <= 5% on
ProxylessSpace at 64 px). Blocks, fixed costs and the 18 whole subnets are measured together
(in rounds: the same windows beside the reference, the quiet-state latency); the error is
given against those wholes and against the truth (scripts/benchtruth.py: --truth-s of
interleaved rounds per subnet, kept under --truth-dir; compared in units of the reference,
by the same table read as ratios), beside the truth's floor (a second campaign: no table
can do better). With --protocol loop, each model one at a time and the floor the subnets
measured again. In a new HARNESS_HOME, under each of --lut-conditions: `local` idle,
`other-cores` (the benchmarks' noisy neighbour on the other core, the agent on CPU 0; the
truth is local's, measured before the neighbour starts), `arm64` (the emulated board, every
space at --arm64-px, needs root), `replay` (a simulated device replaying tests/fixtures/
noise/loaded.json whose graphs cost their operators' seeded costs added up: a space's
blocks add up to its subnets exactly, so the truth is exact; device time is virtual); each
row is appended to --out as it is measured.

Usage: python scripts/bench_counting.py [--px 224] [--samples 20] [--spaces ...] [--lut]
       [--protocol rounds|loop] [--statistic median|min|quiet] [--truth-s 10]
       [--lut-conditions local,other-cores,arm64,replay] [--arm64-px 32] [--out lut.md]
"""
import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchtruth

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from harness.metrics.counting import FlopsProfiler  # noqa: E402
from harness.spaces.space import random_samples  # noqa: E402

TARGET_US = 200.0


def timed_us(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return (time.perf_counter() - started) * 1e6


def bench_space(name: str, space: Any, px: int, count: int, seed: int,
                warm: int) -> Dict[str, Any]:
    from nni.nas.profiler.pytorch.flops import FlopsProfiler as NniFlops

    x = torch.randn(1, 3, px, px)
    row: Dict[str, Any] = {"space": name}
    started = time.perf_counter()
    ours = FlopsProfiler(space, x)
    ours_nni = FlopsProfiler(space, x, convention="nni")
    row["harness_setup_s"] = (time.perf_counter() - started) / 2
    row["tables"] = "additive" if ours.additive is not None else (
        "memoized" if ours.nni_tables is not None else "whole subnets")
    started = time.perf_counter()
    theirs = NniFlops(space, x)
    theirs_macs = NniFlops(space, x, count_bias=False, count_normalization=False,
                           count_activation=False)
    row["nni_setup_s"] = (time.perf_counter() - started) / 2
    samples = random_samples(space, count, seed=seed)
    ours_us, theirs_us, again_us = [], [], []
    agree_nni = agree_macs = agree_torch = 0
    for i, sample in enumerate(samples):
        value: List[float] = []
        ours_us.append(timed_us(lambda: value.append(ours.profile(sample))))
        again_us.append(timed_us(lambda: ours.profile(sample)))
        nni_value: List[float] = []
        theirs_us.append(timed_us(lambda: nni_value.append(float(theirs.profile(sample)))))
        agree_nni += ours_nni.profile(sample) == nni_value[0]
        agree_macs += value[0] == float(theirs_macs.profile(sample))
        if i < 3:  # the reference: the frozen subnet under torch's own counter
            module = space.freeze(sample).eval()
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                module(x)
            agree_torch += value[0] == counter.get_total_flops() / 2
    # After a search has run a while: new samples once `warm` others have been profiled
    # (per-module tables filled; matters where they are memoized, not additive).
    warm_samples = random_samples(space, warm + count, seed=seed + 1)
    for sample in warm_samples[:warm]:
        ours.profile(sample)
    warm_us = [timed_us(lambda: ours.profile(sample)) for sample in warm_samples[warm:]]
    row.update(harness_new_us=statistics.median(ours_us), nni_new_us=statistics.median(theirs_us),
               harness_new_us_after_warm=statistics.median(warm_us),
               harness_repeat_us=statistics.median(again_us),
               agree_nni_convention=f"{agree_nni}/{count}", agree_macs=f"{agree_macs}/{count}",
               agree_torch=f"{agree_torch}/{min(3, count)}")
    return row


LUT_CONDITIONS = ("local", "other-cores", "arm64", "replay")
TRACE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "noise" / "loaded.json"
SIM_MS = 3.0  # the replaying device's scale of costs (ProxylessSpace subnets at 64 px: ~10 ms)


def bench_lut(spaces: List[str], statistic: Optional[str], protocol: str, truth_s: float,
              truth_dir: Path, conditions: Sequence[str] = ("local",), arm64_px: int = 32,
              out: Optional[Path] = None) -> List[Dict[str, Any]]:
    """Each space's table under each condition: `local` (idle), `other-cores` (the
    benchmark's neighbour on the other core, the agent on CPU 0), `arm64` (the emulated
    board, every space at `arm64_px`) and `replay` (a simulated device replaying the loaded
    trace, its graphs' latencies their operators' costs added: the truth is exact for a
    space composed from its blocks). Its additivity error against the whole subnets
    measured in the same build, and (rounds) against the truth (scripts/benchtruth.py), in
    units of the reference, beside the truth's floor; a loop's floor is the subnets measured
    again. The truth is measured before the neighbour starts (it is the device's quiet
    state; `other-cores` reads `local`'s). Each row is printed and appended to `out`
    (markdown) as it is measured."""
    import contextlib
    import os

    from benchlib import Arm64Board, Neighbour, simulated_device, temporary_folder
    from harness.spaces.space import load_space

    home = temporary_folder("bench-counting-")
    os.environ["HARNESS_HOME"] = str(home)
    rows: List[Dict[str, Any]] = []
    in_rounds = protocol == "rounds" and statistic in (None, "quiet")
    for condition in conditions:
        board: Any = Arm64Board() if condition == "arm64" else contextlib.nullcontext()
        with board:
            device = board.register(home) if condition == "arm64" else \
                simulated_device(home, TRACE, SIM_MS, 0.0, costs="graph") \
                if condition == "replay" else "local"
            settings: Dict[str, Any] = {"protocol": protocol}
            if condition == "other-cores":
                settings["cpu_affinity"] = [0]
            for spec, px in [(s.split("@")[0], int(s.split("@")[1])) for s in spaces]:
                px = arm64_px if condition == "arm64" else px
                space, x = load_space(spec), torch.randn(1, 3, px, px)
                checks = random_samples(space, 10, seed=7)
                truths = truth_ratios(spec, space, x, checks, device, truth_s, truth_dir,
                                      home) if in_rounds else None
                with Neighbour("1" if condition == "other-cores" else None, duration_s=6 * 3600):
                    row = lut_row(spec, space, x, checks, device, settings, statistic, truths,
                                  clock_home=home if condition == "replay" else None)
                rows.append(dict({"condition": condition}, **row))
                print_table(rows[-1:])
                if out is not None:
                    write_markdown(out, rows[-1])
    return rows


def truth_ratios(spec: str, space: Any, x: torch.Tensor, checks: List[Dict[str, Any]],
                 device: str, truth_s: float, truth_dir: Path, home: Path
                 ) -> Tuple[List[float], Optional[List[float]]]:
    """The check subnets' truth as ratios to the reference, and the floor's (a second
    campaign; None where the truth is exact: a simulated device with graph costs and a
    space composed from its blocks, which the bench refuses otherwise)."""
    from benchtruth import campaign
    from devices import registry
    from devices.simulated import SimulatedModel
    from harness.export.graph import composable_terms, export_sample
    from harness.steps.reference import reference_model

    px = x.shape[-1]
    config = registry.load_devices(home).get(device)
    if config is not None and config.transport == "sim":
        if composable_terms(space, x) is None:
            raise SystemExit(f"{spec} is exported whole, not composed from its blocks: a "
                             "simulated device's graph costs are no exact truth for its table")
        simulated = SimulatedModel(config.address, config.sim_ms or 20.0,
                                   seed=config.sim_seed or 0, costs=config.sim_costs or "draw")
        reference = reference_model(x, home)
        reference_ms = simulated.graph_median_ms(reference.sha256, reference.onnx_bytes)
        return [simulated.graph_median_ms(e.sha256, e.onnx_bytes) / reference_ms
                for e in (export_sample(space, s, x, home=home) for s in checks)], None
    where = "" if device == "local" else f"-{device}"  # local: one truth, any neighbour
    name = f"lut-{spec.split(':')[-1]}-{px}px-{truth_s:g}s{where}"
    truth = campaign(space, x, checks, device=device, home=home, seconds=truth_s,
                     cache=truth_dir / f"truth-{name}.sqlite")
    again = campaign(space, x, checks, device=device, home=home, seconds=truth_s,
                     cache=truth_dir / f"floor-{name}.sqlite", seed=1)
    return [t.quiet_ms / t.level_ms for t in truth], [t.quiet_ms / t.level_ms for t in again]


def lut_row(spec: str, space: Any, x: torch.Tensor, checks: List[Dict[str, Any]], device: str,
            settings: Dict[str, Any], statistic: Optional[str],
            truths: Optional[Tuple[List[float], Optional[List[float]]]],
            clock_home: Optional[Path] = None) -> Dict[str, Any]:
    """One space's table built on `device` and scored (see bench_lut): against `truths`
    (truth_ratios) in units of the reference, by a second table read from the same
    measurements as ratios (the quiet-state latency of each entry was converted with the
    reference level of its moment, which drifts), else against the subnets measured again.
    With `clock_home`, the device replays a trace and its device time is what its virtual
    clock (kept in that home) moved: it sleeps for none of it."""
    from devices.simulated import saved_clock_s
    from harness.profiler import LatencyProfiler
    from harness.search.lut import LatencyLUT

    fits = random_samples(space, 8, seed=3)
    started = time.perf_counter()
    began = saved_clock_s(clock_home, device) if clock_home is not None else 0.0
    with LatencyProfiler(space, x, device=device, statistic=statistic, settings=settings,
                         timeout_s=1800.0) as latency:  # blocks, fixed costs and wholes together
        lut = LatencyLUT.build(space, x, latency, progress=False, fit_samples=fits,
                               check_samples=checks)
        report = lut.additivity_error(checks, latency)
        used = latency.statistic
        device_s = latency.counters["device_s"]
    if clock_home is not None:  # saved when the profiler closed
        device_s = saved_clock_s(clock_home, device) - began
    row: Dict[str, Any] = {
        "space": f"{spec.split(':')[-1]} {x.shape[-1]}px", "statistic": used,
        "fixed_ms": report["fixed_ms"], "scale": report["overhead_scale"],
        "mean_err_before": report["mean_abs_error_uncorrected"],
        "mean_err_identity": report["mean_abs_error_identity"],
        "mean_err_fitted": report["mean_abs_error"],
        "max_err_fitted": report["max_abs_error"],
        "signed_fitted": report["mean_signed_error"],
        "build_device_s": device_s, "build_wall_s": time.perf_counter() - started}
    if truths is not None:  # against the truth, beside its floor
        with LatencyProfiler(space, x, device=device, statistic="ratio", settings=settings,
                             timeout_s=1800.0) as ratios:  # the same measurements, as ratios
            lut_ratio = LatencyLUT.build(space, x, ratios, progress=False, fit_samples=fits,
                                         check_samples=checks)
            if ratios.counters["measurements"]:
                raise SystemExit("the table in ratios measured again: its measurements "
                                 "were not all in the cache")
        truth, again = truths
        row["err_vs_truth"] = statistics.mean(
            abs(lut_ratio.profile(s) / t - 1) for s, t in zip(checks, truth))
        row["truth_floor"] = "exact" if again is None else statistics.mean(
            abs(b / a - 1) for a, b in zip(truth, again))
    else:
        with LatencyProfiler(space, x, device=device, statistic=statistic, settings=settings,
                             refresh=True) as remeasure:  # the noise floor
            again_ms = [remeasure.profile(s) for s in checks]
        row["remeasured_err"] = statistics.mean(abs(a / r["measured_ms"] - 1)
                                                for a, r in zip(again_ms, report["rows"]))
    return row


def write_markdown(out: Path, row: Dict[str, Any]) -> None:
    """Append `row` to the markdown table in `out`, with a header first where the file is
    new or its last header names other columns."""
    header = "| " + " | ".join(row) + " |"
    headers = [line for line in out.read_text().splitlines() if line.startswith("| condition")] \
        if out.exists() else []
    cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
    with open(out, "a") as table:
        if not headers or headers[-1] != header:
            table.write(("\n" if headers else "") + header + "\n|" + "---|" * len(row) + "\n")
        table.write("| " + " | ".join(cells) + " |\n")


def print_table(rows: List[Dict[str, Any]]) -> None:
    keys = list(rows[0])
    cells = [[f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
             for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.ljust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--px", type=int, default=224)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warm", type=int, default=200,
                        help="samples profiled before the after-warm column's new samples")
    parser.add_argument("--spaces", nargs="*",  # none: only the lookup-table part
                        default=["ProxylessNAS", "MobileNetV3Space", "ShuffleNetSpace"])
    parser.add_argument("--lut", nargs="*", default=None, metavar="MODULE:SPACE@PX",
                        help="also the lookup table's fixed-cost correction (default spaces: "
                             "TinySpace@32 ProxylessSpace@64)")
    parser.add_argument("--statistic", choices=("median", "min", "quiet"), default=None,
                        help="what the lookup table and the subnets are measured by "
                             "(default: quiet in rounds, the median in a loop)")
    parser.add_argument("--protocol", choices=("rounds", "loop"), default="rounds")
    parser.add_argument("--truth-s", type=float, default=10.0,
                        help="device time per subnet of the truth campaign (default 10 s)")
    parser.add_argument("--truth-dir", type=Path,
                        default=Path.home() / ".cache" / "harness-bench")
    parser.add_argument("--lut-conditions", default="local",
                        help="where the tables are built: comma-separated of "
                             f"{', '.join(LUT_CONDITIONS)} (default local; arm64 needs root)")
    parser.add_argument("--arm64-px", type=int, default=32,
                        help="the input size of every space on the emulated arm64 board")
    parser.add_argument("--out", type=Path,
                        help="the lookup tables' rows, appended as markdown as they come")
    args = parser.parse_args()
    conditions = [c for c in args.lut_conditions.split(",") if c]
    unknown = sorted(set(conditions) - set(LUT_CONDITIONS))
    if unknown:
        parser.error(f"--lut-conditions: unknown {', '.join(unknown)} (choose from "
                     f"{', '.join(LUT_CONDITIONS)})")
    warnings.filterwarnings("ignore", module="nni")

    rows = []
    for name in args.spaces:  # NNI only for its spaces: the lookup-table part runs without
        import nni.nas.hub.pytorch as hub
        rows.append(bench_space(name, getattr(hub, name)(), args.px, args.samples, args.seed,
                                args.warm))
        print(f"{name} done", file=sys.stderr)
    if rows:
        print(f"FLOPs counting at {args.px} px, {args.samples} new samples per space "
              f"(medians; target: new sample <= {TARGET_US:g} us and <= NNI)")
        print_table(rows)
    if args.lut is not None:
        lut = args.lut or ["harness.spaces:TinySpace@32", "harness.spaces:ProxylessSpace@64"]
        print(f"\nLatency lookup table, additivity error on 10 subnets ({', '.join(conditions)}; "
              f"{args.protocol}; against the truth: its quiet-state latency from "
              f"{args.truth_s:g} s of interleaved rounds per subnet, beside the truth's floor)")
        args.truth_dir.mkdir(parents=True, exist_ok=True)
        rows = bench_lut(lut, args.statistic, args.protocol, args.truth_s, args.truth_dir,
                         conditions, args.arm64_px, args.out)
        print("\nall:")
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
