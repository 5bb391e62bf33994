#!/usr/bin/env python3
"""harness on-device agent: time inference and report raw samples as JSON.

This file is shipped to the device and run there on its own. It depends on the Python
standard library, numpy and the runtime a request asks for (setting "runtime": onnxruntime
by default, or LiteRT, ExecuTorch, OpenVINO: RUNTIMES), imported only then, so a board with
onnxruntime alone needs nothing else. It runs on Python 3.8+ (edge boards run old Pythons),
so it must not import harness or devices.

Three commands, each answering in JSON on stdout:

    ort_agent.py measure --model PATH [--sha256 HEX] [--settings JSON]   one measurement
    ort_agent.py fingerprint                                             what this device is
    ort_agent.py worker                                                  persistent worker

The worker reads one JSON request per line on stdin and answers one JSON object per line on
stdout ({"op": "measure" | "rounds" | "fingerprint" | "ping" | "exit", "id": ..., ...};
"rounds" times several models in interleaved rounds beside a reference); it opens no
socket and exits when stdin closes, so a dropped host connection leaves no process behind.
While it measures, a watchdog thread (HostWatch) ends it within a second when its host is gone
(stdin hung up, or its parent process changed), and when it outgrows its caps (resident memory
beyond MEMORY_CAP_SHARE of the device's RAM, more than max_threads() threads): the kernel then
releases the device lock. Thread settings above the device's cores are a USER error.

Every failure is a JSON object too: {"error": {"kind": KIND, "message": TEXT}} with KIND one of
TRANSFER, LOAD, RUNTIME, TIMEOUT, DEVICE_LOST, THERMAL, USER.
"""
import argparse
import bisect
import contextlib
import errno
import glob
import hashlib
import json
import math
import numbers
import os
import platform
import random
import select
import stat
import shutil
import statistics
import sys
import tempfile
import threading
import time

AGENT_VERSION = "1.6"

ERROR_KINDS = ("TRANSFER", "LOAD", "RUNTIME", "TIMEOUT", "DEVICE_LOST", "THERMAL", "USER")

INDIFFERENCE = 0.02  # the limit rule's indifference zone by default: +-2% of the limit
# The limit rule's between-window term by default: on this project's 2-core host, with a
# neighbour on the other core, 98% of one pass's ratios lay within 2.07% of a 5-pass truth,
# and 88% of a window's hours later within 2% (every ratio one worker measures lies a common
# 0-1% off, and each load of a model is a draw of its own); see limit_look.
WINDOW_SPREAD = 0.02

# Settings a request may carry, with their defaults. Timing defaults suit a NAS search:
# one thread (stable, comparable across devices), enough runs for a sound median.
DEFAULT_SETTINGS = {
    "runtime": "onnxruntime",  # which runtime loads and times the model (RUNTIMES)
    "backend": None,           # its backend: None is the runtime's default (DEFAULT_BACKENDS)
    "require_backend": False,  # a backend that leaves nodes to the CPU is an error, not a record
    "intra_op_threads": 1,
    "inter_op_threads": 1,
    "graph_optimization_level": "all",
    "execution_mode": "sequential",
    "provider": "CPUExecutionProvider",
    "warmup_runs": None,     # 10 for the loop, 0 in rounds (WARMUP_RUNS)
    "stop": "fixed",
    "min_runs": None,        # 50 for the fixed loop, 10 for the other rules
    "min_time_ms": None,     # 1000 for the fixed loop, 0 for the other rules
    "max_time_ms": 20000.0,
    "rel_ci": 0.01,
    "confidence": 0.95,
    "limit_ms": None,
    # the limit rule's indifference zone: a subnet within +-indifference x limit_ms of the
    # limit may be called either way (it stops the rule from running on where nothing can
    # tell); a subnet outside it is called wrongly with probability at most 1 - confidence
    "indifference": INDIFFERENCE,
    # the reference's quiet level known to the host (rounds): the limit in units of the
    # reference is limit_ms / this (None: the level this window's reference blocks show)
    "reference_level_ms": None,
    # the limit rule in rounds: how far one window's ratio of a model may lie from its value
    # over many windows (a share; see limit_look): its interval is widened by this much
    "window_spread": WINDOW_SPREAD,
    "seed": 0,
    "input_shapes": None,
    "cpu_affinity": None,
    "provider_options": None,  # {name: value} for the execution provider, as strings
    "per_op": False,           # also profile per operator, in runs of their own
    "profile_runs": 20,        # how many profiled runs per_op medians are taken over
    "precision": "fp32",       # what the host converted the model to (recorded, keyed)
    "calibration": None,       # int8-static: where its calibration inputs came from
    # interleaved rounds (op "rounds"): how many rounds at most (max_time_ms bounds them
    # too), how long a block of one model's runs lasts at least, how much device time may
    # pass between two blocks of the reference model, and the most of the window's device
    # time the reference may take (1: no bound; where it binds it wins over the gap, see
    # interleave; unbounded by default: scripts/benchmark-log.md, "The reference's share").
    # Blocks of 10 ms re-measured steadier than 20 ms at equal device time on this
    # project's machine and on the replayed traces (more blocks kept, a smaller share):
    # scripts/benchmark-log.md, "2026-12-07: blocks of 10 ms"; 40 rounds of them cost about
    # what 30 of 20 ms did at 224 px.
    "protocol": "loop",        # the host's: "loop" (one model at a time) or "rounds"
    "rounds": 40,
    "block_ms": 10.0,
    "ref_gap_ms": 150.0,
    "ref_share": 1.0,
    # runs of a block run and thrown away before its timed runs (agent 1.4: none by default).
    # Each block runs after another model, and the first run after a switch runs slow (at
    # 224 px +18%, the second +10%), but so does the reference's, and the ratio divides it
    # out: side by side on this project's machine a block without the discarded run kept
    # 2-2.5x as many blocks per subnet at the same device time, and re-measured steadier in
    # four of five pairs of runs (idle on a calm host, one run throwing one away did better:
    # scripts/benchmark-log.md, "2026-12-07: no discarded run"); the two ways' ratios lay a
    # median 0.3% apart.
    "discard_runs": 0,
    # sessions the reference is loaded in, its blocks taken from each in turn. Each load of
    # a model is a draw of its speed: at 224 px on this project's machine four sessions of
    # the reference in one process read every candidate's ratio 0.3-1.0% apart, and one
    # session moves all the ratios of its worker together. Against four in turn the ratios
    # of two processes moved together by 0.19% instead of 0.46% (six processes), but at the
    # default block length the benchmark did not show a gain (README, "The reference in
    # several sessions"): one session unless asked.
    "reference_sessions": 1,
    # sessions each candidate of a rounds window is loaded in, its blocks taken from each in
    # turn, as the reference's: every load is a draw of the candidate's own speed too, which
    # its ratio carries alone (the host's windows hold fewer candidates for the memory).
    "model_sessions": 1,
    # timed runs per block (k): 0 or None chooses them from the reference's probe runs (the
    # fewest on BLOCK_RUNS that last block_ms: runs_per_block), a number on BLOCK_RUNS
    # fixes them for every block of the window. The host sends the k the reference's
    # quiet level in the device's history implies (harness.steps.measuring:
    # MeasurementSteps.block_runs), so that a reference whose run lies near block_ms / k
    # does not switch k between windows (None: the host's choice).
    "block_runs": None,
}

# Precisions the host converts models to before sending them (the agent only records it).
PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
PROFILE_WARMUP_RUNS = 3  # profiled runs dropped before the medians (caches, allocations)

# How the timed loop stops: "fixed" after min_runs runs and min_time_ms; "ci" once the 95%
# interval of the median is within rel_ci of it; "limit" once the interval of the median (at
# `confidence`, spent over the looks) says below or above limit_ms up to the indifference
# zone (limit_verdict), or else as "ci" does. Every rule stops at max_time_ms, and the two
# adaptive ones never stop on drifting runs. In interleaved rounds, "limit" looks at each
# candidate's ratios to the reference as they grow (limit_look) and a decided one leaves;
# under "ci" a model whose ratio is known within rel_ci leaves.
STOP_RULES = ("fixed", "ci", "limit")
PROTOCOLS = ("loop", "rounds")
# Runs after a model's first (its cold run, never timed) before it is timed, by protocol.
# A loop times one model's runs back to back, and its warm-up brings the model's caches and
# the core's speed to where its timed runs stay. In rounds (agent 1.5) every block follows
# another model, so no warmed state outlives the first switch; the blocks that follow a
# switch are timed beside a reference's that follow one too, and the ratio divides out what
# they share. What lasts is the model's own first-run work (memory plans, allocations),
# done by its first run and the three probe runs that choose its k. On a slow board ten
# runs were seconds a model: scripts/benchmark-log.md, "2026-12-07 (later): no warm-up in
# rounds".
WARMUP_RUNS = {"loop": 10, "rounds": 0}
MODE_DEFAULTS = {"fixed": {"min_runs": 50, "min_time_ms": 1000.0},
                 "ci": {"min_runs": 10, "min_time_ms": 0.0},
                 "limit": {"min_runs": 10, "min_time_ms": 0.0}}

# Thread settings: 0 lets onnxruntime choose; above the device's cores is refused, and no
# device is asked for more than MAX_THREADS (so a host refuses --threads 100000 at once).
MAX_THREADS = 1024
# A worker whose resident memory passes this share of the device's RAM is ended (HostWatch).
MEMORY_CAP_SHARE = 0.9
WATCH_INTERVAL_S = 0.25   # how often HostWatch looks (it acts within a second)

OPT_LEVELS = ("disabled", "basic", "extended", "all")
EXECUTION_MODES = ("sequential", "parallel")

# onnxruntime type strings -> numpy dtype names.
ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


class AgentError(Exception):
    """A failure with a typed kind, reported as {"error": {"kind", "message"}}."""

    def __init__(self, kind, message):
        Exception.__init__(self, message)
        assert kind in ERROR_KINDS, kind
        self.kind = kind
        self.message = message

    def to_json(self):
        return {"error": {"kind": self.kind, "message": self.message}}


# ---------------------------------------------------------------- device facts

def _read(path):
    try:
        with open(path) as handle:
            return handle.read().strip().strip("\x00")
    except (OSError, ValueError):
        return None


def _read_int(path):
    text = _read(path)
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


def cpu_model():
    """The CPU's name from /proc/cpuinfo (x86 'model name', ARM 'Hardware'/'Model'/'CPU part')."""
    info = _read("/proc/cpuinfo") or ""
    fields = {}
    parts = set()
    for line in info.splitlines():
        if ":" not in line:
            continue
        key, value = line.split(":", 1)
        key, value = key.strip(), value.strip()
        if key == "CPU part":
            parts.add(value)
        fields.setdefault(key, value)
    for key in ("model name", "Hardware", "Model", "Processor", "cpu model"):
        if fields.get(key):
            return fields[key]
    if parts:
        return "ARM parts " + ",".join(sorted(parts))
    return platform.processor() or platform.machine()


def board_model():
    """Board or machine model: device tree on ARM boards, DMI on x86, else None."""
    model = _read("/proc/device-tree/model")
    if model:
        return model
    vendor = _read("/sys/devices/virtual/dmi/id/sys_vendor")
    product = _read("/sys/devices/virtual/dmi/id/product_name")
    if product:
        return (vendor + " " + product) if vendor else product
    return None


def cpu_frequencies():
    """Per-core cpufreq facts where readable: governor and max/current frequency in kHz."""
    cores = []
    for path in sorted(glob.glob("/sys/devices/system/cpu/cpu[0-9]*"),
                       key=lambda p: int(p.rsplit("cpu", 1)[1])):
        cpu = int(path.rsplit("cpu", 1)[1])
        cores.append({
            "cpu": cpu,
            "governor": _read(path + "/cpufreq/scaling_governor"),
            "max_khz": _read_int(path + "/cpufreq/cpuinfo_max_freq"),
            "cur_khz": _read_int(path + "/cpufreq/scaling_cur_freq"),
        })
    return cores


def cpu_state():
    """What competes for the CPU now, where the kernel says it: CPU pressure (PSI: the share
    of time some task waited for a CPU, over 10 s, and the total stall in microseconds), steal
    time (ticks a hypervisor gave to others), the load average and the current frequencies.
    Missing files leave their fields out."""
    state = {}
    pressure = _read("/proc/pressure/cpu")
    for line in (pressure or "").splitlines():
        if line.startswith("some "):
            fields = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
            try:
                state["pressure_avg10"] = float(fields["avg10"])
                state["pressure_total_us"] = int(fields["total"])
            except (KeyError, ValueError):
                pass
    stat = _read("/proc/stat")
    for line in (stat or "").splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu" and len(parts) > 8 and parts[8].isdigit():
            state["steal_ticks"] = int(parts[8])
    try:
        state["load1"] = os.getloadavg()[0]
    except (OSError, AttributeError):
        pass
    frequencies = [core["cur_khz"] for core in cpu_frequencies() if core["cur_khz"]]
    if frequencies:
        state["freq_khz_min"] = min(frequencies)
    return state


def thermal_zones():
    """Temperatures of every readable thermal zone, in degrees Celsius."""
    zones = []
    for path in sorted(glob.glob("/sys/class/thermal/thermal_zone*")):
        temp = _read_int(path + "/temp")
        if temp is None:
            continue
        zones.append({
            "zone": os.path.basename(path),
            "type": _read(path + "/type"),
            "temp_c": temp / 1000.0 if abs(temp) > 200 else float(temp),
        })
    return zones


def _package_version(name):
    try:
        module = __import__(name)
        return getattr(module, "__version__", "unknown")
    except Exception:  # a missing or broken package is a fact to report, not a crash
        return None


def fingerprint():
    """What this device is (identity: stable, part of the cache key) and its state now."""
    uname = platform.uname()
    cores = cpu_frequencies()
    ort_version = _package_version("onnxruntime")
    providers = None
    if ort_version is not None:
        import onnxruntime
        providers = list(onnxruntime.get_available_providers())
    identity = {
        "system": uname.system,
        "machine": uname.machine,
        "kernel": uname.release,
        "board": board_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_max_khz": sorted(set(c["max_khz"] for c in cores if c["max_khz"])),
        "python": platform.python_implementation() + " " + platform.python_version(),
        "onnxruntime": ort_version,
        "numpy": _package_version("numpy"),
        "providers": providers,
    }
    runtimes = runtime_versions()
    if runtimes:  # left out where only onnxruntime is installed: its keys stay as they were
        identity["runtimes"] = runtimes
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    state = {
        "governors": sorted(set(c["governor"] for c in cores if c["governor"])),
        "thermal": thermal_zones(),
        "loadavg": load,
        "affinity": _affinity(),
    }
    # the memory new work can take without swapping: what the host cuts its windows by
    available = meminfo_kb("MemAvailable")
    if available is not None:
        state["mem_available_kb"] = available
    return {"identity": identity, "state": state, "agent_version": AGENT_VERSION}


def meminfo_kb(field):
    """A field of /proc/meminfo (MemTotal, MemAvailable, ...) in kB, or None where the
    kernel does not say."""
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) > 1 and parts[1].isdigit():
                return int(parts[1])
    return None


def _affinity():
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


# ---------------------------------------------------------------- settings and inputs

def _finite_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


def _check_whole_setting(settings, key, low, high):
    """A setting that must be a whole number from low to high: AgentError USER naming it."""
    value = settings[key]
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise AgentError("USER", "setting %s must be a whole number from %d to %d, got %r"
                         % (key, low, high, value))


def plain_number(value):
    """A number of another type (numpy's float32, int64...) as Python's own int or float, so
    that it passes the checks below and travels as JSON; anything else as it is."""
    if isinstance(value, bool):
        return value
    if type(value).__name__ == "bool_":  # numpy's
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return value


def parse_settings(raw):
    """Merge a request's settings over the defaults; reject unknown keys and bad values."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise AgentError("USER", "settings must be a JSON object, got %r" % (raw,))
    unknown = sorted(set(raw) - set(DEFAULT_SETTINGS))
    if unknown:
        raise AgentError("USER", "unknown settings %s; known: %s"
                         % (", ".join(unknown), ", ".join(sorted(DEFAULT_SETTINGS))))
    settings = dict(DEFAULT_SETTINGS)
    settings.update({key: plain_number(value) for key, value in raw.items()})
    if settings["runtime"] not in RUNTIMES:
        raise AgentError("USER", "setting runtime must be one of %s, got %r"
                         % (", ".join(RUNTIMES), settings["runtime"]))
    if settings["backend"] is not None and (not isinstance(settings["backend"], str)
                                            or not settings["backend"]):
        raise AgentError("USER", "setting backend must be a name, got %r" % (settings["backend"],))
    backends = RUNTIME_FACTS[settings["runtime"]]["backends"]
    if settings["backend"] is not None and backends is not None and \
            settings["backend"] not in backends:
        raise AgentError("USER", "setting backend must be one of %s for %s, got %r"
                         % (", ".join(backends), settings["runtime"], settings["backend"]))
    if settings["runtime"] == "onnxruntime" and settings["backend"] is not None:
        raise AgentError("USER", "onnxruntime's backend is its execution provider: set "
                         "provider, not backend")
    if not isinstance(settings["require_backend"], bool):
        raise AgentError("USER", "setting require_backend must be true or false, got %r"
                         % (settings["require_backend"],))
    if settings["stop"] not in STOP_RULES:
        raise AgentError("USER", "setting stop must be one of %s, got %r"
                         % (", ".join(STOP_RULES), settings["stop"]))
    for key, value in MODE_DEFAULTS[settings["stop"]].items():
        if settings[key] is None:
            settings[key] = value
    if settings["protocol"] not in PROTOCOLS:
        raise AgentError("USER", "setting protocol must be one of %s, got %r"
                         % (", ".join(PROTOCOLS), settings["protocol"]))
    if settings["warmup_runs"] is None:
        settings["warmup_runs"] = WARMUP_RUNS[settings["protocol"]]
    for key in ("intra_op_threads", "inter_op_threads", "warmup_runs", "min_runs", "seed"):
        value = settings[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise AgentError("USER", "setting %s must be a whole number >= 0, got %r" % (key, value))
    check_threads(settings, MAX_THREADS, "the most harness asks of any device")
    for key in ("min_time_ms", "max_time_ms"):
        value = settings[key]
        if not _finite_number(value) or value < 0:
            raise AgentError("USER", "setting %s must be a finite number >= 0, got %r"
                             % (key, value))
    for key in ("rel_ci", "confidence"):
        value = settings[key]
        if not _finite_number(value) or not 0 < value < 1:
            raise AgentError("USER", "setting %s must lie strictly between 0 and 1, got %r"
                             % (key, value))
    limit = settings["limit_ms"]
    if (limit is not None or settings["stop"] == "limit") and \
            not (_finite_number(limit) and limit > 0):
        raise AgentError("USER", "setting limit_ms must be a positive number of ms%s, got %r"
                         % (" (stop 'limit' needs it)" if settings["stop"] == "limit" else "",
                            limit))
    zone = settings["indifference"]
    if not _finite_number(zone) or not 0 < zone < 0.5:
        raise AgentError("USER", "setting indifference must lie strictly between 0 and 0.5 "
                         "(a share of limit_ms), got %r" % (zone,))
    spread = settings["window_spread"]
    if not _finite_number(spread) or not 0 <= spread < 0.5:
        raise AgentError("USER", "setting window_spread must be a share from 0 to below 0.5 "
                         "(of a ratio to the reference), got %r" % (spread,))
    level = settings["reference_level_ms"]
    if level is not None and not (_finite_number(level) and level > 0):
        raise AgentError("USER", "setting reference_level_ms must be a positive number of ms, "
                         "got %r" % (level,))
    if settings["min_runs"] < 1:
        raise AgentError("USER", "setting min_runs must be at least 1")
    if settings["max_time_ms"] < settings["min_time_ms"]:
        raise AgentError("USER", "max_time_ms (%s) is below min_time_ms (%s)"
                         % (settings["max_time_ms"], settings["min_time_ms"]))
    if settings["graph_optimization_level"] not in OPT_LEVELS:
        raise AgentError("USER", "graph_optimization_level must be one of %s, got %r"
                         % (", ".join(OPT_LEVELS), settings["graph_optimization_level"]))
    if settings["execution_mode"] not in EXECUTION_MODES:
        raise AgentError("USER", "execution_mode must be one of %s, got %r"
                         % (", ".join(EXECUTION_MODES), settings["execution_mode"]))
    shapes = settings["input_shapes"]
    if shapes is not None:
        if not isinstance(shapes, dict) or not all(
                isinstance(dims, list) and all(isinstance(d, int) and d > 0 for d in dims)
                for dims in shapes.values()):
            raise AgentError("USER", "input_shapes must map input names to lists of positive "
                             "whole numbers, got %r" % (shapes,))
    options = settings["provider_options"]
    if options is not None and (not isinstance(options, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in options.items())):
        raise AgentError("USER", "provider_options must map option names to string values, "
                         "got %r" % (options,))
    if not isinstance(settings["per_op"], bool):
        raise AgentError("USER", "setting per_op must be true or false, got %r"
                         % (settings["per_op"],))
    _check_whole_setting(settings, "profile_runs", 1, 10000)
    if settings["precision"] not in PRECISIONS:
        raise AgentError("USER", "precision must be one of %s, got %r"
                         % (", ".join(PRECISIONS), settings["precision"]))
    if settings["calibration"] is not None and not isinstance(settings["calibration"], str):
        raise AgentError("USER", "calibration must be a text label, got %r"
                         % (settings["calibration"],))
    _check_whole_setting(settings, "rounds", 1, 100000)
    for key in ("block_ms", "ref_gap_ms"):
        value = settings[key]
        if not _finite_number(value) or not 0 < value <= 60000:
            raise AgentError("USER", "setting %s must be a number of ms above 0 and at most "
                             "60000, got %r" % (key, value))
    _check_whole_setting(settings, "discard_runs", 0, 10)
    _check_whole_setting(settings, "reference_sessions", 1, 8)
    _check_whole_setting(settings, "model_sessions", 1, 8)
    runs = settings["block_runs"]
    if runs is not None and (not isinstance(runs, int) or isinstance(runs, bool)
                             or runs not in (0,) + BLOCK_RUNS):
        raise AgentError("USER", "setting block_runs must be 0 (chosen by the window's probe) "
                         "or one of %s, got %r" % (", ".join(map(str, BLOCK_RUNS)), runs))
    share = settings["ref_share"]
    if not _finite_number(share) or not 0 < share <= 1:
        raise AgentError("USER", "setting ref_share must be a share of the window's device time "
                         "above 0 and at most 1 (1: no bound), got %r" % (share,))
    cpus = settings["cpu_affinity"]
    if cpus is not None and (not isinstance(cpus, list) or not cpus
                             or not all(isinstance(c, int) and c >= 0 for c in cpus)):
        raise AgentError("USER", "cpu_affinity must be a non-empty list of CPU numbers, got %r"
                         % (cpus,))
    return settings


def resolve_shape(name, model_dims, given):
    """The concrete shape of one input: the model's static dims, or the request's for symbolic ones."""
    if given is None:
        if any(not isinstance(d, int) or d <= 0 for d in model_dims):
            raise AgentError("USER", "input %r has symbolic dims %r; pass its shape in settings "
                             "input_shapes, e.g. {%r: [1, 3, 224, 224]}" % (name, model_dims, name))
        return list(model_dims)
    if len(given) != len(model_dims):
        raise AgentError("USER", "input %r has rank %d in the model but input_shapes gives %r"
                         % (name, len(model_dims), given))
    for model_dim, dim in zip(model_dims, given):
        if isinstance(model_dim, int) and model_dim > 0 and model_dim != dim:
            raise AgentError("USER", "input %r has shape %r in the model but input_shapes gives %r"
                             % (name, model_dims, given))
    return list(given)


def make_inputs(session, settings):
    """Random inputs from a fixed seed for every graph input, shapes and dtypes from the model."""
    specs = []
    for node in session.get_inputs():
        dtype = ORT_DTYPES.get(node.type)
        if dtype is None:
            raise AgentError("USER", "input %r has type %s, which the agent cannot generate"
                             % (node.name, node.type))
        specs.append((node.name, list(node.shape), dtype))
    return _random_feeds(specs, settings)


# ---------------------------------------------------------------- runtimes

RUNTIMES = ("onnxruntime", "litert", "executorch", "openvino")
# Per runtime: the package to install on the device, the module the agent imports (only
# when a request asks for that runtime), the oldest Python its wheels support, the model
# file suffixes it loads, and its backends (None: whatever the runtime itself names; the
# default is DEFAULT_BACKENDS').
RUNTIME_FACTS = {
    "onnxruntime": {"package": "onnxruntime", "module": "onnxruntime", "python": (3, 8),
                    "suffixes": (".onnx",), "backends": None},
    "litert": {"package": "ai-edge-litert", "module": "ai_edge_litert", "python": (3, 9),
               "suffixes": (".tflite",), "backends": ("xnnpack", "cpu", "gpu")},
    "executorch": {"package": "executorch", "module": "executorch", "python": (3, 10),
                   "suffixes": (".pte",), "backends": ("xnnpack", "portable")},
    "openvino": {"package": "openvino", "module": "openvino", "python": (3, 10),
                 "suffixes": (".onnx", ".xml"), "backends": None},
}
DEFAULT_BACKENDS = {"onnxruntime": None, "litert": "xnnpack", "executorch": "xnnpack",
                    "openvino": "CPU"}
# What a model file's first bytes say it is (suffix -> format name).
FORMAT_OF_SUFFIX = {".onnx": "ONNX", ".tflite": "TFLite (LiteRT)", ".pte": "ExecuTorch .pte",
                    ".xml": "OpenVINO IR"}
LITERT_GPU_DELEGATE = "libtensorflowlite_gpu_delegate.so"


def content_format(path):
    """The suffix a model file's content belongs to, from its first bytes: ".tflite" (the
    flatbuffer identifier TFL3), ".pte" (ET and two digits), ".xml" (an XML document),
    ".onnx" (a protobuf whose first field is ir_version); None when none of them."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64)
    except (OSError, IOError):
        return None
    if head[4:8] == b"TFL3":
        return ".tflite"
    if head[4:6] == b"ET" and head[6:8].isdigit():
        return ".pte"
    if head.lstrip().startswith(b"<?xml") or head.lstrip().startswith(b"<net"):
        return ".xml"
    if head[:1] == b"\x08":
        return ".onnx"
    return None


def check_model_format(path, runtime):
    """LOAD error naming the file when its content is not a format `runtime` loads (a
    foreign or corrupt file), before the runtime sees it."""
    found = content_format(path)
    loads = RUNTIME_FACTS[runtime]["suffixes"]
    if found not in loads:
        raise AgentError("LOAD", "model file %s is %s, which %s does not load (it loads %s): "
                         "the file is corrupt or for another runtime"
                         % (path, FORMAT_OF_SUFFIX.get(found, "no model format the agent knows"),
                            runtime, ", ".join(FORMAT_OF_SUFFIX[s] for s in loads)))


def runtime_versions():
    """{runtime: version} of the runtimes other than onnxruntime installed here, from their
    package metadata (nothing is imported: a runtime is imported only when asked for)."""
    versions = {}
    try:
        from importlib import metadata
    except ImportError:  # Python < 3.8 never runs the agent
        return versions
    for name in RUNTIMES[1:]:
        try:
            versions[name] = metadata.version(RUNTIME_FACTS[name]["package"])
        except Exception:  # not installed (or broken metadata): not offered
            pass
    return versions


def import_runtime(runtime):
    """The module of `runtime`, imported now; LOAD error naming the package to install
    (and the Python it needs) when it is missing."""
    if runtime == "onnxruntime":
        return import_onnxruntime()
    facts = RUNTIME_FACTS[runtime]
    try:
        import numpy  # noqa: F401
        if runtime == "litert":
            from ai_edge_litert import interpreter as module
        elif runtime == "executorch":
            import executorch.runtime as module
        else:
            import openvino as module
    except ImportError as exc:
        needs = ""
        if sys.version_info[:2] < facts["python"]:
            needs = "; it needs Python >= %d.%d, this device has %s" % (
                facts["python"] + (platform.python_version(),))
        raise AgentError("LOAD", "runtime %s is not installed on this device (%s, Python %s): "
                         "install it with '%s -m pip install %s'%s"
                         % (runtime, _one_line(exc), platform.python_version(),
                            sys.executable, facts["package"], needs))
    return module


def check_backend(runtime, module, settings):
    """The backend the request asks for, checked against what `runtime` offers here."""
    backend = settings["backend"] or DEFAULT_BACKENDS[runtime]
    offered = RUNTIME_FACTS[runtime]["backends"]
    if runtime == "onnxruntime":
        return settings["provider"]
    if runtime == "openvino":
        offered = tuple(module.Core().available_devices) + ("AUTO",)
    if backend not in offered:
        raise AgentError("USER", "%s has no backend %r on this device; it has %s"
                         % (runtime, backend, ", ".join(offered)))
    return backend


def _random_feeds(specs, settings):
    """Random inputs from a fixed seed for `specs` [(name, dims, numpy dtype name)]: dims
    from the model, symbolic ones from settings input_shapes. ({name: array}, described)."""
    import numpy

    rng = numpy.random.RandomState(settings["seed"])
    given = settings["input_shapes"] or {}
    names = [name for name, _, _ in specs]
    stray = sorted(set(given) - set(names))
    if stray:
        raise AgentError("USER", "input_shapes names %s, but the model's inputs are %s"
                         % (", ".join(stray), ", ".join(names)))
    feeds, described = {}, []
    for name, dims, dtype in specs:
        shape = resolve_shape(name, list(dims), given.get(name))
        if dtype.startswith("float"):
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype == "bool":
            value = rng.random_sample(shape) < 0.5
        else:
            value = rng.randint(0, 2, size=shape).astype(dtype)
        feeds[name] = value
        described.append({"name": name, "shape": shape, "dtype": dtype})
    return feeds, described


class OrtModel(object):
    """onnxruntime: an InferenceSession on the requested provider; per_op from its profiler."""

    def __init__(self, ort, path, settings):
        self.module, self.path, self.settings = ort, path, settings
        self.session = _session(ort, path, session_options(ort, settings), settings)
        self.info = {"name": "onnxruntime", "version": ort.__version__,
                     "provider": settings["provider"]}

    def make_inputs(self):
        self.feeds, self.inputs = make_inputs(self.session, self.settings)
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self):
        self.session.run(self.outputs, self.feeds)

    def outputs_now(self):
        return self.session.run(self.outputs, self.feeds)

    def per_op(self):
        return per_op_profile(self.module, self.path, self.settings, self.feeds, self.outputs)


class LiteRTModel(object):
    """LiteRT's Interpreter: num_threads from intra_op_threads (0: its choice), XNNPACK (the
    default delegate), the plain CPU kernels ("cpu") or the GPU delegate ("gpu"). How many
    delegate partitions took the graph and how many nodes stayed outside them is recorded;
    with require_backend, nodes left to the CPU kernels are an error."""

    def __init__(self, module, path, settings):
        self.settings = settings
        backend = settings["backend"] or "xnnpack"
        threads = settings["intra_op_threads"] or None
        kwargs = {"model_path": path, "num_threads": threads}
        if backend == "cpu":
            kwargs["experimental_op_resolver_type"] = \
                module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        try:
            if backend == "gpu":
                kwargs["experimental_op_resolver_type"] = \
                    module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
                kwargs["experimental_delegates"] = [module.load_delegate(LITERT_GPU_DELEGATE)]
            self.interpreter = module.Interpreter(**kwargs)
            self.interpreter.allocate_tensors()
        except Exception as exc:
            raise AgentError("LOAD", "LiteRT %s cannot load %s with backend %s: %s"
                             % (_litert_version(), path, backend, _one_line(exc)))
        ops = [op.get("op_name") for op in self.interpreter._get_ops_details()]
        partitions = ops.count("DELEGATE")
        # a delegate node replaces the nodes it took; the interpreter still lists them
        self.info = {"name": "litert", "version": _litert_version(), "backend": backend,
                     "threads": settings["intra_op_threads"],
                     "delegated": {"partitions": partitions, "nodes": len(ops) - partitions}}
        if backend != "cpu" and partitions == 0:
            self.info["delegated"]["fell_back"] = True
            if settings["require_backend"]:
                raise AgentError("LOAD", "LiteRT's %s delegate took none of the %d nodes of "
                                 "%s: every node would run on the CPU kernels"
                                 % (backend, len(ops), path))

    def make_inputs(self):
        import numpy
        details = self.interpreter.get_input_details()
        specs = [(d["name"], [int(x) for x in d["shape"]], numpy.dtype(d["dtype"]).name)
                 for d in details]
        self.feeds, self.inputs = _random_feeds(specs, self.settings)
        for detail in details:
            self.interpreter.set_tensor(detail["index"], self.feeds[detail["name"]])
        self.output_details = self.interpreter.get_output_details()

    def run(self):
        self.interpreter.invoke()

    def outputs_now(self):
        self.interpreter.invoke()
        return [self.interpreter.get_tensor(d["index"]) for d in self.output_details]

    def per_op(self):
        raise AgentError("USER", "LiteRT's Python API gives no per-operator times; measure "
                         "without per_op, or run LiteRT's benchmark_model with "
                         "--enable_op_profiling")


def _litert_version():
    try:
        from importlib import metadata
        return metadata.version("ai-edge-litert")
    except Exception:
        return "unknown"


class OpenVINOModel(object):
    """OpenVINO: the model read (ONNX or IR) and compiled for the device asked for (CPU by
    default), INFERENCE_NUM_THREADS from intra_op_threads (0: its choice), fp32 inference
    unless the host converted the model, and the devices it really runs on recorded."""

    def __init__(self, module, path, settings):
        self.module, self.path, self.settings = module, path, settings
        self.backend = settings["backend"] or "CPU"
        self.core = module.Core()
        try:
            self.model = self.core.read_model(path)
            self.compiled = self._compile(False)
        except Exception as exc:
            raise AgentError("LOAD", "OpenVINO %s cannot load %s on %s: %s"
                             % (module.__version__, path, self.backend, _one_line(exc)))
        try:
            devices = [str(d) for d in self.compiled.get_property("EXECUTION_DEVICES")]
        except Exception:
            devices = [self.backend]
        self.info = {"name": "openvino", "version": module.__version__,
                     "backend": self.backend, "execution_devices": devices,
                     "threads": settings["intra_op_threads"]}
        asked = self.backend.split(":")[0]
        if asked not in ("AUTO", "MULTI", "HETERO") and not all(
                d.split(".")[0] == asked for d in devices):
            self.info["fell_back"] = True
            if settings["require_backend"]:
                raise AgentError("LOAD", "OpenVINO ran %s on %s, not only on %s"
                                 % (path, ", ".join(devices), self.backend))

    def _compile(self, profiling):
        config = {}
        if self.backend.split(":")[0] in ("CPU", "AUTO"):
            if self.settings["intra_op_threads"]:
                config["INFERENCE_NUM_THREADS"] = self.settings["intra_op_threads"]
            if self.settings["precision"] == "fp32":  # no silent bf16 on AMX/AVX512-bf16
                config["INFERENCE_PRECISION_HINT"] = "f32"
            if self.settings["cpu_affinity"] is not None:
                config["ENABLE_CPU_PINNING"] = True
        if profiling:
            config["PERF_COUNT"] = True
        if self.backend.split(":")[0] != "CPU":
            config = dict((k, v) for k, v in config.items()
                          if k in ("PERF_COUNT", "INFERENCE_PRECISION_HINT"))
        return self.core.compile_model(self.model, self.backend, config)

    def make_inputs(self):
        specs = []
        for port in self.compiled.inputs:
            shape = port.get_partial_shape()
            dims = [d.get_length() if d.is_static else None for d in shape]
            specs.append((port.get_any_name(), dims, port.get_element_type().to_dtype().name))
        self.feeds, self.inputs = _random_feeds(specs, self.settings)
        self.request = self.compiled.create_infer_request()
        for port in self.compiled.inputs:
            self.request.set_tensor(port, self.module.Tensor(self.feeds[port.get_any_name()]))

    def run(self):
        self.request.infer()

    def outputs_now(self):
        self.request.infer()
        return [self.request.get_tensor(port).data.copy() for port in self.compiled.outputs]

    def per_op(self):
        """OpenVINO's per-layer performance counts, in a compiled model of their own."""
        compiled = self._compile(True)
        request = compiled.create_infer_request()
        for port in compiled.inputs:
            request.set_tensor(port, self.module.Tensor(self.feeds[port.get_any_name()]))
        nodes, order, runs = {}, [], []
        for index in range(PROFILE_WARMUP_RUNS + self.settings["profile_runs"]):
            started = time.perf_counter()
            request.infer()
            elapsed = (time.perf_counter() - started) * 1e3
            if index < PROFILE_WARMUP_RUNS:
                continue
            runs.append(elapsed)
            for info in request.get_profiling_info():
                status = str(info.status).rsplit(".", 1)[-1]
                if status != "EXECUTED":
                    continue
                node = nodes.get(info.node_name)
                if node is None:
                    node = nodes[info.node_name] = {
                        "name": info.node_name, "op_type": info.node_type,
                        "provider": "%s:%s" % (self.backend, info.exec_type), "times": []}
                    order.append(info.node_name)
                node["times"].append(info.real_time.total_seconds() * 1e3)
        return _op_records(nodes, order, runs)


class ExecuTorchModel(object):
    """ExecuTorch's Python runtime: the .pte's forward method, lowered on the host to the
    backend asked for (XNNPACK by default: the backend is baked into the file, so the agent
    checks the runtime has it registered). Threads: XNNPACK's pool is sized to
    intra_op_threads where the runtime lets us (0: its choice). per_op: ETDump through
    the devtools Inspector, where this build of the runtime records events."""

    def __init__(self, module, path, settings):
        self.module, self.path, self.settings = module, path, settings
        backend = settings["backend"] or "xnnpack"
        runtime = module.Runtime.get()
        registered = list(runtime.backend_registry.registered_backend_names)
        if backend == "xnnpack" and "XnnpackBackend" not in registered:
            raise AgentError("USER", "this device's ExecuTorch has no XnnpackBackend (it has "
                             "%s)" % (", ".join(registered) or "none"))
        threads = _executorch_threads(settings["intra_op_threads"])
        try:
            self.program = runtime.load_program(path)
            self.method = self.program.load_method("forward")
        except Exception as exc:
            raise AgentError("LOAD", "ExecuTorch %s cannot load %s: %s"
                             % (_executorch_version(), path, _one_line(exc)))
        if self.method is None:
            raise AgentError("LOAD", "ExecuTorch program %s has no method 'forward'" % path)
        self.info = {"name": "executorch", "version": _executorch_version(),
                     "backend": backend, "threads": threads,
                     "registered_backends": registered}

    def make_inputs(self):
        import torch
        meta = self.method.metadata
        specs = []
        for index in range(meta.num_inputs()):
            info = meta.input_tensor_meta(index)
            dtype = EXECUTORCH_DTYPES.get(int(info.dtype()))
            if dtype is None:
                raise AgentError("USER", "input %d of %s has ExecuTorch scalar type %s, which "
                                 "the agent cannot generate" % (index, self.path, info.dtype()))
            specs.append(("input%d" % index, list(info.sizes()), dtype))
        self.feeds, self.inputs = _random_feeds(specs, self.settings)
        self.args = tuple(torch.from_numpy(self.feeds[name]) for name, _, _ in specs)

    def run(self):
        self.method.execute(self.args)

    def outputs_now(self):
        return [o.numpy() for o in self.method.execute(self.args)]

    def per_op(self):
        """Per-operator times from ETDump, read with the devtools Inspector."""
        folder = tempfile.mkdtemp(prefix="harness-etdump-")
        try:
            program = self.module.Runtime.get().load_program(self.path, enable_etdump=True,
                                                             debug_buffer_size=0)
            method = program.load_method("forward")
            runs = []
            for index in range(PROFILE_WARMUP_RUNS + self.settings["profile_runs"]):
                started = time.perf_counter()
                method.execute(self.args)
                if index >= PROFILE_WARMUP_RUNS:
                    runs.append((time.perf_counter() - started) * 1e3)
            etdump = os.path.join(folder, "run.etdp")
            program.write_etdump_result_to_file(etdump, os.path.join(folder, "debug.bin"))
            if not os.path.isfile(etdump) or os.path.getsize(etdump) == 0:
                raise AgentError("USER", "this ExecuTorch runtime records no ETDump (it is "
                                 "built without its event tracer); measure without per_op")
            from executorch.devtools import Inspector
            inspector = Inspector(etdump_path=etdump)
        except AgentError:
            raise
        except Exception as exc:
            raise AgentError("RUNTIME", "ExecuTorch's ETDump could not be read: %s"
                             % _one_line(exc))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        nodes, order = {}, []
        for block in inspector.event_blocks:
            for event in block.events:
                times = getattr(event, "perf_data", None)
                # the method's and a delegate call's own events wrap the ops inside them
                if times is None or event.name in ("Method::execute", "Program::load_method",
                                                   "DELEGATE_CALL", "OPERATOR_CALL"):
                    continue
                node = nodes.get(event.name)
                if node is None:
                    node = nodes[event.name] = {
                        "name": event.name, "op_type": event.name.split("#")[0].strip(),
                        "provider": (getattr(event, "delegate_backend_name", None) or "delegate")
                        if getattr(event, "is_delegated_op", False) else "portable",
                        "times": []}
                    order.append(event.name)
                node["times"].extend(list(times.raw)[PROFILE_WARMUP_RUNS:])
        return _op_records(nodes, order, runs)


# ExecuTorch's ScalarType numbers -> numpy dtype names.
EXECUTORCH_DTYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16",
                     6: "float32", 7: "float64", 11: "bool"}


def _executorch_threads(threads):
    """Size ExecuTorch's thread pool (XNNPACK's) where its bindings let us (0: left as the
    runtime chose); the size it runs with, None where the bindings do not say."""
    try:
        from executorch.extension.pybindings import portable_lib
        if threads:
            portable_lib._unsafe_reset_threadpool(threads)
        return int(portable_lib._threadpool_get_thread_count())
    except Exception:
        return None  # not controllable with these bindings: recorded as such


def _executorch_version():
    try:
        from importlib import metadata
        return metadata.version("executorch")
    except Exception:
        return "unknown"


def _op_records(nodes, order, runs):
    """Per-node medians (ms), in the shape per_op_profile answers."""
    if not runs:
        raise AgentError("RUNTIME", "the per-operator profile holds no runs")
    records = []
    for name in order:
        node = nodes[name]
        times = sorted(node.pop("times"))
        if times:
            records.append(dict(node, median_ms=_median_of(times), runs=len(times)))
    return {"runs": len(runs), "run_median_ms": _median_of(sorted(runs)), "nodes": records,
            "trace": [], "arena": {}}


RUNTIME_MODELS = {"onnxruntime": OrtModel, "litert": LiteRTModel,
                  "executorch": ExecuTorchModel, "openvino": OpenVINOModel}


def open_model(module, path, settings):
    """The model at `path` loaded by the runtime of `settings` (its content checked first):
    (model, load time in ms)."""
    runtime = settings["runtime"]
    if runtime != "onnxruntime":
        check_model_format(path, runtime)
    started = time.perf_counter()
    model = RUNTIME_MODELS[runtime](module, path, settings)
    return model, (time.perf_counter() - started) * 1e3


# ---------------------------------------------------------------- measurement

def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model_file(path, sha256):
    if not isinstance(path, str) or not path:
        raise AgentError("USER", "request needs 'model': the path of an ONNX file on the device")
    if not os.path.isfile(path):
        raise AgentError("TRANSFER", "model file %s is not on the device; put it there again" % path)
    if sha256 is not None:
        actual = file_sha256(path)
        if actual != sha256:
            raise AgentError("TRANSFER", "model file %s has sha256 %s, expected %s: the copy on "
                             "the device is damaged or stale; put it again" % (path, actual, sha256))


def import_onnxruntime():
    try:
        import numpy  # noqa: F401  (onnxruntime needs it; say so if it is missing)
        import onnxruntime
    except ImportError as exc:
        raise AgentError("LOAD", "cannot import %s on this device (%s, Python %s): install it with "
                         "'%s -m pip install onnxruntime numpy'"
                         % (getattr(exc, "name", None) or "onnxruntime", exc,
                            platform.python_version(), sys.executable))
    return onnxruntime


def session_options(ort, settings):
    options = ort.SessionOptions()
    options.intra_op_num_threads = settings["intra_op_threads"]
    options.inter_op_num_threads = settings["inter_op_threads"]
    options.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[settings["graph_optimization_level"]]
    options.execution_mode = {
        "sequential": ort.ExecutionMode.ORT_SEQUENTIAL,
        "parallel": ort.ExecutionMode.ORT_PARALLEL,
    }[settings["execution_mode"]]
    options.log_severity_level = 3
    return options


class DeviceLock(object):
    """An exclusive flock on a file on the device, held while measuring, so that two hosts
    (or two users) never measure on one device at once. The kernel frees it if we die.

    The lock file usually sits in a folder every user can write to (/tmp, /data/local/tmp),
    so it is treated as hostile: a symbolic link is never followed, only a regular file is
    locked, and the file is only ever read-opened, never truncated or written to (a link
    planted there must not make the agent overwrite what it points to). A missing file is
    created exclusively, readable by all (mode 0o666 less the umask), since flock works on a
    read-only descriptor; an existing file's mode is never changed."""

    def __init__(self, path, wait_s):
        self.path = path
        self.wait_s = wait_s
        self.descriptor = None

    def _refuse(self, what):
        return AgentError("USER", "the device lock %s is %s, not a regular file: the agent "
                          "locks only a regular file and never follows a link there; fix: "
                          "remove %s if nobody should have put it there, or choose another "
                          "lock path with 'lock' in devices.toml" % (self.path, what, self.path))

    def _describe(self, mode):
        if stat.S_ISLNK(mode):
            try:
                return "a symbolic link (to %s)" % os.readlink(self.path)
            except OSError:
                return "a symbolic link"
        if stat.S_ISDIR(mode):
            return "a folder"
        if stat.S_ISFIFO(mode):
            return "a FIFO"
        if stat.S_ISSOCK(mode):
            return "a socket"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            return "a device file"
        return "not a plain file (mode %o)" % mode

    def _open(self):
        """A read-only descriptor on the lock file, created if missing; never follows a link."""
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        flags = (os.O_RDONLY | nofollow | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_NOCTTY", 0))
        for _ in range(5):  # the file may come and go while another agent creates it
            try:
                info = os.lstat(self.path)
            except FileNotFoundError:
                info = None
            except OSError as exc:
                raise AgentError("USER", "cannot inspect the device lock %s: %s; fix: choose "
                                 "another lock path with 'lock' in devices.toml"
                                 % (self.path, exc))
            if info is not None and not stat.S_ISREG(info.st_mode):
                raise self._refuse(self._describe(info.st_mode))
            try:
                if info is None:  # exclusively: never through a link planted meanwhile
                    descriptor = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
                else:  # O_NONBLOCK: a FIFO swapped in meanwhile must not hang the open
                    descriptor = os.open(self.path, flags | os.O_NONBLOCK)
            except FileExistsError:
                continue
            except FileNotFoundError:
                if info is None:  # the folder itself is missing
                    raise AgentError("USER", "cannot create the device lock %s: its folder "
                                     "does not exist; fix: create the folder, or choose "
                                     "another lock path with 'lock' in devices.toml"
                                     % self.path)
                continue
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.EMLINK) and nofollow:
                    raise self._refuse("a symbolic link")
                raise AgentError("USER", "cannot open the device lock %s: %s; fix: choose "
                                 "another lock path with 'lock' in devices.toml"
                                 % (self.path, exc))
            mode = os.fstat(descriptor).st_mode
            if not stat.S_ISREG(mode):  # swapped between lstat and open
                os.close(descriptor)
                raise self._refuse(self._describe(mode))
            return descriptor
        raise AgentError("USER", "the device lock %s keeps appearing and disappearing; fix: "
                         "choose another lock path with 'lock' in devices.toml" % self.path)

    def __enter__(self):
        if not self.path:
            return self
        import fcntl
        descriptor = self._open()
        started = time.time()
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except (IOError, OSError):
                if time.time() - started >= self.wait_s:
                    holder = _flock_holder(descriptor)
                    os.close(descriptor)
                    raise AgentError("TIMEOUT", "the device stayed locked by another "
                                     "measurement (%s, lock %s) for %.0f s"
                                     % (holder or "holder unknown", self.path, self.wait_s))
                time.sleep(0.05)
        self.descriptor = descriptor
        return self

    def __exit__(self, *exc):
        if self.descriptor is not None:
            import fcntl
            fcntl.flock(self.descriptor, fcntl.LOCK_UN)
            os.close(self.descriptor)
            self.descriptor = None


def _flock_holder(descriptor):
    """'pid N' of the process holding a flock on the descriptor's file, from /proc/locks
    (None where that is not readable): read, never stored in the lock file."""
    info = os.fstat(descriptor)
    inode = "%02x:%02x:%d" % (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
    for line in (_read("/proc/locks") or "").splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode:
            return "pid %s" % fields[4]
    return None


def measure(model, sha256=None, settings=None, lock=None, lock_wait_s=600.0):
    """Load the model, run it once, warm up, then time runs until both min_runs and min_time_ms
    are met or max_time_ms is reached. Returns the raw per-run times in milliseconds. With
    `lock`, holds an exclusive lock on that file on the device while measuring. Thread
    settings above this device's cores are a USER error, before the lock is taken."""
    settings = parse_settings(settings)
    check_threads(settings, device_cores(), "this device's cores")
    with DeviceLock(lock, lock_wait_s):
        return _measure(model, sha256, settings)


# ---------------------------------------------------------------- memory

def memory_status():
    """This process's resident memory now and its high-water mark, in kB, from
    /proc/self/status (VmRSS, VmHWM); None where that file is not readable (not Linux)."""
    fields = {}
    for line in (_read("/proc/self/status") or "").splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            try:
                fields[key] = int(value.split()[0])
            except (ValueError, IndexError):
                pass
    if "VmRSS" not in fields or "VmHWM" not in fields:
        return None
    return fields


def reset_peak():
    """Reset the high-water mark VmHWM to the resident memory now (Linux: "5" written to
    /proc/self/clear_refs); False where the kernel refuses, so peaks then count from the
    process's start and the answer says so."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except (OSError, IOError):
        return False


class MemoryWatch(object):
    """Peaks of resident memory over the phases of one measurement: load, then timed runs.
    Each phase's peak is the high-water mark at its end, reset at its start where the kernel
    lets us; otherwise it is the process's peak so far, and `peaks_reset` says so."""

    def __init__(self):
        self.baseline = memory_status()
        self.peaks = {}
        self.resets = []

    def start(self):
        self.resets.append(reset_peak())

    def end(self, phase):
        status = memory_status()
        self.peaks[phase] = None if status is None else status["VmHWM"]

    def report(self, model_path):
        kb_to_mb = 1.0 / 1024.0
        if self.baseline is None:
            return {"available": False, "model_bytes": os.path.getsize(model_path)}
        return {"available": True,
                "baseline_rss_mb": self.baseline["VmRSS"] * kb_to_mb,
                "baseline_peak_mb": self.baseline["VmHWM"] * kb_to_mb,
                "load_peak_mb": (self.peaks.get("load") or 0) * kb_to_mb,
                "run_peak_mb": (self.peaks.get("run") or 0) * kb_to_mb,
                "peaks_reset": bool(self.resets) and all(self.resets),
                "model_bytes": os.path.getsize(model_path)}


# ---------------------------------------------------------------- per-operator profile

def _trace_events(path):
    with open(path) as handle:
        data = json.load(handle)
    events = data.get("traceEvents") if isinstance(data, dict) else data
    return [e for e in events or [] if isinstance(e, dict)]


def _int_arg(args, key):
    value = args.get(key)
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def per_op_profile(ort, model, settings, feeds, outputs):
    """Per-node times from onnxruntime's own profiler, in a session of their own (profiling
    perturbs timing, so the timed runs never have it on): PROFILE_WARMUP_RUNS runs dropped,
    then `profile_runs` runs; per node the median of its kernel times (ms), its op type and
    the execution provider that ran it; the median whole run as onnxruntime saw it; and the
    trace events of the run whose length is the median's (a Chrome trace)."""
    options = session_options(ort, settings)
    if not hasattr(options, "enable_profiling") or not hasattr(ort.InferenceSession,
                                                               "end_profiling"):
        raise AgentError("USER", "onnxruntime %s on this device cannot profile per operator "
                         "(no SessionOptions.enable_profiling); profile without per_op, or "
                         "install a newer onnxruntime" % ort.__version__)
    folder = tempfile.mkdtemp(prefix="harness-profile-")
    written = None
    try:
        options.enable_profiling = True
        if hasattr(options, "profile_file_prefix"):
            options.profile_file_prefix = os.path.join(folder, "ort")
        session = _session(ort, model, options, settings)
        for _ in range(PROFILE_WARMUP_RUNS + settings["profile_runs"]):
            session.run(outputs, feeds)
        written = session.end_profiling()
        events = _trace_events(written)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if written and os.path.isfile(written) and not os.path.islink(written):
            os.unlink(written)  # old onnxruntime writes into the working folder
    runs = sorted((dict(e, ts=e.get("ts", 0), dur=e.get("dur", 0)) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])
    runs = runs[PROFILE_WARMUP_RUNS:]
    if not runs:
        raise AgentError("RUNTIME", "onnxruntime's profile holds no model_run events")
    kernels = sorted((e for e in events if e.get("cat") == "Node"
                      and str(e.get("name", "")).endswith("_kernel_time")),
                     key=lambda e: e.get("ts", 0))
    nodes, order = {}, []
    per_run = [[] for _ in runs]
    run_index = 0
    for event in kernels:
        ts = event.get("ts", 0)
        while run_index < len(runs) and ts > runs[run_index]["ts"] + runs[run_index]["dur"]:
            run_index += 1
        if run_index >= len(runs):
            break
        if ts < runs[run_index]["ts"]:
            continue  # a warm-up run's node
        args = event.get("args") or {}
        name = str(event["name"])[:-len("_kernel_time")]
        node = nodes.get(name)
        if node is None:
            # an onnxruntime whose profiler leaves these out gets "unknown", not a refusal
            node = nodes[name] = {"name": name, "op_type": args.get("op_name") or "unknown",
                                  "provider": args.get("provider") or "unknown", "times": [],
                                  "output_bytes": _int_arg(args, "output_size"),
                                  "activation_bytes": _int_arg(args, "activation_size"),
                                  "parameter_bytes": _int_arg(args, "parameter_size")}
            order.append(name)
        node["times"].append(event.get("dur", 0) / 1e3)
        per_run[run_index].append(event)
    run_ms = [r["dur"] / 1e3 for r in runs]
    middle = sorted(range(len(runs)), key=lambda i: run_ms[i])[len(runs) // 2]
    start = runs[middle]["ts"]
    trace = [dict(e, ts=e.get("ts", 0) - start) for e in [runs[middle]] + per_run[middle]]
    arena = {}
    for key, label in (("mem_arena_held", "arena_held_bytes"),
                       ("mem_in_use_peak", "in_use_peak_bytes")):
        values = [_int_arg(e.get("args") or {}, key) for e in kernels]
        values = [v for v in values if v is not None]
        if values:  # onnxruntime's CPU arena, as its profiler reports it (newer versions)
            arena[label] = max(values)
    records = []
    for name in order:
        node = nodes[name]
        times = sorted(node.pop("times"))
        records.append(dict(node, median_ms=_median_of(times), runs=len(times)))
    return {"runs": len(runs), "run_median_ms": _median_of(sorted(run_ms)),
            "nodes": records, "trace": trace, "arena": arena}


# ---------------------------------------------------------------- stopping rules

def median_interval(ordered, confidence):
    """The distribution-free interval of the median of independent runs, from order
    statistics: (low, high) such that the true median lies inside with probability at
    least `confidence`; None when there are too few runs for that confidence. `ordered` is
    sorted."""
    return quantile_interval(ordered, 0.5, confidence)


def quantile_interval(ordered, q, confidence):
    """The distribution-free interval of the q-quantile of independent values (sorted), from
    order statistics: (low, high) such that the true quantile lies inside with probability
    at least `confidence`; None when there are too few values for that confidence on either
    side. Exact binomial tails up to 1000 values, the normal approximation beyond. q lies
    strictly between 0 and 1."""
    if not 0 < q < 1:
        raise ValueError("a quantile's interval needs 0 < q < 1, got %r" % (q,))
    n = len(ordered)
    if n < 2:
        return None
    half_alpha = (1.0 - confidence) / 2
    low_rank = _outside_ranks(n, q, half_alpha)         # the low-th value is below, ...
    high_rank = _outside_ranks(n, 1.0 - q, half_alpha)  # ... the high-th from the top above
    if low_rank < 1 or high_rank < 1:
        return None
    return ordered[low_rank - 1], ordered[n - high_rank]


def _outside_ranks(n, q, half_alpha):
    """The largest k (at most n*q) with P(Bin(n, q) < k) <= half_alpha: the k-th smallest of
    n values lies above their q-quantile with probability at most half_alpha."""
    most = int(math.floor(n * q))
    if n > 1000:
        z = statistics.NormalDist().inv_cdf(1 - half_alpha)
        return min(most, int(math.floor(n * q - z * math.sqrt(n * q * (1 - q)))))
    log_q, log_rest = math.log(q), math.log(1 - q)
    tail, k = 0.0, 0
    while k < most:
        term = math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * log_q + (n - k) * log_rest)
        if tail + term > half_alpha:
            break
        tail += term
        k += 1
    return k


def _median_of(ordered):
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2.0


def drifting(samples, rel_ci):
    """Whether the runs drift (the first and the second half disagree, as under thermal
    throttling): their medians differ by more than the precision asked for and, once each
    half has enough runs for it, their 95% intervals do not overlap. A drifting loop is never
    stopped early (with few runs this errs towards running on, which only costs runs)."""
    half = len(samples) // 2
    if half < 2:
        return False
    first, second = sorted(samples[:half]), sorted(samples[half:])
    if abs(_median_of(second) - _median_of(first)) <= rel_ci * _median_of(sorted(samples)):
        return False
    a, b = median_interval(first, 0.95), median_interval(second, 0.95)
    return a is None or b is None or a[1] < b[0] or b[1] < a[0]


def look_confidence(confidence, look):
    """The confidence one look at the data must hold so that all looks together err with
    probability at most 1 - confidence: look k spends (1 - confidence) * 6 / (pi^2 k^2)."""
    return 1.0 - (1.0 - confidence) * 6.0 / (math.pi ** 2 * look ** 2)


def widened(interval, spread):
    """An interval of one window's value, widened to hold the value over windows whenever
    the window lies within `spread` of it (limit_look: the between-window term)."""
    if interval is None:
        return None
    return (interval[0] / (1.0 + spread), interval[1] / (1.0 - spread))


def limit_verdict(interval, median, limit, indifference):
    """The three-way test of a median against a limit with an indifference zone of
    +-indifference x limit: "below" when the interval lies under the zone's top, "above"
    when it lies over the zone's bottom (both: the interval is inside the zone, and the
    median says which side), None (undecided) otherwise. A true median outside the zone
    lies outside an interval that answers wrongly, so with an interval that covers it with
    probability `confidence` a call outside the zone errs with at most 1 - confidence."""
    if interval is None:
        return None
    below = interval[1] < limit * (1.0 + indifference)
    above = interval[0] > limit * (1.0 - indifference)
    if below and above:
        return "below" if median < limit else "above"
    return "below" if below else "above" if above else None


def stop_verdict(samples, settings, look):
    """Why the loop may stop now ("settled": the interval of the median says below or above
    the limit, limit_verdict; "precise": it is within rel_ci of the median), or None to
    keep running."""
    if drifting(samples, settings["rel_ci"]):
        return None
    ordered = sorted(samples)
    median = _median_of(ordered)
    if settings["stop"] == "limit":
        # one interval, at the decision's confidence for this look: it settles the limit, or
        # it is precise (the limit within the noise of the median) by the same standard, so
        # a tight interval is never reported unsettled by a laxer one
        interval = median_interval(ordered, look_confidence(settings["confidence"], look))
        if limit_verdict(interval, median, settings["limit_ms"] / 1e3,
                         settings["indifference"]) is not None:
            return "settled"
    else:
        interval = median_interval(ordered, 0.95)
    if interval is not None and max(median - interval[0], interval[1] - median) \
            <= settings["rel_ci"] * median:
        return "precise"
    return None


def timed_loop(run, settings, clock=time.perf_counter):
    """Time `run()` until the stop rule of `settings` holds. Returns the per-run times (s),
    the loop's length (s), and how it stopped: the rule, why ("fixed", "precise", "settled",
    "max_time"), how many looks at the data it took, and whether the runs drift."""
    samples = []
    rule = settings["stop"]
    min_runs = settings["min_runs"]
    min_time = settings["min_time_ms"] / 1e3
    max_time = settings["max_time_ms"] / 1e3
    looks, next_look, reason = 0, min_runs, None
    loop_start = clock()
    while True:
        started = clock()
        run()
        ended = clock()
        samples.append(ended - started)
        elapsed = ended - loop_start
        if rule == "fixed":
            if len(samples) >= min_runs and elapsed >= min_time:
                reason = "fixed"
                break
        elif len(samples) >= next_look and elapsed >= min_time:
            looks += 1
            next_look = len(samples) + max(5, len(samples) // 10)  # looks grow ~10% apart
            reason = stop_verdict(samples, settings, looks)
            if reason is not None:
                break
        if elapsed >= max_time:
            reason = "max_time"
            break
    report = {"rule": rule, "reason": reason, "looks": looks,
              "drift": rule != "fixed" and drifting(samples, settings["rel_ci"]),
              "rel_ci": settings["rel_ci"], "confidence": settings["confidence"],
              "limit_ms": settings["limit_ms"]}
    return samples, elapsed, report


def _prepare(settings):
    """The runtime of `settings` (onnxruntime with the requested provider, or another with
    its backend), and the process pinned as asked: (runtime module, what was controlled)."""
    ort = import_runtime(settings["runtime"])
    if settings["runtime"] != "onnxruntime":
        check_backend(settings["runtime"], ort, settings)
    elif settings["provider"] not in ort.get_available_providers():
        raise AgentError("USER", "execution provider %s is not available here; available: %s"
                         % (settings["provider"], ", ".join(ort.get_available_providers())))
    controlled = {"intra_op_threads": settings["intra_op_threads"],
                  "inter_op_threads": settings["inter_op_threads"]}
    if settings["cpu_affinity"] is not None:
        if not hasattr(os, "sched_setaffinity"):
            raise AgentError("USER", "cpu_affinity is not supported on this system")
        try:
            os.sched_setaffinity(0, settings["cpu_affinity"])
        except (OSError, ValueError) as exc:
            raise AgentError("USER", "cannot pin to CPUs %r: %s" % (settings["cpu_affinity"], exc))
    controlled["affinity"] = _affinity()
    controlled["address_layout"] = address_layout()
    return ort, controlled


def _measure(model, sha256=None, settings=None):
    settings = parse_settings(settings)
    check_model_file(model, sha256)
    ort, controlled = _prepare(settings)
    thermal_before = thermal_zones()

    memory = MemoryWatch()
    memory.start()
    loaded, load_ms = open_model(ort, model, settings)
    memory.end("load")

    loaded.make_inputs()
    clock = time.perf_counter
    with inference_errors():
        memory.start()
        started = clock()
        loaded.run()
        first_run_ms = (clock() - started) * 1e3
        started = clock()
        for _ in range(settings["warmup_runs"]):
            loaded.run()
        warmup_ms = (clock() - started) * 1e3
        samples, elapsed, stop = timed_loop(loaded.run, settings, clock)
        memory.end("run")
        ops = loaded.per_op() if settings["per_op"] else None
    return {
        "agent_version": AGENT_VERSION,
        "load_ms": load_ms,
        "first_run_ms": first_run_ms,
        "warmup_runs": settings["warmup_runs"],
        "warmup_ms": warmup_ms,
        "samples_ms": [round(s * 1e3, 6) for s in samples],
        "loop_ms": elapsed * 1e3,
        "capped": stop["reason"] == "max_time",
        "stop": stop,
        "inputs": loaded.inputs,
        "settings": settings,
        "controlled": controlled,
        "runtime": loaded.info,
        "thermal_before": thermal_before,
        "thermal_after": thermal_zones(),
        "fingerprint": fingerprint(),
        "memory": memory.report(model),
        "ops": ops,
    }


# ---------------------------------------------------------------- interleaved rounds

class Timed(object):
    """A model as the rounds schedule sees it: `run()` once, its blocks of `discard_runs`
    runs thrown away then k timed runs (k so that a block lasts at least block_ms, unless
    the request's block_runs fixes it: interleave), each
    tagged [round, position, sequence, runs in ms, when its timed runs began in s since the
    window began], and with a `cpu_clock` a sixth item: each run's CPU time in ms by that
    clock (see run_cpu_clock). The agent's models run onnxruntime; a simulated device's run
    on a virtual clock (devices.simulated)."""

    def __init__(self, name, run, clock, block_ms, cpu_clock=None, discard_runs=0):
        self.name, self.run, self.clock, self.cpu_clock = name, run, clock, cpu_clock
        self.discard_runs = discard_runs
        probe = []
        for _ in range(PROBE_RUNS):
            started = clock()
            cpu_started = cpu_clock() if cpu_clock is not None else 0.0
            run()
            if cpu_clock is not None:
                cpu_ms = (cpu_clock() - cpu_started) * 1e3
            probe.append(clock() - started)
            if cpu_clock is not None and not cpu_time_plausible(cpu_ms, probe[-1] * 1e3):
                self.cpu_clock = None  # a coarse or broken thread clock: the wall clock only
        self.run_s = max(min(probe), 1e-6)
        self.k = runs_per_block(block_ms, self.run_s * 1e3)
        self.blocks = []
        self.verdict = None  # the limit rule's look that ended its rounds (limit_look)
        self.precise_at = None  # the ci rule: the round after which it was known and left
        self.last_look = None  # the limit rule's last look at it, called or not
        self.looks, self.looked_at, self.next_look = 0, 0, None  # its looks, kept at the last

    def in_rounds(self):
        """Whether it still runs in the window's rounds: neither called by the limit rule
        nor known within rel_ci by the ci rule (either leaves)."""
        return self.verdict is None and self.precise_at is None

    def block(self, round_index, position, sequence, origin):
        """One block: `discard_runs` runs thrown away, then k timed runs; its length (s)."""
        clock, cpu_clock = self.clock, self.cpu_clock
        started = clock()
        for _ in range(self.discard_runs):
            self.run()
        timed_from = clock()
        times, cpu_times = [], []
        for _ in range(self.k):
            begun = clock()
            cpu_begun = cpu_clock() if cpu_clock is not None else 0.0
            self.run()
            if cpu_clock is not None:
                cpu_times.append(round((cpu_clock() - cpu_begun) * 1e3, 6))
            times.append(round((clock() - begun) * 1e3, 6))
        block = [round_index, position, sequence, times, round(timed_from - origin, 6)]
        if cpu_clock is not None:
            block.append(cpu_times)
        self.blocks.append(block)
        return clock() - started


def interleave(models, reference, settings, clock):
    """The rounds schedule (see measure_rounds) over `models` ({name: Timed}) and the
    `reference` (Timed): (rounds completed, loop length in s, {name: error of a model that
    failed mid-window}, why it stopped: "rounds", "max_time", "decided" when stop is "limit"
    and every candidate is called or left undecided, "precise" when stop is "ci" and the
    ratio of every model that did not fail is known within rel_ci, or "failed" once every
    candidate has failed). Under "ci" a model
    leaves the rounds once its own ratio is known (after min_runs rounds at least): the
    window's device time goes to the models still imprecise, not to the precise ones
    waiting for the last.

    A reference block is due before a candidate block that would take the device time since
    the last one past ref_gap_ms, and at a round's end, once a candidate block ran since the
    last (one that failed does not count). Below a ref_share of 1 (the default: no bound) it
    also waits until the candidate blocks since the last reference block took at least
    (1 - ref_share) / ref_share times as long as that one (3 times at 0.25): the blocks this
    rule places take at most ref_share of the window's device time. Where blocks are long
    against the gap (a slow board) the share wins: more candidates run between two
    references, and a round may end without one, unless a stop rule looks at it (ci from
    min_runs rounds on, a limit always): its looks read every block of the round, as the
    host reads them after the window. And a candidate never has two blocks between the same
    two references: a reference block comes before its second, whatever the share. Blocks
    that share their references share their noise too, so that would buy no precision for
    the device time it saves. So a lone candidate in its window (and a few beside a slower
    reference) alternates with the reference as before, and the bound holds for windows of
    several candidates; the blocks that open and close the window, and those a stop rule's
    looks bring, come on top. The window always ends on a reference block, so that every
    candidate block has one on either side."""
    gap_s = settings["ref_gap_ms"] / 1e3
    share = settings["ref_share"]
    # every block of the window is read by one clock: the thread's CPU clock only where the
    # probes of the reference and of every model found it sound (see Timed)
    if any(model.cpu_clock is None for model in models.values()):
        reference.cpu_clock = None
    if settings["block_runs"]:  # fixed by the request, not by this window's probe
        reference.k = settings["block_runs"]
    for model in models.values():
        # every block of the window has the reference's k runs: the minimum of more runs is
        # lower, so a ratio of minima over different k would carry a bias of its own
        model.k = reference.k
        model.cpu_clock = reference.cpu_clock
    sequence, completed, failed, reason = 0, 0, {}, "rounds"
    deciding = settings["stop"] == "limit"
    loop_start = clock()
    sequence += 1
    last_reference = _reference_block(reference, 0, -1, sequence, loop_start)
    since_ref, since_names = 0.0, set()  # the candidates' device time and names since then
    round_index, position = 0, -1
    for round_index in range(settings["rounds"]):
        order = [name for name in round_order(sorted(models), settings["seed"], round_index)
                 if name not in failed and models[name].in_rounds()]
        for position, name in enumerate(order):
            if name in since_names:  # its second block since the last reference
                sequence += 1
                last_reference = _reference_block(reference, round_index, position - 1,
                                                  sequence, loop_start)
                since_ref, since_names = 0.0, set()
            sequence += 1
            try:
                since_ref += models[name].block(round_index, position, sequence, loop_start)
                since_names.add(name)
            except Exception as exc:  # that model's error; the round goes on (a block
                failed[name] = AgentError(  # that failed brings no reference after it)
                    "RUNTIME", "inference failed in round %d: %s"
                    % (round_index, _one_line(exc))).to_json()["error"]
            following = models[order[position + 1]] if position + 1 < len(order) else None
            due = following is None or since_ref + following.run_s * (following.k + 1) > gap_s
            # a stop rule's looks at the round's end read every block of the round
            looking = following is None and (deciding or settings["stop"] == "ci" and
                                             round_index + 1 >= settings["min_runs"])
            if due and since_names and (
                    looking or since_ref * share >= (1 - share) * last_reference):
                sequence += 1
                last_reference = _reference_block(reference, round_index, position, sequence,
                                                  loop_start)
                since_ref, since_names = 0.0, set()
        completed = round_index + 1
        if len(failed) == len(models):  # every candidate failed: nothing left to run
            reason = "failed"
            break
        if deciding:  # a look at each candidate still in that is due one; the decided leave
            for name in order:
                if name not in failed:
                    limit_look(models[name], reference, settings, completed)
            if all(name in failed or models[name].verdict is not None for name in models):
                reason = "decided"
                break
        if settings["stop"] == "ci" and completed >= settings["min_runs"]:
            for name in order:  # a model known within rel_ci leaves; the others run on
                if name not in failed and _precise(models[name], reference, settings):
                    models[name].precise_at = completed
            if all(name in failed or not models[name].in_rounds() for name in models):
                reason = "precise"
                break
        if clock() - loop_start >= settings["max_time_ms"] / 1e3:
            reason = "max_time"
            break
    if since_names:  # the last candidate blocks' reference on their far side
        sequence += 1
        _reference_block(reference, round_index, position, sequence, loop_start)
    if deciding:  # the undecided: one last look at what they have (it may call them)
        for name, model in models.items():
            if name not in failed and model.verdict is None:
                limit_look(model, reference, settings, completed, last=True)
    return completed, clock() - loop_start, failed, reason


LOOK_GROWTH = 1.25  # under the limit rule in rounds, looks come as the kept ratios grow 25%
# under the limit rule in rounds, a cost cut-off: an undecided candidate leaves once its
# rounds' interval is within this share of window_spread of its median (see limit_look)
SPREAD_NARROW = 1.0
# and a second: an undecided candidate leaves once the interval of its rounds at this
# confidence lies inside the indifference zone (see limit_look)
NEAR_CONFIDENCE = 0.90


def limit_look(model, reference, settings, completed, last=False):
    """The limit rule's look at a candidate of interleaved rounds, when one is due: the
    interval of the median of its kept blocks' ratios to the reference, tested against the
    limit in units of the reference (limit_ms over the reference's quiet level: the host's,
    else this window's) with the indifference zone. Looks come when the count of kept ratios
    reaches the next step (the first at the fewest that can give an interval at the
    decision's confidence, and min_runs; then 25% more each), and at the `last` round; a
    block is kept or dropped by its reference blocks alone, so the looks' times do not
    depend on the candidate's values, and look k spends its share of the error
    (look_confidence): every look together errs at most 1 - confidence.

    The window is one draw: the ratios of every model in it lie a common 0-1% from their
    value over many workers (one worker's loads share it, and the device's mix of other work
    moves), and each loaded model adds a draw of its own; no number of rounds of the same
    window averages that away. So the interval is widened to hold the truth whenever the
    window's ratio lies within window_spread of it (low / (1 + spread), high / (1 - spread))
    before it is tested. A cost cut-off: a candidate still undecided once its rounds'
    interval lies within SPREAD_NARROW x window_spread of its median leaves undecided
    ("spread"). Its estimate is then within about the spread of the limit, where the
    window's draw alone may put its truth on either side of the zone; settling it would take
    many more rounds, only to narrow the part of the interval the draw does not move. The
    cut-off never makes a call. Nor does the second: a candidate leaves undecided once the
    interval of its rounds at NEAR_CONFIDENCE lies inside the indifference zone. Either
    answer is right there, but the widening takes the spread off the zone, so a call would
    need an interval narrower than the candidate's distance to the limit: most such
    candidates stayed for many rounds and left undecided all the same (on this project's
    host, undecided candidates took a third of a sweep's device time). At one look, a
    candidate whose value in this window lies outside the zone leaves so with probability at
    most (1 - NEAR_CONFIDENCE) / 2; over its looks more often (this error is not spent over
    looks: up to about 16% at the zone's very edge over 14 looks), and one whose window
    reads inside the zone, within the spread of its truth, may leave so however many rounds
    run. Neither cut-off calls a side, so none of this is a wrong call: it is an undecided
    answer outside the zone, which the benchmark counts. Both need a window_spread above 0.
    Sets the model's `verdict` (a dict for the answer's "stop") once it is called or leaves
    so, and `last_look`."""
    due = model.next_look or max(settings["min_runs"], first_look_size(settings["confidence"]))
    if len(model.blocks) < due and not last:
        return  # fewer blocks than the look needs kept ratios: not due, nothing to read
    kept = sorted(ratio for ratio, keep in block_ratios(model.blocks, reference.blocks)
                  if keep)
    if len(kept) < due and not (last and (model.last_look is None or len(kept) > model.looked_at)):
        return
    model.looks += 1
    model.looked_at = len(kept)
    model.next_look = max(len(kept) + 1, int(math.ceil(len(kept) * LOOK_GROWTH)))
    level = settings["reference_level_ms"] or quantile(
        [block_statistic(block_times(block)) for block in reference.blocks], LEVEL_QUANTILE)
    within = median_interval(kept, look_confidence(settings["confidence"], model.looks))
    ratio = _median_of(kept) if kept else None
    spread = settings["window_spread"]
    interval = widened(within, spread)
    limit, indifference = settings["limit_ms"] / level, settings["indifference"]
    outcome = limit_verdict(interval, ratio, limit, indifference)
    rough = median_interval(kept, NEAR_CONFIDENCE)
    narrow = spread > 0 and within is not None and (  # the cost cut-offs: "spread"
        max(ratio - within[0], within[1] - ratio) <= SPREAD_NARROW * spread * ratio or
        (rough is not None and limit * (1 - indifference) <= rough[0] and
         rough[1] <= limit * (1 + indifference)))
    model.last_look = {
        "outcome": outcome, "looks": model.looks, "rounds": completed, "kept": len(kept),
        "ratio": ratio, "ratio_interval": list(interval) if interval is not None else None,
        "window_spread": spread, "left": "settled" if outcome is not None else
        "spread" if narrow else None, "level_ms": level, "limit_ms": settings["limit_ms"],
        "confidence": settings["confidence"], "indifference": settings["indifference"]}
    if outcome is not None or narrow:
        model.verdict = model.last_look


def first_look_size(confidence):
    """The fewest independent values whose median has an interval at the first look's
    confidence (9 at 99%)."""
    n = 2
    while median_interval(range(n), look_confidence(confidence, 1)) is None:
        n += 1
    return n


def rounds_stop(model, settings, completed, reason):
    """How a candidate's rounds stopped, for its answer: the window's rule and why it
    stopped; under the ci rule, the round it left at once known within rel_ci; under the
    limit rule, its own call (limit_look) and why it left."""
    stop = {"rule": {"ci": "rounds-ci", "limit": "rounds-limit"}.get(settings["stop"], "rounds"),
            "reason": reason, "looks": completed, "rel_ci": settings["rel_ci"]}
    if model.precise_at is not None:  # the ci rule: it left once known within rel_ci
        stop.update(reason="precise", looks=model.precise_at)
    if settings["stop"] == "limit" and model.last_look is not None:
        stop.update(model.last_look, reason=model.last_look["left"] or reason)
    return stop


def _reference_block(reference, round_index, position, sequence, origin):
    """A block of the reference, its length (s); its failure fails the window, naming the
    reference."""
    try:
        return reference.block(round_index, position, sequence, origin)
    except Exception as exc:
        raise AgentError("RUNTIME", "the reference model failed in round %d: %s"
                         % (round_index, _one_line(exc)))


# The reference of this worker's last window, kept loaded for the next one: {"key": what
# it was loaded as, "model": the _Loaded}. A lone profile() is a window of its own, and
# loading, running once and warming up the reference for each cost about as much device
# time as the candidate's own load (a paired window spent 12% more than the loop).
KEPT_REFERENCE = {}
# What a session is loaded as: a reference kept under other values is loaded anew.
SESSION_SETTINGS = ("runtime", "backend", "require_backend", "intra_op_threads",
                    "inter_op_threads", "graph_optimization_level", "execution_mode",
                    "provider", "provider_options", "input_shapes", "cpu_affinity", "seed")
# runs of a kept reference before a window's probe (its caches are cold), at most the
# window's warmup_runs (none in rounds by default: WARMUP_RUNS)
REWARM_RUNS = 2


def _reference_for(ort, reference, settings):
    """The window's reference model: the last window's when this worker loaded the same
    file (checked against its sha256 again) with the same session settings, re-warmed;
    else loaded now, and kept for the next window."""
    path, sha256 = reference.get("model"), reference.get("sha256")
    key = json.dumps([path, sha256, [settings[name] for name in SESSION_SETTINGS],
                      settings["reference_sessions"]], sort_keys=True, default=str)
    kept = KEPT_REFERENCE.get("model") if KEPT_REFERENCE.get("key") == key else None
    KEPT_REFERENCE.clear()
    if kept is not None:
        check_model_file(path, sha256)
        kept.rewarm(settings)
    else:
        kept = _Loaded(ort, "reference", path, sha256, settings,
                       sessions=settings["reference_sessions"])
    if sha256 is not None:  # without a hash a file replaced at the path cannot be told
        KEPT_REFERENCE.update(key=key, model=kept)
    return kept


class _Session(object):
    """A model loaded in one session of its runtime and run once (its cold run, timed)."""

    def __init__(self, ort, path, settings):
        self.model, self.load_ms = open_model(ort, path, settings)
        self.model.make_inputs()
        with inference_errors():
            started = time.perf_counter()
            self.model.run()
            self.first_run_ms = (time.perf_counter() - started) * 1e3


class _Loaded(Timed):
    """One model of a rounds request, loaded in `sessions` sessions of its runtime (a
    candidate in model_sessions, the reference in reference_sessions), each run once and
    warmed up (by warmup_runs: none in rounds unless asked, see WARMUP_RUNS); its blocks are
    taken from each session in turn, so that its ratio reads the mean of their draws."""

    def __init__(self, ort, name, path, sha256, settings, sessions=1):
        check_model_file(path, sha256)
        self.sessions = [_Session(ort, path, settings) for _ in range(sessions)]
        self.model = self.sessions[0].model
        self.inputs = self.model.inputs
        self.load_ms = sum(session.load_ms for session in self.sessions)
        self.first_run_ms = self.sessions[0].first_run_ms
        self.turn = 0
        self.warmup_ms = self._ready(name, settings["warmup_runs"], settings)

    def _run(self):
        self.sessions[self.turn].model.run()

    def block(self, round_index, position, sequence, origin):
        """Timed.block on the session whose turn it is; the next block takes the next."""
        try:
            return Timed.block(self, round_index, position, sequence, origin)
        finally:
            self.turn = (self.turn + 1) % len(self.sessions)

    def _ready(self, name, runs, settings):
        """`runs` warm-up runs of each session, then the blocks of a new Timed (k probed
        anew on the first session: the device's speed may have changed since the last
        window; each other session runs as often, untimed): the warm-up runs' ms."""
        with inference_errors():
            started = time.perf_counter()
            for session in self.sessions:
                for _ in range(runs):
                    session.model.run()
            warmup_ms = (time.perf_counter() - started) * 1e3
            for session in self.sessions[1:]:  # the first session's probe runs, untimed:
                for _ in range(PROBE_RUNS):     # each has done the same before its block
                    session.model.run()
            self.turn = 0
            Timed.__init__(self, name, self._run, time.perf_counter, settings["block_ms"],
                           cpu_clock=run_cpu_clock(settings),
                           discard_runs=settings["discard_runs"])
        return warmup_ms

    def rewarm(self, settings):
        """Ready for another window: REWARM_RUNS runs of each session (their caches are
        cold), or the window's warm-up runs if fewer (none in rounds by default:
        WARMUP_RUNS), then new blocks."""
        self._ready(self.name, min(REWARM_RUNS, settings["warmup_runs"]), settings)


SPEED_CHANGE = 0.10  # reference blocks around a candidate block this far apart: it is dropped
LEVEL_QUANTILE = 0.10  # the reference's quiet level: this quantile of its block statistics
BLOCK_RUNS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 1000)
PROBE_RUNS = 3  # runs of a model before its first block that choose its k (Timed)


def runs_per_block(block_ms, run_ms):
    """k: the fewest runs of BLOCK_RUNS, a ladder (so that a few percent of noise in a run's
    time rarely changes k; the minimum of more runs is lower: k is part of what a ratio is),
    whose block of runs of run_ms lasts block_ms. (Two runs at least where a run is short
    re-measured better, but doubled what a decision's rounds cost: block_runs=2 asks for
    it; scripts/benchmark-log.md, "two runs a block at least, tried".)"""
    needed = block_ms / max(run_ms, 1e-3)
    return next((k for k in BLOCK_RUNS if k >= needed), BLOCK_RUNS[-1])


def run_cpu_clock(settings):
    """The clock that times a run's CPU time where every run of these settings computes on
    the calling thread: onnxruntime's CPU provider with one intra-op thread, sequential
    (then it starts no thread of its own). A run's time on that clock leaves out the time the
    thread waited for the CPU while other work ran on its core (time-slicing), which the
    wall clock counts. None where the runs may compute on other threads, or where this
    system has no per-thread CPU clock."""
    if not (settings["intra_op_threads"] == 1 and settings["inter_op_threads"] in (0, 1)
            and settings["execution_mode"] == "sequential"
            and settings["provider"] == "CPUExecutionProvider"
            and settings.get("runtime", "onnxruntime") == "onnxruntime"):
        return None
    try:
        time.thread_time()
    except (AttributeError, OSError):
        return None
    return time.thread_time


def cpu_time_plausible(cpu_ms, wall_ms):
    """Whether a run's CPU time can be what the thread's CPU clock read over a run that
    took wall_ms: above zero (a coarse clock reads 0 over a short run) and not above the wall
    time (the CPU clock is read inside the wall clock's interval; 1% and 10 us of slack)."""
    return 0.0 < cpu_ms <= wall_ms * 1.01 + 0.01


def block_times(block):
    """The runs of a block that its statistic reads: their CPU times where the block has
    them (a sixth item, see Timed), else their wall times."""
    return block[5] if len(block) > 5 and block[5] else block[3]


def quantile(values, q):
    """The q-quantile of values (linear between order statistics)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(math.floor(position))
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def block_statistic(runs, statistic="min"):
    """The statistic of one block's runs: its minimum (the run least disturbed) or median."""
    if statistic == "min":
        return min(runs)
    return _median_of(sorted(runs))


def block_ratios(blocks, reference_blocks, statistic="min", speed_change=SPEED_CHANGE):
    """Each candidate block's statistic over the reference's at that block's time: [(ratio,
    kept)]. The reference's statistic is read off the straight line through its two nearest
    blocks (by sequence), at the middle of the candidate block's timed runs (see
    block_middle_s), so that a device whose speed moves between the two references is
    divided out to first order; their plain mean (before agent 1.4) charged a block next to
    one reference half the change. Kept False where those two differ by more than
    `speed_change` (the device changed speed between them, no straight line). A block
    without a reference on both sides gives none."""
    references = sorted(reference_blocks, key=lambda block: block[2])
    values = [block_statistic(block_times(block), statistic) for block in references]
    middles = [block_middle_s(block) for block in references]
    sequences = [block[2] for block in references]
    ratios = []
    for block in blocks:
        after = bisect.bisect_right(sequences, block[2])
        if after == 0 or after == len(references):
            continue
        before_value, after_value = values[after - 1], values[after]
        span = middles[after] - middles[after - 1]
        weight = (block_middle_s(block) - middles[after - 1]) / span if span > 0 else 0.5
        weight = min(max(weight, 0.0), 1.0)
        at_block = before_value + weight * (after_value - before_value)
        if at_block <= 0:  # a reference block of no time (a garbled record): no ratio
            continue
        mean = (before_value + after_value) / 2
        ratios.append((block_statistic(block_times(block), statistic) / at_block,
                       abs(before_value - after_value) / mean <= speed_change))
    return ratios


def block_middle_s(block):
    """When a block's timed runs were half done (s since its window began): when they began,
    then half their wall time. (Agent 1.3 and before stamped a block before its discarded
    run: its middle reads one run late, on references and candidates alike.)"""
    return block[4] + sum(block[3]) / 2e3


def _precise(model, reference, settings):
    """The ci rule on rounds: the model's ratio to the reference known within rel_ci (the
    distribution-free interval of the median of its kept blocks' ratios)."""
    kept = sorted(ratio for ratio, keep in block_ratios(model.blocks, reference.blocks) if keep)
    interval = median_interval(kept, settings["confidence"]) if kept else None
    if interval is None:
        return False
    middle = _median_of(kept)
    return max(middle - interval[0], interval[1] - middle) <= settings["rel_ci"] * middle


def _window_state(before, after, seconds):
    """What competed for the CPU during a window: CPU pressure at its end (avg10, %) and the
    share of the window some task stalled for a CPU (from PSI's total), steal ticks during it,
    the load average at its end, the lowest frequency seen."""
    state = {}
    for key in ("pressure_avg10", "load1"):
        if key in after:
            state[key] = after[key]
    if "pressure_total_us" in before and "pressure_total_us" in after and seconds > 0:
        stalled_s = (after["pressure_total_us"] - before["pressure_total_us"]) / 1e6
        state["pressure_share"] = round(max(stalled_s, 0.0) / seconds, 4)
    if "steal_ticks" in before and "steal_ticks" in after:
        state["steal_ticks"] = max(after["steal_ticks"] - before["steal_ticks"], 0)
    lows = [s["freq_khz_min"] for s in (before, after) if "freq_khz_min" in s]
    if lows:
        state["freq_khz_min"] = min(lows)
    return state


def round_order(names, seed, round_index):
    """The candidates' order in one round: a fresh shuffle, reproducible from the seed."""
    order = list(names)
    random.Random(seed * 1000003 + round_index).shuffle(order)
    return order


def measure_rounds(models, reference, settings=None, lock=None, lock_wait_s=600.0):
    """Load every model of `models` ({name: {"model": path, "sha256": hex}}) and the
    `reference` ({"model": path, "sha256": hex}), then time them in interleaved rounds: each
    round runs every candidate's block once in a fresh seeded random order, with a block of
    the reference before the first candidate and again whenever ref_gap_ms of device time
    would otherwise pass, and at the round's end, while the reference takes at most
    ref_share of the window's device time (see interleave). Rounds run until `rounds` are done or
    max_time_ms is spent (a round is never cut short); a candidate the stop rule has answered
    (ci, limit) leaves them, and they end when none is left. A candidate that fails to load or
    run is that candidate's error; the others go on. With `lock`, holds the device's lock. Thread
    settings above this device's cores are a USER error, before the lock is taken."""
    checked = parse_settings(settings)
    check_threads(checked, device_cores(), "this device's cores")
    with DeviceLock(lock, lock_wait_s):
        return _measure_rounds(models, reference, checked)


def _measure_rounds(models, reference, settings):
    """measure_rounds under the device lock, with `settings` checked already."""
    if not isinstance(models, dict) or not models or not all(
            isinstance(entry, dict) for entry in models.values()):
        raise AgentError("USER", "models must map names to {model, sha256} objects")
    if not isinstance(reference, dict):
        raise AgentError("USER", "a rounds request needs a reference {model, sha256}")
    ort, controlled = _prepare(settings)
    thermal_before = thermal_zones()
    try:  # the reference's inputs are its own (input_shapes size the candidates' only)
        ref = _reference_for(ort, reference, dict(settings, input_shapes=None))
    except AgentError as exc:
        raise AgentError(exc.kind, "the reference model failed: %s" % exc.message)
    try:
        return _time_window(ort, controlled, thermal_before, models, ref, reference, settings)
    except BaseException:
        KEPT_REFERENCE.clear()  # a window that failed keeps nothing for the next
        raise


def _time_window(ort, controlled, thermal_before, models, ref, reference, settings):
    """One window of rounds over `models` beside the loaded reference `ref`."""
    loaded, errors = {}, {}
    for name in sorted(models):
        entry = models[name]
        try:
            loaded[name] = _Loaded(ort, name, entry.get("model"), entry.get("sha256"), settings,
                                   sessions=settings["model_sessions"])
        except AgentError as exc:
            if exc.kind == "TRANSFER":  # a missing or damaged copy: the host sends it again
                raise
            errors[name] = exc.to_json()["error"]
    state_before = cpu_state()
    completed, loop_s, failed, reason = interleave(loaded, ref, settings, time.perf_counter)
    state = _window_state(state_before, cpu_state(), loop_s)
    errors.update(failed)
    common = {"agent_version": AGENT_VERSION, "settings": settings, "controlled": controlled,
              "runtime": ref.model.info,
              "thermal_before": thermal_before, "thermal_after": thermal_zones(),
              "fingerprint": fingerprint(), "memory": None,  # the window's, not one model's
              "loop_ms": loop_s * 1e3}
    candidates_ms = sum(ms for model in loaded.values() for block in model.blocks
                        for ms in block[3])
    results = {}
    for name, model in loaded.items():
        if name in failed:
            continue
        result = dict(common)
        stop = rounds_stop(model, settings, completed, reason)
        result.update({
            "load_ms": model.load_ms, "first_run_ms": model.first_run_ms,
            "warmup_runs": settings["warmup_runs"], "warmup_ms": model.warmup_ms,
            "samples_ms": [ms for block in model.blocks for ms in block[3]],
            "inputs": model.inputs, "stop": stop,
            # the ci rule ran out of time before this model was known (one that left is not)
            "capped": settings["stop"] == "ci" and stop["reason"] == "max_time",
            "rounds": {"completed": completed, "k": model.k, "reference_k": ref.k,
                       "blocks": model.blocks, "reference_blocks": ref.blocks,
                       "seed": settings["seed"], "ref_gap_ms": settings["ref_gap_ms"],
                       "candidates": len(loaded), "candidates_ms": candidates_ms,
                       "reference_sha256": reference.get("sha256") or "",
                       "clock": "thread_cpu" if ref.cpu_clock is not None else "wall",
                       "state": state}})
        results[name] = result
    return {"results": results, "errors": errors, "rounds": completed,
            "agent_version": AGENT_VERSION}


def check_threads(settings, most, what):
    """USER error naming the range when a thread setting exceeds `most` (`what` says why)."""
    for key in ("intra_op_threads", "inter_op_threads"):
        if settings[key] > most:
            raise AgentError("USER", "setting %s must be from 0 (onnxruntime's choice) to %d "
                             "(%s), got %d" % (key, most, what, settings[key]))


def device_cores():
    return os.cpu_count() or 1


def max_threads():
    """How many threads a worker may run: onnxruntime's pools at the most the device's cores
    each, numpy's, and ours, with room to spare; more is a runaway."""
    return 4 * device_cores() + 64


class HostWatch(object):
    """A daemon thread that ends the worker (os._exit) within a second when its host is
    gone or it runs away, whatever the main thread is doing (a model in onnxruntime's native
    code included): stdin hung up or in error, the parent process changed (the host, or the
    shell of the SSH session, died), resident memory above MEMORY_CAP_SHARE of the device's
    RAM, more threads than max_threads(). The kernel then releases the device lock."""

    def __init__(self, stdin_fd, interval=WATCH_INTERVAL_S):
        self.stdin_fd = stdin_fd  # None: a one-shot measure, whose stdin is not the host's
        # set while a request is answered: an idle worker reads the end of stdin itself and
        # exits cleanly (code 0), and answers every request its host wrote before hanging up
        self.busy = False
        self.parent = os.getppid()
        self.interval = interval
        total = meminfo_kb("MemTotal")
        self.memory_cap_kb = int(total * MEMORY_CAP_SHARE) if total is not None else None
        self.thread_cap = max_threads()

    def start(self):
        thread = threading.Thread(target=self._run, name="harness-host-watch")
        thread.daemon = True
        thread.start()
        return thread

    def reason(self, poller):
        """Why the worker must end now, or None."""
        if os.getppid() != self.parent:
            return "its parent process %d is gone (the host stopped)" % self.parent
        if poller is not None:
            events = poller.poll(self.interval * 1000)
            if events and not self.busy:
                time.sleep(self.interval)  # a hang-up stays reported: do not spin on it
            for _, event in events:
                if self.busy and event & (select.POLLHUP | select.POLLERR | select.POLLNVAL
                                          | getattr(select, "POLLRDHUP", 0)):
                    return "its stdin hung up (the host or its connection is gone)"
        else:
            time.sleep(self.interval)
        status = _read("/proc/self/status") or ""
        for line in status.splitlines():
            key, _, value = line.partition(":")
            words = value.split()
            if key == "VmRSS" and self.memory_cap_kb and words and \
                    int(words[0]) > self.memory_cap_kb:
                return ("its resident memory %s kB passed the cap of %d kB (%d%% of the "
                        "device's RAM)" % (words[0], self.memory_cap_kb,
                                          MEMORY_CAP_SHARE * 100))
            if key == "Threads" and words and int(words[0]) > self.thread_cap:
                return "it runs %s threads, more than the cap of %d" % (words[0],
                                                                       self.thread_cap)
        return None

    def _run(self):
        poller = None
        if self.stdin_fd is not None and hasattr(select, "poll"):
            poller = select.poll()
            # no POLLIN: only hang-ups and errors wake it, never a request waiting to be read
            poller.register(self.stdin_fd, getattr(select, "POLLRDHUP", 0))
        while True:
            why = self.reason(poller)
            if why is not None:
                try:
                    sys.stderr.write("harness agent worker %d ends: %s\n" % (os.getpid(), why))
                    sys.stderr.flush()
                finally:
                    os._exit(3)


def _session(ort, model, options, settings):
    """An InferenceSession on the requested provider (with its options); LOAD names why not."""
    providers = [settings["provider"]]
    try:
        if settings["provider_options"]:
            return ort.InferenceSession(model, options, providers=providers,
                                        provider_options=[settings["provider_options"]])
        return ort.InferenceSession(model, options, providers=providers)
    except Exception as exc:
        raise AgentError("LOAD", "onnxruntime %s cannot load %s on %s: %s"
                         % (ort.__version__, model, settings["provider"], _one_line(exc)))


@contextlib.contextmanager
def inference_errors():
    """Within it, an exception from the runtime's inference is a RUNTIME error naming it (an
    AgentError passes as it is)."""
    try:
        yield
    except AgentError:
        raise
    except Exception as exc:
        raise AgentError("RUNTIME", "inference failed: %s" % _one_line(exc))


def _one_line(exc):
    text = " ".join(str(exc).split())
    return text[:2000] or type(exc).__name__


# ---------------------------------------------------------------- the model folder

MODEL_SUFFIXES = (".onnx", ".tflite", ".pte")


def model_folder(folder, limit_bytes=None, keep=()):
    """The models in `folder` (`*.onnx`, `*.tflite`, `*.pte`, by content hash), least recently
    used first removed while they add up to more than `limit_bytes` (None: nothing removed),
    never one in `keep`.
    A model's last use is its access time, which the agent sets whenever it measures one (its
    modification time stays the time it was put there).
    Returns {"bytes", "models", "removed", "removed_bytes"} after the removal."""
    models = []
    try:
        names = os.listdir(folder)
    except OSError:
        names = []
    for name in names:
        path = os.path.join(folder, name)
        try:
            stat = os.lstat(path)
        except OSError:
            continue
        if name.endswith(MODEL_SUFFIXES) and os.path.isfile(path) and not os.path.islink(path):
            models.append((max(stat.st_atime, stat.st_mtime), stat.st_size, path))
    models.sort()
    total = sum(size for _, size, _ in models)
    kept = set(os.path.abspath(path) for path in keep)
    removed = removed_bytes = 0
    for _, size, path in models:
        if limit_bytes is None or total <= limit_bytes:
            break
        if os.path.abspath(path) in kept:
            continue
        try:
            os.unlink(path)
        except OSError:
            continue
        total -= size
        removed += 1
        removed_bytes += size
    return {"bytes": total, "models": len(models) - removed, "removed": removed,
            "removed_bytes": removed_bytes}


def _bounded_models(request):
    """Before a measurement (or a window of rounds): mark its models used now, and keep
    their folder within the request's `models_limit_bytes` (the host's setting for the
    device; absent: unbounded), never removing one of them. Returns the folder's
    {"bytes", "models"} after that (None when the request names no model file here), which
    the answer carries so that the host can show the device's folder without asking."""
    entries = [request] if request.get("op") == "measure" else \
        [request.get("reference")] + list((request.get("models") or {}).values())
    models = [entry.get("model") for entry in entries if isinstance(entry, dict)]
    models = [model for model in models if isinstance(model, str) and os.path.isfile(model)]
    for model in models:
        try:  # the access time marks the use; the modification time stays its arrival
            os.utime(model, (time.time(), os.stat(model).st_mtime))
        except OSError:
            pass
    if not models:
        return None
    limit = request.get("models_limit_bytes")
    if not (isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0):
        limit = None
    usage = model_folder(os.path.dirname(models[0]) or ".", limit, keep=models)
    return {"bytes": usage["bytes"], "models": usage["models"]}


# ---------------------------------------------------------------- entry points

def handle(request):
    """Answer one worker request (a dict); failures come back as error objects."""
    folder = None
    try:
        if not isinstance(request, dict):
            raise AgentError("USER", "a request must be a JSON object")
        op = request.get("op")
        if op == "measure":
            folder = _bounded_models(request)
            result = measure(request.get("model"), request.get("sha256"), request.get("settings"),
                             request.get("lock"), float(request.get("lock_wait_s", 600.0)))
        elif op == "rounds":
            folder = _bounded_models(request)
            result = measure_rounds(request.get("models"), request.get("reference"),
                                    request.get("settings"), request.get("lock"),
                                    float(request.get("lock_wait_s", 600.0)))
        elif op == "fingerprint":
            result = fingerprint()
        elif op == "models":  # the model folder's size; past `limit_bytes`, pruned first
            limit = request.get("limit_bytes")
            if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool)
                                      or limit < 0):
                raise AgentError("USER", "limit_bytes must be a whole number of bytes, 0 or more")
            result = model_folder(str(request.get("folder") or "models"), limit)
        elif op == "ping":
            result = {"pong": True, "agent_version": AGENT_VERSION, "pid": os.getpid()}
        else:
            raise AgentError("USER", "unknown op %r; ops: measure, rounds, fingerprint, models, "
                             "ping, exit" % (op,))
    except AgentError as exc:
        result = exc.to_json()
    except Exception as exc:  # an agent bug must still answer in JSON
        result = AgentError("RUNTIME", "agent failure: %s: %s"
                            % (type(exc).__name__, _one_line(exc))).to_json()
    if folder is not None and "error" not in result:
        result["model_folder"] = folder
    if isinstance(request, dict) and "id" in request:
        result["id"] = request["id"]
    return result


# ---------------------------------------------------------------- the address layout

ADDR_NO_RANDOMIZE = 0x0040000  # Linux's personality flag (linux/personality.h)
LAYOUT_ENV = "HARNESS_AGENT_LAYOUT"  # "randomized": keep address space randomization
_LAYOUT_TRIED_ENV = "HARNESS_AGENT_LAYOUT_TRIED"  # set before the one re-exec: never twice


def _personality(persona=0xffffffff):
    """Linux's personality(2) by ctypes: the current persona (0xffffffff only asks), or
    None where it cannot be called (another system, no ctypes, refused by a seccomp
    filter)."""
    try:
        import ctypes
        value = ctypes.CDLL(None, use_errno=True).personality(ctypes.c_ulong(persona))
    except (ImportError, OSError, AttributeError, TypeError):
        return None
    return None if value == -1 else value


def address_layout():
    """"fixed" where this process runs without address space layout randomization (its
    personality, or the system's randomize_va_space at 0), else "randomized": recorded with
    every measurement (`controlled`) and in the worker's greeting. Read once: a process's
    layout is set when it starts."""
    if "layout" not in _LAYOUT:
        persona = _personality()
        fixed = (persona is not None and persona & ADDR_NO_RANDOMIZE) or \
            _read("/proc/sys/kernel/randomize_va_space") == "0"
        _LAYOUT["layout"] = "fixed" if fixed else "randomized"
    return _LAYOUT["layout"]


_LAYOUT = {}  # address_layout's answer, once read


def _python_flags():
    """The flags this Python was started with (-u always: the host starts the agent
    unbuffered), to start it again the same way: a host may run it isolated, without site
    packages (a bare board's test), optimized, with warnings or -X options."""
    flags = ["-u"] + [flag for flag, on in (("-I", sys.flags.isolated),
                                            ("-E", sys.flags.ignore_environment),
                                            ("-s", sys.flags.no_user_site),
                                            ("-S", sys.flags.no_site),
                                            ("-B", sys.flags.dont_write_bytecode),
                                            ("-P", getattr(sys.flags, "safe_path", False)))
                      if on]
    flags += ["-O"] * sys.flags.optimize + ["-b"] * sys.flags.bytes_warning
    flags += ["-W%s" % option for option in sys.warnoptions]
    xoptions = getattr(sys, "_xoptions", {})
    flags += ["-X%s" % (name if value is True else "%s=%s" % (name, value))
              for name, value in xoptions.items()]
    return flags


def fix_address_layout(script, args):
    """Runs this agent (`script` with `args`) again, once, under the same pid, stdin and
    stdout, without address space layout randomization where Linux allows it, unless
    HARNESS_AGENT_LAYOUT=randomized is in its environment. Why: each process draws where
    its libraries, heap and buffers lie, and that draw moved each candidate's ratio on its
    own between workers (scripts/benchmark-log.md, "the address layout"). A trial start of
    this Python with the flag comes first, so that a system that accepts the flag but cannot
    run under it (an emulator, a filter that kills) leaves the agent as it was started.
    Where the layout stays randomized, stderr says why and the measurements say
    "randomized"."""
    if os.environ.pop(_LAYOUT_TRIED_ENV, None) or os.environ.get(LAYOUT_ENV) == "randomized":
        return  # run again already (the marker goes: nothing this agent starts inherits it)
    persona = _personality()
    if persona is None or persona & ADDR_NO_RANDOMIZE or not sys.executable:
        return
    if _personality(persona | ADDR_NO_RANDOMIZE) is None:
        sys.stderr.write("agent: the address layout stays randomized: the system refused "
                         "ADDR_NO_RANDOMIZE\n")
        return
    command = [sys.executable] + _python_flags()
    import subprocess
    try:
        trial = subprocess.run(command + ["-c", "pass"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               timeout=60).returncode
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        trial = exc
    if trial == 0:
        os.environ[_LAYOUT_TRIED_ENV] = "1"
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execv(sys.executable, command + [script] + list(args))
        except (OSError, TypeError, ValueError) as exc:
            trial = exc
        os.environ.pop(_LAYOUT_TRIED_ENV, None)
    _personality(persona)  # on as it was started
    sys.stderr.write("agent: the address layout stays randomized: this Python did not start "
                     "under ADDR_NO_RANDOMIZE (%s)\n" % (trial,))


def _private_stdout():
    """Keep the real stdout for our JSON and send fd 1 to stderr, so stray prints from native
    libraries cannot corrupt the protocol."""
    sys.stdout.flush()
    channel = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return channel


def _emit(channel, obj):
    channel.write(json.dumps(obj, separators=(",", ":")) + "\n")
    channel.flush()


def serve(stdin, channel, watch=None):
    """Persistent worker: one JSON request per line in, one JSON answer per line out.
    `watch` (a HostWatch) is told while a request is being answered."""
    _emit(channel, {"ready": True, "agent_version": AGENT_VERSION, "pid": os.getpid(),
                    "address_layout": address_layout(),
                    "python": platform.python_version()})
    for line in stdin:
        line = line.strip()
        if not line:
            continue
        try:
            request = json.loads(line)
        except ValueError as exc:
            _emit(channel, AgentError("USER", "request is not JSON: %s" % exc).to_json())
            continue
        if isinstance(request, dict) and request.get("op") == "exit":
            _emit(channel, {"bye": True, "id": request.get("id")})
            return
        if watch is not None:
            watch.busy = True
        try:
            _emit(channel, handle(request))
        finally:
            if watch is not None:
                watch.busy = False


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ort_agent.py",  # no docstrings under python -OO
                                     description=(__doc__ or "harness agent").split("\n")[0])
    commands = parser.add_subparsers(dest="command")
    one = commands.add_parser("measure", help="one measurement, one JSON object")
    one.add_argument("--model", required=True)
    one.add_argument("--sha256")
    one.add_argument("--settings", default="{}", help="JSON object of settings")
    one.add_argument("--lock", help="file on the device to hold an exclusive lock on")
    one.add_argument("--models-limit-bytes", type=int,
                     help="keep the model's folder within this, least recently used out")
    models = commands.add_parser("models", help="the model folder's size, pruned to a limit")
    models.add_argument("--folder", default="models")
    models.add_argument("--limit-bytes", type=int)
    commands.add_parser("fingerprint", help="print this device's fingerprint")
    commands.add_parser("worker", help="serve JSON requests line by line on stdin/stdout")
    commands.add_parser("version", help="print the agent version")
    args = parser.parse_args(argv)
    channel = _private_stdout()
    if args.command == "worker":
        watch = HostWatch(sys.stdin.fileno())
        watch.start()
        serve(sys.stdin, channel, watch)
        return 0
    if args.command == "fingerprint":
        _emit(channel, handle({"op": "fingerprint"}))
        return 0
    if args.command == "models":
        result = handle({"op": "models", "folder": args.folder, "limit_bytes": args.limit_bytes})
        _emit(channel, result)
        return 1 if "error" in result else 0
    if args.command == "version":
        _emit(channel, {"agent_version": AGENT_VERSION, "python": platform.python_version()})
        return 0
    if args.command == "measure":
        try:
            settings = json.loads(args.settings)
        except ValueError as exc:
            _emit(channel, AgentError("USER", "--settings is not JSON: %s" % exc).to_json())
            return 2
        HostWatch(None).start()  # its host gone, a one-shot measurement ends too
        result = handle({"op": "measure", "model": args.model, "sha256": args.sha256,
                         "settings": settings, "lock": args.lock,
                         "models_limit_bytes": args.models_limit_bytes})
        _emit(channel, result)
        return 1 if "error" in result else 0
    _emit(channel, AgentError("USER", "no command given; use measure, fingerprint or worker")
          .to_json())
    return 2


if __name__ == "__main__":
    # the commands that time models, where Python ran this file as its program: no frame
    # called this module's (not run by another program, as runpy runs it: that program
    # would not run again)
    if sys.argv[1:2] in (["worker"], ["measure"]) and hasattr(sys, "_getframe") and \
            sys._getframe().f_back is None:
        fix_address_layout(os.path.abspath(sys.argv[0]), sys.argv[1:])
    sys.exit(main())
