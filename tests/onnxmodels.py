"""Tiny ONNX models and model packages made by the tests, with known arithmetic.

Each builder returns an ``onnx.ModelProto`` whose computation the tests repeat in numpy.
:func:`package` writes one into ``folder/<name>/`` beside a ``model.toml``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8


def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              ir_version=IR_VERSION)
    onnx.checker.check_model(model, full_check=True)
    return model


def _io(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def conv2d(weights: np.ndarray, bias: np.ndarray, layout: str = "NCHW", *,
           input_shape=None, output_name: str = "y", dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """``y = conv(x, weights) + bias`` with 'same' zero padding; one input channel.

    ``weights`` is ``(C, 1, k, k)``; the output has C channels in ``layout``.
    """
    c, _, k, _ = weights.shape
    n = helper.make_node
    nodes, src = [], "x"
    if dtype == TensorProto.FLOAT16:
        nodes.append(n("Cast", ["x"], ["x32"], to=TensorProto.FLOAT))
        src = "x32"
    if layout == "NHWC":
        nodes.append(n("Transpose", [src], ["xt"], perm=[0, 3, 1, 2]))
        src = "xt"
    nodes.append(n("Conv", [src, "w", "b"], ["conv"], pads=[k // 2] * 4))
    if layout == "NHWC":
        nodes.append(n("Transpose", ["conv"], [output_name], perm=[0, 2, 3, 1]))
    else:
        nodes.append(n("Identity", ["conv"], [output_name]))
    shape_in = input_shape or (["N", 1, "H", "W"] if layout == "NCHW" else ["N", "H", "W", 1])
    shape_out = ["N", c, "H", "W"] if layout == "NCHW" else ["N", "H", "W", c]
    return _model(nodes, [_io("x", shape_in, dtype)], [_io(output_name, shape_out)],
                  [numpy_helper.from_array(weights.astype(np.float32), "w"),
                   numpy_helper.from_array(bias.astype(np.float32), "b")])


def classifier(weights: np.ndarray, dense: np.ndarray, dense_bias: np.ndarray,
               layout: str = "NHWC", size=(32, 32), sigmoid: bool = True) -> onnx.ModelProto:
    """Conv (C, 1, 3, 3) -> ReLU -> global mean -> dense (K, C) -> [sigmoid]; fixed size."""
    n = helper.make_node
    nodes, src = [], "x"
    if layout == "NHWC":
        nodes.append(n("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]))
        src = "xt"
    nodes += [n("Conv", [src, "w"], ["conv"], pads=[1, 1, 1, 1]),
              n("Relu", ["conv"], ["relu"]),
              n("GlobalAveragePool", ["relu"], ["pool"]),
              n("Flatten", ["pool"], ["feat"]),
              n("Gemm", ["feat", "dw", "db"], ["logit" if sigmoid else "scores"], transB=1)]
    if sigmoid:
        nodes.append(n("Sigmoid", ["logit"], ["scores"]))
    shape_in = ([1, 1, *size] if layout == "NCHW" else [1, *size, 1])
    return _model(nodes, [_io("x", shape_in)], [_io("scores", [1, dense.shape[0]])],
                  [numpy_helper.from_array(weights.astype(np.float32), "w"),
                   numpy_helper.from_array(dense.astype(np.float32), "dw"),
                   numpy_helper.from_array(dense_bias.astype(np.float32), "db")])


def pointwise3d(gains, biases, layout: str = "NCDHW", patch=None) -> onnx.ModelProto:
    """``y[c] = x * gains[c] + biases[c]`` per voxel (3D, one input channel)."""
    c = len(gains)
    n = helper.make_node
    nodes, src = [], "x"
    if layout == "NDHWC":
        nodes.append(n("Transpose", ["x"], ["xt"], perm=[0, 4, 1, 2, 3]))
        src = "xt"
    nodes += [n("Mul", [src, "g"], ["m"]), n("Add", ["m", "b"], ["y5"])]
    out = "y"
    if layout == "NDHWC":
        nodes.append(n("Transpose", ["y5"], [out], perm=[0, 2, 3, 4, 1]))
    else:
        nodes.append(n("Identity", ["y5"], [out]))
    d, h, w = patch or ("D", "H", "W")
    shape_in = ["N", 1, d, h, w] if layout == "NCDHW" else ["N", d, h, w, 1]
    shape_out = ["N", c, d, h, w] if layout == "NCDHW" else ["N", d, h, w, c]
    g = np.array(gains, np.float32).reshape(1, c, 1, 1, 1)
    b = np.array(biases, np.float32).reshape(1, c, 1, 1, 1)
    return _model(nodes, [_io("x", shape_in)], [_io(out, shape_out)],
                  [numpy_helper.from_array(g, "g"), numpy_helper.from_array(b, "b")])


def patch_mean3d(patch, layout: str = "NDHWC") -> onnx.ModelProto:
    """Every output voxel is the mean of its patch (one channel): shows the blending."""
    n = helper.make_node
    axes = [1, 2, 3] if layout == "NDHWC" else [2, 3, 4]
    nodes = [n("ReduceMean", ["x"], ["mean"], axes=axes, keepdims=1),
             n("Expand", ["mean", "shape"], ["y"])]
    shape = [1, *patch, 1] if layout == "NDHWC" else [1, 1, *patch]
    return _model(nodes, [_io("x", shape)], [_io("y", shape)],
                  [numpy_helper.from_array(np.array(shape, np.int64), "shape")])


def labels(thresholds, layout: str = "NCDHW", keep_channel: bool = False) -> onnx.ModelProto:
    """Label map ``sum(x > t)`` (int64): 0 below every threshold, k above k of them.

    One input channel in ``layout``; the output drops the channel axis unless
    ``keep_channel``.
    """
    n = helper.make_node
    spatial = ["D", "H", "W"][-(len(layout) - 2):]
    axis = 1 if layout.startswith("NC") else len(layout) - 1
    shape_in = ["N", 1, *spatial] if axis == 1 else ["N", *spatial, 1]
    nodes, parts = [], []
    for k, t in enumerate(thresholds):
        nodes += [n("Greater", ["x", f"t{k}"], [f"g{k}"]),
                  n("Cast", [f"g{k}"], [f"c{k}"], to=TensorProto.INT64)]
        parts.append(f"c{k}")
    total = parts[0]
    for k, part in enumerate(parts[1:]):
        nodes.append(n("Add", [total, part], [f"sum{k}"]))
        total = f"sum{k}"
    nodes.append(n("Identity", [total], ["s"]))
    if keep_channel:
        nodes.append(n("Identity", ["s"], ["y"]))
        shape_out = shape_in
    else:
        nodes.append(n("Squeeze", ["s", "axis"], ["y"]))
        shape_out = ["N", *spatial]
    inits = [numpy_helper.from_array(np.array(t, np.float32), f"t{k}") for k, t in enumerate(thresholds)]
    inits.append(numpy_helper.from_array(np.array([axis], np.int64), "axis"))
    return _model(nodes, [_io("x", shape_in)], [_io("y", shape_out, TensorProto.INT64)], inits)


SEGMENT = """
[[segments]]
label = {label}
name = "{name}"
category = {{ code = "49755003", meaning = "Morphologically Altered Structure" }}
type = {{ code = "4147007", meaning = "Mass" }}
"""

FINDING = """
[[findings]]
index = {index}
name = "{name}"
code = {{ code = "233604007", meaning = "Pneumonia" }}
threshold = {threshold}
priority = "urgent"
"""


def package(folder: Path, name: str, model: onnx.ModelProto, body: str, *,
            segments=(), findings=()) -> Path:
    """Write ``folder/name/model.onnx`` and a ``model.toml`` made of ``body`` plus
    segments ``(label, name)`` and findings ``(index, name, threshold)``; returns the folder."""
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    (target / "model.onnx").write_bytes(model.SerializeToString())
    text = f'name = "{name}"\nversion = "0.1.0"\n' + textwrap.dedent(body)
    text += "".join(SEGMENT.format(label=lab, name=nm) for lab, nm in segments)
    text += "".join(FINDING.format(index=i, name=nm, threshold=t) for i, nm, t in findings)
    (target / "model.toml").write_text(text)
    return target
