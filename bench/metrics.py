"""The one evaluation every method shares: ACC (Hungarian), NMI and ARI.

All three are fractions in [0, 1] (ARI can dip below 0 for worse-than-chance labelings).
"""

from __future__ import annotations

import numpy as np


def _as_labels(y, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be a 1-d array of labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold integer labels, got dtype {y.dtype}")
    return y.astype(np.int64, copy=False)


def contingency(y_true, y_pred) -> np.ndarray:
    """Counts[c, k]: how many samples of class c went to cluster k (labels re-indexed densely)."""
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    _, t = np.unique(y_true, return_inverse=True)
    _, p = np.unique(y_pred, return_inverse=True)
    m = np.zeros((t.max() + 1 if len(t) else 0, p.max() + 1 if len(p) else 0), dtype=np.int64)
    np.add.at(m, (t, p), 1)
    return m


def cluster_acc(y_true, y_pred) -> float:
    """Best one-to-one map of clusters to classes (scipy's linear_sum_assignment).

    Works when the number of clusters differs from the number of classes: the
    assignment is rectangular and samples of unmatched clusters count as wrong.
    """
    from scipy.optimize import linear_sum_assignment

    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("cannot score an empty labeling")
    m = contingency(y_true, y_pred)
    rows, cols = linear_sum_assignment(m, maximize=True)
    return float(m[rows, cols].sum() / len(y_true))


def nmi(y_true, y_pred) -> float:
    from sklearn.metrics import normalized_mutual_info_score

    return float(normalized_mutual_info_score(_as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")))


def ari(y_true, y_pred) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(_as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")))


def evaluate(y_true, y_pred) -> dict[str, float]:
    """NMI, ACC and ARI of a labeling; samples with y_true < 0 (unlabelled) are left out."""
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    keep = y_true >= 0
    y_true, y_pred = y_true[keep], y_pred[keep]
    return {"nmi": nmi(y_true, y_pred), "acc": cluster_acc(y_true, y_pred), "ari": ari(y_true, y_pred)}
