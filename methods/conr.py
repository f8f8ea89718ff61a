"""CoNR: Contextually Affinitive Neighborhood Refinery (NeurIPS 2023).

CoNR = the BYOL recipe for `conr.warmup_epochs` epochs (shared with the BYOL
baseline through the stage cache), then the rest of the schedule with the
neighbourhood loss in place of the BYOL loss:

1. contextual k-NN graph over the batch's target features (top-k1, self included),
   edge weights W = S^2;
2. message passing, `steps` times: A <- A + A^T; A_i <- sum_{j<k2} W_ij A_{R_ij}; L2-normalise rows;
3. contextual affinity C = A A^T; the ConAff neighbourhood of i is its top-k by C, i itself at rank 0;
4. cross-view consistency: -2 x mean over i and its k neighbours n of m_i cos(p_i, z_n), symmetrised;
5. progressively relaxed boundary filtering: r_i = ||z_i - c_{y_i}|| / min_{c != c_{y_i}} ||z_i - c||
   from the previous epoch's k-means; keep r below the batch's t-quantile, t rising 0.8 -> 1 over 50 epochs.

`conr.scope=dataset` computes neighbourhoods over the whole training set once
per epoch (faiss k-NN + sparse message passing on a bank of target features,
neighbours retrieved by the refined features; see dataset_conaff), so they can
come from outside the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import ConfigError
from methods.base import Method, Prediction
from methods.byol import BYOLConfig, BYOLStage, validate_byol

ABLATIONS = ("full", "knn", "nofilter", "knn_nofilter", "noloss")


@dataclass
class CoNRConfig:
    warmup_epochs: int = 800  # BYOL epochs before the CoNR phase; the phase runs to byol.epochs
    k1: int = 10  # contextual k-NN graph: neighbours per node (self included)
    k2: int = 2  # message passing: neighbours aggregated per node (self included)
    k: int = 10  # ConAff neighbourhood size (self at rank 0)
    steps: int = 2  # message-passing rounds
    scope: str = "batch"  # batch (the paper) | dataset (neighbours from the whole training set)
    ablation: str = "full"  # full | knn (plain k-NN neighbourhood) | nofilter | knn_nofilter | noloss (= BYOL)
    filter_start: float = 0.8  # kept fraction t at the start of the phase
    filter_epochs: int = 50  # epochs over which t rises linearly to 1
    crop_scale: list[float] = field(default_factory=lambda: [0.45, 1.0])
    encoder_lr_factor: float = 0.1  # x the continuing schedule
    predictor_lr_factor: float = 0.1
    loss_scale: float = 1.0  # 0.25 = the single-device equivalent of the authors' 4-GPU run
    batch_size: int = 0  # the phase's batch (the ConAff neighbourhoods' pool); 0: byol.batch_size


# --------------------------------------------------------------------------- neighbourhoods (batch scope)


def _self_first_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row with the row's own index forced to rank 0."""
    s2 = s.clone()
    s2.fill_diagonal_(float("inf"))
    vals, idx = s2.topk(k, dim=1)
    vals[:, 0] = s.diagonal()
    return vals, idx


def contextual_adjacency(z: torch.Tensor, k1: int, k2: int, steps: int) -> torch.Tensor:
    """Steps 1-2: the message-passed, row-normalised adjacency A (N x N) of L2-normalised features z."""
    n = z.shape[0]
    s = z @ z.T
    sims, r = _self_first_topk(s, min(k1, n))
    w = sims**2
    a = torch.zeros(n, n, dtype=z.dtype, device=z.device).scatter_(1, r, 1.0)
    kk = min(k2, r.shape[1])
    for _ in range(steps):
        a = a + a.T
        a = (w[:, :kk, None] * a[r[:, :kk]]).sum(1)
        a = F.normalize(a, dim=1)
    return a


def conaff_neighbours(z: torch.Tensor, k1: int = 10, k2: int = 2, k: int = 10, steps: int = 2) -> torch.Tensor:
    """Step 3: indices (N x k) of each sample's ConAff neighbourhood, itself at rank 0."""
    a = contextual_adjacency(z, k1, k2, steps)
    c = a @ a.T
    return _self_first_topk(c, min(k, z.shape[0]))[1]


def knn_neighbours(z: torch.Tensor, k: int = 10) -> torch.Tensor:
    """The ablation: plain cosine k-NN (self at rank 0)."""
    return _self_first_topk(z @ z.T, min(k, z.shape[0]))[1]


# --------------------------------------------------------------------------- filtering and loss


def boundary_ratio(z: torch.Tensor, labels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """r_i = distance to the own cluster centre / distance to the nearest other centre."""
    d = torch.cdist(z, centres)
    own = d.gather(1, labels.view(-1, 1)).squeeze(1)
    other = d.scatter(1, labels.view(-1, 1), float("inf")).min(1).values
    return own / other.clamp(min=1e-12)


def kept_fraction(phase_epoch: int, start: float = 0.8, epochs: int = 50) -> float:
    """t for the 1-based epoch of the CoNR phase: start at epoch 1, 1.0 from epoch epochs+1 on."""
    if epochs <= 0:
        return 1.0
    return float(min(1.0, start + (1.0 - start) * (phase_epoch - 1) / epochs))


def boundary_mask(ratio: torch.Tensor, t: float) -> torch.Tensor:
    """m_i = 1 for samples whose ratio is at or below the batch's t-quantile."""
    if t >= 1.0:
        return torch.ones_like(ratio)
    q = torch.quantile(ratio.float(), t)
    return (ratio <= q).to(ratio.dtype)


def neighbourhood_loss(p: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """-2 x mean over i and its k neighbours of m_i cos(p_i, z_n).

    p: (N, d) online predictions; targets: (N, k, d) target features of each sample's neighbours.
    """
    p = F.normalize(p, dim=-1)
    t = F.normalize(targets, dim=-1)
    cos = torch.einsum("nd,nkd->nk", p, t)
    if mask is not None:
        cos = cos * mask.view(-1, 1)
    return -2 * cos.mean()


# --------------------------------------------------------------------------- dataset scope


def sparse_contextual_adjacency(r: np.ndarray, sims: np.ndarray, k2: int, steps: int):
    """Steps 1-2 on a sparse graph: r (n x k1) neighbour lists with self first, sims their similarities.

    Returns the row-normalised message-passed adjacency as a scipy CSR matrix; equal to
    contextual_adjacency on the same neighbour lists (tested).
    """
    import scipy.sparse as sp

    n, k1 = r.shape
    w = sims.astype(np.float64) ** 2
    rows = np.repeat(np.arange(n), k1)
    a = sp.csr_matrix((np.ones(rows.size), (rows, r.ravel())), shape=(n, n))
    kk = min(k2, k1)
    prop = sp.csr_matrix((w[:, :kk].ravel(), (np.repeat(np.arange(n), kk), r[:, :kk].ravel())), shape=(n, n))
    for _ in range(steps):
        a = (a + a.T).tocsr()
        a = (prop @ a).tocsr()
        norms = np.sqrt(np.asarray(a.multiply(a).sum(1)).ravel())
        a = (sp.diags(1.0 / np.maximum(norms, 1e-12)) @ a).tocsr()
    return a


def dataset_conaff(bank: np.ndarray, k1: int = 10, k2: int = 2, k: int = 10, steps: int = 2, *,
                   knn_only: bool = False) -> np.ndarray:
    """ConAff neighbourhoods (n x k, self at rank 0) over a whole bank of L2-normalised features.

    The contextual k-NN graph comes from faiss and the message passing of steps 1-2
    runs on sparse matrices, exactly as in the batch version.  Step 3 differs: instead
    of the n x n affinity A A^T, each sample is represented by its contextually refined
    feature g_i = normalise(sum_j A_ij z_j) (message passing applied to the features)
    and the ConAff neighbourhood is the k-NN of g.  Cost: two exact k-NN searches
    (O(n^2 d), faiss) and O(n m d) for the refinement, m the non-zeros per row of A;
    nothing of size n x n is formed.
    """
    from bench.cluster import knn

    bank = np.ascontiguousarray(bank, dtype=np.float32)
    n = len(bank)
    k1, k = min(k1, n), min(k, n)
    if k1 > 1:
        sims, nb = knn(bank, k1 - 1, exclude_self=True, normalize=False)
    else:
        sims, nb = np.zeros((n, 0), np.float32), np.zeros((n, 0), np.int64)
    r = np.concatenate([np.arange(n)[:, None], nb], 1)
    s = np.concatenate([np.einsum("ij,ij->i", bank, bank)[:, None], sims], 1)
    if knn_only:
        return r[:, :k]
    a = sparse_contextual_adjacency(r, s, k2, steps)
    g = np.asarray(a @ bank, dtype=np.float32)
    g /= np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    if k == 1:
        return np.arange(n)[:, None]
    _, nb2 = knn(g, k - 1, exclude_self=True, normalize=False)
    return np.concatenate([np.arange(n)[:, None], nb2], 1)


# --------------------------------------------------------------------------- the method


def validate_conr(cfg) -> None:
    c = cfg.conr
    validate_byol(cfg.byol, cfg)
    if not 0 <= c.warmup_epochs < cfg.byol.epochs:
        raise ConfigError(f"conr.warmup_epochs must be in [0, byol.epochs) = [0, {cfg.byol.epochs}), got {c.warmup_epochs}")
    for key in ("k1", "k2", "k"):
        if c[key] < 1:
            raise ConfigError(f"conr.{key} must be >= 1, got {c[key]}")
    if c.k2 > c.k1:
        raise ConfigError(f"conr.k2 ({c.k2}) cannot exceed conr.k1 ({c.k1})")
    batch = c.batch_size or cfg.byol.batch_size
    if c.batch_size < 0:
        raise ConfigError(f"conr.batch_size must be >= 0 (0: byol.batch_size), got {c.batch_size}")
    if c.k > batch and c.scope == "batch":
        raise ConfigError(f"conr.k ({c.k}) cannot exceed the phase's batch size ({batch})")
    if c.steps < 0:
        raise ConfigError(f"conr.steps must be >= 0, got {c.steps}")
    if c.scope not in ("batch", "dataset"):
        raise ConfigError(f"conr.scope must be batch or dataset, got {c.scope!r}")
    if c.ablation not in ABLATIONS:
        raise ConfigError(f"conr.ablation must be one of {', '.join(ABLATIONS)}, got {c.ablation!r}")
    if not 0 < c.filter_start <= 1:
        raise ConfigError(f"conr.filter_start must be in (0, 1], got {c.filter_start}")
    if len(c.crop_scale) != 2 or not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
        raise ConfigError(f"conr.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(c.crop_scale)}")


class CoNRPhase:
    """The neighbourhood-loss phase, trained on top of the BYOL stage's warm-up checkpoint."""

    def __init__(self, ctx, data, byol: BYOLStage):
        from bench.augment import BatchAugment, two_view_spec
        from bench.config import config_hash
        from methods.engine import Stage, scaled_lr

        self.ctx, self.data, self.byol = ctx, data, byol
        self.c = ctx.cfg.conr
        self.net, self.device, self.images = byol.net, byol.device, byol.images
        bn = ctx.cfg.byol
        self.warm = int(self.c.warmup_epochs)
        for grp in byol.opt.param_groups:
            grp["lr_factor"] = self.c.encoder_lr_factor if grp["name"] == "encoder" else self.c.predictor_lr_factor
        self.batch = int(self.c.batch_size or bn.batch_size)
        if self.batch > len(byol.images):
            raise ConfigError(f"the CoNR phase's batch ({self.batch}) is larger than the {len(byol.images)} training images")
        spe = len(byol.images) // self.batch
        self.stage = Stage(
            name="conr", folder=ctx.run_dir / "checkpoints",
            config_hash=config_hash(ctx.cfg, keys=["dataset", "byol", "conr"]),
            modules={"net": self.net}, optimizer=byol.opt, base_lr=scaled_lr(bn.base_lr, self.batch),
            epochs=int(bn.epochs) - self.warm, steps_per_epoch=spe,
            batch_size=self.batch, lr_offset_epochs=self.warm, schedule_epochs=int(bn.epochs),
            warmup_epochs=bn.warmup_epochs,
        )
        self.aug = BatchAugment(two_view_spec(byol.card, tuple(self.c.crop_scale), byol.input_size))
        self.ab = self.c.ablation
        self.use_knn = self.ab in ("knn", "knn_nofilter")
        self.use_filter = self.ab not in ("nofilter", "knn_nofilter")
        self.gen = byol.gen
        self.last_eval: dict = {}

    # ----- per-epoch state: k-means labels and centres (and the dataset-scope neighbourhoods)
    def refresh(self, epoch: int) -> dict:
        from bench.metrics import evaluate

        feats = self.byol.features(self.data.train.images)
        km = self.byol.cluster(feats, self.data.train.labels) if self.data.eval_is_train else None
        if km is None:
            from bench.cluster import kmeans

            e = self.ctx.cfg.eval
            res = kmeans(feats, self.data.num_classes, restarts=e.kmeans_restarts, iters=e.kmeans_iters,
                         spherical=e.spherical, seed=self.ctx.seed)
        else:
            res = km.pop("_kmeans")
        labels = torch.from_numpy(res.labels)
        f = torch.from_numpy(feats)
        centres = torch.stack([f[labels == j].mean(0) if (labels == j).any() else torch.zeros(f.shape[1])
                               for j in range(self.data.num_classes)])
        st = self.stage.extra_state
        st["labels"], st["centres"] = labels, centres
        if self.c.scope == "dataset":
            st["bank"] = f
            st["neighbours"] = torch.from_numpy(dataset_conaff(
                feats, self.c.k1, self.c.k2, self.c.k, self.c.steps, knn_only=self.use_knn))
        out = {}
        if km is not None:
            out = {k: v for k, v in km.items() if k in ("nmi", "acc", "ari")}
        elif self.data.eval_is_train:
            out = evaluate(self.data.train.labels, res.labels)
        self.last_labels = res.labels
        return out

    def epoch_begin(self, e: int) -> None:
        st = self.stage.extra_state
        if "labels" not in st:
            self.ctx.log("conr: k-means on the warm-up features")
            self.refresh(0)
        self.t = kept_fraction(e, self.c.filter_start, self.c.filter_epochs) if self.use_filter else 1.0
        self.labels_dev = st["labels"].to(self.device)
        self.centres_dev = st["centres"].to(self.device)
        if self.c.scope == "dataset":
            self.bank_dev = st["bank"].to(self.device)
            self.nbr_dev = st["neighbours"].to(self.device)

    def epoch_end(self, e: int) -> dict:
        m = self.refresh(e)
        return {"kept_fraction": self.t, **m}

    def neighbours(self, z: torch.Tensor) -> torch.Tensor:
        c = self.c
        if self.use_knn:
            return knn_neighbours(z, c.k)
        return conaff_neighbours(z, c.k1, c.k2, c.k, c.steps)

    def step(self, idx: torch.Tensor, step: int) -> dict:
        from methods.engine import autocast, ema_momentum, ema_update

        idx_dev = idx.to(self.device)
        x = self.images[idx_dev]
        v1, v2 = self.aug(x, self.gen), self.aug(x, self.gen)
        net = self.net
        with autocast(self.device, self.ctx.cfg.train.amp):
            both = torch.cat([v1, v2])
            q = net.predictor(net.online(both))
            with torch.no_grad():
                z = net.target(both)
        q1, q2 = q.float().chunk(2)
        z1, z2 = F.normalize(z.float(), dim=1).chunk(2)
        with torch.no_grad():
            if self.use_filter and self.t < 1.0:
                y = self.labels_dev[idx_dev]
                m1 = boundary_mask(boundary_ratio(z2, y, self.centres_dev), self.t)
                m2 = boundary_mask(boundary_ratio(z1, y, self.centres_dev), self.t)
            else:
                m1 = m2 = None
            if self.c.scope == "dataset":
                nbr = self.nbr_dev[idx_dev]
                t2 = self.bank_dev[nbr].clone()
                t1 = t2.clone()
                t2[:, 0], t1[:, 0] = z2, z1  # rank 0: the sample's own fresh cross-view target
            else:
                t2 = z2[self.neighbours(z2)]
                t1 = z1[self.neighbours(z1)]
        loss = neighbourhood_loss(q1, t2, m1) + neighbourhood_loss(q2, t1, m2)
        scaled = loss * self.c.loss_scale
        self.byol.opt.zero_grad(set_to_none=True)
        scaled.backward()
        self.byol.opt.step()
        # the target momentum continues BYOL's cosine over the whole schedule (in epochs, as batches may differ)
        spe = self.stage.steps_per_epoch
        total = self.stage.schedule_epochs * spe
        ema_update(net.target, net.online, ema_momentum(self.warm * spe + step, total, self.ctx.cfg.byol.ema_base))
        kept = m1.float().mean() if m1 is not None else 1.0
        return {"loss": loss.detach(), "kept": kept}

    def run(self) -> list[dict]:
        from methods.engine import Trainer

        self.trainer = Trainer(self.ctx, self.stage, self.gen)
        self.trainer.resume()
        self.ctx.record["history"] = list(self.ctx.record.get("history", [])) + list(self.trainer.history)
        if self.trainer.epoch < self.stage.epochs:
            self.trainer.fit(len(self.images), self.step, epoch_begin=self.epoch_begin, epoch_end=self.epoch_end,
                             evaluate=None if self.data.eval_is_train else self.byol.evaluate)
        return self.trainer.history


class CoNRMethod(Method):
    name = "conr"
    kind = "feature"
    stages = ("byol", "conr")

    @classmethod
    def config_nodes(cls):
        return {"byol": BYOLConfig, "conr": CoNRConfig}

    @classmethod
    def validate(cls, cfg) -> None:
        validate_conr(cfg)

    def run(self, data, ctx) -> Prediction:
        c = ctx.cfg.conr
        byol = BYOLStage(ctx, data)
        if c.ablation == "noloss":
            # neighbourhood loss off: the phase is plain BYOL, i.e. the BYOL baseline (shared stage)
            hist = byol.run()
            ctx.update(history=list(hist))
        else:
            warm_hist = byol.run(stop_at=int(c.warmup_epochs), keep=(int(c.warmup_epochs),))
            warm_hist = [h for h in warm_hist if h["epoch"] <= c.warmup_epochs]
            ctx.update(history=list(warm_hist))
            phase = CoNRPhase(ctx, data, byol)
            hist = phase.run()
            ctx.update(history=warm_hist + list(hist))  # phase rows carry epochs of the whole schedule
        ctx.update(artifacts={**ctx.record.get("artifacts", {}), "byol_stage": str(byol.folder)})
        feats = byol.features(data.eval.images)  # transductive: the last refresh's features and k-means
        res = byol.cluster(feats, data.eval.labels)["_kmeans"]
        return Prediction(labels=res.labels, features=feats)
