"""The model-space protocol, sample validation, sampling and enumeration.

A model space is any object with

    search_space() -> {label: [choice, ...]}      the labels and their allowed values
    freeze(sample) -> torch.nn.Module             the subnet a sample picks

and optionally `dummy_input()` (an input for the CLI) and `config()` (a dict of constructor
settings that change the architecture, for the space fingerprint). Choices must be JSON
scalars (int, float, str, bool or None) so that samples have one canonical text form.
An NNI 3.0 `ModelSpace` works as it is: its labels come from `simplify()`.
"""
import hashlib
import importlib
import inspect
import itertools
import json
import os
import random
import sys
from operator import itemgetter
from typing import (Any, Dict, Iterator, List, Mapping, NoReturn, Optional, Protocol,
                    Sequence, Tuple)

import numpy as np

from harness.errors import HarnessError, InvalidSample

Sample = Dict[str, Any]


class ModelSpace(Protocol):
    """What harness needs of a model space."""

    def search_space(self) -> Mapping[str, Sequence[Any]]:
        """Every label and its allowed values."""

    def freeze(self, sample: Sample) -> Any:
        """The torch.nn.Module that `sample` picks."""


_SCALARS = (int, float, str, bool, type(None))


def raw_search_space(space: Any) -> Mapping[str, Sequence[Any]]:
    """{label: choices} of a harness space, or of an NNI 3.0 ModelSpace (through its
    `simplify()`: every mutable must be categorical, like nni.choice or LayerChoice)."""
    if callable(getattr(space, "search_space", None)):
        return space.search_space()
    if callable(getattr(space, "simplify", None)) and callable(getattr(space, "freeze", None)):
        choices = {}
        for label, mutable in space.simplify().items():
            values = getattr(mutable, "values", None)
            if hasattr(mutable, "n_chosen"):  # nni.mutable.CategoricalMultiple: a list per sample
                raise HarnessError(
                    f"NNI label {label!r} chooses several of {list(values or [])!r} at once "
                    f"({type(mutable).__name__}, n_chosen={mutable.n_chosen}), so its samples are "
                    f"lists, not one value", fix="use InputChoice(..., n_chosen=1) or "
                    "LayerChoice; spaces whose input choices keep several inputs (DARTS cells) "
                    "are not supported")
            if values is None:
                raise HarnessError(f"NNI label {label!r} is a {type(mutable).__name__}, not a "
                                   f"categorical choice", fix="profile spaces whose mutables are "
                                   "nni.choice / LayerChoice / ValueChoice over a list")
            choices[label] = list(values)
        return choices
    raise HarnessError(f"{type(space).__name__} is not a model space",
                       fix="give it search_space() and freeze(sample), or pass an NNI ModelSpace")


def checked_search_space(space: ModelSpace) -> Dict[str, List[Any]]:
    """The space's labels and choices, checked once: non-empty, distinct JSON scalars."""
    raw = raw_search_space(space)
    if not isinstance(raw, Mapping) or not raw:
        raise HarnessError(f"{type(space).__name__}.search_space() returned {raw!r}",
                           fix="return a non-empty dict {label: [choices]}")
    checked = {}
    for label, choices in raw.items():
        choices = list(choices)
        if not isinstance(label, str) or not choices:
            raise HarnessError(f"search space label {label!r} has no choices",
                               fix="give every label a non-empty list of choices")
        if not all(isinstance(c, _SCALARS) for c in choices):
            raise HarnessError(f"label {label!r} has choices {choices!r}, not all JSON scalars",
                               fix="use int, float, str, bool or None as choice values")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise HarnessError(f"label {label!r} repeats a choice: {choices!r}",
                               fix="list each choice once")
        checked[label] = choices
    return dict(sorted(checked.items()))


class SampleValidator:
    """Checks samples against one search space quickly (a cached profile() is dominated by
    this): one dict look-up per label maps each accepted value to its exact choice."""

    def __init__(self, search_space: Mapping[str, Sequence[Any]]):
        self.choices = {label: list(values) for label, values in search_space.items()}
        self.labels = tuple(self.choices)
        self._tables = [{c: c for c in values} for values in self.choices.values()]
        # bool is an int in Python (True == 1 == 1.0), so a table finds 1 for True and True
        # for 1: labels with a choice equal to 0 or 1 get their bool-ness compared too.
        self._bool_labels = [i for i, values in enumerate(self.choices.values())
                             if any(c in (0, 1) for c in values if c is not None)]
        self._getter = (itemgetter(*self.labels) if len(self.labels) > 1
                        else (lambda sample, label=self.labels[0]: (sample[label],)))

    def values(self, sample: Mapping[str, Any]) -> Tuple[Any, ...]:
        """The sample's exact choices in label order (numpy integers become ints). Raises
        InvalidSample naming the label and the allowed values."""
        try:
            raw = self._getter(sample)
            values = tuple(map(dict.__getitem__, self._tables, raw))
        except (KeyError, TypeError):
            self._explain(sample)
        if len(sample) != len(values) or any(
                _is_bool(raw[i]) != isinstance(values[i], bool) for i in self._bool_labels):
            self._explain(sample)
        return values

    def __call__(self, sample: Mapping[str, Any]) -> Sample:
        """The validated sample as a dict in label order; see values()."""
        return dict(zip(self.labels, self.values(sample)))

    def _explain(self, sample: Any) -> NoReturn:
        if not isinstance(sample, Mapping):
            raise InvalidSample(f"a sample must be a dict {{label: value}}, got "
                                f"{type(sample).__name__}")
        unknown = sorted((label for label in sample if label not in self.choices), key=str)
        if unknown:
            raise InvalidSample(f"unknown label {unknown[0]!r} in sample",
                                fix=f"use only the space's labels: {', '.join(self.choices)}")
        for label, choices in self.choices.items():
            if label not in sample:
                raise InvalidSample(f"sample is missing label {label!r}",
                                    fix=f"give {label!r} one of {choices!r}")
            value = sample[label]
            try:
                choice = self._tables[self.labels.index(label)][value]
                known = _is_bool(value) == isinstance(choice, bool)
            except (KeyError, TypeError):
                known = False
            if not known:
                raise InvalidSample(f"label {label!r} has value {value!r}, not among the choices",
                                    fix=f"pick one of {choices!r} for {label!r}")
        raise AssertionError("sample judged invalid without a reason")  # pragma: no cover


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def validate_sample(search_space: Mapping[str, Sequence[Any]], sample: Mapping[str, Any]) -> Sample:
    """One-off validation; see SampleValidator (use it when checking many samples)."""
    return SampleValidator(search_space)(sample)


def sample_key(sample: Sample) -> str:
    """Canonical text of a validated sample: the sample index's key."""
    return json.dumps(sample, sort_keys=True, separators=(",", ":"))


def values_by_sample(by_key: Mapping[str, Any], labels: Sequence[str]) -> Dict[tuple, Any]:
    """`by_key` (sample index key -> value) keyed by each sample's choices in label order;
    keys that are not samples of these labels (other versions', damaged rows) are left out."""
    found = {}
    for key, value in by_key.items():
        try:
            sample = json.loads(key)
        except ValueError:
            continue
        if isinstance(sample, dict) and set(sample) == set(labels):
            found[tuple(sample[label] for label in labels)] = value
    return found


def random_samples(space: ModelSpace, count: int, seed: Optional[int] = 0) -> List[Sample]:
    """`count` samples drawn uniformly per label from a seeded generator (repeatable)."""
    choices = checked_search_space(space)
    rng = random.Random(seed)
    return [{label: rng.choice(values) for label, values in choices.items()}
            for _ in range(count)]


def enumerate_samples(space: ModelSpace) -> Iterator[Sample]:
    """Every sample of the space, in a fixed order (mind the size: see space_size)."""
    choices = checked_search_space(space)
    labels = list(choices)
    for values in itertools.product(*(choices[label] for label in labels)):
        yield dict(zip(labels, values))


def space_size(space: ModelSpace) -> int:
    """How many samples the space has (not how many distinct architectures)."""
    size = 1
    for values in checked_search_space(space).values():
        size *= len(values)
    return size


def space_fingerprint(space: ModelSpace, extra: Mapping[str, Any]) -> str:
    """A hash that changes when the space's code, labels, choices or config change, or when
    `extra` (input shapes, exporter settings) does: the sample index is valid only under it."""
    cls = type(space)
    try:
        source = inspect.getsource(inspect.getmodule(cls))  # type: ignore[arg-type]
    except (OSError, TypeError):
        source = cls.__qualname__
    config = getattr(space, "config")() if callable(getattr(space, "config", None)) else {}
    payload = {
        "class": f"{cls.__module__}.{cls.__qualname__}",
        "source_sha256": hashlib.sha256(source.encode()).hexdigest(),
        "search_space": checked_search_space(space),
        "config": config,
        "extra": dict(extra),
    }
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _import_path_has_current_folder() -> None:
    """Put the current folder first on the import path, as `python -m` does, so that
    `--space myspace:MySpace` finds ./myspace.py (a console script's path starts with its
    own folder instead). Nothing changes where it is already there ('' or its full path)."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def load_space(spec: str) -> ModelSpace:
    """Resolve 'package.module:ATTR' to a space: ATTR is an instance, or a class or factory
    called without arguments. The module is looked up as `python -m` would: the current
    folder first, then the installed packages."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise HarnessError(f"space {spec!r} is not of the form MODULE:ATTR",
                           fix="write it like harness.spaces:ProxylessSpace")
    _import_path_has_current_folder()
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise HarnessError(f"cannot import module {module_name!r} for space {spec!r}: {exc}",
                           fix=f"check the module path and that it is importable: a file in "
                               f"the current folder ({os.getcwd()}), installed, or on "
                               f"PYTHONPATH") from exc
    except (Exception, SystemExit) as exc:  # the module's own code failed as it was imported
        raise HarnessError(f"importing module {module_name!r} for space {spec!r} failed: "
                           f"{type(exc).__name__}: {exc}",
                           fix=f"fix the module; 'python -c \"import {module_name}\"' shows "
                               f"the traceback") from exc
    try:
        target = getattr(module, attr)
    except AttributeError:
        raise HarnessError(f"module {module_name!r} has no attribute {attr!r}",
                           fix="name one of the module's spaces: " + ", ".join(
                               n for n in dir(module) if not n.startswith("_")
                               and hasattr(getattr(module, n), "search_space"))) from None
    space = target
    if inspect.isclass(target) or (callable(target) and not hasattr(target, "search_space")):
        try:
            space = target()
        except Exception as exc:
            raise HarnessError(f"cannot create the space {spec}(): {type(exc).__name__}: {exc}",
                               fix="point --space at a space that needs no arguments, or at "
                                   "a module-level instance") from exc
    if not callable(getattr(space, "freeze", None)) or not (
            callable(getattr(space, "search_space", None))
            or callable(getattr(space, "simplify", None))):
        raise HarnessError(f"{spec} is not a model space (it needs search_space() and freeze())",
                           fix="point --space at a class or object implementing "
                               "harness.spaces.space.ModelSpace")
    return space
