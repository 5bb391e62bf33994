"""A multi-host farm on a local Ray cluster: two emulated hosts, each serving its own board."""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "token")  # farms require it, and Ray reads it on import
ray = pytest.importorskip("ray")

from harness import Cache, LatencyProfiler, random_samples  # noqa: E402
from tests.conftest import FAST  # noqa: E402
from tests.ssh_fixtures import client_key, needs_root, register, testfarm  # noqa: E402,F401

pytestmark = needs_root
RAY = str(Path(sys.executable).with_name("ray"))


def harness_cli(home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, HARNESS_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def serve(home: Path, *args: str) -> subprocess.CompletedProcess:
    proc = harness_cli(home, "farm", "serve", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def copy_token(head_home: Path, home: Path) -> None:
    """What a user does for each host and client: copy the head's token, mode 0600."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(head_home / "ray-token", home / "ray-token")
    os.chmod(home / "ray-token", 0o600)


def stop_all(homes) -> None:
    """`harness farm stop` on every home that still serves, then Ray's own stop for
    anything a failed test left behind."""
    if ray.is_initialized():
        ray.shutdown()
    for home in homes:
        if (home / "farm-host.json").exists():
            harness_cli(home, "farm", "stop", "--grace", "5")
    subprocess.run([RAY, "stop", "--force"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def farm_head(tmp_path_factory):
    """A farm head on loopback (no devices), one per module: a process that joined a farm
    keeps the token it joined with (Ray loads it once), so its tests share one farm."""
    port = testfarm.free_port()
    head_home = tmp_path_factory.mktemp("farm") / "head-home"
    try:
        started = serve(head_home, "--port", str(port))
        assert "token" in started.stdout and (head_home / "ray-token").stat().st_mode & 0o077 == 0
        # Ray's INFO lines go to a log file under the home, not the user's terminal
        assert "INFO" not in started.stdout + started.stderr
        assert (head_home / "logs" / "farm-serve.log").stat().st_size > 0
        yield f"127.0.0.1:{port}", head_home
    finally:
        stop_all([head_home])


@pytest.fixture
def head(farm_head, home):
    """The module's farm, the test's searching side holding its token; the hosts a test
    joins are stopped when it ends."""
    address, head_home = farm_head
    copy_token(head_home, home)  # the searching side's own home
    homes: list = []
    yield address, head_home, homes
    if ray.is_initialized():
        ray.shutdown()
    for host_home in homes:
        if (host_home / "farm-host.json").exists():
            harness_cli(host_home, "farm", "stop", "--grace", "5")


def join(head, host_home: Path) -> None:
    address, head_home, homes = head
    copy_token(head_home, host_home)
    homes.append(host_home)
    serve(host_home, "--address", address)


@pytest.fixture
def farm(head, tmp_path, client_key):
    """Hosts A and B, each with one board of kind testboard."""
    boards = []
    try:
        for index, host in ((5, "hostA"), (6, "hostB")):
            host_home = tmp_path / host
            board = testfarm.Board(index, tmp_path, client_key).start()
            boards.append(board)
            register(host_home, f"board{index}", f"root@{board.address}", client_key,
                     Path(board.workdir))
            join(head, host_home)
        yield head[0]
    finally:
        for host_home in head[2]:
            if (host_home / "farm-host.json").exists():
                harness_cli(host_home, "farm", "stop", "--grace", "5")
        for board in boards:
            board.destroy()


def add_sims(home: Path, prefix: str, count: int, median_ms: float = 20.0) -> None:
    from devices import registry
    from devices.simulated import simulated_names

    for name in simulated_names(prefix, count):
        registry.add_device(home, registry.DeviceConfig(
            name=name, transport="sim", address="npu-sim", kind="sim", sim_ms=median_ms))


def test_profiling_through_farm_resources_on_two_hosts(tiny, home, farm):
    samples = random_samples(tiny, 6, seed=1)
    settings = dict(FAST, min_time_ms=300.0, max_time_ms=3000.0)
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard", farm=farm,
                         settings=settings) as profiler:
        assert profiler.pool.slots() == 2  # the devices the farm offers
        measured = profiler.measure_many(samples)
        assert [m.graph_hash for m in measured] == [profiler.graph_hash(s) for s in samples]
    fresh = [m for m in measured if m.source == "measured"]
    assert {m.device for m in fresh} == {"board5", "board6"}  # both hosts worked
    with Cache(home / "cache.sqlite") as cache:                 # results in the caller's cache
        assert cache.stats()["measurements"] == len(fresh)
        # the boards are two devices to the cache, neither of them this machine
        assert cache.stats()["fingerprints"] == 2
    units = {m.device: m.device_fingerprint["unit"] for m in fresh}
    assert units["board5"] != units["board6"]
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:testboard", farm=farm,
                         settings=settings) as again:
        assert {m.source for m in again.measure_many(samples)} == {"cached"}
    status = harness_cli(home, "farm", "status", "--address", farm, "--json")
    assert status.returncode == 0, status.stderr
    hosts = json.loads(status.stdout)["hosts"]
    done = {d["name"]: d["done"] for host in hosts for d in host["devices"]}
    assert done == {name: sum(m.device == name for m in fresh) for name in units}


def max_overlap(windows) -> int:
    """The most lease windows open at one moment."""
    edges = sorted([(start, 1) for start, _ in windows] + [(end, -1) for _, end in windows],
                   key=lambda edge: (edge[0], edge[1]))
    open_now = most = 0
    for _, step in edges:
        open_now += step
        most = max(most, open_now)
    return most


def test_a_run_keeps_every_free_device_busy_and_a_stopped_host_leaves(tiny, home, head,
                                                                      tmp_path):
    """Two hosts with three simulated devices each: 12 jobs keep all six busy at once, each
    device leased by one job at a time; `farm status` shows the work; `farm stop` drains a
    host, which then leaves the farm while the other goes on."""
    host_a, host_b = tmp_path / "simA", tmp_path / "simB"
    add_sims(host_a, "a", 3)
    add_sims(host_b, "b", 3)
    join(head, host_a)
    join(head, host_b)
    samples = random_samples(tiny, 12, seed=7)
    # jobs long enough (2.5 s) that exporting on this side keeps ahead of six devices
    settings = {"warmup_runs": 1, "min_runs": 20, "min_time_ms": 2500.0}
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:sim", farm=head[0],
                         settings=settings) as profiler:
        assert profiler.pool.slots() == 6
        measured = [m for m in profiler.measure_many(samples) if m.source == "measured"]
    assert {m.device for m in measured} == {"a-000", "a-001", "a-002", "b-000", "b-001",
                                            "b-002"}
    windows = [tuple(m.provenance.lease) for m in measured]
    assert max_overlap(windows) == 6  # min(jobs, devices) busy at once
    for device in {m.device for m in measured}:  # leases stay exclusive per device
        assert max_overlap([tuple(m.provenance.lease) for m in measured
                            if m.device == device]) == 1
    table = harness_cli(home, "farm", "status", "--address", head[0])
    assert table.returncode == 0, table.stderr
    assert "2 hosts serving devices" in table.stdout
    assert sum(int(line.split()[-2]) for line in table.stdout.splitlines()[2:]) == len(measured)
    stopped = harness_cli(host_a, "farm", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "0 killed" in stopped.stdout and "jobs cut short: 0" in stopped.stdout
    assert not (host_a / "farm-host.json").exists()
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:sim", farm=head[0],
                         settings=settings, refresh=True) as profiler:
        assert profiler.pool.slots() == 3
        assert {m.device[0] for m in profiler.measure_many(samples[:3])} == {"b"}
    ray.shutdown()
    after = harness_cli(home, "farm", "status", "--address", head[0])
    assert "1 hosts serving devices" in after.stdout, after.stdout + after.stderr


def test_jobs_on_a_host_that_dies_go_to_another(tiny, home, head, tmp_path):
    """A host killed outright (SIGKILL to its node, no drain) loses no job: they are
    measured on the other host."""
    from harness.pool.farm import _node_processes, read_record

    host_a, host_b = tmp_path / "simA", tmp_path / "simB"
    add_sims(host_a, "a", 2, median_ms=50.0)
    add_sims(host_b, "b", 2, median_ms=50.0)
    join(head, host_a)
    join(head, host_b)
    node = read_record(host_a)
    samples = random_samples(tiny, 8, seed=8)
    settings = {"warmup_runs": 1, "min_runs": 10, "min_time_ms": 1500.0}
    with LatencyProfiler(tiny, tiny.dummy_input(), device="kind:sim", farm=head[0],
                         settings=settings) as profiler:
        killer = threading.Timer(1.0, lambda: [p.kill() for p in _node_processes(node.name)])
        killer.start()
        measured = profiler.measure_many(samples)
        killer.join()
    assert all(m.source == "measured" for m in measured)
    assert len(measured) == len(samples)
    assert any(m.device.startswith("b") for m in measured)


UNAUTHENTICATED = """
import sys
import ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("ran:", ray.get(ray.remote(lambda: "code on the farm").remote(), timeout=20))
except Exception as exc:
    print("refused:", type(exc).__name__, exc)
"""


def test_a_client_without_the_token_is_refused(tiny, home, head, tmp_path):
    farm = head[0]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path / "stranger")  # no ~/.ray/auth_token either
    proc = subprocess.run([sys.executable, "-c", UNAUTHENTICATED, farm], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "ran:" not in proc.stdout, proc.stdout
    assert proc.returncode != 0 or "refused" in proc.stdout


def test_joining_without_the_token_says_how_to_get_it(tmp_path, head, client_key):
    farm = head[0]
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


def test_stop_and_serve_say_what_is_wrong(home, farm_head):
    """Stop where nothing serves, serve twice from one home, status of no farm: one line
    each, with the fix, and nothing started."""
    nothing = harness_cli(home, "farm", "stop")
    assert nothing.returncode == 1 and "serves no farm node" in nothing.stderr
    which = harness_cli(home, "farm", "status")
    assert which.returncode == 1 and "--address HEAD:PORT" in which.stderr
    again = harness_cli(farm_head[1], "farm", "serve", "--port", str(testfarm.free_port()))
    assert again.returncode == 1, again.stdout
    assert "already serves farm node" in again.stderr and "harness farm stop" in again.stderr
