"""A small synthetic cohort laid out as TCIA's downloader lays out the collection Spine-Mets-CT-SEG.

Spine-Mets-CT-SEG (doi:10.7937/kh36-ds04) holds 55 patients with spinal metastases, each with one
CT series and one DICOM-SEG labelling the vertebrae T1-L5 (Segment Labels such as ``T1 vertebra``),
plus a clinical spreadsheet that says which vertebrae carry lesions and of which type. The NBIA
Data Retriever writes such a download as ::

    <out>/metadata.csv
    <out>/Spine-Mets-CT-SEG/<subject>/<study folder>/<series folder>/1-001.dcm, 1-002.dcm, ...

with the study folder ``MM-DD-YYYY-<Study ID or NA>-<Study Description>-<last 5 digits of the Study
Instance UID>`` and the series folder ``<Series Number, 6 decimals>-<Series Description>-<last 5
digits of the Series Instance UID>``, both with spaces. :func:`write_tcia_cohort` writes that
layout for a few small phantoms, so that layout discovery and the DICOM-SEG import
(:mod:`spinemets.formats.dicomseg`) can be tested without the real data::

    <out>/metadata.csv
    <out>/Spine-Mets-CT-SEG_clinical.csv
    <out>/Spine-Mets-CT-SEG/SMCS-0001/10-10-2001-NA-CT CHEST ABDOMEN PELVIS-12345/
        2.000000-CT SPINE-67890/1-001.dcm ... 1-106.dcm
        300.000000-Segmentation-54321/1-1.dcm

Phantoms (:func:`phantom_case`): a 48 x 48 x about 106 voxel CT (1.5 x 1.5 x 3 mm, int16 HU) of
the thoracolumbar spine: T1 (top) to L5 (bottom) stacked with a disc slice between neighbours,
each vertebra an elliptic body (cortex 700 HU, cancellous 250 HU) with a posterior arch and a
spinous process, in soft tissue (40 HU) inside air; one to three vertebrae carry lesions, spheres
in the body: lytic (20 HU), blastic (900 HU), or mixed (one of each). Everything is drawn from
``numpy.random.SeedSequence(seed, spawn_key=(case,))``, and the study, series and instance UIDs
and the dates from the seed and case, so a seed gives the same voxels, UIDs and folder names. Subject IDs are synthetic (``SMCS-0001`` ...), the only patient
attributes are Patient's Name and Patient ID (both the subject ID) and a synthetic study date.

The clinical spreadsheet is a CSV (openpyxl, which TCIA's xlsx would need, is not a dependency),
one row per subject, with the columns

* ``subject_id``: the folder name under ``Spine-Mets-CT-SEG/`` (``SMCS-0001``);
* ``vertebrae_with_lesions``: the vertebrae carrying lesions, cranio-caudal, ``;``-separated
  (``T4;L2``);
* ``T1`` ... ``L5``: the lesion type of that vertebra, ``lytic``, ``blastic`` or ``mixed``, empty
  when it has none.

``metadata.csv`` has the NBIA Data Retriever's columns (Series UID, Collection, 3rd Party Analysis,
Data Description URI, Subject ID, Study UID, Study Description, Study Date, Series Description,
Manufacturer, Modality, SOP Class Name, SOP Class UID, Number of Images, File Size, File Location,
Download Timestamp), one row per series.

The CT slices (and those of :func:`write_ct_series`) and the SEGs pass ``dciodvfy`` (dicom3tools)
without error; its two warnings are those of :mod:`spinemets.formats.dicomseg` (an empty Study ID, and a
subject ID as a one-component Patient's Name).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinemets import labels as labels_mod
from spinemets.fileio import atomic_path, check_output_dir, write_csv

COLLECTION = "Spine-Mets-CT-SEG"
DOI = "10.7937/kh36-ds04"
#: The vertebrae the collection's SEGs label, cranio-caudal.
TCIA_VERTEBRAE: tuple[str, ...] = tuple(f"T{i}" for i in range(1, 13)) + tuple(f"L{i}" for i in range(1, 6))
#: Lesion types of the clinical spreadsheet.
LESION_TYPES = ("lytic", "blastic", "mixed")
CLINICAL_FILE = f"{COLLECTION}_clinical.csv"
CLINICAL_COLUMNS = ["subject_id", "vertebrae_with_lesions", *TCIA_VERTEBRAE]
METADATA_COLUMNS = ["Series UID", "Collection", "3rd Party Analysis", "Data Description URI", "Subject ID",
                    "Study UID", "Study Description", "Study Date", "Series Description", "Manufacturer", "Modality",
                    "SOP Class Name", "SOP Class UID", "Number of Images", "File Size", "File Location",
                    "Download Timestamp"]

STUDY_DESCRIPTION = "CT CHEST ABDOMEN PELVIS"
CT_SERIES_NUMBER, CT_SERIES_DESCRIPTION = 2, "CT SPINE"
SEG_SERIES_DESCRIPTION = "Segmentation"
SEGMENT_LABEL = "{name} vertebra"

_SIZE_XY = 48
_SPACING = (1.5, 1.5, 3.0)
_HU = {"air": -1000, "soft": 40, "cortex": 700, "cancellous": 250, "lytic": 20, "blastic": 900}
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def subject_id(index: int) -> str:
    """Synthetic subject ID of the 0-based case ``index``: ``SMCS-0001`` for 0."""
    return f"SMCS-{index + 1:04d}"


def phantom_case(index: int, seed: int = 0) -> dict:
    """One phantom: ``subject_id``, ``ct`` (SimpleITK int16 image, LPS), ``vertebrae`` (uint8 label map
    z-y-x of the vertebrae stage on the CT grid, T1-L5) and ``lesions`` (vertebra -> lytic/blastic/mixed)."""
    rng = np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))
    table = labels_mod.labels("vertebrae")
    heights = [int(round(4 + 2 * k / (len(TCIA_VERTEBRAE) - 1))) + int(rng.integers(0, 2))
               for k in range(len(TCIA_VERTEBRAE))]
    nz = 2 + sum(heights) + len(heights) - 1 + 2
    n = _SIZE_XY
    vert = np.zeros((nz, n, n), dtype=np.uint8)
    hu = np.full((nz, n, n), _HU["air"], dtype=np.float32)
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float32)
    hu[:, (xx - n / 2) ** 2 + (yy - n / 2) ** 2 <= (0.46 * n) ** 2] = _HU["soft"]
    top = nz - 2  # T1 at the top (high z is superior in LPS)
    bodies = {}
    for k, (name, h) in enumerate(zip(TCIA_VERTEBRAE, heights)):
        z1 = top - sum(heights[:k]) - k
        z0 = z1 - h
        grow = k / (len(TCIA_VERTEBRAE) - 1)
        a, b = 5.5 + 4.0 * grow, 4.5 + 3.0 * grow  # half-axes (voxels): lateral, antero-posterior
        cx = n / 2 + rng.uniform(-1, 1)
        cy = n / 2 - 3 + 2.0 * np.sin(np.pi * k / 16) + rng.uniform(-0.5, 0.5)  # posterior is +y
        body = ((xx - cx) / a) ** 2 + ((yy - cy) / b) ** 2 <= 1
        canal_y = cy + b + 3.0
        ring = np.hypot(xx - cx, yy - canal_y)
        arch = (ring >= 2.5) & (ring <= 4.5) & (yy >= cy + b - 0.5)
        spinous = (np.abs(xx - cx) <= 1.0) & (yy > canal_y + 4.0) & (yy <= canal_y + 9.0)
        shape = body | arch | spinous
        inner = ((xx - cx) / (a - 1.2)) ** 2 + ((yy - cy) / (b - 1.2)) ** 2 <= 1
        vert[z0:z1][:, shape] = table[name]
        hu[z0:z1][:, shape] = _HU["cortex"]
        hu[z0 + 1:z1 - 1][:, inner] = _HU["cancellous"]
        bodies[name] = (z0, z1, cx, cy, min(a, b))
    lesions = {}
    for position in sorted(rng.choice(len(TCIA_VERTEBRAE), size=int(rng.integers(1, 4)), replace=False)):
        vertebra = TCIA_VERTEBRAE[int(position)]
        kind = LESION_TYPES[int(rng.integers(len(LESION_TYPES)))]
        lesions[vertebra] = kind
        z0, z1, cx, cy, r = bodies[vertebra]
        zz = np.arange(nz, dtype=np.float32)[:, None, None]
        kinds = ["lytic", "blastic"] if kind == "mixed" else [kind]
        label = table[vertebra]
        for i, part in enumerate(kinds):  # spheres (radius in mm) in the body, side by side when mixed
            dx = (i - (len(kinds) - 1) / 2) * r * 0.9
            zc = (z0 + z1 - 1) / 2
            dist2 = (((xx - cx - dx) * _SPACING[0]) ** 2 + ((yy - cy) * _SPACING[1]) ** 2)[None] \
                + ((zz - zc) * _SPACING[2]) ** 2
            hu[(dist2 <= (0.45 * r * _SPACING[0]) ** 2) & (vert == label)] = _HU[part]
    hu += rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
    ct = sitk.GetImageFromArray(np.clip(np.round(hu), -1024, 3071).astype(np.int16))
    ct.SetSpacing(_SPACING)
    ct.SetOrigin((-n * _SPACING[0] / 2, -n * _SPACING[1] / 2, -nz * _SPACING[2] + 200.0))
    return {"subject_id": subject_id(index), "ct": ct, "vertebrae": vert,
            "lesions": {v: lesions[v] for v in TCIA_VERTEBRAE if v in lesions}}


def _uid(seed: int, *parts) -> str:
    from pydicom.uid import generate_uid

    return generate_uid(entropy_srcs=[COLLECTION, str(seed), *map(str, parts)])


def _folder_number(uid: str) -> str:
    return uid.replace(".", "")[-5:]


def write_tcia_cohort(out_dir: str | Path, cases: int = 3, seed: int = 0) -> Path:
    """Write ``cases`` phantoms in the Spine-Mets-CT-SEG download layout under ``out_dir`` (module
    docstring); return the collection folder ``out_dir/Spine-Mets-CT-SEG``."""
    out_dir = check_output_dir(out_dir, "cohort folder")
    root = Path(out_dir) / COLLECTION
    clinical, metadata = [], []
    for index in range(int(cases)):
        case = phantom_case(index, seed)
        sid = case["subject_id"]
        day = 1 + (7 * index) % 28
        study_date = f"2001{10 + index % 3:02d}{day:02d}"
        study_uid, ct_uid = _uid(seed, sid, "study"), _uid(seed, sid, "ct")
        frame_of_reference, seg_uid = _uid(seed, sid, "frame of reference"), _uid(seed, sid, "seg")
        dated = f"{study_date[4:6]}-{study_date[6:8]}-{study_date[:4]}"
        study_dir = root / sid / f"{dated}-NA-{STUDY_DESCRIPTION}-{_folder_number(study_uid)}"
        ct_dir = study_dir / f"{CT_SERIES_NUMBER:.6f}-{CT_SERIES_DESCRIPTION}-{_folder_number(ct_uid)}"
        seg_dir = study_dir / f"{300:.6f}-{SEG_SERIES_DESCRIPTION}-{_folder_number(seg_uid)}"
        common = {"PatientName": sid, "PatientID": sid, "StudyInstanceUID": study_uid, "StudyDate": study_date,
                  "StudyTime": "120000", "StudyDescription": STUDY_DESCRIPTION, "FrameOfReferenceUID": frame_of_reference}
        files = _write_ct_series(case["ct"], ct_dir, ct_uid, common, seed)
        seg_file = _write_seg(case, ct_dir, seg_dir / "1-1.dcm", seg_uid, seed, study_date)
        clinical.append({"subject_id": sid, "vertebrae_with_lesions": ";".join(case["lesions"]),
                         **{v: case["lesions"].get(v, "") for v in TCIA_VERTEBRAE}})
        for uid, folder, description, modality, sop_name, sop_uid, paths in (
                (ct_uid, ct_dir, CT_SERIES_DESCRIPTION, "CT", "CT Image Storage", _CT_IMAGE_STORAGE, files),
                (seg_uid, seg_dir, SEG_SERIES_DESCRIPTION, "SEG", "Segmentation Storage",
                 "1.2.840.10008.5.1.4.1.1.66.4", [seg_file])):
            metadata.append({
                "Series UID": uid, "Collection": COLLECTION, "3rd Party Analysis": "NO",
                "Data Description URI": f"https://doi.org/{DOI}", "Subject ID": sid, "Study UID": study_uid,
                "Study Description": STUDY_DESCRIPTION, "Study Date": dated, "Series Description": description,
                "Manufacturer": "spinemets phantom", "Modality": modality, "SOP Class Name": sop_name,
                "SOP Class UID": sop_uid, "Number of Images": len(paths),
                "File Size": f"{sum(p.stat().st_size for p in paths) / 1e6:.2f} MB",
                "File Location": "./" + folder.relative_to(out_dir).as_posix(),
                "Download Timestamp": "2001-10-10T00:00:00.000",
            })
    write_csv(Path(out_dir) / CLINICAL_FILE, clinical, CLINICAL_COLUMNS)
    write_csv(Path(out_dir) / "metadata.csv", metadata, METADATA_COLUMNS)
    return root


def write_ct_series(ct: sitk.Image, folder: str | Path, case_id: str, seed: int = 0) -> Path:
    """Write a CT image (any 3-D image :func:`spinemets.formats.images.read_image` reads) as a DICOM CT series
    into ``folder``, one file per slice, as a scanner would send it to a PACS: new UIDs (derived
    from ``case_id`` and ``seed``), ``case_id`` as patient name and ID, no other patient or study
    attribute. For showing the DICOM outputs of ``predict`` (SEG, SR) on a cohort kept as NIfTI."""
    from spinemets.formats.images import check_image
    from spinemets.fileio import check_case_id, check_output_dir

    check_case_id(case_id, folder)
    check_image(ct, folder, "CT")
    folder = check_output_dir(folder, "DICOM series folder")
    common = {"PatientName": case_id, "PatientID": case_id, "StudyInstanceUID": _uid(seed, case_id, "study"),
              "StudyDate": "", "StudyTime": "", "FrameOfReferenceUID": _uid(seed, case_id, "frame of reference")}
    array = sitk.GetArrayFromImage(ct)
    ct = sitk.Cast(sitk.Clamp(ct, lowerBound=-32768, upperBound=32767), sitk.sitkInt16) \
        if array.dtype != np.int16 else ct
    _write_ct_series(ct, Path(folder), _uid(seed, case_id, "ct"), common, seed)
    return Path(folder)


def _write_ct_series(ct: sitk.Image, folder: Path, series_uid: str, common: dict, seed: int) -> list[Path]:
    """One CT Image Storage file per slice, ``1-001.dcm`` ... (slice 1 lowest), written with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    array = sitk.GetArrayFromImage(ct)
    spacing = ct.GetSpacing()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(array.shape[0]):
        sop_uid = _uid(seed, series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        for key, value in common.items():
            setattr(ds, key, value)
        ds.SOPClassUID, ds.SOPInstanceUID = _CT_IMAGE_STORAGE, sop_uid
        ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "CT", series_uid, CT_SERIES_NUMBER
        ds.SeriesDescription, ds.InstanceNumber = CT_SERIES_DESCRIPTION, k + 1
        ds.PatientBirthDate, ds.PatientSex, ds.ReferringPhysicianName, ds.StudyID, ds.AccessionNumber = "", "", "", "", ""
        ds.Manufacturer, ds.PositionReferenceIndicator = "spinemets phantom", ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        # type 2 and 2C attributes of the CT Image and General Series modules (dciodvfy-clean)
        ds.AcquisitionNumber, ds.KVP, ds.PatientPosition, ds.BodyPartExamined = "", "", "HFS", "SPINE"
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ct.TransformIndexToPhysicalPoint((0, 0, k))]
        direction = np.array(ct.GetDirection(), float).reshape(3, 3)  # columns: the i, j, k axes in LPS
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.PixelData = np.ascontiguousarray(array[k]).astype("<i2").tobytes()
        path = folder / f"1-{k + 1:03d}.dcm"
        with atomic_path(path) as tmp:
            ds.save_as(str(tmp), enforce_file_format=True)
        paths.append(path)
    return paths


def _write_seg(case: dict, ct_dir: Path, path: Path, series_uid: str, seed: int, study_date: str) -> Path:
    from spinemets.formats.dicomseg import SegIdentity, build_segmentation, save_segmentation

    labelmap = sitk.GetImageFromArray(case["vertebrae"])
    labelmap.CopyInformation(case["ct"])
    seg = build_segmentation(labelmap, "vertebrae", ct_dir, path,
                             SegIdentity(description="Vertebrae T1-L5", segment_label=SEGMENT_LABEL,
                                         series_instance_uid=series_uid,
                                         sop_instance_uid=_uid(seed, series_uid, "instance")))
    seg.SeriesDescription = SEG_SERIES_DESCRIPTION
    seg.ContentDate = seg.SeriesDate = seg.InstanceCreationDate = study_date  # reproducible files
    seg.ContentTime = seg.SeriesTime = seg.InstanceCreationTime = "120000"
    for item in seg.ContributingEquipmentSequence:
        item.ContributionDateTime = f"{study_date}120000"
    return save_segmentation(seg, path)
