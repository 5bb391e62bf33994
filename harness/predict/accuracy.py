"""How well predicted latencies match measured ones: nn-Meter's metrics, a table, a scatter.

- acc5 / acc10: the share of models whose prediction is within +-5% / +-10% of the measured
  latency (nn-Meter's headline metric);
- rmspe: root mean squared percentage error, in percent;
- kendall_tau: rank agreement (what a search that compares candidates cares about).
"""
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

METRICS = ("acc5", "acc10", "rmspe", "kendall_tau", "n")


def accuracy_metrics(predicted: Sequence[float], measured: Sequence[float]) -> Dict[str, float]:
    """acc5, acc10 (shares, 0..1), rmspe (%), kendall_tau and n for paired latencies."""
    from scipy.stats import kendalltau

    pred = np.asarray(predicted, dtype=float)
    true = np.asarray(measured, dtype=float)
    if pred.shape != true.shape or pred.size == 0:
        raise ValueError(f"need equal, non-empty series; got {pred.size} and {true.size}")
    if not np.all(true > 0):
        raise ValueError("measured latencies must be positive")
    error = (pred - true) / true
    tau = kendalltau(pred, true).statistic if pred.size > 1 else float("nan")
    return {"acc5": float(np.mean(np.abs(error) <= 0.05)),
            "acc10": float(np.mean(np.abs(error) <= 0.10)),
            "rmspe": float(np.sqrt(np.mean(error ** 2)) * 100),
            "kendall_tau": float(tau), "n": int(pred.size)}


def render_report(report: Dict[str, Dict[str, float]]) -> str:
    """A table, one row per predictor."""
    header = ["predictor", "+-5% acc", "+-10% acc", "RMSPE", "Kendall tau", "n"]
    rows = [header] + [[name, f"{m['acc5']:.1%}", f"{m['acc10']:.1%}", f"{m['rmspe']:.1f}%",
                        f"{m['kendall_tau']:.3f}", str(m["n"])] for name, m in report.items()]
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in rows)


def save_scatter(points: Dict[str, List[Tuple[float, float]]], path: Path,
                 title: str = "") -> Optional[Path]:
    """A PNG of predicted vs measured (log-log) per series, with the +-10% band; None when
    matplotlib is not installed (pip install 'harness[plot]')."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(figsize=(6, 6))
    everything = [v for series in points.values() for pair in series for v in pair if v > 0]
    low, high = min(everything) * 0.8, max(everything) * 1.25
    line = np.geomspace(low, high, 50)
    axes.plot(line, line, color="black", linewidth=1, label="exact")
    axes.fill_between(line, line * 0.9, line * 1.1, color="grey", alpha=0.2, label="+-10%")
    for name, series in points.items():
        predicted, measured = zip(*series)
        metrics = accuracy_metrics(predicted, measured)
        axes.scatter(measured, predicted, s=14,
                     label=f"{name} (+-10%: {metrics['acc10']:.0%}, "
                           f"RMSPE {metrics['rmspe']:.1f}%)")
    axes.set(xscale="log", yscale="log", xlim=(low, high), ylim=(low, high),
             xlabel="measured latency (ms, median)", ylabel="predicted latency (ms)",
             title=title)
    axes.legend(fontsize=8, loc="upper left")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
