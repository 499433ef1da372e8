"""Files under ``data_dir``: received images and produced results.

Paths are built only from UIDs that passed :func:`valid_uid` (digits and dots), never from
free header text, so a crafted header cannot escape the storage folder. Every file is written
to a temporary name in the same folder tree and renamed into place, so a reader never sees a
half-written file and a crash leaves at most a stray ``*.part`` in ``tmp/``.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1): digits and dots, <= 64 chars."""
    return 0 < len(uid) <= 64 and _UID.match(uid) is not None


class FileStore:
    """Atomic, UID-named files under one root folder."""

    def __init__(self, root: Path, fsync: bool = True) -> None:
        self.root = root.resolve()
        self.fsync = fsync
        self.images = self.root / "images"
        self.results = self.root / "results"
        self.tmp = self.root / "tmp"
        for folder in (self.images, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        self._made: set[Path] = set()
        self._lock = threading.Lock()
        self._counter = 0

    def image_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives. The UIDs must have been checked with :func:`valid_uid`."""
        return self.images / study_uid / series_uid / f"{sop_uid}.dcm"

    def result_dir(self, job_id: int) -> Path:
        return self.results / f"job-{int(job_id)}"

    def write_atomic(self, path: Path, chunks: list[bytes] | tuple[bytes, ...]) -> int:
        """Write ``chunks`` to ``path`` via a temporary file and a rename; returns the size."""
        folder = path.parent
        if folder not in self._made:
            folder.mkdir(parents=True, exist_ok=True)
            self._made.add(folder)
        with self._lock:
            self._counter += 1
            tmp = self.tmp / f"{os.getpid()}-{threading.get_ident()}-{self._counter}.part"
        size = 0
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    size += len(chunk)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return size

    def remove(self, paths: list[str]) -> int:
        """Delete files that lie under the store's root; returns how many were removed."""
        n = 0
        for name in paths:
            path = Path(name)
            if path.resolve().is_relative_to(self.root) and path.is_file():
                path.unlink()
                n += 1
        return n

    def free_mb(self) -> float:
        return shutil.disk_usage(self.root).free / 1048576

    def clean_tmp(self) -> int:
        """Remove temporary files left by a crash; returns how many."""
        n = 0
        for part in self.tmp.glob("*.part"):
            part.unlink(missing_ok=True)
            n += 1
        return n
