#!/usr/bin/env python3
"""A search under a real latency limit on a chosen device.

Random search or regularized evolution over a space, with constraints chained cheapest
first (an optional FLOPs limit, then the device latency limit, so the device only sees
samples that pass the cheaper check). The accuracy proxy is SynFlow (Tanaka et al. 2020;
a training-free NAS proxy, Abdelfattah et al. 2021): the summed |theta * dR/dtheta| of the
network with absolute weights on an all-ones input. Prints the best samples and saves a PNG
of proxy vs latency with the Pareto front.

    python3 scripts/latency_constrained_search.py --space harness.spaces:ProxylessSpace \\
        --device local --latency-ms 20 --strategy evolution --budget 40 --png front.png
"""
import argparse
import math
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from harness import LatencyProfiler  # noqa: E402
from harness.counting import FlopsProfiler  # noqa: E402
from harness.export import freeze  # noqa: E402
from harness.search import Chain, Filter, Random, RegularizedEvolution, run_search  # noqa: E402
from harness.space import load_space  # noqa: E402


def synflow(module: torch.nn.Module, input_shape: Tuple[int, ...]) -> float:
    """log10 of the SynFlow score (higher suggests a better network, before any training)."""
    module = module.double().eval()
    signs = {}
    with torch.no_grad():
        for name, parameter in module.state_dict().items():
            signs[name] = torch.sign(parameter)
            parameter.abs_()
    module.zero_grad()
    output = module(torch.ones((1, *input_shape[1:]), dtype=torch.float64))
    torch.sum(output).backward()
    score = sum((p * p.grad).abs().sum().item() for p in module.parameters() if p.grad is not None)
    return math.log10(score) if score > 0 else float("-inf")


def pareto(points: List[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Points not beaten on both latency (lower) and proxy (higher)."""
    front, best = [], float("-inf")
    for latency, proxy in sorted(points):
        if proxy > best:
            front.append((latency, proxy))
            best = proxy
    return front


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--space", default="harness.spaces:ProxylessSpace")
    parser.add_argument("--device", default="local")
    parser.add_argument("--latency-ms", type=float, required=True, help="latency limit (median)")
    parser.add_argument("--flops-limit", type=float, help="optional MACs limit, checked first")
    parser.add_argument("--strategy", choices=("random", "evolution"), default="evolution")
    parser.add_argument("--budget", type=int, default=40, help="samples to evaluate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-time-ms", type=float, default=300.0)
    parser.add_argument("--png", default="latency_front.png")
    args = parser.parse_args()

    space = load_space(args.space)
    dummy = space.dummy_input()
    flops = FlopsProfiler(space, dummy)
    latency = LatencyProfiler(space, dummy, device=args.device,
                              settings={"min_time_ms": args.min_time_ms, "min_runs": 20})
    if args.strategy == "random":
        strategy = Random(space, seed=args.seed)
    else:
        strategy = RegularizedEvolution(space, population_size=max(4, args.budget // 4),
                                        sample_size=3, seed=args.seed)
    seen: Dict[str, float] = {}

    def within_latency(sample: dict) -> bool:
        value = latency.profile(sample)
        seen[repr(sorted(sample.items()))] = value
        return value <= args.latency_ms

    middlewares = []
    if args.flops_limit:
        middlewares.append(Filter(lambda s: flops.profile(s) <= args.flops_limit, patience=10000))
    device_filter = Filter(within_latency, metric_for_invalid=float("-inf") if
                           args.strategy == "evolution" else None, patience=200)
    middlewares.append(device_filter)
    result = run_search(Chain(strategy, *middlewares),
                        lambda s: synflow(freeze(space, s), tuple(dummy.shape)), args.budget)
    latency.close()

    print(f"{len(result.history)} samples within {args.latency_ms} ms on {args.device}; "
          f"{device_filter.rejected} over the limit; device measurements: "
          f"{latency.counters['measurements']}, cache hits: {latency.counters['cache_hits']}")
    print(f"\n{'rank':<5}{'proxy (log10 SynFlow)':>22}{'latency ms':>12}{'MMACs':>9}")
    for rank, (sample, proxy) in enumerate(result.top(5), 1):
        print(f"{rank:<5}{proxy:>22.3f}{latency.profile(sample):>12.3f}"
              f"{flops.profile(sample) / 1e6:>9.1f}")
    best, _ = result.best
    print(f"\nbest sample: {best}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(latency.profile(s), proxy) for s, proxy in result.history]
    figure, axes = plt.subplots(figsize=(6, 4))
    axes.scatter([p[0] for p in points], [p[1] for p in points], s=14, label="within limit")
    front = pareto(points)
    axes.plot([p[0] for p in front], [p[1] for p in front], "r-o", ms=4, label="Pareto front")
    axes.axvline(args.latency_ms, color="gray", ls="--", label=f"limit {args.latency_ms} ms")
    axes.set_xlabel(f"median latency on {args.device} (ms)")
    axes.set_ylabel("accuracy proxy: log10 SynFlow")
    axes.set_title(f"{args.strategy} search, {type(space).__name__}")
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)
    print(f"saved {args.png}")


if __name__ == "__main__":
    main()
