"""Model formats per runtime: a subnet converted on the host for the runtime it ships on.

onnxruntime and OpenVINO read the ONNX export as it is. LiteRT reads a `.tflite` made by
litert-torch, ExecuTorch a `.pte` made by its own export lowered to XNNPACK (the
`harness[litert]` and `harness[executorch]` extras). Conversion starts from the frozen
module, not from the ONNX bytes, and costs seconds where composing ONNX costs milliseconds,
so converted files are kept by (graph hash, format, precision, backend) in
`$HARNESS_HOME/converted/`: a subnet converts once, and identical architectures share one
file and, the runtime being in the settings key, one measurement per runtime.

A converted model keeps its source's graph hash (the architecture's identity) and names its
format in `variant` (`tflite`, `pte`, with the precision after a `|` where not fp32), so
its `variant_key` is the format's own hash. A converter that cannot convert a subnet is a
ConversionError naming the op and the runtime, raised before any device time; nothing is
kept. For ExecuTorch, the ops XNNPACK left to the portable kernels are counted, checked
against the runtime's operator registry here on the host, and refused with
`require_backend`.
"""
import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from harness.errors import ExportError, InvalidArgument
from harness.export.graph import DummyInput, ExportedModel, as_input_tuple

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "litert", "executorch", "openvino")
# The file suffix each runtime loads (what the host converts to).
SUFFIXES: Dict[str, str] = {"onnxruntime": ".onnx", "openvino": ".onnx", "litert": ".tflite",
                            "executorch": ".pte"}
# The optional extra that brings each converter.
EXTRAS: Dict[str, str] = {"litert": "harness[litert] (litert-torch)",
                          "executorch": "harness[executorch] (executorch)"}
CONVERTED_FOLDER = "converted"
# Precisions each converter makes (int8 through the runtime's own PT2E quantizer: LiteRT's
# PT2EQuantizer, ExecuTorch's XNNPACKQuantizer; symmetric, per channel; static calibrated on
# CALIBRATION_SAMPLES random inputs from seed 0); the ONNX runtimes take every precision of
# harness.export.model_file.
INT8 = ("int8-static", "int8-dynamic")
CONVERTER_PRECISIONS: Dict[str, Tuple[str, ...]] = {"litert": ("fp32",) + INT8,
                                                     "executorch": ("fp32",) + INT8}
CALIBRATION_SAMPLES = 8
# Loggers of the converters' dependencies that warn at import about what they cannot use
# here (torchao's CUDA kernels, triton; torch's pytree deprecations): quiet while converting.
CHATTY_LOGGERS = ("torchao", "torch.utils._pytree", "absl")


class ConversionError(ExportError):
    """A converter could not convert a subnet for a runtime (an op it does not support):
    nothing was measured or kept."""


def check_runtime(runtime: str) -> str:
    """The runtime's name; InvalidArgument listing the runtimes when it does not exist."""
    if runtime not in RUNTIMES:
        raise InvalidArgument(f"runtime {runtime!r} does not exist; the runtimes are "
                              f"{', '.join(RUNTIMES)}", fix="--runtime " + " | ".join(RUNTIMES))
    return runtime


def runtime_of_file(path: str) -> Optional[str]:
    """The runtime a model file's suffix says it is for (.tflite: litert, .pte: executorch);
    None for .onnx, which onnxruntime and OpenVINO both read."""
    suffix = os.path.splitext(str(path))[1].lower()
    return {".tflite": "litert", ".pte": "executorch"}.get(suffix)


def content_suffix(data: bytes) -> Optional[str]:
    """The suffix a model's bytes belong to, from their first bytes (as the agent checks)."""
    if data[4:8] == b"TFL3":
        return ".tflite"
    if data[4:6] == b"ET" and data[6:8].isdigit():
        return ".pte"
    if data[:1] == b"\x08":
        return ".onnx"
    return None


@dataclass(frozen=True)
class FormatTarget:
    """What a profiler converts its subnets to: the runtime, its precision and backend."""

    runtime: str = "onnxruntime"
    precision: str = "fp32"
    backend: Optional[str] = None
    require_backend: bool = False

    @property
    def suffix(self) -> str:
        return SUFFIXES[self.runtime]

    @property
    def converts(self) -> bool:
        """Whether its models are converted from the module (not the ONNX export itself)."""
        return self.suffix != ".onnx"

    def check(self) -> "FormatTarget":
        """InvalidArgument for a runtime that does not exist or a precision its converter
        does not make."""
        check_runtime(self.runtime)
        made = CONVERTER_PRECISIONS.get(self.runtime)
        if made is not None and self.precision not in made:
            raise InvalidArgument(f"harness converts for {self.runtime} at {', '.join(made)} "
                                  f"only, not {self.precision}",
                                  fix="--precision fp32 (or int8-static, int8-dynamic), or "
                                      "--runtime onnxruntime|openvino for fp16")
        return self

    def variant(self) -> str:
        name = self.suffix.lstrip(".")
        return name if self.precision == "fp32" else f"{name}|{self.precision}"


@dataclass(frozen=True)
class Conversion:
    """One converted model: its bytes, how long converting took (None: from the folder),
    and, for ExecuTorch, the ops XNNPACK did not take."""

    data: bytes
    convert_ms: Optional[float]
    outside_backend: Tuple[str, ...] = ()


def convert(exported: ExportedModel, target: FormatTarget, module: Callable[[], torch.nn.Module],
            dummy_input: DummyInput, home: Optional[Path]) -> ExportedModel:
    """`exported` (ONNX) as the model `target.runtime` loads: itself for the ONNX runtimes,
    else the module (made only when the folder does not hold it) converted, kept in
    `home`/converted by graph hash. ConversionError names the op and the runtime."""
    if not target.converts:
        return exported
    variant = target.variant()
    path = _kept_path(home, exported.graph_hash, variant, target)
    data = _read_kept(path, target.suffix)
    convert_ms: Optional[float] = None
    outside = _read_outside(path) if data is not None else None
    if data is None:
        started = time.perf_counter()
        made = convert_module(module(), dummy_input, target)
        convert_ms = (time.perf_counter() - started) * 1e3
        data = made.data
        outside = made.outside_backend if target.runtime == "executorch" else None
        log.info("%s converted to %s in %.0f ms", exported.graph_hash[:12], variant, convert_ms)
        _keep(path, data)
        if target.runtime == "executorch" and path is not None:  # what XNNPACK left, kept too
            _keep(path.with_suffix(".outside.json"), json.dumps(list(outside or ())).encode())
    return dataclasses.replace(exported, onnx_bytes=data, variant=variant, suffix=target.suffix,
                               convert_ms=convert_ms, pieces=(),
                               outside_backend=None if outside is None else tuple(outside))


def _read_outside(path: Optional[Path]) -> Optional[Tuple[str, ...]]:
    """The ops a kept .pte's backend left to the portable kernels (None: not recorded)."""
    if path is None or not path.with_suffix(".outside.json").is_file():
        return None
    try:
        ops = json.loads(path.with_suffix(".outside.json").read_text())
    except (OSError, ValueError):
        return None
    return tuple(str(op) for op in ops) if isinstance(ops, list) else None


def convert_module(module: torch.nn.Module, dummy_input: DummyInput,
                   target: FormatTarget) -> Conversion:
    """Convert one module for `target.runtime` (litert: litert-torch; executorch: torch.export,
    lowered to XNNPACK unless the backend is "portable")."""
    inputs = as_input_tuple(dummy_input)
    module = module.eval()
    with _quiet(target.runtime):
        if target.runtime == "litert":
            return _to_tflite(module, inputs, target)
        if target.runtime == "executorch":
            return _to_pte(module, inputs, target)
    raise InvalidArgument(f"{target.runtime} reads ONNX; nothing to convert")


@contextlib.contextmanager
def _quiet(runtime: str) -> Iterator[None]:
    """The converters' progress lines and warnings go to this module's debug log, not the
    user's terminal (what their native code writes to the terminal itself stays there)."""
    out, err = io.StringIO(), io.StringIO()
    loggers = [logging.getLogger(name) for name in CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        chatter = (out.getvalue() + err.getvalue()).strip()
        if chatter:
            log.debug("%s converter said: %s", runtime, chatter[-2000:])


def _import_failure(runtime: str, exc: ImportError) -> ExportError:
    return ExportError(f"the {runtime} converter is not installed here ({exc})",
                       fix=f"pip install {EXTRAS[runtime]}")


def _quantized(module: torch.nn.Module, inputs: Tuple[torch.Tensor, ...], quantizer: object,
               precision: str, fold: bool) -> torch.nn.Module:
    """The module through PT2E quantization with the runtime's `quantizer`: prepared,
    calibrated (int8-static: CALIBRATION_SAMPLES random normal inputs from seed 0; dynamic
    quantization observes one run), converted."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    prepared = prepare_pt2e(torch.export.export(module, inputs).module(), quantizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(CALIBRATION_SAMPLES if precision == "int8-static" else 1):
        prepared(*(torch.randn(t.shape, generator=generator).to(t.dtype) for t in inputs))
    return convert_pt2e(prepared, fold_quantize=fold)


def _to_tflite(module: torch.nn.Module, inputs: Tuple[torch.Tensor, ...],
               target: FormatTarget) -> Conversion:
    # its TensorFlow-based converter logs through C++ to the terminal unless told not to
    # (a user's own TF_CPP_MIN_LOG_LEVEL stands)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import litert_torch
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
    except ImportError as exc:
        raise _import_failure("litert", exc) from None
    try:
        config = None
        if target.precision in INT8:
            quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
                pt2e_quantizer.get_symmetric_quantization_config(
                    is_per_channel=True, is_dynamic=target.precision == "int8-dynamic"))
            module = _quantized(module, inputs, quantizer, target.precision, fold=False)
            config = QuantConfig(pt2e_quantizer=quantizer)
        with torch.no_grad():
            edge = litert_torch.convert(module, inputs, quant_config=config)
        with tempfile.TemporaryDirectory(prefix="harness-tflite-") as folder:
            written = os.path.join(folder, "model.tflite")
            edge.export(written)
            return Conversion(Path(written).read_bytes(), None)
    except Exception as exc:
        raise _conversion_failure("litert", "litert-torch", exc) from None


def _to_pte(module: torch.nn.Module, inputs: Tuple[torch.Tensor, ...],
            target: FormatTarget) -> Conversion:
    try:
        from executorch.exir import to_edge_transform_and_lower
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.quantizer import xnnpack_quantizer
    except ImportError as exc:
        raise _import_failure("executorch", exc) from None
    try:
        if target.precision in INT8:
            quantizer = xnnpack_quantizer.XNNPACKQuantizer().set_global(
                xnnpack_quantizer.get_symmetric_quantization_config(
                    is_per_channel=True, is_dynamic=target.precision == "int8-dynamic"))
            module = _quantized(module, inputs, quantizer, target.precision, fold=True)
        with torch.no_grad():
            program = torch.export.export(module, inputs)
        partitioners = [] if target.backend == "portable" else [XnnpackPartitioner()]
        edge = to_edge_transform_and_lower(program, partitioner=partitioners)
        outside = _outside_backend(edge.exported_program().graph_module)
        data = edge.to_executorch().buffer
    except Exception as exc:
        raise _conversion_failure("executorch", "ExecuTorch's export", exc) from None
    _check_portable_ops(outside, target)
    return Conversion(bytes(data), None, tuple(outside))


def _outside_backend(graph_module: torch.fx.GraphModule) -> List[str]:
    """The ops of a lowered graph that no delegate took (left to the portable kernels)."""
    ops = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(getattr(node.target, "__name__", node.target))
        if "executorch_call_delegate" in name or name == "getitem":
            continue
        ops.append(name)
    return ops


def _check_portable_ops(outside: List[str], target: FormatTarget) -> None:
    """Ops XNNPACK left behind: an error with require_backend; one the runtime has no kernel
    for, an error always (it would fail on the device, after device time)."""
    if not outside or target.backend == "portable":
        return
    log.info("ExecuTorch: XNNPACK left %d ops to the portable kernels: %s", len(outside),
             ", ".join(sorted(set(outside))))
    if target.require_backend:
        raise ConversionError(f"XNNPACK did not take {len(outside)} ops of the subnet "
                              f"({', '.join(sorted(set(outside)))}); they would run on "
                              f"ExecuTorch's portable kernels",
                              fix="drop --require-backend to measure it so, or change the subnet")
    try:
        from executorch.runtime import Runtime
        registered = set(Runtime.get().operator_registry.operator_names)
    except Exception:  # no runtime on the host: the device's load will say
        return
    missing = sorted({op for op in outside
                      if op.split(".")[0] not in registered and op not in registered
                      and op.replace("aten.", "aten::").split(".")[0] not in registered
                      and _kernel_name(op) not in registered})
    if missing:
        others = f"; nor for {', '.join(missing[1:])}" if missing[1:] else ""
        raise ConversionError(f"runtime executorch has no kernel for op {missing[0]}, which "
                              f"XNNPACK did not take{others}",
                              fix="change the subnet, or measure it on another runtime")


def _kernel_name(op: str) -> str:
    """An edge op's name as the operator registry lists it: aten.add.Tensor -> aten::add.Tensor."""
    head, _, rest = op.partition(".")
    return f"{head}::{rest}" if rest else op


_OP_PATTERN = re.compile(r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?|tfl\.[a-z_0-9]+)")


def _conversion_failure(runtime: str, converter: str, exc: Exception) -> ConversionError:
    """ConversionError naming the op the converter's message names (else the message)."""
    text = " ".join(str(exc).split())
    match = _OP_PATTERN.search(text)
    op = f"op {match.group(1)}" if match else "an op it does not support"
    return ConversionError(f"{converter} cannot convert the subnet for runtime {runtime}: "
                           f"{op} ({type(exc).__name__}: {text[:300]})",
                           fix="change the subnet, or measure it on --runtime onnxruntime|openvino")


def _kept_path(home: Optional[Path], graph_hash: str, variant: str,
               target: FormatTarget) -> Optional[Path]:
    if home is None:
        return None
    backend = f".{target.backend}" if target.backend and target.backend != "xnnpack" else ""
    name = f"{graph_hash}.{variant.replace('|', '.')}{backend}{target.suffix}"
    return Path(home) / CONVERTED_FOLDER / name


def _read_kept(path: Optional[Path], suffix: str) -> Optional[bytes]:
    """A kept conversion, or None (absent, unreadable, or not of its format: converted again)."""
    if path is None or not path.is_file():
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if content_suffix(data) != suffix:
        log.warning("converted file %s is not a %s; converting again", path, suffix)
        return None
    return data


def _keep(path: Optional[Path], data: bytes) -> None:
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".part")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except OSError as exc:  # a read-only home converts again next time
        log.warning("cannot keep converted model %s: %s", path, exc)
