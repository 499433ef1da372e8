"""Synthetic chest radiographs and the chest-xray-demo classifier built from them.

The same radiograph stored in every transfer syntax the node accepts, and as MONOCHROME1,
must give the model identical input and identical results.
"""

from __future__ import annotations

import subprocess

import numpy as np
import onnx
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1,
    JPEGLSLossless, RLELossless, UID,
)

from nodeproc import build_models
from node.inference.runtime import ModelRuntime
from node.inference.manifest import load_manifest
from node.synthetic.radiograph import MAX_VALUE, make_chest_radiograph, radiograph_pixels
from node.inference.volume import load_series

MODEL = "chest-xray-demo"
ROWS, COLS = 300, 256


@pytest.fixture(scope="module")
def classifier(tmp_path_factory) -> ModelRuntime:
    folder = build_models(tmp_path_factory.mktemp("models"), (MODEL,))
    return ModelRuntime(load_manifest(folder / MODEL), ["CPUExecutionProvider"])


def test_generator_is_deterministic_and_positives_differ():
    a = radiograph_pixels(ROWS, COLS, seed=5)
    assert a.dtype == np.uint16 and a.shape == (ROWS, COLS) and a.max() <= MAX_VALUE
    assert np.array_equal(a, radiograph_pixels(ROWS, COLS, seed=5))
    b = radiograph_pixels(ROWS, COLS, seed=5, positive=True)
    added = b.astype(int) - a                       # the same image plus opacities
    assert added.min() >= -1 and added.mean() > 5


@pytest.mark.parametrize("monochrome1", [False, True], ids=["MONOCHROME2", "MONOCHROME1"])
def test_radiograph_is_valid_dx_for_presentation(tmp_path, monochrome1):
    xr = make_chest_radiograph(tmp_path, seed=3, rows=ROWS, cols=COLS, monochrome1=monochrome1,
                               transfer_syntax=JPEGLSLossless)
    ds = pydicom.dcmread(xr.path)
    assert ds.SOPClassUID == pydicom.uid.DigitalXRayImageStorageForPresentation
    assert ds.Modality == "DX" and ds.PresentationIntentType == "FOR PRESENTATION"
    assert ds.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    assert [float(v) for v in ds.ImagerPixelSpacing] == [0.4, 0.4] and "PixelSpacing" not in ds
    out = subprocess.run(["dciodvfy", "-new", str(xr.path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert errors == []
    vol = load_series([xr.path])
    assert vol.shape == (1, ROWS, COLS) and vol.spacing[1:] == (0.4, 0.4)
    assert vol.monochrome1 == monochrome1 and not vol.has_geometry


def test_every_storage_gives_identical_input_and_result(tmp_path, classifier):
    stored = [(ts, False) for ts in (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless,
                                     RLELossless, JPEGLosslessSV1, DeflatedExplicitVRLittleEndian)]
    stored += [(ExplicitVRLittleEndian, True), (JPEG2000Lossless, True)]
    tensors, scores = [], []
    for k, (ts, mono1) in enumerate(stored):
        xr = make_chest_radiograph(tmp_path / str(k), seed=11, positive=True, rows=ROWS, cols=COLS,
                                   transfer_syntax=ts, monochrome1=mono1)
        assert pydicom.dcmread(xr.path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ts
        vol = load_series([xr.path])
        tensors.append(classifier.preprocess(vol))
        scores.append(classifier.run(vol).scores)
    for k, (ts, mono1) in enumerate(stored[1:], 1):
        label = f"{UID(ts).keyword}{' MONOCHROME1' if mono1 else ''}"
        assert np.array_equal(tensors[k], tensors[0]), label
        assert np.array_equal(scores[k], scores[0]), label
    assert tensors[0].shape == (1, 224, 224, 1)
    assert scores[0][0] > 0.5


def test_demo_classifier_on_images_it_never_saw(classifier, tmp_path):
    """Fresh synthetic images (seeds outside both training and hold-out sets)."""
    right = 0
    for k in range(16):
        positive = k % 2 == 1
        pixels = radiograph_pixels(280, 240 if k % 3 else 280, seed=900 + k, positive=positive)
        xr = make_chest_radiograph(tmp_path / str(k), seed=900 + k, positive=positive, rows=280,
                                   cols=240 if k % 3 else 280)
        vol = load_series([xr.path])
        assert np.array_equal(vol.pixels[0], pixels)
        right += (classifier.run(vol).scores[0] >= 0.5) == positive
    assert right >= 15
    meta = {p.key: p.value for p in onnx.load(classifier.manifest.onnx_path).metadata_props}
    assert meta["demonstration"] == "true" and "synthetic" in meta["trained_on"]
    assert "not for clinical use" in classifier.manifest.description
