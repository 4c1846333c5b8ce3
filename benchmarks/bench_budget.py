"""Held-out quality against the training budget, per stage: the curve behind the demo's budget.

The demo trains each stage for a wall-clock budget (``spinemets.training.profiles.DEMO_BUDGET_S``); a CPU
decides how many iterations fit into it. This benchmark trains one stage again with other budgets,
on the data of a demo workspace that already holds both stages' models (``make demo``), and scores
each result on the held-out cases exactly as the demo does (:func:`spinemets.inference.predict.predict`
with the profile's clean-up, then :func:`spinemets.evaluation.evaluate.evaluate_folders`).

* Each budget's model goes into its own ``nnUNet_results`` folder under ``--workdir`` (the other
  stage's model is linked there from the workspace, so that prediction runs both stages as the
  demo does); the workspace's own models and predictions are not touched.
* **Peer**: the workspace's own model of the stage (trained at the profile's budget), predicted
  and scored in the same run; every budget's numbers are also given as a ratio to it.
* Reported per budget: the iterations reached, seconds per iteration, the CPU; for the vertebrae
  the mean per-vertebra Dice (mean over the levels of the mean over cases, as the results page)
  and the identification rate; for the lesions the pooled voxel Dice and lesion-level F2 of each
  type and the false-positive lesions per case.

Quality depends on the iterations reached, and the iterations on the CPU: the same budget buys
about 2.3x as many vertebra iterations on a CPU with bfloat16 units as on one with AVX2 only
(``benchmarks/bench_train.py``). Read a curve measured on one CPU for another by its iterations.
Times are wall-clock on a possibly shared machine; tests never assert them.

    .venv/bin/python benchmarks/bench_budget.py --stage vertebrae --budgets 90,180,360 \\
        [--workspace workspace/demo] [--workdir DIR] [--out benchmarks/results/bench_budget_vertebrae.md]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench_train import MODES
from spinemets.inference import predict as inference
from spinemets.evaluation.evaluate import evaluate_folders
from spinemets.training import nnunet
from spinemets.fileio import write_json, write_text
from spinemets.labels import STAGE_NAMES, check_stage
from spinemets.paths import Workspace
from spinemets.training.profiles import stage_plan

PROFILE = "demo"
#: The variables that limit PyTorch's and oneDNN's kernels (those of ``bench_train.py``'s ``avx2`` mode), named in the report.
CPU_ENV = tuple(MODES["avx2"])


def log(*args) -> None:
    print("[bench_budget]", *args, file=sys.stderr, flush=True)


@contextlib.contextmanager
def results_folder(path: Path | None):
    """``nnUNet_results`` pointed at ``path`` for the duration (None: the workspace's own)."""
    before = os.environ.get("nnUNet_results")
    if path is not None:
        os.environ["nnUNet_results"] = str(path)
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("nnUNet_results", None)
        else:
            os.environ["nnUNet_results"] = before


def scores(summary: dict, stage: str, n_cases: int) -> dict:
    """The numbers the README and the results page quote, from :func:`spinemets.evaluation.evaluate.evaluate_folders`' summary."""
    mean, pooled = summary["mean"], summary["pooled"]
    if stage == "vertebrae":
        levels = [v["dice"]["value"] for cls, v in mean.items()
                  if cls != "all" and v["dice"]["n"] > 0 and v["dice"]["value"] is not None]
        return {"mean_per_vertebra_dice": sum(levels) / len(levels) if levels else math.nan,
                "identification_rate": pooled["all"]["identification_rate"]["value"]}
    out = {}
    fp = 0.0
    for cls in ("lytic", "sclerotic"):
        out[f"{cls}_dice"] = pooled[cls]["dice"]["value"]
        out[f"{cls}_lesion_f2"] = pooled[cls]["lesion_fbeta"]["value"]
        fp += pooled[cls]["fp"]["value"]
    out["fp_per_case"] = fp / max(n_cases, 1)
    return out


def evaluate(ws: Workspace, stage: str, out: Path) -> dict:
    """Both stages on the held-out CTs with the profile's clean-up, then the stage's scores."""
    t0 = time.perf_counter()
    inference.predict(ws.held_out_images(), out / "predictions", profile=PROFILE, workspace=ws, device="cpu")
    cases = ws.held_out_cases(stage)
    summary = evaluate_folders(ws.test_labels(stage), out / "predictions", stage, out / "evaluation",
                              cases=cases)
    return {**scores(summary, stage, len(cases)), "predict_and_score_s": round(time.perf_counter() - t0, 1)}


def record(ws: Workspace, stage: str) -> dict:
    entry = stage_plan(stage, PROFILE)
    found = nnunet.training_records(stage, entry["configurations"], entry["folds"], entry["trainer"], ws)
    if not found:
        return {}
    rec = next(iter(found.values()))
    cpu = rec.get("cpu", {})
    return {"iterations": rec.get("iterations"), "trained_s": rec.get("elapsed_s"),
            "seconds_per_iteration": rec.get("seconds_per_iteration"), "budget_s": rec.get("budget_s"),
            "bf16_autocast": rec.get("bf16_autocast"), "cpu": cpu.get("model"),
            "torch_capability": cpu.get("torch_capability")}


def run(workspace: Path, stage: str, budgets: list[float], workdir: Path) -> dict:
    ws = Workspace(workspace)
    other = next(s for s in STAGE_NAMES if s != stage)
    with results_folder(None):
        peer = record(ws, stage)
        if not peer or not record(ws, other):
            raise SystemExit(f"{workspace}: no demo models of both stages; run `make demo` first")
        log(f"peer: the workspace's own {stage} model")
        rows = [{"budget": "profile", **peer, **evaluate(ws, stage, workdir / "peer")}]
        own_results = ws.results
    for budget in budgets:
        folder = workdir / f"budget_{budget:g}"
        results = folder / "results"
        results.mkdir(parents=True, exist_ok=True)
        link = results / ws.dataset_name(other)
        if not link.exists():
            link.symlink_to(own_results / ws.dataset_name(other), target_is_directory=True)
        with results_folder(results):
            log(f"{stage}: training for {budget:g} s")
            t0 = time.perf_counter()
            nnunet.train(stage, PROFILE, workspace=ws, options=nnunet.TrainingOptions(budget_s=budget))
            wall = time.perf_counter() - t0
            rows.append({"budget": budget, **record(ws, stage), "train_wall_s": round(wall, 1),
                         **evaluate(ws, stage, folder)})
        log(f"{stage} at {budget:g} s: {rows[-1]}")
    return {"stage": stage, "workspace": str(workspace), "rows": rows}


def report(result: dict, argv: list[str]) -> str:
    stage, rows = result["stage"], result["rows"]
    keys = (["mean_per_vertebra_dice", "identification_rate"] if stage == "vertebrae" else
            ["lytic_dice", "sclerotic_dice", "lytic_lesion_f2", "sclerotic_lesion_f2", "fp_per_case"])
    peer = rows[0]
    head = ["budget s", "iterations", "s per iteration", "trained s", "CPU capability", "bf16"] + keys + \
        [f"{keys[0]} / peer"]
    lines = [f"# {stage}: held-out quality against the training budget", "",
             f"`benchmarks/bench_budget.py {' '.join(argv)}`; peer: the workspace's own model "
             f"(profile budget {peer.get('budget_s')} s), scored in the same run.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v, digits=3):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "–"
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)

    for row in sorted(rows, key=lambda r: r.get("budget_s") or 0):
        ratio = (row[keys[0]] / peer[keys[0]]) if peer.get(keys[0]) else math.nan
        cells = [fmt(row.get("budget_s"), 0), fmt(row.get("iterations")), fmt(row.get("seconds_per_iteration")),
                 fmt(row.get("trained_s"), 0), fmt(row.get("torch_capability")), fmt(row.get("bf16_autocast"))]
        cells += [fmt(row.get(k)) for k in keys] + [fmt(ratio, 2) + "x"]
        lines.append("| " + " | ".join(cells) + " |")
    env = ", ".join(f"{k}={os.environ[k]}" for k in CPU_ENV if os.environ.get(k)) or "none set"
    lines += ["", f"CPU: {peer.get('cpu')}; kernel limits in the environment: {env}. Quality follows the "
              "iterations reached; another CPU reaches other iteration counts in the same budget "
              "(`benchmarks/results/bench_train_*.md`)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace/demo"))
    parser.add_argument("--stage", required=True)
    parser.add_argument("--budgets", required=True, help="comma-separated seconds, e.g. 90,180,360")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here; default: a temporary folder")
    parser.add_argument("--out", type=Path, default=None, help="write the markdown report here (atomically)")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results (JSON) here")
    a = parser.parse_args(argv)
    check_stage(a.stage)
    try:
        budgets = [float(b) for b in a.budgets.split(",") if b.strip()]
    except ValueError:
        parser.error(f"--budgets: comma-separated numbers of seconds, not {a.budgets!r}")
    if not budgets or not all(math.isfinite(b) and b > 0 for b in budgets):
        parser.error(f"--budgets: positive numbers of seconds, not {a.budgets!r}")
    workdir = a.workdir.resolve() if a.workdir else Path(tempfile.mkdtemp(prefix="bench-budget-"))
    try:
        result = run(a.workspace, a.stage, budgets, workdir)
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    text = report(result, argv)
    print(text)
    if a.out:
        write_text(a.out, text)
    if a.json:
        write_json(a.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
