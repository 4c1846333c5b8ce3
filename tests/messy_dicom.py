"""DICOM series as hospitals and anonymisers send them, for the tests of spinemets.formats.dicom.check_series,
``predict`` on DICOM input, the bad-input corpus and the fuzzer.

:func:`write_messy_series` writes one *kind* of series into a folder: the project's synthetic
slices (tests/fakes.py) or copies of DICOM files that pydicom ships for its own tests
(``pydicom.data.get_testdata_file``: a real CT slice, a real MR slice, a JPEG 2000 and a JPEG
slice, an SR
and an RTSTRUCT placed beside a series), then
changes their headers with pydicom the way the kind says. :data:`OUTCOMES` says what ``predict``
must do with each kind: ``predict`` (DICOM-SEG and SR written and valid), ``no-dicom`` (the
non-DICOM outputs written, the reason for the missing DICOM ones in the log and provenance) or
``refuse`` (a one-line error naming the file or folder, before any model runs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from fakes import synthetic_volume, write_dicom_series

SERIES_UID = "1.2.826.0.1.3680043.9.7433.5.1"
OTHER_UID = "1.2.826.0.1.3680043.9.7433.5.2"
FOR_UID = "1.2.826.0.1.3680043.9.7433.5.9"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: kind -> (outcome, a substring of the error or of the reason for no DICOM output; "" for predict).
OUTCOMES: dict[str, tuple[str, str]] = {
    "clean": ("predict", ""),
    "uids-blanked": ("no-dicom", "Study Instance UID blank or missing in 6 of 6 slice(s)"),
    "sop-class-in-file-meta-only": ("predict", ""),
    "sop-instance-uids-duplicated": ("no-dicom", "SOP Instance UID duplicated"),
    "no-frame-of-reference": ("no-dicom", "Frame of Reference UID blank or missing"),
    "no-study-date-time-id": ("predict", ""),
    "with-localizer": ("predict", ""),
    "with-existing-seg": ("predict", ""),
    "with-report-and-structure-set": ("predict", ""),
    "with-truncated-report": ("predict", ""),
    "with-truncated-slice": ("refuse", "look like DICOM but cannot be read (truncated or corrupt): slice002.dcm"),
    "two-kernels": ("refuse", "holds 2 DICOM series, 2 of them an axial CT series"),
    "localizer-sharing-the-series-uid": ("refuse", "its orientation or size differs from"),
    "slice-missing": ("refuse", "slices are not evenly spaced"),
    "unevenly-spaced": ("refuse", "slices are not evenly spaced"),
    "gantry-tilt": ("refuse", "gantry tilt: the slices are stacked at 15.0 degrees"),
    "enhanced-multiframe": ("refuse", "Legacy Converted Enhanced CT Image Storage with 6 frames in one file"),
    "mr": ("refuse", "Modality MR, not CT"),
    "real-ct-rle": ("predict", ""),
    "real-ct-jpeg-ls": ("predict", ""),
    "jpeg2000": ("predict", ""),
    "jpeg-extended": ("predict", ""),
}


def write_messy_series(folder: str | Path, kind: str) -> Path:
    """Write a series of ``kind`` (a key of :data:`OUTCOMES`) into ``folder``; return ``folder``."""
    import pydicom

    folder = Path(folder)
    if kind not in OUTCOMES:
        raise ValueError(f"unknown kind {kind!r}")
    if kind in ("mr", "real-ct-rle", "real-ct-jpeg-ls", "jpeg2000", "jpeg-extended"):
        return _from_pydicom_file(folder, kind)
    tags = {"0020|0052": FOR_UID, "0018|1210": "B30f"}
    if kind == "no-frame-of-reference":
        tags.pop("0020|0052")
    write_dicom_series(folder, SERIES_UID, synthetic_volume(n_slices=6, rows=12, columns=9), extra_tags=tags)
    slices = sorted(folder.iterdir())
    if kind == "uids-blanked":  # what the issue met: the file meta still says CT Image Storage
        _edit(slices, SOPClassUID="", StudyInstanceUID="", SeriesInstanceUID="")
    elif kind == "sop-class-in-file-meta-only":
        _edit(slices, SOPClassUID="")
    elif kind == "sop-instance-uids-duplicated":
        _edit(slices, SOPInstanceUID="1.2.826.0.1.3680043.9.7433.5.77")
    elif kind == "no-study-date-time-id":
        _edit(slices, StudyDate=None, StudyTime=None, StudyID=None, AccessionNumber=None)
    elif kind in ("with-localizer", "localizer-sharing-the-series-uid"):
        uid = OTHER_UID if kind == "with-localizer" else SERIES_UID
        write_dicom_series(folder, uid, synthetic_volume(n_slices=1, rows=12, columns=9, seed=5), prefix="loc",
                           extra_tags={**tags, "0008|0008": "ORIGINAL\\PRIMARY\\LOCALIZER",
                                       "0020|0037": "1\\0\\0\\0\\0\\-1"})
    elif kind == "with-existing-seg":
        from spinemets.formats.dicomseg import write_dicom_seg
        from spinemets.formats.images import image_from_array, read_image

        ct = read_image(folder)
        array = np.zeros(ct.GetSize()[::-1], np.uint8)
        array[1:3, 2:5, 2:5] = 1
        scratch = folder.parent / f".{folder.name}-seg"
        write_dicom_seg(image_from_array(array, ct), "metastases", folder, scratch / "old-seg.dcm")
        shutil.move(str(scratch / "old-seg.dcm"), folder / "old-seg.dcm")
        scratch.rmdir()
    elif kind in ("with-report-and-structure-set", "with-truncated-report"):  # pydicom's own SR and RTSTRUCT
        from pydicom.data import get_testdata_file

        shutil.copy(get_testdata_file("test-SR.dcm"), folder / "report.dcm")
        shutil.copy(get_testdata_file("rtstruct.dcm"), folder / "rtstruct.dcm")
        if kind == "with-truncated-report":
            data = (folder / "report.dcm").read_bytes()
            (folder / "report.dcm").write_bytes(data[: len(data) // 2])
    elif kind == "with-truncated-slice":
        slices[2].write_bytes(slices[2].read_bytes()[:300])
    elif kind == "two-kernels":
        write_dicom_series(folder, OTHER_UID, synthetic_volume(n_slices=6, rows=12, columns=9, seed=7), prefix="b",
                           extra_tags={**tags, "0018|1210": "B70f"})
    elif kind == "slice-missing":
        slices[3].unlink()
    elif kind == "unevenly-spaced":
        _edit(slices[4:], shift=(0.0, 0.0, 0.6))
    elif kind == "gantry-tilt":  # each slice further along y by tan(15 degrees) x the slice spacing (2.5 mm)
        for k, path in enumerate(slices):
            _edit([path], shift=(0.0, k * 2.5 * np.tan(np.radians(15)), 0.0), GantryDetectorTilt=15)
    elif kind == "enhanced-multiframe":
        import highdicom as hd

        datasets = [pydicom.dcmread(p) for p in slices]
        for path in slices:
            path.unlink()
        image = hd.legacy.LegacyConvertedEnhancedCTImage(datasets, series_instance_uid=SERIES_UID, series_number=2,
                                                         sop_instance_uid=hd.UID(), instance_number=1)
        image.save_as(str(folder / "enhanced.dcm"), enforce_file_format=True)
    return folder


def _edit(paths, shift=None, **values) -> None:
    """Set (None: delete) header attributes of each file in place; ``shift`` moves its position (mm)."""
    import pydicom

    for path in paths:
        ds = pydicom.dcmread(str(path))
        for keyword, value in values.items():
            if value is None:
                if keyword in ds:
                    delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        if "SOPInstanceUID" in values:
            ds.file_meta.MediaStorageSOPInstanceUID = values["SOPInstanceUID"]
        if shift is not None:
            ds.ImagePositionPatient = [round(float(p) + s, 4) for p, s in zip(ds.ImagePositionPatient, shift)]
        ds.save_as(str(path))


def _from_pydicom_file(folder: Path, kind: str) -> Path:
    """Slices made from one of pydicom's test files: copies stacked along the slice normal, each
    with its own SOP Instance UID (and, for the JPEG 2000 MR slice, relabelled as CT)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

    name = {"mr": "MR_small.dcm", "real-ct-rle": "CT_small.dcm", "real-ct-jpeg-ls": "CT_small.dcm",
            "jpeg2000": "MR_small_jp2klossless.dcm", "jpeg-extended": "JPGExtended.dcm"}[kind]
    folder.mkdir(parents=True, exist_ok=True)
    thickness = 2.0
    for k in range(4):
        ds = pydicom.dcmread(get_testdata_file(name))
        if kind == "jpeg-extended":  # a 12-bit JPEG (process 2 and 4) image without geometry: given one
            ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
            ds.FrameOfReferenceUID = FOR_UID
        ds.SOPInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.9.7433.5.")
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.SliceThickness = thickness
        position = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [position[0], position[1], round(position[2] + k * thickness, 4)]
        ds.SliceLocation = ds.ImagePositionPatient[2]
        if kind in ("jpeg2000", "jpeg-extended"):  # the pixel data stay compressed as shipped
            ds.Modality = "CT"
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CT_STORAGE
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        elif kind == "real-ct-rle":
            ds.compress(RLELossless)
        elif kind == "real-ct-jpeg-ls":
            ds.compress(JPEGLSLossless)
        ds.save_as(str(folder / f"IM{k + 1:04d}.dcm"), enforce_file_format=True)
    return folder
