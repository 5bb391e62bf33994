"""The `harness` command.

    harness profile --space MODULE:ATTR --device NAME --samples N [--seed S] [--json]
                    [--fallback nn-meter [--predictor P] [--offline]]
    harness calibrate --device NAME --space MODULE:ATTR --samples N [--holdout M] [--predictor P]
    harness cache stats | export FILE | import FILE
    harness devices add NAME --ssh USER@HOST[:PORT] [--key FILE] [--jump USER@HOST] [--kind K]
    harness devices list | check NAME | trust NAME [--yes] [--replace] | remove NAME | clean NAME
    harness farm serve [--address HEAD:PORT] [--node-ip IP]
"""
import argparse
import json
import logging
import math
import sys
import time
from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple

from devices.errors import BadRequest, DeviceError
from harness.cache import Cache
from harness.errors import HarnessError
from harness.measurement import STATISTICS, Measurement
from harness.paths import default_cache_path

log = logging.getLogger(__name__)

SHOWN_SKIPPED_ROWS = 10  # `cache import` names this many skipped rows, then counts the rest
# Samples of one command: every sample is drawn (and kept) before the first is measured, so
# a count far beyond any sweep (200 million) would fill memory before anything happens.
MAX_SAMPLES = 100_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", description="Device-in-the-loop latency profiling for hardware-aware NAS.")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-v) or everything (-vv) to stderr")
    parser.add_argument("--cache", help="cache file (default: $HARNESS_HOME/cache.sqlite)")
    commands = parser.add_subparsers(dest="command", required=True)

    profile = commands.add_parser("profile", help="measure sampled subnets of a space on a device")
    profile.add_argument("--space", default="harness.spaces:ProxylessSpace",
                         help="MODULE:ATTR of a model space (default: %(default)s)")
    profile.add_argument("--device", default="local", help="device name (default: %(default)s)")
    profile.add_argument("--samples", type=int, default=8, help="how many samples (default: 8)")
    profile.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    profile.add_argument("--json", action="store_true", help="print JSON instead of a table")
    profile.add_argument("--statistic", choices=STATISTICS, default="median")
    _add_timing_options(profile)
    profile.add_argument("--isolation", choices=("worker", "process"), default="worker",
                         help="persistent agent worker, or a fresh process per measurement")
    profile.add_argument("--timeout", type=float, default=300.0,
                         help="seconds one measurement may take from the device lease")
    profile.add_argument("--refresh", action="store_true", help="measure even if cached")
    profile.add_argument("--farm", metavar="ADDRESS",
                         help="a Ray farm's head (HOST:PORT); --device must be kind:K")
    profile.add_argument("--fallback", choices=("error", "nn-meter", "model"), default="error",
                         help="when the device is unreachable: fail, predict with nn-Meter "
                              "(calibrated for the device if 'harness calibrate' ran), or with "
                              "the latency model fitted on the device's own measurements")
    profile.add_argument("--predictor", metavar="NAME_OR_FOLDER",
                         help="nn-Meter predictor for an uncalibrated device")
    profile.add_argument("--offline", action="store_true",
                         help="do not contact the device: cache or prediction only")

    limit = commands.add_parser(
        "filter", help="which sampled subnets are below a latency limit (measuring only what "
                       "the decision needs)")
    limit.add_argument("--space", default="harness.spaces:ProxylessSpace",
                       help="MODULE:ATTR of a model space (default: %(default)s)")
    limit.add_argument("--device", default="local", help="device name (default: %(default)s)")
    limit.add_argument("--limit-ms", type=float, required=True, help="the latency limit (ms)")
    limit.add_argument("--samples", type=int, default=100, help="how many samples (default 100)")
    limit.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    limit.add_argument("--confidence", type=float, default=0.99,
                       help="how sure each decision must be (default 0.99)")
    limit.add_argument("--no-model", action="store_true",
                       help="never answer from the device's latency model")
    limit.add_argument("--timeout", type=float, default=300.0,
                       help="seconds one measurement may take from the device lease")
    limit.add_argument("--farm", metavar="ADDRESS",
                       help="a Ray farm's head (HOST:PORT); --device must be kind:K")
    limit.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_timing_options(limit)

    calibrate = commands.add_parser(
        "calibrate", help="measure subnets and kernels, fit nn-Meter to a device, report accuracy")
    calibrate.add_argument("--device", required=True, help="device name")
    calibrate.add_argument("--space", default="harness.spaces:ProxylessSpace",
                           help="MODULE:ATTR of a model space (default: %(default)s)")
    calibrate.add_argument("--samples", type=int, required=True,
                           help="training subnets to measure")
    calibrate.add_argument("--holdout", type=int, default=20,
                           help="held-out subnets to measure for the report (default 20)")
    calibrate.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    calibrate.add_argument("--predictor", metavar="NAME_OR_FOLDER",
                           help="an official nn-Meter predictor to compare (and to correct "
                                "when no kernel predictors are built)")
    calibrate.add_argument("--no-kernels", action="store_true",
                           help="only correct --predictor; do not build kernel predictors")
    calibrate.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_timing_options(calibrate)

    farm = commands.add_parser("farm", help="serve this host's devices to a Ray farm")
    farm_verbs = farm.add_subparsers(dest="action", required=True)
    serve = farm_verbs.add_parser("serve", help="start a Ray node offering this host's devices")
    serve.add_argument("--address", help="the head's HOST:PORT (omit to start the head)")
    serve.add_argument("--port", type=int, default=26380, help="head port (26380)")
    serve.add_argument("--node-ip", default="127.0.0.1",
                       help="this host's address as the other hosts reach it")

    devices = commands.add_parser("devices", help="register, check and trust devices")
    verbs = devices.add_subparsers(dest="action", required=True)
    add = verbs.add_parser("add", help="register a device")
    add.add_argument("name")
    via = add.add_mutually_exclusive_group(required=True)
    via.add_argument("--ssh", metavar="USER@HOST[:PORT]", help="an SSH board")
    via.add_argument("--adb", metavar="SERIAL", help="an Android phone (serial or host:port)")
    add.add_argument("--adb-port", type=int, default=5037, help="adb server port (5037)")
    add.add_argument("--agent", choices=("python", "perf-test"), default="python",
                     help="phones: our Python agent (e.g. Termux) or onnxruntime_perf_test")
    add.add_argument("--perf-test", metavar="PATH",
                     help="host path of an Android build of onnxruntime_perf_test")
    add.add_argument("--max-temp", type=float, metavar="C",
                     help="phones: wait until the hottest CPU zone is below this")
    add.add_argument("--key", help="private key file (default: SSH agent and default keys)")
    add.add_argument("--jump", metavar="USER@HOST[:PORT]", help="jump host")
    add.add_argument("--python", default="python3", help="Python on the device (python3)")
    add.add_argument("--workdir", help="working folder on the device (.cache/harness under "
                                          "$HOME on boards, /data/local/tmp/harness on phones)")
    add.add_argument("--kind", help="device kind, for pools of like devices")
    add.add_argument("--connect-timeout", type=float, default=10.0)
    verbs.add_parser("list", help="registered devices")
    for verb, text in (("check", "prove the data path: agent, runtime, a tiny model"),
                       ("remove", "forget a device"),
                       ("clean", "delete the agent and models harness put on the device")):
        verbs.add_parser(verb, help=text).add_argument("name")
    trust = verbs.add_parser("trust", help="show and record a device's SSH host key")
    trust.add_argument("name")
    trust.add_argument("--yes", action="store_true", help="record without asking")
    trust.add_argument("--replace", action="store_true",
                       help="replace a recorded key that changed (board reinstalled)")

    cache = commands.add_parser("cache", help="inspect, export or import the cache")
    actions = cache.add_subparsers(dest="action", required=True)
    stats = actions.add_parser("stats", help="counts of what the cache holds")
    stats.add_argument("--json", action="store_true")
    export = actions.add_parser("export", help="write the cache as JSON Lines")
    export.add_argument("file")
    imported = actions.add_parser("import", help="add a JSON Lines export to the cache")
    imported.add_argument("file")
    return parser


def _add_timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--cpus", help="pin the agent to these CPUs, e.g. 1 or 4-7 or 0,2")
    parser.add_argument("--min-runs", type=int,
                        help="timed runs at least (default 50; 10 with --stop ci)")
    parser.add_argument("--min-time-ms", type=float,
                        help="timed loop at least (default 1000; 0 with --stop ci)")
    parser.add_argument("--max-time-ms", type=float, help="timed loop at most (default 20000)")
    parser.add_argument("--stop", choices=("fixed", "ci"),
                        help="fixed: min runs and time (default); ci: until the 95%% interval "
                             "of the median is within --rel-ci of it")
    parser.add_argument("--rel-ci", type=float,
                        help="precision --stop ci asks for, as a share of the median (0.01)")


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Agent settings from the timing options."""
    settings: Dict[str, Any] = {}
    for option, key in (("threads", "intra_op_threads"), ("min_runs", "min_runs"),
                        ("min_time_ms", "min_time_ms"), ("max_time_ms", "max_time_ms"),
                        ("stop", "stop"), ("rel_ci", "rel_ci")):
        if getattr(args, option) is not None:
            settings[key] = getattr(args, option)
    if args.cpus:
        settings["cpu_affinity"] = parse_cpus(args.cpus)
    if "min_time_ms" in settings and "max_time_ms" not in settings:
        settings["max_time_ms"] = max(20000.0, settings["min_time_ms"] * 2)
    return settings


def _space_with_input(spec: str) -> Any:
    from harness.space import load_space

    space = load_space(spec)
    if not callable(getattr(space, "dummy_input", None)):
        raise HarnessError(f"space {spec} has no dummy_input() to tell its input shape",
                           fix="add dummy_input() to the space, or use the Python API")
    return space


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse counts and times no run can use, before any work is done (BadRequest, USER)."""
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise BadRequest(f"--timeout {timeout} is not a positive number of seconds",
                         fix="pass a finite time, e.g. --timeout 300")
    for option in ("samples", "holdout"):
        count = getattr(args, option, None)
        if count is not None and count > MAX_SAMPLES:
            raise BadRequest(f"--{option} {count} is more than one run takes ({MAX_SAMPLES}): "
                             f"every sample is drawn and kept in memory before measuring starts",
                             fix=f"profile at most {MAX_SAMPLES} at a time, with another --seed "
                                 f"per run (every result is cached, so runs add up)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # nn-Meter logs every kernel at INFO on root
        handler.addFilter(lambda record: record.levelno >= logging.WARNING
                          or "nn_meter" not in record.pathname)
    # paramiko logs a traceback of ~40 lines for every connection that fails, beside the one
    # typed error (with its fix) that harness prints: it is for -vv (debugging) only.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if args.verbose >= 2
                                           else logging.CRITICAL + 1)
    try:
        _check_numbers(args)
        if args.command == "profile":
            return _profile(args)
        if args.command == "calibrate":
            return _calibrate(args)
        if args.command == "filter":
            return _filter(args)
        if args.command == "devices":
            return _devices(args)
        if args.command == "farm":
            from harness.paths import harness_home
            from harness.ray_pool import serve
            return serve(harness_home(), args.address, args.port, args.node_ip)
        return _cache(args)
    except (HarnessError, DeviceError) as exc:
        print(f"harness: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("harness: interrupted; what was measured is in the cache, so a rerun resumes",
              file=sys.stderr)
        return 130


def _sampled(args: argparse.Namespace) -> Tuple[Any, List[Dict[str, Any]]]:
    """The space of --space and --samples samples of it drawn with --seed."""
    from harness.space import random_samples

    space = _space_with_input(args.space)
    if args.samples < 1:
        raise HarnessError("--samples must be at least 1", fix="pass --samples 8, for example")
    return space, random_samples(space, args.samples, seed=args.seed)


def _profile(args: argparse.Namespace) -> int:
    from harness.profiler import LatencyProfiler

    space, samples = _sampled(args)
    started = time.monotonic()
    fallback = "nn-meter" if args.offline and args.fallback == "error" else args.fallback
    with LatencyProfiler(space, space.dummy_input(), device=args.device,
                         statistic=args.statistic, settings=_settings(args), cache=args.cache,
                         isolation=args.isolation, timeout_s=args.timeout,
                         refresh=args.refresh, farm=args.farm, fallback=fallback,
                         predictor=args.predictor, offline=args.offline) as profiler:
        results = profiler.measure_many(samples, progress=False if args.json else None)
        counters = dict(profiler.counters)
    elapsed = time.monotonic() - started
    if args.json:
        print(json.dumps([dict(m.to_dict(), sample=s) for s, m in zip(samples, results)],
                         indent=1))
    else:
        print(render_table(results, args.statistic))
        graphs = len({m.graph_hash for m in results})
        sources = Counter(m.source for m in results)
        print(f"\n{len(results)} samples, {graphs} distinct architectures: "
              f"{sources['measured']} measured, {sources['cached']} from the cache, "
              f"{sources['predicted']} predicted by nn-Meter; {counters.get('exports', 0)} "
              f"exported; {elapsed:.1f} s on {args.device}")
        print(f"device time: {counters.get('device_s', 0.0):.1f} s for {counters.get('measurements', 0)} "
              f"measurements (the fixed loop: about {counters.get('fixed_loop_s', 0.0):.1f} s)")
        unstable = [i for i, m in enumerate(results) if m.flags]
        if unstable:
            print(f"flagged: samples {', '.join(map(str, unstable))} (see flags); rerun them "
                  f"with --refresh on an idle device, or raise --min-time-ms")
    return 0


def _filter(args: argparse.Namespace) -> int:
    """`harness filter`: which sampled subnets are below a latency limit, at a confidence."""
    from harness.decisions import summary
    from harness.profiler import LatencyProfiler

    space, samples = _sampled(args)
    started = time.monotonic()
    with LatencyProfiler(space, space.dummy_input(), device=args.device,
                         settings=_settings(args), cache=args.cache, timeout_s=args.timeout,
                         farm=args.farm) as profiler:
        profiler.decider.use_model = not args.no_model
        decisions = profiler.decide_many(samples, args.limit_ms, args.confidence)
        model_note, audit = profiler.decider.model_note, profiler.decider.audit.report()
        fixed = profiler.counters.get("fixed_loop_s", 0.0)
    counts = summary(decisions)
    if args.json:
        print(json.dumps({"decisions": [dict(d.to_dict(), sample=s) for s, d in
                                        zip(samples, decisions)],
                          "summary": counts, "model": model_note, "audit": audit}))
        return 0
    by_source = counts["by_source"]
    print(f"{len(decisions)} samples against {args.limit_ms:g} ms at {args.confidence:.1%}: "
          f"{counts['below']} below, {counts['above']} not below ({counts['unsettled']} within "
          f"the noise of the limit, measured to full precision)")
    print(f"answered by: {by_source['measured']} the device, {by_source['cached']} the cache, "
          f"{by_source['predicted']} the device's latency model")
    print(f"device time: {counts['device_s']:.1f} s (the fixed loop: about {fixed:.1f} s for "
          f"the measured ones alone); {time.monotonic() - started:.1f} s in all on {args.device}")
    print(f"latency model: {model_note}; audit: {audit['audited']} of {audit['skipped']} skips "
          f"measured anyway" + (f", coverage {audit['coverage']:.0%}, agreement "
                                f"{audit['agreement']:.0%}" if audit["audited"] else ""))
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from harness.accuracy import render_report
    from harness.calibrate import calibrate

    space = _space_with_input(args.space)
    result = calibrate(space, space.dummy_input(), args.device, args.samples, args.holdout,
                       space_name=args.space, seed=args.seed, predictor=args.predictor,
                       build_kernels=False if args.no_kernels else None,
                       settings=_settings(args), cache=args.cache,
                       progress=False if args.json else None)
    calibration = result.calibration
    if args.json:
        print(json.dumps({"folder": str(result.folder), "report": result.report,
                          "intercept": calibration.intercept, "slope": calibration.slope,
                          "png": str(result.png) if result.png else None}, indent=1))
        return 0
    print(f"accuracy on {args.holdout} held-out subnets of {args.space} measured on "
          f"{args.device}:\n")
    print(render_report(result.report))
    print(f"\ncorrection: measured = {math.exp(calibration.intercept):.4g} * "
          f"predicted^{calibration.slope:.4f}, fitted on {args.samples} subnets")
    print(f"stored in {result.folder} (the nn-Meter fallback for {args.device} uses it)")
    if result.png:
        print(f"scatter: {result.png}")
    return 0


def parse_cpus(text: str) -> List[int]:
    """'4-7' or '0,2' or '1' -> a list of CPU numbers."""
    cpus: List[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            cpus.extend(range(int(first), int(last or first) + 1))
    except ValueError:
        raise HarnessError(f"--cpus {text!r} is not a CPU list", fix="write it like 1, 4-7 or 0,2") from None
    return cpus


def render_table(results: List[Measurement], statistic: str = "median") -> str:
    """A readable table, one row per measurement."""
    header = ["#", "graph", statistic + " ms", "p90 ms", "p99 ms", "CV", "n", "load ms",
              "source", "flags"]
    rows = [header]
    for i, m in enumerate(results):
        rows.append([str(i), m.graph_hash[:12], f"{m.statistic(statistic):.4g}", f"{m.p90:.4g}",
                     f"{m.p99:.4g}", f"{m.cv:.1%}", str(m.n),
                     f"{m.load_ms:.1f}" if m.load_ms is not None else "-", m.source,
                     "; ".join(m.flags) or "ok"])
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = []
    for r, row in enumerate(rows):
        cells = [cell.rjust(w) if 1 < c < 8 else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
        if r == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _devices(args: argparse.Namespace) -> int:
    from devices import registry
    from devices.check import check_device
    from harness.paths import harness_home

    home = harness_home()
    if args.action == "add":
        registry.add_device(home, registry.DeviceConfig(
            name=args.name, transport="ssh" if args.ssh else "adb",
            address=args.ssh or args.adb, key=args.key, jump=args.jump, python=args.python,
            workdir=args.workdir, kind=args.kind, connect_timeout=args.connect_timeout,
            adb_port=args.adb_port, agent=args.agent, perf_test=args.perf_test,
            max_temp_c=args.max_temp))
        first = f"'harness devices trust {args.name}', then " if args.ssh else ""
        print(f"added {args.name} ({args.ssh or args.adb}); next: {first}"
              f"'harness devices check {args.name}'")
    elif args.action == "list":
        print(f"{'name':<16} {'transport':<9} {'address':<28} kind")
        print(f"{'local':<16} {'local':<9} {'this machine':<28} -")
        for config in registry.load_devices(home).values():
            via = f" via {config.jump}" if config.jump else ""
            print(f"{config.name:<16} {config.transport:<9} {config.address + via:<28} "
                  f"{config.kind or '-'}")
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
        if report.median_ms is not None:
            print(f"{'tiny model':>12}: {report.median_ms:.3f} ms median")
        for problem in report.problems:
            print(f"problem: {problem}")
        print(f"{args.name}: {'ok' if report.ok else 'NOT ready'}")
        return 0 if report.ok else 1
    elif args.action == "clean":
        transport = registry.open_transport(args.name, home)
        try:
            transport.remove(["models", "agent"])
        finally:
            transport.close()
        print(f"removed the agent and models harness put on {args.name}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    path = args.cache or default_cache_path()
    with Cache(path) as cache:
        if args.action == "stats":
            stats = cache.stats()
            if args.json:
                print(json.dumps(stats, indent=1))
                return 0
            print(f"cache {stats['path']} ({stats['size_bytes'] / 1e6:.2f} MB, schema "
                  f"{stats['schema_version']})")
            print(f"  measurements: {stats['measurements']} ({stats['distinct_keys']} distinct keys)")
            print(f"  samples indexed: {stats['samples_indexed']}")
            print(f"  devices: {stats['devices']}")
            for row in stats["per_device"]:
                odd = (f" ({row['odd_dates']} with a date that is not a time up to now)"
                       if row.get("odd_dates") else "")
                print(f"    {row['device']}: {row['measurements']} measurements of "
                      f"{row['graphs']} graphs, latest {_when(row['latest'])}{odd}")
        elif args.action == "export":
            counts = cache.export_jsonl(args.file)
            print(f"exported {counts['measurement']} measurements, {counts['sample']} samples, "
                  f"{counts['device']} devices to {args.file}")
        else:
            counts = cache.import_jsonl(args.file)
            print(f"imported {counts['measurement']} new measurements, {counts['sample']} "
                  f"samples, {counts['device']} devices from {args.file}")
            if counts.skipped:
                reasons = ", ".join(f"{n} {reason}" for reason, n in
                                    sorted(counts.skipped_by_reason().items()))
                print(f"skipped {len(counts.skipped)} rows that failed their checks: {reasons}")
                for row in counts.skipped[:SHOWN_SKIPPED_ROWS]:
                    print(f"  {row}")
                if len(counts.skipped) > SHOWN_SKIPPED_ROWS:
                    print(f"  ... and {len(counts.skipped) - SHOWN_SKIPPED_ROWS} more")
    return 0


def _when(stamp: Optional[float]) -> str:
    """A date for people, or 'unknown' when there is none that a clock can show."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(stamp)) if stamp is not None \
            else "unknown"
    except (OverflowError, OSError, ValueError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
