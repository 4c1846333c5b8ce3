"""3D Slicer segmentation files (``.seg.nrrd``) to and from label maps on the CT's voxel grid.

The Slicer step: it serves the command ``spinemets import`` (with :func:`spinemets.cohort.dataset.import_dataset`)
and the Slicer notebook (``02_slicer``), and reads ``.seg.nrrd`` files wherever they are scored.

Reading and writing the files is slicerio's; this module places them on the CT grid and maps
segment names to the labels of a stage (:mod:`spinemets.labels`).

Import rules (documented in the book's data chapter):

* **Placement.** 3D Slicer crops a segmentation to the extent of its segments when it saves it,
  so its grid is usually a sub-block of the CT's. Voxels are placed by physical (LPS)
  coordinates: the segmentation grid must have the CT's spacing and axis directions and sit on
  the CT's lattice (an integer voxel offset). Anything else, and any segment voxel outside the
  CT, is an error naming the file; nothing is resampled silently.
* **Layers.** Overlapping segments are stored in several layers (a 4-D voxel array); a segment
  is identified by its (layer, label value), never by the voxel value alone.
* **Overlaps.** Where segments of different labels overlap, the *smaller* segment (fewer voxels)
  wins, so a lesion or a small vertebra drawn over a larger structure keeps its voxels; on equal
  size the higher label value wins. Segments that map to the same label are merged. The number
  of contested voxels is reported.
* **Names.** Segment names are resolved through :func:`spinemets.labels.resolve_segment_names`
  (built-in aliases plus an optional user mapping, which may also ignore segments). Unknown
  names are an error that lists them and the known names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk
import slicerio

from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError
from spinemets.formats.images import check_geometry, drop_nrrd_write_date, ijk_to_lps, image_from_array
from spinemets.fileio import atomic_path, require_file
from spinemets.errors import one_line

_TOL_MATRIX = 1e-3  # relative tolerance of spacing/direction agreement
_TOL_OFFSET = 1e-2  # voxels: how far from the CT lattice a grid may sit


def read_slicer_segmentation(path: str | Path) -> dict:
    """slicerio's dict of a ``.seg.nrrd`` file, checked against its voxel array before any use.

    Raises :class:`SpinemetsError` naming the file when it is not a readable segmentation, or
    when its header disagrees with its voxels (:func:`check_segmentation`).
    """
    path = require_file(path, "segmentation file")
    try:
        seg = slicerio.read_segmentation(str(path))
    except Exception as exc:  # pynrrd and slicerio raise several types for damaged files
        raise SpinemetsError(
            f"{path}: cannot read 3D Slicer segmentation (truncated, corrupt or not a .seg.nrrd): {one_line(exc)[:300]}"
        ) from None
    check_segmentation(seg, path)
    _check_space_field(path)
    names = header_segment_names(path)
    if names is not None and len(names) == len(seg["segments"]):
        for segment, name in zip(seg["segments"], names):
            segment["name"] = name
    return seg


def header_segment_names(path: str | Path) -> list[str] | None:
    """The segment names of a ``.seg.nrrd`` header, in segment order, decoded as UTF-8.

    3D Slicer writes names in UTF-8 ("Lītiska metastāze"); pynrrd decodes the header as ASCII and
    drops every other character, so a name would reach the plan, the mapping and the import
    mangled. Read here from the header bytes (Latin-1 where they are not UTF-8). None when the
    header cannot be read this way (slicerio's names stand)."""
    import re

    try:
        with open(path, "rb") as fh:
            raw = b""
            for line in fh:
                if not line.strip():
                    break
                raw += line
                if len(raw) > 1 << 22:  # no header is this long: leave it to pynrrd
                    return None
    except OSError:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    found: dict[int, dict[str, str]] = {}
    for m in re.finditer(r"^Segment(\d+)_(ID|Name):=(.*?)\r?$", text, re.MULTILINE):
        found.setdefault(int(m.group(1)), {})[m.group(2)] = m.group(3)
    return [fields.get("Name") or fields.get("ID", "") for _, fields in sorted(found.items())]


def _check_space_field(path: Path) -> None:
    """A segmentation's coordinates mean something only in a declared frame (3D Slicer always writes one)."""
    import nrrd

    try:
        header = nrrd.read_header(str(path))
    except Exception as exc:  # slicerio read it; a header pynrrd cannot read is worth saying so
        raise SpinemetsError(f"{path}: cannot read the segmentation header ({one_line(exc)[:300]})") from None
    if "space" not in header:
        raise SpinemetsError(f"{path}: segmentation header has no 'space' field (such as left-posterior-superior); "
                             "its space directions and origin are in no declared frame")


def _as_int(value, what: str, path: Path) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise SpinemetsError(f"{path}: {what} {value!r} is not an integer")
    return int(value)


def check_segmentation(seg: dict, path: str | Path) -> None:
    """Validate a slicerio segmentation dict against its voxel array, in place of trusting the header.

    * voxels: a 3-D array, or 4-D with layers first, of an integer type, with at least one voxel;
    * geometry (``ijkToLPS``): finite, positive spacing, orthogonal axes;
    * segments: each has a unique ID and a name (or ID), a ``labelValue`` from 1 to the voxel
      type's maximum and a ``layer`` within the array; no two segments share (layer, labelValue),
      which would make them the same voxels;
    * every non-zero voxel value of a layer belongs to a segment of that layer (otherwise those
      voxels would vanish on import); a file with labelled voxels but no segment fields is a plain
      label map under a ``.seg.nrrd`` name, and is refused with that explanation.
    """
    path = Path(path)
    voxels = seg.get("voxels")
    if not isinstance(voxels, np.ndarray) or voxels.ndim not in (3, 4):
        raise SpinemetsError(f"{path}: segmentation voxels must be 3-D, or 4-D with layers first")
    if voxels.dtype.kind not in "ui" and voxels.dtype != bool:
        raise SpinemetsError(f"{path}: segmentation voxels have type {voxels.dtype}; expected integers")
    if voxels.size == 0:
        raise SpinemetsError(f"{path}: segmentation has no voxels (shape {list(voxels.shape)})")
    matrix = np.asarray(seg.get("ijkToLPS"), dtype=float)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise SpinemetsError(f"{path}: segmentation geometry (space directions, space origin) is missing or not finite")
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise SpinemetsError(f"{path}: segmentation has a zero-length voxel axis (space directions)")
    check_geometry(spacing, matrix[:3, 3], (axes / spacing).ravel(), path, "segmentation")
    layers = voxels.shape[0] if voxels.ndim == 4 else 1
    top = 1 if voxels.dtype == bool else int(np.iinfo(voxels.dtype).max)
    segments = seg.get("segments") or []
    ids, keys = set(), {}
    for index, segment in enumerate(segments):
        sid = segment.get("id")
        name = segment.get("name", sid)
        if not isinstance(sid, str) or not sid.strip():
            raise SpinemetsError(f"{path}: segment {index} has no ID")
        if not isinstance(name, str) or not name.strip():
            raise SpinemetsError(f"{path}: segment {sid!r} has an empty name")
        if sid in ids:
            raise SpinemetsError(f"{path}: two segments share the ID {sid!r}; one of them would vanish")
        ids.add(sid)
        value = _as_int(segment.get("labelValue", 1), f"segment {name!r}: labelValue", path)
        layer = _as_int(segment.get("layer", 0), f"segment {name!r}: layer", path)
        if not 1 <= value <= top:
            raise SpinemetsError(f"{path}: segment {name!r} has labelValue {value}; expected 1 to {top} "
                                 f"(0 is background, {voxels.dtype} voxels)")
        if not 0 <= layer < layers:
            raise SpinemetsError(f"{path}: segment {name!r} is in layer {layer}, but the voxel array has "
                                 f"{layers} layer(s)")
        if (layer, value) in keys:
            raise SpinemetsError(f"{path}: segments {keys[(layer, value)]!r} and {name!r} share layer {layer} and "
                                 f"labelValue {value}: they would be the same voxels")
        keys[(layer, value)] = name
    for layer in range(layers):
        values = _present_values(voxels[layer] if voxels.ndim == 4 else voxels)
        orphans = sorted(v for v in values if (layer, v) not in keys)
        if not orphans:
            continue
        if not segments:
            raise SpinemetsError(
                f"{path}: holds labelled voxels (values {_shown(orphans)}) but no 3D Slicer segment fields: "
                "a plain label map saved under a .seg.nrrd name; rename it to .nrrd to import it as a label map "
                "(with a --mapping of its values), or save it from 3D Slicer as a segmentation"
            )
        raise SpinemetsError(f"{path}: voxel value(s) {_shown(orphans)} of layer {layer} belong to no segment "
                             "(those voxels would vanish)")


def _present_values(array: np.ndarray) -> list[int]:
    if array.dtype == bool:
        return [1] if array.any() else []
    if array.dtype.kind == "u" and array.dtype.itemsize <= 2:
        counts = np.bincount(array.ravel(), minlength=1)
        return [int(v) for v in np.flatnonzero(counts) if v]
    return [int(v) for v in np.unique(array) if v]


def _shown(values: list[int], limit: int = 8) -> str:
    return ", ".join(map(str, values[:limit])) + (" ..." if len(values) > limit else "")


def segment_masks(seg: dict) -> list[tuple[dict, np.ndarray]]:
    """(segment, boolean IJK mask) for each segment of a checked segmentation, by (layer, labelValue)."""
    voxels = seg["voxels"]
    out = []
    for segment in seg.get("segments") or []:
        layer_voxels = voxels[int(segment.get("layer", 0))] if voxels.ndim == 4 else voxels
        out.append((segment, layer_voxels == int(segment.get("labelValue", 1))))
    return out


def _grid_offset(seg_matrix: np.ndarray, ct: sitk.Image, path: Path, ct_path) -> np.ndarray:
    """Integer IJK offset of the segmentation grid in the CT grid, or an error saying what differs."""
    ct_matrix = ijk_to_lps(ct)
    seg_axes, ct_axes = seg_matrix[:3, :3], ct_matrix[:3, :3]
    seg_spacing, ct_spacing = np.linalg.norm(seg_axes, axis=0), np.linalg.norm(ct_axes, axis=0)
    if not np.allclose(seg_spacing, ct_spacing, rtol=_TOL_MATRIX, atol=0):
        raise SpinemetsError(
            f"{path}: voxel spacing {np.round(seg_spacing, 4).tolist()} differs from the CT {ct_path} "
            f"({np.round(ct_spacing, 4).tolist()}); the mask must be on the CT's voxel grid"
        )
    if not np.allclose(seg_axes / seg_spacing, ct_axes / ct_spacing, atol=_TOL_MATRIX):
        raise SpinemetsError(
            f"{path}: axis directions differ from the CT {ct_path}; the mask must be on the CT's voxel grid"
        )
    offset = np.linalg.solve(ct_axes, seg_matrix[:3, 3] - ct_matrix[:3, 3])
    rounded = np.round(offset)
    if not np.allclose(offset, rounded, atol=_TOL_OFFSET):
        raise SpinemetsError(
            f"{path}: origin lies between CT voxels (offset {np.round(offset, 3).tolist()} voxels from {ct_path}); "
            "the mask must be on the CT's voxel grid"
        )
    return rounded.astype(int)


def labelmap_from_segmentation(
    path: str | Path,
    ct: sitk.Image,
    stage: str,
    mapping: Mapping[str, str | None] | None = None,
    ct_path: str | Path = "the CT",
    seg: dict | None = None,
) -> tuple[sitk.Image, dict]:
    """Import a ``.seg.nrrd`` as a label map (uint8) on the grid of ``ct``.

    Returns the label map and a report: ``segments`` (name, label, voxels), ``ignored`` (names
    the mapping ignores) and ``contested_voxels`` (voxels claimed by segments of different labels).
    ``seg`` is the file's dict when it was read already (:func:`read_slicer_segmentation`).
    """
    path = Path(path)
    seg = read_slicer_segmentation(path) if seg is None else seg
    names = [s.get("name", s["id"]) for s in seg.get("segments") or []]
    resolved = labels_mod.resolve_segment_names(names, stage, mapping, source=str(path))
    offset = _grid_offset(np.asarray(seg["ijkToLPS"], dtype=float), ct, path, ct_path)
    ct_size = np.array(ct.GetSize())  # i, j, k

    per_label: dict[int, np.ndarray] = {}
    report = {"segments": [], "ignored": [], "contested_voxels": 0}
    for (segment, mask), name in zip(segment_masks(seg), names):
        label = resolved[name]
        if label is None:
            report["ignored"].append(name)
            continue
        report["segments"].append({"name": name, "label": int(label), "voxels": int(mask.sum())})
        per_label[label] = per_label[label] | mask if label in per_label else mask

    labelmap = np.zeros(tuple(ct_size[::-1]), dtype=np.uint8)  # k, j, i
    if per_label:
        union = np.logical_or.reduce(list(per_label.values()))
        if union.any():
            lo = np.array([ax.min() for ax in np.nonzero(union)]) + offset
            hi = np.array([ax.max() for ax in np.nonzero(union)]) + offset
            if (lo < 0).any() or (hi >= ct_size).any():
                raise SpinemetsError(
                    f"{path}: segments reach voxels {lo.tolist()}..{hi.tolist()}, outside the CT {ct_path} "
                    f"(size {ct_size.tolist()}); the mask does not belong to this CT"
                )
        coverage = np.sum([m.astype(np.uint8) for m in per_label.values()], axis=0)
        report["contested_voxels"] = int((coverage > 1).sum())
        # Paint large segments first so that the smallest wins; equal sizes: the higher label last.
        order = sorted(per_label, key=lambda lab: (-int(per_label[lab].sum()), lab))
        shape = np.array(union.shape)
        target = np.zeros(tuple(ct_size), dtype=np.uint8)  # i, j, k
        window = _clip_window(offset, shape, ct_size)
        for lab in order:
            mask = per_label[lab][window[1]]
            target[window[0]][mask] = lab
        labelmap = np.ascontiguousarray(target.transpose(2, 1, 0))
    return image_from_array(labelmap, ct), report


def segmentation_grid(seg: dict, other: dict | None = None, path=None, other_path=None) -> sitk.Image:
    """An empty uint8 image on the voxel grid of a segmentation, or on the smallest grid holding both
    ``seg`` and ``other`` (two cropped segmentations of one CT; they must share its lattice).

    Used where no CT is at hand, e.g. when a ``.seg.nrrd`` reference is scored.
    """
    matrix = np.asarray(seg["ijkToLPS"], dtype=float)
    shape = np.array(seg["voxels"].shape[-3:])  # i, j, k
    lo, hi = np.zeros(3, dtype=int), shape
    if other is not None:
        base = _grid_image(matrix, shape)
        offset = _grid_offset(np.asarray(other["ijkToLPS"], dtype=float), base, Path(other_path or "segmentation"),
                              path or "the other segmentation")
        lo = np.minimum(lo, offset)
        hi = np.maximum(hi, offset + np.array(other["voxels"].shape[-3:]))
    grid = matrix.copy()
    grid[:3, 3] = (matrix @ np.append(lo, 1.0))[:3]
    return _grid_image(grid, hi - lo)


def _grid_image(matrix: np.ndarray, shape_ijk) -> sitk.Image:
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    image = sitk.Image([int(v) for v in shape_ijk], sitk.sitkUInt8)
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in matrix[:3, 3]])
    image.SetDirection([float(v) for v in (axes / spacing).ravel()])
    return image


def _clip_window(offset: np.ndarray, shape: np.ndarray, ct_size: np.ndarray):
    """Slices of the CT grid and of the segmentation grid where the two overlap."""
    start = np.maximum(offset, 0)
    stop = np.minimum(offset + shape, ct_size)
    ct_slices = tuple(slice(int(a), int(b)) for a, b in zip(start, stop))
    seg_slices = tuple(slice(int(a - o), int(b - o)) for a, b, o in zip(start, stop, offset))
    return ct_slices, seg_slices


def _bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last index of the True voxels along each axis, or None for an empty mask."""
    ranges = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        ranges.append((hit[0], hit[-1]))
    return np.array([r[0] for r in ranges]), np.array([r[1] for r in ranges])


def write_segments(
    path: str | Path,
    reference: sitk.Image,
    segments: list[dict],
    crop: bool = True,
    description: str | None = None,
) -> Path:
    """Write named segments as a 3D Slicer ``.seg.nrrd`` on the grid of ``reference``.

    Each item of ``segments`` holds ``name``, ``mask`` (bool, z-y-x like SimpleITK arrays) and
    optionally ``offset`` (z-y-x index of ``mask[0, 0, 0]`` in ``reference``, for a mask cropped
    to its structure), ``color`` (RGB 0-1) and ``id``. Overlapping segments go to further
    layers, as 3D Slicer stores them. With ``crop`` (Slicer's default) the grid is cropped to the
    union of the segments' extents and ``referenceImageExtentOffset`` records where it sits.
    ``description`` goes into the NRRD ``content`` field, the file's description (one line).
    """
    size_zyx = np.array(reference.GetSize()[::-1])
    placed = []  # (item, mask, offset, bbox lo, bbox hi) in reference z-y-x indices
    for item in segments:
        mask = np.asarray(item["mask"], dtype=bool)
        offset = np.asarray(item.get("offset", (0, 0, 0)), dtype=int)
        if (offset < 0).any() or (offset + mask.shape > size_zyx).any():
            raise SpinemetsError(f"{path}: segment {item['name']!r} lies outside the reference image")
        box = _bbox(mask)
        placed.append((item, mask, offset, None if box is None else (box[0] + offset, box[1] + offset)))
    boxes = [b for *_, b in placed if b is not None]
    if crop and boxes:
        lo = np.min([b[0] for b in boxes], axis=0)
        hi = np.max([b[1] for b in boxes], axis=0)
    else:
        lo, hi = np.zeros(3, dtype=int), size_zyx - 1
    shape = hi - lo + 1
    matrix = ijk_to_lps(reference)
    cropped_matrix = matrix.copy()
    cropped_matrix[:3, 3] = (matrix @ np.append(lo[::-1], 1.0))[:3]
    seg = slicerio.create_segmentation(shape[::-1], cropped_matrix)
    for index, (item, mask, offset, _) in enumerate(placed):
        grid = np.zeros(tuple(shape), dtype=bool)
        src = tuple(slice(max(0, l - o), min(m, h + 1 - o)) for l, h, o, m in zip(lo, hi, offset, mask.shape))
        dst = tuple(slice(s.start + o - l, s.stop + o - l) for s, o, l in zip(src, offset, lo))
        grid[dst] = mask[src]
        fields = {"id": item.get("id", f"Segment_{index + 1}"), "name": item["name"]}
        if "color" in item:
            fields["color"] = [float(c) for c in item["color"]]
        slicerio.add_segment(seg, grid.transpose(2, 1, 0), fields)
    seg["referenceImageExtentOffset"] = [int(v) for v in lo[::-1]]
    seg["masterRepresentation"] = "Binary labelmap"
    seg["containedRepresentationNames"] = ["Binary labelmap"]
    if description:
        seg["content"] = " ".join(str(description).split())
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), seg)
        drop_nrrd_write_date(tmp)
    return Path(path)


def segmentation_from_labelmap(labelmap: sitk.Image, path: str | Path, stage: str, crop: bool = True,
                               description: str | None = None) -> Path:
    """Write a label map of ``stage`` as a ``.seg.nrrd`` with one named, coloured segment per present label
    (``description``: the file's description, see :func:`write_segments`)."""
    array = sitk.GetArrayViewFromImage(labelmap)
    names = labels_mod.label_names(stage)
    unknown = sorted(set(np.unique(array).tolist()) - set(names))
    if unknown:
        raise SpinemetsError(f"{path}: label values {unknown} are not labels of the {stage} stage")
    segments = []
    for value in sorted(set(np.unique(array).tolist()) - {0}):
        name = names[value]
        segments.append({"id": f"{stage}_{name}", "name": name, "mask": array == value,
                         "color": labels_mod.colour(stage, name)})
    return write_segments(path, labelmap, segments, crop=crop, description=description)
