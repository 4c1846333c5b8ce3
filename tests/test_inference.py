"""Localization, partial SINS and the two-stage prediction pipeline (with stand-in stages: no nnU-Net here).

The label maps are built by hand, so every expected level, volume and score is known exactly.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from spinemets.inference import predict as inference
from spinemets.inference import localization
from spinemets.errors import SpinemetsError
from spinemets.labels import SINS_LOCATION, labels
from spinemets.training.profiles import PROFILES

V = labels("vertebrae")


@pytest.fixture(autouse=True)
def keep_lesions_outside_the_spine(monkeypatch):
    """The hand-made cases here put lesions beside their one vertebra block: the demo profile's clean-up
    of lesions that touch no vertebra (tested on its own below) is off for them."""
    monkeypatch.setitem(PROFILES["demo"], "spine_only", False)
SPACING = (3.0, 2.0, 2.0)  # z, y, x mm


def _spine(shape=(40, 20, 20)):
    """Vertebrae T5, T6, T7 as 8-slice blocks (x, y 5..14), separated by 2-slice gaps (discs)."""
    vert = np.zeros(shape, np.uint8)
    for k, name in enumerate(("T5", "T6", "T7")):
        z0 = 5 + 10 * k
        vert[z0:z0 + 8, 5:15, 5:15] = V[name]
    return vert


def _ball(shape, centre, radius):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius ** 2


def test_lesion_planted_in_a_vertebra_is_localized_to_that_level():
    vert = _spine()
    les = np.zeros_like(vert)
    ball = _ball(vert.shape, (18, 10, 10), 2)  # inside T6 (slices 15..22)
    les[ball] = 1
    ct = np.full(vert.shape, 100, np.int16)
    ct[ball] = 20
    ct[18, 10, 10] = 55
    rows = localization.localize(les, vert, ct, SPACING)
    assert len(rows) == 1
    row = rows[0]
    assert row["level"] == "T6" and row["assignment"] == "overlap" and row["type"] == "lytic"
    n = int(ball.sum())
    assert row["voxels"] == n
    assert row["volume_ml"] == pytest.approx(n * 3.0 * 2.0 * 2.0 / 1000, abs=1e-4)
    assert row["max_hu"] == 55
    assert row["mean_hu"] == pytest.approx(round((20 * (n - 1) + 55) / n, 1))
    assert (row["centroid_x_mm"], row["centroid_y_mm"], row["centroid_z_mm"]) == (10.0, 10.0, 18.0)


def test_largest_overlap_wins_across_two_vertebrae():
    vert = _spine()
    les = np.zeros_like(vert)
    les[20:27, 8:12, 8:12] = 2  # 3 slices in T6 (20..22), 2 in the gap, 2 in T7 (25..26)
    rows = localization.localize(les, vert, np.zeros(vert.shape, np.int16), SPACING)
    assert [(r["level"], r["type"]) for r in rows] == [("T6", "sclerotic")]


def test_lesion_without_overlap_goes_to_the_nearest_vertebra_within_the_distance_else_outside():
    vert = _spine()
    les = np.zeros_like(vert)
    les[8, 10, 17:19] = 1  # beside T5, x = 17..18; T5 ends at x = 14: 3 voxels = 6 mm away
    les[30, 0, 0] = 2  # far corner: nearest vertebra voxel (30, 5, 5) at sqrt(50 + 50) = 10 voxels -> 14.1 mm
    ct = np.zeros(vert.shape, np.int16)
    near, far = sorted(localization.localize(les, vert, ct, SPACING, near_mm=10.0), key=lambda r: r["voxels"], reverse=True)
    assert (near["level"], near["assignment"], near["distance_mm"]) == ("T5", "nearest", 6.0)
    assert (far["level"], far["assignment"]) == (localization.OUTSIDE, "none")
    assert far["distance_mm"] == pytest.approx(np.hypot(5 * 2.0, 5 * 2.0), abs=0.01)
    # a larger allowed distance takes the far lesion in as well
    rows = localization.localize(les, vert, ct, SPACING, near_mm=15.0)
    assert sorted(r["level"] for r in rows) == ["T5", "T7"]


def test_no_vertebrae_means_outside_spine_and_no_lesions_means_no_rows():
    vert = np.zeros((10, 10, 10), np.uint8)
    les = np.zeros_like(vert)
    assert localization.localize(les, vert, np.zeros(vert.shape, np.int16), SPACING) == []
    les[5, 5, 5] = 1
    rows = localization.localize(les, vert, np.zeros(vert.shape, np.int16), SPACING)
    assert rows[0]["level"] == localization.OUTSIDE and np.isnan(rows[0]["distance_mm"])


def test_a_component_with_both_classes_is_mixed():
    vert = _spine()
    les = np.zeros_like(vert)
    les[16:19, 9:12, 9:12] = 1
    les[19:21, 9:12, 9:12] = 2  # touching: one component
    (row,) = localization.localize(les, vert, np.zeros(vert.shape, np.int16), SPACING)
    assert row["type"] == "mixed" and row["lytic_fraction"] == pytest.approx(27 / 45, abs=1e-4)


def test_shape_mismatch_is_an_error():
    with pytest.raises(SpinemetsError, match="differ in shape"):
        localization.localize(np.zeros((2, 2, 2), np.uint8), np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2, 2)), SPACING)


@pytest.mark.parametrize("level, types, location, quality, total", [
    ("T5", ["lytic"], ("semi-rigid", 1), ("lytic", 2), 3),
    ("L5", ["sclerotic"], ("junctional", 3), ("blastic", 0), 3),
    ("C4", ["mixed"], ("mobile", 2), ("mixed", 1), 3),
    ("T12", ["lytic", "sclerotic"], ("junctional", 3), ("mixed", 1), 4),
    ("C1", ["lytic", "lytic"], ("junctional", 3), ("lytic", 2), 5),
    ("L3", ["sclerotic", "sclerotic"], ("mobile", 2), ("blastic", 0), 2),
    ("T2", ["sclerotic"], ("junctional", 3), ("blastic", 0), 3),
    ("T3", ["sclerotic"], ("semi-rigid", 1), ("blastic", 0), 1),
])
def test_partial_sins_hand_cases(level, types, location, quality, total):
    s = localization.partial_sins(level, types)
    assert (s["sins_location_class"], s["sins_location_points"]) == location
    assert (s["lesion_quality"], s["sins_bone_quality_points"]) == quality
    assert s["partial_sins_points"] == total
    assert "not a SINS score" in s["partial_sins_note"]


def test_partial_sins_of_the_sacrum_has_no_location_points_and_bad_input_is_refused():
    s = localization.partial_sins("Sacrum", ["lytic"])
    assert s["sins_location_points"] is None and s["partial_sins_points"] is None and s["sins_bone_quality_points"] == 2
    with pytest.raises(SpinemetsError, match="not a vertebra"):
        localization.partial_sins("S3", ["lytic"])
    with pytest.raises(SpinemetsError, match="no lesions"):
        localization.partial_sins("T5", [])
    with pytest.raises(SpinemetsError, match="unknown lesion type"):
        localization.partial_sins("T5", ["benign"])


def test_every_vertebra_has_a_sins_location():
    assert set(SINS_LOCATION) == set(V) - {"background"}


def test_vertebra_table_counts_lesions_and_involved_fraction():
    vert = _spine()
    les = np.zeros_like(vert)
    les[16:18, 8:10, 8:10] = 1  # 8 voxels in T6 (800 voxels)
    rows = localization.localize(les, vert, np.zeros(vert.shape, np.int16), SPACING)
    table = {r["vertebra"]: r for r in localization.vertebra_table(rows, les, vert, SPACING)}
    assert set(table) == {"T5", "T6", "T7"}
    assert table["T6"]["lesions"] == 1 and table["T6"]["involved_fraction"] == pytest.approx(8 / 800)
    assert table["T6"]["partial_sins_points"] == 3 and table["T5"]["lesions"] == 0
    assert table["T5"]["partial_sins_points"] == "" and table["T5"]["volume_ml"] == pytest.approx(800 * 12 / 1000)


def test_spine_box_adds_the_margin_in_millimetres_and_clips():
    vert = _spine()
    box = inference.spine_box(vert, SPACING, margin_mm=6.0)
    assert box == (slice(3, 35), slice(2, 18), slice(2, 18))
    assert inference.spine_box(vert, SPACING, margin_mm=100.0) == (slice(0, 40), slice(0, 20), slice(0, 20))
    assert inference.spine_box(np.zeros((3, 3, 3), np.uint8), SPACING, 5.0) is None


def test_find_inputs_layouts(tmp_path):
    img = sitk.Image(4, 4, 4, sitk.sitkInt16)
    sitk.WriteImage(img, str(tmp_path / "a_0000.nii.gz"))
    sitk.WriteImage(img, str(tmp_path / "b.nrrd"))
    (tmp_path / "c").mkdir()
    sitk.WriteImage(img, str(tmp_path / "c" / "ct.nrrd"))
    (tmp_path / "x.seg.nrrd").write_text("not an image")
    assert set(inference.find_inputs(tmp_path)) == {"a", "b", "c"}
    assert inference.find_inputs(tmp_path / "b.nrrd") == {"b": tmp_path / "b.nrrd"}
    with pytest.raises(SpinemetsError, match="input not found"):
        inference.find_inputs(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpinemetsError, match="no CT images"):
        inference.find_inputs(empty)


class _ThresholdVertebrae:
    """Stand-in for stage 1: every voxel above 300 HU is T6."""

    models = [{"folder": "stand-in", "configuration": "none", "trainer": "none", "folds": ["all"]}]
    postprocessing = None

    def __call__(self, array, spacing):
        return np.where(array > 300, V["T6"], 0).astype(np.uint8)


class _RecordingLesions:
    """Stand-in for stage 2: voxels below -500 HU are lytic; records the shapes it was given."""

    models = _ThresholdVertebrae.models
    postprocessing = None

    def __init__(self):
        self.shapes = []

    def __call__(self, array, spacing):
        self.shapes.append(array.shape)
        return np.where(array < -500, 1, 0).astype(np.uint8)


def _ct(tmp_path):
    ct = np.zeros((30, 30, 30), np.int16)
    ct[10:20, 10:20, 10:20] = 600  # the "vertebra"
    ct[13:15, 13:15, 13:15] = -800  # a lesion inside it
    ct[1:3, 1:3, 1:3] = -800  # a lesion far away (outside the spine box)
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((-5.0, 3.0, 7.0))
    image.SetMetaData("PatientName", "Doe^Jane")
    path = tmp_path / "inputs" / "case_a.nrrd"
    path.parent.mkdir()
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("roi, lesions_found", [("none", 2), ("spine", 1)])
def test_predict_writes_case_and_cohort_outputs(tmp_path, monkeypatch, roi, lesions_found):
    path = _ct(tmp_path)
    stage2 = _RecordingLesions()
    stages = {"vertebrae": _ThresholdVertebrae(), "metastases": stage2}
    monkeypatch.setattr(inference, "_Stage", lambda stage, *a: stages[stage])
    out = tmp_path / "out"
    rows = inference.predict(path.parent, out, profile="demo", device="cpu",
                             options=inference.PredictOptions(roi=roi, margin_mm=4.0, min_lesion_ml=0))
    assert len(rows) == lesions_found
    inside = [r for r in rows if r["level"] == "T6"]
    assert len(inside) == 1 and inside[0]["voxels"] == 8
    # the spine box: 10..19 grown by 4 mm (2 slices in z at 2 mm, 4 voxels in y and x at 1 mm)
    assert stage2.shapes == ([(30, 30, 30)] if roi == "none" else [(14, 18, 18)])
    case = out / "case_a"
    for name in ("vertebrae.nii.gz", "metastases.nii.gz", "vertebrae.seg.nrrd", "metastases.seg.nrrd",
                 "lesions.csv", "vertebrae.csv"):
        assert (case / name).exists(), name
    lesion_map = sitk.ReadImage(str(case / "metastases.nii.gz"))
    assert lesion_map.GetSpacing() == (1.0, 1.0, 2.0) and lesion_map.GetOrigin() == (-5.0, 3.0, 7.0)
    assert int(sitk.GetArrayFromImage(lesion_map)[13:15, 13:15, 13:15].sum()) == 8  # pasted back in place
    seg = slicerio.read_segmentation(str(case / "vertebrae.seg.nrrd"))
    assert [s["name"] for s in seg["segments"]] == ["T6"]
    with open(out / "lesions.csv", newline="") as fh:
        cohort = list(csv.DictReader(fh))
    assert [r["case_id"] for r in cohort] == ["case_a"] * lesions_found
    with open(case / "vertebrae.csv", newline="") as fh:
        (vrow,) = list(csv.DictReader(fh))
    assert (vrow["vertebra"], vrow["partial_sins_points"], vrow["lesion_quality"]) == ("T6", "3", "lytic")
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["parameters"]["roi"] == roi and "nnunetv2" in prov["versions"]
    everything = "".join(p.read_bytes().decode("latin-1") for p in out.rglob("*") if p.is_file())
    assert "Doe^Jane" not in everything


def test_predict_clears_lesions_further_than_the_margin_from_every_vertebra_where_asked(tmp_path, monkeypatch):
    path = _ct(tmp_path)
    stages = {"vertebrae": _ThresholdVertebrae(), "metastases": _RecordingLesions()}
    monkeypatch.setattr(inference, "_Stage", lambda stage, *a: stages[stage])
    every = inference.predict(path.parent, tmp_path / "all", device="cpu",
                              options=inference.PredictOptions(min_lesion_ml=0, spine_only=False))
    near = [r for r in every if r["level"] != localization.OUTSIDE]
    assert len(every) == 2 and len(near) == 1 and near[0]["distance_mm"] > 0  # one beside the vertebra, one far
    rows = inference.predict(path.parent, tmp_path / "near", device="cpu",
                             options=inference.PredictOptions(min_lesion_ml=0, spine_only=True,
                                                              spine_margin_mm=near[0]["distance_mm"]))
    assert [r["level"] for r in rows] == [near[0]["level"]]
    prov = json.loads((tmp_path / "near" / "provenance.json").read_text())
    assert prov["parameters"]["spine_only"] is True and prov["timings_s"]["case_a"]["lesions_outside_spine_removed"] == 1
    assert inference.predict(path.parent, tmp_path / "touch", device="cpu",
                             options=inference.PredictOptions(min_lesion_ml=0, spine_only=True, spine_margin_mm=0)) == []
    with pytest.raises(SpinemetsError, match="--spine-margin-mm"):
        inference.predict(path.parent, tmp_path / "bad", device="cpu",
                          options=inference.PredictOptions(spine_only=True, spine_margin_mm=-1))


def test_figures_of_predictions(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from spinemets.report import figures

    path = _ct(tmp_path)
    stages = {"vertebrae": _ThresholdVertebrae(), "metastases": _RecordingLesions()}
    monkeypatch.setattr(inference, "_Stage", lambda stage, *a: stages[stage])
    inference.predict(path.parent, tmp_path / "out", device="cpu",
                      options=inference.PredictOptions(roi="none", min_lesion_ml=0))
    fig = figures.prediction_overlays(tmp_path / "out", images=path.parent)
    assert len(fig.axes) == 2 and len(fig.axes[0].images) == 3  # CT, vertebrae, lesions
    sagittal = fig.axes[0].images[2].get_array()  # lesion overlay through the spine centre (x = 14)
    assert sagittal.shape == (30, 30, 4) and sagittal[13:15, 13:15, 3].min() > 0
    assert len(figures.render_3d(tmp_path / "out").axes) == 2
    with pytest.raises(SpinemetsError, match="no predicted cases"):
        figures.prediction_overlays(tmp_path)


def test_predict_refuses_an_unknown_roi(tmp_path):
    with pytest.raises(SpinemetsError, match="--roi: unknown roi mode"):
        inference.predict(tmp_path, tmp_path / "out", options=inference.PredictOptions(roi="box"))


def test_small_lesions_are_cleared_by_size_in_millilitres():
    lesions = np.zeros((20, 20, 20), np.uint8)
    lesions[2:4, 2:4, 2:4] = 1  # 8 voxels
    lesions[10:13, 10:13, 10:13] = 2  # 27 voxels, touching a lytic voxel diagonally: one mixed component
    lesions[13, 13, 13] = 1
    lesions[18, 18, 18] = 2  # 1 voxel
    spacing = (2.0, 1.0, 1.0)  # 2 mm^3 per voxel: 0.016, 0.056 and 0.002 mL
    cleaned, removed = inference.remove_small_lesions(lesions, spacing, 0.02)
    assert removed == 2 and cleaned[2:4, 2:4, 2:4].sum() == 0 and cleaned[18, 18, 18] == 0
    assert (cleaned[10:14, 10:14, 10:14] == lesions[10:14, 10:14, 10:14]).all()  # kept whole, both classes
    assert inference.remove_small_lesions(lesions, spacing, 0.016)[1] == 1  # exactly the size is kept
    same, none = inference.remove_small_lesions(lesions, spacing, 0.0)
    assert none == 0 and same is lesions
    assert inference.remove_small_lesions(lesions, spacing, 1.0)[0].sum() == 0
    assert lesions.sum() == 8 + 54 + 1 + 2  # the input is not modified
    with pytest.raises(SpinemetsError, match="minimum component size"):
        inference.remove_small_lesions(lesions, spacing, -1)


def test_lesions_outside_the_spine_are_those_localization_calls_outside_and_only_those():
    vert = np.zeros((10, 10, 40), np.uint8)
    vert[2:8, 2:8, 2:8] = V["L1"]  # x 2..7
    lesions = np.zeros_like(vert)
    lesions[4, 4, 6:9] = 1  # overlaps L1
    lesions[4, 4, 12] = 2  # 5 voxels of 2 mm = 10 mm from x=7: kept at near_mm 10 (exactly the distance)
    lesions[4, 4, 20] = 1  # 26 mm away: removed
    lesions[4, 4, 30:33] = 2  # 46 mm: removed
    spacing = (1.0, 1.0, 2.0)
    cleaned, removed = inference.remove_lesions_outside_spine(lesions, vert, spacing, near_mm=10.0)
    assert removed == 2 and not cleaned[:, :, 14:].any() and (cleaned[:, :, :14] == lesions[:, :, :14]).all()
    ct = np.zeros(vert.shape, np.int16)
    rows = localization.localize(lesions, vert, ct, spacing, near_mm=10.0)
    kept = localization.localize(cleaned, vert, ct, spacing, near_mm=10.0)
    assert sum(r["level"] == localization.OUTSIDE for r in rows) == 2
    assert [r["level"] for r in kept] == ["L1", "L1"]
    assert inference.remove_lesions_outside_spine(lesions, vert, spacing, near_mm=5.0)[1] == 3
    same, none = inference.remove_lesions_outside_spine(lesions, np.zeros_like(vert), spacing, 10.0)
    assert none == 0 and same is lesions  # without vertebrae nothing is judged
    assert lesions.sum() == 3 + 2 + 1 + 6  # the input is not modified


def test_small_vertebra_fragments_are_cleared_label_by_label():
    vert = np.zeros((20, 10, 10), np.uint8)
    vert[2:8, 2:8, 2:8] = V["T5"]  # 216 voxels
    vert[8:14, 2:8, 2:8] = V["T6"]  # touching T5: still its own component
    vert[14, 2, 2] = V["T5"]  # a 1-voxel fragment of T5 below T6, touching T6
    vert[18, 8, 8] = V["L5"]  # a lone 1-voxel speck of a vertebra that is not there
    cleaned, removed = inference.remove_small_components(vert, (1.0, 1.0, 1.0), 0.01, per_label=True)
    assert removed == 2 and cleaned[14, 2, 2] == 0 and cleaned[18, 8, 8] == 0
    assert (cleaned[2:14] == vert[2:14]).all()
    together, removed = inference.remove_small_components(vert, (1.0, 1.0, 1.0), 0.01, per_label=False)
    assert removed == 1 and together[14, 2, 2] == V["T5"]  # as one foreground, the fragment joins the spine


def test_predict_applies_the_profiles_minimum_lesion_size(tmp_path, monkeypatch):
    path = _ct(tmp_path)  # two lytic lesions of 8 voxels x 2 mm^3 = 0.016 mL
    stages = {"vertebrae": _ThresholdVertebrae(), "metastases": _RecordingLesions()}
    monkeypatch.setattr(inference, "_Stage", lambda stage, *a: stages[stage])
    monkeypatch.setitem(PROFILES["demo"], "min_lesion_ml", 0.01)
    assert len(inference.predict(path.parent, tmp_path / "a", profile="demo", device="cpu")) == 2
    monkeypatch.setitem(PROFILES["demo"], "min_lesion_ml", 0.02)
    assert inference.predict(path.parent, tmp_path / "b", profile="demo", device="cpu") == []
    prov = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert prov["parameters"]["min_lesion_ml"] == 0.02 and prov["timings_s"]["case_a"]["small_lesions_removed"] == 2
    assert not sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / "case_a" / "metastases.nii.gz"))).any()
    assert len(inference.predict(path.parent, tmp_path / "c", profile="demo", device="cpu",
                                 options=inference.PredictOptions(min_lesion_ml=0))) == 2
    # the stage-1 "vertebra" is 1000 voxels x 2 mm^3 = 2 mL: kept at the demo's 0.5 mL, cleared at 5 mL
    assert prov["timings_s"]["case_a"]["vertebra_fragments_removed"] == 0
    rows = inference.predict(path.parent, tmp_path / "d", profile="demo", device="cpu",
                             options=inference.PredictOptions(min_lesion_ml=0, min_vertebra_ml=5))
    assert {r["level"] for r in rows} == {localization.OUTSIDE}
    prov = json.loads((tmp_path / "d" / "provenance.json").read_text())
    assert prov["parameters"]["min_vertebra_ml"] == 5 and prov["timings_s"]["case_a"]["vertebra_fragments_removed"] == 1
    with pytest.raises(SpinemetsError, match="minimum component size"):
        inference.predict(path.parent, tmp_path / "e", profile="demo", device="cpu",
                          options=inference.PredictOptions(min_vertebra_ml=-1))


class _DuplicatingVertebrae:
    """Stand-in for stage 1: five vertebrae T4..T8 as slabs of 4 slices with 2-slice discs, T6 labelled T5."""

    models = _ThresholdVertebrae.models
    postprocessing = None

    def __call__(self, array, spacing):
        out = np.zeros(array.shape, np.uint8)
        for i, level in enumerate(("T4", "T5", "T5", "T7", "T8")):
            out[2 + 6 * i:6 + 6 * i, 8:22, 8:22] = V[level]
        return out


def test_predict_puts_the_vertebrae_in_order_where_the_profile_asks(tmp_path, monkeypatch):
    path = _ct(tmp_path)
    stages = {"vertebrae": _DuplicatingVertebrae(), "metastases": _RecordingLesions()}
    monkeypatch.setattr(inference, "_Stage", lambda stage, *a: stages[stage])
    levels = {}
    for profile, repair in (("demo", None), ("paper", None), ("paper", True), ("demo", False)):
        out = tmp_path / f"{profile}-{repair}"
        rows = inference.predict(path.parent, out, profile=profile, device="cpu",
                                 options=inference.PredictOptions(min_lesion_ml=0, repair_order=repair))
        levels[profile, repair] = {r["level"] for r in rows}
        prov = json.loads((out / "provenance.json").read_text())
        changed = prov["timings_s"]["case_a"]["vertebra_voxels_relabelled"]
        assert prov["parameters"]["repair_order"] == (changed > 0)
        assert changed in (0, 4 * 14 * 14)
    # the lesion at slices 13-14 lies in the third vertebra: T6 once repaired, T5 as predicted
    # (the one at slices 1-2 is next to the first vertebra, T4)
    assert levels["demo", None] == levels["paper", True] == {"T6", "T4"}
    assert levels["paper", None] == levels["demo", False] == {"T5", "T4"}


def test_cli_predict_passes_the_clean_up_options(tmp_path, monkeypatch):
    from spinemets import cli

    calls = []
    monkeypatch.setattr(inference, "predict", lambda **kw: calls.append(kw) or [])
    base = ["predict", "--input", str(tmp_path), "--out", str(tmp_path / "out")]
    assert cli.main(base) == 0
    assert cli.main([*base, "--no-repair-order", "--min-vertebra-ml", "2", "--min-lesion-ml", "0"]) == 0
    assert cli.main([*base, "--repair-order"]) == 0
    assert [c["options"].repair_order for c in calls] == [None, False, True]  # None: the profile's
    assert (calls[1]["options"].min_vertebra_ml, calls[1]["options"].min_lesion_ml) == (2.0, 0.0)


def test_a_stage_applies_the_selected_nnunet_postprocessing(tmp_path, monkeypatch):
    class Predictor:
        def predict_single_npy_array(self, data, props, previous=None):
            out = np.zeros(data.shape[1:], np.uint8)
            out[0:3, 0:3, 0:3] = 1
            out[6, 6, 6] = 1
            return out

    applied = []
    monkeypatch.setattr(inference.nnunet, "apply_postprocessing",
                        lambda seg, path: applied.append(path) or np.where(seg > 0, 2, 0).astype(np.uint8))
    stage = object.__new__(inference._Stage)
    stage.members, stage.postprocessing = [(None, Predictor())], None
    raw = stage(np.zeros((8, 8, 8), np.int16), SPACING)
    assert applied == [] and raw.max() == 1
    stage.postprocessing = tmp_path / "postprocessing.pkl"
    assert stage(np.zeros((8, 8, 8), np.int16), SPACING).max() == 2 and applied == [stage.postprocessing]


def test_predict_output_goes_straight_into_evaluate(tmp_path, monkeypatch):
    """The folder `predict` writes (CASE/STAGE.nii.gz beside CASE/STAGE.seg.nrrd) is `evaluate`'s input
    as it is; both forms of a prediction are checked to agree, and a stale one is an error."""
    from spinemets import cli
    from spinemets.evaluation import evaluate

    path = _ct(tmp_path)
    stages = {"vertebrae": _ThresholdVertebrae(), "metastases": _RecordingLesions()}
    monkeypatch.setattr(inference, "_Stage", lambda stage, *a: stages[stage])
    out = tmp_path / "predictions"
    inference.predict(path.parent, out, profile="demo", device="cpu", options=inference.PredictOptions(min_lesion_ml=0))
    ct = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(ct)
    refs = {"vertebrae": np.where(array > 300, V["T6"], 0), "metastases": np.where(array < -500, 1, 0)}
    for stage, ref in refs.items():
        ref_dir = tmp_path / "ref" / stage
        ref_dir.mkdir(parents=True)
        image = sitk.GetImageFromArray(ref.astype(np.uint8))
        image.CopyInformation(ct)
        sitk.WriteImage(image, str(ref_dir / "case_a.nii.gz"))
        assert cli.main(["evaluate", "--ref", str(ref_dir), "--pred", str(out), "--stage", stage,
                         "--out", str(tmp_path / "eval" / stage)]) == 0
        summary = json.loads((tmp_path / "eval" / stage / "summary.json").read_text())
        cls = "T6" if stage == "vertebrae" else "lytic"
        assert summary["cases"] == ["case_a"]
        assert summary["mean"][cls]["dice"]["value"] == 1.0
    # a .seg.nrrd edited after the label map was written no longer agrees with it: refused, named
    lesions = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "case_a" / "metastases.nii.gz")))
    from spinemets.formats.slicer import write_segments

    write_segments(out / "case_a" / "metastases.seg.nrrd", ct, [{"name": "sclerotic", "mask": lesions > 0}])
    with pytest.raises(SpinemetsError, match=r"metastases.seg.nrrd: differs from metastases.nii.gz beside it in 16"):
        evaluate.evaluate_folders(tmp_path / "ref" / "metastases", out, "metastases", tmp_path / "eval2")
    assert not (tmp_path / "eval2").exists()


# --------------------------------------------------------------------------------------------
# Confidence per lesion: the detection map, the confidence column and --min-confidence
# --------------------------------------------------------------------------------------------


def test_detection_map_is_the_largest_probability_of_each_voxels_class_over_the_lesion():
    lesions = np.zeros((6, 6, 6), np.uint8)
    lesions[0:2, 0:2, 0:2] = 1  # lytic lesion A
    lesions[1, 1, 2] = 2  # a sclerotic voxel touching A: one mixed lesion
    lesions[4:6, 4:6, 4:6] = 2  # sclerotic lesion B
    probs = np.zeros((3, 6, 6, 6), np.float32)
    probs[0] = 1.0
    probs[:, 0:2, 0:2, 0:2] = [[[[0.3]]], [[[0.6]]], [[[0.1]]]]  # A: P(lytic) 0.6 ...
    probs[:, 0, 0, 0] = [0.1, 0.7, 0.2]  # ... but 0.7 at one voxel
    probs[:, 1, 1, 2] = [0.1, 0.15, 0.75]  # the sclerotic voxel: its own class counts, 0.75
    probs[:, 4:6, 4:6, 4:6] = [[[[0.5]]], [[[0.45]]], [[[0.05]]]]  # B: P(sclerotic) 0.05 < P(lytic) 0.45
    probs[:, 5, 5, 5] = [0.2, 0.3, 0.5]
    det = inference.detection_map(lesions, probs)
    assert det.dtype == np.float32
    assert set(np.unique(det[lesions > 0]).tolist()) == {np.float32(0.75), np.float32(0.5)}
    assert (det[0:2, 0:2, 0:2] == np.float32(0.75)).all() and (det[4:6, 4:6, 4:6] == np.float32(0.5)).all()
    assert not det[lesions == 0].any()
    # the probabilities of a box only (the spine ROI): the same map
    box = (slice(0, 6), slice(0, 6), slice(0, 6))
    assert (inference.detection_map(lesions, probs, box) == det).all()
    big = np.zeros((8, 8, 8), np.uint8)
    big[1:7, 1:7, 1:7] = lesions
    shifted = inference.detection_map(big, probs, (slice(1, 7),) * 3)
    assert (shifted[1:7, 1:7, 1:7] == det).all() and shifted.sum() == det.sum()
    assert (inference.detection_map(lesions, None) == (lesions > 0)).all()  # labels only: confidence 1
    with pytest.raises(SpinemetsError, match="do not fit"):
        inference.detection_map(lesions, probs[:2])
    kept, det2, removed = inference.remove_unconfident_lesions(lesions, det, 0.6)
    assert removed == 1 and not kept[4:6, 4:6, 4:6].any() and (kept[0:2] == lesions[0:2]).all()
    assert not det2[4:6, 4:6, 4:6].any()
    same = inference.remove_unconfident_lesions(lesions, det, 0.0)
    assert same[0] is lesions and same[2] == 0
    with pytest.raises(SpinemetsError, match="--min-confidence"):
        inference.remove_unconfident_lesions(lesions, det, 1.5)


class _ProbabilisticLesions:
    """Stand-in for stage 2 that gives class probabilities: voxels below -500 HU are lytic with the
    probability stored in ``p`` for each lesion's first slice (z) (the rest of the lesion 0.5)."""

    models = _ThresholdVertebrae.models
    postprocessing = None

    def __init__(self, p):
        self.p = p

    def __call__(self, array, spacing):
        return self.with_probabilities(array, spacing)[0]

    def with_probabilities(self, array, spacing):
        seg = np.where(array < -500, 1, 0).astype(np.uint8)
        probs = np.zeros((3, *array.shape), np.float32)
        probs[0] = 1 - seg
        probs[1] = np.where(seg, 0.5, 0.0)
        probs[0][seg == 1] = 0.3
        probs[2][seg == 1] = 0.2
        for z, p in self.p.items():
            for c, value in enumerate((1 - p - 0.01, p, 0.01)):
                probs[c, z][seg[z] == 1] = value
        return seg, probs


def test_predict_writes_the_confidence_and_min_confidence_clears_below_it(tmp_path, monkeypatch):
    path = _ct(tmp_path)  # lytic lesions at z 13-14 (in the "vertebra") and z 1-2
    stages = {"vertebrae": _ThresholdVertebrae(), "metastases": _ProbabilisticLesions({13: 0.9, 1: 0.55})}
    monkeypatch.setattr(inference, "_Stage", lambda stage, *a: stages[stage])
    opts = dict(roi="none", min_lesion_ml=0)
    rows = inference.predict(path.parent, tmp_path / "a", device="cpu", options=inference.PredictOptions(**opts))
    assert sorted(r["confidence"] for r in rows) == [pytest.approx(0.55), pytest.approx(0.9)]
    case = tmp_path / "a" / "case_a"
    det_image = sitk.ReadImage(str(case / "metastases_confidence.nii.gz"))
    label_image = sitk.ReadImage(str(case / "metastases.nii.gz"))
    assert det_image.GetPixelID() == sitk.sitkFloat32
    assert det_image.GetSpacing() == label_image.GetSpacing() and det_image.GetOrigin() == label_image.GetOrigin()
    det, labels_ = sitk.GetArrayFromImage(det_image), sitk.GetArrayFromImage(label_image)
    assert ((det > 0) == (labels_ > 0)).all() and np.isclose(det[13:15, 13:15, 13:15], 0.9).all()
    with open(case / "lesions.csv", newline="") as fh:
        assert sorted(float(r["confidence"]) for r in csv.DictReader(fh)) == [0.55, 0.9]
    # the default keeps every lesion: the label map is the stage's own
    assert (labels_ == (sitk.GetArrayFromImage(sitk.ReadImage(str(path))) < -500)).all()
    rows = inference.predict(path.parent, tmp_path / "b", device="cpu",
                             options=inference.PredictOptions(**opts, min_confidence=0.6))
    assert [r["confidence"] for r in rows] == [pytest.approx(0.9)]
    prov = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert prov["parameters"]["min_confidence"] == 0.6 and prov["timings_s"]["case_a"]["unconfident_lesions_removed"] == 1
    kept = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / "case_a" / "metastases.nii.gz")))
    assert kept.sum() == 8 and not kept[1:3].any()
    with pytest.raises(SpinemetsError, match="--min-confidence"):
        inference.predict(path.parent, tmp_path / "c", device="cpu", options=inference.PredictOptions(min_confidence=2))


def test_a_stage_returns_the_mean_probabilities_of_its_members(tmp_path):
    class Predictor:
        def __init__(self, p):
            self.p = p

        def predict_single_npy_array(self, data, props, previous=None, save_or_return_probabilities=False):
            probs = np.zeros((3, *data.shape[1:]), np.float32)
            probs[0], probs[1] = 1 - self.p, self.p
            seg = np.argmax(probs, axis=0).astype(np.uint8)
            return (seg, probs) if save_or_return_probabilities else seg

    stage = object.__new__(inference._Stage)
    stage.postprocessing = None
    stage.members = [(None, Predictor(0.8))]
    seg, probs = stage.with_probabilities(np.zeros((4, 4, 4), np.int16), SPACING)
    assert (seg == 1).all() and np.allclose(probs[1], 0.8) and (stage(np.zeros((4, 4, 4)), SPACING) == seg).all()
    stage.members = [(None, Predictor(0.8)), (None, Predictor(0.3))]
    seg, probs = stage.with_probabilities(np.zeros((4, 4, 4), np.int16), SPACING)
    assert (seg == 1).all() and np.allclose(probs[1], 0.55) and np.allclose(probs.sum(axis=0), 1)
    assert (stage(np.zeros((4, 4, 4)), SPACING) == seg).all()


def test_cli_predict_passes_min_confidence(tmp_path, monkeypatch):
    from spinemets import cli

    calls = []
    monkeypatch.setattr(inference, "predict", lambda **kw: calls.append(kw) or [])
    base = ["predict", "--input", str(tmp_path), "--out", str(tmp_path / "out")]
    assert cli.main(base) == 0 and cli.main([*base, "--min-confidence", "0.7"]) == 0
    assert [c["options"].min_confidence for c in calls] == [None, 0.7]
    assert inference.PredictOptions().resolved("paper").min_confidence == 0.0
    assert inference.PredictOptions().resolved("demo").min_confidence == 0.0
