"""Profiling the way users' tools do: any ONNX file, per-operator times, memory, execution
providers and precision variants, with real onnxruntime, real files and a real cache."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from agents import ort_agent
from devices.agent_result import AgentResult, OpProfile
from devices.errors import AgentProtocolError, BadRequest, DeviceError
from harness import Cache, LatencyProfiler, MemoryProfiler, random_samples
from harness.errors import ExportError, InvalidArgument
from harness.export.model_file import load_model
from tests.conftest import AGENT, FAST, onnx_file

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def image_model(tmp_path):
    """Conv + Relu over an image whose batch, height and width are dynamic."""
    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3],
                                np.random.RandomState(0).randn(108).astype("float32").tolist())
    return onnx_file(tmp_path / "image.onnx",
                     [helper.make_node("Conv", ["image", "w"], ["c"], pads=[1, 1, 1, 1],
                                       name="block1/conv"),
                      helper.make_node("Relu", ["c"], ["block1/out"], name="block1/relu")],
                     [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                    ["N", 3, "H", "W"])],
                     [helper.make_tensor_value_info("block1/out", TensorProto.FLOAT,
                                                    ["N", 4, "H", "W"])], [weight])


def cli(home, *args, cwd=None):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd,
                          env=dict(os.environ, HARNESS_HOME=str(home), PYTHONPATH=str(ROOT)))


# ---------------------------------------------------------------- any ONNX model

def test_a_model_file_with_dynamic_axes_is_measured_at_the_shapes_given(image_model):
    with LatencyProfiler(None, None, settings=FAST) as profiler:
        with pytest.raises(InvalidArgument) as missing:
            profiler.measure_model(image_model)
        assert "'image'" in str(missing.value) and "--input-shape image=1x3x224x224" in str(missing.value)
        assert "inputs are image [N, 3, H, W]" in str(missing.value)
        small = profiler.measure_model(image_model, {"image": [1, 3, 16, 16]})
        large = profiler.measure_model(image_model, {"image": [2, 3, 32, 32]})
        again = profiler.measure_model(image_model.read_bytes(), {"image": [1, 3, 16, 16]})
        with pytest.raises(InvalidArgument, match="model file"):
            profiler.measure(random_samples(profiler.space, 1)[0])
    assert small.source == large.source == "measured" and again.source == "cached"
    assert small.graph_hash == large.graph_hash == load_model(image_model).graph_hash
    assert list(small.input_signature[0]["shape"]) == [1, 3, 16, 16]
    assert small.settings["input_shapes"] == {"image": [1, 3, 16, 16]}


def test_a_broken_or_missing_model_file_is_named(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with LatencyProfiler(None, None, settings=FAST) as profiler:
        with pytest.raises(ExportError, match="broken.onnx is not a valid ONNX model"):
            profiler.measure_model(broken)
        with pytest.raises(ExportError, match="does not exist"):
            profiler.measure_model(tmp_path / "absent.onnx")


def test_shapes_that_contradict_the_model_or_name_no_input(tiny_model):
    with LatencyProfiler(None, None, settings=FAST) as profiler:
        with pytest.raises(InvalidArgument, match="does not fit"):
            profiler.measure_model(tiny_model, {"input0": [2, 3, 32, 32]})
        with pytest.raises(InvalidArgument, match="names nope"):
            profiler.measure_model(tiny_model, {"nope": [1]})


def test_cli_sweeps_batch_and_input_size_in_one_table(home, image_model):
    proc = cli(home, "profile", "--model", str(image_model), "--batch", "1,2",
               "--input-size", "8,16", "--min-runs", "5", "--min-time-ms", "5", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    variants = [row["variant"] for row in rows[:-1]]
    assert variants == ["fp32 1x3x8x8", "fp32 1x3x16x16", "fp32 2x3x8x8", "fp32 2x3x16x16"]
    assert rows[-1]["summary"]["measured"] == 4
    assert all(row["memory"]["model_bytes"] == image_model.stat().st_size for row in rows[:-1])


def test_cli_names_the_input_a_dynamic_model_needs(home, image_model):
    proc = cli(home, "profile", "--model", str(image_model))
    assert proc.returncode == 1
    assert "input 'image'" in proc.stderr and "fix: --input-shape image=1x3x224x224" in proc.stderr


def test_cli_names_a_wrong_input_name_and_the_models_inputs(home, image_model):
    proc = cli(home, "profile", "--model", str(image_model), "--input-shape", "inp=1x3x64x64")
    assert proc.returncode == 1
    assert "--input-shape names inp, which" in proc.stderr and "no size was given" not in proc.stderr
    assert "its inputs are image [N, 3, H, W]" in proc.stderr
    assert "fix: --input-shape image=1x3x224x224" in proc.stderr
    # with a sweep too, whose sizes could have filled the dynamic axes
    proc = cli(home, "profile", "--model", str(image_model), "--input-shape", "inp=1x3x64x64",
               "--batch", "1,2", "--input-size", "8")
    assert proc.returncode == 1 and "--input-shape names inp, which" in proc.stderr


def test_a_shape_that_does_not_fit_names_the_static_dims(tiny_model):
    with LatencyProfiler(None, None, settings=FAST) as profiler:
        with pytest.raises(InvalidArgument) as wrong:
            profiler.measure_model(tiny_model, {"input0": [1, 3, 64, 64]})
    message = str(wrong.value)
    assert "input 'input0'" in message and "is [1, 3, 32, 32], which 1x3x64x64 does not fit" in message
    assert "--input-shape input0=1x3x32x32" in message


def test_example_shapes_are_realistic():
    from harness.export.model_file import example_shape
    assert example_shape(["N", 3, "H", "W"]) == "1x3x224x224"
    assert example_shape(["batch", "seq"]) == "1x128"
    assert example_shape([1, "T", 80]) == "1x128x80"
    assert example_shape([2, 4]) == "2x4"


# ---------------------------------------------------------------- per-operator profile

def test_per_operator_profile_in_runs_of_its_own(tiny, home):
    sample = random_samples(tiny, 1, seed=5)[0]
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as profiler:
        plain = profiler.measure(sample)
        profiled = profiler.measure(sample, per_op=True)   # the cached one has no ops
        cached = profiler.measure(sample, per_op=True)
    assert plain.ops is None and profiled.source == "measured" and cached.source == "cached"
    ops = cached.ops
    assert ops is not None and ops == profiled.ops      # kept whole through SQLite
    assert ops.runs == ort_agent.DEFAULT_SETTINGS["profile_runs"]
    assert {node.op_type for node in ops.nodes} >= {"Conv", "Gemm"}
    assert ops.by_provider() == {"CPUExecutionProvider": len(ops.nodes)}
    assert all(node.runs == ops.runs and node.median_ms >= 0 for node in ops.nodes)
    assert ops.sum_of_medians_ms == pytest.approx(sum(n.median_ms for n in ops.nodes))
    # composed subnets name each node after its block (onnxruntime's own layout nodes aside)
    assert all(re.match(r"b\d+:(stem|mbconv|head)", node.name) for node in ops.nodes
               if not node.op_type.startswith("Reorder"))
    assert ops.arena.get("arena_held_bytes", 0) > 0
    trace = ops.chrome_trace()
    kernels = [e for e in trace["traceEvents"] if e.get("cat") == "Node"]
    assert len(kernels) == len(ops.nodes) and trace["traceEvents"][0]["name"] == "model_run"
    assert all(e["args"]["provider"] == "CPUExecutionProvider" for e in kernels)


def test_cli_ops_prints_top_nodes_and_writes_a_chrome_trace(home, image_model, tmp_path):
    proc = cli(home, "profile", "--model", str(image_model), "--input-shape",
               "image=1x3x16x16", "--ops", "--top", "1", "--trace-dir", str(tmp_path),
               "--min-runs", "5", "--min-time-ms", "5")
    assert proc.returncode == 0, proc.stderr
    assert "sum of per-node medians" in proc.stdout and "runtime overhead" in proc.stdout
    assert "block1/" in proc.stdout and "memory:" in proc.stdout  # names survive fusion
    traces = list(tmp_path.glob("trace-0-*.json"))
    assert len(traces) == 1
    events = json.loads(traces[0].read_text())["traceEvents"]
    assert "Conv" in {e["args"].get("op_name") for e in events if e.get("cat") == "Node"}


class _OldSessionOptions:
    """SessionOptions of an onnxruntime without profiling."""
    intra_op_num_threads = inter_op_num_threads = graph_optimization_level = 0
    execution_mode = log_severity_level = 0


def test_an_onnxruntime_without_profiling_is_a_user_error():
    import onnxruntime

    class Old:
        __version__ = "1.0.0"
        SessionOptions = _OldSessionOptions
        GraphOptimizationLevel = onnxruntime.GraphOptimizationLevel
        ExecutionMode = onnxruntime.ExecutionMode

        class InferenceSession:
            pass

    settings = ort_agent.parse_settings({"per_op": True})
    with pytest.raises(ort_agent.AgentError) as error:
        ort_agent.per_op_profile(Old, "m.onnx", settings, {}, [])
    assert error.value.kind == "USER" and "cannot profile per operator" in error.value.message


def test_a_garbled_per_operator_answer_is_refused(tiny_model):
    answer = ort_agent.measure(str(tiny_model), settings=dict(FAST, per_op=True, profile_runs=2))
    assert AgentResult.parse(answer, "local", ort_agent.AGENT_VERSION).ops is not None
    answer["ops"]["nodes"][0]["median_ms"] = float("nan")
    with pytest.raises(AgentProtocolError, match="no median time"):
        AgentResult.parse(answer, "local", ort_agent.AGENT_VERSION)
    with pytest.raises(ValueError):
        OpProfile.from_dict({"runs": 1, "run_median_ms": 1.0, "nodes": [{"name": 3}]})


# ---------------------------------------------------------------- memory

def test_memory_peaks_with_their_baseline(tiny, tiny_model):
    answer = ort_agent.measure(str(tiny_model), settings=FAST)
    memory = AgentResult.parse(answer, "local", ort_agent.AGENT_VERSION).memory
    assert memory is not None and memory.peaks_reset  # Linux lets the agent reset VmHWM
    assert memory.model_bytes == tiny_model.stat().st_size
    assert 0 < memory.baseline_rss_mb <= memory.peak_mb
    assert memory.added_mb == pytest.approx(memory.peak_mb - memory.baseline_rss_mb)


def test_memory_profiler_filters_on_a_fresh_process_figure(tiny, home):
    samples = random_samples(tiny, 2, seed=6)
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as latency:
        by_worker = latency.measure(samples[0])
    with MemoryProfiler(tiny, tiny.dummy_input(), settings=FAST) as memory:
        peaks = [memory.profile(s) for s in samples]
        counted = dict(memory.latency.counters)
        again = [memory.profile(s) for s in samples]
    assert by_worker.provenance.isolation == "worker"
    assert counted["measurements"] == 2  # the worker's figure was measured again
    assert peaks == again and all(peak > 10 for peak in peaks)
    with pytest.raises(InvalidArgument, match="metric"):
        MemoryProfiler(tiny, tiny.dummy_input(), metric="rss")


# ---------------------------------------------------------------- execution providers

def test_a_provider_the_device_lacks_lists_those_it_has(tiny):
    import onnxruntime

    with LatencyProfiler(tiny, tiny.dummy_input(), settings=dict(
            FAST, provider="NnapiExecutionProvider")) as profiler:
        with pytest.raises(DeviceError) as error:
            profiler.measure(random_samples(tiny, 1)[0])
    assert "NnapiExecutionProvider is not available" in str(error.value)
    assert all(name in str(error.value) for name in onnxruntime.get_available_providers())


def test_provider_options_reach_the_session_and_the_cache_key(tiny):
    plain = LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST)
    tuned = LatencyProfiler(tiny, tiny.dummy_input(), settings=dict(
        FAST, provider_options={"arena_extend_strategy": "kSameAsRequested"}))
    with plain, tuned:
        measured = tuned.measure(random_samples(tiny, 1)[0])
        assert plain.settings_key != tuned.settings_key
    assert measured.settings["provider_options"] == {"arena_extend_strategy": "kSameAsRequested"}
    with pytest.raises(InvalidArgument, match="provider_options"):
        LatencyProfiler(tiny, tiny.dummy_input(), settings={"provider_options": {"a": 1}})


def test_default_settings_keep_the_keys_stored_before(tiny):
    """precision, calibration and provider options enter the key only when set, so the
    measurements stored before they existed are still found."""
    from harness.store.key import digest
    from harness.store.key import RUNTIME_SETTINGS

    with LatencyProfiler(tiny, tiny.dummy_input()) as profiler:
        old = digest({"runtime": "onnxruntime",
                      **{k: profiler.settings[k] for k in RUNTIME_SETTINGS}})
        assert profiler.settings_key == old


# ---------------------------------------------------------------- precision variants

def test_precision_variants_side_by_side_for_the_same_subnets(tiny, home):
    samples = random_samples(tiny, 2, seed=7)
    found = {}
    for precision in ("fp32", "fp16", "int8-dynamic", "int8-static"):
        with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST,
                             precision=precision) as profiler:
            found[precision] = (profiler.settings_key, profiler.measure_many(samples))
    keys = {key for key, _ in found.values()}
    assert len(keys) == 4
    for precision, (_, results) in found.items():
        assert [m.graph_hash for m in results] == [m.graph_hash for m in found["fp32"][1]]
        assert all(m.settings["precision"] == precision for m in results)
    sha = {p: {m.provenance.model_sha256 for m in r} for p, (_, r) in found.items()}
    assert len(set.union(*sha.values())) == 8  # four different models per subnet
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST,
                         precision="int8-static") as profiler:
        profiled = profiler.measure(samples[0], per_op=True)
    assert "QLinearConv" in {node.op_type for node in profiled.ops.nodes}


def test_int8_static_calibrates_on_a_users_npz(tiny, tmp_path):
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    np.savez(good, input0=np.random.RandomState(1).randn(4, 1, 3, 32, 32).astype("float32"))
    np.savez(bad, other=np.zeros(3))
    sample = random_samples(tiny, 1, seed=8)[0]
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST, precision="int8-static",
                         calibration=good) as profiler:
        measured = profiler.measure(sample)
        assert measured.settings["calibration"].startswith("npz:")
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST, precision="int8-static",
                         calibration=bad) as profiler:
        with pytest.raises(InvalidArgument, match="no array 'input0'"):
            profiler.measure(sample)
    with pytest.raises(InvalidArgument, match="only used by --precision int8-static"):
        LatencyProfiler(tiny, tiny.dummy_input(), calibration=good)
    with pytest.raises(InvalidArgument, match="precision 'int4'"):
        LatencyProfiler(tiny, tiny.dummy_input(), precision="int4")


def test_cli_compares_precisions_in_one_table(home, tiny_model):
    proc = cli(home, "profile", "--model", str(tiny_model), "--precision",
               "fp32,int8-dynamic,int8-static", "--min-runs", "5", "--min-time-ms", "5")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "variant" in lines[0] and "peak MB" in lines[0]
    assert [line.split()[4] for line in lines[2:5]] == ["fp32", "int8-dynamic", "int8-static"]
    with Cache(home / "cache.sqlite") as cache:
        assert cache.stats()["distinct_keys"] == 3


def test_the_agent_file_still_runs_alone(tiny_model):
    proc = subprocess.run([sys.executable, str(AGENT), "measure", "--model", str(tiny_model),
                           "--settings", json.dumps(dict(FAST, per_op=True, profile_runs=2))],
                          capture_output=True, text=True, timeout=120)
    answer = json.loads(proc.stdout)
    assert proc.returncode == 0 and answer["ops"]["nodes"] and answer["memory"]["available"]


# ---------------------------------------------------------------- on test-farm boards

from tests.ssh_fixtures import board, client_key, needs_root, testfarm  # noqa: E402,F401
from tests.test_arm64 import arm, arm64_root  # noqa: E402,F401


def _everything_on(device, tiny, image_model):
    """A model file at a given shape, per-operator, memory and an int8 variant on `device`."""
    sample = random_samples(tiny, 1, seed=9)[0]
    with LatencyProfiler(None, None, device=device, settings=FAST) as files:
        model = files.measure_model(image_model, {"image": [1, 3, 8, 8]}, per_op=True)
    with LatencyProfiler(tiny, tiny.dummy_input(), device=device, settings=FAST,
                         precision="int8-dynamic") as quantized:
        int8 = quantized.measure(sample, per_op=True)
    with MemoryProfiler(tiny, tiny.dummy_input(), device=device, settings=FAST) as memory:
        peak = memory.profile(sample)
    return model, int8, peak


@needs_root
def test_model_files_ops_memory_and_int8_on_a_test_farm_board(tiny, board, image_model):
    model, int8, peak = _everything_on("board7", tiny, image_model)
    assert model.device == "board7" and model.source == "measured"
    assert "Conv" in {node.op_type for node in model.ops.nodes}
    assert model.memory.peaks_reset and model.memory.model_bytes == image_model.stat().st_size
    assert "ConvInteger" in {node.op_type for node in int8.ops.nodes}
    assert int8.settings["precision"] == "int8-dynamic" and peak > 10


@needs_root
def test_model_files_ops_memory_and_int8_on_an_arm64_board(tiny, arm, image_model):
    """Python 3.9 and onnxruntime 1.19 under qemu: the agent's guards meet an older runtime."""
    model, int8, peak = _everything_on("arm", tiny, image_model)
    assert model.device_fingerprint["machine"] == "aarch64"
    assert model.ops.nodes and model.ops.by_provider()
    assert model.memory is not None and model.memory.model_bytes == image_model.stat().st_size
    assert "ConvInteger" in {node.op_type for node in int8.ops.nodes} and peak > 1


def test_the_report_shows_what_was_measured_per_operator(tiny, home, tmp_path):
    from harness.report.html import write_report

    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as profiler:
        profiler.measure(random_samples(tiny, 1, seed=10)[0], per_op=True)
    files = write_report(home / "cache.sqlite", tmp_path / "report")
    page = files.index.read_text()
    assert "<h2>Per operator</h2>" in page and (tmp_path / "report" / "operators.png").is_file()


def test_devices_check_lists_the_providers_a_device_has(home):
    import onnxruntime

    proc = cli(home, "devices", "check", "local")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if "providers:" in line)
    assert all(name in line for name in onnxruntime.get_available_providers())


def test_the_perf_test_client_refuses_what_it_cannot_do(tmp_path):
    from devices.perf_tool_client import PerfTestClient

    binary = tmp_path / "onnxruntime_perf_test"
    binary.write_bytes(b"a build for the phone")
    client = PerfTestClient(type("Phone", (), {"name": "phone"})(), str(binary))
    with pytest.raises(BadRequest, match="onnxruntime_perf_test"):
        client.measure("m.onnx", ort_agent.parse_settings({"per_op": True}), deadline=0.0)


def test_an_import_with_a_hostile_per_operator_record_skips_that_row(tiny, home, tmp_path):
    with LatencyProfiler(tiny, tiny.dummy_input(), settings=FAST) as profiler:
        profiler.measure_many(random_samples(tiny, 2, seed=11), per_op=True)
    exported = tmp_path / "dump.jsonl"
    with Cache(home / "cache.sqlite") as cache:
        cache.export_jsonl(exported)
    lines = exported.read_text().splitlines()
    rows = [i for i, line in enumerate(lines) if '"measurement"' in line and '"ops"' in line]
    record = json.loads(lines[rows[0]])
    record["measurement"]["ops"]["nodes"][0]["median_ms"] = -1
    lines[rows[0]] = json.dumps(record)
    exported.write_text("\n".join(lines) + "\n")
    with Cache(tmp_path / "other.sqlite") as other:
        counts = other.import_jsonl(exported)
    assert counts["measurement"] == 1 and len(counts.skipped) == 1
    assert "no median time" in counts.skipped[0].reason


@pytest.mark.skipif("AzureExecutionProvider" not in __import__("onnxruntime").get_available_providers(),
                    reason="this onnxruntime has no second execution provider")
def test_nodes_a_provider_cannot_run_show_their_cpu_fallback(home, tiny_model):
    """The Azure provider of the pip wheel runs no ordinary operator: every node falls back."""
    proc = cli(home, "profile", "--model", str(tiny_model), "--provider", "Azure", "--ops",
               "--trace-dir", str(tiny_model.parent), "--min-runs", "5", "--min-time-ms", "5",
               "--json")
    assert proc.returncode == 0, proc.stderr
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["variant"].startswith("fp32 Azure")
    assert {node["provider"] for node in row["ops"]["nodes"]} == {"CPUExecutionProvider"}
    table = cli(home, "profile", "--model", str(tiny_model), "--provider", "Azure", "--ops",
                "--trace-dir", str(tiny_model.parent), "--min-runs", "5", "--min-time-ms", "5")
    assert "nodes did not run on AzureExecutionProvider" in table.stdout
