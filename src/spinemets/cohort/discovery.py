"""The plan of a folder: which files are the CTs and segmentations of which case and stage.

It serves ``spinemets scan`` when no ``--image``/``--segmentation`` patterns are given
(:func:`spinemets.cohort.dataset.scan`) and ``spinemets scan --explain`` (:func:`explain`). Nothing
is written to the scanned folder; nothing is guessed: what the rules below cannot decide is an
**open question** of the plan, which ``scan`` refuses and ``--explain`` lists, with a mapping
template to answer it.

What is found (:func:`discover`)
    * **CTs**: ``.nrrd`` (not ``.seg.nrrd``), ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd`` files
      and DICOM series folders (a folder holding ``.dcm`` files or DICOM files without suffix,
      e.g. TCIA's ``<case>/<study>/<series>/1-001.dcm``; a folder of RTSTRUCT or other non-image
      objects is not used).
    * **Segmentations**: 3D Slicer ``.seg.nrrd`` files (segment names from the header),
      **DICOM-SEG** files (the files of a SEG series folder that
      :func:`spinemets.formats.dicomseg.is_dicom_seg` accepts, segment names from their Segment Labels:
      TCIA's ``<case>/<study>/300.000000-Segmentation-NNNNN/1-1.dcm`` with ``T1 vertebra`` ...;
      it belongs to the CT series of its study folder), label-map images (NIfTI/NRRD/MHA holding
      label values) and **mask folders** of per-structure binary masks (TotalSegmentator:
      ``s0001/segmentations/vertebrae_L1.nii.gz``).
    * **Not used**, each with its reason: spreadsheets, JSON (VerSe centroids ``*_ctd.json``,
      ``dataset.json``), pictures (VerSe ``*.png`` previews), documents, hidden files, further
      image channels (``_0001``), TCIA's ``metadata.csv`` and clinical table
      (``Spine-Mets-CT-SEG_clinical.csv``) ... Nothing is dropped silently. ``meta.csv`` at the top of a
      TotalSegmentator download (``;``-separated, columns ``image_id`` and ``split``) gives the
      splits: ``test`` stays ``test``, ``train`` and ``val`` become ``train``.

CT or label map
    By name first: a file name (or the folder it is in) with ``seg``, ``label``, ``mask``,
    ``msk`` or a stage word is a segmentation; ``ct``, ``image``, ``img`` or ``_0000`` a CT
    (``images``/``imagesTr``/``rawdata`` folders hold CTs, ``labels``/``labelsTr``/``derivatives``
    segmentations). Only when the name says nothing are the voxels read: non-negative integers
    with at most :data:`MAX_LABELS` distinct values are a label map, anything else a CT.

Cases
    A CT's case ID is the name of the topmost folder below the scanned one that holds only that
    CT (``case01/ct.nrrd``, TCIA's ``case01/<study>/<series>``, VerSe's ``rawdata/sub-x/...``),
    otherwise its file name without role words (``case01_ct.nii.gz``, ``case01_0000.nii.gz``,
    ``sub-x_dir-ax_ct.nii.gz`` -> ``case01``, ``sub-x_dir-ax``). Folder names such as ``images``,
    ``rawdata``, ``derivatives``, ``dicom`` are never case IDs. Case IDs never come from DICOM
    headers. A segmentation belongs to the CT whose name or case ID its own name carries once
    role words are removed (``case01.seg.nrrd``, ``case01_seg.nii.gz``,
    ``labelsTr/case01.nii.gz``, ``derivatives/sub-x/sub-x_seg-vert_msk.nii.gz``), otherwise to
    the only CT of its folder or of the nearest folder above that holds any.

Stage of a segmentation
    From its content: a ``.seg.nrrd`` or DICOM-SEG whose segment names all resolve for one stage
    (:func:`spinemets.labels.resolve_segment_name`, with the user mapping), a mask folder whose
    structure names resolve for one stage; then from a name hint (``vert``, ``spine`` ->
    vertebrae; ``met``, ``lesion``, ``lytic``, ``scler`` -> metastases); then, for a label map,
    from its values (a value above 2 -> vertebrae). A file that fits both stages or neither
    (``{1, 2}`` with no hint, a segment ``Segment_1``) is an open question.
    VerSe label maps (``*_seg-vert_msk.nii.gz``, or "verse" as a word of the path, as in the
    MICCAI release's ``verse004_CT-orient_seg.nii.gz``) get the built-in mapping ``verse`` in the
    manifest's ``mapping`` column: VerSe's 25 (L6) and 28 (T13) are open questions until the
    mapping says what they are.

Open questions
    Two CTs for one case, two segmentations of one stage for one case, a segmentation with no
    CT (or several), one whose stage is unclear, segment names, structure names or label values
    that map to nothing, unreadable files. Unknown structures of a mask folder are not questions:
    TotalSegmentator writes 117 of them, and all but the vertebrae and the sacrum are ignored.

The mapping template (``--explain`` writes it; ``--mapping`` reads it back, in ``scan`` and in
``import``), YAML::

    spinemets_mapping: 1
    reviewed: false          # set to true once every null below is checked
    files:                   # path relative to the scanned folder: image, vertebrae, metastases,
      case07/seg.nii.gz: null  #   or null to leave the file out
    vertebrae:               # segment name, structure name or label value: a label of the stage
      25: null               #   (C1 ... L5, Sacrum), or null to ignore it
    metastases:
      Segment_1: null        # lytic, sclerotic, or null

Every open question is there with ``null`` and a comment saying what was seen and the choices.
Since null also means "ignore"/"leave out", a template is refused until ``reviewed: true``. The
older flat mapping format (``{name or value: label or null}``, for every stage) is read too.

One job in one module (over 700 lines): recognising a folder's layout; its rules (case folders, mask
folders, nnU-Net and VerSe layouts, DICOM series) decide together which file is what.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk
import yaml

from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError, one_line
from spinemets.fileio import PARTIAL_PREFIX, require_dir, write_text
from spinemets.formats.dicom import DICOM_SUFFIXES, dicom_modality, is_dicom_file
from spinemets.formats.slicer import header_segment_names

log = logging.getLogger(__name__)

#: File endings of images (CTs or label maps); ``.seg.nrrd`` is a 3D Slicer segmentation.
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SLICER_SUFFIX = ".seg.nrrd"
#: File endings of the per-structure masks of a mask folder.
STRUCTURE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
#: A label map has at most this many distinct values (TotalSegmentator's "total" task: 118).
MAX_LABELS = 128
#: VerSe's segmentation files (BIDS-like), which get the built-in mapping ``verse``.
VERSE_SEGMENTATION = re.compile(r"_seg-vert_msk\.nii(\.gz)?$", re.IGNORECASE)
#: "verse" as a word of a path (``verse004_CT-orient_seg.nii.gz`` of the MICCAI release,
#: ``sub-verse004``, a ``VerSe2020`` folder), not inside another word ("reverse", "universe").
VERSE_WORD = re.compile(r"(?<![a-z])verse(?![a-z])", re.IGNORECASE)


def is_verse(path: str | Path) -> bool:
    """Whether a label map's path says it is VerSe's, whose 25 is L6 and 28 T13 (not our Sacrum):
    its BIDS name (``*_seg-vert_msk``) or "verse" as a word anywhere in the path. Erring towards
    yes is safe (L6 and T13 are then asked about); erring towards no would make L6 our Sacrum."""
    return bool(VERSE_SEGMENTATION.search(Path(path).name) or VERSE_WORD.search(str(path)))
#: TotalSegmentator's table of its download: image_id;...;split.
SPLIT_TABLE = "meta.csv"
#: TCIA's tables of a download: the NBIA Data Retriever's ``metadata.csv``, and a collection's
#: clinical spreadsheet (``Spine-Mets-CT-SEG_clinical.csv``); listed as not used.
TCIA_METADATA = "metadata.csv"
TCIA_CLINICAL = re.compile(r"_clinical\.(csv|xlsx?)$")

CT_WORDS = {"ct", "image", "img", "0000"}
SEG_WORDS = {"seg", "segmentation", "segmentations", "label", "labels", "labelmap", "mask", "masks", "msk"}
STAGE_WORDS = {"vertebrae": ("vert", "spine"), "metastases": ("met", "lesion", "lytic", "scler")}
CT_FOLDERS = {"images", "imagestr", "imagests", "rawdata", "ct", "cts", "dicom", "scans"}
SEG_FOLDERS = {"labels", "labelstr", "labelsts", "derivatives", "masks", "segmentations", "segs", "seg"}
#: Folder names that group many cases and never name one.
CONTAINER_FOLDERS = CT_FOLDERS | SEG_FOLDERS | {"data", "nifti", "nrrd", "images_and_labels"}
_HINT = r"(?:ct|images?|img|0000|seg|segmentations?|labels?|labelmap|masks?|msk|vert[a-z]*|spine|met[a-z]*|lesions?|lytic|scler[a-z]*)"
_STRIP = re.compile(rf"^(?:{_HINT}[\W_]+)+|(?:[\W_]+{_HINT})+$|^{_HINT}$", re.IGNORECASE)
_NOT_USED = {
    (".csv", ".tsv", ".xlsx", ".xls", ".ods"): "spreadsheet (not read)",
    (".json",): "JSON file (centroids, dataset description ...; not read)",
    (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".svg"): "picture (a preview; not read)",
    (".pdf", ".doc", ".docx", ".txt", ".md", ".rst", ".html"): "document (not read)",
    (".zip", ".tar", ".gz", ".tgz", ".7z"): "archive (unpack it first)",
    (".yaml", ".yml"): "YAML file (not read; give a mapping with --mapping)",
    (".py", ".sh", ".ipynb"): "script (not read)",
    (".mrb", ".mrml", ".fcsv", ".mrk.json", ".vtk", ".stl", ".obj"): "3D Slicer scene or model (not read)",
}


@dataclass
class Found:
    """One input of the plan: a CT (file or DICOM series folder) or a segmentation."""

    path: Path
    rel: str
    kind: str  # "ct", "slicer", "dicomseg", "labelmap", "mask-folder"
    key: str  # the file name without suffix and role words ("" when nothing is left)
    stage: str | None = None
    mapping: str = ""  # built-in mapping of its values ("verse"), or ""
    #: stage -> [(segment name, structure name or label value, what it maps to)], for the plan
    entries: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)  # structures of a mask folder left out
    why: str = ""  # how its role or stage was decided

    @property
    def folder(self) -> Path:
        return self.path.parent


@dataclass
class Plan:
    """What :func:`discover` found below ``root``.

    ``cases``: case ID -> ``{"image": Found, "segmentations": {stage: Found}}``; ``splits``: case
    ID -> split from ``meta.csv`` (or None without one); ``unused``: (relative path, reason);
    ``questions``: open questions about files, relative path -> (message, choices);
    ``unknown``: stage -> {segment name or label value: [relative paths]} that map to nothing.
    """

    root: Path
    cases: dict = field(default_factory=dict)
    splits: dict | None = None
    split_table: Path | None = None
    unused: list = field(default_factory=list)
    questions: dict = field(default_factory=dict)
    unknown: dict = field(default_factory=lambda: {s: {} for s in labels_mod.STAGE_NAMES})
    notes: dict = field(default_factory=dict)  # relative path or case -> remark for the plan

    def ask(self, found_or_rel, message: str, choices) -> None:
        rel = found_or_rel.rel if isinstance(found_or_rel, Found) else found_or_rel
        if rel not in self.questions:
            self.questions[rel] = (message, list(choices))

    def open_questions(self) -> list[str]:
        """Every open question as a message starting with the path it is about."""
        out = [f"{self.root / rel}: {message}" for rel, (message, _) in sorted(self.questions.items())]
        for stage, unknown in self.unknown.items():
            for key, rels in sorted(unknown.items(), key=lambda kv: (isinstance(kv[0], str), str(kv[0]).zfill(9))):
                rels = [r for r in rels if r not in self.questions]  # a file in question: its names wait
                if not rels:
                    continue
                what = "label value" if isinstance(key, int) else "segment name"
                hint = (" (a label map in another dataset's labels? TotalSegmentator's 'total' task: "
                        "--mapping totalsegmentator; VerSe: --mapping verse)"
                        if isinstance(key, int) and stage == "vertebrae" and key > 25 else "")
                out.append(f"{self.root / rels[0]}: {what} {key!r} maps to no label of the {stage} stage"
                           + (f" (also in {len(rels) - 1} more file(s))" if len(rels) > 1 else "") + hint)
        return out


# ---------------------------------------------------------------------------------------------
# finding the files


def discover(root: str | Path, mapping=None) -> Plan:
    """The plan of ``root``: cases, their CT and segmentations per stage, files not used, open questions.

    ``mapping``: a mapping template or flat mapping (path, dict, or built-in name); its names and
    values serve the stage decisions, its ``files`` section overrides what a file is.
    """
    root = require_dir(root, "folder to scan")
    document = labels_mod.mapping_document(mapping)
    plan = Plan(root=root)
    # a template's files are those of the folder it was written for: one template may answer the
    # questions of two folders (the stages' data), each folder taking its own files
    written_for = document.get("root")
    roles = dict(document["files"]) if not written_for or Path(written_for).resolve() == root.resolve() else {}
    cts, segs, images = [], [], []
    for item in _walk(root, plan, document):
        role = roles.pop(item.rel, "unset")
        if role is None:
            plan.unused.append((item.rel, f"left out by the mapping file {document['source']}"))
            continue
        if role == "image":
            item.kind, item.why = "ct", "set by the mapping file"
        elif role != "unset":
            item.stage, item.why = role, "set by the mapping file"
            if item.kind == "ct" or item.kind == "image":
                item.kind = "labelmap"
        if item.kind == "image":
            images.append(item)
        (cts if item.kind == "ct" else segs if item.kind != "image" else []).append(item)
    for item in images:
        _classify_image(item, plan)
        (cts if item.kind == "ct" else segs if item.kind == "labelmap" else []).append(item)
    for rel in sorted(roles):
        plan.ask(rel, f"listed in the files of {document['source']}, but no such image or segmentation was found",
                 [])
    _assign_cases(plan, cts, segs, document)
    _read_split_table(plan)
    _note_value_25(plan)
    return plan


def _note_value_25(plan: Plan) -> None:
    """Say where a plain label map's 25 is taken as our Sacrum: in VerSe's labels it is L6, and a
    VerSe map whose path does not say so (see :func:`is_verse`) would be read wrong without a word."""
    for case, entry in plan.cases.items():
        seg = entry.get("segmentations", {}).get("vertebrae")
        if seg is None or seg.kind != "labelmap" or seg.mapping:
            continue
        if any(key == 25 and value == 25 for key, value in seg.entries.get("vertebrae", [])):
            note = (f"{seg.rel}: value 25 is taken as the Sacrum (spinemets' labels); in VerSe's labels 25 is L6. "
                    "If this is VerSe data, scan with --mapping verse")
            plan.notes[case] = f"{plan.notes[case]}; {note}" if case in plan.notes else note
            log.warning("%s", note)


def _walk(root: Path, plan: Plan, document) -> list[Found]:
    """Every CT, segmentation and image of unknown role below ``root``; the rest goes to ``plan.unused``."""
    found: list[Found] = []
    seen = {os.path.realpath(root)}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as exc:
            plan.ask(_rel(root, folder), f"folder cannot be read ({one_line(exc.strerror or exc)})", [None])
            continue
        files, dicom = [], []
        subfolders = []
        if not entries and folder != root:
            plan.unused.append((_rel(root, folder), "empty folder"))
        for path in entries:
            rel = _rel(root, path)
            name = path.name.lower()
            if path.name.startswith(".") or PARTIAL_PREFIX in path.name:
                plan.unused.append((rel, "hidden " + ("folder" if path.is_dir() else "file")))
            elif path.is_symlink() and not path.exists():
                if name.endswith(IMAGE_SUFFIXES + DICOM_SUFFIXES):
                    plan.ask(rel, "image is a broken symbolic link (to a file that does not exist)", [None])
                else:
                    plan.unused.append((rel, "broken symbolic link"))
            elif path.is_dir():
                if name.endswith(IMAGE_SUFFIXES + DICOM_SUFFIXES):
                    plan.ask(rel, "is a folder with an image file's name; expected a file", [None])
                    continue
                real = os.path.realpath(path)
                if path.is_symlink() and (real in seen or _within(real, os.path.realpath(root))):
                    plan.unused.append((rel, f"link to a folder that is scanned already ({_rel(root, Path(real))})"))
                    continue
                seen.add(real)
                subfolders.append(path)
            elif not path.is_file():
                plan.unused.append((rel, "not a regular file"))
            elif is_dicom_file(path):
                dicom.append(path)
            else:
                files.append(path)
        structure_files = [p for p in files if p.name.lower().endswith(STRUCTURE_SUFFIXES)
                           and not p.name.lower().endswith(SLICER_SUFFIX)]
        if folder != root and not dicom and _is_mask_folder(folder, structure_files, document):
            found.append(Found(folder, _rel(root, folder), "mask-folder", ""))
            for path in files:
                if path not in structure_files:
                    plan.unused.append((_rel(root, path), "not a structure mask of the mask folder"))
            stack.extend(reversed(subfolders))
            continue
        if dicom:
            modality = dicom_modality(dicom[0])
            if modality == "SEG":
                _dicom_segs(root, dicom, found, plan)
            elif modality in ("RTSTRUCT", "SR", "PR", "RTPLAN", "RTDOSE", "KO"):
                plan.unused.append((_rel(root, folder), f"DICOM {modality} object(s), not read (export an "
                                                        "RTSTRUCT from 3D Slicer as a .seg.nrrd)"))
            elif folder == root:
                plan.ask(".", "DICOM files lie directly in the scanned folder; put each series in a folder "
                              "of its own case", [None])
            else:
                found.append(Found(folder, _rel(root, folder), "ct", "", why="DICOM series folder"))
        mhd_stems = {p.name[:-4].lower() for p in files if p.name.lower().endswith(".mhd")}
        for path in files:
            item = _file_item(root, path, mhd_stems, plan)
            if item is not None:
                found.append(item)
        stack.extend(reversed(subfolders))
    return sorted(found, key=lambda f: f.rel)


def _dicom_segs(root: Path, files: list[Path], found: list[Found], plan: Plan) -> None:
    """The DICOM-SEG files of a SEG series folder (:func:`spinemets.formats.dicomseg.is_dicom_seg`); other
    files there (a Surface Segmentation, another object) are not used."""
    from spinemets.formats.dicomseg import is_dicom_seg

    for path in files:
        if is_dicom_seg(path):  # the file name is an instance number, never a case name: no key
            found.append(Found(path, _rel(root, path), "dicomseg", "", why="DICOM-SEG"))
        else:
            plan.unused.append((_rel(root, path), "DICOM object of a SEG series that is no voxel DICOM-SEG "
                                                  "(a Surface Segmentation ...), not read"))


def _rel(root: Path, path: Path) -> str:
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix()
    return rel or "."


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _is_mask_folder(folder: Path, structure_files: list[Path], document) -> bool:
    """A folder of per-structure masks: some of its file names are structures of a stage, and more than a
    bare vertebra code (``vertebrae_L1``, ``sacrum``, ``lytic``; ``L1`` alone may be a case ID), or it
    is named ``segmentations``; it holds no CT-named file and is no ``labelsTr``-like folder."""
    if not structure_files or any(set(_words(_strip_suffix(p.name))) & CT_WORDS for p in structure_files):
        return False
    if folder.name.lower() in CONTAINER_FOLDERS - {"segmentations"}:
        return False
    for path in structure_files:
        name = _strip_suffix(path.name)
        if re.fullmatch(r"[ctls]\d{1,2}", name.strip().lower()) and folder.name.lower() != "segmentations":
            continue
        for stage in labels_mod.STAGE_NAMES:
            if _resolve(name, stage, document["stages"][stage]) not in (None, _UNKNOWN):
                return True
    return False


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (SLICER_SUFFIX, *IMAGE_SUFFIXES, *DICOM_SUFFIXES):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_key(stem: str) -> str:
    """A file name without suffix, stripped of role words: ``case01_ct`` -> ``case01``, ``ct`` -> ``""``."""
    previous = None
    while previous != stem:
        previous, stem = stem, _STRIP.sub("", stem)
    return stem


def _words(text: str) -> list[str]:
    return [w for w in re.split(r"[^a-z0-9]+", text.lower()) if w]


def _stage_hint(*texts: str) -> str | None:
    """The stage a name points to (``vert`` ... or ``met`` ...), or None for none or both."""
    hits = {stage for text in texts for word in _words(text) for stage, prefixes in STAGE_WORDS.items()
            if word.startswith(prefixes)}
    return next(iter(hits)) if len(hits) == 1 else None


def _file_item(root: Path, path: Path, mhd_stems: set[str], plan: Plan) -> Found | None:
    name, rel = path.name.lower(), _rel(root, path)
    if name.endswith(SLICER_SUFFIX):
        return Found(path, rel, "slicer", case_key(path.name[: -len(SLICER_SUFFIX)]))
    if name.endswith(IMAGE_SUFFIXES):
        stem = _strip_suffix(path.name)
        channel = re.search(r"_(\d{4})$", stem)
        if channel and channel.group(1) != "0000":
            plan.unused.append((rel, f"image channel {int(channel.group(1))} (nnU-Net naming); only channel 0, "
                                     "the CT, is used"))
            return None
        return Found(path, rel, "image", case_key(stem))
    if name.endswith((".raw", ".zraw")) and name.rsplit(".", 1)[0] in mhd_stems:
        return plan.unused.append((rel, "voxel data of the .mhd file beside it (read with it)"))
    if name == SPLIT_TABLE and path.parent == root:
        return None  # read by _read_split_table
    if name == TCIA_METADATA:
        return plan.unused.append((rel, "TCIA download table (NBIA Data Retriever's list of series; not read: "
                                        "case IDs come from folder names)"))
    if TCIA_CLINICAL.search(name):
        return plan.unused.append((rel, "clinical table (not read by scan; the external validation reads it)"))
    for suffixes, reason in _NOT_USED.items():
        if name.endswith(suffixes):
            return plan.unused.append((rel, reason))
    if name.startswith(("readme", "license", "licence", "changelog", "citation")):
        return plan.unused.append((rel, "document (not read)"))
    plan.unused.append((rel, "not an image, segmentation or DICOM file"))
    return None


def _classify_image(item: Found, plan: Plan) -> None:
    """CT or label map: by the file's name, then its folder's, then (only then) its voxels."""
    stem_words = set(_words(_strip_suffix(item.path.name)))
    folder_word = item.path.parent.name.lower() if item.path.parent != plan.root else ""
    if stem_words & SEG_WORDS:
        item.kind, item.why = "labelmap", "named as a segmentation"
    elif stem_words & CT_WORDS:
        item.kind, item.why = "ct", "named as a CT"
    elif _stage_hint(item.path.name):
        item.kind, item.why = "labelmap", "named after a stage"
    elif folder_word in CT_FOLDERS:
        item.kind, item.why = "ct", f"in a folder named {item.path.parent.name!r}"
    elif folder_word in SEG_FOLDERS:
        item.kind, item.why = "labelmap", f"in a folder named {item.path.parent.name!r}"
    else:
        try:
            values = _voxels(item.path)
        except SpinemetsError as exc:
            item.kind = "unreadable"
            plan.ask(item, str(exc).split(": ", 1)[-1], [None])
            return
        if _looks_like_labels(values):
            item.kind, item.why = "labelmap", "its voxels are few non-negative integers"
        else:
            item.kind, item.why = "ct", "its voxels are CT-like (negative or many values)"


def _voxels(path: Path) -> np.ndarray:
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        raise SpinemetsError(f"{path}: cannot read image (truncated, corrupt or not an image): "
                             f"{one_line(first)[-200:]}") from None


def _looks_like_labels(values: np.ndarray) -> bool:
    if values.size == 0 or values.min() < 0:
        return False
    if values.dtype.kind == "f" and not np.array_equal(values, np.round(values)):
        return False
    return len(_distinct(values)) <= MAX_LABELS


def _distinct(values: np.ndarray) -> list[int]:
    """The distinct values of an integer-valued array, sorted (bincount when they are small)."""
    top = values.max() if values.size else 0
    if values.dtype.kind in "ui" and 0 <= values.min() and top < 1 << 16:
        return [int(v) for v in np.flatnonzero(np.bincount(values.ravel()))]
    return [int(v) for v in np.unique(values)]


# ---------------------------------------------------------------------------------------------
# stages


_UNKNOWN = object()


def _resolve(key, stage: str, mapping: Mapping | None):
    """Label value of a segment or structure name for ``stage``; None when the mapping ignores it;
    :data:`_UNKNOWN` when it is no name of that stage."""
    try:
        return labels_mod.resolve_segment_name(str(key), stage, mapping)
    except KeyError:
        return _UNKNOWN
    except SpinemetsError:  # the mapping sends it to a label of the other stage
        return _UNKNOWN


def _shown(stage: str, label) -> str:
    if label is _UNKNOWN:
        return "?"
    if label is None:
        return "ignored"
    return f"{labels_mod.label_names(stage)[int(label)]} ({int(label)})"


def _assess(item: Found, plan: Plan, document) -> None:
    """Decide the stage of a segmentation (unless set) and record what its names or values map to."""
    if item.kind in ("slicer", "dicomseg"):
        names = _segment_names(item, plan) if item.kind == "slicer" else _dicom_segment_names(item, plan)
        if names is None:
            return
        keys = names
        per_stage = {s: [_resolve(n, s, document["stages"][s]) for n in names] for s in labels_mod.STAGE_NAMES}
    elif item.kind == "mask-folder":
        keys = [_strip_suffix(p.name) for p in structure_files(item.path)]
        per_stage = {s: [_resolve(n, s, document["stages"][s]) for n in keys] for s in labels_mod.STAGE_NAMES}
    else:
        try:
            keys = [v for v in _distinct(_label_values(item)) if v]
        except SpinemetsError as exc:
            plan.ask(item, str(exc).split(": ", 1)[-1], [None])
            return
        if is_verse(f"{plan.root.name}/{item.rel}"):
            item.mapping = "verse"
        per_stage = {s: [_value_target(v, s, _value_mapping(item, document["stages"][s])) for v in keys]
                     for s in labels_mod.STAGE_NAMES}
    hint = _stage_hint(item.path.name)
    if hint is None and item.path.parent != plan.root:
        hint = _stage_hint(item.path.parent.name)
    if item.stage is None:
        item.stage, item.why = _decide(item, keys, per_stage, hint, plan)
    if item.kind == "labelmap" and item.stage and keys and not item.mapping and \
            document["stages"][item.stage] and all(v is None for v in per_stage[item.stage]):
        plan.ask(item, "the mapping file maps none of this label map's values "
                       f"({_listed(keys)}), so every voxel would be left out; add its values to the "
                       f"{item.stage} mapping (e.g. '{keys[0]}: LABEL')",
                 [item.stage, None])
    for stage in labels_mod.STAGE_NAMES:
        if item.stage in (None, stage):
            item.entries[stage] = list(zip(keys, per_stage[stage]))
    if item.stage is None:
        return
    if item.kind == "mask-folder":
        item.ignored = [k for k, v in item.entries[item.stage] if v is None or v is _UNKNOWN]
        item.entries[item.stage] = [(k, v) for k, v in item.entries[item.stage] if not (v is None or v is _UNKNOWN)]


def _decide(item: Found, keys, per_stage, hint, plan: Plan) -> tuple[str | None, str]:
    stages = labels_mod.STAGE_NAMES
    if item.kind == "labelmap":
        if hint:
            return hint, f"named after the {hint} stage"
        if any(v > 2 for v in keys):
            return "vertebrae", "label values above 2"
        plan.ask(item, f"label map with values {_listed(keys) or 'none'} and no stage word in its name fits "
                       "both stages", stages)
        return None, ""
    hits = {s: [k for k, v in zip(keys, per_stage[s]) if v is not _UNKNOWN and v is not None] for s in stages}
    if item.kind == "mask-folder":
        found = [s for s in stages if hits[s]]
        if len(found) == 1:
            return found[0], f"its structures are {found[0]}"
        if len(found) == 2:
            plan.ask(item, f"mask folder holds structures of both stages ({_listed(hits['vertebrae'])}; "
                           f"{_listed(hits['metastases'])})", stages)
            return None, ""
        if hint:
            return hint, f"named after the {hint} stage"
        plan.ask(item, "mask folder holds no structure of either stage", stages)
        return None, ""
    fits = [s for s in stages if all(v is not _UNKNOWN for v in per_stage[s])]
    if len(fits) == 1:
        return fits[0], f"its segment names are {fits[0]}"
    if len(fits) == 2 or not any(hits.values()):
        if hint:
            return hint, f"named after the {hint} stage"
        what = "has no segments" if not keys else f"segment names {_listed(keys)} fit " + \
            ("both stages" if len(fits) == 2 else "neither stage")
        plan.ask(item, f"{_kind_name(item)} {what}, and its name has no stage word", stages)
        return None, ""
    partial = [s for s in stages if hits[s]]
    if len(partial) == 2:
        plan.ask(item, f"segment names fit both stages: {_listed(hits['vertebrae'])} (vertebrae), "
                       f"{_listed(hits['metastases'])} (metastases)", stages)
        return None, ""
    return partial[0], f"its known segment names are {partial[0]}"


def _listed(keys) -> str:
    return ", ".join(repr(k) if isinstance(k, str) else str(k) for k in list(keys)[:8]) + \
        (" ..." if len(keys) > 8 else "")


def _segment_names(item: Found, plan: Plan) -> list[str] | None:
    """Segment names from the header of a .seg.nrrd (``SegmentN_Name``, as slicerio reads them;
    the voxels are not read)."""
    import nrrd

    try:
        with open(item.path, "rb") as fh:  # a file object: pynrrd takes a str with a line break for header text
            header = nrrd.read_header(fh)
    except Exception as exc:  # pynrrd raises several types for damaged files
        plan.ask(item, f"cannot read 3D Slicer segmentation header: {one_line(exc)[:200]}", [None])
        return None
    indices = sorted(int(m.group(1)) for key in header if (m := re.fullmatch(r"Segment(\d+)_ID", str(key))))
    names = [str(header.get(f"Segment{i}_Name") or header[f"Segment{i}_ID"]) for i in indices]
    utf8 = header_segment_names(item.path)  # pynrrd drops the non-ASCII characters of names
    return utf8 if utf8 is not None and len(utf8) == len(names) else names


def _dicom_segment_names(item: Found, plan: Plan) -> list[str] | None:
    """Segment Labels of a DICOM-SEG, from its header (the pixel data is not read)."""
    import pydicom

    from spinemets.formats.dicomseg import segment_labels

    try:
        ds = pydicom.dcmread(str(item.path), stop_before_pixels=True)
        return list(segment_labels(ds, item.path).values())
    except SpinemetsError as exc:
        plan.ask(item, str(exc).split(": ", 1)[-1], [None])
    except Exception as exc:  # pydicom raises several types for damaged files
        plan.ask(item, f"cannot read DICOM-SEG header: {one_line(exc)[:200]}", [None])
    return None


def _label_values(item: Found) -> np.ndarray:
    values = _voxels(item.path)
    if values.dtype.kind == "f":
        if not np.all(np.isfinite(values)) or not np.array_equal(values, np.round(values)):
            raise SpinemetsError(f"{item.path}: label map holds non-integer values")
        values = values.astype(np.int64)
    if values.size and values.min() < 0:
        raise SpinemetsError(f"{item.path}: label map holds negative values")
    return values


def _value_mapping(item: Found, user: Mapping | None) -> dict | None:
    """The mapping that applies to the values of a label map: its built-in one under the user's."""
    if item.mapping:
        return {**labels_mod.NAMED_MAPPINGS[item.mapping], **(user or {})}
    return dict(user) if user else None


def _value_target(value: int, stage: str, mapping: Mapping | None):
    """Label of a label-map value as :func:`spinemets.labels.map_label_values` maps it (None: left out)."""
    if not mapping:
        return value if value in labels_mod.labels(stage).values() else _UNKNOWN
    target = mapping.get(value, mapping.get(str(value)))
    if isinstance(target, labels_mod.Refused):
        return _UNKNOWN
    if target is None:
        return None
    try:
        return labels_mod.resolve_segment_name(target, stage)
    except (KeyError, SpinemetsError):
        return _UNKNOWN


def structure_files(folder: str | Path) -> list[Path]:
    """The per-structure mask files of a mask folder, sorted (the structure name is the file name
    without suffix: ``vertebrae_L1.nii.gz`` -> ``vertebrae_L1``)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.name.lower().endswith(STRUCTURE_SUFFIXES) and not p.name.lower().endswith(SLICER_SUFFIX))


def structure_name(path: Path) -> str:
    return _strip_suffix(path.name)


# ---------------------------------------------------------------------------------------------
# cases


def _ancestors(root: Path, path: Path, include_self: bool) -> list[Path]:
    """Folders from just below ``root`` down to ``path``'s folder (or ``path`` itself)."""
    rel = path.relative_to(root)
    parts = rel.parts if include_self else rel.parts[:-1]
    return [root.joinpath(*parts[: i + 1]) for i in range(len(parts))]


def _assign_cases(plan: Plan, cts: list[Found], segs: list[Found], document) -> None:
    root = plan.root
    homes = {id(ct): _ancestors(root, ct.path, ct.path.is_dir()) for ct in cts}
    count = Counter(folder for ct in cts for folder in homes[id(ct)])
    ids: dict[int, str] = {}
    for ct in cts:
        single = [f for f in homes[id(ct)] if count[f] == 1 and f.name.lower() not in CONTAINER_FOLDERS]
        if single:
            ids[id(ct)] = single[0].name
        elif ct.key:
            ids[id(ct)] = ct.key
        else:
            named = [f for f in homes[id(ct)] if f.name.lower() not in CONTAINER_FOLDERS]
            ids[id(ct)] = named[-1].name if named else root.name
    by_folder: dict[Path, list[Found]] = {}
    for ct in cts:
        by_folder.setdefault(ct.folder, []).append(ct)
    for folder, group in by_folder.items():
        # a CT named only "ct" or "image" makes its folder a case folder: another CT there is a second CT of it
        if folder != root and folder.name.lower() not in CONTAINER_FOLDERS and len(group) > 1 and \
                any(not ct.key for ct in group if not ct.path.is_dir()):
            for ct in group:
                ids[id(ct)] = folder.name
    by_id: dict[str, list[Found]] = {}
    for ct in cts:
        by_id.setdefault(ids[id(ct)], []).append(ct)
    for case, group in sorted(by_id.items()):
        if len(group) > 1:
            files = ", ".join(c.rel for c in group)
            for ct in group:
                plan.ask(ct, f"case {case!r} has {len(group)} CTs ({files}); set one to image and the others "
                             "to null in the mapping file's files", ["image", None])
            continue
        plan.cases[case] = {"image": group[0], "segmentations": {}}
    owner_of_ct = {id(ct): ids[id(ct)] for ct in cts}
    claimed: dict[tuple[str, str], list[Found]] = {}
    for seg in segs:
        ct, message = _match(seg, cts, ids, root)
        if ct is None:
            plan.ask(seg, message, [*labels_mod.STAGE_NAMES, None] if "several" in message else [None])
            continue
        case = owner_of_ct[id(ct)]
        if case not in plan.cases:
            continue  # the case's CTs are an open question already
        _assess(seg, plan, document)
        if seg.stage is None:
            _note_unknown(plan, seg, seg.entries)
            continue
        claimed.setdefault((case, seg.stage), []).append(seg)
    for (case, stage), group in sorted(claimed.items()):
        if len(group) > 1:
            files = ", ".join(s.rel for s in group)
            for seg in group:
                plan.ask(seg, f"case {case!r} has {len(group)} {stage} segmentations ({files}); keep one and set "
                              "the others to null in the mapping file's files", [stage, None])
            continue
        seg = group[0]
        plan.cases[case]["segmentations"][stage] = seg
        _note_unknown(plan, seg, {stage: seg.entries.get(stage, [])})


def _note_unknown(plan: Plan, seg: Found, entries: dict) -> None:
    if seg.kind == "mask-folder":
        return  # unknown structures of a mask folder are ignored, not questions
    for stage, pairs in entries.items():
        for key, label in pairs:
            if label is _UNKNOWN:
                plan.unknown[stage].setdefault(key, []).append(seg.rel)


def _match(seg: Found, cts: list[Found], ids: dict, root: Path) -> tuple[Found | None, str]:
    """The CT of a segmentation: by name, else the only CT of its folder or the nearest folder above."""
    if seg.key:
        named = [ct for ct in cts if seg.key in (ct.key, ids[id(ct)])]
        if len(named) == 1:
            return named[0], ""
        if len(named) > 1:
            return None, f"segmentation's name fits several CTs ({', '.join(c.rel for c in named)})"
    folder = seg.folder
    while True:
        inside = [ct for ct in cts if _within(str(ct.path), str(folder))]
        if len(inside) == 1:
            return inside[0], ""
        if len(inside) > 1:
            return None, (f"segmentation has no CT of its name, and {_rel(root, folder)} holds several "
                          f"({', '.join(c.rel for c in inside[:4])}{' ...' if len(inside) > 4 else ''})")
        if folder == root or folder.parent == root:  # the folders below root are cases or containers
            return None, "segmentation has no CT: none of its name, none in its folder or above"
        folder = folder.parent


def _read_split_table(plan: Plan) -> None:
    """TotalSegmentator's meta.csv: ``image_id`` and ``split`` (train, val, test) per case; at the
    scanned folder's top, or in its one sub-folder that has one (the folder its zip unpacks to,
    ``Totalsegmentator_dataset_v201/``)."""
    path = plan.root / SPLIT_TABLE
    if not path.is_file():
        below = [d / SPLIT_TABLE for d in sorted(plan.root.iterdir())
                 if d.is_dir() and not d.name.startswith(".") and (d / SPLIT_TABLE).is_file()]
        if len(below) != 1:
            return
        path = below[0]
        plan.unused = [(rel, why) for rel, why in plan.unused if rel != _rel(plan.root, path)]
    import pandas as pd

    try:
        table = pd.read_csv(path, sep=";", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise SpinemetsError(f"{path}: not a readable ';'-separated table ({one_line(exc)})") from None
    if not {"image_id", "split"} <= set(table.columns):
        plan.unused.append((_rel(plan.root, path), "spreadsheet without the columns image_id and split (not read)"))
        return
    bad = sorted(set(table["split"]) - {"train", "val", "test"})
    if bad:
        raise SpinemetsError(f"{path}: split must be train, val or test, found {bad}")
    plan.split_table = path
    given = dict(zip(table["image_id"], table["split"]))
    plan.splits = {}
    for case in plan.cases:
        if case in given:
            plan.splits[case] = "test" if given[case] == "test" else "train"
        else:
            plan.splits[case] = "train"
            plan.notes[case] = f"not listed in {SPLIT_TABLE}: train"


# ---------------------------------------------------------------------------------------------
# the plan as rows, as text, and the template


def rows(plan: Plan) -> list[dict]:
    """Manifest rows of a plan without open questions: stage by stage, case by case (sorted), source
    case IDs, absolute paths, ``split`` from ``meta.csv`` or ``train``, ``mapping`` (a built-in name or "")."""
    out = []
    for stage in labels_mod.STAGE_NAMES:
        for case in sorted(plan.cases):
            seg = plan.cases[case]["segmentations"].get(stage)
            if seg is not None:
                out.append({"case_id": case, "image": str(plan.cases[case]["image"].path.resolve()),
                            "stage": stage, "segmentation": str(seg.path.resolve()),
                            "split": (plan.splits or {}).get(case, "train"), "mapping": seg.mapping})
    return out


def _kind_name(item: Found) -> str:
    if item.kind == "ct":
        return "DICOM series" if item.path.is_dir() else "image"
    return {"slicer": "3D Slicer segmentation", "labelmap": "label map", "dicomseg": "DICOM-SEG",
            "mask-folder": "mask folder"}.get(item.kind, item.kind)


def describe(plan: Plan) -> str:
    """The plan in words: cases, their files per stage with what each name or value maps to, files not
    used and why, open questions. Case IDs come from file and folder names only."""
    lines = [f"Plan of {plan.root}: {len(plan.cases)} case(s)"]
    if plan.split_table is not None:
        lines.append(f"splits from {plan.split_table.name} (test stays test; train and val are train)")
    for case in sorted(plan.cases):
        entry = plan.cases[case]
        split = (plan.splits or {}).get(case)
        lines.append(f"case {case}" + (f" (split {split})" if split else ""))
        image = entry["image"]
        lines.append(f"  CT: {image.rel} ({_kind_name(image)}{'; ' + image.why if image.why else ''})")
        if not entry["segmentations"]:
            lines.append("  no segmentation")
        for stage in labels_mod.STAGE_NAMES:
            seg = entry["segmentations"].get(stage)
            if seg is None:
                continue
            extra = f"; mapping {seg.mapping}" if seg.mapping else ""
            lines.append(f"  {stage}: {seg.rel} ({_kind_name(seg)}; {seg.why}{extra})")
            for key, label in seg.entries.get(stage, []):
                what = "value" if isinstance(key, int) else "structure" if seg.kind == "mask-folder" else "segment"
                lines.append(f"    {what} {key!r} -> {_shown(stage, label)}")
            if seg.ignored:
                lines.append(f"    ignored structures ({len(seg.ignored)}): {_listed(seg.ignored)}")
        if case in plan.notes:
            lines.append(f"  note: {plan.notes[case]}")
    if plan.unused:
        lines.append(f"Not used ({len(plan.unused)}):")
        lines += [f"  {rel}: {reason}" for rel, reason in sorted(plan.unused)]
    questions = plan.open_questions()
    if questions:
        lines.append(f"Open questions ({len(questions)}); answer them in the mapping template:")
        lines += [f"  {q}" for q in questions]
    else:
        lines.append("No open questions: `spinemets scan` writes this plan as the manifest.")
    return "\n".join(lines) + "\n"


def _yaml_key(key) -> str:
    return yaml.safe_dump({key: None}, default_flow_style=False, allow_unicode=True).strip()[: -len(" null")]


def template_text(plan: Plan, mapping=None) -> str:
    """The mapping template of a plan: every open question with null and a comment (see the module doc).
    The entries of ``mapping`` (the one the plan was made with) are kept."""
    document = labels_mod.mapping_document(mapping)
    out = [f"# spinemets mapping template for {plan.root}",
           "# Written by `spinemets scan --explain`. Answer each null below, set `reviewed: true`, then run",
           f"#   spinemets scan {plan.root} --out manifest.csv --mapping THIS_FILE",
           "#   spinemets import --manifest manifest.csv --stage STAGE --mapping THIS_FILE ...",
           "# A null left in place ignores the segment or leaves the file out.",
           f"{labels_mod.TEMPLATE_KEY}: {labels_mod.TEMPLATE_VERSION}",
           "reviewed: false",
           "# root: the folder these files are in (its files section applies to no other folder)",
           f"root: {_yaml_key(str(plan.root.resolve()))[:-1]}",
           "# files: path relative to the scanned folder -> image (the CT), vertebrae, metastases",
           "# (a segmentation of that stage), or null (leave the file out).",
           "files:"]
    files = dict(document["files"])
    questions = {rel: q for rel, q in plan.questions.items()}
    for rel in sorted(set(files) | set(questions)):
        if rel in questions:
            message, choices = questions[rel]
            shown = ", ".join("null" if c is None else c for c in choices) or "null"
            out.append(f"  {_yaml_key(rel)} {yaml.safe_dump(files.get(rel)).splitlines()[0]}"
                       f"  # choices: {shown}; {one_line(message)}")
        else:
            out.append(f"  {_yaml_key(rel)} {yaml.safe_dump(files[rel]).splitlines()[0]}")
    if not files and not questions:
        out[-1] = "files: {}"
    for stage in labels_mod.STAGE_NAMES:
        known = ", ".join(labels_mod.foreground_labels(stage))
        out.append(f"# {stage}: segment name, structure name or label value -> a label ({known}), or null "
                   "to ignore it.")
        given = dict(document["stages"][stage] or {}) if document["template"] else {}
        unknown = plan.unknown[stage]
        keys = sorted(set(given) | set(unknown), key=lambda k: (isinstance(k, str), str(k)))
        if not keys:
            out.append(f"{stage}: {{}}")
            continue
        out.append(f"{stage}:")
        for key in keys:
            value = yaml.safe_dump(given.get(key)).splitlines()[0]
            comment = ""
            if key in unknown:
                rels = unknown[key]
                comment = f"  # seen in {rels[0]}" + (f" and {len(rels) - 1} more file(s)" if len(rels) > 1 else "")
                if isinstance(key, int) and labels_mod.VERSE_TO_VERTEBRAE.get(key) and \
                        isinstance(labels_mod.VERSE_TO_VERTEBRAE[key], labels_mod.Refused):
                    comment += f"; under the verse mapping: {labels_mod.VERSE_TO_VERTEBRAE[key].meaning}"
            out.append(f"  {_yaml_key(key)} {value}{comment}")
    return "\n".join(out) + "\n"


def explain(root: str | Path, mapping=None, template: str | Path | None = None) -> str:
    """Dry run of :func:`spinemets.cohort.dataset.scan`: the plan of ``root`` in words (:func:`describe`).

    No manifest is written. With ``template``, the mapping template (:func:`template_text`) is
    written there (atomically), and the text says so. Returns the text.
    """
    from spinemets.fileio import check_output_file

    if template is not None:
        check_output_file(template, "mapping template")
        if mapping is not None and not isinstance(mapping, Mapping) and Path(mapping).exists() and \
                Path(template).exists() and Path(template).resolve() == Path(mapping).resolve():
            raise SpinemetsError(f"{template}: the mapping template would overwrite the mapping file given "
                                 "with --mapping; give another --mapping-template")
    plan = discover(root, mapping)
    text = describe(plan)
    if template is not None:
        write_text(template, template_text(plan, mapping))
        text += f"Wrote the mapping template {template}\n"
    return text
