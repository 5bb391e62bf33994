"""Subnet to ONNX, and the canonical graph hash that lets identical architectures share one
measurement.

The export uses the TorchScript exporter at a fixed opset so that the same architecture gives
the same graph. The graph hash covers what decides latency (ops, their order and wiring,
attributes, tensor shapes and types, graph inputs and outputs, opsets) and ignores what does
not: weight values and every name (including how the exporter happened to share equal
weights between layers). Integer initializers (shapes, axes, indices) and Constant
node values are hashed by value, since they are part of the architecture, not weights.

Two paths lead to the ONNX bytes. A space that declares per-block terms (harness.spaces.additive)
has its subnets composed from blocks exported once each (harness.export.compose: milliseconds
instead of a whole-model export's hundreds); every other space is frozen and exported whole.
For such spaces the composed graph owns the hash, and its hash is the whole-model export's
hash of the same sample (the same ops, attributes, shapes and wiring; only names and how
equal weights are shared differ, which the hash ignores), so either path finds the other's
measurements. Weights are drawn per block, from a seed of the block's key (see freeze()),
so both paths give the same weights and compute the same function.
"""
import dataclasses
import functools
import hashlib
import io
import json
import logging
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import onnx
import torch
from onnx import numpy_helper

from harness.spaces.additive import AdditiveTerm, Block, chosen_blocks, distinct_blocks
from harness.export.compose import PIECES_FOLDER, Piece, PieceKey, PieceStore, compose, piece_store
from harness.errors import ExportError, HomeError
from harness.paths import harness_home
from harness.spaces.space import space_fingerprint

OPSET = 17
FREEZE_SEED = 0  # weights are drawn from fixed seeds, so a sample always gives the same bytes

_INTEGER_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                  onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                  onnx.TensorProto.UINT32, onnx.TensorProto.UINT64, onnx.TensorProto.BOOL}

DummyInput = Union[torch.Tensor, Sequence[torch.Tensor]]

log = logging.getLogger(__name__)

# torch.onnx.export keeps its state in module globals, and freezing seeds torch's global
# generator: two at once in one process (two profilers in two threads) corrupt each other,
# so they take turns.
_EXPORT_LOCK = threading.Lock()


@dataclass(frozen=True)
class ExportedModel:
    """One exported subnet: its ONNX bytes, graph hash, content hash, and how long the host
    took to freeze, export and hash it (it travels with the model, so a Measurement made in
    a pool records the export time of its own model). The content hash (sha256) is computed
    when first asked for: only a model that goes to a device needs it, and it costs ~1 ms per
    MB, as much as composing the model."""

    onnx_bytes: bytes
    graph_hash: str
    export_ms: Optional[float] = None
    # "" for the model as exported; what it was converted to (a precision, say) when its
    # bytes are a variant that keeps the source's graph hash (harness.export.model_file.convert)
    variant: str = ""
    # the pieces a composed model was spliced from, in order (harness.export.compose); else ()
    pieces: Tuple[Piece, ...] = dataclasses.field(default=(), compare=False, repr=False)
    # the file suffix of the bytes' format (".tflite", ".pte" for a runtime's conversion,
    # harness.export.formats) and how long converting took (None: no conversion, or kept)
    suffix: str = ".onnx"
    convert_ms: Optional[float] = None
    # ExecuTorch: the ops its backend (XNNPACK) left to the portable kernels, as the host's
    # lowering found them (None: not known, as for the other formats)
    outside_backend: Optional[Tuple[str, ...]] = dataclasses.field(default=None, compare=False)

    @property
    def variant_key(self) -> str:
        """The graph hash and the variant: which graph these bytes are, without hashing
        them (different weights of one architecture share it)."""
        return f"{self.graph_hash}|{self.variant}" if self.variant else self.graph_hash

    @functools.cached_property
    def sha256(self) -> str:
        return hashlib.sha256(self.onnx_bytes).hexdigest()


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


def freeze(space: Any, sample: Dict[str, Any],
           dummy_input: Optional[DummyInput] = None) -> torch.nn.Module:
    """The subnet for a validated sample, with weights from fixed seeds, in eval mode.

    A space with per-block terms (see composable_terms; the input shape is the dummy input's,
    else the space's own dummy_input()'s) is built here as the chain of the blocks the sample
    picks, each block's weights drawn from block_seed(its key): the composing export makes
    each block alone, so a seed shared by the whole model would give a block weights that
    depend on what was built before it; seeded by its own key, a block has the same weights
    whichever path built it, and the composed and whole-model exports agree. Other spaces are
    frozen by their own freeze() with torch seeded once with FREEZE_SEED."""
    if dummy_input is None and callable(getattr(space, "additive_terms", None)) \
            and callable(getattr(space, "dummy_input", None)):
        dummy_input = space.dummy_input()
    terms = composable_terms(space, dummy_input) if dummy_input is not None else None
    if terms is not None:
        blocks = chosen_blocks(terms, sample)
        return torch.nn.Sequential(*[build_block(block) for block in blocks]).eval()
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


def composable_terms(space: Any, dummy_input: DummyInput) -> Optional[List[AdditiveTerm]]:
    """The space's per-block terms at the dummy input's shape, when it declares them and the
    input is one float32 tensor (what blocks are exported with); None otherwise, and the
    space is frozen and exported whole."""
    composable = _composable(space, dummy_input)
    return composable.terms if composable is not None else None


@dataclass(frozen=True)
class _Composable:
    """A space's terms at one input shape, and the space's fingerprint: block keys are unique
    within a space only (two spaces may both have a "stem" at 32 px), so it is part of
    every piece's key."""

    shape: Tuple[int, ...]
    config: Any
    terms: List[AdditiveTerm]
    space_fingerprint: str


# The terms of each space at its latest input shape and config (building them costs a few ms
# for ProxylessSpace, a third of a composed export; the fingerprint reads the space's source).
_COMPOSABLE: "weakref.WeakKeyDictionary[Any, _Composable]" = weakref.WeakKeyDictionary()


def _composable(space: Any, dummy_input: DummyInput) -> Optional[_Composable]:
    terms_of = getattr(space, "additive_terms", None)
    inputs = as_input_tuple(dummy_input)
    if not callable(terms_of) or len(inputs) != 1 or inputs[0].dtype != torch.float32:
        return None
    shape = tuple(inputs[0].shape)
    config = space.config() if callable(getattr(space, "config", None)) else None
    try:
        remembered = _COMPOSABLE.get(space)
    except TypeError:  # a space that cannot be weakly referenced or hashed: asked every time
        remembered = None
    if remembered is not None and remembered.shape == shape and remembered.config == config:
        return remembered if remembered.terms else None
    try:
        terms = list(terms_of(shape))
    except Exception as exc:
        raise ExportError(f"{type(space).__name__}.additive_terms({shape}) failed: "
                          f"{type(exc).__name__}: {exc}",
                          fix="fix the space's additive_terms() for this input shape") from exc
    if not terms:
        return None
    if not _terms_build_what_freeze_builds(space, terms, inputs[0]):
        log.warning("%s: its freeze() builds something other than the chain of its "
                    "additive_terms() blocks; its subnets are exported whole (slower), never "
                    "composed", type(space).__name__)
        terms = []  # remembered: not composable
    composable = _Composable(shape, config, terms, space_fingerprint(space, {"input_shape": shape}))
    try:
        _COMPOSABLE[space] = composable
    except TypeError:
        pass
    return composable if composable.terms else None


VERIFIED_SAMPLES = 2  # samples on which a space's freeze() must match its blocks' chain


def _terms_build_what_freeze_builds(space: Any, terms: List[AdditiveTerm],
                                    dummy: torch.Tensor) -> bool:
    """Whether the space's own freeze() computes what the chain of its blocks computes, on a
    few random samples: the chain's weights loaded into freeze()'s module (their parameters
    and buffers must match by name and shape), the same output on the dummy input. Composing
    is only safe then: a space whose terms describe another model (a head freeze() adds, a
    forward that does more) would otherwise be measured as the wrong model. Once per space
    and input shape."""
    from harness.spaces.space import random_samples

    try:
        for sample in random_samples(space, VERIFIED_SAMPLES, seed=20261127):
            chain = torch.nn.Sequential(*[build_block(b) for b in chosen_blocks(terms, sample)])
            with _EXPORT_LOCK, torch.random.fork_rng(devices=[]):
                own = space.freeze(sample)
            mine, theirs = chain.state_dict(), own.state_dict()
            if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape
                                                   for k in mine):
                return False
            own.load_state_dict(mine)
            with torch.no_grad():
                if not torch.allclose(chain.eval()(dummy), own.eval()(dummy), rtol=1e-4,
                                      atol=1e-5):
                    return False
    except Exception as exc:  # a space's own code: what cannot be checked is not composed
        log.warning("%s: cannot check its blocks against freeze() (%s: %s)",
                    type(space).__name__, type(exc).__name__, exc)
        return False
    return True


def block_seed(key: str) -> int:
    """The seed of one block's weights: a function of FREEZE_SEED and the block's key only."""
    return int.from_bytes(hashlib.sha256(f"{FREEZE_SEED}|{key}".encode()).digest()[:8], "big") >> 1


def build_block(block: Block) -> torch.nn.Module:
    """One block of an additive space, its weights drawn from block_seed(block.key)."""
    with _EXPORT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(block_seed(block.key))
        try:
            module = block.build()
        except Exception as exc:
            raise ExportError(f"building block {block.key} failed: {type(exc).__name__}: {exc}",
                              fix="fix the space's additive_terms() for this block") from exc
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"block {block.key} built a {type(module).__name__}, not a "
                          f"torch.nn.Module", fix="return the block as an nn.Module")
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
    return ExportedModel(onnx_bytes, graph_hash(onnx_bytes),
                         export_ms=(time.perf_counter() - started) * 1e3)


def export_sample(space: Any, sample: Dict[str, Any], dummy_input: DummyInput, *,
                  home: Union[str, Path, None] = None) -> ExportedModel:
    """Freeze, export and hash one validated sample (export_ms counts the freeze too).

    A space with per-block terms is composed from block pieces (kept in memory and in
    `home`'s pieces folder, default $HARNESS_HOME); other spaces are exported whole."""
    started = time.perf_counter()
    composable = _composable(space, dummy_input)
    if composable is None:
        exported = export_module(freeze(space, sample, dummy_input), dummy_input)
    else:
        store = _store(home)
        composed = compose([_piece(store, block, composable.space_fingerprint)
                            for block in chosen_blocks(composable.terms, sample)])
        exported = ExportedModel(composed.onnx_bytes, composed_graph_hash(composed.pieces),
                                 pieces=composed.pieces)
    return dataclasses.replace(exported, export_ms=(time.perf_counter() - started) * 1e3)


def prepare_pieces(space: Any, dummy_input: DummyInput, *,
                   home: Union[str, Path, None] = None) -> int:
    """Export every candidate block of a space with per-block terms once (into memory and
    `home`'s pieces folder), so that every subnet after it composes in milliseconds; the
    number of blocks. 0 for a space that is exported whole."""
    composable = _composable(space, dummy_input)
    if composable is None:
        return 0
    store = _store(home)
    return len([_piece(store, block, composable.space_fingerprint)
                for block in distinct_blocks(composable.terms)])


def _store(home: Union[str, Path, None]) -> PieceStore:
    """The piece store of the home folder's pieces folder (memory only if there is none)."""
    try:
        folder: Optional[Path] = harness_home(home) / PIECES_FOLDER
    except HomeError as exc:
        log.warning("%s; block pieces stay in memory", exc.message)
        folder = None
    return piece_store(folder)


def _piece(store: PieceStore, block: Block, space: str) -> Piece:
    """One block's piece: exported alone, with the weights freeze() gives it."""
    key = PieceKey(space, block.key, tuple(block.input_shape), OPSET, torch.__version__,
                   block_seed(block.key))
    return store.piece(key, lambda: export_onnx(build_block(block), torch.zeros(block.input_shape)))


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


def _canonical_graph(graph: onnx.GraphProto, names: Dict[str, str], ends: bool = True) -> List[Any]:
    """The graph as a list of items with every value renamed by order of first appearance
    (`ends`=False: without the items of the graph's inputs and outputs)."""
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

    for value in graph.input if ends else ():
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
    for value in graph.output if ends else ():
        items.append(["output", name(value.name), _type(value.type)])
    return items


# ---------------------------------------------------------------- the hash of a composed graph

@dataclass(frozen=True)
class _CanonicalPiece:
    """A piece's canonical items (as _canonical_graph gives them inside a composed graph) as
    JSON text around its value names: texts[i] comes before the name numbered slots[i] in
    the piece (0 is the block's input, 1.. the values it introduces), texts[-1] ends it."""

    texts: Tuple[str, ...]
    slots: Tuple[int, ...]
    introduced: int  # values named in the piece besides its input
    output: int      # the number of the block's output in the piece
    opsets: str      # the JSON of the model's opsets


_CANONICAL: Dict[PieceKey, _CanonicalPiece] = {}


def composed_graph_hash(pieces: Sequence[Piece]) -> str:
    """graph_hash() of the model harness.export.compose makes of `pieces`, without parsing it: each
    piece's canonical items are computed once and renumbered (the numbers of a piece's values
    follow those of the pieces before it), and the text is hashed as graph_hash hashes it."""
    canonical = []
    for piece in pieces:
        if piece.key not in _CANONICAL:
            _CANONICAL[piece.key] = _canonical_piece(piece)
        canonical.append(_CANONICAL[piece.key])
    text = ['{"graph":[["input","v0",', _json(_type(pieces[0].input.type)), "]"]
    introduced, current = 1, 0  # values named so far; the number of the value flowing on
    for part in canonical:
        numbers = [current if slot == 0 else introduced + slot - 1 for slot in part.slots]
        text.append(",")
        for before, number in zip(part.texts, numbers):
            text += [before, f'"v{number}"']
        text.append(part.texts[-1])
        current = current if part.output == 0 else introduced + part.output - 1
        introduced += part.introduced
    text += [f',["output","v{current}",', _json(_type(pieces[-1].output.type)),
             ']],"opsets":', canonical[0].opsets, "}"]
    return hashlib.sha256("".join(text).encode()).hexdigest()


def _canonical_piece(piece: Piece) -> _CanonicalPiece:
    graph = onnx.GraphProto()
    graph.node.extend(piece.nodes.node)
    for name, data in piece.tensors:
        tensor = graph.initializer.add()
        tensor.ParseFromString(data)
        tensor.name = name
    names = {piece.input.name: "v0"}
    items = _canonical_graph(graph, names, ends=False)
    parts: List[Union[str, int]] = []  # JSON text and value numbers, in order

    def value(name: str) -> None:
        parts.append(int(name[1:]) if name else '""')

    def values(listed: List[str]) -> None:
        parts.append("[")
        for i, name in enumerate(listed):
            parts.append("," if i else "")
            value(name)
        parts.append("]")

    for i, item in enumerate(items):
        parts.append("," if i else "")
        if item[0] == "init":
            parts.append('["init",')
            value(item[1])
            parts.append("," + _json(item[2]) + "]")
        else:
            kind, domain, op_type, inputs, outputs, attributes = item
            parts.append(f"[{_json(kind)},{_json(domain)},{_json(op_type)},")
            values(inputs)
            parts.append(",")
            values(outputs)
            parts.append("," + _json(attributes) + "]")
    texts, slots, current = [], [], ""
    for part in parts:
        if isinstance(part, int):
            texts.append(current)
            slots.append(part)
            current = ""
        else:
            current += part
    texts.append(current)
    header = onnx.ModelProto.FromString(piece.header)
    opsets = sorted([o.domain, o.version] for o in header.opset_import)
    return _CanonicalPiece(tuple(texts), tuple(slots), len(names) - 1,
                           int(names[piece.output.name][1:]), _json(opsets))


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
