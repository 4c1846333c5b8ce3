"""Test doubles shared by the fetch, DICOM and bad-input tests.

* :class:`FakeZenodo`: an HTTP server on 127.0.0.1 (ephemeral port, own thread) that imitates
  Zenodo's records API for small in-memory records, honours ``Range`` requests, records every
  request, and injects faults on demand (server error, connection cut mid-file, corrupted body,
  ``Range`` ignored).
* :func:`write_dicom_series`: a synthetic int16 DICOM series written with SimpleITK, with
  patient identifiers placed in its header so tests can prove they never reach an output.
* :func:`zip_bytes` / :func:`tar_gz_bytes`: archives built in memory.
"""

from __future__ import annotations

import contextlib
import locale

import hashlib
import io
import json
import re
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np
import SimpleITK as sitk

# ---------------------------------------------------------------------------------------------
# a fake Zenodo


class FakeZenodo:
    """Local imitation of ``GET /api/records/{id}`` and ``GET /api/records/{id}/files/{key}/content``.

    Use as a context manager; :attr:`api_url` is what ``fetch_record(api_url=...)`` takes.
    ``fail(path, *faults, forever=False)`` queues faults for requests to ``path`` (the URL path,
    e.g. ``/api/records/1/files/a.txt/content``): ``"500"``, ``"404"``, ``"cut"`` (send half the
    body, then close), ``"stall"`` (send half the body, then hang until the fake closes), ``"corrupt"`` (flip a byte), ``"ignore-range"`` (answer 200 with the whole
    file), ``"not-json"``. With ``forever=True`` the last fault repeats for every later request.
    """

    def __init__(self):
        self.records: dict[str, dict] = {}
        self.blobs: dict[str, bytes] = {}  # URL path -> body
        self.faults: dict[str, list[str]] = {}
        self.forever: dict[str, str] = {}
        self.requests: list[tuple[str, dict]] = []  # (URL path, headers)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.02,), daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def api_url(self) -> str:
        return f"{self.base}/api"

    def __enter__(self) -> "FakeZenodo":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add_record(
        self,
        record_id: int | str,
        files: dict[str, bytes],
        shape: str = "new",
        algorithm: str = "md5",
        checksums: dict[str, str] | None = None,
    ) -> dict:
        """Serve ``files`` as record ``record_id``; ``shape`` "new" (records API) or "legacy"
        (deposition fields). ``checksums`` overrides the listed checksum of some files."""
        record_id = str(record_id)
        entries = []
        for name, data in files.items():
            path = f"/api/records/{record_id}/files/{quote(name)}/content"
            self.blobs[path] = data
            digest = hashlib.new(algorithm, data).hexdigest()
            checksum = (checksums or {}).get(name, f"{algorithm}:{digest}")
            if shape == "new":
                entries.append(
                    {"id": f"f{len(entries)}", "key": name, "size": len(data), "checksum": checksum,
                     "links": {"self": self.base + path}}
                )
            else:
                entries.append(
                    {"id": f"f{len(entries)}", "filename": name, "filesize": len(data),
                     "checksum": checksum.split(":", 1)[-1],
                     "links": {"self": f"{self.base}/api/files/f{len(entries)}", "download": self.base + path}}
                )
        record = {
            "id": int(record_id) if record_id.isdigit() else record_id,
            "doi": f"10.5281/zenodo.{record_id}",
            "metadata": {"title": f"Fake record {record_id}"},
            "files": entries,
        }
        self.records[record_id] = record
        self.blobs[f"/api/records/{record_id}"] = json.dumps(record).encode()
        return record

    @staticmethod
    def file_path(record_id, name: str) -> str:
        return f"/api/records/{record_id}/files/{quote(name)}/content"

    def fail(self, path: str, *faults: str, forever: bool = False) -> None:
        with self._lock:
            self.faults.setdefault(path, []).extend(faults)
            if forever:
                self.forever[path] = faults[-1]

    def requests_to(self, path: str) -> list[dict]:
        return [headers for p, headers in self.requests if p == path]

    def _next_fault(self, path: str) -> str | None:
        with self._lock:
            queue = self.faults.get(path)
            if queue:
                return queue.pop(0)
            return self.forever.get(path)


def _make_handler(fake: FakeZenodo):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            path = unquote(self.path.split("?", 1)[0])
            path = quote(path, safe="/")
            with fake._lock:
                fake.requests.append((path, dict(self.headers)))
            fault = fake._next_fault(path)
            if fault in ("500", "404"):
                self._send(int(fault), b'{"status": %s, "message": "fault"}' % fault.encode(), "application/json")
                return
            body = fake.blobs.get(path)
            if body is None:
                self._send(404, b'{"status": 404, "message": "not found"}', "application/json")
                return
            if fault == "not-json":
                self._send(200, b"<html>maintenance</html>", "text/html")
                return
            if path.endswith("/content"):
                self._send_file(body, fault)
            else:
                self._send(200, body, "application/json")

        def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _send_file(self, data: bytes, fault: str | None):
            if fault == "corrupt":
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            start = int(match.group(1)) if match and fault != "ignore-range" else 0
            if start >= len(data) and match:
                self._send(416, b"", "application/octet-stream", {"Content-Range": f"bytes */{len(data)}"})
                return
            body = data[start:]
            self.send_response(206 if start else 200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Accept-Ranges", "bytes")
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if fault in ("cut", "stall"):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if fault == "stall":  # hold the connection open until the fake is closed
                    fake._closing.wait(timeout=60)
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


# ---------------------------------------------------------------------------------------------
# archives


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_gz_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, target in (symlinks or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# DICOM

#: Identifiers written into the synthetic series' headers; none may reach any output.
IDENTIFIERS = {
    "0010|0010": "Zyxwvut^Qqpatient",  # PatientName
    "0010|0020": "PID-86753091",  # PatientID
    "0010|0030": "19230417",  # PatientBirthDate
    "0008|0050": "ACC-4242-7777",  # AccessionNumber
    "0008|0080": "Quuxbridge Infirmary",  # InstitutionName
    "0008|0020": "20190823",  # StudyDate
    "0008|0021": "20190823",  # SeriesDate
    "0008|0030": "134501",  # StudyTime
}

SPACING = (0.7, 0.8, 2.5)
ORIGIN = (-12.5, 20.0, 31.25)


def synthetic_volume(n_slices: int = 6, rows: int = 7, columns: int = 5, seed: int = 0) -> np.ndarray:
    """int16 voxels (z, y, x) with distinct, negative and positive values."""
    rng = np.random.default_rng(seed)
    return rng.integers(-1024, 2000, size=(n_slices, rows, columns), dtype=np.int16)


def write_dicom_series(
    folder: str | Path,
    series_uid: str,
    array: np.ndarray | None = None,
    spacing=SPACING,
    origin=ORIGIN,
    prefix: str = "slice",
    extra_tags: dict[str, str] | None = None,
) -> sitk.Image:
    """Write ``array`` (z, y, x int16) as one DICOM file per slice into ``folder``; return the volume.

    Each slice carries ImagePositionPatient, ImageOrientationPatient, PixelSpacing (from the
    slice spacing), SliceThickness, the series UID and :data:`IDENTIFIERS`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    array = synthetic_volume() if array is None else array
    volume = sitk.GetImageFromArray(array)
    volume.SetSpacing(spacing)
    volume.SetOrigin(origin)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(array.shape[0]):
        slice_ = volume[:, :, k]
        tags = {
            **IDENTIFIERS,
            "0008|0060": "CT",
            "0008|103e": "synthetic test series",
            "0020|000d": "1.2.826.0.1.3680043.9.7433.1.1",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.4f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": f"{spacing[2]:g}",
            **(extra_tags or {}),
        }
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        with _kept_locale():
            writer.Execute(slice_)  # GDCM's DICOM writer resets the C locale (and so Python's default encoding)
    return volume


@contextlib.contextmanager
def _kept_locale():
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)
