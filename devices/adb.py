"""The `adb` transport: Android phones over USB or Wi-Fi ADB, through the standard adb server.

- adbutils talks to the adb server (started if it is not running) and to the phone by serial;
  a `host:port` serial is `adb connect`ed when the server does not list it.
- Files go to /data/local/tmp/harness under their content hash (`sync` push, then a rename).
- Commands run under the pid-reporting wrapper of devices.remote_shell with stderr sent to a
  file (ADB's v1 shell mixes it into stdout) and their exit code echoed (v1 carries none); a
  timeout kills the process group on the phone.
- Phone state: the fingerprint comes from getprop; measurements are pinned to the big cores
  with `taskset` (the cores with the highest cpuinfo_max_freq); thermal zones are read before
  and after each run; before a measurement harness waits (bounded) until the hottest CPU
  zone is below `max_temp_c`, and flags runs taken hot or throttled.
"""
import dataclasses
import hashlib
import logging
import posixpath
import shlex
import shutil
import socket
import subprocess
import time
from typing import Any, Dict, List, Optional, Tuple

import adbutils

from devices.agent_result import DeviceControlReport
from devices.errors import DeviceLost, ThermalError, TransferError
from devices.line_channel import LineChannel, run_to_end, upload_then_rename
from devices.remote_shell import kill_line, quoted, wrapped
from devices.transport import DeviceControl

log = logging.getLogger(__name__)

PROPS = {"android_model": "ro.product.model", "soc": "ro.soc.model",
         "sdk": "ro.build.version.sdk", "build": "ro.build.fingerprint"}
CPU_ZONE_WORDS = ("cpu", "soc", "tsens", "big", "little", "cluster")


def big_core_mask(max_khz: Dict[int, int]) -> Optional[int]:
    """Bit mask of the CPUs with the highest maximum frequency (the big cores)."""
    if not max_khz:
        return None
    top = max(max_khz.values())
    return sum(1 << cpu for cpu, khz in max_khz.items() if khz == top)


class AdbProcess(LineChannel):
    """A shell command on the phone with a line channel; see devices.transport.RemoteProcess.
    ADB's v1 shell carries no exit status: the wrapper echoes it (EXIT_MARK)."""

    what = "the command on the phone"
    stderr_is_costly = True

    def __init__(self, transport: "AdbTransport", connection: adbutils.AdbConnection,
                 stderr_file: str):
        super().__init__(transport.name)
        self._transport = transport
        self._connection = connection
        self._stderr_file = stderr_file

    def _receive(self, wait_s: float) -> Optional[bytes]:
        self._connection.conn.settimeout(wait_s)
        try:
            return self._connection.conn.recv(65536)
        except socket.timeout:
            return None
        except OSError as exc:
            raise DeviceLost(f"the ADB connection failed: {exc}", device=self.device) from None

    def _exit_status(self, wait_s: float) -> Optional[int]:
        return None  # only the exit mark tells, and LineChannel reads that

    def write_line(self, line: str) -> None:
        try:
            self._connection.conn.sendall(line.encode() + b"\n")
        except OSError as exc:
            raise DeviceLost(f"the ADB stream to the agent is gone ({exc})",
                             device=self.device) from None

    def stderr_tail(self) -> str:
        try:
            return self._transport.shell(f"tail -c 4000 {shlex.quote(self._stderr_file)}",
                                         timeout=10)
        except Exception:  # a diagnostic must not hide the error being reported
            return ""

    def kill(self) -> None:
        if self.pid is not None and not self._eof:
            try:
                self._transport.shell(kill_line(self.pid), timeout=15)
            except Exception as exc:
                log.warning("%s: could not kill process %s on the phone: %s",
                            self.device, self.pid, exc)
        self._connection.close()


class PhoneControl(DeviceControl):
    """What the host controls on a phone: a device-wide lock, the measurement pinned to the
    big cores (`taskset` to the cores with the highest cpuinfo_max_freq), thermal zones read
    before and after each run, and a bounded wait until the hottest CPU zone is below
    `max_temp_c`; runs taken hot or throttled are flagged."""

    def __init__(self, phone: "AdbTransport", lock_path: str, pin_big_cores: bool = True,
                 max_temp_c: Optional[float] = None, cool_timeout_s: float = 120.0):
        super().__init__(lock_path)
        self.phone = phone
        self.pin_big_cores = pin_big_cores
        self.max_temp_c = max_temp_c
        self.cool_timeout_s = cool_timeout_s
        self._mask: Optional[int] = None

    @property
    def missing_runtime_fix(self) -> str:  # type: ignore[override]
        return (f"this phone has no usable '{' '.join(self.phone.python)}': install Termux, run "
                f"'pkg install python' and 'pip install numpy onnxruntime' there and set python "
                f"to that Python in devices.toml; or build onnxruntime_perf_test for Android and "
                f"add the phone with --agent perf-test --perf-test PATH")

    @property
    def command_prefix(self) -> List[str]:
        """`taskset MASK` pinning the measurement to the big cores (empty if not pinning)."""
        if not self.pin_big_cores:
            return []
        if self._mask is None:
            out = self.phone.shell("for f in /sys/devices/system/cpu/cpu[0-9]*/cpufreq/cpuinfo_max_freq;"
                             " do echo \"$f $(cat $f)\"; done", timeout=15)
            max_khz = {}
            for line in out.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1].isdigit():
                    max_khz[int(parts[0].split("/cpu")[2].split("/")[0])] = int(parts[1])
            self._mask = big_core_mask(max_khz) or 0
        return ["taskset", format(self._mask, "x")] if self._mask else []

    def thermal(self) -> List[Dict[str, Any]]:
        """Every readable thermal zone: name, type, temperature in degrees Celsius."""
        out = self.phone.shell("for z in /sys/class/thermal/thermal_zone*; do "
                         "echo \"$z $(cat $z/type) $(cat $z/temp)\"; done 2>/dev/null", timeout=15)
        zones = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].lstrip("-").isdigit():
                raw = int(parts[2])
                zones.append({"zone": posixpath.basename(parts[0]), "type": parts[1],
                              "temp_c": raw / 1000.0 if abs(raw) > 200 else float(raw)})
        return zones

    @staticmethod
    def hottest_cpu(zones: List[Dict[str, Any]]) -> Optional[float]:
        cpu = [float(z["temp_c"]) for z in zones
               if any(w in str(z["type"]).lower() for w in CPU_ZONE_WORDS)]
        return max(cpu or [float(z["temp_c"]) for z in zones], default=None)

    def throttled_cpus(self) -> List[int]:
        """CPUs whose scaling_max_freq is below cpuinfo_max_freq (thermal capping)."""
        out = self.phone.shell("for c in /sys/devices/system/cpu/cpu[0-9]*; do echo \"$c "
                         "$(cat $c/cpufreq/cpuinfo_max_freq) $(cat $c/cpufreq/scaling_max_freq)\";"
                         " done 2>/dev/null", timeout=15)
        capped = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                if int(parts[2]) < int(parts[1]):
                    capped.append(int(parts[0].rsplit("cpu", 1)[1]))
        return capped

    def prepare(self, deadline: float) -> DeviceControlReport:
        """Wait (bounded) until the hottest CPU zone is below max_temp_c; ThermalError if not."""
        started = time.monotonic()
        while True:
            zones = self.thermal()
            hottest = self.hottest_cpu(zones)
            if self.max_temp_c is None or hottest is None or hottest < self.max_temp_c:
                return DeviceControlReport(thermal_before=tuple(zones),
                                           waited_s=time.monotonic() - started,
                                           max_temp_c=self.max_temp_c,
                                           pinned_mask=tuple(self.command_prefix[1:]))
            waited = time.monotonic() - started
            if waited >= self.cool_timeout_s or time.monotonic() >= deadline:
                raise ThermalError(f"the phone's CPU stayed at {hottest:.1f} C, above the "
                                   f"{self.max_temp_c:.1f} C limit, for {waited:.0f} s",
                                   device=self.phone.name,
                                   fix="let it cool (screen off, unplugged charger), or raise "
                                       "max_temp_c / cool_timeout_s in devices.toml")
            log.info("%s: %.1f C, waiting to cool below %.1f C", self.phone.name, hottest,
                     self.max_temp_c)
            time.sleep(min(2.0, max(deadline - time.monotonic(), 0.1)))

    def finish(self, prepared: Optional[DeviceControlReport]) -> DeviceControlReport:
        """Thermal state after the run, and flags for a run taken hot or throttled."""
        zones = self.thermal()
        flags = []
        hottest = self.hottest_cpu(zones)
        if self.max_temp_c is not None and hottest is not None and hottest >= self.max_temp_c:
            flags.append(f"hot: {hottest:.1f} C after the run (limit {self.max_temp_c:.1f} C)")
        capped = self.throttled_cpus()
        if capped:
            flags.append(f"throttled: CPUs {capped} capped below their maximum frequency")
        return dataclasses.replace(prepared or DeviceControlReport(),
                                   thermal_after=tuple(zones), flags=tuple(flags))


class AdbTransport:
    """An Android phone by serial, through the adb server on `server_port`."""

    def __init__(self, name: str, serial: str, server_port: int = 5037,
                 python: str = "python3", workdir: str = "/data/local/tmp/harness",
                 pin_big_cores: bool = True, max_temp_c: Optional[float] = None,
                 cool_timeout_s: float = 120.0,
                 lock_path: str = "/data/local/tmp/harness-device.lock"):
        self.name = name
        self.serial = serial
        self.server_port = server_port
        self.python = shlex.split(python)
        self.workdir = workdir
        # the lock is shared by every host and user of the phone
        self.control = PhoneControl(self, lock_path, pin_big_cores, max_temp_c, cool_timeout_s)
        self._device: Optional[adbutils.AdbDevice] = None
        self._processes: List[AdbProcess] = []

    # ------------------------------------------------------------ reaching the phone

    def _server_listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.server_port), timeout=2).close()
            return True
        except OSError:
            return False

    def _client(self) -> adbutils.AdbClient:
        # Start the server ourselves when its port is closed: adbutils would otherwise start
        # one on the default port, whatever port this device uses.
        if not self._server_listening():
            adb = shutil.which("adb")
            if adb is None:
                raise DeviceLost("no adb server runs and no adb binary is installed",
                                 device=self.name,
                                 fix="install Android platform tools (Debian: apt-get install "
                                     "adb)") from None
            log.info("%s: starting the adb server on port %d", self.name, self.server_port)
            subprocess.run([adb, "-P", str(self.server_port), "start-server"],
                           capture_output=True, timeout=60)
        return adbutils.AdbClient(host="127.0.0.1", port=self.server_port, socket_timeout=30)

    def device(self) -> adbutils.AdbDevice:
        """The phone, attached and authorised, or DeviceLost saying why not."""
        if self._device is not None and self._server_listening():
            return self._device
        self._device = None  # (re)start our server and find the phone again
        client = self._client()
        states = {d.serial: d.state for d in client.list()}
        if states.get(self.serial) != "device" and ":" in self.serial:
            try:
                client.connect(self.serial, timeout=10)
            except (adbutils.AdbError, OSError) as exc:
                log.debug("adb connect %s: %s", self.serial, exc)
            states = {d.serial: d.state for d in client.list()}
        state = states.get(self.serial)
        if state != "device":
            raise DeviceLost(f"phone {self.serial} is {state or 'not attached'} "
                             f"(adb server on port {self.server_port})", device=self.name,
                             fix="plug it in and allow USB debugging on the phone, or "
                                 f"'adb connect {self.serial}' for Wi-Fi ADB")
        self._device = client.device(self.serial)
        return self._device

    def _forget(self) -> None:
        self._device = None

    def shell(self, command: str, timeout: float = 60.0) -> str:
        """Output of a short shell command (no pid wrapper: for quick reads only)."""
        try:
            return self.device().shell(command, timeout=timeout)
        except (adbutils.AdbError, OSError) as exc:
            self._forget()
            raise DeviceLost(f"adb shell failed: {exc}", device=self.name) from None

    # ------------------------------------------------------------ Transport protocol

    def put(self, local_path: str, remote_name: str, force: bool = False) -> str:
        target = posixpath.join(self.workdir, remote_name)
        try:
            sync = self.device().sync
            if not force and sync.exists(target):
                return target
            self.shell(quoted(["mkdir", "-p", posixpath.dirname(target)]))
            upload_then_rename(target, lambda partial: sync.push(local_path, partial),
                               self._move, lambda partial: self.shell(quoted(["rm", "-f", partial])))
        except adbutils.AdbError as exc:
            raise TransferError(f"push of {local_path} to {target} failed: {exc}",
                                device=self.name) from None
        except OSError as exc:
            self._forget()
            raise DeviceLost(f"push to the phone failed: {exc}", device=self.name) from None
        return target

    def _move(self, partial: str, target: str) -> None:
        out = self.shell(quoted(["mv", "-f", partial, target]) + " && echo moved")
        if "moved" not in out:
            raise TransferError(f"cannot place {target} on the phone: {out.strip()}",
                                device=self.name)

    def _open(self, argv: List[str], report_exit: bool) -> AdbProcess:
        stderr_file = posixpath.join(self.workdir, f"stderr-{time.time_ns()}.txt")
        try:
            self.shell(quoted(["mkdir", "-p", self.workdir]))
            connection = self.device().open_shell(wrapped(argv, stderr_file, report_exit))
        except (adbutils.AdbError, OSError) as exc:
            self._forget()
            raise DeviceLost(f"cannot start a command on the phone: {exc}",
                             device=self.name) from None
        return AdbProcess(self, connection, stderr_file)

    def run(self, argv: List[str], timeout: float) -> Tuple[int, str, str]:
        return run_to_end(self._open(argv, report_exit=True), argv, timeout, "the phone")

    def spawn(self, argv: List[str]) -> AdbProcess:
        process = self._open(argv, report_exit=False)
        process.read_pid(30.0)
        self._processes.append(process)
        return process

    def fingerprint(self) -> Dict[str, object]:
        values: Dict[str, object] = {}
        for key, prop in PROPS.items():
            values[key] = self.shell(f"getprop {prop}", timeout=15).strip() or None
        # The phone's unit (two phones of one model are two devices to the cache): its
        # serial number, hashed so that an exported cache does not carry it.
        serial = self.shell("getprop ro.serialno", timeout=15).strip() or self.serial
        values["unit"] = "sha256:" + hashlib.sha256(serial.encode()).hexdigest()[:16]
        return values

    def remove(self, remote_names: List[str], timeout: float = 60.0) -> None:
        paths = [posixpath.join(self.workdir, name) for name in remote_names]
        self.shell(quoted(["rm", "-rf", *paths]), timeout=timeout)

    def close(self) -> None:
        for process in self._processes:
            process.kill()
        self._processes.clear()
