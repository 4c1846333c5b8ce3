"""Models that travel (spinemets.training.sharing): export, install and predict from an archive.

The slow tests export the session's ci run (``ci_run``, read only) once and predict with the installed
model; the others check hand-built archives, hostile ones first: each is refused in one line with exit
status 2 before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from spinemets import cli
from spinemets.training import nnunet, sharing
from spinemets.errors import SpinemetsError
from spinemets.paths import Workspace
from spinemets.provenance import versions

MODEL = "results/Dataset501_Vertebrae/SpinemetsCITrainer__nnUNetPlans__demo_vertebrae"
NAME = "handmade"


def _files() -> dict[str, bytes]:
    return {f"{MODEL}/plans.json": b'{"plans_name": "nnUNetPlans", "configurations": {}}\n',
            f"{MODEL}/dataset.json": b'{"labels": {"background": 0}, "channel_names": {"0": "CT"}}\n',
            f"{MODEL}/dataset_fingerprint.json": b'{"spacings": [], "shapes_after_crop": []}\n',
            f"{MODEL}/fold_all/checkpoint_final.pth": b"\x80weights" * 100,
            f"{MODEL}/spinemets_domain.json": b'{"format": 1}\n'}


def _card(files: dict[str, bytes], **changes) -> dict:
    card = {"format": sharing.FORMAT, "kind": sharing.KIND, "name": NAME, "created": "2026-12-06T00:00:00+00:00",
            "training_data": {"cohort": "synthetic", "dataset": "x", "licence": "y", "cases": {"vertebrae": 4},
                              "identifiers": "none"},
            "protocol": {"profile": "ci", "versions": {k: versions()[k] for k in ("spinemets", "nnunetv2", "torch")}},
            "inference": {"min_lesion_ml": 0.0, "min_vertebra_ml": 0.0, "repair_vertebra_order": False,
                          "min_confidence": 0.0},
            "stages": {"vertebrae": {"models": [{"folder": MODEL, "configuration": "demo_vertebrae",
                                                 "trainer": "SpinemetsCITrainer", "folds": ["all"]}],
                                     "postprocessing": None,
                                     "domain": {"record": f"{MODEL}/spinemets_domain.json"}}},
            "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in files.items()}}
    card.update(changes)
    return card


def build_archive(path: Path, files: dict[str, bytes] | None = None, card: dict | None = None,
                  extra: dict[str, bytes] | None = None, links: dict[str, str] | None = None) -> Path:
    """A model archive by hand: ``files`` listed in ``card`` (default: its own), then ``extra`` entries
    (not listed) and ``links`` (zip entries with a symbolic link's Unix mode)."""
    files = _files() if files is None else files
    card = _card(files) if card is None else card
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(sharing.CARD_JSON, json.dumps(card))
        for name, data in {**files, **(extra or {})}.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def refused(capsys, archive: Path, models: Path, *words: str) -> str:
    """``install-model`` refuses ``archive``: exit 2, one line naming it and ``words``; nothing in ``models``."""
    code = cli.main(["install-model", str(archive), "--models", str(models)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith(("INFO", "WARNING"))]
    assert len(lines) == 1 and lines[0].startswith(f"spinemets: error: {archive}"), err
    for word in words:
        assert word in lines[0], lines[0]
    assert not models.exists() or not any(models.iterdir()), sorted(models.rglob("*"))
    return lines[0]


def test_a_hand_built_archive_installs_and_is_checked_again_when_used(tmp_path, capsys):
    """The builder makes valid archives (so the refusals below are for what each one changes)."""
    archive = build_archive(tmp_path / "ok.zip")
    assert cli.main(["install-model", str(archive), "--models", str(tmp_path / "models")]) == 0
    folder = tmp_path / "models" / NAME
    assert sharing.check_folder(folder)["name"] == NAME
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == {*_files(), "model_card.json"}
    # installing it again is a no-op; an edited file of the installed folder is refused when it is used
    assert cli.main(["install-model", str(archive), "--models", str(tmp_path / "models")]) == 0
    (folder / MODEL / "plans.json").write_text('{"plans_name": "other", "configurations": {}}\n')
    with pytest.raises(SpinemetsError, match="plans.json: does not match its SHA-256"):
        sharing.open_model(folder)


def test_an_archive_given_to_predict_is_unpacked_for_the_run_only(tmp_path):
    import gc

    model = sharing.open_model(build_archive(tmp_path / "ok.zip"))
    folder = model.folder
    assert sharing.check_folder(folder)["name"] == NAME and tmp_path not in folder.parents
    assert model.stage_models("vertebrae") == [{"folder": str(folder / MODEL), "configuration": "demo_vertebrae",
                                                "trainer": "SpinemetsCITrainer", "folds": ["all"]}]
    with pytest.raises(SpinemetsError, match="holds no metastases stage"):
        model.stage_models("metastases")
    del model
    gc.collect()
    assert not folder.exists()


def test_predict_refuses_a_hostile_model_before_writing_anything(tmp_path, capsys):
    ct = tmp_path / "ct.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkInt16), str(ct))
    archive = build_archive(tmp_path / "evil.zip", extra={"../../outside.txt": b"x"})
    out = tmp_path / "pred"
    code = cli.main(["predict", "--input", str(ct), "--out", str(out), "--model", str(archive)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "would be written outside the output folder" in err[0], err
    assert not out.exists() and not (tmp_path.parent / "outside.txt").exists()


def test_path_traversal_is_refused(tmp_path, capsys):
    archive = build_archive(tmp_path / "evil.zip", extra={"../outside.txt": b"x"})
    refused(capsys, archive, tmp_path / "models", "../outside.txt", "outside the output folder")
    assert not (tmp_path / "outside.txt").exists()


def test_a_link_is_refused(tmp_path, capsys):
    archive = build_archive(tmp_path / "link.zip", links={f"{MODEL}/fold_all/evil": "/etc/passwd"})
    refused(capsys, archive, tmp_path / "models", "link or special file")


def test_a_bomb_is_refused(tmp_path, capsys):
    files = {**_files(), f"{MODEL}/fold_all/checkpoint_final.pth": bytes(30 * 2**20)}  # 30 MB of zeros
    archive = build_archive(tmp_path / "bomb.zip", files)
    assert archive.stat().st_size < 2**20
    refused(capsys, archive, tmp_path / "models", "archive bomb")


def test_a_missing_file_is_refused(tmp_path, capsys):
    files = _files()
    card = _card(files)
    del files[f"{MODEL}/fold_all/checkpoint_final.pth"]
    archive = build_archive(tmp_path / "missing.zip", files, card)
    refused(capsys, archive, tmp_path / "models", "checkpoint_final.pth is listed in the model card but missing")


def test_an_edited_file_is_refused(tmp_path, capsys):
    files = _files()
    card = _card(files)
    files[f"{MODEL}/fold_all/checkpoint_final.pth"] = b"\x80WEIGHTS" * 100  # same size, other bytes
    archive = build_archive(tmp_path / "edited.zip", files, card)
    refused(capsys, archive, tmp_path / "models", "checkpoint_final.pth does not match its SHA-256")


def test_a_file_the_card_does_not_list_is_refused(tmp_path, capsys):
    archive = build_archive(tmp_path / "extra.zip", extra={f"{MODEL}/fold_all/hook.py": b"import os\n"})
    refused(capsys, archive, tmp_path / "models", "hook.py is in the archive but not in its model card")


def test_a_card_without_nnunets_files_is_refused(tmp_path, capsys):
    files = _files()
    del files[f"{MODEL}/dataset_fingerprint.json"]
    archive = build_archive(tmp_path / "nofp.zip", files)
    refused(capsys, archive, tmp_path / "models", "lacks", "dataset_fingerprint.json")


def test_another_nnunet_major_version_is_refused_and_a_minor_difference_is_said(tmp_path, capsys, caplog):
    files = _files()
    card = _card(files)
    card["protocol"]["versions"]["nnunetv2"] = "3.0.0"
    refused(capsys, build_archive(tmp_path / "v3.zip", files, card), tmp_path / "models", "nnU-Net 3.0.0",
            "another major version")
    card["protocol"]["versions"].update(nnunetv2=versions()["nnunetv2"], torch="0.1.0")
    with caplog.at_level("WARNING"):
        sharing.install_model(build_archive(tmp_path / "old-torch.zip", files, card), tmp_path / "models2")
    assert "torch 0.1.0 (model) vs" in caplog.text


@pytest.mark.parametrize("content, words", [(b"not a zip", "not a zip file"),
                                            (None, "no model_card.json")])
def test_not_a_model_archive_is_refused(tmp_path, capsys, content, words):
    archive = tmp_path / "other.zip"
    if content is None:
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("readme.txt", "hello")
    else:
        archive.write_bytes(content)
    refused(capsys, archive, tmp_path / "models", words)


def test_models_folder_comes_from_the_environment_and_stays_outside_workspaces(tmp_path, monkeypatch):
    monkeypatch.setenv(sharing.MODELS_ENV, str(tmp_path / "shared-models"))
    assert sharing.models_folder() == tmp_path / "shared-models"
    monkeypatch.delenv(sharing.MODELS_ENV)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert sharing.models_folder() == tmp_path / "xdg" / "spinemets" / "models"
    ws = tmp_path / "workspace"
    for part in ("raw", "results"):
        (ws / part).mkdir(parents=True)
    with pytest.raises(SpinemetsError, match="inside the workspace"):
        sharing.install_model(build_archive(tmp_path / "ok.zip"), ws / "models")


def test_mps_is_accepted_where_cuda_is_and_refused_where_the_machine_has_none(monkeypatch):
    parser = cli.build_parser()
    for argv in (["predict", "--input", "x", "--out", "y", "--device", "mps"],
                 ["train", "--stage", "vertebrae", "--device", "mps"]):
        assert parser.parse_args(argv).device == "mps"
    monkeypatch.setattr(nnunet, "_mps_available", lambda: False)
    with pytest.raises(SpinemetsError, match="'mps' requested but PyTorch finds no Apple-silicon GPU"):
        nnunet.check_device("mps", available=True)
    with pytest.raises(SpinemetsError, match="one of cpu, cuda, mps"):
        nnunet.check_device("tpu")


def test_mps_reaches_nnunets_predictor_as_torch_device(monkeypatch, tmp_path):
    """nnU-Net's predictor is built with torch.device('mps'), as its own nnUNetv2_predict -device mps does."""
    import torch
    from nnunetv2.inference import predict_from_raw_data

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            raise RuntimeError("recorded")

    monkeypatch.setattr(nnunet, "_mps_available", lambda: True)
    monkeypatch.setattr(nnunet, "check_model_folder", lambda *a, **k: None)
    monkeypatch.setattr(predict_from_raw_data, "nnUNetPredictor", Recorder)
    with pytest.raises(RuntimeError, match="recorded"):
        nnunet.load_predictor({"folder": str(tmp_path), "folds": ["all"]}, device="mps", workspace=tmp_path)
    assert seen["device"] == torch.device("mps")


# ---------------------------------------------------------------------------------------------
# The ci run's model


@pytest.fixture(scope="session")
def ci_archive(ci_run, tmp_path_factory) -> Path:
    """The ci run's model archive (both stages), exported once from the shared run (read only)."""
    out = tmp_path_factory.mktemp("model") / "ci-model.zip"
    return sharing.export_model(out, profile="ci", workspace=Workspace(ci_run / "workspace" / "ci"))


@pytest.mark.slow
def test_exported_ci_model_installs_and_predicts_as_the_profile(ci_run, ci_archive, tmp_path, capsys):
    """Installed in a fresh folder, ``predict --model`` gives byte for byte the predictions that
    ``predict --profile ci`` gave in the run's inference notebook, on the held-out cases."""
    ws = Workspace(ci_run / "workspace" / "ci")
    reference = ws.predictions
    ran = json.loads((reference / "provenance.json").read_text())
    assert ran["parameters"]["profile"] == "ci"
    assert cli.main(["install-model", str(ci_archive), "--models", str(tmp_path / "models")]) == 0
    installed = tmp_path / "models" / "spinemets-ci-vertebrae-metastases"
    out = tmp_path / "pred"
    assert cli.main(["predict", "--input", str(ws.test_images("vertebrae")), "--out", str(out),
                     "--model", str(installed), "--device", "cpu"]) == 0
    mine = json.loads((out / "provenance.json").read_text())
    # the same settings as the notebook's predict --profile ci (so the comparison is of the models)
    for key in ("roi", "margin_mm", "near_mm", "tta", "min_lesion_ml", "min_vertebra_ml", "repair_order", "min_confidence"):
        assert mine["parameters"][key] == ran["parameters"][key], key
    assert mine["shared_model"]["name"] == "spinemets-ci-vertebrae-metastases"
    assert mine["domain"]["training"] == ran["domain"]["training"]  # the model's own domain records
    cases = ws.held_out_cases("vertebrae")
    assert cases and sorted(p.name for p in out.iterdir() if p.is_dir()) == cases
    for case in cases:
        for name in ("vertebrae.nii.gz", "metastases.nii.gz", "metastases_confidence.nii.gz"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(reference / case / name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case / name)))
            assert np.array_equal(a, b), (case, name)
    assert (out / "lesions.csv").read_bytes() == (reference / "lesions.csv").read_bytes()
    assert (out / "vertebrae.csv").read_bytes() == (reference / "vertebrae.csv").read_bytes()


@pytest.mark.slow
def test_ci_model_card(ci_run, ci_archive, tmp_path):
    ws = Workspace(ci_run / "workspace" / "ci")
    with zipfile.ZipFile(ci_archive) as zf:
        card = json.loads(zf.read(sharing.CARD_JSON))
        markdown = zf.read(sharing.CARD_MD).decode()
        names = [n for n in zf.namelist() if not n.endswith("/")]
        texts = {n: zf.read(n) for n in names if n.endswith((".json", ".md"))}
        digests = {n: hashlib.sha256(zf.read(n)).hexdigest() for n in names if n != sharing.CARD_JSON}
    # every other file with its SHA-256, in the JSON and in the Markdown; no debug.json (host name, folders)
    assert {n: m["sha256"] for n, m in card["files"].items()} == digests
    assert not [n for n in names if n.endswith("debug.json")]
    for name, digest in digests.items():
        if name != sharing.CARD_MD:
            assert f"`{name}`" in markdown and digest in markdown
    # training data: kind, counts, dataset and licence; no case ID anywhere in the card or the JSON files
    assert card["training_data"]["cohort"] == "synthetic"
    for stage in ("vertebrae", "metastases"):
        trained = len(list((ws.raw / ws.dataset_name(stage) / "imagesTr").glob("*_0000.nii.gz")))
        assert card["training_data"]["cases"][stage] == trained
    assert card["training_data"]["dataset"] and card["training_data"]["licence"]
    case_ids = {p.name.split("_0000")[0] for p in ws.raw.rglob("*_0000.nii.gz")}
    assert case_ids
    for name, text in texts.items():
        for case in case_ids:
            assert case.encode() not in text, (case, name)
    # protocol
    protocol = card["protocol"]
    assert protocol["profile"] == "ci"
    assert protocol["versions"] == {k: versions()[k] for k in ("spinemets", "nnunetv2", "torch", "python")}
    for stage, entry in card["stages"].items():
        assert protocol["stages"][stage] == {"configurations": [f"demo_{stage}"], "folds": ["all"],
                                             "trainer": "SpinemetsCITrainer"}
        record = json.loads((ws.results / ws.dataset_name(stage) / f"SpinemetsCITrainer__nnUNetPlans__demo_{stage}"
                             / "fold_all" / nnunet.TRAINING_RECORD).read_text())
        assert entry["models"][0]["training"]["all"]["iterations"] == record["iterations"]
        assert entry["models"][0]["training"]["all"]["epochs"] == record["epochs"]
        # held-out results with their intervals, as the evaluation wrote them; no cross-validation in ci
        summary = (ws.evaluation(stage) / "summary.csv").read_text().splitlines()
        assert len(entry["held_out"]["rows"]) == len(summary) - 1
        assert entry["cross_validation"] is None
        assert entry["domain"]["cohort"] == "synthetic"
        assert entry["domain"]["record"] in card["files"]
    assert card["inference"] == {"min_lesion_ml": 0.3, "min_vertebra_ml": 0.5, "repair_vertebra_order": True,
                                 "min_confidence": 0.0, "spine_only": True, "spine_margin_mm": 0.0}
    for words in ("Research only", "Not a medical device", "## Training data", "## Protocol", "Held-out cases",
                  "95 %", "## Intended domain", "nnU-Net 2.", "SpinemetsCITrainer", "`nnUNetPlans`"):
        assert words in markdown, words


@pytest.mark.slow
def test_real_data_needs_dataset_and_licence_for_the_card(ci_run, tmp_path, monkeypatch):
    from spinemets import domain

    real = domain.training_domain

    def as_real(*args, **kwargs):
        record = real(*args, **kwargs)
        return {**record, "cohort": "real"}

    monkeypatch.setattr(domain, "training_domain", as_real)
    with pytest.raises(SpinemetsError, match="--dataset, --licence"):
        sharing.export_model(tmp_path / "m.zip", profile="ci", workspace=Workspace(ci_run / "workspace" / "ci"),
                                stages=["metastases"])
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_results_page_shows_the_runs_model_card(ci_run, ci_archive):
    """The book of the ci run carries the card export-model writes: every file's SHA-256, as tables."""
    page = (ci_run / "_build" / "html" / "book" / "results.html").read_text()
    start = page.index('class="spinemets-model-card"')
    shown = page[start:page.index("</div>", start)]
    assert "Model card: spinemets-ci-vertebrae-metastases" in shown and "Research only" in shown
    assert shown.count("<table>") >= 3  # protocol, held-out results of each stage, files
    with zipfile.ZipFile(ci_archive) as zf:
        card = json.loads(zf.read(sharing.CARD_JSON))
    for name, meta in card["files"].items():
        if name != sharing.CARD_MD:
            assert meta["sha256"] in shown, name
