"""The local transport and the agent client: deployment, worker life cycle, typed failures."""
import os
import sys
import threading
import time

import pytest

from devices import (AgentClient, AgentProtocolError, DeviceLost, LoadError,
                     LocalTransport, MeasurementTimeout)
from devices.line_channel import file_sha256
from tests.conftest import FAST


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); read its state.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def transport(tmp_path):
    # its own lock: a measurement of another test file on the other xdist worker holds the
    # machine-wide one, and a short deadline spent waiting for it is no timeout of a run
    transport = LocalTransport(tmp_path / "device", lock_path=str(tmp_path / "device.lock"))
    yield transport
    transport.close()


def later(seconds: float) -> float:
    return time.monotonic() + seconds


def test_put_is_by_name_and_skips_what_is_there(transport, tiny_model):
    first = transport.put(str(tiny_model), "models/a.onnx")
    os.utime(first, (0, 0))
    assert transport.put(str(tiny_model), "models/a.onnx") == first
    assert os.stat(first).st_mtime == 0  # not copied again
    transport.put(str(tiny_model), "models/a.onnx", force=True)
    assert os.stat(first).st_mtime > 0


def test_run_timeout_kills_the_whole_process_group(transport, tmp_path):
    pidfile = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen(['sleep', '60']); "
              f"open({str(pidfile)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    with pytest.raises(MeasurementTimeout):
        transport.run([sys.executable, "-c", script], timeout=1.5)
    assert wait_gone(int(pidfile.read_text())), "the grandchild survived the timeout"


def test_measure_through_the_worker(transport, tiny_model):
    client = AgentClient(transport)
    result = client.measure(str(tiny_model), FAST, later(60))
    pid = client.worker_pid
    again = client.measure(str(tiny_model), FAST, later(60))
    assert client.worker_pid == pid, "one worker serves the session"
    assert len(result.samples_ms) >= 5 and len(again.samples_ms) >= 5
    sha = file_sha256(str(tiny_model))
    assert (transport.workdir / "models" / f"{sha}.onnx").exists()
    agents = list((transport.workdir / "agent").glob("ort_agent-*.py"))
    assert len(agents) == 1
    client.close()
    assert wait_gone(pid)


def test_process_isolation_gives_the_same_kind_of_answer(transport, tiny_model):
    client = AgentClient(transport, isolation="process")
    result = client.measure(str(tiny_model), FAST, later(60))
    assert client.worker_pid is None
    assert len(result.samples_ms) >= 5
    assert client.facts(later(60)).identity["cpu_count"] >= 1


def test_a_dead_worker_is_restarted_and_the_job_retried_once(transport, tiny_model):
    client = AgentClient(transport)
    client.facts(later(60))
    victim = client.worker_pid
    slow = dict(FAST, min_time_ms=3000.0, max_time_ms=10000.0)
    killer = threading.Timer(1.0, os.kill, (victim, 9))
    killer.start()
    result = client.measure(str(tiny_model), slow, later(60))
    killer.join()
    assert not alive(victim)
    assert client.worker_pid not in (None, victim)
    assert result.loop_ms >= 3000.0


def test_a_timeout_kills_the_worker_and_the_next_job_gets_a_new_one(transport, tiny_model):
    client = AgentClient(transport)
    client.facts(later(60))
    victim = client.worker_pid
    slow = dict(FAST, min_time_ms=20000.0, max_time_ms=30000.0)
    started = time.monotonic()
    with pytest.raises(MeasurementTimeout) as caught:
        client.measure(str(tiny_model), slow, later(1.5))
    assert time.monotonic() - started < 10
    assert caught.value.kind == "TIMEOUT" and "fix:" in str(caught.value)
    assert wait_gone(victim), "the timed-out worker is still running"
    assert len(client.measure(str(tiny_model), FAST, later(60)).samples_ms) >= 5


def test_a_damaged_model_on_the_device_is_sent_again(transport, tiny_model):
    client = AgentClient(transport)
    sha = file_sha256(str(tiny_model))
    damaged = transport.workdir / "models" / f"{sha}.onnx"
    damaged.parent.mkdir(parents=True)
    damaged.write_bytes(b"half a file")
    result = client.measure(str(tiny_model), FAST, later(60))
    assert len(result.samples_ms) >= 5
    assert file_sha256(str(damaged)) == sha


def test_a_worker_that_quits_before_its_greeting_is_started_again_randomized(
        tmp_path, tiny_model, caplog):
    # a Python that cannot run the agent under a fixed address layout (as a system might
    # whose emulator or filter breaks on it after the agent's trial start): it quits unless
    # the agent is told to keep the randomization
    program = ("import os, sys\n"
               "if os.environ.get('HARNESS_AGENT_LAYOUT') != 'randomized':\n"
               "    sys.exit('cannot run under this layout')\n"
               "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n")
    client = AgentClient(LocalTransport(tmp_path / "device",
                                        python=[sys.executable, "-c", program]))
    with caplog.at_level("WARNING"):
        result = client.measure(str(tiny_model), FAST, later(60))
    assert client.layout_randomized and len(result.samples_ms) >= 5
    assert result.controlled["address_layout"] == "randomized"
    assert "cannot run under this layout" in caplog.text and "randomization" in caplog.text
    pid = client.worker_pid
    assert client.measure(str(tiny_model), FAST, later(60)).controlled["address_layout"] \
        == "randomized" and client.worker_pid == pid
    client.close()
    assert wait_gone(pid)
    # a Python that quits either way: the layout was not the cause, and is fixed again
    quits = AgentClient(LocalTransport(tmp_path / "other",
                                       python=[sys.executable, "-c", "import sys; sys.exit(3)"]))
    with pytest.raises(DeviceLost):
        quits.measure(str(tiny_model), FAST, later(30))
    assert not quits.layout_randomized
    quits.close()


@pytest.mark.parametrize("program, error, text", [
    # An agent printing garbage is a protocol error that quotes it.
    ("print('Welcome to BoardOS!')", AgentProtocolError, "Welcome to BoardOS!"),
    # An agent that cannot start is a lost device, with its stderr.
    ("import sys; sys.exit('no python3.8 here')", DeviceLost, "no python3.8 here"),
])
def test_a_broken_agent_is_a_typed_error_quoting_it(tmp_path, tiny_model, program, error, text):
    client = AgentClient(LocalTransport(tmp_path / "device",
                                        python=[sys.executable, "-c", program]))
    with pytest.raises(error) as caught:
        client.measure(str(tiny_model), FAST, later(30))
    assert text in str(caught.value)
    client.close()


def test_a_device_without_onnxruntime_says_what_to_install(tmp_path, tiny_model):
    # -S drops site-packages: this Python has no numpy and no onnxruntime, like a bare board.
    client = AgentClient(LocalTransport(tmp_path / "device", python=[sys.executable, "-S"]))
    identity = client.facts(later(30)).identity
    assert identity["onnxruntime"] is None
    with pytest.raises(LoadError) as caught:
        client.measure(str(tiny_model), FAST, later(30))
    assert "pip install onnxruntime" in str(caught.value)
    client.close()
