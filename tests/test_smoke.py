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
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

import slurm_cluster
from conftest import REPO, copy_project
from spinemets.run import cluster
from spinemets.inference import predict as inference
from spinemets.training import nnunet
from spinemets.labels import STAGE_NAMES
from spinemets.paths import PLANS, Workspace
from spinemets.training.profiles import PAPER_CONFIGURATIONS, SMOKE_TARGET_SPACING, get_profile
from spinemets.training.programs import run_nnunet

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


def _slurm_wanted() -> bool:
    return slurm_cluster.unavailable_reason() is None or os.environ.get("SPINEMETS_REQUIRE_SLURM") == "1"


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, request) -> Path:
    """``spinemets run --profile smoke`` in a copy of the project, once per session; returns the
    project folder. Where SLURM can run (CI requires it) the run is submitted as jobs to the
    one-node cluster (``--executor slurm --wait``; its run folder is ``SMOKE_JOBS`` beside the
    project), else it runs with the local executor.

    ``SPINEMETS_SMOKE_PROJECT=FOLDER`` reuses the project folder of a finished run instead (when
    working on these tests; the tests that edit a run work on copies of it).
    """
    reuse = os.environ.get("SPINEMETS_SMOKE_PROJECT")
    if reuse:
        return Path(reuse)
    root = copy_project(tmp_path_factory.mktemp("smoke") / "project")
    args = ["run", "--profile", "smoke"]
    if _slurm_wanted():
        request.getfixturevalue("slurm")  # started once per session (tests/conftest.py), or a failure
        args += ["--executor", "slurm", "--run-folder", str(root.parent / SMOKE_JOBS), "--wait", "--poll", "5"]
    start = time.perf_counter()
    code = run_in(root, args)
    print(f"spinemets {' '.join(args)}: {time.perf_counter() - start:.0f} s")
    if (root.parent / SMOKE_JOBS).is_dir():
        assert code == 0, cluster.status(root.parent / SMOKE_JOBS).to_string()
    assert code == 0, (root / "build" / "executed" / "provenance.json").read_text()
    return root


#: The run folder of the smoke run's jobs, beside its project folder (when it ran on SLURM).
SMOKE_JOBS = "jobs"


def workspace_of(root: Path) -> Workspace:
    return Workspace(root / "workspace" / "smoke")


def nnunet_program(name: str, args: list[str], ws: Workspace) -> None:
    """One of nnU-Net's own programs on the workspace, as a user would run it."""
    run_nnunet(name, args, ws, env={"nnUNet_def_n_proc": "2"})


def model_id(configuration: str) -> str:
    """nnU-Net's name of a trained model in the selection's files."""
    return f"{TRAINER}__{PLANS}__{configuration}"


def labels_of(folder: Path, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(folder / f"{case}.nii.gz")))


# ---------------------------------------------------------------------------------------------
# The profile is the paper's but for scale and device (no training needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGE_NAMES)
def test_smoke_profile_is_the_paper_profile_but_for_scale_and_device(stage):
    paper, smoke = get_profile("paper"), get_profile("smoke")
    allowed = {"description", "device", "gpu_memory_target_gb", "target_spacing", "cv_folds", "resources", "stages"}
    assert {k for k in paper if paper[k] != smoke[k]} <= allowed
    assert smoke["find_best"] and smoke["device"] == "cpu" and smoke["cv_folds"] == 2
    p, s = paper["stages"][stage], smoke["stages"][stage]
    assert s["configurations"] == p["configurations"] == list(PAPER_CONFIGURATIONS)
    assert s["extra_configurations"] == p["extra_configurations"] == {}
    assert (s["trainer"], s["folds"]) == (TRAINER, [0, 1])
    # the run profiles: the same notebooks with the same parameters, but for data, scale and device
    runs = {name: yaml.safe_load((REPO / "profiles" / f"{name}.yaml").read_text()) for name in ("paper", "smoke")}
    assert [n["path"] for n in runs["paper"]["notebooks"]] == [n["path"] for n in runs["smoke"]["notebooks"]]
    assert set(runs["paper"]["parameters"]) == set(runs["smoke"]["parameters"])
    assert runs["smoke"]["parameters"]["configurations"] == runs["paper"]["parameters"]["configurations"]


def test_smoke_trainer_is_nnunets_default_training_shortened():
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from spinemets.training.trainers.spinemets_trainers import SpinemetsGPUCheckTrainer, SpinemetsSmokeTrainer

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
    assert plans["configurations"]["3d_fullres"]["spacing"] == list(SMOKE_TARGET_SPACING)
    splits = json.loads((ws.preprocessed / ws.dataset_name(stage) / "splits_final.json").read_text())
    assert len(splits) == 2 and not set(splits[0]["val"]) & set(splits[1]["val"])
    for cfg in PAPER_CONFIGURATIONS:
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
    singles = [model_id(c) for c in PAPER_CONFIGURATIONS]
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
def steerable(smoke_run, tmp_path_factory) -> Workspace:
    """A copy of the smoke run's trained workspace whose selection the tests may edit."""
    src = workspace_of(smoke_run)
    dst = Workspace(tmp_path_factory.mktemp("steer") / "ws")
    shutil.copytree(src.raw, dst.raw)
    shutil.copytree(src.results, dst.results)
    for stage in STAGE_NAMES:  # the selection names its files by absolute path: point it at the copy
        info_file = dst.results / dst.dataset_name(stage) / "inference_information.json"
        info_file.write_text(info_file.read_text().replace(str(src.results), str(dst.results)))
    return dst


def steer(ws: Workspace, configurations: list[str]) -> Path:
    """Make ``configurations`` (one, or two for an ensemble) the selected model of the metastasis stage.

    Only the selection's result file (``inference_information.json``) is edited. The
    postprocessing of the steered selection is nnU-Net's own: the one find_best_configuration
    determined where it selected exactly this, else ``nnUNetv2_determine_postprocessing`` on the
    steered model's cross-validation predictions. Returns the ``postprocessing.pkl``.
    """
    results = ws.results / ws.dataset_name(STAGE)
    info_file = results / "inference_information.json"
    info = json.loads(info_file.read_text())
    selected = [{"configuration": c, "trainer": TRAINER, "plans_identifier": PLANS} for c in configurations]
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


def nnunet_predicts(ws: Workspace, configuration: str, out: Path, *extra: str, images: Path | None = None
                    ) -> Path:
    images = images or ws.test_images(STAGE)
    nnunet_program("nnUNetv2_predict", ["-i", str(images), "-o", str(out), "-d", ws.dataset_name(STAGE),
                                        "-c", configuration, "-tr", TRAINER, "-f", "0", "1", "--disable_tta",
                                        "-device", "cpu", "-npp", "1", "-nps", "1", *extra], ws)
    return out


def nnunet_reference(ws: Workspace, outcome: str, tmp: Path, pp: Path, images: Path
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
# The run went through SLURM: one job per step, the right order, each fold trained once
# ---------------------------------------------------------------------------------------------


def table_shape(ws_root: Path) -> dict[str, tuple]:
    """Every table of a run (evaluation and predictions) by its path in the workspace: its columns.
    Models trained for a few iterations predict differently in each run, so the rows and numbers
    are not compared."""
    out = {}
    for path in sorted([*(ws_root / "evaluation").rglob("*.csv"), *(ws_root / "predictions").rglob("*.csv")]):
        out[str(path.relative_to(ws_root))] = tuple(pd.read_csv(path).columns)
    return out


def test_smoke_run_went_through_slurm_jobs_and_wrote_the_tables_of_a_local_run(smoke_run, ci_run):
    run = smoke_run.parent / SMOKE_JOBS
    if not run.is_dir():
        pytest.skip("the smoke run ran with the local executor (SLURM cannot run here)")
    table = cluster.status(run)
    trains = [s for s in table["step"] if "/fold_" in s]
    assert sorted(trains) == sorted(f"{stage}/{cfg}/fold_{fold}" for stage in STAGE_NAMES
                                    for cfg in PAPER_CONFIGURATIONS for fold in (0, 1))
    assert (table["status"] == "done").all()
    assert len(set(table["job"])) == len(table)
    assert list(table["step"])[:2] == ["run/prepare", "vertebrae/plan"] and list(table["step"])[-1] == "run/report"
    # the cascade's jobs waited for the low-resolution model they train on (the one dependency
    # between training jobs)
    record = cluster.load_record(run)
    after = {e["name"]: set(e["after"]) for e in record["steps"]}
    for stage in STAGE_NAMES:
        for fold in (0, 1):
            assert f"{stage}/3d_lowres/fold_{fold}" in after[f"{stage}/3d_cascade_fullres/fold_{fold}"], after
    provenance = json.loads((smoke_run / "build" / "executed" / "provenance.json").read_text())
    steps = yaml.safe_load((smoke_run / "profiles" / "smoke.yaml").read_text())["notebooks"]
    assert provenance["status"] == "ok" and [n["status"] for n in provenance["notebooks"]] == ["ok"] * len(steps)
    assert "<table" in (smoke_run / "_build" / "html" / "book" / "results.html").read_text()
    # the notebooks of the preparing job ran into their own folder
    assert sorted(p.name for p in (smoke_run / "build" / "executed-prepare").glob("*.ipynb")) == [
        "01_dataset.ipynb", "02_slicer.ipynb"]
    ws = workspace_of(smoke_run)
    for stage in STAGE_NAMES:  # the report found every fold trained by the jobs: each trained once
        log_text = (ws.results / ws.dataset_name(stage) / "spinemets_train.log").read_text()
        assert log_text.count("Training done.") == 2 * len(PAPER_CONFIGURATIONS)
        # each stage evaluated on exactly its held-out cases
        held_out = sorted(p.name[: -len(".nii.gz")] for p in ws.test_labels(stage).glob("*.nii.gz"))
        per_case = pd.read_csv(ws.evaluation(stage) / "per_case.csv")
        assert sorted(set(per_case["case"])) == held_out, stage
    # the same tables, with the same columns, as the local executor's run of the same notebooks (the ci run)
    on_slurm, local = table_shape(ws.root), table_shape(ci_run / "workspace" / "ci")
    assert on_slurm and {path: local.get(path) for path in on_slurm} == on_slurm


# ---------------------------------------------------------------------------------------------
# The run's model travels (spinemets.training.sharing)
# ---------------------------------------------------------------------------------------------


def test_smoke_model_travels_with_its_selection_and_postprocessing(smoke_run, tmp_path):
    """The smoke run's archive is nnU-Net's own export of what the selection chose (its folds have their
    final validation), with the selection's ``postprocessing.pkl`` and cross-validation result; installed in
    a fresh folder, it predicts the held-out cases as the run's ``predict --profile smoke`` did."""
    from spinemets.training import sharing

    ws = workspace_of(smoke_run)
    archive = sharing.export_model(tmp_path / "smoke.zip", profile="smoke", workspace=ws)
    card = sharing.check_archive(archive)
    assert not [name for name in card["files"] if name.endswith("debug.json")]  # left out of nnU-Net's export
    for stage in STAGE_NAMES:
        entry = card["stages"][stage]
        assert all("nnU-Net's export_pretrained_model" in part for part in entry["export"].split("; ")), entry["export"]
        selected = [m["configuration"] for m in nnunet.trained_models(stage, "smoke", ws)]
        assert [m["configuration"] for m in entry["models"] if "cascade_of" not in m] == selected
        post = nnunet.selected_postprocessing(stage, "smoke", ws)
        assert entry["postprocessing"] and card["files"][entry["postprocessing"]]["sha256"] == sharing.sha256_file(post)
        assert entry["cross_validation"]["foreground_mean_dice"] is not None
    installed = sharing.install_model(archive, tmp_path / "models")
    ran = json.loads((ws.predictions / "provenance.json").read_text())
    out = tmp_path / "pred"
    case = ws.held_out_cases("vertebrae")[0]  # one case: the ensemble and cascade of two folds take minutes per case
    assert run_in(tmp_path, ["predict", "--input", str(ws.test_images("vertebrae") / f"{case}_0000.nii.gz"),
                             "--out", str(out), "--model", str(installed), "--device", "cpu"]) == 0
    mine = json.loads((out / "provenance.json").read_text())
    for key in ("roi", "margin_mm", "near_mm", "tta", "min_lesion_ml", "min_vertebra_ml", "repair_order", "min_confidence"):
        assert mine["parameters"][key] == ran["parameters"][key], key
    for case in [case]:
        for name in ("vertebrae.nii.gz", "metastases.nii.gz", "metastases_confidence.nii.gz"):
            a = sitk.GetArrayFromImage(sitk.ReadImage(str(ws.predictions / case / name)))
            b = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case / name)))
            assert np.array_equal(a, b), (case, name)
