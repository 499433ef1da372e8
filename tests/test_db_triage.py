"""The queue's contract for routing and triage, on each backend (a SQLite file, a PostgreSQL
server): delivery priorities, study-level job merging, raised priorities, notifications and
the worklist."""

import time


from node.storage.db import InstanceRecord, JobSpec, NotificationSpec


def assembled(db, series, study="1.2", jobs=(), forwards=(), now=100.0, accession="A1", forward_priority=2):
    db.record_instance(InstanceRecord(study_uid=study, series_uid=series, sop_instance_uid=series + ".1",
                                      sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                                      path="/x", size=10, modality="CT", accession=accession,
                                      caller_address="10.0.0.7"), now=now)
    row = [s for s in db.quiet_series(now + 1) if s.series_uid == series][0]
    assert db.assemble(row.id, row.last_received_at, list(jobs), list(forwards), {}, forward_priority)
    return row


def test_caller_address_and_accession_reach_the_series_row(db):
    row = assembled(db, "1.2.3")
    assert row.caller_address == "10.0.0.7" and row.accession == "A1" and row.study_id > 0


def test_deliveries_are_claimed_most_urgent_first(db):
    assembled(db, "1.2.3", forwards=["a"], forward_priority=2, now=100.0)
    assembled(db, "1.2.4", forwards=["b"], forward_priority=0, now=101.0)
    assert [db.claim_delivery().destination for _ in range(2)] == ["b", "a"]


def test_finish_raises_priority_adds_destinations_forwards_and_notifications(db):
    assembled(db, "1.2.3", jobs=[JobSpec("m", ("r",), ("pacs",), 2)])
    assembled(db, "1.2.4")                                        # another series of the study
    job = db.claim_job()
    note = NotificationSpec("Pneumonia", 0, {"finding": "Pneumonia"})
    db.finish_job(job.id, ["/r/sr.dcm"], {"findings": []}, ["er"], priority=0, forwards=["er", "er"],
                  notifications=[note], webhook=True)
    deliveries = sorted((d.kind, d.destination, d.priority, d.series_id) for d in
                        iter(lambda: db.claim_delivery(), None))
    # the results go to the extra destination, and the whole original study (both series) too
    assert deliveries == [("forward", "er", 0, 1), ("forward", "er", 0, 2), ("result", "er", 0, 1),
                          ("result", "pacs", 0, 1)]
    assert db.jobs_report()[0]["priority"] == 0
    claimed = db.claim_notification()
    assert claimed.subject == "Pneumonia" and claimed.attempts == 1
    db.defer_notification(claimed.id, "HTTP 500", time.time() + 3600)
    assert db.claim_notification() is None                       # not due yet
    db.defer_notification(claimed.id, "HTTP 500", None)
    [report] = db.notifications_report()
    assert (report["status"], report["error"], report["study_uid"]) == ("failed", "HTTP 500", "1.2")
    assert db.retry_notification(claimed.id) and db.claim_notification().id == claimed.id
    # a re-run of the same job does not notify the same subject twice
    db.finish_job(job.id, [], {}, [], notifications=[note], webhook=True)
    assert len(db.notifications_report()) == 1


def test_priority_is_raised_never_lowered_and_without_webhook_notifications_are_logged(db):
    assembled(db, "1.2.3", jobs=[JobSpec("m", ("r",), (), 1)])
    job = db.claim_job()
    db.finish_job(job.id, [], {}, [], priority=2, notifications=[NotificationSpec("X", 1, {})])
    assert db.jobs_report()[0]["priority"] == 1
    assert db.notifications_report()[0]["status"] == "logged"
    assert db.claim_notification() is None


def test_study_merge_adds_deliveries_to_a_done_job_and_reruns_a_changed_one(db):
    row = assembled(db, "1.2.3", jobs=[JobSpec("m", ("series-route",), ("pacs",), 2)])
    job = db.claim_job()
    db.finish_job(job.id, ["/r/sr.dcm"], {}, [])
    assert db.claim_delivery().destination == "pacs"
    # the study route names the same model: the done job's results also go to its destination
    db.decide_study_route(row.study_id, "study-route", "fired", "ok", 100.0,
                          [(row.id, JobSpec("m", ("study-route",), ("archive",), 1))], [(row.id, "archive", 1)])
    got = [db.claim_delivery() for _ in range(2)]
    assert sorted((d.kind, d.destination) for d in got) == [("forward", "archive"), ("result", "archive")]
    assert db.claim_job() is None                                  # not run again: its input did not change
    [report] = db.jobs_report()
    assert report["priority"] == 1 and report["status"] == "done"
    assert db.study_route_states(row.study_id) == {"study-route": ("fired", 100.0)}
    # a late instance changes the series: the next firing runs the job again
    db.record_instance(InstanceRecord(study_uid="1.2", series_uid="1.2.3", sop_instance_uid="1.2.3.2",
                                      sop_class_uid="1", transfer_syntax="1", path="/y", size=1),
                       now=time.time() + 10)
    db.decide_study_route(row.study_id, "study-route", "fired", "ok", 200.0,
                          [(row.id, JobSpec("m", ("study-route",), ("archive",), 1))], [])
    assert db.claim_job().id == job.id


def test_studies_due_and_check_is_compare_and_set(db):
    row = assembled(db, "1.2.3")
    assert db.studies_due(time.time()) == []
    db.set_study_check(row.study_id, None, 50.0)
    assert db.studies_due(49.0) == [] and db.studies_due(50.0) == [(row.study_id, 50.0)]
    assert not db.set_study_check(row.study_id, 40.0, None)       # someone changed it meanwhile
    assert db.set_study_check(row.study_id, 50.0, None)
    [(series, path)] = db.study_series(row.study_id)
    assert series.series_uid == "1.2.3" and path == "/x"


def test_worklist_orders_by_priority_then_age(db):
    for k, (prio, raised) in enumerate([(2, None), (2, 0), (1, None)]):
        assembled(db, f"1.2.{k}", study=f"9.{k}", jobs=[JobSpec("m", ("r",), (), prio)], now=100.0 + k,
                  accession=f"A{k}")
        job = db.claim_job()
        db.finish_job(job.id, [], {"findings": [{"name": "F", "probability": 0.9, "positive": True}]}, [],
                      priority=raised)
    assembled(db, "1.2.9", study="9.9", jobs=[JobSpec("m", ("r",), (), 0)], now=200.0)   # not analysed yet
    assert [(r["accession"], r["priority"]) for r in db.worklist()] == [("A1", 0), ("A2", 1), ("A0", 2)]
