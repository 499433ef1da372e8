"""Reload in-process: the state is swapped whole, warm models are reused, settings of the
running listener are kept (and reported), a configuration that cannot run is refused."""

import re

import pytest

from conftest import free_port
from node.config.schema import parse_config
from node.errors import ConfigError
from node.worker import Node
from nodeproc import build_models


@pytest.fixture
def sections(tmp_path):
    return {
        "node": {"host": "127.0.0.1", "port": free_port(), "data_dir": str(tmp_path / "data")},
        "ingest": {"series_timeout_s": 1.0, "min_free_disk_mb": 10},
        "inference": {"models_dir": str(build_models(tmp_path / "models")), "providers": ["CPUExecutionProvider"]},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}],
        "routes": [{"name": "ct", "match": {"Modality": "CT"}, "models": ["ct-tissue"], "send_to": ["pacs"]}],
    }


def test_reload_swaps_state_keeps_listener_settings_and_warm_models(sections):
    node = Node(parse_config(sections))
    try:
        before = node.models["ct-tissue"]
        changed = {**sections, "node": {**sections["node"], "port": sections["node"]["port"] + 1},
                   "ingest": {**sections["ingest"], "series_timeout_s": 3.0, "fsync": False},
                   "routes": [{"name": "ct-urgent", "match": {"Modality": "CT"}, "models": ["ct-tissue"],
                               "priority": "urgent"}]}
        notes = node.reload(parse_config(changed))
        assert [n.split(" ")[0] for n in notes] == ["node.port", "ingest.fsync"]
        assert node.config.node.port == sections["node"]["port"] and node.config.ingest.fsync is True
        assert node.config.ingest.series_timeout_s == 3.0            # applied at once
        assert [r.name for r in node.config.routes] == ["ct-urgent"]
        assert node.models["ct-tissue"] is before                    # the warm session is reused
        assert node.ingest.config is node.config
    finally:
        node.db.close()


@pytest.mark.parametrize("routes, message", [
    ([{"name": "x", "models": ["no-such-model"]}], "routes[0].models: model 'no-such-model'"),
    ([{"name": "x", "models": ["ct-tissue"], "on_result": [{"segment": "Lung", "volume_ml": {"gt": 1},
                                                            "notify": True}]}],
     "routes[0].on_result[0].segment: no model of the route has a segment 'Lung' (have: Body, Lungs, Bone)"),
])
def test_a_configuration_that_cannot_run_is_refused_and_the_old_one_stays(sections, routes, message):
    node = Node(parse_config(sections))
    try:
        state = node._state
        with pytest.raises(ConfigError, match=re.escape(message)):
            node.reload(parse_config({**sections, "routes": routes}))
        assert node._state is state
    finally:
        node.db.close()
