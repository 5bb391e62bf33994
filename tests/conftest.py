"""Shared fixtures: a private HARNESS_HOME, the tiny space, fast agent settings, ONNX files."""
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from harness.export.graph import export_sample
from harness.spaces.space import random_samples
from harness.spaces import TinySpace

AGENT = Path(__file__).resolve().parent.parent / "agents" / "ort_agent.py"

# Short timed loops: the tests check correctness, not precision.
# one model after another (the loop), cut short: tests of what a measurement does, fast;
# the interleaved rounds that are the default have tests of their own (tests/test_rounds.py)
FAST = {"warmup_runs": 2, "min_runs": 5, "min_time_ms": 5.0, "max_time_ms": 2000.0,
        "protocol": "loop"}
# interleaved rounds, the default, cut short: 4 rounds of 2 ms blocks, a reference every 6 ms
# (tests of what a campaign in rounds does, not of its figures)
FEW_ROUNDS = {"rounds": 4, "block_ms": 2.0, "ref_gap_ms": 6.0}


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


# ---------------------------------------------------------------- two workers

# scripts/test runs the suite on two pytest-xdist workers (--dist loadgroup): most tests wait
# on processes, sockets and timeouts more than they compute. Each test file runs whole on
# one worker (its module fixtures - an adb server, a Ray head, converted models - are made
# once), and the files whose boards live in network namespaces of fixed names (hnb-5,
# hnb-6, hnb-7, hnb-121) and whose Ray tests end every Ray node on the machine run on one
# worker, one after another; so do the emulated phone's (its shell reads timed out once
# beside them: a race in the emulator, which sent a shell's output before the OKAY that
# opened its stream when the CPU was loaded; fixed in scripts/testfarm, _PhoneStream.begin)
# and the noisy neighbour's (it loads the cores on purpose).
ONE_AT_A_TIME = {"test_arm64", "test_farm", "test_model_profiling", "test_ray", "test_ssh",
                 "test_adb", "test_neighbour"}


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module else item.nodeid
        group = "one-at-a-time" if module in ONE_AT_A_TIME else module
        item.add_marker(pytest.mark.xdist_group(group))


# ---------------------------------------------------------------- nothing left behind

# Every process the suite starts (agents, sshd, Ray nodes, neighbours) inherits this mark in
# its environment; at the end, any still alive is named, killed, and fails the run.
SESSION_MARK = "HARNESS_TEST_SESSION"
LEFTOVER_GRACE_S = 10.0


# the marks the xdist controller gave its workers: it scans for them all at its end, once
# every worker is down (a worker that crashed included)
WORKER_MARKS: list = []


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    mark = uuid.uuid4().hex
    node.workerinput[SESSION_MARK] = mark
    WORKER_MARKS.append(mark)


def pytest_sessionstart(session):
    """A mark of this session's own (an xdist worker's is the one its controller gave it,
    and the controller checks for it)."""
    given = getattr(session.config, "workerinput", {}).get(SESSION_MARK)
    os.environ[SESSION_MARK] = given or uuid.uuid4().hex


def _marked_processes(mark: str):
    """(pid, command line) of this machine's live processes carrying `mark`, but this one."""
    wanted = f"{SESSION_MARK}={mark}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if wanted not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            if "\nState:\tZ" in Path(f"/proc/{entry}/status").read_text():
                continue  # ended, not yet reaped
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"multiprocessing.resource_tracker" in command:
            continue  # Python's own helper of this process (torch, joblib): it ends with it
        found.append((int(entry), command.decode(errors="replace").strip()[:200]))
    return found


def _left_behind(marks):
    """The processes carrying any of `marks` still alive after a grace period, killed now."""
    def marked():
        return [found for mark in marks for found in _marked_processes(mark)]

    deadline = time.monotonic() + LEFTOVER_GRACE_S  # some are still on their way out
    left = marked()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = marked()
    for pid, _ in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return left


def pytest_sessionfinish(session, exitstatus):
    """Fail the run if a process the tests started outlived them. Under xdist the controller
    checks for its workers' marks once they are all down (its own mark its workers carry
    themselves); a worker leaves it to the controller."""
    mark = os.environ.get(SESSION_MARK)
    if not mark or not Path("/proc").is_dir() or hasattr(session.config, "workerinput"):
        return
    left = _left_behind(WORKER_MARKS if session.config.pluginmanager.hasplugin("dsession")
                        else [mark])
    if not left:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line("processes the tests started were still alive (killed now): "
                            + "; ".join(f"{pid} {command}" for pid, command in left), red=True)
    session.exitstatus = 1
