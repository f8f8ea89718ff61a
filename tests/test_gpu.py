"""Checks that need CUDA (skipped elsewhere): the training step on the device in bf16 with channels_last."""

import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.gpu
def test_gpu_bench_smoke_runs_on_cuda():
    p = subprocess.run([sys.executable, "scripts/gpu_bench.py", "--smoke", "--batch", "128"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "images/s" in p.stdout and "peak" in p.stdout


@pytest.mark.gpu
def test_batch_augment_on_cuda_matches_cpu_distribution():
    import torch

    from bench.augment import BatchAugment, two_view_spec
    from bench.config import load_card

    card = load_card("cifar10")
    x = torch.randint(0, 256, (512, 3, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(two_view_spec(card))
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x.cuda(), torch.Generator(device="cuda").manual_seed(0)).cpu()
    assert a.shape == b.shape
    assert abs(a.mean().item() - b.mean().item()) < 0.05


@pytest.mark.gpu
def test_strong_operations_on_cuda_equal_the_cpu_ones():
    import torch

    from bench import strong as S

    x = torch.randint(0, 256, (140, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    op = torch.arange(140) % len(S.OPS)
    bins = torch.randint(1, S.BINS, (140,), generator=torch.Generator().manual_seed(1))
    mag = torch.zeros(140, dtype=torch.float64)
    for name, _ in S.OPS:
        mag = torch.where(op == S.OP_INDEX[name], S.magnitude(name, bins, 32, 32), mag)
    cpu = S.apply_op(x, op, mag)
    gpu = S.apply_op(x.cuda(), op.cuda(), mag.cuda()).cpu()
    differ = (cpu != gpu).flatten(1).any(1)
    # float kernels may round a rare pixel differently on the device; no image may be far off
    assert differ.float().mean() < 0.05, [S.OPS[int(o)][0] for o in op[differ]]
    assert (cpu.int() - gpu.int()).abs().float().mean() < 0.05
    g = torch.Generator(device="cuda").manual_seed(3)
    out = S.strong_batch(x.cuda(), {"augment": "default"}, g)
    assert out.is_cuda and out.dtype == torch.uint8 and out.shape == x.shape


@pytest.mark.gpu
def test_training_on_cuda_reads_losses_once_a_window(tmp_path):
    """A tiny BYOL run on the GPU: the same records whatever the window (the device values are read exactly)."""
    import json

    rows = []
    for sync in (1, 25):
        folder = tmp_path / f"s{sync}"
        p = subprocess.run([sys.executable, "-m", "bench", "run", "method=byol", "dataset=digits", "byol.epochs=2",
                            "byol.warmup_epochs=1", "byol.width=8", "byol.proj_hidden=64", "byol.pred_hidden=64",
                            "byol.proj_dim=32", "byol.batch_size=64", "train.device=cuda", "train.deterministic=true",
                            f"train.sync_every={sync}", "train.progress=false", "launcher=debug",
                            f"results_dir={folder}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr
        rec = json.loads(next(folder.glob("runs/byol/digits/*/record.json")).read_text())
        rows.append([h["loss"] for h in rec["history"]])
    assert rows[0] == rows[1]
