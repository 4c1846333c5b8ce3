"""Benchmark of the whole ``spinemets evaluate`` process against the floor of reading its two files.

Writes one seeded synthetic reference/prediction pair per stage (``bench_metrics.write_data``:
default 300 x 512 x 512 voxels, 25 vertebra labels; about 40 lesions of both types) as flat folders
``ref/STAGE/case_000.nii.gz`` and ``pred/STAGE/case_000.nii.gz``, and times, each as a fresh
Python process (start-up and imports included), the best of ``--repeats``:

* ``floor``: importing SimpleITK and reading the two files into arrays, nothing else;
* ``evaluate``: ``python -m spinemets.cli evaluate --ref ... --pred ... --stage STAGE --out ...``:
  reading and checking both files, every metric of the stage, and writing the tables (and, for the
  metastases, the detection tables; ``froc.png`` is drawn only with ``--plot``, not timed here).

The goal is ``evaluate`` at most 1.5 x ``floor`` on both stages. ``--before SRC`` times the same
command with the package of another source tree (e.g. a checkout of an earlier commit's ``src``)
in the same run, on the same files, so that both columns share the machine's load. The machine
may be shared: timings are noisy, the ratios are what count.

    python benchmarks/bench_evaluate.py [--shape 300 512 512] [--repeats 3] [--before /tmp/base/src]
        [--out benchmarks/results/bench_evaluate.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_metrics import SPACING_XYZ, write_data  # noqa: E402

STAGES = ("vertebrae", "metastases")
FLOOR = "import sys, SimpleITK as sitk; [sitk.GetArrayFromImage(sitk.ReadImage(p)) for p in sys.argv[1:]]"


def _timed(cmd: list[str], env: dict[str, str], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        best = min(best, seconds)
    return best


def _environment(src: Path | None) -> dict[str, str]:
    env = dict(os.environ, TQDM_DISABLE="1")
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(300, 512, 512), metavar=("Z", "Y", "X"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each process (best is kept)")
    parser.add_argument("--before", type=Path, default=None,
                        help="a source folder holding an earlier spinemets package, timed beside this one")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "bench_evaluate.json"))
    args = parser.parse_args(argv)

    here = Path(__file__).resolve().parents[1] / "src"
    trees = {"now": here, **({"before": args.before.resolve()} if args.before else {})}
    seconds: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        tmp = Path(tmp)
        files = write_data(tmp, tuple(args.shape), args.seed)
        for stage in STAGES:
            ref, pred = files[f"{stage}/ref"], files[f"{stage}/pred"]
            row = {"floor": _timed([sys.executable, "-c", FLOOR, ref, pred], _environment(None), args.repeats)}
            for name, src in trees.items():
                out = tmp / f"out_{name}_{stage}"
                cmd = [sys.executable, "-m", "spinemets.cli", "evaluate", "--ref", str(Path(ref).parent),
                       "--pred", str(Path(pred).parent), "--stage", stage, "--out", str(out)]
                row[f"evaluate_{name}"] = _timed(cmd, _environment(src), args.repeats)
            seconds[stage] = row
    ratios = {stage: {k[len("evaluate_"):]: row[k] / row["floor"] for k in row if k.startswith("evaluate_")}
              for stage, row in seconds.items()}
    doc = {"shape_zyx": list(args.shape), "spacing_xyz": list(SPACING_XYZ), "seed": args.seed,
           "repeats": args.repeats, "python": platform.python_version(), "machine": platform.machine(),
           "cpus": os.cpu_count(), "load_average_at_end": list(os.getloadavg()),
           "trees": {k: str(v) for k, v in trees.items()}, "seconds": seconds, "evaluate_over_floor": ratios}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for stage in STAGES:
        row = seconds[stage]
        cols = "  ".join(f"{name}: {row['evaluate_' + name]:6.2f} s = {ratios[stage][name]:4.2f} x" for name in trees)
        print(f"{stage:>10}: floor {row['floor']:6.2f} s  evaluate {cols}  (goal <= 1.5 x)")
    print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
