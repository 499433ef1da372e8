"""The ``ainode`` command line: the parser and ``main``; the commands are in :mod:`.serve`
(serve, reload), :mod:`.queue` (status, jobs, worklist, notifications, routes log, retry,
audit) and :mod:`.tools` (echo, send, routes test, models, demo)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from node import __version__
from node.cli.common import DEFAULT_CONFIG, setup_logging
from node.cli.queue import (cmd_audit, cmd_jobs, cmd_mpps, cmd_notifications, cmd_retry, cmd_routes_log,
                            cmd_status, cmd_worklist)
from node.cli.serve import cmd_reload, cmd_serve
from node.cli.tools import cmd_demo, cmd_echo, cmd_models, cmd_routes_test, cmd_send
from node.errors import ConfigError, NodeError


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
    def listing(parent, name: str, helptext: str, func, limit: int | None) -> argparse.ArgumentParser:
        """A report command: ``--config``, ``--json`` and (with a default) ``--limit N``."""
        sp = with_config(parent.add_parser(name, help=helptext))
        if limit is not None:
            sp.add_argument("--limit", type=int, default=limit)
        sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=func)
        return sp

    listing(sub, "status", "counts of instances, series, jobs, deliveries", cmd_status, None)
    listing(sub, "jobs", "recent jobs with results and deliveries", cmd_jobs, 20)
    listing(sub, "worklist", "analysed studies, most urgent first, with findings", cmd_worklist, 50)
    n = listing(sub, "notifications", "notifications of positive findings and their state", cmd_notifications, 50)
    n.add_argument("--retry", type=int, metavar="ID", help="post a failed notification again")
    rt = sub.add_parser("routes", help="check routing rules against files")
    rtsub = rt.add_subparsers(dest="action", required=True)
    rtt = with_config(rtsub.add_parser("test", help="which routes match the series in files or folders, and why not"))
    rtt.add_argument("paths", nargs="+")
    rtt.add_argument("--calling-aet", default="", help="the CallingAETitle to assume (default: none)")
    rtt.add_argument("--called-aet", default="", help="the CalledAETitle to assume (default: our AE title)")
    rtt.add_argument("--address", default="", help="the CallerAddress to assume (default: none)")
    rtt.set_defaults(func=cmd_routes_test)
    listing(rtsub, "log", "recently received series and why each route matched or not", cmd_routes_log, 20)
    r = with_config(sub.add_parser("retry", help="queue a failed job, or a done job's deliveries, again"))
    r.add_argument("id", type=int)
    r.set_defaults(func=cmd_retry)
    a = listing(sub, "audit", "who sent what, which model made which result, who retried", cmd_audit, 100)
    a.add_argument("--action", help="only this action (received, result, delivered, retry, purged)")
    listing(sub, "mpps", "Modality Performed Procedure Steps received, and what they wait for", cmd_mpps, 50)
    m = sub.add_parser("models", help="list or check model packages")
    msub = m.add_subparsers(dest="action", required=True)
    with_config(msub.add_parser("list")).set_defaults(func=cmd_models)
    mc = with_config(msub.add_parser("check"))
    mc.add_argument("name")
    mc.set_defaults(func=cmd_models)
    with_config(msub.add_parser("build", help="build the shipped reference models (deterministic)")
                ).set_defaults(func=cmd_models)
    _log_level_everywhere(p)
    return p


def _log_level_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``--log-level`` after the subcommand too (``ainode serve --log-level DEBUG``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                sub.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
                _log_level_everywhere(sub)


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
    except BrokenPipeError:          # `ainode status | head`: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0

