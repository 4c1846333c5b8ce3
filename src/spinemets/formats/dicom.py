"""DICOM series input and conversion to the working format.

It serves the command ``spinemets convert`` (and DICOM folders wherever an image is read).

Reading
    :func:`read_dicom_series` reads one series from a folder with SimpleITK's
    ``ImageSeriesReader`` (GDCM). A folder may hold several series (Series Instance UID
    ``0020|000e``); then the caller picks one by UID, or gets an error listing the UIDs with
    their modality, slice size and number of files.

    The reader keeps ``MetaDataDictionaryArrayUpdate`` off, so the returned image carries voxels
    and geometry only. Only geometric and descriptive-technical tags are ever looked at
    (position ``0020|0032``, orientation ``0020|0037``, modality ``0008|0060``, rows/columns
    ``0028|0010``/``0028|0011``); no tag value that may identify a person (names, IDs, dates,
    accession number, institution, free-text descriptions) is read into a message or a log.
    Series Description is left out of messages on purpose: the DICOM Basic Application Level
    Confidentiality Profile (PS3.15 Annex E) removes it, since it is free text.

    GDCM silently drops a truncated slice and ITK then stretches the spacing over the gap, and it
    reads a tilted stack as if it were orthogonal, so this module checks the geometry itself:
    every file that claims to be DICOM (``DICM`` magic at byte 128, or a ``.dcm``/``.dicom``/``.ima``
    suffix) belongs to a series; all slices have one orientation and one size (a Series Instance
    UID that an anonymiser gave to two series mixes them); the slices are stacked along their
    normal ``n = row x column`` (a gantry tilt stacks them at an angle: refused, with the angle,
    since resampling it is the scanner's or the viewer's job); and the slice positions along
    ``n`` are evenly spaced (each gap within 1 % + 0.01 mm of the median gap).

Choosing a series
    When no UID is given and the folder holds several series, the rule is: keep the series that
    are CT (Modality), not a localizer (Image Type LOCALIZER), axial (slice normal within 45
    degrees of the patient's head-foot axis) and hold more than two slices. One left: it is read,
    and the log says which (by UID). None or several left (two reconstruction kernels of one
    acquisition, say): an error names every series with its modality, kernel, slice count and
    size, and asks for a UID (``convert --series-uid``) or a folder of its own for the series to
    use. Segmentations, reports and other non-image objects in the folder are never candidates
    (GDCM lists no series for a report or structure set: a file whose header says SR, RTSTRUCT and
    the like is passed over, and the log says so; any other file that claims to be DICOM and is no
    slice of a series stays an error).

Checking a series for prediction
    :func:`check_series` reads every slice header of the chosen series with pydicom (no pixels)
    before any model runs, and sorts what it finds into three kinds:

    * refused (:class:`SpinemetsError` naming the file): not CT (Modality MR, PT ...; the models
      were trained on CT), an enhanced or other multi-frame image (one file holding many
      frames: convert it to single-frame slices first; :func:`read_dicom_series`, and so
      ``convert``, refuses it too), plus the geometric checks above;
    * repaired in memory only (the source files are never changed): a SOP Class UID blanked in
      the data set but kept in the file meta (Media Storage SOP Class UID) is taken from there;
    * no DICOM output: the voxels are good, but a DICOM object derived from the series could not
      reference it validly (Study, Series or Frame of Reference UID blank or not one value for
      all slices, SOP Instance UIDs blank or duplicated, no SOP class at all). The prediction is
      made and written as NIfTI, ``.seg.nrrd`` and tables; the reason goes into the log and the
      provenance, and no DICOM-SEG or SR is written.

    Missing Study Date, Time or ID, Accession Number and the like are no obstacle (type 2: the
    outputs carry them empty; :func:`read_series_headers` adds them empty in memory).
    Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) are decoded by GDCM inside
    SimpleITK; a slice GDCM cannot decode is an error naming the series.

Converting
    :func:`convert` reads a DICOM folder, NRRD or NIfTI image and writes it with
    :func:`spinemets.formats.images.write_image` (voxels and geometry only, written atomically).

Pseudonyms are :mod:`spinemets.formats.deidentify`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinemets.errors import SpinemetsError, one_line

log = logging.getLogger(__name__)


_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_SAFE_SUMMARY_TAGS = {"modality": "0008|0060", "rows": "0028|0010", "columns": "0028|0011",
                      "image_type": "0008|0008", "kernel": "0018|1210"}
#: Modalities of DICOM objects that are no image series (segmentations, structure sets, reports ...).
NOT_IMAGE_MODALITIES = ("SEG", "RTSTRUCT", "SR", "PR", "RTPLAN", "RTDOSE", "KO")
#: Storage SOP classes of single-frame CT slices; the enhanced and legacy-converted ones are multi-frame.
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MULTIFRAME_CT_STORAGE = {"1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
                         "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage"}
#: Type 2 patient and study attributes that a SEG or SR copies from its source (added empty where missing).
_TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "StudyID", "AccessionNumber", "ReferringPhysicianName")
#: Most degrees between the slice normal and the direction the slices are stacked in (gantry tilt).
MAX_TILT_DEG = 0.5


# ---------------------------------------------------------------------------------------------
# reading


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> sitk.Image:
    """Read one DICOM series from ``folder`` (not recursive) as a 3-D image (voxels + geometry only).

    ``series_uid`` picks a series when the folder holds several; it may be left out when the
    folder holds exactly one. Raises :class:`SpinemetsError` when the folder is missing, empty,
    holds no DICOM series, holds several and none was picked, the UID is unknown, a file that
    claims to be DICOM is unreadable, or the slices are not evenly spaced (a slice missing).
    """
    folder = Path(folder)
    if not folder.exists():
        raise SpinemetsError(f"{folder}: DICOM folder not found")
    if not folder.is_dir():
        raise SpinemetsError(f"{folder}: not a folder; a DICOM series is read from a folder of slice files")
    series = series_files(folder)
    uid = _pick_series(folder, series, series_uid)
    files = series[uid]
    _check_single_frames(files)
    _check_slice_geometry(folder, files)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    reader.MetaDataDictionaryArrayUpdateOff()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise SpinemetsError(f"{folder}: cannot read DICOM series {uid}: {first[-200:]}") from None
    log.info("read DICOM series with %d slices from %s", len(files), folder)
    return image


def check_series(folder: str | Path, series_uid: str | None = None) -> dict:
    """Check the series in ``folder`` (the one of ``series_uid``, or the one the module's rule picks)
    for prediction, from its headers only; see the module docstring for what is refused, what is
    repaired in memory and what only rules out DICOM outputs.

    Raises :class:`SpinemetsError` naming the file for a refused series. Returns ``uid``,
    ``files`` (sorted along the slice normal), ``dicom_output`` (whether a SEG or SR may reference
    the series), ``why_not`` (the reason when not, else None) and ``repaired`` (what was taken
    from elsewhere in memory, one line each).
    """
    import pydicom

    folder = Path(folder)
    if not folder.is_dir():
        raise SpinemetsError(f"{folder}: DICOM folder not found")
    series = series_files(folder)
    uid = _pick_series(folder, series, series_uid)
    files = series[uid]
    headers = []
    for path in files:
        try:
            headers.append(pydicom.dcmread(str(path), stop_before_pixels=True))
        except Exception as exc:  # pydicom raises several types for damaged headers
            raise SpinemetsError(f"{path}: cannot read the DICOM header: {one_line(exc)[:200]}") from None
    repaired: list[str] = []
    problems: list[str] = []
    for path, ds in zip(files, headers):
        sop_class = str(ds.get("SOPClassUID", "") or "")
        meta_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
        modality = str(ds.get("Modality", "") or "").strip().upper()
        frames = ds.get("NumberOfFrames", None)
        if (sop_class or meta_class) in MULTIFRAME_CT_STORAGE or (frames is not None and _int(frames) > 1):
            kind = MULTIFRAME_CT_STORAGE.get(sop_class or meta_class, "a multi-frame image")
            raise SpinemetsError(
                f"{path}: {kind} with {_int(frames) if frames is not None else 'several'} frames in one file; "
                "spinemets reads series of single-frame CT slices: convert it to single-frame slices first"
            )
        if modality != "CT" and not (not modality and (sop_class or meta_class) == CT_IMAGE_STORAGE):
            raise SpinemetsError(f"{path}: Modality {modality or 'missing'}, not CT; the models were trained on CT "
                                 "series only")
        if not sop_class and meta_class:
            if not repaired:
                repaired.append("SOP Class UID blank in the data set: taken from the file meta "
                                "(Media Storage SOP Class UID)")
        elif not sop_class:
            problems.append(f"{path.name}: no SOP Class UID, in the data set or the file meta")
    _check_slice_geometry(folder, files)
    for keyword, name in (("StudyInstanceUID", "Study Instance UID"), ("SeriesInstanceUID", "Series Instance UID"),
                          ("FrameOfReferenceUID", "Frame of Reference UID")):
        values = {str(ds.get(keyword, "") or "") for ds in headers}
        if "" in values:
            problems.append(f"{name} blank or missing in {sum(not str(ds.get(keyword, '') or '') for ds in headers)} "
                            f"of {len(headers)} slice(s)")
        elif len(values) > 1:
            problems.append(f"{name} differs between the slices ({len(values)} values)")
    instances = [str(ds.get("SOPInstanceUID", "") or "") for ds in headers]
    if "" in instances:
        problems.append(f"SOP Instance UID blank or missing in {instances.count('')} of {len(instances)} slice(s)")
    elif len(set(instances)) < len(instances):
        problems.append(f"SOP Instance UID duplicated ({len(instances) - len(set(instances))} slice(s) repeat one)")
    why_not = None
    if problems:
        why_not = ("no DICOM output (SEG, SR): the series cannot be referenced (anonymised?): "
                   + "; ".join(dict.fromkeys(problems)))
    return {"uid": uid, "files": files, "dicom_output": why_not is None, "why_not": why_not, "repaired": repaired}


def read_series_headers(files: list[Path]) -> list:
    """The pydicom headers (no pixels) of ``files``, each with the in-memory repairs of
    :func:`check_series` (a blank SOP Class UID taken from the file meta; the type 2 patient and
    study attributes that DICOM outputs copy, added empty where missing); the files are not changed."""
    import pydicom

    headers = []
    for path in files:
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        except Exception as exc:  # pydicom raises several types for damaged headers
            raise SpinemetsError(f"{path}: cannot read the DICOM header: {one_line(exc)[:200]}") from None
        meta_class = str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "") or "")
        if not str(ds.get("SOPClassUID", "") or "") and meta_class:
            ds.SOPClassUID = meta_class
        for keyword in _TYPE2_COPIED:  # type 2 in the outputs, which copy them: present, if empty
            if keyword not in ds:
                setattr(ds, keyword, "")
        headers.append(ds)
    return headers


def _int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def list_series(folder: str | Path) -> list[dict]:
    """The series in ``folder``: one dict per series with ``uid``, ``files`` (count), ``modality``,
    ``rows`` and ``columns`` (technical tags only, never identifying ones)."""
    folder = Path(folder)
    return [_summary(uid, files) for uid, files in series_files(folder).items()]


def series_files(folder: Path) -> dict[str, list[Path]]:
    """Map Series Instance UID -> slice files sorted by GDCM along the slice normal."""
    candidates = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not candidates:
        raise SpinemetsError(f"{folder}: DICOM folder is empty (no files)")
    uids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    series = {
        uid: [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)] for uid in uids
    }
    claimed = {p.name for files in series.values() for p in files}
    unreadable = [p for p in candidates if p.name not in claimed and _claims_dicom(p)]
    others = [p for p in unreadable if _non_image_object(p)]  # a report or structure set beside the slices
    if others:
        log.info("%s: passed over %d DICOM object(s) that are no images (%s)", folder, len(others),
                 ", ".join(sorted({_non_image_object(p) for p in others})))
        claimed |= {p.name for p in others}
        unreadable = [p for p in unreadable if p not in others]
    if unreadable:
        names = ", ".join(p.name for p in unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        raise SpinemetsError(
            f"{folder}: {len(unreadable)} file(s) look like DICOM but cannot be read "
            f"(truncated or corrupt): {names}; fix or remove them so no slice is silently missing"
        )
    if not series:
        raise SpinemetsError(f"{folder}: no DICOM series found ({len(candidates)} file(s), none readable as DICOM)")
    ignored = len(candidates) - len(claimed)
    if ignored:
        log.info("%s: ignored %d file(s) that are not DICOM", folder, ignored)
    return series


def _non_image_object(path: Path) -> str | None:
    """The Modality of a DICOM object that is no image (an SR, RTSTRUCT ...: GDCM lists no series for
    them), read from its header (with or without a file meta header), else None. Such a file is no
    slice, so passing it over loses none, even when it is damaged further on; a slice whose header
    cannot be read, or says CT, stays an error."""
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), force=True, specific_tags=["Modality"])
        modality = str(ds.get("Modality", "") or "").strip().upper()
    except Exception:  # not DICOM, or damaged before its Modality
        return None
    return modality if modality in NOT_IMAGE_MODALITIES else None


def _claims_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as fh:
        head = fh.read(132)
    return head[128:132] == b"DICM"


def _pick_series(folder: Path, series: dict[str, list[Path]], series_uid: str | None) -> str:
    if series_uid is not None:
        if series_uid in series:
            return series_uid
        raise SpinemetsError(
            f"{folder}: no DICOM series with UID {series_uid}; the folder holds: {_describe(series)}"
        )
    if len(series) > 1:
        candidates = [uid for uid in series if _is_axial_ct(_summary(uid, series[uid]))]
        if len(candidates) == 1:
            log.info("%s: holds %d DICOM series; read the only axial CT series that is no localizer: %s",
                     folder, len(series), candidates[0])
            return candidates[0]
        why = "none" if not candidates else f"{len(candidates)}"
        raise SpinemetsError(
            f"{folder}: holds {len(series)} DICOM series, {why} of them an axial CT series with more than two slices "
            f"that is no localizer; pick one by its UID (convert --series-uid) or move it into a folder of its own: "
            f"{_describe(series)}"
        )
    return next(iter(series))


def _is_axial_ct(summary: dict) -> bool:
    """The rule of the module docstring: CT, no localizer, axial, more than two slices."""
    normal = summary["normal"]
    return (summary["modality"].upper() == "CT" and "LOCALIZER" not in summary["image_type"].upper()
            and normal is not None and abs(normal[2]) >= np.cos(np.radians(45)) and summary["files"] > 2)


def _summary(uid: str, files: list[Path]) -> dict:
    info = {"uid": uid, "files": len(files), "modality": "?", "rows": "?", "columns": "?", "image_type": "",
            "kernel": "", "normal": None}
    reader = header_reader(files[0])
    if reader is not None:
        for key, tag in _SAFE_SUMMARY_TAGS.items():
            if reader.HasMetaDataKey(tag):
                info[key] = reader.GetMetaData(tag).strip()
        info["normal"] = _normal(reader)
    return info


def _normal(reader: sitk.ImageFileReader):
    """The slice normal (row x column) of a header, or None without a valid orientation."""
    if not reader.HasMetaDataKey(_TAG_ORIENTATION):
        return None
    try:
        cosines = [float(v) for v in reader.GetMetaData(_TAG_ORIENTATION).split("\\")]
    except ValueError:
        return None
    if len(cosines) != 6:
        return None
    normal = np.cross(cosines[:3], cosines[3:6])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 1e-6 else None


def _describe(series: dict[str, list[Path]]) -> str:
    lines = []
    for uid, files in series.items():
        s = _summary(uid, files)
        kind = "localizer" if "LOCALIZER" in s["image_type"].upper() else (
            "axial" if s["normal"] is not None and abs(s["normal"][2]) >= np.cos(np.radians(45)) else "not axial")
        kernel = f", kernel {s['kernel']}" if s["kernel"] else ""
        lines.append(f"{s['uid'] or '(blank UID)'} ({s['modality']}, {kind}{kernel}, {s['files']} file(s), "
                     f"{s['columns']}x{s['rows']} pixels)")
    return "; ".join(lines)


def header_reader(path: Path) -> sitk.ImageFileReader | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _check_single_frames(files: list[Path]) -> None:
    """Raise for a multi-frame image (an enhanced CT: all slices in one file), which GDCM would read
    as a 4-D image placed at one frame's position."""
    path = files[0]
    reader = header_reader(path)
    frames = _int(reader.GetMetaData("0028|0008")) if reader is not None and reader.HasMetaDataKey("0028|0008") else 0
    if frames > 1:
        raise SpinemetsError(
            f"{path}: a multi-frame image with {frames} frames in one file (an enhanced CT); spinemets "
            "reads series of single-frame CT slices: convert it to single-frame slices first"
        )


def _check_slice_geometry(folder: Path, files: list[Path], rel_tol: float = 0.01, abs_tol: float = 0.01) -> None:
    """Raise when the slices differ in orientation or size, are stacked at an angle to their normal
    (gantry tilt) or are not evenly spaced along it."""
    points, normal, first = [], None, None
    for path in files:
        reader = header_reader(path)
        if reader is None or not reader.HasMetaDataKey(_TAG_POSITION) or not reader.HasMetaDataKey(_TAG_ORIENTATION):
            return  # no geometry tags: ITK falls back on its own ordering; nothing to check against
        shape = tuple(reader.GetMetaData(t).strip() if reader.HasMetaDataKey(t) else "?"
                      for t in ("0028|0010", "0028|0011"))
        this = _normal(reader)
        if this is None:
            raise SpinemetsError(f"{path}: Image Orientation (Patient) is not two directions of six numbers")
        if first is None:
            first, normal = (path, shape), this
        elif not np.allclose(this, normal, atol=1e-3) or shape != first[1]:
            raise SpinemetsError(
                f"{path}: its orientation or size differs from {first[0].name} of the same series (Series Instance "
                "UID shared by two series, e.g. a localizer and the axial slices, or blanked by an anonymiser); "
                "separate the series into folders of their own"
            )
        try:
            point = [float(v) for v in reader.GetMetaData(_TAG_POSITION).split("\\")]
        except ValueError:
            point = []
        if len(point) != 3 or not np.all(np.isfinite(point)):
            raise SpinemetsError(f"{path}: Image Position (Patient) is not three numbers")
        points.append(point)
    if len(files) < 2:
        return
    points = np.array(points)
    along = points @ normal
    order = np.argsort(along)
    stack = points[order[-1]] - points[order[0]]
    if np.linalg.norm(stack) > abs_tol:
        angle = float(np.degrees(np.arccos(min(1.0, abs(float(stack @ normal)) / float(np.linalg.norm(stack))))))
        if angle > MAX_TILT_DEG:
            raise SpinemetsError(
                f"{folder}: gantry tilt: the slices are stacked at {angle:.1f} degrees to their normal; spinemets "
                "reads orthogonal grids only: resample the series to one first (3D Slicer's DICOM import "
                "corrects a gantry tilt)"
            )
    if len(files) < 3:
        return
    positions = along
    gaps = np.diff(np.sort(positions))
    median = float(np.median(gaps))
    if median <= abs_tol:
        raise SpinemetsError(f"{folder}: several slices share one position; the series holds duplicate slices")
    worst = int(np.argmax(np.abs(gaps - median)))
    if abs(gaps[worst] - median) > rel_tol * median + abs_tol:
        raise SpinemetsError(
            f"{folder}: slices are not evenly spaced: gap of {gaps[worst]:.3g} mm after slice {worst + 1} "
            f"of {len(files)} (the others are {median:.3g} mm); a slice may be missing"
        )


# ---------------------------------------------------------------------------------------------
# converting


DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


def is_dicom_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(DICOM_SUFFIXES):
        return True
    if "." in name.lstrip("."):  # a suffix of another kind
        suffix = name.rsplit(".", 1)[1]
        if not suffix.isdigit():  # DICOM files are often named 1.2.840....1 or IM0001.1
            return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def dicom_modality(path: Path) -> str:
    """Modality (0008|0060) of one DICOM file: a technical tag, never one that identifies anybody."""
    reader = header_reader(path)
    if reader is None or not reader.HasMetaDataKey("0008|0060"):
        return "?"
    return reader.GetMetaData("0008|0060").strip().upper()
