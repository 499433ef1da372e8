"""Encode stage: model output to DICOM result objects.

A segmentation becomes a DICOM Segmentation (SEG, BINARY, one segment per manifest segment,
SNOMED CT coded) and a Comprehensive 3D SR with a TID 1500 Measurement Report holding one
volume per segment, each referencing its SEG segment. A classification becomes a TID 1500
SR with, per finding, the coded finding, its probability, whether it is present (above its
threshold) and, when present, the triage priority.

Every UID of an output is derived from the job key, so encoding the same job again yields
the same objects' identities and a re-send replaces rather than duplicates.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import highdicom._standard_utils
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node import __version__
from node.errors import InputError
from node.inference.manifest import Algorithm, Code as ManifestCode, ModelManifest
from node.results.part10 import part10_bytes


def _remember_iod_answers() -> None:
    """highdicom asks whether an IOD allows multiple frames once per source image (300 times
    for a 300-slice CT), each time by walking the IOD's modules and their attributes in its
    tables: ~0.1 s of building the SEG. The answer depends on those static tables only, so it
    is kept (a bounded cache; an unknown SOP class still raises each time). A highdicom whose
    function is gone or changed shape is left as it is."""
    original = getattr(highdicom._standard_utils, "is_attribute_in_iod", None)
    if original is None or hasattr(original, "cache_info"):
        return

    @functools.lru_cache(maxsize=4096)
    def answer(attribute: str, sop_class_uid: str, exclude: tuple[str, ...] | None) -> bool:
        return bool(original(attribute, sop_class_uid, None if exclude is None else list(exclude)))

    @functools.wraps(original)
    def is_attribute_in_iod(attribute: str, sop_class_uid: str,
                            exclude_path_elements: Sequence[str] | None = None) -> bool:
        return answer(attribute, str(sop_class_uid),
                      None if exclude_path_elements is None else tuple(exclude_path_elements))

    is_attribute_in_iod.cache_info = answer.cache_info  # type: ignore[attr-defined]
    highdicom._standard_utils.is_attribute_in_iod = is_attribute_in_iod


_remember_iod_answers()

SEG_SERIES_NUMBER = 9901
SEGMENTATION_SR_SERIES_NUMBER = 9902
CLASSIFICATION_SR_SERIES_NUMBER = 9903
MANUFACTURER = "pacs-ai-node"

_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacs-ai-node:result-uid")
_MILLILITER = Code("ml", "UCUM", "milliliter")
_NO_UNITS = Code("1", "UCUM", "no units")
# CID 100 Quantitative Diagnostic Imaging Procedures, by Modality. Radiographs (CR, DX) get the
# generic "Imaging procedure": "XR unspecified body region" (LN 43468-8) joined CID 100 only in
# recent editions, and validators built on older ones (PixelMed 2022) refuse it.
_PROCEDURES = {
    "CT": Code("25045-6", "LN", "CT unspecified body region"),
    "MR": Code("25056-3", "LN", "MRI unspecified body region"),
    "PT": Code("44136-0", "LN", "PET unspecified body region"),
    "NM": Code("49118-3", "LN", "NM unspecified body region"),
}
_MAX_SOURCE_PROCEDURES = 4
#: Slices summed at once when checking whether segments overlap (bounds the memory).
OVERLAP_CHUNK_SLICES = 16
_PRIORITIES = {
    "stat": Code("49499008", "SCT", "Stat"),
    "urgent": Code("103391001", "SCT", "Urgent"),
    "routine": Code("50811001", "SCT", "Routine"),
}
_PRIORITY = Code("260870009", "SCT", "Priority")


def source_procedures(source: pydicom.Dataset) -> list[hd.sr.CodedConcept]:
    """The source's own coded procedure (``ProcedureCodeSequence``, as the hospital coded it),
    for the SR's Performed Procedure Code Sequence; malformed items are left out."""
    out: dict[tuple[str, str], hd.sr.CodedConcept] = {}
    for item in list(source.get("ProcedureCodeSequence", []) or [])[:_MAX_SOURCE_PROCEDURES]:
        value = str(item.get("CodeValue", "") or "").strip()
        scheme = str(item.get("CodingSchemeDesignator", "") or "").strip()
        meaning = str(item.get("CodeMeaning", "") or "").strip()
        if 0 < len(value) <= 16 and 0 < len(scheme) <= 16 and 0 < len(meaning) <= 64:
            out.setdefault((value, scheme), hd.sr.CodedConcept(value, scheme, meaning))
    return list(out.values())


def derive_uid(*parts: str) -> str:
    """Return the UID ``2.25.<n>`` that belongs to ``parts``; equal parts give equal UIDs."""
    key = "".join(f"{len(p)}:{p};" for p in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, key).int}"


@dataclass(frozen=True)
class SegmentVolume:
    """Size of one segment: ``label`` as in the manifest, ``volume_ml`` in millilitres."""

    label: int
    name: str
    voxels: int
    volume_ml: float


@dataclass(frozen=True)
class SegmentationResult:
    """The SEG, the SR that measures it, and the volumes written into the SR."""

    seg: pydicom.Dataset
    sr: pydicom.Dataset
    volumes: tuple[SegmentVolume, ...]


@dataclass(frozen=True)
class FindingResult:
    """One classified finding; ``priority`` is only meaningful when ``positive``."""

    name: str
    probability: float
    positive: bool
    priority: str


def encode_segmentation(sources: Sequence[pydicom.Dataset], masks: np.ndarray,
                        manifest: ModelManifest, job_key: str,
                        frames: Sequence[int] = ()) -> SegmentationResult:
    """Encode per-segment masks of a series as a SEG and a volumetric TID 1500 SR.

    ``sources`` are the series' images (headers suffice) in the order of ``masks`` axis 0;
    ``masks`` is boolean ``(slices, rows, columns, segments)`` with channel ``i`` being
    ``manifest.segments[i]``. Segments may overlap and may be empty. For an enhanced
    multi-frame image, ``sources`` repeats its dataset once per slice and ``frames`` gives
    each slice's 1-based frame number (as :class:`~node.inference.volume.SeriesVolume` has them).

    Raises:
        InputError: the masks do not match the sources or the manifest, or the series
            geometry cannot give a slice spacing.
    """
    images, geometry, order = _sources(sources, frames)
    _check_masks(geometry, masks, manifest)
    planes = _channel_planes(masks)
    counts = _voxel_counts(planes)
    volumes = _volumes(geometry, counts, manifest)

    tracking_uids = tuple(derive_uid(job_key, f"segment-{i + 1}")
                          for i in range(len(manifest.segments)))
    if order is not None:                      # the SEG's frames follow the source's frames
        planes, counts = planes[:, order], counts[order]
    pixel_array, overlap = _pixel_array(planes, counts)
    seg = _segmentation(images, pixel_array, overlap, manifest, job_key, tracking_uids)
    algorithm_id = _algorithm_id(manifest.algorithm)
    source_series = hd.sr.SourceSeriesForSegmentation(images[0].SeriesInstanceUID)
    groups = [
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=tracking_uids[i], identifier=_lo(segment.name)),
            referenced_segment=hd.sr.ReferencedSegment(
                sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                segment_number=i + 1, source_series=source_series),
            finding_type=_code(segment.type),
            finding_category=_code(segment.category),
            measurements=[hd.sr.Measurement(
                name=codes.SCT.Volume, value=volume.volume_ml, unit=_MILLILITER,
                algorithm_id=algorithm_id)])
        for i, (segment, volume) in enumerate(zip(manifest.segments, volumes))]
    sr = _report(images, [seg], groups, manifest, job_key, "segmentation-sr",
                 SEGMENTATION_SR_SERIES_NUMBER)
    return SegmentationResult(seg=seg, sr=sr, volumes=volumes)


def warm_up(manifest: ModelManifest) -> float:
    """Encode and write a SEG and its SR once, on a made-up 2 x 8 x 8 series; returns the
    seconds. A process's first SEG costs highdicom's start (its tables, first use of its code:
    ~0.5 s more than the next, measured on a 300-slice CT), which otherwise lands on the
    first study's result."""
    t = time.perf_counter()
    sources = []
    for k in range(2):
        ds = Dataset()
        ds.SOPClassUID = pydicom.uid.CTImageStorage
        ds.SOPInstanceUID = derive_uid("warm-up", "image", str(k))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = (
            derive_uid("warm-up", part) for part in ("study", "series", "frame of reference"))
        ds.Modality, ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "CT", "WARM-UP", "", "", ""
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "", "", "", "", ""
        ds.SeriesNumber, ds.InstanceNumber, ds.Rows, ds.Columns = 1, k + 1, 8, 8
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 1.0
        ds.ImageOrientationPatient, ds.ImagePositionPatient = [1, 0, 0, 0, 1, 0], [0, 0, float(k)]
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.BitsAllocated = 1, "MONOCHROME2", 16
        ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 12, 11, 0
        sources.append(ds)
    masks = np.zeros((2, 8, 8, len(manifest.segments)), dtype=bool)
    masks[:, 2:6, 2:6] = True
    result = encode_segmentation(sources, masks, manifest, "warm-up")
    for ds in (result.seg, result.sr):
        part10_bytes(ds)
    return time.perf_counter() - t


def encode_classification(sources: Sequence[pydicom.Dataset], scores: np.ndarray,
                          manifest: ModelManifest, job_key: str
                          ) -> tuple[pydicom.Dataset, tuple[FindingResult, ...]]:
    """Encode per-finding probabilities of a series as a TID 1500 SR.

    ``scores[finding.index]`` is the probability of each manifest finding; a finding is
    positive when its probability reaches its threshold.

    Raises:
        InputError: ``scores`` is too short for the manifest's finding indices.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if not sources:
        raise InputError("encode: no source images")
    sources = list({id(ds): ds for ds in sources}.values())     # a multi-frame image once
    if manifest.findings and max(f.index for f in manifest.findings) >= scores.size:
        raise InputError(f"encode: {scores.size} scores for findings of {manifest.name} "
                         f"up to index {max(f.index for f in manifest.findings)}")
    algorithm_id = _algorithm_id(manifest.algorithm)
    results = []
    groups = []
    for finding in manifest.findings:
        probability = float(scores[finding.index])
        positive = probability >= finding.threshold
        results.append(FindingResult(name=finding.name, probability=probability,
                                     positive=positive, priority=finding.priority))
        evaluations = [hd.sr.QualitativeEvaluation(
            name=_code(finding.code),
            value=codes.SCT.Present if positive else codes.SCT.Absent)]
        if positive:
            evaluations.append(hd.sr.QualitativeEvaluation(
                name=_PRIORITY, value=_PRIORITIES[finding.priority]))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(job_key, f"finding-{finding.index}"),
                identifier=_lo(finding.name)),
            finding_type=_code(finding.code),
            algorithm_id=algorithm_id,
            measurements=[hd.sr.Measurement(
                name=codes.DCM.Probability, value=probability, unit=_NO_UNITS,
                algorithm_id=algorithm_id)],
            qualitative_evaluations=evaluations))
    sr = _report(sources, [], groups, manifest, job_key, "classification-sr",
                 CLASSIFICATION_SR_SERIES_NUMBER)
    return sr, tuple(results)


def encode_image_classifications(images: Sequence[tuple[pydicom.Dataset, np.ndarray]], manifest: ModelManifest,
                                 job_key: str) -> tuple[pydicom.Dataset, tuple[FindingResult, ...], list[dict]]:
    """One TID 1500 SR for a series of separately classified images: a measurement group per
    image and finding, each referencing its image; and the series' findings (per finding, the
    most probable image; positive when any image is).

    Returns the SR, the series' findings and, per image, its SOP Instance UID and findings.

    Raises:
        InputError: no images, or scores too short for the manifest's finding indices.
    """
    if not images:
        raise InputError("encode: no source images")
    algorithm_id = _algorithm_id(manifest.algorithm)
    groups, per_image = [], []
    best: dict[str, FindingResult] = {}
    for k, (ds, scores) in enumerate(images):
        scores = np.asarray(scores, dtype=np.float64).ravel()
        if manifest.findings and max(f.index for f in manifest.findings) >= scores.size:
            raise InputError(f"encode: {scores.size} scores for findings of {manifest.name}")
        mine = []
        for finding in manifest.findings:
            probability = float(scores[finding.index])
            positive = probability >= finding.threshold
            result = FindingResult(name=finding.name, probability=probability, positive=positive,
                                   priority=finding.priority)
            mine.append(dict(name=finding.name, probability=round(probability, 4), positive=positive))
            if finding.name not in best or probability > best[finding.name].probability:
                best[finding.name] = result
            evaluations = [hd.sr.QualitativeEvaluation(
                name=_code(finding.code), value=codes.SCT.Present if positive else codes.SCT.Absent)]
            if positive:
                evaluations.append(hd.sr.QualitativeEvaluation(name=_PRIORITY, value=_PRIORITIES[finding.priority]))
            groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derive_uid(job_key, f"finding-{finding.index}", str(ds.SOPInstanceUID)),
                    identifier=_lo(f"{finding.name}, image {k + 1}")),
                finding_type=_code(finding.code),
                algorithm_id=algorithm_id,
                source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(ds)],
                measurements=[hd.sr.Measurement(name=codes.DCM.Probability, value=probability, unit=_NO_UNITS,
                                                algorithm_id=algorithm_id)],
                qualitative_evaluations=evaluations))
        per_image.append(dict(sop_instance_uid=str(ds.SOPInstanceUID), findings=mine))
    sr = _report([ds for ds, _ in images], [], groups, manifest, job_key, "classification-sr",
                 CLASSIFICATION_SR_SERIES_NUMBER)
    return sr, tuple(best[f.name] for f in manifest.findings), per_image


def _segmentation(sources: Sequence[pydicom.Dataset], pixel_array: np.ndarray, overlap: bool,
                  manifest: ModelManifest, job_key: str,
                  tracking_uids: Sequence[str]) -> hd.seg.Segmentation:
    """A BINARY SEG with segment ``i + 1`` for ``manifest.segments[i]``."""
    algorithm = manifest.algorithm
    algorithm_seq = hd.AlgorithmIdentificationSequence(
        name=algorithm.name, family=_algorithm_family(algorithm),
        version=algorithm.version, source=algorithm.manufacturer)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=_lo(segment.name),
            segmented_property_category=_code(segment.category),
            segmented_property_type=_code(segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_seq,
            tracking_uid=tracking_uids[i],
            tracking_id=_lo(segment.name),
            display_color=hd.color.CIELabColor.from_rgb(*segment.color))
        for i, segment in enumerate(manifest.segments)]
    try:
        seg = _Segmentation(
            segments_overlap=overlap,
            source_images=sources,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=derive_uid(job_key, "seg-series"),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=derive_uid(job_key, "seg-instance"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=_lo(algorithm.name),
            software_versions=_software_versions(manifest),
            device_serial_number=_lo(f"{manifest.name}-{manifest.version}"),
            content_label="AI_SEGMENTATION",
            content_description=_lo(f"{algorithm.name} {algorithm.version}"),
            content_creator_name=f"{MANUFACTURER}^",
            series_description=_series_description("SEG", manifest),
            omit_empty_frames=True)
    except ValueError as exc:          # highdicom's message names the rule that was broken
        raise InputError(f"encode: cannot derive a SEG from the series: {exc}") from exc
    # The source's body part, which hanging protocols and worklists use (General Series, type 3).
    body_part = str(sources[0].get("BodyPartExamined", "") or "").strip()
    if body_part:
        seg.BodyPartExamined = body_part[:16]
    # highdicom draws this UID at random; derive it so that a re-run is identical.
    uid = derive_uid(job_key, "seg-dimension-organization")
    for item in [*seg.DimensionOrganizationSequence, *seg.DimensionIndexSequence]:
        item.DimensionOrganizationUID = uid
    return seg


def _report(sources: Sequence[pydicom.Dataset], results: Sequence[pydicom.Dataset],
            groups: Sequence[hd.sr.MeasurementsAndQualitativeEvaluations],
            manifest: ModelManifest, job_key: str, purpose: str,
            series_number: int) -> hd.sr.Comprehensive3DSR:
    """A Comprehensive 3D SR with a TID 1500 Measurement Report of ``groups``."""
    algorithm = manifest.algorithm
    observer = _device_observer(manifest)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_PROCEDURES.get(str(sources[0].get("Modality", "")),
                                           codes.SCT.ImagingProcedure),
        imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*sources, *results],
        content=report[0],
        series_instance_uid=derive_uid(job_key, f"{purpose}-series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(job_key, f"{purpose}-instance"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        performed_procedure_codes=source_procedures(sources[0]) or None)
    sr.SeriesDescription = _series_description("SR", manifest)
    sr.ManufacturerModelName = _lo(algorithm.name)
    sr.SoftwareVersions = _software_versions(manifest)
    return sr


def _sources(sources: Sequence[pydicom.Dataset], frames: Sequence[int]
             ) -> tuple[list[pydicom.Dataset], list[pydicom.Dataset], np.ndarray | None]:
    """(source images, per-slice geometry, slice order of the source's frames or None).

    Single-frame images are their own geometry. The frames of a multi-frame image get a
    small dataset each with the position, orientation and spacing of their functional
    groups.
    """
    if not frames or not any(frames):
        return list(sources), list(sources), None
    if len({id(ds) for ds in sources}) != 1:
        raise InputError("encode: slices from more than one multi-frame image")
    image = sources[0]
    if sorted(frames) != list(range(1, int(image.get("NumberOfFrames", 1)) + 1)):
        raise InputError("encode: the slices are not every frame of the multi-frame image")
    geometry = []
    for frame in frames:
        item = pydicom.Dataset()
        item.Rows, item.Columns = image.Rows, image.Columns
        for group, keyword in _FRAME_GEOMETRY:
            value = _functional_group(image, frame - 1, group, keyword)
            if value is not None:
                setattr(item, keyword, value)
        geometry.append(item)
    return [image], geometry, np.argsort(np.asarray(frames), kind="stable")


_FRAME_GEOMETRY = (("PlanePositionSequence", "ImagePositionPatient"),
                   ("PlaneOrientationSequence", "ImageOrientationPatient"),
                   ("PixelMeasuresSequence", "PixelSpacing"),
                   ("PixelMeasuresSequence", "SliceThickness"),
                   ("PixelMeasuresSequence", "SpacingBetweenSlices"))


def _functional_group(ds: pydicom.Dataset, index: int, group: str, keyword: str) -> object:
    """``keyword`` of functional group ``group`` for frame ``index``: per-frame, else shared."""
    for sequence, item in (("PerFrameFunctionalGroupsSequence", index),
                           ("SharedFunctionalGroupsSequence", 0)):
        seq = ds.get(sequence)
        if seq is not None and item < len(seq) and seq[item].get(group):
            value = seq[item].get(group)[0].get(keyword)
            if value is not None:
                return value
    return None


def _check_masks(sources: Sequence[pydicom.Dataset], masks: np.ndarray,
                 manifest: ModelManifest) -> None:
    if not sources:
        raise InputError("encode: no source images")
    if masks.dtype != np.bool_ or masks.ndim != 4:
        raise InputError(f"encode: masks must be a 4-D bool array, got {masks.ndim}-D "
                         f"{masks.dtype}")
    expected = (len(sources), int(sources[0].Rows), int(sources[0].Columns),
                len(manifest.segments))
    if masks.shape != expected:
        raise InputError(f"encode: masks shape {masks.shape} does not match "
                         f"(slices, rows, columns, segments) = {expected}")


def _channel_planes(masks: np.ndarray) -> np.ndarray:
    """``masks`` as (segments, slices, rows, columns) with each plane contiguous."""
    planes = np.moveaxis(masks, 3, 0)
    if masks.strides[2] != masks.itemsize or masks.strides[1] != masks.shape[2] * masks.itemsize:
        planes = np.ascontiguousarray(planes)
    return planes


def _voxel_counts(planes: np.ndarray) -> np.ndarray:
    """Foreground voxels per (slice, segment)."""
    counts = np.empty(planes.shape[1::-1], dtype=np.int64)
    for i, channel in enumerate(planes):
        for z, plane in enumerate(channel):
            counts[z, i] = np.count_nonzero(plane)
    return counts


def _pixel_array(planes: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, bool]:
    """(a label map when no voxel lies in two segments, else the stacked masks; whether
    segments overlap)."""
    n_segments = planes.shape[0]
    if n_segments == 1:
        return planes[0], False
    overlap = segments_overlap(planes, counts)
    if overlap or n_segments > 255:
        return np.moveaxis(planes, 0, -1), overlap
    labels = np.zeros(planes.shape[1:], dtype=np.uint8)
    for i in range(n_segments):
        if counts[:, i].any():
            np.copyto(labels, np.uint8(i + 1), where=planes[i])
    return labels, False


def segments_overlap(planes: np.ndarray, counts: np.ndarray | None = None) -> bool:
    """Whether a voxel lies in two segments of ``planes`` (segments, slices, rows, columns),
    a few slices at a time: no copy of the volume. ``counts`` (foreground voxels per slice and
    segment, when known) skips the slices where fewer than two segments have any."""
    n_segments, n_slices = planes.shape[:2]
    dtype = np.uint8 if n_segments < 256 else np.uint16
    for z in range(0, n_slices, OVERLAP_CHUNK_SLICES):
        chunk = slice(z, z + OVERLAP_CHUNK_SLICES)
        present = [i for i in range(n_segments)
                   if counts is None or counts[chunk, i].any()]
        if len(present) < 2:
            continue
        total = np.zeros((min(OVERLAP_CHUNK_SLICES, n_slices - z), *planes.shape[2:]), dtype=dtype)
        for i in present:
            np.add(total, planes[i, chunk], out=total, casting="unsafe")
        if (total > 1).any():
            return True
    return False


class _Segmentation(hd.seg.Segmentation):
    """highdicom's SEG, told whether the segments overlap (the encoder has checked, a few
    slices at a time). highdicom's own check of stacked bool masks sums them over the segment
    axis into a platform-int copy of the whole volume: 8 bytes a voxel (630 MB and ~0.9 s for
    a 300 x 512 x 512 CT)."""

    def __init__(self, *args: Any, segments_overlap: bool, **kwargs: Any) -> None:
        # Read by the check below, which highdicom's __init__ calls; set before it runs.
        object.__setattr__(self, "_known_overlap", segments_overlap)
        super().__init__(*args, **kwargs)

    def _check_and_cast_pixel_array(self, pixel_array, segment_numbers, segmentation_type, dtype):  # type: ignore[override]
        if (isinstance(pixel_array, np.ndarray) and pixel_array.dtype == np.bool_
                and pixel_array.ndim == 4 and pixel_array.shape[-1] == len(segment_numbers)
                and segmentation_type == hd.seg.SegmentationTypeValues.BINARY):
            return pixel_array, (hd.seg.SegmentsOverlapValues.YES if self._known_overlap
                                 else hd.seg.SegmentsOverlapValues.NO)
        return hd.seg.Segmentation._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type,
                                                               dtype)


def _slice_thicknesses(sources: Sequence[pydicom.Dataset]) -> np.ndarray:
    """Thickness in mm that each slice stands for, from positions along the slice normal."""
    try:
        if len(sources) == 1:
            return np.array([float(sources[0].get("SpacingBetweenSlices")
                                   or sources[0].SliceThickness)])
        iop = np.asarray(sources[0].ImageOrientationPatient, dtype=np.float64)
        positions = np.array([ds.ImagePositionPatient for ds in sources], dtype=np.float64)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InputError(f"encode: source geometry unusable for volumes: {exc}") from None
    gaps = np.abs(np.diff(positions @ np.cross(iop[:3], iop[3:])))
    if not np.all(gaps > 1e-4):
        raise InputError("encode: two source slices lie at the same position along the normal")
    if len(gaps) == 1:
        return np.repeat(gaps, 2)
    # A slice stands for half the gap to each neighbour, the first and last for a full gap.
    return np.concatenate([gaps[:1], (gaps[:-1] + gaps[1:]) / 2, gaps[-1:]])


def _volumes(sources: Sequence[pydicom.Dataset], counts: np.ndarray,
             manifest: ModelManifest) -> tuple[SegmentVolume, ...]:
    row_mm, col_mm = (float(v) for v in sources[0].PixelSpacing)
    ml = (counts * _slice_thicknesses(sources)[:, None]).sum(axis=0) * row_mm * col_mm / 1000
    return tuple(
        SegmentVolume(label=s.label, name=s.name, voxels=int(counts[:, i].sum()),
                      volume_ml=float(ml[i]))
        for i, s in enumerate(manifest.segments))


def _algorithm_id(algorithm: Algorithm) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification of the model."""
    return hd.sr.AlgorithmIdentification(
        name=algorithm.name, version=algorithm.version, family=_algorithm_family(algorithm),
        manufacturer=algorithm.manufacturer)


def _algorithm_family(algorithm: Algorithm) -> Code:
    """The CID 7162 code whose meaning is the algorithm's family, else Artificial Intelligence."""
    for code in codes.cid7162.concepts.values():
        if code.meaning.lower() == algorithm.family.lower():
            return code
    return codes.cid7162.ArtificialIntelligence


REJECTION_SERIES_NUMBER = 9904
#: IHE IOCM's reason for withdrawing a result that is no longer current (PS3.16 CID 7011).
REJECTED_FOR_QUALITY_REASONS = Code("113001", "DCM", "Rejected for Quality Reasons")
_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                  "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName")


def encode_rejection(source: pydicom.Dataset, rejected: Sequence[dict[str, str]], manifest: ModelManifest,
                     key: str, why: str) -> pydicom.Dataset:
    """An IHE IOCM rejection note: a Key Object Selection "Rejected for Quality Reasons" that
    references result objects the node made and no longer stands by (superseded by a re-run
    with other input, or a re-run that failed). ``rejected`` holds ``sop_class_uid``,
    ``sop_instance_uid``, ``series_instance_uid`` and ``modality`` of each; ``source`` (an
    image of the series) gives the patient and study; ``key`` makes the note's UIDs.

    Raises:
        InputError: nothing to reject.
    """
    if not rejected:
        raise InputError("encode: a rejection note needs the objects it rejects")
    references = []
    for obj in rejected:
        ref = Dataset()
        for keyword in ("SpecificCharacterSet", *_PATIENT_STUDY):
            if keyword in source:
                setattr(ref, keyword, source.get(keyword))
        ref.SOPClassUID, ref.SOPInstanceUID = obj["sop_class_uid"], obj["sop_instance_uid"]
        ref.SeriesInstanceUID, ref.Modality = obj["series_instance_uid"], obj.get("modality", "OT")
        references.append(ref)
    observer = _device_observer(manifest)
    content = hd.ko.KeyObjectSelection(document_title=REJECTED_FOR_QUALITY_REASONS, referenced_objects=references,
                                       observer_device_context=observer, description=_lo(why))
    note = hd.ko.KeyObjectSelectionDocument(
        evidence=references, content=content, series_instance_uid=derive_uid(key, "rejection-series"),
        series_number=REJECTION_SERIES_NUMBER, sop_instance_uid=derive_uid(key, "rejection-instance"),
        instance_number=1, manufacturer=MANUFACTURER)
    # TID 2010 forbids a concept name on a COMPOSITE reference (highdicom adds "Source").
    for item in note.ContentSequence:
        if item.ValueType == "COMPOSITE" and "ConceptNameCodeSequence" in item:
            del item.ConceptNameCodeSequence
    if "SpecificCharacterSet" in source:         # the patient's name is in the source's character set
        note.SpecificCharacterSet = source.SpecificCharacterSet
    note.SeriesDescription = _lo(f"AI rejection note {manifest.name}")
    note.SoftwareVersions = _software_versions(manifest)
    return note


def _device_observer(manifest: ModelManifest) -> hd.sr.ObserverContext:
    """The model as the observer of an SR or KOS (a device, named by its algorithm)."""
    algorithm = manifest.algorithm
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("device", algorithm.manufacturer, algorithm.name, algorithm.version),
            name=_lo(algorithm.name), manufacturer_name=_lo(algorithm.manufacturer),
            model_name=_lo(manifest.name)))


def _code(code: ManifestCode) -> Code:
    return Code(code.value, code.scheme, code.meaning)


def _lo(text: str) -> str:
    """``text`` cut to the 64 characters of a LO element."""
    return text[:64]


def _series_description(kind: str, manifest: ModelManifest) -> str:
    """``AI <kind> <model> <version>``, ending in ``DEMO`` for demonstration models."""
    demo = " DEMO" if manifest.demonstration else ""
    return _lo(f"AI {kind} {manifest.name} {manifest.version}")[:64 - len(demo)] + demo


def _software_versions(manifest: ModelManifest) -> list[str]:
    return [_lo(f"pacs-ai-node {__version__}"), _lo(f"{manifest.name} {manifest.version}")]
