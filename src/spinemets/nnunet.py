"""nnU-Net v2 for the two stages: a workspace, training profiles, and thin wrappers over nnU-Net's commands.

The training step: it serves the command ``spinemets train`` and the training notebook
(``03_training``); the workspace layout (:class:`Workspace`) and the profile registry
(:data:`PROFILES`) serve every step.

**Workspace.** nnU-Net reads three folders from environment variables (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``) and finds trainers outside its package through
``nnUNet_extTrainer``. :class:`Workspace` derives them from one root folder
(``root/raw``, ``root/preprocessed``, ``root/results``); a variable the user has already set
wins. The variables are handed to the nnU-Net commands this module starts
(:meth:`Workspace.environment`) or set for the duration of a ``with`` block
(:meth:`Workspace.activated`) and restored afterwards; nothing is written to ``os.environ``
otherwise. ``nnUNet_extTrainer`` lists :data:`TRAINER_DIR` (the project's trainers) before any
folders the user listed.

**Profiles** (:data:`PROFILES`) are plain data: per stage, the nnU-Net configurations, folds,
trainer, device, and, for the short profiles, the extra plans configurations that
:func:`add_configuration` writes into the plans after planning; ``min_lesion_ml`` is the size
below which :func:`spinemets.inference.predict` clears a predicted lesion, ``min_vertebra_ml``
the size below which it clears a fragment of a vertebra label (both 0 for the paper), and
``repair_vertebra_order`` whether it puts the vertebra labels in the spine's order
(:func:`spinemets.postprocessing.repair_vertebra_order`; off for the paper), ``min_confidence``
the confidence below which it clears a predicted lesion (0 in every profile: none cleared):

* ``paper``: the protocol of the paper: ``2d``, ``3d_lowres``, ``3d_fullres`` and
  ``3d_cascade_fullres``, five folds, ``nnUNetTrainer_250epochs`` on CUDA, then
  ``nnUNetv2_find_best_configuration`` (which also picks the best ensemble of two configurations).
  When the planner drops ``3d_lowres`` (the image is already small enough for ``3d_fullres``),
  the cascade goes with it; this is logged and training continues with the rest.
* ``smoke``: the ``paper`` protocol at a tiny scale on a CPU (CI runs it end to end,
  ``tests/test_smoke.py``): the same configurations, programs, files and selection, with two
  folds of a two-fold split (``cv_folds``, written by :func:`write_splits`), nnU-Net's default
  training for a few iterations (``SpinemetsSmokeTrainer``), and two inputs to nnU-Net's planner
  (``target_spacing``, ``gpu_memory_target_gb``; see :data:`SMOKE_TARGET_SPACING`) under which it
  plans all four configurations for the small synthetic CTs.
* ``demo``: a design for 2 CPU cores (see the book's training chapter): each stage gets its own
  configuration inheriting from ``3d_fullres`` (coarser spacing and a long thin patch for the
  vertebrae, so the patch sees the anatomical anchors that fix vertebra identity; a small patch at
  native spacing for the lesions), a small U-Net, and a short-schedule trainer from
  :mod:`spinemets.trainers.spinemets_trainers`; fold ``all``.
* ``gpu_check``: the ``smoke`` protocol with nnU-Net's default plans on CUDA, a few epochs
  (``scripts/gpu_check.sh``).
* ``ci``: the demo's entry with a few iterations (its own trainer), for the tests.

Each profile also holds the clean-up of inference and the job resources per step kind
(``resources``), so that one lookup (:func:`get_profile`) answers every question about a profile.

**Wrappers**: :func:`plan_and_preprocess`, :func:`train`, :func:`find_best_configuration` and
:func:`ensemble` run nnU-Net's own command-line programs (which start
their own worker pools) with the workspace environment; :func:`load_predictor` returns an
initialised ``nnUNetPredictor`` for in-process inference (:mod:`spinemets.inference`).
Training resumes from the latest checkpoint (``--c``) when one exists and skips a fold whose
final checkpoint exists.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import domain
from . import labels as labels_mod
from .errors import SpinemetsError, unknown_choice
from .io import one_line, read_json, write_json

log = logging.getLogger(__name__)

#: The project's nnU-Net trainers, found by nnU-Net through ``nnUNet_extTrainer``.
TRAINER_DIR = Path(__file__).resolve().parent / "trainers"
DEFAULT_WORKSPACE = Path("workspace")
PLANS = "nnUNetPlans"
#: nnU-Net's checkpoint files of a fold: the final one, the latest (for resuming) and the best (EMA Dice).
CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST = "checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"
CHECKPOINTS = (CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST)
#: Written by the project's trainers into each fold's folder: the budget and what training reached.
TRAINING_RECORD = "spinemets_training.json"
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
#: stages in these proportions (the profile's ``budget_weight``; seconds of each fold's training
#: in the budgeted demo of before). The vertebra stage
#: needs several hundred iterations of its network before it tells the levels apart: on 2 AVX2
#: cores (about one iteration a second) 300 s gave 278 iterations and a held-out per-vertebra Dice
#: of 0.06; 700 iterations gave 0.69-0.76 before. 720 s buys about 700 there, and more than twice
#: as many on a CPU with bfloat16 units. The lesion stage's iterations cost a fifth of a vertebra one.
DEMO_BUDGET_S: dict[str, float] = {"vertebrae": 720.0, "metastases": 180.0}

#: The demo's smallest predicted lesion (mL), below which :func:`spinemets.inference.predict`
#: clears a component: half of the smallest lesion of the synthetic cohort (``min_lesion_voxels``
#: of the ``demo`` preset, 20 voxels of 2.5 x 2.5 x 3 mm = 0.375 mL), rounded down. A prediction
#: with IoU > 0.5 against a reference lesion holds more than half of that lesion's voxels, so a
#: smaller component can only be a false positive. The paper profile clears nothing (0).
DEMO_MIN_LESION_ML = 0.18

#: Job resources per step kind (plain data; :class:`spinemets.cluster.Resources` is built from it).
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
    "omp_wait_policy": "ACTIVE",  # one fold at a time on a machine of its own: see _cpu_environment
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


#: The one registry of training profiles: per stage, what :func:`train` runs, the inference
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
    from .trainers import spinemets_trainers

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


# --------------------------------------------------------------------------------------------
# Workspace
# --------------------------------------------------------------------------------------------

_FOLDER_VARS = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}


@dataclass(frozen=True)
class Workspace:
    """Every path of a run, under one root: the one place the workspace layout is written down.

    ========================  ============================================================
    ``raw``                   nnU-Net's raw datasets (``<root>/raw``, or ``nnUNet_raw``)
    ``preprocessed``          nnU-Net's preprocessed data (``<root>/preprocessed``)
    ``results``               trained models and their selection (``<root>/results``)
    ``manifest``              the cohort's manifest (``<root>/manifest.csv``, ``spinemets scan``)
    ``predictions``           what ``spinemets predict`` writes (``<root>/predictions/CASE/...``)
    ``evaluation(stage)``     what ``spinemets evaluate`` writes (``<root>/evaluation/<stage>``)
    ``test_images(stage)``    the held-out CTs of a stage's raw dataset (``imagesTs``)
    ``test_labels(stage)``    their reference label maps (``labelsTs``)
    ========================  ============================================================

    For the three nnU-Net folders, the environment variables ``nnUNet_raw``,
    ``nnUNet_preprocessed`` and ``nnUNet_results``, where the user set them, take precedence.
    The executed notebooks of a run go to the run folder of :func:`spinemets.runner.run`.
    """

    root: Path = DEFAULT_WORKSPACE

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    def _folder(self, var: str) -> Path:
        value = os.environ.get(var)
        return Path(value).resolve() if value else self.root / _FOLDER_VARS[var]

    @property
    def raw(self) -> Path:
        return self._folder("nnUNet_raw")

    @property
    def preprocessed(self) -> Path:
        return self._folder("nnUNet_preprocessed")

    @property
    def results(self) -> Path:
        return self._folder("nnUNet_results")

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def logs(self) -> Path:
        """The output of nnU-Net's programs when it goes to files (:data:`TOOL_OUTPUT_ENV`)."""
        return self.root / "logs"

    def evaluation(self, stage: str) -> Path:
        labels_mod.check_stage(stage)
        return self.root / "evaluation" / stage

    def test_images(self, stage: str) -> Path:
        return self.raw / self.dataset_name(stage) / "imagesTs"

    def test_labels(self, stage: str) -> Path:
        return self.raw / self.dataset_name(stage) / "labelsTs"

    def held_out_cases(self, stage: str) -> list[str]:
        """The case IDs of a stage's held-out CTs (``imagesTs``), sorted; [] without any."""
        folder = self.test_images(stage)
        return sorted(p.name[: -len("_0000.nii.gz")] for p in folder.glob("*_0000.nii.gz")) if folder.is_dir() else []

    def held_out_images(self) -> list[Path]:
        """The folders of the held-out CTs to predict: the vertebra dataset's ``imagesTs``, and the
        metastasis dataset's too when it holds other cases (the stages' data come from different
        datasets, e.g. vertebrae from TotalSegmentator's and lesions from the Zenodo release)."""
        folders = [self.test_images("vertebrae")]
        if self.held_out_cases("metastases") and self.held_out_cases("metastases") != self.held_out_cases("vertebrae"):
            folders.append(self.test_images("metastases"))
        return folders

    def variables(self, extra_trainer_dirs: Sequence[str | Path] = ()) -> dict[str, str]:
        """The nnU-Net variables only: the three folders and ``nnUNet_extTrainer``."""
        trainer_dirs = [str(TRAINER_DIR), *map(str, extra_trainer_dirs)]
        user = os.environ.get("nnUNet_extTrainer")
        if user:
            trainer_dirs += [p for p in user.split(os.pathsep) if p and p not in trainer_dirs]
        return {
            "nnUNet_raw": str(self.raw),
            "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results),
            "nnUNet_extTrainer": os.pathsep.join(trainer_dirs),
        }

    def environment(self, extra_trainer_dirs: Sequence[str | Path] = (), **overrides: str) -> dict[str, str]:
        """A full environment for a child process: the current one plus :meth:`variables` and ``overrides``."""
        env = dict(os.environ)
        env.update(self.variables(extra_trainer_dirs))
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    @contextlib.contextmanager
    def activated(self, extra_trainer_dirs: Sequence[str | Path] = ()) -> Iterator["Workspace"]:
        """Set the nnU-Net variables in ``os.environ`` for the ``with`` block; restore them afterwards."""
        new = self.variables(extra_trainer_dirs)
        old = {k: os.environ.get(k) for k in new}
        os.environ.update(new)
        try:
            yield self
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def dataset_name(self, stage: str, dataset_id: int | None = None) -> str:
        """``DatasetNNN_Name`` of a stage (default id from :data:`spinemets.labels.STAGES`)."""
        info = labels_mod.STAGES[stage] if stage in labels_mod.STAGES else labels_mod.labels(stage)
        dataset_id = info["dataset_id"] if dataset_id is None else int(dataset_id)
        return f"Dataset{dataset_id:03d}_{info['dataset_name']}"

    def plans_file(self, stage: str, dataset_id: int | None = None, plans: str = PLANS) -> Path:
        return self.preprocessed / self.dataset_name(stage, dataset_id) / f"{plans}.json"

    def model_folder(self, stage: str, configuration: str, trainer: str, dataset_id: int | None = None,
                     plans: str = PLANS) -> Path:
        """nnU-Net's training output folder ``results/DatasetNNN/TRAINER__PLANS__CONFIGURATION``."""
        return self.results / self.dataset_name(stage, dataset_id) / f"{trainer}__{plans}__{configuration}"


def _workspace(workspace: Workspace | str | Path | None) -> Workspace:
    if isinstance(workspace, Workspace):
        return workspace
    return Workspace(DEFAULT_WORKSPACE if workspace is None else Path(workspace))


# --------------------------------------------------------------------------------------------
# Running nnU-Net's commands
# --------------------------------------------------------------------------------------------


def _program(name: str) -> str:
    """Path of an nnU-Net console script: beside this Python first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SpinemetsError(f"nnU-Net program {name} not found beside {sys.executable} or on PATH; is nnunetv2 installed?")
    return found


#: Where the output of nnU-Net's programs (and of its in-process predictor) goes: ``console`` (the
#: default: as they print it) or ``log`` (only into files under :attr:`Workspace.logs`, or the
#: training log; the caller sees one line per program and, in a notebook, the last lines in a
#: collapsed block). The batch runner sets ``log`` for the notebooks it executes, so that the book
#: shows no tool logs; a value the user set wins.
TOOL_OUTPUT_ENV = "SPINEMETS_TOOL_OUTPUT"
TOOL_OUTPUTS = ("console", "log")


def tool_output() -> str:
    """The current :data:`TOOL_OUTPUT_ENV` setting (``console`` when unset)."""
    value = os.environ.get(TOOL_OUTPUT_ENV, "").strip().lower() or "console"
    if value not in TOOL_OUTPUTS:
        raise SpinemetsError(f"{TOOL_OUTPUT_ENV}={value!r}: must be one of {', '.join(TOOL_OUTPUTS)}")
    return value


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _shown_path(path: Path) -> str:
    """``path`` relative to the working folder where it lies below it (no machine-specific prefix on a page)."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def log_block(log_file: str | Path, title: str, lines: int = 30) -> None:
    """Show the last ``lines`` of a log file: collapsed (an HTML ``<details>`` block) in a notebook, as text elsewhere."""
    import html

    path = Path(log_file)
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    tail = text.splitlines()[-lines:]
    if not _in_notebook():
        print("\n".join(tail))
        return
    from IPython.display import HTML, display

    display(HTML(f"<details class=\"spinemets-log\"><summary>log: {html.escape(title)} (last {len(tail)} lines of "
                 f"<code>{html.escape(_shown_path(path))}</code>)</summary><pre>{html.escape(chr(10).join(tail))}"
                 "</pre></details>"))


@contextlib.contextmanager
def captured_output(workspace: Workspace, name: str) -> Iterator[None]:
    """With :data:`TOOL_OUTPUT_ENV` ``log``: what nnU-Net prints in this process (its messages, warnings
    and progress bars) goes to ``logs/NAME.log`` of the workspace instead of the console or the notebook."""
    if tool_output() != "log":
        yield
        return
    workspace.logs.mkdir(parents=True, exist_ok=True)
    with open(workspace.logs / f"{name}.log", "a", encoding="utf-8") as fh, \
            contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def verify_dataset(folder: str | Path, workspace: Workspace | str | Path | None = None, jobs: int = 1) -> None:
    """nnU-Net's own ``verify_dataset_integrity`` on a raw dataset folder, in this process; its
    messages go where :data:`TOOL_OUTPUT_ENV` says (``logs/verify_dataset_integrity.log`` with ``log``).
    Raises :class:`SpinemetsError` naming the folder when nnU-Net finds a problem."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = Path(folder)
    ws = _workspace(workspace)
    try:
        with captured_output(ws, "verify_dataset_integrity"):
            verify_dataset_integrity(str(folder), num_processes=max(1, int(jobs)))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise SpinemetsError(f"{folder}: nnU-Net's dataset integrity check failed: {one_line(exc)[:300]}") from None
    print(f"{folder.name}: nnU-Net's dataset integrity check passed")


def run_nnunet(program: str, args: Sequence[str], workspace: Workspace, log_file: Path | None = None,
               extra_trainer_dirs: Sequence[str | Path] = (), env: Mapping[str, str] | None = None) -> None:
    """Run one nnU-Net program with the workspace environment; its output goes to the console (and ``log_file``).

    With :data:`TOOL_OUTPUT_ENV` ``log`` it goes only to ``log_file`` (default ``logs/PROGRAM.log`` of
    the workspace), and one line says how long the program took and where its output is.
    The program runs in its own process group: when it ends (or this call is interrupted), what
    is left of that group (data-loading workers of a killed training hold its output open) is
    terminated. A non-zero exit raises :class:`SpinemetsError` with the command and the last lines of its output.
    """
    cmd = [_program(program), *map(str, args)]
    log.info("running %s", " ".join(cmd))
    environment = workspace.environment(extra_trainer_dirs, **dict(env or {}))
    environment.setdefault("PYTHONUNBUFFERED", "1")  # its lines as they come, not in blocks through the pipe
    quiet = tool_output() == "log"
    if quiet and log_file is None:
        log_file = workspace.logs / f"{program}.log"
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    started = time.monotonic()
    handle = open(log_file, "a", encoding="utf-8") if log_file else contextlib.nullcontext()
    with handle as fh:
        if fh and quiet:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
        proc = subprocess.Popen(cmd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)

        def relay():
            for line in proc.stdout:
                if not quiet:
                    sys.stdout.write(line)
                if fh:
                    fh.write(line)
                tail[:] = (tail + [line.rstrip()])[-15:]

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        try:
            code = proc.wait()
        finally:
            _end_group(proc.pid)
            reader.join(timeout=10)
    if quiet and code == 0:
        print(f"{program}: done in {time.monotonic() - started:.0f} s; its output is in {_shown_path(log_file)}")
    if code != 0:
        for line in tail:
            log.error("%s: %s", program, line)
        where = log_file if log_file is not None else program
        raise SpinemetsError(f"{where}: {program} failed (exit {code}): {' '.join(cmd)}; its last lines are above"
                             + (f", all of it in {log_file}" if log_file is not None else ""))


def _end_group(pgid: int) -> None:
    """Terminate what is left of a finished program's process group (its orphaned workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


def add_configuration(plans_file: str | Path, name: str, spec: Mapping, base: str = "3d_fullres") -> dict:
    """Add (or replace) a configuration ``name`` inheriting from ``base`` in an nnU-Net plans file.

    ``spec`` keys: ``patch_size``, ``features_per_stage`` (one entry per U-Net stage),
    ``strides`` (per stage, per axis), optional ``batch_size`` and ``spacing``. Kernels are 3 and
    two convolutions per stage, as nnU-Net plans them. When ``spacing`` differs from the base's,
    the configuration gets its own ``data_identifier`` (``PLANS_name_SPACING``) and must be preprocessed
    (``nnUNetv2_preprocess -c name``); otherwise it reuses the base's preprocessed data. The
    patch must be divisible by the product of the strides on each axis. Returns the new entry.
    """
    plans_file = Path(plans_file)
    try:
        plans = json.loads(plans_file.read_text(encoding="utf-8"))
        parent = plans["configurations"][base]
    except FileNotFoundError:
        raise SpinemetsError(f"{plans_file}: plans file not found; plan the dataset first") from None
    except KeyError:
        raise SpinemetsError(f"{plans_file}: no configuration {base!r} to inherit from") from None
    features, strides, patch = list(spec["features_per_stage"]), [list(s) for s in spec["strides"]], list(spec["patch_size"])
    if len(features) != len(strides):
        raise SpinemetsError(f"configuration {name!r}: {len(features)} feature sizes but {len(strides)} strides")
    for axis, size in enumerate(patch):
        factor = 1
        for s in strides:
            factor *= s[axis]
        if size % factor:
            raise SpinemetsError(f"configuration {name!r}: patch {patch} axis {axis} is not divisible by {factor}")
    architecture = copy.deepcopy(parent["architecture"])
    n = len(features)
    architecture["arch_kwargs"].update(
        n_stages=n, features_per_stage=features, strides=strides, kernel_sizes=[[3, 3, 3]] * n,
        n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1))
    entry = {"inherits_from": base, "patch_size": patch, "batch_size": int(spec.get("batch_size", parent["batch_size"])),
             "architecture": architecture}
    spacing = spec.get("spacing")
    if spacing is not None and [float(v) for v in spacing] != [float(v) for v in parent["spacing"]]:
        entry["spacing"] = [float(v) for v in spacing]
        # the spacing is part of the identifier, so changing it never reuses stale preprocessed data
        tag = "x".join(f"{v:g}" for v in entry["spacing"])
        entry["data_identifier"] = f"{plans.get('plans_name', PLANS)}_{name}_{tag}"
    plans["configurations"][name] = entry
    write_json(plans_file, plans)
    return entry


def planned_configurations(plans_file: str | Path) -> list[str]:
    plans = read_json(plans_file, "nnU-Net plans")
    return list(plans["configurations"])


def plan_and_preprocess(stage: str, profile: str = "demo", configurations: Sequence[str] | None = None,
                        workspace: Workspace | str | Path | None = None, dataset_id: int | None = None,
                        processes: int = 2, force: bool = False) -> list[str]:
    """Plan a stage's raw dataset, add the profile's extra configurations, preprocess what training needs.

    Runs ``nnUNetv2_plan_and_preprocess --no_pp --verify_dataset_integrity`` (fingerprint and plans),
    :func:`add_configuration` for each of the profile's extra configurations, then
    ``nnUNetv2_preprocess -c ...`` for the configurations to train (once per distinct data
    identifier; the cascade reuses 3d_fullres data). Skipped when the plans and the preprocessed
    folders exist, unless ``force``. Returns the configurations that can be trained: the requested
    ones minus ``3d_lowres``/``3d_cascade_fullres`` when the planner dropped them (logged).
    """
    ws = _workspace(workspace)
    entry = stage_plan(stage, profile)
    wanted = list(configurations or entry["configurations"])
    name = ws.dataset_name(stage, dataset_id)
    if not (ws.raw / name / "dataset.json").exists():
        raise SpinemetsError(f"{ws.raw / name}: raw dataset not found; import it first (spinemets import --stage {stage})")
    plans_file = ws.plans_file(stage, dataset_id)
    if force or not plans_file.exists():
        prof = get_profile(profile)
        planner = []  # the profile's inputs to nnU-Net's planner, where they differ from nnU-Net's defaults
        if prof["gpu_memory_target_gb"]:
            planner += ["-gpu_memory_target", str(prof["gpu_memory_target_gb"])]
        if prof["target_spacing"]:
            planner += ["-overwrite_target_spacing", *map(str, prof["target_spacing"])]
        run_nnunet("nnUNetv2_plan_and_preprocess", ["-d", name.split("_")[0][7:], "--no_pp", "-npfp", str(processes),
                                                    "--verify_dataset_integrity", *planner], ws)
    for cfg_name, spec in entry["extra_configurations"].items():
        add_configuration(plans_file, cfg_name, spec)
    available = planned_configurations(plans_file)
    usable = []
    for cfg in wanted:
        if cfg in available:
            usable.append(cfg)
        elif cfg in ("3d_lowres", "3d_cascade_fullres"):
            log.warning("nnU-Net's planner dropped 3d_lowres for %s (the 3d_fullres patch already covers enough of "
                        "the image): training continues without %s", name, cfg)
            print(f"NOTE: {cfg} is not in the plans of {name} (the planner dropped 3d_lowres); continuing without it.")
        else:
            raise SpinemetsError(f"{plans_file}: configuration {cfg!r} not planned; planned: {', '.join(available)}")
    plans = read_json(plans_file, "nnU-Net plans")
    todo = {}
    needed = list(usable)
    for cfg in usable:  # 3d_lowres's validation exports its predictions on the data of its next stage
        following = plans["configurations"][cfg].get("next_stage") or []
        needed += [following] if isinstance(following, str) else list(following)
    for cfg in needed:  # the cascade's data is 3d_fullres's (same identifier), preprocessed once
        ident = _data_identifier(plans, cfg)
        if force or not (ws.preprocessed / name / ident).is_dir():
            todo.setdefault(ident, cfg)
    if todo:
        run_nnunet("nnUNetv2_preprocess", ["-d", name.split("_")[0][7:], "-c", *todo.values(),
                                           "-np", *[str(processes)] * len(todo)], ws)
    return usable


def _data_identifier(plans: dict, configuration: str) -> str:
    cfg = plans["configurations"][configuration]
    while "data_identifier" not in cfg and "inherits_from" in cfg:
        cfg = plans["configurations"][cfg["inherits_from"]]
    return cfg.get("data_identifier", f"{plans.get('plans_name', PLANS)}_{configuration}")


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def _fold_arg(fold) -> str:
    return str(fold)


@dataclass(frozen=True)
class TrainingOptions:
    """What :func:`train` may do other than the profile says; every field's default is the profile's.

    ``trainer`` replaces the profile's trainer (found in ``extra_trainer_dirs`` too);
    ``find_best`` runs (or skips) :func:`find_best_configuration` after training; ``npz`` saves
    the validation probabilities the selection ensembles (default: when selecting); ``threads``
    limits torch's CPU threads in the project's trainers (e.g. 1 to train two stages side by side
    on two cores); ``num_gpus`` > 1 is nnU-Net's own multi-GPU training (``-num_gpus``);
    ``dataset_id`` replaces the stage's default dataset id; ``budget_s`` replaces the profile's
    wall-clock training budget per fold (the project's trainers fit their iterations into it; 0
    turns the budget off, so that the trainer's own iteration count applies); ``seed`` replaces the
    profile's training seed (the project's trainers: deterministic initial weights and batches).
    """

    trainer: str | None = None
    extra_trainer_dirs: tuple[str | Path, ...] = ()
    find_best: bool | None = None
    npz: bool | None = None
    threads: int | None = None
    num_gpus: int = 1
    dataset_id: int | None = None
    budget_s: float | None = None
    seed: int | None = None


def train(stage: str, profile: str = "demo", configurations: Sequence[str] | None = None,
          folds: Sequence[int | str] | None = None, device: str | None = None,
          workspace: Workspace | str | Path | None = None, *, options: TrainingOptions | None = None) -> dict:
    """Plan, preprocess and train one stage as the profile says; return where the models are.

    For each configuration and fold (progress bars): skip it when ``checkpoint_final.pth``
    exists, resume it (``nnUNetv2_train ... --c``) when a latest/best checkpoint exists, train it
    from scratch otherwise. The paper profile saves validation probabilities (``--npz``) and
    finally runs :func:`find_best_configuration`. ``options`` (:class:`TrainingOptions`) changes
    the trainer, the selection, threads and GPUs. Returns ``{"dataset", "trainer", "plans",
    "configurations", "folds", "model_folders": {configuration: path}, "best": ... or None,
    "train_wall_s", "train_cpu_s"}`` (wall-clock and CPU seconds of the training commands; on a
    shared machine CPU seconds are the steadier measure).
    """
    opts = options or TrainingOptions()
    trainer, extra_trainer_dirs, find_best, npz = opts.trainer, opts.extra_trainer_dirs, opts.find_best, opts.npz
    threads, num_gpus, dataset_id = opts.threads, opts.num_gpus, opts.dataset_id
    ws = _workspace(workspace)
    prof = get_profile(profile)
    entry = stage_plan(stage, profile)
    trainer = trainer or entry["trainer"]
    folds = [parse_fold(f) for f in (folds or entry["folds"])]
    device = device or prof["device"]
    if device not in ("cpu", "cuda"):
        raise SpinemetsError(f"device must be cpu or cuda, not {device!r}")
    if int(num_gpus) < 1 or (int(num_gpus) > 1 and device != "cuda"):
        raise SpinemetsError(f"num_gpus {num_gpus}: must be 1, or more with device cuda")
    find_best = prof["find_best"] if find_best is None else find_best
    npz = find_best if npz is None else npz  # the selection ensembles the folds' validation probabilities
    usable = plan_and_preprocess(stage, profile, configurations, ws, dataset_id)
    name = ws.dataset_name(stage, dataset_id)
    write_splits(stage, prof["cv_folds"], ws, dataset_id)
    numbered = [f for f in folds if f != "all"]
    if numbered and max(numbered) >= prof["cv_folds"]:
        raise SpinemetsError(f"fold {max(numbered)}: profile {profile!r} splits the training cases into "
                             f"{prof['cv_folds']} folds (0-{prof['cv_folds'] - 1})")
    log_file = ws.results / name / "spinemets_train.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = _cpu_environment(prof.get("omp_wait_policy", "PASSIVE")) if device == "cpu" else {}
    if threads:
        env["SPINEMETS_TORCH_THREADS"] = str(int(threads))  # honoured by the project's trainers
    budget = entry.get("budget_s") if opts.budget_s is None else opts.budget_s
    if budget is not None and not (math.isfinite(float(budget)) and float(budget) >= 0):
        raise SpinemetsError(f"training budget {budget!r}: must be a finite number of seconds >= 0")
    env["SPINEMETS_TRAIN_BUDGET_S"] = f"{float(budget):g}" if budget else ""  # honoured by the project's trainers
    seed = prof.get("seed") if opts.seed is None else opts.seed
    env["SPINEMETS_TRAIN_SEED"] = "" if seed is None else str(int(seed))  # honoured by the project's trainers
    wall0, cpu0 = time.perf_counter(), _children_cpu_seconds()
    trained = False
    for cfg in tqdm(usable, desc=f"{stage}: configurations", unit="config"):
        for fold in tqdm(folds, desc=f"{stage} {cfg}: folds", unit="fold", leave=False):
            out = ws.model_folder(stage, cfg, trainer, dataset_id) / f"fold_{fold}"
            if (out / CHECKPOINT_FINAL).exists():
                log.info("%s: already trained, skipped", out)
                continue
            args = [name.split("_")[0][7:], cfg, _fold_arg(fold), "-tr", trainer, "-p", PLANS, "-device", device]
            if any((out / f).exists() for f in (CHECKPOINT_LATEST, CHECKPOINT_BEST)):
                args.append("--c")
            if npz:
                args.append("--npz")
            if num_gpus > 1:
                args += ["-num_gpus", str(int(num_gpus))]  # nnU-Net's own multi-GPU (DDP) training
            run_nnunet("nnUNetv2_train", args, ws, log_file, extra_trainer_dirs, env)
            trained = True
            if tool_output() == "log" and _in_notebook():
                log_block(log_file, f"nnUNetv2_train {cfg} fold {fold}")
    records = training_records(stage, usable, folds, trainer, ws, dataset_id)
    if budget and not records:
        log.warning("%s: trainer %s keeps no training record, so it did not train for the %g s budget "
                    "(only the project's trainers do); it trained for its own number of iterations",
                    name, trainer, float(budget))
    seconds = {"train_wall_s": round(time.perf_counter() - wall0, 1),
               "train_cpu_s": round(_children_cpu_seconds() - cpu0, 1)}
    built: dict = {}  # one dataset, one fingerprint: its raw CTs are read once for all configurations
    for cfg in usable:  # what each model was trained on, for the domain check of inference
        domain.write_record(ws.model_folder(stage, cfg, trainer, dataset_id), ws.raw / name, built)
    best = None
    if find_best:
        best = None if trained else _previous_selection(ws.results / name, usable, folds, trainer)
        if best is None:
            best = find_best_configuration(stage, usable, folds, trainer, ws, dataset_id, env)
        else:
            log.info("%s: every fold was trained before and the selection for them exists; reused", name)
    return {"dataset": name, "trainer": trainer, "plans": PLANS, "configurations": usable, "folds": folds,
            "model_folders": {cfg: str(ws.model_folder(stage, cfg, trainer, dataset_id)) for cfg in usable},
            "best": best, "budget_s": float(budget) if budget and records else None,
            "training": records, **seconds}


TRAINING_COLUMNS = ("budget_s", "elapsed_s", "epochs", "iterations", "seconds_per_iteration", "bf16_autocast", "seed")


def training_table(records: Mapping[str, Mapping]) -> list[dict]:
    """:func:`training_records` as rows for a table: model, budget, time, epochs, iterations, cost, CPU."""
    return [{"model": name, **{key: rec.get(key) for key in TRAINING_COLUMNS},
             "cpu": (rec.get("cpu") or {}).get("torch_capability")} for name, rec in records.items()]


def training_records(stage: str, configurations: Sequence[str], folds: Sequence[int | str], trainer: str,
                     workspace: Workspace | str | Path | None = None, dataset_id: int | None = None) -> dict:
    """What each fold's training reached (``spinemets_training.json`` of the project's trainers):
    ``{"configuration/fold_F": record}``; folds trained by other trainers are left out."""
    ws = _workspace(workspace)
    out = {}
    for cfg in configurations:
        for fold in folds:
            path = ws.model_folder(stage, cfg, trainer, dataset_id) / f"fold_{fold}" / TRAINING_RECORD
            if path.is_file():
                out[f"{cfg}/fold_{fold}"] = read_json(path, "training record")
    return out


SPLITS_FILE = "splits_final.json"


def write_splits(stage: str, n_folds: int, workspace: Workspace | str | Path | None = None,
                 dataset_id: int | None = None) -> Path | None:
    """The cross-validation split of a stage's training cases into ``n_folds`` folds.

    With 5 folds nothing is written: nnU-Net's trainer makes its own 5-fold split
    (``splits_final.json`` in the preprocessed folder) the first time it trains. With another
    number (the ``smoke`` profile's 2), the split is made by nnU-Net's own
    ``generate_crossval_split`` (the same function and seed its trainer uses) and written there
    before training, where nnU-Net reads it. An existing split file with another number of folds
    is an error: models trained on it would not match. Returns the file, or None.
    """
    ws = _workspace(workspace)
    name = ws.dataset_name(stage, dataset_id)
    path = ws.preprocessed / name / SPLITS_FILE
    if path.exists():
        splits = read_json(path, "nnU-Net's cross-validation split")
        if n_folds != 5 and (not isinstance(splits, list) or len(splits) != n_folds):
            raise SpinemetsError(f"{path}: holds {len(splits) if isinstance(splits, list) else 'no'} folds, "
                                 f"but the profile splits into {n_folds}; remove it to split again")
        return path
    if n_folds == 5:
        return None
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    dataset = read_json(ws.raw / name / "dataset.json", "nnU-Net dataset")
    suffix = dataset.get("file_ending", ".nii.gz")
    cases = sorted(p.name[: -len(suffix)] for p in (ws.raw / name / "labelsTr").glob(f"*{suffix}"))
    if len(cases) < n_folds:
        raise SpinemetsError(f"{ws.raw / name}: {len(cases)} training cases cannot be split into {n_folds} folds")
    write_json(path, generate_crossval_split(cases, seed=12345, n_splits=n_folds))
    return path


def _cpu_environment(wait_policy: str = "PASSIVE") -> dict[str, str]:
    """Settings for training on a CPU, unless the user set them.

    * ``OMP_WAIT_POLICY``: nnU-Net runs torch with one thread per core. ``PASSIVE`` (the default
      here): a thread that waits sleeps at once; with OpenMP's busy-waiting, a core taken by any
      other process stalls every parallel region (we measured 2 threads at 3.5x the time of 1
      thread on a busy 2-core machine; passive waiting removed the loss). ``ACTIVE``: waiting
      threads spin, which saves the wake-up of every parallel region: on an idle 2-core AVX2 CPU a
      demo iteration took 1.14 s instead of 1.38 s (vertebrae) and 0.165 s instead of 0.244 s
      (lesions), ``benchmarks/bench_train.py``. The demo profile, which trains one fold at a time
      on a machine of its own, asks for it (``omp_wait_policy`` of :data:`PROFILES`).
    * ``nnUNet_n_proc_DA=1``: one data-loading worker; without augmentation it is idle most of the time.
    * ``nnUNet_def_n_proc``: the processes of nnU-Net's final validation (export of the
      predictions and probabilities); nnU-Net's default, 8, each a new Python importing torch,
      costs more start-up than the export of a few small cases on 2 cores.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", wait_policy),
            "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "1"),
            "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", str(min(2, os.cpu_count() or 1)))}


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes (nnU-Net's programs and their workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def parse_fold(fold) -> int | str:
    """A fold as nnU-Net takes it: a number, or "all" (train on every case)."""
    if str(fold) == "all":
        return "all"
    try:
        return int(fold)
    except ValueError:
        raise SpinemetsError(f"fold must be a number or 'all', not {fold!r}") from None


SELECTION_RECORD = "spinemets_selection.json"


def find_best_configuration(stage: str, configurations: Sequence[str], folds: Sequence[int | str], trainer: str,
                            workspace: Workspace | str | Path | None = None, dataset_id: int | None = None,
                            env: Mapping[str, str] | None = None) -> dict:
    """Run ``nnUNetv2_find_best_configuration`` (cross-validation Dice of each configuration and of
    the ensembles of two) and return its ``inference_information.json``. ``env``: extra environment
    variables for the program (:func:`train` passes its CPU settings, among them the number of
    processes, nnU-Net's ``nnUNet_def_n_proc``).

    What the selection was made for (configurations, folds, trainer) is recorded beside it
    (:data:`SELECTION_RECORD`), so that a later :func:`train` that trains nothing new reuses it.
    """
    ws = _workspace(workspace)
    name = ws.dataset_name(stage, dataset_id)
    run_nnunet("nnUNetv2_find_best_configuration",
               [name.split("_")[0][7:], "-c", *configurations, "-tr", trainer, "-p", PLANS,
                "-f", *map(str, folds)], ws, env=env)
    info = ws.results / name / "inference_information.json"
    if not info.exists():
        return {}
    write_json(ws.results / name / SELECTION_RECORD, _selection_key(configurations, folds, trainer))
    return read_json(info, "nnU-Net's selection")


def _selection_key(configurations, folds, trainer) -> dict:
    return {"configurations": list(configurations), "folds": [str(f) for f in folds], "trainer": trainer}


def _previous_selection(results: Path, configurations, folds, trainer) -> dict | None:
    """The existing ``inference_information.json`` when it was made for exactly these models, else None."""
    try:
        key = read_json(results / SELECTION_RECORD, "selection record")
        info = read_json(results / "inference_information.json", "nnU-Net's selection")
    except SpinemetsError:  # missing or damaged: select again
        return None
    return info if key == _selection_key(configurations, folds, trainer) else None


def ensemble(input_folders: Sequence[str | Path], output_folder: str | Path,
             workspace: Workspace | str | Path | None = None, processes: int = 2) -> Path:
    """Average the softmax outputs of several predictions (``nnUNetv2_ensemble``); folders hold ``.npz`` files."""
    ws = _workspace(workspace)
    run_nnunet("nnUNetv2_ensemble", ["-i", *map(str, input_folders), "-o", str(output_folder), "-np", str(processes)], ws)
    return Path(output_folder)


def trained_models(stage: str, profile: str, workspace: Workspace | str | Path | None = None,
                   dataset_id: int | None = None) -> list[dict]:
    """The model(s) inference uses for a stage: ``[{"folder", "configuration", "folds", "trainer"}]``.

    With several entries (an ensemble chosen by find_best_configuration) their probabilities are
    averaged. Raises :class:`SpinemetsError` naming the missing folder when a stage is not trained.
    """
    ws = _workspace(workspace)
    entry = stage_plan(stage, profile)
    trainer = entry["trainer"]
    _, best = _selected(stage, profile, ws, dataset_id)
    chosen = [(model["configuration"], model["trainer"]) for model in best.get("selected_model_or_models", [])]
    if not chosen:
        cfgs = [c for c in entry["configurations"] if (ws.model_folder(stage, c, trainer, dataset_id)).is_dir()]
        preferred = [c for c in ("3d_fullres", *entry["configurations"]) if c in cfgs]
        if not preferred:
            first = ws.model_folder(stage, entry["configurations"][0], trainer, dataset_id)
            raise SpinemetsError(f"{first}: no trained {stage} model of profile {profile!r}; "
                                 f"train it first (spinemets train --stage {stage} --profile {profile})")
        chosen = [(preferred[0], trainer)]
    models = []
    for cfg, tr in chosen:
        folder = ws.model_folder(stage, cfg, tr, dataset_id)
        folds = sorted(p.name[5:] for p in folder.glob("fold_*")
                       if (p / CHECKPOINT_FINAL).exists() or (p / CHECKPOINT_BEST).exists())
        if not folds:
            raise SpinemetsError(f"{folder}: no fold with a checkpoint; training did not finish")
        models.append({"folder": str(folder), "configuration": cfg, "trainer": tr,
                       "folds": [f if f == "all" else int(f) for f in folds]})
    return models


def _selected(stage: str, profile: str, ws: Workspace, dataset_id: int | None) -> tuple[Path, dict]:
    """``inference_information.json`` of a stage and its ``best_model_or_ensemble`` ({} when the
    profile selects nothing or no selection was made); a file that is not JSON is an error."""
    info_file = ws.results / ws.dataset_name(stage, dataset_id) / "inference_information.json"
    if not get_profile(profile)["find_best"]:
        return info_file, {}
    info = read_json(info_file, "nnU-Net's selection", missing={})
    return info_file, info.get("best_model_or_ensemble", {}) if isinstance(info, dict) else {}


def selected_postprocessing(stage: str, profile: str, workspace: Workspace | str | Path | None = None,
                            dataset_id: int | None = None) -> Path | None:
    """nnU-Net's postprocessing for the selected model: the ``postprocessing.pkl`` that
    ``nnUNetv2_find_best_configuration`` determined on the cross-validation (e.g. keep only the
    largest component of a label, where that raised the Dice) and names in
    ``inference_information.json``. None when the profile selects nothing or no selection was made.

    The file is looked up where the selection named it, else at the same place under this
    workspace's ``nnUNet_results`` (a workspace copied from a cluster). Raises
    :class:`SpinemetsError` when it is named but found in neither place.
    """
    ws = _workspace(workspace)
    name = ws.dataset_name(stage, dataset_id)
    info_file, best = _selected(stage, profile, ws, dataset_id)
    named = best.get("postprocessing_file")
    if not named:
        return None
    path = Path(named)
    if path.exists():
        return path
    parts = path.parts
    moved = ws.results / name / Path(*parts[parts.index(name) + 1:]) if name in parts[:-1] else None
    if moved is not None and moved.exists():
        return moved
    raise SpinemetsError(f"{info_file}: names the postprocessing file {named}, which is missing"
                         + (f" (also not at {moved})" if moved is not None else ""))


def apply_postprocessing(segmentation: np.ndarray, postprocessing_file: str | Path) -> np.ndarray:
    """Apply a ``postprocessing.pkl`` of nnU-Net (its functions and their arguments) to a label map."""
    import pickle

    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing as nnunet_apply

    with open(postprocessing_file, "rb") as fh:  # written by nnU-Net on this project's own training
        functions, kwargs = pickle.load(fh)
    return nnunet_apply(segmentation, functions, kwargs)


def load_predictor(model: Mapping, device: str = "cpu", tta: bool = False, workspace: Workspace | str | Path | None = None,
                   threads: int | None = None):
    """nnU-Net's three-step predictor: construct, initialise from the model folder; ready for ``predict_*``.

    ``model`` is one entry of :func:`trained_models`. The final checkpoint is used where present,
    the best one otherwise. ``tta`` enables mirroring (where the trainer allows it).
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    if device == "cuda" and not torch.cuda.is_available():
        raise SpinemetsError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    if threads:
        torch.set_num_threads(threads)
    folder = Path(model["folder"])
    checkpoint = CHECKPOINT_FINAL
    if not all((folder / f"fold_{f}" / checkpoint).exists() for f in model["folds"]):
        checkpoint = CHECKPOINT_BEST
    check_model_folder(folder, model["folds"], checkpoint)
    with captured_output(_workspace(workspace), "nnUNetPredictor"):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                    perform_everything_on_device=device == "cuda", device=torch.device(device),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    ws = _workspace(workspace)
    with ws.activated(), captured_output(ws, "nnUNetPredictor"):
        try:
            predictor.initialize_from_trained_model_folder(str(folder), use_folds=tuple(model["folds"]),
                                                           checkpoint_name=checkpoint)
        except SpinemetsError:
            raise
        except Exception as exc:  # nnU-Net's own failure on a damaged folder: name the folder instead
            raise SpinemetsError(f"{folder}: cannot load the trained model ({type(exc).__name__}: "
                                 f"{one_line(exc)[:200]}); the model folder is damaged or "
                                 "incomplete: train it again") from None
    return predictor


def check_model_folder(folder: str | Path, folds: Sequence[int | str], checkpoint: str = CHECKPOINT_FINAL) -> None:
    """A trained nnU-Net model folder, checked before nnU-Net loads it: ``dataset.json`` and
    ``plans.json`` are JSON objects with the keys inference needs, and each fold's checkpoint is a
    loadable PyTorch file holding network weights. Raises :class:`SpinemetsError` naming the file."""
    import torch

    folder = Path(folder)
    needed = {"dataset.json": ("labels", "channel_names"), "plans.json": ("configurations", "plans_name")}
    for name, keys in needed.items():
        data = read_json(folder / name, f"{name} of the model")
        if not isinstance(data, dict) or any(k not in data for k in keys):
            raise SpinemetsError(f"{folder / name}: not nnU-Net's {name} (expected the keys {', '.join(keys)})")
    for fold in folds:
        path = folder / f"fold_{fold}" / checkpoint
        if not path.is_file():
            raise SpinemetsError(f"{path}: checkpoint not found; training of fold {fold} did not finish")
        try:
            saved = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated, garbage bytes, not a torch file
            raise SpinemetsError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: "
                                 f"{one_line(exc)[:150]})") from None
        if not isinstance(saved, dict) or not {"network_weights", "init_args", "trainer_name"} <= set(saved):
            raise SpinemetsError(f"{path}: not an nnU-Net checkpoint (no network_weights, init_args or trainer_name)")
