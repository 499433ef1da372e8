"""The commands that read and act on a node's queue: status, jobs, worklist, notifications,
routes log, retry, audit. They call the same report functions as the HTTP face."""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import time

from node.cli.common import json_or_empty, load, open_db
from node.config.schema import PRIORITY_NAMES
from node.worker import node_status


def cmd_status(args: argparse.Namespace) -> int:
    config = load(args.config)
    db = open_db(args)
    counts = db.counts()
    node = node_status(config)
    nodes = db.nodes_report(config.node.stall_timeout_s)
    if args.json:
        print(json.dumps({"node": node, **counts, "nodes": nodes}, indent=2))
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
    for n in nodes:
        state = f"alive, heartbeat {n['heartbeat_age_s']:.0f} s ago" if n["alive"] else \
            ("stopped" if n["doing"] == "stopped" else f"NO HEARTBEAT for {n['heartbeat_age_s']:.0f} s")
        where = f" {n['listener']}" if n["listener"] else ""
        models = f"; models {', '.join(n['models'])}" if n["models"] else ""
        print(f"{'nodes:' if n is nodes[0] else '':11s} {n['name']} ({n['role']}) on {n['host']}, pid {n['pid']}:"
              f" {state}; {n['doing']}{where}{models}")
    for name in ("instances", "series", "jobs", "deliveries", "notifications", "mpps"):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.get(name, {}).items())) or "none"
        print(f"{name:13s} {parts}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    db = open_db(args)
    rows = db.jobs_report(args.limit)
    if json_or_empty(args, rows, "no jobs"):
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["created_at"]))
        print(f"#{r['id']:<5} {when}  {r['status']:8s} {PRIORITY_NAMES.get(r['priority'], '?'):8s} {r['model']:16s} "
              f"{r['modality']:3s} {r['description'][:30]:30s} acc={r['accession']}"
              + (f" on {r['worker']}" if r.get("worker") else ""))
        if r["error"]:
            print(f"       error: {r['error']}")
        for name, value in r["summary"].get("volumes_ml", {}).items():
            print(f"       {name}: {value:.1f} mL")
        for f in r["summary"].get("findings", []):
            print(f"       {f['name']}: p={f['probability']:.3f}{' POSITIVE' if f['positive'] else ''}")
        if r["summary"].get("supersedes"):
            print(f"       supersedes {len(r['summary']['supersedes'])} earlier result objects (its input changed): "
                  + ", ".join(o["modality"] + " " + o["sop_instance_uid"] for o in r["summary"]["supersedes"]))
        for d in r["deliveries"]:
            err = f" ({d['error']})" if d["error"] else ""
            print(f"       -> {d['destination']}: {d['status']} after {d['attempts']} attempt(s){err}")
    return 0


def cmd_worklist(args: argparse.Namespace) -> int:
    rows = open_db(args).worklist(args.limit)
    if json_or_empty(args, rows, "no analysed studies"):
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
    db = open_db(args)
    if args.retry is not None:
        done = db.retry_notification(args.retry)
        message = (f"notification {args.retry} queued again" if done
                   else f"notification {args.retry} is not a failed notification")
        logging.getLogger("node.cli").info("operator retry: %s", message)
        print(message)
        return 0 if done else 1
    rows = db.notifications_report(args.limit)
    if json_or_empty(args, rows, "no notifications"):
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


def cmd_routes_log(args: argparse.Namespace) -> int:
    rows = open_db(args).routing_report(args.limit)
    if json_or_empty(args, rows, "no series received"):
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
    db = open_db(args)
    message = db.retry(args.id)
    db.audit(f"operator:{getpass.getuser()}", "retry", f"job {args.id}", outcome=message)
    logging.getLogger("node.cli").info("operator retry: %s", message)
    print(message)
    return 0 if "again" in message else 1


def cmd_audit(args: argparse.Namespace) -> int:
    db = open_db(args)
    rows = db.audit_report(args.limit, args.action)
    if json_or_empty(args, rows, ""):
        return 0
    for r in reversed(rows):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["at"]))
        detail = " ".join(f"{k}={v}" for k, v in r["detail"].items())
        print(f"{when}  {r['actor']:24s} {r['action']:10s} {r['subject']}  {detail}")
    return 0


def cmd_mpps(args: argparse.Namespace) -> int:
    rows = open_db(args).mpps_report(args.limit)
    if json_or_empty(args, rows, "no MPPS received"):
        return 0
    for r in rows:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["updated_at"]))
        series = ", ".join(f"{uid} ({n} instances)" for uid, n in r["series"].items()) or "no series yet"
        print(f"{when}  {r['status']:12s} {r['uid']} from {r['calling_aet']}: {series}")
        if r["waiting"]:
            print(f"    {r['waiting']}")
    return 0
