"""SCAN: Semantic Clustering by Adopting Nearest neighbours (ECCV 2020).

pretext (SimCLR, methods/simclr.py) -> mine (top-k neighbours, faiss) -> scan -> self-label.

- scan: a backbone initialised from the pretext model and `scan.num_heads` linear
  heads; loss per head = -mean log <p(a), p(n)> - entropy_weight x entropy(mean p(a)),
  a an augmented anchor and n an augmented random one of its mined neighbours; the
  heads' losses are summed.  Adam.  At the end every head is scored by the same
  objective over the whole training set (test view, every mined neighbour) and the
  lowest-loss head is kept: no label is read to choose it.
- selflabel: the kept head; samples whose weak-view max probability exceeds the
  threshold give pseudo-labels (the argmax); cross-entropy on the strong view,
  classes weighted by the inverse of their frequency among the confident samples.

Both protocols: the model trains on data.train (and its mined neighbours) and predicts
data.eval; inductive = train on train, evaluate on test (the papers), transductive = both
on every image.  The prediction is the argmax of the kept head after the last stage;
the metrics after each stage are recorded (stage_labels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from bench.errors import ConfigError
from methods.base import Method, Prediction
from methods.byol import BYOLConfig, validate_byol
from methods.simclr import Pretext, SimCLRConfig, neighbour_accuracy, validate_simclr

AUGMENTS = ("strong", "weak")


@dataclass
class SCANConfig:
    num_heads: int = 10
    num_neighbors: int = 20
    entropy_weight: float = 5.0
    epochs: int = 50
    batch_size: int = 128
    lr: float = 1e-4  # Adam, constant
    weight_decay: float = 1e-4
    backbone_lr_factor: float = 1.0  # 0 freezes the backbone (only the heads train)
    augment: str = "strong"  # strong (RandAugment 4 ops + Cutout) | weak (the pretext's view pipeline)
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # weak views only


@dataclass
class SelfLabelConfig:
    epochs: int = 200  # 0: no self-label stage
    batch_size: int = 1000
    threshold: float = 0.99
    class_balance: bool = True
    lr: float = 1e-4  # Adam, constant
    weight_decay: float = 1e-4
    augment: str = "strong"  # the view the cross-entropy is computed on
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # the weak (pseudo-label) view


def validate_heads_node(node, name: str, n_train: int | None = None) -> None:
    if node.epochs < 0:
        raise ConfigError(f"{name}.epochs must be >= 0, got {node.epochs}")
    if node.batch_size < 2:
        raise ConfigError(f"{name}.batch_size must be >= 2, got {node.batch_size}")
    if node.lr <= 0:
        raise ConfigError(f"{name}.lr must be > 0, got {node.lr}")
    if node.augment not in AUGMENTS:
        raise ConfigError(f"{name}.augment must be one of {', '.join(AUGMENTS)}, got {node.augment!r}")
    if not 0 < node.crop_scale[0] <= node.crop_scale[1] <= 1:
        raise ConfigError(f"{name}.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(node.crop_scale)}")
    if "num_heads" in node and node.num_heads < 1:
        raise ConfigError(f"{name}.num_heads must be >= 1, got {node.num_heads}")
    if "num_neighbors" in node and node.num_neighbors < 1:
        raise ConfigError(f"{name}.num_neighbors must be >= 1, got {node.num_neighbors}")
    if "entropy_weight" in node and node.entropy_weight < 0:
        raise ConfigError(f"{name}.entropy_weight must be >= 0, got {node.entropy_weight}")
    if "threshold" in node and not 0 <= node.threshold < 1:
        raise ConfigError(f"{name}.threshold must be in [0, 1), got {node.threshold}")


def validate_pretext(cfg) -> None:
    validate_simclr(cfg.simclr)
    if cfg.simclr.init == "byol":
        validate_byol(cfg.byol, cfg)


# --------------------------------------------------------------------------- shared by SCAN and NNM


def make_view(card: dict, kind: str, crop_scale, input_size: int):
    """(uint8 images, generator) -> normalised float views at input_size."""
    from bench.augment import BatchAugment, two_view_spec

    if kind == "weak":
        return BatchAugment(two_view_spec(card, tuple(crop_scale), input_size))

    def strong(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        from bench.strong import strong_view  # batched on the device

        return strong_view(x, card, g, out_size=input_size)

    return strong


def make_trainer(ctx, stage, generator):
    """The engine's trainer with a constant lr (SCAN's and NNM's Adam schedule)."""
    from methods.engine import Trainer

    class ConstantLR(Trainer):
        def set_lr(self) -> float:
            for grp in self.s.optimizer.param_groups:
                grp["lr"] = self.s.base_lr * grp.get("lr_factor", 1.0)
            return self.s.base_lr

    return ConstantLR(ctx, stage, generator)


def resume_into_record(ctx, trainer) -> None:
    """Resume the stage; the record's history = the earlier stages' rows + this stage's rows so far."""
    before = [h for h in ctx.record.get("history", []) if h.get("stage") != trainer.s.name]
    trainer.resume()
    ctx.record["history"] = before + list(trainer.history)


def adam(model, lr: float, weight_decay: float, backbone_factor: float = 1.0) -> torch.optim.Optimizer:
    from methods.engine import param_groups

    named = {"heads": (model.heads, 1.0)}
    if backbone_factor > 0:
        named["backbone"] = (model.backbone, backbone_factor)
    else:
        for p in model.backbone.parameters():
            p.requires_grad_(False)
    return torch.optim.Adam(param_groups(named, weight_decay), lr=lr)


@torch.no_grad()
def predict_probs(model, images: torch.Tensor, card: dict, input_size: int, device: str, amp: bool = True,
                  batch: int = 1024, with_features: bool = False):
    """Softmax of every head on the test view: (H, N, K) float32 on the CPU (and the features (N, d))."""
    import torch.nn.functional as F

    from bench.augment import test_transform
    from methods.engine import autocast

    was = model.training
    model.eval()
    probs, feats = [], []
    try:
        for s in range(0, len(images), batch):
            x = test_transform(images[s : s + batch].to(device, non_blocking=True), card, input_size or None)
            with autocast(device, amp):
                logits, h = model(x, with_features=True)
            probs.append(F.softmax(logits.float(), dim=-1).cpu())
            if with_features:
                feats.append(h.float().cpu())
    finally:
        model.train(was)
    p = torch.cat(probs, dim=1)
    return (p, torch.cat(feats)) if with_features else p


class HeadStageBase:
    """Common set-up of a head-training stage: pretext, neighbours, model, views, evaluation."""

    node_name = "scan"

    def __init__(self, ctx, data, pretext: Pretext, num_heads: int, folder_name: str):
        from bench.config import config_hash
        from methods.engine import Stage
        from methods.heads import ClusterModel

        self.ctx, self.data, self.pretext = ctx, data, pretext
        self.node = node = ctx.cfg[self.node_name]
        self.device = ctx.device
        self.card = pretext.card
        self.input_size = pretext.input_size
        self.amp = bool(ctx.cfg.train.amp)
        self.k = data.num_classes
        self.images = data.train.on(self.device)
        n = len(self.images)
        if node.batch_size > n:
            raise ConfigError(f"{self.node_name}.batch_size={node.batch_size} is larger than the {n} training images")
        nb = pretext.neighbours(int(node.num_neighbors))
        self.neighbours_np = nb
        self.nbrs = torch.from_numpy(nb).to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed * 7 + 3)  # the heads' initialisation depends on the seed only
            self.model = ClusterModel(pretext.backbone(), self.k, num_heads).to(self.device)
        self.opt = adam(self.model, node.lr, node.weight_decay, node.backbone_lr_factor)
        self.gen = torch.Generator(device=self.device).manual_seed(ctx.seed * 7 + 1)
        self.view = make_view(self.card, node.augment, node.crop_scale, self.input_size)
        from methods.engine import SameWeights

        self._scores = SameWeights(self.model)
        self.stage = Stage(
            name=self.node_name, folder=ctx.run_dir / "checkpoints" / folder_name,
            config_hash=config_hash(ctx.cfg, keys=["dataset", "simclr", "byol", self.node_name]),
            modules={"model": self.model}, optimizer=self.opt, base_lr=float(node.lr), epochs=int(node.epochs),
            steps_per_epoch=n // node.batch_size, batch_size=int(node.batch_size),
        )

    # ----- evaluation: the head with the lowest loss on the training set, scored on the eval set
    def head_scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses (H,), train probs (H, N, K)): every head's SCAN objective over the training set.

        The last epoch's evaluation and the head selection after it share one pass (unchanged weights)."""
        from methods.heads import head_losses

        def compute():
            probs = predict_probs(self.model, self.images, self.card, self.input_size, self.device, self.amp)
            return head_losses(probs, torch.from_numpy(self.neighbours_np), float(self.node.entropy_weight)), probs

        return self._scores.get(self.images, compute)

    def eval_probs(self, train_probs: torch.Tensor | None = None) -> torch.Tensor:
        if self.data.eval_is_train and train_probs is not None:
            return train_probs
        return predict_probs(self.model, self.data.eval.images, self.card, self.input_size, self.device, self.amp)

    def evaluate(self, epoch: int) -> dict:
        from bench.metrics import evaluate
        from methods.heads import select_head

        losses, probs = self.head_scores()
        best = select_head(losses)
        pe = self.eval_probs(probs)[best]
        m = evaluate(self.data.eval.labels, pe.argmax(1).numpy())
        return {**m, "head": best, "head_loss": float(losses[best])}

    def run(self) -> list[dict]:
        self.trainer = make_trainer(self.ctx, self.stage, self.gen)
        resume_into_record(self.ctx, self.trainer)
        if self.trainer.epoch < self.stage.epochs:
            self.trainer.fit(len(self.images), self.step, evaluate=self.evaluate, **self.fit_hooks())
        return self.trainer.history

    def fit_hooks(self) -> dict:
        return {}

    def step(self, idx: torch.Tensor, step: int) -> dict:
        raise NotImplementedError

    def select(self) -> dict:
        """Choose the head (lowest loss, no labels); return its eval probabilities and the diagnostics."""
        from methods.heads import select_head

        losses, probs = self.head_scores()
        best = select_head(losses)
        pe = self.eval_probs(probs)[best]
        return {"head": best, "head_losses": losses.tolist(), "probs": pe.numpy()}


class SCANStage(HeadStageBase):
    node_name = "scan"

    def __init__(self, ctx, data, pretext: Pretext):
        super().__init__(ctx, data, pretext, int(ctx.cfg.scan.num_heads), "scan")

    def step(self, idx: torch.Tensor, step: int) -> dict:
        from methods.engine import autocast
        from methods.heads import scan_loss

        node = self.node
        idx_d = idx.to(self.device)
        pick = torch.randint(self.nbrs.shape[1], (len(idx_d),), generator=self.gen, device=self.device)
        nb = self.nbrs[idx_d, pick]
        xa = self.view(self.images[idx_d], self.gen)
        xn = self.view(self.images[nb], self.gen)
        with autocast(self.device, self.amp):
            logits = self.model(torch.cat([xa, xn]))
        la, ln = logits.float().chunk(2, dim=1)
        total, cons, ent = 0.0, 0.0, 0.0
        for h in range(la.shape[0]):
            t, c, e = scan_loss(la[h], ln[h], float(node.entropy_weight))
            total = total + t
            cons = cons + c.detach()  # device tensors: the trainer reads them with the loss
            ent = ent + e.detach()
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        nh = la.shape[0]
        return {"loss": total.detach(), "consistency": cons / nh, "entropy": ent / nh}


class SelfLabelStage:
    """Self-labelling of the kept head: confident weak-view predictions teach the strong view."""

    def __init__(self, ctx, data, scan: SCANStage, head: int):
        from bench.config import config_hash
        from methods.engine import Stage

        self.ctx, self.data = ctx, data
        self.node = node = ctx.cfg.selflabel
        self.device, self.card, self.input_size, self.amp = scan.device, scan.card, scan.input_size, scan.amp
        self.images = scan.images
        n = len(self.images)
        bs = min(int(node.batch_size), n)
        self.model = scan.model.keep_head(head)
        self.opt = adam(self.model, node.lr, node.weight_decay, 1.0)
        self.gen = torch.Generator(device=self.device).manual_seed(ctx.seed * 7 + 2)
        self.weak = make_view(self.card, "weak", node.crop_scale, self.input_size)
        self.strong = make_view(self.card, node.augment, node.crop_scale, self.input_size)
        self.stage = Stage(
            name="selflabel", folder=ctx.run_dir / "checkpoints" / "selflabel",
            config_hash=config_hash(ctx.cfg, keys=["dataset", "simclr", "byol", "scan", "selflabel"]),
            modules={"model": self.model}, optimizer=self.opt, base_lr=float(node.lr), epochs=int(node.epochs),
            steps_per_epoch=max(1, n // bs), batch_size=bs, extra_state={"head": head},
        )

    def step(self, idx: torch.Tensor, step: int) -> dict:
        from methods.engine import autocast
        from methods.heads import selflabel_loss

        x = self.images[idx.to(self.device)]
        xw, xs = self.weak(x, self.gen), self.strong(x, self.gen)
        with autocast(self.device, self.amp):
            with torch.no_grad():
                lw = self.model(xw)[0]
            ls = self.model(xs)[0]
        loss, n_conf = selflabel_loss(lw.float(), ls.float(), float(self.node.threshold),
                                      bool(self.node.class_balance))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"loss": loss.detach(), "confident": n_conf / len(idx)}

    def probs(self, images: torch.Tensor) -> torch.Tensor:
        return predict_probs(self.model, images, self.card, self.input_size, self.device, self.amp)[0]

    def evaluate(self, epoch: int) -> dict:
        from bench.metrics import evaluate

        p = self.probs(self.data.eval.images)
        return evaluate(self.data.eval.labels, p.argmax(1).numpy())

    def run(self) -> list[dict]:
        self.trainer = make_trainer(self.ctx, self.stage, self.gen)
        resume_into_record(self.ctx, self.trainer)
        if self.trainer.epoch < self.stage.epochs:
            self.trainer.fit(len(self.images), self.step, evaluate=self.evaluate)
        return self.trainer.history


def start_pretext(ctx, data) -> tuple[Pretext, list[dict]]:
    pretext = Pretext(ctx, data)
    hist = pretext.run()
    ctx.update(history=list(hist), artifacts={**ctx.record.get("artifacts", {}), "pretext_stage": str(pretext.folder)})
    return pretext, hist


def pretext_diagnostics(data, stage: HeadStageBase) -> dict:
    """Mined-neighbour label agreement (reported, never used to choose anything)."""
    return {"neighbour_accuracy": neighbour_accuracy(stage.neighbours_np, data.train.labels)}


class SCANMethod(Method):
    name = "scan"
    kind = "head"
    stages = ("simclr", "scan", "selflabel")

    @classmethod
    def config_nodes(cls):
        return {"simclr": SimCLRConfig, "byol": BYOLConfig, "scan": SCANConfig, "selflabel": SelfLabelConfig}

    @classmethod
    def validate(cls, cfg) -> None:
        validate_pretext(cfg)
        validate_heads_node(cfg.scan, "scan")
        validate_heads_node(cfg.selflabel, "selflabel")

    def run(self, data, ctx) -> Prediction:
        pretext, hist = start_pretext(ctx, data)
        scan = SCANStage(ctx, data, pretext)
        extra = pretext_diagnostics(data, scan)
        ctx.log(f"scan: {scan.nbrs.shape[1]} mined neighbours per image, "
                f"{extra['neighbour_accuracy']:.3f} of them share the anchor's class")
        scan_hist = scan.run()
        ctx.update(history=hist + list(scan_hist))
        sel = scan.select()
        head = sel["head"]
        ctx.log(f"scan: kept head {head} (lowest loss {sel['head_losses'][head]:.4f})")
        probs = sel["probs"]
        stage_labels = {"scan": probs.argmax(1)}
        extra.update(scan_head=head, scan_head_losses=sel["head_losses"])
        if int(ctx.cfg.selflabel.epochs) > 0:
            sl = SelfLabelStage(ctx, data, scan, head)
            sl_hist = sl.run()
            ctx.update(history=hist + list(scan_hist) + list(sl_hist))
            probs = sl.probs(data.eval.images).numpy()
            stage_labels["selflabel"] = probs.argmax(1)
        return Prediction(labels=probs.argmax(1), probs=probs, stage_labels=stage_labels, extra=extra)
