"""Node configuration: ``config/node.toml`` read once at start into frozen objects.

Every key has a default. An unknown key or a bad value raises :class:`ConfigError` with the
key's full name (``routes[1].send_to[0]: no destination named 'pac'``), so the node refuses to
start rather than run with a setting it silently "fixed".
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.datadict import keyword_dict

from .errors import ConfigError
from .tomlcheck import Table, load_toml

PRIORITIES = {"stat": 0, "urgent": 1, "routine": 2}
ORIGIN = "@origin"
#: Match keys that are not DICOM keywords but facts of the association.
ASSOCIATION_KEYS = ("CallingAETitle", "CalledAETitle")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


@dataclass(frozen=True)
class NodeSection:
    ae_title: str = "AINODE"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("var")
    database_url: str = ""
    max_associations: int = 16

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'node.db'}"


@dataclass(frozen=True)
class IngestSection:
    series_timeout_s: float = 10.0
    allowed_calling_aets: tuple[str, ...] = ()
    allowed_addresses: tuple[str, ...] = ()     # IP addresses or networks (CIDR); empty: any
    min_free_disk_mb: int = 1024
    fsync: bool = True
    max_pdu_size: int = 1048576
    processes: int = 1                          # listener processes sharing the port


@dataclass(frozen=True)
class InferenceSection:
    providers: tuple[str, ...] = (
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    models_dir: Path = Path("models")


@dataclass(frozen=True)
class DeliverySection:
    max_attempts: int = 8
    backoff_s: float = 5.0
    backoff_max_s: float = 600.0
    timeout_s: float = 30.0


@dataclass(frozen=True)
class TlsSection:
    enabled: bool = False            # the listener speaks DICOM TLS only
    cert_file: str = ""              # our certificate (PEM), for the listener and as client cert
    key_file: str = ""
    ca_file: str = ""                # CAs that sign peers' certificates
    require_client_cert: bool = False


@dataclass(frozen=True)
class RetentionSection:
    delete_after_h: float = 0.0      # images and results, after their results were delivered; 0: keep
    check_interval_s: float = 60.0


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int
    tls: bool = False


@dataclass(frozen=True)
class Route:
    name: str
    match: tuple[tuple[str, tuple[str, ...]], ...] = ()   # (keyword, patterns): all keys must match
    models: tuple[str, ...] = ()
    send_to: tuple[str, ...] = ()
    forward_to: tuple[str, ...] = ()
    priority: str = "routine"

    @property
    def priority_rank(self) -> int:
        return PRIORITIES[self.priority]


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    delivery: DeliverySection = field(default_factory=DeliverySection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    tls: TlsSection = field(default_factory=TlsSection)
    destinations: tuple[Destination, ...] = ()
    routes: tuple[Route, ...] = ()

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"no destination named {name!r}")

    def destination_for_ae(self, ae_title: str) -> Destination | None:
        return next((d for d in self.destinations if d.ae_title == ae_title), None)


def load_config(path: Path | None) -> Config:
    """Load and validate a configuration file; ``None`` gives the defaults.

    Raises:
        ConfigError: naming the file and the offending key.
    """
    if path is None:
        return Config()
    try:
        return parse_config(load_toml(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(data: dict[str, Any]) -> Config:
    top = Table(data, "")
    n = top.table("node")
    node = NodeSection(
        ae_title=_ae_title(n.get("ae_title", str, "AINODE"), "node.ae_title"),
        host=n.get("host", str, "0.0.0.0"),
        port=_port(n.get("port", int, 11112), "node.port"),
        data_dir=Path(n.get("data_dir", str, "var")),
        database_url=n.get("database_url", str, ""),
        max_associations=n.positive("max_associations", int, 16),
    )
    n.done()

    i = top.table("ingest")
    ingest = IngestSection(
        series_timeout_s=i.positive("series_timeout_s", float, 10.0),
        allowed_calling_aets=tuple(
            _ae_title(a, f"ingest.allowed_calling_aets[{k}]")
            for k, a in enumerate(i.str_list("allowed_calling_aets"))),
        allowed_addresses=tuple(
            _network(a, f"ingest.allowed_addresses[{k}]")
            for k, a in enumerate(i.str_list("allowed_addresses"))),
        min_free_disk_mb=i.get("min_free_disk_mb", int, 1024),
        fsync=i.get("fsync", bool, True),
        max_pdu_size=i.get("max_pdu_size", int, 1048576),
        processes=i.positive("processes", int, 1),
    )
    i.done()
    if ingest.min_free_disk_mb < 0:
        raise ConfigError("ingest.min_free_disk_mb: must be 0 or more")
    if ingest.max_pdu_size != 0 and ingest.max_pdu_size < 4096:
        raise ConfigError("ingest.max_pdu_size: must be 0 (unlimited) or at least 4096")

    f = top.table("inference")
    inference = InferenceSection(
        providers=f.str_list("providers", InferenceSection.providers),
        models_dir=Path(f.get("models_dir", str, "models")),
    )
    f.done()
    if not inference.providers:
        raise ConfigError("inference.providers: needs at least one execution provider")

    d = top.table("delivery")
    delivery = DeliverySection(
        max_attempts=d.positive("max_attempts", int, 8),
        backoff_s=d.positive("backoff_s", float, 5.0),
        backoff_max_s=d.positive("backoff_max_s", float, 600.0),
        timeout_s=d.positive("timeout_s", float, 30.0),
    )
    d.done()

    r = top.table("retention")
    retention = RetentionSection(
        delete_after_h=r.get("delete_after_h", float, 0.0),
        check_interval_s=r.positive("check_interval_s", float, 60.0))
    r.done()
    if retention.delete_after_h < 0:
        raise ConfigError("retention.delete_after_h: must be 0 (keep forever) or more")

    t = top.table("tls")
    tls = TlsSection(enabled=t.get("enabled", bool, False), cert_file=t.get("cert_file", str, ""),
                     key_file=t.get("key_file", str, ""), ca_file=t.get("ca_file", str, ""),
                     require_client_cert=t.get("require_client_cert", bool, False))
    t.done()
    if tls.enabled and not tls.cert_file:
        raise ConfigError("tls.cert_file: the TLS listener needs a certificate")
    if tls.require_client_cert and not tls.ca_file:
        raise ConfigError("tls.ca_file: needed to verify client certificates (tls.require_client_cert)")

    destinations = []
    for t in top.tables("destinations"):
        destinations.append(Destination(
            name=t.require("name", str),
            ae_title=_ae_title(t.require("ae_title", str), f"{t.where}.ae_title"),
            host=t.require("host", str),
            port=_port(t.require("port", int), f"{t.where}.port"),
            tls=t.get("tls", bool, False)))
        t.done()
    names = [x.name for x in destinations]
    for name in names:
        if names.count(name) > 1 or name == ORIGIN:
            raise ConfigError(f"destinations: name {name!r} is used twice or reserved")

    routes = []
    for t in top.tables("routes"):
        route = Route(
            name=t.require("name", str),
            match=t.parse("match", (), _match),
            models=t.str_list("models"),
            send_to=t.str_list("send_to"),
            forward_to=t.str_list("forward_to"),
            priority=t.choice("priority", tuple(PRIORITIES), "routine"),
        )
        t.done()
        for key in ("send_to", "forward_to"):
            for k, target in enumerate(getattr(route, key)):
                if target != ORIGIN and target not in names:
                    raise ConfigError(f"{t.where}.{key}[{k}]: no destination named {target!r}")
        if not route.models and not route.forward_to:
            raise ConfigError(f"{t.where}: a route needs models or forward_to (it would do nothing)")
        routes.append(route)
    top.done()
    return Config(node=node, ingest=ingest, inference=inference, delivery=delivery, retention=retention,
                  tls=tls, destinations=tuple(destinations), routes=tuple(routes))


def _match(value: Any, where: str) -> tuple[tuple[str, tuple[str, ...]], ...]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a table of DICOM keyword = value(s)")
    out = []
    for key, patterns in value.items():
        if key not in keyword_dict and key not in ASSOCIATION_KEYS:
            raise ConfigError(f"{where}.{key}: not a DICOM keyword (nor one of {', '.join(ASSOCIATION_KEYS)})")
        if isinstance(patterns, (str, int, float)) and not isinstance(patterns, bool):
            patterns = [patterns]
        if not isinstance(patterns, list) or not patterns or not all(
                isinstance(p, (str, int, float)) and not isinstance(p, bool) for p in patterns):
            raise ConfigError(f"{where}.{key}: expected a value or a non-empty list of values")
        out.append((key, tuple(str(p) for p in patterns)))
    return tuple(out)


def _ae_title(value: str, where: str) -> str:
    if not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(f"{where}: {value!r} is not a valid AE title (1-16 printable characters, no backslash)")
    return value.strip()


def _network(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not an IP address or network (e.g. 10.1.0.0/16)") from None


def _port(value: int, where: str) -> int:
    if not 0 < value < 65536:
        raise ConfigError(f"{where}: {value} is not a TCP port")
    return value
