"""Files under ``data_dir``: received images and produced results.

Paths are built only from UIDs that passed :func:`valid_uid` (digits and dots), never from
free header text, so a crafted header cannot escape the storage folder. Every file is written
to a temporary name in the same folder tree and renamed into place, so a reader never sees a
half-written file and a crash leaves at most a stray ``*.part`` in ``tmp/``.

Durable means power-loss durable: the file is fsynced, renamed, and its folder fsynced (a
new folder's parent too) before :meth:`FileStore.write_atomic` returns. Files hold patient
data and are private to the node whatever the caller's umask: files 0640, folders 0750.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import threading
from glob import escape as glob_escape
from pathlib import Path
from typing import BinaryIO

from node.errors import NodeError

FILE_MODE = 0o640
FOLDER_MODE = 0o750
_MADE_MAX = 10_000
_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def valid_uid(uid: str) -> bool:
    """True for a syntactically valid DICOM UID (PS3.5 9.1): digits and dots, <= 64 chars."""
    return 0 < len(uid) <= 64 and _UID.match(uid) is not None


class FileStore:
    """Atomic, UID-named files under one root folder."""

    def __init__(self, root: Path, fsync: bool = True, owner: str = "node") -> None:
        self.root = root.resolve()
        self.fsync = fsync
        # Temporary files carry the node's name: on a data_dir shared by several nodes, each
        # cleans up only what it left itself.
        self.owner = safe_name(owner)
        self.images = self.root / "images"
        self.results = self.root / "results"
        self.tmp = self.root / "tmp"
        for folder in (self.root, self.images, self.results, self.tmp):
            folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
            os.chmod(folder, FOLDER_MODE)
        self._made: set[Path] = set()
        self._lock = threading.Lock()
        self._counter = 0

    def image_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Where an instance lives. The UIDs must have been checked with :func:`valid_uid`."""
        return self.images / study_uid / series_uid / f"{sop_uid}.dcm"

    def result_dir(self, job_id: int) -> Path:
        return self.results / f"job-{int(job_id)}"

    def part_path(self) -> Path:
        """A new temporary file name under ``tmp`` (named by this node: removed at its start)."""
        with self._lock:
            self._counter += 1
            return self.tmp / f"{self.owner}.{os.getpid()}-{threading.get_ident()}-{self._counter}.part"

    def open_part(self) -> tuple[Path, BinaryIO]:
        """Create a new temporary file (0640) for writing; the caller commits or removes it."""
        path = self.part_path()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
        return path, open(fd, "wb", closefd=True)

    def commit_file(self, part: Path, path: Path, synced: bool = False) -> int:
        """Make a complete temporary file (from :meth:`open_part`, closed) durable at ``path``:
        fsync (unless the caller did, ``synced``), rename, fsync of the folder; returns its size."""
        folder = path.parent
        if folder not in self._made:
            self._make_folders(folder)
        if self.fsync and not synced:
            fd = os.open(part, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        size = part.stat().st_size
        os.replace(part, path)
        if self.fsync:
            fsync_folder(folder)
        return size

    def write_atomic(self, path: Path, chunks: list[bytes] | tuple[bytes, ...]) -> int:
        """Write ``chunks`` to ``path`` via a temporary file and a rename; returns the size."""
        folder = path.parent
        if folder not in self._made:
            self._make_folders(folder)
        tmp = self.part_path()
        size = 0
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)
            with open(fd, "wb", closefd=True) as fh:   # 0640 at most: a umask only takes bits away
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
        if self.fsync:
            fsync_folder(folder)
        return size

    def _make_folders(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents (0750), each made durable in its parent."""
        missing = []
        at = folder
        while not at.is_dir():
            missing.append(at)
            at = at.parent
        for new in reversed(missing):
            try:
                new.mkdir(mode=FOLDER_MODE)
            except FileExistsError:
                pass
            os.chmod(new, FOLDER_MODE)
            if self.fsync:
                fsync_folder(new.parent)
        if len(self._made) > _MADE_MAX:         # only spares a stat per instance
            self._made.clear()
        self._made.add(folder)

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
        """Remove the temporary files this node left at a crash (never another node's that
        shares the data_dir); returns how many."""
        n = 0
        for part in self.tmp.glob(f"{glob_escape(self.owner)}.*.part"):
            part.unlink(missing_ok=True)
            n += 1
        return n


def fsync_folder(folder: Path) -> None:
    """Make the entries of ``folder`` (a rename into it, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def node_dir(data_dir: Path, name: str) -> Path:
    """``data_dir/nodes/<name>``: what belongs to one node on a data_dir that several share
    (its pid file, its status, the outcome of its last reload)."""
    folder = data_dir / "nodes" / safe_name(name)
    folder.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
    return folder


class DataDirLock:
    """One live node per name on a ``data_dir``: an exclusive lock on ``nodes/<name>.lock``
    (``flock``: released by the kernel when the process dies, however it dies)."""

    def __init__(self, data_dir: Path, name: str) -> None:
        self.path = data_dir / "nodes" / f"{safe_name(name)}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Raises:
            NodeError: another live node holds the lock (its pid is named)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=FOLDER_MODE)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise NodeError(f"another node named {self.path.stem!r} is running with data_dir "
                            f"{self.path.parent.parent} (pid {holder}); give each node its own node.name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)          # closing drops the lock
            self._fd = None


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "node"
