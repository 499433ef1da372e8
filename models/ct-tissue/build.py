# ct-tissue: builds the ONNX graph of a DEMONSTRATION model. It is not trained and not for
# clinical use: fixed Hounsfield-unit thresholds plus a hole-filling step, written directly
# with ONNX operators so the node can be shown end to end without downloading anything.
#
#   python models/ct-tissue/build.py [--out models/ct-tissue/model.onnx]
#
# Contract (models/ct-tissue/model.toml): input "ct" float32 [N, 1, H, W] in HU; output
# "masks" float32 [N, 3, H, W] with values 0 or 1 — channel 0 Body, 1 Lungs, 2 Bone.
"""Build the ct-tissue demonstration model (threshold graph, opset 17)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8              # the IR version that goes with opset 17: widest runtime support
BODY_HU = -500.0            # tissue: above this
LUNG_HU = -400.0            # lung: inside the body and below this
BONE_HU = 250.0             # bone: inside the body and above this
DOC = ("DEMONSTRATION model, not trained, NOT FOR CLINICAL USE. Body outline (tissue above "
       f"{BODY_HU:g} HU with enclosed holes filled), lungs (inside the body, below {LUNG_HU:g} "
       f"HU) and bone (inside the body, above {BONE_HU:g} HU) on CT slices by fixed "
       "thresholds. Input 'ct': float32 [N,1,H,W] in Hounsfield units. Output 'masks': "
       "float32 [N,3,H,W], 0/1, channels Body, Lungs, Bone.")


def make_model() -> onnx.ModelProto:
    """Return the ct-tissue model, checked by the onnx checker (shape inference included)."""
    n = helper.make_node
    inits = [
        numpy_helper.from_array(np.array(BODY_HU, np.float32), "body_hu"),
        numpy_helper.from_array(np.array(LUNG_HU, np.float32), "lung_hu"),
        numpy_helper.from_array(np.array(BONE_HU, np.float32), "bone_hu"),
        numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
        numpy_helper.from_array(np.array(2, np.int64), "axis_h"),
        numpy_helper.from_array(np.array(3, np.int64), "axis_w"),
    ]
    nodes = [
        n("Greater", ["ct", "body_hu"], ["tissue"], name="tissue_threshold"),
        n("Cast", ["tissue"], ["tissue_f"], to=TensorProto.FLOAT, name="tissue_float"),
    ]
    # A pixel is inside the body when there is tissue at or beyond it in all four
    # directions along the rows and columns: running sums from each side, all positive.
    sides = []
    for axis, side in (("axis_w", "left"), ("axis_w", "right"), ("axis_h", "above"),
                       ("axis_h", "below")):
        reverse = int(side in ("right", "below"))
        nodes += [
            n("CumSum", ["tissue_f", axis], [f"sum_{side}"], reverse=reverse,
              name=f"cumsum_{side}"),
            n("Greater", [f"sum_{side}", "zero"], [f"has_{side}"], name=f"any_{side}"),
        ]
        sides.append(f"has_{side}")
    nodes += [
        n("And", [sides[0], sides[1]], ["inside_row"], name="inside_row"),
        n("And", [sides[2], sides[3]], ["inside_col"], name="inside_col"),
        n("And", ["inside_row", "inside_col"], ["body"], name="body"),
        n("Less", ["ct", "lung_hu"], ["low"], name="lung_threshold"),
        n("And", ["body", "low"], ["lungs"], name="lungs"),
        n("Greater", ["ct", "bone_hu"], ["high"], name="bone_threshold"),
        n("And", ["body", "high"], ["bone"], name="bone"),
        n("Concat", ["body", "lungs", "bone"], ["masks_bool"], axis=1, name="channels"),
        n("Cast", ["masks_bool"], ["masks"], to=TensorProto.FLOAT, name="masks_float"),
    ]
    graph = helper.make_graph(
        nodes, "ct_tissue_demo",
        inputs=[helper.make_tensor_value_info("ct", TensorProto.FLOAT, ["N", 1, "H", "W"])],
        outputs=[helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        initializer=inits, doc_string=DOC)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
        producer_name="pacs-ai-node models/ct-tissue/build.py", producer_version="1.0.0",
        model_version=1, doc_string=DOC)
    helper.set_model_props(model, {
        "name": "ct-tissue",
        "version": "1.0.0",
        "demonstration": "true",
        "trained": "false",
        "intended_use": "DEMONSTRATION ONLY - not trained, not for clinical use",
        "classes": "Body,Lungs,Bone",
        "input_units": "HU",
    })
    onnx.checker.check_model(model, full_check=True)
    return model


def build(out_path: Path) -> Path:
    """Write the model to ``out_path`` (same bytes every time for one onnx version)."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(make_model().SerializeToString(deterministic=True))
    return out_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("model.onnx"),
                        help="where to write the model (default: beside this script)")
    args = parser.parse_args(argv)
    path = build(args.out)
    print(f"wrote {path} ({path.stat().st_size} bytes) - demonstration model, not for clinical use")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
