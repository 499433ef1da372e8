"""Results: model output encoded as DICOM SEG and TID 1500 SR (:mod:`.encode`)."""
