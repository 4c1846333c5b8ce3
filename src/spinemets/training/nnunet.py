"""nnU-Net v2 for the two stages: thin wrappers over nnU-Net's planning, training, selection and predictor.

The training step: it serves the command ``spinemets train`` and the training notebook
(``03_training``). What it trains comes from the training profiles
(:data:`spinemets.training.profiles.PROFILES`), where it reads and writes from the workspace
(:class:`spinemets.paths.Workspace`), and nnU-Net's programs run through
:func:`spinemets.training.programs.run_nnunet`.

**Wrappers**: :func:`plan_and_preprocess`, :func:`train`, :func:`find_best_configuration` and
:func:`ensemble` run nnU-Net's own command-line programs (which start
their own worker pools) with the workspace environment; :func:`load_predictor` returns an
initialised ``nnUNetPredictor`` for in-process inference (:mod:`spinemets.inference.predict`).
Training resumes from the latest checkpoint (``--c``) when one exists and skips a fold whose
final checkpoint exists.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from spinemets import domain
from spinemets.errors import SpinemetsError
from spinemets.fileio import read_json, write_json
from spinemets.errors import one_line
from spinemets.paths import PLANS, Workspace, workspace_of
from spinemets.training.profiles import CPU_BF16_ENV, cpu_bf16_setting, get_profile, profile_plans, stage_plan
from spinemets.training.programs import captured_output, children_cpu_seconds, cpu_environment, in_notebook, log_block, \
    run_nnunet, tool_output

log = logging.getLogger(__name__)

#: nnU-Net's checkpoint files of a fold: the final one, the latest (for resuming) and the best (EMA Dice).
CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST = "checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth"
CHECKPOINTS = (CHECKPOINT_FINAL, CHECKPOINT_LATEST, CHECKPOINT_BEST)
#: Written by the project's trainers into each fold's folder: the budget and what training reached.
TRAINING_RECORD = "spinemets_training.json"


def verify_dataset(folder: str | Path, workspace: Workspace | str | Path | None = None, jobs: int = 1) -> None:
    """nnU-Net's own ``verify_dataset_integrity`` on a raw dataset folder, in this process; its
    messages go where :data:`TOOL_OUTPUT_ENV` says (``logs/verify_dataset_integrity.log`` with ``log``).
    Raises :class:`SpinemetsError` naming the folder when nnU-Net finds a problem."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = Path(folder)
    ws = workspace_of(workspace)
    try:
        with captured_output(ws, "verify_dataset_integrity"):
            verify_dataset_integrity(str(folder), num_processes=max(1, int(jobs)))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise SpinemetsError(f"{folder}: nnU-Net's dataset integrity check failed: {one_line(exc)[:300]}") from None
    print(f"{folder.name}: nnU-Net's dataset integrity check passed")


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
    ws = workspace_of(workspace)
    entry = stage_plan(stage, profile)
    wanted = list(configurations or entry["configurations"])
    name = ws.dataset_name(stage, dataset_id)
    if not (ws.raw / name / "dataset.json").exists():
        raise SpinemetsError(f"{ws.raw / name}: raw dataset not found; import it first (spinemets import --stage {stage})")
    plans_name = profile_plans(profile)
    plans_file = ws.plans_file(stage, dataset_id, plans_name)
    if force or not plans_file.exists():
        prof = get_profile(profile)
        planner = []  # the profile's inputs to nnU-Net's planner, where they differ from nnU-Net's defaults
        if prof.get("planner"):
            planner += ["-pl", prof["planner"]]
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
        run_nnunet("nnUNetv2_preprocess", ["-d", name.split("_")[0][7:], "-c", *todo.values(), "-plans_name", plans_name,
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
    ws = workspace_of(workspace)
    prof = get_profile(profile)
    entry = stage_plan(stage, profile)
    trainer = trainer or entry["trainer"]
    plans_name = profile_plans(profile)
    folds = [parse_fold(f) for f in (folds or entry["folds"])]
    device = device or prof["device"]
    check_device(device)
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
    env = cpu_environment(prof.get("omp_wait_policy", "PASSIVE")) if device == "cpu" else {}
    if device == "cpu":
        env[CPU_BF16_ENV] = cpu_bf16_setting(profile)  # honoured by the project's trainers
    if threads:
        env["SPINEMETS_TORCH_THREADS"] = str(int(threads))  # honoured by the project's trainers
    budget = entry.get("budget_s") if opts.budget_s is None else opts.budget_s
    if budget is not None and not (math.isfinite(float(budget)) and float(budget) >= 0):
        raise SpinemetsError(f"training budget {budget!r}: must be a finite number of seconds >= 0")
    env["SPINEMETS_TRAIN_BUDGET_S"] = f"{float(budget):g}" if budget else ""  # honoured by the project's trainers
    seed = prof.get("seed") if opts.seed is None else opts.seed
    env["SPINEMETS_TRAIN_SEED"] = "" if seed is None else str(int(seed))  # honoured by the project's trainers
    wall0, cpu0 = time.perf_counter(), children_cpu_seconds()
    trained = False
    for cfg in tqdm(usable, desc=f"{stage}: configurations", unit="config"):
        for fold in tqdm(folds, desc=f"{stage} {cfg}: folds", unit="fold", leave=False):
            out = ws.model_folder(stage, cfg, trainer, dataset_id, plans_name) / f"fold_{fold}"
            if (out / CHECKPOINT_FINAL).exists():
                log.info("%s: already trained, skipped", out)
                continue
            args = [name.split("_")[0][7:], cfg, _fold_arg(fold), "-tr", trainer, "-p", plans_name, "-device", device]
            if any((out / f).exists() for f in (CHECKPOINT_LATEST, CHECKPOINT_BEST)):
                args.append("--c")
            if npz:
                args.append("--npz")
            if num_gpus > 1:
                args += ["-num_gpus", str(int(num_gpus))]  # nnU-Net's own multi-GPU (DDP) training
            run_nnunet("nnUNetv2_train", args, ws, log_file, extra_trainer_dirs, env)
            trained = True
            if tool_output() == "log" and in_notebook():
                log_block(log_file, f"nnUNetv2_train {cfg} fold {fold}")
    records = training_records(stage, usable, folds, trainer, ws, dataset_id, plans_name)
    if budget and not records:
        log.warning("%s: trainer %s keeps no training record, so it did not train for the %g s budget "
                    "(only the project's trainers do); it trained for its own number of iterations",
                    name, trainer, float(budget))
    seconds = {"train_wall_s": round(time.perf_counter() - wall0, 1),
               "train_cpu_s": round(children_cpu_seconds() - cpu0, 1)}
    built: dict = {}  # one dataset, one fingerprint: its raw CTs are read once for all configurations
    for cfg in usable:  # what each model was trained on, for the domain check of inference
        domain.write_record(ws.model_folder(stage, cfg, trainer, dataset_id, plans_name), ws.raw / name, built)
    best = None
    if find_best:
        best = None if trained else _previous_selection(ws.results / name, usable, folds, trainer)
        if best is None:
            best = find_best_configuration(stage, usable, folds, trainer, ws, dataset_id, env, plans_name)
        else:
            log.info("%s: every fold was trained before and the selection for them exists; reused", name)
    return {"dataset": name, "trainer": trainer, "plans": plans_name, "configurations": usable, "folds": folds,
            "model_folders": {cfg: str(ws.model_folder(stage, cfg, trainer, dataset_id, plans_name)) for cfg in usable},
            "best": best, "budget_s": float(budget) if budget and records else None,
            "training": records, **seconds}


TRAINING_COLUMNS = ("budget_s", "elapsed_s", "epochs", "iterations", "seconds_per_iteration", "bf16_autocast", "seed")


def training_table(records: Mapping[str, Mapping]) -> list[dict]:
    """:func:`training_records` as rows for a table: model, budget, time, epochs, iterations, cost, CPU."""
    return [{"model": name, **{key: rec.get(key) for key in TRAINING_COLUMNS},
             "cpu": (rec.get("cpu") or {}).get("torch_capability")} for name, rec in records.items()]


def training_records(stage: str, configurations: Sequence[str], folds: Sequence[int | str], trainer: str,
                     workspace: Workspace | str | Path | None = None, dataset_id: int | None = None,
                     plans: str = PLANS) -> dict:
    """What each fold's training reached (``spinemets_training.json`` of the project's trainers):
    ``{"configuration/fold_F": record}``; folds trained by other trainers are left out."""
    ws = workspace_of(workspace)
    out = {}
    for cfg in configurations:
        for fold in folds:
            path = ws.model_folder(stage, cfg, trainer, dataset_id, plans) / f"fold_{fold}" / TRAINING_RECORD
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
    ws = workspace_of(workspace)
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
                            env: Mapping[str, str] | None = None, plans: str = PLANS) -> dict:
    """Run ``nnUNetv2_find_best_configuration`` (cross-validation Dice of each configuration and of
    the ensembles of two) and return its ``inference_information.json``. ``env``: extra environment
    variables for the program (:func:`train` passes its CPU settings, among them the number of
    processes, nnU-Net's ``nnUNet_def_n_proc``).

    What the selection was made for (configurations, folds, trainer) is recorded beside it
    (:data:`SELECTION_RECORD`), so that a later :func:`train` that trains nothing new reuses it.
    """
    ws = workspace_of(workspace)
    name = ws.dataset_name(stage, dataset_id)
    run_nnunet("nnUNetv2_find_best_configuration",
               [name.split("_")[0][7:], "-c", *configurations, "-tr", trainer, "-p", plans,
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
    ws = workspace_of(workspace)
    run_nnunet("nnUNetv2_ensemble", ["-i", *map(str, input_folders), "-o", str(output_folder), "-np", str(processes)], ws)
    return Path(output_folder)


def trained_models(stage: str, profile: str, workspace: Workspace | str | Path | None = None,
                   dataset_id: int | None = None) -> list[dict]:
    """The model(s) inference uses for a stage: ``[{"folder", "configuration", "folds", "trainer"}]``.

    With several entries (an ensemble chosen by find_best_configuration) their probabilities are
    averaged. Raises :class:`SpinemetsError` naming the missing folder when a stage is not trained.
    """
    ws = workspace_of(workspace)
    entry = stage_plan(stage, profile)
    trainer = entry["trainer"]
    plans = profile_plans(profile)
    _, best = _selected(stage, profile, ws, dataset_id)
    chosen = [(model["configuration"], model["trainer"]) for model in best.get("selected_model_or_models", [])]
    if not chosen:
        cfgs = [c for c in entry["configurations"] if (ws.model_folder(stage, c, trainer, dataset_id, plans)).is_dir()]
        preferred = [c for c in ("3d_fullres", *entry["configurations"]) if c in cfgs]
        if not preferred:
            first = ws.model_folder(stage, entry["configurations"][0], trainer, dataset_id, plans)
            raise SpinemetsError(f"{first}: no trained {stage} model of profile {profile!r}; "
                                 f"train it first (spinemets train --stage {stage} --profile {profile})")
        chosen = [(preferred[0], trainer)]
    models = []
    for cfg, tr in chosen:
        folder = ws.model_folder(stage, cfg, tr, dataset_id, plans)
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
    ws = workspace_of(workspace)
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


#: The devices nnU-Net runs on (its ``-device``): the CPU, a CUDA GPU, Apple silicon's GPU (``mps``).
DEVICES = ("cpu", "cuda", "mps")


def _mps_available() -> bool:
    import torch

    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def best_device() -> str:
    """``cuda`` where a CUDA GPU is, else ``mps`` where Apple silicon's GPU is, else ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    return "mps" if _mps_available() else "cpu"


def check_device(device: str, available: bool = False) -> str:
    """Refuse a device nnU-Net does not run on; with ``available``, also one this machine does not have."""
    if device not in DEVICES:
        raise SpinemetsError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    if available and device != "cpu":
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise SpinemetsError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
        if device == "mps" and not _mps_available():
            raise SpinemetsError("device 'mps' requested but PyTorch finds no Apple-silicon GPU (MPS) here; "
                                 "use --device cpu")
    return device


def load_predictor(model: Mapping, device: str = "cpu", tta: bool = False, workspace: Workspace | str | Path | None = None,
                   threads: int | None = None):
    """nnU-Net's three-step predictor: construct, initialise from the model folder; ready for ``predict_*``.

    ``model`` is one entry of :func:`trained_models`. The final checkpoint is used where present,
    the best one otherwise. ``tta`` enables mirroring (where the trainer allows it).
    """
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    check_device(device, available=True)
    if threads:
        torch.set_num_threads(threads)
    folder = Path(model["folder"])
    checkpoint = CHECKPOINT_FINAL
    if not all((folder / f"fold_{f}" / checkpoint).exists() for f in model["folds"]):
        checkpoint = CHECKPOINT_BEST
    check_model_folder(folder, model["folds"], checkpoint)
    with captured_output(workspace_of(workspace), "nnUNetPredictor"):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                    perform_everything_on_device=device == "cuda", device=torch.device(device),
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    ws = workspace_of(workspace)
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
