"""SCAN and NNM: losses, masks and head selection on hand-computed values, and small runs on digits."""

import inspect
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from methods.heads import (
    ClusterModel,
    batch_nearest_neighbour,
    class_balance_weights,
    cluster_level_loss,
    confidence_mask,
    entropy,
    head_losses,
    nnm_loss,
    scan_loss,
    select_head,
    selflabel_loss,
)
from methods.simclr import nt_xent


def logits_of(p) -> torch.Tensor:
    """Logits whose softmax is exactly p (rows sum to 1)."""
    return torch.log(torch.tensor(p, dtype=torch.float64))


# --------------------------------------------------------------------------- SCAN loss


def test_scan_loss_hand_computed():
    pa = [[0.5, 0.5], [0.9, 0.1]]
    pn = [[0.5, 0.5], [0.1, 0.9]]
    total, cons, ent = scan_loss(logits_of(pa), logits_of(pn), entropy_weight=5.0)
    # <p_a, p_n> = 0.5 and 0.09 + 0.09 = 0.18; mean anchor prediction (0.7, 0.3)
    want_cons = -(math.log(0.5) + math.log(0.18)) / 2
    want_ent = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    assert cons.item() == pytest.approx(want_cons, rel=1e-5)
    assert ent.item() == pytest.approx(want_ent, rel=1e-5)
    assert total.item() == pytest.approx(want_cons - 5.0 * want_ent, rel=1e-5)


def test_scan_entropy_term_sign_and_weight():
    # same consistency (every pair agrees with certainty), different balance of clusters
    collapsed = logits_of([[1 - 1e-9, 1e-9]] * 4)
    balanced = logits_of([[1 - 1e-9, 1e-9], [1e-9, 1 - 1e-9]] * 2)
    t_col, c_col, e_col = scan_loss(collapsed, collapsed, entropy_weight=5.0)
    t_bal, c_bal, e_bal = scan_loss(balanced, balanced, entropy_weight=5.0)
    assert c_col.item() == pytest.approx(c_bal.item(), abs=1e-6)
    assert e_col.item() == pytest.approx(0.0, abs=1e-6)
    assert e_bal.item() == pytest.approx(math.log(2), rel=1e-6)
    # entropy is subtracted: the balanced batch has the lower loss, by exactly weight x log 2
    assert t_col.item() - t_bal.item() == pytest.approx(5.0 * math.log(2), rel=1e-5)
    t0, _, _ = scan_loss(balanced, balanced, entropy_weight=0.0)
    assert t0.item() == pytest.approx(c_bal.item(), abs=1e-9)
    # gradient descent on the total pushes a collapsed mean towards balance
    x = torch.tensor([[2.0, 0.0], [2.0, 0.0]], requires_grad=True)
    scan_loss(x, x.detach(), entropy_weight=5.0)[0].backward()
    assert x.grad[:, 0].sum() > 0  # lowering cluster 0's logit lowers the loss


def test_entropy_matches_definition():
    p = torch.tensor([0.2, 0.3, 0.5])
    assert entropy(p).item() == pytest.approx(-sum(v * math.log(v) for v in (0.2, 0.3, 0.5)), rel=1e-6)
    assert entropy(torch.tensor([1.0, 0.0])).item() == pytest.approx(0.0, abs=1e-7)


# --------------------------------------------------------------------------- self-label


def test_selflabel_mask_and_class_weights():
    probs = torch.tensor([[0.995, 0.005, 0.0], [0.999, 0.001, 0.0], [0.2, 0.8, 0.0], [0.001, 0.999, 0.0],
                          [0.0, 0.0, 0.98]])
    mask, targets = confidence_mask(probs, 0.99)
    assert mask.tolist() == [True, True, False, True, False]
    assert targets[mask].tolist() == [0, 0, 1]
    # n / count_c over the confident samples: 3 / 2 and 3 / 1; absent class 2 gets 1
    w = class_balance_weights(targets[mask], 3)
    assert w.tolist() == pytest.approx([1.5, 3.0, 1.0])


def test_selflabel_loss_is_the_class_weighted_cross_entropy():
    weak = logits_of([[0.995, 0.005], [0.999, 0.001], [0.2, 0.8], [0.001, 0.999]])
    strong = torch.tensor([[1.0, 0.0], [0.0, 0.5], [3.0, -1.0], [0.2, 0.1]], dtype=torch.float64)
    loss, n = selflabel_loss(weak, strong, threshold=0.99, balance=True)
    assert n == 3
    ce = [-F.log_softmax(strong[i], 0)[t].item() for i, t in ((0, 0), (1, 0), (3, 1))]
    # weighted mean: sum w_y ce / sum w_y with w = (1.5, 3)
    want = (1.5 * ce[0] + 1.5 * ce[1] + 3.0 * ce[2]) / (1.5 + 1.5 + 3.0)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    plain, _ = selflabel_loss(weak, strong, threshold=0.99, balance=False)
    assert plain.item() == pytest.approx(sum(ce) / 3, rel=1e-6)


def test_selflabel_without_confident_samples_is_zero_and_differentiable():
    weak = torch.zeros(4, 3)
    strong = torch.randn(4, 3, requires_grad=True)
    loss, n = selflabel_loss(weak, strong, 0.99)
    assert n == 0 and loss.item() == 0.0
    loss.backward()
    assert strong.grad is not None and (strong.grad == 0).all()


# --------------------------------------------------------------------------- NNM


def test_batch_nearest_neighbour_is_never_the_sample_itself():
    f = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 1.0]])
    assert batch_nearest_neighbour(f).tolist() == [1, 0, 3, 2]
    same = torch.ones(5, 3)  # every row ties with itself
    nn = batch_nearest_neighbour(same)
    assert (nn != torch.arange(5)).all()
    # two views of one batch: the other view of the same image is excluded too
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
    queries = keys.clone()
    assert batch_nearest_neighbour(queries, keys).tolist() == [2, 2, 0]


def test_cluster_level_loss_hand_computed():
    eye = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # columns match: logits I / tau, each row CE = log(1 + e^{-1/tau})
    assert cluster_level_loss(eye, eye, 1.0).item() == pytest.approx(math.log(1 + math.exp(-1.0)), rel=1e-6)
    assert cluster_level_loss(eye, eye, 0.5).item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6)
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    assert cluster_level_loss(eye, swapped, 1.0).item() == pytest.approx(math.log(1 + math.e), rel=1e-6)
    # columns (0.6, 0.8) and (0.8, 0.6) after normalisation: similarity matrix [[1, .96], [.96, 1]]
    p = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    want = math.log(1 + math.exp(0.96 - 1.0))
    assert cluster_level_loss(p, p, 1.0).item() == pytest.approx(want, rel=1e-5)


def test_nnm_loss_is_the_sum_of_its_terms():
    g = torch.Generator().manual_seed(0)
    la, laug, ln, lg = (torch.randn(6, 3, generator=g) for _ in range(4))
    local = torch.tensor([1, 0, 3, 2, 5, 4])
    total, terms = nnm_loss(la, laug, ln, lg, local, entropy_weight=5.0, local_weight=0.5, global_weight=2.0,
                            cluster_weight=3.0, cluster_temperature=1.0)
    pa, paug, pn, pg = (F.softmax(x, 1) for x in (la, laug, ln, lg))
    cons = -torch.log((pa * pn).sum(1)).mean()
    loc = -torch.log((paug * pa[local]).sum(1)).mean()
    glob = -torch.log((pa * pg).sum(1)).mean()
    ent = entropy(pa.mean(0))
    want = cons + 0.5 * loc + 2.0 * glob + 3.0 * cluster_level_loss(pa, pn) - 5.0 * ent
    assert total.item() == pytest.approx(want.item(), rel=1e-5)
    assert terms["local"] == pytest.approx(loc.item(), rel=1e-5)


# --------------------------------------------------------------------------- head selection


def test_head_losses_hand_computed_and_lowest_wins():
    # 2 heads, 2 samples, each the other's neighbour
    nb = torch.tensor([[1], [0]])
    h0 = [[0.5, 0.5], [0.5, 0.5]]  # agree at 0.5 everywhere, mean (0.5, 0.5)
    h1 = [[0.9, 0.1], [0.1, 0.9]]  # disagree a bit, mean (0.5, 0.5)
    probs = torch.tensor([h0, h1])
    got = head_losses(probs, nb, entropy_weight=1.0)
    assert got[0].item() == pytest.approx(-math.log(0.5) - math.log(2), rel=1e-5)
    assert got[1].item() == pytest.approx(-math.log(0.18) - math.log(2), rel=1e-5)
    assert select_head(got) == 0


def test_head_selection_never_reads_labels():
    for fn in (head_losses, select_head):
        params = inspect.signature(fn).parameters
        assert not any("label" in p or p in ("y", "targets") for p in params)
    # a head that agrees with a hidden labelling but breaks neighbour consistency is not chosen
    nb = torch.tensor([[1], [0], [3], [2]])
    consistent = [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]
    label_like = [[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]
    probs = torch.tensor([label_like, consistent]) * 0.98 + 0.01
    assert select_head(head_losses(probs, nb)) == 1


def test_cluster_model_keep_head_copies_one_head():
    from methods.nets import small_cnn

    m = ClusterModel(small_cnn(1, 4), 3, num_heads=4)
    x = torch.randn(5, 1, 8, 8)
    m.eval()
    full = m(x)
    assert full.shape == (4, 5, 3)
    one = m.keep_head(2).eval()
    assert one(x).shape == (1, 5, 3)
    torch.testing.assert_close(one(x)[0], full[2])
    one.backbone.body[0].weight.data.add_(1.0)
    torch.testing.assert_close(m(x), full)  # the original backbone is untouched


def test_nt_xent_hand_computed():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    z2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = 0.5
    # row of view 1 of image 0: partner sim 1, negatives (image 1, both views) sim 0
    want = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 2.0))
    assert nt_xent(z1, z2, t).item() == pytest.approx(want, rel=1e-6)
    assert nt_xent(z1[:1], z2[:1], t).item() == pytest.approx(0.0, abs=1e-6)  # no negative: nothing to learn


# --------------------------------------------------------------------------- small runs on digits

TINY = [
    "train.progress=false", "launcher.name=debug", "train.num_threads=1", "train.eval_every=1",
    "simclr.epochs=1", "simclr.warmup_epochs=0", "simclr.batch_size=256",
]


def run(results: Path, method: str, *args: str, force: bool = False) -> dict:
    from bench.config import compose
    from bench.runner import execute

    return execute(compose([f"method={method}", f"results_dir={results}", *TINY, *args]), force=force)


def preds(record: dict, results: Path) -> dict:
    folder = results / "runs" / record["method"] / record["dataset"] / record["run_id"]
    return dict(np.load(folder / "predictions.npz"))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One SCAN run and one NNM run in the same results folder (the pretext is trained once)."""
    results = tmp_path_factory.mktemp("scan_nnm")
    scan = run(results, "scan", "scan.epochs=1", "selflabel.epochs=1", "selflabel.threshold=0.5")
    nnm = run(results, "nnm", "nnm.epochs=1", "nnm.batch_size=256")
    return results, scan, nnm


def test_scan_runs_and_records_each_stage(shared):
    results, scan, _ = shared
    assert scan["status"] == "completed", scan.get("error")
    assert set(scan["stage_metrics"]) == {"scan", "selflabel"}
    for m in [scan["metrics"], *scan["stage_metrics"].values()]:
        assert 0 <= m["nmi"] <= 1 and 0 <= m["acc"] <= 1
    stages = {h["stage"] for h in scan["history"]}
    assert {"simclr", "scan", "selflabel"} <= stages
    p = preds(scan, results)
    assert p["labels_pred"].shape == (1797,)
    np.testing.assert_array_equal(p["labels_pred"], p["probs"].argmax(1))
    assert p["labels_selflabel"].shape == p["labels_scan"].shape == (1797,)
    assert scan["extra"]["scan_head"] in range(5)
    assert 0.5 < scan["extra"]["neighbour_accuracy"] <= 1


def test_nnm_shares_the_pretext_and_neighbours(shared):
    results, scan, nnm = shared
    assert nnm["status"] == "completed", nnm.get("error")
    assert nnm["artifacts"]["pretext_stage"] == scan["artifacts"]["pretext_stage"]
    folders = list((results / "cache" / "simclr" / "digits").iterdir())
    assert len(folders) == 1
    assert sorted(p.name for p in folders[0].glob("neighbours_*.npy")) == ["neighbours_backbone_k5.npy"]
    # the pretext was trained once: the NNM run logged no SimCLR epoch of its own
    log = (results / "runs" / "nnm" / "digits" / nnm["run_id"] / "log.txt").read_text()
    assert '"stage": "simclr"' not in log
    assert set(nnm["stage_metrics"]) == {"nnm"}
    assert nnm["extra"]["nnm_head"] in range(3)


def test_predictions_do_not_depend_on_labels(shared, monkeypatch):
    """Permuting every label changes nothing the method outputs: labels never steer training or selection."""
    import bench.data

    results, scan, _ = shared
    real = bench.data.build_bundle

    def shuffled(card, *a, **kw):
        b = real(card, *a, **kw)
        perm = np.random.default_rng(0).permutation(10)
        b.train.labels = perm[b.train.labels]
        b.eval.labels = perm[b.eval.labels]
        return b

    monkeypatch.setattr(bench.data, "build_bundle", shuffled)
    again = run(results, "scan", "scan.epochs=1", "selflabel.epochs=1", "selflabel.threshold=0.5", "tag=shuffled")
    assert again["extra"]["scan_head"] == scan["extra"]["scan_head"]
    np.testing.assert_array_equal(preds(again, results)["labels_pred"], preds(scan, results)["labels_pred"])
    assert again["metrics"]["nmi"] == pytest.approx(scan["metrics"]["nmi"])  # NMI is invariant to renaming


def test_a_rerun_resumes_every_stage_from_its_checkpoint(shared):
    results, scan, _ = shared
    again = run(results, "scan", "scan.epochs=1", "selflabel.epochs=1", "selflabel.threshold=0.5", force=True)
    assert again["run_id"] == scan["run_id"]
    np.testing.assert_array_equal(preds(again, results)["labels_pred"], preds(scan, results)["labels_pred"])
    assert [(h["stage"], h["epoch"]) for h in again["history"]] == [(h["stage"], h["epoch"]) for h in scan["history"]]
    log = (results / "runs" / "scan" / "digits" / scan["run_id"] / "log.txt").read_text()
    assert "scan: resumed from" in log and "selflabel: resumed from" in log


def test_inductive_protocol_trains_on_train_and_predicts_test(tmp_path):
    rec = run(tmp_path, "nnm", "dataset.protocol=inductive", "nnm.epochs=1", "nnm.batch_size=256")
    assert rec["status"] == "completed", rec.get("error")
    assert rec["protocol"]["name"] == "inductive"
    assert (rec["n_train"], rec["n_eval"]) == (1438, 359)
    assert preds(rec, tmp_path)["labels_pred"].shape == (359,)


def test_views_have_the_training_shape():
    from bench.config import compose, to_container
    from methods.scan import make_view

    card = to_container(compose(["method=scan"]).dataset)
    x = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    for kind in ("strong", "weak"):
        v = make_view(card, kind, (0.6, 1.0), 16)(x, torch.Generator().manual_seed(0))
        assert v.shape == (6, 1, 16, 16) and v.dtype == torch.float32
        a = make_view(card, kind, (0.6, 1.0), 16)(x, torch.Generator().manual_seed(1))
        b = make_view(card, kind, (0.6, 1.0), 16)(x, torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b)  # the generator decides every draw


def test_start_from_byol(tmp_path):
    rec = run(tmp_path, "scan", "dataset.protocol=inductive", "simclr.init=byol", "byol.epochs=1",
              "byol.warmup_epochs=0", "scan.epochs=1", "selflabel.epochs=0")
    assert rec["status"] == "completed", rec.get("error")
    assert set(rec["stage_metrics"]) == {"scan"}
    assert (tmp_path / "cache" / "byol" / "digits").is_dir()


def test_bad_values_are_named():
    from bench.config import compose
    from bench.errors import ConfigError

    with pytest.raises(ConfigError, match="simclr.init"):
        compose(["method=scan", "simclr.init=moco"])
    with pytest.raises(ConfigError, match="scan.augment"):
        compose(["method=scan", "scan.augment=medium"])
    with pytest.raises(ConfigError, match="nnm.cluster_temperature"):
        compose(["method=nnm", "nnm.cluster_temperature=0"])
