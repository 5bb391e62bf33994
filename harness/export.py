"""Subnet to ONNX, and the canonical graph hash that lets identical architectures share one
measurement.

The export uses the TorchScript exporter at a fixed opset so that the same architecture gives
the same graph. The graph hash covers what decides latency (ops, their order and wiring,
attributes, tensor shapes and types, graph inputs and outputs, opsets) and ignores what does
not: weight values and every name (including how the exporter happened to share equal
weights between layers). Integer initializers (shapes, axes, indices) and Constant
node values are hashed by value, since they are part of the architecture, not weights.
"""
import dataclasses
import hashlib
import io
import json
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import onnx
import torch
from onnx import numpy_helper

from harness.errors import ExportError
from harness.space import space_fingerprint

OPSET = 17
FREEZE_SEED = 0  # weights are drawn from a fixed seed, so a sample always gives the same bytes

_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                  onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                  onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}

DummyInput = Union[torch.Tensor, Sequence[torch.Tensor]]

# torch.onnx.export keeps its state in module globals, and freezing seeds torch's global
# generator: two at once in one process (two profilers in two threads) corrupt each other,
# so they take turns.
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExportedModel:
    """One exported subnet: its ONNX bytes, graph hash, content hash, and how long the host
    took to freeze, export and hash it (it travels with the model, so a Measurement made in
    a pool records the export time of its own model)."""

    onnx_bytes: bytes
    graph_hash: str
    sha256: str
    export_ms: Optional[float] = None


def as_input_tuple(dummy_input: DummyInput) -> Tuple[torch.Tensor, ...]:
    """The dummy input as a tuple of tensors (one tensor or a tuple/list of them)."""
    inputs = (dummy_input,) if isinstance(dummy_input, torch.Tensor) else tuple(dummy_input)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise ExportError(f"dummy input must be a tensor or a tuple of tensors, got "
                          f"{type(dummy_input).__name__}",
                          fix="pass e.g. torch.randn(1, 3, 224, 224)")
    return inputs


def input_signature(dummy_input: DummyInput) -> List[Dict[str, Any]]:
    """Shapes and dtypes of the dummy input: part of every cache key."""
    return [{"shape": list(t.shape), "dtype": str(t.dtype).replace("torch.", "")}
            for t in as_input_tuple(dummy_input)]


def exported_space_fingerprint(space: Any, signature: List[Dict[str, Any]]) -> str:
    """The fingerprint of a space, its input and this exporter: the sample index's key."""
    return space_fingerprint(space, {"inputs": signature, "opset": OPSET,
                                     "torch": torch.__version__})


def freeze(space: Any, sample: Dict[str, Any]) -> torch.nn.Module:
    """The subnet for a validated sample, with weights from a fixed seed, in eval mode."""
    with _EXPORT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(FREEZE_SEED)
        try:
            module = space.freeze(sample)
        except Exception as exc:
            raise ExportError(f"{type(space).__name__}.freeze() failed on sample {sample}: "
                              f"{type(exc).__name__}: {exc}",
                              fix="fix the space's freeze() for this sample") from exc
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"{type(space).__name__}.freeze() returned {type(module).__name__}, "
                          f"not a torch.nn.Module", fix="return the subnet as an nn.Module")
    return module.eval()


def export_onnx(module: torch.nn.Module, dummy_input: DummyInput, opset: int = OPSET) -> bytes:
    """ONNX bytes of `module` traced on `dummy_input` with the TorchScript exporter."""
    inputs = as_input_tuple(dummy_input)
    buffer = io.BytesIO()
    try:
        with _EXPORT_LOCK, warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
            torch.onnx.export(module, inputs, buffer,  # type: ignore[arg-type]
                              opset_version=opset, dynamo=False,
                              input_names=[f"input{i}" for i in range(len(inputs))],
                              do_constant_folding=True)
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {exc}",
                          fix="check that the subnet runs forward on the dummy input and uses "
                              f"ops that opset {opset} supports") from exc
    return buffer.getvalue()


def export_module(module: torch.nn.Module, dummy_input: DummyInput) -> ExportedModel:
    """Export and hash one module."""
    started = time.perf_counter()
    onnx_bytes = export_onnx(module, dummy_input)
    return ExportedModel(onnx_bytes, graph_hash(onnx_bytes), hashlib.sha256(onnx_bytes).hexdigest(),
                         export_ms=(time.perf_counter() - started) * 1e3)


def export_sample(space: Any, sample: Dict[str, Any], dummy_input: DummyInput) -> ExportedModel:
    """Freeze, export and hash one validated sample (export_ms counts the freeze too)."""
    started = time.perf_counter()
    exported = export_module(freeze(space, sample), dummy_input)
    return dataclasses.replace(exported, export_ms=(time.perf_counter() - started) * 1e3)


# ---------------------------------------------------------------- canonical graph hash

def graph_hash(model: Union[bytes, onnx.ModelProto]) -> str:
    """sha256 of the canonical form of the graph: equal for the same architecture whatever
    its weights and names, different for a different shape, op, attribute or wiring."""
    if isinstance(model, (bytes, bytearray)):
        try:
            model = onnx.load_from_string(bytes(model))
        except Exception as exc:
            raise ExportError(f"not a readable ONNX model: {exc}",
                              fix="export the model again") from exc
    canonical = {
        "opsets": sorted([o.domain, o.version] for o in model.opset_import),
        "graph": _canonical_graph(model.graph, {}),
    }
    text = json.dumps(canonical, separators=(",", ":"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _type(proto: onnx.TypeProto) -> Any:
    if proto.HasField("tensor_type"):
        dims = [d.dim_value if d.HasField("dim_value") else "?" for d in proto.tensor_type.shape.dim]
        return ["tensor", proto.tensor_type.elem_type, dims]
    return [proto.WhichOneof("value")]


def _tensor(tensor: onnx.TensorProto, by_value: bool) -> Any:
    described: List[Any] = [tensor.data_type, list(tensor.dims)]
    if by_value or tensor.data_type in _INTEGER_TYPES:
        data = numpy_helper.to_array(tensor).tobytes()
        described.append(hashlib.sha256(data).hexdigest())
    return described


def _attribute(attr: onnx.AttributeProto, names: Dict[str, str]) -> Any:
    value = onnx.helper.get_attribute_value(attr)
    if attr.type == onnx.AttributeProto.TENSOR:
        return _tensor(value, by_value=True)
    if attr.type == onnx.AttributeProto.TENSORS:
        return [_tensor(t, by_value=True) for t in value]
    if attr.type == onnx.AttributeProto.GRAPH:
        return _canonical_graph(value, names)
    if attr.type == onnx.AttributeProto.GRAPHS:
        return [_canonical_graph(g, names) for g in value]
    if attr.type in (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS,
                     onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.SPARSE_TENSORS):
        return str(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, list):
        return [v.decode(errors="replace") if isinstance(v, bytes) else v for v in value]
    return value


def _canonical_graph(graph: onnx.GraphProto, names: Dict[str, str]) -> List[Any]:
    """The graph as a list of items with every value renamed by order of first appearance."""
    initializers = {t.name: t for t in graph.initializer}
    # The exporter shares initializers that happen to be equal (say, two all-zero biases)
    # through Identity nodes, so their number depends on the weights: read each such
    # Identity's output as an initializer of its own.
    aliases = [node for node in graph.node if node.op_type == "Identity"
               and node.domain in ("", "ai.onnx") and node.input[0] in initializers]
    for node in aliases:
        initializers[node.output[0]] = initializers[node.input[0]]
    aliased = {id(node) for node in aliases}
    items: List[Any] = []

    def name(value: str) -> str:
        if value == "":  # an omitted optional input
            return ""
        if value not in names:
            names[value] = f"v{len(names)}"
            if value in initializers:
                items.append(["init", names[value], _tensor(initializers[value], by_value=False)])
        return names[value]

    for value in graph.input:
        if value.name not in initializers:
            items.append(["input", name(value.name), _type(value.type)])
    for node in graph.node:
        if id(node) in aliased:
            continue
        inputs = [name(v) for v in node.input]
        attributes = [[a.name, _attribute(a, names)]
                      for a in sorted(node.attribute, key=lambda a: a.name)]
        outputs = [name(v) for v in node.output]
        items.append(["node", node.domain, node.op_type, inputs, outputs, attributes])
    for value in graph.output:
        items.append(["output", name(value.name), _type(value.type)])
    return items
