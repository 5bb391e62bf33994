"""harness: device-in-the-loop latency profiling for hardware-aware NAS.

    from harness import LatencyProfiler
    profiler = LatencyProfiler(space, torch.randn(1, 3, 224, 224), device="local")
    profiler.profile(sample)        # median latency in ms
    profiler.measure(sample)        # Measurement: raw samples, statistics, provenance, source
"""
import logging

from devices.errors import (AgentProtocolError, BadRequest, DeviceError, DeviceLost,
                            InferenceError, LoadError, MeasurementTimeout, ThermalError,
                            TransferError)
from harness.cache import Cache
from harness.counting import FlopsProfiler, NumParamsProfiler
from harness.errors import CacheError, ExportError, HarnessError, InvalidSample
from harness.measurement import Measurement
from harness.predict import NnMeterProfiler, PredictorError
from harness.profiler import LatencyProfiler
from harness.profiler_base import Profiler
from harness.space import ModelSpace, enumerate_samples, random_samples, validate_sample

logging.getLogger("harness").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = ["LatencyProfiler", "Profiler", "FlopsProfiler", "NumParamsProfiler",
           "NnMeterProfiler", "PredictorError", "Measurement", "Cache", "ModelSpace",
           "random_samples", "enumerate_samples", "validate_sample", "HarnessError",
           "InvalidSample", "ExportError", "CacheError", "DeviceError",
           "TransferError", "LoadError", "InferenceError", "MeasurementTimeout", "DeviceLost",
           "ThermalError", "BadRequest", "AgentProtocolError"]
