"""The benchmarks on the replaying simulated device (correctness, no timing): the decisions
table is written row by row, so a run that dies midway still leaves the figures it had; the
noise table scores every replayed pass against the exact truth."""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_decisions  # noqa: E402


def run(out: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", [
        "bench_decisions.py", "--out", str(out), "--samples", "6", "--size", "32",
        "--conditions", "replay", "--truth-dir", str(tmp_path / "truth")])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # its folder (benchlib's)
    bench_decisions.main()


def test_the_decisions_table_scores_every_strategy_against_the_exact_truth(tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "table.md"
    run(out, monkeypatch, tmp_path)
    text = out.read_text()
    for strategy in ("fixed loop", "stop=ci", "limit-aware, rounds",
                     "limit-aware + model, rounds"):
        assert f"| {strategy}" in text
    assert "exact (simulated)" in text and "targets:" in text


def test_a_run_that_dies_leaves_the_rows_it_had(tmp_path, monkeypatch):
    from harness import LatencyProfiler

    def dies(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(LatencyProfiler, "decide_many", dies)
    out = tmp_path / "table.md"
    with pytest.raises(RuntimeError, match="went away"):
        run(out, monkeypatch, tmp_path)
    text = out.read_text()
    assert "| fixed loop |" in text and "| stop=ci (+-1%) |" in text  # written as they came
    assert "limit-aware" not in text.split("|---|")[-1]


def test_the_noise_table_replays_each_pair_of_passes_from_its_own_place_in_the_trace(
        tmp_path):
    """bench_noise on the replaying device: every pass of every pair is scored against the
    exact truth (not the last pass alone), and its device time is the virtual clock's, which
    moved from where the pass entered the trace."""
    import bench_noise

    out = tmp_path / "noise.md"
    trace = ROOT / "tests" / "fixtures" / "noise" / "loaded.json"
    assert bench_noise.main([
        "--out", str(out), "--subnets", "3", "--input-size", "32", "--seconds", "0.3",
        "--conditions", "", "--protocols", "loop,rounds", "--trace", str(trace),
        "--replay-pairs", "2", "--home", str(tmp_path / "home")]) == 0
    rows = [line.split(" | ") for line in out.read_text().splitlines()
            if line.startswith("| replay loaded")]
    assert [(r[1], r[2]) for r in rows] == [("loop", "median"), ("rounds", "ratio"),
                                            ("rounds", "quiet")]
    for cells in rows:
        assert 0.2 < float(cells[9]) < 5  # device-s per pass: virtual, about 3 x 0.3 s
        assert cells[13].endswith("%")  # error vs truth
    passes = sorted(p.name for p in (tmp_path / "home" / "loaded" / "rounds").iterdir())
    assert passes == ["0", "1", "2", "3"]
    clocks = [float((tmp_path / "home" / "loaded" / "rounds" / n / "sim-clock" /
                     "replay-loaded").read_text()) for n in passes]
    starts = bench_noise.replay_starts(trace, 4)
    assert starts[0] == 0 and starts[1] > 10  # spread over the 60 s trace
    assert all(start < clock < start + 5 for start, clock in zip(starts, clocks))


def test_the_noise_bench_refuses_no_pairs(tmp_path, capsys):
    import bench_noise

    with pytest.raises(SystemExit):
        bench_noise.main(["--out", str(tmp_path / "n.md"), "--replay-pairs", "0"])
    assert "--replay-pairs takes a count of at least 1" in capsys.readouterr().err


def test_the_noise_bench_runs_each_window_once_per_value_of_each_schedule_list(tmp_path,
                                                                              capsys):
    """Lists of shares, block lengths, reference gaps, discarded runs, warm-up runs,
    reference sessions, runs per block, address layouts and candidate sessions label the
    windowed rows with what varies; a loop runs once; a value out of its list's range is
    refused, naming the option."""
    import bench_noise

    variants = bench_noise.schedule_variants(["loop", "rounds"], [1.0], [10.0, 20.0], [150.0])
    assert [(label, rounds["block_ms"]) for label, _, rounds in variants] == [
        ("loop", 10.0), ("rounds, blocks 10 ms", 10.0), ("rounds, blocks 20 ms", 20.0)]
    both = bench_noise.schedule_variants(["paired"], [0.25, 1.0], [10.0, 20.0], [100.0])
    assert [label for label, _, _ in both] == [
        "paired, ref_share 0.25, blocks 10 ms", "paired, ref_share 0.25, blocks 20 ms",
        "paired, ref_share 1, blocks 10 ms", "paired, ref_share 1, blocks 20 ms"]
    assert all(rounds["ref_gap_ms"] == 100.0 for _, _, rounds in both)
    gaps = bench_noise.schedule_variants(["loop", "rounds"], [1.0], [10.0], [100.0, 150.0])
    assert [(label, rounds["ref_gap_ms"]) for label, _, rounds in gaps] == [
        ("loop", 100.0), ("rounds, ref_gap 100 ms", 100.0), ("rounds, ref_gap 150 ms", 150.0)]
    discards = bench_noise.schedule_variants(["rounds"], [1.0], [10.0], [150.0], [0, 1])
    assert [(label, rounds["discard_runs"]) for label, _, rounds in discards] == [
        ("rounds, discard 0", 0), ("rounds, discard 1", 1)]
    warmups = bench_noise.schedule_variants(["loop", "rounds"], [1.0], [10.0], [150.0], [0],
                                            [2, 10])
    assert [(label, rounds.get("warmup_runs")) for label, _, rounds in warmups] == [
        ("loop", None), ("rounds, warm-up 2", 2), ("rounds, warm-up 10", 10)]
    assert all("warmup_runs" not in rounds for _, _, rounds in variants)  # the agent's own
    sessions = bench_noise.schedule_variants(["loop", "rounds"], [1.0], [10.0], [150.0], [0],
                                             [None], [1, 4])
    assert [(label, rounds.get("reference_sessions")) for label, _, rounds in sessions] == [
        ("loop", None), ("rounds, reference sessions 1", 1), ("rounds, reference sessions 4", 4)]
    runs = bench_noise.schedule_variants(["rounds"], [1.0], [10.0], [150.0], [0], [None],
                                         [None], [None, 0, 3])
    assert [(label, rounds.get("block_runs", "kept")) for label, _, rounds in runs] == [
        ("rounds, k kept", "kept"), ("rounds, k probed", 0), ("rounds, k 3", 3)]
    assert bench_noise.block_runs_list(argparse.ArgumentParser(), "kept,0,3") == [None, 0, 3]
    layouts = bench_noise.schedule_variants(["loop", "rounds"], [1.0], [10.0], [150.0], [0],
                                            [None], [None], [None], ["fixed", "randomized"])
    assert [(label, rounds.get("address_layout")) for label, _, rounds in layouts] == [
        ("loop", None), ("rounds, layout fixed", "fixed"),
        ("rounds, layout randomized", "randomized")]
    loads = bench_noise.schedule_variants(["loop", "rounds"], [1.0], [10.0], [150.0], [0],
                                          [None], [None], [None], [None], [1, 2])
    assert [(label, rounds.get("model_sessions")) for label, _, rounds in loads] == [
        ("loop", None), ("rounds, model sessions 1", 1), ("rounds, model sessions 2", 2)]
    with bench_noise.agent_layout("randomized"):  # what a local agent started inside inherits
        assert os.environ["HARNESS_AGENT_LAYOUT"] == "randomized"
        with bench_noise.agent_layout("fixed"):
            assert "HARNESS_AGENT_LAYOUT" not in os.environ
        assert os.environ["HARNESS_AGENT_LAYOUT"] == "randomized"
    assert "HARNESS_AGENT_LAYOUT" not in os.environ
    with pytest.raises(SystemExit):
        bench_noise.main(["--out", str(tmp_path / "n.md"), "--passes", "1"])
    assert "--passes takes" in capsys.readouterr().err
    for option, zero in (("--block-ms", "0"), ("--ref-gap-ms", "0"), ("--discard-runs", "1.5"),
                         ("--warmup-runs", "1.5"), ("--reference-sessions", "0"),
                         ("--block-runs", "1001"), ("--layout", "aslr"),
                         ("--model-sessions", "0")):
        for bad in (zero, "nan", "10,10", "ten", "-5"):
            with pytest.raises(SystemExit):
                bench_noise.main(["--out", str(tmp_path / "n.md"), option, bad])
            assert f"{option} takes" in capsys.readouterr().err
    for elsewhere in (["--conditions", "arm64"], ["--trace", "loaded.json"]):
        with pytest.raises(SystemExit):
            bench_noise.main(["--out", str(tmp_path / "n.md"), "--layout", "fixed", *elsewhere])
        assert "--layout reaches only" in capsys.readouterr().err


class Timed:
    """A measurement as bench_noise's rows read one: a value, its device time, no rounds."""

    def __init__(self, value: float):
        self.value, self.device_s, self.interleaved = value, 1.0, None

    def statistic(self, name: str) -> float:
        return self.value


def test_a_noise_row_pools_its_pairs_and_scores_every_pass_against_the_truth():
    import bench_noise

    truth = [1.0, 2.0, 3.0, 4.0]
    exact = [Timed(t) for t in truth]
    off = [Timed(t * 1.10) for t in truth]  # 10% off the truth and off the exact pass
    line = bench_noise.row("replay", "loop", "median", [(exact, exact), (exact, off)], truth)
    cells = line.split(" | ")
    assert cells[4] == "50%"  # within 2% of itself: one pair of two
    assert cells[8] == "1.000"  # tau: both pairs rank alike
    assert cells[9] == "4.0"  # device-s per pass: 4 subnets x 1 s
    assert cells[13] == "75%"  # error vs truth: 3 exact passes of 4, not the last pass alone
    assert line.endswith("| 5.00% |")  # pass shift: the median of the pairs' 0% and 10%
