"""Write scikit-learn forests as scikit-learn 0.23 pickled them (nn-Meter's official format).

scikit-learn 0.23 cannot be installed on this Python, so the tests build the old format from
a current forest: estimators pickled as `copyreg._reconstructor(cls, object, None)` plus a
state dict with 0.23's attribute names and `_sklearn_version` "0.23.1", and trees as
`Tree(n_features, n_classes, n_outputs)` plus a state whose node array has 0.23's seven-field
layout (no `missing_go_to_left`, 56 bytes per node).
"""
import copyreg
import io
import pickle

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.tree._tree import Tree

OLD_NODE_DTYPE = np.dtype([("left_child", "<i8"), ("right_child", "<i8"), ("feature", "<i8"),
                           ("threshold", "<f8"), ("impurity", "<f8"),
                           ("n_node_samples", "<i8"), ("weighted_n_node_samples", "<f8")])

# Attributes 0.23 did not have, and 0.23 names for renamed ones.
NEW_ONLY = ("n_features_in_", "monotonic_cst", "feature_names_in_", "_n_samples",
            "_n_samples_bootstrap", "_sample_weight", "estimator", "estimator_")
OLD_NAMES = {"n_features_in_": "n_features_", "estimator_": "base_estimator_",
             "estimator": "base_estimator"}


class _OldPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, Tree):
            n_features, n_classes, n_outputs = obj.__reduce__()[1]
            state = obj.__getstate__()
            nodes = np.zeros(state["nodes"].shape, dtype=OLD_NODE_DTYPE)
            for name in OLD_NODE_DTYPE.names:
                nodes[name] = state["nodes"][name]
            return Tree, (n_features, n_classes, n_outputs), {**state, "nodes": nodes}
        if isinstance(obj, BaseEstimator):
            state = dict(vars(obj))
            for new, old in OLD_NAMES.items():
                if new in state:
                    state[old] = state[new]
            for name in NEW_ONLY:
                state.pop(name, None)
            state.update(_sklearn_version="0.23.1", min_impurity_split=None)
            return copyreg._reconstructor, (type(obj), object, None), state
        return NotImplemented


def old_pickle_bytes(estimator) -> bytes:
    buffer = io.BytesIO()
    _OldPickler(buffer, protocol=2).dump(estimator)
    return buffer.getvalue()
