"""Benchmarks of the harness's costly parts: k-NN, k-means, metrics, CoNR's re-ranking, training steps, loading.

Run with `make perf` (pytest tests/perf --benchmark-only --benchmark-json=results/perf/latest.json);
the default `pytest` run skips them (--benchmark-skip).  Each benchmark stores in extra_info the size it
ran at (`n`), a `series` name used by scripts/perf_plot.py, and the derived figures (ratios, recall,
images/s).  Ratios between two benchmarks are written by the second one of each pair, from the first
one's time kept in RATIOS.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from bench import cluster

ROOT = Path(__file__).resolve().parents[2]
TIMES: dict[str, float] = {}  # mean seconds of benchmarks already run, for the ratios


def clustered(n: int, d: int, clusters: int = 20, seed: int = 0, noise: float = 0.6, chunk: int = 65536) -> np.ndarray:
    """n x d float32 points around `clusters` random unit centres, made in chunks (no float64 copy of the whole)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        lab = rng.integers(clusters, size=m)
        out[s : s + m] = centres[lab] + rng.standard_normal((m, d), dtype=np.float32) * (noise / np.sqrt(d))
    return out


def _mean(benchmark) -> float:
    return float(benchmark.stats.stats.mean)


def _info(benchmark, series: str, n: int, **extra) -> None:
    benchmark.extra_info.update({"series": series, "n": int(n), **extra})


# --------------------------------------------------------------------------- exact k-NN


@pytest.fixture(scope="module")
def feats512() -> dict[int, np.ndarray]:
    return {n: clustered(n, 512, seed=n) for n in (13_000, 60_000)}


@pytest.mark.parametrize("n", [13_000, 60_000])
@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_exact(benchmark, feats512, backend, n):
    x = feats512[n]
    sims, idx = benchmark.pedantic(cluster.knn, args=(x, 20), kwargs={"backend": backend}, rounds=1, iterations=1)
    assert idx.shape == (n, 20)
    TIMES[f"knn_{backend}_{n}"] = _mean(benchmark)
    extra = {"d": 512, "k": 20, "backend": backend}
    if backend == "torch" and f"knn_faiss_{n}" in TIMES:
        ref = cluster.knn(x[:2000], 20, queries=x[:2000], exclude_self=False, backend="faiss")[1]
        mine = cluster.knn(x[:2000], 20, queries=x[:2000], exclude_self=False, backend="torch")[1]
        extra["faiss_speedup_over_torch"] = TIMES[f"knn_torch_{n}"] / TIMES[f"knn_faiss_{n}"]
        extra["same_neighbours_on_2000"] = float(np.mean([len(set(a) & set(b)) / 20 for a, b in zip(ref, mine)]))
    _info(benchmark, f"knn exact ({backend}), d=512", n, **extra)


# --------------------------------------------------------------------------- approximate k-NN (IVF)

IVF_N, IVF_D, SAMPLE = 1_000_000, 256, 1_000


@pytest.fixture(scope="module")
def million():
    return clustered(IVF_N, IVF_D, clusters=200, seed=1)


def test_knn_ivf_million(benchmark, million):
    x = million
    _, idx = benchmark.pedantic(cluster.knn_ivf, args=(x, 20), rounds=1, iterations=1)
    t_ivf = _mean(benchmark)
    del _
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(IVF_N, size=SAMPLE, replace=False))
    import time

    t0 = time.perf_counter()
    _, ex = cluster.knn(x, 21, queries=x[sample], exclude_self=False, backend="faiss")
    t_exact_sample = time.perf_counter() - t0
    recall = []
    for row, q in enumerate(sample):
        truth = [j for j in ex[row] if j != q][:20]
        recall.append(len(set(truth) & set(idx[q].tolist())) / 20)
    t_exact_full = t_exact_sample * IVF_N / SAMPLE
    _info(benchmark, "knn IVF (faiss), d=256", IVF_N, d=IVF_D, k=20, nlist=int(4 * np.sqrt(IVF_N)), nprobe=16,
          recall_at_20=float(np.mean(recall)), exact_sample_s=t_exact_sample, exact_full_extrapolated_s=t_exact_full,
          speedup_over_exact=t_exact_full / t_ivf,
          note="IVF time: train + add + search of all 1,000,000 points; exact time: IndexFlatIP search of "
               "1,000 sampled queries against all points, extrapolated x1000")
    assert np.mean(recall) > 0.5


# --------------------------------------------------------------------------- k-means

KM_RESTARTS, KM_ITERS = 3, 50


@pytest.fixture(scope="module")
def feats256():
    return clustered(60_000, 256, clusters=20, seed=2)


@pytest.mark.parametrize("k", [10, 20])
def test_kmeans_faiss(benchmark, feats256, k):
    res = benchmark.pedantic(cluster.kmeans, args=(feats256, k),
                             kwargs={"restarts": KM_RESTARTS, "iters": KM_ITERS}, rounds=2, iterations=1)
    TIMES[f"kmeans_faiss_{k}"] = _mean(benchmark)
    _info(benchmark, f"k-means faiss, K={k}", len(feats256), d=256, K=k, restarts=KM_RESTARTS, iters=KM_ITERS,
          inertia=res.inertia)


@pytest.mark.parametrize("k", [10, 20])
def test_kmeans_sklearn(benchmark, feats256, k):
    from sklearn.cluster import KMeans

    def run():
        return KMeans(n_clusters=k, n_init=KM_RESTARTS, max_iter=KM_ITERS, tol=0.0, init="k-means++",
                      algorithm="lloyd", random_state=0).fit(feats256)

    km = benchmark.pedantic(run, rounds=2, iterations=1)
    extra = {"d": 256, "K": k, "restarts": KM_RESTARTS, "iters": KM_ITERS, "inertia": float(km.inertia_),
             "n_iter": int(km.n_iter_)}
    if f"kmeans_faiss_{k}" in TIMES:
        extra["faiss_speedup_over_sklearn"] = _mean(benchmark) / TIMES[f"kmeans_faiss_{k}"]
    _info(benchmark, f"k-means scikit-learn, K={k}", len(feats256), **extra)


# --------------------------------------------------------------------------- metrics


def test_metrics_evaluate(benchmark):
    from bench.metrics import evaluate

    rng = np.random.default_rng(3)
    y = rng.integers(10, size=60_000)
    pred = np.where(rng.random(60_000) < 0.7, (y + 3) % 10, rng.integers(10, size=60_000))
    m = benchmark.pedantic(evaluate, args=(y, pred), rounds=3, iterations=1, warmup_rounds=1)
    _info(benchmark, "metrics (NMI+ACC+ARI)", 60_000, **m)


# --------------------------------------------------------------------------- CoNR re-ranking


@pytest.mark.parametrize("n", [512, 1024, 4096])
def test_conaff_batch(benchmark, n):
    import torch
    import torch.nn.functional as F

    from methods.conr import conaff_neighbours

    z = F.normalize(torch.from_numpy(clustered(n, 256, seed=4)), dim=1)
    with torch.no_grad():
        rounds = 3 if n <= 1024 else 1
        nb = benchmark.pedantic(conaff_neighbours, args=(z,), rounds=rounds, iterations=1, warmup_rounds=1)
    assert nb.shape == (n, 10)
    _info(benchmark, "CoNR ConAff, batch scope, d=256", n, d=256)


def test_conaff_dataset(benchmark, feats256):
    from methods.conr import dataset_conaff

    bank = cluster.l2_normalize(feats256)
    nb = benchmark.pedantic(dataset_conaff, args=(bank,), rounds=1, iterations=1)
    assert nb.shape == (len(bank), 10)
    _info(benchmark, "CoNR ConAff, dataset scope, d=256", len(bank), d=256)


# --------------------------------------------------------------------------- training steps


STEP_CASES = [("small_cnn", 128), ("resnet18_cifar", 32)]  # ResNet-18: the paper's CIFAR backbone
STEP_KINDS = ["bare", "target", "model", "byol", "conr"]  # see bench/stepbench.py
STEP_ROUNDS = 9


@pytest.mark.parametrize(("backbone", "batch"), STEP_CASES, ids=[f"{b}-b{n}" for b, n in STEP_CASES])
def test_train_steps(benchmark, backbone, batch):
    """One round = one step of each kind, interleaved (the order reversed every other round), so slow drifts
    of the machine's speed fall on every kind alike; the ratios come from the per-kind medians."""
    import statistics
    import time

    from bench.stepbench import build_steps

    fns = build_steps(backbone, batch, "cpu")
    times: dict[str, list[float]] = {k: [] for k in STEP_KINDS}
    calls = iter(range(10**6))

    def one_round() -> None:
        i = next(calls)
        for kind in STEP_KINDS if i % 2 == 0 else STEP_KINDS[::-1]:
            t0 = time.perf_counter()
            fns[kind](i)
            if i > 0:  # call 0 is the warm-up round
                times[kind].append(time.perf_counter() - t0)

    benchmark.pedantic(one_round, rounds=STEP_ROUNDS, iterations=1, warmup_rounds=1)
    med = {k: statistics.median(v) for k, v in times.items()}
    info = {"backbone": backbone, "batch": batch, "rounds": STEP_ROUNDS, "median_s": med,
            "images_per_s": {k: batch / t for k, t in med.items()}}
    for m in ("byol", "conr"):
        info[m] = {"fraction_of_bare": med["bare"] / med[m],
                   "backbone_share": (med["bare"] + med["target"]) / med[m],  # online fwd+bwd, target fwd
                   "model_share": med["model"] / med[m]}  # all network work, without indexing and augmentation
    benchmark.extra_info.update({"steps": f"train steps ({backbone})", **info})
    assert med["model"] > med["bare"]


# --------------------------------------------------------------------------- data loading


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    per = 10_000
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [s.encode() for s in names], b"num_cases_per_batch": per}, fh, protocol=2)
    rng = np.random.default_rng(5)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entry = {b"batch_label": name.encode(), b"labels": rng.integers(10, size=per).tolist(),
                 b"data": rng.integers(0, 256, size=(per, 3072), dtype=np.uint8),
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    return root


def test_build_bundle_cifar10(benchmark, cifar_root, monkeypatch):
    from bench.config import compose, to_container
    from bench.data import build_bundle

    monkeypatch.setenv("BENCH_DATA_VERIFY", "never")
    card = to_container(compose(["dataset.download=false", f"dataset.root={cifar_root}"], dataset="cifar10").dataset)
    bundle = benchmark.pedantic(build_bundle, args=(card,), rounds=3, iterations=1)
    n = len(bundle.train.labels)
    assert n == 60_000
    _info(benchmark, "build_bundle cifar10 (pickles)", n, images_per_s=n / _mean(benchmark))


# --------------------------------------------------------------------------- peak memory of evaluation at 1M x 256

MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import numpy as np
    import faiss, sklearn.metrics  # noqa: F401  (imported before the baseline)
    from bench.cluster import kmeans
    from bench.metrics import evaluate

    # CLUSTERED

    n, d = int(sys.argv[1]), int(sys.argv[2])
    x = clustered(n, d, clusters=10, seed=6)
    y = np.random.default_rng(7).integers(10, size=n)
    kib = 1024  # ru_maxrss is in KiB on Linux


    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * kib


    # ru_maxrss of a child keeps the parent's peak from before exec (Linux folds the old mm's high-water mark
    # into it), so the high-water mark of this process image, VmHWM, is read beside it
    base_maxrss, base_rss, base_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib, status("VmRSS"), status("VmHWM")
    res = kmeans(x, 10, restarts=2, iters=20)
    m = evaluate(y, res.labels)
    peak_maxrss, peak_hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib, status("VmHWM")
    extra = max(peak_maxrss - base_maxrss, peak_hwm - base_rss)
    print(json.dumps({"features_bytes": x.nbytes, "baseline_maxrss_bytes": base_maxrss, "baseline_rss_bytes": base_rss,
                      "baseline_hwm_bytes": base_hwm, "peak_maxrss_bytes": peak_maxrss, "peak_hwm_bytes": peak_hwm,
                      "peak_extra_bytes": extra, "ratio": extra / x.nbytes, **m}))
""")


def test_memory_evaluate_million(benchmark):
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}

    def run():
        script = MEMORY_SCRIPT.replace("# CLUSTERED", inspect.getsource(clustered))
        out = subprocess.run([sys.executable, "-c", script, str(IVF_N), str(IVF_D)],
                             capture_output=True, text=True, check=True, env=env, cwd=ROOT)
        return json.loads(out.stdout.strip().splitlines()[-1])

    r = benchmark.pedantic(run, rounds=1, iterations=1)
    _info(benchmark, "k-means K=10 (2 restarts, 20 iters) + evaluate, d=256, subprocess", IVF_N, **r)
    assert r["ratio"] <= 3.0, r
