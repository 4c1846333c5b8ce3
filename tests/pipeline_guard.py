"""The suite's guard against running a pipeline twice (issue: the test suite fits its budget).

Every whole run of a profile's notebooks and every nnU-Net training is expensive on 2 CPU cores.
A session provides them once, in session fixtures (``ci_run`` in tests/conftest.py, ``smoke_run``
in tests/test_smoke.py, the rehearsal in tests/test_rehearsal.py); a test that needs trained
models or a built book reads those. This module counts what a session really launched:

* ``spinemets run`` (:func:`spinemets.run.runner.run` and, for jobs, :func:`spinemets.run.cluster.submit_run`)
  per pipeline profile, checked as each run starts: one beyond :data:`PIPELINE_RUNS` fails at once,
  naming the test;
* nnU-Net trainings, counted at the end of the session from the training logs nnU-Net writes
  (``training_log_*.txt``, one per launch, in the launching test's temporary folder, whether the
  launch was in this process, a subprocess or a SLURM job): a training is one output folder
  (``fold_N``) with a log of its own, however often it was launched there; more than
  :data:`TRAININGS` fails the session with the count per test folder. A resumption (a real-resume
  test, a job that SLURM or submitit requeued, a step sent again) continues in the same folder and
  is no new training: whether it happens depends on the machine's speed, and the count must not.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

#: At most this many runs of each pipeline profile per session (the profile's name as run). Toy
#: profiles of the runner's own tests are not pipelines and are not counted.
PIPELINE_RUNS = {"ci": 1, "smoke": 1, "rehearsal": 1, "demo": 0, "paper": 0, "gpu_check": 0}

#: nnU-Net trainings (output folders) of a whole session: the ci run (2: one per stage), the smoke
#: run (16: two stages x four configurations x two folds), the budget training (1), the interrupted
#: training resumed in its folder (1), the SLURM job cancelled and resubmitted (1) and the fold of
#: nnU-Net's residual-encoder preset M (1, tests/test_resenc.py) and the two tiny models in
#: TotalSegmentator's layout (2, tests/test_totalseg.py). A trainer that a test builds
#: in-process without training (tests/test_nnunet.py: its layout, its schedule, its seeded batches)
#: opens its log, and may log an epoch's start, but ends no epoch: it is no training.
TRAININGS = 2 + 16 + 1 + 1 + 1 + 1 + 2


class PipelineRunAgain(AssertionError):
    pass


class Guard:
    def __init__(self, limits: dict[str, int] | None = None):
        self.limits = dict(PIPELINE_RUNS if limits is None else limits)
        self.runs: Counter[str] = Counter()
        self.by: dict[str, list[str]] = {}

    def started(self, profile) -> None:
        """Count one run of ``profile`` (a name, a path to a YAML file, or a loaded profile)."""
        name = getattr(profile, "name", None) or Path(str(profile)).stem
        if name not in self.limits:
            return
        test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
        self.runs[name] += 1
        self.by.setdefault(name, []).append(test)
        if self.runs[name] > self.limits[name]:
            raise PipelineRunAgain(
                f"{test} runs `spinemets run --profile {name}` again (run {self.runs[name]} of this session; "
                f"at most {self.limits[name]}: {', '.join(self.by[name][:-1]) or 'none before'}). Read the "
                f"session's run instead (the ci_run / smoke_run fixtures; tests/pipeline_guard.py).")


def trainings(basetemp: Path) -> Counter:
    """nnU-Net trainings below ``basetemp``, by the top folder (a test's or a fixture's).

    A training is a folder holding a training log first written there. A test that copies a trained
    workspace copies its logs too: a log counts once, in the folder where it was first written
    (copies have the same name and content and a later ctime). Launches in one folder (a resumption)
    are one training, and a log without an ended epoch (nnU-Net logs ``train_loss`` as an epoch ends;
    a trainer built in-process, never trained, logs none) is none."""
    first: dict[tuple[str, str], tuple[float, Path]] = {}
    for log in Path(basetemp).rglob("training_log_*.txt"):
        text = log.read_bytes()
        if b"train_loss" not in text:
            continue
        key = (log.name, hashlib.sha1(text).hexdigest())
        seen = (log.stat().st_ctime, log.parent.relative_to(basetemp))
        first[key] = min(first.get(key, seen), seen)
    folders = {folder for _, folder in first.values()}
    return Counter(folder.parts[0] for folder in folders)


def training_problem(counts: Counter, limit: int = TRAININGS) -> str | None:
    """The failure message when ``counts`` exceed ``limit`` trainings in all, else None."""
    total = sum(counts.values())
    if total <= limit:
        return None
    table = ", ".join(f"{folder}: {n}" for folder, n in counts.most_common())
    return (f"this session trained {total} nnU-Net models (output folders with a training log of their "
            f"own and an ended epoch), more than the {limit} the session fixtures need (tests/pipeline_guard.py: TRAININGS). "
            f"By temporary folder: {table}. A test that needs trained models reads the ci_run or smoke_run "
            f"fixture's, or trains on a copy of its datasets and is counted in TRAININGS.")
