"""Augmentation pipelines, batched on the training device.

Images arrive as uint8 tensors (N, C, H, W) (see bench.data); every op below
draws its random parameters (and, for colour jitter, its order) per image and transforms the whole batch at once
(one affine grid_sample for crop + flip (+ rotation), arithmetic colour ops),
so a GPU run never waits on per-image CPU work.  bench/transforms.py holds the
per-image torchvision versions of the same pipelines, used as the reference in
the tests and for the SCAN strong view.

Pipelines:
- two_view (BYOL / SimCLR / CoNR): RandomResizedCrop(scale), horizontal flip,
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p=0.8, grayscale p=0.2, Gaussian blur
  (p=0.5, sigma 0.1-2.0) only when the card says blur (224 px images).
- digits: the mild pipeline for 8x8 grayscale digits: resized crop with scale
  (0.6, 1) and aspect (0.8, 1.25), rotation within +-12 degrees, no flip (a
  mirrored 2 or 5 is another glyph), brightness/contrast jitter 0.4 with p=0.8,
  no hue/saturation/grayscale (one channel), then upsampling to input_size.
- test: resize to input_size (when it differs) and normalise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AugSpec:
    out_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rotate_deg: float = 0.0
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    noise_std: float = 0.0  # additive Gaussian noise on [0, 1] pixels (digits)


def two_view_spec(card: dict, crop_scale=(0.08, 1.0), out_size: int | None = None, **overrides) -> AugSpec:
    """The two-view pipeline the card calls for (default colour views, or the digits pipeline)."""
    size = int(out_size or card["image_size"])
    mean, std = tuple(card["mean"]), tuple(card["std"])
    if card.get("augment", "default") == "digits":
        spec = AugSpec(size, mean, std, crop_scale=tuple(crop_scale), crop_ratio=(0.8, 1.25), flip_p=0.0, rotate_deg=12.0, jitter_p=0.8, brightness=0.4,
                       contrast=0.4, saturation=0.0, hue=0.0, gray_p=0.0, blur_p=0.0)
    else:
        spec = AugSpec(size, mean, std, crop_scale=tuple(crop_scale), blur_p=0.5 if card.get("blur") else 0.0)
    for k, v in overrides.items():
        if not hasattr(spec, k):
            raise KeyError(f"AugSpec has no field {k!r}")
        setattr(spec, k, tuple(v) if isinstance(v, list) else v)
    return spec


class BatchAugment:
    """Callable: uint8 (N, C, H, W) on any device -> normalised float (N, C, S, S), one random draw per image."""

    def __init__(self, spec: AugSpec, masked: bool | None = None):
        self.spec = spec
        self.masked = masked  # colour jitter on the whole batch with masks (None: on accelerators only)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        s = self.spec
        n, c = x.shape[:2]
        dev = x.device
        g = generator

        def U(lo, hi, size=(n,)):
            return torch.rand(size, generator=g, device=dev) * (hi - lo) + lo

        # --- geometry: random resized crop + flip + rotation as one affine warp.
        # Like torchvision's RandomResizedCrop: up to 10 (area, ratio) draws per image, the first box that
        # fits is used, and the whole image when none does.
        tries = 10
        area = U(s.crop_scale[0], s.crop_scale[1], (n, tries))
        ratio = torch.exp(U(math.log(s.crop_ratio[0]), math.log(s.crop_ratio[1]), (n, tries)))
        w_all, h_all = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (w_all <= 1) & (h_all <= 1)
        first = fits.float().argmax(1, keepdim=True)
        any_fit = fits.any(1)
        w = torch.where(any_fit, w_all.gather(1, first).squeeze(1), torch.ones(n, device=dev))
        h = torch.where(any_fit, h_all.gather(1, first).squeeze(1), torch.ones(n, device=dev))
        cx = (torch.rand(n, generator=g, device=dev) * 2 - 1) * (1 - w)
        cy = (torch.rand(n, generator=g, device=dev) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(n, generator=g, device=dev) < s.flip_p, -1.0, 1.0)
        ang = U(-s.rotate_deg, s.rotate_deg) * (math.pi / 180) if s.rotate_deg else torch.zeros(n, device=dev)
        cos, sin = torch.cos(ang), torch.sin(ang)
        theta = torch.stack([
            torch.stack([w * flip * cos, -h * sin, cx], 1),
            torch.stack([w * flip * sin, h * cos, cy], 1),
        ], 1)
        xf = x.float().div_(255.0)
        grid = F.affine_grid(theta, (n, c, s.out_size, s.out_size), align_corners=False)
        out = F.grid_sample(xf, grid, mode="bilinear", padding_mode="zeros" if s.rotate_deg else "border",
                            align_corners=False)

        # --- colour
        if s.jitter_p > 0:
            apply = (torch.rand(n, generator=g, device=dev) < s.jitter_p).view(n, 1, 1, 1)
            jittered = self._jitter(out, g)
            out = torch.where(apply, jittered, out)
        if s.gray_p > 0 and c == 3:
            gray = _gray(out).expand(-1, 3, -1, -1)
            apply = (torch.rand(n, generator=g, device=dev) < s.gray_p).view(n, 1, 1, 1)
            out = torch.where(apply, gray, out)
        if s.blur_p > 0:
            out = _random_blur(out, s.blur_p, s.blur_sigma, g)
        if s.noise_std > 0:
            out = (out + torch.randn(out.shape, generator=g, device=dev) * s.noise_std).clamp_(0, 1)
        return _normalize(out, s.mean, s.std)

    def _jitter(self, x: torch.Tensor, g) -> torch.Tensor:
        """ColorJitter with its four ops in a random order drawn per image (as torchvision does)."""
        s = self.spec
        n, c = x.shape[:2]
        dev = x.device
        factors = {
            0: (torch.rand(n, generator=g, device=dev) * 2 - 1) * s.brightness + 1,
            1: (torch.rand(n, generator=g, device=dev) * 2 - 1) * s.contrast + 1,
            2: (torch.rand(n, generator=g, device=dev) * 2 - 1) * s.saturation + 1,
            3: (torch.rand(n, generator=g, device=dev) * 2 - 1) * s.hue,
        }
        active = [op for op, amount in enumerate((s.brightness, s.contrast, s.saturation, s.hue))
                  if amount > 0 and (op < 2 or c == 3)]
        if not active:
            return x
        order = torch.rand(n, len(active), generator=g, device=dev).argsort(1)  # a permutation per image
        # On the CPU each slot's operations run on the images that drew them (boolean indexing); on an
        # accelerator that indexing would make the host wait for the device (the mask's size must be read),
        # so there every operation runs on the whole batch and each image keeps its own.  Same outputs.
        masked = x.device.type != "cpu" if self.masked is None else self.masked
        x = x.clone()
        for slot in range(len(active)):
            for j, op in enumerate(active):
                sel = order[:, slot] == j
                if masked:
                    x = torch.where(sel.view(n, 1, 1, 1), _colour_op(op, x, factors[op]), x)
                elif sel.any():
                    x[sel] = _colour_op(op, x[sel], factors[op][sel])
        return x


def _colour_op(op: int, x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Brightness (0), contrast (1), saturation (2) or hue (3) of x in [0, 1] with per-image factors f."""
    if op == 3:
        return _hue_shift(x, f)
    f = f.view(-1, 1, 1, 1)
    if op == 0:
        return (x * f).clamp_(0, 1)
    if op == 1:
        return (f * x + (1 - f) * _gray(x).mean(dim=(1, 2, 3), keepdim=True)).clamp_(0, 1)
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 1)


def test_transform(x: torch.Tensor, card: dict, out_size: int | None = None) -> torch.Tensor:
    """uint8 (N, C, H, W) -> normalised float, resized to out_size when given."""
    xf = x.float().div_(255.0)
    size = int(out_size or card["image_size"])
    if xf.shape[-1] != size or xf.shape[-2] != size:
        xf = F.interpolate(xf, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return _normalize(xf, tuple(card["mean"]), tuple(card["std"]))


_NORM: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    key = (x.device, x.dtype, tuple(mean), tuple(std))
    if key not in _NORM:  # copied to the device once, not at every step
        _NORM[key] = (torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1),
                      torch.tensor(std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1))
    m, sd = _NORM[key]
    return (x - m) / sd


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _hue_shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn, per image) in HSV space."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    v = maxc
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp(min=1e-8), torch.zeros_like(maxc))
    dc = delta.clamp(min=1e-8)
    rc, gc, bc = (maxc - r) / dc, (maxc - g) / dc, (maxc - b) / dc
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    rgb = torch.stack([
        torch.stack([v, q, p, p, t, v], 1).gather(1, i.unsqueeze(1)).squeeze(1),
        torch.stack([t, v, v, q, p, p], 1).gather(1, i.unsqueeze(1)).squeeze(1),
        torch.stack([p, p, t, v, v, q], 1).gather(1, i.unsqueeze(1)).squeeze(1),
    ], 1)
    return rgb


def _random_blur(x: torch.Tensor, p: float, sigma_range, g) -> torch.Tensor:
    n, c, hgt, wid = x.shape
    dev = x.device
    ksize = max(3, int(0.1 * hgt) // 2 * 2 + 1)  # about 10% of the image side, odd
    sig = torch.rand(n, generator=g, device=dev) * (sigma_range[1] - sigma_range[0]) + sigma_range[0]
    r = torch.arange(ksize, device=dev, dtype=x.dtype) - ksize // 2
    k = torch.exp(-(r.view(1, -1) ** 2) / (2 * sig.view(-1, 1) ** 2))
    k = k / k.sum(1, keepdim=True)  # (n, ksize)
    kk = k.repeat_interleave(c, 0)  # (n*c, ksize)
    y = x.reshape(1, n * c, hgt, wid)
    pad = ksize // 2
    y = F.conv2d(F.pad(y, (pad, pad, 0, 0), mode="reflect"), kk.view(n * c, 1, 1, ksize), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, pad, pad), mode="reflect"), kk.view(n * c, 1, ksize, 1), groups=n * c)
    y = y.view(n, c, hgt, wid)
    apply = (torch.rand(n, generator=g, device=dev) < p).view(n, 1, 1, 1)
    return torch.where(apply, y, x)
