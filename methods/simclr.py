"""The pretext stage SCAN and NNM start from, and the mined neighbours.

SimCLR: backbone + projector (Linear-ReLU-Linear, 128-d), two views of every
image, NT-Xent loss with temperature 0.1 over the 2N views of a batch (each
view's positive is the other view of its image, the other 2N - 2 views are
negatives).  SGD with lr base_lr x batch/256 (0.2 x 512/256 = 0.4 in the
paper recipe), weight decay 1e-4, cosine schedule.

`simclr.init=byol` uses the BYOL stage (methods/byol.py, the `byol` node and
its shared cache) as the pretext model instead of training SimCLR.

Mining: the top-k neighbours of every training image by inner product of the
L2-normalised pretext features (faiss, exact), the image itself excluded.
The trained model, its features and the neighbour lists live in one cache
folder keyed by (dataset, simclr[, byol], seed), so SCAN and NNM runs with the
same seed share one pretext model and one set of neighbours (one file per k).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import ConfigError


@dataclass
class SimCLRConfig:
    init: str = "simclr"  # simclr (train SimCLR) | byol (use the BYOL stage of the `byol` node)
    backbone: str = "resnet18_cifar"
    width: int = 32  # small_cnn only
    input_size: int = 0  # 0: the card's image size; else images are resized (on the device) to this
    proj_hidden: int = 512
    proj_dim: int = 128
    temperature: float = 0.1
    epochs: int = 500
    batch_size: int = 512
    optimizer: str = "sgd"  # sgd | adamw
    base_lr: float = 0.2  # x batch/256
    weight_decay: float = 1e-4
    momentum: float = 0.9
    warmup_epochs: int = 0
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])
    mine_features: str = "projector"  # features searched for neighbours: projector (normalised head output) | backbone


def validate_simclr(node, name: str = "simclr") -> None:
    if node.init not in ("simclr", "byol"):
        raise ConfigError(f"{name}.init must be simclr or byol, got {node.init!r}")
    if node.epochs < 1:
        raise ConfigError(f"{name}.epochs must be >= 1, got {node.epochs}")
    if node.batch_size < 2:
        raise ConfigError(f"{name}.batch_size must be >= 2, got {node.batch_size}")
    if node.base_lr <= 0:
        raise ConfigError(f"{name}.base_lr must be > 0, got {node.base_lr}")
    if node.temperature <= 0:
        raise ConfigError(f"{name}.temperature must be > 0, got {node.temperature}")
    if not 0 <= node.warmup_epochs <= node.epochs:
        raise ConfigError(f"{name}.warmup_epochs must be between 0 and {name}.epochs")
    if not 0 < node.crop_scale[0] <= node.crop_scale[1] <= 1:
        raise ConfigError(f"{name}.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(node.crop_scale)}")
    if node.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"{name}.optimizer must be sgd or adamw, got {node.optimizer!r}")
    if node.mine_features not in ("projector", "backbone"):
        raise ConfigError(f"{name}.mine_features must be projector or backbone, got {node.mine_features!r}")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """SimCLR's NT-Xent: cross-entropy of each of the 2N views against its partner view, self excluded."""
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    n = z1.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(sim, target)


class SimCLRNet(nn.Module):
    def __init__(self, node, in_channels: int):
        super().__init__()
        from methods.nets import build_backbone

        self.backbone = build_backbone(node.backbone, in_channels, width=node.width)
        d = self.backbone.feat_dim
        self.projector = nn.Sequential(nn.Linear(d, node.proj_hidden), nn.ReLU(inplace=True),
                                       nn.Linear(node.proj_hidden, node.proj_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x))

    def features(self, x: torch.Tensor, which: str = "projector") -> torch.Tensor:
        h = self.backbone(x)
        return h if which == "backbone" else self.projector(h)


@torch.no_grad()
def extract(fn, images: torch.Tensor, card: dict, input_size: int, device: str, batch: int = 1024,
            amp: bool = True) -> np.ndarray:
    """L2-normalised fn(test view) of uint8 images, as float32 numpy."""
    from bench.augment import test_transform
    from methods.engine import autocast

    out = []
    for s in range(0, len(images), batch):
        x = test_transform(images[s : s + batch].to(device, non_blocking=True), card, input_size or None)
        with autocast(device, amp):
            f = fn(x)
        out.append(F.normalize(f.float(), dim=1).cpu())
    return torch.cat(out).numpy()


class SimCLRStage:
    """Builds, trains (or resumes) the SimCLR stage in its shared cache folder."""

    def __init__(self, ctx, data, node_name: str = "simclr"):
        from bench.augment import BatchAugment, two_view_spec
        from bench.config import to_container
        from methods.engine import configure_device, param_groups, pretext_stage

        self.ctx, self.data = ctx, data
        self.node = node = ctx.cfg[node_name]
        self.card = to_container(ctx.cfg.dataset)
        self.device = ctx.device
        configure_device(self.device)
        self.input_size = int(node.input_size or data.image_size)
        self.net = SimCLRNet(node, data.channels).to(self.device)
        if self.device.startswith("cuda") and ctx.cfg.train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        groups = param_groups({"encoder": (self.net, 1.0)}, node.weight_decay)
        if node.optimizer == "adamw":
            self.opt = torch.optim.AdamW(groups, lr=node.base_lr)
        else:
            self.opt = torch.optim.SGD(groups, lr=node.base_lr, momentum=node.momentum)
        self.images, self.gen, self.folder, self.stage = pretext_stage(ctx, data, node_name, self.net, self.opt)
        self.aug = BatchAugment(two_view_spec(self.card, tuple(node.crop_scale), self.input_size))

    def step(self, idx: torch.Tensor, step: int) -> dict:
        from methods.engine import autocast

        x = self.images[idx.to(self.device)]
        v1, v2 = self.aug(x, self.gen), self.aug(x, self.gen)
        with autocast(self.device, self.ctx.cfg.train.amp):
            z = self.net(torch.cat([v1, v2]))
        z1, z2 = z.float().chunk(2)
        loss = nt_xent(z1, z2, self.node.temperature)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach()}

    def features(self, images: torch.Tensor, which: str = "projector") -> np.ndarray:
        self.net.eval()
        try:
            return extract(lambda x: self.net.features(x, which), images, self.card, self.input_size, self.device,
                           amp=bool(self.ctx.cfg.train.amp))
        finally:
            self.net.train()

    def evaluate(self, epoch: int) -> dict:
        m = self.ctx.evaluate_features(self.features(self.data.eval.images), self.data.eval.labels)
        m.pop("_kmeans")
        return m

    def run(self) -> list[dict]:
        from methods.engine import Trainer, stage_lock

        self.trainer = Trainer(self.ctx, self.stage, self.gen)
        with stage_lock(self.folder):
            self.trainer.resume()
            self.ctx.record["history"] = list(self.trainer.history)  # the whole stage, also after a resume
            if self.trainer.epoch < self.stage.epochs:
                self.trainer.fit(len(self.images), self.step, evaluate=self.evaluate)
        return self.trainer.history

    def backbone(self) -> nn.Module:
        return copy.deepcopy(self.net.backbone)


class Pretext:
    """The pretext model (SimCLR, or the BYOL stage) and its mined neighbours, shared through the cache."""

    def __init__(self, ctx, data):
        self.ctx, self.data = ctx, data
        self.node = node = ctx.cfg.simclr
        if node.init == "byol":
            from methods.byol import BYOLStage

            self.inner = BYOLStage(ctx, data)
            self.folder = ctx.cache_dir("simclr", ["simclr", "byol"])
        else:
            self.inner = SimCLRStage(ctx, data)
            self.folder = self.inner.folder
        self.input_size = self.inner.input_size
        self.card = self.inner.card
        self.history: list[dict] = []

    def run(self) -> list[dict]:
        """Train or load the pretext model; its training-set features are kept in the cache folder."""
        from methods.engine import stage_lock

        self.history = [dict(h) for h in self.inner.run()]
        for h in self.history:
            h.setdefault("stage", "pretext")
        with stage_lock(self.folder):
            path = self.folder / f"features_{self.node.mine_features}.npy"
            if not path.exists():
                feats = self.features(self.data.train.images)
                _atomic_npy(path, feats)
        return self.history

    def features(self, images: torch.Tensor) -> np.ndarray:
        which = self.node.mine_features
        if self.node.init == "byol":
            from methods.byol import extract as byol_extract

            return byol_extract(self.inner.net, images, self.card, self.input_size, self.inner.device, which,
                                amp=bool(self.ctx.cfg.train.amp))
        return self.inner.features(images, which)

    def neighbours(self, k: int) -> np.ndarray:
        """(n_train, k) int64 indices of each training image's k nearest neighbours (itself excluded)."""
        from bench.cluster import knn
        from methods.engine import stage_lock

        n = len(self.data.train)
        if not 1 <= k < n:
            raise ConfigError(f"num_neighbors must be between 1 and {n - 1} (the training images), got {k}")
        path = self.folder / f"neighbours_{self.node.mine_features}_k{k}.npy"
        with stage_lock(self.folder):
            if path.exists():
                nb = np.load(path)
                if nb.shape == (n, k):
                    return nb
            feats = np.load(self.folder / f"features_{self.node.mine_features}.npy")
            _, nb = knn(feats, k, exclude_self=True, backend=str(self.ctx.cfg.eval.knn_backend))
            nb = nb.astype(np.int64)
            _atomic_npy(path, nb)
        self.ctx.log(f"pretext: mined {k} neighbours of {n} images -> {path}")
        return nb

    def backbone(self) -> nn.Module:
        """A trainable copy of the pretext backbone (the BYOL target backbone with init=byol)."""
        if self.node.init == "byol":
            b = copy.deepcopy(self.inner.net.target.backbone)
        else:
            b = self.inner.backbone()
        for p in b.parameters():
            p.requires_grad_(True)
        return b


def neighbour_accuracy(neighbours: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of mined neighbours that share their anchor's class (a diagnostic; never used to select)."""
    return float((labels[neighbours] == labels[:, None]).mean())


def _atomic_npy(path: Path, arr: np.ndarray) -> None:
    from bench.io import atomic_save

    def write(p):
        with open(p, "wb") as fh:
            np.save(fh, arr)

    atomic_save(path, write)
