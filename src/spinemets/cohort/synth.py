"""Synthetic CT cohort with 3D Slicer masks, shaped like the public release of the paper's data.

It serves the command ``spinemets synth``; the dataset notebook (``01_dataset``) calls it when the
cohort is missing.

One job in one module (over 700 lines): every part (anatomy, tissue, lesions, files) draws from one
seeded random generator in a fixed order, which is what makes one seed give byte-identical files.

Each case is a CT volume (``ct.nrrd``, int16 HU, LPS, anisotropic spacing) with two 3D Slicer
segmentations: ``vertebrae.seg.nrrd`` (one segment per vertebra in view) and
``metastases.seg.nrrd`` (one segment per lesion, named ``lytic``/``sclerotic`` or an alias).
``cohort.csv`` holds the columns of the paper's Table 1 (case_id, sex, age, metastasis_type,
primary_site), ``lesions_truth.csv`` the planted lesions with their level, and ``synth.json`` the
seed and preset that produced the folder.

Anatomy (physical LPS millimetres; x to the patient's left, y posterior, z superior)

* Vertebrae C1...L5 and the sacrum stacked from the skull base down, with adult dimensions that
  grow caudally (body height 13 mm at C3 to 26 mm at L5, half-width 8.5 to 25 mm), a sagittal
  curve (cervical and lumbar lordosis, thoracic kyphosis) and a mild coronal one. A vertebra is a
  union of solids: an elliptic-cylinder body with a slight waist, pedicles, laminae, a spinous
  process sloping caudally (steep in the thoracic spine), transverse and articular processes;
  C1 is a ring with lateral masses, C2 carries the dens. Adjacent vertebrae touch at the facet
  joints. Inside depth below ``cortical_mm`` is cortical bone, deeper is cancellous.
* Anatomical anchors that fix the level count: twelve rib pairs on T1-T12 (costal cartilage to a
  sternum for the upper seven), the sacrum with iliac wings, and the skull base (with foramen
  magnum and occipital condyles) above C1.
* Intervertebral discs; body outline with subcutaneous fat, soft tissue, paraspinal and psoas
  muscle, lungs in the thorax, trachea, head with skull vault and brain; air outside.
* Tissue HU per case (air -1000, lung ~-850, fat ~-100, soft tissue ~+40, muscle ~+50,
  disc ~+80, cancellous bone 150-320 (lower with age), cortical bone 750-1000), a Gaussian blur
  (the scanner's point spread) and Gaussian noise.
* Lesions (0-5 per case): lytic ones are low-HU defects (0...50 HU) that replace the bone they
  cover, cortex included, so they may breach it; sclerotic ones are dense foci (600...1200 HU)
  confined to bone. Mostly in vertebral bodies, some in posterior elements, occasionally in a rib,
  the sternum or the ilium (the paper found sternal lesions). A lesion may come with a lesion of
  the other type drawn overlapping its border (a mixed pattern).

3D Slicer files as annotators make them: segments are named by one of three annotator styles that
rotate over the cases (``L1``/``lytic``; ``vertebrae_L1``/``Lytic``/``blastic``;
``Vertebra L1``/``osteolytic``/``osteoblastic``), and the second style draws the larger of two
adjacent vertebrae over its smaller neighbour at the facet joints. Overlapping segments end up in
two layers, as Slicer stores them. The masks returned as truth are what the documented import rule
(:mod:`spinemets.formats.slicer`: where labels overlap, the label with fewer voxels wins; ties go to the
higher label) makes of the written segments; the CT's HU follow the same truth.

Reproducibility: case ``i`` draws all its random numbers from
``numpy.random.SeedSequence(seed, spawn_key=(i,))``, so one seed gives byte-identical files for
any number of parallel jobs (NRRD files are gzip-compressed by pynrrd with a zero timestamp).
"""

from __future__ import annotations

import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
import slicerio
from scipy import ndimage
from tqdm import tqdm

from spinemets import __version__
from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError, unknown_choice
from spinemets.formats.images import drop_nrrd_write_date, ijk_to_lps
from spinemets.fileio import check_output_dir, atomic_path, remove_partials, write_csv, write_json
from spinemets.formats.slicer import write_segments

#: Size presets. ``demo``: CPU-sized (nnU-Net trains both stages in minutes): a spine-centred
#: in-plane field of view of 120 mm, every case with >= 10 whole consecutive vertebrae and at least
#: one level anchor. ``full``: clinical size, the whole body cross-section. ``spacing_xy`` is a
#: range (low, high) in mm, ``slice_thickness`` the choices in mm, ``slices`` the range of slice
#: counts, ``lesion_radius_mm`` the range of lesion radii, ``lesion_free`` the share of cases
#: without lesions and ``lesions_per_case`` the probabilities of 1, 2, ... lesions in the others.
#: The demo plants more lesions per case than the full preset (4.8 against 2.2 on average), so that
#: its held-out cases hold enough lesions of each type to measure a lesion-level F2 (one lesion of
#: 30 is worth 0.03 of it, where one of 4 was worth 0.25).
PRESETS: dict[str, dict] = {
    "demo": {
        "size_xy": 48, "spacing_xy": (2.5, 2.5), "slice_thickness": (3.0,), "slices": (55, 160),
        "fov": "spine", "min_vertebrae": 10, "require_anchor": True, "curvature": 0.5,
        "lesion_radius_mm": (5.0, 10.0), "min_lesion_voxels": 20,
        "lesion_free": 0.05, "lesions_per_case": (0.0, 0.05, 0.15, 0.25, 0.25, 0.15, 0.15),
        "blur_voxels": 0.5, "noise_hu": 18.0, "ct_compression": 6,
    },
    "full": {
        "size_xy": 512, "spacing_xy": (0.68, 0.86), "slice_thickness": (1.0, 1.25, 1.5), "slices": (300, 420),
        "fov": "body", "min_vertebrae": 10, "require_anchor": False, "curvature": 1.0,
        "lesion_radius_mm": (3.5, 14.0), "min_lesion_voxels": 60,
        "lesion_free": 0.15, "lesions_per_case": (0.35, 0.25, 0.18, 0.12, 0.10),
        "blur_voxels": 0.7, "noise_hu": 25.0, "ct_compression": 1,
    },
}
PRESET_NAMES: tuple[str, ...] = tuple(PRESETS)

COHORT_COLUMNS = ["case_id", "sex", "age", "metastasis_type", "primary_site"]
LESION_COLUMNS = ["case_id", "lesion", "segment", "type", "site", "voxels", "volume_ml", "x_mm", "y_mm", "z_mm"]

#: Tissue classes of the generating tissue map (``case["tissue"]``).
TISSUES: dict[str, int] = {
    "air": 0, "lung": 1, "fat": 2, "soft": 3, "muscle": 4, "brain": 5, "disc": 6, "cartilage": 7,
    "cancellous": 8, "cortical": 9,
}
_T = TISSUES
_SACRUM = len(labels_mod.VERTEBRAE) - 1  # index 24
_ANCHORS = {"skull base": (0,), "cervicothoracic": (6, 7), "thoracolumbar": (18, 19), "sacrum": (_SACRUM,)}

#: Primary sites: (probability, P(male), P(lytic) of a lesion). After the spectrum of spinal
#: metastases in clinical series (breast, lung, prostate, kidney, thyroid leading).
PRIMARY_SITES: dict[str, tuple[float, float, float]] = {
    "breast": (0.28, 0.01, 0.55),
    "lung": (0.22, 0.55, 0.75),
    "prostate": (0.18, 1.00, 0.12),
    "kidney": (0.09, 0.65, 0.95),
    "thyroid": (0.05, 0.30, 0.90),
    "colorectal": (0.06, 0.55, 0.80),
    "gastrointestinal": (0.04, 0.60, 0.70),
    "melanoma": (0.03, 0.55, 0.90),
    "unknown primary": (0.05, 0.55, 0.70),
}

# Vertebra dimensions (mm) at key levels, interpolated between them (adult averages, rounded):
# body height h, body half-width a, half-depth b, disc below d, canal half-width cw, canal
# half-depth cd, pedicle radius pr, spinous length sl, spinous slope (deg below horizontal),
# transverse process length tl.
_DIM_FIELDS = ("h", "a", "b", "d", "cw", "cd", "pr", "sl", "sang", "tl")
_DIM_KEYS = {
    1: (15.0, 8.5, 8.0, 4.5, 11.5, 7.5, 3.0, 16, 20, 9),     # C2
    2: (13.0, 8.5, 7.5, 5.0, 12.0, 7.0, 3.0, 13, 20, 10),    # C3
    5: (13.5, 10.5, 8.0, 5.0, 12.5, 7.0, 3.0, 18, 25, 12),   # C6
    6: (14.0, 11.5, 8.5, 5.0, 12.0, 7.0, 3.5, 28, 30, 15),   # C7
    7: (15.0, 13.0, 9.5, 4.0, 10.0, 7.0, 4.0, 30, 35, 18),   # T1
    10: (17.0, 14.0, 11.0, 4.0, 8.0, 7.5, 4.0, 32, 55, 18),  # T4
    14: (19.5, 15.5, 13.0, 4.5, 8.0, 7.5, 4.5, 34, 60, 17),  # T8
    17: (22.0, 18.0, 14.5, 6.0, 9.5, 8.0, 5.0, 30, 35, 12),  # T11
    18: (23.0, 19.0, 15.0, 7.0, 10.0, 8.5, 5.5, 28, 20, 10),  # T12
    19: (24.0, 20.0, 16.0, 8.0, 11.0, 9.0, 6.0, 28, 8, 20),   # L1
    21: (26.0, 22.0, 17.0, 10.0, 12.0, 9.0, 6.5, 28, 5, 27),  # L3
    23: (26.0, 25.0, 17.0, 11.0, 13.5, 9.5, 7.5, 24, 10, 25),  # L5
}
# Sagittal curve: body-centre y offset (mm, + posterior) at level coordinates (0 = C1 ... 24 = sacrum).
_CURVE_U = [-3, 0, 3, 6, 10, 13, 16, 19, 21, 23, 24, 27]
_CURVE_Y = [-5, 0, -8, 2, 14, 18, 10, 0, -10, -4, 15, 40]
# Body outline along the level coordinate: half-width, half-depth, posterior skin distance from the
# vertebral body centre (mm), lung and trachea presence (0..1).
_PROFILE_U = [-4.0, -0.6, 0.0, 3.0, 6.0, 7.0, 8.5, 13.0, 16.0, 18.0, 21.0, 24.0, 28.0]
_PROFILE = {
    "bw": [76, 76, 55, 52, 62, 120, 150, 160, 160, 158, 152, 168, 170],
    "bd": [92, 92, 55, 55, 60, 85, 100, 110, 112, 112, 108, 110, 105],
    "post": [100, 100, 60, 60, 65, 75, 85, 88, 90, 90, 92, 85, 80],
    "lung": [0, 0, 0, 0, 0, 0.25, 0.8, 1.0, 1.0, 0.35, 0, 0, 0],
    "trachea": [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
    "psoas": [0, 0, 0, 0, 0, 0, 0, 0, 0, 0.2, 1.0, 1.0, 0],
}

_ANNOTATOR_STYLES = (
    {"vertebra": "{name}", "sacrum": "Sacrum", "lytic": "lytic", "sclerotic": "sclerotic", "sloppy": False},
    {"vertebra": "vertebrae_{name}", "sacrum": "vertebrae_S1", "lytic": "Lytic", "sclerotic": "blastic",
     "sloppy": True},
    {"vertebra": "Vertebra {name}", "sacrum": "Sacrum", "lytic": "osteolytic", "sclerotic": "osteoblastic",
     "sloppy": False},
)


# --------------------------------------------------------------------------------------------
# Voxel grid and solid primitives. A primitive's "depth" is how far (mm) a point lies inside it:
# positive inside, zero on the surface. Unions take the maximum depth.
# --------------------------------------------------------------------------------------------
class _Grid:
    """Axis-aligned voxel grid (identity direction): voxel (i, j, k) sits at origin + spacing * (i, j, k)."""

    def __init__(self, shape_zyx, spacing_xyz, origin_xyz):
        self.shape = tuple(int(n) for n in shape_zyx)
        self.spacing = tuple(float(s) for s in spacing_xyz)
        self.origin = tuple(float(o) for o in origin_xyz)
        nz, ny, nx = self.shape
        self.x = (self.origin[0] + self.spacing[0] * np.arange(nx)).astype(np.float32)
        self.y = (self.origin[1] + self.spacing[1] * np.arange(ny)).astype(np.float32)
        self.z = (self.origin[2] + self.spacing[2] * np.arange(nz)).astype(np.float32)

    def window(self, lo_xyz, hi_xyz):
        """Voxel slices (z, y, x) covering the physical box [lo, hi], clipped to the grid; None if empty."""
        slices = []
        for axis, n in zip((2, 1, 0), self.shape):
            lo = math.floor((lo_xyz[axis] - self.origin[axis]) / self.spacing[axis])
            hi = math.ceil((hi_xyz[axis] - self.origin[axis]) / self.spacing[axis]) + 1
            lo, hi = max(lo, 0), min(hi, n)
            if lo >= hi:
                return None
            slices.append(slice(lo, hi))
        return tuple(slices)

    def coords(self, window):
        """Broadcastable physical coordinates (Z, Y, X) of a window."""
        return (self.z[window[0]][:, None, None], self.y[window[1]][None, :, None], self.x[window[2]][None, None, :])


def _ellcyl(center, a, b, h, waist=0.07):
    """Upright elliptic cylinder (half-axes a, b; height h) with a waist that narrows the middle."""
    cx, cy, cz = center

    def depth(Z, Y, X):
        dz = Z - cz
        w = 1.0 - waist * (1.0 - np.minimum((2.0 * dz / h) ** 2, 1.0))
        rn = np.sqrt(((X - cx) / (a * w)) ** 2 + ((Y - cy) / (b * w)) ** 2)
        return np.minimum(min(a, b) * (1.0 - rn), h / 2.0 - np.abs(dz))

    box = ((cx - a, cy - b, cz - h / 2), (cx + a, cy + b, cz + h / 2))
    return box, depth


def _capsule(p0, p1, r, zscale=1.0):
    """Segment p0-p1 swept by a sphere of radius r, stretched by ``zscale`` along z."""
    p0, p1 = np.asarray(p0, float), np.asarray(p1, float)
    v = (p1 - p0) / np.array([1.0, 1.0, zscale])
    vv = float(v @ v) or 1e-9

    def depth(Z, Y, X):
        dx, dy, dz = X - p0[0], Y - p0[1], (Z - p0[2]) / zscale
        t = np.clip((dx * v[0] + dy * v[1] + dz * v[2]) / vv, 0.0, 1.0)
        dist = np.sqrt((dx - t * v[0]) ** 2 + (dy - t * v[1]) ** 2 + (dz - t * v[2]) ** 2)
        return r - dist

    ext = np.array([r, r, r * zscale])
    box = (np.minimum(p0, p1) - ext, np.maximum(p0, p1) + ext)
    return box, depth


def _ellipsoid(center, radii, angle=0.0):
    """Ellipsoid with half-axes ``radii`` (u, w, z), its u axis at ``angle`` (rad) from x in the axial plane."""
    cx, cy, cz = center
    ru, rw, rz = radii
    c, s = math.cos(angle), math.sin(angle)

    def depth(Z, Y, X):
        dx, dy = X - cx, Y - cy
        u, w = c * dx + s * dy, -s * dx + c * dy
        rn = np.sqrt((u / ru) ** 2 + (w / rw) ** 2 + ((Z - cz) / rz) ** 2)
        return min(radii) * (1.0 - rn)

    ex = math.hypot(ru * c, rw * s)
    ey = math.hypot(ru * s, rw * c)
    box = ((cx - ex, cy - ey, cz - rz), (cx + ex, cy + ey, cz + rz))
    return box, depth


def _compose(grid, primitives):
    """Union of primitives in their joint window: (window, depth array) or None when out of view."""
    lo = np.min([np.asarray(b[0], float) for b, _ in primitives], axis=0)
    hi = np.max([np.asarray(b[1], float) for b, _ in primitives], axis=0)
    window = grid.window(lo, hi)
    if window is None:
        return None
    depth = np.full(tuple(s.stop - s.start for s in window), -np.inf, dtype=np.float32)
    for box, fn in primitives:
        sub = grid.window(box[0], box[1])
        if sub is None:
            continue
        sub = tuple(slice(max(s.start, w.start), min(s.stop, w.stop)) for s, w in zip(sub, window))
        if any(s.start >= s.stop for s in sub):
            continue
        local = tuple(slice(s.start - w.start, s.stop - w.start) for s, w in zip(sub, window))
        np.maximum(depth[local], fn(*grid.coords(sub)).astype(np.float32), out=depth[local])
    return window, depth


# --------------------------------------------------------------------------------------------
# Anatomy
# --------------------------------------------------------------------------------------------
def _level_dims(rng, scale):
    """Dimensions of the 25 levels (C1 ... L5, sacrum) for one body, with per-level jitter."""
    keys = sorted(_DIM_KEYS)
    table = np.array([_DIM_KEYS[k] for k in keys], dtype=float)
    dims = []
    for level in range(len(labels_mod.VERTEBRAE)):
        lev = min(max(level, 1), 23)
        row = [float(np.interp(lev, keys, table[:, f])) for f in range(len(_DIM_FIELDS))]
        d = dict(zip(_DIM_FIELDS, row))
        jitter = rng.uniform(0.96, 1.04)
        for f in ("h", "a", "b", "d", "cw", "cd", "pr", "sl", "tl"):
            d[f] *= scale * (jitter if f in ("h", "a", "b") else 1.0)
        dims.append(d)
    dims[0].update(h=10.0 * scale, d=1.0 * scale)      # C1: a ring, no disc below (the dens joint)
    dims[_SACRUM].update(h=24.0 * scale, a=dims[23]["a"], b=dims[23]["b"])
    return dims


class _Anatomy:
    """One body: level layout along z, spine curve and body outline profile."""

    def __init__(self, rng, curvature):
        self.scale = float(np.clip(rng.normal(1.0, 0.05), 0.88, 1.12))
        self.fat = float(rng.uniform(8.0, 30.0))
        self.dims = _level_dims(rng, self.scale)
        top, self.z_top, self.z_bot = 0.0, [], []
        for d in self.dims:
            self.z_top.append(top)
            self.z_bot.append(top - d["h"])
            top = top - d["h"] - d["d"]
        self.sacrum_length = 100.0 * self.scale
        self.zc = [(t + b) / 2 for t, b in zip(self.z_top, self.z_bot)]
        self.skull_top = self.z_top[0] + 28.0 * self.scale  # top of the skull-base plate region
        # level coordinate u(z): u = level index at each body centre, extended above and below
        self._uz = (np.array([self.zc[0] + 80.0] + self.zc + [self.zc[-1] - 150.0]),
                    np.array([-4.0] + list(range(len(self.zc))) + [28.0]))
        amp = curvature * rng.uniform(0.7, 1.3)
        self._curve_y = [amp * v * self.scale for v in _CURVE_Y]
        self._scoliosis = rng.normal(0.0, 4.0) * curvature  # coronal curve amplitude (mm), thoracolumbar

    def u(self, z):
        """Level coordinate at height z: 0 at the C1 centre ... 24 at the sacrum's S1 body."""
        zs, us = self._uz
        return np.interp(-np.asarray(z, float), -zs, us)

    def spine_xy(self, z):
        """(x, y) of the vertebral-body axis at height z."""
        u = self.u(z)
        y = np.interp(u, _CURVE_U, self._curve_y)
        x = self._scoliosis * np.sin(np.clip((u - 7) / 12.0, 0, 1) * math.pi)
        return x, y

    def profile(self, z):
        u = self.u(z)
        return {k: float(np.interp(u, _PROFILE_U, v)) for k, v in _PROFILE.items()}


def _vertebra(an, level):
    """Primitives of one vertebra, and named lesion sites (points inside its bone)."""
    d, s = an.dims[level], an.scale
    zc = an.zc[level]
    xs, yb = (float(v) for v in an.spine_xy(zc))
    prims, sites = [], {}
    if level == 0:  # atlas: anterior arch, lateral masses, posterior arch, transverse processes
        ya = yb - 9.0 * s
        prims += [_capsule((xs - 11 * s, ya, zc), (xs + 11 * s, ya, zc), 3.5 * s, 1.4)]
        for side in (-1, 1):
            lm = (xs + side * 15 * s, yb + 1 * s, zc)
            prims += [_ellipsoid(lm, (7 * s, 10 * s, 6.5 * s)),
                      _capsule((xs + side * 15 * s, yb + 9 * s, zc), (xs, yb + 33 * s, zc + 1), 3.3 * s, 1.3),
                      _capsule(lm, (xs + side * 37 * s, yb + 4 * s, zc), 3.3 * s)]
            sites[f"lateral mass {side}"] = lm
        return prims, sites
    h, a, b = d["h"], d["a"], d["b"]
    prims.append(_ellcyl((xs, yb, zc), a, b, h))
    sites["body"] = (xs, yb, zc)
    if level == _SACRUM:
        return _sacrum(an, xs, yb, prims, sites)
    d_above = an.dims[level - 1]["d"]
    thoracic, lumbar = 7 <= level <= 18, level >= 19
    yp0 = yb + b  # posterior wall of the body
    px = d["cw"] + 0.6 * d["pr"]
    zp = zc + 0.15 * h
    yj = yp0 + 1.3 * d["cd"]
    apex_y = yp0 + 2.0 * d["cd"] + 2.0 * s
    r_l = 2.6 * s
    for side in (-1, 1):
        x = xs + side * px
        joint = (x, yj, zp)
        prims.append(_capsule((x, yp0 - 0.3 * b, zp), joint, d["pr"], 1.4))       # pedicle
        prims.append(_capsule(joint, (xs, apex_y, zp - 0.05 * h), r_l, 0.3 * h / r_l))  # lamina
        back = 0.4 if thoracic else (0.1 if lumbar else -0.2)
        tip = (x + side * d["tl"], yj + back * d["tl"], zp)
        prims.append(_capsule(joint, tip, (3.3 if level >= 7 else 2.5) * s, 1.5 if lumbar else 1.2))  # transverse
        xa = xs + side * px * 1.05
        prims.append(_capsule((xa, yj + 0.2 * d["cd"], zp), (xa, yp0 + 1.6 * d["cd"], zc + h / 2 + 0.7 * d_above),
                              3.2 * s))                                              # superior articular
        prims.append(_capsule((xa, yj + 0.5 * d["cd"], zp), (xa, yp0 + 1.9 * d["cd"], zc - h / 2 - 0.7 * d["d"]),
                              3.2 * s))                                              # inferior articular
        sites[f"pedicle {side}"] = (x, (yp0 + yj) / 2, zp)
    ang = math.radians(d["sang"])
    r_sp = (4.0 if lumbar else 3.5 if thoracic else 2.8) * s
    sp_tip = (xs, apex_y + d["sl"] * math.cos(ang), zp - d["sl"] * math.sin(ang))
    prims.append(_capsule((xs, apex_y, zp), sp_tip, r_sp, 2.2 if lumbar else 1.3))  # spinous
    sites["spinous"] = (xs, apex_y + 0.3 * d["sl"] * math.cos(ang), zp - 0.3 * d["sl"] * math.sin(ang))
    if level == 1:  # axis: the dens rises into the atlas ring
        prims.append(_capsule((xs, yb - 1.0 * s, zc + h / 2 - 3 * s), (xs, yb - 1.0 * s, zc + h / 2 + 13 * s), 5.0 * s))
    return prims, sites


def _sacrum(an, xs, yb, prims, sites):
    s, d = an.scale, an.dims[_SACRUM]
    top, a, b = an.z_top[_SACRUM], d["a"], d["b"]
    for side in (-1, 1):  # alae
        prims.append(_ellipsoid((xs + side * (a + 12 * s), yb + 6 * s, top - 13 * s), (17 * s, 14 * s, 12 * s)))
        sites[f"ala {side}"] = (xs + side * (a + 12 * s), yb + 6 * s, top - 13 * s)
    for k in range(1, 5):  # S2 ... S5, narrowing and curving backwards
        c = (xs, yb + 7 * s * k ** 1.2, top - 24 * s - 17 * s * k)
        prims.append(_ellipsoid(c, ((a + 14 * s) * (1 - 0.2 * k), b * (1 - 0.12 * k), 10 * s)))
    crest0 = (xs, yb + b + 12 * s, top - 8 * s)
    prims.append(_capsule(crest0, (xs, yb + b + 30 * s, top - 80 * s), 4.0 * s))  # median sacral crest
    for side in (-1, 1):
        prims.append(_capsule((xs + side * (a - 4 * s), yb + b - 4 * s, top - 6 * s),
                              (xs + side * 8 * s, yb + b + 12 * s, top - 8 * s), 3.5 * s, 1.8))
    return prims, sites


def _rib(an, level, side):
    """Rib of thoracic level (7..18) on one side: capsule chain from the vertebral body round the chest."""
    d, s = an.dims[level], an.scale
    zc = an.zc[level]
    xs, yb = (float(v) for v in an.spine_xy(zc))
    t = level - 6  # rib number 1..12
    prof = an.profile(zc)
    inner_w = prof["bw"] * s - an.fat - 8 * s
    rw = min(inner_w, s * float(np.interp(t, [1, 3, 6, 9, 12], [50, 95, 128, 138, 125])))
    rd = 0.72 * rw
    px = d["cw"] + 0.6 * d["pr"]
    yj = yb + d["b"] + 1.3 * d["cd"]
    zp = zc + 0.15 * d["h"]
    head = (xs + side * (d["a"] + 3 * s), yb + 0.3 * d["b"], zc + 0.3 * d["h"])
    tub = (xs + side * (px + d["tl"]), yj + 0.4 * d["tl"], zp)
    post_y = tub[1] + 12 * s
    yc = post_y - rd
    phi0 = math.asin(min(abs(tub[0] - xs) / rw, 0.95))
    phi1 = math.radians(float(np.interp(t, [1, 7, 10, 11, 12], [165, 160, 140, 105, 75])))
    drop = s * float(np.interp(t, [1, 6, 10, 12], [30, 45, 40, 22]))
    pts = [head, tub]
    for f in np.linspace(0.0, 1.0, 12)[1:]:
        phi = phi0 + (phi1 - phi0) * f
        pts.append((xs + side * rw * math.sin(phi), yc + rd * math.cos(phi), zp - drop * f ** 1.2))
    r = (3.0 if t == 1 else 3.5) * s
    prims = [_capsule(p, q, r, 1.7) for p, q in zip(pts[:-1], pts[1:])]
    return prims, pts


def _sternum(an, rib_ends):
    """Manubrium and body of the sternum, in front of the upper rib ends."""
    s = an.scale
    z3, z9 = an.zc[9], an.zc[15]
    prims = []
    heights = np.linspace(z3, z9, 5)
    rz = 0.7 * abs(heights[0] - heights[1])  # overlapping pieces: one continuous bone
    for z, wx in zip(heights, (24, 17, 16, 15, 13)):
        prof = an.profile(z)
        x, yb = (float(v) for v in an.spine_xy(z))
        y = yb + prof["post"] - 2 * prof["bd"] + an.fat + 10 * s
        prims.append(_ellipsoid((x, y, z), (wx * s, 6.5 * s, rz)))
    cart = []
    for end, level in rib_ends:
        if level <= 13:  # true ribs (1-7) reach the sternum through costal cartilage
            z = np.interp(level, [7, 13], [z3, z9])
            x, yb = (float(v) for v in an.spine_xy(z))
            prof = an.profile(z)
            y = yb + prof["post"] - 2 * prof["bd"] + an.fat + 10 * s
            target = (x + np.sign(end[0] - x) * 14 * s, y, z)
            cart.append(_capsule(end, target, 3.0 * s, 1.5))
    return prims, cart


def _iliac_wings(an):
    s, d = an.scale, an.dims[_SACRUM]
    top = an.z_top[_SACRUM]
    xs, yb = (float(v) for v in an.spine_xy(an.zc[_SACRUM]))
    beta = math.radians(40)
    out = []
    for side in (-1, 1):
        si = np.array([xs + side * (d["a"] + 16 * s), yb + 22 * s, top - 18 * s])
        direction = np.array([side * math.sin(beta), -math.cos(beta), 0.0])
        centre = si + direction * 42 * s + np.array([0, 0, 12 * s])
        angle = math.atan2(side * math.sin(beta), math.cos(beta))  # plate normal
        points = [tuple(si + direction * t * s + np.array([0, 0, dz * s])) for t in (12, 26, 42) for dz in (0, 25)]
        out.append(([_ellipsoid(tuple(centre), (7 * s, 46 * s, 58 * s), angle)], points))
    return out


def _skull_base(an):
    """Occipital plate above C1 (rising behind the foramen magnum) and the occipital condyles."""
    s = an.scale
    z0 = an.z_top[0] + 7 * s
    x0, y0 = (float(v) for v in an.spine_xy(an.zc[0]))
    yf = y0 + 12 * s

    def depth(Z, Y, X):
        zpl = z0 + 0.45 * np.maximum(Y - yf - 10 * s, 0) - 0.1 * np.maximum(yf - Y, 0)
        plate = 5.0 * s - np.abs(Z - zpl)
        inside = 1.0 - np.sqrt(((X - x0) / (70 * s)) ** 2 + ((Y - y0 - 8 * s) / (80 * s)) ** 2)
        foramen = np.sqrt(((X - x0) / (14 * s)) ** 2 + ((Y - yf) / (17 * s)) ** 2) - 1.0
        return np.minimum(np.minimum(plate, 60 * s * inside), 15 * s * foramen)

    box = ((x0 - 70 * s, y0 - 72 * s, z0 - 10 * s), (x0 + 70 * s, y0 + 88 * s, z0 + 50 * s))
    prims = [(box, depth)]
    for side in (-1, 1):
        prims.append(_ellipsoid((x0 + side * 14 * s, y0 + 2 * s, an.z_top[0] + 3.5 * s), (6 * s, 9 * s, 4.5 * s)))
    return prims


# --------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------
def _paint_body(grid, tissue, an):
    """Per axial slice: body outline, fat, soft tissue, muscles, lungs, trachea; the head above C1."""
    X = grid.x[None, :]
    Y = grid.y[:, None]
    s = an.scale
    for k, z in enumerate(grid.z):
        p = an.profile(z)
        xs, ys = (float(v) for v in an.spine_xy(z))
        bw, bd = p["bw"] * s + an.fat * 0.6, p["bd"] * s + an.fat * 0.6
        fat = an.fat if p["bw"] > 70 else 4.0
        by = ys + p["post"] * s + an.fat * 0.6 - bd
        sl = tissue[k]
        sl[((X - xs) / bw) ** 2 + ((Y - by) / bd) ** 2 <= 1] = _T["fat"]
        sl[((X - xs) / (bw - fat)) ** 2 + ((Y - by) / (bd - fat)) ** 2 <= 1] = _T["soft"]
        if p["bw"] > 70 and z < an.z_top[0]:
            for side in (-1, 1):  # paraspinal muscles
                sl[((X - xs - side * 28 * s) / (22 * s)) ** 2 + ((Y - ys - 48 * s) / (24 * s)) ** 2 <= 1] = _T["muscle"]
        if p["psoas"] > 0:
            r = 16 * s * p["psoas"]
            a = an.dims[20]["a"]
            for side in (-1, 1):
                sl[((X - xs - side * (a + r)) ** 2 + (Y - ys) ** 2) <= r * r] = _T["muscle"]
        if p["lung"] > 0:
            iw, idp = bw - fat, bd - fat
            lw, ld = 0.40 * iw * p["lung"] ** 0.5, 0.62 * idp * p["lung"] ** 0.5
            for side in (-1, 1):
                sl[((X - xs - side * 0.52 * iw) / lw) ** 2 + ((Y - ys + 15 * s) / ld) ** 2 <= 1] = _T["lung"]
        if p["trachea"] > 0.5:
            sl[(X - xs) ** 2 + (Y - (ys - an.dims[4]["b"] - 22 * s)) ** 2 <= (8 * s) ** 2] = _T["air"]


def _paint_head(grid, tissue, an):
    """Skull vault and brain above the skull base."""
    s = an.scale
    x0, y0 = (float(v) for v in an.spine_xy(an.zc[0]))
    c = (x0, y0 + 8 * s, an.z_top[0] + 18 * s)
    box, depth_fn = _ellipsoid(c, (72 * s, 88 * s, 95 * s))
    window = grid.window((box[0][0], box[0][1], an.z_top[0] + 8 * s), box[1])
    if window is None:
        return
    Z, Y, X = grid.coords(window)
    depth = depth_fn(Z, Y, X)
    zpl = an.z_top[0] + 7 * s + 0.45 * np.maximum(Y - y0 - 22 * s, 0) + 5 * s
    above = Z > zpl
    t = tissue[window]
    t[(depth >= 0) & above] = _T["cortical"]
    t[(depth >= 6 * s) & above] = _T["brain"]


def _paint_bone(tissue, vert, window, depth, label, cortical_mm):
    inside = depth >= 0
    t = tissue[window]
    t[inside] = _T["cortical"]
    t[depth >= cortical_mm] = _T["cancellous"]
    if label:
        vert[window][inside] = label


# --------------------------------------------------------------------------------------------
# Field of view
# --------------------------------------------------------------------------------------------
def _z_extent(an, level):
    """Lowest and highest z (mm) of a vertebra, processes included."""
    boxes = [box for box, _ in _vertebra(an, level)[0]]
    return min(b[0][2] for b in boxes), max(b[1][2] for b in boxes)


def _choose_fov(rng, an, cfg, thickness):
    """Cranio-caudal extent (z_lo, z_hi) and the vertebra run wholly in view."""
    n_min, n_max = cfg["slices"]
    need = cfg["min_vertebrae"]
    n_levels = len(labels_mod.VERTEBRAE)
    for _ in range(5000):
        # a fifth of the cases start at C1 (skull base in view); the rest start anywhere
        start = 0 if rng.random() < 0.2 else int(rng.integers(0, n_levels - need + 1))
        count = int(rng.integers(need, min(need + 10, n_levels - start) + 1))
        run = list(range(start, start + count))
        if 23 in run and _SACRUM not in run:
            run.append(_SACRUM)  # L5 in view brings the sacrum and the iliac wings
        z_hi = _z_extent(an, run[0])[1] + rng.uniform(2.0, 25.0)
        if run[0] == 0:
            z_hi = max(z_hi, an.skull_top + rng.uniform(5.0, 30.0))
        bottom = an.z_top[_SACRUM] - 45.0 * an.scale if run[-1] == _SACRUM else _z_extent(an, run[-1])[0]
        z_lo = bottom - rng.uniform(2.0, 25.0)
        anchors = [k for k, lv in _ANCHORS.items() if all(v in run for v in lv)]
        if cfg["require_anchor"] and not anchors:
            continue
        slices = math.ceil((z_hi - z_lo) / thickness) + 1
        if slices > n_max:
            continue
        if slices < n_min:
            extra = (n_min - slices) * thickness
            f = rng.uniform(0.2, 0.8)
            z_hi, z_lo = z_hi + f * extra, z_lo - (1 - f) * extra
            slices = n_min
        return z_lo, slices, run, anchors
    raise SpinemetsError("cannot fit the requested vertebrae into the preset's slice range")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# One case
# --------------------------------------------------------------------------------------------
def case_id(index: int) -> str:
    """Case identifier of the 0-based case ``index``: ``case_001`` for 0."""
    return f"case_{index + 1:03d}"


def _check_preset(preset: str) -> dict:
    if preset not in PRESETS:
        raise unknown_choice("preset", preset, PRESET_NAMES)
    return PRESETS[preset]


def _case_grid(rng, an, cfg) -> tuple[_Grid, list[int]]:
    """The CT grid of a case (spacing, field of view, origin) and the vertebrae wholly in view."""
    sxy = round(float(rng.uniform(*cfg["spacing_xy"])), 3)
    sz = float(cfg["slice_thickness"][int(rng.integers(len(cfg["slice_thickness"])))])
    z_lo, nz, run, _ = _choose_fov(rng, an, cfg, sz)
    n = cfg["size_xy"]
    z_range = np.array([z_lo, z_lo + nz * sz])
    xs_mid, ys_mid = (float(np.mean(v)) for v in an.spine_xy(np.linspace(*z_range, 9)))
    if cfg["fov"] == "spine":  # spine-centred reconstruction
        cx, cy = xs_mid + rng.uniform(-3, 3), ys_mid + 18 * an.scale + rng.uniform(-3, 3)
    else:  # whole body cross-section
        p = an.profile(np.mean(z_range))
        cx, cy = xs_mid + rng.uniform(-8, 8), ys_mid + (p["post"] - p["bd"]) * an.scale + rng.uniform(-8, 8)
    origin = (round(cx - n * sxy / 2, 3), round(cy - n * sxy / 2, 3), round(z_lo, 3))
    return _Grid((nz, n, n), (sxy, sxy, sz), origin), run


def synthesize_case(index: int, seed: int, preset: str = "demo") -> dict:
    """Synthesize case ``index`` (0-based) of the cohort drawn with ``seed``.

    Returns a dict: ``case_id``; ``ct`` (SimpleITK int16 image, HU); ``vertebrae`` and
    ``metastases`` (uint8 label maps z-y-x on the CT grid: what importing the written files gives);
    ``tissue`` (uint8 tissue classes of :data:`TISSUES` before lesions); ``lesions`` (list of dicts:
    ``type``, ``segment`` name, ``site``, ``mask`` (bool z-y-x), ``hu``);
    ``vertebra_segments`` and ``lesion_segments`` (the segment dicts written to the Slicer files);
    ``metadata`` (the cohort.csv row plus geometry, levels in view, anchors, annotator style).
    """
    cfg = _check_preset(preset)
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))
    cid = case_id(index)
    style = _ANNOTATOR_STYLES[index % len(_ANNOTATOR_STYLES)]
    demo = _demographics(rng)
    an = _Anatomy(rng, cfg["curvature"])

    grid, run = _case_grid(rng, an, cfg)
    n, nz, sxy, sz = grid.shape[2], grid.shape[0], grid.spacing[0], grid.spacing[2]

    tissue = np.zeros(grid.shape, dtype=np.uint8)
    vert = np.zeros(grid.shape, dtype=np.uint8)
    _paint_body(grid, tissue, an)
    _paint_head(grid, tissue, an)
    cortical = max(1.0, 0.75 * sxy)
    structures = _paint_skeleton(grid, tissue, vert, an, cortical)
    lesions = _make_lesions(_Planting(rng, grid, tissue, vert, structures, cfg), demo, style, run)

    hu = _hu_field(rng, tissue, vert, demo["age"])
    meta_lab = _truth(lesions, grid.shape)
    for lesion in lesions:
        value = 1 if lesion["type"] == "lytic" else 2
        sel = lesion["mask"] & (meta_lab == value)
        hu[sel] = lesion["hu"] + (rng.normal(0.0, 25.0, int(sel.sum())) if value == labels_mod.SCLEROTIC else 0.0)
    ct = _finish_ct(rng, hu, grid, cfg)
    del hu

    vertebra_segments = _vertebra_segments(vert, style)
    lesion_segments = [{"id": f"Segment_{i + 1}", "name": l["segment"], "mask": np.asfortranarray(l["mask"]),
                        "color": labels_mod.colour("metastases", l["type"])} for i, l in enumerate(lesions)]
    types = {l["type"] for l in lesions}
    demo["metastasis_type"] = "none" if not types else ("mixed" if len(types) == 2 else types.pop())
    present = [labels_mod.VERTEBRAE[v - 1] for v in _labels_present(vert)]
    whole = _whole_levels(vert)
    metadata = {
        "case_id": cid, **demo, "preset": preset, "annotator_style": index % len(_ANNOTATOR_STYLES),
        "size": [n, n, nz], "spacing": [sxy, sxy, sz], "origin": list(grid.origin),
        "vertebrae_in_view": present, "whole_vertebrae": [labels_mod.VERTEBRAE[v - 1] for v in whole],
        "anchors": [k for k, levels in _ANCHORS.items() if all(v + 1 in whole for v in levels)],
    }
    return {"case_id": cid, "ct": ct, "vertebrae": vert, "metastases": meta_lab, "tissue": tissue,
            "lesions": lesions, "vertebra_segments": vertebra_segments, "lesion_segments": lesion_segments,
            "metadata": metadata}


def _demographics(rng) -> dict:
    sites = list(PRIMARY_SITES)
    probs = np.array([PRIMARY_SITES[k][0] for k in sites])
    site = sites[int(rng.choice(len(sites), p=probs / probs.sum()))]
    sex = "M" if rng.random() < PRIMARY_SITES[site][1] else "F"
    age = int(np.clip(round(rng.normal(63.0, 11.0)), 30, 90))
    return {"sex": sex, "age": age, "primary_site": site}


def _paint_skeleton(grid, tissue, vert, an, cortical):
    """Ribs, sternum, iliac wings, skull base, discs, then the vertebrae; returns lesion sites."""
    sites = {"vertebra": {}, "rib": [], "ilium": [], "sternum": []}
    rib_ends = []
    for level in range(7, 19):
        for side in (-1, 1):
            prims, pts = _rib(an, level, side)
            rib_ends.append((pts[-1], level))
            painted = _compose(grid, prims)
            if painted is not None:
                _paint_bone(tissue, vert, *painted, 0, cortical)
                sites["rib"].extend(p for p in pts[2:-1] if _in_view(grid, p))
    sternum, cartilage = _sternum(an, rib_ends)
    for prim in cartilage:
        painted = _compose(grid, [prim])
        if painted is not None:
            window, depth = painted
            tissue[window][depth >= 0] = _T["cartilage"]
    painted = _compose(grid, sternum)
    if painted is not None:
        _paint_bone(tissue, vert, *painted, 0, cortical)
        sites["sternum"] = [c for c in (_box_center(b) for b, _ in sternum) if _in_view(grid, c)]
    for prims, points in _iliac_wings(an):
        painted = _compose(grid, prims)
        if painted is not None:
            _paint_bone(tissue, vert, *painted, 0, cortical)
            sites["ilium"] += [p for p in points if _in_view(grid, p)]
    painted = _compose(grid, _skull_base(an))
    if painted is not None:
        _paint_bone(tissue, vert, *painted, 0, cortical)
    for level in range(1, _SACRUM + 1):  # discs between bodies (C2/C3 ... L5/S1)
        up, lo = an.dims[level - 1], an.dims[level]
        if level == 1:
            continue
        z = (an.z_bot[level - 1] + an.z_top[level]) / 2
        x, y = (float(v) for v in an.spine_xy(z))
        hd = up["d"] + 2.0
        painted = _compose(grid, [_ellcyl((x, y, z), (up["a"] + lo["a"]) / 2 * 1.03, (up["b"] + lo["b"]) / 2 * 1.03,
                                          hd, waist=-0.05)])
        if painted is not None:
            window, depth = painted
            tissue[window][depth >= 0] = _T["disc"]
    for level in range(len(labels_mod.VERTEBRAE)):
        prims, vsites = _vertebra(an, level)
        painted = _compose(grid, prims)
        if painted is not None:
            _paint_bone(tissue, vert, *painted, level + 1, cortical)
            sites["vertebra"][level + 1] = vsites
    return sites


def _in_view(grid, point) -> bool:
    """Whether a physical point lies inside the grid."""
    lo = np.array(grid.origin)
    hi = lo + np.array(grid.spacing) * (np.array(grid.shape[::-1]) - 1)
    return bool(np.all(np.asarray(point) >= lo) and np.all(np.asarray(point) <= hi))


def _box_center(box):
    lo, hi = np.asarray(box[0], float), np.asarray(box[1], float)
    return tuple((lo + hi) / 2)


def _hu_field(rng, tissue, vert, age):
    """HU per tissue class for this case, with texture in cancellous bone."""
    lut = np.zeros(len(TISSUES), dtype=np.float32)
    lut[_T["air"]] = -1000.0
    lut[_T["lung"]] = rng.uniform(-880, -820)
    lut[_T["fat"]] = rng.uniform(-115, -85)
    lut[_T["soft"]] = rng.uniform(32, 48)
    lut[_T["muscle"]] = rng.uniform(45, 60)
    lut[_T["brain"]] = rng.uniform(30, 40)
    lut[_T["disc"]] = rng.uniform(70, 95)
    lut[_T["cartilage"]] = rng.uniform(100, 140)
    lut[_T["cancellous"]] = float(np.clip(rng.normal(300 - 2.2 * (age - 30), 25), 150, 320))
    lut[_T["cortical"]] = rng.uniform(750, 1000)
    hu = lut[tissue]
    canc = tissue == _T["cancellous"]
    level_offset = rng.normal(0, 15, 27).astype(np.float32)
    hu[canc] += level_offset[vert[canc]] + rng.normal(0, 30, int(canc.sum())).astype(np.float32)
    return hu


def _finish_ct(rng, hu, grid, cfg):
    """Blur (point spread), noise, rounding to int16 HU, and the image with its geometry."""
    sigma = [cfg["blur_voxels"] * min(1.0, grid.spacing[0] / s) for s in (grid.spacing[2], grid.spacing[1],
                                                                           grid.spacing[0])]
    ndimage.gaussian_filter(hu, sigma=sigma, mode="nearest", output=hu)  # in place: line buffers copy input
    step = max(1, 2_000_000 // (grid.shape[1] * grid.shape[2]))
    for k in range(0, grid.shape[0], step):  # slab by slab keeps the noise array small
        slab = hu[k:k + step]
        slab += cfg["noise_hu"] * rng.standard_normal(slab.shape, dtype=np.float32)
    np.rint(hu, out=hu)
    np.clip(hu, -1024, 3071, out=hu)
    image = sitk.GetImageFromArray(hu.astype(np.int16))
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    return image


# --------------------------------------------------------------------------------------------
# Lesions
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Planting:
    """One case's state that its lesions are planted into: the random generator, the grid, the tissue
    and vertebra maps, the structures' sites, the preset, and (for :func:`_plant`) the labels of the
    whole vertebrae and the other bones' sites a lesion may sit in."""

    rng: np.random.Generator
    grid: object
    tissue: np.ndarray
    vert: np.ndarray
    sites: dict
    cfg: dict
    whole: tuple = ()
    outside: tuple = ()


def _make_lesions(planting: _Planting, demo, style, run):
    """Plant lesions into a case (``planting``; how many: the preset's ``lesion_free`` and
    ``lesions_per_case``); returns a list of lesion dicts (type, segment, site, mask, hu).

    A case's pattern follows its primary site: lytic only, sclerotic only, or (three cases in ten)
    mixed, where each lesion's type is a coin flip and a lesion may come with one of the other type
    drawn over its border.
    """
    rng, grid, sites, cfg = planting.rng, planting.grid, planting.sites, planting.cfg
    if rng.random() < cfg["lesion_free"]:
        return []
    weights = cfg["lesions_per_case"]
    n = int(rng.choice(np.arange(1, len(weights) + 1), p=weights))
    p_lytic = PRIMARY_SITES[demo["primary_site"]][2]
    mixed = rng.random() < 0.3
    case_kind = "lytic" if rng.random() < p_lytic else "sclerotic"
    planting = replace(planting, whole=tuple(v + 1 for v in run if v + 1 in sites["vertebra"]),
                       outside=tuple((k, sites[k]) for k in ("rib", "sternum", "ilium") if sites[k]))
    lesions = []
    for _ in range(n * 6):
        if len(lesions) >= n:
            break
        kind = ("lytic" if rng.random() < 0.5 else "sclerotic") if mixed else case_kind
        lesion = _plant(planting, kind)
        if lesion is None:
            continue
        lesions.append(lesion)
        if mixed and len(lesions) < n and rng.random() < 0.6:
            other = "sclerotic" if kind == "lytic" else "lytic"
            companion = _plant(planting, other, near=lesion)
            if companion is not None:
                lesions.append(companion)
    lesions = _drop_swallowed(lesions, grid.shape, cfg["min_lesion_voxels"])
    for lesion in lesions:
        lesion["segment"] = style[lesion["type"]]
    return lesions


def _plant(planting: _Planting, kind, near=None):
    """One lesion of ``kind`` in a case (``planting``): a blob of one or two ellipsoids intersected with
    the bone it sits in; ``near``, a lesion it is drawn over the border of."""
    rng, grid, tissue, vert, sites = planting.rng, planting.grid, planting.tissue, planting.vert, planting.sites
    cfg, whole, outside = planting.cfg, planting.whole, planting.outside
    rmin, rmax = cfg["lesion_radius_mm"]
    if near is not None:
        r = max(rmin, 0.7 * near["radius"])
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction) or 1.0
        centre = np.asarray(near["centre"]) + direction * near["radius"] * 0.8
        site, allowed_label = near["site"], near["label"]
    else:
        r = rng.uniform(rmin, rmax)
        if outside and rng.random() < 0.08:
            site, pts = outside[int(rng.integers(len(outside)))]
            centre = np.asarray(pts[int(rng.integers(len(pts)))], float)
            allowed_label = 0
        else:
            if not whole:
                return None
            label = whole[int(rng.integers(len(whole)))]
            vs = sites["vertebra"][label]
            key = "body" if ("body" in vs and rng.random() < 0.8) else list(vs)[int(rng.integers(len(vs)))]
            centre = np.asarray(vs[key], float)
            if key == "body":
                centre = centre + rng.uniform(-1, 1, 3) * np.array([6.0, 5.0, 4.0])
            site, allowed_label = labels_mod.VERTEBRAE[label - 1], label
    radii = r * rng.uniform(0.75, 1.25, 3)
    prims = [_ellipsoid(tuple(centre), tuple(radii), rng.uniform(0, math.pi))]
    if rng.random() < 0.5:
        off = rng.normal(size=3) * r * 0.5
        prims.append(_ellipsoid(tuple(centre + off), tuple(radii * rng.uniform(0.5, 0.8)), rng.uniform(0, math.pi)))
    painted = _compose(grid, prims)
    if painted is None:
        return None
    window, depth = painted
    bone = (tissue[window] == _T["cortical"]) | (tissue[window] == _T["cancellous"])
    own = vert[window] == allowed_label
    local = (depth >= 0) & bone & own
    if int(local.sum()) < cfg["min_lesion_voxels"]:
        return None
    mask = np.zeros(grid.shape, dtype=bool)
    mask[window] = local
    hu = rng.uniform(0, 50) if kind == "lytic" else rng.uniform(600, 1200)
    return {"type": kind, "site": site, "label": allowed_label, "centre": tuple(float(c) for c in centre),
            "radius": float(r), "mask": mask, "hu": float(hu)}


def _truth(lesions, shape):
    """Metastasis label map the import rule makes of the lesion segments (smaller label wins)."""
    per_label = {}
    for lesion in lesions:
        value = 1 if lesion["type"] == "lytic" else 2
        per_label[value] = per_label[value] | lesion["mask"] if value in per_label else lesion["mask"].copy()
    out = np.zeros(shape, dtype=np.uint8)
    for value in sorted(per_label, key=lambda v: (-int(per_label[v].sum()), v)):
        out[per_label[value]] = value
    return out


def _drop_swallowed(lesions, shape, min_voxels):
    """Drop lesions that keep fewer than ``min_voxels / 2`` voxels after overlaps are resolved."""
    while lesions:
        truth = _truth(lesions, shape)
        kept = [l for l in lesions if int((l["mask"] & (truth == (1 if l["type"] == "lytic" else 2))).sum())
                >= min_voxels / 2]
        if len(kept) == len(lesions):
            break
        lesions = kept
    return lesions


def _whole_levels(vert) -> list[int]:
    """Vertebra labels that touch neither the first nor the last slice (the sacrum: its top is in view)."""
    boxes = ndimage.find_objects(vert)
    whole = []
    for label, box in enumerate(boxes, start=1):
        if box is None:
            continue
        if box[0].start > 0 and box[0].stop < vert.shape[0]:
            whole.append(label)
        elif label == _SACRUM + 1 and box[0].stop < vert.shape[0]:
            whole.append(label)  # the sacrum's lower part may run out of view
    return whole


def _labels_present(labelmap) -> list[int]:
    counts = np.bincount(labelmap.ravel(), minlength=2)
    return [int(v) for v in np.nonzero(counts)[0] if v]


def _vertebra_segments(vert, style):
    """One segment per vertebra in view; the sloppy style draws over the neighbour at the facets."""
    present = _labels_present(vert)
    # Fortran-ordered z-y-x masks are C-ordered in the i-j-k order the Slicer writer works in.
    vert_f = np.asfortranarray(vert)
    masks = {v: vert_f == v for v in present}
    if style["sloppy"]:
        boxes = ndimage.find_objects(vert)
        for upper in present[::2]:
            lower = upper + 1
            if lower not in masks:
                continue
            big, small = (upper, lower) if masks[upper].sum() > masks[lower].sum() else (lower, upper)
            if masks[big].sum() == masks[small].sum():
                continue
            window = tuple(slice(min(a.start, b.start), max(a.stop, b.stop))
                           for a, b in zip(boxes[upper - 1], boxes[lower - 1]))
            grown = ndimage.binary_dilation(masks[big][window]) & masks[small][window]
            masks[big][window] |= grown
    segments = []
    for i, v in enumerate(present):
        name = labels_mod.VERTEBRAE[v - 1]
        shown = style["sacrum"] if name == "Sacrum" else style["vertebra"].format(name=name)
        segments.append({"id": f"Segment_{i + 1}", "name": shown, "mask": masks[v],
                         "color": labels_mod.colour("vertebrae", name)})
    return segments


# --------------------------------------------------------------------------------------------
# Cohort
# --------------------------------------------------------------------------------------------
def write_case(case: dict, out_dir: str | Path, compression: int = 6) -> Path:
    """Write one synthesized case as ``OUT/<case_id>/{ct.nrrd, vertebrae.seg.nrrd, metastases.seg.nrrd}``."""
    folder = Path(out_dir) / case["case_id"]
    folder.mkdir(parents=True, exist_ok=True)
    ct = case["ct"]
    volume = {"voxels": sitk.GetArrayViewFromImage(ct).transpose(2, 1, 0),
              "ijkToLPS": ijk_to_lps(ct), "spaceDimension": 3}
    with atomic_path(folder / "ct.nrrd") as tmp:
        slicerio.write_volume(str(tmp), volume, compression_level=compression)
        drop_nrrd_write_date(tmp)
    for name, segments in (("vertebrae", case["vertebra_segments"]), ("metastases", case["lesion_segments"])):
        write_segments(folder / f"{name}.seg.nrrd", ct, segments)
    return folder


def _lesion_rows(case: dict) -> list[dict]:
    rows = []
    ct = case["ct"]
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
    for i, lesion in enumerate(case["lesions"]):
        value = 1 if lesion["type"] == "lytic" else 2
        voxels = int((lesion["mask"] & (case["metastases"] == value)).sum())
        k, j, ii = (float(np.mean(a)) for a in np.nonzero(lesion["mask"]))
        x, y, z = ct.TransformContinuousIndexToPhysicalPoint((ii, j, k))
        rows.append({"case_id": case["case_id"], "lesion": i + 1, "segment": f"Segment_{i + 1}",
                     "type": lesion["type"], "site": lesion["site"], "voxels": voxels,
                     "volume_ml": round(voxels * voxel_ml, 3), "x_mm": round(x, 2), "y_mm": round(y, 2),
                     "z_mm": round(z, 2)})
    return rows


def _synth_and_write(args):
    index, seed, preset, out_dir = args
    case = synthesize_case(index, seed, preset)
    write_case(case, out_dir, PRESETS[preset]["ct_compression"])
    row = {k: case["metadata"][k] for k in COHORT_COLUMNS}
    return index, row, _lesion_rows(case)


def ensure_cohort(folder: str | Path, write: Callable[[], object], synthesize: bool, missing: str) -> bool:
    """Make sure ``folder`` holds a cohort (a folder with an entry that is not hidden): where it holds
    none, ``write()`` writes a synthetic one if ``synthesize`` is true; otherwise
    :class:`SpinemetsError` says ``FOLDER: no cohort here; MISSING`` (``missing``: what to do instead).
    Returns whether a cohort was written. The rule of the dataset notebook (``01_dataset``, with
    :func:`synthesize_cohort`) and of the external check (``06_external``, with
    :func:`spinemets.cohort.tcia.write_tcia_cohort`)."""
    folder = Path(folder)
    if folder.is_dir() and any(not p.name.startswith(".") for p in folder.iterdir()):
        return False
    if not synthesize:
        raise SpinemetsError(f"{folder}: no cohort here; {missing}")
    write()
    return True


def synthesize_cohort(out_dir: str | Path, cases: int, seed: int, preset: str = "demo", jobs: int = 1) -> Path:
    """Write a synthetic cohort of ``cases`` cases to ``out_dir``; return the path of ``cohort.csv``.

    One (seed, preset, cases) gives byte-identical files whatever ``jobs`` is. ``out_dir`` may hold
    an earlier cohort written with the same case IDs (its files are replaced); case folders beyond
    ``cases`` are refused rather than deleted, so a folder never mixes two cohorts.
    """
    cfg = _check_preset(preset)
    for name, value, low in (("cases", cases, 1), ("seed", seed, 0), ("jobs", jobs, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise SpinemetsError(f"{name} must be an integer >= {low}, got {value!r}")
    out_dir = check_output_dir(out_dir, "output folder")
    ids = {case_id(i) for i in range(cases)}
    if out_dir.is_dir():
        stray = sorted(p.name for p in out_dir.glob("case_*") if p.is_dir() and p.name not in ids)
        if stray:
            raise SpinemetsError(f"{out_dir}: holds case folders of another cohort ({', '.join(stray[:5])}"
                                 f"{' ...' if len(stray) > 5 else ''}); choose an empty folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_partials(out_dir)
    tasks = [(i, int(seed), preset, str(out_dir)) for i in range(cases)]
    results = []
    bar = dict(total=cases, desc=f"synth {preset}", unit="case")
    if jobs == 1:
        results = [_synth_and_write(t) for t in tqdm(tasks, **bar)]
    else:
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            results = list(tqdm(pool.map(_synth_and_write, tasks), **bar))
    results.sort(key=lambda r: r[0])
    write_csv(out_dir / "lesions_truth.csv", [row for r in results for row in r[2]], LESION_COLUMNS)
    write_json(out_dir / "synth.json", {"generator": f"spinemets {__version__} synth", "seed": int(seed),
                                        "cases": int(cases), "preset": preset, "parameters": cfg})
    return write_csv(out_dir / "cohort.csv", [r[1] for r in results], COHORT_COLUMNS)
