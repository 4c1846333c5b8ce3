"""Reading and writing images safely.

* Images are read with SimpleITK and checked: a missing, truncated or corrupt file, a 4-D or
  multi-component volume, NaN or infinite voxels and a sheared or scaled direction matrix each
  raise :class:`~spinemets.errors.SpinemetsError` naming the file and what is wrong. (ITK's NIfTI
  reader turns NaN and infinite voxels into 0, and fills a truncated ``.nii.gz`` with 0: a NIfTI
  file's header is read here and its length checked against the gzip trailer, and floating-point
  voxels are read here, so that a ``.nii.gz`` is decompressed once; see :func:`read_image`.) A
  DICOM series folder is read by :mod:`spinemets.formats.dicom`.
* Images are written from their voxels and geometry only (:func:`write_image`, atomically through
  :func:`spinemets.fileio.atomic_path`): header key/value fields of the source (which may hold
  patient identifiers) never reach an output.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinemets.errors import SpinemetsError, one_line
from spinemets.fileio import atomic_path, check_output_file, describe_path, missing_message, output_folder

log = logging.getLogger(__name__)


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


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3-D scalar image (NRRD, NIfTI, MHA ...) and check it (:func:`check_image`).

    Raises :class:`SpinemetsError` naming ``path`` when the file is missing (or a broken link),
    unreadable (truncated, corrupt, not an image), not 3-D, multi-component, holds NaN or
    infinite voxels, or has an unusable geometry.
    """
    path = Path(path)
    kind = describe_path(path)
    if kind in ("missing", "broken link"):
        raise SpinemetsError(missing_message(path, f"{what} file", kind))
    if kind == "folder":
        from spinemets.formats.dicom import read_dicom_series  # DICOM series folders

        image = read_dicom_series(path)
    elif path.name.lower().endswith((".nii", ".nii.gz")):
        image = _read_nifti(path, what)
    else:
        image = _itk_read(path, what)
    check_image(image, path, what)
    if path.name.lower().endswith(".nrrd"):
        _check_nrrd_data(path, what)
    return image


def _itk_read(path: Path, what: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _unreadable(path, what, exc) from None


def _unreadable(path: Path, what: str, exc: RuntimeError) -> SpinemetsError:
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return SpinemetsError(f"{path}: cannot read {what} (truncated, corrupt or not an image file): {one_line(first)[-200:]}")


#: Bytes per voxel of the NRRD type names (NRRD format specification, "type" field).
_NRRD_TYPE_SIZES = {
    **dict.fromkeys(["signed char", "int8", "uchar", "unsigned char", "uint8"], 1),
    **dict.fromkeys(["short", "short int", "signed short", "signed short int", "int16", "ushort",
                     "unsigned short", "unsigned short int", "uint16"], 2),
    **dict.fromkeys(["int", "signed int", "int32", "uint", "unsigned int", "uint32", "float"], 4),
    **dict.fromkeys(["longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "double"], 8),
}


def _check_nrrd_data(path: Path, what: str) -> None:
    """What ITK's NRRD reader lets through silently, refused: raw data longer than the header says
    (ITK reads the first bytes, as another type than written), and an ``encoding: gzip`` whose data
    is not gzip (ITK falls back to reading them raw)."""
    import zlib

    import nrrd

    try:
        header = nrrd.read_header(str(path))
        with open(path, "rb") as fh:
            while fh.readline().strip():  # the header ends at the first empty line
                pass
            offset = fh.tell()
    except (nrrd.NRRDError, OSError, ValueError, UnicodeDecodeError) as exc:
        raise SpinemetsError(f"{path}: cannot read {what} header ({one_line(exc)[:200]})") from None
    if "data file" in header or "datafile" in header or int(header.get("line skip", 0) or 0) \
            or int(header.get("byte skip", 0) or 0):
        return  # detached or skipped data: ITK's reading is the reference
    itemsize = _NRRD_TYPE_SIZES.get(" ".join(str(header.get("type", "")).lower().replace("_t", "").split()))
    if itemsize is None:  # "block" or an unknown type: ITK read it; nothing to compare with
        return
    expected = int(np.prod(header["sizes"])) * itemsize
    encoding = str(header.get("encoding", "raw")).lower()
    if encoding == "raw":
        stored = path.stat().st_size - offset
    elif encoding in ("gzip", "gz"):
        try:
            with open(path, "rb") as fh:
                fh.seek(offset)
                stored = _gunzipped_length(fh)
        except (EOFError, OSError, zlib.error) as exc:
            raise SpinemetsError(f"{path}: {what} says encoding gzip, but its data are not gzip "
                                 f"({one_line(exc)[:120]})") from None
    else:
        return
    if stored != expected:
        raise SpinemetsError(f"{path}: {what} holds {stored} bytes of voxel data, but its header describes "
                             f"{expected} (sizes {[int(v) for v in header['sizes']]}, type {header.get('type')})")


#: NIfTI ``datatype`` codes of scalar voxels -> (numpy type, SimpleITK pixel type).
_NIFTI_TYPES = {2: ("u1", sitk.sitkUInt8), 256: ("i1", sitk.sitkInt8), 4: ("i2", sitk.sitkInt16),
                512: ("u2", sitk.sitkUInt16), 8: ("i4", sitk.sitkInt32), 768: ("u4", sitk.sitkUInt32),
                1024: ("i8", sitk.sitkInt64), 1280: ("u8", sitk.sitkUInt64), 16: ("f4", sitk.sitkFloat32),
                64: ("f8", sitk.sitkFloat64)}
#: Bytes per voxel of the other NIfTI ``datatype`` codes (complex, RGB, long double).
_NIFTI_OTHER_SIZES = {32: 8, 128: 3, 1536: 16, 1792: 16, 2048: 32, 2304: 4}


def _read_nifti(path: Path, what: str) -> sitk.Image:
    """A NIfTI file (``.nii`` or ``.nii.gz``) read and checked, a ``.nii.gz`` decompressed once.

    What ITK's NIfTI reader lets through silently is refused: a file cut short (ITK fills the missing
    voxels with 0), a qform and an sform that disagree, and NaN or infinite voxels (ITK turns them
    into 0). The header is read from the file's first bytes. A file of integer voxels is read by ITK,
    and its length checked without a second decompression: a gzip stream ends with its length modulo
    2**32, which must be the header's voxel offset plus voxel bytes (only where it is not, the stream is
    decompressed again to tell a truncated file from a longer one). A file of floating-point voxels is
    decompressed here, once, with its gzip trailer (CRC-32 and length) checked, its values checked,
    and the image made from them; ITK reads only its header, for the geometry.
    """
    gz = path.name.lower().endswith(".gz")
    try:
        header = nifti_header(_head_bytes(path, gz))
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        _itk_read(path, what)  # ITK's own refusal first, where it has one
        raise SpinemetsError(f"{path}: cannot read {what} (truncated or corrupt): {one_line(exc)[:200]}") from None
    if header["float"]:
        image = _read_nifti_voxels(path, what, gz)
    else:
        image = _itk_read(path, what)
        if not gz:
            stored = path.stat().st_size
        elif _gzip_length_mod32(path) == header["end"] % 2**32:
            stored = header["end"]
        else:
            try:
                with open(path, "rb") as fh:
                    stored = _gunzipped_length(fh)
            except (EOFError, OSError, zlib.error) as exc:
                raise SpinemetsError(f"{path}: cannot read {what} (truncated or corrupt): {one_line(exc)[:200]}") \
                    from None
        _check_nifti_length(stored, header, path, what)
    if header["qform"] is not None and header["sform"] is not None \
            and not np.allclose(header["qform"], header["sform"], atol=1e-3, rtol=1e-4):
        raise SpinemetsError(f"{path}: {what} has a qform and an sform that disagree; readers differ on which "
                             "they use, so its geometry is ambiguous (rewrite it with one of them)")
    return image


def _check_nifti_length(stored: int, header: dict, path: Path, what: str) -> None:
    if stored < header["end"]:
        raise SpinemetsError(f"{path}: {what} is truncated: {stored} of {header['end']} bytes "
                             "(the missing voxels would read as 0)")


def _head_bytes(path: Path, gz: bool, size: int = 1024) -> bytes:
    """The first ``size`` bytes of a file's content (decompressed from its first blocks for gzip)."""
    with open(path, "rb") as fh:
        if not gz:
            return fh.read(size)
        inflater = zlib.decompressobj(wbits=31)
        out = b""
        while len(out) < size and not inflater.eof:
            block = fh.read(1 << 16)
            if not block:
                break
            out += inflater.decompress(block, size - len(out))
            while len(out) < size and inflater.unconsumed_tail:
                out += inflater.decompress(inflater.unconsumed_tail, size - len(out))
        return out


def _gzip_length_mod32(path: Path) -> int:
    """The last field of a gzip file: the length of what it holds, modulo 2**32 (RFC 1952, ISIZE)."""
    with open(path, "rb") as fh:
        fh.seek(-4, os.SEEK_END)
        return int.from_bytes(fh.read(4), "little")


def _read_nifti_voxels(path: Path, what: str, gz: bool) -> sitk.Image:
    """A NIfTI file's voxels read (a ``.nii.gz`` decompressed once, its trailer checked) and checked for
    NaN and infinite values, as an image with the geometry ITK reads from the header. A scaled, 4-D or
    vector file, which ITK reads differently, is read by ITK (a second pass)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise _unreadable(path, what, exc) from None
    try:
        raw = _gunzip(path.read_bytes()) if gz else path.read_bytes()
    except (EOFError, OSError, zlib.error) as exc:
        raise SpinemetsError(f"{path}: cannot read {what} (truncated or corrupt): {one_line(exc)[:200]}") from None
    header = nifti_header(raw)
    _check_nifti_length(len(raw), header, path, what)
    voxels = header["voxels"]
    check_finite(voxels, path, what)
    size = header["shape"]
    if (header["scaled"] or reader.GetDimension() != 3 or reader.GetNumberOfComponents() != 1
            or tuple(reader.GetSize()) != size[:3] or any(n != 1 for n in size[3:])
            or reader.GetPixelID() != header["pixel_id"]):
        return _itk_read(path, what)  # what ITK makes of it is the reference
    array = voxels[: int(np.prod(size[:3]))].reshape(size[2::-1]).astype(voxels.dtype.newbyteorder("="), copy=False)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(reader.GetSpacing())
    image.SetOrigin(reader.GetOrigin())
    image.SetDirection(reader.GetDirection())
    return image


def _gunzip(data: bytes) -> bytes:
    """The bytes a gzip file holds, decompressed once; every member's trailer (CRC-32, length modulo
    2**32) checked by zlib. Raises EOFError for a stream cut short, ``zlib.error`` for corrupt data."""
    parts = []
    while True:
        inflater = zlib.decompressobj(wbits=31)
        parts.append(inflater.decompress(data))
        if not inflater.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        data = inflater.unused_data
        if not data.strip(b"\0"):  # gzip allows zero padding after the last member
            return parts[0] if len(parts) == 1 else b"".join(parts)


def nifti_header(raw: bytes) -> dict:
    """The fields of a NIfTI-1 or NIfTI-2 file's header (``raw``: the file's bytes, decompressed) that the
    checks of :func:`read_image` need, read as the NIfTI standard defines them.

    Returns ``{"shape": (x, y, z, ...), "end": bytes the header describes (voxel offset + voxel bytes),
    "pixel_id": SimpleITK's pixel type of the voxels (None for other types), "float": whether they are
    floating-point numbers, "scaled": whether
    ``scl_slope``/``scl_inter`` change the values, "qform"/"sform": the 4 x 4 matrices where their
    codes are set (else None), "voxels": the voxel values as stored (a flat array over ``raw``, None
    for types without a numpy equivalent)}``. Raises ValueError for bytes that are no NIfTI header.
    """
    size = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else 0
    order = "<" if size in (348, 540) else ">"
    size = int.from_bytes(raw[:4], "little" if order == "<" else "big")
    if size not in (348, 540) or len(raw) < size:
        raise ValueError("not a NIfTI-1 or NIfTI-2 header")
    if size == 348:
        dim = np.frombuffer(raw, order + "i2", 8, 40).astype(np.int64)
        datatype = int(np.frombuffer(raw, order + "i2", 1, 70)[0])
        pixdim = np.frombuffer(raw, order + "f4", 8, 76).astype(np.float64)
        vox_offset = float(np.frombuffer(raw, order + "f4", 1, 108)[0])
        slope, inter = (float(v) for v in np.frombuffer(raw, order + "f4", 2, 112))
        qcode, scode = (int(v) for v in np.frombuffer(raw, order + "i2", 2, 252))
        quatern = np.frombuffer(raw, order + "f4", 6, 256).astype(np.float64)
        srows = np.frombuffer(raw, order + "f4", 12, 280).astype(np.float64)
    else:
        datatype = int(np.frombuffer(raw, order + "i2", 1, 12)[0])
        dim = np.frombuffer(raw, order + "i8", 8, 16)
        pixdim = np.frombuffer(raw, order + "f8", 8, 104)
        vox_offset = float(np.frombuffer(raw, order + "i8", 1, 168)[0])
        slope, inter = (float(v) for v in np.frombuffer(raw, order + "f8", 2, 176))
        qcode, scode = (int(v) for v in np.frombuffer(raw, order + "i4", 2, 344))
        quatern = np.frombuffer(raw, order + "f8", 6, 352)
        srows = np.frombuffer(raw, order + "f8", 12, 400)
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or (dim[1:ndim + 1] < 1).any():
        raise ValueError(f"header dimensions {list(dim)} are not valid")
    shape = tuple(int(n) for n in dim[1:ndim + 1])
    offset = max(int(vox_offset), size + 4)  # a single file's voxels follow the header and its 4 extension bytes
    numpy_type, pixel_id = _NIFTI_TYPES.get(datatype, (None, None))
    itemsize = np.dtype(numpy_type).itemsize if numpy_type else _NIFTI_OTHER_SIZES.get(datatype)
    if itemsize is None:
        raise ValueError(f"unknown NIfTI datatype {datatype}")
    count = int(np.prod(shape))
    end = offset + count * itemsize
    voxels = None
    if numpy_type is not None and len(raw) >= end:
        voxels = np.frombuffer(raw, order + numpy_type, count, offset)
    return {"shape": shape, "end": end, "pixel_id": pixel_id, "voxels": voxels,
            "float": numpy_type is not None and numpy_type.startswith("f"),
            "scaled": bool(slope not in (0.0, 1.0) and np.isfinite(slope) or inter not in (0.0,) and np.isfinite(inter)),
            "qform": _qform(quatern, pixdim) if qcode else None,
            "sform": np.vstack([srows.reshape(3, 4), [0.0, 0.0, 0.0, 1.0]]) if scode else None}


def _qform(quatern: np.ndarray, pixdim: np.ndarray) -> np.ndarray:
    """The qform matrix of the NIfTI standard: the rotation of the quaternion (b, c, d; a >= 0), the voxel
    sizes (their absolute values; ``qfac`` = ``pixdim[0]`` where it is -1, else 1) and the offsets."""
    b, c, d = quatern[:3]
    a = math.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
    norm = a * a + b * b + c * c + d * d
    a, b, c, d = (v / math.sqrt(norm) for v in (a, b, c, d))
    rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                         [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                         [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - b * b - c * c]])
    scale = np.abs(pixdim[1:4])
    scale[2] *= -1.0 if pixdim[0] == -1 else 1.0
    out = np.eye(4)
    out[:3, :3] = rotation * scale
    out[:3, 3] = quatern[3:6]
    return out


def _gunzipped_length(fh) -> int:
    """Bytes a gzip stream read from ``fh`` decompresses to, counted in blocks (never all in memory)."""
    import gzip

    stored = 0
    with gzip.GzipFile(fileobj=fh) as gz:
        while chunk := gz.read(1 << 22):
            stored += len(chunk)
    return stored


#: The largest origin coordinate or voxel spacing taken as real (mm): 1 km. Beyond it a header is
#: damaged, and the values would not survive a float32 NIfTI header.
GEOMETRY_LIMIT_MM = 1e6
#: How far a direction matrix may be from orthonormal (absolute, per entry of D^T D - I).
DIRECTION_TOLERANCE = 1e-4


def check_geometry(spacing, origin, direction, path: str | Path, what: str = "image") -> None:
    """Spacing finite and positive, origin finite, direction (3x3, row-major) finite and orthonormal.

    A sheared or scaled direction matrix would be orthogonalised silently by the NIfTI writer,
    moving voxels by millimetres; it is refused instead.
    """
    spacing = np.asarray(spacing, dtype=float)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise SpinemetsError(f"{path}: {what} has voxel spacing {_fmt(spacing)}; expected finite positive values")
    if not np.all(np.isfinite(np.asarray(origin, dtype=float))):
        raise SpinemetsError(f"{path}: {what} has a non-finite origin {_fmt(origin)}")
    if np.any(np.abs(np.asarray(origin, dtype=float)) > GEOMETRY_LIMIT_MM) or np.any(spacing > GEOMETRY_LIMIT_MM):
        raise SpinemetsError(f"{path}: {what} has an origin {_fmt(origin)} or spacing {_fmt(spacing)} beyond "
                             f"{GEOMETRY_LIMIT_MM:g} mm; no scanner places voxels there (a damaged header?)")
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    if not np.all(np.isfinite(matrix)):
        raise SpinemetsError(f"{path}: {what} has a non-finite direction matrix")
    deviation = float(np.abs(matrix.T @ matrix - np.eye(3)).max())
    if deviation > DIRECTION_TOLERANCE:
        raise SpinemetsError(
            f"{path}: {what} has a non-orthogonal (sheared or scaled) direction matrix {_fmt(matrix.ravel())}; "
            "resample it onto an orthogonal grid first (writing it would move voxels silently)"
        )


def check_image(image: sitk.Image, path: str | Path, what: str = "image") -> None:
    """Check that ``image`` is a 3-D scalar volume with finite voxels and a usable geometry."""
    if image.GetDimension() != 3:
        raise SpinemetsError(
            f"{path}: {what} is {image.GetDimension()}-D (size {image.GetSize()}); expected a 3-D volume"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise SpinemetsError(
            f"{path}: {what} has {image.GetNumberOfComponentsPerPixel()} components per voxel "
            "(a 4-D or vector image); expected one scalar value per voxel"
        )
    if min(image.GetSize()) < 1:
        raise SpinemetsError(f"{path}: {what} has no voxels (size {image.GetSize()})")
    check_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), path, what)
    if image.GetPixelID() in (sitk.sitkFloat32, sitk.sitkFloat64):
        check_finite(sitk.GetArrayViewFromImage(image), path, what)


def check_finite(values: np.ndarray, path: str | Path, what: str = "image") -> None:
    """Refuse NaN and infinite voxels, naming the file and how many."""
    n_nan = int(np.isnan(values).sum())
    if n_nan:
        raise SpinemetsError(f"{path}: {what} holds {n_nan} NaN voxel(s)")
    n_inf = int(np.isinf(values).sum())
    if n_inf:
        raise SpinemetsError(f"{path}: {what} holds {n_inf} infinite voxel(s)")


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
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


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
    """Write voxels and geometry only, atomically. The format follows the suffix (.nii.gz, .nrrd ...).

    The geometry is checked first (:func:`check_geometry`): no writer gets a matrix it would change.
    """
    check_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection(), path, "image to write")
    with atomic_path(path) as tmp:
        sitk.WriteImage(clean_image(image), str(tmp), compress)
    return Path(path)


#: Output suffixes :func:`convert` writes (all carry voxels and geometry, nothing else).
OUTPUT_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


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
        from spinemets.formats.dicom import read_dicom_series

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
