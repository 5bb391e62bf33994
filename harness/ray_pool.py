"""Multi-host device farms on Ray (optional extra: pip install 'harness[ray]'), as a DevicePool.

Each host with devices runs `harness farm serve`, which starts a Ray node that advertises
the host's registered devices as custom resources, one unit per device: `harness-kind:K`
for every device of kind K. The searching side makes
`LatencyProfiler(space, dummy, device="kind:K", farm="HEAD:PORT")`, whose pool is a
`RayPool`: each measurement is a Ray task asking for one unit of `harness-kind:K`, so Ray
runs it on a host with a free device of that kind; there the task leases a free local device
(the same leases and device locks as on a single host), measures through that host's
transports, and returns the device's result, which the caller stores in its own cache. The
timeout counts from the lease on the host; the caller waits for a task at most that long
after it could start, plus a grace for Ray itself, then cancels it.

Trust: a Ray farm runs whatever its members submit, as the user who serves it. The farm is
started with Ray's token authentication (RAY_AUTH_MODE=token): the head generates a token
once, kept in $HARNESS_HOME/ray-token with mode 0600, and every host and client must hold the
same file. Ray's ports still listen on the network: firewall them to the farm's hosts.
"""
import dataclasses
import json
import logging
import os
import platform
import secrets
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

from devices.agent_client import DeviceClient
from devices.agent_result import AgentResult
from devices.errors import (BadRequest, DeviceError, DeviceLost, MeasurementTimeout,
                            error_from_agent)
from harness.device_pool import (FAILOVER_ERRORS, DeviceIdentity, MeasureRequest, PoolOutcome,
                                 Tag)
from harness.errors import HarnessError
from harness.export import ExportedModel
from harness.paths import harness_home

log = logging.getLogger(__name__)

RESOURCE_PREFIX = "harness-kind:"
MIN_RAY = (2, 52)      # the first Ray with token authentication
TOKEN_FILE = "ray-token"
FARM_CONNECT_TIMEOUT_S = 5.0  # a farm's head must accept a connection within this
RAY_GRACE_S = 30.0     # scheduling and transfer time Ray may add to a measurement's timeout


def import_ray() -> Any:
    """Ray, at a version with token authentication, or a typed error saying what to install.
    Ray reads RAY_AUTH_MODE once, when it is imported: harness turns token authentication on
    before that (a program that imported Ray itself must set it in the environment)."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
    except ImportError:
        raise HarnessError("Ray is not installed", fix="pip install 'harness[ray]'") from None
    version = tuple(int(part) for part in ray.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_RAY:
        raise HarnessError(f"Ray {ray.__version__} has no token authentication, so a farm on "
                           f"it would run anyone's code",
                           fix="pip install 'ray>=2.52' on every host of the farm")
    return ray


# ---------------------------------------------------------------- the farm's token

def token_path(home: Path) -> Path:
    return Path(home) / TOKEN_FILE


def ensure_token(home: Path) -> Path:
    """The farm's token file, created (random, mode 0600) on first use by the head."""
    path = token_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return checked_token(home)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32) + "\n")
    log.info("generated the farm's token in %s", path)
    return path


def checked_token(home: Path) -> Path:
    """The token file of a host or client joining a farm; a typed error when it is missing,
    not a plain file of ours, or readable by others."""
    path = token_path(home)
    fix = (f"copy {TOKEN_FILE} from the head host's $HARNESS_HOME to {path} over a secure "
           f"channel (e.g. scp HEAD:.harness/{TOKEN_FILE} {path}), then chmod 600 {path}")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise HarnessError(f"no farm token at {path}: the farm only accepts members that "
                           f"hold its token", fix=fix) from None
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        raise HarnessError(f"{path} is not a plain file of yours", fix=fix)
    if info.st_mode & 0o077:
        raise HarnessError(f"{path} can be read by other users (mode "
                           f"{stat.S_IMODE(info.st_mode):o})", fix=f"chmod 600 {path}")
    if not path.read_text().strip():
        raise HarnessError(f"{path} is empty", fix=fix)
    return path


def auth_env(token_file: Path) -> Dict[str, str]:
    """The environment that makes Ray authenticate with the farm's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


# ---------------------------------------------------------------- serving a host

def host_resources(home: Path) -> Dict[str, float]:
    """The Ray resources this host offers: one unit per registered device, by kind."""
    from devices.registry import load_devices

    resources: Dict[str, float] = {}
    for config in load_devices(home).values():
        if config.kind:
            key = RESOURCE_PREFIX + config.kind
            resources[key] = resources.get(key, 0) + 1
    return resources


def serve_command(home: Path, address: Optional[str], port: int, node_ip: str) -> List[str]:
    """The `ray start` command line that joins (or, without address, heads) a farm."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [ray_cli, "start", f"--resources={json.dumps(host_resources(home))}",
               f"--node-ip-address={node_ip}", "--disable-usage-stats", "--num-cpus=1",
               "--object-store-memory=200000000"]
    if address:
        command.append(f"--address={address}")
    else:
        command += ["--head", f"--port={port}", "--include-dashboard=false"]
    return command


def serve(home: Path, address: Optional[str], port: int = 26380,
          node_ip: str = "127.0.0.1") -> int:
    """Start this host's Ray node with its devices as resources (`harness farm serve`); the
    head makes the farm's token, a joining host must hold a copy of it."""
    import_ray()
    resources = host_resources(home)
    if address and not resources:
        raise HarnessError(f"no device with a kind is registered in {home}",
                           fix="register devices with --kind before serving them")
    token = checked_token(home) if address else ensure_token(home)
    env = dict(os.environ, HARNESS_HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               **auth_env(token))
    # Ray's INFO lines go to a log file, not the user's terminal; a failure shows its tail.
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "farm-serve.log"
    with open(log_path, "ab") as log_file:
        code = subprocess.run(serve_command(home, address, port, node_ip), env=env,
                              stdout=log_file, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log_path.read_bytes()[-2000:].decode("utf-8", "replace").strip().splitlines()
        raise HarnessError(f"'ray start' failed (exit {code}): "
                           + " / ".join(line.strip() for line in tail[-4:]),
                           fix=f"read {log_path}; 'ray stop --force' ends a node left over "
                               f"from an earlier run")
    if not address:
        print(f"farm head at {node_ip}:{port}, token authentication on. A host joins with its "
              f"own copy of {token} (mode 0600, copied over a secure channel):\n"
              f"  scp {token} HOST:.harness/{TOKEN_FILE}\n"
              f"  harness farm serve --address {node_ip}:{port} --node-ip HOST_IP\n"
              f"Firewall Ray's ports ({port} and the workers') to the farm's hosts.")
    return code


# ---------------------------------------------------------------- what runs on the hosts

_CLIENTS: Dict[str, DeviceClient] = {}  # device name -> client, kept across tasks in a worker


def _on_host(kind: str, timeout_s: float, isolation: str,
             work: Callable[[DeviceClient, float], Any]) -> Any:
    """Lease a free local device of `kind` and run `work(client, deadline)`; failures come
    back as {"error": ...} so the caller can raise the right typed error."""
    from devices.registry import devices_of_kind, open_client
    from harness.leases import lease_any

    home = harness_home()
    name = None
    try:
        lease = lease_any(home, devices_of_kind(home, kind))
        name = lease.device
        try:
            if name not in _CLIENTS:
                _CLIENTS[name] = open_client(name, home, isolation)
            leased_at = time.time()
            result = work(_CLIENTS[name], lease.deadline(timeout_s))
            if isinstance(result, AgentResult):
                result = dataclasses.replace(result, host=platform.node(),
                                             lease=(leased_at, time.time()))
        finally:
            lease.__exit__(None, None, None)
        return result
    except DeviceError as exc:
        client = _CLIENTS.pop(name, None) if name else None  # start afresh with that device
        if client is not None:
            client.close()
        return {"error": {"kind": exc.kind, "message": exc.message, "fix": exc.fix}}
    except HarnessError as exc:
        return {"error": {"kind": "USER", "message": exc.message, "fix": exc.fix}}


def _identify_task(kind: str, timeout_s: float, isolation: str) -> Any:
    return _on_host(kind, timeout_s, isolation,
                    lambda client, deadline: (client.facts(deadline), client.agent_version))


def _measure_task(kind: str, onnx_bytes: bytes, sha256: str, settings: Dict[str, Any],
                  timeout_s: float, isolation: str) -> Any:
    def work(client: DeviceClient, deadline: float) -> AgentResult:
        with tempfile.TemporaryDirectory(prefix="harness-farm-") as folder:
            path = Path(folder) / f"{sha256}.onnx"
            path.write_bytes(onnx_bytes)
            return client.measure(str(path), settings, deadline=deadline, sha256=sha256)
    return _on_host(kind, timeout_s, isolation, work)


# ---------------------------------------------------------------- the caller's side

def farm_pool(address: str, device: str, home: Path, isolation: str = "worker") -> "RayPool":
    """The pool of `device` ("kind:K") on the Ray farm at `address`."""
    if not device.startswith("kind:"):
        raise BadRequest(f"a farm profiles kinds of devices, not {device!r}",
                         fix="pass device='kind:K' with farm=...")
    return RayPool(address, device[len("kind:"):], home, isolation)


def check_farm_answers(address: str, timeout_s: float = FARM_CONNECT_TIMEOUT_S) -> None:
    """Fail fast, with the fix, when nothing listens at the farm's address: Ray itself
    retries for minutes, printing its C++ warnings, before it gives up."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise BadRequest(f"the farm address {address!r} is not HOST:PORT",
                         fix="pass the head's address as 'harness farm serve' printed it, "
                             "e.g. farm='10.0.0.2:26380'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise DeviceLost(f"no Ray farm answers at {address} ({why})",
                         fix=f"start the head there with 'harness farm serve', or check the "
                             f"address and the firewall (port {port})") from None


class RayPool:
    """The devices of one kind on every host of a Ray farm; see the module docstring."""

    def __init__(self, address: str, kind: str, home: Path, isolation: str = "worker"):
        ray = import_ray()
        self.name = f"kind:{kind}"
        self.kind = kind
        self.address = address
        self.isolation = isolation
        self.resource = RESOURCE_PREFIX + kind
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        if not is_token_auth_enabled():
            raise HarnessError("Ray was imported before token authentication was turned on, "
                               "so this process cannot join a farm (farms require the token)",
                               fix="set RAY_AUTH_MODE=token in the environment, or import "
                                   "harness before ray")
        if not ray.is_initialized():
            check_farm_answers(address)
            os.environ.update(auth_env(checked_token(Path(home))))  # read when Ray connects
            try:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
            except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
                raise DeviceLost(f"cannot join the farm at {address}: {exc}",
                                 fix="check the address, that 'harness farm serve' runs there, "
                                     "and that this host holds the farm's token") from None
        self._ray = ray
        self._identify = ray.remote(num_cpus=0, max_retries=0)(_identify_task)
        self._measure = ray.remote(num_cpus=0, max_retries=0)(_measure_task)

    def slots(self) -> int:
        """How many devices of the kind the farm offers (Ray's count of the resource)."""
        count = int(self._ray.cluster_resources().get(self.resource, 0))
        if count == 0:
            raise DeviceLost(f"no host of the farm offers a device of kind {self.kind!r}",
                             fix="run 'harness farm serve --address HEAD' on hosts with such "
                                 "devices registered (with --kind)")
        return count

    def identify(self, timeout_s: float) -> DeviceIdentity:
        self.slots()
        ref = self._submit(self._identify, self.kind, timeout_s, self.isolation)
        facts, agent_version = self._answer(ref, time.monotonic() + timeout_s + RAY_GRACE_S)
        return DeviceIdentity(facts, agent_version)

    def measure(self, exported: ExportedModel, request: MeasureRequest) -> AgentResult:
        return next(iter(self.measure_many([(None, exported)], request))).unwrap()

    def measure_many(self, jobs: Iterable[Tuple[Tag, ExportedModel]],
                     request: MeasureRequest) -> Iterator[PoolOutcome[Tag]]:
        """At most one task in flight per device the farm offers, so that each can start at
        once and its wait is bounded; a device fault is retried, up to once per device."""
        slots = self.slots()
        waiting = iter(jobs)
        in_flight: Dict[Any, Tuple[Tag, ExportedModel, float, int]] = {}
        retry: Deque[Tuple[Tag, ExportedModel, int]] = deque()
        exhausted = False
        while True:
            while len(in_flight) < slots and (retry or not exhausted):
                if retry:
                    tag, exported, attempt = retry.popleft()
                else:
                    try:
                        tag, exported = next(waiting)
                    except StopIteration:
                        exhausted = True
                        break
                    attempt = 1
                ref = self._submit(self._measure, self.kind, exported.onnx_bytes,
                                   exported.sha256, dict(request.settings), request.timeout_s,
                                   self.isolation)
                in_flight[ref] = (tag, exported, time.monotonic() + request.timeout_s
                                  + RAY_GRACE_S, attempt)
            if not in_flight:
                return
            done, _ = self._ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            for ref in done or [r for r, job in in_flight.items() if job[2] < time.monotonic()]:
                tag, exported, deadline, attempt = in_flight.pop(ref)
                try:
                    result = self._answer(ref, deadline)
                except FAILOVER_ERRORS as exc:
                    if attempt < slots:
                        log.warning("%s (%s); the job goes to another device", exc.message,
                                    self.name)
                        retry.append((tag, exported, attempt + 1))
                        continue
                    yield PoolOutcome(tag, exported, error=exc)
                    continue
                except Exception as exc:
                    yield PoolOutcome(tag, exported, error=exc)
                    continue
                yield PoolOutcome(tag, exported, result=result)

    def close(self) -> None:
        """Leave the farm running; just stop talking to it."""

    # ------------------------------------------------------------ plumbing

    def _submit(self, remote: Any, *args: Any) -> Any:
        return remote.options(resources={self.resource: 1}).remote(*args)

    def _answer(self, ref: Any, deadline: float) -> Any:
        """The task's answer, or its typed error; cancelled and MeasurementTimeout past
        `deadline` (a time.monotonic() value)."""
        try:
            answer = self._ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
        except self._ray.exceptions.GetTimeoutError:
            self._ray.cancel(ref, force=True)
            raise MeasurementTimeout(f"the farm gave no answer for a device of {self.name} "
                                     f"in time", device=self.name) from None
        if isinstance(answer, dict) and "error" in answer:
            error = error_from_agent(answer["error"], device=self.name)
            error.fix = answer["error"].get("fix") or error.fix
            raise error
        return answer

