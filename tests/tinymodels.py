"""Tiny model packages built by the tests themselves (nothing is downloaded or committed)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
#: Mean HU of the phantom CT (air around a body with lungs): the classifier's operating point.
PHANTOM_MEAN_HU = -662.0
SLOPE = 0.001               # the score moves a little with the image, as a real one would


@dataclass(frozen=True)
class FindingSpec:
    name: str
    probability: float        # the score on the phantom
    threshold: float = 0.5
    priority: str = "urgent"
    code: tuple[str, str] = ("233604007", "Pneumonia")


def build_classifier(folder: Path, name: str, findings: list[FindingSpec]) -> Path:
    """A classification package: scores = sigmoid(mean(pixels) * SLOPE + bias) per finding.

    The bias puts each finding at its ``probability`` on the phantom. Input kind ``slices``:
    the node averages the per-slice scores.
    """
    target = folder / name
    target.mkdir(parents=True, exist_ok=True)
    bias = np.array([math.log(f.probability / (1 - f.probability)) - PHANTOM_MEAN_HU * SLOPE
                     for f in findings], np.float32)
    n = helper.make_node
    graph = helper.make_graph(
        [n("ReduceMean", ["image"], ["mean"], axes=[1, 2, 3], keepdims=1),      # [N,1,1,1]
         n("Flatten", ["mean"], ["mean2"], axis=1),                              # [N,1]
         n("Mul", ["mean2", "slope"], ["scaled"]),
         n("Add", ["scaled", "bias"], ["logits"]),                               # [N,F]
         n("Sigmoid", ["logits"], ["scores"])],
        f"{name}-graph",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", len(findings)])],
        [numpy_helper.from_array(np.array(SLOPE, np.float32), "slope"),
         numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="pacs-ai-node tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, target / "model.onnx")
    lines = [f'name = "{name}"', 'version = "0.1.0"', "demonstration = true", 'task = "classification"',
             "[input]", 'modalities = ["CT"]', 'kind = "slices"', "window = [-1024, 3071]", "batch_size = 16",
             "[output]", 'kind = "scores"']
    for i, f in enumerate(findings):
        lines += ["[[findings]]", f"index = {i}", f'name = "{f.name}"', f"threshold = {f.threshold}",
                  f'priority = "{f.priority}"', f'code = {{ code = "{f.code[0]}", meaning = "{f.code[1]}" }}']
    (target / "model.toml").write_text("\n".join(lines) + "\n")
    return target
