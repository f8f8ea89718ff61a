"""The training steps the speed benchmarks compare, on random CIFAR-sized images held on the device.

Full steps, as training runs them:
- byol: batch indexing, two-view augmentation, online and target networks, loss, SGD, EMA;
- conr: the same plus CoNR's in-batch ConAff neighbourhoods, boundary filtering and neighbourhood loss.
References, on two fixed, already augmented views of the batch (2 x batch images):
- bare: forward + backward + SGD step of the online backbone alone (the issue's yardstick);
- target: forward of the target backbone alone, without gradients (BYOL's other unavoidable pass);
- model: all of BYOL's network work (online backbone + projector + predictor forward and backward, target
  backbone + projector forward, loss, SGD, EMA) without indexing or augmentation.
So step - model is the data handling (and for CoNR the re-ranking), model - (bare + target) the heads and EMA.

Used by scripts/gpu_bench.py (make gpu-smoke, make gpu-bench) and tests/perf (make perf).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path


def build_steps(backbone: str, batch: int, device: str, *, conr: bool = True) -> dict[str, Callable[[int], None]]:
    """{"byol", "conr", "bare", "target", "model"} -> f(step_index) running one step (only "byol" with conr=False)."""
    import numpy as np
    import torch

    from bench.config import compose
    from bench.data.base import DataBundle, Split
    from bench.runner import RunContext
    from methods.byol import BYOLStage
    from methods.conr import CoNRPhase
    from methods.engine import Trainer, autocast

    n = batch * 4
    tmp = tempfile.mkdtemp(prefix="step-bench-")
    cfg = compose(["method=conr", "dataset=cifar10", f"results_dir={tmp}", "train.progress=false",
                   f"train.device={device}", f"byol.backbone={backbone}", f"byol.batch_size={batch}",
                   "byol.epochs=10", "byol.warmup_epochs=1", "conr.warmup_epochs=5"])
    card = dict(cfg.dataset)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    split = Split(images, np.arange(n) % 10)
    data = DataBundle("cifar10", {**card, "num_classes": 10}, [str(i) for i in range(10)], split, split,
                      {"name": "transductive", "train": ["train"], "eval": ["train"]}, True)
    ctx = RunContext(cfg=cfg, run_dir=Path(tmp) / "run", device=device, seed=0, record={})
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    byol = BYOLStage(ctx, data)
    byol.trainer = Trainer(ctx, byol.stage, byol.gen)
    idx = torch.arange(batch)
    steps: dict[str, Callable[[int], None]] = {"byol": lambda i: byol.step(idx, i)}
    if not conr:
        return steps
    phase = CoNRPhase(ctx, data, byol)
    phase.trainer = Trainer(ctx, phase.stage, phase.gen)
    phase.refresh(0)
    phase.epoch_begin(1)
    steps["conr"] = lambda i: phase.step(idx, i)

    net = byol.net.online.backbone
    x = torch.randn(2 * batch, 3, 32, 32, device=device)
    if device.startswith("cuda"):
        x = x.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    amp = bool(cfg.train.amp)

    def bare(_: int) -> None:
        with autocast(device, amp):
            loss = net(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def target(_: int) -> None:
        with torch.no_grad(), autocast(device, amp):
            byol.net.target.backbone(x)

    def model(_: int) -> None:
        byol.update(x, 0.99)  # BYOL's step without the indexing and the augmentation

    steps.update(bare=bare, target=target, model=model)
    return steps
