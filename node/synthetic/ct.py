"""Synthetic chest CT for the demo, the tests and the benchmarks (nothing is downloaded).

The phantom is air around an elliptic-cylinder body of soft tissue with a thin layer of
fat under the skin, two ellipsoid lungs, a spine, a sternum and ribs, with seeded gaussian
noise. Shapes are defined relative to the field of view and the scan length, so any size,
slice count or spacing gives the same anatomy. The ground-truth masks come from the same
label map as the voxels, so they agree exactly with what is written to disk.

The written series is deliberately awkward for naive readers: file names are hashes and
InstanceNumber runs against the slice position, so only sorting by geometry is right.
"""

from __future__ import annotations

import hashlib
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels import get_encoder
from pydicom.uid import (
    CTImageStorage, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian,
    ImplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless, UID,
)

from node import __version__

SUPPORTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1,
)
FIELD_OF_VIEW_MM = 380.0
IMPLEMENTATION_CLASS_UID = "2.25.171079425693542547325311478424913470346"

# Label values of the internal label map and the HU each is drawn with.
_AIR, _FAT, _TISSUE, _LUNG, _BONE = range(5)
_HU = np.array([-1000, -100, 40, -850, 700], dtype=np.int16)
_NOISE_SD_HU = 10.0
_HU_MIN, _HU_MAX = -1024, 3071


@dataclass(frozen=True)
class Phantom:
    """A written phantom series and its ground truth.

    ``files`` are in slice order (ascending position along the slice normal, the order of
    :func:`phantom_volume`); the folder listing is not.
    """

    files: tuple[Path, ...]
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    shape: tuple[int, int, int]                 # (slices, rows, cols)
    spacing: tuple[float, float, float]         # (slice spacing, row spacing, col spacing) mm
    volumes_ml: dict[str, float]                # "Body", "Lungs", "Bone"
    transfer_syntax: str = ExplicitVRLittleEndian


def phantom_volume(slices: int = 64, size: int = 256,
                   seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return the phantom in HU, int16 ``(slices, size, size)``, and its ground-truth masks.

    The masks are boolean arrays of the same shape: ``Body`` (everything inside the body
    outline, lungs and bone included), ``Lungs`` and ``Bone``.
    """
    if slices < 1 or size < 16:
        raise ValueError("phantom needs at least 1 slice and 16 x 16 pixels")
    labels = _label_map(slices, size)
    rng = np.random.default_rng(seed)
    # Gaussian noise drawn from a table of 65536 gaussian values: 5x faster than sampling
    # a normal per voxel, which matters at 300 x 512 x 512.
    table = np.rint(rng.standard_normal(65536) * _NOISE_SD_HU).astype(np.int16)
    n = labels.size
    draws = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, size=-(-n // 4),
                         dtype=np.int64, endpoint=True).view(np.uint16)[:n].reshape(labels.shape)
    hu = np.empty(labels.shape, dtype=np.int16)
    for k in range(slices):
        np.add(table[draws[k]], _HU[labels[k]], out=hu[k])
    np.clip(hu, _HU_MIN, _HU_MAX, out=hu)
    masks = {"Body": labels != _AIR, "Lungs": labels == _LUNG, "Bone": labels == _BONE}
    return hu, masks


def _label_map(slices: int, size: int) -> np.ndarray:
    """Label map ``(slices, size, size)``; rows run anterior to posterior, cols right to left."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1       # pixel centres in [-1, 1]
    v, u = np.meshgrid(c, c, indexing="ij")                             # v: rows, u: cols
    t = (np.arange(slices, dtype=np.float32) + 0.5) / slices * 2 - 1    # slice centres in [-1, 1]

    def ellipse(cu: float, cv: float, au: float, av: float) -> np.ndarray:
        return ((u - cu) / au) ** 2 + ((v - cv) / av) ** 2

    body = ellipse(0, 0, 0.84, 0.60) < 1
    fat = body & ~(ellipse(0, 0, 0.80, 0.56) < 1)
    spine = (ellipse(0, 0.38, 0.08, 0.08) < 1) | (ellipse(0, 0.49, 0.03, 0.05) < 1)
    sternum = ellipse(0, -0.52, 0.06, 0.03) < 1
    lung_q = np.minimum(ellipse(-0.37, -0.05, 0.27, 0.38), ellipse(0.37, -0.05, 0.27, 0.38))
    lung_r2 = 1 - ((t - 0.1) / 0.8) ** 2                                 # ellipsoids in z

    labels = np.empty((slices, size, size), dtype=np.uint8)
    labels[:] = np.where(body, np.where(fat, _FAT, _TISSUE), _AIR).astype(np.uint8)
    labels[lung_q[None] < lung_r2[:, None, None]] = _LUNG
    labels[:, spine] = _BONE
    sr, sc = np.nonzero(sternum)
    labels[np.flatnonzero(t > -0.5)[:, None], sr[None], sc[None]] = _BONE   # upper chest

    # Ribs: short ovals on an ellipse inside the body wall, in bands along z, drifting in angle.
    ring = np.sqrt((u / 0.76) ** 2 + (v / 0.53) ** 2)
    band = np.abs(ring - 1) < 0.045
    rr, cc = np.nonzero(band)
    phi = np.arctan2(v[rr, cc] / 0.53, u[rr, cc] / 0.76)
    lateral = np.abs(np.abs(phi) - np.pi / 2) >= 0.35                  # clear of sternum, spine
    step = 2 * np.pi / 18
    for k in range(slices):
        if np.sin(2 * np.pi * 5 * t[k]) < -0.2 or t[k] < -0.9:
            continue                                                    # between ribs
        d = np.mod(phi - 0.25 * t[k] + step / 2, step) - step / 2        # angle to nearest rib
        hit = (np.abs(d) < 0.05) & lateral
        labels[k, rr[hit], cc[hit]] = _BONE
    return labels


def make_ct_series(
    out_dir: Path, slices: int = 64, size: int = 256, *,
    pixel_spacing: float | None = None, slice_spacing: float = 2.5, seed: int = 0,
    transfer_syntax: str = ExplicitVRLittleEndian, patient_id: str = "PHANTOM-0001",
    patient_name: str = "Phantom^Demo", study_uid: str | None = None,
    accession: str = "DEMO0001", series_description: str = "Synthetic chest CT (phantom)",
    signed: bool = False,
) -> Phantom:
    """Write the phantom as single-frame CT Image Storage files in ``out_dir``.

    ``pixel_spacing`` defaults to a ~380 mm field of view. UIDs are derived from the
    parameters (not from the transfer syntax: a lossless re-encoding is the same instance),
    so the same call always writes the same study. Stored values are unsigned 12-bit with
    RescaleIntercept -1024, or with ``signed`` signed 16-bit with intercept 0 (raw HU).

    Raises:
        ValueError: for an unsupported transfer syntax or bad sizes.
    """
    ts = UID(transfer_syntax)
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {ts} ({ts.name})")
    if pixel_spacing is None:
        pixel_spacing = float(_ds(FIELD_OF_VIEW_MM / size))
    pixel_spacing, slice_spacing = float(_ds(pixel_spacing)), float(_ds(slice_spacing))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    hu, masks = phantom_volume(slices, size, seed)
    key = ("pacs-ai-node phantom", seed, slices, size, pixel_spacing, slice_spacing,
           patient_id, patient_name, accession, series_description, signed)
    study_uid = study_uid or _uid(*key, "study")
    series_uid = _uid(study_uid, *key, "series")
    for_uid = _uid(study_uid, *key, "frame of reference")

    ds = _template(size, pixel_spacing, slice_spacing, ts, signed=signed,
                   patient_id=patient_id, patient_name=patient_name, study_uid=study_uid,
                   series_uid=series_uid, for_uid=for_uid, accession=accession,
                   series_description=series_description)
    encode = _frame_encoder(ts, size, signed)
    x0 = y0 = -(size - 1) / 2 * pixel_spacing
    z0 = -(slices - 1) / 2 * slice_spacing
    files = []
    for k in range(slices):
        z = z0 + k * slice_spacing
        sop_uid = _uid(series_uid, k)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.InstanceNumber = slices - k                       # runs against z on purpose
        ds.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z)]
        ds.SliceLocation = _ds(z)
        stored = hu[k] if signed else (hu[k] + 1024).astype(np.uint16)
        ds.PixelData = encode(stored)
        if ts.is_encapsulated:
            ds["PixelData"].VR = "OB"
            ds["PixelData"].is_undefined_length = True
        path = out_dir / (hashlib.sha1(sop_uid.encode()).hexdigest()[:16] + ".dcm")
        if ts == DeflatedExplicitVRLittleEndian:
            _write_deflated(path, ds)
        else:
            ds.save_as(path, enforce_file_format=True)
        files.append(path)

    voxel_ml = slice_spacing * pixel_spacing * pixel_spacing / 1000.0
    return Phantom(
        files=tuple(files), study_uid=study_uid, series_uid=series_uid,
        frame_of_reference_uid=for_uid, shape=(slices, size, size),
        spacing=(slice_spacing, pixel_spacing, pixel_spacing),
        volumes_ml={name: float(m.sum()) * voxel_ml for name, m in masks.items()},
        transfer_syntax=ts)


def _write_deflated(path: Path, ds: Dataset) -> None:
    """Write a Deflated Explicit VR Little Endian file with fast (level 1) compression."""
    body = DicomBytesIO()
    body.is_implicit_VR, body.is_little_endian = False, True
    write_dataset(body, ds)
    deflated = zlib.compress(body.getvalue(), level=1, wbits=-zlib.MAX_WBITS)
    out = DicomBytesIO()
    out.is_implicit_VR, out.is_little_endian = False, True
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, ds.file_meta, enforce_standard=True)
    out.write(deflated + b"\0" * (len(deflated) % 2))
    path.write_bytes(out.getvalue())


def _uid(*parts: object) -> str:
    """A deterministic ``2.25.`` UID (name-based UUID) from ``parts``."""
    name = "\x1f".join(str(p) for p in parts)
    return "2.25." + str(uuid.uuid5(uuid.NAMESPACE_OID, name).int)


def _ds(value: float) -> str:
    """``value`` as a Decimal String of at most 16 characters."""
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot write {value} as a DS")


def synthetic_header(sop_class: str, sop_uid: str, ts: UID, modality: str, *, study_uid: str,
                     series_uid: str, accession: str, patient_id: str, patient_name: str, device: str,
                     study_description: str, series_description: str) -> Dataset:
    """The patient, study, series and equipment attributes every synthetic image shares."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = f"AINODE_{__version__}"[:16]

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = "20250101"
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = "120000"
    ds.AccessionNumber = accession
    ds.Modality = modality
    ds.Manufacturer = "pacs-ai-node"
    ds.ManufacturerModelName = device
    ds.SoftwareVersions = __version__
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = study_description
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    return ds


def _template(size: int, pixel_spacing: float, slice_spacing: float, ts: UID, *,
              signed: bool, patient_id: str, patient_name: str, study_uid: str,
              series_uid: str, for_uid: str, accession: str,
              series_description: str) -> Dataset:
    """The dataset shared by every slice; the per-slice attributes are set by the caller."""
    ds = synthetic_header(CTImageStorage, study_uid, ts, "CT", study_uid=study_uid, series_uid=series_uid,
                          accession=accession, patient_id=patient_id, patient_name=patient_name,
                          device="Synthetic phantom", study_description="Synthetic chest CT",
                          series_description=series_description)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(slice_spacing)
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [_ds(pixel_spacing), _ds(pixel_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if signed else 0
    ds.WindowCenter = ["40", "-600"]
    ds.WindowWidth = ["400", "1500"]
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
    ds.RescaleIntercept = "0" if signed else "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.LossyImageCompression = "00"
    return ds


def _frame_encoder(ts: UID, size: int, signed: bool) -> Callable[[np.ndarray], bytes]:
    """A function turning one stored-value image into the Pixel Data value for ``ts``."""
    if not ts.is_encapsulated:
        return lambda img: np.ascontiguousarray(img, dtype="<i2" if signed else "<u2").tobytes()
    bits = 16 if signed else 12
    if ts == JPEGLosslessSV1:
        return lambda img: encapsulate([_jpeg_lossless_sv1(img.view(np.uint16), bits)])
    encoder = get_encoder(ts)
    if not encoder.is_available:
        raise ValueError(f"no encoder for {ts.name}: missing "
                         f"{', '.join(encoder.missing_dependencies)}")
    opts = dict(rows=size, columns=size, number_of_frames=1, samples_per_pixel=1,
                bits_allocated=16, bits_stored=bits, pixel_representation=int(signed),
                photometric_interpretation="MONOCHROME2")
    if ts == RLELossless and "pylibjpeg" in encoder.available_plugins:
        opts["encoding_plugin"] = "pylibjpeg"              # ~10x faster than pydicom's own
    return lambda img: encapsulate([encoder.encode(img, **opts)])


# --- JPEG Lossless, process 14, selection value 1 (ITU-T T.81 annex H) ---------------------
# pydicom has no encoder for it, so the few lines below make one: first-order prediction,
# a Huffman table optimised per image (T.81 annex K.2), vectorised bit packing.

def _jpeg_lossless_sv1(img: np.ndarray, precision: int) -> bytes:
    """Encode a 2-D unsigned image of ``precision`` bits as a JPEG Lossless SV1 codestream."""
    rows, cols = img.shape
    x = img.astype(np.int32)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (((x - pred) + 32768) & 0xFFFF) - 32768      # modulo 2^16 (T.81 H.1.2.1)
    diff = diff.ravel()
    cat = np.frexp(np.abs(diff).astype(np.float64))[1].astype(np.int64)   # SSSS, 0..16
    lengths = _huffman_lengths(np.bincount(cat, minlength=17))
    codes = _canonical_codes(lengths)
    extra_len = np.where(cat < 16, cat, 0)
    extra = np.where(diff < 0, diff - 1, diff) & ((1 << extra_len) - 1)
    nbits = lengths[cat] + extra_len                      # 1..32 bits per sample
    word = (codes[cat] << extra_len) | extra
    left = (word << (32 - nbits)).astype(">u4")           # left-aligned in 32 bits
    bits = np.unpackbits(left.view(np.uint8)).reshape(-1, 32)
    bits = bits[np.arange(32) < nbits[:, None]]
    pad = (-bits.size) % 8
    data = np.packbits(np.concatenate([bits, np.ones(pad, np.uint8)]))
    data = np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0)          # byte stuffing

    used = [s for s in range(17) if lengths[s]]
    used.sort(key=lambda s: (lengths[s], s))
    counts = np.bincount(lengths[used], minlength=17)[1:17]
    sof = bytes([0xFF, 0xC3, 0, 11, precision]) + rows.to_bytes(2, "big") \
        + cols.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    dht_body = bytes([0x00]) + bytes(counts.astype(np.uint8)) + bytes(used)
    dht = bytes([0xFF, 0xC4]) + (2 + len(dht_body)).to_bytes(2, "big") + dht_body
    sos = bytes([0xFF, 0xDA, 0, 8, 1, 1, 0x00, 1, 0, 0])  # Ss = 1: predictor Ra
    return b"\xff\xd8" + sof + dht + sos + data.tobytes() + b"\xff\xd9"


def _huffman_lengths(freq: np.ndarray) -> np.ndarray:
    """Code lengths (0 = unused) for 17 symbols, at most 16 bits, no all-ones code (K.2)."""
    n = len(freq)
    f = [int(v) for v in freq] + [1]                      # reserved symbol keeps 1...1 free
    size = [0] * (n + 1)
    other = [-1] * (n + 1)
    while True:
        live = [i for i in range(n + 1) if f[i] > 0]
        if len(live) < 2:
            break
        v1 = min(live, key=lambda i: (f[i], -i))
        v2 = min((i for i in live if i != v1), key=lambda i: (f[i], -i))
        f[v1] += f[v2]
        f[v2] = 0
        for v in (v1, v2):
            size[v] += 1
            while other[v] >= 0:
                v = other[v]
                size[v] += 1
        v = v1
        while other[v] >= 0:
            v = other[v]
        other[v] = v2
    bits = [0] * 33
    for s in size:
        if s:
            bits[s] += 1
    i = 32
    while i > 16:                                          # limit to 16 bits (K.3)
        if bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
        else:
            i -= 1
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1                                           # drop the reserved symbol
    order = sorted((i for i in range(n) if size[i]), key=lambda i: (size[i], i))
    lengths = np.zeros(n, dtype=np.int64)
    it = iter(order)
    for length in range(1, 17):
        for _ in range(bits[length]):
            lengths[next(it)] = length
    return lengths


def _canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical Huffman codes for ``lengths``, symbols of equal length in value order (C.2)."""
    codes = np.zeros(len(lengths), dtype=np.int64)
    code = 0
    for length in range(1, 17):
        for s in sorted(s for s in range(len(lengths)) if lengths[s] == length):
            codes[s] = code
            code += 1
        code <<= 1
    return codes
