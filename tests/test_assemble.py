"""Route matching: keywords, lists, wildcards, AE titles, and the plan built from them."""

import pytest

from node.assemble import match_route, plan_series
from node.config import parse_config
from node.db import SeriesRow

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
