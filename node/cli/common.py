"""What every command shares: the configuration file, logging, the database of a node."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from node.config.schema import Config, load_config
from node.errors import NodeError, first_line

DEFAULT_CONFIG = Path("config/node.toml")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stderr)
    for noisy in ("pynetdicom", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom logs each of its warnings and also raises it as a Python warning: the log copy
    # goes (below ERROR), the warning is shown once through logging.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # Each pixel decoder that fails logs its traceback; the job's one line says why instead.
    logging.getLogger("pydicom.pixels.decoders.base").setLevel(logging.CRITICAL)
    # A library warning (pydicom's about a header value, say) is said once, not once per
    # file or instance: pydicom both logs it and raises it as a Python warning.
    warnings.simplefilter("once")
    logging.captureWarnings(True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(OncePerMessage())


class OncePerMessage(logging.Filter):
    """Let each distinct library warning through once (pydicom's, and Python warnings)."""

    LIBRARIES = ("pydicom", "py.warnings", "highdicom")
    MAX_REMEMBERED = 1000

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(self.LIBRARIES) or record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        if message in self._seen:
            return False
        if len(self._seen) >= self.MAX_REMEMBERED:
            self._seen.clear()
        self._seen.add(message)
        return True


def config_path(path: str | None) -> Path | None:
    if path:
        return Path(path)
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load(path: str | None) -> Config:
    return load_config(config_path(path))


def open_db(args: argparse.Namespace) -> Any:
    """The database of the node that ``--config`` names.

    Raises:
        NodeError: no node has run with that ``data_dir`` (its SQLite file does not exist),
            or the database server cannot be reached.
    """
    from sqlalchemy.exc import SQLAlchemyError

    from node.storage.db import Database

    config = load(args.config)
    url = config.node.effective_database_url
    if not config.node.database_url and not (config.node.data_dir / "node.db").is_file():
        raise NodeError(f"no node has run with data_dir {config.node.data_dir}"
                        f"{'' if args.config else ' (no --config given and no ' + str(DEFAULT_CONFIG) + ' here)'}")
    try:
        db = Database(url, root=config.node.data_dir)
        db.create()
    except SQLAlchemyError as exc:
        raise NodeError(f"cannot open the database {config.node.database_url or url}: {first_line(exc)}") from None
    return db


def json_or_empty(args: argparse.Namespace, rows: list, empty: str) -> bool:
    """Print ``rows`` as JSON when ``--json`` asks for it (True: nothing more to print);
    otherwise say ``empty`` when there are no rows."""
    if args.json:
        print(json.dumps(rows, indent=2))
        return True
    if not rows and empty:
        print(empty)
    return False
