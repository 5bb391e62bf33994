"""A multi-host farm on a local Ray cluster: two emulated hosts, each serving its own board."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")  # farms require it, and Ray reads it on import
ray = pytest.importorskip("ray")

from harness import Cache, LatencyProfiler, random_samples  # noqa: E402
from tests.conftest import FAST  # noqa: E402
from tests.ssh_fixtures import client_key, needs_root, register, testfarm  # noqa: E402,F401

pytestmark = needs_root
RAY = str(Path(sys.executable).with_name("ray"))


def serve(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HARNESS_HOME=str(home))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "farm", "serve", *args],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def copy_token(head_home: Path, home: Path) -> None:
    """What a user does for each host and client: copy the head's token, mode 0600."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(head_home / "ray-token", home / "ray-token")
    os.chmod(home / "ray-token", 0o600)


@pytest.fixture
def farm(tmp_path, client_key, home):
    """Head on loopback, and hosts A and B, each with one board of kind testboard."""
    port = testfarm.free_port()
    boards, homes = [], []
    head_home = tmp_path / "head-home"
    try:
        head = serve(head_home, "--port", str(port))
        assert "token" in head.stdout and (head_home / "ray-token").stat().st_mode & 0o077 == 0
        # Ray's INFO lines go to a log file under the home, not the user's terminal
        assert "INFO" not in head.stdout + head.stderr
        assert (head_home / "logs" / "farm-serve.log").stat().st_size > 0
        copy_token(head_home, home)  # the searching side's own home
        for index, host in ((5, "hostA"), (6, "hostB")):
            host_home = tmp_path / host
            board = testfarm.Board(index, tmp_path, client_key).start()
            boards.append(board)
            register(host_home, f"board{index}", f"root@{board.address}", client_key,
                     Path(board.workdir))
            copy_token(head_home, host_home)
            serve(host_home, "--address", f"127.0.0.1:{port}")
            homes.append(host_home)
        yield f"127.0.0.1:{port}"
    finally:
        if ray.is_initialized():
            ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)
        for board in boards:
            board.destroy()


def test_profiling_through_farm_resources_on_two_hosts(tiny, home, farm):
    samples = random_samples(tiny, 6, seed=1)
    settings = dict(FAST, min_time_ms=300.0, max_time_ms=3000.0)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard", farm=farm,
                         settings=settings) as profiler:
        assert profiler.pool.slots() == 2  # one unit per device the farm offers
        measured = profiler.measure_many(samples)
        assert [m.graph_hash for m in measured] == [profiler.graph_hash(s) for s in samples]
    fresh = [m for m in measured if m.source == "measured"]
    assert {m.device for m in fresh} == {"board5", "board6"}  # both hosts worked
    with Cache(home / "cache.sqlite") as cache:                 # results in the caller's cache
        assert cache.stats()["measurements"] == len(fresh)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard", farm=farm,
                         settings=settings) as again:
        assert {m.source for m in again.measure_many(samples)} == {"cached"}


UNAUTHENTICATED = """
import sys
import ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("ran:", ray.get(ray.remote(lambda: "code on the farm").remote(), timeout=20))
except Exception as exc:
    print("refused:", type(exc).__name__, exc)
"""


def test_a_client_without_the_token_is_refused(tiny, home, farm, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path / "stranger")  # no ~/.ray/auth_token either
    proc = subprocess.run([sys.executable, "-c", UNAUTHENTICATED, farm], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "ran:" not in proc.stdout, proc.stdout
    assert proc.returncode != 0 or "refused" in proc.stdout


def test_joining_without_the_token_says_how_to_get_it(tmp_path, farm, client_key):
    new_host = tmp_path / "new-host"
    register(new_host, "board9", "root@127.0.0.1:9", client_key, tmp_path / "board9",
             trust=False)
    env = dict(os.environ, HARNESS_HOME=str(new_host))
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "farm", "serve", "--address",
                           farm], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "no farm token" in proc.stderr and "scp" in proc.stderr


def test_a_farm_address_with_nothing_behind_it_fails_fast(home):
    """One line with the fix, within seconds, instead of Ray's minutes of C++ warnings."""
    port = testfarm.free_port()  # nothing listens there
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "profile", "--space",
                           "harness.spaces:TinySpace", "--device", "kind:testboard", "--farm",
                           f"127.0.0.1:{port}", "--samples", "1"],
                          env=dict(os.environ, HARNESS_HOME=str(home)), capture_output=True,
                          text=True, timeout=60)  # Ray alone retries for minutes
    assert proc.returncode == 1
    assert f"no Ray farm answers at 127.0.0.1:{port}" in proc.stderr
    assert "harness farm serve" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 2  # the error and its fix
