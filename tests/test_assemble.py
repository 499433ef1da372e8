"""Route matching and the plans built from it: series-level routes, and study-level routes
that wait for the study to be quiet and complete."""

import dataclasses

import pytest

from node.routing.assemble import (FIRE, FIRE_INCOMPLETE, NO_MATCH, NOT_YET, WAIT, StudyMember, match_route, plan_series,
                           plan_study)
from node.config.schema import parse_config
from node.storage.db import SeriesRow
from node.config.rules import Facts

CONFIG = parse_config({
    "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242},
                     {"name": "ct1", "ae_title": "CT1", "host": "127.0.0.1", "port": 104}],
    "routes": [
        {"name": "chest", "match": {"Modality": ["CT", "PT"], "BodyPartExamined": "CHEST*"},
         "models": ["ct-tissue"], "send_to": ["pacs"], "priority": "routine"},
        {"name": "from-ct1", "match": {"CallingAETitle": "CT?"}, "models": ["ct-tissue"],
         "send_to": ["@origin"], "forward_to": ["pacs"], "priority": "stat"},
    ],
})


def series(calling="CT1"):
    return SeriesRow(id=1, series_uid="1.2", study_uid="1.1", modality="CT", calling_aet=calling,
                     called_aet="AINODE", status="receiving", last_received_at=0.0)


@pytest.mark.parametrize("attrs, matched, reason", [
    ({"Modality": "CT", "BodyPartExamined": "CHEST"}, True, "matched"),
    ({"Modality": "pt", "BodyPartExamined": "chest_abdomen"}, True, "matched"),   # case-insensitive
    ({"Modality": "MR", "BodyPartExamined": "CHEST"}, False, "Modality='MR'"),
    ({"Modality": "CT"}, False, "BodyPartExamined is absent"),
    ({"Modality": "CT", "BodyPartExamined": ""}, False, "BodyPartExamined is absent"),
    ({"Modality": "CT", "BodyPartExamined": ["HEAD", "CHEST"]}, True, "matched"),  # multi-valued
    ({"Modality": "CT", "BodyPartExamined": " CHEST "}, True, "matched"),          # DICOM padding
])
def test_match_route(attrs, matched, reason):
    decision = match_route(CONFIG.routes[0], attrs)
    assert decision.matched is matched
    assert reason in decision.reason


def test_plan_merges_routes_per_model_and_resolves_origin():
    plan = plan_series(CONFIG, series("CT1"), {"Modality": "CT", "BodyPartExamined": "CHEST",
                                               "CallingAETitle": "CT1"})
    assert len(plan.jobs) == 1                      # one job per (series, model)
    job = plan.jobs[0]
    assert job.destinations == ("ct1", "pacs")      # union; @origin resolved to the sender
    assert job.priority == 0                        # the most urgent of the matching routes
    assert plan.forwards == ("pacs",)
    assert all(d.matched for d in plan.decisions)


def test_plan_skips_unknown_origin_and_explains_misses():
    plan = plan_series(CONFIG, series("MR7"), {"Modality": "MR", "CallingAETitle": "MR7"})
    assert plan.jobs == () and plan.forwards == ()
    explained = plan.explanation()
    assert explained["chest"]["matched"] is False and "Modality" in explained["chest"]["reason"]
    assert explained["from-ct1"]["matched"] is False


# ------------------------------------------------------------------ study-level routes

STUDY = parse_config({
    "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
    "routes": [
        {"name": "chest-study", "level": "study", "match": {"Modality": "CT", "ImageType": {"not": "LOCALIZER"}},
         "models": ["ct-tissue"], "send_to": ["pacs"], "forward_to": ["pacs"], "priority": "urgent",
         "study_timeout_s": 30, "require_series": [{"SeriesDescription": "*AXIAL*"}]},
        {"name": "patient-wait", "level": "study", "match": {"Modality": "CT"}, "models": ["ct-tissue"],
         "study_timeout_s": 30, "study_max_wait_s": 300, "require_series": [{"SeriesDescription": "*CORONAL*"}]},
    ],
})


def member(k, description, image_type="ORIGINAL\\PRIMARY\\AXIAL"):
    row = SeriesRow(id=k, series_uid=f"1.2.{k}", study_uid="1.1", modality="CT", calling_aet="CT1",
                    called_aet="AINODE", status="assembled", last_received_at=100.0)
    return StudyMember(row, Facts({"Modality": "CT", "SeriesDescription": description,
                                   "ImageType": image_type.split("\\")}))


def test_study_route_waits_for_quiet_time_then_fires_on_matching_series():
    members = [member(1, "Scout", "ORIGINAL\\PRIMARY\\LOCALIZER"), member(2, "Axial 1 mm"), member(3, "Axial 5 mm")]
    route = STUDY.routes[0]
    early = plan_study(STUDY, route, members, last_received_at=100.0, now=120.0)
    assert early.state == NOT_YET and early.due_at == 130.0
    decision = plan_study(STUDY, route, members, last_received_at=100.0, now=131.0)
    assert decision.state == FIRE and decision.fires
    assert [(sid, j.model, j.priority, j.destinations) for sid, j in decision.jobs] == [
        (2, "ct-tissue", 1, ("pacs",)), (3, "ct-tissue", 1, ("pacs",))]     # not the localizer
    assert decision.forwards == ((2, "pacs"), (3, "pacs"))
    assert "2 of 3 series match" in decision.reason


def test_study_route_without_its_required_series_waits_or_fires_late():
    members = [member(1, "Axial 1 mm")]
    forever = plan_study(STUDY, dataclasses.replace(STUDY.routes[1], study_max_wait_s=0.0), members, 100.0, 1e4)
    assert forever.state == WAIT and forever.due_at is None and "*CORONAL*" in forever.reason
    waiting = plan_study(STUDY, STUDY.routes[1], members, 100.0, 200.0)
    assert waiting.state == WAIT and waiting.due_at == 400.0
    late = plan_study(STUDY, STUDY.routes[1], members, 100.0, 400.0)
    assert late.state == FIRE_INCOMPLETE and "fired without a series with" in late.reason
    assert len(late.jobs) == 1


def test_study_route_with_no_matching_series_says_why():
    decision = plan_study(STUDY, STUDY.routes[0], [member(1, "Scout", "ORIGINAL\\PRIMARY\\LOCALIZER")], 100.0, 1e9)
    assert decision.state == NO_MATCH and "excluded by not" in decision.reason


def test_series_explanation_says_a_study_route_waits():
    plan = plan_series(STUDY, series(), {"Modality": "CT", "ImageType": ["AXIAL"], "SeriesDescription": "Axial"})
    assert plan.jobs == ()                                 # nothing at series level
    assert "waits until the study is quiet for 30 s" in plan.explanation()["chest-study"]["reason"]
