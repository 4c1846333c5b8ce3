"""External validation on Spine-Mets-CT-SEG (TCIA): predictions against the collection's clinical table.

It serves the external-validation notebook (``06_external``). The collection (doi:10.7937/kh36-ds04;
its layout and a synthetic stand-in: :mod:`spinemets.cohort.tcia`) labels, per patient, which of the
vertebrae T1-L5 carry lesions and of which type, and gives a DICOM-SEG of those vertebrae. Our
prediction folder (:func:`spinemets.inference.predict.predict`) says the same per vertebra in each case's
``vertebrae.csv``. Rules:

* **Vertebrae compared**: T1 ... L5 (:data:`spinemets.cohort.tcia.TCIA_VERTEBRAE`), 17 per case, for every
  case of the prediction folder that is compared; each must be a row of the clinical table.
* **Reference** (:func:`read_clinical`): a vertebra's column of the clinical table, ``lytic``,
  ``blastic`` or ``mixed`` (``sclerotic`` is read as ``blastic``; case and spaces ignored), empty
  when it carries no lesion. Any other value is an error naming the file, row and column, and so
  is a ``vertebrae_with_lesions`` entry that disagrees with the columns.
* **Prediction** (:func:`read_predicted`): a vertebra has a lesion when its row of the case's
  ``vertebrae.csv`` counts at least one (``lesions``); its type is that row's ``lesion_quality``
  (``lytic`` when all its lesions are lytic, ``blastic`` when all are sclerotic, ``mixed``
  otherwise; :func:`spinemets.inference.localization.partial_sins`). A vertebra without a row (stage 1 did not
  find it) has no predicted lesion; lesions outside the spine belong to no vertebra.
* **Detection** (:func:`detection`): over all compared (case, vertebra) pairs, "the vertebra has a
  lesion": TP (both), FP (predicted only), FN (reference only), TN (neither); sensitivity =
  TP / (TP + FN), specificity = TN / (TN + FP); NaN when the denominator is zero (the rule of
  :mod:`spinemets.evaluation.metrics`).
* **Types** (:func:`type_confusion`): counts of (reference type, predicted type) over the same pairs,
  ``none`` for no lesion; rows are the reference, columns the prediction.
* **Stage-1 Dice per vertebra** (:func:`vertebra_dice`): the predicted ``vertebrae.nii.gz`` against
  the imported DICOM-SEG labels (``labelsTr/<case>.nii.gz`` of the raw dataset that
  :func:`spinemets.cohort.dataset.import_dataset` wrote), T1-L5; Dice = 2·TP / (2·TP + FP + FN) per label
  (:func:`spinemets.evaluation.metrics.dice`), NaN for a vertebra in neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd
import SimpleITK as sitk

from spinemets import labels as labels_mod
from spinemets.evaluation import metrics
from spinemets.errors import SpinemetsError
from spinemets.formats.images import check_same_geometry, read_image
from spinemets.fileio import require_dir, require_file, write_csv, write_json
from spinemets.errors import one_line
from spinemets.cohort.tcia import TCIA_VERTEBRAE

#: Lesion types compared; ``none`` is a vertebra without lesion.
TYPES = ("none", "lytic", "blastic", "mixed")
_READ_AS = {"": "none", "lytic": "lytic", "blastic": "blastic", "sclerotic": "blastic", "mixed": "mixed"}
TABLE_COLUMNS = ["case_id", "vertebra", "reference", "predicted"]


def read_clinical(path: str | Path) -> pd.DataFrame:
    """The clinical table as one row per (case, vertebra T1-L5): ``case_id, vertebra, reference``
    (a type of :data:`TYPES`); see the module's rules."""
    path = require_file(path, "clinical table")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise SpinemetsError(f"{path}: not a readable CSV clinical table ({one_line(exc)})") from None
    missing = [c for c in ("subject_id", *TCIA_VERTEBRAE) if c not in table.columns]
    if missing:
        raise SpinemetsError(f"{path}: clinical table lacks column(s) {missing}")
    rows = []
    for number, record in enumerate(table.to_dict("records"), start=2):  # row 1 is the header
        case = record["subject_id"].strip()
        kinds = {}
        for vertebra in TCIA_VERTEBRAE:
            value = " ".join(str(record[vertebra]).split()).lower()
            if value not in _READ_AS:
                raise SpinemetsError(f"{path}: row {number} ({case}), column {vertebra}: lesion type {value!r}; "
                                     "expected lytic, blastic (sclerotic), mixed or empty")
            kinds[vertebra] = _READ_AS[value]
            rows.append({"case_id": case, "vertebra": vertebra, "reference": kinds[vertebra]})
        if "vertebrae_with_lesions" in table.columns:
            listed = [v.strip() for v in str(record["vertebrae_with_lesions"]).split(";") if v.strip()]
            marked = [v for v in TCIA_VERTEBRAE if kinds[v] != "none"]
            if sorted(listed) != sorted(marked):
                raise SpinemetsError(f"{path}: row {number} ({case}): vertebrae_with_lesions lists {listed}, but the "
                                     f"vertebra columns mark {marked}")
    frame = pd.DataFrame(rows, columns=["case_id", "vertebra", "reference"])
    duplicated = sorted(set(frame.loc[frame.duplicated(["case_id", "vertebra"]), "case_id"]))
    if duplicated:
        raise SpinemetsError(f"{path}: subject(s) {duplicated} have more than one row")
    return frame


def read_predicted(pred_dir: str | Path, cases: Iterable[str]) -> pd.DataFrame:
    """The prediction per (case, vertebra T1-L5): ``case_id, vertebra, predicted`` from each case's
    ``vertebrae.csv`` in ``pred_dir`` (module rules)."""
    pred_dir = require_dir(pred_dir, "prediction folder")
    rows = []
    for case in cases:
        path = require_file(Path(pred_dir) / case / "vertebrae.csv", f"vertebra table of case {case!r}")
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
        if not {"vertebra", "lesions", "lesion_quality"} <= set(table.columns):
            raise SpinemetsError(f"{path}: vertebra table lacks the columns vertebra, lesions, lesion_quality "
                                 "(written by spinemets predict)")
        found = {}
        for record in table.to_dict("records"):
            if int(record["lesions"] or 0) > 0:
                kind = record["lesion_quality"].strip().lower()
                if kind not in TYPES[1:]:
                    raise SpinemetsError(f"{path}: vertebra {record['vertebra']}: lesion_quality {kind!r}; "
                                         f"expected one of {', '.join(TYPES[1:])}")
                found[record["vertebra"]] = kind
        rows += [{"case_id": case, "vertebra": v, "predicted": found.get(v, "none")} for v in TCIA_VERTEBRAE]
    return pd.DataFrame(rows, columns=["case_id", "vertebra", "predicted"])


def compare(clinical: pd.DataFrame, predicted: pd.DataFrame, source: str = "clinical table") -> pd.DataFrame:
    """Reference and prediction side by side: ``case_id, vertebra, reference, predicted``, one row per
    predicted (case, vertebra); a predicted case missing from the clinical table is an error."""
    missing = sorted(set(predicted["case_id"]) - set(clinical["case_id"]))
    if missing:
        raise SpinemetsError(f"{source}: has no row for the predicted case(s) {missing}")
    table = predicted.merge(clinical, on=["case_id", "vertebra"], how="left")
    return table[TABLE_COLUMNS]


def detection(table: pd.DataFrame) -> dict:
    """TP, FP, FN, TN of "the vertebra has a lesion", sensitivity and specificity (module rules)."""
    ref = table["reference"] != "none"
    pred = table["predicted"] != "none"
    tp, fp = int((ref & pred).sum()), int((~ref & pred).sum())
    fn, tn = int((ref & ~pred).sum()), int((~ref & ~pred).sum())
    return {"vertebrae": int(len(table)), "cases": int(table["case_id"].nunique()), "tp": tp, "fp": fp, "fn": fn,
            "tn": tn, "sensitivity": metrics.recall(tp, fp, fn), "specificity": metrics.recall(tn, fn, fp)}


def type_confusion(table: pd.DataFrame) -> pd.DataFrame:
    """Counts of (reference type, predicted type): rows ``reference``, columns ``predicted``, both :data:`TYPES`."""
    counts = pd.crosstab(pd.Categorical(table["reference"], TYPES), pd.Categorical(table["predicted"], TYPES),
                         dropna=False)
    counts.index.name, counts.columns.name = "reference", "predicted"
    return counts.reindex(index=list(TYPES), columns=list(TYPES), fill_value=0).astype(int)


def vertebra_dice(labels_dir: str | Path, pred_dir: str | Path, cases: Iterable[str]) -> pd.DataFrame:
    """Stage-1 Dice per vertebra T1-L5: ``case_id, vertebra, dice, reference_voxels, predicted_voxels``,
    the reference ``labels_dir/<case>.nii.gz`` against ``pred_dir/<case>/vertebrae.nii.gz``."""
    table = labels_mod.labels("vertebrae")
    n_labels = max(table.values()) + 1
    values = [table[v] for v in TCIA_VERTEBRAE]
    rows = []
    for case in cases:
        ref_path, pred_path = Path(labels_dir) / f"{case}.nii.gz", Path(pred_dir) / case / "vertebrae.nii.gz"
        ref_image = read_image(ref_path, "reference label map")
        pred_image = read_image(pred_path, "predicted label map")
        check_same_geometry(ref_image, pred_image, ref_path, pred_path)
        ref, pred = (sitk.GetArrayViewFromImage(image).astype(np.int64) for image in (ref_image, pred_image))
        counts = metrics.voxel_counts(metrics.confusion_matrix(ref, pred, n_labels))
        dice = metrics.dice(counts.tp, counts.fp, counts.fn)
        for vertebra, value in zip(TCIA_VERTEBRAE, values):
            rows.append({"case_id": case, "vertebra": vertebra, "dice": float(dice[value]),
                         "reference_voxels": int(counts.tp[value] + counts.fn[value]),
                         "predicted_voxels": int(counts.tp[value] + counts.fp[value])})
    return pd.DataFrame(rows, columns=["case_id", "vertebra", "dice", "reference_voxels", "predicted_voxels"])


def evaluate(clinical_csv: str | Path, pred_dir: str | Path, out_dir: str | Path,
             labels_dir: str | Path | None = None, cases: Iterable[str] | None = None) -> dict:
    """The whole comparison for the cases of ``pred_dir`` (default: every case folder with a
    ``vertebrae.csv``), written atomically into ``out_dir``: ``vertebrae.csv`` (:func:`compare`),
    ``types.csv`` (:func:`type_confusion`), ``dice.csv`` (:func:`vertebra_dice`, with ``labels_dir``)
    and ``summary.json`` (:func:`detection`, mean Dice per vertebra). Returns the summary."""
    pred_dir = require_dir(pred_dir, "prediction folder")
    if cases is None:
        cases = sorted(p.name for p in Path(pred_dir).iterdir() if (p / "vertebrae.csv").is_file())
    cases = list(cases)
    if not cases:
        raise SpinemetsError(f"{pred_dir}: no case folder with a vertebrae.csv (written by spinemets predict)")
    table = compare(read_clinical(clinical_csv), read_predicted(pred_dir, cases), str(clinical_csv))
    types = type_confusion(table)
    summary = {"clinical_table": str(clinical_csv), "prediction_folder": str(pred_dir), "cases": cases,
               "detection": detection(table)}
    write_csv(Path(out_dir) / "vertebrae.csv", table.to_dict("records"), TABLE_COLUMNS)
    write_csv(Path(out_dir) / "types.csv", types.reset_index().to_dict("records"), ["reference", *TYPES])
    if labels_dir is not None:
        dice = vertebra_dice(labels_dir, pred_dir, cases)
        write_csv(Path(out_dir) / "dice.csv", dice.to_dict("records"), list(dice.columns))
        means = dice.groupby("vertebra", sort=False)["dice"].mean()
        summary["dice_per_vertebra"] = {v: None if np.isnan(x) else round(float(x), 4) for v, x in means.items()}
    write_json(Path(out_dir) / "summary.json", summary)
    return summary
