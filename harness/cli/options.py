"""The `harness` command's arguments: the parser, the agent settings its timing options
give, and the checks of numbers and lists done before any work."""
import argparse
import math
import re
import sys
from typing import Any, Dict, List, Optional, Set, Tuple

from devices.simulated import COSTS as SIM_COSTS
from harness import __version__
from harness.errors import HarnessError, InvalidArgument
from harness.store.key import RUNTIMES
from harness.store.measurement import STATISTICS

# Samples of one command: every sample is drawn (and kept) before the first is measured, so
# a count far beyond any sweep (200 million) would fill memory before anything happens.
MAX_SAMPLES = 100_000


def build_parser() -> argparse.ArgumentParser:
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
                     help="simulated: median latency of a typical graph (20); with "
                          "--sim-costs graph, the scale of the costs")
    add.add_argument("--sim-seed", type=int, default=0, help="simulated: seed (0)")
    add.add_argument("--sim-costs", choices=SIM_COSTS, default="draw",
                     help="simulated: a graph's latency a seeded draw (draw), or its operators' "
                          "costs added up, so blocks add up to networks (graph)")
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
                                                   "(default 40; --max-time-ms bounds them too)")
    parser.add_argument("--block-ms", type=float,
                        help="with --protocol rounds: a block of one model's runs lasts at "
                             "least this (default 10; a decision's 5, or about 3 runs, at most this)")
    parser.add_argument("--ref-gap-ms", type=float,
                        help="with --protocol rounds: device time between two reference "
                             "blocks at most (default 150), unless the reference would "
                             "then take more than --ref-share")
    parser.add_argument("--ref-share", type=float,
                        help="with --protocol rounds: the most of a window's device time the "
                             "reference's blocks take (default 1: no bound; 0.25 on a board "
                             "whose blocks outlast --ref-gap-ms)")
    parser.add_argument("--discard-runs", type=int,
                        help="with --protocol rounds: runs each block throws away before its "
                             "timed runs (default 0: the reference's first run after a switch "
                             "is as slow as the candidate's, and the ratio divides it out)")
    parser.add_argument("--reference-sessions", type=int,
                        help="with --protocol rounds: sessions the reference is loaded in, "
                             "its blocks taken from each in turn (default 1; each load is a "
                             "draw of its speed, and every ratio divides by it)")
    parser.add_argument("--model-sessions", type=int,
                        help="with --protocol rounds: sessions each candidate is loaded in, "
                             "its blocks taken from each in turn (default 1; each load is a "
                             "draw of its speed; windows hold fewer candidates for the memory)")
    parser.add_argument("--block-runs", type=int,
                        help="with --protocol rounds: timed runs per block (default: probed in "
                             "the device's first window, then the k whose blocks last "
                             "--block-ms at the reference's quiet level; 0 probes in every "
                             "window; 1, 2, 3, 4, 6, 8, 12... fix it)")
    parser.add_argument("--reference", metavar="FILE.onnx",
                        help="with --protocol rounds: the reference model (default: a fixed "
                             "subnet of the built-in space at the input size)")


def agent_settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Agent settings from the timing options."""
    settings: Dict[str, Any] = {}
    for option, key in (("threads", "intra_op_threads"), ("min_runs", "min_runs"),
                        ("min_time_ms", "min_time_ms"), ("max_time_ms", "max_time_ms"),
                        ("stop", "stop"), ("rel_ci", "rel_ci"), ("protocol", "protocol"),
                        ("rounds", "rounds"), ("block_ms", "block_ms"),
                        ("ref_gap_ms", "ref_gap_ms"), ("ref_share", "ref_share"),
                        ("discard_runs", "discard_runs"),
                        ("reference_sessions", "reference_sessions"),
                        ("model_sessions", "model_sessions"),
                        ("block_runs", "block_runs")):
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


def numbers(text: Optional[str], option: str) -> List[Optional[int]]:
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


def input_shape(text: str) -> Tuple[str, List[int]]:
    name, dims = _pair(text, "--input-shape", "NAME=1x3x224x224")
    try:
        shape = [int(d) for d in dims.lower().split("x")]
    except ValueError:
        shape = []
    if not shape or any(d < 1 for d in shape):
        raise InvalidArgument(f"--input-shape {text!r}: {dims!r} is not a shape",
                         fix=f"write it like --input-shape {name}=1x3x224x224")
    return name, shape


def space_with_input(spec: str) -> Any:
    from harness.spaces.space import load_space

    space = load_space(spec)
    if not callable(getattr(space, "dummy_input", None)):
        raise HarnessError(f"space {spec} has no dummy_input() to tell its input shape",
                           fix="add dummy_input() to the space, or use the Python API")
    return space


def check_numbers(args: argparse.Namespace) -> None:
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
