"""Clean-up of the predicted label maps before localization.

* :func:`remove_small_components`: clears connected components below a size in millilitres
  (lesion specks; fragments of a neighbour's vertebra label at a vertebra's border).
* :func:`merge_small_type_parts`: gives a lesion's part of one type that is too small to be a
  lesion of its own (a few lytic voxels on the rim of a sclerotic lesion) the lesion's main type.
* :func:`repair_vertebra_order`: makes the vertebra labels follow the anatomical order along the
  spine (C1, C2, ... L5, sacrum from head to feet, one level per vertebra).

Why the order repair: a vertebra network that sees part of the spine must *count* to tell T6 from
T7, which look alike. Its typical errors are a vertebra given its neighbour's label (the label
then appears on two vertebrae), a run of vertebrae shifted by one level, and a vertebra split
between two labels. Each breaks the rule that consecutive vertebrae carry consecutive labels, and
the rule alone fixes them when most of the vertebrae are right.

How (axial CT: the spine runs along the first array axis, slice after slice):

1. **Slots**: the count of vertebra voxels per slice drops at every intervertebral disc. A slice is
   part of a disc *valley* when its count is below ``DISC_DEPTH`` of the largest count within
   ``WINDOW_MM``; the slices between two valleys (split at each valley's lowest slice) are one
   vertebra *slot*. A slot at least ``TALL`` times the median slot height (two vertebrae whose
   disc the network filled in) is split, again and again, where its slices' majority label
   changes, when each part holds at least ``SPLIT_SHARE`` of its voxels and the split explains
   at least ``SPLIT_FIT`` of them. A slot still ``DOUBLE`` the median height may hold two vertebrae.
2. **Numbering**: dynamic programming picks consecutive levels for the slots (each slot one level
   below the previous; C1 and C2, whose dens rises into the atlas, may share one slot; the sacrum
   may span several) that agree with the most predicted voxels, in both directions along the axis.
3. **Relabelling**, slot by slot: the slot's other labels become its level, except the label of an
   adjacent level holding less than ``KEEP_SHARE`` of the slot (the processes of the vertebra
   above reach across the disc).

It declines, returning the map unchanged, when there are fewer than 3 slots, when the numbering
agrees with less than ``MIN_AGREEMENT`` of the vertebra voxels, or when the best numbering gives
a slot two levels (other than C1 and C2): then the slots themselves are not to be trusted.

It assumes a normal count of vertebrae (7 cervical, 12 thoracic, 5 lumbar) and slices across the
spine; transitional vertebrae, a sagittal or coronal acquisition or a strongly curved spine are
outside its design. The demo profile uses it; the paper profile, for the real data, does not
(``repair_vertebra_order`` in :data:`spinemets.training.profiles.PROFILES`).
"""

from __future__ import annotations

from typing import Sequence

import cc3d
import numpy as np
from scipy import ndimage
from scipy.ndimage import maximum_filter1d

from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError

#: Number of vertebra labels (C1 ... Sacrum); the sacrum is the last.
N_LEVELS = len(labels_mod.VERTEBRAE)
SACRUM = N_LEVELS
LYTIC, SCLEROTIC = labels_mod.LYTIC, labels_mod.SCLEROTIC
DISC_DEPTH = 0.35
WINDOW_MM = 15.0
TALL = 1.3
DOUBLE = 1.5
SPLIT_SHARE = 0.25
SPLIT_FIT = 0.8
KEEP_SHARE = 0.2
JUMP_PENALTY = 0.1  # of the median slot's voxels, for giving a slot two levels
MIN_AGREEMENT = 0.5


def check_min_ml(min_ml: float) -> None:
    """Refuse a minimum component size that is not a number >= 0 (mL)."""
    if not (np.isfinite(min_ml) and min_ml >= 0):
        raise SpinemetsError(f"minimum component size must be a number >= 0 mL, not {min_ml!r}")


def remove_small_components(labels: np.ndarray, spacing: Sequence[float], min_ml: float,
                            per_label: bool = False) -> tuple[np.ndarray, int]:
    """Clear the connected components (26-connectivity) smaller than ``min_ml`` millilitres.

    ``per_label=False``: components of all labels together (a lesion with lytic and sclerotic
    parts is one component, as :func:`spinemets.inference.localization.localize` counts it);
    ``per_label=True``: each label's own components (touching vertebrae stay apart). Returns the
    cleaned map (the input when nothing is removed; never modified) and the number of components
    removed.
    """
    check_min_ml(min_ml)
    if min_ml == 0 or not labels.any():
        return labels, 0
    if per_label:
        components, n = cc3d.connected_components(labels, connectivity=26, return_N=True)
    else:
        components, n = cc3d.connected_components(labels > 0, connectivity=26, return_N=True)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    small = np.bincount(components.ravel(), minlength=n + 1) * voxel_ml < min_ml
    small[0] = False
    if not small.any():
        return labels, 0
    cleaned = labels.copy()
    cleaned[small[components]] = 0
    return cleaned, int(small.sum())


def remove_lesions_outside_spine(lesions: np.ndarray, vertebrae: np.ndarray, spacing: Sequence[float],
                                 near_mm: float) -> tuple[np.ndarray, int]:
    """Clear the predicted lesions that :func:`spinemets.inference.localization.localize` would call
    ``outside spine``: the components (26-connectivity, both types together) that overlap no vertebra
    and lie further than ``near_mm`` millimetres from every vertebra voxel. Without any vertebra
    nothing is cleared (nothing to judge by). Returns the cleaned map (the input when nothing is
    removed; never modified) and the number of lesions removed.
    """
    if not lesions.any() or not vertebrae.any():
        return lesions, 0
    components, n = cc3d.connected_components(lesions > 0, connectivity=26, return_N=True)
    # as localize decides: overlap first; the distance to the spine only for the lesions that overlap none
    # (a distance transform of the whole CT, not computed when every lesion touches a vertebra or no
    # distance is allowed)
    outside = np.bincount(components[vertebrae > 0], minlength=n + 1) == 0
    outside[0] = False
    if outside.any() and near_mm > 0:
        distance = ndimage.distance_transform_edt(vertebrae == 0, sampling=np.asarray(spacing, dtype=float))
        candidates = np.flatnonzero(outside)
        nearest = np.asarray(ndimage.minimum(distance, labels=components, index=candidates), dtype=float)
        outside[candidates] = nearest > near_mm
    if not outside.any():
        return lesions, 0
    cleaned = lesions.copy()
    cleaned[outside[components]] = 0
    return cleaned, int(outside.sum())


def merge_small_type_parts(lesions: np.ndarray, spacing: Sequence[float], min_ml: float) -> tuple[np.ndarray, int]:
    """Give each part of a lesion that is smaller than ``min_ml`` millilitres and not of the lesion's
    main type the main type; return the map (the input when nothing changes; never modified) and
    the number of parts relabelled.

    A *lesion* is a connected component (26-connectivity) of lytic and sclerotic voxels together; a
    *part* is a connected component of one type within it; the *main type* is the type with more
    of the lesion's voxels (lytic on a tie). Lesion-level metrics count each type's components as
    lesions of that type, so a speck of lytic voxels on the rim of a predicted sclerotic lesion
    would count as a lytic lesion of its own: with ``min_ml`` the size below which the profile
    does not call anything a lesion (``min_lesion_ml``), it is none. A part of the other type at
    least ``min_ml`` large stays (a mixed lesion: a lytic and a sclerotic lesion that touch), and
    a lesion of one type is left as it is.
    """
    check_min_ml(min_ml)
    if min_ml == 0 or not lesions.any():
        return lesions, 0
    if lesions.min() < 0 or lesions.max() > SCLEROTIC:
        raise SpinemetsError(f"a lesion map holds 0, {LYTIC} (lytic) and {SCLEROTIC} (sclerotic), not "
                             f"{int(lesions.min())}...{int(lesions.max())}")
    fg = lesions > 0
    whole, n_whole = cc3d.connected_components(fg, connectivity=26, return_N=True)
    parts, n_parts = cc3d.connected_components(lesions, connectivity=26, return_N=True)
    part_of, whole_of, kind = parts[fg], whole[fg], lesions[fg].astype(np.int64)
    part_size = np.bincount(part_of, minlength=n_parts + 1)
    part_whole = np.zeros(n_parts + 1, dtype=np.int64)
    part_whole[part_of] = whole_of
    part_kind = np.zeros(n_parts + 1, dtype=np.int64)
    part_kind[part_of] = kind
    votes = np.zeros((n_whole + 1, SCLEROTIC + 1), dtype=np.int64)  # voxels per lesion and type
    np.add.at(votes, (whole_of, kind), 1)
    main = np.where(votes[:, SCLEROTIC] > votes[:, LYTIC], SCLEROTIC, LYTIC)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    relabel = (part_size * voxel_ml < min_ml) & (part_kind != main[part_whole])
    relabel[0] = False
    if not relabel.any():
        return lesions, 0
    out = lesions.copy()
    moved = relabel[parts]
    out[moved] = main[whole[moved]].astype(lesions.dtype)
    return out, int(relabel.sum())


def remove_small_lesions(lesions: np.ndarray, spacing: Sequence[float], min_ml: float) -> tuple[np.ndarray, int]:
    """Clear the lesions (components of lytic and sclerotic voxels together) smaller than ``min_ml`` mL."""
    return remove_small_components(lesions, spacing, min_ml, per_label=False)


# --------------------------------------------------------------------------------------------
# Vertebra order
# --------------------------------------------------------------------------------------------
def _slice_histograms(labels: np.ndarray) -> np.ndarray:
    """(slices, N_LEVELS + 1) voxel counts of each label in each slice; column 0 is zeroed."""
    z = np.repeat(np.arange(labels.shape[0]), labels[0].size)
    hist = np.bincount(z * (N_LEVELS + 1) + labels.ravel().astype(np.int64),
                       minlength=labels.shape[0] * (N_LEVELS + 1)).reshape(labels.shape[0], N_LEVELS + 1)
    hist[:, 0] = 0
    return hist


def _disc_slots(fg: np.ndarray, window: int) -> list[tuple[int, int]]:
    """Slice ranges [a, b) between the valleys of the per-slice vertebra voxel count ``fg``."""
    low = fg < DISC_DEPTH * maximum_filter1d(fg.astype(float), size=2 * window + 1, mode="nearest")
    cuts, z, n = [], 0, len(fg)
    while z < n:
        if not low[z]:
            z += 1
            continue
        start = z
        while z < n and low[z]:
            z += 1
        if start > 0 and z < n:  # a valley inside the volume, not one at its ends
            cuts.append(start + int(np.argmin(fg[start:z])))
    bounds = [0, *cuts, n]
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if fg[a:b].sum() > 0]


def _split_point(hist: np.ndarray, a: int, b: int) -> int | None:
    """The slice where a slot's majority label changes, if the split explains it well."""
    h = hist[a:b, 1:]
    total = h.sum()
    best = None
    for z in range(1, b - a):
        upper, lower = h[:z].sum(0), h[z:].sum(0)
        la, lb = int(upper.argmax()), int(lower.argmax())
        if la != lb and min(upper.sum(), lower.sum()) >= SPLIT_SHARE * total:
            score = upper[la] + lower[lb]
            if best is None or score > best[0]:
                best = (score, z)
    return a + best[1] if best is not None and best[0] > SPLIT_FIT * total else None


def _split_tall(hist: np.ndarray, slots: list[tuple[int, int]]) -> list[tuple[int, int]]:
    median = np.median([b - a for a, b in slots])
    out, todo = [], list(slots)
    while todo:
        a, b = todo.pop(0)
        z = _split_point(hist, a, b) if b - a >= TALL * median else None
        if z is None:
            out.append((a, b))
        else:
            todo[:0] = [(a, z), (z, b)]
    return sorted(out)


def _number(H: np.ndarray, tall: np.ndarray, penalty: float) -> tuple[float, list[list[int]]]:
    """Consecutive levels for the slots (rows of H, head to feet): agreement and each slot's levels.

    A ``tall`` slot (``DOUBLE`` times the median height) may take two levels (it is then declined by the caller, unless they are C1
    and C2): forcing one level on two vertebrae would renumber the rest wrongly.
    """
    K = H.shape[0]
    levels = range(1, N_LEVELS + 1)
    score = np.full((K, N_LEVELS + 1), -np.inf)  # score[k, l]: best total before slot k, slot k starting at l
    back = np.zeros((K, N_LEVELS + 1), dtype=int)
    score[0, 1:] = 0.0
    for k in range(1, K):
        for l2 in levels:
            options = []
            for l in (l2 - 1, l2 - 2, l2):
                if l < 1 or not np.isfinite(score[k - 1, l]):
                    continue
                if l == l2 and l != SACRUM:  # only the sacrum spans several slots
                    continue
                if l2 - l == 2 and not (l == 1 or tall[k - 1]):
                    continue
                gain = H[k - 1, l:max(l2, l + 1)].sum() - (penalty if l2 - l == 2 else 0.0)
                options.append((score[k - 1, l] + gain, l))
            if options:
                score[k, l2], back[k, l2] = max(options)
    total, last = max((score[K - 1, l] + H[K - 1, l], l) for l in levels if np.isfinite(score[K - 1, l]))
    starts = [last]
    for k in range(K - 1, 0, -1):
        starts.append(int(back[k, starts[-1]]))
    starts.reverse()
    owned = []
    for k, s in enumerate(starts):
        nxt = starts[k + 1] if k + 1 < K else s + 1
        owned.append(list(range(s, nxt)) if nxt > s else [s])
    return float(total), owned


def repair_vertebra_order(labels: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, int]:
    """Relabel a stage-1 vertebra map (z, y, x; labels 1-25) so the levels follow the spine's order.

    See the module docstring for the method and when it declines. ``spacing`` is (z, y, x) in mm.
    Returns the repaired map (the input itself when nothing changes; never modified) and the
    number of voxels relabelled.
    """
    if labels.ndim != 3 or not labels.any() or labels.max() > N_LEVELS or labels.min() < 0:
        return labels, 0
    hist = _slice_histograms(labels)
    window = max(1, int(round(WINDOW_MM / float(spacing[0]))))
    slots = _disc_slots(hist.sum(1), window)
    if len(slots) < 3:
        return labels, 0
    slots = _split_tall(hist, slots)
    H = np.stack([hist[a:b].sum(0) for a, b in slots]).astype(float)
    penalty = JUMP_PENALTY * float(np.median(H.sum(1)))
    heights = np.array([b - a for a, b in slots])
    tall = heights >= DOUBLE * np.median(heights)
    downward, owned_down = _number(H, tall, penalty)  # levels rising with the slice index
    upward, owned_up = _number(H[::-1], tall[::-1], penalty)
    agreement, owned = (downward, owned_down) if downward >= upward else (upward, owned_up[::-1])
    if agreement < MIN_AGREEMENT * H.sum() or any(len(o) > 1 and o != [1, 2] for o in owned):
        return labels, 0
    repaired = labels.copy()
    for (a, b), levels, counts in zip(slots, owned, H):
        slab, out = labels[a:b], repaired[a:b]
        total = counts.sum()
        large = [int(v) for v in np.nonzero(counts)[0] if counts[v] >= KEEP_SHARE * total]
        in_order = len(levels) > 1 and len(large) == len(levels)  # C1 and C2: keep their order
        adjacent = {min(levels) - 1, max(levels) + 1}
        for value in np.nonzero(counts)[0]:
            value = int(value)
            if value in levels:
                continue
            if in_order and value in large:
                out[slab == value] = levels[large.index(value)]
            elif value in adjacent and counts[value] < KEEP_SHARE * total:
                continue  # the processes of a neighbour reaching across the disc
            else:
                out[slab == value] = min(levels, key=lambda level: abs(level - value))
    changed = int(np.count_nonzero(repaired != labels))
    return (repaired, changed) if changed else (labels, 0)
