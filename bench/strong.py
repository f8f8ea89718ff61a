"""SCAN's strong view, batched on the training device.

The same distribution as the per-image reference `bench.transforms.strong_batch`:
  1. RandomCrop(size, padding=size // 8, reflect), then a horizontal flip with p=0.5 (none for digits);
  2. four RandAugment operations, each chosen uniformly from torchvision's fourteen (with replacement), each
     with its own magnitude bin drawn from 1..10 of 11 and, for the signed operations, a random sign;
  3. Cutout: one square hole of side size // 2, centre uniform over the image, clipped at the borders.

Every random parameter is drawn per image from the given generator, on the images' device, and every
operation runs on the whole batch at once; nothing is read back on the host, so a GPU step never waits.
For each of the four slots:
  - the five geometric operations (shear x/y, translate x/y, rotate) become one inverse affine matrix per
    image (the identity for the others) and one nearest-neighbour grid_sample with zero fill;
  - brightness, colour, contrast and sharpness blend each image with its own degenerate image
    (black, grey, grey mean, 3x3 blur) by its own factor;
  - posterize (bit masks), solarize (thresholds), autocontrast and equalize follow; each image takes the
    result of the operation it drew and keeps its pixels otherwise.
Each operation follows torchvision's tensor kernels (transforms.v2.functional) to the pixel, rounding and
truncating where they do, so a batched operation agrees with the per-image kernel it stands for
(tests/test_strong.py checks each one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: torchvision RandAugment's operations, in its order; (name, signed)
OPS: tuple[tuple[str, bool], ...] = (
    ("Identity", False), ("ShearX", True), ("ShearY", True), ("TranslateX", True), ("TranslateY", True),
    ("Rotate", True), ("Brightness", True), ("Color", True), ("Contrast", True), ("Sharpness", True),
    ("Posterize", False), ("Solarize", False), ("AutoContrast", False), ("Equalize", False),
)
OP_INDEX = {name: i for i, (name, _) in enumerate(OPS)}
NUM_OPS = 4  # operations per image
BINS = 11  # magnitude bins 0..10; each operation draws one from 1..10
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_BLEND = ("Brightness", "Color", "Contrast", "Sharpness")


def _drew(op: torch.Tensor, names) -> torch.Tensor:
    """(N,) bool: which images drew one of the named operations."""
    hit = torch.zeros_like(op, dtype=torch.bool)
    for name in names:
        hit |= op == OP_INDEX[name]
    return hit


def magnitude(name: str, bins: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The float64 magnitude of operation `name` at the given bins (before the sign), as torchvision's table."""
    table = {
        "ShearX": torch.linspace(0.0, 0.3, BINS), "ShearY": torch.linspace(0.0, 0.3, BINS),
        "TranslateX": torch.linspace(0.0, 150.0 / 331.0 * width, BINS),
        "TranslateY": torch.linspace(0.0, 150.0 / 331.0 * height, BINS),
        "Rotate": torch.linspace(0.0, 30.0, BINS),
        "Brightness": torch.linspace(0.0, 0.9, BINS), "Color": torch.linspace(0.0, 0.9, BINS),
        "Contrast": torch.linspace(0.0, 0.9, BINS), "Sharpness": torch.linspace(0.0, 0.9, BINS),
        "Posterize": (8 - (torch.arange(BINS) / ((BINS - 1) / 4))).round(),
        "Solarize": torch.linspace(1.0, 0.0, BINS),
    }.get(name)
    if table is None:
        return torch.zeros(bins.shape, dtype=torch.float64, device=bins.device)
    return table.to(bins.device, torch.float64)[bins]


_TABLES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(device: torch.device, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(magnitudes (ops, BINS) float64, signed (ops,) bool) on the device, made once per device and size."""
    key = (device, height, width)
    if key not in _TABLES:
        bins = torch.arange(BINS)
        mags = torch.stack([magnitude(name, bins, height, width) for name, _ in OPS])
        _TABLES[key] = (mags.to(device), torch.tensor([signed for _, signed in OPS], device=device))
    return _TABLES[key]


# --------------------------------------------------------------------------- geometry


def inverse_affine(angle: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor, shear_x: torch.Tensor,
                   shear_y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) float64 inverse matrices of rotation (degrees), translation and shear (degrees) about
    (cx, cy) (pixels from the image centre): output pixel -> input pixel, as torchvision's affine uses."""
    rot, sx, sy = torch.deg2rad(angle), torch.deg2rad(shear_x), torch.deg2rad(shear_y)
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m0, m1, m3, m4 = d, -b, -c, a
    m2 = cx - m0 * (cx + tx) - m1 * (cy + ty)
    m5 = cy - m3 * (cx + tx) - m4 * (cy + ty)
    return torch.stack([torch.stack([m0, m1, m2], -1), torch.stack([m3, m4, m5], -1)], -2)


def warp_nearest(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) warped by per-image inverse matrices (N, 2, 3): nearest neighbour, zero fill."""
    n, _, h, w = x.shape
    dev = x.device
    theta_t = inv.to(torch.float32).transpose(1, 2).contiguous()  # (N, 3, 2)
    theta_t[..., 0] /= 0.5 * w  # to grid_sample's [-1, 1] coordinates (python scalars: no copy to the device)
    theta_t[..., 1] /= 0.5 * h
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, w, device=dev)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, h, device=dev)
    base = torch.stack([xs.expand(h, w), ys[:, None].expand(h, w), torch.ones(h, w, device=dev)], -1)
    grid = base.reshape(1, h * w, 3).expand(n, -1, -1).bmm(theta_t)
    out = F.grid_sample(x.float(), grid.reshape(n, h, w, 2), mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out.round_().to(torch.uint8)


def geometric_matrices(op: torch.Tensor, mag: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-image inverse matrices for the drawn operation with its signed magnitude (identity if not geometric)."""
    zero = torch.zeros_like(mag)
    is_op = {name: op == OP_INDEX[name] for name in _GEOMETRIC}
    shear_deg = torch.rad2deg(torch.atan(mag))
    shear_x = torch.where(is_op["ShearX"], shear_deg, zero)
    shear_y = torch.where(is_op["ShearY"], shear_deg, zero)
    tx = torch.where(is_op["TranslateX"], torch.trunc(mag), zero)  # int(magnitude), as torchvision
    ty = torch.where(is_op["TranslateY"], torch.trunc(mag), zero)
    # rotate(angle) is affine(-angle % 360) about the centre; shears are about the top-left corner
    angle = torch.where(is_op["Rotate"], -torch.remainder(mag, 360.0), zero)
    corner = is_op["ShearX"] | is_op["ShearY"]
    cx = torch.where(corner, torch.full_like(mag, -0.5 * width), zero)
    cy = torch.where(corner, torch.full_like(mag, -0.5 * height), zero)
    return inverse_affine(angle, tx, ty, shear_x, shear_y, cx, cy)


# --------------------------------------------------------------------------- colour


def _grey(x: torch.Tensor) -> torch.Tensor:
    """float (N, 1, H, W) luma, floored as torchvision does for uint8 images (one channel: the image)."""
    xf = x.float()
    if x.shape[1] == 1:
        return xf
    r, g, b = xf.unbind(1)
    return r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().unsqueeze(1)


def _blur(x: torch.Tensor) -> torch.Tensor:
    """The sharpness operation's degenerate image: (3x3 sum + 4 x centre) / 13 on the interior, rounded,
    border pixels unchanged.  The sums are of whole numbers, exact in float32, so the rounding equals
    torchvision's conv2d with weights 1/13 and 5/13 (k / 13 is never within float error of a half)."""
    xf = x.float()
    h, w = x.shape[-2:]
    rows = xf[..., :, 0 : w - 2] + xf[..., :, 1 : w - 1] + xf[..., :, 2:w]  # separable 3x3 box sum
    box = rows[..., 0 : h - 2, :] + rows[..., 1 : h - 1, :] + rows[..., 2:h, :]
    out = xf.clone()
    out[..., 1:-1, 1:-1] = box.add_(xf[..., 1:-1, 1:-1], alpha=4).div_(13.0).round_()
    return out


def blend_ops(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Brightness, colour, contrast and sharpness with per-image factors; other images unchanged."""
    xf = x.float()
    c = x.shape[1]
    grey = _grey(x)
    deg = torch.zeros_like(xf)  # brightness: blend with black
    if c == 3:
        deg = torch.where((op == OP_INDEX["Color"]).view(-1, 1, 1, 1), grey.expand_as(xf), deg)
    deg = torch.where((op == OP_INDEX["Contrast"]).view(-1, 1, 1, 1), grey.mean((1, 2, 3), keepdim=True), deg)
    is_sharp = (op == OP_INDEX["Sharpness"]).view(-1, 1, 1, 1)
    if x.shape[-1] > 2 and x.shape[-2] > 2:
        deg = torch.where(is_sharp, _blur(x), deg)
    f = factor.to(torch.float32).view(-1, 1, 1, 1)
    alpha = (1.0 - factor).to(torch.float32).view(-1, 1, 1, 1)  # 1 - f in double, then float, as torchvision
    mixed = torch.addcmul(xf * f, deg, alpha)
    # sharpness blends as x + (1 - f)(blurred - x) on the interior, as torchvision writes it
    sharp = xf + alpha * (deg - xf)
    mixed = torch.where(is_sharp, sharp, mixed)
    out = mixed.clamp_(0, 255).to(torch.uint8)
    use = _drew(op, _BLEND if c == 3 else [name for name in _BLEND if name != "Color"])  # Color: RGB only
    return torch.where(use.view(-1, 1, 1, 1), out, x)


def autocontrast(x: torch.Tensor) -> torch.Tensor:
    """Stretch each image channel to 0..255 (flat channels unchanged)."""
    xf = x.float()
    lo = xf.amin((-2, -1), keepdim=True)
    hi = xf.amax((-2, -1), keepdim=True)
    flat = hi == lo
    inv_scale = torch.where(flat, torch.ones_like(hi), (hi - lo) * (1.0 / 255))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return (xf - lo).div_(inv_scale).clamp_(0, 255).to(torch.uint8)


def equalize(x: torch.Tensor) -> torch.Tensor:
    """Histogram equalisation per image channel with PIL's lookup table (step = non-max pixels // 255)."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).long()
    hist = torch.zeros(n, c, 256, dtype=torch.int64, device=x.device)
    hist.scatter_add_(-1, flat, torch.ones_like(flat))
    cum = hist.cumsum(-1)
    last = cum.argmax(-1, keepdim=True)  # the first bin holding the total: the largest value present
    step = (h * w - hist.gather(-1, last)).div(255, rounding_mode="floor")
    lut = (cum[..., :-1] + step // 2).div(step.clamp(min=1), rounding_mode="floor").clamp_(0, 255)
    lut = torch.cat([torch.zeros_like(lut[..., :1]), lut], -1).to(torch.uint8)
    out = lut.gather(-1, flat).view(n, c, h, w)
    return torch.where((step != 0).view(n, c, 1, 1), out, x)


# --------------------------------------------------------------------------- the pipeline


def apply_op(x: torch.Tensor, op: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
    """One RandAugment slot: image i gets operation op[i] at signed magnitude mag[i] (float64)."""
    h, w = x.shape[-2:]
    warped = warp_nearest(x, geometric_matrices(op, mag, h, w))
    x = torch.where(_drew(op, _GEOMETRIC).view(-1, 1, 1, 1), warped, x)
    x = blend_ops(x, op, 1.0 + mag)
    bits = torch.where(op == OP_INDEX["Posterize"], mag, torch.full_like(mag, 8.0)).long()
    keep = torch.bitwise_left_shift(torch.bitwise_left_shift(torch.ones_like(bits), bits) - 1, 8 - bits)
    x = x & keep.to(torch.uint8).view(-1, 1, 1, 1)
    # the threshold is compared in float32, as torchvision's uint8 >= python-float comparison does
    threshold = torch.where(op == OP_INDEX["Solarize"], 255.0 * mag, torch.full_like(mag, 256.0)).float()
    x = torch.where(x.float() >= threshold.view(-1, 1, 1, 1), 255 - x, x)
    x = torch.where((op == OP_INDEX["AutoContrast"]).view(-1, 1, 1, 1), autocontrast(x), x)
    return torch.where((op == OP_INDEX["Equalize"]).view(-1, 1, 1, 1), equalize(x), x)


def crop_flip(x: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor, pad: int) -> torch.Tensor:
    """RandomCrop with reflect padding at per-image offsets (oy, ox in 0..2 pad), then a per-image flip."""
    n, c, h, w = x.shape
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    rows = oy[:, None] + torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + ox[:, None]
    out = padded[torch.arange(n, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).to(torch.uint8)


def cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, side: int) -> torch.Tensor:
    """Zero a side x side square centred at (cy, cx) in each image, clipped at the borders."""
    n, _, h, w = x.shape
    y0, x0 = (cy - side // 2).clamp(min=0), (cx - side // 2).clamp(min=0)
    y1, x1 = (cy + side - side // 2).clamp(max=h), (cx + side - side // 2).clamp(max=w)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    hole = (ys >= y0.view(-1, 1, 1)) & (ys < y1.view(-1, 1, 1)) & (xs >= x0.view(-1, 1, 1)) & (xs < x1.view(-1, 1, 1))
    return x.masked_fill(hole.unsqueeze(1), 0)


def strong_batch(x: torch.Tensor, card: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """SCAN's strong augmentation of uint8 (N, C, H, W) images, on their device: uint8 (N, C, H, W)."""
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"strong_batch expects uint8 (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
    n, _, h, w = x.shape
    dev = x.device
    pad = max(1, min(h, w) // 8)
    flip_p = 0.0 if card.get("augment", "default") == "digits" else 0.5

    def randint(hi: int, size: tuple[int, ...], lo: int = 0) -> torch.Tensor:
        return torch.randint(lo, hi, size, generator=generator, device=dev)

    oy, ox = randint(2 * pad + 1, (n,)), randint(2 * pad + 1, (n,))
    flip = torch.rand(n, generator=generator, device=dev) < flip_p
    ops = randint(len(OPS), (NUM_OPS, n))
    bins = randint(BINS, (NUM_OPS, n), lo=1)
    negative = torch.rand(NUM_OPS, n, generator=generator, device=dev) <= 0.5
    cy, cx = randint(h, (n,)), randint(w, (n,))

    out = crop_flip(x, oy, ox, flip, pad)
    table, signed = _tables(dev, h, w)
    for k in range(NUM_OPS):
        mag = table[ops[k], bins[k]]
        mag = torch.where(signed[ops[k]] & negative[k], -mag, mag)
        out = apply_op(out, ops[k], mag)
    return cutout(out, cy, cx, max(1, min(h, w) // 2))


def strong_view(x: torch.Tensor, card: dict, generator: torch.Generator | None = None,
                out_size: int | None = None) -> torch.Tensor:
    """strong_batch followed by the test transform: normalised float (N, C, S, S) on x's device."""
    from bench.augment import test_transform

    return test_transform(strong_batch(x, card, generator), card, out_size=out_size)
