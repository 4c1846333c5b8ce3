"""Reading and writing images and tables safely.

* Images are read with SimpleITK and checked: a missing, truncated or corrupt file, a 4-D or
  multi-component volume, NaN or infinite voxels and a sheared or scaled direction matrix each
  raise :class:`~spinemets.errors.SpinemetsError` naming the file and what is wrong. (ITK's NIfTI
  reader turns NaN and infinite voxels into 0, and fills a truncated ``.nii.gz`` with 0: a NIfTI
  file's voxels are therefore read here, in one pass that decompresses a ``.nii.gz`` once and checks
  its gzip trailer (CRC and length), and ITK reads only its header, for the geometry; see
  :func:`read_image`.)
* Paths are checked before use (:func:`require_file`, :func:`require_dir`,
  :func:`check_output_file`, :func:`check_output_dir`): a missing file, a broken link, a folder
  where a file is expected and an output under a file each get a one-line message; a failed
  command leaves no empty output folder (:func:`output_folder`) and writes nothing outside it
  (:func:`inside`). Every case ID passes one rule (:func:`check_case_id`).
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
import math
import os
import re
import uuid
import zlib
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import SimpleITK as sitk

from spinemets.errors import SpinemetsError

PARTIAL_PREFIX = ".partial-"


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same suffixes); rename it onto ``path`` on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_paths(paths: Iterable[str | Path]) -> Iterator[list[Path]]:
    """:func:`atomic_path` for several files that belong together: all are renamed into place
    after the block succeeds, none when it fails (the temporary files are removed).

    Each target is checked first (:func:`check_output_file`), so a target that is a folder fails
    before anything is written rather than after the first files were renamed.
    """
    paths = [check_output_file(p) for p in map(Path, paths)]
    temps = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            temps.append(_temporary_name(path))
        yield temps
        for tmp, path in zip(temps, paths):
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


def _temporary_name(path: Path) -> Path:
    """A fresh temporary name beside ``path``, with its suffixes (so writers pick the same format)."""
    return path.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")


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


def read_json(path: str | Path, what: str = "JSON file", missing=...):
    """The content of a JSON file: the one reader of the package's JSON files.

    A missing file returns ``missing`` when one is given, else is a :class:`SpinemetsError`
    naming the file (as are a folder in its place and invalid JSON).
    """
    path = Path(path)
    if missing is not ... and not path.exists() and not path.is_symlink():
        return missing
    require_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SpinemetsError(f"{path}: {what} is not valid JSON ({one_line(exc)})") from None


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
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


def describe_path(path: str | Path) -> str:
    """What stands at ``path`` in words: ``missing``, ``broken link``, ``folder``, ``file`` or ``other``."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return "broken link"
    if not path.exists():
        return "missing"
    if path.is_dir():
        return "folder"
    return "file" if path.is_file() else "other"


def _missing_message(path: Path, what: str, kind: str) -> str:
    if kind == "broken link":
        return f"{path}: {what} is a broken symbolic link (to {os.readlink(path)}, which does not exist)"
    under = _file_above(path)
    if under is not None:
        return f"{path}: {what} not found ({under} is a file, not a folder)"
    return f"{path}: {what} not found"


def require_file(path: str | Path, what: str = "file") -> Path:
    """``path`` if it is an existing regular file (or a link to one); otherwise a :class:`SpinemetsError`
    that says whether it is missing, a broken link, a folder or something else."""
    path = Path(path)
    kind = describe_path(path)
    if kind in ("missing", "broken link"):
        raise SpinemetsError(_missing_message(path, what, kind))
    if kind == "folder":
        raise SpinemetsError(f"{path}: {what} is a folder; expected a file")
    if kind == "other":
        raise SpinemetsError(f"{path}: {what} is not a regular file")
    return path


def require_dir(path: str | Path, what: str = "folder") -> Path:
    """``path`` if it is an existing folder; otherwise a :class:`SpinemetsError` saying what stands there."""
    path = Path(path)
    kind = describe_path(path)
    if kind in ("missing", "broken link"):
        raise SpinemetsError(_missing_message(path, what, kind))
    if kind != "folder":
        raise SpinemetsError(f"{path}: {what} is a file; expected a folder")
    return path


def _file_above(path: Path) -> Path | None:
    """The nearest ancestor of ``path`` that exists and is not a folder, if any."""
    for parent in Path(path).absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


#: The longest file name most file systems take (bytes); temporary names add :data:`_TEMP_EXTRA`.
NAME_MAX = 255
_TEMP_EXTRA = len(PARTIAL_PREFIX) + 9


def _check_name_lengths(path: Path, what: str, extra: int = 0) -> None:
    for part in path.parts:
        if len(part.encode("utf-8", "surrogateescape")) > NAME_MAX - (extra if part == path.name else 0):
            raise SpinemetsError(f"{path}: {what}: the name {part[:24]!r}... is too long for the file system "
                                 f"(at most {NAME_MAX - extra} bytes)")


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """Refuse an output file path that cannot be written: an existing folder, a broken link, a path
    under a file, a name too long, or one in a folder that cannot be written. Nothing is created."""
    path = Path(path)
    _check_name_lengths(path, what, _TEMP_EXTRA)
    kind = describe_path(path)
    if kind == "folder":
        raise SpinemetsError(f"{path}: {what} is an existing folder; give a file name")
    if kind == "broken link":
        raise SpinemetsError(f"{path}: {what} is a broken symbolic link; remove it or give another name")
    if kind == "other":
        raise SpinemetsError(f"{path}: {what} exists and is not a regular file")
    _check_writable_parent(path, what)
    return path


def check_output_dir(path: str | Path, what: str = "output folder") -> Path:
    """Refuse an output folder path that cannot be used: an existing file, a broken link, a path
    under a file, a name too long, or one whose nearest existing ancestor cannot be written. Nothing is created."""
    path = Path(path)
    _check_name_lengths(path, what)
    kind = describe_path(path)
    if kind in ("file", "other"):
        raise SpinemetsError(f"{path}: {what} is an existing file; expected a folder")
    if kind == "broken link":
        raise SpinemetsError(f"{path}: {what} is a broken symbolic link; remove it or give another name")
    if kind == "folder":
        if not os.access(path, os.W_OK | os.X_OK):
            raise SpinemetsError(f"{path}: {what} is not writable")
        return path
    _check_writable_parent(path, what)
    return path


def _check_writable_parent(path: Path, what: str) -> None:
    above = _file_above(path)
    if above is not None:
        raise SpinemetsError(f"{path}: {what} lies under {above}, which is a file, not a folder")
    for parent in path.absolute().parents:
        if parent.exists():
            if not os.access(parent, os.W_OK | os.X_OK):
                raise SpinemetsError(f"{path}: {what} cannot be created: {parent} is not writable")
            return


@contextlib.contextmanager
def output_folder(path: str | Path, what: str = "output folder") -> Iterator[Path]:
    """Create the output folder ``path`` (and missing parents) for the ``with`` block.

    On an exception, the folders this call created are removed again when they are empty, so a
    failed command leaves no empty output folder behind; an existing folder is left as it was.
    """
    path = Path(path)
    check_output_dir(path, what)
    created = [folder for folder in [*reversed(path.absolute().parents), path.absolute()] if not folder.exists()]
    try:
        path.mkdir(parents=True, exist_ok=True)
        yield path
    except BaseException:
        if created:  # this call made the folder: empty folders below it go too (files never)
            for folder in sorted((p for p in path.rglob("*") if p.is_dir() and not p.is_symlink()),
                                 key=lambda p: len(p.parts), reverse=True):
                with contextlib.suppress(OSError):
                    folder.rmdir()
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


def inside(root: str | Path, relative: str | Path, what: str = "output") -> Path:
    """``root / relative``, refused when it would resolve outside ``root`` (``..``, absolute parts, links)."""
    root = Path(root)
    target = root / relative
    base = root.resolve()
    resolved = target.resolve()
    if Path(relative).is_absolute() or not (resolved == base or base in resolved.parents):
        raise SpinemetsError(f"{target}: {what} would lie outside {root}; refusing to write it")
    return target


#: One rule for every case ID, whatever its source (file or folder name, manifest, pseudonym
#: map): it becomes a file name in nnU-Net's folders, so it starts with a letter or digit and
#: holds only letters, digits, '.', '_' and '-' (ASCII), at most :data:`CASE_ID_MAX` characters.
CASE_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
CASE_ID_MAX = 100


def case_id_problem(case_id) -> str | None:
    """Why ``case_id`` is not a valid case ID (see :data:`CASE_ID_PATTERN`), or None when it is."""
    if not isinstance(case_id, str):
        return f"case ID {case_id!r} is not text"
    if not case_id:
        return "empty case ID"
    if len(case_id) > CASE_ID_MAX:
        return f"case ID {case_id[:20]!r}... is longer than {CASE_ID_MAX} characters"
    if not CASE_ID_PATTERN.match(case_id) or case_id.endswith("."):
        return (f"case ID {case_id!r} must start with a letter or digit and hold only letters, digits, "
                "'.', '_' or '-' (and not end with '.')")
    return None


def check_case_id(case_id, source: str | Path) -> str:
    """``case_id`` if valid, else a :class:`SpinemetsError` naming ``source`` (the file it came from)."""
    problem = case_id_problem(case_id)
    if problem:
        raise SpinemetsError(f"{source}: {problem}")
    return case_id


def read_image(path: str | Path, what: str = "image") -> sitk.Image:
    """Read a 3-D scalar image (NRRD, NIfTI, MHA ...) and check it (:func:`check_image`).

    Raises :class:`SpinemetsError` naming ``path`` when the file is missing (or a broken link),
    unreadable (truncated, corrupt, not an image), not 3-D, multi-component, holds NaN or
    infinite voxels, or has an unusable geometry.
    """
    path = Path(path)
    kind = describe_path(path)
    if kind in ("missing", "broken link"):
        raise SpinemetsError(_missing_message(path, f"{what} file", kind))
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


def one_line(text) -> str:
    """``text`` (or an exception's message) with its line breaks and runs of white space folded into one space."""
    return " ".join(str(text).split())


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
