"""nn-Meter: migrated official pickles, bad predictor files, calibration on a real device,
and the offline fallback of LatencyProfiler.

Everything is real: nn-Meter 2.0's kernel detector, predictor and builder, scikit-learn
forests, onnxruntime measurements through our agent, OpenSSH for the unreachable device.
"""
import dataclasses
import json
import logging
import pickle

import numpy as np
import pytest
import torch

pytest.importorskip("nn_meter", reason="nn-Meter runs from .venv-extras (scripts/test)")
from sklearn.ensemble import RandomForestRegressor  # noqa: E402

from devices.errors import DeviceLost  # noqa: E402
from harness.store.cache import Cache  # noqa: E402
from harness.campaigns.calibrate import (ORT_CPU_FUSION_RULES, calibrate, fit_correction,  # noqa: E402
                               fit_log_linear)
from harness.predict.calibration import KINDS, Calibration, load_calibration  # noqa: E402
from harness.export.graph import export_sample  # noqa: E402
from harness.predict.nn_meter import (NnMeterProfiler, PredictorError, load_predictor,  # noqa: E402
                             onnx_for_nn_meter)
from harness.profiler import LatencyProfiler  # noqa: E402
from harness.predict.sklearn_pickle import LegacyPickleError, load_kernel_predictor  # noqa: E402
from harness.spaces.space import random_samples  # noqa: E402
from tests.legacy_sklearn import old_pickle_bytes  # noqa: E402
from tests.ssh_fixtures import client_key, loop, needs_root, sshd  # noqa: E402,F401,F811

# The kernel predictors of nn-Meter's official cortexA76cpu_tflite21 predictor, with the
# number of features nn-Meter computes for each.
OFFICIAL_KERNELS = {"conv-bn-relu": 7, "dwconv-bn-relu": 7, "fc": 4, "global-avgpool": 2,
                    "hswish": 2, "relu": 2, "se": 2, "split": 2, "add": 3, "addrelu": 3,
                    "maxpool": 5, "avgpool": 5, "bn": 2, "bnrelu": 2, "channelshuffle": 2,
                    "concat": 6}
CALIBRATION_SETTINGS = {"warmup_runs": 3, "min_runs": 10, "min_time_ms": 30.0,
                        "max_time_ms": 3000.0, "protocol": "loop"}


def forest(features: int, seed: int = 0) -> RandomForestRegressor:
    """A small forest on kernel-like data: latency grows with the first features."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(1, 64, size=(60, features))
    y = 0.01 + x[:, : min(3, features)].prod(axis=1) * 1e-4
    return RandomForestRegressor(n_estimators=8, max_features=None, random_state=seed).fit(x, y)


def official_folder(root, name="cortexA76cpu_tflite21"):
    """A predictor folder as nn-Meter's official zip unpacks it: 0.23 pickles + rules."""
    folder = root / name
    folder.mkdir(parents=True)
    for kernel, features in OFFICIAL_KERNELS.items():
        (folder / f"{kernel}.pkl").write_bytes(old_pickle_bytes(forest(features)))
    (folder / "fusion_rules.json").write_text(json.dumps(ORT_CPU_FUSION_RULES))
    return folder


# ---------------------------------------------------------------- migrated pickles

def test_old_pickle_fails_plainly_and_loads_migrated_with_identical_predictions(tmp_path):
    model = forest(7)
    path = tmp_path / "conv-bn-relu.pkl"
    path.write_bytes(old_pickle_bytes(model))
    with pytest.raises(ValueError, match="incompatible dtype"):  # what users hit today
        pickle.loads(path.read_bytes())
    migrated = load_kernel_predictor(path)
    probe = np.random.default_rng(5).uniform(0, 80, size=(500, 7))
    assert np.array_equal(migrated.predict(probe), model.predict(probe))
    assert migrated.n_features_in_ == 7
    # Pickled again, it is a plain current pickle.
    again = pickle.loads(pickle.dumps(migrated))
    assert type(again.estimators_[0].tree_).__name__ == "Tree"
    assert np.array_equal(again.predict(probe), model.predict(probe))


def test_current_pickles_load_unchanged(tmp_path):
    model = forest(4)
    path = tmp_path / "fc.pkl"
    path.write_bytes(pickle.dumps(model))
    probe = np.random.default_rng(1).uniform(0, 80, size=(50, 4))
    assert np.array_equal(load_kernel_predictor(path).predict(probe), model.predict(probe))


@pytest.mark.parametrize("content, problem", [
    (b"", "EOFError"),
    (b"not a pickle at all", "UnpicklingError"),
    (pickle.dumps({"weights": [1, 2]}), "no predict()"),
])
def test_broken_pickles_name_the_file(tmp_path, content, problem):
    path = tmp_path / "add.pkl"
    path.write_bytes(content)
    with pytest.raises(LegacyPickleError, match=problem) as caught:
        load_kernel_predictor(path)
    assert str(path) in str(caught.value)


# ---------------------------------------------------------------- predictor folders

@pytest.fixture
def data_folder(tmp_path, monkeypatch):
    """nn-Meter's data folder for official predictors, and no downloads allowed."""
    import nn_meter.predictor.utils as nn_meter_utils
    import harness.predict.nn_meter as predict

    folder = tmp_path / "nn_meter_data" / "predictor"
    folder.mkdir(parents=True)
    monkeypatch.setattr(predict, "nn_meter_data_folder", lambda: folder)

    def no_download(*args, **kwargs):
        raise AssertionError("harness must never download a predictor")
    monkeypatch.setattr(nn_meter_utils, "download_from_url", no_download)
    return folder


def test_official_predictor_by_name_matches_nn_meters_own_predict(tiny, data_folder):
    from nn_meter import nnMeterPredictor

    official_folder(data_folder)
    profiler = NnMeterProfiler(tiny, tiny.dummy_input(), predictor="cortexA76cpu_tflite21")
    sample = random_samples(tiny, 1, seed=4)[0]
    result = profiler.measure(sample)
    assert result.source == "predicted"
    assert result.provenance.predictor["name"] == "cortexA76cpu_tflite21"
    assert result.provenance.calibration is None
    # nn-Meter's own API, on the same kernels and rules, gives the same number.
    loaded = load_predictor(data_folder / "cortexA76cpu_tflite21")
    exported = export_sample(tiny, sample, tiny.dummy_input())
    own = nnMeterPredictor(loaded.predictors, str(loaded.fusion_rules)).predict(
        onnx_for_nn_meter(exported.onnx_bytes), "onnx")
    assert result.median == pytest.approx(own, rel=1e-12) and own > 0
    assert profiler.profile(sample) == result.median


def test_missing_official_predictor_says_where_to_put_it(tiny, data_folder):
    with pytest.raises(PredictorError) as caught:
        NnMeterProfiler(tiny, tiny.dummy_input(), predictor="cortexA76cpu_tflite21")
    text = str(caught.value)
    assert str(data_folder / "cortexA76cpu_tflite21") in text
    assert "fusion_rules.json" in text and "conv-bn-relu.pkl" in text
    assert "https://github.com/microsoft/nn-Meter/releases" in text  # where to get it
    assert "never downloads" in text


def test_unknown_predictor_names_the_known_ones(tiny, data_folder):
    with pytest.raises(PredictorError, match="cortexA76cpu_tflite21"):
        load_predictor("pixel9_tpu")
    with pytest.raises(PredictorError, match="does not exist"):
        load_predictor(str(data_folder / "nowhere"))


def test_bad_files_in_a_predictor_folder(tmp_path, data_folder):
    folder = official_folder(tmp_path)
    (folder / "fusion_rules.json").write_text("{not json")
    with pytest.raises(PredictorError, match="fusion_rules.json is not valid"):
        load_predictor(folder)
    (folder / "fusion_rules.json").write_text("{}")
    (folder / "se.pkl").write_bytes(b"\x80\x02garbage")
    with pytest.raises(PredictorError, match="se.pkl"):
        load_predictor(folder)
    (folder / "se.pkl").unlink()
    (folder / "fusion_rules.json").unlink()
    with pytest.raises(PredictorError, match="missing fusion_rules.json"):
        load_predictor(folder)


# ---------------------------------------------------------------- calibration

def test_correction_fits_power_laws_and_shrugs_off_a_slow_minority():
    rng = np.random.default_rng(0)
    wide = rng.uniform(1, 100, size=30)
    fitted = fit_correction(wide, 2.0 * wide ** 0.8)
    assert fitted.kind == "log-linear" and fitted.slope == pytest.approx(0.8)
    assert np.exp(fitted.intercept) == pytest.approx(2.0)
    # A quarter of the subnets measured while the device ran 25% faster: the scale follows
    # the majority, not the mean of the two.
    predicted = rng.uniform(10, 20, size=40)
    measured = 0.7 * predicted * np.where(np.arange(40) % 4 == 0, 0.75, 1.0)
    intercept, slope = fit_log_linear(predicted, measured, free_slope=False)
    assert slope == 1.0 and np.exp(intercept) == pytest.approx(0.7)
    fitted = fit_correction(predicted, measured)
    corrected = np.exp(fitted.intercept) * predicted ** fitted.slope
    assert np.mean(np.abs(corrected / measured - 1) <= 0.10) >= 0.75


def test_a_device_with_other_costs_per_kernel_gets_an_overheads_correction(tmp_path):
    """A target that pays its own cost per operator call and per run (an emulated board, a
    slower runtime): a scale of the whole prediction misranks its models, a scale plus costs
    per kernel and per run does not; chosen by leave-one-out only when given the counts."""
    rng = np.random.default_rng(1)
    predicted = rng.uniform(0.5, 0.8, size=20)
    kernels = rng.integers(45, 80, size=20)
    measured = 500 * predicted - 3.0 * kernels + 90.0  # per kernel less than the scale says
    fitted = fit_correction(predicted, measured, kernels)
    assert fitted.kind == "overheads"
    assert np.exp(fitted.intercept) == pytest.approx(500)
    assert fitted.per_kernel_ms == pytest.approx(-3.0) and fitted.fixed_ms == pytest.approx(90)
    assert fitted.apply(0.6, 60) == pytest.approx(500 * 0.6 - 180 + 90)
    assert fit_correction(predicted, measured).kind in ("scale", "log-linear")  # no counts
    assert fit_correction(predicted[:5], measured[:5], kernels[:5]).kind != "overheads"
    # every subnet with as many kernels: a cost per kernel and one per run are not told
    # apart, so no overheads are fitted (a least-squares split would be arbitrary)
    same = np.full(20, 60)
    assert fit_correction(predicted, 200 * predicted + 40, same).kind != "overheads"
    with pytest.raises(PredictorError, match="gives .* ms for a model of 400 kernels"):
        fitted.apply(0.6, 400)  # far outside what it was fitted on: below 0 ms, refused
    # stored and read back whole; a damaged overhead is refused with the field named
    folder = tmp_path / "calibrations" / "board"
    stored = Calibration(device="board", base_predictor=str(tmp_path), base_predictor_digest="",
                         intercept=fitted.intercept, slope=1.0, kind="overheads",
                         per_kernel_ms=fitted.per_kernel_ms, fixed_ms=fitted.fixed_ms,
                         device_fingerprint="", agent_version="", settings_key="", space="s",
                         space_fingerprint="", input_signature=[], n_train=20, n_holdout=0)
    stored.save(folder)
    loaded = load_calibration("board", tmp_path)
    assert loaded == stored and loaded.correct(0.6, 60) == pytest.approx(fitted.apply(0.6, 60))
    data = json.loads((folder / "calibration.json").read_text())
    (folder / "calibration.json").write_text(json.dumps(dict(data, fixed_ms=1e300)))
    with pytest.raises(PredictorError, match="fixed_ms is 1e"):
        load_calibration("board", tmp_path)
    # a file written before overheads existed has none, and reads as before; one of another
    # kind with such costs is refused (they would be ignored)
    old = {k: v for k, v in data.items() if k not in ("per_kernel_ms", "fixed_ms")}
    (folder / "calibration.json").write_text(json.dumps(dict(old, kind="scale")))
    assert load_calibration("board", tmp_path).correct(2.0, 60) == \
        pytest.approx(2.0 * np.exp(fitted.intercept))
    (folder / "calibration.json").write_text(json.dumps(dict(data, kind="scale")))
    with pytest.raises(PredictorError, match="a scale correction has costs per kernel"):
        load_calibration("board", tmp_path)
    # a scale or power law is written without the two fields, as an older harness wrote it
    dataclasses.replace(stored, kind="scale", per_kernel_ms=0.0, fixed_ms=0.0).save(folder)
    assert "fixed_ms" not in json.loads((folder / "calibration.json").read_text())


def test_calibration_on_local_beats_the_uncalibrated_predictor(tiny, home, tmp_path):
    official = official_folder(tmp_path)
    result = calibrate(tiny, tiny.dummy_input(), "local", samples=14, holdout=8,
                       predictor=str(official), settings=CALIBRATION_SETTINGS, progress=False)
    report = result.report
    assert set(report) == {"nn-Meter cortexA76cpu_tflite21", "nn-Meter device kernels",
                           "calibrated"}
    for metrics in report.values():
        assert metrics["n"] == 8 and 0 <= metrics["acc10"] <= 1
    assert report["calibrated"]["rmspe"] < report["nn-Meter device kernels"]["rmspe"]
    assert report["calibrated"]["rmspe"] < report["nn-Meter cortexA76cpu_tflite21"]["rmspe"]
    # Stored under $HARNESS_HOME: the correction, a PNG, and kernel predictors in nn-Meter's
    # own format (nn-Meter's own loader reads them).
    folder = home / "calibrations" / "local"
    assert result.folder == folder and (folder / "accuracy.png").stat().st_size > 10_000
    calibration = load_calibration("local")
    assert calibration.kind in KINDS and calibration.n_train == 14
    from nn_meter.predictor.utils import loading_customized_predictor
    kernels, rules = loading_customized_predictor({
        "name": "local", "package_location": str(folder / "kernels"),
        "kernel_predictors": ["conv-bn-relu", "dwconv-bn-relu"]})
    assert {"conv-bn-relu", "dwconv-bn-relu", "fc"} <= set(kernels)
    measured_kernels = json.loads((folder / "kernels" / "kernels.json").read_text())
    assert sum(map(len, measured_kernels.values())) >= 10
    # The kernels were measured through the profiler: they are in the measurement cache.
    with Cache(home / "cache.sqlite") as cache:
        measurements = cache.stats()["measurements"]
        assert measurements >= 22 + 10
    assert calibration.statistic == "median"
    # Calibrated to the fastest run of each subnet and kernel instead (a shared device):
    # from the same measurements, none taken again.
    by_min = calibrate(tiny, tiny.dummy_input(), "local", samples=14, holdout=8,
                       predictor=str(official), settings=CALIBRATION_SETTINGS, progress=False,
                       statistic="min")
    assert load_calibration("local").statistic == "min" == by_min.calibration.describe()[
        "statistic"]
    with Cache(home / "cache.sqlite") as cache:
        assert cache.stats()["measurements"] == measurements
    training = json.loads((folder / "training.json").read_text())
    with LatencyProfiler(tiny, tiny.dummy_input(), "local", statistic="min",
                         settings=CALIBRATION_SETTINGS) as profiler:
        assert training["measured_ms"] == [profiler.profile(json.loads(s))
                                           for s in training["samples"]]
    kernel_data = json.loads((folder / "kernels" / "kernels.json").read_text())
    assert any(float(item["latency"].split()[0]) < float(m.split()[0])
               for kind, items in kernel_data.items() for key, item in items.items()
               for m in [measured_kernels[kind][key]["latency"]]
               if key in measured_kernels.get(kind, {}))
    with pytest.raises(PredictorError, match="unknown statistic"):
        calibrate(tiny, tiny.dummy_input(), "local", samples=14, holdout=8,
                  predictor=str(official), statistic="fastest")


def test_kernel_models_are_the_kernels_they_stand_for(tiny, tmp_path):
    """Each kernel of a real subnet, built as a one-kernel model and exported, is detected as
    one kernel with the same nn-Meter features: what calibration measures is what nn-Meter
    predicts."""
    from harness.campaigns.calibrate import kernel_model
    from harness.export.graph import export_module
    from harness.predict.nn_meter import KernelPredictors

    rules = tmp_path / "fusion_rules.json"
    rules.write_text(json.dumps(ORT_CPU_FUSION_RULES))
    detector = KernelPredictors("ort", tmp_path, {}, rules, "")
    exported = export_sample(tiny, random_samples(tiny, 1, seed=2)[0], tiny.dummy_input())
    kernels = detector.kernels(exported.onnx_bytes)
    assert {k.op for k in kernels} >= {"conv", "conv-relu", "dwconv-relu", "gap", "fc"}
    for kernel in kernels:
        assert not kernel.generic, kernel.op  # nn-Meter's own features describe them all
        module, inputs = kernel_model(kernel.info)
        # nn-Meter's splitter drops a graph's only node, so a Flatten (a generic kernel)
        # follows it here.
        probe = _Flattened(module)
        found = [(k.kernel_type, k.features) for k in detector.kernels(
            export_module(probe, inputs).onnx_bytes) if not k.generic]
        assert found == [(kernel.kernel_type, kernel.features)], kernel.op


class _Flattened(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, *inputs):
        return torch.flatten(self.inner(*inputs), 1)


def test_corrupt_calibration_file_is_a_clear_error(home):
    folder = home / "calibrations" / "local"
    folder.mkdir(parents=True)
    (folder / "calibration.json").write_text('{"device": "local"}')
    with pytest.raises(PredictorError, match="harness calibrate --device local"):
        load_calibration("local")
    from harness.predict.calibration import Calibration

    Calibration(device="local", base_predictor=str(folder), base_predictor_digest="", intercept=0.0,
                slope=1.0, kind="scale", device_fingerprint="", agent_version="",
                settings_key="", space="", space_fingerprint="", input_signature=[], n_train=2,
                n_holdout=2, statistic="fastest").save(folder)
    with pytest.raises(PredictorError, match='statistic is "fastest", not one of'):
        load_calibration("local")


# ---------------------------------------------------------------- the fallback

@needs_root
def test_unreachable_device_falls_back_to_its_calibration(tiny, home, loop, sshd, caplog):
    # as many subnets as the test above, whose calibration beats its predictor: one that did
    # not would be stored apart and not become the fallback this test is about
    result = calibrate(tiny, tiny.dummy_input(), "loop", samples=14, holdout=8,
                       settings=CALIBRATION_SETTINGS, progress=False)
    assert result.activated, result.warning
    with Cache(home / "cache.sqlite") as cache:
        stored = cache.stats()["measurements"]
    sshd.stop()  # the board is gone
    fresh = random_samples(tiny, 3, seed=99)
    with LatencyProfiler(tiny, tiny.dummy_input(), "loop", settings=CALIBRATION_SETTINGS,
                         fallback="error") as strict:
        with pytest.raises(DeviceLost):
            strict.profile(fresh[0])
    with LatencyProfiler(tiny, tiny.dummy_input(), "loop", settings=CALIBRATION_SETTINGS,
                         fallback="nn-meter") as profiler:
        predicted = profiler.measure(fresh[0])
        assert predicted.source == "predicted"
        assert predicted.provenance.calibration["device"] == "loop"
        expected = NnMeterProfiler(tiny, tiny.dummy_input(),
                                   calibration=result.calibration).profile(fresh[0])
        assert predicted.median == pytest.approx(expected)
        assert profiler.profile(fresh[0]) == pytest.approx(expected)
        # A subnet measured during calibration still answers from the cache, as measured.
        trained = json.loads((result.folder / "holdout.json").read_text())["samples"][0]
        assert profiler.measure(json.loads(trained)).source == "cached"
        many = profiler.measure_many(fresh)
        assert [m.source for m in many] == ["predicted"] * 3
        assert profiler.counters["measurements"] == 0
    with Cache(home / "cache.sqlite") as cache:  # no prediction was stored as a measurement
        assert cache.stats()["measurements"] == stored
    # a profiler answering with another statistic than the calibration predicts is told so
    with LatencyProfiler(tiny, tiny.dummy_input(), "loop", "min", settings=CALIBRATION_SETTINGS,
                         fallback="nn-meter") as by_min:
        with caplog.at_level(logging.WARNING, logger="harness.steps.fallback"):
            by_min.profile(fresh[1])
    assert "predicts each subnet's median run, the profiler answers with the min" in caplog.text


def test_offline_profiler_never_contacts_the_device(tiny, home, tmp_path):
    official = official_folder(tmp_path)
    with pytest.raises(Exception, match="fallback='nn-meter'"):
        LatencyProfiler(tiny, tiny.dummy_input(), "nowhere", offline=True)
    # "nowhere" is not even registered: offline, only the predictor is used.
    with LatencyProfiler(tiny, tiny.dummy_input(), "nowhere", fallback="nn-meter",
                         predictor=str(official), offline=True) as profiler:
        values = profiler.profile_many(random_samples(tiny, 4, seed=1))
        assert all(v > 0 for v in values)
        assert profiler.counters["predictions"] == 4 and not profiler.pool._clients
    with LatencyProfiler(tiny, tiny.dummy_input(), "nowhere", fallback="nn-meter",
                         offline=True) as bare:
        with pytest.raises(PredictorError, match="harness calibrate --device nowhere"):
            bare.profile(random_samples(tiny, 1)[0])


def test_calibrate_and_offline_profile_from_the_command_line(home):
    import subprocess
    import sys

    def harness(*args):
        done = subprocess.run([sys.executable, "-m", "harness.cli", *args],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        assert "pkg_resources" not in done.stderr  # nn-Meter's notice stays out of the terminal
        return done.stdout

    # few short rounds (the test is of the command line, not of the figures)
    few_rounds = ("--rounds", "4", "--block-ms", "2", "--ref-gap-ms", "6")
    calibrated = json.loads(harness(
        "calibrate", "--device", "local", "--space", "harness.spaces:TinySpace",
        "--samples", "8", "--holdout", "3", *few_rounds, "--json"))
    assert set(calibrated["report"]) == {"nn-Meter device kernels", "calibrated"}
    assert calibrated["png"].endswith("accuracy.png")
    table = harness("calibrate", "--device", "local", "--space", "harness.spaces:TinySpace",
                    "--samples", "8", "--holdout", "3", *few_rounds)
    assert "+-10% acc" in table and "Kendall tau" in table and "correction (" in table
    assert calibrated["kind"] in KINDS
    assert calibrated["kind"] == "overheads" or calibrated["per_kernel_ms"] == 0 == \
        calibrated["fixed_ms"]
    lines = harness("profile", "--space", "harness.spaces:TinySpace", "--device", "local",
                    "--samples", "2", "--seed", "7", "--offline", "--json").splitlines()
    rows = [json.loads(line) for line in lines[:-1]]
    assert [row["source"] for row in rows] == ["predicted", "predicted"]
    # a calibrated prediction carries an interval from its held-out error, and no statistics
    # of runs it does not have
    assert all(row["interval_low_ms"] < row["median_ms"] < row["interval_high_ms"]
               for row in rows)
    assert all(row["n"] is None and row["cv"] is None and row["p99_ms"] is None
               for row in rows)
    assert json.loads(lines[-1])["summary"]["predicted"] == 2
    table = harness("profile", "--space", "harness.spaces:TinySpace", "--device", "local",
                    "--samples", "2", "--seed", "7", "--offline")
    predicted = [line for line in table.splitlines() if line.rstrip().endswith("prediction")]
    assert len(predicted) == 2 and " ok" not in table


def test_a_precision_variant_is_detected_apart_from_its_float_source(tiny, data_folder):
    """Kernel detection is memoized by the exported model's variant key (its graph hash,
    which a converted variant keeps, and the precision it was converted to): the int8 model
    is not given its float source's kernels, and a second look is a memo hit."""
    from harness.export.model_file import convert

    official_folder(data_folder)
    profiler = NnMeterProfiler(tiny, tiny.dummy_input(), predictor="cortexA76cpu_tflite21")
    exported = export_sample(tiny, random_samples(tiny, 1, seed=4)[0], tiny.dummy_input())
    variant = convert(exported, "int8-dynamic", {"input": list(tiny.dummy_input().shape)})
    assert variant.graph_hash == exported.graph_hash
    assert variant.variant_key != exported.variant_key == exported.graph_hash
    source = profiler.predictor.kernels(exported.onnx_bytes, exported.variant_key)
    converted = profiler.predictor.kernels(variant.onnx_bytes, variant.variant_key)
    assert [k.op for k in converted] != [k.op for k in source]
    assert profiler.predictor.kernels(b"", variant.variant_key) is converted  # memoized


def test_composed_subnets_are_predicted_from_their_pieces_as_from_their_whole_graph(
        tiny, data_folder):
    """A composed subnet's kernels are its pieces' kernels, each piece detected once: after
    PIECE_CHECKS subnets agreed with their whole graphs, predictions come from the pieces and
    equal the whole graph's; a model whose pieces disagree with its graph turns it off."""
    import dataclasses

    from harness.predict.nn_meter import PIECE_CHECKS

    official_folder(data_folder)
    profiler = NnMeterProfiler(tiny, tiny.dummy_input(), predictor="cortexA76cpu_tflite21")
    predictor = profiler.predictor
    samples = random_samples(tiny, PIECE_CHECKS + 4, seed=6)
    for number, sample in enumerate(samples, 1):
        exported = export_sample(tiny, sample, tiny.dummy_input())
        assert exported.pieces
        whole = predictor.predict_kernels(predictor.kernels(exported.onnx_bytes))
        assert profiler.predict_exported(exported).median == pytest.approx(whole, rel=1e-12)
        assert profiler._pieces_agree is (True if number >= PIECE_CHECKS else None)
    # pieces of another subnet than the bytes: caught while checking, whole graphs from then on
    fresh = NnMeterProfiler(tiny, tiny.dummy_input(), predictor=predictor)
    one, other = (export_sample(tiny, s, tiny.dummy_input())
                  for s in random_samples(tiny, 2, seed=7))
    assert [p.key for p in one.pieces] != [p.key for p in other.pieces]
    mixed = dataclasses.replace(one, pieces=other.pieces)
    whole = predictor.predict_kernels(predictor.kernels(one.onnx_bytes))
    assert fresh.predict_exported(mixed).median == pytest.approx(whole, rel=1e-12)
    assert fresh._pieces_agree is False


def test_calibrate_on_litert_corrects_the_tflite_predictor_beside_onnxruntimes(tiny, home,
                                                                                 tmp_path):
    pytest.importorskip("litert_torch")
    from harness.errors import HarnessError
    official = official_folder(tmp_path)
    settings = dict(CALIBRATION_SETTINGS, runtime="litert")
    with pytest.raises(HarnessError, match="--no-kernels"):
        calibrate(tiny, tiny.dummy_input(), "local", samples=6, holdout=4,
                  predictor=str(official), settings=settings, build_kernels=True,
                  progress=False)
    result = calibrate(tiny, tiny.dummy_input(), "local", samples=6, holdout=4,
                       predictor=str(official), settings=settings, progress=False)
    assert result.folder == home / "calibrations" / "local@litert"
    stored = load_calibration("local", runtime="litert")
    assert stored is not None and load_calibration("local") is None  # onnxruntime's apart
    with LatencyProfiler(tiny, tiny.dummy_input(), "local", runtime="litert",
                         settings=CALIBRATION_SETTINGS) as profiler:
        assert stored.settings_key == profiler.settings_key
        measured = profiler.measure(random_samples(tiny, 1, seed=0)[0])
    assert measured.provenance.runtime["name"] == "litert"
