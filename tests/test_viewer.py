"""The interactive 3-D viewer (spinemets.report.viewer): size budget, NIfTI writing, no leaked metadata,
and a real Jupyter Book page checked in headless Chromium with software WebGL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import SimpleITK as sitk

import browser
from conftest import require_niivue_cache, skip_or_fail
from spinemets.report import viewer
from spinemets.errors import SpinemetsError
from spinemets.report.viewer import niivue_html, nifti1_bytes, stage_layer

REPO = Path(__file__).resolve().parents[1]


def _case(folder: Path, shape=(40, 48, 48), spacing=(1.5, 1.5, 2.0), secret: str | None = None):
    """A synthetic CT (a bright cylinder) with vertebra and lesion label maps; shape is (z, y, x)."""
    z, y, x = np.indices(shape)
    cy, cx = shape[1] / 2, shape[2] / 2
    rod = ((x - cx) ** 2 + (y - cy) ** 2) < (min(shape[1:]) / 3) ** 2
    ct = np.where(rod, 400 + 5 * z, -1000).astype(np.int16)
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing(spacing)
    img.SetOrigin((-10.0, 20.0, -30.0))
    if secret:
        img.SetMetaData("PatientName", secret)
        img.SetMetaData("0010|0010", secret)
    ct_path = folder / "ct.nrrd"
    sitk.WriteImage(img, str(ct_path))
    vert = (rod * (1 + (z * 5) // shape[0])).astype(np.uint8)
    les = np.zeros(shape, np.uint8)
    les[shape[0] // 3: shape[0] // 2, int(cy) - 4: int(cy) + 4, int(cx) - 4: int(cx) + 4] = 1
    les[shape[0] // 2: 2 * shape[0] // 3, int(cy) - 3: int(cy) + 3, int(cx) - 3: int(cx) + 3] = 2
    paths = []
    for name, arr in (("vertebrae", vert), ("lesions", les)):
        im = sitk.GetImageFromArray(arr)
        im.CopyInformation(img)
        if secret:
            im.SetMetaData("PatientName", secret)
        paths.append(folder / f"{name}.nii.gz")
        sitk.WriteImage(im, str(paths[-1]))
    return ct_path, [stage_layer("vertebrae", paths[0]), stage_layer("metastases", paths[1])]


def test_nifti_round_trip(tmp_path):
    arr = np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6)
    affine = np.array([[-1.5, 0, 0, 10], [0, -2.0, 0, -20], [0, 0, 3.0, 5], [0, 0, 0, 1]])
    path = tmp_path / "x.nii"
    path.write_bytes(nifti1_bytes(arr, (1.5, 2.0, 3.0), affine))
    img = sitk.ReadImage(str(path))
    assert img.GetSize() == (4, 5, 6)
    assert np.allclose(img.GetSpacing(), (1.5, 2.0, 3.0))
    assert np.array_equal(np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)), arr)
    # RAS affine (-1.5 in x) is LPS +1.5: origin (10, -20, 5) RAS -> (-10, 20, 5) LPS.
    assert np.allclose(img.GetOrigin(), (-10, 20, 5))
    nib = pytest.importorskip("nibabel")
    loaded = nib.load(str(path))
    assert np.allclose(loaded.affine, affine)
    assert np.array_equal(np.asarray(loaded.dataobj), arr)


def test_budget_is_enforced_and_reported(tmp_path):
    rng = np.random.default_rng(0)
    shape = (120, 160, 160)  # 3 M voxels of noise: does not compress
    ct = rng.integers(-1000, 1500, size=shape).astype(np.int16)
    img = sitk.GetImageFromArray(ct)
    img.SetSpacing((0.8, 0.8, 1.0))
    sitk.WriteImage(img, str(tmp_path / "ct.nii.gz"))
    lab = sitk.GetImageFromArray(rng.integers(0, 26, size=shape).astype(np.uint8))
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(tmp_path / "v.nii.gz"))
    budget = 300_000
    out = niivue_html(tmp_path / "ct.nii.gz", [stage_layer("vertebrae", tmp_path / "v.nii.gz")], max_bytes=budget)
    assert out.n_bytes == len(out._repr_html_().encode()) <= budget
    assert out.shape[0] < 160 and len(out.shape) == 3
    # Same physical extent, coarser voxels; reported under the viewer.
    assert np.allclose(np.array(out.shape) * out.spacing, np.array([160, 160, 120]) * (0.8, 0.8, 1.0), rtol=0.02)
    assert "×".join(map(str, out.shape)) in out.markup
    with pytest.raises(SpinemetsError, match="does not fit"):
        niivue_html(tmp_path / "ct.nii.gz", [], max_bytes=2_000)


def test_no_identifiers_reach_the_page(tmp_path):
    ct, layers = _case(tmp_path, secret="DOE^JOHN")
    out = niivue_html(ct, layers, title="case 1")
    text = out.markup
    assert "DOE" not in text and "JOHN" not in text and "PatientName" not in text
    # The inline volumes are our own NIfTI: decode them and look inside too.
    import base64
    import gzip
    import json
    import re
    data = json.loads(re.search(r'class="niivue-data">(.*?)</script>', text, re.S).group(1))
    assert [v.get("label") for v in data["volumes"]] == [None, "vertebrae", "lesions"]
    for vol in data["volumes"]:
        raw = gzip.decompress(base64.b64decode(vol["b64"]))
        assert b"DOE" not in raw and raw[344:348] == b"n+1\0"
        assert raw[148:228].strip(b"\0") == b""  # descrip empty
    assert out.shape == (48, 48, 40)  # small input: no downsampling needed


def test_vendor_error_is_clear(tmp_path, monkeypatch):
    monkeypatch.delenv(viewer.NO_DOWNLOAD_ENV, raising=False)
    monkeypatch.setattr(viewer.shutil, "which", lambda name: None)
    with pytest.raises(SpinemetsError, match="npm is not installed"):
        viewer.vendor_niivue(tmp_path / "static", tmp_path / "cache")


def test_vendor_without_download_reads_only_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(viewer.NO_DOWNLOAD_ENV, "1")
    monkeypatch.setattr(viewer.subprocess, "run", lambda *a, **k: pytest.fail("npm pack was run"))
    with pytest.raises(SpinemetsError, match=r"not in the cache and SPINEMETS_NO_DOWNLOAD=1 forbids"):
        viewer.vendor_niivue(tmp_path / "static", tmp_path / "cache")
    assert not (tmp_path / "static" / "niivue").exists()


def _chromium_or_skip() -> str:
    """The installed headless Chromium; no test installs one (``scripts/install_browser.sh`` does)."""
    exe = browser.find_chromium()
    if exe is None:
        skip_or_fail("no chromium installed (scripts/install_browser.sh)", "SPINEMETS_REQUIRE_BROWSER")
    return exe


def test_book_page_in_headless_chromium(tmp_path):
    exe = _chromium_or_skip()
    require_niivue_cache()
    book = tmp_path / "book"
    book.mkdir()
    ct, layers = _case(tmp_path)
    out = niivue_html(ct, layers, title="synthetic case")
    nb = nbformat.v4.new_notebook(metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    cell = nbformat.v4.new_code_cell("viewer")
    cell.outputs = [nbformat.v4.new_output("display_data", data={"text/html": out.markup, "text/plain": repr(out)})]
    nb.cells = [nbformat.v4.new_markdown_cell("# Viewer\n\nA synthetic case."), cell]
    (book / "sub").mkdir()
    nbformat.write(nb, book / "sub" / "viewer.ipynb")  # one level down: relative _static paths
    (book / "index.md").write_text("# Test book\n")
    (book / "_toc.yml").write_text("format: jb-book\nroot: index\nchapters:\n  - file: sub/viewer\n")
    (book / "_config.yml").write_text(
        "title: viewer test\nexecute:\n  execute_notebooks: 'off'\n"
        "sphinx:\n  extra_extensions:\n    - spinemets.report.viewer\n"
        "  config:\n    html_context:\n      default_mode: light\n")  # as the project's _config.yml
    env = dict(os.environ, SPINEMETS_VENDOR_DIR=str(REPO / "build" / "vendor"))
    jb = Path(sys.executable).with_name("jupyter-book")
    result = subprocess.run([str(jb), "build", str(book), "-n", "-W", "--keep-going"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    page = book / "_build" / "html" / "sub" / "viewer.html"
    assert (book / "_build" / "html" / "_static" / "niivue" / "niivue.umd.js").is_file()
    assert "_static/niivue/niivue.umd.js" in page.read_text()
    assert "https://" not in "".join(line for line in page.read_text().splitlines() if "<script" in line and "src=" in line)
    found = browser.check_viewer(page, executable=exe)
    # No console error at all: the theme's own two (sphinx-thebe's configuration script loaded
    # twice, no colour mode in a fresh profile) are fixed by the viewer extension and _config.yml.
    assert found["console_errors"] == [], found
    assert found["messages"] == [], found
    assert found["viewers"] == 1 and found["nonblank"] and found["differs"], found


def test_page_without_the_script_shows_a_message(tmp_path):
    exe = _chromium_or_skip()
    ct, layers = _case(tmp_path)
    page = tmp_path / "page.html"
    page.write_text("<!doctype html><html><head><title>t</title></head><body>"
                    + niivue_html(ct, layers).markup + "</body></html>")
    found = browser.check_viewer(page, executable=exe, timeout=30)
    assert found["console_errors"] == [], found
    assert found["messages"] and "not available" in found["messages"][0], found
