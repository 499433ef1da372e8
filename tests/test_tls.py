"""DICOM TLS in (DCMTK storescu with a client certificate) and out (to DCMTK storescp over TLS)."""

from __future__ import annotations

import time

import pydicom

from conftest import free_port
from node.synthetic.ct import make_ct_series
from nodeproc import NodeProcess, write_config
from tlscerts import make_ca


def test_tls_listener_and_tls_delivery(dcmtk, storescp, models_dir, tmp_path):
    certs = make_ca(tmp_path / "pki")
    ca = tmp_path / "pki" / "ca.crt"
    (node_key, node_crt), (peer_key, peer_crt) = certs["node"], certs["peer"]
    scp = storescp("TLSPACS", "+tls", str(peer_key), str(peer_crt), "+cf", str(ca))
    port = free_port()
    config = write_config(tmp_path / "node.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 10},
        "inference": {"models_dir": str(models_dir), "providers": ["CPUExecutionProvider"]},
        "tls": {"enabled": True, "cert_file": str(node_crt), "key_file": str(node_key), "ca_file": str(ca),
                "require_client_cert": True},
        "destinations": [{"name": "pacs", "ae_title": "TLSPACS", "host": "127.0.0.1", "port": scp.port,
                          "tls": True}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": ["pacs"]}],
    })
    node = NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log")
    try:
        node.start_waiting_for("serving")      # a plain C-ECHO cannot reach a TLS listener
        phantom = make_ct_series(tmp_path / "ct", slices=6, size=64)
        files = [str(f) for f in phantom.files]
        # Plain TCP is refused by a TLS listener.
        plain = dcmtk.run("storescu", "-aec", "AINODE", "127.0.0.1", str(port), *files, check=False)
        assert plain.returncode != 0
        # TLS without a client certificate is refused when one is required.
        anonymous = dcmtk.run("storescu", "+tla", "+cf", str(ca), "-aec", "AINODE", "127.0.0.1", str(port),
                              *files, check=False)
        assert anonymous.returncode != 0
        # TLS with a certificate signed by the CA is accepted, and the study is processed.
        dcmtk.run("storescu", "+tls", str(peer_key), str(peer_crt), "+cf", str(ca), "-aec", "AINODE",
                  "127.0.0.1", str(port), *files)
        deadline = time.time() + 60
        while len(scp.files()) < 2 and time.time() < deadline:
            time.sleep(0.2)
        received = sorted(pydicom.dcmread(p, stop_before_pixels=True).Modality for p in scp.files())
        assert received == ["SEG", "SR"]
        assert "(DICOM TLS)" in node.log_text()
    finally:
        node.stop()
