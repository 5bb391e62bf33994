"""Multi-host device farms on Ray (optional extra: pip install 'harness[ray]').

Each host with devices runs `harness farm serve`, which starts a Ray node that advertises
the host's registered devices as custom resources, one unit per device: `harness-kind:K`
for every device of kind K. The searching side makes
`LatencyProfiler(space, dummy, device="kind:K", farm="HEAD:PORT")`: each measurement is a Ray
task asking for one unit of `harness-kind:K`, so Ray runs it on a host with a free device of
that kind; there the task leases a free local device (the same leases and device locks as
on a single host), measures through that host's transports, and returns the raw result,
which the caller stores in its own cache. The timeout counts from the lease on the host.
"""
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Optional

from agents.ort_agent import AGENT_VERSION
from devices.errors import DeviceError, DeviceLost, error_from_agent
from harness.errors import HarnessError
from harness.paths import harness_home

log = logging.getLogger("harness")

RESOURCE_PREFIX = "harness-kind:"


def _ray():
    try:
        import ray
    except ImportError:
        raise HarnessError("Ray is not installed", fix="pip install 'harness[ray]'") from None
    return ray


def host_resources(home: Path) -> Dict[str, float]:
    """The Ray resources this host offers: one unit per registered device, by kind."""
    from devices.registry import load_devices

    resources: Dict[str, float] = {}
    for config in load_devices(home).values():
        if config.kind:
            key = RESOURCE_PREFIX + config.kind
            resources[key] = resources.get(key, 0) + 1
    return resources


def serve_command(home: Path, address: Optional[str], port: int, node_ip: str) -> List[str]:
    """The `ray start` command line that joins (or, without address, heads) a farm."""
    ray_cli = str(Path(sys.executable).with_name("ray"))
    command = [ray_cli, "start", f"--resources={json.dumps(host_resources(home))}",
               f"--node-ip-address={node_ip}", "--disable-usage-stats", "--num-cpus=1",
               "--object-store-memory=200000000"]
    if address:
        command.append(f"--address={address}")
    else:
        command += ["--head", f"--port={port}", "--include-dashboard=false"]
    return command


def serve(home: Path, address: Optional[str], port: int = 26380,
          node_ip: str = "127.0.0.1") -> int:
    """Start this host's Ray node with its devices as resources (`harness farm serve`)."""
    resources = host_resources(home)
    if address and not resources:
        raise HarnessError(f"no device with a kind is registered in {home}",
                           fix="register devices with --kind before serving them")
    env = dict(os.environ, HARNESS_HOME=str(home), RAY_USAGE_STATS_ENABLED="0")
    return subprocess.run(serve_command(home, address, port, node_ip), env=env).returncode


# ---------------------------------------------------------------- what runs on the hosts

_CLIENTS: Dict[str, Any] = {}  # device name -> client, kept across tasks in a Ray worker


def _on_host(kind: str, timeout_s: float, isolation: str, work) -> Dict[str, Any]:
    """Lease a free local device of `kind` and run `work(name, client, deadline)`; failures
    come back as {"error": ...} so the caller can raise the right typed error."""
    from devices.registry import devices_of_kind, open_client
    from harness.farm import lease_any

    home = harness_home()
    name = None
    try:
        lease = lease_any(home, devices_of_kind(home, kind))
        name = lease.device
        try:
            if name not in _CLIENTS:
                _CLIENTS[name] = open_client(name, home, isolation)
            result = work(name, _CLIENTS[name], lease.acquired_at + timeout_s)
        finally:
            lease.__exit__(None, None, None)
        return dict(result, device=name, host=platform.node())
    except DeviceError as exc:
        client = _CLIENTS.pop(name, None)  # start afresh with that device next time
        if client is not None:
            client.close()
        return {"error": {"kind": exc.kind, "message": exc.message, "fix": exc.fix}}
    except HarnessError as exc:
        return {"error": {"kind": "USER", "message": exc.message, "fix": exc.fix}}


def _fingerprint_task(kind: str, timeout_s: float, isolation: str) -> Dict[str, Any]:
    return _on_host(kind, timeout_s, isolation,
                    lambda name, client, deadline: client.fingerprint(deadline))


def _measure_task(kind: str, onnx_bytes: bytes, sha256: str, settings: Dict[str, Any],
                  timeout_s: float, isolation: str) -> Dict[str, Any]:
    def work(name, client, deadline):
        with tempfile.TemporaryDirectory(prefix="harness-farm-") as folder:
            path = Path(folder) / f"{sha256}.onnx"
            path.write_bytes(onnx_bytes)
            return client.measure(str(path), settings, deadline=deadline, sha256=sha256)
    return _on_host(kind, timeout_s, isolation, work)


# ---------------------------------------------------------------- the caller's side

class RayFarmClient:
    """Measures on whichever farm host has a free device of `kind`; the interface of
    AgentClient, so LatencyProfiler uses it as it uses a local client."""

    def __init__(self, address: str, kind: str, timeout_s: float, isolation: str = "worker"):
        ray = _ray()
        self.kind = kind
        self.resource = RESOURCE_PREFIX + kind
        self.timeout_s = timeout_s
        self.isolation = isolation
        self.agent_version = AGENT_VERSION
        self.device = f"kind:{kind}@{address}"
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        self._ray = ray
        self._fingerprint = ray.remote(num_cpus=0, max_retries=0)(_fingerprint_task)
        self._measure = ray.remote(num_cpus=0, max_retries=0)(_measure_task)

    def slots(self) -> int:
        """How many devices of the kind the farm offers."""
        count = int(self._ray.cluster_resources().get(self.resource, 0))
        if count == 0:
            raise DeviceLost(f"no host of the farm offers a device of kind {self.kind!r}",
                             fix="run 'harness farm serve --address HEAD' on hosts with such "
                                 "devices registered (with --kind)")
        return count

    def _run(self, remote, *args) -> Dict[str, Any]:
        answer = self._ray.get(remote.options(resources={self.resource: 1}).remote(*args))
        if "error" in answer:
            error = error_from_agent(answer["error"], device=self.device)
            error.fix = answer["error"].get("fix") or error.fix
            raise error
        return answer

    def fingerprint(self, deadline: float) -> Dict[str, Any]:
        return self._run(self._fingerprint, self.kind, self.timeout_s, self.isolation)

    def measure(self, model_path: str, settings: Dict[str, Any], deadline: float,
                sha256: Optional[str] = None) -> Dict[str, Any]:
        from devices.agent_client import file_sha256
        return self._run(self._measure, self.kind, Path(model_path).read_bytes(),
                         sha256 or file_sha256(model_path), settings, self.timeout_s,
                         self.isolation)

    def close(self) -> None:
        """Leave the cluster running; just stop talking to it."""
