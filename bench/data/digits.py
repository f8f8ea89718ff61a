"""scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download.

Pixels (0..16) are scaled to uint8 0..255 and upsampled (bilinear) to the card's
image size.  Splits are fixed and deterministic: every fifth image (index % 5 == 4)
is `test` (359 images), the rest `train` (1,438).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.data.base import Split
from bench.errors import DatasetError


def _all(card: dict):
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) * (255.0 / 16.0)).unsqueeze(1)  # N,1,8,8
    size = int(card["image_size"])
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).contiguous()
    if int(card["channels"]) == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return x, d.target.astype(np.int64)


def load_split(card: dict, root: Path, split: str, download: bool) -> Split:
    x, y = _all(card)
    idx = np.arange(len(y))
    if split == "train":
        keep = idx % 5 != 4
    elif split == "test":
        keep = idx % 5 == 4
    elif split == "all":
        keep = np.ones_like(idx, dtype=bool)
    else:
        raise DatasetError(f"digits has splits 'train', 'test' and 'all', not {split!r}")
    return Split(x[keep], y[keep])


def class_names(card: dict, root: Path) -> list[str]:
    return [str(i) for i in range(10)]


def expected_files(card: dict, root: Path) -> list[Path]:
    return []  # bundled with scikit-learn
