"""Ingest against a full disk, lying peers and power cuts: every case answered with a status,
nothing half-stored, files and rows one to one, acknowledgements only after the data is
durable, patient data private."""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import encode

from conftest import free_port
from node.synthetic.ct import make_ct_series
from nodeproc import REPO, NodeProcess, write_config

SC = "1.2.840.10008.5.1.4.1.1.7"        # Secondary Capture


def _dataset(sop_uid: str, series_uid: str = "1.2.826.0.1.3680043.10.9.3", pixels: int = 0) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SC
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.9.2"
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "OT"
    ds.PatientID = "HARDENING"
    if pixels:
        ds.Columns = 512
        ds.Rows = pixels // 2 // 512
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.PixelData = b"\x01\x00" * (pixels // 2)
    return ds


class Scu:
    """One association; C-STORE data sets or raw bytes on an Explicit or Implicit VR context."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="HARDENING")
        ae.add_requested_context(SC, ExplicitVRLittleEndian)
        ae.add_requested_context(SC, ImplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        self.assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert self.assoc.is_established

    def store(self, ds: Dataset) -> int | None:
        status = self.assoc.send_c_store(ds)
        return int(status.Status) if status else None

    def release(self) -> None:
        if self.assoc.is_established:
            self.assoc.release()


def _node(tmp_path: Path, data_dir: Path, http: bool = True, **ingest) -> NodeProcess:
    port = free_port()
    sections = {"node": {"host": "127.0.0.1", "port": port, "data_dir": str(data_dir)},
                "ingest": {"series_timeout_s": 3600, **ingest}}
    if not http:
        sections["http"] = {"enabled": False}
    config = write_config(tmp_path / "node.toml", sections)
    return NodeProcess(config=config, port=port, data_dir=data_dir, log=tmp_path / "node.log")


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a real file system that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_while_writing_answers_out_of_resources(small_disk, tmp_path):
    node = _node(tmp_path, small_disk / "data", min_free_disk_mb=0).start()
    try:
        scu = Scu(node.port)
        statuses = [scu.store(_dataset(f"1.2.826.0.1.3680043.10.9.10.{k}", pixels=1024 * 1024)) for k in range(8)]
        scu.release()
        assert statuses[0] == 0x0000
        assert 0xA700 in statuses and 0x0110 not in statuses, statuses
        assert not list((small_disk / "data" / "tmp").glob("*.part")), "temporary files left behind"
        log = node.log_text()
        assert "cannot write the file: No space left on device" in log, log
        assert "Traceback" not in log
        rows = sqlite3.connect(small_disk / "data" / "node.db").execute("select path from instances").fetchall()
        assert len(rows) == statuses.count(0x0000)
        for (path,) in rows:                         # every recorded file is whole (paths relative to data_dir)
            assert len(pydicom.dcmread(small_disk / "data" / path).PixelData) == 1024 * 1024
        assert node.echo()                           # and the node serves on
    finally:
        node.stop()


def test_instance_larger_than_the_space_above_the_floor_is_refused_before_writing(small_disk, tmp_path):
    node = _node(tmp_path, small_disk / "data", min_free_disk_mb=3).start()
    try:
        scu = Scu(node.port)
        small = scu.store(_dataset("1.2.826.0.1.3680043.10.9.20.1", pixels=100_000))
        large = scu.store(_dataset("1.2.826.0.1.3680043.10.9.20.2", pixels=3 * 1024 * 1024))
        scu.release()
        assert (small, large) == (0x0000, 0xA700)
        assert "free disk below min_free_disk_mb=3 with the" in node.log_text()
        assert not list((small_disk / "data" / "tmp").glob("*.part"))
    finally:
        node.stop()


def test_uid_longer_than_64_in_the_command_set_gets_a_status_not_an_abort(tmp_path):
    node = _node(tmp_path, tmp_path / "data", min_free_disk_mb=0).start()
    validator = pynetdicom_config.VALIDATORS["UI"]
    pynetdicom_config.VALIDATORS["UI"] = lambda value: (True, "")   # our SCU sends what it is given
    try:
        scu = Scu(node.port)
        long_uid = "1.2.826.0.1.3680043.10.9.30." + "1" * 60
        assert scu.store(_dataset(long_uid)) == 0xC000
        assert scu.assoc.is_established                      # no A-ABORT
        assert scu.store(_dataset("1.2.826.0.1.3680043.10.9.30.2")) == 0x0000
        scu.release()
        assert "AffectedSOPInstanceUID '1.2.826.0.1.3680043.10.9.30.111" in node.log_text()
    finally:
        pynetdicom_config.VALIDATORS["UI"] = validator
        node.stop()


def test_data_set_encoded_against_the_negotiated_syntax_is_refused(tmp_path):
    node = _node(tmp_path, tmp_path / "data", min_free_disk_mb=0).start()
    try:
        scu = Scu(node.port)
        contexts = {cx.transfer_syntax[0]: cx.context_id for cx in scu.assoc.accepted_contexts}
        implicit_bytes = encode(_dataset("1.2.826.0.1.3680043.10.9.40.1"), True, True)
        explicit_bytes = encode(_dataset("1.2.826.0.1.3680043.10.9.40.2"), False, True)
        assert _send_raw(scu, contexts[ExplicitVRLittleEndian], "1.2.826.0.1.3680043.10.9.40.1",
                         implicit_bytes) == 0xC000
        assert _send_raw(scu, contexts[ImplicitVRLittleEndian], "1.2.826.0.1.3680043.10.9.40.2",
                         explicit_bytes) == 0xC000
        scu.release()
        log = node.log_text()
        assert "data set is encoded in implicit VR, but the presentation context's transfer syntax is " \
               "Explicit VR Little Endian" in log
        assert "data set is encoded in explicit VR, but the presentation context's transfer syntax is " \
               "Implicit VR Little Endian" in log
        assert not list((tmp_path / "data" / "images").rglob("*.dcm"))
    finally:
        node.stop()


def _send_raw(scu: Scu, context_id: int, sop_uid: str, payload: bytes) -> int | None:
    """C-STORE ``payload`` as it is on ``context_id`` (pynetdicom would re-encode a data set)."""
    from io import BytesIO

    from pynetdicom.dimse_primitives import C_STORE

    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = SC
    req.AffectedSOPInstanceUID = sop_uid
    req.Priority = 2
    req.DataSet = BytesIO(payload)
    assoc = scu.assoc
    assoc._reactor_checkpoint.clear()           # as send_c_store does: the response is ours
    while not assoc._is_paused:
        pass
    try:
        assoc.dimse.send_msg(req, context_id)
        _, rsp = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return int(rsp.Status) if rsp is not None else None


def test_sop_instance_resent_in_another_series_keeps_files_and_rows_one_to_one(tmp_path):
    node = _node(tmp_path, tmp_path / "data", min_free_disk_mb=0).start()
    try:
        scu = Scu(node.port)
        for k in range(5):
            assert scu.store(_dataset(f"1.2.826.0.1.3680043.10.9.50.{k}", "1.2.826.0.1.3680043.10.9.51")) == 0
        for k in range(3):                      # the same three SOP Instance UIDs, now in another series
            assert scu.store(_dataset(f"1.2.826.0.1.3680043.10.9.50.{k}", "1.2.826.0.1.3680043.10.9.52")) == 0
        scu.release()
        rows = sqlite3.connect(tmp_path / "data" / "node.db").execute("select path from instances").fetchall()
        files = sorted(str(p) for p in (tmp_path / "data" / "images").rglob("*.dcm"))
        assert sorted(str(tmp_path / "data" / path) for (path,) in rows) == files and len(files) == 5
    finally:
        node.stop()


def test_files_and_database_are_private_whatever_the_umask(tmp_path):
    data = tmp_path / "data"
    node = _node(tmp_path, data, min_free_disk_mb=0)
    old = os.umask(0)                            # the caller's umask is as open as it gets
    try:
        node.start()
    finally:
        os.umask(old)
    try:
        scu = Scu(node.port)
        assert scu.store(_dataset("1.2.826.0.1.3680043.10.9.60.1")) == 0
        scu.release()
    finally:
        node.stop()
    modes = {p: stat.S_IMODE(p.stat().st_mode) for p in [data, *data.rglob("*")]}
    for path, mode in modes.items():
        if path.is_dir():
            assert mode == 0o750, (path, oct(mode))
        elif path.name.startswith("node.db"):
            assert mode == 0o600, (path, oct(mode))
        else:
            assert mode & 0o027 == 0, (path, oct(mode))      # no write for the group, nothing for others
    assert any(p.suffix == ".dcm" and modes[p] == 0o640 for p in modes)


def test_success_is_answered_only_after_file_rename_folder_and_database_are_durable(dcmtk, tmp_path):
    """strace the node during one C-STORE: fsync(file), rename, fsync(folder), fsync(WAL) all
    come before the response goes out on the socket."""
    data = tmp_path / "data"
    node = _node(tmp_path, data, http=False, min_free_disk_mb=0)
    trace = tmp_path / "strace.txt"
    port = node.port
    proc = subprocess.Popen(
        ["strace", "-f", "-yy", "-qq", "-s", "4", "-o", str(trace),
         "-e", "trace=fsync,fdatasync,rename,renameat,renameat2,sendto,write,sendmsg,connect",
         sys.executable, "-m", "node.cli", "serve", "--config", str(node.config)],
        cwd=str(REPO), stdout=node.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    node.process = proc
    try:
        deadline_ok = _wait_echo(node)
        assert deadline_ok, node.log_text()
        phantom = make_ct_series(tmp_path / "ct", slices=1, size=16)
        mark = trace.stat().st_size
        dcmtk.run("storescu", "-aec", "AINODE", "127.0.0.1", str(port), str(phantom.files[0]))
    finally:
        _stop_traced(node, data)
    raw = trace.read_bytes()
    everything = raw.decode(errors="replace")
    lines = raw[mark:].decode(errors="replace").splitlines()
    # and the node talked to nobody but its peers on loopback (no DNS, no telemetry)
    outside = [ln for ln in everything.splitlines() if re.search(r"connect\(.*AF_INET6?", ln)
               and not re.search(r"127\.0\.0\.1|::1|inet_addr\(\"0\.0\.0\.0", ln)]
    assert not outside, outside[:5]
    sop = pydicom.dcmread(phantom.files[0], stop_before_pixels=True).SOPInstanceUID
    final = f"{sop}.dcm"

    def first(pattern: str, after: int = -1) -> int:
        for k, line in enumerate(lines):
            if k > after and re.search(pattern, line):
                return k
        raise AssertionError(f"no system call matching {pattern!r} after line {after}:\n" + "\n".join(lines[:200]))

    rename = first(r"rename(at2?)?\(.*\.part.*" + re.escape(final))
    file_sync = max(k for k, line in enumerate(lines[:rename]) if re.search(r"f(data)?sync\(\d+<.*\.part>", line))
    folder_sync = first(r"fsync\(\d+<" + re.escape(str(data / "images")) + r"/[0-9.]+/[0-9.]+>", rename)
    wal_sync = first(r"f(data)?sync\(\d+<.*node\.db-wal>", rename)
    # The C-STORE response is the first P-DATA-TF PDU (type 0x04) the node sends on the socket.
    response = first(r"(sendto|write|sendmsg)\(\d+<TCP(v6)?:\[.*:" + str(port) + r"->.*\]>, \"\\4")
    assert file_sync < rename < folder_sync < response
    assert rename < wal_sync < response


def _stop_traced(node: NodeProcess, data: Path) -> None:
    """SIGTERM the node itself (strace, when signalled, would detach and leave it running)."""
    import signal
    try:
        os.kill(int(next(data.glob("nodes/*/ainode.pid")).read_text()), signal.SIGTERM)
    except (OSError, ValueError, StopIteration):
        pass
    try:
        node.process.wait(60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(node.process.pid, signal.SIGKILL)   # strace and whatever it still holds
    except OSError:
        pass
    node.process.wait()


def _wait_echo(node: NodeProcess, timeout: float = 180.0) -> bool:
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            return False
        if node.echo():
            return True
        time.sleep(0.2)
    return False


def test_start_up_clean_up_removes_only_this_nodes_temporary_files(tmp_path):
    """Two nodes on one data_dir: a node that restarts removes its own half-written files,
    never the file another node is writing at that moment."""
    from node.storage.files import FileStore

    mine, other = FileStore(tmp_path, owner="ct-worker-1"), FileStore(tmp_path, owner="ct-worker-2")
    for store in (mine, other):
        (store.tmp / f"{store.owner}.123-456-1.part").write_bytes(b"half")
    assert mine.clean_tmp() == 1
    assert [p.name for p in (tmp_path / "tmp").iterdir()] == ["ct-worker-2.123-456-1.part"]
    mine.write_atomic(tmp_path / "images" / "x.dcm", (b"data",))
    assert (tmp_path / "images" / "x.dcm").read_bytes() == b"data"
