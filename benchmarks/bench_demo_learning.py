"""The demo's learning curves: held-out quality against training iterations and seconds, per stage.

The demo trains a fixed number of iterations per stage (its trainers' ``EPOCHS x ITERATIONS``).
This benchmark scores the weights a training kept along the way (``checkpoint_it{N}.pth``, written
by the project's trainers every few epochs when ``SPINEMETS_KEEP_CHECKPOINTS_EVERY`` is set) on the
held-out cases exactly as the demo does (:func:`spinemets.inference.predict` with the profile's
clean-up, then :func:`spinemets.metrics.evaluate_folders`; ``bench_budget.evaluate``).

* Without ``--train``: the checkpoints of the workspace's own training (a demo run started with
  ``SPINEMETS_KEEP_CHECKPOINTS_EVERY=2``, for instance).
* With ``--train --epochs N``: a variant, the demo's trainer with ``N`` epochs of its iterations per
  epoch (the learning rate decaying over the longer schedule), trained as above; its checkpoints are
  scored as the demo's model would be (the checkpoint under the demo trainer's name).
* With ``--train``: the stage is trained again, with the demo's trainer, seed and iterations, into
  its own ``nnUNet_results`` under ``--workdir``, keeping checkpoints every ``--every`` epochs; the
  CPU settings of the environment apply (e.g. the AVX2 emulation ``SPINEMETS_CPU_BF16=0
  ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``). The other stage's model is the workspace's,
  or the one in ``--other-results`` (e.g. another run's, on the same cohort).
* Each checkpoint ``N`` is scored as the model of the stage: its own ``nnUNet_results`` folder
  under ``--workdir`` where ``fold_all/checkpoint_final.pth`` links to it.

The learning rate decays over the whole schedule (polynomial, per epoch), so a point at ``N``
iterations is the model after ``N`` iterations of the full schedule, not a shorter schedule's end
(which would have decayed sooner); the last point is the demo's model.

Reported per point: iterations, training seconds to that point (from the training record's
per-epoch log), seconds per iteration, the CPU and whether bfloat16 autocast was on; for the
vertebrae the mean per-vertebra Dice (mean over the levels of the mean over cases, as the results
page) and the identification rate; for the lesions the pooled voxel Dice and lesion-level F2 of
each type and the false-positive lesions per case. Times are wall-clock on a possibly shared
machine; the iterations are the same on every CPU.

    .venv/bin/python benchmarks/bench_demo_learning.py --stage vertebrae [--every 4] [--train] \\
        [--points 200,600,1000] [--workspace workspace/demo] [--workdir DIR] [--csv benchmarks/results/bench_demo_learning_vertebrae.csv]
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_budget import CPU_ENV, evaluate, results_folder
from spinemets.fileio import read_json, write_text
from spinemets.paths import Workspace
from spinemets.training import nnunet
from spinemets.training.profiles import planned_iterations, stage_plan
from spinemets.labels import STAGE_NAMES, check_stage

PROFILE = "demo"
KEPT = re.compile(r"checkpoint_it(\d+)\.pth$")


def log(*args) -> None:
    print("[bench_demo_learning]", *args, file=sys.stderr, flush=True)


def kept_checkpoints(fold: Path) -> dict[int, Path]:
    """``{iterations: path}`` of the checkpoints a training kept in ``fold``."""
    out = {}
    for path in fold.glob("checkpoint_it*.pth"):
        match = KEPT.search(path.name)
        if match:
            out[int(match.group(1))] = path
    return dict(sorted(out.items()))


def seconds_at(record: dict, iterations: int) -> float | None:
    """Training seconds until ``iterations`` were done, from the record's per-epoch (iterations, seconds) log."""
    done, seconds = 0, 0.0
    for n, s in record.get("epoch_log", []):
        done += n
        seconds += s
        if done >= iterations:
            return round(seconds, 1)
    return None


def model_at(model: Path, checkpoint: Path, results: Path, dataset: str, as_trainer: str | None = None) -> None:
    """An ``nnUNet_results`` folder under ``results`` whose model of ``dataset`` is ``model`` with ``checkpoint``
    as final; with ``as_trainer``, under that trainer's name (a variant scored as the demo's model)."""
    name = model.name if as_trainer is None else "__".join([as_trainer, *model.name.split("__")[1:]])
    target = results / dataset / name
    fold = target / "fold_all"
    fold.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        if item.is_file() and not (target / item.name).exists():
            (target / item.name).symlink_to(item)
    final = fold / nnunet.CHECKPOINT_FINAL
    if final.exists():
        return
    if as_trainer is None or as_trainer == model.name.split("__")[0]:
        final.symlink_to(checkpoint)
        return
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state["trainer_name"] = as_trainer  # the variant differs only in its schedule; inference is the demo trainer's
    torch.save(state, final)


def variant_trainer(stage: str, epochs: int, folder: Path) -> str:
    """A trainer module in ``folder``: the demo trainer of ``stage`` with ``epochs`` epochs; its class name."""
    base = stage_plan(stage, PROFILE)["trainer"]
    name = f"{base}_{epochs}epochs"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_variants.py").write_text(
        f"from spinemets.training.trainers.spinemets_trainers import {base}\n\n\n"
        f"class {name}({base}):\n    EPOCHS = {int(epochs)}\n")
    return name


def run(workspace: Path, stage: str, every: int, train: bool, workdir: Path, only: set[int] | None = None,
        other_results: Path | None = None, model_results: Path | None = None, epochs: int | None = None) -> list[dict]:
    ws = Workspace(workspace)
    entry = stage_plan(stage, PROFILE)
    other = next(s for s in STAGE_NAMES if s != stage)
    cfg, trainer = entry["configurations"][0], entry["trainer"]
    own_results = ws.results
    results = own_results
    other_from = (other_results or own_results) / ws.dataset_name(other)  # the other stage's model
    if model_results is not None:  # a model trained before (e.g. by --train with this --workdir)
        results = model_results
    if train:
        results = workdir / "trained" / "results"
        results.mkdir(parents=True, exist_ok=True)
        link = results / ws.dataset_name(other)
        if not link.exists():
            link.symlink_to(other_from, target_is_directory=True)
        os.environ["SPINEMETS_KEEP_CHECKPOINTS_EVERY"] = str(every)
        options = None
        if epochs:
            trainer = variant_trainer(stage, epochs, workdir / "trainers")
            options = nnunet.TrainingOptions(trainer=trainer, extra_trainer_dirs=(workdir / "trainers",))
        with results_folder(results):
            log(f"{stage}: training {trainer}, a checkpoint every {every} epochs")
            t0 = time.perf_counter()
            nnunet.train(stage, PROFILE, workspace=ws, options=options)
            log(f"{stage}: trained in {time.perf_counter() - t0:.0f} s")
    elif epochs:
        trainer = f"{trainer}_{epochs}epochs"
    with results_folder(results):
        model = ws.model_folder(stage, cfg, trainer)
    record = read_json(model / "fold_all" / nnunet.TRAINING_RECORD, "training record")
    points = kept_checkpoints(model / "fold_all")
    if only:
        points = {n: p for n, p in points.items() if n in only}
    if not points:
        raise SystemExit(f"{model / 'fold_all'}: no kept checkpoints (train with SPINEMETS_KEEP_CHECKPOINTS_EVERY set)")
    cpu = record.get("cpu", {})
    rows = []
    for iterations, checkpoint in points.items():
        folder = workdir / f"it{iterations}"
        point_results = folder / "results"
        model_at(model, checkpoint, point_results, ws.dataset_name(stage), as_trainer=entry["trainer"])
        link = point_results / ws.dataset_name(other)
        if not link.exists():
            link.symlink_to(other_from, target_is_directory=True)
        with results_folder(point_results):
            scored = evaluate(ws, stage, folder)
        rows.append({"stage": stage, "variant": trainer, "iterations": iterations, "trained_s": seconds_at(record, iterations),
                     "seconds_per_iteration": record.get("seconds_per_iteration"),
                     "iterations_planned": record.get("iterations_planned"), "seed": record.get("seed"),
                     "torch_capability": cpu.get("torch_capability"), "bf16_autocast": record.get("bf16_autocast"),
                     "cpu": cpu.get("model"), "cpu_env": " ".join(f"{k}={os.environ[k]}" for k in CPU_ENV
                                                                 if os.environ.get(k)),
                     **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in scored.items()}})
        log(f"{stage} after {iterations} iterations: {rows[-1]}")
    return rows


def to_csv(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace/demo"))
    parser.add_argument("--stage", required=True)
    parser.add_argument("--every", type=int, default=2, help="with --train: keep a checkpoint every N epochs")
    parser.add_argument("--train", action="store_true", help="train the stage again (this environment's CPU settings)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="a variant: the demo trainer with this many epochs (with --train; without it, score "
                             "such a variant trained before with --model-results)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here; default: a temporary folder")
    parser.add_argument("--points", default=None, help="score only these kept checkpoints (iterations, comma-separated)")
    parser.add_argument("--other-results", type=Path, default=None,
                        help="nnUNet_results folder holding the other stage's model (default: the workspace's)")
    parser.add_argument("--model-results", type=Path, default=None,
                        help="score the stage's model in this nnUNet_results folder (e.g. WORKDIR/trained/results)")
    parser.add_argument("--csv", type=Path, default=None, help="write the curve here (CSV, atomically)")
    a = parser.parse_args(argv)
    check_stage(a.stage)
    if a.every < 1:
        parser.error("--every: a positive number of epochs")
    workdir = a.workdir.resolve() if a.workdir else Path(tempfile.mkdtemp(prefix="bench-learning-"))
    try:
        only = {int(p) for p in a.points.split(",") if p.strip()} if a.points else None
        rows = run(a.workspace.resolve(), a.stage, a.every, a.train, workdir, only,
                   a.other_results.resolve() if a.other_results else None,
                   a.model_results.resolve() if a.model_results else None, a.epochs)
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = to_csv(rows)
    print(text)
    if a.csv:
        write_text(a.csv, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
