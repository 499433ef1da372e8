"""A corpus of bad input in one association, mixed with good studies: every bad item gets a
DICOM status or a failed job with its reason, and the good study still gets its results."""

from __future__ import annotations

import sqlite3
import time

import pydicom

from conftest import free_port
from node.demo import DemoPacs
from node.synthetic.ct import make_ct_series
from nodeproc import NodeProcess, write_config


def _variant(src, dst, series_uid: str, **changes) -> None:
    """A copy of ``src`` in another series (same study), with attributes changed."""
    ds = pydicom.dcmread(src)
    ds.SeriesInstanceUID = series_uid
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.SOPInstanceUID = f"{series_uid}.{ds.InstanceNumber}"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(dst, enforce_file_format=True)


def test_bad_input_corpus(dcmtk, models_dir, tmp_path):
    pacs_port, port = free_port(), free_port()
    config = write_config(tmp_path / "node.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 10},
        "inference": {"models_dir": str(models_dir), "providers": ["CPUExecutionProvider"]},
        "destinations": [{"name": "pacs", "ae_title": "DEMOPACS", "host": "127.0.0.1", "port": pacs_port}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": ["pacs"]}],
    })
    node = NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log")
    pacs = DemoPacs(port=pacs_port)
    good = make_ct_series(tmp_path / "good", slices=6, size=48, seed=1)
    other = make_ct_series(tmp_path / "other", slices=6, size=48, seed=2, study_uid="1.2.826.0.1.3680043.10.7")
    files = [*good.files]
    bad = tmp_path / "bad"
    bad.mkdir()
    expected_failures = {}
    base = "1.2.826.0.1.3680043.10.8"
    # duplicate positions: two slices at the same place
    for k, src in enumerate(other.files):
        _variant(src, bad / f"dup{k}.dcm", f"{base}.1")
    _variant(other.files[0], bad / "dup-again.dcm", f"{base}.1", InstanceNumber=99)   # same place
    expected_failures[f"{base}.1"] = "duplicate slice positions"
    # mixed orientations
    for k, src in enumerate(other.files):
        _variant(src, bad / f"orient{k}.dcm", f"{base}.2",
                 **({"ImageOrientationPatient": [0, 1, 0, 0, 0, -1]} if k == 2 else {}))
    expected_failures[f"{base}.2"] = "mixed orientations"
    # zero-size pixel data
    for k, src in enumerate(other.files[:3]):
        _variant(src, bad / f"empty{k}.dcm", f"{base}.3", PixelData=b"")
    expected_failures[f"{base}.3"] = "zero-length pixel data"
    # huge declared image, tiny pixel data (must not allocate gigabytes)
    for k, src in enumerate(other.files[:3]):
        _variant(src, bad / f"huge{k}.dcm", f"{base}.4", Rows=65535, Columns=65535)
    expected_failures[f"{base}.4"] = "bytes of pixel data, 8589672450 expected"
    # an unknown character set with non-ASCII bytes in a name
    _variant(other.files[0], bad / "charset.dcm", f"{base}.5", SpecificCharacterSet="ISO_IR 999",
             SeriesDescription="Thorax \xe4\xf6\xfc")
    expected_failures[f"{base}.5"] = "SpecificCharacterSet"
    corpus = sorted(bad.iterdir())
    node.start()
    try:
        # one association carries two studies and every bad series, mixed
        sent = dcmtk.run("storescu", "-aet", "SCANNER", "-aec", "AINODE", "127.0.0.1", str(port),
                         *map(str, files + corpus), check=False, timeout=120)
        deadline = time.time() + 90
        db = sqlite3.connect(node.data_dir / "node.db")
        while time.time() < deadline:
            states = dict(db.execute("select s.series_uid, j.status from jobs j join series s on s.id = j.series_id"))
            if len(states) >= 6 and all(v in ("done", "failed") for v in states.values()):
                break
            time.sleep(0.3)
        jobs = {uid: (status, error) for uid, status, error in db.execute(
            "select s.series_uid, j.status, j.error from jobs j join series s on s.id = j.series_id")}
        assert jobs[good.series_uid][0] == "done"
        for uid, reason in expected_failures.items():
            status, error = jobs[uid]
            assert status == "failed" and error, (uid, status, error)
            assert reason in error, (uid, error)
        deadline = time.time() + 30
        while len(pacs.received) < 2 and time.time() < deadline:
            time.sleep(0.1)
        assert {ds.Modality for _, ds in pacs.received} == {"SEG", "SR"}
        assert node.echo(), "the node keeps serving"
        print(f"corpus: {len(corpus)} bad instances in {len(expected_failures)} bad series; storescu rc "
              f"{sent.returncode}; jobs {jobs}")
    finally:
        node.stop()
        pacs.stop()
