"""Synthetic cohort: reproducibility, genuine Slicer files, exact import, anatomy and HU realism."""

from __future__ import annotations

import csv
import filecmp
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from spinemets import labels

from spinemets.cohort import synth
from spinemets.errors import SpinemetsError
from spinemets.formats.slicer import labelmap_from_segmentation

SEED = 7
N_CASES = 3  # one case per annotator style
FILES = ("ct.nrrd", "vertebrae.seg.nrrd", "metastases.seg.nrrd")
T = synth.TISSUES
BONE = (T["cortical"], T["cancellous"])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    synth.synthesize_cohort(out, cases=N_CASES, seed=SEED, preset="demo")
    return out


@pytest.fixture(scope="module")
def cases() -> list[dict]:
    return [synth.synthesize_case(i, SEED, "demo") for i in range(N_CASES)]


@pytest.fixture(scope="module")
def many() -> list[dict]:
    """More demo cases (another seed) for statistics over the cohort."""
    return [synth.synthesize_case(i, 11, "demo") for i in range(21)]


def _all_files(folder: Path) -> list[Path]:
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_same_seed_gives_identical_bytes_whatever_the_jobs(cohort, tmp_path):
    again = tmp_path / "again"
    synth.synthesize_cohort(again, cases=N_CASES, seed=SEED, preset="demo", jobs=2)
    names = _all_files(cohort)
    assert names == _all_files(again)
    assert {"cohort.csv", "lesions_truth.csv", "synth.json"} <= {str(n) for n in names}
    for name in names:
        assert filecmp.cmp(cohort / name, again / name, shallow=False), name


def test_another_seed_gives_other_data(cohort, tmp_path):
    other = tmp_path / "other"
    synth.synthesize_cohort(other, cases=1, seed=SEED + 1, preset="demo")
    for name in FILES:
        assert not filecmp.cmp(cohort / "case_001" / name, other / "case_001" / name, shallow=False), name


def test_written_ct_is_the_synthesized_ct(cohort, cases):
    for case in cases:
        ct = sitk.ReadImage(str(cohort / case["case_id"] / "ct.nrrd"))
        assert ct.GetPixelID() == sitk.sitkInt16
        assert np.array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(case["ct"]))
        spacing = ct.GetSpacing()
        assert spacing[2] != spacing[0]  # anisotropic
        assert ct.GetDirection() == (1, 0, 0, 0, 1, 0, 0, 0, 1)  # LPS, identity
        assert all(abs(o) > 1 for o in ct.GetOrigin())
        assert ct.GetSize()[:2] == (48, 48) and 55 <= ct.GetSize()[2] <= 160
        assert list(spacing) == case["metadata"]["spacing"]


def test_slicerio_reads_the_expected_segments(cohort, cases):
    for case in cases:
        style = synth._ANNOTATOR_STYLES[int(case["case_id"][-3:]) - 1]
        seg = slicerio.read_segmentation(str(cohort / case["case_id"] / "vertebrae.seg.nrrd"))
        names = [s["name"] for s in seg["segments"]]
        expected = [style["sacrum"] if v == "Sacrum" else style["vertebra"].format(name=v)
                    for v in case["metadata"]["vertebrae_in_view"]]
        assert names == expected
        assert all(len(s["color"]) == 3 for s in seg["segments"])
        resolved = labels.resolve_segment_names(names, "vertebrae")
        assert sorted(resolved.values()) == [labels.VERTEBRAE.index(v) + 1 for v in case["metadata"]["vertebrae_in_view"]]
        lesions = slicerio.read_segmentation(str(cohort / case["case_id"] / "metastases.seg.nrrd"))
        assert [s["name"] for s in lesions["segments"]] == [l["segment"] for l in case["lesions"]]
        assert {s["name"] for s in lesions["segments"]} <= {style["lytic"], style["sclerotic"]}


def test_import_gives_the_generating_label_maps(cohort, cases):
    for case in cases:
        ct = sitk.ReadImage(str(cohort / case["case_id"] / "ct.nrrd"))
        for stage, truth in (("vertebrae", case["vertebrae"]), ("metastases", case["metastases"])):
            path = cohort / case["case_id"] / f"{stage}.seg.nrrd"
            labelmap, report = labelmap_from_segmentation(path, ct, stage)
            assert np.array_equal(sitk.GetArrayFromImage(labelmap), truth), (case["case_id"], stage)


def test_segmentations_are_cropped_and_placed_like_slicer(cohort, cases):
    for case in cases:
        ct = sitk.ReadImage(str(cohort / case["case_id"] / "ct.nrrd"))
        seg = slicerio.read_segmentation(str(cohort / case["case_id"] / "vertebrae.seg.nrrd"))
        offset = np.array(seg["referenceImageExtentOffset"])
        shape = np.array(seg["voxels"].shape[-3:])
        nonzero = np.nonzero(case["vertebrae"])  # z, y, x
        lo = np.array([ax.min() for ax in nonzero])[::-1]
        hi = np.array([ax.max() for ax in nonzero])[::-1]
        assert np.array_equal(offset, lo) and np.array_equal(shape, hi - lo + 1)
        assert np.allclose(seg["ijkToLPS"][:3, 3], ct.TransformIndexToPhysicalPoint([int(v) for v in lo]))


def test_second_annotator_draws_overlapping_vertebrae_in_two_layers(cohort, cases):
    """Case 2 is drawn in the overlapping style: two layers, contested voxels, import still exact."""
    seg = slicerio.read_segmentation(str(cohort / "case_002" / "vertebrae.seg.nrrd"))
    assert seg["voxels"].ndim == 4 and seg["voxels"].shape[0] >= 2
    assert len({s["layer"] for s in seg["segments"]}) >= 2
    ct = sitk.ReadImage(str(cohort / "case_002" / "ct.nrrd"))
    _, report = labelmap_from_segmentation(cohort / "case_002" / "vertebrae.seg.nrrd", ct, "vertebrae")
    assert report["contested_voxels"] > 0
    written = {s["name"]: int(s["mask"].sum()) for s in cases[1]["vertebra_segments"]}
    anatomy = {s["name"]: int((cases[1]["vertebrae"] == v).sum())
               for s, v in zip(cases[1]["vertebra_segments"], np.unique(cases[1]["vertebrae"])[1:])}
    assert any(written[n] > anatomy[n] for n in written)  # some segment claims a neighbour's voxels
    tidy = slicerio.read_segmentation(str(cohort / "case_001" / "vertebrae.seg.nrrd"))
    assert tidy["voxels"].ndim == 3


def test_overlapping_lesions_follow_the_import_rule(many):
    """Lesions drawn over each other: the label with fewer voxels keeps the contested voxels."""
    found = 0
    for case in many:
        lytic = np.logical_or.reduce([l["mask"] for l in case["lesions"] if l["type"] == "lytic"] or [False])
        scler = np.logical_or.reduce([l["mask"] for l in case["lesions"] if l["type"] == "sclerotic"] or [False])
        both = np.asarray(lytic & scler)
        if not both.any():
            continue
        found += 1
        winner = 1 if int(np.sum(lytic)) < int(np.sum(scler)) else 2
        assert (case["metastases"][both] == winner).all()
    assert found >= 1


def test_cohort_csv(cohort, cases):
    with open(cohort / "cohort.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["case_id", "sex", "age", "metastasis_type", "primary_site"]
    assert [r["case_id"] for r in rows] == ["case_001", "case_002", "case_003"]
    for row, case in zip(rows, cases):
        present = set(np.unique(case["metastases"]).tolist()) - {0}
        expected = {frozenset(): "none", frozenset({1}): "lytic", frozenset({2}): "sclerotic",
                    frozenset({1, 2}): "mixed"}[frozenset(present)]
        assert row["metastasis_type"] == expected
        assert row["sex"] in ("F", "M") and 30 <= int(row["age"]) <= 90
        assert row["primary_site"] in synth.PRIMARY_SITES
        if row["primary_site"] == "prostate":
            assert row["sex"] == "M"
    with open(cohort / "lesions_truth.csv", newline="") as fh:
        lesions = list(csv.DictReader(fh))
    assert len(lesions) == sum(len(c["lesions"]) for c in cases)
    assert all(r["site"] in labels.VERTEBRAE or r["site"] in ("rib", "sternum", "ilium") for r in lesions)


def test_tissue_hu_ranges(many):
    """Mean HU per tissue class (away from other tissues in-plane, so the blur does not mix them)."""
    order = ["cortical", "cancellous", "disc", "soft", "fat", "lung"]
    for case in many:
        hu = sitk.GetArrayFromImage(case["ct"]).astype(float)
        free = case["metastases"] == 0
        means = {}
        for name in order:
            mask = (case["tissue"] == T[name]) & free
            if name == "disc":  # a disc is a few slices thick: its core, away from the end plates' blur
                from scipy import ndimage

                mask = ndimage.binary_erosion(mask)
            elif name != "cortical":  # the cortex is one voxel thick: keep it whole
                mask = _erode_in_plane(mask)
            if mask.sum() > 20:
                means[name] = hu[mask].mean()
        ranked = [n for n in order if n in means]
        assert all(means[a] > means[b] for a, b in zip(ranked, ranked[1:])), means
        assert 120 < means["cancellous"] < 400 and means["cortical"] > 450 and 20 < means["soft"] < 70
        for name, (low, high) in {"fat": (-130, -60), "lung": (-900, -780), "disc": (60, 130)}.items():
            if name in means:
                assert low < means[name] < high, (case["case_id"], name, means[name])
        air = _erode_in_plane(case["tissue"] == T["air"])
        if air.sum() > 20:
            assert hu[air].mean() < -950
    assert sitk.GetArrayViewFromImage(many[0]["ct"]).dtype == np.int16


def _erode_in_plane(mask):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, structure=np.array([np.zeros((3, 3)), np.ones((3, 3)), np.zeros((3, 3))]))


def test_lesions_have_the_right_hu_contrast(many):
    seen = set()
    for case in many:
        hu = sitk.GetArrayFromImage(case["ct"]).astype(float)
        cancellous = hu[(case["tissue"] == T["cancellous"]) & (case["metastases"] == 0)].mean()
        for lesion in case["lesions"]:
            value = 1 if lesion["type"] == "lytic" else 2
            inside = lesion["mask"] & (case["metastases"] == value)
            core = inside & ~np.logical_xor(inside, _erode(inside))  # away from the blurred border
            mean = hu[core if core.any() else inside].mean()
            if value == 1:
                assert mean < cancellous - 80, (case["case_id"], mean, cancellous)
            else:
                assert mean > cancellous + 200, (case["case_id"], mean, cancellous)
            seen.add(lesion["type"])
            assert int(inside.sum()) >= synth.PRESETS["demo"]["min_lesion_voxels"] / 2
            if lesion["site"] in labels.VERTEBRAE:  # spinal lesions lie in their vertebra's bone
                level = labels.VERTEBRAE.index(lesion["site"]) + 1
                assert (case["vertebrae"][lesion["mask"]] == level).all()
                assert np.isin(case["tissue"][lesion["mask"]], BONE).all()
    assert seen == {"lytic", "sclerotic"}


def _erode(mask):
    from scipy import ndimage

    return ndimage.binary_erosion(mask)


def test_demo_cases_show_ten_whole_vertebrae_and_an_anchor(many):
    for case in many:
        vert, tissue = case["vertebrae"], case["tissue"]
        nz = vert.shape[0]
        whole = []
        for level in range(1, 26):
            zs = np.nonzero((vert == level).any(axis=(1, 2)))[0]
            if zs.size and (zs.min() > 0 or level == 25) and zs.max() < nz - 1:  # sacrum: its top in view
                whole.append(level)
        runs = np.split(np.array(whole), np.nonzero(np.diff(whole) != 1)[0] + 1)
        assert max(len(r) for r in runs) >= 10, (case["case_id"], whole)
        anchors = _anchors_seen(vert, tissue, whole)
        assert anchors, (case["case_id"], whole)
        assert set(anchors) == set(case["metadata"]["anchors"]), (case["case_id"], anchors)


def _anchors_seen(vert, tissue, whole) -> list[str]:
    """Level anchors visible in the arrays: ribs jointed to T1/T12 and none to C7/L1, sacrum with
    iliac bone beside it, skull base above C1."""
    from scipy import ndimage

    unlabeled_bone = np.isin(tissue, BONE) & (vert == 0)

    def jointed_bone(level):  # unlabeled bone (rib, ilium) touching the vertebra
        return (ndimage.binary_dilation(vert == level) & unlabeled_bone).any()

    name = {v: i + 1 for i, v in enumerate(labels.VERTEBRAE)}
    found = []
    if name["C1"] in whole:
        top = np.nonzero((vert == name["C1"]).any(axis=(1, 2)))[0].max()
        if unlabeled_bone[top + 1:].any():
            found.append("skull base")
    if {name["C7"], name["T1"]} <= set(whole) and jointed_bone(name["T1"]) and not jointed_bone(name["C7"]):
        found.append("cervicothoracic")
    if {name["T12"], name["L1"]} <= set(whole) and jointed_bone(name["T12"]) and not jointed_bone(name["L1"]):
        found.append("thoracolumbar")
    if name["L5"] in whole and jointed_bone(name["Sacrum"]):
        found.append("sacrum")
    return found


def test_bad_arguments(tmp_path):
    with pytest.raises(SpinemetsError, match="unknown preset"):
        synth.synthesize_cohort(tmp_path / "a", cases=1, seed=0, preset="huge")
    with pytest.raises(SpinemetsError, match="cases must be"):
        synth.synthesize_cohort(tmp_path / "a", cases=0, seed=0)
    with pytest.raises(SpinemetsError, match="seed must be"):
        synth.synthesize_cohort(tmp_path / "a", cases=1, seed=-1)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SpinemetsError, match="output folder is an existing file"):
        synth.synthesize_cohort(a_file, cases=1, seed=0)
    (tmp_path / "b" / "case_005").mkdir(parents=True)
    with pytest.raises(SpinemetsError, match="another cohort"):
        synth.synthesize_cohort(tmp_path / "b", cases=2, seed=0)
    assert not (tmp_path / "b" / "cohort.csv").exists()


@pytest.mark.slow
def test_full_preset_is_clinical_size_and_imports(tmp_path):
    out = tmp_path / "full"
    synth.synthesize_cohort(out, cases=1, seed=3, preset="full")
    case = synth.synthesize_case(0, 3, "full")
    ct = sitk.ReadImage(str(out / "case_001" / "ct.nrrd"))
    size = ct.GetSize()
    assert size[0] >= 512 and size[1] >= 512 and size[2] >= 300
    assert (sitk.GetArrayViewFromImage(ct) < -900).any()  # air outside the body
    labelmap, _ = labelmap_from_segmentation(out / "case_001" / "vertebrae.seg.nrrd", ct, "vertebrae")
    assert np.array_equal(sitk.GetArrayViewFromImage(labelmap), case["vertebrae"])


def test_ensure_cohort_writes_a_synthetic_cohort_only_where_none_is(tmp_path):
    """The rule of the dataset and external-check notebooks: a folder with a cohort is left alone, an
    empty or missing one gets the synthetic cohort, or, when synthesizing is off, an error saying what to do."""
    calls = []
    written = synth.ensure_cohort(tmp_path / "cohort", lambda: calls.append("write"), True, "fetch it")
    assert written is True and calls == ["write"]
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / ".hidden").write_text("")
    with pytest.raises(SpinemetsError, match=r"cohort: no cohort here; fetch it"):
        synth.ensure_cohort(tmp_path / "cohort", lambda: calls.append("write"), False, "fetch it")
    (tmp_path / "cohort" / "case_000").mkdir()
    assert synth.ensure_cohort(tmp_path / "cohort", lambda: calls.append("write"), False, "fetch it") is False
    assert calls == ["write"]
