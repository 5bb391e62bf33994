"""SSH devices against a real OpenSSH server: on loopback, through a fault-injecting relay,
and on test boards in network namespaces."""
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import paramiko
import pytest

from devices import registry
from devices.errors import (AgentProtocolError, DeviceLost, LoadError, MeasurementTimeout,
                            TransferError)
from devices.ssh import HostKeyChanged, HostKeyUnknown, key_fingerprint
from harness import Cache, LatencyProfiler, random_samples
from tests.conftest import FAST, onnx_file
from tests.relay import FaultRelay
from tests.ssh_fixtures import (board, client_key, leftovers, loop, needs_root, register,  # noqa: F401
                                sshd, testfarm)

pytestmark = needs_root

SLOW = dict(FAST, min_time_ms=4000.0, max_time_ms=8000.0)


def profiler(tiny, device, **kwargs):
    return LatencyProfiler(tiny, tiny.dummy_input(), device=device,
                           settings=kwargs.pop("settings", FAST), **kwargs)


def harness_cli(*args, home):
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True,
                          text=True, env=dict(os.environ, HARNESS_HOME=str(home)), timeout=300)


def measurements(home) -> int:
    with Cache(home / "cache.sqlite") as cache:
        return cache.stats()["measurements"]


def test_profile_over_ssh_then_cached(tiny, home, loop):
    samples = random_samples(tiny, 2, seed=1)
    with profiler(tiny, "loop") as p:
        first = [p.measure(s) for s in samples]
        assert [m.source for m in first] == ["measured", "measured"]
        assert first[0].device == "loop" and first[0].device_fingerprint["onnxruntime"]
    models = sorted((loop / "models").iterdir())
    assert len(models) == 2 and len(list((loop / "agent").iterdir())) == 1
    stamps = [m.stat().st_mtime for m in models]
    with profiler(tiny, "loop", refresh=True) as p:
        assert p.measure(samples[0]).source == "measured"
    assert [m.stat().st_mtime for m in models] == stamps, "a model on the board was sent again"
    with profiler(tiny, "loop") as p:
        assert p.measure(samples[1]).source == "cached"
    assert leftovers(loop) == []


def test_process_isolation_over_ssh(tiny, loop):
    with profiler(tiny, "loop", isolation="process") as p:
        assert p.measure(random_samples(tiny, 1, seed=2)[0]).n >= 5


def test_unknown_host_key_is_refused_and_names_trust(tiny, home, sshd, client_key, tmp_path):
    register(home, "stranger", f"root@127.0.0.1:{sshd.port}", client_key, tmp_path / "w",
             trust=False)
    with profiler(tiny, "stranger") as p, pytest.raises(HostKeyUnknown) as caught:
        p.profile(random_samples(tiny, 1)[0])
    assert "harness devices trust stranger" in str(caught.value)
    assert measurements(home) == 0


def test_trust_shows_the_real_fingerprint_and_records_it(home, sshd, client_key, tmp_path):
    register(home, "fresh", f"root@127.0.0.1:{sshd.port}", client_key, tmp_path / "w",
             trust=False)
    out = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "trust", "fresh",
                          "--yes"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, HARNESS_HOME=str(home))).stdout
    expected = subprocess.run(["ssh-keygen", "-lf", f"{sshd.host_key}.pub"], capture_output=True,
                              text=True, check=True).stdout.split()[1]
    assert expected in out and "added" in out
    assert f"[127.0.0.1]:{sshd.port}" in (home / "known_hosts").read_text()
    # Asking again changes nothing; without a terminal or --yes nothing is recorded.
    assert registry.trust_device(home, "fresh", lambda *_: False)[0].status == "already trusted"


def test_a_changed_host_key_is_refused_loudly_and_never_replaced_silently(
        tiny, home, sshd, client_key, tmp_path):
    register(home, "moved", f"root@127.0.0.1:{sshd.port}", client_key, tmp_path / "w",
             trust=False)
    impostor = paramiko.Ed25519Key.from_private_key_file(str(client_key))  # any other key
    keys = paramiko.HostKeys()
    keys.add(f"[127.0.0.1]:{sshd.port}", impostor.get_name(), impostor)
    keys.save(str(home / "known_hosts"))
    before = (home / "known_hosts").read_text()
    with profiler(tiny, "moved") as p, pytest.raises(HostKeyChanged) as caught:
        p.profile(random_samples(tiny, 1)[0])
    assert "CHANGED" in str(caught.value) and key_fingerprint(impostor) in str(caught.value)
    with pytest.raises(HostKeyChanged, match="--replace"):
        registry.trust_device(home, "moved", lambda *_: True)
    assert (home / "known_hosts").read_text() == before
    assert registry.trust_device(home, "moved", lambda *_: True, replace=True)[0].status == "replaced"
    with profiler(tiny, "moved") as p:
        assert p.profile(random_samples(tiny, 1)[0]) > 0


def test_arguments_never_reach_a_shell_unquoted(tiny, home, sshd, client_key, tmp_path):
    marker = tmp_path / "pwned"
    workdir = tmp_path / f"it's a $(touch {marker}) `touch {marker}` dir; touch {marker}"
    register(home, "quoted", f"root@127.0.0.1:{sshd.port}", client_key, workdir)
    with profiler(tiny, "quoted") as p:
        assert p.profile(random_samples(tiny, 1)[0]) > 0
    assert (workdir / "models").is_dir()
    assert not marker.exists()
    testfarm.kill_all(testfarm.processes_mentioning(str(workdir)))


def test_check_reports_a_board_without_onnxruntime(home, sshd, client_key, tmp_path):
    register(home, "bare", f"root@127.0.0.1:{sshd.port}", client_key, tmp_path / "w",
             python=f"{sys.executable} -S")
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "check", "bare"],
                          capture_output=True, text=True, env=dict(os.environ, HARNESS_HOME=str(home)))
    assert proc.returncode == 1
    assert "onnxruntime: missing" in proc.stdout
    assert "-m pip install onnxruntime numpy" in proc.stdout and "NOT ready" in proc.stdout


DEBIAN_PYTHON = "/usr/bin/python3"  # Debian 12's own: externally managed, no numpy here
PYENV = Path("/root/.pyenv/versions")


def externally_managed(python: str) -> bool:
    probe = "import sysconfig, os; print(os.path.join(sysconfig.get_path('stdlib'), " \
            "'EXTERNALLY-MANAGED'))"
    try:
        marker = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout
    except OSError:
        return False
    return Path(marker.strip()).is_file()


@pytest.mark.skipif(not externally_managed(DEBIAN_PYTHON),
                    reason="needs a Debian 12 (externally managed) /usr/bin/python3")
def test_check_on_debian_suggests_what_debian_accepts(home, sshd, client_key, tmp_path):
    """pip refuses to install into Debian 12's Python (externally-managed-environment)."""
    register(home, "debian", f"root@127.0.0.1:{sshd.port}", client_key, tmp_path / "w",
             python=DEBIAN_PYTHON)
    proc = harness_cli("devices", "check", "debian", home=home)
    assert proc.returncode == 1 and "debian: NOT ready" in proc.stdout
    assert "numpy: missing" in proc.stdout
    assert f"{DEBIAN_PYTHON} is externally managed (pip install is refused there" in proc.stdout
    assert ("python3 -m venv harness-venv && harness-venv/bin/python -m pip install onnxruntime "
            "numpy") in proc.stdout and "--python harness-venv/bin/python" in proc.stdout
    assert f"run '{DEBIAN_PYTHON} -m pip install" not in proc.stdout
    from devices.check import install_fix
    from devices.agent_client import PythonFacts
    only_numpy = install_fix(DEBIAN_PYTHON, ["numpy"], PythonFacts((3, 11, 2), True), "debian")
    assert "sudo apt install python3-numpy" in only_numpy


@pytest.mark.parametrize("version", ["3.7", "2.7"])
def test_a_python_below_the_agents_minimum_is_named(tiny, home, sshd, client_key, tmp_path,
                                                    version):
    found = sorted(PYENV.glob(f"{version}.*/bin/python{version}"))
    if not found:
        pytest.skip(f"needs a Python {version} (pyenv install {version})")
    old = str(found[-1])
    full = found[-1].parent.parent.name
    register(home, "old", f"root@127.0.0.1:{sshd.port}", client_key, tmp_path / "w",
             python=old)
    proc = harness_cli("devices", "check", "old", home=home)
    assert proc.returncode == 1 and "old: NOT ready" in proc.stdout
    assert f"Python {full} is too old for the agent" in proc.stdout
    assert f"'{old}' on the device is Python {full}, older than the agent's minimum 3.8" \
        in proc.stdout
    if version == "2.7":  # the agent cannot even start there: the error says why
        for isolation in ("worker", "process"):
            with profiler(tiny, "old", isolation=isolation) as p, \
                    pytest.raises((DeviceLost, AgentProtocolError)) as caught:
                p.profile(random_samples(tiny, 1)[0])
            assert f"Python {full}, older than the agent's minimum 3.8" in caught.value.fix
        assert measurements(home) == 0


def test_check_a_good_board(home, loop):
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "check", "loop"],
                          capture_output=True, text=True, env=dict(os.environ, HARNESS_HOME=str(home)))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "tiny model:" in proc.stdout and "loop: ok" in proc.stdout
    clean = subprocess.run([sys.executable, "-m", "harness.cli", "devices", "clean", "loop"],
                           capture_output=True, text=True, env=dict(os.environ, HARNESS_HOME=str(home)))
    assert clean.returncode == 0 and not (loop / "agent").exists()


def test_an_agent_printing_garbage(tiny, home, sshd, client_key, tmp_path):
    register(home, "noisy", f"root@127.0.0.1:{sshd.port}", client_key, tmp_path / "w",
             python="sh -c 'echo Welcome to BoardOS; sleep 1'")
    with profiler(tiny, "noisy") as p, pytest.raises(AgentProtocolError, match="BoardOS"):
        p.profile(random_samples(tiny, 1)[0])
    assert measurements(home) == 0


def test_a_model_the_board_cannot_load(home, loop, tmp_path):
    from onnx import TensorProto, helper
    from devices import AgentClient
    model = onnx_file(tmp_path / "alien.onnx",
                      [helper.make_node("Warp", ["x"], ["y"], domain="com.example.alien")],
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    client = AgentClient(registry.open_transport("loop", home))
    try:
        with pytest.raises(LoadError, match="cannot load"):
            client.measure(str(model), FAST, time.monotonic() + 60)
    finally:
        client.close()


def test_a_timeout_kills_the_agent_on_the_board(tiny, home, loop):
    with profiler(tiny, "loop", settings=SLOW, timeout_s=2.0) as p:
        with pytest.raises(MeasurementTimeout):
            p.profile(random_samples(tiny, 1)[0])
        assert leftovers(loop, seconds=5) == []
    assert measurements(home) == 0


@pytest.fixture
def relayed(home, sshd, client_key, tmp_path):
    relay = FaultRelay(("127.0.0.1", sshd.port))
    workdir = tmp_path / "relayed work"
    register(home, "relayed", f"root@127.0.0.1:{relay.port}", client_key, workdir)
    yield relay, workdir
    relay.close()
    testfarm.kill_all(testfarm.processes_mentioning(str(workdir)))


def test_added_latency_still_measures(tiny, relayed):
    relay, _ = relayed
    relay.delay_s = 0.02
    with profiler(tiny, "relayed") as p:
        assert p.measure(random_samples(tiny, 1, seed=3)[0]).source == "measured"


def test_a_stalled_connection_times_out_and_leaves_nothing_running(tiny, home, relayed):
    relay, workdir = relayed
    with profiler(tiny, "relayed", settings=SLOW, timeout_s=4.0) as p:
        threading.Timer(1.5, relay.stall).start()
        with pytest.raises(MeasurementTimeout):
            p.profile(random_samples(tiny, 1, seed=5)[0])
        assert leftovers(workdir, seconds=10) == []
    assert measurements(home) == 0


@pytest.mark.parametrize("isolation", ["worker", "process"])
def test_a_timeout_on_a_stalled_link_fires_within_three_seconds_of_it(tiny, home, relayed,
                                                                      isolation):
    """The kill is tried briefly over the stalled connection, then over a fresh one within
    the time left: the whole failure takes timeout_s + 3 s at most (it took 26 s with 10)."""
    relay, workdir = relayed
    sample = random_samples(tiny, 1, seed=11)[0]
    endless = dict(FAST, min_time_ms=20000.0, max_time_ms=30000.0)
    with profiler(tiny, "relayed", settings=endless, timeout_s=10.0, isolation=isolation) as p:
        p.graph_hash(sample)  # exported, and the device identified, before the clock starts
        p.identify()
        threading.Timer(2.0, relay.stall).start()
        started = time.monotonic()
        with pytest.raises(MeasurementTimeout):
            p.profile(sample)
        assert time.monotonic() - started < 10.0 + 3.0
        assert leftovers(workdir, seconds=5) == []
    assert measurements(home) == 0


def test_a_cut_connection_reconnects_and_retries_once(tiny, home, relayed):
    relay, workdir = relayed
    with profiler(tiny, "relayed", settings=dict(FAST, min_time_ms=2500.0, max_time_ms=5000.0)) as p:
        threading.Timer(1.0, relay.cut).start()
        measured = p.measure(random_samples(tiny, 1, seed=6)[0])
        assert measured.source == "measured" and measured.provenance.loop_ms >= 2500
    assert measurements(home) == 1
    assert leftovers(workdir) == []


def test_sshd_killed_mid_measurement(tiny, home, loop, sshd):
    with profiler(tiny, "loop", settings=SLOW, timeout_s=30.0) as p:
        p.graph_hash(random_samples(tiny, 1, seed=7)[0])
        threading.Timer(1.5, sshd.kill_everything).start()
        started = time.monotonic()
        with pytest.raises(DeviceLost, match="cannot reach|connection"):
            p.profile(random_samples(tiny, 1, seed=7)[0])
        assert time.monotonic() - started < 30
    assert measurements(home) == 0


def test_profile_on_a_board_in_a_network_namespace(tiny, home, board):
    with profiler(tiny, "board7") as p:
        measured = p.measure(random_samples(tiny, 1, seed=8)[0])
    assert measured.source == "measured" and measured.device == "board7"
    assert leftovers(board.workdir) == []


def test_link_cut_mid_run_is_a_typed_error_and_caches_nothing(tiny, home, board):
    with profiler(tiny, "board7", settings=SLOW, timeout_s=5.0) as p:
        p.graph_hash(random_samples(tiny, 1, seed=9)[0])
        threading.Timer(1.5, board.link, (False,)).start()
        with pytest.raises((MeasurementTimeout, DeviceLost)):
            p.profile(random_samples(tiny, 1, seed=9)[0])
    assert measurements(home) == 0
    board.link(True)
    with profiler(tiny, "board7") as p:
        assert p.measure(random_samples(tiny, 1, seed=10)[0]).source == "measured"
    assert leftovers(board.workdir, seconds=30) == []


# ---------------------------------------------------------------- boards without SFTP

@pytest.fixture
def bare_sshd(tmp_path, client_key):
    """An OpenSSH server whose config has no Subsystem line, like Dropbear and minimal images
    that ship no sftp-server."""
    server = testfarm.Sshd(tmp_path / "bare-sshd", "127.0.0.1", testfarm.free_port(), client_key,
                           sftp=False)
    assert "Subsystem" not in server.config.read_text()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nosftp(home, bare_sshd, client_key, tmp_path):
    workdir = tmp_path / "no sftp's work"
    register(home, "nosftp", f"root@127.0.0.1:{bare_sshd.port}", client_key, workdir)
    yield workdir
    testfarm.kill_all(testfarm.processes_mentioning(str(workdir)))



def test_a_board_without_sftp_is_checked_profiled_and_cleaned_over_exec(tiny, home, nosftp):
    check = harness_cli("devices", "check", "nosftp", home=home)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "nosftp: ok" in check.stdout and "Channel closed" not in check.stdout + check.stderr
    sample = random_samples(tiny, 1, seed=12)[0]
    with profiler(tiny, "nosftp") as p:
        assert p.measure(sample).source == "measured"
    # check's tiny model, the three of its noise window (the reference and two fixed
    # subnets) and the sample's
    models = sorted((nosftp / "models").iterdir())
    assert len(models) == 5 and all(m.suffix == ".onnx" and len(m.stem) == 64 for m in models)
    assert len(list((nosftp / "agent").iterdir())) == 1
    stamp = [m.stat().st_mtime_ns for m in models]
    with profiler(tiny, "nosftp", refresh=True) as p:
        assert p.measure(sample).source == "measured"
    assert [m.stat().st_mtime_ns for m in models] == stamp, "a model was sent again"
    assert harness_cli("devices", "clean", "nosftp", home=home).returncode == 0
    assert not (nosftp / "models").exists() and not (nosftp / "agent").exists()
    assert leftovers(nosftp) == []


def test_an_upload_that_arrives_damaged_is_refused_and_nothing_is_kept(home, nosftp, tiny_model,
                                                                       monkeypatch):
    import devices.ssh

    transport = registry.open_transport("nosftp", home)
    try:
        # What the host believes it sends differs from what arrives, as a damaged transfer.
        monkeypatch.setattr(devices.ssh, "file_sha256", lambda path: "0" * 64)
        with pytest.raises(TransferError, match="arrived damaged") as caught:
            transport.put(str(tiny_model), "models/x.onnx")
        assert "nothing was kept" in caught.value.message
    finally:
        transport.close()
    assert list((nosftp / "models").iterdir()) == []  # neither the file nor its .part


def test_the_exec_upload_checks_the_hash_with_python_where_sha256sum_is_missing(tmp_path,
                                                                                tiny_model):
    """A minimal image with a shell, cat and mv but no sha256sum: the board's Python hashes."""
    from devices.ssh import UPLOAD_SCRIPT
    from devices.line_channel import file_sha256

    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("sh", "mkdir", "cat", "cut", "mv", "rm"):
        (tools / tool).symlink_to(shutil.which(tool))
    target = tmp_path / "board" / "models" / "m.onnx"
    for want, code in (("0" * 64, 3), (file_sha256(str(tiny_model)), 0)):
        with open(tiny_model, "rb") as stdin:
            done = subprocess.run([str(tools / "sh"), "-c", UPLOAD_SCRIPT, "harness-put",
                                   str(target.parent), f"{target}.1.part", str(target), want,
                                   sys.executable], stdin=stdin, capture_output=True, text=True,
                                  env={"PATH": str(tools)}, timeout=60)
        assert done.returncode == code, done.stderr
        assert not list(target.parent.glob("*.part"))
    assert target.read_bytes() == tiny_model.read_bytes()


def test_a_cut_connection_ends_the_old_worker_and_frees_the_device_lock(home, relayed,
                                                                       tiny_model):
    """The audit's cut connection: the agent left behind kept measuring, holding the device
    lock, so the retry waited out its loop. Its HostWatch ends it once sshd hangs up."""
    import fcntl
    import json

    from tests.conftest import AGENT

    relay, workdir = relayed
    workdir.mkdir(parents=True, exist_ok=True)
    lock = Path(str(workdir) + ".lock")
    transport = registry.open_transport("relayed", home)
    worker = transport.spawn([sys.executable, "-u", str(AGENT), "worker"])
    try:
        assert json.loads(worker.read_line(60))["ready"]
        endless = dict(FAST, min_runs=10**9, min_time_ms=600_000.0, max_time_ms=600_000.0)
        worker.write_line(json.dumps({"op": "measure", "id": 1, "model": str(tiny_model),
                                      "settings": endless, "lock": str(lock),
                                      "lock_wait_s": 5}))

        def held() -> bool:
            descriptor = os.open(lock, os.O_RDONLY)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(descriptor, fcntl.LOCK_UN)
                return False
            except BlockingIOError:
                return True
            finally:
                os.close(descriptor)

        deadline = time.monotonic() + 300
        while not (lock.exists() and held()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert relay.cut() >= 1
        deadline = time.monotonic() + 120  # its loop would run ten minutes
        while held() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not held(), "the old worker kept the device locked"
        status = Path(f"/proc/{worker.pid}/status")
        assert not status.exists() or "\nState:\tZ" in status.read_text()  # it ended
    finally:
        transport.close()
        testfarm.kill_all([worker.pid] if worker.pid else [])
