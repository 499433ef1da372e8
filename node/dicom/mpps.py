"""The MPPS SCP: Modality Performed Procedure Step N-CREATE and N-SET (PS3.4 F.7).

Each step is recorded with the instances its Performed Series Sequence references; when it is
COMPLETED (or DISCONTINUED, per ``ingest.mpps_discontinued``) the assemble stage gives its
series their evidence of completion once every referenced instance has arrived
(:mod:`node.routing.assembler`). Every answer is a named status with one log line.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from pynetdicom import evt

from node.errors import first_line
from node.storage.db import Database
from node.storage.files import valid_uid

log = logging.getLogger(__name__)

SUCCESS = 0x0000
INVALID_ATTRIBUTE_VALUE = 0x0106
PROCESSING_FAILURE = 0x0110
DUPLICATE_SOP_INSTANCE = 0x0111
NO_SUCH_SOP_INSTANCE = 0x0112


class MppsService:
    """The N-CREATE and N-SET handlers of the listener."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def on_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-CREATE of a Modality Performed Procedure Step: record it (PS3.4 F.7)."""
        uid = str(event.request.AffectedSOPInstanceUID or "")
        calling = event.assoc.requestor.ae_title.strip()
        if not valid_uid(uid):
            log.warning("MPPS N-CREATE from %s refused: Affected SOP Instance UID %r missing or invalid",
                        calling, uid[:80])
            return INVALID_ATTRIBUTE_VALUE, None
        try:
            attrs = event.attribute_list
            status = str(attrs.get("PerformedProcedureStepStatus", "") or "").strip().upper()
            references = _mpps_references(attrs)
            study = attrs.get("ScheduledStepAttributesSequence")
            study_uid = str(study[0].get("StudyInstanceUID", "")) if study else ""
        except Exception as exc:  # noqa: BLE001 - a peer's data set: any failure to read is its fault
            log.warning("MPPS N-CREATE %s from %s refused: %s", uid, calling, first_line(exc))
            return PROCESSING_FAILURE, None
        if status != "IN PROGRESS":
            log.warning("MPPS N-CREATE %s from %s refused: status %r, must be IN PROGRESS", uid, calling, status)
            return INVALID_ATTRIBUTE_VALUE, None
        if not self.db.create_mpps(uid, status, calling, study_uid[:64], references):
            log.warning("MPPS N-CREATE %s from %s refused: it exists already", uid, calling)
            return DUPLICATE_SOP_INSTANCE, None
        self.db.audit(f"{calling}@{event.assoc.requestor.address}", "mpps", uid, status=status,
                      series=len(references))
        log.info("MPPS %s from %s: IN PROGRESS", uid, calling)
        return SUCCESS, attrs

    def on_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-SET of an MPPS: its status (COMPLETED, DISCONTINUED) and the series it performed."""
        uid = str(event.request.RequestedSOPInstanceUID or "")
        calling = event.assoc.requestor.ae_title.strip()
        try:
            mods = event.attribute_list
            status = str(mods.get("PerformedProcedureStepStatus", "") or "").strip().upper() or None
            references = _mpps_references(mods) if "PerformedSeriesSequence" in mods else None
        except Exception as exc:  # noqa: BLE001
            log.warning("MPPS N-SET %s from %s refused: %s", uid, calling, first_line(exc))
            return PROCESSING_FAILURE, None
        if status not in (None, "IN PROGRESS", "COMPLETED", "DISCONTINUED"):
            log.warning("MPPS N-SET %s from %s refused: status %r", uid, calling, status)
            return INVALID_ATTRIBUTE_VALUE, None
        before = self.db.set_mpps(uid, status, references)
        if before is None:
            log.warning("MPPS N-SET %s from %s refused: no such MPPS", uid, calling)
            return NO_SUCH_SOP_INSTANCE, None
        if before in ("COMPLETED", "DISCONTINUED"):
            log.warning("MPPS N-SET %s from %s refused: it is %s and may no longer be updated", uid, calling, before)
            return PROCESSING_FAILURE, None
        self.db.audit(f"{calling}@{event.assoc.requestor.address}", "mpps", uid, status=status or before)
        log.info("MPPS %s from %s: %s", uid, calling, status or before)
        return SUCCESS, mods


#: An MPPS may reference at most this many instances (a bound on what a peer makes us keep).
MAX_MPPS_INSTANCES = 100_000


def _mpps_references(attrs: Dataset) -> dict[str, list[str]]:
    """{series_uid: [sop_instance_uid, ...]} from a Performed Series Sequence.

    Raises:
        ValueError: an invalid UID, or more than :data:`MAX_MPPS_INSTANCES` instances.
    """
    out: dict[str, list[str]] = {}
    total = 0
    for item in attrs.get("PerformedSeriesSequence", None) or []:
        series_uid = str(item.get("SeriesInstanceUID", "") or "")
        if not valid_uid(series_uid):
            raise ValueError(f"Performed Series Sequence: Series Instance UID {series_uid[:80]!r} invalid")
        sops = out.setdefault(series_uid, [])
        for keyword in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for ref in item.get(keyword, None) or []:
                sop = str(ref.get("ReferencedSOPInstanceUID", "") or "")
                if not valid_uid(sop):
                    raise ValueError(f"{keyword}: Referenced SOP Instance UID {sop[:80]!r} invalid")
                total += 1
                if total > MAX_MPPS_INSTANCES:
                    raise ValueError(f"more than {MAX_MPPS_INSTANCES} referenced instances")
                sops.append(sop)
    return out

