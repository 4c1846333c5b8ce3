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

    GDCM silently drops a truncated slice and ITK then stretches the spacing over the gap, so
    this module checks two things itself: every file that claims to be DICOM (``DICM`` magic at
    byte 128, or a ``.dcm``/``.dicom``/``.ima`` suffix) belongs to a series, and the slice
    positions along the slice normal ``n = row x column`` are evenly spaced (each gap within
    1 % + 0.01 mm of the median gap).

Converting
    :func:`convert` reads a DICOM folder, NRRD or NIfTI image and writes it with
    :func:`spinemets.io.write_image` (voxels and geometry only, written atomically).

Pseudonyms are :mod:`spinemets.deidentify`'s.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import SpinemetsError
from .io import check_image, check_output_file, output_folder, read_image, write_image

log = logging.getLogger(__name__)

#: Output suffixes :func:`convert` writes (all carry voxels and geometry, nothing else).
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")

_DICOM_SUFFIXES = {".dcm", ".dicom", ".ima"}
_TAG_POSITION = "0020|0032"
_TAG_ORIENTATION = "0020|0037"
_SAFE_SUMMARY_TAGS = {"modality": "0008|0060", "rows": "0028|0010", "columns": "0028|0011"}


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
    series = _series_files(folder)
    uid = _pick_series(folder, series, series_uid)
    files = series[uid]
    _check_slice_spacing(folder, files)
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


def list_series(folder: str | Path) -> list[dict]:
    """The series in ``folder``: one dict per series with ``uid``, ``files`` (count), ``modality``,
    ``rows`` and ``columns`` (technical tags only, never identifying ones)."""
    folder = Path(folder)
    return [_summary(uid, files) for uid, files in _series_files(folder).items()]


def _series_files(folder: Path) -> dict[str, list[Path]]:
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


def _claims_dicom(path: Path) -> bool:
    if path.suffix.lower() in _DICOM_SUFFIXES:
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
        raise SpinemetsError(
            f"{folder}: holds {len(series)} DICOM series; pick one by its UID (--series-uid): {_describe(series)}"
        )
    return next(iter(series))


def _summary(uid: str, files: list[Path]) -> dict:
    info = {"uid": uid, "files": len(files), "modality": "?", "rows": "?", "columns": "?"}
    reader = _header_reader(files[0])
    if reader is not None:
        for key, tag in _SAFE_SUMMARY_TAGS.items():
            if reader.HasMetaDataKey(tag):
                info[key] = reader.GetMetaData(tag).strip()
    return info


def _describe(series: dict[str, list[Path]]) -> str:
    lines = []
    for uid, files in series.items():
        s = _summary(uid, files)
        lines.append(f"{s['uid']} ({s['modality']}, {s['files']} file(s), {s['columns']}x{s['rows']} pixels)")
    return "; ".join(lines)


def _header_reader(path: Path) -> sitk.ImageFileReader | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _check_slice_spacing(folder: Path, files: list[Path], rel_tol: float = 0.01, abs_tol: float = 0.01) -> None:
    """Raise when the slice positions along the slice normal are not evenly spaced."""
    if len(files) < 3:
        return
    positions = []
    normal = None
    for path in files:
        reader = _header_reader(path)
        if reader is None or not reader.HasMetaDataKey(_TAG_POSITION) or not reader.HasMetaDataKey(_TAG_ORIENTATION):
            return  # no geometry tags: ITK falls back on its own ordering; nothing to check against
        if normal is None:
            cosines = [float(v) for v in reader.GetMetaData(_TAG_ORIENTATION).split("\\")]
            normal = np.cross(cosines[:3], cosines[3:6])
        positions.append(float(np.dot(normal, [float(v) for v in reader.GetMetaData(_TAG_POSITION).split("\\")])))
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


def convert(input: str | Path, out: str | Path, series_uid: str | None = None) -> Path:
    """Read a DICOM series folder, NRRD or NIfTI image and write it to ``out`` (format from the suffix).

    The output holds voxels and geometry only (no header fields of the source), and is written
    to a temporary name and renamed, so a failure leaves no file under ``out``. Returns ``out``.
    """
    src, out = Path(input), Path(out)
    if not any(out.name.lower().endswith(sfx) for sfx in OUTPUT_SUFFIXES):
        raise SpinemetsError(f"{out}: unsupported output format; use one of {', '.join(OUTPUT_SUFFIXES)}")
    check_output_file(out, "output image")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise SpinemetsError(f"{out}: output would overwrite the input; choose another file name")
    if src.is_dir():
        if out.resolve().is_relative_to(src.resolve()):
            raise SpinemetsError(f"{out}: output lies inside the DICOM folder {src}; write it elsewhere")
        image = read_dicom_series(src, series_uid)
        check_image(image, src, "DICOM series")
    else:
        if series_uid is not None:
            raise SpinemetsError(f"{src}: a series UID applies to DICOM folders only, and this is a file")
        image = read_image(src)
    with output_folder(out.parent):
        write_image(image, out)
    log.info("converted %s -> %s", src, out)
    return out
