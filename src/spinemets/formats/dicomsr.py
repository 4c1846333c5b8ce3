"""The lesion report of a prediction as a DICOM Structured Report (TID 1500 Measurement Report).

:func:`write_lesion_report` writes what ``lesions.csv`` and ``vertebrae.csv`` say about one case
of a DICOM series as a Comprehensive 3D SR (highdicom's ``highdicom.sr`` classes), beside the
DICOM-SEGs it refers to; :func:`read_lesion_report` reads the rows back, and
:func:`report_table` lists the content the way a PACS shows an SR (one line per item).

Content (TID 1500 *Imaging Measurement Report*, procedure *Computed Tomography*, observer: the
device ``spinemets``; each group names the algorithm ``spinemets`` and its version):

* **one measurement group per lesion** (TID 1411, volumetric ROI): tracking identifier
  ``lesion N`` (N as in ``lesions.csv``) and a tracking UID; finding *Neoplasm, metastatic*
  (SCT 14799000, category *Morphologically Abnormal Structure*); finding site the vertebra
  (SNOMED CT codes of :mod:`spinemets.formats.dicomseg`; none for a lesion ``outside spine``); the
  referenced segment is the lesion's type segment (``lytic`` or ``sclerotic``; for a mixed lesion
  the type of most of its voxels) in the metastasis SEG, with the source CT series. (The SEG holds
  one segment per type, not per lesion, and a reference may not name both a segment and frames:
  ``dciodvfy`` refuses Referenced Segment Number beside Referenced Frame Number. The lesion's
  centroid, among its measurements, tells it from the other lesions of its segment.) Measurements:
  *Volume* (SCT 118565006, mL), *Attenuation Coefficient* (DCM 112031, HU) with derivation *Mean*
  and *Maximum*, and, in the project's own codes, voxels, lytic fraction, distance to the assigned
  vertebra (mm; none when not measured) and the centroid's x, y, z (mm, LPS). Qualitative
  evaluations: lesion type (lytic, sclerotic, mixed) and how the vertebra was assigned
  (overlap, nearest, none);
* **one measurement group per vertebra** of ``vertebrae.csv`` (tracking identifier
  ``vertebra T7``), finding and finding site the vertebra, referencing its segment in the
  vertebra SEG: *Volume* (mL), the number of lesions, the involved volume fraction and, where it
  has lesions, the partial SINS items (location class, bone lesion quality, their points and the
  partial sum; not a SINS score: see :mod:`spinemets.inference.predict`);
* **the domain warning**, when the case is outside the training domain of the models: a
  *Qualitative Evaluations* container of TID 1500 holding a TEXT *Finding* with the whole warning
  (and the table's short form), so a reader shows it beside the measurements.

SNOMED CT and DICOM have no codes for the lytic and sclerotic bone lesion patterns, the SINS
items or the table's columns; these use the private coding scheme :data:`SCHEME` (``99`` prefix,
PS3.3 section 8.2), with their meanings spelled out, described in the Coding Scheme
Identification Sequence.

The SR is written only when the series can be referenced (:func:`spinemets.formats.dicom.check_series`),
and only when something was found (no vertebra and no lesion: no SR, as an empty label map gives
no SEG).
It carries the pseudonym (the case ID) as patient name and ID, after the rules of
:func:`spinemets.formats.dicomseg.pseudonymise`; no attribute of a source header that identifies
anybody reaches it. Written to a temporary name and renamed into place.

``dciodvfy`` (dicom3tools) reports no error for it; its warnings (:data:`DCIODVFY_WARNINGS`),
and why they stay:

* *Unrecognized defined term <99SPINEMETS> for value 1 of attribute <Coding Scheme Designator>*:
  the project's private coding scheme, which no validator knows by definition (it is described in
  the Coding Scheme Identification Sequence);
* the pseudonym's warnings of :mod:`spinemets.formats.dicomseg` (empty Study Date, Time and ID; a
  one-component Patient's Name).
"""

from __future__ import annotations

import logging
import math
import warnings
from pathlib import Path

from spinemets import __version__
from spinemets import labels as labels_mod
from spinemets.formats.dicomseg import DCIODVFY_WARNINGS as _SEG_WARNINGS
from spinemets.errors import SpinemetsError
from spinemets.fileio import atomic_path, check_output_file, require_file
from spinemets.errors import one_line

log = logging.getLogger(__name__)

#: The project's coding scheme (a private one: PS3.3 section 8.2 leaves designators starting with 99 to them).
SCHEME = "99SPINEMETS"
#: The dciodvfy warnings the module docstring explains (substrings of its output lines).
DCIODVFY_WARNINGS = (f"Unrecognized defined term <{SCHEME}> for value 1 of attribute <Coding Scheme Designator>",
                     *_SEG_WARNINGS)
#: Series Number of the SR (the SEGs are 300).
SR_SERIES_NUMBER = 301
#: File name of the SR in a case folder.
SR_FILE = "report.dcm"

_LESION = "lesion "
_VERTEBRA = "vertebra "
_OUTSIDE = "outside spine"

#: code value -> meaning of the project's codes.
LOCAL_CODES = {
    "LT": "Bone lesion type", "LT1": "Lytic", "LT2": "Sclerotic", "LT3": "Mixed lytic and sclerotic",
    "AS": "Vertebra assignment", "AS1": "Overlap with the vertebra", "AS2": "Nearest vertebra within reach",
    "AS0": "No vertebra",
    "VX": "Voxels", "LF": "Lytic fraction", "DI": "Distance to the assigned vertebra",
    "CX": "Centroid x (LPS)", "CY": "Centroid y (LPS)", "CZ": "Centroid z (LPS)",
    "NL": "Number of lesions", "IF": "Involved volume fraction",
    "LQ": "SINS bone lesion quality", "LQ1": "Lytic", "LQ2": "Blastic", "LQ3": "Mixed",
    "LC": "SINS location", "LC1": "Junctional", "LC2": "Mobile", "LC3": "Semi-rigid",
    "LC4": "Sacrum (S1 junctional, S2-S5 rigid)",
    "LP": "SINS location points", "QP": "SINS bone lesion quality points", "PS": "Partial SINS points",
    "DW": "Domain warning (table)", "DC": "Detection confidence",
}
_TYPE_CODES = {"lytic": "LT1", "sclerotic": "LT2", "mixed": "LT3"}
_ASSIGNMENT_CODES = {"overlap": "AS1", "nearest": "AS2", "none": "AS0"}
_QUALITY_CODES = {"lytic": "LQ1", "blastic": "LQ2", "mixed": "LQ3"}
_LOCATION_CODES = {"junctional": "LC1", "mobile": "LC2", "semi-rigid": "LC3"}
_SACRUM_LOCATION = "LC4"

#: lesions.csv column -> (code, unit) of its measurement (volume and HU use standard codes).
_LESION_NUMBERS = {"voxels": ("VX", "{voxels}"), "lytic_fraction": ("LF", "1"), "confidence": ("DC", "1"),
                   "distance_mm": ("DI", "mm"),
                   "centroid_x_mm": ("CX", "mm"), "centroid_y_mm": ("CY", "mm"), "centroid_z_mm": ("CZ", "mm")}
_VERTEBRA_NUMBERS = {"lesions": ("NL", "{lesions}"), "involved_fraction": ("IF", "1"),
                     "sins_location_points": ("LP", "{points}"), "sins_bone_quality_points": ("QP", "{points}"),
                     "partial_sins_points": ("PS", "{points}")}
_INT_COLUMNS = {"lesion", "voxels", "lesions", "sins_location_points", "sins_bone_quality_points",
                "partial_sins_points"}


def _code(value: str):
    import highdicom as hd

    return hd.sr.CodedConcept(value, SCHEME, LOCAL_CODES[value])


def _unit(value: str):
    import highdicom as hd

    meanings = {"mL": "milliliter", "mm": "millimeter", "[hnsf'U]": "Hounsfield unit", "1": "no units",
                "{voxels}": "voxels", "{lesions}": "lesions", "{points}": "points"}
    return hd.sr.CodedConcept(value=value, scheme_designator="UCUM", meaning=meanings[value])


def vertebra_code(name: str):
    """The SNOMED CT code of a vertebra label (``T7`` -> *T7 vertebra*; ``Sacrum``)."""
    from pydicom.sr.codedict import codes

    return codes.SCT.Sacrum if name == "Sacrum" else getattr(codes.SCT, f"{name}Vertebra")


# ---------------------------------------------------------------------------------------------
# writing


def write_lesion_report(lesion_rows: list[dict], vertebra_rows: list[dict], source_headers: list,
                        out_path: str | Path, pseudonym: str, vertebrae_seg: str | Path | None = None,
                        metastases_seg: str | Path | None = None, warning: str = "") -> Path | None:
    """Write the SR of one case (the module's content) to ``out_path`` and return it; None (nothing
    written) when neither table has a row: a Measurement Report needs a measurement.

    ``source_headers`` are the CT series' slice headers (pydicom data sets, as
    :func:`spinemets.formats.dicom.read_series_headers` gives them); ``vertebrae_seg`` and
    ``metastases_seg`` the SEG files written for the case (None where none was: an empty label
    map); ``warning`` the whole domain warning ("" inside the domain).
    """
    if not lesion_rows and not vertebra_rows:
        log.info("%s: no vertebra and no lesion found; no SR written (a Measurement Report needs a measurement)",
                 out_path)
        return None
    sr = build_lesion_report(lesion_rows, vertebra_rows, source_headers, pseudonym, vertebrae_seg, metastases_seg,
                             warning, out_path)
    out_path = check_output_file(out_path, "DICOM SR file")
    with atomic_path(out_path) as tmp:
        sr.save_as(str(tmp), enforce_file_format=True)
    return Path(out_path)


def build_lesion_report(lesion_rows, vertebra_rows, source_headers, pseudonym, vertebrae_seg=None,
                        metastases_seg=None, warning="", out_path="DICOM SR"):
    """The highdicom Comprehensive3DSR that :func:`write_lesion_report` writes."""
    import highdicom as hd
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sr.codedict import codes

    from spinemets.formats.dicomseg import pseudonymise

    if not source_headers:
        raise SpinemetsError(f"{out_path}: no source CT slices to reference")
    series_uid = str(source_headers[0].SeriesInstanceUID)
    segs = {stage: pydicom.dcmread(str(path), stop_before_pixels=True) if path is not None else None
            for stage, path in (("vertebrae", vertebrae_seg), ("metastases", metastases_seg))}
    numbers = {stage: ({str(item.SegmentLabel): int(item.SegmentNumber) for item in ds.SegmentSequence}
                       if ds is not None else {}) for stage, ds in segs.items()}
    algorithm = hd.sr.AlgorithmIdentification(name="spinemets", version=__version__)

    def referenced(stage: str, label: str):
        ds = segs[stage]
        if ds is None or label not in numbers[stage]:
            raise SpinemetsError(f"{out_path}: the {stage} SEG has no segment {label!r} to reference")
        return hd.sr.ReferencedSegment(sop_class_uid=ds.SOPClassUID, sop_instance_uid=ds.SOPInstanceUID,
                                       segment_number=numbers[stage][label],
                                       source_series=hd.sr.SourceSeriesForSegmentation(series_uid))

    def measurement(name, value, unit, derivation=None):
        return hd.sr.Measurement(name=name, value=float(value), unit=_unit(unit), derivation=derivation)

    groups = []
    for row in lesion_rows:
        kind = str(row["type"])
        segment = kind if kind != "mixed" else ("lytic" if float(row["lytic_fraction"]) >= 0.5 else "sclerotic")
        items = [measurement(codes.SCT.Volume, row["volume_ml"], "mL"),
                 measurement(codes.DCM.AttenuationCoefficient, row["mean_hu"], "[hnsf'U]", codes.SCT.Mean),
                 measurement(codes.DCM.AttenuationCoefficient, row["max_hu"], "[hnsf'U]", codes.SCT.Maximum)]
        items += [measurement(_code(code), row[column], unit) for column, (code, unit) in _LESION_NUMBERS.items()
                  if _number(row[column]) is not None]
        sites = [hd.sr.FindingSite(vertebra_code(row["level"]))] if row["level"] != _OUTSIDE else None
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{_LESION}{row['lesion']}"),
            referenced_segment=referenced("metastases", segment),
            finding_type=codes.SCT.NeoplasmMetastatic,
            finding_category=codes.SCT.MorphologicallyAbnormalStructure,
            finding_sites=sites, algorithm_id=algorithm, measurements=items,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(_code("LT"), _code(_TYPE_CODES[kind])),
                hd.sr.QualitativeEvaluation(_code("AS"), _code(_ASSIGNMENT_CODES[str(row["assignment"])]))]))
    for row in vertebra_rows:
        name = str(row["vertebra"])
        items = [measurement(codes.SCT.Volume, row["volume_ml"], "mL")]
        items += [measurement(_code(code), row[column], unit) for column, (code, unit) in _VERTEBRA_NUMBERS.items()
                  if _number(row[column]) is not None]
        evaluations = []
        if row.get("lesion_quality"):
            location = _LOCATION_CODES.get(str(row["sins_location_class"]), _SACRUM_LOCATION)
            evaluations = [hd.sr.QualitativeEvaluation(_code("LQ"), _code(_QUALITY_CODES[str(row["lesion_quality"])])),
                           hd.sr.QualitativeEvaluation(_code("LC"), _code(location))]
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=f"{_VERTEBRA}{name}"),
            referenced_segment=referenced("vertebrae", name),
            finding_type=vertebra_code(name), finding_category=codes.SCT.AnatomicalStructure,
            finding_sites=[hd.sr.FindingSite(vertebra_code(name))], algorithm_id=algorithm,
            measurements=items, qualitative_evaluations=evaluations or None))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name="spinemets", manufacturer_name="spinemets", model_name="spinemets predict"))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=hd.sr.CodedConcept("77477000", "SCT", "Computed Tomography"),
        imaging_measurements=groups or None)
    if warning:
        report[0].ContentSequence.append(_warning_container(warning, lesion_rows, vertebra_rows))
    evidence = [ds for ds in segs.values() if ds is not None] + list(source_headers)
    with warnings.catch_warnings():  # a one-part Patient's Name in the source (an ID) is not ours to fix
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence, content=report[0], series_instance_uid=hd.UID(), series_number=SR_SERIES_NUMBER,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="spinemets", is_complete=True,
            is_final=False, is_verified=False, series_description="spinemets lesion report",
            institution_name=None)
    scheme = Dataset()
    scheme.CodingSchemeDesignator = SCHEME
    scheme.CodingSchemeName = "spinemets codes"
    scheme.CodingSchemeResponsibleOrganization = "spinemets"
    sr.CodingSchemeIdentificationSequence = [scheme]
    pseudonymise(sr, pseudonym)
    return sr


def _warning_container(warning: str, lesion_rows, vertebra_rows):
    """TID 1500's Qualitative Evaluations container with the domain warning as a TEXT Finding."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    flag = next((str(r.get("domain_warning") or "") for r in [*lesion_rows, *vertebra_rows]), "")
    container = hd.sr.ContainerContentItem(
        name=hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = [hd.sr.TextContentItem(name=codes.DCM.Finding, value=" ".join(warning.split()),
                                   relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)]
    if flag:
        items.append(hd.sr.TextContentItem(name=_code("DW"), value=flag,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def _number(value) -> float | None:
    """A table cell as a number, or None when empty or not a number (NaN)."""
    if value is None or value == "":
        return None
    number = float(value)
    return None if math.isnan(number) else number


# ---------------------------------------------------------------------------------------------
# reading


def read_lesion_report(path: str | Path, case_id: str | None = None) -> dict:
    """Read an SR written by :func:`write_lesion_report` back into table rows.

    Returns ``lesions`` and ``vertebrae`` (rows with the columns of ``lesions.csv`` and
    ``vertebrae.csv``; ``case_id`` is the SR's Patient ID unless given), ``warning`` (the whole
    domain warning, or ""), ``referenced_series`` (the CT series the segments come from) and
    ``referenced_segs`` (SOP Instance UIDs of the SEGs). Raises :class:`SpinemetsError` naming the
    file when it is no such report.
    """
    import pydicom

    from spinemets.labels import LESION_COLUMNS, PARTIAL_SINS_LABEL, SINS_LOCATION, VERTEBRA_COLUMNS

    path = require_file(path, "DICOM SR file")
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:
        raise SpinemetsError(f"{path}: cannot read DICOM file: {one_line(exc)[:200]}") from None
    if str(ds.get("Modality", "")) != "SR" or _concept(ds) != ("126000", "DCM"):
        raise SpinemetsError(f"{path}: not a spinemets lesion report (an SR with an Imaging Measurement Report)")
    case = case_id if case_id is not None else str(ds.get("PatientID", ""))
    names = {_key(vertebra_code(n)): n for n in labels_mod.label_names("vertebrae").values() if n != "background"}
    by_code = {code: name for name, code in _TYPE_CODES.items()}
    assignments = {code: name for name, code in _ASSIGNMENT_CODES.items()}
    qualities = {code: name for name, code in _QUALITY_CODES.items()}
    locations = {code: name for name, code in _LOCATION_CODES.items()}
    out = {"lesions": [], "vertebrae": [], "warning": "", "referenced_series": [], "referenced_segs": []}
    flag = ""
    for item in ds.ContentSequence:
        if _concept(item) == ("C0034375", "UMLS"):
            for text in item.ContentSequence:
                if _concept(text) == ("121071", "DCM"):
                    out["warning"] = str(text.TextValue)
                elif _concept(text) == ("DW", SCHEME):
                    flag = str(text.TextValue)
        if _concept(item) != ("126010", "DCM"):
            continue
        for index, group in enumerate(item.ContentSequence):
            ident = f"number {index + 1}"
            try:
                g = _group(group, path)
                ident = g["tracking"]
                if ident.startswith(_LESION):
                    numbers = g["numbers"]
                    row = {"case_id": case, "lesion": int(ident[len(_LESION):]), "type": by_code[g["codes"]["LT"]],
                           "level": names[g["site"]] if g["site"] else _OUTSIDE,
                           "assignment": assignments[g["codes"]["AS"]], "volume_ml": numbers[("118565006", "SCT")],
                           "mean_hu": numbers[("112031", "DCM", "373098007")],
                           "max_hu": numbers[("112031", "DCM", "56851009")]}
                    row.update({column: g["numbers"].get((code, SCHEME), math.nan)
                                for column, (code, _) in _LESION_NUMBERS.items()})
                    out["lesions"].append(row)
                elif ident.startswith(_VERTEBRA):
                    name = ident[len(_VERTEBRA):]
                    row = {"case_id": case, "vertebra": name, "volume_ml": g["numbers"][("118565006", "SCT")]}
                    row.update({column: g["numbers"].get((code, SCHEME), "")
                                for column, (code, _) in _VERTEBRA_NUMBERS.items()})
                    if "involved_fraction" in row and row["involved_fraction"] == "":
                        row["involved_fraction"] = math.nan
                    if "LQ" in g["codes"]:
                        row["lesion_quality"] = qualities[g["codes"]["LQ"]]
                        default = SINS_LOCATION.get(name, ("",))[0]  # the sacrum's
                        row["sins_location_class"] = locations.get(g["codes"]["LC"], default)
                        row["partial_sins_note"] = PARTIAL_SINS_LABEL
                    else:
                        row.update({"lesion_quality": "", "sins_location_class": "", "partial_sins_note": ""})
                    out["vertebrae"].append(row)
                else:
                    raise SpinemetsError(f"{path}: measurement group with an unknown tracking identifier {ident!r}")
            except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:  # an SR of another tool
                raise SpinemetsError(f"{path}: measurement group {ident!r} is not one spinemets writes "
                                     f"(missing or unknown: {one_line(exc)[:80]})") from None
            if g["series"] and g["series"] not in out["referenced_series"]:
                out["referenced_series"].append(g["series"])
            if g["seg"] and g["seg"] not in out["referenced_segs"]:
                out["referenced_segs"].append(g["seg"])
    for row in out["lesions"]:
        row["domain_warning"] = flag
        for column in _INT_COLUMNS & set(row):
            row[column] = int(row[column])
    for row in out["vertebrae"]:
        here = [r for r in out["lesions"] if r["level"] == row["vertebra"]]
        row["lesion_ids"] = " ".join(str(r["lesion"]) for r in sorted(here, key=lambda r: r["lesion"]))
        row["domain_warning"] = flag
        for column in _INT_COLUMNS & set(row):
            if row[column] != "":
                row[column] = int(row[column])
    out["lesions"] = [{c: row[c] for c in LESION_COLUMNS} for row in out["lesions"]]
    out["vertebrae"] = [{c: row[c] for c in VERTEBRA_COLUMNS} for row in out["vertebrae"]]
    return out


def _concept(item) -> tuple[str, str] | None:
    names = item.get("ConceptNameCodeSequence", None)
    if not names:
        return None
    return str(names[0].CodeValue), str(names[0].CodingSchemeDesignator)


def _key(code) -> tuple[str, str]:
    return str(code.value), str(code.scheme_designator)


def _group(group, path: Path) -> dict:
    """Tracking identifier, coded items (by concept code value), numbers and references of one group."""
    out = {"tracking": "", "codes": {}, "numbers": {}, "site": None, "series": None, "seg": None}
    for item in group.get("ContentSequence", None) or []:
        concept = _concept(item)
        kind = str(item.get("ValueType", ""))
        if concept == ("112039", "DCM"):
            out["tracking"] = str(item.TextValue)
        elif concept == ("363698007", "SCT"):
            out["site"] = (str(item.ConceptCodeSequence[0].CodeValue),
                           str(item.ConceptCodeSequence[0].CodingSchemeDesignator))
        elif kind == "CODE" and concept and concept[1] == SCHEME:
            out["codes"][concept[0]] = str(item.ConceptCodeSequence[0].CodeValue)
        elif kind == "NUM":
            value = item.MeasuredValueSequence[0]
            number = float(value.FloatingPointValue) if "FloatingPointValue" in value else float(value.NumericValue)
            derivation = [str(c.ConceptCodeSequence[0].CodeValue) for c in item.get("ContentSequence", None) or []
                          if _concept(c) == ("121401", "DCM")]
            out["numbers"][concept + tuple(derivation)] = number
        elif concept == ("121191", "DCM"):  # Referenced Segment
            out["seg"] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        elif concept == ("121232", "DCM"):  # Source series for segmentation
            out["series"] = str(item.UID)
    if not out["tracking"]:
        raise SpinemetsError(f"{path}: a measurement group without a tracking identifier")
    return out


def report_table(path: str | Path) -> list[dict]:
    """The SR's content as a PACS lists it: one row per item (``group``, ``item``, ``value``,
    ``unit``), the groups by their tracking identifier, coded values by their meaning."""
    import pydicom

    path = require_file(path, "DICOM SR file")
    ds = pydicom.dcmread(str(path))
    rows = []

    def walk(items, group):
        for item in items:
            meaning = str(item.ConceptNameCodeSequence[0].CodeMeaning) if "ConceptNameCodeSequence" in item else ""
            kind = str(item.get("ValueType", ""))
            if kind == "CONTAINER":
                ident = next((str(c.TextValue) for c in item.get("ContentSequence", None) or []
                              if _concept(c) == ("112039", "DCM")), None)
                walk(item.get("ContentSequence", None) or [], ident or group or meaning)
                continue
            value, unit = "", ""
            if kind == "NUM":
                value = str(item.MeasuredValueSequence[0].NumericValue)
                unit = str(item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeMeaning)
                derivation = [str(c.ConceptCodeSequence[0].CodeMeaning) for c in item.get("ContentSequence", None)
                              or [] if _concept(c) == ("121401", "DCM")]
                if derivation:
                    meaning = f"{meaning} ({derivation[0]})"
            elif kind == "CODE":
                value = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif kind == "TEXT":
                value = str(item.TextValue)
            elif kind == "UIDREF":
                value = str(item.UID)
            elif kind in ("IMAGE", "COMPOSITE"):
                ref = item.ReferencedSOPSequence[0]
                number = ref.get("ReferencedSegmentNumber")
                value = str(ref.ReferencedSOPInstanceUID)
                if number:
                    value = f"segment {number} of {value}"
            else:
                continue
            if kind != "CONTAINER" and "ContentSequence" in item and kind != "NUM":
                walk(item.ContentSequence, group)
            rows.append({"group": group or "report", "item": meaning, "value": value, "unit": unit})

    walk(ds.ContentSequence, None)
    return rows
