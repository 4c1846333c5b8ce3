"""The paper's protocol executed for real, at a tiny scale on the CPU: the ``smoke`` profile.

No fakes on nnU-Net's side: ``spinemets run --profile smoke`` plans both stages with nnU-Net's own
planner (all four configurations), trains two folds of each with nnU-Net's default training
(``SpinemetsSmokeTrainer``: a few iterations), saves the validation probabilities, runs
``nnUNetv2_find_best_configuration``, predicts the held-out cases with what it selected and its
``postprocessing.pkl``, evaluates, and builds the book (the session fixture ``smoke_run``, about 15
minutes on 2 cores). The tests below then check that run, steer the selection to each of its
outcomes (one configuration, an ensemble of two, the cascade) by editing only the selection's
result file, and compare each of our predictions with what nnU-Net's own programs
(``nnUNetv2_predict``, ``nnUNetv2_ensemble``, ``nnUNetv2_apply_postprocessing``) make of the same
models. A fold killed mid-training resumes from its checkpoint; the same run on the one-node SLURM
produces the same tables.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

from conftest import REPO, copy_project
from spinemets import cluster, inference, nnunet
from spinemets.labels import STAGE_NAMES

pytestmark = pytest.mark.slow

STAGE = "metastases"  # the stage whose selection outcomes are exercised (two classes: quick to compare)
TRAINER = "SpinemetsSmokeTrainer"
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def run_in(root: Path, args: list[str]) -> int:
    from spinemets import cli

    with pytest.MonkeyPatch.context() as mp:  # nnU-Net's folders come from the workspace
        for var in NNUNET_VARS:
            mp.delenv(var, raising=False)
        mp.chdir(root)
        return cli.main(args)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """``spinemets run --profile smoke`` in a copy of the project; returns the project folder.

    ``SPINEMETS_SMOKE_PROJECT=FOLDER`` reuses the project folder of a finished run instead (when
    working on these tests; the tests that edit a run work on copies of it).
    """
    reuse = os.environ.get("SPINEMETS_SMOKE_PROJECT")
    if reuse:
        return Path(reuse)
    root = copy_project(tmp_path_factory.mktemp("smoke") / "project")
    start = time.perf_counter()
    code = run_in(root, ["run", "--profile", "smoke"])
    print(f"spinemets run --profile smoke: {time.perf_counter() - start:.0f} s")
    assert code == 0, (root / "build" / "executed" / "provenance.json").read_text()
    return root


def workspace_of(root: Path) -> nnunet.Workspace:
    return nnunet.Workspace(root / "workspace" / "smoke")


def nnunet_program(name: str, args: list[str], ws: nnunet.Workspace) -> None:
    """One of nnU-Net's own programs on the workspace, as a user would run it."""
    nnunet.run_nnunet(name, args, ws, env={"nnUNet_def_n_proc": "2"})


def model_id(configuration: str) -> str:
    """nnU-Net's name of a trained model in the selection's files."""
    return f"{TRAINER}__{nnunet.PLANS}__{configuration}"


def labels_of(folder: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))


# ---------------------------------------------------------------------------------------------
# The profile is the paper's but for scale and device (no training needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_smoke_profile_is_the_paper_profile_but_for_scale_and_device(stage):
    paper, smoke = nnunet.get_profile("paper"), nnunet.get_profile("smoke")
    allowed = {"description", "device", "gpu_memory_target_gb", "target_spacing", "cv_folds", "resources", "stages"}
    assert {k for k in paper if paper[k] != smoke[k]} <= allowed
    assert smoke["find_best"] and smoke["device"] == "cpu" and smoke["cv_folds"] == 2
    p, s = paper["stages"][stage], smoke["stages"][stage]
    assert s["configurations"] == p["configurations"] == list(nnunet.PAPER_CONFIGURATIONS)
    assert s["extra_configurations"] == p["extra_configurations"] == {}
    assert (s["trainer"], s["folds"]) == (TRAINER, [0, 1])
    # the run profiles: the same notebooks with the same parameters, but for data, scale and device
    runs = {name: yaml.safe_load((REPO / "profiles" / f"{name}.yaml").read_text()) for name in ("paper", "smoke")}
    assert [n["path"] for n in runs["paper"]["notebooks"]] == [n["path"] for n in runs["smoke"]["notebooks"]]
    assert set(runs["paper"]["parameters"]) == set(runs["smoke"]["parameters"])
    assert runs["smoke"]["parameters"]["configurations"] == runs["paper"]["parameters"]["configurations"]


def test_smoke_trainer_is_nnunets_default_training_shortened():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from spinemets.trainers.spinemets_trainers import SpinemetsGPUCheckTrainer, SpinemetsSmokeTrainer

    assert SpinemetsSmokeTrainer.__mro__[1] is nnUNetTrainer
    # it changes the schedule's length, the checkpoint interval and the validation's mirroring, nothing else
    own = {k for k in vars(SpinemetsSmokeTrainer) if not k.startswith("__")}
    assert own == {"ENV", "EPOCHS", "ITERATIONS", "VALIDATION_MIRRORING", "perform_actual_validation"}
    for method in ("configure_optimizers", "get_training_transforms", "train_step", "validation_step",
                   "build_network_architecture", "_build_loss"):
        assert getattr(SpinemetsSmokeTrainer, method) is getattr(nnUNetTrainer, method), method
    assert SpinemetsGPUCheckTrainer.VALIDATION_MIRRORING


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def test_smoke_run_builds_the_book_with_the_results_page(smoke_run):
    provenance = json.loads((smoke_run / "build" / "executed" / "provenance.json").read_text())
    assert provenance["status"] == "ok" and [n["status"] for n in provenance["notebooks"]] == ["ok"] * 6
    page = (smoke_run / "_build" / "html" / "book" / "results.html").read_text()
    assert "<table" in page and "smoke" in page


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_all_four_configurations_planned_and_both_folds_trained(smoke_run, stage):
    ws = workspace_of(smoke_run)
    plans = json.loads(ws.plans_file(stage).read_text())
    assert list(plans["configurations"]) == ["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"]
    assert plans["configurations"]["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
    assert plans["configurations"]["3d_fullres"]["spacing"] == list(nnunet.SMOKE_TARGET_SPACING)
    splits = json.loads((ws.preprocessed / ws.dataset_name(stage) / "splits_final.json").read_text())
    assert len(splits) == 2 and not set(splits[0]["val"]) & set(splits[1]["val"])
    for cfg in nnunet.PAPER_CONFIGURATIONS:
        folder = ws.model_folder(stage, cfg, TRAINER)
        for fold in (0, 1):
            out = folder / f"fold_{fold}"
            assert (out / nnunet.CHECKPOINT_FINAL).is_file(), out
            val = sorted(p.name for p in (out / "validation").glob("*.npz"))  # --npz: the probabilities
            assert val == sorted(f"{c}.npz" for c in splits[fold]["val"]), out
            assert (out / "validation" / "summary.json").is_file()
    # 3d_lowres exported its validation predictions for the cascade, which trained on them
    lowres = ws.model_folder(stage, "3d_lowres", TRAINER)
    exported = {p.name.split(".")[0] for p in (lowres / "predicted_next_stage" / "3d_cascade_fullres").iterdir()}
    assert exported == set(splits[0]["val"]) | set(splits[1]["val"])


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_selection_is_nnunets_own_and_inference_used_it(smoke_run, stage):
    ws = workspace_of(smoke_run)
    results = ws.results / ws.dataset_name(stage)
    info = json.loads((results / "inference_information.json").read_text())
    # every configuration and every ensemble of two was scored on the cross-validation
    scored = set(info["all_results"])
    singles = [model_id(c) for c in nnunet.PAPER_CONFIGURATIONS]
    pairs = {"___".join(["ensemble", a, b, "0_1"]) for i, a in enumerate(singles) for b in singles[i + 1:]}
    assert scored == set(singles) | pairs
    best = info["best_model_or_ensemble"]
    pp = Path(best["postprocessing_file"])
    assert pp.is_file()
    functions, kwargs = pickle.loads(pp.read_bytes())
    assert isinstance(functions, list) and isinstance(kwargs, list)
    models = nnunet.trained_models(stage, "smoke", ws)
    assert [(m["configuration"], m["folds"]) for m in models] == [
        (m["configuration"], [0, 1]) for m in best["selected_model_or_models"]]
    provenance = json.loads((ws.predictions / "provenance.json").read_text())
    assert provenance["nnunet_postprocessing"][stage] == str(pp)
    assert [Path(m["folder"]).name for m in provenance["models"][stage]] == [Path(m["folder"]).name for m in models]
    tables = list(ws.evaluation(stage).glob("*.csv"))
    assert tables and all(len(pd.read_csv(t)) for t in tables)


# ---------------------------------------------------------------------------------------------
# Each selection outcome, predicted from the real models and compared with nnU-Net's own programs
# ---------------------------------------------------------------------------------------------


OUTCOMES = {
    "single": ["3d_fullres"],
    "ensemble": ["2d", "3d_fullres"],
    "cascade": ["3d_cascade_fullres"],
}


@pytest.fixture(scope="module")
def steerable(smoke_run, tmp_path_factory) -> nnunet.Workspace:
    """A copy of the smoke run's trained workspace whose selection the tests may edit."""
    src = workspace_of(smoke_run)
    dst = nnunet.Workspace(tmp_path_factory.mktemp("steer") / "ws")
    shutil.copytree(src.raw, dst.raw)
    shutil.copytree(src.results, dst.results)
    for stage in STAGE_NAMES:  # the selection names its files by absolute path: point it at the copy
        info_file = dst.results / dst.dataset_name(stage) / "inference_information.json"
        info_file.write_text(info_file.read_text().replace(str(src.results), str(dst.results)))
    return dst


def steer(ws: nnunet.Workspace, configurations: list[str]) -> Path:
    """Make ``configurations`` (one, or two for an ensemble) the selected model of the metastasis stage.

    Only the selection's result file (``inference_information.json``) is edited. The
    postprocessing of the steered selection is nnU-Net's own: the one find_best_configuration
    determined where it selected exactly this, else ``nnUNetv2_determine_postprocessing`` on the
    steered model's cross-validation predictions. Returns the ``postprocessing.pkl``.
    """
    results = ws.results / ws.dataset_name(STAGE)
    info_file = results / "inference_information.json"
    info = json.loads(info_file.read_text())
    selected = [{"configuration": c, "trainer": TRAINER, "plans_identifier": nnunet.PLANS} for c in configurations]
    best = info["best_model_or_ensemble"]
    if [m["configuration"] for m in best["selected_model_or_models"]] != configurations:
        if len(configurations) == 1:
            folder = ws.model_folder(STAGE, configurations[0], TRAINER) / "crossval_results_folds_0_1"
        else:
            folder = results / "ensembles" / "___".join(["ensemble", *map(model_id, configurations), "0_1"])
        pp = folder / "postprocessing.pkl"
        if not pp.exists():
            plans = ws.model_folder(STAGE, configurations[0], TRAINER) / "plans.json"
            nnunet_program("nnUNetv2_determine_postprocessing",
                           ["-i", str(folder), "-ref", str(ws.raw / ws.dataset_name(STAGE) / "labelsTr"),
                            "-plans_json", str(plans), "-dataset_json", str(plans.with_name("dataset.json")),
                            "-np", "2"], ws)
        best = {**best, "selected_model_or_models": selected, "postprocessing_file": str(pp),
                "some_plans_file": str(ws.model_folder(STAGE, configurations[0], TRAINER) / "plans.json")}
        info_file.write_text(json.dumps({**info, "best_model_or_ensemble": best}, indent=2))
    return Path(best["postprocessing_file"])


@pytest.fixture(scope="module")
def one_case(steerable, tmp_path_factory) -> Path:
    """A folder with the first held-out CT of the stage alone: every selection outcome is compared
    on it (each outcome runs up to four predictions of nnU-Net's and ours; one case keeps it short)."""
    first = sorted(steerable.test_images(STAGE).glob("*_0000.nii.gz"))[0]
    folder = tmp_path_factory.mktemp("one-case")
    shutil.copy2(first, folder / first.name)
    return folder


def nnunet_predicts(ws: nnunet.Workspace, configuration: str, out: Path, *extra: str, images: Path | None = None
                    ) -> Path:
    images = images or ws.test_images(STAGE)
    nnunet_program("nnUNetv2_predict", ["-i", str(images), "-o", str(out), "-d", ws.dataset_name(STAGE),
                                        "-c", configuration, "-tr", TRAINER, "-f", "0", "1", "--disable_tta",
                                        "-device", "cpu", "-npp", "1", "-nps", "1", *extra], ws)
    return out


def nnunet_reference(ws: nnunet.Workspace, outcome: str, tmp: Path, pp: Path, images: Path
                     ) -> tuple[Path, dict[str, Path]]:
    """What nnU-Net's own programs predict for an outcome on the CTs in ``images``: (postprocessed
    folder, raw folders by name)."""
    raw = {}
    if outcome == "single":
        raw["3d_fullres"] = nnunet_predicts(ws, "3d_fullres", tmp / "3d_fullres", images=images)
        final = raw["3d_fullres"]
    elif outcome == "ensemble":
        for cfg in OUTCOMES["ensemble"]:
            raw[cfg] = nnunet_predicts(ws, cfg, tmp / cfg, "--save_probabilities", images=images)
        final = nnunet.ensemble([raw[c] for c in OUTCOMES["ensemble"]], tmp / "ensemble", ws)
    else:
        raw["3d_lowres"] = nnunet_predicts(ws, "3d_lowres", tmp / "3d_lowres", images=images)
        raw["3d_fullres"] = nnunet_predicts(ws, "3d_fullres", tmp / "3d_fullres", images=images)
        final = nnunet_predicts(ws, "3d_cascade_fullres", tmp / "cascade", "-prev_stage_predictions",
                                str(raw["3d_lowres"]), images=images)
    plans = ws.model_folder(STAGE, OUTCOMES[outcome][0], TRAINER) / "plans.json"
    nnunet_program("nnUNetv2_apply_postprocessing", ["-i", str(final), "-o", str(tmp / "postprocessed"),
                                                     "-pp_pkl_file", str(pp), "-np", "1", "-plans_json", str(plans),
                                                     "-dataset_json", str(plans.with_name("dataset.json"))], ws)
    return tmp / "postprocessed", {**raw, "final": final}


@pytest.mark.parametrize("outcome", list(OUTCOMES))
def test_each_selection_outcome_predicts_what_nnunet_predicts(steerable, one_case, outcome, tmp_path):
    ws = steerable
    pp = steer(ws, OUTCOMES[outcome])
    models = nnunet.trained_models(STAGE, "smoke", ws)
    assert [m["configuration"] for m in models] == OUTCOMES[outcome]
    assert nnunet.selected_postprocessing(STAGE, "smoke", ws) == pp

    ours = tmp_path / "ours"
    inference.predict(one_case, ours, profile="smoke", workspace=ws, options=inference.PredictOptions(roi="none"))
    reference, raw = nnunet_reference(ws, outcome, tmp_path / "nnunet", pp, one_case)
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in one_case.glob("*_0000.nii.gz"))
    assert cases
    for case in cases:
        mine = sitk.GetArrayFromImage(sitk.ReadImage(str(ours / case / "metastases.nii.gz")))
        theirs = labels_of(reference, case)
        agreement = float((mine == theirs).mean())
        assert agreement >= 0.999, f"{outcome} {case}: {agreement:.5f} of the voxels agree with nnU-Net's own"
        # the outcome is not one of its members in disguise
        if outcome == "ensemble":
            ensemble = labels_of(raw["final"], case)
            for cfg in OUTCOMES["ensemble"]:
                assert (ensemble != labels_of(raw[cfg], case)).any(), f"the ensemble equals {cfg} on {case}"
        if outcome == "cascade":
            cascade = labels_of(raw["final"], case)
            assert (cascade != labels_of(raw["3d_fullres"], case)).any() and (
                cascade != labels_of(raw["3d_lowres"], case)).any(), case
    provenance = json.loads((ours / "provenance.json").read_text())
    assert provenance["nnunet_postprocessing"][STAGE] == str(pp)


def test_postprocessing_from_a_real_pkl_removes_a_component(steerable, tmp_path):
    """nnU-Net's ``determine_postprocessing`` on cross-validation predictions where a spurious
    component costs Dice chooses to remove it; applied by inference, the pkl changes the prediction
    exactly as ``nnUNetv2_apply_postprocessing`` does."""
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    ws = steerable
    pp_folder, ref_folder = tmp_path / "cv", tmp_path / "ref"
    pp_folder.mkdir()
    ref_folder.mkdir()
    # cross-validation "predictions": the reference (one lesion of each class) plus a far-away speck of each class
    for ref in sorted((ws.raw / ws.dataset_name(STAGE) / "labelsTr").glob("*.nii.gz"))[:3]:
        image = sitk.ReadImage(str(ref))
        truth = np.zeros(sitk.GetArrayFromImage(image).shape, np.uint8)
        truth[10:16, 10:16, 10:16] = 1
        truth[10:16, 30:36, 30:36] = 2
        wrong = truth.copy()
        wrong[-3:, -3:, :2] = 1
        wrong[-3:, :2, -3:] = 2
        for array, folder in ((truth, ref_folder), (wrong, pp_folder)):
            out = sitk.GetImageFromArray(array)
            out.CopyInformation(image)
            sitk.WriteImage(out, str(folder / ref.name))
    plans = ws.model_folder(STAGE, "3d_fullres", TRAINER) / "plans.json"
    with ws.activated():
        determine_postprocessing(str(pp_folder), str(ref_folder), str(plans), str(plans.with_name("dataset.json")),
                                 num_processes=1)
    pkl = pp_folder / "postprocessing.pkl"
    functions, _ = pickle.loads(pkl.read_bytes())
    assert functions, "nnU-Net chose no postprocessing where a spurious component cost Dice"
    steer(ws, ["3d_fullres"])
    info_file = ws.results / ws.dataset_name(STAGE) / "inference_information.json"
    info = json.loads(info_file.read_text())
    info["best_model_or_ensemble"]["postprocessing_file"] = str(pkl)
    info_file.write_text(json.dumps(info))
    ours = tmp_path / "ours"
    inference.predict(ws.test_images(STAGE), ours, profile="smoke", workspace=ws,
                      options=inference.PredictOptions(roi="none"))
    raw = nnunet_predicts(ws, "3d_fullres", tmp_path / "raw")
    nnunet_program("nnUNetv2_apply_postprocessing", ["-i", str(raw), "-o", str(tmp_path / "pp"), "-pp_pkl_file",
                                                     str(pkl), "-np", "1", "-plans_json", str(plans),
                                                     "-dataset_json", str(plans.with_name("dataset.json"))], ws)
    changed = 0
    for case_dir in sorted(p for p in ours.iterdir() if p.is_dir()):
        mine = sitk.GetArrayFromImage(sitk.ReadImage(str(case_dir / "metastases.nii.gz")))
        assert float((mine == labels_of(tmp_path / "pp", case_dir.name)).mean()) >= 0.999
        changed += int((mine != labels_of(raw, case_dir.name)).any())
    # the raw predictions of a model trained for a few iterations are scattered: there is a component to remove
    assert changed, "the postprocessing changed no held-out prediction"


# ---------------------------------------------------------------------------------------------
# A fold killed mid-training resumes from its checkpoint
# ---------------------------------------------------------------------------------------------


def test_fold_killed_mid_training_resumes_from_its_checkpoint(smoke_run, tmp_path):
    src = workspace_of(smoke_run)
    ws = nnunet.Workspace(tmp_path / "ws")
    name = ws.dataset_name(STAGE)
    shutil.copytree(src.raw / name, ws.raw / name)
    shutil.copytree(src.preprocessed / name, ws.preprocessed / name)
    fold = ws.model_folder(STAGE, "2d", TRAINER) / "fold_0"
    cmd = [sys.executable, "-m", "spinemets.cli", "train", "--stage", STAGE, "--profile", "smoke",
           "--workspace", str(ws.root), "--configurations", "2d", "--folds", "0"]
    env = {k: v for k, v in os.environ.items() if k not in NNUNET_VARS}
    env.update(SPINEMETS_SMOKE_EPOCHS="6", SPINEMETS_SMOKE_ITERATIONS="3")
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    # "Epoch 2" is logged once epoch 1 has ended and its checkpoint is written completely
    while not any("Epoch 2" in p.read_text() for p in fold.glob("training_log_*.txt")):
        assert first.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    trainer = subprocess.run(["pgrep", "-f", f"nnUNetv2_train {name[7:10]} 2d 0"], capture_output=True, text=True)
    pid = int(trainer.stdout.split()[0])
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # the trainer and its data-loading workers, mid-epoch
    assert first.wait(timeout=60) != 0
    assert (fold / nnunet.CHECKPOINT_LATEST).exists() and not (fold / nnunet.CHECKPOINT_FINAL).exists()

    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (fold / nnunet.CHECKPOINT_FINAL).exists()
    logs = sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    assert len(logs) == 2
    resumed_at = int(re.search(r"Epoch (\d+)", logs[-1].read_text()).group(1))
    assert resumed_at >= 2  # continued from the checkpoint, not from epoch 0
    assert "Epoch 0\n" not in logs[-1].read_text()
    import torch

    final = torch.load(fold / nnunet.CHECKPOINT_FINAL, map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 6


# ---------------------------------------------------------------------------------------------
# The same run on the one-node SLURM
# ---------------------------------------------------------------------------------------------


def table_shape(root: Path) -> dict[str, tuple]:
    """Every table of a run (evaluation and predictions) by its path: its columns and the rows that do not
    depend on what the models predict (the cases of the evaluation; the lesion and vertebra tables
    have a row per predicted lesion or vertebra). Models trained for a few iterations, with random augmentation, predict
    differently in each run, so the lesion rows and the numbers are not compared."""
    ws = workspace_of(root)
    out = {}
    for path in sorted([*(ws.root / "evaluation").rglob("*.csv"), *ws.predictions.rglob("*.csv")]):
        table = pd.read_csv(path)
        rows = tuple(sorted(set(table["case"]))) if "case" in table else ()  # the evaluated cases
        out[str(path.relative_to(ws.root))] = (tuple(table.columns), rows)
    return out


#: The configurations of the SLURM run: the cascade and the low-resolution model it waits for (the
#: one dependency between training jobs) and the selection between them. The local run above has
#: trained all four; the jobs of the other two differ from these only in their arguments.
SLURM_CONFIGURATIONS = ["3d_lowres", "3d_cascade_fullres"]


def test_smoke_run_on_slurm_produces_the_same_tables(slurm, smoke_run, tmp_path):
    root = copy_project(tmp_path / "project")
    run = tmp_path / "run"
    code = run_in(root, ["run", "--profile", "smoke", "--executor", "slurm", "--run-folder", str(run), "--wait",
                         "--poll", "5", "-p", "configurations", json.dumps(SLURM_CONFIGURATIONS)])
    table = cluster.status(run)
    assert code == 0, table.to_string()
    trains = [s for s in table["step"] if "/fold_" in s]
    assert sorted(trains) == sorted(f"{stage}/{cfg}/fold_{fold}" for stage in STAGE_NAMES
                                    for cfg in SLURM_CONFIGURATIONS for fold in (0, 1))
    assert (table["status"] == "done").all()
    assert len(set(table["job"])) == len(table)
    local, on_slurm = table_shape(smoke_run), table_shape(root)
    assert local and on_slurm == local
    assert list(table["step"])[:2] == ["run/prepare", "vertebrae/plan"] and list(table["step"])[-1] == "run/report"
    provenance = json.loads((root / "build" / "executed" / "provenance.json").read_text())
    steps = yaml.safe_load((root / "profiles" / "smoke.yaml").read_text())["notebooks"]
    assert provenance["status"] == "ok" and [n["status"] for n in provenance["notebooks"]] == ["ok"] * len(steps)
    assert "<table" in (root / "_build" / "html" / "book" / "results.html").read_text()
    # the notebooks of the preparing job ran into their own folder
    assert sorted(p.name for p in (root / "build" / "executed-prepare").glob("*.ipynb")) == [
        "01_dataset.ipynb", "02_slicer.ipynb"]
    for stage in STAGE_NAMES:  # the report found every fold trained by the jobs: each trained once
        log_text = (workspace_of(root).results / workspace_of(root).dataset_name(stage) / "spinemets_train.log").read_text()
        assert log_text.count("Training done.") == 2 * len(SLURM_CONFIGURATIONS)
        selection = json.loads((workspace_of(root).results / workspace_of(root).dataset_name(stage)
                                / "inference_information.json").read_text())
        chosen = selection["best_model_or_ensemble"]["selected_model_or_models"]
        assert {m["configuration"] for m in chosen} <= set(SLURM_CONFIGURATIONS)
