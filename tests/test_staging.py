"""The pools' staging folders: under $HARNESS_HOME, removed at close, and the folders that
killed processes left are swept by the next pool, never a live process's folder."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from harness.errors import HarnessError
from harness.pool.device_pool import LocalPool
from harness.pool.staging import LOCK_NAME, STAGING_FOLDER, UNLOCKED_GRACE_S, StagingFolder

HOLDER = textwrap.dedent("""
    import sys, time
    from harness.pool.staging import StagingFolder
    folder = StagingFolder(sys.argv[1])
    (folder.path / "model.onnx").write_bytes(b"x" * 1000)
    print(folder.path, flush=True)
    time.sleep(600)
""")


@pytest.fixture
def holder(tmp_path):
    """Start a process that makes a staging folder in tmp_path and holds it; yields
    (process, its folder). The process is killed at the end whatever happened."""
    started = []

    def start():
        process = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)],
                                   stdout=subprocess.PIPE, text=True)
        started.append(process)
        line = process.stdout.readline().strip()
        assert line, "the holder made no folder"
        return process, line

    yield start
    for process in started:
        process.kill()
        process.wait()
        process.stdout.close()


def test_a_pool_stages_under_its_home_and_removes_the_folder_at_close(tmp_path):
    pool = LocalPool(tmp_path, "local")
    folder = pool._staging.path
    assert folder.parent == tmp_path / STAGING_FOLDER and folder.is_dir()
    pool.close()
    assert not folder.exists()
    pool.close()  # again: nothing


def test_a_killed_process_s_folder_is_swept_and_a_live_one_is_kept(tmp_path, holder):
    killed, killed_folder = holder()
    live, live_folder = holder()
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert os.path.isdir(killed_folder)  # a killed process cannot clean up

    mine = StagingFolder(tmp_path)
    assert not os.path.exists(killed_folder)
    assert os.path.isfile(os.path.join(live_folder, "model.onnx"))
    mine.cleanup()
    assert live.poll() is None


def test_a_folder_without_a_lock_is_swept_only_once_it_is_old(tmp_path):
    root = tmp_path / STAGING_FOLDER
    young, old = root / "1-young", root / "2-old"
    for folder in (young, old):
        folder.mkdir(parents=True)
    past = time.time() - UNLOCKED_GRACE_S - 5
    os.utime(old, (past, past))

    StagingFolder(tmp_path).cleanup()
    assert young.is_dir() and not old.exists()


def test_the_sweep_follows_no_link(tmp_path):
    root = tmp_path / STAGING_FOLDER
    root.mkdir()
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "data").write_text("keep")
    (root / "planted").symlink_to(victim)
    (root / "planted-lock").mkdir()
    (root / "planted-lock" / LOCK_NAME).symlink_to(victim / "data")

    StagingFolder(tmp_path).cleanup()
    assert (victim / "data").read_text() == "keep"
    assert (root / "planted").is_symlink()


def test_a_staging_root_that_is_a_link_is_a_typed_error(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    home = tmp_path / "home"
    home.mkdir()
    (home / STAGING_FOLDER).symlink_to(elsewhere)
    with pytest.raises(HarnessError, match="not a folder of ours"):
        StagingFolder(home)
