"""Curation tables of a cohort: its demographics, per-case image checks, and label volumes.

The dataset notebook (``01_dataset``) and the 3D Slicer notebook (``02_slicer``) show them before
training; nothing here changes data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import pandas as pd
import SimpleITK as sitk

from spinemets import labels as labels_mod
from spinemets.fileio import require_file
from spinemets.formats.images import read_image


#: Quality-control limits: a case beyond one of them is flagged for review (not removed).
#: Slices thicker than 5 mm blur small lesions; HU below -1100 or above 3000 at the 1st/99th
#: percentile point to a wrong rescale slope/intercept or metal.
QC_LIMITS = {"spacing z (mm)": (None, 5.0), "HU p1": (-1100.0, None), "HU p99": (None, 3000.0)}


def cohort_table(cohort_csv: str | Path) -> tuple[str, pd.DataFrame]:
    """Table 1 of a cohort from its ``cohort.csv`` (``sex``, ``metastasis_type``, ``primary_site``,
    ``age``): a one-line age summary, and counts with percentages per characteristic and value."""
    cohort = pd.read_csv(require_file(cohort_csv, "cohort table"))
    parts = [cohort[column].value_counts().rename_axis("value").to_frame("n").assign(characteristic=label)
             for column, label in (("sex", "sex"), ("metastasis_type", "type of metastasis"),
                                   ("primary_site", "primary site"))]
    table = pd.concat(parts).reset_index().set_index(["characteristic", "value"])
    table["%"] = (100 * table["n"] / len(cohort)).round(1)
    age = (f"{len(cohort)} cases; age {cohort['age'].mean():.1f} ± {cohort['age'].std():.1f} years "
           f"(range {cohort['age'].min()}–{cohort['age'].max()})")
    return age, table


def qc_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per case of the manifest: size, spacing, cranio-caudal field of view and HU range (1st–99th percentile)."""
    rows = []
    for case, image_path in manifest.drop_duplicates("case_id")[["case_id", "image"]].itertuples(index=False):
        image = read_image(image_path, "CT")
        size, spacing = image.GetSize(), image.GetSpacing()
        p1, p99 = np.percentile(sitk.GetArrayViewFromImage(image), [1, 99])
        rows.append({"case_id": case, "size (x×y×z)": "×".join(map(str, size)), "spacing x (mm)": spacing[0],
                     "spacing z (mm)": spacing[2], "field of view z (mm)": size[2] * spacing[2],
                     "HU p1": float(p1), "HU p99": float(p99)})
    return pd.DataFrame(rows).set_index("case_id")


def flagged_for_review(qc: pd.DataFrame, limits: Mapping[str, tuple] = QC_LIMITS) -> list[str]:
    """Cases of a :func:`qc_table` beyond any of ``limits`` (column -> (low, high), None for no bound)."""
    bad = pd.Series(False, index=qc.index)
    for column, (low, high) in limits.items():
        if low is not None:
            bad |= qc[column] < low
        if high is not None:
            bad |= qc[column] > high
    return [str(c) for c in qc.index[bad]]


def label_volumes(folder: str | Path, stage: str) -> pd.DataFrame:
    """Volume (mL) of every foreground label of ``stage`` in every label map of an imported dataset
    (``labelsTr`` and ``labelsTs``): columns ``case_id, label, volume_ml``."""
    folder = Path(folder)
    rows = []
    for path in sorted((folder / "labelsTr").glob("*.nii.gz")) + sorted((folder / "labelsTs").glob("*.nii.gz")):
        image = read_image(path, "label map")
        counts = np.bincount(sitk.GetArrayViewFromImage(image).ravel(), minlength=len(labels_mod.labels(stage)))
        ml = float(np.prod(image.GetSpacing())) / 1000.0
        rows += [{"case_id": path.name[: -len(".nii.gz")], "label": name, "volume_ml": float(counts[v] * ml)}
                 for name, v in labels_mod.foreground_labels(stage).items()]
    return pd.DataFrame(rows, columns=["case_id", "label", "volume_ml"])
