"""The commands that manage: `harness devices`, `harness farm`, `harness report` and
`harness cache`."""
import argparse
import dataclasses
import json
import logging
import math
import sys
from collections import Counter
from typing import Any, Sequence

from harness.errors import HarnessError, InvalidArgument
from harness.paths import default_cache_path

log = logging.getLogger(__name__)

SHOWN_SKIPPED_ROWS = 10  # `cache import` names this many skipped rows, then counts the rest


def devices_command(args: argparse.Namespace) -> int:
    from devices import registry
    from devices.check import check_device
    from harness.paths import harness_home

    home = harness_home()
    if args.action == "add":
        via = "ssh" if args.ssh else "adb" if args.adb else "sim"
        registry.add_device(home, registry.DeviceConfig(
            name=args.name, transport=via, address=args.ssh or args.adb or args.sim,
            key=args.key, jump=args.jump, python=args.python,
            workdir=args.workdir, kind=args.kind, connect_timeout=args.connect_timeout,
            adb_port=args.adb_port, agent=args.agent, perf_test=args.perf_test,
            max_temp_c=args.max_temp, sim_ms=args.sim_ms if args.sim else None,
            sim_seed=args.sim_seed if args.sim else None,
            sim_costs=args.sim_costs if args.sim and args.sim_costs != "draw" else None))
        first = f"'harness devices trust {args.name}', then " if args.ssh else ""
        print(f"added {args.name} ({via} {args.ssh or args.adb or args.sim}); next: {first}"
              f"'harness devices check {args.name}'")
    elif args.action == "list":
        from harness.pool.model_folders import folder_states
        from harness.report.output import printable

        folders = {state.device: _folder_text(state) for state in folder_states(home)}
        print(f"{'name':<16} {'transport':<9} {'address':<28} {'kind':<8} model folder")
        print(f"{'local':<16} {'local':<9} {'this machine':<28} {'-':<8} {folders['local']}")
        for config in registry.load_devices(home).values():
            via = f" via {config.jump}" if config.jump else ""
            folder = folders.get(config.name, "-")
            print(printable(f"{config.name:<16} {config.transport:<9} "
                            f"{config.address + via:<28} {config.kind or '-':<8} {folder}"))
        print("model folders: least recently used models are removed past the limit "
              "(models_limit_mb in devices.toml, $HARNESS_MODELS_LIMIT_MB); 'harness cache "
              "prune --device NAME' trims one now")
    elif args.action == "remove":
        registry.remove_device(home, args.name)
        print(f"removed {args.name} (its host key stays in {registry.known_hosts_path(home)})")
    elif args.action == "trust":
        def confirm(entry: str, key_type: str, fingerprint: str) -> bool:
            print(f"{entry} offers {key_type} {fingerprint}")
            if args.yes:
                return True
            if not sys.stdin.isatty():
                raise HarnessError("not recording a host key without confirmation",
                                   fix="compare the fingerprint with the board's own "
                                       "(ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and rerun "
                                       "with --yes")
            return input("record this key? [y/N] ").strip().lower() in ("y", "yes")

        for result in registry.trust_device(home, args.name, confirm, replace=args.replace):
            print(f"{result.entry}: {result.key_type} {result.fingerprint}: {result.status}")
    elif args.action == "check":
        report = check_device(registry.open_client(args.name, home, isolation="process"))
        identity = report.identity
        for label, key in (("python", "python"), ("onnxruntime", "onnxruntime"),
                           ("numpy", "numpy"), ("cpu", "cpu_model"), ("cores", "cpu_count"),
                           ("board", "board"), ("kernel", "kernel"), ("model", "android_model"),
                           ("soc", "soc"), ("sdk", "sdk"), ("runtime", "runtime")):
            if identity and key not in identity:
                continue
            if identity:
                print(f"{label:>12}: {identity.get(key) or 'missing'}")
        if identity and identity.get("providers"):
            print(f"{'providers':>12}: {', '.join(map(str, identity['providers']))}")
        for runtime, line in report.runtimes.items():  # --runtime NAME measures there
            if runtime != "onnxruntime" or "onnxruntime" not in (identity or {}):
                print(f"{runtime:>12}: {line}")
        if report.governors:
            print(f"{'governors':>12}: {', '.join(report.governors)}")
        if report.hottest_c is not None:
            print(f"{'thermal':>12}: hottest zone {report.hottest_c:.1f} C")
        if report.pinned:
            print(f"{'pinned':>12}: {report.pinned} (the big cores)")
        if report.median_ms is not None:
            print(f"{'tiny model':>12}: {report.median_ms:.3f} ms median")
        problems = list(report.problems)
        if report.ok:  # how noisy it is: a 5 s window of interleaved rounds
            from devices.errors import BadRequest, FixableError
            from harness.campaigns.noise import noise_level
            try:
                print(f"{'noise':>12}: {noise_level(args.name, home=home)}")
            except BadRequest:  # a native tool (onnxruntime_perf_test): one model at a time
                print(f"{'noise':>12}: not measured (it times one model at a time)")
            except FixableError as exc:  # a check reports what is wrong; it does not abort
                print(f"{'noise':>12}: not measured")
                problems.append(f"its window of interleaved rounds failed: {exc}")
        for problem in problems:
            print(f"problem: {problem}")
        ready = report.ok and len(problems) == len(report.problems)
        print(f"{args.name}: {'ok' if ready else 'NOT ready'}")
        return 0 if ready else 1
    elif args.action == "record-noise":
        from harness.campaigns.noise import record_noise
        if not (math.isfinite(args.minutes) and args.minutes > 0 and args.input_size >= 8):
            raise InvalidArgument("--minutes must be a positive number and --input-size at "
                                  "least 8",
                                  fix="pass --minutes 1 --input-size 224, for example")
        trace = record_noise(args.name, args.minutes, args.out, args.input_size, home)
        print(f"recorded {len(trace.runs['reference'])} reference runs over "
              f"{trace.duration_s:.0f} s of {args.name} into {args.out}")
    elif args.action == "clean":
        transport = registry.open_transport(args.name, home)
        try:
            transport.remove(["models", "agent"])
        finally:
            transport.close()
        print(f"removed the agent and models harness put on {args.name}")
    return 0


def farm_command(args: argparse.Namespace) -> int:
    from harness.pool import farm
    from harness.paths import harness_home

    home = harness_home()
    if args.action == "serve":
        node = farm.serve(home, args.address, args.port, args.node_ip)
        print(farm.head_message(node) if node.head else
              f"node {node.name} serves {node.devices} devices to the farm at {node.address}; "
              f"'harness farm stop' ends it")
        _print_exposure(farm.node_exposure(home), [args.node_ip,
                                                   node.address.rpartition(":")[0]])
        return 0
    if args.action == "stop":
        report = farm.stop(home, args.grace)
        cut = "unknown" if report.jobs_cut is None else str(report.jobs_cut)
        print(f"stopped farm node {report.name}{' (the head: the farm has ended)' if report.head else ''}: "
              f"{report.terminated} processes ended on SIGTERM, {report.killed} killed, "
              f"jobs cut short: {cut}")
        return 0
    status = farm.status(home, args.address)
    if args.json:
        print(json.dumps(dataclasses.asdict(status), indent=1))
        return 0
    print(f"farm at {status.address}: {status.nodes_alive} Ray nodes alive, "
          f"{len(status.hosts)} hosts serving devices"
          + (f"; not answering: {', '.join(status.silent)}" if status.silent else ""))
    header = ("host", "kind", "devices", "busy", "free", "quarantined", "waiting", "done",
              "failed")
    rows = [header]
    for host in status.hosts:
        for kind, devices in sorted(host.kinds().items()):
            states = Counter(d.state for d in devices)
            rows.append((host.name + (" (stopping)" if host.draining else ""), kind,
                         str(len(devices)), str(states["busy"]), str(states["free"]),
                         str(states["quarantined"]), str(host.waiting),
                         str(sum(d.done for d in devices)), str(sum(d.failed for d in devices))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
    _print_exposure(farm.node_exposure(home), status.addresses)
    return 0


def _print_exposure(exposure: Any, hosts: Sequence[str]) -> None:
    """Where this host's farm node listens, a warning for sockets beyond its --node-ip
    (on stderr, through the log), and the firewall rule that limits them to `hosts`."""
    if exposure is None:
        return
    lines = exposure.lines(hosts)
    for line in lines:
        if line.startswith("WARNING: "):
            log.warning("%s", line[len("WARNING: "):])
        else:
            print(line)


def report_command(args: argparse.Namespace) -> int:
    """`harness report`: the page and figures of harness.report.html, from the cache."""
    from harness.report.html import write_report

    files = write_report(args.cache or default_cache_path(), args.out, devices=args.device,
                         space=args.space)
    print(f"report of {files.subnets} subnets (variants apart) on {files.devices} "
          f"device{'' if files.devices == 1 else 's'}: {files.index} "
          f"(and {len(files.figures)} PNGs beside it)")
    return 0


def _mb(count: int) -> str:
    """A byte count in MB for people ('12.3 MB')."""
    return f"{count / 1e6:.1f} MB"


def _folder_text(state: Any) -> str:
    """A device's model folder for people: '12.3 MB of 1024.0 MB (87 models)', with the age
    of a remote device's figure (its agent's newest report), or its limit when none came."""
    from harness.report.output import when

    if state.bytes is None:
        return f"up to {_mb(state.limit_bytes)} (no size reported yet)"
    text = f"{_mb(state.bytes)} of {_mb(state.limit_bytes)} ({state.models} models)"
    return text if state.at is None else f"{text}, as of {when(state.at)}"


def _prune(args: argparse.Namespace) -> int:
    """`harness cache prune`: each device's model folder within its limit (or --limit-mb)."""
    from harness.paths import harness_home
    from harness.pool.model_folders import prune

    if args.limit_mb is not None and not (math.isfinite(args.limit_mb) and args.limit_mb >= 0):
        raise InvalidArgument(f"--limit-mb {args.limit_mb} is not a size", fix="pass --limit-mb 512, "
                                                                          "for example")
    limit = None if args.limit_mb is None else int(args.limit_mb * 1_000_000)
    for name in args.device or ["local"]:
        done = prune(name, harness_home(), limit)
        print(f"{name}: removed {done['removed']} models ({_mb(done['removed_bytes'])}); "
              f"{done['models']} left, {_mb(done['bytes'])} of {_mb(done['limit_bytes'])}")
    return 0


def cache_command(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from harness.paths import harness_home
    from harness.pool.model_folders import folder_states
    from harness.store.cache import Cache
    from harness.report.output import printable, when

    if args.action == "prune":
        return _prune(args)
    path = args.cache or default_cache_path()
    with Cache(path) as cache:
        if args.action == "stats":
            stats = cache.stats()
            folders = folder_states(harness_home())
            stats["model_folders"] = {state.device: asdict(state) for state in folders}
            if args.json:
                print(json.dumps(stats, indent=1))
                return 0
            print(f"cache {stats['path']} ({stats['size_bytes'] / 1e6:.2f} MB, schema "
                  f"{stats['schema_version']})")
            print(f"  measurements: {stats['measurements']} ({stats['distinct_keys']} distinct keys)")
            print(f"  samples indexed: {stats['samples_indexed']}")
            print(f"  devices: {stats['devices']} ({stats['fingerprints']} distinct device "
                  f"fingerprints: devices that are alike share one)")
            for row in stats["per_device"]:
                odd = (f" ({row['odd_dates']} with a date that is not a time up to now)"
                       if row.get("odd_dates") else "")
                print(f"    {printable(row['device'])}: {row['measurements']} measurements of "
                      f"{row['graphs']} graphs, latest {when(row['latest'])}{odd}")
            print("  model folders on the devices (least recently used models out past the "
                  "limit; 'harness cache prune --device NAME' trims one now):")
            for state in folders:
                print(printable(f"    {state.device}: {_folder_text(state)}"))
        elif args.action == "export":
            counts = cache.export_jsonl(args.file)
            print(f"exported {counts['measurement']} measurements, {counts['sample']} samples, "
                  f"{counts['device']} devices, {counts['decision']} decisions to {args.file}")
        else:
            counts = cache.import_jsonl(args.file)
            print(f"imported {counts['measurement']} new measurements, {counts['sample']} "
                  f"samples, {counts['device']} devices, {counts['decision']} decisions from "
                  f"{args.file}")
            if counts.skipped:
                reasons = ", ".join(f"{n} {reason}" for reason, n in
                                    sorted(counts.skipped_by_reason().items()))
                print(f"skipped {len(counts.skipped)} rows that failed their checks: {reasons}")
                for row in counts.skipped[:SHOWN_SKIPPED_ROWS]:
                    print(f"  {printable(row)}")
                if len(counts.skipped) > SHOWN_SKIPPED_ROWS:
                    print(f"  ... and {len(counts.skipped) - SHOWN_SKIPPED_ROWS} more")
    return 0
