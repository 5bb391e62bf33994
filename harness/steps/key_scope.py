"""`KeyScope`: the only way a MeasurementKey is built (harness.store.key says what each part
is; this says which values a profiler puts in it).

A scope starts with what the profiler knows before it reaches a device (the space
fingerprint, the input signature, the settings key) and gets the device's part once the
device is identified (`on_device`): its fingerprint, its agent version and the units a
lookup answers from (the device's own fingerprint and its model's, the key before
identities had a unit; in a pool of a kind, every unit of its model the cache knows, since
any free unit may measure a job). A result is stored under the device that measured it
(`key_of`), which in a pool may be another unit than the one identified.
"""
import threading
from typing import List, Optional

from devices.agent_result import AgentResult
from harness.store.key import MeasurementKey, device_fingerprint, digest, model_of


class KeyScope:
    """The cache keys of one profiler's space, inputs and settings (on one device, once
    `on_device` has given it one)."""

    def __init__(self, space_fingerprint: str, input_sig: str, settings_key: str):
        self.space_fingerprint = space_fingerprint
        self.input_sig = input_sig        # canonical JSON of the input signature
        self.settings_key = settings_key
        self.device_fp = ""
        self.agent_version = ""
        self._model: Optional[dict] = None
        self._units: List[str] = []
        self._pooled = False
        self._lock = threading.Lock()

    def on_device(self, device_fp: str, agent_version: str, model: dict,
                  pool_units: Optional[List[str]] = None) -> "KeyScope":
        """The same scope on an identified device; `pool_units`: a pool of a kind's units
        the cache knows (else the device and its model's key)."""
        scoped = KeyScope(self.space_fingerprint, self.input_sig, self.settings_key)
        scoped.device_fp, scoped.agent_version, scoped._model = device_fp, agent_version, model
        scoped._pooled = pool_units is not None
        scoped._units = list(pool_units) if pool_units is not None else \
            list(dict.fromkeys([device_fp, digest(model)]))
        return scoped

    @property
    def units(self) -> List[str]:
        """The device fingerprints a lookup answers from, the session's own first."""
        with self._lock:
            return list(self._units)

    def key(self, graph: str, *, input_sig: Optional[str] = None,
            settings_key: Optional[str] = None, unit: Optional[str] = None,
            agent_version: Optional[str] = None) -> MeasurementKey:
        """The key of `graph` in this scope (on `unit` rather than the session's device)."""
        return MeasurementKey(graph, input_sig or self.input_sig,
                              settings_key or self.settings_key, unit or self.device_fp,
                              agent_version or self.agent_version)

    def lookup_keys(self, graph: str, *, input_sig: Optional[str] = None,
                    settings_key: Optional[str] = None) -> List[MeasurementKey]:
        """The keys a lookup of `graph` tries, one per unit, the session's own first."""
        return [self.key(graph, input_sig=input_sig, settings_key=settings_key, unit=unit)
                for unit in self.units]

    def key_of(self, result: AgentResult, graph: str, *, input_sig: Optional[str] = None,
               settings_key: Optional[str] = None) -> MeasurementKey:
        """The key a device's result is stored under: the device that measured it. In a pool
        of a kind, a new unit of the same model is learned as one a lookup answers from."""
        device_fp = device_fingerprint(result.facts.identity)
        if self._pooled and model_of(result.facts.identity) == self._model:
            with self._lock:
                if device_fp not in self._units:
                    self._units.append(device_fp)
        return self.key(graph, input_sig=input_sig, settings_key=settings_key, unit=device_fp,
                        agent_version=result.agent_version)
