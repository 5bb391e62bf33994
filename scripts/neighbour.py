#!/usr/bin/env python3
"""A noisy neighbour the benchmarks bring themselves: seeded bursts of CPU work and memory
traffic with pauses between them, pinned to the CPUs it is given, so that "under load" is the
same load on every run and on any machine.

    python3 scripts/neighbour.py --cpus 1 --seed 0 [--duration 3600]

One worker process per CPU it is given, each pinned to its CPU. A burst is CPU work (small
matrix products) or memory traffic (copies of a 64 MiB array, larger than the caches), for
50-600 ms; a pause lasts 0-400 ms; the sequence is drawn from the seed. The neighbour stops
by itself when its duration is over, when its parent (the benchmark) is gone, or on SIGTERM;
benchlib.Neighbour starts it and always stops it, also on Ctrl-C or a failure.
"""
import argparse
import os
import random
import signal
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # one core's worth of work per worker
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def parse_cpus(text: str) -> list:
    """'1', '0,2' or '4-7' -> a list of CPU numbers."""
    cpus = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        cpus += list(range(int(first), int(last or first) + 1))
    return cpus


def work(cpu: int, seed: int, deadline: float, parent: int) -> None:
    """One worker's bursts and pauses on `cpu` until the deadline or the parent is gone."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, [cpu])
    draw = random.Random(f"{seed}:{cpu}")
    big = np.ones(8 * 2 ** 20)  # 64 MiB of float64
    spare = np.empty_like(big)
    small = np.random.default_rng(seed).random((192, 192))
    while time.monotonic() < deadline and os.getppid() == parent:
        burst_ends = time.monotonic() + draw.uniform(0.05, 0.6)
        memory = draw.random() < 0.5
        while time.monotonic() < burst_ends:
            if memory:
                np.copyto(spare, big)
            else:
                small = small @ small
                small /= np.abs(small).max() or 1.0
        time.sleep(draw.uniform(0.0, 0.4))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpus", required=True, help="the CPUs to load: 1, 0,2 or 4-7")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=3600.0, help="seconds at most")
    args = parser.parse_args(argv)
    cpus = parse_cpus(args.cpus)
    if hasattr(os, "sched_getaffinity") and not set(cpus) <= os.sched_getaffinity(0):
        parser.error(f"--cpus {args.cpus}: this machine runs on CPUs "
                     f"{sorted(os.sched_getaffinity(0))}")
    parent = os.getppid()
    deadline = time.monotonic() + args.duration
    children = []
    for cpu in cpus:
        pid = os.fork()
        if pid == 0:  # a worker: gone with its parent (this process) or on SIGTERM
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            try:
                work(cpu, args.seed, deadline, os.getppid())
            finally:
                os._exit(0)
        children.append(pid)

    def stop(*_: object) -> None:
        for child in children:  # one already gone is passed over
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                pass
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    running = set(children)
    while running and time.monotonic() < deadline and os.getppid() == parent:
        running -= {child for child in running if os.waitpid(child, os.WNOHANG)[0]}
        time.sleep(0.2)
    stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
