#!/usr/bin/env python3
"""Limit decisions scored against a truth that holds, side by side in one run: the fixed
loop, precision stopping (stop="ci", one model at a time and in interleaved rounds, the
latter read by its quiet-state latency), limit-aware decisions in interleaved rounds, and
the same with the device's latency model.

The truth (scripts/benchtruth.py) is each subnet's quiet-state latency from a long
interleaved campaign (--truth-s of device time per subnet, in passes that load the models
afresh), kept in caches under --truth-dir so a later run reuses it; its floor (a second
campaign on every --floor-every-th subnet) is printed beside the figures. Every strategy
starts from a cache holding the sample index and the truth campaign's reference history
(as a device that has been measuring for a while has it), but no result. On the simulated
device replaying a recorded trace the truth is exact. Limits sit at the truth's p20, median
and p80.

Per condition and strategy the table gives device-seconds over the sweep (3 limits), the
speed-up over the fixed loop, and for candidates whose truth lies outside the indifference
zone (+-2% of the limit): agreement of the decided ones, how many were called wrongly, how
many calls inside the zone went either way, and the undecided share (with how many of the
undecided lie outside the zone: a cost cut-off may leave one there). The fixed loop and
both stop=ci rows are measured twice: their device-s per pass, their answers of both passes
scored against the truth ("of N": N counts both), and their re-measurement agreement
(answers equal in both passes).

Conditions: local (pinned to CPU 0, the benchmarks' noisy neighbour on CPU 1), replay (a
simulated device replaying tests/fixtures/noise/loaded.json), arm64 (the emulated board of
the test farm at --arm64-size px; needs root). Every row is printed as it comes and
appended to --out, so a run that dies still leaves its figures.

Usage: python3 scripts/bench_decisions.py --out bench_decisions.md [--samples 300]
           [--size 64] [--conditions local,replay,arm64] [--truth-s 10]
           [--strategies fixed,ci,ci-rounds,limit,model] [--fixed-s S] [--block-ms MS]
           [--decision-rounds N] [--rel-ci 0.01,0.02]
(--strategies runs some rows only; --fixed-s then gives the fixed loop's device-s of an
earlier run for the speed-up column, which marks each speed-up so; without either, no
speed-up is printed.)
"""
import argparse
import contextlib
import shutil
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from benchlib import (ROOT, Arm64Board, Neighbour, simulated_device,  # also sys.path
                      temporary_folder)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchtruth import (BLOCK_MS, Truth, campaign, exact_truth, floor, floor_text,  # noqa: E402
                        history_block_runs, history_windows, pass_caches, recheck)
from devices.noise_trace import NoiseTrace  # noqa: E402
from devices.simulated import SimulatedModel, saved_clock_s  # noqa: E402
from harness import LatencyProfiler, random_samples  # noqa: E402
from harness.pool.device_pool import MeasureRequest  # noqa: E402
from harness.spaces import ProxylessSpace  # noqa: E402
from harness.steps.decider import DECISION_BLOCK_MS, DECISION_ROUNDS  # noqa: E402
from harness.steps.measuring import reference_history_key  # noqa: E402

CONFIDENCE = 0.99
ZONE = 0.02
TRACE = ROOT / "tests" / "fixtures" / "noise" / "loaded.json"
# the replaying device's scale under graph costs: a subnet costs its operators' seeded costs,
# as on a real device a function of its architecture the latency model can learn (ProxylessSpace
# at 64 px: about 8.5-13 ms, the reference 11 ms)
SIM_MS = 3.0


def empty_copy(index: Path, folder: Path, name: str, history: Sequence[Path],
               history_key: str, history_runs: int) -> Path:
    """A copy of the cache with its sample index and devices, but no result; with the
    reference's history of the `history` caches (the truth campaign's, its blocks of
    benchtruth.BLOCK_MS, as a device that has been measuring for a while has it): the
    blocks of its windows at `history_runs` per block, under `history_key`, the key the
    profiler reads its device's history by (a campaign measured by an older harness kept it
    under another). The profilers measure with the campaign's block length (run_condition)
    and take k from that history's level (MeasurementSteps.block_runs): the campaign's own
    k unless its level lies at a step of the ladder, where their windows start a history of
    their own k. Either way no level read from one length or k is filed under another's."""
    path = folder / f"{name}.sqlite"
    shutil.copyfile(index, path)
    # closing(): a connection's own `with` commits but leaves it open, and an open
    # connection keeps the caches' -wal and -shm files beside them
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for table in ("measurements", "decisions", "reference_blocks"):
            conn.execute(f"DELETE FROM {table}")
        for source in history:
            windows = history_windows(source, history_runs)
            conn.execute("ATTACH DATABASE ? AS history", (f"file:{source}?mode=ro",))
            conn.executemany("INSERT OR IGNORE INTO reference_blocks SELECT device_fp, ?, "
                             "reference, window, sequence, value, created_at FROM "
                             "history.reference_blocks WHERE window = ?",
                             [(history_key, window) for window in windows])
            conn.commit()
            conn.execute("DETACH DATABASE history")
        conn.commit()
    return path


def emit(line: str, out: Path) -> None:
    print(line, flush=True)
    with open(out, "a") as table:
        table.write(line + "\n")


def score(truths: Sequence[Truth], limits: Sequence[float], answers: Sequence[Sequence[Any]]
          ) -> Dict[str, float]:
    """Answers (per limit, per subnet: (below, decided)) against the truth."""
    outside = decided = agree = wrong_inside = inside = undecided = undecided_outside = 0
    for limit, per_subnet in zip(limits, answers):
        for truth, (below, settled) in zip(truths, per_subnet):
            within = abs(truth.quiet_ms / limit - 1) <= ZONE
            undecided += not settled
            undecided_outside += not settled and not within
            if within:
                inside += 1
                wrong_inside += below != (truth.quiet_ms < limit)
                continue
            outside += 1
            if settled:
                decided += 1
                agree += below == (truth.quiet_ms < limit)
    total = len(limits) * len(truths)
    return {"agree": agree / decided if decided else float("nan"), "wrong": decided - agree,
            "outside": outside, "inside": inside, "either_way": wrong_inside,
            "undecided": undecided / total, "undecided_outside": undecided_outside}


def twice(answers: Sequence[Sequence[Any]], again: Sequence[Sequence[Any]]) -> float:
    """Share of (limit, subnet) answers equal in two passes."""
    pairs = [a[0] == b[0] for x, y in zip(answers, again) for a, b in zip(x, y)]
    return float(np.mean(pairs))


class Replay:
    """What the replaying simulated device needs beside a real one: its exact truth, in the
    units the profiler's decisions read it (the exact ratio to the reference times the quiet
    level of the reference the device's history shows: the level is the device's, the
    uncertainty a decision spends its error on is the ratio's), and its device time, which is
    virtual (the device's clock, saved when a profiler closes)."""

    def __init__(self, device: str, home: Path):
        self.device, self.home = device, home
        self.spec = SimulatedModel(device, SIM_MS, seed=7, noise=NoiseTrace.load(TRACE),
                                   costs="graph")

    def clock_s(self) -> float:
        return saved_clock_s(self.home, self.device)

    def truth(self, profiler: LatencyProfiler, samples: Sequence[Dict[str, Any]]
              ) -> Tuple[List[Truth], float]:
        """The samples' truth as the profiler's decisions read it, and the level's share of
        the trace's own quiet level."""
        reference = profiler.reference()
        reference_ms = self.spec.graph_median_ms(reference.sha256, reference.onnx_bytes)
        level = profiler.steps.known_reference_level() or reference_ms
        shas = []
        for sample in samples:  # graph costs are read from the model the first time
            exported = profiler.export(sample)
            self.spec.graph_median_ms(exported.sha256, exported.onnx_bytes)
            shas.append(exported.sha256)
        return [Truth(t.quiet_ms * level / reference_ms, t.low_ms * level / reference_ms,
                      t.high_ms * level / reference_ms) for t in exact_truth(self.spec, shas)
                ], level / reference_ms


def run_condition(condition: str, device: str, home: Path, folder: Path, index: Path,
                  space: Any, dummy: Any, samples: List[Dict[str, Any]], truths: List[Truth],
                  pinned: Dict[str, Any], out: Path, floor_line: str,
                  replay: Optional[Replay], history: Sequence[Path],
                  strategies: Sequence[str] = ("fixed", "ci", "limit", "model"),
                  fixed_s: Optional[float] = None, block_ms: Optional[float] = None,
                  budget_rounds: Optional[int] = None, rel_cis: Sequence[float] = (0.01,),
                  ci_min_runs: Sequence[Optional[int]] = (None,)) -> None:
    history_runs = history_block_runs(history)  # the k the campaign's history was read at

    def profiler(name: str, **settings: Any) -> LatencyProfiler:
        # measurements in rounds with the truth campaign's blocks, whose history they read;
        # without a campaign (the replay's truth is exact), the defaults a user gets
        chosen = dict(pinned, **{**({"block_ms": BLOCK_MS} if history else {}), **settings})
        key = reference_history_key(MeasureRequest.checked(chosen, 60.0).settings, "thread_cpu",
                                    history_runs)
        return LatencyProfiler(space, dummy, device=device, home=home, settings=chosen,
                               cache=empty_copy(index, folder, f"{condition}-{name}", history,
                                                key, history_runs))

    def device_s(spent: float, began: float) -> float:
        """Device time: the leases' (a replay's: its virtual clock's)."""
        return spent if replay is None else replay.clock_s() - began

    values = np.array([t.quiet_ms for t in truths])
    limits = [float(np.percentile(values, q)) for q in (20, 50, 80)]
    emit(f"\n### {condition}: {len(samples)} subnets, limits {', '.join(f'{x:.3f}' for x in limits)}"
         f" ms (truth p20, p50, p80); the truth's floor: {floor_line}\n", out)
    emit("| strategy | device-s | speed-up | agree outside the zone | wrong outside | "
         "inside the zone (either way) | undecided (of them outside the zone) | "
         "same answer twice |", out)
    emit("|---|---|---|---|---|---|---|---|", out)

    def row(name: str, spent: float, answers: Any, repeat: str = "-", passes: int = 1) -> None:
        """A strategy's row: `answers` per limit, per subnet of each of its `passes` (one
        after another), scored against the truth; the speed-up over the fixed loop measured
        here, else over --fixed-s (marked so), else none."""
        nonlocal fixed_s, fixed_here
        if name == "fixed loop":
            fixed_s, fixed_here = spent, True
        speed_up = "-" if not fixed_s else f"{fixed_s / spent:.1f}x" + (
            "" if fixed_here else " (vs --fixed-s)")
        s = score(list(truths) * passes, limits, answers)
        emit(f"| {name} | {spent:.1f} | {speed_up} | {s['agree']:.2%} of "
             f"{s['outside']} | {s['wrong']} | {s['inside']} ({s['either_way']} either way) | "
             f"{s['undecided']:.1%} ({s['undecided_outside']} outside) | {repeat} |", out)

    repeated = [("fixed", "fixed loop", {"protocol": "loop"})] + [
        (strategy, f"{name} (+-{rel * 100:g}%" + (f", first look at {runs}" if runs else "")
         + ")", dict(settings, stop="ci", rel_ci=rel, **({"min_runs": runs} if runs else {})))
        for rel in rel_cis for runs in ci_min_runs for strategy, name, settings in (
            ("ci", "stop=ci", {"protocol": "loop"}), ("ci-rounds", "stop=ci in rounds", {}))]
    fixed_here = False
    for strategy, name, settings in repeated:
        if strategy not in strategies:
            continue
        passes, spent = [], []
        for n in range(2):
            began = replay.clock_s() if replay else 0.0
            with profiler(f"{name}-{n}", **settings) as p:
                measured = p.measure_many(samples, progress=False)
                values = [m.statistic(p.statistic) for m in measured]  # in rounds: quiet
            passes.append([[(value < limit, True) for value in values] for limit in limits])
            spent.append(device_s(sum(m.device_s for m in measured), began))
        # device-s per pass; agreement over both passes' answers (each against the truth)
        row(name, float(np.mean(spent)), [a + b for a, b in zip(*passes)],
            f"{twice(*passes):.1%}", passes=2)
    for strategy, name, use_model in (("limit", "limit-aware, rounds", False),
                                      ("model", "limit-aware + model, rounds", True)):
        if strategy not in strategies:
            continue
        began = replay.clock_s() if replay else 0.0
        name += f", blocks of {block_ms or DECISION_BLOCK_MS:g} ms or 3 runs" + (
            f", at most {budget_rounds} rounds" if budget_rounds else "")
        with profiler(name) as p:
            p.decider.use_model = use_model
            p.decider.block_ms = block_ms or DECISION_BLOCK_MS
            p.decider.budget_rounds = budget_rounds or DECISION_ROUNDS
            answers, spent, breakdown = [], 0.0, []
            for limit in limits:
                decisions = p.decide_many(samples, limit, CONFIDENCE, progress=False,
                                          indifference=ZONE)
                answers.append([(d.below, d.settled) for d in decisions])
                leases_s = sum(d.device_s for d in decisions)
                spent += leases_s
                sources = Counter(d.source for d in decisions)
                undecided_s = sum(d.device_s for d in decisions if not d.settled)
                breakdown.append(f"limit {limit:.3f} ms: {leases_s:.1f} s of leases "
                                 f"({undecided_s:.1f} on the undecided), " +
                                 ", ".join(f"{n} {source}" for source, n in
                                           sorted(sources.items())))
            note = f"{p.decider.model_note}; audit {p.decider.audit.report()}" if use_model else ""
            if replay is not None:  # the truth in this profiler's own level
                truths, share = replay.truth(p, samples)
                note += f"; its reference level is {share:.1%} of the trace's quiet level"
        row(name, device_s(spent, began), answers)
        emit(f"\n{name}: " + "; ".join(([note] if note else []) + breakdown) + "\n", out)


def truth_for(condition: str, device: str, home: Path, space: Any, dummy: Any,
              samples: List[Dict[str, Any]], args: argparse.Namespace, pinned: Dict[str, Any]
              ) -> Tuple[List[Truth], str, List[Path]]:
    """The condition's truth, its floor's line (exact on the replay), and the caches whose
    reference history the strategies start from (the truth campaign's)."""
    if condition == "replay":  # the level as a short history of rounds shows it
        with LatencyProfiler(space, dummy, device=device, home=home,
                             cache=home / "level.sqlite") as p:
            p.measure_many(samples[:16], progress=False)
            truths, share = Replay(device, home).truth(p, samples)
        return truths, floor_text({}) + f"; reference level {share:.1%} of the trace's quiet", []
    started = time.monotonic()
    name = f"{condition}-{type(space).__name__}-{dummy.shape[-1]}px-{args.truth_s:g}s"
    truths = campaign(space, dummy, samples, device=device, home=home, seconds=args.truth_s,
                      cache=args.truth_dir / f"truth-{name}.sqlite", settings=pinned)
    subset = list(range(0, len(samples), args.floor_every))
    again = campaign(space, dummy, [samples[i] for i in subset], device=device, home=home,
                     seconds=args.truth_s, cache=args.truth_dir / f"floor-{name}.sqlite",
                     seed=1, settings=pinned)
    print(f"truth for {condition}: {time.monotonic() - started:.0f} s", flush=True)
    line = floor_text(floor([truths[i] for i in subset], again))
    if args.recheck_s > 0:
        line += "; " + recheck(space, dummy, [samples[i] for i in subset],
                               [truths[i] for i in subset], device=device, home=home,
                               cache=home / "recheck.sqlite", seconds=args.recheck_s,
                               settings=pinned)
    return truths, line, pass_caches(
        args.truth_dir / f"truth-{name}.sqlite")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the table (markdown) written")
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--size", type=int, default=64, help="input size in px (default 64)")
    parser.add_argument("--arm64-size", type=int, default=32)
    parser.add_argument("--conditions", default="local,replay,arm64")
    parser.add_argument("--truth-s", type=float, default=10.0,
                        help="device time per subnet of the truth campaign (default 10 s)")
    parser.add_argument("--floor-every", type=int, default=4,
                        help="the floor campaign measures every Nth subnet again (default 4)")
    parser.add_argument("--truth-dir", type=Path,
                        default=Path.home() / ".cache" / "harness-bench")
    parser.add_argument("--strategies", default="fixed,ci,ci-rounds,limit,model",
                        help="which rows to run (fixed, ci, ci-rounds, limit, model)")
    parser.add_argument("--fixed-s", type=float,
                        help="without the fixed row: its device-s from an earlier run, for "
                             "the speed-up column (marked so)")
    parser.add_argument("--recheck-s", type=float, default=0.8,
                        help="before the strategies, the floor's subnets again in one window "
                             "of this many device-s each: how far one window lies from the "
                             "truth now (0: not)")
    parser.add_argument("--block-ms", type=float,
                        help="the limit-aware rows: a decision's block length (default "
                             "harness.steps.decider.DECISION_BLOCK_MS; at least 3 runs)")
    parser.add_argument("--rel-ci", default="0.01",
                        help="the stop=ci rows: the interval's half-width they stop at, a "
                             "share of the median; several, comma-separated, give a row each "
                             "(default 0.01)")
    parser.add_argument("--ci-min-runs", default="",
                        help="the stop=ci rows: their first look (min_runs: runs of a loop, "
                             "rounds in rounds); several, comma-separated, give a row each "
                             "(default: the agent's, 10)")
    parser.add_argument("--decision-rounds", type=int,
                        help="the limit-aware rows: a decision's budget in rounds (default "
                             "harness.steps.decider.DECISION_ROUNDS)")
    args = parser.parse_args()
    args.truth_dir.mkdir(parents=True, exist_ok=True)
    folder = temporary_folder("harness-bench-decisions-")
    started = time.monotonic()
    emit(f"\n## bench_decisions {time.strftime('%Y-%m-%d %H:%M')}: {args.samples} "
         f"ProxylessSpace subnets, confidence {CONFIDENCE}, indifference +-{ZONE:.0%}, truth "
         f"{args.truth_s:g} s per subnet", args.out)
    for condition in args.conditions.split(","):
        size = args.arm64_size if condition == "arm64" else args.size
        space, dummy = ProxylessSpace(input_size=size), torch.randn(1, 3, size, size)
        samples = random_samples(space, args.samples, seed=12)
        home = folder / condition
        board: Any = Arm64Board() if condition == "arm64" else contextlib.nullcontext()
        pinned = {"cpu_affinity": [0]} if condition == "local" else {}
        with board, Neighbour("1" if condition == "local" else None, seed=3):
            device = {"local": "local", "replay": None, "arm64": None}[condition]
            if condition == "replay":
                device = simulated_device(home, TRACE, SIM_MS, start_s=0.0, costs="graph")
            elif condition == "arm64":
                device = board.register(home)
            index = folder / f"{condition}-index.sqlite"
            with LatencyProfiler(space, dummy, device=device, home=home, cache=index) as p:
                for sample in samples:  # the sample index every strategy starts from
                    p.graph_hash(sample)
            truths, floor_line, history = truth_for(condition, device, home, space, dummy,
                                                    samples, args, pinned)
            run_condition(condition, device, home, folder, index, space, dummy, samples,
                          truths, pinned, args.out, floor_line,
                          Replay(device, home) if condition == "replay" else None, history,
                          args.strategies.split(","), args.fixed_s, args.block_ms,
                          args.decision_rounds,
                          [float(rel) for rel in args.rel_ci.split(",")],
                          [int(runs) if runs else None for runs in args.ci_min_runs.split(",")])
    emit(f"\ntargets: limit-aware + model >= 10x less device time than the fixed loop, >= 99.5% "
         f"agreement outside the zone, every wrong call inside it; stop=ci >= 3x less than "
         f"fixed at a same-answer-twice share no worse; {time.monotonic() - started:.0f} s in "
         "all", args.out)


if __name__ == "__main__":
    main()
