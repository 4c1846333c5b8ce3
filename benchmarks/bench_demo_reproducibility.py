"""Two demo runs side by side: are they the same run?

The demo trains a fixed number of iterations with a fixed seed, so two runs on one machine should give
identical models, predictions and tables, and two runs on CPUs of other kinds (bfloat16 units or not,
AVX-512 or AVX2) the same held-out numbers within floating-point differences. This compares two
project folders of finished ``spinemets run --profile demo`` runs (``make demo``; the workspace under
``workspace/demo``):

* **models**: the network weights of each stage's final checkpoint, tensor by tensor (a checkpoint
  file also holds its training log's time stamps, so its bytes always differ);
* **predictions**: every predicted label map and detection map of the held-out cases, voxel by voxel;
* **tables**: the prediction tables (``lesions.csv``, ``vertebrae.csv``) and every evaluation table
  (``evaluation/<stage>/*.csv``), byte by byte;
* **numbers**: the held-out numbers the README and the results page quote, and their differences.

    .venv/bin/python benchmarks/bench_demo_reproducibility.py RUN_A RUN_B [--out benchmarks/results/FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from bench_budget import scores
from spinemets.fileio import read_json, write_text
from spinemets.paths import Workspace
from spinemets.training import nnunet

WORKSPACE = Path("workspace") / "demo"


def weights_equal(a: Path, b: Path) -> tuple[bool, float]:
    """Whether two checkpoints hold the same network weights, and the largest absolute difference."""
    import torch

    wa = torch.load(a, map_location="cpu", weights_only=False)["network_weights"]
    wb = torch.load(b, map_location="cpu", weights_only=False)["network_weights"]
    if wa.keys() != wb.keys():
        return False, float("inf")
    largest = max(float((wa[k].float() - wb[k].float()).abs().max()) if wa[k].numel() else 0.0 for k in wa)
    return largest == 0.0, largest


def compare(run_a: Path, run_b: Path) -> dict:
    wa, wb = Workspace(run_a / WORKSPACE), Workspace(run_b / WORKSPACE)
    out = {"models": [], "maps": {"same": 0, "differ": []}, "tables": {"same": [], "differ": []}, "numbers": {}}
    for checkpoint in sorted(wa.results.glob(f"Dataset*/*/fold_*/{nnunet.CHECKPOINT_FINAL}")):
        other = wb.results / checkpoint.relative_to(wa.results)
        same, largest = weights_equal(checkpoint, other) if other.is_file() else (False, float("inf"))
        out["models"].append((str(checkpoint.relative_to(wa.results)), same, largest))
    voxels = agree = 0
    for image in sorted(wa.predictions.glob("*/*.nii.gz")):
        other = wb.predictions / image.relative_to(wa.predictions)
        x = sitk.GetArrayFromImage(sitk.ReadImage(str(image)))
        y = sitk.GetArrayFromImage(sitk.ReadImage(str(other))) if other.is_file() else None
        if y is not None and x.shape == y.shape and np.array_equal(x, y):
            out["maps"]["same"] += 1
        else:
            out["maps"]["differ"].append(str(image.relative_to(wa.predictions)))
        if y is not None and x.shape == y.shape and "confidence" not in image.name:
            voxels += int(((x > 0) | (y > 0)).sum())
            agree += int(((x == y) & (x > 0)).sum())
    out["maps"]["foreground_agreement"] = agree / voxels if voxels else 1.0
    tables = [wa.predictions / name for name in ("lesions.csv", "vertebrae.csv")]
    tables += sorted(wa.root.glob("evaluation/*/*.csv"))
    for table in tables:
        other = wb.root / table.relative_to(wa.root)
        key = str(table.relative_to(wa.root))
        (out["tables"]["same"] if other.is_file() and other.read_bytes() == table.read_bytes()
         else out["tables"]["differ"]).append(key)
    for stage in ("vertebrae", "metastases"):
        for name, ws in (("a", wa), ("b", wb)):
            summary = read_json(ws.evaluation(stage) / "summary.json", "evaluation summary")
            for key, value in scores(summary, stage, len(summary["cases"])).items():
                out["numbers"].setdefault(key, {})[name] = value
    return out


def report(result: dict, run_a: Path, run_b: Path) -> str:
    lines = [f"# Two demo runs: `{run_a}` (a) and `{run_b}` (b)", "",
             "| what | compared | identical | largest difference / differing |", "| --- | --- | --- | --- |"]
    models = result["models"]
    lines.append(f"| final network weights (tensor by tensor) | {len(models)} checkpoints | "
                 f"{sum(s for _, s, _ in models)} | {max((d for _, _, d in models), default=0):.3g} |")
    maps = result["maps"]
    n_maps = maps["same"] + len(maps["differ"])
    lines.append(f"| predicted label and detection maps (voxel by voxel) | {n_maps} | {maps['same']} | "
                 f"{len(maps['differ'])} differ; foreground voxels agreeing {maps['foreground_agreement']:.4f} |")
    tables = result["tables"]
    lines.append(f"| prediction and evaluation tables (byte by byte) | {len(tables['same']) + len(tables['differ'])} | "
                 f"{len(tables['same'])} | {', '.join(tables['differ']) or 'none'} |")
    lines += ["", "| held-out number | a | b | b - a |", "| --- | --- | --- | --- |"]
    for key, pair in result["numbers"].items():
        a, b = pair.get("a"), pair.get("b")
        lines.append(f"| {key} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    parser.add_argument("--out", type=Path, default=None, help="write the report here (Markdown, atomically)")
    a = parser.parse_args(sys.argv[1:] if argv is None else argv)
    text = report(compare(a.run_a.resolve(), a.run_b.resolve()), a.run_a, a.run_b)
    print(text)
    if a.out:
        write_text(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
