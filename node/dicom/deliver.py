"""Deliver: C-ECHO and C-STORE to peers (results to the PACS, forwarded images, ``ainode send``).

Files are sent as stored (pynetdicom reads them from disk without decoding), over one
association per call, each file in its own transfer syntax when the peer accepts it.
"""

from __future__ import annotations

import logging
import re
import ssl
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from node.errors import DeliveryError
from node.dicom.transport import tune

log = logging.getLogger("node.dicom.deliver")

_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[^\]]+\]|[^:@]+):(?P<port>\d{1,5})$")
_MAX_CONTEXTS = 128
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Success, and the storage warnings (coercion, elements discarded, data set mismatch).
_SUCCESS_OR_WARNING = (0x0000, 0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = field(default=None, compare=False)   # None: plain TCP

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_peer(text: str) -> Peer:
    """Parse ``AE@HOST:PORT``.

    Raises:
        ValueError: with the expected form.
    """
    m = _PEER.match(text.strip())
    if not m or not 0 < int(m["port"]) < 65536:
        raise ValueError(f"{text!r} is not AE@HOST:PORT (e.g. PACS@10.0.0.5:104)")
    return Peer(m["ae"], m["host"].strip("[]"), int(m["port"]))


@dataclass
class SendReport:
    sent: int = 0
    refused: list[tuple[str, str]] = field(default_factory=list)   # (file, why): the peer said no
    skipped: list[tuple[str, str]] = field(default_factory=list)   # (file, why): we could not read it

    @property
    def failed(self) -> list[tuple[str, str]]:
        return self.refused + self.skipped

    @property
    def ok(self) -> bool:
        return not self.refused and not self.skipped

    def skip(self, path: Path, why: str) -> None:
        self.skipped.append((str(path), why))


def _ae(calling_ae: str, timeout: float) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    return ae


def echo(peer: Peer, calling_ae: str = "AINODE", timeout: float = 10.0) -> int:
    """C-ECHO a peer; returns the status (0 is success).

    Raises:
        DeliveryError: the association could not be made.
    """
    ae = _ae(calling_ae, timeout)
    ae.add_requested_context(Verification)
    assoc = _associate(ae, peer)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status:
        raise DeliveryError(f"{peer}: no C-ECHO response")
    return int(status.Status)


def _headers(paths: Iterable[Path]) -> "OrderedDict[Path, tuple[str, str]]":
    """(SOP Class UID, Transfer Syntax UID) of each file, read from its header.

    Raises:
        ValueError: a file is cut short (its last element runs past the end of the file, or
            encapsulated pixel data lacks its closing delimiter) or has no SOP Class UID.
    """
    out: OrderedDict[Path, tuple[str, str]] = OrderedDict()
    for path in paths:
        ds = read_sendable(path)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ExplicitVRLittleEndian))
        sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", "") or ds.get("SOPClassUID", ""))
        if not sop_class:
            raise ValueError("no SOP Class UID (an empty or cut data set)")
        out[path] = (sop_class, ts)
    return out


def read_sendable(path: Path) -> Dataset:
    """The header of a file about to be sent (large values are not read, only their place).

    Raises:
        ValueError: the file is cut short (see :func:`check_complete`); pydicom's errors for
            a file that is not DICOM.
    """
    ds = dcmread(path, defer_size=1024)
    check_complete(path, ds)
    return ds


_SEQUENCE_DELIMITER = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_UNDEFINED_LENGTH = 0xFFFFFFFF


def check_complete(path: Path, ds: Dataset) -> None:
    """pydicom reads a cut file without a word; DCMTK refuses it. Refuse it too, before a
    peer is sent half an instance."""
    if not len(ds):
        raise ValueError("no data set after the file meta information")
    last = ds.get_item(max(ds.keys()), keep_deferred=True)
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None:
        return
    size = path.stat().st_size
    if length == _UNDEFINED_LENGTH:
        with path.open("rb") as fh:
            fh.seek(max(0, size - 8))
            if fh.read(8) != _SEQUENCE_DELIMITER:
                raise ValueError(f"truncated: {size} bytes, and its last element "
                                 f"{last.tag} is not closed by a sequence delimiter")
    elif tell + length > size:
        raise ValueError(f"truncated: {size} bytes, but its last element {last.tag} needs {tell + length}")


def send_files(paths: Sequence[Path], peer: Peer, calling_ae: str = "AINODE",
               timeout: float = 30.0) -> SendReport:
    """C-STORE files to a peer over one association.

    Raises:
        DeliveryError: the association could not be made or broke; per-file refusals are in
            the report instead.
    """
    report = SendReport()
    readable: OrderedDict[Path, tuple[str, str]] = OrderedDict()
    for path in paths:
        try:
            readable.update(_headers([path]))
        except Exception as exc:  # noqa: BLE001 - a bad file is reported, the rest goes on
            report.skip(path, f"not a readable DICOM file: {type(exc).__name__}: {exc}")
    if not readable:
        return report
    ae = _ae(calling_ae, timeout)
    # Each SOP class is proposed in the files' own transfer syntaxes, one context each (the
    # peer then cannot pick another syntax of the same context), plus one context offering
    # the uncompressed syntaxes, into which pynetdicom re-encodes uncompressed files.
    contexts: OrderedDict[tuple[str, tuple[str, ...]], None] = OrderedDict()
    for sop_class, ts in readable.values():
        contexts[(sop_class, (ts,))] = None
        contexts[(sop_class, _UNCOMPRESSED)] = None
    if len(contexts) > _MAX_CONTEXTS:
        raise DeliveryError(f"{peer}: {len(contexts)} presentation contexts needed in one send; "
                            f"at most {_MAX_CONTEXTS}")
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, list(syntaxes))

    assoc = _associate(ae, peer)
    tune(assoc)
    try:
        accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
        for path, (sop_class, ts) in readable.items():
            try:
                if (sop_class, ts) in accepted:
                    status = assoc.send_c_store(path)          # as stored, not decoded
                elif ts in _UNCOMPRESSED and any((sop_class, u) in accepted for u in _UNCOMPRESSED):
                    status = assoc.send_c_store(dcmread(path))  # re-encoded by pynetdicom
                else:
                    report.refused.append((str(path), f"peer accepts no context for {sop_class} in {ts}"))
                    continue
            except Exception as exc:  # noqa: BLE001 - a truncated or broken file: skip it, send the rest
                if not assoc.is_established:
                    raise DeliveryError(f"{peer}: association lost while sending {path.name}") from None
                report.skip(path, f"cannot be read to send: {type(exc).__name__}: {exc}")
                continue
            if not assoc.is_established:
                raise DeliveryError(f"{peer}: association lost while sending {path.name}")
            code = int(status.Status) if status and "Status" in status else None
            if code is None:
                report.refused.append((str(path), "no response (timeout or aborted)"))
            elif code in _SUCCESS_OR_WARNING:
                report.sent += 1
            else:
                report.refused.append((str(path), f"peer answered status 0x{code:04X}"))
    finally:
        if assoc.is_established:
            assoc.release()
    return report


def _associate(ae: AE, peer: Peer) -> Association:
    """Open an association (over TLS when the peer has a context).

    Raises:
        DeliveryError: it could not be made.
    """
    tls_args = (peer.tls, peer.host) if peer.tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise DeliveryError(f"{peer}{' (TLS)' if peer.tls else ''}: association {_why(assoc)}")
    keep_responses_for_the_sender(assoc)
    return assoc


def keep_responses_for_the_sender(assoc: Association) -> None:
    """Only the thread that sent a request takes its response off the queue.

    pynetdicom's association thread also polls the DIMSE queue (for requests from the peer),
    and pauses while ``send_c_store`` waits; on a loaded machine it can look once more just as
    the response arrives and take it ("Received unexpected C-STORE service message"): the
    sender then waits for its DIMSE timeout, the association is aborted and the delivery
    is retried, a second copy of what the peer already has. Here the polling (non-blocking)
    look never takes a response.
    """
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        if not block:
            with dimse.msg_queue.mutex:
                head = dimse.msg_queue.queue[0] if dimse.msg_queue.queue else None
            if head is None or getattr(head[1], "MessageIDBeingRespondedTo", None) is not None:
                return None, None
        return take(block)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


def _why(assoc: object) -> str:
    if getattr(assoc, "is_rejected", False):
        return "rejected by the peer (check its AE title configuration)"
    # pynetdicom reports a refused TCP connection as an abort too
    return "failed: peer not reachable, refused the connection or aborted"
