"""Download a Zenodo record: verified, resumable, retried, unpacked, with a manifest.

It serves the command ``spinemets fetch``.

:func:`fetch_record` asks Zenodo's REST API for a record (``GET {api_url}/records/{id}``), which
answers with JSON whose ``files`` list names each file with its size and checksum::

    {"id": 13645871, "doi": "10.5281/zenodo.13645871", "metadata": {"title": "..."},
     "files": [{"key": "data.zip", "size": 1234, "checksum": "md5:0f3c...",
                "links": {"self": "https://zenodo.org/api/records/13645871/files/data.zip/content"}}]}

The older deposition shape (``filename``, ``filesize``, a bare hexadecimal MD5 ``checksum`` and
``links.download``) and InvenioRDM's ``files: {"entries": ...}`` are read too. The download link
is ``links.content``, else ``links.download``, else ``links.self``, else
``{api_url}/records/{id}/files/{key}/content``.

Each file is streamed (progress bar) into ``.partial-<name>`` beside its final name; an
interrupted transfer resumes with an HTTP ``Range: bytes=<n>-`` request; the checksum
(``md5:`` or ``sha256:``) is verified, and only then is the file renamed into place. Connection
errors, HTTP 5xx/429 and checksum mismatches are retried ``retries`` times with exponential
backoff (``backoff * 2**k`` seconds before retry ``k``); a mismatch restarts that file from
zero. Files already present and verified are not downloaded again. ``.zip``, ``.tar``,
``.tar.gz`` and ``.tgz`` archives are unpacked into the output folder, refusing entries that
would land outside it, links and special files.

The manifest ``download.json`` lists the record, its DOI and title, and each file's name, size
and checksum, and the archives unpacked; it holds no time stamps, so a rerun writes the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import re
import shutil
import stat
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, TypeVar
from urllib.parse import quote, urljoin

import requests
from tqdm.auto import tqdm

from spinemets.errors import SpinemetsError
from spinemets.fileio import PARTIAL_PREFIX, check_output_dir, check_output_file, output_folder, write_json

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://zenodo.org/api"
MANIFEST_NAME = "download.json"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
_CHUNK = 1 << 16  # bytes; a cut connection loses at most the chunk being read
_TIMEOUT = (15, 60)  # seconds: connect, read
_ALGORITHMS = ("md5", "sha256")

T = TypeVar("T")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a record: relative name, size in bytes (None if not listed), checksum, URL."""

    name: str
    size: int | None
    algorithm: str
    digest: str
    url: str

    @property
    def checksum(self) -> str:
        return f"{self.algorithm}:{self.digest}"


class TransientFetchError(SpinemetsError):
    """A download that failed on the network after every retry: the verified files stay for the next try."""


class _Transient(Exception):
    """A failure worth retrying: ``summary`` ends the final message, ``detail`` follows the count."""

    def __init__(self, summary: str, detail: str = ""):
        super().__init__(summary + detail)
        self.summary, self.detail = summary, detail


def fetch_record(
    record: int | str,
    out_dir: str | Path,
    api_url: str = DEFAULT_API_URL,
    retries: int = 4,
    backoff: float = 1.0,
    unpack: bool = True,
) -> Path:
    """Download every file of a Zenodo record into ``out_dir``; return the manifest's path.

    ``record`` is a record id (``13645871``), a Zenodo DOI (``10.5281/zenodo.13645871``) or a
    record URL. ``api_url`` points at Zenodo's API or a mirror of it. Each failing request is
    tried ``1 + retries`` times in all. Raises :class:`SpinemetsError` naming the URL or file and
    what is wrong. After a network failure (:class:`TransientFetchError`) the files already
    verified stay in ``out_dir`` and a rerun resumes; after any other failure a folder this call
    created is removed again.
    """
    record_id = record_id_of(record)
    out_dir = check_output_dir(out_dir, "download folder")
    check_output_file(out_dir / MANIFEST_NAME, "download manifest")
    fresh = not out_dir.exists()
    with output_folder(out_dir, "download folder"):  # a failed first download leaves no empty folder
        try:
            return _fetch_into(record_id, out_dir, api_url, retries, backoff, unpack)
        except TransientFetchError:
            raise  # the network failed: keep the verified files, a rerun resumes
        except SpinemetsError:
            if fresh:  # a refusal (404, checksum, a hostile archive): nothing of this call stays
                shutil.rmtree(out_dir, ignore_errors=True)
            raise


def _fetch_into(record_id: str, out_dir: Path, api_url: str, retries: int, backoff: float, unpack: bool) -> Path:
    record_url = f"{api_url.rstrip('/')}/records/{record_id}"
    with requests.Session() as session:
        meta = _with_retries(lambda: _get_json(session, record_url, record_id), record_url, retries, backoff)
        files = record_files(meta, record_url, api_url, record_id)
        for remote in files:
            _fetch_file(session, remote, out_dir, retries, backoff)
    unpacked = []
    if unpack:
        for remote in files:
            if remote.name.lower().endswith(ARCHIVE_SUFFIXES):
                n = unpack_archive(out_dir / remote.name, out_dir, protected=[f.name for f in files] + [MANIFEST_NAME])
                unpacked.append({"archive": remote.name, "entries": n})
    metadata = meta.get("metadata") if isinstance(meta.get("metadata"), dict) else {}
    manifest = {
        "source": "Zenodo",
        "record": record_id,
        "doi": meta.get("doi") or metadata.get("doi"),
        "title": metadata.get("title"),
        "record_url": record_url,
        "files": [{"name": f.name, "size": f.size, "checksum": f.checksum} for f in files],
        "unpacked": unpacked,
    }
    path = write_json(out_dir / MANIFEST_NAME, manifest)
    log.info("record %s: %d file(s) in %s", record_id, len(files), out_dir)
    return path


def record_id_of(record: int | str) -> str:
    """The numeric id in ``13645871``, ``10.5281/zenodo.13645871`` or ``https://zenodo.org/records/13645871``."""
    text = str(record).strip()
    match = re.fullmatch(r"\d+", text) or re.search(r"zenodo\.(\d+)$", text) or re.search(r"/records?/(\d+)/?$", text)
    if not match:
        raise SpinemetsError(f"{record!r}: not a Zenodo record id, DOI (10.5281/zenodo.N) or record URL")
    return match.group(match.lastindex or 0)


# ---------------------------------------------------------------------------------------------
# record metadata


def _get_json(session: requests.Session, url: str, record_id: str) -> dict:
    try:
        resp = session.get(url, timeout=_TIMEOUT, headers={"Accept": "application/json"})
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Transient("connection failed", f": {_short(exc)}") from None
    except requests.RequestException as exc:
        raise SpinemetsError(f"{url}: {_short(exc)}") from None
    if resp.status_code == 404:
        raise SpinemetsError(f"{url}: Zenodo record {record_id} not found (HTTP 404)")
    _check_status(resp, url)
    try:
        data = resp.json()
    except ValueError:
        raise SpinemetsError(f"{url}: the answer is not JSON; is the API URL right?") from None
    if not isinstance(data, dict):
        raise SpinemetsError(f"{url}: not a Zenodo record (the JSON answer is not an object)")
    return data


def record_files(meta: dict, source: str, api_url: str, record_id: str) -> list[RemoteFile]:
    """The files a record's JSON lists, checked: safe relative names, a known checksum, a URL."""
    files = meta.get("files")
    if isinstance(files, dict):
        files = files.get("entries")
    if isinstance(files, dict):
        files = list(files.values())
    if not isinstance(files, list):
        raise SpinemetsError(f"{source}: not a Zenodo record (the answer has no 'files' list)")
    if not files:
        raise SpinemetsError(f"{source}: the record lists no files (empty or restricted record)")
    parsed = [_remote_file(entry, source, api_url, record_id) for entry in files]
    _check_distinct_paths([f.name for f in parsed], source)
    return parsed


def _check_distinct_paths(names: list[str], source: str) -> None:
    """Raise if two names are one file (``a.txt`` and ``./a.txt``) or a file is a folder of another."""
    seen: dict[str, str] = {}
    for name in names:
        path = _relative_path(name)
        if path in seen:
            raise SpinemetsError(f"{source}: the record lists one file twice ('{seen[path]}' and '{name}')")
        seen[path] = name
    for path, name in seen.items():
        for parent in PurePosixPath(path).parents:
            if parent.as_posix() in seen:
                raise SpinemetsError(f"{source}: file '{seen[parent.as_posix()]}' of the record is also the "
                                     f"folder of its file '{name}'")


def _relative_path(name: str) -> str:
    """``name`` as a path relative to the output folder, backslashes read as separators (``./a//b``
    and ``a\\b`` are ``a/b``): the form in which names are compared with each other and checked for
    leaving the folder. (The file itself is written under the name as given.)"""
    return PurePosixPath(name.replace("\\", "/")).as_posix()


def _remote_file(entry, source: str, api_url: str, record_id: str) -> RemoteFile:
    if not isinstance(entry, dict):
        raise SpinemetsError(f"{source}: a 'files' entry is not an object")
    name = entry.get("key") or entry.get("filename")
    if not isinstance(name, str) or not name:
        raise SpinemetsError(f"{source}: a 'files' entry has no name ('key')")
    _check_relative_name(name, source)
    if name == MANIFEST_NAME:
        raise SpinemetsError(f"{source}: file '{name}' would overwrite the download manifest")
    size = entry.get("size", entry.get("filesize"))
    if size is not None and (not isinstance(size, int) or size < 0):
        raise SpinemetsError(f"{source}: file '{name}' lists an invalid size {size!r}")
    algorithm, digest = _parse_checksum(entry.get("checksum"), name, source)
    links = entry.get("links") if isinstance(entry.get("links"), dict) else {}
    url = links.get("content") or links.get("download") or links.get("self")
    if url is not None and not isinstance(url, str):
        raise SpinemetsError(f"{source}: file '{name}' lists a download link that is not a URL ({type(url).__name__})")
    if not url:
        url = f"{api_url.rstrip('/')}/records/{record_id}/files/{quote(name)}/content"
    return RemoteFile(name, size, algorithm, digest, urljoin(source, url))


def _parse_checksum(value, name: str, source: str) -> tuple[str, str]:
    if not isinstance(value, str) or not value:
        raise SpinemetsError(f"{source}: file '{name}' lists no checksum; it could not be verified")
    algorithm, _, digest = value.rpartition(":")
    algorithm = (algorithm or "md5").lower()  # the older API gives a bare MD5
    digest = digest.lower()
    if algorithm not in _ALGORITHMS:
        raise SpinemetsError(f"{source}: file '{name}' has a {algorithm} checksum; only md5 and sha256 are supported")
    if not re.fullmatch(r"[0-9a-f]+", digest) or len(digest) != hashlib.new(algorithm).digest_size * 2:
        raise SpinemetsError(f"{source}: file '{name}' lists a malformed {algorithm} checksum {value!r}")
    return algorithm, digest


def _check_relative_name(name: str, where) -> None:
    """Raise unless ``name`` is a relative path that stays inside the folder it is written to."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise SpinemetsError(f"{where}: entry {name!r} holds control characters; refusing it")
    pure = PurePosixPath(_relative_path(name))
    if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", name) or not pure.parts:
        raise SpinemetsError(f"{where}: entry '{name}' would be written outside the output folder; refusing it")
    if any(part.startswith(PARTIAL_PREFIX) for part in pure.parts):
        raise SpinemetsError(f"{where}: entry '{name}' uses the reserved prefix {PARTIAL_PREFIX}")


# ---------------------------------------------------------------------------------------------
# one file


def _fetch_file(session: requests.Session, remote: RemoteFile, out_dir: Path, retries: int, backoff: float) -> None:
    target = out_dir / remote.name
    partial = target.with_name(PARTIAL_PREFIX + target.name)
    check_output_file(target, f"file {remote.name} of the record")
    if target.is_file():
        if _verified(target, remote):
            partial.unlink(missing_ok=True)
            log.info("%s: already present and verified", target)
            return
        log.warning("%s: present but does not match the record's checksum; downloading it again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        _with_retries(lambda: _download_once(session, remote, partial, target), remote.url, retries, backoff)
    except Exception:  # a handled failure leaves no half-written file; after Ctrl-C or a kill the
        partial.unlink(missing_ok=True)  # partial file stays, and the next run resumes it
        raise


def _verified(path: Path, remote: RemoteFile) -> bool:
    if remote.size is not None and path.stat().st_size != remote.size:
        return False
    hasher = hashlib.new(remote.algorithm)
    _hash_file(path, hasher)
    return hasher.hexdigest() == remote.digest


def _hash_file(path: Path, hasher) -> None:
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            hasher.update(chunk)


def _download_once(session: requests.Session, remote: RemoteFile, partial: Path, target: Path) -> None:
    """One try: resume ``partial`` from its length, verify, rename onto ``target``."""
    offset = partial.stat().st_size if partial.exists() else 0
    if remote.size is not None and offset > remote.size:
        partial.unlink()
        offset = 0
    hasher = hashlib.new(remote.algorithm)
    if offset:
        _hash_file(partial, hasher)
    if remote.size is None or offset < remote.size:
        hasher = _stream(session, remote, partial, offset, hasher)
    got = partial.stat().st_size
    if remote.size is not None and got < remote.size:
        raise _Transient("transfer ended early", f" ({got} of {remote.size} bytes)")
    digest = hasher.hexdigest()
    if remote.size is not None and got != remote.size:
        partial.unlink()
        raise _Transient("size mismatch", f" for {remote.name} (the record lists {remote.size} bytes, got {got})")
    if digest != remote.digest:
        partial.unlink()
        raise _Transient(
            "checksum mismatch", f" for {remote.name} (expected {remote.checksum}, got {remote.algorithm}:{digest})"
        )
    os.replace(partial, target)
    log.info("%s: downloaded and verified (%s)", target, remote.checksum)


def _stream(session: requests.Session, remote: RemoteFile, partial: Path, offset: int, hasher):
    """Append the bytes from ``offset`` on to ``partial``; return the hasher fed with the whole file."""
    headers = {"Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(remote.url, stream=True, timeout=_TIMEOUT, headers=headers) as resp:
            if resp.status_code == 416:
                partial.unlink(missing_ok=True)
                raise _Transient("the server refused to resume", " (HTTP 416)")
            if resp.status_code == 404:
                raise SpinemetsError(f"{remote.url}: file {remote.name} not found on the server (HTTP 404)")
            _check_status(resp, remote.url)
            if offset and not (resp.status_code == 206 and _range_start(resp) == offset):
                log.info("%s: the server did not resume at byte %d; starting over", remote.url, offset)
                offset, hasher = 0, hashlib.new(remote.algorithm)
            with open(partial, "ab" if offset else "wb") as fh, _progress(remote, offset) as bar:
                for chunk in resp.iter_content(_CHUNK):
                    fh.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as exc:
        raise _Transient("connection failed", f": {_short(exc)}") from None
    except requests.RequestException as exc:
        raise SpinemetsError(f"{remote.url}: {_short(exc)}") from None
    return hasher


def _range_start(resp: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _progress(remote: RemoteFile, offset: int):
    return tqdm(
        total=remote.size, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=remote.name, leave=False
    )


def _check_status(resp: requests.Response, url: str) -> None:
    if resp.status_code >= 500 or resp.status_code == 429:
        raise _Transient(f"server error (HTTP {resp.status_code})")
    if resp.status_code >= 400:
        raise SpinemetsError(f"{url}: HTTP {resp.status_code} {resp.reason}")


def _with_retries(action: Callable[[], T], url: str, retries: int, backoff: float) -> T:
    """Run ``action``; on a transient failure wait ``backoff * 2**k`` s and try again, ``1 + retries`` tries in all."""
    tries = 1 + max(0, int(retries))
    for attempt in range(tries):
        try:
            return action()
        except _Transient as exc:
            if attempt + 1 == tries:
                raise TransientFetchError(f"{url}: {exc.summary} after {tries} tries{exc.detail}") from None
            log.warning("%s: %s (try %d of %d); retrying", url, exc, attempt + 1, tries)
            if backoff > 0:
                time.sleep(backoff * 2**attempt)
    raise AssertionError("unreachable")


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# archives


def unpack_archive(archive: str | Path, dest: str | Path, protected: Iterable[str] = ()) -> int:
    """Unpack a .zip/.tar/.tar.gz/.tgz into ``dest``; return its number of entries.

    Every entry is checked before anything is written: absolute names, ``..``, links and special
    files are refused, and so is an entry named like one of ``protected`` (the record's own files,
    which an archive must not overwrite). Entries are extracted into a ``.partial-`` folder in
    ``dest`` and moved into place; an archive whose files are all present with their sizes is not
    unpacked again.
    """
    archive, dest = Path(archive), Path(dest)
    entries = _archive_entries(archive)
    files = [(name, size) for name, size, is_dir in entries if not is_dir]
    keep = {_relative_path(p) for p in protected}
    clash = sorted(n for n, _ in files if _relative_path(n) in keep)
    if clash:
        raise SpinemetsError(f"{archive}: entry '{clash[0]}' would overwrite a file of the record; refusing to unpack")
    if all((dest / n).is_file() and (dest / n).stat().st_size == s for n, s in files):
        log.info("%s: already unpacked", archive)
        return len(entries)
    staging = dest / f"{PARTIAL_PREFIX}unpack-{archive.name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        extract_into(archive, staging)
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            target = dest / path.relative_to(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: unpacked %d entries into %s", archive, len(entries), dest)
    return len(entries)


def _archive_entries(archive: Path) -> list[tuple[str, int, bool]]:
    """(name, size, is_dir) of each entry, after checking that every one is safe to write."""
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                infos = zf.infolist()
            for i in infos:  # a zip entry made from a link keeps the link's mode in its Unix attributes
                kind = stat.S_IFMT(i.external_attr >> 16)  # 0: no Unix type recorded (a plain file)
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise SpinemetsError(f"{archive}: entry '{i.filename}' is a link or special file; refusing to unpack")
            entries = [(i.filename, i.file_size, i.is_dir()) for i in infos]
        else:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()
            for m in members:
                if not (m.isfile() or m.isdir()):
                    raise SpinemetsError(f"{archive}: entry '{m.name}' is a link or special file; refusing to unpack")
            entries = [(m.name, m.size, m.isdir()) for m in members]
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise SpinemetsError(f"{archive}: cannot unpack (not a valid archive, or truncated): {_short(exc)}") from None
    for name, _, _ in entries:
        _check_relative_name(name, archive)
    return entries


def archive_entries(archive: str | Path, max_bytes: int, max_ratio: float, max_entries: int) -> list[tuple[str, int, bool]]:
    """(name, size, is_dir) of each entry of an archive, checked as :func:`unpack_archive` checks them
    (names that leave the folder, links, special files), and refused as a bomb when it holds more than
    ``max_entries`` entries or declares more than ``max_bytes`` bytes, or more than ``max_ratio`` times its
    own size. Nothing is written. (Python's zip reader never writes more than an entry declares.)"""
    archive = Path(archive)
    entries = _archive_entries(archive)
    total = sum(size for _, size, _ in entries)
    if len(entries) > max_entries:
        raise SpinemetsError(f"{archive}: {len(entries)} entries (at most {max_entries}); refusing to unpack")
    if total > max_bytes or total > max_ratio * max(archive.stat().st_size, 1):
        raise SpinemetsError(f"{archive}: would unpack to {total} bytes from {archive.stat().st_size} "
                             f"(at most {max_bytes} bytes and {max_ratio:g} times its size): an archive bomb or not "
                             "this kind of archive; refusing to unpack")
    return entries


def extract_into(archive: Path, staging: Path) -> None:
    """Unpack ``archive`` into ``staging``: call it only on an archive whose entries :func:`archive_entries`
    (or :func:`unpack_archive`) has checked."""
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
        else:
            with tarfile.open(archive) as tf:
                if hasattr(tarfile, "data_filter"):
                    tf.extractall(staging, filter="data")
                else:  # entries were checked by _archive_entries
                    tf.extractall(staging)
    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError, gzip.BadGzipFile) as exc:
        raise SpinemetsError(f"{archive}: cannot unpack (not a valid archive, or truncated): {_short(exc)}") from None

