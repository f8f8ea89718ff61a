"""SCAN's strong view batched on the device (bench.strong), against torchvision and the per-image reference.

Each batched operation is checked pixel for pixel against torchvision's kernel applied image by image with
the same magnitudes; the whole pipeline is compared with the per-image reference (bench.transforms.strong_batch)
as distributions, as the two draw their random numbers differently.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp
from torchvision.transforms.v2 import functional as TF

from bench import strong as S
from bench import transforms as T

pytestmark = pytest.mark.usefixtures("one_thread")  # cards `cifar` and `digits`: tests/conftest.py


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smoothed random images: varied histograms and edges, so every operation changes something."""
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=gen(seed))
    return F.avg_pool2d(x.float(), 3, 1, 1).to(torch.uint8)


def torchvision_op(name: str, img: torch.Tensor, m: float) -> torch.Tensor:
    """What torchvision's RandAugment does for operation `name` at signed magnitude m."""
    if name == "Identity":
        return img
    if name in ("ShearX", "ShearY"):
        deg = math.degrees(math.atan(m))
        shear = [deg, 0.0] if name == "ShearX" else [0.0, deg]
        return TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, center=[0, 0])
    if name in ("TranslateX", "TranslateY"):
        t = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return TF.affine(img, angle=0.0, translate=t, scale=1.0, shear=[0.0, 0.0])
    return {
        "Rotate": lambda: TF.rotate(img, angle=m),
        "Brightness": lambda: TF.adjust_brightness(img, 1.0 + m),
        "Color": lambda: TF.adjust_saturation(img, 1.0 + m),
        "Contrast": lambda: TF.adjust_contrast(img, 1.0 + m),
        "Sharpness": lambda: TF.adjust_sharpness(img, 1.0 + m),
        "Posterize": lambda: TF.posterize(img, int(m)),
        "Solarize": lambda: TF.solarize(img, 255.0 * m),
        "AutoContrast": lambda: TF.autocontrast(img),
        "Equalize": lambda: TF.equalize(img),
    }[name]()


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("name", [name for name, _ in S.OPS])
def test_each_batched_operation_equals_torchvision_image_by_image(name, channels):
    n = 48
    x = images(n, channels, seed=1)
    g = gen(2)
    bins = torch.randint(1, S.BINS, (n,), generator=g)
    mag = S.magnitude(name, bins, 32, 32)
    if dict(S.OPS)[name]:
        mag = torch.where(torch.rand(n, generator=g) < 0.5, -mag, mag)
    out = S.apply_op(x, torch.full((n,), S.OP_INDEX[name]), mag)
    want = torch.stack([torchvision_op(name, x[i], float(mag[i])) for i in range(n)])
    assert out.dtype == torch.uint8
    assert torch.equal(out, want), f"{name}: {(out != want).sum().item()} pixels differ"
    if name != "Identity" and not (channels == 1 and name == "Color"):
        assert not torch.equal(out, x)


def test_mixed_operations_in_one_batch_each_get_their_own():
    n = 14 * 6
    x = images(n, seed=3)
    op = torch.arange(n) % 14
    bins = torch.randint(1, S.BINS, (n,), generator=gen(4))
    mag = torch.zeros(n, dtype=torch.float64)
    for name, _ in S.OPS:
        mag = torch.where(op == S.OP_INDEX[name], S.magnitude(name, bins, 32, 32), mag)
    out = S.apply_op(x, op, mag)
    for i in range(n):
        assert torch.equal(out[i], torchvision_op(S.OPS[int(op[i])][0], x[i], float(mag[i]))), i


def test_magnitude_tables_match_torchvision():
    from torchvision.transforms.v2 import RandAugment

    space = RandAugment._AUGMENTATION_SPACE
    assert [name for name, _ in S.OPS] == list(space)
    bins = torch.arange(S.BINS)
    for name, signed in S.OPS:
        fn, tv_signed = space[name]
        assert signed == tv_signed
        table = fn(S.BINS, 32, 32)
        ours = S.magnitude(name, bins, 32, 32)
        if table is None:
            assert (ours == 0).all()
        else:
            assert [float(v) for v in table] == ours.tolist(), name


def test_crop_flip_equals_padding_cropping_and_flipping():
    x = images(10, seed=5)
    oy, ox = torch.tensor([0, 8, 3, 5, 8, 0, 1, 2, 7, 4]), torch.tensor([8, 0, 3, 6, 8, 0, 2, 2, 1, 4])
    flip = torch.tensor([True, False] * 5)
    out = S.crop_flip(x, oy, ox, flip, 4)
    for i in range(10):
        padded = TF.pad(x[i], [4, 4, 4, 4], padding_mode="reflect")
        want = padded[:, oy[i] : oy[i] + 32, ox[i] : ox[i] + 32]
        assert torch.equal(out[i], TF.horizontal_flip(want) if flip[i] else want), i


def test_cutout_zeroes_the_clipped_square():
    x = torch.full((3, 3, 32, 32), 200, dtype=torch.uint8)
    out = S.cutout(x, torch.tensor([0, 16, 31]), torch.tensor([0, 10, 31]), 16)
    hole = out == 0
    assert hole[0, :, :8, :8].all() and hole[0].sum() == 3 * 8 * 8
    assert hole[1, :, 8:24, 2:18].all() and hole[1].sum() == 3 * 16 * 16
    assert hole[2, :, 23:, 23:].all() and hole[2].sum() == 3 * 9 * 9


def test_strong_batch_is_deterministic_and_draws_per_image(cifar):
    x = images(1).expand(12, -1, -1, -1).contiguous()
    g = gen(5)
    a, b = S.strong_batch(x, cifar, g), S.strong_batch(x, cifar, g)
    assert torch.equal(a, S.strong_batch(x, cifar, gen(5)))
    assert not torch.equal(a, b)
    assert len({tuple(r.tolist()) for r in a.flatten(1)}) == 12
    state = torch.get_rng_state()
    S.strong_batch(x, cifar, gen(0))
    assert torch.equal(torch.get_rng_state(), state)


def test_strong_batch_one_channel_and_rejects_float(digits):
    x = images(20, 1, size=8)
    y = S.strong_batch(x, digits, gen(4))
    assert y.shape == x.shape and y.dtype == torch.uint8
    with pytest.raises(ValueError, match="uint8"):
        S.strong_batch(x.float(), digits, gen(0))


def _stats(y: torch.Tensor) -> dict[str, np.ndarray]:
    yf = y.float()
    return {"mean": yf.mean((1, 2, 3)).numpy(), "std": yf.std((1, 2, 3)).numpy(),
            "zeros": (y == 0).all(1).float().mean((1, 2)).numpy(), "max": yf.amax((1, 2, 3)).numpy()}


def test_the_batched_pipeline_has_the_per_image_reference_distribution(cifar):
    x = images(256, seed=7).repeat(2, 1, 1, 1)
    ours, ref = _stats(S.strong_batch(x, cifar, gen(8))), _stats(T.strong_batch(x, cifar, gen(9)))
    for key in ours:
        p = ks_2samp(np.round(ours[key], 3), np.round(ref[key], 3)).pvalue
        assert p > 1e-3, f"{key}: KS p = {p:.2e} (batched mean {ours[key].mean():.3f}, reference {ref[key].mean():.3f})"


def test_scan_uses_the_batched_strong_view(cifar):
    from methods.scan import make_view

    x = images(4)
    view = make_view(cifar, "strong", (0.2, 1.0), 32)
    torch.testing.assert_close(view(x, gen(3)), S.strong_view(x, cifar, gen(3)))
