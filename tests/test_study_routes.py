"""Study-level routes in a node run in-process: the test drives the clock of the assemble
stage (quiet times, study timeouts) instead of waiting for it; ingest is real (C-STORE)."""

from __future__ import annotations

import json
import logging
import sqlite3
import time

import pydicom
import pytest

from conftest import free_port
from node.config.schema import parse_config
from node.dicom.deliver import Peer, send_files
from node.synthetic.ct import make_ct_series
from node.worker import Node
from nodeproc import build_models

STUDY_TIMEOUT_S = 30.0


@pytest.fixture
def node(tmp_path):
    config = parse_config({
        "node": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(tmp_path / "data")},
        "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 10, "fsync": False},
        "inference": {"models_dir": str(build_models(tmp_path / "models")), "providers": ["CPUExecutionProvider"]},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
                         {"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1", "port": 4243}],
        "routes": [
            {"name": "axial-now", "match": {"SeriesDescription": "*axial*"}, "models": ["ct-tissue"],
             "send_to": ["pacs"]},
            {"name": "chest-study", "level": "study", "study_timeout_s": STUDY_TIMEOUT_S,
             "match": {"Modality": "CT", "ImageType": {"not": "LOCALIZER"}},
             "require_series": [{"SeriesDescription": "*coronal*"}],
             "models": ["ct-tissue"], "send_to": ["archive"], "forward_to": ["archive"], "priority": "urgent"},
        ],
    })
    node = Node(config)
    node.ingest.start()
    yield node
    node.ingest.stop()
    node.db.close()


def series(tmp_path, study_uid, description, localizer=False):
    s = make_ct_series(tmp_path / description, slices=2, size=32, study_uid=study_uid,
                       series_description=description)
    if localizer:
        for f in s.files:
            ds = pydicom.dcmread(f)
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            ds.save_as(f)
    return s


def send(node, s):
    report = send_files(list(s.files), Peer("AINODE", "127.0.0.1", node.ingest.port), "CT1")
    assert report.ok, report.failed


def rows(node, sql):
    db = sqlite3.connect(node.config.node.data_dir / "node.db")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_study_route_waits_for_quiet_and_complete_study_then_merges_with_series_jobs(node, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="node")
    scout = series(tmp_path, None, "Scout", localizer=True)
    study_uid = scout.study_uid
    axial = series(tmp_path, study_uid, "Axial 5 mm")
    send(node, scout)
    send(node, axial)
    now = time.time()
    assert node.assembler.assemble_once(now + 2) == 2
    # the series-level route ran at once; the study-level one only explains itself
    assert rows(node, "select model, routes, destinations from jobs") == [
        ("ct-tissue", '["axial-now"]', '["pacs"]')]
    explained = json.loads(rows(node, "select routes from series where description = 'Axial 5 mm'")[0][0])
    assert "waits until the study is quiet for 30 s" in explained["chest-study"]["reason"]

    assert node.assembler.assemble_studies(now + 2) == 0                  # not quiet for 30 s yet
    assert rows(node, "select count(*) from study_routes") == [(0,)]
    assert node.assembler.assemble_studies(now + STUDY_TIMEOUT_S + 2) == 0  # quiet, but no coronal series
    [(state, reason)] = rows(node, "select state, reason from study_routes")
    assert state == "waiting" and "SeriesDescription is '*coronal*'" in reason
    assert "route chest-study waiting for a series with" in caplog.text
    assert rows(node, "select study_check_at from studies") == [(None,)]   # nothing to do until a series comes

    coronal = series(tmp_path, study_uid, "Coronal MPR")
    send(node, coronal)
    now = time.time()
    assert node.assembler.assemble_once(now + 2) == 1
    assert node.assembler.assemble_studies(now + 2) == 0                  # the study is not quiet again yet
    assert node.assembler.assemble_studies(now + STUDY_TIMEOUT_S + 2) == 1
    assert rows(node, "select state from study_routes") == [("fired",)]
    jobs = dict(rows(node, "select series.description, jobs.routes || ' ' || jobs.destinations || ' ' || "
                           "jobs.priority || ' ' || jobs.status from jobs join series on jobs.series_id = series.id"))
    assert jobs == {
        # the axial series' job gains the study route's destination and priority, and stays queued once
        "Axial 5 mm": '["axial-now", "chest-study"] ["archive", "pacs"] 1 queued',
        "Coronal MPR": '["chest-study"] ["archive"] 1 queued',
    }                                                           # the scout (a localizer) gets none
    forwards = rows(node, "select series.description, destination from deliveries join series "
                          "on deliveries.series_id = series.id where kind = 'forward' order by 1")
    assert forwards == [("Axial 5 mm", "archive"), ("Coronal MPR", "archive")]
    assert node.assembler.assemble_studies(now + STUDY_TIMEOUT_S + 60) == 0     # decided for this content: once
    assert len(rows(node, "select id from deliveries where kind = 'forward'")) == 2
    assert "study " + study_uid + ": route chest-study fired: 2 of 3 series match" in caplog.text
