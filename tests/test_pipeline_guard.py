"""The suite's guard against running a pipeline twice (tests/pipeline_guard.py)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

import pipeline_guard
from spinemets.run import runner


def test_a_second_run_of_a_pipeline_profile_fails_at_once_naming_the_test(monkeypatch):
    monkeypatch.setenv("PYTEST_CURRENT_TEST", "tests/test_new.py::test_mine (call)")
    guard = pipeline_guard.Guard({"ci": 1, "demo": 0})
    guard.started("ci")
    guard.started("tiny")  # not a pipeline: the runner's own toy profiles are not counted
    guard.started("tiny")
    with pytest.raises(pipeline_guard.PipelineRunAgain, match=r"test_new.py::test_mine runs `spinemets run "
                                                              r"--profile ci` again \(run 2 .* at most 1"):
        guard.started("profiles/ci.yaml")
    with pytest.raises(pipeline_guard.PipelineRunAgain, match="at most 0"):
        guard.started(runner.load_profile("demo"))


def test_the_session_guard_counts_runner_runs(pipeline_guard):
    assert runner.run.__name__ == "call"  # wrapped for the session (tests/conftest.py)
    before = sum(pipeline_guard.runs.values())
    pipeline_guard.started("smoke-not-a-profile")
    assert sum(pipeline_guard.runs.values()) == before


def test_trainings_are_counted_per_test_folder_from_the_training_logs():
    # outside the session's temporary folder, which the session's own guard counts at its end
    with tempfile.TemporaryDirectory() as tmp:
        _count_trainings(Path(tmp))


def _count_trainings(tmp_path: Path) -> None:
    for folder, n in (("ci0", 2), ("test_resume0", 3)):
        for i in range(n):
            log = tmp_path / folder / "ws" / "results" / f"fold_{i}" / f"training_log_2026_12_6_{i}.txt"
            log.parent.mkdir(parents=True)
            log.write_text(f"{folder} fold {i}: Epoch 0\ntrain_loss -0.1\n")
    (tmp_path / "other0" / "training_log.txt").parent.mkdir()
    (tmp_path / "other0" / "training_log.txt").write_text("Epoch 0\ntrain_loss -0.1")  # not nnU-Net's name
    built = tmp_path / "test_builds_a_trainer0" / "fold_all" / "training_log_2026_12_6_1.txt"
    built.parent.mkdir(parents=True)
    built.write_text("Please cite nnU-Net\nEpoch 0\n")  # a trainer built in-process: an epoch started, none ended
    shutil.copytree(tmp_path / "ci0", tmp_path / "test_reads_a_copy0", copy_function=shutil.copy2)
    # a resumption in a copy (a second launch where the copied log lies) and one in place (requeued)
    for resumed in (tmp_path / "test_reads_a_copy0" / "ws" / "results" / "fold_0",
                    tmp_path / "test_resume0" / "ws" / "results" / "fold_2"):
        (resumed / "training_log_2026_12_6_9.txt").write_text(f"{resumed}: Epoch 1\ntrain_loss -0.2\n")
    counts = pipeline_guard.trainings(tmp_path)
    # a copied log is no training, a second launch in one folder is none either, a resumption in a copy is one
    assert counts == {"ci0": 2, "test_resume0": 3, "test_reads_a_copy0": 1}
    assert pipeline_guard.training_problem(counts, limit=6) is None
    problem = pipeline_guard.training_problem(counts, limit=5)
    assert "trained 6 nnU-Net models" in problem and "more than the 5" in problem
    assert "test_resume0: 3, ci0: 2, test_reads_a_copy0: 1" in problem
