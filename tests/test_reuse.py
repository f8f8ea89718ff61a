"""Work the harness does once and reuses: features and k-means of unchanged weights, one copy of the images."""

from __future__ import annotations

import pytest

from bench.config import compose
from bench.runner import execute

TINY = ["dataset=digits", "byol.width=8", "byol.proj_hidden=64", "byol.pred_hidden=64", "byol.proj_dim=32",
        "byol.batch_size=256", "byol.warmup_epochs=1", "train.num_threads=1", "train.progress=false"]


@pytest.fixture
def counted(monkeypatch):
    """Counts of feature extractions (per image set) and k-means runs."""
    import bench.cluster
    import methods.byol

    calls = {"extract": 0, "kmeans": 0}
    real_extract, real_kmeans = methods.byol.extract, bench.cluster.kmeans

    def extract(*a, **kw):
        calls["extract"] += 1
        return real_extract(*a, **kw)

    def kmeans(*a, **kw):
        calls["kmeans"] += 1
        return real_kmeans(*a, **kw)

    monkeypatch.setattr(methods.byol, "extract", extract)
    monkeypatch.setattr(bench.cluster, "kmeans", kmeans)
    return calls


def test_transductive_evaluation_shares_the_training_images():
    from bench.config import to_container
    from bench.data import build_bundle

    data = build_bundle(to_container(compose(["dataset=digits"]).dataset))
    assert data.eval_is_train and data.eval is data.train


def test_byol_predicts_from_its_last_evaluation(tmp_path, counted):
    rec = execute(compose(["method=byol", *TINY, "byol.epochs=2", "train.eval_every=2", f"results_dir={tmp_path}"]))
    assert rec["status"] == "completed"
    # one evaluation (epoch 2); the prediction reuses its features and k-means
    assert counted == {"extract": 1, "kmeans": 1}
    assert rec["history"][-1]["nmi"] == pytest.approx(rec["metrics"]["nmi"])


def test_conr_reuses_the_warm_up_evaluation_and_its_last_refresh(tmp_path, counted):
    rec = execute(compose(["method=conr", *TINY, "byol.epochs=3", "conr.warmup_epochs=1", "train.eval_every=1",
                           f"results_dir={tmp_path}"]))
    assert rec["status"] == "completed"
    # warm-up evaluation (epoch 1), the refresh after each of the two CoNR epochs; the phase's first refresh
    # and the final prediction reuse what the weights have not changed since
    assert counted == {"extract": 3, "kmeans": 3}
    assert rec["history"][-1]["nmi"] == pytest.approx(rec["metrics"]["nmi"])


def test_changed_weights_or_other_images_are_extracted_again(tmp_path):
    import torch

    from bench.config import to_container
    from bench.data import build_bundle
    from bench.runner import RunContext
    from methods.byol import BYOLStage

    cfg = compose(["method=byol", *TINY, f"results_dir={tmp_path}"])

    data = build_bundle(to_container(cfg.dataset))
    ctx = RunContext(cfg=cfg, run_dir=tmp_path / "run", device="cpu", seed=0, record={})
    ctx.run_dir.mkdir(parents=True)
    st = BYOLStage(ctx, data)
    images = data.train.images[:64]
    a = st.features(images)
    assert st.features(images) is a
    assert st.features(images.clone()) is not a  # equal content, another tensor: extracted again
    b = st.features(images)
    with torch.no_grad():
        next(st.net.target.parameters()).add_(0.01)
    c = st.features(images)
    assert c is not b and not (c == b).all()
    st.net.target.backbone.body[1].running_mean.add_(1.0)  # a buffer counts as a weight too
    assert st.features(images) is not c
