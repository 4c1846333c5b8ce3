"""Benchmark of ``spinemets.evaluation.metrics`` against panoptica and nnU-Net on one clinical-size case.

Builds a seeded synthetic reference/prediction pair for each stage (default 512 x 512 x 300 voxels
at 0.8 x 0.8 x 1.0 mm: 25 vertebra labels; >= 30 lesions, lytic and sclerotic), writes them as
NIfTI to a temporary folder and measures, each in its own fresh Python process:

* ``read``: reading the two NIfTI files of a stage with SimpleITK into arrays;
* ``ours``: ``spinemets.evaluation.metrics.evaluate_case`` on the arrays (all metrics of the stage), and
  ``evaluate_pair`` on the two files (read + compute);
* ``panoptica``: ``Panoptica_Evaluator.evaluate`` on the same arrays (IoU and Dice as instance
  metrics, nothing slower; vertebrae as one single-label group per vertebra, lesions as semantic
  classes with connected components), matching with its strict option (IoU > 0.5, our rule; its
  default, IoU >= 0.5, also matches pairs at exactly 0.5, and the benchmark counts such ties);
* ``nnunet``: nnU-Net's ``compute_metrics`` (the per-case function of ``compute_metrics_on_folder``)
  on the two files with its ``SimpleITKIO``; it reads the files itself, so its time is compared
  with our read + compute time.

Time is wall-clock (``time.perf_counter``), the best of ``--repeats`` runs inside the process for
the fast measurements and one run for the peers. Memory is what the measured step adds to the
process: its peak resident size during the step (``VmHWM``, reset just before the step through
``/proc/self/clear_refs``; Linux only) minus its resident size when the step starts. Steps on arrays
in memory do not count the input arrays; steps that read files count what reading allocates.
The process peaks (``ru_maxrss``, imports included: nnU-Net and panoptica bring torch) are
recorded too. The machine may be shared: timings are noisy, the ratios are what count.

The numbers must agree: instance TP/FP/FN, RQ, SQ, PQ with panoptica (SQ only where a match exists:
panoptica reports 0 without one, we NaN), voxel Dice and IoU with nnU-Net. Writes a JSON result.

    python benchmarks/bench_metrics.py [--shape 300 512 512] [--out benchmarks/results/bench_metrics.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SPACING_XYZ = (0.8, 0.8, 1.0)
STAGES = ("vertebrae", "metastases")
TASKS = ("read", "ours", "panoptica", "nnunet")


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def _ellipse(shape_yx, centre, radii) -> np.ndarray:
    y, x = np.ogrid[: shape_yx[0], : shape_yx[1]]
    return ((y - centre[0]) / radii[0]) ** 2 + ((x - centre[1]) / radii[1]) ** 2 <= 1.0


def _ball(array: np.ndarray, centre, radius: float, value: int) -> None:
    lo = [max(0, int(math.floor(c - radius))) for c in centre]
    hi = [min(s, int(math.ceil(c + radius)) + 1) for c, s in zip(centre, array.shape)]
    z, y, x = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    inside = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= radius**2
    array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]][inside] = value


def make_vertebrae(shape, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """25 stacked elliptic vertebral bodies with a posterior arch (reference) and a perturbed copy
    (prediction: boundaries moved, bodies shifted and resized, L3 labelled L4, T6 missing)."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)
    height = nz // 25
    for i in range(25):
        label = 25 - i  # sacrum at the bottom (z = 0), C1 at the top
        z0, z1 = i * height, (i + 1) * height - 1  # one empty slice between bodies: the disc
        cy, cx = ny * 0.55 + 10 * math.sin(i / 4), nx / 2
        ry, rx = 22 + i * 0.6, 30 + i * 0.8
        body = _ellipse((ny, nx), (cy, cx), (ry, rx))
        body |= _ellipse((ny, nx), (cy - ry - 12, cx), (10, 6))  # spinous process
        ref[z0:z1][:, body] = label
        if label == 14:  # T6 missed by the prediction
            continue
        plabel = 23 if label == 22 else label  # L3 predicted as L4
        dz = int(rng.integers(-1, 2))
        dy, dx = rng.normal(0, 1.5, size=2)
        scale = 1 + rng.normal(0, 0.05)
        pbody = _ellipse((ny, nx), (cy + dy, cx + dx), (ry * scale, rx * scale))
        pbody |= _ellipse((ny, nx), (cy - ry - 12 + dy, cx + dx), (10, 6))
        pz0, pz1 = max(0, z0 + dz), min(nz, z1 + dz)
        pred[pz0:pz1][:, pbody] = plabel
    return ref, pred


def make_metastases(shape, n_lesions: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Balls of both types in the spine region (reference) and a prediction that finds most of them
    (shifted, resized), misses some, swaps the type of some and adds false positives."""
    rng = np.random.default_rng(seed)
    nz, ny, nx = shape
    ref = np.zeros(shape, dtype=np.uint8)
    pred = np.zeros(shape, dtype=np.uint8)

    def centre():
        return (rng.uniform(10, nz - 10), ny * 0.55 + rng.uniform(-25, 25), nx / 2 + rng.uniform(-35, 35))

    for k in range(n_lesions):
        cls = 1 + k % 2
        c, r = centre(), rng.uniform(2.0, 9.0)
        _ball(ref, c, r, cls)
        fate = rng.uniform()
        if fate < 0.15:
            continue  # missed
        pcls = 3 - cls if fate < 0.22 else cls  # wrong type
        shift = rng.normal(0, 0.25 * r, size=3)
        _ball(pred, np.add(c, shift), max(1.0, r * rng.uniform(0.7, 1.25)), pcls)
    for _ in range(10):  # false positives
        _ball(pred, centre(), rng.uniform(1.5, 5.0), int(rng.integers(1, 3)))
    return ref, pred


def write_data(folder: Path, shape, seed: int) -> dict:
    import SimpleITK as sitk

    files = {}
    for stage, (ref, pred) in (("vertebrae", make_vertebrae(shape, seed)), ("metastases", make_metastases(shape, seed=seed))):
        for role, array in (("ref", ref), ("pred", pred)):
            image = sitk.GetImageFromArray(array)
            image.SetSpacing(SPACING_XYZ)
            path = folder / role / stage / "case_000.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(path), True)
            files[(stage, role)] = str(path)
    return {f"{stage}/{role}": path for (stage, role), path in files.items()}


# --------------------------------------------------------------------------------------------
# Workers (each runs in a fresh process)
# --------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


class StepMemory:
    """Peak resident memory a step adds: VmHWM after the step minus VmRSS before it.

    The kernel's high-water mark is reset before the step (``5`` into ``/proc/self/clear_refs``,
    Linux), so what earlier steps of the process allocated does not count.
    """

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        self.before = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        self.added_mib = (_status_kib("VmHWM") - self.before) / 1024
        return False


def _read(ref_path, pred_path):
    import SimpleITK as sitk

    ref_image, pred_image = sitk.ReadImage(ref_path), sitk.ReadImage(pred_path)
    spacing = tuple(reversed(ref_image.GetSpacing()))
    return sitk.GetArrayFromImage(ref_image), sitk.GetArrayFromImage(pred_image), spacing


def _best(fn, repeats: int):
    best, out = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def _panoptica_evaluator(stage: str):
    from panoptica import (
        ConnectedComponentsInstanceApproximator,
        InputType,
        Metric,
        NaiveThresholdMatching,
        Panoptica_Evaluator,
    )
    from panoptica.utils.label_group import LabelGroup
    from panoptica.utils.segmentation_class import SegmentationClassGroups

    from spinemets.labels import foreground_labels

    groups = SegmentationClassGroups({name: LabelGroup(v) for name, v in foreground_labels(stage).items()})
    common = dict(
        # strict: IoU > 0.5, our rule; its default (>=) also matches pairs at exactly 0.5
        instance_matcher=NaiveThresholdMatching(matching_threshold=0.5, strict_threshold=True),
        segmentation_class_groups=groups,
        instance_metrics=[Metric.IOU, Metric.DSC],
        global_metrics=[Metric.DSC, Metric.IOU],
    )
    if stage == "vertebrae":  # each label one instance: labels are the instance ids
        return Panoptica_Evaluator(expected_input=InputType.UNMATCHED_INSTANCE, **common)
    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC, instance_approximator=ConnectedComponentsInstanceApproximator(), **common
    )


def worker(task: str, stage: str, ref_path: str, pred_path: str, repeats: int) -> dict:
    """Import what the task needs, then time the task and measure the memory it adds."""
    import SimpleITK as sitk  # noqa: F401  (every task reads with it)

    from spinemets.labels import foreground_labels
    from spinemets.evaluation.metrics import evaluate_case
    from spinemets.evaluation.evaluate import evaluate_pair

    if task == "panoptica":
        from panoptica.utils.citation_reminder import disable_citation_reminder

        disable_citation_reminder()
        evaluator = _panoptica_evaluator(stage)
    elif task == "nnunet":
        from nnunetv2.evaluation.evaluate_predictions import compute_metrics
        from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    classes = foreground_labels(stage)
    result: dict = {"task": task, "stage": stage}

    if task == "read":
        with StepMemory() as mem:
            result["seconds"], _ = _best(lambda: _read(ref_path, pred_path), repeats)
        result["added_mib"] = mem.added_mib
    elif task == "ours":
        with StepMemory() as mem:
            result["read_compute_seconds"], _ = _best(lambda: evaluate_pair(ref_path, pred_path, stage), 1)
        result["read_compute_added_mib"] = mem.added_mib
        ref, pred, spacing = _read(ref_path, pred_path)
        with StepMemory() as mem:
            result["seconds"], metrics = _best(lambda: evaluate_case(ref, pred, stage, spacing), repeats)
        result["added_mib"] = mem.added_mib
        result["metrics"] = metrics
    elif task == "panoptica":
        ref, pred, spacing = _read(ref_path, pred_path)
        with StepMemory() as mem:
            result["seconds"], out = _best(lambda: evaluator.evaluate(pred, ref, voxelspacing=spacing, verbose=False), 1)
        result["added_mib"] = mem.added_mib
        by_group = {name.lower(): name for name in classes}  # panoptica lower-cases group names
        result["metrics"] = {
            by_group[name]: {k: float(getattr(r, k)) for k in ("tp", "fp", "fn", "rq", "sq", "pq", "global_bin_dsc")}
            for name, r in out.items()
        }
    elif task == "nnunet":
        names = {v: k for k, v in classes.items()}
        with StepMemory() as mem:
            result["seconds"], out = _best(
                lambda: compute_metrics(ref_path, pred_path, SimpleITKIO(), list(classes.values())), 1
            )
        result["added_mib"] = mem.added_mib
        result["metrics"] = {names[v]: {"dice": float(m["Dice"]), "iou": float(m["IoU"])} for v, m in out["metrics"].items()}
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def run_worker(task: str, stage: str, files: dict, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", task, "--stage", stage,
           "--ref", files[f"{stage}/ref"], "--pred", files[f"{stage}/pred"], "--repeats", str(repeats)]
    # A fixed mmap threshold makes glibc hand freed blocks back to the system, so the resident
    # size follows what is alive (with the default, dynamic threshold freed blocks stay resident).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{task}/{stage} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------


def count_ties(stage: str, ref_path: str, pred_path: str) -> int:
    """Instance pairs of one class with IoU exactly 0.5, where panoptica's default (>=) and our rule (>) differ.

    Instances are connected components of each class (metastases) or the labels themselves (vertebrae).
    """
    import cc3d
    import SimpleITK as sitk

    ref = sitk.GetArrayFromImage(sitk.ReadImage(ref_path))
    pred = sitk.GetArrayFromImage(sitk.ReadImage(pred_path))
    if stage == "vertebrae":
        rc, pc = ref, pred
    else:
        rc, pc = cc3d.connected_components(ref), cc3d.connected_components(pred)
    both = (rc > 0) & (pc > 0) & (ref == pred)
    pairs, inter = np.unique(np.stack([rc[both], pc[both]]), axis=1, return_counts=True)
    rs, ps = np.bincount(rc.ravel()), np.bincount(pc.ravel())
    return int(np.sum(3 * inter == rs[pairs[0]] + ps[pairs[1]]))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.inf


def _same(a: float, b: float, tol: float = 1e-9) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= tol


def disagreements(stage: str, ours: dict, panoptica: dict, nnunet: dict) -> list[str]:
    """Differences between our numbers and the peers' (an empty list means they agree)."""
    bad = []
    for name, theirs in panoptica.items():
        mine = ours[name]
        for k in ("tp", "fp", "fn", "rq", "pq"):
            if not _same(mine[k], theirs[k]):
                bad.append(f"{stage}/{name} {k}: ours {mine[k]} panoptica {theirs[k]}")
        if mine["tp"] > 0 and not _same(mine["sq"], theirs["sq"]):
            bad.append(f"{stage}/{name} sq: ours {mine['sq']} panoptica {theirs['sq']}")
        if mine["dice"] == mine["dice"] and not _same(mine["dice"], theirs["global_bin_dsc"]):
            bad.append(f"{stage}/{name} dice: ours {mine['dice']} panoptica {theirs['global_bin_dsc']}")
    for name, theirs in nnunet.items():
        for k in ("dice", "iou"):
            if not _same(ours[name][k], theirs[k]):
                bad.append(f"{stage}/{name} {k}: ours {ours[name][k]} nnU-Net {theirs[k]}")
    return bad


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of the fast measurements (best is kept)")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_metrics.json"))
    parser.add_argument("--worker", choices=TASKS, help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--ref", help=argparse.SUPPRESS)
    parser.add_argument("--pred", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.stage, args.ref, args.pred, args.repeats)))
        return 0

    from spinemets.fileio import write_json

    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        t0 = time.perf_counter()
        files = write_data(Path(tmp), tuple(args.shape), args.seed)
        print(f"wrote synthetic pair {tuple(args.shape)} in {time.perf_counter() - t0:.1f} s", flush=True)
        runs = {}
        for stage in STAGES:
            for task in TASKS:
                repeats = args.repeats if task in ("read", "ours") else 1
                runs[(stage, task)] = r = run_worker(task, stage, files, repeats)
                print(f"{stage:10s} {task:9s} {r['seconds']:8.3f} s  +{r['added_mib']:7.1f} MiB", flush=True)
        ties = {stage: count_ties(stage, files[f"{stage}/ref"], files[f"{stage}/pred"]) for stage in STAGES}

    report = {"shape_zyx": list(args.shape), "spacing_xyz": SPACING_XYZ, "seed": args.seed,
              "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
              "stages": {}}
    ok = True
    for stage in STAGES:
        read, ours, pan, nn = (runs[(stage, t)] for t in TASKS)
        n_ref = sum(ours["metrics"][c]["tp"] + ours["metrics"][c]["fn"] for c in pan["metrics"])
        bad = disagreements(stage, ours["metrics"], pan["metrics"], nn["metrics"])
        ok &= not bad
        ratios = {
            "panoptica_time_over_ours": _ratio(pan["seconds"], ours["seconds"]),
            "ours_time_over_read": _ratio(ours["seconds"], read["seconds"]),
            "nnunet_time_over_ours_read_plus_compute": _ratio(nn["seconds"], ours["read_compute_seconds"]),
            "panoptica_memory_over_ours": _ratio(pan["added_mib"], ours["added_mib"]),
            "nnunet_memory_over_ours_read_plus_compute": _ratio(nn["added_mib"], ours["read_compute_added_mib"]),
        }
        report["stages"][stage] = {
            "reference_instances": n_ref,
            "iou_ties_at_one_half": ties[stage],
            "seconds": {t: runs[(stage, t)]["seconds"] for t in TASKS},
            "ours_read_plus_compute_seconds": ours["read_compute_seconds"],
            "added_mib": {t: runs[(stage, t)]["added_mib"] for t in TASKS},
            "ours_read_plus_compute_added_mib": ours["read_compute_added_mib"],
            "process_peak_rss_mib": {t: runs[(stage, t)]["peak_rss_mib"] for t in TASKS},
            "ratios": ratios,
            "agree": not bad,
            "disagreements": bad,
        }
        print(f"\n{stage}: {n_ref:.0f} reference instances, {ties[stage]} pair(s) at IoU = 0.5 exactly; ours {ours['seconds']:.3f} s compute, "
              f"{ours['read_compute_seconds']:.3f} s read + compute")
        print(f"  panoptica / ours, time (arrays in memory)     {ratios['panoptica_time_over_ours']:7.1f} x  (goal >= 20)")
        print(f"  ours / reading the two files, time            {ratios['ours_time_over_read']:7.2f} x  (goal <= 3)")
        print(f"  nnU-Net / ours, time (read + compute)         {ratios['nnunet_time_over_ours_read_plus_compute']:7.1f} x")
        print(f"  panoptica / ours, added memory                {ratios['panoptica_memory_over_ours']:7.1f} x  (goal > 1)")
        print(f"  nnU-Net / ours, added memory (read + compute) {ratios['nnunet_memory_over_ours_read_plus_compute']:7.1f} x  (goal > 1)")
        print("  numbers agree" if not bad else "  DISAGREE:\n    " + "\n    ".join(bad))
    report["agree"] = ok
    write_json(args.out, report)
    print(f"\nwrote {args.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
