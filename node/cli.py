"""The ``ainode`` command line."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pydicom

from node import __version__
from node.config.schema import PRIORITY_NAMES, Config, load_config
from node.errors import ConfigError, NodeError

if TYPE_CHECKING:
    from node.worker import Node

DEFAULT_CONFIG = Path("config/node.toml")
PID_FILE = "ainode.pid"
RELOAD_FILE = "ainode.reload.json"       # the outcome of the last reload, for `ainode reload`
RELOAD_WAIT_S = 30.0
POLL_S = 0.1


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stderr)
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _config_path(path: str | None) -> Path | None:
    if path:
        return Path(path)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def _config(path: str | None) -> Config:
    return load_config(_config_path(path))


def cmd_serve(args: argparse.Namespace) -> int:
    from node.worker import Node

    path = _config_path(args.config)
    config = load_config(path)
    # Received headers are read leniently (every problem that matters is checked and logged
    # by the node itself); pydicom's per-value warnings would only flood the log.
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    stop, reload = threading.Event(), threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: (reload.set(), stop.set()))   # handled once serving
    node = Node(config)
    node.start()
    pid_file = config.node.data_dir / PID_FILE
    pid_file.write_text(f"{os.getpid()}\n")
    log = logging.getLogger("node")
    log.info("ainode %s serving (pid %d); SIGHUP or `ainode reload` reads the configuration again; "
             "Ctrl-C or SIGTERM stops it gracefully", __version__, os.getpid())
    try:
        while True:
            stop.wait()
            if not reload.is_set():
                break
            stop.clear()
            reload.clear()
            _reload(node, path, config.node.data_dir / RELOAD_FILE)
    finally:
        log.info("stopping: no new associations, finishing work in progress")
        node.stop()
        if pid_file.is_file() and pid_file.read_text().strip() == str(os.getpid()):
            pid_file.unlink()
    return 0


def _reload(node: Node, path: Path | None, report: Path) -> None:
    """Read the configuration file again and swap it in; a bad one is refused, the old one stays."""
    log = logging.getLogger("node")
    try:
        notes = node.reload(load_config(path))
        outcome = {"ok": True, "message": "configuration reloaded" + "".join(f"; {n}" for n in notes)}
    except ConfigError as exc:
        log.error("reload refused, the running configuration stays: %s", exc, extra={"reload_error": str(exc)})
        outcome = {"ok": False, "message": f"reload refused, the running configuration stays: {exc}"}
    outcome["at"] = time.time()
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps(outcome))
    tmp.replace(report)


def cmd_reload(args: argparse.Namespace) -> int:
    config = _config(args.config)     # a bad file is refused here already, naming the key
    pid_file = config.node.data_dir / PID_FILE
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        print(f"no running node: {pid_file} is missing or unreadable", file=sys.stderr)
        return 1
    report = config.node.data_dir / RELOAD_FILE
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


def cmd_echo(args: argparse.Namespace) -> int:
    from node.dicom.deliver import echo, parse_peer

    peer = parse_peer(args.peer)
    t = time.perf_counter()
    status = echo(peer, args.aet, args.timeout)
    print(f"C-ECHO {peer}: status 0x{status:04X} in {1000 * (time.perf_counter() - t):.0f} ms")
    return 0 if status == 0 else 1


def cmd_send(args: argparse.Namespace) -> int:
    from node.dicom.deliver import parse_peer, send_files

    peer = parse_peer(args.to)
    files: list[Path] = []
    for item in args.paths:
        p = Path(item)
        files.extend(sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p])
    if not files:
        print("no files to send", file=sys.stderr)
        return 2
    t = time.perf_counter()
    report = send_files(files, peer, args.aet, args.timeout)
    dt = time.perf_counter() - t
    print(f"sent {report.sent} of {len(files)} files to {peer} in {dt:.2f} s")
    for path, why in report.failed:
        print(f"  failed: {path}: {why}", file=sys.stderr)
    return 0 if report.ok else 1


def _json_or_empty(args: argparse.Namespace, rows: list, empty: str) -> bool:
    """Print ``rows`` as JSON when ``--json`` asks for it (True: nothing more to print);
    otherwise say ``empty`` when there are no rows."""
    if args.json:
        print(json.dumps(rows, indent=2))
        return True
    if not rows and empty:
        print(empty)
    return False


def _db(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from node.storage.db import Database

    config = _config(args.config)
    db = Database(config.node.effective_database_url)
    db.create()
    return db


def node_status(config: Config) -> dict | None:
    """What ``data_dir/status.json`` says about the node, with ``running`` worked out."""
    from node.worker import STATUS_FILE

    path = config.node.data_dir / STATUS_FILE
    if not path.is_file():
        return None
    status = json.loads(path.read_text())
    running = "stopped_at" not in status
    if running:
        try:
            os.kill(int(status["pid"]), 0)
        except ProcessLookupError:
            running = False          # killed without a graceful stop
        except PermissionError:
            pass
    status["running"] = running
    return status


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args.config)
    db = _db(args)
    counts = db.counts()
    node = node_status(config)
    if args.json:
        print(json.dumps({"node": node, **counts}, indent=2))
        return 0
    if node is None:
        print("node:       never started with this data_dir")
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(node["started_at"]))
        state = f"running, pid {node['pid']}" if node["running"] else "not running"
        print(f"node:       {state}; started {since}; {node['ae_title']} on {node['host']}:{node['port']}")
        for name, m in node["models"].items():
            binding = f", IOBinding on {m['io_binding']}" if m.get("io_binding") else ""
            demo = ", DEMONSTRATION" if m.get("demonstration") else ""
            print(f"model:      {name} {m['version']} ({m['task']}, {m['kind']}) on {m['provider']}"
                  f"{binding}; warm-up {1000 * m['warmup_s']:.0f} ms{demo}")
    print(f"database:   {db.url}")
    for name in ("instances", "series", "jobs", "deliveries", "notifications"):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.get(name, {}).items())) or "none"
        print(f"{name:13s} {parts}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    db = _db(args)
    rows = db.jobs_report(args.limit)
    if _json_or_empty(args, rows, "no jobs"):
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        print(f"#{r['id']:<5} {when}  {r['status']:8s} {PRIORITY_NAMES.get(r['priority'], '?'):8s} {r['model']:16s} "
              f"{r['modality']:3s} {r['description'][:30]:30s} acc={r['accession']}")
        if r["error"]:
            print(f"       error: {r['error']}")
        for name, value in r["summary"].get("volumes_ml", {}).items():
            print(f"       {name}: {value:.1f} mL")
        for f in r["summary"].get("findings", []):
            print(f"       {f['name']}: p={f['probability']:.3f}{' POSITIVE' if f['positive'] else ''}")
        for d in r["deliveries"]:
            err = f" ({d['error']})" if d["error"] else ""
            print(f"       -> {d['destination']}: {d['status']} after {d['attempts']} attempt(s){err}")
    return 0


def cmd_worklist(args: argparse.Namespace) -> int:
    rows = _db(args).worklist(args.limit)
    if _json_or_empty(args, rows, "no analysed studies"):
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["received_at"]))
        notes = ", ".join(f"{k} {v}" for k, v in sorted(r["notifications"].items()))
        print(f"{PRIORITY_NAMES.get(r['priority'], '?').upper():8s} {when}  acc={r['accession'] or '-':16s} "
              f"study {r['study_uid']}" + (f"  notifications: {notes}" if notes else ""))
        for j in r["jobs"]:
            summary = j["summary"]
            positives = [f"{f['name']} p={f['probability']:.2f} POSITIVE" for f in summary.get("findings", [])
                         if f["positive"]]
            negatives = [f"{f['name']} p={f['probability']:.2f}" for f in summary.get("findings", [])
                         if not f["positive"]]
            volumes = [f"{k} {v:.0f} mL" for k, v in summary.get("volumes_ml", {}).items()]
            print(f"    {j['model']:16s} {j['modality']:3s} {j['description'][:28]:28s} "
                  + "; ".join(positives + negatives + volumes))
            for line in summary.get("on_result", []):
                print(f"        on_result {line}")
    return 0


def cmd_notifications(args: argparse.Namespace) -> int:
    db = _db(args)
    if args.retry is not None:
        done = db.retry_notification(args.retry)
        message = (f"notification {args.retry} queued again" if done
                   else f"notification {args.retry} is not a failed notification")
        logging.getLogger("node.cli").info("operator retry: %s", message)
        print(message)
        return 0 if done else 1
    rows = db.notifications_report(args.limit)
    if _json_or_empty(args, rows, "no notifications"):
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        p = r["payload"]
        value = (f"p={p['probability']:.3f}" if "probability" in p
                 else f"{p.get('volume_ml', 0):.0f} mL" if "volume_ml" in p else "")
        print(f"#{r['id']:<5} {when}  {r['status']:8s} after {r['attempts']} attempt(s)  "
              f"{PRIORITY_NAMES.get(r['priority'], '?'):8s} {r['subject']} {value}  job {r['job_id']} "
              f"acc={p.get('accession_number') or '-'}")
        if r["error"]:
            print(f"       error: {r['error']}")
    return 0


def cmd_routes_test(args: argparse.Namespace) -> int:
    from node.routing.explain import explain_paths

    config = _config(args.config)
    association = {"CallingAETitle": args.calling_aet, "CalledAETitle": args.called_aet or config.node.ae_title,
                   "CallerAddress": args.address}
    lines = explain_paths(config, [Path(p) for p in args.paths], association)
    print("\n".join(lines))
    return 0 if lines and not lines[0].startswith("no DICOM") else 1


def cmd_routes_log(args: argparse.Namespace) -> int:
    rows = _db(args).routing_report(args.limit)
    if _json_or_empty(args, rows, "no series received"):
        return 0
    for r in reversed(rows):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_received_at"]))
        print(f"{when}  series {r['series_uid']} ({r['modality'] or '?'} {r['description']!r}) from "
              f"{r['calling_aet']} at {r['caller_address'] or '?'}: {r['status']}")
        for route, d in r["routes"].items():
            print(f"    route {route}: " + (d["reason"].replace("matched", "matches", 1) if d["matched"]
                                             else f"does not match: {d['reason']}"))
        for d in r["study_routes"]:
            print(f"    study-level route {d['route']}: {d['state']}: {d['reason']}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    db = _db(args)
    message = db.retry(args.id)
    db.audit(f"operator:{getpass.getuser()}", "retry", f"job {args.id}", outcome=message)
    logging.getLogger("node.cli").info("operator retry: %s", message)
    print(message)
    return 0 if "again" in message else 1


def cmd_audit(args: argparse.Namespace) -> int:
    db = _db(args)
    rows = db.audit_report(args.limit, args.action)
    if _json_or_empty(args, rows, ""):
        return 0
    for r in reversed(rows):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        detail = " ".join(f"{k}={v}" for k, v in r["detail"].items())
        print(f"{when}  {r['actor']:24s} {r['action']:10s} {r['subject']}  {detail}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from node.inference.manifest import discover

    config = _config(args.config)
    packages = discover(config.inference.models_dir)
    if args.action == "list":
        return _models_list(config, packages)
    return _models_check(args, config, packages)


def _models_list(config: Config, packages: dict[str, Path]) -> int:
    from node.inference.manifest import load_manifest

    if not packages:
        print(f"no model packages in {config.inference.models_dir}")
    for name, folder in packages.items():
        routes = [r.name for r in config.routes if name in r.models]
        routed = f"routes: {', '.join(routes)}" if routes else "no route"
        try:
            m = load_manifest(folder)
        except ConfigError as exc:
            print(f"{name:20s} INVALID: {exc}")
            continue
        status = "ok" if m.onnx_path.is_file() else "model.onnx MISSING"
        demo = " DEMONSTRATION" if m.demonstration else ""
        print(f"{name:20s} {m.version:8s} {m.task:14s} {m.input.kind:7s} {status:18s} {routed}{demo}")
    return 0


def _models_check(args: argparse.Namespace, config: Config, packages: dict[str, Path]) -> int:
    import numpy as np

    from node.inference.runtime import ModelRuntime
    from node.inference.manifest import load_manifest
    from node.inference.volume import SeriesVolume

    if args.name not in packages:
        print(f"no model {args.name!r} in {config.inference.models_dir}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    runtime = ModelRuntime(load_manifest(packages[args.name]), config.inference.providers)
    load_s = time.perf_counter() - t
    m = runtime.manifest
    spec = m.input
    if spec.kind == "volume":
        shape = tuple(int(1.5 * p) for p in spec.patch_size) or tuple(int(v) for v in spec.size) or (48, 48, 48)
        spacing = tuple(spec.spacing) or (1.0, 1.0, 1.0)
    else:
        plane = tuple(int(v) for v in spec.size) or (128, 128)
        if spec.kind == "image":                 # a larger, non-square image: resized on the way
            plane = (2 * plane[0], 3 * plane[1] // 2)
        shape = (1 if spec.kind == "image" else max(2, spec.batch_size), *plane)
        spacing = (1.0, 1.0, 1.0)
    pixels = np.random.default_rng(0).normal(0, 100, shape).astype(np.float32)
    volume = SeriesVolume(pixels=pixels, headers=(), spacing=spacing,  # type: ignore[arg-type]
                          modality=(spec.modalities or ("OT",))[0], monochrome1=False,
                          orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
                          positions=tuple((0.0, 0.0, spacing[0] * k) for k in range(shape[0])))
    pred = runtime.run(volume)
    out = pred.masks.shape if pred.masks is not None else pred.scores.shape  # type: ignore[union-attr]
    binding = f", IOBinding on {runtime.bind_device}" if runtime.bind_device else ""
    print(f"{m.name} {m.version}: OK on {runtime.provider}{binding}")
    print(f"  graph: {runtime.graph.describe()}")
    print(f"  loaded and checked in {1000 * load_s:.0f} ms (warm-up run {1000 * runtime.warmup_s:.0f} ms)")
    print(f"  synthetic {spec.kind} input {shape} -> {'masks' if pred.masks is not None else 'scores'} "
          f"{out}: " + ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in pred.timings.items())
          + f", total {1000 * sum(pred.timings.values()):.0f} ms")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from node.demo import run_demo

    return run_demo(slices=args.slices, size=args.size, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ainode", description="DICOM node that runs AI models on incoming studies")
    p.add_argument("--version", action="version", version=f"ainode {__version__}")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", help=f"configuration file (default {DEFAULT_CONFIG} if present)")
        return sp

    with_config(sub.add_parser("serve", help="run the node until Ctrl-C / SIGTERM")).set_defaults(func=cmd_serve)
    with_config(sub.add_parser("reload", help="make the running node read its configuration again (SIGHUP)")
                ).set_defaults(func=cmd_reload)
    d = sub.add_parser("demo", help="self-contained tour on loopback")
    d.add_argument("--slices", type=int, default=64)
    d.add_argument("--size", type=int, default=256)
    d.add_argument("--keep", action="store_true", help="keep the temporary folder")
    d.set_defaults(func=cmd_demo)
    for name, helptext in (("echo", "C-ECHO a peer"), ("send", "C-STORE files or folders to a peer")):
        sp = sub.add_parser(name, help=helptext)
        if name == "send":
            sp.add_argument("paths", nargs="+")
            sp.add_argument("--to", required=True, metavar="AE@HOST:PORT")
        else:
            sp.add_argument("peer", metavar="AE@HOST:PORT")
        sp.add_argument("--aet", default="AINODE", help="our calling AE title")
        sp.add_argument("--timeout", type=float, default=30.0)
        sp.set_defaults(func=cmd_echo if name == "echo" else cmd_send)
    s = with_config(sub.add_parser("status", help="counts of instances, series, jobs, deliveries"))
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)
    j = with_config(sub.add_parser("jobs", help="recent jobs with results and deliveries"))
    j.add_argument("--limit", type=int, default=20)
    j.add_argument("--json", action="store_true")
    j.set_defaults(func=cmd_jobs)
    w = with_config(sub.add_parser("worklist", help="analysed studies, most urgent first, with findings"))
    w.add_argument("--limit", type=int, default=50)
    w.add_argument("--json", action="store_true")
    w.set_defaults(func=cmd_worklist)
    n = with_config(sub.add_parser("notifications", help="notifications of positive findings and their state"))
    n.add_argument("--limit", type=int, default=50)
    n.add_argument("--json", action="store_true")
    n.add_argument("--retry", type=int, metavar="ID", help="post a failed notification again")
    n.set_defaults(func=cmd_notifications)
    rt = sub.add_parser("routes", help="check routing rules against files")
    rtsub = rt.add_subparsers(dest="action", required=True)
    rtt = with_config(rtsub.add_parser("test", help="which routes match the series in files or folders, and why not"))
    rtt.add_argument("paths", nargs="+")
    rtt.add_argument("--calling-aet", default="", help="the CallingAETitle to assume (default: none)")
    rtt.add_argument("--called-aet", default="", help="the CalledAETitle to assume (default: our AE title)")
    rtt.add_argument("--address", default="", help="the CallerAddress to assume (default: none)")
    rtt.set_defaults(func=cmd_routes_test)
    rtl = with_config(rtsub.add_parser("log", help="recently received series and why each route matched or not"))
    rtl.add_argument("--limit", type=int, default=20)
    rtl.add_argument("--json", action="store_true")
    rtl.set_defaults(func=cmd_routes_log)
    r = with_config(sub.add_parser("retry", help="queue a failed job, or a done job's deliveries, again"))
    r.add_argument("id", type=int)
    r.set_defaults(func=cmd_retry)
    a = with_config(sub.add_parser("audit", help="who sent what, which model made which result, who retried"))
    a.add_argument("--limit", type=int, default=100)
    a.add_argument("--action", help="only this action (received, result, delivered, retry, purged)")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_audit)
    m = sub.add_parser("models", help="list or check model packages")
    msub = m.add_subparsers(dest="action", required=True)
    with_config(msub.add_parser("list")).set_defaults(func=cmd_models)
    mc = with_config(msub.add_parser("check"))
    mc.add_argument("name")
    mc.set_defaults(func=cmd_models)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, ValueError) as exc:
        print(f"ainode: {exc}", file=sys.stderr)
        return 2
    except NodeError as exc:
        print(f"ainode: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
