"""``ainode serve`` and ``ainode reload``: run the node; make it read its configuration again."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom

from node import __version__
from node.cli.common import config_path, load
from node.config.schema import load_config
from node.errors import ConfigError
from node.stage import freeze_startup_objects
from node.storage.files import DataDirLock, node_dir

if TYPE_CHECKING:
    from node.worker import Node

PID_FILE = "ainode.pid"
RELOAD_FILE = "ainode.reload.json"       # the outcome of the last reload, for `ainode reload`
RELOAD_WAIT_S = 30.0
POLL_S = 0.1


def cmd_serve(args: argparse.Namespace) -> int:
    from node.worker import Node

    path = config_path(args.config)
    config = load_config(path)
    # Received headers are read leniently (every problem that matters is checked and logged
    # by the node itself); pydicom's per-value warnings would only flood the log.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    stop, reload = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: (reload.set(), stop.set()))   # handled once serving
    config.node.data_dir.mkdir(parents=True, exist_ok=True)
    lock = DataDirLock(config.node.data_dir, config.node.name)
    lock.acquire()                 # a second live node of this name on this data_dir stops here
    node = Node(config)
    web = None
    try:
        node.start()
        if config.http.enabled:
            from node.web.app import WebContext, WebServer
            from node.web.auth import Tokens

            report = node_dir(config.node.data_dir, config.node.name) / RELOAD_FILE
            web = WebServer(config.http, WebContext(node, Tokens.load(config.http.tokens_file),
                                                    lambda actor: _reload(node, path, report, actor)))
            web.start()
    except BaseException:
        node.stop(timeout=5)
        lock.release()
        raise
    frozen = freeze_startup_objects()
    pid_file = node_dir(config.node.data_dir, config.node.name) / PID_FILE
    pid_file.write_text(f"{os.getpid()}\n")
    log = logging.getLogger("node")
    log.info("ainode %s serving (pid %d; %d objects of its start-up left out of garbage collection); "
             "SIGHUP or `ainode reload` reads the configuration again; Ctrl-C or SIGTERM stops it gracefully",
             __version__, os.getpid(), frozen)
    try:
        while True:
            stop.wait()
            if not reload.is_set():
                break
            stop.clear()
            reload.clear()
            _reload(node, path, node_dir(config.node.data_dir, config.node.name) / RELOAD_FILE)
    finally:
        log.info("stopping: no new associations, finishing work in progress")
        if web is not None:
            web.stop()
        node.stop()
        if pid_file.is_file() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
        lock.release()
    return 0


def _reload(node: Node, path: Path | None, report: Path, actor: str = "SIGHUP") -> dict:
    """Read the configuration file again and swap it in; a bad one is refused, the old one
    stays. Returns (and writes to ``report``) ``{"ok", "message", "at"}``."""
    log = logging.getLogger("node")
    try:
        notes = node.reload(load_config(path))
        outcome = {"ok": True, "message": "configuration reloaded" + "".join(f"; {n}" for n in notes)}
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc, extra={"reload_error": str(exc)})
        outcome = {"ok": False, "message": f"reload refused, the running configuration stays: {exc}"}
    outcome["at"] = time.time()
    outcome["by"] = actor
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    tmp.replace(report)
    return outcome


def cmd_reload(args: argparse.Namespace) -> int:
    config = load(args.config)     # a bad file is refused here already, naming the key
    pid_file = node_dir(config.node.data_dir, config.node.name) / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        print(f"no running node: {pid_file} is missing or unreadable", file=sys.stderr)
        return 1
    report = node_dir(config.node.data_dir, config.node.name) / RELOAD_FILE
    before = report.stat().st_mtime_ns if report.exists() else 0
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        print(f"no running node: process {pid} from {pid_file} does not exist", file=sys.stderr)
        return 1
    deadline = time.monotonic() + RELOAD_WAIT_S
    while time.monotonic() < deadline:
        if report.exists() and report.stat().st_mtime_ns != before:
            try:
                outcome = json.loads(report.read_text())
            except ValueError:
                time.sleep(POLL_S)
                continue
            print(outcome["message"])
            return 0 if outcome["ok"] else 1
        time.sleep(POLL_S)
    print(f"sent SIGHUP to {pid}; no answer within {RELOAD_WAIT_S:.0f} s (see the node's log)", file=sys.stderr)
    return 1
