"""Result objects to DICOM files (PS3.10), byte for byte as pydicom writes them, faster.

pydicom spends ~40 µs on each element it writes, most of it in checks that a dataset built
in memory needs only once (ambiguous VRs, character sets), repeated for every item of every
sequence. A SEG of a 300-slice CT has 840 per-frame functional group items, ~5,000 nested
datasets in all, and pydicom took 0.6-0.8 s to write it. Here the top-level sequences are
encoded by :func:`sequence_bytes` (Explicit VR Little Endian, the transfer syntax of every
result the node makes), handed to pydicom as already-encoded elements, and pydicom writes
the file: preamble, file meta, every other element. An element this encoder does not know
(a VR other than those below, text that is not ASCII, an empty value that is not ``None``)
is written by pydicom's own element writer; a nested element with an ambiguous VR, or one
not yet decoded, sends the whole object to pydicom's writer. The test suite compares the
bytes with pydicom's on every kind of result object.
"""

from __future__ import annotations

import struct
from io import BytesIO

from pydicom.charset import convert_encodings, default_encoding
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr_element, write_data_element
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)
_SHORT = struct.Struct("<HH2sH")          # tag, VR, 16-bit length
_LONG = struct.Struct("<HH2s2xI")         # tag, VR, reserved, 32-bit length
_NUMBERS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FD": "d", "FL": "f"}
_TEXT = frozenset({"CS", "SH", "LO", "AE", "AS", "DA", "TM", "DT", "ST", "LT"})
_NUMBER_STRINGS = frozenset({"DS", "IS"})


class _Unsupported(Exception):
    """An element that only pydicom's full writer handles right: write the whole object there."""


def part10_bytes(ds: Dataset) -> bytes:
    """``ds`` as a DICOM file: the same bytes as ``ds.save_as(..., enforce_file_format=True)``.

    Ambiguous VRs of top-level elements are resolved in ``ds`` itself, as pydicom's writer does.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") != ExplicitVRLittleEndian:
        return _pydicom_file(ds)
    encodings = _encodings(ds, default_encoding)
    shell = Dataset()
    try:
        for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset gives its elements, decoded
            elem = ds.get_item(tag)
            if isinstance(elem, DataElement) and elem.VR == "SQ":
                value = _sequence_value(elem, encodings)
                elem = RawDataElement(elem.tag, "SQ", len(value), value, 0, False, True)
            elif isinstance(elem, DataElement) and " or " in (elem.VR or ""):
                elem = correct_ambiguous_vr_element(elem, ds, True)
            shell[tag] = elem
    except _Unsupported:
        return _pydicom_file(ds)
    shell.file_meta = meta
    shell.preamble = getattr(ds, "preamble", None)
    # Tells pydicom's writer that the elements are already in this encoding, so that it writes
    # the encoded sequences as they are, without decoding and checking them again. The
    # character set is given as the data set reports its own (the default one as a plain
    # name), or the writer would see a change of character set and decode them after all.
    charset = ds.get("SpecificCharacterSet")
    shell.set_original_encoding(False, True, convert_encodings(charset) if charset else default_encoding)
    return _pydicom_file(shell)


def _pydicom_file(ds: Dataset) -> bytes:
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _encodings(ds: Dataset, parent: str | list[str]) -> list[str]:
    """The character sets of ``ds``'s text, chosen as pydicom's writer chooses them."""
    return convert_encodings(ds.get("SpecificCharacterSet", parent) or default_encoding)


def _sequence_value(elem: DataElement, encodings: list[str]) -> bytes:
    if elem.is_undefined_length:
        raise _Unsupported(f"{elem.tag} has an undefined length")
    return sequence_bytes(elem.value, encodings) if elem.value else b""


def sequence_bytes(items: list[Dataset], encodings: list[str]) -> bytes:
    """The value of a sequence element: its items, each with its defined length.

    Raises:
        _Unsupported: an element needs pydicom's full writer.
    """
    parts: list[bytes] = []
    for item in items:
        if getattr(item, "is_undefined_length_sequence_item", False):
            raise _Unsupported("an item of undefined length")
        body = _dataset_bytes(item, encodings)
        parts.append(_ITEM + struct.pack("<I", len(body)))
        parts.append(body)
    return b"".join(parts)


def _dataset_bytes(ds: Dataset, parent_encodings: list[str]) -> bytes:
    encodings = _encodings(ds, parent_encodings)
    parts: list[bytes] = []
    for tag in sorted(ds.keys()):
        if tag.element == 0 and tag.group > 6:       # retired group lengths are not written
            continue
        elem = ds.get_item(tag)
        if not isinstance(elem, DataElement):
            raise _Unsupported(f"{tag} is not decoded")
        vr = elem.VR
        if vr == "SQ":
            encoded = _sequence_value(elem, encodings)
            parts.append(_LONG.pack(tag.group, tag.element, b"SQ", len(encoded)))
            parts.append(encoded)
            continue
        if vr is None or len(vr) != 2:
            raise _Unsupported(f"{tag} has the ambiguous VR {vr}")
        encoded = _value_bytes(vr, elem.value)
        if encoded is None or len(encoded) > 0xFFFF:
            parts.append(_pydicom_element(elem, encodings))
        else:
            parts.append(_SHORT.pack(tag.group, tag.element, vr.encode(), len(encoded)))
            parts.append(encoded)
    return b"".join(parts)


def _value_bytes(vr: str, value: object) -> bytes | None:
    """The encoded value, padded to even length; None where pydicom should write it."""
    if value is None:
        return b""
    if vr == "UI":
        text = value if isinstance(value, str) else None
        pad = b"\0"
    elif vr in _TEXT:
        text = _joined(value)
        pad = b" "
    elif vr in _NUMBER_STRINGS:
        if isinstance(value, MultiValue):
            text = "\\".join(_number_string(v) for v in value)
        else:
            text = _number_string(value)
        pad = b" "
    elif vr in _NUMBERS:
        values = value if isinstance(value, MultiValue) else (value,)
        number = (int, float) if vr in ("FD", "FL") else int
        if not all(isinstance(v, number) and not isinstance(v, bool) for v in values):
            return None
        try:
            return struct.pack(f"<{len(values)}{_NUMBERS[vr]}", *values)
        except struct.error:          # out of range: pydicom's writer says so
            return None
    else:
        return None
    if text is None or text == "" or not text.isascii():
        return None
    encoded = text.encode("ascii")
    return encoded + pad if len(encoded) % 2 else encoded


def _joined(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, MultiValue) and all(isinstance(v, str) for v in value):
        return "\\".join(value)
    return None


def _number_string(value: object) -> str:
    original = getattr(value, "original_string", None)
    return original if original is not None else str(value)


def _pydicom_element(elem: DataElement, encodings: list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()
