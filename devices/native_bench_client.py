"""Phones without Python, on LiteRT or ExecuTorch: drive the runtime's own benchmark binary.

Like devices.perf_tool_client does for onnxruntime_perf_test, the user gives the host path of
a build of the tool; harness pushes it once (by content hash), runs it on the model it sent,
and parses what it prints into the same typed result our agent gives. Two tools:

- LiteRT's `benchmark_model` (tensorflow/lite/tools/benchmark): `--graph`, `--num_threads`,
  `--warmup_runs`, `--num_runs`, `--min_secs`, `--use_xnnpack`. It prints aggregates only:
  "count=N first=F curr=C min=A max=B avg=M std=S" (microseconds) per phase, the benchmark
  phase last (older builds: "Timings (microseconds): count=..."), then "Inference timings
  in us: Init: I, First inference: F, Warmup (avg): W, Inference (avg): M" (older: "Average
  inference timings in us: Warmup: W, Init: I, Inference: M"). It has no per-run output, so
  harness runs it once per sample with one timed run (`--num_runs=1 --min_secs=0`) after
  the warm-up: every sample is a real run, each in a process of its own (the load is paid
  per sample, outside the timed run).
- ExecuTorch's `executor_runner` (examples/portable/executor_runner): `--model_path`,
  `--num_executions`, `--cpu_threads`. Its log gives "Model loaded in L ms.", one
  "Iteration i of N: T ms" per execution and "Model executed successfully N time(s) in T ms.".
  It has no warm-up: harness runs warmup_runs + min_runs executions and drops the first
  warmup_runs (the first is the cold run).

What such a tool does not let harness control is said in the result (`controlled`): the
input values (benchmark_model's random generator; executor_runner feeds ones), the stop
rule (a fixed count), per-operator profiles, memory watching, and interleaved rounds.
A count that disagrees with the summary means the output was cut short: an error, never a
measurement.
"""
import re
import time
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Tuple

from devices.agent_result import AgentResult, is_ms
from devices.errors import (AgentProtocolError, BadRequest, InferenceError,
                            LoadError)
from devices.line_channel import file_sha256
from devices.perf_tool_client import NativeToolClient
from devices.transport import Transport

TOOLS = ("benchmark-model", "executor-runner")
RUNTIME_OF_TOOL = {"benchmark-model": "litert", "executor-runner": "executorch"}
SUFFIX_OF_TOOL = {"benchmark-model": ".tflite", "executor-runner": ".pte"}
_NUMBER = r"([-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_STATS = re.compile(r"count=(\d+)\s+first=" + _NUMBER + r"\s+curr=" + _NUMBER + r"\s+min="
                    + _NUMBER + r"\s+max=" + _NUMBER + r"\s+avg=" + _NUMBER + r"\s+std="
                    + _NUMBER)


@dataclass(frozen=True)
class BenchmarkModelRun:
    """What one benchmark_model invocation printed, in ms: its benchmark phase's count and
    statistics, its init time and first inference where it printed them."""

    count: int
    avg_ms: float
    min_ms: float
    max_ms: float
    first_ms: float
    std_ms: float
    init_ms: Optional[float]
    first_inference_ms: Optional[float]


def _field(text: str, label: str) -> Optional[float]:
    match = re.search(re.escape(label) + r"\s*:?\s*" + _NUMBER, text)
    return float(match.group(1)) if match else None


def parse_benchmark_model(stdout: str) -> BenchmarkModelRun:
    """The benchmark phase (the last statistics line) of one benchmark_model run, in ms;
    AgentProtocolError when the output has none (cut short, or another tool)."""
    phases = _STATS.findall(stdout)
    summary = re.search(r"(Average )?[Ii]nference timings in us", stdout)
    if not phases or summary is None:
        raise AgentProtocolError("benchmark_model printed no 'count=... avg=... std=...' "
                                 "statistics and 'Inference timings in us' summary: its "
                                 f"output is truncated; it ends with "
                                 f"{stdout[-300:]!r}")
    count, first, _, low, high, avg, std = phases[-1]  # the benchmark phase comes last
    values = [float(v) / 1e3 for v in (avg, low, high, first, std)]
    rounding = 0.001  # the tool prints whole microseconds, its mean to a tenth
    if int(count) < 1 or not all(is_ms(v) for v in values[:4]) or \
            not values[1] - rounding <= values[0] <= values[2] + rounding:
        raise AgentProtocolError(f"benchmark_model's statistics are impossible: "
                                 f"{' '.join(phases[-1])!r}")
    init = _field(stdout, "Init")
    first_inference = _field(stdout, "First inference")
    return BenchmarkModelRun(int(count), values[0], values[1], values[2], values[3], values[4],
                             init / 1e3 if init is not None else None,
                             first_inference / 1e3 if first_inference is not None else None)


@dataclass(frozen=True)
class ExecutorRunnerRun:
    """What one executor_runner invocation logged, in ms: the load and every execution."""

    load_ms: Optional[float]
    iterations_ms: Tuple[float, ...]
    total_ms: float


def parse_executor_runner(log: str) -> ExecutorRunnerRun:
    """Every 'Iteration i of N: T ms' of one executor_runner run, checked against its
    'Model executed successfully N time(s) in T ms.'; AgentProtocolError when they disagree
    or the summary is missing (the output was cut short)."""
    summary = re.search(r"Model executed successfully (\d+) time\(s\) in " + _NUMBER + " ms",
                        log)
    if summary is None:
        raise AgentProtocolError("executor_runner logged no 'Model executed successfully N "
                                 f"time(s) in T ms': its output is truncated; it ends with "
                                 f"{log[-300:]!r}")
    count, total = int(summary.group(1)), float(summary.group(2))
    iterations: List[float] = []
    for index, of, ms in re.findall(r"Iteration (\d+) of (\d+): " + _NUMBER + " ms", log):
        if int(index) != len(iterations) + 1 or int(of) != count:
            raise AgentProtocolError(f"executor_runner logged iteration {index} of {of} where "
                                     f"{len(iterations) + 1} of {count} was due: its log is "
                                     f"damaged")
        iterations.append(float(ms))
    if len(iterations) != count or not all(is_ms(ms) for ms in iterations):
        raise AgentProtocolError(f"executor_runner says {count} executions but logged "
                                 f"{len(iterations)} iteration times: its output is truncated")
    if abs(sum(iterations) - total) > max(0.01 * total, 0.01):
        raise AgentProtocolError(f"executor_runner's iterations add up to {sum(iterations):.3f} "
                                 f"ms, not the {total:.3f} ms it reports")
    load = re.search(r"Model loaded in " + _NUMBER + " ms", log)
    return ExecutorRunnerRun(float(load.group(1)) if load else None, tuple(iterations), total)


NOT_CONTROLLED = {
    "benchmark-model": ["input values (the tool's own random generator)",
                        "stop rule (one run per invocation, min_runs invocations)",
                        "per-operator profile", "memory watch", "interleaved rounds",
                        "CPU affinity (the device's taskset prefix only)"],
    "executor-runner": ["input values (the tool feeds ones)", "warm-up (first runs dropped)",
                        "stop rule (a fixed count)", "per-operator profile", "memory watch",
                        "interleaved rounds", "CPU affinity (the device's taskset prefix only)"],
}


class NativeBenchClient(NativeToolClient):
    """Measures with LiteRT's benchmark_model or ExecuTorch's executor_runner on a device;
    the interface of AgentClient."""

    def __init__(self, transport: Transport, binary: str, tool: str):
        if tool not in TOOLS:
            raise BadRequest(f"unknown benchmark tool {tool!r}", fix=f"one of {', '.join(TOOLS)}")
        super().__init__(transport, binary, tool, tool, "tool_sha256")

    def _check(self, settings: Mapping[str, Any], model_path: str) -> None:
        runtime = RUNTIME_OF_TOOL[self.tool]
        if settings.get("runtime", "onnxruntime") != runtime:
            raise BadRequest(f"{self.device} measures with {self.tool}, which runs {runtime} "
                             f"models, not {settings.get('runtime', 'onnxruntime')}",
                             fix=f"profile with --runtime {runtime}", device=self.device)
        if not model_path.endswith(SUFFIX_OF_TOOL[self.tool]):
            raise BadRequest(f"{self.tool} loads {SUFFIX_OF_TOOL[self.tool]} models, not "
                             f"{model_path}", device=self.device)
        if settings.get("per_op"):
            raise BadRequest(f"{self.device} measures with {self.tool}, without a "
                             f"per-operator profile", device=self.device,
                             fix="measure without --ops")

    def _invoke(self, argv: List[str], deadline: float) -> str:
        code, out, err = self.transport.run(self.transport.control.command_prefix + argv,
                                            timeout=max(deadline - time.monotonic(), 0.001))
        text = out + "\n" + err
        if code != 0:
            tail = text.strip()[-1500:]
            if re.search(r"load|flatbuffer|invalid|not a valid|magic|Failed to (open|read)",
                         tail, re.IGNORECASE):
                raise LoadError(f"{self.tool} cannot load the model: {tail}", device=self.device)
            raise InferenceError(f"{self.tool} failed (exit code {code}): {tail}",
                                 device=self.device)
        return text

    def measure(self, model_path: str, settings: Mapping[str, Any], deadline: float,
                sha256: Optional[str] = None) -> AgentResult:
        self._check(settings, model_path)
        sha = sha256 or file_sha256(model_path)
        if self._remote_binary is None:
            remote = self.transport.put(self.binary, f"bin/{self.tool}-{self._binary_sha[:16]}")
            self.transport.run(["chmod", "755", remote], timeout=30.0)  # a push keeps no mode
            self._remote_binary = remote
        remote_model = self.transport.put(model_path,
                                          f"models/{sha}{SUFFIX_OF_TOOL[self.tool]}")
        control = self.transport.control
        prepared = control.prepare(deadline)
        threads = int(settings.get("intra_op_threads", 1))
        warmup, runs = int(settings.get("warmup_runs", 10)), int(settings.get("min_runs", 50))
        started = time.monotonic()
        if self.tool == "benchmark-model":
            samples, load_ms, first_ms, note = self._benchmark_model(
                remote_model, threads, warmup, runs, settings, deadline)
        else:
            samples, load_ms, first_ms, note = self._executor_runner(
                remote_model, threads, warmup, runs, deadline)
        loop_ms = (time.monotonic() - started) * 1e3
        report = control.finish(prepared)
        runtime = RUNTIME_OF_TOOL[self.tool]
        return AgentResult(
            samples_ms=tuple(samples), load_ms=load_ms, first_run_ms=first_ms, loop_ms=loop_ms,
            agent_version=self.agent_version, settings=dict(settings, loop=note),
            runtime={"name": runtime, "tool": self.tool, "sha256": self._binary_sha,
                     "backend": settings.get("backend") or "xnnpack"},
            facts=self.facts(deadline), device=self.device, warmup_runs=warmup,
            controlled={"affinity_mask": control.command_prefix[1:], "threads": threads,
                        "not_controlled": NOT_CONTROLLED[self.tool]},
            thermal_before=report.thermal_before if report else (),
            thermal_after=report.thermal_after if report else (), control=report,
            stop={"rule": "fixed", "reason": "fixed", "requested": settings.get("stop"),
                  "note": note})

    def _benchmark_model(self, model: str, threads: int, warmup: int, runs: int,
                         settings: Mapping[str, Any], deadline: float
                         ) -> Tuple[List[float], float, Optional[float], str]:
        """One invocation per sample, one timed run each (the tool prints aggregates only)."""
        assert self._remote_binary is not None
        xnnpack = "false" if settings.get("backend") == "cpu" else "true"
        samples: List[float] = []
        loads: List[float] = []
        first: Optional[float] = None
        for _ in range(runs):
            parsed = parse_benchmark_model(self._invoke(
                [self._remote_binary, f"--graph={model}", f"--num_threads={threads or -1}",
                 f"--warmup_runs={warmup}", "--num_runs=1", "--min_secs=0",
                 "--warmup_min_secs=0", f"--use_xnnpack={xnnpack}"], deadline))
            if parsed.count != 1:
                raise AgentProtocolError(f"benchmark_model ran {parsed.count} timed runs where "
                                         f"one was asked: its flags were not honoured",
                                         device=self.device)
            samples.append(parsed.avg_ms)
            if parsed.init_ms is not None:
                loads.append(parsed.init_ms)
            if first is None:
                first = parsed.first_inference_ms
        load = sorted(loads)[len(loads) // 2] if loads else 0.0
        return samples, load, first, ("benchmark_model --num_runs=1 per sample, "
                                      "one process per sample after --warmup_runs")

    def _executor_runner(self, model: str, threads: int, warmup: int, runs: int,
                         deadline: float) -> Tuple[List[float], float, Optional[float], str]:
        assert self._remote_binary is not None
        parsed = parse_executor_runner(self._invoke(
            [self._remote_binary, f"--model_path={model}", f"--num_executions={warmup + runs}",
             f"--cpu_threads={threads or -1}", "--print_output=none"], deadline))
        iterations = list(parsed.iterations_ms)
        return (iterations[warmup:], parsed.load_ms or 0.0, iterations[0],
                f"executor_runner --num_executions=warmup_runs+min_runs, the first "
                f"{warmup} dropped")
