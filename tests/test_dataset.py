import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from spinemets import dataset, labels
from spinemets.cli import main
from spinemets.errors import SpinemetsError

from conftest import make_ct, vertebra_labelmap, write_case


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_scan_synthetic_layout(small_cohort, tmp_path):
    manifest = dataset.scan(small_cohort, tmp_path / "m.csv", holdout=1)
    assert list(manifest.columns) == dataset.MANIFEST_COLUMNS
    assert len(manifest) == 6 and set(manifest["stage"]) == {"vertebrae", "metastases"}
    assert set(manifest.loc[manifest["split"] == "test", "case_id"]) == {"case_003"}
    written = pd.read_csv(tmp_path / "m.csv")
    assert written["case_id"].tolist() == manifest["case_id"].tolist()


def test_scan_other_layouts_with_patterns(tmp_path):
    root = tmp_path / "flat"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for case in ("p1", "p2"):
        (root / "images" / f"{case}.nrrd").write_bytes(b"x")
        (root / "masks" / f"{case}_seg.seg.nrrd").write_bytes(b"x")
    manifest = dataset.scan(root, image="images/{case}.nrrd",
                            segmentations={"metastases": "masks/{case}_seg.seg.nrrd"})
    assert manifest["case_id"].tolist() == ["p1", "p2"]
    assert manifest["segmentation"].str.endswith("p2_seg.seg.nrrd").tolist() == [False, True]


def test_scan_errors(tmp_path):
    root = tmp_path / "r"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    (root / "a" / "x.nrrd").write_bytes(b"x")
    (root / "b" / "x.nrrd").write_bytes(b"x")
    with pytest.raises(SpinemetsError, match="duplicate case ID 'x'"):
        dataset.scan(root, image="*/{case}.nrrd", segmentations={})
    (root / "c").mkdir()
    (root / "c" / "metastases.seg.nrrd").write_bytes(b"x")
    (root / "d").mkdir()
    (root / "d" / "ct.nrrd").write_bytes(b"x")
    with pytest.raises(SpinemetsError, match="mask has no image") as err:
        dataset.scan(root, image="{case}/ct.nrrd", segmentations={"metastases": "{case}/metastases.seg.nrrd"})
    assert "metastases.seg.nrrd" in str(err.value)
    with pytest.raises(SpinemetsError, match="no image matches"):
        dataset.scan(tmp_path / "r" / "a")
    with pytest.raises(SpinemetsError, match="exactly once"):
        dataset.scan(root, image="ct.nrrd")


def test_import_both_stages_passes_nnunet_integrity_check(small_cohort, tmp_path):
    manifest = dataset.scan(small_cohort, holdout=1)
    raw = tmp_path / "raw"
    vert = dataset.import_dataset(manifest, "vertebrae", raw)
    mets = dataset.import_dataset(manifest, "metastases", raw, dataset_id=777)
    assert vert.name == "Dataset501_Vertebrae" and mets.name == "Dataset777_Metastases"
    for folder in (vert, mets):
        verify_dataset_integrity(str(folder), num_processes=1)
    info = json.loads((vert / "dataset.json").read_text())
    assert info["labels"]["Sacrum"] == 25 and info["numTraining"] == 2 and info["channel_names"] == {"0": "CT"}
    assert sorted(p.name for p in (vert / "imagesTs").iterdir()) == ["case_003_0000.nii.gz"]
    # the label maps hold exactly what the masks drew, the overlap rule applied
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(mets / "labelsTs" / "case_003.nii.gz")))
    expected = np.zeros_like(lab)
    expected[3:6, 8:11, 8:12] = 1
    expected[5:7, 9:12, 10:14] = 2  # same size: the higher label wins the contested voxels
    assert np.array_equal(lab, expected)
    assert not np.any(sitk.GetArrayFromImage(sitk.ReadImage(str(mets / "labelsTr" / "case_002.nii.gz"))))
    record = json.loads((mets / dataset.IMPORT_RECORD).read_text())
    assert record["cases"]["case_002"]["empty"] is True
    ct_in = sitk.ReadImage(str(small_cohort / "case_001" / "ct.nrrd"))
    ct_out = sitk.ReadImage(str(vert / "imagesTr" / "case_001_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(ct_in), sitk.GetArrayFromImage(ct_out))
    assert ct_out.GetSpacing() == pytest.approx(ct_in.GetSpacing())
    assert ct_out.GetOrigin() == pytest.approx(ct_in.GetOrigin())


def test_import_is_deterministic_reuses_unchanged_cases_and_leaves_sources(small_cohort, tmp_path):
    before = _digests(small_cohort)
    manifest = dataset.scan(small_cohort)
    first = dataset.import_dataset(manifest, "vertebrae", tmp_path / "a")
    other = dataset.import_dataset(manifest, "vertebrae", tmp_path / "b")
    assert _digests(first) == _digests(other)
    inode = (first / "labelsTr" / "case_001.nii.gz").stat().st_ino
    # change one source: only that case is converted again, the others are reused as they were
    ct = make_ct(seed=99)
    write_case(small_cohort / "case_002", ct, vertebra_labelmap(ct, ("L3", "L4", "L5")), [])
    again = dataset.import_dataset(manifest, "vertebrae", tmp_path / "a")
    assert (again / "labelsTr" / "case_001.nii.gz").stat().st_ino == inode
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(again / "labelsTr" / "case_002.nii.gz")))
    assert set(np.unique(lab)) == {0, 22, 23, 24}
    assert not list((tmp_path / "a").glob(".partial-*"))
    assert _digests(small_cohort) != before  # we changed case_002 ourselves...
    del before["case_002/ct.nrrd"], before["case_002/vertebrae.seg.nrrd"], before["case_002/metastases.seg.nrrd"]
    after = _digests(small_cohort)
    assert all(after[k] == v for k, v in before.items())  # ...and the import changed nothing


def test_parallel_import_matches_serial(small_cohort, tmp_path):
    manifest = dataset.scan(small_cohort)
    serial = dataset.import_dataset(manifest, "metastases", tmp_path / "s", jobs=1)
    parallel = dataset.import_dataset(manifest, "metastases", tmp_path / "p", jobs=2)
    assert _digests(serial) == _digests(parallel)


def test_real_ct_with_totalsegmentator_mask(totalseg_dir, tmp_path):
    case = tmp_path / "src" / "ts01"
    case.mkdir(parents=True)
    shutil.copy(totalseg_dir / "example_ct_sm.nii.gz", case / "ct.nii.gz")
    shutil.copy(totalseg_dir / "example_seg.nii.gz", case / "seg.nii.gz")
    manifest = dataset.scan(tmp_path / "src", image="{case}/ct.nii.gz", segmentations={"vertebrae": "{case}/seg.nii.gz"})
    out = dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw", mapping="totalsegmentator")
    verify_dataset_integrity(str(out), num_processes=1)
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "ts01.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(totalseg_dir / "example_seg.nii.gz")))
    names = labels.label_names("vertebrae")
    # this CT holds T11 (part), T12, L1 and L2
    assert [names[v] for v in np.unique(ours) if v] == ["T11", "T12", "L1", "L2"]
    for ts_value, name in ((32, "T12"), (31, "L1"), (30, "L2")):
        assert np.array_equal(ours == labels.STAGES["vertebrae"]["labels"][name], theirs == ts_value)
    assert not np.any(ours[np.isin(theirs, [1, 2, 3, 52, 116])])  # organs, ribs, sternum -> background


def test_real_slicer_files_through_the_importer(slicerio_data, tmp_path):
    from conftest import REPO
    manifest = pd.DataFrame([{"case_id": "chest", "image": str(slicerio_data / "CTChest4.nrrd"), "stage": "metastases",
                              "segmentation": str(slicerio_data / "SegmentationOverlapping.seg.nrrd"), "split": "train"}])
    out = dataset.import_dataset(manifest, "metastases", tmp_path / "raw",
                                 mapping=REPO / "tests" / "data" / "slicerio_mapping.yaml")
    verify_dataset_integrity(str(out), num_processes=1)
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "labelsTr" / "chest.nii.gz")))
    assert np.bincount(lab.ravel()).tolist() == [535205, 19139, 2712]


# ---- bad input: each names the file, exits non-zero through the CLI, and leaves no dataset behind ----

def _break(small_cohort, how):
    case = small_cohort / "case_002"
    if how == "truncated CT":
        data = (case / "ct.nrrd").read_bytes()
        (case / "ct.nrrd").write_bytes(data[: len(data) // 2])
        return case / "ct.nrrd", "cannot read CT"
    if how == "corrupt mask":
        (case / "vertebrae.seg.nrrd").write_bytes(b"NRRD0004\nnonsense\n")
        return case / "vertebrae.seg.nrrd", "cannot read 3D Slicer segmentation"
    if how == "different spacing":
        ct = make_ct(seed=2, spacing=(1.0, 1.2, 2.5))
        write_case(case, ct, vertebra_labelmap(ct), [])
        sitk.WriteImage(make_ct(seed=2), str(case / "ct.nrrd"), True)
        return case / "vertebrae.seg.nrrd", "voxel spacing"
    if how == "mask outside the CT":
        ct = make_ct(seed=2)
        moved = make_ct(seed=2, origin=(-10.0, 20.0, -300.0 + 2.5 * 10))
        write_case(case, moved, vertebra_labelmap(moved), [])
        sitk.WriteImage(ct, str(case / "ct.nrrd"), True)
        return case / "vertebrae.seg.nrrd", "outside the CT"
    if how == "different direction":
        ct = make_ct(seed=2)
        turned = make_ct(seed=2)
        turned.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))
        write_case(case, turned, vertebra_labelmap(turned), [])
        sitk.WriteImage(ct, str(case / "ct.nrrd"), True)
        return case / "vertebrae.seg.nrrd", "axis directions differ"
    if how == "unknown segment names":
        ct = make_ct(seed=2)
        from spinemets.slicer import write_segments
        mask = vertebra_labelmap(ct) > 0
        write_segments(case / "vertebrae.seg.nrrd", ct, [{"name": "kidney", "mask": mask}])
        return case / "vertebrae.seg.nrrd", "unknown segment name(s) 'kidney'"
    if how == "empty vertebra mask":
        ct = make_ct(seed=2)
        write_case(case, ct, np.zeros(ct.GetSize()[::-1], dtype=np.uint8), [])
        return case / "vertebrae.seg.nrrd", "mask is empty"
    if how == "NaN voxels":
        ct = make_ct(seed=2)
        array = sitk.GetArrayFromImage(ct).astype(np.float32)
        array[1, 2, 3] = np.nan
        bad = sitk.GetImageFromArray(array)
        bad.CopyInformation(ct)
        sitk.WriteImage(bad, str(case / "ct.nrrd"), True)
        return case / "ct.nrrd", "1 NaN voxel"
    if how == "4-D CT":
        ct4 = sitk.JoinSeries([make_ct(seed=2), make_ct(seed=3)])
        sitk.WriteImage(ct4, str(case / "ct.nrrd"), True)
        return case / "ct.nrrd", "is 4-D"
    if how == "missing file":
        (case / "ct.nrrd").unlink()
        return case / "ct.nrrd", "not found"
    raise AssertionError(how)


BAD = ["truncated CT", "corrupt mask", "different spacing", "mask outside the CT", "different direction", "unknown segment names", "empty vertebra mask",
       "NaN voxels", "4-D CT", "missing file"]


@pytest.mark.parametrize("how", BAD)
def test_bad_input_is_rejected_and_leaves_nothing(small_cohort, tmp_path, capsys, how):
    manifest_csv = tmp_path / "m.csv"
    dataset.scan(small_cohort, manifest_csv)
    raw = tmp_path / "raw"
    good = dataset.import_dataset(manifest_csv, "vertebrae", raw)
    good_digests = _digests(good)
    path, message = _break(small_cohort, how)
    code = main(["import", "--manifest", str(manifest_csv), "--stage", "vertebrae", "--out", str(raw)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and str(path) in err
    assert _digests(good) == good_digests  # the previous dataset is untouched
    assert not list(raw.glob(".partial-*"))
    fresh = tmp_path / "fresh"
    assert main(["import", "--manifest", str(manifest_csv), "--stage", "vertebrae", "--out", str(fresh)]) == 2
    assert not fresh.exists() or not any(fresh.iterdir())  # no partial dataset


def test_duplicate_case_ids_in_a_manifest(small_cohort, tmp_path, capsys):
    manifest = dataset.scan(small_cohort)
    doubled = pd.concat([manifest, manifest.iloc[:1]])
    doubled.to_csv(tmp_path / "m.csv", index=False)
    assert main(["import", "--manifest", str(tmp_path / "m.csv"), "--stage", "vertebrae",
                 "--out", str(tmp_path / "raw")]) == 2
    err = capsys.readouterr().err
    assert "duplicate case ID(s)" in err and "case_001" in err and str(tmp_path / "m.csv") in err


def test_manifest_errors(tmp_path):
    (tmp_path / "m.csv").write_text("case_id,image\nx,y\n")
    with pytest.raises(SpinemetsError, match="lacks column"):
        dataset.import_dataset(tmp_path / "m.csv", "vertebrae", tmp_path / "raw")
    with pytest.raises(SpinemetsError, match="manifest not found"):
        dataset.import_dataset(tmp_path / "none.csv", "vertebrae", tmp_path / "raw")
