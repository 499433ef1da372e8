"""The GPU path, checked and timed: CUDA and TensorRT against ONNX Runtime's own speed.

    bash benchmarks/gpu.sh [--wheels DIR]       # installs onnxruntime-gpu, then runs this
    python benchmarks/gpu.py [--slices 300] [--size 512] [--sets tensorrt cuda cpu]

For each provider set (``tensorrt``: TensorRT, CUDA, CPU; ``cuda``: CUDA, CPU; ``cpu``) whose
first provider this ONNX Runtime offers (the others are reported as not available):

1. ``ainode models check`` for the two reference models (``ct-tissue``, ``chest-xray-demo``)
   and a 3D test model (``vol3d-bench`` of ``benchmarks/models.py``), with a configuration
   naming those providers; the provider each really runs on is printed;
2. the model stage as the worker runs it (``ModelRuntime.run`` on a synthetic CT of
   ``--slices`` x ``--size``², a 2500 x 2048 radiograph, the CT for the 3D model), median of 3
   after a warm run, beside ONNX Runtime's own time for the same model on exactly the inputs
   that stage gave it (the session's ``run`` back to back, nothing of ours around it): the
   ratio own / stage is the share of the stage that is the model (goal >= 0.9);
3. for TensorRT, two starts in two fresh processes sharing the engine cache under the
   configuration's ``data_dir`` (``trt-cache/<node>``): the first builds the engines, the
   second must find them (start time, and the cache's files unchanged).

Each provider set runs in its own process. Figures, not assertions; without a GPU only
``cpu`` runs, which checks the script and gives the CPU's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETS = {"tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
        "cpu": ["CPUExecutionProvider"]}
MODELS = ("ct-tissue", "chest-xray-demo", "vol3d-bench")
NODE_NAME = "gpu-check"


def config_text(work: Path, providers: list[str]) -> str:
    return (f'[node]\nname = "{NODE_NAME}"\ndata_dir = "{work / "data"}"\n'
            f'[inference]\nmodels_dir = "{work / "models"}"\nproviders = {json.dumps(providers)}\n')


def child(work: Path, set_name: str, repeat: int) -> None:
    """One provider set in this process: start every model, time its stage and ORT's own."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from models import run_job  # noqa: E402 - the worker's job, stage by stage

    from node.config.schema import load_config  # noqa: E402
    from node.inference.manifest import load_manifest  # noqa: E402
    from node.inference.models import runtime_for  # noqa: E402

    config = load_config(work / f"{set_name}.toml")
    studies = json.loads((work / "studies.json").read_text())
    for name in MODELS:
        t = time.perf_counter()
        runtime = runtime_for(load_manifest(work / "models" / name), config)
        start_s = time.perf_counter() - t
        files = [Path(f) for f in studies["xr" if name == "chest-xray-demo" else "ct"]]
        run_job(runtime, files)                                   # warm
        stage = statistics.median(run_job(runtime, files)["run"] for _ in range(repeat))
        inputs: list = []
        infer = runtime.infer

        def capture(x, infer=infer):
            inputs.append(x.copy())
            return infer(x)

        runtime.infer = capture                                   # the exact inputs of the stage
        runtime.run(_volume(runtime, files))
        del runtime.infer
        session, fixed = runtime.session, runtime.graph.input_shape[0]
        feeds = [_pad(x, fixed) for x in inputs]

        def own() -> float:
            t = time.perf_counter()
            for x in feeds:
                session.run([runtime.output_name], {runtime.input_name: x})
            return time.perf_counter() - t

        own()
        own_s = statistics.median(own() for _ in range(repeat))
        cache = config.node.data_dir / "trt-cache" / NODE_NAME
        print(json.dumps(dict(set=set_name, model=name, provider=runtime.provider, binding=runtime.bind_device or "",
                              start_s=start_s, stage_s=stage, own_s=own_s, batches=len(feeds),
                              cache={p.name: p.stat().st_mtime_ns for p in sorted(cache.glob("*"))}
                              if cache.is_dir() else {})), flush=True)


def _volume(runtime, files):
    from node.inference.volume import load_series

    return load_series(files, lazy=runtime.manifest.input.kind != "volume")


def _pad(x, fixed):
    import numpy as np

    if fixed is not None and x.shape[0] < fixed:
        x = np.concatenate([x, np.zeros((fixed - x.shape[0], *x.shape[1:]), dtype=x.dtype)])
    return np.ascontiguousarray(x)


def run_child(work: Path, set_name: str, repeat: int) -> list[dict]:
    done = subprocess.run([sys.executable, __file__, "--child", str(work), set_name, "--repeat", str(repeat)],
                          capture_output=True, text=True, cwd=str(REPO))
    if done.returncode != 0:
        print(f"  {set_name}: failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return []
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    ap.add_argument("--child", nargs=2, metavar=("WORK", "SET"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1], args.repeat)
        return 0

    import onnxruntime as ort

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    from models import build_packages  # noqa: E402

    from node.synthetic.ct import make_ct_series  # noqa: E402
    from node.synthetic.radiograph import make_chest_radiograph  # noqa: E402

    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__} ({'onnxruntime-gpu' if 'CUDAExecutionProvider' in available else 'CPU build'}); "
          f"providers: {', '.join(available)}")
    with tempfile.TemporaryDirectory(prefix="ainode-gpu-") as tmp:
        work = Path(tmp)
        build_packages(work / "models")
        ct = make_ct_series(work / "ct", slices=args.slices, size=args.size).files
        xr = make_chest_radiograph(work / "xr", seed=7, positive=True, rows=2500, cols=2048).path
        (work / "studies.json").write_text(json.dumps({"ct": [str(f) for f in ct], "xr": [str(xr)]}))
        rows = []
        for set_name in args.sets:
            if SETS[set_name][0] not in available:
                print(f"\n{set_name}: {SETS[set_name][0]} is not available in this onnxruntime: skipped")
                continue
            (work / f"{set_name}.toml").write_text(config_text(work, SETS[set_name]))
            print(f"\n{set_name}: ainode models check")
            for name in MODELS:
                check = subprocess.run([sys.executable, "-m", "node.cli", "models", "check", name, "--config",
                                        str(work / f"{set_name}.toml")], capture_output=True, text=True,
                                       cwd=str(REPO), env={**os.environ, "PYTHONPATH": str(REPO)})
                print("  " + (check.stdout.strip() or check.stderr.strip()[-800:]).replace("\n", "\n  "))
            first = run_child(work, set_name, args.repeat)
            if set_name == "tensorrt" and first:
                second = run_child(work, set_name, args.repeat)   # a restart: the engines must be found
                for a, b in zip(first, second):
                    a["second_start_s"] = b["start_s"]
                    a["cache_kept"] = bool(a["cache"]) and a["cache"] == b["cache"]
            rows.extend(first)
        print(f"\n{args.slices} x {args.size}^2 CT (ct-tissue, vol3d-bench), 2500 x 2048 DX (chest-xray-demo); "
              f"model stage and ONNX Runtime's own run on the same inputs, medians of {args.repeat}, seconds")
        print("| set | model | runs on | start (1st / 2nd) | engines cached | model stage | ORT own | own / stage |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in rows:
            where = r["provider"].replace("ExecutionProvider", "") + (f", IOBinding {r['binding']}" if r["binding"] else "")
            starts = f"{r['start_s']:.2f}" + (f" / {r['second_start_s']:.2f}" if "second_start_s" in r else "")
            cached = ("yes" if r.get("cache_kept") else "NO") if "cache_kept" in r else "-"
            print(f"| {r['set']} | {r['model']} | {where} | {starts} | {cached} | {r['stage_s']:.3f} | "
                  f"{r['own_s']:.3f} | {r['own_s'] / r['stage_s']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
