"""Device names to transports, and the registry file `$HARNESS_HOME/devices.toml`.

`local` (this machine) is built in. Registered devices look like

    [devices.rpi4]
    transport = "ssh"
    address = "pi@10.0.0.7"          # user@host[:port]
    key = "~/.ssh/id_ed25519"        # optional: else the SSH agent's or the default keys
    jump = "me@bastion.lab"          # optional jump host
    python = "python3"               # the board's Python 3.8+ with numpy and onnxruntime
    workdir = ".cache/harness"       # per-user working folder (relative to $HOME)
    kind = "rpi4"                    # optional: devices of one kind form a pool
    lock = "/tmp/harness-device.lock"  # device-wide lock file, shared by all users (default)

    [devices.pixel7]
    transport = "adb"
    address = "2A1B0C3D"             # serial (or host:port for Wi-Fi ADB)
    agent = "python"                 # "python" (e.g. Termux), "perf-test", "benchmark-model"
                                     # (LiteRT) or "executor-runner" (ExecuTorch)
    perf_test = "~/android/onnxruntime_perf_test"   # host path of an Android build (perf-test)
    max_temp_c = 45.0                # wait until the hottest CPU zone is below this

    [devices.sim-000]
    transport = "sim"                # a simulated device (devices.simulated): no model runs
    address = "npu-sim"              # the simulated model's name
    sim_ms = 20.0                    # median latency of a typical graph (graph costs: their
    sim_seed = 0                     # scale: a run's fixed cost and an operator's are 5%)
    sim_costs = "draw"               # or "graph": its operators' costs added up
    kind = "sim"
"""
import difflib
import errno
import fcntl
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import paramiko
import tomli_w

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from PyPI
    import tomli as tomllib  # type: ignore[no-redef]

from devices.adb import AdbTransport
from devices.agent_client import AgentClient
from devices.errors import BadRequest
from devices.folder_usage import usage_path
from devices.local import LocalTransport
from devices.noise_trace import NoiseTrace
from devices.native_bench_client import TOOLS as NATIVE_TOOLS
from devices.native_bench_client import NativeBenchClient
from devices.perf_tool_client import PerfTestClient
from devices.safe_files import NotARegularFile, replace_text
from devices.simulated import COSTS as SIM_COSTS
from devices.simulated import SimulatedClient, SimulatedModel
from devices.ssh import (Endpoint, HostKeyChanged, SSHConnection, SSHTransport, fetch_host_key,
                         host_entry, key_fingerprint)
from devices.transport import Transport

BUILTIN_DEVICES = ("local",)
TRANSPORTS = ("ssh", "adb", "sim")
AGENTS = ("python", "perf-test", "benchmark-model", "executor-runner")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass
class DeviceConfig:
    """One registered device, as stored in devices.toml."""

    name: str
    transport: str
    address: str
    key: Optional[str] = None
    jump: Optional[str] = None
    python: str = "python3"
    workdir: Optional[str] = None   # default: .cache/harness (ssh), /data/local/tmp/harness (adb)
    kind: Optional[str] = None
    connect_timeout: float = 10.0
    adb_port: int = 5037
    agent: str = "python"
    perf_test: Optional[str] = None
    max_temp_c: Optional[float] = None
    cool_timeout_s: float = 120.0
    pin_big_cores: bool = True
    lock: Optional[str] = None      # device-wide lock file (default per transport)
    sim_ms: Optional[float] = None  # simulated devices: median latency of a typical graph
    sim_seed: Optional[int] = None  # simulated devices: the seed of their latencies
    sim_costs: Optional[str] = None  # simulated devices: "draw" (default) or "graph"
    noise_trace: Optional[str] = None  # simulated devices: a recorded noise trace replayed
    models_limit_mb: Optional[float] = None  # the model folder's bound (default per transport)

    def to_toml(self) -> Dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "name"}


class RegistryError(BadRequest):
    """devices.toml (or the folder it lives in) cannot be used as it is; the message names the
    file and the field."""


def _text(value: object) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value)


# What each field of a [devices.NAME] table must hold: a test, and how a person says it.
FIELD_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "transport": (lambda v: v in TRANSPORTS, "one of " + ", ".join(map(json.dumps, TRANSPORTS))),
    "address": (_text, 'a text like "pi@10.0.0.7" (ssh) or a serial (adb)'),
    **{key: (_text, "a text") for key in ("key", "jump", "python", "workdir", "kind",
                                         "perf_test", "lock")},
    "connect_timeout": (lambda v: _number(v) and v > 0, "a positive number of seconds"),
    "cool_timeout_s": (lambda v: _number(v) and v >= 0, "a number of seconds (0 or more)"),
    "adb_port": (lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536,
                 "a port number from 1 to 65535"),
    "agent": (lambda v: v in AGENTS, "one of " + ", ".join(map(json.dumps, AGENTS))),
    "max_temp_c": (_number, "a number of degrees Celsius"),
    "pin_big_cores": (lambda v: isinstance(v, bool), "true or false"),
    "sim_ms": (lambda v: _number(v) and v > 0, "a positive number of ms"),
    "sim_seed": (lambda v: isinstance(v, int) and not isinstance(v, bool), "a whole number"),
    "sim_costs": (lambda v: v in SIM_COSTS, "one of " + ", ".join(map(json.dumps, SIM_COSTS))),
    "noise_trace": (_text, "the path of a noise trace (harness devices record-noise)"),
    "models_limit_mb": (lambda v: _number(v) and v >= 0, "a number of MB (0 or more)"),
}
assert set(FIELD_CHECKS) == {f for f in DeviceConfig.__dataclass_fields__ if f != "name"}

# The model folder's bound per transport when a device sets none: this machine's disk is
# roomy, a board's SD card less so, a phone's /data is shared with everything on it.
# $HARNESS_MODELS_LIMIT_MB overrides the default (the way to set `local`'s).
MODELS_LIMIT_MB = {"local": 2048.0, "ssh": 1024.0, "adb": 512.0}
MODELS_LIMIT_ENV = "HARNESS_MODELS_LIMIT_MB"


def models_limit_bytes(name: str, home: Path) -> int:
    """How large the device's model folder may grow: its `models_limit_mb`, else
    $HARNESS_MODELS_LIMIT_MB, else the default of its transport (MODELS_LIMIT_MB)."""
    config = None if name == "local" else get_device(home, name)
    limit = config.models_limit_mb if config is not None else None
    if limit is None and os.environ.get(MODELS_LIMIT_ENV):
        text = os.environ[MODELS_LIMIT_ENV]
        try:
            limit = float(text)
        except ValueError:
            limit = -1.0
        if not (math.isfinite(limit) and limit >= 0):
            raise BadRequest(f"${MODELS_LIMIT_ENV}={text!r} is not a number of MB",
                             fix=f"export {MODELS_LIMIT_ENV}=2048, for example, or unset it")
    if limit is None:
        limit = MODELS_LIMIT_MB.get("local" if config is None else config.transport, 1024.0)
    return int(limit * 1_000_000)


def _shown(value: object) -> str:
    """A value as it is written in TOML (near enough for a message)."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _checked_entry(path: Path, name: object, entry: object) -> Dict[str, Any]:
    """One [devices.NAME] table, its fields checked; RegistryError names the file and field."""
    bare = isinstance(name, str) and re.match(r"^[A-Za-z0-9_-]+$", name)
    table = f"[devices.{name if bare else _shown(name)}]"
    fix = (f"correct the {table} table in {path} by hand (or delete the table and add the "
           f"device again with 'harness devices add')")
    if not isinstance(name, str) or not NAME_PATTERN.match(name) or name in BUILTIN_DEVICES:
        raise RegistryError(f"{path}: {table} is not a device name harness accepts",
                            fix="rename the table: letters, digits, '.', '_' or '-', not 'local'")
    if not isinstance(entry, dict):
        raise RegistryError(f"{path}: devices.{name} = {_shown(entry)} is not a table",
                            fix=fix)
    for key in ("transport", "address"):
        if key not in entry:
            raise RegistryError(f"{path}: device {name!r} needs 'transport' and 'address' "
                                f"({table} has no {key})", fix=fix)
    problem = field_problem(entry)
    if problem is not None:
        raise RegistryError(f"{path}: {table} {problem}", fix=fix)
    return entry


def field_problem(entry: Dict[str, Any]) -> Optional[str]:
    """What is wrong with one device's fields ("key = value is not ..."), or None: the one
    check of a device's settings, for devices.toml as it is read and for 'devices add' (so
    nothing is ever written that the reader would refuse)."""
    for key, value in entry.items():
        if key not in FIELD_CHECKS:
            near = difflib.get_close_matches(key, FIELD_CHECKS, n=1)
            return (f"has an unknown field {key!r}" + (f" (did you mean {near[0]!r}?)" if near
                                                       else "")
                    + f"; known fields: {', '.join(sorted(FIELD_CHECKS))}")
        if not FIELD_CHECKS[key][0](value):
            return f"{key} = {_shown(value)} is not {FIELD_CHECKS[key][1]}"
    if entry.get("transport") == "ssh":
        for key in ("address", "jump"):
            if key in entry:
                try:
                    Endpoint.parse(str(entry[key]))
                except BadRequest as exc:
                    return f"{key}: {exc.message}"
    return None


@contextmanager
def _writing(home: Path, what: Path) -> Iterator[None]:
    """Turn the OS's refusal to write under the home folder into a RegistryError."""
    try:
        yield
    except NotARegularFile as exc:
        raise RegistryError(f"cannot write {what}: {exc.strerror}",
                            fix=f"move {what} aside (harness keeps a regular file there), or "
                                f"point $HARNESS_HOME at another folder") from None
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            fix = (f"free some space on the disk holding {home} ({what} was left as it "
                   f"was), then retry")
        elif exc.errno in (errno.ENOTDIR, errno.EEXIST):
            fix = (f"{home} (or a folder above it) is a file: point $HARNESS_HOME at a folder "
                   f"(it is created if missing), or move the file aside")
        elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = (f"make {home} writable for this user, or point $HARNESS_HOME at a "
                   f"writable folder")
        else:
            fix = f"check {home}: free space, permissions, and that it is a folder"
        raise RegistryError(f"cannot write {what}: {reason}", fix=fix) from None


def registry_path(home: Path) -> Path:
    return Path(home) / "devices.toml"


def known_hosts_path(home: Path) -> Path:
    return Path(home) / "known_hosts"


def check_name(name: str) -> None:
    if not NAME_PATTERN.match(name) or name in BUILTIN_DEVICES:
        raise BadRequest(f"{name!r} cannot name a device",
                         fix="use letters, digits, '.', '_' or '-' (not 'local'), e.g. rpi4-1")


def load_devices(home: Path) -> Dict[str, DeviceConfig]:
    """Every registered device; a malformed file is an error naming the file and the fix."""
    path = registry_path(home)
    if not path.exists():
        return {}
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise RegistryError(f"cannot read {path}: {exc.strerror or exc}",
                            fix=f"make {path} readable for this user, or point $HARNESS_HOME "
                                f"at another folder") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise RegistryError(f"{path} is not valid TOML: {exc}",
                         fix=f"correct {path} by hand, or move it aside and add the devices "
                             f"again") from None
    devices = {}
    tables = data.get("devices", {})
    if not isinstance(tables, dict):
        raise RegistryError(f"{path}: devices = {_shown(tables)} is not a table of devices",
                            fix=f"write each device as a [devices.NAME] table in {path}, or "
                                f"move the file aside and add the devices again")
    for name, entry in tables.items():
        devices[name] = DeviceConfig(name=name, **_checked_entry(path, name, entry))
    return devices


@contextmanager
def _registry_locked(home: Path, what: Path) -> Iterator[None]:
    """Hold an exclusive lock on the home's registry files (devices.toml, known_hosts) for
    a read-modify-write of `what`, so that two processes adding devices at once keep both."""
    path = Path(home) / ".registry.lock"
    with _writing(Path(home), what):
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def save_devices(home: Path, devices: Dict[str, DeviceConfig]) -> None:
    """Write devices.toml whole (devices.safe_files): a reader never sees half a file."""
    path = registry_path(home)
    text = tomli_w.dumps({"devices": {n: d.to_toml() for n, d in sorted(devices.items())}})
    with _writing(Path(home), path):
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, text)


def add_device(home: Path, config: DeviceConfig, replace: bool = False) -> None:
    """Register a device; its fields pass the check devices.toml is read with (BadRequest
    names the field and what it must hold), and two processes adding at once keep both."""
    check_name(config.name)
    problem = field_problem(config.to_toml())
    if problem is not None:
        option = problem.split(" ", 1)[0].rstrip(":").replace("_", "-")
        raise BadRequest(f"device {config.name!r}: {problem}",
                         fix=f"correct --{option} (or the field of that name) and add it again")
    if config.agent in NATIVE_TOOLS:
        if not config.perf_test or not Path(config.perf_test).expanduser().is_file():
            raise BadRequest(f"agent {config.agent!r} needs --perf-test PATH: the host path "
                             f"of the tool's build for the device ({config.perf_test} is not "
                             f"a file)", fix="build LiteRT's benchmark_model or ExecuTorch's "
                                             "executor_runner for the device and give its path")
    if config.agent == "perf-test":
        if config.transport != "adb" or not config.perf_test:
            raise BadRequest("agent 'perf-test' needs an adb device and --perf-test PATH",
                             fix="pass the host path of your Android onnxruntime_perf_test build")
        if not Path(config.perf_test).expanduser().is_file():
            raise BadRequest(f"no onnxruntime_perf_test at {config.perf_test}",
                             fix="build it for Android (onnxruntime's build.sh --android) and "
                                 "give its path")
    with _registry_locked(home, registry_path(home)):
        devices = load_devices(home)
        if config.name in devices and not replace:
            raise BadRequest(f"a device named {config.name!r} is already registered",
                             fix=f"remove it first ('harness devices remove {config.name}') "
                                 f"or pick another name")
        devices[config.name] = config
        save_devices(home, devices)


def remove_device(home: Path, name: str) -> DeviceConfig:
    with _registry_locked(home, registry_path(home)):
        devices = load_devices(home)
        if name not in devices:
            raise BadRequest(f"no device named {name!r} is registered",
                             fix="see 'harness devices list'")
        config = devices.pop(name)
        save_devices(home, devices)
    try:  # what its folder held is no longer anyone's to show
        usage_path(home, name).unlink()
    except OSError:
        pass
    return config


def devices_of_kind(home: Path, kind: str) -> List[str]:
    """Names of the registered devices of one kind."""
    names = sorted(n for n, d in load_devices(home).items() if d.kind == kind)
    if not names:
        raise BadRequest(f"no registered device is of kind {kind!r}",
                         fix=f"register some with 'harness devices add NAME ... --kind {kind}'")
    return names


def get_device(home: Path, name: str) -> DeviceConfig:
    devices = load_devices(home)
    if name not in devices:
        known = ", ".join([*BUILTIN_DEVICES, *sorted(devices)])
        raise BadRequest(f"no device named {name!r}; known devices: {known}",
                         fix=f"register it with 'harness devices add {name} --ssh USER@HOST', "
                             f"or use one of the known devices")
    return devices[name]


def open_transport(name: str, home: Path) -> Transport:
    """The transport for a device name; `home` is $HARNESS_HOME."""
    if name == "local":
        return LocalTransport(Path(home) / "devices" / "local", name="local")
    config = get_device(home, name)
    if config.transport == "adb":
        return AdbTransport(name, config.address, server_port=config.adb_port,
                            python=config.python,
                            workdir=config.workdir or "/data/local/tmp/harness",
                            pin_big_cores=config.pin_big_cores, max_temp_c=config.max_temp_c,
                            cool_timeout_s=config.cool_timeout_s,
                            lock_path=config.lock or "/data/local/tmp/harness-device.lock")
    if config.transport == "sim":
        raise BadRequest(f"{name} is a simulated device: nothing can be run or copied there",
                         fix="profile it (its pool simulates the agent), or use a real device")
    if config.transport != "ssh":
        raise RegistryError(f"{registry_path(home)}: [devices.{name}] transport = "
                            f"{_shown(config.transport)} is not one of {', '.join(TRANSPORTS)}",
                            fix=f"correct the transport of {name} in {registry_path(home)}")
    return SSHTransport(name, Endpoint.parse(config.address),
                        known_hosts=known_hosts_files(home), key_file=config.key,
                        jump=Endpoint.parse(config.jump) if config.jump else None,
                        python=config.python, workdir=config.workdir or ".cache/harness",
                        connect_timeout=config.connect_timeout,
                        lock_path=config.lock or "/tmp/harness-device.lock")


def times_one_model_at_a_time(name: str, home: Path) -> bool:
    """Whether device `name` is timed by a native tool (onnxruntime_perf_test, LiteRT's
    benchmark_model, ExecuTorch's executor_runner: one model at a time) rather than by our
    agent; an unknown name is not (opening it says what is wrong)."""
    if name == "local":
        return False
    config = load_devices(home).get(name)
    return config is not None and config.transport != "sim" and \
        (config.agent == "perf-test" or config.agent in NATIVE_TOOLS)


def open_client(name: str, home: Path, isolation: str = "worker"):
    """What measures on the device: our agent, onnxruntime_perf_test (agent = "perf-test"),
    or nothing real (transport = "sim")."""
    config = None if name == "local" else get_device(home, name)
    if config is not None and config.transport == "sim":
        noise = None if config.noise_trace is None else NoiseTrace.load(
            Path(home) / Path(config.noise_trace).expanduser())  # relative: to the home
        return SimulatedClient(name, SimulatedModel(config.address, config.sim_ms or 20.0,
                                                    seed=config.sim_seed or 0, noise=noise,
                                                    costs=config.sim_costs or "draw"),
                               Path(home))
    transport = open_transport(name, home)
    if config is not None and config.agent == "perf-test":
        return PerfTestClient(transport, str(Path(config.perf_test or "").expanduser()))
    if config is not None and config.agent in NATIVE_TOOLS:
        return NativeBenchClient(transport, str(Path(config.perf_test or "").expanduser()),
                                 config.agent)
    # the local folder is read directly (harness.pool.model_folders): nothing to remember
    return AgentClient(transport, isolation, models_limit_bytes=models_limit_bytes(name, home),
                       folder_file=None if name == "local" else usage_path(home, name))


def known_hosts_files(home: Path) -> List[Path]:
    """Where host keys are looked up: harness's own file, then the user's."""
    return [known_hosts_path(home), Path("~/.ssh/known_hosts").expanduser()]


@dataclass
class TrustResult:
    entry: str
    key_type: str
    fingerprint: str
    status: str  # "added", "already trusted", "replaced", "declined"


def trust_device(home: Path, name: str, confirm: Callable[[str, str, str], bool],
                 replace: bool = False) -> List[TrustResult]:
    """Show and record the host keys of a device (and of its jump host) in
    $HARNESS_HOME/known_hosts. `confirm(entry, type, fingerprint)` decides; a key that differs
    from a recorded one is refused unless `replace`."""
    config = get_device(home, name)
    target = Endpoint.parse(config.address)
    jump = Endpoint.parse(config.jump) if config.jump else None
    results = []
    if jump is not None:
        results.append(_trust(home, name, jump, fetch_host_key(jump.host, jump.port,
                                                               config.connect_timeout),
                              confirm, replace))
        if results[-1].status == "declined":
            return results
        hop = SSHConnection(name, jump, known_hosts_files(home), key_file=config.key,
                            connect_timeout=config.connect_timeout)
        try:
            channel = hop.client.get_transport().open_channel(
                "direct-tcpip", (target.host, target.port), ("127.0.0.1", 0))
            key = fetch_host_key(target.host, target.port, config.connect_timeout, sock=channel)
        finally:
            hop.close()
    else:
        key = fetch_host_key(target.host, target.port, config.connect_timeout)
    results.append(_trust(home, name, target, key, confirm, replace))
    return results


def _trust(home: Path, name: str, endpoint: Endpoint, key: paramiko.PKey,
           confirm: Callable[[str, str, str], bool], replace: bool) -> TrustResult:
    with _registry_locked(home, known_hosts_path(home)):
        return _trust_locked(home, name, endpoint, key, confirm, replace)


def _trust_locked(home: Path, name: str, endpoint: Endpoint, key: paramiko.PKey,
                  confirm: Callable[[str, str, str], bool], replace: bool) -> TrustResult:
    path = known_hosts_path(home)
    entry = host_entry(endpoint.host, endpoint.port)
    keys = paramiko.HostKeys(str(path)) if path.exists() else paramiko.HostKeys()
    known = keys.lookup(entry) or {}
    fingerprint = key_fingerprint(key)
    result = TrustResult(entry, key.get_name(), fingerprint, "added")
    recorded = known.get(key.get_name())
    if recorded is not None and recorded == key:
        result.status = "already trusted"
        return result
    if known and not replace:
        old = ", ".join(f"{t} {key_fingerprint(k)}" for t, k in known.items())
        raise HostKeyChanged(f"REFUSED: {entry} now offers {key.get_name()} {fingerprint}, but "
                             f"{path} records {old}. The key changed: someone may be "
                             f"intercepting the connection, or the board was reinstalled",
                             device=name,
                             fix=f"only if you know the board was reinstalled, run 'harness "
                                 f"devices trust {name} --replace'")
    if not confirm(entry, key.get_name(), fingerprint):
        result.status = "declined"
        return result
    if known:
        del keys[entry]
        result.status = "replaced"
    keys.add(entry, key.get_name(), key)
    # paramiko's HostKeys.save rewrites the file in place (kill -9 or a full disk mid-way
    # loses every recorded key): write the same lines to a new file and rename it over.
    text = "".join(line for line in (e.to_line() for e in keys._entries) if line)
    with _writing(Path(home), path):
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_text(path, text, mode=0o600)
    return result
