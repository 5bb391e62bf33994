"""The cache key, defined in one place: what makes two measurements interchangeable.

A measurement is keyed by (graph hash, input signature, settings key, device fingerprint,
agent version). This module says how each part is computed: `canonical_json` and `digest`
for the values, `settings_key` for the runtime settings (only those that change what is
measured), `model_of` for a device identity without its unit. harness.steps.key_scope builds
the keys of one profiler from these; nothing else assembles a MeasurementKey.
"""
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Dict, Mapping

from agents.ort_agent import DEFAULT_SETTINGS, RUNTIMES  # noqa: F401 (the CLI's choices)

# Settings that change what is measured (part of the cache key). The timing-loop settings
# (warm-up, run counts and times, input seed) change only how precisely, and are recorded in
# each Measurement instead.
RUNTIME_SETTINGS = ("intra_op_threads", "inter_op_threads", "graph_optimization_level",
                    "execution_mode", "provider", "input_shapes", "cpu_affinity")
# Keyed too, but only when they differ from the agent's default, so that the keys of
# results stored before they existed stay valid: the provider's options, and the precision
# the host converted the model to (with where int8-static's calibration inputs came from).
KEYED_WHEN_SET = ("provider_options", "precision", "calibration", "backend", "require_backend")

def settings_key(settings: Mapping[str, Any]) -> str:
    """The digest of the settings that change what is measured (the cache key's part): the
    runtime (its version is in the device's identity), its backend and options."""
    return digest({"runtime": settings.get("runtime") or "onnxruntime",
                   **{k: settings[k] for k in RUNTIME_SETTINGS},
                   **{k: settings[k] for k in KEYED_WHEN_SET  # {} is no option
                      if settings.get(k) and settings[k] != DEFAULT_SETTINGS[k]}})


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def digest(value: Any) -> str:
    """sha256 of the canonical JSON of `value`."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def device_fingerprint(identity: Mapping[str, Any]) -> str:
    """The cache key's device part: the digest of a device's identity (hardware, OS, runtime
    versions, and the unit where it has one)."""
    return digest(dict(identity))


def model_of(identity: Mapping[str, Any]) -> Dict[str, Any]:
    """A device identity without its unit (a board's host key, a phone's serial): the same
    for every unit of one model."""
    return {key: value for key, value in identity.items() if key != "unit"}


@dataclass(frozen=True)
class MeasurementKey:
    """What makes two measurements interchangeable."""

    graph_hash: str
    input_sig: str       # canonical JSON of the input shapes and dtypes
    settings_key: str    # digest of the runtime and its settings
    device_fp: str       # digest of the device identity (hardware, OS, runtime versions)
    agent_version: str

    def values(self) -> tuple:
        return (self.graph_hash, self.input_sig, self.settings_key, self.device_fp,
                self.agent_version)

    def to_dict(self) -> Dict[str, str]:
        return dict(zip(("graph_hash", "input_sig", "settings_key", "device_fp",
                         "agent_version"), self.values()))
