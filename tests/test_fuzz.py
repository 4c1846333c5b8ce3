"""Property-based fuzzing of the ``spinemets`` command line with odd and hostile input.

Each test draws *recipes* with Hypothesis (a fixed seed: ``derandomize=True``): a valid base
input (a CT in NRRD, NIfTI, MHA or DICOM; a small cohort with its manifest; folders of label
maps; a Zenodo record served by :class:`fakes.FakeZenodo`) plus a few mutations of it (bytes,
NRRD header text, 3D Slicer segment metadata, voxel types and shapes, manifest cells, mapping
files, folder layouts, output paths). A recipe is written into a fresh temporary folder and the
command runs in-process; :func:`fuzzing.check_case` then checks the invariant described in
tests/fuzzing.py, with an independent reader confirming every successful output.

The default run draws :data:`DEFAULT_EXAMPLES` cases (950, well under a minute on 2 cores
when the commands behave). ``pytest -m fuzz`` runs the long version: ``SPINEMETS_FUZZ_EXAMPLES`` cases in all (default 3000), split over the commands
in the same proportions. Every case is run and counted; the failures are grouped by signature,
reported at the end of each test and written, with the counts, to
/tmp/spinemets_fuzz_stats.json. ``SPINEMETS_FUZZ_SHRINK=1`` instead stops at the first failing
case and lets Hypothesis shrink it to a minimal recipe.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fuzzing as fz
from conftest import make_ct, vertebra_labelmap, write_case
from fakes import FakeZenodo, synthetic_volume, write_dicom_series

#: Cases per command in the default run (950 in all).
DEFAULT_EXAMPLES = {"convert": 250, "import": 150, "evaluate": 200, "scan": 150, "fetch": 200}
LONG_TOTAL = int(os.environ.get("SPINEMETS_FUZZ_EXAMPLES", "3000"))
SHRINK = os.environ.get("SPINEMETS_FUZZ_SHRINK", "") not in ("", "0")
UID_A = "1.2.826.0.1.3680043.9.7433.5.1"
UID_B = "1.2.826.0.1.3680043.9.7433.5.2"


def _settings(n: int):
    return settings(derandomize=True, database=None, max_examples=n, deadline=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------
# mutations shared by every command: bytes of a file, NRRD header text, voxel types and shapes


#: Generic byte-level damage of one file.
FILE_STEPS = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 999)),  # keep this many per mille of the bytes
    st.tuples(st.just("flip"), st.integers(0, 10**6), st.integers(1, 255)),  # XOR one header byte
    st.sampled_from([("empty",), ("dangling-link",), ("folder",), ("link-to-copy",), ("garbage",), ("link-loop",),
                     ("fifo",)]),
)

#: Edits of NRRD header fields, as text.
NRRD_FIELDS = st.sampled_from([
    ("sizes", "0 20 16"), ("sizes", "24 20"), ("sizes", "24 20 16 1"), ("sizes", "24 20 17"),
    ("sizes", "23 20 16"), ("sizes", "-24 20 16"), ("sizes", "1000000 1000000 1000000"), ("sizes", "a b c"),
    ("type", "float"), ("type", "double"), ("type", "uint8"), ("type", "int64"), ("type", "ushort"),
    ("type", "block"), ("type", "bogus"),
    ("dimension", "2"), ("dimension", "4"), ("dimension", "0"), ("dimension", "x"),
    ("encoding", "raw"), ("encoding", "gzip"), ("encoding", "bzip2"), ("encoding", "ascii"), ("encoding", "bogus"),
    ("space", "right-anterior-superior"), ("space", "left-anterior-superior"), ("space", "scanner-xyz"),
    ("space", "bogus"), ("endian", "big"), ("endian", "middle"),
    ("kinds", "domain domain"), ("kinds", "bogus bogus bogus"),
    ("sizes", None), ("type", None), ("dimension", None), ("encoding", None), ("space", None),
    ("space directions", None), ("space origin", None), ("kinds", None), ("endian", None),
    ("space directions", "none (0,1.2,0) (0,0,2.5)"), ("space directions", "(1.5,0,0) (0,1.2,0)"),
    ("space directions", "(1.5,0,0,0) (0,1.2,0,0) (0,0,2.5,0)"), ("space dimension", "3"),
    ("spacings", "1 1 1"), ("measurement frame", "(0,1,0) (1,0,0) (0,0,1)"), ("byte skip", "-1"),
    ("byte skip", "100"), ("line skip", "3"), ("data file", "missing.raw"), ("data file", "LIST"),
    ("type", "signed char"), ("encoding", "txt"), ("centerings", "cell cell cell"), ("thicknesses", "nan nan nan"),
])
#: A second copy of a header field, with another value (which of the two counts?).
DUPLICATE_FIELDS = st.sampled_from([("sizes", "24 20 17"), ("type", "float"), ("space origin", "(0,0,0)"),
                                    ("space directions", "(2,0,0) (0,2,0) (0,0,2)"), ("encoding", "raw")])

#: Geometry edits computed from the file's own space directions and origin.
GEOMETRY_OPS = st.sampled_from([
    "shear", "zero-axis", "parallel", "flip", "rotate", "stretch", "tiny", "huge", "nan-axis", "inf-axis",
    "origin-nan", "origin-inf", "origin-half-voxel", "origin-shift", "origin-far", "origin-huge",
])

#: Voxel type changes (with special values) and shape changes.
DTYPE_OPS = st.sampled_from(["float32", "float32-nan", "float32+inf", "float32-inf", "float64", "int64",
                             "int64-huge", "uint8", "int32"])
SHAPE_OPS = st.sampled_from(["2d", "4d", "size0", "one-slice"])

NRRD_STEPS = st.one_of(
    FILE_STEPS,
    st.tuples(st.just("field"), NRRD_FIELDS),
    st.tuples(st.just("duplicate-field"), DUPLICATE_FIELDS),
    st.tuples(st.just("geometry"), GEOMETRY_OPS),
    st.tuples(st.just("dtype"), DTYPE_OPS),
    st.tuples(st.just("shape"), SHAPE_OPS),
)
IMAGE_STEPS = st.one_of(FILE_STEPS, st.tuples(st.just("dtype"), DTYPE_OPS), st.tuples(st.just("shape"), SHAPE_OPS))

#: Edits of 3D Slicer segment metadata (``Segment{N}_*`` keys) and of the segmentation's voxels.
SEGMENT_STEPS = st.one_of(
    st.tuples(st.just("segment"), st.integers(0, 2), st.sampled_from([
        ("LabelValue", "0"), ("LabelValue", "-1"), ("LabelValue", "2"), ("LabelValue", "255"),
        ("LabelValue", "4294967296"), ("LabelValue", "1.5"), ("LabelValue", "abc"), ("LabelValue", None),
        ("Layer", "1"), ("Layer", "5"), ("Layer", "-1"), ("Layer", "x"), ("Layer", None),
        ("ID", ""), ("ID", None), ("Name", None), ("Name", ""), ("Name", "kidney"), ("Name", "sclerotic"),
        ("Name", "lytic"), ("Name", "T12"), ("Name", "L1"), ("Name", "../x"), ("Name", "Vertebra L2"),
        ("Name", "Lytic 3"), ("Name", " L1 "), ("Name", "T12\u00a0"), ("Extent", "0 -1 0 -1 0 -1"), ("Extent", "a"),
    ])),
    st.tuples(st.just("keyvalue"), st.sampled_from([
        ("Segmentation_ReferenceImageExtentOffset", "0 0 0"), ("Segmentation_ReferenceImageExtentOffset", "-5 0 0"),
        ("Segmentation_ReferenceImageExtentOffset", "a b c"), ("Segmentation_ReferenceImageExtentOffset", None),
        ("Segmentation_MasterRepresentation", "Closed surface"), ("Segment99_Name", "L5"),
    ])),
    st.tuples(st.just("stray-voxels"), st.sampled_from([7, 255])),
    st.tuples(st.just("duplicate-id"), st.integers(1, 2)),
    st.sampled_from([("strip-segments",), ("phantom-segment",)]),
    st.tuples(st.just("seg-dtype"), st.sampled_from(["int16", "int64", "float32", "uint16"])),
)
SEG_STEPS = st.one_of(NRRD_STEPS, SEGMENT_STEPS)


FILE_KINDS = ("truncate", "flip", "empty", "garbage", "dangling-link", "folder", "link-to-copy", "link-loop", "fifo")


def _header_length(path: Path) -> int:
    data = path.read_bytes()
    name = path.name.lower()
    if name.endswith(".nrrd") and b"\n\n" in data:
        return data.index(b"\n\n") + 1
    if name.endswith(".nii"):
        return min(348, len(data))
    if name.endswith(".mha") and b"ElementDataFile" in data:
        return data.index(b"\n", data.index(b"ElementDataFile")) + 1
    if name.endswith(".dcm"):
        return min(1024, len(data))
    return len(data)


def apply_file_step(path: Path, step: tuple, root: Path) -> None:
    """Damage one file: truncate it, flip a header byte, empty it, or replace it by a link or folder.

    A step on something that is no longer a regular file (an earlier step replaced it) does nothing.
    """
    kind = step[0]
    if not path.is_file() or path.is_symlink():
        return
    if kind == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) * step[1] // 1000])
    elif kind == "flip":
        data = bytearray(path.read_bytes())
        if data:
            pos = step[1] % max(1, _header_length(path))
            data[pos] ^= step[2]
            path.write_bytes(bytes(data))
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(bytes(range(256)) * 3)
    elif kind == "dangling-link":
        path.unlink()
        path.symlink_to(root / "no-such-target" / path.name)
    elif kind == "folder":
        path.unlink()
        path.mkdir()
        (path / "inside.txt").write_text("a folder where a file is expected\n")
    elif kind == "link-loop":
        path.unlink()
        path.symlink_to(path.name)
    elif kind == "fifo":
        path.unlink()
        os.mkfifo(path)
    elif kind == "link-to-copy":
        copy = root / "elsewhere" / path.name
        copy.parent.mkdir(exist_ok=True)
        shutil.move(str(path), copy)
        path.symlink_to(copy)
    else:
        raise ValueError(f"unknown file step {step!r}")


def _format(values) -> str:
    return "(" + ",".join(format(float(v), ".17g") for v in values) + ")"


def apply_geometry(doc: fz.NrrdText, op: str) -> None:
    """Edit the space directions or origin of an NRRD header from its own values."""
    tokens, origin_text = doc.vectors()
    vecs = [None if t is None else np.array(fz.NrrdText.parse_vector(t)) for t in tokens]
    axes = [i for i, v in enumerate(vecs) if v is not None]
    if len(axes) < 2 or origin_text is None:
        return
    a, b = axes[0], axes[1]
    origin = np.array(fz.NrrdText.parse_vector(origin_text))
    if op == "shear":
        vecs[a] = vecs[a] + 0.2 * vecs[b]
    elif op == "zero-axis":
        vecs[a] = vecs[a] * 0.0
    elif op == "parallel":
        vecs[b] = vecs[a] / np.linalg.norm(vecs[a]) * np.linalg.norm(vecs[b])
    elif op == "flip":
        vecs[a], vecs[b] = -vecs[a], -vecs[b]
    elif op == "rotate":
        c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
        ua, ub = vecs[a] / np.linalg.norm(vecs[a]), vecs[b] / np.linalg.norm(vecs[b])
        vecs[a] = (c * ua + s * ub) * np.linalg.norm(vecs[a])
        vecs[b] = (-s * ua + c * ub) * np.linalg.norm(vecs[b])
    elif op == "stretch":
        vecs[a] = vecs[a] * 1.01
    elif op == "tiny":
        vecs[a] = vecs[a] * 1e-12
    elif op == "huge":
        vecs[a] = vecs[a] * 1e12
    elif op == "nan-axis":
        vecs[a] = np.array([np.nan, 0.0, 0.0])
    elif op == "inf-axis":
        vecs[a] = np.array([np.inf, 0.0, 0.0])
    elif op == "origin-nan":
        origin[0] = np.nan
    elif op == "origin-inf":
        origin[1] = -np.inf
    elif op == "origin-half-voxel":
        origin = origin + 0.5 * vecs[a]
    elif op == "origin-shift":
        origin = origin + 2 * vecs[a]
    elif op == "origin-far":
        origin = origin + 1000 * vecs[b]
    elif op == "origin-huge":
        origin[0] = 1e300
    else:
        raise ValueError(op)
    doc.set_field("space directions", " ".join("none" if v is None else _format(v) for v in vecs))
    doc.set_field("space origin", _format(origin))


def _retyped(array: np.ndarray, op: str) -> np.ndarray:
    """A copy of ``array`` in another voxel type, with NaN, infinite or huge values where the op asks."""
    flat_index = tuple(min(1, s - 1) for s in array.shape)
    if op.startswith("float32"):
        out = array.astype(np.float32)
        special = {"float32-nan": np.nan, "float32+inf": np.inf, "float32-inf": -np.inf}.get(op)
        if special is not None and out.size:
            out[flat_index] = special
        return out
    if op == "int64-huge":
        out = array.astype(np.int64)
        if out.size:
            out[flat_index] = 2**62
        return out
    return array.astype({"float64": np.float64, "int64": np.int64, "uint8": np.uint8, "int32": np.int32,
                         "int16": np.int16, "uint16": np.uint16}[op])


def apply_nrrd_step(path: Path, step: tuple, root: Path) -> None:
    """One mutation of an NRRD file (CT or segmentation): bytes, a header field, geometry, type, shape."""
    kind = step[0]
    if kind in FILE_KINDS:
        apply_file_step(path, step, root)
        return
    if not path.is_file() or path.is_symlink():
        return
    try:
        doc = fz.NrrdText.read(path)
    except ValueError:  # an earlier step left no header
        return
    if kind == "field":
        doc.set_field(*step[1])
    elif kind == "duplicate-field":
        name, value = step[1]
        if doc.field(name) is not None:
            first_kv = next((j for j, ln in enumerate(doc.lines) if ":=" in ln), len(doc.lines))
            doc.lines.insert(first_kv, f"{name}: {value}")
    elif kind == "geometry":
        apply_geometry(doc, step[1])
    elif kind in ("dtype", "shape", "seg-dtype", "stray-voxels"):
        import nrrd

        try:
            array, _ = nrrd.read(str(path))
        except Exception:  # noqa: BLE001 - an earlier step broke it; leave it broken
            return
        if kind == "shape":
            _reshape(doc, array, step[1])
        elif kind == "stray-voxels":  # voxel values that no segment claims
            array = array.copy()
            value = min(step[1], np.iinfo(array.dtype).max) if array.dtype.kind in "iu" else step[1]
            array.reshape(-1)[:: max(1, array.size // 5)] = value
            fz.replace_nrrd_data(doc, array)
        else:
            replace = _retyped(array, step[1])
            fz.replace_nrrd_data(doc, replace)
    else:
        _apply_segment_step(doc, step)
    doc.write(path)


def _reshape(doc: fz.NrrdText, array: np.ndarray, op: str) -> None:
    tokens, _ = doc.vectors()
    spatial = [t for t in tokens if t is not None]
    layered = len(tokens) == 4 and tokens[0] is None
    if layered:  # a 4-D segmentation: reshape its first layer
        array = array[0]
    if array.ndim != 3 or len(spatial) < 3 or array.size == 0:
        return
    if op == "2d":
        fz.replace_nrrd_data(doc, array[:, :, 0])
        doc.set_field("space directions", " ".join(spatial[:2]))
        doc.set_field("kinds", "domain domain")
    elif op == "4d":
        fz.replace_nrrd_data(doc, np.stack([array, array], axis=-1))
        doc.set_field("space directions", " ".join(spatial[:3]) + " none")
        doc.set_field("kinds", "domain domain domain list")
    elif op == "size0":
        fz.replace_nrrd_data(doc, array[:, :, :0])
        doc.set_field("space directions", " ".join(spatial[:3]))
        doc.set_field("kinds", "domain domain domain")
    elif op == "one-slice":
        fz.replace_nrrd_data(doc, array[:, :, :1])
        doc.set_field("space directions", " ".join(spatial[:3]))
        doc.set_field("kinds", "domain domain domain")


def _apply_segment_step(doc: fz.NrrdText, step: tuple) -> None:
    segments = sorted({int(k.split("_", 1)[0][len("Segment"):]) for k in doc.keys()
                       if k.startswith("Segment") and k.split("_", 1)[0][len("Segment"):].isdigit()})
    kind = step[0]
    if kind == "segment" and segments:
        n = segments[step[1] % len(segments)]
        doc.set_keyvalue(f"Segment{n}_{step[2][0]}", step[2][1])
    elif kind == "duplicate-id" and len(segments) > 1:  # another segment takes the first one's ID
        n = segments[1 + step[1] % (len(segments) - 1)]
        doc.set_keyvalue(f"Segment{n}_ID", doc.keyvalue(f"Segment{segments[0]}_ID"))
    elif kind == "strip-segments":
        for key in doc.keys():
            if key.startswith("Segment"):
                doc.set_keyvalue(key, None)
    elif kind == "keyvalue":
        doc.set_keyvalue(*step[1])
    elif kind == "phantom-segment":
        n = max(segments, default=-1) + 1
        for key, value in (("ID", "phantom"), ("Name", "L3"), ("LabelValue", "9"), ("Layer", "0")):
            doc.set_keyvalue(f"Segment{n}_{key}", value)


def apply_sitk_step(path: Path, step: tuple, root: Path) -> None:
    """One mutation of a NIfTI or MHA image: bytes, voxel type, or shape (rewritten with SimpleITK)."""
    kind = step[0]
    if kind not in ("dtype", "shape"):
        apply_file_step(path, step, root)
        return
    image = _readable_volume(path)
    if image is None:
        return
    array = sitk.GetArrayFromImage(image)
    if kind == "dtype":
        new = sitk.GetImageFromArray(_retyped(array, step[1]))
        new.CopyInformation(image)
    elif step[1] == "2d":
        new = image[:, :, 0]
    elif step[1] == "4d":
        new = sitk.JoinSeries([image, image])
    elif step[1] == "size0":
        path.write_bytes(path.read_bytes()[:352])  # a header that promises voxels, and none
        return
    else:
        new = image[:, :, :1]
    sitk.WriteImage(new, str(path))


# ---------------------------------------------------------------------------------------------
# output paths


#: Plain output paths most of the time, so that the input mutations are what the command meets first.
PLAIN = ["new-folder"] * 6


def output_path(kind: str, root: Path, name: str, given: set[str]) -> Path:
    """An output path of the given kind: fresh, an existing file or folder, below a regular file ..."""
    if kind == "new-folder":
        return root / "out" / name
    if kind == "beside":
        return root / name
    if kind == "existing-file":
        (root / name).write_bytes(b"an older file in the way\n")
        return root / name
    if kind == "existing-folder":
        (root / name).mkdir()
        (root / name / "keep.txt").write_text("already here\n")
        return root / name
    if kind == "under-file":
        (root / "file.txt").write_text("a regular file\n")
        given.add(str(root / "file.txt"))
        return root / "file.txt" / name
    if kind == "dangling-link":
        (root / name).symlink_to(root / "missing-folder" / name)
        return root / name
    if kind == "link-to-folder":
        (root / "real-folder").mkdir()
        (root / name).symlink_to(root / "real-folder")
        return root / name
    if kind == "long-name":
        return root / "out" / ("x" * 300 + name)
    if kind == "odd-name":
        return root / "out" / ("new\nline " + name)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------
# base inputs, written once per module and copied into each case's folder


@dataclass
class Bases:
    """Valid inputs every recipe starts from (read-only; cases copy them)."""

    root: Path
    import_ids: list[str]

    @property
    def convert(self) -> Path:
        return self.root / "convert"

    @property
    def cohort(self) -> Path:
        return self.root / "cohort"

    @property
    def evaluate(self) -> Path:
        return self.root / "evaluate"


def _lesion_masks(ct: sitk.Image, index: int) -> list[tuple[str, np.ndarray]]:
    from conftest import small_cohort_lesions

    return small_cohort_lesions(ct, index)


def build_bases(root: Path) -> Bases:
    """Write the valid base inputs of every command below ``root``."""
    from spinemets.formats.slicer import write_segments

    conv = root / "convert"
    conv.mkdir(parents=True)
    ct = make_ct(seed=7)
    sitk.WriteImage(ct, str(conv / "ct.nrrd"), True)
    sitk.WriteImage(ct, str(conv / "ct-raw.nrrd"), False)
    sitk.WriteImage(ct, str(conv / "ct.nii.gz"))
    sitk.WriteImage(ct, str(conv / "ct.nii"))
    sitk.WriteImage(ct, str(conv / "ct.mha"))
    write_dicom_series(conv / "dicom", UID_A, synthetic_volume(seed=3))
    write_dicom_series(conv / "dicom-b", UID_B, synthetic_volume(n_slices=5, seed=4), prefix="b")

    cohort = root / "cohort"
    ids = []
    for index in range(1, 4):
        case_ct = make_ct(seed=index)
        write_case(cohort / f"case_{index:03d}", case_ct, vertebra_labelmap(case_ct), _lesion_masks(case_ct, index))
        ids.append(f"case_{index:03d}")

    ev = root / "evaluate"
    for side in ("ref", "pred"):
        (ev / side).mkdir(parents=True)
    for k, case in enumerate(("case_a", "case_b")):
        ref = np.zeros((8, 10, 12), dtype=np.uint8)  # z, y, x
        ref[2:5, 3:6, 4:8] = 1
        if k == 0:
            ref[5:7, 6:9, 1:4] = 2
        pred = np.zeros_like(ref)
        pred[2:5, 4:7, 4:8] = 1  # shifted by one voxel
        pred[6:8, 6:9, 1:4] = 2  # sclerotic: in case_b a false positive
        pred[0, 0, 10:12] = 1  # a small false positive
        for side, array in (("ref", ref), ("pred", pred)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing((1.0, 1.0, 2.0))
            image.SetOrigin((5.0, -3.0, 40.0))
            sitk.WriteImage(image, str(ev / side / f"{case}.nii.gz"))
        reference = sitk.ReadImage(str(ev / "ref" / f"{case}.nii.gz"))
        # the same prediction as 3D Slicer files: segment names say the class, not the voxel value
        named = [{"name": "lytic", "mask": pred == 1}, {"name": "sclerotic", "mask": pred == 2}]
        write_segments(ev / "seg" / f"{case}.seg.nrrd", reference, named)
        write_segments(ev / "seg-swapped" / f"{case}.seg.nrrd", reference, named[::-1])
        write_segments(ev / "seg-full" / f"{case}.seg.nrrd", reference, named, crop=False)
        write_segments(ev / "seg-full-swapped" / f"{case}.seg.nrrd", reference, named[::-1], crop=False)
        grown = np.zeros_like(pred, dtype=bool)  # a sclerotic segment drawn over the lytic one: two layers
        grown[1:6, 3:8, 3:9] = True
        write_segments(ev / "seg-overlap" / f"{case}.seg.nrrd", reference,
                       [{"name": "lytic", "mask": pred == 1}, {"name": "blastic", "mask": grown}])
    return Bases(root, ids)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> Bases:
    return build_bases(tmp_path_factory.mktemp("fuzz-bases"))


@pytest.fixture(scope="module")
def say(request):
    """Write a line to the terminal past pytest's output capture (the per-command counts)."""
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    fz.STATS_PATH.unlink(missing_ok=True)  # one report per session
    if reporter is None or capture is None:
        return fz.print_line

    def write(line: str) -> None:
        with capture.global_and_fixture_disabled():
            reporter.write(f"\n{line}\n")

    return write


@pytest.fixture(scope="module")
def zenodo():
    with FakeZenodo() as fake:
        yield fake


# ---------------------------------------------------------------------------------------------
# convert


@dataclass(frozen=True)
class ConvertRecipe:
    """``convert SOURCE --out OUT``: a CT in one format, mutated by ``steps``, written to an output of kind ``out``."""

    source: str
    steps: tuple
    out: str
    out_name: str
    stem: str = "ct"


CONVERT_SOURCES = ["nrrd", "nrrd-raw", "nii.gz", "nii", "mha", "dicom"]
DICOM_STEPS = st.one_of(
    st.tuples(st.sampled_from(["slice-truncate", "slice-flip", "slice-delete", "slice-empty", "slice-dangling",
                               "slice-duplicate", "slice-folder"]), st.integers(0, 5), st.integers(0, 10**6)),
    st.sampled_from([("add", "empty.dcm"), ("add", "notes.txt"), ("add", "dangling.dcm"), ("add", "sub.dcm"),
                     ("add", "test-SR.dcm"), ("add", "rtstruct.dcm"),  # pydicom's own SR and RTSTRUCT test files
                     ("second-series",), ("uid", "right"), ("uid", "wrong")]),
    # what anonymisers and scanners do to headers (tests/messy_dicom.py has one series of each kind)
    st.sampled_from([("header", "sop-class-blank"), ("header", "uids-blank"), ("header", "sop-instance-duplicate"),
                     ("header", "study-date-time-id-gone"), ("header", "tilt"), ("header", "localizer")]),
)


@st.composite
def convert_recipes(draw) -> ConvertRecipe:
    source = draw(st.sampled_from(CONVERT_SOURCES))
    step_strategy = {"dicom": DICOM_STEPS, "nrrd": NRRD_STEPS, "nrrd-raw": NRRD_STEPS}.get(source, IMAGE_STEPS)
    steps = tuple(draw(st.lists(step_strategy, min_size=0, max_size=2)))
    out = draw(st.sampled_from(PLAIN * 2 + ["beside", "existing-file", "existing-folder", "under-file",
                                            "dangling-link", "link-to-folder", "same-as-input", "inside-input",
                                            "bad-suffix", "no-suffix", "long-name", "odd-name"]))
    out_name = draw(st.sampled_from(["case.nii.gz", "case.nii.gz", "case.nii", "case.nrrd"]))
    stem = draw(_mostly(["ct"], ["ct ü", "ct\nsecond line", "-ct", "ct: x", "%s", "ct\tx", "ct\x7f"]))
    return ConvertRecipe(source, steps, out, out_name, stem)


def _apply_dicom_step(folder: Path, step: tuple, root: Path, bases: Bases, extra: list[str]) -> None:
    slices = sorted(p for p in folder.iterdir() if p.name.startswith("slice"))
    kind = step[0]
    if kind.startswith("slice-") and slices:
        target = slices[step[1] % len(slices)]
        if not target.is_file() or target.is_symlink():
            return
        if kind == "slice-truncate":
            apply_file_step(target, ("truncate", step[2] % 1000), root)
        elif kind == "slice-flip":
            data = bytearray(target.read_bytes())
            pos = 128 + step[2] % max(1, min(1024, len(data)) - 128)
            if pos < len(data):
                data[pos] ^= 0x5A
            target.write_bytes(bytes(data))
        elif kind == "slice-delete":
            target.unlink()
        elif kind == "slice-empty":
            target.write_bytes(b"")
        elif kind == "slice-dangling":
            apply_file_step(target, ("dangling-link",), root)
        elif kind == "slice-duplicate":
            shutil.copy(target, folder / f"copy-of-{target.name}")
        elif kind == "slice-folder":
            apply_file_step(target, ("folder",), root)
    elif kind == "add" and not os.path.lexists(folder / step[1]):
        path = folder / step[1]
        if step[1] == "empty.dcm":
            path.write_bytes(b"")
        elif step[1] == "notes.txt":
            path.write_text("scanner notes\n")
        elif step[1] == "dangling.dcm":
            path.symlink_to(root / "no-such-slice.dcm")
        elif step[1] in ("test-SR.dcm", "rtstruct.dcm"):
            from pydicom.data import get_testdata_file

            shutil.copy(get_testdata_file(step[1]), path)
        else:
            path.mkdir()
    elif kind == "second-series" and not (folder / "b000.dcm").exists():
        for src in (bases.convert / "dicom-b").iterdir():
            shutil.copy(src, folder / src.name)
    elif kind == "uid":
        extra[:] = ["--series-uid", UID_A if step[1] == "right" else "1.2.3.4.5.6.7.8.9"]
    elif kind == "header":
        _apply_header_step(slices, step[1])


def _apply_header_step(slices: list[Path], change: str) -> None:
    """Change the headers of the slices that pydicom still reads and writes (the others stay as
    earlier steps left them)."""
    import pydicom

    for k, path in enumerate(slices):
        if not path.is_file() or path.is_symlink():
            continue
        try:
            ds = pydicom.dcmread(str(path))
            _change_header(ds, change, k)
            data = io.BytesIO()
            ds.save_as(data)
        except Exception:  # damaged by an earlier step: pydicom reads it only in part, or cannot write it
            continue
        path.write_bytes(data.getvalue())


def _change_header(ds, change: str, k: int) -> None:
    if change == "sop-class-blank":
        ds.SOPClassUID = ""
    elif change == "uids-blank":
        ds.SOPClassUID = ds.StudyInstanceUID = ds.SeriesInstanceUID = ""
    elif change == "sop-instance-duplicate":
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.9.7433.6.1"
    elif change == "study-date-time-id-gone":
        for keyword in ("StudyDate", "StudyTime", "StudyID"):
            if keyword in ds:
                delattr(ds, keyword)
    elif change == "tilt":  # each slice 10 degrees further along y
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], round(position[1] + k * 2.5 * np.tan(np.radians(10)), 4), position[2]]
    elif change == "localizer" and k == 0:  # the first slice turned coronal (one series UID for two)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]


def build_convert(recipe: ConvertRecipe, root: Path, bases: Bases) -> fz.Case:
    given: set[str] = set()
    extra: list[str] = []
    if recipe.source == "dicom":
        src = root / recipe.stem.replace("ct", "dicom", 1)
        shutil.copytree(bases.convert / "dicom", src)
        for step in recipe.steps:
            _apply_dicom_step(src, step, root, bases, extra)
    else:
        base_name = {"nrrd": "ct.nrrd", "nrrd-raw": "ct-raw.nrrd"}.get(recipe.source, f"ct.{recipe.source}")
        src = root / "input" / (recipe.stem + base_name[base_name.index("."):])
        src.parent.mkdir()
        shutil.copy(bases.convert / base_name, src)
        apply = apply_nrrd_step if recipe.source.startswith("nrrd") else apply_sitk_step
        for step in recipe.steps:
            apply(src, step, root)
    if recipe.out == "same-as-input":
        out = src
    elif recipe.out == "inside-input":
        out = (src if src.is_dir() else src.parent) / recipe.out_name
    elif recipe.out == "bad-suffix":
        out = root / "out" / "case.txt"
    elif recipe.out == "no-suffix":
        out = root / "out" / "case"
    else:
        out = output_path(recipe.out, root, recipe.out_name, given)
    argv = ["convert", str(src), "--out", str(out), *extra]
    return fz.Case("convert", root, argv, out, check_convert, given, notes={"src": str(src)})


def read_output_image(path: Path) -> tuple[np.ndarray, fz.Grid]:
    """An image the command wrote, read back without SimpleITK where the format allows."""
    try:
        return fz.read_image_reference(path, f"output {path.name}")
    except fz.Invalid as exc:
        raise fz.Mismatch(str(exc)) from None


def _check_dicom_source(folder: Path, series_uid: str | None) -> str | None:
    """A DICOM folder is usable when the series asked for (or its only series, or the only axial CT
    series of more than two slices that is no localizer, judged by its first file in GDCM's order)
    exists, every file that claims to be DICOM belongs to a series, and the chosen series' slices
    have one orientation, are stacked along their normal (no gantry tilt) and are evenly spaced."""
    reader = sitk.ImageSeriesReader()
    uids = reader.GetGDCMSeriesIDs(str(folder))
    if series_uid is not None and series_uid not in uids:
        raise fz.Invalid(f"{folder}: no series {series_uid}")
    ordered = {uid: list(reader.GetGDCMSeriesFileNames(str(folder), uid)) for uid in uids}
    if series_uid is None and len(uids) > 1:
        axial = [uid for uid, files in ordered.items() if len(files) > 2 and _axial_ct_file(files[0])]
        if len(axial) != 1:
            raise fz.Invalid(f"{folder}: {len(uids)} DICOM series, {len(axial)} axial CT, and no --series-uid")
        series_uid = axial[0]
    series = {uid: set(files) for uid, files in ordered.items()}
    claimed = [p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix == ".dcm"
               and (p.is_file() or p.is_symlink())]
    missing = [p.name for p in claimed if not any(str(p) in files for files in series.values())
               and _modality(p) not in ("SR", "RTSTRUCT")]  # a report or structure set is no slice
    if missing:
        raise fz.Invalid(f"{folder}: {missing[:3]} claim to be DICOM slices but are not readable as a series")
    points, orientations = [], set()
    for name in series[series_uid or uids[0]]:
        header = sitk.ImageFileReader()
        header.SetFileName(name)
        header.ReadImageInformation()
        points.append([float(v) for v in header.GetMetaData("0020|0032").split("\\")])
        orientations.add(tuple(round(float(v), 3) for v in header.GetMetaData("0020|0037").split("\\")))
    if len(orientations) > 1:
        raise fz.Invalid(f"{folder}: slices of one series in {len(orientations)} orientations")
    points = np.array(points)
    ends = points[np.argsort(points[:, 2])[[0, -1]]]  # the base series is axial: its normal is z
    stack = ends[1] - ends[0]
    if len(points) > 1 and np.degrees(np.arctan2(np.hypot(stack[0], stack[1]), abs(stack[2]))) > 0.5:
        raise fz.Invalid(f"{folder}: slices stacked at an angle to their normal (gantry tilt)")
    positions = points[:, 2]
    gaps = np.diff(np.sort(positions))
    if gaps.size and (gaps.min() <= 0.01 or np.abs(gaps - np.median(gaps)).max() > 0.01 * np.median(gaps) + 0.01):
        raise fz.Invalid(f"{folder}: slices are not evenly spaced (a slice missing or doubled)")
    return series_uid


def _modality(path: Path) -> str:
    """Modality of a DICOM file by pydicom (with or without a file meta header); "" when unreadable."""
    import pydicom

    try:
        return str(pydicom.dcmread(str(path), force=True, specific_tags=["Modality"]).get("Modality", "")).upper()
    except Exception:
        return ""


def _axial_ct_file(name: str) -> bool:
    header = sitk.ImageFileReader()
    header.SetFileName(name)
    header.ReadImageInformation()
    get = lambda tag: header.GetMetaData(tag).strip() if header.HasMetaDataKey(tag) else ""  # noqa: E731
    cosines = [float(v) for v in get("0020|0037").split("\\")] if get("0020|0037") else [0] * 6
    normal_z = cosines[0] * cosines[4] - cosines[1] * cosines[3]
    return get("0008|0060").upper() == "CT" and "LOCALIZER" not in get("0008|0008").upper() and abs(normal_z) >= 0.7071


def check_convert(case: fz.Case) -> None:
    src, out = Path(case.notes["src"]), case.out
    uid = case.argv[case.argv.index("--series-uid") + 1] if "--series-uid" in case.argv else None
    if src.is_dir():
        uid = _check_dicom_source(src, uid)
    elif uid is not None:
        raise fz.Invalid("a series UID was given for a file")
    expected, grid = fz.read_image_reference(src, f"source {src.name}", series_uid=uid)
    fz.check_ct(expected, grid, f"source {src.name}")
    if not out.name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
        raise fz.Invalid(f"output suffix of {out.name!r} is not an image format")
    got, out_grid = read_output_image(out)
    fz.same_voxels(expected, got, f"output {out.name}")
    grid.same_as(out_grid, f"output {out.name}")


# ---------------------------------------------------------------------------------------------
# import


@dataclass(frozen=True)
class ImportRecipe:
    """``import``: the first ``n_cases`` cases of the cohort, ``steps`` applied to their files and manifest."""

    stage: str
    n_cases: int
    steps: tuple
    mapping: tuple | None
    out: str
    options: tuple = ()


CASE_IDS = ["../x", "", "../../escape", "../../../../escape", "a b", "fällé", "x" * 300,
            "/abs/path", ".hidden", "x/y", "-dash", "a\nb", "a,b", '"quoted"', "case_001", "CASE_001",
            "a:b", "ok-id_1.x", "nul\x00byte", " lead", "trail ", "Ω"]
LABEL_VALUES = [1, 2, 7, 19, 20, 21, 25, 100, 255, 256, 1000, 65535, 2**31 - 1, 2**31, 2**32 + 5, 2**62, -1]
MAPPING_TEXTS = ["not: [valid", "- a\n- b\n", "", "null\n", "42\n", "? [a, b]\n: c\n", "T12: 5\n",
                 "T12: [L1]\n", "{T12: kidney}\n", "\udcff"]
MANIFEST_STEPS = st.one_of(
    st.tuples(st.just("id"), st.integers(0, 2), st.sampled_from(CASE_IDS)),
    st.tuples(st.just("cell"), st.integers(0, 2), st.sampled_from(["image", "segmentation"]),
              st.sampled_from(["folder", "missing", "relative", "dangling", "other-case", "empty", "seg-for-image"])),
    st.tuples(st.just("split"), st.integers(0, 2), st.sampled_from(["test", "TEST", "validation", "", " train"])),
    st.tuples(st.just("stage-cell"), st.integers(0, 2), st.sampled_from(["", "Vertebrae", "lesions"])),
    st.tuples(st.just("drop-column"), st.sampled_from(["case_id", "image", "stage", "segmentation", "split"])),
    st.sampled_from([("duplicate-row",), ("header-only",), ("garbage",), ("bom",), ("semicolons",),
                     ("extra-column",), ("manifest-folder",), ("manifest-dangling",), ("manifest-empty",),
                     ("manifest-fifo",), ("manifest-loop",),
                     ("ragged-row",), ("all-test",)]),
)
IMPORT_STEPS = st.one_of(
    st.tuples(st.just("ct"), st.integers(0, 2), NRRD_STEPS),
    st.tuples(st.just("seg"), st.integers(0, 2), SEG_STEPS),
    st.tuples(st.just("labelmap"), st.integers(0, 2),
              st.tuples(st.sampled_from(LABEL_VALUES), st.sampled_from(LABEL_VALUES), st.sampled_from(LABEL_VALUES)),
              st.sampled_from(["auto", "float32", "float64", "int64", "fraction"])),
    st.tuples(st.just("labelmap-as-seg"), st.integers(0, 2)),
    st.tuples(st.just("manifest"), MANIFEST_STEPS),
)
MAPPINGS = st.one_of(
    st.none(),
    st.tuples(st.just("names"), st.lists(st.tuples(
        st.sampled_from(["T12", "L1", "L2", "Lytic", "blastic", "kidney", "t12", "Segment_1", "l 1"]),
        st.sampled_from(["T12", "L1", "L2", "lytic", "sclerotic", None, "kidney", "Sacrum"])),
        min_size=1, max_size=3, unique_by=lambda kv: kv[0])),
    st.tuples(st.just("int-keys"), st.sampled_from(["all", "some", "strings", "wrong-names"])),
    st.tuples(st.just("text"), st.sampled_from(MAPPING_TEXTS)),
    st.tuples(st.just("path"), st.sampled_from(["folder", "dangling", "missing", "totalsegmentator", "fifo"])),
)


@st.composite
def import_recipes(draw) -> ImportRecipe:
    stage = draw(st.sampled_from(["vertebrae", "metastases"]))
    steps = tuple(draw(st.lists(IMPORT_STEPS, min_size=0, max_size=3)))
    mapping = draw(MAPPINGS)
    out = draw(st.sampled_from(PLAIN + ["existing-folder", "existing-file", "under-file", "inside-cohort",
                                        "dangling-link", "long-name", "odd-name"]))
    options = draw(_mostly([()], [("--dataset-id", "0"), ("--dataset-id", "1000"), ("--dataset-id", "7"),
                                  ("--jobs", "2"), ("--jobs", "0")], share=6))
    return ImportRecipe(stage, draw(st.sampled_from([2, 3])), steps, mapping, out, options)


def _write_labelmap(case_dir: Path, stage: str, values: tuple, dtype: str, bases: Bases) -> Path:
    """Replace a case's mask by a plain NIfTI label map whose labels are recoded to ``values``."""
    from spinemets.labels import STAGES

    ct = sitk.ReadImage(str(bases.cohort / case_dir.name / "ct.nrrd"))
    index = int(case_dir.name.split("_")[1])
    names = ("T12", "L1", "L2") if stage == "vertebrae" else ("lytic", "sclerotic")
    if stage == "vertebrae":
        labels = vertebra_labelmap(ct)
    else:
        labels = np.zeros(ct.GetSize()[::-1], dtype=np.uint8)
        for name, mask in _lesion_masks(ct, index):
            labels[mask] = 1 if name == "Lytic" else 2
    table = STAGES[stage]["labels"]
    recoded = np.zeros(labels.shape, dtype=np.int64)
    for name, value in zip(names, values):
        recoded[labels == table[name]] = value
    if dtype == "auto":
        low, high = recoded.min(), recoded.max()
        for candidate in (np.uint8, np.int16, np.uint16, np.int32, np.int64):
            if np.iinfo(candidate).min <= low and high <= np.iinfo(candidate).max:
                recoded = recoded.astype(candidate)
                break
    elif dtype in ("float32", "float64"):
        recoded = recoded.astype(dtype)
    elif dtype == "fraction":
        recoded = recoded.astype(np.float32)
        recoded[0, 0, 0] = 0.5
    image = sitk.GetImageFromArray(recoded)
    image.CopyInformation(ct)
    path = case_dir / f"{stage}-labels.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


def _write_plain_seg(case_dir: Path, stage: str, bases: Bases) -> None:
    """A plain NRRD label map (no segment metadata) under the ``.seg.nrrd`` name."""
    ct = sitk.ReadImage(str(bases.cohort / case_dir.name / "ct.nrrd"))
    image = sitk.GetImageFromArray(vertebra_labelmap(ct) if stage == "vertebrae"
                                   else (vertebra_labelmap(ct) > 0).astype(np.uint8))
    image.CopyInformation(ct)
    sitk.WriteImage(image, str(case_dir / f"{stage}.seg.nrrd"), True)


def _mapping_file(recipe: ImportRecipe, root: Path, label_values: dict) -> Path | str | None:
    """Write the recipe's mapping file; return what --mapping gets."""
    if recipe.mapping is None:
        return None
    kind, arg = recipe.mapping
    path = root / "mapping.yaml"
    if kind == "names":
        lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in arg]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "int-keys":
        names = ("T12", "L1", "L2") if recipe.stage == "vertebrae" else ("lytic", "sclerotic")
        values = label_values or {n: v for n, v in zip(names, (19, 20, 21) if recipe.stage == "vertebrae" else (1, 2))}
        pairs = list(values.items())
        if arg == "some":
            pairs = pairs[:1]
        lines = []
        for name, value in pairs:
            key = f'"{value}"' if arg == "strings" else str(value)
            target = "kidney" if arg == "wrong-names" else name
            lines.append(f"{key}: {target}")
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif kind == "text":
        path.write_bytes(arg.encode("utf-8", "surrogateescape"))
    elif arg == "folder":
        path.mkdir()
    elif arg == "dangling":
        path.symlink_to(root / "no-such-mapping.yaml")
    elif arg == "missing":
        pass
    elif arg == "fifo":
        os.mkfifo(path)
    else:
        return "totalsegmentator"
    return path


def _manifest_rows(root: Path, ids: list[str]) -> list[dict]:
    from spinemets.cohort.dataset import DEFAULT_SEGMENTATION_PATTERNS

    rows = []
    for stage, pattern in DEFAULT_SEGMENTATION_PATTERNS.items():
        for case in ids:
            rows.append({"case_id": case, "image": str(root / "cohort" / case / "ct.nrrd"), "stage": stage,
                         "segmentation": str(root / "cohort" / pattern.format(case=case)), "split": "train"})
    return rows


def _write_manifest(path: Path, rows: list[dict], columns: list[str], style: set[str]) -> None:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n",
                            delimiter=";" if "semicolons" in style else ",")
    writer.writeheader()
    if "header-only" not in style:
        for row in rows:
            writer.writerow(row)
    text = buffer.getvalue()
    if "ragged-row" in style:
        text += "only-one-cell\n"
    if "bom" in style:
        text = "\ufeff" + text
    path.write_text(text, encoding="utf-8", errors="surrogatepass")


def build_import(recipe: ImportRecipe, root: Path, bases: Bases) -> fz.Case:
    ids = bases.import_ids[: recipe.n_cases]
    cohort = root / "cohort"
    for case in ids:
        shutil.copytree(bases.cohort / case, cohort / case)
    rows = _manifest_rows(root, ids)
    columns = ["case_id", "image", "stage", "segmentation", "split"]
    style: set[str] = set()
    given: set[str] = set()
    label_values: dict = {}
    stage_rows = [r for r in rows if r["stage"] == recipe.stage]
    manifest = root / "manifest.csv"
    for step in recipe.steps:
        kind = step[0]
        if kind in ("ct", "seg", "labelmap", "labelmap-as-seg"):
            row = stage_rows[step[1] % len(stage_rows)]
            case_dir = cohort / ids[(step[1] % len(stage_rows)) % len(ids)]  # the row's case, whatever its cells say now
        if kind == "ct":
            apply_nrrd_step(case_dir / "ct.nrrd", step[2], root)
        elif kind == "seg":
            seg = case_dir / f"{recipe.stage}.seg.nrrd"
            apply_nrrd_step(seg, step[2], root)
        elif kind == "labelmap":
            names = ("T12", "L1", "L2") if recipe.stage == "vertebrae" else ("lytic", "sclerotic")
            label_values = dict(zip(names, step[2]))
            row["segmentation"] = str(_write_labelmap(case_dir, recipe.stage, step[2], step[3], bases))
        elif kind == "labelmap-as-seg":
            _write_plain_seg(case_dir, recipe.stage, bases)
        else:
            _apply_manifest_step(step[1], stage_rows, rows, columns, style, root, given)
    mapping = _mapping_file(recipe, root, label_values)
    if "manifest-folder" in style:
        manifest.mkdir()
    elif "manifest-dangling" in style:
        manifest.symlink_to(root / "no-such-manifest.csv")
    elif "manifest-empty" in style:
        manifest.write_bytes(b"")
    elif "manifest-fifo" in style:
        os.mkfifo(manifest)
    elif "manifest-loop" in style:
        manifest.symlink_to(manifest.name)
    elif "garbage" in style:
        manifest.write_bytes(b"\x00\xff\xfe" + bytes(range(256)))
    else:
        _write_manifest(manifest, rows, columns, style)
    for row in rows:
        given.update(str(row.get(c, "")) for c in ("image", "segmentation"))
    if recipe.out == "inside-cohort":
        out = cohort / ids[0] / "raw"
    elif recipe.out == "new-folder":
        out = root / "raw"
    else:
        out = output_path({"existing-folder": "existing-folder"}.get(recipe.out, recipe.out), root, "raw", given)
    argv = ["import", "--manifest", str(manifest), "--stage", recipe.stage, "--out", str(out)]
    if mapping is not None:
        argv += ["--mapping", str(mapping)]
    argv += list(recipe.options)
    notes = {"manifest": str(manifest), "mapping": None if mapping is None else str(mapping), "stage": recipe.stage}
    return fz.Case("import", root, argv, out, check_import, given, notes=notes)


def _apply_manifest_step(step: tuple, stage_rows: list[dict], rows: list[dict], columns: list[str],
                         style: set[str], root: Path, given: set[str]) -> None:
    kind = step[0]
    if kind == "id":
        row = stage_rows[step[1] % len(stage_rows)]
        old = row["case_id"]
        for r in rows:  # the same case keeps one ID across its stages
            if r["case_id"] == old:
                r["case_id"] = step[2]
    elif kind == "cell":
        row = stage_rows[step[1] % len(stage_rows)]
        column, what = step[2], step[3]
        path = Path(row[column])
        if what == "folder":
            row[column] = str(path.parent)
        elif what == "missing":
            row[column] = str(path.with_name("missing-" + path.name))
        elif what == "relative":
            row[column] = os.path.relpath(path, root)
        elif what == "dangling":
            link = path.with_name("dangling-" + path.name)
            link.symlink_to(root / "nowhere" / path.name)
            row[column] = str(link)
        elif what == "other-case":
            other = stage_rows[(step[1] + 1) % len(stage_rows)]
            row[column] = other[column]
        elif what == "empty":
            row[column] = ""
        elif what == "seg-for-image":
            row[column] = row["segmentation" if column == "image" else "image"]
    elif kind == "split":
        stage_rows[step[1] % len(stage_rows)]["split"] = step[2]
    elif kind == "stage-cell":
        stage_rows[step[1] % len(stage_rows)]["stage"] = step[2]
    elif kind == "drop-column":
        if step[1] in columns:
            columns.remove(step[1])
    elif kind == "duplicate-row":
        rows.append(dict(stage_rows[0]))
    elif kind == "extra-column":
        columns.append("comment")
        for r in rows:
            r["comment"] = "extra, with a comma"
    elif kind == "all-test":
        for r in stage_rows:
            r["split"] = "test"
    else:
        style.add(kind)


def _read_manifest_reference(path: Path, stage: str) -> list[dict]:
    """The manifest rows of ``stage`` as the reference reads them, with every rule checked."""
    import csv

    if not path.is_file():
        raise fz.Invalid(f"{path}: manifest is not a file")
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = reader.fieldnames or []
    except (UnicodeDecodeError, csv.Error) as exc:
        raise fz.Invalid(f"{path}: manifest unreadable ({exc})") from None
    missing = {"case_id", "image", "stage", "segmentation"} - set(fields)
    if missing:
        raise fz.Invalid(f"{path}: manifest lacks columns {sorted(missing)}")
    if any(None in r or any(v is None for v in r.values()) for r in rows):
        raise fz.Invalid(f"{path}: a manifest row has the wrong number of cells")
    rows = [r for r in rows if r["stage"] == stage]
    if not rows:
        raise fz.Invalid(f"{path}: no rows for {stage}")
    ids = [r["case_id"] for r in rows]
    bad = [i for i in ids if not fz.CASE_ID.match(i)]
    if bad:
        raise fz.Invalid(f"{path}: case IDs {bad[:2]!r} are not plain names")
    if len(set(ids)) != len(ids):
        raise fz.Invalid(f"{path}: a case ID is listed twice")
    for r in rows:
        r.setdefault("split", "train")
        if r["split"] not in ("train", "test"):
            raise fz.Invalid(f"{path}: split {r['split']!r}")
    return rows


def check_import(case: fz.Case) -> None:
    from spinemets.labels import STAGES

    stage = case.notes["stage"]
    rows = _read_manifest_reference(Path(case.notes["manifest"]), stage)
    mapping = None
    if case.notes["mapping"] == "totalsegmentator":
        from spinemets.labels import NAMED_MAPPINGS

        mapping = dict(NAMED_MAPPINGS["totalsegmentator"])
    elif case.notes["mapping"] is not None:
        mapping = fz.load_yaml_mapping(Path(case.notes["mapping"]))
    table = STAGES[stage]
    dataset_id = int(case.argv[case.argv.index("--dataset-id") + 1]) if "--dataset-id" in case.argv \
        else table["dataset_id"]
    if not 1 <= dataset_id <= 999:
        raise fz.Invalid(f"dataset id {dataset_id} is not a three-digit nnU-Net id")
    dataset = case.out / f"Dataset{dataset_id:03d}_{table['dataset_name']}"
    expected_files = {"dataset.json"}
    for row in rows:
        images, labels = ("imagesTs", "labelsTs") if row["split"] == "test" else ("imagesTr", "labelsTr")
        expected_files |= {f"{images}/{row['case_id']}_0000.nii.gz", f"{labels}/{row['case_id']}.nii.gz"}
        image_path = case.root / row["image"]
        ct, grid = fz.read_image_reference(image_path, f"CT {row['image']}")
        fz.check_ct(ct, grid, f"CT {row['image']}")
        labelmap = _reference_labels(case.root / row["segmentation"], grid, stage, mapping)
        if stage == "vertebrae" and not labelmap.any():
            raise fz.Invalid(f"{row['segmentation']}: the vertebra mask is empty after mapping")
        got_ct, got_grid = read_output_image(dataset / f"{images}/{row['case_id']}_0000.nii.gz")
        fz.same_voxels(ct, got_ct, f"{images}/{row['case_id']}_0000.nii.gz")
        grid.same_as(got_grid, f"{images}/{row['case_id']}_0000.nii.gz")
        got_labels, label_grid = read_output_image(dataset / f"{labels}/{row['case_id']}.nii.gz")
        fz.same_voxels(labelmap, got_labels, f"{labels}/{row['case_id']}.nii.gz")
        grid.same_as(label_grid, f"{labels}/{row['case_id']}.nii.gz")
    written = {p.relative_to(dataset).as_posix() for p in dataset.rglob("*.nii.gz")} | {"dataset.json"}
    if written != expected_files:
        raise fz.Mismatch(f"dataset files {sorted(written ^ expected_files)[:4]} differ from the manifest")
    info = json.loads((dataset / "dataset.json").read_text(encoding="utf-8"))
    n_train = sum(r["split"] == "train" for r in rows)
    if info.get("numTraining") != n_train or info.get("labels") != table["labels"]:
        raise fz.Mismatch("dataset.json: numTraining or labels differ from the manifest and the label table")


def _reference_labels(path: Path, grid: fz.Grid, stage: str, mapping: dict | None) -> np.ndarray:
    """The label map a mask should import to: a 3D Slicer file by its segments, else a label map by its values."""
    from spinemets.labels import STAGES

    if str(path).endswith(".seg.nrrd"):
        return fz.decode_segmentation(path, grid, stage, mapping, f"mask {path.name}")
    values, mask_grid = fz.read_image_reference(path, f"mask {path.name}")
    try:
        grid.same_as(mask_grid, f"mask {path.name}")
    except fz.Mismatch as exc:
        raise fz.Invalid(str(exc)) from None
    if values.dtype.kind == "f":
        if not np.isfinite(values).all() or not np.array_equal(values, np.round(values)):
            raise fz.Invalid(f"mask {path.name}: non-integer values")
    if values.min() < 0:
        raise fz.Invalid(f"mask {path.name}: negative values")
    labels = set(STAGES[stage]["labels"].values())
    out = np.zeros(values.shape, dtype=np.uint8)
    for value in np.unique(values):
        value = int(value)
        if value == 0:
            continue
        if not mapping:
            if value not in labels:
                raise fz.Invalid(f"mask {path.name}: value {value} is not a {stage} label")
            label = value
        else:
            target = mapping.get(value, mapping.get(str(value)))
            label = 0 if target is None else fz.label_of_name(str(target), stage)
            if label is None:
                raise fz.Invalid(f"mask {path.name}: value {value} maps to {target!r}")
        out[values == value] = label
    return out


# ---------------------------------------------------------------------------------------------
# evaluate


@dataclass(frozen=True)
class EvaluateRecipe:
    """``evaluate``: predictions of case_a and case_b in ``formats``, ``steps`` applied to files and folders."""

    formats: tuple
    steps: tuple
    out: str
    match: str
    options: tuple = ()


EVAL_FORMATS = st.sampled_from(["nii.gz", "nii.gz", "seg", "seg-swapped", "seg-full", "seg-full-swapped",
                                "seg-overlap", "nrrd"])
EVAL_VALUES = st.sampled_from(["float-half", "float-int", "nan", "inf", "int64-huge", "negative", "label-7",
                               "int64-small", "uint16", "empty", "all-lytic"])
EVAL_GRID = st.sampled_from(["shape", "spacing", "origin-shift", "flip-direction", "2d", "4d"])
EVAL_FOLDER = st.sampled_from(["remove-b", "extra-c", "notes.txt", "hidden", "dangling-c", "folder-b", "empty",
                               "file-instead", "missing", "case-folder-layout", "same-as-ref", "two-files-a"])
#: Odd case IDs, given to case_b in both folders.
EVAL_NAMES = st.sampled_from(["a b", "ü", "x\ny", "a,b", 'q"uote', "-dash", "=1+1", "x" * 240, "a:b", "."])
EVAL_STEPS = st.one_of(
    st.tuples(st.sampled_from(["pred", "ref"]), st.integers(0, 1), FILE_STEPS),
    st.tuples(st.sampled_from(["pred", "ref"]), st.integers(0, 1), st.tuples(st.just("values"), EVAL_VALUES)),
    st.tuples(st.just("pred"), st.integers(0, 1), st.tuples(st.just("grid"), EVAL_GRID)),
    st.tuples(st.just("pred"), st.integers(0, 1), SEGMENT_STEPS),
    st.tuples(st.just("pred"), st.integers(0, 1), st.tuples(st.just("seg-geometry"), GEOMETRY_OPS)),
    st.tuples(st.just("folder"), st.sampled_from(["pred", "ref"]), EVAL_FOLDER),
    st.tuples(st.just("rename"), st.just("both"), EVAL_NAMES),
)


@st.composite
def evaluate_recipes(draw) -> EvaluateRecipe:
    formats = (draw(EVAL_FORMATS), draw(EVAL_FORMATS))
    steps = tuple(draw(st.lists(EVAL_STEPS, min_size=0, max_size=2)))
    out = draw(st.sampled_from(PLAIN + ["existing-folder", "existing-file", "under-file", "inside-ref",
                                        "dangling-link", "long-name", "odd-name", "is-pred"]))
    options = draw(_mostly([()], [("--beta", "0"), ("--beta", "-1"), ("--beta", "nan"), ("--beta", "inf"),
                                  ("--beta", "1e-300"), ("--jobs", "0"), ("--jobs", "2")], share=6))
    return EvaluateRecipe(formats, steps, out, draw(st.sampled_from(["iou", "overlap"])), options)


def _eval_values(array: np.ndarray, kind: str) -> np.ndarray:
    out = array.astype(np.int64) if array.dtype.kind in "iub" else array.copy()
    if kind == "float-half":
        out = array.astype(np.float32)
        out[0, 0, 0] = 0.5
    elif kind == "float-int":
        out = array.astype(np.float32)
    elif kind == "nan":
        out = array.astype(np.float32)
        out[0, 0, 0] = np.nan
    elif kind == "inf":
        out = array.astype(np.float64)
        out[0, 0, 0] = np.inf
    elif kind == "int64-huge":
        out[0, 0, 0] = 2**40
    elif kind == "negative":
        out = out.astype(np.int16)
        out[0, 0, 0] = -1
    elif kind == "label-7":
        out[0, 0, 0] = 7
    elif kind == "uint16":
        out = out.astype(np.uint16)
    elif kind == "empty":
        out[:] = 0
    elif kind == "all-lytic":
        out[:] = 1
    return out


def _rewrite_label_file(path: Path, change) -> None:
    """Apply ``change(image) -> image`` to a NIfTI/NRRD label map (skipped for a damaged file)."""
    image = None if path.name.endswith(".seg.nrrd") else _readable_volume(path)
    if image is not None:
        sitk.WriteImage(change(image), str(path))


def _readable_volume(path: Path) -> sitk.Image | None:
    """The 3-D scalar image in ``path``, or None when an earlier mutation left none to mutate further."""
    if not path.is_file() or path.is_symlink():
        return None
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError:
        return None
    return image if image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1 else None


def _grid_change(image: sitk.Image, kind: str) -> sitk.Image:
    if kind == "shape":
        return image[:, :, :-1]
    if kind == "2d":
        return image[:, :, 0]
    if kind == "4d":
        return sitk.JoinSeries([image, image])
    new = sitk.Image(image)
    if kind == "spacing":
        new.SetSpacing((1.0, 1.0, 3.0))
    elif kind == "origin-shift":
        new.SetOrigin(tuple(o + 0.4 for o in image.GetOrigin()))
    elif kind == "flip-direction":
        new.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
    return new


def build_evaluate(recipe: EvaluateRecipe, root: Path, bases: Bases) -> fz.Case:
    ref_dir, pred_dir = root / "ref", root / "pred"
    shutil.copytree(bases.evaluate / "ref", ref_dir)
    pred_dir.mkdir()
    cases = ("case_a", "case_b")
    pred_files = {}
    for case, fmt in zip(cases, recipe.formats):
        if fmt == "nii.gz":
            target = pred_dir / f"{case}.nii.gz"
            shutil.copy(bases.evaluate / "pred" / f"{case}.nii.gz", target)
        elif fmt == "nrrd":
            target = pred_dir / f"{case}.nrrd"
            sitk.WriteImage(sitk.ReadImage(str(bases.evaluate / "pred" / f"{case}.nii.gz")), str(target), True)
        else:
            target = pred_dir / f"{case}.seg.nrrd"
            shutil.copy(bases.evaluate / fmt / f"{case}.seg.nrrd", target)
        pred_files[case] = target
    pred_arg, ref_arg = pred_dir, ref_dir
    given: set[str] = set()
    for side, which, step in ((s[0], s[1], s[2]) for s in recipe.steps):
        if side == "folder":
            pred_arg, ref_arg = _eval_folder_step(which, step, root, ref_dir, pred_dir, pred_arg, ref_arg)
            continue
        if side == "rename":
            _rename_case(ref_dir, pred_dir, pred_files, step)
            continue
        case = cases[which]
        path = pred_files[case] if side == "pred" else ref_dir / f"{case}.nii.gz"
        if not path.parent.is_dir():
            continue
        kind = step[0]
        if kind in FILE_KINDS:
            if os.path.lexists(path) and path.is_file():
                apply_file_step(path, step, root)
        elif kind == "values":
            def change(image, kind=step[1]):
                new = sitk.GetImageFromArray(_eval_values(sitk.GetArrayFromImage(image), kind))
                new.CopyInformation(image)
                return new
            _rewrite_label_file(path, change)
        elif kind == "grid":
            _rewrite_label_file(path, lambda image, k=step[1]: _grid_change(image, k))
        elif kind == "seg-geometry":
            if path.name.endswith(".seg.nrrd") and path.is_file():
                apply_nrrd_step(path, ("geometry", step[1]), root)
        elif path.name.endswith(".seg.nrrd") and path.is_file():
            apply_nrrd_step(path, step, root)
    if recipe.out == "inside-ref":
        out = ref_dir / "scores"
    elif recipe.out == "is-pred":
        out = pred_dir
    elif recipe.out == "new-folder":
        out = root / "scores"
    else:
        out = output_path(recipe.out, root, "scores", given)
    argv = ["evaluate", "--ref", str(ref_arg), "--pred", str(pred_arg), "--stage", "metastases", "--out", str(out),
            "--match", recipe.match, *recipe.options]
    return fz.Case("evaluate", root, argv, out, check_evaluate, given,
                   notes={"ref": str(ref_arg), "pred": str(pred_arg)})


def _eval_folder_step(side: str, op: str, root: Path, ref_dir: Path, pred_dir: Path, pred_arg: Path,
                      ref_arg: Path) -> tuple[Path, Path]:
    folder = pred_dir if side == "pred" else ref_dir
    if not folder.is_dir() or folder.is_symlink():  # an earlier step removed it
        return pred_arg, ref_arg
    try:
        return _folder_step(side, op, root, folder, ref_dir, pred_dir, pred_arg, ref_arg)
    except OSError:  # the step collides with an earlier one (a name already taken ...): it does nothing
        return pred_arg, ref_arg


def _folder_step(side: str, op: str, root: Path, folder: Path, ref_dir: Path, pred_dir: Path, pred_arg: Path,
                 ref_arg: Path) -> tuple[Path, Path]:
    b = next((p for p in sorted(folder.iterdir()) if p.name.startswith("case_b")), None)
    if op == "remove-b" and b is not None:
        _remove(b)
    elif op == "extra-c":
        shutil.copy(ref_dir / "case_a.nii.gz" if (ref_dir / "case_a.nii.gz").is_file()
                    else bases_fallback(root), folder / "case_c.nii.gz")
    elif op == "notes.txt":
        (folder / "notes.txt").write_text("not a label map\n")
    elif op == "hidden":
        (folder / ".case_z.nii.gz").write_bytes(b"hidden and ignored")
    elif op == "dangling-c":
        (folder / "case_c.nii.gz").symlink_to(root / "missing" / "case_c.nii.gz")
    elif op == "folder-b" and b is not None:
        _remove(b)
        b.mkdir()
    elif op == "empty":
        for p in folder.iterdir():
            _remove(p)
    elif op == "file-instead":
        _remove(folder)
        folder.write_text("a file where a folder is expected\n")
    elif op == "missing":
        _remove(folder)
    elif op == "case-folder-layout" and b is not None and b.is_file():
        suffix = b.name[len("case_b"):]
        inner = folder / "case_b" / f"metastases{suffix}"
        tmp = folder / f"moving{suffix}"
        b.rename(tmp)
        inner.parent.mkdir()
        tmp.rename(inner)
    elif op == "same-as-ref":
        if side == "pred":
            pred_arg = ref_dir
        else:
            ref_arg = pred_dir
    elif op == "two-files-a":
        shutil.copy(ref_dir / "case_a.nii.gz" if (ref_dir / "case_a.nii.gz").is_file()
                    else bases_fallback(root), folder / "case_a.nrrd.nii")
        if (folder / "case_a.nii.gz").exists():
            shutil.copy(folder / "case_a.nii.gz", folder / "case_a.nii")
    return pred_arg, ref_arg


def _rename_case(ref_dir: Path, pred_dir: Path, pred_files: dict, name: str) -> None:
    """Give case_b another case ID in both folders (a name the file system refuses leaves it as it is)."""
    for folder in (ref_dir, pred_dir):
        if not folder.is_dir() or folder.is_symlink():
            continue
        for path in list(folder.iterdir()):
            if path.name.startswith("case_b.") and (path.is_file() or path.is_symlink()):
                target = folder / (name + path.name[len("case_b"):])
                try:
                    path.rename(target)
                except OSError:
                    continue
                if pred_files.get("case_b") == path:
                    pred_files["case_b"] = target


def bases_fallback(root: Path) -> Path:
    """A small valid label map for folder steps whose usual source was damaged by an earlier step."""
    path = root / "spare" / "label.nii.gz"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        sitk.WriteImage(sitk.Image([12, 10, 8], sitk.sitkUInt8), str(path))
    return path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


SUFFIXES = (".seg.nrrd", ".nii.gz", ".nrrd", ".nii", ".mha")


def _reference_case_files(folder: Path, what: str) -> dict[str, Path]:
    """Case ID -> label-map entry of a folder: flat files, or CASE/metastases.* folders; nothing is skipped
    silently (a dangling link or unreadable entry named like a label map is an error)."""
    if not folder.is_dir():
        raise fz.Invalid(f"{what}: {folder} is not a folder")
    cases: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        found = []
        if entry.is_dir():
            inner = [p for p in sorted(entry.iterdir()) if any(p.name.lower() == f"metastases{s}" for s in SUFFIXES)]
            if not inner and any(entry.name.lower().endswith(s) for s in SUFFIXES):
                raise fz.Invalid(f"{what}: {entry.name} is a folder named like a label map")
            found = [(entry.name, p) for p in inner]
        else:
            suffix = next((s for s in SUFFIXES if entry.name.lower().endswith(s) and len(entry.name) > len(s)), None)
            if suffix:
                found = [(entry.name[: -len(suffix)], entry)]
        for cid, path in found:
            if cid in cases:
                raise fz.Invalid(f"{what}: two files for case {cid}")
            if not path.is_file():
                raise fz.Invalid(f"{what}: {path.name} is a dangling link")
            cases[cid] = path
    if not cases:
        raise fz.Invalid(f"{what}: no label maps")
    return cases


def _reference_label_array(path: Path, grid: fz.Grid | None, what: str) -> tuple[np.ndarray, fz.Grid]:
    if path.name.endswith(".seg.nrrd"):
        if grid is None:  # a 3D Slicer reference defines the grid itself: its own voxel grid
            if not path.is_file():
                raise fz.Invalid(f"{what}: no such file (or a dangling link)")
            voxels, header = fz.read_nrrd(path, what)
            grid = fz.nrrd_grid(header, voxels.shape, what)
        return fz.decode_segmentation(path, grid, "metastases", None, what), grid
    array, own = fz.read_image_reference(path, what)
    if array.dtype.kind == "f":
        if not np.isfinite(array).all() or not np.array_equal(array, np.round(array)):
            raise fz.Invalid(f"{what}: non-integer labels")
    elif array.dtype.kind not in "iub":
        raise fz.Invalid(f"{what}: voxel type {array.dtype}")
    if array.size == 0 or array.min() < 0 or array.max() > 2:
        raise fz.Invalid(f"{what}: values outside 0..2")
    return array.astype(np.uint8), own


def check_evaluate(case: fz.Case) -> None:
    if "--beta" in case.argv:
        beta = float(case.argv[case.argv.index("--beta") + 1])
        if not (np.isfinite(beta) and beta > 0):
            raise fz.Invalid(f"--beta {beta} is not a positive number")
    if "--jobs" in case.argv and int(case.argv[case.argv.index("--jobs") + 1]) < 1:
        raise fz.Invalid("--jobs below 1")
    refs = _reference_case_files(Path(case.notes["ref"]), "reference folder")
    preds = _reference_case_files(Path(case.notes["pred"]), "prediction folder")
    if set(refs) != set(preds):
        raise fz.Invalid(f"unpaired cases {sorted(set(refs) ^ set(preds))}")
    expected = {}
    for cid in sorted(refs):
        ref_what, pred_what = f"reference {refs[cid].name}", f"prediction {preds[cid].name}"
        if refs[cid].name.endswith(".seg.nrrd") and not preds[cid].name.endswith(".seg.nrrd"):
            # a 3D Slicer reference (cropped) is placed on the grid of the prediction image
            pred, grid = _reference_label_array(preds[cid], None, pred_what)
            grid.check_sane(pred_what)
            ref, _ = _reference_label_array(refs[cid], grid, ref_what)
            pred_grid = grid
        else:
            ref, grid = _reference_label_array(refs[cid], None, ref_what)
            grid.check_sane(ref_what)
            pred, pred_grid = _reference_label_array(preds[cid], grid, pred_what)
        try:
            grid.same_as(pred_grid, pred_what)
        except fz.Mismatch as exc:
            raise fz.Invalid(str(exc)) from None
        for name, value in (("lytic", 1), ("sclerotic", 2)):
            a, b = ref == value, pred == value
            denominator = int(a.sum() + b.sum())
            expected[(cid, name)] = 2 * int((a & b).sum()) / denominator if denominator else float("nan")
    summary = case.out / "summary.json"
    try:
        document = json.loads(summary.read_text(encoding="utf-8"))
        rows = fz.read_csv_rows(case.out / "per_case.csv")
    except (OSError, ValueError) as exc:
        raise fz.Mismatch(f"summary.json or per_case.csv unreadable: {exc}") from None
    if document.get("n_cases") != len(refs):
        raise fz.Mismatch(f"summary.json counts {document.get('n_cases')} cases, the folders hold {len(refs)}")
    got = {(r["case"], r["class"]): float(r["value"]) for r in rows if r["metric"] == "dice"}
    for key, value in expected.items():
        if key not in got:
            raise fz.Mismatch(f"per_case.csv has no Dice for {key}")
        if not (np.isnan(value) and np.isnan(got[key])) and not np.isclose(value, got[key], atol=1e-9):
            raise fz.Mismatch(f"Dice of {key} is {got[key]!r}; numpy on the files gives {value!r}")
    if set(got) != set(expected):
        raise fz.Mismatch(f"per_case.csv scores cases {sorted(set(got) - set(expected))[:3]} not in the folders")


# ---------------------------------------------------------------------------------------------
# scan


@dataclass(frozen=True)
class ScanRecipe:
    """``scan``: the cohort folder with ``steps`` applied to its layout, and the scan options."""

    steps: tuple
    holdout: int
    image: str | None
    out: str
    segmentation: str | None = None


ODD_NAMES = ["case 004", "cäse_005", "-x", ".hidden", "a\nb", "x" * 200, "a:b", "a;b", "%41", "$HOME", "*",
             "?", "[ab]", "a\\b", "Ω", "..x", "x..", "🙂", "con", "a\tb", "a\x7fb", "ok_006"]
SCAN_STEPS = st.one_of(
    st.tuples(st.sampled_from(["rename", "add-case", "dangling-case", "file-as-case", "empty-folder"]),
              st.integers(0, 2), st.sampled_from(ODD_NAMES)),
    st.tuples(st.just("link-case"), st.integers(0, 2), st.sampled_from(["linked_007", "Ω-link"])),
    st.tuples(st.sampled_from(["dangling-ct", "ct-folder", "remove-ct", "remove-seg", "dangling-seg",
                               "seg-folder"]), st.integers(0, 2)),
    st.sampled_from([("root", "file"), ("root", "missing"), ("root", "empty"), ("root", "dangling")]),
)


@st.composite
def scan_recipes(draw) -> ScanRecipe:
    steps = tuple(draw(st.lists(SCAN_STEPS, min_size=0, max_size=3)))
    holdout = draw(st.sampled_from([0, 0, 0, 1, 2, 5, -1]))
    image = draw(st.sampled_from([None, None, None, "{case}/*.nrrd", "ct.nrrd", "{case}/{case}", "{case}/ct.nrrd"]))
    out = draw(st.sampled_from(PLAIN + ["beside", "existing-file", "existing-folder", "under-file",
                                        "inside-root", "dangling-link", "long-name", "odd-name"]))
    segmentation = draw(_mostly([None], ["metastases={case}/metastases.seg.nrrd", "kidney={case}/x.nrrd",
                                         "metastases={case}", "metastases=", "=x", "metastases"], share=6))
    return ScanRecipe(steps, holdout, image, out, segmentation)


def build_scan(recipe: ScanRecipe, root: Path, bases: Bases) -> fz.Case:
    cohort = root / "cohort"
    shutil.copytree(bases.cohort, cohort)
    cases = sorted(p.name for p in cohort.iterdir())
    given: set[str] = set()
    for step in recipe.steps:
        kind = step[0]
        if kind == "root":
            _remove(cohort)
            if step[1] == "file":
                cohort.write_text("a file where the cohort folder is expected\n")
            elif step[1] == "empty":
                cohort.mkdir()
            elif step[1] == "dangling":
                cohort.symlink_to(root / "no-such-cohort")
            continue
        if not cohort.is_dir() or cohort.is_symlink():
            continue
        existing = sorted(p for p in cohort.iterdir() if p.is_dir() and not p.is_symlink())
        source = existing[step[1] % len(existing)] if existing else None
        try:
            _scan_step(kind, step, cohort, source, root)
        except OSError:  # a name the file system refuses (too long ...): the step is a no-op
            pass
    out = {"inside-root": cohort / "manifest.csv", "new-folder": root / "out" / "manifest.csv"}.get(recipe.out)
    if out is None:
        out = output_path(recipe.out, root, "manifest.csv", given)
    argv = ["scan", str(cohort), "--out", str(out)]
    if recipe.holdout:
        argv += ["--holdout", str(recipe.holdout)]
    if recipe.image:
        argv += ["--image", recipe.image]
    if recipe.segmentation:
        argv += ["--segmentation", recipe.segmentation]
    return fz.Case("scan", root, argv, out, check_scan, given, notes={"cases": cases})


def _scan_step(kind: str, step: tuple, cohort: Path, source: Path | None, root: Path) -> None:
    if kind == "rename" and source is not None:
        source.rename(cohort / step[2])
    elif kind == "add-case" and source is not None:
        shutil.copytree(source, cohort / step[2])
    elif kind == "dangling-case":
        (cohort / step[2]).symlink_to(root / "no-such-case")
    elif kind == "file-as-case":
        (cohort / step[2]).write_text("a file where a case folder is expected\n")
    elif kind == "empty-folder":
        (cohort / step[2]).mkdir(exist_ok=True)
    elif kind == "link-case" and source is not None:
        (cohort / step[2]).symlink_to(source)
    elif source is not None:
        name = "ct.nrrd" if "ct" in kind else "metastases.seg.nrrd"
        path = source / name
        if kind in ("dangling-ct", "dangling-seg", "ct-folder", "seg-folder") and path.is_file():
            apply_file_step(path, ("dangling-link",) if kind.startswith("dangling") else ("folder",), root)
        elif kind in ("remove-ct", "remove-seg") and os.path.lexists(path):
            _remove(path)


def check_scan(case: fz.Case) -> None:
    import csv

    try:
        with open(case.out, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            fields = reader.fieldnames or []
    except (OSError, UnicodeDecodeError) as exc:
        raise fz.Mismatch(f"manifest unreadable: {exc}") from None
    if fields[:5] != ["case_id", "image", "stage", "segmentation", "split"]:
        raise fz.Mismatch(f"manifest columns {fields}")
    if not rows:
        raise fz.Mismatch("manifest has no rows")
    for row in rows:
        if not fz.CASE_ID.match(row["case_id"] or ""):
            raise fz.Mismatch(f"case ID {row['case_id']!r} is not a plain name")
        for column in ("image", "segmentation"):
            path = Path(row[column])
            path = path if path.is_absolute() else case.root / path
            if not path.is_file():
                raise fz.Mismatch(f"{column} {row[column]!r} of {row['case_id']} is not an existing file")
        if row["split"] not in ("train", "test"):
            raise fz.Mismatch(f"split {row['split']!r}")


# ---------------------------------------------------------------------------------------------
# fetch


@dataclass(frozen=True)
class FetchRecipe:
    """``fetch``: record 1 listing ``entries`` (name, size, checksum, listed size, link, content)."""

    entries: tuple
    record: str
    out: str


ENTRY_NAMES = ["a.txt", "sub/b.bin", "../x", "/abs/x", "C:x", "a\\b", "", ".", "..", "ü-ñ.txt", "x" * 300,
               "a\x00b", "a\nb", ".partial-a", "download.json", " space .txt", "dir/", "./a.txt", "a//b",
               "deep/er/c.dat", "%2e%2e/x", "q?x#y", 5, None, ["a"]]
def _mostly(valid: list, odd: list, share: int = 4):
    """Draw from ``valid`` about ``share`` times as often as from ``odd`` (which may repeat the valid ones)."""
    return st.sampled_from(valid * max(1, share * len(odd) // len(valid)) + odd)


#: One file of the record: name, size in bytes, checksum, listed size, link. The valid choice of
#: each part is drawn most of the time, so that whole records are often valid.
ENTRY = st.tuples(
    _mostly(["a.txt", "sub/b.bin", "deep/er/c.dat", "ü-ñ.txt", " space .txt", "q?x#y", "dir/", "./a.txt"],
            ENTRY_NAMES),
    st.integers(0, 3000),
    _mostly(["md5", "sha256", "bare-md5", "upper"], ["missing", "wrong", "malformed", "sha1", "int", "empty"]),
    _mostly(["right", "right", "missing"], ["huge", "negative", "string", "float", "bool", "small"]),
    _mostly(["self", "content", "download", "none", "links-string"], ["other", "404", "relative", "unreachable",
                                                                     "ftp", "self-int", "self-list"]),
    _mostly(["bytes"], ["zip-ok", "tar-ok", "zip-evil", "zip-abs", "tar-link", "zip-truncated", "zip-collide",
                        "zip-reserved"], share=3),
)
#: Members of the archives a record may hold (by content kind).
ARCHIVES = {
    "zip-ok": {"inner/a1.txt": b"alpha\n", "b1.txt": b"beta\n"},
    "tar-ok": {"t/a2.txt": b"gamma\n", "b2.txt": b"delta\n"},
    "zip-evil": {"../evil.txt": b"outside\n"},
    "zip-abs": {"/abs.txt": b"absolute\n"},
    "zip-truncated": {"inner/a1.txt": b"alpha\n" * 200},
    "zip-collide": {"a.txt": b"the archive's own a.txt\n"},
    "zip-reserved": {".partial-x": b"reserved\n"},
}


@st.composite
def fetch_recipes(draw) -> FetchRecipe:
    entries = tuple(draw(st.lists(ENTRY, min_size=1, max_size=3, unique_by=lambda e: repr(e[0]))))
    record = draw(st.sampled_from(["ok"] * 8 + ["entries-list", "entries-dict", "files-null", "files-string",
                                               "files-empty", "no-files", "not-object", "not-json",
                                               "metadata-string", "500"]))
    out = draw(st.sampled_from(PLAIN + ["existing-folder", "existing-file", "under-file", "stale-file",
                                        "dangling-link", "long-name", "odd-name"]))
    return FetchRecipe(entries, record, out)


def _entry_json(entry: tuple, index: int, fake: FakeZenodo, served: dict) -> dict:
    import hashlib

    name, size, checksum, size_kind, link, content = entry
    data = bytes((index * 31 + i) % 251 for i in range(size))
    if content != "bytes":
        from fakes import tar_gz_bytes, zip_bytes

        name = f"archive{index}.tar.gz" if content.startswith("tar") else f"archive{index}.zip"
        if content == "tar-ok":
            data = tar_gz_bytes(ARCHIVES[content])
        elif content == "tar-link":
            data = tar_gz_bytes({"t/a.txt": b"x\n"}, symlinks={"t/link": "/etc/passwd"})
        else:
            data = zip_bytes(ARCHIVES[content])
            if content == "zip-truncated":
                data = data[: len(data) // 2]
    key = name if isinstance(name, str) else f"f{index}"
    blob_path = FakeZenodo.file_path(1, key)
    fake.blobs[blob_path] = data
    served[index] = (blob_path, data)
    md5, sha = hashlib.md5(data).hexdigest(), hashlib.sha256(data).hexdigest()
    value = {"md5": f"md5:{md5}", "sha256": f"sha256:{sha}", "bare-md5": md5, "upper": f"md5:{md5.upper()}",
             "wrong": "md5:" + "0" * 32, "malformed": "md5:xyz", "sha1": "sha1:" + "a" * 40, "int": 5,
             "empty": ""}.get(checksum)
    out: dict = {"id": f"f{index}", "key": name}
    if checksum != "missing":
        out["checksum"] = value
    sizes = {"right": len(data), "huge": 10**15, "negative": -1, "string": str(len(data)), "float": float(len(data)),
             "bool": True, "small": max(0, len(data) - 1)}
    if size_kind != "missing":
        out["size"] = sizes[size_kind]
    url = fake.base + blob_path
    links = {"self": {"self": url}, "content": {"content": url}, "download": {"download": url}, "none": None,
             "other": {"self": fake.base + FakeZenodo.file_path(1, "other.bin")},
             "404": {"self": fake.base + FakeZenodo.file_path(1, "no-such-file")},
             "relative": {"self": f"files/{quote(key)}/content"},
             "unreachable": {"self": "http://127.0.0.1:9/unreachable"}, "links-string": url,
             "ftp": {"self": "ftp://127.0.0.1/file"}, "self-int": {"self": 5}, "self-list": {"self": [url]}}[link]
    if links is not None:
        out["links"] = links
    if link == "other":
        other = bytes(range(40))
        fake.blobs[FakeZenodo.file_path(1, "other.bin")] = other
        served[index] = (FakeZenodo.file_path(1, "other.bin"), other)
    elif link in ("404", "relative", "unreachable", "ftp"):
        served[index] = (None, None)
    if content != "bytes":
        out["key"] = name
    return out


def build_fetch(recipe: FetchRecipe, root: Path, fake: FakeZenodo) -> fz.Case:
    for store in (fake.records, fake.blobs, fake.faults, fake.forever):
        store.clear()
    fake.requests.clear()
    served: dict = {}
    files = [_entry_json(entry, i, fake, served) for i, entry in enumerate(recipe.entries)]
    record: object = {"id": 1, "doi": "10.5281/zenodo.1", "metadata": {"title": "Fuzz record"}, "files": files}
    if recipe.record == "entries-list":
        record["files"] = {"entries": files}
    elif recipe.record == "entries-dict":
        record["files"] = {"entries": {str(f.get("key")): f for f in files}}
    elif recipe.record in ("files-null", "files-string", "files-empty"):
        record["files"] = {"files-null": None, "files-string": "a.txt", "files-empty": []}[recipe.record]
    elif recipe.record == "no-files":
        del record["files"]
    elif recipe.record == "not-object":
        record = [record]
    elif recipe.record == "metadata-string":
        record["metadata"] = "not an object"
    body = b"<html>maintenance</html>" if recipe.record == "not-json" else json.dumps(record).encode()
    fake.blobs["/api/records/1"] = body
    if recipe.record == "500":
        fake.fail("/api/records/1", "500", forever=True)
    given: set[str] = set()
    if recipe.out == "stale-file":
        out = root / "download"
        out.mkdir()
        (out / "a.txt").write_bytes(b"stale content from an older download\n")
    elif recipe.out == "new-folder":
        out = root / "download"
    else:
        out = output_path(recipe.out, root, "download", given)
    argv = ["fetch", "--record", "1", "--out", str(out), "--api-url", fake.api_url, "--retries", "0",
            "--backoff", "0"]
    for entry in files:  # the links the record lists are addresses of this case too
        links = entry.get("links")
        given.update(v for v in (links.values() if isinstance(links, dict) else [links]) if isinstance(v, str))
    notes = {"entries": recipe.entries, "record": recipe.record, "served": {i: s[0] for i, s in served.items()}}
    case = fz.Case("fetch", root, argv, out, lambda c: check_fetch(c, recipe, served), given,
                   url_prefix=fake.base, notes=notes,
                   kept_after_failure=lambda c: kept_fetch_files(c, recipe, served))
    return case


def kept_fetch_files(case: fz.Case, recipe: FetchRecipe, served: dict) -> str | None:
    """After a failed fetch into a new folder, only complete files of the record may stay (verified,
    for the next try to skip): each file's bytes are those served under its name."""
    from pathlib import PurePosixPath

    names = {}
    for index, entry in enumerate(recipe.entries):
        if index in served:
            name = entry[0] if entry[5] == "bytes" else (
                f"archive{index}.tar.gz" if entry[5].startswith("tar") else f"archive{index}.zip")
            names[PurePosixPath(name).as_posix()] = served[index][1]  # the path written: 'a\\b' is one name
    for path in sorted(Path(case.out).rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue
        rel = path.relative_to(case.out).as_posix()
        if not path.is_file() or path.is_symlink():
            return f"{rel} is not a regular file"
        if names.get(rel) != path.read_bytes():
            return f"{rel} is not a complete file of the record"
    return None


def check_fetch(case: fz.Case, recipe: FetchRecipe, served: dict) -> None:
    """Every file the record lists is in --out with the bytes served (and verified by its checksum);
    the members of its archives are unpacked beside them."""
    from pathlib import PurePosixPath

    if recipe.record not in ("ok", "entries-list", "entries-dict", "metadata-string"):
        raise fz.Invalid(f"record answer {recipe.record!r} lists no files")
    expected: dict[str, bytes] = {}
    paths: set[str] = set()
    members: dict[str, bytes] = {}
    for index, (name, _size, checksum, size_kind, link, content) in enumerate(recipe.entries):
        if content != "bytes":
            name = f"archive{index}.tar.gz" if content.startswith("tar") else f"archive{index}.zip"
            if content not in ("zip-ok", "tar-ok", "zip-collide"):
                raise fz.Invalid(f"entry {index}: archive {content} is unsafe or damaged")
            members.update(ARCHIVES[content])
        if link in ("self-int", "self-list"):
            raise fz.Invalid(f"entry {index}: its link is not a URL")
        if not isinstance(name, str) or not name or "\x00" in name:
            raise fz.Invalid(f"entry {index}: name {name!r}")
        pure = PurePosixPath(name.replace("\\", "/"))
        if pure.is_absolute() or ".." in pure.parts or not pure.parts or name[1:2] == ":" \
                or any(p.startswith(fz.PARTIAL_PREFIX) for p in pure.parts) or pure.parts == ("download.json",):
            raise fz.Invalid(f"entry {index}: name {name!r} leaves the folder or is reserved")
        _, data = served[index]
        if data is None:
            raise fz.Invalid(f"entry {index}: its link serves nothing")
        if checksum in ("missing", "malformed", "sha1", "int", "empty"):
            raise fz.Invalid(f"entry {index}: checksum {checksum}")
        if checksum == "wrong" or link == "other":
            raise fz.Invalid(f"entry {index}: the bytes served do not match the listed checksum")
        if size_kind in ("huge", "negative", "string", "float", "bool", "small"):
            raise fz.Invalid(f"entry {index}: size {size_kind}")
        if pure.as_posix() in paths:  # 'a.txt' and './a.txt' (or 'a//b' and 'a\\b') would overwrite each other
            raise fz.Invalid("two entries name one file")
        paths.add(pure.as_posix())
        expected[name] = data
    clash = sorted(set(members) & ({PurePosixPath(n).as_posix() for n in expected} | {"download.json"}))
    if clash:
        raise fz.Invalid(f"archive members {clash} would overwrite files of the record")
    for name, data in {**expected, **members}.items():
        target = case.out / name
        if not target.is_file() or target.read_bytes() != data:
            raise fz.Mismatch(f"{name!r} is missing from --out or differs from the bytes served")
    try:
        json.loads((case.out / "download.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise fz.Mismatch(f"download.json unreadable: {exc}") from None


# ---------------------------------------------------------------------------------------------
# the tests


STRATEGIES = {"convert": convert_recipes(), "import": import_recipes(), "evaluate": evaluate_recipes(),
              "scan": scan_recipes(), "fetch": fetch_recipes()}


def _build(command: str, recipe, root: Path, bases: Bases, zenodo: FakeZenodo) -> fz.Case:
    if command == "fetch":
        return build_fetch(recipe, root, zenodo)
    return {"convert": build_convert, "import": build_import, "evaluate": build_evaluate,
            "scan": build_scan}[command](recipe, root, bases)


def fuzz(command: str, n: int, bases: Bases, zenodo: FakeZenodo, run: str, say=fz.print_line) -> None:
    """Draw ``n`` recipes for ``command``, run and check each; fail with a grouped report if any broke."""
    survey = fz.Survey(command)

    @_settings(n)
    @given(recipe=STRATEGIES[command])
    def one_case(recipe):
        with tempfile.TemporaryDirectory(prefix=f"spinemets-fuzz-{command}-") as tmp:
            root = Path(tmp).resolve()
            case = _build(command, recipe, root, bases, zenodo)
            result = fz.check_case(case)
            survey.add(recipe, result)
            if SHRINK and not result.passed:
                raise AssertionError("\n".join(result.problems) + "\nstderr: " + result.outcome.stderr[-2000:])

    try:
        one_case()
    finally:
        fz.write_report(survey, run)
        say(f"[fuzz {run}] {command}: {survey.generated} cases generated, {survey.passed} passed, "
                      f"{survey.generated - survey.passed} failed ({len(survey.failures)} failure signatures), "
                      f"{time.monotonic() - survey.started:.0f} s")
    assert survey.passed == survey.generated, survey.report()


@pytest.mark.parametrize("command", list(DEFAULT_EXAMPLES))
def test_cli_keeps_the_invariant(command, bases, zenodo, say):
    """The default run: DEFAULT_EXAMPLES cases per command."""
    fuzz(command, DEFAULT_EXAMPLES[command], bases, zenodo, "default", say)


@pytest.mark.fuzz
@pytest.mark.slow  # the long run: out of the fast loop (pytest -m "not slow") too
@pytest.mark.parametrize("command", list(DEFAULT_EXAMPLES))
def test_cli_keeps_the_invariant_long(command, bases, zenodo, say):
    """The long run (``pytest -m fuzz``): SPINEMETS_FUZZ_EXAMPLES cases in all (default 3000)."""
    total = sum(DEFAULT_EXAMPLES.values())
    fuzz(command, max(1, round(LONG_TOTAL * DEFAULT_EXAMPLES[command] / total)), bases, zenodo, "long", say)


# ---------------------------------------------------------------------------------------------
# the checker itself


def test_error_line_rules(tmp_path):
    """One error line naming a path of the case passes; option names, two lines, or stray lines do not."""
    (tmp_path / "in.nrrd").write_bytes(b"")
    case = fz.Case("convert", tmp_path, ["convert", str(tmp_path / "in.nrrd"), "--out", str(tmp_path / "o.nii")],
                   tmp_path / "o.nii", lambda c: None)
    good = f"INFO reading\nspinemets: error: {tmp_path / 'in.nrrd'}: truncated\n"
    assert fz.error_line_problem(case, good) is None
    assert fz.error_line_problem(case, f"spinemets: error: {tmp_path / 'o.nii'}: cannot write\n") is None
    assert fz.error_line_problem(case, "spinemets: error: --out: must be a file\n") is None  # an option given
    assert fz.error_line_problem(case, "spinemets: error: --beta: must be positive\n")  # an option not given
    assert fz.error_line_problem(case, good + good)
    assert fz.error_line_problem(case, good + "  a second line of the message\n")
    assert fz.error_line_problem(case, f"spinemets: error: {tmp_path / 'elsewhere'}: not found\n")
    (tmp_path / "tab\there.nrrd").write_bytes(b"")  # named escaped, it still fits on one line
    assert fz.error_line_problem(case, f"spinemets: error: {tmp_path}/tab\\there.nrrd: truncated\n") is None
    assert fz.error_line_problem(case, f"spinemets: error: {tmp_path}/tab here.nrrd: truncated\n")


def test_snapshot_sees_links_and_changes(tmp_path):
    (tmp_path / "a").write_text("1")
    (tmp_path / "link").symlink_to(tmp_path / "missing")
    before = fz.snapshot(tmp_path, [])
    assert before["link"][0] == "link"
    (tmp_path / "a").write_text("2")
    assert fz.snapshot(tmp_path, []) != before
    assert fz.snapshot(tmp_path, [tmp_path / "a"]) == {k: v for k, v in before.items() if k != "a"}


def test_reference_decoder_reads_a_cropped_layered_segmentation(bases):
    """The independent decoder gives back the lesion labels of a synthetic case (two layers, cropped)."""
    import nrrd

    ct = bases.cohort / "case_003" / "ct.nrrd"
    array, header = nrrd.read(str(ct))
    grid = fz.nrrd_grid(header, array.shape, "CT")
    labels = fz.decode_segmentation(bases.cohort / "case_003" / "metastases.seg.nrrd", grid, "metastases", None, "seg")
    lesions = dict(_lesion_masks(sitk.ReadImage(str(ct)), 3))
    lytic, blastic = lesions["Lytic"].transpose(2, 1, 0), lesions["blastic"].transpose(2, 1, 0)
    assert set(np.unique(labels)) == {0, 1, 2}
    assert (labels[blastic] == 2).all()  # the smaller segment wins where the two overlap
    assert (labels[lytic & ~blastic] == 1).all()
    assert not labels[~(lytic | blastic)].any()
