"""Paths as the database keeps them: relative to ``data_dir``, which every node of a cluster
mounts (perhaps at another place), so that any worker finds any file.

A path outside ``data_dir``, or one recorded by an older node as absolute, is kept as it is
(joining an absolute path to the root gives that path back).
"""

from __future__ import annotations

import os
from pathlib import Path


class DataPaths:
    """Mixed into :class:`node.storage.db.Database`; ``root`` is ``data_dir`` (None: keep
    paths as given, for tools and tests that open the database alone)."""

    root: Path | None

    def to_db(self, path: str | os.PathLike[str]) -> str:
        p = Path(path)
        if self.root is not None and p.is_absolute() and p.is_relative_to(self.root):
            return str(p.relative_to(self.root))
        return str(p)

    def from_db(self, path: str) -> str:
        if self.root is None or not path or os.path.isabs(path):
            return path
        return str(self.root / path)
