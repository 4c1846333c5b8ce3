#!/usr/bin/env bash
# GPU check of the paper's whole protocol for both nnU-Net stages (estimated 25 minutes on one H100).
#
# It runs the path of the paper profile, at a small scale, on CUDA (profile gpu_check: the smoke
# profile's protocol with nnU-Net's default plans and training):
#  1. synthesizes a cohort (preset $PRESET, $CASES cases, the last $HOLDOUT held out) and imports both stages;
#  2. plans each stage with nnU-Net's own planner (2d, 3d_lowres, 3d_fullres, 3d_cascade_fullres; on the
#     full-size preset nothing is dropped), trains folds 0 and 1 of a two-fold split of every configuration for
#     $EPOCHS epochs of $ITERATIONS iterations with nnU-Net's default training (SpinemetsGPUCheckTrainer, final
#     validation with mirroring and --npz), then runs nnUNetv2_find_best_configuration;
#  3. runs nnUNetTrainerBenchmark_5epochs_noDataLoading on the vertebra 3d_fullres plan and compares its fastest
#     epoch with the fastest 3d_fullres epoch of our training (goal: within 10 %);
#  4. predicts the held-out cases with the selected model, ensemble or cascade and its postprocessing.pkl, and
#     reports mean vertebra Dice and lesion F2.
#
# Everything goes to $WORK (default: a new temporary folder); the summary is printed and written to
# $WORK/gpu_check.json (and copied to $OUT when that is set).
#
# Python packages: the spinemets dependencies. On a machine without network that already has torch, numpy,
# scipy, pandas, scikit-image, matplotlib, seaborn, timm, einops, tqdm, pyyaml (e.g. a CUDA PyTorch image), put
# wheels (cp312, manylinux x86_64) of these in .whl/ of the repository and the script installs them into
# /tmp/site first: nnunetv2 acvl-utils batchgenerators batchgeneratorsv2 dynamic-network-architectures SimpleITK
# nibabel graphviz imagecodecs yacs blosc2 ndindex numexpr pydantic pydantic-core annotated-types
# typing-inspection slicerio pynrrd connected-components-3d (and h2/hpack/hyperframe for httpx[http2]).
#
# PROFILE=gpu_check_resenc_m (or _l) runs the same check with nnU-Net's residual-encoder preset M (or L):
# nnUNetPlannerResEncM plans (nnUNetResEncUNetMPlans), everything else as gpu_check.
#
# Not yet run on a GPU (none was available when it was written). The same protocol runs on a CPU in CI
# (profile smoke, tests/test_smoke.py); the dry run below checks this script's plumbing on a CPU (PROFILE=smoke
# plans all four configurations on the small demo preset, where nnU-Net's default plans would drop 3d_lowres):
#   DEVICE=cpu PROFILE=smoke PRESET=demo CASES=8 HOLDOUT=2 EPOCHS=1 ITERATIONS=2 BENCH=0 scripts/gpu_check.sh
set -euo pipefail

PY=${PYTHON:-python3}
PRESET=${PRESET:-full}
CASES=${CASES:-6}
HOLDOUT=${HOLDOUT:-2}
EPOCHS=${EPOCHS:-2}
ITERATIONS=${ITERATIONS:-250}
DEVICE=${DEVICE:-cuda}
PROFILE=${PROFILE:-gpu_check}
BENCH=${BENCH:-1}
JOBS=${JOBS:-$(nproc)}
WORK=${WORK:-$(mktemp -d -t spinemets-gpu-check-XXXX)}
REPO=$(cd "$(dirname "$0")/.." && pwd)

if [ -d "$REPO/.whl" ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$REPO/src:${PYTHONPATH:-}
export PYTHONUNBUFFERED=1
export nnUNet_n_proc_DA=${nnUNet_n_proc_DA:-$(( JOBS > 2 ? JOBS - 2 : 1 ))}
export SPINEMETS_GPU_CHECK_EPOCHS=$EPOCHS SPINEMETS_GPU_CHECK_ITERATIONS=$ITERATIONS
export SPINEMETS_SMOKE_EPOCHS=$EPOCHS SPINEMETS_SMOKE_ITERATIONS=$ITERATIONS

"$PY" - <<'EOF' || { echo "missing Python packages: install the spinemets dependencies (pip install -e .) or provide .whl/"; exit 2; }
import cc3d, nnunetv2, nrrd, SimpleITK, slicerio, torch  # noqa: F401
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

sm() { "$PY" -c 'import sys; from spinemets.cli import main; sys.exit(main())' "$@"; }
stamp() { date +%s.%N; }
WS=$WORK/ws
echo "work folder: $WORK"

t0=$(stamp)
sm synth --out "$WORK/cohort" --cases "$CASES" --seed 1 --preset "$PRESET" --jobs "$JOBS"
sm scan "$WORK/cohort" --out "$WORK/manifest.csv" --holdout "$HOLDOUT"
for stage in vertebrae metastases; do
  sm import --manifest "$WORK/manifest.csv" --stage "$stage" --out "$WS/raw" --jobs "$JOBS"
done
t1=$(stamp)
for stage in vertebrae metastases; do
  sm train --stage "$stage" --profile "$PROFILE" --workspace "$WS" --device "$DEVICE"
done
t2=$(stamp)
if [ "$BENCH" = 1 ]; then
  "$PY" - "$WS" "$DEVICE" "$PROFILE" <<'EOF'
import sys
from spinemets.paths import Workspace
from spinemets.training.profiles import profile_plans
from spinemets.training.programs import run_nnunet
ws = Workspace(sys.argv[1])
run_nnunet("nnUNetv2_train", ["501", "3d_fullres", "all", "-tr", "nnUNetTrainerBenchmark_5epochs_noDataLoading",
           "-p", profile_plans(sys.argv[3]), "-device", sys.argv[2]], ws)
EOF
fi
t3=$(stamp)
sm predict --input "$WS/raw/Dataset501_Vertebrae/imagesTs" --out "$WORK/pred" --profile "$PROFILE" \
  --workspace "$WS" --device "$DEVICE"
t4=$(stamp)

"$PY" - "$WORK" "$t0" "$t1" "$t2" "$t3" "$t4" "$PROFILE" <<'EOF'
import json, sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from spinemets.report import figures

from spinemets.evaluation import metrics

from spinemets.paths import Workspace
from spinemets.training import nnunet
from spinemets.training.profiles import profile_plans, stage_plan

work = Path(sys.argv[1])
t0, t1, t2, t3, t4 = map(float, sys.argv[2:7])
ws = Workspace(work / "ws")
summary = {"timings_s": {"synth_import": t1 - t0, "train_both_stages": t2 - t1, "benchmark": t3 - t2,
                         "predict": t4 - t3}}
profile = sys.argv[7]
for stage in ("vertebrae", "metastases"):
    entry = stage_plan(stage, profile)
    trained = {}
    for cfg in entry["configurations"]:
        for fold in entry["folds"]:
            folder = ws.model_folder(stage, cfg, entry["trainer"], plans=profile_plans(profile)) / f"fold_{fold}"
            if not (folder / nnunet.CHECKPOINT_FINAL).exists():
                continue
            log = figures.read_logging(folder)
            trained[f"{cfg}/fold_{fold}"] = {"epochs": len(log["epoch_seconds"]), "epoch_s": log["epoch_seconds"],
                                             "fastest_epoch_s": min(log["epoch_seconds"]),
                                             "final_pseudo_dice": log["mean_fg_dice"][-1]}
    info = ws.results / ws.dataset_name(stage) / "inference_information.json"
    best = json.loads(info.read_text())["best_model_or_ensemble"] if info.exists() else {}
    summary[stage] = {"trained": trained,
                      "selected": [m["configuration"] for m in best.get("selected_model_or_models", [])],
                      "postprocessing_file": best.get("postprocessing_file"),
                      "fastest_3d_fullres_epoch_s": min((v["fastest_epoch_s"] for k, v in trained.items()
                                                         if k.startswith("3d_fullres/")), default=None)}
bench = ws.model_folder("vertebrae", "3d_fullres", "nnUNetTrainerBenchmark_5epochs_noDataLoading") / "fold_all" / "benchmark_result.json"
if bench.exists():
    result = json.loads(bench.read_text())
    fastest = min(v["fastest_epoch"] for v in result.values() if isinstance(v.get("fastest_epoch"), (int, float)))
    ours = summary["vertebrae"]["fastest_3d_fullres_epoch_s"]
    summary["benchmark"] = {"fastest_epoch_no_data_loading_s": fastest, "ours_fastest_epoch_s": ours,
                            "ratio_ours_over_benchmark": ours / fastest, "goal": "<= 1.10"}
vert_dice, lesion = [], {"lytic": [], "sclerotic": []}
counts = np.zeros((3, 3))  # class x (tp, fp, fn), pooled
for ref_path in sorted((ws.raw / "Dataset501_Vertebrae" / "labelsTs").glob("*.nii.gz")):
    case = ref_path.name[: -len(".nii.gz")]
    for stage, dataset in (("vertebrae", "Dataset501_Vertebrae"), ("metastases", "Dataset502_Metastases")):
        ref_image = sitk.ReadImage(str(ws.raw / dataset / "labelsTs" / ref_path.name))
        ref = sitk.GetArrayFromImage(ref_image)
        pred = sitk.GetArrayFromImage(sitk.ReadImage(str(work / "pred" / case / f"{stage}.nii.gz")))
        result = metrics.evaluate_case(ref, pred, stage, ref_image.GetSpacing()[::-1])
        if stage == "vertebrae":
            present = set(np.unique(ref)) - {0}
            names = {v: k for k, v in metrics.foreground_labels("vertebrae").items()}
            vert_dice += [result[names[v]]["dice"] for v in present]
        else:
            m = metrics.match_components(ref, pred).counts(3)
            counts += np.stack([m.tp, m.fp, m.fn], axis=1)
summary["held_out"] = {"cases": len(list((ws.raw / "Dataset501_Vertebrae" / "labelsTs").glob("*.nii.gz"))),
                       "mean_vertebra_dice": float(np.mean(vert_dice)) if vert_dice else float("nan")}
for value, name in ((1, "lytic"), (2, "sclerotic")):
    tp, fp, fn = counts[value]
    summary["held_out"][f"lesion_f2_{name}"] = float(5 * tp / (5 * tp + 4 * fn + fp)) if tp + fp + fn else float("nan")
tp, fp, fn = counts[1:].sum(axis=0)
summary["held_out"]["lesion_f2_all"] = float(5 * tp / (5 * tp + 4 * fn + fp)) if tp + fp + fn else float("nan")
text = json.dumps(summary, indent=2, default=float)
print(text)
(work / "gpu_check.json").write_text(text)
EOF
if [ -n "${OUT:-}" ]; then cp "$WORK/gpu_check.json" "$OUT/"; fi
