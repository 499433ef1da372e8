"""`ainode demo`, the newcomer's first command, runs through and tells the whole story."""

import subprocess
import sys

from nodeproc import REPO


def test_demo_runs_end_to_end():
    done = subprocess.run([sys.executable, "-m", "node.cli", "demo", "--slices", "16", "--size", "64"],
                          capture_output=True, text=True, cwd=str(REPO), timeout=300)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "SEG AI SEG ct-tissue 1.0.0 DEMO" in out and "SR  AI SR ct-tissue 1.0.0 DEMO" in out
    assert "study matches: False" not in out
    for name in ("Body", "Lungs", "Bone"):
        line = next(line for line in out.splitlines() if line.strip().startswith(name))
        assert line.rstrip().endswith(("+0.00%", "-0.00%")), line
    assert "DEMOXR0002: Pneumonia" in out and "POSITIVE, priority urgent" in out
    assert "DEMOXR0001: Pneumonia" in out and "negative" in out
    worklist = out.split("worklist, most urgent first")[1].splitlines()[1:]
    assert worklist[0].split()[:3] == ["urgent", "accession", "DEMOXR0002"]
