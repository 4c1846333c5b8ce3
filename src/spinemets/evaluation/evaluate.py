"""Evaluation of prediction folders: file pairing, per-case evaluation of files, summaries with bootstrap intervals, and the tables ``spinemets evaluate`` writes.

The metrics step: it serves the command ``spinemets evaluate`` and the metrics notebook
(``05_metrics``), on top of the metric math of :mod:`spinemets.evaluation.metrics` (counts and
per-case metrics of arrays) and the detection tables of :mod:`spinemets.evaluation.detection`:
**files** (:func:`read_label_pair`, :func:`evaluate_pair`, :func:`evaluate_lesion_pair`) ->
**folder** (:func:`pair_cases`, :func:`summarize`, :func:`evaluate_folders`). Every input image is
read once, through :func:`spinemets.formats.images.read_image` (checked).
"""

from __future__ import annotations

import concurrent.futures
import math
from pathlib import Path

import numpy as np

from spinemets.errors import SpinemetsError
from spinemets.labels import STAGE_NAMES, check_stage, foreground_labels
from spinemets.paths import workspace_of
from spinemets.training.profiles import get_profile
from spinemets.evaluation.metrics import (BOOTSTRAP_LEVEL, ID_DISTANCE_MM, IOU_THRESHOLD, METRICS, N_BOOTSTRAP, SEED,
                                          Counts, ScoringOptions, check_labels, check_match, class_rows, confusion_matrix,
                                          evaluate_case, match_components, metric_names, union_box, voxel_counts)


def evaluate_lesion_case(ref: np.ndarray, pred: np.ndarray, confidence: np.ndarray | None = None,
                         vertebrae: np.ndarray | None = None, spacing=(1.0, 1.0, 1.0),
                         options: ScoringOptions | None = None,
                         sources: tuple = ("reference", "prediction", "detection map")) -> tuple[dict, dict]:
    """:func:`evaluate_case` of the lesion stage and the case's lesion detections, from one matching.

    Returns (the metrics as :func:`evaluate_case` gives them, ``{class: Detections}`` of
    :func:`spinemets.evaluation.detection.case_detections`). ``confidence`` is the detection map (float, in
    [0, 1], 0 outside the predicted lesions; None: confidence 1 for every predicted lesion),
    ``vertebrae`` the vertebra label map of the case (None: regions unknown); both on the grid of
    ``pred``. Only the box holding the lesions of either map is read further. ``options``: how the case
    is scored (:class:`spinemets.evaluation.metrics.ScoringOptions`; default: F2, IoU > 0.5, 26-connectivity).
    """
    from spinemets.evaluation.detection import case_detections

    options = options or ScoringOptions()
    beta, match, connectivity = options.beta, options.match, options.connectivity
    stage = "metastases"
    check_match(match)
    if ref.shape != pred.shape:
        raise SpinemetsError(f"{sources[1]}: shape {pred.shape} differs from {sources[0]} ({ref.shape})")
    ref = check_labels(ref, stage, sources[0])
    pred = check_labels(pred, stage, sources[1])
    if confidence is not None:
        confidence = _check_confidence(confidence, pred, sources[2], sources[1])
    if vertebrae is not None and vertebrae.shape != pred.shape:
        raise SpinemetsError(f"vertebra map beside {sources[1]}: shape {vertebrae.shape} differs ({pred.shape})")
    classes = foreground_labels(stage)
    n_labels = max(classes.values()) + 1
    box = union_box(ref, pred)
    zeros = np.zeros(n_labels, dtype=np.int64)
    if box is None:
        from spinemets.evaluation.detection import DETECTION_CLASSES, Detections

        return (class_rows(stage, classes, Counts(zeros, zeros, zeros), Counts(zeros, zeros, zeros), beta, None, None),
                {cls: Detections() for cls in DETECTION_CLASSES})
    ref, pred = ref[box], pred[box]
    voxels = voxel_counts(confusion_matrix(ref, pred, n_labels))
    found = match_components(ref, pred, match, connectivity, keep_components=True)
    detections = case_detections(ref, pred, None if confidence is None else confidence[box], spacing,
                                 None if vertebrae is None else vertebrae[box], match, connectivity, found=found)
    return class_rows(stage, classes, voxels, found.counts(n_labels), beta, None, None), detections


def _check_confidence(confidence: np.ndarray, pred: np.ndarray, source, pred_source) -> np.ndarray:
    """The detection map as float, checked: same shape, finite values in [0, 1], positive exactly on the lesions."""
    if confidence.shape != pred.shape:
        raise SpinemetsError(f"{source}: shape {confidence.shape} differs from {pred_source} ({pred.shape})")
    confidence = np.asarray(confidence)
    if confidence.dtype.kind not in "fui":
        raise SpinemetsError(f"{source}: detection map has voxel type {confidence.dtype}; expected floats")
    if not np.isfinite(confidence).all() or confidence.min() < 0 or confidence.max() > 1:
        raise SpinemetsError(f"{source}: detection map holds values outside [0, 1] (or not finite)")
    stray = int(np.count_nonzero((confidence > 0) != (pred != 0)))
    if stray:
        raise SpinemetsError(f"{source}: detection map and {Path(str(pred_source)).name} disagree on {stray} "
                             "voxel(s) (confidence > 0 must mark exactly the predicted lesions); remove the one "
                             "that is out of date")
    return confidence


def is_segmentation_file(path: str | Path) -> bool:
    """Whether ``path`` is a 3D Slicer segmentation (``.seg.nrrd``), whose segment names decide the classes."""
    return str(path).lower().endswith(".seg.nrrd")


def read_label_pair(ref_path: str | Path, pred_path: str | Path, stage: str):
    """The reference and the prediction as label-map images of ``stage`` on one voxel grid.

    Label-map files (NIfTI, NRRD, MHA) are read by voxel value and must share one grid (size,
    spacing, origin, direction). A ``.seg.nrrd`` is read by its **segment names** (a segment named
    "sclerotic" is sclerotic whatever its labelValue; :func:`spinemets.formats.slicer.labelmap_from_segmentation`)
    and placed on the other file's grid by physical coordinates; two ``.seg.nrrd`` files (each
    cropped by 3D Slicer) go on the smallest grid that holds both.
    """
    from spinemets.formats.images import check_same_geometry, read_image

    ref_seg, pred_seg = is_segmentation_file(ref_path), is_segmentation_file(pred_path)
    if not ref_seg and not pred_seg:
        ref_image = read_image(ref_path, what="reference label map")
        pred_image = read_image(pred_path, what="prediction label map")
        check_same_geometry(ref_image, pred_image, ref_path, pred_path)
        return ref_image, pred_image
    from spinemets.formats.slicer import labelmap_from_segmentation, read_slicer_segmentation, segmentation_grid

    if ref_seg and pred_seg:
        ref_dict, pred_dict = read_slicer_segmentation(ref_path), read_slicer_segmentation(pred_path)
        grid = segmentation_grid(ref_dict, pred_dict, ref_path, pred_path)
        ref_image = labelmap_from_segmentation(ref_path, grid, stage, ct_path=ref_path, seg=ref_dict)[0]
        pred_image = labelmap_from_segmentation(pred_path, grid, stage, ct_path=ref_path, seg=pred_dict)[0]
        return ref_image, pred_image
    if pred_seg:
        ref_image = read_image(ref_path, what="reference label map")
        return ref_image, labelmap_from_segmentation(pred_path, ref_image, stage, ct_path=ref_path)[0]
    pred_image = read_image(pred_path, what="prediction label map")
    return labelmap_from_segmentation(ref_path, pred_image, stage, ct_path=pred_path)[0], pred_image


def evaluate_pair(
    ref_path: str | Path,
    pred_path: str | Path,
    stage: str,
    beta: float = 2.0,
    match: str = "iou",
    connectivity: int = 26,
    companion: str | Path | None = None,
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_case` on two files, label maps or ``.seg.nrrd`` (see :func:`read_label_pair`).

    For unreadable files, grids that differ and labels outside the stage a :class:`SpinemetsError`
    names the file(s). ``companion`` is a second form of the prediction (the ``.seg.nrrd`` that
    ``spinemets predict`` writes beside its label map); it must hold the same labels, else the
    error names both files, since scoring one of two disagreeing files would be a silent choice.
    """
    import SimpleITK as sitk

    ref_image, pred_image = read_label_pair(ref_path, pred_path, stage)
    ref = sitk.GetArrayViewFromImage(ref_image)
    pred = sitk.GetArrayViewFromImage(pred_image)
    if companion is not None:
        _check_companion(pred, pred_image, pred_path, companion, stage)
    spacing = tuple(float(s) for s in reversed(ref_image.GetSpacing()))
    return evaluate_case(ref, pred, stage, spacing, beta, match, connectivity, sources=(ref_path, pred_path))


def _check_companion(pred: np.ndarray, pred_image, pred_path, companion, stage: str) -> None:
    import SimpleITK as sitk

    from spinemets.formats.slicer import labelmap_from_segmentation

    other = sitk.GetArrayFromImage(labelmap_from_segmentation(companion, pred_image, stage, ct_path=pred_path)[0])
    differ = int(np.count_nonzero(np.asarray(other) != np.asarray(pred)))
    if differ:
        raise SpinemetsError(f"{companion}: differs from {Path(pred_path).name} beside it in {differ} voxel(s); "
                             "remove the one that is out of date")


def case_id(path: str | Path) -> str | None:
    """Case ID of a label-map file: its name without a :data:`LABEL_SUFFIXES` ending (None for other files)."""
    name = Path(path).name
    for suffix in LABEL_SUFFIXES:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def list_cases(folder: str | Path, what: str, stage: str | None = None) -> dict[str, Path]:
    """Case ID -> label-map file in ``folder`` (hidden and partial files skipped); see :func:`list_case_files`."""
    return {cid: files[0] for cid, files in list_case_files(folder, what, stage).items()}


def list_case_files(folder: str | Path, what: str, stage: str | None = None) -> dict[str, tuple[Path, ...]]:
    """Case ID -> (file to score, its ``.seg.nrrd`` companion if any) in ``folder``.

    Two layouts: flat files ``CASE.nii.gz`` (nnU-Net's), or, given ``stage``, one folder per
    case holding ``STAGE.nii.gz`` (what ``spinemets predict`` writes: ``CASE/metastases.nii.gz``
    beside ``CASE/metastases.seg.nrrd``). When a case has a label map and a ``.seg.nrrd``, the
    label map is scored and the ``.seg.nrrd`` is its companion (:func:`evaluate_pair` checks that
    the two agree); two label maps of one case (``.nii.gz`` and ``.nrrd``) are an error.
    """
    from spinemets.fileio import check_case_id, require_dir, require_file

    folder = require_dir(folder, f"{what} folder")
    found: dict[str, list[Path]] = {}
    entries = []
    for path in sorted(folder.iterdir()):
        if stage and path.is_dir() and not path.name.startswith("."):
            entries += [(path.name, p) for p in sorted(path.iterdir()) if case_id(p) == stage and p.is_file()]
        else:
            entries.append((case_id(path), path))
    for cid, path in entries:
        if cid is None or path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            require_file(path, f"{what} label map file")  # a broken link, said as such
        if not path.is_file():
            continue
        found.setdefault(cid, []).append(path)
    cases: dict[str, tuple[Path, ...]] = {}
    for cid, paths in found.items():
        check_case_id(cid, paths[0])
        maps = [p for p in paths if not is_segmentation_file(p)]
        segs = [p for p in paths if is_segmentation_file(p)]
        if len(maps) > 1 or len(segs) > 1:
            pair = (maps if len(maps) > 1 else segs)[:2]
            raise SpinemetsError(f"{folder}: two {what} files for case {cid!r}: {pair[0].name} and {pair[1].name}")
        cases[cid] = tuple(maps + segs)
    if not cases:
        raise SpinemetsError(f"{folder}: no {what} label maps ({', '.join(LABEL_SUFFIXES)}) found")
    return dict(sorted(cases.items()))


def pair_cases(ref_dir: str | Path, pred_dir: str | Path, stage: str | None = None) -> dict[str, tuple[Path, Path]]:
    """Case ID -> (reference file, prediction file); every case must be in both folders."""
    return {cid: (ref, pred) for cid, (ref, pred, _) in _paired_files(ref_dir, pred_dir, stage).items()}


def _paired_files(ref_dir, pred_dir, stage, cases=None) -> dict[str, tuple[Path, Path, Path | None]]:
    """Case ID -> (reference, prediction, prediction's companion or None); every case in both folders
    (every case of ``cases`` when given, the other files left unpaired)."""
    refs, preds = list_case_files(ref_dir, "reference", stage), list_case_files(pred_dir, "prediction", stage)
    if cases is not None:
        wanted = {str(c) for c in cases}
        if not wanted:
            raise SpinemetsError(f"{ref_dir}: no case to score (an empty list of cases)")
        for what, found, folder in (("reference", refs, ref_dir), ("prediction", preds, pred_dir)):
            missing = sorted(wanted - set(found))
            if missing:
                raise SpinemetsError(f"{folder}: no {what} file of case(s) {', '.join(missing[:20])}"
                                     + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""))
        refs = {c: f for c, f in refs.items() if c in wanted}
        preds = {c: f for c, f in preds.items() if c in wanted}
    no_pred = sorted(set(refs) - set(preds))
    no_ref = sorted(set(preds) - set(refs))
    if no_pred or no_ref:
        parts = []
        if no_pred:
            parts.append(f"reference files without a prediction in {pred_dir}: "
                         + _names({c: f[0] for c, f in refs.items()}, no_pred))
        if no_ref:
            parts.append(f"prediction files without a reference in {ref_dir}: "
                         + _names({c: f[0] for c, f in preds.items()}, no_ref))
        raise SpinemetsError(f"{pred_dir}: unmatched cases (files are paired by name): " + "; ".join(parts))
    return {cid: (refs[cid][0], preds[cid][0], preds[cid][1] if len(preds[cid]) > 1 else None) for cid in sorted(refs)}


def _names(files: dict[str, Path], ids: list[str], limit: int = 20) -> str:
    shown = ", ".join(str(files[i]) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def per_case_rows(case: str, result: dict[str, dict[str, float]]) -> list[dict]:
    """Long-format rows ``{case, class, metric, value}`` of one case's result."""
    return [
        {"case": case, "class": cls, "metric": key, "value": value}
        for cls, row in result.items()
        for key, value in row.items()
    ]


def bootstrap_ci(values, n_boot: int = N_BOOTSTRAP, seed: int = SEED,
                 level: float = BOOTSTRAP_LEVEL) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the NaN-aware mean, resampling cases with replacement.

    NaN values stay in the resamples and are skipped by each replicate's mean (replicates of only
    NaN are dropped). Returns (NaN, NaN) when no value is finite.
    """
    low, high = bootstrap_cis(np.asarray(values, dtype=float)[None, :], n_boot, seed, level)
    return float(low[0]), float(high[0])


def bootstrap_cis(values: np.ndarray, n_boot: int = N_BOOTSTRAP, seed: int = SEED,
                  level: float = BOOTSTRAP_LEVEL) -> tuple[np.ndarray, np.ndarray]:
    """:func:`bootstrap_ci` of each row of ``values`` (metrics x cases), with the same resamples of
    cases for every row: the indices are drawn once for a whole table."""
    values = np.asarray(values, dtype=float)
    idx = case_resamples(values.shape[1], n_boot, seed)
    alpha = (1 - level) / 2
    low, high = np.full(len(values), math.nan), np.full(len(values), math.nan)
    complete = np.isfinite(values).all(axis=1)
    if complete.any():  # no NaN: each replicate's mean is a weighted sum (cases by their draw counts)
        draws = np.zeros((n_boot, values.shape[1]))
        np.add.at(draws, (np.repeat(np.arange(n_boot), values.shape[1]), idx.ravel()), 1.0)
        means = values[complete] @ draws.T / values.shape[1]
        low[complete], high[complete] = np.quantile(means, [alpha, 1 - alpha], axis=1)
    for row in np.flatnonzero(np.isfinite(values).any(axis=1) & ~complete):
        samples = values[row][idx]
        finite = np.isfinite(samples)
        n = finite.sum(axis=1)
        means = np.where(finite, samples, 0.0).sum(axis=1)[n > 0] / n[n > 0]
        low[row], high[row] = np.quantile(means, [alpha, 1 - alpha])
    return low, high


def case_resamples(n_cases: int, n_boot: int = N_BOOTSTRAP, seed: int = SEED) -> np.ndarray:
    """The bootstrap's resamples of cases: ``n_boot`` rows of ``n_cases`` case indices drawn with
    replacement, the same for every metric of a folder (one seed, one draw)."""
    return np.random.default_rng(seed).integers(0, n_cases, size=(n_boot, n_cases))


def _pooled(per_case: dict[str, dict], cls: str, stage: str, beta: float, idx: np.ndarray) -> dict:
    """Instance and voxel counts summed over cases and the metrics of the sums, with case-bootstrap
    intervals over the resamples ``idx`` (:func:`case_resamples`)."""
    cases = list(per_case)
    tp, fp, fn = (np.array([per_case[c][cls][k] for c in cases], dtype=float) for k in ("tp", "fp", "fn"))
    sq = np.array([per_case[c][cls]["sq"] for c in cases], dtype=float)
    iou_sum = np.where(tp > 0, np.nan_to_num(sq) * tp, 0.0)
    total = Counts(tp.sum(), fp.sum(), fn.sum(), iou_sum.sum())
    boot = Counts(tp[idx].sum(axis=1), fp[idx].sum(axis=1), fn[idx].sum(axis=1), iou_sum[idx].sum(axis=1))
    vtp, vfp, vfn = (np.array([per_case[c][cls][k] for c in cases], dtype=float)
                     for k in ("voxel_tp", "voxel_fp", "voxel_fn"))
    voxels = Counts(vtp.sum(), vfp.sum(), vfn.sum())
    voxel_boot = Counts(vtp[idx].sum(axis=1), vfp[idx].sum(axis=1), vfn[idx].sum(axis=1))
    out = {k: {"value": int(v)} for k, v in (("tp", total.tp), ("fp", total.fp), ("fn", total.fn))}
    for key in metric_names(stage):
        metric = METRICS[key]
        if metric.direction == "count" or metric.level not in ("instance", "voxel"):
            continue
        summed, resampled = (total, boot) if metric.level == "instance" else (voxels, voxel_boot)
        reps = np.asarray(metric(resampled, beta), dtype=float)
        reps = reps[np.isfinite(reps)]
        alpha = (1 - BOOTSTRAP_LEVEL) / 2
        low, high = np.quantile(reps, [alpha, 1 - alpha]) if reps.size else (math.nan, math.nan)
        out[key] = {"value": float(metric(summed, beta)), "ci_low": float(low), "ci_high": float(high)}
    if stage == "vertebrae":
        ids = np.array([per_case[c][cls]["identified"] for c in cases], dtype=float)
        n_ref = np.isfinite(ids).sum()
        out["identification_rate"] = {"value": float(np.nansum(ids) / n_ref) if n_ref else math.nan}
    return out


def summarize(
    per_case: dict[str, dict[str, dict[str, float]]],
    stage: str,
    beta: float = 2.0,
    n_boot: int = N_BOOTSTRAP,
    seed: int = SEED,
) -> dict:
    """Folder-level aggregates of per-case results ``{case: {class: {metric: value}}}``.

    ``mean[class][metric]``: NaN-aware mean over cases with a percentile-bootstrap 95 % interval
    over cases (``n`` finite values, ``n_nan`` NaN values, which are left out of the mean).
    ``pooled[class]``: instance TP/FP/FN summed over all cases and the metrics of those sums
    (lesion precision/recall/F-beta, RQ, SQ, PQ), and the voxel-level metrics of the voxel counts
    summed over all cases (global Dice, F-beta, ...), bootstrap intervals by resampling cases; for
    vertebrae also the pooled identification rate.
    """
    if not per_case:
        raise SpinemetsError("no cases to summarize")
    classes = list(next(iter(per_case.values())))
    first = next(iter(per_case.values()))
    keys = [(cls, key) for cls in classes for key in first[cls]]
    table = np.array([[per_case[c][cls][key] for c in per_case] for cls, key in keys], dtype=float)
    lows, highs = bootstrap_cis(table, n_boot, seed)
    mean: dict[str, dict] = {cls: {} for cls in classes}
    for (cls, key), values, low, high in zip(keys, table, lows, highs):
        finite = np.isfinite(values)
        mean[cls][key] = {
            "value": float(values[finite].mean()) if finite.any() else math.nan,
            "ci_low": float(low),
            "ci_high": float(high),
            "n": int(finite.sum()),
            "n_nan": int((~finite).sum()),
        }
    idx = case_resamples(len(per_case), n_boot, seed)
    pooled = {cls: _pooled(per_case, cls, stage, beta, idx) for cls in classes if cls != "all"}
    if stage == "vertebrae":
        ids = np.array([[per_case[c][v]["identified"] for v in classes if v != "all"] for c in per_case], float)
        n_ref = np.isfinite(ids).sum()
        pooled["all"] = {"identification_rate": {"value": float(np.nansum(ids) / n_ref) if n_ref else math.nan}}
    return {"mean": mean, "pooled": pooled}


def summary_rows(summary: dict) -> list[dict]:
    """Rows ``{class, metric, aggregate, value, ci_low, ci_high, n, n_nan}`` of a :func:`summarize` result."""
    rows = []
    for aggregate in ("mean", "pooled"):
        for cls, metrics in summary[aggregate].items():
            for key, entry in metrics.items():
                rows.append({"class": cls, "metric": key, "aggregate": aggregate, **entry})
    return rows


SUMMARY_FIELDS = ["class", "metric", "aggregate", "value", "ci_low", "ci_high", "n", "n_nan"]


def evaluate_lesion_pair(ref_path, pred_path, beta: float = 2.0, match: str = "iou", connectivity: int = 26,
                         companion=None, confidence=None, vertebrae=None) -> tuple[dict, dict]:
    """:func:`evaluate_lesion_case` on files: the lesion label maps (as :func:`evaluate_pair`), the
    detection map ``confidence`` and the vertebra map ``vertebrae`` (paths or None), which must
    share the prediction's voxel grid."""
    import SimpleITK as sitk

    from spinemets.formats.images import check_same_geometry, read_image

    ref_image, pred_image = read_label_pair(ref_path, pred_path, "metastases")
    ref = sitk.GetArrayViewFromImage(ref_image)
    pred = sitk.GetArrayViewFromImage(pred_image)
    if companion is not None:
        _check_companion(pred, pred_image, pred_path, companion, "metastases")
    arrays, images = [], []  # the images stay referenced while their array views are used
    for path, what in ((confidence, "detection map"), (vertebrae, "vertebra label map")):
        if path is None:
            arrays.append(None)
            continue
        images.append(read_image(path, what=what))
        check_same_geometry(pred_image, images[-1], pred_path, path)
        arrays.append(sitk.GetArrayViewFromImage(images[-1]))
    if arrays[1] is not None:
        arrays[1] = check_labels(arrays[1], "vertebrae", vertebrae)
    spacing = tuple(float(s) for s in reversed(ref_image.GetSpacing()))
    return evaluate_lesion_case(ref, pred, arrays[0], arrays[1], spacing, ScoringOptions(beta, match, connectivity),
                                sources=(ref_path, pred_path, confidence))


def beside(pred_path, name: str) -> Path | None:
    """The file ``name`` beside a prediction written by ``spinemets predict`` (``CASE/metastases.nii.gz``), or None."""
    pred_path = Path(pred_path)
    if case_id(pred_path) != "metastases":
        return None  # a flat folder: no companion maps
    other = pred_path.parent / name
    return other if other.is_file() else None


def _evaluate_one(item):
    case, ref_path, pred_path, companion, stage, beta, match, connectivity = item
    if stage == "metastases":
        from spinemets.paths import CONFIDENCE_NAME, VERTEBRAE_NAME

        result, found = evaluate_lesion_pair(ref_path, pred_path, beta, match, connectivity, companion,
                                             beside(pred_path, CONFIDENCE_NAME), beside(pred_path, VERTEBRAE_NAME))
        return case, (result, found)
    return case, (evaluate_pair(ref_path, pred_path, stage, beta, match, connectivity, companion), None)


def _progress_bar():
    """tqdm's notebook bar in a notebook, else the terminal's bar, without the import of asyncio and
    the widgets that ``tqdm.auto`` costs a command."""
    from spinemets.training.programs import in_notebook

    if in_notebook():
        from tqdm.auto import tqdm
    else:
        from tqdm.std import tqdm
    return tqdm


def _run_cases(items: list[tuple], jobs: int) -> dict[str, dict]:
    tqdm = _progress_bar()
    results: dict[str, dict] = {}
    with tqdm(total=len(items), desc="evaluate", unit="case") as bar:
        if jobs <= 1 or len(items) <= 1:
            for item in items:
                case, result = _evaluate_one(item)
                results[case] = result
                bar.update()
        else:
            with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, len(items))) as pool:
                futures = [pool.submit(_evaluate_one, item) for item in items]
                try:
                    for future in concurrent.futures.as_completed(futures):
                        case, result = future.result()
                        results[case] = result
                        bar.update()
                except BaseException:
                    for future in futures:
                        future.cancel()
                    raise
    return {case: results[case] for case in sorted(results)}


def _json_clean(obj):
    """NaN and infinities become None (JSON null)."""
    if isinstance(obj, dict):
        return {k: _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def evaluate_folders(ref_dir, pred_dir, stage, out_dir, options: ScoringOptions | None = None, jobs: int = 1, *,
                     cases=None, plot: bool = False) -> dict:
    """Evaluate every case of a prediction folder against a reference folder; write the tables.

    Files are paired by case ID (file name without ``.nii.gz``, ``.nii``, ``.nrrd``, ``.seg.nrrd``
    or ``.mha``); unmatched files, and pairs that do not share a voxel grid, raise
    :class:`SpinemetsError` naming the files before anything is written. Cases run in ``jobs``
    processes. With ``cases``, only those case IDs are scored, and each must be in both folders;
    other files are not paired (a prediction folder holding the held-out CTs of both stages, when
    the stages' data come from different datasets). Writes, each atomically, into ``out_dir``:

    * ``per_case.csv``: long format ``case, class, metric, value``;
    * ``summary.csv``: ``class, metric, aggregate (mean|pooled), value, ci_low, ci_high, n, n_nan``;
    * ``summary.json``: the same aggregates with the settings and the list of cases (NaN -> null);
    * for the lesion stage, the detection tables of :mod:`spinemets.evaluation.detection` (:data:`DETECTION_FILES`):
      ``froc.csv``, ``froc_summary.csv``, ``lesion_bands.csv`` and ``patients.csv`` (with ``plot``,
      also the curve drawn as ``froc.png``: matplotlib's import and drawing cost about as much as
      reading a case, so it is asked for; the notebooks and the book draw it from ``froc.csv``), from the detection map (``metastases_confidence.nii.gz``) and the vertebra map
      (``vertebrae.nii.gz``) beside each prediction of ``spinemets predict``'s layout, where present
      (their summary also goes into ``summary.json`` under ``detection``).

    ``options``: how the cases are scored (:class:`spinemets.evaluation.metrics.ScoringOptions`: F-beta's
    ``beta``, the ``match`` rule, the lesions' ``connectivity``). Returns the content of ``summary.json``
    as a dict.
    """
    from spinemets import __version__
    from spinemets.provenance import versions
    from spinemets.fileio import atomic_paths, check_output_dir, check_output_file, output_folder, write_csv, write_json

    options = options or ScoringOptions()
    match, connectivity = options.match, options.connectivity
    check_stage(stage)
    check_match(match)
    beta = float(options.beta)
    if not (beta > 0 and math.isfinite(beta)):
        raise SpinemetsError(f"--beta: must be a positive number, not {beta!r}")
    jobs = int(jobs)
    if jobs < 1:
        raise SpinemetsError(f"--jobs: must be at least 1, not {jobs}")
    out_dir = Path(out_dir)
    names = ["per_case.csv", "summary.csv", "summary.json"]
    if stage == "metastases":
        names += list(DETECTION_FILES) + ([FROC_PLOT] if plot else [])
    targets = [out_dir / name for name in names]
    check_output_dir(out_dir)
    for target in targets:
        check_output_file(target)
    pairs = _paired_files(ref_dir, pred_dir, stage, cases)
    items = [(cid, ref, pred, comp, stage, beta, match, connectivity) for cid, (ref, pred, comp) in pairs.items()]
    outcomes = _run_cases(items, jobs)
    per_case = {case: result for case, (result, _) in outcomes.items()}
    summary = summarize(per_case, stage, beta)
    rows = [row for case, result in per_case.items() for row in per_case_rows(case, result)]
    document = {
        "stage": stage,
        "settings": {
            "beta": beta,
            "match": match,
            "connectivity": connectivity,
            "iou_threshold": f"IoU > {IOU_THRESHOLD} (strict)" if match == "iou" else "any overlap, greedy by IoU",
            "identification_distance_mm": ID_DISTANCE_MM,
            "bootstrap": {"replicates": N_BOOTSTRAP, "seed": SEED, "level": BOOTSTRAP_LEVEL},
        },
        "produced_by": {"function": "spinemets.evaluation.evaluate.evaluate_folders", "spinemets_version": __version__,
                        "versions": versions()},  # no time stamp: equal inputs give equal bytes
        "n_cases": len(per_case),
        "cases": list(per_case),
        "metrics": {k: {"long_name": METRICS[k].long_name, "direction": METRICS[k].direction,
                        "formula": METRICS[k].formula} for k in metric_names(stage)},
        **summary,
    }
    tables = None
    if stage == "metastases":
        tables = detection_tables({case: found for case, (_, found) in outcomes.items()}, pairs)
        document["detection"] = tables["document"]
    document = _json_clean(document)
    with output_folder(out_dir), atomic_paths(targets) as temps:  # the files together, or none
        write_csv(temps[0], rows, ["case", "class", "metric", "value"])
        write_csv(temps[1], summary_rows(summary), SUMMARY_FIELDS)
        write_json(temps[2], document)
        if tables is not None:
            _write_detection_tables(tables, temps[3:7], temps[7] if plot else None)
    return document


#: The detection tables of the lesion stage (:mod:`spinemets.evaluation.detection`), in the order written.
DETECTION_FILES: tuple[str, ...] = ("froc.csv", "froc_summary.csv", "lesion_bands.csv", "patients.csv")
#: The FROC curve drawn, written beside them when asked for (``spinemets evaluate --plot``).
FROC_PLOT = "froc.png"


def evaluate_workspace(workspace, options: ScoringOptions | None = None, jobs: int = 1) -> dict[str, dict]:
    """Score a workspace's predictions (``predictions/``, as ``spinemets predict`` writes them: one folder
    per case) against each stage's held-out reference label maps (``labelsTs``), into
    ``evaluation/<stage>`` (:func:`evaluate_folders`): the metrics notebook's step. Where the stages'
    held-out cases differ (their data come from different datasets), each stage scores only its own.
    Returns ``{stage: summary}`` (the content of each ``summary.json``)."""
    ws = workspace_of(workspace)
    shared = ws.held_out_cases("vertebrae") == ws.held_out_cases("metastases")
    return {stage: evaluate_folders(ws.test_labels(stage), ws.predictions, stage, ws.evaluation(stage), options, jobs,
                                    cases=None if shared else ws.held_out_cases(stage))
            for stage in STAGE_NAMES}


def detection_tables(found: dict[str, dict], pairs: dict | None = None) -> dict:
    """The rows of the detection tables from each case's ``{class: Detections}``, and their JSON record."""
    from spinemets.evaluation import detection as det
    from spinemets import paths

    regions = [r for by_class in found.values() for d in by_class.values() for r in (d.ref_region, d.pred_region)]
    with_regions = all((r >= 0).all() for r in regions) and any(r.size for r in regions)
    froc = det.froc_rows(found)
    summary = det.froc_summary_rows(found)
    bands = det.band_rows(found, with_regions=with_regions)
    patients = det.patient_table(found)
    scored = None
    if pairs is not None:
        scored = sorted(case for case, (_, pred, _) in pairs.items() if beside(pred, paths.CONFIDENCE_NAME) is not None)
    document = {
        "confidence": ("maximum of the detection map over each predicted lesion; cases without a detection map: 1"),
        "cases_with_detection_map": scored,
        "fp_rates": list(det.FP_RATES), "auc_max_fp_per_case": det.AUC_MAX_FP,
        "volume_bands_ml": list(det.VOLUME_BANDS_ML), "regions": list(det.REGIONS) if with_regions else None,
        "froc_summary": summary, "patients": patients,
    }
    return {"froc": froc, "summary": summary, "bands": bands, "patients": patients, "document": document}


def _write_detection_tables(tables: dict, paths: list[Path], plot: Path | None = None) -> None:
    from spinemets.evaluation import detection as det
    from spinemets.fileio import write_csv

    write_csv(paths[0], tables["froc"], det.FROC_FIELDS)
    write_csv(paths[1], tables["summary"], det.SUMMARY_FIELDS)
    write_csv(paths[2], tables["bands"], det.BAND_FIELDS)
    write_csv(paths[3], tables["patients"], det.PATIENT_FIELDS)
    if plot is not None:
        det.froc_figure(tables["froc"]).savefig(plot, format="png", dpi=100)


#: File name endings of label maps, longest first (the case ID is the name without it).
LABEL_SUFFIXES: tuple[str, ...] = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha")


def validation_detections(workspace, profile: str, match: str = "iou", connectivity: int = 26) -> dict[str, dict]:
    """The detections of the lesion stage's cross-validation, where the training kept its probabilities.

    Each numbered fold of the model that inference uses (the first of
    :func:`spinemets.training.nnunet.trained_models`) predicted its own validation cases
    (``fold_N/validation/CASE.nii.gz``); with nnU-Net's ``--npz`` (the paper profile) the class
    probabilities lie beside them (``CASE.npz``, key ``probabilities``). Each case is cleaned up as
    :func:`spinemets.inference.predict.predict` does (the profile's ``min_lesion_ml``), given its detection
    map (:func:`spinemets.inference.predict.detection_map`) and scored against the training labels
    (``labelsTr``). Returns ``{case: {class: Detections}}``; empty where no fold kept validation
    probabilities (the demo trains fold ``all`` and skips its validation). A threshold chosen on
    these cases (:func:`threshold_for`) is then applied, unchanged, to the held-out cases.
    """
    import SimpleITK as sitk

    from spinemets.training import nnunet
    from spinemets.inference.predict import detection_map
    from spinemets.formats.images import check_same_geometry, read_image
    from spinemets.evaluation.evaluate import evaluate_lesion_case
    from spinemets.inference.postprocessing import merge_small_type_parts, remove_small_lesions

    ws = workspace_of(workspace)
    min_ml = float(get_profile(profile).get("min_lesion_ml", 0.0))
    model = nnunet.trained_models("metastases", profile, ws)[0]
    labels_tr = ws.raw / ws.dataset_name("metastases") / "labelsTr"
    out: dict[str, dict] = {}
    for fold in model["folds"]:
        if fold == "all":
            continue
        folder = Path(model["folder"]) / f"fold_{fold}" / "validation"
        for npz in sorted(folder.glob("*.npz")) if folder.is_dir() else []:
            case = npz.name[:-4]
            seg_path, ref_path = folder / f"{case}.nii.gz", labels_tr / f"{case}.nii.gz"
            if not (seg_path.is_file() and ref_path.is_file()):
                continue
            seg_image = read_image(seg_path, "validation prediction")
            ref_image = read_image(ref_path, "training label map")
            check_same_geometry(ref_image, seg_image, ref_path, seg_path)
            with np.load(npz) as data:
                if "probabilities" not in data:
                    raise SpinemetsError(f"{npz}: no 'probabilities' array (nnU-Net's --npz output)")
                probabilities = np.asarray(data["probabilities"], dtype=np.float32)
            spacing = tuple(float(x) for x in reversed(seg_image.GetSpacing()))
            lesions = sitk.GetArrayFromImage(seg_image).astype(np.uint8)
            if probabilities.shape[1:] != lesions.shape:
                raise SpinemetsError(f"{npz}: probabilities of shape {probabilities.shape} do not fit "
                                     f"{seg_path.name} ({lesions.shape})")
            lesions = merge_small_type_parts(lesions, spacing, min_ml)[0]
            lesions = remove_small_lesions(lesions, spacing, min_ml)[0]
            confidence = detection_map(lesions, probabilities)
            out[case] = evaluate_lesion_case(sitk.GetArrayFromImage(ref_image), lesions, confidence, None, spacing,
                                             ScoringOptions(match=match, connectivity=connectivity),
                                             sources=(ref_path, seg_path, npz))[1]
    return dict(sorted(out.items()))
