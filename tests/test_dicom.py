"""spinemets.formats.dicom: DICOM series reading, conversion, and no identifier leaking into outputs."""

from __future__ import annotations

import gzip
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from fakes import IDENTIFIERS, ORIGIN, SPACING, synthetic_volume, write_dicom_series
from spinemets.formats.dicom import list_series, read_dicom_series
from spinemets.formats.images import convert
from spinemets.errors import SpinemetsError
from spinemets.formats.images import read_image
from spinemets.fileio import PARTIAL_PREFIX

UID_A = "1.2.826.0.1.3680043.9.7433.2.1"
UID_B = "1.2.826.0.1.3680043.9.7433.2.2"


@pytest.fixture
def series(tmp_path):
    folder = tmp_path / "dicom"
    array = synthetic_volume()
    write_dicom_series(folder, UID_A, array)
    return folder, array


def _identifier_strings() -> list[bytes]:
    values = set(IDENTIFIERS.values())
    values |= {v.split("^")[0] for v in values if "^" in v}  # family name on its own
    return sorted(v.encode() for v in values)


def _leaks(data: bytes) -> list[bytes]:
    return [s for s in _identifier_strings() if s in data]


def test_identifiers_are_in_the_source(series):
    """Positive control: the search below would find the identifiers if they were copied."""
    folder, _ = series
    data = b"".join(p.read_bytes() for p in folder.iterdir())
    assert _leaks(data) == _identifier_strings()


def test_read_dicom_series_voxels_and_geometry(series):
    folder, array = series
    image = read_dicom_series(folder)
    assert image.GetSize() == (array.shape[2], array.shape[1], array.shape[0])
    np.testing.assert_allclose(image.GetSpacing(), SPACING, atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)
    assert image.GetMetaDataKeys() == ()


def test_io_read_image_accepts_a_dicom_folder(series):
    folder, array = series
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(folder)), array)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".nii"])
def test_convert_keeps_voxels_and_geometry_and_leaks_nothing(series, tmp_path, suffix, caplog, capfd):
    folder, array = series
    out_dir = tmp_path / "out"
    caplog.set_level(logging.DEBUG)
    out = convert(folder, out_dir / f"case{suffix}")
    assert out == out_dir / f"case{suffix}"
    back = sitk.ReadImage(str(out))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    np.testing.assert_allclose(back.GetSpacing(), SPACING, atol=1e-4)
    np.testing.assert_allclose(back.GetOrigin(), ORIGIN, atol=1e-4)
    assert back.GetPixelID() == sitk.sitkInt16
    # search every output byte (decompressed), every log record and everything printed
    files = sorted(out_dir.rglob("*"))
    assert [p.name for p in files] == [out.name]
    for path in files:
        data = path.read_bytes()
        if path.name.endswith(".gz"):
            data = gzip.decompress(data)
        assert _leaks(data) == [], path
    captured = capfd.readouterr()
    assert _leaks((captured.out + captured.err + caplog.text).encode()) == []
    assert all(_leaks(str(v).encode()) == [] for k in back.GetMetaDataKeys() for v in [back.GetMetaData(k)])


def test_convert_command_line_leaks_nothing(series, tmp_path):
    folder, array = series
    exe = Path(sys.executable).with_name("spinemets")
    if not exe.exists():
        pytest.skip("the spinemets command is not installed in this environment")
    out = tmp_path / "cli" / "case.nii.gz"
    done = subprocess.run(
        [str(exe), "--verbose", "convert", str(folder), "--out", str(out)], capture_output=True, timeout=120
    )
    if done.returncode == 2 and b"invalid choice" in done.stderr:
        pytest.skip("the spinemets command line has no 'convert' command")
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), array)
    assert _leaks(done.stdout + done.stderr) == []
    assert _leaks(gzip.decompress(out.read_bytes())) == []


def test_two_series_need_a_uid(tmp_path, caplog):
    folder = tmp_path / "two"
    a = synthetic_volume(seed=1)
    b = synthetic_volume(n_slices=4, seed=2)
    write_dicom_series(folder, UID_A, a, prefix="a")
    write_dicom_series(folder, UID_B, b, prefix="b")
    with pytest.raises(SpinemetsError, match="holds 2 DICOM series") as err:
        read_dicom_series(folder)
    message = str(err.value)
    assert UID_A in message and UID_B in message
    assert "6 file(s)" in message and "4 file(s)" in message and "CT" in message
    assert _leaks(message.encode()) == []
    assert "synthetic test series" not in message  # free-text description stays out
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_dicom_series(folder, UID_B)), b)
    out = convert(folder, tmp_path / "b.nii.gz", series_uid=UID_A)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out))), a)
    summaries = sorted(list_series(folder), key=lambda s: s["uid"])
    assert [(s["uid"], s["files"], s["modality"]) for s in summaries] == [(UID_A, 6, "CT"), (UID_B, 4, "CT")]
    assert _leaks(caplog.text.encode()) == []


def test_unknown_uid(series):
    folder, _ = series
    with pytest.raises(SpinemetsError, match=r"no DICOM series with UID 1\.2\.3; the folder holds") as err:
        read_dicom_series(folder, "1.2.3")
    assert UID_A in str(err.value)


def test_missing_empty_and_non_dicom_folders(tmp_path):
    with pytest.raises(SpinemetsError, match="DICOM folder not found"):
        read_dicom_series(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpinemetsError, match="DICOM folder is empty"):
        read_dicom_series(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("not an image")
    with pytest.raises(SpinemetsError, match=r"no DICOM series found \(1 file"):
        read_dicom_series(tmp_path / "text")
    with pytest.raises(SpinemetsError, match="not a folder"):
        read_dicom_series(tmp_path / "text" / "notes.txt")


def test_non_dicom_files_beside_a_series_are_ignored(series):
    folder, array = series
    (folder / "README.txt").write_text("exported by a scanner")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_dicom_series(folder)), array)


@pytest.mark.parametrize("keep", [200, 0.5])
def test_truncated_slice_is_an_error_naming_the_file(series, keep):
    folder, _ = series
    victim = folder / "slice002.dcm"
    data = victim.read_bytes()
    victim.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])
    with pytest.raises(SpinemetsError, match="slice002.dcm") as err:
        read_dicom_series(folder)
    assert "cannot be read" in str(err.value) or "not evenly spaced" in str(err.value)


def test_missing_slice_is_an_error(series):
    folder, _ = series
    (folder / "slice003.dcm").unlink()
    with pytest.raises(SpinemetsError, match="not evenly spaced.*slice may be missing"):
        read_dicom_series(folder)


def test_convert_nrrd_and_nifti_inputs(tmp_path):
    array = synthetic_volume(seed=3).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.5, 2.0))
    image.SetOrigin((3.0, -4.0, 5.0))
    image.SetMetaData("PatientName", IDENTIFIERS["0010|0010"])
    src = tmp_path / "in.nrrd"
    sitk.WriteImage(image, str(src))
    before = src.read_bytes()
    assert IDENTIFIERS["0010|0010"].encode() in before  # the source header holds it
    out = convert(src, tmp_path / "out" / "a.nii.gz")
    nifti = convert(out, tmp_path / "out" / "b.nrrd")
    back = sitk.ReadImage(str(nifti))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    np.testing.assert_allclose(back.GetOrigin(), (3.0, -4.0, 5.0))
    assert _leaks(nifti.read_bytes()) == [] and _leaks(gzip.decompress(out.read_bytes())) == []
    assert src.read_bytes() == before  # source untouched


def test_convert_errors_leave_nothing(series, tmp_path):
    folder, _ = series
    with pytest.raises(SpinemetsError, match="unsupported output format"):
        convert(folder, tmp_path / "x.png")
    with pytest.raises(SpinemetsError, match="file not found"):
        convert(tmp_path / "missing.nrrd", tmp_path / "x.nii.gz")
    with pytest.raises(SpinemetsError, match="inside the DICOM folder"):
        convert(folder, folder / "x.nii.gz")
    nrrd = convert(folder, tmp_path / "a.nrrd")
    with pytest.raises(SpinemetsError, match="series UID applies to DICOM folders only"):
        convert(nrrd, tmp_path / "b.nii.gz", series_uid=UID_A)
    with pytest.raises(SpinemetsError, match="would overwrite the input"):
        convert(nrrd, nrrd)
    four_d = sitk.Image([3, 3, 3, 2], sitk.sitkInt16)
    sitk.WriteImage(four_d, str(tmp_path / "4d.nii"))
    with pytest.raises(SpinemetsError, match="4-D"):
        convert(tmp_path / "4d.nii", tmp_path / "c.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["4d.nii", "a.nrrd", "dicom"]
    assert not list(tmp_path.rglob(f"{PARTIAL_PREFIX}*"))


def test_dicom_series_through_scan_and_import_leaks_nothing(tmp_path):
    """Curation accepts DICOM series folders; with pseudonyms, no identifier reaches the dataset."""
    import gzip

    from spinemets.cohort import dataset

    export = tmp_path / "export"
    patient_folder = "DOE^JANE_19570304"
    volume = write_dicom_series(export / patient_folder / "dicom", UID_A)
    mask = np.zeros(volume.GetSize()[::-1], dtype=np.uint8)
    mask[1:3, 2:5, 2:5] = 1
    labels = sitk.GetImageFromArray(mask)
    labels.CopyInformation(volume)
    sitk.WriteImage(labels, str(export / patient_folder / "lesions.nii.gz"))
    manifest = dataset.scan(export, tmp_path / "manifest.csv", image="{case}/dicom",
                            segmentations={"metastases": "{case}/lesions.nii.gz"}, pseudonymize=True)
    assert manifest["case_id"].tolist() == ["sm-0001"]
    out = dataset.import_dataset(tmp_path / "manifest.csv", "metastases", tmp_path / "raw")
    image = sitk.ReadImage(str(out / "imagesTr" / "sm-0001_0000.nii.gz"))
    assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(volume))
    secrets = _identifier_strings() + [patient_folder.encode()]
    for path in out.rglob("*"):
        assert patient_folder not in str(path)
        if path.is_file():
            data = path.read_bytes()
            data = gzip.decompress(data) if path.suffix == ".gz" else data
            assert not [s for s in secrets if s in data], path


def test_the_axial_ct_series_is_chosen_beside_a_localizer_and_a_seg(tmp_path, caplog):
    """The rule of spinemets.formats.dicom: of several series, the only axial CT one with more than two slices
    that is no localizer is read (and the log names it); a segmentation beside it is no candidate."""
    from messy_dicom import SERIES_UID, write_messy_series

    for kind in ("with-localizer", "with-existing-seg"):
        folder = write_messy_series(tmp_path / kind, kind)
        assert len(list_series(folder)) == 2
        with caplog.at_level("INFO"):
            image = read_dicom_series(folder)
        assert image.GetSize() == (9, 12, 6)
        assert f"read the only axial CT series that is no localizer: {SERIES_UID}" in caplog.text
        caplog.clear()


def test_convert_refuses_a_gantry_tilt_and_two_kernels_naming_the_choices(tmp_path):
    from messy_dicom import OTHER_UID, SERIES_UID, write_messy_series

    tilted = write_messy_series(tmp_path / "tilt", "gantry-tilt")
    with pytest.raises(SpinemetsError, match=rf"^{tilted}: gantry tilt: the slices are stacked at 15.0 degrees"):
        convert(tilted, tmp_path / "t.nii.gz")
    kernels = write_messy_series(tmp_path / "kernels", "two-kernels")
    with pytest.raises(SpinemetsError) as err:
        convert(kernels, tmp_path / "k.nii.gz")
    assert f"{SERIES_UID} (CT, axial, kernel B30f, 6 file(s)" in str(err.value)
    assert f"{OTHER_UID} (CT, axial, kernel B70f, 6 file(s)" in str(err.value)
    assert not list(tmp_path.glob("*.nii.gz"))
    convert(kernels, tmp_path / "k.nii.gz", series_uid=OTHER_UID)  # the choice made
    enhanced = write_messy_series(tmp_path / "enhanced", "enhanced-multiframe")
    with pytest.raises(SpinemetsError, match=r"enhanced\.dcm: a multi-frame image with 6 frames in one file"):
        convert(enhanced, tmp_path / "e.nii.gz")  # not a 4-D image placed at one frame's position
