"""Building the model input from stored DICOM files: order, values, geometry checks."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID

from node.errors import InputError, RetryableError
from node.synthetic.ct import SUPPORTED_TRANSFER_SYNTAXES, make_ct_series, phantom_volume
from node.inference.volume import load_series

SLICES, SIZE, SEED = 16, 64, 7


@pytest.fixture()
def series(tmp_path):
    return make_ct_series(tmp_path / "ct", SLICES, SIZE, seed=SEED)


@pytest.fixture(scope="module")
def truth():
    return phantom_volume(SLICES, SIZE, SEED)[0].astype(np.float32)


def _edit(path: Path, change) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


@pytest.mark.parametrize("order", ["given", "reversed", "by_name", "shuffled"])
def test_slices_sorted_by_geometry(series, truth, order):
    files = list(series.files)
    if order == "reversed":
        files.reverse()
    elif order == "by_name":
        files.sort(key=lambda p: p.name)
    elif order == "shuffled":
        random.Random(1).shuffle(files)
    vol = load_series(files)
    assert vol.pixels.dtype == np.float32 and vol.shape == (SLICES, SIZE, SIZE)
    assert np.array_equal(vol.pixels, truth)
    assert vol.spacing == series.spacing and vol.modality == "CT" and not vol.monochrome1
    z = [p[2] for p in vol.positions]
    assert z == sorted(z)
    assert [h.InstanceNumber for h in vol.headers] == list(range(SLICES, 0, -1))
    assert all("PixelData" not in h for h in vol.headers)
    assert vol.frames == (0,) * SLICES and vol.orientation == (1, 0, 0, 0, 1, 0)
    for k in (0, 5, SLICES - 1):                      # index -> patient mm
        ipp = vol.affine @ np.array([k, 0, 0, 1])
        assert np.allclose(ipp[:3], [float(v) for v in vol.headers[k].ImagePositionPatient])
    last = vol.affine @ np.array([0, SIZE - 1, SIZE - 1, 1])
    assert np.allclose(last[:2], -np.array(vol.origin[:2]))    # centred field of view


def test_oblique_stack_sorted_along_normal(tmp_path):
    """Sagittal-like orientation: the order follows the normal, not any one coordinate."""
    phantom = make_ct_series(tmp_path, 6, 32, seed=2)
    row, col = np.array([0.0, 1, 0]), np.array([0.6, 0, -0.8])
    normal = np.cross(row, col)
    for k, path in enumerate(phantom.files):
        pos = np.array([10.0, -20, 30]) + 2.5 * k * normal + 0.4 * k * row   # gantry tilt
        _edit(path, lambda ds, pos=pos: (
            setattr(ds, "ImageOrientationPatient", [f"{v:g}" for v in (*row, *col)]),
            setattr(ds, "ImagePositionPatient", [f"{v:.6f}" for v in pos])))
    vol = load_series(list(reversed(phantom.files)))
    assert np.array_equal(vol.pixels, phantom_volume(6, 32, 2)[0])
    assert vol.spacing[0] == pytest.approx(2.5)
    assert np.allclose(vol.normal, normal)
    assert np.allclose(vol.affine @ [5, 0, 0, 1], [*vol.positions[5], 1])


def test_rescale_applied_per_slice(series, truth):
    files = list(series.files)

    def double_with_half_slope(ds):
        ds.PixelData = (ds.pixel_array.astype(np.uint16) * 2).tobytes()
        ds.BitsStored, ds.HighBit, ds.RescaleSlope = 16, 15, "0.5"

    def shift_intercept(ds):
        ds.PixelData = (ds.pixel_array.astype(np.uint16) + 100).tobytes()
        ds.BitsStored, ds.HighBit, ds.RescaleIntercept = 16, 15, "-1124"

    _edit(files[3], double_with_half_slope)
    _edit(files[9], shift_intercept)
    assert np.array_equal(load_series(files).pixels, truth)


def test_signed_values_and_unused_high_bits(tmp_path, truth):
    signed = make_ct_series(tmp_path / "signed", SLICES, SIZE, seed=SEED, signed=True)
    assert pydicom.dcmread(signed.files[0]).PixelRepresentation == 1
    assert np.array_equal(load_series(signed.files).pixels, truth)

    # 12 bits stored in 16: junk in the top 4 bits (old overlays) must not leak into HU.
    plain = make_ct_series(tmp_path / "plain", SLICES, SIZE, seed=SEED)
    _edit(plain.files[2], lambda ds: setattr(
        ds, "PixelData", (ds.pixel_array.astype(np.uint16) | 0xA000).tobytes()))
    assert np.array_equal(load_series(plain.files).pixels, truth)


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("ts", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda t: UID(t).keyword)
def test_every_transfer_syntax_gives_identical_pixels(tmp_path, ts, signed):
    plain = make_ct_series(tmp_path / "plain", 8, 48, seed=4, signed=signed)
    coded = make_ct_series(tmp_path / "coded", 8, 48, seed=4, signed=signed, transfer_syntax=ts)
    assert pydicom.dcmread(coded.files[0]).file_meta.TransferSyntaxUID == ts
    a, b = load_series(plain.files), load_series(list(reversed(coded.files)))
    assert np.array_equal(a.pixels, b.pixels)
    assert a.spacing == b.spacing and a.positions == b.positions
    assert all("PixelData" not in h for h in b.headers)


@pytest.mark.parametrize("ts", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda t: UID(t).keyword)
def test_lazy_load_decodes_the_same_planes_on_demand(tmp_path, ts):
    """``lazy``: only headers are read at first (192 x 192 planes, so that uncompressed pixel
    data is left in the file); planes decoded on demand, any range, equal the eager load."""
    files = make_ct_series(tmp_path / "ct", 6, 192, seed=3, signed=True, transfer_syntax=ts).files
    eager = load_series(files)
    lazy = load_series(list(reversed(files)), lazy=True)
    assert lazy.pixels is None and lazy.shape == eager.shape == (6, 192, 192)
    assert all("PixelData" not in h for h in lazy.headers)
    assert np.array_equal(lazy.planes(2, 4), eager.pixels[2:4])
    assert np.array_equal(lazy.planes(), eager.pixels)
    assert np.array_equal(np.concatenate(list(lazy.chunks(4))), eager.pixels)
    assert all("PixelData" not in h for h in lazy.headers), "decoded pixels stay out of the headers"
    assert lazy.positions == eager.positions and lazy.spacing == eager.spacing


def test_lazy_load_checks_sizes_first_and_reports_bad_data_when_decoded(tmp_path):
    """Uncompressed pixel data too short for its header is refused by the header pass; a
    compressed plane that cannot be decoded is refused when it is decoded, naming the file."""
    plain = make_ct_series(tmp_path / "ct", 4, 192, seed=3).files
    _edit(plain[2], lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]))
    with pytest.raises(InputError, match=f"{plain[2].name}: pixel data cannot be decoded "
                                         "\\(1000 bytes of pixel data, 73728 expected"):
        load_series(plain, lazy=True)
    rle = make_ct_series(tmp_path / "rle", 4, 192, seed=3, transfer_syntax=pydicom.uid.RLELossless).files
    _edit(rle[2], lambda ds: setattr(ds, "PixelData", encapsulate([bytes(64)])))
    volume = load_series(rle, lazy=True)
    assert np.array_equal(volume.planes(0, 2), load_series(rle[:2]).pixels)
    with pytest.raises(InputError, match=f"{rle[2].name}: pixel data cannot be decoded"):
        volume.planes(2, 3)


def test_lazy_load_of_a_file_replaced_meanwhile_is_retried_not_misread(tmp_path):
    """An instance re-sent while its job runs is a new file renamed over the old one: its
    pixels are not read at the old header's offsets; the job is tried again instead."""
    files = make_ct_series(tmp_path / "ct", 3, 192, seed=3).files
    volume = load_series(files, lazy=True)
    for path in files:                        # every file re-sent (the first plane is decoded already)
        ds = pydicom.dcmread(path)
        ds.ImageComments = "re-sent with a longer header" * 20
        ds.save_as(tmp_path / "new.dcm")
        (tmp_path / "new.dcm").replace(path)
    with pytest.raises(RetryableError, match="the file changed after its header was read"):
        volume.planes(1, 3)


def test_monochrome1_flagged_not_inverted(series, truth):
    for path in series.files:
        _edit(path, lambda ds: setattr(ds, "PhotometricInterpretation", "MONOCHROME1"))
    vol = load_series(series.files)
    assert vol.monochrome1 and np.array_equal(vol.pixels, truth)


def test_single_image_without_geometry(series, truth):
    path = series.files[4]

    def radiograph(ds):
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing",
                        "SliceThickness", "FrameOfReferenceUID"):
            delattr(ds, keyword)
        ds.Modality, ds.ImagerPixelSpacing = "DX", ["0.2", "0.25"]

    _edit(path, radiograph)
    vol = load_series([path])
    assert vol.shape == (1, SIZE, SIZE) and np.array_equal(vol.pixels[0], truth[4])
    assert vol.spacing == (1.0, 0.2, 0.25) and vol.modality == "DX"
    assert not vol.has_geometry and vol.affine is None and vol.positions == ()


def test_single_slice_with_geometry(series, truth):
    vol = load_series([series.files[2]])
    assert vol.has_geometry and vol.spacing == series.spacing
    assert np.array_equal(vol.pixels[0], truth[2])


def test_enhanced_multiframe(tmp_path, series, truth):
    """One Enhanced CT file whose frames are stored out of order."""
    first = pydicom.dcmread(series.files[0])
    stored = [pydicom.dcmread(p).pixel_array for p in series.files]
    order = list(range(SLICES))
    random.Random(3).shuffle(order)
    ds = Dataset()
    ds.file_meta = first.file_meta
    ds.file_meta.MediaStorageSOPClassUID = pydicom.uid.EnhancedCTImageStorage
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality",
                    "FrameOfReferenceUID", "PatientID", "Rows", "Columns", "SamplesPerPixel",
                    "PhotometricInterpretation", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation"):
        setattr(ds, keyword, first.get(keyword))
    ds.SOPClassUID = pydicom.uid.EnhancedCTImageStorage
    ds.NumberOfFrames = SLICES
    shared = Dataset()
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = first.PixelSpacing
    shared.PixelMeasuresSequence[0].SliceThickness = first.SliceThickness
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = first.ImageOrientationPatient
    shared.PixelValueTransformationSequence = [Dataset()]
    shared.PixelValueTransformationSequence[0].RescaleIntercept = "-1024"
    shared.PixelValueTransformationSequence[0].RescaleSlope = "1"
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k in order:
        item, plane = Dataset(), Dataset()
        plane.ImagePositionPatient = pydicom.dcmread(
            series.files[k], stop_before_pixels=True).ImagePositionPatient
        item.PlanePositionSequence = [plane]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack([stored[k] for k in order]).astype("<u2").tobytes()
    path = tmp_path / "enhanced.dcm"
    ds.save_as(path, enforce_file_format=True)

    vol = load_series([path])
    assert np.array_equal(vol.pixels, truth) and vol.spacing == series.spacing
    assert sorted(vol.frames) == list(range(1, SLICES + 1))
    assert [order[f - 1] for f in vol.frames] == list(range(SLICES))
    assert all(h is vol.headers[0] for h in vol.headers) and "PixelData" not in vol.headers[0]


# --- broken input: each case raises InputError naming the problem ---------------------------

def _set(keyword, value):
    return lambda ds: setattr(ds, keyword, value)


def _delete(keyword):
    return lambda ds: delattr(ds, keyword)


BROKEN = {
    "mixed orientations": (5, _set("ImageOrientationPatient",               # 5 degrees
                                   ["1", "0", "0", "0", "0.996195", "0.0871557"])),
    "missing or invalid ImagePositionPatient": (5, _delete("ImagePositionPatient")),
    "missing or invalid ImageOrientationPatient": (5, _delete("ImageOrientationPatient")),
    "missing or invalid PixelSpacing": (5, _delete("PixelSpacing")),
    "inconsistent PixelSpacing": (5, _set("PixelSpacing", ["0.9", "0.9"])),
    "mixed frames of reference": (5, _set("FrameOfReferenceUID", "2.25.1")),
    "mixed series": (5, _set("SeriesInstanceUID", "2.25.2")),
    "not two orthogonal unit vectors": (None, _set("ImageOrientationPatient",
                                                   ["1", "0", "0", "1", "0", "0"])),
    "colour images are not supported": (5, _set("SamplesPerPixel", 3)),
}


@pytest.mark.parametrize("problem", list(BROKEN))
def test_broken_header_raises(series, problem):
    index, change = BROKEN[problem]
    for k, path in enumerate(series.files):
        if index is None or k == index:
            _edit(path, change)
    with pytest.raises(InputError, match=problem):
        load_series(series.files)


def test_duplicate_positions(series):
    ipp = pydicom.dcmread(series.files[3]).ImagePositionPatient
    _edit(series.files[8], _set("ImagePositionPatient", ipp))
    with pytest.raises(InputError, match="duplicate slice positions"):
        load_series(series.files)


def test_same_file_twice_is_a_duplicate(series):
    with pytest.raises(InputError, match="duplicate slice positions"):
        load_series([*series.files, series.files[0]])


def test_missing_slice_is_non_uniform_spacing(series):
    with pytest.raises(InputError, match="non-uniform slice spacing.*a slice missing"):
        load_series(series.files[:6] + series.files[7:])


def test_small_position_jitter_is_accepted(series):
    ipp = [float(v) for v in pydicom.dcmread(series.files[6]).ImagePositionPatient]
    _edit(series.files[6], _set("ImagePositionPatient", [f"{v:.4f}" for v in
                                                         (ipp[0], ipp[1], ipp[2] + 0.009)]))
    assert load_series(series.files).spacing[0] == pytest.approx(2.5)


def test_inconsistent_image_size(tmp_path, series):
    other = make_ct_series(tmp_path / "other", 1, 48, seed=SEED)
    _edit(other.files[0], _set("SeriesInstanceUID", series.series_uid))
    with pytest.raises(InputError, match="inconsistent image size"):
        load_series([*series.files, *other.files])


def test_mixed_series_from_two_phantoms(tmp_path, series):
    other = make_ct_series(tmp_path / "other", 4, SIZE, seed=SEED + 1)
    with pytest.raises(InputError, match="mixed series"):
        load_series([*series.files, *other.files])


def test_not_an_image_and_not_dicom(tmp_path, series):
    _edit(series.files[2], _delete("PixelData"))
    with pytest.raises(InputError, match="no pixel data"):
        load_series(series.files)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM" * 20)
    with pytest.raises(InputError, match="junk.dcm: not a readable DICOM file"):
        load_series([junk])
    with pytest.raises(InputError, match="no files"):
        load_series([])


def test_truncated_pixel_data(series):
    _edit(series.files[1], lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000]))
    with pytest.raises(InputError, match="pixel data cannot be decoded"):
        load_series(series.files)


def test_reads_files_written_by_dcmtk_compression(tmp_path, series, truth):
    """Encoded by another implementation (DCMTK), decoded by us."""
    tool = shutil.which("dcmcjpls") or "/usr/bin/dcmcjpls"
    assert Path(tool).exists(), "DCMTK dcmcjpls is not installed (apt-get install dcmtk)"
    out = []
    for k, path in enumerate(series.files):
        target = tmp_path / f"jls{k}.dcm"
        subprocess.run([tool, str(path), str(target)], check=True, capture_output=True,
                       timeout=60)
        out.append(target)
    assert pydicom.dcmread(out[0]).file_meta.TransferSyntaxUID == pydicom.uid.JPEGLSLossless
    assert np.array_equal(load_series(out[::-1]).pixels, truth)


def test_what_dcmtk_decodes_is_decoded(tmp_path, caplog):
    """pydicom's JPEG-lossy.dcm (12-bit JPEG Extended, a non-standard SOS) is refused by every
    pydicom decoder; DCMTK's dcmdjpeg decodes it, and so does the node, to the same values."""
    from pydicom.data import get_testdata_file
    source = Path(get_testdata_file("JPEG-lossy.dcm"))
    tool = shutil.which("dcmdjpeg") or "/usr/bin/dcmdjpeg"
    assert Path(tool).exists(), "DCMTK dcmdjpeg is not installed (apt-get install dcmtk)"
    plain = tmp_path / "plain.dcm"
    subprocess.run([tool, str(source), str(plain)], check=True, capture_output=True, timeout=60)
    with caplog.at_level("INFO", logger="node.inference.volume"):
        volume = load_series([source])
    reference = pydicom.dcmread(plain).pixel_array.astype(np.float32)
    assert np.array_equal(volume.pixels[0], reference)
    assert "decoded by DCMTK's dcmdjpeg" in caplog.text


def test_multiframe_without_positions(tmp_path, series):
    path = tmp_path / "cine.dcm"
    ds = pydicom.dcmread(series.files[0])
    ds.NumberOfFrames = 2
    ds.PixelData = ds.PixelData * 2
    ds.save_as(path)
    with pytest.raises(InputError, match="multi-frame image without per-frame positions"):
        load_series([path])
