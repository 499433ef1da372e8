"""Preprocess: a series' physical values to what a model takes, and model grids back.

Three concerns, each independent of ONNX Runtime:

* **intensity** — MONOCHROME1 inversion, window (clip), then one linear map for the
  normalisation (``none``, ``zscore``, ``minmax``, ``scale``), all fixed once per series by
  :func:`intensity_for` and applied batch by batch with :func:`apply_intensity`;
* **2D placement** — a plane resized to the model's size, stretched or with its aspect ratio
  kept and padded (:class:`Placement`), and label planes brought back to the source grid;
* **3D resampling** — separable linear interpolation of a volume to a target grid and back,
  with the sample positions of PyTorch's ``interpolate(..., align_corners=False)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from node.inference.manifest import InputSpec
from node.inference.volume import SeriesVolume

#: A zero-width intensity range (a blank image) is normalised with this denominator.
MIN_RANGE = 1e-6
#: Slices resampled at once when a volume goes back to the source grid (bounds memory).
RESAMPLE_CHUNK_SLICES = 16


# --------------------------------------------------------------------------- intensity
@dataclass(frozen=True)
class Intensity:
    """Per-series intensity handling: ``x -> clip(invert - x or x, window) * gain + bias``."""

    invert: float | None = None
    window: tuple[float, float] | None = None
    gain: float = 1.0
    bias: float = 0.0


def representable_range(volume: SeriesVolume) -> tuple[float, float]:
    """Lowest and highest physical value the series' pixel format can hold.

    From BitsStored, PixelRepresentation and the rescale of the first image, so that a
    MONOCHROME1 image inverted by ``low + high - x`` equals the same image stored as
    MONOCHROME2. Without headers (a synthetic volume), the pixels' own range.
    """
    if volume.headers:
        ds = volume.headers[0]
        try:
            bits = int(ds.get("BitsStored") or ds.BitsAllocated)
            signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
        except (AttributeError, TypeError, ValueError):
            pass
        else:
            lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
            a, b = lo * slope + intercept, hi * slope + intercept
            return (min(a, b), max(a, b))
    low, high = np.inf, -np.inf
    for chunk in volume.chunks():
        low, high = min(low, float(chunk.min())), max(high, float(chunk.max()))
    return (low, high)


def needs_statistics(spec: InputSpec) -> bool:
    """Whether the normalisation needs the whole series' statistics (``zscore`` without a
    fixed mean and std, ``minmax``)."""
    return spec.normalisation == "minmax" or (
        spec.normalisation == "zscore" and (spec.mean is None or spec.std is None))


def intensity_for(volume: SeriesVolume, spec: InputSpec) -> Intensity:
    """Fix the intensity handling of ``spec`` for this series (whole-series statistics)."""
    invert = None
    if volume.monochrome1 and spec.invert_monochrome1:
        lo, hi = representable_range(volume)
        invert = lo + hi
    window = (spec.window[0], spec.window[1]) if spec.window else None
    gain, bias = 1.0, 0.0
    if spec.normalisation == "scale":
        gain, bias = spec.scale, spec.offset
    elif spec.normalisation == "zscore" and spec.mean is not None and spec.std is not None:
        gain = 1.0 / spec.std
        bias = -spec.mean * gain
    elif needs_statistics(spec):
        mean, std, low, high = series_statistics(volume, Intensity(invert=invert, window=window),
                                                 moments=spec.normalisation == "zscore")
        if spec.normalisation == "zscore":
            gain = 1.0 / max(std, MIN_RANGE)
            bias = -mean * gain
        else:
            gain = 1.0 / max(high - low, MIN_RANGE)
            bias = -low * gain
    return Intensity(invert=invert, window=window, gain=gain, bias=bias)


def series_statistics(volume: SeriesVolume, intensity: Intensity, moments: bool = True
                      ) -> tuple[float, float, float, float]:
    """Mean, standard deviation, minimum and maximum of the series with ``intensity``
    applied, a few slices at a time (Chan et al.'s pairwise update of the mean and the sum of
    squared deviations): no whole-volume copy. Without ``moments``, mean and standard
    deviation are not computed (returned as 0)."""
    count, mean, m2 = 0, 0.0, 0.0
    low, high = np.inf, -np.inf
    for chunk in volume.chunks():
        x = apply_intensity(chunk, intensity)
        if not x.size:
            continue
        low, high = min(low, float(x.min())), max(high, float(x.max()))
        if not moments:
            continue
        n = x.size
        m = float(x.mean(dtype=np.float64))
        d = x.astype(np.float64).ravel()
        d -= m
        total = count + n
        delta = m - mean
        m2 += float(np.dot(d, d)) + delta * delta * count * n / total
        mean += delta * n / total
        count = total
    return mean, (m2 / count) ** 0.5 if count else 0.0, float(low), float(high)


def apply_intensity(x: np.ndarray, intensity: Intensity, out: np.ndarray | None = None) -> np.ndarray:
    """``x`` with the intensity handling applied, as a new float32 array (or in ``out``)."""
    out = np.empty(x.shape, dtype=np.float32) if out is None else out
    source = x
    if intensity.invert is not None:
        np.subtract(np.float32(intensity.invert), x, out=out, casting="unsafe")
        source = out
    if intensity.window is not None:
        np.clip(source, intensity.window[0], intensity.window[1], out=out, casting="unsafe")
    elif source is not out:
        np.copyto(out, source, casting="unsafe")
    if intensity.gain != 1.0:
        out *= np.float32(intensity.gain)
    if intensity.bias != 0.0:
        out += np.float32(intensity.bias)
    return out


# ------------------------------------------------------------------------ 2D placement
@dataclass(frozen=True)
class Placement:
    """Where a source plane lies on the model's plane.

    The source ``(rows, cols)`` is resized to ``inner`` and placed at ``offset`` on a plane
    of ``target`` size; the rest is padding. Stretching has ``inner == target``.
    """

    source: tuple[int, int]
    target: tuple[int, int]
    inner: tuple[int, int]
    offset: tuple[int, int] = (0, 0)


def placement(source: tuple[int, int], spec: InputSpec) -> Placement:
    """The placement of a ``source``-sized plane for ``spec`` (size, resize)."""
    if not spec.size:
        return Placement(source, source, source)
    target = (int(spec.size[-2]), int(spec.size[-1]))
    if spec.resize == "stretch":
        return Placement(source, target, target)
    factor = min(target[0] / source[0], target[1] / source[1])
    inner = (min(target[0], max(1, round(source[0] * factor))),
             min(target[1], max(1, round(source[1] * factor))))
    offset = ((target[0] - inner[0]) // 2, (target[1] - inner[1]) // 2)
    return Placement(source, target, inner, offset)


def to_model_plane(x: np.ndarray, where: Placement, pad_value: float) -> np.ndarray:
    """A ``(n, rows, cols)`` stack resized and padded to ``(n, *where.target)``, float32."""
    inner = resize_stack(x, where.inner)
    if where.inner == where.target:
        return inner
    out = np.full((x.shape[0], *where.target), pad_value, dtype=np.float32)
    r, c = where.offset
    out[:, r:r + where.inner[0], c:c + where.inner[1]] = inner
    return out


def from_model_plane(y: np.ndarray, where: Placement) -> np.ndarray:
    """A ``(n, *target)`` label or mask stack cropped to the image and brought back to the
    source grid (nearest neighbour)."""
    r, c = where.offset
    if where.inner != where.target:
        y = y[:, r:r + where.inner[0], c:c + where.inner[1]]
    return nearest_stack(y, where.source)


def resize_stack(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of each plane of a ``(n, h, w)`` stack to ``size``, float32."""
    if tuple(x.shape[1:]) == tuple(size):
        return np.asarray(x, dtype=np.float32)
    return _lerp_axis(_lerp_axis(np.asarray(x, dtype=np.float32), 1, size[0]), 2, size[1])


def nearest_stack(y: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a ``(n, h, w)`` label or mask stack to ``size``."""
    if tuple(y.shape[1:]) == tuple(size):
        return y
    ri = (np.arange(size[0]) * y.shape[1] // size[0]).astype(np.intp)
    ci = (np.arange(size[1]) * y.shape[2] // size[1]).astype(np.intp)
    return y[:, ri][:, :, ci]


def model_planes(volume: SeriesVolume, spec: InputSpec, start: int = 0, stop: int | None = None,
                 intensity: Intensity | None = None, where: Placement | None = None) -> np.ndarray:
    """The exact tensor a 2D model (image, slices) receives for planes ``start:stop``:
    intensity handled, resized and padded, in ``spec.layout`` and ``spec.dtype``."""
    intensity = intensity if intensity is not None else intensity_for(volume, spec)
    where = where if where is not None else placement(volume.shape[1:], spec)  # type: ignore[arg-type]
    return model_input(volume.planes(start, stop), spec, intensity, where)


def model_input(planes: np.ndarray, spec: InputSpec, intensity: Intensity, where: Placement) -> np.ndarray:
    """:func:`model_planes` of planes already decoded (physical values, ``(n, rows, cols)``)."""
    x = to_model_plane(apply_intensity(planes, intensity), where, spec.pad_value)
    x = x[:, None, :, :] if spec.layout == "NCHW" else x[:, :, :, None]
    return np.ascontiguousarray(x, dtype=np.float16 if spec.dtype == "float16" else np.float32)


# ------------------------------------------------------------------------ 3D resampling
def target_shape(volume: SeriesVolume, spec: InputSpec) -> tuple[int, int, int]:
    """The grid a volume model works on: ``input.size``, or the series' extent divided by
    ``input.spacing``, or the series' own grid."""
    if spec.size:
        return (int(spec.size[0]), int(spec.size[1]), int(spec.size[2]))
    if spec.spacing:
        return tuple(max(1, round(n * s / t)) for n, s, t in  # type: ignore[return-value]
                     zip(volume.shape, volume.spacing, spec.spacing))
    return volume.shape


def resample(x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Linear interpolation of an n-D array to ``shape``, same extent, float32.

    Separable: the axes that shrink most go first, so the intermediate arrays stay small.
    """
    out = np.asarray(x, dtype=np.float32)
    for axis in sorted(range(len(shape)), key=lambda a: shape[a] / x.shape[a]):
        out = _lerp_axis(out, axis, shape[axis])
    return out


def resample_chunks(x: np.ndarray, shape: tuple[int, int, int],
                    chunk: int = RESAMPLE_CHUNK_SLICES) -> Iterator[tuple[int, np.ndarray]]:
    """:func:`resample` of a 3-D array, yielded as ``(first slice, block)`` of ``chunk``
    slices, so that the full-size float result never exists at once."""
    along = _lerp_axis(np.asarray(x, dtype=np.float32), 0, shape[0])
    for z in range(0, shape[0], chunk):
        yield z, _lerp_axis(_lerp_axis(along[z:z + chunk], 1, shape[1]), 2, shape[2])


def _lerp_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear interpolation along one axis to ``n_out`` samples (align_corners=False)."""
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    pos = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = (pos - lo).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
    a = np.take(x, lo, axis=axis)
    b = np.take(x, hi, axis=axis)
    b -= a
    b *= frac
    a += b
    return a
