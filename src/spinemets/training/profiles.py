"""The training profiles: one registry (:data:`PROFILES`) of what each profile trains, cleans up and asks of a cluster.

**Profiles** (:data:`PROFILES`) are plain data: per stage, the nnU-Net configurations, folds,
trainer, device, and, for the short profiles, the extra plans configurations that
:func:`spinemets.training.nnunet.add_configuration` writes into the plans after planning;
``min_lesion_ml`` is the size below which :func:`spinemets.inference.predict.predict` clears a
predicted lesion, ``min_vertebra_ml`` the size below which it clears a fragment of a vertebra label
(both 0 for the paper), and ``repair_vertebra_order`` whether it puts the vertebra labels in the
spine's order (:func:`spinemets.inference.postprocessing.repair_vertebra_order`; off for the paper),
``min_confidence`` the confidence below which it clears a predicted lesion (0 in every profile: none
cleared):

* ``paper``: the protocol of the paper: ``2d``, ``3d_lowres``, ``3d_fullres`` and
  ``3d_cascade_fullres``, five folds, ``nnUNetTrainer_250epochs`` on CUDA, then
  ``nnUNetv2_find_best_configuration`` (which also picks the best ensemble of two configurations).
  When the planner drops ``3d_lowres`` (the image is already small enough for ``3d_fullres``),
  the cascade goes with it; this is logged and training continues with the rest.
* ``smoke``: the ``paper`` protocol at a tiny scale on a CPU (CI runs it end to end,
  ``tests/test_smoke.py``): the same configurations, programs, files and selection, with two
  folds of a two-fold split (``cv_folds``, written by :func:`spinemets.training.nnunet.write_splits`),
  nnU-Net's default training for a few iterations (``SpinemetsSmokeTrainer``), and two inputs to
  nnU-Net's planner (``target_spacing``, ``gpu_memory_target_gb``; see :data:`SMOKE_TARGET_SPACING`)
  under which it plans all four configurations for the small synthetic CTs.
* ``demo``: a design for 2 CPU cores (see the book's training chapter): each stage gets its own
  configuration inheriting from ``3d_fullres`` (coarser spacing and a long thin patch for the
  vertebrae, so the patch sees the anatomical anchors that fix vertebra identity; a small patch at
  native spacing for the lesions), a small U-Net, and a short-schedule trainer from
  :mod:`spinemets.training.trainers.spinemets_trainers`; fold ``all``.
* ``gpu_check``: the ``smoke`` protocol with nnU-Net's default plans on CUDA, a few epochs
  (``scripts/gpu_check.sh``).
* ``ci``: the demo's entry with a few iterations (its own trainer), for the tests.

Each profile also holds the clean-up of inference and the job resources per step kind
(``resources``), so that one lookup (:func:`get_profile`) answers every question about a profile.
"""

from __future__ import annotations

import copy
import math
import os
from typing import Mapping

from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError, unknown_choice
from spinemets.paths import PLANS

PAPER_CONFIGURATIONS = ("2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres")
_STRIDES_5 = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 1, 1]]
_STRIDES_4 = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]

#: Extra plans configurations, added to ``nnUNetPlans.json`` after planning. ``spacing`` and
#: ``patch_size`` are in the plans' axis order (after nnU-Net's ``transpose_forward``; for CTs
#: with thicker slices than pixels that is z, y, x). See :func:`add_configuration`.
DEMO_CONFIGURATIONS: dict[str, dict] = {
    # 4.5 x 3.75 x 3.75 mm; the 80 x 32 x 32 patch spans 360 mm of spine and the whole 120 mm field
    # of view in-plane, so it nearly always holds an anchor (ribs, sacrum and iliac wings, skull base).
    # At 6 mm slices the same cost bought 384 mm but boundaries lost: held-out Dice of the correctly
    # labelled vertebrae 0.73-0.76 against 0.83 here (resampling alone caps them at 0.85 and 0.90).
    "demo_vertebrae": {
        "spacing": [4.5, 3.75, 3.75],
        "patch_size": [80, 32, 32],
        "features_per_stage": [16, 32, 64, 128, 256],
        "strides": _STRIDES_5,
        "batch_size": 2,
    },
    # Native spacing; lesions are small and need no long-range context.
    "demo_metastases": {
        "patch_size": [32, 32, 32],
        "features_per_stage": [8, 16, 32, 64],
        "strides": _STRIDES_4,
        "batch_size": 2,
    },
}

#: The demo trains a fixed number of iterations per stage (its trainers' ``EPOCHS x ITERATIONS``),
#: the same on every CPU. A wall-clock budget is an explicit opt-in (``spinemets run --train-budget
#: MINUTES``): the trainers then fit their iterations into it, and the total is shared between the
#: stages in these proportions (the profile's ``budget_weight``: the shares of the fixed schedules,
#: 1000 vertebra and 1800 lesion iterations at a fifth of a vertebra iteration each, about 2:1 in
#: seconds on every CPU measured). The vertebra stage
#: needs several hundred iterations of its network before it tells the levels apart: on 2 AVX2
#: cores (about one iteration a second) 300 s gave 278 iterations and a held-out per-vertebra Dice
#: of 0.06; 700 iterations gave 0.69-0.76 before. 720 s buys about 700 there, and more than twice
#: as many on a CPU with bfloat16 units. The lesion stage's iterations cost a fifth of a vertebra one.
DEMO_BUDGET_S: dict[str, float] = {"vertebrae": 720.0, "metastases": 360.0}

#: The demo's smallest predicted lesion (mL), below which :func:`spinemets.inference.predict.predict`
#: clears a component: 0.3 mL, four fifths of the smallest lesion of the synthetic cohort
#: (``min_lesion_voxels`` of the ``demo`` preset, 20 voxels of 2.5 x 2.5 x 3 mm = 0.375 mL). On the
#: demo's 16 held-out cases, with the lesions that touch no vertebra cleared, 0.3 mL against the 0.18 mL
#: used before (half the smallest lesion: a smaller prediction cannot match a lesion with IoU > 0.5)
#: cleared 9 more of the 22 false-positive lesions and one true one
#: (``benchmarks/results/bench_demo_postprocessing.csv``). The paper profile clears nothing (0).
DEMO_MIN_LESION_ML = 0.3

#: Job resources per step kind (plain data; :class:`spinemets.run.cluster.Resources` is built from it).
#: The paper's 3d_fullres fold takes hours on one GPU at 250 epochs; nnU-Net's data augmentation
#: wants many CPU workers per GPU. ``prepare`` and ``report`` are the notebook steps of a run; the
#: report predicts the held-out cases (a GPU for the paper profile) and builds the book.
_PAPER_RESOURCES = {
    "prepare": {"time_min": 240, "mem_gb": 32, "cpus_per_task": 8},
    "plan": {"time_min": 240, "mem_gb": 64, "cpus_per_task": 16},
    "train": {"gpus_per_job": 1, "time_min": 24 * 60, "mem_gb": 64, "cpus_per_task": 12},
    "finalize": {"time_min": 240, "mem_gb": 64, "cpus_per_task": 16},
    "report": {"gpus_per_job": 1, "time_min": 8 * 60, "mem_gb": 64, "cpus_per_task": 12},
}
STEP_KINDS = tuple(_PAPER_RESOURCES)


def _each_kind(**resources) -> dict[str, dict]:
    return {kind: dict(resources) for kind in STEP_KINDS}


_DEMO = {
    "description": "CPU demo: one small configuration per stage, short AdamW schedule, fold 'all'",
    "device": "cpu",
    "find_best": False,
    "gpu_memory_target_gb": None,
    "target_spacing": None,
    "cv_folds": 5,
    "min_lesion_ml": DEMO_MIN_LESION_ML,
    "min_vertebra_ml": 0.5,
    "min_confidence": 0.0,
    "repair_vertebra_order": True,
    # lesions must touch a predicted vertebra: on the demo's 16 held-out cases this cleared 45 of its 67
    # false-positive lesions and no true one (benchmarks/results/bench_demo_postprocessing.csv)
    "spine_only": True,
    "spine_margin_mm": 0.0,
    "omp_wait_policy": "ACTIVE",  # one fold at a time on a machine of its own: see _cpu_environment
    "cpu_bf16": "off",  # float32 on every CPU: the same numbers everywhere (see CPU_BF16_ENV)
    "seed": 0,  # the trainers' seed: initial weights and batches, data loading in-process (deterministic)
    "resources": _each_kind(time_min=60, mem_gb=8, cpus_per_task=2),
    "stages": {
        stage: {"configurations": [f"demo_{stage}"], "folds": ["all"],
                "trainer": f"Spinemets{stage.capitalize()}DemoTrainer",
                "extra_configurations": {f"demo_{stage}": DEMO_CONFIGURATIONS[f"demo_{stage}"]},
                "budget_s": None, "budget_weight": DEMO_BUDGET_S[stage]}
        for stage in labels_mod.STAGE_NAMES
    },
}


def _derived(base: dict, stages: Mapping | None = None, **changes) -> dict:
    """A profile that is ``base`` but for ``changes`` (top-level keys) and per-stage ``stages`` changes."""
    out = copy.deepcopy(base)
    out.update(copy.deepcopy(changes))
    for stage in out["stages"]:
        out["stages"][stage].update(copy.deepcopy(dict(stages or {})))
    return out


_PAPER = {
    "description": "the paper's protocol: four configurations x 5 folds, 250 epochs, CUDA, best configuration",
    "device": "cuda",
    "find_best": True,
    "gpu_memory_target_gb": None,
    "target_spacing": None,
    "cv_folds": 5,
    "min_lesion_ml": 0.0,
    "min_vertebra_ml": 0.0,
    "min_confidence": 0.0,
    "repair_vertebra_order": False,
    "spine_only": False,  # the paper's model also found sternal lesions
    "resources": _PAPER_RESOURCES,
    "stages": {
        stage: {"configurations": list(PAPER_CONFIGURATIONS), "folds": [0, 1, 2, 3, 4],
                "trainer": "nnUNetTrainer_250epochs", "extra_configurations": {}}
        for stage in labels_mod.STAGE_NAMES
    },
}

#: What the ``smoke`` profile asks of nnU-Net's planner (in the plans' axis order, z, y, x): a
#: target spacing (``-overwrite_target_spacing``) and a GPU memory target (``-gpu_memory_target``,
#: GB; nnU-Net's default is 8). On the smoke cohort (``profiles/smoke.yaml``: 48 x 48 pixels of
#: 2.5 mm in-plane, a median of 110 slices of 3 mm) nnU-Net's defaults plan a 3d_fullres patch that
#: covers the whole median image, and the planner then drops 3d_lowres and the cascade. At
#: 4.5 x 3.75 x 3.75 mm the median image is 74 x 32 x 32 voxels, a third of the native one, so that
#: the folds' final validation (a sliding window over every validation case) takes seconds; with
#: 0.02 GB the planner then chooses a 32 x 14 x 14 patch, under a quarter of the image, a
#: three-stage U-Net, and so all four configurations. The planner decides the patch, the topology,
#: the batch size and the lowres spacing itself; only these two inputs differ from the paper's.
SMOKE_TARGET_SPACING = (4.5, 3.75, 3.75)
SMOKE_GPU_MEMORY_TARGET_GB = 0.02

_SMOKE = _derived(
    _PAPER, {"folds": [0, 1], "trainer": "SpinemetsSmokeTrainer"},
    description="the paper's protocol at a tiny scale on a CPU: four configurations x 2 folds of a 2-fold "
                "split, nnU-Net's default training for a few iterations, best configuration",
    device="cpu", gpu_memory_target_gb=SMOKE_GPU_MEMORY_TARGET_GB, target_spacing=list(SMOKE_TARGET_SPACING),
    cv_folds=2,
    resources=_each_kind(time_min=30, mem_gb=4, cpus_per_task=1))


#: The one registry of training profiles: per stage, what :func:`spinemets.training.nnunet.train` runs, the inference
#: clean-up, and the job resources per step kind. Plain data; the CLI's choices come from it, and
#: a run profile (``profiles/*.yaml``) names one of these in its ``profile`` parameter. The
#: profiles made from another entry differ from it only where they say so.
PROFILES: dict[str, dict] = {
    "paper": _PAPER,
    "smoke": _SMOKE,
    "demo": _DEMO,
    "gpu_check": _derived(
        _SMOKE, {"trainer": "SpinemetsGPUCheckTrainer"},
        description="scripts/gpu_check.sh: the smoke protocol (four configurations x 2 folds, nnU-Net's default "
                    "training) for a few epochs on CUDA",
        device="cuda", gpu_memory_target_gb=None, target_spacing=None,
        resources={**_each_kind(time_min=60, mem_gb=32, cpus_per_task=8),
                   "train": {"gpus_per_job": 1, "time_min": 60, "mem_gb": 32, "cpus_per_task": 8},
                   "report": {"gpus_per_job": 1, "time_min": 60, "mem_gb": 32, "cpus_per_task": 8}}),
    "ci": _derived(_DEMO, {"trainer": "SpinemetsCITrainer", "budget_weight": None},
                   description="tests: the demo's configurations, a few iterations",
                   omp_wait_policy="PASSIVE",  # tests and SLURM jobs may train side by side
                   resources=_each_kind(time_min=20, mem_gb=4, cpus_per_task=1)),
}

#: nnU-Net's residual-encoder presets (Isensee et al., "nnU-Net Revisited", MICCAI 2024), recommended by
#: nnU-Net's authors since 2024 over the original plans the paper used: size -> (planner, plans name).
#: ``nnUNetv2_plan_and_preprocess -pl PLANNER`` writes ``PLANS.json``; training and inference name it.
RESENC_PRESETS = {"m": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
                  "l": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans")}
for _size, (_planner, _plans) in RESENC_PRESETS.items():
    # the paper's protocol (and the GPU check's) with the residual-encoder preset: only the planner differs
    PROFILES[f"resenc_{_size}"] = _derived(
        _PAPER, planner=_planner, plans=_plans,
        description=f"the paper's protocol planned with nnU-Net's residual-encoder preset {_size.upper()} "
                    f"({_planner}, plans {_plans})")
    PROFILES[f"gpu_check_resenc_{_size}"] = _derived(
        PROFILES["gpu_check"], planner=_planner, plans=_plans,
        description=f"scripts/gpu_check.sh with nnU-Net's residual-encoder preset {_size.upper()} ({_planner})")


#: The environment variable the project's trainers read for CPU bfloat16 autocast (``auto``, on a CPU with
#: bfloat16 units; ``0``/``1``). A profile's ``cpu_bf16`` (``auto``, ``on``, ``off``) is its default; a value
#: the user set wins. The demo trains in float32 everywhere: with bfloat16 autocast on a Xeon with AMX
#: its held-out numbers differed from the float32 ones of an AVX2 CPU by up to 0.15 (lytic lesion F2) and
#: 0.04 (lytic Dice); in float32 on both by up to 0.09 (lytic lesion F2) and 0.02 (Dice)
#: (``benchmarks/results/bench_demo_reproducibility_*.md``).
CPU_BF16_ENV = "SPINEMETS_CPU_BF16"
_BF16_VALUES = {"auto": "auto", "on": "1", "off": "0"}


def cpu_bf16_setting(profile: str) -> str:
    """What the project's trainers will see in :data:`CPU_BF16_ENV` when this profile trains: the user's
    value where set, else the profile's ``cpu_bf16`` (``auto`` where it has none)."""
    user = os.environ.get(CPU_BF16_ENV, "").strip()
    if user:
        return user
    value = get_profile(profile).get("cpu_bf16", "auto")
    if value not in _BF16_VALUES:
        raise unknown_choice("cpu_bf16 setting", value, _BF16_VALUES, f"profile {profile!r}: cpu_bf16")
    return _BF16_VALUES[value]


def profile_plans(profile: str) -> str:
    """The nnU-Net plans a profile trains with: ``nnUNetPlans``, or the residual-encoder preset's."""
    return get_profile(profile).get("plans") or PLANS


def stage_budget(stage: str, profile: str, total_min: float | None = None) -> float | None:
    """A stage's training budget per fold in seconds: the profile's, or the share of ``total_min``
    (minutes of training for all stages) in the profile's proportions (``budget_s``, else
    ``budget_weight``); None when the profile trains for a fixed number of iterations and no total
    is given (the demo: a budget is an explicit opt-in)."""
    stages = get_profile(profile)["stages"]
    own = stage_plan(stage, profile).get("budget_s")
    if total_min is None:
        return own
    try:
        total = float(total_min)
    except (TypeError, ValueError):
        total = math.nan
    if not (math.isfinite(total) and total > 0):
        raise SpinemetsError(f"training budget {total_min!r} minutes: must be a positive number")
    budgets = {name: entry.get("budget_s") or entry.get("budget_weight") for name, entry in stages.items()}
    own = budgets[stage]
    if not all(budgets.values()):  # no proportions to keep: an equal share per stage
        return 60.0 * total / len(stages)
    return 60.0 * total * float(own) / sum(map(float, budgets.values()))


def planned_iterations(stage: str, profile: str, trainer: str | None = None) -> int | None:
    """The training iterations per fold of the stage's trainer (``EPOCHS x ITERATIONS`` of the
    project's trainers), or None for a trainer that is not one of them (e.g. nnU-Net's own)."""
    from spinemets.training.trainers import spinemets_trainers

    cls = getattr(spinemets_trainers, trainer or stage_plan(stage, profile)["trainer"], None)
    if cls is None or not hasattr(cls, "EPOCHS") or not hasattr(cls, "ITERATIONS"):
        return None
    return int(cls.EPOCHS) * int(cls.ITERATIONS)


def profile_names() -> tuple[str, ...]:
    return tuple(PROFILES)


def get_profile(profile: str) -> dict:
    if profile not in PROFILES:
        raise unknown_choice("training profile", profile, PROFILES, "--profile")
    return PROFILES[profile]


def stage_plan(stage: str, profile: str) -> dict:
    """The profile's entry for one stage (configurations, folds, trainer, extra configurations)."""
    labels_mod.check_stage(stage)
    return get_profile(profile)["stages"][stage]
