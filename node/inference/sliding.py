"""Sliding-window inference over a 3-D volume, as nnU-Net and MONAI do it.

The volume is covered by patches of the model's size that overlap by a given fraction;
the first and last patch along each axis touch the volume's borders and the others are
spread evenly between them (nnU-Net's rule). The outputs of overlapping patches are averaged
with an importance map: a Gaussian centred on the patch with sigma = patch size / 8
(``sigma_scale = 0.125`` in both projects), floored at 1e-3 of its peak (MONAI), so that
voxels near a patch's border, where the model sees the least context, count the least.
A volume smaller than a patch is padded, centred, and cropped back afterwards.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np

SIGMA_SCALE = 0.125
MIN_IMPORTANCE = 1e-3

#: ``predict(patches)``: patches ``(B, d, h, w)`` float32 -> outputs ``(B, C, d, h, w)``.
Predictor = Callable[[np.ndarray], np.ndarray]


def patch_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the patches along one axis of ``length`` (``length >= patch``)."""
    if length <= patch:
        return [0]
    step = max(1.0, patch * (1.0 - overlap))
    count = math.ceil((length - patch) / step) + 1
    actual = (length - patch) / (count - 1)
    return sorted({int(round(actual * k)) for k in range(count)})


def importance_map(patch: tuple[int, ...], blend: str = "gaussian") -> np.ndarray:
    """Weights of one patch's voxels: a Gaussian with its peak 1, or all ones."""
    if blend == "constant":
        return np.ones(patch, dtype=np.float32)
    weights = np.ones((), dtype=np.float64)
    for n in patch:
        centre, sigma = (n - 1) / 2.0, n * SIGMA_SCALE
        g = np.exp(-0.5 * ((np.arange(n) - centre) / sigma) ** 2)
        weights = np.multiply.outer(weights, g)
    weights /= weights.max()
    return np.maximum(weights, MIN_IMPORTANCE).astype(np.float32)


def sliding_window(x: np.ndarray, patch: tuple[int, int, int], overlap: float,
                   batch_size: int, predict: Predictor, *, blend: str = "gaussian",
                   pad_value: float = 0.0) -> np.ndarray:
    """Blend ``predict`` over patches of ``x`` (``(D, H, W)``); returns ``(C, D, H, W)``."""
    shape = x.shape
    pad = [max(0, p - n) for n, p in zip(shape, patch)]
    if any(pad):
        x = np.pad(x, [(p // 2, p - p // 2) for p in pad], constant_values=pad_value)
    starts = list(itertools.product(*(patch_starts(n, p, overlap)
                                      for n, p in zip(x.shape, patch))))
    weights = importance_map(patch, blend)
    total: np.ndarray | None = None
    norm = np.zeros(x.shape, dtype=np.float32)
    for first in range(0, len(starts), batch_size):
        corners = starts[first:first + batch_size]
        boxes = [tuple(slice(s, s + p) for s, p in zip(c, patch)) for c in corners]
        y = predict(np.stack([x[box] for box in boxes]))
        if total is None:
            total = np.zeros((y.shape[1], *x.shape), dtype=np.float32)
        for k, box in enumerate(boxes):
            total[(slice(None), *box)] += y[k] * weights
            norm[box] += weights
    assert total is not None
    total /= norm
    if any(pad):
        crop = tuple(slice(p // 2, p // 2 + n) for p, n in zip(pad, shape))
        total = total[(slice(None), *crop)]
    return total
