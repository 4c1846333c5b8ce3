"""Evaluation of both stages: voxel overlap, lesion detection, Panoptic Quality and vertebra identification.

The metrics step: it serves the command ``spinemets evaluate`` and the metrics notebook (``05_metrics``).

The lesion stage's detection tables (FROC, sensitivity at fixed false positives per case, size
bands, regions, patients) are computed in :mod:`spinemets.evaluation.detection` from the same matching
(:func:`spinemets.evaluation.evaluate.evaluate_lesion_case`) and written by
:func:`spinemets.evaluation.evaluate.evaluate_folders` beside the other tables.

The code is layered like nnU-Net's evaluation: **counts** (one pass over the foreground voxels) ->
**per-case metrics** (:func:`evaluate_case`), here; then files and **folders**
(:func:`spinemets.evaluation.evaluate.evaluate_pair`, :func:`spinemets.evaluation.evaluate.evaluate_folders`,
:func:`spinemets.evaluation.evaluate.summarize`) in :mod:`spinemets.evaluation.evaluate`. Every metric is listed once in :data:`METRICS`
with its long name, its direction, whether it needs the voxel spacing and the function that
computes it; each function's docstring states its formula.

Conventions (also in the book's metrics chapter):

* **One rule for undefined values**: a ratio whose denominator is zero is NaN. So a class absent
  from both reference and prediction gives NaN for every ratio (and zero counts); NaN values are
  left out of means but counted (``n_nan`` in the summary).
* Reference empty, prediction not: every predicted instance is a false positive (precision, Dice,
  F-beta, RQ and PQ are 0; recall is NaN: there is nothing to find).
  Prediction empty, reference not: every reference instance is a false negative (recall, Dice,
  F-beta, RQ and PQ are 0; precision is NaN).
* **Matching** of lesions: connected components of each class (26-connectivity by default), one
  predicted component to one reference component of the same class when IoU > 0.5. Above 0.5 a
  component can overlap only one partner that much, so the matching is unique without any search.
  panoptica matches at IoU >= 0.5: the two rules differ only on exact ties (IoU == 0.5).
  ``match="overlap"`` instead pairs components greedily by decreasing IoU while both are free,
  any overlap counting.
* **Vertebrae**: each label is one instance. A vertebra is matched when the predicted and reference
  masks of that label have IoU > 0.5 (or any overlap with ``match="overlap"``). Centroid distances
  are in millimetres, from the voxel spacing (image directions are orthonormal, so they do not
  change distances). A reference vertebra is *identified* (VerSe) when the predicted centroid of
  its label lies less than :data:`ID_DISTANCE_MM` from the reference centroid and no other
  reference centroid is closer.

Arrays are in NumPy (z, y, x) order, as SimpleITK returns them; ``spacing`` arguments of the
array-level functions are in the same order.
"""

from __future__ import annotations

import math
from fractions import Fraction
from dataclasses import dataclass
from typing import Callable

import numpy as np

from spinemets.errors import SpinemetsError, unknown_choice
from spinemets.labels import STAGE_NAMES, check_stage, foreground_labels

#: Matching rules for instances: IoU above one half (unique), or any overlap (greedy by IoU).
MATCH_RULES: tuple[str, ...] = ("iou", "overlap")
#: VerSe identification: the predicted centroid must lie closer than this to the reference centroid.
ID_DISTANCE_MM: float = 20.0
#: Bootstrap replicates and seed of the confidence intervals in :func:`summarize`.
N_BOOTSTRAP: int = 2000
SEED: int = 0
#: Level of the percentile-bootstrap intervals over cases.
BOOTSTRAP_LEVEL: float = 0.95
#: Lesion matching of ``match="iou"``: a pair matches when IoU > this (strictly), as Panoptic Quality defines it.
IOU_THRESHOLD: float = 0.5
#: Overlap tables larger than this many cells are counted sparsely (np.unique) instead of densely.
_DENSE_TABLE_LIMIT = 1 << 22


# ---------------------------------------------------------------------------------------------
# Formulas (scalars or arrays; a zero denominator gives NaN)
# ---------------------------------------------------------------------------------------------


def _ratio(num, den):
    num = np.asarray(num, dtype=float)
    den = np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def dice(tp, fp, fn):
    """Dice similarity coefficient: 2·TP / (2·TP + FP + FN)."""
    tp = np.asarray(tp, dtype=float)
    return _ratio(2 * tp, 2 * tp + np.asarray(fp) + np.asarray(fn))


def iou(tp, fp, fn):
    """Intersection over union (Jaccard index): TP / (TP + FP + FN)."""
    return _ratio(tp, np.asarray(tp) + np.asarray(fp) + np.asarray(fn))


def precision(tp, fp, fn):
    """Precision (positive predictive value): TP / (TP + FP)."""
    return _ratio(tp, np.asarray(tp) + np.asarray(fp))


def recall(tp, fp, fn):
    """Recall (sensitivity): TP / (TP + FN)."""
    return _ratio(tp, np.asarray(tp) + np.asarray(fn))


def fbeta(tp, fp, fn, beta: float = 2.0):
    """F-beta score: (1 + β²)·TP / ((1 + β²)·TP + β²·FN + FP); β = 2 weighs recall four times precision."""
    b2 = float(beta) ** 2
    tp = np.asarray(tp, dtype=float)
    return _ratio((1 + b2) * tp, (1 + b2) * tp + b2 * np.asarray(fn) + np.asarray(fp))


def recognition_quality(tp, fp, fn):
    """Recognition quality: RQ = TP / (TP + ½·FP + ½·FN) (the instance F1 score)."""
    return _ratio(tp, np.asarray(tp) + 0.5 * np.asarray(fp) + 0.5 * np.asarray(fn))


def segmentation_quality(tp, iou_sum):
    """Segmentation quality: SQ = Σ IoU(matched pairs) / TP, the mean IoU of the matches (NaN without matches)."""
    return _ratio(iou_sum, tp)


def panoptic_quality(tp, fp, fn, iou_sum):
    """Panoptic quality: PQ = Σ IoU(matched pairs) / (TP + ½·FP + ½·FN) = SQ·RQ (0 when nothing matches)."""
    return _ratio(iou_sum, np.asarray(tp) + 0.5 * np.asarray(fp) + 0.5 * np.asarray(fn))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """What every metric is computed from: true/false positives, false negatives and the summed IoU of matches."""

    tp: np.ndarray | float
    fp: np.ndarray | float
    fn: np.ndarray | float
    iou_sum: np.ndarray | float = 0.0


@dataclass(frozen=True)
class Metric:
    """One metric: its key in the outputs, long name, direction, level and how it is computed.

    ``direction`` is ``"higher"`` or ``"lower"`` (which is better) or ``"count"``; ``level`` is
    ``"voxel"`` (from voxel counts), ``"instance"`` (from matched instances) or ``"landmark"``
    (from centroids); ``stages`` lists the stages that report it. ``function(counts, beta)``
    computes it from :class:`Counts` (landmark metrics have no such function: ``None``).
    """

    name: str
    long_name: str
    direction: str
    needs_spacing: bool
    level: str
    stages: tuple[str, ...]
    function: Callable[[Counts, float], object] | None
    formula: str

    def __call__(self, counts: Counts, beta: float = 2.0):
        if self.function is None:
            raise SpinemetsError(f"metric {self.name!r} is computed from centroids, not from counts")
        return self.function(counts, beta)


def _doc(f) -> str:
    return f.__doc__.split(":", 1)[1].strip()


def _registry() -> dict[str, Metric]:
    both, mets, vert = STAGE_NAMES, ("metastases",), ("vertebrae",)
    m = [
        Metric("dice", "Dice similarity coefficient (voxels)", "higher", False, "voxel", both,
               lambda c, b: dice(c.tp, c.fp, c.fn), _doc(dice)),
        Metric("iou", "Intersection over union (voxels)", "higher", False, "voxel", both,
               lambda c, b: iou(c.tp, c.fp, c.fn), _doc(iou)),
        Metric("precision", "Precision (voxels)", "higher", False, "voxel", both,
               lambda c, b: precision(c.tp, c.fp, c.fn), _doc(precision)),
        Metric("recall", "Recall (voxels)", "higher", False, "voxel", both,
               lambda c, b: recall(c.tp, c.fp, c.fn), _doc(recall)),
        Metric("fbeta", "F-beta score (voxels)", "higher", False, "voxel", both,
               lambda c, b: fbeta(c.tp, c.fp, c.fn, b), _doc(fbeta)),
        Metric("voxel_tp", "True positive voxels", "count", False, "voxel", both, lambda c, b: c.tp, "TP"),
        Metric("voxel_fp", "False positive voxels", "count", False, "voxel", both, lambda c, b: c.fp, "FP"),
        Metric("voxel_fn", "False negative voxels", "count", False, "voxel", both, lambda c, b: c.fn, "FN"),
        Metric("tp", "True positive instances (matched pairs)", "count", False, "instance", both,
               lambda c, b: c.tp, "matched pairs"),
        Metric("fp", "False positive instances (unmatched predictions)", "count", False, "instance", both,
               lambda c, b: c.fp, "predicted instances without a match"),
        Metric("fn", "False negative instances (unmatched references)", "count", False, "instance", both,
               lambda c, b: c.fn, "reference instances without a match"),
        Metric("lesion_precision", "Lesion-wise precision", "higher", False, "instance", mets,
               lambda c, b: precision(c.tp, c.fp, c.fn), _doc(precision)),
        Metric("lesion_recall", "Lesion-wise recall (detection sensitivity)", "higher", False, "instance", mets,
               lambda c, b: recall(c.tp, c.fp, c.fn), _doc(recall)),
        Metric("lesion_fbeta", "Lesion-wise F-beta score", "higher", False, "instance", mets,
               lambda c, b: fbeta(c.tp, c.fp, c.fn, b), _doc(fbeta)),
        Metric("rq", "Recognition quality", "higher", False, "instance", both,
               lambda c, b: recognition_quality(c.tp, c.fp, c.fn), _doc(recognition_quality)),
        Metric("sq", "Segmentation quality", "higher", False, "instance", both,
               lambda c, b: segmentation_quality(c.tp, c.iou_sum), _doc(segmentation_quality)),
        Metric("pq", "Panoptic quality", "higher", False, "instance", both,
               lambda c, b: panoptic_quality(c.tp, c.fp, c.fn, c.iou_sum), _doc(panoptic_quality)),
        Metric("centroid_distance_mm", "Distance between predicted and reference centroid (mm)", "lower", True,
               "landmark", vert, None, "‖c_pred − c_ref‖ in millimetres (NaN when either label is absent)"),
        Metric("identified", "Vertebra identified (VerSe rule)", "higher", True, "landmark", vert, None,
               f"1 when ‖c_pred − c_ref‖ < {ID_DISTANCE_MM:g} mm and c_ref is the reference centroid closest "
               "to c_pred, else 0 (NaN when the vertebra is absent from the reference)"),
        Metric("identification_rate", "Identification rate (VerSe)", "higher", True, "landmark", vert, None,
               "identified reference vertebrae / reference vertebrae"),
    ]
    return {metric.name: metric for metric in m}


#: All metrics by output key, in output order.
METRICS: dict[str, Metric] = _registry()


@dataclass(frozen=True)
class ScoringOptions:
    """How cases are scored, as one object from the command line to the metrics: ``beta`` of the
    F-beta scores, ``match`` (one of :data:`MATCH_RULES`) and ``connectivity`` (6, 18 or 26) of the
    lesion components."""

    beta: float = 2.0
    match: str = "iou"
    connectivity: int = 26


def metric_names(stage: str) -> list[str]:
    """Keys of the metrics a stage reports, in output order."""
    check_stage(stage)
    return [name for name, m in METRICS.items() if stage in m.stages]


def check_match(match: str) -> None:
    if match not in MATCH_RULES:
        raise unknown_choice("matching rule", match, MATCH_RULES, "--match")


# ---------------------------------------------------------------------------------------------
# Counts: one pass over the union foreground
# ---------------------------------------------------------------------------------------------


def union_box(ref: np.ndarray, pred: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box (tuple of slices) of the voxels labelled in either 3-D array; None when both are empty.

    Uses maximum projections, not a full-size mask: over z first (one pass over each array), which
    gives the box in y and x; then, inside that box only, over each z slice.
    """
    plane = np.zeros(ref.shape[1:], dtype=bool)
    for array in (ref, pred):
        plane |= array.max(axis=0) != 0
    rows, cols = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
    if rows.size == 0:
        return None
    y, x = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
    slab = np.zeros(ref.shape[0], dtype=bool)
    for array in (ref, pred):
        slab |= array[:, y, x].max(axis=(1, 2)) != 0
    where = np.flatnonzero(slab)
    return slice(int(where[0]), int(where[-1]) + 1), y, x


def pair_table(a: np.ndarray, b: np.ndarray, n_a: int, n_b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count co-occurring value pairs: returns (values of a, values of b, voxel counts), pairs with count > 0.

    ``a`` and ``b`` are 1-D non-negative integer arrays of equal length with values below ``n_a``
    and ``n_b``. A dense ``np.bincount`` over ``a·n_b + b`` is used when the table is small, a
    sparse ``np.unique`` otherwise.
    """
    codes = a.astype(np.int64) * n_b + b
    if n_a * n_b <= _DENSE_TABLE_LIMIT:
        counts = np.bincount(codes, minlength=n_a * n_b)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:
        keys, counts = np.unique(codes, return_counts=True)
    return keys // n_b, keys % n_b, counts.astype(np.int64)


def confusion_matrix(ref: np.ndarray, pred: np.ndarray, n_labels: int) -> np.ndarray:
    """Voxel confusion matrix ``C[r, p]`` = voxels with reference label r and predicted label p.

    Counted over the union foreground only (``C[0, 0]``, the shared background, is left 0), with one
    ``np.bincount`` of ``r·K + p``; labels must be integers in ``0 .. n_labels - 1``.
    """
    fg = ref != 0
    fg |= pred != 0
    r, p, c = pair_table(ref[fg], pred[fg], n_labels, n_labels)
    table = np.zeros((n_labels, n_labels), dtype=np.int64)
    table[r, p] = c
    return table


def voxel_counts(table: np.ndarray) -> Counts:
    """Per-label voxel TP, FP, FN (arrays indexed by label) from a confusion matrix."""
    tp = np.diag(table).astype(np.int64)
    return Counts(tp=tp, fp=table.sum(axis=0) - tp, fn=table.sum(axis=1) - tp)


@dataclass(frozen=True)
class Matches:
    """Connected components of both arrays and their one-to-one matches.

    ``ref_class``/``pred_class`` give the class of each component (index 0 is background);
    ``ref_ids``, ``pred_ids`` and ``ious`` describe the matched pairs.
    """

    ref_class: np.ndarray
    pred_class: np.ndarray
    ref_ids: np.ndarray
    pred_ids: np.ndarray
    ious: np.ndarray
    #: The component maps (ids as in ``ref_class``/``pred_class``), where asked for (``keep_components``).
    ref_components: np.ndarray | None = None
    pred_components: np.ndarray | None = None

    def counts(self, n_labels: int) -> Counts:
        """Instance TP, FP, FN and summed IoU per class (arrays indexed by class value)."""
        n_ref = np.bincount(self.ref_class[1:], minlength=n_labels)[:n_labels]
        n_pred = np.bincount(self.pred_class[1:], minlength=n_labels)[:n_labels]
        cls = self.ref_class[self.ref_ids]
        tp = np.bincount(cls, minlength=n_labels)[:n_labels]
        iou_sum = np.bincount(cls, weights=self.ious, minlength=n_labels)[:n_labels]
        return Counts(tp=tp, fp=n_pred - tp, fn=n_ref - tp, iou_sum=iou_sum)


def match_pairs(ref_ids, pred_ids, inter, ref_size, pred_size, match: str = "iou"):
    """One-to-one matches among candidate pairs; returns (ref ids, pred ids, IoUs) of the matches.

    ``inter`` is the overlap of each candidate pair, ``ref_size``/``pred_size`` the component sizes
    (indexed by id). ``"iou"``: pairs with IoU > :data:`IOU_THRESHOLD` (0.5), tested exactly in
    integers (for 0.5: 3·|A∩B| > |A| + |B|); such a pair is unique for both members. ``"overlap"``: pairs with any
    overlap, taken greedily by decreasing IoU (ties by reference id, then prediction id) while both
    members are still free.
    """
    check_match(match)
    ref_ids = np.asarray(ref_ids, dtype=np.int64)
    pred_ids = np.asarray(pred_ids, dtype=np.int64)
    inter = np.asarray(inter, dtype=np.int64)
    union = ref_size[ref_ids] + pred_size[pred_ids] - inter
    if match == "iou":  # IoU > p/q  <=>  (p + q)|A∩B| > p(|A| + |B|), exactly in integers (p/q = 1/2: 3|A∩B| > |A| + |B|)
        p, q = Fraction(IOU_THRESHOLD).limit_denominator(1000).as_integer_ratio()
        keep = (p + q) * inter > p * (ref_size[ref_ids] + pred_size[pred_ids])
        return ref_ids[keep], pred_ids[keep], inter[keep] / union[keep]
    keep = inter > 0
    ref_ids, pred_ids, inter, union = ref_ids[keep], pred_ids[keep], inter[keep], union[keep]
    ious = inter / union
    order = np.lexsort((pred_ids, ref_ids, -ious))
    used_ref, used_pred, chosen = set(), set(), []
    for i in order:
        r, p = int(ref_ids[i]), int(pred_ids[i])
        if r not in used_ref and p not in used_pred:
            used_ref.add(r)
            used_pred.add(p)
            chosen.append(i)
    chosen = np.asarray(chosen, dtype=np.int64)
    return ref_ids[chosen], pred_ids[chosen], ious[chosen]


def _c_array(array: np.ndarray) -> np.ndarray:
    """The array itself when C-contiguous and writeable (as cc3d needs), else a C-ordered copy."""
    if array.flags.c_contiguous and array.flags.writeable:
        return array
    return np.array(array, order="C")


def match_components(ref: np.ndarray, pred: np.ndarray, match: str = "iou", connectivity: int = 26,
                     keep_components: bool = False) -> Matches:
    """Connected components of every class in both label arrays, matched within each class.

    One multi-label ``cc3d.connected_components`` pass per array (components never join different
    labels), then one count of (reference component, predicted component) pairs over the foreground
    gives every overlap, and from it every IoU, at once. ``keep_components`` keeps the two
    component maps in the result (for :func:`lesion_errors`).
    """
    import cc3d

    if connectivity not in (6, 18, 26):
        raise SpinemetsError(f"connectivity must be 6, 18 or 26, not {connectivity!r}")
    ref_cc, n_ref = cc3d.connected_components(_c_array(ref), connectivity=connectivity, return_N=True)
    pred_cc, n_pred = cc3d.connected_components(_c_array(pred), connectivity=connectivity, return_N=True)
    fg = ref != 0
    fg |= pred != 0
    rc, pc = ref_cc[fg], pred_cc[fg]
    ref_class = np.zeros(n_ref + 1, dtype=np.int64)
    ref_class[rc] = ref[fg]
    pred_class = np.zeros(n_pred + 1, dtype=np.int64)
    pred_class[pc] = pred[fg]
    ref_class[0] = pred_class[0] = 0
    ref_size = np.bincount(rc, minlength=n_ref + 1)
    pred_size = np.bincount(pc, minlength=n_pred + 1)
    both = (rc != 0) & (pc != 0)
    r, p, inter = pair_table(rc[both], pc[both], n_ref + 1, n_pred + 1)
    same = ref_class[r] == pred_class[p]
    ref_ids, pred_ids, ious = match_pairs(r[same], p[same], inter[same], ref_size, pred_size, match)
    if keep_components:
        return Matches(ref_class, pred_class, ref_ids, pred_ids, ious, ref_cc, pred_cc)
    return Matches(ref_class, pred_class, ref_ids, pred_ids, ious)


#: Columns of :func:`lesion_errors`.
LESION_ERROR_COLUMNS = ("outcome", "class", "component", "volume_ml", "z", "y", "x", "iou", "vertebra")


def lesion_errors(ref: np.ndarray, pred: np.ndarray, spacing_zyx=(1.0, 1.0, 1.0), vertebrae: np.ndarray | None = None,
                  match: str = "iou", connectivity: int = 26) -> list[dict]:
    """Every lesion of a case with its outcome, for error analysis: the matched ones (``TP``, from the
    reference), the missed reference lesions (``FN``) and the predicted lesions without a match (``FP``).

    The matching is the lesion-level metrics' own (:func:`match_components`). Each row has the
    lesion's class name, component id, volume (mL), centroid (voxel indices z, y, x), IoU with its
    match (NaN otherwise) and, given a vertebra label map on the same grid, the vertebra holding
    most of its voxels (``""`` outside every vertebra).
    """
    from spinemets.labels import label_names

    lesion_names = label_names("metastases")
    vertebra_names = label_names("vertebrae")
    found = match_components(ref, pred, match, connectivity, keep_components=True)
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    matched_ref = dict(zip(found.ref_ids.tolist(), found.ious.tolist()))
    matched_pred = set(found.pred_ids.tolist())
    rows = []
    for side, components, classes in (("ref", found.ref_components, found.ref_class),
                                      ("pred", found.pred_components, found.pred_class)):
        ids = components.ravel()
        nonzero = np.flatnonzero(ids)
        if not nonzero.size:
            continue
        comp = ids[nonzero]
        n = len(classes)
        size = np.bincount(comp, minlength=n)
        zyx = np.unravel_index(nonzero, components.shape)
        sums = [np.bincount(comp, weights=axis, minlength=n) for axis in zyx]
        host = {}
        if vertebrae is not None:
            levels = vertebrae.ravel()[nonzero].astype(np.int64)
            inside = levels > 0
            if inside.any():
                pairs = np.stack([comp[inside], levels[inside]], axis=1)
                uniq, counts = np.unique(pairs, axis=0, return_counts=True)
                for (c, level), count in zip(uniq.tolist(), counts.tolist()):
                    if count > host.get(c, (0, 0))[1]:
                        host[c] = (level, count)
        for c in range(1, n):
            if size[c] == 0:
                continue
            if side == "ref":
                outcome, iou = ("TP", matched_ref[c]) if c in matched_ref else ("FN", math.nan)
            elif c in matched_pred:
                continue  # a matched prediction: its reference lesion's row stands for the pair
            else:
                outcome, iou = "FP", math.nan
            level = host.get(c, (0, 0))[0]
            rows.append({"outcome": outcome, "class": lesion_names.get(int(classes[c]), str(classes[c])), "component": c,
                         "volume_ml": float(size[c]) * voxel_ml,
                         **{axis: float(total[c] / size[c]) for axis, total in zip("zyx", sums)},
                         "iou": iou, "vertebra": vertebra_names.get(level, "") if level else ""})
    return rows


def label_instance_counts(voxels: Counts, match: str = "iou") -> Counts:
    """Instance counts when each label is one instance (vertebrae), per label, from voxel counts.

    A label present in both arrays is a match when its IoU > 0.5 (``"iou"``, tested as
    3·TP > |R| + |P|) or when they overlap at all (``"overlap"``).
    """
    check_match(match)
    tp_v, n_ref, n_pred = voxels.tp, voxels.tp + voxels.fn, voxels.tp + voxels.fp
    matched = 3 * tp_v > n_ref + n_pred if match == "iou" else tp_v > 0
    tp = matched.astype(np.int64)
    iou_sum = np.where(matched, iou(tp_v, voxels.fp, voxels.fn), 0.0)
    fp = ((n_pred > 0) & ~matched).astype(np.int64)
    fn = ((n_ref > 0) & ~matched).astype(np.int64)
    return Counts(tp=tp, fp=fp, fn=fn, iou_sum=iou_sum)


def centroids(labels: np.ndarray, n_labels: int, spacing=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Centroid of every label in millimetres, shape (n_labels, 3) in array axis order; NaN for absent labels.

    The position of voxel (z, y, x) is (z·s_z, y·s_y, x·s_x), relative to the first voxel of
    ``labels``; one ``cc3d.statistics`` pass gives the voxel counts and mean indices of all labels.
    """
    import cc3d

    labels = _c_array(labels)
    if labels.size <= n_labels:  # cc3d.statistics needs more voxels than the largest label value
        labels = np.pad(labels, ((0, n_labels // max(1, labels[0].size) + 1), (0, 0), (0, 0)))
    stats = cc3d.statistics(labels)
    out = np.full((n_labels, 3), np.nan)
    k = min(n_labels, len(stats["voxel_counts"]))
    present = np.flatnonzero(np.asarray(stats["voxel_counts"][:k]) > 0)
    present = present[present > 0]
    out[present] = np.asarray(stats["centroids"], dtype=float)[present] * np.asarray(spacing, dtype=float)
    return out


def identification(ref_centroids: np.ndarray, pred_centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centroid distance (mm) and VerSe identification per label (rows of the centroid arrays).

    ``identified[v]`` is 1 when ‖c_pred[v] − c_ref[v]‖ < :data:`ID_DISTANCE_MM` and no other
    reference centroid is closer to c_pred[v]; 0 when the reference has v but it is not identified
    (also when the prediction lacks v); NaN when the reference lacks v.
    """
    dist = np.linalg.norm(pred_centroids - ref_centroids, axis=1)
    ref_present = ~np.isnan(ref_centroids[:, 0])
    identified = np.where(ref_present, 0.0, np.nan)
    refs = ref_centroids[ref_present]
    for v in np.flatnonzero(ref_present & ~np.isnan(pred_centroids[:, 0])):
        closest = np.linalg.norm(refs - pred_centroids[v], axis=1).min()
        identified[v] = float(dist[v] < ID_DISTANCE_MM and dist[v] <= closest)
    return dist, identified


# ---------------------------------------------------------------------------------------------
# Per case
# ---------------------------------------------------------------------------------------------


def check_label_kind(array: np.ndarray, source) -> None:
    """A SpinemetsError naming ``source`` when the array is empty or not of a number type."""
    if array.dtype.kind not in "fui" and array.dtype != bool:
        raise SpinemetsError(f"{source}: label map has voxel type {array.dtype}; expected integers")
    if array.size == 0:
        raise SpinemetsError(f"{source}: label map is empty")


def check_labels(array: np.ndarray, stage: str, source) -> np.ndarray:
    """The array as non-negative integers within the stage's labels, or a SpinemetsError naming ``source``."""
    check_label_kind(array, source)
    if array.dtype.kind == "f":
        if not np.array_equal(array, np.round(array)):
            raise SpinemetsError(f"{source}: label map holds non-integer values")
        array = array.astype(np.int32)
    low = int(array.min()) if array.dtype.kind == "i" else 0
    high = int(array.max())
    n_max = max(foreground_labels(stage).values())
    if low < 0 or high > n_max:
        values = np.unique(array[(array < 0) | (array > n_max)])
        shown = ", ".join(str(int(v)) for v in values[:10]) + (" ..." if values.size > 10 else "")
        raise SpinemetsError(
            f"{source}: holds label value(s) {shown} outside the {stage} stage (0 background, 1-{n_max})"
        )
    if array.dtype == bool:
        array = array.view(np.uint8)
    return array


def evaluate_case(
    ref: np.ndarray,
    pred: np.ndarray,
    stage: str,
    spacing=(1.0, 1.0, 1.0),
    beta: float = 2.0,
    match: str = "iou",
    connectivity: int = 26,
    sources: tuple = ("reference", "prediction"),
) -> dict[str, dict[str, float]]:
    """All metrics of one case: ``{class name: {metric key: value}}`` (see :data:`METRICS`).

    ``ref`` and ``pred`` are label arrays of one shape in (z, y, x) order, ``spacing`` the voxel
    size in mm in the same order. Metastases: voxel and lesion metrics per class. Vertebrae: voxel,
    instance (each label one instance) and landmark metrics per vertebra, plus the case's
    identification rate under class ``"all"``. ``sources`` name the arrays in error messages.
    """
    check_stage(stage)
    check_match(match)
    if ref.shape != pred.shape:
        raise SpinemetsError(f"{sources[1]}: shape {pred.shape} differs from {sources[0]} ({ref.shape})")
    check_label_kind(ref, sources[0])
    check_label_kind(pred, sources[1])
    classes = foreground_labels(stage)
    n_labels = max(classes.values()) + 1
    box = union_box(ref, pred)
    empty = box is None
    if not empty:  # outside the box both hold 0 only: the values are checked where they can be wrong
        ref, pred = ref[box], pred[box]
    ref = check_labels(ref, stage, sources[0])
    pred = check_labels(pred, stage, sources[1])
    zeros = np.zeros(n_labels, dtype=np.int64)
    voxels = Counts(zeros, zeros, zeros) if empty else voxel_counts(confusion_matrix(ref, pred, n_labels))
    if stage == "vertebrae":
        instances = label_instance_counts(voxels, match)
        if empty:
            dist = identified = np.full(n_labels, np.nan)
        else:
            dist, identified = identification(centroids(ref, n_labels, spacing), centroids(pred, n_labels, spacing))
    else:
        instances = Counts(zeros, zeros, zeros) if empty else match_components(ref, pred, match, connectivity).counts(
            n_labels
        )
        dist = identified = None
    return class_rows(stage, classes, voxels, instances, beta, dist, identified)


def class_rows(stage, classes, voxels, instances, beta, dist, identified) -> dict[str, dict[str, float]]:
    """``{class name: {metric key: value}}`` from a case's voxel and instance counts (and landmarks)."""
    result = {}
    for name, value in classes.items():
        row = {}
        for key in metric_names(stage):
            metric = METRICS[key]
            if metric.level == "voxel":
                row[key] = _at(metric(voxels, beta), value)
            elif metric.level == "instance":
                row[key] = _at(metric(instances, beta), value)
            elif key == "centroid_distance_mm":
                row[key] = float(dist[value])
            elif key == "identified":
                row[key] = float(identified[value])
        result[name] = row
    if stage == "vertebrae":
        found = identified[1:][~np.isnan(identified[1:])]
        result["all"] = {"identification_rate": float(found.mean()) if found.size else math.nan}
    return result


def _at(values, index: int) -> float:
    return float(np.asarray(values, dtype=float)[index])


# ---------------------------------------------------------------------------------------------
# Folder
# ---------------------------------------------------------------------------------------------


__all__ = [
    "METRICS", "MATCH_RULES", "ScoringOptions", "ID_DISTANCE_MM", "Counts", "Metric", "Matches", "dice", "iou", "precision", "recall",
    "fbeta", "recognition_quality", "segmentation_quality", "panoptic_quality", "metric_names", "confusion_matrix",
    "voxel_counts", "match_pairs", "match_components", "label_instance_counts", "centroids", "identification",
    "evaluate_case",
]


def vertebra_shifts(ref: np.ndarray, pred: np.ndarray) -> list[dict]:
    """For each reference vertebra, the predicted label covering most of its voxels, for error analysis.

    Rows: ``reference``, ``predicted`` (name, ``""`` where the vertebra is missed, that is mostly
    background), ``share`` (the fraction of its voxels with that label) and ``shift`` (predicted minus
    reference level, in label steps: +1 is one level too low, e.g. T8 for T7; 0 correct; NaN missed).
    """
    from spinemets.labels import label_names

    names = label_names("vertebrae")
    n = max(names) + 1
    fg = ref != 0
    table = np.bincount(ref[fg].astype(np.int64) * n + np.clip(pred[fg].astype(np.int64), 0, n - 1),
                        minlength=n * n).reshape(n, n)
    rows = []
    for level in range(1, n):
        total = int(table[level].sum())
        if total == 0:
            continue
        best = int(np.argmax(table[level]))
        rows.append({"reference": names.get(level, str(level)), "predicted": names.get(best, "") if best else "",
                     "share": float(table[level, best]) / total,
                     "shift": float(best - level) if best else math.nan})
    return rows
