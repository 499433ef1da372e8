# chest-xray-demo: builds the ONNX graph of a DEMONSTRATION classifier. It has never seen a
# real radiograph and is not for clinical use. In the shape of the classic small Keras
# pneumonia example (a 2D CNN on a downscaled single-channel image, sigmoid output, NHWC):
#
#   image [N,224,224,1] -> Conv 3x3 (4 filters) -> ReLU -> MaxPool 2 -> depthwise Conv 3x3
#   -> ReLU -> MaxPool 2 -> AveragePool 8 (a 7x7 grid) -> Flatten (196) -> Dense 1 -> Sigmoid
#
# The convolution filters are fixed by hand (mean, two Sobel edges, a Laplacian; then a
# smoothing). Only the final dense layer is trained: a logistic regression fitted in numpy
# on TRAIN_IMAGES synthetic radiographs from node/phantom_xr.py (half with a synthetic
# opacity), fixed seeds, so the build is deterministic and takes a few seconds. Training
# images go through the node's own preprocessing (node/preprocess.py) for this manifest.
#
#   python models/chest-xray-demo/build.py [--out models/chest-xray-demo/model.onnx]
"""Build the chest-xray-demo model (small CNN, dense layer fitted on synthetic images)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import onnx
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")   # no usage telemetry from ONNX Runtime
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))          # the repository's `node` package

from node.inference.manifest import load_manifest  # noqa: E402
from node.synthetic.radiograph import radiograph_pixels  # noqa: E402
from node.inference.preprocess import model_planes  # noqa: E402
from node.inference.volume import SeriesVolume  # noqa: E402

OPSET = 17
IR_VERSION = 8
VERSION = "1.0.0"
SIZE = 224
GRID = 7                       # AveragePool to a 7 x 7 grid of regions
TRAIN_IMAGES = 800
HOLDOUT_IMAGES = 200
TRAIN_SEED = 20250101          # image k of the training set uses seed TRAIN_SEED + k
HOLDOUT_SEED = 30250101
L2 = 1e-3                      # ridge penalty on the standardised features
NEWTON_STEPS = 25
SOURCE_ROWS = (240, 320)       # synthetic source images vary in size and aspect ratio
SOURCE_ASPECT = (0.8, 1.0)

_FILTERS = np.array([
    [[1, 1, 1], [1, 1, 1], [1, 1, 1]],               # local mean
    [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],            # Sobel, horizontal change
    [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],            # Sobel, vertical change
    [[0, -1, 0], [-1, 4, -1], [0, -1, 0]],           # Laplacian
], dtype=np.float32).reshape(4, 1, 3, 3) / np.array([9, 4, 4, 4], np.float32).reshape(4, 1, 1, 1)
_SMOOTH = np.full((4, 1, 3, 3), 1 / 9, dtype=np.float32)


def _graph_nodes(with_head: bool) -> list[onnx.NodeProto]:
    n = helper.make_node
    nodes = [
        n("Transpose", ["image"], ["nchw"], perm=[0, 3, 1, 2], name="nhwc_to_nchw"),
        n("Conv", ["nchw", "filters"], ["conv1"], pads=[1, 1, 1, 1], name="conv1"),
        n("Relu", ["conv1"], ["relu1"], name="relu1"),
        n("MaxPool", ["relu1"], ["pool1"], kernel_shape=[2, 2], strides=[2, 2], name="pool1"),
        n("Conv", ["pool1", "smooth"], ["conv2"], pads=[1, 1, 1, 1], group=4, name="conv2"),
        n("Relu", ["conv2"], ["relu2"], name="relu2"),
        n("MaxPool", ["relu2"], ["pool2"], kernel_shape=[2, 2], strides=[2, 2], name="pool2"),
        n("AveragePool", ["pool2"], ["regions"], kernel_shape=[8, 8], strides=[8, 8], name="regions"),
        n("Flatten", ["regions"], ["features"], name="flatten"),
    ]
    if with_head:
        nodes += [n("Gemm", ["features", "dense_w", "dense_b"], ["logit"], transB=1, name="dense"),
                  n("Sigmoid", ["logit"], ["pneumonia"], name="sigmoid")]
    return nodes


def _model(with_head: bool, weights: np.ndarray | None = None, bias: float = 0.0,
           doc: str = "", props: dict[str, str] | None = None) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(_FILTERS, "filters"), numpy_helper.from_array(_SMOOTH, "smooth")]
    if with_head:
        assert weights is not None
        inits += [numpy_helper.from_array(weights.reshape(1, -1).astype(np.float32), "dense_w"),
                  numpy_helper.from_array(np.array([bias], np.float32), "dense_b")]
        out = helper.make_tensor_value_info("pneumonia", TensorProto.FLOAT, ["N", 1])
    else:
        out = helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4 * GRID * GRID])
    graph = helper.make_graph(
        _graph_nodes(with_head), "chest_xray_demo",
        inputs=[helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", SIZE, SIZE, 1])],
        outputs=[out], initializer=inits, doc_string=doc)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION, producer_name="pacs-ai-node models/chest-xray-demo/build.py",
                              producer_version=VERSION, model_version=1, doc_string=doc)
    if props:
        helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def synthetic_set(count: int, first_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` model-input tensors (as the node makes them) and their labels (0/1)."""
    spec = load_manifest(HERE).input
    tensors = np.empty((count, SIZE, SIZE, 1), dtype=np.float32)
    labels = np.arange(count) % 2
    for k in range(count):
        shape_rng = np.random.default_rng(first_seed + k + 7_000_000)
        rows = int(shape_rng.integers(*SOURCE_ROWS))
        cols = int(rows * shape_rng.uniform(*SOURCE_ASPECT))
        image = radiograph_pixels(rows, cols, first_seed + k, positive=bool(labels[k]))
        volume = SeriesVolume(pixels=image[None].astype(np.float32), headers=(),
                              spacing=(1.0, 1.0, 1.0), modality="DX", monochrome1=False)
        tensors[k] = model_planes(volume, spec)[0]
    return tensors, labels


def _features(tensors: np.ndarray, batch: int = 50) -> np.ndarray:
    session = ort.InferenceSession(_model(False).SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(["features"], {"image": tensors[k:k + batch]})[0]
                           for k in range(0, len(tensors), batch)]).astype(np.float64)


def fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """L2-penalised logistic regression by Newton's method; weights for the raw features."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    z = np.hstack([(x - mean) / std, np.ones((len(x), 1))])
    w = np.zeros(z.shape[1])
    penalty = np.full(z.shape[1], L2 * len(x))
    penalty[-1] = 0.0                                  # no penalty on the intercept
    for _ in range(NEWTON_STEPS):
        p = 1 / (1 + np.exp(-z @ w))
        gradient = z.T @ (p - y) + penalty * w
        hessian = (z * (p * (1 - p))[:, None]).T @ z + np.diag(penalty)
        w -= np.linalg.solve(hessian, gradient)
    weights = w[:-1] / std
    return weights, float(w[-1] - weights @ mean)


def make_model() -> tuple[onnx.ModelProto, dict[str, float]]:
    """Fit the dense layer and return the full model and its figures on synthetic images."""
    x_train, y_train = synthetic_set(TRAIN_IMAGES, TRAIN_SEED)
    x_hold, y_hold = synthetic_set(HOLDOUT_IMAGES, HOLDOUT_SEED)
    f_train, f_hold = _features(x_train), _features(x_hold)
    weights, bias = fit_logistic(f_train, y_train)

    def accuracy(f: np.ndarray, y: np.ndarray) -> float:
        return float(np.mean(((f @ weights + bias) > 0) == y))

    figures = {"train_accuracy": accuracy(f_train, y_train), "holdout_accuracy": accuracy(f_hold, y_hold)}
    doc = (f"DEMONSTRATION model, NOT FOR CLINICAL USE. Trained only on {TRAIN_IMAGES} synthetic "
           f"radiographs drawn by node/phantom_xr.py (seeds {TRAIN_SEED}..{TRAIN_SEED + TRAIN_IMAGES - 1}, "
           "half with a synthetic opacity); never on patient data. Fixed convolution filters, "
           "dense layer fitted by logistic regression. Accuracy on "
           f"{HOLDOUT_IMAGES} other synthetic images: {figures['holdout_accuracy']:.3f}. "
           f"Input 'image': float32 [N,{SIZE},{SIZE},1] (NHWC), min-max normalised, aspect kept "
           "and padded. Output 'pneumonia': float32 [N,1], sigmoid probability.")
    model = _model(True, weights, bias, doc, {
        "name": "chest-xray-demo", "version": VERSION, "demonstration": "true",
        "trained_on": f"{TRAIN_IMAGES} synthetic images (node/phantom_xr.py), no patient data",
        "holdout_accuracy_synthetic": f"{figures['holdout_accuracy']:.3f}",
        "intended_use": "DEMONSTRATION ONLY - not for clinical use",
    })
    return model, figures


def build(out_path: Path) -> Path:
    """Write the model to ``out_path``."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model, _ = make_model()
    out_path.write_bytes(model.SerializeToString(deterministic=True))
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=HERE / "model.onnx",
                        help="where to write the model (default: beside this script)")
    args = parser.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    model, figures = make_model()
    args.out.write_bytes(model.SerializeToString(deterministic=True))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) - demonstration model, trained only "
          f"on {TRAIN_IMAGES} synthetic images, not for clinical use; accuracy on synthetic images: "
          f"training {figures['train_accuracy']:.3f}, held out {figures['holdout_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
