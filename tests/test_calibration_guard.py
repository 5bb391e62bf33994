"""A calibration cannot make predictions worse silently: one whose held-out RMSPE is worse
than the raw predictor's is stored apart and never becomes the device's fallback (the one in
use stays), with a warning naming both figures; progress lines for a pipe; the age of the
measurements it reused; `fresh` measures anew. Real nn-Meter, real measurements on `local`."""
import dataclasses
import json
import math

import pytest

pytest.importorskip("nn_meter", reason="nn-Meter runs from .venv-extras (scripts/test)")

from harness.campaigns import calibrate as calibrating  # noqa: E402
from harness.predict.calibration import Calibration, load_calibration  # noqa: E402
from harness.spaces import TinySpace  # noqa: E402
from tests.conftest import FEW_ROUNDS  # noqa: E402

SETTINGS = dict(FEW_ROUNDS, warmup_runs=2, min_runs=5, min_time_ms=5.0, max_time_ms=2000.0)


def test_worse_than_raw_compares_held_out_rmspe():
    report = {"nn-Meter device kernels": {"rmspe": 8.1}, "calibrated": {"rmspe": 14.4}}
    assert calibrating._worse_than_raw(report, "nn-Meter device kernels")
    report["calibrated"]["rmspe"] = 7.9
    assert not calibrating._worse_than_raw(report, "nn-Meter device kernels")


def _previous(home) -> Calibration:
    """A calibration already in use for local."""
    folder = home / "calibrations" / "local"
    previous = Calibration(device="local", base_predictor=str(folder / "kernels"),
                           base_predictor_digest="d", intercept=0.1, slope=1.0, kind="scale",
                           device_fingerprint="f", agent_version="a", settings_key="s",
                           space="earlier", space_fingerprint="sf", input_signature=[],
                           n_train=100, n_holdout=20)
    previous.save(folder)
    return previous


def test_a_calibration_worse_than_its_predictor_is_stored_but_not_activated(home, monkeypatch):
    previous = _previous(home)
    honest = calibrating.fit_correction

    def hundredfold(predicted, measured, kernels=None):
        """The honest fit, then a hundred times too slow: sure to make things worse."""
        fitted = honest(predicted, measured, kernels)
        return dataclasses.replace(fitted, intercept=fitted.intercept + math.log(100.0),
                                   per_kernel_ms=100 * fitted.per_kernel_ms,
                                   fixed_ms=100 * fitted.fixed_ms)

    monkeypatch.setattr(calibrating, "fit_correction", hundredfold)
    space = TinySpace()
    lines = []
    result = calibrating.calibrate(space, space.dummy_input(), "local", samples=8, holdout=3,
                                   settings=SETTINGS, progress=False, plot=False,
                                   on_progress=lines.append)
    assert not result.activated
    raw, worse = result.report["nn-Meter device kernels"], result.report["calibrated"]
    assert worse["rmspe"] > raw["rmspe"]
    assert f"RMSPE {worse['rmspe']:.1f}% against {raw['rmspe']:.1f}%" in result.warning
    assert "not made local's fallback" in result.warning
    # stored apart, with its own kernel predictors; the calibration in use is untouched
    folder = home / "calibrations" / "local"
    assert result.folder == folder / "not-activated"
    stored = json.loads((folder / "not-activated" / "calibration.json").read_text())
    assert stored["base_predictor"] == str(folder / "not-activated" / "kernels")
    assert (folder / "not-activated" / "kernels" / "kernels.json").is_file()
    assert (folder / "not-activated" / "holdout.json").is_file()
    assert load_calibration("local") == previous
    assert not (folder / "kernels").exists() and not (folder / ".candidate").exists()
    # progress lines for a pipe: each step, and the measuring in tenths
    assert any(line.startswith("calibrate: exporting 8 training and 3 held-out") for line in lines)
    assert any("subnets measured 11/11" in line for line in lines)
    assert any("kernels measured" in line for line in lines)
    assert result.reused["of"] > 11  # subnets and kernels
    first_measured = result.reused["of"]

    # Again with the honest fit: every measurement comes from the cache (and says how old),
    # and a calibration at least as good as its predictor is activated.
    monkeypatch.setattr(calibrating, "fit_correction", honest)
    again = calibrating.calibrate(space, space.dummy_input(), "local", samples=8, holdout=3,
                                  settings=SETTINGS, progress=False, plot=False)
    assert again.reused["count"] == again.reused["of"] == first_measured
    assert 0 <= again.reused["newest_s"] <= again.reused["oldest_s"] < 600
    if again.activated:
        assert load_calibration("local").n_train == 8 and again.folder == folder
        assert not (folder / "not-activated").exists()  # superseded
        assert json.loads((folder / "calibration.json").read_text())["base_predictor"] == \
            str(folder / "kernels")
    else:  # the honest fit can lose too on so few subnets: then the old one stays in use
        assert load_calibration("local") == previous and "RMSPE" in again.warning

    # fresh: nothing reused
    fresh = calibrating.calibrate(space, space.dummy_input(), "local", samples=8, holdout=3,
                                  settings=SETTINGS, progress=False, plot=False, fresh=True)
    assert fresh.reused["count"] == 0 and fresh.reused["of"] == first_measured
