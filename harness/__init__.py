"""harness: device-in-the-loop latency profiling for hardware-aware NAS.

    from harness import LatencyProfiler
    profiler = LatencyProfiler(space, torch.randn(1, 3, 224, 224), device="local")
    profiler.profile(sample)        # latency in ms (quiet-state, from interleaved rounds)
    profiler.measure(sample)        # Measurement: raw samples, statistics, provenance, source

The names below are imported when first used (PEP 562), so that `import harness.cli` and
`harness --help` do not pay for torch, onnx and nn-Meter before a command needs them.
"""
import importlib
import logging
from typing import Any, Dict, List

logging.getLogger("harness").addHandler(logging.NullHandler())

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS: Dict[str, str] = {
    "LatencyProfiler": "harness.profiler",
    "MemoryProfiler": "harness.campaigns.memory",
    "Profiler": "harness.metrics.profiler_base",
    "FlopsProfiler": "harness.metrics.counting",
    "NumParamsProfiler": "harness.metrics.counting",
    "NnMeterProfiler": "harness.predict.nn_meter",
    "PredictorError": "harness.predict.nn_meter",
    "Measurement": "harness.store.measurement",
    "Cache": "harness.store.cache",
    "ModelSpace": "harness.spaces.space",
    "random_samples": "harness.spaces.space",
    "enumerate_samples": "harness.spaces.space",
    "validate_sample": "harness.spaces.space",
    "HarnessError": "harness.errors",
    "InvalidSample": "harness.errors",
    "InvalidArgument": "harness.errors",
    "ExportError": "harness.errors",
    "CacheError": "harness.errors",
    **{name: "devices.errors" for name in (
        "DeviceError", "TransferError", "LoadError", "InferenceError", "MeasurementTimeout",
        "DeviceLost", "ThermalError", "BadRequest", "AgentProtocolError")},
}

__all__: List[str] = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> List[str]:
    return sorted(list(globals()) + __all__)
