"""nn-Meter latency predictions: `NnMeterProfiler`, and loading nn-Meter predictors.

nn-Meter predicts a model's latency as the sum of its kernels' latencies: a kernel detector
splits the graph into the kernels a runtime fuses (conv-bn-relu, dwconv, add, ...) by a
device's fusion rules, and one regressor per kernel type (a scikit-learn RandomForest pickle)
predicts each kernel from its configuration. A predictor is a folder holding those pickles
and `fusion_rules.json`: an official one (say `cortexA76cpu_tflite21`) that the user placed in
nn-Meter's data folder, or one `harness calibrate` built from a device's own measurements.

What nn-Meter 2.0 needs around it here:
- it imports only with setuptools < 81 (it uses pkg_resources): `pip install 'harness[nn-meter]'`;
- its torch path is broken on current torch, so models go through our ONNX export, cleaned of
  the `Constant` and initializer-`Identity` nodes its ONNX converter cannot read;
- it would download official predictors on first use, which hangs on a closed network, so
  harness loads predictor folders itself and never downloads;
- the official pickles are scikit-learn 0.23 ones, loaded through harness.predict.sklearn_pickle.
"""
import functools
import hashlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import onnx

from harness.export.compose import Piece, compose
from harness.export.graph import DummyInput, ExportedModel, export_sample, input_signature
from harness.predict.flat_forest import FlatForest
from harness.predict.kernels import (Kernel, PredictorError, detect_kernels,
                                     import_nn_meter)
from harness.store.measurement import Measurement, Provenance
from harness.metrics.profiler_base import Profiler
from harness.predict.sklearn_pickle import LegacyPickleError, UnsafePickleError, load_kernel_predictor
from harness.spaces.space import ModelSpace, SampleValidator, checked_search_space

log = logging.getLogger(__name__)

FUSION_RULES = "fusion_rules.json"
DETECT_MEMO_SIZE = 4096  # graphs whose kernels are kept (a few KB each)
PIECE_CHECKS = 3  # composed subnets detected whole too, before their pieces are trusted


def nn_meter_data_folder() -> Path:
    """Where nn-Meter keeps official predictors: `<data_folder>/predictor/<name>/`, with
    data_folder from nn-Meter's settings.yaml (~/.nn_meter/config if the user set nn-Meter up,
    else $HARNESS_HOME/nn-meter/.nn_meter/config; its data folder beside it). It must be
    absolute: a relative one would be looked up in whatever folder harness runs in."""
    from nn_meter.utils import get_user_data_folder

    import_nn_meter()
    folder = Path(get_user_data_folder()).expanduser()
    if not folder.is_absolute():
        raise PredictorError(f"nn-Meter's data folder {str(folder)!r} is a relative path, so "
                             f"it would name a folder under the current one",
                             fix="set an absolute data_folder in nn-Meter's settings.yaml "
                                 "(~/.nn_meter/config, or $HARNESS_HOME/nn-meter/.nn_meter/config)")
    return folder / "predictor"


def is_predictor_path(predictor: Union[str, Path]) -> bool:
    """Whether the user named a predictor folder by path (a Path, or text that is absolute,
    holds a path separator, or starts with '.' or '~') rather than an official predictor by
    name. Only a path is looked up on disk where it points; a bare name is looked up in
    nn-Meter's data folder only, never in the current folder (predictor files are code)."""
    if isinstance(predictor, Path):
        return True
    text = str(predictor)
    separators = [sep for sep in (os.sep, os.altsep, "/") if sep]
    return (os.path.isabs(text) or text.startswith((".", "~"))
            or any(sep in text for sep in separators))


def official_predictors() -> Dict[str, Dict[str, Any]]:
    """nn-Meter's official predictors by name: kernel list and download address."""
    nn_meter = import_nn_meter()
    return {entry["name"]: entry for entry in nn_meter.list_latency_predictors()}


@dataclass
class KernelPredictors:
    """A loaded nn-Meter predictor: one regressor per kernel type plus the fusion rules."""

    name: str
    folder: Path
    predictors: Dict[str, Any]
    fusion_rules: Path
    digest: str  # sha256 over the folder's files: which predictor, exactly

    def __post_init__(self) -> None:
        self._kernel_memo: Dict[Tuple[str, Tuple[float, ...]], float] = {}
        self._detect_memo: "OrderedDict[str, List[Kernel]]" = OrderedDict()
        self._memo_lock = threading.Lock()  # a profiler's threads may predict at once
        self._flat_forests: Dict[str, FlatForest] = {}

    def predict_kernels(self, kernels: Sequence[Kernel]) -> float:
        """Predicted latency (ms) of a model given its detected kernels: the sum of each
        kernel's prediction by its type's regressor (a kernel of a type without one counts
        0 ms, as in nn-Meter). Each distinct kernel is predicted once per process (a forest
        costs milliseconds per call); new ones are predicted in one call per type."""
        new: Dict[str, List[Tuple[float, ...]]] = {}
        for kernel in kernels:
            key = (kernel.kernel_type, kernel.features)
            if kernel.kernel_type in self.predictors and key not in self._kernel_memo:
                new.setdefault(kernel.kernel_type, [])
                if kernel.features not in new[kernel.kernel_type]:
                    new[kernel.kernel_type].append(kernel.features)
        for kernel_type, rows in new.items():
            regressor = self.predictors[kernel_type]
            values = self._regress(kernel_type, [_as_trained(kernel_type, row, regressor)
                                                 for row in rows])
            self._kernel_memo.update({(kernel_type, row): float(value)
                                      for row, value in zip(rows, values)})
        return float(sum(self._kernel_memo.get((k.kernel_type, k.features), 0.0)
                         for k in kernels))

    def _regress(self, kernel_type: str, rows: Sequence[Sequence[float]]) -> Any:
        """The type's regressor's predictions for these feature rows; a single-output random
        forest's (all of nn-Meter's) through FlatForest: the same answer, 20-50x sooner."""
        from sklearn.ensemble import RandomForestRegressor

        regressor = self.predictors[kernel_type]
        if type(regressor) is not RandomForestRegressor or regressor.n_outputs_ != 1:
            return regressor.predict(rows)
        with self._memo_lock:
            flat = self._flat_forests.get(kernel_type)
            if flat is None:
                flat = self._flat_forests[kernel_type] = FlatForest(regressor)
        return flat.predict(rows)

    def predict_by_type(self, kernels: Sequence[Kernel]) -> Dict[str, float]:
        """The prediction split by kernel type: {type: predicted ms of its kernels}."""
        self.predict_kernels(kernels)
        split: Dict[str, float] = {}
        for kernel in kernels:
            value = self._kernel_memo.get((kernel.kernel_type, kernel.features))
            if value is not None:
                split[kernel.kernel_type] = split.get(kernel.kernel_type, 0.0) + value
        return split

    def kernels(self, onnx_bytes: Union[bytes, Callable[[], bytes]],
                key: Optional[str] = None) -> List[Kernel]:
        """The kernels found in a model under these fusion rules (harness.predict.kernels), memoized
        by `key` when it is given: what identifies the graph, weights aside (an exported
        model's variant_key: its graph hash, and the precision a converted variant has; not
        the graph hash alone, which a variant shares with its float source). `onnx_bytes`
        may be a function that makes them, called only when the memo does not answer."""
        if key is not None:
            with self._memo_lock:
                if key in self._detect_memo:
                    self._detect_memo.move_to_end(key)
                    return self._detect_memo[key]
        import_nn_meter()
        if callable(onnx_bytes):
            onnx_bytes = onnx_bytes()
        found = detect_kernels(onnx_for_nn_meter(onnx_bytes), str(self.fusion_rules))
        if key is not None:
            with self._memo_lock:
                self._detect_memo[key] = found
                if len(self._detect_memo) > DETECT_MEMO_SIZE:
                    self._detect_memo.popitem(last=False)
        return found

    def predict(self, onnx_bytes: bytes, key: Optional[str] = None) -> float:
        """Predicted latency (ms) of an ONNX model (kernels memoized by `key`, see kernels)."""
        return self.predict_kernels(self.kernels(onnx_bytes, key))

    def describe(self) -> Dict[str, str]:
        return {"name": self.name, "folder": str(self.folder), "digest": self.digest}


def _alone(piece: Piece) -> bytes:
    """A piece as a model of its own: the block alone."""
    return compose([piece]).onnx_bytes


def _signature(kernels: Sequence[Kernel]) -> List[Tuple[str, Tuple[float, ...]]]:
    """What a prediction is made of: the kernels' types and features, in a fixed order."""
    return sorted((kernel.kernel_type, kernel.features) for kernel in kernels)


def _as_trained(kernel_type: str, features: Sequence[float], regressor: Any) -> List[float]:
    """A kernel's features as its regressor was trained on them: nn-Meter's builder trains
    concat without the input count its predictor computes (official concat predictors have
    it), so a built one gets the row without it."""
    row = list(features)
    if kernel_type == "concat" and getattr(regressor, "n_features_in_", len(row)) == len(row) - 1:
        del row[1]
    return row


def onnx_for_nn_meter(onnx_bytes: bytes) -> onnx.ModelProto:
    """The model as nn-Meter's ONNX converter can read it: `Constant` nodes become
    initializers (it expects every node to have shapes), and `Identity` nodes that only alias
    an initializer (the exporter's weight sharing) are bypassed."""
    model = onnx.load_from_string(onnx_bytes)
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    aliases: Dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and \
                node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
            initializers.add(tensor.name)
        elif node.op_type == "Identity" and node.input[0] in initializers:
            aliases[node.output[0]] = node.input[0]
        else:
            kept.append(node)
    for node in kept:
        for index, name in enumerate(node.input):
            if name in aliases:
                node.input[index] = aliases[name]
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _folder_digest(folder: Path) -> str:
    hasher = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".pkl", ".json"):
            hasher.update(path.name.encode() + b"\0" + path.read_bytes())
    return hasher.hexdigest()


def load_predictor(predictor: Union[str, Path]) -> KernelPredictors:
    """Load an nn-Meter predictor: a folder path (see is_predictor_path), or the name of an
    official predictor placed in nn-Meter's data folder (a folder of that name elsewhere, the
    current folder included, is never used for a name). Never downloads; a missing or broken
    file is a PredictorError that says which file and where it belongs. The pickles are
    loaded by harness.predict.sklearn_pickle, which refuses anything but scikit-learn regressors."""
    import_nn_meter()
    expected: List[str] = []
    where_from = "rebuild it with 'harness calibrate'"
    if is_predictor_path(predictor):
        folder = Path(predictor).expanduser()
        name = folder.name
        if not folder.is_dir():
            raise PredictorError(f"predictor folder {folder} does not exist",
                                 fix="pass an existing folder, or the name of an official "
                                     "nn-Meter predictor")
    else:
        name = str(predictor)
        official = official_predictors()
        if name not in official:
            raise PredictorError(f"unknown nn-Meter predictor {name!r}",
                                 fix="use one of " + ", ".join(sorted(official)) +
                                     ", or a folder path (./NAME for one in the current "
                                     "folder)")
        folder = nn_meter_data_folder() / name
        expected = list(official[name]["kernel_predictors"])
        where_from = (f"download {official[name]['download']} on a machine with internet "
                      f"access and unzip it into {folder.parent} (harness never downloads)")
        if Path(name).is_dir() and not folder.is_dir():
            where_from += (f"; the folder {name} in the current folder is not used for a "
                           f"predictor name: pass ./{name} if you mean it and trust its files")
    missing = [f"{kernel}.pkl" for kernel in expected if not (folder / f"{kernel}.pkl").is_file()]
    if not (folder / FUSION_RULES).is_file():
        missing.append(FUSION_RULES)
    pickles = sorted(folder.glob("*.pkl")) if folder.is_dir() else []
    if missing or not pickles:
        raise PredictorError(f"nn-Meter predictor {name!r} is incomplete in {folder}: missing "
                             + (", ".join(missing) if missing else "kernel predictors (*.pkl)"),
                             fix=where_from)
    try:
        rules = json.loads((folder / FUSION_RULES).read_text())
        if not isinstance(rules, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise PredictorError(f"{folder / FUSION_RULES} is not valid fusion rules ({exc})",
                             fix=where_from) from None
    kernels = {}
    for path in pickles:
        try:
            kernels[path.stem] = load_kernel_predictor(path)
        except UnsafePickleError as exc:
            raise PredictorError(exc.message, fix=exc.fix) from None
        except LegacyPickleError as exc:
            raise PredictorError(str(exc), fix=where_from) from None
    log.info("nn-Meter predictor %s: %d kernel predictors from %s", name, len(kernels), folder)
    return KernelPredictors(name, folder, kernels, folder / FUSION_RULES, _folder_digest(folder))


class NnMeterProfiler(Profiler):
    """Predicted latency (ms) of samples of `space`, by an nn-Meter predictor.

    predictor: the name of an official nn-Meter predictor placed in nn-Meter's data folder,
        or a predictor folder (one `harness calibrate` built, say).
    calibration: a harness.campaigns.calibrate.Calibration whose correction is applied to every
        prediction (the one `harness calibrate` stored for a device), or None for nn-Meter's
        raw prediction.
    Results are `Measurement`s with source "predicted" that name the predictor and the
    calibration; they are kept in memory only, never in the measurement cache.
    """

    def __init__(self, space: ModelSpace, dummy_input: DummyInput,
                 predictor: Union[str, Path, KernelPredictors, None] = None,
                 calibration: Any = None, device: str = "nn-meter"):
        if predictor is None and calibration is None:
            raise PredictorError("NnMeterProfiler needs a predictor or a calibration",
                                 fix="pass predictor='cortexA76cpu_tflite21' (placed in "
                                     "nn-Meter's data folder) or a calibration")
        if predictor is None:
            predictor = calibration.predictor_folder
        self.space = space
        self.device = device
        self.calibration = calibration
        self.predictor = (predictor if isinstance(predictor, KernelPredictors)
                          else load_predictor(predictor))
        self._validate = SampleValidator(checked_search_space(space))
        self._dummy_input = dummy_input
        self.input_signature = input_signature(dummy_input)
        self._memo: Dict[tuple, Measurement] = {}
        # Composed subnets (harness.export.compose) are predicted from their pieces' kernels once
        # PIECE_CHECKS of them gave exactly their whole graph's; None: not yet decided.
        self._pieces_agree: Optional[bool] = None
        self._pieces_checked = 0
        self._lock = threading.Lock()

    def profile(self, sample: Mapping[str, Any]) -> float:
        """The predicted latency (ms) of one sample."""
        return self.measure(sample).median

    def measure(self, sample: Mapping[str, Any]) -> Measurement:
        """The prediction as a Measurement with source "predicted"."""
        canonical = self._validate(sample)
        memo_key = tuple(canonical.values())
        if memo_key not in self._memo:
            self._memo[memo_key] = self.predict_exported(
                export_sample(self.space, canonical, self._dummy_input))
        return self._memo[memo_key]

    def kernels_of(self, exported: ExportedModel) -> List[Kernel]:
        """The model's kernels. A subnet composed from per-block pieces is a chain of blocks,
        and nn-Meter fuses nothing across the border of two (a block ends in a convolution,
        its BatchNorm or an add, and begins with a convolution): its kernels are its pieces'
        kernels, each piece detected once. That is checked, not assumed: the first
        PIECE_CHECKS composed subnets are also detected whole, and one disagreement (as
        kernel types and features: what a prediction is made of) turns the shortcut off."""
        def whole() -> List[Kernel]:
            return self.predictor.kernels(exported.onnx_bytes, exported.variant_key)

        if not exported.pieces or exported.variant or self._pieces_agree is False:
            return whole()
        joined = [kernel for piece in exported.pieces
                  for kernel in self.predictor.kernels(functools.partial(_alone, piece),
                                                       f"piece:{piece.key.digest}")]
        if self._pieces_agree is None:
            reference = whole()
            with self._lock:
                if _signature(joined) != _signature(reference):
                    self._pieces_agree = False
                    log.info("%s: its pieces' kernels differ from its whole graph's under %s; "
                             "predicting whole graphs", type(self.space).__name__,
                             self.predictor.name)
                    return reference
                self._pieces_checked += 1
                if self._pieces_checked >= PIECE_CHECKS:
                    self._pieces_agree = True
        return joined

    def predict_exported(self, exported: ExportedModel) -> Measurement:
        """The prediction for an already exported model."""
        kernels = self.kernels_of(exported)
        if exported.variant and getattr(self.calibration, "kind", None) == "overheads":
            log.warning("the calibration's costs per kernel were fitted on float models; "
                        "this %s variant has kernels of its own (quantize, cast), so its "
                        "corrected prediction is rougher", exported.variant)
        raw_ms = self.predictor.predict_kernels(kernels)
        value = raw_ms if self.calibration is None else \
            self.calibration.correct(raw_ms, len(kernels))
        provenance = Provenance(predictor=self.predictor.describe(), uncalibrated_ms=raw_ms,
                                calibration=None if self.calibration is None
                                else self.calibration.describe())
        return Measurement(samples_ms=(value,), source="predicted", device=self.device,
                           graph_hash=exported.graph_hash,
                           input_signature=tuple(self.input_signature),
                           settings={"runtime": "nn-meter"}, provenance=provenance)


