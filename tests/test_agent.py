"""The on-device agent, run as the device runs it: a separate Python process speaking JSON."""
import ast
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.conftest import AGENT, FAST, python


def run_agent(*args, timeout=120):
    proc = subprocess.run([python(), str(AGENT), *args], capture_output=True, text=True,
                          timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, f"agent must print exactly one JSON line, got {proc.stdout!r}"
    return proc.returncode, json.loads(lines[0])


def measure(model, settings=None, sha256=None):
    args = ["measure", "--model", str(model), "--settings", json.dumps(settings or FAST)]
    if sha256:
        args += ["--sha256", sha256]
    return run_agent(*args)


def test_good_model_reports_raw_samples_and_provenance(tiny_model):
    settings = dict(FAST, min_runs=30, min_time_ms=20.0, intra_op_threads=1)
    code, result = measure(tiny_model, settings,
                           hashlib.sha256(tiny_model.read_bytes()).hexdigest())
    assert code == 0, result
    assert len(result["samples_ms"]) >= 30
    assert all(s > 0 for s in result["samples_ms"])
    assert result["loop_ms"] >= 20.0 and not result["capped"]
    assert result["load_ms"] > 0 and result["first_run_ms"] > 0
    assert result["inputs"] == [{"name": "input0", "shape": [1, 3, 32, 32], "dtype": "float32"}]
    assert result["runtime"] == {"name": "onnxruntime", "version": ort.__version__,
                                 "provider": "CPUExecutionProvider"}
    assert result["settings"]["intra_op_threads"] == 1
    identity = result["fingerprint"]["identity"]
    assert identity["onnxruntime"] == ort.__version__
    assert identity["cpu_count"] >= 1 and identity["cpu_model"]
    assert "thermal" in result["fingerprint"]["state"]
    assert isinstance(result["thermal_before"], list)


def test_time_cap_stops_the_loop_and_says_so(tiny_model):
    code, result = measure(tiny_model, dict(FAST, min_runs=10**9, min_time_ms=50.0,
                                            max_time_ms=100.0))
    assert code == 0
    assert result["capped"] is True
    assert 100.0 <= result["loop_ms"] < 1000.0


def test_corrupt_model_is_a_load_error(tmp_path):
    model = tmp_path / "corrupt.onnx"
    model.write_bytes(b"\x08\x07this is not protobuf" * 10)
    code, result = measure(model)
    assert code == 1
    assert result["error"]["kind"] == "LOAD"
    assert "cannot load" in result["error"]["message"]


def test_missing_or_damaged_file_is_a_transfer_error(tmp_path, tiny_model):
    code, result = measure(tmp_path / "absent.onnx")
    assert result["error"]["kind"] == "TRANSFER"
    code, result = measure(tiny_model, sha256="0" * 64)
    assert result["error"]["kind"] == "TRANSFER"
    assert "sha256" in result["error"]["message"]


def test_wrong_input_shape_or_name_is_a_user_error(tiny_model):
    code, result = measure(tiny_model, dict(FAST, input_shapes={"input0": [1, 3, 64, 64]}))
    assert result["error"]["kind"] == "USER"
    assert "[1, 3, 32, 32]" in result["error"]["message"]
    code, result = measure(tiny_model, dict(FAST, input_shapes={"image": [1, 3, 32, 32]}))
    assert result["error"]["kind"] == "USER"
    assert "input0" in result["error"]["message"]


def test_symbolic_dims_need_and_take_input_shapes(dynamic_model):
    code, result = measure(dynamic_model)
    assert result["error"]["kind"] == "USER" and "input_shapes" in result["error"]["message"]
    code, result = measure(dynamic_model, dict(FAST, input_shapes={"x": [3, 4]}))
    assert code == 0 and result["inputs"][0]["shape"] == [3, 4]


def test_model_failing_at_run_time_is_a_runtime_error(failing_model):
    code, result = measure(failing_model)
    assert result["error"]["kind"] == "RUNTIME"
    assert "inference failed" in result["error"]["message"]


@pytest.mark.parametrize("settings, word", [
    ({"min_runs": 0}, "min_runs"),
    ({"threads": 2}, "unknown settings threads"),
    ({"graph_optimization_level": "max"}, "graph_optimization_level"),
    ({"min_time_ms": 50, "max_time_ms": 10}, "max_time_ms"),
])
def test_bad_settings_are_user_errors(tiny_model, settings, word):
    code, result = measure(tiny_model, settings)
    assert result["error"]["kind"] == "USER"
    assert word in result["error"]["message"]


def test_settings_that_are_not_json(tiny_model):
    code, result = run_agent("measure", "--model", str(tiny_model), "--settings", "{oops")
    assert code == 2 and result["error"]["kind"] == "USER"


def test_inputs_come_from_the_seed(tmp_path, tiny_model):
    """Same seed, same input: what the agent feeds is what numpy's RandomState(seed) draws."""
    # An identity model returns its input, so the output shows what the agent fed.
    from tests.conftest import onnx_file
    from onnx import TensorProto, helper
    model = onnx_file(tmp_path / "identity.onnx", [helper.make_node("Identity", ["x"], ["y"])],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    import importlib.util
    spec = importlib.util.spec_from_file_location("ort_agent", AGENT)
    agent = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agent)
    session = ort.InferenceSession(str(model))
    feeds, described = agent.make_inputs(session, agent.parse_settings({"seed": 7}))
    expected = np.random.RandomState(7).standard_normal([2, 3]).astype("float32")
    np.testing.assert_array_equal(feeds["x"], expected)
    assert described == [{"name": "x", "shape": [2, 3], "dtype": "float32"}]


def test_worker_answers_line_by_line_and_survives_bad_requests(tiny_model, failing_model):
    proc = subprocess.Popen([python(), "-u", str(AGENT), "worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        def ask(line):
            proc.stdin.write(line + "\n")
            proc.stdin.flush()
            return json.loads(proc.stdout.readline())

        hello = json.loads(proc.stdout.readline())
        assert hello["ready"] is True and hello["pid"] == proc.pid
        assert ask("this is not json")["error"]["kind"] == "USER"
        assert ask(json.dumps({"op": "dance", "id": 1})) == {
            "error": {"kind": "USER", "message": "unknown op 'dance'; ops: measure, rounds, "
                                                 "fingerprint, models, ping, exit"}, "id": 1}
        first = ask(json.dumps({"op": "measure", "id": 2, "model": str(tiny_model),
                                "settings": FAST}))
        assert first["id"] == 2 and len(first["samples_ms"]) >= 5
        failed = ask(json.dumps({"op": "measure", "id": 3, "model": str(failing_model),
                                 "settings": FAST}))
        assert failed["id"] == 3 and failed["error"]["kind"] == "RUNTIME"
        again = ask(json.dumps({"op": "measure", "id": 4, "model": str(tiny_model),
                                "settings": FAST}))
        assert again["id"] == 4 and "samples_ms" in again
        assert ask(json.dumps({"op": "fingerprint", "id": 5}))["identity"]["cpu_count"] >= 1
        assert ask(json.dumps({"op": "exit", "id": 6})) == {"bye": True, "id": 6}
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        proc.wait()


def test_worker_exits_when_its_host_goes_away():
    proc = subprocess.Popen([python(), "-u", str(AGENT), "worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert json.loads(proc.stdout.readline())["ready"]
    proc.stdin.close()
    assert proc.wait(timeout=10) == 0


def system_layout():
    """The address layout this system lets a process run with: "fixed" where a process may
    turn address space randomization off (util-linux's setarch -R; a container's seccomp
    filter may refuse it), else "randomized"."""
    if shutil.which("setarch") is None:
        pytest.skip("needs util-linux's setarch to tell what the system allows")
    setarch = subprocess.run(["setarch", platform.machine(), "-R", "true"],
                             capture_output=True)
    return "fixed" if setarch.returncode == 0 else "randomized"


class Kernel:
    """personality(2) as the agent calls it, on a process that starts randomized: `refuse`
    refuses the flag (a seccomp filter)."""

    def __init__(self, refuse=False):
        self.persona, self.refuse, self.set = 0, refuse, []

    def personality(self, persona=0xffffffff):
        if persona == 0xffffffff:
            return self.persona
        if self.refuse:
            return None
        self.set.append(persona)
        before, self.persona = self.persona, persona
        return before


@pytest.mark.parametrize("case", ["accepted", "refused", "trial fails", "exec fails",
                                  "run again", "asked randomized"])
def test_the_agent_runs_again_without_randomization_only_where_it_can(case, monkeypatch,
                                                                       capfd):
    """fix_address_layout: where the flag is accepted and a trial start of this Python runs
    under it, the agent runs again with the same flags and arguments, a marker set; where
    the flag is refused, the trial fails or the exec fails, it goes on as started (the
    flag put back) and says why on stderr; run again already, or asked to keep the
    randomization, it does nothing (and the marker goes, so nothing it starts inherits it)."""
    from agents import ort_agent

    kernel = Kernel(refuse=case == "refused")
    monkeypatch.setattr(ort_agent, "_personality", kernel.personality)
    monkeypatch.delenv("HARNESS_AGENT_LAYOUT", raising=False)
    monkeypatch.delenv("HARNESS_AGENT_LAYOUT_TRIED", raising=False)
    if case == "run again":
        monkeypatch.setenv("HARNESS_AGENT_LAYOUT_TRIED", "1")
    if case == "asked randomized":
        monkeypatch.setenv("HARNESS_AGENT_LAYOUT", "randomized")
    trials, execs = [], []

    def trial(command, **_):
        trials.append((command, kernel.persona))
        return subprocess.CompletedProcess(command, 1 if case == "trial fails" else 0)

    class Ran(Exception):
        pass

    def execv(path, argv):
        execs.append((path, argv, os.environ.get("HARNESS_AGENT_LAYOUT_TRIED")))
        if case == "exec fails":
            raise OSError("exec format error")
        raise Ran()  # the exec replaces the process: nothing after it runs

    monkeypatch.setattr(subprocess, "run", trial)
    monkeypatch.setattr(os, "execv", execv)
    script = "/device/agent/ort_agent-0123.py"
    if case == "accepted":
        with pytest.raises(Ran):
            ort_agent.fix_address_layout(script, ["worker"])
        assert trials == [([sys.executable] + ort_agent._python_flags() + ["-c", "pass"],
                           0x0040000)]  # the trial runs under the flag
        assert execs == [(sys.executable,
                          [sys.executable] + ort_agent._python_flags() + [script, "worker"],
                          "1")]
        return
    ort_agent.fix_address_layout(script, ["worker"])
    assert "HARNESS_AGENT_LAYOUT_TRIED" not in os.environ
    assert kernel.persona == 0  # on as it was started: randomized
    said = capfd.readouterr().err
    if case in ("run again", "asked randomized"):
        assert trials == [] and execs == [] and kernel.set == [] and said == ""
    else:
        assert "the address layout stays randomized" in said
        assert len(execs) == (1 if case == "exec fails" else 0)


@pytest.mark.parametrize("environment, wanted", [({}, None),
                                                 ({"HARNESS_AGENT_LAYOUT": "randomized"},
                                                  "randomized")])
def test_the_agent_fixes_its_address_layout_where_the_system_allows(tiny_model, environment,
                                                                    wanted):
    """A worker (and a one-shot measurement) runs again once, under its own pid, without
    address space randomization where the system allows it, says which layout it runs with,
    and records it with every measurement; HARNESS_AGENT_LAYOUT=randomized keeps the
    randomization."""
    expected = wanted or system_layout()
    env = {key: value for key, value in os.environ.items() if not key.startswith("HARNESS_AGENT")}
    env.update(environment)
    proc = subprocess.Popen([python(), "-u", str(AGENT), "worker"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        hello = json.loads(proc.stdout.readline())
        assert hello["ready"] is True and hello["pid"] == proc.pid
        assert hello["address_layout"] == expected
        persona = int(Path(f"/proc/{proc.pid}/personality").read_text(), 16)
        assert bool(persona & 0x0040000) == (expected == "fixed")
        proc.stdin.write(json.dumps({"op": "measure", "model": str(tiny_model),
                                     "settings": FAST}) + "\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["controlled"]["address_layout"] == expected
    finally:
        proc.kill()
        proc.wait()
    one_shot = subprocess.run([python(), str(AGENT), "measure", "--model", str(tiny_model),
                               "--settings", json.dumps(FAST)], capture_output=True,
                              text=True, timeout=120, env=env)
    assert json.loads(one_shot.stdout)["controlled"]["address_layout"] == expected


def test_stray_prints_cannot_corrupt_the_channel(tiny_model, tmp_path):
    """Native code writing to fd 1 lands on stderr, not in the JSON stream."""
    proc = subprocess.run([python(), "-c",
                           "import os, runpy, sys; sys.argv = sys.argv[1:];"
                           "import atexit; atexit.register(lambda: os.write(1, b'noise from C\\n'));"
                           "runpy.run_path(sys.argv[0], run_name='__main__')",
                           str(AGENT), "fingerprint"], capture_output=True, text=True, timeout=60)
    assert json.loads(proc.stdout)["identity"]["cpu_count"] >= 1
    assert "noise from C" in proc.stderr


def test_agent_is_python_3_8_compatible():
    source = AGENT.read_text()
    ast.parse(source, feature_version=(3, 8))
    vermin = shutil.which("vermin")
    assert vermin, "vermin is a test dependency (pip install -e '.[test]')"
    proc = subprocess.run([vermin, "-t=3.8-", "--no-tips", "--violations", str(AGENT)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_agent_imports_only_stdlib_numpy_and_the_runtimes_it_drives():
    tree = ast.parse(AGENT.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    import sys
    third_party = {name for name in imported if name not in sys.stdlib_module_names}
    assert third_party <= {"numpy", "onnxruntime", "ai_edge_litert", "executorch", "openvino",
                           "torch"}, third_party
