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
unit. When, on probe samples that try every choice of every label, the glue counts nothing
and a few labels decide each unit's input shape (none; else its own labels, a
MutableConv2d's input width among them; else those and the labels of the units just before
it), the space is additive: `additive_terms()` gives one harness.spaces.additive term per unit (the
labels that route to it, its own labels and the deciding ones), and a sample's cost is a sum
of table entries, as for harness's own additive spaces; the same terms give the latency
lookup table and the one-shot penalties their tables. Other spaces keep the memoized
forward.

What cannot be decomposed (a custom mutable module with a LayerChoice inside, whose forward
harness cannot interpret; a depth that is an expression) raises NotDecomposable naming it,
and callers count whole frozen subnets instead.
"""
import copy
import itertools
import json
import logging
import math
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import _disable_current_modes

from harness.spaces.additive import AdditiveTerm, Block, chosen_blocks
from harness.metrics.flop_count import OperatorCounter, nni_extra, count_forward

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
        # Block key -> count, for the blocks of additive_terms() whose unit was counted while
        # tracing (the same count a FlopsProfiler of this convention would make again).
        self.block_costs: Dict[str, float] = {}
        self.why_not_additive = ""  # what additive_terms() found in the way, when it did

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

    def probe_samples(self, choices: Mapping[str, Sequence[Any]], seed: int = 0,
                      extra: int = 16) -> List[Dict[str, Any]]:
        """Samples that between them try every choice of every label (each label runs
        through its values in its own shuffled order, so that no two labels move in step),
        then `extra` random ones, all with every Repeat at its deepest (so that every
        candidate runs at least once). As many as the most values any label has, plus
        `extra`: not one per value of every label, each of which costs a trace."""
        import random

        rng = random.Random(seed)
        deepest = self._deepest(choices)
        rounds = max((len(values) for values in choices.values()), default=0)
        orders = {}
        for label, values in choices.items():
            order = list(values)
            rng.shuffle(order)
            orders[label] = (order * rounds)[:rounds]
        samples = [{label: orders[label][r] for label in choices} for r in range(rounds)]
        samples += [_random_sample(rng, choices) for _ in range(extra)]
        for sample in samples:
            sample.update(deepest)
        return samples

    def additive_terms(self, choices: Mapping[str, Sequence[Any]],
                       max_table: int = 20000) -> Optional[List[AdditiveTerm]]:
        """One term per unit when the space decomposes (see module doc), else None (the
        reason is logged).

        A unit whose input shape changes with the sample (a width chosen upstream) still gets
        a term when a few labels decide that shape: its own labels (a MutableConv2d's input
        width is one of them), else those and the labels of the units run just before it
        (an activation after a mutable BatchNorm). The deciding labels join the term's labels;
        the shape for each of their combinations is read from traces of samples that realize
        it, and random samples are traced again to check that the shapes hold."""
        observed: Dict[int, List[Tuple[Mapping[str, Any], Guard, Any]]] = {}
        before: Dict[int, Set[int]] = {}
        for sample in self.probe_samples(choices):
            if not self._observe(sample, observed, before):
                return None
        deciding: Dict[int, Tuple[str, ...]] = {}
        for index, seen in observed.items():
            name = self.units[index][0] or "the space"
            if len({guard for _, guard, _ in seen}) > 1:
                self._refuse("%s: %s is reached by different routes; no per-choice table",
                             type(self.space).__name__, name)
                return None
            labels = self._deciding_labels(index, seen, before)
            if labels is None:
                self._refuse("%s: %s sees input shapes %s, and neither its own labels nor its "
                             "predecessors' decide them; no per-choice table (memoized counting "
                             "instead)", type(self.space).__name__, name,
                             sorted({repr(shapes) for _, _, shapes in seen}))
                return None
            deciding[index] = labels
        shapes = self._shapes_for_every_combination(choices, observed, deciding, max_table)
        if shapes is None:
            return None
        terms = []
        for index, (name, module, labels) in enumerate(self.units):
            if index not in observed:
                continue  # never runs (a module the forward does not call)
            guard = observed[index][0][1]
            if any(len(seen) != 1 or not isinstance(seen[0], tuple)
                   for seen in shapes[index].values()):
                self._refuse("%s: %s takes several inputs; no per-choice table",
                             type(self.space).__name__, name)
                return None
            term_labels = tuple(dict.fromkeys(
                [g[1] for g in guard] + list(labels) + list(deciding[index])))
            size = _combinations(term_labels, choices)
            if size > max_table:
                self._refuse("%s: %s depends on %d label combinations; no per-choice table",
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
                shape = shapes[index][tuple(sample[label] for label in deciding[index])][0]
                blocks[values] = Block(
                    key=f"nni:{name}:{json.dumps(own, sort_keys=True)}:{list(shape)}",
                    build=_builder(module, labels, own), input_shape=shape)
                hit = self._memo.get((index, tuple(own.values()), (shape,)))
                if hit is not None:
                    self.block_costs[blocks[values].key] = hit[0]  # type: ignore[union-attr]
            terms.append(AdditiveTerm(term_labels, blocks))
        if any(deciding.values()) and not self._shapes_hold(terms, choices):
            return None
        return terms

    def _refuse(self, message: str, *args: Any) -> None:
        """Why the space has no per-choice table: logged, and kept for the profiler."""
        self.why_not_additive = message % args
        log.info("%s", self.why_not_additive)

    def _observe(self, sample: Mapping[str, Any],
                 observed: Dict[int, List[Tuple[Mapping[str, Any], Guard, Any]]],
                 before: Dict[int, Set[int]]) -> bool:
        """Trace a sample into `observed` (per unit: sample, route, input shapes) and
        `before` (per unit: the units run just before it); False if the space's own forward
        counts operators outside its units."""
        units, glue = self.trace(sample)
        if abs(glue) > 0:
            self._refuse("%s: its own forward counts %g outside its modules (functional "
                         "operators), so it has no per-choice table", type(self.space).__name__,
                         glue)
            return False
        previous = None
        for index, guard, shapes, _ in units:
            observed.setdefault(index, []).append((sample, guard, shapes))
            if previous is not None:
                before.setdefault(index, set()).add(previous)
            previous = index
        return True

    def _deciding_labels(self, index: int, seen: Sequence[Tuple[Mapping[str, Any], Guard, Any]],
                         before: Mapping[int, Set[int]],
                         steps: int = 3) -> Optional[Tuple[str, ...]]:
        """The fewest labels that decide the unit's input shapes on every observation: none,
        its own, or its own and those of the units up to `steps` before it."""
        candidates = [(), self.units[index][2]]
        chain = list(self.units[index][2])
        frontier = {index}
        for _ in range(steps):
            frontier = set().union(*(before.get(i, set()) for i in frontier))
            chain += [label for i in sorted(frontier) for label in self.units[i][2]]
            candidates.append(tuple(dict.fromkeys(chain)))
        for labels in candidates:
            decided: Dict[Tuple[Any, ...], Any] = {}
            if all(decided.setdefault(tuple(sample[label] for label in labels), shapes) == shapes
                   for sample, _, shapes in seen):
                return tuple(labels)
        return None

    def _shapes_for_every_combination(
            self, choices: Mapping[str, Sequence[Any]],
            observed: Mapping[int, List[Tuple[Mapping[str, Any], Guard, Any]]],
            deciding: Mapping[int, Tuple[str, ...]],
            max_table: int) -> Optional[Dict[int, Dict[Tuple[Any, ...], Any]]]:
        """Per unit, its input shapes for every combination of its deciding labels: those the
        probes saw, and the rest from traces of samples built to realize them (each trace
        realizes one missing combination of as many units as agree on their labels)."""
        import random

        shapes: Dict[int, Dict[Tuple[Any, ...], Any]] = {
            index: {tuple(sample[label] for label in deciding[index]): seen_shapes
                    for sample, _, seen_shapes in seen} for index, seen in observed.items()}
        missing: Dict[int, List[Tuple[Any, ...]]] = {}
        for index, labels in deciding.items():
            size = _combinations(labels, choices)
            if size > max_table:
                self._refuse("%s: the input shape of %s depends on %d label combinations; no "
                             "per-choice table", type(self.space).__name__,
                             self.units[index][0], size)
                return None
            combos = [c for c in itertools.product(*(choices[label] for label in labels))
                      if c not in shapes[index]]
            if combos:
                missing[index] = combos
        deepest = self._deepest(choices)  # every Repeat at its deepest: every unit runs
        rng = random.Random(11)
        budget = 4 * max((len(c) for c in missing.values()), default=0) + 10
        while missing:
            budget -= 1
            if budget < 0:
                self._refuse("%s: could not realize every width combination by tracing; no "
                             "per-choice table", type(self.space).__name__)
                return None
            sample = _random_sample(rng, choices)
            sample.update(deepest)
            fixed: Dict[str, Any] = {}
            for index, combos in missing.items():
                wanted = dict(zip(deciding[index], combos[0]))
                for kind, label, value in observed[index][0][1]:  # its route
                    wanted.setdefault(label, value if kind == "eq" else max(choices[label]))
                if all(fixed.get(label, value) == value for label, value in wanted.items()):
                    fixed.update(wanted)
            sample.update(fixed)
            units, _ = self.trace(sample)
            for index, _, seen_shapes, _ in units:
                key = tuple(sample[label] for label in deciding[index])
                if shapes[index].setdefault(key, seen_shapes) != seen_shapes:
                    self._refuse("%s: %s sees other input shapes for the same labels; no "
                                 "per-choice table", type(self.space).__name__,
                                 self.units[index][0])
                    return None
                if index in missing and key in missing[index]:
                    missing[index].remove(key)
                    if not missing[index]:
                        del missing[index]
        return shapes

    def _deepest(self, choices: Mapping[str, Sequence[Any]]) -> Dict[str, Any]:
        """Every Repeat's depth label at its largest value."""
        from nni.nas.nn.pytorch import Repeat

        return {m.depth_choice.label: max(choices[m.depth_choice.label])
                for m in self.space.modules() if isinstance(m, Repeat)
                and getattr(m.depth_choice, "label", None) in choices}

    def _shapes_hold(self, terms: Sequence[AdditiveTerm], choices: Mapping[str, Sequence[Any]],
                     count: int = 8) -> bool:
        """Whether random samples run exactly the blocks the terms give them, at the input
        shapes the terms derived."""
        import random

        rng = random.Random(7)
        for _ in range(count):
            sample = _random_sample(rng, choices)
            units, _ = self.trace(sample)
            expected = [block.input_shape for block in chosen_blocks(terms, sample)]
            if [shapes[0] for _, _, shapes, _ in units] != expected:
                self._refuse("%s: the input shapes derived do not hold on sample %s; no "
                             "per-choice table", type(self.space).__name__, sample)
                return False
        return True


def _random_sample(rng: Any, choices: Mapping[str, Sequence[Any]]) -> Dict[str, Any]:
    return {label: rng.choice(list(values)) for label, values in choices.items()}


def _combinations(labels: Sequence[str], choices: Mapping[str, Sequence[Any]]) -> int:
    return math.prod(len(choices[label]) for label in labels)


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
