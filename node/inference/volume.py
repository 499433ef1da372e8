"""The model input volume built from one stored DICOM series.

Slices are ordered by geometry only: each ImagePositionPatient is projected onto the slice
normal (row cosines x column cosines of ImageOrientationPatient) and the stack runs in
ascending order along that normal. File names and InstanceNumber are never used.

Accepted: single-frame images of one series (CT, MR, PET, ... any transfer syntax pydicom
and pylibjpeg can decode), one or more enhanced multi-frame files whose frames carry
per-frame plane positions, and a single image without geometry (a radiograph).

Geometry tolerances (documented for users, enforced as :class:`~node.errors.InputError`):

- orientation cosines of all slices agree within 1e-3 (about 0.06 degrees);
- two slices closer than 0.01 mm along the normal are duplicates;
- every gap between neighbouring slices is within max(0.01 mm, 1 % of the mean gap) of the
  mean gap, so a missing slice or a mixed-thickness stack is refused, not silently warped;
- PixelSpacing agrees within 1e-4 mm across slices.

A series is read eagerly (every plane decoded into one float32 array) or lazily (the headers
now, each plane's pixel data when it is asked for, see :func:`load_series`), which is how a
model that works slice by slice gets it.

Gantry tilt (positions sheared in plane) is accepted: the slice step along the normal is
what a volume in mL needs, and :attr:`SeriesVolume.affine` uses the true step vector.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import read_deferred_data_element
from pydicom.pixels import apply_modality_lut, get_decoder, pixel_array
from pydicom.uid import (DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)

from node.errors import InputError, RetryableError

log = logging.getLogger(__name__)

ORIENTATION_TOL = 1e-3
DUPLICATE_TOL_MM = 0.01
SPACING_TOL_MM = 0.01
SPACING_TOL_REL = 0.01
PIXEL_SPACING_TOL_MM = 1e-4
#: Values larger than this are left in the file by the header pass (pixel data, in practice).
DEFER_BYTES = 64 * 1024
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Decoder plugins measured several times faster than pydicom's default choice.
_FAST_DECODERS = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls",
                  RLELossless: "pylibjpeg"}
#: What DCMTK's dcmdjpeg decodes when pydicom's decoders cannot (it is in the Debian package dcmtk).
DCMDJPEG = "dcmdjpeg"
DCMTK_TIMEOUT_S = 120.0
_DCMTK_JPEG = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1})


@dataclass(frozen=True, eq=False)
class SeriesVolume:
    """A series as one array of physical values, with the headers and geometry to go back.

    ``pixels`` is float32 ``(slices, rows, cols)`` with the modality rescale applied (HU for
    CT). MONOCHROME1 images are not inverted; ``monochrome1`` says so. ``headers[i]`` is the
    dataset of slice ``i`` without its pixel data; for a multi-frame file the same dataset
    appears once per frame and ``frames[i]`` is the 1-based frame number (0 for
    single-frame files). ``orientation`` (six direction cosines, row then column) and
    ``positions`` (ImagePositionPatient per slice) are empty for an image without geometry.
    """

    pixels: np.ndarray | None
    headers: tuple[Dataset, ...]
    spacing: tuple[float, float, float]           # (slice, row, col) in mm
    modality: str
    monochrome1: bool
    orientation: tuple[float, ...] = ()
    positions: tuple[tuple[float, float, float], ...] = ()
    frames: tuple[int, ...] = ()
    #: Decodes planes on demand when ``pixels`` is ``None`` (``load_series(..., lazy=True)``).
    source: _Planes | None = field(default=None, repr=False)

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.pixels is None:
            assert self.source is not None
            return self.source.shape
        return tuple(self.pixels.shape)  # type: ignore[return-value]

    def planes(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Physical values of slices ``start:stop``, float32 ``(n, rows, cols)``: a view of
        ``pixels``, or decoded now from the files (a fresh array each call).

        Raises:
            InputError: a file's pixel data cannot be decoded (lazy volumes only; an eager
                one was decoded by :func:`load_series`).
            RetryableError: a file was replaced after its header was read (lazy only).
        """
        if self.pixels is not None:
            return self.pixels[start:stop]
        assert self.source is not None
        return self.source.decode(*slice(start, stop).indices(self.source.shape[0])[:2])

    def loaded(self) -> SeriesVolume:
        """This volume with every plane decoded into ``pixels`` (itself when it already is)."""
        if self.pixels is not None:
            return self
        return replace(self, pixels=self.planes(), source=None)

    def chunks(self, size: int = 16) -> Iterator[np.ndarray]:
        """The volume ``size`` slices at a time, in order (for whole-series statistics)."""
        for start in range(0, self.shape[0], size):
            yield self.planes(start, start + size)

    @property
    def has_geometry(self) -> bool:
        return bool(self.orientation)

    @property
    def normal(self) -> np.ndarray | None:
        """Unit slice normal (row cosines x column cosines); ``None`` without geometry."""
        if not self.orientation:
            return None
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)

    @property
    def origin(self) -> tuple[float, float, float] | None:
        """Patient coordinates (mm) of the centre of the first pixel of the first slice."""
        return self.positions[0] if self.positions else None

    @property
    def affine(self) -> np.ndarray | None:
        """4x4 matrix taking (slice, row, col, 1) indices to patient coordinates in mm."""
        if not self.orientation:
            return None
        row_cos, col_cos = np.array(self.orientation[:3]), np.array(self.orientation[3:])
        pos = np.array(self.positions)
        if len(pos) > 1:
            step = (pos[-1] - pos[0]) / (len(pos) - 1)
        else:
            step = self.normal * self.spacing[0]
        m = np.eye(4)
        m[:3, 0] = step
        m[:3, 1] = col_cos * self.spacing[1]     # moving down a row follows the column cosines
        m[:3, 2] = row_cos * self.spacing[2]     # moving along a row follows the row cosines
        m[:3, 3] = pos[0]
        return m


@dataclass
class _Slice:
    """One image plane as read: a single-frame file or one frame of a multi-frame file."""

    ds: Dataset
    frame: int                       # 1-based frame number, 0 for a single-frame file
    stored: np.ndarray | None        # (rows, cols) stored values; None: not decoded yet
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, ...] | None
    slope: float
    intercept: float
    name: str
    path: Path | None = None                     # where a deferred ``stored`` is read from
    pixel_data: RawDataElement | None = None     # its pixel data element, value not read
    identity: tuple[int, int, int] = (0, 0, 0)   # of the file when its header was read


class _Planes:
    """The slices of a lazily loaded series, decoded a few at a time from their files."""

    def __init__(self, slices: Sequence[_Slice]) -> None:
        self.slices = list(slices)
        first = self.slices[0].ds
        self.shape = (len(self.slices), int(first.Rows), int(first.Columns))

    def decode(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((max(0, stop - start), *self.shape[1:]), dtype=np.float32)
        for i, s in enumerate(self.slices[start:stop]):
            _rescale_into(s, self._stored(s), out[i])
        return out

    def check_first(self) -> None:
        """Decode the first plane now, and keep it: the image size the headers declare is
        real before anyone allocates by it.

        Raises:
            InputError: it cannot be decoded, or not to that size.
        """
        first = self.slices[0]
        first.stored = self._stored(first)

    def _stored(self, s: _Slice) -> np.ndarray:
        stored = s.stored if s.stored is not None else _decode_deferred(s)
        if stored.shape != self.shape[1:]:
            raise InputError(f"{s.name}: {stored.shape[0]} x {stored.shape[1]} pixels, "
                             f"the header says {self.shape[1]} x {self.shape[2]}")
        return stored


def load_series(paths: Sequence[Path], *, lazy: bool = False) -> SeriesVolume:
    """Read the files of one series and stack them in geometric order.

    With ``lazy``, only the headers are read now, and each single-frame image's pixel data is
    read and decoded when :meth:`SeriesVolume.planes` asks for it (``pixels`` is ``None``):
    a model that works slice by slice does not need the whole volume in memory. Enhanced
    multi-frame files are decoded at once either way.

    Raises:
        InputError: for unreadable or non-image files, more than one series, colour images,
            inconsistent image sizes or pixel spacing, missing or mixed geometry, duplicate
            positions or non-uniform slice spacing; the message names the problem.
    """
    if not paths:
        raise InputError("no files given")
    slices: list[_Slice] = []
    for path in paths:
        slices.extend(_read(Path(path)))
    _check_same(slices, "SeriesInstanceUID", "mixed series")
    _check_same(slices, "Rows", "inconsistent image size (Rows)")
    _check_same(slices, "Columns", "inconsistent image size (Columns)")
    _check_same(slices, "PhotometricInterpretation", "mixed PhotometricInterpretation")
    first = slices[0].ds

    if len(slices) == 1:
        order, slice_spacing, pixel_spacing = [0], _single_thickness(first), \
            _single_pixel_spacing(slices[0])
        geometric = slices[0].position is not None and slices[0].orientation is not None
    else:
        order, slice_spacing = _geometric_order(slices)
        pixel_spacing = slices[0].pixel_spacing
        geometric = True

    ordered = [slices[k] for k in order]
    planes = _Planes(ordered)
    planes.check_first()
    return SeriesVolume(
        pixels=None if lazy else planes.decode(0, len(ordered)),
        source=planes if lazy else None,
        headers=tuple(s.ds for s in ordered),
        spacing=(float(slice_spacing), float(pixel_spacing[0]), float(pixel_spacing[1])),
        modality=str(first.get("Modality", "") or ""),
        monochrome1=first.get("PhotometricInterpretation", "") == "MONOCHROME1",
        orientation=tuple(ordered[0].orientation) if geometric else (),
        positions=tuple(tuple(s.position) for s in ordered  # type: ignore[misc]
                        ) if geometric else (),
        frames=tuple(s.frame for s in ordered),
    )


def _read(path: Path) -> list[_Slice]:
    """The image planes of one file, pixel data dropped from the header: a multi-frame
    file's decoded now, a single-frame file's left in the file to be read on demand
    (:func:`_decode_deferred`)."""
    identity = _identity(path)
    ds = _read_whole(path, defer_size=DEFER_BYTES)
    if "PixelData" not in ds:
        raise InputError(f"{path.name}: no pixel data (not an image)")
    raw = ds.get_item("PixelData", keep_deferred=True)
    if raw.value is None and ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        ds = _read_whole(path)           # the inflated stream cannot be read again from the file
        raw = ds.get_item("PixelData", keep_deferred=True)
    length = raw.length if raw.value is None else len(raw.value)
    if not length:
        raise InputError(f"{path.name}: zero-length pixel data")
    problem = _native_size_problem(ds, length)
    if problem:
        raise InputError(f"{path.name}: pixel data cannot be decoded ({problem})")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"{path.name}: colour images are not supported "
                         f"(SamplesPerPixel {ds.SamplesPerPixel})")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    if frames > 1 and not enhanced:
        raise InputError(f"{path.name}: multi-frame image without per-frame positions "
                         "(PerFrameFunctionalGroupsSequence)")
    if not enhanced:
        if not isinstance(raw, RawDataElement):      # already converted: keep it, as read
            raw = None
            stored = _decode(path, ds)[0]
        else:
            stored = None
        _drop_pixels(ds)
        return [_Slice(ds, 0, stored, _floats(ds, "ImagePositionPatient"),
                       _floats(ds, "ImageOrientationPatient"), _floats(ds, "PixelSpacing"),
                       *_rescale(ds), path.name, path, raw, identity)]
    stored = _decode(path, ds)
    _drop_pixels(ds)
    out = []
    for i in range(frames):
        plane = _group(ds, i, "PlanePositionSequence")
        orient = _group(ds, i, "PlaneOrientationSequence")
        measures = _group(ds, i, "PixelMeasuresSequence")
        values = _group(ds, i, "PixelValueTransformationSequence")
        out.append(_Slice(
            ds, i + 1, stored[i],
            _floats(plane, "ImagePositionPatient") if plane else None,
            _floats(orient, "ImageOrientationPatient") if orient else None,
            _floats(measures, "PixelSpacing") if measures else None,
            *(_rescale(values) if values else _rescale(ds)), f"{path.name} frame {i + 1}"))
    return out


def _identity(path: Path) -> tuple[int, int, int]:
    """Which file ``path`` is now: a stored instance re-sent is a new file renamed over it."""
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _read_whole(path: Path, defer_size: int | None = None) -> Dataset:
    try:
        return pydicom.dcmread(path, defer_size=defer_size)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types for malformed files
        raise InputError(f"{path.name}: not a readable DICOM file ({exc})") from exc


def _decode(path: Path, ds: Dataset) -> np.ndarray:
    """Stored values of ``ds`` (its pixel data present), ``(frames, rows, cols)``.

    Raises:
        InputError: neither pydicom's decoders nor DCMTK's can decode it.
    """
    try:
        return _stored_pixels(ds)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any decoder failure is the input's
        return _decode_with_dcmtk(path, ds, exc)


def _drop_pixels(ds: Dataset) -> None:
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            delattr(ds, keyword)


def _decode_deferred(s: _Slice) -> np.ndarray:
    """Stored values of a single-frame image whose pixel data was set aside by the header
    pass: as read then (a small or compressed image), or still in the file (read now from
    where the header pass found it). It is decoded and let go again, so that the header
    keeps no pixels.

    Raises:
        InputError: the file changed or the pixel data cannot be decoded.
    """
    assert s.path is not None and s.pixel_data is not None
    element = s.pixel_data
    if element.value is None:
        if _identity(s.path) != s.identity:
            raise RetryableError(f"{s.name}: the file changed after its header was read (re-sent?)")
        try:
            element = read_deferred_data_element(open, str(s.path), None, element)
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - the file is read again: anything wrong is the input's
            raise InputError(f"{s.name}: pixel data cannot be read again ({type(exc).__name__}: "
                             f"{str(exc)[:200]})") from exc
    s.ds[element.tag] = element
    try:
        return _decode(s.path, s.ds)[0]
    finally:
        _drop_pixels(s.ds)


def _decode_with_dcmtk(path: Path, ds: Dataset, failure: Exception) -> np.ndarray:
    """The fallback for the JPEG process 1, 2/4 and 14 files that pydicom's decoders refuse
    and DCMTK's (IJG 8/12/16-bit) decode, such as 12-bit JPEG Extended with a non-standard
    SOS: DCMTK's ``dcmdjpeg`` writes the file uncompressed into a temporary folder.

    Raises:
        InputError: no fallback applies (another syntax, DCMTK not installed) or it failed too;
            the message names pydicom's reason.
    """
    reason = f"pixel data cannot be decoded ({type(failure).__name__}: {str(failure)[:200]})"
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    tool = shutil.which(DCMDJPEG)
    if ts not in _DCMTK_JPEG or tool is None:
        raise InputError(f"{path.name}: {reason}") from failure
    with tempfile.TemporaryDirectory(prefix="ainode-decode-") as tmp:
        out = Path(tmp) / "plain.dcm"
        try:
            done = subprocess.run([tool, str(path), str(out)], capture_output=True, timeout=DCMTK_TIMEOUT_S,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise InputError(f"{path.name}: {reason}; DCMTK's dcmdjpeg did not finish in "
                             f"{DCMTK_TIMEOUT_S:.0f} s") from failure
        if done.returncode != 0 or not out.is_file():
            raise InputError(f"{path.name}: {reason}; DCMTK's dcmdjpeg failed too: "
                             f"{done.stderr.decode(errors='replace').strip()[:200]}") from failure
        plain = pydicom.dcmread(out)
        stored = _stored_pixels(plain)
    log.info("%s: decoded by DCMTK's dcmdjpeg (pydicom's decoders refused it: %s)", path.name,
             str(failure).splitlines()[-1][:160] if str(failure) else type(failure).__name__)
    return stored


def _native_size_problem(ds: Dataset, length: int) -> str:
    """For uncompressed pixel data, why its ``length`` cannot hold the image the header
    declares (checked before anything is allocated); ``""`` when it can or is compressed."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        if ts is None or ts.is_encapsulated:
            return ""
        bits = int(ds.BitsAllocated)
        expected = (int(ds.get("NumberOfFrames", 1) or 1) * int(ds.Rows) * int(ds.Columns) * bits + 7) // 8
    except (AttributeError, TypeError, ValueError):
        return ""                                   # left to the decoder, which names it
    if length == 0xFFFFFFFF or length < expected:
        return (f"{length if length != 0xFFFFFFFF else 'undefined length'} bytes of pixel data, "
                f"{expected} expected from Rows, Columns and NumberOfFrames")
    return ""


def _stored_pixels(ds: Dataset) -> np.ndarray:
    """Stored values as ``(frames, rows, cols)``, bits above BitsStored cleared or sign-extended."""
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    bits_alloc = int(ds.BitsAllocated)
    bits_stored = int(ds.get("BitsStored", bits_alloc) or bits_alloc)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    shape = (frames, int(ds.Rows), int(ds.Columns))
    if ts is not None and not ts.is_encapsulated and ts.is_little_endian \
            and bits_alloc in (8, 16, 32):
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits_alloc // 8}")
        count = shape[0] * shape[1] * shape[2]
        data = ds.PixelData
        if len(data) < count * dtype.itemsize:
            raise ValueError(f"{len(data)} bytes of pixel data, {count * dtype.itemsize} "
                             "expected from Rows, Columns and NumberOfFrames")
        arr = np.frombuffer(data, dtype=dtype, count=count).reshape(shape)
    else:
        plugin = _FAST_DECODERS.get(ts, "")
        if plugin and plugin not in get_decoder(ts).available_plugins:
            plugin = ""
        arr = pixel_array(ds, decoding_plugin=plugin).reshape(shape)
    if bits_stored < arr.dtype.itemsize * 8:
        if signed:
            shift = arr.dtype.itemsize * 8 - bits_stored
            arr = (arr << shift) >> shift
        else:
            arr = arr & arr.dtype.type((1 << bits_stored) - 1)
    return arr


def _rescale(ds: Dataset) -> tuple[float, float]:
    """(slope, intercept); absent or unreadable values, or an invalid zero slope, read as
    no rescale."""
    slope, intercept = _floats(ds, "RescaleSlope"), _floats(ds, "RescaleIntercept")
    return (slope[0] if slope and slope[0] != 0 else 1.0, intercept[0] if intercept else 0.0)


def _rescale_into(s: _Slice, stored: np.ndarray, out: np.ndarray) -> None:
    """Write the physical values of ``s`` (its ``stored`` values) into ``out`` (float32)."""
    if "ModalityLUTSequence" in s.ds and s.frame == 0:
        out[...] = apply_modality_lut(stored, s.ds)
    elif s.slope == 1.0:
        np.add(stored, np.float32(s.intercept), out=out, casting="unsafe")
    else:
        np.multiply(stored, np.float32(s.slope), out=out, casting="unsafe")
        out += np.float32(s.intercept)


def _group(ds: Dataset, index: int, keyword: str) -> Dataset | None:
    """Item of functional group ``keyword`` for frame ``index``: per-frame, else shared."""
    for groups, item in (("PerFrameFunctionalGroupsSequence", index),
                         ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(groups)
        if seq is not None and item < len(seq):
            found = seq[item].get(keyword)
            if found:
                return found[0]
    return None


def _floats(ds: Dataset, keyword: str) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        return tuple(float(v) for v in (value if isinstance(value, Sequence) and not
                                         isinstance(value, str) else [value]))
    except (TypeError, ValueError):
        return None


def _single_pixel_spacing(s: _Slice) -> tuple[float, float]:
    """Pixel spacing of a lone image: PixelSpacing, else ImagerPixelSpacing, else 1 mm."""
    for value in (s.pixel_spacing, _floats(s.ds, "ImagerPixelSpacing")):
        if value and len(value) == 2 and min(value) > 0:
            return value[0], value[1]
    return 1.0, 1.0


def _single_thickness(ds: Dataset) -> float:
    """Slice extent of a lone image: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    for keyword in ("SpacingBetweenSlices", "SliceThickness"):
        value = _floats(ds, keyword)
        if value and value[0] > 0:
            return value[0]
    return 1.0


def _check_same(slices: list[_Slice], keyword: str, problem: str) -> None:
    values: dict[Any, str] = {}
    for s in slices:
        values.setdefault(str(s.ds.get(keyword, "")), s.name)
    if len(values) > 1:
        shown = ", ".join(f"{v!r} ({name})" for v, name in list(values.items())[:3])
        raise InputError(f"{problem}: {keyword} takes {len(values)} values: {shown}")


def _geometric_order(slices: list[_Slice]) -> tuple[list[int], float]:
    """Slice order along the normal and the slice spacing, after checking the geometry."""
    for keyword, attr, size in (("ImagePositionPatient", "position", 3),
                                ("ImageOrientationPatient", "orientation", 6),
                                ("PixelSpacing", "pixel_spacing", 2)):
        bad = [s.name for s in slices if getattr(s, attr) is None or len(getattr(s, attr)) != size]
        if bad:
            raise InputError(f"missing or invalid {keyword} in {len(bad)} of {len(slices)} "
                             f"images (e.g. {bad[0]}); a stack of slices needs it")
    _check_same(slices, "FrameOfReferenceUID", "mixed frames of reference")

    orient = np.array([s.orientation for s in slices])
    deviation = np.abs(orient - orient[0]).max(axis=1)
    if deviation.max() > ORIENTATION_TOL:
        k = int(deviation.argmax())
        raise InputError(f"mixed orientations: ImageOrientationPatient {slices[k].orientation} "
                         f"in {slices[k].name} differs from {slices[0].orientation} "
                         f"in {slices[0].name}")
    row, col = orient[0, :3], orient[0, 3:]
    if (abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2
            or abs(row @ col) > 1e-2):
        raise InputError(f"ImageOrientationPatient {slices[0].orientation} is not two "
                         "orthogonal unit vectors")
    spacing = np.array([s.pixel_spacing for s in slices])
    if np.abs(spacing - spacing[0]).max() > PIXEL_SPACING_TOL_MM or spacing.min() <= 0:
        raise InputError(f"inconsistent PixelSpacing: from {spacing.min():g} to "
                         f"{spacing.max():g} mm")

    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    along = np.array([s.position for s in slices]) @ normal
    order = np.argsort(along, kind="stable")
    d = along[order]
    gaps = np.diff(d)
    if gaps.min() < DUPLICATE_TOL_MM:
        k = int(gaps.argmin())
        a, b = slices[order[k]].name, slices[order[k + 1]].name
        raise InputError(f"duplicate slice positions: {a} and {b} both lie at "
                         f"{d[k]:.3f} mm along the slice normal")
    mean = (d[-1] - d[0]) / (len(d) - 1)
    tol = max(SPACING_TOL_MM, SPACING_TOL_REL * mean)
    off = np.abs(gaps - mean)
    if off.max() > tol:
        k = int(off.argmax())
        raise InputError(
            f"non-uniform slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm "
            f"(mean {mean:.3f}, tolerance {tol:.3f}); e.g. {gaps[k]:.3f} mm between "
            f"{slices[order[k]].name} and {slices[order[k + 1]].name} - a slice missing?")
    return [int(k) for k in order], float(mean)
