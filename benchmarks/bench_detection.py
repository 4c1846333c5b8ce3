"""Benchmark of the lesion-detection tables (``spinemets.evaluation.detection``) against reading their inputs.

Builds ``--cases`` seeded synthetic lesion cases (``bench_metrics.make_metastases``: balls of both
types, a prediction that finds most, misses some, swaps types and adds false positives; the
reference vertebrae of ``bench_metrics.make_vertebrae``), gives every predicted lesion a random
confidence (the detection map), and writes them as ``spinemets predict`` does: ``ref/CASE.nii.gz``
and ``pred/CASE/metastases.nii.gz`` beside ``metastases_confidence.nii.gz`` and
``vertebrae.nii.gz``. Then measures, in this process, the best of ``--repeats``:

* ``read_labels``: reading every reference and predicted label map (SimpleITK);
* ``read_maps``: reading every detection map and vertebra map, the detection tables' own inputs;
* ``metrics_on_arrays``: :func:`spinemets.evaluation.metrics.evaluate_case` of every case (the lesion
  metrics as before this issue), and ``metrics_and_detections_on_arrays``:
  :func:`spinemets.evaluation.evaluate.evaluate_lesion_case` (the same metrics and each case's detections,
  from one matching, the detection map checked);
* ``folder_tables``: FROC, summary with 2000 bootstrap replicates, bands, regions, patients;
* ``figure``: drawing and writing ``froc.png`` (a fixed cost of matplotlib, whatever the data);
* ``evaluate``: ``spinemets.evaluation.evaluate.evaluate_folders`` on the folders (read, score, write
  everything), one process; and the same on a flat folder of the label maps alone (no detection
  or vertebra maps: the evaluation as it was before this issue, bar the one-point FROC).

Reports the detection work (per-case detections beyond the metrics, the folder tables and the
figure) against reading the detection and vertebra maps (the issue's goal: <= 1), and ``evaluate``
against reading all of its inputs, the detection maps counted (goal <= 1.5). The machine may be
shared: timings are noisy, the ratios are what count.

    python benchmarks/bench_detection.py [--cases 8] [--shape 160 256 256] [--out benchmarks/results/bench_detection.json]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_metrics import SPACING_XYZ, make_metastases, make_vertebrae  # noqa: E402


def write_cases(folder: Path, n_cases: int, shape, seed: int) -> None:
    import cc3d
    import SimpleITK as sitk

    from spinemets.paths import CONFIDENCE_NAME, VERTEBRAE_NAME

    def write(array, path):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(SPACING_XYZ)
        path.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(path), True)

    rng = np.random.default_rng(seed)
    for i in range(n_cases):
        case = f"case_{i:03d}"
        ref, pred = make_metastases(shape, seed=seed + i)
        vert = make_vertebrae(shape, seed + i)[0]
        comps, n = cc3d.connected_components(pred > 0, connectivity=26, return_N=True)
        scores = np.r_[0.0, rng.uniform(0.34, 1.0, n)].astype(np.float32)
        write(ref, folder / "ref" / f"{case}.nii.gz")
        write(pred, folder / "pred" / case / "metastases.nii.gz")
        write(scores[comps], folder / "pred" / case / CONFIDENCE_NAME)
        write(vert, folder / "pred" / case / VERTEBRAE_NAME)


def _best(fn, repeats: int):
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--shape", type=int, nargs=3, default=(160, 256, 256), metavar=("Z", "Y", "X"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_detection.json"))
    args = parser.parse_args(argv)

    import SimpleITK as sitk

    from spinemets.evaluation import detection as det
    from spinemets import paths
    from spinemets.evaluation import metrics
    from spinemets.evaluation import evaluate
    from spinemets.evaluation.detection import froc_figure
    from spinemets.fileio import write_json

    with tempfile.TemporaryDirectory(prefix="bench-detection-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        write_cases(tmp, args.cases, tuple(args.shape), args.seed)
        print(f"wrote {args.cases} case(s) of {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s", flush=True)
        cases = sorted(p.name for p in (tmp / "pred").iterdir())

        def read(paths):
            return [sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in paths]

        label_paths = [p for c in cases for p in (tmp / "ref" / f"{c}.nii.gz", tmp / "pred" / c / "metastases.nii.gz")]
        map_paths = [p for c in cases for p in (tmp / "pred" / c / paths.CONFIDENCE_NAME, tmp / "pred" / c / paths.VERTEBRAE_NAME)]
        t_labels, labels = _best(lambda: read(label_paths), args.repeats)
        t_maps, maps = _best(lambda: read(map_paths), args.repeats)
        spacing = tuple(reversed(SPACING_XYZ))
        pairs = [(labels[2 * i], labels[2 * i + 1], maps[2 * i], maps[2 * i + 1]) for i in range(len(cases))]
        t_old, _ = _best(lambda: [metrics.evaluate_case(r, p, "metastases", spacing) for r, p, _, _ in pairs],
                         args.repeats)
        t_new, outcomes = _best(lambda: [evaluate.evaluate_lesion_case(r, p, c, v, spacing) for r, p, c, v in pairs],
                                args.repeats)
        found = {case: outcome[1] for case, outcome in zip(cases, outcomes)}

        def tables():
            froc = det.froc_rows(found)
            det.froc_summary_rows(found)
            det.band_rows(found)
            det.patient_table(found)
            return froc

        t_tables, froc = _best(tables, args.repeats)
        t_figure, _ = _best(lambda: froc_figure(froc).savefig(tmp / "froc.png", format="png", dpi=100), args.repeats)
        t_eval, doc = _best(lambda: evaluate.evaluate_folders(tmp / "ref", tmp / "pred", "metastases",
                                                            tmp / "out"), args.repeats)
        flat = tmp / "flat"
        flat.mkdir()
        for case in cases:  # the label maps alone, as a flat folder: evaluate as it was without detection maps
            (flat / f"{case}.nii.gz").symlink_to(tmp / "pred" / case / "metastases.nii.gz")
        t_eval_flat, _ = _best(lambda: evaluate.evaluate_folders(tmp / "ref", flat, "metastases", tmp / "out_flat"),
                               args.repeats)
        n_ref = sum(d["any"].ref_ml.size for d in found.values())
        n_pred = sum(d["any"].pred_score.size for d in found.values())
    extra = (t_new - t_old) + t_tables + t_figure
    ratios = {"detection_work_over_read_maps": extra / t_maps,
              "detection_work_without_figure_over_read_maps": (t_new - t_old + t_tables) / t_maps,
              "evaluate_over_read_inputs": t_eval / (t_labels + t_maps),
              "evaluate_without_maps_over_read_labels": t_eval_flat / t_labels}
    report = {"cases": args.cases, "shape_zyx": list(args.shape), "spacing_xyz": SPACING_XYZ, "seed": args.seed,
              "reference_lesions_any": int(n_ref), "predicted_lesions_any": int(n_pred),
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "seconds": {"read_labels": t_labels, "read_maps": t_maps, "metrics_on_arrays": t_old,
                          "metrics_and_detections_on_arrays": t_new, "folder_tables": t_tables, "figure": t_figure,
                          "evaluate": t_eval, "evaluate_flat_without_maps": t_eval_flat},
              "ratios": ratios, "cpm_any": next(r["value"] for r in doc["detection"]["froc_summary"]
                                                if r["class"] == "any" and r["metric"] == "cpm")}
    print(f"{args.cases} cases, {n_ref} reference and {n_pred} predicted lesions (any type)")
    for key, value in report["seconds"].items():
        print(f"  {key:12s} {value:8.3f} s")
    print(f"  detection work (per-case detections + tables + figure) / reading the maps "
          f"{ratios['detection_work_over_read_maps']:6.2f} x  (goal <= 1)")
    print(f"  the same without the figure / reading the maps                         "
          f"{ratios['detection_work_without_figure_over_read_maps']:6.2f} x")
    print(f"  evaluate / reading all its inputs                                      "
          f"{ratios['evaluate_over_read_inputs']:6.2f} x  (goal <= 1.5)")
    print(f"  evaluate without detection maps (flat folder) / reading the label maps "
          f"{ratios['evaluate_without_maps_over_read_labels']:6.2f} x  (the same goal before this issue)")
    write_json(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
