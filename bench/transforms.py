"""Per-image torchvision (transforms.v2) pipelines.

- strong_batch / strong_view: SCAN's strong view (random crop with reflect padding, flip, four
  RandAugment operations with random magnitudes, Cutout), image by image.
- two_view_transform / test_transform_image / per_image_batch: the per-image versions of the
  batched pipelines in bench.augment, the reference those are checked against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from bench import augment

STRONG_NUM_OPS = 4
STRONG_MAGNITUDE_BINS = 11  # magnitudes 0..10; each operation draws one from 1..10


@contextmanager
def _one_thread() -> Iterator[None]:
    """Per-image ops on small images gain nothing from intra-op threads and lose a lot when cores are busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _is_digits(card: dict) -> bool:
    return card.get("augment", "default") == "digits"


def _draw_seeds(n: int, generator: torch.Generator | None) -> list[int]:
    dev = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (n,), generator=generator, device=dev).tolist()


def _cutout_(img: torch.Tensor, side: int, g: torch.Generator) -> torch.Tensor:
    h, w = img.shape[-2:]
    cy = int(torch.randint(0, h, (1,), generator=g))
    cx = int(torch.randint(0, w, (1,), generator=g))
    y0, y1 = max(0, cy - side // 2), min(h, cy + side - side // 2)
    x0, x1 = max(0, cx - side // 2), min(w, cx + side - side // 2)
    img[..., y0:y1, x0:x1] = 0
    return img


def strong_batch(x: torch.Tensor, card: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """SCAN's strong augmentation, one image at a time: uint8 (N, C, H, W) -> uint8 (N, C, H, W).

    Each image goes through
      1. RandomCrop(size, padding=size // 8, reflect) (4 px at 32 px),
      2. RandomHorizontalFlip(0.5), except for the digits pipeline (card augment == "digits"),
      3. four RandAugment operations (torchvision v2, chosen uniformly with replacement), each
         with its own magnitude drawn uniformly from 1..10 out of 10.  SCAN's ``Augment(4)``
         draws a random strength for every operation it applies rather than one fixed strength;
         a fixed magnitude 9 would make every strong view near the strongest setting and drop
         that spread.  torchvision's RandAugment uses one magnitude per call, so the four
         operations are four one-operation calls,
      4. Cutout: one square hole of side size // 2 (16 px at 32 px, SCAN's length) set to 0,
         its centre uniform over the image, clipped at the borders.

    Random numbers come from per-image seeds drawn from ``generator`` (the global generator
    when None), so the same generator state gives the same output; the global RNG state is
    left untouched.  One-channel images work (the colour operations leave them unchanged).
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"strong_batch expects uint8 (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
    n, _, h, w = x.shape
    size = (h, w)
    pad = max(1, min(h, w) // 8)
    flip_p = 0.0 if _is_digits(card) else 0.5
    geometry = v2.Compose([
        v2.RandomCrop(size, padding=pad, padding_mode="reflect"),
        v2.RandomHorizontalFlip(flip_p),
    ])
    ops = [v2.RandAugment(num_ops=1, magnitude=m, num_magnitude_bins=STRONG_MAGNITUDE_BINS)
           for m in range(STRONG_MAGNITUDE_BINS)]
    side = max(1, min(h, w) // 2)
    seeds = _draw_seeds(n, generator)
    src = x.detach().cpu()
    out = torch.empty_like(src)
    g = torch.Generator()
    with torch.random.fork_rng(devices=[]), _one_thread():
        for i in range(n):
            torch.manual_seed(seeds[i])
            g.manual_seed(seeds[i])
            img = geometry(src[i])
            mags = torch.randint(1, STRONG_MAGNITUDE_BINS, (STRONG_NUM_OPS,), generator=g).tolist()
            for m in mags:
                img = ops[m](img)
            out[i] = _cutout_(img.clone(), side, g)
    return out.to(x.device)


def strong_view(x: torch.Tensor, card: dict, generator: torch.Generator | None = None,
                out_size: int | None = None) -> torch.Tensor:
    """strong_batch followed by the test transform: normalised float (N, C, S, S) on x's device."""
    return augment.test_transform(strong_batch(x, card, generator), card, out_size=out_size)


# --------------------------------------------------------------------------- per-image references


class _Normalize01:
    """uint8 CHW -> float in [0, 1], then (x - mean) / std."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.float().div(255.0)
        return (x - self.mean) / self.std


class _Resize:
    """Antialiased bilinear resize of a CHW tensor to (size, size), as bench.augment.test_transform."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] == self.size and x.shape[-2] == self.size:
            return x
        xf = x.float().div(255.0) if x.dtype == torch.uint8 else x
        return F.interpolate(xf[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                             antialias=True)[0]


class _RandomNoise:
    def __init__(self, std: float):
        self.std = std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x + torch.randn_like(x) * self.std).clamp(0, 1)


def two_view_transform(card: dict, crop_scale=(0.08, 1.0), out_size: int | None = None,
                       **overrides) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image version of bench.augment.BatchAugment(two_view_spec(card, ...)).

    A callable uint8 CHW -> normalised float (C, S, S).  Default cards: RandomResizedCrop(scale,
    ratio 3/4-4/3), RandomHorizontalFlip, RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8),
    RandomGrayscale(0.2), GaussianBlur (p=0.5, sigma 0.1-2.0, kernel about 10% of the side)
    only when the card says blur.  Digits cards: resized crop (ratio 0.8-1.25), then a rotation
    within +-12 degrees about the crop centre at the output size (one upsampling, as the batched
    warp; the corners it uncovers are zero-filled), RandomApply(ColorJitter(0.4, 0.4), p=0.8),
    no flip, no grayscale.  ``overrides`` are AugSpec fields, as for two_view_spec.
    """
    spec = augment.two_view_spec(card, crop_scale=crop_scale, out_size=out_size, **overrides)
    return transform_from_spec(spec, channels=int(card.get("channels", len(spec.mean))))


def transform_from_spec(spec: augment.AugSpec, channels: int = 3) -> Callable[[torch.Tensor], torch.Tensor]:
    """The per-image torchvision pipeline for a bench.augment.AugSpec."""
    size = spec.out_size
    steps: list = [v2.ToDtype(torch.float32, scale=True),
                   v2.RandomResizedCrop(size, scale=tuple(spec.crop_scale), ratio=tuple(spec.crop_ratio),
                                        antialias=False)]
    if spec.rotate_deg:
        steps.append(v2.RandomRotation(spec.rotate_deg, interpolation=v2.InterpolationMode.BILINEAR))
    if spec.flip_p > 0:
        steps.append(v2.RandomHorizontalFlip(spec.flip_p))
    if spec.jitter_p > 0:
        sat = spec.saturation if channels == 3 else 0
        hue = spec.hue if channels == 3 else 0
        steps.append(v2.RandomApply([v2.ColorJitter(spec.brightness, spec.contrast, sat, hue)], p=spec.jitter_p))
    if spec.gray_p > 0 and channels == 3:
        steps.append(v2.RandomGrayscale(spec.gray_p))
    if spec.blur_p > 0:
        k = max(3, int(0.1 * size) // 2 * 2 + 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(k, sigma=tuple(spec.blur_sigma))], p=spec.blur_p))
    if spec.noise_std > 0:
        steps.append(_RandomNoise(spec.noise_std))
    steps.append(_Normalize01(spec.mean, spec.std))
    return v2.Compose(steps)


def test_transform_image(card: dict, out_size: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Per-image version of bench.augment.test_transform: uint8 CHW -> normalised float (C, S, S)."""
    size = int(out_size or card["image_size"])
    return v2.Compose([_Resize(size), _Normalize01(tuple(card["mean"]), tuple(card["std"]))])


def per_image_batch(transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a per-image transform to every image of a uint8 (N, C, H, W) batch; stacked float on x's device.

    Runs with one intra-op thread, as a DataLoader worker would; the transform draws from torch's global RNG.
    """
    src = x.detach().cpu()
    with _one_thread():
        out = torch.stack([transform(src[i]) for i in range(src.shape[0])])
    return out.to(x.device)

