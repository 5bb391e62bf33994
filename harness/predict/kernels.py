"""Kernels of an ONNX model as nn-Meter sees them, made robust to the ops users export.

nn-Meter splits a model into the kernels a runtime fuses (conv-bn-relu, dwconv, add, ...)
and predicts each from a few features. Its ONNX path was written for the CNNs of 2021:
- its converter leaves a node without a type when a tensor shape is missing or scalar (the
  constants of an opset-17 GELU, say), and its detector then fails with KeyError('type');
- its feature code assumes NHWC images: an `add` whose second operand is a broadcast scalar
  or (N, C, 1, 1) gate fails with IndexError in `get_predict_features`, a 3-D MatMul is
  taken for a 2-D fully connected layer, a LayerNorm's ReduceMean for global pooling.

This module wraps it without touching its files:
- `detect_kernels` runs nn-Meter's converter, completes the nodes it left without a type
  (their op type and the shapes ONNX shape inference knows) and runs nn-Meter's detector;
  each kernel keeps the ONNX nodes it came from;
- `kernel_features` gives nn-Meter's own features to the kernels they describe (checked
  shapes first: 4-D images, equal-shaped operands for add, 2-D fc), and to every other kernel
  a generic set computed from its ONNX nodes: FLOPs, elements read and written, weights,
  output shape. Such a kernel's type is `generic-<op>`, its predictor is fitted with nn-Meter's
  builder like the others and stored the same way (`<type>.pkl`);
- `detect_kernels(..., cut=...)` also cuts the kernels asked for out of their model as
  one-kernel ONNX models, to measure them.
A kernel that none of this handles is a `KernelError` naming it.
"""
import dataclasses
import logging
import math
import os
import sys
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import onnx
from onnx import helper, shape_inference

from harness.errors import HarnessError

log = logging.getLogger(__name__)

NN_METER_INSTALL = ("pip install 'harness[nn-meter]' (nn-meter 2.0, and setuptools<81 for "
                    "the pkg_resources it imports)")
_NN_METER: Any = None  # the package, once imported (import_nn_meter)
_NN_METER_LOCK = threading.Lock()

GENERIC_PREFIX = "generic-"
# The generic features, as nn-Meter builder config names: MFLOPs, millions of elements read
# from outside the kernel, written, and held as weights; the output's last dimension and its
# element count (thousands), its rank.
GENERIC_FEATURES = ["MFLOPS", "IN_M", "OUT_M", "WEIGHTS_M", "OUT_LAST", "OUT_K", "OUT_RANK"]
# nn-Meter's regressor hyper-parameters for its elementwise kernels (tflite_cpu "add"), for
# the generic types, which its table does not list.
GENERIC_HYPERPARAMETERS = {"max_depth": 50, "n_estimators": 190, "min_samples_leaf": 1,
                           "min_samples_split": 2, "max_features": None, "oob_score": True,
                           "random_state": 10}


class PredictorError(HarnessError):
    """An nn-Meter predictor cannot be found, loaded or used (harness.predict.nn_meter's error; it
    lives here so that a KernelError is one)."""


class KernelError(PredictorError):
    """A kernel of a model that latency prediction cannot handle (detect, describe or cut
    out to measure); it names the kernel's op, ONNX nodes and shapes."""


@dataclass(frozen=True)
class Kernel:
    """One detected kernel: nn-Meter's description (`info`, the dict its detector gives),
    the ONNX nodes it came from, and its predictor type and features."""

    info: Dict[str, Any]
    nodes: Tuple[str, ...]
    kernel_type: str
    features: Tuple[float, ...]
    onnx_bytes: Optional[bytes] = field(default=None, repr=False, compare=False)

    @property
    def op(self) -> str:
        return str(self.info["op"])

    @property
    def generic(self) -> bool:
        return self.kernel_type.startswith(GENERIC_PREFIX)

    def describe(self) -> str:
        return (f"kernel {self.op!r} (ONNX nodes {', '.join(self.nodes)}; inputs "
                f"{self.info.get('input_tensors')})")


def _shape(value: onnx.ValueInfoProto) -> Optional[List[int]]:
    tensor = value.type.tensor_type
    if not tensor.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
    return dims if all(d >= 0 for d in dims) else None


@dataclass
class _Graph:
    """An inferred ONNX graph: nodes by name, tensor shapes (NCHW) and element types."""

    model: onnx.ModelProto
    nodes: Dict[str, onnx.NodeProto]
    shapes: Dict[str, List[int]]
    types: Dict[str, int]
    initializers: Dict[str, onnx.TensorProto]
    producers: Dict[str, str]
    consumers: Dict[str, List[str]]
    values: Dict[str, List[int]]  # graph inputs, value infos, outputs: dims as listed (0: unknown)


def _inferred(model: onnx.ModelProto) -> onnx.GraphProto:
    """ONNX shape inference of the model's graph, run on a copy without its weights: a
    weight's values never decide a shape (the small constants that can, shape tensors of a
    Reshape say, are kept), and serializing megabytes of weights for the checker cost more
    than the inference itself. The weights are declared as inputs of their shape instead;
    the answer lists them among its inputs."""
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    declared = {value.name for value in model.graph.input}
    for tensor in model.graph.initializer:
        if _numel(tensor.dims) <= SMALL_TENSOR:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    return shape_inference.infer_shapes(light).graph


def _graph(model: onnx.ModelProto) -> _Graph:
    inferred = _inferred(model)
    initializers = {t.name: t for t in model.graph.initializer}
    shapes: Dict[str, List[int]] = {}
    types: Dict[str, int] = {}
    values: Dict[str, List[int]] = {}
    for value in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        if value.name in initializers:
            continue  # a weight declared as an input for the inference
        tensor = value.type.tensor_type
        values[value.name] = [d.dim_value for d in tensor.shape.dim]
        shape = _shape(value)
        if shape is not None:
            shapes[value.name] = shape
        types[value.name] = tensor.elem_type
    for name, tensor in initializers.items():
        shapes[name], types[name] = list(tensor.dims), tensor.data_type
    producers: Dict[str, str] = {}
    consumers: Dict[str, List[str]] = {}
    for node in model.graph.node:
        for output in node.output:
            producers[output] = node.name
        for input_name in node.input:
            consumers.setdefault(input_name, []).append(node.name)
    return _Graph(model, {n.name: n for n in model.graph.node}, shapes, types, initializers,
                  producers, consumers, values)


def import_nn_meter() -> Any:
    """The nn_meter package, with its chatty stdout logger turned down to errors. Every use
    of nn-Meter imports it through here first: importing it writes its configuration under
    ~/.nn_meter, which is left to a user who set nn-Meter up; otherwise the import runs with
    HOME pointed at $HARNESS_HOME/nn-meter, so its configuration and predictor downloads land
    in harness's home and nothing is written outside it."""
    global _NN_METER
    if _NN_METER is not None:
        return _NN_METER
    with _NN_METER_LOCK:
        if _NN_METER is None:
            try:
                with warnings.catch_warnings(), _nn_meter_home():
                    # its pkg_resources import warns of a deprecation
                    warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*")
                    import nn_meter
            except ImportError as exc:  # not installed, or setuptools >= 81 (no pkg_resources)
                raise PredictorError(f"nn-Meter cannot be imported ({exc})",
                                     fix=NN_METER_INSTALL) from None
            if not log.isEnabledFor(logging.DEBUG):
                logging.getLogger("nn-Meter").setLevel(logging.ERROR)
            _NN_METER = nn_meter
    return _NN_METER


@contextmanager
def _nn_meter_home() -> Iterator[None]:
    """HOME as nn-Meter should see it while it is imported (it reads ~ then, once)."""
    if "nn_meter" in sys.modules or Path("~/.nn_meter/config").expanduser().is_dir():
        yield
        return
    from harness.paths import harness_home

    own = harness_home() / "nn-meter"
    before = os.environ.get("HOME")
    os.environ["HOME"] = str(own)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = before


def _converter(graph: _Graph) -> Any:
    """nn-Meter's ONNX converter over an already inferred graph: its own constructor infers
    shapes again and reads every tensor's shape from protobuf again (half of a detection)."""
    import_nn_meter()
    from nn_meter.ir_converter.onnx_converter import OnnxConverter

    converter = OnnxConverter.__new__(OnnxConverter)
    converter.graph = graph.model.graph
    converter.tensors = {name: {"shape": _nhwc(dims), "inputs": [], "outputs": []}
                         for name, dims in graph.values.items()}
    for node in converter.graph.node:
        for input_name in node.input:
            if input_name in converter.tensors:
                converter.tensors[input_name]["outputs"].append(node)
        for output_name in node.output:
            if output_name in converter.tensors:
                converter.tensors[output_name]["inputs"].append(node)
    return converter


def _nhwc(shape: List[int]) -> List[int]:
    return [shape[0], shape[2], shape[3], shape[1]] if len(shape) == 4 else list(shape)


def _complete(converted: Dict[str, Any], graph: _Graph) -> None:
    """Give every node nn-Meter's converter left without a type (a shape it could not read)
    its ONNX op type and the shapes that are known, so its detector can place it."""
    for name, entry in converted.items():
        attrs = entry["attr"]
        if "type" in attrs:
            continue
        node = graph.nodes[name]
        attrs["type"] = node.op_type
        attrs["attr"] = {}
        outputs = [_nhwc(graph.shapes[o]) for o in node.output if graph.shapes.get(o)]
        inputs = [_nhwc(graph.shapes[i]) for i in node.input
                  if graph.shapes.get(i) and i not in graph.initializers]
        # the detector reads the first input's last dimension: a scalar one has none
        attrs["input_shape"] = inputs or outputs or [[1]]
        attrs["output_shape"] = outputs or [[1]]


def _named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every node with a unique name (the detector and the cut-out go by names)."""
    seen: set = set()
    for index, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{index}"
        seen.add(node.name)
    return model


SMALL_TENSOR = 4096  # elements: shape arithmetic, not weights


def fold_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its shape arithmetic computed: `Shape` of a tensor whose shape is
    known, and every node that computes from such values and small constants only (the
    Gather / Concat / Unsqueeze chains a traced `x.shape` exports as), become initializers,
    as onnxruntime folds them before running. Without this, nn-Meter sees shapes it cannot
    read and a kernel cannot be cut out of the model."""
    from onnx.reference import ReferenceEvaluator

    small = {t.name for t in model.graph.initializer if _numel(t.dims) <= SMALL_TENSOR}
    if not any(node.op_type == "Shape" or (node.input and all(i in small for i in node.input if i))
               for node in model.graph.node):
        return model  # nothing to fold: no shape inference spent
    inferred = _inferred(model)
    shapes = {v.name: _shape(v) for v in list(inferred.input) + list(inferred.value_info)}
    graph = model.graph
    values: Dict[str, np.ndarray] = {
        t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer
        if _numel(t.dims) <= SMALL_TENSOR}
    kept, folded = [], []
    for node in graph.node:
        inputs = [i for i in node.input if i]
        results: Optional[List[np.ndarray]] = None
        if node.op_type == "Shape" and shapes.get(node.input[0]) is not None \
                and not node.attribute:
            results = [np.array(shapes[node.input[0]], dtype=np.int64)]
        elif inputs and all(i in values for i in inputs) and node.op_type not in (
                "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike"):
            try:
                single = helper.make_model(helper.make_graph(
                    [node], "fold", [], [helper.make_tensor_value_info(o, 0, None)
                                         for o in node.output]),
                    opset_imports=list(model.opset_import), ir_version=model.ir_version)
                results = [np.asarray(r) for r in ReferenceEvaluator(single).run(
                    None, {i: values[i] for i in inputs})]
            except Exception as exc:  # the reference runtime lacks an op: leave it be
                log.debug("not folding %s (%s)", node.name, exc)
                results = None
        if results is not None and all(np.asarray(r).size <= SMALL_TENSOR for r in results):
            for name, value in zip(node.output, results):
                values[name] = np.asarray(value)
                folded.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        else:
            kept.append(node)
    if not folded:
        return model
    used = {i for node in kept for i in node.input} | {o.name for o in graph.output}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(kept)
    out.graph.initializer.extend(t for t in folded if t.name in used)
    return out


def detect_kernels(model: onnx.ModelProto, fusion_rules: str,
                   cut: Optional[Callable[["Kernel"], bool]] = None) -> List[Kernel]:
    """The kernels nn-Meter's detector finds in `model` (already cleaned by
    harness.predict.nn_meter.onnx_for_nn_meter) under the fusion rules file, with their features.
    Kernels for which `cut` says so also carry themselves as a one-kernel ONNX model."""
    import_nn_meter()
    from harness.predict.fast_detector import kernel_detector

    try:
        model = _named(fold_shapes(model))
        graph = _graph(model)
        converted = _converter(graph).convert()
        _complete(converted, graph)
        detector = kernel_detector(fusion_rules)
        detector.load_graph(converted)
        infos = detector.get_kernels()
    except (KeyError, IndexError, TypeError, ValueError, AttributeError,
            onnx.onnx_cpp2py_export.shape_inference.InferenceError) as exc:  # type: ignore
        raise KernelError(f"nn-Meter's kernel detector could not read the model's graph "
                          f"({type(exc).__name__}: {exc})",
                          fix="measure this model on a device; report the model so its "
                              "ops can be handled") from None
    # The detector makes one kernel per block of nodes with a real type, in block order.
    blocks = [block for block in detector.bbs
              if [t for t in (detector.model_graph.get_node_type(n) for n in block)
                  if t and t not in ("Const", "Identity", "Placeholder")]]
    if len(blocks) != len(infos):
        raise KernelError(f"nn-Meter's detector gave {len(infos)} kernels for {len(blocks)} "
                          "node groups", fix="report the model; measure it on a device")
    constant = _constant_nodes(graph)
    kernels = []
    for info, block in zip(infos, blocks):
        nodes = tuple(n for n in block if n in graph.nodes)
        if nodes and all(n in constant for n in nodes):
            continue  # computed from weights alone: onnxruntime folds it before any run
        kernel_type, features = kernel_features(info, nodes, graph)
        kernel = Kernel(info, nodes, kernel_type, tuple(features))
        if cut is not None and nodes and cut(kernel):
            kernel = dataclasses.replace(kernel, onnx_bytes=_cut(graph, nodes))
        kernels.append(kernel)
    return kernels


def _constant_nodes(graph: _Graph) -> set:
    """Nodes whose inputs are all weights or other such nodes' outputs."""
    known = set(graph.initializers)
    constant = set()
    for node in graph.model.graph.node:
        if all(i in known for i in node.input if i):
            constant.add(node.name)
            known.update(node.output)
    return constant


# ---------------------------------------------------------------- features

def _dims(tensors: Any) -> List[List[int]]:
    return [list(t) for t in tensors or [] if isinstance(t, (list, tuple))]


def _native_applies(info: Mapping[str, Any]) -> bool:
    """Whether nn-Meter's features for this kernel describe it: the shapes it reads are the
    ones it assumes (NHWC images, 2-D fully connected inputs, equal operands)."""
    op = str(info["op"])
    inputs = _dims(info.get("input_tensors"))
    first = inputs[0] if inputs else []
    head = op.split("-")[0]
    if head in ("conv", "dwconv"):
        return len(first) == 4 and "ks" in info and "cout" in info
    if head in ("maxpool", "avgpool"):
        return len(first) == 4 and "ks" in info and "cout" in info
    if op in ("fc", "fc-relu"):
        return len(first) == 2 and "cout" in info
    if op in ("gap", "global-avgpool"):
        out = info.get("output_tensors") or []
        return len(first) == 4 and not out and "cin" in info
    if op in ("bn", "relu", "bn-relu", "hswish"):
        return len(first) in (2, 4) and "cin" in info
    if op in ("add", "add-relu"):
        return len(inputs) >= 2 and len(first) == 4 and inputs[1] == first
    if op in ("se", "concat", "split", "channelshuffle"):
        return bool(inputs) and all(len(t) == 4 for t in inputs)
    return False


def _native_features(info: Mapping[str, Any]) -> Optional[Tuple[str, List[float]]]:
    import_nn_meter()
    from nn_meter.predictor.prediction.extract_feature import get_predict_features
    from nn_meter.predictor.prediction.utils import get_kernel_name

    found = get_predict_features([dict(info)])
    if not found:
        return None
    ((op, features),) = found[0].items()
    return get_kernel_name(op), [float(f) for f in features]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _flops(node: onnx.NodeProto, graph: _Graph) -> float:
    out = graph.shapes.get(node.output[0], []) if node.output else []
    inputs = [graph.shapes.get(i, []) for i in node.input if i]
    if node.op_type in ("MatMul", "Gemm") and inputs and inputs[0]:
        return 2.0 * _numel(out) * inputs[0][-1]
    if node.op_type == "Conv" and len(inputs) > 1 and len(inputs[1]) > 2:
        return 2.0 * _numel(out) * _numel(inputs[1][1:])
    reduced = max((_numel(s) for s in inputs), default=0)
    return float(max(_numel(out), reduced))


def generic_features(nodes: Sequence[str], graph: _Graph) -> List[float]:
    """The generic features of a kernel made of these ONNX nodes (see GENERIC_FEATURES)."""
    inside = set(nodes)
    produced = {o for n in nodes for o in graph.nodes[n].output}
    read = {i for n in nodes for i in graph.nodes[n].input
            if i and i not in produced and i not in graph.initializers}
    weights = {i for n in nodes for i in graph.nodes[n].input if i in graph.initializers}
    outputs = [o for o in produced
               if any(c not in inside for c in graph.consumers.get(o, []))
               or o in {v.name for v in graph.model.graph.output}]
    out_shape = graph.shapes.get(outputs[0], []) if outputs else []
    flops = sum(_flops(graph.nodes[n], graph) for n in nodes)
    return [flops / 1e6, sum(_numel(graph.shapes.get(i, [])) for i in read) / 1e6,
            sum(_numel(graph.shapes.get(o, [])) for o in outputs) / 1e6,
            sum(_numel(graph.shapes[w]) for w in weights) / 1e6,
            float(out_shape[-1]) if out_shape else 1.0, _numel(out_shape) / 1e3,
            float(len(out_shape))]


def generic_type(op: str) -> str:
    return GENERIC_PREFIX + op.lower().replace("_", "")


def kernel_features(info: Mapping[str, Any], nodes: Sequence[str],
                    graph: _Graph) -> Tuple[str, List[float]]:
    """(predictor type, features): nn-Meter's own where they describe the kernel, else the
    generic set under type `generic-<op>`."""
    if _native_applies(info):
        try:
            native = _native_features(info)
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            log.debug("nn-Meter's features fail on %s (%s): generic ones", info["op"], exc)
            native = None
        if native is not None:
            return native
    missing = [n for n in nodes if n not in graph.nodes]
    if not nodes or missing:
        raise KernelError(f"kernel {info['op']!r} has no ONNX nodes to describe it",
                          fix="report the model; measure it on a device")
    try:
        return generic_type(str(info["op"])), generic_features(nodes, graph)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise KernelError(f"kernel {info['op']!r} (ONNX nodes {', '.join(nodes)}) cannot be "
                          f"described ({type(exc).__name__}: {exc})",
                          fix="export the model with static shapes (no dynamic axes)") from None


# ---------------------------------------------------------------- a kernel as a model

def _cut(graph: _Graph, nodes: Sequence[str]) -> bytes:
    """The kernel made of these nodes, cut out as a one-kernel ONNX model: what it reads
    from the rest of the model becomes float inputs of the same shapes, its weights and
    constants stay initializers. KernelError if it reads a tensor that is not a float image
    of known shape (an index computed at run time, say)."""
    model = graph.model
    inside = [graph.nodes[n] for n in nodes if n in graph.nodes]
    names = {n.name for n in inside}
    produced = {o for n in inside for o in n.output}
    outer = {v.name for v in graph.model.graph.output}
    inputs, initializers, outputs = [], [], []
    for name in dict.fromkeys(i for n in inside for i in n.input if i and i not in produced):
        if name in graph.initializers:
            initializers.append(graph.initializers[name])
        elif graph.types.get(name) == onnx.TensorProto.FLOAT and name in graph.shapes:
            inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT,
                                                        graph.shapes[name]))
        else:
            raise KernelError(f"kernel of ONNX nodes {', '.join(nodes)} reads {name!r}, which "
                              "is not a float tensor of known shape, so it cannot be measured "
                              "alone", fix="export the model with static shapes and constant "
                                           "folding (harness.export.graph does both)")
    for name in dict.fromkeys(o for n in inside for o in n.output):
        if name in outer or any(c not in names for c in graph.consumers.get(name, [])):
            if name not in graph.shapes:
                raise KernelError(f"kernel of ONNX nodes {', '.join(nodes)}: output {name!r} "
                                  "has no known shape", fix="export with static shapes")
            outputs.append(helper.make_tensor_value_info(
                name, graph.types.get(name, onnx.TensorProto.FLOAT), graph.shapes[name]))
    if not inputs or not outputs:
        raise KernelError(f"kernel of ONNX nodes {', '.join(nodes)} has no input or output "
                          "to measure it by", fix="report the model; measure it on a device")
    cut = helper.make_graph([n for n in graph.model.graph.node if n.name in names], "kernel",
                            inputs, outputs, initializers)
    out = helper.make_model(cut, opset_imports=list(model.opset_import),
                            ir_version=model.ir_version)
    onnx.checker.check_model(out)
    return out.SerializeToString()


# ---------------------------------------------------------------- fitting generic types

class GenericFeatureParser:
    """nn-Meter builder feature parser for the generic types (its customized-kernel hook):
    the features are the config values in GENERIC_FEATURES order."""

    def __init__(self, kernel_type: str):
        self.kernel_type = kernel_type
        self.needed_config = list(GENERIC_FEATURES)

    def get_feature_by_config(self, config_dict: Mapping[str, float]) -> List[float]:
        return [float(config_dict[name]) for name in self.needed_config]

    def get_config_by_feature(self, feature: Sequence[float]) -> Dict[str, float]:
        return dict(zip(self.needed_config, feature))


def build_generic_predictor(kernel_type: str, profiled: Dict[str, Any]) -> Any:
    """Fit a generic type's regressor with nn-Meter's builder pieces: its data reader
    (get_data_by_profiled_results) with the generic parser, and a RandomForestRegressor as its
    predictor library makes them (the hyper-parameters of its elementwise kernels)."""
    import_nn_meter()
    from nn_meter.builder.kernel_predictor_builder.predictor_builder.extract_feature import \
        get_data_by_profiled_results
    from nn_meter.builder.kernel_predictor_builder.predictor_builder.utils import \
        collect_kernel_data
    from sklearn.ensemble import RandomForestRegressor

    data = collect_kernel_data(profiled, "latency")
    features, latencies = get_data_by_profiled_results(
        kernel_type, GenericFeatureParser(kernel_type), data, predict_label="latency")
    if not features:
        raise KernelError(f"no measured kernel of type {kernel_type} to fit",
                          fix="calibrate with subnets that contain it")
    parameters = dict(GENERIC_HYPERPARAMETERS)
    parameters["oob_score"] = len(features) > 1
    return RandomForestRegressor(**parameters).fit(np.asarray(features), np.asarray(latencies))


__all__ = ["Kernel", "KernelError", "detect_kernels", "kernel_features", "fold_shapes",
           "generic_features", "build_generic_predictor", "GENERIC_FEATURES"]
