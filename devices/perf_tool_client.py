"""Phones without Python: drive onnxruntime's own `onnxruntime_perf_test` instead of our agent.

The user supplies an Android build of the tool; harness pushes it once (by content hash),
runs it with random inputs (`-I`) and the profiler's thread and optimisation settings, and
parses what it prints into the same result our agent gives:

- stdout: "Session creation time cost: 0.0609 s", "First inference time cost: 12 ms" (newer
  builds), "Total inference requests: 50", "Average inference time cost: 16.9 ms",
  "Total inference run time: 0.85 s", "P50 Latency: 0.0168 s" and the like;
- the result file: one line per run, `model,seconds,peak_working_set,cpu_usage,run` (newer
  builds put the submission time first: `model,submit_s,total_s,peak,cpu,run`), then an
  optional blank line and statistics.

Every raw per-run time comes from the result file; a run count that disagrees with the
summary means the output was cut short, and is an error, never a measurement.

Every remote argument is a separate argv item, which the transport quotes: a working folder
with spaces or shell metacharacters names that folder and nothing else. The client needs no
more of the device than the Transport protocol and its DeviceControl.
"""
import posixpath
import re
import secrets
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from devices.line_channel import file_sha256
from devices.agent_result import AgentResult, DeviceFacts, is_ms
from devices.errors import (AgentProtocolError, BadRequest, DeviceError, InferenceError,
                            LoadError)
from devices.transport import Transport

OPT_LEVEL_FLAGS = {"disabled": "0", "basic": "1", "extended": "2", "all": "99"}
_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"


def _summary(stdout: str, label: str) -> Optional[float]:
    match = re.search(re.escape(label) + r"\s*(?:is)?\s*:?\s*" + _NUMBER, stdout)
    return float(match.group(1)) if match else None


def parse_perf_test(stdout: str, result_file: str) -> Dict[str, Any]:
    """Raw per-run times (ms) and the summary of one onnxruntime_perf_test run."""
    runs: List[float] = []
    for number, line in enumerate(result_file.splitlines(), 1):
        if not line.strip():
            break  # statistics follow a blank line
        fields = line.strip().split(",")
        if len(fields) not in (5, 6):
            raise AgentProtocolError(f"perf-test result line {number} has {len(fields)} fields "
                                     f"({line[:120]!r}); expected 5 or 6: the output is "
                                     f"truncated or of an unknown version")
        try:
            seconds = float(fields[1] if len(fields) == 5 else fields[2])
            index = int(fields[-1])
        except ValueError:
            raise AgentProtocolError(f"perf-test result line {number} is not numeric: "
                                     f"{line[:120]!r}") from None
        if index != len(runs):
            raise AgentProtocolError(f"perf-test result line {number} is run {index}, expected "
                                     f"{len(runs)}: the result file is damaged")
        if not is_ms(seconds * 1e3):
            raise AgentProtocolError(f"perf-test result line {number} has an impossible time: "
                                     f"{line[:120]!r}")
        runs.append(seconds * 1e3)
    requests = _summary(stdout, "Total inference requests")
    session_s = _summary(stdout, "Session creation time cost")
    if requests is None or session_s is None:
        raise AgentProtocolError("perf-test printed no summary ('Session creation time cost', "
                                 "'Total inference requests'): its output is truncated; "
                                 f"stdout ends with {stdout[-300:]!r}")
    if not runs or len(runs) != int(requests):
        raise AgentProtocolError(f"perf-test says {int(requests)} inference requests but its "
                                 f"result file holds {len(runs)} runs: the output is truncated")
    run_time_s = _summary(stdout, "Total inference run time")
    return {
        "samples_ms": runs,
        "load_ms": session_s * 1e3,
        "first_run_ms": _summary(stdout, "First inference time cost"),
        "loop_ms": run_time_s * 1e3 if run_time_s is not None else sum(runs),
        "average_ms": _summary(stdout, "Average inference time cost"),
        "peak_working_set_bytes": _summary(stdout, "Peak working set size"),
        "cpu_usage_percent": _summary(stdout, "Avg CPU usage"),
    }


def native_identity(transport: Transport, deadline: float, tool: Mapping[str, Any]
                    ) -> Dict[str, Any]:
    """What a device without Python says of itself through its shell (system, machine,
    kernel, CPU count and model), with `tool` (the native tool's name and file hash) and
    what the transport adds: the identity a native tool's measurements are keyed under."""
    _, out, _ = transport.run(
        ["sh", "-c", 'uname -s; uname -m; uname -r; grep -c ^processor /proc/cpuinfo; '
                     'grep -m1 -E "^(Hardware|model name)" /proc/cpuinfo | cut -d: -f2'],
        timeout=max(deadline - time.monotonic(), 1.0))
    lines = [line.strip() for line in out.splitlines()] + [""] * 5
    identity: Dict[str, Any] = {"system": lines[0], "machine": lines[1], "kernel": lines[2],
                                "cpu_count": int(lines[3]) if lines[3].isdigit() else None,
                                "cpu_model": lines[4] or None}
    identity.update(tool)
    identity.update(transport.fingerprint())
    return identity


class NativeToolClient:
    """What every client of a native benchmark tool on a device without Python shares
    (onnxruntime_perf_test here, LiteRT's and ExecuTorch's in devices.native_bench_client):
    the tool's binary and its hash (the agent version it reports), the device's identity
    through its shell (`native_identity`, with the tool's `identity` facts), no interleaved
    rounds (the tool times one model per invocation), and the transport to close."""

    def __init__(self, transport: Transport, binary: str, tool: str, version_prefix: str,
                 sha_key: str):
        self.transport, self.binary, self.tool = transport, binary, tool
        self._binary_sha = file_sha256(binary)
        self.agent_version = f"{version_prefix}-{self._binary_sha[:16]}"
        self._sha_key = sha_key  # the identity's name for the tool's hash
        self._remote_binary: Optional[str] = None
        self._identity: Optional[Dict[str, Any]] = None

    @property
    def device(self) -> str:
        return self.transport.name

    def facts(self, deadline: float) -> DeviceFacts:
        if self._identity is None:
            self._identity = native_identity(self.transport, deadline, {
                "runtime": self.tool, self._sha_key: self._binary_sha})
        return DeviceFacts(identity=self._identity, state={})

    def measure_rounds(self, models: Mapping[str, Tuple[str, str]], reference: Tuple[str, str],
                       settings: Mapping[str, Any], deadline: float
                       ) -> Tuple[Dict[str, AgentResult], Dict[str, DeviceError]]:
        """A native tool times one model per invocation: no interleaved rounds."""
        raise BadRequest(f"{self.device} is measured by {self.tool}, which times one model at "
                         "a time: it cannot run interleaved rounds", device=self.device,
                         fix="use protocol='loop' (the default) on this device")

    def close(self) -> None:
        self.transport.close()


class PerfTestClient(NativeToolClient):
    """Measures with onnxruntime_perf_test on a device; same interface as AgentClient."""

    def __init__(self, transport: Transport, binary: str):
        super().__init__(transport, binary, "onnxruntime_perf_test", "perf_test",
                         "perf_test_sha256")

    def measure(self, model_path: str, settings: Mapping[str, Any], deadline: float,
                sha256: Optional[str] = None) -> AgentResult:
        provider = settings.get("provider", "CPUExecutionProvider")
        if settings.get("per_op") or provider != "CPUExecutionProvider" \
                or settings.get("provider_options"):  # never measured as something else
            raise BadRequest(f"{self.device} measures with onnxruntime_perf_test on the CPU "
                             f"provider, without a per-operator profile",
                             fix="register the phone with --agent python (our agent) for "
                                 "--ops and --provider", device=self.device)
        sha = sha256 or file_sha256(model_path)
        if self._remote_binary is None:
            self._remote_binary = self.transport.put(
                self.binary, f"bin/onnxruntime_perf_test-{self._binary_sha[:16]}")
        remote_model = self.transport.put(model_path, f"models/{sha}.onnx")
        result_file = posixpath.join(posixpath.dirname(remote_model),
                                     f"result-{secrets.token_hex(6)}.csv")
        control = self.transport.control
        prepared = control.prepare(deadline)
        argv = control.command_prefix + [
            self._remote_binary, "-e", "cpu", "-m", "times", "-r", str(settings["min_runs"]),
            "-x", str(settings["intra_op_threads"]), "-y", str(settings["inter_op_threads"]),
            "-o", OPT_LEVEL_FLAGS[settings["graph_optimization_level"]], "-I",
            remote_model, result_file]
        code, out, err = self.transport.run(argv, timeout=max(deadline - time.monotonic(), 0.001))
        if code != 0:
            text = (out + "\n" + err).strip()[-1500:]
            if re.search(r"load|protobuf|invalid model|opset", text, re.IGNORECASE):
                raise LoadError(f"onnxruntime_perf_test cannot load the model: {text}",
                                device=self.device)
            raise InferenceError(f"onnxruntime_perf_test failed (exit code {code}): {text}",
                                 device=self.device)
        # The result file is an argument of its own ("$1"): the transport quotes it.
        code, csv, err = self.transport.run(["sh", "-c", 'cat -- "$1"; rm -f -- "$1"', "sh",
                                             result_file],
                                            timeout=max(deadline - time.monotonic(), 10.0))
        if code != 0:
            raise AgentProtocolError(f"cannot read perf-test's result file {result_file}: "
                                     f"{err.strip()[-300:]}", device=self.device)
        parsed = parse_perf_test(out, csv)
        report = control.finish(prepared)
        return AgentResult(
            samples_ms=tuple(parsed["samples_ms"]), load_ms=parsed["load_ms"],
            first_run_ms=parsed["first_run_ms"], loop_ms=parsed["loop_ms"],
            agent_version=self.agent_version,
            settings=dict(settings, loop="onnxruntime_perf_test -m times -r min_runs"),
            runtime={"name": "onnxruntime_perf_test", "sha256": self._binary_sha},
            facts=self.facts(deadline), device=self.device, warmup_runs=1,
            controlled={"affinity_mask": control.command_prefix[1:]},
            thermal_before=report.thermal_before if report else (),
            thermal_after=report.thermal_after if report else (), control=report,
            stop={"rule": "fixed", "reason": "fixed", "requested": settings.get("stop"),
                  "note": "onnxruntime_perf_test runs a fixed count of runs (min_runs)"})
