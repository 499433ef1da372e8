"""STOW-RS in (PS3.18 10.5): ``POST /dicomweb/studies[/{study}]``, role ``sender``.

The body (``multipart/related; type="application/dicom"``) is streamed to disk, each part
into its own temporary file under ``data_dir/tmp``, never held in memory. Only a body that
arrived whole is stored: a body cut short, malformed, idle for ``http.idle_timeout_s`` or larger than
``http.max_upload_mb`` stores nothing. Each part then takes the same path as a C-STORE
(:class:`node.dicom.intake.Intake`: the same checks, atomic file, row committed) before the
response, which is the Store Instances Response: 200 all stored, 202 some, 409 none.

The sender's facts for routing: ``CallingAETitle`` is the token's name (``local`` without a
tokens file), ``CalledAETitle`` the node's AE title, ``CallerAddress`` the client's address.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import time
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from node.dicom.intake import CANNOT_UNDERSTAND, Accepted, Intake, Refused, Sender
from node.errors import first_line
from node.storage.files import FileStore, valid_uid
from node.web.api import principal

log = logging.getLogger("node.web.stow")

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
DICOM_JSON = "application/dicom+json"
MAX_PARTS = 10_000
MAX_PART_HEADERS = 16 * 1024           # bytes of header lines per part
MAX_BOUNDARY = 200                     # RFC 2046 says 70; some senders use longer ones
_SPACE_CHECK_BYTES = 64 * 1024 * 1024  # the free-disk floor is checked this often while receiving


class BodyError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    path: Path
    content_type: str


class PartWriter:
    """Feeds a multipart body to python-multipart and writes each part to its own temporary
    file; :meth:`discard` removes every file not committed."""

    def __init__(self, store: FileStore, boundary: str, default_type: str) -> None:
        self.store = store
        self.default_type = default_type
        self.parts: list[Part] = []
        self.ended = False
        self._fh: Any = None
        self._field = bytearray()
        self._value = bytearray()
        self._headers: dict[str, str] = {}
        self._header_bytes = 0
        self._parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin, "on_header_field": self._header_field,
            "on_header_value": self._header_value, "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished, "on_part_data": self._part_data,
            "on_part_end": self._part_end, "on_end": self._end})

    def write(self, chunk: bytes) -> None:
        """Raises:
            BodyError: 400 malformed; 413 too many parts."""
        try:
            self._parser.write(chunk)
        except MultipartParseError as exc:
            raise BodyError(400, f"malformed multipart body: {exc}") from None

    def discard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        for part in self.parts:
            part.path.unlink(missing_ok=True)

    # python-multipart's callbacks
    def _part_begin(self) -> None:
        if len(self.parts) >= MAX_PARTS:
            raise BodyError(413, f"more than {MAX_PARTS} parts in one request")
        self._headers, self._header_bytes = {}, 0

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADERS:
            raise BodyError(400, f"a part's headers exceed {MAX_PART_HEADERS} bytes")

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._count(end - start)
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = bytearray(), bytearray()

    def _headers_finished(self) -> None:
        path, self._fh = self.store.open_part()
        self.parts.append(Part(path, self._headers.get("content-type", self.default_type)))

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self._fh.write(data[start:end])

    def _part_end(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _end(self) -> None:
        self.ended = True


def _media(content_type: str) -> tuple[str, dict[str, str]]:
    m = Message()
    m["content-type"] = content_type
    params = {k.lower(): str(v) for k, v in m.get_params(failobj=[])[1:]}
    return m.get_content_type(), params


def parse_content_type(content_type: str) -> tuple[str, str]:
    """(boundary, the parts' type) of a STOW-RS request.

    Raises:
        HTTPException: 415 for anything but ``multipart/related`` of ``application/dicom``.
    """
    kind, params = _media(content_type)
    part_type = params.get("type", "application/dicom").lower()
    if kind != "multipart/related" or part_type != "application/dicom":
        raise HTTPException(415, f"Content-Type {content_type[:120]!r} is not supported: send "
                                 "multipart/related; type=\"application/dicom\"; boundary=...")
    boundary = params.get("boundary", "")
    if not 0 < len(boundary) <= MAX_BOUNDARY:
        raise HTTPException(415, f"Content-Type {content_type[:200]!r}: multipart/related without a valid "
                                 "boundary parameter")
    return boundary, part_type


@router.post("/studies", summary="STOW-RS: store instances")
@router.post("/studies/{study}", summary="STOW-RS: store instances of one study")
async def stow(request: Request, study: str = "") -> JSONResponse:
    who = principal(request, "sender")
    node = request.app.state.ctx.node
    address = request.client.host if request.client else ""
    where = f"STOW-RS from {who.name} at {address}"
    if study and not valid_uid(study):
        raise HTTPException(400, f"{study[:80]!r} is not a valid Study Instance UID")
    try:
        boundary, part_type = parse_content_type(request.headers.get("content-type", ""))
    except HTTPException as exc:
        log.warning("%s refused %d: %s", where, exc.status_code, exc.detail)
        raise
    limit = node.config.http.max_upload_mb * 1048576
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        log.warning("%s refused 413: %s bytes declared, http.max_upload_mb is %d", where, declared,
                    node.config.http.max_upload_mb)
        raise HTTPException(413, f"the body exceeds http.max_upload_mb ({node.config.http.max_upload_mb} MB)")
    writer = PartWriter(node.store, boundary, part_type)
    intake: Intake = node.ingest.intake
    try:
        await _receive(request, writer, limit, intake, node.config.http.idle_timeout_s)
        sender = Sender(who.name, node.config.node.ae_title, address)
        outcomes = await run_in_threadpool(_store_parts, node, intake, writer.parts, sender, study)
    except BodyError as exc:
        log.warning("%s refused %d: %s; nothing stored", where, exc.status, exc)
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)
    except ClientDisconnect:
        log.warning("%s: the client went away before the body ended; nothing stored", where)
        return JSONResponse({"detail": "client disconnected"}, status_code=400)
    finally:
        writer.discard()
    stored = sum(isinstance(o, Accepted) for _, o in outcomes)
    failed = len(outcomes) - stored
    log.info("%s: %d instances stored, %d failed", where, stored, failed)
    base = str(request.base_url).rstrip("/") + "/dicomweb"
    status = 200 if not failed else 202 if stored else 409
    return JSONResponse(_store_response(base, study, outcomes), status_code=status, media_type=DICOM_JSON)


async def _receive(request: Request, writer: PartWriter, limit: int, intake: Intake, idle_s: float) -> None:
    received, checked = 0, 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise BodyError(408, f"no data for {idle_s:g} s (http.idle_timeout_s)") from None
        received += len(chunk)
        if received > limit:
            raise BodyError(413, f"the body exceeds http.max_upload_mb ({limit // 1048576} MB)")
        if received - checked > _SPACE_CHECK_BYTES:
            checked = received
            try:
                intake.check_space(received)
            except Refused as exc:
                raise BodyError(503, str(exc)) from None
        writer.write(chunk)
    if not writer.ended:
        raise BodyError(400, f"the multipart body is cut short after {received} bytes (no closing boundary)")
    if not writer.parts:
        raise BodyError(400, "the multipart body has no parts")


def _store_parts(node: Any, intake: Intake, parts: list[Part], sender: Sender,
                 study: str) -> list[tuple[Part, Accepted | Refused]]:
    outcomes: list[tuple[Part, Accepted | Refused]] = []
    for part in parts:
        kind, _ = _media(part.content_type)
        try:
            if kind != "application/dicom":
                raise Refused(CANNOT_UNDERSTAND, f"a part of type {part.content_type[:80]!r}, not application/dicom")
            outcome: Accepted | Refused = intake.accept_file(part.path, sender, study)
        except Refused as exc:
            intake.refuse(exc, exc.sop_uid or f"part {len(outcomes) + 1}", sender)
            outcome = exc
        outcomes.append((part, outcome))
    received: dict[tuple[str, str], int] = {}
    for _, o in outcomes:
        if isinstance(o, Accepted):
            key = (o.header.study_uid, o.header.series_uid)
            received[key] = received.get(key, 0) + 1
    _after_request(node, sender, received)
    return outcomes


def _after_request(node: Any, sender: Sender, received: dict[tuple[str, str], int]) -> None:
    """The audit of what the request stored, and completion as at an association's release
    (``ingest.complete_on_release`` matches the token's name)."""
    try:
        for (study_uid, series_uid), count in received.items():
            node.db.audit(f"{sender.calling_aet}@{sender.address}", "received", series_uid, study_uid=study_uid,
                          instances=count, via="STOW-RS")
        patterns = node.config.ingest.complete_on_release
        if received and any(fnmatch.fnmatchcase(sender.calling_aet.upper(), p.upper()) for p in patterns):
            series = sorted(s for _, s in received)
            node.db.set_evidence(series, "release", time.time() + node.config.ingest.release_grace_s)
    except Exception as exc:  # noqa: BLE001 - the instances are stored; the audit must not undo the answer
        log.error("STOW-RS from %s: could not write the audit or completion: %s", sender.calling_aet,
                  first_line(exc))


def _el(vr: str, *values: Any) -> dict[str, Any]:
    present = [v for v in values if v not in ("", None)]
    return {"vr": vr, "Value": present} if present else {"vr": vr}


def _store_response(base: str, study: str, outcomes: list[tuple[Part, Accepted | Refused]]) -> dict[str, Any]:
    referenced, failed = [], []
    studies = set()
    for _, o in outcomes:
        if isinstance(o, Accepted):
            h = o.header
            studies.add(h.study_uid)
            referenced.append({
                "00081150": _el("UI", o.sop_class_uid), "00081155": _el("UI", o.sop_uid),
                "00081190": _el("UR", f"{base}/studies/{h.study_uid}/series/{h.series_uid}/instances/{o.sop_uid}")})
        else:
            item = {"00081150": _el("UI", o.sop_class_uid), "00081155": _el("UI", o.sop_uid),
                    "00081197": _el("US", o.status), "00000902": _el("LO", str(o)[:64])}
            failed.append({tag: value for tag, value in item.items() if "Value" in value})
    body: dict[str, Any] = {}
    target = study or (next(iter(studies)) if len(studies) == 1 else "")
    if target:
        body["00081190"] = _el("UR", f"{base}/studies/{target}")
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    return body
