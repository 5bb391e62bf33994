"""The decisions benchmark on the replaying simulated device: its table is written row by
row, so a run that dies midway still leaves the figures it had (correctness, no timing)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_decisions  # noqa: E402


def run(out: Path, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", [
        "bench_decisions.py", "--out", str(out), "--samples", "6", "--size", "32",
        "--conditions", "replay", "--truth-dir", str(tmp_path / "truth")])
    monkeypatch.setattr(bench_decisions.tempfile, "tempdir", str(tmp_path))  # its folder
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
