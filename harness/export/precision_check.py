"""What onnxruntime's CPU provider really runs of an fp16 or int8 model.

A model converted to fp16 or int8 (harness.export.model_file) is not necessarily run at that
precision: the CPU provider has no fp16 kernel for most operators, so it inserts Cast nodes
and runs them in fp32 (an fp16 model then measures as fp32 plus the casts), and an int8
static (QDQ) model keeps in fp32 every Conv/MatMul/Gemm whose DequantizeLinear -> op ->
QuantizeLinear pattern it cannot fuse into an integer kernel. A result that says "fp16" or
"int8" without saying so misleads, so this module counts those nodes from the graph
onnxruntime optimised for the CPU provider (on this host, with its onnxruntime: a device with
another release may differ) and words it as a flag for the result (stored with the
measurement by harness.steps.measuring, so that the Python API, the CLI and a cached answer
all say it).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import onnx

from harness.export.graph import ExportedModel

log = logging.getLogger(__name__)

# Nodes that carry the arithmetic of a CNN or transformer: their precision is what an fp16
# or int8 variant is about.
FLOAT_COMPUTE = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul"}
# Nodes that are bookkeeping, whatever the precision.
BOOKKEEPING = {"Cast", "Constant", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
               "Shape", "DequantizeLinear", "QuantizeLinear", "DynamicQuantizeLinear"}
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class PrecisionCheck:
    """What the CPU provider runs of a `precision` model: of `nodes` nodes that should run at
    that precision, `other` run in fp32, and it inserted `casts_inserted` Cast nodes."""

    precision: str
    nodes: int
    other: int
    casts_inserted: int

    def flag(self) -> Optional[str]:
        """The result's flag (None when everything runs at the precision asked for)."""
        if self.precision == "fp16" and (self.other or self.casts_inserted):
            return (f"fp16 ran as fp32: {self.other} of {self.nodes} nodes, "
                    f"{self.casts_inserted} casts inserted (the CPU provider has no fp16 "
                    f"kernels for them)")
        if self.precision.startswith("int8") and self.other:
            return (f"int8 partly fp32: {self.other} of {self.nodes} Conv/MatMul/Gemm nodes "
                    f"ran in fp32 (the CPU provider has no integer kernel or QDQ fusion for "
                    f"them)" + (f", {self.casts_inserted} casts inserted"
                                if self.casts_inserted else ""))
        return None


def _optimized(onnx_bytes: bytes) -> onnx.ModelProto:
    """The graph onnxruntime's CPU provider runs (extended optimisations: the fusions and
    casts, without the host-specific memory layouts of 'all')."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="harness-precision-") as folder:
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        onnxruntime.InferenceSession(onnx_bytes, options, providers=[CPU])
        return onnx.load(options.optimized_model_filepath)


@functools.lru_cache(maxsize=256)
def _checked(digest: str, onnx_bytes: bytes, precision: str) -> PrecisionCheck:
    source = onnx.load_model_from_string(onnx_bytes)
    optimized = _optimized(onnx_bytes)
    casts = sum(n.op_type == "Cast" for n in optimized.graph.node) - \
        sum(n.op_type == "Cast" for n in source.graph.node)
    if precision == "fp16":  # a node whose output is fp32 (after type inference) ran in fp32
        typed = onnx.shape_inference.infer_shapes(optimized)
        types = {v.name: v.type.tensor_type.elem_type
                 for v in [*typed.graph.value_info, *typed.graph.output]}
        compute = [n for n in optimized.graph.node if n.op_type not in BOOKKEEPING]
        other = sum(any(types.get(name) == onnx.TensorProto.FLOAT for name in n.output)
                    for n in compute)
        return PrecisionCheck(precision, len(compute), other, max(casts, 0))
    heavy = [n for n in optimized.graph.node if n.op_type in FLOAT_COMPUTE]
    integer = [n for n in optimized.graph.node if n.op_type.startswith("QLinear")
               or n.op_type.endswith("Integer") or n.op_type in ("QGemm", "DynamicQuantizeMatMul",
                                                                 "MatMulIntegerToFloat")]
    return PrecisionCheck(precision, len(heavy) + len(integer), len(heavy), max(casts, 0))


def check_on_cpu(converted: ExportedModel, precision: str) -> Optional[PrecisionCheck]:
    """What the CPU provider runs of `converted` (a model at `precision`); None for fp32 or
    when onnxruntime cannot load it here (the measurement itself says why)."""
    if precision == "fp32":
        return None
    try:
        return _checked(hashlib.sha256(converted.onnx_bytes).hexdigest(), converted.onnx_bytes,
                        precision)
    except Exception as exc:  # onnxruntime's own errors are plain exceptions
        log.debug("no precision check of %s: %s", converted.graph_hash[:12], exc)
        return None
