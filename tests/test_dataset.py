import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

from spinemets.cohort import dataset
from spinemets.cohort import curation

from spinemets import labels
from spinemets.cli import main
from spinemets.errors import SpinemetsError

from conftest import digests, make_ct, vertebra_labelmap, write_case


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
    before = digests(small_cohort)
    manifest = dataset.scan(small_cohort)
    first = dataset.import_dataset(manifest, "vertebrae", tmp_path / "a")
    other = dataset.import_dataset(manifest, "vertebrae", tmp_path / "b")
    assert digests(first) == digests(other)
    inode = (first / "labelsTr" / "case_001.nii.gz").stat().st_ino
    # change one source: only that case is converted again, the others are reused as they were
    ct = make_ct(seed=99)
    write_case(small_cohort / "case_002", ct, vertebra_labelmap(ct, ("L3", "L4", "L5")), [])
    again = dataset.import_dataset(manifest, "vertebrae", tmp_path / "a")
    assert (again / "labelsTr" / "case_001.nii.gz").stat().st_ino == inode
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(again / "labelsTr" / "case_002.nii.gz")))
    assert set(np.unique(lab)) == {0, 22, 23, 24}
    assert not list((tmp_path / "a").glob(".partial-*"))
    assert digests(small_cohort) != before  # we changed case_002 ourselves...
    del before["case_002/ct.nrrd"], before["case_002/vertebrae.seg.nrrd"], before["case_002/metastases.seg.nrrd"]
    after = digests(small_cohort)
    assert all(after[k] == v for k, v in before.items())  # ...and the import changed nothing


def test_parallel_import_matches_serial(small_cohort, tmp_path):
    manifest = dataset.scan(small_cohort)
    serial = dataset.import_dataset(manifest, "metastases", tmp_path / "s", jobs=1)
    parallel = dataset.import_dataset(manifest, "metastases", tmp_path / "p", jobs=2)
    assert digests(serial) == digests(parallel)


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


# ---- bad input: the cases are in tests/badinput/import.yaml; here, what a failure does to an existing dataset ----

@pytest.mark.parametrize("defect", ["truncated CT", "unknown segment names"])
def test_failed_import_keeps_the_previous_dataset(small_cohort, tmp_path, defect):
    from badinput.builders import break_case

    manifest_csv = tmp_path / "m.csv"
    dataset.scan(small_cohort, manifest_csv)
    raw = tmp_path / "raw"
    good = dataset.import_dataset(manifest_csv, "vertebrae", raw)
    good_digests = digests(good)
    path, message = break_case(small_cohort / "case_002", defect)
    with pytest.raises(SpinemetsError, match=re.escape(message)):
        dataset.import_dataset(manifest_csv, "vertebrae", raw)
    assert digests(good) == good_digests
    assert not list(raw.glob(".partial-*"))


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


def test_pseudonymized_scan_keeps_identifiers_out_of_the_dataset(tmp_path):
    root = tmp_path / "export"
    names = ["DOE_JOHN_1957", "ROE_JANE_1962"]
    for name in names:
        ct = make_ct(seed=len(name))
        write_case(root / name, ct, vertebra_labelmap(ct), [])
    manifest = dataset.scan(root, tmp_path / "m.csv", pseudonymize=True)
    assert sorted(manifest["case_id"].unique()) == ["sm-0001", "sm-0002"]
    mapping = (root / ".spinemets-pseudonyms.csv").read_text()
    assert all(name in mapping for name in names)
    again = dataset.scan(root, pseudonymize=True)  # stable across reruns
    assert again["case_id"].tolist() == manifest["case_id"].tolist()
    out = dataset.import_dataset(tmp_path / "m.csv", "vertebrae", tmp_path / "raw")
    for path in out.rglob("*"):
        assert not any(name in str(path) for name in names)
        if path.is_file():
            data = path.read_bytes()
            if path.suffix == ".gz":
                import gzip
                data = gzip.decompress(data)
            assert not any(name.encode() in data for name in names), path


def test_huge_label_values_import_without_a_table_sized_by_them(tmp_path):
    """A label map holding 2**62 (and 2**31) with a mapping imports in the memory of its distinct
    values; values the mapping leaves out become background, as documented."""
    from conftest import make_ct
    from spinemets.cohort.dataset import import_dataset

    ct = make_ct(seed=1)
    mask = np.zeros(ct.GetSize()[::-1], dtype=np.int64)
    mask[2:4, 3:6, 3:6] = 2**62
    mask[5:7, 3:6, 3:6] = 2**31
    mask[8:10, 3:6, 3:6] = 7
    label = sitk.GetImageFromArray(mask)
    label.CopyInformation(ct)
    case = tmp_path / "c"
    case.mkdir()
    sitk.WriteImage(ct, str(case / "ct.nrrd"))
    sitk.WriteImage(label, str(case / "mask.nrrd"))
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"case_id,image,stage,segmentation\ncase_1,{case / 'ct.nrrd'},vertebrae,{case / 'mask.nrrd'}\n")
    (tmp_path / "map.yaml").write_text(f"{2**62}: L1\n7: L3\n")
    folder = import_dataset(manifest, "vertebrae", tmp_path / "raw", mapping=tmp_path / "map.yaml")
    out = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "labelsTr" / "case_1.nii.gz")))
    l1, l3 = labels.STAGES["vertebrae"]["labels"]["L1"], labels.STAGES["vertebrae"]["labels"]["L3"]
    assert dict(zip(*np.unique(out, return_counts=True))) == {0: out.size - 36, l1: 18, l3: 18}


def test_curation_tables_of_the_data_notebook(tmp_path, small_cohort):
    """Table 1, the QC table with its review flags, and label volumes, as the data notebook shows them."""
    (tmp_path / "cohort.csv").write_text("case_id,sex,age,metastasis_type,primary_site\n"
                                         "a,F,60,lytic,breast\nb,M,70,sclerotic,prostate\nc,F,80,lytic,lung\n")
    age, table = curation.cohort_table(tmp_path / "cohort.csv")
    assert age == "3 cases; age 70.0 ± 10.0 years (range 60–80)"
    assert table.loc[("sex", "F"), "n"] == 2 and table.loc[("sex", "F"), "%"] == 66.7
    assert table.loc[("type of metastasis", "lytic"), "n"] == 2
    manifest = dataset.scan(small_cohort)
    qc = curation.qc_table(manifest)
    assert list(qc.index) == ["case_001", "case_002", "case_003"]
    assert qc.loc["case_001", "size (x×y×z)"] == "24×20×16" and qc.loc["case_001", "spacing z (mm)"] == 2.5
    assert qc.loc["case_001", "field of view z (mm)"] == 40.0
    assert curation.flagged_for_review(qc) == []
    qc.loc["case_002", "spacing z (mm)"] = 6.0
    qc.loc["case_003", "HU p1"] = -2000.0
    assert curation.flagged_for_review(qc) == ["case_002", "case_003"]
    folder = dataset.import_dataset(manifest, "metastases", tmp_path / "raw")
    volumes = curation.label_volumes(folder, "metastases").set_index(["case_id", "label"])["volume_ml"]
    voxel_ml = 1.5 * 1.2 * 2.5 / 1000
    assert volumes[("case_001", "lytic")] == pytest.approx(3 * 3 * 4 * voxel_ml)
    assert volumes[("case_002", "lytic")] == 0 and volumes[("case_002", "sclerotic")] == 0
