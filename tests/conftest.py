"""Shared fixtures: a private HARNESS_HOME, the tiny space, fast agent settings, ONNX files."""
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from harness.export.graph import export_sample
from harness.spaces.space import random_samples
from harness.spaces import TinySpace

AGENT = Path(__file__).resolve().parent.parent / "agents" / "ort_agent.py"

# Short timed loops: the tests check correctness, not precision.
FAST = {"warmup_runs": 2, "min_runs": 5, "min_time_ms": 5.0, "max_time_ms": 2000.0}


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own $HARNESS_HOME."""
    path = tmp_path / "home"
    monkeypatch.setenv("HARNESS_HOME", str(path))
    return path


@pytest.fixture
def tiny():
    return TinySpace()


@pytest.fixture
def tiny_model(tmp_path, tiny):
    """An exported TinySpace subnet on disk."""
    exported = export_sample(tiny, random_samples(tiny, 1, seed=3)[0], tiny.dummy_input())
    path = tmp_path / "tiny.onnx"
    path.write_bytes(exported.onnx_bytes)
    return path


def onnx_file(path: Path, nodes, inputs, outputs, initializers=()) -> Path:
    """Write a hand-built ONNX graph (opset 17) to `path`."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture
def dynamic_model(tmp_path):
    """Relu over an input whose batch dimension is symbolic ("N", 4)."""
    return onnx_file(tmp_path / "dynamic.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])


@pytest.fixture
def failing_model(tmp_path):
    """Loads fine, fails when run: Gather with indices beyond the data's one element."""
    data = helper.make_tensor("data", TensorProto.FLOAT, [1], [1.0])
    return onnx_file(tmp_path / "failing.onnx", [helper.make_node("Gather", ["data", "idx"], ["y"])],
                     [helper.make_tensor_value_info("idx", TensorProto.INT64, [16])],
                     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16])], [data])


def python() -> str:
    return sys.executable
