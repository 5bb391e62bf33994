"""Multi-host device farms on Ray (optional extra: pip install 'harness[ray]'), as a DevicePool.

Each host with devices runs `harness farm serve` (harness.pool.farm), which starts a Ray node and
on it a `FarmHost`: one Ray actor, named in the farm's namespace, that serves the host's
registered devices of every kind, each kind a LocalPool (the same leases, health, quarantine
and device locks as on a single host). The searching side makes
`LatencyProfiler(space, dummy, device="kind:K", farm="HEAD:PORT")`, whose pool is a
`RayPool`: it finds the hosts that offer kind K and schedules itself, each job to the host
with the most room, two jobs in flight per device (one measuring, the next waiting on its
host), so a run of N jobs keeps min(N, devices) devices busy and a device starts its next
job the moment one ends. The result comes back to the caller, which stores it in its own
cache. The timeout counts from the lease on the host; the caller waits for a job at most
two timeouts after sending it, plus a grace for Ray itself, then gives it up. A job a host
fails with a device fault, or a host that dies, sends the job to another host.

Why actors and not one Ray task per measurement: a running task holds a worker process,
about 100 MB; a farm of hundreds of devices would need hundreds of them. One actor per host
holds one process and a thread per job in flight.

Trust: a Ray farm runs whatever its members submit, as the user who serves it. The farm is
started with Ray's token authentication (RAY_AUTH_MODE=token): the head generates a token
once, kept in $HARNESS_HOME/ray-token with mode 0600, and every host and client must hold the
same file. Ray's ports still listen on the network: firewall them to the farm's hosts.
"""
import dataclasses
import logging
import os
import platform
import secrets
import socket
import stat
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, Callable, Deque, Dict, Generic, Iterable, Iterator, List, Optional,
                    Sequence, Tuple, Union)

from devices.agent_result import AgentResult
from devices.errors import DeviceError, DeviceLost, MeasurementTimeout, error_from_agent
from harness.pool.device_pool import (FAILOVER_ERRORS, DeviceIdentity, LocalPool, MeasureRequest,
                                 PoolOutcome, Tag)
from devices.safe_files import create_file, replace_text
from harness.errors import HarnessError, InvalidArgument
from harness.export.graph import ExportedModel

log = logging.getLogger(__name__)

RESOURCE_PREFIX = "harness-kind:"  # Ray resources a host offers (shown by 'ray status')
NAMESPACE = "harness-farm"        # the Ray namespace of the farm's named actors
HOST_ACTOR_PREFIX = "harness-host:"
CONTROL_GROUP = "control"         # a host actor's threads for status, offers and drain
REDISCOVER_S = 10.0    # how often a running pool looks for hosts that joined or came back
DISCOVERY_WAIT_S = 5.0  # a host that does not say what it offers within this is left out
HOST_PAUSE_S = 5.0     # a host with every device quarantined is asked again after this
HOST_POLL_S = 0.5      # how often a pool with nothing in flight looks for a host again
# Jobs in flight per device: one measuring, one waiting on its host, so a device starts its
# next job the moment one ends instead of after a round trip to the caller.
QUEUE_DEPTH = 2
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
    """The farm's token file, created (random, mode 0600) on first use by the head. It
    appears whole or not at all: written and fsynced under a temporary name, then linked
    to its name only if none is there (kill -9 in between leaves no empty token). An empty
    token of ours, left by an older harness killed while writing it, is replaced."""
    path = token_path(home)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if os.lstat(path).st_size == 0 and _replace_empty_token(path):
            return path
    except FileNotFoundError:
        pass
    token = (secrets.token_hex(32) + "\n").encode()
    if not create_file(path, lambda out: out.write(token), mode=0o600):  # one is there
        return checked_token(home)
    log.info("generated the farm's token in %s", path)
    return path


def _replace_empty_token(path: Path) -> bool:
    """Replace an empty token file of ours (regular, this user's) with a fresh token."""
    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.getuid():
        return False
    replace_text(path, secrets.token_hex(32) + "\n", mode=0o600)
    log.warning("the farm token %s was empty (a serve killed while writing it): replaced it "
                "with a new one; copy it to the farm's hosts again", path)
    return True


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


# ---------------------------------------------------------------- what serves a host's devices

@dataclass(frozen=True)
class DeviceStatus:
    """One device of a farm host, as `harness farm status` lists it."""

    name: str
    kind: str
    state: str          # "busy", "free" or "quarantined"
    done: int           # measurements it finished for the farm
    failed: int         # measurements that failed on it


@dataclass(frozen=True)
class HostStatus:
    """One host of a farm: its devices, what it is doing, and what it has done."""

    name: str           # the host's actor name (HOSTNAME-xxxxxx)
    host: str           # the machine's name
    started_at: float   # wall-clock seconds
    devices: Tuple[DeviceStatus, ...]
    running: int        # jobs on a device now
    waiting: int        # jobs at the host waiting for a free device (its queue)
    done: int
    failed: int
    draining: bool      # stopping: takes no new job

    def kinds(self) -> Dict[str, List[DeviceStatus]]:
        by_kind: Dict[str, List[DeviceStatus]] = {}
        for device in self.devices:
            by_kind.setdefault(device.kind, []).append(device)
        return by_kind


class FarmHost:
    """What `harness farm serve` leaves running on a host: a Ray actor (one process, one
    thread per job in flight) that measures on the host's registered devices of a kind when
    a caller asks. Each kind is a LocalPool: exclusive leases, health and quarantine,
    fail-over between the host's devices, timeouts counted from the lease. One actor serves
    any number of devices, so a simulated farm of hundreds fits on one machine.

    Failures come back as {"error": {...}} (kind, message, fix, device) so the caller raises
    the same typed errors as on a single host."""

    def __init__(self, home: str, name: str):
        from devices.registry import load_devices

        self.home = Path(home)
        self.name = name
        self.started_at = time.time()
        self.kinds: Dict[str, List[str]] = {}  # kind -> its devices here
        for device, config in sorted(load_devices(self.home).items()):
            if config.kind:
                self.kinds.setdefault(config.kind, []).append(device)
        self._pools: Dict[Tuple[str, str], LocalPool] = {}  # (kind, isolation) -> pool
        self._lock = threading.Lock()
        self._running = 0
        self._done: Dict[str, int] = {}
        self._failed: Dict[str, int] = {}
        self._draining = False

    def offers(self) -> Dict[str, int]:
        """{kind: how many devices of it this host serves}."""
        return {kind: len(names) for kind, names in self.kinds.items()}

    def identify(self, kind: str, timeout_s: float, isolation: str = "worker") -> Any:
        return self._serve(kind, isolation, lambda pool: pool.identify(timeout_s))

    def measure(self, kind: str, exported: ExportedModel, request: MeasureRequest,
                isolation: str = "worker") -> Any:
        """Measure on a free device of `kind`, its agent run as `isolation` asks ("worker",
        or "process": a fresh agent per measurement)."""
        def work(pool: LocalPool) -> AgentResult:
            result = pool.measure(exported, request)
            self._count(self._done, result.device)
            return dataclasses.replace(result, host=platform.node())
        return self._serve(kind, isolation, work)

    def status(self) -> HostStatus:
        with self._lock:
            pools = dict(self._pools)
            running, done, failed = self._running, dict(self._done), dict(self._failed)
        devices = []
        busy_total = 0
        for kind, names in sorted(self.kinds.items()):
            of_kind = [pool for (k, _), pool in pools.items() if k == kind]
            quarantined = set(names).difference(*(p.health.available() for p in of_kind)) \
                if of_kind else set()
            busy = set().union(*(p.busy() for p in of_kind))
            busy_total += len(busy)
            devices += [DeviceStatus(name, kind, "busy" if name in busy else "quarantined"
                                     if name in quarantined else "free",
                                     done.get(name, 0), failed.get(name, 0)) for name in names]
        return HostStatus(self.name, platform.node(), self.started_at, tuple(devices),
                          running=busy_total, waiting=max(running - busy_total, 0),
                          done=sum(done.values()), failed=sum(failed.values()),
                          draining=self._draining)

    def drain(self, timeout_s: float) -> int:
        """Take no new job, wait up to `timeout_s` for the running ones, then stop the agents
        on the devices. Returns how many jobs were still running."""
        self._draining = True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if self._running == 0:
                    break
            time.sleep(0.1)
        with self._lock:
            left, pools = self._running, list(self._pools.values())
        for pool in pools:
            pool.close()
        return left

    # ------------------------------------------------------------ plumbing

    def _serve(self, kind: str, isolation: str, work: Callable[[LocalPool], Any]) -> Any:
        """`work(pool)` on the kind's pool; an answer marked "unavailable" when the host
        has nothing to offer now (stopping, or every device quarantined): the caller sends
        the job elsewhere without counting a failed try."""
        if self._draining:
            return dict(_error_answer(DeviceLost(f"farm host {self.name} is stopping")),
                        unavailable=True)
        if kind not in self.kinds:
            return _error_answer(DeviceLost(f"farm host {self.name} has no device of kind "
                                            f"{kind!r}"))
        with self._lock:
            if (kind, isolation) not in self._pools:
                self._pools[kind, isolation] = LocalPool(self.home, f"kind:{kind}", isolation)
            pool = self._pools[kind, isolation]
            if not pool.health.available():
                return dict(_error_answer(DeviceLost(
                    f"every device of kind {kind!r} on farm host {self.name} is quarantined")),
                    unavailable=True)
            self._running += 1
        try:
            return work(pool)
        except DeviceError as exc:
            self._count(self._failed, exc.device)
            return _error_answer(exc)
        except HarnessError as exc:
            return {"error": {"kind": "USER", "message": exc.message, "fix": exc.fix}}
        except Exception as exc:  # a fault of the host itself, typed for the caller
            log.exception("farm host %s failed a job", self.name)
            return _error_answer(DeviceLost(f"farm host {self.name} failed: "
                                            f"{type(exc).__name__}: {exc}"))
        finally:
            with self._lock:
                self._running -= 1

    def _count(self, counts: Dict[str, int], device: Optional[str]) -> None:
        if device is not None:
            with self._lock:
                counts[device] = counts.get(device, 0) + 1


def _error_answer(exc: DeviceError) -> Dict[str, Any]:
    return {"error": {"kind": exc.kind, "message": exc.message, "fix": exc.fix,
                      "device": exc.device}}


def host_actors(ray: Any) -> Dict[str, Any]:
    """{actor name: handle} of every farm host serving devices (named actors in the farm's
    namespace, whichever namespace this process connected with)."""
    handles = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry["name"]
        if entry["namespace"] == NAMESPACE and name.startswith(HOST_ACTOR_PREFIX):
            try:
                handles[name] = ray.get_actor(name, namespace=NAMESPACE)
            except ValueError:  # it died between the listing and the lookup
                continue
    return handles


def control(method: Any) -> Any:
    """A FarmHost method called in the actor's control threads, so that status, offers and
    drain answer at once even while every job thread waits for a device."""
    return method.options(concurrency_group=CONTROL_GROUP)


def connect(ray: Any, address: str, home: Path, logging_level: int = logging.WARNING) -> None:
    """Join the farm at `address` as a client (fast failure, the token, the namespace)."""
    if ray.is_initialized():
        return
    check_farm_answers(address)
    os.environ.update(auth_env(checked_token(Path(home))))  # read when Ray connects
    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=False,
                 logging_level=logging_level)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError, ...
        raise DeviceLost(f"cannot join the farm at {address}: {exc}",
                         fix="check the address, that 'harness farm serve' runs there, "
                             "and that this host holds the farm's token") from None

# ---------------------------------------------------------------- the caller's side

def farm_pool(address: str, device: str, home: Path, isolation: str = "worker") -> "RayPool":
    """The pool of `device` ("kind:K") on the Ray farm at `address`."""
    if not device.startswith("kind:"):
        raise InvalidArgument(f"a farm profiles kinds of devices, not {device!r}",
                         fix="pass device='kind:K' with farm=...")
    return RayPool(address, device[len("kind:"):], home, isolation)


def check_farm_answers(address: str, timeout_s: float = FARM_CONNECT_TIMEOUT_S) -> None:
    """Fail fast, with the fix, when nothing listens at the farm's address: Ray itself
    retries for minutes, printing its C++ warnings, before it gives up."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise InvalidArgument(f"the farm address {address!r} is not HOST:PORT",
                         fix="pass the head's address as 'harness farm serve' printed it, "
                             "e.g. farm='10.0.0.2:26380'")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        why = "no answer" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise DeviceLost(f"no Ray farm answers at {address} ({why})",
                         fix=f"start the head there with 'harness farm serve', or check the "
                             f"address and the firewall (port {port})") from None


class HostUnavailable(DeviceLost):
    """A farm host has no device of the kind available now (all quarantined): the job goes
    elsewhere, or waits, without counting as a failed try."""


@dataclass
class _Host:
    """The caller's view of one farm host: its actor, its devices of the kind, its jobs now."""

    name: str
    handle: Any
    capacity: int
    in_flight: int = 0
    assigned: int = 0   # jobs sent there in this run (ties go to the least used host)
    alive: bool = True
    paused_until: float = 0.0  # all its devices quarantined: asked again after this

    @property
    def free(self) -> int:
        """Jobs it can take now: QUEUE_DEPTH per device, less those in flight."""
        usable = self.alive and self.paused_until <= time.monotonic()
        return QUEUE_DEPTH * self.capacity - self.in_flight if usable else 0


@dataclass
class _Job(Generic[Tag]):
    tag: Tag
    exported: ExportedModel
    attempt: int = 1
    tried: List[str] = dataclasses.field(default_factory=list)  # hosts that failed it
    host: str = ""
    deadline: float = 0.0
    waiting_since: Optional[float] = None  # when no host could take it (time.monotonic())


class RayPool:
    """The devices of one kind on every host of a Ray farm; see the module docstring."""

    def __init__(self, address: str, kind: str, home: Path, isolation: str = "worker"):
        ray = import_ray()
        self.name = f"kind:{kind}"
        self.kind = kind
        self.devices: List[str] = []  # the farm's devices are registered on its hosts
        self.interleaves = False  # a farm job measures one model (rounds: this host's devices)
        self.address = address
        self.isolation = isolation
        from ray._private.authentication.authentication_utils import is_token_auth_enabled

        if not is_token_auth_enabled():
            raise HarnessError("Ray was imported before token authentication was turned on, "
                               "so this process cannot join a farm (farms require the token)",
                               fix="set RAY_AUTH_MODE=token in the environment, or import "
                                   "harness before ray")
        connect(ray, address, home)
        self._ray = ray
        self.hosts: Dict[str, _Host] = {}
        self._discovered_at = 0.0
        self._discover()

    def slots(self) -> int:
        """How many devices of the kind the farm's live hosts offer."""
        if time.monotonic() - self._discovered_at > REDISCOVER_S:
            self._discover()
        count = sum(h.capacity for h in self.hosts.values() if h.alive)
        if count == 0:
            raise DeviceLost(f"no host of the farm offers a device of kind {self.kind!r}",
                             fix="run 'harness farm serve --address HEAD' on hosts with such "
                                 "devices registered (with --kind)")
        return count

    def identify(self, timeout_s: float) -> DeviceIdentity:
        self.slots()
        errors: List[Exception] = []
        for host in sorted(self.hosts.values(), key=lambda h: -h.free):
            ref = host.handle.identify.remote(self.kind, timeout_s, self.isolation)
            try:
                return self._answer(ref, time.monotonic() + timeout_s + RAY_GRACE_S, host)
            except FAILOVER_ERRORS as exc:
                errors.append(exc)
        raise errors[-1]

    def measure(self, exported: ExportedModel, request: MeasureRequest) -> AgentResult:
        return next(iter(self.measure_many([(None, exported)], request))).unwrap()

    def measure_rounds(self, models: Sequence[ExportedModel], reference: ExportedModel,
                       request: MeasureRequest) -> Dict[str, Union[AgentResult, Exception]]:
        """A farm schedules one model per job: interleaved rounds run on this host's devices."""
        raise InvalidArgument(f"the farm's {self.name} measures one model per job; interleaved "
                              "rounds run on the devices of this host only",
                              fix="profile with protocol 'loop' on a farm, or register the "
                                  "device on this host")

    def measure_many(self, jobs: Iterable[Tuple[Tag, ExportedModel]],
                     request: MeasureRequest) -> Iterator[PoolOutcome[Tag]]:
        """Every free device of the kind busy while jobs wait: each job goes to the live host
        with the most room (ties: the one given fewest jobs), at most QUEUE_DEPTH jobs per
        device in flight, so a device's next job waits on its host, and a job waits there
        at most QUEUE_DEPTH - 1 measurements before its lease (from which its own timeout
        counts; the caller gives up QUEUE_DEPTH timeouts plus a grace after sending). A job
        that a device or host fails goes to another host (up to once per device); a host
        that dies is left out; a host whose devices are all quarantined is asked again after
        HOST_PAUSE_S, and a job no host can take for request.timeout_s fails."""
        waiting = iter(jobs)
        shipped = dataclasses.replace(request, still_needed=None)  # a callable of this process
        retry: Deque[_Job[Tag]] = deque()
        in_flight: Dict[Any, _Job[Tag]] = {}
        exhausted = False
        no_host_since: Optional[float] = None
        while True:
            if time.monotonic() - self._discovered_at > REDISCOVER_S:
                self._discover()
            placed = True
            while placed:  # jobs to try again first, each to a host it has not failed on
                placed = False
                for job in list(retry):
                    host = self._pick(job.tried)
                    if host is not None:
                        retry.remove(job)
                        in_flight[self._send(host, job, shipped, request.timeout_s)] = job
                        placed = True
                host = None if exhausted else self._pick([])
                if host is not None:
                    try:
                        tag, exported = next(waiting)
                    except StopIteration:
                        exhausted = True
                        break
                    job = _Job(tag, exported)
                    in_flight[self._send(host, job, shipped, request.timeout_s)] = job
                    placed = True
            if not in_flight:
                if exhausted and not retry:
                    return
                if not any(host.alive for host in self.hosts.values()):
                    no_host_since = no_host_since or time.monotonic()
                    if time.monotonic() - no_host_since > request.timeout_s:
                        self.slots()  # DeviceLost: no host of the farm offers the kind
                else:
                    no_host_since = None
                yield from self._give_up_waiting(retry, request.timeout_s)
                time.sleep(HOST_POLL_S)  # every host is paused or gone: look again soon
                continue
            done, _ = self._ray.wait(list(in_flight), num_returns=1, timeout=1.0)
            now = time.monotonic()
            for ref in done or [r for r, j in in_flight.items() if j.deadline < now]:
                job = in_flight.pop(ref)
                host = self.hosts[job.host]
                host.in_flight -= 1
                try:
                    result = self._answer(ref, job.deadline, host)
                except HostUnavailable:
                    host.paused_until = time.monotonic() + HOST_PAUSE_S
                    job.waiting_since = job.waiting_since or time.monotonic()
                    retry.append(job)  # not a failed try: that host had nothing to offer
                    yield from self._give_up_waiting(retry, request.timeout_s)
                    continue
                except FAILOVER_ERRORS as exc:
                    if job.attempt < max(sum(h.capacity for h in self.hosts.values()), 2):
                        log.warning("%s (%s on %s); the job goes to another device",
                                    exc.message, self.name, job.host)
                        job.attempt += 1
                        job.tried.append(job.host)
                        retry.append(job)
                        continue
                    yield PoolOutcome(job.tag, job.exported, error=exc)
                    continue
                except Exception as exc:
                    yield PoolOutcome(job.tag, job.exported, error=exc)
                    continue
                yield PoolOutcome(job.tag, job.exported, result=result)

    def _give_up_waiting(self, retry: "Deque[_Job[Tag]]",
                         timeout_s: float) -> Iterator[PoolOutcome[Tag]]:
        """With nothing in flight, the jobs to try again wait for a host; those that have
        waited timeout_s fail."""
        now = time.monotonic()
        for job in list(retry):
            if job.waiting_since is None:
                job.waiting_since = now
            elif now - job.waiting_since > timeout_s:
                retry.remove(job)
                yield PoolOutcome(job.tag, job.exported, error=DeviceLost(
                    f"no host of the farm could take the job for {timeout_s:.0f} s: every "
                    f"device of {self.name} failed it, is quarantined or is gone",
                    device=self.name, fix="'harness farm status' shows the hosts and their "
                                          "devices"))

    def close(self) -> None:
        """Leave the farm running; just stop talking to it."""

    # ------------------------------------------------------------ plumbing

    def _send(self, host: _Host, job: "_Job[Tag]", request: MeasureRequest,
              timeout_s: float) -> Any:
        """Start `job` on `host`; its Ray reference."""
        job.host = host.name
        job.deadline = time.monotonic() + QUEUE_DEPTH * timeout_s + RAY_GRACE_S
        host.in_flight += 1
        host.assigned += 1
        return host.handle.measure.remote(self.kind, job.exported, request, self.isolation)

    def _discover(self) -> None:
        """Learn which hosts serve the kind: new ones join, hosts that are gone leave (a host
        revived by 'farm serve' is a new one); the counts of jobs in flight stay."""
        found = host_actors(self._ray)
        asked = {control(handle.offers).remote(): name for name, handle in found.items()}
        answered, _ = self._ray.wait(list(asked), num_returns=len(asked),
                                     timeout=DISCOVERY_WAIT_S) if asked else ([], [])
        offers, gone = {}, set(self.hosts) - set(found)
        for ref in answered:
            try:
                offers[asked[ref]] = self._ray.get(ref)
            except Exception as exc:  # a host that died meanwhile is left out
                log.warning("farm host %s does not answer (%s); left out", asked[ref], exc)
                gone.add(asked[ref])
        for name, offer in offers.items():
            capacity = int(offer.get(self.kind, 0))
            if name in self.hosts:
                self.hosts[name].handle, self.hosts[name].capacity = found[name], capacity
                self.hosts[name].alive = True
            elif capacity:
                self.hosts[name] = _Host(name, found[name], capacity)
        for name in gone & set(self.hosts):  # a busy host that is slow to answer stays
            self.hosts[name].alive = False
        self._discovered_at = time.monotonic()

    def _pick(self, tried: List[str]) -> Optional[_Host]:
        """The host for the next job: the most free devices, then the fewest jobs given;
        a host that failed the job only when no other can take it."""
        candidates = [h for h in self.hosts.values() if h.free > 0]
        fresh = [h for h in candidates if h.name not in tried]
        if not fresh and len(set(tried)) < len([h for h in self.hosts.values() if h.alive]):
            return None  # wait for a host it has not tried to free up
        pool = fresh or candidates
        return max(pool, key=lambda h: (h.free, -h.assigned)) if pool else None

    def _answer(self, ref: Any, deadline: float, host: _Host) -> Any:
        """The host's answer, or its typed error; cancelled and MeasurementTimeout past
        `deadline` (a time.monotonic() value); a dead host is marked so."""
        try:
            answer = self._ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
        except self._ray.exceptions.GetTimeoutError:
            self._ray.cancel(ref, force=False)
            raise MeasurementTimeout(f"the farm gave no answer for a device of {self.name} "
                                     f"in time", device=self.name) from None
        except self._ray.exceptions.ActorUnavailableError:  # Ray says: for now
            raise HostUnavailable(f"farm host {host.name} is unavailable for now",
                                  device=self.name) from None
        except self._ray.exceptions.RayActorError as exc:
            host.alive = False
            raise DeviceLost(f"farm host {host.name} is gone ({type(exc).__name__})",
                             device=self.name) from None
        except self._ray.exceptions.RayError as exc:  # the answer was lost on the way
            raise DeviceLost(f"the answer of farm host {host.name} was lost "
                             f"({type(exc).__name__})", device=self.name) from None
        if isinstance(answer, dict) and answer.get("unavailable") is True:
            raise HostUnavailable(answer["error"]["message"], device=self.name)
        if isinstance(answer, dict) and "error" in answer:
            error = error_from_agent(answer["error"], device=answer["error"].get("device")
                                     or self.name)
            error.fix = answer["error"].get("fix") or error.fix
            raise error
        return answer
