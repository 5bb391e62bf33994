"""`harness devices check`: prove the whole data path to a device, not just the login.

Deploys the agent, asks for the fingerprint (Python, onnxruntime and numpy versions, CPU,
board) and times a tiny model there; every problem found comes with what to do about it.
"""
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import onnx
from onnx import TensorProto, helper

from devices.agent_client import AgentClient
from devices.errors import DeviceError

CHECK_SETTINGS = {"warmup_runs": 2, "min_runs": 10, "min_time_ms": 20.0, "max_time_ms": 2000.0}


@dataclass
class CheckReport:
    device: str
    identity: Dict[str, Any] = field(default_factory=dict)
    median_ms: Optional[float] = None
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def tiny_model(path: Path) -> Path:
    """A 3x3 convolution and a ReLU on a 1x3x16x16 input: loads and runs anywhere."""
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


def check_device(client: Any, timeout_s: float = 120.0) -> CheckReport:
    """Run the checks through an AgentClient or PerfTestClient; never raises for a device
    problem, reports it instead."""
    transport = client.transport
    report = CheckReport(device=transport.name)
    python = " ".join(transport.python)
    try:
        identity = client.facts(deadline=time.monotonic() + timeout_s).identity
        report.identity = identity
        for package in (("numpy", "onnxruntime") if isinstance(client, AgentClient) else ()):
            if identity.get(package) is None:
                report.problems.append(
                    f"{package} is not installed for {python} ({identity.get('python')}) on "
                    f"{transport.name}; fix: run '{python} -m pip install onnxruntime numpy' "
                    f"on the device")
        if report.ok:
            with tempfile.TemporaryDirectory() as folder:
                model = tiny_model(Path(folder) / "check.onnx")
                result = client.measure(str(model), CHECK_SETTINGS,
                                        deadline=time.monotonic() + timeout_s)
            samples = sorted(result.samples_ms)
            report.median_ms = samples[len(samples) // 2]
    except DeviceError as exc:
        text = f"{exc.kind}: {exc.message}; fix: {exc.fix}"
        if "SyntaxError" in exc.message:
            text += f" ({python} on the device is probably older than Python 3.8)"
        report.problems.append(text)
    finally:
        client.close()
    return report
