"""NNM: Nearest Neighbor Matching for deep clustering (CVPR 2021).

Starts from SCAN's pretext model and mined neighbours (the shared `simclr` stage);
no self-label stage.  Per head, on a batch of anchors (methods.heads.nnm_loss):

- SCAN's consistency between an anchor and a random one of its mined neighbours;
- local matching: a second augmented view of each anchor against its nearest other
  anchor of the batch (cosine of the current backbone features, never itself);
- global matching: each anchor against its nearest neighbour over the whole training
  set, searched (faiss) on the current backbone features at the start of every epoch;
- the cluster-level term: the columns of the anchors' and the neighbours' batch
  probability matrices (L2-normalised) matched to each other, cross-entropy against
  the identity;
- minus entropy_weight x the entropy of the batch-mean prediction.

The heads' losses are summed; Adam.  The head is chosen without labels: the one with
the lowest SCAN objective over the training set and its mined neighbours (the authors'
code picks it by validation accuracy, which reads labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.errors import ConfigError
from methods.base import Method, Prediction
from methods.byol import BYOLConfig
from methods.scan import (
    HeadStageBase,
    pretext_diagnostics,
    start_pretext,
    validate_heads_node,
    validate_pretext,
)
from methods.simclr import Pretext, SimCLRConfig


@dataclass
class NNMConfig:
    num_heads: int = 3
    num_neighbors: int = 20
    entropy_weight: float = 5.0
    local_weight: float = 1.0
    global_weight: float = 1.0
    cluster_weight: float = 1.0
    cluster_temperature: float = 1.0
    epochs: int = 100
    batch_size: int = 200
    lr: float = 1e-4  # Adam, constant
    weight_decay: float = 1e-4
    backbone_lr_factor: float = 1.0  # 0 freezes the backbone (only the heads train)
    augment: str = "strong"  # strong (RandAugment 4 ops + Cutout) | weak (the pretext's view pipeline)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # weak views only


class NNMStage(HeadStageBase):
    node_name = "nnm"

    def __init__(self, ctx, data, pretext: Pretext):
        super().__init__(ctx, data, pretext, int(ctx.cfg.nnm.num_heads), "nnm")
        self.global_nn: torch.Tensor | None = None

    def fit_hooks(self) -> dict:
        return {"epoch_begin": self.epoch_begin}

    def epoch_begin(self, epoch: int) -> None:
        """Each training image's nearest other training image by the current backbone features."""
        from bench.cluster import knn
        from methods.scan import predict_probs

        _, feats = predict_probs(self.model, self.images, self.card, self.input_size, self.device, self.amp,
                                 with_features=True)
        _, nn1 = knn(feats.numpy(), 1, exclude_self=True, backend=str(self.ctx.cfg.eval.knn_backend))
        self.global_nn = torch.from_numpy(nn1[:, 0]).to(self.device)

    def step(self, idx: torch.Tensor, step: int) -> dict:
        from methods.engine import autocast
        from methods.heads import batch_nearest_neighbour, nnm_loss

        node = self.node
        idx_d = idx.to(self.device)
        pick = torch.randint(self.nbrs.shape[1], (len(idx_d),), generator=self.gen, device=self.device)
        nb = self.nbrs[idx_d, pick]
        gn = self.global_nn[idx_d]
        x = self.images[idx_d]
        views = [self.view(x, self.gen), self.view(x, self.gen), self.view(self.images[nb], self.gen),
                 self.view(self.images[gn], self.gen)]
        with autocast(self.device, self.amp):
            logits, h = self.model(torch.cat(views), with_features=True)
        la, laug, ln, lg = logits.float().chunk(4, dim=1)
        ha, haug = h.detach().float().chunk(4)[:2]
        local_nn = batch_nearest_neighbour(haug, ha)
        total, sums = 0.0, {}
        for k in range(la.shape[0]):
            t, terms = nnm_loss(la[k], laug[k], ln[k], lg[k], local_nn, entropy_weight=float(node.entropy_weight),
                                local_weight=float(node.local_weight), global_weight=float(node.global_weight),
                                cluster_weight=float(node.cluster_weight),
                                cluster_temperature=float(node.cluster_temperature))
            total = total + t
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + v
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        nh = la.shape[0]
        return {"loss": total.detach(), **{k: v / nh for k, v in sums.items()}}


class NNMMethod(Method):
    name = "nnm"
    kind = "head"
    stages = ("simclr", "nnm")

    @classmethod
    def config_nodes(cls):
        return {"simclr": SimCLRConfig, "byol": BYOLConfig, "nnm": NNMConfig}

    @classmethod
    def validate(cls, cfg) -> None:
        validate_pretext(cfg)
        node = cfg.nnm
        validate_heads_node(node, "nnm")
        if node.cluster_temperature <= 0:
            raise ConfigError(f"nnm.cluster_temperature must be > 0, got {node.cluster_temperature}")
        for key in ("local_weight", "global_weight", "cluster_weight"):
            if node[key] < 0:
                raise ConfigError(f"nnm.{key} must be >= 0, got {node[key]}")

    def run(self, data, ctx) -> Prediction:
        pretext, hist = start_pretext(ctx, data)
        stage = NNMStage(ctx, data, pretext)
        extra = pretext_diagnostics(data, stage)
        ctx.log(f"nnm: {stage.nbrs.shape[1]} mined neighbours per image, "
                f"{extra['neighbour_accuracy']:.3f} of them share the anchor's class")
        nnm_hist = stage.run()
        ctx.update(history=hist + list(nnm_hist))
        sel = stage.select()
        head = sel["head"]
        ctx.log(f"nnm: kept head {head} (lowest loss {sel['head_losses'][head]:.4f})")
        probs = sel["probs"]
        extra.update(nnm_head=head, nnm_head_losses=sel["head_losses"])
        labels = probs.argmax(1)
        return Prediction(labels=labels, probs=probs, stage_labels={"nnm": labels}, extra=extra)
