"""Reading and writing images and tables safely.

* Images are read with SimpleITK and checked: a missing, truncated or corrupt file, a 4-D or
  multi-component volume and NaN voxels each raise :class:`~spinemets.errors.SpinemetsError`
  naming the file and what is wrong.
* Every write goes to a temporary name in the destination folder and is renamed into place
  (``os.replace``), so a crash never leaves a half-written file under the final name. Temporary
  names start with :data:`PARTIAL_PREFIX`; :func:`remove_partials` clears those a killed run left.
* Images are written from their voxels and geometry only: header key/value fields of the source
  (which may hold patient identifiers) never reach an output.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import uuid
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import SimpleITK as sitk

from .errors import SpinemetsError

PARTIAL_PREFIX = ".partial-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def remove_partials(folder: str | Path) -> int:
    """Remove temporary files and folders a killed run left in ``folder`` (recursively); return how many."""
    import shutil

    folder = Path(folder)
    if not folder.exists():
        return 0
    stale = sorted(folder.rglob(f"{PARTIAL_PREFIX}*"), key=lambda p: len(p.parts), reverse=True)
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return len(stale)


_NRRD_WRITE_DATE = re.compile(rb"# on \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\(GMT\)\.\n")


def drop_nrrd_write_date(path: str | Path) -> None:
    """Blank the write-date comment pynrrd puts in an NRRD header, so that equal data give equal bytes.

    The comment is overwritten in place by one of the same length; the header stays valid NRRD.
    """
    with open(path, "r+b") as fh:
        match = _NRRD_WRITE_DATE.search(fh.read(1024))
        if match:
            fh.seek(match.start())
            fh.write(b"# write date omitted".ljust(len(match.group()) - 1) + b"\n")


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_csv(path: str | Path, rows: Iterable[dict], fieldnames: list[str]) -> Path:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fieldnames, lineterminator="\n")
            writer.writeheader()
            for row in rows:
                writer.writerow(row)
    return Path(path)


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3-D scalar image (NRRD, NIfTI, MHA ...) and check it.

    Raises :class:`SpinemetsError` naming ``path`` when the file is missing, unreadable
    (truncated, corrupt, not an image), not 3-D, multi-component, or holds NaN voxels.
    """
    path = Path(path)
    if not path.exists():
        raise SpinemetsError(f"{path}: {what} file not found")
    if path.is_dir():
        from .dicom import read_dicom_series  # DICOM series folders

        image = read_dicom_series(path)
    else:
        try:
            image = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
            raise SpinemetsError(
                f"{path}: cannot read {what} (truncated, corrupt or not an image file): {first[-200:]}"
            ) from None
    check_image(image, path, what)
    return image


def check_image(image: sitk.Image, path: str | Path, what: str = "image") -> None:
    """Check that ``image`` is a 3-D scalar volume without NaN voxels."""
    if image.GetDimension() != 3:
        raise SpinemetsError(
            f"{path}: {what} is {image.GetDimension()}-D (size {image.GetSize()}); expected a 3-D volume"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SpinemetsError(
            f"{path}: {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(a 4-D or vector image); expected one scalar value per voxel"
        )
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        n_nan = int(np.isnan(sitk.GetArrayViewFromImage(image)).sum())
        if n_nan:
            raise SpinemetsError(f"{path}: {what} holds {n_nan} NaN voxel(s)")


def geometry(image: sitk.Image) -> dict:
    """Size, spacing, origin and direction of an image, as plain lists (xyz order, LPS)."""
    return {
        "size": list(image.GetSize()),
        "spacing": [float(v) for v in image.GetSpacing()],
        "origin": [float(v) for v in image.GetOrigin()],
        "direction": [float(v) for v in image.GetDirection()],
    }


def ijk_to_lps(image: sitk.Image) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) to physical LPS millimetres."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = image.GetOrigin()
    return matrix


def check_same_geometry(a: sitk.Image, b: sitk.Image, path_a, path_b, tol: float = 1e-3) -> None:
    """Raise when two images do not share size, spacing, origin and direction."""
    ga, gb = geometry(a), geometry(b)
    for key in ("size", "spacing", "origin", "direction"):
        if not np.allclose(ga[key], gb[key], atol=tol, rtol=0):
            raise SpinemetsError(
                f"{path_b}: {key} {_fmt(gb[key])} differs from {path_a} ({_fmt(ga[key])}); "
                "the two must share one voxel grid"
            )


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def image_from_array(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """An image with ``array`` (z, y, x) as voxels and the geometry of ``reference``, and nothing else."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reference.GetSpacing())
    image.SetOrigin(reference.GetOrigin())
    image.SetDirection(reference.GetDirection())
    return image


def clean_image(image: sitk.Image) -> sitk.Image:
    """A copy of ``image`` carrying voxels and geometry only (no header key/value fields)."""
    return image_from_array(sitk.GetArrayFromImage(image), image)


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Write voxels and geometry only, atomically. The format follows the suffix (.nii.gz, .nrrd ...)."""
    with atomic_path(path) as tmp:
        sitk.WriteImage(clean_image(image), str(tmp), compress)
    return Path(path)
