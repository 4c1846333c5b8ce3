"""What a model was trained on, and whether a CT given to it is like that: the domain check of inference.

A model answers every CT it is given with a segmentation, however unlike its training data the
CT is: the demo models, trained on small synthetic volumes, label "vertebrae" and "lesions" all
over a real thorax. So every trained model carries a **domain record** beside it
(``spinemets_domain.json`` in nnU-Net's model folder, written by :func:`write_record` at the
end of :func:`spinemets.training.nnunet.train`), and :func:`spinemets.inference.predict.predict` compares each
input with it (:func:`check`) and warns, naming the case and the property, when it is outside.

The record holds:

* ``cohort``: ``synthetic``, ``real`` or ``mixed`` (from the import record of the raw dataset:
  a case is synthetic when its source folder was written by ``spinemets synth``), and the
  number of training cases;
* ``spacing_mm`` and ``field_of_view_mm``: per axis (x, y, z) the range over the training
  cases, taken from nnU-Net's dataset fingerprint (``dataset_fingerprint.json``: spacings and
  the shapes after cropping to the non-zero box);
* ``intensity_hu``: the range over the training cases of the 1st, 50th and 99th percentile of
  each whole CT (read from the raw training images), and nnU-Net's fingerprint of the
  intensities inside the labels (``foreground_intensity``, for reference).

An input is outside the domain when, on any axis or statistic, it lies beyond the training
range widened by the tolerances below. The tolerances are deliberately loose: the check is
there to catch a CT of another kind (another body region, resolution or scanner world), not to
flag the ordinary variation of one cohort. A warning does not stop the prediction: the results
are written as always, and the warning goes with them into ``lesions.csv``/``vertebrae.csv``
(column ``domain_warning``), ``provenance.json`` (``domain``), the description of each
``.seg.nrrd`` and the log.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import SimpleITK as sitk
from tqdm.auto import tqdm

from spinemets.formats.images import read_image
from spinemets.fileio import read_json, write_json

log = logging.getLogger(__name__)

RECORD = "spinemets_domain.json"
FINGERPRINT = "dataset_fingerprint.json"
#: Bumped when the record's content changes, so that an old record is built again.
RECORD_FORMAT = 1
AXES = ("x", "y", "z")
PERCENTILES = (1, 50, 99)
#: An input spacing within [min / factor, max * factor] of the training spacings is inside.
SPACING_FACTOR = 1.1
#: An input field of view within [min / factor, max * factor] of the training ones is inside.
FIELD_OF_VIEW_FACTOR = 1.25
#: An intensity percentile within [min - margin, max + margin] is inside; the margin is this
#: many HU, or half the training range of that percentile where that is wider.
INTENSITY_MARGIN_HU = 100.0
#: Intensity percentiles are taken on at most this many voxels (an even subsample).
MAX_SAMPLE = 2_000_000


def image_properties(image: sitk.Image) -> dict:
    """Spacing (mm), size (voxels) and field of view (mm) per axis x, y, z, and whole-image HU percentiles."""
    spacing = [float(s) for s in image.GetSpacing()]
    size = [int(s) for s in image.GetSize()]
    values = sitk.GetArrayViewFromImage(image).ravel()
    step = max(1, values.size // MAX_SAMPLE)
    sample = np.asarray(values[::step], dtype=np.float64)
    return {"spacing_mm": spacing, "size": size,
            "field_of_view_mm": [round(n * s, 3) for n, s in zip(size, spacing)],
            "intensity_hu": {f"p{p}": round(float(v), 2)
                             for p, v in zip(PERCENTILES, np.percentile(sample, PERCENTILES))}}


def _ranges(rows: list[list[float]]) -> dict:
    array = np.asarray(rows, dtype=np.float64)
    return {"min": [round(float(v), 4) for v in array.min(axis=0)],
            "max": [round(float(v), 4) for v in array.max(axis=0)]}


def _cohort(raw_dataset: Path) -> str:
    record = read_json(raw_dataset / ".spinemets-import.json", "import record", missing={})
    cohort = record.get("cohort") if isinstance(record, dict) else None
    return cohort if cohort in ("synthetic", "real", "mixed") else "unknown"


def _fingerprint_key(fingerprint: Path) -> str:
    return hashlib.sha256(fingerprint.read_bytes()).hexdigest()


def build_record(model_folder: str | Path, raw_dataset: str | Path | None) -> dict:
    """The domain record of a model folder, from nnU-Net's fingerprint in it and the raw training images.

    Without the raw dataset (a model folder copied alone) the record has no whole-image
    intensity ranges and the cohort is ``unknown``; spacing and field of view still come from
    the fingerprint.
    """
    folder = Path(model_folder)
    fingerprint_file = folder / FINGERPRINT
    fingerprint = read_json(fingerprint_file, "nnU-Net dataset fingerprint")
    spacings_zyx = fingerprint["spacings"]
    shapes_zyx = fingerprint["shapes_after_crop"]
    spacing = [list(map(float, s[::-1])) for s in spacings_zyx]
    fov = [[n * s for n, s in zip(shape[::-1], sp)] for shape, sp in zip(shapes_zyx, spacing)]
    record = {"format": RECORD_FORMAT, "fingerprint_sha256": _fingerprint_key(fingerprint_file),
              "cohort": "unknown", "cases": len(spacing), "axes": list(AXES),
              "spacing_mm": _ranges(spacing), "field_of_view_mm": _ranges(fov), "intensity_hu": None,
              "foreground_intensity": fingerprint.get("foreground_intensity_properties_per_channel", {}).get("0")}
    if raw_dataset is not None and Path(raw_dataset).is_dir():
        raw = Path(raw_dataset)
        record["cohort"] = _cohort(raw)
        images = sorted((raw / "imagesTr").glob("*_0000.*"))
        stats = [image_properties(read_image(p, "training CT"))["intensity_hu"]
                 for p in tqdm(images, desc="domain record", unit="CT", leave=False)]
        if stats:
            record["intensity_hu"] = {key: {"min": min(s[key] for s in stats), "max": max(s[key] for s in stats)}
                                      for key in stats[0]}
    return record


def write_record(model_folder: str | Path, raw_dataset: str | Path | None, built: dict | None = None) -> Path | None:
    """Write (or renew, when nnU-Net's fingerprint changed) the domain record of a trained model folder.

    ``built`` (fingerprint hash -> record) keeps the records made in this call for the next: the
    configurations of one dataset share its fingerprint and raw CTs, which are then read once.
    Returns its path, or None when the folder has no fingerprint (nothing was trained there)."""
    folder = Path(model_folder)
    if not (folder / FINGERPRINT).exists():
        return None
    path = folder / RECORD
    key = _fingerprint_key(folder / FINGERPRINT)
    old = read_json(path, "domain record", missing={}) if path.exists() else {}
    if (isinstance(old, dict) and old.get("format") == RECORD_FORMAT and old.get("fingerprint_sha256") == key
            and (old.get("intensity_hu") is not None or raw_dataset is None)):
        return path
    built = {} if built is None else built
    if key not in built:
        built[key] = build_record(folder, raw_dataset)
    return write_json(path, built[key])


def training_domain(model_folder: str | Path, raw_dataset: str | Path | None = None) -> dict | None:
    """The domain record of a model folder: its ``spinemets_domain.json``, else built from its
    fingerprint (and ``raw_dataset`` when given) without writing; None without a fingerprint."""
    folder = Path(model_folder)
    path = folder / RECORD
    if path.exists():
        try:
            record = read_json(path, "domain record")
            if isinstance(record, dict) and record.get("format") == RECORD_FORMAT:
                return record
        except Exception:  # a damaged record is built again from the fingerprint
            log.warning("%s: unreadable domain record; built again from nnU-Net's fingerprint", path)
    if not (folder / FINGERPRINT).exists():
        return None
    return build_record(folder, raw_dataset)


def _outside(value: float, low: float, high: float) -> bool:
    return value < low - 1e-9 or value > high + 1e-9


def check(properties: Mapping, record: Mapping | None) -> list[str]:
    """The ways an input (:func:`image_properties`) lies outside a domain record; [] when inside.

    Each item names the property, the input's value and the training range, e.g.
    ``"spacing x 0.78 mm (trained on 2.50-2.50 mm)"``.
    """
    if not record:
        return []
    problems = []
    for key, label, factor in (("spacing_mm", "spacing", SPACING_FACTOR),
                               ("field_of_view_mm", "field of view", FIELD_OF_VIEW_FACTOR)):
        rng = record.get(key)
        if not rng:
            continue
        for axis, value, low, high in zip(AXES, properties[key], rng["min"], rng["max"]):
            if _outside(value, low / factor, high * factor):
                problems.append(f"{label} {axis} {value:.4g} mm (trained on {low:.4g}-{high:.4g} mm)")
    intensity = record.get("intensity_hu") or {}
    for name, rng in intensity.items():
        value = properties["intensity_hu"].get(name)
        if value is None:
            continue
        margin = max(INTENSITY_MARGIN_HU, 0.5 * (rng["max"] - rng["min"]))
        if _outside(value, rng["min"] - margin, rng["max"] + margin):
            problems.append(f"intensity {name} {value:.0f} HU (trained on {rng['min']:.0f} to {rng['max']:.0f} HU)")
    return problems


def describe(record: Mapping | None) -> str:
    """What a model was trained on, in a few words: ``"24 synthetic CTs"``."""
    if not record:
        return "an unknown training set"
    cohort = record.get("cohort", "unknown")
    kind = {"unknown": "", "mixed": "synthetic and real "}.get(cohort, f"{cohort} ")
    return f"{record.get('cases', '?')} {kind}CTs"


def check_case(case: str, properties: Mapping, records: Mapping[str, Mapping | None]) -> dict:
    """The domain report of one input against the records of each stage: ``{"in_domain", "problems":
    {stage: [...]}, "warning", "input"}``; ``warning`` is "" when inside, else one sentence naming the case."""
    problems = {stage: check(properties, record) for stage, record in records.items()}
    problems = {stage: found for stage, found in problems.items() if found}
    warning = ""
    if problems:
        groups: dict[tuple, list[str]] = {}  # stages with the same training domain are named together
        for stage, found in problems.items():
            groups.setdefault((describe(records[stage]), tuple(found)), []).append(stage)
        parts = [f"{' and '.join(stages)} model{'s' if len(stages) > 1 else ''} (trained on {what}): {'; '.join(found)}"
                 for (what, found), stages in groups.items()]
        warning = (f"case {case} is outside the training domain, results are unreliable: "
                   + " | ".join(parts))
    return {"in_domain": not problems, "problems": problems, "warning": warning, "input": dict(properties)}


def short_warning(report: Mapping) -> str:
    """The ``domain_warning`` cell of the tables: empty when inside, else the properties that are outside."""
    if report.get("in_domain", True):
        return ""
    names = []
    for found in report["problems"].values():
        for item in found:
            name = item.split(" ", 1)[0] if not item.startswith("field of view") else "field of view"
            if name not in names:
                names.append(name)
    return "outside training domain: " + ", ".join(names)


def summary(records: Mapping[str, Mapping | None]) -> dict:
    """The training domains of the stages as they go into the provenance (without the fingerprint hash)."""
    return {stage: ({k: v for k, v in record.items() if k != "fingerprint_sha256"} if record else None)
            for stage, record in records.items()}


def cohort_of(images: Iterable[str | Path]) -> str:
    """``synthetic`` when every image lies in a folder written by ``spinemets synth`` (its
    ``synth.json`` in the folder or above), ``real`` when none does, ``mixed`` otherwise."""
    kinds = {"synthetic" if any((parent / "synth.json").is_file() for parent in Path(image).resolve().parents)
             else "real" for image in images}
    if kinds == {"synthetic"}:
        return "synthetic"
    return "real" if kinds == {"real"} else ("mixed" if kinds else "unknown")



def report_table(provenance: str | Path | Mapping):
    """One row per predicted case of a prediction folder's ``provenance.json`` (or its dict): spacing,
    field of view and median HU of the input, whether it is inside the training domain, and what is outside."""
    import pandas as pd

    if not isinstance(provenance, Mapping):
        provenance = read_json(provenance, "prediction provenance")
    rows = []
    for case, report in sorted((provenance.get("domain") or {}).get("cases", {}).items()):
        props = report["input"]
        found = [f"{stage}: {item}" for stage, items in report["problems"].items() for item in items]
        rows.append({"case_id": case,
                     "spacing (mm)": " × ".join(f"{v:.3g}" for v in props["spacing_mm"]),
                     "field of view (mm)": " × ".join(f"{v:.0f}" for v in props["field_of_view_mm"]),
                     "median HU": props["intensity_hu"]["p50"],
                     "in training domain": "yes" if report["in_domain"] else "NO",
                     "outside": "; ".join(found)})
    return pd.DataFrame(rows, columns=["case_id", "spacing (mm)", "field of view (mm)", "median HU",
                                       "in training domain", "outside"]).set_index("case_id")
