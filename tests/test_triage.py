"""Triage of a job's output (pure) and the webhook URL's resolution (never in the config)."""

import pytest

from node.config.schema import parse_config
from node.storage.db import JobRow, SeriesRow
from node.errors import ConfigError
from node.routing.notify import webhook_url
from node.routing.triage import triage

CONFIG = parse_config({
    "node": {"ae_title": "AINODE"},
    "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "h", "port": 1},
                     {"name": "er", "ae_title": "ER", "host": "h", "port": 2},
                     {"name": "ct1", "ae_title": "CT1", "host": "h", "port": 3}],
    "notify": {"link_template": "https://v/{study_uid}/{accession}"},
    "routes": [
        {"name": "chest", "models": ["xc", "seg"], "send_to": ["pacs"],
         "on_result": [{"finding": "Pneumothorax", "probability": {"ge": 0.8}, "send_to": ["er"],
                        "priority": "stat", "notify": True},
                       {"model": "seg", "segment": "Lungs", "volume_ml": {"gt": 5000}, "forward_to": ["@origin"],
                        "priority": "urgent", "notify": True},
                       {"model": "xc", "segment": "Lungs", "volume_ml": {"gt": 1}, "send_to": ["er"]}]},
        {"name": "quiet", "models": ["xc"], "on_result": [{"finding": "Nodule", "send_to": ["er"]}]},
    ],
})
SERIES = SeriesRow(id=1, series_uid="1.2.3", study_uid="1.2", modality="CT", calling_aet="CT1", called_aet="AINODE",
                   status="assembled", last_received_at=0.0, accession="ACC9")


def job(model="xc", routes=("chest",), priority=2):
    return JobRow(id=7, series_id=1, model=model, destinations=("pacs",), priority=priority, status="running",
                  attempts=1, routes=routes)


def finding(name, p, positive, priority="urgent"):
    return {"name": name, "probability": p, "positive": positive, "priority": priority}


def test_positive_findings_raise_priority_and_notify_with_links():
    summary = {"model": "xc", "version": "1.0", "findings": [finding("Pneumothorax", 0.95, True),
                                                             finding("Nodule", 0.2, False, "routine")],
               "results": [{"modality": "SR", "sop_instance_uid": "2.25.1"}]}
    out = triage(CONFIG, job(), SERIES, summary)
    assert out.priority == 0 and out.destinations == ("er",) and out.forwards == ()
    assert out.fired == ("chest: finding Pneumothorax positive with probability >= 0.8",)
    [note] = out.notifications
    assert note.subject == "Pneumothorax" and note.priority == 0
    assert note.payload["links"] == ["https://v/1.2/ACC9"] and note.payload["accession_number"] == "ACC9"
    assert note.payload["priority"] == "stat" and note.payload["rule"].startswith("chest:")


def test_a_weak_positive_notifies_without_the_on_result_action():
    out = triage(CONFIG, job(), SERIES, {"findings": [finding("Pneumothorax", 0.6, True)]})
    assert out.destinations == () and out.priority == 1           # the finding's own priority (urgent)
    assert [n.subject for n in out.notifications] == ["Pneumothorax"]
    assert out.notifications[0].payload["rule"] == "positive finding"


def test_negative_output_changes_nothing():
    out = triage(CONFIG, job(), SERIES, {"findings": [finding("Pneumothorax", 0.1, False)]})
    assert out == type(out)()


def test_segment_volume_threshold_for_its_model_only():
    big = {"volumes_ml": {"Lungs": 6200.0, "Body": 9000.0}}
    out = triage(CONFIG, job(model="seg"), SERIES, big)
    assert out.forwards == ("ct1",) and out.priority == 1       # @origin resolved to the sender
    [note] = out.notifications
    assert note.payload["event"] == "measurement" and note.payload["volume_ml"] == 6200.0
    assert triage(CONFIG, job(model="seg"), SERIES, {"volumes_ml": {"Lungs": 5000.0}}).fired == ()


def test_only_the_jobs_own_routes_act_and_removed_routes_are_skipped():
    summary = {"findings": [finding("Nodule", 0.9, True, "routine")]}
    assert triage(CONFIG, job(routes=("chest",)), SERIES, summary).destinations == ()
    assert triage(CONFIG, job(routes=("quiet", "gone")), SERIES, summary).destinations == ("er",)


def test_on_positive_off_notifies_only_on_result_rules():
    config = parse_config({"notify": {"on_positive": False}, "routes": [{"name": "r", "models": ["xc"]}]})
    out = triage(config, job(routes=("r",)), SERIES, {"findings": [finding("X", 0.9, True, "stat")]})
    assert out.notifications == () and out.priority == 0


def test_webhook_url_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    section = parse_config({"notify": {"webhook_url_env": "HOOK_URL"}}).notify
    monkeypatch.delenv("HOOK_URL", raising=False)
    with pytest.raises(ConfigError, match="environment variable HOOK_URL is not set"):
        webhook_url(section)
    monkeypatch.setenv("HOOK_URL", "ftp://x/y")
    with pytest.raises(ConfigError, match="not an http"):
        webhook_url(section)
    monkeypatch.setenv("HOOK_URL", "https://hooks.example/T0K3N")
    assert webhook_url(section) == "https://hooks.example/T0K3N"
    secret = tmp_path / "hook"
    secret.write_text("https://hooks.example/from-file\n")
    assert webhook_url(parse_config({"notify": {"webhook_url_file": str(secret)}}).notify).endswith("from-file")
    assert webhook_url(parse_config({}).notify) is None
