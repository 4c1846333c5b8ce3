"""The domain check of inference: what a model was trained on, and a warning for a CT unlike it."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from spinemets import domain

from spinemets.inference import predict as inference

REPO = Path(__file__).resolve().parents[1]
REAL_CT = REPO / "book" / "data" / "real_ct" / "example_ct_sm.nii.gz"


def _image(array, spacing=(2.5, 2.5, 3.0)):
    image = sitk.GetImageFromArray(np.asarray(array, dtype=np.int16))
    image.SetSpacing(spacing)
    return image


def _model_folder(tmp_path, spacings_zyx, shapes_zyx, raw_images=()):
    """A model folder with an nnU-Net fingerprint, and a raw dataset with the given training CTs."""
    folder = tmp_path / "results" / "Dataset501_Vertebrae" / "T__P__3d_fullres"
    folder.mkdir(parents=True)
    fingerprint = {"spacings": spacings_zyx, "shapes_after_crop": shapes_zyx, "median_relative_size_after_cropping": 1,
                   "foreground_intensity_properties_per_channel": {"0": {"mean": 500.0, "percentile_00_5": 100.0}}}
    (folder / domain.FINGERPRINT).write_text(json.dumps(fingerprint))
    raw = tmp_path / "raw" / "Dataset501_Vertebrae"
    (raw / "imagesTr").mkdir(parents=True)
    for i, image in enumerate(raw_images):
        sitk.WriteImage(image, str(raw / "imagesTr" / f"case_{i:03d}_0000.nii.gz"))
    return folder, raw


def test_image_properties_hand_computed():
    array = np.arange(1000).reshape(10, 10, 10) - 500  # z, y, x; values -500 ... 499
    props = domain.image_properties(_image(array, spacing=(0.5, 0.8, 2.0)))
    assert props["spacing_mm"] == [0.5, 0.8, 2.0]
    assert props["size"] == [10, 10, 10]
    assert props["field_of_view_mm"] == [5.0, 8.0, 20.0]
    # numpy's linear percentiles of -500 ... 499: p1 = -500 + 0.01 * 999, p50 = -0.5, p99 = -500 + 0.99 * 999
    assert props["intensity_hu"] == {"p1": -490.01, "p50": -0.5, "p99": 489.01}


def test_record_from_fingerprint_and_raw_images(tmp_path):
    ct_a = _image(np.full((4, 6, 8), -100), spacing=(2.5, 2.5, 3.0))
    ct_b = _image(np.full((4, 6, 8), 300), spacing=(2.5, 2.5, 3.0))
    # nnU-Net's fingerprint lists spacings and shapes z, y, x
    folder, raw = _model_folder(tmp_path, [[3.0, 2.5, 2.0], [4.0, 2.5, 2.5]], [[100, 48, 40], [80, 48, 48]],
                                [ct_a, ct_b])
    record = domain.build_record(folder, raw)
    assert record["cases"] == 2 and record["axes"] == ["x", "y", "z"]
    assert record["spacing_mm"] == {"min": [2.0, 2.5, 3.0], "max": [2.5, 2.5, 4.0]}
    # x: 40 * 2.0 = 80, 48 * 2.5 = 120; y: 120, 120; z: 300, 320
    assert record["field_of_view_mm"] == {"min": [80.0, 120.0, 300.0], "max": [120.0, 120.0, 320.0]}
    assert record["intensity_hu"]["p50"] == {"min": -100.0, "max": 300.0}
    assert record["foreground_intensity"]["mean"] == 500.0
    assert record["cohort"] == "unknown"  # no import record


def test_record_is_written_once_and_renewed_when_the_fingerprint_changes(tmp_path):
    folder, raw = _model_folder(tmp_path, [[3.0, 2.5, 2.5]], [[100, 48, 48]], [_image(np.zeros((2, 2, 2)))])
    (raw / ".spinemets-import.json").write_text(json.dumps({"cohort": "synthetic"}))
    path = domain.write_record(folder, raw)
    first = json.loads(path.read_text())
    assert first["cohort"] == "synthetic" and first["spacing_mm"]["min"] == [2.5, 2.5, 3.0]
    path.write_text(json.dumps({**first, "cases": 99}))  # same fingerprint: kept as it is
    domain.write_record(folder, raw)
    assert json.loads(path.read_text())["cases"] == 99
    fingerprint = json.loads((folder / domain.FINGERPRINT).read_text())
    fingerprint["spacings"].append([1.0, 0.8, 0.8])
    fingerprint["shapes_after_crop"].append([300, 512, 512])
    (folder / domain.FINGERPRINT).write_text(json.dumps(fingerprint))
    domain.write_record(folder, raw)
    renewed = json.loads(path.read_text())
    assert renewed["cases"] == 2 and renewed["spacing_mm"]["min"] == [0.8, 0.8, 1.0]
    assert domain.write_record(tmp_path / "nothing-trained", raw) is None


RECORD = {"cohort": "synthetic", "cases": 24,
          "spacing_mm": {"min": [2.5, 2.5, 3.0], "max": [2.5, 2.5, 3.0]},
          "field_of_view_mm": {"min": [120.0, 120.0, 270.0], "max": [120.0, 120.0, 390.0]},
          "intensity_hu": {"p1": {"min": -1020.0, "max": -870.0}, "p50": {"min": 20.0, "max": 50.0},
                           "p99": {"min": 700.0, "max": 900.0}}}


def _props(spacing=(2.5, 2.5, 3.0), fov=(120.0, 120.0, 300.0), p1=-900.0, p50=40.0, p99=800.0):
    return {"spacing_mm": list(spacing), "field_of_view_mm": list(fov), "intensity_hu": {"p1": p1, "p50": p50, "p99": p99}}


def test_inside_the_domain_gives_nothing():
    assert domain.check(_props(), RECORD) == []
    # the edges of the tolerances: spacing x 1.1, field of view x 1.25, intensity 100 HU (or half the range)
    edge = _props(spacing=(2.75, 2.5, 3.3), fov=(150.0, 96.0, 487.5), p1=-1120.0, p50=150.0, p99=1000.0)
    assert domain.check(edge, RECORD) == []
    assert domain.check(_props(spacing=(0.7, 0.7, 1.0)), None) == []  # no record: no check


@pytest.mark.parametrize("props, expected", [
    (_props(spacing=(0.78, 2.5, 3.0)), ["spacing x 0.78 mm (trained on 2.5-2.5 mm)"]),
    (_props(spacing=(2.5, 2.5, 3.31)), ["spacing z 3.31 mm (trained on 3-3 mm)"]),
    (_props(fov=(120.0, 151.0, 300.0)), ["field of view y 151 mm (trained on 120-120 mm)"]),
    (_props(fov=(120.0, 120.0, 215.0)), ["field of view z 215 mm (trained on 270-390 mm)"]),
    (_props(p50=-91.0), ["intensity p50 -91 HU (trained on 20 to 50 HU)"]),
    (_props(p99=188.0), ["intensity p99 188 HU (trained on 700 to 900 HU)"]),
])
def test_each_property_outside_is_named(props, expected):
    assert domain.check(props, RECORD) == expected


def test_intensity_margin_grows_with_the_training_range():
    wide = {**RECORD, "intensity_hu": {"p50": {"min": -400.0, "max": 400.0}}}  # margin: half of 800 HU
    assert domain.check(_props(p50=790.0), wide) == []
    assert domain.check(_props(p50=810.0), wide) == ["intensity p50 810 HU (trained on -400 to 400 HU)"]


def test_case_report_names_the_case_and_groups_the_stages():
    report = domain.check_case("sm-0003", _props(spacing=(0.8, 0.8, 1.0)), {"vertebrae": RECORD, "metastases": RECORD})
    assert not report["in_domain"]
    assert report["warning"].startswith("case sm-0003 is outside the training domain")
    assert "vertebrae and metastases models (trained on 24 synthetic CTs): spacing x 0.8 mm" in report["warning"]
    assert domain.short_warning(report) == "outside training domain: spacing"
    inside = domain.check_case("sm-0004", _props(), {"vertebrae": RECORD, "metastases": RECORD})
    assert inside["in_domain"] and inside["warning"] == "" and domain.short_warning(inside) == ""
    other = {**RECORD, "cohort": "real", "cases": 115, "spacing_mm": {"min": [0.6, 0.6, 0.6], "max": [1.0, 1.0, 1.5]}}
    report = domain.check_case("c", _props(spacing=(0.8, 0.8, 1.0)), {"vertebrae": other, "metastases": RECORD})
    assert report["problems"] == {"metastases": ["spacing x 0.8 mm (trained on 2.5-2.5 mm)",
                                                 "spacing y 0.8 mm (trained on 2.5-2.5 mm)",
                                                 "spacing z 1 mm (trained on 3-3 mm)"]}
    assert "metastases model (trained on 24 synthetic CTs)" in report["warning"]


def test_cohort_kind_from_the_source_folders(tmp_path):
    synth, real = tmp_path / "synth", tmp_path / "real"
    (synth / "case_001").mkdir(parents=True)
    (real / "p1").mkdir(parents=True)
    (synth / "synth.json").write_text("{}")
    assert domain.cohort_of([synth / "case_001" / "ct.nrrd"]) == "synthetic"
    assert domain.cohort_of([real / "p1" / "ct.nrrd"]) == "real"
    assert domain.cohort_of([synth / "case_001" / "ct.nrrd", real / "p1" / "ct.nrrd"]) == "mixed"


def test_real_ct_is_outside_a_synthetic_domain_on_every_property():
    props = domain.image_properties(sitk.ReadImage(str(REAL_CT)))
    assert props["spacing_mm"] == [3.0, 3.0, 3.0] and props["size"] == [122, 101, 30]
    problems = domain.check(props, RECORD)
    kinds = {p.split(" ", 1)[0] if not p.startswith("field") else "field" for p in problems}
    assert kinds == {"spacing", "field", "intensity"}


def _stages(vertebrae, lesions):
    return (lambda ct, spacing: vertebrae.copy(), lambda ct, spacing: lesions.copy())


def test_predict_case_writes_the_warning_into_tables_slicer_files_and_log(tmp_path, caplog):
    ct = np.full((20, 16, 16), 40, dtype=np.int16)
    ct[:, 6:10, 6:10] = 700
    path = tmp_path / "in" / "c1.nii.gz"
    path.parent.mkdir()
    sitk.WriteImage(_image(ct, spacing=(0.8, 0.8, 1.0)), str(path))
    vertebrae = np.zeros(ct.shape, dtype=np.uint8)
    vertebrae[2:10, 5:11, 5:11], vertebrae[10:18, 5:11, 5:11] = 20, 21
    lesions = np.zeros(ct.shape, dtype=np.uint8)
    lesions[4:7, 7:9, 7:9] = 1
    options = inference.PredictOptions().resolved("paper")
    records = {"vertebrae": RECORD, "metastases": RECORD}
    with caplog.at_level(logging.WARNING, logger="spinemets.inference.predict"):
        rows, vrows, _, _, report, _ = inference.predict_case(path, tmp_path / "out" / "c1", "c1",
                                                           _stages(vertebrae, lesions), options, records)
    assert not report["in_domain"]
    assert [r["domain_warning"] for r in rows] == ["outside training domain: spacing, field of view, intensity"]
    assert {r["domain_warning"] for r in vrows} == {"outside training domain: spacing, field of view, intensity"}
    with open(tmp_path / "out" / "c1" / "lesions.csv", newline="") as fh:
        assert [r["domain_warning"] for r in csv.DictReader(fh)] == ["outside training domain: spacing, field of view, intensity"]
    for stage in ("vertebrae", "metastases"):
        content = slicerio.read_segmentation(str(tmp_path / "out" / "c1" / f"{stage}.seg.nrrd"))["content"]
        assert "WARNING: case c1 is outside the training domain" in content and "spacing x 0.8 mm" in content
    assert any("case c1 is outside the training domain" in r.getMessage() for r in caplog.records)
    # a CT at the training domain's geometry and intensities: no warning anywhere
    caplog.clear()
    inside_ct = np.full((100, 48, 48), 40, dtype=np.int16)
    inside_ct[:10] = -1000  # air above the body: p1
    inside_ct[50:60, 20:40, 20:40] = 750  # bone: p99
    sitk.WriteImage(_image(inside_ct, spacing=(2.5, 2.5, 3.0)), str(path))
    big_vertebrae, big_lesions = np.zeros(inside_ct.shape, np.uint8), np.zeros(inside_ct.shape, np.uint8)
    big_vertebrae[50:60, 20:40, 20:40] = 20
    big_lesions[52:55, 25:30, 25:30] = 2
    with caplog.at_level(logging.WARNING, logger="spinemets.inference.predict"):
        rows, vrows, _, _, report, _ = inference.predict_case(path, tmp_path / "out2" / "c1", "c1",
                                                           _stages(big_vertebrae, big_lesions), options, records)
    assert report["in_domain"], report["problems"]
    assert [r["domain_warning"] for r in rows] == [""] and {r["domain_warning"] for r in vrows} == {""}
    content = slicerio.read_segmentation(str(tmp_path / "out2" / "c1" / "metastases.seg.nrrd"))["content"]
    assert content == "spinemets metastases prediction of case c1"
    assert not [r for r in caplog.records if "training domain" in r.getMessage()]


def test_report_table_from_a_provenance():
    bad = domain.check_case("b", _props(spacing=(0.8, 2.5, 3.0)), {"vertebrae": RECORD})
    good = domain.check_case("a", _props(), {"vertebrae": RECORD})
    table = domain.report_table({"domain": {"cases": {"b": bad, "a": good}}})
    assert list(table.index) == ["a", "b"]
    assert table.loc["a", "in training domain"] == "yes" and table.loc["a", "outside"] == ""
    assert table.loc["b", "in training domain"] == "NO"
    assert table.loc["b", "outside"] == "vertebrae: spacing x 0.8 mm (trained on 2.5-2.5 mm)"
    assert table.loc["b", "spacing (mm)"] == "0.8 × 2.5 × 3" and table.loc["a", "median HU"] == 40.0


def test_configurations_of_one_dataset_share_one_built_record(tmp_path, monkeypatch):
    folder, raw = _model_folder(tmp_path, [[3.0, 2.5, 2.5]], [[100, 48, 48]], [_image(np.zeros((2, 2, 2)))])
    other = folder.with_name("T__P__2d")
    other.mkdir()
    (other / domain.FINGERPRINT).write_bytes((folder / domain.FINGERPRINT).read_bytes())
    calls = []
    real = domain.build_record
    monkeypatch.setattr(domain, "build_record", lambda *a: calls.append(a) or real(*a))
    built: dict = {}
    for f in (folder, other):
        domain.write_record(f, raw, built)
    assert len(calls) == 1 and len(built) == 1
    assert (folder / domain.RECORD).read_text() == (other / domain.RECORD).read_text()
