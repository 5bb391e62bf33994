"""The `harness` command.

    harness profile --space MODULE:ATTR --device NAME --samples N [--seed S]
                    [--json | --csv] [--raw] [--fallback nn-meter [--predictor P] [--offline]]
    harness profile --model FILE.onnx [--input-shape NAME=1x3x224x224 ...] --device NAME
                    [--batch 1,2,4] [--input-size 96,160,224] [--precision fp32,int8-dynamic]
                    [--ops [--top N] [--trace-dir DIR]] [--provider NAME [--provider-option K=V]]
    harness filter --space MODULE:ATTR --device NAME --limit-ms X --samples N [--json]
    harness calibrate --device NAME --space MODULE:ATTR --samples N [--holdout M] [--predictor P]
    harness cache stats | export FILE | import FILE | prune [--device NAME ...] [--limit-mb X]
    harness devices add NAME --ssh USER@HOST[:PORT] [--key FILE] [--jump USER@HOST] [--kind K]
    harness devices add NAME --adb SERIAL | --sim MODEL [--sim-ms MS] [--kind K]
    harness devices list | check NAME | trust NAME [--yes] [--replace] | remove NAME | clean NAME
    harness farm serve [--address HEAD:PORT] [--node-ip IP] | status [--address A] [--json]
                 | stop [--grace S]
"""
import argparse
import dataclasses
import json
import logging
import math
import os
import re
import select
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from devices.errors import FixableError
from harness import __version__
from harness.errors import HarnessError, InvalidArgument
from harness.store.key import RUNTIMES
from harness.store.measurement import STATISTICS
from harness.paths import default_cache_path

log = logging.getLogger(__name__)

MAX_LISTED_PASSED = 50  # samples below the limit listed by `harness filter` (all in --json)

SHOWN_SKIPPED_ROWS = 10  # `cache import` names this many skipped rows, then counts the rest
# Samples of one command: every sample is drawn (and kept) before the first is measured, so
# a count far beyond any sweep (200 million) would fill memory before anything happens.
MAX_SAMPLES = 100_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness", description="Device-in-the-loop latency profiling for hardware-aware NAS.")
    parser.add_argument("--version", action=_VersionAction, nargs=0,
                        help="show harness's version and those of onnxruntime, torch, onnx, "
                             "numpy and Python, and exit")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log progress (-v) or everything (-vv) to stderr")
    parser.add_argument("--cache", help="cache file (default: $HARNESS_HOME/cache.sqlite)")
    commands = parser.add_subparsers(dest="command", required=True)

    profile = commands.add_parser("profile", help="measure sampled subnets of a space, or an "
                                                  "ONNX model, on a device")
    profile.add_argument("--space", default="harness.spaces:ProxylessSpace",
                         help="MODULE:ATTR of a model space (default: %(default)s)")
    profile.add_argument("--model", metavar="FILE.onnx",
                         help="measure this ONNX model instead of a space's subnets")
    profile.add_argument("--input-shape", action="append", default=[], metavar="NAME=1x3x224x224",
                         help="an input's shape (needed for its dynamic axes; repeat per input)")
    profile.add_argument("--batch", metavar="LIST",
                         help="batch sizes to sweep, e.g. 1,2,4,8 (one table)")
    profile.add_argument("--input-size", metavar="LIST",
                         help="image sizes (height = width) to sweep, e.g. 96,160,224")
    profile.add_argument("--precision", default="fp32", metavar="LIST",
                         help="fp32, fp16, int8-dynamic, int8-static, or several side by side "
                              "(comma-separated); converted on the host (default: fp32)")
    profile.add_argument("--calibration", metavar="FILE.npz",
                         help="int8-static: calibration inputs, one array per model input "
                              "(default: random inputs from seed 0)")
    profile.add_argument("--ops", action="store_true",
                         help="profile per operator too (separate runs): top nodes, providers, "
                              "a Chrome trace per result")
    profile.add_argument("--top", type=int, default=10, help="nodes shown with --ops (10)")
    profile.add_argument("--trace-dir", default=".", metavar="DIR",
                         help="where --ops writes its Chrome traces (default: this folder)")
    profile.add_argument("--device", default="local", help="device name (default: %(default)s)")
    profile.add_argument("--samples", type=int, default=8, help="how many samples (default: 8)")
    profile.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    output = profile.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="JSON Lines: one object per sample, then a summary object")
    output.add_argument("--csv", action="store_true", help="the same rows as CSV")
    profile.add_argument("--raw", action="store_true",
                         help="with --json or --csv: every raw per-run time too")
    profile.add_argument("--statistic", choices=STATISTICS,
                         help="the statistic profile() returns and the table shows first "
                              "(default: quiet when measured in rounds, the default where "
                              "they can run; else median)")
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
    limit.add_argument("--indifference", type=float, default=0.02,
                       help="within +-this share of the limit either answer is right "
                            "(default 0.02)")
    limit.add_argument("--window-spread", type=float,
                       help="in rounds: how far one window's ratios may lie from their value "
                            "over many windows, added to each interval (default 0.02)")
    limit.add_argument("--no-model", action="store_true",
                       help="never answer from the device's latency model")
    limit.add_argument("--timeout", type=float, default=300.0,
                       help="seconds one measurement may take from the device lease")
    limit.add_argument("--farm", metavar="ADDRESS",
                       help="a Ray farm's head (HOST:PORT); --device must be kind:K")
    limit.add_argument("--json", action="store_true",
                       help="JSON Lines: one object per decision, then a summary object")
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
    calibrate.add_argument("--statistic", choices=STATISTICS,
                           help="what the calibration predicts of the device's runs (default: "
                                "quiet when measured in rounds, the default where they can "
                                "run; else median; min is steadier than median on a device "
                                "shared with other work)")
    calibrate.add_argument("--fresh", action="store_true",
                           help="measure every subnet and kernel anew instead of reusing the "
                                "cache's measurements")
    calibrate.add_argument("--json", action="store_true", help="print the report as JSON")
    _add_timing_options(calibrate)

    farm = commands.add_parser("farm", help="serve this host's devices to a Ray farm")
    farm_verbs = farm.add_subparsers(dest="action", required=True)
    serve = farm_verbs.add_parser("serve", help="start a Ray node offering this host's devices")
    serve.add_argument("--address", help="the head's HOST:PORT (omit to start the head)")
    serve.add_argument("--port", type=int, default=26380, help="head port (26380)")
    serve.add_argument("--node-ip", default="127.0.0.1",
                       help="this host's address as the other hosts reach it")
    status = farm_verbs.add_parser("status", help="the farm's hosts and what their devices do")
    status.add_argument("--address", help="the head's HOST:PORT (default: the farm this "
                                          "host serves)")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    stop = farm_verbs.add_parser("stop", help="drain and end this host's node (the head's "
                                              "ends the farm)")
    stop.add_argument("--grace", type=float, default=10.0,
                      help="seconds running jobs may take to finish, and processes to end "
                           "on SIGTERM (10)")

    devices = commands.add_parser("devices", help="register, check and trust devices")
    verbs = devices.add_subparsers(dest="action", required=True)
    add = verbs.add_parser("add", help="register a device")
    add.add_argument("name")
    via = add.add_mutually_exclusive_group(required=True)
    via.add_argument("--ssh", metavar="USER@HOST[:PORT]", help="an SSH board")
    via.add_argument("--adb", metavar="SERIAL", help="an Android phone (serial or host:port)")
    via.add_argument("--sim", metavar="MODEL", help="a simulated device of this model (farms "
                                                    "at scale: no model runs, it sleeps)")
    add.add_argument("--sim-ms", type=float, default=20.0,
                     help="simulated: median latency of a typical graph (20)")
    add.add_argument("--sim-seed", type=int, default=0, help="simulated: seed (0)")
    add.add_argument("--adb-port", type=int, default=5037, help="adb server port (5037)")
    add.add_argument("--agent", choices=("python", "perf-test", "benchmark-model",
                                         "executor-runner"), default="python",
                     help="our Python agent (e.g. Termux), or a runtime's own tool: "
                          "onnxruntime_perf_test, LiteRT's benchmark_model, ExecuTorch's "
                          "executor_runner")
    add.add_argument("--perf-test", "--tool", metavar="PATH", dest="perf_test",
                     help="host path of the tool's build for the device")
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
    record = verbs.add_parser("record-noise", help="record the device's speed over minutes "
                                                   "(a noise trace simulated devices replay)")
    record.add_argument("name")
    record.add_argument("--minutes", type=float, default=1.0, help="how long (default 1)")
    record.add_argument("--out", required=True, help="the trace file to write (JSON)")
    record.add_argument("--input-size", type=int, default=224,
                        help="image size of the models timed (default 224)")
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
    prune = actions.add_parser("prune", help="trim devices' model folders to their limit, "
                                             "least recently used models first")
    prune.add_argument("--device", action="append", default=[], metavar="NAME",
                       help="a device whose folder to prune (repeatable; default: local)")
    prune.add_argument("--limit-mb", type=float, default=None,
                       help="prune to this size instead of the device's limit (0: every model)")

    report = commands.add_parser(
        "report", help="an HTML page (and PNGs) of the cache: devices side by side, the spread "
                       "of the runs, latency against FLOPs, calibrations, sortable tables")
    report.add_argument("--out", required=True, metavar="DIR",
                        help="folder for index.html and the PNGs (created if missing)")
    report.add_argument("--device", action="extend", nargs="+", metavar="NAME",
                        help="devices to show (default: every device in the cache)")
    report.add_argument("--space", metavar="MODULE:ATTR",
                        help="only the subnets of this space, with their FLOPs counted")
    report.add_argument("--cache", default=argparse.SUPPRESS,
                        help="cache file (default: $HARNESS_HOME/cache.sqlite)")
    return parser


def _add_timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runtime", choices=RUNTIMES,
                        help="the runtime that times the models (default onnxruntime; a "
                             "--model FILE.tflite or .pte picks litert or executorch); the host "
                             "converts subnets to its format")
    parser.add_argument("--backend", metavar="NAME",
                        help="the runtime's backend: litert xnnpack|cpu|gpu, executorch "
                             "xnnpack|portable, openvino CPU|GPU|AUTO|... (default: the first)")
    parser.add_argument("--require-backend", action="store_true",
                        help="a backend that leaves nodes to the CPU kernels is an error, "
                             "not a record")
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
    parser.add_argument("--provider", metavar="NAME",
                        help="onnxruntime execution provider, e.g. XnnpackExecutionProvider "
                             "('harness devices check NAME' lists what the device has)")
    parser.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the execution provider (repeat per option)")
    parser.add_argument("--protocol", choices=("loop", "rounds"),
                        help="rounds (the default where the device runs our agent and a "
                             "reference fits the inputs): the batch together in interleaved "
                             "rounds beside a reference model, whose ratios hold on a noisy "
                             "device (--statistic quiet: the quiet-state latency); loop: one "
                             "model after another")
    parser.add_argument("--rounds", type=int, help="with --protocol rounds: rounds at most "
                                                   "(default 30; --max-time-ms bounds them too)")
    parser.add_argument("--block-ms", type=float,
                        help="with --protocol rounds: a block of one model's runs lasts at "
                             "least this (default 20)")
    parser.add_argument("--ref-gap-ms", type=float,
                        help="with --protocol rounds: device time between two reference "
                             "blocks at most (default 150)")
    parser.add_argument("--reference", metavar="FILE.onnx",
                        help="with --protocol rounds: the reference model (default: a fixed "
                             "subnet of the built-in space at the input size)")


def _settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Agent settings from the timing options."""
    settings: Dict[str, Any] = {}
    for option, key in (("threads", "intra_op_threads"), ("min_runs", "min_runs"),
                        ("min_time_ms", "min_time_ms"), ("max_time_ms", "max_time_ms"),
                        ("stop", "stop"), ("rel_ci", "rel_ci"), ("protocol", "protocol"),
                        ("rounds", "rounds"), ("block_ms", "block_ms"),
                        ("ref_gap_ms", "ref_gap_ms")):
        if getattr(args, option) is not None:
            settings[key] = getattr(args, option)
    if args.runtime:
        settings["runtime"] = args.runtime
    if args.backend:
        settings["backend"] = args.backend
    if args.require_backend:
        settings["require_backend"] = True
    if args.cpus:
        settings["cpu_affinity"] = parse_cpus(args.cpus)
    if args.provider:
        settings["provider"] = args.provider if args.provider.endswith("ExecutionProvider") \
            else args.provider + "ExecutionProvider"  # 'Xnnpack' is enough
    if args.provider_option:
        if not args.provider:
            raise InvalidArgument("--provider-option sets an option of --provider's provider",
                             fix="pass --provider NAME too")
        settings["provider_options"] = dict(_pair(text, "--provider-option", "KEY=VALUE")
                                            for text in args.provider_option)
    if "min_time_ms" in settings and "max_time_ms" not in settings:
        settings["max_time_ms"] = max(20000.0, settings["min_time_ms"] * 2)
    return settings


def _pair(text: str, option: str, form: str) -> Tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name or not value:
        raise InvalidArgument(f"{option} {text!r} is not {form}", fix=f"write it as {option} {form}")
    return name, value


def _numbers(text: Optional[str], option: str) -> List[Optional[int]]:
    """'1,2,4' -> [1, 2, 4]; None (not given) -> [None]."""
    if text is None:
        return [None]
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise InvalidArgument(f"{option} {text!r} is not a list of positive whole numbers",
                         fix=f"write it like {option} 1,2,4")
    return list(dict.fromkeys(values))


def _shape(text: str) -> Tuple[str, List[int]]:
    name, dims = _pair(text, "--input-shape", "NAME=1x3x224x224")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise InvalidArgument(f"--input-shape {text!r}: {dims!r} is not a shape",
                         fix=f"write it like --input-shape {name}=1x3x224x224")
    return name, shape


def _space_with_input(spec: str) -> Any:
    from harness.spaces.space import load_space

    space = load_space(spec)
    if not callable(getattr(space, "dummy_input", None)):
        raise HarnessError(f"space {spec} has no dummy_input() to tell its input shape",
                           fix="add dummy_input() to the space, or use the Python API")
    return space


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse counts and times no run can use, before any work is done (InvalidArgument, USER)."""
    timeout = getattr(args, "timeout", None)
    if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
        raise InvalidArgument(f"--timeout {timeout} is not a positive number of seconds",
                         fix="pass a finite time, e.g. --timeout 300")
    for option in ("samples", "holdout"):
        count = getattr(args, option, None)
        if count is not None and count > MAX_SAMPLES:
            raise InvalidArgument(f"--{option} {count} is more than one run takes ({MAX_SAMPLES}): "
                             f"every sample is drawn and kept in memory before measuring starts",
                             fix=f"profile at most {MAX_SAMPLES} at a time, with another --seed "
                                 f"per run (every result is cached, so runs add up)")


def _version() -> str:
    """harness's version, and those of what measures and exports: onnxruntime, torch, onnx,
    numpy and Python (the packages' metadata, so nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"harness {__version__}"]
    for name in ("onnxruntime", "torch", "onnx", "numpy"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            parts.append(f"{name} missing")
    return ", ".join(parts) + f", Python {sys.version.split()[0]}"


class _VersionAction(argparse.Action):
    """--version on one line (argparse's own wraps it at the terminal's width)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: Optional[str] = None) -> None:
        print(_version())
        parser.exit()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `harness` command: runs one command, prints one line per error with its fix (as
    the flags to type), and ends quietly when the reader of its output went away (`| head`)."""
    parser = _parser()
    try:
        return _run(parser, parser.parse_args(argv))
    except FixableError as exc:
        fix = f"\n  fix: {as_flags(exc.fix, option_names(parser))}" if exc.fix else ""
        print(f"harness: error: {exc.cause()}{fix}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        if not _stdout_closed():
            raise
        # Python would complain again when it flushes stdout at exit: point it at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a shell reports a program ended by SIGPIPE


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (poll reports an error)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def option_names(parser: argparse.ArgumentParser) -> Set[str]:
    """Every --option of the command and its subcommands."""
    names: Set[str] = set()
    for action in parser._actions:  # argparse has no public walk over its options
        names.update(o for o in action.option_strings if o.startswith("--"))
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                names |= option_names(sub)
    return names


def as_flags(fix: str, options: Set[str]) -> str:
    """A fix written for the Python API (`fallback='nn-meter'`) as the flags a command-line
    user types (`--fallback nn-meter`); names that are no option of the command stay."""
    def flag(match: "re.Match[str]") -> str:
        option = "--" + match.group(1).replace("_", "-")
        if option not in options:
            return match.group(0)
        value = match.group(3) if match.group(3) is not None else match.group(2)
        return f"{option} {value}"

    return re.sub(r"\b([a-z][a-z_]*)=('([^']*)'|[^\s,;'()]+)", flag, fix)


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:  # nn-Meter logs every kernel at INFO on root
        handler.addFilter(lambda record: record.levelno >= logging.WARNING
                          or "nn_meter" not in record.pathname)
    # paramiko logs a traceback of ~40 lines for every connection that fails, beside the one
    # typed error (with its fix) that harness prints: it is for -vv (debugging) only.
    logging.getLogger("paramiko").setLevel(logging.DEBUG if args.verbose >= 2
                                           else logging.CRITICAL + 1)
    if args.verbose < 2:  # nn-Meter's setuptools deprecation notice is not the user's concern
        warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
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
            return _farm(args)
        if args.command == "report":
            return _report(args)
        return _cache(args)
    except KeyboardInterrupt:
        print("harness: interrupted; what was measured is in the cache, so a rerun resumes",
              file=sys.stderr)
        return 130


def _sampled(args: argparse.Namespace) -> Tuple[Any, List[Dict[str, Any]]]:
    """The space of --space and --samples samples of it drawn with --seed."""
    from harness.spaces.space import random_samples

    space = _space_with_input(args.space)
    if args.samples < 1:
        raise HarnessError("--samples must be at least 1", fix="pass --samples 8, for example")
    return space, random_samples(space, args.samples, seed=args.seed)


@dataclass(frozen=True)
class _Variant:
    """One column of a sweep: a precision at a batch size and an input size (None: as is)."""

    precision: str
    batch: Optional[int]
    size: Optional[int]


def _variants(args: argparse.Namespace) -> List[_Variant]:
    from harness.export.model_file import check_precision

    precisions = list(dict.fromkeys(check_precision(p.strip())
                                    for p in args.precision.split(",")))
    return [_Variant(p, b, z) for b in _numbers(args.batch, "--batch")
            for z in _numbers(args.input_size, "--input-size") for p in precisions]


def _swept(shape: Sequence[Any], variant: _Variant) -> List[Any]:
    """A shape with the variant's batch (first axis) and size (last two axes of an image)."""
    shape = list(shape)
    if variant.batch is not None and shape:
        shape[0] = variant.batch
    if variant.size is not None and len(shape) == 4:
        shape[2] = shape[3] = variant.size
    return shape


def _profile(args: argparse.Namespace) -> int:
    from harness.report import output

    if args.raw and not (args.json or args.csv):
        raise HarnessError("--raw adds the raw per-run times to --json or --csv output",
                           fix="pass --json --raw or --csv --raw")
    if args.top < 1:
        raise InvalidArgument(f"--top {args.top} shows no node", fix="pass --top 10, for example")
    started = time.monotonic()
    variants = _variants(args)
    if args.ops:
        _trace_folder(args)  # before measuring: a bad folder must not cost the measurements
    counters: Counter = Counter()  # what the command's profilers counted, added up
    measured, default_variant = (_profile_model if args.model else _profile_space)(
        args, variants, counters)
    measured.sort(key=lambda item: item[0])  # a subnet's variants side by side
    results = [m for _, _, _, m in measured]
    rows = [output.result_row(index, sample, m, arch) for index, sample, arch, m in measured]
    sources = Counter(m.source for m in results)
    flagged = sorted({row["index"] for row in rows if row["flags"]})
    summary = {"samples": len({index for index, _, _, _ in measured}), "results": len(results),
               "architectures": len({m.graph_hash for m in results}),
               "measured": sources["measured"], "cached": sources["cached"],
               "predicted": sources["predicted"], "exported": counters.get("exports", 0),
               "converted": counters.get("conversions", 0),
               "convert_s": round(counters.get("convert_s", 0.0), 3),
               "device": args.device, "elapsed_s": round(time.monotonic() - started, 3),
               "device_s": counters.get("device_s", 0.0),
               "measurements": counters.get("measurements", 0),
               "fixed_loop_s": counters.get("fixed_loop_s", 0.0), "flagged": flagged,
               "input_shapes": list(dict.fromkeys(output.shapes_of(m) for m in results))}
    traces = _write_traces(args, rows, results) if args.ops else []
    if traces:
        summary["traces"] = [str(path) if path else None for path in traces]
    if args.json:
        output.write_jsonl(sys.stdout, [output.json_row(row, m, args.raw)
                                        for row, m in zip(rows, results)], summary)
        return 0
    if args.csv:
        output.write_csv(sys.stdout, [dict(row, samples_ms=m.samples_ms)
                                      for row, m in zip(rows, results)], args.raw)
        return 0
    print(output.render_table(rows, args.statistic,
                              [m.statistic(args.statistic) for m in results], default_variant))
    if args.ops or args.model:
        for row, m, trace in zip(rows, results, traces or [None] * len(results)):
            print(f"\n#{row['index']} {output.printable(row['arch'])} "
                  f"{output.printable(row['variant'])}: {output.render_memory(m)}")
            if args.ops:
                print(output.render_ops(m, args.top))
                print(f"Chrome trace (Perfetto, chrome://tracing): "
                      f"{trace or 'not written (see the warning)'}")
    converted = (f", {summary['converted']} converted for the runtime "
                 f"({summary['convert_s']:.1f} s)" if summary["converted"] else "")
    print(f"\n{summary['samples']} {'model file' if args.model else 'samples'}, "
          f"{summary['results']} results, {summary['architectures']} distinct architectures: "
          f"{summary['measured']} measured, {summary['cached']} from the cache, "
          f"{summary['predicted']} predicted; {summary['exported']} exported{converted}; "
          f"{summary['elapsed_s']:.1f} s on {args.device}; input "
          f"{', '.join(summary['input_shapes']) or '-'}")
    print(f"device time: {summary['device_s']:.1f} s for {summary['measurements']} "
          f"measurements (the fixed loop: about {summary['fixed_loop_s']:.1f} s)")
    if flagged:
        advice = ("measure them again with --refresh --protocol rounds where the device "
                  "runs our agent (with --reference FILE.onnx for inputs other than an image): "
                  "interleaved beside a reference, they hold on a device shared with other work"
                  if args.protocol != "rounds" else "raise --max-time-ms (more rounds) or "
                  "--ref-gap-ms lower (references nearer each candidate)")
        print(f"flagged: samples {', '.join(map(str, flagged))} (see flags); {advice}")
    return 0


Measured = List[Tuple[int, Any, str, Any]]  # (sample index, sample, description, Measurement)


def _profiler(args: argparse.Namespace, space: Any, dummy: Any, variant: _Variant) -> Any:
    from harness.profiler import LatencyProfiler

    fallback = "nn-meter" if args.offline and args.fallback == "error" else args.fallback
    settings = _settings(args)
    if args.ops:  # per-operator times come from a loop of their own (rounds have none)
        settings.setdefault("protocol", "loop")
    profiler = LatencyProfiler(space, dummy, device=args.device, statistic=args.statistic,
                               settings=settings, cache=args.cache,
                               isolation=args.isolation, timeout_s=args.timeout,
                               refresh=args.refresh, farm=args.farm, fallback=fallback,
                               predictor=args.predictor, offline=args.offline,
                               precision=variant.precision, calibration=args.calibration,
                               reference=args.reference)
    # what the table shows and the advice names: the library's choice where none was given
    args.statistic, args.protocol = profiler.statistic, profiler.settings["protocol"]
    return profiler


def _profile_space(args: argparse.Namespace, variants: List[_Variant],
                   counters: Counter) -> Tuple[Measured, Optional[str]]:
    """Every variant of --samples subnets of --space, one profiler per variant; and the
    space's default variant (fp32 at its dummy_input()'s shapes)."""
    import torch

    from harness.report.output import describe_sample, variant_name

    space, samples = _sampled(args)
    if args.input_shape:
        raise InvalidArgument("--input-shape sizes the inputs of --model",
                         fix="for a space, sweep with --batch and --input-size")
    quiet = args.json or args.csv
    measured: Measured = []
    base = space.dummy_input()
    inputs = [base] if isinstance(base, torch.Tensor) else list(base)
    default = variant_name("fp32", " ".join("x".join(map(str, getattr(t, "shape", ())))
                                            for t in inputs))
    for variant in variants:
        dummy = base
        if variant.batch is not None or variant.size is not None:
            if not isinstance(base, torch.Tensor):
                raise InvalidArgument(f"--batch and --input-size sweep one input, and {args.space}'s "
                                 f"dummy_input() gives several",
                                 fix="sweep in Python with LatencyProfiler and your own inputs")
            dummy = torch.randn(*_swept(base.shape, variant))
        with _profiler(args, space, dummy, variant) as profiler:
            results = profiler.measure_many(samples, progress=False if quiet else None,
                                            per_op=args.ops)
            counters.update(profiler.counters)
        measured += [(i, sample, describe_sample(space, sample), m)
                     for i, (sample, m) in enumerate(zip(samples, results))]
    return measured, default


def _profile_model(args: argparse.Namespace, variants: List[_Variant],
                   counters: Counter) -> Tuple[Measured, Optional[str]]:
    """Every variant of the --model file, through one profiler per precision; and its default
    variant (fp32 at its static shapes; None when an axis is dynamic: it has none)."""
    from harness.export.model_file import load_model
    from harness.report.output import variant_name

    if args.samples != 8 or args.seed != 0 or args.fallback != "error" or args.offline:
        raise InvalidArgument("--model measures one model file: --samples, --seed, --fallback and "
                         "--offline are for spaces", fix="drop them, or use --space")
    model = load_model(args.model)
    args.runtime = _runtime_of_model(args.model, args.runtime)
    given = dict(_shape(text) for text in args.input_shape)
    model.check_names(given)
    name = os.path.basename(args.model)
    measured: Measured = []
    for precision in dict.fromkeys(v.precision for v in variants):
        with _profiler(args, None, None, _Variant(precision, None, None)) as profiler:
            for variant in (v for v in variants if v.precision == precision):
                shapes = {}
                for item in model.inputs:  # an input left with a dynamic axis is named
                    shape = _swept(given.get(item.name, item.dims), variant)
                    if all(isinstance(dim, int) for dim in shape):
                        shapes[item.name] = shape
                result = profiler.measure_model(model, shapes, per_op=args.ops)
                measured.append((0, {"model": name}, name, result))
            counters.update(profiler.counters)
    static = all(isinstance(d, int) for item in model.inputs for d in item.dims)
    default = variant_name("fp32", " ".join("x".join(map(str, item.dims)) for item in model.inputs))
    return measured, default if static else None


def _runtime_of_model(path: str, asked: Optional[str]) -> Optional[str]:
    """The runtime a --model file runs on: the one its extension names (.tflite: litert,
    .pte: executorch), else --runtime's; InvalidArgument when --runtime names another."""
    from harness.export.formats import runtime_of_file

    follows = runtime_of_file(path)
    if follows is None:
        if asked in ("litert", "executorch"):
            raise InvalidArgument(f"--runtime {asked} does not load ONNX ({path})",
                                  fix="pass its .tflite or .pte file, or --runtime onnxruntime "
                                      "or openvino")
        return asked
    if asked is not None and asked != follows:
        raise InvalidArgument(f"{path} is a model for {follows}, not {asked}",
                              fix=f"drop --runtime, or pass --runtime {follows}")
    return follows


def _trace_folder(args: argparse.Namespace) -> Path:
    """--trace-dir, checked before anything is measured: a folder this user can write to."""
    folder = Path(args.trace_dir)
    if not folder.is_dir():
        raise InvalidArgument(f"--trace-dir {folder} is not a folder", fix="create it, or pass another")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InvalidArgument(f"--trace-dir {folder} is not writable (read-only, or not this "
                         f"user's)", fix="pass a folder you can write to, e.g. --trace-dir /tmp")
    return folder


def _write_traces(args: argparse.Namespace, rows: Sequence[Dict[str, Any]],
                  results: Sequence[Any]) -> List[Optional[Path]]:
    """One Chrome trace per result with a per-operator profile, in --trace-dir, each written
    whole (devices.safe_files: never through a link planted there, never over a folder).
    A trace that cannot be written (a folder at its path, a full disk) is a warning naming
    it, the cause and the fix, and None in its place: the results are shown all the same."""
    from devices.safe_files import replace_text

    folder = _trace_folder(args)
    written: List[Optional[Path]] = []
    for row, m in zip(rows, results):
        if m.ops is None:
            written.append(None)
            continue
        variant = re.sub(r"[^A-Za-z0-9.-]+", "_", row["variant"])
        path = folder / f"trace-{row['index']}-{m.graph_hash[:12]}-{variant}.json"
        try:
            replace_text(path, json.dumps(m.ops.chrome_trace()), mode=0o644, links=True)
        except OSError as exc:
            log.warning("the Chrome trace %s was not written: %s; fix: %s", path,
                        exc.strerror or exc, "move what is at that path aside, free some "
                        "space, or pass another --trace-dir; the results are in the cache")
            written.append(None)
            continue
        written.append(path)
    return written


def _filter(args: argparse.Namespace) -> int:
    """`harness filter`: which sampled subnets are below a latency limit, at a confidence."""
    from harness.store.decisions import summary
    from harness.profiler import LatencyProfiler

    space, samples = _sampled(args)
    started = time.monotonic()
    settings = _settings(args)
    if args.window_spread is not None:
        settings["window_spread"] = args.window_spread
    with LatencyProfiler(space, space.dummy_input(), device=args.device,
                         settings=settings, cache=args.cache, timeout_s=args.timeout,
                         farm=args.farm, reference=args.reference) as profiler:
        profiler.decider.use_model = not args.no_model
        decisions = profiler.decide_many(samples, args.limit_ms, args.confidence,
                                         indifference=args.indifference)
        model_note, audit = profiler.decider.model_note, profiler.decider.audit.report()
        fixed = profiler.counters.get("fixed_loop_s", 0.0)
    counts = summary(decisions)
    if args.json:
        from harness.report.output import write_jsonl

        write_jsonl(sys.stdout, [dict(d.to_dict(), index=i, sample=s) for i, (s, d) in
                                 enumerate(zip(samples, decisions))],
                    dict(counts, model=model_note, audit=audit, fixed_loop_s=fixed))
        return 0
    by_source = counts["by_source"]
    print(f"{len(decisions)} samples against {args.limit_ms:g} ms at {args.confidence:.1%}: "
          f"{counts['below']} below, {counts['above']} not below, {counts['undecided']} "
          f"undecided (+-{args.indifference:.1%} of the limit is indifferent; the undecided "
          "spent their budget or lie within the device's between-window spread of the limit, "
          "and are listed by their point estimate)")
    print(f"answered by: {by_source['measured']} the device, {by_source['cached']} the cache, "
          f"{by_source['predicted']} the device's latency model")
    print(f"device time: {counts['device_s']:.1f} s (the fixed loop: about {fixed:.1f} s for "
          f"the measured ones alone); {time.monotonic() - started:.1f} s in all on {args.device}")
    print(f"latency model: {model_note}; audit: {audit['audited']} of {audit['skipped']} skips "
          f"measured anyway" + (f", coverage {audit['coverage']:.0%}, agreement "
                                f"{audit['agreement']:.0%}" if audit["audited"] else ""))
    passed = [i for i, d in enumerate(decisions) if d.below]
    shown = ", ".join(map(str, passed[:MAX_LISTED_PASSED]))
    more = f" and {len(passed) - MAX_LISTED_PASSED} more (--json lists all)" \
        if len(passed) > MAX_LISTED_PASSED else ""
    print(f"below {args.limit_ms:g} ms: samples {shown or 'none'}{more} (numbered from 0 in the "
          f"order --seed {args.seed} draws them; --json gives each sample's choices)")
    return 0


def _age(seconds: float) -> str:
    """A duration for people: '40 s', '35 min', '2.5 h', '3 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} days"


def _calibrate(args: argparse.Namespace) -> int:
    from harness.predict.accuracy import render_report
    from harness.campaigns.calibrate import calibrate

    space = _space_with_input(args.space)
    result = calibrate(space, space.dummy_input(), args.device, args.samples, args.holdout,
                       space_name=args.space, seed=args.seed, predictor=args.predictor,
                       build_kernels=False if args.no_kernels else None,
                       settings=_settings(args), cache=args.cache,
                       progress=False if args.json else None, statistic=args.statistic,
                       fresh=args.fresh, on_progress=None if sys.stderr.isatty() else
                       lambda line: print(line, file=sys.stderr, flush=True))
    calibration = result.calibration
    reused = result.reused or {}
    if args.json:
        print(json.dumps({"folder": str(result.folder), "report": result.report,
                          "intercept": calibration.intercept, "slope": calibration.slope,
                          "png": str(result.png) if result.png else None,
                          "activated": result.activated, "warning": result.warning,
                          "reused": reused}, indent=1))
        return 0
    if reused.get("count"):
        print(f"reused {reused['count']:.0f} of {reused['of']:.0f} measurements from the cache, "
              f"taken {_age(reused['newest_s'])} to {_age(reused['oldest_s'])} ago "
              f"(--fresh measures them anew)\n")
    print(f"accuracy on {args.holdout} held-out subnets of {args.space} measured on "
          f"{args.device}:\n")
    print(render_report(result.report))
    print(f"\ncorrection: measured {calibration.statistic} = "
          f"{math.exp(calibration.intercept):.4g} * predicted^{calibration.slope:.4f}, fitted "
          f"on {args.samples} subnets")
    if result.activated:
        print(f"stored in {result.folder} (the nn-Meter fallback for {args.device} uses it)")
    else:
        print(f"warning: {result.warning}\nfix: calibrate with more subnets (--samples 100 "
              f"--holdout 20 or more), on an idle device, or with --fresh", file=sys.stderr)
        print(f"stored in {result.folder}, NOT used as {args.device}'s fallback")
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


def _devices(args: argparse.Namespace) -> int:
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
            sim_seed=args.sim_seed if args.sim else None))
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
        if report.ok:  # how noisy it is: a 5 s window of interleaved rounds
            from devices.errors import BadRequest
            from harness.campaigns.noise import noise_level
            try:
                print(f"{'noise':>12}: {noise_level(args.name, home=home)}")
            except BadRequest:  # a native tool (onnxruntime_perf_test): one model at a time
                print(f"{'noise':>12}: not measured (it times one model at a time)")
        for problem in report.problems:
            print(f"problem: {problem}")
        print(f"{args.name}: {'ok' if report.ok else 'NOT ready'}")
        return 0 if report.ok else 1
    elif args.action == "record-noise":
        from harness.campaigns.noise import record_noise
        if not (args.minutes > 0 and args.input_size >= 8):
            raise InvalidArgument("--minutes must be positive and --input-size at least 8",
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


def _farm(args: argparse.Namespace) -> int:
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


def _report(args: argparse.Namespace) -> int:
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


def _cache(args: argparse.Namespace) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
