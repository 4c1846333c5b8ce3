"""spinemets.cohort.discovery: ``spinemets scan`` without patterns, on the layouts real downloads have.

Each layout is built small (8x8x8 CTs) in tmp_path, scanned without patterns to the exact
manifest, and imported where it makes sense, the label map checked voxel for voxel.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from conftest import digests, make_ct
from fakes import IDENTIFIERS, write_dicom_series
from spinemets.cohort import dataset, discovery
from spinemets import labels
from spinemets.cli import main
from spinemets.errors import SpinemetsError
from spinemets.formats.images import read_image
from spinemets.formats.slicer import write_segments

V = labels.STAGES["vertebrae"]["labels"]
SHAPE = (8, 8, 8)


def ct8(seed: int = 0) -> sitk.Image:
    return make_ct(shape=SHAPE, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), seed=seed)


def boxes(values: dict[int, tuple]) -> np.ndarray:
    """A z-y-x uint8 array with value v in the box ``slices`` of each item."""
    array = np.zeros(SHAPE[::-1], dtype=np.uint8)
    for value, box in values.items():
        array[box] = value
    return array


def write_labelmap(array: np.ndarray, ct: sitk.Image, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(ct)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), True)
    return path


def write_ct(ct: sitk.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(ct, str(path), True)
    return path


def write_seg(ct: sitk.Image, path: Path, segments: dict[str, np.ndarray]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_segments(path, ct, [{"name": n, "mask": m} for n, m in segments.items()])


def row(case, image, stage, seg, split="train", mapping=None) -> dict:
    out = {"case_id": case, "image": str(Path(image).resolve()), "stage": stage,
           "segmentation": str(Path(seg).resolve()), "split": split}
    if mapping is not None:
        out["mapping"] = mapping
    return out


def rows_of(manifest: pd.DataFrame) -> list[dict]:
    return manifest.to_dict("records")


def imported(folder: Path, case: str, split: str = "Tr") -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"labels{split}" / f"{case}.nii.gz")))


Z1, Z2, Z3 = (slice(1, 3), slice(2, 6), slice(2, 6)), (slice(3, 5), slice(2, 6), slice(2, 6)), \
    (slice(5, 7), slice(2, 6), slice(2, 6))


def answer(template: Path, **sections) -> Path:
    """Fill in a written mapping template: ``sections`` replace its entries; reviewed: true."""
    data = yaml.safe_load(template.read_text())
    for key, entries in sections.items():
        data[key] = {**(data.get(key) or {}), **entries}
    data["reviewed"] = True
    template.write_text(yaml.safe_dump(data))
    return template


# ---------------------------------------------------------------------------------------------
# the layouts


def test_flat_files_with_shared_stems(tmp_path):
    root = tmp_path / "flat"
    ct1, ct2 = ct8(1), ct8(2)
    write_ct(ct1, root / "case01.nrrd")  # no role word: its voxels say CT
    vert1 = boxes({V["L1"]: Z1, V["L2"]: Z2})
    write_seg(ct1, root / "case01.seg.nrrd", {"L1": vert1 == V["L1"], "L2": vert1 == V["L2"]})
    write_ct(ct2, root / "case02_ct.nii.gz")
    vert2 = boxes({V["T12"]: Z1, V["L1"]: Z2, V["L2"]: Z3})
    write_labelmap(vert2, ct2, root / "case02_seg.nii.gz")  # values above 2: vertebrae
    lesion = boxes({1: Z2}) == 1
    write_seg(ct2, root / "case02_lesions.seg.nrrd", {"Lytic": lesion})
    (root / "README.md").write_text("about the data\n")
    (root / "clinical.xlsx").write_bytes(b"PK")
    (root / ".DS_Store").write_bytes(b"x")
    manifest = dataset.scan(root, tmp_path / "m.csv")
    assert rows_of(manifest) == [
        row("case01", root / "case01.nrrd", "vertebrae", root / "case01.seg.nrrd"),
        row("case02", root / "case02_ct.nii.gz", "vertebrae", root / "case02_seg.nii.gz"),
        row("case02", root / "case02_ct.nii.gz", "metastases", root / "case02_lesions.seg.nrrd"),
    ]
    assert pd.read_csv(tmp_path / "m.csv", dtype=str).to_dict("records") == rows_of(manifest)
    text = discovery.explain(root)
    for line in ("  .DS_Store: hidden file", "  README.md: document (not read)",
                 "  clinical.xlsx: spreadsheet (not read)", "    segment 'L2' -> L2 (21)",
                 "    value 19 -> T12 (19)", "    segment 'Lytic' -> lytic (1)"):
        assert line in text.splitlines(), line
    before = digests(root)
    vert = dataset.import_dataset(tmp_path / "m.csv", "vertebrae", tmp_path / "raw")
    assert np.array_equal(imported(vert, "case01"), vert1)
    assert np.array_equal(imported(vert, "case02"), vert2)
    mets = dataset.import_dataset(tmp_path / "m.csv", "metastases", tmp_path / "raw")
    assert np.array_equal(imported(mets, "case02"), lesion.astype(np.uint8))
    assert digests(root) == before  # sources are only read


def test_per_case_folders(tmp_path):
    root = tmp_path / "cases"
    ct1, ct2 = ct8(1), ct8(2)
    write_ct(ct1, root / "p1" / "ct.nii.gz")
    vert = boxes({V["L3"]: Z1, V["L4"]: Z2})
    write_seg(ct1, root / "p1" / "Segmentation.seg.nrrd", {"Vertebra L3": vert == V["L3"], "L4": vert == V["L4"]})
    write_seg(ct1, root / "p1" / "lesions.seg.nrrd", {})  # lesion-free: the name says the stage
    write_ct(ct2, root / "p2" / "image.nrrd")
    mets = boxes({1: Z1, 2: Z2})
    write_labelmap(mets, ct2, root / "p2" / "mets_mask.nii.gz")  # values {1, 2}: the name says metastases
    (root / "p2" / "report.pdf").write_bytes(b"%PDF")
    manifest = dataset.scan(root, holdout=1)
    assert rows_of(manifest) == [
        row("p1", root / "p1" / "ct.nii.gz", "vertebrae", root / "p1" / "Segmentation.seg.nrrd"),
        row("p1", root / "p1" / "ct.nii.gz", "metastases", root / "p1" / "lesions.seg.nrrd"),
        row("p2", root / "p2" / "image.nrrd", "metastases", root / "p2" / "mets_mask.nii.gz", split="test"),
    ]
    out = dataset.import_dataset(manifest, "metastases", tmp_path / "raw")
    assert np.array_equal(imported(out, "p2", "Ts"), mets)
    assert not imported(out, "p1").any()
    out = dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw")
    assert np.array_equal(imported(out, "p1"), vert)


def test_images_and_labels_trees(tmp_path):
    root = tmp_path / "nnunet"
    arrays = {}
    for i, case in enumerate(("c1", "c2"), start=1):
        ct = ct8(i)
        write_ct(ct, root / "imagesTr" / f"{case}_0000.nii.gz")
        arrays[case] = boxes({V["C1"] + i: Z1, V["C3"] + i: Z3})
        write_labelmap(arrays[case], ct, root / "labelsTr" / f"{case}.nii.gz")
    write_ct(ct8(5), root / "imagesTr" / "c1_0001.nii.gz")  # a second channel
    write_ct(ct8(3), root / "imagesTs" / "c3_0000.nii.gz")  # no label: a case without rows
    (root / "dataset.json").write_text("{}")
    manifest = dataset.scan(root)
    assert rows_of(manifest) == [
        row(c, root / "imagesTr" / f"{c}_0000.nii.gz", "vertebrae", root / "labelsTr" / f"{c}.nii.gz")
        for c in ("c1", "c2")]
    plan = discovery.discover(root)
    assert sorted(plan.cases) == ["c1", "c2", "c3"]
    assert dict(plan.unused) == {
        "dataset.json": "JSON file (centroids, dataset description ...; not read)",
        "imagesTr/c1_0001.nii.gz": "image channel 1 (nnU-Net naming); only channel 0, the CT, is used"}
    assert "case c3\n  CT: imagesTs/c3_0000.nii.gz (image; named as a CT)\n  no segmentation" in discovery.describe(plan)
    out = dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw")
    for case in ("c1", "c2"):
        assert np.array_equal(imported(out, case), arrays[case])


def _totalsegmentator(root: Path, overlap: bool = False) -> dict[str, np.ndarray]:
    """Two subjects with per-structure masks and meta.csv; returns the expected label map per subject."""
    expected = {}
    for i, subject in enumerate(("s0001", "s0002"), start=1):
        ct = ct8(i)
        write_ct(ct, root / subject / "ct.nii.gz")
        masks = {"vertebrae_L1": Z1, "vertebrae_L2": Z2, "vertebrae_S1": (slice(5, 6), slice(2, 6), slice(2, 6)),
                 "sacrum": (slice(6, 7), slice(2, 6), slice(2, 6)), "liver": (slice(0, 8), slice(6, 8), slice(0, 8)),
                 "rib_left_1": (slice(1, 5), slice(0, 2), slice(0, 2))}
        if overlap and i == 2:
            masks["vertebrae_L2"] = (slice(2, 5), slice(2, 6), slice(2, 6))  # one slice into L1
        for name, box in masks.items():
            array = np.zeros(SHAPE[::-1], dtype=np.uint8)
            array[box] = 1
            write_labelmap(array, ct, root / subject / "segmentations" / f"{name}.nii.gz")
        expected[subject] = boxes({V["L1"]: Z1, V["L2"]: Z2, V["Sacrum"]: (slice(5, 7), slice(2, 6), slice(2, 6))})
    (root / "meta.csv").write_text("image_id;age;gender;split\ns0001;61;f;train\ns0002;70;m;test\n")
    return expected


def test_totalsegmentator_mask_folders_and_meta_csv(tmp_path):
    root = tmp_path / "Totalsegmentator_dataset"
    expected = _totalsegmentator(root)
    manifest = dataset.scan(root)
    assert rows_of(manifest) == [
        row("s0001", root / "s0001" / "ct.nii.gz", "vertebrae", root / "s0001" / "segmentations"),
        row("s0002", root / "s0002" / "ct.nii.gz", "vertebrae", root / "s0002" / "segmentations", split="test"),
    ]
    text = discovery.explain(root)
    assert "splits from meta.csv (test stays test; train and val are train)" in text
    assert "    structure 'vertebrae_S1' -> Sacrum (25)" in text.splitlines()
    assert "    ignored structures (2): 'liver', 'rib_left_1'" in text.splitlines()
    assert "meta.csv" not in dict(discovery.discover(root).unused)
    out = dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw")
    assert np.array_equal(imported(out, "s0001"), expected["s0001"])
    assert np.array_equal(imported(out, "s0002", "Ts"), expected["s0002"])
    with pytest.raises(SpinemetsError, match=re.escape(f"{root / 'meta.csv'}: sets the split of every case")):
        dataset.scan(root, holdout=1)


def test_totalsegmentator_subjects_without_vertebrae_are_left_out_only_when_asked(tmp_path, caplog):
    root = tmp_path / "Totalsegmentator_dataset"
    _totalsegmentator(root)
    ct = ct8(3)  # a head CT: TotalSegmentator writes every structure's mask, here all empty
    write_ct(ct, root / "s0003" / "ct.nii.gz")
    for name in ("vertebrae_L1", "vertebrae_S1", "brain"):
        array = np.zeros(SHAPE[::-1], dtype=np.uint8)
        array[..., :2] = name == "brain"
        write_labelmap(array, ct, root / "s0003" / "segmentations" / f"{name}.nii.gz")
    (root / "meta.csv").write_text("image_id;split\ns0001;train\ns0002;test\ns0003;train\n")
    manifest = dataset.scan(root)
    assert list(manifest["case_id"]) == ["s0001", "s0002", "s0003"]
    with pytest.raises(SpinemetsError, match=r"s0003/segmentations: mask is empty .*--skip-empty"):
        dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw")
    assert not (tmp_path / "raw" / "Dataset501_Vertebrae").exists()
    with caplog.at_level("WARNING", logger="spinemets.cohort.dataset"):
        out = dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw", skip_empty=True)
    record = yaml.safe_load((out / dataset.IMPORT_RECORD).read_text())
    assert record["skipped"] == {"s0003": "its mask holds no vertebra"} and sorted(record["cases"]) == ["s0001", "s0002"]
    assert yaml.safe_load((out / "dataset.json").read_text())["numTraining"] == 1
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["s0001_0000.nii.gz"]
    assert any("1 case(s) left out" in r.getMessage() and "s0003" in r.getMessage() for r in caplog.records)


def test_totalsegmentator_unpacked_into_its_own_folder_keeps_its_splits(tmp_path):
    root = tmp_path / "data" / "totalsegmentator"
    _totalsegmentator(root / "Totalsegmentator_dataset_v201")
    (root / "Totalsegmentator_dataset_v201.zip").write_bytes(b"PK")  # the download, beside what it unpacked to
    manifest = dataset.scan(root)
    assert list(zip(manifest["case_id"], manifest["split"])) == [("s0001", "train"), ("s0002", "test")]
    unused = dict(discovery.discover(root).unused)
    assert "Totalsegmentator_dataset_v201/meta.csv" not in unused and "Totalsegmentator_dataset_v201.zip" in unused


def test_overlapping_structures_are_an_error_naming_both_files(tmp_path):
    root = tmp_path / "ts"
    _totalsegmentator(root, overlap=True)
    manifest = dataset.scan(root)
    folder = root / "s0002" / "segmentations"
    with pytest.raises(SpinemetsError) as err:
        dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw")
    assert str(err.value).startswith(f"{folder / 'vertebrae_L2.nii.gz'}: overlaps {folder / 'vertebrae_L1.nii.gz'} "
                                     "in 16 voxel(s)")
    assert not (tmp_path / "raw").exists()


def _verse(root: Path) -> dict[str, np.ndarray]:
    values = {"sub-verse001": boxes({V["L4"]: Z1, V["L5"]: Z2}),
              "sub-verse002": boxes({24: Z1, 25: Z2, 26: Z3})}  # VerSe: L5, L6, sacrum
    for i, (subject, array) in enumerate(values.items(), start=1):
        ct = ct8(i)
        write_ct(ct, root / "rawdata" / subject / f"{subject}_dir-ax_ct.nii.gz")
        deriv = root / "derivatives" / subject
        write_labelmap(array, ct, deriv / f"{subject}_dir-ax_seg-vert_msk.nii.gz")
        (deriv / f"{subject}_dir-ax_seg-subreg_ctd.json").write_text('[{"direction": ["P", "I", "R"]}]')
        (deriv / f"{subject}_dir-ax_seg-vert_snp.png").write_bytes(b"\x89PNG")
    return values


def test_verse_layout_refuses_l6_until_the_mapping_says_what_it_is(tmp_path):
    root = tmp_path / "verse"
    values = _verse(root)
    seg2 = root / "derivatives" / "sub-verse002" / "sub-verse002_dir-ax_seg-vert_msk.nii.gz"
    with pytest.raises(SpinemetsError) as err:
        dataset.scan(root, tmp_path / "m.csv")
    assert str(err.value).startswith(f"{seg2}: label value 25 maps to no label of the vertebrae stage")
    assert "--explain" in str(err.value) and not (tmp_path / "m.csv").exists()
    template = tmp_path / "m.mapping.yaml"
    text = discovery.explain(root, template=template)
    assert "    value 25 -> ?" in text.splitlines() and "    value 26 -> Sacrum (25)" in text.splitlines()
    assert "  derivatives/sub-verse001/sub-verse001_dir-ax_seg-subreg_ctd.json: JSON file (centroids, dataset " \
           "description ...; not read)" in text.splitlines()
    assert "  derivatives/sub-verse001/sub-verse001_dir-ax_seg-vert_snp.png: picture (a preview; not read)" \
        in text.splitlines()
    written = template.read_text()
    assert "  25: null  # seen in derivatives/sub-verse002/sub-verse002_dir-ax_seg-vert_msk.nii.gz; under the " \
           "verse mapping: VerSe's L6, a transitional sixth lumbar vertebra" in written.splitlines()
    with pytest.raises(SpinemetsError, match="not reviewed"):
        dataset.scan(root, mapping=template)
    answer(template, vertebrae={25: "L5"})
    manifest = dataset.scan(root, tmp_path / "m.csv", mapping=template)
    assert rows_of(manifest) == [
        row(s, root / "rawdata" / s / f"{s}_dir-ax_ct.nii.gz", "vertebrae",
            root / "derivatives" / s / f"{s}_dir-ax_seg-vert_msk.nii.gz", mapping="verse")
        for s in ("sub-verse001", "sub-verse002")]
    # without the mapping, import refuses L6 (never our 25, the sacrum)
    with pytest.raises(SpinemetsError) as err:
        dataset.import_dataset(tmp_path / "m.csv", "vertebrae", tmp_path / "raw")
    assert str(err.value).startswith(f"{seg2}: label value 25 is VerSe's L6") and "'25: L5'" in str(err.value)
    out = dataset.import_dataset(tmp_path / "m.csv", "vertebrae", tmp_path / "raw", mapping=template)
    assert np.array_equal(imported(out, "sub-verse001"), values["sub-verse001"])
    l6_as_l5 = boxes({V["L5"]: Z1, V["Sacrum"]: Z3})
    l6_as_l5[Z2] = V["L5"]
    assert np.array_equal(imported(out, "sub-verse002"), l6_as_l5)


def test_a_verse_file_without_the_mapping_column_still_refuses_l6(tmp_path):
    root = tmp_path / "verse"
    _verse(root)
    manifest = pd.DataFrame([row("sub-verse002", root / "rawdata" / "sub-verse002" / "sub-verse002_dir-ax_ct.nii.gz",
                                 "vertebrae", root / "derivatives" / "sub-verse002" /
                                 "sub-verse002_dir-ax_seg-vert_msk.nii.gz")])
    assert "mapping" not in manifest.columns
    with pytest.raises(SpinemetsError, match="label value 25 is VerSe's L6"):
        dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw")
    with pytest.raises(SpinemetsError, match="label value 25 is VerSe's L6"):
        labels.map_label_values([24, 25], "vertebrae", labels.load_mapping("verse"), "x.nii.gz")
    assert labels.map_label_values([24, 25, 26, 27], "vertebrae", {**labels.NAMED_MAPPINGS["verse"], 25: None},
                                   "x") == {24: 24, 25: 0, 26: 25, 27: 0}


def test_dicom_series_folders_beside_slicer_files(tmp_path):
    root = tmp_path / "tcia"
    expected = {}
    for i, case in enumerate(("PAT-01", "PAT-02"), start=1):
        series = root / case / "01-01-2000-NA-CT 12345" / f"{i}.000000-Axial 2.5 mm-{i}111"
        write_dicom_series(series, f"1.2.826.0.1.3680043.9.7433.3.{i}", prefix="1-0")
        ct = read_image(series)
        lesion = np.zeros(ct.GetSize()[::-1], dtype=bool)
        lesion[1:3, 2:5, 1:4] = True
        write_seg(ct, root / case / "lesions.seg.nrrd", {"osteolytic": lesion})
        expected[case] = (series, lesion.astype(np.uint8))
    manifest = dataset.scan(root)
    assert rows_of(manifest) == [row(c, s, "metastases", root / c / "lesions.seg.nrrd")
                                 for c, (s, _) in expected.items()]
    text = discovery.explain(root)
    assert not any(value in text for value in IDENTIFIERS.values())
    assert "  CT: PAT-01/01-01-2000-NA-CT 12345/1.000000-Axial 2.5 mm-1111 (DICOM series; DICOM series folder)" \
        in text.splitlines()
    out = dataset.import_dataset(manifest, "metastases", tmp_path / "raw")
    for case, (_, lesion) in expected.items():
        assert np.array_equal(imported(out, case), lesion)


# ---------------------------------------------------------------------------------------------
# what is not guessed


def test_two_cts_in_one_case_folder(tmp_path):
    root = tmp_path / "r"
    write_ct(ct8(1), root / "c1" / "ct.nrrd")
    write_ct(ct8(2), root / "c1" / "ct_2.nrrd")
    write_ct(ct8(3), root / "c2" / "ct.nrrd")
    with pytest.raises(SpinemetsError) as err:
        dataset.scan(root, tmp_path / "m.csv")
    assert str(err.value).startswith(f"{root / 'c1' / 'ct.nrrd'}: case 'c1' has 2 CTs (c1/ct.nrrd, c1/ct_2.nrrd)")
    assert not (tmp_path / "m.csv").exists()
    template = tmp_path / "t.yaml"
    discovery.explain(root, template=template)
    assert yaml.safe_load(template.read_text())["files"] == {"c1/ct.nrrd": None, "c1/ct_2.nrrd": None}
    answer(template, files={"c1/ct.nrrd": "image", "c1/ct_2.nrrd": None})
    assert sorted(discovery.discover(root, template).cases) == ["c1", "c2"]


def test_segment_names_of_both_stages_and_label_values_of_either_are_not_guessed(tmp_path):
    root = tmp_path / "r"
    ct = ct8(1)
    write_ct(ct, root / "c1" / "ct.nrrd")
    write_seg(ct, root / "c1" / "Segmentation.seg.nrrd", {"L1": boxes({1: Z1}) == 1, "Lytic": boxes({1: Z2}) == 1})
    write_ct(ct, root / "c2" / "ct.nrrd")
    write_labelmap(boxes({1: Z1, 2: Z2}), ct, root / "c2" / "seg.nii.gz")
    with pytest.raises(SpinemetsError) as err:
        dataset.scan(root)
    message = str(err.value)
    assert message.startswith(f"{root / 'c1' / 'Segmentation.seg.nrrd'}: segment names fit both stages: 'L1' "
                              "(vertebrae), 'Lytic' (metastases)")
    assert "(and 1 more open question(s))" in message
    plan = discovery.discover(root)
    assert plan.open_questions()[1] == (f"{root / 'c2' / 'seg.nii.gz'}: label map with values 1, 2 and no stage "
                                        "word in its name fits both stages")


def test_unknown_names_give_a_template_and_the_filled_template_imports(tmp_path):
    root = tmp_path / "r"
    ct = ct8(1)
    write_ct(ct, root / "c1" / "ct.nrrd")
    lesion = boxes({1: Z1}) == 1
    write_seg(ct, root / "c1" / "c1_lesions.seg.nrrd", {"Segment_1": lesion})
    write_ct(ct8(2), root / "c2" / "ct.nrrd")
    blob = boxes({1: Z2}) == 1
    write_seg(ct8(2), root / "c2" / "Segmentation.seg.nrrd", {"Segment_1": blob})  # no stage word either
    with pytest.raises(SpinemetsError) as err:
        dataset.scan(root)
    assert str(err.value).startswith(f"{root / 'c2' / 'Segmentation.seg.nrrd'}: 3D Slicer segmentation segment "
                                     "names 'Segment_1' fit neither stage, and its name has no stage word")
    template = tmp_path / "t.yaml"
    discovery.explain(root, template=template)
    text = template.read_text()
    assert "  c2/Segmentation.seg.nrrd: null  # choices: vertebrae, metastases; 3D Slicer segmentation segment " \
           "names 'Segment_1' fit neither stage, and its name has no stage word" in text.splitlines()
    data = yaml.safe_load(text)
    assert data["metastases"] == {"Segment_1": None} and data["vertebrae"] == {"Segment_1": None}
    assert data["reviewed"] is False
    answer(template, files={"c2/Segmentation.seg.nrrd": "metastases"}, metastases={"Segment_1": "lytic"})
    manifest = dataset.scan(root, mapping=template)
    assert rows_of(manifest) == [
        row("c1", root / "c1" / "ct.nrrd", "metastases", root / "c1" / "c1_lesions.seg.nrrd"),
        row("c2", root / "c2" / "ct.nrrd", "metastases", root / "c2" / "Segmentation.seg.nrrd")]
    out = dataset.import_dataset(manifest, "metastases", tmp_path / "raw", mapping=template)
    assert np.array_equal(imported(out, "c1"), lesion.astype(np.uint8))
    assert np.array_equal(imported(out, "c2"), blob.astype(np.uint8))


def test_a_segmentation_without_a_ct_and_two_of_one_stage(tmp_path):
    root = tmp_path / "r"
    ct = ct8(1)
    write_ct(ct, root / "c1" / "ct.nrrd")
    write_seg(ct, root / "c1" / "vertebrae.seg.nrrd", {"L1": boxes({1: Z1}) == 1})
    write_seg(ct, root / "c1" / "vertebrae_v2.seg.nrrd", {"L1": boxes({1: Z2}) == 1})
    write_seg(ct, root / "orphans" / "x_lesions.seg.nrrd", {"Lytic": boxes({1: Z2}) == 1})
    questions = discovery.discover(root).open_questions()
    assert questions == [
        f"{root / 'c1' / 'vertebrae.seg.nrrd'}: case 'c1' has 2 vertebrae segmentations (c1/vertebrae.seg.nrrd, "
        "c1/vertebrae_v2.seg.nrrd); keep one and set the others to null in the mapping file's files",
        f"{root / 'c1' / 'vertebrae_v2.seg.nrrd'}: case 'c1' has 2 vertebrae segmentations (c1/vertebrae.seg.nrrd, "
        "c1/vertebrae_v2.seg.nrrd); keep one and set the others to null in the mapping file's files",
        f"{root / 'orphans' / 'x_lesions.seg.nrrd'}: segmentation has no CT: none of its name, none in its "
        "folder or above"]


def test_explicit_patterns_are_unchanged_and_mapping_goes_with_discovery_only(small_cohort, tmp_path):
    discovered = dataset.scan(small_cohort, holdout=1)
    patterns = dataset.scan(small_cohort, image="{case}/ct.nrrd", segmentations=dataset.DEFAULT_SEGMENTATION_PATTERNS,
                            holdout=1)
    assert rows_of(discovered) == rows_of(patterns)
    assert list(discovered.columns) == dataset.MANIFEST_COLUMNS
    only_image = dataset.scan(small_cohort, image="{case}/ct.nrrd")
    assert rows_of(only_image) == rows_of(dataset.scan(small_cohort))
    with pytest.raises(SpinemetsError, match="^--mapping: scan reads a mapping only when it discovers"):
        dataset.scan(small_cohort, image="{case}/ct.nrrd", mapping={"x": "L1"})


# ---------------------------------------------------------------------------------------------
# the command line


def test_cli_explain_writes_only_the_template_and_scan_takes_it_back(tmp_path, capsys):
    root = tmp_path / "r"
    ct = ct8(1)
    write_ct(ct, root / "c1" / "ct.nrrd")
    write_seg(ct, root / "c1" / "mets.seg.nrrd", {"Tumour A": boxes({1: Z1}) == 1})
    (root / "c1" / "notes.txt").write_text("x")
    out = tmp_path / "out" / "manifest.csv"
    assert main(["scan", str(root), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"spinemets: error: {root / 'c1' / 'mets.seg.nrrd'}: segment "
                                                   "name 'Tumour A' maps to no label of the metastases stage")
    assert main(["scan", str(root), "--out", str(out), "--explain"]) == 0
    printed = capsys.readouterr().out
    assert "  c1/notes.txt: document (not read)" in printed.splitlines()
    assert "    segment 'Tumour A' -> ?" in printed.splitlines()
    template = tmp_path / "out" / "manifest.mapping.yaml"
    assert f"Wrote the mapping template {template}" in printed
    assert not out.exists() and sorted(p.name for p in out.parent.iterdir()) == ["manifest.mapping.yaml"]
    answer(template, metastases={"Tumour A": "osteoblastic"})
    assert main(["scan", str(root), "--out", str(out), "--mapping", str(template)]) == 0
    assert pd.read_csv(out, dtype=str).to_dict("records") == [
        row("c1", root / "c1" / "ct.nrrd", "metastases", root / "c1" / "mets.seg.nrrd")]
    raw = tmp_path / "raw"
    assert main(["import", "--manifest", str(out), "--stage", "metastases", "--out", str(raw),
                 "--mapping", str(template)]) == 0
    assert np.array_equal(imported(raw / "Dataset502_Metastases", "c1"), boxes({2: Z1}))
    other = tmp_path / "other.yaml"
    assert main(["scan", str(root), "--out", str(out), "--explain", "--mapping", str(template),
                 "--mapping-template", str(other)]) == 0
    assert "No open questions" in capsys.readouterr().out
    assert yaml.safe_load(other.read_text())["metastases"] == {"Tumour A": "osteoblastic"}
    assert main(["scan", str(root), "--out", str(out), "--explain", "--image", "{case}/ct.nrrd"]) == 2
    assert capsys.readouterr().err.startswith("spinemets: error: --explain: shows the discovered layout")


def test_verse_miccai_release_names_are_verse_too(tmp_path):
    """The MICCAI release of VerSe names files ``verse004_CT-orient_seg.nii.gz``: L6 is asked about, never our Sacrum."""
    root = tmp_path / "release"
    for i, case in enumerate(("verse004", "verse005"), start=1):
        ct = ct8(i)
        write_ct(ct, root / f"{case}_CT-orient.nii.gz")
        write_labelmap(boxes({24: Z1, 25: Z2}), ct, root / f"{case}_CT-orient_seg.nii.gz")  # L5, L6; no sacrum
        (root / f"{case}_CT-orient_iso-ctd.json").write_text("[]")
    with pytest.raises(SpinemetsError, match=r"verse004_CT-orient_seg\.nii\.gz: label value 25 maps to no label"):
        dataset.scan(root)
    template = tmp_path / "m.mapping.yaml"
    discovery.explain(root, template=template)
    answer(template, vertebrae={25: None})
    manifest = dataset.scan(root, mapping=template)
    assert list(manifest["mapping"]) == ["verse", "verse"]
    out = dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw", mapping=template)
    assert np.array_equal(imported(out, "verse004_CT-orient"), boxes({V["L5"]: Z1}))


@pytest.mark.parametrize("path, expected", [
    ("derivatives/sub-gl003/sub-gl003_dir-ax_seg-vert_msk.nii.gz", True),
    ("VerSe2020/p1/label.nii.gz", True),
    ("data/verse-19/p1/seg.nii.gz", True),
    ("reverse/p1/label.nii.gz", False),
    ("universe_scans/label.nii.gz", False),
])
def test_is_verse(path, expected):
    assert discovery.is_verse(path) is expected


def test_a_plain_label_map_with_25_says_it_is_taken_as_the_sacrum(tmp_path, caplog):
    root = tmp_path / "plain"
    ct = ct8()
    write_ct(ct, root / "p1" / "image.nii.gz")
    write_labelmap(boxes({24: Z1, 25: Z2}), ct, root / "p1" / "label.nii.gz")
    with caplog.at_level("WARNING", logger="spinemets.cohort.discovery"):
        manifest = dataset.scan(root)
    assert list(manifest["stage"]) == ["vertebrae"] and "mapping" not in manifest.columns
    assert any("p1/label.nii.gz: value 25 is taken as the Sacrum" in r.getMessage()
               and "--mapping verse" in r.getMessage() for r in caplog.records)
    assert "  note: p1/label.nii.gz: value 25 is taken as the Sacrum" in discovery.explain(root)


def test_a_totalsegmentator_total_map_is_asked_about_with_the_named_mappings(tmp_path, totalseg_dir):
    root = tmp_path / "ts"
    (root / "s1").mkdir(parents=True)
    (root / "s1" / "ct.nii.gz").write_bytes((totalseg_dir / "example_ct_sm.nii.gz").read_bytes())
    (root / "s1" / "seg.nii.gz").write_bytes((totalseg_dir / "example_seg.nii.gz").read_bytes())
    with pytest.raises(SpinemetsError, match="--mapping totalsegmentator; VerSe: --mapping verse"):
        dataset.scan(root)
    manifest = dataset.scan(root, mapping="totalsegmentator")
    assert rows_of(manifest) == [row("s1", root / "s1" / "ct.nii.gz", "vertebrae", root / "s1" / "seg.nii.gz")]
    out = dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw", mapping="totalsegmentator")
    present = {labels.label_names("vertebrae")[v] for v in np.unique(imported(out, "s1")) if v}
    assert present == {"T11", "T12", "L1", "L2"}
