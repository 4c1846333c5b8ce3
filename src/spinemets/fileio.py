"""Reading and writing files safely: path checks, atomic writes, JSON and CSV, and the case-ID rule.

* Paths are checked before use (:func:`require_file`, :func:`require_dir`,
  :func:`check_output_file`, :func:`check_output_dir`): a missing file, a broken link, a folder
  where a file is expected and an output under a file each get a one-line message; a failed
  command leaves no empty output folder (:func:`output_folder`) and writes nothing outside it
  (:func:`inside`). Every case ID passes one rule (:func:`check_case_id`).
* Every write goes to a temporary name in the destination folder and is renamed into place
  (``os.replace``), so a crash never leaves a half-written file under the final name. Temporary
  names start with :data:`PARTIAL_PREFIX`; :func:`remove_partials` clears those a killed run left.

Images are read and written by :mod:`spinemets.formats.images`.
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

from spinemets.errors import SpinemetsError, one_line


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


def missing_message(path: Path, what: str, kind: str) -> str:
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
        raise SpinemetsError(missing_message(path, what, kind))
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
        raise SpinemetsError(missing_message(path, what, kind))
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
