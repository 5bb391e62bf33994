"""Simulated devices (devices.simulated): the agent's stop rules on a virtual clock, seeded
latencies, units that are distinct devices to the cache, and devices taken down and back."""
import time

import pytest

from devices import registry
from devices.errors import BadRequest, DeviceLost, InferenceError
from devices.simulated import SimulatedClient, SimulatedModel, down_path, simulated_names
from harness import Cache, LatencyProfiler, random_samples

QUICK = {"warmup_runs": 1, "min_runs": 5, "min_time_ms": 0.0}


def add_sims(home, names, kind="sim", median_ms=2.0, seed=0):
    for name in names:
        registry.add_device(home, registry.DeviceConfig(
            name=name, transport="sim", address="npu-sim", kind=kind, sim_ms=median_ms,
            sim_seed=seed))


def test_latencies_are_seeded_and_the_stop_rules_run(tmp_path):
    client = SimulatedClient("s0", SimulatedModel("npu", median_ms=2.0, cv=0.05), tmp_path)
    twin = SimulatedClient("s1", SimulatedModel("npu", median_ms=2.0, cv=0.05), tmp_path)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    deadline = time.monotonic() + 60
    fixed = client.measure(str(model), dict(QUICK, min_runs=40), deadline, sha256="a" * 64)
    again = twin.measure(str(model), dict(QUICK, min_runs=40), deadline, sha256="a" * 64)
    other = client.measure(str(model), dict(QUICK, min_runs=40), deadline, sha256="b" * 64)
    assert fixed.samples_ms == again.samples_ms  # same model, same graph: same numbers
    assert fixed.samples_ms != other.samples_ms
    assert len(fixed.samples_ms) == 40 and fixed.stop["reason"] == "fixed"
    assert 1.0 <= sorted(fixed.samples_ms)[20] <= 4.0  # graphs spread from half to twice
    precise = client.measure(str(model), {"stop": "ci", "rel_ci": 0.05, "warmup_runs": 1},
                             deadline, sha256="a" * 64)
    assert precise.stop["reason"] == "precise" and len(precise.samples_ms) < 40
    # each unit is its own device to the cache; the model is what they share
    assert fixed.facts.identity["unit"] == "s0" and again.facts.identity["unit"] == "s1"


def test_a_simulated_device_spends_the_time_it_reports(tmp_path):
    client = SimulatedClient("s0", SimulatedModel("npu", median_ms=5.0, load_ms=10.0),
                             tmp_path)
    started = time.monotonic()
    result = client.measure(str(tmp_path / "m"), dict(QUICK, min_runs=20),
                            time.monotonic() + 60, sha256="c" * 64)
    took = time.monotonic() - started
    busy = (result.load_ms + (result.warmup_ms or 0) + result.loop_ms) / 1e3
    assert took >= busy * 0.99  # it sleeps through the loop it simulated


def test_a_device_taken_down_is_lost_until_brought_back(tmp_path):
    add_sims(tmp_path, ["s0"])
    client = registry.open_client("s0", tmp_path)
    down = down_path(tmp_path, "s0")
    down.parent.mkdir(parents=True)
    down.touch()
    with pytest.raises(DeviceLost, match="s0 is down"):
        client.facts(time.monotonic() + 5)
    down.unlink()
    assert client.facts(time.monotonic() + 5).identity["unit"] == "s0"


def test_a_kind_answers_from_any_unit_a_named_device_only_from_its_own(tiny, tmp_path):
    names = simulated_names("s", 3)
    add_sims(tmp_path, names)
    samples = random_samples(tiny, 6, seed=4)

    def profiler(device):
        return LatencyProfiler(tiny, tiny.dummy_input(), device=device, home=tmp_path,
                               settings=QUICK)

    for unit, part in ((names[1], samples[:2]), (names[2], samples[2:4])):
        with profiler(unit) as on_unit:
            assert {m.source for m in on_unit.measure_many(part)} == {"measured"}
    with profiler("kind:sim") as kind:
        sources = [m.source for m in kind.measure_many(samples)]
    assert sources[:4] == ["cached"] * 4  # measured by other units of the model
    with Cache(tmp_path / "cache.sqlite") as cache:
        assert cache.stats()["fingerprints"] == 3  # three units, three devices to the cache
    with profiler(names[1]) as one:
        sources = [m.source for m in one.measure_many(samples[:4])]
    assert sources == ["cached", "cached", "measured", "measured"]  # only its own answers


def test_the_registry_checks_simulated_entries(tmp_path):
    (tmp_path / "devices.toml").write_text(
        '[devices.s0]\ntransport = "sim"\naddress = "npu"\nsim_ms = -1\n')
    with pytest.raises(registry.RegistryError, match="sim_ms = -1 is not a positive number"):
        registry.load_devices(tmp_path)


def test_graph_costs_add_up_blocks_to_the_network_they_make(tiny, tmp_path):
    """Under "graph" costs a subnet costs its blocks (each exported alone) plus one fixed cost
    of a run (the identity model's), exactly: what lets a lookup table be scored against an
    exact truth on a replaying device."""
    import torch

    from harness.export.graph import export_module, export_sample
    from harness.search.lut import _Identity
    from harness.spaces.additive import chosen_blocks

    spec = SimulatedModel("npu", median_ms=2.0, seed=3, costs="graph")
    dummy = tiny.dummy_input()
    identity = export_module(_Identity(), dummy)
    fixed_ms = spec.graph_median_ms(identity.sha256, identity.onnx_bytes)
    for sample in random_samples(tiny, 3, seed=1):
        whole = export_sample(tiny, sample, dummy, home=tmp_path)
        blocks = [export_module(block.build(), torch.randn(block.input_shape))
                  for block in chosen_blocks(tiny.additive_terms(tuple(dummy.shape)), sample)]
        parts = sum(spec.graph_median_ms(b.sha256, b.onnx_bytes) - fixed_ms for b in blocks)
        assert spec.graph_median_ms(whole.sha256, whole.onnx_bytes) == \
            pytest.approx(fixed_ms + parts, rel=1e-9)
        assert parts > 0
        # exported whole, the exporter shares equal weights (zero biases) across blocks
        # through Identity nodes: read as the weights they alias, they change no cost
        frozen = export_module(tiny.freeze(sample), dummy)
        assert spec.graph_median_ms(frozen.sha256, frozen.onnx_bytes) == \
            pytest.approx(fixed_ms + parts, rel=1e-9)
    # a graph not yet read cannot be priced; a file that is not ONNX is the request's fault
    with pytest.raises(BadRequest, match="not been seen"):
        spec.graph_median_ms("f" * 64)
    with pytest.raises(BadRequest, match="could not read the model"):
        spec.graph_median_ms("e" * 64, b"not onnx")
    with pytest.raises(BadRequest, match="without operators or outputs"):
        spec.graph_median_ms("d" * 64, b"")  # parses as an empty protobuf
    with pytest.raises(BadRequest, match="costs must be one of"):
        SimulatedModel("npu", costs="guess")


def test_a_replaying_device_with_graph_costs_measures_a_model_from_its_file(tiny, tmp_path):
    registry.add_device(tmp_path, registry.DeviceConfig(
        name="g0", transport="sim", address="npu-sim", sim_ms=2.0, sim_seed=3,
        sim_costs="graph"))
    with LatencyProfiler(tiny, tiny.dummy_input(), device="g0", home=tmp_path,
                         settings=QUICK) as profiler:
        sample = random_samples(tiny, 1, seed=2)[0]
        measured = profiler.measure(sample)
        exported = profiler.export(sample)
    expected = SimulatedModel("npu-sim", 2.0, seed=3, costs="graph").graph_median_ms(
        exported.sha256, exported.onnx_bytes)
    assert measured.median == pytest.approx(expected, rel=0.05)  # runs drawn around it
    assert measured.device_fingerprint["costs"] == "graph"
    with pytest.raises(BadRequest, match='sim_costs = "guess" is not one of'):
        registry.add_device(tmp_path, registry.DeviceConfig(
            name="g1", transport="sim", address="npu-sim", sim_costs="guess"))


def test_a_lookup_table_on_a_replaying_device_with_graph_costs_recovers_the_exact_truth(
        tiny, tmp_path):
    """The claim the lookup-table benchmark's replay rests on: built in rounds on a device
    replaying a recorded trace, the table's ratios to the reference add up to the subnets'
    exact ones (the trace's noise is all that stands between them)."""
    from pathlib import Path

    from harness.export.graph import export_sample
    from harness.search.lut import LatencyLUT

    trace = Path(__file__).parent / "fixtures" / "noise" / "idle.json"
    registry.add_device(tmp_path, registry.DeviceConfig(
        name="g0", transport="sim", address="npu-sim", sim_ms=2.0, sim_seed=3,
        sim_costs="graph", noise_trace=str(trace)))
    dummy = tiny.dummy_input()
    checks = random_samples(tiny, 4, seed=5)
    with LatencyProfiler(tiny, dummy, device="g0", home=tmp_path, statistic="ratio") as profiler:
        lut = LatencyLUT.build(tiny, dummy, profiler, fit_samples=random_samples(tiny, 4, seed=6))
        reference = profiler.reference()
    spec = SimulatedModel("npu-sim", 2.0, seed=3, costs="graph")
    reference_ms = spec.graph_median_ms(reference.sha256, reference.onnx_bytes)
    for sample in checks:
        whole = export_sample(tiny, sample, dummy, home=tmp_path)
        truth = spec.graph_median_ms(whole.sha256, whole.onnx_bytes) / reference_ms
        assert lut.profile(sample) == pytest.approx(truth, rel=0.03)
    assert lut.overhead_scale == pytest.approx(1.0, abs=0.5)  # the identity is the fixed cost


def test_a_model_that_breaks_mid_window_is_its_own_error_and_the_others_go_on(
        tmp_path, monkeypatch):
    """As the agent answers: a simulated candidate whose runs fail mid-window is that
    model's InferenceError (with the round), and the window's other candidate keeps its
    result; a window whose every candidate broke answers with their errors alone."""
    client = SimulatedClient("s0", SimulatedModel("npu", median_ms=2.0), tmp_path)
    steady = SimulatedModel.runner
    calls: dict = {}

    def runner(spec, sha256, clock):
        run = steady(spec, sha256, clock)
        if sha256[0] not in "bd":  # graphs b... and d... break
            return run

        def breaking():  # its warm-up and probes, a few good blocks, then it fails
            calls[sha256] = calls.get(sha256, 0) + 1
            if calls[sha256] > 30:
                raise RuntimeError("device memory gone")
            run()
        return breaking

    monkeypatch.setattr(SimulatedModel, "runner", runner)
    model = tmp_path / "m.onnx"
    model.write_bytes(b"not read")
    settings = {"protocol": "rounds", "rounds": 20, "block_ms": 5.0, "max_time_ms": 1e6,
                "warmup_runs": 1}
    reference = (str(model), "c" * 64)
    results, errors = client.measure_rounds(
        {"good": (str(model), "a" * 64), "breaks": (str(model), "b" * 64)}, reference,
        settings, time.monotonic() + 60)
    assert set(results) == {"good"} and set(errors) == {"breaks"}
    assert isinstance(errors["breaks"], InferenceError) and errors["breaks"].device == "s0"
    assert "device memory gone" in str(errors["breaks"]) and "in round " in str(errors["breaks"])
    assert results["good"].rounds is not None and results["good"].rounds.completed == 20
    calls.clear()
    results, errors = client.measure_rounds(
        {"breaks": (str(model), "b" * 64), "breaks too": (str(model), "d" * 64)}, reference,
        settings, time.monotonic() + 60)
    assert results == {} and set(errors) == {"breaks", "breaks too"}
    assert all(isinstance(error, InferenceError) for error in errors.values())
