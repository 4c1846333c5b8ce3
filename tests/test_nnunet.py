"""nnU-Net workspace, plans configurations, trainer discovery, training with resume, end to end on CPU.

The slow tests read the session's trained ci workspace (``ci_run`` in tests/conftest.py: both
stages planned and trained for a few iterations by the notebooks): its training records, a
two-stage prediction with the domain check; on copies of its datasets, a training for a budget
and an interrupted training that resumes from its checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import slicerio
import torch

from spinemets import domain

from spinemets.report import figures

from spinemets.inference import predict as inference
from spinemets import labels

from spinemets.training import nnunet, programs
from spinemets.errors import SpinemetsError
from spinemets.training import profiles as profiles_mod

from conftest import copy_workspace
from spinemets.paths import TRAINER_DIR, Workspace
from spinemets.training.profiles import DEMO_BUDGET_S, DEMO_CONFIGURATIONS, PROFILES, get_profile, stage_plan
from spinemets.training.programs import TOOL_OUTPUT_ENV, captured_output, cpu_environment, log_block, run_nnunet, tool_output

REAL_CT = Path(__file__).resolve().parents[1] / "book" / "data" / "real_ct" / "example_ct_sm.nii.gz"
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")


@pytest.fixture
def clean_env(monkeypatch):
    for var in (*NNUNET_VARS, "OMP_WAIT_POLICY", "nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.delenv(var, raising=False)
    return monkeypatch


def test_workspace_folders_and_environment(tmp_path, clean_env):
    ws = Workspace(tmp_path / "ws")
    before = dict(os.environ)
    env = ws.environment(extra_trainer_dirs=[tmp_path / "mine"])
    assert dict(os.environ) == before  # nothing written behind the user's back
    assert env["nnUNet_raw"] == str(tmp_path / "ws" / "raw")
    assert env["nnUNet_preprocessed"] == str(tmp_path / "ws" / "preprocessed")
    assert env["nnUNet_results"] == str(tmp_path / "ws" / "results")
    assert env["nnUNet_extTrainer"].split(os.pathsep) == [str(TRAINER_DIR), str(tmp_path / "mine")]
    assert (TRAINER_DIR / "spinemets_trainers.py").exists()


def test_user_settings_win(tmp_path, clean_env):
    clean_env.setenv("nnUNet_results", str(tmp_path / "elsewhere"))
    clean_env.setenv("nnUNet_extTrainer", str(tmp_path / "theirs"))
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    clean_env.setenv("nnUNet_def_n_proc", "5")
    ws = Workspace(tmp_path / "ws")
    assert ws.results == tmp_path / "elsewhere" and ws.raw == tmp_path / "ws" / "raw"
    assert ws.environment()["nnUNet_extTrainer"].split(os.pathsep) == [str(TRAINER_DIR), str(tmp_path / "theirs")]
    assert cpu_environment() == {"OMP_WAIT_POLICY": "ACTIVE", "nnUNet_n_proc_DA": "1", "nnUNet_def_n_proc": "5"}
    clean_env.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's setting beats the profile's
    assert cpu_environment("ACTIVE")["OMP_WAIT_POLICY"] == "PASSIVE"
    clean_env.delenv("OMP_WAIT_POLICY")
    assert cpu_environment()["OMP_WAIT_POLICY"] == "PASSIVE"
    assert cpu_environment(get_profile("demo")["omp_wait_policy"])["OMP_WAIT_POLICY"] == "ACTIVE"
    assert get_profile("ci")["omp_wait_policy"] == "PASSIVE"  # tests and SLURM jobs train side by side


def test_activated_sets_and_restores(tmp_path, clean_env):
    clean_env.setenv("nnUNet_raw", "/user/raw")
    ws = Workspace(tmp_path)
    with ws.activated():
        assert os.environ["nnUNet_raw"] == "/user/raw"
        assert os.environ["nnUNet_results"] == str(tmp_path / "results")
    assert os.environ["nnUNet_raw"] == "/user/raw" and "nnUNet_results" not in os.environ
    with pytest.raises(RuntimeError), ws.activated():
        raise RuntimeError("boom")
    assert "nnUNet_preprocessed" not in os.environ


def test_trainers_are_found_through_nnunet_ext_trainer(tmp_path, clean_env):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with pytest.raises(RuntimeError, match="Could not find"):
        recursive_find_trainer_class_by_name("SpinemetsCITrainer")
    with Workspace(tmp_path).activated():
        for profile in ("demo", "ci"):
            for stage in ("vertebrae", "metastases"):
                trainer = recursive_find_trainer_class_by_name(stage_plan(stage, profile)["trainer"])
                assert issubclass(trainer, nnUNetTrainer)
        ci = recursive_find_trainer_class_by_name("SpinemetsCITrainer")
    assert (ci.EPOCHS, ci.ITERATIONS, ci.SAVE_EVERY) == (3, 2, 1)


def test_profiles_are_plain_data():
    paper = get_profile("paper")
    for stage in ("vertebrae", "metastases"):
        entry = stage_plan(stage, "paper")
        assert entry["configurations"] == ["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"]
        assert entry["folds"] == [0, 1, 2, 3, 4] and entry["trainer"] == "nnUNetTrainer_250epochs"
    assert paper["device"] == "cuda" and paper["find_best"] is True
    assert get_profile("demo")["device"] == "cpu"
    json.dumps(PROFILES)  # plain data
    with pytest.raises(SpinemetsError, match="unknown training profile"):
        get_profile("fast")


def _plans(tmp_path):
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 5, "features_per_stage": [32, 64, 128, 256, 320],
                            "conv_op": "torch.nn.modules.conv.Conv3d", "kernel_sizes": [[3, 3, 3]] * 5,
                            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 1]],
                            "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4, "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    plans = {"dataset_name": "Dataset999_X", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "configurations": {"3d_fullres": {
                 "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                 "batch_size": 2, "patch_size": [144, 48, 48], "spacing": [3.0, 2.5, 2.5],
                 "normalization_schemes": ["CTNormalization"], "use_mask_for_norm": [False],
                 "architecture": arch, "batch_dice": False}}}
    path = tmp_path / "nnUNetPlans.json"
    path.write_text(json.dumps(plans))
    return path


def test_add_configuration_inherits_and_nnunet_resolves_it(tmp_path):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    path = _plans(tmp_path)
    spec = DEMO_CONFIGURATIONS["demo_vertebrae"]
    nnunet.add_configuration(path, "demo_vertebrae", spec)
    nnunet.add_configuration(path, "demo_metastases", DEMO_CONFIGURATIONS["demo_metastases"])
    plans = json.loads(path.read_text())
    cfg = PlansManager(plans).get_configuration("demo_vertebrae")
    assert list(cfg.patch_size) == spec["patch_size"] and list(cfg.spacing) == spec["spacing"]
    assert cfg.data_identifier == "nnUNetPlans_demo_vertebrae_4.5x3.75x3.75"
    assert cfg.normalization_schemes == ["CTNormalization"]  # inherited
    assert cfg.network_arch_init_kwargs["features_per_stage"] == spec["features_per_stage"]
    same_spacing = PlansManager(plans).get_configuration("demo_metastases")
    assert same_spacing.data_identifier == "nnUNetPlans_3d_fullres"  # reuses 3d_fullres data
    assert list(same_spacing.spacing) == [3.0, 2.5, 2.5]
    # the network it describes builds and maps a patch to a patch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    net = get_network_from_plans(cfg.network_arch_class_name, cfg.network_arch_init_kwargs,
                                 cfg.network_arch_init_kwargs_req_import, 1, 26, deep_supervision=False)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *spec["patch_size"]))
    assert tuple(out.shape) == (1, 26, *spec["patch_size"])


def test_add_configuration_refuses_inconsistent_specs(tmp_path):
    path = _plans(tmp_path)
    with pytest.raises(SpinemetsError, match="not divisible"):
        nnunet.add_configuration(path, "bad", {"patch_size": [30, 32, 32], "features_per_stage": [8, 16, 32, 64],
                                               "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]})
    with pytest.raises(SpinemetsError, match="feature sizes"):
        nnunet.add_configuration(path, "bad", {"patch_size": [32, 32, 32], "features_per_stage": [8, 16],
                                               "strides": [[1, 1, 1]]})
    with pytest.raises(SpinemetsError, match="plans file not found"):
        nnunet.add_configuration(tmp_path / "missing.json", "x", DEMO_CONFIGURATIONS["demo_metastases"])


def test_train_refuses_bad_requests(tmp_path):
    with pytest.raises(SpinemetsError, match="unknown training profile"):
        nnunet.train("vertebrae", profile="nope", workspace=tmp_path)
    with pytest.raises(SpinemetsError, match="device"):
        nnunet.train("vertebrae", profile="ci", device="tpu", workspace=tmp_path)
    with pytest.raises(SpinemetsError, match="num_gpus"):
        nnunet.train("vertebrae", profile="ci", device="cpu", workspace=tmp_path,
                     options=nnunet.TrainingOptions(num_gpus=2))
    with pytest.raises(SpinemetsError, match="fold"):
        nnunet.train("vertebrae", profile="ci", folds=["x"], workspace=tmp_path)
    with pytest.raises(SpinemetsError, match="raw dataset not found"):
        nnunet.train("vertebrae", profile="ci", workspace=tmp_path)
    with pytest.raises(SpinemetsError, match="unknown stage"):
        nnunet.train("ribs", profile="ci", workspace=tmp_path)
    with pytest.raises(SpinemetsError, match="no trained vertebrae model"):
        nnunet.trained_models("vertebrae", "ci", tmp_path)


def test_selection_is_reused_only_when_nothing_new_was_trained(tmp_path, monkeypatch, clean_env):
    """A finished protocol run again (the report job of a cluster run) trains nothing and selects nothing."""
    ws = Workspace(tmp_path)
    calls = []

    def fake_nnunet(program, args, workspace, *rest, **kw):
        calls.append(program)
        results = ws.results / ws.dataset_name("metastases")
        if program == "nnUNetv2_train":
            folder = ws.model_folder("metastases", args[1], "nnUNetTrainer_250epochs") / f"fold_{args[2]}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "checkpoint_final.pth").write_bytes(b"")
        elif program == "nnUNetv2_find_best_configuration":
            (results / "inference_information.json").write_text(json.dumps({"made": len(calls)}))

    monkeypatch.setattr(nnunet, "run_nnunet", fake_nnunet)
    monkeypatch.setattr(nnunet, "plan_and_preprocess", lambda stage, profile, cfgs, *a, **k: list(cfgs))
    train = lambda cfgs: nnunet.train("metastases", "paper", configurations=cfgs, folds=[0, 1], workspace=ws)
    first = train(["2d", "3d_fullres"])
    assert calls.count("nnUNetv2_train") == 4 and calls[-1] == "nnUNetv2_find_best_configuration"
    again = train(["2d", "3d_fullres"])
    assert len(calls) == 5 and again["best"] == first["best"]  # nothing trained, the selection reused
    other = train(["3d_fullres"])  # other models: select again, though nothing new was trained
    assert len(calls) == 6 and other["best"] != first["best"]
    (ws.results / ws.dataset_name("metastases") / nnunet.SELECTION_RECORD).unlink()
    train(["3d_fullres"])
    assert len(calls) == 7  # no record of what the selection was made for: made again


def test_the_demo_trains_in_float32_unless_the_user_asks_for_bfloat16(tmp_path, monkeypatch, clean_env):
    from spinemets.training import profiles

    monkeypatch.delenv(profiles.CPU_BF16_ENV, raising=False)
    assert profiles.cpu_bf16_setting("demo") == "0" and profiles.cpu_bf16_setting("ci") == "0"
    assert profiles.cpu_bf16_setting("paper") == "auto"  # nnU-Net's own trainers: the setting is not theirs
    ws, seen = Workspace(tmp_path), []

    class Started(Exception):
        pass

    def fake_nnunet(program, args, workspace, log_file=None, dirs=(), env=None):
        seen.append(dict(env or {}))
        raise Started  # what the training would see is all this test needs

    monkeypatch.setattr(nnunet, "run_nnunet", fake_nnunet)
    monkeypatch.setattr(nnunet, "plan_and_preprocess", lambda stage, profile, cfgs, *a, **k: list(cfgs))
    monkeypatch.setattr(nnunet, "write_splits", lambda *a, **k: None)
    with pytest.raises(Started):
        nnunet.train("metastases", "demo", configurations=["demo_metastases"], workspace=ws, device="cpu")
    assert seen[-1][profiles.CPU_BF16_ENV] == "0"
    monkeypatch.setenv(profiles.CPU_BF16_ENV, "1")  # the user's setting wins: faster where it has bfloat16 units
    assert profiles.cpu_bf16_setting("demo") == "1"
    from spinemets.training.trainers.spinemets_trainers import use_cpu_bf16
    import torch

    assert use_cpu_bf16(torch.device("cpu"), "0") is False and use_cpu_bf16(torch.device("cpu"), "1") is True
    assert use_cpu_bf16(torch.device("cuda"), "1") is False


# ------------------------------------------------------------------------------------------
# Slow: the session's trained ci workspace (tests/conftest.py: ci_run), read as it is; a test that
# trains works on a copy of the datasets it needs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ci_workspace(ci_run) -> Workspace:
    return Workspace(ci_run / "workspace" / "ci")


@pytest.mark.slow
def test_ci_run_trained_both_stages_with_their_records(ci_workspace, tmp_path, clean_env):
    ws = copy_workspace(ci_workspace, tmp_path / "ws", parts=("raw", "preprocessed", "results"))
    for stage in ("vertebrae", "metastases"):
        fold = ws.model_folder(stage, f"demo_{stage}", "SpinemetsCITrainer") / "fold_all"
        assert (fold / "checkpoint_final.pth").exists(), stage
        result = nnunet.train(stage, profile="ci", workspace=ws)  # trained: every fold skipped, the record returned
        assert result["configurations"] == [f"demo_{stage}"] and result["best"] is None
        assert not list(fold.glob("training_log_*.txt"))[1:], "a trained fold was trained again"
        log = figures.read_logging(fold)
        assert len(log["train_losses"]) == 3 and len(log["epoch_seconds"]) == 3
        record = result["training"]["demo_" + stage + "/fold_all"]
        assert record == json.loads((fold / nnunet.TRAINING_RECORD).read_text())
        assert record["finished"] and record["epochs"] == 3 and record["budget_s"] is None
        assert record["iterations"] == record["iterations_planned"] == 3 * 2  # the trainer's own count: fixed work
        assert record["iterations_planned"] == profiles_mod.planned_iterations(stage, "ci")
        assert record["seed"] == profiles_mod.PROFILES["ci"]["seed"] == 0 and record["data_loading"] == "in-process"
        assert record["channels_last"] and record["cpu"]["torch_capability"] and record["seconds_per_iteration"] > 0
        text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
        lines = re.findall(r"spinemets: epoch (\d+)/3, iterations (\d+)/6, .* about ([\d.]+) min left", text)
        assert [(int(e), int(i)) for e, i, _ in lines] == [(1, 2), (2, 4), (3, 6)] and float(lines[-1][2]) == 0
    assert "nnUNet_results" not in os.environ
    fig = figures.training_curves("metastases", workspace=ws, profile="ci")
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 2
    assert len(fig.axes[0].lines[0].get_xdata()) == 3


@pytest.mark.slow
def test_training_for_a_budget_fits_its_iterations_to_the_cpu(ci_workspace, tmp_path, clean_env):
    ws = copy_workspace(ci_workspace, tmp_path / "ws", stages=("metastases",))
    # the lesion stage trains for a wall-clock budget: 3 epochs still, their iterations set by the CPU's speed
    result = nnunet.train("metastases", profile="ci", workspace=ws, options=nnunet.TrainingOptions(budget_s=12.0))
    fold = ws.model_folder("metastases", "demo_metastases", "SpinemetsCITrainer") / "fold_all"
    assert (fold / "checkpoint_final.pth").exists()
    record = result["training"]["demo_metastases/fold_all"]
    assert record == json.loads((fold / nnunet.TRAINING_RECORD).read_text())
    assert record["finished"] and record["epochs"] == 3 and record["budget_s"] == 12.0
    assert record["iterations_planned"] is None  # a budget: the CPU decides the iterations, and the record says so
    text = "".join(p.read_text() for p in fold.glob("training_log_*.txt"))
    lines = re.findall(r"spinemets: epoch (\d+)/3, iterations \d+/\d+, .* about ([\d.]+) min left", text)
    assert [int(e) for e, _ in lines] == [1, 2, 3] and float(lines[-1][1]) == 0
    # the first epoch runs a fifth of the class's count (at least 2), the others what fits
    assert record["iterations"] >= 2 + 1 + 1 and "Training budget 12 s over 3 epochs" in text


@pytest.mark.slow
def test_two_stage_prediction_and_localization_with_the_domain_check(ci_workspace, tmp_path, clean_env):
    ws = ci_workspace
    first = sorted((ws.raw / ws.dataset_name("vertebrae") / "imagesTs").glob("*_0000.nii.gz"))[0]
    images = tmp_path / "images"
    images.mkdir()
    (images / first.name).symlink_to(first)
    out = tmp_path / "pred"
    inference.predict(images, out, profile="ci", workspace=ws, device="cpu", options=inference.PredictOptions(roi="spine"))
    (case,) = [p.name for p in out.iterdir() if p.is_dir()]
    with open(out / "lesions.csv", newline="") as fh:
        assert csv.DictReader(fh).fieldnames == labels.LESION_COLUMNS
    for name in ("vertebrae.nii.gz", "metastases.nii.gz", "vertebrae.seg.nrrd", "metastases.seg.nrrd", "vertebrae.csv"):
        assert (out / case / name).exists()
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["models"]["vertebrae"][0]["trainer"] == "SpinemetsCITrainer"
    # each model records what it was trained on; the held-out case of the same cohort is inside that domain
    for stage in ("vertebrae", "metastases"):
        record = json.loads((ws.model_folder(stage, f"demo_{stage}", "SpinemetsCITrainer") / domain.RECORD).read_text())
        assert record["cohort"] == "synthetic" and record["cases"] == 4, stage
        assert record["spacing_mm"]["min"] == [2.5, 2.5, 3.0] and record["intensity_hu"]["p50"]["min"] > -200
        assert prov["domain"]["training"][stage]["cases"] == 4
    assert prov["domain"]["cases"][case]["in_domain"], prov["domain"]["cases"][case]["problems"]
    with open(out / "lesions.csv", newline="") as fh:
        assert {r["domain_warning"] for r in csv.DictReader(fh)} <= {""}
    # a real CT (3 mm, lower thorax) through the synthetic models: predicted as asked, and warned about
    real = tmp_path / "pred_real"
    inference.predict(REAL_CT, real, profile="ci", workspace=ws, device="cpu")
    report = json.loads((real / "provenance.json").read_text())["domain"]["cases"]["example_ct_sm"]
    assert not report["in_domain"]
    assert {"vertebrae", "metastases"} == set(report["problems"])
    assert any(p.startswith("field of view x 366 mm") for p in report["problems"]["vertebrae"])
    assert "WARNING: case example_ct_sm is outside" in slicerio.read_segmentation(
        str(real / "example_ct_sm" / "vertebrae.seg.nrrd"))["content"]
    for table in ("lesions.csv", "vertebrae.csv"):
        with open(real / table, newline="") as fh:
            assert {r["domain_warning"] for r in csv.DictReader(fh)} <= {"outside training domain: spacing, field of view, intensity"}


INTERRUPTING_TRAINER = textwrap.dedent('''
    import os
    from spinemets.training.trainers.spinemets_trainers import SpinemetsCITrainer


    class SpinemetsInterruptOnceTrainer(SpinemetsCITrainer):
        """Trains 4 epochs; the first run dies abruptly after epoch 1 (checkpoint written), as a killed job."""

        EPOCHS = 4

        def on_epoch_end(self):
            super().on_epoch_end()
            marker = os.path.join(self.output_folder, "interrupted_once")
            if self.current_epoch == 2 and not os.path.exists(marker):
                open(marker, "w").close()
                os._exit(3)
''')


@pytest.mark.slow
def test_training_resumes_after_interruption(ci_workspace, tmp_path, clean_env):
    """A training that dies (its process gone at once, no clean-up: as a SIGKILL, an OOM kill or a
    node failure) resumes from its latest checkpoint when trained again. The same mechanism on
    SLURM (a cancelled job resubmitted) is tests/test_cluster.py's."""
    ws = copy_workspace(ci_workspace, tmp_path / "ws", stages=("metastases",))
    (tmp_path / "interrupting_trainer.py").write_text(INTERRUPTING_TRAINER)
    kwargs = dict(profile="ci", workspace=ws, options=nnunet.TrainingOptions(
        trainer="SpinemetsInterruptOnceTrainer", extra_trainer_dirs=(tmp_path,)))
    fold = ws.model_folder("metastases", "demo_metastases", "SpinemetsInterruptOnceTrainer") / "fold_all"
    with pytest.raises(SpinemetsError, match="exit 3"):
        nnunet.train("metastases", **kwargs)
    assert (fold / "interrupted_once").exists() and not (fold / "checkpoint_final.pth").exists()
    saved = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert saved["current_epoch"] == 2
    first_logs = set(fold.glob("training_log_*.txt"))
    nnunet.train("metastases", **kwargs)  # finds the checkpoint and continues with --c
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4 and len(final["logging"]["train_losses"]) == 4
    resumed_logs = set(fold.glob("training_log_*.txt")) - first_logs
    assert len(first_logs) == 1 and len(resumed_logs) == 1  # one log per attempt
    resumed_text = "".join(p.read_text() for p in resumed_logs)
    epochs = [int(m) for m in re.findall(r": Epoch (\d+)\s*$", resumed_text, flags=re.MULTILINE)]
    assert epochs == [2, 3]  # continued from the checkpoint, not from epoch 0
    # the training record counts each epoch once: the two before the checkpoint and the two after
    record = json.loads((fold / nnunet.TRAINING_RECORD).read_text())
    assert record["finished"] and record["epochs"] == 4 and len(record["epoch_log"]) == 4
    assert record["iterations"] == 4 * 2 == sum(n for n, _ in record["epoch_log"])
    assert record["elapsed_s"] == pytest.approx(sum(s for _, s in record["epoch_log"]), abs=1.0)
    nnunet.train("metastases", **kwargs)  # finished folds are skipped, not retrained
    assert torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["current_epoch"] == 4
    assert len(list(fold.glob("training_log_*.txt"))) == 2


@pytest.mark.slow
def test_dropped_lowres_is_reported_and_skipped(ci_workspace, tmp_path, capsys, clean_env):
    ws = copy_workspace(ci_workspace, tmp_path / "ws", stages=("metastases",))
    usable = nnunet.plan_and_preprocess("metastases", "paper", ["3d_lowres", "3d_fullres", "3d_cascade_fullres"],
                                        workspace=ws)
    assert usable == ["3d_fullres"]
    out = capsys.readouterr().out
    assert "3d_lowres is not in the plans" in out and "3d_cascade_fullres is not in the plans" in out


def test_cpu_bfloat16_setting_and_autocast_forward(clean_env):
    from spinemets.training.trainers import spinemets_trainers as st

    cpu = torch.device("cpu")
    for value, expected in (("0", False), ("off", False), ("1", True), ("yes", True)):
        clean_env.setenv("SPINEMETS_CPU_BF16", value)
        assert st.use_cpu_bf16(cpu) is expected
    assert st.use_cpu_bf16(torch.device("meta")) is False  # only ever on a CPU
    clean_env.delenv("SPINEMETS_CPU_BF16")
    assert st.use_cpu_bf16(cpu) is st.cpu_bf16_supported()
    caps = torch.cpu.get_capabilities()
    assert st.cpu_bf16_supported() is bool(caps.get("amx_bf16") or caps.get("avx512_bf16"))

    class TwoOutputs(torch.nn.Module):  # deep supervision returns one output per resolution
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x):
            y = self.conv(x)
            return [y, y[:, :, ::2, ::2, ::2]]

    torch.manual_seed(0)
    net = TwoOutputs()
    keys = list(net.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    reference = net(x)
    st.autocast_forward(net)
    out = net(x)
    assert isinstance(out, list) and [o.dtype for o in out] == [torch.float32] * 2
    assert torch.allclose(out[0], reference[0], atol=0.05)  # bfloat16 inside: close, not equal
    assert not torch.equal(out[0], reference[0])
    assert list(net.state_dict()) == keys and net.conv.weight.dtype == torch.float32  # checkpoints unchanged
    out[0].sum().backward()
    assert net.conv.weight.grad is not None and net.conv.weight.grad.dtype == torch.float32
    single = torch.nn.Conv3d(1, 1, 3)
    st.autocast_forward(single)
    assert single(x).dtype == torch.float32


def test_project_trainer_applies_its_schedule_and_thread_setting(tmp_path, clean_env):
    from spinemets.training.trainers.spinemets_trainers import SpinemetsCITrainer, SpinemetsMetastasesDemoTrainer

    plans = json.loads(_plans(tmp_path).read_text())
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lytic": 1, "sclerotic": 2},
                    "numTraining": 1, "file_ending": ".nii.gz"}
    before = torch.get_num_threads()
    clean_env.setenv("SPINEMETS_TORCH_THREADS", "1")
    try:
        with Workspace(tmp_path / "ws").activated():
            trainer = SpinemetsCITrainer(dict(plans, continue_training=False), "3d_fullres", "all", dataset_json,
                                         device=torch.device("cpu"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.save_every) == (3, 2, 1)
    assert trainer.oversample_foreground_percent == SpinemetsCITrainer.OVERSAMPLE
    trainer.network = torch.nn.Conv3d(1, 3, 3)
    optimizer, scheduler = trainer.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(SpinemetsCITrainer.LR)
    scheduler.step(2)  # polynomial decay over the trainer's epochs: lr (1 - 2/3)^0.9
    assert optimizer.param_groups[0]["lr"] == pytest.approx(SpinemetsCITrainer.LR * (1 / 3) ** 0.9)
    assert SpinemetsMetastasesDemoTrainer.OVERSAMPLE == 0.5


def test_selected_postprocessing_is_found_and_applied(tmp_path, clean_env):
    from nnunetv2.postprocessing.remove_connected_components import remove_all_but_largest_component_from_segmentation

    ws = Workspace(tmp_path / "ws")
    name = ws.dataset_name("metastases")
    results = ws.results / name
    crossval = results / "nnUNetTrainer_250epochs__nnUNetPlans__3d_fullres" / "crossval_results_folds_0_1_2_3_4"
    crossval.mkdir(parents=True)
    pp = crossval / "postprocessing.pkl"
    with open(pp, "wb") as fh:  # as find_best_configuration writes it: keep only the largest lytic lesion
        pickle.dump(([remove_all_but_largest_component_from_segmentation], [{"labels_or_regions": 1}]), fh)
    info = results / "inference_information.json"
    assert nnunet.selected_postprocessing("metastases", "paper", ws) is None  # no selection made yet
    info.write_text(json.dumps({"best_model_or_ensemble": {"postprocessing_file": str(pp)}}))
    assert nnunet.selected_postprocessing("metastases", "demo", ws) is None  # the demo selects nothing
    assert nnunet.selected_postprocessing("metastases", "paper", ws) == pp
    elsewhere = f"/cluster/scratch/nnUNet_results/{name}/{pp.relative_to(results)}"  # a workspace copied from a cluster
    info.write_text(json.dumps({"best_model_or_ensemble": {"postprocessing_file": elsewhere}}))
    assert nnunet.selected_postprocessing("metastases", "paper", ws) == pp

    segmentation = np.zeros((10, 10, 10), np.uint8)
    segmentation[1:4, 1:4, 1:4] = 1  # 27 voxels
    segmentation[7, 7, 7] = 1  # a second, smaller lytic component
    segmentation[7, 1, 1] = 2  # sclerotic components are left alone
    segmentation[1, 8, 8] = 2
    cleaned = nnunet.apply_postprocessing(segmentation, pp)
    assert cleaned[7, 7, 7] == 0 and (cleaned[1:4, 1:4, 1:4] == 1).all() and (cleaned == 2).sum() == 2
    assert segmentation[7, 7, 7] == 1  # the input is not modified

    pp.unlink()
    with pytest.raises(SpinemetsError, match="inference_information.json: names the postprocessing file"):
        nnunet.selected_postprocessing("metastases", "paper", ws)
    info.write_text("{not json")
    with pytest.raises(SpinemetsError, match="not valid JSON"):
        nnunet.selected_postprocessing("metastases", "paper", ws)


def _raw_dataset(ws: Workspace, stage: str, cases: list[str]) -> None:
    folder = ws.raw / ws.dataset_name(stage)
    (folder / "labelsTr").mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz"}))
    for case in cases:
        (folder / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")


def test_write_splits_uses_nnunets_split_for_other_than_five_folds(tmp_path):
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    ws = Workspace(tmp_path / "ws")
    cases = [f"case_{i:03d}" for i in range(7)]
    _raw_dataset(ws, "metastases", cases)
    assert nnunet.write_splits("metastases", 5, ws) is None  # nnU-Net's trainer makes its own 5-fold split
    path = nnunet.write_splits("metastases", 2, ws)
    splits = json.loads(path.read_text())
    assert path == ws.preprocessed / ws.dataset_name("metastases") / "splits_final.json"
    assert splits == [{k: list(v) for k, v in s.items()} for s in generate_crossval_split(cases, 12345, 2)]
    assert sorted(splits[0]["val"] + splits[1]["val"]) == cases
    assert nnunet.write_splits("metastases", 2, ws) == path  # kept as it is
    with pytest.raises(SpinemetsError, match=r"splits_final.json: holds 2 folds, but the profile splits into 3"):
        nnunet.write_splits("metastases", 3, ws)


def test_write_splits_refuses_too_few_cases(tmp_path):
    ws = Workspace(tmp_path / "ws")
    _raw_dataset(ws, "vertebrae", ["a"])
    with pytest.raises(SpinemetsError, match=r"Dataset501_Vertebrae: 1 training cases cannot be split into 2 folds"):
        nnunet.write_splits("vertebrae", 2, ws)


def test_train_refuses_a_fold_beyond_the_split(tmp_path, clean_env):
    ws = Workspace(tmp_path / "ws")
    _raw_dataset(ws, "metastases", [f"c{i}" for i in range(4)])
    plans = ws.plans_file("metastases")
    plans.parent.mkdir(parents=True)
    plans.write_text(json.dumps({"plans_name": "nnUNetPlans", "configurations": {
        c: {"data_identifier": f"nnUNetPlans_{c}"} for c in ("2d", "3d_fullres")}}))
    for c in ("2d", "3d_fullres"):
        (plans.parent / f"nnUNetPlans_{c}").mkdir()
    with pytest.raises(SpinemetsError, match=r"fold 2: profile 'smoke' splits the training cases into 2 folds \(0-1\)"):
        nnunet.train("metastases", "smoke", configurations=["2d"], folds=[2], workspace=ws)


def test_demo_trains_fixed_iterations_with_a_seed():
    from spinemets.training.trainers import spinemets_trainers as st

    assert profiles_mod.planned_iterations("vertebrae", "demo") == 1000
    assert profiles_mod.planned_iterations("metastases", "demo") == 1800
    assert profiles_mod.planned_iterations("vertebrae", "ci") == st.SpinemetsCITrainer.EPOCHS * st.SpinemetsCITrainer.ITERATIONS
    assert profiles_mod.planned_iterations("vertebrae", "paper") is None  # nnU-Net's own trainer
    assert profiles_mod.stage_budget("vertebrae", "demo") is None and profiles_mod.stage_budget("metastases", "demo") is None
    assert profiles_mod.PROFILES["demo"]["seed"] == 0 and profiles_mod.PROFILES["paper"].get("seed") is None


def test_budget_iterations_fill_the_time_left():
    from spinemets.training.trainers.spinemets_trainers import iterations_for

    # 100 s left over 4 epochs, 2 s of validation and checkpoint each: (25 - 2) / 0.5 = 46 iterations
    assert iterations_for(100.0, 4, 0.5, 2.0, cap=1000) == 46
    assert iterations_for(100.0, 4, 0.5, 2.0, cap=30) == 30  # never more than the cap
    assert iterations_for(-5.0, 2, 0.5, 2.0, cap=30) == 1  # over budget: one iteration per epoch, the schedule ends
    assert iterations_for(10.0, 0, 0.5, 2.0, cap=30) == 1
    assert iterations_for(10.0, 1, 0.0, 0.0, cap=7) == 7  # an unmeasurably cheap iteration


def test_seed_setting(clean_env):
    from spinemets.training.trainers.spinemets_trainers import training_seed

    clean_env.delenv("SPINEMETS_TRAIN_SEED", raising=False)
    assert training_seed() is None
    for value, seed in (("", None), ("0", 0), (" 17 ", 17)):
        clean_env.setenv("SPINEMETS_TRAIN_SEED", value)
        assert training_seed() == seed
    for bad in ("-1", "1.5", "soon"):
        clean_env.setenv("SPINEMETS_TRAIN_SEED", bad)
        with pytest.raises(ValueError, match=f"SPINEMETS_TRAIN_SEED must be a non-negative integer, not '{bad}'"):
            training_seed()


def test_budget_setting(clean_env):
    from spinemets.training.trainers.spinemets_trainers import budget_seconds

    clean_env.delenv("SPINEMETS_TRAIN_BUDGET_S", raising=False)
    assert budget_seconds() is None
    clean_env.setenv("SPINEMETS_TRAIN_BUDGET_S", "")
    assert budget_seconds() is None
    clean_env.setenv("SPINEMETS_TRAIN_BUDGET_S", "90")
    assert budget_seconds() == 90.0
    for bad in ("0", "-3"):
        clean_env.setenv("SPINEMETS_TRAIN_BUDGET_S", bad)
        with pytest.raises(ValueError, match="positive number of seconds"):
            budget_seconds()
    # the demo trains a fixed number of iterations; a budget is an opt-in, shared in these proportions
    assert stage_plan("vertebrae", "demo")["budget_s"] is None
    assert stage_plan("vertebrae", "demo")["budget_weight"] == DEMO_BUDGET_S["vertebrae"]
    assert stage_plan("vertebrae", "ci").get("budget_s") is None
    for bad in ("inf", "nan", "soon"):
        clean_env.setenv("SPINEMETS_TRAIN_BUDGET_S", bad)
        with pytest.raises(ValueError, match="positive number of seconds"):
            budget_seconds()
    from spinemets.training.trainers import spinemets_trainers

    assert spinemets_trainers.TRAINING_RECORD == nnunet.TRAINING_RECORD  # one name, defined on both sides


@pytest.mark.parametrize("dims", [2, 3])
def test_project_trainer_puts_its_network_in_channels_last_on_the_cpu(tmp_path, clean_env, dims):
    from spinemets.training.trainers.spinemets_trainers import SpinemetsCITrainer

    plans = json.loads(_plans(tmp_path).read_text())
    cfg = plans["configurations"]["3d_fullres"]
    if dims == 2:  # a 2-D configuration: Conv2d weights take the 2-D channels-last layout
        arch = cfg["architecture"]["arch_kwargs"]
        arch.update(conv_op="torch.nn.modules.conv.Conv2d", kernel_sizes=[[3, 3]] * 5,
                    strides=[[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]],
                    norm_op="torch.nn.modules.instancenorm.InstanceNorm2d")
        cfg.update(patch_size=[48, 48], spacing=[2.5, 2.5])
    plans["configurations"] = {"cfg": cfg}
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lytic": 1, "sclerotic": 2},
                    "numTraining": 1, "file_ending": ".nii.gz"}
    ws = Workspace(tmp_path / "ws")
    data = ws.preprocessed / "Dataset999_X" / cfg["data_identifier"]
    data.mkdir(parents=True)
    (data / "case.b2nd").touch()  # initialize() infers the dataset's file format from the folder; no data is read
    with ws.activated():
        trainer = SpinemetsCITrainer(dict(plans, continue_training=False), "cfg", "all", dataset_json,
                                     device=torch.device("cpu"))
        trainer.initialize()
    layout = torch.channels_last_3d if dims == 3 else torch.channels_last
    weights = [p for p in trainer.network.parameters() if p.dim() == dims + 2]
    assert weights and all(p.is_contiguous(memory_format=layout) for p in weights)
    x = torch.zeros(1, 1, *cfg["patch_size"])
    with torch.no_grad():
        assert trainer.network(x)[0].shape == (1, 3, *cfg["patch_size"])


# ---------------------------------------------------------------------------------------------
# Where the tools' output goes (clean pages)
# ---------------------------------------------------------------------------------------------


def _noisy_program(tmp_path: Path, code: int = 0) -> Path:
    script = tmp_path / "noisy"
    script.write_text("#!/bin/sh\necho 'Searching for class nnUNetTrainer'\n"
                      "printf ' 50%%|#####     | 1/2\\r100%%|##########| 2/2\\n'\n"
                      f"echo 'Inspecting module x'\nexit {code}\n")
    script.chmod(0o755)
    return script


def test_tool_output_log_keeps_the_programs_lines_out_of_the_console(tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path / "ws")
    monkeypatch.setattr(programs, "program_path", lambda name: str(_noisy_program(tmp_path)))
    monkeypatch.setenv(TOOL_OUTPUT_ENV, "log")
    run_nnunet("nnUNetv2_plan_and_preprocess", ["-d", "1"], ws)
    out = capsys.readouterr().out
    assert "Searching for class" not in out and "Inspecting module" not in out and "100%" not in out
    assert out.count("\n") == 1 and "nnUNetv2_plan_and_preprocess: done in" in out
    text = (ws.logs / "nnUNetv2_plan_and_preprocess.log").read_text()
    assert text.startswith("$ ") and "Searching for class" in text and "Inspecting module x" in text
    log_block(ws.logs / "nnUNetv2_plan_and_preprocess.log", "plan")  # outside a notebook: the tail as text
    shown = capsys.readouterr().out
    assert shown.splitlines()[-2:] == ["100%|##########| 2/2", "Inspecting module x"]


def test_tool_output_console_is_the_default_and_a_failure_names_the_log(tmp_path, monkeypatch, capsys):
    ws = Workspace(tmp_path / "ws")
    monkeypatch.setattr(programs, "program_path", lambda name: str(_noisy_program(tmp_path)))
    monkeypatch.delenv(TOOL_OUTPUT_ENV, raising=False)
    run_nnunet("nnUNetv2_plan_and_preprocess", [], ws)
    assert "Inspecting module x" in capsys.readouterr().out and not ws.logs.exists()
    monkeypatch.setattr(programs, "program_path", lambda name: str(_noisy_program(tmp_path, code=3)))
    monkeypatch.setenv(TOOL_OUTPUT_ENV, "log")
    with pytest.raises(SpinemetsError, match=r"exit 3.*nnUNetv2_train\.log"):
        run_nnunet("nnUNetv2_train", [], ws)
    monkeypatch.setenv(TOOL_OUTPUT_ENV, "loud")
    with pytest.raises(SpinemetsError, match="SPINEMETS_TOOL_OUTPUT='loud'"):
        tool_output()


def test_captured_output_sends_in_process_prints_to_the_workspace_log(tmp_path, monkeypatch, capsys):
    import warnings

    ws = Workspace(tmp_path / "ws")
    monkeypatch.setenv(TOOL_OUTPUT_ENV, "log")
    with captured_output(ws, "nnUNetPredictor"):
        print("perform_everything_on_device=True is only supported for cuda devices!")
        warnings.warn("a tool's warning")
    assert "cuda devices" not in capsys.readouterr().out
    assert "cuda devices" in (ws.logs / "nnUNetPredictor.log").read_text()
    monkeypatch.setenv(TOOL_OUTPUT_ENV, "console")
    with captured_output(ws, "nnUNetPredictor"):
        print("shown")
    assert "shown" in capsys.readouterr().out


def _blosc2_cases(folder, n=2):
    """``n`` tiny preprocessed cases in nnU-Net's blosc2 format; returns {identifier: (data, seg)}."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    cases = {}
    for i in range(n):
        data = rng.standard_normal((1, 6, 7, 8)).astype(np.float32)
        seg = rng.integers(-1, 3, (1, 6, 7, 8)).astype(np.int8)
        nnUNetDatasetBlosc2.save_case(data, seg, {"class_locations": {1: np.zeros((0, 4), int)}, "case": i},
                                      str(folder / f"case_{i}"))
        cases[f"case_{i}"] = (data, seg)
    return cases


def test_in_memory_cases_read_each_case_once_and_hand_out_copies(tmp_path, monkeypatch):
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from spinemets.training.trainers import spinemets_trainers as st

    cases = _blosc2_cases(tmp_path / "pre")
    reads = []
    base_load = nnUNetDatasetBlosc2.load_case
    monkeypatch.setattr(nnUNetDatasetBlosc2, "load_case", lambda self, i: reads.append(i) or base_load(self, i))
    dataset = st.IN_MEMORY[nnUNetDatasetBlosc2](str(tmp_path / "pre"), sorted(cases))
    for _ in range(3):
        for identifier, (data, seg) in cases.items():
            got_data, got_seg, got_prev, props = dataset.load_case(identifier)
            assert isinstance(got_data, np.ndarray) and np.array_equal(got_data, data) and np.array_equal(got_seg, seg)
            assert got_prev is None and props["case"] == int(identifier[-1])
            got_data[:] = 0  # what a caller does to its copy does not reach the kept case
    assert reads == sorted(cases)  # one read per case
    assert pickle.loads(pickle.dumps(dataset)).load_case("case_1")[0].tolist() == cases["case_1"][0].tolist()
    # beyond the memory cap, cases are read at every use (and still right)
    monkeypatch.setattr(st, "IN_MEMORY_BYTES", 2000)  # a case is 1344 data + 336 seg bytes: one fits
    capped = st.InMemoryBlosc2(str(tmp_path / "pre"), sorted(cases))
    reads.clear()
    for _ in range(2):
        for identifier, (data, _seg) in cases.items():
            assert np.array_equal(capped.load_case(identifier)[0], data)
    assert reads == ["case_0", "case_1", "case_1"]  # case_0 kept, case_1 read at every use


def _seeded_trainer(tmp_path, clean_env, seed: str):
    """A CI trainer built in-process (no training) on a few tiny preprocessed cases with labelled voxels."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    from spinemets.training.trainers.spinemets_trainers import SpinemetsCITrainer

    plans = json.loads(_plans(tmp_path).read_text())
    cfg = plans["configurations"]["3d_fullres"]
    cfg["patch_size"] = [16, 16, 16]
    dataset_json = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "lytic": 1, "sclerotic": 2},
                    "numTraining": 4, "file_ending": ".nii.gz"}
    ws = nnunet.Workspace(tmp_path / "ws")
    data = ws.preprocessed / "Dataset999_X" / cfg["data_identifier"]
    if not data.is_dir():
        data.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for i in range(4):
            image = rng.standard_normal((1, 24, 24, 24)).astype(np.float32)
            seg = np.zeros((1, 24, 24, 24), np.int8)
            seg[0, 4 + i:10 + i, 6:12, 5:14] = 1 + i % 2
            locations = {c: np.argwhere(seg == c)[:, [0, 1, 2, 3]] for c in (1, 2)}
            nnUNetDatasetBlosc2.save_case(image, seg, {"class_locations": locations, "spacing": [3.0, 2.5, 2.5],
                                                       "shape_after_cropping_and_before_resampling": [24, 24, 24]},
                                          str(data / f"case_{i}"))
    clean_env.setenv("SPINEMETS_TRAIN_SEED", seed)
    clean_env.delenv("nnUNet_n_proc_DA", raising=False)
    with ws.activated():
        trainer = SpinemetsCITrainer(dict(plans, continue_training=False), "3d_fullres", "all", dataset_json,
                                     device=torch.device("cpu"))
        trainer.initialize()
        loaders = trainer.get_dataloaders()
    return trainer, loaders


def _first_batches(trainer, loaders, epoch: int, n: int = 3) -> list:
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()  # seeds this epoch's draws
    train, _ = loaders
    return [next(train) for _ in range(n)]


def test_seeded_trainer_draws_the_same_weights_and_batches(tmp_path, clean_env):
    from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

    from spinemets.training.trainers.spinemets_trainers import training_seed

    one, loaders_one = _seeded_trainer(tmp_path, clean_env, "0")
    two, loaders_two = _seeded_trainer(tmp_path, clean_env, "0")
    # in-process data loading (nnU-Net's worker processes are not seeded), the variable restored
    assert isinstance(loaders_one[0], SingleThreadedAugmenter) and "nnUNet_n_proc_DA" not in os.environ
    assert training_seed() == 0 and one.seed == 0
    for a, b in zip(one.network.state_dict().values(), two.network.state_dict().values()):
        assert torch.equal(a, b)  # the same initial weights
    first = _first_batches(one, loaders_one, epoch=0)
    again = _first_batches(two, loaders_two, epoch=0)
    for a, b in zip(first, again):
        assert a["keys"].tolist() == b["keys"].tolist()
        assert torch.equal(torch.as_tensor(a["data"]), torch.as_tensor(b["data"]))
        assert all(torch.equal(torch.as_tensor(x), torch.as_tensor(y)) for x, y in zip(a["target"], b["target"]))
    # an epoch draws from its own stream: the same epoch again gives the same batches, another epoch others
    assert [b["keys"].tolist() for b in _first_batches(one, loaders_one, epoch=0)] == \
        [b["keys"].tolist() for b in first]
    later = _first_batches(one, loaders_one, epoch=1)
    assert any(not torch.equal(torch.as_tensor(a["data"]), torch.as_tensor(b["data"])) for a, b in zip(first, later))
    # another seed: other initial weights and other batches
    other, loaders_other = _seeded_trainer(tmp_path, clean_env, "1")
    assert not all(torch.equal(a, b) for a, b in zip(one.network.state_dict().values(),
                                                     other.network.state_dict().values()))
    drawn = _first_batches(other, loaders_other, epoch=0)
    assert any(not torch.equal(torch.as_tensor(a["data"]), torch.as_tensor(b["data"])) for a, b in zip(first, drawn))
    clean_env.setenv("SPINEMETS_TRAIN_SEED", "-1")
    with pytest.raises(ValueError, match="non-negative integer"):
        training_seed()
