"""The queue's contract, on each backend (a SQLite file, a PostgreSQL server): states, claims,
priorities, recovery."""

import threading
import time

from node.config.schema import parse_config
from node.routing.assembler import EVIDENCE_POLL_S, QUIET_MARGIN_S, Assembler
from node.storage.db import InstanceRecord, JobSpec


def record(db, series="1.2.3", sop="1.2.3.1", study="1.2", path="/x", now=None):
    db.record_instance(InstanceRecord(study_uid=study, series_uid=series, sop_instance_uid=sop,
                                      sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                                      path=path, size=10, modality="CT", calling_aet="CT1"), now=now)


def assembled_series(db, series="1.2.3", jobs=(), now=100.0):
    record(db, series=series, sop=series + ".1", now=now)
    row = [s for s in db.quiet_series(now + 1) if s.series_uid == series][0]
    assert db.assemble(row.id, row.last_received_at, list(jobs), [], {})
    return row


def test_wal_mode_is_on(db):
    if db.shared:
        return                                   # PostgreSQL has no journal mode to check
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"


def test_duplicate_instance_replaces(db):
    record(db, path="/old")
    record(db, path="/new")
    assert db.counts()["instances"]["stored"] == 1
    series = db.quiet_series(time.time() + 1)[0]
    assert db.series_paths(series.id) == ["/new"]


def test_series_is_quiet_only_after_timeout(db):
    record(db, now=100.0)
    assert db.quiet_series(99.0) == []
    assert [s.series_uid for s in db.quiet_series(101.0)] == ["1.2.3"]


def test_quiet_timer_deadline_follows_the_series_quiet_longest(db):
    """The assembler looks when the oldest receiving series' timer runs out, not on a fixed
    poll: a 1 s timer fires a few milliseconds late, not up to a poll interval."""
    config = parse_config({"ingest": {"series_timeout_s": 1.0}})
    assembler = Assembler(threading.Event(), db, lambda: config, lambda: None, lambda: None)
    assert db.oldest_receiving() is None
    assert assembler.next_wait(now=100.0) == EVIDENCE_POLL_S
    record(db, series="1.2.3", sop="1.2.3.1", now=100.0)
    record(db, series="1.2.4", sop="1.2.4.1", now=100.5)
    assert db.oldest_receiving() == 100.0
    assert abs(assembler.next_wait(now=100.9) - (0.1 + QUIET_MARGIN_S)) < 1e-6
    assert assembler.next_wait(now=100.2) == EVIDENCE_POLL_S        # far off: the evidence poll
    assert assembler.next_wait(now=105.0) == QUIET_MARGIN_S         # overdue: look at once
    assert [s.series_uid for s in db.quiet_series(100.0 + QUIET_MARGIN_S)] == ["1.2.3"]
    row = db.quiet_series(101.0)[0]
    assert db.assemble(row.id, row.last_received_at, [], [], {})
    assert db.oldest_receiving() == 100.5                            # assembled: the next one


def test_assemble_refuses_if_an_instance_arrived_meanwhile(db):
    record(db, sop="1.2.3.1", now=100.0)
    row = db.quiet_series(101.0)[0]
    record(db, sop="1.2.3.2", now=102.0)
    assert not db.assemble(row.id, row.last_received_at, [JobSpec("m", ("r",), ("pacs",), 2)], [], {})
    assert db.claim_job() is None


def test_claim_takes_most_urgent_then_oldest(db):
    assembled_series(db, "1.1", [JobSpec("m", ("r",), (), 2)])
    assembled_series(db, "1.2", [JobSpec("m", ("r",), (), 2)])
    assembled_series(db, "1.3", [JobSpec("m", ("r",), (), 0)])
    order = [db.get_series(db.claim_job().series_id).series_uid for _ in range(3)]
    assert order == ["1.3", "1.1", "1.2"]
    assert db.claim_job() is None


def test_concurrent_claims_never_share_a_job(db):
    for i in range(30):
        assembled_series(db, f"1.{i + 1}", [JobSpec("m", ("r",), (), 2)])
    taken, lock = [], threading.Lock()

    def worker():
        while (job := db.claim_job()) is not None:
            with lock:
                taken.append(job.id)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(set(taken)) and len(taken) == 30


def test_restart_gives_back_running_work(db):
    assembled_series(db, jobs=[JobSpec("m", ("r",), ("pacs",), 2)])
    job = db.claim_job()
    assert db.claim_job() is None
    assert db.requeue_stalled(heartbeat_before=time.time() - 60) == 0   # heartbeat is fresh
    assert db.requeue_stalled() == 1
    again = db.claim_job()
    assert again.id == job.id and again.attempts == 2


def test_finish_queues_deliveries_and_retry_resends(db):
    assembled_series(db, jobs=[JobSpec("m", ("r",), ("pacs", "archive"), 2)])
    job = db.claim_job()
    db.finish_job(job.id, ["/r/seg.dcm", "/r/sr.dcm"], {"timings": {}}, job.destinations)
    first = db.claim_delivery()
    second = db.claim_delivery()
    assert {first.destination, second.destination} == {"pacs", "archive"}
    assert db.claim_delivery() is None
    db.finish_delivery(first.id)
    db.defer_delivery(second.id, "peer down", next_attempt_at=time.time() + 3600)
    assert db.claim_delivery() is None            # not due yet
    db.defer_delivery(second.id, "peer down", next_attempt_at=None)   # given up
    assert db.deliveries_report("failed")[0]["error"] == "peer down"
    assert "2 deliveries queued again" in db.retry(job.id)
    assert db.claim_delivery() is not None


def test_failed_job_can_be_retried(db):
    assembled_series(db, jobs=[JobSpec("m", ("r",), (), 2)])
    job = db.claim_job()
    db.fail_job(job.id, "InputError: one slice")
    assert db.claim_job() is None
    assert db.jobs_report()[0]["error"] == "InputError: one slice"
    assert db.retry(job.id) == f"job {job.id} queued again"
    assert db.claim_job().id == job.id
    assert db.retry(999) == "no job 999"


def test_reassembly_after_late_instance_requeues_the_job(db):
    row = assembled_series(db, jobs=[JobSpec("m", ("r",), (), 2)])
    job = db.claim_job()
    db.finish_job(job.id, [], {}, [])
    record(db, sop="1.2.3.9", now=200.0)
    row = db.quiet_series(201.0)[0]
    assert db.assemble(row.id, row.last_received_at, [JobSpec("m", ("r",), (), 2)], [], {})
    assert db.claim_job().id == job.id            # same job row, queued again


def test_a_failing_destination_holds_its_other_deliveries(db):
    for i in range(5):
        assembled_series(db, f"1.{i + 1}", [JobSpec("m", ("r",), ("dead",), 2)])
        job = db.claim_job()
        db.finish_job(job.id, [], {}, ["dead", "alive"] if i == 4 else ["dead"])
    first = db.claim_delivery()
    assert first.destination == "dead"
    later = time.time() + 3600
    db.defer_delivery(first.id, "refused", later)
    assert db.hold_destination("dead", later) == 4
    due = db.claim_delivery()
    assert due.destination == "alive"                 # other destinations are not held up
    assert db.claim_delivery() is None               # the dead one is not tried again meanwhile
    assert {d["attempts"] for d in db.deliveries_report() if d["destination"] == "dead"} == {0, 1}


def test_retention_waits_for_delivery_and_for_study_level_routes(db):
    row = assembled_series(db, jobs=[JobSpec("m", ("r",), ("pacs",), 2)])
    assert db.purgeable_series(time.time()) == []            # the job has not run
    job = db.claim_job()
    db.finish_job(job.id, [], {}, job.destinations)
    assert db.purgeable_series(time.time()) == []            # its result is not delivered
    delivery = db.claim_delivery()
    db.finish_delivery(delivery.id)
    assert db.purgeable_series(time.time() + 1) == [row.id]
    assert db.purgeable_series(time.time() - 3600) == []     # delivered too recently
    study_id = db.get_series(row.id).study_id
    db.decide_study_route(study_id, "whole-study", "waiting", "needs the AXIAL series", 100.0)
    assert db.purgeable_series(time.time() + 1) == []        # a study-level route still waits
    db.decide_study_route(study_id, "whole-study", "fired", "complete", 100.0)
    assert db.mark_purged(row.id) and not db.mark_purged(row.id)
