"""A farm host's life: `harness farm serve | status | stop`.

`serve` starts this host's Ray node (the head, or joining one), with Ray's output in
`$HARNESS_HOME/logs/farm-serve.log`, and on it the host's `FarmHost` actor
(harness.pool.ray_pool) that serves the registered devices. What it started is recorded in
`$HARNESS_HOME/farm-host.json`, and every process of the node carries the environment
variable HARNESS_FARM_NODE=<name>, so that `stop` ends exactly this host's node, even when
several nodes share a machine (test farms, simulations) and `ray stop` would end them all.

`stop` drains first (the host takes no new job; running ones may finish within the grace),
stops the agents on the devices, then sends SIGTERM to the node's processes and SIGKILL to
what is left after the grace. Stopping the head ends the farm for every host.

`status` asks every host of the farm what its devices are doing, as TVM's
query_rpc_tracker does for its tracker.
"""
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from devices.safe_files import replace_file, replace_text
from harness.errors import HarnessError
from harness.pool.ray_pool import (CONTROL_GROUP, HOST_ACTOR_PREFIX, NAMESPACE, RESOURCE_PREFIX,
                              TOKEN_FILE, FarmHost, HostStatus, auth_env, checked_token,
                              connect, control, ensure_token, host_actors, import_ray)

log = logging.getLogger(__name__)

RECORD_FILE = "farm-host.json"
NODE_MARK = "HARNESS_FARM_NODE"   # in the environment of every process of a served node
START_TIMEOUT_S = 120.0           # for the host's actor to answer after the node started
DRAIN_SLACK_S = 30.0              # connecting and asking, beyond the grace of a drain


@dataclass(frozen=True)
class ServedNode:
    """What `serve` started on this host (kept in $HARNESS_HOME/farm-host.json)."""

    name: str          # the node's mark and its FarmHost actor's name after the prefix
    address: str       # the farm head's HOST:PORT
    head: bool
    devices: int       # devices with a kind this host serves
    started_at: float
    token: str         # the token file the node authenticates with
    node_ip: str = ""  # the address it was asked to use (--node-ip); "" in older records


@dataclass(frozen=True)
class StopReport:
    """What `stop` did on this host."""

    name: str
    head: bool
    jobs_cut: Optional[int]   # jobs still running when the grace ran out (None: unknown)
    terminated: int           # processes that ended on SIGTERM
    killed: int               # processes that needed SIGKILL


@dataclass(frozen=True)
class FarmStatus:
    """The farm as its hosts describe it."""

    address: str
    nodes_alive: int
    hosts: Tuple[HostStatus, ...]
    silent: Tuple[str, ...]   # hosts whose actor did not answer
    addresses: Tuple[str, ...] = ()  # the IP addresses of the farm's live Ray nodes


def record_path(home: Path) -> Path:
    return Path(home) / RECORD_FILE


def host_resources(home: Path) -> Dict[str, float]:
    """The Ray resources this host offers: one unit per registered device, by kind."""
    from devices.registry import load_devices

    resources: Dict[str, float] = {}
    for config in load_devices(home).values():
        if config.kind:
            key = RESOURCE_PREFIX + config.kind
            resources[key] = resources.get(key, 0) + 1
    return resources


def serve_command(resources: Dict[str, float], address: Optional[str], port: int,
                  node_ip: str) -> List[str]:
    """The `ray start` command line that joins (or, without address, heads) a farm."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [ray_cli, "start", f"--resources={json.dumps(resources)}",
               f"--node-ip-address={node_ip}", "--disable-usage-stats", "--num-cpus=1",
               "--object-store-memory=200000000"]
    if address:
        command.append(f"--address={address}")
    else:
        command += ["--head", f"--port={port}", "--include-dashboard=false"]
    return command


def serve(home: Path, address: Optional[str], port: int = 26380,
          node_ip: str = "127.0.0.1") -> ServedNode:
    """Start this host's Ray node and its FarmHost actor (`harness farm serve`); the head
    makes the farm's token, a joining host must hold a copy of it."""
    ray = import_ray()
    home = Path(home)
    resources = host_resources(home)
    devices = int(sum(resources.values()))
    if address and not resources:
        raise HarnessError(f"no device with a kind is registered in {home}",
                           fix="register devices with --kind before serving them")
    _refuse_a_second_node(home)
    token = checked_token(home) if address else ensure_token(home)
    name = f"{socket.gethostname()}-{secrets.token_hex(3)}"
    if devices:
        resources[HOST_ACTOR_PREFIX + name] = 1.0  # pins the host's actor to this node
    env = dict(os.environ, HARNESS_HOME=str(home), RAY_USAGE_STATS_ENABLED="0",
               **{NODE_MARK: name}, **auth_env(token))
    # Ray's INFO lines go to a log file, not the user's terminal; a failure shows its tail.
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / "farm-serve.log"
    with open(log_path, "ab") as log_file, _shared_cluster_file_kept():
        code = subprocess.run(serve_command(resources, address, port, node_ip), env=env,
                              stdout=log_file, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log_path.read_bytes()[-2000:].decode("utf-8", "replace").strip().splitlines()
        raise HarnessError(f"'ray start' failed (exit {code}): "
                           + " / ".join(line.strip() for line in tail[-4:]),
                           fix=f"read {log_path}; 'harness farm stop' ends a node left over "
                               f"from an earlier run of this home")
    node = ServedNode(name, address or f"{node_ip}:{port}", head=not address, devices=devices,
                      started_at=time.time(), token=str(token), node_ip=node_ip)
    replace_text(record_path(home), json.dumps(asdict(node), indent=1) + "\n")
    if devices:
        try:
            _start_host_actor(ray, home, node)
        except Exception:
            stop(home, grace_s=5.0)
            raise
    return node


def _start_host_actor(ray: Any, home: Path, node: ServedNode) -> None:
    """Start the node's FarmHost (detached: it outlives this command) and wait for it."""
    connect(ray, node.address, home)
    try:
        actor = ray.remote(concurrency_groups={CONTROL_GROUP: 2})(FarmHost).options(
            name=HOST_ACTOR_PREFIX + node.name, namespace=NAMESPACE, lifetime="detached",
            num_cpus=0, resources={HOST_ACTOR_PREFIX + node.name: 1.0},
            max_concurrency=2 * node.devices + 4).remote(str(home), node.name)
        ray.get(control(actor.offers).remote(), timeout=START_TIMEOUT_S)
    except Exception as exc:
        raise HarnessError(f"the farm host's actor did not start: {exc}",
                           fix=f"read {home / 'logs' / 'farm-serve.log'} and Ray's logs under "
                               f"/tmp/ray/session_latest/logs") from None
    finally:
        ray.shutdown()


def ray_cluster_file() -> Path:
    """The file where 'ray start --head' records the newest cluster of the machine, for
    every Ray user's 'ray.init()' to find (Ray's temporary folder: $RAY_TMPDIR or /tmp)."""
    return Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"


@contextmanager
def _shared_cluster_file_kept(path: Optional[Path] = None) -> Iterator[None]:
    """Leave Ray's machine-wide record of the current cluster as it was: a farm is reached
    by its address, and must not become (nor, once stopped, stay) every other Ray user's
    default cluster."""
    path = path or ray_cluster_file()
    try:
        before: Optional[bytes] = path.read_bytes()
    except OSError:
        before = None
    try:
        yield
    finally:
        try:
            if before is None:
                path.unlink(missing_ok=True)
            elif path.read_bytes() != before:
                replace_file(path, lambda out: out.write(before))
        except OSError as exc:
            log.warning("could not restore Ray's %s (%s): other Ray programs of this machine "
                        "may find the farm as their default cluster", path, exc)


def _refuse_a_second_node(home: Path) -> None:
    node = read_record(home)
    if node is not None and _node_processes(node.name):
        raise HarnessError(f"this home already serves farm node {node.name} (farm at "
                           f"{node.address})", fix="stop it first with 'harness farm stop'")


def read_record(home: Path) -> Optional[ServedNode]:
    """What `serve` recorded in this home, or None; a damaged record is a typed error."""
    path = record_path(home)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        fields = ServedNode.__dataclass_fields__
        return ServedNode(**{k: data[k] for k in fields if k in data or k != "node_ip"})
    except (ValueError, KeyError, TypeError) as exc:
        raise HarnessError(f"{path} is damaged ({exc})",
                           fix=f"move {path} aside, then end this home's node by its pids: its "
                               f"processes carry {NODE_MARK} in their environment (ps eww -u "
                               f"$USER | grep {NODE_MARK}); not 'ray stop --force', which ends "
                               f"every Ray node of the machine, other users' included") \
            from None


def _node_processes(name: str) -> List[Any]:
    """The processes of the node marked `name` (this user's; others' cannot be read)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        if process.pid == os.getpid():
            continue
        try:
            if process.environ().get(NODE_MARK) == name:
                found.append(process)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess, OSError):
            continue
    return found


def stop(home: Path, grace_s: float = 10.0) -> StopReport:
    """Drain this host's node and end its processes (`harness farm stop`)."""
    import psutil

    home = Path(home)
    node = read_record(home)
    if node is None:
        raise HarnessError(f"this home ({home}) serves no farm node",
                           fix="'harness farm status --address HEAD:PORT' shows a farm's hosts; "
                               "run stop on the host (with the home) that serves")
    jobs_cut = _drain_within(home, node, grace_s) if node.devices else 0
    terminated = killed = 0
    for stage in _in_shutdown_order(_node_processes(node.name)):
        for process in stage:
            try:
                process.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        gone, alive = psutil.wait_procs(stage, timeout=grace_s)
        for process in alive:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5.0)
        terminated, killed = terminated + len(gone), killed + len(alive)
    record_path(home).unlink(missing_ok=True)
    if killed:
        log.warning("%d processes of farm node %s ignored SIGTERM for %.0f s and were killed",
                    killed, node.name, grace_s)
    return StopReport(node.name, node.head, jobs_cut, terminated=terminated, killed=killed)


def _in_shutdown_order(processes: List[Any]) -> List[List[Any]]:
    """The node's processes in the order they end cleanly: the raylet first (it drains its
    workers), then Ray's helpers, the GCS last. Signalled all at once, the raylet and the
    GCS wait for each other and ignore SIGTERM for as long as one cares to wait."""
    import psutil

    stages: List[List[Any]] = [[], [], []]
    for process in processes:
        try:
            name = process.name()
        except psutil.NoSuchProcess:
            continue
        stages[0 if name == "raylet" else 2 if name == "gcs_server" else 1].append(process)
    return [stage for stage in stages if stage]


def _drain_within(home: Path, node: ServedNode, grace_s: float) -> Optional[int]:
    """_drain, given up after the grace plus DRAIN_SLACK_S: Ray's connect has no timeout
    of its own, and a node in trouble must still be stoppable."""
    answer: List[Optional[int]] = [None]
    thread = threading.Thread(target=lambda: answer.__setitem__(0, _drain(home, node, grace_s)),
                              name="harness-drain", daemon=True)
    thread.start()
    thread.join(grace_s + DRAIN_SLACK_S)
    if thread.is_alive():
        log.warning("farm host %s did not drain within %.0f s; ending its processes",
                    node.name, grace_s + DRAIN_SLACK_S)
    return answer[0]


def _drain(home: Path, node: ServedNode, grace_s: float) -> Optional[int]:
    """Ask the host's actor to finish what runs and stop its agents; None if it cannot be
    asked (the node is already half gone: its processes are ended all the same)."""
    ray = import_ray()
    try:
        # quietly: joined from a thread, Ray warns that it cannot set its SIGTERM handler
        connect(ray, node.address, home, logging_level=logging.ERROR)
        actor = ray.get_actor(HOST_ACTOR_PREFIX + node.name, namespace=NAMESPACE)
        left = ray.get(control(actor.drain).remote(grace_s), timeout=grace_s + 15.0)
        ray.kill(actor)
        return int(left)
    except Exception as exc:  # the farm or the actor is gone: nothing left to drain
        log.warning("could not drain farm host %s (%s); ending its processes", node.name, exc)
        return None
    finally:
        if ray.is_initialized():
            ray.shutdown()


def status(home: Path, address: Optional[str] = None) -> FarmStatus:
    """What every host of the farm at `address` (default: the one this home serves) does."""
    ray = import_ray()
    if address is None:
        node = read_record(home)
        if node is None:
            raise HarnessError("which farm? this home serves none",
                               fix="pass --address HEAD:PORT")
        address = node.address
    checked_token(Path(home))
    connect(ray, address, home)
    try:
        handles = host_actors(ray)
        asked = {name: control(handle.status).remote() for name, handle in handles.items()}
        hosts, silent = [], []
        for name, ref in sorted(asked.items()):
            try:
                hosts.append(ray.get(ref, timeout=20.0))
            except Exception:
                silent.append(name[len(HOST_ACTOR_PREFIX):])
        live = [n for n in ray.nodes() if n.get("Alive")]
    finally:
        ray.shutdown()
    addresses = tuple(sorted({str(n.get("NodeManagerAddress")) for n in live
                              if n.get("NodeManagerAddress")}))
    return FarmStatus(address, len(live), tuple(hosts), tuple(silent), addresses)


# Ray's workers listen on ports of this range (ray start's --min/--max-worker-port defaults).
RAY_WORKER_PORTS = "10002-19999"
LOOPBACK = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class Exposure:
    """Where this host's farm node listens, and what of it lies beyond the address asked."""

    asked: str                                  # the node's --node-ip
    listening: Tuple[Tuple[str, int, str], ...]  # (address, port, process name)
    beyond: Tuple[Tuple[str, int, str], ...]     # those on another address (or all: * / ::)

    def lines(self, hosts: Sequence[str]) -> List[str]:
        """For people: the sockets, a warning for those beyond the address asked, and an
        nftables rule that lets only the farm's `hosts` reach the node's ports."""
        shown = ", ".join(f"{_shown_address(a)}:{p} ({n})" for a, p, n in self.listening)
        out = [f"farm node listens on: {shown or 'nothing found'}"]
        if self.beyond:
            out.append(f"WARNING: {len(self.beyond)} of them listen beyond {self.asked}: "
                       + ", ".join(f"{_shown_address(a)}:{p}" for a, p, _ in self.beyond)
                       + "; only the token keeps strangers out until a firewall does")
        ports = sorted({p for _, p, _ in self.listening})
        allowed = sorted(set(hosts) | {"127.0.0.1"})
        out.append("limit them to the farm's hosts (nftables; add every host's address):\n"
                   "  nft add table inet harness_farm\n"
                   "  nft 'add chain inet harness_farm input { type filter hook input "
                   "priority 0 ; policy accept ; }'\n"
                   f"  nft add rule inet harness_farm input ip saddr != "
                   f"{{ {', '.join(allowed)} }} tcp dport "
                   f"{{ {', '.join([str(p) for p in ports] + [RAY_WORKER_PORTS])} }} drop")
        return out


def _shown_address(address: str) -> str:
    return "*" if address in ("0.0.0.0", "::", "") else address


def exposure(processes: Sequence[Any], asked: str) -> Exposure:
    """The listening TCP sockets of `processes` (psutil), and those beyond `asked` and
    loopback: Ray 2.60 binds its GCS and raylets to every interface whatever --node-ip says."""
    import psutil

    found = set()
    for process in processes:
        try:
            name = process.name()
            for conn in process.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    found.add((conn.laddr.ip, conn.laddr.port, name))
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    listening = tuple(sorted(found))
    return Exposure(asked, listening, tuple(s for s in listening
                                            if s[0] != asked and s[0] not in LOOPBACK))


def node_exposure(home: Path) -> Optional[Exposure]:
    """Where the node this home serves listens (None when it serves none)."""
    node = read_record(home)
    if node is None:
        return None
    return exposure(_node_processes(node.name),
                    node.node_ip or node.address.rpartition(":")[0])


def head_message(node: ServedNode) -> str:
    """What a person needs after starting a head: how hosts join, and what to firewall."""
    port = node.address.rpartition(":")[2]
    return (f"farm head at {node.address}, token authentication on. A host joins with its own "
            f"copy of {node.token} (mode 0600, copied over a secure channel):\n"
            f"  scp {node.token} HOST:.harness/{TOKEN_FILE}\n"
            f"  harness farm serve --address {node.address} --node-ip HOST_IP\n"
            f"Firewall Ray's ports ({port} and the workers') to the farm's hosts. "
            f"'harness farm stop' ends this node (and so the farm).")
