"""A deliberately slow segmentation model package, so tests can act while a job is running."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MANIFEST = """
name = "slow-body"
version = "1.0.0"
description = "Test model: body outline by threshold, after a busy loop that takes about {seconds} s"
demonstration = true
task = "segmentation"
[input]
modalities = ["CT"]
kind = "slices"
batch_size = 512
[output]
kind = "probabilities"
decision = "threshold"
[[segments]]
label = 0
name = "Body"
category = {{ code = "123037004", meaning = "Anatomical Structure" }}
type = {{ code = "38266002", meaning = "Entire body" }}
"""


def build_slow_model(folder: Path, iterations: int = 40000, seconds_hint: float = 2.0) -> Path:
    """Write ``folder/model.toml`` and ``model.onnx``: masks = x > -500, after ``iterations``
    matrix products that depend on the input (so ONNX Runtime cannot fold them away)."""
    folder.mkdir(parents=True, exist_ok=True)
    n = 192
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["y_in", "w"], ["prod"]),
         helper.make_node("Tanh", ["prod"], ["y_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "busy",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_in", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("y_out", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(w, "w")])
    nodes = [
        helper.make_node("ReduceMean", ["ct"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["mean", "ones"], ["y0"]),
        helper.make_node("Loop", ["trips", "true", "y0"], ["y_final"], body=body),
        helper.make_node("ReduceMean", ["y_final"], ["busy"], keepdims=0),
        helper.make_node("Mul", ["busy", "zero"], ["nothing"]),
        helper.make_node("Add", ["ct", "nothing"], ["x"]),
        helper.make_node("Greater", ["x", "threshold"], ["inside"]),
        helper.make_node("Cast", ["inside"], ["masks"], to=TensorProto.FLOAT),
    ]
    graph = helper.make_graph(
        nodes, "slow-body",
        [helper.make_tensor_value_info("ct", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips"),
         numpy_helper.from_array(np.array(True), "true"),
         numpy_helper.from_array(np.ones((n, n), dtype=np.float32), "ones"),
         numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
         numpy_helper.from_array(np.array(-500.0, dtype=np.float32), "threshold")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, folder / "model.onnx")
    (folder / "model.toml").write_text(MANIFEST.format(seconds=seconds_hint))
    return folder
