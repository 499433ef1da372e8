"""Node configuration: ``config/node.toml`` read once at start into frozen objects.

Every key has a default. An unknown key or a bad value raises :class:`ConfigError` with the
key's full name (``routes[1].send_to[0]: no destination named 'pac'``), so the node refuses to
start rather than run with a setting it silently "fixed". Route rules are compiled here, once,
by :mod:`node.config.rules`. A running node reads a new configuration on SIGHUP (see
:meth:`node.worker.Node.reload`).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from node.config.rules import ASSOCIATION_FACTS, COMBINATIONS, MATCH_ALL, Bounds, Group, compile_bounds, compile_rule
from node.config.toml import Table, load_toml

PRIORITIES = {"stat": 0, "urgent": 1, "routine": 2}
PRIORITY_NAMES = {rank: name for name, rank in PRIORITIES.items()}
ORIGIN = "@origin"
LEVELS = ("series", "study")
#: Match keys that are not DICOM keywords but facts of the association.
ASSOCIATION_KEYS = ASSOCIATION_FACTS
#: Placeholders a notification's ``link_template`` may use.
LINK_FIELDS = ("study_uid", "series_uid", "accession", "sr_uid", "job_id")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable, no backslash


ROLES = ("all", "ingest", "worker")


@dataclass(frozen=True)
class NodeSection:
    ae_title: str = "AINODE"
    host: str = "0.0.0.0"
    port: int = 11112
    data_dir: Path = Path("var")
    database_url: str = ""
    max_associations: int = 16
    name: str = field(default_factory=socket.gethostname)   # this node among others on one data_dir
    role: str = "all"                     # all | ingest (listener, routing, delivery) | worker (inference)
    heartbeat_s: float = 10.0             # how often a node and its running job say they are alive
    stall_timeout_s: float = 60.0         # a job whose heartbeat is older is given to another worker

    @property
    def ingests(self) -> bool:
        return self.role in ("all", "ingest")

    @property
    def infers(self) -> bool:
        return self.role in ("all", "worker")

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
    association_timeout_s: float = 5.0          # ARTIM: the A-ASSOCIATE-RQ (and TLS handshake) deadline
    max_associations_per_address: int = 8       # connections one source address may hold open
    complete_on_release: tuple[str, ...] = ()   # calling AE patterns that send whole series per association
    release_grace_s: float = 1.0                # after such a release, before its series are complete
    mpps_discontinued: str = "process"          # a DISCONTINUED MPPS: "process" what arrived, or "quiet_timer"


@dataclass(frozen=True)
class InferenceSection:
    providers: tuple[str, ...] = (
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    models_dir: Path = Path("models")
    device_id: int = 0                    # the GPU this node's models run on (one worker per GPU)
    cpu_threads: int = 0                  # ONNX Runtime's threads per model on the CPU (0: one per core)


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
class HttpSection:
    enabled: bool = True
    host: str = "127.0.0.1"          # loopback by default; another address needs tokens_file
    port: int = 8080
    tokens_file: str = ""            # lines "<role> [<name>] <token>"
    max_upload_mb: int = 4096        # the largest STOW-RS request body
    idle_timeout_s: float = 30.0     # a request body that sends nothing for this long is cut (408)


@dataclass(frozen=True)
class LoggingSection:
    phi: bool = False                # patient name, patient ID and accession number in log lines


@dataclass(frozen=True)
class RetentionSection:
    delete_after_h: float = 0.0      # images and results, after their results were delivered; 0: keep
    check_interval_s: float = 60.0


@dataclass(frozen=True)
class Destination:
    """Where results and forwards go: a DICOM peer (C-STORE), or a DICOMweb server (STOW-RS
    to ``url`` + ``studies``, with the bearer token of ``token_file``, and ``ca_file`` to
    verify an https server's certificate; ``ae_title`` optional, for ``@origin``)."""

    name: str
    ae_title: str
    host: str = ""
    port: int = 0
    tls: bool = False
    type: str = "dimse"                   # dimse | dicomweb
    url: str = ""
    token_file: str = ""
    ca_file: str = ""
    supersede: str = "record"             # record | iocm: also send a rejection note (KOS) for results withdrawn

    def describe(self) -> str:
        return self.url if self.type == "dicomweb" else f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class NotifySection:
    """Notifications of positive findings. The webhook URL is a secret: it comes from an
    environment variable or a file, never from this configuration itself."""

    webhook_url_env: str = ""
    webhook_url_file: str = ""
    on_positive: bool = True              # every positive finding notifies, not only on_result ones
    link_template: str = ""               # e.g. "https://viewer.example/study/{study_uid}"
    timeout_s: float = 10.0
    max_attempts: int = 6
    backoff_s: float = 5.0
    backoff_max_s: float = 300.0

    @property
    def webhook_configured(self) -> bool:
        return bool(self.webhook_url_env or self.webhook_url_file)


@dataclass(frozen=True)
class OnResult:
    """What to do when a job's output crosses a line: a positive ``finding`` (classification),
    or a ``segment`` whose volume is within ``volume_ml`` (segmentation)."""

    finding: str = ""
    segment: str = ""
    volume_ml: Bounds | None = None
    probability: Bounds | None = None     # optional extra condition on a finding's probability
    model: str = ""                       # empty: any model of the route
    send_to: tuple[str, ...] = ()         # the results also go there
    forward_to: tuple[str, ...] = ()      # the original study (each of its series) also goes there
    priority: str = ""                    # raise the job (deliveries, worklist) to this; empty: keep
    notify: bool = False

    def describe(self) -> str:
        if self.finding:
            extra = f" with probability {self.probability.describe()[3:]}" if self.probability else ""
            what = f"finding {self.finding} positive{extra}"
        else:
            assert self.volume_ml is not None
            what = f"segment {self.segment} volume_ml {self.volume_ml.describe()[3:]}"
        return f"{self.model}: {what}" if self.model else what


@dataclass(frozen=True)
class Route:
    name: str
    rule: Group = MATCH_ALL               # compiled from match / all / any / none
    models: tuple[str, ...] = ()
    send_to: tuple[str, ...] = ()
    forward_to: tuple[str, ...] = ()
    priority: str = "routine"
    level: str = "series"                 # series: each series when quiet; study: when the study is
    study_timeout_s: float = 10.0         # study level: quiet time of the whole study
    study_max_wait_s: float = 0.0         # study level: fire incomplete after this long; 0: never
    require_series: tuple[Group, ...] = ()   # study level: each must be met by some series
    on_result: tuple[OnResult, ...] = ()

    @property
    def priority_rank(self) -> int:
        return PRIORITIES[self.priority]


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    inference: InferenceSection = field(default_factory=InferenceSection)
    delivery: DeliverySection = field(default_factory=DeliverySection)
    notify: NotifySection = field(default_factory=NotifySection)
    retention: RetentionSection = field(default_factory=RetentionSection)
    tls: TlsSection = field(default_factory=TlsSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    http: HttpSection = field(default_factory=HttpSection)
    destinations: tuple[Destination, ...] = ()
    routes: tuple[Route, ...] = ()

    @property
    def study_routes(self) -> tuple[Route, ...]:
        return tuple(r for r in self.routes if r.level == "study")

    def route(self, name: str) -> Route | None:
        return next((r for r in self.routes if r.name == name), None)

    def destination(self, name: str) -> Destination:
        for d in self.destinations:
            if d.name == name:
                return d
        raise ConfigError(f"no destination named {name!r}")

    def destination_for_ae(self, ae_title: str) -> Destination | None:
        return next((d for d in self.destinations if d.ae_title == ae_title), None)

    def resolve_destination(self, name: str) -> Destination:
        """The destination a delivery names; ``@origin:<AE>`` is the one with that AE title.

        Raises:
            ConfigError: no such destination (with what to configure).
        """
        if name.startswith(ORIGIN + ":"):
            aet = name.split(":", 1)[1]
            dest = self.destination_for_ae(aet)
            if dest is None:
                raise ConfigError(f"@origin: the sender {aet!r} is not a configured destination (add a "
                                  f"[[destinations]] with ae_title = {aet!r}, reload, then ainode retry)")
            return dest
        try:
            return self.destination(name)
        except ConfigError:
            raise ConfigError(f"destination {name!r} is no longer configured") from None


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
        name=n.get("name", str, "") or socket.gethostname(),
        role=n.get("role", str, "all"),
        heartbeat_s=n.positive("heartbeat_s", float, 10.0),
        stall_timeout_s=n.positive("stall_timeout_s", float, 60.0),
    )
    n.done()
    if node.role not in ROLES:
        raise ConfigError(f"node.role: {node.role!r} is not one of {', '.join(ROLES)}")
    if node.stall_timeout_s < 2 * node.heartbeat_s:
        raise ConfigError(f"node.stall_timeout_s ({node.stall_timeout_s:g}) must be at least twice "
                          f"node.heartbeat_s ({node.heartbeat_s:g}): a live worker would lose its jobs")
    if len(node.name) > 64:
        raise ConfigError("node.name: at most 64 characters")

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
        association_timeout_s=i.positive("association_timeout_s", float, 5.0),
        max_associations_per_address=i.positive("max_associations_per_address", int, 8),
        complete_on_release=tuple(i.str_list("complete_on_release")),
        release_grace_s=i.get("release_grace_s", float, 1.0),
        mpps_discontinued=i.get("mpps_discontinued", str, "process"),
    )
    i.done()
    if ingest.mpps_discontinued not in ("process", "quiet_timer"):
        raise ConfigError(f"ingest.mpps_discontinued: 'process' or 'quiet_timer', not {ingest.mpps_discontinued!r}")
    if ingest.release_grace_s < 0:
        raise ConfigError("ingest.release_grace_s: must be 0 or more")
    if ingest.min_free_disk_mb < 0:
        raise ConfigError("ingest.min_free_disk_mb: must be 0 or more")
    if ingest.max_pdu_size != 0 and ingest.max_pdu_size < 4096:
        raise ConfigError("ingest.max_pdu_size: must be 0 (unlimited) or at least 4096")

    f = top.table("inference")
    inference = InferenceSection(
        providers=f.str_list("providers", InferenceSection.providers),
        models_dir=Path(f.get("models_dir", str, "models")),
        device_id=f.get("device_id", int, 0),
        cpu_threads=f.get("cpu_threads", int, 0),
    )
    f.done()
    if inference.device_id < 0:
        raise ConfigError("inference.device_id: a GPU number from 0")
    if inference.cpu_threads < 0:
        raise ConfigError("inference.cpu_threads: 0 (one per core) or a number of threads")
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

    h = top.table("http")
    http = HttpSection(enabled=h.get("enabled", bool, True), host=h.get("host", str, "127.0.0.1"),
                       port=_port(h.get("port", int, 8080), "http.port"), tokens_file=h.get("tokens_file", str, ""),
                       max_upload_mb=h.positive("max_upload_mb", int, 4096),
                       idle_timeout_s=h.positive("idle_timeout_s", float, 30.0))
    h.done()
    if http.enabled and not http.tokens_file and not is_loopback(http.host):
        raise ConfigError(f"http.host: {http.host!r} is not a loopback address; set http.tokens_file "
                          "(without tokens the HTTP face serves loopback only)")

    lg = top.table("logging")
    logging_ = LoggingSection(phi=lg.get("phi", bool, False))
    lg.done()

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
        destinations.append(_destination(t))
        t.done()
    names = [x.name for x in destinations]
    for name in names:
        if names.count(name) > 1 or name == ORIGIN:
            raise ConfigError(f"destinations: name {name!r} is used twice or reserved")

    nt = top.table("notify")
    notify = NotifySection(
        webhook_url_env=nt.get("webhook_url_env", str, ""),
        webhook_url_file=nt.get("webhook_url_file", str, ""),
        on_positive=nt.get("on_positive", bool, True),
        link_template=nt.get("link_template", str, ""),
        timeout_s=nt.positive("timeout_s", float, 10.0),
        max_attempts=nt.positive("max_attempts", int, 6),
        backoff_s=nt.positive("backoff_s", float, 5.0),
        backoff_max_s=nt.positive("backoff_max_s", float, 300.0),
    )
    nt.done()
    _check_notify(notify)

    routes = [_route(t, names, ingest.series_timeout_s) for t in top.tables("routes")]
    route_names = [r.name for r in routes]
    for k, name in enumerate(route_names):
        if route_names.index(name) != k:
            raise ConfigError(f"routes[{k}].name: {name!r} is used by two routes")
    top.done()
    return Config(node=node, ingest=ingest, inference=inference, delivery=delivery, notify=notify,
                  logging=logging_, http=http, retention=retention, tls=tls, destinations=tuple(destinations),
                  routes=tuple(routes))


def _route(t: Table, destinations: list[str], series_timeout_s: float) -> Route:
    name = t.require("name", str)
    members: list[Any] = [t.parse("match", MATCH_ALL, compile_rule)]
    for mode in COMBINATIONS:
        members.extend(t.parse(mode, (), lambda v, where, m=mode: _combination(m, v, where)))
    level = t.choice("level", LEVELS, "series")
    study_keys = [k for k in ("study_timeout_s", "study_max_wait_s", "require_series") if t.has(k)]
    if level != "study" and study_keys:
        raise ConfigError(f"{t.where}.{study_keys[0]}: only for a route with level = \"study\"")
    route = Route(
        name=name,
        rule=Group("all", tuple(members)) if len(members) > 1 else members[0],
        models=t.str_list("models"),
        send_to=t.str_list("send_to"),
        forward_to=t.str_list("forward_to"),
        priority=t.choice("priority", tuple(PRIORITIES), "routine"),
        level=level,
        study_timeout_s=t.positive("study_timeout_s", float, series_timeout_s),
        study_max_wait_s=t.get("study_max_wait_s", float, 0.0),
        require_series=t.parse("require_series", (), _rule_list),
        on_result=tuple(_on_result(r) for r in t.tables("on_result")),
    )
    t.done()
    if route.study_max_wait_s < 0:
        raise ConfigError(f"{t.where}.study_max_wait_s: must be 0 (wait forever) or more")
    for key in ("send_to", "forward_to"):
        _check_targets(getattr(route, key), destinations, f"{t.where}.{key}")
    if not route.models and not route.forward_to:
        raise ConfigError(f"{t.where}: a route needs models or forward_to (it would do nothing)")
    for k, action in enumerate(route.on_result):
        where = f"{t.where}.on_result[{k}]"
        if not route.models:
            raise ConfigError(f"{where}: the route runs no models, so there is no result to act on")
        if action.model and action.model not in route.models:
            raise ConfigError(f"{where}.model: {action.model!r} is not one of the route's models")
        _check_targets(action.send_to, destinations, f"{where}.send_to")
        _check_targets(action.forward_to, destinations, f"{where}.forward_to")
    return route


def _combination(mode: str, value: Any, where: str) -> tuple[Group]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of rule tables")
    return (Group(mode, tuple(compile_rule(v, f"{where}[{i}]") for i, v in enumerate(value))),)


def _rule_list(value: Any, where: str) -> tuple[Group, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of rule tables")
    return tuple(compile_rule(v, f"{where}[{i}]") for i, v in enumerate(value))


def _on_result(t: Table) -> OnResult:
    action = OnResult(
        finding=t.get("finding", str, ""),
        segment=t.get("segment", str, ""),
        volume_ml=t.parse("volume_ml", None, compile_bounds),
        probability=t.parse("probability", None, compile_bounds),
        model=t.get("model", str, ""),
        send_to=t.str_list("send_to"),
        forward_to=t.str_list("forward_to"),
        priority=t.choice("priority", ("",) + tuple(PRIORITIES), ""),
        notify=t.get("notify", bool, False),
    )
    t.done()
    if bool(action.finding) == bool(action.segment):
        raise ConfigError(f"{t.where}: give either finding (a positive finding) or segment (with volume_ml)")
    if action.segment and action.volume_ml is None:
        raise ConfigError(f"{t.where}.volume_ml: required with segment (e.g. {{ gt = 5000 }})")
    if action.finding and action.volume_ml is not None:
        raise ConfigError(f"{t.where}.volume_ml: only with segment")
    if action.segment and action.probability is not None:
        raise ConfigError(f"{t.where}.probability: only with finding")
    if not (action.send_to or action.forward_to or action.priority or action.notify):
        raise ConfigError(f"{t.where}: does nothing (give send_to, forward_to, priority or notify = true)")
    return action


def _check_targets(targets: tuple[str, ...], names: list[str], where: str) -> None:
    for k, target in enumerate(targets):
        if target != ORIGIN and target not in names:
            raise ConfigError(f"{where}[{k}]: no destination named {target!r}")


def _check_notify(notify: NotifySection) -> None:
    if notify.webhook_url_env and notify.webhook_url_file:
        raise ConfigError("notify: give webhook_url_env or webhook_url_file, not both")
    if notify.webhook_url_env and not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", notify.webhook_url_env):
        raise ConfigError(f"notify.webhook_url_env: {notify.webhook_url_env!r} is not an environment "
                          "variable name (the URL itself does not belong in the configuration)")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(notify.link_template) if f is not None]
    except ValueError as exc:
        raise ConfigError(f"notify.link_template: {exc}") from None
    for f in fields:
        if f not in LINK_FIELDS:
            raise ConfigError(f"notify.link_template: unknown placeholder {{{f}}} "
                              f"(known: {', '.join('{' + x + '}' for x in LINK_FIELDS)})")


SUPERSEDE = ("record", "iocm")


def _destination(t: Table) -> Destination:
    supersede = t.get("supersede", str, "record")
    if supersede not in SUPERSEDE:
        raise ConfigError(f"{t.where}.supersede: {supersede!r} is not one of {', '.join(SUPERSEDE)}")
    return dataclasses.replace(_destination_kind(t), supersede=supersede)


def _destination_kind(t: Table) -> Destination:
    kind = t.get("type", str, "dimse")
    if kind == "dicomweb":
        url = t.require("url", str).strip()
        if not re.match(r"^https?://[^/\s]+", url):
            raise ConfigError(f"{t.where}.url: {url!r} is not an http:// or https:// URL")
        aet = t.get("ae_title", str, "")
        return Destination(name=t.require("name", str), ae_title=_ae_title(aet, f"{t.where}.ae_title") if aet else "",
                           type=kind, url=url if url.endswith("/") else url + "/",
                           token_file=t.get("token_file", str, ""), ca_file=t.get("ca_file", str, ""))
    if kind != "dimse":
        raise ConfigError(f"{t.where}.type: {kind!r} is not dimse or dicomweb")
    return Destination(name=t.require("name", str),
                       ae_title=_ae_title(t.require("ae_title", str), f"{t.where}.ae_title"),
                       host=t.require("host", str), port=_port(t.require("port", int), f"{t.where}.port"),
                       tls=t.get("tls", bool, False))


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


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
