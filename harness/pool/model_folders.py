"""The devices' model folders, kept bounded.

Every model a device measures is copied to its working folder under its content hash
(`models/SHA.onnx`) and reused from there, so a sweep leaves one file per architecture and
variant: hundreds of MB an hour. The agent keeps the folder within the device's limit
(`models_limit_mb` in devices.toml, $HARNESS_MODELS_LIMIT_MB, or the transport's default:
devices.registry.MODELS_LIMIT_MB) before each measurement, least recently used models out.
This module reports a folder's size and prunes it on demand (`harness cache prune`). The
local device's folder is read here directly; a remote device's is the size its agent reported
with its newest measurement or prune (devices.folder_usage), shown with its age.

A model removed while another process was about to measure it is sent again (the agent
answers TRANSFER and the client puts it once more), so pruning loses no result.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from agents.ort_agent import model_folder
from harness.errors import InvalidArgument

log = logging.getLogger(__name__)

PRUNE_TIMEOUT_S = 120.0


def local_models_path(home: Path) -> Path:
    """The local device's model folder (its working folder is $HARNESS_HOME/devices/local)."""
    return Path(home) / "devices" / "local" / "models"


def local_usage(home: Path) -> Dict[str, int]:
    """The local device's model folder, read on this machine without starting an agent:
    {"bytes", "models", "limit_bytes"}."""
    from devices.registry import models_limit_bytes

    usage = model_folder(str(local_models_path(home)))
    return {"bytes": usage["bytes"], "models": usage["models"],
            "limit_bytes": models_limit_bytes("local", home)}


@dataclass(frozen=True)
class FolderState:
    """A device's model folder for people: its size (None: not heard of yet) and its limit.

    at: when the device reported it (None: read just now, on this machine)."""

    device: str
    limit_bytes: int
    bytes: Optional[int] = None
    models: Optional[int] = None
    at: Optional[float] = None


def folder_states(home: Path) -> List[FolderState]:
    """Every device's model folder: `local` read now, each registered device running our
    agent as it last reported (simulated devices and onnxruntime_perf_test devices keep no
    folder of ours and are left out)."""
    from devices.folder_usage import remembered, usage_path
    from devices.registry import load_devices, models_limit_bytes

    local = local_usage(home)
    states = [FolderState("local", local["limit_bytes"], local["bytes"], local["models"])]
    for config in load_devices(home).values():
        if config.transport == "sim" or config.agent == "perf-test":
            continue
        heard = remembered(usage_path(home, config.name))
        limit = models_limit_bytes(config.name, home)
        states.append(FolderState(config.name, limit) if heard is None else
                      FolderState(config.name, limit, heard.bytes, heard.models, heard.at))
    return states


def prune(name: str, home: Path, limit_bytes: Optional[int] = None) -> Dict[str, int]:
    """Bring device `name`'s model folder within `limit_bytes` (None: the device's own
    limit), least recently used models out, through its agent. Returns {"bytes", "models",
    "removed", "removed_bytes", "limit_bytes"}. InvalidArgument for a device without our agent
    (simulated, or measuring with onnxruntime_perf_test)."""
    from devices.agent_client import AgentClient
    from devices.registry import models_limit_bytes, open_client

    limit = models_limit_bytes(name, home) if limit_bytes is None else limit_bytes
    client = open_client(name, home, isolation="process")
    try:
        if not isinstance(client, AgentClient):
            raise InvalidArgument(f"{name} runs no harness agent, so harness keeps no model folder "
                             f"there to prune", fix="prune another device, or remove its files "
                                                     "with 'harness devices clean NAME'")
        result = client.model_folder(time.monotonic() + PRUNE_TIMEOUT_S, limit)
    finally:
        client.close()
    log.info("%s: model folder pruned to %d bytes (%d removed)", name, result["bytes"],
             result["removed"])
    return dict(result, limit_bytes=limit)
