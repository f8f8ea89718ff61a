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
