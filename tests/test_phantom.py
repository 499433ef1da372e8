"""The synthetic CT: valid DICOM, awkward file order, true ground truth, and the demo model."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGLosslessSV1, UID,
)

from node.synthetic.ct import SUPPORTED_TRANSFER_SYNTAXES, make_ct_series, phantom_volume
from node.inference.volume import load_series

REPO = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = REPO / "models" / "ct-tissue" / "build.py"


def _load_build_module():
    spec = importlib.util.spec_from_file_location("ct_tissue_build", BUILD_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"{name} is not installed (apt-get install dcmtk dicom3tools; see .ci/run)")
    return path


def _dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run([_tool("dciodvfy"), "-new", str(path)], capture_output=True,
                         text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
@pytest.mark.parametrize("ts", SUPPORTED_TRANSFER_SYNTAXES, ids=lambda t: UID(t).keyword)
def test_files_pass_dciodvfy(tmp_path, ts, signed):
    phantom = make_ct_series(tmp_path / "s", 4, 64, transfer_syntax=ts, signed=signed)
    for path in (phantom.files[0], phantom.files[-1]):
        if ts == DeflatedExplicitVRLittleEndian:
            # This dicom3tools build cannot inflate; DCMTK re-encodes losslessly first.
            inflated = tmp_path / "inflated.dcm"
            subprocess.run([_tool("dcmconv"), "+te", str(path), str(inflated)], check=True,
                           capture_output=True, timeout=60)
            path = inflated
        assert _dciodvfy_errors(path) == []
        assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == (
            ExplicitVRLittleEndian if ts == DeflatedExplicitVRLittleEndian else ts)


def test_headers_defeat_naive_readers(tmp_path):
    phantom = make_ct_series(tmp_path, 12, 64)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in phantom.files]
    z = [float(h.ImagePositionPatient[2]) for h in headers]
    assert z == sorted(z) and len(set(z)) == 12                   # files: slice order
    assert [h.InstanceNumber for h in headers] == list(range(12, 0, -1))
    names = [p.name for p in phantom.files]
    assert sorted(names) != names and sorted(names) != names[::-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)
    for h in headers:
        assert h.Modality == "CT" and h.SOPClassUID == pydicom.uid.CTImageStorage
        assert h.SeriesInstanceUID == phantom.series_uid
        assert h.StudyInstanceUID == phantom.study_uid
        assert h.FrameOfReferenceUID == phantom.frame_of_reference_uid
        assert [float(v) for v in h.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert float(h.RescaleIntercept) == -1024 and float(h.RescaleSlope) == 1
        assert float(h.SliceThickness) == phantom.spacing[0]
        assert [float(v) for v in h.PixelSpacing] == list(phantom.spacing[1:])
    uids = [h.SOPInstanceUID for h in headers] + [phantom.study_uid, phantom.series_uid,
                                                  phantom.frame_of_reference_uid]
    assert len(set(uids)) == len(uids)
    assert all(UID(u).is_valid and u.startswith("2.25.") for u in uids)
    assert 370 <= phantom.spacing[1] * phantom.shape[2] <= 390    # ~380 mm field of view


def test_uids_are_deterministic(tmp_path):
    a = make_ct_series(tmp_path / "a", 3, 32)
    b = make_ct_series(tmp_path / "b", 3, 32)
    c = make_ct_series(tmp_path / "c", 3, 32, seed=1)
    d = make_ct_series(tmp_path / "d", 3, 32, study_uid=a.study_uid,
                       series_description="Second series")
    assert (a.study_uid, a.series_uid) == (b.study_uid, b.series_uid)
    assert [p.name for p in a.files] == [p.name for p in b.files]
    assert a.study_uid != c.study_uid and a.series_uid != c.series_uid
    assert d.study_uid == a.study_uid and d.series_uid != a.series_uid


def test_ground_truth_is_consistent(tmp_path):
    hu, masks = phantom_volume(40, 128, seed=3)
    assert hu.dtype == np.int16 and hu.shape == (40, 128, 128)
    body, lungs, bone = masks["Body"], masks["Lungs"], masks["Bone"]
    assert all(m.shape == hu.shape and m.dtype == bool for m in masks.values())
    assert not (lungs & ~body).any() and not (bone & ~body).any() and not (lungs & bone).any()
    # The body stays strictly inside the image; air outside.
    assert not body[:, [0, -1], :].any() and not body[:, :, [0, -1]].any()
    assert abs(hu[~body].mean() + 1000) < 2
    assert abs(hu[lungs].mean() + 850) < 2
    assert abs(hu[bone].mean() - 700) < 2
    tissue = body & ~lungs & ~bone & (hu > -50)
    assert abs(hu[tissue].mean() - 40) < 2 and 8 < hu[tissue].std() < 12
    # Lungs are absent at the ends of the scan, present in the middle; bone in every slice.
    assert not lungs[0].any() and lungs[20].any() and bone.any(axis=(1, 2)).all()
    # Same seed, same phantom; another seed, other noise, same anatomy.
    hu2, masks2 = phantom_volume(40, 128, seed=3)
    hu3, masks3 = phantom_volume(40, 128, seed=4)
    assert np.array_equal(hu, hu2) and not np.array_equal(hu, hu3)
    assert all(np.array_equal(masks[k], masks3[k]) for k in masks)

    phantom = make_ct_series(tmp_path, 40, 128, seed=3, slice_spacing=3.0)
    voxel_ml = 3.0 * phantom.spacing[1] * phantom.spacing[2] / 1000
    for name, mask in masks.items():
        assert phantom.volumes_ml[name] == pytest.approx(mask.sum() * voxel_ml)
    assert phantom.volumes_ml["Body"] > phantom.volumes_ml["Lungs"] > phantom.volumes_ml["Bone"] > 0
    for k in (0, 17, 39):
        ds = pydicom.dcmread(phantom.files[k])
        assert np.array_equal(ds.pixel_array.astype(np.int32) - 1024, hu[k])


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_jpeg_lossless_decodes_with_dcmtk(tmp_path, signed):
    """Our JPEG Lossless SV1 encoder, checked by an independent decoder (DCMTK)."""
    dcmdjpeg = _tool("dcmdjpeg")
    phantom = make_ct_series(tmp_path / "s", 3, 96, transfer_syntax=JPEGLosslessSV1,
                             signed=signed, seed=5)
    hu, _ = phantom_volume(3, 96, seed=5)
    for k, path in enumerate(phantom.files):
        plain = tmp_path / f"plain{k}.dcm"
        subprocess.run([dcmdjpeg, str(path), str(plain)], check=True, capture_output=True,
                       timeout=60)
        ds = pydicom.dcmread(plain)
        assert ds.file_meta.TransferSyntaxUID != JPEGLosslessSV1
        values = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(values, hu[k])


def test_unsupported_transfer_syntax(tmp_path):
    with pytest.raises(ValueError, match="unsupported transfer syntax"):
        make_ct_series(tmp_path, 2, 32, transfer_syntax=pydicom.uid.JPEGBaseline8Bit)


def test_model_is_deterministic_and_labelled(tmp_path):
    build = _load_build_module()
    a = build.build(tmp_path / "a.onnx")
    b = build.build(tmp_path / "b.onnx")
    assert a.read_bytes() == b.read_bytes()
    model = onnx.load(a)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["demonstration"] == "true" and "not for clinical use" in props["intended_use"]
    assert "NOT FOR CLINICAL USE" in model.doc_string
    assert [i.name for i in model.graph.input] == ["ct"]
    assert [o.name for o in model.graph.output] == ["masks"]


def test_build_script_command_line(tmp_path):
    out = tmp_path / "sub" / "model.onnx"
    done = subprocess.run([sys.executable, str(BUILD_SCRIPT), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0 and "not for clinical use" in done.stdout


def test_model_finds_phantom_volumes(tmp_path):
    """The demo model on the phantom, read back from disk, gives the ground-truth volumes."""
    phantom = make_ct_series(tmp_path / "ct", 64, 256)
    model_path = _load_build_module().build(tmp_path / "model.onnx")
    volume = load_series(list(reversed(phantom.files)))
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = np.clip(volume.pixels, -1024, 3071)[:, None]            # model.toml window
    masks = np.concatenate([session.run(["masks"], {"ct": x[i:i + 16]})[0]
                            for i in range(0, len(x), 16)])
    assert masks.shape == (64, 3, 256, 256) and set(np.unique(masks)) <= {0.0, 1.0}
    voxel_ml = np.prod(volume.spacing) / 1000
    for channel, name in enumerate(("Body", "Lungs", "Bone")):
        found = float((masks[:, channel] > 0.5).sum()) * voxel_ml
        assert found == pytest.approx(phantom.volumes_ml[name], rel=0.02), name


def test_model_fills_holes_only_inside_the_outline():
    """Body = tissue with enclosed holes filled; air outside and in open notches stays out."""
    session = ort.InferenceSession(_load_build_module().make_model().SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    ct = np.full((2, 1, 20, 30), -1000, np.float32)
    ct[0, 0, 4:16, 5:25] = 40          # a block of tissue ...
    ct[0, 0, 7:13, 9:14] = -850        # ... with a lung-like hole ...
    ct[0, 0, 9:11, 18:21] = 700        # ... and a bone inside
    ct[0, 0, 4:8, 15:18] = -1000       # a notch open to the outside (from the top edge)
    ct[1, 0, 5, 5] = 300               # a lone bright pixel: body and bone
    masks = session.run(None, {"ct": ct})[0]
    body, lungs, bone = masks[0, 0] > 0.5, masks[0, 1] > 0.5, masks[0, 2] > 0.5
    assert body[7:13, 9:14].all() and lungs[7:13, 9:14].all() and lungs.sum() == 30
    assert bone.sum() == 6 and bone[9:11, 18:21].all()
    assert not body[:4].any() and not body[16:].any() and not body[:, :5].any()
    assert not body[4:8, 15:18].any()               # the open notch is outside
    assert masks[1, 0].sum() == 1 and masks[1, 2].sum() == 1 and masks[1, 1].sum() == 0


def _fibonacci_row() -> tuple[np.ndarray, np.ndarray]:
    """One 16-bit row whose prediction differences have Fibonacci category counts (the
    skew that makes a plain Huffman code longer than JPEG's 16-bit limit), and the counts."""
    fib = [1, 2]                                   # with the reserved code's 1: 1, 1, 2, 3, ...
    while len(fib) < 17:
        fib.append(fib[-1] + fib[-2])
    diffs = [0 if c == 0 else (1 << (c - 1)) * (-1) ** i
             for c in range(17) for i in range(fib[c])]
    diffs = np.random.default_rng(0).permutation(np.array(diffs, dtype=np.int64))
    return ((32768 + np.cumsum(diffs)) % 65536).astype(np.uint16)[None], np.array(fib)


@pytest.mark.parametrize("name", ["constant", "one pixel", "uniform 16-bit", "extremes",
                                  "fibonacci"])
def test_jpeg_lossless_encoder_edge_cases(name):
    from libjpeg import decode                     # pylibjpeg-libjpeg, a project dependency

    from node.synthetic.ct import _huffman_lengths, _jpeg_lossless_sv1
    rng = np.random.default_rng(1)
    img = {"constant": np.full((17, 33), 1234, np.uint16),
           "one pixel": np.array([[7]], np.uint16),
           "uniform 16-bit": rng.integers(0, 65536, (40, 50)).astype(np.uint16),
           "extremes": np.tile(np.array([0, 65535], np.uint16), (8, 9)),
           "fibonacci": _fibonacci_row()[0]}[name]
    if name == "fibonacci":
        # Unlimited, this code would be a chain 17 deep: the 16-bit limit had to act.
        assert _huffman_lengths(_fibonacci_row()[1]).max() == 16
    decoded = decode(_jpeg_lossless_sv1(img, 16))
    assert np.array_equal(decoded.reshape(img.shape), img)
