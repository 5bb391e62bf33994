"""A device's stored nn-Meter calibration: what `harness calibrate` fitted, as data.

Kept apart from the procedure that measures and fits it (harness.campaigns.calibrate), so that what
only reads a calibration (the prediction fallback of a profiler) does not import the
profiler that calibrating uses.
"""
import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from devices.safe_files import read_regular, replace_text
from harness.store.import_checks import MAX_CLOCK_SKEW_S
from harness.store.measurement import STATISTICS
from harness.paths import harness_home
from harness.predict.nn_meter import PredictorError

CALIBRATION_FILE = "calibration.json"
FORMAT_VERSION = 1


def calibrations_folder(home: Union[str, Path, None] = None) -> Path:
    return harness_home(home) / "calibrations"


KINDS = ("scale", "log-linear", "overheads")


@dataclass(frozen=True)
class Correction:
    """How a device's latency follows from a predictor's: "scale" (exp(a) x predicted),
    "log-linear" (exp(a) x predicted^b) or "overheads" (exp(a) x predicted + per_kernel_ms x
    the model's kernels + fixed_ms: the predictor's device and this one pay different costs
    per operator call and per run, which a scale of the whole prediction gets wrong; either
    term may be negative, where the scale carries too much of the predictor's own)."""

    kind: str
    intercept: float             # a
    slope: float = 1.0           # b (1 but for "log-linear")
    per_kernel_ms: float = 0.0   # "overheads" only
    fixed_ms: float = 0.0        # "overheads" only

    def formula(self) -> str:
        """The correction as a person reads it: measured = ..."""
        if self.kind == "overheads":
            return (f"{math.exp(self.intercept):.4g} * predicted {self.per_kernel_ms:+.4g} ms "
                    f"per kernel {self.fixed_ms:+.4g} ms")
        return f"{math.exp(self.intercept):.4g} * predicted^{self.slope:.4f}"

    def apply(self, predicted_ms: float, kernels: int) -> float:
        """The corrected prediction (ms) for a raw prediction of a model of `kernels`
        kernels."""
        if not predicted_ms > 0:
            raise PredictorError(f"nn-Meter predicted {predicted_ms} ms; a correction needs "
                                 "a positive prediction",
                                 fix="the model's kernels are unknown to the predictor; "
                                     "calibrate with a space that contains them")
        if self.kind != "overheads":
            return math.exp(self.intercept + self.slope * math.log(predicted_ms))
        value = math.exp(self.intercept) * predicted_ms + self.per_kernel_ms * kernels \
            + self.fixed_ms
        if not value > 0:
            raise PredictorError(f"the calibration's overheads correction gives {value:.4g} ms "
                                 f"for a model of {kernels} kernels predicted at "
                                 f"{predicted_ms:.4g} ms: it was fitted on other models",
                                 fix="calibrate the device again with subnets like this one")
        return value


@dataclass
class Calibration:
    """A per-device correction of an nn-Meter predictor (a Correction's fields, kept flat
    in the file), with what it was fitted on (device identity, settings, space) and its
    held-out report."""

    device: str
    base_predictor: str          # folder of the corrected predictor
    base_predictor_digest: str
    intercept: float             # a
    slope: float                 # b
    kind: str                    # one of KINDS
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
    per_kernel_ms: float = 0.0   # kind "overheads": the cost per kernel it adds
    fixed_ms: float = 0.0        # kind "overheads": and per run

    @property
    def predictor_folder(self) -> Path:
        return Path(self.base_predictor)

    @property
    def correction(self) -> Correction:
        return Correction(self.kind, self.intercept, self.slope, self.per_kernel_ms,
                          self.fixed_ms)

    def correct(self, predicted_ms: float, kernels: int) -> float:
        """The corrected prediction (ms) for a raw nn-Meter prediction of a model of
        `kernels` kernels (what an "overheads" correction counts)."""
        return self.correction.apply(predicted_ms, kernels)

    def describe(self) -> Dict[str, Any]:
        held_out = self.report.get("calibrated", {})
        return {"device": self.device, "kind": self.kind, "intercept": self.intercept,
                "slope": self.slope, "per_kernel_ms": self.per_kernel_ms,
                "fixed_ms": self.fixed_ms, "created_at": self.created_at,
                "n_train": self.n_train, "statistic": self.statistic,
                "rmspe": held_out.get("rmspe")}

    def save(self, folder: Path) -> Path:
        """Write the file whole or not at all (devices.safe_files)."""
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CALIBRATION_FILE
        data = asdict(self)
        if self.kind != "overheads":  # a file an older harness (no overheads) still reads
            del data["per_kernel_ms"], data["fixed_ms"]
        # a metric that is not a number (Kendall's tau of constant latencies is NaN) is null:
        # the file stays JSON, which NaN is not
        data["report"] = {part: {name: value if not isinstance(value, float)
                                 or math.isfinite(value) else None
                                 for name, value in metrics.items()}
                          for part, metrics in self.report.items()}
        replace_text(path, json.dumps(data, indent=1, sort_keys=True, allow_nan=False))
        return path


# The largest calibration file read (a real one is a few kB).
MAX_CALIBRATION_BYTES = 2**20
# A correction exp(a) * predicted^b within these bounds cannot overflow a float for any
# prediction up to the agent's cap of 1e8 ms (|a| + |b| * log(1e8) stays far below 709).
MAX_INTERCEPT = 50.0
MAX_SLOPE = 10.0
MAX_OVERHEAD_MS = 1e6  # an "overheads" correction's costs per kernel and per run


def _problem(data: Any) -> Optional[str]:
    """What is wrong with a calibration file's content, or None: every field of the type
    harness writes, numbers finite and within bounds (so a prediction can never overflow)."""
    if not isinstance(data, dict):
        return "it is not a JSON object"
    fields = Calibration.__dataclass_fields__
    unknown = sorted(set(data) - set(fields))
    if unknown:
        return f"unknown fields {unknown}"

    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) \
            and math.isfinite(value)

    def whole(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    checks = {
        "intercept": (lambda v: number(v) and abs(v) <= MAX_INTERCEPT,
                      f"a finite number from -{MAX_INTERCEPT:g} to {MAX_INTERCEPT:g}"),
        "slope": (lambda v: number(v) and abs(v) <= MAX_SLOPE,
                  f"a finite number from -{MAX_SLOPE:g} to {MAX_SLOPE:g}"),
        "kind": (lambda v: v in KINDS, f"one of {', '.join(KINDS)}"),
        **{name: (lambda v: number(v) and abs(v) <= MAX_OVERHEAD_MS,
                  f"a finite number of ms from -{MAX_OVERHEAD_MS:g} to {MAX_OVERHEAD_MS:g}")
           for name in ("per_kernel_ms", "fixed_ms")},
        "n_train": (whole, "a whole number"), "n_holdout": (whole, "a whole number"),
        "created_at": (lambda v: number(v) and 0 <= v <= time.time() + MAX_CLOCK_SKEW_S,
                       "a date in seconds since 1970, not in the future"),
        "format_version": (lambda v: v == FORMAT_VERSION, f"{FORMAT_VERSION}"),
        "statistic": (lambda v: v in STATISTICS, f"one of {', '.join(STATISTICS)}"),
        "input_signature": (lambda v: isinstance(v, list) and all(isinstance(i, dict)
                                                                   for i in v),
                            "a list of inputs"),
        "report": (lambda v: isinstance(v, dict) and all(
            isinstance(part, dict) and all(isinstance(k, str) and (number(x) or x is None)
                                           for k, x in part.items())
            for part in v.values()), "an object of objects of numbers"),
    }
    if data.get("kind") != "overheads" and (data.get("per_kernel_ms", 0) != 0
                                            or data.get("fixed_ms", 0) != 0):
        return f"a {data.get('kind')} correction has costs per kernel or per run"
    for name in fields:
        if name not in data:
            if fields[name].default is MISSING and fields[name].default_factory is MISSING:
                return f"it has no {name}"
            continue
        value = data[name]
        test, wanted = checks.get(name, (lambda v: isinstance(v, str), "a text"))
        if not test(value):
            return f"{name} is {json.dumps(value)[:80]}, not {wanted}"
    return None


def calibration_name(device: str, runtime: Optional[str] = None) -> str:
    """The folder of a device's calibration under calibrations/: the device's name for
    onnxruntime, `device@runtime` for another runtime (each runtime keeps its own)."""
    return device if runtime in (None, "onnxruntime") else f"{device}@{runtime}"


def load_calibration(device: str, home: Union[str, Path, None] = None,
                     runtime: Optional[str] = None) -> Optional[Calibration]:
    """The stored calibration of `device` (for `runtime`, default onnxruntime), or None if it
    was never calibrated. A file that is not what harness writes (damaged, edited, of
    another version) is a PredictorError naming the file, the field and the fix, never a
    wrong or crashing prediction later."""
    path = calibrations_folder(home) / calibration_name(device, runtime) / CALIBRATION_FILE
    if not path.exists():
        return None
    fix = f"run 'harness calibrate --device {device} ...' again (it replaces the file)"
    try:
        data = json.loads(read_regular(path, MAX_CALIBRATION_BYTES),
                          parse_constant=_no_constant)
    except OSError as exc:
        raise PredictorError(f"calibration file {path} is unreadable ({exc.strerror or exc})",
                             fix=fix) from None
    except ValueError as exc:
        raise PredictorError(f"calibration file {path} is unreadable (not JSON: {exc})",
                             fix=fix) from None
    problem = _problem(data)
    if problem is not None:
        raise PredictorError(f"calibration file {path} is unreadable ({problem})", fix=fix)
    return Calibration(**data)


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")
