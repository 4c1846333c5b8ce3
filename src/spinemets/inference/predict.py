"""Two-stage inference and vertebra-level localization of the predicted lesions.

The inference step: it serves the command ``spinemets predict`` and the inference notebook (``04_inference``).

:func:`predict` runs, per CT:

1. **Stage 1** (vertebrae): nnU-Net segments C1...Sacrum (labels 1-25) on the whole CT, with the
   run's trained model, or TotalSegmentator's public model (``vertebrae="totalsegmentator"``,
   :mod:`spinemets.inference.totalseg`).
2. **Stage 2** (metastases, lytic 1 / sclerotic 2): on the whole CT (``roi="none"``, as in the
   paper, which also found sternal lesions), or on the bounding box of the stage-1 vertebrae
   grown by ``margin_mm`` on every side (``roi="spine"``), pasted back into an empty map of the
   CT's size. With ``roi="spine"`` and no vertebra found, stage 2 runs on the whole CT (noted in
   the provenance). A part of a predicted lesion that is of the other type and smaller than
   ``min_lesion_ml`` then takes the lesion's main type (:func:`merge_small_type_parts`: a few
   lytic voxels on the rim of a sclerotic lesion are not a lytic lesion), and predicted lesions
   smaller than ``min_lesion_ml`` are cleared (:func:`remove_small_lesions`; the demo profile's
   0.3 mL is four fifths of its smallest synthetic lesion, 0.375 mL; the paper profile changes
   nothing); where the profile asks for it (the demo), so are the lesions that touch no predicted
   vertebra (:func:`spinemets.inference.postprocessing.remove_lesions_outside_spine`). Likewise, fragments of a
   vertebra label smaller than ``min_vertebra_ml`` are cleared from the stage-1 map, and, where
   the profile asks for it (the demo), its labels are put in the spine's order
   (:func:`spinemets.inference.postprocessing.repair_vertebra_order`).
3. **Localization** (:func:`localize`): each lesion is a connected component (26-connectivity) of
   the lesion mask, lytic and sclerotic voxels together, so a component with both is *mixed*.
   Its level is the vertebra label with the largest overlap; without overlap, the vertebra of the
   nearest vertebra voxel when that lies within ``near_mm`` millimetres of the lesion (Euclidean
   distance in mm); otherwise ``outside spine``. Volume in mL = voxels x voxel volume (mm^3) / 1000;
   mean and max HU over the component's CT voxels.
4. **Partial SINS** (:func:`partial_sins`): of the six components of the Spinal Instability
   Neoplastic Score (Fisher et al., Spine 2010;35(22):E1221-9), the two that imaging of the lesion
   and its level alone fix: *location* (junctional C0-C2, C7-T2, T11-L1, L5-S1 = 3; mobile C3-C6,
   L2-L4 = 2; semi-rigid T3-T10 = 1; rigid S2-S5 = 0) and *bone lesion quality* (lytic 2, mixed 1,
   blastic 0). Pain, alignment, vertebral body collapse and posterolateral involvement are not
   assessed, so the sum is **not a SINS score**. Our "Sacrum" label holds S1 (junctional, 3) and
   S2-S5 (rigid, 0): its location points are left empty.
5. **Confidence** (:func:`detection_map`): each lesion (the component of step 3) gets a detection
   score from the lesion stage's class probabilities (nnU-Net's softmax; the mean over the members
   of an ensemble; the cascade's full-resolution stage), taken after the same clean-up: the
   **maximum, over the lesion's voxels, of the probability of the class each voxel is labelled
   with**. Lesions below ``min_confidence`` are then cleared (the profile's default, 0, clears
   none, so the label maps stay what they were). A stage that gives labels only has confidence 1
   for every lesion (its one-hot probabilities).

Outputs in ``out_dir``: per case ``CASE/vertebrae.nii.gz``, ``CASE/metastases.nii.gz`` (label
maps on the CT grid), ``CASE/metastases_confidence.nii.gz`` (the detection map: float32, each
lesion's voxels hold its confidence, 0 elsewhere), ``CASE/vertebrae.seg.nrrd`` and
``CASE/metastases.seg.nrrd`` (named, coloured segments for 3D Slicer), for a DICOM series input also
``CASE/vertebrae.dcm`` and ``CASE/metastases.dcm`` (DICOM-SEG referencing the series; none for an
empty label map) and ``CASE/report.dcm`` (the lesion report as a DICOM SR, :mod:`spinemets.formats.dicomsr`),
``CASE/lesions.csv``, ``CASE/vertebrae.csv``; for the cohort
``lesions.csv``, ``vertebrae.csv`` and ``provenance.json`` (command, parameters, versions, model
folders, per-case timings, and per DICOM case the DICOM objects written, or why none were:
``dicom_outputs``). Every file is written atomically. A DICOM series is checked before any model
runs (:func:`spinemets.formats.dicom.check_series`): refused in one line, or predicted without DICOM
outputs when its headers could not be referenced validly (UIDs blanked by an anonymiser).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import cc3d
import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from spinemets import domain as domain_mod
from spinemets.errors import SpinemetsError, one_line, unknown_choice
from spinemets.fileio import check_case_id, check_output_dir, describe_path, require_file, write_csv, write_json
from spinemets.formats import dicom as dicom_mod
from spinemets.formats.dicom import check_series, read_series_headers
from spinemets.formats.dicomseg import write_dicom_seg
from spinemets.formats.dicomsr import SR_FILE, write_lesion_report
from spinemets.formats.images import ijk_to_lps, image_from_array, read_image, write_image
from spinemets.formats.slicer import segmentation_from_labelmap
from spinemets.inference.localization import NEAR_MM, localize, vertebra_table
from spinemets.inference.postprocessing import (check_min_ml, merge_small_type_parts, remove_lesions_outside_spine,
                                                remove_small_components, remove_small_lesions, repair_vertebra_order)
from spinemets.labels import LESION_COLUMNS, PARTIAL_SINS_LABEL, STAGE_NAMES, VERTEBRA_COLUMNS
from spinemets.paths import CONFIDENCE_NAME, workspace_of
from spinemets.provenance import provenance
from spinemets.training import nnunet
from spinemets.training.profiles import get_profile
from spinemets.training.programs import captured_output

log = logging.getLogger(__name__)

ROI_MODES = ("none", "spine")
#: Default margin around the spine's bounding box for ``roi="spine"`` (mm).
MARGIN_MM = 20.0
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


# --------------------------------------------------------------------------------------------
# Localization and partial SINS (pure functions on arrays; tested on hand-made label maps)
# --------------------------------------------------------------------------------------------


def detection_map(lesions: np.ndarray, probabilities: np.ndarray | None,
                  box: tuple[slice, ...] | None = None) -> np.ndarray:
    """The detection map of a lesion label map: float32, each lesion's voxels hold its confidence, 0 elsewhere.

    A lesion is a 26-connected component of ``lesions > 0`` (both types together, as
    :func:`localize`); its confidence is the maximum over its voxels of ``probabilities[c, voxel]``,
    c the voxel's label. ``probabilities`` (classes, z, y, x) covers ``box`` of ``lesions`` (the
    whole array when None); None gives every lesion confidence 1.
    """
    out = np.zeros(lesions.shape, dtype=np.float32)
    if probabilities is None:
        out[lesions > 0] = 1.0
        return out
    inner = lesions if box is None else lesions[box]
    if probabilities.shape[1:] != inner.shape or probabilities.shape[0] <= int(inner.max(initial=0)):
        raise SpinemetsError(f"class probabilities of shape {probabilities.shape} do not fit the lesion map "
                             f"{inner.shape} with labels up to {int(inner.max(initial=0))}")
    components, n = cc3d.connected_components(inner > 0, connectivity=26, return_N=True)
    if n == 0:
        return out
    fg = components > 0
    labels_fg = inner[fg].astype(np.int64)
    voxel_p = probabilities[(labels_fg, *np.nonzero(fg))]  # each voxel's probability of its own label
    best = np.zeros(n + 1, dtype=np.float64)
    np.maximum.at(best, components[fg], voxel_p.astype(np.float64))
    view = out if box is None else out[box]
    view[fg] = best[components[fg]].astype(np.float32)
    return out


def check_min_confidence(value) -> None:
    """Refuse a ``min_confidence`` outside [0, 1] (the one check of ``--min-confidence``)."""
    if not (0.0 <= float(value) <= 1.0):
        raise SpinemetsError(f"--min-confidence: must be between 0 and 1, not {value!r}")


def remove_unconfident_lesions(lesions: np.ndarray, confidence: np.ndarray, min_confidence: float):
    """Clear the lesions whose confidence is below ``min_confidence``; returns (lesions, detection map,
    number of lesions removed).

    The inputs are not modified; with ``min_confidence`` 0 they come back as they are.
    """
    check_min_confidence(min_confidence)
    low = (confidence < min_confidence) & (lesions > 0)
    if not low.any():
        return lesions, confidence, 0
    removed = cc3d.connected_components(low, connectivity=26, return_N=True)[1]
    kept = np.where(low, 0, lesions).astype(lesions.dtype)
    return kept, np.where(low, 0, confidence).astype(np.float32), int(removed)


# --------------------------------------------------------------------------------------------
# Inputs and the two stages
# --------------------------------------------------------------------------------------------


def find_inputs(input: str | Path | Sequence[str | Path]) -> dict[str, Path]:
    """Case ID -> CT path: one image file, a folder of image files (case = name without suffix), a
    folder of case folders holding ``ct.nrrd`` (the synthetic cohort's layout), one DICOM series
    folder (case = its name), or a folder of case folders each holding exactly one DICOM image
    series at any depth (TCIA's ``<case>/<study>/<series>/1-001.dcm``; SEG and other non-image
    series are not CTs; case = the case folder's name, never a DICOM header). ``.seg.nrrd`` files are skipped.
    A list of these gives all their cases (the held-out CTs of two stages whose data differ).

    Every case ID passes the one rule of :func:`spinemets.fileio.check_case_id`; a broken link is
    reported as one, and two files of one case are an error.
    """
    if isinstance(input, (list, tuple)):
        if not input:
            raise SpinemetsError("input: an empty list of CTs or folders")
        cases: dict[str, Path] = {}
        for item in input:
            for case, path in find_inputs(item).items():
                if case in cases and Path(cases[case]).resolve() != Path(path).resolve():
                    raise SpinemetsError(f"{path}: second CT of case {case!r} (also {cases[case]})")
                cases[case] = path
        return cases
    input = Path(input)
    kind = describe_path(input)
    if kind in ("missing", "broken link"):
        require_file(input, "input")
    if kind == "file":
        if not input.name.lower().endswith(IMAGE_SUFFIXES) or input.name.lower().endswith(".seg.nrrd"):
            raise SpinemetsError(f"{input}: input is not a CT image ({', '.join(IMAGE_SUFFIXES)}) or a folder")
        return {check_case_id(_case_of(input), input): input}
    if _is_dicom_series(input):
        return {check_case_id(input.name, input): input}
    cases: dict[str, Path] = {}
    for path in sorted(input.iterdir()):
        if path.name.startswith("."):
            continue
        if path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.lower().endswith(".seg.nrrd"):
            found = require_file(path, "CT image")
            case = _case_of(path)
        elif path.is_dir() and (path / "ct.nrrd").exists():
            found, case = path / "ct.nrrd", path.name
        elif path.is_dir() and (series := _dicom_series_below(path)):
            if len(series) > 1:
                shown = ", ".join(str(s.relative_to(path)) for s in series[:3]) + (" ..." if len(series) > 3 else "")
                raise SpinemetsError(f"{path}: case folder holds {len(series)} DICOM image series ({shown}); "
                                     "leave one CT series per case folder, or give the series folder itself")
            found, case = series[0], path.name
        else:
            continue
        check_case_id(case, found)
        if case in cases:
            raise SpinemetsError(f"{found}: second CT of case {case!r} (also {cases[case]})")
        cases[case] = found
    if not cases:
        raise SpinemetsError(f"{input}: no CT images ({', '.join(IMAGE_SUFFIXES)}), case folders with ct.nrrd "
                             "or DICOM series folders")
    return cases


#: DICOM modalities whose series are no CT to predict on (segmentations, structure sets, reports ...).
NOT_IMAGE_MODALITIES = dicom_mod.NOT_IMAGE_MODALITIES


def _is_dicom_series(folder: Path) -> bool:
    """Whether ``folder`` directly holds the files of a DICOM image series (a DICOM file whose
    Modality is no SEG, RTSTRUCT ...)."""
    from spinemets.formats.dicom import dicom_modality, is_dicom_file

    try:
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    except OSError:
        return False
    # any image file decides (an existing SEG or report beside the slices is no reason to skip them)
    return any(dicom_modality(p) not in NOT_IMAGE_MODALITIES for p in files if is_dicom_file(p))


def _dicom_series_below(folder: Path) -> list[Path]:
    """The DICOM image series folders at or below ``folder``, sorted (hidden folders skipped)."""
    found = []
    for current, subfolders, _ in os.walk(folder):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        if _is_dicom_series(Path(current)):
            found.append(Path(current))
    return sorted(found)


def check_inputs(cases: dict[str, Path]) -> None:
    """Read and check every CT before any model is loaded (:func:`spinemets.formats.images.read_image`; a DICOM
    series also by :func:`spinemets.formats.dicom.check_series`), so that a bad case fails the command
    before the first case is written."""
    for path in cases.values():
        if Path(path).is_dir():  # a DICOM series: refused before any model runs if it cannot be predicted on
            check_series(path)
        read_image(path, "CT")


def _case_of(path: Path) -> str:
    name = path.name
    for suffix in IMAGE_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


class _Stage:
    """The predictor(s) of one stage; an ensemble averages the probabilities of its members.

    A cascade member (``3d_cascade_fullres``) first runs its previous stage (``3d_lowres`` of the
    same trainer and folds) and is given that segmentation, as nnU-Net's own prediction does.
    Where ``nnUNetv2_find_best_configuration`` chose a postprocessing for the selected model
    (:func:`spinemets.training.nnunet.selected_postprocessing`), it is applied to the result, as nnU-Net's
    ``nnUNetv2_apply_postprocessing`` would.
    """

    def __init__(self, stage: str, profile: str, workspace, device: str, tta: bool, threads: int | None = None,
                 model=None):
        ws = self.workspace = workspace_of(workspace)
        if model is not None:  # a shared model (spinemets.training.sharing.Model): its card names the models
            self.models = model.stage_models(stage)
            self.domain = domain_mod.training_domain(self.models[0]["folder"])
            self.postprocessing = model.postprocessing(stage)
        else:
            self.models = nnunet.trained_models(stage, profile, workspace)
            #: What the model was trained on (:mod:`spinemets.domain`), for the domain check of each input.
            self.domain = domain_mod.training_domain(self.models[0]["folder"], ws.raw / ws.dataset_name(stage))
            self.postprocessing = nnunet.selected_postprocessing(stage, profile, workspace)
        self.members = []
        for model in self.models:
            predictor = nnunet.load_predictor(model, device=device, tta=tta, workspace=workspace, threads=threads)
            previous = predictor.configuration_manager.previous_stage_name
            first = None
            if previous:
                folder = Path(model["folder"]).with_name(Path(model["folder"]).name.replace(model["configuration"], previous))
                first = nnunet.load_predictor({**model, "folder": str(folder), "configuration": previous},
                                              device=device, tta=tta, workspace=workspace, threads=threads)
            self.members.append((first, predictor))

    def __call__(self, array: np.ndarray, spacing_zyx: Sequence[float]) -> np.ndarray:
        segmentation = self._predict(array, spacing_zyx)
        if self.postprocessing is not None:
            segmentation = nnunet.apply_postprocessing(segmentation, self.postprocessing)
        return segmentation

    def with_probabilities(self, array: np.ndarray, spacing_zyx: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """The segmentation, as :meth:`__call__` gives it, and the class probabilities it was taken from:
        float32 (classes, z, y, x) on the input's grid (the mean over the members of an ensemble)."""
        segmentation, probabilities = self._predict(array, spacing_zyx, probabilities=True)
        if self.postprocessing is not None:
            segmentation = nnunet.apply_postprocessing(segmentation, self.postprocessing)
        return segmentation, probabilities

    #: The workspace whose ``logs/`` receive nnU-Net's messages (:func:`spinemets.training.programs.captured_output`).
    workspace = None

    def _predict(self, array: np.ndarray, spacing_zyx: Sequence[float], probabilities: bool = False):
        if self.workspace is None:
            return self._predict_members(array, spacing_zyx, probabilities)
        with captured_output(self.workspace, "nnUNetPredictor"):  # its messages into a log, where asked
            return self._predict_members(array, spacing_zyx, probabilities)

    def _predict_members(self, array: np.ndarray, spacing_zyx: Sequence[float], probabilities: bool = False):
        props = {"spacing": [float(s) for s in spacing_zyx]}
        data = array[None].astype(np.float32)
        probs = None
        for first, predictor in self.members:
            previous = None
            if first is not None:  # as nnU-Net reads the previous stage's map: one float channel, (1, z, y, x)
                previous = np.asarray(first.predict_single_npy_array(data, dict(props)), dtype=np.float32)[None]
            if len(self.members) == 1 and not probabilities:
                return np.asarray(predictor.predict_single_npy_array(data, dict(props), previous), dtype=np.uint8)
            seg, p = predictor.predict_single_npy_array(data, dict(props), previous, save_or_return_probabilities=True)
            if len(self.members) == 1:  # nnU-Net's own segmentation of its probabilities
                return np.asarray(seg, dtype=np.uint8), np.asarray(p, dtype=np.float32)
            probs = p if probs is None else probs + p
        segmentation = np.argmax(probs, axis=0).astype(np.uint8)
        if probabilities:
            return segmentation, (np.asarray(probs, dtype=np.float32) / len(self.members))
        return segmentation


def spine_box(vertebrae: np.ndarray, spacing_zyx: Sequence[float], margin_mm: float) -> tuple[slice, ...] | None:
    """Bounding box of the vertebra voxels grown by ``margin_mm`` per side, clipped to the array; None when empty."""
    where = np.nonzero(vertebrae)
    if not where[0].size:
        return None
    box = []
    for axis, idx in enumerate(where):
        pad = int(np.ceil(margin_mm / float(spacing_zyx[axis])))
        box.append(slice(max(0, idx.min() - pad), min(vertebrae.shape[axis], idx.max() + 1 + pad)))
    return tuple(box)


@dataclass(frozen=True)
class PredictOptions:
    """How :func:`predict` runs, as one object; ``None`` means the profile's value.

    ``roi``: the lesion stage on the whole CT (``"none"``, as the paper) or on the spine's box
    grown by ``margin_mm`` (``"spine"``). ``near_mm``: the largest distance from a lesion to the
    vertebra it is localized to without overlap. ``tta``: nnU-Net's mirroring (where the trainer
    allows it). ``threads``: torch's CPU threads for this process (default: torch's own choice; 1
    is faster on a CPU that other processes keep busy). ``min_lesion_ml`` gives a lesion's parts
    of the other type smaller than that the lesion's main type (:func:`merge_small_type_parts`)
    and clears predicted lesions smaller than that before localization (:func:`remove_small_lesions`),
    ``min_vertebra_ml`` the fragments of a vertebra label smaller than that
    (:func:`remove_small_components`, label by label: a vertebra is one connected object, and
    specks of a neighbour's label at its border would each count as a whole false vertebra);
    both default to the profile's (``min_lesion_ml``, ``min_vertebra_ml`` of
    :data:`spinemets.training.profiles.PROFILES`; 0, nothing removed, for the paper profile).
    ``repair_order`` makes the vertebra labels follow the spine's order
    (:func:`spinemets.inference.postprocessing.repair_vertebra_order`; default: the profile's
    ``repair_vertebra_order``, on in the demo, off in the paper profile). ``min_confidence`` clears
    predicted lesions whose confidence (:func:`detection_map`) is below it (default: the profile's
    ``min_confidence``, 0 in every profile: nothing cleared). ``spine_only`` clears the predicted
    lesions that overlap no predicted vertebra and lie further than ``spine_margin_mm`` from every
    one (0: each kept lesion touches a vertebra; :func:`remove_lesions_outside_spine`; default: the
    profile's ``spine_only`` and ``spine_margin_mm``, on with 0 mm in the demo, off in the paper
    profile, whose authors also found sternal lesions).
    """

    roi: str = "none"
    margin_mm: float = MARGIN_MM
    near_mm: float = NEAR_MM
    tta: bool = False
    threads: int | None = None
    min_lesion_ml: float | None = None
    min_vertebra_ml: float | None = None
    repair_order: bool | None = None
    min_confidence: float | None = None
    spine_only: bool | None = None
    spine_margin_mm: float | None = None

    def resolved(self, profile) -> "PredictOptions":
        """These options with the profile's values in place of ``None``, checked. ``profile``: a training
        profile's name, or its entries (a shared model's inference settings)."""
        if self.roi not in ROI_MODES:
            raise unknown_choice("roi mode", self.roi, ROI_MODES, "--roi")
        prof = profile if isinstance(profile, dict) else get_profile(profile)
        out = replace(
            self,
            min_lesion_ml=float(prof.get("min_lesion_ml", 0.0) if self.min_lesion_ml is None else self.min_lesion_ml),
            min_vertebra_ml=float(prof.get("min_vertebra_ml", 0.0) if self.min_vertebra_ml is None
                                  else self.min_vertebra_ml),
            repair_order=bool(prof.get("repair_vertebra_order", False) if self.repair_order is None
                              else self.repair_order),
            min_confidence=float(prof.get("min_confidence", 0.0) if self.min_confidence is None
                                 else self.min_confidence),
            spine_only=bool(prof.get("spine_only", False) if self.spine_only is None else self.spine_only),
            spine_margin_mm=float(prof.get("spine_margin_mm", NEAR_MM) if self.spine_margin_mm is None
                                  else self.spine_margin_mm))
        if not (np.isfinite(out.spine_margin_mm) and out.spine_margin_mm >= 0):
            raise SpinemetsError(f"--spine-margin-mm: a distance >= 0 mm, not {out.spine_margin_mm!r}")
        for value in (out.min_lesion_ml, out.min_vertebra_ml):
            check_min_ml(value)
        check_min_confidence(out.min_confidence)
        return out


def predict(input: str | Path | Sequence[str | Path], out_dir: str | Path, profile: str = "demo", workspace=None,
            device: str | None = None, options: PredictOptions | None = None, model=None,
            vertebrae: str = "trained") -> list[dict]:
    """Two-stage prediction, localization and partial SINS for one CT or a folder (or a list of
    them, :func:`find_inputs`); return the cohort's lesion rows.

    ``profile`` picks the trained models (:func:`spinemets.training.nnunet.trained_models`); ``device``
    defaults to the profile's; ``options`` (:class:`PredictOptions`) say how the stages run and
    what is cleaned up. Every input is read and checked, and the options resolved, before any
    model is loaded. The numbers removed and relabelled per case are in the provenance.
    ``model``: an exported model (an archive or an installed folder, :mod:`spinemets.training.sharing`)
    instead of the profile's trained models; its card's inference settings replace the profile's,
    its domain records are checked against, and the device defaults to the best one available.
    ``vertebrae``: where stage 1 comes from (:data:`spinemets.labels.VERTEBRA_SOURCES`): the
    trained model (``trained``) or TotalSegmentator's public model (``totalsegmentator``, or
    ``totalsegmentator-fast`` for its 3 mm model; :mod:`spinemets.inference.totalseg`); with
    TotalSegmentator the vertebra labels are not put in order unless ``options`` ask for it.
    """
    from spinemets.inference.totalseg import TotalSegmentatorStage, check_source, installed_version

    ready_made = check_source(vertebrae)
    if ready_made is not None:
        installed_version()  # a missing TotalSegmentator is said before anything is read
    shared = None
    if model is not None:
        from spinemets.training.sharing import open_model

        shared = open_model(model)
    prof = shared.settings() if shared else get_profile(profile)
    opts = (options or PredictOptions()).resolved(prof)
    if ready_made is not None and (options is None or options.repair_order is None):
        opts = replace(opts, repair_order=False)  # TotalSegmentator's labels are its own, not reordered
    cases = find_inputs(input)
    out_dir = check_output_dir(out_dir, "prediction folder")
    for item in input if isinstance(input, (list, tuple)) else [input]:
        source = Path(item).resolve()
        if source.is_dir() and (out_dir.resolve() == source or source in out_dir.resolve().parents):
            raise SpinemetsError(f"{out_dir}: prediction folder lies inside the input folder {item}; "
                                 "write predictions elsewhere (they would sit beside, or replace, source files)")
    check_inputs(cases)
    device = device or prof.get("device") or nnunet.best_device()
    started = time.perf_counter()
    stage1 = (_Stage("vertebrae", profile, workspace, device, opts.tta, opts.threads, shared) if ready_made is None
              else TotalSegmentatorStage(device, fast=ready_made["fast"], workspace=workspace))
    stages = (stage1, _Stage("metastases", profile, workspace, device, opts.tta, opts.threads, shared))
    all_lesions, all_vertebrae, timings, notes, reports, dicom_outputs = [], [], {}, {}, {}, {}
    records = {stage: getattr(model, "domain", None) for stage, model in zip(("vertebrae", "metastases"), stages)}
    for case, path in tqdm(cases.items(), desc="predict", unit="case"):
        t0 = time.perf_counter()
        result = predict_case(path, out_dir / case, case, stages, opts, records)
        reports[case] = result.domain
        if result.dicom_outputs is not None:
            dicom_outputs[case] = result.dicom_outputs
        timings[case] = {**result.timings, "total_s": round(time.perf_counter() - t0, 3)}
        if result.note:
            notes[case] = result.note
        all_lesions += result.lesions
        all_vertebrae += result.vertebrae
    write_csv(out_dir / "lesions.csv", all_lesions, LESION_COLUMNS)
    write_csv(out_dir / "vertebrae.csv", all_vertebrae, VERTEBRA_COLUMNS)
    write_json(out_dir / "provenance.json", _provenance(
        locals_={"input": [str(i) for i in input] if isinstance(input, (list, tuple)) else str(input), "out_dir": str(out_dir), "profile": None if shared else profile, "device": device, "vertebrae": vertebrae, **asdict(opts)},
        shared_model=shared.record() if shared else None, stages=dict(zip(STAGE_NAMES, stages)), timings=timings,
        notes=notes, seconds=time.perf_counter() - started,
        domain={"training": domain_mod.summary(records), "cases": reports}, dicom_outputs=dicom_outputs))
    outside = [case for case, report in reports.items() if not report["in_domain"]]
    if outside:
        _loud(f"{len(outside)} of {len(reports)} case(s) are outside the training domain of the models "
              f"({', '.join(outside[:5])}{' ...' if len(outside) > 5 else ''}); see the domain_warning column "
              f"and {out_dir / 'provenance.json'}")
    return all_lesions


def _loud(message: str) -> None:
    """A warning that must not scroll past unseen: logged at WARNING, which reaches standard error
    also where nothing configured logging (a notebook: Python's last-resort handler)."""
    log.warning("WARNING: %s", message)


class CaseResult(NamedTuple):
    """What :func:`predict_case` returns for one case: its ``lesions`` and ``vertebrae`` rows, a ``note``
    (empty, or why a stage found nothing), the ``timings`` (seconds and counts of the clean-up), the
    ``domain`` report of :func:`spinemets.domain.check_case`, and ``dicom_outputs`` (for a DICOM series:
    ``written``, ``not_written``: the reason, ``repaired``; None for an image file)."""

    lesions: list[dict]
    vertebrae: list[dict]
    note: str
    timings: dict
    domain: dict
    dicom_outputs: dict | None


def predict_case(path: Path, case_dir: Path, case: str, stages, options: PredictOptions,
                 domains: dict | None = None) -> CaseResult:
    """Both stages and localization for one CT; writes the case folder.

    ``stages`` is (stage 1, stage 2), each called as ``stage(ct_array, spacing_zyx)``; ``options``
    are resolved :class:`PredictOptions`; ``domains`` the training domain record of each stage
    (:mod:`spinemets.domain`; None: no check). Returns a :class:`CaseResult` (lesions, vertebrae,
    note, timings, domain report, DICOM outputs); timings also count the small lesions and vertebra fragments removed, the
    lesion parts given their lesion's main type, and the
    vertebra voxels relabelled by the order repair. A CT outside a training domain is predicted
    as any other; the warning goes into its rows, its ``.seg.nrrd`` descriptions and the log.
    When ``path`` is a DICOM series folder, each stage is also written as a DICOM-SEG
    (``vertebrae.dcm``, ``metastases.dcm``; :func:`spinemets.formats.dicomseg.write_dicom_seg`) that
    references the series, with the ``.seg.nrrd``'s description (cut to 64 characters in the
    Series and Content Description, whole in Image Comments) and the case ID as patient name and
    ID (the source's identifying attributes left out); an empty label map gives no file. The
    tables are also written as a DICOM SR (``report.dcm``, :mod:`spinemets.formats.dicomsr`). The series
    is checked first (:func:`spinemets.formats.dicom.check_series`, before the stages run): a series it
    refuses raises; one whose headers cannot be referenced gets no DICOM object, and the result's
    ``dicom_outputs`` (``written``, ``not_written``: the reason, ``repaired``) and the log say why.
    """
    stage1, stage2 = stages
    opts = options
    series = check_series(path) if Path(path).is_dir() else None  # before the stages run: refusals come first
    image = read_image(path, "CT")
    report = domain_mod.check_case(case, domain_mod.image_properties(image), domains or {})
    if report["warning"]:
        _loud(report["warning"])
    flag = domain_mod.short_warning(report)
    ct = sitk.GetArrayFromImage(image)
    spacing = tuple(float(s) for s in image.GetSpacing()[::-1])
    t0 = time.perf_counter()
    segment_image = getattr(stage1, "segment_image", None)  # a stage that needs the image's geometry (TotalSegmentator)
    first = segment_image(image, f"case {case}") if segment_image else stage1(ct, spacing)
    vertebrae, fragments = remove_small_components(first, spacing, opts.min_vertebra_ml, per_label=True)
    del first
    relabelled = 0
    if opts.repair_order:
        vertebrae, relabelled = repair_vertebra_order(vertebrae, spacing)
    t1 = time.perf_counter()
    lesions, note = np.zeros_like(vertebrae), ""
    box = spine_box(vertebrae, spacing, opts.margin_mm) if opts.roi == "spine" else None
    if opts.roi == "spine" and box is None:
        note = "no vertebra found: stage 2 ran on the whole CT"
    if box is None:
        lesions, probabilities = _lesion_stage(stage2, ct, spacing)
    else:
        lesions[box], probabilities = _lesion_stage(stage2, np.ascontiguousarray(ct[box]), spacing)
    lesions, merged = merge_small_type_parts(lesions, spacing, opts.min_lesion_ml)
    lesions, removed = remove_small_lesions(lesions, spacing, opts.min_lesion_ml)
    outside = 0
    if opts.spine_only:
        lesions, outside = remove_lesions_outside_spine(lesions, vertebrae, spacing, opts.spine_margin_mm)
    confidence = detection_map(lesions, probabilities, box)
    del probabilities
    lesions, confidence, unconfident = remove_unconfident_lesions(lesions, confidence, opts.min_confidence)
    t2 = time.perf_counter()
    lesion_rows = [{"case_id": case, **r, "domain_warning": flag}
                   for r in localize(lesions, vertebrae, ct, spacing, opts.near_mm, ijk_to_lps(image), confidence)]
    vertebra_rows = [{"case_id": case, **r, "domain_warning": flag}
                     for r in vertebra_table(lesion_rows, lesions, vertebrae, spacing)]
    dicom = None if series is None else {"written": [], "not_written": series["why_not"],
                                           "repaired": series["repaired"]}
    if series is not None and not series["dicom_output"]:
        _loud(f"case {case}: {series['why_not']}; the other outputs are written")
    segs = {}
    for stage, array in (("vertebrae", vertebrae), ("metastases", lesions)):
        labelmap = image_from_array(array.astype(np.uint8), image)
        write_image(labelmap, case_dir / f"{stage}.nii.gz")
        description = f"spinemets {stage} prediction of case {case}"
        if report["warning"]:
            description += f". WARNING: {report['warning']}"
        segmentation_from_labelmap(labelmap, case_dir / f"{stage}.seg.nrrd", stage, description=description)
        if series is not None:  # a DICOM series: the prediction also as a DICOM-SEG that references it
            # patient name and ID become the case ID, and the source's other identifying attributes are
            # left out (PS3.15 Basic Profile): no identifier of an input header reaches an output
            segs[stage] = _dicom_output(dicom, case_dir / f"{stage}.dcm", lambda: write_dicom_seg(
                labelmap, stage, path, case_dir / f"{stage}.dcm", description=description, pseudonym=case))
    if series is not None:
        _dicom_output(dicom, case_dir / SR_FILE, lambda: write_lesion_report(
            lesion_rows, vertebra_rows, read_series_headers(series["files"]), case_dir / SR_FILE, case,
            vertebrae_seg=segs["vertebrae"], metastases_seg=segs["metastases"], warning=report["warning"] or ""))
    write_image(image_from_array(confidence, image), case_dir / CONFIDENCE_NAME)
    write_csv(case_dir / "lesions.csv", lesion_rows, LESION_COLUMNS)
    write_csv(case_dir / "vertebrae.csv", vertebra_rows, VERTEBRA_COLUMNS)
    timings = {"stage1_s": round(t1 - t0, 3), "stage2_s": round(t2 - t1, 3), "small_lesions_removed": removed,
               "lesion_parts_merged": merged, "unconfident_lesions_removed": unconfident,
               "lesions_outside_spine_removed": outside,
               "vertebra_fragments_removed": fragments, "vertebra_voxels_relabelled": relabelled}
    return CaseResult(lesion_rows, vertebra_rows, note, timings, report, dicom)


def _dicom_output(record: dict, target: Path, write) -> Path | None:
    """Write one DICOM output of a case by ``write()`` when the series allows it (``record``'s
    ``not_written`` is empty); record what was written or why not. A DICOM object that cannot be
    made valid (the series' headers break a rule only the writer meets) leaves the other outputs
    standing: the reason is logged and recorded, never raised. A stale file of a rerun is removed."""
    written = None
    if not record["not_written"]:
        try:
            written = write()
        except Exception as exc:  # highdicom checks what it writes; any refusal means: no valid DICOM object
            record["not_written"] = f"{target.name} not written: {one_line(exc)[:300]}"
            _loud(f"{target.parent}: {record['not_written']}")
    if written is None:
        target.unlink(missing_ok=True)  # a rerun's DICOM output must not outlive the prediction it showed
    else:
        record["written"].append(target.name)
    return written


def _lesion_stage(stage, array: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None]:
    """The lesion stage's labels and class probabilities (None from a stage that gives labels only)."""
    with_probabilities = getattr(stage, "with_probabilities", None)
    if with_probabilities is None:
        return stage(array, spacing), None
    return with_probabilities(array, spacing)


def _provenance(locals_: dict, stages: Mapping[str, "_Stage"], timings: dict, notes: dict, seconds: float,
                domain: dict, dicom_outputs: dict | None = None, shared_model: dict | None = None) -> dict:
    return provenance(
        "spinemets.inference.predict.predict",
        parameters=locals_,
        shared_model=shared_model,
        models={name: stage.models for name, stage in stages.items()},
        nnunet_postprocessing={name: str(stage.postprocessing) if stage.postprocessing else None
                               for name, stage in stages.items()},
        partial_sins=PARTIAL_SINS_LABEL,
        notes=notes,
        timings_s=timings,
        total_seconds=round(seconds, 3),
        domain=domain,
        dicom_outputs=dicom_outputs or {},
    )
