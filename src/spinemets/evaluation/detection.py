"""Lesion detection as the detection literature reports it: FROC, sensitivity at fixed false
positives per case, lesion-size bands, spine regions and patient-level detection.

Part of the metrics step (``spinemets evaluate``, :func:`spinemets.evaluation.evaluate.evaluate_folders`).

**Scores.** Every predicted lesion (a connected component of one class, as the lesion metrics
match them, or of the whole lesion mask for ``"any"``) has a confidence: the maximum of the
detection map (``metastases_confidence.nii.gz``, written by ``spinemets predict`` beside the label
map) over its voxels. Without a detection map every predicted lesion has confidence 1 (a hard
label map is its own one-hot probability), and the curve is one operating point.

**Matching** is done once, on the whole label map, by the lesion metrics' own rule
(:func:`spinemets.evaluation.metrics.match_components`: same type, IoU > 0.5; or any overlap, greedy by
IoU). Lowering the threshold adds predicted lesions with their fixed outcome (matched: true
positive; unmatched: false positive); with IoU > 0.5 that is exactly re-matching at every
threshold (a pair above 0.5 is unique), with ``"overlap"`` it is a convention.

**FROC** (:func:`froc_curve`): for each distinct confidence t, from the highest down, the
predicted lesions with confidence >= t are kept; sensitivity = matched reference lesions / all
reference lesions, false positives per case = unmatched kept predictions / number of cases (all
cases, lesion-free ones included). Ties enter together.

**Sensitivity at f false positives per case** (:func:`sensitivity_at`): the sensitivity of the
lowest threshold whose false positives per case are <= f (a threshold one can choose; 0 when even
the highest one has more). Beyond the curve's last point (all predicted lesions kept) it stays at
that point's sensitivity. The **CPM** is the mean over :data:`FP_RATES` (0.125 ... 8, as the
lung-nodule competition). The **area** (:func:`froc_area`) is the integral of that step function
from 0 to :data:`AUC_MAX_FP` false positives per case, divided by :data:`AUC_MAX_FP` (so 1 is a
perfect detector).

**Size bands** (:data:`VOLUME_BANDS_ML`: < 0.5, 0.5-2, 2-10, >= 10 mL, lower edge inclusive):
reference lesions by their own volume give the sensitivity and the mean lesion Dice (2|R∩P| /
(|R| + |P|) with its matched prediction, 0 when missed); unmatched predicted lesions by their
own volume give the false positives. **Regions** (cervical, thoracic, lumbar, sacral, and
outside the spine): a lesion's region is that of the vertebra label holding most of its voxels
in the vertebra map beside the prediction (``vertebrae.nii.gz`` that ``spinemets predict``
writes; no region table without it).

**Patients** (:func:`patient_table`): a case with reference lesions is detected when at least one
of them is matched; patient sensitivity = detected cases / cases with lesions; patient specificity
= lesion-free reference cases without any predicted lesion / lesion-free reference cases.

Bootstrap intervals resample cases with replacement (:data:`spinemets.evaluation.metrics.N_BOOTSTRAP`
replicates, seed :data:`spinemets.evaluation.metrics.SEED`, 95 % percentile intervals), as for the other
metrics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError
from spinemets.labels import LESION_TYPES, REGION_OF_VERTEBRA, label_names

#: False-positive rates per case of the competition performance metric (CPM, lung-nodule detection).
FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: The area under the FROC is taken from 0 to this many false positives per case.
AUC_MAX_FP: float = 8.0
#: Edges (mL) of the reference-lesion volume bands: < 0.5, 0.5-2, 2-10, >= 10 (lower edge inclusive).
VOLUME_BANDS_ML: tuple[float, ...] = (0.5, 2.0, 10.0)
#: Regions of the region table, in order; "outside" is a lesion touching no vertebra label.
REGIONS: tuple[str, ...] = ("cervical", "thoracic", "lumbar", "sacral", "outside")
#: The classes of the detection tables: each lesion type, and "any" (type ignored).
DETECTION_CLASSES: tuple[str, ...] = (*LESION_TYPES, "any")

FROC_FIELDS = ["class", "threshold", "sensitivity", "fp_per_case", "tp", "fp", "n_reference", "n_cases"]
SUMMARY_FIELDS = ["class", "metric", "value", "ci_low", "ci_high", "n_reference", "n_cases"]
BAND_FIELDS = ["grouping", "band", "class", "n_reference", "tp", "sensitivity", "fp", "fp_per_case", "dice",
               "n_cases"]
PATIENT_FIELDS = ["class", "metric", "value", "ci_low", "ci_high", "n"]


def band_names(edges=VOLUME_BANDS_ML) -> list[str]:
    """Names of the volume bands: ``<0.5 mL``, ``0.5-2 mL``, ``2-10 mL``, ``>=10 mL``."""
    e = [f"{x:g}" for x in edges]
    return [f"<{e[0]} mL", *(f"{a}-{b} mL" for a, b in zip(e, e[1:])), f">={e[-1]} mL"]


def volume_band(volume_ml) -> np.ndarray:
    """Band index of each volume (0 for the smallest band); lower edges are inclusive."""
    return np.searchsorted(np.asarray(VOLUME_BANDS_ML), np.asarray(volume_ml, dtype=float), side="right")


def _region_of_label() -> np.ndarray:
    """Region index (into :data:`REGIONS`) of every vertebra label value; 0 (background) is "outside"."""
    names = label_names("vertebrae")
    out = np.full(max(names) + 1, REGIONS.index("outside"), dtype=np.int64)
    for value, name in names.items():
        if value:
            out[value] = REGIONS.index(REGION_OF_VERTEBRA[name])
    return out


_REGION_OF_LABEL = _region_of_label()


@dataclass
class Detections:
    """The lesions of one case and one class, with what the tables need.

    Predicted lesions: ``pred_score`` (confidence), ``pred_tp`` (matched), ``pred_ml`` (volume),
    ``pred_region`` (index into :data:`REGIONS`, -1 unknown). Reference lesions: ``ref_ml``,
    ``ref_score`` (its match's confidence, NaN when missed), ``ref_dice`` (0 when missed),
    ``ref_region``.
    """

    pred_score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pred_tp: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    pred_ml: np.ndarray = field(default_factory=lambda: np.zeros(0))
    pred_region: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    ref_ml: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_score: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_dice: np.ndarray = field(default_factory=lambda: np.zeros(0))
    ref_region: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))


def component_max(components: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """The maximum of ``values`` over each component id 1..n-1 (index 0 and empty ids: 0)."""
    out = np.zeros(n, dtype=np.float64)
    if components.size:
        np.maximum.at(out, components, values.astype(np.float64, copy=False))
    out[0] = 0.0
    return out


def _hosts(components: np.ndarray, levels: np.ndarray, n: int) -> np.ndarray:
    """For each component id, the vertebra label holding most of its voxels (0: none)."""
    from spinemets.evaluation.metrics import pair_table

    host = np.zeros(n, dtype=np.int64)
    inside = levels > 0
    if not inside.any():
        return host
    c, lv, count = pair_table(components[inside], levels[inside].astype(np.int64), n, len(_REGION_OF_LABEL))
    order = np.lexsort((-lv, count, c))  # per component, the largest count last (ties: the lower label)
    c, lv = c[order], lv[order]
    last = np.r_[c[1:] != c[:-1], True]
    host[c[last]] = lv[last]
    return host


def case_detections(ref: np.ndarray, pred: np.ndarray, confidence: np.ndarray | None, spacing_zyx,
                    vertebrae: np.ndarray | None = None, match: str = "iou", connectivity: int = 26,
                    found=None) -> dict[str, Detections]:
    """The :class:`Detections` of one case per class of :data:`DETECTION_CLASSES`.

    ``ref``/``pred`` are lesion label maps (0/1 lytic/2 sclerotic), ``confidence`` the detection
    map on the same grid (None: every predicted lesion has confidence 1), ``vertebrae`` a vertebra
    label map on the same grid (None: regions unknown, -1). ``found`` is the per-class
    :func:`spinemets.evaluation.metrics.match_components` result with its component maps, when the caller
    has it already.
    """
    from spinemets.evaluation.metrics import match_components

    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    if found is None:
        found = match_components(ref, pred, match, connectivity, keep_components=True)
    fg_ref = ref != 0
    fg_pred = pred != 0
    fg = fg_ref | fg_pred
    any_found = match_components(fg_ref.view(np.uint8), fg_pred.view(np.uint8), match, connectivity,
                                 keep_components=True)
    conf = None if confidence is None else confidence[fg]
    levels = None if vertebrae is None else vertebrae[fg]
    out = {}
    for key, m in (("per class", found), ("any", any_found)):
        sides = {}
        for side, comps, classes in (("ref", m.ref_components, m.ref_class), ("pred", m.pred_components, m.pred_class)):
            ids = comps[fg]
            n = len(classes)
            size = np.bincount(ids, minlength=n)
            region = (_REGION_OF_LABEL[_hosts(ids, levels, n)] if levels is not None
                      else np.full(n, -1, dtype=np.int64))
            score = (np.where(size > 0, 1.0, 0.0) if conf is None else component_max(ids, conf, n))
            sides[side] = (size, region, score, classes)
        ref_size, ref_region, _, ref_class = sides["ref"]
        pred_size, pred_region, pred_score, pred_class = sides["pred"]
        if conf is not None:
            lacking = np.flatnonzero((pred_size > 0) & (pred_score <= 0))
            lacking = lacking[lacking > 0]
            if lacking.size:
                raise SpinemetsError(f"detection map gives {lacking.size} predicted lesion(s) no confidence (0 over "
                                     "all their voxels): it does not belong to this label map")
        partner_score = np.full(len(ref_class), np.nan)
        partner_score[m.ref_ids] = pred_score[m.pred_ids]
        dice = np.zeros(len(ref_class))
        dice[m.ref_ids] = 2 * m.ious / (1 + m.ious)
        matched_pred = np.zeros(len(pred_class), dtype=bool)
        matched_pred[m.pred_ids] = True
        wanted = ([(name, value) for value, name in enumerate(LESION_TYPES, start=1)] if key == "per class"
                  else [("any", 1)])
        for name, value in wanted:
            r = np.flatnonzero(ref_class == value)
            p = np.flatnonzero(pred_class == value)
            r, p = r[r > 0], p[p > 0]
            out[name] = Detections(pred_score=pred_score[p], pred_tp=matched_pred[p], pred_ml=pred_size[p] * voxel_ml,
                                   pred_region=pred_region[p], ref_ml=ref_size[r] * voxel_ml,
                                   ref_score=partner_score[r], ref_dice=dice[r], ref_region=ref_region[r])
    return {name: out[name] for name in DETECTION_CLASSES}


# ---------------------------------------------------------------------------------------------
# FROC over a set of cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Froc:
    """An FROC curve: one point per distinct confidence, from the highest threshold down."""

    threshold: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_reference: int
    n_cases: int

    @property
    def sensitivity(self) -> np.ndarray:
        if self.n_reference == 0:
            return np.full(self.tp.shape, np.nan)
        return self.tp / self.n_reference

    @property
    def fp_per_case(self) -> np.ndarray:
        return self.fp / self.n_cases


def _sorted_detections(per_case: list[Detections]):
    """All predicted lesions of the cases: (scores, tp flags, case index), highest score first."""
    scores = np.concatenate([d.pred_score for d in per_case]) if per_case else np.zeros(0)
    tps = np.concatenate([d.pred_tp for d in per_case]) if per_case else np.zeros(0, bool)
    case = (np.concatenate([np.full(d.pred_score.size, i) for i, d in enumerate(per_case)]) if per_case
            else np.zeros(0, int))
    order = np.argsort(-scores, kind="stable")
    return scores[order], tps[order].astype(bool), case[order].astype(np.int64)


def froc_curve(per_case: list[Detections]) -> Froc:
    """The FROC of the cases (one :class:`Detections` per case): see the module docstring."""
    if not per_case:
        raise SpinemetsError("no cases for an FROC curve")
    scores, tps, _ = _sorted_detections(per_case)
    last = np.r_[scores[1:] != scores[:-1], True] if scores.size else np.zeros(0, bool)
    tp = np.cumsum(tps)[last]
    fp = np.cumsum(~tps)[last]
    n_ref = int(sum(d.ref_ml.size for d in per_case))
    return Froc(scores[last], tp.astype(np.int64), fp.astype(np.int64), n_ref, len(per_case))


def _step_values(fp_per_case: np.ndarray, sensitivity: np.ndarray, rates) -> np.ndarray:
    """S(f) = sensitivity of the last point with fp_per_case <= f (0 before the first); rows are curves.

    ``fp_per_case`` and ``sensitivity`` have shape (..., K), non-decreasing along the last axis.
    """
    rates = np.asarray(rates, dtype=float)
    fpc = np.asarray(fp_per_case, dtype=float)
    sens = np.asarray(sensitivity, dtype=float)
    k = (fpc[..., None, :] <= rates[:, None] + 1e-12).sum(axis=-1)  # points allowed per rate
    padded = np.concatenate([np.zeros(sens.shape[:-1] + (1,)), sens], axis=-1)
    return np.take_along_axis(padded, k, axis=-1)


def sensitivity_at(curve: Froc, rates=FP_RATES) -> np.ndarray:
    """Sensitivity at each false-positive rate per case (step rule of the module docstring)."""
    if curve.n_reference == 0:
        return np.full(len(rates), np.nan)
    return _step_values(curve.fp_per_case, curve.sensitivity, rates)


def _area(fp_per_case: np.ndarray, sensitivity: np.ndarray, max_fp: float) -> np.ndarray:
    """Normalised integral of the step function from 0 to ``max_fp`` (rows are curves)."""
    fpc = np.minimum(np.asarray(fp_per_case, dtype=float), max_fp)
    nxt = np.concatenate([fpc[..., 1:], np.full(fpc.shape[:-1] + (1,), max_fp)], axis=-1)
    return (np.asarray(sensitivity, dtype=float) * (nxt - fpc)).sum(axis=-1) / max_fp


def froc_area(curve: Froc, max_fp: float = AUC_MAX_FP) -> float:
    """Area under the FROC step function from 0 to ``max_fp`` false positives per case, divided by ``max_fp``."""
    if curve.n_reference == 0:
        return math.nan
    return float(_area(curve.fp_per_case, curve.sensitivity, max_fp))


def _case_weights(n_cases: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_cases) multiplicities of the cases in bootstrap resamples (with replacement)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_cases, size=(n_boot, n_cases))
    flat = (np.arange(n_boot)[:, None] * n_cases + idx).ravel()
    return np.bincount(flat, minlength=n_boot * n_cases).reshape(n_boot, n_cases)


def _interval(reps: np.ndarray, level: float) -> tuple[float, float]:
    reps = reps[np.isfinite(reps)]
    if not reps.size:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    return float(low), float(high)


def froc_summary(per_case: list[Detections], rates=FP_RATES, max_fp: float = AUC_MAX_FP, n_boot: int | None = None,
                 seed: int | None = None, level: float | None = None, chunk: int = 250) -> dict[str, dict]:
    """Sensitivity at each rate, their mean (``cpm``) and the area (``auc_froc``), each with a case-bootstrap interval.

    Keys ``sensitivity@{rate}fp``, ``cpm``, ``auc_froc_{max_fp}fp``; each ``{value, ci_low, ci_high}``.
    """
    from spinemets.evaluation.metrics import BOOTSTRAP_LEVEL, N_BOOTSTRAP, SEED

    n_boot = N_BOOTSTRAP if n_boot is None else n_boot
    seed = SEED if seed is None else seed
    level = BOOTSTRAP_LEVEL if level is None else level
    curve = froc_curve(per_case)
    keys = [f"sensitivity@{r:g}fp" for r in rates] + ["cpm", f"auc_froc_{max_fp:g}fp"]
    at = sensitivity_at(curve, rates)
    values = [*at.tolist(), float(np.mean(at)), froc_area(curve, max_fp)]
    # bootstrap: the same sorted detections, each weighted by its case's multiplicity in the resample
    scores, tps, case = _sorted_detections(per_case)
    last = np.r_[scores[1:] != scores[:-1], True] if scores.size else np.zeros(0, bool)
    n_ref_case = np.array([d.ref_ml.size for d in per_case], dtype=float)
    weights = _case_weights(len(per_case), n_boot, seed)
    reps = np.empty((n_boot, len(keys)))
    for start in range(0, n_boot, chunk):
        w = weights[start:start + chunk].astype(float)
        n_ref = w @ n_ref_case
        det = w[:, case]
        tp = np.cumsum(det * tps, axis=1)[:, last]
        fp = np.cumsum(det * ~tps, axis=1)[:, last]
        with np.errstate(invalid="ignore", divide="ignore"):
            sens = tp / n_ref[:, None]
        fpc = fp / len(per_case)
        s = _step_values(fpc, sens, rates)
        block = np.column_stack([s, s.mean(axis=1), _area(fpc, sens, max_fp)])
        block[n_ref == 0] = np.nan
        reps[start:start + chunk] = block
    out = {}
    for j, key in enumerate(keys):
        low, high = _interval(reps[:, j], level)
        out[key] = {"value": values[j], "ci_low": low, "ci_high": high}
    return out


# ---------------------------------------------------------------------------------------------
# Tables of a folder
# ---------------------------------------------------------------------------------------------


def froc_rows(detections: dict[str, dict[str, Detections]]) -> list[dict]:
    """Rows of ``froc.csv``: per class, one row per threshold (highest first)."""
    rows = []
    for cls in DETECTION_CLASSES:
        curve = froc_curve([detections[c][cls] for c in detections])
        for t, tp, fp, s, f in zip(curve.threshold, curve.tp, curve.fp, curve.sensitivity, curve.fp_per_case):
            rows.append({"class": cls, "threshold": float(t), "sensitivity": float(s), "fp_per_case": float(f),
                         "tp": int(tp), "fp": int(fp), "n_reference": curve.n_reference, "n_cases": curve.n_cases})
    return rows


def froc_summary_rows(detections: dict[str, dict[str, Detections]], **kw) -> list[dict]:
    """Rows of ``froc_summary.csv``: per class the sensitivities at :data:`FP_RATES`, CPM and area."""
    rows = []
    for cls in DETECTION_CLASSES:
        per_case = [detections[c][cls] for c in detections]
        n_ref = int(sum(d.ref_ml.size for d in per_case))
        for key, entry in froc_summary(per_case, **kw).items():
            rows.append({"class": cls, "metric": key, **entry, "n_reference": n_ref, "n_cases": len(per_case)})
    return rows


def band_rows(detections: dict[str, dict[str, Detections]], with_regions: bool = True) -> list[dict]:
    """Rows of ``lesion_bands.csv``: sensitivity, false positives and mean lesion Dice per volume band
    (grouping ``volume``) and per spine region (grouping ``region``, where the vertebra maps are known)."""
    rows = []
    names = band_names()
    groupings = [("volume", names, volume_band)]
    if with_regions:
        groupings.append(("region", list(REGIONS), None))
    n_cases = len(detections)
    for grouping, bands, of in groupings:
        for cls in DETECTION_CLASSES:
            per_case = [detections[c][cls] for c in detections]
            ref_ml = np.concatenate([d.ref_ml for d in per_case])
            pred_ml = np.concatenate([d.pred_ml for d in per_case])
            if grouping == "volume":
                ref_band, pred_band = volume_band(ref_ml), volume_band(pred_ml)
            else:
                ref_band = np.concatenate([d.ref_region for d in per_case])
                pred_band = np.concatenate([d.pred_region for d in per_case])
            found = np.isfinite(np.concatenate([d.ref_score for d in per_case]))
            dice = np.concatenate([d.ref_dice for d in per_case])
            false = ~np.concatenate([d.pred_tp for d in per_case]).astype(bool)
            for b, band in enumerate(bands):
                here = ref_band == b
                n_ref, tp = int(here.sum()), int(found[here].sum())
                fp = int((false & (pred_band == b)).sum())
                rows.append({"grouping": grouping, "band": band, "class": cls, "n_reference": n_ref, "tp": tp,
                             "sensitivity": tp / n_ref if n_ref else math.nan, "fp": fp, "fp_per_case": fp / n_cases,
                             "dice": float(dice[here].mean()) if n_ref else math.nan, "n_cases": n_cases})
    return rows


def patient_table(detections: dict[str, dict[str, Detections]], n_boot: int | None = None, seed: int | None = None,
                  level: float | None = None) -> list[dict]:
    """Rows of ``patients.csv``: patient-level sensitivity and specificity per class, with case-bootstrap intervals."""
    from spinemets.evaluation.metrics import BOOTSTRAP_LEVEL, N_BOOTSTRAP, SEED

    n_boot = N_BOOTSTRAP if n_boot is None else n_boot
    seed = SEED if seed is None else seed
    level = BOOTSTRAP_LEVEL if level is None else level
    cases = list(detections)
    weights = _case_weights(len(cases), n_boot, seed).astype(float)
    rows = []
    for cls in DETECTION_CLASSES:
        per_case = [detections[c][cls] for c in cases]
        has = np.array([d.ref_ml.size > 0 for d in per_case])
        hit = np.array([bool(np.isfinite(d.ref_score).any()) for d in per_case])
        clean = np.array([d.pred_score.size == 0 for d in per_case])
        for metric, positives, wanted in (("patient_sensitivity", has, hit), ("patient_specificity", ~has, clean)):
            n = int(positives.sum())
            value = float((positives & wanted).sum() / n) if n else math.nan
            with np.errstate(invalid="ignore", divide="ignore"):
                reps = (weights @ (positives & wanted)) / (weights @ positives)
            low, high = _interval(reps, level)
            rows.append({"class": cls, "metric": metric, "value": value, "ci_low": low, "ci_high": high, "n": n})
    return rows


def threshold_for(curve: Froc, max_fp_per_case: float) -> float:
    """The lowest confidence threshold whose false positives per case stay <= ``max_fp_per_case``
    (the operating point :func:`sensitivity_at` reports); NaN when even the highest has more."""
    allowed = np.flatnonzero(curve.fp_per_case <= max_fp_per_case + 1e-12)
    return float(curve.threshold[allowed[-1]]) if allowed.size else math.nan


__all__ = [
    "FP_RATES", "AUC_MAX_FP", "VOLUME_BANDS_ML", "REGIONS", "DETECTION_CLASSES", "Detections", "Froc",
    "case_detections", "froc_curve", "sensitivity_at", "froc_area", "froc_summary", "froc_rows",
    "froc_summary_rows", "band_rows", "patient_table", "threshold_for", "band_names", "volume_band",
    "froc_figure",
]


#: Line colours of the FROC classes.
_FROC_COLOURS = {**{k: v for k, v in labels_mod.LESION_COLOURS.items()}, "any": (0.1, 0.1, 0.1)}


def froc_figure(rows, published: Sequence[Mapping] | None = None, max_fp: float | None = None,
                title: str = "FROC: lesion-wise sensitivity against false positives per case"):
    """The FROC curves of ``froc.csv`` rows (:func:`spinemets.evaluation.detection.froc_rows`), one line per class.

    Each curve is drawn as the step function the summary numbers use (sensitivity of the lowest
    threshold within a false-positive rate), from (0, 0) to its last point, the label map's own
    operating point (a filled marker). ``published`` adds points ``{label, sensitivity,
    fp_per_case}`` (sensitivity as a fraction) as open markers. The x axis is logarithmic from 1/16
    to ``max_fp`` (default: 8 or the largest value drawn). Built without pyplot (a
    :class:`matplotlib.figure.Figure`), so it can be written from a command line.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2), constrained_layout=True)
    ax = fig.add_subplot()
    rows = list(rows.to_dict("records") if hasattr(rows, "to_dict") else rows)
    largest = AUC_MAX_FP
    for cls in DETECTION_CLASSES:
        mine = [r for r in rows if r["class"] == cls]
        if not mine:
            continue
        fp = np.array([0.0] + [float(r["fp_per_case"]) for r in mine])
        sens = np.array([0.0] + [float(r["sensitivity"]) for r in mine])
        if not np.isfinite(sens).all():
            continue
        largest = max(largest, float(fp[-1]))
        ax.step(np.maximum(fp, 1 / 32), sens, where="post", color=_FROC_COLOURS.get(cls), label=f"{cls} (ours)")
        ax.plot([max(fp[-1], 1 / 32)], [sens[-1]], "o", color=_FROC_COLOURS.get(cls))
    for i, point in enumerate(published or []):
        ax.plot([float(point["fp_per_case"])], [float(point["sensitivity"])], marker="osD^v"[i % 5], mfc="none",
                linestyle="none", color="tab:green", label=str(point["label"]))
        largest = max(largest, float(point["fp_per_case"]))
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 16, max_fp or largest * 1.2)
    ax.set_xticks([r for r in FP_RATES if r <= (max_fp or largest * 1.2)])
    ax.set_xticklabels([f"{r:g}" for r in FP_RATES if r <= (max_fp or largest * 1.2)])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("false positives per case")
    ax.set_ylabel("lesion-wise sensitivity")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig
