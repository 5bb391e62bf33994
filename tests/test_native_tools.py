"""Phones without Python on LiteRT and ExecuTorch: their own benchmark tools, driven like
onnxruntime_perf_test, parsed into the typed result. The real Android binaries cannot be had
here: the parsers read output in each tool's documented format, and fake binaries that print
it run the models for real (tests/fixtures/native_bench)."""
import sys
import time
from pathlib import Path

import pytest

from devices.errors import AgentProtocolError, BadRequest, LoadError
from devices.local import LocalTransport
from devices.native_bench_client import (NativeBenchClient, parse_benchmark_model,
                                         parse_executor_runner)
from harness.export.formats import FormatTarget, convert_module
from tests.conftest import FAST
from tests.test_runtimes import DUMMY, Small, installed

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "native_bench"


def text(name):
    return (FIXTURES / name).read_text()


def test_benchmark_model_parser_reads_both_documented_formats():
    old = parse_benchmark_model(text("benchmark_model_old.txt"))
    assert old.count == 50 and old.avg_ms == pytest.approx(79.732)
    assert old.min_ms == pytest.approx(77.385) and old.max_ms == pytest.approx(88.213)
    assert old.init_ms == pytest.approx(38.467) and old.first_inference_ms is None
    new = parse_benchmark_model(text("benchmark_model_new.txt"))
    assert new.count == 1 and new.avg_ms == pytest.approx(20.045)  # the last phase, not warm-up
    assert new.init_ms == pytest.approx(52.37) and new.first_inference_ms == pytest.approx(23.456)


def test_benchmark_model_parser_refuses_cut_output():
    lines = text("benchmark_model_new.txt").splitlines()
    with pytest.raises(AgentProtocolError, match="truncated"):
        parse_benchmark_model("\n".join(lines[:9]))


def test_executor_runner_parser_reads_every_iteration():
    run = parse_executor_runner(text("executor_runner.log"))
    assert run.iterations_ms == pytest.approx((23.1021, 20.1503, 20.0112, 20.0344))
    assert run.load_ms == pytest.approx(17.51264) and run.total_ms == pytest.approx(83.298)


def test_executor_runner_parser_refuses_cut_or_inconsistent_output():
    lines = text("executor_runner.log").splitlines()
    with pytest.raises(AgentProtocolError, match="truncated"):
        parse_executor_runner("\n".join(lines[:7]))
    with pytest.raises(AgentProtocolError, match="truncated"):
        parse_executor_runner("\n".join(lines[:7] + lines[9:]))
    with pytest.raises(AgentProtocolError, match="add up"):
        parse_executor_runner(text("executor_runner.log").replace("83.298000", "99.0"))


def tool(tmp_path, name):
    """The fake binary, run by this interpreter (it has the runtimes)."""
    path = tmp_path / name
    path.write_text(text(name).replace("#!/usr/bin/env python3", f"#!{sys.executable}", 1))
    path.chmod(0o755)
    return str(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("native")
    paths = {}
    for runtime, suffix in (("litert", ".tflite"), ("executorch", ".pte")):
        if installed(runtime):
            paths[runtime] = folder / f"small{suffix}"
            paths[runtime].write_bytes(convert_module(Small().eval(), DUMMY,
                                                      FormatTarget(runtime)).data)
    return paths


CASES = [pytest.param("benchmark_model", "benchmark-model", "litert",
                      marks=pytest.mark.skipif(not installed("litert"), reason="no LiteRT")),
         pytest.param("executor_runner", "executor-runner", "executorch",
                      marks=pytest.mark.skipif(not installed("executorch"), reason="no ExecuTorch"))]


@pytest.mark.parametrize("binary,name,runtime", CASES)
def test_a_tool_measures_into_the_typed_result(binary, name, runtime, models, tmp_path):
    client = NativeBenchClient(LocalTransport(tmp_path / "device", lock_path=None),
                               tool(tmp_path, binary), name)
    try:
        result = client.measure(str(models[runtime]), dict(FAST, runtime=runtime, min_runs=4,
                                                           warmup_runs=2),
                                deadline=time.monotonic() + 300)
    finally:
        client.close()
    assert len(result.samples_ms) == 4 and all(ms > 0 for ms in result.samples_ms)
    assert result.runtime["name"] == runtime and result.runtime["tool"] == name
    assert result.load_ms > 0 and result.first_run_ms is not None
    assert "input values" in " ".join(result.controlled["not_controlled"])
    assert result.agent_version.startswith(name)


@pytest.mark.parametrize("binary,name,runtime", CASES)
def test_a_tool_refuses_what_it_cannot_measure(binary, name, runtime, models, tmp_path,
                                               monkeypatch):
    client = NativeBenchClient(LocalTransport(tmp_path / "device", lock_path=None),
                               tool(tmp_path, binary), name)
    settings = dict(FAST, runtime=runtime)
    deadline = time.monotonic() + 300
    try:
        with pytest.raises(BadRequest, match="--runtime"):
            client.measure(str(models[runtime]), dict(FAST), deadline)
        with pytest.raises(BadRequest, match="interleaved rounds"):
            client.measure_rounds({}, ("x", "y"), settings, deadline)
        corrupt = tmp_path / f"corrupt{models[runtime].suffix}"
        corrupt.write_bytes(models[runtime].read_bytes()[:64] + b"\0" * 100)
        with pytest.raises(LoadError):
            client.measure(str(corrupt), settings, deadline)
        monkeypatch.setenv("HARNESS_FAKE_BENCH_TRUNCATE", "1")
        with pytest.raises(AgentProtocolError, match="truncated"):
            client.measure(str(models[runtime]), settings, deadline)
    finally:
        client.close()


def test_devices_check_on_a_tool_phone_names_its_runtime(tmp_path, models):
    """A phone measured by a native tool: check runs no ONNX model there, and says why."""
    if "litert" not in models:
        pytest.skip("no LiteRT")
    from devices.check import check_device
    client = NativeBenchClient(LocalTransport(tmp_path / "device", lock_path=None),
                               tool(tmp_path, "benchmark_model"), "benchmark-model")
    report = check_device(client)
    assert report.ok, report.problems
    assert "benchmark-model" in report.runtimes["litert"] and ".tflite only" in report.runtimes["litert"]
