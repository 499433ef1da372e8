"""What a broken or hostile peer can make the listener do: bounded memory, bounded waits,
no lock-out of other senders, one WARNING line per connection."""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import CTImageStorage, Verification

from conftest import free_port
from node.config.schema import parse_config
from node.dicom.receive import LeanAssociation
from node.synthetic.ct import make_ct_series
from node.worker import Node
from nodeproc import NodeProcess, wait_for, write_config
from tlscerts import make_ca

ASSOCIATION_TIMEOUT_S = 2.0
BOUND_S = 60.0          # generous bound for anything the node must do "soon"


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _closed_by_peer(sock: socket.socket) -> bool:
    """True once the node closed ``sock`` (EOF or reset); False while it is open."""
    sock.setblocking(False)
    try:
        data = sock.recv(65536, socket.MSG_PEEK)
        if data:                      # an A-ABORT or similar is waiting: read past it
            sock.recv(65536)
            return False
        return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _echo(port: int, ssl_context: ssl.SSLContext | None = None) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.connection_timeout = ae.network_timeout = 20
    tls = (ssl_context, "localhost") if ssl_context else None
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE", tls_args=tls)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    port = free_port()
    config = write_config(tmp / "node.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp / "data")},
        "ingest": {"min_free_disk_mb": 0, "association_timeout_s": ASSOCIATION_TIMEOUT_S,
                   "max_associations_per_address": 4},
    })
    proc = NodeProcess(config=config, port=port, data_dir=tmp / "data", log=tmp / "node.log").start()
    yield proc
    proc.stop()


def test_pdu_claiming_4_gb_is_aborted_without_allocating(node):
    idle = _rss_mb(node.process.pid)
    socks = []
    for k in range(16):                    # from 16 loopback addresses: no per-address limit applies
        sock = _connect(node.port, f"127.0.1.{k + 1}")
        sock.sendall(bytes([0x01, 0x00, 0xFF, 0xFF, 0xFF, 0xFF]))
        socks.append(sock)
    for sock in socks:
        wait_for(lambda: _closed_by_peer(sock), "the node to close an oversized PDU's connection")
    peak = _rss_mb(node.process.pid)
    assert peak - idle < 100, (idle, peak)
    assert node.log_text().count("PDU of 4294967295 bytes exceeds the limit of 262144 bytes") == 16
    assert _echo(node.port)


def test_empty_and_trickling_connections_lock_nobody_out(node):
    empty = [_connect(node.port, "127.0.2.1") for _ in range(16)]
    for sock in empty:
        sock.close()
    trickle = [_connect(node.port, f"127.0.3.{k + 1}") for k in range(8)]
    for sock in trickle:
        sock.sendall(b"\x01")
    assert _echo(node.port)                # at once, not after a timeout
    # One byte every 0.3 s does not keep a connection: it is dropped at the A-ASSOCIATE-RQ deadline.
    deadline = time.monotonic() + BOUND_S
    open_ = list(trickle)
    while open_ and time.monotonic() < deadline:
        for sock in list(open_):
            if _closed_by_peer(sock):
                open_.remove(sock)
            else:
                sock.setblocking(True)
                try:
                    sock.sendall(b"\x00")
                except OSError:
                    open_.remove(sock)
        time.sleep(0.3)
    assert not open_, f"{len(open_)} trickling connections still open"
    log = node.log_text()
    for k in range(8):
        assert re.search(rf"connection from 127\.0\.3\.{k + 1}:\d+ closed: (PDU not received in time "
                         rf"\(A-ASSOCIATE-RQ within 2 s|no A-ASSOCIATE-RQ within 2 s|undecodable PDU of type 0x01)", log), log


def test_one_address_cannot_take_every_slot(node):
    held = [_associate(node.port, "127.0.4.1") for _ in range(4)]       # the per-address limit
    try:
        assert all(a.is_established for a in held)
        fifth = _associate(node.port, "127.0.4.1")
        assert not fifth.is_established                                  # closed at once
        assert _echo(node.port)                                          # another address gets in
        assert "connection from 127.0.4.1 refused: 4 connections from that address already open" in node.log_text()
    finally:
        for assoc in held:
            assoc.release()


def _associate(port: int, source: str):
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.connection_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", port, ae_title="AINODE", bind_address=(source, 0))


def test_http_request_and_reset_connection_log_one_warning_each(node):
    sock = _connect(node.port, "127.0.5.1")
    sock.sendall(b"GET / HTTP/1.1\r\nHost: ainode\r\n\r\n")
    wait_for(lambda: _closed_by_peer(sock), "the node to close an HTTP connection")
    port = sock.getsockname()[1]
    sock.close()
    reset = _connect(node.port, "127.0.5.2")
    reset.sendall(bytes([0x01, 0x00, 0x00, 0x00, 0x01, 0x00]) + b"\x00" * 10)
    reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    reset_port = reset.getsockname()[1]
    reset.close()                                         # RST in the middle of a PDU
    wait_for(lambda: f"127.0.5.2:{reset_port} closed" in node.log_text(), "the reset's log line")
    wait_for(lambda: f"127.0.5.1:{port} closed: not DICOM (first bytes b'GET / ')" in node.log_text(),
              "the HTTP request's log line")
    lines = node.log_text().splitlines()
    for peer in (f"127.0.5.1:{port}", f"127.0.5.2:{reset_port}", "127.0.5.1 ", "127.0.5.2 "):
        mine = [ln for ln in lines if peer in ln]
        assert len(mine) <= 1, mine
    assert len([ln for ln in lines if "127.0.5." in ln]) == 2
    assert not [ln for ln in lines if " ERROR " in ln or "Traceback" in ln], lines


def test_idle_tcp_connection_does_not_freeze_the_tls_listener(tmp_path):
    certs = make_ca(tmp_path / "pki")
    ca = tmp_path / "pki" / "ca.crt"
    (node_key, node_crt), (peer_key, peer_crt) = certs["node"], certs["peer"]
    port = free_port()
    config = write_config(tmp_path / "node.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "ingest": {"min_free_disk_mb": 0, "association_timeout_s": 120},
        "tls": {"enabled": True, "cert_file": str(node_crt), "key_file": str(node_key), "ca_file": str(ca)},
    })
    node = NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log")
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    client.check_hostname = False
    client.load_cert_chain(str(peer_crt), str(peer_key))
    try:
        node.start_waiting_for("serving")
        idle = _connect(port)                  # never starts the handshake
        assert _echo(port, client)             # answered while the idle connection is held
        assert not _closed_by_peer(idle)       # (it is still open: nothing waited for it)
        idle.close()
    finally:
        node.stop()


def _big_ct(path: Path, rows: int, cols: int, sop_uid: str) -> Path:
    """One CT instance of rows x cols 16-bit pixels (rows * cols * 2 bytes of pixel data)."""
    ds = pydicom.dcmread(make_ct_series(path.parent / f"{sop_uid}-src", slices=1, size=16).files[0])
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.Rows, ds.Columns = rows, cols
    ds.PixelData = bytes(rows * cols * 2)
    ds.save_as(path, enforce_file_format=True)
    return path


def _sample_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], _rss_mb(pid))
        time.sleep(0.01)


def test_large_instance_goes_to_disk_as_it_arrives(node, dcmtk, tmp_path):
    """A 128 MiB instance: the node holds PDUs, not the instance, in memory; the stored file
    is the instance sent."""
    sop_uid = "1.2.826.0.1.3680043.10.1.4242"
    big = _big_ct(tmp_path / "big.dcm", 8192, 8192, sop_uid)
    idle = _rss_mb(node.process.pid)
    stop, peak = threading.Event(), [idle]
    sampler = threading.Thread(target=_sample_rss, args=(node.process.pid, stop, peak))
    sampler.start()
    try:
        dcmtk.run("storescu", "-aec", "AINODE", "127.0.0.1", str(node.port), big, timeout=300)
    finally:
        stop.set()
        sampler.join()
    stored = wait_for(lambda: list((node.data_dir / "images").rglob(f"{sop_uid}.dcm")), "the stored file")
    assert pydicom.dcmread(stored[0]).PixelData == pydicom.dcmread(big).PixelData
    assert peak[0] - idle < 48, f"RSS {idle:.0f} -> {peak[0]:.0f} MB for a 128 MiB instance"


def test_association_cut_in_a_data_set_leaves_no_partial_file(node, dcmtk, tmp_path):
    sop_uid = "1.2.826.0.1.3680043.10.1.4343"
    big = _big_ct(tmp_path / "cut.dcm", 8192, 8192, sop_uid)
    parts = node.data_dir / "tmp"
    # storescu throttled by a pipe it cannot read from: killed once the node has begun the file
    sender = subprocess.Popen([dcmtk.storescu, "-aec", "AINODE", "127.0.0.1", str(node.port), str(big)],
                              env=dcmtk.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: list(parts.glob("*.part")) or sender.poll() is not None, "a partial file")
        sender.kill()
    finally:
        sender.wait()
    wait_for(lambda: not list(parts.glob("*.part")), "the partial file to be removed")
    assert not list((node.data_dir / "images").rglob(f"{sop_uid}.dcm"))
    assert _echo(node.port)


def test_pynetdicom_path_after_a_failed_take_over_is_bounded_too(tmp_path, dcmtk, monkeypatch):
    """An association that the lean path cannot take over is served by pynetdicom's own
    threads; its C-STORE data set still goes to disk as it arrives (in-process listener, the
    take-over made to fail)."""
    monkeypatch.setattr(LeanAssociation, "_take_over", lambda self: False)
    node = Node(parse_config({"node": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(tmp_path / "data")},
                              "ingest": {"min_free_disk_mb": 0}}))
    node.ingest.start()
    try:
        sop_uid = "1.2.826.0.1.3680043.10.1.4444"
        big = _big_ct(tmp_path / "big.dcm", 8192, 8192, sop_uid)
        idle = _rss_mb(os.getpid())
        stop, peak = threading.Event(), [idle]
        sampler = threading.Thread(target=_sample_rss, args=(os.getpid(), stop, peak))
        sampler.start()
        try:
            dcmtk.run("storescu", "-aec", "AINODE", "127.0.0.1", str(node.ingest.port), big, timeout=300)
        finally:
            stop.set()
            sampler.join()
        stored = wait_for(lambda: list((tmp_path / "data" / "images").rglob(f"{sop_uid}.dcm")), "the stored file")
        assert peak[0] - idle < 48, f"RSS {idle:.0f} -> {peak[0]:.0f} MB for a 128 MiB instance"
        assert pydicom.dcmread(stored[0]).PixelData == pydicom.dcmread(big).PixelData
        assert not list((tmp_path / "data" / "tmp").glob("*.part"))
    finally:
        node.ingest.stop()
        node.db.close()


@pytest.mark.parametrize("path", ["lean", "pynetdicom"])
def test_c_store_refused_before_its_handler_leaves_no_spool_file(tmp_path, monkeypatch, path):
    """A C-STORE-RQ naming a SOP class that no service serves, on an accepted context: its data
    set was spooled from its first fragment on, pynetdicom aborts before any handler runs, and
    the spool file goes with it, on the lean path and on pynetdicom's own."""
    if path == "pynetdicom":
        monkeypatch.setattr(LeanAssociation, "_take_over", lambda self: False)
    node = Node(parse_config({"node": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(tmp_path / "data")},
                              "ingest": {"min_free_disk_mb": 0}}))
    node.ingest.start()
    try:
        ds = pydicom.dcmread(make_ct_series(tmp_path / "ct", slices=1, size=16).files[0])
        ae = AE("SCU")
        ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
        assoc = ae.associate("127.0.0.1", node.ingest.port, ae_title="AINODE")
        assert assoc.is_established
        req = C_STORE()
        req.MessageID, req.Priority = 7, 2
        req.AffectedSOPClassUID, req.AffectedSOPInstanceUID = "1.2.826.0.1.3680043.10.1.9", ds.SOPInstanceUID
        encoded = DicomBytesIO()
        encoded.is_little_endian, encoded.is_implicit_VR = True, False
        write_dataset(encoded, ds)
        req.DataSet = BytesIO(encoded.getvalue())
        assoc.dimse.send_msg(req, assoc.accepted_contexts[0].context_id)
        wait_for(lambda: assoc.is_aborted, "the node to abort the association")
        wait_for(lambda: not list((tmp_path / "data" / "tmp").glob("*.part")), "the spool file to be removed")
        assert not list((tmp_path / "data" / "images").rglob("*.dcm"))
    finally:
        node.ingest.stop()
        node.db.close()
