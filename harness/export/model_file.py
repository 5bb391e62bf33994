"""Any ONNX model as harness measures it: a file (or bytes) checked, its inputs' shapes
resolved from what the user gives, and its precision variants (fp16, int8) made on the host.

A model file is data from elsewhere: it is parsed and checked with onnx before anything is
sent (a broken file is an error naming it, not a LOAD failure on a board), every symbolic
dimension must get its size from `input_shapes` (a missing one is a USER error naming the
input), and an int8-static calibration `.npz` is read without pickles.

Precision variants are converted here, on the host, with onnxruntime's own tools
(`onnxruntime.quantization.quantize_dynamic` / `quantize_static`, fp16 through
`onnxruntime.transformers.float16`), so every device measures the same bytes. A variant is
keyed by the source graph's hash plus the precision (and the calibration inputs' origin) in
the runtime settings, so a search's sample index stays valid for every variant.
"""
import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Union

import numpy as np
import onnx

from harness.errors import ExportError, InvalidArgument
from harness.export.formats import FormatTarget, content_suffix
from harness.export.formats import convert as convert_format
from harness.export.graph import ExportedModel, graph_hash
from harness.spaces.space import Sample, SampleValidator

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-static")
CALIBRATION_SAMPLES = 8  # random calibration inputs for int8-static without a .npz
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.DOUBLE: "float64", onnx.TensorProto.INT64: "int64",
               onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT8: "int8",
               onnx.TensorProto.UINT8: "uint8", onnx.TensorProto.BOOL: "bool"}

ModelSource = Union[str, Path, bytes]


@dataclass(frozen=True)
class ModelInput:
    """One graph input: its name, dims as the model declares them (int, or a symbol's name
    for a dynamic axis) and numpy dtype."""

    name: str
    dims: tuple
    dtype: str


@dataclass(frozen=True)
class ModelFile:
    """A checked ONNX model: its bytes, graph hash, inputs, and where it came from."""

    onnx_bytes: bytes
    graph_hash: str
    inputs: tuple
    origin: str
    suffix: str = ".onnx"  # .tflite or .pte: a model for LiteRT or ExecuTorch as it is

    def exported(self) -> ExportedModel:
        return ExportedModel(self.onnx_bytes, self.graph_hash, suffix=self.suffix)

    def describe_inputs(self) -> str:
        """The inputs as a user reads them: each name with its dims, static ones as numbers
        and dynamic ones by their symbol (`input [N, 3, H, W]`)."""
        return ", ".join(f"{i.name} [{', '.join(map(str, i.dims))}]" for i in self.inputs)

    def check_names(self, given: Mapping[str, object]) -> None:
        """InvalidArgument when `given` names an input the model does not have (a typo would
        otherwise read as a size never given)."""
        names = [i.name for i in self.inputs]
        stray = sorted(set(given) - set(names))
        if stray:
            raise InvalidArgument(f"--input-shape names {', '.join(stray)}, which {self.origin} has "
                             f"no input of; its inputs are {self.describe_inputs()}",
                             fix=" ".join(f"--input-shape {i.name}={example_shape(i.dims)}"
                                          for i in self.inputs))

    def resolved_shapes(self, given: Optional[Mapping[str, Sequence[int]]]) -> Dict[str, List[int]]:
        """Every input's concrete shape: its static dims, with `given` for the dynamic ones
        (and for static ones it repeats). InvalidArgument names an input left unsized, a name the
        model does not have, or a size that contradicts the model, with the model's inputs
        and a realistic shape to type."""
        given = {name: list(dims) for name, dims in (given or {}).items()}
        self.check_names(given)
        shapes: Dict[str, List[int]] = {}
        for item in self.inputs:
            shape = given.get(item.name)
            dynamic = [d for d in item.dims if not isinstance(d, int)]
            fix = f"--input-shape {item.name}={example_shape(item.dims)}"
            if shape is None:
                if dynamic:
                    raise InvalidArgument(f"input {item.name!r} of {self.origin} has dynamic axes "
                                     f"{', '.join(map(str, dynamic))} and no size was given for "
                                     f"it; the model's inputs are {self.describe_inputs()}",
                                     fix=fix)
                shape = list(item.dims)
            elif len(shape) != len(item.dims) or any(
                    isinstance(d, int) and d != s for d, s in zip(item.dims, shape)) or \
                    any(s < 1 for s in shape):
                raise InvalidArgument(f"input {item.name!r} of {self.origin} is "
                                 f"[{', '.join(map(str, item.dims))}], which "
                                 f"{'x'.join(map(str, shape))} does not fit; the model's inputs "
                                 f"are {self.describe_inputs()}", fix=fix)
            shapes[item.name] = [int(s) for s in shape]
        return shapes

    def signature(self, shapes: Mapping[str, Sequence[int]]) -> List[Dict[str, Any]]:
        """The input signature (part of the cache key) at these shapes."""
        return [{"name": i.name, "shape": list(shapes[i.name]), "dtype": i.dtype}
                for i in self.inputs]


def example_shape(dims: Sequence[Union[int, str]]) -> str:
    """A realistic shape to suggest for an input declared with `dims`: its static dims as
    they are; a dynamic first axis (the batch) 1; the last two dynamic axes of a 4-D input
    (an image's height and width) 224; any other dynamic axis 128 (a sequence's length)."""
    shape = []
    for position, dim in enumerate(dims):
        if isinstance(dim, int):
            shape.append(dim)
        elif position == 0:
            shape.append(1)
        elif len(dims) == 4 and position >= 2:
            shape.append(224)
        else:
            shape.append(128)
    return "x".join(map(str, shape))


def load_model(source: ModelSource) -> ModelFile:
    """Read and check a model (a path or its bytes): ONNX, or a .tflite / .pte file for
    LiteRT / ExecuTorch. ExportError names a file that is missing, not ONNX, fails onnx's
    checker, or whose extension and content disagree."""
    origin = "the model bytes" if isinstance(source, bytes) else str(source)
    if isinstance(source, bytes):
        data = source
    else:
        path = Path(source)
        if not path.is_file():
            raise ExportError(f"model file {path} does not exist or is not a file",
                              fix="pass the path of an .onnx, .tflite or .pte file")
        data = path.read_bytes()
    found = content_suffix(data)
    named = None if isinstance(source, bytes) else Path(source).suffix.lower()
    if named in (".tflite", ".pte", ".onnx") and found != named and \
            (found is not None or named != ".onnx"):  # unknown bytes in .onnx: onnx says why
        raise ExportError(f"model file {origin} is named {named} but its content is "
                          f"{found or 'no model format harness knows'}: refused",
                          fix=f"rename it to its format's extension, or pass the real {named} file")
    if found in (".tflite", ".pte"):  # its inputs are the runtime's to read, on the device
        return ModelFile(data, "sha256:" + hashlib.sha256(data).hexdigest(), (), origin, found)
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as exc:
        raise ExportError(f"{origin} is not a valid ONNX model: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}",
                          fix="export it again (torch.onnx.export) or check it with "
                              "onnx.checker.check_model") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0
                     else (d.dim_param or "?") for d in tensor.shape.dim)
        inputs.append(ModelInput(value.name, dims, ONNX_DTYPES.get(tensor.elem_type, "float32")))
    if not inputs:
        raise ExportError(f"{origin} has no graph inputs to feed",
                          fix="measure a model that takes at least one input")
    return ModelFile(data, graph_hash(data), tuple(inputs), origin)


class ModelFilesOnly:
    """The stand-in space of a LatencyProfiler made for model files (space=None), so that its
    plumbing of samples has something to hold; `NoSamples` refuses every sample first."""

    def search_space(self) -> Dict[str, List[str]]:
        return {"model": ["file"]}

    def freeze(self, sample: Mapping[str, Any]) -> Any:
        raise NoSamples.refusal()


class NoSamples(SampleValidator):
    """The sample check of a profiler of model files: every sample is refused, saying why."""

    def __init__(self) -> None:
        super().__init__(ModelFilesOnly().search_space())

    @staticmethod
    def refusal() -> InvalidArgument:
        return InvalidArgument("this LatencyProfiler was made without a space (for model files)",
                          fix="measure models with measure_model(path), or pass a space")

    def __call__(self, sample: Mapping[str, Any]) -> Sample:
        raise self.refusal()


# ---------------------------------------------------------------- precision variants

@dataclass(frozen=True)
class Precision:
    """What a profiler converts its models to before sending them, and its settings (the
    precision and, for int8-static, the calibration inputs' origin: keyed)."""

    name: str = "fp32"
    calibration: Union[str, Path, None] = None  # int8-static: an .npz of inputs, or random
    # the runtime the models are for, with its backend (harness.export.formats)
    target: FormatTarget = FormatTarget()

    @classmethod
    def of(cls, name: str, calibration: Union[str, Path, None], runtime: Optional[str],
           settings: Optional[Mapping[str, Any]]) -> "Precision":
        """The precision of a profiler, for `runtime` (else its settings', else
        onnxruntime); InvalidArgument when the runtime does not exist or its converter does
        not make that precision."""
        settings = settings or {}
        target = FormatTarget(runtime or settings.get("runtime") or "onnxruntime", name,
                              settings.get("backend"), bool(settings.get("require_backend"))
                              ).check()
        if target.converts and calibration is not None:
            raise InvalidArgument(f"an int8-static calibration .npz is used by the ONNX "
                                  f"runtimes' quantizer; {target.runtime}'s quantizer calibrates "
                                  f"on random inputs from seed 0",
                                  fix="drop --calibration, or use --runtime onnxruntime|openvino")
        return cls(name, calibration, target)

    def settings(self) -> Dict[str, Any]:
        """The agent settings that record (and key) this precision and runtime;
        InvalidArgument if unknown."""
        return {"precision": check_precision(self.name), "runtime": self.target.runtime,
                "calibration": calibration_label(self.name, self.calibration)}

    def convert(self, exported: ExportedModel, shapes: Mapping[str, Sequence[int]],
                module: Optional[Callable[[], Any]] = None, dummy_input: Any = None,
                home: Optional[Path] = None) -> ExportedModel:
        """The model as the runtime loads it at this precision: ONNX converted by
        onnxruntime's tools for the ONNX runtimes, else `module()` converted by the
        runtime's converter (harness.export.formats); a model already in the runtime's
        format passes as it is."""
        if exported.suffix == self.target.suffix:
            if not self.target.converts:
                return convert(exported, self.name, shapes, self.calibration)
            return exported
        if exported.suffix != ".onnx" or module is None:
            raise InvalidArgument(f"a {exported.suffix} model cannot be converted for "
                                  f"{self.target.runtime}, which loads {self.target.suffix}",
                                  fix=f"pass a {self.target.suffix} file, or a model space")
        return convert_format(exported, self.target, module, dummy_input, home)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InvalidArgument(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}",
                         fix=f"--precision {PRECISIONS[0]}")
    return precision


def calibration_label(precision: str, npz: Union[str, Path, None]) -> Optional[str]:
    """What int8-static calibrates on, for the cache key: the .npz's sha256, or random
    inputs from a seed. None for the other precisions."""
    if precision != "int8-static":
        if npz is not None:
            raise InvalidArgument("a calibration .npz is only used by --precision int8-static",
                             fix="drop --calibration, or pass --precision int8-static")
        return None
    if npz is None:
        return f"random:{CALIBRATION_SAMPLES}:seed0"
    path = Path(npz)
    if not path.is_file():
        raise InvalidArgument(f"calibration file {path} does not exist",
                         fix="pass an .npz with one array per model input")
    return "npz:" + hashlib.sha256(path.read_bytes()).hexdigest()


class _Calibration:
    """onnxruntime.quantization's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: List[Dict[str, np.ndarray]]):
        self._feeds: Iterator[Dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> Optional[Dict[str, np.ndarray]]:
        return next(self._feeds, None)


def calibration_feeds(model: ModelFile, shapes: Mapping[str, Sequence[int]],
                      npz: Union[str, Path, None]) -> List[Dict[str, np.ndarray]]:
    """Inputs for int8-static calibration: from the .npz (one array per input name, shaped
    like the input or with a leading axis of samples; read without pickles), else
    CALIBRATION_SAMPLES random normal inputs from seed 0."""
    if npz is None:
        rng = np.random.RandomState(0)
        return [{i.name: rng.standard_normal(shapes[i.name]).astype(i.dtype)
                 for i in model.inputs} for _ in range(CALIBRATION_SAMPLES)]
    try:
        with np.load(str(npz), allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except Exception as exc:
        raise InvalidArgument(f"calibration file {npz} is not a readable .npz of arrays: {exc}",
                         fix="write it with numpy.savez(path, **{input_name: array})") from None
    feeds: List[Dict[str, np.ndarray]] = []
    for item in model.inputs:
        array, shape = arrays.get(item.name), list(shapes[item.name])
        if array is None:
            raise InvalidArgument(f"calibration file {npz} has no array {item.name!r} (it has "
                             f"{', '.join(arrays) or 'none'})",
                             fix=f"add an array named {item.name} of shape {shape} or [N]+{shape}")
        if list(array.shape) == shape:
            array = array[None]
        if list(array.shape[1:]) != shape:
            raise InvalidArgument(f"calibration array {item.name!r} has shape {list(array.shape)}, "
                             f"not {shape} or [N]+{shape}", fix="reshape it to the input's shape")
        for index, value in enumerate(array):
            if index == len(feeds):
                feeds.append({})
            feeds[index][item.name] = value[None].astype(item.dtype) if shape[0] == 1 and \
                value.ndim == len(shape) - 1 else np.ascontiguousarray(value, dtype=item.dtype)
    return feeds


def convert(exported: ExportedModel, precision: str, shapes: Mapping[str, Sequence[int]],
            npz: Union[str, Path, None] = None) -> ExportedModel:
    """The model at `precision`, with the source's graph hash (the precision is keyed in the
    settings). ExportError when onnxruntime's converter fails, naming the precision."""
    if precision == "fp32":
        return exported
    model = load_model(exported.onnx_bytes)
    try:
        converted = _convert_bytes(model, precision, shapes, npz)
    except InvalidArgument:
        raise
    except Exception as exc:
        raise ExportError(f"converting the model to {precision} failed: {type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:300]}",
                          fix="measure it at --precision fp32, or try another variant") from None
    log.debug("%s: %d bytes at fp32, %d at %s", exported.graph_hash[:12],
              len(exported.onnx_bytes), len(converted), precision)
    return ExportedModel(converted, exported.graph_hash, export_ms=exported.export_ms,
                         variant=precision)


class _QuantizerNotices(logging.Filter):
    """onnxruntime.quantization warns through the root logger (pre-processing advice, bias
    layout); its notices go to this module's debug log instead of the user's terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "onnxruntime" in record.pathname:
            log.debug("onnxruntime.quantization: %s", record.getMessage())
            return False
        return True


def _convert_bytes(model: ModelFile, precision: str, shapes: Mapping[str, Sequence[int]],
                   npz: Union[str, Path, None]) -> bytes:
    notices = _QuantizerNotices()
    root = logging.getLogger()
    root.addFilter(notices)
    try:
        return _converted(model, precision, shapes, npz)
    finally:
        root.removeFilter(notices)


def _converted(model: ModelFile, precision: str, shapes: Mapping[str, Sequence[int]],
               npz: Union[str, Path, None]) -> bytes:
    if precision == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        proto = onnx.load_model_from_string(model.onnx_bytes)
        return convert_float_to_float16(proto, keep_io_types=True).SerializeToString()
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    onnxruntime.set_default_logger_severity(3)  # the calibration session's notices

    with tempfile.TemporaryDirectory(prefix="harness-quantize-") as folder:
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(model.onnx_bytes)
        if precision == "int8-dynamic":
            # uint8 weights: onnxruntime before 1.20 implements ConvInteger for uint8 only
            quantize_dynamic(str(source), str(target), weight_type=QuantType.QUInt8)
        else:
            quantize_static(str(source), str(target),
                            _Calibration(calibration_feeds(model, shapes, npz)),
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        return target.read_bytes()
