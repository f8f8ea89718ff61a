"""Training-step throughput of BYOL and CoNR against a bare forward/backward of the same backbone.

    python scripts/gpu_bench.py                       # CUDA, the paper's CIFAR-10 setting: ResNet-18, batch 512
    python scripts/gpu_bench.py --smoke               # a few BYOL steps: images/s and peak memory (make gpu-smoke)
    python scripts/gpu_bench.py --device cpu --batch 32 --steps 3 --backbone small_cnn   # a dry run anywhere

Random CIFAR-sized uint8 images live on the device, so the numbers are the step
itself: augmentation on the device, forward and backward of online and target,
EMA update, and for CoNR the in-batch ConAff neighbourhoods and filtering.
Reports images/s, the step time as a fraction of three references measured
alongside (see bench/stepbench.py): the bare forward and backward of the online
backbone, that plus the target backbone's forward (the backbone work BYOL cannot
skip), and all of the network's work without indexing and augmentation; so the
share of the step outside the backbone's passes is 1 - backbone share. Also
peak device memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv=None) -> int:
    import torch

    from bench.runner import pick_device
    from bench.stepbench import build_steps

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
    steps = build_steps(a.backbone, a.batch, device, conr=not a.smoke)
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

    timeit(steps["byol"], "byol")
    if not a.smoke:
        for kind in ("conr", "bare", "target", "model"):
            timeit(steps[kind], kind)
        t = {k: results[k]["step_s"] for k in ("bare", "target", "model")}
        for m in ("byol", "conr"):
            r = results[m]
            r["fraction_of_bare"] = t["bare"] / r["step_s"]
            r["backbone_share"] = (t["bare"] + t["target"]) / r["step_s"]
            r["outside_backbone_share"] = 1 - r["backbone_share"]
            r["model_share"] = t["model"] / r["step_s"]
            print(f"{m}: {100 * r['fraction_of_bare']:.1f}% of the bare forward/backward speed; "
                  f"{100 * r['backbone_share']:.1f}% of the step in the backbone passes (online forward+backward, "
                  f"target forward), {100 * r['outside_backbone_share']:.1f}% outside them; "
                  f"{100 * r['model_share']:.1f}% in network work of any kind")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
