"""spinemets.cohort.fetch against a local imitation of Zenodo's API (127.0.0.1, no internet)."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time

import pytest

from fakes import FakeZenodo, tar_gz_bytes, zip_bytes
from spinemets.cohort import fetch as fetch_mod
from spinemets.errors import SpinemetsError
from spinemets.cohort.fetch import fetch_record, record_id_of, unpack_archive
from spinemets.fileio import PARTIAL_PREFIX

RECORD = 4242
FILES = {
    "readme.txt": b"fake record for tests\n",
    "scan.bin": bytes(range(256)) * 1200,  # 307200 bytes
    "cases.zip": zip_bytes({"cases/case01.txt": b"one\n", "cases/case02.txt": b"two\n" * 50}),
}


@pytest.fixture
def zenodo():
    with FakeZenodo() as fake:
        fake.add_record(RECORD, FILES)
        yield fake


def _partials(folder):
    return [p for p in folder.rglob("*") if p.name.startswith(PARTIAL_PREFIX)]


def _fetch(zenodo, out, **kw):
    kw.setdefault("backoff", 0)
    return fetch_record(RECORD, out, api_url=zenodo.api_url, **kw)


def test_normal_download_writes_verified_files_manifest_and_unpacks(zenodo, tmp_path):
    out = tmp_path / "out"
    manifest_path = _fetch(zenodo, out)
    assert manifest_path == out / "download.json"
    for name, data in FILES.items():
        assert (out / name).read_bytes() == data
    assert (out / "cases" / "case01.txt").read_bytes() == b"one\n"
    assert (out / "cases" / "case02.txt").read_bytes() == b"two\n" * 50
    manifest = json.loads(manifest_path.read_text())
    assert manifest["record"] == str(RECORD)
    assert manifest["doi"] == f"10.5281/zenodo.{RECORD}"
    assert manifest["title"] == f"Fake record {RECORD}"
    assert manifest["files"] == [
        {"name": n, "size": len(d), "checksum": "md5:" + hashlib.md5(d).hexdigest()} for n, d in FILES.items()
    ]
    assert manifest["unpacked"] == [{"archive": "cases.zip", "entries": 2}]
    assert _partials(out) == []
    # every file was asked for once, without Range
    for name in FILES:
        (headers,) = zenodo.requests_to(zenodo.file_path(RECORD, name))
        assert "Range" not in headers


def test_rerun_skips_verified_files_and_writes_identical_manifest(zenodo, tmp_path):
    out = tmp_path / "out"
    first = _fetch(zenodo, out).read_bytes()
    n_requests = len(zenodo.requests)
    second = _fetch(zenodo, out).read_bytes()
    assert first == second
    new = zenodo.requests[n_requests:]
    assert [p for p, _ in new] == [f"/api/records/{RECORD}"]  # only the record's metadata


def test_present_file_with_wrong_content_is_downloaded_again(zenodo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "readme.txt").write_bytes(b"stale")
    _fetch(zenodo, out)
    assert (out / "readme.txt").read_bytes() == FILES["readme.txt"]


def test_interrupted_transfer_resumes_with_range(zenodo, tmp_path):
    out = tmp_path / "out"
    path = zenodo.file_path(RECORD, "scan.bin")
    zenodo.fail(path, "cut")
    _fetch(zenodo, out)
    first, second = zenodo.requests_to(path)
    assert "Range" not in first
    # the server sent half the file; the client kept what it had written (whole chunks) and asked for the rest
    start = int(re.fullmatch(r"bytes=(\d+)-", second["Range"]).group(1))
    assert 0 < start <= len(FILES["scan.bin"]) // 2
    assert (out / "scan.bin").read_bytes() == FILES["scan.bin"]
    assert _partials(out) == []


def test_partial_file_from_a_killed_run_is_resumed(zenodo, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    data = FILES["scan.bin"]
    (out / f"{PARTIAL_PREFIX}scan.bin").write_bytes(data[:1000])
    _fetch(zenodo, out)
    (headers,) = zenodo.requests_to(zenodo.file_path(RECORD, "scan.bin"))
    assert headers["Range"] == "bytes=1000-"
    assert (out / "scan.bin").read_bytes() == data


def test_server_ignoring_range_restarts_the_file(zenodo, tmp_path):
    out = tmp_path / "out"
    path = zenodo.file_path(RECORD, "scan.bin")
    zenodo.fail(path, "cut", "ignore-range")
    _fetch(zenodo, out)
    assert len(zenodo.requests_to(path)) == 2
    assert (out / "scan.bin").read_bytes() == FILES["scan.bin"]


def test_corrupt_first_attempt_is_retried_from_zero(zenodo, tmp_path):
    out = tmp_path / "out"
    path = zenodo.file_path(RECORD, "scan.bin")
    zenodo.fail(path, "corrupt")
    _fetch(zenodo, out)
    first, second = zenodo.requests_to(path)
    assert "Range" not in second  # a mismatch restarts from zero
    assert (out / "scan.bin").read_bytes() == FILES["scan.bin"]


def test_corrupt_forever_gives_clear_error_and_leaves_nothing(zenodo, tmp_path):
    out = tmp_path / "out"
    path = zenodo.file_path(RECORD, "scan.bin")
    zenodo.fail(path, "corrupt", forever=True)
    with pytest.raises(SpinemetsError, match="checksum mismatch after 3 tries") as err:
        _fetch(zenodo, out, retries=2)
    assert path in str(err.value) and "scan.bin" in str(err.value)
    assert len(zenodo.requests_to(path)) == 3
    assert not (out / "scan.bin").exists()
    assert not (out / "download.json").exists()
    assert _partials(out) == []


def test_wrong_listed_checksum_is_a_mismatch(tmp_path):
    with FakeZenodo() as fake:
        fake.add_record(7, {"a.txt": b"abc"}, checksums={"a.txt": "md5:" + "0" * 32})
        with pytest.raises(SpinemetsError, match="checksum mismatch after 2 tries"):
            fetch_record(7, tmp_path, api_url=fake.api_url, retries=1, backoff=0)


def test_record_not_found(zenodo, tmp_path):
    with pytest.raises(SpinemetsError, match=r"record 999 not found \(HTTP 404\)") as err:
        fetch_record(999, tmp_path / "out", api_url=zenodo.api_url, backoff=0)
    assert f"{zenodo.api_url}/records/999" in str(err.value)


def test_server_error_then_success(zenodo, tmp_path):
    out = tmp_path / "out"
    path = zenodo.file_path(RECORD, "readme.txt")
    zenodo.fail(f"/api/records/{RECORD}", "500")
    zenodo.fail(path, "500", "500")
    _fetch(zenodo, out)
    assert len(zenodo.requests_to(path)) == 3
    assert (out / "readme.txt").read_bytes() == FILES["readme.txt"]


def test_server_error_forever(zenodo, tmp_path):
    path = zenodo.file_path(RECORD, "readme.txt")
    zenodo.fail(path, "500", forever=True)
    with pytest.raises(SpinemetsError, match=r"server error \(HTTP 500\) after 5 tries"):
        _fetch(zenodo, tmp_path / "out")
    assert len(zenodo.requests_to(path)) == 5


def test_backoff_doubles(zenodo, tmp_path, monkeypatch):
    waits = []
    monkeypatch.setattr(fetch_mod.time, "sleep", waits.append)
    zenodo.fail(f"/api/records/{RECORD}", "500", forever=True)
    with pytest.raises(SpinemetsError):
        fetch_record(RECORD, tmp_path, api_url=zenodo.api_url, retries=3, backoff=0.5)
    assert waits == [0.5, 1.0, 2.0]


def test_not_a_record(zenodo, tmp_path):
    zenodo.fail(f"/api/records/{RECORD}", "not-json")
    with pytest.raises(SpinemetsError, match="not JSON"):
        _fetch(zenodo, tmp_path)


def test_unreachable_server(tmp_path):
    with FakeZenodo() as fake:
        url = fake.api_url
    with pytest.raises(SpinemetsError, match="connection failed after 2 tries"):
        fetch_record(1, tmp_path, api_url=url, retries=1, backoff=0)


def test_legacy_shape_and_sha256(tmp_path):
    files = {"a.txt": b"alpha", "b.txt": b"beta" * 10}
    with FakeZenodo() as fake:
        fake.add_record(11, files, shape="legacy")
        fake.add_record(12, files, algorithm="sha256")
        fetch_record(11, tmp_path / "legacy", api_url=fake.api_url, backoff=0)
        manifest = json.loads(fetch_record(12, tmp_path / "sha", api_url=fake.api_url, backoff=0).read_text())
    for name, data in files.items():
        assert (tmp_path / "legacy" / name).read_bytes() == data
        assert (tmp_path / "sha" / name).read_bytes() == data
    assert manifest["files"][0]["checksum"] == "sha256:" + hashlib.sha256(b"alpha").hexdigest()


def test_tar_gz_is_unpacked(tmp_path):
    with FakeZenodo() as fake:
        fake.add_record(5, {"data.tar.gz": tar_gz_bytes({"d/x.txt": b"x", "d/y.txt": b"yy"})})
        fetch_record(5, tmp_path, api_url=fake.api_url, backoff=0)
    assert (tmp_path / "d" / "y.txt").read_bytes() == b"yy"


@pytest.mark.parametrize(
    "name, data",
    [
        ("evil.zip", zip_bytes({"ok.txt": b"1", "../escaped.txt": b"2"})),
        ("abs.zip", zip_bytes({"/tmp/escaped.txt": b"2"})),
        ("evil.tar.gz", tar_gz_bytes({"../escaped.txt": b"2"})),
    ],
)
def test_archive_entries_escaping_the_folder_are_refused(tmp_path, name, data):
    archive = tmp_path / name
    archive.write_bytes(data)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SpinemetsError, match="would be written outside"):
        unpack_archive(archive, dest)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "escaped.txt").exists()


def test_archive_links_are_refused(tmp_path):
    archive = tmp_path / "links.tar.gz"
    archive.write_bytes(tar_gz_bytes({"a.txt": b"a"}, symlinks={"passwd": "/etc/passwd"}))
    with pytest.raises(SpinemetsError, match="link or special file"):
        unpack_archive(archive, tmp_path / "dest")


def test_zip_entries_made_from_links_are_refused(tmp_path):
    """A zip keeps a link's Unix mode in its entry's attributes; unpacking would write the link's target as
    a file (Python's zipfile) or a link (other tools): refused, nothing written."""
    import stat
    import zipfile

    archive = tmp_path / "links.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.txt", "a")
        info = zipfile.ZipInfo("passwd")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SpinemetsError, match="entry 'passwd' is a link or special file"):
        unpack_archive(archive, dest)
    assert list(dest.iterdir()) == []


def test_archive_bombs_are_refused_before_unpacking(tmp_path):
    import zipfile

    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(8 * 2**20))
    with pytest.raises(SpinemetsError, match="archive bomb"):
        fetch_mod.archive_entries(archive, max_bytes=2**30, max_ratio=50, max_entries=10)
    with pytest.raises(SpinemetsError, match="archive bomb"):
        fetch_mod.archive_entries(archive, max_bytes=2**20, max_ratio=10_000, max_entries=10)
    assert fetch_mod.archive_entries(archive, max_bytes=2**30, max_ratio=10_000, max_entries=10) == \
        [("zeros.bin", 8 * 2**20, False)]


def test_truncated_archive(tmp_path):
    archive = tmp_path / "cut.zip"
    archive.write_bytes(FILES["cases.zip"][:40])
    with pytest.raises(SpinemetsError, match="cannot unpack"):
        unpack_archive(archive, tmp_path)


def test_file_names_escaping_the_folder_are_refused(tmp_path):
    with FakeZenodo() as fake:
        fake.add_record(3, {"../outside.txt": b"x"})
        with pytest.raises(SpinemetsError, match="would be written outside"):
            fetch_record(3, tmp_path / "out", api_url=fake.api_url, backoff=0)
    assert not (tmp_path / "outside.txt").exists()


@pytest.mark.parametrize(
    ("files", "message"),
    [({"a.txt": b"first", "./a.txt": b"second, longer"}, r"lists one file twice \('a.txt' and './a.txt'\)"),
     ({"sub//b.bin": b"x", "sub/b.bin": b"y"}, "lists one file twice"),
     ({"sub": b"a file", "sub/b.bin": b"a file in a folder of that name"}, "'sub' of the record is also the folder"),
     ({"a\\b": b"x", "a/b": b"y"}, "lists one file twice")],
    ids=["dot-slash", "double-slash", "file-and-folder", "backslash"],
)
def test_two_names_for_one_path_are_refused_before_anything_is_written(tmp_path, files, message):
    """Names that differ as text but land on one path would overwrite each other (found by fuzzing:
    ``a.txt`` then ``./a.txt``); the record is refused before the first download."""
    with FakeZenodo() as fake:
        fake.add_record(5, files)
        with pytest.raises(SpinemetsError, match=message):
            fetch_record(5, tmp_path / "out", api_url=fake.api_url, retries=0, backoff=0)
        assert not [path for path, _ in fake.requests if "/files/" in path]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "value, expected",
    [
        (13645871, "13645871"),
        ("13645871", "13645871"),
        ("10.5281/zenodo.13645871", "13645871"),
        ("https://zenodo.org/records/13645871", "13645871"),
        ("https://doi.org/10.5281/zenodo.13645871", "13645871"),
    ],
)
def test_record_id_of(value, expected):
    assert record_id_of(value) == expected


def test_record_id_of_rejects_other_text():
    with pytest.raises(SpinemetsError, match="not a Zenodo record id"):
        record_id_of("zenodo please")


def test_killed_download_rerun_gives_identical_outputs(zenodo, tmp_path):
    """SIGKILL a fetch mid-file, run it again: same bytes as an uninterrupted run, no temporary files."""
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    _fetch(zenodo, clean)
    path = zenodo.file_path(RECORD, "scan.bin")
    zenodo.fail(path, "stall")
    code = (
        "import sys; from spinemets.cohort.fetch import fetch_record; "
        "fetch_record(sys.argv[1], sys.argv[2], api_url=sys.argv[3], backoff=0)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(RECORD), str(killed), zenodo.api_url],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    partial = killed / f"{PARTIAL_PREFIX}scan.bin"
    try:
        for _ in range(600):  # poll until some bytes of the stalled file are on disk
            if partial.exists() and partial.stat().st_size > 0:
                break
            assert proc.poll() is None, "the download ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("no partial file appeared")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (killed / "scan.bin").exists() and not (killed / "download.json").exists()
    kept = partial.stat().st_size
    _fetch(zenodo, killed)
    assert zenodo.requests_to(path)[-1]["Range"] == f"bytes={kept}-"
    assert _tree(killed) == _tree(clean)


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
