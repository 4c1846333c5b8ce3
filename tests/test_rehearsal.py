"""A rehearsal of the real download: a release laid out unlike the synthetic cohort, end to end.

The local fake Zenodo serves a record as a clinical export might look: a zip of per-patient folders
with spaces in their names, 3D Slicer's default file name ``Segmentation.seg.nrrd`` and segment
names in Latvian, flat files beside it, a spreadsheet and a read-me. Stage 1 comes from a folder in
TotalSegmentator's layout (per-structure masks, ``meta.csv``), as the paper profile has it. Then:
``fetch`` -> ``scan`` (discovery: its questions, the mapping template, the answers) -> the
notebooks of the ci profile, run by the batch runner on both folders (import, planning, inference,
evaluation), with the models of the session's ci run (``ci_run``, tests/conftest.py) in place of a
training of their own.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
import yaml

from conftest import REPO, copy_workspace
from fakes import FakeZenodo
from spinemets.cohort import dataset, discovery, synth
from spinemets import labels
from spinemets.run import runner
from spinemets.formats import slicer
from spinemets.errors import SpinemetsError
from spinemets.cohort.fetch import fetch_record
from spinemets.paths import Workspace

RECORD = 13645871
LATVIAN = {"lytic": "Lītiska metastāze", "sclerotic": "Sklerotiska metastāze"}
STEPS = ["01_dataset", "02_slicer", "03_training_vertebrae", "03_training_metastases", "04_inference", "05_metrics"]
STEPS_RUN = {"01_dataset", "02_slicer", "03_training", "04_inference", "05_metrics"}


def _renamed_segmentation(path: Path, names: dict[str, str]) -> bytes:
    """A .seg.nrrd with its segments renamed, written as 3D Slicer writes names: UTF-8 in the header."""
    seg = slicerio.read_segmentation(str(path))
    placeholders = {}
    for i, segment in enumerate(seg["segments"]):
        kind = labels.label_names("metastases")[labels.resolve_segment_name(segment["name"], "metastases")]
        placeholders[f"NAME{i:04d}X"] = names[kind]  # the synthetic annotators' names vary: "Lytic", "lytic 2" ...
        segment["name"] = f"NAME{i:04d}X"
    buffer = path.parent / "renamed.tmp.seg.nrrd"
    slicerio.write_segmentation(str(buffer), seg)  # pynrrd writes ASCII only
    data = buffer.read_bytes()
    buffer.unlink()
    head, body = data.split(b"\n\n", 1)
    for placeholder, name in placeholders.items():
        head = head.replace(placeholder.encode(), name.encode("utf-8"))
    return head + b"\n\n" + body


def _release(cohort: Path) -> dict[str, bytes]:
    """The record's files: a zip of three patient folders, two patients as flat files, a table, a read-me."""
    cases = sorted(p.name for p in cohort.iterdir() if (p / "ct.nrrd").exists())[:5]
    members = {}
    for n, case in enumerate(cases[:3], start=1):
        folder = f"Pacienti/Pacients {n:02d}"
        members[f"{folder}/CT.nrrd"] = (cohort / case / "ct.nrrd").read_bytes()
        members[f"{folder}/Segmentation.seg.nrrd"] = _renamed_segmentation(
            cohort / case / "metastases.seg.nrrd", LATVIAN)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    files = {"Pacienti.zip": buffer.getvalue()}
    for n, case in enumerate(cases[3:], start=4):
        files[f"P{n:02d}.nrrd"] = (cohort / case / "ct.nrrd").read_bytes()
        files[f"P{n:02d}.seg.nrrd"] = (cohort / case / "metastases.seg.nrrd").read_bytes()  # English names
    files["klīniskie_dati.csv"] = "Pacients;vecums;dzimums\nPacients 01;64;V\n".encode()
    files["LASIMANI.txt"] = b"CT un 3D Slicer segmentacijas\n"
    return files


def _totalsegmentator(cohort: Path, root: Path) -> None:
    """Three CTs of the cohort in TotalSegmentator's layout: a mask per structure (empty ones too), meta.csv."""
    cases = sorted(p.name for p in cohort.iterdir() if (p / "ct.nrrd").exists())[5:8]
    for n, case in enumerate(cases, start=1):
        subject = root / f"s{n:04d}"
        (subject / "segmentations").mkdir(parents=True)
        ct = sitk.ReadImage(str(cohort / case / "ct.nrrd"))
        sitk.WriteImage(ct, str(subject / "ct.nii.gz"), True)
        labelmap, _ = slicer.labelmap_from_segmentation(cohort / case / "vertebrae.seg.nrrd", ct, "vertebrae")
        array = sitk.GetArrayFromImage(labelmap)
        structures = {f"vertebrae_{name}" if name != "Sacrum" else "sacrum": value
                      for name, value in labels.foreground_labels("vertebrae").items()}
        structures.update({"vertebrae_S1": -1, "liver": -1})  # written empty, as TotalSegmentator does
        for structure, value in structures.items():
            mask = sitk.GetImageFromArray((array == value).astype(np.uint8))
            mask.CopyInformation(ct)
            sitk.WriteImage(mask, str(subject / "segmentations" / f"{structure}.nii.gz"), True)
    (root / "meta.csv").write_text("image_id;age;gender;institute;study_type;split\n"
                                   "s0001;60;m;A;ct;train\ns0002;71;f;B;ct;val\ns0003;55;f;A;ct;test\n")


@pytest.mark.slow
def test_a_release_unlike_the_synthetic_one_goes_from_fetch_to_the_evaluation(ci_run, tmp_path):
    cohort = tmp_path / "cohort"
    synth.synthesize_cohort(cohort, cases=8, seed=11, preset="demo")
    fetched, vertebra_data = tmp_path / "data" / "zenodo", tmp_path / "data" / "totalsegmentator"
    _totalsegmentator(cohort, vertebra_data)
    with FakeZenodo() as zenodo:
        zenodo.add_record(RECORD, _release(cohort))
        fetch_record(RECORD, fetched, api_url=zenodo.api_url, backoff=0)
    assert (fetched / "Pacienti" / "Pacients 01" / "Segmentation.seg.nrrd").is_file()
    before = {p: p.read_bytes() for p in fetched.rglob("*") if p.is_file()}

    # discovery: it asks instead of guessing, and the template it writes answers it
    with pytest.raises(SpinemetsError, match=r"Segmentation\.seg\.nrrd: .*--explain"):
        dataset.scan(fetched)
    template = tmp_path / "zenodo.mapping.yaml"
    plan = discovery.explain(fetched, template=template)
    assert "Lītiska metastāze" in plan and "klīniskie_dati.csv" in plan and "LASIMANI.txt" in plan
    answers = yaml.safe_load(template.read_text(encoding="utf-8"))
    asked = sorted(answers["files"])
    assert asked == [f"Pacienti/Pacients {n:02d}/Segmentation.seg.nrrd" for n in (1, 2, 3)]
    answers["files"] = {rel: "metastases" for rel in asked}
    answers["metastases"] = {name: stage for stage, name in LATVIAN.items()}
    answers["reviewed"] = True
    template.write_text(yaml.safe_dump(answers, allow_unicode=True), encoding="utf-8")

    # the ci profile's notebooks on both folders, as the paper profile names its data per stage
    project = tmp_path / "project"
    project.mkdir()
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, project / name)
    for folder in ("book", "notebooks", "profiles"):
        shutil.copytree(REPO / folder, project / folder)
    profile = yaml.safe_load((project / "profiles" / "ci.yaml").read_text())
    profile["cohort"] = "real"
    profile["parameters"].update({"workspace": "workspace/rehearsal", "mapping": str(template)})  # scan and import
    step = profile["notebooks"][0]["parameters"]
    step.update({"stage_data": {"vertebrae": str(vertebra_data), "metastases": str(fetched)},
                 "holdout": {"metastases": 1}, "pseudonymize": {"metastases": True}, "synthesize_if_missing": False})
    # the external check (06) is the ci run's: it reads a stand-in of its own, not this release
    profile["notebooks"] = [n for n in profile["notebooks"] if Path(n["path"]).stem in STEPS_RUN]
    (project / "profiles" / "rehearsal.yaml").write_text(yaml.safe_dump(profile))
    # The models are the session's ci run's (the same configurations, trained on the same kind of
    # synthetic CT): the training notebooks find every fold trained and skip it, so this run tests
    # the data's way from the download to the evaluation, and trains nothing (training is tested
    # in the ci run, tests/test_pipeline.py).
    ws = project / "workspace" / "rehearsal"
    copy_workspace(ci_run / "workspace" / "ci", ws, parts=("results",))
    out = runner.run("rehearsal", root=project, build_book=False)
    record = json.loads((out / "provenance.json").read_text())
    assert [n["step"] for n in record["notebooks"]] == STEPS
    assert [n["status"] for n in record["notebooks"]] == ["ok"] * len(STEPS)
    for stage in ("vertebrae", "metastases"):  # planned for this release's data; trained by the ci run
        assert Workspace(ws).plans_file(stage).is_file()
    manifest = dataset.read_manifest(ws / "manifest.csv")
    vert = manifest[manifest["stage"] == "vertebrae"]
    mets = manifest[manifest["stage"] == "metastases"]
    assert list(zip(vert["case_id"], vert["split"])) == [("s0001", "train"), ("s0002", "train"), ("s0003", "test")]
    assert sorted(mets["case_id"]) == [f"sm-{n:04d}" for n in range(1, 6)] and list(mets["split"]).count("test") == 1
    (held_out,) = mets.loc[mets["split"] == "test", "case_id"]
    # each stage scored on its own held-out CTs, all predicted in one folder
    predicted = sorted(p.name for p in (ws / "predictions").iterdir() if p.is_dir())
    assert predicted == sorted(["s0003", held_out])
    for stage, case in (("vertebrae", "s0003"), ("metastases", held_out)):
        per_case = (ws / "evaluation" / stage / "per_case.csv").read_text().splitlines()
        assert {line.split(",")[0] for line in per_case[1:]} == {case}, stage
    # the Latvian names were imported as lesions; the vertebrae from the per-structure masks
    raw = json.loads((ws / "raw" / "Dataset502_Metastases" / dataset.IMPORT_RECORD).read_text())
    assert raw["cohort"] == "real" and any(case["labels"] for case in raw["cases"].values())
    # no original case name reaches an executed notebook or a prediction; the sources are untouched
    for path in [*out.glob("*.ipynb"), *(ws / "predictions").rglob("*.csv"), ws / "predictions" / "provenance.json"]:
        assert "Pacients" not in path.read_text(encoding="utf-8"), path
    after = {p: p.read_bytes() for p in fetched.rglob("*") if p.is_file() and p.name != ".spinemets-pseudonyms.csv"}
    assert after == before
