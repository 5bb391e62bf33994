"""Runtimes beside onnxruntime: LiteRT, ExecuTorch, OpenVINO, each through the real agent on
`local`, with models converted on the host by the runtime's own converter."""
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from agents import ort_agent
from harness import LatencyProfiler, random_samples
from harness.errors import ExportError, InvalidArgument
from harness.export.formats import ConversionError, FormatTarget, convert_module
from harness.export.graph import export_module
from harness.pool.device_pool import MeasureRequest
from harness.spaces import TinySpace
from tests.conftest import AGENT, FAST

PACKAGES = {"litert": "ai-edge-litert", "executorch": "executorch", "openvino": "openvino"}
BACKENDS = {"litert": "xnnpack", "executorch": "xnnpack", "openvino": "CPU"}


def installed(runtime):
    try:
        metadata.version(PACKAGES[runtime])
        return True
    except metadata.PackageNotFoundError:
        return False


needs = {rt: pytest.mark.skipif(not installed(rt), reason=f"pip install {PACKAGES[rt]}")
         for rt in PACKAGES}
OTHERS = [pytest.param(rt, marks=needs[rt]) for rt in PACKAGES]


class Small(torch.nn.Module):
    """Conv, depthwise conv, pooling and a linear head: the kinds of ops a subnet has."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU6(),
            torch.nn.Conv2d(8, 8, 3, padding=1, groups=8), torch.nn.ReLU6(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10))

    def forward(self, x):
        return self.body(x)


class Det(torch.nn.Module):
    """An op ONNX exports but neither litert-torch nor ExecuTorch converts."""

    def forward(self, x):
        return torch.linalg.det(x.flatten(1)[:, :16].reshape(-1, 4, 4))


DUMMY = torch.randn(1, 3, 16, 16)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Small() in every format: {runtime: path}."""
    folder = tmp_path_factory.mktemp("formats")
    module = Small().eval()
    paths = {"onnxruntime": folder / "small.onnx"}
    paths["onnxruntime"].write_bytes(export_module(module, DUMMY).onnx_bytes)
    paths["openvino"] = paths["onnxruntime"]
    for runtime, suffix in (("litert", ".tflite"), ("executorch", ".pte")):
        if installed(runtime):
            paths[runtime] = folder / f"small{suffix}"
            paths[runtime].write_bytes(convert_module(module, DUMMY, FormatTarget(runtime)).data)
    return paths


def agent(*args, block=None):
    """The agent script run as a device runs it; `block` makes a module unimportable."""
    code = "import runpy, sys; sys.argv = ['ort_agent.py'] + sys.argv[1:]; "
    if block:
        code += f"sys.modules[{block!r}] = None; "
    code += f"runpy.run_path({str(AGENT)!r}, run_name='__main__')"
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=300)
    return json.loads(proc.stdout)


def settings(runtime, **more):
    return json.dumps(dict(FAST, runtime=runtime, **more))


@pytest.mark.parametrize("runtime", OTHERS)
def test_each_runtime_measures_through_the_agent(runtime, files):
    answer = agent("measure", "--model", str(files[runtime]), "--settings", settings(runtime))
    assert "error" not in answer, answer
    assert len(answer["samples_ms"]) >= FAST["min_runs"]
    assert all(ms > 0 for ms in answer["samples_ms"])
    info = answer["runtime"]
    assert info["name"] == runtime and info["backend"] == BACKENDS[runtime]
    assert info["version"].startswith(metadata.version(PACKAGES[runtime]).split("+")[0])
    assert answer["inputs"][0]["shape"] == [1, 3, 16, 16]
    assert answer["controlled"]["intra_op_threads"] == 1
    identity = answer["fingerprint"]["identity"]
    assert identity["runtimes"][runtime] == metadata.version(PACKAGES[runtime])
    assert answer["memory"]["model_bytes"] == files[runtime].stat().st_size
    if runtime == "litert":
        assert info["delegated"]["partitions"] >= 1  # XNNPACK took the graph


@pytest.mark.parametrize("runtime", OTHERS)
def test_each_runtime_times_interleaved_rounds(runtime, files):
    request = {"op": "rounds", "models": {"a": {"model": str(files[runtime])}},
               "reference": {"model": str(files[runtime])},
               "settings": dict(FAST, runtime=runtime, protocol="rounds", rounds=3,
                                block_ms=1.0)}
    answer = ort_agent.handle(request)
    assert not answer["errors"], answer["errors"]
    result = answer["results"]["a"]
    assert result["runtime"]["name"] == runtime and answer["rounds"] == 3
    assert len(result["rounds"]["blocks"]) == 3 and result["samples_ms"]


def test_outputs_agree_across_runtimes(files):
    """fp32: the same weights and inputs give the same outputs on every runtime."""
    module = Small().eval()
    seeds = dict(ort_agent.DEFAULT_SETTINGS, seed=0)
    expected = None
    for runtime, path in files.items():
        if runtime != "onnxruntime" and not installed(runtime):
            continue
        checked = ort_agent.parse_settings(dict(seeds, runtime=runtime))
        model, _ = ort_agent.open_model(ort_agent.import_runtime(runtime), str(path), checked)
        model.make_inputs()
        (feed,) = model.feeds.values()
        with torch.no_grad():
            reference = module(torch.from_numpy(feed)).numpy()
        (output,) = model.outputs_now()
        np.testing.assert_allclose(output, reference, rtol=1e-4, atol=1e-4, err_msg=runtime)
        expected = feed if expected is None else expected
        assert np.array_equal(feed, expected)  # every runtime fed the same input


def test_cache_key_differs_per_runtime_and_is_stable():
    keys = {rt: MeasureRequest.checked(dict(FAST, runtime=rt), 60).settings_key
            for rt in ort_agent.RUNTIMES}
    assert len(set(keys.values())) == len(keys)
    again = {rt: MeasureRequest.checked(dict(FAST, runtime=rt), 60).settings_key
             for rt in ort_agent.RUNTIMES}
    assert keys == again
    # onnxruntime's key is the one it had before runtimes existed
    assert keys["onnxruntime"] == MeasureRequest.checked(dict(FAST), 60).settings_key
    gpu = MeasureRequest.checked(dict(FAST, runtime="litert", backend="cpu"), 60).settings_key
    assert gpu != keys["litert"]


@pytest.mark.parametrize("runtime", [pytest.param("litert", marks=needs["litert"]),
                                     pytest.param("executorch", marks=needs["executorch"])])
def test_a_subnet_converts_once_per_format(runtime, home):
    space = TinySpace()
    sample = random_samples(space, 1, seed=5)[0]
    with LatencyProfiler(space, space.dummy_input(), runtime=runtime, settings=FAST) as first:
        measured = first.measure(sample)
    assert measured.provenance.runtime["name"] == runtime
    assert measured.provenance.convert_ms and measured.provenance.convert_ms > 0
    kept = [p for p in (home / "converted").iterdir() if not p.name.endswith(".json")]
    assert [p.suffix for p in kept] == [{"litert": ".tflite", "executorch": ".pte"}[runtime]]
    if runtime == "executorch":  # what XNNPACK left to the portable kernels: recorded
        assert measured.provenance.outside_backend is not None
    with LatencyProfiler(space, space.dummy_input(), runtime=runtime, settings=FAST,
                         refresh=True) as again:
        remeasured = again.measure(sample)
    assert remeasured.source == "measured" and remeasured.provenance.convert_ms is None
    assert remeasured.provenance.outside_backend == measured.provenance.outside_backend
    with LatencyProfiler(space, space.dummy_input(), settings=FAST) as onnx:
        other = onnx.measure(sample)
    assert other.graph_hash == measured.graph_hash  # one architecture, one key per runtime
    assert other.source == "measured" and other.provenance.runtime["name"] == "onnxruntime"


def test_openvino_measures_a_space_in_rounds(home):
    if not installed("openvino"):
        pytest.skip("pip install openvino")
    space = TinySpace()
    samples = random_samples(space, 2, seed=6)
    with LatencyProfiler(space, space.dummy_input(), runtime="openvino",
                         settings=dict(FAST, protocol="rounds", rounds=3, block_ms=1.0)) as p:
        results = p.measure_many(samples, progress=False)
    assert all(r.provenance.runtime["name"] == "openvino" for r in results)
    assert all(r.rounds is not None for r in results)


@pytest.mark.parametrize("runtime", [pytest.param("litert", marks=needs["litert"]),
                                     pytest.param("executorch", marks=needs["executorch"])])
def test_an_unconvertible_subnet_is_a_typed_error_before_any_device_time(runtime, home):
    with LatencyProfiler(None, None, runtime=runtime, settings=FAST) as profiler:
        with pytest.raises(ConversionError) as caught:
            profiler.measure_module(Det(), DUMMY)
        assert profiler.counters["measurements"] == 0
    assert f"runtime {runtime}" in str(caught.value) and "aten._linalg_det" in str(caught.value)
    assert not (home / "converted").exists() or not list((home / "converted").iterdir())


def test_an_unknown_runtime_is_a_user_error_listing_them():
    with pytest.raises(InvalidArgument) as caught:
        LatencyProfiler(None, None, runtime="tvm")
    assert "litert" in str(caught.value) and "openvino" in str(caught.value)
    answer = ort_agent.handle({"op": "measure", "model": "x", "settings": {"runtime": "tvm"}})
    assert answer["error"]["kind"] == "USER" and "executorch" in answer["error"]["message"]


@pytest.mark.parametrize("runtime,module", [("litert", "ai_edge_litert"),
                                            ("executorch", "executorch"),
                                            ("openvino", "openvino")])
def test_a_runtime_missing_on_the_device_names_its_package(runtime, module, files, tmp_path):
    path = files.get(runtime) or tmp_path / "absent"
    path.touch()
    answer = agent("measure", "--model", str(path), "--settings", settings(runtime),
                   block=module)
    assert answer["error"]["kind"] == "LOAD"
    assert f"pip install {PACKAGES[runtime]}" in answer["error"]["message"]


@pytest.mark.parametrize("runtime,suffix", [pytest.param("litert", ".tflite", marks=needs["litert"]),
                                            pytest.param("executorch", ".pte",
                                                         marks=needs["executorch"])])
def test_corrupt_and_foreign_files_are_load_errors_naming_them(runtime, suffix, files, tmp_path):
    good = files[runtime].read_bytes()
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(good[:64] + b"\0" * 200)
    answer = agent("measure", "--model", str(corrupt), "--settings", settings(runtime))
    assert answer["error"]["kind"] == "LOAD" and str(corrupt) in answer["error"]["message"]
    foreign = tmp_path / f"foreign{suffix}"
    foreign.write_bytes(files["onnxruntime"].read_bytes())
    answer = agent("measure", "--model", str(foreign), "--settings", settings(runtime))
    assert answer["error"]["kind"] == "LOAD" and str(foreign) in answer["error"]["message"]
    assert "ONNX" in answer["error"]["message"]


def test_a_file_whose_extension_and_content_disagree_is_refused(files, tmp_path):
    from harness.export.model_file import load_model
    liar = tmp_path / "model.tflite"
    liar.write_bytes(files["onnxruntime"].read_bytes())
    with pytest.raises(ExportError) as caught:
        load_model(liar)
    assert ".tflite" in str(caught.value) and "refused" in str(caught.value)


def test_a_model_file_measures_on_the_runtime_it_is_for(files):
    if not installed("litert"):
        pytest.skip("pip install ai-edge-litert")
    with LatencyProfiler(None, None, runtime="litert", settings=FAST) as profiler:
        measured = profiler.measure_model(files["litert"])
    assert measured.provenance.runtime["name"] == "litert"
    assert measured.graph_hash.startswith("sha256:")
    with LatencyProfiler(None, None, runtime="litert", settings=FAST) as profiler:
        with pytest.raises(InvalidArgument):
            profiler.measure_model(files["onnxruntime"])  # ONNX is not LiteRT's


def test_litert_without_its_delegate_records_that_none_took_the_graph(files):
    if not installed("litert"):
        pytest.skip("pip install ai-edge-litert")
    answer = ort_agent.handle({"op": "measure", "model": str(files["litert"]),
                               "settings": dict(FAST, runtime="litert", backend="cpu")})
    assert "error" not in answer, answer
    assert answer["runtime"]["backend"] == "cpu"
    assert answer["runtime"]["delegated"]["partitions"] == 0


def test_agent_stays_importable_without_any_runtime():
    """The agent imports no runtime at load time: a board with onnxruntime only needs none."""
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in "
            "('openvino', 'executorch', 'ai_edge_litert', 'torch')]; "
            f"sys.path.insert(0, {str(Path(AGENT).parent)!r}); import ort_agent; "
            "print(ort_agent.fingerprint()['identity']['python'])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- the command line

def cli(home, *args):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=600,
                          env=dict(os.environ, HARNESS_HOME=str(home),
                                   PYTHONPATH=str(Path(AGENT).parent.parent)))


FAST_FLAGS = ["--min-runs", "5", "--min-time-ms", "5"]


def test_cli_profiles_a_space_on_a_runtime_with_its_column(home):
    if not installed("openvino"):
        pytest.skip("pip install openvino")
    proc = cli(home, "profile", "--space", "harness.spaces:TinySpace", "--samples", "2",
               "--runtime", "openvino", *FAST_FLAGS)
    assert proc.returncode == 0, proc.stderr
    header = proc.stdout.splitlines()[0].split()
    assert header[:3] == ["#", "device", "runtime"]
    assert proc.stdout.count("openvino 2026") == 2 or "openvino" in proc.stdout
    proc = cli(home, "profile", "--space", "harness.spaces:TinySpace", "--samples", "2",
               "--runtime", "openvino", *FAST_FLAGS, "--json")
    rows = [json.loads(line) for line in proc.stdout.splitlines()][:-1]
    assert all(row["runtime"].startswith("openvino") and row["source"] == "cached"
               for row in rows)


def test_cli_model_file_picks_its_runtime_and_refuses_a_contradiction(home, files):
    if not installed("litert"):
        pytest.skip("pip install ai-edge-litert")
    proc = cli(home, "profile", "--model", str(files["litert"]), *FAST_FLAGS, "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["runtime"].startswith("litert") and row["settings"]["runtime"] == "litert"
    proc = cli(home, "profile", "--model", str(files["litert"]), "--runtime", "openvino",
               *FAST_FLAGS)
    assert proc.returncode != 0 and "for litert, not openvino" in proc.stderr


def test_cli_devices_check_lists_the_runtimes(home):
    proc = cli(home, "devices", "check", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for runtime in PACKAGES:
        line = next(line for line in proc.stdout.splitlines()
                    if line.strip().startswith(runtime + ":"))
        if installed(runtime):
            assert metadata.version(PACKAGES[runtime]) in line
        else:
            assert f"pip install {PACKAGES[runtime]}" in line


def test_devices_check_says_when_python_is_too_old_for_a_runtime():
    from devices.check import runtime_lines
    lines = runtime_lines({"python": "CPython 3.9.2", "onnxruntime": "1.16.3"})
    assert lines["onnxruntime"] == "1.16.3"
    for runtime in PACKAGES:
        if runtime != "litert":  # ai-edge-litert 1.4 has Python 3.9 wheels
            assert "needs Python >= 3.10, the device has 3.9.2" in lines[runtime]
    assert "pip install ai-edge-litert" in lines["litert"]


@pytest.mark.parametrize("runtime", [pytest.param("openvino", marks=needs["openvino"]),
                                     pytest.param("executorch", marks=needs["executorch"])])
def test_per_operator_times_where_the_runtime_gives_them(runtime, home):
    space = TinySpace()
    sample = random_samples(space, 1, seed=8)[0]
    with LatencyProfiler(space, space.dummy_input(), runtime=runtime, settings=FAST) as p:
        measured = p.measure(sample, per_op=True)
    ops = measured.ops
    assert ops is not None and ops.runs == 20 and len(ops.nodes) >= 5
    assert all(node.median_ms >= 0 and node.runs >= 1 for node in ops.nodes)
    kinds = " ".join(node.op_type for node in ops.nodes)
    assert "Conv" in kinds  # the subnet's convolutions, by the runtime's own names
    if runtime == "openvino":
        assert all(node.provider.startswith("CPU:") for node in ops.nodes)
    else:
        assert "DELEGATE_CALL" not in kinds  # the wrapper is not counted beside its ops
        assert any(node.provider == "delegate" for node in ops.nodes)


def test_litert_says_it_gives_no_per_operator_times(files):
    if not installed("litert"):
        pytest.skip("pip install ai-edge-litert")
    answer = ort_agent.handle({"op": "measure", "model": str(files["litert"]),
                               "settings": dict(FAST, runtime="litert", per_op=True)})
    assert answer["error"]["kind"] == "USER" and "benchmark_model" in answer["error"]["message"]


@pytest.mark.parametrize("runtime", [pytest.param("litert", marks=needs["litert"]),
                                     pytest.param("executorch", marks=needs["executorch"])])
@pytest.mark.parametrize("precision", ["int8-static", "int8-dynamic"])
def test_int8_through_the_runtimes_own_quantizer(runtime, precision, home, tmp_path):
    space = TinySpace()
    sample = random_samples(space, 1, seed=9)[0]
    with LatencyProfiler(space, space.dummy_input(), runtime=runtime, precision=precision,
                         settings=FAST) as profiler:
        measured = profiler.measure(sample)
    assert measured.settings["precision"] == precision
    assert measured.provenance.runtime["name"] == runtime
    kept = [p for p in (home / "converted").iterdir() if not p.name.endswith(".json")]
    assert len(kept) == 1 and precision.replace("-", "") in kept[0].name.replace("-", "")
    with LatencyProfiler(space, space.dummy_input(), runtime=runtime, settings=FAST) as fp32:
        assert fp32.cache_key(measured.graph_hash) != profiler.cache_key(measured.graph_hash)


def test_fp16_and_a_calibration_file_are_refused_for_the_converting_runtimes(tmp_path):
    with pytest.raises(InvalidArgument, match="fp16"):
        LatencyProfiler(None, None, runtime="litert", precision="fp16")
    npz = tmp_path / "c.npz"
    np.savez(npz, input0=np.zeros((1, 3, 32, 32), dtype=np.float32))
    with pytest.raises(InvalidArgument, match="random inputs"):
        LatencyProfiler(None, None, runtime="executorch", precision="int8-static",
                        calibration=str(npz))
