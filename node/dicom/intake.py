"""Intake: the one durable path every received instance takes, whatever brought it (a C-STORE
on the listener, a part of a STOW-RS request on the HTTP face).

An instance is accepted only after its bytes are on disk (written atomically, exactly as
received: no pixel decoding) and its row is committed. Every other outcome is a
:class:`Refused` with the DICOM status to answer (C-STORE status, or STOW-RS FailureReason)
and one log line that says why.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.multival import MultiValue
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit,
                         JPEGExtended12Bit, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless,
                         JPEGLSNearLossless, RLELossless, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K)
from pynetdicom.presentation import AllStoragePresentationContexts
from sqlalchemy.exc import SQLAlchemyError

from node.config.schema import Config
from node.errors import first_line
from node.metrics import Metrics
from node.storage.db import Database, InstanceRecord
from node.storage.files import FileStore, valid_uid
from node.dicom.deliver import check_complete
from node.dicom.wire import file_meta

log = logging.getLogger("node.dicom.intake")

# Statuses (PS3.4 B.2.3, PS3.7 C.4.2.1.4; the same codes are STOW-RS failure reasons, PS3.18)
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122

#: Transfer syntaxes accepted for storage, preferred first.
TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, HTJ2KLossless, HTJ2KLosslessRPCL, HTJ2K, RLELossless,
]
#: The storage SOP classes: what C-STORE negotiates and what STOW-RS takes.
STORAGE_SOP_CLASSES = frozenset(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)

#: The last tag of :data:`_HEADER_KEYS` (SeriesInstanceUID): a received data set is read up to it.
_LAST_HEADER_TAG = 0x0020000E
#: A spool keeps this many of a data set's first bytes, and its header is read from them when it
#: ends within them (no second read of the file; pydicom reading a file asks the kernel for its
#: position at every element).
_HEAD_BYTES = 64 * 1024
#: How much of a deflated data set is inflated to read its header.
_MAX_INFLATED_HEADER = 16 * 1024 * 1024
_HEADER_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
                "PatientID", "PatientName", "StudyDate", "StudyDescription", "AccessionNumber",
                "SeriesDescription")


class Refused(Exception):
    """An instance that cannot be stored; ``status`` is the DICOM status to answer."""

    def __init__(self, status: int, reason: str, sop_uid: str = "", sop_class_uid: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.sop_uid = sop_uid              # what is known of the instance refused (STOW-RS names it)
        self.sop_class_uid = sop_class_uid


@dataclass(frozen=True)
class Header:
    """What intake needs from a received data set (nothing is decoded beyond these)."""

    study_uid: str
    series_uid: str
    modality: str = ""
    patient_id: str = ""
    accession: str = ""
    series_description: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class Sender:
    """Who sent an instance: for C-STORE the association's AE titles and address; for STOW-RS
    the token's name as the calling AE title and the client's address."""

    calling_aet: str
    called_aet: str
    address: str = ""


@dataclass(frozen=True)
class Accepted:
    sop_uid: str
    sop_class_uid: str
    header: Header
    size: int


class Intake:
    """Checks, writes and records instances (thread-safe; one per process)."""

    def __init__(self, config: Config, store: FileStore, db: Database, metrics: Metrics) -> None:
        self.config = config
        self.store = store
        self.db = db
        self.metrics = metrics
        self._syncer = ThreadPoolExecutor(max_workers=config.node.max_associations, thread_name_prefix="fsync")

    def refuse(self, exc: Refused, sop_uid: str, sender: Sender) -> int:
        """Count and log one refusal; returns its status."""
        log.warning("refused 0x%04X: %s from %s: %s", exc.status, sop_uid[:80] or "?", sender.calling_aet, exc)
        self.metrics.refused_with(exc.status)
        return exc.status

    def check_space(self, size: int) -> None:
        """Raises:
            Refused: 0xA700 when ``size`` more bytes would take the disk below the floor."""
        floor = self.config.ingest.min_free_disk_mb
        if floor and self.store.free_mb() - size / 1048576 < floor:
            raise Refused(OUT_OF_RESOURCES, f"free disk below min_free_disk_mb={floor} with the {size} "
                                            "bytes of this instance")

    def accept_dataset(self, meta: bytes, stream: BytesIO, transfer_syntax: str, sop_uid: str,
                       sop_class_uid: str, sender: Sender) -> Accepted:
        """A C-STORE's data set (``meta`` is the preamble and file meta to write before it).

        Raises:
            Refused: with the status to answer.
        """
        self.check_space(len(meta) + stream.getbuffer().nbytes)
        stream.seek(0)                  # pynetdicom leaves it where its last fragment ended
        header = read_header(stream, transfer_syntax, sop_uid, sop_class_uid)
        return self._commit(header, sop_uid, sop_class_uid, transfer_syntax, sender,
                            lambda path: self.store.write_atomic(path, (meta, stream.getbuffer())))

    def spool(self, sop_class_uid: str, sop_uid: str, transfer_syntax: str) -> Spool:
        """A new file under the store's ``tmp`` for a C-STORE data set that is being received,
        its file meta information written (:func:`~node.dicom.wire.file_meta`)."""
        meta = file_meta(sop_class_uid, sop_uid, transfer_syntax)
        try:
            path, fh = self.store.open_part()
        except OSError as exc:              # the instance is read and refused with this reason
            spool = Spool(self.store.part_path(), None, len(meta), self)
            spool.error = f"cannot write the file: {exc.strerror or exc}"
            return spool
        spool = Spool(path, fh, len(meta), self)
        try:
            fh.write(meta)
        except OSError as exc:
            spool.error = f"cannot write the file: {exc.strerror or exc}"
        return spool

    def accept_spooled(self, spool: Spool, transfer_syntax: str, sop_uid: str, sop_class_uid: str,
                       sender: Sender) -> Accepted:
        """A C-STORE's data set received whole into ``spool``; on success the file is renamed
        into place, else it is left to the caller (pynetdicom removes it after the handler).

        Raises:
            Refused: with the status to answer.
        """
        spool.finish()
        if spool.error:
            spool.close()
            raise Refused(OUT_OF_RESOURCES, spool.error)
        # The file's fsync (the longest wait of all) runs while this thread reads the header.
        synced = self._syncer.submit(spool.sync) if self.store.fsync else None
        try:
            self.check_space(0)                 # the instance is on the disk already
            header = _read_spooled_header(spool, transfer_syntax, sop_uid, sop_class_uid)
        finally:
            error = _sync_error(synced)
            spool.close()
        if error or spool.error:
            raise Refused(OUT_OF_RESOURCES, error or spool.error)
        return self._commit(header, sop_uid, sop_class_uid, transfer_syntax, sender,
                            lambda path: self.store.commit_file(spool.path, path, synced=True))

    def accept_file(self, part: Path, sender: Sender, study_uid: str = "") -> Accepted:
        """A PS3.10 file received whole into ``part`` (a temporary file under the store's
        ``tmp``, as a STOW-RS part); on success it is renamed into place, else left to the caller.

        Raises:
            Refused: with the failure reason; ``study_uid`` (the request's target study), when
                given, must be the instance's.
        """
        sop_uid, sop_class_uid, ts, header = read_file_header(part)
        with _naming(sop_uid, sop_class_uid):
            self.check_space(part.stat().st_size)
            if study_uid and header.study_uid != study_uid:
                raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS, f"StudyInstanceUID {header.study_uid!r} is not "
                                                                f"the study of the request ({study_uid[:80]!r})")
            return self._commit(header, sop_uid, sop_class_uid, ts, sender,
                                lambda path: self.store.commit_file(part, path))

    def _commit(self, header: Header, sop_uid: str, sop_class_uid: str, ts: str, sender: Sender,
                write: Callable[[Path], int]) -> Accepted:
        path = self.store.image_path(header.study_uid, header.series_uid, sop_uid)
        existed = path.exists()
        try:
            size = write(path)
        except OSError as exc:          # ENOSPC, EIO, EDQUOT, ...: the temporary file is gone
            raise Refused(OUT_OF_RESOURCES, f"cannot write the file: {exc.strerror or exc}") from None
        try:
            replaced = self.db.record_instance(InstanceRecord(
                study_uid=header.study_uid, series_uid=header.series_uid, sop_instance_uid=sop_uid,
                sop_class_uid=sop_class_uid, transfer_syntax=ts, path=str(path), size=size,
                modality=header.modality, patient_id=header.patient_id, accession=header.accession,
                series_description=header.series_description, calling_aet=sender.calling_aet[:16],
                called_aet=sender.called_aet[:16], caller_address=sender.address[:64],
                patient_name=header.patient_name, study_date=header.study_date,
                study_description=header.study_description))
        except SQLAlchemyError as exc:  # the database is full, locked for too long or away
            if not existed:
                self.store.remove([str(path)])   # no row names it; the sender will send it again
            raise Refused(OUT_OF_RESOURCES, f"the database did not take the row: {first_line(exc)}") from None
        if replaced:
            self.store.remove([replaced])        # the same SOP Instance UID, re-sent in another series
            log.warning("%s from %s replaces the instance of the same SOP Instance UID in another series",
                        sop_uid, sender.calling_aet)
        self.metrics.stored(sender.calling_aet, size)
        log.debug("stored %s (%d bytes) from %s", sop_uid, size, sender.calling_aet)
        return Accepted(sop_uid, sop_class_uid, header, size)


def _sync_error(synced: Future[None] | None) -> str:
    """Wait for a spool's fsync; its failure as a refusal reason ("" when it succeeded)."""
    if synced is None:
        return ""
    try:
        synced.result()
    except OSError as exc:
        return f"cannot write the file: {exc.strerror or exc}"
    return ""


class Spool:
    """A C-STORE data set written to disk as its fragments arrive (pynetdicom's chunked-receive
    file protocol: ``name``, ``write``, ``file.flush``, ``close``). A write that fails (the disk
    full) or that would take the disk below ``ingest.min_free_disk_mb`` stops the writing; the
    rest of the data set is read and dropped, and the instance refused with ``error``."""

    #: The free space is checked again after each this many bytes.
    CHECK_EVERY = 64 * 1024 * 1024

    def __init__(self, path: Path, fh: BinaryIO | None, offset: int, intake: Intake) -> None:
        self.path = path
        self.name = str(path)
        self.offset = offset
        self.error = ""
        self._fh: BinaryIO | None = fh
        self._intake = intake
        self._unchecked = 0
        self.head = bytearray()             # the data set's first _HEAD_BYTES, kept for its header
        self.file = self

    def write(self, data: bytes) -> None:
        if len(self.head) < _HEAD_BYTES:
            self.head += data[:_HEAD_BYTES - len(self.head)]
        if self.error or self._fh is None:
            return
        try:
            self._fh.write(data)
            self._unchecked += len(data)
            if self._unchecked >= self.CHECK_EVERY:
                self._unchecked = 0
                self._intake.check_space(0)
        except OSError as exc:
            self.error = f"cannot write the file: {exc.strerror or exc}"
        except Refused as exc:
            self.error = str(exc)

    def flush(self) -> None:
        """Nothing: pynetdicom flushes after each fragment; the file is fsynced once, whole."""

    def finish(self) -> None:
        """The data set is complete: its last bytes leave Python's buffer for the file."""
        if self._fh is not None and not self.error:
            try:
                self._fh.flush()
            except OSError as exc:
                self.error = f"cannot write the file: {exc.strerror or exc}"

    def sync(self) -> None:
        """fsync the file (it stays open)."""
        if self._fh is not None:
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        if self._fh is not None:
            fh, self._fh = self._fh, None
            try:
                fh.close()
            except OSError as exc:
                self.error = self.error or f"cannot write the file: {exc.strerror or exc}"


def read_header(stream: BinaryIO, transfer_syntax: str, sop_uid: str, sop_class_uid: str,
                whole: bool = False) -> Header:
    """Read and check the header of a received data set (``stream`` is at its start). The data
    set is read up to (0020,000E) Series Instance UID; the rest (the pixel data) is not parsed.

    With ``whole``, ``stream`` holds only the data set's first bytes: a header that does not
    end within them raises :class:`_NotWithin` instead of a refusal.

    Raises:
        Refused: with the status to answer: the data set cannot be decoded, a UID is missing
            or invalid (a path is built from them), or it contradicts the request.
    """
    ts = UID(transfer_syntax)
    start = stream.tell()
    if not ts.is_deflated:
        _check_vr_encoding(stream.read(6), ts)
        stream.seek(start)
    stopped: list[bool] = []

    def past_header(tag: BaseTag, vr: str | None, length: int) -> bool:
        if tag > _LAST_HEADER_TAG:
            stopped.append(True)
            return True
        return False

    try:
        if ts.is_deflated:              # inflated as far as the header needs, never further
            ds = read_dataset(BytesIO(_inflate_head(stream)), False, True, stop_when=past_header)
        else:
            ds = read_dataset(stream, ts.is_implicit_VR, ts.is_little_endian, stop_when=past_header)
        values = {k: _text(ds, k) for k in _HEADER_KEYS}
    except Exception as exc:  # noqa: BLE001 - untrusted bytes: any failure to parse is a refusal
        if whole:
            raise _NotWithin() from None    # perhaps only cut off by the end of the bytes given
        # (seen: ValueError, EOFError, struct.error, zlib.error, KeyError, UnicodeError, ...)
        raise Refused(CANNOT_UNDERSTAND, f"data set cannot be decoded: {type(exc).__name__}: {exc}") from None
    finally:
        stream.seek(start)
    if whole and not stopped:
        raise _NotWithin()
    return _checked(values, sop_uid, sop_class_uid)


def _read_spooled_header(spool: Spool, transfer_syntax: str, sop_uid: str, sop_class_uid: str) -> Header:
    """:func:`read_header` of a spooled data set: from the first bytes the spool kept when the
    header ends within them, else from the file."""
    head = BytesIO(spool.head)
    if len(spool.head) < _HEAD_BYTES:       # the whole data set
        return read_header(head, transfer_syntax, sop_uid, sop_class_uid)
    try:
        return read_header(head, transfer_syntax, sop_uid, sop_class_uid, whole=True)
    except _NotWithin:
        with spool.path.open("rb") as fh:
            fh.seek(spool.offset)
            return read_header(fh, transfer_syntax, sop_uid, sop_class_uid)


class _NotWithin(Exception):
    """The header does not end within the bytes given."""


def _inflate_head(stream: BinaryIO) -> bytes:
    """The first :data:`_MAX_INFLATED_HEADER` bytes (at most) of a deflated data set."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = bytearray()
    while len(out) < _MAX_INFLATED_HEADER:
        chunk = stream.read(1024 * 1024)
        if not chunk:
            break
        out += inflater.decompress(chunk, _MAX_INFLATED_HEADER - len(out))
    return bytes(out)


def read_file_header(path: Path) -> tuple[str, str, str, Header]:
    """(SOP Instance UID, SOP Class UID, transfer syntax, header) of a PS3.10 file, checked as
    :func:`read_header` checks a C-STORE (the file meta information stands for the request).

    Raises:
        Refused: not a PS3.10 file, a transfer syntax or SOP class the node does not store, a
            file cut short, or the checks of :func:`read_header`.
    """
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
        ts = str(meta.get("TransferSyntaxUID", ""))
        sop_uid = str(meta.get("MediaStorageSOPInstanceUID", "")).strip()
        sop_class_uid = str(meta.get("MediaStorageSOPClassUID", "")).strip()
        group_length = int(meta.get("FileMetaInformationGroupLength", -1))
    except (InvalidDicomError, EOFError) as exc:
        raise Refused(CANNOT_UNDERSTAND, f"not a DICOM PS3.10 file (preamble, DICM, file meta): {exc}") from None
    except Exception as exc:  # noqa: BLE001 - untrusted bytes
        raise Refused(CANNOT_UNDERSTAND, f"file meta information cannot be read: {type(exc).__name__}: "
                                         f"{str(exc)[:200]}") from None
    with _naming(sop_uid[:64], sop_class_uid[:64]):
        return _check_file(path, sop_uid, sop_class_uid, ts, group_length)


@contextlib.contextmanager
def _naming(sop_uid: str, sop_class_uid: str) -> Iterator[None]:
    """A refusal raised inside names the instance (STOW-RS answers with its UIDs)."""
    try:
        yield
    except Refused as exc:
        exc.sop_uid, exc.sop_class_uid = sop_uid, sop_class_uid
        raise


def _check_file(path: Path, sop_uid: str, sop_class_uid: str, ts: str,
                group_length: int) -> tuple[str, str, str, Header]:
    if group_length < 0:
        raise Refused(CANNOT_UNDERSTAND, "file meta information without its group length (0002,0000)")
    if ts not in TRANSFER_SYNTAXES:
        raise Refused(TRANSFER_SYNTAX_NOT_SUPPORTED, f"transfer syntax {ts[:80]!r} is not one the node stores")
    if sop_class_uid not in STORAGE_SOP_CLASSES:
        raise Refused(SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class_uid[:80]!r} is not a storage SOP class")
    if not UID(ts).is_deflated:
        with path.open("rb") as fh:     # the data set follows the preamble, DICM and group 2
            fh.seek(128 + 4 + 12 + group_length)
            _check_vr_encoding(fh.read(6), UID(ts))
    try:
        ds = pydicom.dcmread(path, defer_size=4096, stop_before_pixels=False)
        check_complete(path, ds)
        values = {k: _text(ds, k) for k in _HEADER_KEYS}
    except Exception as exc:  # noqa: BLE001 - untrusted bytes
        raise Refused(CANNOT_UNDERSTAND, f"data set cannot be decoded: {type(exc).__name__}: "
                                         f"{str(exc)[:200]}") from None
    return sop_uid, sop_class_uid, ts, _checked(values, sop_uid, sop_class_uid)


def _checked(values: dict[str, str], sop_uid: str, sop_class_uid: str) -> Header:
    for name, uid in (("SOPInstanceUID", sop_uid), ("StudyInstanceUID", values["StudyInstanceUID"]),
                      ("SeriesInstanceUID", values["SeriesInstanceUID"])):
        if not valid_uid(uid):
            raise Refused(CANNOT_UNDERSTAND, f"{'Affected' if name == 'SOPInstanceUID' else ''}{name} "
                                             f"{uid[:80]!r} is missing or not a valid UID")
    if values["SOPInstanceUID"] != sop_uid:
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      f"SOPInstanceUID in the data set ({values['SOPInstanceUID'][:80]!r}) differs from the request")
    if sop_class_uid and values["SOPClassUID"] and values["SOPClassUID"] != sop_class_uid:
        raise Refused(DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      f"SOPClassUID in the data set ({values['SOPClassUID'][:80]!r}) differs from the request")
    return Header(study_uid=values["StudyInstanceUID"], series_uid=values["SeriesInstanceUID"],
                  modality=values["Modality"][:16], patient_id=values["PatientID"][:64],
                  accession=values["AccessionNumber"][:16], series_description=values["SeriesDescription"][:64],
                  patient_name=values["PatientName"][:64], study_date=values["StudyDate"][:8],
                  study_description=values["StudyDescription"][:64])


_VRS = frozenset(vr.encode() for vr in (
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
    "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"))


def _check_vr_encoding(head: bytes, ts: UID) -> None:
    """Refuse a data set whose first element is not encoded as the transfer syntax says.

    pydicom reads either encoding whatever it is told, but the stored file's meta information
    would then name the wrong transfer syntax and other readers (DCMTK) could not read it.
    """
    if len(head) < 6:
        return                                    # too short to tell; decoding decides
    explicit = head[4:6] in _VRS
    if ts.is_implicit_VR and explicit:
        raise Refused(CANNOT_UNDERSTAND, f"data set is encoded in explicit VR, but the presentation "
                                         f"context's transfer syntax is {ts.name}")
    if not ts.is_implicit_VR and not explicit:
        raise Refused(CANNOT_UNDERSTAND, f"data set is encoded in implicit VR, but the presentation "
                                         f"context's transfer syntax is {ts.name}")


#: The tags of :data:`_HEADER_KEYS`.
_HEADER_TAGS = {keyword: tag_for_keyword(keyword) for keyword in _HEADER_KEYS}
#: The VRs that these attributes have (None: implicit VR, the dictionary's, all text).
_TEXT_VRS = frozenset((None, "UI", "CS", "SH", "LO", "PN", "DA"))


def _text(ds: Dataset, keyword: str) -> str:
    """A header value as stripped text ('' when absent); multi-values joined by a backslash.

    A value still as read whose bytes are ASCII, with no backslash (one value), no escape
    (ISO 2022 code extensions) and, in a person's name, no component group ("=") is the same
    text in every character set: it is decoded here, as pydicom would decode it (trailing NULs
    and spaces go), without pydicom's conversion to its value types, which cost more than half
    of the header read.
    """
    raw = ds.get_item(_HEADER_TAGS[keyword])
    if (isinstance(raw, RawDataElement) and raw.VR in _TEXT_VRS and raw.value is not None
            and raw.value.isascii() and b"\\" not in raw.value and b"\x1b" not in raw.value
            and (keyword != "PatientName" or b"=" not in raw.value)):   # pydicom drops empty groups
        return raw.value.decode("ascii").rstrip("\x00 ").strip()
    return _converted_text(ds, keyword)


def _converted_text(ds: Dataset, keyword: str) -> str:
    """:func:`_text` by pydicom's conversion of the value (its character set, its types)."""
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value).strip()
    return str(value).strip()
