#!/usr/bin/env python3
"""Farm throughput: real test boards side by side, or a Ray farm of simulated devices at the
scale of a lab.

Boards (default): 1, 2 and 4 test boards of one kind on the same samples. Boards are network
namespaces with a real sshd each (scripts/testfarm), all on this machine: they share its
cores, so scaling stops at the core count (2 here). The timed loop dominates each
measurement (1 s), so per-board efficiency = throughput(n) / (n * throughput(1)) shows how
much the farm itself costs. Needs root.

Simulated (--simulated 16,64,256): for each size, a Ray farm on loopback (a head, and
`harness farm serve` hosts of at most 64 simulated devices each, at least two) gets
`--jobs-per-device` jobs per device through the RayPool a profiler uses. A simulated device
runs the agent's fixed loop on a virtual clock (>= 50 runs and >= 1 s) and sleeps as long,
spending no CPU, so what is measured is the farm: throughput, efficiency per device (device
busy time / (devices x wall time)), scheduler overhead per job ((devices x wall - busy) /
jobs) and the time from submit to the first result (against the shortest job).

Usage: sudo python3 scripts/bench_farm.py [--samples N]
       python3 scripts/bench_farm.py --simulated 16,64,256 [--jobs-per-device 8]
"""
import argparse
import os
import sys
import time
from typing import List

from benchlib import SimFarm, load_testfarm, temporary_folder  # also sys.path

from devices import registry  # noqa: E402
from harness import LatencyProfiler, random_samples  # noqa: E402
from harness.spaces import TinySpace  # noqa: E402



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--simulated", metavar="SIZES",
                        help="comma-separated farm sizes of simulated devices, e.g. 16,64,256")
    parser.add_argument("--jobs-per-device", type=int, default=8)
    parser.add_argument("--devices-per-host", type=int, default=64)
    args = parser.parse_args()
    if args.simulated:
        simulated(sorted(int(size) for size in args.simulated.split(",")),
                  args.jobs_per_device, args.devices_per_host)
    else:
        boards(args.samples)


def simulated(sizes: List[int], jobs_per_device: int, per_host: int) -> None:
    """The simulated farm's table (see the module docstring)."""
    from harness.pool.device_pool import MeasureRequest
    from harness.export.graph import ExportedModel
    from harness.pool.ray_pool import RayPool, import_ray

    testfarm = load_testfarm()
    folder = temporary_folder("harness-bench-simfarm-")
    farm = SimFarm(folder, testfarm.free_port())
    ray = import_ray()
    rows = []
    try:
        for size in sizes:
            hosts = max(2, -(-size // per_host))
            started = time.monotonic()
            for index in range(hosts):
                farm.add_host(f"s{size}h{index}", size // hosts + (index < size % hosts))
            serve_s = time.monotonic() - started
            pool = RayPool(farm.address, "sim", farm.client)
            assert pool.slots() == size, (pool.slots(), size)
            request = MeasureRequest.checked({}, timeout_s=600.0)  # the fixed loop: 50 runs, 1 s
            jobs = [(index, ExportedModel(os.urandom(32), f"bench-{size}-{index}"))
                    for index in range(size * jobs_per_device)]
            busy_s, failed, first_s, shortest_s = 0.0, 0, None, float("inf")
            started = time.monotonic()
            for outcome in pool.measure_many(jobs, request):
                if outcome.result is None:
                    failed += 1
                    continue
                result = outcome.result
                job_s = (result.load_ms + (result.warmup_ms or 0.0) + result.loop_ms) / 1e3
                busy_s += job_s
                shortest_s = min(shortest_s, job_s)
                if first_s is None:
                    first_s = time.monotonic() - started
            wall_s = time.monotonic() - started
            ray.shutdown()
            rows.append((size, hosts, len(jobs), failed, wall_s, busy_s, first_s or 0.0,
                         shortest_s, serve_s))
            print(f"{size} devices done: {len(jobs) / wall_s:.1f} jobs/s, efficiency "
                  f"{busy_s / (size * wall_s):.3f}", flush=True)
            for name in list(farm.hosts):
                farm.stop_host(name)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        farm.stop()
    print(f"\n{'devices':>7}{'hosts':>6}{'jobs':>6}{'failed':>7}{'wall s':>8}{'jobs/s':>8}"
          f"{'efficiency':>11}{'overhead/job ms':>16}{'first result s':>15}{'shortest job s':>15}"
          f"{'serve s':>8}")
    print("-" * 107)
    for size, hosts, jobs, failed, wall, busy, first, shortest, serve_s in rows:
        overhead_ms = (size * wall - busy) / jobs * 1e3
        print(f"{size:>7}{hosts:>6}{jobs:>6}{failed:>7}{wall:>8.2f}{jobs / wall:>8.1f}"
              f"{busy / (size * wall):>11.3f}{overhead_ms:>16.1f}{first:>15.2f}{shortest:>15.2f}"
              f"{serve_s:>8.1f}")
    print(f"\nsimulated devices (median 10 ms a run, fixed loop >= 50 runs and >= 1 s a job), "
          f"{jobs_per_device} jobs per device, Ray nodes on loopback sharing {os.cpu_count()} "
          f"cores with the client; targets: efficiency >= 0.9 at 64 devices, >= 0.8 at 256")


def boards(samples_count: int) -> None:
    """The test boards' table (see the module docstring)."""
    testfarm = load_testfarm()
    folder = temporary_folder("harness-bench-farm-")
    key = testfarm.make_client_key(folder / "client")
    space = TinySpace()
    samples = random_samples(space, samples_count, seed=3)
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
