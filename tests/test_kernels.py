"""Kernel detection and features on a space nn-Meter never saw (harness.predict.kernels), and
calibration on it: squeeze-excitation, GELU, hard-swish, SiLU, bottlenecks, residuals,
ShuffleNet split/concat, Resize and a small multi-head attention block (MixedSpace).

Everything is real: nn-Meter 2.0's converter, detector and builder, onnxruntime running the
kernels cut out of the subnets, measurements on this machine through the agent, SQLite.
"""
import dataclasses
import json
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch

pytest.importorskip("nn_meter", reason="nn-Meter runs from .venv-extras (scripts/test)")
from harness.store.cache import Cache  # noqa: E402
from harness.campaigns.calibrate import ORT_CPU_FUSION_RULES, calibrate  # noqa: E402
from harness.export.graph import export_module, export_sample  # noqa: E402
from harness.predict.kernels import KernelError, detect_kernels, fold_shapes  # noqa: E402
from harness.predict.nn_meter import (KernelPredictors, NnMeterProfiler, load_predictor,  # noqa: E402
                             onnx_for_nn_meter)
from harness.spaces.space import enumerate_samples, random_samples  # noqa: E402
from harness.spaces.mixed import MixedSpace  # noqa: E402
from tests.conftest import FEW_ROUNDS  # noqa: E402

# interleaved rounds, the default, cut short: subnets in windows of rounds, each kernel cut
# out of them in a window of its own beside the reference
SETTINGS = dict(FEW_ROUNDS, warmup_runs=1)


@pytest.fixture
def mixed():
    return MixedSpace()


@pytest.fixture
def rules(tmp_path):
    path = tmp_path / "fusion_rules.json"
    path.write_text(json.dumps(ORT_CPU_FUSION_RULES))
    return str(path)


def everything(space):
    """A sample that builds every kind of op the space has: GELU, SE, a shuffle unit, a
    bottleneck, hard-swish and SiLU, residuals, Resize and 4-head attention."""
    sample = {"block0.kind": "shuffle", "block0.act": "gelu", "block0.se": True,
              "block0.skip": False, "block1.kind": "bottleneck", "block1.act": "hswish",
              "block1.se": True, "block1.skip": False, "block2.kind": "mbconv",
              "block2.act": "silu", "block2.se": True, "block2.skip": True,
              "block3.kind": "bottleneck", "block3.act": "gelu", "block3.se": False,
              "block3.skip": True, "head.resize": True, "head.heads": 4}
    assert set(sample) == set(space.search_space())
    return sample


def test_nn_meters_own_features_crash_where_ours_do_not(mixed, rules):
    """The crash users hit: an add of a GELU (scalar constant operand) reaches nn-Meter's
    add features, which read a fourth dimension the operand does not have."""
    from nn_meter.predictor.prediction.extract_feature import get_predict_features

    exported = export_sample(mixed, everything(mixed), mixed.dummy_input())
    kernels = detect_kernels(onnx_for_nn_meter(exported.onnx_bytes), rules)
    broadcast = [k for k in kernels if k.op == "add" and k.generic]
    assert broadcast, [k.op for k in kernels]
    with pytest.raises(IndexError):
        get_predict_features([dict(broadcast[0].info)])
    ops = {k.op for k in kernels}
    assert {"Erf", "Sigmoid", "Softmax", "Resize", "se", "concat", "split"} <= ops, ops
    for kernel in kernels:
        assert kernel.features and all(np.isfinite(kernel.features)), kernel.describe()
    # a 3-D MatMul is not taken for a 2-D fully connected layer, nor a LayerNorm's reduction
    # for global pooling
    assert all(k.generic for k in kernels if k.op == "fc" and
               len(k.info["input_tensors"][0]) != 2)


def test_every_kernel_of_the_space_can_be_cut_out_and_run(mixed, rules):
    """Every generic kernel of many subnets is a valid one-kernel model onnxruntime runs,
    with the shapes the subnet gives it; nn-Meter features stay nn-Meter's."""
    seen = set()
    for sample in [everything(mixed)] + random_samples(mixed, 6, seed=3):
        exported = export_sample(mixed, sample, mixed.dummy_input())
        for kernel in detect_kernels(onnx_for_nn_meter(exported.onnx_bytes), rules,
                                     cut=lambda k: k.generic):
            if not kernel.generic or (kernel.kernel_type, kernel.features) in seen:
                continue
            seen.add((kernel.kernel_type, kernel.features))
            session = ort.InferenceSession(kernel.onnx_bytes)
            feeds = {i.name: np.zeros(i.shape, np.float32) for i in session.get_inputs()}
            outputs = session.run(None, feeds)
            assert outputs and all(np.all(np.isfinite(o)) for o in outputs), kernel.op
    assert {t for t, _ in seen} >= {"generic-erf", "generic-mul", "generic-add",
                                    "generic-softmax", "generic-resize"}


def test_shape_arithmetic_is_folded_as_onnxruntime_does(mixed):
    """A traced `x.shape` exports as Shape / Gather / Concat; folded, no Shape node is
    left and the model computes what it did."""
    import onnx

    exported = export_sample(mixed, everything(mixed), mixed.dummy_input())
    model = onnx_for_nn_meter(exported.onnx_bytes)
    assert any(n.op_type == "Shape" for n in model.graph.node)
    folded = fold_shapes(model)
    assert not any(n.op_type == "Shape" for n in folded.graph.node)
    x = mixed.dummy_input().numpy()
    name = model.graph.input[0].name
    want = ort.InferenceSession(exported.onnx_bytes).run(None, {name: x})[0]
    got = ort.InferenceSession(onnx.shape_inference.infer_shapes(folded).SerializeToString()
                               ).run(None, {name: x})[0]
    assert np.allclose(want, got, atol=1e-5)


class _DataDependent(torch.nn.Module):
    """Gathers along positions chosen at run time: an index tensor no shape can tell."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.relu(x)
        index = y.argmax(dim=1, keepdim=True)
        return torch.gather(y, 1, index) * 2.0


class DataDependentSpace:
    def search_space(self):
        return {"scale": [1, 2]}

    def freeze(self, sample):
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8 * sample["scale"], 3, padding=1),
                                   _DataDependent()).eval()

    def dummy_input(self):
        return torch.zeros(1, 3, 8, 8)


def test_a_kernel_that_cannot_be_measured_is_named_before_device_time(home):
    space = DataDependentSpace()
    with pytest.raises(KernelError) as caught:
        calibrate(space, space.dummy_input(), "local", samples=8, holdout=2,
                  settings=SETTINGS, progress=False, plot=False)
    assert "GatherElements" in str(caught.value) or "gather" in str(caught.value).lower()
    assert caught.value.fix
    if (home / "cache.sqlite").exists():  # nothing was measured
        with Cache(home / "cache.sqlite") as cache:
            assert cache.stats()["measurements"] == 0


def test_calibration_on_the_mixed_space_and_resume_after_a_failure(mixed, home, monkeypatch):
    """Calibration measures subnets and kernels (generic ones cut out of their subnets),
    fits every kernel type with nn-Meter's builder into nn-Meter's file format, and predicts
    held-out subnets; when it fails after measuring, a rerun measures nothing again."""
    import harness.campaigns.calibrate as calibrate_module

    real_build = calibrate_module.build_kernel_predictors

    def crash(*args, **kwargs):
        raise RuntimeError("the machine went away while fitting")
    monkeypatch.setattr(calibrate_module, "build_kernel_predictors", crash)
    with pytest.raises(RuntimeError, match="went away"):
        calibrate(mixed, mixed.dummy_input(), "local", samples=10, holdout=4,
                  settings=SETTINGS, progress=False, plot=False, seed=5)
    with Cache(home / "cache.sqlite") as cache:
        measured = cache.stats()["measurements"]
    assert measured >= 14 + 20  # the subnets and their kernels are in the cache

    monkeypatch.setattr(calibrate_module, "build_kernel_predictors", real_build)
    result = calibrate(mixed, mixed.dummy_input(), "local", samples=10, holdout=4,
                       settings=SETTINGS, progress=False, plot=False, seed=5)
    with Cache(home / "cache.sqlite") as cache:
        assert cache.stats()["measurements"] == measured  # resumed: nothing measured again
    report = result.report["calibrated"]
    assert report["n"] == 4 and report["rmspe"] < 100
    folder = result.folder / "kernels"
    pickles = {p.stem for p in folder.glob("*.pkl")}
    assert {"conv-bn-relu", "generic-mul", "generic-add"} <= pickles, pickles
    loaded = load_predictor(folder)  # harness's loader (and its pickle allow-list) reads them
    assert set(loaded.predictors) == pickles
    data = json.loads((folder / "kernels.json").read_text())
    assert set(data["generic-mul"][next(iter(data["generic-mul"]))]["config"]) == {
        "MFLOPS", "IN_M", "OUT_M", "WEIGHTS_M", "OUT_LAST", "OUT_K", "OUT_RANK"}
    # A new subnet with every op is predicted, through memos that do not change the answer.
    profiler = NnMeterProfiler(mixed, mixed.dummy_input(), calibration=result.calibration)
    exported = export_sample(mixed, everything(mixed), mixed.dummy_input())
    first = profiler.predict_exported(exported)
    again = profiler.predict_exported(exported)
    fresh = KernelPredictors(loaded.name, loaded.folder, loaded.predictors,
                             loaded.fusion_rules, loaded.digest)
    assert first.source == "predicted" and first.median > 0
    assert again.median == first.median
    assert profiler.calibration.correct(fresh.predict(exported.onnx_bytes),
                                        len(fresh.kernels(exported.onnx_bytes))) == \
        pytest.approx(first.median, rel=1e-12)
    # An overheads correction is applied with the model's own number of kernels (composed
    # subnets predicted from their pieces count the whole graph's)
    overheads = dataclasses.replace(result.calibration, kind="overheads", slope=1.0,
                                    intercept=math.log(2.0), per_kernel_ms=0.5, fixed_ms=1.0)
    whole_kernels = len(fresh.kernels(exported.onnx_bytes))
    composed = export_sample(mixed, random_samples(mixed, 1, seed=4)[0], mixed.dummy_input())
    for model in (exported, composed):
        raw_ms = fresh.predict(model.onnx_bytes)
        count = len(fresh.kernels(model.onnx_bytes))
        assert NnMeterProfiler(mixed, mixed.dummy_input(), calibration=overheads
                               ).predict_exported(model).median == \
            pytest.approx(2.0 * raw_ms + 0.5 * count + 1.0, rel=1e-9)
    assert whole_kernels > 1
    split = fresh.predict_by_type(fresh.kernels(exported.onnx_bytes))
    assert sum(split.values()) == pytest.approx(first.provenance.uncalibrated_ms, rel=1e-9)
    assert any(kind.startswith("generic-") and value > 0 for kind, value in split.items())
    # Transfer: these kernel predictors, corrected for a device by a few measured subnets
    # only (what `harness calibrate --predictor FOLDER --no-kernels` does).
    transferred = calibrate(mixed, mixed.dummy_input(), "local", samples=5, holdout=3,
                            predictor=str(folder), build_kernels=False, settings=SETTINGS,
                            progress=False, plot=False, seed=9)
    assert transferred.calibration.base_predictor == str(folder)
    assert transferred.report["calibrated"]["n"] == 3
    # measured in rounds (the default), fitted to the quiet-state latency
    assert result.calibration.statistic == transferred.calibration.statistic == "quiet"


def test_generic_kernels_of_one_kernel_models_keep_their_features(rules):
    """A GELU exported alone is detected as the same generic kernels, with the same features,
    as inside a bigger model: cutting out and measuring stands for the kernel."""
    gelu = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 1), torch.nn.GELU(), torch.nn.Flatten())
    inputs = torch.zeros(1, 4, 6, 6)
    kernels = detect_kernels(onnx_for_nn_meter(export_module(gelu, inputs).onnx_bytes), rules,
                             cut=lambda k: k.generic)
    erf = next(k for k in kernels if k.op == "Erf")
    assert erf.features[2] == pytest.approx(8 * 36 / 1e6)  # elements written
    assert erf.features[4] == 6.0 and erf.features[6] == 4.0  # last dim, rank


def test_the_space_is_a_space(mixed):
    assert sum(1 for _ in zip(range(50), enumerate_samples(mixed))) == 50


def test_the_command_line_names_the_kernel_instead_of_a_traceback(home):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "harness.cli", "calibrate", "--device", "local",
                           "--space", "tests.test_kernels:DataDependentSpace", "--samples", "8",
                           "--holdout", "2"], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HARNESS_HOME=str(home)))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "IndexError" not in done.stderr
    assert "GatherElements" in done.stderr + done.stdout
    if (home / "cache.sqlite").exists():  # nothing was measured
        with Cache(home / "cache.sqlite") as cache:
            assert cache.stats()["measurements"] == 0


RICH_FUSION_RULES = dict(ORT_CPU_FUSION_RULES, BF_add_relu={"obey": True},
                         BF_conv_bn_relu={"obey": True}, BF_dwconv_bn_relu={"obey": True},
                         BF_fc_relu={"obey": True}, MON={"obey": 0})


@pytest.mark.parametrize("space_name", ["mixed", "proxyless", "tiny"])
@pytest.mark.parametrize("rule_set", ["ort-cpu", "rich"])
def test_the_fast_detector_finds_exactly_nn_meters_kernels(space_name, rule_set, tmp_path,
                                                           monkeypatch):
    """harness.predict.fast_detector (shared rule reader, pattern search only where a pattern can
    lie, no deep copies) against nn-Meter's own KernelDetector: the same kernels, with the
    same nodes, attributes and features, on subnets with SE, hswish, shuffles, attention and
    residuals, and under rules with three-op fusions."""
    from nn_meter.kernel_detector import KernelDetector

    import harness.predict.fast_detector
    from harness.spaces import ProxylessSpace, TinySpace

    space = {"mixed": MixedSpace, "proxyless": lambda: ProxylessSpace(input_size=64),
             "tiny": TinySpace}[space_name]()
    rules = tmp_path / "fusion_rules.json"
    rules.write_text(json.dumps(ORT_CPU_FUSION_RULES if rule_set == "ort-cpu"
                                else RICH_FUSION_RULES))
    samples = list(random_samples(space, 4, seed=21))
    if space_name == "mixed":
        samples.append(everything(space))

    def kernels_of(sample):
        exported = export_sample(space, sample, space.dummy_input())
        return [(k.kernel_type, k.features, k.nodes, sorted(k.info.items(), key=str))
                for k in detect_kernels(onnx_for_nn_meter(exported.onnx_bytes), str(rules))]

    fast = [kernels_of(sample) for sample in samples]
    monkeypatch.setattr(harness.predict.fast_detector, "kernel_detector", KernelDetector)
    reference = [kernels_of(sample) for sample in samples]
    assert fast == reference
    assert all(fast)
    if space_name == "mixed":  # the patterns were there to be found
        ops = {info[1] for kernels in fast for *_, items in kernels
               for info in items if info[0] == "op"}
        assert {"se", "hswish"} & ops, ops


def test_a_flat_forest_answers_as_scikit_learn(tmp_path):
    """FlatForest (all trees walked together) gives RandomForestRegressor.predict's answer
    to the last bit, on a forest as nn-Meter's builder makes them and on rows outside the
    training range."""
    from sklearn.ensemble import RandomForestRegressor

    from harness.predict.flat_forest import FlatForest

    rng = np.random.default_rng(3)
    features = rng.uniform(0, 100, size=(300, 5)).round(1)
    latencies = features[:, 0] * features[:, 1] / 50 + np.sin(features[:, 2]) + features[:, 4]
    forest = RandomForestRegressor(n_estimators=120, max_depth=50, random_state=10).fit(
        features, latencies)
    rows = np.concatenate([features[:20], rng.uniform(-50, 150, size=(30, 5)),
                           features[:5] + 1e-4])
    flat = FlatForest(forest)
    assert np.array_equal(flat.predict(rows.tolist()), forest.predict(rows))
    assert np.array_equal(flat.predict(rows[:1]), forest.predict(rows[:1]))
    with pytest.raises(ValueError, match="5 features"):
        flat.predict([[1.0, 2.0]])


def test_shapes_are_inferred_without_the_weights_as_with_them(mixed):
    """Shape inference runs on a copy of the model without its weights (harness.predict.kernels):
    every tensor gets the shape and type inference gives on the whole model."""
    from onnx import shape_inference

    from harness.predict.kernels import _graph

    exported = export_sample(mixed, everything(mixed), mixed.dummy_input())
    model = fold_shapes(onnx_for_nn_meter(exported.onnx_bytes))
    graph = _graph(model)
    whole = shape_inference.infer_shapes(model).graph
    for value in list(whole.value_info) + list(whole.output):
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        assert graph.shapes[value.name] == dims, value.name
        assert graph.types[value.name] == value.type.tensor_type.elem_type
    assert len(graph.shapes) >= len(whole.value_info) + len(whole.initializer)
