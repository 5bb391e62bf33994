#!/usr/bin/env python3
"""A search under a real latency limit on a chosen device.

Random search or regularized evolution over a space, with constraints chained cheapest
first (an optional FLOPs limit, then the device latency limit, so the device only sees
samples that pass the cheaper check). The accuracy proxy is training-free: by default NASWOT
(Mellor et al. 2021, "Neural Architecture Search without Training"): log|det K| of the
kernel of binary activation codes of the network's rectifier units over a mini-batch of
random inputs, which tells apart networks that separate inputs from networks that do not;
`--proxy synflow` keeps SynFlow (Tanaka et al. 2020), which saturates on ReLU6 networks
(the gradient reaches few parameters through clamped units, so every subnet scores nearly
the same). The proxy's spread over the evaluated samples is printed, so a proxy that does
not separate architectures is seen.

Prints the best samples, how many each filter rejected, and saves a PNG of proxy vs
measured latency: samples within the limit, samples the device rejected (grey, their proxy
computed for the plot only), and the Pareto front.

    python3 scripts/latency_constrained_search.py --space harness.spaces:ProxylessSpace \\
        --device local --latency-ms 20 --strategy evolution --budget 40 --png front.png
"""
import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from harness import LatencyProfiler  # noqa: E402
from harness.metrics.counting import FlopsProfiler  # noqa: E402
from harness.export.graph import freeze  # noqa: E402
from harness.search.strategies import Chain, Filter, Random, RegularizedEvolution, run_search  # noqa: E402
from harness.spaces.space import load_space  # noqa: E402


ACTIVATIONS = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.Hardswish, torch.nn.LeakyReLU,
               torch.nn.GELU, torch.nn.SiLU)


def naswot(module: torch.nn.Module, input_shape: Tuple[int, ...], batch: int = 16,
           seed: int = 0) -> float:
    """NASWOT score: log|det K| with K[i, j] = the number of rectifier units on which inputs
    i and j agree (both active or both inactive); higher suggests a better network."""
    codes: List[torch.Tensor] = []

    def hook(_: torch.nn.Module, args: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        codes.append((args[0].detach().flatten(1) > 0).double())

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, ACTIVATIONS)]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, *input_shape[1:]), generator=generator)
    try:
        with torch.no_grad():
            module.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    if not codes:
        raise SystemExit(f"{type(module).__name__} has no rectifier units for NASWOT; "
                         f"use --proxy synflow")
    c = torch.cat(codes, dim=1)
    kernel = c @ c.t() + (1 - c) @ (1 - c).t()
    return float(torch.linalg.slogdet(kernel)[1])


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


PROXIES = {"naswot": naswot, "synflow": synflow}


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
    parser.add_argument("--proxy", choices=sorted(PROXIES), default="naswot")
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
    rejected: List[dict] = []
    proxy_of = PROXIES[args.proxy]

    def proxy(sample: dict) -> float:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)  # the same weights for a sample, run after run
            return proxy_of(freeze(space, sample), tuple(dummy.shape))

    def within_latency(sample: dict) -> bool:
        value = latency.profile(sample)
        seen[repr(sorted(sample.items()))] = value
        if value > args.latency_ms:
            rejected.append(sample)
        return value <= args.latency_ms

    middlewares = []
    flops_filter = None
    if args.flops_limit:
        flops_filter = Filter(lambda s: flops.profile(s) <= args.flops_limit, patience=10000)
        middlewares.append(flops_filter)
    device_filter = Filter(within_latency, metric_for_invalid=float("-inf") if
                           args.strategy == "evolution" else None, patience=200)
    middlewares.append(device_filter)
    result = run_search(Chain(strategy, *middlewares), proxy, args.budget)
    latency.close()

    print(f"{len(result.history)} samples within {args.latency_ms} ms on {args.device}; "
          f"{device_filter.rejected} over the limit; "
          f"{flops_filter.rejected if flops_filter else 0} rejected by the FLOPs filter "
          f"(never measured); device measurements: "
          f"{latency.counters['measurements']}, cache hits: {latency.counters['cache_hits']}")
    values = [value for _, value in result.history]
    if values:
        print(f"proxy ({args.proxy}) over {len(values)} samples: min {min(values):.4f}, "
              f"max {max(values):.4f}, spread {max(values) - min(values):.4f}, "
              f"std {statistics.pstdev(values):.4f}")
    print(f"\n{'rank':<5}{'proxy (' + args.proxy + ')':>22}{'latency ms':>12}{'MMACs':>9}")
    for rank, (sample, value) in enumerate(result.top(5), 1):
        print(f"{rank:<5}{value:>22.3f}{latency.profile(sample):>12.3f}"
              f"{flops.profile(sample) / 1e6:>9.1f}")
    best, _ = result.best
    print(f"\nbest sample: {best}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(latency.profile(s), value) for s, value in result.history]
    figure, axes = plt.subplots(figsize=(6, 4))
    if rejected:
        grey = [(latency.profile(s), proxy(s)) for s in rejected]
        axes.scatter([p[0] for p in grey], [p[1] for p in grey], s=14, color="0.65",
                     label=f"over the limit ({len(grey)})")
    axes.scatter([p[0] for p in points], [p[1] for p in points], s=14,
                 label=f"within limit ({len(points)})")
    front = pareto(points)
    axes.plot([p[0] for p in front], [p[1] for p in front], "r-o", ms=4, label="Pareto front")
    if flops_filter and flops_filter.rejected:
        axes.plot([], [], " ", label=f"{flops_filter.rejected} rejected by FLOPs (not measured)")
    axes.axvline(args.latency_ms, color="gray", ls="--", label=f"limit {args.latency_ms} ms")
    axes.set_xlabel(f"median latency on {args.device} (ms)")
    axes.set_ylabel(f"accuracy proxy: {args.proxy}")
    axes.set_title(f"{args.strategy} search, {type(space).__name__}")
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(args.png, dpi=120)
    print(f"saved {args.png}")


if __name__ == "__main__":
    main()
