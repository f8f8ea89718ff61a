"""Training-step throughput of BYOL and CoNR against a bare forward/backward of the same backbone.

    python scripts/gpu_bench.py                       # CUDA, the paper's CIFAR-10 setting: ResNet-18, batch 512
    python scripts/gpu_bench.py --smoke               # a few BYOL steps: images/s and peak memory (make gpu-smoke)
    python scripts/gpu_bench.py --device cpu --batch 32 --steps 3 --backbone small_cnn   # a dry run anywhere

Random CIFAR-sized uint8 images live on the device, so the numbers are the step
itself: augmentation on the device, forward and backward of online and target,
EMA update, and for CoNR the in-batch ConAff neighbourhoods and filtering.
Reports images/s, the share of the step outside the backbone's forward and
backward (1 - bare / step time), and peak device memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    import numpy as np
    import torch

    from bench.config import compose
    from bench.data.base import DataBundle, Split
    from bench.runner import RunContext, pick_device
    from methods.byol import BYOLStage
    from methods.conr import CoNRPhase
    from methods.engine import Trainer, autocast

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--backbone", default="resnet18_cifar")
    ap.add_argument("--smoke", action="store_true", help="only a few BYOL steps")
    ap.add_argument("--json", help="write the results to this file")
    a = ap.parse_args(argv)
    device = pick_device(a.device)
    if a.smoke:
        a.steps, a.warmup = min(a.steps, 10), min(a.warmup, 3)
    n = a.batch * 4
    tmp = tempfile.mkdtemp(prefix="gpu-bench-")
    cfg = compose(["method=conr", "dataset=cifar10", f"results_dir={tmp}", "train.progress=false",
                   f"train.device={device}", f"byol.backbone={a.backbone}", f"byol.batch_size={a.batch}",
                   "byol.epochs=10", "byol.warmup_epochs=1", "conr.warmup_epochs=5"])
    card = dict(cfg.dataset)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    split = Split(images, np.arange(n) % 10)
    data = DataBundle("cifar10", {**card, "num_classes": 10}, [str(i) for i in range(10)], split, split,
                      {"name": "transductive", "train": ["train"], "eval": ["train"]}, True)
    ctx = RunContext(cfg=cfg, run_dir=Path(tmp) / "run", device=device, seed=0, record={})
    ctx.run_dir.mkdir(parents=True, exist_ok=True)
    byol = BYOLStage(ctx, data)
    byol.trainer = Trainer(ctx, byol.stage, byol.gen)
    results = {"device": device, "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
               "backbone": a.backbone, "batch": a.batch, "torch": torch.__version__}

    def timeit(fn, label):
        for i in range(a.warmup):
            fn(i)
        _sync(device)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for i in range(a.steps):
            fn(i)
        _sync(device)
        dt = (time.perf_counter() - t0) / a.steps
        mem = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        results[label] = {"step_s": dt, "images_per_s": a.batch / dt, "peak_mem_gib": mem}
        print(f"{label:10s} {a.batch / dt:10.1f} images/s  {dt * 1000:8.1f} ms/step"
              + (f"  peak {mem:.2f} GiB" if mem is not None else ""), flush=True)

    idx = torch.arange(a.batch)
    timeit(lambda i: byol.step(idx, i), "byol")
    if not a.smoke:
        phase = CoNRPhase(ctx, data, byol)
        phase.trainer = Trainer(ctx, phase.stage, phase.gen)
        phase.refresh(0)
        phase.epoch_begin(1)
        timeit(lambda i: phase.step(idx, i), "conr")
        # the bare forward and backward of the same backbone on two views of the batch
        net = byol.net.online.backbone
        x = torch.randn(2 * a.batch, 3, 32, 32, device=device)
        if device.startswith("cuda"):
            x = x.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(net.parameters(), lr=0.01)

        def bare(_):
            with autocast(device, True):
                loss = net(x).float().pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        timeit(bare, "bare")
        for m in ("byol", "conr"):
            results[m]["fraction_of_bare"] = results["bare"]["step_s"] / results[m]["step_s"]
            results[m]["outside_backbone_share"] = 1 - results[m]["fraction_of_bare"]
            print(f"{m}: {100 * results[m]['fraction_of_bare']:.1f}% of the bare forward/backward speed "
                  f"({100 * results[m]['outside_backbone_share']:.1f}% of the step outside the backbone)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
