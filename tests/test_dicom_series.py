"""DICOM series as hospitals send them (tests/messy_dicom.py), through ``predict``: each kind predicts
with valid DICOM-SEG and SR (dciodvfy), predicts without DICOM outputs and says why, or is refused in
one line before any model runs; and the SR lesion report (spinemets.formats.dicomsr) read back into the tables."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dciodvfy import check_valid
from messy_dicom import OUTCOMES, write_messy_series
from spinemets import cli
from spinemets.inference import predict as inference
from spinemets import labels as labels_mod
from spinemets.formats.dicom import check_series
from spinemets.formats.dicomsr import DCIODVFY_WARNINGS as SR_WARNINGS
from spinemets.formats.dicomsr import SR_FILE, read_lesion_report, report_table
from spinemets.formats.dicomseg import DCIODVFY_WARNINGS as SEG_WARNINGS
from spinemets.formats.dicomseg import read_dicom_seg
from spinemets.errors import SpinemetsError
from spinemets.formats.images import read_image
from test_external import RECORD

V = labels_mod.labels("vertebrae")
OPTIONS = inference.PredictOptions(min_lesion_ml=0, min_vertebra_ml=0).resolved("paper")


def _maps(shape) -> tuple[np.ndarray, np.ndarray]:
    """A vertebra (T12) in the middle of any CT, a lytic and a sclerotic lesion inside it, one lytic
    lesion outside the spine (a corner), and the sacrum below with a sclerotic lesion (its partial
    SINS has no location points)."""
    z, y, x = shape
    vertebrae = np.zeros(shape, np.uint8)
    vertebrae[z // 4:z - z // 4, y // 4:y - y // 4, x // 4:x - x // 4] = V["T12"]
    vertebrae[z - z // 4:, y // 4:y - y // 4, x // 4:x - x // 4] = V["Sacrum"]
    lesions = np.zeros(shape, np.uint8)
    lesions[z // 4:z // 4 + 1, y // 4:y // 4 + 2, x // 4:x // 4 + 2] = labels_mod.LYTIC
    lesions[z - z // 4 - 1, y - y // 4 - 2:y - y // 4, x - x // 4 - 2:x - x // 4] = labels_mod.SCLEROTIC
    lesions[0, 0, 0] = labels_mod.LYTIC
    lesions[z - 1, y // 4, x // 4] = labels_mod.SCLEROTIC
    return vertebrae, lesions


class _FakeStage:
    """A stage that returns a fixed label map for the CT it is given (its shape decides)."""

    models = [{"folder": "stand-in", "configuration": "none", "trainer": "none", "folds": ["all"]}]
    postprocessing = None
    domain = RECORD

    def __init__(self, which: int):
        self.which = which

    def __call__(self, array, spacing):
        return _maps(array.shape)[self.which]


def _stages():
    return _FakeStage(0), _FakeStage(1)


def _rows(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _same(text: str, value) -> bool:
    """A table cell (text) and the value read from the SR."""
    if text == "" or value == "":
        return text == "" and value == ""
    try:
        number = float(text)
    except ValueError:
        return text == str(value)
    return (math.isnan(number) and math.isnan(float(value))) or number == float(value)


def _round_trip(case_dir) -> dict:
    """Every cell of the case's lesions.csv and vertebrae.csv is read back from its SR."""
    report = read_lesion_report(case_dir / SR_FILE)
    for table, rows in (("lesions.csv", report["lesions"]), ("vertebrae.csv", report["vertebrae"])):
        expected = _rows(case_dir / table)
        assert len(rows) == len(expected) > 0, table
        for want, got in zip(expected, rows):
            assert list(want) == list(got), table
            bad = {k: (want[k], got[k]) for k in want if not _same(want[k], got[k])}
            assert not bad, f"{table}: {bad}"
    return report


@pytest.mark.parametrize("kind", [k for k, (outcome, _) in OUTCOMES.items() if outcome == "refuse"])
def test_refused_series_are_refused_before_any_model_runs(kind, tmp_path):
    folder = write_messy_series(tmp_path / "in" / "case1", kind)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SpinemetsError) as err:
        inference.check_inputs(inference.find_inputs(folder))
    message = str(err.value)
    assert OUTCOMES[kind][1] in message and "\n" not in message
    assert message.startswith(str(folder))  # the folder or a file in it
    with pytest.raises(SpinemetsError, match="^" + str(folder)):  # predict_case checks before its stages run
        inference.predict_case(folder, tmp_path / "out" / "case1", "case1", (None, None), OPTIONS)
    assert not (tmp_path / "out").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # the source is never changed


@pytest.mark.parametrize("kind", [k for k, (outcome, _) in OUTCOMES.items() if outcome != "refuse"])
def test_series_that_predict_write_valid_dicom_or_say_why_not(kind, tmp_path):
    outcome, reason = OUTCOMES[kind]
    folder = write_messy_series(tmp_path / "in" / "case1", kind)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    case_dir = tmp_path / "out" / "case1"
    lesion_rows, _, _, _, report, dicom_outputs = inference.predict_case(folder, case_dir, "case1", _stages(), OPTIONS,
                                                                         {"vertebrae": RECORD, "metastases": RECORD})
    levels = {r["level"] for r in lesion_rows}  # the corner lesion: near T12, or outside the spine on a large CT
    assert len(lesion_rows) == 4 and {"T12", "Sacrum"} <= levels <= {"T12", "Sacrum", "outside spine"}
    for name in ("vertebrae.nii.gz", "metastases.nii.gz", "vertebrae.seg.nrrd", "metastases.seg.nrrd",
                 "lesions.csv", "vertebrae.csv"):
        assert (case_dir / name).is_file(), name
    record = dicom_outputs
    dicom = sorted(p.name for p in case_dir.glob("*.dcm"))
    if outcome == "no-dicom":
        assert dicom == [] and record["written"] == [] and reason in record["not_written"]
        return
    assert dicom == ["metastases.dcm", SR_FILE, "vertebrae.dcm"] and record["not_written"] is None
    assert sorted(record["written"]) == dicom
    ct = read_image(folder)
    uid = check_series(folder)["uid"]
    for stage in ("vertebrae", "metastases"):
        check_valid(case_dir / f"{stage}.dcm", SEG_WARNINGS)
        labelmap, seg_report = read_dicom_seg(case_dir / f"{stage}.dcm", ct, stage, ct_series_dir=folder)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(labelmap),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / f"{stage}.nii.gz"))))
        assert seg_report["referenced_series"] == [uid]
    check_valid(case_dir / SR_FILE, SR_WARNINGS)
    sr = _round_trip(case_dir)
    assert sr["referenced_series"] == [uid]
    assert "outside the training domain" in sr["warning"] and sr["warning"] == " ".join(report["warning"].split())
    ds = pydicom.dcmread(case_dir / SR_FILE)
    assert str(ds.PatientName) == "case1" == ds.PatientID and ds.PatientIdentityRemoved == "YES"
    source = pydicom.dcmread(next(p for p in sorted(folder.iterdir()) if p.name != "old-seg.dcm"))
    identifiers = {str(source.get(k, "")) for k in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName",
                                                    "StudyDate", "AccessionNumber", "ReferringPhysicianName")}
    identifiers = {v for v in identifiers if len(v) >= 6}
    assert identifiers, "the source carries identifiers to look for"
    for name in dicom:  # no identifier of the source header in any DICOM output (values compared whole;
        # the source's UIDs are kept, to reference it, and their digits may hold a date)
        values = {str(el.value) for el in pydicom.dcmread(case_dir / name).iterall()
                  if el.VR not in ("SQ", "UI") and el.keyword != "PixelData"}
        assert not identifiers & values, name
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    if kind == "sop-class-in-file-meta-only":
        assert record["repaired"] == ["SOP Class UID blank in the data set: taken from the file meta "
                                      "(Media Storage SOP Class UID)"]


def test_compressed_series_are_decoded_voxel_for_voxel(tmp_path):
    """RLE and JPEG-LS copies of pydicom's CT slice and its JPEG 2000 (lossless) MR slice, decoded by
    GDCM, equal the uncompressed slices pydicom ships."""
    from pydicom.data import get_testdata_file

    ct, mr = (pydicom.dcmread(get_testdata_file(name)) for name in ("CT_small.dcm", "MR_small.dcm"))
    for kind, expected in (("real-ct-rle", ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)),
                           ("real-ct-jpeg-ls", ct.pixel_array * float(ct.RescaleSlope) + float(ct.RescaleIntercept)),
                           ("jpeg2000", mr.pixel_array - 1024.0)):  # relabelled as CT with intercept -1024
        image = read_image(write_messy_series(tmp_path / kind, kind))
        for k in range(image.GetSize()[2]):
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[k], expected, err_msg=kind)


def test_the_anonymised_series_of_the_issue_through_the_command_line(tmp_path, monkeypatch, capsys, caplog):
    """Blanked SOP Class, Study and Series UIDs: exit 0, the non-DICOM outputs, and the reason in the
    log and the provenance (it once ended in exit 70 after both stages had run)."""
    folder = write_messy_series(tmp_path / "in" / "case1", "uids-blanked")
    stages = dict(zip(("vertebrae", "metastases"), _stages()))
    monkeypatch.setattr(inference, "_Stage", lambda stage, *a: stages[stage])
    out = tmp_path / "out"
    assert cli.main(["predict", "--input", str(folder), "--out", str(out), "--profile", "paper"]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert "case case1: no DICOM output (SEG, SR): the series cannot be referenced" in caplog.text
    assert (out / "case1" / "metastases.seg.nrrd").is_file() and not list(out.rglob("*.dcm"))
    prov = json.loads((out / "provenance.json").read_text())
    assert "Series Instance UID blank or missing in 6 of 6 slice(s)" in prov["dicom_outputs"]["case1"]["not_written"]


def test_a_rerun_on_a_series_without_uids_removes_the_old_dicom_outputs(tmp_path):
    folder = write_messy_series(tmp_path / "in" / "case1", "clean")
    case_dir = tmp_path / "out" / "case1"
    inference.predict_case(folder, case_dir, "case1", _stages(), OPTIONS)
    assert len(list(case_dir.glob("*.dcm"))) == 3
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = ""
        ds.save_as(path)
    result = inference.predict_case(folder, case_dir, "case1", _stages(), OPTIONS)
    assert not list(case_dir.glob("*.dcm")) and "Study Instance UID blank" in result.dicom_outputs["not_written"]


def test_nothing_found_gives_no_dicom_objects(tmp_path):
    folder = write_messy_series(tmp_path / "in" / "case1", "clean")
    case_dir = tmp_path / "out" / "case1"
    nothing = lambda ct, spacing: np.zeros(ct.shape, np.uint8)  # noqa: E731
    result = inference.predict_case(folder, case_dir, "case1", (nothing, nothing), OPTIONS)
    assert not list(case_dir.glob("*.dcm")) and result.dicom_outputs == {"written": [], "not_written": None,
                                                                        "repaired": []}
    assert (case_dir / "vertebrae.seg.nrrd").is_file()


def test_report_table_shows_what_a_pacs_lists(tmp_path):
    folder = write_messy_series(tmp_path / "in" / "case1", "clean")
    case_dir = tmp_path / "out" / "case1"
    inference.predict_case(folder, case_dir, "case1", _stages(), OPTIONS, {"vertebrae": RECORD, "metastases": RECORD})
    rows = report_table(case_dir / SR_FILE)
    lesion = {r["item"]: r for r in rows if r["group"] == "lesion 1"}
    first = _rows(case_dir / "lesions.csv")[0]
    assert lesion["Volume"]["unit"] == "milliliter" and float(lesion["Volume"]["value"]) == float(first["volume_ml"])
    assert float(lesion["Attenuation Coefficient (Mean)"]["value"]) == float(first["mean_hu"])
    assert lesion["Finding Site"]["value"] == "T12 vertebra" and lesion["Bone lesion type"]["value"] == "Lytic"
    assert lesion["Referenced Segment"]["value"].startswith("segment 1 of ")
    vertebra = {r["item"]: r["value"] for r in rows if r["group"] == "vertebra T12"}
    assert vertebra["SINS bone lesion quality"] == "Mixed" and vertebra["Partial SINS points"] in ("4", "4.0")
    assert any(r["item"] == "Finding" and "outside the training domain" in r["value"] for r in rows)


def test_read_lesion_report_refuses_other_files(tmp_path):
    folder = write_messy_series(tmp_path / "case1", "clean")
    with pytest.raises(SpinemetsError, match="not a spinemets lesion report"):
        read_lesion_report(next(folder.iterdir()))
    (tmp_path / "x.dcm").write_text("not dicom")
    with pytest.raises(SpinemetsError, match="x.dcm: cannot read DICOM file"):
        read_lesion_report(tmp_path / "x.dcm")


def test_a_nifti_ct_sent_as_a_dicom_series_gives_the_pacs_view(tmp_path):
    """The inference chapter's section: a CT kept as NIfTI written as a DICOM series
    (spinemets.cohort.tcia.write_ct_series), predicted, and its SEG read back onto the CT."""
    from spinemets.formats.dicomseg import read_dicom_seg
    from spinemets.cohort.tcia import write_ct_series

    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(100, 300, (8, 14, 12)).astype(np.float32))
    image.SetSpacing((0.8, 0.9, 2.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # as nnU-Net's import often leaves them (RAS on disk)
    series_dir = write_ct_series(image, tmp_path / "dicom-input" / "case_001", "case_001")
    ct = read_image(series_dir)
    np.testing.assert_allclose(ct.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ct),
                                  np.trunc(np.clip(sitk.GetArrayFromImage(image), -32768, 32767)))
    assert check_series(series_dir)["dicom_output"]
    check_valid(next(series_dir.iterdir()), SEG_WARNINGS)  # a valid CT slice (tcia's explained warnings)
    case_dir = tmp_path / "predictions-dicom" / "case_001"
    inference.predict_case(series_dir, case_dir, "case_001", _stages(), OPTIONS)
    check_valid(case_dir / "metastases.dcm", SEG_WARNINGS)
    check_valid(case_dir / SR_FILE, SR_WARNINGS)
    _round_trip(case_dir)
    labelmap, _ = read_dicom_seg(case_dir / "metastases.dcm", ct, "metastases", ct_series_dir=series_dir)
    assert (sitk.GetArrayFromImage(labelmap) == _maps(sitk.GetArrayFromImage(ct).shape)[1]).all()
    with pytest.raises(SpinemetsError, match="case ID"):
        write_ct_series(image, tmp_path / "x", "bad name")


def test_the_validator_fails_on_the_seg_the_issue_met(tmp_path):
    """Positive control of the dciodvfy check: a SEG with empty Type 1 UIDs in its references (what
    the writer once produced from an anonymised series) fails it."""
    folder = write_messy_series(tmp_path / "in" / "case1", "clean")
    case_dir = tmp_path / "out" / "case1"
    inference.predict_case(folder, case_dir, "case1", _stages(), OPTIONS)
    ds = pydicom.dcmread(case_dir / "vertebrae.dcm")
    ds.StudyInstanceUID = ""
    ds.ReferencedSeriesSequence[0].SeriesInstanceUID = ""
    ds.save_as(tmp_path / "broken.dcm")
    with pytest.raises(AssertionError, match="dciodvfy finds errors"):
        check_valid(tmp_path / "broken.dcm", SEG_WARNINGS)


def test_the_validator_check_skips_or_fails_without_dciodvfy(monkeypatch):
    import dciodvfy

    monkeypatch.setattr(dciodvfy.shutil, "which", lambda name: None)
    monkeypatch.delenv(dciodvfy.REQUIRE, raising=False)
    with pytest.raises(pytest.skip.Exception, match="apt-get install -y dicom3tools"):
        dciodvfy.dciodvfy()
    monkeypatch.setenv(dciodvfy.REQUIRE, "1")
    with pytest.raises(pytest.fail.Exception, match="SPINEMETS_REQUIRE_DCIODVFY=1 but dciodvfy"):
        dciodvfy.dciodvfy()


def test_read_lesion_report_names_a_group_it_cannot_read(tmp_path):
    folder = write_messy_series(tmp_path / "in" / "case1", "clean")
    case_dir = tmp_path / "out" / "case1"
    inference.predict_case(folder, case_dir, "case1", _stages(), OPTIONS)
    ds = pydicom.dcmread(case_dir / SR_FILE)
    measurements = next(i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
    group = measurements.ContentSequence[0]
    group.ContentSequence = [c for c in group.ContentSequence  # the lesion type evaluation removed
                             if c.ConceptNameCodeSequence[0].CodeValue != "LT"]
    ds.save_as(tmp_path / "other.dcm")
    with pytest.raises(SpinemetsError, match=r"other\.dcm: measurement group 'lesion 1' is not one spinemets writes"):
        read_lesion_report(tmp_path / "other.dcm")
