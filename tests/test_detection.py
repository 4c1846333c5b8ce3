"""Tests of spinemets.evaluation.detection: FROC, sensitivity at fixed false positives, size bands, regions and
patients on hand-built cases, the folder tables of `evaluate`, and a cross-check with MONAI's FROC."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk

from spinemets.evaluation import detection as det
from spinemets import paths
from spinemets.evaluation import evaluate
from spinemets.errors import SpinemetsError
from spinemets.labels import labels
from spinemets.paths import Workspace

V = labels("vertebrae")
SPACING = (10.0, 10.0, 10.0)  # 1 mL per voxel: volumes are voxel counts


def _hand_cases():
    """Two cases, every number of the tables computable by hand (see the expected values below).

    Case A: lytic L1 (8 voxels, in T5) found with confidence 0.9; lytic L2 (27 voxels, in L3)
    found by a prediction of 24 of its voxels (IoU 24/27, Dice 48/51) with confidence 0.4; a
    sclerotic lesion (8 voxels, outside the spine) missed; a false lytic voxel (confidence 0.8,
    outside the spine). Case B: no lesion; one false lytic voxel (0.6) in C3.
    """
    shape = (12, 12, 12)
    ref, pred, conf, vert = (np.zeros(shape, t) for t in (np.uint8, np.uint8, np.float32, np.uint8))
    ref[1:3, 1:3, 1:3] = pred[1:3, 1:3, 1:3] = 1
    conf[1:3, 1:3, 1:3] = 0.9
    ref[6:9, 6:9, 6:9] = pred[6:9, 6:9, 6:9] = 1
    pred[8, 8, 6:9] = 0
    conf[(pred == 1) & (conf == 0)] = 0.4
    pred[10, 1, 1], conf[10, 1, 1] = 1, 0.8
    ref[1:3, 9:11, 9:11] = 2
    vert[0:4, 0:4, 0:4] = V["T5"]
    vert[5:10, 5:10, 5:10] = V["L3"]
    ref_b, pred_b, conf_b, vert_b = (np.zeros(shape, t) for t in (np.uint8, np.uint8, np.float32, np.uint8))
    pred_b[5, 5, 5], conf_b[5, 5, 5] = 1, 0.6
    vert_b[4:7, 4:7, 4:7] = V["C3"]
    return {"A": (ref, pred, conf, vert), "B": (ref_b, pred_b, conf_b, vert_b)}


def _found(cases=None):
    cases = cases or _hand_cases()
    return {c: evaluate.evaluate_lesion_case(r, p, cf, v, SPACING)[1] for c, (r, p, cf, v) in cases.items()}


def test_froc_points_and_summary_numbers_by_hand():
    found = _found()
    rows = det.froc_rows(found)
    lytic = [(r["threshold"], r["sensitivity"], r["fp_per_case"]) for r in rows if r["class"] == "lytic"]
    # kept at >= 0.9: L1 (1 of 2 found, 0 FP); >= 0.8: + FP in A; >= 0.6: + FP in B; >= 0.4: + L2
    assert lytic == [(pytest.approx(0.9), 0.5, 0.0), (pytest.approx(0.8), 0.5, 0.5), (pytest.approx(0.6), 0.5, 1.0),
                     (pytest.approx(0.4), 1.0, 1.0)]
    anyl = [(r["sensitivity"], r["fp_per_case"]) for r in rows if r["class"] == "any"]
    assert anyl == [(1 / 3, 0.0), (1 / 3, 0.5), (1 / 3, 1.0), (2 / 3, 1.0)]  # the missed sclerotic counts here
    assert not [r for r in rows if r["class"] == "sclerotic"]  # nothing predicted: no threshold
    assert {r["n_cases"] for r in rows} == {2} and {r["n_reference"] for r in rows if r["class"] == "lytic"} == {2}
    summary = {(r["class"], r["metric"]): r for r in det.froc_summary_rows(found, n_boot=50)}
    # step rule: at 0.125, 0.25, 0.5 FP per case the 0.5 point; from 1 on, 1.0 (the last point, 1 FP per case)
    assert [summary["lytic", f"sensitivity@{f:g}fp"]["value"] for f in det.FP_RATES] == [0.5, 0.5, 0.5, 1, 1, 1, 1]
    assert summary["lytic", "cpm"]["value"] == pytest.approx(5.5 / 7)
    # area to 8 FP per case: 0.5 on [0, 1), 1.0 on [1, 8): (0.5 + 7) / 8
    assert summary["lytic", "auc_froc_8fp"]["value"] == pytest.approx(7.5 / 8)
    assert summary["any", "cpm"]["value"] == pytest.approx((3 / 3 + 4 * 2 / 3) / 7)
    assert summary["sclerotic", "cpm"]["value"] == 0 and summary["sclerotic", "auc_froc_8fp"]["value"] == 0
    for row in summary.values():
        assert row["ci_low"] <= row["value"] + 1e-12 and row["value"] <= row["ci_high"] + 1e-12


def test_sensitivity_at_a_rate_is_the_lowest_threshold_within_it():
    curve = det.Froc(threshold=np.array([0.9, 0.7, 0.5]), tp=np.array([1, 2, 3]), fp=np.array([1, 3, 9]),
                     n_reference=4, n_cases=4)  # FP per case 0.25, 0.75, 2.25
    assert det.sensitivity_at(curve, (0.125, 0.25, 0.5, 1, 2, 4, 8)).tolist() == [0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]
    # area to 2: 0 on [0, 0.25), 0.25 on [0.25, 0.75), 0.5 on [0.75, 2)
    assert det.froc_area(curve, 2.0) == pytest.approx((0.25 * 0.5 + 0.5 * 1.25) / 2)
    assert det.threshold_for(curve, 1.0) == 0.7 and math.isnan(det.threshold_for(curve, 0.1))
    empty = det.Froc(np.zeros(0), np.zeros(0, int), np.zeros(0, int), n_reference=0, n_cases=3)
    assert np.isnan(det.sensitivity_at(empty)).all() and math.isnan(det.froc_area(empty))


def test_ties_enter_together():
    d = det.Detections(pred_score=np.array([0.7, 0.7, 0.3]), pred_tp=np.array([True, False, True]),
                       pred_ml=np.ones(3), pred_region=np.zeros(3, int), ref_ml=np.ones(2),
                       ref_score=np.array([0.7, 0.3]), ref_dice=np.ones(2), ref_region=np.zeros(2, int))
    curve = det.froc_curve([d])
    assert curve.threshold.tolist() == [0.7, 0.3] and curve.tp.tolist() == [1, 2] and curve.fp.tolist() == [1, 1]


def test_size_bands_regions_and_patients_by_hand():
    found = _found()
    bands = {(r["grouping"], r["band"], r["class"]): r for r in det.band_rows(found)}
    assert det.band_names() == ["<0.5 mL", "0.5-2 mL", "2-10 mL", ">=10 mL"]
    b = bands["volume", "2-10 mL", "lytic"]  # L1, 8 mL, found exactly
    assert (b["n_reference"], b["tp"], b["sensitivity"], b["dice"], b["fp"]) == (1, 1, 1.0, 1.0, 0)
    b = bands["volume", ">=10 mL", "lytic"]  # L2, 27 mL
    assert (b["n_reference"], b["tp"], b["dice"]) == (1, 1, pytest.approx(48 / 51))
    b = bands["volume", "0.5-2 mL", "lytic"]  # the two false 1-mL voxels
    assert (b["n_reference"], b["fp"], b["fp_per_case"]) == (0, 2, 1.0) and math.isnan(b["sensitivity"])
    b = bands["volume", "2-10 mL", "any"]  # L1 found, the sclerotic lesion (8 mL) missed
    assert (b["n_reference"], b["tp"], b["sensitivity"], b["dice"]) == (2, 1, 0.5, 0.5)
    assert bands["region", "thoracic", "lytic"]["tp"] == 1 and bands["region", "lumbar", "lytic"]["tp"] == 1
    assert bands["region", "cervical", "lytic"]["fp"] == 1 and bands["region", "outside", "lytic"]["fp"] == 1
    assert (bands["region", "outside", "sclerotic"]["n_reference"], bands["region", "outside", "sclerotic"]["tp"]) == (1, 0)
    patients = {(r["class"], r["metric"]): r for r in det.patient_table(found, n_boot=50)}
    assert patients["lytic", "patient_sensitivity"]["value"] == 1.0  # A: a lytic lesion found
    assert patients["lytic", "patient_specificity"]["value"] == 0.0  # B: lesion-free, a false lytic lesion
    assert patients["sclerotic", "patient_sensitivity"]["value"] == 0.0
    assert patients["sclerotic", "patient_specificity"]["value"] == 1.0  # B: no sclerotic either way
    assert {r["n"] for r in patients.values()} == {1}
    assert det.volume_band([0.49, 0.5, 2.0, 9.99, 10.0]).tolist() == [0, 1, 2, 2, 3]  # lower edges inclusive


def test_bootstrap_equals_resampling_the_cases_one_by_one():
    rng = np.random.default_rng(3)
    per_case = []
    for _ in range(6):
        n_pred, n_ref = rng.integers(0, 5), rng.integers(0, 4)
        per_case.append(det.Detections(pred_score=rng.choice([0.2, 0.4, 0.6, 0.8], n_pred),
                                       pred_tp=rng.random(n_pred) < 0.5, pred_ml=np.ones(n_pred),
                                       pred_region=np.zeros(n_pred, int), ref_ml=np.ones(n_ref),
                                       ref_score=np.full(n_ref, np.nan), ref_dice=np.zeros(n_ref),
                                       ref_region=np.zeros(n_ref, int)))
    n_boot = 40
    weights = det._case_weights(len(per_case), n_boot, seed=7)
    reps = []
    for w in weights:  # the same resamples, each built as a list of cases
        sample = [d for d, k in zip(per_case, w) for _ in range(k)]
        curve = det.froc_curve(sample)
        at = det.sensitivity_at(curve)
        reps.append([*at, np.mean(at), det.froc_area(curve)])
    reps = np.array(reps)
    summary = det.froc_summary(per_case, n_boot=n_boot, seed=7, chunk=7)
    for j, entry in enumerate(summary.values()):
        low, high = det._interval(reps[:, j].copy(), 0.95)
        assert entry["ci_low"] == pytest.approx(low) and entry["ci_high"] == pytest.approx(high)


def _write(path, array, reference=None, spacing=SPACING):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def _folders(tmp_path, cases=None, with_maps=True):
    """Reference folder (flat) and a prediction folder in `spinemets predict`'s layout."""
    for case, (ref, pred, conf, vert) in (cases or _hand_cases()).items():
        _write(tmp_path / "ref" / f"{case}.nii.gz", ref)
        _write(tmp_path / "pred" / case / "metastases.nii.gz", pred)
        if with_maps:
            _write(tmp_path / "pred" / case / paths.CONFIDENCE_NAME, conf)
            _write(tmp_path / "pred" / case / paths.VERTEBRAE_NAME, vert)
    return tmp_path / "ref", tmp_path / "pred"


def test_evaluate_command_draws_the_curve_when_asked(tmp_path, capsys):
    from spinemets import cli

    ref, pred = _folders(tmp_path)
    for plot, out in ((False, "tables"), (True, "plotted")):
        args = ["evaluate", "--ref", str(ref), "--pred", str(pred), "--stage", "metastases", "--out", str(tmp_path / out)]
        assert cli.main(args + (["--plot"] if plot else [])) == 0
        assert (tmp_path / out / "froc.csv").is_file()
        assert (tmp_path / out / evaluate.FROC_PLOT).exists() == plot
        assert ("froc.png" in capsys.readouterr().out) == plot


def test_evaluate_writes_the_detection_tables(tmp_path):
    ref, pred = _folders(tmp_path)
    evaluate.evaluate_folders(ref, pred, "metastases", tmp_path / "tables")
    assert not (tmp_path / "tables" / evaluate.FROC_PLOT).exists()  # drawn only when asked for
    doc = evaluate.evaluate_folders(ref, pred, "metastases", tmp_path / "out", plot=True)
    with open(tmp_path / "out" / "froc.csv", newline="") as fh:
        froc = list(csv.DictReader(fh))
    assert list(froc[0]) == det.FROC_FIELDS
    assert [(round(float(r["threshold"]), 6), float(r["sensitivity"]), float(r["fp_per_case"])) for r in froc
            if r["class"] == "lytic"] == [(0.9, 0.5, 0.0), (0.8, 0.5, 0.5), (0.6, 0.5, 1.0), (0.4, 1.0, 1.0)]
    with open(tmp_path / "out" / "lesion_bands.csv", newline="") as fh:
        bands = list(csv.DictReader(fh))
    assert {r["grouping"] for r in bands} == {"volume", "region"}
    assert (tmp_path / "out" / "froc.png").read_bytes()[:4] == b"\x89PNG"
    assert doc["detection"]["cases_with_detection_map"] == ["A", "B"]
    stored = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert any(r["metric"] == "cpm" and r["class"] == "lytic" and r["value"] == pytest.approx(5.5 / 7)
               for r in stored["detection"]["froc_summary"])


def test_evaluate_without_detection_maps_has_one_operating_point(tmp_path):
    ref, pred = _folders(tmp_path, with_maps=False)
    doc = evaluate.evaluate_folders(ref, pred, "metastases", tmp_path / "out")
    with open(tmp_path / "out" / "froc.csv", newline="") as fh:
        lytic = [r for r in csv.DictReader(fh) if r["class"] == "lytic"]
    assert [(float(r["threshold"]), float(r["sensitivity"]), float(r["fp_per_case"])) for r in lytic] == [(1.0, 1.0, 1.0)]
    assert doc["detection"]["cases_with_detection_map"] == [] and doc["detection"]["regions"] is None
    with open(tmp_path / "out" / "lesion_bands.csv", newline="") as fh:
        assert {r["grouping"] for r in csv.DictReader(fh)} == {"volume"}


def test_a_detection_map_that_does_not_fit_is_refused_by_name(tmp_path):
    cases = _hand_cases()
    ref_a, pred_a, conf_a, vert_a = cases["A"]
    stale = conf_a.copy()
    stale[10, 1, 1] = 0  # a predicted lesion without confidence
    ref, pred = _folders(tmp_path, {"A": (ref_a, pred_a, stale, vert_a)})
    with pytest.raises(SpinemetsError, match=r"A/metastases_confidence.nii.gz: detection map and metastases.nii.gz "
                                             r"disagree on 1 voxel"):
        evaluate.evaluate_folders(ref, pred, "metastases", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _write(pred / "A" / paths.CONFIDENCE_NAME, np.where(conf_a > 0, 1.5, 0).astype(np.float32))
    with pytest.raises(SpinemetsError, match="outside \\[0, 1\\]"):
        evaluate.evaluate_folders(ref, pred, "metastases", tmp_path / "out")
    _write(pred / "A" / paths.CONFIDENCE_NAME, conf_a, spacing=(1.0, 1.0, 1.0))
    with pytest.raises(SpinemetsError, match="metastases_confidence.nii.gz"):
        evaluate.evaluate_folders(ref, pred, "metastases", tmp_path / "out")
    # a file cut short: unreadable, or its lost voxels read as 0 where lesions are; named either way
    _write(pred / "A" / paths.CONFIDENCE_NAME, conf_a)
    whole = (pred / "A" / paths.CONFIDENCE_NAME).read_bytes()
    (pred / "A" / paths.CONFIDENCE_NAME).write_bytes(whole[: len(whole) // 2])
    with pytest.raises(SpinemetsError, match="A/metastases_confidence.nii.gz: "):
        evaluate.evaluate_folders(ref, pred, "metastases", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Cross-check with an independent implementation: MONAI's FROC (monai.metrics.froc)
# ---------------------------------------------------------------------------------------------


def _random_cases(n_cases=12, seed=0):
    """Cases where MONAI's hit rule (a detection's point inside a reference lesion) and ours (IoU > 0.5)
    agree: each reference ball is found by a ball shifted by one voxel (IoU > 0.5, centre inside) or
    missed; false positives are balls far from every reference lesion; scores on a coarse grid (ties)."""
    rng = np.random.default_rng(seed)
    shape = (40, 40, 40)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    out = {}
    for c in range(n_cases):
        ref = np.zeros(shape, np.uint8)
        pred = np.zeros(shape, np.uint8)
        conf = np.zeros(shape, np.float32)
        centres = [(8 + 12 * i, 8 + 12 * j, 10) for i in range(3) for j in range(3)]
        rng.shuffle(centres)
        n_ref = int(rng.integers(0, 5))
        for k, (cz, cy, cx) in enumerate(centres[:n_ref]):
            r = rng.uniform(2.5, 4.0)
            ref[(z - cz) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r] = 1 + k % 2
            if rng.random() < 0.7:
                ball = (z - cz - 1) ** 2 + (y - cy) ** 2 + (x - cx) ** 2 <= r * r
                pred[ball] = 1 + k % 2
                conf[ball] = rng.choice([0.35, 0.5, 0.65, 0.8, 0.95])
        for cz, cy, _ in centres[n_ref:n_ref + int(rng.integers(0, 4))]:
            ball = (z - cz) ** 2 + (y - cy) ** 2 + (x - 30) ** 2 <= 4
            pred[ball] = int(rng.integers(1, 3))
            conf[ball] = rng.choice([0.35, 0.5, 0.65, 0.8, 0.95])
        out[f"c{c:02d}"] = (ref, pred, conf, None)
    return out


def test_froc_equals_monais_within_its_conventions():
    """MONAI (monai.metrics.froc, from CAMELYON16) takes a detection as a point with a probability;
    it is a hit when the point lies inside a reference lesion. We give it each predicted lesion's
    centroid voxel and confidence. Its curve (i) leaves out the lowest distinct probability as a
    threshold (the 0 of missed lesions, where any lesion is missed) and (ii) ends at (0, 0);
    its score (iii) interpolates linearly between points, at 0.25 ... 8 FP per image. Within
    those conventions the numbers are equal."""
    pytest.importorskip("monai", reason="monai (the test extra) is not installed: no cross-check with MONAI")
    import cc3d
    from monai.metrics import compute_fp_tp_probs_nd, compute_froc_curve_data, compute_froc_score

    cases = _random_cases()
    found = {c: evaluate.evaluate_lesion_case(r, p, cf, None, (1.0, 1.0, 1.0))[1] for c, (r, p, cf, _) in cases.items()}
    ours = det.froc_rows(found)
    for cls, value in (("lytic", 1), ("sclerotic", 2), ("any", None)):
        fps, tps, n_targets = [], [], 0
        for ref, pred, conf, _ in cases.values():
            r = ref > 0 if value is None else ref == value
            p = pred > 0 if value is None else pred == value
            mask = cc3d.connected_components(r.astype(np.uint8), connectivity=26)
            comps, n = cc3d.connected_components(p.astype(np.uint8), connectivity=26, return_N=True)
            stats = cc3d.statistics(comps)
            coords = np.rint(np.asarray(stats["centroids"][1:n + 1])).astype(int).reshape(-1, 3)
            probs = np.array([conf[comps == k].max() for k in range(1, n + 1)], dtype=np.float32)
            fp, tp, k = compute_fp_tp_probs_nd(probs, coords, mask)
            fps.append(fp)
            tps.append(tp)
            n_targets += k
        fp_probs, tp_probs = np.concatenate(fps), np.concatenate(tps)
        assert (tp_probs == 0).any()  # some lesion missed: MONAI's lowest threshold (0) is not one of ours
        fpi, sens = compute_froc_curve_data(fp_probs, tp_probs, n_targets, len(cases))
        mine = [r for r in ours if r["class"] == cls]
        assert mine[0]["n_reference"] == n_targets
        # MONAI: thresholds ascending then (0, 0); ours: descending
        assert np.allclose(fpi[:-1][::-1], [r["fp_per_case"] for r in mine])
        assert np.allclose(sens[:-1][::-1], [r["sensitivity"] for r in mine])
        assert fpi[-1] == 0 and sens[-1] == 0
        # the score: MONAI interpolates linearly; the same interpolation of our curve gives its value
        rates = (0.25, 0.5, 1, 2, 4, 8)
        fp_ours = np.r_[0.0, [r["fp_per_case"] for r in mine]]
        sens_ours = np.r_[0.0, [r["sensitivity"] for r in mine]]
        assert compute_froc_score(fpi, sens, rates) == pytest.approx(np.interp(rates, fp_ours, sens_ours).mean())
        # our step rule never exceeds the interpolation (an operating point one can choose)
        curve = det.froc_curve([found[c][cls] for c in found])
        assert (det.sensitivity_at(curve, rates) <= np.interp(rates, fp_ours, sens_ours) + 1e-12).all()


def test_validation_detections_read_the_folds_own_predictions_and_probabilities(tmp_path, monkeypatch):
    """The threshold for a chosen false-positive rate comes from the cross-validation (each fold's
    predictions of its own validation cases, with nnU-Net's --npz probabilities), not the test cases."""
    from spinemets.training import nnunet

    ws = Workspace(tmp_path / "ws")
    monkeypatch.delenv("nnUNet_raw", raising=False)
    model = tmp_path / "ws" / "results" / "model"
    monkeypatch.setattr(nnunet, "trained_models", lambda *a, **k: [{"folder": str(model), "folds": [0, 1, "all"]}])
    labels_tr = ws.raw / ws.dataset_name("metastases") / "labelsTr"
    cases = _hand_cases()
    for fold, (case, (ref, pred, conf, _)) in enumerate(cases.items()):
        _write(labels_tr / f"{case}.nii.gz", ref)
        folder = model / f"fold_{fold}" / "validation"
        _write(folder / f"{case}.nii.gz", pred)
        probs = np.zeros((3, *pred.shape), np.float32)
        probs[0] = 1 - conf  # each lesion voxel's own class has the probability of the hand-built map
        for c in (1, 2):
            probs[c] = np.where(pred == c, conf, 0)
        np.savez_compressed(folder / f"{case}.npz", probabilities=probs)
    (model / "fold_all" / "validation").mkdir(parents=True)  # fold 'all' validates on its training cases: skipped
    np.savez_compressed(model / "fold_all" / "validation" / "A.npz", probabilities=np.zeros(1))
    found = evaluate.validation_detections(ws, "paper")
    assert list(found) == ["A", "B"]
    lytic = det.froc_curve([found[c]["lytic"] for c in found])
    assert np.allclose(lytic.threshold, [0.9, 0.8, 0.6, 0.4]) and lytic.fp_per_case.tolist() == [0, 0.5, 1, 1]
    assert det.threshold_for(lytic, 0.5) == pytest.approx(0.8)  # at most 0.5 FP per case: keep confidence >= 0.8
    np.savez_compressed(model / "fold_0" / "validation" / "A.npz", other=np.zeros(1))
    with pytest.raises(SpinemetsError, match="A.npz: no 'probabilities'"):
        evaluate.validation_detections(ws, "paper")
    (model / "fold_0" / "validation" / "A.npz").unlink()
    (model / "fold_1" / "validation" / "B.npz").unlink()
    assert evaluate.validation_detections(ws, "paper") == {}


@pytest.mark.slow
def test_the_ci_run_predicts_confidences_and_its_froc_ends_at_the_lesion_counts(ci_run):
    """End to end on the trained ci run: every predicted lesion has a confidence in the detection map
    and in lesions.csv, and each type's FROC ends at the pooled lesion TP and FP of summary.csv
    (all predicted lesions kept is the label map's own operating point)."""
    import pandas as pd

    ws = ci_run / "workspace" / "ci"
    case_dirs = [p for p in sorted((ws / "predictions").iterdir()) if (p / "metastases.nii.gz").is_file()]
    assert case_dirs
    for case_dir in case_dirs:
        labels_ = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "metastases.nii.gz")))
        image = sitk.ReadImage(str(case_dir / paths.CONFIDENCE_NAME))
        assert image.GetPixelID() == sitk.sitkFloat32
        conf = sitk.GetArrayFromImage(image)
        assert ((conf > 0) == (labels_ > 0)).all() and conf.max(initial=0) <= 1
        assert (conf[labels_ > 0] >= 1 / 3 - 1e-6).all()  # the argmax class has at least a third of the mass
        rows = pd.read_csv(case_dir / "lesions.csv")
        # the table's confidence (6 decimals) and the map's float32 value of each lesion
        table = np.unique(rows["confidence"].astype(float))
        mapped = np.unique(conf[labels_ > 0]).astype(float)
        assert table.shape == mapped.shape and np.allclose(table, mapped, atol=2e-6), (table, mapped)
    evaluation = ws / "evaluation" / "metastases"
    froc = pd.read_csv(evaluation / "froc.csv")
    summary = pd.read_csv(evaluation / "summary.csv").query("aggregate == 'pooled'")
    for cls, curve in froc.groupby("class"):
        assert curve["threshold"].is_monotonic_decreasing and curve["fp"].is_monotonic_increasing
        assert curve["tp"].is_monotonic_increasing
        if cls != "any":
            pooled = summary[summary["class"] == cls].set_index("metric")["value"]
            assert (curve["tp"].iloc[-1], curve["fp"].iloc[-1]) == (pooled["tp"], pooled["fp"])
    for name in evaluate.DETECTION_FILES:
        assert (evaluation / name).is_file(), name
