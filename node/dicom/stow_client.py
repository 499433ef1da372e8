"""Deliver by STOW-RS (PS3.18 10.5) to a DICOMweb destination: the files of one delivery in
one ``multipart/related`` request, streamed from disk as stored.

The answer decides, per instance, as a C-STORE status does: 200 all stored; 202 or 409 the
instances named in FailedSOPSequence are refused (the rest sent); another 4xx refuses them
all (the request itself is wrong: it would fail again); 401, 403, 5xx, a timeout or a broken
connection raise :class:`DeliveryError`, which the delivery stage retries with backoff.
"""

from __future__ import annotations

import http.client
import json
import ssl
import uuid
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit

from node.config.schema import Destination
from node.dicom.deliver import SendReport, read_sendable
from node.errors import DeliveryError

MAX_RESPONSE_BYTES = 4 * 1024 * 1024       # a peer's answer is read up to this, no further
_CHUNK = 1024 * 1024


def _token(dest: Destination) -> str:
    if not dest.token_file:
        return ""
    try:
        return Path(dest.token_file).read_text().strip()
    except OSError as exc:
        raise DeliveryError(f"{dest.url}: cannot read token_file {dest.token_file}: {exc.strerror or exc}") from None


def _connection(dest: Destination, timeout: float) -> tuple[http.client.HTTPConnection, str]:
    url = urlsplit(dest.url)
    path = (url.path or "/") + "studies"
    if url.scheme == "https":
        context = ssl.create_default_context(cafile=dest.ca_file or None)
        return http.client.HTTPSConnection(url.hostname or "", url.port, timeout=timeout, context=context), path
    return http.client.HTTPConnection(url.hostname or "", url.port, timeout=timeout), path


def stow_files(paths: Sequence[Path], dest: Destination, timeout: float = 30.0) -> SendReport:
    """POST files to ``dest.url`` + ``studies``.

    Raises:
        DeliveryError: the server could not be reached, broke the connection, timed out, said
            401/403 or 5xx; per-instance refusals are in the report instead.
    """
    report = SendReport()
    uids: dict[str, Path] = {}
    for path in paths:
        try:
            uids[str(read_sendable(path).SOPInstanceUID)] = path
        except Exception as exc:  # noqa: BLE001 - a bad file is reported, the rest goes on
            report.skip(path, f"not a readable DICOM file: {type(exc).__name__}: {exc}")
    if not uids:
        return report
    boundary = uuid.uuid4().hex
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    tail = f"--{boundary}--\r\n".encode()
    length = sum(len(head) + p.stat().st_size + 2 for p in uids.values()) + len(tail)
    conn, target = _connection(dest, timeout)
    headers = {"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
               "Accept": "application/dicom+json", "Content-Length": str(length)}
    token = _token(dest)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.putrequest("POST", target)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders()
        for path in uids.values():
            conn.send(head)
            with path.open("rb") as fh:
                while chunk := fh.read(_CHUNK):
                    conn.send(chunk)
            conn.send(b"\r\n")
        conn.send(tail)
        response = conn.getresponse()
        body = response.read(MAX_RESPONSE_BYTES)
    except (OSError, http.client.HTTPException) as exc:
        raise DeliveryError(f"{dest.url}: STOW-RS failed: {type(exc).__name__}: {exc}") from None
    finally:
        conn.close()
    return _judge(response.status, body, uids, report, dest)


def _judge(status: int, body: bytes, uids: dict[str, Path], report: SendReport, dest: Destination) -> SendReport:
    if status == 200:
        report.sent += len(uids)
        return report
    if status in (202, 409):
        failed = _failed(body)
        for uid, path in uids.items():
            if uid in failed or (status == 409 and not failed):
                report.refused.append((str(path), f"STOW-RS failure reason {failed.get(uid, 'not given')} "
                                                  f"(HTTP {status})"))
            else:
                report.sent += 1
        return report
    if not 400 <= status < 500 or status in (401, 403):     # the server or our token: try again later
        raise DeliveryError(f"{dest.url}: STOW-RS answered HTTP {status}{_detail(body)}")
    for path in uids.values():
        report.refused.append((str(path), f"STOW-RS answered HTTP {status}{_detail(body)}"))
    return report


def _failed(body: bytes) -> dict[str, str]:
    """SOP Instance UID -> failure reason (hex) from a Store Instances Response."""
    try:
        items = json.loads(body).get("00081198", {}).get("Value", [])
    except (ValueError, AttributeError):
        return {}
    out = {}
    for item in items if isinstance(items, list) else []:
        try:
            uid = item["00081155"]["Value"][0]
            reason = item.get("00081197", {}).get("Value", ["?"])[0]
            out[str(uid)] = f"0x{int(reason):04X}" if isinstance(reason, int) else str(reason)
        except (KeyError, IndexError, TypeError):
            continue
    return out


def _detail(body: bytes) -> str:
    text = body[:200].decode("utf-8", "replace").strip()
    return f": {text}" if text else ""
