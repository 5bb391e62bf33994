"""The host side of our on-device agent: deploy it, talk to it, check what it says.

`AgentClient` works over any Transport. It puts the agent on the device under a name made of
its content hash (so it is sent again only when it changed), keeps one persistent worker per
device for a session (Python start-up and the onnxruntime import are paid once), and turns
every answer into either a typed value (DeviceFacts, AgentResult) or a typed DeviceError.
A worker that dies is restarted and the job retried once; a timeout kills the worker on the device and is not
retried, since it counts from the lease.
"""
import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Tuple

import agents
from agents.ort_agent import AGENT_VERSION, LAYOUT_ENV
from devices.agent_result import AgentResult, DeviceFacts
from devices.folder_usage import remember
from devices.line_channel import file_sha256
from devices.errors import (AgentProtocolError, DeviceError, DeviceLost, MeasurementTimeout,
                            TransferError, error_from_agent)
from devices.transport import RemoteProcess, Transport

log = logging.getLogger(__name__)

AGENT_SOURCE = Path(agents.__file__).with_name("ort_agent.py")
ISOLATION_MODES = ("worker", "process")
MIN_PYTHON = (3, 8)  # the oldest Python agents/ort_agent.py is written for

# One line every Python runs (2.7 too): its version, and whether it is "externally managed"
# (PEP 668: Debian 12 and Ubuntu 23.04+ refuse 'pip install' into the system's Python).
PYTHON_PROBE = ("import os, sys, sysconfig; "
                "venv = sys.prefix != getattr(sys, 'base_prefix', sys.prefix); "
                "marker = os.path.join(sysconfig.get_path('stdlib'), 'EXTERNALLY-MANAGED'); "
                "print('%d.%d.%d %d' % (tuple(sys.version_info[:3]) "
                "+ (int(not venv and os.path.isfile(marker)),)))")


MODEL_SUFFIXES = (".onnx", ".tflite", ".pte")


def model_suffix(path: str) -> str:
    """The suffix a model keeps on the device (.tflite, .pte; else .onnx): the agent checks
    it against its content and the runtime."""
    suffix = os.path.splitext(str(path))[1].lower()
    return suffix if suffix in MODEL_SUFFIXES else ".onnx"


@dataclass(frozen=True)
class PythonFacts:
    """What the device's Python says of itself before the agent runs."""

    version: Tuple[int, int, int]
    externally_managed: bool  # pip refuses to install into it (use apt, or a venv)

    @property
    def text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def too_old(self) -> bool:
        return self.version[:2] < MIN_PYTHON

    def too_old_fix(self, python: str) -> str:
        return (f"'{python}' on the device is Python {self.text}, older than the agent's "
                f"minimum {'.'.join(map(str, MIN_PYTHON))}: install a newer Python there "
                f"(Debian/Ubuntu: apt install python3) and register it with --python")


def probe_python(transport: Transport, timeout: float) -> Optional[PythonFacts]:
    """The device's Python as a one-line probe finds it; None when it does not answer so
    (not a Python, or the device is gone)."""
    try:
        code, out, _ = transport.run(list(transport.python) + ["-c", PYTHON_PROBE], timeout)
    except DeviceError:
        return None
    words = out.strip().splitlines()[-1].split() if code == 0 and out.strip() else []
    if len(words) != 2 or not all(w.replace(".", "").isdigit() for w in words):
        return None
    major, minor, micro = (int(part) for part in words[0].split(".")[:3])
    return PythonFacts((major, minor, micro), words[1] == "1")


class DeviceClient(Protocol):
    """What measures on one device: our agent (AgentClient) or a native tool behind the same
    calls (devices.perf_tool_client.PerfTestClient). Deadlines are time.monotonic() values."""

    agent_version: str

    @property
    def device(self) -> str:
        """The device's name."""

    def facts(self, deadline: float) -> DeviceFacts:
        """Who the device is and its state now."""

    def measure(self, model_path: str, settings: Mapping[str, Any], deadline: float,
                sha256: Optional[str] = None) -> AgentResult:
        """Put the model on the device and time it there."""

    def measure_rounds(self, models: Mapping[str, Tuple[str, str]], reference: Tuple[str, str],
                       settings: Mapping[str, Any], deadline: float
                       ) -> Tuple[Dict[str, AgentResult], Dict[str, DeviceError]]:
        """Time models ({name: (path, sha256)}) together in interleaved rounds beside the
        reference (path, sha256): each one's result, and each one's own error."""

    def close(self) -> None:
        """Stop what runs on the device for us and release the connection."""




# exit codes that say the connection, not the agent, ended (paramiko's channel closed
# without a status; ssh's own failure)
TRANSPORT_LOST = (-1, 255)


class AgentClient:
    """Runs the agent on one device. `isolation="worker"` keeps one agent process open for the
    session; `"process"` starts a fresh one per request, so a crash cannot affect the next."""

    def __init__(self, transport: Transport, isolation: str = "worker",
                 models_limit_bytes: Optional[int] = None, folder_file: Optional[Path] = None):
        if isolation not in ISOLATION_MODES:
            raise ValueError(f"isolation must be one of {ISOLATION_MODES}, got {isolation!r}")
        self.transport = transport
        self.isolation = isolation
        # the device's model folder is kept within this (least recently used models out,
        # by the agent before each measurement); None: unbounded
        self.models_limit_bytes = models_limit_bytes
        # where the host remembers the folder's size each answer reports (None: nowhere)
        self.folder_file = folder_file
        self.agent_version = AGENT_VERSION
        self._agent_path: Optional[str] = None
        self._worker: Optional[RemoteProcess] = None
        self._next_id = 0
        self._facts: Optional[Dict[str, Any]] = None
        # set once a worker quit before its greeting: the agent's fixed address layout
        # (agents.ort_agent.fix_address_layout) may be what it could not start under, so
        # the next worker keeps the randomization; kept for the session if that one greets
        # (their measurements say "randomized"), taken back if it quits too (another cause)
        self.layout_randomized = False
        self._layout_on_trial = False

    @property
    def device(self) -> str:
        return self.transport.name

    @property
    def worker_pid(self) -> Optional[int]:
        """The pid of the running worker on the device, if one is running."""
        return self._worker.pid if self._worker is not None else None

    # ------------------------------------------------------------ public operations

    def facts(self, deadline: float) -> DeviceFacts:
        """The device's identity and state, from the agent plus what the transport knows."""
        answer = self._call({"op": "fingerprint"}, deadline)
        return DeviceFacts.parse(answer, self.device, self._transport_facts())

    def measure(self, model_path: str, settings: Mapping[str, Any], deadline: float,
                sha256: Optional[str] = None) -> AgentResult:
        """Put the model on the device (by content hash) and time it there; the agent's
        answer, checked; a DeviceError subclass on any failure. `sha256` spares hashing the
        file again when the caller knows it."""
        sha = sha256 or file_sha256(model_path)
        remote = self._put(model_path, f"models/{sha}{model_suffix(model_path)}", force=False)
        control = self.transport.control
        request = {"op": "measure", "model": remote, "sha256": sha, "settings": dict(settings),
                   "lock": control.lock_path,
                   "lock_wait_s": max(deadline - time.monotonic() - 1.0, 0.0),
                   "models_limit_bytes": self.models_limit_bytes}
        prepared = control.prepare(deadline)  # phones: wait to cool, thermal zones before
        try:
            answer = self._call(request, deadline)
        except TransferError as exc:
            log.warning("%s: %s; sending the model again", self.device, exc.message)
            self._put(model_path, f"models/{sha}{model_suffix(model_path)}", force=True)
            answer = self._call(request, deadline)
        result = AgentResult.parse(answer, self.device, AGENT_VERSION, self._transport_facts())
        self._remember_folder(answer.get("model_folder"))
        report = control.finish(prepared)
        return result if report is None else dataclasses.replace(result, control=report)

    def measure_rounds(self, models: Mapping[str, Tuple[str, str]], reference: Tuple[str, str],
                       settings: Mapping[str, Any], deadline: float
                       ) -> Tuple[Dict[str, AgentResult], Dict[str, DeviceError]]:
        """Put every model ({name: (path, sha256)}) and the reference on the device and time
        them there in interleaved rounds (agents.ort_agent.measure_rounds): each model's
        result, and each model's own error (a model that failed to load or run). A failure
        of the reference or of the device is raised: no result of the window is kept."""
        files = dict(models, reference=reference)  # sent by content hash, once

        def request_with(force: bool) -> Dict[str, Any]:
            remote = {name: {"model": self._put(path, f"models/{sha}{model_suffix(path)}",
                                                force=force),
                             "sha256": sha} for name, (path, sha) in files.items()}
            return {"op": "rounds", "reference": remote.pop("reference"), "models": remote,
                    "settings": dict(settings), "lock": control.lock_path,
                    "lock_wait_s": max(deadline - time.monotonic() - 1.0, 0.0),
                    "models_limit_bytes": self.models_limit_bytes}

        control = self.transport.control
        prepared = control.prepare(deadline)
        try:  # an error of the window is raised by _call
            answer = self._call(request_with(force=False), deadline)
        except TransferError as exc:  # a damaged copy on the device (of the reference too)
            log.warning("%s: %s; sending the window's models again", self.device, exc.message)
            answer = self._call(request_with(force=True), deadline)
        results, errors = answer.get("results"), answer.get("errors")
        if not isinstance(results, dict) or not isinstance(errors, dict) or \
                set(results) | set(errors) != set(models):
            raise AgentProtocolError("the agent's rounds answer does not account for every "
                                     "model it was sent", device=self.device)
        self._remember_folder(answer.get("model_folder"))
        report = control.finish(prepared)
        parsed = {}
        for name, result in results.items():
            if not isinstance(result, dict):
                raise AgentProtocolError(f"the rounds result of {name} is not an object",
                                         device=self.device)
            one = AgentResult.parse(result, self.device, AGENT_VERSION, self._transport_facts())
            if one.rounds is None:
                raise AgentProtocolError(f"the rounds result of {name} has no rounds",
                                         device=self.device)
            parsed[name] = one if report is None else dataclasses.replace(one, control=report)
        return parsed, {name: error_from_agent(error, self.device)
                        for name, error in errors.items()}

    def model_folder(self, deadline: float, limit_bytes: Optional[int] = None) -> Dict[str, int]:
        """The device's model folder: {"bytes", "models", "removed", "removed_bytes"}, least
        recently used models removed first while it holds more than `limit_bytes` (None:
        nothing removed), as `harness cache prune` asks."""
        answer = self._call({"op": "models", "folder": "models", "limit_bytes": limit_bytes},
                            deadline)
        self._remember_folder(answer)
        return {key: int(answer.get(key, 0)) for key in ("bytes", "models", "removed",
                                                         "removed_bytes")}

    def _remember_folder(self, usage: object) -> None:
        """Keep the model folder's size an answer reported, for `devices list`."""
        if self.folder_file is not None and isinstance(usage, dict):
            remember(self.folder_file, usage)

    def close(self) -> None:
        """Stop the worker (politely, then by force) and close the transport."""
        if self._worker is not None:
            try:
                self._worker.write_line(json.dumps({"op": "exit"}))
                self._worker.read_line(timeout=2.0)
            except DeviceError:
                pass
            self._worker.kill()
            self._worker = None
        self.transport.close()

    # ------------------------------------------------------------ plumbing

    def _put(self, local_path: str, remote_name: str, force: bool) -> str:
        return self.transport.put(local_path, remote_name, force=force)

    def _transport_facts(self) -> Dict[str, Any]:
        """What the transport knows of the device (getprop on phones), asked once a session:
        on a phone each fact is an adb round trip, and none changes while it is attached."""
        if self._facts is None:
            self._facts = dict(self.transport.fingerprint())
        return self._facts

    def _python(self) -> List[str]:
        """The device's Python, behind the transport's prefix (phones: taskset to big cores)."""
        return self.transport.control.command_prefix + self.transport.python

    def _agent(self) -> str:
        if self._agent_path is None:
            digest = file_sha256(str(AGENT_SOURCE))[:16]
            self._agent_path = self._put(str(AGENT_SOURCE), f"agent/ort_agent-{digest}.py",
                                         force=False)
        return self._agent_path

    def _call(self, request: Mapping[str, Any], deadline: float) -> Dict[str, Any]:
        """One request; a worker or process that dies is restarted and the request retried once."""
        for attempt in (1, 2):
            started = self._agent_path is not None  # the device was reached before
            try:
                if self.isolation == "worker":
                    answer = self._worker_call(request, deadline)
                else:
                    answer = self._process_call(request, deadline)
                break
            except DeviceLost as exc:
                if attempt == 2:
                    raise
                if started:
                    log.warning("%s: %s; starting the agent again and retrying once",
                                self.device, exc.message)
                else:  # never reached: nothing was running; the error says it if this fails
                    log.info("%s: %s; trying once more", self.device, exc.message)
        if "error" in answer:
            raise error_from_agent(answer["error"], device=self.device)
        return answer

    def _runtime_fix(self, deadline: float) -> str:
        """What to do when the agent cannot start: a Python below MIN_PYTHON is named."""
        python = " ".join(self.transport.python)
        facts = probe_python(self.transport, min(max(deadline - time.monotonic(), 1.0), 10.0))
        if facts is not None and facts.too_old:
            return facts.too_old_fix(python)
        return self.transport.control.missing_runtime_fix or (
            f"check that '{python}' on the device is Python "
            f"{'.'.join(map(str, MIN_PYTHON))}+ with numpy and onnxruntime")

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise MeasurementTimeout("the time allowed since the device was leased ran out "
                                     "before the agent was asked", device=self.device)
        return remaining

    def _start_worker(self, deadline: float) -> RemoteProcess:
        argv = self._python() + ["-u", self._agent(), "worker"]
        if self.layout_randomized:
            argv = ["env", f"{LAYOUT_ENV}=randomized"] + argv
        worker = self.transport.spawn(argv)
        try:
            hello = self._parse(worker.read_line(self._remaining(deadline)), worker)
        except DeviceLost as exc:
            code = worker.exit_code()
            ended = code is not None  # it ran and quit: the device is there
            worker.kill()
            stderr = worker.stderr_tail()[-1500:]
            if self._layout_on_trial:  # quit with the randomization too: not the layout
                self.layout_randomized = self._layout_on_trial = False
            elif ended and code not in TRANSPORT_LOST and not self.layout_randomized:
                self.layout_randomized = self._layout_on_trial = True  # for _call's retry
                log.warning("%s: the agent quit before its greeting (exit code %s, stderr: "
                            "%r); the next worker keeps address space randomization "
                            "(%s=randomized), in case the fixed layout is what it could not "
                            "start under", self.device, code, stderr, LAYOUT_ENV)
            raise DeviceLost(f"the agent did not start: {exc.message}; stderr: {stderr!r}",
                             device=self.device,
                             fix=self._runtime_fix(deadline) if ended else None) from None
        except DeviceError:
            worker.kill()
            raise
        if hello.get("ready") is not True or hello.get("agent_version") != AGENT_VERSION:
            worker.kill()
            raise AgentProtocolError(f"agent greeting was {str(hello)[:300]}, expected "
                                     f"ready with agent_version {AGENT_VERSION}",
                                     device=self.device)
        if self._layout_on_trial:
            self._layout_on_trial = False
            log.warning("%s: the agent started with address space randomization kept; so "
                        "do its later workers this session", self.device)
        log.debug("%s: agent worker %s started", self.device, worker.pid)
        return worker

    def _worker_call(self, request: Mapping[str, Any], deadline: float) -> Dict[str, Any]:
        if self._worker is None or self._worker.exit_code() is not None:
            if self._worker is not None:
                self._worker.kill()
            self._worker = self._start_worker(deadline)
        worker = self._worker
        self._next_id += 1
        request = dict(request, id=self._next_id)
        try:
            worker.write_line(json.dumps(request))
            answer = self._parse(worker.read_line(self._remaining(deadline)), worker)
        except DeviceError as exc:
            # Whatever went wrong, this worker's state is unknown: kill it on the device.
            self._worker = None
            stderr = worker.stderr_tail()
            worker.kill()
            if isinstance(exc, DeviceLost) and stderr.strip():
                exc.message += f"; agent stderr: {stderr.strip()[-1500:]}"
            raise
        if answer.get("id") != self._next_id:
            self._worker = None
            worker.kill()
            raise AgentProtocolError(f"agent answered request {answer.get('id')!r}, expected "
                                     f"{self._next_id}", device=self.device)
        return answer

    def _process_call(self, request: Mapping[str, Any], deadline: float) -> Dict[str, Any]:
        argv: List[str] = self._python() + [self._agent()]
        if request["op"] == "fingerprint":
            argv += ["fingerprint"]
        elif request["op"] == "models":
            argv += ["models", "--folder", str(request["folder"])]
            if request.get("limit_bytes") is not None:
                argv += ["--limit-bytes", str(int(request["limit_bytes"]))]
        else:
            argv += ["measure", "--model", str(request["model"]), "--sha256",
                     str(request["sha256"]), "--settings", json.dumps(request["settings"])]
            if request.get("lock"):
                argv += ["--lock", str(request["lock"])]
            if request.get("models_limit_bytes") is not None:
                argv += ["--models-limit-bytes", str(int(request["models_limit_bytes"]))]
        code, out, err = self.transport.run(argv, timeout=self._remaining(deadline))
        lines = [line for line in out.splitlines() if line.strip()]
        if not lines:
            if code in (126, 127):  # the shell could not find or execute the Python
                raise DeviceLost(f"cannot run '{' '.join(self.transport.python)}' on the "
                                 f"device: {err.strip()[-500:]!r}", device=self.device,
                                 fix=self.transport.control.missing_runtime_fix)
            if code < 0 or code > 128:
                raise DeviceLost(f"the agent died with exit code {code}; stderr: "
                                 f"{err.strip()[-1500:]!r}", device=self.device)
            raise AgentProtocolError(f"the agent printed nothing (exit code {code}); stderr: "
                                     f"{err.strip()[-1500:]!r}", device=self.device,
                                     fix=self._runtime_fix(deadline) if code else None)
        return self._parse(lines[-1], None, stderr=err)

    def _parse(self, line: str, worker: Optional[RemoteProcess],
               stderr: Optional[str] = None) -> Dict[str, Any]:
        try:
            answer = json.loads(line)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            if stderr is None and worker is not None:
                stderr = worker.stderr_tail()
            raise AgentProtocolError(f"the agent printed {line[:300]!r} instead of a JSON "
                                     f"object; stderr: {(stderr or '').strip()[-800:]!r}",
                                     device=self.device)
        return answer
