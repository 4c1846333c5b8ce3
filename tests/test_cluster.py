"""The job graph on a real one-node SLURM (tests/slurm_cluster.py) and on this machine.

The SLURM tests start munge, MariaDB, slurmdbd, slurmctld and slurmd once per session, and run
small real payloads (tests/slurm_cluster.py: a counter that checkpoints every step and resumes
from its checkpoint, a closing step that gathers the counts) through the same graph machinery
as the training protocol. They skip only where SLURM cannot run (not root, programs missing);
with ``SPINEMETS_REQUIRE_SLURM=1`` (set by the CI) that is a failure instead.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, copy_project, copy_workspace
from spinemets.run import cluster
from spinemets.training import nnunet
from spinemets.run.cluster import Resources, Step
from spinemets.errors import SpinemetsError
from spinemets.paths import Workspace
from spinemets.training.profiles import PROFILES

PAYLOAD = "slurm_cluster"


def wait_for(run: Path, done, one=None, timeout_s: float = 240):
    """Poll :func:`cluster.status` until ``done(table)``; fail with the table (and daemon logs) otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        table = cluster.status(run)
        if done(table):
            return table
        if time.monotonic() > deadline:
            logs = one.log_tail() if one else ""
            pytest.fail(f"timed out waiting on {run}:\n{table.to_string()}\n{logs}")
        time.sleep(1)


def all_done(table) -> bool:
    return (table["status"] == "done").all()


def statuses(table) -> dict[str, str]:
    return dict(zip(table["step"], table["status"]))


def count_graph(tmp: Path, folds: int, total: int, step_s: float, peers: int = 1) -> list[Step]:
    """``folds`` counting steps (one array, each the same call on its own folder) and a gathering step after them."""
    barrier = str(tmp / "barrier") if peers > 1 else None
    trains = [Step(f"toy/count/fold_{f}", "train", "toy", f"{PAYLOAD}:count_steps",
                   {"out": str(tmp / f"fold_{f}"), "total": total, "step_s": step_s, "barrier": barrier,
                    "peers": peers}, (), "count", f)
              for f in range(folds)]
    final = Step("toy/finalize", "finalize", "toy", f"{PAYLOAD}:gather",
                 {"outs": [s.kwargs["out"] for s in trains], "out": str(tmp / "final")},
                 tuple(s.name for s in trains))
    return [*trains, final]


ONE_CPU = {kind: Resources(time_min=10, mem_gb=0.5, cpus_per_task=1) for kind in cluster.KINDS}


# ---------------------------------------------------------------------------------------------
# On SLURM
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_array_runs_side_by_side_and_final_step_waits(slurm, tmp_path):
    folds = slurm.cpus + 1  # one more than fits: it must wait for a free CPU
    steps = count_graph(tmp_path, folds, total=4, step_s=0.3, peers=slurm.cpus)
    run = tmp_path / "run"
    record = cluster.submit_steps(steps, run, "slurm", ONE_CPU, {"profile": "toy"})

    ids = [e["jobs"][0]["id"] for e in record["steps"]]
    arrays = {i.split("_")[0] for i in ids[:folds]}
    assert len(arrays) == 1 and all("_" in i for i in ids[:folds])  # the folds are one job array
    assert json.loads((run / "run.json").read_text())["steps"][-1]["jobs"][0]["id"] == ids[-1]

    table = wait_for(run, all_done, slurm)
    assert list(table["state"]) == ["COMPLETED"] * (folds + 1)
    summary = json.loads((tmp_path / "final" / "summary.json").read_text())
    assert summary["counts"] == {f"fold_{f}": 4 for f in range(folds)}  # the results arrived
    intervals = [json.loads((tmp_path / f"fold_{f}" / "interval.json").read_text()) for f in range(folds)]
    assert summary["start"] >= max(i["end"] for i in intervals)  # afterok: the final step ran after every fold
    # as many side by side as the node has CPUs (the barrier proves it), never more
    events = sorted([(i["start"], 1) for i in intervals] + [(i["end"], -1) for i in intervals],
                    key=lambda e: (e[0], e[1]))
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == slurm.cpus
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State", "-j", ",".join(ids)],
                         capture_output=True, text=True, check=True).stdout
    assert out.count("COMPLETED") == folds + 1  # the states come from SLURM's accounting


@pytest.mark.slow
def test_cancelled_job_is_reported_resubmitted_and_resumes(slurm, tmp_path):
    total = 40
    steps = count_graph(tmp_path, 2, total=total, step_s=0.5)
    run = tmp_path / "run"
    cluster.submit_steps(steps, run, "slurm", ONE_CPU)
    checkpoint = tmp_path / "fold_1" / "checkpoint.json"
    deadline = time.monotonic() + 120
    while not (checkpoint.exists() and json.loads(checkpoint.read_text())["step"] >= 3):
        assert time.monotonic() < deadline, cluster.status(run).to_string()
        time.sleep(0.3)
    victim = cluster.status(run).set_index("step").at["toy/count/fold_1", "job"]
    subprocess.run(["scancel", victim], check=True)

    table = wait_for(run, lambda t: statuses(t)["toy/count/fold_1"] == "cancelled"
                     and statuses(t)["toy/finalize"] == "blocked", slurm)
    row = table.set_index("step").loc["toy/count/fold_1"]
    assert row["state"] == "CANCELLED" and "CANCELLED" in row["reason"]
    assert Path(row["log"]).exists()
    stopped_at = json.loads(checkpoint.read_text())["step"]
    assert 3 <= stopped_at < total

    record = cluster.resubmit(run)
    jobs = {e["name"]: [j["id"] for j in e["jobs"]] for e in record["steps"]}
    assert len(jobs["toy/count/fold_0"]) == 1  # untouched: it was running or done
    assert len(jobs["toy/count/fold_1"]) == 2 and len(jobs["toy/finalize"]) == 2
    assert jobs["toy/count/fold_1"][1] != victim

    table = wait_for(run, all_done, slurm)
    assert list(table.set_index("step")["attempt"]) == [1, 2, 2]
    starts = [int(x) for x in (tmp_path / "fold_1" / "starts.txt").read_text().split()]
    assert starts[0] == 0 and starts[1] >= 3 and starts[1] >= stopped_at - 1  # resumed from its checkpoint
    summary = json.loads((tmp_path / "final" / "summary.json").read_text())
    assert summary["counts"] == {"fold_0": total, "fold_1": total}
    cluster.resubmit(run)  # nothing left to resubmit
    assert [len(e["jobs"]) for e in cluster.load_record(run)["steps"]] == [1, 2, 2]


@pytest.mark.slow
def test_failed_job_is_reported_with_reason_and_log(slurm, tmp_path):
    steps = [Step("toy/broken", "train", "toy", f"{PAYLOAD}:fail", {"message": "no such dataset"}),
             Step("toy/finalize", "finalize", "toy", f"{PAYLOAD}:gather",
                  {"outs": [], "out": str(tmp_path / "final")}, ("toy/broken",))]
    run = tmp_path / "run"
    cluster.submit_steps(steps, run, "slurm", ONE_CPU)
    table = wait_for(run, lambda t: statuses(t) == {"toy/broken": "failed", "toy/finalize": "blocked"}, slurm)
    row = table.set_index("step").loc["toy/broken"]
    assert row["state"] == "FAILED"
    assert "ValueError: no such dataset" in row["reason"]
    assert "no such dataset" in Path(row["log"]).read_text()  # the log path leads to the traceback
    assert not (tmp_path / "final").exists()
    record = cluster.resubmit(run)  # still fails, and is reported again; the blocked step is replaced
    assert [len(e["jobs"]) for e in record["steps"]] == [2, 2]
    wait_for(run, lambda t: statuses(t) == {"toy/broken": "failed", "toy/finalize": "blocked"}, slurm)
    subprocess.run(["scancel", record["steps"][1]["jobs"][-1]["id"]], check=True)


@pytest.mark.slow
def test_nnunet_ci_training_on_slurm_is_cancelled_and_resumes(slurm, ci_run, tmp_path):
    """The real protocol graph of one stage with nnU-Net's smallest training (profile ``ci``), on a
    copy of the lesion dataset of the session's ci run (tests/conftest.py), planned, without its models."""
    ws = tmp_path / "ws"
    copy_workspace(ci_run / "workspace" / "ci", ws, stages=("metastases",))
    run = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:  # nnU-Net's folders come from the workspace, not the caller's environment
        for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            mp.delenv(var, raising=False)
        record = cluster.submit("metastases", "ci", workspace=ws, jobs=cluster.JobOptions("slurm", run, cpus_per_task=1))
        assert [e["name"] for e in record["steps"]] == [
            "metastases/plan", "metastases/demo_metastases/fold_all", "metastases/finalize"]
        fold = Workspace(ws).model_folder("metastases", "demo_metastases", "SpinemetsCITrainer") / "fold_all"
        deadline = time.monotonic() + 300
        # "Epoch 1" is logged once epoch 0 has ended and its checkpoint is written completely
        # (cancelling during torch.save would leave a truncated checkpoint_latest.pth behind)
        while not any("Epoch 1" in p.read_text() for p in fold.glob("training_log_*.txt")):
            assert time.monotonic() < deadline, cluster.status(run).to_string()
            time.sleep(0.05)
        assert (fold / "checkpoint_latest.pth").exists()
        victim = record["steps"][1]["jobs"][0]["id"]
        subprocess.run(["scancel", victim], check=True)
        table = wait_for(run, lambda t: list(t["status"]) == ["done", "cancelled", "blocked"], slurm)
        assert not (fold / "checkpoint_final.pth").exists()

        cluster.resubmit(run)
        table = wait_for(run, all_done, slurm, timeout_s=300)
    assert list(table["attempt"]) == [1, 2, 2]
    assert (fold / "checkpoint_final.pth").exists()
    logs = sorted(fold.glob("training_log_*.txt"))
    assert len(logs) == 2  # one per attempt
    first_epoch = re.search(r"Epoch (\d+)", logs[-1].read_text()).group(1)
    assert int(first_epoch) >= 1  # the second attempt continued from the checkpoint, not from epoch 0


# ---------------------------------------------------------------------------------------------
# On this machine, and the graph of the protocol
# ---------------------------------------------------------------------------------------------


def test_local_executor_runs_the_graph_in_order(tmp_path):
    run = tmp_path / "run"
    steps = count_graph(tmp_path, 2, total=2, step_s=0.01)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(REPO / "tests"))
        record = cluster.submit_steps(steps, run, "local", ONE_CPU)
    assert [e["jobs"][0]["state"] for e in record["steps"]] == ["COMPLETED"] * 3
    assert record["folder"] == str(run.resolve())
    assert json.loads((tmp_path / "final" / "summary.json").read_text())["counts"] == {"fold_0": 2, "fold_1": 2}
    assert all_done(cluster.status(run))


def test_local_failure_stops_the_run_and_names_the_log(tmp_path):
    run = tmp_path / "run"
    steps = [Step("toy/broken", "train", "toy", "spinemets.run.cluster:call_target",
                  {"target": "spinemets.nowhere:thing", "kwargs": {}}),
             Step("toy/after", "finalize", "toy", "spinemets.run.cluster:call_target",
                  {"target": "json:dumps", "kwargs": {"obj": 1}}, ("toy/broken",))]
    with pytest.raises(SpinemetsError, match=r"toy/broken failed: .*cannot be imported.*log: .*_log\.err"):
        cluster.submit_steps(steps, run, "local", ONE_CPU)
    table = cluster.status(run).set_index("step")
    assert table.at["toy/broken", "status"] == "failed"
    assert "spinemets.nowhere" in table.at["toy/broken", "reason"]
    assert table.at["toy/after", "status"] == "not submitted"
    with pytest.raises(SpinemetsError, match="already recorded"):
        cluster.submit_steps(steps, run, "local", ONE_CPU)


def test_paper_protocol_graph(tmp_path):
    steps = cluster.protocol_steps(["vertebrae", "metastases"], "paper", tmp_path / "ws")
    names = [s.name for s in steps]
    assert len(steps) == 2 * (1 + 4 * 5 + 1)  # per stage: plan, 4 configurations x 5 folds, finalize
    assert names[0] == "vertebrae/plan" and names[21] == "vertebrae/finalize" and names[22] == "metastases/plan"
    by_name = {s.name: s for s in steps}
    fold = by_name["metastases/3d_fullres/fold_3"]
    assert fold.after == ("metastases/plan",)
    assert fold.target == "train_fold"
    assert fold.kwargs["configuration"] == "3d_fullres" and fold.kwargs["fold"] == 3
    assert fold.kwargs["workspace"] == str((tmp_path / "ws").resolve())
    cascade = by_name["vertebrae/3d_cascade_fullres/fold_0"]
    assert cascade.after == ("vertebrae/plan", *[f"vertebrae/3d_lowres/fold_{f}" for f in range(5)])
    assert names.index("vertebrae/3d_cascade_fullres/fold_0") > names.index("vertebrae/3d_lowres/fold_4")
    final = by_name["vertebrae/finalize"]
    assert len(final.after) == 20 and final.kwargs["folds"] == [0, 1, 2, 3, 4]
    cluster._check_graph(steps)  # every step after the ones it needs
    # every call names a real function with parameters it accepts
    import inspect
    for step in steps:
        inspect.signature(cluster.job_function(step.target)).bind(**step.kwargs)
    assert {s.target for s in steps if s.kind != "train"} == {"plan_and_preprocess", "train"}


def test_train_fold_trains_one_fold_and_saves_probabilities_for_the_selection(tmp_path, monkeypatch):
    calls = []

    def fake_train(stage, profile, configurations, folds, device, workspace, *, options):
        calls.append((stage, profile, configurations, folds, device, workspace, options.find_best, options.npz,
                      options.num_gpus))
        return {}

    monkeypatch.setattr(nnunet, "train", fake_train)
    cluster.train_fold("vertebrae", "paper", "3d_fullres", 2, None, str(tmp_path))
    cluster.train_fold("vertebrae", "demo", "demo_vertebrae", "all", "cpu", str(tmp_path), num_gpus=1)
    # the paper profile selects the best configuration from the folds' validation probabilities: --npz;
    # the closing selection itself is the finalize step's, never a fold's
    assert calls == [("vertebrae", "paper", ["3d_fullres"], [2], None, str(tmp_path), False, True, 1),
                     ("vertebrae", "demo", ["demo_vertebrae"], ["all"], "cpu", str(tmp_path), False, False, 1)]


def test_demo_graph_without_cascade_and_selected_folds(tmp_path):
    steps = cluster.protocol_steps("metastases", "demo", tmp_path, folds=["all"])
    assert [s.name for s in steps] == ["metastases/plan", "metastases/demo_metastases/fold_all", "metastases/finalize"]
    steps = cluster.protocol_steps("vertebrae", "paper", tmp_path, configurations=["2d", "3d_fullres"], folds=[0, "1"])
    assert [s.name for s in steps][1:-1] == ["vertebrae/2d/fold_0", "vertebrae/2d/fold_1",
                                            "vertebrae/3d_fullres/fold_0", "vertebrae/3d_fullres/fold_1"]
    with pytest.raises(SpinemetsError, match="unknown training profile"):
        cluster.protocol_steps("vertebrae", "nope", tmp_path)
    with pytest.raises(SpinemetsError, match="fold must be"):
        cluster.protocol_steps("vertebrae", "paper", tmp_path, folds=["x"])


def test_resources_from_profile_and_overrides():
    paper = cluster.profile_resources("paper")
    assert paper["plan"].gpus_per_job == 0 and paper["train"].gpus_per_job == 1
    over = cluster.profile_resources("paper", cluster.JobOptions(partition="gpu", gpus_per_job=2, time_min=30,
                                                                 mem_gb=16, cpus_per_task=4))
    assert {r.partition for r in over.values()} == {"gpu"}
    assert over["plan"].gpus_per_job == 0 and over["finalize"].gpus_per_job == 0  # CPU work
    assert over["train"] == Resources("gpu", 2, 30, 16, 4, 1)
    ddp = cluster.profile_resources("paper", cluster.JobOptions(num_gpus=4))
    assert ddp["train"].num_gpus == 4 and ddp["train"].gpus_per_job == 4
    with pytest.raises(SpinemetsError, match="cpus_per_task"):
        cluster.profile_resources("demo", cluster.JobOptions(cpus_per_task=0))
    # one registry: every training profile has its resources, and an unknown one is an error (no fallback)
    for name in PROFILES:
        assert set(cluster.profile_resources(name)) == set(cluster.KINDS)
    assert cluster.profile_resources("gpu_check")["train"].gpus_per_job == 1
    with pytest.raises(SpinemetsError, match="--profile: unknown training profile 'nope'"):
        cluster.profile_resources("nope")


def test_num_gpus_reaches_nnunet(tmp_path):
    import inspect
    steps = cluster.protocol_steps("vertebrae", "paper", tmp_path, num_gpus=2)
    assert all(s.kwargs["num_gpus"] == 2 for s in steps if s.kind == "train")
    inspect.signature(cluster.train_fold).bind(**steps[1].kwargs)
    with pytest.raises(SpinemetsError, match="num_gpus must be at least 1"):
        cluster.protocol_steps("vertebrae", "paper", tmp_path, num_gpus=0)
    assert "num_gpus" not in cluster.protocol_steps("vertebrae", "paper", tmp_path)[1].kwargs


def test_slurm_states_map_to_statuses(tmp_path):
    job = {"id": "7_1", "log": str(tmp_path / "7_1_0_log.out"), "err": str(tmp_path / "7_1_0_log.err")}
    describe = cluster._describe
    assert describe(job, {"State": "CANCELLED by 0", "ExitCode": "0:0"})["status"] == "cancelled"
    assert describe(job, {"State": "RUNNING", "Reason": "None"}) == {
        "state": "RUNNING", "status": "running", "reason": "", "elapsed": "", "log": job["log"]}
    blocked = describe(job, {"State": "PENDING", "Reason": "DependencyNeverSatisfied"})
    assert blocked["status"] == "blocked" and "resubmit" in blocked["reason"]
    assert describe(job, {"State": "PENDING", "Reason": "Resources"})["reason"] == "Resources"
    timeout = describe(job, {"State": "TIMEOUT", "ExitCode": "0:15"})
    assert timeout["status"] == "failed" and timeout["reason"] == "TIMEOUT; exit 0:15"
    assert timeout["log"] == job["err"]
    assert describe(job, None)["status"] == "unknown"
    # the error a job raised comes from submitit's result pickle beside the log
    import pickle
    (tmp_path / "7_1_0_result.pkl").write_bytes(pickle.dumps(("error", "Traceback ...\nValueError: bad plans\n")))
    assert describe(job, {"State": "FAILED", "ExitCode": "1:0"})["reason"] == "FAILED; exit 1:0; ValueError: bad plans"


def test_status_of_a_missing_run_folder(tmp_path):
    with pytest.raises(SpinemetsError, match="no run record"):
        cluster.status(tmp_path)
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(SpinemetsError, match="not valid JSON"):
        cluster.status(tmp_path)


# ---------------------------------------------------------------------------------------------
# The whole run (notebooks, training jobs, report and book) as jobs
# ---------------------------------------------------------------------------------------------


def test_run_steps_of_the_paper_profile(tmp_path):
    root = copy_project(tmp_path)
    steps, trainer = cluster.run_steps("paper", {"folds": "[0, 1]", "workspace": "ws/paper"}, root)
    assert trainer == "paper"
    by_name = {s.name: s for s in steps}
    names = [s.name for s in steps]
    assert names[0] == "run/prepare" and names[-1] == "run/report"
    assert len(steps) == 1 + 2 * (1 + 4 * 2 + 1) + 1
    prepare = by_name["run/prepare"]
    assert prepare.kwargs["notebooks"] == ["01_dataset", "02_slicer"]
    assert prepare.kwargs["build_book"] is False and prepare.kwargs["out_dir"] == "build/executed-prepare"
    assert prepare.kwargs["estimate"] is False  # the jobs do not measure the machine for an estimate
    assert prepare.kwargs["parameters"] == {"workspace": "ws/paper"}  # folds: a training notebook's parameter
    for stage in ("vertebrae", "metastases"):
        assert by_name[f"{stage}/plan"].after == ("run/prepare",)
        assert by_name[f"{stage}/plan"].kwargs["workspace"] == str(root / "ws" / "paper")
        assert by_name[f"{stage}/finalize"].kwargs["folds"] == [0, 1]
        assert by_name[f"{stage}/3d_fullres/fold_1"].kwargs["device"] == "cuda"
    report = by_name["run/report"]
    assert report.after == ("vertebrae/finalize", "metastases/finalize")
    assert "notebooks" not in report.kwargs and report.kwargs["out_dir"] == "build/executed"
    assert report.kwargs["parameters"] == {"folds": "[0, 1]", "workspace": "ws/paper"}
    assert report.kwargs["estimate"] is False
    cluster._check_graph(steps)
    import inspect
    for step in steps:
        inspect.signature(cluster.job_function(step.target)).bind(**step.kwargs)
    resources = cluster.profile_resources(trainer)
    assert resources["report"].gpus_per_job == 1 and resources["prepare"].gpus_per_job == 0


def test_run_steps_refuse_what_cannot_run(tmp_path):
    root = copy_project(tmp_path)
    with pytest.raises(SpinemetsError, match=r"not declared by any notebook"):
        cluster.run_steps("ci", {"no_such_parameter": "1"}, root)
    with pytest.raises(SpinemetsError, match=r"train_budget_min: jobs train for the profile's budget"):
        cluster.run_steps("demo", {"train_budget_min": "5"}, root)
    (root / "profiles" / "nothing.yaml").write_text(
        "description: curation only\ncohort: synthetic\nnotebooks:\n  - path: notebooks/01_dataset.ipynb\n")
    with pytest.raises(SpinemetsError, match=r"nothing\.yaml: profile 'nothing' has no training notebook"):
        cluster.run_steps("nothing", None, root)
    assert not (root / "runs").exists()  # nothing submitted


def test_wait_reports_failed_steps_with_their_logs(tmp_path, monkeypatch):
    rows = [{"step": "a/plan", "kind": "plan", "stage": "a", "configuration": "", "fold": "", "job": "3",
             "attempt": 1, "state": "COMPLETED", "status": "done", "reason": "", "elapsed": "", "log": "/l/3.out"},
            {"step": "a/x/fold_0", "kind": "train", "stage": "a", "configuration": "x", "fold": "0", "job": "4",
             "attempt": 1, "state": "FAILED", "status": "failed", "reason": "FAILED; exit 1:0; ValueError: bad",
             "log": "/l/4.err", "elapsed": ""}]
    import pandas as pd
    monkeypatch.setattr(cluster, "status", lambda folder: pd.DataFrame(rows, columns=cluster.STATUS_COLUMNS))
    with pytest.raises(SpinemetsError, match=r"(?s)1 step\(s\) did not complete.*a/x/fold_0: failed "
                                             r"\(FAILED; exit 1:0; ValueError: bad\); log: /l/4\.err.*--resubmit"):
        cluster.wait(tmp_path, poll_s=0, progress=False)
    rows[1].update(state="UNKNOWN", status="unknown", reason="not in SLURM's accounting")
    with pytest.raises(SpinemetsError, match="a/x/fold_0: unknown"):
        cluster.wait(tmp_path, poll_s=0.01, progress=False, unknown_grace_s=0.05)
    rows[1].update(state="PENDING", status="pending", reason="Resources")
    with pytest.raises(SpinemetsError, match=r"not done after 0\.05 s"):
        cluster.wait(tmp_path, poll_s=0.01, timeout_s=0.05, progress=False)
    rows[1].update(state="COMPLETED", status="done")
    assert (cluster.wait(tmp_path, poll_s=0, progress=False)["status"] == "done").all()


def test_job_options_need_an_executor(capsys):
    from spinemets import cli

    assert cli.main(["run", "--profile", "ci", "--wait"]) == 2
    assert "--wait go(es) with --executor" in capsys.readouterr().err
    assert cli.main(["train", "--stage", "vertebrae", "--partition", "gpu", "--num-gpus", "2"]) == 2
    assert "--num-gpus, --partition go(es) with --executor" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Run records written before the package was split into subpackages
# ---------------------------------------------------------------------------------------------

#: ``train.json`` (``spinemets train --executor local``, demo profile) and ``run.json`` (``spinemets run
#: --executor local --profile demo``), written by the code of commit 192c49a, whose job targets name
#: the modules of that time (``spinemets.nnunet:train``, ``spinemets.runner:run`` ...).
RECORDED_RUNS = REPO / "tests" / "data" / "run_before_refactor"


def test_old_run_records_name_the_functions_that_run_now():
    import inspect

    targets = set()
    for name in ("train.json", "run.json"):
        for entry in json.loads((RECORDED_RUNS / name).read_text())["steps"]:
            targets.add(entry["target"])
            inspect.signature(cluster.job_function(entry["target"])).bind(**entry["kwargs"])
    assert targets == set(cluster.RECORDED_TARGETS)
    now = {old: f"{cluster.job_function(old).__module__}.{cluster.job_function(old).__qualname__}" for old in targets}
    assert now == {"spinemets.nnunet:plan_and_preprocess": "spinemets.training.nnunet.plan_and_preprocess",
                   "spinemets.nnunet:train": "spinemets.training.nnunet.train",
                   "spinemets.cluster:train_fold": "spinemets.run.cluster.train_fold",
                   "spinemets.runner:run": "spinemets.run.runner.run"}
    steps, _ = cluster.run_steps("demo", root=REPO)
    assert {s.target for s in steps} == set(cluster.JOB_TARGETS)  # what the code records now: the stable names
    with pytest.raises(SpinemetsError, match="unknown job target 'spinemets.nnunet_train'|job target"):
        cluster.job_function("spinemets.nnunet_train")


def test_old_run_record_is_resubmitted(tmp_path):
    """The old record, its workspace pointed into this test's folder, resubmitted on this machine: the
    planning job imports its target in a job of its own and runs it, which refuses a workspace
    without raw datasets (planning itself is the pipeline tests' work)."""
    record = json.loads((RECORDED_RUNS / "train.json").read_text())
    for entry in record["steps"]:
        entry["kwargs"]["workspace"] = str(tmp_path / "ws")
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps(record))
    with pytest.raises(SpinemetsError, match=r"step vertebrae/plan failed: .*Dataset501_Vertebrae: raw dataset not found"):
        cluster.resubmit(run)
    plan = cluster.load_record(run)["steps"][0]
    assert plan["target"] == "spinemets.nnunet:plan_and_preprocess"  # the record keeps what it was written with
    assert plan["jobs"][-1]["state"] == "FAILED" and "cannot be imported" not in plan["jobs"][-1]["reason"]
    assert statuses(cluster.status(run)) == {"vertebrae/plan": "failed", "vertebrae/demo_vertebrae/fold_all": "not submitted",
                                             "vertebrae/finalize": "not submitted"}
