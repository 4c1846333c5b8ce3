"""Lesion localization and partial SINS: which vertebra each predicted lesion belongs to, its type and
size, and the per-vertebra table with the SINS items the label maps decide.

Pure functions on arrays (tested on hand-made label maps), called by :func:`spinemets.inference.predict.predict_case`
for the tables ``lesions.csv`` and ``vertebrae.csv``.
"""

from __future__ import annotations

from typing import Sequence

import cc3d
import numpy as np
from scipy import ndimage

from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError
from spinemets.labels import PARTIAL_SINS_LABEL, SINS_LOCATION, VERTEBRA_COLUMNS


OUTSIDE = "outside spine"


#: Default largest distance (mm) from a lesion to a vertebra for a lesion without overlap.
NEAR_MM = 10.0


#: SINS bone lesion quality points by lesion type.
SINS_QUALITY: dict[str, int] = {"lytic": 2, "mixed": 1, "blastic": 0}


def lesion_type(lytic_voxels: int, sclerotic_voxels: int) -> str:
    """``lytic`` or ``sclerotic`` when a component holds one class only, ``mixed`` when it holds both."""
    if lytic_voxels and sclerotic_voxels:
        return "mixed"
    return "lytic" if lytic_voxels else "sclerotic"


def localize(lesions: np.ndarray, vertebrae: np.ndarray, ct: np.ndarray, spacing: Sequence[float],
             near_mm: float = NEAR_MM, ijk_to_lps_matrix: np.ndarray | None = None,
             confidence: np.ndarray | None = None) -> list[dict]:
    """One row per lesion component (see the module docstring for the rules).

    ``lesions`` (0/1 lytic/2 sclerotic), ``vertebrae`` (0-25) and ``ct`` (HU) are arrays of one
    shape in (z, y, x) order; ``spacing`` is (z, y, x) in mm. Centroids are in LPS mm when
    ``ijk_to_lps_matrix`` is given (voxel (i, j, k) = array index (x, y, z)), else in voxel units.
    ``confidence`` is the detection map (:func:`detection_map`); without it every lesion's is 1.
    """
    if not (lesions.shape == vertebrae.shape == ct.shape):
        raise SpinemetsError(f"lesion {lesions.shape}, vertebra {vertebrae.shape} and CT {ct.shape} arrays differ in shape")
    spacing = np.asarray(spacing, dtype=float)
    names = labels_mod.label_names("vertebrae")
    components, n = cc3d.connected_components(lesions > 0, connectivity=26, return_N=True)
    if n == 0:
        return []
    voxel_ml = float(np.prod(spacing)) / 1000.0
    distance = indices = None
    rows = []
    stats = cc3d.statistics(components)
    for cid in range(1, n + 1):
        box = stats["bounding_boxes"][cid]
        comp = components[box] == cid
        kinds = lesions[box][comp]
        levels = vertebrae[box][comp]
        hu = ct[box][comp].astype(float)
        n_lytic, n_scl = int((kinds == labels_mod.LYTIC).sum()), int((kinds == labels_mod.SCLEROTIC).sum())
        overlap = np.bincount(levels, minlength=len(names))[1:]
        if overlap.any():
            level, assignment, dist = names[int(np.argmax(overlap)) + 1], "overlap", 0.0
        else:
            if distance is None:
                distance, indices = _nearest_vertebra(vertebrae, spacing)
            level, assignment, dist = OUTSIDE, "none", float("nan")
            if distance is not None:
                where = np.nonzero(components == cid)
                d = distance[where]
                k = int(np.argmin(d))
                dist = float(d[k])
                if dist <= near_mm:
                    nearest = tuple(idx[where][k] for idx in indices)
                    level, assignment = names[int(vertebrae[nearest])], "nearest"
        centroid = np.array([s.start for s in box], float) + np.argwhere(comp).mean(axis=0)
        if ijk_to_lps_matrix is not None:
            centroid = (ijk_to_lps_matrix @ np.r_[centroid[::-1], 1.0])[:3]
        else:
            centroid = centroid[::-1]
        rows.append({
            "lesion": cid, "type": lesion_type(n_lytic, n_scl), "level": level, "assignment": assignment,
            "distance_mm": round(dist, 2), "volume_ml": round(comp.sum() * voxel_ml, 4), "voxels": int(comp.sum()),
            "confidence": 1.0 if confidence is None else round(float(confidence[box][comp].max()), 6),
            "lytic_fraction": round(n_lytic / (n_lytic + n_scl), 4), "mean_hu": round(float(hu.mean()), 1),
            "max_hu": round(float(hu.max()), 1), "centroid_x_mm": round(float(centroid[0]), 2),
            "centroid_y_mm": round(float(centroid[1]), 2), "centroid_z_mm": round(float(centroid[2]), 2),
        })
    return rows


def _nearest_vertebra(vertebrae: np.ndarray, spacing: np.ndarray):
    """Distance (mm) from every voxel to the nearest vertebra voxel and that voxel's index; (None, None) without vertebrae."""
    if not vertebrae.any():
        return None, None
    return ndimage.distance_transform_edt(vertebrae == 0, sampling=spacing, return_indices=True)


def partial_sins(level: str, lesion_types: Sequence[str]) -> dict:
    """Location and bone-lesion-quality points of one affected vertebra (``level``), and their sum.

    Bone lesion quality of the vertebra: ``lytic`` when all its lesions are lytic, ``blastic``
    when all are sclerotic, ``mixed`` otherwise (a mixed lesion, or lytic and sclerotic ones).
    The sum is empty when the location is not determined (the sacrum).
    """
    if level not in SINS_LOCATION:
        raise SpinemetsError(f"{level!r} is not a vertebra label; known: {', '.join(SINS_LOCATION)}")
    if not lesion_types:
        raise SpinemetsError(f"partial SINS of {level}: no lesions")
    kinds = set(lesion_types)
    unknown = kinds - {"lytic", "sclerotic", "mixed"}
    if unknown:
        raise SpinemetsError(f"unknown lesion type(s) {sorted(unknown)}; expected lytic, sclerotic or mixed")
    quality = "lytic" if kinds == {"lytic"} else "blastic" if kinds == {"sclerotic"} else "mixed"
    location_class, location_points = SINS_LOCATION[level]
    quality_points = SINS_QUALITY[quality]
    total = None if location_points is None else location_points + quality_points
    return {"lesion_quality": quality, "sins_location_class": location_class, "sins_location_points": location_points,
            "sins_bone_quality_points": quality_points, "partial_sins_points": total,
            "partial_sins_note": PARTIAL_SINS_LABEL}


def vertebra_table(lesion_rows: list[dict], lesions: np.ndarray, vertebrae: np.ndarray,
                   spacing: Sequence[float]) -> list[dict]:
    """One row per vertebra present in the stage-1 map: volume, its lesions, involved volume fraction, partial SINS.

    Involved volume fraction = lesion voxels inside the vertebra's label / the label's voxels.
    """
    names = labels_mod.label_names("vertebrae")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(vertebrae.ravel(), minlength=len(names))
    involved = np.bincount(vertebrae[lesions > 0].ravel(), minlength=len(names))
    rows = []
    for value in range(1, len(names)):
        name = names[value]
        here = [r for r in lesion_rows if r["level"] == name]
        if sizes[value] == 0 and not here:
            continue
        row = {"vertebra": name, "volume_ml": round(sizes[value] * voxel_ml, 3), "lesions": len(here),
               "lesion_ids": " ".join(str(r["lesion"]) for r in here),
               "involved_fraction": round(involved[value] / sizes[value], 4) if sizes[value] else float("nan")}
        if here:
            row.update(partial_sins(name, [r["type"] for r in here]))
        else:
            row.update({k: "" for k in VERTEBRA_COLUMNS[6:]})
        rows.append(row)
    return rows
