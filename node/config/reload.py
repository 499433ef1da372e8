"""What a reload may change: the settings a running listener was built with stay.

:func:`effective_config` keeps those settings (:data:`RESTART_KEYS`) and names the ones that
changed, for the warning that they need a restart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from node.config.schema import Config


#: Settings the running listener, file store, HTTP server and model sessions were built with;
#: a reload cannot change them.
RESTART_KEYS = ("node.ae_title", "node.name", "node.role", "node.heartbeat_s", "node.stall_timeout_s", "node.host", "node.port", "node.data_dir", "node.database_url",
                "node.max_associations", "ingest.allowed_calling_aets", "ingest.allowed_addresses",
                "ingest.max_pdu_size", "ingest.association_timeout_s", "ingest.max_associations_per_address",
                "ingest.fsync", "ingest.processes", "tls.enabled", "tls.cert_file", "tls.key_file",
                "tls.ca_file", "tls.require_client_cert", "http.enabled", "http.host", "http.port",
                "http.tokens_file", "http.max_upload_mb", "http.idle_timeout_s", "inference.device_id", "inference.cpu_threads")


def _setting(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name, None)


def effective_config(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with the :data:`RESTART_KEYS` settings of ``old``; and a line per such setting
    that differs (it needs a restart)."""
    restart = [f"{key} ({_setting(old, key)!r} -> {_setting(new, key)!r}) needs a restart"
               for key in RESTART_KEYS if _setting(old, key) != _setting(new, key)]
    def kept(section: str) -> dict[str, Any]:
        return {k.split(".")[1]: _setting(old, k) for k in RESTART_KEYS if k.startswith(section + ".")}

    effective = dataclasses.replace(new, node=old.node, tls=old.tls, http=old.http,
                                    ingest=dataclasses.replace(new.ingest, **kept("ingest")),
                                    inference=dataclasses.replace(new.inference, **kept("inference")))
    return effective, restart
