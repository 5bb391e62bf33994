"""`harness report`: one self-contained HTML page, and its figures as PNGs, of what a cache holds.

What the page shows, read from the cache (and the calibrations in $HARNESS_HOME):
- the same subnets (graph hashes) on every device, side by side: the median of each and the
  95% interval of the median;
- the spread of each subnet's raw runs (box plots, the most recent MAX_RUN_SUBNETS subnets);
- latency against FLOPs per device, when `space` is given (FLOPs are not stored in the cache,
  so they are counted for the subnets that space indexed);
- the calibration scatter of every shown device that `harness calibrate` calibrated;
- a per-operator breakdown, when subnets were measured per operator (`operator_costs`:
  each node's median under its op type);
- per device, a table of its subnets that sorts on a click of its header (or `?sort=KEY` and
  `&desc` in the address).

The page needs no server and loads nothing: the images are inline data URIs, the styles and
the few lines of script are in the page. Every string from a cache or a user (device names,
architectures, flags) is HTML-escaped. Files are written only inside the output folder: it
must be a real folder (a symbolic link or a file is refused), files are opened relative to it
and replaced whole (a symbolic link planted in it is replaced, never followed).

Each device's newest measurement of each variant of each subnet or model file is a row (a
variant: precision, input shape and batch, provider); the older ones are counted. The charts
draw the user's subnets and files; the one-kernel models `harness calibrate` measured (their
graph hashes are in each calibration's kernels.json) have their own table.
"""
import base64
import html
import io
import json
import logging
import math
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import (Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple,
                    Union)

from devices.registry import NAME_PATTERN
from harness.store.cache import Cache
from harness.store.key import MeasurementKey, canonical_json
from harness.errors import HarnessError
from harness.store.measurement import Measurement
from harness.report.output import describe_choices, shortened, variant_of, when
from harness.paths import harness_home

log = logging.getLogger(__name__)

MAX_RUN_SUBNETS = 30       # box plots of at most this many subnets (the most recent)
MAX_COMPARED_SUBNETS = 40  # the across-devices figure shows at most this many subnets
SHORT_HASH = 10            # characters of a graph hash shown
SHORT_ARCHITECTURE = 48    # characters of an architecture shown in a table (all in its tooltip)
LOG_SCALE_RATIO = 20.0     # latencies spanning more than this factor are drawn on a log axis
DPI = 100
# A figure is at most this tall (inches, so 2400 pixels at DPI): rows per device would
# otherwise grow without bound (301 devices drew a 122-megapixel PNG).
MAX_FIGURE_HEIGHT = 24.0


class ReportError(HarnessError):
    """The report cannot be made: no cache, nothing in it, an unknown device, an output folder
    that cannot be written."""


# ---------------------------------------------------------------- what the page shows, as data

@dataclass(frozen=True)
class SubnetResult:
    """One subnet's newest measurement on one device, with what is known about the subnet."""

    device: str
    graph_hash: str
    input_sig: str                      # canonical JSON of the input shapes and dtypes
    measurement: Measurement
    architecture: Optional[str] = None  # the choices of a sample that builds it, shortened
    macs: Optional[float] = None        # multiply-accumulates, when a space was given
    kernel: bool = False                # a one-kernel model calibration measured

    @property
    def variant(self) -> str:
        """Precision, provider (other than the CPU's) and input shapes: 'int8-static 1x3x32x32'."""
        return variant_of(self.measurement)

    @property
    def subnet(self) -> Tuple[str, str]:
        """What a row and a chart's point stand for: a graph at one variant."""
        return self.graph_hash, self.variant


@dataclass(frozen=True)
class CalibrationView:
    """A device's stored nn-Meter calibration: its held-out points and accuracy report."""

    device: str
    kind: str
    n_train: int
    n_holdout: int
    created_at: float
    points: Dict[str, List[Tuple[float, float]]]   # series -> [(predicted, measured) ms]
    report: Dict[str, Dict[str, float]]            # series -> harness.predict.accuracy metrics


@dataclass(frozen=True)
class OperatorCost:
    """What one operator of a subnet costs on a device (ms): the per-operator breakdown."""

    device: str
    graph_hash: str
    operator: str
    ms: float


@dataclass(frozen=True)
class DeviceSummary:
    """A device of the report: its name, what it is (from its fingerprint), what it measured."""

    name: str
    description: str     # CPU, cores, runtime version: what the newest measurement says
    subnets: int         # subnets shown
    measurements: int    # measurements in the cache, older ones included
    latest: float        # date of its newest measurement


@dataclass
class ReportData:
    """Everything the page shows, collected from the cache before anything is drawn."""

    cache_path: Path
    devices: List[DeviceSummary]
    results: List[SubnetResult]               # in the order they were stored
    space: Optional[str] = None
    macs_counted: bool = False
    calibrations: List[CalibrationView] = field(default_factory=list)
    operators: List[OperatorCost] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)  # what the reader should know (plain text)
    # device name -> (when, reference block ms) of its windows of interleaved rounds
    reference_levels: Dict[str, List[Tuple[float, float]]] = field(default_factory=dict)

    @property
    def device_names(self) -> List[str]:
        return [device.name for device in self.devices]

    def by_device(self, device: str, kernels: bool = False) -> List[SubnetResult]:
        """The device's rows: of the user's subnets and files, or (`kernels`) of the one-kernel
        models calibration measured."""
        return [r for r in self.results if r.device == device and r.kernel == kernels]

    @property
    def user_results(self) -> List[SubnetResult]:
        """What the charts draw: every row but calibration's kernels."""
        return [r for r in self.results if not r.kernel]


@dataclass(frozen=True)
class ReportFiles:
    """What `write_report` wrote: the page and the figures (PNG), all inside `folder`."""

    folder: Path
    index: Path
    figures: List[Path]
    devices: int
    subnets: int


# ---------------------------------------------------------------- collecting

def collect(cache_path: Union[str, Path], devices: Optional[Sequence[str]] = None,
            space: Optional[str] = None, home: Union[str, Path, None] = None) -> ReportData:
    """Read what the report shows from the cache at `cache_path` (of `devices`, or every
    device) and from the calibrations under `home`. `space` (MODULE:ATTR) keeps only the
    subnets that space indexed, and counts their FLOPs. ReportError when there is nothing to
    show, or a device or the cache does not exist."""
    path = Path(cache_path).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise ReportError(f"no cache to report on: {path} {what}",
                          fix="profile something first (harness profile --device local), or "
                              "pass --cache FILE of an existing cache")
    with Cache(path) as cache:
        counts = cache.measurement_counts()
        known = list(counts)
        if not known:
            raise ReportError(f"the cache {path} holds no measurements",
                              fix="profile something first, e.g. harness profile --device local "
                                  "--samples 8")
        chosen = list(dict.fromkeys(devices)) if devices else known
        unknown = [name for name in chosen if name not in known]
        if unknown:
            raise ReportError(f"no measurement of device {unknown[0]!r} in {path}",
                              fix=f"pass --device with one of: {', '.join(known)}")
        rows = _newest_per_variant(cache.newest_measurements(chosen))
        index = cache.sample_index()
        fingerprints = {m.device: key.device_fp for key, m in rows if m.rounds is not None}
        levels = {device: cache.reference_history(fp) for device, fp in fingerprints.items()}

    notes: List[str] = []
    wanted: Optional[Dict[Tuple[str, str], Dict[str, Any]]] = None
    macs: Dict[Tuple[str, str], float] = {}
    describe: Callable[[Mapping[str, Any]], str] = describe_choices
    if space is not None:
        measured = {(key.graph_hash, key.input_sig) for key, _ in rows}
        wanted, macs, describe = _space_subnets(space, index, measured, notes)
        rows = [(key, m) for key, m in rows if (key.graph_hash, key.input_sig) in wanted]
        if not rows:
            raise ReportError(f"no measurement in {path} is of a subnet of {space} (on its "
                              f"dummy input, exported by this torch)",
                              fix="profile the space first (harness profile --space "
                                  f"{space}), or leave --space out")
    samples = wanted if wanted is not None else _any_sample(index)
    kernels = _calibration_kernels(home)
    results = []
    for key, m in rows:
        sample = samples.get((key.graph_hash, key.input_sig))
        results.append(SubnetResult(m.device, key.graph_hash, key.input_sig, m,
                                    _describe(describe, sample),
                                    macs.get((key.graph_hash, key.input_sig)),
                                    kernel=key.graph_hash in kernels and sample is None))
    if describe is describe_choices:
        notes.append("Architectures are the choices of one sample that builds each subnet, "
                     "each label by its initials and numbers, grouped by its first part: "
                     "stage1.depth=3, stage1.block0.expand=6, stage1.block0.kernel=5 read "
                     "'s1: d3 e6k5' (y/n for yes/no).")
    else:
        notes.append(f"Architectures are those of one sample that builds each subnet, as "
                     f"{space} describes them.")
    summaries = []
    for name in chosen:
        mine = [r for r in results if r.device == name]
        if not mine:
            notes.append(f"{name} measured none of the subnets shown.")
            continue
        stored = counts.get(name, len(mine))
        summaries.append(DeviceSummary(name, _describe_device(mine[-1].measurement),
                                       sum(not r.kernel for r in mine), stored,
                                       max(r.measurement.created_at for r in mine)))
        if stored > len(mine):
            notes.append(f"{name}: {_count(stored - len(mine), 'older measurement')} of the "
                         f"variants shown {'is' if stored - len(mine) == 1 else 'are'} in the "
                         f"cache; each row shows the newest.")
    data = ReportData(path, summaries, results, space, space is not None,
                      _calibrations([s.name for s in summaries], home, notes),
                      operator_costs(path, results), notes,
                      {device: points for device, points in levels.items() if points})
    log.info("report of %d subnets on %d devices from %s", len({r.subnet for r in results}),
             len(summaries), path)
    return data


def _count(number: int, thing: str) -> str:
    """'1 device', '3 devices'."""
    return f"{number} {thing}{'' if number == 1 else 's'}"


def _newest_per_variant(rows: Sequence[Tuple[MeasurementKey, Measurement]]
                        ) -> List[Tuple[MeasurementKey, Measurement]]:
    """One row per device, graph, input shapes and variant settings (precision, its
    calibration inputs, provider and its options): the newest of those measured with other
    timing settings. `rows` are in the order they were stored."""
    newest: Dict[Tuple[str, ...], Tuple[MeasurementKey, Measurement]] = {}
    for key, m in rows:
        settings = m.settings
        variant = (m.device, key.graph_hash, key.input_sig, str(settings.get("precision") or "fp32"),
                   str(settings.get("calibration")), str(settings.get("provider")),
                   canonical_json(settings.get("provider_options")))
        newest.pop(variant, None)
        newest[variant] = (key, m)  # re-inserted: the dict keeps the order they were stored
    return list(newest.values())


def _calibration_kernels(home: Union[str, Path, None]) -> Set[str]:
    """The graph hashes of the one-kernel models `harness calibrate` measured, from every
    calibration's kernels.json (in use or not activated)."""
    from harness.predict.calibration import calibrations_folder

    found: Set[str] = set()
    folder = calibrations_folder(home)
    for path in [*folder.glob("*/kernels/kernels.json"),
                 *folder.glob("*/not-activated/kernels/kernels.json")]:
        try:
            data = json.loads(path.read_text())
            found.update(str(item["graph_hash"]) for items in data.values()
                         for item in items.values() if isinstance(item, dict) and "graph_hash" in item)
        except (OSError, ValueError, AttributeError) as exc:
            log.warning("cannot read the kernels of %s: %s", path, exc)
    return found


def operator_costs(cache_path: Path, results: Sequence[SubnetResult]) -> List[OperatorCost]:
    """The per-operator costs of the shown subnets measured per operator (`harness profile
    --ops`, `measure(per_op=True)`): each node's median time under its op type."""
    return [OperatorCost(result.device, result.graph_hash, node.op_type, node.median_ms)
            for result in results if result.measurement.ops is not None
            for node in result.measurement.ops.nodes]


def _space_subnets(spec: str, index: Sequence[Tuple[str, str, str, str]],
                   measured: Set[Tuple[str, str]], notes: List[str]
                   ) -> Tuple[Dict[Tuple[str, str], Dict[str, Any]], Dict[Tuple[str, str], float],
                              Callable[[Mapping[str, Any]], str]]:
    """The subnets the space indexed ({(graph hash, input signature): a sample}), the MACs of
    those among `measured` (counted with harness.metrics.counting: a table look-up per sample for
    additive spaces), and how to describe a sample (the space's own `describe(sample)`, else
    describe_choices)."""
    from harness.metrics.counting import FlopsProfiler
    from harness.export.graph import exported_space_fingerprint, input_signature
    from harness.spaces.space import load_space

    space: Any = load_space(spec)
    if not callable(getattr(space, "dummy_input", None)):
        raise ReportError(f"space {spec} has no dummy_input() to tell its input shape",
                          fix="add dummy_input() to the space, or leave --space out")
    dummy = space.dummy_input()
    signature = input_signature(dummy)
    space_fp, input_sig = exported_space_fingerprint(space, signature), canonical_json(signature)
    samples: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for fingerprint, sig, text, graph in index:
        if fingerprint == space_fp and sig == input_sig:
            sample = _parse_sample(text)
            if sample is not None:
                samples.setdefault((graph, sig), sample)
    counter = FlopsProfiler(space, dummy)
    macs: Dict[Tuple[str, str], float] = {}
    for subnet, sample in samples.items():
        if subnet not in measured:
            continue
        try:
            macs[subnet] = counter.profile(sample)
        except HarnessError as exc:
            log.warning("cannot count the FLOPs of %s: %s", subnet[0][:SHORT_HASH], exc)
    missing = len(measured & set(samples)) - len(macs)
    if missing:
        notes.append(f"FLOPs of {missing} subnets could not be counted.")
    if counter.uncounted:
        notes.append(f"FLOPs leave out modules without a formula: "
                     f"{', '.join(sorted(counter.uncounted))}.")
    describe = getattr(space, "describe", None)
    return samples, macs, describe if callable(describe) else describe_choices


def _any_sample(index: Sequence[Tuple[str, str, str, str]]
                ) -> Dict[Tuple[str, str], Dict[str, Any]]:
    """A sample (the first indexed) for every (graph hash, input signature) of the index."""
    found: Dict[Tuple[str, str], Dict[str, Any]] = {}
    for _, sig, text, graph in index:
        if (graph, sig) not in found:
            sample = _parse_sample(text)
            if sample is not None:
                found[(graph, sig)] = sample
    return found


def _parse_sample(text: str) -> Optional[Dict[str, Any]]:
    try:
        sample = json.loads(text)
    except ValueError:
        return None
    return sample if isinstance(sample, dict) else None


def _calibrations(devices: Sequence[str], home: Union[str, Path, None],
                  notes: List[str]) -> List[CalibrationView]:
    """The stored calibration of every device that has one (harness calibrate), with the
    held-out points it was judged on. A damaged calibration is a note, not a failure."""
    from harness.predict.calibration import CALIBRATION_FILE, calibrations_folder, load_calibration

    folder = calibrations_folder(home)
    views = []
    for device in devices:
        if not NAME_PATTERN.match(device) or not (folder / device / CALIBRATION_FILE).is_file():
            continue  # only names that are one plain path component are looked up
        try:
            calibration = load_calibration(device, home)
            points = _holdout_points(folder / device / "holdout.json")
        except (HarnessError, OSError, ValueError, TypeError, KeyError) as exc:
            notes.append(f"the calibration of {device} could not be read: "
                         f"{getattr(exc, 'message', exc)}")
            continue
        if calibration is not None:
            views.append(CalibrationView(device, calibration.kind, calibration.n_train,
                                         calibration.n_holdout, calibration.created_at, points,
                                         dict(calibration.report)))
    return views


def _holdout_points(path: Path) -> Dict[str, List[Tuple[float, float]]]:
    """{series: [(predicted, measured) ms]} from a calibration's holdout.json."""
    data = json.loads(path.read_text())
    measured = [float(v) for v in data["measured_ms"]]
    points = {}
    for name, predicted in data["predicted_ms"].items():
        values = [float(v) for v in predicted]
        if len(values) != len(measured):
            raise ValueError(f"{path}: series {name!r} has {len(values)} predictions for "
                             f"{len(measured)} measured subnets")
        points[str(name)] = list(zip(values, measured))
    return points


def _describe(describe: Callable[[Mapping[str, Any]], str],
              sample: Optional[Mapping[str, Any]]) -> Optional[str]:
    """The architecture of a sample, or None when there is none or it cannot be described."""
    if not sample:
        return None
    try:
        return str(describe(sample))
    except Exception as exc:  # a space's own describe() is user code
        log.warning("cannot describe %s: %s", sample, exc)
        return None


def _describe_device(measurement: Measurement) -> str:
    """CPU, cores and runtime of a device (from a measurement's fingerprint), and the threads
    it ran with (from its settings)."""
    identity = measurement.device_fingerprint
    parts = [str(identity[key]) for key in ("android_model", "board", "cpu_model")
             if identity.get(key)]
    if identity.get("cpu_count"):
        parts.append(f"{identity['cpu_count']} cores")
    runtime = measurement.provenance.runtime or {}
    if runtime.get("name") not in (None, "onnxruntime"):  # the runtime that measured, beside
        parts.append(" ".join(str(runtime[k]) for k in ("name", "version", "backend")
                              if runtime.get(k)))
    elif identity.get("onnxruntime"):
        parts.append(f"onnxruntime {identity['onnxruntime']}")
    threads = measurement.settings.get("intra_op_threads")
    if threads:
        parts.append(f"{threads} thread{'s' if threads != 1 else ''}")
    return ", ".join(parts) or "unknown"


# ---------------------------------------------------------------- the output folder

class OutputFolder:
    """The report's folder, opened once: every file is created relative to it (so a folder
    swapped for a link afterwards is not followed) and replaced whole (a link planted where a
    file goes is replaced, never written through)."""

    FIX = "pass --out a new or existing folder that you can write, e.g. --out ./report"

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path).expanduser()
        fix = self.FIX
        self.check(self.path)
        if not self.path.exists():
            try:
                self.path.mkdir()
            except OSError as exc:
                raise ReportError(f"cannot create --out {self.path}: {exc.strerror or exc}",
                                  fix=fix) from None
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError as exc:
            raise ReportError(f"cannot open --out {self.path}: {exc.strerror or exc}",
                              fix=fix) from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            self.close()
            raise ReportError(f"cannot write into --out {self.path}: permission denied",
                              fix=fix)

    @classmethod
    def check(cls, path: Path) -> None:
        """ReportError when `path` cannot be the output folder: a symbolic link, a file, or
        missing with a missing parent (only the last part of --out is ever created)."""
        if path.is_symlink():
            raise ReportError(f"--out {path} is a symbolic link; harness writes only into a "
                              f"real folder", fix=cls.FIX)
        if path.exists() and not path.is_dir():
            raise ReportError(f"--out {path} is a file, not a folder", fix=cls.FIX)
        if not path.exists() and not path.parent.is_dir():
            raise ReportError(f"cannot create --out {path}: {path.parent} does not exist",
                              fix=f"create {path.parent} first, or {cls.FIX}")

    def write(self, name: str, data: bytes) -> Path:
        """Write `name` (a plain file name) in the folder, whole: a temporary file, renamed."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"not a plain file name: {name!r}")
        partial = f".{name}.{uuid.uuid4().hex[:8]}.part"
        try:
            handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                             0o644, dir_fd=self._fd)
            try:
                _write_all(handle, data)
            finally:
                os.close(handle)
            os.replace(partial, name, src_dir_fd=self._fd, dst_dir_fd=self._fd)
        except OSError as exc:
            try:
                os.unlink(partial, dir_fd=self._fd)
            except OSError:
                pass
            raise ReportError(f"cannot write {self.path / name}: {exc.strerror or exc}",
                              fix="check the folder's permissions and free space, or pass "
                                  "another --out") from None
        return self.path / name

    def close(self) -> None:
        os.close(self._fd)


def _write_all(handle: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(handle, view):]


# ---------------------------------------------------------------- figures

@dataclass(frozen=True)
class Figure:
    """A drawn figure: its PNG bytes, its file name and its caption (plain text)."""

    name: str
    png: bytes
    caption: str
    alt: str


def _pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ReportError("harness report draws with matplotlib, which is not installed",
                          fix="pip install 'harness[plot]'") from None
    return plt


def _height(inches: float) -> float:
    """A figure's height, capped at MAX_FIGURE_HEIGHT."""
    return min(inches, MAX_FIGURE_HEIGHT)


def _png(plt: Any, figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    return buffer.getvalue()


def _colors(plt: Any, devices: Sequence[str]) -> Dict[str, Any]:
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[i % len(cycle)] for i, name in enumerate(devices)}


def _ordered_subnets(results: Sequence[SubnetResult], devices: Sequence[str],
                     subnets: Iterable[Tuple[str, str]]) -> List[Tuple[str, str]]:
    """Subnets by their median on the first device that measured them (slowest at the top of
    a horizontal chart, since its rows count upwards)."""
    medians: Dict[Tuple[str, str], float] = {}
    for device in devices:
        for r in results:
            if r.device == device:
                medians.setdefault(r.subnet, r.measurement.median)
    return sorted(subnets, key=lambda s: medians.get(s, 0.0))


def _recent(results: Sequence[SubnetResult], subnets: Iterable[Tuple[str, str]],
            limit: int) -> List[Tuple[str, str]]:
    """The `limit` subnets among `subnets` measured most recently (on any device)."""
    newest: Dict[Tuple[str, str], float] = {}
    for r in results:
        newest[r.subnet] = max(newest.get(r.subnet, 0.0), r.measurement.created_at)
    return sorted(set(subnets), key=lambda s: newest.get(s, 0.0), reverse=True)[:limit]


def _plain(text: str) -> str:
    """A name as matplotlib text: its '$' not read as mathematics, a leading '_' (which a legend
    would skip) kept."""
    text = text.replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def _latency_axis(axes: Any, values: Sequence[float], which: str = "x") -> None:
    positive = [v for v in values if v > 0]
    if positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        (axes.set_xscale if which == "x" else axes.set_yscale)("log")
    axes.grid(True, axis=which, alpha=0.3, which="both")


def _subnet_axes(axes: Any, subnets: Sequence[Tuple[str, str]], values: Sequence[float],
                 xlabel: str, title: str) -> None:
    """One row per subnet (labelled by its short hash), latency along x, a legend."""
    axes.set_yticks(range(len(subnets)), _row_labels(subnets), fontfamily="monospace",
                    fontsize=8)
    axes.set_ylim(-0.6, len(subnets) - 0.4)
    _latency_axis(axes, values)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("subnet or file (graph hash)")
    axes.set_title(title)
    axes.legend(fontsize=8, loc="lower right")


def _row_labels(subnets: Sequence[Tuple[str, str]]) -> List[str]:
    """A chart's row: the graph's short hash, and its variant when the chart has several."""
    several = len({variant for _, variant in subnets}) > 1
    return [f"{graph[:SHORT_HASH]} {variant}" if several else graph[:SHORT_HASH]
            for graph, variant in subnets]


def _across_devices(plt: Any, data: ReportData) -> Tuple[Optional[Figure], str]:
    """The same subnets on every device: medians with their 95% interval, one row each."""
    devices = data.device_names
    on: Dict[Tuple[str, str], Dict[str, Measurement]] = {}
    for r in data.user_results:
        on.setdefault(r.subnet, {})[r.device] = r.measurement
    shared = [s for s, by in on.items() if len(by) >= 2] if len(devices) > 1 else list(on)
    if not shared:
        return None, "No subnet was measured on more than one of the devices shown."
    chosen = _recent(data.user_results, shared, MAX_COMPARED_SUBNETS)
    subnets = _ordered_subnets(data.user_results, devices, chosen)
    colors = _colors(plt, devices)
    figure, axes = plt.subplots(figsize=(9, _height(1.2 + 0.3 * len(subnets)
                                                    * max(1, len(devices) / 2))))
    step = 0.7 / max(len(devices), 1)
    values: List[float] = []
    for d, device in enumerate(devices):
        rows = [(i, on[s][device]) for i, s in enumerate(subnets) if device in on[s]]
        if not rows:
            continue
        y = [i + (d - (len(devices) - 1) / 2) * step for i, _ in rows]
        medians = [m.median for _, m in rows]
        intervals = [m.median_interval(0.95) for _, m in rows]
        errors = [[m - low for m, (low, _) in zip(medians, intervals)],
                  [high - m for m, (_, high) in zip(medians, intervals)]]
        axes.errorbar(medians, y, xerr=errors, fmt="o", markersize=4, capsize=2,
                      color=colors[device], label=_plain(device))
        values += medians + [high for _, high in intervals]
    _subnet_axes(axes, subnets, values, "latency (ms): median and its 95% interval",
                 "The same subnets on each device" if len(devices) > 1 else
                 f"Subnets on {_plain(devices[0])}")
    figure.tight_layout()
    capped = (f" The {MAX_COMPARED_SUBNETS} most recently measured of {len(shared)} subnets "
              f"are drawn." if len(shared) > len(chosen) else "")
    what = "measured on two devices or more" if len(devices) > 1 else "measured"
    caption = (f"Median latency of each subnet {what} ({len(subnets)} drawn), with the "
               f"distribution-free 95% interval of the median.{capped}")
    return Figure("devices.png", _png(plt, figure), caption,
                  "median latency of each subnet on each device"), caption


def _horizontal_boxplot(axes: Any, values: List[List[float]], **options: Any) -> Any:
    """Box plots along the x axis (matplotlib 3.10 renamed `vert=False` to `orientation`)."""
    try:
        return axes.boxplot(values, orientation="horizontal", **options)
    except TypeError:
        return axes.boxplot(values, vert=False, **options)


def _runs(plt: Any, data: ReportData) -> Tuple[Optional[Figure], str]:
    """Box plots of every raw run of the most recent subnets, one box per device."""
    devices = data.device_names
    everything = {r.subnet for r in data.user_results}
    if not everything:
        return None, "Nothing but calibration's kernels was measured on the devices shown."
    chosen = _recent(data.user_results, everything, MAX_RUN_SUBNETS)
    subnets = _ordered_subnets(data.user_results, devices, chosen)
    colors = _colors(plt, devices)
    row = {s: i for i, s in enumerate(subnets)}
    figure, axes = plt.subplots(figsize=(9, _height(1.2 + 0.3 * len(subnets)
                                                    * max(1, len(devices) / 2))))
    step = 0.7 / max(len(devices), 1)
    values: List[float] = []
    for d, device in enumerate(devices):
        mine = [r for r in data.user_results if r.device == device and r.subnet in row]
        if not mine:
            continue
        positions = [row[r.subnet] + (d - (len(devices) - 1) / 2) * step for r in mine]
        boxes = _horizontal_boxplot(axes, [list(r.measurement.samples_ms) for r in mine],
                                    positions=positions, widths=step * 0.85, patch_artist=True,
                                    manage_ticks=False,
                                    flierprops={"markersize": 2, "alpha": 0.5})
        for box in boxes["boxes"]:
            box.set(facecolor=colors[device], alpha=0.55, edgecolor=colors[device])
        for median in boxes["medians"]:
            median.set(color="black", linewidth=1)
        axes.plot([], [], "s", color=colors[device], alpha=0.55, label=_plain(device))
        values += [v for r in mine for v in r.measurement.samples_ms]
    _subnet_axes(axes, subnets, values, "latency of each timed run (ms)", "Spread of the runs")
    figure.tight_layout()
    capped = (f" Only the {MAX_RUN_SUBNETS} most recently measured of {len(everything)} "
              f"subnets are drawn." if len(everything) > len(chosen) else "")
    caption = (f"Every timed run of each subnet: the box spans the middle half (IQR), the line "
               f"is the median, whiskers reach 1.5 IQR, dots are the runs beyond.{capped}")
    return Figure("runs.png", _png(plt, figure), caption,
                  "box plots of the raw runs of each subnet"), caption


def _against_flops(plt: Any, data: ReportData) -> Tuple[Optional[Figure], str]:
    """Median latency against MACs, one series per device."""
    known = [r for r in data.user_results if r.macs is not None]
    if not data.macs_counted:
        return None, ("FLOPs are not stored in the cache: pass --space MODULE:ATTR to count "
                      "them for the subnets of that space.")
    if not known:
        return None, "The FLOPs of none of the subnets shown could be counted."
    colors = _colors(plt, data.device_names)
    figure, axes = plt.subplots(figsize=(9, 5))
    values: List[float] = []
    for device in data.device_names:
        mine = [r for r in known if r.device == device]
        if not mine:
            continue
        medians = [r.measurement.median for r in mine]
        intervals = [r.measurement.median_interval(0.95) for r in mine]
        errors = [[m - low for m, (low, _) in zip(medians, intervals)],
                  [high - m for m, (_, high) in zip(medians, intervals)]]
        axes.errorbar([r.macs / 1e6 for r in mine if r.macs is not None], medians, yerr=errors,
                      fmt="o", markersize=4, capsize=2, color=colors[device],
                      label=_plain(device))
        values += medians
    _latency_axis(axes, values, "y")
    axes.grid(True, axis="x", alpha=0.3)
    axes.set_xlabel("MMACs (million multiply-accumulates)")
    axes.set_ylabel("median latency (ms)")
    axes.set_title(f"Latency against FLOPs ({_plain(data.space or '')})")
    axes.legend(fontsize=8)
    figure.tight_layout()
    missing = len(data.user_results) - len(known)
    caption = ("Median latency (with its 95% interval) against the multiply-accumulates of "
               "each subnet, counted by harness.metrics.counting." +
               (f" {missing} results have no FLOPs." if missing else ""))
    return Figure("flops.png", _png(plt, figure), caption,
                  "median latency against FLOPs per device"), caption


def _calibration(plt: Any, view: CalibrationView, number: int) -> Optional[Figure]:
    """The held-out scatter of a calibration, drawn as `harness calibrate` draws it."""
    if not view.points:
        return None
    from harness.predict.accuracy import save_scatter

    with tempfile.TemporaryDirectory(prefix="harness-report-") as scratch:
        try:
            drawn = save_scatter({_plain(name): points for name, points in view.points.items()},
                                 Path(scratch) / "scatter.png",
                                 f"nn-Meter on {_plain(view.device)}: {view.n_holdout} held-out "
                                 f"subnets")
        except (ImportError, ValueError) as exc:  # no scipy (metrics in the legend), bad points
            log.warning("cannot draw the calibration of %s: %s", view.device, exc)
            return None
        if drawn is None:
            return None
        png = drawn.read_bytes()
    caption = (f"Predicted against measured latency of the {view.n_holdout} held-out subnets "
               f"of the calibration of {view.device} ({view.kind} correction, fitted on "
               f"{view.n_train} subnets, {when(view.created_at)}).")
    return Figure(f"calibration-{number}.png", png, caption,
                  f"calibration scatter of {view.device}")


def _operators(plt: Any, data: ReportData) -> Optional[Figure]:
    """Stacked bars of what each operator costs, per device (only when something was measured
    per operator)."""
    if not data.operators:
        return None
    totals: Dict[Tuple[str, str], float] = {}
    for cost in data.operators:
        totals[(cost.device, cost.operator)] = totals.get((cost.device, cost.operator), 0.0) + cost.ms
    operators = sorted({op for _, op in totals})
    devices = [d for d in data.device_names if any(k[0] == d for k in totals)]
    figure, axes = plt.subplots(figsize=(9, _height(1.5 + 0.5 * len(devices))))
    left = [0.0] * len(devices)
    for operator in operators:
        widths = [totals.get((device, operator), 0.0) for device in devices]
        axes.barh(range(len(devices)), widths, left=left, label=_plain(operator))
        left = [a + b for a, b in zip(left, widths)]
    axes.set_yticks(range(len(devices)), [_plain(d) for d in devices])
    axes.set_xlabel("time summed over the subnets shown (ms)")
    axes.set_title("Per operator")
    axes.legend(fontsize=8, ncol=min(len(operators), 4))
    figure.tight_layout()
    return Figure("operators.png", _png(plt, figure),
                  "Time per operator type, summed over the subnets measured per operator.",
                  "time per operator type per device")


def _reference_levels(plt: Any, data: ReportData) -> Optional[Figure]:
    """The reference model's blocks over time per device: how fast each device ran while it
    measured in interleaved rounds (only when some device did)."""
    if not data.reference_levels:
        return None
    colors = _colors(plt, list(data.reference_levels))
    figure, axes = plt.subplots(figsize=(9, 3.2))
    start = min(points[0][0] for points in data.reference_levels.values())
    for device, points in data.reference_levels.items():
        axes.plot([(when - start) / 60 for when, _ in points], [ms for _, ms in points], ".",
                  markersize=2, color=colors[device], label=_plain(device))
    axes.set_xlabel("minutes since the first window shown")
    axes.set_ylabel("reference block (ms)")
    axes.set_title("The reference model over time")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return Figure("reference.png", _png(plt, figure),
                  "The reference model's blocks (the minimum of each block's runs, by the "
                  "clock the ratios read: the thread's CPU time where the agent timed it, so "
                  "time-slicing by other work does not show) over time, per device: the "
                  "device's speed while it measured in interleaved rounds; a "
                  "candidate's quiet-state latency is its ratio to the nearest of these, times "
                  "their low quantile.", "reference model blocks over time per device")


# ---------------------------------------------------------------- the page

def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _img(figure: Figure, css: str = "") -> str:
    encoded = base64.b64encode(figure.png).decode("ascii")
    return (f'<figure class="{css}"><img src="data:image/png;base64,{encoded}" alt="{_e(figure.alt)}">'
            f'<figcaption>{_e(figure.caption)} <a href="{_e(figure.name)}">{_e(figure.name)}'
            f'</a></figcaption></figure>')


def _cell(text: str, value: Optional[Union[float, str]] = None, title: Optional[str] = None,
          css: str = "") -> str:
    """A table cell; `value` is what sorting compares (a number, or text)."""
    attributes = ""
    if value is not None:
        attributes += f' data-v="{_e(value)}"'
    if title:
        attributes += f' title="{_e(title)}"'
    if css:
        attributes += f' class="{css}"'
    return f"<td{attributes}>{_e(text)}</td>"


def _table(columns: Sequence[Tuple[str, str, str]], rows: Sequence[str], caption: str) -> str:
    """A sortable table: columns are (sort key, header text, 'num' or 'text', optionally
    followed by ' more' for a column shown only when the reader asks for more)."""
    head = "".join(f'<th data-key="{_e(key)}" class="{kind}" aria-sort="none" tabindex="0">'
                   f"{_e(text)}</th>" for key, text, kind in columns)
    title = f"<caption>{_e(caption)}</caption>" if caption else ""
    return (f'<div class="scroll"><table class="sortable">{title}<thead><tr>{head}</tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></div>')


# The columns of a device's table: those that matter first; p90, IQR, CV and the date behind
# the page's "more columns" toggle (class "more"), so a table fits a 1280 px screen.
SUBNET_COLUMNS = [("graph", "graph", "text"), ("arch", "architecture", "text"),
                  ("variant", "variant", "text"), ("median", "median ms", "num"),
                  ("ci", "95% CI of median ms", "num"), ("n", "n", "num"),
                  ("source", "source", "text"), ("flags", "flags", "text"),
                  ("p90", "p90 ms", "num more"), ("iqr", "IQR ms", "num more"),
                  ("cv", "CV", "num more"), ("measured", "measured", "num more")]


def _subnet_row(r: SubnetResult, with_macs: bool) -> str:
    m = r.measurement
    low, high = m.median_interval(0.95)
    architecture = r.architecture or ""
    short = shortened(architecture, SHORT_ARCHITECTURE)
    cells = [_cell(r.graph_hash[:SHORT_HASH], r.graph_hash, title=r.graph_hash, css="mono"),
             _cell(short or "-", architecture, title=architecture or "not in the sample index "
                   "(a model file, or a kernel)", css="arch")]
    if with_macs:
        cells.append(_cell(f"{r.macs / 1e6:.1f}" if r.macs is not None else "-",
                           r.macs if r.macs is not None else ""))
    flags = "; ".join(m.flags) or "ok"
    cells += [_cell(r.variant, r.variant, css="t"), _cell(f"{m.median:.3f}", m.median),
              _cell(f"{low:.3f}\u2013{high:.3f}", high - low,
                    title="95% interval of the median; sorts by its width"),
              _cell(str(m.n), m.n), _cell(m.source, m.source, css="t"),
              _cell(flags, flags, css="t flags" if m.flags else "t"),
              _cell(f"{m.p90:.3f}", m.p90, css="more"), _cell(f"{m.iqr:.3f}", m.iqr, css="more"),
              _cell(f"{m.cv:.1%}", m.cv, css="more"),
              _cell(when(m.created_at), m.created_at, css="more")]
    return f"<tr>{''.join(cells)}</tr>"


def _device_table(data: ReportData, device: DeviceSummary, kernels: bool = False) -> str:
    """A device's rows (or, with `kernels`, its calibration kernels' rows) as a sortable table."""
    results = data.by_device(device.name, kernels)
    if not results:
        return ""
    with_macs = any(r.macs is not None for r in results)
    columns = SUBNET_COLUMNS[:2] + ([("mmacs", "MMACs", "num")] if with_macs else []) + \
        SUBNET_COLUMNS[2:]
    rows = [_subnet_row(r, with_macs) for r in results]
    what = (_count(len(rows), "calibration kernel") if kernels else
            f"{_count(len(rows), 'subnet or file variant')} (a row each)")
    section = "kernels" if kernels else "device"
    return (f'<section class="{section}" data-device="{_e(device.name)}" data-kind="{section}">'
            f"<h3>{_e(device.name)}</h3><p>{_e(device.description)}</p>"
            + _table(columns, rows, f"{what} measured on {device.name}") +
            "</section>")


def _devices_table(data: ReportData) -> str:
    columns = [("device", "device", "text"), ("what", "what it is", "text"),
               ("subnets", "rows shown (kernels apart)", "num"), ("measurements", "measurements", "num"),
               ("latest", "latest", "num")]
    rows = [f"<tr>{_cell(d.name, d.name)}{_cell(d.description, d.description, css='t')}"
            f"{_cell(str(d.subnets), d.subnets)}{_cell(str(d.measurements), d.measurements)}"
            f"{_cell(when(d.latest), d.latest)}</tr>" for d in data.devices]
    return _table(columns, rows, "")


def _number(metrics: Mapping[str, Any], key: str) -> float:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _calibration_section(data: ReportData, figures: Dict[str, Figure]) -> str:
    if not data.calibrations:
        return ("<section><h2>Calibration</h2><p>No device shown has a calibration "
                "(harness calibrate --device NAME makes one).</p></section>")
    parts = ["<section><h2>Calibration</h2>"]
    for view in data.calibrations:
        parts.append(f"<h3>{_e(view.device)}</h3>")
        figure = figures.get(view.device)
        parts.append(_img(figure, "small") if figure is not None else
                     "<p>The held-out points could not be drawn (they or scipy are missing).</p>")
        columns = [("predictor", "predictor", "text"), ("acc5", "\u00b15% acc", "num"),
                   ("acc10", "\u00b110% acc", "num"), ("rmspe", "RMSPE", "num"),
                   ("tau", "Kendall \u03c4", "num"), ("n", "n", "num")]
        rows = []
        for name, metrics in view.report.items():
            acc5, acc10, rmspe, tau, n = (_number(metrics, key) for key in
                                          ("acc5", "acc10", "rmspe", "kendall_tau", "n"))
            rows.append(f"<tr>{_cell(name, name)}{_cell(f'{acc5:.1%}', acc5)}"
                        f"{_cell(f'{acc10:.1%}', acc10)}{_cell(f'{rmspe:.1f}%', rmspe)}"
                        f"{_cell(f'{tau:.3f}', tau)}{_cell(f'{n:.0f}', n)}</tr>")
        parts.append(_table(columns, rows, f"held-out accuracy on {view.device}"))
    parts.append("</section>")
    return "".join(parts)


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d1f23;
 margin:0 auto;max-width:1180px;padding:16px 24px 48px}
h1{font-size:22px;margin:8px 0 2px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd;
 padding-bottom:4px}h3{font-size:15px;margin:18px 0 4px}
.meta{color:#555;margin:0 0 8px}.note{color:#555}
figure{margin:8px 0}figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:13px}
table{border-collapse:collapse;margin:6px 0 12px;font-size:13px}
caption{text-align:left;color:#555;padding:2px 0}
th,td{padding:3px 8px;border-bottom:1px solid #e6e6e6;text-align:left;white-space:nowrap}
th{background:#f4f5f7;cursor:pointer;user-select:none}th.num,td[data-v]{font-variant-numeric:tabular-nums}
th.num{text-align:right}td{text-align:right}td:first-child,td.t,td.arch,td.mono{text-align:left}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.mono{font-family:ui-monospace,Menlo,Consolas,monospace}td.arch{font-family:ui-monospace,Menlo,
 Consolas,monospace;font-size:12px}td.flags{color:#a33}
.scroll{overflow-x:auto}figure.small img{max-width:480px}
ul.notes{color:#444}
td.flags{white-space:normal;min-width:160px;max-width:300px;font-size:12px}
.more{display:none}body.more .more{display:table-cell}
label.toggle{color:#333;font-size:13px;cursor:pointer}
"""

# Sorts a table on a click of its header (again: the other way); `?sort=KEY[&desc]` sorts every
# table with that column when the page opens. Records, for tests, whether every image decoded.
SCRIPT = """
function sortTable(table, column, descending) {
  var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
  var kind = table.tHead.rows[0].cells[column].className;
  function key(row) {
    var cell = row.cells[column], v = cell.getAttribute('data-v');
    if (v === null) v = cell.textContent;
    if (kind === 'num') { var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v.toLowerCase();
  }
  rows.sort(function (a, b) {
    var x = key(a), y = key(b);
    if (x === y) return 0;
    if (x === null) return 1;
    if (y === null) return -1;
    var order = x < y ? -1 : 1;
    return descending ? -order : order;
  });
  rows.forEach(function (row) { body.appendChild(row); });
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, i) {
    th.setAttribute('aria-sort', i === column ? (descending ? 'descending' : 'ascending') : 'none');
  });
}
Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
    function sort() { sortTable(table, column, th.getAttribute('aria-sort') === 'ascending'); }
    th.addEventListener('click', sort);
    th.addEventListener('keydown', function (e) { if (e.key === 'Enter') sort(); });
  });
});
(function () {
  var params = new URLSearchParams(window.location.search), wanted = params.get('sort');
  if (!wanted) return;
  Array.prototype.forEach.call(document.querySelectorAll('table.sortable'), function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, column) {
      if (th.getAttribute('data-key') === wanted) sortTable(table, column, params.has('desc'));
    });
  });
  document.body.setAttribute('data-sorted', wanted);
})();
(function () {
  var toggle = document.getElementById('more-columns');
  if (toggle) toggle.addEventListener('change', function () {
    document.body.classList.toggle('more', toggle.checked);
  });
  if (new URLSearchParams(window.location.search).has('more')) {
    document.body.classList.add('more');
    if (toggle) toggle.checked = true;
  }
})();
window.addEventListener('load', function () {
  var wide = Array.prototype.filter.call(document.querySelectorAll('div.scroll'), function (d) {
    return d.scrollWidth > d.clientWidth;
  });
  document.body.setAttribute('data-page-width', document.documentElement.scrollWidth);
  document.body.setAttribute('data-wide-tables', wide.length);
  var images = Array.prototype.slice.call(document.images);
  images.forEach(function (img) { img.setAttribute('data-natural-width', img.naturalWidth); });
  var ok = images.every(function (img) { return img.complete && img.naturalWidth > 0; });
  document.body.setAttribute('data-images', ok ? 'ok' : 'broken');
});
"""


def render_html(data: ReportData, figures: Sequence[Figure],
                calibration_figures: Dict[str, Figure], texts: Mapping[str, str]) -> str:
    """The page: every figure inline, every string escaped, the tables sortable."""
    by_name = {figure.name: figure for figure in figures}

    def figure_or_note(name: str) -> str:
        figure = by_name.get(name)
        return _img(figure) if figure is not None else f'<p class="note">{_e(texts[name])}</p>'

    subnets = len({r.subnet for r in data.user_results})
    kernels = len({r.subnet for r in data.results if r.kernel})
    devices = ", ".join(data.device_names)
    meta = (f"{_count(subnets, 'subnet or file variant')}"
            + (f" and {_count(kernels, 'calibration kernel')}" if kernels else "")
            + f" on {_count(len(data.devices), 'device')} ({devices}) from {data.cache_path}"
            + (f", space {data.space}" if data.space else "") + f"; made {when(time.time())}")
    notes = list(data.notes)
    notes.append("Each row is a subnet (a graph hash) or a model file at one variant "
                 "(precision, provider, input shape and batch), with its newest measurement "
                 "on its device.")
    if not data.operators:
        notes.append("No per-operator breakdown: nothing in this cache is measured per "
                     "operator.")
    sections = [
        f"<h1>harness report</h1><p class=\"meta\">{_e(meta)}</p>",
        "<section><h2>Devices</h2>" + _devices_table(data) + "</section>",
        "<section><h2>Across devices</h2>" + figure_or_note("devices.png") + "</section>",
        "<section><h2>Spread of the runs</h2>" + figure_or_note("runs.png") + "</section>",
        "<section><h2>Latency against FLOPs</h2>" + figure_or_note("flops.png") + "</section>",
        _calibration_section(data, calibration_figures),
    ]
    if data.operators:
        sections.append("<section><h2>Per operator</h2>" + figure_or_note("operators.png") +
                        "</section>")
    if data.reference_levels:
        sections.append("<section><h2>The device's speed</h2>" +
                        figure_or_note("reference.png") + "</section>")
    sections.append("<section><h2>Subnets by device</h2><p class=\"note\">Click a column's "
                    "header to sort by it (again to reverse). Times in ms. "
                    "<label class=\"toggle\"><input type=\"checkbox\" id=\"more-columns\"> "
                    "more columns (p90, IQR, CV, date)</label></p>" +
                    "".join(_device_table(data, d) for d in data.devices) + "</section>")
    if kernels:
        sections.append("<section><h2>Calibration kernels</h2><p class=\"note\">The one-kernel "
                        "models harness calibrate measured to train its kernel predictors; "
                        "not drawn in the charts above.</p>" +
                        "".join(_device_table(data, d, kernels=True) for d in data.devices) +
                        "</section>")
    sections.append("<section><h2>About this report</h2><ul class=\"notes\">" +
                    "".join(f"<li>{_e(note)}</li>" for note in notes) + "</ul></section>")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>harness report: {_e(devices)}</title><style>{STYLE}</style></head>"
            f"<body>{''.join(sections)}<script>{SCRIPT}</script></body></html>\n")


def write_report(cache_path: Union[str, Path], out: Union[str, Path],
                 devices: Optional[Sequence[str]] = None, space: Optional[str] = None,
                 home: Union[str, Path, None] = None) -> ReportFiles:
    """Collect the report from the cache and write DIR/index.html and the figures' PNGs into
    `out` (created if missing; its parent must exist). See the module docstring."""
    OutputFolder.check(Path(out).expanduser())  # a bad --out is refused before any work
    data = collect(cache_path, devices, space, home if home is not None else harness_home())
    plt = _pyplot()
    figures: List[Figure] = []
    texts: Dict[str, str] = {}  # figure name -> its caption, or why it is not drawn
    for name, draw in (("devices.png", _across_devices), ("runs.png", _runs),
                       ("flops.png", _against_flops)):
        figure, texts[name] = draw(plt, data)
        if figure is not None:
            figures.append(figure)
    for extra in (_operators(plt, data), _reference_levels(plt, data)):
        if extra is not None:
            figures.append(extra)
    calibration_figures: Dict[str, Figure] = {}
    for number, view in enumerate(data.calibrations, 1):
        drawn = _calibration(plt, view, number)
        if drawn is not None:
            calibration_figures[view.device] = drawn
    page = render_html(data, figures, calibration_figures, texts)

    folder = OutputFolder(out)
    try:
        written = [folder.write(f.name, f.png)
                   for f in figures + list(calibration_figures.values())]
        index = folder.write("index.html", page.encode("utf-8"))
    finally:
        folder.close()
    return ReportFiles(folder.path, index, written, len(data.devices),
                       len({r.subnet for r in data.user_results}))
