"""nnU-Net's residual-encoder presets (profiles ``resenc_m``, ``resenc_l``, ``gpu_check_resenc_*``): planned
with ``nnUNetPlannerResEncM`` on a copy of the ci run's vertebra dataset and one fold trained for a few
iterations with nnU-Net's default training (one training, counted in tests/pipeline_guard.py); the
trained fold is then exported with nnU-Net's own export (it has its final validation)."""

from __future__ import annotations

import json
import zipfile

import pytest

from conftest import copy_workspace
from spinemets.paths import PLANS, Workspace
from spinemets.training import nnunet, profiles, sharing


def test_resenc_profiles_differ_from_the_paper_only_in_the_planner():
    paper = profiles.get_profile("paper")
    for size, (planner, plans) in profiles.RESENC_PRESETS.items():
        profile = profiles.get_profile(f"resenc_{size}")
        assert (profile["planner"], profile["plans"]) == (planner, plans)
        assert {k: v for k, v in profile.items() if k not in ("planner", "plans", "description")} == \
               {k: v for k, v in paper.items() if k != "description"}
        assert profiles.profile_plans(f"resenc_{size}") == plans
        assert profiles.get_profile(f"gpu_check_resenc_{size}")["device"] == "cuda"
    assert profiles.profile_plans("paper") == PLANS == "nnUNetPlans"


@pytest.mark.slow
def test_resenc_m_plans_the_ci_dataset_and_trains_one_fold(ci_run, tmp_path, monkeypatch):
    src = Workspace(ci_run / "workspace" / "ci")
    ws = copy_workspace(src, tmp_path / "ws", stages=("vertebrae",), parts=("raw",))
    # resenc_m at a CPU's scale: its planner and plans, with two inputs to the planner as in the smoke profile
    # (the smoke profile's target spacing; a GPU memory target of 0.1 GB: a 48 x 24 x 24 patch, so that an
    # iteration and the final validation's sliding window take seconds on a CPU; the smoke profile's 0.02 GB
    # would take ten times as many windows), one configuration, fold 0 of a two-fold split, a few iterations
    test_profile = profiles._derived(profiles.PROFILES["resenc_m"], {"configurations": ["3d_fullres"], "folds": [0],
                                                                 "trainer": "SpinemetsSmokeTrainer"},
                                   device="cpu", cv_folds=2, find_best=False,
                                   gpu_memory_target_gb=0.1,
                                   target_spacing=list(profiles.SMOKE_TARGET_SPACING))
    monkeypatch.setitem(profiles.PROFILES, "resenc_m_test", test_profile)
    monkeypatch.setenv("SPINEMETS_SMOKE_EPOCHS", "1")
    monkeypatch.setenv("SPINEMETS_SMOKE_ITERATIONS", "3")
    result = nnunet.train("vertebrae", "resenc_m_test", workspace=ws)
    assert result["plans"] == "nnUNetResEncUNetMPlans"
    plans = json.loads(ws.plans_file("vertebrae", plans="nnUNetResEncUNetMPlans").read_text())
    assert not ws.plans_file("vertebrae").exists()  # the preset's plans only
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    assert arch["network_class_name"].endswith("ResidualEncoderUNet")
    assert arch["arch_kwargs"]["n_blocks_per_stage"][:2] == [1, 3]  # the residual encoder's blocks per stage
    original = json.loads(src.plans_file("vertebrae").read_text())["configurations"]["3d_fullres"]["architecture"]
    assert original["network_class_name"].endswith("PlainConvUNet")
    folder = ws.model_folder("vertebrae", "3d_fullres", "SpinemetsSmokeTrainer", plans="nnUNetResEncUNetMPlans")
    assert (folder / "fold_0" / nnunet.CHECKPOINT_FINAL).is_file()
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()
    models = nnunet.trained_models("vertebrae", "resenc_m_test", ws)
    assert models == [{"folder": str(folder), "configuration": "3d_fullres", "trainer": "SpinemetsSmokeTrainer",
                       "folds": [0]}]
    # a fold with its final validation goes through nnU-Net's own export
    archive = sharing.export_model(tmp_path / "resenc.zip", profile="resenc_m_test", workspace=ws,
                                      stages=["vertebrae"])
    card = sharing.check_archive(archive)
    entry = card["stages"]["vertebrae"]
    assert "nnU-Net's export_pretrained_model" in entry["export"]
    assert entry["models"][0]["plans"] == "nnUNetResEncUNetMPlans"
    assert card["protocol"]["planner"] == "nnUNetPlannerResEncM"
    with zipfile.ZipFile(archive) as zf:
        assert f"results/Dataset501_Vertebrae/{folder.name}/fold_0/validation/summary.json" in zf.namelist()
