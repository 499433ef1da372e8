"""SIGKILL the node during ingest, inference and delivery: nothing acknowledged is lost, every
study gets its results exactly once at the destination, nothing stays running."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts

from conftest import free_port
from node.synthetic.ct import make_ct_series
from nodeproc import NodeProcess, wait_for, write_config
from slowmodel import build_slow_model


class SlowPacs:
    """A storage SCP that takes ``delay_s`` per instance and counts what it received."""

    def __init__(self, port: int, delay_s: float = 0.0) -> None:
        self.received: Counter[str] = Counter()
        self.delay_s = delay_s
        ae = AE(ae_title="SLOWPACS")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax)
        self._server = ae.start_server(("127.0.0.1", port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event):
        time.sleep(self.delay_s)
        self.received[event.request.AffectedSOPInstanceUID] += 1
        return 0x0000

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="module")
def slow_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("slow-models")
    build_slow_model(folder / "slow-body")
    return folder


@pytest.fixture
def node(tmp_path, slow_models):
    pacs_port = free_port()
    port = free_port()
    config = write_config(tmp_path / "node.toml", {
        "node": {"host": "127.0.0.1", "port": port, "data_dir": str(tmp_path / "data")},
        "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 10},
        "inference": {"models_dir": str(slow_models), "providers": ["CPUExecutionProvider"]},
        "delivery": {"backoff_s": 0.3, "backoff_max_s": 1.0, "timeout_s": 20},
        "destinations": [{"name": "pacs", "ae_title": "SLOWPACS", "host": "127.0.0.1", "port": pacs_port}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["slow-body"], "send_to": ["pacs"]}],
    })
    proc = NodeProcess(config=config, port=port, data_dir=tmp_path / "data", log=tmp_path / "node.log")
    proc.pacs_port = pacs_port
    yield proc
    proc.stop()


def db_rows(node: NodeProcess, sql: str) -> list[tuple]:
    with sqlite3.connect(node.data_dir / "node.db") as db:
        return db.execute(sql).fetchall()


def wait_until(predicate, timeout: float, what: str):
    return wait_for(predicate, what, timeout, poll=0.02)


def send_counting(port: int, files: list[Path], acked: list[str]) -> None:
    """C-STORE files one by one, recording each acknowledged SOP Instance UID."""
    ae = AE(ae_title="CTSCANNER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
    if not assoc.is_established:
        return
    for path in files:
        status = assoc.send_c_store(path)
        if not status or status.Status != 0:
            break
        acked.append(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    if assoc.is_established:
        assoc.release()


def assert_store_consistent(node: NodeProcess, acked: list[str]) -> None:
    rows = dict(db_rows(node, "select sop_instance_uid, path from instances"))
    missing = [uid for uid in acked if uid not in rows]
    assert not missing, f"{len(missing)} acknowledged instances lost"
    for uid, path in rows.items():               # paths are kept relative to data_dir
        ds = pydicom.dcmread(node.data_dir / path)   # every recorded file is whole
        assert ds.SOPInstanceUID == uid and len(ds.PixelData) == ds.Rows * ds.Columns * 2


def test_kill_during_ingest(node, tmp_path):
    phantom = make_ct_series(tmp_path / "ct", slices=60, size=128)
    pacs = SlowPacs(node.pacs_port)
    node.start()
    acked: list[str] = []
    sender = threading.Thread(target=send_counting, args=(node.port, list(phantom.files), acked))
    sender.start()
    wait_until(lambda: len(acked) >= 20, 120, "20 instances acknowledged")
    node.kill()
    sender.join(30)
    assert 20 <= len(acked) < 60
    node.start()                                  # restart: the recovery runs first
    assert_store_consistent(node, acked)
    assert not list((node.data_dir / "tmp").glob("*.part")), "partial files left behind"
    send_counting(node.port, list(phantom.files), [])      # the scanner sends the study again
    wait_until(lambda: len(pacs.received) == 2, 120, "SEG and SR delivered")
    assert db_rows(node, "select count(*) from instances") == [(60,)]
    pacs.stop()


@pytest.mark.parametrize("phase", ["inference", "delivery"])
def test_kill_while_working(node, tmp_path, phase):
    phantom = make_ct_series(tmp_path / "ct", slices=8, size=64)
    pacs = SlowPacs(node.pacs_port, delay_s=1.5 if phase == "delivery" else 0.0)
    node.start()
    acked: list[str] = []
    send_counting(node.port, list(phantom.files), acked)
    assert len(acked) == 8
    if phase == "inference":
        wait_until(lambda: db_rows(node, "select 1 from jobs where status = 'running'"), 120, "job running")
    else:
        wait_until(lambda: db_rows(node, "select 1 from deliveries where status = 'sending'"), 120,
                   "delivery sending")            # the PACS holds the SEG for 1.5 s
    node.kill()
    stuck = db_rows(node, "select count(*) from jobs where status = 'running'")[0][0] + \
        db_rows(node, "select count(*) from deliveries where status = 'sending'")[0][0]
    assert stuck == 1, "the kill must have happened with work in progress"
    pacs.delay_s = 0.0
    node.start()
    wait_until(lambda: db_rows(node, "select status from deliveries") == [("done",)], 120, "delivery done")
    assert db_rows(node, "select status, attempts from jobs") == \
        [("done", 2 if phase == "inference" else 1)]
    assert len(pacs.received) == 2, "one SEG and one SR: a re-send reuses the same UIDs"
    assert db_rows(node, "select count(*) from jobs where status = 'running'") == [(0,)]
    assert_store_consistent(node, acked)
    assert "recovered after restart" in node.log_text()
    pacs.stop()


def test_a_job_that_kills_the_node_each_time_fails_after_three_interruptions(node, tmp_path):
    """A job running whenever the node dies (a model that crashes the process, say) is counted
    at each claim, so the node does not crash-loop on it: the fourth claim fails it."""
    phantom = make_ct_series(tmp_path / "ct", slices=8, size=64)
    pacs = SlowPacs(node.pacs_port)
    acked: list[str] = []
    for attempt in range(1, 4):
        node.start()
        if attempt == 1:
            send_counting(node.port, list(phantom.files), acked)
            assert len(acked) == 8
        wait_until(lambda: db_rows(node, "select attempts from jobs where status = 'running'") == [(attempt,)],
                   120, f"job running, attempt {attempt}")
        node.kill()                                # the job "crashed the node" once more
    node.start()
    status = wait_until(lambda: [r for r in db_rows(node, "select status, error from jobs") if r[0] == "failed"],
                        120, "job failed")
    assert status[0][1].startswith("interrupted 3 times"), status
    assert "failed: interrupted 3 times (the node stopped while it ran, each time)" in node.log_text()
    retried = node.cli("retry", "1")             # an operator can still run it on purpose
    assert retried.returncode == 0 and "queued again" in retried.stdout
    wait_until(lambda: db_rows(node, "select status from deliveries") == [("done",)], 120, "delivery done")
    pacs.stop()
