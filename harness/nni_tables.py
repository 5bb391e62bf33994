"""Per-choice tables for NNI 3.0 ModelSpaces, derived from the space itself.

Freezing an NNI space and running the subnet costs tenths of a second per sample. Most of
that is wasted: a sample differs from the last one in a few choices, and each mutable part
of the space costs the same whenever it sees the same choices at the same input shape. So
the space's modules are split into

- structural modules, which only route: LayerChoice (runs one candidate), Repeat (runs the
  first `depth` blocks) and InputChoice with one chosen input;
- units: the largest modules with no structural module inside (a LayerChoice candidate, a
  ConvBNReLU of MutableConv2d, a classifier). A unit's cost depends only on the labels of
  its own mutables and on its input shapes, so it is counted once per (unit, those labels'
  values, input shapes) on the meta device and memoized with its output shape;
- glue: the rest (the space's own forward, containers), run live on meta tensors, its own
  operators counted as they run.

`cost(sample)` is then one shape-only forward pass of the glue with a table look-up per
unit. When, on probe samples that try every choice of every label, every unit always sees
the same input shape and the glue counts nothing, the space is additive: `additive_terms()`
gives one harness.additive term per unit (the labels that route to it and its own labels),
and a sample's cost is a sum of table entries, as for harness's own additive spaces; the
same terms give the latency lookup table and the one-shot penalties their tables. Spaces
whose shapes follow choices (channel widths) keep the memoized forward.

What cannot be decomposed (a custom mutable module with a LayerChoice inside, whose forward
harness cannot interpret; a depth that is an expression) raises NotDecomposable naming it,
and callers count whole frozen subnets instead.
"""
import copy
import itertools
import json
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from harness.additive import AdditiveTerm, Block
from harness.flop_count import OperatorCounter, nni_extra, count_forward

log = logging.getLogger(__name__)

# Modules whose output has their input's shape and whose operators count no FLOPs.
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.SiLU,
                nn.GELU, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.Identity, nn.Dropout,
                nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

Guard = Tuple[Tuple[str, str, Any], ...]  # (("eq", label, value) | ("gt", label, index), ...)


class NotDecomposable(Exception):
    """The space has a part whose cost harness cannot attribute to its choices."""


def is_nni_space(space: Any) -> bool:
    """An NNI 3.0 ModelSpace (a torch module with simplify() and freeze(), no search_space())."""
    return (isinstance(space, nn.Module) and callable(getattr(space, "simplify", None))
            and callable(getattr(space, "freeze", None))
            and not callable(getattr(space, "search_space", None)))


def _shapes(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(v) for v in value)
    return repr(value)


class NniTables:
    """Counts samples of an NNI ModelSpace by memoized per-unit look-ups (see module doc)."""

    def __init__(self, space: nn.Module, inputs: Tuple[torch.Tensor, ...],
                 convention: str = "macs"):
        from nni.mutable import Mutable
        from nni.nas.nn.pytorch import InputChoice, LayerChoice, MutableModule, Repeat

        self.space = space
        self.convention = convention
        # The glue runs on real zero tensors: torch's CPU kernels for the few element-wise
        # operators between modules are much faster than its Python meta kernels.
        self._inputs = tuple(torch.zeros_like(x, device="cpu") for x in inputs)
        self._structural = (LayerChoice, Repeat, InputChoice)
        self._memo: Dict[Tuple[Any, ...], Tuple[float, Any, Set[str]]] = {}
        self._shared: Dict[Tuple[Any, ...], Tuple[float, Any, Set[str]]] = {}
        self.uncounted: Set[str] = set()
        self._sample: Mapping[str, Any] = {}
        self._guard: List[Tuple[str, str, Any]] = []
        self._trace: Optional[List[Tuple[int, Guard, Any, float]]] = None
        self._counter = OperatorCounter()
        self._total = 0.0
        self._patches: List[Tuple[nn.Module, Callable[..., Any]]] = []
        self.units: List[Tuple[str, nn.Module, Tuple[str, ...]]] = []

        has_structural: Dict[int, bool] = {}
        has_mutable: Dict[int, bool] = {}  # in the subtree, the module itself included
        for name, module in reversed(list(space.named_modules())):
            has_structural[id(module)] = isinstance(module, self._structural) or any(
                has_structural[id(child)] for child in module.children())
            has_mutable[id(module)] = isinstance(module, MutableModule) or any(
                has_mutable[id(child)] for child in module.children())

        def labels_of(module: nn.Module) -> Tuple[str, ...]:
            labels: Set[str] = set()
            for part in module.modules():
                if isinstance(part, MutableModule):
                    labels |= set(part.simplify())
            return tuple(sorted(labels))

        def is_unit(module: nn.Module) -> bool:
            if isinstance(module, self._structural) or module is space:
                return False
            if isinstance(module, MutableModule):  # a mutable layer (MutableConv2d, ...)
                return not has_structural[id(module)]
            return not has_mutable[id(module)]  # plain modules without mutables

        def visit(name: str, module: nn.Module) -> None:
            if is_unit(module):
                index = len(self.units)
                self.units.append((name, module, labels_of(module)))
                self._patches.append((module, self._unit_forward(index)))
                return
            if isinstance(module, LayerChoice):
                self._patches.append((module, self._layer_choice_forward(module)))
            elif isinstance(module, Repeat):
                if isinstance(module.depth_choice, Mutable) and not isinstance(
                        getattr(module.depth_choice, "label", None), str):
                    raise NotDecomposable(f"{name or 'the space'}: a Repeat whose depth is an "
                                          f"expression ({module.depth_choice!r})")
                self._patches.append((module, self._repeat_forward(module)))
                for i, block in enumerate(module.blocks):  # run one by one, not as a list
                    visit(f"{name}.blocks.{i}", block)
                return
            elif isinstance(module, InputChoice):
                self._patches.append((module, self._input_choice_forward(module)))
            elif isinstance(module, MutableModule) and module is not space:
                raise NotDecomposable(f"{name}: a {type(module).__name__} (a mutable module of "
                                      f"its own) holds LayerChoice / Repeat / InputChoice "
                                      f"modules, so its forward cannot be attributed")
            for child_name, child in module.named_children():
                visit(f"{name}.{child_name}" if name else child_name, child)

        visit("", space)

    # -------------------------------------------------------------- patched forwards

    def _unit_forward(self, index: int) -> Callable[..., Any]:
        name, module, labels = self.units[index]

        def forward(*args: Any) -> Any:
            sample = self._sample
            own = tuple(sample[label] for label in labels)
            key = (index, own, _shapes(args))
            hit = self._memo.get(key)
            if hit is None:
                hit = self._memo[key] = self._count_shared(module, labels, args, key[2])
            self._total += hit[0]
            if self._trace is not None:
                self._trace.append((index, tuple(self._guard), key[2], hit[0]))
            return hit[1]
        return forward

    def _count_shared(self, module: nn.Module, labels: Tuple[str, ...], args: Tuple[Any, ...],
                      shapes: Any) -> Tuple[float, Any, Set[str]]:
        """A mutable layer (MutableConv2d, ...) is what its frozen arguments make: many
        choices give the same layer (rounded widths), and equal layers at equal input shapes
        anywhere in the space cost the same, so they share one count."""
        freeze_args = getattr(module, "freeze_init_arguments", None)
        if not labels or not callable(freeze_args) or not hasattr(module, "trace_args"):
            return self._count_unit(module, labels, args)
        traced: Any = module
        init_args, init_kwargs = freeze_args(dict(self._sample), *traced.trace_args,
                                             **traced.trace_kwargs)
        key = (type(module), repr(init_args), repr(sorted(init_kwargs.items())), shapes)
        hit = self._shared.get(key)
        if hit is None:
            hit = self._shared[key] = self._count_unit(module, labels, args)
        return hit

    def _count_unit(self, module: nn.Module, labels: Tuple[str, ...],
                    args: Tuple[Any, ...]) -> Tuple[float, Any, Set[str]]:
        if isinstance(module, _ELEMENTWISE) and len(args) == 1 and isinstance(args[0], torch.Tensor):
            # Shape-preserving and zero MACs (what the operators would count): no need to
            # freeze and run it; NNI's convention adds its per-element count.
            value = 0.0
            if self.convention == "nni":
                value = float(nni_extra(module, args, args[0]))
            return value, torch.zeros(args[0].shape, dtype=args[0].dtype), set()
        forward = module.__dict__.pop("forward")  # copied as the user made it (only the
        try:                                      # unit itself is patched in its subtree)
            with _disable_current_modes():  # counted on its own, outside the glue's counter
                with torch.device("meta"):  # new weights are shapes only: no initialisation
                    frozen = self.build_unit(module, labels, self._sample)
                counted = count_forward(frozen, args, self.convention)
        finally:
            module.__dict__["forward"] = forward
        self.uncounted |= counted.uncounted
        return counted.value, _zeros_like(counted.output), counted.uncounted

    @staticmethod
    def build_unit(module: nn.Module, labels: Sequence[str],
                   sample: Mapping[str, Any]) -> nn.Module:
        """The unit as a plain module for the sample's choices of its labels (a copy)."""
        from nni.nas.nn.pytorch.base import recursive_freeze

        if not labels:
            return copy.deepcopy(module)
        frozen, replaced = recursive_freeze(module, dict(sample))
        return frozen if replaced else copy.deepcopy(module)

    def _layer_choice_forward(self, module: Any) -> Callable[..., Any]:
        def forward(*args: Any) -> Any:
            value = self._sample[module.label]
            self._guard.append(("eq", module.label, value))
            try:
                return module[value](*args)
            finally:
                self._guard.pop()
        return forward

    def _repeat_forward(self, module: Any) -> Callable[..., Any]:
        from nni.mutable import Mutable

        label = getattr(module.depth_choice, "label", None)

        def forward(x: Any) -> Any:
            depth = (module.depth_choice.freeze(dict(self._sample))
                     if isinstance(module.depth_choice, Mutable) else module.depth_choice)
            for i, block in enumerate(module.blocks[:depth]):
                if label is not None:
                    self._guard.append(("gt", label, i))
                try:
                    x = block(x)
                finally:
                    if label is not None:
                        self._guard.pop()
            return x
        return forward

    def _input_choice_forward(self, module: Any) -> Callable[..., Any]:
        from nni.nas.nn.pytorch.choice import ChosenInputs

        def forward(candidate_inputs: List[Any]) -> Any:
            chosen = self._sample[module.label]
            chosen = list(chosen) if isinstance(chosen, (list, tuple)) else [chosen]
            return ChosenInputs._tensor_reduction(module.reduction,
                                                  [candidate_inputs[i] for i in chosen])
        return forward

    # -------------------------------------------------------------- counting

    def cost(self, sample: Mapping[str, Any]) -> float:
        """The sample's count: one shape-only pass of the glue, a look-up per unit."""
        self._sample = sample
        self._total = 0.0
        self._counter.flops = 0
        self._patch()
        try:
            with self._counter, torch.no_grad():
                self.space(*self._inputs)
        finally:
            self._unpatch()
            self._guard.clear()
        glue = self._counter.flops / 2
        if self.convention == "nni":
            glue /= max(int(self._inputs[0].shape[0]), 1) if self._inputs[0].dim() else 1
        return self._total + glue

    def _patch(self) -> None:
        for module, forward in self._patches:
            module.__dict__["forward"] = forward

    def _unpatch(self) -> None:
        for module, _ in self._patches:
            module.__dict__.pop("forward", None)

    def trace(self, sample: Mapping[str, Any]) -> Tuple[List[Tuple[int, Guard, Any, float]], float]:
        """The units a sample runs (index, routing guard, input shapes, cost) and the glue's
        own count."""
        self._trace = []
        try:
            total = self.cost(sample)
            units = self._trace
        finally:
            self._trace = None
        return units, total - sum(row[3] for row in units)

    # -------------------------------------------------------------- additive terms

    def probe_samples(self, choices: Mapping[str, Sequence[Any]], seed: int = 0) -> List[Dict[str, Any]]:
        """Samples that between them try every choice of every label, with every Repeat at
        its deepest (so that every candidate runs at least once)."""
        import random

        from nni.nas.nn.pytorch import Repeat

        depth_labels = {m.depth_choice.label: max(choices[m.depth_choice.label])
                        for m in self.space.modules() if isinstance(m, Repeat)
                        and getattr(m.depth_choice, "label", None) in choices}
        rng = random.Random(seed)
        samples = []
        for label, values in choices.items():
            for value in values:
                sample = {other: rng.choice(list(v)) for other, v in choices.items()}
                sample.update(depth_labels)
                sample[label] = value
                samples.append(sample)
        return samples

    def additive_terms(self, choices: Mapping[str, Sequence[Any]],
                       max_table: int = 20000) -> Optional[List[AdditiveTerm]]:
        """One term per unit when the space is additive (see module doc), else None (the
        reason is logged)."""
        seen: Dict[int, Tuple[Guard, Any]] = {}
        for sample in self.probe_samples(choices):
            units, glue = self.trace(sample)
            if abs(glue) > 0:
                log.info("%s: its own forward counts %g outside its modules (functional "
                         "operators), so it has no per-choice table", type(self.space).__name__,
                         glue)
                return None
            for index, guard, shapes, _ in units:
                if seen.setdefault(index, (guard, shapes)) != (guard, shapes):
                    log.info("%s: %s sees input shapes %s and %s depending on the sample, so "
                             "the space has no per-choice table (memoized counting instead)",
                             type(self.space).__name__, self.units[index][0] or "the space",
                             seen[index][1], shapes)
                    return None
        terms = []
        for index, (name, module, labels) in enumerate(self.units):
            if index not in seen:
                continue  # never runs (a module the forward does not call)
            guard, shapes = seen[index]
            if len(shapes) != 1 or not isinstance(shapes[0], tuple):
                log.info("%s: %s takes %d inputs; no per-choice table",
                         type(self.space).__name__, name, len(shapes))
                return None
            term_labels = tuple(dict.fromkeys([g[1] for g in guard] + list(labels)))
            size = 1
            for label in term_labels:
                size *= len(choices[label])
            if size > max_table:
                log.info("%s: %s depends on %d label combinations; no per-choice table",
                         type(self.space).__name__, name, size)
                return None
            blocks: Dict[Tuple[Any, ...], Optional[Block]] = {}
            for values in itertools.product(*(choices[label] for label in term_labels)):
                sample = dict(zip(term_labels, values))
                if not all(sample[label] == value if kind == "eq" else sample[label] > value
                           for kind, label, value in guard):
                    blocks[values] = None
                    continue
                own = {label: sample[label] for label in labels}
                blocks[values] = Block(
                    key=f"nni:{name}:{json.dumps(own, sort_keys=True)}:{list(shapes[0])}",
                    build=_builder(module, labels, own), input_shape=shapes[0])
            terms.append(AdditiveTerm(term_labels, blocks))
        return terms


def _zeros_like(value: Any) -> Any:
    """Real zero tensors of the output's shapes (counting ran on the meta device)."""
    if isinstance(value, torch.Tensor):
        return torch.zeros(value.shape, dtype=value.dtype) if value.is_meta else value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_zeros_like(v) for v in value)
    return value


def _builder(module: nn.Module, labels: Tuple[str, ...],
             own: Dict[str, Any]) -> Callable[[], nn.Module]:
    return lambda: NniTables.build_unit(module, labels, own)
