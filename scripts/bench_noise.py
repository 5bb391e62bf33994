#!/usr/bin/env python3
"""Benchmark: do measurements hold on a noisy device? Each protocol measures the same subnets
twice, at equal device time, under each condition; the table says how often a subnet's second
measurement agrees with its first.

Protocols (the loop gets about --seconds of timed runs per subnet and pass; paired, rounds
and ci-rounds a window budget, reference blocks included, of WINDOW_BUDGET x --seconds per
candidate, so that with their loads and probes they spend no more device time than the
loop: the device-s column says what each spent):
- loop: one model after another, the fixed loop (the default before rounds), its median;
- ci: one model after another until the 95% interval of the median is within --rel-ci
  (default 1%);
- paired: one model at a time in its own window of interleaved rounds beside the reference
  (what a single profile() does with protocol "rounds"): its ratio to the reference, and its
  quiet-state latency;
- rounds: the whole batch in windows of interleaved rounds: ratio and quiet-state latency;
- ci-rounds: the same windows under the ci rule: a candidate leaves its window once the 95%
  interval of its ratio is within --rel-ci (after 10 rounds), the window's budget a cap.
Conditions: idle, the seeded noisy neighbour (scripts/neighbour.py) on the other core
(other-cores) or on the device's own core (same-core); the agent is pinned to CPU 0; arm64:
an emulated arm64 board of the test farm (qemu-user, needs root) at --arm64-size px, idle.
With --trace, a simulated device replaying each recorded trace too, where the truth is
known: each protocol's error against it and how often the 95% interval covers it, over every
pass of --replay-pairs pairs (default 4), the passes entering the trace at evenly spread
places (a replay is cheap, and one pair's figures depend on where in the trace it fell: on
the loaded trace one pair read 98% of ratios within 2% of the truth, eight passes 88%).
Each replayed pass is a device of its own, its quiet-state latency read from its own
windows' reference history (as on a new device); its device-s are the device's virtual
seconds, loads included.

    python3 scripts/bench_noise.py --out bench_noise.md [--subnets 40] [--input-size 224]
        [--conditions idle,other-cores,same-core,arm64]
        [--protocols loop,ci,paired,rounds,ci-rounds] [--rel-ci 0.01]
        [--ref-share 1[,0.25]] [--block-ms 10[,20]] [--block-runs kept[,0]]
        [--passes 2] [--trace tests/fixtures/noise/loaded.json ...] [--replay-pairs 4]

With --ref-share 0.25,1, paired, rounds and ci-rounds run once per share (the most of a
window's device time the reference takes; 1: no bound), each row labelled with its share;
with --block-ms 10,20 once per block length, likewise; with --block-runs kept,0 with the k
the device's history implies (the default) and probed in every window.
Within a condition the first passes of every protocol run one after another, then the
second passes in the same order (and so on, with --passes N), so that protocols compared in
one table met the same load. The defaults run every protocol, ci-rounds included (an extra
pass per condition). A row pools every pair of its passes; its last column, the pass shift,
is the median over pairs of how far a pass moved as a whole (the median of its subnets'
ratios to the other's): a shift all of a pass's subnets share is a draw of that pass (its
reference's session, the host's state), and one pair of passes is one draw of it, so
protocols that differ by their shifts are told apart by several passes, not by one pair.

Rows are printed as they are measured and appended to --out, so a run that dies still leaves
its figures (a protocol's rows once its last pass is in: a run that dies before leaves none
of that condition's; a replay's once all its passes are in).
"""
import argparse
import contextlib
import itertools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from benchlib import (Arm64Board, Neighbour, simulated_device, space_at_input,
                      temporary_folder)

CONDITIONS = {"idle": None, "other-cores": "1", "same-core": "0", "arm64": None}
PROTOCOLS = ("loop", "ci", "paired", "rounds", "ci-rounds")
# A window's time budget per candidate (max_time_ms, reference blocks included), as a share
# of the loop's --seconds: what a window spends beyond it (loading its models and the
# reference, probing k) is about what the loop spends on loading and warming each model.
WINDOW_BUDGET = {"paired": 0.9, "rounds": 0.9, "ci-rounds": 0.9}
HEADER = ("| condition | protocol | statistic | within 1% | within 2% | within 5% | within 10% "
          "| median diff | Kendall tau | device-s per pass | dropped | blocks kept per subnet "
          "| reference share "
          "| error vs truth: within 2% | interval covers truth (median half-width) "
          "| pass shift |")


def settings_of(protocol: str, seconds: float, rounds: Dict[str, Any],
                rel_ci: float) -> Dict[str, Any]:
    """The agent's settings for a protocol at `seconds` of timed runs per subnet (a window's
    budget is its candidates' budgets together); `rounds`: block_ms, ref_gap_ms, ref_share,
    discard_runs, warmup_runs, reference_sessions (a loop warms up with the default);
    `rel_ci`: the ci rule's half-width (ci, ci-rounds)."""
    pinned = {"cpu_affinity": [0]}
    if protocol == "loop":
        return dict(pinned, protocol="loop", min_time_ms=seconds * 1e3,
                    max_time_ms=seconds * 1e3 * 4)
    if protocol == "ci":
        return dict(pinned, protocol="loop", stop="ci", rel_ci=rel_ci, max_time_ms=seconds * 1e3)
    stop = {"stop": "ci", "rel_ci": rel_ci} if protocol == "ci-rounds" else {}
    return dict(pinned, protocol="rounds", rounds=100000, min_time_ms=0.0,
                max_time_ms=seconds * 1e3, **stop, **rounds)


def measure_pass(protocol: str, space: Any, dummy: Any, samples: List[dict], device: str,
                 home: Path, seconds: float, rounds: Dict[str, Any],
                 rel_ci: float) -> List[Any]:
    """One pass: every subnet measured anew under the protocol (refresh: no pass reads
    another's measurements; passes in one home share the device's reference history, as a
    user's second run does)."""
    from harness import LatencyProfiler

    layout = rounds.get("address_layout")  # the agent's environment, not a setting
    rounds = {key: value for key, value in rounds.items() if key != "address_layout"}
    with agent_layout(layout), \
            LatencyProfiler(space, dummy, device=device, home=home, refresh=True,
                            settings=settings_of(protocol, seconds, rounds, rel_ci),
                            timeout_s=max(600.0, seconds * 4)) as profiler:
        if protocol == "paired":
            return [profiler.measure(sample) for sample in samples]
        return profiler.measure_many(samples, progress=False)


@contextlib.contextmanager
def agent_layout(layout: Optional[str]) -> Iterator[None]:
    """The address layout a local agent started inside runs with (it inherits this process's
    environment; agents.ort_agent.fix_address_layout): "randomized" keeps the randomization,
    "fixed" is the agent's own default, None leaves the environment as it is."""
    from agents.ort_agent import LAYOUT_ENV

    before = os.environ.get(LAYOUT_ENV)
    if layout == "randomized":
        os.environ[LAYOUT_ENV] = "randomized"
    elif layout == "fixed":
        os.environ.pop(LAYOUT_ENV, None)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(LAYOUT_ENV, None)
        else:
            os.environ[LAYOUT_ENV] = before


def replay_starts(trace: Path, passes: int) -> List[float]:
    """Where in a trace each of a replay's passes starts (s): spread evenly over it, so that
    the passes together meet the whole recording (a pass of 40 subnets at 1 s each runs about
    45 virtual s, most of the 60 s shipped traces: neighbouring passes overlap)."""
    from devices.noise_trace import NoiseTrace

    duration_s = NoiseTrace.load(trace).duration_s
    return [duration_s * n / passes for n in range(passes)]


def values(measurements: Sequence[Any], statistic: str) -> List[float]:
    return [m.statistic(statistic) for m in measurements]


def agreement(pairs: Sequence[Tuple[Sequence[float], Sequence[float]]]) -> Dict[str, float]:
    """How the second pass of each pair agrees with its first: shares within +-1/2/5/10% and
    the median difference over every subnet of every pair, Kendall tau the mean of the
    pairs' own."""
    from scipy.stats import kendalltau

    diffs = [abs(b / a - 1) for first, second in pairs for a, b in zip(first, second)]
    share = {f"within {p}%": sum(d <= p / 100 for d in diffs) / len(diffs) for p in (1, 2, 5, 10)}
    taus = [kendalltau(first, second).statistic for first, second in pairs if len(first) > 1]
    # how far a pair's second pass moved as a whole (the median of its subnets' ratios):
    # a shift every subnet shares is a draw of the pass (its reference's session, the
    # host's state), the rest each subnet's own
    shifts = [abs(statistics.median(b / a for a, b in zip(first, second)) - 1)
              for first, second in pairs]
    return dict(share, median=statistics.median(diffs),
                tau=statistics.fmean(taus) if taus else math.nan,
                shift=statistics.median(shifts))


def truth_figures(measurements: Sequence[Any], statistic: str, truth: Sequence[float]
                  ) -> Dict[str, Optional[float]]:
    """Error against the known truth, the interval's coverage and its median relative
    half-width (simulated devices)."""
    errors = [abs(v / t - 1) for v, t in zip(values(measurements, statistic), truth)]
    covered: Optional[float] = None
    half_width: Optional[float] = None
    if statistic in ("ratio", "quiet"):
        inside, widths = [], []
        for m, t in zip(measurements, truth):
            low, high = m.interleaved.ratio_interval if statistic == "ratio" \
                else m.interleaved.quiet_interval_ms
            inside.append(low <= t <= high)
            widths.append((high - low) / 2 / m.statistic(statistic))
        covered, half_width = sum(inside) / len(inside), statistics.median(widths)
    return {"within2": sum(e <= 0.02 for e in errors) / len(errors), "covered": covered,
            "half_width": half_width}


def row(condition: str, protocol: str, statistic: str,
        pairs: Sequence[Tuple[Sequence[Any], Sequence[Any]]],
        truth: Optional[Sequence[float]] = None,
        device_s: Optional[float] = None) -> str:
    """A table row from pairs of passes (the measurements of every subnet, twice): agreement
    within each pair; with `truth` (simulated devices) the error and coverage of every pass;
    `device_s` per pass where the leases do not say it (a simulated device's virtual clock)."""
    figures = agreement([(values(first, statistic), values(second, statistic))
                         for first, second in pairs])
    passes = [measured for pair in pairs for measured in pair]
    if device_s is None:
        device_s = statistics.fmean(sum(m.device_s for m in measured) for measured in passes)
    rounds = [m.interleaved for measured in passes for m in measured if m.interleaved is not None]
    dropped = (sum(s.dropped for s in rounds) / max(sum(s.dropped + s.rounds for s in rounds), 1)
               if rounds else None)
    # the blocks each ratio was read from (median over subnets and passes): a window whose
    # budget buys one round on a slow device reads each ratio from one block, not a median
    kept = statistics.median(s.rounds for s in rounds) if rounds else None
    share = statistics.fmean(s.reference_share for s in rounds) if rounds else None
    known = None if truth is None else \
        truth_figures([m for measured in passes for m in measured], statistic,
                      [t for _ in passes for t in truth])
    cells = [condition, protocol, statistic,
             *(f"{figures[f'within {p}%']:.0%}" for p in (1, 2, 5, 10)),
             f"{figures['median']:.2%}", f"{figures['tau']:.3f}", f"{device_s:.1f}",
             "-" if dropped is None else f"{dropped:.0%}",
             "-" if kept is None else f"{kept:g}",
             "-" if share is None else f"{share:.0%}",
             "-" if known is None else f"{known['within2']:.0%}",
             "-" if known is None or known["covered"] is None
             else f"{known['covered']:.0%} (+-{known['half_width']:.1%})",
             f"{figures['shift']:.2%}"]
    return "| " + " | ".join(cells) + " |"


def statistics_of(protocol: str) -> Sequence[str]:
    """The statistics a protocol's rows report: a loop's median; a window's ratio and
    quiet-state latency."""
    return ("median",) if protocol in ("loop", "ci") else ("ratio", "quiet")


def schedule_variants(protocols: Sequence[str], shares: Sequence[float],
                      blocks: Sequence[float], gaps: Sequence[float],
                      discards: Sequence[float] = (0,),
                      warmups: Sequence[Optional[float]] = (None,),
                      sessions: Sequence[Optional[float]] = (None,),
                      runs: Sequence[Optional[int]] = (None,),
                      layouts: Sequence[Optional[str]] = (None,),
                      model_sessions: Sequence[Optional[float]] = (None,)
                      ) -> List[Tuple[str, str, Dict[str, Any]]]:
    """(label, protocol, rounds settings) of every row group: each windowed protocol once
    per reference share, block length, reference gap, discarded runs per block, warm-up
    runs per model, reference sessions, timed runs per block, the agent's address layout and
    each candidate's sessions (None: the default), labelled with those that vary (a loop
    once, with the loop's own warm-up)."""
    variants = []
    for protocol in protocols:
        windowed = protocol in WINDOW_BUDGET
        for share, block_ms, gap_ms, discard, warmup, session, k, layout, loads in \
                itertools.product(*[values if windowed else values[:1] for values in
                                    (shares, blocks, gaps, discards, warmups, sessions, runs,
                                     layouts, model_sessions)]):
            label = protocol
            for values, name in ((shares, f"ref_share {share:g}"),
                                 (blocks, f"blocks {block_ms:g} ms"),
                                 (gaps, f"ref_gap {gap_ms:g} ms"),
                                 (discards, f"discard {discard:g}"),
                                 (warmups, f"warm-up {warmup or 0:g}"),
                                 (sessions, f"reference sessions {session or 0:g}"),
                                 (runs, "k kept" if k is None else f"k {k or 'probed'}"),
                                 (layouts, f"layout {layout}"),
                                 (model_sessions, f"model sessions {loads or 0:g}")):
                if windowed and len(values) > 1:
                    label += f", {name}"
            variants.append((label, protocol, {
                "block_ms": block_ms, "ref_gap_ms": gap_ms, "ref_share": share,
                "discard_runs": int(discard),
                **({} if warmup is None or not windowed else {"warmup_runs": int(warmup)}),
                **({} if session is None or not windowed
                   else {"reference_sessions": int(session)}),
                **({} if k is None or not windowed else {"block_runs": k}),
                **({} if layout is None or not windowed else {"address_layout": layout}),
                **({} if loads is None or not windowed else {"model_sessions": int(loads)})}))
    return variants


def comma_list(parser: argparse.ArgumentParser, option: str, text: str,
               valid: Callable[[float], bool], wanted: str) -> List[float]:
    """A comma list of numbers given to `option`: distinct, finite and `valid`, or the
    parser's error saying what it takes (`wanted`)."""
    try:
        numbers = [float(part) for part in text.split(",") if part]
    except ValueError:
        numbers = []
    if not numbers or len(set(numbers)) != len(numbers) or \
            not all(math.isfinite(v) and valid(v) for v in numbers):
        parser.error(f"{option} takes {wanted}, got {text!r}")
    return numbers


def session_counts(parser: argparse.ArgumentParser, option: str, text: Optional[str]
                   ) -> Sequence[Optional[float]]:
    """A sessions option's comma list (--reference-sessions, --model-sessions): whole
    numbers from 1 to 8, as the agent takes them; [None] (the agent's default) if not
    given."""
    if text is None:
        return [None]
    return comma_list(parser, option, text, lambda v: v == int(v) and 1 <= v <= 8,
                      "distinct whole numbers from 1 to 8, like 1,2")


def block_runs_list(parser: argparse.ArgumentParser, text: str) -> List[Optional[int]]:
    """--block-runs' comma list: "kept" (None: the k the device's history implies), 0
    (probed) or counts of the agent's ladder (BLOCK_RUNS), distinct; else the parser's
    error."""
    from agents.ort_agent import BLOCK_RUNS

    values: List[Optional[int]] = []
    for part in text.split(","):
        if part == "kept":
            values.append(None)
        elif part.isdigit() and int(part) in (0,) + BLOCK_RUNS:
            values.append(int(part))
        else:
            values = []
            break
    if not values or len(set(values)) != len(values):
        parser.error(f"--block-runs takes distinct values \"kept\", 0 or counts of "
                     f"{BLOCK_RUNS}, like kept,0, got {text!r}")
    return values


def folder(label: str) -> str:
    """A variant's folder name: "rounds, ref_share 0.25" -> "rounds-ref_share0.25"."""
    return label.replace(", ", "-").replace(" ", "")


def emit(line: str, out: Path) -> None:
    print(line, flush=True)
    with open(out, "a") as table:
        table.write(line + "\n")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the table (markdown) written")
    parser.add_argument("--subnets", type=int, default=40)
    parser.add_argument("--space", default="harness.spaces:ProxylessSpace")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="timed device time per subnet and pass (default 1)")
    parser.add_argument("--conditions", default="idle,other-cores,same-core")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS))
    parser.add_argument("--trace", type=Path, action="append", default=[],
                        help="a noise trace a simulated device replays (repeatable)")
    parser.add_argument("--replay-pairs", type=int, default=4,
                        help="pairs of passes per protocol on each trace, each pass from "
                             "another place in it (default 4)")
    parser.add_argument("--passes", type=int, default=2,
                        help="passes per variant under each condition (default 2); the rows "
                             "pool every pair of them")
    parser.add_argument("--sim-ms", type=float, default=10.0,
                        help="a typical subnet's latency on the simulated device")
    parser.add_argument("--home", type=Path, help="HARNESS_HOME (default: a new folder)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--block-ms", default="10",
                        help="rounds: block length (ms); a comma list runs each windowed "
                             "protocol once per length")
    parser.add_argument("--arm64-size", type=int, default=32,
                        help="the arm64 condition's input size (an emulated board is slow)")
    parser.add_argument("--ref-gap-ms", default="150",
                        help="rounds: device time between reference blocks at most (ms); a "
                             "comma list runs each windowed protocol once per gap")
    parser.add_argument("--discard-runs", default="0",
                        help="rounds: runs a block throws away before its timed runs; a comma "
                             "list runs each windowed protocol once per count")
    parser.add_argument("--warmup-runs", default=None,
                        help="rounds: runs each model warms up with after its first (default: "
                             "the agent's, none in rounds); a comma list runs each windowed "
                             "protocol once per count")
    parser.add_argument("--reference-sessions", default=None,
                        help="rounds: sessions the reference is loaded in (default: the "
                             "agent's, 1); a comma list runs each windowed protocol once per "
                             "count")
    parser.add_argument("--model-sessions", default=None,
                        help="rounds: sessions each candidate is loaded in (default: the "
                             "agent's, 1); a comma list runs each windowed protocol once per "
                             "count")
    parser.add_argument("--block-runs", default=None,
                        help="rounds: timed runs per block, \"kept\" (the default: the k the "
                             "device's history implies), 0 (probed in every window) or a count of "
                             "1, 2, 3, 4, 6, 8, 12...; a comma list runs each windowed protocol "
                             "once per value")
    parser.add_argument("--layout", default=None,
                        help="rounds on local: the agent's address layout, \"fixed\" (its "
                             "default) or \"randomized\"; a comma list runs each windowed "
                             "protocol once per layout")
    parser.add_argument("--ref-share", default="1",
                        help="rounds: the reference's most share of a window's device time; "
                             "a comma list runs each windowed protocol once per share")
    parser.add_argument("--rel-ci", type=float, default=0.01,
                        help="ci and ci-rounds: the 95%% interval's half-width they stop at")
    args = parser.parse_args(argv)
    if args.passes < 2:
        parser.error(f"--passes takes a count of at least 2, got {args.passes}")
    if args.replay_pairs < 1:
        parser.error(f"--replay-pairs takes a count of at least 1, got {args.replay_pairs}")
    if not 0 < args.rel_ci < 1:
        parser.error(f"--rel-ci takes a share above 0 and below 1, got {args.rel_ci!r}")
    shares = comma_list(parser, "--ref-share", args.ref_share, lambda v: 0 < v <= 1,
                        "distinct shares above 0 and at most 1, like 0.25,1")
    blocks = comma_list(parser, "--block-ms", args.block_ms, lambda v: v > 0,
                        "distinct positive lengths in ms, like 10,20")
    gaps = comma_list(parser, "--ref-gap-ms", args.ref_gap_ms, lambda v: v > 0,
                      "distinct positive gaps in ms, like 100,150")
    discards = comma_list(parser, "--discard-runs", args.discard_runs,
                          lambda v: v == int(v) and 0 <= v <= 10,
                          "distinct whole numbers from 0 to 10, like 0,1")
    warmups: Sequence[Optional[float]] = [None] if args.warmup_runs is None else comma_list(
        parser, "--warmup-runs", args.warmup_runs, lambda v: v == int(v) and 0 <= v <= 1000,
        "distinct whole numbers from 0 to 1000, like 0,10")
    sessions = session_counts(parser, "--reference-sessions", args.reference_sessions)
    loads = session_counts(parser, "--model-sessions", args.model_sessions)
    runs: Sequence[Optional[int]] = [None] if args.block_runs is None else block_runs_list(
        parser, args.block_runs)
    layouts: Sequence[Optional[str]] = [None] if args.layout is None else \
        args.layout.split(",")
    if args.layout is not None and (len(set(layouts)) != len(layouts)
                                    or not set(layouts) <= {"fixed", "randomized"}):
        parser.error(f"--layout takes distinct layouts of fixed and randomized, like "
                     f"fixed,randomized, got {args.layout!r}")
    if args.layout is not None and ("arm64" in args.conditions.split(",") or args.trace):
        parser.error("--layout reaches only an agent this process starts (local): leave it "
                     "out with the arm64 condition and with --trace")

    import torch

    from harness import random_samples
    from harness.steps.measuring import windows

    space, space_name = space_at_input(parser, args.space, args.input_size)
    dummy = torch.randn(1, 3, args.input_size, args.input_size)
    samples = random_samples(space, args.subnets, seed=args.seed)
    arm_space, _ = space_at_input(parser, args.space, args.arm64_size)
    arm_dummy = torch.randn(1, 3, args.arm64_size, args.arm64_size)
    arm_samples = random_samples(arm_space, args.subnets, seed=args.seed)
    home = args.home or temporary_folder("bench-noise-")
    protocols = [p for p in args.protocols.split(",") if p]
    variants = schedule_variants(protocols, shares, blocks, gaps, discards, warmups, sessions,
                                 runs, layouts, loads)
    conditions = [c for c in args.conditions.split(",") if c]
    from harness.export.graph import export_sample
    window = len(windows([export_sample(space, s, dummy, home=home) for s in samples],
                         sessions=int(loads[0] or 1))[0])
    args.out.write_text("")
    bounded = "" if shares == [1.0] else f" (or at most {shares[0]:g} of the device time)" \
        if len(shares) == 1 else " (or at most the share each row names)"
    ci_rules = f", ci rules at +-{args.rel_ci * 100:g}%" \
        if {"ci", "ci-rounds"} & set(protocols) else ""
    emit(f"bench_noise: {len(samples)} subnets of {space_name}"
         f"{f' (arm64: {args.arm64_size} px)' if 'arm64' in conditions else ''}, "
         f"{args.seconds:g} s of timed runs per subnet and pass, agent on CPU 0, windows of "
         f"{window}{' (fewer with more model sessions)' if len(loads) > 1 else ''}, "
         f"blocks of {' or '.join(f'{b:g}' for b in blocks)} ms, references at most "
         f"{' or '.join(f'{g:g}' for g in gaps)} ms "
         f"apart{bounded}{ci_rules} "
         f"({time.ctime()})\n", args.out)
    emit(HEADER, args.out)
    emit("|" + "---|" * (HEADER.count("|") - 1), args.out)
    raw: Dict[str, Any] = {}
    for condition in conditions:
        board: Any = Arm64Board() if condition == "arm64" else contextlib.nullcontext()
        with Neighbour(CONDITIONS[condition], seed=args.seed), board:
            where = (space, dummy, samples) if condition != "arm64" else \
                (arm_space, arm_dummy, arm_samples)
            passes: Dict[str, List[Any]] = {label: [] for label, _, _ in variants}
            for n in range(args.passes):  # every variant's first pass, then its second...
                for label, protocol, rounds in variants:
                    pass_home = home / condition / folder(label)  # the device's one home
                    device = board.register(pass_home) if condition == "arm64" else "local"
                    seconds = args.seconds * WINDOW_BUDGET.get(protocol, 1.0)
                    passes[label].append(measure_pass(protocol, *where, device, pass_home,
                                                      seconds, rounds, args.rel_ci))
                    if n < args.passes - 1:
                        continue  # its rows as soon as its last pass is in
                    for statistic in statistics_of(protocol):
                        pairs = list(itertools.combinations(passes[label], 2))
                        emit(row(condition, label, statistic, pairs), args.out)
                        raw[f"{condition}/{label}/{statistic}"] = [
                            values(p, statistic) for p in passes[label]]
    for trace in args.trace:
        from devices.simulated import SimulatedModel, saved_clock_s
        from harness.steps.reference import reference_model

        spec = SimulatedModel(f"replay-{trace.stem}", args.sim_ms, seed=7)
        reference_ms = spec.graph_median_ms(reference_model(dummy, home).sha256)
        starts = replay_starts(trace, 2 * args.replay_pairs)
        for label, protocol, rounds in variants:
            replayed, virtual_s = [], []
            for n, start_s in enumerate(starts):  # each pass a device of its own (no history)
                pass_home = home / trace.stem / folder(label) / str(n)
                device = simulated_device(pass_home, trace, args.sim_ms, start_s=start_s)
                replayed.append(measure_pass(
                    protocol, space, dummy, samples, device, pass_home,
                    args.seconds * WINDOW_BUDGET.get(protocol, 1.0), rounds, args.rel_ci))
                virtual_s.append(saved_clock_s(pass_home, device) - start_s)
            latency = [spec.graph_median_ms(m.provenance.model_sha256) for m in replayed[0]]
            pairs = list(zip(replayed[0::2], replayed[1::2]))
            for statistic in statistics_of(protocol):
                truth = [t / reference_ms for t in latency] if statistic == "ratio" else latency
                emit(row(f"replay {trace.stem}", label, statistic, pairs, truth,
                         statistics.fmean(virtual_s)), args.out)
    (args.out.with_suffix(".json")).write_text(json.dumps(raw))
    return 0


if __name__ == "__main__":
    sys.exit(main())
