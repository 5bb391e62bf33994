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
    agent = "python"                 # "python" (e.g. Termux) or "perf-test"
    perf_test = "~/android/onnxruntime_perf_test"   # host path of an Android build (perf-test)
    max_temp_c = 45.0                # wait until the hottest CPU zone is below this

    [devices.sim-000]
    transport = "sim"                # a simulated device (devices.simulated): no model runs
    address = "npu-sim"              # the simulated model's name
    sim_ms = 20.0                    # median latency of a typical graph
    sim_seed = 0
    kind = "sim"
"""
import errno
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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
from devices.local import LocalTransport
from devices.perf_tool_client import PerfTestClient
from devices.noise_trace import NoiseTrace
from devices.simulated import SimulatedClient, SimulatedModel
from devices.ssh import (Endpoint, HostKeyChanged, SSHConnection, SSHTransport, fetch_host_key,
                         host_entry, key_fingerprint)
from devices.transport import Transport

BUILTIN_DEVICES = ("local",)
TRANSPORTS = ("ssh", "adb", "sim")
AGENTS = ("python", "perf-test")
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
    noise_trace: Optional[str] = None  # simulated devices: a recorded noise trace replayed
    models_limit_mb: Optional[float] = None  # the model folder's bound (default per transport)
    extra: Dict[str, object] = field(default_factory=dict)

    def to_toml(self) -> Dict[str, object]:
        data = {k: v for k, v in asdict(self).items() if v is not None and k not in ("name", "extra")}
        data.update(self.extra)
        return data


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
    "noise_trace": (_text, "the path of a noise trace (harness devices record-noise)"),
    "models_limit_mb": (lambda v: _number(v) and v >= 0, "a number of MB (0 or more)"),
}

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
    for key, value in entry.items():
        if key in FIELD_CHECKS and not FIELD_CHECKS[key][0](value):
            raise RegistryError(f"{path}: {table} {key} = {_shown(value)} is not "
                                f"{FIELD_CHECKS[key][1]}", fix=fix)
    if entry["transport"] == "ssh":
        for key in ("address", "jump"):
            if key in entry:
                try:
                    Endpoint.parse(str(entry[key]))
                except BadRequest as exc:
                    raise RegistryError(f"{path}: {table} {key}: {exc.message}", fix=fix) \
                        from None
    return entry


@contextmanager
def _writing(home: Path, what: Path) -> Iterator[None]:
    """Turn the OS's refusal to write under the home folder into a RegistryError."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOTDIR, errno.EEXIST):
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
    known = {f for f in DeviceConfig.__dataclass_fields__ if f not in ("name", "extra")}
    tables = data.get("devices", {})
    if not isinstance(tables, dict):
        raise RegistryError(f"{path}: devices = {_shown(tables)} is not a table of devices",
                            fix=f"write each device as a [devices.NAME] table in {path}, or "
                                f"move the file aside and add the devices again")
    for name, entry in tables.items():
        entry = _checked_entry(path, name, entry)
        fields = {k: v for k, v in entry.items() if k in known}
        extra = {k: v for k, v in entry.items() if k not in known}
        devices[name] = DeviceConfig(name=name, extra=extra, **fields)
    return devices


def save_devices(home: Path, devices: Dict[str, DeviceConfig]) -> None:
    path = registry_path(home)
    partial = path.with_name(path.name + f".{os.getpid()}.part")
    text = tomli_w.dumps({"devices": {n: d.to_toml() for n, d in sorted(devices.items())}})
    with _writing(Path(home), path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            partial.write_text(text)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise


def add_device(home: Path, config: DeviceConfig, replace: bool = False) -> None:
    check_name(config.name)
    if config.transport not in TRANSPORTS:
        raise BadRequest(f"unknown transport {config.transport!r}",
                         fix=f"use one of: {', '.join(TRANSPORTS)}")
    if config.transport == "ssh":
        Endpoint.parse(config.address)
        if config.jump:
            Endpoint.parse(config.jump)
    if config.agent not in AGENTS:
        raise BadRequest(f"unknown agent {config.agent!r}", fix=f"use one of: {', '.join(AGENTS)}")
    if config.agent == "perf-test":
        if config.transport != "adb" or not config.perf_test:
            raise BadRequest("agent 'perf-test' needs an adb device and --perf-test PATH",
                             fix="pass the host path of your Android onnxruntime_perf_test build")
        if not Path(config.perf_test).expanduser().is_file():
            raise BadRequest(f"no onnxruntime_perf_test at {config.perf_test}",
                             fix="build it for Android (onnxruntime's build.sh --android) and "
                                 "give its path")
    devices = load_devices(home)
    if config.name in devices and not replace:
        raise BadRequest(f"a device named {config.name!r} is already registered",
                         fix=f"remove it first ('harness devices remove {config.name}') or "
                             f"pick another name")
    devices[config.name] = config
    save_devices(home, devices)


def remove_device(home: Path, name: str) -> DeviceConfig:
    devices = load_devices(home)
    if name not in devices:
        raise BadRequest(f"no device named {name!r} is registered",
                         fix="see 'harness devices list'")
    config = devices.pop(name)
    save_devices(home, devices)
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


def open_client(name: str, home: Path, isolation: str = "worker"):
    """What measures on the device: our agent, onnxruntime_perf_test (agent = "perf-test"),
    or nothing real (transport = "sim")."""
    config = None if name == "local" else get_device(home, name)
    if config is not None and config.transport == "sim":
        noise = None if config.noise_trace is None else NoiseTrace.load(
            Path(home) / Path(config.noise_trace).expanduser())  # relative: to the home
        return SimulatedClient(name, SimulatedModel(config.address, config.sim_ms or 20.0,
                                                    seed=config.sim_seed or 0, noise=noise),
                               Path(home))
    transport = open_transport(name, home)
    if config is not None and config.agent == "perf-test":
        return PerfTestClient(transport, str(Path(config.perf_test or "").expanduser()))
    return AgentClient(transport, isolation, models_limit_bytes=models_limit_bytes(name, home))


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
    with _writing(Path(home), path):
        path.parent.mkdir(parents=True, exist_ok=True)
        keys.save(str(path))
    return result
