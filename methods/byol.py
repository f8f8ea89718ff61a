"""BYOL, as the ProPos/CoNR papers run it for clustering (k-means on the target projector outputs).

Online network = backbone + projector + predictor; target = EMA copy of
backbone + projector with momentum rising from ema_base to 1 on a cosine.
Loss 2 - 2 cos(q_online(v1), z_target(v2)), summed over both view orders.
SGD (momentum 0.9, wd 5e-4), lr base_lr x batch/256 with warm-up then cosine,
predictor lr x predictor_lr_factor.

The stage trains in a cache folder keyed by the hash of (dataset, byol, seed),
so a BYOL baseline and CoNR's warm-up with the same recipe and seed share it:
CoNR stops the stage at its warm-up epoch (kept as epoch_<e>.pt) and a later
BYOL run continues from there to the end of the schedule.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.errors import ConfigError
from methods.base import Method, Prediction


@dataclass
class BYOLConfig:
    backbone: str = "resnet18_cifar"
    width: int = 32  # small_cnn only
    input_size: int = 0  # 0: the card's image size; else images are resized (on the device) to this
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    epochs: int = 1000
    batch_size: int = 512
    optimizer: str = "sgd"  # sgd | adamw
    base_lr: float = 0.05  # x batch/256
    weight_decay: float = 5e-4
    momentum: float = 0.9
    warmup_epochs: int = 50
    predictor_lr_factor: float = 10.0
    ema_base: float = 0.996
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])
    eval_features: str = "projector"  # projector (the papers' choice) | backbone
    # epochs whose checkpoints the stage keeps for other methods (CoNR's warm-up); not part of the hash
    keep_epochs: list[int] = field(default_factory=list)


def validate_byol(node, cfg, name: str = "byol") -> None:
    if node.epochs < 1:
        raise ConfigError(f"{name}.epochs must be >= 1, got {node.epochs}")
    if node.batch_size < 2:
        raise ConfigError(f"{name}.batch_size must be >= 2, got {node.batch_size}")
    if node.base_lr <= 0:
        raise ConfigError(f"{name}.base_lr must be > 0, got {node.base_lr}")
    if not 0 <= node.warmup_epochs <= node.epochs:
        raise ConfigError(f"{name}.warmup_epochs must be between 0 and {name}.epochs")
    if len(node.crop_scale) != 2 or not 0 < node.crop_scale[0] <= node.crop_scale[1] <= 1:
        raise ConfigError(f"{name}.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(node.crop_scale)}")
    if node.optimizer not in ("sgd", "adamw"):
        raise ConfigError(f"{name}.optimizer must be sgd or adamw, got {node.optimizer!r}")
    if node.eval_features not in ("projector", "backbone"):
        raise ConfigError(f"{name}.eval_features must be projector or backbone")
    if not 0 <= node.ema_base <= 1:
        raise ConfigError(f"{name}.ema_base must be in [0, 1]")


class BYOLNet(nn.Module):
    """Online encoder (backbone + projector), predictor and EMA target encoder."""

    def __init__(self, node, in_channels: int):
        super().__init__()
        from methods.nets import build_backbone, mlp

        backbone = build_backbone(node.backbone, in_channels, width=node.width)
        self.online = nn.Sequential()
        self.online.add_module("backbone", backbone)
        self.online.add_module("projector", mlp(backbone.feat_dim, node.proj_hidden, node.proj_dim))
        self.predictor = mlp(node.proj_dim, node.pred_hidden, node.proj_dim)
        self.target = copy.deepcopy(self.online)
        for p in self.target.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def target_features(self, x: torch.Tensor, which: str = "projector") -> torch.Tensor:
        h = self.target.backbone(x)
        return h if which == "backbone" else self.target.projector(h)


def byol_loss(q: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(q, z), averaged over the batch."""
    return (2 - 2 * F.cosine_similarity(q, z.detach(), dim=-1)).mean()


def make_optimizer(node, net: BYOLNet, encoder_factor: float = 1.0, predictor_factor: float | None = None):
    from methods.engine import param_groups

    pf = node.predictor_lr_factor if predictor_factor is None else predictor_factor
    groups = param_groups({"encoder": (net.online, encoder_factor), "predictor": (net.predictor, pf)},
                          node.weight_decay)
    if node.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=node.base_lr)
    return torch.optim.SGD(groups, lr=node.base_lr, momentum=node.momentum)


@torch.no_grad()
def extract(net: BYOLNet, images: torch.Tensor, card: dict, input_size: int, device: str, which: str,
            batch: int = 1024, amp: bool = True) -> np.ndarray:
    """L2-normalised target features of uint8 images (test transform), as float32 numpy."""
    from bench.augment import test_transform
    from methods.engine import autocast

    net.eval()
    out = []
    for s in range(0, len(images), batch):
        x = test_transform(images[s : s + batch].to(device, non_blocking=True), card, input_size or None)
        with autocast(device, amp):
            f = net.target_features(x, which)
        out.append(F.normalize(f.float(), dim=1).cpu())
    net.train()
    return torch.cat(out).numpy()


class BYOLStage:
    """Builds, trains (or resumes) and serves the BYOL stage for BYOL and CoNR."""

    def __init__(self, ctx, data, node_name: str = "byol"):
        from bench.config import to_container
        from methods.engine import configure_device, pretext_stage

        self.ctx, self.data = ctx, data
        self.node = ctx.cfg[node_name]
        self.card = to_container(ctx.cfg.dataset)
        self.device = ctx.device
        configure_device(self.device)
        node = self.node
        self.input_size = int(node.input_size or data.image_size)
        self.net = BYOLNet(node, data.channels).to(self.device)
        if self.device.startswith("cuda") and ctx.cfg.train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self.opt = make_optimizer(node, self.net)
        self.images, self.gen, self.folder, self.stage = pretext_stage(ctx, data, node_name, self.net, self.opt)
        from bench.augment import BatchAugment, two_view_spec

        self.aug = BatchAugment(two_view_spec(self.card, tuple(node.crop_scale), self.input_size))
        from methods.engine import SameWeights

        self._features = SameWeights(self.net.target)  # the last extraction, reused on unchanged weights
        self._clusters: dict | None = None  # the last k-means evaluation (see cluster)

    def step(self, idx: torch.Tensor, step: int) -> dict:
        from methods.engine import ema_momentum

        x = self.images[idx.to(self.device)]
        both = torch.cat([self.aug(x, self.gen), self.aug(x, self.gen)])
        momentum = ema_momentum(step, self.trainer.total_steps, self.node.ema_base)
        return {"loss": self.update(both, momentum)}

    def update(self, both: torch.Tensor, momentum: float) -> torch.Tensor:
        """The network's part of a step on two views stacked (2B, C, H, W): online and target forward, the
        symmetric loss, SGD and the EMA of the target.  Returns the detached loss."""
        from methods.engine import autocast, ema_update

        net = self.net
        with autocast(self.device, self.ctx.cfg.train.amp):
            q = net.predictor(net.online(both))
            with torch.no_grad():
                z = net.target(both)
            q1, q2 = q.float().chunk(2)
            z1, z2 = z.float().chunk(2)
            loss = byol_loss(q1, z2) + byol_loss(q2, z1)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        ema_update(net.target, net.online, momentum)
        return loss.detach()

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Target features of `images` (the same images with unchanged weights: the last extraction)."""
        return self._features.get(images, lambda: extract(
            self.net, images, self.card, self.input_size, self.device, self.node.eval_features,
            amp=bool(self.ctx.cfg.train.amp)))

    def cluster(self, feats: np.ndarray, labels: np.ndarray) -> dict:
        """ctx.evaluate_features (k-means, NMI/ACC/ARI, "_kmeans"), reused for the same feature and label arrays."""
        c = self._clusters
        if c is None or c["features"] is not feats or c["labels"] is not labels:
            c = self._clusters = {"features": feats, "labels": labels,
                                  "result": self.ctx.evaluate_features(feats, labels)}
        return dict(c["result"])

    def evaluate(self, epoch: int) -> dict:
        m = self.cluster(self.features(self.data.eval.images), self.data.eval.labels)
        m.pop("_kmeans")
        return m

    def run(self, stop_at: int | None = None, keep: tuple[int, ...] = ()):
        """Train (resuming) up to stop_at (default: the end of the schedule), keeping the listed epochs."""
        from methods.engine import Trainer, stage_lock

        self.stage.stop_at = stop_at
        self.stage.keep_epochs = tuple(sorted({*keep, *(int(e) for e in self.node.keep_epochs)}))
        self.trainer = Trainer(self.ctx, self.stage, self.gen)
        target = min(self.stage.epochs, stop_at or self.stage.epochs)
        with stage_lock(self.folder):
            kept = self.trainer.epoch_path(target)
            # a kept checkpoint of exactly the epoch we need beats a later `last.pt`
            if stop_at is not None and kept.exists():
                self.trainer.resume(from_epoch=target)
            else:
                self.trainer.resume()
                if self.trainer.epoch > target:
                    raise RuntimeError(
                        f"stage {self.stage.name} in {self.folder} is already past epoch {target} and "
                        f"epoch_{target}.pt was not kept; delete the folder to retrain it")
            # the record shows the stage's whole history, also after a resume
            self.ctx.record["history"] = [h for h in self.trainer.history if h["epoch"] <= target]
            if self.trainer.epoch < target:
                self.trainer.fit(len(self.images), self.step, evaluate=self.evaluate)
        return self.trainer.history


class BYOLMethod(Method):
    name = "byol"
    kind = "feature"
    stages = ("byol",)

    @classmethod
    def config_nodes(cls):
        return {"byol": BYOLConfig}

    @classmethod
    def validate(cls, cfg) -> None:
        validate_byol(cfg.byol, cfg)

    def run(self, data, ctx) -> Prediction:
        st = BYOLStage(ctx, data)
        history = st.run()
        ctx.update(history=list(history), artifacts={**ctx.record.get("artifacts", {}),
                                                      "byol_stage": str(st.folder)})
        feats = st.features(data.eval.images)  # the last epoch's evaluation, when it ran in this process
        res = st.cluster(feats, data.eval.labels)["_kmeans"]
        return Prediction(labels=res.labels, features=feats)
