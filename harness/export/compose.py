"""A subnet's ONNX graph composed from per-block pieces, for spaces with per-block terms.

`torch.onnx.export` of a whole ProxylessSpace subnet at 224 px takes about 330 ms, most of it
spent tracing blocks the exporter has traced before. A space that declares
`additive_terms(input_shape)` (harness.spaces.additive) describes each subnet as a chain of blocks,
so each distinct block is exported once per input shape (a *piece*) and a subnet's graph is
its blocks' pieces spliced end to end: each block's output feeds the next block's input.
Node names keep the exporter's module path, prefixed by the block's position and key
(`b3:mbconv|16>24|k3|e3|s2|skip0//conv/Conv`), so a per-operator profile maps back to blocks.

The splice works on protobuf's wire format: a piece keeps its nodes and each weight tensor
as serialized bytes, and a composed model is those bytes joined with new names (a prefix per
position, so a block that occurs twice has two sets of names and weights), never parsed or
serialized again; that is what makes a new subnet cost milliseconds. (harness.export.graph hashes
the composed graph from its pieces the same way, without parsing it.)

Pieces live in memory (least recently used dropped beyond MEMORY_LIMIT_BYTES, shared by
every profiler of the process) and in `$HARNESS_HOME/pieces`, one `<digest>.onnx` per piece
with a `<digest>.json` beside it that records the piece's key and the sha256 of the file.
The digest covers the space's fingerprint, the block key, input shape, opset, exporter
version, weight seed and PIECE_FORMAT. Files are written atomically (a fresh file renamed
into place) and checked when read: a file whose record is missing, names another key, or
whose sha256 differs is treated as absent, re-exported and replaced, with a warning. No
symbolic link is followed: a piece file that is a link is replaced, and a pieces folder that
is a link, not ours, or writable by others is not used (pieces then stay in memory).
"""
import hashlib
import json
import logging
import os
import stat
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import onnx

from devices.safe_files import read_regular, replace_file, replace_text
from harness.errors import ExportError

log = logging.getLogger(__name__)

PIECE_FORMAT = 1  # bump when a piece's content or the way pieces are spliced changes
PIECES_FOLDER = "pieces"  # under $HARNESS_HOME
MEMORY_LIMIT_BYTES = 512 * 2**20  # pieces kept in memory, across every store of the process
MAX_PIECE_BYTES = 2**30  # a larger file in the pieces folder is not read

# Field numbers of onnx.proto, for writing messages as bytes.
_MODEL_GRAPH = 7
_GRAPH_NAME, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 2, 5, 11, 12
_TENSOR_NAME = 8


@dataclass(frozen=True)
class PieceKey:
    """What makes two exported blocks interchangeable: the space (its fingerprint: block keys
    are unique within a space only), the block's key (which names its module and input
    shape), the input shape, the exporter and its opset, the weight seed."""

    space: str
    block_key: str
    input_shape: Tuple[int, ...]
    opset: int
    exporter: str
    seed: int
    format: int = PIECE_FORMAT

    def as_json(self) -> Dict[str, Any]:
        return {"space": self.space, "block_key": self.block_key, "input_shape": list(self.input_shape),
                "opset": self.opset, "exporter": self.exporter, "seed": self.seed,
                "format": self.format}

    @property
    def digest(self) -> str:
        text = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Piece:
    """One block exported alone, kept in the parts the splice needs."""

    key: PieceKey
    header: bytes               # the ModelProto without its graph (IR version, opsets, producer)
    input: onnx.ValueInfoProto  # the block's one graph input
    output: onnx.ValueInfoProto  # and its one output
    nodes: onnx.GraphProto      # a graph holding only the block's nodes and value_info
    tensors: Tuple[Tuple[str, bytes], ...]  # name, TensorProto bytes without the name
    nbytes: int
    _renamed: Dict[Tuple[str, str, str], bytes] = field(default_factory=dict, compare=False,
                                                         repr=False)

    def nodes_at(self, prefix: str, source: str, target: str) -> bytes:
        """The nodes (and the shapes the exporter inferred for their values) as GraphProto
        bytes, every name prefixed, reading `source` where the block read its input and
        writing `target` where it wrote its output."""
        cached = self._renamed.get((prefix, source, target))
        if cached is not None:
            return cached
        graph = onnx.GraphProto()
        graph.CopyFrom(self.nodes)
        links = {self.input.name: source, self.output.name: target, "": ""}
        for node in graph.node:
            node.name = prefix + node.name if node.name else ""
            node.input[:] = [links.get(name, prefix + name) for name in node.input]
            node.output[:] = [links.get(name, prefix + name) for name in node.output]
        for value in graph.value_info:
            value.name = prefix + value.name
        renamed = graph.SerializeToString()
        self._renamed[(prefix, source, target)] = renamed
        return renamed


@dataclass(frozen=True)
class ComposedModel:
    """A composed subnet: the model's bytes and the pieces it was composed of, in order."""

    onnx_bytes: bytes
    pieces: Tuple[Piece, ...]


# ---------------------------------------------------------------- composing

def compose(pieces: Sequence[Piece]) -> ComposedModel:
    """The model that runs `pieces` one after another: input `input0`, output `output0`."""
    if not pieces:
        raise ExportError("a subnet without blocks cannot be composed",
                          fix="check the space's additive_terms(): every subnet builds blocks")
    for before, after in zip(pieces, pieces[1:]):
        if after.header != pieces[0].header:
            raise ExportError(f"pieces {pieces[0].key.block_key} and {after.key.block_key} come "
                              f"from different exporters or opsets",
                              fix="remove $HARNESS_HOME/pieces and export again")
        if _shape(before.output) != _shape(after.input):
            raise ExportError(f"block {after.key.block_key} expects {_shape(after.input)} but "
                              f"{before.key.block_key} gives {_shape(before.output)}",
                              fix="additive_terms() must describe the subnet as a chain of "
                                  "blocks, each fed by the one before")
    # Names tell blocks apart: a node's (and a block's output, which onnxruntime may name a
    # node after) start with its block's position and key.
    prefixes = [f"b{j}:{_block_name(piece.key.block_key)}/" for j, piece in enumerate(pieces)]
    links = ["input0"] + [prefix + "output" for prefix in prefixes[:-1]] + ["output0"]
    graph: List[bytes] = [_field(_GRAPH_NAME, b"main_graph")]
    for j, piece in enumerate(pieces):
        prefix = prefixes[j]
        graph.append(piece.nodes_at(prefix, links[j], links[j + 1]))
        for name, tensor in piece.tensors:
            named = _field(_TENSOR_NAME, (prefix + name).encode())
            graph += [_tag(_GRAPH_INITIALIZER, len(named) + len(tensor)), named, tensor]
    graph += [_field(_GRAPH_INPUT, _renamed_value(pieces[0].input, links[0])),
              _field(_GRAPH_OUTPUT, _renamed_value(pieces[-1].output, links[-1]))]
    return ComposedModel(_model(pieces[0].header, graph), tuple(pieces))


def _block_name(block_key: str) -> str:
    """A block's key without the input shape it ends with ('mbconv|16>24|k3|e3|s2|skip0'):
    the prefix of its nodes' names, so a per-operator profile maps a node to its block."""
    return block_key.split("|in[", 1)[0]


def _model(header: bytes, graph: List[bytes]) -> bytes:
    """ModelProto bytes: the header's fields and the graph's, joined in one copy."""
    return b"".join([header, _tag(_MODEL_GRAPH, sum(len(part) for part in graph))] + graph)


def prepare_piece(key: PieceKey, onnx_bytes: bytes) -> Piece:
    """A block's exported model split into the parts the splice needs; ExportError when it
    is not one input to one output, or holds what a splice cannot rename (subgraphs)."""
    try:
        model = onnx.load_from_string(onnx_bytes)
    except Exception as exc:
        raise ExportError(f"the piece of {key.block_key} is not a readable ONNX model: {exc}",
                          fix="export it again") from exc
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    inputs = [value for value in graph.input if value.name not in initializers]
    problem = None
    if len(inputs) != 1 or len(graph.output) != 1:
        problem = f"{len(inputs)} inputs and {len(graph.output)} outputs (a block has one each)"
    elif inputs[0].name == graph.output[0].name or graph.output[0].name in initializers:
        problem = "its output is its input or a constant"
    elif graph.sparse_initializer:
        problem = "sparse initializers"
    elif any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
             for node in graph.node for a in node.attribute):
        problem = "nodes with subgraphs"
    elif any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer):
        problem = "weights in external files"
    elif _shape(inputs[0])[1] != list(key.input_shape):
        problem = f"input shape {_shape(inputs[0])[1]}, not {list(key.input_shape)}"
    if problem is not None:
        raise ExportError(f"block {key.block_key} cannot be composed: its ONNX graph has "
                          f"{problem}", fix="give the space's blocks one tensor in, one out")
    tensors = []
    for tensor in graph.initializer:
        name = tensor.name
        tensor.ClearField("name")
        tensors.append((name, tensor.SerializeToString()))
    nodes = onnx.GraphProto()
    nodes.node.extend(graph.node)
    nodes.value_info.extend(value for value in graph.value_info
                            if value.name not in (inputs[0].name, graph.output[0].name))
    input_value, output_value = onnx.ValueInfoProto(), onnx.ValueInfoProto()
    input_value.CopyFrom(inputs[0])
    output_value.CopyFrom(graph.output[0])
    model.ClearField("graph")
    return Piece(key, model.SerializeToString(), input_value, output_value, nodes, tuple(tensors),
                 nbytes=sum(len(t) for _, t in tensors) + nodes.ByteSize())


def _shape(value: onnx.ValueInfoProto) -> Tuple[int, List[Any]]:
    tensor = value.type.tensor_type
    return tensor.elem_type, [d.dim_value if d.HasField("dim_value") else d.dim_param
                              for d in tensor.shape.dim]


def _renamed_value(value: onnx.ValueInfoProto, name: str) -> bytes:
    renamed = onnx.ValueInfoProto()
    renamed.CopyFrom(value)
    renamed.name = name
    return renamed.SerializeToString()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _tag(number: int, length: int) -> bytes:
    """The key and length of a length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(length)


def _field(number: int, payload: bytes) -> bytes:
    return _tag(number, len(payload)) + payload


# ---------------------------------------------------------------- memory and disk

class _Memory:
    """Pieces by key, least recently used dropped beyond a byte budget; one per process."""

    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self._pieces: "OrderedDict[PieceKey, Piece]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: PieceKey) -> Optional[Piece]:
        with self._lock:
            piece = self._pieces.get(key)
            if piece is not None:
                self._pieces.move_to_end(key)
            return piece

    def put(self, piece: Piece) -> None:
        with self._lock:
            if piece.key in self._pieces:
                return
            self._pieces[piece.key] = piece
            self._bytes += piece.nbytes
            while self._bytes > self.limit_bytes and len(self._pieces) > 1:
                _, dropped = self._pieces.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._pieces.clear()
            self._bytes = 0


_MEMORY = _Memory(MEMORY_LIMIT_BYTES)


def forget_pieces() -> None:
    """Drop the pieces kept in memory (as a new process starts): the next ones come from disk."""
    _MEMORY.clear()


class PieceStore:
    """Pieces for one folder (None: memory only). `counters` counts where pieces came from:
    memory, disk, exported (made anew), rejected (a bad or foreign file on disk)."""

    def __init__(self, folder: Optional[Path]):
        self.folder = folder
        self.counters: Counter = Counter()
        self._lock = threading.Lock()
        self._folder_checked = False

    def piece(self, key: PieceKey, make: Callable[[], bytes]) -> Piece:
        """The piece of `key`: from memory, else from disk, else made by `make()` (the block's
        ONNX bytes) and kept in both."""
        found = _MEMORY.get(key)
        if found is not None:
            self.counters["memory"] += 1
            return found
        with self._lock:  # one thread of the process makes a missing piece
            found = _MEMORY.get(key) or self._read(key)
            if found is None:
                onnx_bytes = make()
                found = prepare_piece(key, onnx_bytes)
                self.counters["exported"] += 1
                self._write(key, onnx_bytes)
            _MEMORY.put(found)
            return found

    # ------------------------------------------------------------ the folder

    def _usable_folder(self) -> Optional[Path]:
        """The folder, created if missing; None (with a warning, once) when it is a link, not
        a folder, not ours, or writable by others."""
        if self.folder is None or self._folder_checked:
            return self.folder
        self._folder_checked = True
        problem: Optional[str]
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = os.lstat(self.folder)
        except OSError as exc:
            problem = f"cannot be created ({exc})"
        else:
            problem = ("is a symbolic link" if stat.S_ISLNK(info.st_mode) else
                       "is not a folder" if not stat.S_ISDIR(info.st_mode) else
                       "belongs to another user" if info.st_uid != os.getuid() else
                       "is writable by others" if info.st_mode & 0o022 else None)
        if problem is not None:
            log.warning("the pieces folder %s %s: block pieces stay in memory (remove it, or "
                        "point HARNESS_HOME elsewhere)", self.folder, problem)
            self.folder = None
        return self.folder

    def _read(self, key: PieceKey) -> Optional[Piece]:
        """The piece from disk, or None when absent; a bad or foreign file counts as absent."""
        folder = self._usable_folder()
        if folder is None:
            return None
        model_path, record_path = folder / f"{key.digest}.onnx", folder / f"{key.digest}.json"
        try:
            record_bytes = read_regular(record_path, 2**20)
        except FileNotFoundError:
            return None
        except OSError as exc:
            return self._reject(record_path, f"its record cannot be read ({exc})")
        try:
            record = json.loads(record_bytes)
            recorded_key, recorded_sha = record["key"], record["sha256"]
        except (ValueError, KeyError, TypeError):
            return self._reject(record_path, "its record is not valid JSON with key and sha256")
        if recorded_key != key.as_json():
            return self._reject(record_path, "its record names another block")
        try:
            onnx_bytes = read_regular(model_path, MAX_PIECE_BYTES)
        except OSError as exc:
            return self._reject(model_path, f"it cannot be read ({exc})")
        if hashlib.sha256(onnx_bytes).hexdigest() != recorded_sha:
            return self._reject(model_path, "its sha256 differs from the one recorded")
        try:
            piece = prepare_piece(key, onnx_bytes)
        except ExportError as exc:
            return self._reject(model_path, exc.message)
        self.counters["disk"] += 1
        return piece

    def _reject(self, path: Path, reason: str) -> Optional[Piece]:
        """Count and report a file that cannot be used; None: the piece is absent."""
        self.counters["rejected"] += 1
        log.warning("block piece %s is damaged or foreign (%s): exporting it again", path, reason)
        return None

    def _write(self, key: PieceKey, onnx_bytes: bytes) -> None:
        """Store the piece, then its record (a crash between leaves a file without a valid
        record, which reads as absent). Failing to write only costs a later export."""
        folder = self._usable_folder()
        if folder is None:
            return
        record = {"key": key.as_json(), "sha256": hashlib.sha256(onnx_bytes).hexdigest()}
        try:
            replace_file(folder / f"{key.digest}.onnx", lambda out: out.write(onnx_bytes),
                         mode=0o600, links=True)
            replace_text(folder / f"{key.digest}.json", json.dumps(record, sort_keys=True),
                         mode=0o600, links=True)
        except OSError as exc:
            log.warning("cannot store block piece %s in %s (%s): it is kept in memory only",
                        key.block_key, folder, exc)


_STORES: Dict[Optional[Path], PieceStore] = {}
_STORES_LOCK = threading.Lock()


def piece_store(folder: Optional[Path]) -> PieceStore:
    """The store of a folder (one per folder and process, so its counters add up)."""
    with _STORES_LOCK:
        if folder not in _STORES:
            _STORES[folder] = PieceStore(folder)
        return _STORES[folder]
