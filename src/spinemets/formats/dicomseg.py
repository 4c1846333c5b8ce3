"""DICOM Segmentation objects (DICOM-SEG) to and from label maps on the CT's voxel grid.

The DICOM counterpart of :mod:`spinemets.formats.slicer`: a DICOM-SEG is read as a label map of a stage
(:func:`read_dicom_seg`), a prediction is written as a DICOM-SEG that references its CT series
(:func:`write_dicom_seg`), and :func:`is_dicom_seg` tells a SEG from other files by its header.
Files are read with pydicom and written with highdicom.

Reading rules (the same conventions as the 3D Slicer import, where they apply):

* **What is accepted.** A voxel Segmentation Storage object (SOP class
  ``1.2.840.10008.5.1.4.1.1.66.4``, BINARY or FRACTIONAL) or a Label Map Segmentation
  (``1.2.840.10008.5.1.4.1.1.66.7``). A file that is not DICOM, a DICOM object that is not a
  SEG (a CT slice, a Surface Segmentation), a SEG whose Referenced Series Sequence names no
  series, and a SEG without a Frame of Reference UID are refused.
* **Placement.** Each frame is placed by its own geometry: its Image Position (Patient) (Plane
  Position Sequence), the Plane Orientation and Pixel Measures (per frame or shared). A frame
  without a plane position is placed at the CT slice it is derived from (Derivation Image
  Sequence), which needs the CT series (``ct_series_dir``). A frame's pixel lattice must lie on
  the CT's voxel lattice (spacing, axes and an integer offset, the tolerances of
  :mod:`spinemets.formats.slicer`); frames may come in any order and only some positions may be stored
  (a *sparse* SEG stores only the frames where a segment is present), so nothing is assumed
  about frame order or count. A labelled pixel outside the CT is an error; nothing is resampled.
* **Frame of reference.** When the CT is a DICOM series (``ct_series_dir``), the SEG's Frame of
  Reference UID must be the series'. (The check is skipped, and logged, when the series has none.)
* **Segment values.** BINARY: a pixel is in its segment when it is 1. FRACTIONAL: a pixel is in
  its segment when its value is at least half the Maximum Fractional Value (probability or
  occupancy >= 0.5). LABELMAP: a pixel's value is its segment number.
* **Names.** Segment Labels are resolved through :func:`spinemets.labels.resolve_segment_names`
  (built-in aliases such as ``T1 vertebra``, plus an optional user mapping, which may also ignore
  segments). Unknown names are an error that lists them. Segments of one label are merged.
* **Overlaps.** Segments of a BINARY or FRACTIONAL SEG may overlap. For the vertebrae stage (one
  vertebra per voxel) an overlap of segments of different labels is an error naming the file and
  the segments. For the metastases stage the rule of :mod:`spinemets.formats.slicer` applies: the smaller
  segment (fewer voxels) wins, on equal size the higher label; the contested voxels are counted in
  the report.

Writing rules:

* A BINARY SEG with one segment per label present, labelled by the label name (``L1``,
  ``lytic``), numbered 1, 2, ... in label order, AUTOMATIC, with the algorithm identification
  ``spinemets`` and its version (family: Artificial Intelligence, DCM 123110). Only the frames
  where a segment is present are stored. Codes (SNOMED CT, from pydicom's code dictionary):

  - vertebrae: category *Anatomical Structure* (SCT 91723000), type the vertebra itself
    (*T1 vertebra* SCT 64864005 ... *L5 vertebra* SCT 49668003, *C1 vertebra* SCT 14806007,
    *Sacrum* SCT 54735007);
  - metastases: category *Morphologically Abnormal Structure* (SCT 49755003), type *Neoplasm,
    metastatic* (SCT 14799000), anatomic region *Bone* (SCT 272673000); SNOMED CT in pydicom
    has no code for the lytic or sclerotic pattern, so the Segment Label says which.
* The SEG references every slice of the source CT series (Referenced Series Sequence, and the
  source slice of each frame) and carries its Study Instance UID and Frame of Reference UID.
  The label map must be on the series' voxel grid.
* Series Description and Content Description are ``description`` in one line, cut to the 64
  characters their value representation (LO) allows; a longer ``description`` (a prediction's
  domain warning) is also kept whole, in one line, in Image Comments (LT, General Image module);
  the Content Label is the stage (``VERTEBRAE``, ``METASTASES``).
* Patient and study attributes: highdicom copies them from the source slices, so the SEG carries
  no identifier the source does not. With a ``pseudonym`` (the book's de-identification rules) the
  SEG follows the DICOM Basic Application Level Confidentiality Profile (PS3.15 Annex E) for the
  attributes in :data:`IDENTIFYING_KEYWORDS`, at every nesting depth (the Contributing Equipment
  Sequence copies the source scanner's institution, station, serial number and acquisition time):
  Patient's Name and Patient ID become the pseudonym, the attributes the SEG must carry (type 2: birth date, sex, study
  date and time, accession number, study ID, referring physician) are emptied, all others are
  removed, and Patient Identity Removed is ``YES``. UIDs are kept: they link the SEG to its CT.
* An empty label map gives no file: DICOM-SEG needs at least one segment, so
  :func:`write_dicom_seg` writes nothing and returns None.
* Written to a temporary name and renamed into place (:func:`spinemets.fileio.atomic_path`).
* The source series is checked first (:func:`spinemets.formats.dicom.check_series`): a series whose
  Study, Series or Frame of Reference UID is blank (an anonymiser's doing), or whose SOP Instance
  UIDs are blank or duplicated, gets no SEG (it could not reference its source: an error naming
  the folder and the reason); a SOP Class UID found only in the file meta is used from there.

Validation: David Clunie's ``dciodvfy`` (dicom3tools) reports no error for the SEGs written
here; the tests run it on every one. Its warnings (:data:`DCIODVFY_WARNINGS`), and why they stay:

* *Missing attribute or value that would be needed to build DICOMDIR - Study Date / Study Time /
  Study ID*: with a pseudonym these type 2 attributes are emptied on purpose (PS3.15 Basic
  Profile); without one, a source without them gives none.
* *Value dubious for this VR - Patient's Name ... Retired Person Name form*: the pseudonym (a
  case ID such as ``sm-0001``) is one name component, not a family^given name.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from spinemets import __version__
from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError
from spinemets.errors import one_line
from spinemets.fileio import atomic_path, check_case_id, check_output_file, require_dir, require_file
from spinemets.formats.images import ijk_to_lps, image_from_array

log = logging.getLogger(__name__)

#: SOP classes of voxel segmentations: Segmentation Storage and Label Map Segmentation Storage.
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
LABELMAP_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.7"
SURFACE_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.5"
SEG_SOP_CLASSES = (SEG_SOP_CLASS, LABELMAP_SEG_SOP_CLASS)

#: The dciodvfy warnings the module docstring explains (substrings of its output lines).
DCIODVFY_WARNINGS = (
    "Missing attribute or value that would be needed to build DICOMDIR - Study Date",
    "Missing attribute or value that would be needed to build DICOMDIR - Study Time",
    "Missing attribute or value that would be needed to build DICOMDIR - Study ID",
    "Retired Person Name form",
)

#: Series Number of the SEGs this module writes.
SEG_SERIES_NUMBER = 300
#: FRACTIONAL SEGs: a pixel is in its segment from this fraction of the Maximum Fractional Value on.
FRACTIONAL_THRESHOLD = 0.5
#: Stages whose segments may overlap (resolved by the smaller-segment-wins rule); the others refuse overlaps.
OVERLAPS_RESOLVED = {"vertebrae": False, "metastases": True}

_LO_MAX = 64  # characters of a LO (Long String) value
_LT_MAX = 10240  # characters of a LT (Long Text) value
_TOL_MATRIX = 1e-3  # as spinemets.formats.slicer: relative tolerance of spacing/direction agreement
_TOL_OFFSET = 1e-2  # voxels: how far from the CT lattice a frame may sit

#: Attributes that identify a person, an institution or a date of the source, after PS3.15 Annex E
#: (Basic Profile): with a pseudonym, these are removed from a written SEG at every depth, except
#: :data:`_EMPTIED` (type 2 in the SEG's modules: kept with an empty value) and the pseudonymised two.
IDENTIFYING_KEYWORDS: tuple[str, ...] = (
    # Patient, Clinical Trial Subject
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "PatientBirthDate",
    "PatientBirthTime", "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientAddress",
    "PatientTelephoneNumbers", "PatientMotherBirthName", "PatientBirthName", "OtherPatientIDs",
    "OtherPatientIDsSequence", "OtherPatientNames", "PatientComments", "PatientReligiousPreference", "EthnicGroup",
    "Occupation", "MilitaryRank", "BranchOfService", "MedicalRecordLocator", "CountryOfResidence",
    "RegionOfResidence", "ResponsiblePerson", "ResponsibleOrganization", "PatientInsurancePlanCodeSequence",
    "AdditionalPatientHistory", "MedicalAlerts", "Allergies", "PatientState", "SpecialNeeds", "SmokingStatus",
    "PregnancyStatus", "LastMenstrualDate", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # Study, Patient Study, Clinical Trial Study
    "StudyDate", "StudyTime", "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyID",
    "StudyDescription", "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingPhysician", "ConsultingPhysicianName",
    "AdmittingDiagnosesDescription", "AdmissionID", "IssuerOfAdmissionIDSequence", "ReasonForVisit",
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    # equipment and people of the source (the SEG's Contributing Equipment Sequence copies them)
    "InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName", "InstitutionalDepartmentTypeCodeSequence",
    "StationName", "OperatorsName", "PerformingPhysicianName",
    # dates and times of the source acquisition
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "SeriesDate", "SeriesTime", "ContributionDateTime",
    "DeviceSerialNumber",
)
_EMPTIED = ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
            "ReferringPhysicianName")


# ---------------------------------------------------------------------------------------------
# recognising


def is_dicom_seg(path: str | Path) -> bool:
    """Whether ``path`` is a voxel DICOM-SEG (Segmentation or Label Map Segmentation Storage), from
    its header only (Modality ``SEG`` where the SOP Class UID is missing). Never raises."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except Exception:  # not DICOM, unreadable, a folder: not a SEG
        return False
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class:
        return sop_class in SEG_SOP_CLASSES
    return str(ds.get("Modality", "")).strip().upper() == "SEG"


# ---------------------------------------------------------------------------------------------
# reading


def read_dicom_seg(
    path: str | Path,
    ct: sitk.Image,
    stage: str,
    mapping: Mapping[str, str | None] | None = None,
    ct_path: str | Path | None = None,
    ct_series_dir: str | Path | None = None,
) -> tuple[sitk.Image, dict]:
    """Import a DICOM-SEG as a label map (uint8) of ``stage`` on the grid of ``ct`` (the module's rules).

    ``ct_series_dir`` is the CT's DICOM series folder when the CT is one: the SEG's Frame of
    Reference UID is checked against it, and frames without a plane position are placed at the
    slice they are derived from. ``ct_path`` names the CT in messages (default: the series folder).

    Returns the label map and a report: ``segments`` (one per segment not ignored: ``number``,
    ``name``, ``label``, ``voxels`` on the CT grid), ``ignored`` (segment labels the mapping
    ignores), ``contested_voxels`` (voxels claimed by segments of different labels),
    ``segmentation_type`` and ``referenced_series`` (Series Instance UIDs). For example::

        {"segments": [{"number": 1, "name": "T1 vertebra", "label": 8, "voxels": 1532}, ...],
         "ignored": [], "contested_voxels": 0, "segmentation_type": "BINARY",
         "referenced_series": ["1.2.826.0.1.3680043.9.7433.2.1"]}
    """
    path = require_file(path, "DICOM-SEG file")
    labels_mod.check_stage(stage)
    ct_path = str(ct_path or ct_series_dir or "the CT")
    ds = _read_seg_dataset(path)
    referenced = _referenced_series(ds, path)
    seg_type = str(ds.get("SegmentationType", "BINARY")).strip().upper()
    if ds.SOPClassUID == LABELMAP_SEG_SOP_CLASS:
        seg_type = "LABELMAP"
    if seg_type not in ("BINARY", "FRACTIONAL", "LABELMAP"):
        raise SpinemetsError(f"{path}: unknown Segmentation Type {seg_type!r}; expected BINARY, FRACTIONAL or LABELMAP")
    series_slices = None
    if ct_series_dir is not None:
        series_slices = _series_slices(ct_series_dir, referenced)
        _check_frame_of_reference(ds, path, series_slices, ct_series_dir)

    segments = segment_labels(ds, path)
    resolved = labels_mod.resolve_segment_names(sorted(set(segments.values())), stage, mapping, source=str(path))
    frames = _frame_table(ds, path, seg_type, int(ds.get("NumberOfFrames", 1) or 1))
    ct_matrix_inv = np.linalg.inv(ijk_to_lps(ct))
    ct_size = np.array(ct.GetSize())  # i, j, k
    shared_plane = _shared_plane(ds)
    fraction_min = _fraction_min(ds, path) if seg_type == "FRACTIONAL" else None

    per_segment: dict[int, list[np.ndarray]] = {number: [] for number in segments}
    for index, (frame, values) in enumerate(zip(frames, _frames(ds, path, len(frames)))):
        if seg_type == "LABELMAP":
            present = [int(v) for v in np.unique(values) if v]
            masks = {number: values == number for number in present}
        elif fraction_min is not None:
            masks = {frame["segment"]: values >= fraction_min}
        else:
            masks = {frame["segment"]: values != 0}
        masks = {n: m for n, m in masks.items() if m.any()}
        if not masks:
            continue
        unknown = sorted(set(masks) - set(segments))
        if unknown:
            raise SpinemetsError(f"{path}: frame {index + 1} holds segment number(s) {unknown}, which the Segment "
                                 "Sequence does not describe")
        to_ijk = _frame_to_ct(frame, shared_plane, series_slices, ct_matrix_inv, path, index, ct_path)
        for number, mask in masks.items():
            if resolved[segments[number]] is None:
                continue
            rows, cols = np.nonzero(mask)
            ijk = to_ijk(rows, cols)
            outside = np.any((ijk < 0) | (ijk >= ct_size[:, None]), axis=0)
            if outside.any():
                raise SpinemetsError(
                    f"{path}: frame {index + 1} (segment {segments[number]!r}) has {int(outside.sum())} labelled "
                    f"pixel(s) outside the CT {ct_path} (size {ct_size.tolist()}); the SEG does not belong to this CT"
                )
            per_segment[number].append(np.ravel_multi_index((ijk[2], ijk[1], ijk[0]), tuple(ct_size[::-1])))

    report = {"segments": [], "ignored": [], "contested_voxels": 0, "segmentation_type": seg_type,
              "referenced_series": referenced}
    per_label: dict[int, list[np.ndarray]] = {}
    names_of_label: dict[int, list[str]] = {}
    for number, name in segments.items():
        label = resolved[name]
        if label is None:
            report["ignored"].append(name)
            continue
        flat = np.unique(np.concatenate(per_segment[number])) if per_segment[number] else np.zeros(0, np.int64)
        report["segments"].append({"number": number, "name": name, "label": int(label), "voxels": int(flat.size)})
        per_label.setdefault(label, []).append(flat)
        names_of_label.setdefault(label, []).append(name)
    voxels = {lab: np.unique(np.concatenate(parts)) for lab, parts in per_label.items()}
    labelmap = np.zeros(int(np.prod(ct_size)), dtype=np.uint8)
    if voxels:
        _, counts = np.unique(np.concatenate(list(voxels.values())), return_counts=True)
        contested = int((counts > 1).sum())
        if contested and not OVERLAPS_RESOLVED[stage]:
            raise _overlap_error(path, stage, voxels, names_of_label, contested)
        report["contested_voxels"] = contested
        # Paint large labels first so that the smallest wins; equal sizes: the higher label last.
        for lab in sorted(voxels, key=lambda lab: (-voxels[lab].size, lab)):
            labelmap[voxels[lab]] = lab
    return image_from_array(labelmap.reshape(tuple(ct_size[::-1])), ct), report


def _read_seg_dataset(path: Path):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError:
        raise SpinemetsError(f"{path}: not a DICOM file (no DICOM preamble and header)") from None
    except Exception as exc:  # pydicom raises several types for truncated or damaged files
        raise SpinemetsError(f"{path}: cannot read DICOM file (truncated or corrupt): {one_line(exc)[:300]}") from None
    sop_class = str(ds.get("SOPClassUID", "") or "")
    modality = str(ds.get("Modality", "") or "").strip()
    if sop_class == SURFACE_SEG_SOP_CLASS:
        raise SpinemetsError(f"{path}: is a DICOM Surface Segmentation (meshes), not a voxel DICOM-SEG")
    if sop_class not in SEG_SOP_CLASSES:
        raise SpinemetsError(f"{path}: not a DICOM-SEG (Modality {modality or 'missing'}, SOP Class UID "
                             f"{sop_class or 'missing'}; expected Segmentation Storage {SEG_SOP_CLASS})")
    if "PixelData" not in ds:
        raise SpinemetsError(f"{path}: DICOM-SEG has no pixel data")
    return ds


def _referenced_series(ds, path: Path) -> list[str]:
    uids = [str(item.get("SeriesInstanceUID", "") or "") for item in ds.get("ReferencedSeriesSequence", None) or []]
    uids = [u for u in uids if u]
    if not uids:
        raise SpinemetsError(f"{path}: DICOM-SEG references no series (Referenced Series Sequence is missing or "
                             "empty): it cannot be tied to a CT")
    if not str(ds.get("FrameOfReferenceUID", "") or ""):
        raise SpinemetsError(f"{path}: DICOM-SEG has no Frame of Reference UID: its frames lie in no declared space")
    return uids


def _series_slices(folder, referenced: list[str]) -> dict:
    """Header of each slice of the CT series in ``folder`` (the one the SEG references, or its only one):
    ``{"uid", "frame_of_reference", "slices": {SOP Instance UID: (position, orientation, spacing)}}``."""
    import pydicom

    from spinemets.formats.dicom import series_files

    folder = require_dir(folder, "CT series folder")
    series = series_files(folder)
    uid = next((u for u in referenced if u in series), None)
    if uid is None:
        if len(series) > 1:
            raise SpinemetsError(f"{folder}: holds {len(series)} DICOM series, none of which the SEG references "
                                 f"({', '.join(referenced)})")
        uid = next(iter(series))
    slices, frame_of_reference = {}, ""
    for file in series[uid]:
        head = pydicom.dcmread(str(file), stop_before_pixels=True)
        frame_of_reference = frame_of_reference or str(head.get("FrameOfReferenceUID", "") or "")
        if "ImagePositionPatient" in head and "ImageOrientationPatient" in head and "PixelSpacing" in head:
            slices[str(head.SOPInstanceUID)] = (np.array(head.ImagePositionPatient, float),
                                                np.array(head.ImageOrientationPatient, float),
                                                np.array(head.PixelSpacing, float))
    return {"uid": uid, "frame_of_reference": frame_of_reference, "slices": slices}


def _check_frame_of_reference(ds, path: Path, series: dict, folder) -> None:
    ours, theirs = str(ds.FrameOfReferenceUID), series["frame_of_reference"]
    if not theirs:
        log.info("%s: the CT series has no Frame of Reference UID; the SEG's cannot be checked", folder)
        return
    if ours != theirs:
        raise SpinemetsError(f"{path}: Frame of Reference UID {ours} differs from the CT series {folder} ({theirs}): "
                             "the SEG was drawn in another coordinate frame (another scan or registration)")


def segment_labels(ds, path: Path) -> dict[int, str]:
    """Segment Number -> Segment Label (or Segment Description, else ``Segment N``); number 0 (a
    LABELMAP SEG's background) is left out."""
    items = ds.get("SegmentSequence", None) or []
    if not items:
        raise SpinemetsError(f"{path}: DICOM-SEG has no Segment Sequence (no segment is described)")
    segments = {}
    for item in items:
        number = item.get("SegmentNumber")
        if number is None:
            raise SpinemetsError(f"{path}: a segment has no Segment Number")
        number = int(number)
        if number == 0:  # a LABELMAP SEG may describe its background (pixel value 0)
            continue
        if number in segments:
            raise SpinemetsError(f"{path}: two segments share the Segment Number {number}")
        name = str(item.get("SegmentLabel", "") or "").strip() or str(item.get("SegmentDescription", "") or "").strip()
        segments[number] = name or f"Segment {number}"
    return segments


def _frames(ds, path: Path, count: int):
    """The SEG's frames one at a time (2-D arrays), so that a large SEG is never unpacked whole."""
    from pydicom.pixels import iter_pixels

    frames = iter_pixels(ds)
    for index in range(count):
        try:
            values = next(frames)
        except Exception as exc:  # unsupported transfer syntax, truncated pixel data ...
            raise SpinemetsError(f"{path}: cannot decode frame {index + 1} of the SEG's pixel data: "
                                 f"{one_line(exc)[:300]}") from None
        yield values


def _frame_table(ds, path: Path, seg_type: str, n_frames: int) -> list[dict]:
    """Per frame: ``segment`` (BINARY/FRACTIONAL), ``position``, ``orientation``, ``spacing``, ``source``."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None) or []
    if len(per_frame) != n_frames:
        raise SpinemetsError(f"{path}: has {n_frames} frame(s) but {len(per_frame)} per-frame functional group(s)")
    shared = (ds.get("SharedFunctionalGroupsSequence", None) or [None])[0]
    shared_ident = shared.get("SegmentIdentificationSequence", None) if shared is not None else None
    table = []
    for index, group in enumerate(per_frame):
        frame = {"segment": None, **_plane(group)}
        if seg_type != "LABELMAP":
            ident = group.get("SegmentIdentificationSequence", None) or shared_ident  # per frame, or shared by all
            if not ident or ident[0].get("ReferencedSegmentNumber") is None:
                raise SpinemetsError(f"{path}: frame {index + 1} names no segment (Segment Identification Sequence)")
            frame["segment"] = int(ident[0].ReferencedSegmentNumber)
        sources = [src.get("ReferencedSOPInstanceUID") for derivation in group.get("DerivationImageSequence", None) or []
                   for src in derivation.get("SourceImageSequence", None) or []]
        frame["source"] = next((str(s) for s in sources if s), None)
        table.append(frame)
    return table


def _plane(group) -> dict:
    """Position, orientation and pixel spacing of a functional group (None where it has none)."""
    out = {"position": None, "orientation": None, "spacing": None}
    position = group.get("PlanePositionSequence", None)
    if position and position[0].get("ImagePositionPatient") is not None:
        out["position"] = np.array(position[0].ImagePositionPatient, float)
    orientation = group.get("PlaneOrientationSequence", None)
    if orientation and orientation[0].get("ImageOrientationPatient") is not None:
        out["orientation"] = np.array(orientation[0].ImageOrientationPatient, float)
    measures = group.get("PixelMeasuresSequence", None)
    if measures and measures[0].get("PixelSpacing") is not None:
        out["spacing"] = np.array(measures[0].PixelSpacing, float)
    return out


def _shared_plane(ds) -> dict:
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    return _plane(shared[0]) if shared else {"position": None, "orientation": None, "spacing": None}


def _fraction_min(ds, path: Path) -> float:
    maximum = ds.get("MaximumFractionalValue")
    if maximum is None or int(maximum) <= 0:
        raise SpinemetsError(f"{path}: FRACTIONAL SEG without a positive Maximum Fractional Value")
    return FRACTIONAL_THRESHOLD * int(maximum)


def _frame_to_ct(frame, shared, series, ct_matrix_inv, path: Path, index: int, ct_path: str):
    """A function (rows, cols) -> CT voxel indices (3 x n int) for one frame, once its lattice is checked."""
    position, orientation, spacing = (frame[k] if frame[k] is not None else shared[k]
                                      for k in ("position", "orientation", "spacing"))
    source = series["slices"].get(frame["source"]) if series and frame["source"] else None
    if position is None and source is not None:
        position = source[0]
        orientation = source[1] if orientation is None else orientation
        spacing = source[2] if spacing is None else spacing
    if position is None:
        hint = "" if series else " (give the CT series folder to place it at its source slice)"
        raise SpinemetsError(f"{path}: frame {index + 1} has no plane position and no source slice of the CT series "
                             f"to place it by{hint}")
    if orientation is None or spacing is None or orientation.size != 6 or spacing.size != 2:
        raise SpinemetsError(f"{path}: frame {index + 1} has no plane orientation or pixel spacing")
    row_dir, col_dir = orientation[:3], orientation[3:]
    # pixel (r, c) lies at position + c * spacing[1] * row_dir + r * spacing[0] * col_dir
    step_col = ct_matrix_inv[:3, :3] @ (row_dir * spacing[1])
    step_row = ct_matrix_inv[:3, :3] @ (col_dir * spacing[0])
    offset = ct_matrix_inv[:3, :3] @ position + ct_matrix_inv[:3, 3]
    steps = []
    for step in (step_row, step_col):
        rounded = np.round(step)
        if not (np.allclose(step, rounded, atol=_TOL_MATRIX) and np.abs(rounded).sum() == 1):
            raise SpinemetsError(
                f"{path}: frame {index + 1}: its pixel spacing {np.round(spacing, 4).tolist()} or orientation "
                f"{np.round(orientation, 4).tolist()} does not match the voxel grid of the CT {ct_path}; "
                "the SEG must be on the CT's voxel grid"
            )
        steps.append(rounded.astype(int))
    rounded = np.round(offset)
    if not np.allclose(offset, rounded, atol=_TOL_OFFSET):
        raise SpinemetsError(
            f"{path}: frame {index + 1} lies between CT voxels (offset {np.round(offset, 3).tolist()} voxels in the "
            f"CT {ct_path}); the SEG must be on the CT's voxel grid"
        )
    origin = rounded.astype(int)

    def to_ijk(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return origin[:, None] + steps[0][:, None] * rows[None] + steps[1][:, None] * cols[None]

    return to_ijk


def _overlap_error(path: Path, stage: str, voxels: dict, names_of_label: dict, contested: int) -> SpinemetsError:
    table = labels_mod.label_names(stage)
    pairs = []
    ordered = sorted(voxels)
    for i, a in enumerate(ordered):
        for b in ordered[i + 1:]:
            shared = np.intersect1d(voxels[a], voxels[b], assume_unique=True).size
            if shared:
                pairs.append(f"{'/'.join(names_of_label[a])!r} ({table[a]}) and {'/'.join(names_of_label[b])!r} "
                             f"({table[b]}): {shared} voxel(s)")
    shown = "; ".join(pairs[:5]) + (" ..." if len(pairs) > 5 else "")
    return SpinemetsError(f"{path}: overlapping segments of different labels ({contested} voxel(s)): {shown}; "
                          f"the {stage} stage allows one label per voxel")


# ---------------------------------------------------------------------------------------------
# writing


def write_dicom_seg(
    labelmap: sitk.Image,
    stage: str,
    source_series_dir: str | Path,
    out_path: str | Path,
    description: str | None = None,
    pseudonym: str | None = None,
) -> Path | None:
    """Write a label map of ``stage`` as a BINARY DICOM-SEG of the CT series in ``source_series_dir``.

    One segment per label present, named by the label (``L1``, ``lytic``); see the module's
    writing rules for codes, references, descriptions and ``pseudonym``. Returns ``out_path``,
    or None (nothing written) when the label map holds no label.
    """
    seg = build_segmentation(labelmap, stage, source_series_dir, out_path,
                             SegIdentity(description=description, pseudonym=pseudonym))
    if seg is None:
        log.info("%s: the label map is empty; no DICOM-SEG written (a SEG needs a segment)", out_path)
        return None
    return save_segmentation(seg, out_path)


def save_segmentation(seg, out_path: str | Path) -> Path:
    """Write a highdicom Segmentation (or any pydicom dataset) atomically to ``out_path``."""
    out_path = check_output_file(out_path, "DICOM-SEG file")
    with atomic_path(out_path) as tmp:
        seg.save_as(str(tmp), enforce_file_format=True)
    return Path(out_path)


@dataclass(frozen=True)
class SegIdentity:
    """What names a DICOM-SEG and its segments, apart from its voxels: the series ``description``, the
    ``pseudonym`` that replaces the patient's identifiers (see :func:`pseudonymise`), ``segment_label``
    (formats each Segment Label from the label ``name``: ``"{name} vertebra"`` gives TCIA's
    ``T1 vertebra``), and the series and instance UIDs (new ones unless given)."""

    description: str | None = None
    pseudonym: str | None = None
    segment_label: str = "{name}"
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None


def build_segmentation(
    labelmap: sitk.Image,
    stage: str,
    source_series_dir: str | Path,
    out_path: str | Path = "DICOM-SEG",
    identity: SegIdentity | None = None,
    segmentation_type: str = "BINARY",
):
    """The highdicom Segmentation that :func:`write_dicom_seg` writes, or None for an empty label map.

    ``identity`` (:class:`SegIdentity`) holds its description, pseudonym, segment labels and UIDs;
    ``segmentation_type`` may be ``FRACTIONAL`` or ``LABELMAP`` for tests of the reader. ``out_path``
    names the output in messages.
    """
    import highdicom as hd

    identity = identity or SegIdentity()
    description, pseudonym, segment_label = identity.description, identity.pseudonym, identity.segment_label
    series_instance_uid, sop_instance_uid = identity.series_instance_uid, identity.sop_instance_uid

    table = labels_mod.label_names(stage)
    array = sitk.GetArrayFromImage(labelmap)
    present = sorted(int(v) for v in np.unique(array) if v)
    unknown = [v for v in present if v not in table]
    if unknown:
        raise SpinemetsError(f"{out_path}: label values {unknown} are not labels of the {stage} stage")
    if not present:
        return None
    if pseudonym is not None:
        check_case_id(pseudonym, out_path)
        if len(pseudonym) > _LO_MAX:
            raise SpinemetsError(f"{out_path}: pseudonym {pseudonym[:20]!r}... is longer than {_LO_MAX} characters")
    sources = _source_datasets(source_series_dir, labelmap, out_path)
    numbered = np.zeros(array.shape, dtype=np.uint8)  # label-map style: segment numbers 1, 2, ...
    descriptions = []
    for number, value in enumerate(present, start=1):
        numbered[array == value] = number
        descriptions.append(_segment_description(stage, number, table[value], segment_label.format(name=table[value])))
    text = _one_line_lo(description)
    with warnings.catch_warnings():  # a one-part Patient's Name in the source (an ID) is not ours to fix
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=numbered,
            segmentation_type=segmentation_type,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid or hd.UID(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=sop_instance_uid or hd.UID(),
            instance_number=1,
            manufacturer="spinemets",
            manufacturer_model_name=f"spinemets {stage}",
            software_versions=__version__,
            device_serial_number="0",
            content_description=text,
            content_label=stage.upper()[:16],
            omit_empty_frames=True,
            **({"fractional_type": "PROBABILITY"} if segmentation_type == "FRACTIONAL" else {}),
        )
    if text:
        seg.SeriesDescription = text
    whole = " ".join(str(description).split()) if description is not None else ""
    if len(whole) > _LO_MAX:  # the whole text (a domain warning ...) where the 64 characters of LO cut it
        seg.ImageComments = whole[:_LT_MAX]
    if pseudonym is not None:
        pseudonymise(seg, pseudonym)
    return seg


def _one_line_lo(text: str | None) -> str | None:
    """``text`` as one LO value: whitespace collapsed, no backslash (the value separator), 64 characters."""
    if text is None:
        return None
    value = " ".join(str(text).replace("\\", "/").split())[:_LO_MAX].strip()
    return value or None


def _source_datasets(folder, labelmap: sitk.Image, out_path) -> list:
    """Headers of the source series' slices, in the order of the label map's slices (checked)."""
    from spinemets.formats.dicom import check_series, read_dicom_series, read_series_headers
    from spinemets.formats.images import check_same_geometry

    folder = require_dir(folder, "source CT series folder")
    checked = check_series(folder)
    if not checked["dicom_output"]:
        raise SpinemetsError(f"{folder}: {checked['why_not']}")
    files = checked["files"]
    ct = read_dicom_series(folder)
    check_same_geometry(ct, labelmap, folder, f"{out_path}: the label map")
    datasets = read_series_headers(files)
    for k, ds in enumerate(datasets):  # slice k of the volume must be file k (GDCM's order)
        expected = np.array(ct.TransformIndexToPhysicalPoint((0, 0, k)))
        if "ImagePositionPatient" not in ds or not np.allclose(np.array(ds.ImagePositionPatient, float), expected,
                                                               atol=1e-2):
            raise SpinemetsError(f"{files[k]}: slice position does not match slice {k} of the series read from "
                                 f"{folder}; cannot tie the label map's slices to the source slices")
    return datasets


def _segment_description(stage: str, number: int, name: str, label: str):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="spinemets", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    regions = None
    if stage == "vertebrae":
        category = codes.SCT.AnatomicalStructure
        prop = codes.SCT.Sacrum if name == "Sacrum" else getattr(codes.SCT, f"{name}Vertebra")
    else:
        category = codes.SCT.MorphologicallyAbnormalStructure
        prop = codes.SCT.NeoplasmMetastatic
        regions = [codes.SCT.Bone]
    colour = hd.color.CIELabColor.from_rgb(*(round(255 * c) for c in labels_mod.colour(stage, name)))
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label[:_LO_MAX],
        segmented_property_category=category,
        segmented_property_type=prop,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=regions,
        display_color=colour,
    )


def pseudonymise(ds, pseudonym: str) -> None:
    """Apply the pseudonym rules of the module docstring to a dataset in place (every nesting depth)."""
    drop = set(IDENTIFYING_KEYWORDS)

    def strip(dataset) -> None:
        for element in list(dataset):
            if element.keyword in drop:
                del dataset[element.tag]
            elif element.VR == "SQ":
                for item in element.value:
                    strip(item)

    own_serial = ds.get("DeviceSerialNumber")  # the SEG's own (type 1), not the source scanner's
    strip(ds)
    if own_serial is not None:
        ds.DeviceSerialNumber = own_serial
    ds.PatientName = pseudonym
    ds.PatientID = pseudonym
    for keyword in _EMPTIED:
        setattr(ds, keyword, "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "spinemets pseudonym; PS3.15 Basic Profile"
