"""The demo's lesion clean-up: held-out detection of one trained demo run under other inference clean-ups.

The demo's models are trained once (``make demo``); what happens to the lesion stage's output before it
is scored is a choice of the profile (``min_lesion_ml``, ``spine_only``, ``spine_margin_mm``;
:class:`spinemets.inference.predict.PredictOptions`). This benchmark predicts the held-out cases of the
run's workspace again under each variant below, with everything else the profile's, and scores them as
the demo does (:func:`spinemets.evaluation.evaluate.evaluate_folders`): pooled voxel Dice and
lesion-level F2 per lesion type, true-positive, false-positive and missed lesions, and false-positive
lesions per case. The peer is the variant without any lesion clean-up but the size floor of before
(``before``); the profile's own settings are the row ``profile``.

    .venv/bin/python benchmarks/bench_demo_postprocessing.py [--workspace workspace/demo] \\
        [--csv benchmarks/results/bench_demo_postprocessing.csv]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from bench_demo_learning import to_csv
from spinemets.evaluation.evaluate import evaluate_folders
from spinemets.fileio import write_text
from spinemets.inference.predict import PredictOptions, predict
from spinemets.paths import Workspace

PROFILE = "demo"
#: name -> the options that differ from the profile's (None: the profile's own)
VARIANTS: dict[str, dict] = {
    "before": {"min_lesion_ml": 0.18, "spine_only": False},
    "spine_10mm": {"min_lesion_ml": 0.18, "spine_only": True, "spine_margin_mm": 10.0},
    "spine_3mm": {"min_lesion_ml": 0.18, "spine_only": True, "spine_margin_mm": 3.0},
    "spine_touch": {"min_lesion_ml": 0.18, "spine_only": True, "spine_margin_mm": 0.0},
    "spine_10mm_0.3ml": {"min_lesion_ml": 0.3, "spine_only": True, "spine_margin_mm": 10.0},
    "spine_10mm_0.5ml": {"min_lesion_ml": 0.5, "spine_only": True, "spine_margin_mm": 10.0},
    "profile": {},
}


def scores(folder: Path, cases: int) -> dict:
    table = pd.read_csv(folder / "summary.csv")
    pooled = table[table["aggregate"] == "pooled"].set_index(["class", "metric"])["value"]
    row = {}
    for kind in ("lytic", "sclerotic"):
        row[f"{kind}_dice"] = round(float(pooled[(kind, "dice")]), 4)
        row[f"{kind}_lesion_f2"] = round(float(pooled[(kind, "lesion_fbeta")]), 4)
        for count in ("tp", "fp", "fn"):
            row[f"{kind}_{count}"] = int(pooled[(kind, count)])
    row["fp_per_case"] = round((row["lytic_fp"] + row["sclerotic_fp"]) / cases, 4)
    return row


def run(workspace: Path, workdir: Path) -> list[dict]:
    ws = Workspace(workspace)
    cases = ws.held_out_cases("metastases")
    own = PredictOptions().resolved(PROFILE)  # the profile's own clean-up
    rows = []
    for name, changes in VARIANTS.items():
        options = PredictOptions(**changes)
        resolved = options.resolved(PROFILE)
        out = workdir / name
        t0 = time.perf_counter()
        predict(ws.held_out_images(), out / "predictions", profile=PROFILE, workspace=ws, device="cpu", options=options)
        evaluate_folders(ws.test_labels("metastases"), out / "predictions", "metastases", out / "evaluation", cases=cases)
        rows.append({"variant": name, "min_lesion_ml": resolved.min_lesion_ml, "spine_only": resolved.spine_only,
                     "spine_margin_mm": resolved.spine_margin_mm if resolved.spine_only else "",
                     "is_profile": resolved == own,
                     "cases": len(cases), **scores(out / "evaluation", len(cases)),
                     "predict_and_score_s": round(time.perf_counter() - t0, 1)})
        print("[bench_demo_postprocessing]", rows[-1], file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace/demo"))
    parser.add_argument("--workdir", type=Path, default=None, help="keep the predictions here; default: a temporary folder")
    parser.add_argument("--csv", type=Path, default=None, help="write the table here (CSV, atomically)")
    a = parser.parse_args(sys.argv[1:] if argv is None else argv)
    workdir = a.workdir.resolve() if a.workdir else Path(tempfile.mkdtemp(prefix="bench-postprocessing-"))
    try:
        rows = run(a.workspace.resolve(), workdir)
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
