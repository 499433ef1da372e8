"""QIDO-RS and WADO-RS (PS3.18 10.4, 10.6) of what the node holds, results included, role
``viewer``: a DICOMweb viewer pointed at ``/dicomweb`` shows the images and the node's SEG
and SR side by side.

Searches match the attributes the node indexes (study: StudyInstanceUID, PatientID,
PatientName, AccessionNumber, StudyDate, ModalitiesInStudy; series: SeriesInstanceUID,
Modality; instance: SOPInstanceUID); ``*`` and ``?`` are wildcards, a StudyDate may be a
range. Other keys are ignored with a ``Warning`` header, as PS3.18 asks. Instances are
returned as stored when the client accepts their transfer syntax (``transfer-syntax=*`` or
the same UID), else re-encoded in Explicit VR Little Endian, the default of PS3.18.
"""

from __future__ import annotations

import logging
import re
import uuid
from io import BytesIO
from typing import Any, Iterator

import pydicom
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.uid import ExplicitVRLittleEndian

from node.storage.catalogue import InstanceEntry, SeriesEntry, StudyEntry, StudyQuery
from node.storage.files import valid_uid
from node.web.api import viewer
from node.web.auth import Principal
from node.web.stow import DICOM_JSON, _el, _media

log = logging.getLogger("node.web.dicomweb")

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_CHUNK = 1024 * 1024
_TAGS = {"0020000D": "StudyInstanceUID", "00100020": "PatientID", "00100010": "PatientName",
         "00080050": "AccessionNumber", "00080020": "StudyDate", "00080061": "ModalitiesInStudy",
         "0020000E": "SeriesInstanceUID", "00080060": "Modality", "00080018": "SOPInstanceUID"}
_CONTROL = {"limit", "offset", "includefield", "fuzzymatching"}
_DATE = re.compile(r"^\d{8}$")


class Search:
    """The query string of a QIDO-RS request: matching keys by keyword or tag, paging."""

    def __init__(self, request: Request, allowed: set[str]) -> None:
        self.keys: dict[str, str] = {}
        self.ignored: list[str] = []
        for key, value in request.query_params.multi_items():
            name = _TAGS.get(key.upper(), key)
            if key in _CONTROL:
                continue
            if name in allowed:
                self.keys[name] = value
            else:
                self.ignored.append(re.sub(r"[^A-Za-z0-9_.-]", "?", key[:64]))   # safe in a header
        self.limit = _int(request.query_params.get("limit"), DEFAULT_LIMIT, "limit", 1, MAX_LIMIT)
        self.offset = _int(request.query_params.get("offset"), 0, "offset", 0, 10**9)
        if request.query_params.get("fuzzymatching", "false").lower() == "true":
            self.ignored.append("fuzzymatching")

    def uids(self, name: str) -> tuple[str, ...]:
        values = tuple(v.strip() for v in self.keys.get(name, "").replace("\\", ",").split(",") if v.strip())
        for v in values:
            if not valid_uid(v):
                raise HTTPException(400, f"{name}: {v[:80]!r} is not a valid UID")
        return values

    def respond(self, items: list[dict[str, Any]]) -> JSONResponse:
        headers = {}
        if self.ignored:
            headers["Warning"] = f'299 ainode "not supported, ignored: {", ".join(sorted(set(self.ignored)))}"'
        return JSONResponse(items, media_type=DICOM_JSON, headers=headers)


def _int(text: str | None, default: int, name: str, low: int, high: int) -> int:
    if text is None:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise HTTPException(400, f"{name} must be a whole number from {low} to {high}")
    return int(text)


def _date_range(text: str) -> tuple[str, str]:
    low, sep, high = text.partition("-")
    if not sep:
        high = low
    for part in (low, high):
        if part and not _DATE.match(part):
            raise HTTPException(400, f"StudyDate {text[:40]!r}: expected YYYYMMDD or YYYYMMDD-YYYYMMDD")
    return low, high


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb"


def _db(request: Request) -> Any:
    return request.app.state.ctx.node.db


def _check(*uids: str) -> None:
    for uid in uids:
        if not valid_uid(uid):
            raise HTTPException(400, f"{uid[:80]!r} is not a valid UID")


# ------------------------------------------------------------------ QIDO-RS
def _study_json(base: str, s: StudyEntry) -> dict[str, Any]:
    return {"00080020": _el("DA", s.study_date), "00080050": _el("SH", s.accession),
            "00080061": _el("CS", *sorted(s.modalities)), "00081030": _el("LO", s.description),
            "00081190": _el("UR", f"{base}/studies/{s.study_uid}"),
            "00100010": {"vr": "PN", "Value": [{"Alphabetic": s.patient_name}]} if s.patient_name else {"vr": "PN"},
            "00100020": _el("LO", s.patient_id), "0020000D": _el("UI", s.study_uid),
            "00201206": _el("IS", s.series), "00201208": _el("IS", s.instances)}


def _series_json(base: str, s: SeriesEntry) -> dict[str, Any]:
    return {"00080060": _el("CS", s.modality), "0008103E": _el("LO", s.description),
            "00081190": _el("UR", f"{base}/studies/{s.study_uid}/series/{s.series_uid}"),
            "0020000D": _el("UI", s.study_uid), "0020000E": _el("UI", s.series_uid),
            "00201209": _el("IS", s.instances)}


def _instance_json(base: str, i: InstanceEntry) -> dict[str, Any]:
    return {"00080016": _el("UI", i.sop_class_uid), "00080018": _el("UI", i.sop_uid),
            "00080060": _el("CS", i.modality), "00083002": _el("UI", i.transfer_syntax),
            "00081190": _el("UR", f"{base}/studies/{i.study_uid}/series/{i.series_uid}/instances/{i.sop_uid}"),
            "0020000D": _el("UI", i.study_uid), "0020000E": _el("UI", i.series_uid)}


@router.get("/studies", summary="QIDO-RS: search studies")
def search_studies(request: Request, who: Principal = Depends(viewer)) -> JSONResponse:
    q = Search(request, {"StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate",
                         "ModalitiesInStudy"})
    low, high = _date_range(q.keys["StudyDate"]) if q.keys.get("StudyDate") else ("", "")
    query = StudyQuery(study_uids=q.uids("StudyInstanceUID"), patient_id=q.keys.get("PatientID", ""),
                       patient_name=q.keys.get("PatientName", ""), accession=q.keys.get("AccessionNumber", ""),
                       date_from=low, date_to=high, modality=q.keys.get("ModalitiesInStudy", ""))
    base = _base(request)
    return q.respond([_study_json(base, s) for s in _db(request).find_studies(query, q.limit, q.offset)])


@router.get("/series", summary="QIDO-RS: search series")
@router.get("/studies/{study}/series", summary="QIDO-RS: search the series of a study")
def search_series(request: Request, study: str = "", who: Principal = Depends(viewer)) -> JSONResponse:
    q = Search(request, {"StudyInstanceUID", "SeriesInstanceUID", "Modality"})
    if study:
        _check(study)
    else:
        studies = q.uids("StudyInstanceUID")
        if len(studies) > 1:
            raise HTTPException(400, "series are searched in one StudyInstanceUID at a time")
        study = studies[0] if studies else ""
    found = _db(request).find_series(study or None, q.uids("SeriesInstanceUID"), q.keys.get("Modality", ""),
                                     q.limit, q.offset)
    base = _base(request)
    return q.respond([_series_json(base, s) for s in found])


@router.get("/studies/{study}/instances", summary="QIDO-RS: search the instances of a study")
@router.get("/studies/{study}/series/{series}/instances", summary="QIDO-RS: search the instances of a series")
def search_instances(request: Request, study: str, series: str = "",
                     who: Principal = Depends(viewer)) -> JSONResponse:
    _check(study, *([series] if series else []))
    q = Search(request, {"SOPInstanceUID", "SeriesInstanceUID"})
    series = series or (q.uids("SeriesInstanceUID") or ("",))[0]
    wanted = set(q.uids("SOPInstanceUID"))
    found = [i for i in _db(request).find_instances(study, series or None) if not wanted or i.sop_uid in wanted]
    base = _base(request)
    return q.respond([_instance_json(base, i) for i in found[q.offset:q.offset + q.limit]])


# ------------------------------------------------------------------ WADO-RS
def _instances(request: Request, study: str, series: str = "", sop: str = "") -> list[InstanceEntry]:
    _check(study, *[u for u in (series, sop) if u])
    found = _db(request).find_instances(study, series or None, sop or None)
    if not found:
        raise HTTPException(404, "no such " + ("instance" if sop else "series" if series else "study"))
    return found


def _accepted_syntaxes(request: Request) -> set[str]:
    """The transfer syntaxes an ``Accept`` of ``multipart/related; type="application/dicom"``
    allows ("*": any); PS3.18's default is Explicit VR Little Endian.

    Raises:
        HTTPException: 406 when the client accepts neither DICOM nor anything.
    """
    accept = request.headers.get("accept", "*/*")
    syntaxes: set[str] = set()
    fits = False
    for item in accept.split(","):
        kind, params = _media(item.strip())
        part = params.get("type", "").lower()
        if kind in ("*/*", "multipart/*", "application/*") or (
                kind == "multipart/related" and part in ("", "application/dicom", "application/*", "*/*")):
            fits = True
            syntaxes.add(params.get("transfer-syntax", "*" if kind != "multipart/related" else
                                    str(ExplicitVRLittleEndian)))
        elif kind == "application/dicom":
            fits = True
            syntaxes.add(params.get("transfer-syntax", str(ExplicitVRLittleEndian)))
    if not fits:
        raise HTTPException(406, 'instances are sent as multipart/related; type="application/dicom"')
    return syntaxes


def _instance_bytes(path: str, stored: str, syntaxes: set[str]) -> Iterator[bytes]:
    """The file as stored, or re-encoded in Explicit VR Little Endian."""
    if "*" in syntaxes or stored in syntaxes:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                yield chunk
        return
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    buf = BytesIO()
    ds.save_as(buf, implicit_vr=False, little_endian=True, enforce_file_format=True)
    yield buf.getvalue()


def _multipart(found: list[InstanceEntry], syntaxes: set[str]) -> StreamingResponse:
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for entry in found:
            ts = entry.transfer_syntax if ("*" in syntaxes or entry.transfer_syntax in syntaxes) \
                else str(ExplicitVRLittleEndian)
            yield (f"--{boundary}\r\nContent-Type: application/dicom; transfer-syntax={ts}\r\n"
                   f"Content-Location: {entry.sop_uid}\r\n\r\n").encode()
            try:
                yield from _instance_bytes(entry.path, entry.transfer_syntax, syntaxes)
            except OSError as exc:   # removed by retention since the search: the response is cut
                log.warning("WADO-RS: %s cannot be read (%s)", entry.sop_uid, exc.strerror or exc)
                return
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(body(), media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study")
def retrieve_study(request: Request, study: str, who: Principal = Depends(viewer)) -> StreamingResponse:
    return _multipart(_instances(request, study), _accepted_syntaxes(request))


@router.get("/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series")
def retrieve_series(request: Request, study: str, series: str, who: Principal = Depends(viewer)) -> StreamingResponse:
    return _multipart(_instances(request, study, series), _accepted_syntaxes(request))


@router.get("/studies/{study}/series/{series}/instances/{sop}", summary="WADO-RS: retrieve an instance")
def retrieve_instance(request: Request, study: str, series: str, sop: str,
                      who: Principal = Depends(viewer)) -> StreamingResponse:
    return _multipart(_instances(request, study, series, sop), _accepted_syntaxes(request))


def _metadata(request: Request, found: list[InstanceEntry]) -> JSONResponse:
    base = _base(request)
    out = []
    for entry in found:
        url = f"{base}/studies/{entry.study_uid}/series/{entry.series_uid}/instances/{entry.sop_uid}"
        try:
            ds = pydicom.dcmread(entry.path, defer_size=1024)
        except OSError:
            continue                             # removed by retention meanwhile
        out.append(ds.to_json_dict(bulk_data_threshold=1024,
                                   bulk_data_element_handler=lambda el, url=url: f"{url}/bulkdata/{el.tag:08X}"))
    return JSONResponse(out, media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata", summary="WADO-RS: metadata of a study")
def study_metadata(request: Request, study: str, who: Principal = Depends(viewer)) -> JSONResponse:
    return _metadata(request, _instances(request, study))


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: metadata of a series")
def series_metadata(request: Request, study: str, series: str, who: Principal = Depends(viewer)) -> JSONResponse:
    return _metadata(request, _instances(request, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata", summary="WADO-RS: metadata of an instance")
def instance_metadata(request: Request, study: str, series: str, sop: str,
                      who: Principal = Depends(viewer)) -> JSONResponse:
    return _metadata(request, _instances(request, study, series, sop))


def _octets(chunks: list[bytes]) -> Response:
    boundary = uuid.uuid4().hex
    body = b"".join(f"--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n".encode() + c + b"\r\n"
                    for c in chunks) + f"--{boundary}--\r\n".encode()
    return Response(body, media_type=f'multipart/related; type="application/octet-stream"; boundary={boundary}')


@router.get("/studies/{study}/series/{series}/instances/{sop}/bulkdata/{tag}", summary="WADO-RS: bulk data")
def bulkdata(request: Request, study: str, series: str, sop: str, tag: str,
             who: Principal = Depends(viewer)) -> Response:
    if not re.fullmatch(r"[0-9A-Fa-f]{8}", tag):
        raise HTTPException(400, "a bulk data tag is 8 hexadecimal digits")
    ds = pydicom.dcmread(_instances(request, study, series, sop)[0].path)
    if int(tag, 16) not in ds:
        raise HTTPException(404, f"no element {tag} in this instance")
    value = ds[int(tag, 16)].value
    return _octets([value if isinstance(value, bytes) else bytes(value)])


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}", summary="WADO-RS: frames")
def retrieve_frames(request: Request, study: str, series: str, sop: str, frames: str,
                    who: Principal = Depends(viewer)) -> Response:
    """Uncompressed frames (little endian), as viewers ask for them."""
    items = frames.split(",")
    if not all(n.strip().isdigit() and len(n.strip()) <= 9 for n in items):
        raise HTTPException(400, "frames are a comma-separated list of frame numbers from 1")
    numbers = [int(n) for n in items]
    ds = pydicom.dcmread(_instances(request, study, series, sop)[0].path)
    if "PixelData" not in ds:
        raise HTTPException(404, "this instance has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if any(not 1 <= n <= count for n in numbers):
        raise HTTPException(404, f"this instance has frames 1 to {count}")
    if len(numbers) > count:                 # "1,1,1,..." would copy one frame without bound
        raise HTTPException(400, f"at most {count} frames in one request")
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()
    data = ds.PixelData
    size = len(data) // count
    return _octets([data[(n - 1) * size:n * size] for n in numbers])
