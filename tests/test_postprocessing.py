"""The vertebra order repair, on hand-built spines: blocks of slices (vertebrae) between empty discs."""

from __future__ import annotations

import numpy as np
import pytest

from spinemets.inference import postprocessing
from spinemets.labels import labels
from spinemets.training.profiles import DEMO_MIN_LESION_ML, PROFILES

V = labels("vertebrae")
SPACING = (3.0, 2.0, 2.0)  # z, y, x mm
HEIGHT, DISC = 6, 2  # slices


def _spine(levels, heights=None, shape_yx=(8, 8)):
    """Blocks of ``HEIGHT`` slices labelled ``levels`` (head first, slice 0 = head), ``DISC`` empty slices between."""
    heights = heights or [HEIGHT] * len(levels)
    z = sum(heights) + DISC * (len(levels) + 1)
    out = np.zeros((z, *shape_yx), np.uint8)
    blocks, top = [], DISC
    for level, h in zip(levels, heights):
        out[top:top + h, 2:6, 2:6] = level
        blocks.append((top, top + h))
        top += h + DISC
    return out, blocks


def _levels(array, blocks):
    """The labels found in each block, largest first."""
    found = []
    for a, b in blocks:
        values, counts = np.unique(array[a:b][array[a:b] > 0], return_counts=True)
        found.append([int(v) for v in values[np.argsort(-counts)]])
    return found


def test_a_spine_in_order_is_left_as_it_is():
    spine, _ = _spine(range(V["T1"], V["L2"] + 1))
    repaired, changed = postprocessing.repair_vertebra_order(spine, SPACING)
    assert changed == 0 and repaired is spine


def test_a_vertebra_with_its_neighbours_label_gets_its_own():
    truth = list(range(V["T3"], V["T10"] + 1))
    predicted = truth.copy()
    predicted[4] = predicted[3]  # T7 labelled T6: T6 twice
    spine, blocks = _spine(predicted)
    before = spine.copy()
    repaired, changed = postprocessing.repair_vertebra_order(spine, SPACING)
    assert _levels(repaired, blocks) == [[t] for t in truth]
    assert changed == HEIGHT * 16  # one block of 6 x 4 x 4 voxels
    assert (spine == before).all()  # the input is not modified


def test_a_shifted_run_follows_the_majority_and_both_directions_work():
    truth = list(range(V["C5"], V["T9"] + 1))  # 12 vertebrae
    predicted = truth[:7] + [t + 1 for t in truth[7:]]  # the last five one level too low: a gap
    for order in (1, -1):  # head at slice 0, or head at the last slice
        spine, blocks = _spine(predicted[::order])
        repaired, changed = postprocessing.repair_vertebra_order(spine, SPACING)
        assert _levels(repaired, blocks) == [[t] for t in truth[::order]]
        assert changed == 5 * HEIGHT * 16


def test_a_vertebra_split_between_two_labels_takes_its_slot_level():
    truth = list(range(V["T1"], V["T8"] + 1))
    spine, blocks = _spine(truth)
    a, b = blocks[3]  # T4: its lower half labelled T5
    spine[a + HEIGHT // 2:b] = np.where(spine[a + HEIGHT // 2:b] > 0, V["T5"], 0)
    repaired, changed = postprocessing.repair_vertebra_order(spine, SPACING)
    assert _levels(repaired, blocks) == [[t] for t in truth] and changed == 3 * 16


def test_a_slot_of_two_vertebrae_whose_disc_was_filled_in_is_split_where_the_label_changes():
    truth = list(range(V["T1"], V["T10"] + 1))
    predicted = truth.copy()
    predicted[4] = V["T6"]  # T5 labelled T6: T6 twice
    spine, blocks = _spine(predicted)
    (a, _), (b, _) = blocks[3], blocks[4]
    spine[a:b] = np.where(spine[a:a + 1] > 0, V["T4"], 0)  # T4 and the disc below it, no gap to T5
    repaired, changed = postprocessing.repair_vertebra_order(spine, SPACING)
    assert _levels(repaired, blocks) == [[t] for t in truth]


def test_a_process_reaching_across_the_disc_keeps_its_label():
    truth = list(range(V["T1"], V["T8"] + 1))
    spine, blocks = _spine(truth)
    a, b = blocks[4]  # T5's slot: two voxels of T4's spinous process (2 of 98, under the share kept)
    spine[a - DISC:a + 1, 6, 4] = V["T4"]
    repaired, changed = postprocessing.repair_vertebra_order(spine, SPACING)
    assert changed == 0 and repaired is spine


def test_the_sacrum_may_span_several_slots_and_c1_c2_may_share_one():
    spine, blocks = _spine([V["L3"], V["L4"], V["L5"], V["Sacrum"], V["Sacrum"]])
    assert postprocessing.repair_vertebra_order(spine, SPACING)[1] == 0
    spine, blocks = _spine([V["C2"], V["C3"], V["C4"], V["C5"]])
    a, b = blocks[0]
    spine[a:a + 2] = np.where(spine[a:a + 2] > 0, V["C1"], 0)  # the atlas above the dens, no disc between
    assert postprocessing.repair_vertebra_order(spine, SPACING)[1] == 0


def test_it_declines_when_the_slots_are_not_to_be_trusted():
    few, _ = _spine([V["T5"], V["T5"]])  # two slots only
    assert postprocessing.repair_vertebra_order(few, SPACING)[1] == 0
    # vertebrae whose discs the network filled in, labelled T4 and T5 side by side, not one above
    # the other: the slot cannot be split and the best numbering gives it two levels. How many
    # vertebrae it holds is unknown, so the T7 and T8 below are not renumbered to T6 and T7.
    spine, blocks = _spine([V["T1"], V["T2"], V["T3"], V["T4"], V["T7"], V["T8"]], heights=[6, 6, 6, 14, 6, 6])
    a, b = blocks[3]
    spine[a:b, :, 4:6] = np.where(spine[a:b, :, 4:6] > 0, V["T5"], 0)
    repaired, changed = postprocessing.repair_vertebra_order(spine, SPACING)
    assert changed == 0 and repaired is spine
    # no agreement: every slot disagrees with every consecutive numbering in either direction
    scrambled, _ = _spine([V["T5"], V["L3"], V["C3"], V["T11"], V["C7"]])
    assert postprocessing.repair_vertebra_order(scrambled, SPACING)[1] == 0


@pytest.mark.parametrize("bad", [np.zeros((10, 4, 4), np.uint8), np.full((10, 4, 4), 40, np.uint8),
                                 np.zeros((10, 4), np.uint8)])
def test_empty_or_foreign_maps_are_returned_unchanged(bad):
    repaired, changed = postprocessing.repair_vertebra_order(bad, SPACING)
    assert changed == 0 and repaired is bad


def test_ground_truth_like_spines_of_every_region_stay_unchanged():
    for start, stop in ((V["C1"], V["T3"]), (V["T4"], V["L1"]), (V["T10"], V["Sacrum"])):
        spine, _ = _spine(range(start, stop + 1))
        assert postprocessing.repair_vertebra_order(spine, SPACING)[1] == 0


# --------------------------------------------------------------------------------------------
# One type per lesion part: merge_small_type_parts
# --------------------------------------------------------------------------------------------
LESION_SPACING = (1.0, 1.0, 1.0)  # 1 voxel = 0.001 mL


def test_a_speck_of_the_other_type_on_a_lesion_takes_the_lesions_type():
    lesions = np.zeros((12, 12, 12), np.uint8)
    lesions[2:8, 2:8, 2:8] = 2  # a sclerotic lesion of 216 voxels
    lesions[2:4, 2:4, 8] = 1  # 4 lytic voxels on its rim
    out, merged = postprocessing.merge_small_type_parts(lesions, LESION_SPACING, 0.01)
    assert merged == 1
    assert (out[2:4, 2:4, 8] == 2).all() and set(np.unique(out)) == {0, 2}
    assert lesions[2, 2, 8] == 1  # the input is not modified


def test_a_mixed_lesion_keeps_both_parts_when_each_is_lesion_sized():
    lesions = np.zeros((12, 12, 12), np.uint8)
    lesions[2:8, 2:8, 2:6] = 1  # 144 lytic voxels
    lesions[2:8, 2:8, 6:9] = 2  # 108 sclerotic voxels touching them
    out, merged = postprocessing.merge_small_type_parts(lesions, LESION_SPACING, 0.1)
    assert merged == 0 and out is lesions
    # with a threshold above the smaller part, the smaller part joins the main type
    out, merged = postprocessing.merge_small_type_parts(lesions, LESION_SPACING, 0.12)
    assert merged == 1 and set(np.unique(out)) == {0, 1} and (out > 0).sum() == 252


def test_small_parts_of_the_main_type_and_lone_small_lesions_are_left_alone():
    lesions = np.zeros((16, 16, 16), np.uint8)
    lesions[1:3, 1:3, 1:3] = 1  # a lone lytic speck (8 voxels): remove_small_lesions' business
    lesions[8:14, 8:14, 8:14] = 2  # sclerotic lesion
    lesions[8, 8, 14] = 1  # lytic speck on it: merged
    lesions[13, 13, 14] = 1  # a second one: merged too
    out, merged = postprocessing.merge_small_type_parts(lesions, LESION_SPACING, 0.05)
    assert merged == 2
    assert out[1:3, 1:3, 1:3].tolist() == lesions[1:3, 1:3, 1:3].tolist()
    assert out[8, 8, 14] == 2 and out[13, 13, 14] == 2


def test_on_a_tie_the_lesion_is_lytic_and_alternating_specks_become_one_type():
    lesions = np.zeros((4, 4, 12), np.uint8)
    lesions[1, 1, 1:9] = [1, 2, 1, 2, 1, 2, 1, 2]  # eight one-voxel parts in a row, four of each type
    out, merged = postprocessing.merge_small_type_parts(lesions, LESION_SPACING, 0.01)
    assert merged == 4 and out[1, 1, 1:9].tolist() == [1] * 8


def test_merging_agrees_with_a_slow_per_part_count():
    rng = np.random.default_rng(3)
    lesions = (rng.random((10, 10, 10)) < 0.3).astype(np.uint8) * rng.integers(1, 3, (10, 10, 10), dtype=np.uint8)
    out, merged = postprocessing.merge_small_type_parts(lesions, LESION_SPACING, 0.003)
    import cc3d
    whole = cc3d.connected_components(lesions > 0, connectivity=26)
    parts = cc3d.connected_components(lesions, connectivity=26)
    expected, count = lesions.copy(), 0
    for p in range(1, parts.max() + 1):
        where = parts == p
        w = whole[where][0]
        types = lesions[whole == w]
        main = 2 if (types == 2).sum() > (types == 1).sum() else 1
        if where.sum() < 3 and lesions[where][0] != main:
            expected[where] = main
            count += 1
    assert merged == count > 0 and np.array_equal(out, expected)


@pytest.mark.parametrize("bad", [np.full((3, 3, 3), 3, np.uint8), np.full((3, 3, 3), -1, np.int16)])
def test_a_map_that_is_not_a_lesion_map_is_refused(bad):
    with pytest.raises(postprocessing.SpinemetsError, match="lesion map"):
        postprocessing.merge_small_type_parts(bad, LESION_SPACING, 0.01)


def test_no_threshold_or_no_lesion_changes_nothing():
    lesions = np.zeros((5, 5, 5), np.uint8)
    assert postprocessing.merge_small_type_parts(lesions, LESION_SPACING, 0.01) == (lesions, 0)
    lesions[1, 1, 1:3] = [1, 2]
    out, merged = postprocessing.merge_small_type_parts(lesions, LESION_SPACING, 0.0)
    assert out is lesions and merged == 0


def test_the_demos_smallest_lesion_is_four_fifths_of_the_smallest_synthetic_lesion():
    from spinemets.cohort import synth

    preset = synth.PRESETS["demo"]
    voxel_ml = min(preset["spacing_xy"]) ** 2 * min(preset["slice_thickness"]) / 1000.0
    smallest_ml = preset["min_lesion_voxels"] * voxel_ml
    assert PROFILES["demo"]["min_lesion_ml"] == DEMO_MIN_LESION_ML
    assert 0.75 * smallest_ml <= DEMO_MIN_LESION_ML <= 0.85 * smallest_ml
    # the smallest planted lesion, predicted whole, is kept; a prediction of it needs 16 of its 20 voxels (the
    # price: a match with IoU > 0.5 may hold only 11 and is then cleared, one true lesion of the demo's held-out 78)
    assert DEMO_MIN_LESION_ML < smallest_ml and 11 / 20 * smallest_ml < DEMO_MIN_LESION_ML


def test_the_demo_clears_lesions_that_touch_no_vertebra_and_the_paper_keeps_them():
    assert PROFILES["demo"]["spine_only"] is True and PROFILES["demo"]["spine_margin_mm"] == 0.0
    assert PROFILES["paper"]["spine_only"] is False
