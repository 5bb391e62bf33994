"""A device's stored nn-Meter calibration: what `harness calibrate` fitted, as data.

Kept apart from the procedure that measures and fits it (harness.campaigns.calibrate), so that what
only reads a calibration (the prediction fallback of a profiler) does not import the
profiler that calibrating uses.
"""
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from harness.store.measurement import STATISTICS
from harness.paths import harness_home
from harness.predict.nn_meter import PredictorError

CALIBRATION_FILE = "calibration.json"
FORMAT_VERSION = 1


def calibrations_folder(home: Union[str, Path, None] = None) -> Path:
    return harness_home(home) / "calibrations"


@dataclass
class Calibration:
    """A per-device correction of an nn-Meter predictor: predicted -> exp(a) * predicted^b,
    with what it was fitted on (device identity, settings, space) and its held-out report."""

    device: str
    base_predictor: str          # folder of the corrected predictor
    base_predictor_digest: str
    intercept: float             # a
    slope: float                 # b
    kind: str                    # "scale" (b = 1) or "log-linear"
    device_fingerprint: str      # digest of the device identity when calibrated
    agent_version: str
    settings_key: str
    space: str
    space_fingerprint: str       # the space and input it was fitted on
    input_signature: List[Dict[str, Any]]
    n_train: int
    n_holdout: int
    # which statistic of the device's runs the correction predicts (harness.store.measurement
    # STATISTICS): the median, or the minimum on a device shared with other work
    statistic: str = "median"
    report: Dict[str, Dict[str, float]] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    format_version: int = FORMAT_VERSION

    @property
    def predictor_folder(self) -> Path:
        return Path(self.base_predictor)

    def correct(self, predicted_ms: float) -> float:
        """The corrected prediction (ms) for a raw nn-Meter prediction."""
        if not predicted_ms > 0:
            raise PredictorError(f"nn-Meter predicted {predicted_ms} ms; a log-linear "
                                 "correction needs a positive prediction",
                                 fix="the model's kernels are unknown to the predictor; "
                                     "calibrate with a space that contains them")
        return math.exp(self.intercept + self.slope * math.log(predicted_ms))

    def describe(self) -> Dict[str, Any]:
        held_out = self.report.get("calibrated", {})
        return {"device": self.device, "kind": self.kind, "intercept": self.intercept,
                "slope": self.slope, "created_at": self.created_at, "n_train": self.n_train,
                "statistic": self.statistic, "rmspe": held_out.get("rmspe")}

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CALIBRATION_FILE
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        os.replace(temporary, path)
        return path


def load_calibration(device: str, home: Union[str, Path, None] = None) -> Optional[Calibration]:
    """The stored calibration of `device`, or None if it was never calibrated."""
    path = calibrations_folder(home) / device / CALIBRATION_FILE
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        calibration = Calibration(**data)
        if calibration.format_version != FORMAT_VERSION:
            raise ValueError(f"format version {calibration.format_version}")
        float(calibration.intercept), float(calibration.slope)
        if calibration.statistic not in STATISTICS:
            raise ValueError(f"statistic {calibration.statistic!r}")
    except (ValueError, TypeError) as exc:
        raise PredictorError(f"calibration file {path} is unreadable ({exc})",
                             fix=f"run 'harness calibrate --device {device} ...' again "
                                 f"(it replaces the file)") from None
    return calibration
