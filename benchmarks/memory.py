"""Peak memory of one job as the worker runs it: ``ct-tissue`` on a 300- and a 1000-slice
512 × 512 CT (decode, model, postprocess, SEG + SR encoded), each in a fresh process.

    python benchmarks/memory.py [--slices 300 1000]

Prints the process's peak RSS during the job (``VmHWM``, reset once the phantom is made and
the model loaded) beside its RSS when the job starts and the size of the study, of its
float32 volume and of the masks. Linux only (``/proc``). Figures, not assertions.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

_JOB = """
import gc, json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
sys.path.insert(0, {repo!r}); sys.path.insert(0, {bench!r})
from pathlib import Path
from models import build_packages, run_job
from node.inference.manifest import load_manifest
from node.inference.runtime import ModelRuntime
from node.synthetic.ct import make_ct_series
work = Path({work!r})
packages = build_packages(work / "m")
files = sorted(make_ct_series(work / "ct", slices={slices}, size=512).files)
runtime = ModelRuntime(load_manifest(packages / "ct-tissue"), ["CPUExecutionProvider"])
gc.collect()
with open("/proc/self/clear_refs", "w") as f:     # the peak so far (making the phantom) is reset
    f.write("5")
before = status("VmRSS")
t = time.perf_counter()
timings = run_job(runtime, files)
print(json.dumps(dict(seconds=time.perf_counter() - t, timings=timings, before_mb=before,
                      peak_mb=status("VmHWM"), study_mb=sum(f.stat().st_size for f in files) / 1e6)))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, nargs="+", default=[300, 1000])
    args = ap.parse_args()
    print(f"{'study':>22s} {'study MB':>9s} {'float32 MB':>10s} {'masks MB':>9s} {'RSS at start MB':>15s} "
          f"{'peak RSS MB':>11s} {'seconds':>8s}")
    for slices in args.slices:
        with tempfile.TemporaryDirectory() as tmp:
            code = _JOB.format(repo=str(REPO), bench=str(REPO / "benchmarks"), work=tmp, slices=slices)
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            voxels = slices * 512 * 512
            print(f"{f'CT {slices} x 512 x 512':>22s} {r['study_mb']:9.0f} {4 * voxels / 1e6:10.0f} "
                  f"{3 * voxels / 1e6:9.0f} {r['before_mb']:15.0f} {r['peak_mb']:11.0f} {r['seconds']:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
