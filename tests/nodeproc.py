"""Run ``ainode serve`` as a real process for end-to-end tests."""

from __future__ import annotations

import os
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pynetdicom import AE
from pynetdicom.sop_class import Verification

REPO = Path(__file__).resolve().parent.parent
#: How long a node may take to start: models are built, loaded and warmed up first, and a
#: busy CI machine is slow. A bound, not a wait: start() returns as soon as the node answers.
START_TIMEOUT_S = 180.0


_BUILT: dict[str, bytes] = {}          # model name -> ONNX bytes, built once per test process


def build_models(folder: Path, names: tuple[str, ...] = ("ct-tissue",)) -> Path:
    """A models folder with the named reference models built by their own scripts (the
    repository stays clean)."""
    for name in names:
        target = folder / name
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "models" / name / "model.toml", target / "model.toml")
        if name not in _BUILT:
            runpy.run_path(str(REPO / "models" / name / "build.py"))["build"](target / "model.onnx")
            _BUILT[name] = (target / "model.onnx").read_bytes()
        else:
            (target / "model.onnx").write_bytes(_BUILT[name])
    return folder


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 180.0, poll: float = 0.1) -> Any:
    """Wait until ``predicate()`` is truthy and return it; fail naming ``what`` after ``timeout``
    (a generous bound for a busy machine, not a guess of how long it takes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out waiting for {what}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def write_config(path: Path, sections: dict[str, Any]) -> Path:
    """Write a node.toml; unless ``sections`` has an ``http`` table, the HTTP face gets a free
    port (the default 8080 would collide between nodes of one test)."""
    if "http" not in sections:
        sections = {**sections, "http": {"port": _free_port()}}
    lines = []
    for name, body in sections.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{name}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"[{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in body.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class NodeProcess:
    config: Path
    port: int
    data_dir: Path
    log: Path
    ae_title: str = "AINODE"
    process: subprocess.Popen | None = field(default=None, repr=False)

    def start(self, timeout: float = START_TIMEOUT_S) -> "NodeProcess":
        """Start ``ainode serve`` and wait until it answers C-ECHO (models warm up first)."""
        return self._start(self.echo, "answer C-ECHO", timeout)

    def start_waiting_for(self, text: str, timeout: float = START_TIMEOUT_S) -> "NodeProcess":
        """Start ``ainode serve`` and wait until its log shows ``text`` (a TLS listener, say)."""
        return self._start(lambda: text in self.log_text(), f"log {text!r}", timeout)

    def _start(self, ready: Callable[[], bool], what: str, timeout: float) -> "NodeProcess":
        out = self.log.open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", "serve", "--config", str(self.config)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=str(REPO))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"ainode serve exited with {self.process.returncode}:\n{self.log_text()}")
            if ready():
                return self
            time.sleep(0.1)
        raise AssertionError(f"ainode serve did not {what} within {timeout} s:\n{self.log_text()}")

    def echo(self) -> bool:
        ae = AE(ae_title="PROBE")
        ae.add_requested_context(Verification)
        ae.acse_timeout = ae.connection_timeout = 2
        assoc = ae.associate("127.0.0.1", self.port, ae_title=self.ae_title)
        if not assoc.is_established:
            return False
        status = assoc.send_c_echo()
        assoc.release()
        return bool(status) and status.Status == 0

    def stop(self) -> int:
        """Graceful stop (SIGTERM); returns the exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "node.cli", *args, "--config", str(self.config)],
                              capture_output=True, text=True, cwd=str(REPO), timeout=60)
