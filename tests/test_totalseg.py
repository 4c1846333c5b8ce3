"""TotalSegmentator as stage 1 (``spinemets predict --vertebrae totalsegmentator``).

TotalSegmentator (the optional extra ``totalsegmentator``, ``tests/totalseg-extra.txt``) is installed by
``make test`` into a folder of its own, ``build/totalseg-extra``, a layer put in front of these tests'
PYTHONPATH and PATH. Its weights cannot be downloaded here, so the module fixture builds the two models
its ``total`` task reads for the vertebrae, in the folder layout and under the dataset names it looks for
(``TOTALSEG_HOME_DIR/nnunet/results``): the 6 mm model of all 117 structures that it crops with
(``Dataset298``, also standing in for the 3 mm model of ``--fast``, ``Dataset297``) and its vertebra part
(``Dataset292``), each a tiny nnU-Net trained for a few iterations on the ci run's vertebra cases with our
labels renumbered to TotalSegmentator's (two trainings, counted in tests/pipeline_guard.py). The real
TotalSegmentator code then loads and runs them, from its own command line, and our localization consumes
its output down to ``lesions.csv``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, skip_or_fail
from spinemets import labels
from spinemets.errors import SpinemetsError
from spinemets.inference import totalseg
from spinemets.paths import Workspace

REQUIREMENTS = REPO / "tests" / "totalseg-extra.txt"
#: TotalSegmentator's datasets for the vertebrae: (id, folder name, trainer it loads, its label map).
CROP = (298, "Dataset298_TotalSegmentator_total_6mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring")
FAST = (297, "Dataset297_TotalSegmentator_total_3mm_1559subj", "nnUNetTrainer_4000epochs_NoMirroring")
PART = (292, "Dataset292_TotalSegmentator_part2_vertebrae_1532subj", "nnUNetTrainerNoMirroring")


def totalseg_layer() -> Path:
    """The extra as ``make test`` installed it into ``build/totalseg-extra``; the tests skip (fail with
    ``SPINEMETS_REQUIRE_TOOLS=1``, as in CI) where it is missing or older than the list."""
    layer = REPO / "build" / "totalseg-extra"
    stamp = layer / ".installed"
    if stamp.is_file() and stamp.read_text() == REQUIREMENTS.read_text():
        return layer
    skip_or_fail(f"TotalSegmentator is not installed in {layer} (or not from the current {REQUIREMENTS.name}); "
                 "run `make test`", "SPINEMETS_REQUIRE_TOOLS")


def test_the_roi_subset_names_exactly_the_structures_the_mapping_turns_into_our_labels():
    layer = totalseg_layer()
    sys.path.insert(0, str(layer))
    try:
        from totalsegmentator.map_to_binary import class_map
    finally:
        sys.path.remove(str(layer))
    total = {name: value for value, name in class_map["total"].items()}
    assert {total[name] for name in totalseg.ROI_SUBSET} == set(labels.TOTALSEGMENTATOR_TOTAL_TO_VERTEBRAE)
    assert totalseg.to_vertebrae(np.array([total["vertebrae_C1"], total["vertebrae_L5"], total["sacrum"],
                                           total["vertebrae_S1"], total["liver"], 0])).tolist() == [1, 24, 25, 25, 0, 0]


def test_arguments_name_the_task_the_structures_and_the_device():
    stage = object.__new__(totalseg.TotalSegmentatorStage)
    stage.device, stage.fast = "cuda", False
    args = stage.arguments(Path("ct.nii.gz"), Path("out.nii.gz"))
    assert args[:8] == ["-i", "ct.nii.gz", "-o", "out.nii.gz", "--ml", "--task", "total", "--device"]
    assert args[8] == "gpu" and "--fast" not in args
    assert args[args.index("--roi_subset") + 1:] == list(totalseg.ROI_SUBSET)
    stage.fast = True
    assert stage.arguments(Path("a"), Path("b"))[-1] == "--fast"


def test_unknown_source_and_missing_totalsegmentator_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(SpinemetsError, match="--vertebrae: unknown vertebra source 'totalseg'"):
        totalseg.check_source("totalseg")
    monkeypatch.setattr(totalseg.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SpinemetsError, match="TotalSegmentator is not installed; pip install 'spinemets"):
        totalseg.installed_version()
    from spinemets.inference.predict import predict

    with pytest.raises(SpinemetsError, match="TotalSegmentator is not installed"):  # before any input is read
        predict(tmp_path / "missing.nii.gz", tmp_path / "out", vertebrae="totalsegmentator")


def test_a_failed_totalsegmentator_run_names_the_case_and_a_missing_map_is_an_error(monkeypatch, tmp_path):
    stage = object.__new__(totalseg.TotalSegmentatorStage)
    stage.device, stage.fast, stage.workspace = "cpu", False, Workspace(tmp_path / "ws")
    from spinemets.training.programs import program_path

    with pytest.raises(SpinemetsError, match=r"program no-such-program not found .*; pip install 'spinemets\[total"):
        program_path("no-such-program", totalseg.INSTALL_HINT)
    monkeypatch.setattr(totalseg, "program_path", lambda *a, **k: "/bin/true")
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6), np.int16))

    def fails(program, args, workspace):
        raise SpinemetsError(f"{program}: {program} failed (exit 1)")

    monkeypatch.setattr(totalseg, "run_nnunet", fails)
    with pytest.raises(SpinemetsError, match="^case c1: TotalSegmentator: TotalSegmentator failed"):
        stage.segment_image(image, "case c1")
    monkeypatch.setattr(totalseg, "run_nnunet", lambda program, args, workspace: None)  # "succeeds", writes nothing
    with pytest.raises(SpinemetsError, match="^case c1: TotalSegmentator wrote no label map"):
        stage.segment_image(image, "case c1")

    def writes_other_grid(program, args, workspace):  # its map on a grid of another origin: put onto the CT's
        out = sitk.GetImageFromArray(np.full((4, 5, 6), 27, np.uint8))  # vertebrae_L5 everywhere
        out.SetOrigin((1.0, 0.0, 0.0))
        sitk.WriteImage(out, args[args.index("-o") + 1])

    monkeypatch.setattr(totalseg, "run_nnunet", writes_other_grid)
    labels_zyx = stage.segment_image(image, "case c1")
    assert labels_zyx.shape == (4, 5, 6) and set(np.unique(labels_zyx)) == {0, 24}  # L5; the shifted column empty
    assert (labels_zyx[:, :, 0] == 0).all() and (labels_zyx[:, :, 1:] == 24).all()


def _tiny_model(ci_vertebrae: Workspace, home: Path, build: Path, spec, ours_to_theirs: dict[int, int],
                names: dict[int, str], cases: list[str]) -> None:
    """One tiny nnU-Net of TotalSegmentator's layout in ``home``: ``cases`` of the ci run's vertebra dataset
    with our labels renumbered (``ours_to_theirs``), planned and trained for a few iterations, then
    put where TotalSegmentator reads dataset ``spec`` (its folder, trainer name and fold 0)."""
    import torch

    from spinemets.training.programs import run_nnunet

    dataset_id, folder, trainer = spec
    nn = Workspace(build / str(dataset_id))
    raw = nn.raw / folder
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    source = ci_vertebrae.raw / ci_vertebrae.dataset_name("vertebrae")
    table = np.zeros(256, np.uint8)
    for ours, theirs in ours_to_theirs.items():
        table[ours] = theirs
    for case in cases:
        shutil.copy(source / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesTr" / f"{case}_0000.nii.gz")
        seg = sitk.ReadImage(str(source / "labelsTr" / f"{case}.nii.gz"))
        out = sitk.GetImageFromArray(table[sitk.GetArrayFromImage(seg)])
        out.CopyInformation(seg)
        sitk.WriteImage(out, str(raw / "labelsTr" / f"{case}.nii.gz"))
    (raw / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "CT"}, "labels": {"background": 0, **{name: value for value, name in names.items()}},
        "numTraining": len(cases), "file_ending": ".nii.gz"}))
    run_nnunet("nnUNetv2_plan_and_preprocess", ["-d", str(dataset_id), "-c", "3d_fullres", "-np", "1",
                                                "-gpu_memory_target", "0.1", "-overwrite_target_spacing",
                                                "4.5", "3.75", "3.75"], nn)
    run_nnunet("nnUNetv2_train", [str(dataset_id), "3d_fullres", "all", "-tr", "SpinemetsSmokeTrainer", "-device", "cpu"], nn,
               env={"SPINEMETS_SMOKE_EPOCHS": "1", "SPINEMETS_SMOKE_ITERATIONS": "3"})
    trained = nn.results / folder / "SpinemetsSmokeTrainer__nnUNetPlans__3d_fullres"
    target = home / "nnunet" / "results" / folder / f"{trainer}__nnUNetPlans__3d_fullres"
    target.mkdir(parents=True)
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy(trained / name, target / name)
    (target / "fold_0").mkdir()
    checkpoint = torch.load(trained / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = trainer  # the trainer TotalSegmentator's models name (it knows its own)
    torch.save(checkpoint, target / "fold_0" / "checkpoint_final.pth")


@pytest.fixture(scope="module")
def totalseg_home(ci_run, tmp_path_factory):
    """``TOTALSEG_HOME_DIR`` with tiny models of TotalSegmentator's layout, trained on the ci run's vertebra cases."""
    layer = totalseg_layer()
    sys.path.insert(0, str(layer))
    try:
        from totalsegmentator.map_tasks_config import TASK_CONFIGS, TASK_ID_WEIGHTS_CONFIGS
        from totalsegmentator.map_to_binary import class_map, class_map_5_parts
    finally:
        sys.path.remove(str(layer))
    ci = Workspace(ci_run / "workspace" / "ci")
    cases = sorted(p.name[: -len(".nii.gz")] for p in (ci.raw / ci.dataset_name("vertebrae") / "labelsTr").glob("*.nii.gz"))[:4]
    home, build = tmp_path_factory.mktemp("totalseg_home"), tmp_path_factory.mktemp("totalseg_build")
    total = {name: value for value, name in class_map["total"].items()}
    part = {name: value for value, name in class_map_5_parts["class_map_part_vertebrae"].items()}
    ours = {value: name for name, value in labels.foreground_labels("vertebrae").items()}
    theirs_name = {v: ("sacrum" if name == "Sacrum" else f"vertebrae_{name}") for v, name in ours.items()}
    _tiny_model(ci, home, build, CROP, {v: total[n] for v, n in theirs_name.items()}, class_map["total"], cases)
    _tiny_model(ci, home, build, PART, {v: part[n] for v, n in theirs_name.items()},
                class_map_5_parts["class_map_part_vertebrae"], cases)
    shutil.copytree(home / "nnunet" / "results" / CROP[1], home / "nnunet" / "results" / FAST[1])  # --fast's 3 mm model
    # TotalSegmentator makes sure every part of its "total" task is there before it runs the ones the
    # roi subset needs (only the vertebra part here): the other parts' folders, empty, stand in for them
    for task_id in TASK_CONFIGS["total"]["sub_modes"]["default"]["task_id"]:
        (home / "nnunet" / "results" / TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"]).mkdir(exist_ok=True)
    assert TASK_ID_WEIGHTS_CONFIGS[PART[0]]["foldername"] == PART[1] and TASK_ID_WEIGHTS_CONFIGS[CROP[0]]["foldername"] == CROP[1]
    # TotalSegmentator's settings in its home: no usage statistics sent from a test
    (home / "config.json").write_text(json.dumps({"totalseg_id": "totalseg_TESTS000", "send_usage_stats": False,
                                                  "prediction_counter": 0}))
    return home


@pytest.fixture
def with_totalsegmentator(totalseg_home, monkeypatch):
    """TotalSegmentator's layer on this process's path and its child processes', and its home."""
    layer = totalseg_layer()
    monkeypatch.syspath_prepend(str(layer))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(layer), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("PATH", os.pathsep.join([str(layer / "bin"), os.environ["PATH"]]))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(totalseg_home))
    monkeypatch.delenv("TOTALSEG_WEIGHTS_PATH", raising=False)
    return totalseg_home


@pytest.mark.slow
def test_totalsegmentator_runs_as_stage_one_from_its_own_entry_point_to_lesions_csv(ci_run, with_totalsegmentator,
                                                                                      tmp_path):
    import pandas as pd

    from spinemets.inference.predict import predict

    ci = Workspace(ci_run / "workspace" / "ci")
    ct = sorted(ci.test_images("vertebrae").glob("*_0000.nii.gz"))[0]
    case = ct.name[: -len("_0000.nii.gz")]
    out = tmp_path / "pred"
    predict(ct, out, profile="ci", workspace=ci, device="cpu", vertebrae="totalsegmentator")
    # TotalSegmentator's own output for the same CT, from its own command line, mapped with the built-in mapping
    from spinemets.training.programs import run_nnunet

    direct = tmp_path / "direct.nii.gz"
    stage = object.__new__(totalseg.TotalSegmentatorStage)
    stage.device, stage.fast = "cpu", False
    run_nnunet(totalseg.PROGRAM, stage.arguments(ct, direct), ci)
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(direct)))
    assert set(np.unique(theirs)) <= set(labels.TOTALSEGMENTATOR_TOTAL_TO_VERTEBRAE) | {0}
    vertebrae = sitk.GetArrayFromImage(sitk.ReadImage(str(out / case / "vertebrae.nii.gz")))
    assert vertebrae.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(ct))).shape
    # the ci profile clears vertebra fragments below its min_vertebra_ml and no more: every voxel kept is
    # TotalSegmentator's label, mapped
    kept = vertebrae > 0
    assert np.array_equal(vertebrae[kept], totalseg.to_vertebrae(theirs)[kept])
    assert (totalseg.to_vertebrae(theirs) > 0).sum() >= kept.sum()
    lesions = pd.read_csv(out / "lesions.csv")
    assert (out / case / "lesions.csv").is_file() and list(lesions.columns) == list(labels.LESION_COLUMNS)
    known = set(labels.VERTEBRAE) | {"outside spine"}
    assert set(lesions["level"]) <= known  # localized against TotalSegmentator's vertebrae
    print(f"TotalSegmentator's vertebra voxels: {int(kept.sum())}, labels {sorted(set(np.unique(vertebrae)) - {0})}; "
          f"lesions: {len(lesions)}, levels {sorted(set(lesions['level']))}")
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["parameters"]["vertebrae"] == "totalsegmentator"
    assert provenance["parameters"]["repair_order"] is False  # its labels are its own
    stage1 = provenance["models"]["vertebrae"][0]
    assert stage1["model"].startswith("TotalSegmentator 2.") and stage1["mode"] == "default (1.5 mm)"
    assert stage1["weights"] == str(with_totalsegmentator / "nnunet" / "results")
    assert provenance["domain"]["training"]["vertebrae"] is None  # no domain record for a model not trained here


@pytest.mark.slow
def test_fast_mode_from_the_command_line(ci_run, with_totalsegmentator, tmp_path):
    from spinemets.cli import main

    ci = Workspace(ci_run / "workspace" / "ci")
    ct = sorted(ci.test_images("vertebrae").glob("*_0000.nii.gz"))[0]
    code = main(["predict", "--input", str(ct), "--out", str(tmp_path / "pred"), "--profile", "ci",
                 "--workspace", str(ci.root), "--device", "cpu", "--vertebrae", "totalsegmentator-fast"])
    assert code in (0, None)
    provenance = json.loads((tmp_path / "pred" / "provenance.json").read_text())
    assert provenance["models"]["vertebrae"][0]["mode"] == "fast (3 mm)"
