"""Label tables of the two stages, kept as plain data.

Everything that names or colours a label (``dataset.json``, 3D Slicer segment names and
colours, figure legends, command-line choices) comes from the tables here, so they cannot drift.

Vertebra stage: 0 background, 1-25 = C1...C7, T1...T12, L1...L5, Sacrum, in cranio-caudal order.
Metastasis stage: 0 background, 1 lytic, 2 sclerotic.

Segment names found in real files vary (``L5``, ``vertebrae_L5``, ``Vertebra L5``,
``osteolytic``, ``blastic`` ...). :func:`resolve_segment_name` maps them to our labels,
case-insensitively, and a user mapping file (YAML or JSON, ``{segment name: label name or
null}``) adds names or tells the importer to ignore a segment. The mapping template that
``spinemets scan --explain`` writes (:mod:`spinemets.cohort.discovery`) holds one such mapping per stage
(:func:`mapping_document`).

Built-in mappings of label values (:data:`NAMED_MAPPINGS`): ``totalsegmentator`` (its "total"
task) and ``verse`` (VerSe: 1-24 = C1-L5, 25 = L6, 26 = sacrum, 27 = coccyx, 28 = T13). Under
``verse`` the transitional vertebrae L6 (25) and T13 (28), which our 25 labels do not have, are
:class:`Refused`: a label map holding them is an error naming the file until a user mapping says
what they are (``25: L5``, or ``25: null`` to leave them out); VerSe's 25 never becomes our 25
(Sacrum). The coccyx (27) is ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping

from spinemets.errors import SpinemetsError, unknown_choice

VERTEBRAE: tuple[str, ...] = (
    *(f"C{i}" for i in range(1, 8)),
    *(f"T{i}" for i in range(1, 13)),
    *(f"L{i}" for i in range(1, 6)),
    "Sacrum",
)
LESION_TYPES: tuple[str, ...] = ("lytic", "sclerotic")
#: The label values of the two lesion types (the metastasis stage's table below).
LYTIC, SCLEROTIC = 1, 2

#: The two stages: nnU-Net dataset name, default dataset id, and label name -> value.
STAGES: dict[str, dict] = {
    "vertebrae": {
        "dataset_name": "Vertebrae",
        "dataset_id": 501,
        "labels": {"background": 0, **{name: i + 1 for i, name in enumerate(VERTEBRAE)}},
    },
    "metastases": {
        "dataset_name": "Metastases",
        "dataset_id": 502,
        "labels": {"background": 0, "lytic": LYTIC, "sclerotic": SCLEROTIC},
    },
}
STAGE_NAMES: tuple[str, ...] = tuple(STAGES)

#: Spine regions by vertebra, used for colours, figures and the SINS location component.
REGION_OF_VERTEBRA: dict[str, str] = {
    name: {"C": "cervical", "T": "thoracic", "L": "lumbar"}.get(name[0], "sacral") for name in VERTEBRAE
}

#: Base colours (RGB 0-1) of the regions; vertebrae alternate light and dark within a region so
#: that neighbours stay apart in overlays and in 3D Slicer.
_REGION_COLOURS = {
    "cervical": (0.40, 0.76, 0.65),
    "thoracic": (0.99, 0.55, 0.38),
    "lumbar": (0.55, 0.63, 0.80),
    "sacral": (0.91, 0.54, 0.76),
}
LESION_COLOURS = {"lytic": (0.89, 0.10, 0.11), "sclerotic": (0.22, 0.49, 0.72)}

#: TotalSegmentator "total" task label -> our vertebra label (its 26 vertebrae_S1 joins the sacrum).
TOTALSEGMENTATOR_TOTAL_TO_VERTEBRAE: dict[int, int] = {
    25: STAGES["vertebrae"]["labels"]["Sacrum"],
    26: STAGES["vertebrae"]["labels"]["Sacrum"],
    **{ts: 51 - ts for ts in range(27, 51)},  # 27 L5 ... 31 L1, 32 T12 ... 43 T1, 44 C7 ... 50 C1
}

#: Where stage 1's vertebrae come from (``spinemets predict --vertebrae``): the run's (or shared model's)
#: own trained model, or TotalSegmentator's ``total`` task in its default (1.5 mm) or fast (3 mm) mode
#: (:mod:`spinemets.inference.totalseg`).
VERTEBRA_SOURCES: dict[str, dict | None] = {
    "trained": None,
    "totalsegmentator": {"fast": False, "mode": "default (1.5 mm)"},
    "totalsegmentator-fast": {"fast": True, "mode": "fast (3 mm)"},
}


def check_stage(stage: str) -> dict:
    """The table of a stage; an unknown stage is an error naming the known ones."""
    if stage not in STAGES:
        raise unknown_choice("stage", stage, STAGE_NAMES)
    return STAGES[stage]


def labels(stage: str) -> dict[str, int]:
    """Label name -> value of a stage, background included."""
    return dict(check_stage(stage)["labels"])


def foreground_labels(stage: str) -> dict[str, int]:
    """Label name -> value of a stage, without background."""
    return {k: v for k, v in labels(stage).items() if v != 0}


def label_names(stage: str) -> dict[int, str]:
    """Label value -> name of a stage, background included."""
    return {v: k for k, v in labels(stage).items()}


def colour(stage: str, name: str) -> tuple[float, float, float]:
    """Display colour (RGB in 0-1) of a foreground label."""
    check_stage(stage)
    if stage == "metastases":
        return LESION_COLOURS[name]
    base = _REGION_COLOURS[REGION_OF_VERTEBRA[name]]
    shade = 0.82 if VERTEBRAE.index(name) % 2 else 1.0
    return tuple(round(c * shade, 4) for c in base)


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def _builtin_aliases(stage: str) -> dict[str, str]:
    aliases: dict[str, str] = {}
    if stage == "vertebrae":
        for name in VERTEBRAE:
            key = name.lower()
            forms = [key, f"vertebra {key}", f"vertebrae {key}", f"{key} vertebra", f"{key} vertebral body"]
            if name == "Sacrum":
                forms += ["s1", "vertebrae s1", "vertebra s1", "os sacrum"]
            for form in forms:
                aliases[form] = name
    else:
        for form in ["lytic", "osteolytic", "lysis", "lytic lesion", "lytic metastasis", "osteolytic metastasis",
                     "osteolytic lesion", "lytic metastases"]:
            aliases[form] = "lytic"
        for form in ["sclerotic", "blastic", "osteoblastic", "osteosclerotic", "sclerotic lesion",
                     "sclerotic metastasis", "blastic metastasis", "osteoblastic metastasis", "osteoblastic lesion",
                     "sclerotic metastases"]:
            aliases[form] = "sclerotic"
    return aliases


def read_mapping_file(path: str | Path) -> dict[str | int, str | None]:
    """Read a user mapping file: ``{segment name or label value: label name, or null to ignore}``.

    YAML and JSON are accepted (JSON is YAML). Names serve 3D Slicer segmentations, integer
    keys serve plain label-map files (NIfTI/NRRD). Example for the segments of a Slicer file::

        "overlapping sphere": lytic
        ribs: null
    """
    data = _read_yaml_mapping(path)
    if _is_template(data):
        raise SpinemetsError(f"{path}: is a mapping template with one mapping per stage; "
                             "read it with load_mapping(path, stage)")
    return _checked_flat(data, str(path))


def _read_yaml_mapping(path: str | Path):
    import yaml  # here: the commands that read no mapping (evaluate, predict) do not pay its import

    from spinemets.fileio import require_file
    from spinemets.errors import one_line

    path = require_file(path, "mapping file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpinemetsError(f"{path}: mapping file is not valid YAML/JSON ({one_line(exc)})") from None


def _checked_flat(data, source: str) -> dict:
    """A flat mapping ``{segment name or label value: label name or null}``, checked for its types."""
    if not isinstance(data, dict) or not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in data):
        raise SpinemetsError(f"{source}: mapping file must map segment names or label values to label names or null")
    for key in data:
        if isinstance(key, int) and key < 0:
            raise SpinemetsError(f"{source}: label value {key} in the mapping is negative")
    for key, value in data.items():
        if value is not None and not isinstance(value, str):
            raise SpinemetsError(f"{source}: {key!r} maps to {value!r}; expected a label name or null")
    return data


class Refused(str):
    """The target of a built-in mapping for a source label that none of ours stands for (VerSe's L6):
    importing it is an error until a user mapping says what it is. ``meaning`` says what it is."""

    meaning: str

    def __new__(cls, name: str, meaning: str):
        obj = super().__new__(cls, name)
        obj.meaning = meaning
        return obj

    def __reduce__(self):  # picklable for the import's worker processes
        return (Refused, (str(self), self.meaning))


#: VerSe label value -> our vertebra label: 1-24 are C1...L5 in both; 26 (sacrum) is our Sacrum;
#: 27 (coccyx) is ignored; 25 (L6) and 28 (T13), transitional vertebrae, are refused.
VERSE_TO_VERTEBRAE: dict[int, str | None] = {
    **{i + 1: name for i, name in enumerate(VERTEBRAE[:24])},
    25: Refused("L6", "VerSe's L6, a transitional sixth lumbar vertebra"),
    26: "Sacrum",
    27: None,
    28: Refused("T13", "VerSe's T13, a transitional thirteenth thoracic vertebra"),
}

#: Mappings known by name (``--mapping totalsegmentator``, ``--mapping verse``).
NAMED_MAPPINGS: dict[str, dict[int, str | None]] = {
    "totalsegmentator": {ts: VERTEBRAE[ours - 1] for ts, ours in TOTALSEGMENTATOR_TOTAL_TO_VERTEBRAE.items()},
    "verse": VERSE_TO_VERTEBRAE,
}


def resolve_segment_name(name: str, stage: str, mapping: Mapping[str, str | None] | None = None) -> int | None:
    """Label value of a segment name, or ``None`` when the mapping says to ignore it.

    The user mapping is tried first (exact names, then case-insensitively), then the built-in
    aliases. Raises :class:`KeyError` for a name that matches nothing; callers collect the
    unknown names of a file and report them together (see :func:`resolve_segment_names`).
    """
    table = labels(stage)
    if mapping:
        normalised_mapping = {_normalise(k): v for k, v in mapping.items() if isinstance(k, str)}
        for key, source in ((name, mapping), (_normalise(name), normalised_mapping)):
            if key in source:
                target = source[key]
                if target is None:
                    return None
                return _label_of(target, stage, table, f"mapping of segment {name!r}: {target!r}")
    aliases = _builtin_aliases(stage)
    alias = aliases.get(_normalise(name))
    if alias is None and stage == "metastases":
        # one segment per lesion is common: "Lytic 2", "sclerotic_3"
        alias = aliases.get(re.sub(r"\s*\d+$", "", _normalise(name)))
    if alias is None:
        raise KeyError(name)
    return table[alias]


def _label_of(target: str, stage: str, table: dict[str, int], what: str) -> int:
    """The label value of ``target``; otherwise an error saying that ``what`` (the subject, naming
    the target) is not a label of the stage."""
    alias = _builtin_aliases(stage).get(_normalise(target))
    if alias is None:
        raise SpinemetsError(
            f"{what} is not a label of the {stage} stage; known: {', '.join(foreground_labels(stage))}"
        )
    return table[alias]


def resolve_segment_names(
    names: list[str], stage: str, mapping: Mapping[str, str | None] | None = None, source: str = "segmentation"
) -> dict[str, int | None]:
    """Resolve every segment name of one file; unknown names are reported together, with the known ones."""
    resolved, unknown = {}, []
    for name in names:
        try:
            resolved[name] = resolve_segment_name(name, stage, mapping)
        except KeyError:
            unknown.append(name)
    if unknown:
        raise SpinemetsError(
            f"{source}: unknown segment name(s) {', '.join(repr(n) for n in unknown)} for the {stage} stage; "
            f"known names: {', '.join(foreground_labels(stage))} (and aliases such as "
            f"{'vertebrae_L1, Vertebra L1' if stage == 'vertebrae' else 'osteolytic, blastic'}); "
            "add the names to a mapping file (--mapping) to import them or ignore them"
        )
    return resolved


def dataset_json_labels(stage: str) -> dict[str, int]:
    """The ``labels`` entry of nnU-Net's ``dataset.json`` for a stage."""
    return labels(stage)


def check_mapping(mapping: Mapping | None, stage: str, source: str = "mapping") -> None:
    """Every target of a mapping must be a label of ``stage`` (or null, to ignore): checked once, when
    the mapping is loaded, so that the error names the mapping file rather than a case."""
    table = labels(stage)
    for key, target in (mapping or {}).items():
        if target is not None and not isinstance(target, Refused):
            _label_of(target, stage, table, f"{source}: {key!r} maps to {target!r}, which")


def load_mapping(mapping, stage: str | None = None) -> dict | None:
    """A mapping given as a dict, the name of a built-in mapping, a path to a mapping file, or nothing.

    A mapping template (:func:`mapping_document`) holds one mapping per stage: ``stage`` picks it.
    """
    if mapping is None:
        return None
    if isinstance(mapping, Mapping) and not _is_template(mapping):
        return dict(mapping) if mapping else None
    if not isinstance(mapping, Mapping) and str(mapping) in NAMED_MAPPINGS:
        return dict(NAMED_MAPPINGS[str(mapping)])
    document = mapping_document(mapping)
    if not document["template"]:
        return document["stages"][STAGE_NAMES[0]]
    if stage is None:
        raise SpinemetsError(f"{document['source']}: a mapping template holds one mapping per stage; "
                             "say which stage it is for")
    check_stage(stage)
    return document["stages"][stage]


#: The key that marks a mapping template (``spinemets scan --explain``), and its version.
TEMPLATE_KEY = "spinemets_mapping"
TEMPLATE_VERSION = 1
_TEMPLATE_KEYS = {TEMPLATE_KEY, "reviewed", "files", *STAGE_NAMES, "root"}
#: What a file of a mapping template may be set to (besides null, to leave it out).
FILE_ROLES = ("image", *STAGE_NAMES)


def _is_template(data) -> bool:
    return isinstance(data, Mapping) and TEMPLATE_KEY in data


def mapping_document(mapping) -> dict:
    """A mapping (flat file, template file, dict or built-in name) as ``{"template", "source", "stages", "files"}``.

    ``stages`` is stage -> ``{name or value: label or null}`` (or None); ``files`` is path relative
    to the scanned folder -> ``image``, a stage, or None (leave the file out). A flat mapping serves
    every stage and sets no file. A template must say ``reviewed: true``: it is written with a null
    for every open question, and null also means "ignore", so an unread template is refused.
    """
    if mapping is None:
        return {"template": False, "source": "mapping", "stages": dict.fromkeys(STAGE_NAMES), "files": {}, "root": None}
    if isinstance(mapping, Mapping):
        data, source = dict(mapping), "mapping"
    elif str(mapping) in NAMED_MAPPINGS:
        data, source = dict(NAMED_MAPPINGS[str(mapping)]), f"--mapping: the built-in mapping {str(mapping)!r}"
    else:
        data, source = _read_yaml_mapping(mapping), str(mapping)
    if not _is_template(data):
        flat = _checked_flat(data, source) or None
        return {"template": False, "source": source, "stages": dict.fromkeys(STAGE_NAMES, flat), "files": {},
                "root": None}
    unknown = sorted(map(str, set(data) - _TEMPLATE_KEYS))
    if unknown:
        raise SpinemetsError(f"{source}: mapping template has unknown key(s) {unknown}; "
                             f"expected {', '.join(sorted(_TEMPLATE_KEYS))}")
    if data[TEMPLATE_KEY] != TEMPLATE_VERSION:
        raise SpinemetsError(f"{source}: {TEMPLATE_KEY}: {data[TEMPLATE_KEY]!r} is not a known version "
                             f"(expected {TEMPLATE_VERSION})")
    if data.get("reviewed") is not True:
        raise SpinemetsError(f"{source}: the mapping template is not reviewed: replace each null that should "
                             "be a label (a null ignores the segment or leaves the file out), then set "
                             "'reviewed: true'")
    stages = {}
    for stage in STAGE_NAMES:
        section = data.get(stage) or {}
        if not isinstance(section, Mapping):
            raise SpinemetsError(f"{source}: {stage}: must map segment names or label values to label names or null")
        stages[stage] = _checked_flat(dict(section), f"{source}: {stage}") or None
        check_mapping(stages[stage], stage, source)
    files = data.get("files") or {}
    if not isinstance(files, Mapping) or not all(isinstance(k, str) for k in files):
        raise SpinemetsError(f"{source}: files: must map file paths (relative to the scanned folder) to "
                             f"{', '.join(FILE_ROLES)} or null")
    for key, role in files.items():
        if role is not None and role not in FILE_ROLES:
            raise SpinemetsError(f"{source}: files: {key!r} is set to {role!r}; choose one of "
                                 f"{', '.join(FILE_ROLES)} or null (leave it out)")
    root = data.get("root")
    if root is not None and not isinstance(root, str):
        raise SpinemetsError(f"{source}: root: must be the path of the scanned folder, not {root!r}")
    return {"template": True, "source": source, "stages": stages, "files": dict(files), "root": root}


def map_label_values(values, stage: str, mapping: Mapping | None, source: str) -> dict[int, int]:
    """Value in a label-map file -> our label value (0 to ignore), for the values present.

    Without a mapping the values must already be labels of the stage. With one, integer keys
    name the file's values; values the mapping leaves out are ignored (set to background).
    """
    table = labels(stage)
    result = {}
    if not mapping:
        unknown = sorted(int(v) for v in values if int(v) not in table.values())
        if unknown:
            raise SpinemetsError(
                f"{source}: label values {unknown} are not labels of the {stage} stage "
                f"(0-{max(table.values())}); give a mapping (--mapping) to translate them"
            )
        return {int(v): int(v) for v in values}
    for value in values:
        target = mapping.get(int(value), mapping.get(str(int(value))))
        if isinstance(target, Refused):
            raise SpinemetsError(
                f"{source}: label value {int(value)} is {target.meaning}, which the {stage} stage's labels "
                f"do not have; say what it is in a mapping file (--mapping), e.g. '{int(value)}: L5' to count "
                f"it as L5 or '{int(value)}: null' to leave it out"
            )
        result[int(value)] = 0 if target is None else _label_of(target, stage, table,
                                                                  f"{source}: value {value}: {target!r}")
    return result


PARTIAL_SINS_LABEL = "partial SINS (location + bone lesion quality only; not a SINS score)"


#: SINS location points by our vertebra label (Fisher et al. 2010). None: not determined by the label.
SINS_LOCATION: dict[str, tuple[str, int | None]] = {
    **{v: ("junctional", 3) for v in ("C1", "C2", "C7", "T1", "T2", "T11", "T12", "L1", "L5")},
    **{v: ("mobile", 2) for v in ("C3", "C4", "C5", "C6", "L2", "L3", "L4")},
    **{f"T{i}": ("semi-rigid", 1) for i in range(3, 11)},
    "Sacrum": ("sacrum: S1 junctional (3), S2-S5 rigid (0); not separated by the label", None),
}


LESION_COLUMNS = ["case_id", "lesion", "type", "level", "assignment", "distance_mm", "volume_ml", "voxels",
                  "confidence", "lytic_fraction", "mean_hu", "max_hu", "centroid_x_mm", "centroid_y_mm",
                  "centroid_z_mm", "domain_warning"]


VERTEBRA_COLUMNS = ["case_id", "vertebra", "volume_ml", "lesions", "lesion_ids", "involved_fraction",
                    "lesion_quality", "sins_location_class", "sins_location_points", "sins_bone_quality_points",
                    "partial_sins_points", "partial_sins_note", "domain_warning"]
