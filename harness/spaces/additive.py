"""Additive spaces: a subnet's cost as a sum of per-block costs.

A space is additive when it can describe every subnet as a sequence of blocks, each chosen by
a few labels. It says so with an optional method

    additive_terms(input_shape) -> [AdditiveTerm, ...]

where each term names the labels it depends on and maps each combination of their values to
the Block built there (or None when that combination builds nothing, such as a block beyond
the stage's depth). A Block carries a key (equal keys mean equal modules at equal input
shapes), a builder and its real input shape.

`AdditiveCost` turns per-block costs (MACs, parameters, measured latencies) into an exact
cost for a sample in microseconds, and into the expected cost under independent categorical
architecture probabilities as a differentiable torch expression.
"""
import operator
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch

Shape = Tuple[int, ...]


@dataclass(frozen=True)
class Block:
    """One candidate block: `build()` makes it; `input_shape` is what it sees in the subnet."""

    key: str
    build: Callable[[], torch.nn.Module]
    input_shape: Shape


@dataclass(frozen=True)
class AdditiveTerm:
    """One slot of the subnet: the labels that pick its block, and the block per choice."""

    labels: Tuple[str, ...]
    blocks: Mapping[Tuple[Any, ...], Optional[Block]]

    def block_for(self, sample: Mapping[str, Any]) -> Optional[Block]:
        return self.blocks[tuple(sample[label] for label in self.labels)]


def chosen_blocks(terms: Sequence[AdditiveTerm], sample: Mapping[str, Any]) -> List[Block]:
    """The blocks a sample builds, in order."""
    return [b for b in (term.block_for(sample) for term in terms) if b is not None]


def distinct_blocks(terms: Sequence[AdditiveTerm]) -> Iterator[Block]:
    """Every candidate block once (by key)."""
    seen = set()
    for term in terms:
        for block in term.blocks.values():
            if block is not None and block.key not in seen:
                seen.add(block.key)
                yield block


class AdditiveCost:
    """Per-term cost tables for one space: exact sums and differentiable expectations."""

    def __init__(self, terms: Sequence[AdditiveTerm], block_cost: Mapping[str, float],
                 labels: Sequence[str], choices: Mapping[str, Sequence[Any]]):
        self.labels = list(labels)
        self.choices = {label: list(values) for label, values in choices.items()}
        position = {label: i for i, label in enumerate(self.labels)}
        self._tables: List[Tuple[Tuple[int, ...], Dict[Tuple[Any, ...], float]]] = []
        self._terms = list(terms)
        for term in terms:
            table = {values: (block_cost[block.key] if block is not None else 0.0)
                     for values, block in term.blocks.items()}
            self._tables.append((tuple(position[label] for label in term.labels), table))
        # total() sums one table per distinct label tuple (terms over the same labels merged),
        # and a table whose labels all belong to a bigger table is folded into that one: a
        # BatchNorm's term over a width into its convolution's term over the width and more
        merged: Dict[Tuple[int, ...], Dict[Tuple[Any, ...], float]] = {}
        for where, table in self._tables:
            into = merged.setdefault(where, dict.fromkeys(table, 0.0))
            for values, cost in table.items():
                into[values] += cost
        for where in sorted(merged, key=len):
            wider = [other for other in merged if len(other) > len(where)
                     and set(where) <= set(other)]
            if not wider:
                continue
            target = min(wider, key=lambda other: len(merged[other]))
            table = merged.pop(where)
            pick = [target.index(i) for i in where]
            for values in merged[target]:
                merged[target][values] += table[tuple(values[i] for i in pick)]
        self._merged = list(merged.items())
        # each table with an itemgetter of its labels' values (one label: keyed by the value)
        self._constant = sum(table[()] for where, table in self._merged if not where)
        self._lookups = [(operator.itemgetter(*where),
                          table if len(where) > 1 else {k[0]: v for k, v in table.items()})
                         for where, table in self._merged if where]

    def total(self, values: Sequence[Any]) -> float:
        """Cost of the sample whose choices, in label order, are `values`."""
        return self._constant + sum(table[get(values)] for get, table in self._lookups)

    def expected(self, probabilities: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """E[cost] when each label is drawn independently with the given probabilities (one
        vector per label, over its choices in the space's order). Gradients flow to them."""
        missing = [label for term in self._terms for label in term.labels
                   if label not in probabilities]
        if missing:
            raise KeyError(f"no probabilities for label {missing[0]!r}; give one vector per "
                           f"label over its choices {self.choices[missing[0]]!r}")
        total = None
        for term, (_, table) in zip(self._terms, self._tables):
            vectors = []
            for label in term.labels:
                p = probabilities[label]
                if p.shape != (len(self.choices[label]),):
                    raise ValueError(f"probabilities for {label!r} have shape {tuple(p.shape)}, "
                                     f"expected ({len(self.choices[label])},)")
                vectors.append(p)
            grid = torch.zeros([len(self.choices[label]) for label in term.labels],
                               dtype=torch.float64)
            for values, cost in table.items():
                index = tuple(self.choices[label].index(v) for label, v in zip(term.labels, values))
                grid[index] = cost
            value = grid.to(vectors[0].dtype) if vectors else grid
            for p in vectors:  # contract one label at a time: sum_i p_i * grid[i, ...]
                value = torch.tensordot(p, value, dims=([0], [0]))
            total = value if total is None else total + value
        return total if total is not None else torch.tensor(0.0)
