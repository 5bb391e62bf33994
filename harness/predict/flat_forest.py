"""A fitted scikit-learn random forest, evaluated over all its trees at once.

nn-Meter's kernel predictors are RandomForestRegressors of 200-600 trees. scikit-learn runs
a forest tree by tree, each through joblib's dispatch: 40-80 ms a call whatever the number
of rows, which made the kernels new to a prediction cost more than detecting them. Here the
trees' arrays (the public `tree_` structure scikit-learn documents for this kind of use) are
stacked and walked together, one level of every tree per numpy step, so a call costs a
millisecond or two. The answer is scikit-learn's to the last bit: the same float32 features
compared with the same float64 thresholds, the trees' values summed in tree order and
divided by their number, as its predict does (tests/test_predict.py checks equality).
"""
from typing import Any, Sequence

import numpy as np

LEAF = -1  # sklearn.tree._tree.TREE_LEAF


class FlatForest:
    """The trees of a fitted single-output RandomForestRegressor as padded arrays."""

    def __init__(self, forest: Any):
        trees = [estimator.tree_ for estimator in forest.estimators_]
        width = max(tree.node_count for tree in trees)
        shape = (len(trees), width)
        self.left = np.full(shape, LEAF, dtype=np.int64)
        self.right = np.full(shape, LEAF, dtype=np.int64)
        self.feature = np.zeros(shape, dtype=np.int64)
        self.threshold = np.zeros(shape, dtype=np.float64)
        self.value = np.zeros(shape, dtype=np.float64)
        for index, tree in enumerate(trees):
            count = tree.node_count
            self.left[index, :count] = tree.children_left
            self.right[index, :count] = tree.children_right
            self.feature[index, :count] = np.maximum(tree.feature, 0)  # leaves: -2
            self.threshold[index, :count] = tree.threshold
            self.value[index, :count] = tree.value[:, 0, 0]
        self.features_in = int(forest.n_features_in_)
        self.depth = max(tree.max_depth for tree in trees)

    def predict(self, rows: Sequence[Sequence[float]]) -> np.ndarray:
        """The forest's prediction for each row, as RandomForestRegressor.predict gives it."""
        features = np.asarray(rows, dtype=np.float32).astype(np.float64)
        if features.ndim != 2 or features.shape[1] != self.features_in:
            raise ValueError(f"rows of {self.features_in} features expected, "
                             f"got an array of shape {features.shape}")
        trees = np.arange(self.left.shape[0])[None, :]
        row_index = np.arange(len(features))[:, None]
        node = np.zeros((len(features), self.left.shape[0]), dtype=np.int64)
        for _ in range(self.depth):
            left = self.left[trees, node]
            inner = left != LEAF
            if not inner.any():
                break
            goes_left = features[row_index, self.feature[trees, node]] <= \
                self.threshold[trees, node]
            node = np.where(inner, np.where(goes_left, left, self.right[trees, node]), node)
        values = self.value[trees, node]
        total = np.zeros(len(features), dtype=np.float64)
        for column in values.T:  # tree by tree, as scikit-learn accumulates them
            total += column
        return total / values.shape[1]
