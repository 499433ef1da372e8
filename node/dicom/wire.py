"""Encoders for the two small, fixed structures the ingest path writes for every instance.

pydicom and pynetdicom encode them through a general Dataset (each element set, validated,
then written by the generic writer, the command set twice for its group length): about a
millisecond per instance, a good part of the per-instance CPU. These produce the same bytes
directly (``tests/test_wire.py`` compares them with pydicom's and pynetdicom's encoding):

* :func:`file_meta` — the preamble, ``DICM`` and the File Meta Information group that
  precedes a received data set in its PS3.10 file, as
  ``b"\\0" * 128 + b"DICM" + encode_file_meta(create_file_meta(...))``;
* :func:`c_store_rsp` — the P-DATA-TF PDU of a C-STORE response (PS3.7 9.3.1.2), as
  pynetdicom's DIMSE provider would send it for a response with a status and no error
  comment or offending element.
"""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

_PREAMBLE = b"\x00" * 128 + b"DICM"


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    # A received UID that is not ASCII is refused by the header checks before any file is
    # written; "replace" only keeps this encoder total.
    return _even(value.encode("ascii", "replace"), b"\x00")


_META_TAIL = (_explicit(0x0002, 0x0012, b"UI", _uid(str(PYNETDICOM_IMPLEMENTATION_UID)))
              + _explicit(0x0002, 0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii"), b" ")))
_META_VERSION = struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (Explicit VR Little Endian) of a file."""
    body = (_META_VERSION
            + _explicit(0x0002, 0x0002, b"UI", _uid(sop_class_uid))
            + _explicit(0x0002, 0x0003, b"UI", _uid(sop_instance_uid))
            + _explicit(0x0002, 0x0010, b"UI", _uid(transfer_syntax))
            + _META_TAIL)
    return _PREAMBLE + struct.pack("<HH2sHL", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _implicit(element: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


_C_STORE_RSP = struct.pack("<H", 0x8001)
_NO_DATA_SET = struct.pack("<H", 0x0101)


def c_store_rsp(context_id: int, message_id: int, sop_class_uid: str, sop_instance_uid: str,
                status: int) -> bytes:
    """The whole P-DATA-TF PDU of a C-STORE-RSP: one PDV, command, last fragment."""
    elements = (_implicit(0x0002, _uid(sop_class_uid))
                + _implicit(0x0100, _C_STORE_RSP)
                + _implicit(0x0120, struct.pack("<H", message_id))
                + _implicit(0x0800, _NO_DATA_SET)
                + _implicit(0x0900, struct.pack("<H", status))
                + _implicit(0x1000, _uid(sop_instance_uid)))
    command = _implicit(0x0000, struct.pack("<L", len(elements))) + elements
    pdv = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command
    return struct.pack(">BBL", 0x04, 0x00, len(pdv)) + pdv
