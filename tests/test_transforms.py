"""SCAN's strong view, and the batched pipelines of bench.augment checked against per-image torchvision.

The batched and per-image paths draw different random numbers, so they are compared as distributions:
statistics that can be read off the outputs (flip, crop box, grayscale, colour, blur) measured on a few
hundred images from each path, with fixed seeds.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp

from bench import augment
from bench import transforms as T

KS_P = 1e-3  # the two paths agree unless a KS test rejects at this level


pytestmark = pytest.mark.usefixtures("one_thread")  # cards `cifar` and `digits`: tests/conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def denorm(y: torch.Tensor, card: dict) -> torch.Tensor:
    m = torch.tensor(card["mean"]).view(1, -1, 1, 1)
    s = torch.tensor(card["std"]).view(1, -1, 1, 1)
    return y * s + m


def batched(card: dict, x: torch.Tensor, seed: int, **kw) -> torch.Tensor:
    """The batched path, in [0, 1]."""
    return denorm(augment.BatchAugment(augment.two_view_spec(card, **kw))(x, gen(seed)), card)


def per_image(card: dict, x: torch.Tensor, seed: int, **kw) -> torch.Tensor:
    """The per-image torchvision path, in [0, 1]."""
    torch.manual_seed(seed)
    return denorm(T.per_image_batch(T.two_view_transform(card, **kw), x), card)


def ks_p(a: torch.Tensor, b: torch.Tensor, decimals: int = 4) -> float:
    """Two-sample KS p-value; values are rounded first so float noise on a shared value does not count."""
    a, b = (np.round(np.asarray(v, dtype=np.float64), decimals) for v in (a, b))
    return float(ks_2samp(a, b).pvalue)


def repeat(img: torch.Tensor, n: int) -> torch.Tensor:
    return img.unsqueeze(0).expand(n, *img.shape).contiguous()


# --------------------------------------------------------------------------- test images

S = 32
STEP = 256 // S


def coordinate_image(size: int = S) -> torch.Tensor:
    """Red encodes the column, green the row (8 levels a pixel at 32 px), blue is constant."""
    step = 256 // size
    ramp = (torch.arange(size) * step + step // 2).float()
    return torch.stack([ramp.view(1, -1).expand(size, size), ramp.view(-1, 1).expand(size, size),
                        torch.full((size, size), 128.0)]).to(torch.uint8)


def _slope(v: torch.Tensor) -> torch.Tensor:
    """Least-squares slope of (N, S) profiles over the inner columns (away from border clamping)."""
    k = torch.arange(v.shape[1], dtype=v.dtype)[4:-4]
    k = k - k.mean()
    return (v[:, 4:-4] * k).sum(1) / (k * k).sum()


def crop_boxes(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Read the crop box back from augmented coordinate images (in [0, 1]): flip, width, height, area, centre.

    Sides are rounded to whole source pixels and centres to half pixels, the grid torchvision's crops live on,
    so the continuous batched boxes are compared on the same grid.
    """
    px = out * 255 / STEP  # source pixel coordinate
    cols, rows = px[:, 0].mean(1), px[:, 1].mean(2)
    sx, sy = _slope(cols), _slope(rows)  # source pixels per output pixel
    w, h = (sx.abs() * S).round() / S, (sy.abs() * S).round() / S
    cx, cy = (cols.mean(1) * 2).round() / (2 * S), (rows.mean(1) * 2).round() / (2 * S)
    return {"flip": (sx < 0).float(), "w": w, "h": h, "area": w * h, "cx": cx, "cy": cy}


def constant_image(rgb=(180, 90, 60), size: int = 8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.uint8).view(3, 1, 1).expand(3, size, size).contiguous()


def is_gray(out: torch.Tensor) -> torch.Tensor:
    return ((out.amax(1) - out.amin(1)).amax((1, 2)) < 1e-4).float()


def colour_levels(out: torch.Tensor) -> torch.Tensor:
    """Per-image mean colour in uint8 levels, rounded (so float noise makes no spurious KS differences)."""
    return (out.mean((2, 3)) * 255).round()


# --------------------------------------------------------------------------- strong view


def test_strong_batch_shape_dtype_and_range(cifar):
    x = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    y = T.strong_batch(x, cifar, gen(1))
    assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
    assert not torch.equal(y, x)


def test_strong_batch_is_deterministic_given_the_generator(cifar):
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    g = gen(5)
    a, b = T.strong_batch(x, cifar, g), T.strong_batch(x, cifar, g)
    assert torch.equal(a, T.strong_batch(x, cifar, gen(5)))
    assert not torch.equal(a, b)  # the generator moved on
    assert not torch.equal(a, T.strong_batch(x, cifar, gen(6)))


def test_strong_batch_leaves_the_global_rng_alone_when_given_a_generator(cifar):
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    state = torch.get_rng_state()
    T.strong_batch(x, cifar, gen(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_strong_batch_draws_per_image(cifar):
    x = repeat(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=gen(0)), 12)
    y = T.strong_batch(x, cifar, gen(2)).flatten(1)
    assert len({tuple(r.tolist()) for r in y}) == 12


def test_strong_batch_cuts_out_a_hole(cifar):
    x = repeat(torch.full((3, 32, 32), 200, dtype=torch.uint8), 24)
    y = T.strong_batch(x, cifar, gen(3))
    zeros = (y == 0).all(1).flatten(1).sum(1)
    assert (zeros >= 8 * 8).all()  # a 16 px hole keeps at least a quarter of itself at a corner


@pytest.mark.parametrize("size", [8, 32])
def test_strong_batch_one_channel(digits, size):
    x = torch.randint(0, 256, (40, 1, size, size), dtype=torch.uint8, generator=gen(0))
    y = T.strong_batch(x, digits, gen(4))
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert torch.equal(y, T.strong_batch(x, digits, gen(4)))


def test_strong_view_is_the_normalised_strong_batch(cifar):
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    v = T.strong_view(x, cifar, gen(7))
    assert v.dtype == torch.float32 and v.shape == x.shape
    torch.testing.assert_close(v, augment.test_transform(T.strong_batch(x, cifar, gen(7)), cifar))


def test_strong_batch_rejects_float_input(cifar):
    with pytest.raises(ValueError, match="uint8"):
        T.strong_batch(torch.zeros(2, 3, 32, 32), cifar)


# --------------------------------------------------------------------------- test transform


@pytest.mark.parametrize("out_size", [None, 48, 16])
def test_test_transform_image_matches_the_batched_one(cifar, out_size):
    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    ref = T.per_image_batch(T.test_transform_image(cifar, out_size), x)
    torch.testing.assert_close(ref, augment.test_transform(x, cifar, out_size), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- batched vs per-image


def test_crop_readout_recovers_known_boxes(cifar):
    x = repeat(coordinate_image(), 4)
    for path in (batched, per_image):
        box = crop_boxes(path(cifar, x, 0, crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0),
                              jitter_p=0.0, gray_p=0.0, flip_p=0.0))
        torch.testing.assert_close(box["w"], torch.full((4,), 0.5), atol=0.01, rtol=0)
        torch.testing.assert_close(box["area"], torch.full((4,), 0.25), atol=0.01, rtol=0)


def test_flip_fraction_matches(cifar):
    n = 600
    x = repeat(coordinate_image(), n)
    fa = crop_boxes(batched(cifar, x, 0, jitter_p=0.0, gray_p=0.0))["flip"].mean().item()
    fb = crop_boxes(per_image(cifar, x, 0, jitter_p=0.0, gray_p=0.0))["flip"].mean().item()
    assert abs(fa - 0.5) < 0.06 and abs(fb - 0.5) < 0.06 and abs(fa - fb) < 0.08


def test_digits_never_flip(digits):
    ramp = (torch.arange(8) * 32 + 16).to(torch.uint8).view(1, 1, 8).expand(1, 8, 8)
    x = repeat(ramp, 200)
    for path in (batched, per_image):
        cols = path(digits, x, 0, out_size=32, crop_scale=(0.6, 1.0))[:, 0].mean(1)
        assert (_slope(cols) > 0).all()


def test_crop_box_distribution_matches_when_every_draw_fits(cifar):
    # area * ratio <= 0.5 * 4/3 < 1: no draw is rejected (torchvision) or clamped (batched)
    n = 600
    x = repeat(coordinate_image(), n)
    kw = dict(crop_scale=(0.3, 0.5), jitter_p=0.0, gray_p=0.0)
    a, b = crop_boxes(batched(cifar, x, 1, **kw)), crop_boxes(per_image(cifar, x, 1, **kw))
    for key in ("w", "h", "area", "cx", "cy"):
        assert ks_p(a[key], b[key]) > KS_P, key


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.6, 1.0)])
def test_crop_area_distribution_matches(cifar, scale):
    n = 1500
    x = repeat(coordinate_image(), n)
    kw = dict(crop_scale=scale, jitter_p=0.0, gray_p=0.0)
    a, b = crop_boxes(batched(cifar, x, 0, **kw)), crop_boxes(per_image(cifar, x, 0, **kw))
    assert ks_p(a["area"], b["area"]) > KS_P


def gray_fraction(out: torch.Tensor) -> float:
    return is_gray(out).mean().item()


def test_grayscale_fraction_matches(cifar):
    n = 600
    x = repeat(constant_image(), n)
    ga = gray_fraction(batched(cifar, x, 3, out_size=8))
    gb = gray_fraction(per_image(cifar, x, 3, out_size=8))
    assert abs(ga - 0.2) < 0.05 and abs(gb - 0.2) < 0.05 and abs(ga - gb) < 0.06
    wrong = gray_fraction(per_image(cifar, x[:300], 3, out_size=8, gray_p=0.5))
    assert abs(wrong - ga) > 0.06  # the check above would catch a wrong probability


def test_colour_distribution_matches(cifar):
    # a constant image: every output is one colour, set by jitter (brightness, contrast, saturation, hue)
    # and grayscale alone
    n = 600
    x = repeat(constant_image(), n)
    a, b = batched(cifar, x, 4, out_size=8), per_image(cifar, x, 4, out_size=8)
    ca, cb = colour_levels(a), colour_levels(b)
    for ch in range(3):
        assert ks_p(ca[:, ch], cb[:, ch]) > KS_P, ch
    orig = torch.tensor([180.0, 90.0, 60.0])

    def untouched(c: torch.Tensor) -> float:
        return ((c - orig).abs().amax(1) <= 1).float().mean().item()

    ua, ub = untouched(ca), untouched(cb)  # neither jittered nor gray: 0.2 * 0.8
    assert abs(ua - 0.16) < 0.05 and abs(ub - 0.16) < 0.05
    wrong = colour_levels(per_image(cifar, x[:300], 4, out_size=8, hue=0.3))
    assert min(ks_p(ca[:, ch], wrong[:, ch]) for ch in range(3)) < KS_P


def structured_images(n: int, seed: int = 0) -> torch.Tensor:
    """Smooth colour images: 4x4 random colours upsampled to 32 px."""
    low = torch.rand(n, 3, 4, 4, generator=gen(seed))
    return (torch.nn.functional.interpolate(low, size=(S, S), mode="bicubic", align_corners=False)
            .clamp(0, 1).mul(255).round().to(torch.uint8))


def test_brightness_and_contrast_statistics_match(cifar):
    n = 500
    x = structured_images(n)
    kw = dict(crop_scale=(0.3, 0.5))  # crops that fit (see the xfail above): this checks the colour ops
    a, b = batched(cifar, x, 5, **kw), per_image(cifar, x, 5, **kw)
    lum = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    ya, yb = (a * lum).sum(1), (b * lum).sum(1)
    assert ks_p(ya.mean((1, 2)), yb.mean((1, 2))) > KS_P
    assert ks_p(ya.std((1, 2)), yb.std((1, 2))) > KS_P
    assert ks_p(a.std((1, 2, 3)), b.std((1, 2, 3))) > KS_P


def test_blur_distribution_matches(cifar):
    card = copy.deepcopy(cifar)
    card["blur"] = True
    n = 500
    x = repeat(torch.randint(0, 256, (3, S, S), dtype=torch.uint8, generator=gen(6)), n)
    kw = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    a, b = batched(card, x, 6, **kw), per_image(card, x, 6, **kw)

    def sharpness(o: torch.Tensor) -> torch.Tensor:
        return (o[..., 1:] - o[..., :-1]).abs().mean((1, 2, 3))

    base = sharpness(x[:1].float() / 255)
    sa, sb = sharpness(a), sharpness(b)
    fa, fb = (sa < 0.98 * base).float().mean().item(), (sb < 0.98 * base).float().mean().item()
    assert 0.3 < fa < 0.55 and 0.3 < fb < 0.55 and abs(fa - fb) < 0.08
    assert ks_p(sa, sb) > KS_P
    assert (batched(cifar, x[:50], 6, **kw) - x[:50].float() / 255).abs().max() < 1e-5  # no blur on the card


def test_digits_pipeline_statistics_match(digits):
    from sklearn.datasets import load_digits

    x = torch.tensor(load_digits().images[:600] * 255 / 16).round().to(torch.uint8).unsqueeze(1)
    kw = dict(out_size=32, crop_scale=(0.6, 1.0))
    a, b = batched(digits, x, 7, **kw), per_image(digits, x, 7, **kw)
    assert a.shape == b.shape == (600, 1, 32, 32)
    assert ks_p(a.mean((1, 2, 3)), b.mean((1, 2, 3))) > KS_P
    assert ks_p(a.std((1, 2, 3)), b.std((1, 2, 3))) > KS_P
    assert ks_p((a < 1e-3).float().mean((1, 2, 3)), (b < 1e-3).float().mean((1, 2, 3))) > KS_P


@pytest.mark.parametrize("card_name", ["cifar", "digits"])
def test_masked_colour_jitter_equals_the_indexed_one(card_name, request):
    """The whole-batch path (what accelerators run, with no host reads) gives the CPU path's outputs exactly."""
    card = request.getfixturevalue(card_name)
    ch, size = (3, 32) if card_name == "cifar" else (1, 8)
    x = torch.randint(0, 256, (64, ch, size, size), dtype=torch.uint8, generator=gen(0))
    spec = augment.two_view_spec(card)
    a = augment.BatchAugment(spec, masked=False)(x, gen(1))
    b = augment.BatchAugment(spec, masked=True)(x, gen(1))
    assert torch.equal(a, b)
