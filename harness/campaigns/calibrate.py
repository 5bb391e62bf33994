"""Calibrate nn-Meter to a device from real measurements (`harness calibrate`).

One calibration, step by step:
1. draw `samples` training subnets and `holdout` held-out subnets of a space (distinct
   architectures, none shared between the two sets) and measure them all on the device;
2. with enough training subnets, build device-specific kernel predictors in nn-Meter's own
   format: detect the kernels of the training subnets with nn-Meter's kernel detector, build
   each distinct kernel configuration as a one-kernel model, measure it on the device through
   the same transports and cache, and train one regressor per kernel type with nn-Meter's
   builder (`build_predictor_by_data`); a kernel nn-Meter has no features for gets generic
   ones and is measured cut out of its subnet (harness.predict.kernels), and every kernel is known
   to be measurable before the device spends any time;
3. fit a correction of the base predictor (those kernel predictors, else the official
   predictor given) on the training subnets: log(measured) = a + b log(predicted), a pure
   scale factor (b = 1, robust to outliers), or a scale plus costs per kernel and per run
   ("overheads"), whichever scores best in leave-one-out validation (overheads that would
   put a held-out subnet at 0 ms or less give way to the best of the other two);
4. report the accuracy on the held-out subnets before and after (harness.predict.accuracy), and store
   everything under $HARNESS_HOME/calibrations/<device>/, where the fallback of a
   LatencyProfiler for that device finds it. A calibration whose held-out RMSPE is worse than
   the predictor it corrects (too few training subnets, a noisy device) is stored apart, in
   <device>/not-activated/, and never becomes the fallback: the previous calibration, if
   any, stays in use, and a warning names both figures and the fix.

Measurements already in the cache are reused (the result says how many and how old);
`fresh=True` measures every subnet and kernel anew. Without a terminal for the progress
bars, `on_progress` gets a line per step and per tenth of each measuring step.
"""
import functools
import json
import logging
import math
import os
import pickle
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from tqdm import tqdm

from devices.safe_files import replace_text
from harness.predict.accuracy import accuracy_metrics, save_scatter
from harness.predict.calibration import (MAX_INTERCEPT, MAX_OVERHEAD_MS, Calibration,
                                        Correction, calibration_name, calibrations_folder)
from harness.export.graph import DummyInput, export_sample
from harness.predict.kernels import (GENERIC_FEATURES, GENERIC_PREFIX, Kernel, KernelError,
                             build_generic_predictor, detect_kernels)
from harness.store.measurement import STATISTICS, Measurement
from harness.predict.nn_meter import (FUSION_RULES, KernelPredictors, PredictorError, import_nn_meter,
                             load_predictor, onnx_for_nn_meter)
from harness.profiler import LatencyProfiler
from harness.spaces.space import ModelSpace, random_samples, sample_key
from harness.spaces.mixed import SqueezeExcite

log = logging.getLogger(__name__)

KERNELS_FOLDER = "kernels"
NOT_ACTIVATED = "not-activated"  # where a calibration worse than its raw predictor is kept
CANDIDATE = ".candidate"          # kernel predictors being judged, before they are placed

# Fewer training subnets than this give too few kernel configurations to train nn-Meter's
# regressors on; calibration then corrects the given official predictor only.
MIN_SUBNETS_FOR_KERNELS = 8

# What onnxruntime's CPU provider fuses (graph optimisation "all"): a convolution with the
# batch norm and activation after it. nn-Meter's detector groups kernels by these rules.
ORT_CPU_FUSION_RULES = {
    "BF_conv_bn": {"obey": True}, "BF_conv_relu": {"obey": True},
    "BF_dwconv_bn": {"obey": True}, "BF_dwconv_relu": {"obey": True},
    "BF_bn_relu": {"obey": True},
}

# nn-Meter's builder takes regressor hyper-parameters per kernel type from a table keyed by
# backend; its default (for types missing there) uses max_features="auto", which current
# scikit-learn rejects. The tflite_cpu rows cover every kernel type built here.
BUILDER_BACKEND = "tflite_cpu"


def fit_log_linear(predicted: "Sequence[float] | np.ndarray", measured: "Sequence[float] | np.ndarray",
                   free_slope: bool = True) -> Tuple[float, float]:
    """Fit log(measured) = a + b log(predicted): (a, b). With a free slope, least squares;
    else b = 1 and a is the median log ratio (a scale factor that a minority of outliers,
    such as subnets measured while the device ran slow, cannot pull away)."""
    x = np.log(np.asarray(predicted, dtype=float))
    y = np.log(np.asarray(measured, dtype=float))
    if not free_slope or len(x) < 3 or np.ptp(x) == 0:
        return float(np.median(y - x)), 1.0
    slope, intercept = np.polyfit(x, y, 1)
    return float(intercept), float(slope)


# An "overheads" correction has three parameters: it is tried on this many subnets or more.
MIN_SUBNETS_FOR_OVERHEADS = 8


def fit_overheads(predicted: "Sequence[float] | np.ndarray", kernels: "Sequence[float] | np.ndarray",
                  measured: "Sequence[float] | np.ndarray") -> Optional[Correction]:
    """measured = s x predicted + o x kernels + c by least squares on relative errors, or
    None when that is no correction (s <= 0, or a subnet it was fitted on corrected to 0
    ms or less). o and c may be negative: the predictor's device pays a cost per kernel and
    per run too, which the scale s multiplies along with the kernels' work; o and c set it
    to the target's."""
    x = np.asarray(predicted, dtype=float)
    n = np.asarray(kernels, dtype=float)
    y = np.asarray(measured, dtype=float)
    design = np.c_[x, n, np.ones(len(y))]
    if np.linalg.matrix_rank(design / y[:, None]) < 3:  # e.g. every subnet has as many
        return None                                     # kernels: o and c not told apart
    (scale, per_kernel, fixed), *_ = np.linalg.lstsq(design / y[:, None], np.ones(len(y)),
                                                     rcond=None)
    if not (scale > 0 and abs(math.log(scale)) <= MAX_INTERCEPT
            and abs(per_kernel) <= MAX_OVERHEAD_MS and abs(fixed) <= MAX_OVERHEAD_MS) or \
            not np.all(design @ [scale, per_kernel, fixed] > 0):
        return None
    return Correction("overheads", math.log(scale), 1.0, float(per_kernel), float(fixed))


def corrected_or_miss(correction: Optional[Correction], predicted_ms: float,
                      kernels: int) -> float:
    """A correction's prediction as scored: one it cannot give (no correction was fitted, or
    it puts the model at 0 ms or less, which Correction.apply refuses) counts as a miss, an
    infinitely slow prediction."""
    if correction is None:
        return math.inf
    try:
        return correction.apply(predicted_ms, kernels)
    except PredictorError:
        return math.inf


def fit_correction(predicted: Sequence[float], measured: Sequence[float],
                   kernels: Optional[Sequence[int]] = None) -> Correction:
    """The correction for a device. A log-linear fit has two parameters, and on few or noisy
    subnets its slope chases the noise; so it, a scale factor and (given each subnet's
    number of kernels, on MIN_SUBNETS_FOR_OVERHEADS subnets or more) a scale plus costs per
    kernel and per run are scored by leave-one-out validation on the training subnets
    (+-10% accuracy, nn-Meter's metric, then RMSPE), and the best one is kept."""
    x = np.asarray(predicted, dtype=float)
    y = np.asarray(measured, dtype=float)
    n = None if kernels is None or len(x) < MIN_SUBNETS_FOR_OVERHEADS \
        else np.asarray(kernels, dtype=float)

    def fit(keep: np.ndarray, kind: str) -> Optional[Correction]:
        if kind == "overheads":
            assert n is not None
            return fit_overheads(x[keep], n[keep], y[keep])
        a, b = fit_log_linear(x[keep], y[keep], kind == "log-linear")
        return Correction(kind, a, b)

    kinds = ("scale", "log-linear") + (("overheads",) if n is not None else ())
    scores = {}
    for kind in kinds:
        errors = []
        for left_out in range(len(x)):
            keep = np.arange(len(x)) != left_out
            value = corrected_or_miss(fit(keep, kind), x[left_out],
                                      int(n[left_out]) if n is not None else 0)
            errors.append(value / y[left_out] - 1)
        errors_array = np.abs(errors)
        scores[kind] = (-float(np.mean(errors_array <= 0.10)),
                        float(np.sqrt(np.mean(errors_array ** 2))))
    everything = np.ones(len(x), dtype=bool)
    for kind in sorted(scores, key=scores.get):  # type: ignore[arg-type]
        correction = fit(everything, kind)
        if correction is not None:
            log.info("correction: leave-one-out (-acc10, RMSPE) %s; kept %s", scores, kind)
            return correction
    raise AssertionError("a scale is always fitted")


# ---------------------------------------------------------------- kernels as models

class _Binary(torch.nn.Module):
    def __init__(self, relu: bool):
        super().__init__()
        self.relu = relu

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = a + b
        return torch.relu(out) if self.relu else out


class _ChannelShuffle(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)


def kernel_model(kernel: Mapping[str, Any]) -> Optional[Tuple[torch.nn.Module, DummyInput]]:
    """A one-kernel model for a kernel nn-Meter detected (shapes in its NHWC convention),
    with its input; None for kernel types harness cannot build."""
    op = kernel["op"]
    relu = op.endswith("-relu") or op == "relu"
    if op in ("fc", "fc-relu"):
        fc = torch.nn.Linear(kernel["cin"], kernel["cout"])
        module = torch.nn.Sequential(fc, torch.nn.ReLU()) if relu else torch.nn.Sequential(fc)
        return module.eval(), torch.zeros(1, kernel["cin"])
    shapes = kernel.get("input_tensors") or []
    if not shapes or len(shapes[0]) != 4:
        return None  # every other kernel built here works on NHWC images
    _, height, width, channels = shapes[0]
    image = torch.zeros(1, channels, height, width)
    if op.startswith("conv") or op.startswith("dwconv"):
        size, stride = kernel["ks"][-1], (kernel.get("strides") or [1, 1])[-1]
        groups = channels if op.startswith("dwconv") else 1
        cout = channels if op.startswith("dwconv") else kernel["cout"]
        layers: List[torch.nn.Module] = [
            torch.nn.Conv2d(channels, cout, size, stride, size // 2, groups=groups)]
        if "-bn" in op:
            layers.append(torch.nn.BatchNorm2d(cout))
    elif op in ("bn", "bn-relu"):
        layers = [torch.nn.BatchNorm2d(channels)]
    elif op in ("add", "add-relu"):
        return _Binary(relu).eval(), (image, image.clone())
    elif op in ("gap", "global-avgpool"):
        layers = [torch.nn.AdaptiveAvgPool2d(1)]
    elif op in ("maxpool", "avgpool"):
        size, stride = kernel["ks"][-1], (kernel.get("strides") or [1, 1])[-1]
        pool = torch.nn.MaxPool2d if op == "maxpool" else torch.nn.AvgPool2d
        layers = [pool(size, stride, size // 2)]
    elif op == "hswish":
        layers = [torch.nn.Hardswish()]
    elif op in ("se", "SE"):  # nn-Meter's own fused node: MobileNetV3's gate
        layers = [SqueezeExcite(channels)]
    elif op == "channelshuffle":  # nn-Meter's own fused node: ShuffleNet's two groups
        layers = [_ChannelShuffle()]
    elif op == "relu":
        layers = []
    else:
        return None
    if relu:
        layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval(), image


def builder_config(kernel_type: str, features: Sequence[float]) -> Dict[str, float]:
    """nn-Meter builder's config for a kernel, from its prediction features (so training and
    prediction see the same numbers)."""
    from nn_meter.builder.kernel_predictor_builder.predictor_builder.extract_feature import \
        feature_for_kernel

    if kernel_type.startswith(GENERIC_PREFIX):
        names = GENERIC_FEATURES
    elif kernel_type == "concat":  # its builder has no input count, which predicting has
        names, features = feature_for_kernel[kernel_type], [features[0], *features[2:]]
    else:
        names = feature_for_kernel[kernel_type]
    return {name: value for name, value in zip(names, features)}


def needs_cut(kernel: Kernel) -> bool:
    """Whether a kernel is measured as cut out of its subnet (no torch model stands for it)."""
    return kernel.generic or kernel_model(kernel.info) is None


@dataclass
class _KernelJob:
    kernel_type: str
    features: Tuple[float, ...]
    kernel: Kernel
    build: Callable[[LatencyProfiler], Measurement]


def plan_kernels(models: Sequence[Sequence[Kernel]]) -> List[_KernelJob]:
    """How each distinct kernel of the models (by predictor type and features) is measured:
    as a torch one-kernel model, or as cut out of its subnet. A kernel that can be neither is
    a KernelError naming it, raised here, before any device time is spent."""
    distinct: Dict[Tuple[str, Tuple[float, ...]], Kernel] = {}
    for kernels in models:
        for kernel in kernels:
            distinct.setdefault((kernel.kernel_type, kernel.features), kernel)
    jobs = []
    for (kernel_type, features), kernel in sorted(distinct.items(), key=lambda item: item[0]):
        built = None if kernel.generic else kernel_model(kernel.info)
        if built is not None:
            module, inputs = built
            jobs.append(_KernelJob(kernel_type, features, kernel,
                                   functools.partial(_measure_module, module, inputs)))
        elif kernel.onnx_bytes is not None:
            jobs.append(_KernelJob(kernel_type, features, kernel,
                                   functools.partial(_measure_cut, kernel.onnx_bytes)))
        else:
            raise KernelError(f"{kernel.describe()} cannot be measured alone: no one-kernel "
                              "model stands for it and it was not cut out of its subnet",
                              fix="report the model; calibrate with a space without it")
    return jobs


def _measure_module(module: torch.nn.Module, inputs: DummyInput,
                    profiler: LatencyProfiler) -> Measurement:
    return profiler.measure_module(module, inputs)


def _measure_cut(onnx_bytes: bytes, profiler: LatencyProfiler) -> Measurement:
    """A kernel cut out of its subnet (static shapes), measured as any ONNX model is."""
    return profiler.measure_model(onnx_bytes)


ProgressLine = Callable[[str], None]


class _Steps:
    """Progress lines for a log or a pipe: one per tenth of a step's items, with the time
    since the calibration started."""

    def __init__(self, on_progress: Optional[ProgressLine]):
        self.on_progress = on_progress
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        if self.on_progress is not None:
            self.on_progress(f"calibrate: {text} ({time.monotonic() - self.started:.0f} s)")

    def count(self, what: str, done: int, total: int) -> None:
        """A line when `done` of `total` crosses a tenth (and at the end)."""
        if total and (done == total or done * 10 // total != (done - 1) * 10 // total):
            self.say(f"{what} {done}/{total}")


def measure_kernels(profiler: LatencyProfiler, jobs: Sequence[_KernelJob],
                    progress: Optional[bool] = None, statistic: str = "median",
                    steps: Optional[_Steps] = None,
                    collected: Optional[List[Measurement]] = None
                    ) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """Every planned kernel measured on the profiler's device (through its cache, so a rerun
    resumes): nn-Meter's builder data, {kernel type: {id: {"config", "model", "latency"
    ("<statistic> +- std" ms)}}}. Each measurement is appended to `collected` if given."""
    data: Dict[str, Dict[str, Dict[str, Any]]] = {}
    for number, job in enumerate(tqdm(
            jobs, unit="kernel", desc=f"kernels on {profiler.device}", leave=False,
            disable=(not progress) if progress is not None else None)):
        measurement = job.build(profiler)
        if collected is not None:
            collected.append(measurement)
        if steps is not None:
            steps.count("kernels measured", number + 1, len(jobs))
        data.setdefault(job.kernel_type, {})[f"{job.kernel_type}_{number}"] = {
            "config": builder_config(job.kernel_type, job.features),
            "model": job.kernel.op, "graph_hash": measurement.graph_hash,
            "latency": f"{measurement.statistic(statistic)} +- {measurement.stdev}"}
    log.info("measured %d distinct kernels: %s", sum(map(len, data.values())),
             {kind: len(items) for kind, items in data.items()})
    return data


def build_kernel_predictors(kernel_data: Dict[str, Dict[str, Dict[str, Any]]],
                            folder: Path) -> Path:
    """Train one regressor per kernel type with nn-Meter's builder and write an nn-Meter
    predictor folder (<type>.pkl, fusion_rules.json, and the measured data as kernels.json)."""
    import_nn_meter()
    from nn_meter.builder.backend_meta.utils import read_profiled_results
    from nn_meter.builder.kernel_predictor_builder import build_predictor_by_data

    staging = Path(tempfile.mkdtemp(prefix=".kernels-", dir=folder.parent))
    try:
        profiled = read_profiled_results(kernel_data)
        for kernel_type in sorted(profiled):
            with warnings.catch_warnings():  # out-of-bag scores of types with few configs
                warnings.simplefilter("ignore", UserWarning)
                if kernel_type.startswith(GENERIC_PREFIX):
                    predictor = build_generic_predictor(kernel_type, profiled)
                else:
                    predictor, _, _ = build_predictor_by_data(
                        kernel_type, profiled, BUILDER_BACKEND, final_predictor=True)
            with open(staging / f"{kernel_type}.pkl", "wb") as handle:
                pickle.dump(predictor, handle)
        (staging / FUSION_RULES).write_text(json.dumps(ORT_CPU_FUSION_RULES, indent=1))
        (staging / "kernels.json").write_text(json.dumps(kernel_data, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# ---------------------------------------------------------------- the whole calibration

@dataclass
class CalibrationResult:
    calibration: Calibration
    folder: Path
    holdout_points: Dict[str, List[Tuple[float, float]]]  # series -> (predicted, measured)
    png: Optional[Path]
    # whether it became the device's fallback; when not, `warning` says why and what to do
    activated: bool = True
    warning: Optional[str] = None
    # measurements reused from the cache: {"count", "of", "oldest_s", "newest_s"} (ages)
    reused: Optional[Dict[str, float]] = None

    @property
    def report(self) -> Dict[str, Dict[str, float]]:
        """Held-out accuracy per predictor (harness.predict.accuracy metrics)."""
        return self.calibration.report


@dataclass
class _Subnet:
    sample: Dict[str, Any]
    kernels: Dict[str, List[Kernel]]  # detector name -> the kernels it found


def _distinct_subnets(space: ModelSpace, dummy_input: DummyInput, count: int, seed: int,
                      avoid: set, detectors: Dict[str, KernelPredictors]) -> List[_Subnet]:
    """`count` subnets of distinct architectures not in `avoid`, with their kernels under each
    detector's fusion rules (kept instead of the ONNX bytes, which run to megabytes each)."""
    chosen: List[_Subnet] = []
    attempt = 0
    while len(chosen) < count:
        for sample in random_samples(space, count - len(chosen), seed=seed * 1000 + attempt):
            exported = export_sample(space, sample, dummy_input)
            if exported.graph_hash not in avoid:
                avoid.add(exported.graph_hash)
                chosen.append(_Subnet(sample, {
                    name: detect_kernels(onnx_for_nn_meter(exported.onnx_bytes),
                                         str(detector.fusion_rules),
                                         cut=needs_cut if name == "device" else None)
                    for name, detector in detectors.items()}))
        attempt += 1
        if attempt > 20:
            raise PredictorError(f"the space has fewer than the {count} distinct "
                                 "architectures asked for", fix="ask for fewer samples")
    return chosen


def _reused(measured: Sequence[Measurement], now: float) -> Dict[str, float]:
    """How many of the measurements came from the cache, of how many, and their ages (s)."""
    ages = [now - m.created_at for m in measured if m.source == "cached"]
    return {"count": len(ages), "of": len(measured), "oldest_s": max(ages, default=0.0),
            "newest_s": min(ages, default=0.0)}


def _worse_than_raw(report: Mapping[str, Mapping[str, float]], raw_name: str) -> bool:
    """Whether the correction made the held-out predictions worse than the raw predictor's
    (a larger RMSPE)."""
    return report["calibrated"]["rmspe"] > report[raw_name]["rmspe"]


def _place_kernels(candidate: Path, destination: Path) -> Path:
    """Move judged kernel predictors to where their calibration is stored."""
    target = destination / KERNELS_FOLDER
    destination.mkdir(parents=True, exist_ok=True)
    if target.exists():
        shutil.rmtree(target)
    os.replace(candidate, target)
    return target


def calibrate(space: ModelSpace, dummy_input: DummyInput, device: str, samples: int,
              holdout: int = 20, *, space_name: str = "", seed: int = 0,
              predictor: Union[str, Path, None] = None, build_kernels: Optional[bool] = None,
              settings: Optional[Mapping[str, Any]] = None,
              home: Union[str, Path, None] = None, cache: Any = None,
              plot: bool = True, progress: Optional[bool] = None,
              statistic: Optional[str] = None, fresh: bool = False,
              on_progress: Optional[ProgressLine] = None) -> CalibrationResult:
    """Calibrate nn-Meter to `device` (see the module docstring); returns what was stored
    and whether it became the device's fallback. `statistic`: which statistic of the
    device's runs the kernels and the correction are fitted to and predict (None: the
    profiler's default, the quiet-state latency of interleaved rounds where the device runs
    them, else the median; the minimum is steadier than the median on a device that shares
    its CPU with other work, whose interference only ever adds time). `fresh`: measure anew
    instead of reusing the cache.
    `on_progress`: called with a line per step (for a log or a pipe, where no bar shows)."""
    import_nn_meter()
    if statistic is not None and statistic not in STATISTICS:
        raise PredictorError(f"unknown statistic {statistic!r}",
                             fix=f"use one of {', '.join(STATISTICS)}")
    if samples < 2 or holdout < 2:
        raise PredictorError("calibration needs at least 2 training and 2 held-out subnets",
                             fix="pass --samples 100 --holdout 20, for example")
    runtime = (settings or {}).get("runtime") or "onnxruntime"
    if runtime != "onnxruntime":  # its kernels would be ONNX models: no converter takes them
        if build_kernels:
            raise PredictorError(f"device kernel predictors are built from ONNX kernels, which "
                                 f"{runtime} does not load",
                                 fix="pass --no-kernels and an official predictor to correct "
                                     "(--predictor cortexA76cpu_tflite21, nn-Meter's TFLite CPU "
                                     "predictor)")
        build_kernels = False
        if predictor is None:
            raise PredictorError(f"calibrating on {runtime} corrects an official nn-Meter "
                                 f"predictor, and none was given",
                                 fix="pass --predictor cortexA76cpu_tflite21 (nn-Meter's TFLite "
                                     "CPU predictor, placed in ~/.nn_meter)")
    if build_kernels is None:
        build_kernels = samples >= MIN_SUBNETS_FOR_KERNELS
    if not build_kernels and predictor is None:
        raise PredictorError(f"{samples} training subnets are too few to build kernel "
                             f"predictors (at least {MIN_SUBNETS_FOR_KERNELS}), and no official "
                             "predictor was given to correct",
                             fix=f"pass --samples {MIN_SUBNETS_FOR_KERNELS} or more, or "
                                 "--predictor NAME_OR_FOLDER")
    steps = _Steps(on_progress)
    official = load_predictor(predictor) if predictor is not None else None
    folder = calibrations_folder(home) / calibration_name(device, runtime)
    folder.mkdir(parents=True, exist_ok=True)

    steps.say(f"exporting {samples} training and {holdout} held-out subnets")
    with tempfile.TemporaryDirectory(prefix=".rules-", dir=folder) as scratch:
        rules = Path(scratch) / FUSION_RULES
        rules.write_text(json.dumps(ORT_CPU_FUSION_RULES))
        detectors = {"official": official} if official is not None else {}
        if build_kernels:
            detectors["device"] = KernelPredictors("onnxruntime-cpu", rules.parent, {}, rules, "")
        seen: set = set()
        train = _distinct_subnets(space, dummy_input, samples, seed, seen, detectors)
        held = _distinct_subnets(space, dummy_input, holdout, seed + 1, seen, detectors)
    subnets = train + held
    # Every kernel the device predictors need is known to be measurable before the device
    # spends any time (a KernelError names the one that is not).
    jobs = plan_kernels([s.kernels["device"] for s in train]) if build_kernels else []
    candidate = folder / CANDIDATE
    with LatencyProfiler(space, dummy_input, device, statistic, settings=settings, home=home,
                         cache=cache, refresh=fresh) as profiler:
        statistic = profiler.statistic  # the default resolved for its protocol
        profiler.steps.old_way = False  # fitted to the quiet state: no loop's median answers
        measured: List[Measurement] = []
        # in tenths when progress lines are wanted, else at once (one bar, export ahead)
        chunk = max(1, math.ceil(len(subnets) / 10)) if on_progress else len(subnets)
        for first in range(0, len(subnets), chunk):
            measured += profiler.measure_many([subnet.sample for subnet in
                                               subnets[first:first + chunk]], progress=progress)
            steps.count("subnets measured", len(measured), len(subnets))
        truth = [m.statistic(statistic) for m in measured]
        kernel_measured: List[Measurement] = []
        if build_kernels:
            kernel_data = measure_kernels(profiler, jobs, progress, statistic, steps,
                                          kernel_measured)
            steps.say(f"training kernel predictors on {len(jobs)} kernels")
            candidate.mkdir(exist_ok=True)
            base = load_predictor(build_kernel_predictors(kernel_data, candidate / KERNELS_FOLDER))
        else:
            base = official  # type: ignore[assignment]
        identity = profiler.identify()  # the device every measurement was stored under
    reused = _reused(measured + kernel_measured, time.time())
    assert base is not None
    base_kernels = "device" if build_kernels else "official"
    raw = [base.predict_kernels(subnet.kernels[base_kernels]) for subnet in subnets]
    if not all(value > 0 for value in raw):
        raise PredictorError(f"the predictor {base.name} predicts 0 ms for some subnets: it "
                             "has no regressor for their kernels",
                             fix="use a predictor built for this kind of model")
    kernels = [len(subnet.kernels[base_kernels]) for subnet in subnets]
    correction = fit_correction(raw[:samples], truth[:samples], kernels[:samples])
    try:  # overheads fitted on the training subnets may still fail a held-out one
        for value, count in zip(raw, kernels):
            correction.apply(value, count)
    except PredictorError as exc:
        log.warning("the overheads correction was dropped (%s); fitting a scale or a power "
                    "law instead", exc.message)
        correction = fit_correction(raw[:samples], truth[:samples])
    calibration = Calibration(
        device=device, base_predictor=str(base.folder), base_predictor_digest=base.digest,
        intercept=correction.intercept, slope=correction.slope, kind=correction.kind,
        per_kernel_ms=correction.per_kernel_ms, fixed_ms=correction.fixed_ms,
        device_fingerprint=identity.fingerprint,
        agent_version=identity.agent_version, settings_key=profiler.settings_key, space=space_name,
        space_fingerprint=profiler.space_fingerprint,
        input_signature=[dict(x) for x in profiler.input_signature], n_train=samples,
        n_holdout=holdout, statistic=statistic)
    held_truth = truth[samples:]
    series: Dict[str, List[float]] = {}
    if official is not None:
        series[f"nn-Meter {official.name}"] = [official.predict_kernels(subnet.kernels["official"])
                                               for subnet in held]
    raw_name = f"nn-Meter {'device kernels' if build_kernels else base.name}"
    series[raw_name] = raw[samples:]
    series["calibrated"] = [calibration.correct(value, count)
                            for value, count in zip(raw[samples:], kernels[samples:])]
    calibration.report = {name: accuracy_metrics(values, held_truth)
                          for name, values in series.items()}
    warning = None
    destination = folder
    if _worse_than_raw(calibration.report, raw_name):
        destination = folder / NOT_ACTIVATED
        fixed, worse = calibration.report[raw_name], calibration.report["calibrated"]
        warning = (f"the calibration of {device} made held-out predictions worse than "
                   f"{raw_name} (RMSPE {worse['rmspe']:.1f}% against {fixed['rmspe']:.1f}%, "
                   f"within +-10% {worse['acc10']:.0%} against {fixed['acc10']:.0%}, on "
                   f"{holdout} held-out subnets after {samples} training ones): stored in "
                   f"{destination}, not made {device}'s fallback")
        log.warning("%s", warning)
    elif (folder / NOT_ACTIVATED).exists():
        shutil.rmtree(folder / NOT_ACTIVATED)  # superseded by one that is in use
    if build_kernels:
        calibration.base_predictor = str(_place_kernels(candidate / KERNELS_FOLDER, destination))
    shutil.rmtree(candidate, ignore_errors=True)
    calibration.save(destination)
    points = {name: list(zip(values, held_truth)) for name, values in series.items()}
    replace_text(destination / "training.json", json.dumps(
        {"samples": [sample_key(subnet.sample) for subnet in train], "measured_ms": truth[:samples],
         "predicted_ms": raw[:samples]}, indent=1))
    replace_text(destination / "holdout.json", json.dumps(
        {"samples": [sample_key(subnet.sample) for subnet in held], "measured_ms": held_truth,
         "predicted_ms": series}, indent=1))
    png = save_scatter(points, destination / "accuracy.png",
                       f"nn-Meter on {device}: {holdout} held-out subnets") if plot else None
    log.info("calibration of %s stored in %s", device, destination)
    return CalibrationResult(calibration, destination, points, png, activated=warning is None,
                             warning=warning, reused=reused)
