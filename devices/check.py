"""`harness devices check`: prove the whole data path to a device, not just the login.

Deploys the agent, asks for the fingerprint (Python, onnxruntime and numpy versions, CPU,
board) and times a tiny model there; every problem found comes with what to do about it.
"""
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from agents.ort_agent import RUNTIME_FACTS, RUNTIMES
from devices.agent_client import AgentClient, PythonFacts, probe_python
from devices.agent_result import hottest_zone_c, pinned_text
from devices.errors import DeviceError
from devices.native_bench_client import RUNTIME_OF_TOOL, SUFFIX_OF_TOOL, NativeBenchClient

CHECK_SETTINGS = {"warmup_runs": 2, "min_runs": 10, "min_time_ms": 20.0, "max_time_ms": 2000.0}


@dataclass
class CheckReport:
    device: str
    identity: Dict[str, Any] = field(default_factory=dict)
    median_ms: Optional[float] = None
    problems: List[str] = field(default_factory=list)
    # what the device reports of its state (None where it reports nothing)
    hottest_c: Optional[float] = None       # hottest thermal zone before the tiny run
    pinned: Optional[str] = None            # a phone's big-core mask
    governors: Optional[List[str]] = None   # CPU frequency governors
    # every runtime the agent drives: its version here, or why the device lacks it
    runtimes: Dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def tiny_model(path: Path) -> Path:
    """A 3x3 convolution and a ReLU on a 1x3x16x16 input: loads and runs anywhere."""
    # imported here, not at the top: every `harness devices` command imports this module,
    # and onnx added about 0.5 s to each
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], [0.01] * 108)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"])], "check",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7  # old enough for onnxruntime 1.8+
    onnx.save(model, str(path))
    return path


def install_fix(python: str, missing: List[str], facts: Optional[PythonFacts],
                device: str) -> str:
    """How to install the agent's missing packages for the device's Python. Debian 12 and
    Ubuntu 23.04+ refuse 'pip install' into the system's Python (externally managed): numpy
    comes from apt there, and onnxruntime (which Debian 12 does not package) from a venv."""
    if facts is None or not facts.externally_managed:
        return f"run '{python} -m pip install onnxruntime numpy' on the device"
    venv = ("sudo apt install python3-venv && python3 -m venv harness-venv && "
            "harness-venv/bin/python -m pip install onnxruntime numpy")
    use_venv = (f"register the venv's Python ('harness devices remove {device}', then add it "
                f"again with --python harness-venv/bin/python; the path is relative to the "
                f"home folder)")
    if missing == ["numpy"]:
        return (f"{python} is externally managed (pip install is refused there): run 'sudo "
                f"apt install python3-numpy' on the device, or make a venv there ('{venv}') "
                f"and {use_venv}")
    return (f"{python} is externally managed (pip install is refused there, and Debian 12 "
            f"packages no onnxruntime): make a venv on the device ('{venv}') and {use_venv}")


def runtime_lines(identity: Dict[str, Any]) -> Dict[str, str]:
    """Each runtime the agent drives, as `devices check` shows it: its version on the
    device, or that it is not installed and the package to install, or that the device's
    Python is too old for its wheels."""
    versions = dict(identity.get("runtimes") or {})
    if identity.get("onnxruntime"):
        versions["onnxruntime"] = identity["onnxruntime"]
    words = str(identity.get("python") or "").split()
    try:
        python: Optional[tuple] = tuple(int(p) for p in words[-1].split(".")[:2])
    except (ValueError, IndexError):
        python = None
    lines = {}
    for runtime in RUNTIMES:
        facts: Dict[str, Any] = RUNTIME_FACTS[runtime]  # type: ignore[assignment]
        if runtime in versions:
            lines[runtime] = str(versions[runtime])
        elif python is not None and python < facts["python"]:
            lines[runtime] = (f"not available: it needs Python >= "
                              f"{'.'.join(map(str, facts['python']))}, the device has "
                              f"{words[-1]}")
        else:
            lines[runtime] = f"not installed (pip install {facts['package']})"
    return lines


def check_device(client: Any, timeout_s: float = 120.0) -> CheckReport:
    """Run the checks through an AgentClient or PerfTestClient; never raises for a device
    problem, reports it instead."""
    report = CheckReport(device=client.device)
    runs_python = isinstance(client, AgentClient)
    python = " ".join(client.transport.python) if runs_python else "-"
    try:
        facts = probe_python(client.transport, timeout_s) if runs_python else None
        if facts is not None and facts.too_old:
            report.identity = {"python": f"{facts.text} (too old)"}
            report.problems.append(f"Python {facts.text} is too old for the agent; fix: "
                                   f"{facts.too_old_fix(python)}")
            return report
        device_facts = client.facts(deadline=time.monotonic() + timeout_s)
        identity = device_facts.identity
        report.identity = identity
        if runs_python:
            report.runtimes = runtime_lines(dict(identity))
        native = isinstance(client, NativeBenchClient)
        if native:  # its runtime is the tool's own build; it loads only its own format
            report.runtimes = {RUNTIME_OF_TOOL[client.tool]: f"{client.tool} (sha256 "
                               f"{identity.get('tool_sha256', '')[:12]}); the tiny ONNX model "
                               f"is not run: the tool loads {SUFFIX_OF_TOOL[client.tool]} only"}
        report.governors = list(device_facts.state.get("governors") or []) or None
        missing = [p for p in (("numpy", "onnxruntime") if runs_python else ())
                   if identity.get(p) is None]
        if missing:
            report.problems.append(
                f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed "
                f"for {python} ({identity.get('python')}) on {client.device}; fix: "
                f"{install_fix(python, missing, facts, client.device)}")
        if report.ok and not native:
            with tempfile.TemporaryDirectory() as folder:
                model = tiny_model(Path(folder) / "check.onnx")
                result = client.measure(str(model), CHECK_SETTINGS,
                                        deadline=time.monotonic() + timeout_s)
            samples = sorted(result.samples_ms)
            report.median_ms = samples[len(samples) // 2]
            control = result.control
            zones = control.thermal_before if control and control.thermal_before \
                else result.thermal_before
            report.hottest_c = hottest_zone_c(zones)
            if control is not None and control.pinned_mask:
                report.pinned = pinned_text(control.pinned_mask)
    except DeviceError as exc:
        text = f"{exc.kind}: {exc.message}; fix: {exc.fix}"
        if "SyntaxError" in exc.message:
            text += f" ({python} on the device is probably older than Python 3.8)"
        report.problems.append(text)
    finally:
        client.close()
    return report
