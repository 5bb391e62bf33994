"""Device pools: where a profiler's measurements run.

A `DevicePool` takes exported models and gives back what the device reported (`AgentResult`):
`measure` for one, `measure_many` for a stream of them, and `identify` for who the device is
(its identity is part of every cache key). Two pools exist:

- `LocalPool` (this module): one device or every registered device of a kind, reached from
  this host. It owns the exclusive leases (harness.pool.leases), health with strikes and
  quarantine, the agent clients, fail-over to another device when one is lost, and the
  export pipeline of `measure_many`: models are exported in a thread ahead of the devices
  and every device measures in a thread of its own. On `local` the host is the device, so
  there export and measurement take turns instead.
- `RayPool` (harness.pool.ray_pool): the devices of a kind on every host of a Ray farm; Ray
  schedules each measurement onto a host with a free device of the kind.

The time a measurement may take (`MeasureRequest.timeout_s`) counts from the lease.
"""
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import (Any, Callable, Deque, Dict, Generic, Iterable, Iterator, List, Mapping,
                    Optional, Protocol, Sequence, Set, Tuple, TypeVar, Union)

from agents.ort_agent import AgentError, parse_settings
from devices.agent_client import DeviceClient
from devices.agent_result import AgentResult, DeviceFacts
from devices.errors import AgentProtocolError, DeviceLost, MeasurementTimeout, ThermalError
from devices.registry import devices_of_kind, times_one_model_at_a_time, open_client
from harness.store.key import device_fingerprint, model_of, settings_key
from harness.errors import InvalidArgument
from harness.export.graph import ExportedModel
from harness.pool.leases import LEASE_WAIT_S, DeviceBusy, DeviceHealth, DeviceLease, try_lease
from harness.pool.staging import StagingFolder
from harness.store.measurement import Measurement

log = logging.getLogger(__name__)

OTHERS_POLL_S = 0.05   # how often it looks whether they let go

# Failures that say the device (not the model) is in trouble: strike it and fail over.
FAILOVER_ERRORS = (DeviceLost, MeasurementTimeout, ThermalError, AgentProtocolError)

Tag = TypeVar("Tag")
T = TypeVar("T")
W = TypeVar("W")


@dataclass(frozen=True)
class MeasureRequest:
    """How to measure: the agent's settings, and how long one measurement may take from the
    moment its device is leased."""

    settings: Mapping[str, Any]
    timeout_s: float
    overrides: Mapping[str, Any] = field(default_factory=dict)  # what the user set
    # Asked once the device is leased: is this graph still to be measured? (Another process
    # may have measured it while this one waited for the lease.) None: always.
    still_needed: Optional[Callable[[str], bool]] = None

    @classmethod
    def checked(cls, overrides: Optional[Mapping[str, Any]], timeout_s: float
                ) -> "MeasureRequest":
        """The agent's defaults with `overrides` applied, checked as the agent checks them;
        InvalidArgument names a bad setting."""
        if not (isinstance(timeout_s, (int, float)) and math.isfinite(timeout_s)
                and timeout_s > 0):
            raise InvalidArgument(f"timeout_s must be a positive number of seconds, got "
                             f"{timeout_s!r}")
        try:
            return cls(parse_settings(dict(overrides or {})), float(timeout_s),
                       dict(overrides or {}))
        except AgentError as exc:
            raise InvalidArgument(exc.message, fix="give the setting a value in its range "
                                  "(the defaults: agents.ort_agent.DEFAULT_SETTINGS)") from None

    def with_settings(self, **changes: Any) -> "MeasureRequest":
        """The same request with other settings (the stop rule's defaults apply anew)."""
        return MeasureRequest.checked(dict(self.overrides, **changes), self.timeout_s)

    def accepts(self, cached: Measurement, old_way: bool = False) -> bool:
        """Whether a cached measurement answers this request: one made by the same protocol
        (a loop's median and a window of rounds are not the same quantity), or with
        `old_way` under rounds, one timed one model at a time (the fallback
        MeasurementSteps.cached takes where no result of rounds is stored); for stop="ci"
        one whose interval is as tight as rel_ci asks (a +-1% result answers a +-2% request,
        not the reverse)."""
        if self.settings.get("per_op") and cached.ops is None:
            return False  # per-operator times asked, and the stored result has none
        rounds_asked = self.settings["protocol"] == "rounds"
        if old_way:
            if not rounds_asked or cached.rounds is not None:
                return False
        elif rounds_asked != (cached.rounds is not None):
            return False  # timed the other way: interleaved, or one model at a time
        if self.settings["stop"] != "ci":
            return True
        rounds = rounds_asked and cached.interleaved is not None
        # rounds: the ratio's interval as the agent's ci rule read it (without the systematic
        # term the summary adds, else a result that just met rel_ci is measured anew every
        # time); a loop: the median's
        reach = cached.interleaved.statistical_half_width if rounds and cached.interleaved \
            else cached.relative_half_width
        return reach <= self.settings["rel_ci"]

    @property
    def settings_key(self) -> str:
        """The digest of the settings that change what is measured (the cache key's part)."""
        return settings_key(self.settings)


class AnsweredMeanwhile(Exception):
    """The graph was answered (by another process, say) while its job waited for a lease:
    the lease was given back unused."""


@dataclass(frozen=True)
class DeviceIdentity:
    """Who measures: the device's facts, the digest of its identity (the cache key's device
    part) and the version of what measures there (the agent, or a native tool)."""

    facts: DeviceFacts
    agent_version: str

    @property
    def fingerprint(self) -> str:
        return device_fingerprint(self.facts.identity)

    @property
    def model(self) -> Dict[str, Any]:
        """The identity without the unit (a board's host key, a phone's serial): what every
        unit of one model shares."""
        return model_of(self.facts.identity)


@dataclass(frozen=True)
class PoolOutcome(Generic[Tag]):
    """What became of one job of `measure_many`: the device's result, or the error."""

    tag: Tag
    exported: ExportedModel
    result: Optional[AgentResult] = None
    error: Optional[Exception] = None

    def unwrap(self) -> AgentResult:
        """The result, or the error raised."""
        if self.result is None:
            raise self.error or RuntimeError("a pool outcome with neither result nor error")
        return self.result


class DevicePool(Protocol):
    """Where measurements run; see the module docstring."""

    name: str           # what the user asked for: "local", "rpi4", "kind:K"
    isolation: str      # "worker" or "process" (how the agent runs on the device)
    devices: List[str]  # the registered devices it measures on from this host (a farm: none)
    interleaves: bool   # whether it times models together in interleaved rounds

    def identify(self, timeout_s: float) -> DeviceIdentity:
        """Who the device is; in a pool, the first device that answers speaks for the kind."""

    def measure(self, exported: ExportedModel, request: MeasureRequest) -> AgentResult:
        """Measure one model on a free device, failing over to another when one is lost."""

    def measure_many(self, jobs: Iterable[Tuple[Tag, ExportedModel]],
                     request: MeasureRequest) -> Iterator[PoolOutcome[Tag]]:
        """Measure a stream of models on every device of the pool, in the order they finish.
        `jobs` is consumed lazily, ahead of the devices (exporting is the iterator's work)."""

    def measure_rounds(self, models: Sequence[ExportedModel], reference: ExportedModel,
                       request: MeasureRequest) -> Dict[str, Union[AgentResult, Exception]]:
        """Time models together in interleaved rounds beside a reference, on one device:
        {graph hash: its result, or its own error}."""

    def close(self) -> None:
        """Stop the agents on the devices and release temporary files."""


def interleaves(home: Path, devices: Sequence[str], isolation: str) -> bool:
    """Whether a pool of these devices times models together in interleaved rounds: not
    with a fresh agent process per model (isolation "process": one model per process), nor
    with a phone timed by a native tool (onnxruntime_perf_test, benchmark_model, ...)."""
    return isolation != "process" and not any(times_one_model_at_a_time(name, home)
                                              for name in devices)


class LocalPool:
    """One device, or every registered device of a kind, reached from this host."""

    def __init__(self, home: Path, device: str, isolation: str = "worker",
                 max_strikes: int = 3, quarantine_s: float = 60.0,
                 client_factory: Callable[[str, Path, str], DeviceClient] = open_client):
        self.name = device
        self.home = Path(home)
        self.isolation = isolation
        self.devices = (devices_of_kind(self.home, device[len("kind:"):])
                        if device.startswith("kind:") else [device])
        self.health = DeviceHealth(self.devices, max_strikes=max_strikes,
                                   quarantine_s=quarantine_s)
        self.interleaves = interleaves(self.home, self.devices, isolation)
        self._client_factory = client_factory
        self._clients: Dict[str, DeviceClient] = {}
        self._clients_lock = threading.Lock()
        self._busy: Set[str] = set()  # devices this pool's jobs hold or are leasing now
        self._freed = threading.Condition()  # one of them came free
        self._staging = StagingFolder(self.home)

    def client(self, device: str) -> DeviceClient:
        """The open client of one device of the pool (opened on first use)."""
        with self._clients_lock:
            if device not in self._clients:
                self._clients[device] = self._client_factory(device, self.home, self.isolation)
            return self._clients[device]

    def busy(self) -> Set[str]:
        """The devices measuring for this pool now (a farm host's status shows them)."""
        with self._freed:
            return set(self._busy)

    def identify(self, timeout_s: float) -> DeviceIdentity:
        errors: List[Exception] = []
        for name in self.health.available() or self.devices:
            try:
                with DeviceLease(self.home, name) as lease:
                    client = self.client(name)
                    facts = client.facts(deadline=lease.deadline(timeout_s))
                return DeviceIdentity(facts, client.agent_version)
            except FAILOVER_ERRORS as exc:
                self.health.strike(name, exc)
                errors.append(exc)
                if len(self.devices) == 1:
                    raise
        raise errors[-1]

    def measure(self, exported: ExportedModel, request: MeasureRequest) -> AgentResult:
        return self._failing_over(lambda lease: self._measure_leased(lease, exported, request))

    def measure_rounds(self, models: Sequence[ExportedModel], reference: ExportedModel,
                       request: MeasureRequest) -> Dict[str, Union[AgentResult, Exception]]:
        """Time `models` together in interleaved rounds beside `reference` on one free device
        (agents.ort_agent.measure_rounds): {graph hash: its result or its own error}. A lost
        device's window is discarded whole and measured again on another device."""
        return self._failing_over(lambda lease: self._rounds_leased(lease, models, reference,
                                                                   request))

    def _failing_over(self, work: Callable[[DeviceLease], T]) -> T:
        """`work` under the lease of a free device, failing over to another when one is
        lost; DeviceLost when none is left."""
        tried: List[str] = []
        while True:
            candidates = [d for d in self.health.available() if d not in tried]
            if not candidates:
                raise DeviceLost(f"no device of {self.name} is available: "
                                 f"{', '.join(tried) or 'all'} failed or quarantined",
                                 fix="check the devices ('harness devices check NAME')")
            lease = self._lease_one(candidates)
            try:
                with lease:
                    return work(lease)
            except FAILOVER_ERRORS as exc:
                tried.append(lease.device)
                if len(tried) >= len(self.devices):
                    raise
                log.warning("%s failed (%s); failing over", lease.device, exc.message)

    def measure_many(self, jobs: Iterable[Tuple[Tag, ExportedModel]],
                     request: MeasureRequest) -> Iterator[PoolOutcome[Tag]]:
        if self.devices == ["local"]:  # the host is the device: export and measure take turns
            for tag, exported in jobs:
                try:
                    yield PoolOutcome(tag, exported, result=self.measure(exported, request))
                except Exception as exc:
                    yield PoolOutcome(tag, exported, error=exc)
            return
        yield from _JobBoard(self, jobs, request).run()

    def close(self) -> None:
        with self._clients_lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
        self._staging.cleanup()

    # ------------------------------------------------------------ one leased measurement

    def _measure_leased(self, lease: DeviceLease, exported: ExportedModel,
                        request: MeasureRequest) -> AgentResult:
        """One model on the leased device (unless it was answered meanwhile)."""

        def work(client: DeviceClient, deadline: float, paths: List[Path]) -> AgentResult:
            if request.still_needed is not None and not request.still_needed(exported.graph_hash):
                raise AnsweredMeanwhile(exported.graph_hash)
            return client.measure(str(paths[0]), request.settings, deadline=deadline,
                                  sha256=exported.sha256)

        result, window = self._leased(lease, [exported], request, work)
        return replace(result, lease=window)

    def _rounds_leased(self, lease: DeviceLease, models: Sequence[ExportedModel],
                       reference: ExportedModel, request: MeasureRequest
                       ) -> Dict[str, Union[AgentResult, Exception]]:
        """A window of interleaved rounds on the leased device."""

        def work(client: DeviceClient, deadline: float, paths: List[Path]
                 ) -> Dict[str, Union[AgentResult, Exception]]:
            named = {m.graph_hash: (str(path), m.sha256) for m, path in zip(models, paths)}
            results, errors = client.measure_rounds(named, (str(paths[-1]), reference.sha256),
                                                    request.settings, deadline)
            return {**results, **errors}

        answers, window = self._leased(lease, [*models, reference], request, work)
        return {graph: replace(answer, lease=window) if isinstance(answer, AgentResult)
                else answer for graph, answer in answers.items()}

    def _leased(self, lease: DeviceLease, exported: Sequence[ExportedModel],
                request: MeasureRequest,
                work: Callable[[DeviceClient, float, List[Path]], W]) -> Tuple[W, Tuple[float, float]]:
        """`work` on the leased device's client with the models staged as files, and the
        wall-clock window it took; the lease is released before this pool's waiting jobs are
        told the device is free. Strikes and clears the device's health."""
        name = lease.device
        paths = [self._staging.path / f"{e.sha256}.{threading.get_ident()}{e.suffix}"
                 for e in exported]
        with self._freed:
            self._busy.add(name)
        try:
            for model, path in zip(exported, paths):
                path.write_bytes(model.onnx_bytes)
            leased_at = time.time()
            result = work(self.client(name), lease.deadline(request.timeout_s), paths)
            self.health.ok(name)
            return result, (leased_at, time.time())
        except FAILOVER_ERRORS as exc:
            self.health.strike(name, exc)
            raise
        finally:
            lease.release()
            with self._freed:
                self._busy.discard(name)
                self._freed.notify_all()
            for path in paths:
                path.unlink(missing_ok=True)

    def _lease_one(self, candidates: List[str]) -> DeviceLease:
        """A held lease on one of `candidates`. This pool's own jobs take turns without
        polling: a job waits until a candidate is not held by another of them, reserves the
        free ones while it tries their leases, and keeps the first it gets. Only leases held
        by other processes are polled. DeviceBusy after LEASE_WAIT_S."""
        started = time.monotonic()
        while True:
            with self._freed:
                while all(device in self._busy for device in candidates):
                    if time.monotonic() - started >= LEASE_WAIT_S:
                        raise DeviceBusy(f"every device of {self.name} stayed busy for "
                                         f"{LEASE_WAIT_S:.0f} s")
                    self._freed.wait(timeout=1.0)
                free = [device for device in candidates if device not in self._busy]
                self._busy.update(free)  # reserved while this job tries them
            lease = None
            try:
                lease = next((held for held in (try_lease(self.home, d) for d in free)
                              if held is not None), None)
            finally:  # a lease file that cannot be opened must not keep the others reserved
                with self._freed:
                    kept = lease.device if lease is not None else None
                    released = [device for device in free if device != kept]
                    self._busy.difference_update(released)
                    if released:
                        self._freed.notify_all()
            if lease is not None:
                return lease
            waited = time.monotonic() - started
            if waited >= LEASE_WAIT_S:
                raise DeviceBusy(f"every device of {self.name} stayed leased by other "
                                 f"processes for {waited:.0f} s",
                                 fix="wait for the other profiling runs to finish, or stop them")
            time.sleep(OTHERS_POLL_S)

    def measure_on(self, device: str, exported: ExportedModel,
                   request: MeasureRequest) -> AgentResult:
        """Measure on one named device of the pool (waiting for its lease)."""
        with DeviceLease(self.home, device) as lease:
            return self._measure_leased(lease, exported, request)


class _JobBoard(Generic[Tag]):
    """measure_many on a pool of several devices: one thread exports (consumes `jobs`) into a
    bounded board, one thread per device takes the first job it has not failed yet. A job a
    device fails with a device fault goes back on the board for another device; when every
    device has failed it, or every device is quarantined, the job fails."""

    def __init__(self, pool: LocalPool, jobs: Iterable[Tuple[Tag, ExportedModel]],
                 request: MeasureRequest):
        self.pool = pool
        self.jobs = jobs
        self.request = request
        self.capacity = 2 * len(pool.devices)
        self.changed = threading.Condition()
        self.board: Deque[Tuple[Tag, ExportedModel, List[str]]] = deque()
        self.feeding = True
        self.taken = 0  # jobs a device is working on
        self.outcomes: Deque[PoolOutcome[Tag]] = deque()
        self.feed_error: Optional[BaseException] = None

    def run(self) -> Iterator[PoolOutcome[Tag]]:
        threads = [threading.Thread(target=self._feed, name="harness-export", daemon=True)]
        threads += [threading.Thread(target=self._work, args=(device,), daemon=True,
                                     name=f"harness-{device}") for device in self.pool.devices]
        for thread in threads:
            thread.start()
        while True:
            with self.changed:
                while not self.outcomes and any(t.is_alive() for t in threads):
                    self.changed.wait(timeout=1.0)
                ready = list(self.outcomes)
                self.outcomes.clear()
            yield from ready
            if not ready and not any(t.is_alive() for t in threads):
                break
        if self.feed_error is not None:
            raise self.feed_error

    def _feed(self) -> None:
        try:
            for tag, exported in self.jobs:
                with self.changed:
                    while len(self.board) >= self.capacity:
                        self.changed.wait()
                    self.board.append((tag, exported, []))
                    self.changed.notify_all()
        except BaseException as exc:  # the caller sees it once the devices are done
            self.feed_error = exc
        finally:
            with self.changed:
                self.feeding = False
                self.changed.notify_all()

    def _next_job(self, device: str) -> Optional[Tuple[Tag, ExportedModel, List[str]]]:
        """The next job for `device`, waiting while there is none it may take; None at the end."""
        with self.changed:
            while True:
                if not self.feeding and not self.board and self.taken == 0:
                    return None
                available = self.pool.health.available()
                if not available:  # the whole pool is down: fail what waits
                    while self.board:
                        tag, exported, _ = self.board.popleft()
                        self.outcomes.append(PoolOutcome(tag, exported, error=DeviceLost(
                            f"every device of {self.pool.name} is quarantined")))
                    self.changed.notify_all()
                elif device in available:
                    for job in self.board:
                        if device not in job[2]:
                            self.board.remove(job)
                            self.taken += 1
                            self.changed.notify_all()
                            return job
                self.changed.wait(timeout=1.0)  # quarantine ends by time, not by a notice

    def _work(self, device: str) -> None:
        while True:
            job = self._next_job(device)
            if job is None:
                return
            tag, exported, tried = job
            outcome: Optional[PoolOutcome[Tag]] = None
            try:
                outcome = PoolOutcome(tag, exported, result=self.pool.measure_on(
                    device, exported, self.request))
            except FAILOVER_ERRORS as exc:
                tried = tried + [device]
                if len(set(tried)) >= len(self.pool.devices):
                    outcome = PoolOutcome(tag, exported, error=exc)
                else:
                    log.warning("%s failed (%s); the job goes to another device", device,
                                exc.message)
            except Exception as exc:  # the model's fault: no other device will do better
                outcome = PoolOutcome(tag, exported, error=exc)
            with self.changed:
                self.taken -= 1
                if outcome is None:
                    self.board.appendleft((tag, exported, tried))
                else:
                    self.outcomes.append(outcome)
                self.changed.notify_all()
