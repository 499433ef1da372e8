"""The model runtime against numpy references: every input kind and layout, real ONNX Runtime.

Each test builds a tiny ONNX model in ``tmp_path``, runs it through :class:`ModelRuntime` on
a synthetic series and compares with the same computation written out in numpy here
(resizing with ``np.interp``, convolutions as sums of shifted images, patches and weights by
explicit loops). Masks are compared wherever the reference value is not within a hair of
the decision threshold.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto
from pydicom.dataset import Dataset

import onnxmodels as om
from node.errors import InputError
from node.inference.runtime import ModelRuntime
from node.inference.manifest import load_manifest
from node.inference.preprocess import Intensity, series_statistics
from node.inference.volume import SeriesVolume

REPO = Path(__file__).resolve().parent.parent

CPU = ["CPUExecutionProvider"]
MARGIN = 1e-4


# --- numpy references ---------------------------------------------------------------------

def ref_resample_axis(x: np.ndarray, axis: int, n_out: int) -> np.ndarray:
    """Linear resampling along one axis, same extent, sample centres (np.interp)."""
    n_in = x.shape[axis]
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    return np.apply_along_axis(lambda v: np.interp(pos, np.arange(n_in), v), axis,
                               x.astype(np.float64))


def ref_resample(x: np.ndarray, shape) -> np.ndarray:
    for axis, n in enumerate(shape):
        x = ref_resample_axis(x, axis, n)
    return x


def ref_conv(img: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cross-correlation with zero 'same' padding: (h, w) x (C, 1, k, k) -> (C, h, w)."""
    k = w.shape[-1]
    p = np.pad(img.astype(np.float64), k // 2)
    h, wd = img.shape
    out = np.zeros((w.shape[0], h, wd))
    for c in range(w.shape[0]):
        for i in range(k):
            for j in range(k):
                out[c] += w[c, 0, i, j] * p[i:i + h, j:j + wd]
        out[c] += b[c]
    return out


def ref_nearest(y: np.ndarray, rows: int, cols: int) -> np.ndarray:
    ri = [int(r * y.shape[-2] / rows) for r in range(rows)]
    ci = [int(c * y.shape[-1] / cols) for c in range(cols)]
    return y[..., ri, :][..., ci]


def ref_letterbox(img: np.ndarray, size, pad_value: float = 0.0):
    """Aspect-preserving resize into ``size`` and centred padding; returns plane and box."""
    h, w = img.shape
    f = min(size[0] / h, size[1] / w)
    ih, iw = round(h * f), round(w * f)
    top, left = (size[0] - ih) // 2, (size[1] - iw) // 2
    plane = np.full(size, pad_value, np.float64)
    plane[top:top + ih, left:left + iw] = ref_resample(img, (ih, iw))
    return plane, (top, left, ih, iw)


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def agree(mask: np.ndarray, value: np.ndarray, threshold: float) -> None:
    """``mask == (value >= threshold)`` wherever ``value`` is not at the threshold."""
    clear = np.abs(value - threshold) > MARGIN
    assert clear.mean() > 0.95
    assert np.array_equal(mask[clear], (value >= threshold)[clear])


def series(pixels: np.ndarray, modality: str = "CT", spacing=(1.0, 1.0, 1.0), geometry=True,
           monochrome1=False, headers=()) -> SeriesVolume:
    n = pixels.shape[0]
    geo = {}
    if geometry:
        geo = dict(orientation=(1.0, 0, 0, 0, 1, 0),
                   positions=tuple((0.0, 0.0, spacing[0] * k) for k in range(n)))
    return SeriesVolume(pixels=pixels.astype(np.float32), headers=headers, spacing=spacing,
                        modality=modality, monochrome1=monochrome1, **geo)


def runtime(folder) -> ModelRuntime:
    return ModelRuntime(load_manifest(folder), CPU)


RNG = np.random.default_rng(20250101)


# --- image ----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_image_classifier_with_letterbox_and_monochrome1(tmp_path, layout):
    w = RNG.normal(0, 1, (3, 1, 3, 3)).astype(np.float32)
    dense = RNG.normal(0, 1, (2, 3)).astype(np.float32)
    dense_b = np.array([0.1, -0.2], np.float32)
    folder = om.package(tmp_path, "cls", om.classifier(w, dense, dense_b, layout, size=(32, 32)), f"""
        task = "classification"
        [input]
        modalities = ["DX"]
        kind = "image"
        layout = "{layout}"
        size = [32, 32]
        resize = "pad"
        pad_value = -0.5
        normalisation = "scale"
        scale = {1 / 4095}
        [output]
        kind = "scores"
        """, findings=[(0, "A", 0.5), (1, "B", 0.5)])
    stored = RNG.integers(0, 4096, (1, 90, 60))
    header = Dataset()
    header.BitsAllocated, header.BitsStored, header.PixelRepresentation = 16, 12, 0
    vol = series(stored.astype(np.float32), "DX", geometry=False, monochrome1=True, headers=(header,))
    rt = runtime(folder)
    pred = rt.run(vol)

    plane, _ = ref_letterbox((4095 - stored[0]) / 4095, (32, 32), pad_value=-0.5)
    tensor = rt.preprocess(vol)
    assert tensor.shape == ((1, 32, 32, 1) if layout == "NHWC" else (1, 1, 32, 32))
    assert np.allclose(tensor.reshape(32, 32), plane, atol=1e-5)
    feat = np.maximum(ref_conv(plane, w, np.zeros(3)), 0).mean(axis=(1, 2))
    expected = sigmoid(dense @ feat + dense_b)
    assert pred.scores.shape == (2,) and np.allclose(pred.scores, expected, atol=1e-5)
    assert pred.masks is None and pred.provider == "CPUExecutionProvider"
    assert set(pred.timings) == {"decode", "preprocess", "run", "postprocess"}


def test_image_segmentation_stretched_back_to_source(tmp_path):
    w = RNG.normal(0, 1, (2, 1, 3, 3)).astype(np.float32)
    b = np.array([0.0, 0.3], np.float32)
    folder = om.package(tmp_path, "seg2d", om.conv2d(w, b, "NCHW"), """
        task = "segmentation"
        [input]
        modalities = ["CR"]
        kind = "image"
        size = [32, 32]
        window = [-100, 300]
        normalisation = "scale"
        scale = 0.01
        [output]
        kind = "probabilities"
        activation = "sigmoid"
        decision = "threshold"
        threshold = 0.6
        """, segments=[(0, "first"), (1, "second")])
    img = RNG.normal(100, 150, (1, 40, 50))
    pred = runtime(folder).run(series(img, "CR", geometry=False))
    plane = ref_resample(np.clip(img[0], -100, 300) * 0.01, (32, 32))
    prob = sigmoid(ref_conv(plane, w, b))
    back = ref_nearest(prob, 40, 50)
    assert pred.masks.shape == (1, 40, 50, 2)
    for k in range(2):
        agree(pred.masks[0, :, :, k], back[k], 0.6)


# --- slices ---------------------------------------------------------------------------------

def test_slices_labelmap_nhwc_in_batches_with_padding(tmp_path):
    folder = om.package(tmp_path, "lab2d", om.labels([-0.5, 0.8], "NHWC"), """
        [input]
        modalities = ["MR"]
        kind = "slices"
        layout = "NHWC"
        size = [16, 16]
        resize = "pad"
        pad_value = -9
        normalisation = "zscore"
        batch_size = 3
        [output]
        kind = "labelmap"
        """, segments=[(1, "middle"), (2, "high")])
    img = RNG.normal(500, 100, (7, 20, 30))
    rt = runtime(folder)
    pred = rt.run(series(img, "MR"))
    z = (img - img.mean()) / img.std()
    assert pred.masks.shape == (7, 20, 30, 2)
    for k in range(7):
        plane, (top, left, ih, iw) = ref_letterbox(z[k], (16, 16), pad_value=-9)
        label = (plane > -0.5).astype(int) + (plane > 0.8)
        clear = (np.abs(plane + 0.5) > MARGIN) & (np.abs(plane - 0.8) > MARGIN)
        back = ref_nearest(label[top:top + ih, left:left + iw], 20, 30)
        clear = ref_nearest(clear[top:top + ih, left:left + iw], 20, 30)
        assert clear.mean() > 0.95
        assert np.array_equal(pred.masks[k, :, :, 0][clear], (back == 1)[clear])
        assert np.array_equal(pred.masks[k, :, :, 1][clear], (back == 2)[clear])


def test_series_statistics_chunk_by_chunk_equal_numpys_over_the_whole_volume():
    img = RNG.normal(300, 80, (50, 9, 7)) + np.linspace(0, 500, 50)[:, None, None]   # chunks differ
    window = Intensity(window=(0.0, 700.0))
    mean, std, low, high = series_statistics(series(img), window)
    x = np.clip(img.astype(np.float32), 0, 700).astype(np.float64)
    assert np.isclose(mean, x.mean(), rtol=1e-9) and np.isclose(std, x.std(), rtol=1e-6)
    assert (low, high) == (float(x.min()), float(x.max()))
    assert series_statistics(series(img), window, moments=False)[2:] == (low, high)


class _Decoder:
    """A lazy volume's plane source that records what it is asked to decode."""

    def __init__(self, pixels):
        self.pixels, self.shape, self.calls = pixels.astype(np.float32), pixels.shape, []

    def decode(self, start, stop):
        self.calls.append((start, stop))
        return self.pixels[start:stop].copy()


@pytest.mark.parametrize("normalisation", ["none", "zscore"])
def test_slices_model_decodes_a_lazy_volume_batch_by_batch(tmp_path, normalisation):
    """A ``slices`` model asks for one batch at a time, each decoded once; one whose
    normalisation needs the whole series' statistics has it decoded once, whole. The output
    equals the eager run either way."""
    folder = om.package(tmp_path, "lab2d", om.labels([-0.5, 0.8], "NCHW"), f"""
        [input]
        modalities = ["MR"]
        kind = "slices"
        normalisation = "{normalisation}"
        batch_size = 3
        [output]
        kind = "labelmap"
        """, segments=[(1, "middle"), (2, "high")])
    img = RNG.normal(0, 1, (40, 20, 30))
    rt = runtime(folder)
    eager = rt.run(series(img, "MR"))
    source = _Decoder(img)
    lazy = rt.run(replace(series(img, "MR"), pixels=None, source=source))
    assert np.array_equal(lazy.masks, eager.masks)
    if normalisation == "zscore":
        assert source.calls == [(0, 40)]
    else:
        assert sorted(source.calls) == [(k, min(k + 3, 40)) for k in range(0, 40, 3)]


def test_slices_probabilities_argmax_nchw(tmp_path):
    w = RNG.normal(0, 1, (3, 1, 3, 3)).astype(np.float32)
    b = np.zeros(3, np.float32)
    folder = om.package(tmp_path, "arg", om.conv2d(w, b, "NCHW"), """
        [input]
        modalities = ["CT"]
        batch_size = 2
        window = [-1000, 1000]
        normalisation = "minmax"
        [output]
        kind = "probabilities"
        activation = "softmax"
        decision = "argmax"
        """, segments=[(1, "one"), (2, "two")])
    img = RNG.normal(0, 400, (5, 12, 14))
    pred = runtime(folder).run(series(img))
    x = np.clip(img, -1000, 1000)
    x = (x - x.min()) / (x.max() - x.min())
    for k in range(5):
        logits = ref_conv(x[k], w, b)
        top = np.sort(logits, axis=0)
        clear = (top[-1] - top[-2]) > MARGIN
        label = logits.argmax(axis=0)
        assert np.array_equal(pred.masks[k, :, :, 0][clear], (label == 1)[clear])
        assert np.array_equal(pred.masks[k, :, :, 1][clear], (label == 2)[clear])


def test_float16_input_and_io_binding_path(tmp_path):
    w = RNG.normal(0, 1, (1, 1, 3, 3)).astype(np.float32)
    model = om.conv2d(w, np.zeros(1, np.float32), "NCHW", dtype=TensorProto.FLOAT16)
    folder = om.package(tmp_path, "half", model, """
        [input]
        modalities = ["CT"]
        dtype = "float16"
        normalisation = "scale"
        scale = 0.001
        [output]
        kind = "probabilities"
        decision = "threshold"
        threshold = 0.0
        """, segments=[(0, "positive")])
    img = RNG.normal(0, 1000, (3, 16, 16))
    vol = series(img)
    rt = runtime(folder)
    assert rt.preprocess(vol).dtype == np.float16
    plain = rt.run(vol).masks
    rt.bind_device = "cpu"          # the IOBinding path that CUDA and TensorRT take
    bound = rt.run(vol).masks
    assert np.array_equal(plain, bound)
    x16 = (img * 0.001).astype(np.float16).astype(np.float64)
    for k in range(3):
        ref = ref_conv(x16[k], w, np.zeros(1))[0]
        clear = np.abs(ref) > 1e-2
        assert np.array_equal(plain[k, :, :, 0][clear], (ref >= 0)[clear])


# --- volume ---------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["NCDHW", "NDHWC"])
def test_volume_resampled_patched_and_back(tmp_path, layout):
    folder = om.package(tmp_path, "vol", om.pointwise3d([1.0, -1.0], [0.0, 0.5], layout), f"""
        [input]
        modalities = ["CT"]
        kind = "volume"
        layout = "{layout}"
        spacing = [1.5, 2.0, 2.0]
        window = [-500, 500]
        normalisation = "scale"
        scale = 0.002
        patch_size = [8, 8, 8]
        overlap = 0.5
        batch_size = 2
        [output]
        kind = "probabilities"
        decision = "threshold"
        threshold = 0.25
        """, segments=[(0, "up"), (1, "down")])
    img = RNG.normal(0, 300, (10, 24, 20))
    vol = series(img, spacing=(3.0, 1.0, 1.0))
    rt = runtime(folder)
    x = rt.volume_input(vol)
    ref_x = ref_resample(np.clip(img, -500, 500) * 0.002, (20, 12, 10))
    assert x.shape == (20, 12, 10) and np.allclose(x, ref_x, atol=1e-5)
    scores = rt.volume_scores(x)          # blending a pointwise model changes nothing
    assert np.allclose(scores, np.stack([x, 0.5 - x]), atol=1e-5)
    pred = rt.run(vol)
    assert pred.masks.shape == (10, 24, 20, 2)
    for k, channel in enumerate((ref_x, 0.5 - ref_x)):
        agree(pred.masks[..., k], ref_resample(channel, (10, 24, 20)), 0.25)
    assert pred.timings["run"] > 0 and pred.timings["postprocess"] > 0


def ref_starts(length, patch, overlap):
    if length <= patch:
        return [0]
    target = patch * (1 - overlap)
    steps = int(np.ceil((length - patch) / target)) + 1
    actual = (length - patch) / (steps - 1)
    return [int(np.round(actual * i)) for i in range(steps)]


def ref_gaussian(patch):
    g = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / (n / 8)) ** 2) for n in patch]
    w = g[0][:, None, None] * g[1][None, :, None] * g[2][None, None, :]
    return np.maximum(w / w.max(), 1e-3)


@pytest.mark.parametrize("blend", ["gaussian", "constant"])
def test_volume_patches_blended_with_gaussian_importance(tmp_path, blend):
    patch = (6, 8, 8)
    folder = om.package(tmp_path, "mean", om.patch_mean3d(patch, "NDHWC"), f"""
        [input]
        modalities = ["CT"]
        kind = "volume"
        layout = "NDHWC"
        patch_size = [6, 8, 8]
        overlap = 0.5
        blend = "{blend}"
        [output]
        kind = "probabilities"
        decision = "threshold"
        """, segments=[(0, "mean")])
    img = RNG.normal(0, 1, (9, 20, 13))
    rt = runtime(folder)
    scores = rt.volume_scores(rt.volume_input(series(img)))
    weights = ref_gaussian(patch) if blend == "gaussian" else np.ones(patch)
    total, norm = np.zeros(img.shape), np.zeros(img.shape)
    for a in ref_starts(9, 6, 0.5):
        for b in ref_starts(20, 8, 0.5):
            for c in ref_starts(13, 8, 0.5):
                box = (slice(a, a + 6), slice(b, b + 8), slice(c, c + 8))
                total[box] += weights * img[box].mean()
                norm[box] += weights
    assert scores.shape == (1, 9, 20, 13)
    assert np.allclose(scores[0], total / norm, atol=1e-5)


@pytest.mark.parametrize("keep_channel", [False, True])
def test_volume_labelmap_smaller_than_patch(tmp_path, keep_channel):
    folder = om.package(tmp_path, "vlab", om.labels([0.3, 0.7], "NCDHW", keep_channel), """
        [input]
        modalities = ["MR"]
        kind = "volume"
        patch_size = [4, 8, 8]
        [output]
        kind = "labelmap"
        """, segments=[(1, "low"), (2, "high")])
    img = RNG.uniform(0, 1, (3, 6, 7))
    pred = runtime(folder).run(series(img, "MR"))
    assert np.array_equal(pred.masks[..., 0], (img > 0.3) & (img <= 0.7))
    assert np.array_equal(pred.masks[..., 1], img > 0.7)


# --- series the model cannot take -------------------------------------------------------

@pytest.fixture
def volume_model(tmp_path):
    return runtime(om.package(tmp_path, "vol", om.pointwise3d([1.0], [0.0]), """
        [input]
        modalities = ["CT", "MR"]
        sop_classes = ["CTImageStorage", "1.2.840.10008.5.1.4.1.1.4"]
        kind = "volume"
        patch_size = [4, 8, 8]
        [output]
        kind = "probabilities"
        decision = "threshold"
        """, segments=[(0, "x")]))


def _header(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    return ds


@pytest.mark.parametrize("case, message", [
    ("one slice", "takes a 3D volume, series has 1 image (at least 2 slices needed)"),
    ("no geometry", "takes a 3D volume, series has no geometry"),
    ("modality", "takes CT, MR, series is DX"),
    ("sop class", "takes CT Image Storage (1.2.840.10008.5.1.4.1.1.2), MR Image Storage "
                  "(1.2.840.10008.5.1.4.1.1.4); series is Enhanced CT Image Storage"),
])
def test_series_the_model_cannot_take(volume_model, case, message):
    pixels = np.zeros((1 if case == "one slice" else 4, 8, 8))
    vol = series(pixels, "DX" if case == "modality" else "CT", geometry=case != "no geometry",
                 headers=(_header("1.2.840.10008.5.1.4.1.1.2.1"),) if case == "sop class" else ())
    with pytest.raises(InputError) as exc:
        volume_model.run(vol)
    assert message in str(exc.value)
    assert volume_model.run(series(np.zeros((4, 8, 8)), "MR")).masks.shape == (4, 8, 8, 1)


def test_image_model_refuses_a_stack(tmp_path):
    w = np.ones((1, 1, 3, 3, ), np.float32)
    rt = runtime(om.package(tmp_path, "img", om.classifier(w, np.ones((1, 1)), np.zeros(1)), """
        task = "classification"
        [input]
        modalities = ["DX"]
        kind = "image"
        layout = "NHWC"
        size = [32, 32]
        """, findings=[(0, "A", 0.5)]))
    with pytest.raises(InputError, match="takes one 2D image, series has 2"):
        rt.run(series(np.zeros((2, 40, 40)), "DX"))


def test_volume_two_class_softmax_argmax(tmp_path):
    folder = om.package(tmp_path, "two", om.pointwise3d([1.0, -1.0], [0.0, 0.2]), """
        [input]
        modalities = ["CT"]
        kind = "volume"
        size = [6, 9, 7]
        patch_size = [4, 8, 8]
        overlap = 0.25
        [output]
        kind = "probabilities"
        activation = "softmax"
        decision = "argmax"
        """, segments=[(1, "second"), (0, "first")])
    img = RNG.uniform(-1, 1, (5, 12, 10))
    pred = runtime(folder).run(series(img))
    x = ref_resample(img, (6, 9, 7))
    back = [ref_resample(c, (5, 12, 10)) for c in (x, 0.2 - x)]    # logits back on the source grid
    agree(pred.masks[..., 0], back[1] - back[0], 0.0)
    assert np.array_equal(pred.masks[..., 1], ~pred.masks[..., 0])


def test_volume_classifier_sees_the_resampled_volume(tmp_path):
    import onnx
    from onnx import helper, numpy_helper
    nodes = [helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2, 3, 4], keepdims=0),
             helper.make_node("Unsqueeze", ["m", "one"], ["y"])]
    graph = helper.make_graph(nodes, "cls3d",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 10, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])],
                              [numpy_helper.from_array(np.array([1], np.int64), "one")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    rt = runtime(om.package(tmp_path, "cls3d", model, """
        task = "classification"
        [input]
        modalities = ["CT"]
        kind = "volume"
        size = [8, 10, 12]
        [output]
        kind = "scores"
        activation = "sigmoid"
        """, findings=[(0, "A", 0.5)]))
    img = RNG.normal(0.3, 1, (6, 20, 16))
    pred = rt.run(series(img))
    assert np.allclose(pred.scores, sigmoid(ref_resample(img, (8, 10, 12)).mean()), atol=1e-5)


# --- the process around the model ------------------------------------------------------------

def test_cpu_threads_do_not_spin_and_numpy_asks_for_no_huge_pages(tmp_path):
    """ONNX Runtime's threads sleep between runs (the batch's threshold and the next batch's
    decoding need the cores), and a process that imports the node faults a job's fresh arrays
    in as normal pages unless the administrator's environment says otherwise."""
    folder = om.package(tmp_path, "one", om.conv2d(np.ones((1, 1, 1, 1), np.float32), np.zeros(1, np.float32)),
                        """
        task = "segmentation"
        [input]
        modalities = ["CT"]
        kind = "slices"
        [output]
        kind = "probabilities"
        decision = "threshold"
        """, segments=[(0, "all")])
    options = runtime(folder).session.get_session_options()
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert options.get_session_config_entry(key) == "0"
    probe = "import node, numpy; print(numpy._core.multiarray._get_madvise_hugepage())"
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    for extra, expected in (({}, "False"), ({"NUMPY_MADVISE_HUGEPAGE": "1"}, "True")):
        out = subprocess.run([sys.executable, "-c", probe], env={**env, **extra}, capture_output=True,
                             text=True, check=True, cwd=REPO)
        assert out.stdout.strip() == expected
