"""Fixtures for SSH tests: a real sshd on loopback, test boards in network namespaces."""
import importlib.machinery
import importlib.util
import os
import sys
import time
from pathlib import Path

import pytest

from devices import registry

ROOT = Path(__file__).resolve().parent.parent


def load_testfarm():
    loader = importlib.machinery.SourceFileLoader("testfarm", str(ROOT / "scripts" / "testfarm"))
    spec = importlib.util.spec_from_loader("testfarm", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


testfarm = load_testfarm()

needs_root = pytest.mark.skipif(os.geteuid() != 0 or not Path(testfarm.SSHD).exists(),
                                reason="needs root and Debian's openssh-server (.ci/run installs it)")


def register(home: Path, name: str, address: str, key: Path, workdir: Path, trust: bool = True,
             python: str = sys.executable) -> None:
    registry.add_device(home, registry.DeviceConfig(
        name=name, transport="ssh", address=address, key=str(key), python=python,
        workdir=str(workdir), kind="testboard", connect_timeout=5.0,
        lock=str(workdir) + ".lock"))
    if trust:
        registry.trust_device(home, name, lambda *_: True)


def leftovers(workdir: Path, seconds: float = 15.0) -> list:
    """Processes still running from `workdir` after waiting up to `seconds` for them to go."""
    deadline = time.monotonic() + seconds
    while True:
        pids = testfarm.processes_mentioning(str(workdir))
        if not pids or time.monotonic() > deadline:
            return pids
        time.sleep(0.2)


@pytest.fixture(scope="session")
def client_key(tmp_path_factory):
    return testfarm.make_client_key(tmp_path_factory.mktemp("client"))


@pytest.fixture
def sshd(tmp_path, client_key):
    server = testfarm.Sshd(tmp_path / "sshd", "127.0.0.1", testfarm.free_port(), client_key)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def loop(home, sshd, client_key, tmp_path):
    """A device 'loop': this machine through a real sshd on loopback."""
    workdir = tmp_path / "loop work"
    register(home, "loop", f"root@127.0.0.1:{sshd.port}", client_key, workdir)
    yield workdir
    testfarm.kill_all(testfarm.processes_mentioning(str(workdir)))


@pytest.fixture
def board(tmp_path, client_key, home):
    """Test board 'board7' in its own network namespace."""
    board = testfarm.Board(7, tmp_path, client_key).start()
    register(home, "board7", f"root@{board.address}", client_key, Path(board.workdir))
    yield board
    board.destroy()
