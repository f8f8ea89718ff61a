"""Augmentation throughput on CIFAR-sized images, batched on the device against per-image torchvision:
the two-view pipeline (bench.augment) and SCAN's strong view (bench.strong).

Run with `make perf` (or pytest tests/perf --benchmark-only); images_per_s is in each benchmark's extra_info.
"""

from __future__ import annotations

import pytest
import torch

from bench import augment
from bench import transforms as T
from bench.config import load_card

BATCH = 512
VIEWS = 2


@pytest.fixture(scope="module")
def card() -> dict:
    return load_card("cifar10")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (BATCH, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def threads(request):
    n = torch.get_num_threads()
    want = request.param or n
    torch.set_num_threads(want)
    yield want
    torch.set_num_threads(n)


def _record(benchmark, images: int, threads: int) -> None:
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["images"] = images
    benchmark.extra_info["threads"] = threads
    benchmark.extra_info["images_per_s"] = images / mean if mean > 0 else float("nan")


@pytest.mark.parametrize("threads", [0, 1], ids=["all_threads", "one_thread"], indirect=True)
def test_two_view_batched(benchmark, card, images, threads):
    aug = augment.BatchAugment(augment.two_view_spec(card))
    g = torch.Generator().manual_seed(0)

    def run():
        return aug(images, g), aug(images, g)

    a, _ = benchmark.pedantic(run, rounds=5, iterations=1, warmup_rounds=1)
    assert a.shape == (BATCH, 3, 32, 32)
    _record(benchmark, BATCH * VIEWS, threads)


def test_two_view_per_image(benchmark, card, images):
    tf = T.two_view_transform(card)
    torch.manual_seed(0)

    def run():
        return T.per_image_batch(tf, images), T.per_image_batch(tf, images)

    a, _ = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    assert a.shape == (BATCH, 3, 32, 32)
    _record(benchmark, BATCH * VIEWS, 1)  # per_image_batch runs on one thread, as a DataLoader worker


@pytest.mark.parametrize("threads", [0, 1], ids=["all_threads", "one_thread"], indirect=True)
def test_strong_view_batched(benchmark, card, images, threads):
    from bench import strong

    g = torch.Generator().manual_seed(0)
    out = benchmark.pedantic(strong.strong_batch, args=(images, card, g), rounds=5, iterations=1, warmup_rounds=1)
    assert out.shape == images.shape
    _record(benchmark, BATCH, threads)


def test_strong_view_per_image(benchmark, card, images):
    g = torch.Generator().manual_seed(0)
    out = benchmark.pedantic(T.strong_batch, args=(images, card, g), rounds=3, iterations=1, warmup_rounds=1)
    assert out.shape == images.shape
    _record(benchmark, BATCH, 1)
