"""Configuration: defaults, and refusals that name the bad key."""

from pathlib import Path

import pytest

from node.config.schema import load_config, parse_config
from node.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent


def test_shipped_config_loads():
    config = load_config(REPO / "config" / "node.toml")
    assert config.node.ae_title == "AINODE" and config.node.port == 11112
    assert config.routes[0].models == ("ct-tissue",)


def test_the_cluster_examples_load():
    """deploy/cluster: one ingest node and workers with the same routes and destinations."""
    ingest = load_config(REPO / "deploy" / "cluster" / "ingest.toml")
    worker = load_config(REPO / "deploy" / "cluster" / "worker.toml")
    assert (ingest.node.role, ingest.node.ingests, ingest.node.infers) == ("ingest", True, False)
    assert (worker.node.role, worker.node.ingests, worker.node.infers) == ("worker", False, True)
    assert ingest.node.database_url == worker.node.database_url != ""
    assert ingest.node.data_dir == worker.node.data_dir
    assert ingest.routes == worker.routes and ingest.destinations == worker.destinations
    for unit in ("ainode-ingest.service", "ainode-worker@.service"):
        assert "ExecStart=/opt/ainode/venv/bin/ainode serve --config" in (REPO / "deploy" / "systemd" / unit).read_text()


def test_defaults_match_design():
    config = parse_config({})
    assert (config.node.ae_title, config.node.port, config.ingest.series_timeout_s) == ("AINODE", 11112, 10.0)
    assert config.node.effective_database_url.endswith("var/node.db")
    assert config.inference.providers[-1] == "CPUExecutionProvider"


@pytest.mark.parametrize("data, message", [
    ({"node": {"portt": 1}}, "node.portt"),
    ({"node": {"port": 70000}}, "node.port"),
    ({"node": {"ae_title": "THIS-TITLE-IS-TOO-LONG"}}, "node.ae_title"),
    ({"ingest": {"series_timeout_s": "ten"}}, "ingest.series_timeout_s"),
    ({"ingest": {"series_timeout_s": 0}}, "ingest.series_timeout_s"),
    ({"ingest": {"fsync": 1}}, "ingest.fsync"),
    ({"routes": [{"name": "r", "models": ["m"], "send_to": ["nowhere"]}]}, "routes[0].send_to[0]"),
    ({"routes": [{"name": "r", "models": ["m"], "priority": "asap"}]}, "routes[0].priority"),
    ({"routes": [{"name": "r", "models": ["m"], "match": {"Modalty": "CT"}}]}, "routes[0].match.Modalty"),
    ({"routes": [{"name": "r"}]}, "routes[0]"),
    ({"destinations": [{"name": "p", "ae_title": "P", "host": "h"}]}, "destinations[0].port"),
    ({"extra": {}}, "extra"),
    ({"node": {"role": "gpu"}}, "node.role"),
    ({"node": {"heartbeat_s": 10, "stall_timeout_s": 15}}, "node.stall_timeout_s"),
    ({"inference": {"device_id": -1}}, "inference.device_id"),
    ({"http": {"max_upload_mb": 0}}, "http.max_upload_mb"),
    ({"destinations": [{"name": "w", "type": "dicomweb"}]}, "destinations[0].url"),
    ({"destinations": [{"name": "w", "type": "dicomweb", "url": "ftp://x/"}]}, "destinations[0].url"),
    ({"destinations": [{"name": "w", "type": "wado", "url": "http://x/"}]}, "destinations[0].type"),
    ({"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 104, "supersede": "delete"}]},
     "destinations[0].supersede"),
])
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert message in str(exc.value)


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "node.toml"
    bad.write_text("[node]\nport = [\n")
    with pytest.raises(ConfigError, match="node.toml: invalid TOML"):
        load_config(bad)
    bad.write_text("[node]\nportt = 1\n")
    with pytest.raises(ConfigError, match=r"node.toml: unknown key\(s\): node.portt"):
        load_config(bad)
