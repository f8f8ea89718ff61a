"""k-means and k-NN search with faiss (torch fallback for k-NN).

These are the harness's shared tools: every feature method is scored by
`kmeans`, and neighbour mining / CoNR's dataset scope use `knn`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


def _faiss():
    try:
        import faiss  # noqa: PLC0415

        return faiss
    except ImportError:  # pragma: no cover - faiss is a hard dependency; this keeps the fallback honest
        return None


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


@dataclass
class KMeansResult:
    labels: np.ndarray  # (n,) int64
    centroids: np.ndarray  # (K, d) float32
    inertia: float  # sum of squared distances to the assigned centroid (of the clustered, maybe normalised, data)
    restart: int  # which restart won


def kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007), O(n k d), float32.

    Each new centre is the best of 2 + log k candidates drawn with probability proportional to the squared
    distance to the nearest centre so far; the candidates' distances come from one matrix product.
    """
    n = len(x)
    centers = np.empty((k, x.shape[1]), dtype=np.float32)
    first = int(rng.integers(n))
    centers[0] = x[first]
    sq_norms = np.einsum("ij,ij->i", x, x)
    d2 = np.maximum(sq_norms - 2 * x @ centers[0] + sq_norms[first], 0)
    for j in range(1, k):
        total = float(d2.sum())
        if total <= 0:  # fewer distinct points than clusters
            idx = int(rng.integers(n))
            centers[j] = x[idx]
            d2 = np.minimum(d2, np.maximum(sq_norms - 2 * x @ x[idx] + sq_norms[idx], 0))
            continue
        cands = rng.choice(n, size=min(2 + int(np.log(k)), n), p=d2 / total)
        dc = np.maximum(sq_norms[:, None] - 2 * (x @ x[cands].T) + sq_norms[cands][None, :], 0)
        nd2 = np.minimum(d2[:, None], dc)
        best = int(np.argmin(nd2.sum(0)))  # the candidate that lowers the potential most (first on ties)
        centers[j] = x[cands[best]]
        d2 = np.ascontiguousarray(nd2[:, best])
    return centers


def kmeans(
    x,
    k: int,
    *,
    restarts: int = 10,
    iters: int = 100,
    spherical: bool = False,
    seed: int = 0,
) -> KMeansResult:
    """k-means with k-means++ seeding and several restarts; the lowest inertia wins.

    spherical=True clusters L2-normalised rows with normalised centroids (cosine k-means).
    Deterministic for a given seed.  Uses faiss (all points, no subsampling) when present.
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if x.ndim != 2:
        raise ValueError(f"k-means needs a 2-d feature matrix, got shape {x.shape}")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k-means: K={k} clusters for {n} points; K must be between 1 and the number of points")
    if not np.all(np.isfinite(x)):
        raise ValueError("k-means: the features hold NaN or infinite values")
    if spherical:
        x = l2_normalize(x)
    rng = np.random.default_rng(seed)
    faiss = _faiss()
    best: KMeansResult | None = None
    for r in range(restarts):
        init = kmeans_plusplus(x, k, rng)
        if faiss is not None:
            # faiss stops by itself once an iteration no longer lowers the objective
            km = faiss.Kmeans(d, k, niter=iters, spherical=spherical, seed=int(rng.integers(2**31 - 1)),
                              max_points_per_centroid=max(n, 1), min_points_per_centroid=1, verbose=False)
            km.train(x, init_centroids=init)
            centroids = km.centroids.copy()
            # with spherical=True faiss searches an inner-product index (similarities, not distances),
            # so the assignment comes from the index and the inertia is computed here, the same way for both
            _, labels = km.index.search(x, 1)
            labels = labels[:, 0].astype(np.int64)
            inertia = _inertia(x, centroids, labels)
        else:  # pragma: no cover - numpy Lloyd, same seeding
            centroids = init
            for _ in range(iters):
                dist = (x**2).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids**2).sum(1)
                labels = dist.argmin(1)
                for j in range(k):
                    m = labels == j
                    if m.any():
                        centroids[j] = x[m].mean(0)
                if spherical:
                    centroids = l2_normalize(centroids)
            dist = (x**2).sum(1, keepdims=True) - 2 * x @ centroids.T + (centroids**2).sum(1)
            labels = dist.argmin(1).astype(np.int64)
            inertia = float(np.maximum(dist[np.arange(n), labels], 0).sum())
        if best is None or inertia < best.inertia - 1e-9 * abs(inertia):
            best = KMeansResult(labels, centroids, inertia, r)
    assert best is not None
    return best


def _inertia(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray, chunk: int = 65536) -> float:
    """Sum of squared Euclidean distances of each point to its assigned centroid."""
    total = 0.0
    for s in range(0, len(x), chunk):
        diff = x[s : s + chunk] - centroids[labels[s : s + chunk]]
        total += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
    return total


def knn(
    x,
    k: int,
    *,
    queries=None,
    exclude_self: bool = True,
    backend: str = "auto",
    chunk: int = 4096,
    normalize: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours by inner product (cosine when normalize=True).

    Returns (similarities, indices), each (n_queries, k), best first.  With
    exclude_self (queries = x), each point's own entry is dropped: k+1 are asked
    for and the point itself removed wherever it appears.
    backend: "faiss" (IndexFlatIP), "torch" (chunked matmul + topk) or "auto" (faiss if importable).
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    if normalize:
        x = l2_normalize(x)
    self_query = queries is None
    q = x if self_query else np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    if normalize and not self_query:
        q = l2_normalize(q)
    drop = exclude_self and self_query
    kk = k + 1 if drop else k
    if kk > len(x):
        raise ValueError(f"k-NN: asked for {k} neighbours among {len(x)} points")
    faiss = _faiss() if backend in ("auto", "faiss") else None
    if backend == "faiss" and faiss is None:
        raise RuntimeError("knn backend 'faiss' requested but faiss is not installed")
    if faiss is not None:
        index = faiss.IndexFlatIP(x.shape[1])
        index.add(x)
        sims = np.empty((len(q), kk), dtype=np.float32)
        idx = np.empty((len(q), kk), dtype=np.int64)
        for s in range(0, len(q), chunk * 4):
            sims[s : s + chunk * 4], idx[s : s + chunk * 4] = index.search(q[s : s + chunk * 4], kk)
    else:
        sims, idx = _knn_torch(x, q, kk, chunk)
    if drop:
        sims, idx = _drop_self(sims, idx, k)
    return sims, idx


def _knn_torch(x: np.ndarray, q: np.ndarray, k: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    import torch

    xt = torch.from_numpy(x)
    sims = np.empty((len(q), k), dtype=np.float32)
    idx = np.empty((len(q), k), dtype=np.int64)
    for s in range(0, len(q), chunk):
        qs = torch.from_numpy(q[s : s + chunk])
        v, i = torch.topk(qs @ xt.T, k, dim=1)
        sims[s : s + chunk], idx[s : s + chunk] = v.numpy(), i.numpy()
    return sims, idx


def _drop_self(sims: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(idx)
    is_self = idx == np.arange(n)[:, None]
    # rows where self was not returned (duplicates tie ahead of it): drop the last column instead
    missing = ~is_self.any(1)
    is_self[missing, -1] = True
    keep = ~is_self
    return sims[keep].reshape(n, k), idx[keep].reshape(n, k)


def knn_ivf(x, k: int, *, nlist: int | None = None, nprobe: int = 16, exclude_self: bool = True, seed: int = 0):
    """Approximate k-NN (faiss IVF-Flat, inner product) for a million items and beyond."""
    faiss = _faiss()
    if faiss is None:
        raise RuntimeError("approximate k-NN needs faiss")
    x = l2_normalize(x)
    n, d = x.shape
    nlist = nlist or int(4 * np.sqrt(n))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    train = x[rng.choice(n, size=min(n, nlist * 64), replace=False)]
    index.train(train)
    index.add(x)
    index.nprobe = nprobe
    kk = k + 1 if exclude_self else k
    sims, idx = index.search(x, kk)
    if exclude_self:
        sims, idx = _drop_self(sims, idx, k)
    return sims, idx
