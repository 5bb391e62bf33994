#!/usr/bin/env python3
"""Per-profile overhead over SSH on loopback beside `local`, measured side by side in one run.

Starts a real sshd on 127.0.0.1 (needs root and openssh-server, as the tests), registers it
as device `loop`, and profiles the same ProxylessSpace subnets (about 14 MB each) on
`local` and on `loop`: cold (the model is uploaded first) and warm (already on the board).
Overhead = wall time - export - model load - first run - warm-up - timed loop.

Usage: sudo python3 scripts/bench_ssh.py [--rounds N]
"""
import argparse
import statistics
import sys
import time

from benchlib import load_testfarm, temporary_folder  # also sys.path

from devices import registry  # noqa: E402
from harness import LatencyProfiler, random_samples  # noqa: E402
from harness.spaces import ProxylessSpace  # noqa: E402



def overhead_ms(profiler: LatencyProfiler, sample: dict) -> float:
    started = time.perf_counter()
    m = profiler.measure(sample)
    wall = (time.perf_counter() - started) * 1e3
    p = m.provenance
    return wall - p.export_ms - m.load_ms - m.first_run_ms - p.warmup_ms - p.loop_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    testfarm = load_testfarm()
    folder = temporary_folder("harness-bench-ssh-")
    home = folder / "home"
    key = testfarm.make_client_key(folder / "client")
    sshd = testfarm.Sshd(folder / "sshd", "127.0.0.1", testfarm.free_port(), key).start()
    try:
        registry.add_device(home, registry.DeviceConfig(
            name="loop", transport="ssh", address=f"root@127.0.0.1:{sshd.port}", key=str(key),
            python=sys.executable, workdir=str(folder / "board")))
        registry.trust_device(home, "loop", lambda *_: True)
        space = ProxylessSpace()
        settings = {"min_runs": 20, "min_time_ms": 300.0, "warmup_runs": 5}
        samples = random_samples(space, args.rounds, seed=11)
        results = {}
        for device in ("local", "loop"):
            with LatencyProfiler(space, space.dummy_input(), device=device, settings=settings,
                                 home=home, refresh=True) as profiler:
                profiler.measure(random_samples(space, 1, seed=99)[0])  # worker up
                transport = profiler.pool.client(device).transport
                cold, warm = [], []
                for sample in samples:
                    transport.remove(["models"])
                    cold.append(overhead_ms(profiler, sample))
                    warm.append(overhead_ms(profiler, sample))
                results[device] = (statistics.median(cold), statistics.median(warm))
                size = profiler.measure(samples[0]).provenance.model_bytes
        print(f"{'device':<28}{'cold (upload) ms':>18}{'warm ms':>10}   target")
        print("-" * 72)
        for device, label in (("local", "local (subprocess)"), ("loop", "ssh loopback (paramiko)")):
            cold, warm = results[device]
            target = "cold < 250, warm < 60" if device == "loop" else "-"
            print(f"{label:<28}{cold:>18.1f}{warm:>10.1f}   {target}")
        ratio_cold = results["loop"][0] / results["local"][0]
        ratio_warm = results["loop"][1] / results["local"][1]
        print(f"{'ssh / local':<28}{ratio_cold:>18.2f}{ratio_warm:>10.2f}")
        print(f"\nmedian of {args.rounds} subnets, model {size / 1e6:.1f} MB; overhead = wall - "
              f"export - load - first run - warm-up - timed loop")
    finally:
        sshd.stop()
        testfarm.kill_all(testfarm.processes_mentioning(str(folder)))


if __name__ == "__main__":
    main()
