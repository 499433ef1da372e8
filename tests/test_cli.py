"""The command line as a new user meets it: one line for each mistake, never a traceback."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pydicom

from conftest import free_port
from node.demo import DemoPacs
from node.synthetic.ct import make_ct_series
from nodeproc import REPO, NodeProcess, build_models, write_config


def ainode(*args: str, cwd: Path = REPO, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          cwd=str(cwd), timeout=timeout, stdin=subprocess.DEVNULL)


def one_line_no_traceback(done: subprocess.CompletedProcess[str]) -> str:
    text = (done.stdout + done.stderr).strip()
    assert "Traceback" not in text, text
    assert len(text.splitlines()) == 1, text
    return text


def test_queue_commands_before_any_node_ran_say_so_in_one_line(tmp_path):
    config = write_config(tmp_path / "node.toml", {"node": {"data_dir": str(tmp_path / "never")}})
    for command in (["status"], ["jobs"], ["worklist"], ["routes", "log"], ["notifications"], ["audit"]):
        done = ainode(*command, "--config", str(config))
        assert done.returncode == 1, command
        assert one_line_no_traceback(done) == f"ainode: no node has run with data_dir {tmp_path / 'never'}"
    bare = ainode("status", cwd=tmp_path)             # no config/node.toml in this folder
    assert bare.returncode == 1
    assert "no node has run with data_dir var (no --config given and no config/node.toml here)" in \
        one_line_no_traceback(bare)
    assert not (tmp_path / "never").exists()          # looking created nothing


def test_send_skips_unreadable_files_sends_the_rest_and_says_so(tmp_path):
    phantom = make_ct_series(tmp_path / "folder", slices=5, size=32)
    truncated = tmp_path / "folder" / "truncated.dcm"
    data = Path(phantom.files[0]).read_bytes()
    truncated.write_bytes(data[: len(data) - 700])    # the pixel data cut short
    (tmp_path / "folder" / "notes.txt").write_text("not DICOM\n")
    pacs = DemoPacs("PACS")
    try:
        done = ainode("send", str(tmp_path / "folder"), "--to", f"PACS@127.0.0.1:{pacs.port}")
    finally:
        pacs.stop()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"PACS@127.0.0.1:{pacs.port}: 7 files: sent 5, refused 0, skipped 2 (unreadable)" in done.stdout
    assert f"skipped: {truncated}: not a readable DICOM file: ValueError: truncated: " in done.stderr
    assert "notes.txt: not a readable DICOM file" in done.stderr
    assert len(pacs.received) == 5


def test_serve_refuses_a_second_node_and_a_taken_port_in_one_line(tmp_path):
    models = build_models(tmp_path / "models")
    port = free_port()
    sections = {"node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data"), "name": "one"},
                "ingest": {"min_free_disk_mb": 0}, "inference": {"models_dir": str(models)}}
    config = write_config(tmp_path / "node.toml", sections)
    first = NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log")
    first.start_waiting_for("serving")
    try:
        # what the started process holds is left out of later garbage collection passes
        frozen = re.search(r"serving \(pid \d+; (\d+) objects of its start-up left out", first.log_text())
        assert frozen and int(frozen.group(1)) > 50_000, first.log_text()[-2000:]
        second = ainode("serve", "--config", str(config))
        assert second.returncode == 1
        line = one_line_no_traceback(second)
        assert line.startswith("ainode: another node named 'one' is running with data_dir") \
            and f"(pid {first.process.pid})" in line, line
        status = ainode("status", "--config", str(config))
        assert f"running, pid {first.process.pid}" in status.stdout        # the first is untouched
        other = write_config(tmp_path / "other.toml", {**sections, "node": {
            **sections["node"], "data_dir": str(tmp_path / "data2")}})
        taken = ainode("serve", "--config", str(other))
        assert taken.returncode == 1
        assert one_line_no_traceback(taken) == f"ainode: cannot listen on 127.0.0.1:{port}: Address already in use"
    finally:
        first.stop()


def test_serve_builds_a_missing_reference_model_and_models_build_builds_them_all(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(REPO / "models", models, ignore=shutil.ignore_patterns("model.onnx", "__pycache__"))
    config = write_config(tmp_path / "node.toml", {"inference": {"models_dir": str(models)}})
    built = ainode("models", "build", "--config", str(config))
    assert built.returncode == 0, built.stderr
    for name in ("ct-tissue", "chest-xray-demo"):
        assert f"built {name} " in built.stdout and (models / name / "model.onnx").is_file()
    (models / "ct-tissue" / "model.onnx").unlink()
    port = free_port()
    config = write_config(tmp_path / "serve.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "ingest": {"min_free_disk_mb": 0}, "inference": {"models_dir": str(models)},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": ["pacs"]}]})
    node = NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log").start()
    node.stop()
    assert "model.onnx is missing; building the reference model (deterministic)" in node.log_text()
    assert (models / "ct-tissue" / "model.onnx").is_file()


def test_log_level_after_the_subcommand_and_a_closed_pipe(tmp_path):
    config = write_config(tmp_path / "node.toml", {"node": {"data_dir": str(tmp_path / "never")}})
    done = ainode("status", "--config", str(config), "--log-level", "WARNING")
    assert "unrecognized arguments" not in done.stderr and done.returncode == 1
    # `ainode models list | head -0`: the reader is gone before the first line is written.
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "models", "list"], cwd=str(REPO),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _, err = proc.communicate(timeout=120)
    assert b"BrokenPipeError" not in err and b"Traceback" not in err, err.decode()
    assert proc.returncode == 0


def test_routes_test_says_each_library_warning_once(tmp_path):
    folder = tmp_path / "study"
    phantom = make_ct_series(folder, slices=4, size=16)
    for path in phantom.files:                        # the same bad value in every file
        ds = pydicom.dcmread(path)
        ds.SeriesDescription = "Y" * 70               # LO: at most 64 characters
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path)
    done = ainode("routes", "test", str(folder))
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "exceeds the maximum length of 64" in line]
    assert len(warned) == 1, done.stderr
