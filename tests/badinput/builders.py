"""Builders for the bad-input corpus.

A case in ``tests/badinput/*.yaml`` names a builder and its arguments::

    - id: fetch-record-404          # unique, used as the test id
      area: fetch                   # fetch | dicom | convert | import | evaluate ...
      builder: fetch                # a function registered below with @builder("fetch")
      args: {record: 999}           # keyword arguments for the builder
      error: "not found (HTTP 404)" # a substring the SpinemetsError message must contain

A builder takes a :class:`Context` (a fresh ``tmp_path`` and an ``ExitStack`` for anything that
must be shut down, like a local server) plus the case's ``args``, writes the bad input, and returns
a :class:`Prepared`: ``call`` runs the API function that must raise, ``argv`` is the same through
the ``spinemets`` command line (``None`` when it has no CLI form, e.g. when the CLI's retry
waits would make it slow), and ``absent`` lists paths that must not exist after the failure.
To add an area, write a builder here and a YAML file of cases beside this module.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from fakes import FakeZenodo, synthetic_volume, tar_gz_bytes, write_dicom_series, zip_bytes


@dataclass
class Context:
    tmp_path: Path
    stack: contextlib.ExitStack


@dataclass
class Prepared:
    call: Callable[[], object]
    argv: list[str] | None = None
    absent: list[Path] = field(default_factory=list)


BUILDERS: dict[str, Callable[..., Prepared]] = {}


def builder(name: str):
    """Register ``fn(ctx, **args) -> Prepared`` under ``name`` for the YAML cases."""

    def register(fn):
        if name in BUILDERS:
            raise ValueError(f"builder {name!r} registered twice")
        BUILDERS[name] = fn
        return fn

    return register


# ---------------------------------------------------------------------------------------------
# fetch


@builder("fetch")
def fetch(
    ctx: Context,
    record: int | str = 1,
    files: dict[str, str] | None = None,
    archive: dict | None = None,
    record_json: object = None,
    checksums: dict[str, str] | None = None,
    faults: list[dict] | None = None,
    retries: int = 1,
    offline: bool = False,
) -> Prepared:
    """A fake Zenodo serving record 1 with ``files`` (text) and an optional ``archive``
    ({name, members, symlinks}); ``record_json`` replaces the record's JSON answer;
    ``faults`` is a list of {file (name, or "record"), fault, forever}; ``offline`` stops the
    server before the call. ``record`` is the id asked for; the command line gets the same
    ``retries`` and no backoff wait."""
    from spinemets.cohort.fetch import fetch_record

    fake = FakeZenodo()
    blobs = {name: text.encode() for name, text in (files or {"a.txt": "alpha\n"}).items()}
    if archive:
        members = {k: v.encode() for k, v in archive.get("members", {}).items()}
        pack = zip_bytes if archive["name"].endswith(".zip") else tar_gz_bytes
        data = pack(members) if pack is zip_bytes else pack(members, archive.get("symlinks"))
        blobs[archive["name"]] = data[: archive["truncate"]] if "truncate" in archive else data
    fake.add_record(1, blobs, checksums=checksums)
    if record_json is not None:
        fake.blobs["/api/records/1"] = json.dumps(record_json).encode()
    for f in faults or []:
        path = "/api/records/1" if f["file"] == "record" else fake.file_path(1, f["file"])
        fake.fail(path, str(f["fault"]), forever=bool(f.get("forever")))
    if offline:
        with fake:
            pass
    else:
        ctx.stack.enter_context(fake)
    out = ctx.tmp_path / "download"
    call = lambda: fetch_record(record, out, api_url=fake.api_url, retries=retries, backoff=0)  # noqa: E731
    argv = ["fetch", "--record", str(record), "--out", str(out), "--api-url", fake.api_url,
            "--retries", str(retries), "--backoff", "0"]
    return Prepared(call, argv, absent=[out / "download.json"] + ([] if _keeps_files(files, faults, archive) else [out]))


def _keeps_files(files, faults, archive) -> bool:
    """Whether a failed fetch may keep verified files for the next try (a later file or the unpacking failed)."""
    return (bool(archive) or len(files or {"a.txt": ""}) > 1
            or any(f.get("file") not in (None, "record") for f in faults or []))


# ---------------------------------------------------------------------------------------------
# DICOM folders and conversion


UID_A = "1.2.826.0.1.3680043.9.7433.3.1"
UID_B = "1.2.826.0.1.3680043.9.7433.3.2"


@builder("dicom")
def dicom(
    ctx: Context,
    series: int = 1,
    layout: str = "series",
    truncate: str | None = None,
    delete: str | None = None,
    series_uid: str | None = None,
    out_inside: bool = False,
    messy: str | None = None,
) -> Prepared:
    """A DICOM folder converted to NIfTI (inside the folder itself when ``out_inside``). ``layout``: "series" (``series`` synthetic series A, B),
    "missing" (no folder), "empty", "text" (only a text file). ``truncate``/``delete`` name a
    slice file to cut to 200 bytes / remove; ``series_uid`` is passed on ("A"/"B" stand for the
    synthetic UIDs); ``messy`` writes a series of that kind of tests/messy_dicom.py instead."""
    from spinemets.formats.images import convert

    folder = ctx.tmp_path / "dicom"
    if messy is not None:
        from messy_dicom import write_messy_series

        write_messy_series(folder, messy)
    elif layout == "series":
        for k, uid in enumerate([UID_A, UID_B][:series]):
            write_dicom_series(folder, uid, synthetic_volume(n_slices=6 - k, seed=k), prefix="ab"[k])
    elif layout in ("empty", "text"):
        folder.mkdir()
        if layout == "text":
            (folder / "notes.txt").write_text("no images here\n")
    if truncate:
        path = folder / truncate
        path.write_bytes(path.read_bytes()[:200])
    if delete:
        (folder / delete).unlink()
    uid = {"A": UID_A, "B": UID_B}.get(series_uid, series_uid)
    out = (folder if out_inside else ctx.tmp_path / "out") / "case.nii.gz"
    argv = ["convert", str(folder), "--out", str(out)] + (["--series-uid", uid] if uid else [])
    return Prepared(lambda: convert(folder, out, series_uid=uid), argv, absent=[out])


@builder("convert")
def convert_image(ctx: Context, image: str = "plain", out: str = "case.nii.gz", series_uid: str | None = None) -> Prepared:
    """Convert a file ``image``: "plain" (a valid 3-D NRRD), "missing", "4d", "vector", "nan",
    "truncated" (a NIfTI cut short), "2d"; to ``out`` (relative to the case folder)."""
    from spinemets.formats.images import convert

    src = ctx.tmp_path / ("in.nii" if image in ("truncated", "4d") else "in.nrrd")
    if image != "missing":
        sitk.WriteImage(_image(image), str(src))
    if image == "truncated":
        src.write_bytes(src.read_bytes()[:300])
    dst = ctx.tmp_path / out
    argv = ["convert", str(src), "--out", str(dst)] + (["--series-uid", series_uid] if series_uid else [])
    return Prepared(lambda: convert(src, dst, series_uid=series_uid), argv, absent=[dst])


def _image(kind: str) -> sitk.Image:
    if kind == "4d":
        return sitk.Image([4, 4, 4, 2], sitk.sitkInt16)
    if kind == "vector":
        return sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3)
    if kind == "2d":
        return sitk.Image([4, 4], sitk.sitkInt16)
    array = synthetic_volume(seed=5).astype(np.float32)
    if kind == "nan":
        array[1, 2, 3] = np.nan
    return sitk.GetImageFromArray(array)


# ---------------------------------------------------------------------------------------------
# import (spinemets.cohort.dataset.import_dataset / spinemets import)


def break_case(case: Path, defect: str) -> tuple[Path, str]:
    """Damage one case of a small cohort (see conftest.small_cohort); return the bad file and the error."""
    from conftest import make_ct, vertebra_labelmap, write_case
    from spinemets.formats.slicer import write_segments

    ct = make_ct(seed=2)
    if defect == "truncated CT":
        data = (case / "ct.nrrd").read_bytes()
        (case / "ct.nrrd").write_bytes(data[: len(data) // 2])
        return case / "ct.nrrd", "cannot read CT"
    if defect == "corrupt mask":
        (case / "vertebrae.seg.nrrd").write_bytes(b"NRRD0004\nnonsense\n")
        return case / "vertebrae.seg.nrrd", "cannot read 3D Slicer segmentation"
    if defect in ("different spacing", "mask outside the CT", "different direction"):
        other = make_ct(seed=2)
        if defect == "different spacing":
            other.SetSpacing((1.0, 1.2, 2.5))
        elif defect == "mask outside the CT":
            other.SetOrigin((-10.0, 20.0, -300.0 + 2.5 * 10))
        else:
            other.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        write_case(case, other, vertebra_labelmap(other), [])
        sitk.WriteImage(ct, str(case / "ct.nrrd"), True)
        return case / "vertebrae.seg.nrrd", {"different spacing": "voxel spacing",
                                             "mask outside the CT": "outside the CT",
                                             "different direction": "axis directions differ"}[defect]
    if defect == "unknown segment names":
        write_segments(case / "vertebrae.seg.nrrd", ct, [{"name": "kidney", "mask": vertebra_labelmap(ct) > 0}])
        return case / "vertebrae.seg.nrrd", "unknown segment name(s) 'kidney'"
    if defect == "empty vertebra mask":
        write_case(case, ct, np.zeros(ct.GetSize()[::-1], dtype=np.uint8), [])
        return case / "vertebrae.seg.nrrd", "mask is empty"
    if defect == "NaN voxels":
        array = sitk.GetArrayFromImage(ct).astype(np.float32)
        array[1, 2, 3] = np.nan
        bad = sitk.GetImageFromArray(array)
        bad.CopyInformation(ct)
        sitk.WriteImage(bad, str(case / "ct.nrrd"), True)
        return case / "ct.nrrd", "1 NaN voxel"
    if defect == "4-D CT":
        sitk.WriteImage(sitk.JoinSeries([ct, make_ct(seed=3)]), str(case / "ct.nrrd"), True)
        return case / "ct.nrrd", "is 4-D"
    if defect == "missing file":
        (case / "ct.nrrd").unlink()
        return case / "ct.nrrd", "not found"
    if defect == "mapping to an unknown label":
        return case / "vertebrae.seg.nrrd", "is not a label of the vertebrae stage"
    raise ValueError(f"unknown defect {defect!r}")


@builder("import")
def import_cohort(ctx: Context, defect: str, stage: str = "vertebrae", duplicate: bool = False) -> Prepared:
    """A three-case cohort in the synthetic layout, one case damaged by ``defect``, imported into a fresh folder."""
    import pandas as pd

    from conftest import make_ct, vertebra_labelmap, write_case
    from spinemets.cohort.dataset import scan
    from spinemets.cohort.dataset import import_dataset

    root = ctx.tmp_path / "cohort"
    for index in range(1, 4):
        ct = make_ct(seed=index)
        write_case(root / f"case_{index:03d}", ct, vertebra_labelmap(ct), [])
    manifest = ctx.tmp_path / "manifest.csv"
    frame = scan(root)
    if duplicate:
        frame = pd.concat([frame, frame.iloc[:1]])
    frame.to_csv(manifest, index=False)
    mapping = None
    if defect == "mapping to an unknown label":
        mapping = ctx.tmp_path / "mapping.yaml"
        mapping.write_text("T12: kidney\n")
    elif defect != "none":
        break_case(root / "case_002", defect)
    raw = ctx.tmp_path / "raw"
    argv = ["import", "--manifest", str(manifest), "--stage", stage, "--out", str(raw)]
    if mapping:
        argv += ["--mapping", str(mapping)]
    return Prepared(lambda: import_dataset(manifest, stage, raw, mapping=mapping), argv, absent=[raw])


# ---------------------------------------------------------------------------------------------
# evaluate (spinemets.evaluation.evaluate.evaluate_folders / spinemets evaluate)


@builder("evaluate")
def evaluate_folders_case(ctx: Context, defect: str, stage: str = "metastases") -> Prepared:
    """Two folders of small label maps (case_a, case_b) with one ``defect``."""
    from spinemets.evaluation.evaluate import evaluate_folders

    ref_dir, pred_dir, out = ctx.tmp_path / "ref", ctx.tmp_path / "pred", ctx.tmp_path / "out"
    ref_dir.mkdir()
    pred_dir.mkdir()

    def label_map(shape=(8, 10, 12), spacing=(1.0, 1.0, 2.0), value=1, dtype=np.uint8):
        array = np.zeros(shape, dtype=dtype)
        array[2:5, 3:6, 4:8] = value
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(spacing)
        return image

    for case in ("case_a", "case_b"):
        sitk.WriteImage(label_map(), str(ref_dir / f"{case}.nii.gz"))
        sitk.WriteImage(label_map(), str(pred_dir / f"{case}.nii.gz"))
    if defect == "missing prediction":
        (pred_dir / "case_b.nii.gz").unlink()
    elif defect == "extra prediction":
        sitk.WriteImage(label_map(), str(pred_dir / "case_c.nii.gz"))
    elif defect == "different shape":
        sitk.WriteImage(label_map(shape=(8, 10, 13)), str(pred_dir / "case_b.nii.gz"))
    elif defect == "different spacing":
        sitk.WriteImage(label_map(spacing=(1.0, 1.0, 3.0)), str(pred_dir / "case_b.nii.gz"))
    elif defect == "label outside the stage":
        sitk.WriteImage(label_map(value=7), str(pred_dir / "case_b.nii.gz"))
    elif defect == "non-integer labels":
        image = label_map(dtype=np.float32)
        array = sitk.GetArrayFromImage(image)
        array[2, 3, 4] = 0.5
        bad = sitk.GetImageFromArray(array)
        bad.CopyInformation(image)
        sitk.WriteImage(bad, str(pred_dir / "case_b.nii.gz"))
    elif defect == "corrupt file":
        (pred_dir / "case_b.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    elif defect == "empty folder":
        for path in pred_dir.iterdir():
            path.unlink()
    elif defect != "none":
        raise ValueError(f"unknown defect {defect!r}")
    argv = ["evaluate", "--ref", str(ref_dir), "--pred", str(pred_dir), "--stage", stage, "--out", str(out)]
    return Prepared(lambda: evaluate_folders(ref_dir, pred_dir, stage, out), argv,
                    absent=[out / "per_case.csv", out / "summary.csv", out / "summary.json"])


# ---------------------------------------------------------------------------------------------
# shared: odd paths for inputs and outputs


def odd_path(ctx: Context, kind: str | None, default: Path) -> Path:
    """A path of the ``kind`` asked for, or ``default``: ``file`` (an existing regular file),
    ``folder`` (an existing folder), ``under-file`` (a path below a regular file), ``broken-link``
    (a symbolic link to a missing file), ``missing`` (nothing there)."""
    if kind is None:
        return default
    base = ctx.tmp_path / f"odd-{kind}"
    if kind == "file":
        base.write_text("not what was asked for\n")
        return base
    if kind == "folder":
        base.mkdir()
        (base / "keep.txt").write_text("x\n")
        return base
    if kind == "under-file":
        base.write_text("a file\n")
        return base / "sub" / default.name
    if kind == "broken-link":
        base.symlink_to(ctx.tmp_path / "nowhere")
        return base
    if kind == "missing":
        return base
    raise ValueError(f"unknown path kind {kind!r}")


def write_seg_nrrd(path: Path, voxels_ijk: np.ndarray, segments: list[dict], spacing=(1.0, 1.0, 1.0),
                   origin=(0.0, 0.0, 0.0), directions=None, extra: dict | None = None) -> Path:
    """A ``.seg.nrrd`` written field by field with pynrrd, so that its header can be made wrong on
    purpose: ``segments`` are dicts of header fields (``ID``, ``Name``, ``LabelValue``, ``Layer``),
    written as ``Segment{i}_{field}``; ``voxels_ijk`` is 3-D or 4-D (layers first)."""
    import nrrd

    directions = np.diag(spacing) if directions is None else np.asarray(directions, dtype=float)
    four = voxels_ijk.ndim == 4
    header = {"space": "left-posterior-superior", "space origin": np.asarray(origin, dtype=float),
              "kinds": ["list", "domain", "domain", "domain"] if four else ["domain", "domain", "domain"],
              "space directions": (np.vstack([np.full(3, np.nan), directions]) if four else directions)}
    for i, fields in enumerate(segments):
        for key, value in fields.items():
            header[f"Segment{i}_{key}"] = str(value)
    header.update(extra or {})
    if header.get("space", "") is None:  # no frame at all: the directions stand alone
        header.pop("space")
        header["space dimension"] = 3
    nrrd.write(str(path), voxels_ijk, header)
    return path


# ---------------------------------------------------------------------------------------------
# import: manifest rows, mapping files, label maps and 3D Slicer headers


def _cohort(ctx: Context, n: int = 3):
    from conftest import make_ct, vertebra_labelmap, write_case
    from spinemets.cohort.dataset import scan

    root = ctx.tmp_path / "cohort"
    for index in range(1, n + 1):
        ct = make_ct(seed=index)
        write_case(root / f"case_{index:03d}", ct, vertebra_labelmap(ct), [])
    frame = scan(root)
    return root, frame


@builder("import-manifest")
def import_manifest(ctx: Context, case_id: str | None = None, drop: str | None = None, split: str | None = None,
                    stage_value: str | None = None, image: str | None = None, manifest: str | None = None,
                    mapping: str | None = None, out: str | None = None, text: str | None = None) -> Prepared:
    """A valid three-case manifest with one thing changed: ``case_id`` of the second row, a column
    dropped (``drop``), the ``split`` or ``stage`` of the second row, its ``image`` (``empty`` or
    ``folder`` or ``broken-link``), the manifest path itself (``manifest``: a path kind of
    :func:`odd_path`), a ``mapping`` path kind, the ``out`` folder kind, or the raw CSV ``text``."""
    from spinemets.cohort.dataset import import_dataset

    root, frame = _cohort(ctx)
    frame = frame[frame["stage"] == "vertebrae"].reset_index(drop=True)
    if case_id is not None:
        frame.loc[1, "case_id"] = case_id
    if split is not None:
        frame.loc[1, "split"] = split
    if stage_value is not None:
        frame.loc[1, "stage"] = stage_value
    if image == "empty":
        frame.loc[1, "image"] = ""
    elif image in ("folder", "broken-link"):
        frame.loc[1, "image"] = str(odd_path(ctx, image, Path("ct.nrrd")))
    if drop:
        frame = frame.drop(columns=[drop])
    path = ctx.tmp_path / "manifest.csv"
    if text is not None:
        path.write_text(text)
    else:
        frame.to_csv(path, index=False)
    path = odd_path(ctx, manifest, path)
    map_path = odd_path(ctx, mapping, ctx.tmp_path / "mapping.yaml") if mapping else None
    raw = odd_path(ctx, out, ctx.tmp_path / "raw")
    argv = ["import", "--manifest", str(path), "--stage", "vertebrae", "--out", str(raw)]
    if map_path is not None:
        argv += ["--mapping", str(map_path)]
    absent = [ctx.tmp_path / "raw", ctx.tmp_path / "esc_0000.nii.gz", ctx.tmp_path.parent / "esc_0000.nii.gz"]
    return Prepared(lambda: import_dataset(path, "vertebrae", raw, mapping=map_path), argv, absent=absent)


@builder("import-labelmap")
def import_labelmap(ctx: Context, values: list[int] | None = None, dtype: str = "uint8", mapping: str | None = None,
                    ct: str = "plain", stage: str = "vertebrae", named: str | None = None) -> Prepared:
    """One case whose vertebra mask is a plain label map (``.nii.gz``) holding ``values``, imported with
    the ``mapping`` text (YAML) if given; ``ct``: ``plain``, ``inf`` (an infinite voxel), ``sheared``
    (a non-orthogonal direction matrix), ``broken-link``; imported into ``stage``, with the built-in
    mapping ``named`` in place of a file where given."""
    from conftest import make_ct
    from spinemets.cohort.dataset import import_dataset

    case = ctx.tmp_path / "cohort" / "case_001"
    case.mkdir(parents=True)
    image = make_ct(seed=1)
    mask = np.zeros(image.GetSize()[::-1], dtype=dtype)
    for k, v in enumerate(values or [20]):
        mask[2 + k, 3:6, 3:6] = v
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(image)
    if ct == "inf":
        array = sitk.GetArrayFromImage(image).astype(np.float32)
        array[1, 1, 1] = np.inf
        bad = sitk.GetImageFromArray(array)
        bad.CopyInformation(image)
        image = bad
    elif ct == "sheared":
        image.SetDirection((1, 0, 0, 0.3, 0.954, 0, 0, 0, 1))
        label.CopyInformation(image)
    ct_path = case / "ct.nrrd"
    if ct == "broken-link":
        ct_path.symlink_to(case / "gone.nrrd")
    else:
        sitk.WriteImage(image, str(ct_path))
    sitk.WriteImage(label, str(case / "vertebrae.nii.gz"))
    manifest = ctx.tmp_path / "manifest.csv"
    manifest.write_text(f"case_id,image,stage,segmentation,split\ncase_001,{ct_path},{stage},{case / 'vertebrae.nii.gz'},train\n")
    map_path = named
    if mapping is not None:
        map_path = ctx.tmp_path / "mapping.yaml"
        map_path.write_text(mapping)
    raw = ctx.tmp_path / "raw"
    argv = ["import", "--manifest", str(manifest), "--stage", stage, "--out", str(raw)]
    if map_path:
        argv += ["--mapping", str(map_path)]
    return Prepared(lambda: import_dataset(manifest, stage, raw, mapping=map_path), argv, absent=[raw])


#: Header defects that are one wrong field of a segment: defect -> (field, value).
_SEGMENT_FIELD_DEFECTS = {
    "label value 0": ("LabelValue", 0),
    "negative label value": ("LabelValue", -2),
    "label value beyond the voxel type": ("LabelValue", 300),
    "label value not an integer": ("LabelValue", "1.5"),
    "duplicate segment ID": ("ID", "Segment_1"),
    "layer beyond the array": ("Layer", 3),
    "negative layer": ("Layer", -1),
    "two segments one value": ("LabelValue", 1),
    "empty name": ("Name", " "),
}


def _slicer_header_case(path: Path, ct: sitk.Image, defect: str, names=("L1", "L2")) -> None:
    """Write ``path`` as a ``.seg.nrrd`` on the grid of ``ct`` whose header is wrong by ``defect``."""
    size = ct.GetSize()
    vox = np.zeros(size, dtype=np.uint8)  # i, j, k
    vox[3:8, 4:9, 2:5] = 1
    vox[3:8, 4:9, 8:11] = 2
    segs = [{"ID": f"Segment_{i + 1}", "Name": n, "LabelValue": i + 1, "Layer": 0} for i, n in enumerate(names)]
    spacing, origin = ct.GetSpacing(), ct.GetOrigin()
    directions, extra = None, {}
    if defect in _SEGMENT_FIELD_DEFECTS:  # one field of the second segment is wrong
        field_name, value = _SEGMENT_FIELD_DEFECTS[defect]
        segs[1][field_name] = value
    elif defect == "voxels of no segment":
        segs = segs[:1]
    elif defect == "plain label map":
        segs = []
    elif defect == "float voxels":
        vox = vox.astype(np.float32)
    elif defect == "sheared directions":
        directions = np.array([[spacing[0], 0, 0], [0.4, spacing[1], 0], [0, 0, spacing[2]]])
    elif defect == "zero direction":
        directions = np.array([[spacing[0], 0, 0], [0, 0, 0], [0, 0, spacing[2]]])
    elif defect == "non-finite origin":
        origin = (np.nan, origin[1], origin[2])
    elif defect == "no voxels":
        vox = np.zeros((0, size[1], size[2]), dtype=np.uint8)
    elif defect == "no space field":
        extra = {"space": None}
    elif defect == "4-D layer beyond":
        vox = np.stack([vox == 1, vox == 2]).astype(np.uint8)
        segs[1]["LabelValue"], segs[1]["Layer"] = 1, 2
    elif defect != "none":
        raise ValueError(f"unknown header defect {defect!r}")
    write_seg_nrrd(path, vox, segs, spacing, origin, directions, extra)


@builder("import-slicer-header")
def import_slicer_header(ctx: Context, defect: str) -> Prepared:
    """A three-case cohort whose case_002 vertebra ``.seg.nrrd`` has a header wrong by ``defect``."""
    from conftest import make_ct
    from spinemets.cohort.dataset import import_dataset

    root, frame = _cohort(ctx)
    _slicer_header_case(root / "case_002" / "vertebrae.seg.nrrd", make_ct(seed=2), defect)
    manifest = ctx.tmp_path / "manifest.csv"
    frame.to_csv(manifest, index=False)
    raw = ctx.tmp_path / "raw"
    argv = ["import", "--manifest", str(manifest), "--stage", "vertebrae", "--out", str(raw)]
    return Prepared(lambda: import_dataset(manifest, "vertebrae", raw), argv, absent=[raw])


# ---------------------------------------------------------------------------------------------
# evaluate: non-finite voxels, geometry, .seg.nrrd predictions, odd paths, partial output


@builder("evaluate-more")
def evaluate_more(ctx: Context, defect: str = "none", ref: str | None = None, pred: str | None = None,
                  out: str | None = None) -> Prepared:
    """Two cases of small metastasis label maps with one ``defect``; ``ref``/``pred``/``out`` replace
    those paths by a kind of :func:`odd_path`."""
    from spinemets.evaluation.evaluate import evaluate_folders
    from spinemets.formats.slicer import write_segments

    ref_dir, pred_dir, out_dir = ctx.tmp_path / "ref", ctx.tmp_path / "pred", ctx.tmp_path / "out"
    ref_dir.mkdir()
    pred_dir.mkdir()

    def label_map(dtype=np.uint8, value=1):
        array = np.zeros((8, 10, 12), dtype=dtype)
        array[2:5, 3:6, 4:8] = value
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.0, 1.0, 2.0))
        return image

    for case in ("case_a", "case_b"):
        sitk.WriteImage(label_map(), str(ref_dir / f"{case}.nii.gz"))
        sitk.WriteImage(label_map(), str(pred_dir / f"{case}.nii.gz"))
    if defect in ("inf prediction", "-inf prediction", "nan reference"):
        image = label_map(dtype=np.float32)
        array = sitk.GetArrayFromImage(image)
        array[0, 0, 0] = {"inf prediction": np.inf, "-inf prediction": -np.inf, "nan reference": np.nan}[defect]
        bad = sitk.GetImageFromArray(array)
        bad.CopyInformation(image)
        folder = ref_dir if defect == "nan reference" else pred_dir
        sitk.WriteImage(bad, str(folder / "case_b.nii.gz"))
    elif defect == "sheared prediction":  # NRRD keeps the matrix (the NIfTI writer would change it)
        image = label_map()
        image.SetDirection((1, 0, 0, 0.3, 0.954, 0, 0, 0, 1))
        (pred_dir / "case_b.nii.gz").unlink()
        sitk.WriteImage(image, str(pred_dir / "case_b.nrrd"))
    elif defect == "summary.json is a folder":
        (out_dir / "summary.json").mkdir(parents=True)
    elif defect == "seg.nrrd disagrees with its label map":
        array = sitk.GetArrayFromImage(label_map())
        write_segments(pred_dir / "case_b.seg.nrrd", label_map(), [{"name": "sclerotic", "mask": array > 0}])
    elif defect == "two label maps of one case":
        sitk.WriteImage(label_map(), str(pred_dir / "case_b.nrrd"))
    elif defect == "invalid case name":
        sitk.WriteImage(label_map(), str(pred_dir / "-case.nii.gz"))
        sitk.WriteImage(label_map(), str(ref_dir / "-case.nii.gz"))
    elif defect == "broken link prediction":
        (pred_dir / "case_b.nii.gz").unlink()
        (pred_dir / "case_b.nii.gz").symlink_to(pred_dir / "gone.nii.gz")
    elif defect == "seg.nrrd with unknown segment":
        (pred_dir / "case_b.nii.gz").unlink()
        array = sitk.GetArrayFromImage(label_map())
        write_segments(pred_dir / "case_b.seg.nrrd", label_map(), [{"name": "kidney", "mask": array > 0}])
    elif defect == "seg.nrrd prediction with a bad header":
        (pred_dir / "case_b.nii.gz").unlink()
        _slicer_header_case(pred_dir / "case_b.seg.nrrd", label_map(), "label value 0", names=("lytic", "sclerotic"))
    elif defect == "seg.nrrd off the grid":
        (pred_dir / "case_b.nii.gz").unlink()
        off = label_map()
        off.SetOrigin((0.5, 0.0, 0.0))
        write_segments(pred_dir / "case_b.seg.nrrd", off,
                       [{"name": "lytic", "mask": sitk.GetArrayFromImage(off) > 0}])
    elif defect != "none":
        raise ValueError(f"unknown defect {defect!r}")
    ref_path = odd_path(ctx, ref, ref_dir)
    pred_path = odd_path(ctx, pred, pred_dir)
    out_path = odd_path(ctx, out, out_dir)
    argv = ["evaluate", "--ref", str(ref_path), "--pred", str(pred_path), "--stage", "metastases", "--out", str(out_path)]
    absent = [out_path / "per_case.csv", out_path / "summary.csv"]
    if defect != "summary.json is a folder":
        absent.append(out_dir)
    return Prepared(lambda: evaluate_folders(ref_path, pred_path, "metastases", out_path), argv, absent=absent)


# ---------------------------------------------------------------------------------------------
# convert: non-finite voxels, geometry, odd paths


@builder("convert-more")
def convert_more(ctx: Context, image: str = "plain", src: str | None = None, out: str | None = None,
                 suffix: str = ".nrrd") -> Prepared:
    """Convert an image with one defect: ``image`` ``inf``, ``-inf``, ``sheared``, ``scaled``
    (direction columns not of unit length), ``zero-spacing`` (an NRRD with a zero axis),
    ``truncated`` (the file cut to two thirds); ``src`` and
    ``out`` replace the input and output paths by a kind of :func:`odd_path`."""
    from spinemets.formats.images import convert

    src_path = ctx.tmp_path / f"in{suffix}"
    array = synthetic_volume(seed=5).astype(np.float32)
    if image in ("inf", "-inf"):
        array[1, 2, 3] = np.inf if image == "inf" else -np.inf
    img = sitk.GetImageFromArray(array)
    if image == "sheared":
        img.SetDirection((1, 0, 0, 0.5, 0.866, 0, 0, 0, 1))
    elif image == "scaled":
        img.SetDirection((2, 0, 0, 0, 1, 0, 0, 0, 1))
    if image == "zero-spacing":
        import nrrd

        nrrd.write(str(src_path), array.transpose(2, 1, 0), {"space": "left-posterior-superior",
                   "space directions": np.diag([1.0, 0.0, 1.0]), "space origin": np.zeros(3)})
    elif image in ("sheared", "scaled") and suffix == ".nrrd":
        import nrrd

        direction = np.asarray(img.GetDirection()).reshape(3, 3)
        nrrd.write(str(src_path), array.transpose(2, 1, 0), {"space": "left-posterior-superior",
                   "space directions": direction.T, "space origin": np.zeros(3)})
    else:
        sitk.WriteImage(img, str(src_path))
    if image == "sform-mismatch":  # qform says 1 mm slices, sform 4 mm: readers disagree on the geometry
        import nibabel

        nifti = nibabel.load(str(src_path))
        affine = nifti.affine.copy()
        affine[2, 2] *= 4
        nifti.set_sform(affine, code=1)
        nifti.set_qform(nifti.get_qform(), code=1)
        nibabel.save(nifti, str(src_path))
    elif image in ("origin-huge", "raw-longer", "gzip-lie"):
        import nrrd

        header = {"space": "left-posterior-superior", "space directions": np.eye(3),
                  "space origin": np.array([1e300 if image == "origin-huge" else 0.0, 0.0, 0.0]), "encoding": "raw"}
        nrrd.write(str(src_path), array.transpose(2, 1, 0), header)
        text = src_path.read_bytes()
        if image == "raw-longer":  # the header now promises half the bytes the file holds
            src_path.write_bytes(text.replace(b"type: float", b"type: short", 1))
        elif image == "gzip-lie":  # says gzip, holds raw bytes
            src_path.write_bytes(text.replace(b"encoding: raw", b"encoding: gzip", 1))
    if image == "truncated":  # ITK fills the missing part of a .nii.gz with 0 unless told otherwise
        src_path.write_bytes(src_path.read_bytes()[: src_path.stat().st_size * 2 // 3])
    src_path = odd_path(ctx, src, src_path)
    dst = odd_path(ctx, out, ctx.tmp_path / "out" / "case.nii.gz")
    argv = ["convert", str(src_path), "--out", str(dst)]
    return Prepared(lambda: convert(src_path, dst), argv, absent=[ctx.tmp_path / "out"])


# ---------------------------------------------------------------------------------------------
# scan, synth, fetch: odd roots and outputs


@builder("scan")
def scan_case(ctx: Context, root: str | None = None, out: str | None = None, case_name: str | None = None,
              holdout: int = 0, link: bool = False) -> Prepared:
    """Scan a two-case cohort; ``root``/``out`` replace the paths by a kind of :func:`odd_path`,
    ``case_name`` renames the second case folder, ``link`` makes its CT a broken link."""
    from spinemets.cohort.dataset import scan

    cohort, _ = _cohort(ctx, 2)
    if case_name is not None:
        (cohort / "case_002").rename(cohort / case_name)
    if link:
        ct = cohort / "case_002" / "ct.nrrd"
        ct.unlink()
        ct.symlink_to(cohort / "gone.nrrd")
    root_path = odd_path(ctx, root, cohort)
    out_path = odd_path(ctx, out, ctx.tmp_path / "manifests" / "manifest.csv")
    argv = ["scan", str(root_path), "--out", str(out_path), "--holdout", str(holdout)]
    return Prepared(lambda: scan(root_path, out_path, holdout=holdout), argv,
                    absent=[ctx.tmp_path / "manifests"])


@builder("synth")
def synth_case(ctx: Context, out: str | None = None, preset: str = "demo", cases: int = 1) -> Prepared:
    """Write a one-case synthetic cohort to an odd ``out`` path."""
    from spinemets.cohort.synth import synthesize_cohort

    out_path = odd_path(ctx, out, ctx.tmp_path / "cohort")
    argv = ["synth", "--out", str(out_path), "--cases", str(cases), "--preset", preset]
    return Prepared(lambda: synthesize_cohort(out_path, cases, 0, preset), argv, absent=[ctx.tmp_path / "cohort"])


@builder("fetch-out")
def fetch_out(ctx: Context, out: str, files: dict[str, str] | None = None, folder_named: str | None = None) -> Prepared:
    """A fake Zenodo record fetched into an odd ``out`` path (a kind of :func:`odd_path`, or
    ``new`` for a fresh folder); ``folder_named`` puts a folder where a file of the record goes."""
    from spinemets.cohort.fetch import fetch_record

    fake = FakeZenodo()
    fake.add_record(1, {name: text.encode() for name, text in (files or {"a.txt": "alpha\n"}).items()})
    ctx.stack.enter_context(fake)
    out_path = ctx.tmp_path / "download" if out == "new" else odd_path(ctx, out, ctx.tmp_path / "download")
    if folder_named:
        (out_path / folder_named).mkdir(parents=True)
    argv = ["fetch", "--record", "1", "--out", str(out_path), "--api-url", fake.api_url, "--retries", "0",
            "--backoff", "0"]
    absent = [out_path / "download.json"] + ([] if folder_named else [ctx.tmp_path / "download"])
    return Prepared(lambda: fetch_record(1, out_path, api_url=fake.api_url, retries=0, backoff=0), argv, absent=absent)


# ---------------------------------------------------------------------------------------------
# predict: inputs checked before any model is loaded; damaged model folders


@builder("predict")
def predict_case(ctx: Context, defect: str = "none", input: str | None = None, out: str | None = None,
                 model: str | None = None) -> Prepared:
    """``spinemets predict --profile ci`` on a folder of two small CTs with one ``defect`` of the
    inputs, an odd ``input``/``out`` path, or a ``model`` folder damaged by one defect (the model
    folder is built with the files inference reads, so the check of that defect is reached)."""
    from conftest import make_ct
    from spinemets.inference.predict import predict

    cts = ctx.tmp_path / "cts"
    cts.mkdir()
    for k in (1, 2):
        sitk.WriteImage(make_ct(seed=k), str(cts / f"case_{k:03d}.nii.gz"))
    if defect == "nan CT":
        array = sitk.GetArrayFromImage(make_ct(seed=2)).astype(np.float32)
        array[1, 1, 1] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(array), str(cts / "case_002.nii.gz"))
    elif defect == "truncated CT":
        data = (cts / "case_002.nii.gz").read_bytes()
        (cts / "case_002.nii.gz").write_bytes(data[: len(data) // 2])
    elif defect == "two CTs of one case":
        sitk.WriteImage(make_ct(seed=3), str(cts / "case_002.nrrd"))
    elif defect == "invalid case name":
        sitk.WriteImage(make_ct(seed=3), str(cts / "bad name.nii.gz"))
    elif defect == "broken link CT":
        (cts / "case_002.nii.gz").unlink()
        (cts / "case_002.nii.gz").symlink_to(cts / "gone.nii.gz")
    elif defect == "sheared CT":  # NRRD keeps the matrix (the NIfTI writer would change it)
        image = make_ct(seed=2)
        image.SetDirection((1, 0, 0, 0.3, 0.954, 0, 0, 0, 1))
        (cts / "case_002.nii.gz").unlink()
        sitk.WriteImage(image, str(cts / "case_002.nrrd"))
    elif defect != "none":
        raise ValueError(f"unknown defect {defect!r}")
    workspace = ctx.tmp_path / "workspace"
    if model is not None:
        _damaged_model(workspace, model)
    in_path = odd_path(ctx, input, cts)
    if input == "inside":
        in_path = cts
    out_path = cts / "predictions" if out == "inside-input" else odd_path(ctx, out, ctx.tmp_path / "predictions")
    argv = ["predict", "--input", str(in_path), "--out", str(out_path), "--profile", "ci", "--workspace", str(workspace)]
    return Prepared(lambda: predict(in_path, out_path, profile="ci", workspace=workspace), argv,
                    absent=[ctx.tmp_path / "predictions", cts / "predictions"])


@builder("predict_dicom")
def predict_dicom(ctx: Context, kind: str) -> Prepared:
    """``spinemets predict --profile ci`` on a folder of one case whose DICOM series is of ``kind``
    (tests/messy_dicom.py); the refusal comes before any model is loaded (there is none)."""
    from messy_dicom import write_messy_series
    from spinemets.inference.predict import predict

    cts = ctx.tmp_path / "cts"
    write_messy_series(cts / "case1", kind)
    workspace, out = ctx.tmp_path / "workspace", ctx.tmp_path / "predictions"
    argv = ["predict", "--input", str(cts), "--out", str(out), "--profile", "ci", "--workspace", str(workspace)]
    return Prepared(lambda: predict(cts, out, profile="ci", workspace=workspace), argv, absent=[out])


def _damaged_model(workspace: Path, defect: str) -> None:
    """The vertebra model folder of the ci profile, with the files inference reads, damaged by ``defect``."""
    folder = (workspace / "results" / "Dataset501_Vertebrae"
              / "SpinemetsCITrainer__nnUNetPlans__demo_vertebrae")
    (folder / "fold_all").mkdir(parents=True)
    files = {"dataset.json": json.dumps({"labels": {"background": 0}, "channel_names": {"0": "CT"}}),
             "plans.json": json.dumps({"plans_name": "nnUNetPlans", "configurations": {}})}
    if defect == "missing dataset.json":
        files.pop("dataset.json")
    elif defect == "missing plans.json":
        files.pop("plans.json")
    elif defect == "plans.json not JSON":
        files["plans.json"] = "{ not json"
    elif defect == "plans.json not nnU-Net's":
        files["plans.json"] = json.dumps({"hello": 1})
    for name, text in files.items():
        (folder / name).write_text(text)
    checkpoint = folder / "fold_all" / "checkpoint_final.pth"
    if defect == "garbage checkpoint":
        checkpoint.write_bytes(b"\x00garbage bytes, not a checkpoint" * 10)
    elif defect == "checkpoint without weights":
        import torch

        torch.save({"hello": 1}, checkpoint)
    else:
        checkpoint.write_bytes(b"\x00" * 64)


# ---------------------------------------------------------------------------------------------
# run --dry-run: profile files


@builder("profile")
def profile_case(ctx: Context, text: str | None = None, kind: str | None = None) -> Prepared:
    """``spinemets run --profile FILE --dry-run`` with a profile file holding ``text``, or a path of
    ``kind`` (:func:`odd_path`) in its place."""
    from conftest import REPO
    from spinemets.run.runner import dry_run

    path = ctx.tmp_path / "mine.yaml"
    if text is not None:
        path.write_text(text.replace("{repo}", str(REPO)))
    if kind is not None:
        path = odd_path(ctx, kind, path)
        if kind == "folder":
            path = path.rename(ctx.tmp_path / "folder.yaml")
    argv = ["run", "--profile", str(path), "--dry-run"]
    return Prepared(lambda: dry_run(path, root=REPO), argv)
