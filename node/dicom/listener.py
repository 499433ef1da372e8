"""Ingest: the DICOM listener (C-ECHO and C-STORE of every storage SOP class).

An instance is answered with Success only after its bytes are on disk (written atomically,
exactly as received: no pixel decoding) and its row is committed. Every other outcome gets
a named DICOM status and one log line that says why.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import logging
import signal
import socketserver
import threading
import time
from typing import Any

import pydicom
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.sop_class import ModalityPerformedProcedureStep, Verification
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from node.config.schema import Config
from node.errors import NodeError, first_line
from node.metrics import Metrics
from node.stage import freeze_startup_objects
from node.storage.db import Database
from node.storage.files import FileStore
from node.dicom.intake import (CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS,  # noqa: F401 - re-exported
                               OUT_OF_RESOURCES, PROCESSING_FAILURE, SUCCESS, TRANSFER_SYNTAXES, Header, Intake,
                               Refused, Sender, Spool, read_header)
from node.dicom.tls import server_context
from node.dicom.mpps import MppsService
from node.dicom.server import ListenerServer
from node.dicom.receive import FastRequestHandler
from node.dicom.transport import FastSocket, PeerLimits, quiet_pynetdicom
from node.dicom.wire import file_meta

log = logging.getLogger("node.dicom.listener")

# A-ASSOCIATE-RJ (PS3.8 9.3.4)
REJECTED_PERMANENT = 0x01
SOURCE_SERVICE_USER = 0x01
NO_REASON_GIVEN = 0x01


#: The longest UID a peer's command set may carry before the association is aborted; longer
#: than 64 characters but up to this is answered with a status by the C-STORE handler.
_MAX_COMMAND_UID = 1024


def _lenient_ui(value: Any) -> tuple[bool, str]:
    """pynetdicom's UI validator for received command sets: an invalid UID (too long, bad
    characters) reaches our handler, which answers it with a named status instead of an A-ABORT."""
    if not isinstance(value, str):
        return False, "must be a str"
    if len(value) > _MAX_COMMAND_UID:
        return False, f"must not exceed {_MAX_COMMAND_UID} characters"
    return True, ""


class Ingest:
    """The node's storage SCP. ``start()`` listens in background threads; ``stop()`` ends it."""

    def __init__(self, config: Config, store: FileStore, db: Database, metrics: Metrics | None = None) -> None:
        self.config = config
        self.store = store
        self.db = db
        self.metrics = metrics or Metrics()
        self.mpps = MppsService(db)
        self.intake = Intake(config, store, db, self.metrics)
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._received: dict[int, dict[tuple[str, str], int]] = {}   # association -> series -> count
        self._networks = [ipaddress.ip_network(a) for a in config.ingest.allowed_addresses]
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        # pynetdicom validates UIDs through this process-wide hook; the UIDs the node sends
        # are its own (valid), those it receives are checked by read_header().
        pynetdicom_config.VALIDATORS["UI"] = _lenient_ui
        ae = AE(ae_title=self.config.node.ae_title)
        ae.maximum_pdu_size = self.config.ingest.max_pdu_size
        # Per process: the kernel's spread of connections over several processes is uneven.
        ae.maximum_associations = self.config.node.max_associations
        ae.network_timeout = 60
        ae.acse_timeout = self.config.ingest.association_timeout_s   # ARTIM: the A-ASSOCIATE-RQ's deadline
        ae.dimse_timeout = 60
        if self.config.ingest.allowed_calling_aets:
            ae.require_calling_aet = list(self.config.ingest.allowed_calling_aets)
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(ModalityPerformedProcedureStep)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, TRANSFER_SYNTAXES)
        return ae

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self, reuse_port: bool = False) -> None:
        """Listen in background threads; ``reuse_port`` lets several processes share the port."""
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_CREATE, self.mpps.on_create),
            (evt.EVT_N_SET, self.mpps.on_set),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_RELEASED, self._on_released),
        ]
        quiet_pynetdicom()
        address = (self.config.node.host, self.config.node.port)
        ssl_context = server_context(self.config.tls) if self.config.tls.enabled else None
        ingest = self.config.ingest
        limits = PeerLimits(ingest.max_pdu_size, ingest.association_timeout_s, float(self.ae.network_timeout))
        server_class = type("ConfiguredListener", (ListenerServer,), {
            "reuse_port": reuse_port, "per_address": ingest.max_associations_per_address,
            "total": 2 * self.config.node.max_associations, "peer_limits": limits,
            "spool": staticmethod(self.intake.spool)})
        try:
            server = self.ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context,
                                         server_class=server_class, request_handler=FastRequestHandler)
        except OSError as exc:
            raise NodeError(f"cannot listen on {address[0]}:{address[1]}: {exc.strerror or exc}") from None
        thread = threading.Thread(target=server.serve_forever, name="ingest-server", daemon=True)
        thread.start()
        self._server = server
        log.info("listening as %s on %s:%d%s", self.config.node.ae_title, address[0], self.port,
                 " (DICOM TLS)" if ssl_context else "",
                 extra={"ae_title": self.config.node.ae_title, "port": self.port})

    def stop(self) -> None:
        """Stop accepting; associations in progress are given a few seconds to finish."""
        if self._server is None:
            return
        # make_server() does not register the server with the AE, so pynetdicom's own
        # shutdown() (which unregisters it) does not apply: stop the socketserver directly.
        socketserver.TCPServer.shutdown(self._server)
        self._server.server_close()
        deadline = time.monotonic() + 10
        while self.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            assoc.abort()
        self._server = None

    # ------------------------------------------------------------ handlers
    def _on_echo(self, event: evt.Event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return SUCCESS

    def _on_requested(self, event: evt.Event) -> None:
        """Refuse peers from addresses outside ``allowed_addresses`` before negotiation."""
        if not self._networks:
            return
        r = event.assoc.requestor
        try:
            address = ipaddress.ip_address(r.address)
        except ValueError:
            address = None
        if address is None or not any(address in net for net in self._networks):
            calling = getattr(r.primitive, "calling_ae_title", "") or "?"
            log.warning("association from %s at %s rejected: address not in ingest.allowed_addresses",
                        str(calling).strip(), r.address)
            self.metrics.association("rejected", "address")
            event.assoc.acse.send_reject(REJECTED_PERMANENT, SOURCE_SERVICE_USER, NO_REASON_GIVEN)
            event.assoc.kill()   # as pynetdicom does after its own rejections: lets the PDU go out

    def _on_accepted(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        log.info("association from %s at %s:%s accepted", r.ae_title, r.address, r.port)
        self.metrics.association("accepted")

    def _on_rejected(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        allowed = self.config.ingest.allowed_calling_aets
        if allowed and r.ae_title.strip() not in allowed:
            why, reason = "calling AE title not in ingest.allowed_calling_aets", "calling_aet"
        elif len(self.ae.active_associations) > self.config.node.max_associations:
            why, reason = f"node.max_associations ({self.config.node.max_associations}) reached", "limit"
        else:
            why, reason = "see the reason sent to the peer", "other"
        log.warning("association from %s at %s rejected: %s", r.ae_title, r.address, why)
        self.metrics.association("rejected", reason)

    def _on_aborted(self, event: evt.Event) -> None:
        r = event.assoc.requestor
        sock = event.assoc.dul.socket
        if not (isinstance(sock, FastSocket) and sock.reported):     # else its one line is logged already
            log.warning("association from %s at %s aborted; instances acknowledged before it are kept",
                        r.ae_title, r.address)
        self._audit_association(event, "aborted")

    def _on_released(self, event: evt.Event) -> None:
        self._complete_on_release(event)
        self._audit_association(event, "released")

    def _complete_on_release(self, event: evt.Event) -> None:
        """A sender that sends whole series per association (``ingest.complete_on_release``):
        the series it carried are complete when it releases, after a grace, unless another
        open association is adding to them."""
        patterns = self.config.ingest.complete_on_release
        calling = event.assoc.requestor.ae_title.strip()
        if not patterns or not any(fnmatch.fnmatchcase(calling.upper(), p.upper()) for p in patterns):
            return
        with self._lock:
            mine = set(self._received.get(id(event.assoc), {}))
            others = {key for assoc, series in self._received.items() if assoc != id(event.assoc) for key in series}
        complete = sorted(series_uid for study_uid, series_uid in mine - others)
        if not complete:
            return
        grace = self.config.ingest.release_grace_s
        try:
            n = self.db.set_evidence(complete, "release", time.time() + grace)
        except SQLAlchemyError as exc:
            log.warning("association release from %s: could not record its series as complete (%s); "
                        "the quiet timer applies", calling, first_line(exc))
            return
        log.info("association from %s released: %d series complete in %.1f s (ingest.complete_on_release)",
                 calling, n, grace, extra={"series": complete})

    def _audit_association(self, event: evt.Event, how: str) -> None:
        """One audit row per association that stored something: who sent which series."""
        with self._lock:
            received = self._received.pop(id(event.assoc), None)
        if not received:
            return
        r = event.assoc.requestor
        try:
            for (study_uid, series_uid), count in received.items():
                self.db.audit(f"{r.ae_title}@{r.address}", "received", series_uid, study_uid=study_uid,
                              instances=count, association=how)
        except Exception as exc:  # noqa: BLE001 - the audit must not break the association's end
            log.error("could not write the audit record of an association from %s: %s", r.ae_title,
                      first_line(exc))

    def _on_store(self, event: evt.Event) -> int:
        """Store one instance; always answers, never raises into pynetdicom."""
        request = event.request
        sop_uid = str(request.AffectedSOPInstanceUID or "")
        calling = event.assoc.requestor.ae_title
        try:
            return self._store(event, sop_uid, calling)
        except Exception as exc:  # noqa: BLE001 - the peer must get an answer whatever happened
            log.error("C-STORE of %s from %s failed unexpectedly: %s: %s (traceback at DEBUG)", sop_uid[:80],
                      calling, type(exc).__name__, exc)
            log.debug("C-STORE failure", exc_info=True)
            self.intake.refuse(Refused(PROCESSING_FAILURE, "unexpected failure"), sop_uid,
                               Sender(calling, "", ""))
            return PROCESSING_FAILURE

    def _store(self, event: evt.Event, sop_uid: str, calling: str) -> int:
        request = event.request
        ts = str(event.context.transfer_syntax)
        sop_class_uid = str(request.AffectedSOPClassUID or "")
        sender = Sender(calling, event.assoc.acceptor.ae_title, str(event.assoc.requestor.address or ""))
        spool = request._dataset_file       # node.dicom.receive: the data set was written as it came
        try:
            if isinstance(spool, Spool):
                accepted = self.intake.accept_spooled(spool, ts, sop_uid, sop_class_uid, sender)
            else:
                accepted = self.intake.accept_dataset(file_meta(sop_class_uid, sop_uid, ts), request.DataSet, ts,
                                                      sop_uid, sop_class_uid, sender)
        except Refused as exc:
            return self.intake.refuse(exc, sop_uid, sender)
        with self._lock:
            per_series = self._received.setdefault(id(event.assoc), {})
            key = (accepted.header.study_uid, accepted.header.series_uid)
            per_series[key] = per_series.get(key, 0) + 1
        return SUCCESS


def serve_ingest_only(config: Config) -> None:
    """Entry point of an extra ingest process: listen until SIGTERM, then stop cleanly."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)       # the main process decides when to stop
    db = Database(config.node.effective_database_url, root=config.node.data_dir, node=config.node.name)
    store = FileStore(config.node.data_dir, fsync=config.ingest.fsync, owner=config.node.name)
    ingest = Ingest(config, store, db)
    ingest.start(reuse_port=True)
    freeze_startup_objects()
    stop.wait()
    ingest.stop()
    db.close()
