"""What a LatencyProfiler answers when its device cannot be reached: the prediction fallback.

With fallback "error" a lost device raises. With "nn-meter" the answer is, in this order: a
measurement already in the cache under the device identity its calibration recorded (so an
offline profiler still serves what the device measured), else an nn-Meter prediction,
corrected by the device's calibration (`harness calibrate`) if there is one, else from the
predictor the user named. Predictions have source "predicted", name predictor and
calibration, and are never stored in the cache. After a loss the device is left alone for
`retry_s` seconds, so a search does not wait on a dead device for every sample.
"""
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

from devices.errors import DeviceLost
from harness.errors import InvalidArgument
from harness.export.graph import DummyInput
from harness.predict.calibration import Calibration, load_calibration
from harness.store.key import RUNTIMES
from harness.predict.nn_meter import NnMeterProfiler, PredictorError
from harness.spaces.space import ModelSpace, Sample
from harness.steps.counters import Counters
from harness.steps.export_step import SampleExport
from harness.steps.key_scope import KeyScope
from harness.store.cache import Cache
from harness.store.measurement import Measurement

log = logging.getLogger(__name__)

FALLBACKS = ("error", "nn-meter", "model")


@dataclass(frozen=True)
class Fallback:
    """What a profiler answers with when its device cannot be reached: `mode` "error"
    (raise), "nn-meter" (an nn-Meter prediction, calibrated for the device if it was, else
    from `predictor`) or "model" (the device's own latency model); `offline`: never try the
    device; after a loss the device is retried every `retry_s` seconds."""

    mode: str = "error"
    predictor: Union[str, Path, None] = None
    offline: bool = False
    retry_s: float = 60.0

    def __post_init__(self) -> None:
        if self.mode not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.mode!r}")
        if self.offline and self.mode == "error":
            raise InvalidArgument("an offline profiler can only predict",
                                  fix="pass fallback='nn-meter' (calibrate first) or "
                                      "fallback='model'")


class PredictionFallback:
    """The fallback of one profiler; `active()` says whether to predict without trying the
    device, `answer()` gives the fallback's answer for one sample. It is given what it uses:
    the space and inputs (nn-Meter predicts their graphs), the device's names, the home (its
    calibration), the cache and the key scope known before the device (a cached measurement
    under the identity the calibration recorded still answers), the export step, the
    counters, the device's latency model and the statistic the profiler answers with."""

    def __init__(self, config: Fallback, *, space: ModelSpace, dummy_input: DummyInput,
                 device: str, devices: List[str], home: Path, cache: Cache, scope: KeyScope,
                 export: SampleExport, counters: Counters, refresh: bool = False,
                 model: Optional[Callable[[Sample], Optional[Measurement]]] = None,
                 statistic: str = "median"):
        self.mode, self.offline = config.mode, config.offline
        self._space, self._dummy_input, self._device = space, dummy_input, device
        self._devices, self._home, self._cache, self._scope = devices, home, cache, scope
        self._export, self._counters = export, counters
        self._predictor_name, self._refresh, self._retry_s = \
            config.predictor, refresh, config.retry_s
        self._predictor: Optional[NnMeterProfiler] = None
        self._answers: Dict[tuple, Measurement] = {}
        self._unreachable_until = 0.0
        self._model = model
        self._statistic = statistic  # what the profiler answers with

    def active(self) -> bool:
        """Predict without trying the device: offline, or it was lost less than retry_s ago."""
        return self.offline or time.monotonic() < self._unreachable_until

    def answer(self, sample: Sample, cause: Optional[DeviceLost]) -> Measurement:
        """The answer for a validated sample whose device was lost (`cause`) or is not tried."""
        if self.mode == "model":
            return self._from_model(sample, cause)
        if cause is not None:
            if self.mode != "nn-meter":
                raise cause
            self._nn_meter(cause)  # a fallback that cannot predict fails before announcing
            if not self._unreachable_until:
                log.warning("%s is unreachable (%s); answering with nn-Meter predictions, "
                            "retrying the device every %.0f s", self._device, cause.message,
                            self._retry_s)
            self._unreachable_until = time.monotonic() + self._retry_s
        memo_key = tuple(sample.values())
        if memo_key in self._answers:
            return self._answers[memo_key]
        predictor = self._nn_meter(cause)
        calibration = predictor.calibration
        graph = self._export.indexed(sample)
        exported = None
        if graph is None:
            exported = self._export(sample)
            graph = exported.graph_hash
        if calibration is not None and not self._refresh and \
                calibration.settings_key == self._scope.settings_key:
            cached = self._cache.get(self._scope.key(
                graph, unit=calibration.device_fingerprint,
                agent_version=calibration.agent_version))
            # a measurement answers when it has the profiler's statistic (quiet and ratio
            # are a window of rounds')
            if cached is not None and (cached.rounds is not None or
                                       self._statistic not in ("quiet", "ratio")):
                self._counters.add(cache_hits=1)
                return cached
        predicted = predictor.predict_exported(exported or self._export(sample))
        self._counters.add(predictions=1)
        self._answers[memo_key] = predicted
        return predicted

    def _from_model(self, sample: Sample, cause: Optional[DeviceLost]) -> Measurement:
        """The device's own latency model (harness.predict.latency_model), fitted on what the device
        measured before: microseconds a prediction, no nn-Meter needed."""
        predicted = self._model(sample) if self._model is not None else None
        if predicted is None:
            why = f"is unreachable ({cause.message})" if cause is not None else "is offline"
            raise PredictorError(f"{self._device} {why}, and its latency model cannot answer: "
                                 f"it needs measurements of this space on the device first",
                                 fix="measure at least 20 subnets of this space on the device "
                                     "while it is reachable (harness profile), or use "
                                     "fallback='nn-meter'") from cause
        if cause is not None and not self._unreachable_until:
            log.warning("%s is unreachable (%s); answering with its latency model, retrying "
                        "the device every %.0f s", self._device, cause.message, self._retry_s)
        if cause is not None:
            self._unreachable_until = time.monotonic() + self._retry_s
        self._counters.add(predictions=1)
        return predicted

    def _calibration(self) -> Optional[Calibration]:
        """The devices' stored calibration: one fitted under this profiler's settings key
        (its runtime's, calibrations/<device>@<runtime>) first, else the onnxruntime one."""
        found = [(runtime, calibration) for name in self._devices for runtime in RUNTIMES
                 for calibration in [load_calibration(name, self._home, runtime)] if calibration]
        return next((c for _, c in found if c.settings_key == self._scope.settings_key),
                    next((c for runtime, c in found if runtime == "onnxruntime"), None))

    def _nn_meter(self, cause: Optional[DeviceLost]) -> NnMeterProfiler:
        """The NnMeterProfiler of the fallback: calibrated for the device if it was."""
        if self._predictor is None:
            calibration = self._calibration()
            if calibration is not None and \
                    calibration.space_fingerprint != self._scope.space_fingerprint:
                log.warning("the nn-Meter calibration of %s was fitted on another space or "
                            "input (%s); its correction may not carry over", calibration.device,
                            calibration.space or "unnamed")
            if calibration is not None and calibration.statistic != self._statistic:
                log.warning("the nn-Meter calibration of %s predicts each subnet's %s run, "
                            "the profiler answers with the %s: its predictions stand for "
                            "another statistic (calibrate again with --statistic %s)",
                            calibration.device, calibration.statistic, self._statistic,
                            self._statistic)
            if calibration is None and self._predictor_name is None:
                why = f"is unreachable ({cause.message})" if cause is not None else "is offline"
                raise PredictorError(
                    f"{self._device} {why}, and there is no nn-Meter calibration for it or "
                    "predictor to fall back on",
                    fix=f"run 'harness calibrate --device {(self._devices or [self._device])[0]} "
                        "--space ...' "
                        "while it is reachable, or pass predictor=NAME_OR_FOLDER") from cause
            self._predictor = NnMeterProfiler(
                self._space, self._dummy_input,
                predictor=None if calibration is not None else self._predictor_name,
                calibration=calibration, device=self._device)
        return self._predictor

