"""The ingest path's own encoders produce exactly what pydicom and pynetdicom produce."""

from __future__ import annotations

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu import P_DATA_TF

from node.dicom.wire import c_store_rsp, file_meta

CT = "1.2.840.10008.5.1.4.1.1.2"
UIDS = ["1.2.3", "1.2.34", "1.2.826.0.1.3680043.10.1." + "7" * 38, "1.2.826.0.1.3680043.10.1." + "7" * 39]


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless])
def test_file_meta_is_pynetdicoms(sop_uid, ts):
    expected = b"\x00" * 128 + b"DICM" + encode_file_meta(create_file_meta(
        sop_class_uid=CT, sop_instance_uid=sop_uid, transfer_syntax=ts))
    assert file_meta(CT, sop_uid, ts) == expected


def _pynetdicom_rsp(context_id: int, message_id: int, sop_uid: str, status: int) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CT
    rsp.AffectedSOPInstanceUID = sop_uid
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(context_id, 16384))
    pdu = P_DATA_TF()
    pdu.from_primitive(pdata)
    return pdu.encode()


@pytest.mark.parametrize("sop_uid", UIDS)
@pytest.mark.parametrize("context_id, message_id, status", [(1, 1, 0x0000), (255, 65535, 0xA700), (7, 300, 0xC000)])
def test_c_store_rsp_is_pynetdicoms(context_id, message_id, sop_uid, status):
    assert c_store_rsp(context_id, message_id, CT, sop_uid, status) == \
        _pynetdicom_rsp(context_id, message_id, sop_uid, status)
