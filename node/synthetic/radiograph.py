"""Synthetic chest radiographs for the demonstration classifier, the tests and the benchmarks.

A posteroanterior chest image drawn from simple shapes: direct exposure around a body, two
dark lung fields with ribs across them, mediastinum, spine, heart and clavicles, with seeded
variation in build, lung size, exposure and noise. A *positive* image carries one or two
soft, bright opacities inside a lung field: the look of a consolidation, nothing more. No
image here resembles a real patient closely enough to mean anything clinically.

Images are written as Digital X-Ray Image Storage - For Presentation (modality DX), 12 bits
stored, with ImagerPixelSpacing, MONOCHROME2 or MONOCHROME1 (stored values inverted, same
displayed image), in any transfer syntax of :data:`node.synthetic.ct.SUPPORTED_TRANSFER_SYNTAXES`.
The same arguments always give the same pixels and UIDs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.pixels import get_encoder
from pydicom.uid import (
    UID, DeflatedExplicitVRLittleEndian, DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian, JPEGLosslessSV1, RLELossless,
)

from node.synthetic.ct import (
    SUPPORTED_TRANSFER_SYNTAXES, _ds, _jpeg_lossless_sv1, _uid,
    _write_deflated, synthetic_header,
)

BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
DEFAULT_ROWS = 1024
DEFAULT_PIXEL_SPACING_MM = 0.4        # 1024 x 0.4 mm: a 41 cm detector
NOISE_SD = 25.0

# Values drawn (12-bit, bright = attenuating, as displayed).
_DIRECT = 150.0
_TISSUE = 2100.0
_LUNG = 850.0
_MEDIASTINUM = 2500.0
_SPINE = 2900.0
_HEART = 2350.0
_RIB = 260.0
_CLAVICLE = 450.0


@dataclass(frozen=True)
class Radiograph:
    """A written radiograph: its file, identifiers and what it shows."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    positive: bool
    shape: tuple[int, int]
    pixel_spacing: float
    transfer_syntax: str


def _soft(inside: np.ndarray, edge: float) -> np.ndarray:
    """1 inside a shape whose signed size is ``inside`` (>0 inside), smooth over ``edge``."""
    return np.clip(inside / edge + 0.5, 0.0, 1.0)


def radiograph_pixels(rows: int = DEFAULT_ROWS, cols: int | None = None, seed: int = 0,
                      positive: bool = False) -> np.ndarray:
    """The displayed image: uint16 ``(rows, cols)``, 12-bit values, bright = attenuating."""
    cols = cols or rows
    if rows < 32 or cols < 32:
        raise ValueError("a radiograph needs at least 32 x 32 pixels")
    rng = np.random.default_rng(seed)
    v = ((np.arange(rows, dtype=np.float32) + 0.5) / rows * 2 - 1)[:, None]   # top -1, bottom 1
    u = ((np.arange(cols, dtype=np.float32) + 0.5) / cols * 2 - 1)[None, :]   # left -1, right 1
    u = u * (cols / rows)                                                    # square units
    edge = 4.0 / rows

    half_width = rng.uniform(0.78, 0.9)
    body = _soft(half_width - np.abs(u) * (1 + 0.15 * np.clip(-v - 0.6, 0, None) * 4), edge)
    img = _DIRECT + (_TISSUE - _DIRECT) * body

    lung_x, lung_y = rng.uniform(0.36, 0.44), rng.uniform(-0.12, 0.02)
    lung_a, lung_b = rng.uniform(0.21, 0.27), rng.uniform(0.5, 0.6)
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        r = np.sqrt(((u - side * lung_x) / lung_a) ** 2 + ((v - lung_y) / lung_b) ** 2)
        dome = np.clip(v - (lung_y + 0.75 * lung_b), 0, None) * 6             # flat diaphragm
        lungs = np.maximum(lungs, _soft(1 - r - dome, 0.08))
    lung_value = _LUNG * (1 + 0.25 * v)                                       # denser at the base
    img = img * (1 - lungs) + lung_value * lungs

    img = np.maximum(img, _MEDIASTINUM * _soft(0.11 - np.abs(u), edge) * _soft(0.95 - v, edge))
    img = np.maximum(img, _SPINE * _soft(0.055 - np.abs(u), edge))
    heart = np.sqrt(((u - 0.12) / 0.26) ** 2 + ((v - 0.33) / 0.2) ** 2)
    img = np.maximum(img, _HEART * _soft(1 - heart, 0.05))

    ribs = np.zeros_like(img)
    au = np.abs(u)
    bend = 0.6 * (au - 0.05) ** 2 - 0.2 * au
    lateral = (au > 0.06) & (au < half_width - 0.05)
    for k in range(10):
        top = -0.72 + 0.15 * k + rng.uniform(-0.02, 0.02)
        ribs = np.maximum(ribs, _soft(0.018 - np.abs(v - (top + bend)), edge))
    ribs *= lateral
    img += _RIB * ribs * _soft(lung_y + lung_b + 0.1 - v, 0.1)
    clavicle = _soft(0.025 - np.abs(v - (-0.7 + 0.12 * np.abs(u))), edge) * (np.abs(u) < 0.55)
    img += _CLAVICLE * clavicle * (np.abs(u) > 0.08)

    if positive:                     # its own random stream: the rest of the image is unchanged
        extra = np.random.default_rng([seed, 1])
        for _ in range(int(extra.integers(1, 3))):
            side = extra.choice((-1, 1))
            angle, radius = extra.uniform(0, 2 * np.pi), extra.uniform(0, 0.65)
            cx = side * lung_x + radius * lung_a * np.cos(angle)
            cy = lung_y + radius * lung_b * np.sin(angle)
            size = extra.uniform(0.07, 0.16)
            blob = np.exp(-(((u - cx) ** 2 + (v - cy) ** 2) / (2 * size ** 2)))
            img += extra.uniform(450, 800) * blob * lungs

    img = img * rng.uniform(0.85, 1.15) + rng.uniform(-100, 100)
    img += rng.normal(0, NOISE_SD, img.shape).astype(np.float32)
    return np.clip(np.rint(img), 0, MAX_VALUE).astype(np.uint16)


def make_chest_radiograph(
    out_dir: Path, *, seed: int = 0, positive: bool = False, rows: int = DEFAULT_ROWS,
    cols: int | None = None, pixel_spacing: float = DEFAULT_PIXEL_SPACING_MM,
    monochrome1: bool = False, transfer_syntax: str = ExplicitVRLittleEndian,
    patient_id: str = "PHANTOM-XR-0001", patient_name: str = "Phantom^Radiograph",
    study_uid: str | None = None, accession: str = "DEMOXR0001",
) -> Radiograph:
    """Write one synthetic PA chest radiograph (DX For Presentation) into ``out_dir``.

    UIDs derive from the arguments that change the image, not from the transfer syntax or
    photometric interpretation: the same image stored differently is the same instance.

    Raises:
        ValueError: for an unsupported transfer syntax or a too small image.
    """
    ts = UID(transfer_syntax)
    if ts not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {ts} ({ts.name})")
    cols = cols or rows
    shown = radiograph_pixels(rows, cols, seed, positive)
    stored = (MAX_VALUE - shown).astype(np.uint16) if monochrome1 else shown
    key = ("pacs-ai-node chest radiograph", seed, positive, rows, cols, pixel_spacing,
           patient_id, patient_name, accession)
    study_uid = study_uid or _uid(*key, "study")
    series_uid = _uid(study_uid, *key, "series")
    sop_uid = _uid(series_uid, *key, "instance")

    ds = _dataset(rows, cols, pixel_spacing, ts, monochrome1, patient_id=patient_id,
                  patient_name=patient_name, study_uid=study_uid, series_uid=series_uid,
                  sop_uid=sop_uid, accession=accession)
    ds.PixelData = _encode(stored, ts, "MONOCHROME1" if monochrome1 else "MONOCHROME2")
    if ts.is_encapsulated:
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (hashlib.sha1(sop_uid.encode()).hexdigest()[:16] + ".dcm")
    if ts == DeflatedExplicitVRLittleEndian:
        _write_deflated(path, ds)
    else:
        ds.save_as(path, enforce_file_format=True)
    return Radiograph(path=path, study_uid=study_uid, series_uid=series_uid,
                      sop_instance_uid=sop_uid, positive=positive, shape=(rows, cols),
                      pixel_spacing=pixel_spacing, transfer_syntax=ts)


def _encode(stored: np.ndarray, ts: UID, photometric: str) -> bytes:
    if not ts.is_encapsulated:
        return np.ascontiguousarray(stored, dtype="<u2").tobytes()
    if ts == JPEGLosslessSV1:
        return encapsulate([_jpeg_lossless_sv1(stored, BITS_STORED)])
    encoder = get_encoder(ts)
    if not encoder.is_available:
        raise ValueError(f"no encoder for {ts.name}: missing {', '.join(encoder.missing_dependencies)}")
    opts = dict(rows=stored.shape[0], columns=stored.shape[1], number_of_frames=1,
                samples_per_pixel=1, bits_allocated=16, bits_stored=BITS_STORED,
                pixel_representation=0, photometric_interpretation=photometric)
    if ts == RLELossless and "pylibjpeg" in encoder.available_plugins:
        opts["encoding_plugin"] = "pylibjpeg"
    return encapsulate([encoder.encode(stored, **opts)])


def _dataset(rows: int, cols: int, pixel_spacing: float, ts: UID, monochrome1: bool, *,
             patient_id: str, patient_name: str, study_uid: str, series_uid: str,
             sop_uid: str, accession: str) -> Dataset:
    ds = synthetic_header(DigitalXRayImageStorageForPresentation, sop_uid, ts, "DX", study_uid=study_uid,
                          series_uid=series_uid, accession=accession, patient_id=patient_id,
                          patient_name=patient_name, device="Synthetic radiograph",
                          study_description="Synthetic chest radiograph", series_description="Chest PA (synthetic)")
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    chest = Dataset()
    chest.CodeValue, chest.CodingSchemeDesignator, chest.CodeMeaning = "51185008", "SCT", "Chest"
    ds.AnatomicRegionSequence = [chest]
    ds.ImageLaterality = "U"
    ds.ViewPosition = "PA"
    view = Dataset()
    view.CodeValue, view.CodingSchemeDesignator, view.CodeMeaning = "399348003", "SCT", "postero-anterior"
    ds.ViewCodeSequence = [view]
    ds.PositionerType = "COLUMN"
    ds.PatientOrientation = ["L", "F"]
    ds.InstanceNumber = 1
    ds.AcquisitionContextSequence = []
    ds.BurnedInAnnotation = "NO"
    ds.KVP = "120"
    ds.DetectorType = "DIRECT"
    ds.ImagerPixelSpacing = [_ds(pixel_spacing), _ds(pixel_spacing)]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.PresentationLUTShape = "INVERSE" if monochrome1 else "IDENTITY"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    ds.WindowCenter, ds.WindowWidth = "2048", "4096"
    ds.LossyImageCompression = "00"
    return ds
