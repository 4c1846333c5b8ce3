"""Tests of spinemets.evaluation.metrics: hand-computed cases, edge cases, and cross-checks with nnU-Net and panoptica."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinemets import labels

from spinemets.evaluation import metrics
from spinemets.evaluation import evaluate
from spinemets.errors import SpinemetsError

NAN = math.nan
V = labels.STAGES["vertebrae"]["labels"]


def same(a, b, tol=1e-12) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def write_label_map(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> Path:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def balls(shape, n, seed, n_classes=2, radius=(1.5, 4.0)) -> np.ndarray:
    """Random balls of random classes (they may touch and merge; both implementations see the same)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, dtype=np.uint8)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for _ in range(n):
        c = rng.uniform(0, shape)
        r = rng.uniform(*radius)
        out[(z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r] = rng.integers(1, n_classes + 1)
    return out


# ---------------------------------------------------------------------------------------------
# formulas and registry


def test_formulas_by_hand():
    tp, fp, fn = 3, 1, 2
    assert metrics.dice(tp, fp, fn) == 6 / 9
    assert metrics.iou(tp, fp, fn) == 3 / 6
    assert metrics.precision(tp, fp, fn) == 3 / 4
    assert metrics.recall(tp, fp, fn) == 3 / 5
    assert metrics.fbeta(tp, fp, fn) == 15 / 24  # (1+4)*3 / (5*3 + 4*2 + 1)
    assert metrics.fbeta(tp, fp, fn, beta=1) == pytest.approx(metrics.dice(tp, fp, fn))
    assert metrics.fbeta(tp, fp, fn, beta=0.5) == pytest.approx(1.25 * 3 / (1.25 * 3 + 0.25 * 2 + 1))
    assert metrics.recognition_quality(2, 1, 1) == 2 / 3
    assert metrics.segmentation_quality(2, 1.5) == 0.75
    assert metrics.panoptic_quality(2, 1, 1, 1.5) == 0.5 == 0.75 * (2 / 3)


def test_zero_denominators_are_nan_and_arrays_work():
    assert math.isnan(metrics.dice(0, 0, 0))
    assert math.isnan(metrics.recall(0, 5, 0))  # nothing to find
    assert metrics.precision(0, 5, 0) == 0.0
    assert math.isnan(metrics.precision(0, 0, 5))  # nothing predicted
    assert metrics.recall(0, 0, 5) == 0.0
    assert math.isnan(metrics.segmentation_quality(0, 0.0))
    assert metrics.panoptic_quality(0, 1, 1, 0.0) == 0.0
    out = metrics.dice(np.array([0, 1]), np.array([0, 1]), np.array([0, 0]))
    assert math.isnan(out[0]) and out[1] == 2 / 3


def test_registry_is_complete_and_consistent():
    for name, m in metrics.METRICS.items():
        assert m.name == name and m.formula and m.long_name
        assert m.direction in ("higher", "lower", "count")
        assert m.level in ("voxel", "instance", "landmark")
        assert m.needs_spacing == (m.level == "landmark")
        assert set(m.stages) <= set(labels.STAGE_NAMES)
    assert "lesion_recall" in metrics.metric_names("metastases")
    assert "lesion_recall" not in metrics.metric_names("vertebrae")
    assert "identified" in metrics.metric_names("vertebrae")
    c = metrics.Counts(tp=3, fp=1, fn=2, iou_sum=2.1)
    assert metrics.METRICS["fbeta"](c, 2.0) == metrics.fbeta(3, 1, 2)
    assert metrics.METRICS["pq"](c) == metrics.panoptic_quality(3, 1, 2, 2.1)
    assert "2·TP" in metrics.METRICS["dice"].formula
    with pytest.raises(SpinemetsError, match="centroids"):
        metrics.METRICS["identified"](c)


# ---------------------------------------------------------------------------------------------
# a hand-computed lesion case


def lesion_case():
    """Lytic: A matched (IoU 27/36), B shifted (IoU 9/45), C missed; D a false positive;
    the sclerotic lesion S is predicted as lytic (E): a lytic FP and a sclerotic FN."""
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[1:4, 1:4, 1:4] = 1  # A
    pred[1:4, 1:4, 1:5] = 1  # A', 36 voxels
    ref[1:4, 6:9, 1:4] = 1  # B
    pred[1:4, 6:9, 3:6] = 1  # B', overlap 9
    ref[6:8, 1:3, 6:8] = 1  # C, 8 voxels
    pred[6:8, 6:8, 1:3] = 1  # D, 8 voxels
    ref[6:9, 6:9, 6:9] = 2  # S
    pred[6:9, 6:9, 6:9] = 1  # E
    return ref, pred


def test_lesion_case_iou_rule():
    ref, pred = lesion_case()
    r = metrics.evaluate_case(ref, pred, "metastases")
    lytic, scl = r["lytic"], r["sclerotic"]
    # voxels: ref 27+27+8 = 62, pred 36+27+8+27 = 98, TP 27+9 = 36
    assert (lytic["voxel_tp"], lytic["voxel_fp"], lytic["voxel_fn"]) == (36, 62, 26)
    assert lytic["dice"] == 72 / 160
    assert lytic["iou"] == 36 / 124
    assert lytic["fbeta"] == 5 * 36 / (5 * 36 + 4 * 26 + 62)
    assert (lytic["tp"], lytic["fp"], lytic["fn"]) == (1, 3, 2)
    assert lytic["lesion_precision"] == 1 / 4
    assert lytic["lesion_recall"] == 1 / 3
    assert lytic["lesion_fbeta"] == 5 / 16  # 5·1 / (5·1 + 4·2 + 3)
    assert lytic["sq"] == 0.75
    assert lytic["rq"] == 1 / 3.5
    assert lytic["pq"] == pytest.approx(0.75 / 3.5)
    # sclerotic: reference only -> all false negatives
    assert (scl["tp"], scl["fp"], scl["fn"]) == (0, 0, 1)
    assert scl["lesion_recall"] == 0 and math.isnan(scl["lesion_precision"])
    assert scl["rq"] == 0 and scl["pq"] == 0 and math.isnan(scl["sq"])
    assert scl["dice"] == 0 and scl["recall"] == 0 and math.isnan(scl["precision"])


def test_lesion_case_overlap_rule():
    ref, pred = lesion_case()
    lytic = metrics.evaluate_case(ref, pred, "metastases", match="overlap")["lytic"]
    assert (lytic["tp"], lytic["fp"], lytic["fn"]) == (2, 2, 1)
    assert lytic["sq"] == pytest.approx((0.75 + 0.2) / 2)
    assert lytic["rq"] == 2 / 3.5
    assert lytic["pq"] == pytest.approx(0.95 / 3.5)
    assert lytic["dice"] == 72 / 160  # voxel metrics do not depend on the matching rule


def test_overlap_rule_is_greedy_by_iou_and_one_to_one():
    size_r = np.array([0, 10, 10])
    size_p = np.array([0, 10, 4, 10])
    # ref 1 overlaps pred 1 (IoU 6/14) and pred 2 (IoU 4/10); ref 2 overlaps pred 1 (IoU 3/17) and pred 3 (1/19)
    r, p, ious = metrics.match_pairs([1, 1, 2, 2], [1, 2, 1, 3], [6, 4, 3, 1], size_r, size_p, "overlap")
    assert dict(zip(r.tolist(), p.tolist())) == {1: 1, 2: 3}
    assert ious.tolist() == [6 / 14, 1 / 19]
    r, p, _ = metrics.match_pairs([1, 1, 2, 2], [1, 2, 1, 3], [6, 4, 3, 1], size_r, size_p, "iou")
    assert r.size == 0  # no pair above one half


def test_iou_rule_is_strict_and_unique():
    size = np.array([0, 27, 27])
    # 18 of 27 shared: IoU = 18/36 = 0.5 exactly -> not a match
    r, _, _ = metrics.match_pairs([1], [1], [18], size, size, "iou")
    assert r.size == 0
    r, _, ious = metrics.match_pairs([1], [1], [19], size, size, "iou")
    assert r.tolist() == [1] and ious[0] == 19 / 35
    rng = np.random.default_rng(3)
    for seed in range(5):
        ref, pred = balls((24, 24, 24), 25, seed), balls((24, 24, 24), 25, seed + 100)
        pred[rng.random(pred.shape) < 0.02] = 0
        m = metrics.match_components(ref, pred)
        assert len(set(m.ref_ids.tolist())) == m.ref_ids.size
        assert len(set(m.pred_ids.tolist())) == m.pred_ids.size
        assert np.all(m.ious > 0.5)
        assert np.all(m.ref_class[m.ref_ids] == m.pred_class[m.pred_ids])


def test_connectivity_is_configurable():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[1, 1, 1] = ref[2, 2, 2] = 1  # corners touch
    pred = ref.copy()
    assert metrics.evaluate_case(ref, pred, "metastases")["lytic"]["tp"] == 1
    assert metrics.evaluate_case(ref, pred, "metastases", connectivity=6)["lytic"]["tp"] == 2
    with pytest.raises(SpinemetsError, match="connectivity"):
        metrics.evaluate_case(ref, pred, "metastases", connectivity=8)


# ---------------------------------------------------------------------------------------------
# edge cases


def test_class_absent_from_both_is_nan_with_zero_counts():
    empty = np.zeros((5, 5, 5), np.uint8)
    for stage in labels.STAGE_NAMES:
        r = metrics.evaluate_case(empty, empty, stage)
        for cls, row in r.items():
            for key, value in row.items():
                if metrics.METRICS[key].direction == "count":
                    assert value == 0, (cls, key)
                else:
                    assert math.isnan(value), (cls, key)


def test_reference_empty_means_all_false_positives():
    ref = np.zeros((8, 8, 8), np.uint8)
    pred = ref.copy()
    pred[1:3, 1:3, 1:3] = 2
    pred[5:7, 5:7, 5:7] = 2
    scl = metrics.evaluate_case(ref, pred, "metastases")["sclerotic"]
    assert (scl["tp"], scl["fp"], scl["fn"]) == (0, 2, 0)
    assert scl["lesion_precision"] == 0 and math.isnan(scl["lesion_recall"])
    assert scl["lesion_fbeta"] == 0 and scl["rq"] == 0 and scl["pq"] == 0 and math.isnan(scl["sq"])
    assert scl["dice"] == 0 and scl["voxel_fp"] == 16
    assert math.isnan(metrics.evaluate_case(ref, pred, "metastases")["lytic"]["dice"])


def test_prediction_empty_means_all_false_negatives():
    ref = np.zeros((8, 8, 8), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[5:7, 5:7, 5:7] = 1
    lytic = metrics.evaluate_case(ref, np.zeros_like(ref), "metastases")["lytic"]
    assert (lytic["tp"], lytic["fp"], lytic["fn"]) == (0, 0, 2)
    assert lytic["lesion_recall"] == 0 and math.isnan(lytic["lesion_precision"])
    assert lytic["rq"] == 0 and lytic["pq"] == 0 and lytic["dice"] == 0 and lytic["voxel_fn"] == 16


def test_bad_arrays_raise_clear_errors():
    a = np.zeros((4, 4, 4), np.uint8)
    with pytest.raises(SpinemetsError, match="shape"):
        metrics.evaluate_case(a, np.zeros((4, 4, 5), np.uint8), "metastases")
    bad = a.copy()
    bad[0, 0, 0] = 3
    with pytest.raises(SpinemetsError, match=r"prediction: holds label value\(s\) 3 outside the metastases"):
        metrics.evaluate_case(a, bad, "metastases")
    with pytest.raises(SpinemetsError, match="non-integer"):
        metrics.evaluate_case(a, a.astype(float) + 0.5, "metastases")
    with pytest.raises(SpinemetsError, match="unknown stage"):
        metrics.evaluate_case(a, a, "ribs")
    with pytest.raises(SpinemetsError, match="matching rule"):
        metrics.evaluate_case(a, a, "metastases", match="hungarian")
    # integer-valued floats and signed integers are accepted
    b = a.astype(np.int16)
    b[1, 1, 1] = 1
    assert metrics.evaluate_case(b, b.astype(np.float32), "metastases")["lytic"]["dice"] == 1.0


# ---------------------------------------------------------------------------------------------
# vertebrae: one instance per label, centroids and identification


def spine(shape=(30, 8, 8), names=("L1", "L2", "L3"), height=10):
    """Vertebrae stacked along z, each ``height`` slices of a 4 x 4 square."""
    out = np.zeros(shape, np.uint8)
    for i, name in enumerate(names):
        out[i * height : (i + 1) * height, 2:6, 2:6] = V[name]
    return out


def test_vertebra_instances_match_by_iou_of_the_label():
    ref = spine()
    pred = ref.copy()
    pred[pred == V["L1"]] = 0
    pred[5:10, 2:6, 2:6] = V["L1"]  # L1: 80 of 160 voxels -> IoU 0.5 exactly: no match
    pred[10:12][pred[10:12] == V["L2"]] = 0  # L2: 128 of 160 -> IoU 0.8: match
    r = metrics.evaluate_case(ref, pred, "vertebrae")
    l1, l2, l3 = r["L1"], r["L2"], r["L3"]
    assert l1["iou"] == 0.5 and (l1["tp"], l1["fp"], l1["fn"]) == (0, 1, 1)
    assert l1["rq"] == 0 and l1["pq"] == 0 and math.isnan(l1["sq"])
    assert l2["iou"] == 0.8 and (l2["tp"], l2["fp"], l2["fn"]) == (1, 0, 0)
    assert l2["sq"] == l2["pq"] == 0.8 and l2["rq"] == 1
    assert l2["fbeta"] == 5 * 128 / (5 * 128 + 4 * 32)
    assert l3["dice"] == 1 and l3["pq"] == 1
    assert math.isnan(r["C1"]["dice"]) and math.isnan(r["C1"]["identified"])
    over = metrics.evaluate_case(ref, pred, "vertebrae", match="overlap")["L1"]
    assert (over["tp"], over["fp"], over["fn"]) == (1, 0, 0) and over["pq"] == 0.5


def test_centroid_distance_uses_spacing_and_voxel_counts_do_not():
    ref = spine(shape=(34, 8, 8))
    pred = np.roll(ref, 2, axis=0)  # every vertebra 2 slices further
    iso = metrics.evaluate_case(ref, pred, "vertebrae", spacing=(1.0, 1.0, 1.0))
    aniso = metrics.evaluate_case(ref, pred, "vertebrae", spacing=(3.0, 0.5, 0.5))
    for name in ("L1", "L2", "L3"):
        assert iso[name]["centroid_distance_mm"] == pytest.approx(2.0)
        assert aniso[name]["centroid_distance_mm"] == pytest.approx(6.0)
        for key in ("voxel_tp", "voxel_fp", "voxel_fn", "dice", "tp", "pq"):
            assert iso[name][key] == aniso[name][key]


def test_identification_rate_follows_verse():
    ref = spine(shape=(60, 8, 8), names=("T12", "L1", "L2", "L3", "L4"), height=12)
    pred = ref.copy()
    pred[ref == V["L1"]] = V["L2"]  # L1 labelled L2: the predicted L2 centroid moves to 12 mm from L2's
    pred[ref == V["L2"]] = V["L1"]  # and L2 labelled L1: both swapped, each closest to the other reference
    pred[ref == V["L4"]] = 0  # L4 missed
    r = metrics.evaluate_case(ref, pred, "vertebrae", spacing=(2.0, 1.0, 1.0))
    assert r["T12"]["identified"] == 1 and r["L3"]["identified"] == 1
    assert r["L1"]["identified"] == 0 and r["L2"]["identified"] == 0
    assert r["L1"]["centroid_distance_mm"] == pytest.approx(24.0)
    assert r["L4"]["identified"] == 0 and math.isnan(r["L4"]["centroid_distance_mm"])
    assert r["all"]["identification_rate"] == 2 / 5
    # closer than 20 mm but closer to another reference centroid: not identified
    ref_c = np.array([[np.nan] * 3, [0.0, 0, 0], [15.0, 0, 0]])
    pred_c = np.array([[np.nan] * 3, [9.0, 0, 0], [15.0, 0, 0]])
    dist, ident = metrics.identification(ref_c, pred_c)
    assert dist[1] == 9 and ident[1] == 0 and ident[2] == 1 and math.isnan(ident[0])
    # the 20 mm limit is strict
    dist, ident = metrics.identification(np.array([[0.0, 0, 0], [100.0, 0, 0]]), np.array([[20.0, 0, 0], [np.nan] * 3]))
    assert dist[0] == 20 and ident[0] == 0


def test_centroids_by_hand():
    a = np.zeros((4, 5, 6), np.uint8)
    a[1, 2, 3] = 7
    a[3, 0, 0] = a[3, 4, 0] = 2
    c = metrics.centroids(a, 26, spacing=(2.0, 1.0, 0.5))
    assert c[7].tolist() == [2.0, 2.0, 1.5]
    assert c[2].tolist() == [6.0, 2.0, 0.0]
    assert np.isnan(c[1]).all() and np.isnan(c[0]).all()


# ---------------------------------------------------------------------------------------------
# cross-check with panoptica 2.1.7


@pytest.fixture(scope="module")
def panoptica():
    pan = pytest.importorskip("panoptica")
    from panoptica.utils.citation_reminder import disable_citation_reminder

    disable_citation_reminder()
    return pan


def panoptica_results(pan, ref, pred, stage, strict=False, spacing=None):
    from panoptica.utils.label_group import LabelGroup
    from panoptica.utils.segmentation_class import SegmentationClassGroups

    classes = labels.foreground_labels(stage)
    kwargs = dict(
        instance_matcher=pan.NaiveThresholdMatching(matching_threshold=0.5, strict_threshold=strict),
        segmentation_class_groups=SegmentationClassGroups({n: LabelGroup(v) for n, v in classes.items()}),
        instance_metrics=[pan.Metric.IOU],
        global_metrics=[pan.Metric.DSC],
    )
    if stage == "vertebrae":
        ev = pan.Panoptica_Evaluator(expected_input=pan.InputType.UNMATCHED_INSTANCE, **kwargs)
    else:
        ev = pan.Panoptica_Evaluator(
            expected_input=pan.InputType.SEMANTIC,
            instance_approximator=pan.ConnectedComponentsInstanceApproximator(),
            **kwargs,
        )
    out = ev.evaluate(pred, ref, voxelspacing=spacing, verbose=False)
    names = {n.lower(): n for n in classes}
    return {names[k]: r for k, r in out.items()}


def has_iou_tie(ref, pred, connectivity=26) -> bool:
    """Whether some same-class component pair has IoU exactly 0.5 (where >= and > disagree)."""
    import cc3d

    rc = cc3d.connected_components(ref, connectivity=connectivity)
    pc = cc3d.connected_components(pred, connectivity=connectivity)
    both = (rc > 0) & (pc > 0) & (ref == pred)
    pairs, inter = np.unique(np.stack([rc[both], pc[both]]), axis=1, return_counts=True)
    rs, ps = np.bincount(rc.ravel()), np.bincount(pc.ravel())
    return bool(np.any(3 * inter == rs[pairs[0]] + ps[pairs[1]]))


def assert_agrees_with_panoptica(ours: dict, theirs: dict):
    for name, res in theirs.items():
        mine = ours[name]
        assert (mine["tp"], mine["fp"], mine["fn"]) == (res.tp, res.fp, res.fn), name
        assert same(mine["rq"], res.rq, 1e-12), name
        assert same(mine["pq"], res.pq, 1e-12), name
        if mine["tp"] > 0:
            assert same(mine["sq"], res.sq, 1e-12), name
        else:  # documented difference: panoptica reports SQ 0 without matches, we NaN
            assert math.isnan(mine["sq"]) and (math.isnan(res.sq) or res.sq == 0), name


def test_lesions_agree_with_panoptica_on_random_maps(panoptica):
    ties = 0
    for seed in range(12):
        ref = balls((32, 32, 32), 30, seed)
        rng = np.random.default_rng(seed + 1000)
        pred = np.roll(ref, tuple(rng.integers(-1, 2, size=3)), axis=(0, 1, 2))
        pred[balls((32, 32, 32), 8, seed + 2000) > 0] = rng.integers(0, 3)  # additions, removals, type swaps
        ours = metrics.evaluate_case(ref, pred, "metastases")
        assert ours["lytic"]["tp"] + ours["sclerotic"]["tp"] > 0
        # where some pair has IoU exactly 0.5 only panoptica's strict (>) option is our rule
        tie = has_iou_tie(ref, pred)
        ties += tie
        assert_agrees_with_panoptica(ours, panoptica_results(panoptica, ref, pred, "metastases", strict=tie))
    assert 0 < ties < 12


def test_tie_at_iou_one_half_differs_from_panoptica_as_documented(panoptica):
    ref = np.zeros((8, 8, 8), np.uint8)
    pred = ref.copy()
    ref[2:5, 2:5, 2:5] = 1
    pred[2:5, 2:5, 3:6] = 1  # 18 shared of 36: IoU = 0.5 exactly
    assert has_iou_tie(ref, pred)
    ours = metrics.evaluate_case(ref, pred, "metastases")["lytic"]
    theirs = panoptica_results(panoptica, ref, pred, "metastases")["lytic"]
    assert (ours["tp"], ours["fp"], ours["fn"]) == (0, 1, 1)  # IoU > 0.5 required
    assert (theirs.tp, theirs.fp, theirs.fn) == (1, 0, 0)  # panoptica: IoU >= 0.5
    strict = panoptica_results(panoptica, ref, pred, "metastases", strict=True)["lytic"]
    assert (strict.tp, strict.fp, strict.fn) == (0, 1, 1)  # its strict option agrees with us


def totalseg_vertebrae(folder: Path, name: str):
    image = sitk.ReadImage(str(folder / name))
    lut = np.zeros(256, np.uint8)
    for ts, ours in labels.TOTALSEGMENTATOR_TOTAL_TO_VERTEBRAE.items():
        lut[ts] = ours
    return lut[sitk.GetArrayFromImage(image)], tuple(reversed(image.GetSpacing()))


def test_real_pair_agrees_with_panoptica(panoptica, totalseg_dir):
    ref, spacing = totalseg_vertebrae(totalseg_dir, "example_seg.nii.gz")
    pred, _ = totalseg_vertebrae(totalseg_dir, "example_seg_fast.nii.gz")
    present = {n for n, v in V.items() if v and (ref == v).any()}
    assert {"T12", "L1", "L2"} <= present  # the CT holds L2, L1, T12 and part of T11
    ours = metrics.evaluate_case(ref, pred, "vertebrae", spacing=spacing)
    theirs = panoptica_results(panoptica, ref, pred, "vertebrae", spacing=spacing)
    assert not has_iou_tie(ref, pred)
    assert_agrees_with_panoptica(ours, theirs)
    for name in present:
        assert same(ours[name]["dice"], float(theirs[name].global_bin_dsc), 1e-12)
    assert ours["L1"]["tp"] == 1 and ours["L1"]["dice"] > 0.8
    assert ours["L1"]["identified"] == 1 and ours["L1"]["centroid_distance_mm"] < 10
    # the same pair as lesion-like classes: two segmentations of the L1 and L2 bodies
    les_ref = np.where(ref == V["L1"], 1, np.where(ref == V["L2"], 2, 0)).astype(np.uint8)
    les_pred = np.where(pred == V["L1"], 1, np.where(pred == V["L2"], 2, 0)).astype(np.uint8)
    assert not has_iou_tie(les_ref, les_pred)
    assert_agrees_with_panoptica(
        metrics.evaluate_case(les_ref, les_pred, "metastases"),
        panoptica_results(panoptica, les_ref, les_pred, "metastases"),
    )


# ---------------------------------------------------------------------------------------------
# folders: files, outputs, nnU-Net cross-check, errors


def make_folders(root: Path, n: int = 3, pred_suffix: str = ".nii.gz", spacing=(0.8, 0.8, 2.0)):
    """Reference and prediction folders of ``n`` small vertebra cases."""
    rng = np.random.default_rng(7)
    for i in range(n):
        ref = spine(shape=(30, 10, 10), names=("T12", "L1", "L2"))
        pred = ref.copy()
        pred[rng.random(ref.shape) < 0.1] = 0
        pred[rng.random(ref.shape) < 0.02] = V["L1"]
        if i == 1:
            pred[pred == V["T12"]] = 0  # a missed vertebra
        write_label_map(root / "ref" / f"case_{i:03d}.nii.gz", ref, spacing)
        write_label_map(root / "pred" / f"case_{i:03d}{pred_suffix}", pred, spacing)
    return root / "ref", root / "pred"


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_folders_writes_tables(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, pred_suffix=".nrrd")
    out = tmp_path / "out"
    summary = evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", out)
    assert sorted(p.name for p in out.iterdir()) == ["per_case.csv", "summary.csv", "summary.json"]
    rows = read_rows(out / "per_case.csv")
    assert list(rows[0]) == ["case", "class", "metric", "value"]
    assert {r["case"] for r in rows} == {"case_000", "case_001", "case_002"}
    direct = evaluate.evaluate_pair(ref_dir / "case_001.nii.gz", pred_dir / "case_001.nrrd", "vertebrae")
    for r in rows:
        if r["case"] == "case_001":
            assert same(float(r["value"]), direct[r["class"]][r["metric"]])
    assert direct["T12"]["fn"] == 1 and direct["T12"]["identified"] == 0
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert on_disk["n_cases"] == 3 and on_disk["settings"]["beta"] == 2.0 and on_disk["stage"] == "vertebrae"
    t12 = on_disk["mean"]["T12"]
    assert t12["dice"]["n"] == 3 and t12["dice"]["ci_low"] <= t12["dice"]["value"] <= t12["dice"]["ci_high"]
    assert on_disk["mean"]["C1"]["dice"] == {"value": None, "ci_low": None, "ci_high": None, "n": 0, "n_nan": 3}
    assert on_disk["pooled"]["T12"]["fn"]["value"] >= 1
    assert on_disk["pooled"]["all"]["identification_rate"]["value"] == pytest.approx(8 / 9)
    srows = read_rows(out / "summary.csv")
    assert list(srows[0]) == evaluate.SUMMARY_FIELDS
    assert not any(p.name.startswith(".partial-") for p in out.iterdir())


def test_parallel_run_gives_the_same_tables(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path)
    evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", tmp_path / "one", jobs=1)
    evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", tmp_path / "two", jobs=2)
    for name in ("per_case.csv", "summary.csv", "summary.json"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_voxel_metrics_equal_nnunet(tmp_path):
    pytest.importorskip("nnunetv2")
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    for i in range(3):
        ref = balls((20, 24, 24), 12, seed=i)
        pred = balls((20, 24, 24), 12, seed=i + 50)
        pred[ref == 1] = np.where(np.random.default_rng(i).random(int((ref == 1).sum())) < 0.7, 1, 0)
        write_label_map(tmp_path / "ref" / f"c{i}.nii.gz", ref, (0.7, 0.7, 3.0))
        write_label_map(tmp_path / "pred" / f"c{i}.nii.gz", pred, (0.7, 0.7, 3.0))
    theirs = compute_metrics_on_folder(
        str(tmp_path / "ref"), str(tmp_path / "pred"), None, SimpleITKIO(), ".nii.gz", [1, 2], num_processes=1
    )
    evaluate.evaluate_folders(tmp_path / "ref", tmp_path / "pred", "metastases", tmp_path / "out")
    ours = {(r["case"], r["class"], r["metric"]): float(r["value"]) for r in read_rows(tmp_path / "out" / "per_case.csv")}
    names = labels.label_names("metastases")
    compared = 0
    for case in theirs["metric_per_case"]:
        cid = evaluate.case_id(case["reference_file"])
        for label, m in case["metrics"].items():
            for ours_key, their_key in (("dice", "Dice"), ("iou", "IoU"), ("voxel_tp", "TP"), ("voxel_fp", "FP"),
                                        ("voxel_fn", "FN")):
                assert same(ours[(cid, names[label], ours_key)], float(m[their_key]), 1e-12)
                compared += 1
    assert compared == 3 * 2 * 5
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    for label, name in ((1, "lytic"), (2, "sclerotic")):
        assert summary["mean"][name]["dice"]["value"] == pytest.approx(theirs["mean"][label]["Dice"], abs=1e-12)


def test_unmatched_cases_are_named(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path)
    (pred_dir / "case_002.nii.gz").rename(pred_dir / "case_099.nii.gz")
    with pytest.raises(SpinemetsError) as err:
        evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", tmp_path / "out")
    assert "case_002.nii.gz" in str(err.value) and "case_099.nii.gz" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_mis_shaped_and_mis_spaced_pairs_are_named(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, n=1)
    write_label_map(pred_dir / "case_000.nii.gz", spine(shape=(30, 10, 12)))
    with pytest.raises(SpinemetsError, match=r"case_000.nii.gz: size .* differs from .*ref.*case_000.nii.gz"):
        evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", tmp_path / "out")
    write_label_map(pred_dir / "case_000.nii.gz", spine(shape=(30, 10, 10)), spacing=(1.0, 1.0, 2.0))
    with pytest.raises(SpinemetsError, match="spacing"):
        evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_folder_errors(tmp_path):
    ref_dir, pred_dir = make_folders(tmp_path, n=1)
    with pytest.raises(SpinemetsError, match="folder not found"):
        evaluate.evaluate_folders(tmp_path / "nope", pred_dir, "vertebrae", tmp_path / "out")
    write_label_map(pred_dir / "case_000.nrrd", spine(shape=(30, 10, 10)))
    with pytest.raises(SpinemetsError, match="two prediction files for case 'case_000'"):
        evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", tmp_path / "out")
    (pred_dir / "case_000.nrrd").unlink()
    with pytest.raises(SpinemetsError, match=r"case_000.nii.gz: holds label value\(s\) 30"):
        write_label_map(pred_dir / "case_000.nii.gz", np.full((30, 10, 10), 30, np.uint8), (0.8, 0.8, 2.0))
        evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", tmp_path / "out")
    with pytest.raises(SpinemetsError, match="beta"):
        evaluate.evaluate_folders(ref_dir, pred_dir, "vertebrae", tmp_path / "out", metrics.ScoringOptions(beta=0))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpinemetsError, match="no reference label maps"):
        evaluate.evaluate_folders(empty, pred_dir, "vertebrae", tmp_path / "out")


def test_case_ids():
    assert evaluate.case_id("a/case_1.seg.nrrd") == "case_1"
    assert evaluate.case_id("case_1.nii.gz") == "case_1"
    assert evaluate.case_id("case_1.nii") == "case_1"
    assert evaluate.case_id("case_1.nrrd") == "case_1"
    assert evaluate.case_id("dataset.json") is None


def test_cli_evaluate(tmp_path):
    cli = pytest.importorskip("spinemets.cli")
    ref_dir, pred_dir = make_folders(tmp_path, n=2)
    try:
        code = cli.main(["evaluate", "--ref", str(ref_dir), "--pred", str(pred_dir), "--stage", "vertebrae",
                         "--out", str(tmp_path / "out"), "--beta", "1", "--match", "overlap", "--jobs", "1"])
    except SystemExit as exc:  # argparse exits when the command is unknown
        code = exc.code
    if code == 2 and not (tmp_path / "out").exists():
        pytest.skip("the command line has no evaluate command")
    assert code in (0, None)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["settings"]["beta"] == 1.0 and summary["settings"]["match"] == "overlap"


# ---------------------------------------------------------------------------------------------
# aggregates


def test_summarize_means_pooled_counts_and_bootstrap():
    per_case = {
        "a": {"lytic": {"dice": 0.5, "tp": 1, "fp": 1, "fn": 0, "sq": 0.6, "voxel_tp": 10, "voxel_fp": 20, "voxel_fn": 0}},
        "b": {"lytic": {"dice": NAN, "tp": 0, "fp": 0, "fn": 2, "sq": NAN, "voxel_tp": 0, "voxel_fp": 0, "voxel_fn": 20}},
        "c": {"lytic": {"dice": 0.9, "tp": 2, "fp": 0, "fn": 1, "sq": 0.8, "voxel_tp": 45, "voxel_fp": 5, "voxel_fn": 5}},
    }
    s = evaluate.summarize(per_case, "metastases", beta=2.0, n_boot=500, seed=1)
    dice = s["mean"]["lytic"]["dice"]
    assert dice["value"] == pytest.approx(0.7) and dice["n"] == 2 and dice["n_nan"] == 1
    assert 0.5 <= dice["ci_low"] <= 0.7 <= dice["ci_high"] <= 0.9
    pooled = s["pooled"]["lytic"]
    assert (pooled["tp"]["value"], pooled["fp"]["value"], pooled["fn"]["value"]) == (3, 1, 3)
    assert pooled["lesion_recall"]["value"] == 0.5
    assert pooled["lesion_precision"]["value"] == 0.75
    assert pooled["sq"]["value"] == pytest.approx((0.6 + 1.6) / 3)
    assert pooled["pq"]["value"] == pytest.approx(2.2 / (3 + 0.5 + 1.5))
    assert pooled["lesion_fbeta"]["value"] == pytest.approx(15 / (15 + 12 + 1))
    assert pooled["pq"]["ci_low"] <= pooled["pq"]["value"] <= pooled["pq"]["ci_high"]
    # voxel counts pooled over cases: global Dice 2*55 / (2*55 + 25 + 25), F2 5*55 / (5*55 + 4*25 + 25)
    assert pooled["dice"]["value"] == pytest.approx(110 / 160)
    assert pooled["fbeta"]["value"] == pytest.approx(275 / 400)
    assert pooled["recall"]["value"] == pytest.approx(55 / 80) and pooled["precision"]["value"] == pytest.approx(55 / 80)
    assert pooled["dice"]["ci_low"] <= pooled["dice"]["value"] <= pooled["dice"]["ci_high"]
    again = evaluate.summarize(per_case, "metastases", beta=2.0, n_boot=500, seed=1)
    assert again == s  # seeded
    assert evaluate.bootstrap_ci([0.4, 0.4, 0.4]) == pytest.approx((0.4, 0.4))
    assert all(math.isnan(v) for v in evaluate.bootstrap_ci([NAN, NAN]))


def test_prediction_folders_per_case_as_predict_writes_them(tmp_path):
    import SimpleITK as sitk

    from spinemets.evaluation.evaluate import evaluate_folders

    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    for case in ("case_a", "case_b"):
        array = np.zeros((6, 8, 8), dtype=np.uint8)
        array[1:4, 2:5, 2:6] = 1
        sitk.WriteImage(sitk.GetImageFromArray(array), str(ref / f"{case}.nii.gz"))
        (pred / case).mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(pred / case / "metastases.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(np.zeros_like(array)), str(pred / case / "vertebrae.nii.gz"))
    summary = evaluate_folders(ref, pred, "metastases", tmp_path / "out")
    assert summary["cases"] == ["case_a", "case_b"]
    per_case = (tmp_path / "out" / "per_case.csv").read_text()
    assert "case_a,lytic,dice,1.0" in per_case


def _lesion_maps(tmp_path):
    """A reference with one sclerotic (2) and one lytic (1) lesion, on a 1 x 1 x 2 mm grid."""
    ref = np.zeros((8, 10, 12), dtype=np.uint8)
    ref[1:3, 1:4, 1:4] = 2
    ref[5:7, 5:8, 6:9] = 1
    image = sitk.GetImageFromArray(ref)
    image.SetSpacing((1.0, 1.0, 2.0))
    image.SetOrigin((4.0, -3.0, 10.0))
    (tmp_path / "ref").mkdir()
    sitk.WriteImage(image, str(tmp_path / "ref" / "case_a.nii.gz"))
    return ref, image


def test_a_seg_nrrd_prediction_is_scored_by_its_segment_names(tmp_path):
    """A prediction whose segment "sclerotic" carries labelValue 1 is sclerotic, not lytic: the
    name decides, whatever the voxel value (the file is also cropped, as 3D Slicer saves it)."""
    from spinemets.formats.slicer import write_segments

    ref, image = _lesion_maps(tmp_path)
    (tmp_path / "pred").mkdir()
    # sclerotic first: write_segments gives it labelValue 1 in layer 0, the lytic one labelValue 2
    write_segments(tmp_path / "pred" / "case_a.seg.nrrd", image,
                   [{"name": "sclerotic", "mask": ref == 2}, {"name": "Lytic 1", "mask": ref == 1}])
    import slicerio

    seg = slicerio.read_segmentation(str(tmp_path / "pred" / "case_a.seg.nrrd"))
    assert [(s["name"], s["labelValue"]) for s in seg["segments"]] == [("sclerotic", 1), ("Lytic 1", 2)]
    result = evaluate.evaluate_folders(tmp_path / "ref", tmp_path / "pred", "metastases", tmp_path / "out")
    assert result["mean"]["sclerotic"]["dice"]["value"] == 1.0
    assert result["mean"]["lytic"]["dice"]["value"] == 1.0
    # the reverse: a .seg.nrrd reference against a label-map prediction, and two .seg.nrrd files
    (tmp_path / "ref" / "case_a.nii.gz").rename(tmp_path / "pred_map.nii.gz")
    write_segments(tmp_path / "ref" / "case_a.seg.nrrd", image,
                   [{"name": "osteoblastic", "mask": ref == 2}, {"name": "osteolytic", "mask": ref == 1}])
    both = evaluate.evaluate_folders(tmp_path / "ref", tmp_path / "pred", "metastases", tmp_path / "out2")
    assert both["mean"]["sclerotic"]["dice"]["value"] == 1.0 and both["mean"]["lytic"]["dice"]["value"] == 1.0
    half = ref.copy()
    half[1:3, 1:4, 1:3] = 0  # 6 of the 18 sclerotic voxels predicted
    (tmp_path / "pred" / "case_a.seg.nrrd").unlink()
    pred = sitk.GetImageFromArray(half)
    pred.CopyInformation(image)
    sitk.WriteImage(pred, str(tmp_path / "pred" / "case_a.nii.gz"))
    mixed = evaluate.evaluate_folders(tmp_path / "ref", tmp_path / "pred", "metastases", tmp_path / "out3")
    assert mixed["mean"]["sclerotic"]["dice"]["value"] == pytest.approx(2 * 6 / (18 + 6))


def test_evaluate_writes_its_files_together_or_none(tmp_path):
    """When one of the outputs can't be written, none is (no per_case.csv without summary.json, no
    detection tables without either)."""
    _lesion_maps(tmp_path)
    (tmp_path / "pred").mkdir()
    import shutil

    shutil.copy(tmp_path / "ref" / "case_a.nii.gz", tmp_path / "pred" / "case_a.nii.gz")
    (tmp_path / "out" / "summary.json").mkdir(parents=True)
    with pytest.raises(SpinemetsError, match="summary.json: output file is an existing folder"):
        evaluate.evaluate_folders(tmp_path / "ref", tmp_path / "pred", "metastases", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.json"]
    (tmp_path / "out" / "summary.json").rmdir()
    evaluate.evaluate_folders(tmp_path / "ref", tmp_path / "pred", "metastases", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["per_case.csv", "summary.csv", "summary.json", *evaluate.DETECTION_FILES])


# ---------------------------------------------------------------------------------------------
# Error analysis: every lesion's outcome, and the vertebra labels that are shifted
# ---------------------------------------------------------------------------------------------


def test_lesion_errors_lists_each_lesion_with_its_outcome_place_and_vertebra():
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = ref.copy()
    vertebrae = ref.copy()
    vertebrae[:5], vertebrae[5:] = 20, 21  # L1 above, L2 below
    ref[1:3, 1:3, 1:3] = pred[1:3, 1:3, 1:3] = 1  # found: a lytic lesion of 8 voxels in L1
    ref[6:8, 6:8, 6:8] = 2  # missed: a sclerotic lesion in L2
    pred[7:9, 1, 1] = 1  # invented: 2 voxels in L2
    pred[6:8, 6:8, 6] = 1  # overlaps the missed lesion, but with the wrong class: no match
    rows = metrics.lesion_errors(ref, pred, spacing_zyx=(2.0, 1.0, 1.0), vertebrae=vertebrae)
    by = {(r["outcome"], r["class"], r["volume_ml"]): r for r in rows}
    assert sorted(by) == [("FN", "sclerotic", 0.016), ("FP", "lytic", 0.004), ("FP", "lytic", 0.008),
                          ("TP", "lytic", 0.016)]
    tp = by[("TP", "lytic", 0.016)]
    assert (tp["z"], tp["y"], tp["x"], tp["iou"], tp["vertebra"]) == (1.5, 1.5, 1.5, 1.0, "L1")
    fn = by[("FN", "sclerotic", 0.016)]
    assert (fn["z"], fn["vertebra"]) == (6.5, "L2") and np.isnan(fn["iou"])
    assert by[("FP", "lytic", 0.004)]["vertebra"] == "L2" and by[("FP", "lytic", 0.004)]["z"] == 7.5
    # the counts agree with the lesion-level metrics' own
    counts = metrics.match_components(ref, pred).counts(3)
    assert (counts.tp[1], counts.fp[1], counts.fn[2]) == (1, 2, 1)
    assert metrics.lesion_errors(np.zeros((3, 3, 3), np.uint8), np.zeros((3, 3, 3), np.uint8)) == []


def test_lesion_errors_outside_every_vertebra_names_none():
    ref = np.zeros((4, 4, 4), np.uint8)
    ref[0, 0, 0] = 1
    (row,) = metrics.lesion_errors(ref, np.zeros_like(ref), vertebrae=np.zeros_like(ref))
    assert row["outcome"] == "FN" and row["vertebra"] == ""


def test_vertebra_shifts_reports_the_majority_label_of_each_reference_vertebra():
    ref = np.zeros((12, 4, 4), np.uint8)
    ref[:4], ref[4:8], ref[8:] = 14, 15, 16  # T7, T8, T9
    pred = np.zeros_like(ref)
    pred[:4] = 14  # T7 right
    pred[4:7], pred[7:8] = 16, 15  # T8 mostly called T9 (3 of 4 slices)
    pred[8:9] = 16  # T9 mostly missed (1 of 4 slices found)
    rows = {r["reference"]: r for r in metrics.vertebra_shifts(ref, pred)}
    assert list(rows) == ["T7", "T8", "T9"]
    assert (rows["T7"]["predicted"], rows["T7"]["share"], rows["T7"]["shift"]) == ("T7", 1.0, 0.0)
    assert (rows["T8"]["predicted"], rows["T8"]["share"], rows["T8"]["shift"]) == ("T9", 0.75, 1.0)
    assert rows["T9"]["predicted"] == "" and rows["T9"]["share"] == 0.75 and np.isnan(rows["T9"]["shift"])


def test_evaluate_workspace_scores_each_stage_of_predict_s_folder(tmp_path):
    """The metrics notebook's step: predict's folder (CASE/STAGE.nii.gz) against each stage's labelsTs,
    into evaluation/STAGE; a stage whose held-out cases differ from the other's scores only its own."""
    from spinemets.paths import Workspace

    ws = Workspace(tmp_path / "ws")
    vert = np.zeros((8, 10, 12), np.uint8)
    vert[2:6, 2:8, 2:10] = V["L1"]
    les = np.zeros(vert.shape, np.uint8)
    les[3:5, 3:5, 3:5] = 1
    for case in ("case_000", "case_001"):
        for stage, array in (("vertebrae", vert), ("metastases", les)):
            write_label_map(ws.test_labels(stage) / f"{case}.nii.gz", array)
            write_label_map(ws.test_images(stage) / f"{case}_0000.nii.gz", np.zeros(vert.shape, np.int16))
            write_label_map(ws.predictions / case / f"{stage}.nii.gz", array)
    result = evaluate.evaluate_workspace(ws)
    assert set(result) == {"vertebrae", "metastases"}
    for stage in ("vertebrae", "metastases"):
        rows = read_rows(ws.evaluation(stage) / "per_case.csv")
        assert {r["case"] for r in rows} == {"case_000", "case_001"}
        dice = [float(r["value"]) for r in rows if r["metric"] == "dice" and r["class"] in ("L1", "lytic")]
        assert dice == [1.0, 1.0]
    (ws.test_images("metastases") / "case_001_0000.nii.gz").unlink()  # the stages' held-out cases now differ
    (ws.test_labels("metastases") / "case_001.nii.gz").unlink()
    evaluate.evaluate_workspace(ws, metrics.ScoringOptions(beta=1.0))
    assert {r["case"] for r in read_rows(ws.evaluation("metastases") / "per_case.csv")} == {"case_000"}
    assert evaluate.evaluate_workspace(ws)["metastases"]["settings"]["beta"] == 2.0
