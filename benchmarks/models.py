"""Seconds per study and per stage for each model package, on this machine's CPU (or GPU).

    python benchmarks/models.py [--repeat 3] [--quick] [--providers CPUExecutionProvider]

Stages are those of a job in the worker: decode (read and decode the stored series),
preprocess, run (ONNX Runtime only), postprocess (back to the source grid), encode (SEG + SR
or SR, written to bytes). Studies are synthetic, written to a temporary folder:

* ``ct-tissue`` (slices) on the 300 x 512 x 512 phantom CT, uncompressed;
* ``chest-xray-demo`` (image) on a 2500 x 2048 radiograph, uncompressed and JPEG 2000 lossless;
* ``vol3d-bench`` (volume), a small 3D CNN made here (two 3x3x3 convolutions, 8 channels,
  random fixed weights) on the same CT resampled to 2 mm, 64 x 128 x 128 patches with 50 %
  overlap: it is not a reference model, it shows what sliding-window inference costs around
  a model of that size.

Median of ``--repeat`` runs after one warm run; figures, not assertions.
"""

from __future__ import annotations

import argparse
import runpy
import statistics
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from node.results.encode import encode_classification, encode_segmentation  # noqa: E402
from node.inference.runtime import ModelRuntime  # noqa: E402
from node.inference.manifest import load_manifest  # noqa: E402
from node.synthetic.ct import make_ct_series  # noqa: E402
from node.synthetic.radiograph import make_chest_radiograph  # noqa: E402
from node.inference.volume import load_series  # noqa: E402

STAGES = ("decode", "preprocess", "run", "postprocess", "encode")
VOL3D_TOML = """
name = "vol3d-bench"
version = "0.0.1"
description = "Benchmark-only 3D CNN with random fixed weights; not a model"
demonstration = true
task = "segmentation"
[input]
modalities = ["CT"]
kind = "volume"
layout = "NCDHW"
spacing = [2.0, 2.0, 2.0]
window = [-1024, 3071]
normalisation = "zscore"
mean = -400.0
std = 600.0
patch_size = [64, 128, 128]
overlap = 0.5
batch_size = 1
[output]
kind = "probabilities"
activation = "softmax"
decision = "argmax"
[[segments]]
label = 1
name = "Class 1"
category = { code = "49755003", meaning = "Morphologically Altered Structure" }
type = { code = "4147007", meaning = "Mass" }
"""


def vol3d_model() -> onnx.ModelProto:
    """Conv3d(1->8, 3x3x3) -> ReLU -> Conv3d(8->2, 3x3x3); dynamic spatial size."""
    rng = np.random.default_rng(0)
    w1 = (rng.standard_normal((8, 1, 3, 3, 3)) / 5).astype(np.float32)
    w2 = (rng.standard_normal((2, 8, 3, 3, 3)) / 15).astype(np.float32)
    n = helper.make_node
    graph = helper.make_graph(
        [n("Conv", ["x", "w1"], ["c1"], pads=[1] * 6), n("Relu", ["c1"], ["r1"]),
         n("Conv", ["r1", "w2"], ["y"], pads=[1] * 6)],
        "vol3d_bench",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "D", "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, "D", "H", "W"])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def build_packages(folder: Path) -> Path:
    for name in ("ct-tissue", "chest-xray-demo"):
        target = folder / name
        target.mkdir(parents=True)
        (target / "model.toml").write_text((REPO / "models" / name / "model.toml").read_text())
        runpy.run_path(str(REPO / "models" / name / "build.py"))["build"](target / "model.onnx")
    target = folder / "vol3d-bench"
    target.mkdir()
    (target / "model.toml").write_text(VOL3D_TOML)
    (target / "model.onnx").write_bytes(vol3d_model().SerializeToString())
    return folder


def run_job(runtime: ModelRuntime, files: list[Path]) -> dict[str, float]:
    """One job as the worker runs it, timed by stage."""
    timings: dict[str, float] = {}
    t = time.perf_counter()
    m = runtime.manifest
    volume = load_series(files, lazy=m.input.kind != "volume")
    timings["decode"] = time.perf_counter() - t
    prediction = runtime.run(volume)
    for stage, seconds in prediction.timings.items():
        timings[stage] = timings.get(stage, 0.0) + seconds
    headers, frames = volume.headers, volume.frames
    del volume
    t = time.perf_counter()
    if prediction.masks is not None:
        result = encode_segmentation(headers, prediction.masks, m, "bench", frames=frames)
        outputs = [result.seg, result.sr]
    else:
        sr, _ = encode_classification(headers, prediction.scores, m, "bench")
        outputs = [sr]
    for ds in outputs:
        ds.save_as(BytesIO(), enforce_file_format=True)
    timings["encode"] = time.perf_counter() - t
    return timings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small studies (64 x 256 x 256 CT, 1024 x 1024 radiograph)")
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    args = parser.parse_args(argv)
    slices, size, xr_rows, xr_cols = (64, 256, 1024, 1024) if args.quick else (300, 512, 2500, 2048)
    with tempfile.TemporaryDirectory(prefix="ainode-bench-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        models = build_packages(root / "models")
        ct = list(make_ct_series(root / "ct", slices=slices, size=size).files)
        xr_plain = [make_chest_radiograph(root / "xr", seed=7, positive=True, rows=xr_rows, cols=xr_cols).path]
        xr_j2k = [make_chest_radiograph(root / "xr-j2k", seed=7, positive=True, rows=xr_rows, cols=xr_cols,
                                        transfer_syntax="1.2.840.10008.1.2.4.90").path]
        print(f"models built and studies written in {time.perf_counter() - t:.1f} s")
        cases = [
            ("ct-tissue", f"CT {slices}x{size}x{size}, uncompressed", ct),
            ("chest-xray-demo", f"DX {xr_rows}x{xr_cols}, uncompressed", xr_plain),
            ("chest-xray-demo", f"DX {xr_rows}x{xr_cols}, JPEG 2000 lossless", xr_j2k),
            ("vol3d-bench", f"CT {slices}x{size}x{size} -> 2 mm grid", ct),
        ]
        runtimes: dict[str, ModelRuntime] = {}
        print(f"\n| model | study | {' | '.join(STAGES)} | total s |")
        print("| --- | --- |" + " --- |" * (len(STAGES) + 1))
        for name, label, files in cases:
            if name not in runtimes:
                runtimes[name] = ModelRuntime(load_manifest(models / name), args.providers)
            runtime = runtimes[name]
            run_job(runtime, files)                                  # warm (page cache, allocator)
            runs = [run_job(runtime, files) for _ in range(args.repeat)]
            median = {s: statistics.median(r[s] for r in runs) for s in STAGES}
            total = statistics.median(sum(r.values()) for r in runs)
            cells = " | ".join(f"{median[s]:.3f}" for s in STAGES)
            print(f"| {name} ({runtime.provider.replace('ExecutionProvider', '')}) | {label} | {cells} | {total:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
