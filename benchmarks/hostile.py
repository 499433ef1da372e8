"""What hostile connections cost the listener: figures, not assertions.

    python benchmarks/hostile.py

Starts ``ainode serve`` (plain, then with DICOM TLS) on loopback and prints: the node's RSS
idle and with 16 connections each claiming a 4 GB PDU; the time of a C-ECHO while 16 empty
and 8 trickling connections are open; the time of a TLS C-ECHO while an idle TCP connection
that never starts the handshake is open. The tests hold the same behaviour
(tests/test_listener_limits.py); this prints the numbers for the README.
"""

from __future__ import annotations

import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from nodeproc import NodeProcess, write_config  # noqa: E402
from tlscerts import make_ca  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def connect(port: int, source: str) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def echo_s(port: int, context: ssl.SSLContext | None = None) -> float:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification
    ae = AE(ae_title="BENCH")
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 60
    t = time.perf_counter()
    tls = (context, "localhost") if context else None
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE", tls_args=tls)
    ok = assoc.is_established and assoc.send_c_echo().Status == 0
    assoc.release()
    return time.perf_counter() - t if ok else float("nan")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ainode-hostile-") as tmp_name:
        tmp = Path(tmp_name)
        port = free_port()
        config = write_config(tmp / "node.toml", {
            "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp / "data")},
            "ingest": {"min_free_disk_mb": 0}})
        node = NodeProcess(config=config, port=port, data_dir=tmp / "data", log=tmp / "node.log").start()
        try:
            idle = rss_mb(node.process.pid)
            socks = [connect(port, f"127.0.1.{k + 1}") for k in range(16)]
            for s in socks:
                s.sendall(bytes([1, 0, 0xFF, 0xFF, 0xFF, 0xFF]))
            time.sleep(1.0)
            peak = rss_mb(node.process.pid)
            for s in socks:
                s.close()
            print(f"RSS idle {idle:.0f} MB; with 16 connections claiming a 4 GB PDU {peak:.0f} MB "
                  f"(+{peak - idle:.0f} MB)")
            empty = [connect(port, "127.0.2.1") for _ in range(16)]
            for s in empty:
                s.close()
            trickle = [connect(port, f"127.0.3.{k + 1}") for k in range(8)]
            for s in trickle:
                s.sendall(b"\x01")
            print(f"C-ECHO with 16 empty and 8 trickling connections: {1000 * echo_s(port):.0f} ms")
            for s in trickle:
                s.close()
        finally:
            node.stop()

        certs = make_ca(tmp / "pki")
        (key, crt), (pkey, pcrt) = certs["node"], certs["peer"]
        port = free_port()
        config = write_config(tmp / "tls.toml", {
            "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp / "tls-data")},
            "ingest": {"min_free_disk_mb": 0},
            "tls": {"enabled": True, "cert_file": str(crt), "key_file": str(key),
                    "ca_file": str(tmp / "pki" / "ca.crt")}})
        node = NodeProcess(config=config, port=port, data_dir=tmp / "tls-data", log=tmp / "tls.log")
        node.start_waiting_for("serving")
        context = ssl.create_default_context(cafile=str(tmp / "pki" / "ca.crt"))
        context.load_cert_chain(str(pcrt), str(pkey))
        try:
            idle_conn = connect(port, "127.0.0.1")
            print(f"TLS C-ECHO with an idle TCP connection open: {1000 * echo_s(port, context):.0f} ms")
            idle_conn.close()
        finally:
            node.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
