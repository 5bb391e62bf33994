"""Regression tests for the hardening issue: the agent's shared device lock, perf-test's remote
shell line, predictor pickles and where a predictor name is looked up, and `cache import`.

Everything is real: the agent as a separate process, /bin/sh running the remote commands,
scikit-learn pickles, SQLite caches written by LatencyProfiler on the local device.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from agents.ort_agent import AgentError, DeviceLock
from tests.conftest import AGENT, FAST, python

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


# ================================================================ 1. the agent's device lock

def agent_measure(model, lock, timeout=120):
    """`ort_agent.py measure --lock LOCK` as the host runs it: (exit code, JSON answer)."""
    proc = subprocess.run([python(), str(AGENT), "measure", "--model", str(model), "--settings",
                           json.dumps(FAST), "--lock", str(lock)],
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, json.loads(proc.stdout)


def test_lock_that_is_a_symlink_is_refused_and_its_target_left_alone(tmp_path, tiny_model):
    target = tmp_path / "owned-by-root.conf"
    target.write_text("precious = true\n")
    link = tmp_path / "harness-device.lock"
    link.symlink_to(target)
    code, answer = agent_measure(tiny_model, link)
    assert code == 1
    error = answer["error"]
    assert error["kind"] == "USER"
    assert str(link) in error["message"] and "symbolic link" in error["message"]
    assert "devices.toml" in error["message"] and "remove" in error["message"]
    assert target.read_text() == "precious = true\n"
    # A dangling link is refused too, and the agent creates nothing where it points.
    dangling = tmp_path / "dangling.lock"
    dangling.symlink_to(tmp_path / "created-through-the-link")
    with pytest.raises(AgentError) as caught:
        with DeviceLock(str(dangling), 1.0):
            pass
    assert caught.value.kind == "USER"
    assert not (tmp_path / "created-through-the-link").exists()


@pytest.mark.parametrize("make, what", [
    (lambda path: path.mkdir(), "a folder"),
    (lambda path: os.mkfifo(path), "a FIFO"),
])
def test_lock_that_is_a_folder_or_a_fifo_is_refused(tmp_path, tiny_model, make, what):
    lock = tmp_path / "harness-device.lock"
    make(lock)
    code, answer = agent_measure(tiny_model, lock, timeout=60)  # a FIFO must not hang it
    assert code == 1
    assert answer["error"]["kind"] == "USER"
    message = answer["error"]["message"]
    assert f"{lock} is {what}, not a regular file" in message and "devices.toml" in message


def test_a_normal_lock_serializes_and_is_never_written(tmp_path, tiny_model):
    existing = tmp_path / "existing.lock"
    existing.write_text("left by an older agent\n")
    existing.chmod(0o600)
    for lock in (existing, tmp_path / "new.lock"):
        worker = subprocess.Popen([python(), str(AGENT), "worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert json.loads(worker.stdout.readline())["ready"] is True

            def ask(wait_s):
                request = {"op": "measure", "id": 1, "model": str(tiny_model),
                           "settings": FAST, "lock": str(lock), "lock_wait_s": wait_s}
                worker.stdin.write(json.dumps(request) + "\n")
                worker.stdin.flush()
                return json.loads(worker.stdout.readline())

            with DeviceLock(str(lock), 1.0):  # another measurement holds the device
                held = ask(0.3)
                assert held["error"]["kind"] == "TIMEOUT"
                assert str(lock) in held["error"]["message"]
                with pytest.raises(AgentError) as caught:  # a second holder, same process
                    with DeviceLock(str(lock), 0.2):
                        pass
                assert caught.value.kind == "TIMEOUT"
            free = ask(5.0)
            assert "error" not in free and len(free["samples_ms"]) >= FAST["min_runs"]
        finally:
            worker.stdin.close()
            worker.wait(timeout=60)
    assert existing.read_text() == "left by an older agent\n"   # never truncated or written
    assert existing.stat().st_mode & 0o777 == 0o600               # never chmod-ed
    created = tmp_path / "new.lock"
    assert created.is_file() and created.stat().st_size == 0
    umask = os.umask(0)
    os.umask(umask)
    assert created.stat().st_mode & 0o777 == 0o666 & ~umask
