"""The suite's guard against running a pipeline twice (issue: the test suite fits its budget).

Every whole run of a profile's notebooks and every nnU-Net training is expensive on 2 CPU cores.
A session provides them once, in session fixtures (``ci_run`` in tests/conftest.py, ``smoke_run``
in tests/test_smoke.py, the rehearsal in tests/test_rehearsal.py); a test that needs trained
models or a built book reads those. This module counts what a session really launched:

* ``spinemets run`` (:func:`spinemets.runner.run` and, for jobs, :func:`spinemets.cluster.submit_run`)
  per pipeline profile, checked as each run starts: one beyond :data:`PIPELINE_RUNS` fails at once,
  naming the test;
* ``nnUNetv2_train`` launches, counted at the end of the session from the training logs nnU-Net
  writes (one ``training_log_*.txt`` per launch, in the launching test's temporary folder, whether
  the launch was in this process, a subprocess or a SLURM job): more than :data:`TRAINING_LAUNCHES`
  fails the session with the count per test folder.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from pathlib import Path

#: At most this many runs of each pipeline profile per session (the profile's name as run). Toy
#: profiles of the runner's own tests are not pipelines and are not counted.
PIPELINE_RUNS = {"ci": 1, "smoke": 1, "rehearsal": 1, "demo": 0, "paper": 0, "gpu_check": 0}

#: nnU-Net training launches of a whole session: the ci run (2: one per stage), the smoke run
#: (16: two stages x four configurations x two folds), the budget training (1),
#: the interrupted training and its resumption (2), the SLURM job cancelled and resubmitted (2), and
#: the trainer built in-process by tests/test_nnunet.py's schedule test (1: nnU-Net opens its log).
TRAINING_LAUNCHES = 2 + 16 + 1 + 2 + 2 + 1


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


def training_launches(basetemp: Path) -> Counter:
    """nnU-Net training launches below ``basetemp``, by the top folder (a test's or a fixture's).

    A test that copies a trained workspace copies its training logs too: a log counts once, in the
    folder where it was first written (copies have the same name and content and a later ctime)."""
    first: dict[tuple[str, str], tuple[float, str]] = {}
    for log in Path(basetemp).rglob("training_log_*.txt"):
        key = (log.name, hashlib.sha1(log.read_bytes()).hexdigest())
        seen = (log.stat().st_ctime, log.relative_to(basetemp).parts[0])
        first[key] = min(first.get(key, seen), seen)
    return Counter(folder for _, folder in first.values())


def training_problem(counts: Counter, limit: int = TRAINING_LAUNCHES) -> str | None:
    """The failure message when ``counts`` exceed ``limit`` launches in all, else None."""
    total = sum(counts.values())
    if total <= limit:
        return None
    table = ", ".join(f"{folder}: {n}" for folder, n in counts.most_common())
    return (f"this session launched nnUNetv2_train {total} times, more than the {limit} the session fixtures "
            f"need (tests/pipeline_guard.py: TRAINING_LAUNCHES). By temporary folder: {table}. A test that "
            f"needs trained models reads the ci_run or smoke_run fixture's, or trains on a copy of its datasets "
            f"and is counted in TRAINING_LAUNCHES.")
