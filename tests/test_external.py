"""External data in TCIA's DICOM layout: discovery and import of Spine-Mets-CT-SEG-like cohorts
(CT series + DICOM-SEG), and DICOM-SEG out of the prediction of a DICOM series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import SimpleITK as sitk

from dciodvfy import check_valid
from spinemets.cohort import dataset, discovery
from spinemets.inference import predict as inference
from spinemets.formats.dicomseg import DCIODVFY_WARNINGS as SEG_WARNINGS
from spinemets.formats.dicomseg import read_dicom_seg
from spinemets.formats.dicomsr import DCIODVFY_WARNINGS as SR_WARNINGS
from spinemets.formats.dicomsr import SR_FILE, read_lesion_report
from spinemets.errors import SpinemetsError
from spinemets.formats.images import read_image
from spinemets.cohort.tcia import COLLECTION, phantom_case, subject_id, write_tcia_cohort

CASES = 3
#: A training domain (as spinemets.domain records it) that the phantoms lie outside: 2.5 mm voxels.
RECORD = {"cohort": "synthetic", "cases": 24,
          "spacing_mm": {"min": [2.5, 2.5, 3.0], "max": [2.5, 2.5, 3.0]},
          "field_of_view_mm": {"min": [120.0, 120.0, 270.0], "max": [120.0, 120.0, 390.0]},
          "intensity_hu": {"p1": {"min": -1020.0, "max": -870.0}, "p50": {"min": 20.0, "max": 50.0},
                           "p99": {"min": 700.0, "max": 900.0}}}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("tcia")
    write_tcia_cohort(out, cases=CASES)
    return out


def _series_folders(cohort: Path, index: int) -> tuple[Path, Path]:
    """(CT series folder, SEG file) of a case, found by their folder names (not by the code under test)."""
    study, = (cohort / COLLECTION / subject_id(index)).iterdir()
    ct, = [d for d in study.iterdir() if d.name.startswith("2.000000-CT SPINE-")]
    seg, = [d for d in study.iterdir() if d.name.startswith("300.000000-Segmentation-")]
    return ct, seg / "1-1.dcm"


def test_scan_finds_the_tcia_layout_without_patterns(cohort):
    manifest = dataset.scan(cohort)
    expected = []
    for index in range(CASES):
        ct, seg = _series_folders(cohort, index)
        expected.append({"case_id": subject_id(index), "image": str(ct.resolve()), "stage": "vertebrae",
                         "segmentation": str(seg.resolve()), "split": "train"})
    assert manifest.to_dict("records") == expected
    assert list(manifest.columns) == dataset.MANIFEST_COLUMNS  # no mapping column: names, not values
    plan = discovery.discover(cohort)
    unused = dict(plan.unused)
    assert set(unused) == {"metadata.csv", "Spine-Mets-CT-SEG_clinical.csv"}
    assert "TCIA download table" in unused["metadata.csv"]
    assert "clinical table" in unused["Spine-Mets-CT-SEG_clinical.csv"]
    seg = plan.cases["SMCS-0001"]["segmentations"]["vertebrae"]
    assert seg.kind == "dicomseg" and seg.why == "its segment names are vertebrae"
    assert seg.entries["vertebrae"][0] == ("T1 vertebra", 8) and seg.entries["vertebrae"][-1] == ("L5 vertebra", 24)
    text = discovery.describe(plan)
    assert "(DICOM-SEG; its segment names are vertebrae)" in text and "segment 'T1 vertebra' -> T1 (8)" in text


def test_import_of_the_tcia_vertebrae_is_voxel_for_voxel_the_phantom(cohort, tmp_path):
    manifest = dataset.scan(cohort)
    folder = dataset.import_dataset(manifest, "vertebrae", tmp_path / "raw")
    for index in range(CASES):
        case = phantom_case(index)
        label = sitk.ReadImage(str(folder / "labelsTr" / f"{case['subject_id']}.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(label), case["vertebrae"])
        image = sitk.ReadImage(str(folder / "imagesTr" / f"{case['subject_id']}_0000.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(case["ct"]))
        np.testing.assert_allclose(label.GetOrigin(), case["ct"].GetOrigin(), atol=1e-4)


def test_read_mask_takes_a_seg_file_or_its_series_folder(cohort):
    ct_dir, seg = _series_folders(cohort, 1)
    ct = read_image(ct_dir)
    expected = phantom_case(1)["vertebrae"]
    for given in (seg, seg.parent):
        labelmap, report = dataset.read_mask(given, ct, "vertebrae", ct_path=ct_dir)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap), expected)
        assert report["segments"][0]["name"] == "T1 vertebra"


def test_read_mask_refuses_a_folder_of_two_segs(cohort, tmp_path):
    ct_dir, seg = _series_folders(cohort, 0)
    folder = tmp_path / "segs"
    folder.mkdir()
    for name in ("1-1.dcm", "1-2.dcm"):
        (folder / name).write_bytes(seg.read_bytes())
    with pytest.raises(SpinemetsError, match=rf"^{folder}: folder holds 2 DICOM-SEG files"):
        dataset.read_mask(folder, read_image(ct_dir), "vertebrae", ct_path=ct_dir)


def test_a_seg_of_another_frame_of_reference_is_refused_at_import(cohort, tmp_path):
    """The SEG of case 1 beside the CT of case 0: the import checks the SEG against its CT series."""
    ct_dir, _ = _series_folders(cohort, 0)
    _, other_seg = _series_folders(cohort, 1)
    with pytest.raises(SpinemetsError, match="Frame of Reference UID"):
        dataset.read_mask(other_seg, read_image(ct_dir), "vertebrae", ct_path=ct_dir)


# ---------------------------------------------------------------------------------------------
# DICOM series in, DICOM-SEG out


def test_find_inputs_takes_tcia_case_folders_and_one_series_folder(cohort, tmp_path):
    found = inference.find_inputs(cohort / COLLECTION)
    assert found == {subject_id(i): _series_folders(cohort, i)[0] for i in range(CASES)}
    # one series folder as the input: its name is the case (TCIA's has spaces, so a plain copy)
    single = tmp_path / "case07"
    single.mkdir()
    for file in _series_folders(cohort, 0)[0].iterdir():
        (single / file.name).write_bytes(file.read_bytes())
    assert inference.find_inputs(single) == {"case07": single}
    # a case folder with two CT series is an error naming it
    two = tmp_path / "two" / "c1"
    for name in ("a", "b"):
        (two / name).mkdir(parents=True)
        for file in sorted(single.iterdir())[:3]:
            (two / name / file.name).write_bytes(file.read_bytes())
    with pytest.raises(SpinemetsError, match=rf"^{two}: case folder holds 2 DICOM image series"):
        inference.find_inputs(two.parent)
    # SEG series alone are no CTs
    seg_only = tmp_path / "segonly" / "c1"
    seg_only.mkdir(parents=True)
    (seg_only / "1-1.dcm").write_bytes(_series_folders(cohort, 0)[1].read_bytes())
    with pytest.raises(SpinemetsError, match="no CT images"):
        inference.find_inputs(seg_only.parent)


def _stages(vertebrae, lesions):
    return (lambda ct, spacing: vertebrae.copy(), lambda ct, spacing: lesions.copy())


def test_predict_case_of_a_dicom_series_writes_dicom_seg(cohort, tmp_path):
    ct_dir, _ = _series_folders(cohort, 0)
    case = phantom_case(0)
    vertebrae = case["vertebrae"]
    lesions = np.zeros_like(vertebrae)
    z = np.nonzero(vertebrae == 20)[0]
    lesions[z.min():z.min() + 2, 20:24, 20:24] = 1
    lesions[z.min():z.min() + 2, 26:28, 20:24] = 2
    lesions[vertebrae == 0] = 0
    options = inference.PredictOptions().resolved("paper")
    out = tmp_path / "out" / "SMCS-0001"
    _, _, _, _, report, _ = inference.predict_case(ct_dir, out, "SMCS-0001", _stages(vertebrae, lesions), options,
                                                   {"vertebrae": RECORD, "metastases": RECORD})
    assert not report["in_domain"]  # 1.5 x 1.5 x 3 mm phantoms, 48 voxels wide: the warning goes along
    ct = read_image(ct_dir)
    ct_uid = pydicom.dcmread(str(next(ct_dir.iterdir())), stop_before_pixels=True).SeriesInstanceUID
    check_valid(out / SR_FILE, SR_WARNINGS)
    for stage in ("vertebrae", "metastases"):
        check_valid(out / f"{stage}.dcm", SEG_WARNINGS)
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{stage}.nii.gz")))
        assert written.any()
        labelmap, seg_report = read_dicom_seg(out / f"{stage}.dcm", ct, stage, ct_series_dir=ct_dir)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap), written)
        assert seg_report["referenced_series"] == [ct_uid]
        ds = pydicom.dcmread(str(out / f"{stage}.dcm"))
        description = f"spinemets {stage} prediction of case SMCS-0001. WARNING: {report['warning']}"
        assert ds.ImageComments == " ".join(description.split())
        assert ds.SeriesDescription == description[:64].strip() == ds.ContentDescription
        assert "WARNING: case SMCS-0001 is outside the training domain" in ds.ImageComments
        assert ds.StudyInstanceUID == pydicom.dcmread(str(next(ct_dir.iterdir())), stop_before_pixels=True).StudyInstanceUID
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_dicom_seg(out / "vertebrae.dcm", ct, "vertebrae")[0]),
                                  vertebrae)
    # a rerun without lesions: no metastasis SEG (a SEG needs a segment), and the old one is gone
    inference.predict_case(ct_dir, out, "SMCS-0001", _stages(vertebrae, np.zeros_like(lesions)), options)
    assert (out / "vertebrae.dcm").is_file() and not (out / "metastases.dcm").exists()
    check_valid(out / SR_FILE, SR_WARNINGS)  # the SR of vertebrae without lesions
    assert read_lesion_report(out / SR_FILE)["lesions"] == []
    assert (out / "metastases.seg.nrrd").is_file()


def test_predict_case_of_a_file_writes_no_dicom_seg(tmp_path):
    image = sitk.GetImageFromArray(np.full((8, 8, 8), 40, np.int16))
    path = tmp_path / "c1.nii.gz"
    sitk.WriteImage(image, str(path))
    vertebrae = np.zeros((8, 8, 8), np.uint8)
    vertebrae[2:6, 2:6, 2:6] = 20
    inference.predict_case(path, tmp_path / "out", "c1", _stages(vertebrae, np.zeros_like(vertebrae)),
                           inference.PredictOptions().resolved("paper"))
    assert (tmp_path / "out" / "vertebrae.seg.nrrd").is_file()
    assert not list((tmp_path / "out").glob("*.dcm"))


# ---------------------------------------------------------------------------------------------
# the comparison against the clinical table (spinemets.evaluation.external), on hand-made tables


def _clinical(tmp_path, rows):
    """A clinical CSV in tcia.py's columns; ``rows``: subject -> {vertebra: type}."""
    from spinemets.cohort.tcia import CLINICAL_COLUMNS, TCIA_VERTEBRAE

    path = tmp_path / "clinical.csv"
    lines = [",".join(CLINICAL_COLUMNS)]
    for subject, kinds in rows.items():
        listed = ";".join(v for v in TCIA_VERTEBRAE if v in kinds)
        lines.append(",".join([subject, listed, *(kinds.get(v, "") for v in TCIA_VERTEBRAE)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def _predicted(pred_dir, case, rows):
    """A case's vertebrae.csv as predict writes it: ``rows`` = [(vertebra, lesions, lesion_quality)]."""
    from spinemets.labels import VERTEBRA_COLUMNS

    folder = pred_dir / case
    folder.mkdir(parents=True)
    lines = [",".join(VERTEBRA_COLUMNS)]
    for vertebra, count, quality in rows:
        record = dict.fromkeys(VERTEBRA_COLUMNS, "")
        record.update(case_id=case, vertebra=vertebra, lesions=str(count), lesion_quality=quality, volume_ml="1.0")
        lines.append(",".join(record[c] for c in VERTEBRA_COLUMNS))
    (folder / "vertebrae.csv").write_text("\n".join(lines) + "\n")


def test_detection_and_type_confusion_hand_computed(tmp_path):
    from spinemets.evaluation import external

    clinical = _clinical(tmp_path, {"A": {"T4": "lytic", "L2": "blastic"}, "B": {"T12": "mixed"},
                                    "C": {"L1": "lytic"}})  # C is not predicted: not compared
    pred = tmp_path / "pred"
    # A: T4 lytic found as lytic (TP), L2 missed (FN), T5 a lesion where none is (FP); L3 row without lesion
    _predicted(pred, "A", [("T4", 1, "lytic"), ("T5", 2, "mixed"), ("L3", 0, "")])
    # B: T12 mixed found as blastic (TP, wrong type); T1 not found by stage 1 at all (no row: no lesion)
    _predicted(pred, "B", [("T12", 1, "blastic"), ("C7", 1, "lytic")])  # C7 is not compared
    summary = external.evaluate(clinical, pred, tmp_path / "out")
    # 2 cases x 17 vertebrae = 34 pairs; TP 2 (A T4, B T12), FP 1 (A T5), FN 1 (A L2), TN 30
    assert summary["detection"] == {"vertebrae": 34, "cases": 2, "tp": 2, "fp": 1, "fn": 1, "tn": 30,
                                    "sensitivity": 2 / 3, "specificity": 30 / 31}
    assert summary["cases"] == ["A", "B"]
    types = pd.read_csv(tmp_path / "out" / "types.csv", index_col="reference")
    expected = pd.DataFrame(0, index=list(external.TYPES), columns=list(external.TYPES))
    expected.loc["none", "none"] = 30
    expected.loc["none", "mixed"] = 1  # A T5
    expected.loc["lytic", "lytic"] = 1  # A T4
    expected.loc["blastic", "none"] = 1  # A L2
    expected.loc["mixed", "blastic"] = 1  # B T12
    expected.index.name = "reference"
    pd.testing.assert_frame_equal(types, expected)
    table = pd.read_csv(tmp_path / "out" / "vertebrae.csv", keep_default_na=False)
    assert len(table) == 34 and table.loc[(table.case_id == "A") & (table.vertebra == "L2"), "predicted"].item() == "none"


def test_no_positive_reference_gives_nan_sensitivity():
    from spinemets.evaluation import external

    table = pd.DataFrame({"case_id": ["A", "A"], "vertebra": ["T1", "T2"], "reference": ["none", "none"],
                          "predicted": ["none", "lytic"]})
    result = external.detection(table)
    assert np.isnan(result["sensitivity"]) and result["specificity"] == 0.5


def test_clinical_table_errors_name_the_file_row_and_column(tmp_path):
    from spinemets.evaluation import external

    path = _clinical(tmp_path, {"A": {"T4": "osteoporotic"}})
    with pytest.raises(SpinemetsError, match=rf"^{path}: row 2 \(A\), column T4: lesion type 'osteoporotic'"):
        external.read_clinical(path)
    path.write_text(path.read_text().replace("osteoporotic", "Sclerotic"))
    assert external.read_clinical(path).set_index("vertebra").loc["T4", "reference"] == "blastic"
    path.write_text(path.read_text().replace("\nA,T4,", "\nA,T5,"))  # vertebrae_with_lesions says T5
    with pytest.raises(SpinemetsError, match=rf"^{path}: row 2 \(A\): vertebrae_with_lesions lists \['T5'\]"):
        external.read_clinical(path)
    pred = tmp_path / "pred"
    _predicted(pred, "Z", [("T4", 1, "lytic")])
    with pytest.raises(SpinemetsError, match=r"has no row for the predicted case\(s\) \['Z'\]"):
        external.evaluate(_clinical(tmp_path, {"A": {}}), pred, tmp_path / "out")


def test_vertebra_dice_hand_computed(tmp_path):
    from spinemets.evaluation import external

    ref = np.zeros((4, 4, 4), np.uint8)
    pred = np.zeros_like(ref)
    ref[0, :2, :2] = 8  # T1: 4 voxels
    pred[0, :2, :1] = 8  # 2 of them predicted: Dice 2*2 / (2+4) = 2/3
    ref[2, :, :] = 20  # L1: 16 voxels, predicted as L2: Dice 0 for both
    pred[2, :, :] = 21
    for folder, array in ((tmp_path / "labels", ref), (tmp_path / "pred" / "c1", pred)):
        folder.mkdir(parents=True)
        sitk.WriteImage(sitk.GetImageFromArray(array), str(folder / ("c1.nii.gz" if folder.name == "labels"
                                                                      else "vertebrae.nii.gz")))
    dice = external.vertebra_dice(tmp_path / "labels", tmp_path / "pred", ["c1"]).set_index("vertebra")
    assert len(dice) == 17
    assert dice.loc["T1", "dice"] == pytest.approx(2 / 3)
    assert dice.loc["T1", "reference_voxels"] == 4 and dice.loc["T1", "predicted_voxels"] == 2
    assert dice.loc["L1", "dice"] == 0.0 and dice.loc["L2", "dice"] == 0.0
    assert np.isnan(dice.loc["T7", "dice"])
