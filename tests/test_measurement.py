"""Measurement: statistics from raw samples, quality flags, JSON round trip."""
import json

import numpy as np
import pytest

from harness.store.measurement import Measurement


def make(samples, **kwargs):
    return Measurement(samples_ms=samples, source=kwargs.pop("source", "measured"),
                       device="local", graph_hash="ab" * 32, **kwargs)


def test_statistics_match_numpy():
    rng = np.random.default_rng(0)
    samples = rng.normal(10.0, 0.2, 500)
    m = make(samples)
    assert m.n == 500
    assert m.median == pytest.approx(np.median(samples))
    assert m.mean == pytest.approx(samples.mean())
    assert m.p90 == pytest.approx(np.percentile(samples, 90))
    assert m.p99 == pytest.approx(np.percentile(samples, 99))
    assert m.iqr == pytest.approx(np.percentile(samples, 75) - np.percentile(samples, 25))
    assert m.cv == pytest.approx(samples.std(ddof=1) / samples.mean())
    assert m.min == samples.min() and m.max == samples.max()
    assert m.flags == () and m.stable
    assert m.statistic("p90") == m.p90


def test_unstable_results_are_flagged_by_robust_spread_once():
    preempted = make([1.0] * 40 + [30.0, 30.0])  # two runs preempted: CV 400%, median holds
    assert preempted.cv > 1 and preempted.flags == () and preempted.stable
    wide = make([1.0, 1.0, 1.0, 1.2, 1.2, 1.2, 1.0, 1.2, 1.0, 1.2])  # CV 9.6 %, IQR/median 0.18
    assert wide.flags == ("unstable: the middle half of its runs spans 18% of the median; its "
                          "median is known to +-9.1% only",) and not wide.stable
    assert "few samples: 3" in make([1.0, 1.0, 1.0]).flags
    capped = make([1.0] * 20, provenance={"capped": True})
    assert any(flag.startswith("capped") for flag in capped.flags)


def test_every_sample_is_kept_and_survives_json():
    m = make([1.5, 2.25, 1.75] * 10, load_ms=12.0, first_run_ms=3.0,
             settings={"intra_op_threads": 1}, device_fingerprint={"cpu_model": "x"},
             agent_version="1.0", provenance={"capped": False})
    data = json.loads(json.dumps(m.to_dict()))
    assert data["samples_ms"] == [1.5, 2.25, 1.75] * 10
    assert data["stats"]["median"] == m.median and data["flags"] == list(m.flags)
    back = Measurement.from_dict(data)
    assert back == m
    assert back.with_source("cached").source == "cached"


def test_repr_is_the_report():
    text = repr(make([2.0] * 20))
    assert "median 2 ms" in text and "CV 0.0%" in text and "measured on local" in text


@pytest.mark.parametrize("samples, source", [([], "measured"), ([1.0, float("nan")], "measured"),
                                             ([-1.0], "measured"), ([1.0], "guessed")])
def test_bad_measurements_are_refused(samples, source):
    with pytest.raises(ValueError):
        make(samples, source=source)
