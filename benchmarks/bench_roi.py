"""Lesion stage on the whole CT vs on the spine's bounding box: time and lesion recall, as ratios.

Runs :func:`spinemets.inference.predict.predict` twice on the hold-out images of a trained workspace,
with ``roi="none"`` (the paper's way) and ``roi="spine"`` (stage 2 on the stage-1 spine box plus
a margin), and compares:

* **time**: seconds of stage 2 summed over the cases (from each run's provenance), and the whole
  prediction; ratio = spine / none;
* **lesion recall**: reference lesions (connected components of each class of ``labelsTs`` of the
  metastasis dataset) matched by a predicted component of the same class, pooled over cases
  (:func:`spinemets.evaluation.metrics.match_components`, IoU > 0.5, and with ``match="overlap"``, any
  overlap); ratio = spine / none. Lesions outside the spine box are what the ROI can lose.

Usage (after training both stages of a profile in WORKSPACE)::

    python benchmarks/bench_roi.py --workspace workspace/demo --profile demo [--margin-mm 20]

Prints a table and writes ``roi_benchmark.json`` into ``WORKSPACE/bench_roi/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinemets.inference import predict as inference

from spinemets.evaluation import metrics

from spinemets.fileio import write_json
from spinemets.paths import Workspace


def lesion_recall(pred_dir: Path, ref_dir: Path, match: str) -> dict:
    """Pooled recall of reference lesions per class and overall: matched / reference components."""
    tp = np.zeros(3)
    fn = np.zeros(3)
    for ref_path in sorted(ref_dir.glob("*.nii.gz")):
        case = ref_path.name[: -len(".nii.gz")]
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(ref_path)))
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(pred_dir / case / "metastases.nii.gz")))
        counts = metrics.match_components(ref, pred, match=match).counts(3)
        tp += np.asarray(counts.tp, float)
        fn += np.asarray(counts.fn, float)
    recall = lambda t, f: float(t / (t + f)) if t + f else float("nan")  # noqa: E731
    return {"lytic": recall(tp[1], fn[1]), "sclerotic": recall(tp[2], fn[2]),
            "all": recall(tp[1:].sum(), fn[1:].sum()), "reference_lesions": int((tp + fn)[1:].sum())}


def run(workspace: Path, profile: str, margin_mm: float, device: str) -> dict:
    ws = Workspace(workspace)
    images = ws.raw / ws.dataset_name("vertebrae") / "imagesTs"
    refs = ws.raw / ws.dataset_name("metastases") / "labelsTs"
    out = ws.root / "bench_roi"
    result = {"workspace": str(ws.root), "profile": profile, "margin_mm": margin_mm, "cases": len(list(images.glob("*.nii.gz")))}
    for roi in inference.ROI_MODES:
        t0 = time.perf_counter()
        inference.predict(images, out / roi, profile=profile, workspace=ws, device=device,
                          options=inference.PredictOptions(roi=roi, margin_mm=margin_mm))
        wall = time.perf_counter() - t0
        prov = json.loads((out / roi / "provenance.json").read_text())
        result[roi] = {"wall_s": round(wall, 2),
                       "stage2_s": round(sum(t["stage2_s"] for t in prov["timings_s"].values()), 2),
                       "recall_iou": lesion_recall(out / roi, refs, "iou"),
                       "recall_overlap": lesion_recall(out / roi, refs, "overlap")}
    ratio = lambda key: result["spine"][key] / result["none"][key] if result["none"][key] else float("nan")  # noqa: E731
    result["ratios_spine_over_none"] = {
        "stage2_time": round(ratio("stage2_s"), 3),
        "total_time": round(ratio("wall_s"), 3),
        **{f"recall_{m}": (round(result["spine"][f"recall_{m}"]["all"] / result["none"][f"recall_{m}"]["all"], 3)
                           if result["none"][f"recall_{m}"]["all"] else float("nan")) for m in ("iou", "overlap")},
    }
    write_json(out / "roi_benchmark.json", result)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, default=Path("workspace/demo"))
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--margin-mm", type=float, default=inference.MARGIN_MM)
    parser.add_argument("--device", default="cpu")
    a = parser.parse_args(argv)
    r = run(a.workspace, a.profile, a.margin_mm, a.device)
    print(f"{r['cases']} hold-out cases, margin {r['margin_mm']} mm")
    print(f"{'roi':6} {'stage 2 s':>10} {'total s':>9} {'recall IoU>0.5':>15} {'recall overlap':>15}")
    for roi in inference.ROI_MODES:
        x = r[roi]
        print(f"{roi:6} {x['stage2_s']:10.2f} {x['wall_s']:9.2f} {x['recall_iou']['all']:15.3f} "
              f"{x['recall_overlap']['all']:15.3f}")
    print("ratios spine / none:", r["ratios_spine_over_none"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
