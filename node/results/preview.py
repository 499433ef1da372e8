"""Pictures of a result for people: key slices with the segmentation overlaid, or the
radiograph with its findings.

Made from what the node stored: the source series (read as the model read it, sorted by
geometry, rescale applied) and the node's own SEG (read back with highdicom, each frame put on
the source image it references), so the picture shows what the PACS received, on the anatomy
it belongs to. Segments are drawn in their recommended display colour (the SEG's CIELab
value); the legend gives each segment's volume from the job's summary.

The returned :class:`Preview` says where each panel lies in the picture and which slice it
shows, so a test can check that a known voxel is drawn where it belongs.
"""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Mapping, Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from node.errors import InputError
from node.inference.volume import SeriesVolume, load_series

PANEL_PX = 320                   # the longer side of a panel
MAX_AXIAL = 3
ALPHA = 0.45
_BACKGROUND = (16, 18, 22)
_TEXT = (235, 235, 235)
_FALLBACK_COLOURS = ((230, 80, 80), (80, 160, 240), (250, 200, 60), (120, 220, 120), (200, 120, 230))


@dataclass(frozen=True)
class Panel:
    """One image in the picture: ``view`` ``axial`` (slice ``index`` of the sorted series) or
    ``coronal`` (row ``index``); drawn at ``(x, y)`` with ``scale`` picture pixels per source
    pixel across (and ``scale_y`` down)."""

    view: str
    index: int
    x: int
    y: int
    scale: float
    scale_y: float


@dataclass(frozen=True)
class Preview:
    png: bytes
    panels: tuple[Panel, ...]
    colours: Mapping[str, tuple[int, int, int]]


def render_segmentation(source_paths: Sequence[Path], seg_path: Path, title: str,
                        volumes_ml: Mapping[str, float] | None = None) -> Preview:
    """Key axial slices (and a coronal reformat of a volume) with each segment overlaid.

    Raises:
        InputError: the series or the SEG cannot be read, or the SEG references no image of
            the series.
    """
    volume = load_series(list(source_paths))
    names, colours, masks = _seg_masks(seg_path, volume)
    gray = _window(volume)
    union = masks.any(axis=3)
    axial = _key_slices(union)
    images: list[tuple[str, int, np.ndarray, np.ndarray, float]] = []
    for k in axial:
        images.append(("axial", k, gray[k], masks[k], 1.0))
    if volume.shape[0] >= 8:
        rows = np.nonzero(union.any(axis=(0, 2)))[0]
        r = int(np.median(rows)) if rows.size else volume.shape[1] // 2
        aspect = volume.spacing[0] / volume.spacing[1]          # slice spacing vs row spacing
        # superior at the top: the series is sorted along the slice normal (feet to head for
        # an axial CT), so the reformat is flipped vertically.
        images.append(("coronal", r, gray[::-1, r, :], masks[::-1, r, :, :], aspect))
    palette = [colours[n] for n in names]
    outline = _containers(masks)
    panels, tiles = [], []
    for view, index, plane, mask, aspect in images:
        tile, scale, scale_y = _overlay(plane, mask, palette, aspect, outline)
        tiles.append(tile)
        panels.append((view, index, scale, scale_y))
    legend = [(colours[n], f"{n}" + (f"  {volumes_ml[n]:.1f} mL" if volumes_ml and n in volumes_ml else ""))
              for n in names]
    png, placed = _compose(tiles, title, legend)
    return Preview(png=png, colours=dict(colours), panels=tuple(
        Panel(view, index, x, y, scale, scale_y) for (view, index, scale, scale_y), (x, y) in zip(panels, placed)))


def render_classification(source_paths: Sequence[Path], title: str,
                          findings: Sequence[Mapping[str, object]]) -> Preview:
    """The radiograph (the first image of the series) with each finding, its probability
    and whether it is positive.

    Raises:
        InputError: the image cannot be read.
    """
    volume = load_series(list(source_paths[:1]))
    gray = _window(volume)[0]
    tile, scale, scale_y = _overlay(gray, np.zeros((*gray.shape, 0), bool), [], 1.0, size=2 * PANEL_PX)
    legend = []
    for f in findings:
        positive = bool(f.get("positive"))
        colour = (235, 70, 60) if positive else (120, 200, 120)
        legend.append((colour, f"{f.get('name')}: p={float(f.get('probability', 0)):.3f}"
                               f"{'  POSITIVE' if positive else '  negative'}"))
    png, placed = _compose([tile], title, legend)
    return Preview(png=png, colours={}, panels=(Panel("image", 0, *placed[0], scale, scale_y),))


# ------------------------------------------------------------------ the SEG, back on the grid
def _seg_masks(seg_path: Path, volume: SeriesVolume
               ) -> tuple[list[str], dict[str, tuple[int, int, int]], np.ndarray]:
    try:
        seg = hd.seg.segread(seg_path)
    except Exception as exc:  # noqa: BLE001 - a file we wrote, but read it as untrusted
        raise InputError(f"{seg_path.name}: not a readable SEG ({type(exc).__name__}: {exc})") from exc
    numbers = list(seg.segment_numbers)
    names, colours = [], {}
    for k, number in enumerate(numbers):
        desc = seg.get_segment_description(number)
        names.append(desc.segment_label)
        lab = getattr(desc, "RecommendedDisplayCIELabValue", None)
        colours[desc.segment_label] = _lab_to_rgb(lab) if lab else _FALLBACK_COLOURS[k % len(_FALLBACK_COLOURS)]
    masks = np.zeros((*volume.shape, len(numbers)), dtype=bool)
    sops = [str(h.SOPInstanceUID) for h in volume.headers]
    try:
        if any(volume.frames):               # one enhanced multi-frame source image
            arr = seg.get_pixels_by_source_frame(source_sop_instance_uid=sops[0],
                                                 source_frame_numbers=list(volume.frames),
                                                 segment_numbers=numbers, assert_missing_frames_are_empty=True)
        else:
            arr = seg.get_pixels_by_source_instance(source_sop_instance_uids=sops, segment_numbers=numbers,
                                                    assert_missing_frames_are_empty=True)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InputError(f"{seg_path.name}: does not fit the series ({type(exc).__name__}: {exc})") from exc
    masks[...] = arr.astype(bool)
    return names, colours, masks


def _lab_to_rgb(lab: Sequence[int]) -> tuple[int, int, int]:
    """DICOM's scaled CIELab (0..65535, PS3.3 C.10.7.1.1) to 8-bit sRGB (D65)."""
    L = lab[0] * 100.0 / 65535
    a, b = lab[1] * 255.0 / 65535 - 128, lab[2] * 255.0 / 65535 - 128
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200

    def f_inv(t: float) -> float:
        return t ** 3 if t > 6 / 29 else 3 * (6 / 29) ** 2 * (t - 4 / 29)

    x, y, z = 0.95047 * f_inv(fx), f_inv(fy), 1.08883 * f_inv(fz)
    rgb = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]]) @ [x, y, z]
    rgb = np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * np.clip(rgb, 0, None) ** (1 / 2.4) - 0.055)
    return tuple(int(round(255 * v)) for v in np.clip(rgb, 0, 1))  # type: ignore[return-value]


# --------------------------------------------------------------------------------- drawing
def _window(volume: SeriesVolume) -> np.ndarray:
    """The series as 0..1 floats: the header's window, a soft-tissue window for CT, or the
    1st..99th percentile."""
    pixels = volume.pixels
    header = volume.headers[0] if volume.headers else None
    centre = width = None
    if header is not None and "WindowCenter" in header and "WindowWidth" in header:
        try:
            centre = float(np.ravel([header.WindowCenter])[0])
            width = float(np.ravel([header.WindowWidth])[0])
        except (TypeError, ValueError):
            centre = width = None
    if centre is None or not width:
        if volume.modality == "CT":
            centre, width = 40.0, 400.0
        else:
            lo, hi = np.percentile(pixels, [1, 99])
            centre, width = (lo + hi) / 2, max(float(hi - lo), 1e-6)
    out = np.clip((pixels - (centre - width / 2)) / width, 0, 1)
    return 1 - out if volume.monochrome1 else out


def _key_slices(union: np.ndarray) -> list[int]:
    """Up to three slices: the one with the most segmented area, and the quartiles of the
    slices that show any segment (the middle slice when none does)."""
    area = union.reshape(union.shape[0], -1).sum(axis=1)
    shown = np.nonzero(area)[0]
    if not shown.size:
        return [union.shape[0] // 2]
    picks = {int(shown[len(shown) // 4]), int(np.argmax(area)), int(shown[(3 * len(shown)) // 4])}
    return sorted(picks)[:MAX_AXIAL]


def _containers(masks: np.ndarray) -> list[bool]:
    """Segments that hold another segment almost whole (a body outline around the organs):
    drawn as an outline only, so what they contain stays visible."""
    flat = masks.reshape(-1, masks.shape[-1])
    sizes = flat.sum(axis=0)
    out = []
    for k in range(flat.shape[1]):
        inside = [(flat[:, j] & flat[:, k]).sum() >= 0.9 * sizes[j] for j in range(flat.shape[1])
                  if j != k and 0 < sizes[j] < sizes[k]]
        out.append(any(inside))
    return out


def _edge(m: np.ndarray) -> np.ndarray:
    """The pixels of ``m`` with a 4-neighbour outside it."""
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def _overlay(plane: np.ndarray, mask: np.ndarray, palette: Sequence[tuple[int, int, int]], aspect: float,
             outline: Sequence[bool] = (), size: int = PANEL_PX) -> tuple[Image.Image, float, float]:
    rgb = np.repeat((plane * 255).astype(np.float32)[..., None], 3, axis=2)
    for k, colour in enumerate(palette):
        m = mask[..., k]
        if k < len(outline) and outline[k]:
            rgb[_edge(m)] = colour
        else:
            rgb[m] = (1 - ALPHA) * rgb[m] + ALPHA * np.asarray(colour, np.float32)
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    rows, cols = plane.shape
    height = rows * aspect
    scale = size / max(cols, height)
    w, h = max(1, round(cols * scale)), max(1, round(height * scale))
    return img.resize((w, h), Image.NEAREST), w / cols, h / rows


def _compose(tiles: Sequence[Image.Image], title: str, legend: Sequence[tuple[tuple[int, int, int], str]]
             ) -> tuple[bytes, list[tuple[int, int]]]:
    font = _font(15)
    small = _font(13)
    pad, title_h, line_h = 10, 28, 22
    width = pad + sum(t.width + pad for t in tiles)
    tiles_h = max(t.height for t in tiles)
    height = title_h + tiles_h + 2 * pad + line_h * max(1, len(legend)) + pad
    canvas = Image.new("RGB", (max(width, 420), height), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), title, fill=_TEXT, font=font)
    placed = []
    x = pad
    for tile in tiles:
        y = title_h + pad
        canvas.paste(tile, (x, y))
        placed.append((x, y))
        x += tile.width + pad
    y = title_h + tiles_h + 2 * pad
    for colour, text in legend:
        draw.rectangle((pad, y + 3, pad + 14, y + 17), fill=colour)
        draw.text((pad + 22, y + 2), text, fill=_TEXT, font=small)
        y += line_h
    out = BytesIO()
    canvas.save(out, format="PNG", optimize=True)
    return out.getvalue(), placed


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:                          # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()
