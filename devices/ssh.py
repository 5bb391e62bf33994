"""The `ssh` transport: edge boards reached over SSH with paramiko.

- Host keys are verified with paramiko's RejectPolicy against $HARNESS_HOME/known_hosts and
  the user's ~/.ssh/known_hosts. An unknown key is refused (HostKeyUnknown names
  `harness devices trust NAME`); a changed key is refused loudly (HostKeyChanged) and never
  replaced here.
- Key authentication only (a key file, the SSH agent's keys or the default keys); an optional
  jump host; connect timeout and keep-alive; one reconnect on a dropped connection.
- Every remote argument is quoted and commands run under a wrapper that reports their pid
  (devices.remote_shell), so a timeout kills the whole process group on the board (over a
  fresh connection if the old one is gone).
"""
import base64
import hashlib
import logging
import posixpath
import shlex
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import paramiko

from devices.errors import BadRequest, DeviceError, DeviceLost, TransferError
from devices.line_channel import (LineChannel, file_sha256, partial_name, run_to_end,
                                  upload_then_rename)
from devices.remote_shell import kill_line, quoted, wrapped
from devices.transport import DeviceControl

log = logging.getLogger(__name__)

# A timeout spends at most this long killing its command on the board (so it fires within
# timeout_s + 3 s even on a stalled link); the open connection gets the first share of it.
KILL_WITHIN_S = 2.5
KILL_OVER_OPEN_CONNECTION_S = 1.0


class HostKeyUnknown(DeviceError):
    kind = "USER"


class HostKeyChanged(DeviceError):
    kind = "USER"


class AuthenticationFailed(DeviceError):
    kind = "USER"


def key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style SHA256 fingerprint of a public key."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def host_entry(host: str, port: int) -> str:
    """How known_hosts names a host: 'host' on port 22, '[host]:port' otherwise."""
    return host if port == 22 else f"[{host}]:{port}"


@dataclass(frozen=True)
class Endpoint:
    """user@host:port of an SSH server."""

    user: str
    host: str
    port: int = 22

    @classmethod
    def parse(cls, text: str, default_user: Optional[str] = None) -> "Endpoint":
        user, at, rest = text.rpartition("@")
        if not at:
            user, rest = default_user or "", text
        host, port_text = rest, "22"
        if rest.startswith("["):
            host, _, after = rest[1:].partition("]")
            port_text = after[1:] if after.startswith(":") else "22"
        elif rest.count(":") == 1:
            host, port_text = rest.split(":")
        if not host or not user:
            raise BadRequest(f"SSH address {text!r} needs a user and a host",
                             fix="write it as user@host or user@host:port")
        if not (port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536):
            raise BadRequest(f"SSH address {text!r} has port {port_text!r}, not a port number",
                             fix="write it as user@host or user@host:port, with a port "
                                 "from 1 to 65535")
        return cls(user, host, int(port_text))

    def __str__(self) -> str:
        return f"{self.user}@{self.host}" + (f":{self.port}" if self.port != 22 else "")


class SSHConnection:
    """One authenticated, host-key-verified SSH connection (possibly through a jump host)."""

    def __init__(self, name: str, endpoint: Endpoint, known_hosts: List[Path],
                 key_file: Optional[str] = None, jump: Optional[Endpoint] = None,
                 connect_timeout: float = 10.0, keepalive_s: int = 5):
        self.name = name
        self.endpoint = endpoint
        self.known_hosts = known_hosts
        self.key_file = str(Path(key_file).expanduser()) if key_file else None
        self.jump = jump
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        self._jump_client: Optional[paramiko.SSHClient] = None
        self.client = self._connect()

    def _new_client(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        for path in self.known_hosts:
            if path.exists():
                client.load_system_host_keys(str(path))  # read only: never written back
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        return client

    def _open(self, client: paramiko.SSHClient, endpoint: Endpoint, sock=None) -> None:
        try:
            client.connect(endpoint.host, endpoint.port, username=endpoint.user,
                           key_filename=self.key_file, timeout=self.connect_timeout,
                           banner_timeout=self.connect_timeout,
                           auth_timeout=self.connect_timeout, allow_agent=True,
                           look_for_keys=self.key_file is None, sock=sock)
        except paramiko.BadHostKeyException as exc:
            raise HostKeyChanged(
                f"REFUSED: the host key of {endpoint.host}:{endpoint.port} has CHANGED: "
                f"known {exc.expected_key.get_name()} {key_fingerprint(exc.expected_key)}, "
                f"offered {exc.key.get_name()} {key_fingerprint(exc.key)}. Someone may be "
                f"intercepting the connection, or the board was reinstalled",
                device=self.name,
                fix=f"check with the board's owner; only if it was reinstalled, run "
                    f"'harness devices trust {self.name} --replace'") from None
        except paramiko.AuthenticationException as exc:
            raise AuthenticationFailed(
                f"{endpoint} refused our key ({exc})", device=self.name,
                fix=f"install your public key on the board (ssh-copy-id {endpoint.user}@"
                    f"{endpoint.host}) or pass --key to 'harness devices add'") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise HostKeyUnknown(
                    f"the host key of {endpoint.host}:{endpoint.port} is not known, so the "
                    f"connection was refused", device=self.name,
                    fix=f"run 'harness devices trust {self.name}' to see its fingerprint and "
                        f"record it") from None
            # paramiko reports the first failure (a missing banner, say) on its transport and
            # a later one ("No existing session") here: name the first.
            first = str(getattr(client.get_transport(), "saved_exception", None) or exc)
            if "No existing session" in first or "Negotiation failed" in first:
                first = f"no SSH server answered within {self.connect_timeout:g} s"
            raise DeviceLost(f"SSH to {endpoint} failed: {first}", device=self.name,
                             fix="check that the address is the board's and that sshd (not "
                                 "another service) listens on that port") from None
        except (OSError, EOFError) as exc:
            raise DeviceLost(f"cannot reach {endpoint.host}:{endpoint.port}: {exc}",
                             device=self.name,
                             fix="check that the board is on, its address is right and sshd "
                                 "runs there") from None

    def _connect(self) -> paramiko.SSHClient:
        sock = None
        if self.jump is not None:
            self._jump_client = self._new_client()
            self._open(self._jump_client, self.jump)
            try:
                sock = self._jump_client.get_transport().open_channel(
                    "direct-tcpip", (self.endpoint.host, self.endpoint.port), ("127.0.0.1", 0),
                    timeout=self.connect_timeout)
            except (paramiko.SSHException, OSError) as exc:
                self._jump_client.close()
                raise DeviceLost(f"jump host {self.jump} cannot reach {self.endpoint.host}:"
                                 f"{self.endpoint.port}: {exc}", device=self.name) from None
        client = self._new_client()
        self._open(client, self.endpoint, sock=sock)
        client.get_transport().set_keepalive(self.keepalive_s)
        return client

    @property
    def alive(self) -> bool:
        transport = self.client.get_transport()
        return transport is not None and transport.is_active()

    def close(self) -> None:
        self.client.close()
        if self._jump_client is not None:
            self._jump_client.close()


class SSHProcess(LineChannel):
    """A command on the board with a line channel; see devices.transport.RemoteProcess."""

    def __init__(self, transport: "SSHTransport", channel: paramiko.Channel):
        super().__init__(transport.name)
        self._transport = transport
        self._channel = channel
        self._killed = False
        self._drain_stderr_with(lambda: channel.recv_stderr(4096))

    def _receive(self, wait_s: float) -> Optional[bytes]:
        self._channel.settimeout(wait_s)
        try:
            return self._channel.recv(1 << 16)
        except socket.timeout:
            if not self._transport.connection_alive():
                raise DeviceLost("the SSH connection dropped while waiting for the agent",
                                 device=self.device) from None
            return None
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise DeviceLost(f"the SSH connection failed: {exc or type(exc).__name__}",
                             device=self.device) from None

    def _exit_status(self, wait_s: float) -> Optional[int]:
        if self._channel.status_event.wait(max(wait_s, 0.0)):
            return self._channel.exit_status
        return None

    def write_line(self, line: str) -> None:
        try:
            self._channel.sendall(line.encode() + b"\n")
        except (OSError, EOFError, paramiko.SSHException) as exc:
            raise DeviceLost(f"the SSH channel to the agent is gone ({exc or type(exc).__name__})",
                             device=self.device) from None

    def kill(self) -> None:
        if self._killed:
            return
        self._killed = True
        if self.pid is not None and self.exit_code() is None:
            self._transport.kill_remote(self.pid)
        self._channel.close()
        self._join_stderr()


class SSHTransport:
    """An edge board over SSH; see the module docstring."""

    def __init__(self, name: str, endpoint: Endpoint, known_hosts: List[Path],
                 key_file: Optional[str] = None, jump: Optional[Endpoint] = None,
                 python: str = "python3", workdir: str = ".cache/harness",
                 connect_timeout: float = 10.0, keepalive_s: int = 5,
                 lock_path: str = "/tmp/harness-device.lock"):
        self.name = name
        self.control = DeviceControl(lock_path)  # the lock is shared by every user of the board
        self.endpoint = endpoint
        self.python = shlex.split(python)
        self._workdir = workdir
        self.connect_timeout = connect_timeout
        self._settings = dict(known_hosts=known_hosts, key_file=key_file, jump=jump,
                              connect_timeout=connect_timeout, keepalive_s=keepalive_s)
        self._connection: Optional[SSHConnection] = None
        self._sftp: Optional[paramiko.SFTPClient] = None
        self._has_sftp = True  # False once the board refused the SFTP subsystem
        self._home: Optional[str] = None
        self._processes: List[SSHProcess] = []
        self._lock = threading.RLock()

    # ------------------------------------------------------------ connection

    def connection(self, fresh: bool = False) -> SSHConnection:
        """The live connection; reconnects when it dropped (or when `fresh`)."""
        with self._lock:
            if self._connection is not None and (fresh or not self._connection.alive):
                log.info("%s: reconnecting to %s", self.name, self.endpoint)
                self._drop()
            if self._connection is None:
                self._connection = SSHConnection(self.name, self.endpoint,
                                                 **self._settings)  # type: ignore[arg-type]
            return self._connection

    def connection_alive(self) -> bool:
        return self._connection is not None and self._connection.alive

    def _drop(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:
                pass
            self._sftp = None
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _retrying(self, what: str, operation):
        """Run operation(connection) and, if the connection dropped, reconnect once and retry."""
        for attempt in (1, 2):
            connection = self.connection()
            try:
                return operation(connection)
            except (OSError, EOFError, paramiko.SSHException) as exc:
                if isinstance(exc, (socket.timeout, TimeoutError)) or attempt == 2:
                    raise DeviceLost(f"{what} failed over SSH: {exc or type(exc).__name__}",
                                     device=self.name) from None
                log.warning("%s: %s failed (%s); reconnecting once", self.name, what, exc)
                with self._lock:
                    self._drop()

    @property
    def workdir(self) -> str:
        """The absolute working folder on the board (relative paths are under $HOME)."""
        if self._home is None:
            self._home = self._retrying("finding the home folder", self._find_home)
        return posixpath.join(self._home, self._workdir)

    def _find_home(self, connection: SSHConnection) -> str:
        sftp = self._sftp_client(connection)
        if sftp is not None:
            return sftp.normalize(".")
        code, out, err = _exec_plain(connection, "pwd", self.connect_timeout)
        if code != 0 or not out.strip().startswith("/"):
            raise DeviceLost(f"'pwd' on the board answered {out.strip()[:200]!r} (exit code "
                             f"{code}; {err.strip()[-300:]!r}) instead of the home folder",
                             device=self.name, fix="check that the account has a home folder "
                                                   "and a POSIX shell")
        return out.strip().splitlines()[-1]

    def _sftp_client(self, connection: SSHConnection) -> Optional[paramiko.SFTPClient]:
        """The SFTP session, or None on a board without the SFTP subsystem (Dropbear and
        minimal images ship no sftp-server): files then go over an exec channel."""
        if self._sftp is None and self._has_sftp:
            channel = connection.client.get_transport().open_session(
                timeout=self.connect_timeout)
            try:
                channel.invoke_subsystem("sftp")
            except paramiko.SSHException:
                channel.close()
                if not connection.alive:
                    raise
                log.info("%s: the board has no SFTP subsystem; sending files over an exec "
                         "channel", self.name)
                self._has_sftp = False
                return None
            self._sftp = paramiko.SFTPClient(channel)
        return self._sftp

    # ------------------------------------------------------------ Transport protocol

    def put(self, local_path: str, remote_name: str, force: bool = False) -> str:
        target = posixpath.join(self.workdir, remote_name)

        def upload(connection: SSHConnection) -> str:
            sftp = self._sftp_client(connection)
            if sftp is None:
                return self._put_over_exec(connection, local_path, target, force)
            if not force:
                try:
                    if stat.S_ISREG(sftp.stat(target).st_mode):
                        return target
                except FileNotFoundError:
                    pass
            self._makedirs(sftp, posixpath.dirname(target))
            try:
                return upload_then_rename(target, lambda partial: sftp.put(local_path, partial),
                                          sftp.posix_rename, sftp.remove)
            except PermissionError as exc:
                raise TransferError(f"cannot write {target} on the board: {exc}",
                                    device=self.name) from None
            except OSError as exc:
                if isinstance(exc, (socket.timeout, EOFError)) or "Socket" in str(exc):
                    raise
                raise TransferError(f"upload of {local_path} to {target} failed: {exc}",
                                    device=self.name) from None
            return target

        return self._retrying(f"upload of {Path(local_path).name}", upload)

    def _put_over_exec(self, connection: SSHConnection, local_path: str, target: str,
                       force: bool) -> str:
        """Upload without SFTP: `cat` into a partial file, check its sha256 on the board,
        rename it into place (the partial file is removed on any failure)."""
        timeout = self.connect_timeout
        if not force and _exec_plain(connection, quoted(["test", "-f", target]), timeout)[0] == 0:
            return target
        size = Path(local_path).stat().st_size
        command = quoted(["sh", "-c", UPLOAD_SCRIPT, "harness-put", posixpath.dirname(target),
                          partial_name(target), target, file_sha256(local_path), *self.python])
        code, _, err = _exec_plain(connection, command, timeout + size / 1e5, source=local_path)
        if code == 3:
            raise TransferError(f"upload of {local_path} to {target} arrived damaged "
                                f"({err.strip()[-300:]}); nothing was kept", device=self.name,
                                fix="retry; if it happens again, check the link and the "
                                    "board's storage")
        if code != 0:
            raise TransferError(f"upload of {local_path} to {target} over an exec channel "
                                f"failed (exit code {code}): {err.strip()[-500:]}",
                                device=self.name)
        return target

    @staticmethod
    def _makedirs(sftp: paramiko.SFTPClient, path: str) -> None:
        missing = []
        while path not in ("", "/"):
            try:
                sftp.stat(path)
                break
            except FileNotFoundError:
                missing.append(path)
                path = posixpath.dirname(path)
        for folder in reversed(missing):
            try:
                sftp.mkdir(folder)
            except OSError:
                sftp.stat(folder)  # made meanwhile by someone else: fine; else raise

    def _exec(self, argv: List[str]) -> SSHProcess:
        def start(connection: SSHConnection) -> SSHProcess:
            channel = connection.client.get_transport().open_session()
            channel.exec_command(wrapped(argv))  # sshd gives it a process group
            return SSHProcess(self, channel)

        return self._retrying(f"starting {Path(argv[-1]).name if argv else 'a command'}", start)

    def run(self, argv: List[str], timeout: float) -> Tuple[int, str, str]:
        return run_to_end(self._exec(argv), argv, timeout, "the board")

    def spawn(self, argv: List[str]) -> SSHProcess:
        process = self._exec(argv)
        process.read_pid(self.connect_timeout + 20)
        self._processes.append(process)
        return process

    def kill_remote(self, pid: int, within: float = KILL_WITHIN_S) -> None:
        """Kill a process we started and its process group on the board, in at most `within`
        seconds: over the open connection if it answers within a second, else (it is gone
        or stalled, and is dropped) over a fresh connection in the time left. A board that
        cannot be reached in time is logged; its sshd ends the session once it notices."""
        deadline = time.monotonic() + within
        command = kill_line(pid)
        connection = self._connection
        if connection is not None and connection.alive:
            if _kill_over(command, min(KILL_OVER_OPEN_CONNECTION_S, within),
                          connection=connection):
                return
            log.info("%s: the connection did not answer the kill of process %d; killing it "
                     "over a fresh one", self.name, pid)
            with self._lock:
                if self._connection is connection:
                    self._drop()  # stalled: also wakes whatever still waits on it
        remaining = deadline - time.monotonic()
        settings = dict(self._settings, connect_timeout=max(remaining, 0.1))
        if remaining <= 0 or not _kill_over(
                command, remaining,
                open_fresh=lambda: SSHConnection(self.name, self.endpoint,
                                                 **settings)):  # type: ignore[arg-type]
            log.warning("%s: could not kill process %d on the board within %.1f s (the board "
                        "does not answer); its sshd ends the session when it notices",
                        self.name, pid, within)

    def fingerprint(self) -> Dict[str, object]:
        """The board's unit: the fingerprint of the host key it was verified by. Two boards
        of one model are two devices to the cache (their latencies can differ: cooling,
        silicon, what else runs there); a board reinstalled with a new key is a new one."""
        key = self._retrying("reading the host key",
                             lambda connection: connection.client.get_transport()
                             .get_remote_server_key())
        return {"unit": key_fingerprint(key)}

    def remove(self, remote_names: List[str], timeout: float = 60.0) -> None:
        """Delete files or folders under the working folder (for `harness devices clean`)."""
        paths = [posixpath.join(self.workdir, name) for name in remote_names]
        code, _, err = self.run(["rm", "-rf", "--", *paths], timeout)
        if code != 0:
            raise TransferError(f"cannot remove {', '.join(paths)} on the board: {err.strip()}",
                                device=self.name)

    def close(self) -> None:
        for process in self._processes:
            try:
                process.kill()
            except DeviceError:
                pass
        self._processes.clear()
        with self._lock:
            self._drop()


# Where the board has no SFTP: stdin into a partial file, its sha256 checked on the board
# (sha256sum, else the board's Python, the trailing arguments), then renamed into place.
# Arguments: folder, partial file, target, expected sha256, the Python command.
UPLOAD_SCRIPT = """folder=$1 part=$2 target=$3 want=$4; shift 4
mkdir -p "$folder" || exit 4
cat > "$part" || { rm -f "$part"; exit 4; }
if command -v sha256sum >/dev/null 2>&1; then got=$(sha256sum "$part" | cut -d" " -f1)
else got=$("$@" -c 'import hashlib, sys
print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$part"); fi
if [ "$got" != "$want" ]; then
  rm -f "$part"; echo "content hash ${got:-unknown}, expected $want" >&2; exit 3
fi
mv -f "$part" "$target" || { rm -f "$part"; exit 4; }"""




def _exec_plain(connection: SSHConnection, command: str, timeout: float,
                source: Optional[str] = None) -> Tuple[int, str, str]:
    """Run a short command over its own channel, `source`'s bytes on its stdin; (exit code,
    stdout, stderr). socket.timeout after `timeout` s (the caller's retry treats it as a lost
    link)."""
    deadline = time.monotonic() + timeout
    channel = connection.client.get_transport().open_session(timeout=timeout)
    try:
        channel.settimeout(timeout)
        channel.exec_command(command)
        if source is not None:
            with open(source, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 15), b""):
                    channel.sendall(block)
        channel.shutdown_write()
        out, err = bytearray(), bytearray()
        while True:
            if channel.recv_ready():
                out += channel.recv(1 << 16)
            elif channel.recv_stderr_ready():
                err += channel.recv_stderr(1 << 16)
            elif channel.status_event.is_set():
                break
            elif time.monotonic() > deadline:
                raise socket.timeout(f"no answer within {timeout:.0f} s")
            else:
                channel.status_event.wait(0.05)
        return (channel.recv_exit_status(), out.decode(errors="replace"),
                err.decode(errors="replace"))
    finally:
        channel.close()


def _kill_over(command: str, wait_s: float, connection: Optional[SSHConnection] = None,
               open_fresh: Optional[Callable[[], SSHConnection]] = None) -> bool:
    """Run the kill `command` over `connection` (or one `open_fresh()` makes), waiting at
    most `wait_s` s; whether it ran. The work happens in a thread, because paramiko may wait
    without a bound on a stalled connection; a fresh connection is closed afterwards (which
    also ends the thread if it is still waiting)."""
    done = threading.Event()
    lock = threading.Lock()
    fresh: List[Optional[SSHConnection]] = [None]
    gave_up = [False]

    def kill() -> None:
        used = connection
        if used is None and open_fresh is not None:
            try:
                used = open_fresh()
            except DeviceError as exc:
                log.debug("kill: no fresh connection: %s", exc)
                return
            with lock:
                if gave_up[0]:
                    used.close()
                    return
                fresh[0] = used
        if used is None:
            return
        try:
            channel = used.client.get_transport().open_session(timeout=wait_s)
            channel.exec_command(command)
            if channel.status_event.wait(wait_s):
                done.set()
            channel.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            log.debug("kill over %s failed: %s", used.endpoint, exc or type(exc).__name__)

    threading.Thread(target=kill, daemon=True, name="harness-ssh-kill").start()
    finished = done.wait(wait_s)
    with lock:
        gave_up[0] = True
        opened = fresh[0]
    if opened is not None:
        opened.close()
    return finished


def fetch_host_key(host: str, port: int, timeout: float = 10.0, sock=None) -> paramiko.PKey:
    """The key a server offers, read without authenticating (for `harness devices trust`)."""
    try:
        if sock is None:
            sock = socket.create_connection((host, port), timeout=timeout)
        transport = paramiko.Transport(sock)
        try:
            transport.start_client(timeout=timeout)
            return transport.get_remote_server_key()
        finally:
            transport.close()
    except (OSError, paramiko.SSHException, EOFError) as exc:
        raise DeviceLost(f"cannot read the host key of {host}:{port}: {exc}",
                         fix="check that the board is on and sshd runs there") from None
