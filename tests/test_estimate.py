"""spinemets.training.estimate: the run's expected time on this machine, and the runner's lines before and during it."""

from __future__ import annotations

import json

import pytest

from spinemets.training import estimate

from spinemets.run import runner
from spinemets.errors import SpinemetsError
from spinemets.training import profiles as profiles_mod
from test_runner import project  # noqa: F401  (the fixture: a tiny project of two notebooks)
from spinemets.training.profiles import DEMO_BUDGET_S, stage_budget

REFERENCE_MACHINE = {"torch_s": estimate.REFERENCE["torch_s"], "numpy_s": estimate.REFERENCE["numpy_s"],
                     "cores": 2, "torch_threads": 2, "torch_capability": "AVX2"}


def test_measure_machine_times_both_workloads():
    machine = estimate.measure_machine(seconds=0.3)
    assert machine["torch_s"] > 0 and machine["numpy_s"] > 0 and machine["cores"] >= 1
    assert machine["torch_capability"]


def test_speed_ratio_is_the_mean_of_both_time_ratios():
    assert estimate.speed_ratio(REFERENCE_MACHINE) == pytest.approx(1.0)
    twice_as_slow_torch = dict(REFERENCE_MACHINE, torch_s=2 * estimate.REFERENCE["torch_s"])
    assert estimate.speed_ratio(twice_as_slow_torch) == pytest.approx(1.5)


def test_estimate_adds_the_training_budget_to_the_scaled_reference_times():
    ref = estimate.REFERENCE["steps"]["demo"]
    steps = ["01_dataset", "03_training_vertebrae"]
    budgets = {"03_training_vertebrae": 100.0}
    faster = dict(REFERENCE_MACHINE, torch_s=REFERENCE_MACHINE["torch_s"] / 2, numpy_s=REFERENCE_MACHINE["numpy_s"] / 2)
    expected = estimate.estimate_run("demo", steps, budgets, faster)
    assert expected == pytest.approx({"01_dataset": ref["01_dataset"] / 2,
                                      "03_training_vertebrae": ref["03_training_vertebrae"] / 2 + 100.0,
                                      "book": ref["book"] / 2})
    assert "book" not in estimate.estimate_run("demo", steps, budgets, faster, book=False)
    # no reference times for the profile, an unknown step, or a training step without a budget: no estimate
    assert estimate.estimate_run("paper", steps, budgets, faster) is None
    assert estimate.estimate_run("demo", steps + ["07_new"], budgets, faster) is None
    assert estimate.estimate_run("demo", steps, {"03_training_vertebrae": None}, faster) is None
    # fixed work: the timed seconds per iteration (times the loop's share) and the validation passes
    work = {"iterations": 1000, "seconds_per_iteration": 0.5, "epochs": 20, "val_iterations": 3,
            "seconds_per_val_iteration": 0.1, "timed_iterations": 3, "bf16_autocast": False}
    fixed = estimate.estimate_run("demo", steps, {"03_training_vertebrae": work}, faster)
    assert fixed["03_training_vertebrae"] == pytest.approx(
        ref["03_training_vertebrae"] / 2 + 1000 * 0.5 * estimate.LOOP_FACTOR + 20 * 3 * 0.1)
    lines = estimate.format_estimate(fixed, faster, {"03_training_vertebrae": work})
    assert "  03_training_vertebrae: 1000 training iterations at 0.50 s (timed here: 3 iterations" in lines[1]
    lines = estimate.format_estimate(expected, faster)
    assert lines[0].startswith("This machine: 2 cores, torch kernels AVX2, 0.50x the reference machine's time")
    assert lines[-1].split() == ["total", f"~{sum(expected.values()) / 60:.1f}", "min", "(expected", "on", "this",
                                 "machine)"]


def test_run_prints_the_estimate_and_the_time_left_per_step(project, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setitem(estimate.REFERENCE["steps"], "tiny", {"a_write": 30.0, "b_read": 90.0, "book": 60.0})
    monkeypatch.setattr(estimate, "measure_machine", lambda seconds=3.0: dict(REFERENCE_MACHINE))
    out = runner.run("tiny", build_book=False, root=project)
    printed = capsys.readouterr().out
    assert "a_write  ~0.5 min" in printed and "total    ~2.0 min" in printed
    assert "[1/2] a_write: expected ~0.5 min; run so far 0.0 min, about 2.0 min left" in printed
    assert "[2/2] b_read: expected ~1.5 min;" in printed and "about 1.5 min left" in printed
    assert "[2/2] b_read: done in" in printed
    record = json.loads((out / "provenance.json").read_text())
    assert record["estimate"]["steps"] == {"a_write": 30.0, "b_read": 90.0}
    assert [n["expected_s"] for n in record["notebooks"]] == [30.0, 90.0]
    # the jobs of a cluster run leave the estimate out
    out = runner.run("tiny", build_book=False, root=project, estimate=False)
    assert "estimate" not in json.loads((out / "provenance.json").read_text())
    assert "expected ~" not in capsys.readouterr().out
    # a profile without reference times runs as before, without an estimate
    monkeypatch.delitem(estimate.REFERENCE["steps"], "tiny")
    out = runner.run("tiny", build_book=False, root=project)
    assert "estimate" not in json.loads((out / "provenance.json").read_text())
    assert "expected ~" not in capsys.readouterr().out


def test_stage_budget_shares_a_total_in_the_profiles_proportions():

    own = DEMO_BUDGET_S
    assert stage_budget("vertebrae", "demo") is None  # fixed iterations unless a total is given
    assert stage_budget("vertebrae", "demo", 6) == pytest.approx(360 * own["vertebrae"] / sum(own.values()))
    assert stage_budget("metastases", "demo", 6) == pytest.approx(360 * own["metastases"] / sum(own.values()))
    assert stage_budget("vertebrae", "ci") is None  # a fixed iteration count
    assert stage_budget("metastases", "ci", 4) == pytest.approx(120.0)  # no proportions: an equal share
    for bad in (0, -1, float("inf"), float("nan"), "soon"):
        with pytest.raises(SpinemetsError, match="must be a positive number"):
            stage_budget("vertebrae", "demo", bad)


def test_cli_train_budget_reaches_the_training_notebooks(capsys):
    from spinemets import cli

    assert cli.main(["run", "--profile", "demo", "--dry-run", "--train-budget", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    training = [line for line in lines if line.startswith("03_training")]
    assert len(training) == 2 and all("'train_budget_min': 3" in line for line in training)
    assert not any("train_budget_min" in line for line in lines if not line.startswith("03_training"))
    assert cli.main(["run", "--profile", "demo", "--executor", "slurm", "--train-budget", "3"]) != 0
    assert "--train-budget: cluster jobs train for the profile's budget" in capsys.readouterr().err
    assert cli.main(["train", "--stage", "vertebrae", "--executor", "slurm", "--train-budget", "3"]) != 0
    assert "--train-budget: jobs train for the profile's budget" in capsys.readouterr().err


def test_training_is_timed_on_the_stages_own_network(tmp_path):
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from spinemets.training import nnunet
    from spinemets.training.trainers.spinemets_trainers import use_cpu_bf16
    from test_nnunet import _plans

    for stage, classes in (("vertebrae", 26), ("metastases", 3)):
        name = f"demo_{stage}"
        spec = profiles_mod.DEMO_CONFIGURATIONS[name]
        # the timed network is the one nnU-Net builds from the plans entry the stage trains with
        (tmp_path / stage).mkdir()
        path = _plans(tmp_path / stage)
        nnunet.add_configuration(path, name, spec)
        cm = PlansManager(str(path)).get_configuration(name)
        planned = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                         cm.network_arch_init_kwargs_req_import, 1, classes, deep_supervision=True)
        timed = estimate.network_for(spec, classes)
        assert [p.shape for p in timed.parameters()] == [p.shape for p in planned.parameters()]
    spec = profiles_mod.DEMO_CONFIGURATIONS["demo_metastases"]
    result = estimate.time_training_iterations(spec, 3, iterations=2)
    assert result["seconds_per_iteration"] > 0 and result["seconds_per_val_iteration"] > 0
    assert result["timed_iterations"] == 2 and result["bf16_autocast"] == use_cpu_bf16(torch.device("cpu"))


def test_run_estimate_times_each_stage_with_fixed_work(monkeypatch, capsys):
    from spinemets.run.profiles import load_profile

    timed, settings = [], []
    monkeypatch.delenv("SPINEMETS_CPU_BF16", raising=False)

    def timing(spec, classes, iterations=3, seed=0, bf16_setting=None):
        timed.append((tuple(spec["patch_size"]), classes))
        settings.append(bf16_setting)
        return {"seconds_per_iteration": 0.5 if classes == 26 else 0.1, "seconds_per_val_iteration": 0.05,
                "timed_iterations": iterations, "bf16_autocast": False}

    monkeypatch.setattr(estimate, "measure_machine", lambda seconds=3.0: dict(REFERENCE_MACHINE))
    monkeypatch.setattr(estimate, "time_training_iterations", timing)
    prof = load_profile("demo")
    plans = runner.dry_run(prof)
    assert runner.training_work("vertebrae", "demo")["iterations"] == profiles_mod.planned_iterations("vertebrae", "demo")
    assert runner.training_work("vertebrae", "demo", 15) == pytest.approx(profiles_mod.stage_budget("vertebrae", "demo", 15))
    assert runner.training_work("vertebrae", "paper") is None  # nnU-Net's own trainer: no estimate
    result = runner.run_estimate(prof, plans, build_book=True)
    assert sorted(timed) == sorted([((80, 32, 32), 26), ((32, 32, 32), 3)])  # each stage's own network, once
    ref = estimate.REFERENCE["steps"]["demo"]
    assert result["steps"]["03_training_vertebrae"] == pytest.approx(
        ref["03_training_vertebrae"] + 1000 * 0.5 * estimate.LOOP_FACTOR + 20 * 3 * 0.05, abs=0.1)
    assert result["training"]["03_training_metastases"]["iterations"] == 1800
    assert settings == ["0", "0"]  # timed as the demo trains: float32, whatever the CPU has
    printed = capsys.readouterr().out
    assert "03_training_vertebrae: 1000 training iterations at 0.50 s" in printed
    # with --train-budget, the budget is the training's time, and nothing is timed
    timed.clear()
    plans = runner.dry_run(prof, {"train_budget_min": 5})
    result = runner.run_estimate(prof, plans, build_book=True)
    assert not timed and result["training"]["03_training_vertebrae"] == pytest.approx(
        profiles_mod.stage_budget("vertebrae", "demo", 5))
    assert "a time budget of" in capsys.readouterr().out
