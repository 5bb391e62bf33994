#!/usr/bin/env python3
"""Soak a Ray farm of simulated devices while devices and whole hosts die and come back
(not in CI: it runs for --minutes, 30 by default).

A head and --hosts `harness farm serve` hosts with --devices-per-host simulated devices each
(scripts/benchlib.SimFarm) get rounds of jobs through the RayPool a profiler uses, each job a
distinct graph. Meanwhile, at random (seeded): a device is taken down (its sim-down file)
and brought back some seconds later, or a whole host is killed with SIGKILL (no drain: its
raylet, its actor and all) and served again later. At the end it reports:

- jobs lost: submitted but never answered, with a result or an error (must be 0);
- jobs failed: answered with an error (every device it was offered to failed it);
- results returned twice for one job (must be 0);
- duplicated measurements: a graph measured more than once on the devices (from the
  simulated devices' journals: a host killed after its device finished loses the result,
  and the job is measured again elsewhere: device time spent twice, never a wrong answer);
- results that differ from an undisturbed run's (must be 0): each result's runs against
  what the simulated model gives for that graph when nothing disturbs it.

Usage: python3 scripts/soak_farm.py [--minutes 30] [--hosts 3] [--devices-per-host 8]
"""
import argparse
import json
import random
import threading
import time
from collections import Counter
from typing import Dict, List

from benchlib import SimFarm, load_testfarm, temporary_folder  # also sys.path

from devices.simulated import SimulatedModel, down_path, simulated_names  # noqa: E402
from harness.pool.device_pool import MeasureRequest  # noqa: E402
from harness.export.graph import ExportedModel  # noqa: E402
from harness.pool.ray_pool import RayPool, import_ray  # noqa: E402

MEDIAN_MS = 10.0


class Churn(threading.Thread):
    """Takes devices down and back, kills hosts and serves them again, at random."""

    def __init__(self, farm: SimFarm, devices: Dict[str, List[str]], seed: int):
        super().__init__(name="churn", daemon=True)
        self.farm, self.devices, self.random = farm, devices, random.Random(seed)
        self.stopping = threading.Event()
        self.events: Counter = Counter()
        self.down: Dict[str, float] = {}     # device -> when it comes back
        self.dead: Dict[str, float] = {}     # host -> when it is served again

    def run(self) -> None:
        while not self.stopping.wait(self.random.uniform(1.0, 4.0)):
            now = time.monotonic()
            for device, back in list(self.down.items()):
                if back <= now:
                    self._set_down(device, False)
            for host, back in list(self.dead.items()):
                if back <= now:
                    self._revive(host)
            roll = self.random.random()
            if roll < 0.7:
                host = self.random.choice(sorted(self.devices))
                device = self.random.choice(self.devices[host])
                if device not in self.down:
                    self._set_down(device, True, now + self.random.uniform(3.0, 20.0))
            elif roll < 0.8 and not self.dead and len(self.devices) > 1:
                self._kill(self.random.choice(sorted(self.devices)),
                           now + self.random.uniform(10.0, 40.0))

    def settle(self) -> None:
        """Bring every device and host back."""
        self.stopping.set()
        self.join()
        for device in list(self.down):
            self._set_down(device, False)
        for host in list(self.dead):
            self._revive(host)

    def _set_down(self, device: str, down: bool, back: float = 0.0) -> None:
        host = device.rsplit("-", 1)[0]
        path = down_path(self.farm.hosts.get(host) or self.farm.folder / host, device)
        if down:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
            self.down[device] = back
            self.events["device down"] += 1
        else:
            path.unlink(missing_ok=True)
            self.down.pop(device, None)

    def _kill(self, host: str, back: float) -> None:
        from harness.pool.farm import _node_processes, read_record

        node = read_record(self.farm.hosts[host])
        if node is None:
            return
        for process in _node_processes(node.name):
            try:
                process.kill()
            except Exception:
                pass
        self.dead[host] = back
        self.events["host killed"] += 1

    def _revive(self, host: str) -> None:
        try:
            self.farm.add_host(host, len(self.devices[host]), MEDIAN_MS)
            self.dead.pop(host, None)
            self.events["host served again"] += 1
        except RuntimeError as exc:  # try again at the next turn
            print(f"reviving {host} failed: {exc}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--devices-per-host", type=int, default=8)
    parser.add_argument("--jobs-per-round", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = temporary_folder("harness-soak-")
    farm = SimFarm(folder, load_testfarm().free_port())
    ray = import_ray()
    devices = {}
    for index in range(args.hosts):
        host = f"h{index}"
        farm.add_host(host, args.devices_per_host, MEDIAN_MS)
        devices[host] = simulated_names(host, args.devices_per_host)
    model = SimulatedModel("npu-sim", MEDIAN_MS)
    request = MeasureRequest.checked({}, timeout_s=120.0)  # the fixed loop: >= 50 runs, 1 s
    churn = Churn(farm, devices, args.seed)
    answers: Counter = Counter()
    submitted = failed = differing = 0
    errors: Counter = Counter()
    rounds = 0
    started = time.monotonic()
    try:
        pool = RayPool(farm.address, "sim", farm.client)
        churn.start()
        while time.monotonic() - started < args.minutes * 60:
            jobs = [(f"r{rounds}-{i}", ExportedModel(f"soak {rounds} {i}".encode(),
                                                     f"r{rounds}-{i}"))
                    for i in range(args.jobs_per_round)]
            submitted += len(jobs)
            for outcome in pool.measure_many(jobs, request):
                answers[outcome.tag] += 1
                if outcome.result is None:
                    failed += 1
                    errors[type(outcome.error).__name__] += 1
                    continue
                expected = model.simulate(outcome.exported.sha256, request.settings)
                differing += outcome.result.samples_ms != expected.samples_ms
            rounds += 1
            print(f"{(time.monotonic() - started) / 60:5.1f} min: round {rounds}, "
                  f"{submitted} jobs, {failed} failed, churn {dict(churn.events)}",
                  flush=True)
    finally:
        churn.settle()
        if ray.is_initialized():
            ray.shutdown()
        farm.stop()
    measured: Counter = Counter()
    for journal in folder.glob("*/sim-journal/*.jsonl"):
        for line in journal.read_text().splitlines():
            measured[json.loads(line)["sha256"]] += 1
    lost = submitted - len(answers)
    print(f"\nsoak of {(time.monotonic() - started) / 60:.1f} min: {args.hosts} hosts x "
          f"{args.devices_per_host} simulated devices, {rounds} rounds, churn: "
          f"{dict(churn.events)}")
    print(f"{'jobs submitted':<34}{submitted:>8}")
    print(f"{'jobs lost (must be 0)':<34}{lost:>8}")
    print(f"{'jobs failed':<34}{failed:>8}  {dict(errors)}")
    print(f"{'results returned twice (must be 0)':<34}"
          f"{sum(1 for n in answers.values() if n > 1):>8}")
    print(f"{'duplicated measurements':<34}{sum(n - 1 for n in measured.values() if n > 1):>8}")
    print(f"{'results unlike undisturbed (0)':<34}{differing:>8}")


if __name__ == "__main__":
    main()
