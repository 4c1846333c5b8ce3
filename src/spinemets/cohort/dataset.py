"""From a folder of CTs and 3D Slicer masks to nnU-Net v2 raw datasets: the dataset step.

It serves the commands ``spinemets scan`` and ``spinemets import`` and the data notebook (its
curation tables: :func:`cohort_table`, :func:`qc_table`, :func:`label_volumes`). Two steps, each
a plain function behind one command:

* :func:`scan` finds the cases of a folder and writes a **manifest**: one row per case and stage
  with the columns ``case_id, image, stage, segmentation, split`` (and ``mapping``, the built-in
  mapping of a row's label values such as ``verse``, when a row has one). Without file patterns
  the layout is discovered (:mod:`spinemets.cohort.discovery`: per-case folders, flat files,
  ``images``/``labels`` trees, TotalSegmentator, VerSe, DICOM series beside ``.seg.nrrd``,
  TCIA's DICOM series with a DICOM-SEG series beside them);
  a layout with open questions is refused, and ``spinemets scan --explain`` shows the plan and
  writes a mapping template to answer them. File patterns name the case with ``{case}``
  (``{case}/ct.nrrd``, ``{case}/vertebrae.seg.nrrd`` ...); a pattern given for the image or one
  stage alone takes the synthetic cohort's layout for the others.
* :func:`import_dataset` (the command ``spinemets import``, shown in the Slicer notebook with
  :mod:`spinemets.formats.slicer`) turns the manifest rows of one stage into
  ``DatasetNNN_Name/imagesTr/{case}_0000.nii.gz``, ``labelsTr/{case}.nii.gz`` and
  ``dataset.json`` (rows with ``split == "test"`` go to ``imagesTs``/``labelsTs``).

The import is all-or-nothing: cases are converted into a staging folder beside the dataset and
the finished folder replaces the old one by renaming, so a failure or a killed run leaves the
previous dataset as it was (a rerun clears what a killed run left). A rerun reuses the files of
cases whose inputs are unchanged (same SHA-256 of the image, mask, stage and mapping). Sources
are only read. Empty masks: an error for the vertebra stage (every CT of that dataset must show
vertebrae); allowed for the metastasis stage (a lesion-free case), and listed as such.

Masks are ``.seg.nrrd`` files, DICOM-SEG files (:mod:`spinemets.formats.dicomseg`), label maps, or mask
folders of per-structure binary masks (TotalSegmentator's ``segmentations/``), combined on the CT
grid (:func:`labelmap_from_mask_folder`).
A row's built-in mapping (``mapping`` column; a VerSe file ``*_seg-vert_msk.nii.gz`` gets
``verse`` even without one) applies under the user's ``--mapping``, whose entries win; a
different built-in ``--mapping`` for such a row is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk
from tqdm.auto import tqdm

from spinemets import __version__
from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError, unknown_choice
from spinemets.errors import one_line
from spinemets.fileio import (PARTIAL_PREFIX, case_id_problem, check_case_id, check_output_dir, check_output_file,
                              inside, output_folder, remove_partials, read_json, require_dir, require_file, write_csv,
                              write_json)
from spinemets.formats.images import check_same_geometry, image_from_array, read_image, write_image
from spinemets.domain import cohort_of
from spinemets.formats.slicer import labelmap_from_segmentation

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = ["case_id", "image", "stage", "segmentation", "split"]
#: The optional column: the built-in mapping (:data:`spinemets.labels.NAMED_MAPPINGS`) of a row, or empty.
MAPPING_COLUMN = "mapping"
DEFAULT_IMAGE_PATTERN = "{case}/ct.nrrd"
DEFAULT_SEGMENTATION_PATTERNS = {
    "vertebrae": "{case}/vertebrae.seg.nrrd",
    "metastases": "{case}/metastases.seg.nrrd",
}
IMPORT_RECORD = ".spinemets-import.json"
#: Bumped when the conversion changes, so that a rerun converts every case again.
IMPORT_FORMAT = 1


def _pattern_regex(pattern: str, root: Path | str = ".") -> tuple[str, re.Pattern]:
    if pattern.count("{case}") != 1:
        raise SpinemetsError(f"{root}: file pattern {pattern!r} must contain {{case}} exactly once")
    glob = pattern.replace("{case}", "*")
    parts = [re.escape(p).replace(r"\*", "[^/]*").replace(r"\?", "[^/]") for p in pattern.split("{case}")]
    return glob, re.compile("^" + "(?P<case>[^/]+)".join(parts) + "$")


#: File name endings of images and masks: a path ending so must be a regular file (a folder is a
#: DICOM series only when its name has none of them).
FILE_SUFFIXES = (".nrrd", ".nii", ".nii.gz", ".mha", ".mhd", ".dcm")


def _find(root: Path, pattern: str, what: str = "image") -> dict[str, Path]:
    """Case ID -> path of every match of ``pattern`` below ``root``; matches are checked for what they are:
    a broken link, or a folder where a file is meant (a mask, or a name with a file suffix), is an error."""
    glob, regex = _pattern_regex(pattern, root)
    found: dict[str, Path] = {}
    for path in sorted(root.glob(glob)):
        match = regex.match(path.relative_to(root).as_posix())
        if not match or PARTIAL_PREFIX in path.name:
            continue
        if path.is_dir() and (what != "image" or path.name.lower().endswith(FILE_SUFFIXES)):
            raise SpinemetsError(f"{path}: {what} is a folder; expected a file (pattern {pattern!r})")
        if not path.is_dir():
            require_file(path, what)
        elif not any(p.is_file() and not p.name.startswith(".") for p in path.iterdir()):
            raise SpinemetsError(f"{path}: image folder holds no files; a DICOM series folder holds its slices")
        case = match.group("case")
        if case in found:
            raise SpinemetsError(f"{path}: duplicate case ID {case!r}, also {found[case]} (pattern {pattern!r})")
        found[case] = path
    return found


def scan(
    root: str | Path,
    out_csv: str | Path | None = None,
    image: str | None = None,
    segmentations: Mapping[str, str] | None = None,
    holdout: int = 0,
    pseudonymize: bool = False,
    mapping=None,
) -> pd.DataFrame:
    """Build the manifest of a folder; write it to ``out_csv`` when given.

    Without ``image`` and ``segmentations`` the layout is discovered (:func:`spinemets.cohort.discovery.discover`),
    with ``mapping`` (a mapping template filled in after ``spinemets scan --explain``, or a flat
    mapping file) answering its open questions; open questions left are an error that lists
    them, and nothing is written. A split table of the folder (TotalSegmentator's ``meta.csv``)
    sets the splits; ``holdout`` with one is an error.

    ``image`` and each of ``segmentations`` (stage -> pattern) are paths relative to ``root``
    with ``{case}`` where the case ID stands and optional ``*`` wildcards; when only one of them
    is given the other is the synthetic layout's (:data:`DEFAULT_IMAGE_PATTERN`,
    :data:`DEFAULT_SEGMENTATION_PATTERNS`). ``holdout`` marks the
    last N case IDs (sorted) as ``split = test``. A mask without its image, a case ID matched twice
    and a folder without any image are errors.

    With ``pseudonymize`` the case IDs (folder or file names, which may carry identifiers in
    clinical exports) are replaced by stable pseudonyms (``sm-0001`` ...); the private mapping
    stays beside the source data in ``root`` (:func:`spinemets.formats.deidentify.pseudonymize`). Everything
    written from the manifest then carries only the pseudonyms; the manifest itself still points
    at the source files and belongs with them.
    """
    root = require_dir(root, "folder to scan")
    if out_csv is not None:
        check_output_file(out_csv, "manifest file")
    if image is None and segmentations is None:
        return _scan_discovered(root, out_csv, holdout, pseudonymize, mapping)
    if mapping is not None:
        raise SpinemetsError("--mapping: scan reads a mapping only when it discovers the layout (no --image or "
                             "--segmentation patterns); give it to spinemets import")
    image = DEFAULT_IMAGE_PATTERN if image is None else image
    segmentations = dict(DEFAULT_SEGMENTATION_PATTERNS if segmentations is None else segmentations)
    for stage in segmentations:
        if stage not in labels_mod.STAGES:
            raise unknown_choice("stage", stage, labels_mod.STAGE_NAMES, "--segmentation")
    images = _find(root, image)
    if not images:
        raise SpinemetsError(f"{root}: no image matches {image!r}")
    cases, names, test_cases = _case_names(root, images, holdout, pseudonymize)
    rows = []
    for stage, pattern in segmentations.items():
        masks = _find(root, pattern, f"{stage} mask")
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise SpinemetsError(f"{masks[orphans[0]]}: mask has no image matching {image!r} (case {orphans[0]!r})")
        for case in cases:
            if case in masks:
                rows.append({"case_id": names[case], "image": str(images[case].resolve()), "stage": stage,
                             "segmentation": str(masks[case].resolve()),
                             "split": "test" if case in test_cases else "train"})
    manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
    if out_csv is not None:
        write_csv(out_csv, manifest.to_dict("records"), MANIFEST_COLUMNS)
    return manifest


def scan_stages(
    sources: Mapping[str, str | Path],
    out_csv: str | Path | None = None,
    holdout: int | Mapping[str, int] = 0,
    pseudonymize: bool | Mapping[str, bool] = False,
    mapping=None,
    image: str | None = None,
    segmentations: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The manifest of stages whose cases come from different folders: ``{stage: folder}``.

    The paper's vertebra CTs are private, so stage 1 is trained on a public set (TotalSegmentator's
    or VerSe) and stage 2 on the Zenodo release. Each folder is scanned with :func:`scan`
    (discovery, or the patterns when given) and only the rows of its own stage(s) are kept; a
    folder named for both stages is scanned once. ``holdout`` and ``pseudonymize`` may be given
    per stage (``{"metastases": 8}``). A stage whose folder gives it no case is an error, and so
    is a case ID that two folders both give (the CTs of different people under one name would be
    paired in the evaluation). Writes ``out_csv`` when given.
    """
    for stage in sources:
        labels_mod.check_stage(stage)
    if not sources:
        raise SpinemetsError("stage_data: name the folder of at least one stage")

    def per_stage(value, stage, what):
        if isinstance(value, Mapping):
            unknown = sorted(set(value) - set(labels_mod.STAGE_NAMES))
            if unknown:
                raise unknown_choice("stage", unknown[0], labels_mod.STAGE_NAMES, what)
            return value.get(stage, 0 if what == "holdout" else False)
        return value

    groups: dict[Path, list[str]] = {}
    for stage, folder in sources.items():
        groups.setdefault(require_dir(folder, f"folder of the {stage} stage").resolve(), []).append(stage)
    if out_csv is not None:
        check_output_file(out_csv, "manifest file")
    parts, owner = [], {}
    for folder, stages in groups.items():
        settings = {(per_stage(holdout, s, "holdout"), bool(per_stage(pseudonymize, s, "pseudonymize"))) for s in stages}
        if len(settings) > 1:
            raise SpinemetsError(f"{folder}: holds the cases of {' and '.join(stages)}, which are given different "
                                 "holdout or pseudonymize settings; give the folder one setting")
        (n_test, pseudo), = settings
        patterns = None if segmentations is None else {s: p for s, p in segmentations.items() if s in stages}
        frame = scan(folder, None, image=image, segmentations=patterns if image or patterns else None,
                     holdout=n_test, pseudonymize=pseudo, mapping=mapping)
        frame = frame[frame["stage"].isin(stages)]
        for stage in stages:
            if not (frame["stage"] == stage).any():
                raise SpinemetsError(f"{folder}: no {stage} segmentation found (named as the {stage} stage's folder)")
        for case in sorted(set(frame["case_id"])):
            if case in owner and owner[case] != folder:
                raise SpinemetsError(f"{folder}: case ID {case!r} is also a case of {owner[case]}; the stages' "
                                     "folders must not share case IDs (rename the cases, or pseudonymize one folder)")
            owner[case] = folder
        parts.append(frame)
    manifest = pd.concat(parts, ignore_index=True).fillna("")
    columns = MANIFEST_COLUMNS + ([MAPPING_COLUMN] if MAPPING_COLUMN in manifest.columns
                                  and manifest[MAPPING_COLUMN].astype(bool).any() else [])
    manifest = manifest[columns]
    if out_csv is not None:
        write_csv(out_csv, manifest.to_dict("records"), columns)
    return manifest


def _case_names(root: Path, images: Mapping[str, Path], holdout: int, pseudonymize: bool, splits=None):
    """Sorted source case IDs (checked), their names in the manifest (pseudonyms or themselves), and the
    test cases (the last ``holdout``, or those ``splits`` says)."""
    bad_ids = [c for c in images if case_id_problem(c)]
    if bad_ids and not pseudonymize:  # pseudonyms replace them anyway
        raise SpinemetsError(f"{images[bad_ids[0]]}: {case_id_problem(bad_ids[0])}"
                             + (f" ({len(bad_ids) - 1} more such case(s))" if len(bad_ids) > 1 else ""))
    cases = sorted(images)
    if not 0 <= holdout < len(cases):
        raise SpinemetsError(f"{root}: holdout {holdout} must be between 0 and {len(cases) - 1} "
                             f"(the folder has {len(cases)} cases)")
    test_cases = set(cases[len(cases) - holdout:]) if holdout else set()
    if splits is not None:
        test_cases = {case for case in cases if splits.get(case) == "test"}
    names = {case: case for case in cases}
    if pseudonymize:
        from spinemets.formats.deidentify import mapping_path, pseudonymize as make_pseudonyms

        names = make_pseudonyms(cases, mapping_path(root))
        for case, name in names.items():
            check_case_id(name, mapping_path(root))
    return cases, names, test_cases


def _scan_discovered(root: Path, out_csv, holdout: int, pseudonymize: bool, mapping) -> pd.DataFrame:
    """:func:`scan` of a layout found by :func:`spinemets.cohort.discovery.discover`."""
    from spinemets.cohort import discovery

    plan = discovery.discover(root, mapping)
    questions = plan.open_questions()
    explain = f"spinemets scan {root} --out MANIFEST.csv --explain"
    if not plan.cases:
        first = f" ({len(questions)} open question(s), the first: {questions[0]})" if questions else ""
        raise SpinemetsError(f"{root}: no image matches a CT of any known layout (NRRD, NIfTI, MHA/MHD files or "
                             f"DICOM series folders){first}; see what was found with: {explain}")
    if questions:
        more = f" (and {len(questions) - 1} more open question(s))" if len(questions) > 1 else ""
        raise SpinemetsError(f"{questions[0]}{more}; nothing was written. See the plan and get a mapping "
                             f"template to answer them with: {explain}; then scan again with --mapping TEMPLATE")
    if plan.splits is not None and holdout:
        raise SpinemetsError(f"{plan.split_table}: sets the split of every case (column 'split'), so "
                             f"--holdout {holdout} does not apply; leave out --holdout or move the table away")
    images = {case: entry["image"].path for case, entry in plan.cases.items()}
    cases, names, test_cases = _case_names(root, images, holdout, pseudonymize, plan.splits)
    rows = [{**row, "case_id": names[row["case_id"]], "split": "test" if row["case_id"] in test_cases else "train"}
            for row in discovery.rows(plan)]
    columns = MANIFEST_COLUMNS + ([MAPPING_COLUMN] if any(r[MAPPING_COLUMN] for r in rows) else [])
    manifest = pd.DataFrame(rows, columns=columns)
    if out_csv is not None:
        write_csv(out_csv, manifest.to_dict("records"), columns)
    return manifest


def read_manifest(manifest: str | Path | pd.DataFrame) -> pd.DataFrame:
    """A manifest as a DataFrame, checked for its columns."""
    if isinstance(manifest, pd.DataFrame):
        frame, source = manifest.copy(), "manifest"
    else:
        source = str(manifest)
        require_file(manifest, "manifest")
        try:
            frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
            raise SpinemetsError(f"{manifest}: not a readable CSV manifest ({one_line(exc)})") from None
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns and c != "split"]
    if missing:
        raise SpinemetsError(f"{source}: manifest lacks column(s) {missing}; expected {MANIFEST_COLUMNS}")
    if "split" not in frame.columns:
        frame["split"] = "train"
    frame = frame.astype(str)
    bad_split = sorted(set(frame["split"]) - {"train", "test"})
    if bad_split:
        raise SpinemetsError(f"{source}: split must be 'train' or 'test', found {bad_split}")
    for row, case in enumerate(frame["case_id"], start=2):  # row 1 is the header
        problem = case_id_problem(case)
        if problem:
            raise SpinemetsError(f"{source}: row {row}: {problem}")
    bad_stage = sorted(set(frame["stage"]) - set(labels_mod.STAGE_NAMES))
    if bad_stage:
        raise SpinemetsError(f"{source}: unknown stage(s) {bad_stage}; choose from {', '.join(labels_mod.STAGE_NAMES)}")
    if MAPPING_COLUMN not in frame.columns:
        frame[MAPPING_COLUMN] = ""
    bad_mapping = sorted(set(frame[MAPPING_COLUMN]) - {"", *labels_mod.NAMED_MAPPINGS})
    if bad_mapping:
        raise SpinemetsError(f"{source}: column {MAPPING_COLUMN} holds {bad_mapping}; expected empty or a built-in "
                             f"mapping ({', '.join(labels_mod.NAMED_MAPPINGS)})")
    return frame


def dataset_folder_name(stage: str, dataset_id: int) -> str:
    if not 1 <= int(dataset_id) <= 999:
        raise SpinemetsError(f"--dataset-id: must be between 1 and 999, not {dataset_id}")
    return f"Dataset{int(dataset_id):03d}_{labels_mod.STAGES[stage]['dataset_name']}"


def _sha256(path: Path, block: int = 1 << 22) -> str:
    """Content hash of a file, or of every file of a folder (a DICOM series) with its relative name."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with open(file, "rb") as fh:
            while chunk := fh.read(block):
                digest.update(chunk)
    return digest.hexdigest()


def _case_key(task: dict) -> str:
    mapping = None if task["mapping"] is None else {str(k): v for k, v in task["mapping"].items()}
    parts = [f"format={IMPORT_FORMAT}", f"stage={task['stage']}",
             "mapping=" + json.dumps(mapping, sort_keys=True),
             _sha256(Path(task["image"])), _sha256(Path(task["segmentation"]))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _outputs(case: str, split: str) -> tuple[str, str]:
    images, labels = ("imagesTs", "labelsTs") if split == "test" else ("imagesTr", "labelsTr")
    return f"{images}/{case}_0000.nii.gz", f"{labels}/{case}.nii.gz"


def _import_case(task: dict) -> dict:
    """Convert one case into the staging folder (or reuse the previous files); return its record."""
    case, staging = task["case_id"], Path(task["staging"])
    image_rel, label_rel = _outputs(case, task["split"])
    key = _case_key(task)
    previous = task.get("previous")
    if previous and previous.get("key") == key and previous.get("split") == task["split"]:
        old = Path(task["existing"])
        if (old / image_rel).exists() and (old / label_rel).exists():
            for rel in (image_rel, label_rel):
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                _link_or_copy(old / rel, staging / rel)
            return {**previous, "reused": True}
    ct = read_image(task["image"], "CT")
    labelmap, report = read_mask(task["segmentation"], ct, task["stage"], task["mapping"], ct_path=task["image"])
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(labelmap)))
    if voxels == 0 and task["stage"] == "vertebrae" and task.get("skip_empty"):
        return {"case_id": case, "split": task["split"], "skipped": "its mask holds no vertebra", "reused": False}
    if voxels == 0 and task["stage"] == "vertebrae":
        raise SpinemetsError(
            f"{task['segmentation']}: mask is empty after mapping its segments; "
            "every CT of the vertebra dataset must show vertebrae (--skip-empty leaves such cases out)"
        )
    write_image(ct, staging / image_rel)
    write_image(labelmap, staging / label_rel)
    present = sorted(int(v) for v in np.unique(sitk.GetArrayViewFromImage(labelmap)) if v)
    return {"case_id": case, "split": task["split"], "key": key, "labels": present,
            "empty": voxels == 0, "ignored_segments": report["ignored"],
            "contested_voxels": report["contested_voxels"], "reused": False}


def read_mask(path, ct: sitk.Image, stage: str, mapping=None, ct_path="the CT") -> tuple[sitk.Image, dict]:
    """A mask on the CT's grid as a label map of ``stage``, with the report of what was mapped.

    ``.seg.nrrd`` files go through :func:`spinemets.formats.slicer.labelmap_from_segmentation`; a
    DICOM-SEG (a file, or a folder holding exactly one, such as TCIA's SEG series folder)
    through :func:`spinemets.formats.dicomseg.read_dicom_seg`, with ``ct_path`` as the CT's series
    folder when it is one; any other image is a label map on the CT's grid, whose values are
    translated by :func:`spinemets.labels.map_label_values` (e.g. ``mapping="totalsegmentator"``);
    any other folder is a mask folder (:func:`labelmap_from_mask_folder`).
    """
    if str(path).endswith(".seg.nrrd"):
        return labelmap_from_segmentation(path, ct, stage, mapping, ct_path=ct_path)
    seg_file = _dicom_seg_file(Path(path))
    if seg_file is not None:
        from spinemets.formats.dicomseg import read_dicom_seg

        series = ct_path if isinstance(ct_path, (str, Path)) and Path(ct_path).is_dir() else None
        return read_dicom_seg(seg_file, ct, stage, mapping, ct_path=ct_path, ct_series_dir=series)
    if Path(path).is_dir():
        return labelmap_from_mask_folder(path, ct, stage, mapping, ct_path=ct_path)
    mask = read_image(path, "mask")
    check_same_geometry(ct, mask, ct_path, path)
    values = sitk.GetArrayFromImage(mask)
    if not np.issubdtype(values.dtype, np.integer):
        if not np.array_equal(values, np.round(values)):
            raise SpinemetsError(f"{path}: mask holds non-integer values; expected a label map")
        if np.abs(values).max() >= 2**53:
            raise SpinemetsError(f"{path}: mask holds values beyond 2**53, not exact integers; expected a label map")
        values = values.astype(np.int64)
    if values.min() < 0:
        raise SpinemetsError(f"{path}: mask holds negative values; expected a label map")
    # The distinct values and an index into them: no table sized by the largest value (2**62 ...).
    distinct, inverse = np.unique(values, return_inverse=True)
    present = [int(v) for v in distinct if v != 0]
    table = labels_mod.map_label_values(present, stage, mapping, str(path))
    lut = np.array([table.get(int(v), 0) for v in distinct], dtype=np.uint8)
    labelmap = image_from_array(lut[inverse.reshape(values.shape)], ct)
    report = {"segments": [{"name": str(v), "label": table[v]} for v in present if table[v]],
              "ignored": [str(v) for v in present if not table[v]], "contested_voxels": 0}
    return labelmap, report


def _dicom_seg_file(path: Path) -> Path | None:
    """The DICOM-SEG ``path`` is or holds (a folder with exactly one DICOM-SEG file), else None.
    A folder of DICOM files holding several SEGs is an error; other folders are mask folders."""
    from spinemets.formats.dicomseg import is_dicom_seg
    from spinemets.formats.dicom import is_dicom_file

    if path.is_file():
        return path if not path.name.lower().endswith((".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")) \
            and is_dicom_seg(path) else None
    if not path.is_dir():
        return None
    segs = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".") and is_dicom_file(p)
            and is_dicom_seg(p)]
    if len(segs) > 1:
        raise SpinemetsError(f"{path}: folder holds {len(segs)} DICOM-SEG files ({', '.join(p.name for p in segs[:4])}"
                             f"{' ...' if len(segs) > 4 else ''}); name the one to import")
    return segs[0] if segs else None


def labelmap_from_mask_folder(folder, ct: sitk.Image, stage: str, mapping=None,
                              ct_path="the CT") -> tuple[sitk.Image, dict]:
    """A folder of per-structure binary masks (TotalSegmentator: ``vertebrae_L1.nii.gz`` ...) as one
    label map of ``stage`` on the CT's grid, with the report of what was mapped.

    A structure's name is its file name without suffix, resolved like a segment name
    (:func:`spinemets.labels.resolve_segment_name`: ``vertebrae_C1`` ... ``vertebrae_L5``,
    ``vertebrae_S1`` and ``sacrum`` -> Sacrum); structures that resolve to nothing (organs, ribs
    ...) or that the mapping ignores are left out and listed as ignored, and are not read. Each
    mask must have the CT's geometry and hold only 0 and 1 (any non-zero voxel is inside).
    Masks of one label are merged; masks of different labels that overlap are an error naming
    both files (a TotalSegmentator folder never overlaps: its masks come from one label map).
    """
    from spinemets.cohort.discovery import structure_files, structure_name

    folder = Path(folder)
    files = structure_files(folder)
    if not files:
        raise SpinemetsError(f"{folder}: mask folder holds no structure masks (.nii.gz, .nii, .nrrd, .mha files)")
    shape = ct.GetSize()[::-1]
    labelmap = np.zeros(shape, dtype=np.uint8)
    owner: dict[int, Path] = {}
    report = {"segments": [], "ignored": [], "contested_voxels": 0}
    for file in files:
        name = structure_name(file)
        try:
            label = labels_mod.resolve_segment_name(name, stage, mapping)
        except KeyError:
            label = None
        if label is None:
            report["ignored"].append(name)
            continue
        mask = read_image(file, "structure mask")
        check_same_geometry(ct, mask, ct_path, file)
        values = sitk.GetArrayViewFromImage(mask)
        inside_mask = values != 0
        if np.any(inside_mask & (values != 1)):
            raise SpinemetsError(f"{file}: structure mask holds values other than 0 and 1; expected a binary mask")
        clash = inside_mask & (labelmap != 0) & (labelmap != label)
        if clash.any():
            other = owner[int(labelmap[clash][0])]
            raise SpinemetsError(f"{file}: overlaps {other} in {int(clash.sum())} voxel(s); the structures of "
                                 "a mask folder must not overlap")
        labelmap[inside_mask] = label
        owner.setdefault(int(label), file)
        report["segments"].append({"name": name, "label": int(label), "voxels": int(inside_mask.sum())})
    return image_from_array(labelmap, ct), report


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def import_dataset(
    manifest: str | Path | pd.DataFrame,
    stage: str,
    raw_dir: str | Path,
    dataset_id: int | None = None,
    mapping: str | Path | Mapping[str, str | None] | None = None,
    jobs: int = 1,
    skip_empty: bool = False,
) -> Path:
    """Write the nnU-Net raw dataset of ``stage`` from the manifest; return its folder.

    A vertebra case whose mask holds no vertebra is an error, unless ``skip_empty``: then it is
    left out of the dataset (a public set such as TotalSegmentator's has many CTs of the head or
    the legs), and listed in the import record (``skipped``) and the log. Nothing is left out
    silently, and a dataset left with no case is an error.
    """
    labels_mod.check_stage(stage)
    frame = read_manifest(manifest)
    frame = frame[frame["stage"] == stage]
    source = "manifest" if isinstance(manifest, pd.DataFrame) else str(manifest)
    if frame.empty:
        raise SpinemetsError(f"{source}: no rows for the {stage} stage")
    duplicated = sorted(frame.loc[frame["case_id"].duplicated(), "case_id"].unique())
    if duplicated:
        raise SpinemetsError(f"{source}: duplicate case ID(s) for the {stage} stage: {duplicated}")
    for column in ("image", "segmentation"):
        for path in frame[column]:
            _check_listed(path, column, source)
    mapping_dict = labels_mod.load_mapping(mapping, stage)
    named = str(mapping) if isinstance(mapping, (str, Path)) and str(mapping) in labels_mod.NAMED_MAPPINGS else None
    if named:
        where = f"--mapping: the built-in mapping {named!r}"
    else:
        where = str(mapping) if mapping is not None and not isinstance(mapping, Mapping) else "mapping"
    labels_mod.check_mapping(mapping_dict, stage, where)
    row_mappings = {}
    for r in frame.itertuples():
        builtin = getattr(r, MAPPING_COLUMN) or _builtin_mapping_of(r.segmentation)
        if builtin and named and named != builtin:
            raise SpinemetsError(f"{source}: case {r.case_id!r} has the built-in mapping {builtin!r}, and --mapping "
                                 f"gives {named!r}; give a mapping file to add to {builtin!r} instead")
        row_mappings[r.case_id] = ({**labels_mod.NAMED_MAPPINGS[builtin], **(mapping_dict or {})}
                                   if builtin and not named else mapping_dict)
    dataset_id = labels_mod.STAGES[stage]["dataset_id"] if dataset_id is None else int(dataset_id)
    raw_dir = check_output_dir(raw_dir, "nnU-Net raw folder")
    name = dataset_folder_name(stage, dataset_id)
    final = raw_dir / name
    if final.exists() and not final.is_dir():
        raise SpinemetsError(f"{final}: dataset folder is an existing file")
    for r in frame.itertuples():  # one rule for every output path: inside the dataset folder
        for rel in _outputs(r.case_id, r.split):
            inside(final, rel, f"file of case {r.case_id!r}")
    with output_folder(raw_dir, "nnU-Net raw folder"):
        return _import_into(frame, stage, raw_dir, name, mapping_dict, jobs, row_mappings, skip_empty)


def read_row_mask(row: Mapping, ct: sitk.Image, mapping=None) -> tuple[sitk.Image, dict]:
    """The mask of one manifest row (``stage``, ``segmentation``, optional ``mapping``) on the CT's grid,
    as the import reads it: the row's built-in mapping (VerSe's) under the user's ``mapping``."""
    stage = row["stage"]
    user = labels_mod.load_mapping(mapping, stage)
    builtin = str(row.get(MAPPING_COLUMN) or "") or _builtin_mapping_of(row["segmentation"])
    table = {**labels_mod.NAMED_MAPPINGS[builtin], **(user or {})} if builtin else user
    return read_mask(row["segmentation"], ct, stage, table, ct_path=row.get("image", "the CT"))


def _builtin_mapping_of(segmentation: str) -> str:
    """The built-in mapping a segmentation's path implies: ``verse`` for VerSe's label maps
    (:func:`spinemets.cohort.discovery.is_verse`), else ""."""
    from spinemets.cohort.discovery import is_verse

    path = str(segmentation)
    return "verse" if not path.endswith(".seg.nrrd") and not path.lower().endswith(".dcm") and is_verse(path) else ""


def _check_listed(path: str, column: str, source: str) -> None:
    """A file the manifest lists must exist (an image may also be a DICOM series folder, a
    segmentation a mask folder; neither with a file's suffix)."""
    if not str(path).strip():
        raise SpinemetsError(f"{source}: a row lists an empty {column} path")
    p = Path(path)
    if p.is_dir() and (column == "image" or not p.name.lower().endswith(FILE_SUFFIXES)):
        return
    require_file(p, f"{column} file listed in {source}")


def _import_into(frame: pd.DataFrame, stage: str, raw_dir: Path, name: str, mapping_dict, jobs: int,
                 row_mappings: Mapping | None = None, skip_empty: bool = False) -> Path:
    """Write the dataset ``raw_dir/name`` of ``stage`` from the manifest rows ``frame`` (staged under a
    partial name, then swapped into place); ``row_mappings``: each case's label mapping (default
    ``mapping_dict``, which the import record keeps)."""
    final = raw_dir / name
    remove_partials(raw_dir)
    previous_cases = _read_record(final).get("cases", {})
    staging = raw_dir / f"{PARTIAL_PREFIX}{name}"
    for sub in ("imagesTr", "labelsTr"):
        (staging / sub).mkdir(parents=True)
    if (frame["split"] == "test").any():
        for sub in ("imagesTs", "labelsTs"):
            (staging / sub).mkdir(parents=True)

    tasks = [{"case_id": r.case_id, "image": r.image, "segmentation": r.segmentation, "split": r.split,
              "stage": stage, "mapping": (row_mappings or {}).get(r.case_id, mapping_dict),
              "staging": str(staging), "existing": str(final), "skip_empty": skip_empty,
              "previous": previous_cases.get(r.case_id)} for r in frame.itertuples()]
    try:
        records = _run_tasks(tasks, jobs, f"import {stage}")
        skipped = {r["case_id"]: r["skipped"] for r in records if r.get("skipped")}
        records = [r for r in records if not r.get("skipped")]
        if skipped:
            log.warning("%s: %d case(s) left out, their masks hold no vertebra: %s", name, len(skipped),
                        ", ".join(sorted(skipped)))
        if not any(r["split"] == "train" for r in records):
            raise SpinemetsError(f"{raw_dir / name}: no training case left after leaving out the {len(skipped)} "
                                 "case(s) whose masks hold no vertebra")
        n_train = sum(r["split"] == "train" for r in records)
        write_json(staging / "dataset.json", {
            "channel_names": {"0": "CT"},
            "labels": labels_mod.dataset_json_labels(stage),
            "numTraining": n_train,
            "file_ending": ".nii.gz",
            "name": name,
            "description": f"spinemets {stage} stage, imported from 3D Slicer segmentations",
        })
        write_json(staging / IMPORT_RECORD, {
            "spinemets_version": __version__, "format": IMPORT_FORMAT, "stage": stage,
            "mapping": mapping_dict,
            # what the CTs are (synthetic: written by spinemets synth), for the models' domain record
            "cohort": cohort_of(frame["image"]),
            "cases": {r["case_id"]: {k: v for k, v in r.items() if k != "reused"} for r in records},
            "skipped": skipped,
        })
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _swap_into_place(staging, final)
    return final


def _run_tasks(tasks: list[dict], jobs: int, what: str) -> list[dict]:
    """Run :func:`_import_case` over the tasks (in processes when ``jobs > 1``); gather every error."""
    errors: list[str] = []
    records: list[dict] = []
    pool = ProcessPoolExecutor(max_workers=min(jobs, len(tasks))) if jobs > 1 and len(tasks) > 1 else None
    try:
        calls = [pool.submit(_import_case, t).result if pool else (lambda t=t: _import_case(t)) for t in tasks]
        for call in tqdm(calls, desc=what, unit="case"):
            try:
                records.append(call())
            except SpinemetsError as exc:
                errors.append(str(exc))
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    if errors:
        for message in errors:
            log.error("%s", message)
        more = f"; {len(errors) - 1} more case(s) failed too (listed above)" if len(errors) > 1 else ""
        raise SpinemetsError(f"{errors[0]}{more}; nothing was imported")
    return sorted(records, key=lambda r: r["case_id"])


def _read_record(folder: Path) -> dict:
    """The import record of an earlier import, or {} (missing or damaged: every case is converted again)."""
    try:
        record = read_json(folder / IMPORT_RECORD, "import record", missing={})
    except SpinemetsError:
        return {}
    return record if isinstance(record, dict) else {}


def _swap_into_place(staging: Path, final: Path) -> None:
    """Replace ``final`` with ``staging`` by renames; the old folder is removed after."""
    old = final.with_name(f"{PARTIAL_PREFIX}old-{final.name}")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(old)
