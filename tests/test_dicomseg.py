"""spinemets.formats.dicomseg and spinemets.cohort.tcia: DICOM-SEG in and out, and the Spine-Mets-CT-SEG-like cohort."""

from __future__ import annotations

import csv

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.pixels import pack_bits
from pydicom.sr.codedict import codes

from dciodvfy import check_valid
from fakes import IDENTIFIERS, synthetic_volume, write_dicom_series
from spinemets import __version__
from spinemets import labels as labels_mod
from spinemets.formats.dicomseg import (DCIODVFY_WARNINGS, build_segmentation, is_dicom_seg, read_dicom_seg, save_segmentation,
                                 write_dicom_seg)
from spinemets.errors import SpinemetsError
from spinemets.formats.images import read_image
from spinemets.cohort.tcia import CLINICAL_COLUMNS, CLINICAL_FILE, COLLECTION, TCIA_VERTEBRAE, phantom_case, \
    write_tcia_cohort

UID_A = "1.2.826.0.1.3680043.9.7433.2.1"
UID_B = "1.2.826.0.1.3680043.9.7433.2.2"
FOR_A = "1.2.826.0.1.3680043.9.7433.3.1"
FOR_B = "1.2.826.0.1.3680043.9.7433.3.2"
V = labels_mod.labels("vertebrae")


@pytest.fixture
def series(tmp_path):
    """A CT series (10 slices of 9 x 12 pixels) with a Frame of Reference UID, patient identifiers and a
    scanner (which highdicom copies, with the institution and acquisition time, as contributing equipment)."""
    folder = tmp_path / "ct"
    scanner = {"0008|0070": "Acme Medical", "0008|0022": IDENTIFIERS["0008|0020"], "0008|0032": IDENTIFIERS["0008|0030"]}
    write_dicom_series(folder, UID_A, synthetic_volume(n_slices=10, rows=12, columns=9),
                       extra_tags={"0020|0052": FOR_A, "0020|0011": "2", **scanner})
    return folder, read_image(folder)


def _labelmap(ct: sitk.Image, array: np.ndarray) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(ct)
    return image


def _vertebrae(ct: sitk.Image) -> np.ndarray:
    array = np.zeros(sitk.GetArrayViewFromImage(ct).shape, dtype=np.uint8)  # z, y, x
    array[1:4, 2:7, 1:5] = V["T1"]
    array[5:8, 3:9, 2:8] = V["L1"]
    array[9, 0:2, 0:2] = V["Sacrum"]
    return array


def _hd_seg(folder, pixel_array, names, segmentation_type="BINARY", **kwargs):
    """A SEG written with highdicom directly (stacked segments: pixel_array is z, y, x, segment)."""
    sources = [pydicom.dcmread(f) for f in sorted(folder.iterdir())]
    sources.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # the fakes' slice order is GDCM's
    algorithm = hd.AlgorithmIdentificationSequence(name="test", version="1", family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(i + 1, name, codes.SCT.AnatomicalStructure, codes.SCT.Vertebra,
                                              "AUTOMATIC", algorithm) for i, name in enumerate(names)]
    return hd.seg.Segmentation(sources, pixel_array, segmentation_type, descriptions, hd.UID(), 300, hd.UID(), 1,
                               "test", "test", "1", "0", **kwargs)


def _strings(ds) -> list[tuple[str, str]]:
    """(keyword, value) of every data element below ``ds`` (file meta and sequences included, pixel data not)."""
    out = []
    for dataset in (getattr(ds, "file_meta", None), ds):
        for element in (dataset.iterall() if dataset is not None else []):
            if element.VR == "SQ" or element.keyword == "PixelData":
                continue
            value = element.value
            out.append((element.keyword, value.decode("latin-1") if isinstance(value, bytes) else str(value)))
    return out


def _leaked(ds) -> set[str]:
    """IDENTIFIERS values found in any element (UIDs compared whole: their random digits may hold a date)."""
    wanted = set(IDENTIFIERS.values()) | {v.split("^")[0] for v in IDENTIFIERS.values() if "^" in v}
    found = set()
    for keyword, value in _strings(ds):
        uid = keyword.endswith("UID") or keyword in ("ReferencedSOPInstanceUID",)
        found |= {w for w in wanted if (w == value if uid else w in value)}
    return found


# ---------------------------------------------------------------------------------------------
# round trip


def test_round_trip_labels_geometry_names_and_references(series, tmp_path):
    folder, ct = series
    array = _vertebrae(ct)
    out = write_dicom_seg(_labelmap(ct, array), "vertebrae", folder, tmp_path / "out" / "pred.dcm",
                          description="spinemets vertebrae prediction " + "x" * 80)
    assert out == tmp_path / "out" / "pred.dcm"
    assert is_dicom_seg(out)
    check_valid(out, DCIODVFY_WARNINGS)

    image, report = read_dicom_seg(out, ct, "vertebrae", ct_series_dir=folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(image, get)() == getattr(ct, get)()
    assert [(s["name"], s["label"], s["voxels"]) for s in report["segments"]] == [
        ("T1", V["T1"], 60), ("L1", V["L1"], 108), ("Sacrum", V["Sacrum"], 4)]
    assert report["ignored"] == [] and report["contested_voxels"] == 0 and report["segmentation_type"] == "BINARY"
    assert report["referenced_series"] == [UID_A]

    ds = pydicom.dcmread(out)  # plain pydicom
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.iterdir())]
    assert ds.Modality == "SEG" and ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.SegmentationType == "BINARY"
    assert ds.StudyInstanceUID == sources[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == FOR_A
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == UID_A
    assert {i.ReferencedSOPInstanceUID for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == \
        {s.SOPInstanceUID for s in sources}
    assert len(ds.SeriesDescription) == 64 and ds.SeriesDescription.startswith("spinemets vertebrae prediction x")
    assert ds.ContentDescription == ds.SeriesDescription and ds.ContentLabel == "VERTEBRAE"
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "T1" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "spinemets"
    assert segment.SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion == __version__
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"  # Anatomical Structure
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "64864005"  # T1 vertebra
    assert ds.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "54735007"  # Sacrum

    seg = hd.seg.segread(out)  # and highdicom
    assert [seg.get_segment_description(n).SegmentLabel for n in seg.segment_numbers] == ["T1", "L1", "Sacrum"]
    # highdicom's own reading of the frames (by source slice) agrees with ours
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[s.SOPInstanceUID for s in sorted(sources, key=lambda s: s.ImagePositionPatient[2])],
        combine_segments=True, ignore_spatial_locations=True, assert_missing_frames_are_empty=True)
    expected = np.select([array == V["T1"], array == V["L1"], array == V["Sacrum"]], [1, 2, 3], 0)
    np.testing.assert_array_equal(pixels, expected)


def test_round_trip_of_the_metastasis_stage(series, tmp_path):
    folder, ct = series
    array = np.zeros(sitk.GetArrayViewFromImage(ct).shape, dtype=np.uint8)
    array[2:4, 3:6, 2:5] = labels_mod.LYTIC
    array[6, 7:10, 4:8] = labels_mod.SCLEROTIC
    out = write_dicom_seg(_labelmap(ct, array), "metastases", folder, tmp_path / "lesions.dcm")
    check_valid(out, DCIODVFY_WARNINGS)
    image, report = read_dicom_seg(out, ct, "metastases", ct_series_dir=folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    assert [s["name"] for s in report["segments"]] == ["lytic", "sclerotic"]
    ds = pydicom.dcmread(out)
    for item in ds.SegmentSequence:
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # Morphologically Abnormal
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == "14799000"  # Neoplasm, metastatic


def test_a_sparse_seg_with_frames_in_any_order_is_placed_by_geometry(series, tmp_path):
    folder, ct = series
    array = _vertebrae(ct)
    out = write_dicom_seg(_labelmap(ct, array), "vertebrae", folder, tmp_path / "pred.dcm")
    ds = pydicom.dcmread(out)
    # sparse: one frame per (slice, segment) where the segment is present, not 10 slices x 3 segments
    assert int(ds.NumberOfFrames) == 3 + 3 + 1
    frames = ds.pixel_array
    order = np.random.default_rng(1).permutation(len(frames))
    assert list(order) != sorted(order)
    groups = list(ds.PerFrameFunctionalGroupsSequence)
    ds.PerFrameFunctionalGroupsSequence = [groups[i] for i in order]
    ds.PixelData = pack_bits(frames[order])
    shuffled = tmp_path / "shuffled.dcm"
    ds.save_as(shuffled)
    image, _ = read_dicom_seg(shuffled, ct, "vertebrae")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)


def test_frames_without_plane_position_are_placed_at_their_source_slice(series, tmp_path):
    folder, ct = series
    array = _vertebrae(ct)
    ds = pydicom.dcmread(write_dicom_seg(_labelmap(ct, array), "vertebrae", folder, tmp_path / "pred.dcm"))
    for group in ds.PerFrameFunctionalGroupsSequence:
        del group.PlanePositionSequence
    stripped = tmp_path / "no-positions.dcm"
    ds.save_as(stripped)
    image, _ = read_dicom_seg(stripped, ct, "vertebrae", ct_series_dir=folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    with pytest.raises(SpinemetsError, match=r"no-positions\.dcm: frame 1 has no plane position"):
        read_dicom_seg(stripped, ct, "vertebrae")


def test_labelmap_seg_is_read(series, tmp_path):
    folder, ct = series
    array = _vertebrae(ct)
    seg = build_segmentation(_labelmap(ct, array), "vertebrae", folder, segmentation_type="LABELMAP")
    out = save_segmentation(seg, tmp_path / "labelmap.dcm")
    assert pydicom.dcmread(out).SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7" and is_dicom_seg(out)
    image, report = read_dicom_seg(out, ct, "vertebrae", ct_series_dir=folder)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    assert report["segmentation_type"] == "LABELMAP"


def test_fractional_seg_is_thresholded_at_one_half(series, tmp_path):
    folder, ct = series
    shape = sitk.GetArrayViewFromImage(ct).shape
    probability = np.zeros((*shape, 1), dtype=np.float32)
    probability[4, 2:6, 2:6, 0] = 1.0
    seg = _hd_seg(folder, probability, ["L2"], "FRACTIONAL", max_fractional_value=200)
    path = tmp_path / "fractional.dcm"
    seg.save_as(path)
    ds = pydicom.dcmread(path)
    assert int(ds.NumberOfFrames) == 1 and int(ds.MaximumFractionalValue) == 200
    stored = ds.pixel_array.copy()  # one frame of 0 or 200; now put values either side of 0.5 * 200
    stored[2, 2], stored[2, 3] = 99, 100  # 0.495 out, 0.5 in
    stored[0, 0], stored[0, 1] = 100, 99  # in, out
    ds.PixelData = stored.astype(np.uint8).tobytes()
    ds.save_as(path)
    image, report = read_dicom_seg(path, ct, "vertebrae")
    expected = np.zeros(shape, dtype=np.uint8)
    expected[4, 2:6, 2:6] = V["L2"]
    expected[4, 2, 2] = 0
    expected[4, 0, 0] = V["L2"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    assert report["segmentation_type"] == "FRACTIONAL"


def test_overlaps_metastases_smaller_segment_wins(series, tmp_path):
    folder, ct = series
    shape = sitk.GetArrayViewFromImage(ct).shape
    masks = np.zeros((*shape, 2), dtype=np.uint8)
    masks[2:6, 2:8, 2:7, 0] = 1  # large sclerotic
    masks[3:5, 4:6, 4:6, 1] = 1  # small lytic inside it
    path = tmp_path / "overlap.dcm"
    _hd_seg(folder, masks, ["sclerotic", "lytic"]).save_as(path)
    image, report = read_dicom_seg(path, ct, "metastases")
    expected = np.where(masks[..., 1], labels_mod.LYTIC, np.where(masks[..., 0], labels_mod.SCLEROTIC, 0))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), expected)
    assert report["contested_voxels"] == 8


# ---------------------------------------------------------------------------------------------
# errors, each naming the file


def test_overlapping_vertebrae_in_a_binary_seg_are_an_error(series, tmp_path):
    folder, ct = series
    shape = sitk.GetArrayViewFromImage(ct).shape
    masks = np.zeros((*shape, 3), dtype=np.uint8)
    masks[2:5, 2:6, 2:6, 0] = 1  # T1
    masks[4:7, 2:6, 2:6, 1] = 1  # T2: one slice shared with T1
    masks[4, 2:6, 2:6, 2] = 1  # also "T1 vertebra": the same label as T1, which merges and is no overlap
    path = tmp_path / "overlap.dcm"
    _hd_seg(folder, masks, ["T1", "T2", "T1 vertebra"]).save_as(path)
    with pytest.raises(SpinemetsError, match=r"overlap\.dcm: overlapping segments .*'T1/T1 vertebra' \(T1\) and "
                                             r"'T2' \(T2\): 16 voxel"):
        read_dicom_seg(path, ct, "vertebrae")
    masks[4, ..., 1] = 0
    _hd_seg(folder, masks, ["T1", "T2", "T1 vertebra"]).save_as(path)
    image, report = read_dicom_seg(path, ct, "vertebrae")
    assert report["contested_voxels"] == 0 and int((sitk.GetArrayFromImage(image) == V["T1"]).sum()) == 48


def test_unknown_segment_labels_are_listed(series, tmp_path):
    folder, ct = series
    masks = np.zeros((*sitk.GetArrayViewFromImage(ct).shape, 2), dtype=np.uint8)
    masks[2, 2:4, 2:4, :] = 1
    path = tmp_path / "liver.dcm"
    _hd_seg(folder, masks, ["Liver", "L3"]).save_as(path)
    with pytest.raises(SpinemetsError, match=r"liver\.dcm: unknown segment name\(s\) 'Liver'"):
        read_dicom_seg(path, ct, "vertebrae")
    image, report = read_dicom_seg(path, ct, "vertebrae", mapping={"Liver": None})
    assert report["ignored"] == ["Liver"] and int((sitk.GetArrayFromImage(image) == V["L3"]).sum()) == 4


def test_a_seg_that_references_no_series_is_refused(series, tmp_path):
    folder, ct = series
    out = write_dicom_seg(_labelmap(ct, _vertebrae(ct)), "vertebrae", folder, tmp_path / "a.dcm")
    check_valid(out, DCIODVFY_WARNINGS)
    ds = pydicom.dcmread(out)
    del ds.ReferencedSeriesSequence
    ds.save_as(tmp_path / "orphan.dcm")
    with pytest.raises(SpinemetsError, match=r"orphan\.dcm: DICOM-SEG references no series"):
        read_dicom_seg(tmp_path / "orphan.dcm", ct, "vertebrae")


def test_frame_of_reference_mismatch_is_refused(series, tmp_path):
    folder, ct = series
    out = write_dicom_seg(_labelmap(ct, _vertebrae(ct)), "vertebrae", folder, tmp_path / "pred.dcm")
    other = tmp_path / "other-ct"
    write_dicom_series(other, UID_B, synthetic_volume(n_slices=10, rows=12, columns=9),
                       extra_tags={"0020|0052": FOR_B})
    with pytest.raises(SpinemetsError, match=rf"pred\.dcm: Frame of Reference UID {FOR_A} differs from the CT "
                                             rf"series .*other-ct \({FOR_B}\)"):
        read_dicom_seg(out, read_image(other), "vertebrae", ct_series_dir=other)


def test_frames_outside_or_off_the_ct_grid_are_refused(series, tmp_path):
    folder, ct = series
    out = write_dicom_seg(_labelmap(ct, _vertebrae(ct)), "vertebrae", folder, tmp_path / "pred.dcm")
    with pytest.raises(SpinemetsError, match=r"pred\.dcm: frame \d+ \(segment 'L1'\) has \d+ labelled pixel\(s\) "
                                             r"outside the CT"):
        read_dicom_seg(out, ct[:, :, :6], "vertebrae")
    shifted = sitk.Image(ct)
    shifted.SetOrigin([o + 0.5 * s for o, s in zip(ct.GetOrigin(), ct.GetSpacing())])
    with pytest.raises(SpinemetsError, match=r"pred\.dcm: frame 1 lies between CT voxels"):
        read_dicom_seg(out, shifted, "vertebrae")
    coarse = sitk.Image(ct)
    coarse.SetSpacing([2 * s for s in ct.GetSpacing()])
    with pytest.raises(SpinemetsError, match=r"pred\.dcm: frame 1: its pixel spacing .* does not match"):
        read_dicom_seg(out, coarse, "vertebrae")


def test_files_that_are_not_a_seg_are_refused(series, tmp_path):
    folder, ct = series
    slice_file = sorted(folder.iterdir())[0]
    with pytest.raises(SpinemetsError, match=rf"{slice_file.name}: not a DICOM-SEG \(Modality CT"):
        read_dicom_seg(slice_file, ct, "vertebrae")
    text = tmp_path / "notes.dcm"
    text.write_text("not DICOM at all\n" * 20)
    with pytest.raises(SpinemetsError, match=r"notes\.dcm: not a DICOM file"):
        read_dicom_seg(text, ct, "vertebrae")
    with pytest.raises(SpinemetsError, match=r"missing\.dcm: DICOM-SEG file not found"):
        read_dicom_seg(tmp_path / "missing.dcm", ct, "vertebrae")
    assert not is_dicom_seg(slice_file) and not is_dicom_seg(text) and not is_dicom_seg(tmp_path)


def test_write_refuses_a_label_map_off_the_series_grid_and_skips_an_empty_one(series, tmp_path):
    folder, ct = series
    empty = _labelmap(ct, np.zeros(sitk.GetArrayViewFromImage(ct).shape))
    assert write_dicom_seg(empty, "vertebrae", folder, tmp_path / "empty.dcm") is None
    assert not (tmp_path / "empty.dcm").exists()
    with pytest.raises(SpinemetsError, match=r"label map: size"):
        write_dicom_seg(_labelmap(ct, _vertebrae(ct))[:, :, :5], "vertebrae", folder, tmp_path / "crop.dcm")
    with pytest.raises(SpinemetsError, match=r"bad\.dcm: label values \[3\] are not labels of the metastases stage"):
        write_dicom_seg(_labelmap(ct, np.full(sitk.GetArrayViewFromImage(ct).shape, 3)), "metastases", folder,
                        tmp_path / "bad.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]  # nothing written, no partial file left


# ---------------------------------------------------------------------------------------------
# identifiers


def test_without_a_pseudonym_the_seg_carries_the_source_patient_only(series, tmp_path):
    """Positive control for the scan below: highdicom copies the patient and study of the source."""
    folder, ct = series
    out = write_dicom_seg(_labelmap(ct, _vertebrae(ct)), "vertebrae", folder, tmp_path / "a.dcm")
    check_valid(out, DCIODVFY_WARNINGS)
    ds = pydicom.dcmread(out)
    assert str(ds.PatientName) == IDENTIFIERS["0010|0010"] and ds.PatientID == IDENTIFIERS["0010|0020"]
    assert {"Zyxwvut^Qqpatient", "PID-86753091", "19230417", "Quuxbridge Infirmary", "20190823"} <= _leaked(ds)
    assert ds.ContributingEquipmentSequence[0].InstitutionName == "Quuxbridge Infirmary"


def test_a_seg_written_with_a_pseudonym_carries_no_identifier(series, tmp_path):
    folder, ct = series
    out = write_dicom_seg(_labelmap(ct, _vertebrae(ct)), "vertebrae", folder, tmp_path / "a.dcm",
                          pseudonym="sm-0007")
    check_valid(out, DCIODVFY_WARNINGS)
    raw = out.read_bytes()
    ds = pydicom.dcmread(out)
    assert _leaked(ds) == set()
    assert not [v for v in IDENTIFIERS.values() if len(v) > 8 and v.encode() in raw]
    assert str(ds.PatientName) == "sm-0007" and ds.PatientID == "sm-0007"
    assert ds.PatientBirthDate == "" and ds.StudyDate == "" and ds.AccessionNumber == ""
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.ContributingEquipmentSequence[0].Manufacturer == "Acme Medical"
    assert "InstitutionName" not in ds.ContributingEquipmentSequence[0] and ds.DeviceSerialNumber == "0"
    # still references its source
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == UID_A and ds.FrameOfReferenceUID == FOR_A
    with pytest.raises(SpinemetsError, match=r"b\.dcm: case ID 'Doe\^John'"):
        write_dicom_seg(_labelmap(ct, _vertebrae(ct)), "vertebrae", folder, tmp_path / "b.dcm", pseudonym="Doe^John")


# ---------------------------------------------------------------------------------------------
# the Spine-Mets-CT-SEG-like cohort


def test_tcia_cohort_layout_spreadsheet_and_seg_round_trip(tmp_path):
    root = write_tcia_cohort(tmp_path / "download", cases=2, seed=3)
    assert root == tmp_path / "download" / COLLECTION
    assert sorted(p.name for p in (tmp_path / "download").iterdir()) == sorted([COLLECTION, CLINICAL_FILE,
                                                                                "metadata.csv"])
    assert sorted(p.name for p in root.iterdir()) == ["SMCS-0001", "SMCS-0002"]
    with open(tmp_path / "download" / CLINICAL_FILE, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == CLINICAL_COLUMNS
    with open(tmp_path / "download" / "metadata.csv", newline="") as fh:
        metadata = list(csv.DictReader(fh))
    assert [m["Modality"] for m in metadata] == ["CT", "SEG", "CT", "SEG"]

    for index, row in enumerate(rows):
        case = phantom_case(index, seed=3)
        assert row["subject_id"] == case["subject_id"] == f"SMCS-{index + 1:04d}"
        assert row["vertebrae_with_lesions"] == ";".join(case["lesions"]) != ""
        assert {v: row[v] for v in TCIA_VERTEBRAE if row[v]} == case["lesions"]
        assert set(case["lesions"].values()) <= {"lytic", "blastic", "mixed"}

        (study,) = (root / case["subject_id"]).iterdir()
        assert study.is_dir() and study.name.startswith(("10-", "11-", "12-"))
        assert " " in study.name and study.name[:10].count("-") == 2
        assert study.name[10:] == f"-NA-CT CHEST ABDOMEN PELVIS-{study.name[-5:]}" and study.name[-5:].isdigit()
        series_dirs = sorted(p.name for p in study.iterdir())
        assert len(series_dirs) == 2
        ct_name, seg_name = series_dirs
        assert ct_name.startswith("2.000000-CT SPINE-") and seg_name.startswith("300.000000-Segmentation-")
        ct_dir, seg_dir = study / ct_name, study / seg_name
        n_slices = case["ct"].GetSize()[2]
        assert sorted(p.name for p in ct_dir.iterdir()) == [f"1-{k:03d}.dcm" for k in range(1, n_slices + 1)]
        assert [p.name for p in seg_dir.iterdir()] == ["1-1.dcm"]

        first = pydicom.dcmread(ct_dir / "1-001.dcm")
        assert first.PatientID == case["subject_id"] and ct_name.endswith(first.SeriesInstanceUID[-5:])
        assert study.name.endswith(first.StudyInstanceUID[-5:])
        ct = read_image(ct_dir)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ct), sitk.GetArrayFromImage(case["ct"]))
        np.testing.assert_allclose(ct.GetOrigin(), case["ct"].GetOrigin(), atol=1e-4)

        seg_file = seg_dir / "1-1.dcm"
        assert is_dicom_seg(seg_file)
        if index == 0:  # the phantom's CT slices and SEG are valid DICOM
            check_valid(ct_dir / "1-001.dcm", DCIODVFY_WARNINGS)
            check_valid(seg_file, DCIODVFY_WARNINGS)
        image, report = read_dicom_seg(seg_file, ct, "vertebrae", ct_series_dir=ct_dir)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), case["vertebrae"])
        assert [s["name"] for s in report["segments"]] == [f"{v} vertebra" for v in TCIA_VERTEBRAE]
        assert pydicom.dcmread(seg_file).ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID


def test_tcia_phantoms_are_reproducible_and_hold_t1_to_l5():
    a, b = phantom_case(0, seed=5), phantom_case(0, seed=5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a["ct"]), sitk.GetArrayFromImage(b["ct"]))
    np.testing.assert_array_equal(a["vertebrae"], b["vertebrae"])
    assert sorted(np.unique(a["vertebrae"]).tolist()) == [0, *range(V["T1"], V["L5"] + 1)]
    assert a["ct"].GetSize()[:2] == (48, 48) and 90 <= a["ct"].GetSize()[2] <= 130
    assert not np.array_equal(a["vertebrae"], phantom_case(1, seed=5)["vertebrae"]) or \
        a["lesions"] != phantom_case(1, seed=5)["lesions"]
