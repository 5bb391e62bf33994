"""Load scikit-learn kernel predictors pickled by old scikit-learn releases.

nn-Meter's official predictors are RandomForestRegressor pickles written by scikit-learn 0.23.
Since 1.3, scikit-learn's tree nodes carry one more field (`missing_go_to_left`), so
unpickling them fails with "node array from the pickle has an incompatible dtype", and later
releases also renamed or added estimator attributes (`n_features_` -> `n_features_in_`,
`base_estimator_` -> `estimator_`, `monotonic_cst`, ...).

`load_kernel_predictor` migrates such a pickle while it loads: every tree's node array is
copied field by field into the current node layout (the new field set to 0, "missing values
go right", which is what old trees did implicitly, as they never saw missing values), and the
renamed attributes are given their new names. The numbers that decide a prediction
(thresholds, features, children, leaf values) are copied bit for bit, so the migrated model
predicts exactly what it predicted under 0.23. Current pickles load unchanged.

A pickle is a program: unpickling runs whatever callables it names. So a predictor file is
code, and is loaded through an unpickler that resolves only what a scikit-learn regressor
needs (scikit-learn estimator classes and its tree, numpy's array and scalar rebuilders, a
few harmless builtins) and refuses everything else with UnsafePickleError, before anything
the file names is called.
"""
import functools
import logging
import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np

from harness.errors import HarnessError

log = logging.getLogger(__name__)

TREE_CLASS = ("sklearn.tree._tree", "Tree")

# Fitted attributes that later scikit-learn releases renamed: old name -> new name.
RENAMED_ATTRIBUTES = {"n_features_": "n_features_in_", "base_estimator_": "estimator_",
                      "base_estimator": "estimator"}


# Globals a predictor pickle may name besides scikit-learn's estimator classes and its Tree:
# how pickle rebuilds plain objects, bytes (protocol 2) and builtin containers, and how numpy
# rebuilds arrays, dtypes, scalars and random states (numpy 1 and numpy 2 module names).
# Protocol 0-2 pickles name Python 2's modules (copy_reg, __builtin__).
ALLOWED_GLOBALS = frozenset(
    [(module, "_reconstructor") for module in ("copyreg", "copy_reg")]
    + [(module, name) for module in ("builtins", "__builtin__")
       for name in ("object", "set", "frozenset", "slice", "complex", "bytearray")]
    + [("_codecs", "encode"), ("numpy", "dtype"), ("numpy", "ndarray")]
    + [(f"numpy.{core}.{module}", name) for core in ("core", "_core")
       for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                            ("numeric", "_frombuffer"))]
    + [("numpy.random._pickle", name) for name in ("__randomstate_ctor",
                                                    "__bit_generator_ctor", "__generator_ctor")]
    + [(f"numpy.random._{module}", name) for module, name in (
        ("mt19937", "MT19937"), ("pcg64", "PCG64"), ("pcg64", "PCG64DXSM"),
        ("philox", "Philox"), ("sfc64", "SFC64"))])

_SKLEARN_MODULE = re.compile(r"sklearn(\.[A-Za-z_][A-Za-z0-9_]*)+")


class LegacyPickleError(Exception):
    """A predictor pickle that cannot be loaded or migrated."""


class UnsafePickleError(LegacyPickleError, HarnessError):
    """A predictor pickle names something a scikit-learn regressor does not need (a function
    that runs commands, say): it is refused before anything it names is called."""

    FIX = ("predictor files are code that runs when loaded: use only predictors from nn-Meter's "
           "releases or built by 'harness calibrate', and delete this one unless you know "
           "where it came from")


def _migrate_tree_state(state: Dict[str, Any]) -> Dict[str, Any]:
    """A tree's pickled state with its node array in this scikit-learn's layout."""
    from sklearn.tree._tree import NODE_DTYPE

    nodes = state.get("nodes")
    if not isinstance(nodes, np.ndarray) or nodes.dtype.names is None:
        raise LegacyPickleError("a tree in the pickle has no node array")
    if nodes.dtype == NODE_DTYPE:
        return state
    missing = [name for name in NODE_DTYPE.names
               if name not in nodes.dtype.names and name != "missing_go_to_left"]
    if missing:
        raise LegacyPickleError(f"tree nodes lack the fields {missing}; this is not a "
                                "scikit-learn tree pickle this loader knows")
    migrated = np.zeros(nodes.shape, dtype=NODE_DTYPE)
    for name in NODE_DTYPE.names:
        if name in nodes.dtype.names:
            migrated[name] = nodes[name]
    return {**state, "nodes": migrated}


@functools.lru_cache(maxsize=None)
def _legacy_tree_class() -> type:
    """Made on first use (scikit-learn is imported only when a pickle is loaded), then kept."""
    from sklearn.tree._tree import Tree

    class LegacyTree(Tree):
        """A Tree whose pickled node array is migrated before it is set. Pickling it again
        writes a plain, current `Tree` (Tree.__reduce__ names the base class)."""

        def __setstate__(self, state: Dict[str, Any]) -> None:
            super().__setstate__(_migrate_tree_state(state))

    return LegacyTree


class _MigratingUnpickler(pickle.Unpickler):
    """Resolves only the globals a scikit-learn regressor pickle needs (see ALLOWED_GLOBALS
    and _sklearn_class); swaps in LegacyTree for scikit-learn's Tree."""

    def __init__(self, file: Any):
        super().__init__(file)
        self._legacy_tree = _legacy_tree_class()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == TREE_CLASS:
            return self._legacy_tree
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if _SKLEARN_MODULE.fullmatch(module) and not any(
                part.startswith(("test", "conftest", "_test")) for part in module.split(".")):
            found = super().find_class(module, name)
            if _sklearn_class(found):
                return found
        raise UnsafePickleError(
            f"the pickle names {module}.{name}, which a scikit-learn kernel predictor does not "
            f"need; refused before it could run (a predictor file is code that runs when "
            f"loaded)", fix=UnsafePickleError.FIX)


def _sklearn_class(found: Any) -> bool:
    """A scikit-learn estimator class or its tree, defined in scikit-learn itself (not a
    function, and not something a scikit-learn module merely imported)."""
    from sklearn.base import BaseEstimator
    from sklearn.tree._tree import Tree

    return (isinstance(found, type) and getattr(found, "__module__", "").startswith("sklearn.")
            and issubclass(found, (BaseEstimator, Tree)))


def _migrate_estimator(estimator: Any, seen: set) -> None:
    """Give an unpickled estimator (and those inside it) the attributes this scikit-learn
    reads: renamed attributes under their new names, and constructor parameters added since
    (monotonic_cst, ...) at their defaults."""
    from sklearn.base import BaseEstimator

    if id(estimator) in seen or not isinstance(estimator, BaseEstimator):
        return
    seen.add(id(estimator))
    state = vars(estimator)
    for old, new in RENAMED_ATTRIBUTES.items():
        if old in state and new not in state:
            state[new] = state[old]
    for name, default in type(estimator)().get_params(deep=False).items():
        state.setdefault(name, default)
    for value in list(state.values()):
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            _migrate_estimator(item, seen)


def load_kernel_predictor(path: Union[str, Path]) -> Any:
    """Unpickle a kernel predictor (any scikit-learn regressor), migrating 0.23-era pickles.

    Raises LegacyPickleError naming the file when it is not a predictor pickle, and
    UnsafePickleError (a LegacyPickleError too) when it names anything a scikit-learn
    regressor does not need: predictor files are code, so nothing else in them is called."""
    path = Path(path)
    try:
        with open(path, "rb") as handle, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            predictor = _MigratingUnpickler(handle).load()
    except UnsafePickleError as exc:
        raise UnsafePickleError(f"{path}: {exc.message}", fix=exc.fix) from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError,
            TypeError, IndexError, KeyError, LegacyPickleError) as exc:
        raise LegacyPickleError(f"{path}: not a loadable predictor pickle "
                                f"({type(exc).__name__}: {exc})") from None
    if not callable(getattr(predictor, "predict", None)):
        raise LegacyPickleError(f"{path}: holds a {type(predictor).__name__}, which has no "
                                "predict(); a kernel predictor is a scikit-learn regressor")
    written_by = getattr(predictor, "_sklearn_version", None)
    _migrate_estimator(predictor, set())
    if any("version" in str(w.message) for w in caught):
        log.info("%s: written by scikit-learn %s, migrated on load", path.name, written_by)
    return predictor
