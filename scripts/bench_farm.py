#!/usr/bin/env python3
"""Farm throughput with 1, 2 and 4 test boards of one kind on the same samples, side by side.

Boards are network namespaces with a real sshd each (scripts/testfarm), all on this machine:
they share its cores, so scaling stops at the core count (2 here). The timed loop dominates
each measurement (1 s), so per-board efficiency = throughput(n) / (n * throughput(1)) shows
how much the farm itself costs. Needs root.

Usage: sudo python3 scripts/bench_farm.py [--samples N]
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchlib import load_testfarm  # also puts the repository on sys.path

from devices import registry  # noqa: E402
from harness import LatencyProfiler, random_samples  # noqa: E402
from harness.spaces import TinySpace  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    testfarm = load_testfarm()
    folder = Path(tempfile.mkdtemp(prefix="harness-bench-farm-"))
    key = testfarm.make_client_key(folder / "client")
    space = TinySpace()
    samples = random_samples(space, args.samples, seed=3)
    settings = {"warmup_runs": 5, "min_runs": 20, "min_time_ms": 1000.0, "max_time_ms": 5000.0}
    rows = []
    boards = []
    try:
        for count in (1, 2, 4):
            home = folder / f"home{count}"
            while len(boards) < count:
                boards.append(testfarm.Board(20 + len(boards), folder, key).start())
            for board in boards[:count]:
                name = f"board{board.index}"
                registry.add_device(home, registry.DeviceConfig(
                    name=name, transport="ssh", address=f"root@{board.address}", key=str(key),
                    python=sys.executable, workdir=board.workdir, kind="bench",
                    lock=board.workdir + ".lock"))
                registry.trust_device(home, name, lambda *_: True)
            with LatencyProfiler(space, space.dummy_input(), device="kind:bench", home=home,
                                 settings=settings, refresh=True) as profiler:
                profiler.measure_many(random_samples(space, 2 * count, seed=99))  # all boards up
                started = time.monotonic()
                profiler.measure_many(samples)
                elapsed = time.monotonic() - started
            rows.append((count, elapsed, len(samples) / elapsed))
    finally:
        for board in boards:
            board.destroy()
    base = rows[0][2]
    print(f"{'boards':>6}{'wall s':>9}{'subnets/s':>11}{'speed-up':>10}{'efficiency/board':>18}")
    print("-" * 54)
    for count, elapsed, rate in rows:
        print(f"{count:>6}{elapsed:>9.2f}{rate:>11.3f}{rate / base:>10.2f}{rate / base / count:>18.2f}")
    print(f"\n{len(samples)} TinySpace subnets, timed loop >= 1 s each; {os.cpu_count()} cores "
          f"shared by every board (the ceiling on speed-up); target 0.9/board where boards "
          f"are real")


if __name__ == "__main__":
    main()
