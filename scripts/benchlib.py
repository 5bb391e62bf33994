"""What the benchmarks share: the repository on sys.path, the test farm loaded as a module
(scripts/testfarm is a command without a .py suffix), a space at a chosen input size, a
working folder removed when the run ends."""
import argparse
import atexit
import importlib.machinery
import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def temporary_folder(prefix: str) -> Path:
    """A new folder for one run's models, caches and devices, removed when the process ends
    (also after a failure or Ctrl-C): a run leaves gigabytes there otherwise. A benchmark's
    figures go to its --out file, its truths to their own folder."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def space_at_input(parser: argparse.ArgumentParser, spec: str,
                   input_size: Optional[int]) -> Tuple[Any, str]:
    """The space `spec` names, at `input_size` px when given (for a space whose class takes
    input_size, as the built-in ones do), and the name to report it by."""
    from harness.spaces.space import load_space

    space = load_space(spec)
    if not input_size:
        return space, spec
    try:
        return type(space)(input_size=input_size), f"{spec}@{input_size}px"
    except TypeError:
        parser.error(f"{spec} takes no input_size: drop --input-size")


class Neighbour:
    """The benchmarks' noisy neighbour (scripts/neighbour.py) on `cpus`, for as long as the
    with-block lasts: started in a process group of its own, and always stopped (SIGTERM to
    the group, then SIGKILL), also when the block fails or is interrupted. `cpus` None: no
    neighbour (the idle condition)."""

    def __init__(self, cpus: Optional[str], seed: int = 0, duration_s: float = 3600.0):
        self.cpus, self.seed, self.duration_s = cpus, seed, duration_s
        self.process: Any = None

    def __enter__(self) -> "Neighbour":
        import subprocess

        if self.cpus is not None:
            self.process = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / "neighbour.py"), "--cpus", self.cpus,
                 "--seed", str(self.seed), "--duration", str(self.duration_s)],
                start_new_session=True, stdin=subprocess.DEVNULL)
            try:  # a neighbour that cannot start (a CPU this machine lacks) is no condition
                code = self.process.wait(timeout=1.0)
                raise RuntimeError(f"the neighbour on CPUs {self.cpus} ended at once "
                                   f"(exit {code})")
            except subprocess.TimeoutExpired:
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        import os
        import signal
        import subprocess

        if self.process is None:
            return
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # workers that outlived their leader
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process = None


def simulated_device(home: Path, trace: Path, sim_ms: float, start_s: float,
                     costs: str = "draw") -> str:
    """A simulated device in `home` replaying `trace` from `start_s` s into it; `costs`:
    its graphs' latencies (devices.simulated.COSTS)."""
    from devices import registry
    from devices.simulated import CLOCK_FOLDER

    name = f"replay-{trace.stem}"
    (home / CLOCK_FOLDER).mkdir(parents=True, exist_ok=True)
    (home / CLOCK_FOLDER / name).write_text(repr(start_s))
    registry.add_device(home, registry.DeviceConfig(
        name=name, transport="sim", address=f"replay-{trace.stem}", sim_ms=sim_ms, sim_seed=7,
        noise_trace=str(trace.resolve()), sim_costs=costs), replace=True)
    return name


def load_testfarm() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("testfarm", str(ROOT / "scripts" / "testfarm"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("testfarm", loader))
    loader.exec_module(module)
    return module


class Arm64Board:
    """An emulated arm64 board of the test farm (scripts/testfarm; needs root), started in its
    own network namespace, registered and trusted as device `name` in any home asked
    (`register`), and destroyed on leaving (also on a failure)."""

    INDEX = 81  # network namespace hnb-181: apart from the tests' boards

    def __init__(self, name: str = "arm64"):
        self.name, self.board, self.key = name, None, None

    def __enter__(self) -> "Arm64Board":
        testfarm = load_testfarm()
        root = testfarm.arm64_root(log=lambda text: print(text, file=sys.stderr))
        folder = temporary_folder("bench-arm64-")
        self.key = testfarm.make_client_key(folder / "client")
        index = testfarm.ARM64_INDEX + self.INDEX
        self._keep_host_key(testfarm, folder / f"board{index}" / "sshd")
        self.board = testfarm.Board(index, folder, self.key, root=root).start()
        return self

    @staticmethod
    def _keep_host_key(testfarm: Any, sshd_folder: Path) -> None:
        """Every start of the board serves one host key, kept in the test farm's cache: a
        board's unit in its identity is the fingerprint of its host key, so a new key per
        start made it a new device whose cached truth (an hour of device time) missed."""
        import shutil
        import subprocess

        kept = testfarm.cache_folder() / "bench-arm64-host-key" / "ssh_host_ed25519_key"
        if not kept.exists():
            kept.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(kept)],
                           check=True)
        sshd_folder.mkdir(parents=True, exist_ok=True)
        for suffix in ("", ".pub"):
            target = sshd_folder / f"ssh_host_ed25519_key{suffix}"
            shutil.copyfile(f"{kept}{suffix}", target)
            target.chmod(0o600 if not suffix else 0o644)

    def register(self, home: Path) -> str:
        """The board as a device of `home` (its registry and known hosts); its name."""
        from devices import registry

        registry.add_device(home, registry.DeviceConfig(
            name=self.name, transport="ssh", address=f"root@{self.board.address}",
            key=str(self.key), python="python3", workdir=self.board.workdir,
            kind="testboard", connect_timeout=10.0, lock=self.board.workdir + ".lock"),
            replace=True)
        registry.trust_device(home, self.name, lambda *_: True)
        return self.name

    def __exit__(self, *exc: object) -> None:
        if self.board is not None:
            self.board.destroy()
            self.board = None


class SimFarm:
    """A Ray farm of simulated devices (devices.simulated) on this machine, driven as a user
    drives one: `harness farm serve` and `harness farm stop` in their own processes, one
    $HARNESS_HOME per host under `folder`, every home holding the head's token. The caller's
    home (`client`) holds it too. Stop it with `stop()` (also on errors)."""

    def __init__(self, folder: Path, port: int):
        self.folder = Path(folder)
        self.address = f"127.0.0.1:{port}"
        self.head = self.folder / "head"
        self.client = self.folder / "client"
        self.hosts: dict = {}  # name -> home
        self._cli(self.head, "farm", "serve", "--port", str(port))
        self._copy_token(self.client)

    def add_host(self, name: str, devices: int, median_ms: float = 10.0, seed: int = 0) -> Path:
        """A host `name` serving `devices` simulated devices NAME-000... of kind "sim"."""
        from devices import registry
        from devices.simulated import simulated_names

        home = self.folder / name
        for device in simulated_names(name, devices):
            registry.add_device(home, registry.DeviceConfig(
                name=device, transport="sim", address="npu-sim", kind="sim",
                sim_ms=median_ms, sim_seed=seed), replace=True)
        self._copy_token(home)
        self._cli(home, "farm", "serve", "--address", self.address)
        self.hosts[name] = home
        return home

    def stop_host(self, name: str, grace_s: float = 10.0) -> None:
        self._cli(self.hosts.pop(name), "farm", "stop", "--grace", str(grace_s))

    def stop(self) -> None:
        for name in list(self.hosts):
            try:
                self.stop_host(name, grace_s=5.0)
            except RuntimeError as exc:
                print(exc, file=sys.stderr)
        self._cli(self.head, "farm", "stop", "--grace", "5")

    def _copy_token(self, home: Path) -> None:
        import os
        import shutil

        home.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.head / "ray-token", home / "ray-token")
        os.chmod(home / "ray-token", 0o600)

    @staticmethod
    def _cli(home: Path, *args: str) -> str:
        import os
        import subprocess

        proc = subprocess.run([sys.executable, "-m", "harness.cli", *args],
                              env=dict(os.environ, HARNESS_HOME=str(home),
                                       PYTHONPATH=str(ROOT)),
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise RuntimeError(f"harness {' '.join(args)} failed: {proc.stderr.strip()}")
        return proc.stdout
