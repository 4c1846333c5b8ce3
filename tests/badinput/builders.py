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
    from spinemets.fetch import fetch_record

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
    return Prepared(call, argv, absent=[out / "download.json"])


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
) -> Prepared:
    """A DICOM folder converted to NIfTI (inside the folder itself when ``out_inside``). ``layout``: "series" (``series`` synthetic series A, B),
    "missing" (no folder), "empty", "text" (only a text file). ``truncate``/``delete`` name a
    slice file to cut to 200 bytes / remove; ``series_uid`` is passed on ("A"/"B" stand for the
    synthetic UIDs)."""
    from spinemets.dicom import convert

    folder = ctx.tmp_path / "dicom"
    if layout == "series":
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
    from spinemets.dicom import convert

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
# import (spinemets.dataset.import_dataset / spinemets import)


def break_case(case: Path, defect: str) -> tuple[Path, str]:
    """Damage one case of a small cohort (see conftest.small_cohort); return the bad file and the error."""
    from conftest import make_ct, vertebra_labelmap, write_case
    from spinemets.slicer import write_segments

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
    from spinemets.dataset import scan
    from spinemets.dataset import import_dataset

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
    return Prepared(lambda: import_dataset(manifest, stage, raw, mapping=mapping), argv,
                    absent=[raw / "Dataset501_Vertebrae", raw / "Dataset502_Metastases"])


# ---------------------------------------------------------------------------------------------
# evaluate (spinemets.metrics.evaluate_folders / spinemets evaluate)


@builder("evaluate")
def evaluate_folders_case(ctx: Context, defect: str, stage: str = "metastases") -> Prepared:
    """Two folders of small label maps (case_a, case_b) with one ``defect``."""
    from spinemets.metrics import evaluate_folders

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
