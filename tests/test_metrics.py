import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from bench.metrics import cluster_acc, evaluate


def brute_force_acc(y_true, y_pred) -> float:
    """Best accuracy over every injective map from clusters to classes (or classes to clusters)."""
    classes, clusters = np.unique(y_true), np.unique(y_pred)
    best = 0
    if len(clusters) <= len(classes):
        for perm in itertools.permutations(classes, len(clusters)):
            m = dict(zip(clusters, perm))
            best = max(best, sum(m[p] == t for p, t in zip(y_pred, y_true)))
    else:
        for perm in itertools.permutations(clusters, len(classes)):
            m = dict(zip(perm, classes))
            best = max(best, sum(m.get(p, -1) == t for p, t in zip(y_pred, y_true)))
    return best / len(y_true)


def test_acc_is_one_under_any_permutation():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, size=300)
    for perm in [rng.permutation(6) for _ in range(5)]:
        assert cluster_acc(y, perm[y]) == 1.0


@pytest.mark.parametrize("k_pred", [2, 3, 4, 5, 6])
def test_acc_matches_brute_force_with_fewer_and_more_clusters(k_pred):
    rng = np.random.default_rng(k_pred)
    for _ in range(5):
        y = rng.integers(0, 4, size=40)
        p = rng.integers(0, k_pred, size=40)
        assert cluster_acc(y, p) == pytest.approx(brute_force_acc(y, p))


def test_acc_unmatched_clusters_count_as_wrong_not_zero():
    y = np.array([0, 0, 1, 1])
    p = np.array([0, 1, 2, 3])  # four singleton clusters, two classes: two can be matched
    assert cluster_acc(y, p) == 0.5


def test_nmi_ari_equal_sklearn():
    rng = np.random.default_rng(1)
    y, p = rng.integers(0, 10, 500), rng.integers(0, 7, 500)
    m = evaluate(y, p)
    assert m["nmi"] == pytest.approx(normalized_mutual_info_score(y, p))
    assert m["ari"] == pytest.approx(adjusted_rand_score(y, p))


def test_unlabelled_samples_are_left_out():
    y = np.array([0, 0, 1, 1, -1, -1])
    p = np.array([1, 1, 0, 0, 0, 1])
    assert evaluate(y, p) == {"nmi": 1.0, "acc": 1.0, "ari": 1.0}


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="labels"):
        cluster_acc([0, 1], [0])
    with pytest.raises(ValueError, match="integer"):
        cluster_acc([0.5, 1.0], [0, 1])
