"""Import of one clinical-size case, as a ratio to the floor measured in the same run.

The floor is what any import must do: read the CT and the mask with SimpleITK and write the
NIfTI pair, nothing else. ``spinemets import`` adds hashing (for reruns), name mapping, placement
on the CT grid and validation. Goal: at most 2x the floor.

    .venv/bin/python benchmarks/bench_import.py [--repeat 3] [--json result.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from spinemets.cohort import dataset, synth


def _best_of(repeat: int, fn) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-import-"))
    try:
        synth.synthesize_cohort(work / "cohort", cases=1, seed=0, preset="full")
        case = next(p for p in (work / "cohort").iterdir() if p.is_dir())
        size = sitk.ReadImage(str(case / "ct.nrrd")).GetSize()
        manifest = dataset.scan(work / "cohort")
        results = {"case_size_xyz": list(size)}
        for stage in ("vertebrae", "metastases"):
            mask = case / f"{stage}.seg.nrrd"
            out = work / "floor"
            out.mkdir(exist_ok=True)

            def floor():
                sitk.WriteImage(sitk.ReadImage(str(case / "ct.nrrd")), str(out / "ct.nii.gz"), True)
                sitk.WriteImage(sitk.ReadImage(str(mask)), str(out / "seg.nii.gz"), True)

            def ours():
                shutil.rmtree(work / "raw", ignore_errors=True)  # a first import, not a rerun
                dataset.import_dataset(manifest, stage, work / "raw")

            t_floor, t_ours = _best_of(args.repeat, floor), _best_of(args.repeat, ours)
            results[stage] = {"floor_s": round(t_floor, 3), "spinemets_s": round(t_ours, 3),
                              "ratio_to_floor": round(t_ours / t_floor, 2)}
            print(f"{stage:10s} floor {t_floor:6.2f} s   spinemets import {t_ours:6.2f} s   "
                  f"ratio {t_ours / t_floor:4.2f}x (goal <= 2x)")
        if args.json:
            args.json.write_text(json.dumps(results, indent=2) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
