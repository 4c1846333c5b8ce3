"""An interactive 3-D viewer (niivue) for the static, offline book.

Two halves:

* **Vendoring** (:func:`vendor_niivue`): the browser build of ``@niivue/niivue`` (its UMD file
  ``dist/niivue.umd.js``, a classic script that defines the global ``niivue``) is taken from the
  npm registry with ``npm pack`` at book-build time, cached under ``build/vendor/`` and copied
  into the book's static files. Nothing is fetched from a CDN; the book works from ``file://``.
  This module is also a Sphinx extension (``sphinx: extra_extensions: [spinemets.report.viewer]``):
  at ``builder-inited`` it vendors the script and adds it to every page. If vendoring fails
  (no npm, no registry), the build goes on without it and each viewer shows a message instead;
  the static figure beside it carries the page.
* **Embedding** (:func:`niivue_html`): a CT and its label maps become one HTML block with a
  canvas, one checkbox per label layer and an inline script that loads the volumes from inline
  base64 (gzip-compressed NIfTI-1 written here), so no file is read by the page. The volumes
  are downsampled until the whole block fits a byte budget (:data:`DEFAULT_MAX_BYTES`). Only
  voxel values, spacing and orientation reach the page: no header field or metadata of the
  input file is copied.
"""

from __future__ import annotations

import base64
import gzip
import html
import json
import os
import shutil
import struct
import subprocess
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError

#: The pinned niivue release (npm ``@niivue/niivue``).
NIIVUE_VERSION = "0.69.0"
NIIVUE_PACKAGE = "@niivue/niivue"
#: The browser build inside the npm package: a self-contained UMD script (global ``niivue``).
NIIVUE_BUNDLE = "package/dist/niivue.umd.js"
#: Where the script lands, relative to the book's static folder (and to ``_static/`` in the HTML).
NIIVUE_STATIC_PATH = "niivue/niivue.umd.js"
#: Environment variable naming the vendoring cache folder (default ``<book root>/build/vendor``).
VENDOR_DIR_ENV = "SPINEMETS_VENDOR_DIR"
#: Environment variable: ``1`` vendors only from the cache and never runs ``npm pack`` (the
#: tests set it, so that no test reaches the npm registry; ``make test`` fills the cache first).
NO_DOWNLOAD_ENV = "SPINEMETS_NO_DOWNLOAD"

#: Default size budget of one viewer block (the whole HTML, base64 volumes included): 1.5 MB.
DEFAULT_MAX_BYTES = 1_500_000
#: Bone window (HU) used to quantise the CT to 8 bits.
BONE_WINDOW = (-450.0, 1050.0)
_MIN_SIDE = 8
#: Largest side (voxels) of a viewer volume: beyond it the page grows without a visible gain.
MAX_SIDE = 256


# ---------------------------------------------------------------------------------------------
# Vendoring
# ---------------------------------------------------------------------------------------------

def _npm_tarball(cache_dir: Path, version: str) -> Path:
    """The npm tarball of niivue ``version`` in ``cache_dir``, packed with ``npm pack`` if absent."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    tarball = cache_dir / f"niivue-niivue-{version}.tgz"
    if tarball.is_file() and tarball.stat().st_size > 0:
        return tarball
    if os.environ.get(NO_DOWNLOAD_ENV) == "1":
        raise SpinemetsError(f"vendoring niivue: {tarball} is not in the cache and {NO_DOWNLOAD_ENV}=1 forbids "
                             "fetching it (`make vendor` or scripts/vendor_niivue.sh fills the cache)")
    npm = shutil.which("npm")
    if npm is None:
        raise SpinemetsError("vendoring niivue: npm is not installed (it fetches "
                             f"{NIIVUE_PACKAGE}@{version} from the npm registry)")
    try:
        result = subprocess.run([npm, "pack", f"{NIIVUE_PACKAGE}@{version}", "--silent"], cwd=cache_dir,
                                capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SpinemetsError(f"vendoring niivue: `npm pack {NIIVUE_PACKAGE}@{version}` failed: {exc}") from exc
    if result.returncode != 0 or not tarball.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise SpinemetsError(f"vendoring niivue: `npm pack {NIIVUE_PACKAGE}@{version}` failed "
                             f"(exit {result.returncode}): " + " | ".join(tail))
    return tarball


def vendor_niivue(static_dir: str | Path, cache_dir: str | Path | None = None,
                  version: str = NIIVUE_VERSION) -> Path:
    """Copy niivue's browser script into ``<static_dir>/niivue/``; return the script's path.

    The package is packed once with ``npm pack`` into ``cache_dir`` (default: the environment
    variable :data:`VENDOR_DIR_ENV`, else ``build/vendor`` under the current folder); later
    calls reuse the tarball, so they need neither npm nor a network. Beside the script go
    ``VERSION`` (the package and version), ``package.json`` and ``LICENSE.txt`` (the package
    ships no licence file: its licence is the ``license`` field of its package.json, quoted
    there, with the package README's licence text if any). Raises :class:`SpinemetsError`
    naming what failed (npm missing, ``npm pack`` failing, the bundle missing from the package).
    """
    cache = Path(cache_dir or os.environ.get(VENDOR_DIR_ENV) or Path.cwd() / "build" / "vendor")
    tarball = _npm_tarball(cache, version)
    out = Path(static_dir) / "niivue"
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(tarball) as tar:
            bundle = tar.extractfile(NIIVUE_BUNDLE)
            meta = tar.extractfile("package/package.json")
            if bundle is None or meta is None:
                raise KeyError(NIIVUE_BUNDLE)
            script = bundle.read()
            package_json = meta.read()
    except (KeyError, tarfile.TarError, OSError) as exc:
        raise SpinemetsError(f"vendoring niivue: {tarball} has no {NIIVUE_BUNDLE} ({exc})") from exc
    info = json.loads(package_json)
    target = out / Path(NIIVUE_STATIC_PATH).name
    if not target.is_file() or target.read_bytes() != script:
        target.write_bytes(script)
    (out / "package.json").write_bytes(package_json)
    (out / "VERSION").write_text(f"{info.get('name', NIIVUE_PACKAGE)} {info.get('version', version)}\n"
                                 f"file: {NIIVUE_BUNDLE} (npm pack, registry.npmjs.org)\n")
    (out / "LICENSE.txt").write_text(
        f"{info.get('name', NIIVUE_PACKAGE)} {info.get('version', version)}\n"
        f"License (package.json \"license\" field): {info.get('license', 'unknown')}\n"
        f"Repository: {json.dumps(info.get('repository', ''))}\n"
        "The npm package ships no separate licence file; see the repository for the full text.\n")
    return target


def setup(app):  # pragma: no cover - exercised by the book build in tests/test_viewer.py
    """Sphinx extension: vendor niivue at build time and load it on every page."""
    from sphinx.util import logging as sphinx_logging

    log = sphinx_logging.getLogger(__name__)

    def _vendor(app):
        root = Path(app.confdir)
        cache = Path(os.environ.get(VENDOR_DIR_ENV) or root / "build" / "vendor")
        static = cache / "static"
        try:
            vendor_niivue(static, cache)
        except SpinemetsError as exc:
            # Not a warning: the book builds with -W, and the pages stay usable (static figures).
            log.info(f"spinemets.report.viewer: the 3-D viewer is left out: {exc}")
            return
        app.config.html_static_path.append(str(static))
        app.add_js_file(NIIVUE_STATIC_PATH)

    app.connect("builder-inited", _vendor)
    app.connect("html-page-context", _one_copy_of_each_script, priority=999)  # after the theme's own
    return {"version": NIIVUE_VERSION, "parallel_read_safe": True, "parallel_write_safe": True}


def _one_copy_of_each_script(app, pagename, templatename, context, doctree) -> None:
    """Drop a script the page would load twice (same file or inline body, same attributes).

    sphinx-thebe's inline configuration (``const THEBE_JS_URL = ...``) and sphinx-togglebutton's
    reach each page twice (once named ``None``, once ``''``), so every page declared the constant
    twice and the browser reported a SyntaxError. The first copy stays, in its place.
    """
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for script in scripts:
        attributes = getattr(script, "attributes", {}) or {}
        name = getattr(script, "filename", script) or ""  # an inline script's is None or ''
        key = (str(name), tuple(sorted((k, str(v)) for k, v in attributes.items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    if len(kept) != len(scripts):
        context["script_files"] = kept  # a new list: the one given is shared by every page


# ---------------------------------------------------------------------------------------------
# Volumes
# ---------------------------------------------------------------------------------------------

def nifti1_bytes(array: np.ndarray, spacing: Sequence[float], affine: np.ndarray) -> bytes:
    """An uncompressed single-file NIfTI-1 (``.nii``) of a 3-D uint8 ``array`` indexed [i, j, k].

    ``spacing`` is the voxel size (mm) along i, j, k; ``affine`` the 4x4 voxel-to-RAS matrix
    (written as the sform, code 1 "scanner"). The header holds nothing else: no description,
    no intent name, no auxiliary file.
    """
    data = np.ascontiguousarray(array, dtype=np.uint8)
    if data.ndim != 3:
        raise SpinemetsError(f"nifti1_bytes: a 3-D array is needed, got shape {data.shape}")
    hdr = bytearray(348)
    struct.pack_into("<i", hdr, 0, 348)
    struct.pack_into("<8h", hdr, 40, 3, *data.shape, 1, 1, 1, 1)
    struct.pack_into("<hh", hdr, 70, 2, 8)  # datatype uint8, bitpix 8
    struct.pack_into("<8f", hdr, 76, 1.0, *map(float, spacing), 1.0, 1.0, 1.0, 1.0)
    struct.pack_into("<f", hdr, 108, 352.0)  # vox_offset
    struct.pack_into("<ff", hdr, 112, 1.0, 0.0)  # scl_slope, scl_inter
    struct.pack_into("<B", hdr, 123, 2 | 8)  # xyzt_units: mm, s
    struct.pack_into("<hh", hdr, 252, 0, 1)  # qform_code 0, sform_code 1
    aff = np.asarray(affine, dtype=float)
    struct.pack_into("<12f", hdr, 280, *aff[:3, :4].ravel())
    hdr[344:348] = b"n+1\0"
    # Data in NIfTI order: i fastest, i.e. Fortran order of the [i, j, k] array.
    return bytes(hdr) + b"\0\0\0\0" + data.tobytes(order="F")


def _read(path, sitk):
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise SpinemetsError(f"{path}: cannot be read as an image ({str(exc).strip().splitlines()[-1]})") from exc


def _ras_affine(image) -> np.ndarray:
    """Voxel (i, j, k) -> RAS mm of a SimpleITK image (SimpleITK works in LPS)."""
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    lps = np.eye(4)
    lps[:3, :3] = direction * spacing
    lps[:3, 3] = image.GetOrigin()
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _resampled(image, labels, factor: float, sitk):
    """Image (linear) and labels (nearest) on a grid ``factor`` times coarser than the image's."""
    size = np.asarray(image.GetSize(), dtype=float)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    new_size = np.maximum(np.round(size / factor), 1).astype(int)
    new_spacing = spacing * size / new_size
    # Keep the physical extent: the first voxel centre moves by half the change of voxel size.
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    origin = np.asarray(image.GetOrigin()) + direction @ ((new_spacing - spacing) / 2)
    ref = sitk.Image([int(s) for s in new_size], sitk.sitkUInt8)
    ref.SetSpacing([float(s) for s in new_spacing])
    ref.SetOrigin([float(o) for o in origin])
    ref.SetDirection(image.GetDirection())
    out_image = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    out_labels = [sitk.Resample(lab, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
                  for lab in labels]
    return ref, out_image, out_labels


def _ijk(image, sitk) -> np.ndarray:
    """SimpleITK array [k, j, i] -> [i, j, k]."""
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))


def _colour_table(colours: Mapping[int, tuple[float, float, float]], names: Mapping[int, str] | None) -> dict:
    values = sorted(int(v) for v in colours if int(v) > 0)
    table = {"R": [0], "G": [0], "B": [0], "A": [0], "I": [0], "labels": [""]}
    for v in values:
        r, g, b = (int(round(255 * float(c))) for c in colours[v])
        table["R"].append(r)
        table["G"].append(g)
        table["B"].append(b)
        table["A"].append(255)
        table["I"].append(v)
        table["labels"].append(str((names or {}).get(v, v)))
    if len(values) + 1 != max(values, default=0) + 1:
        table.pop("labels")  # niivue keeps names only for a dense table
    return table


@dataclass
class Layer:
    """A label layer: a label map path, its display name and colours (value -> RGB in 0-1)."""

    name: str
    path: str | Path
    colours: Mapping[int, tuple[float, float, float]]
    names: Mapping[int, str] | None = None
    opacity: float = 0.6


def stage_layer(stage: str, path: str | Path, name: str | None = None, opacity: float = 0.6) -> Layer:
    """A :class:`Layer` coloured and named from :mod:`spinemets.labels` (``vertebrae``/``metastases``)."""
    fg = labels_mod.foreground_labels(stage)
    display = name or {"vertebrae": "vertebrae", "metastases": "lesions"}.get(stage, stage)
    return Layer(display, path, {v: labels_mod.colour(stage, k) for k, v in fg.items()}, {v: k for k, v in fg.items()},
                 opacity)


class ViewerHTML:
    """The HTML of one viewer, displayable in a notebook (``_repr_html_``), with its facts."""

    def __init__(self, markup: str, shape, spacing, n_bytes: int):
        self.markup = markup
        self.shape = tuple(int(s) for s in shape)
        self.spacing = tuple(float(s) for s in spacing)
        self.n_bytes = n_bytes

    def _repr_html_(self) -> str:
        return self.markup

    def __str__(self) -> str:
        return self.markup

    def __repr__(self) -> str:
        return f"<niivue viewer {'x'.join(map(str, self.shape))} voxels, {self.n_bytes} bytes>"


def niivue_html(image: str | Path, layers: Sequence[Layer], *, max_bytes: int = DEFAULT_MAX_BYTES,
                title: str = "", window: tuple[float, float] = BONE_WINDOW, height_px: int = 480) -> ViewerHTML:
    """An interactive niivue viewer of ``image`` (a CT, NIfTI or NRRD) with label ``layers``.

    The CT is resampled linearly and the label maps by nearest neighbour onto one grid (the
    same factor on every axis), the CT is windowed to ``window`` (HU, default the bone window)
    and quantised to 8 bits, and each volume is written as a gzip-compressed NIfTI-1 inlined as
    base64. The grid is made coarser until the whole HTML block is at most ``max_bytes``
    (default :data:`DEFAULT_MAX_BYTES`, 1.5 MB), and no side exceeds :data:`MAX_SIDE` voxels:
    the budget is guaranteed or
    :class:`SpinemetsError` is raised. The final shape and spacing are returned on the object
    (``.shape``, ``.spacing``, ``.n_bytes``) and printed under the viewer.

    The page shows a multiplanar view with the 3-D render, one checkbox per layer, and a
    message instead of the viewer when the niivue script is missing or WebGL2 is unavailable.
    With the URL fragment ``#selftest`` the script toggles the first layer and writes a JSON
    verdict (non-blank pixels, pixels changed) into an element ``.niivue-selftest``.
    """
    import SimpleITK as sitk

    ct = sitk.Cast(_read(image, sitk), sitk.sitkFloat32)
    if ct.GetDimension() != 3:
        raise SpinemetsError(f"{image}: a 3-D image is needed, got {ct.GetDimension()}-D")
    label_images = []
    for layer in layers:
        lab = _read(layer.path, sitk)
        if lab.GetDimension() != 3:
            raise SpinemetsError(f"{layer.path}: a 3-D label map is needed")
        label_images.append(lab)
    lo, hi = map(float, window)
    size = np.asarray(ct.GetSize(), dtype=float)
    # A first guess (gzip of a windowed 8-bit CT takes roughly a quarter of a byte per voxel,
    # base64 adds a third; label maps compress far better) and at most MAX_SIDE voxels a side,
    # then coarser steps, each sized by how far the block is over, until it fits.
    factor = max(1.0, float(size.max()) / MAX_SIDE, float(np.cbrt(size.prod() / max(max_bytes * 3.0, 1))))
    viewer_id = "niivue-" + uuid.uuid4().hex[:10]
    for _ in range(60):
        ref, small, small_labels = _resampled(ct, label_images, factor, sitk)
        affine = _ras_affine(ref)
        spacing = ref.GetSpacing()
        ct8 = np.clip((_ijk(small, sitk) - lo) / (hi - lo) * 255.0, 0, 255).round().astype(np.uint8)
        volumes = [{"name": "ct.nii", "b64": _b64(nifti1_bytes(ct8, spacing, affine))}]
        for layer, lab in zip(layers, small_labels):
            arr = _ijk(lab, sitk)
            volumes.append({"name": f"layer{len(volumes)}.nii", "b64": _b64(nifti1_bytes(arr, spacing, affine)),
                            "label": layer.name, "opacity": float(layer.opacity),
                            "cmap": _colour_table(layer.colours, layer.names)})
        markup = _markup(viewer_id, title, volumes, ref.GetSize(), spacing, height_px)
        n_bytes = len(markup.encode("utf-8"))
        if n_bytes <= max_bytes:
            return ViewerHTML(markup, ref.GetSize(), spacing, n_bytes)
        if min(ref.GetSize()) <= _MIN_SIDE:
            break
        factor *= max(1.05, float(np.cbrt(n_bytes / max_bytes)) * 1.02)
    raise SpinemetsError(f"{image}: the viewer does not fit in {max_bytes} bytes even at "
                         f"{'x'.join(map(str, ref.GetSize()))} voxels")


def _b64(raw: bytes) -> str:
    return base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")


_SCRIPT = r"""
(function () {
  var root = document.getElementById(%(id)s);
  if (!root || root.dataset.started) { return; }
  root.dataset.started = "1";
  var note = root.querySelector(".niivue-message");
  function say(text) { note.textContent = text; note.style.display = "block"; }
  function start() {
    if (typeof niivue === "undefined" || !niivue.Niivue || !niivue.NVImage) {
      say("The interactive viewer is not available (its script was not bundled with this page); see the static figure.");
      return;
    }
    var canvas = root.querySelector("canvas");
    if (!canvas.getContext("webgl2")) {
      say("The interactive viewer needs WebGL2, which this browser does not provide; see the static figure.");
      return;
    }
    run(canvas).catch(function (err) {
      say("The interactive viewer could not start: " + (err && err.message ? err.message : err));
    });
  }
  async function run(canvas) {
    var spec = JSON.parse(root.querySelector("script.niivue-data").textContent);
    var nv = new niivue.Niivue({backColor: [0, 0, 0, 1], show3Dcrosshair: true, multiplanarShowRender: 1,
                                isOrientCube: false, logLevel: "error", dragAndDropEnabled: false});
    await nv.attachToCanvas(canvas, false);
    nv.setSliceType(nv.sliceTypeMultiplanar);
    for (var i = 0; i < spec.volumes.length; i++) {
      var v = spec.volumes[i];
      var img = await niivue.NVImage.loadFromBase64({base64: v.b64, name: v.name,
        colormap: "gray", opacity: v.cmap ? v.opacity : 1.0,
        cal_min: 0, cal_max: 255, trustCalMinMax: true});
      if (v.cmap) { img.setColormapLabel(v.cmap); }
      nv.addVolume(img);
    }
    nv.updateGLVolume();
    root.querySelectorAll("input.niivue-layer").forEach(function (box) {
      box.addEventListener("change", function () {
        var idx = Number(box.dataset.volume);
        nv.setOpacity(idx, box.checked ? spec.volumes[idx].opacity : 0);
      });
    });
    if (location.hash === "#selftest") { selftest(nv, canvas); }
  }
  function pixels(nv) {
    nv.drawScene();
    var gl = nv.gl, w = gl.drawingBufferWidth, h = gl.drawingBufferHeight;
    var buf = new Uint8Array(w * h * 4);
    gl.readPixels(0, 0, w, h, gl.RGBA, gl.UNSIGNED_BYTE, buf);
    return buf;
  }
  function selftest(nv, canvas) {
    var out = {width: canvas.width, height: canvas.height};
    try {
      var before = pixels(nv), lit = 0;
      for (var i = 0; i < before.length; i += 4) {
        if (before[i] > 8 || before[i + 1] > 8 || before[i + 2] > 8) { lit++; }
      }
      out.lit = lit;
      out.nonblank = lit > 0;
      var box = root.querySelector("input.niivue-layer");
      if (box) {
        box.click();
        var after = pixels(nv), changed = 0;
        for (var j = 0; j < after.length; j++) { if (after[j] !== before[j]) { changed++; } }
        out.changed = changed;
        out.differs = changed > 0;
        box.click();
      }
    } catch (err) { out.error = String(err); }
    var el = document.createElement("pre");
    el.className = "niivue-selftest";
    el.textContent = JSON.stringify(out);
    root.appendChild(el);
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); } else { start(); }
})();
"""


def _markup(viewer_id: str, title: str, volumes: list[dict], shape, spacing, height_px: int) -> str:
    esc = html.escape
    boxes = "".join(
        f'<label style="margin-right:1em"><input type="checkbox" class="niivue-layer" checked '
        f'data-volume="{i}"> {esc(v["label"])}</label>'
        for i, v in enumerate(volumes) if "label" in v)
    # "</" cannot occur in the JSON (base64, numbers, escaped names), so the script block is safe.
    data = json.dumps({"volumes": volumes}, separators=(",", ":")).replace("</", "<\\/")
    facts = (f"{'×'.join(map(str, shape))} voxels of {' × '.join(f'{s:.2f}' for s in spacing)} mm "
             f"(the grid of this page, within its size budget); drag to rotate or move the crosshair, scroll to change slice.")
    heading = f'<div class="niivue-title" style="font-weight:bold">{esc(title)}</div>' if title else ""
    return (
        f'<div class="niivue-viewer" id="{viewer_id}">{heading}'
        f'<div class="niivue-controls">{boxes}</div>'
        f'<div style="width:100%;height:{int(height_px)}px;background:#000">'
        f'<canvas style="width:100%;height:100%"></canvas></div>'
        f'<div class="niivue-message" style="display:none;padding:0.5em;border:1px solid #ccc"></div>'
        f'<div class="niivue-facts" style="font-size:smaller">{esc(facts)}</div>'
        f'<script type="application/json" class="niivue-data">{data}</script>'
        f'<script>{_SCRIPT % {"id": json.dumps(viewer_id)}}</script>'
        f'</div>'
    )


# --------------------------------------------------------------------------------------------
# The viewer of a live notebook
# --------------------------------------------------------------------------------------------

#: The optional extra of the live viewer (``pip install -e '.[viewer]'``): the same niivue viewer
#: as the book's, as a Jupyter widget.
LIVE_VIEWER = "ipyniivue"


def _label_lut(stage: str) -> dict:
    """niivue's label colour table of a stage (as the book's viewer uses: :func:`stage_layer`)."""
    layer = stage_layer(stage, "")
    return _colour_table(layer.colours, layer.names)


def _clean_copy(image, folder: Path, name: str, label: bool) -> Path:
    """A NIfTI copy of ``image`` (a path or a SimpleITK image) with only its voxels and geometry: no
    header fields or metadata of the source reach the viewer."""
    import SimpleITK as sitk

    if not isinstance(image, sitk.Image):
        image = _read(image, sitk)
    array = sitk.GetArrayFromImage(image)
    clean = sitk.GetImageFromArray(array.astype(np.uint8) if label else array.astype(np.float32))
    clean.SetSpacing(image.GetSpacing())
    clean.SetOrigin(image.GetOrigin())
    clean.SetDirection(image.GetDirection())
    out = folder / f"{name}.nii.gz"
    sitk.WriteImage(clean, str(out))
    return out


def live_view(image, vertebrae=None, lesions=None, height: int = 480):
    """An interactive viewer for a live Jupyter session: the CT with the vertebra and lesion label maps
    as toggleable layers (an ipyniivue ``NiiVue`` widget: the optional extra ``viewer``).

    Each of ``image``, ``vertebrae`` and ``lesions`` is a path or a SimpleITK image. The widget gets
    copies with only the voxels and the geometry (no header of the source), in a temporary folder
    that lives as long as the widget. Raises :class:`SpinemetsError` naming a missing file, or when
    the extra is not installed.
    """
    import tempfile

    layers = [(name, item, stage) for name, item, stage in
              (("CT", image, None), ("vertebrae", vertebrae, "vertebrae"), ("lesions", lesions, "metastases"))
              if item is not None]
    for _, item, _ in layers:
        if isinstance(item, (str, Path)) and not Path(item).is_file():
            raise SpinemetsError(f"{item}: not found; nothing to show in the viewer")
    try:
        from ipyniivue import NiiVue
    except ImportError:
        raise SpinemetsError(f"the live viewer needs the optional extra: pip install -e '.[viewer]' "
                             f"({LIVE_VIEWER})") from None
    folder = tempfile.TemporaryDirectory(prefix="spinemets-viewer-")
    files = [_clean_copy(item, Path(folder.name), name, stage is not None) for name, item, stage in layers]
    widget = NiiVue(height=height)
    widget.load_volumes([{"path": str(path), "name": name, "colormap": "gray" if stage is None else "",
                          "opacity": 1.0 if stage is None else 0.5}
                         for path, (name, _, stage) in zip(files, layers)])
    for volume, (_, _, stage) in zip(widget.volumes, layers):
        if stage is not None:
            volume.set_colormap_label(_label_lut(stage))
    widget._spinemets_files = folder  # removed with the widget
    return widget
