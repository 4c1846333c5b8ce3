"""Scale-out: the training protocol as a small graph of jobs on SLURM (or on this machine), through submitit.

It serves ``spinemets train --executor``, ``spinemets run --executor`` and ``spinemets jobs``.
One job in one module (over 700 lines): the run record (``run.json``) and the functions that write,
submit, watch and resubmit it.

**The graph.** For each stage, :func:`protocol_steps` makes one *step* per unit of work, each a
call of one function of :mod:`spinemets.training.nnunet` run inside its own job:

* ``STAGE/plan``: :func:`spinemets.training.nnunet.plan_and_preprocess` (fingerprint, plans, extra
  configurations, preprocessing; skipped where done, so a rerun is cheap);
* ``STAGE/CONFIGURATION/fold_F``: :func:`train_fold`, i.e. :func:`spinemets.training.nnunet.train` of
  exactly one configuration and fold, after the plan. ``3d_cascade_fullres`` folds also wait
  for the ``3d_lowres`` folds, whose validation predictions the cascade trains on;
* ``STAGE/finalize``: :func:`spinemets.training.nnunet.train` of the stage's configurations and folds once
  more: every fold is trained by then and skipped, so what runs is the profile's closing work
  (``nnUNetv2_find_best_configuration`` for the paper profile).

A step waits for the steps it lists in ``after`` through SLURM's ``afterok`` dependencies: it
starts only when they have all completed, and never when one failed. The training steps of one
stage that share their dependencies go in one job array, so the scheduler runs as many side by
side as the cluster has room for.

**Resuming.** Every job is a :class:`StepCall`, a :class:`submitit.helpers.Checkpointable`: when
SLURM times a job out or preempts it, submitit requeues it under the same job id. nnU-Net's
training resumes from its latest checkpoint (``nnUNetv2_train --c``) whenever one exists, so a
requeued job, or a failed or cancelled one sent again by :func:`resubmit`, continues where its
last checkpoint left it (at most ``save_every`` epochs are lost).

**The run folder** holds ``run.json`` (the run record: what was asked, every step with its call,
dependencies, resources and the job id of every submission) and ``logs/`` (submitit's
``JOBID_0_log.out``/``.err``, the pickled calls and results). :func:`status` reads the states
from SLURM's accounting (``sacct``; the cluster needs ``slurmdbd``); a failed job is reported with
its reason and log file, never skipped.

**Resources** per step kind come from the training profile (``resources`` of
:data:`spinemets.training.profiles.PROFILES`, the one profile registry); command-line values
(:class:`JobOptions`) override them for every job (GPUs only for training: planning and the selection run on CPUs).
Multi-GPU training of one configuration uses nnU-Net's own DDP: ``num_gpus`` is passed to
``nnUNetv2_train -num_gpus`` and the job asks for at least as many GPUs.

The ``local`` executor runs the same jobs one after the other on this machine (submitit's
``LocalExecutor``, which has no dependencies): :func:`submit` returns when the graph is done or a
step failed.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import logging
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import submitit
from submitit.core.utils import FailedJobError, pickle_load
from submitit.helpers import Checkpointable
from submitit.slurm.slurm import SlurmInfoWatcher

from spinemets.errors import SpinemetsError, unknown_choice
from spinemets.fileio import read_json, write_json
from spinemets.paths import DEFAULT_WORKSPACE
from spinemets.run import runner
from spinemets.training import nnunet
from spinemets.training.profiles import STEP_KINDS, get_profile, stage_plan

log = logging.getLogger(__name__)

RECORD = "run.json"
LOGS = "logs"
EXECUTORS = ("slurm", "local")
KINDS = STEP_KINDS  # the keys of a profile's "resources"
#: Times a job that timed out or was preempted is requeued automatically (submitit).
MAX_REQUEUES = 3

#: SLURM job states (``sacct``) -> the status :func:`status` reports.
STATUS_OF_STATE = {
    "PENDING": "pending", "REQUEUED": "pending", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
    "RESV_DEL_HOLD": "pending", "SUSPENDED": "pending", "STOPPED": "pending",
    "RUNNING": "running", "COMPLETING": "running", "CONFIGURING": "running", "RESIZING": "running",
    "SIGNALING": "running", "STAGE_OUT": "running",
    "COMPLETED": "done",
    "CANCELLED": "cancelled",
    "FAILED": "failed", "TIMEOUT": "failed", "PREEMPTED": "failed", "NODE_FAIL": "failed",
    "OUT_OF_MEMORY": "failed", "BOOT_FAIL": "failed", "DEADLINE": "failed", "REVOKED": "failed",
    "SPECIAL_EXIT": "failed",
}
#: Statuses after which a step is sent again by :func:`resubmit`.
RESUBMIT = ("failed", "cancelled", "unknown")
STATUS_COLUMNS = ["step", "kind", "stage", "configuration", "fold", "job", "attempt", "state", "status",
                  "reason", "elapsed", "log"]


@dataclass(frozen=True)
class Resources:
    """What one job asks for. ``num_gpus`` is nnU-Net's ``-num_gpus`` (DDP) for a training step."""

    partition: str | None = None
    gpus_per_job: int = 0
    time_min: int = 60
    mem_gb: float = 4.0
    cpus_per_task: int = 2
    num_gpus: int = 1


@dataclass(frozen=True)
class JobOptions:
    """How a run goes out as jobs, as one object from the command line to the submission.

    ``executor`` is ``slurm`` or ``local``; ``folder`` the run folder (default
    ``runs/<profile>-<UTC time>``). The other fields override the training profile's resources
    (``resources`` of :data:`spinemets.training.profiles.PROFILES`) for every job where given:
    ``partition``, ``time_min``, ``mem_gb`` and ``cpus_per_task`` for every job, ``gpus_per_job``
    for the kinds in :data:`GPU_KINDS`, ``num_gpus`` (nnU-Net's DDP) for training.
    """

    executor: str = "slurm"
    folder: str | Path | None = None
    partition: str | None = None
    gpus_per_job: int | None = None
    time_min: int | None = None
    mem_gb: float | None = None
    cpus_per_task: int | None = None
    num_gpus: int | None = None


#: Step kinds that get GPUs when the command line asks for GPUs per job (preparing the data,
#: planning, and the selection and ensembling of ``nnUNetv2_find_best_configuration`` run on CPUs).
GPU_KINDS = ("train", "report")


@dataclass(frozen=True)
class Step:
    """One job of the graph: call ``target`` with ``kwargs`` after the steps in ``after``.

    ``target`` is a name of :data:`JOB_TARGETS` (every step the project makes), or ``"module:function"``
    for a graph of other functions given to :func:`submit_steps`.
    """

    name: str
    kind: str
    stage: str
    target: str
    kwargs: dict = field(default_factory=dict)
    after: tuple[str, ...] = ()
    configuration: str | None = None
    fold: int | str | None = None


# ---------------------------------------------------------------------------------------------
# What runs inside a job
# ---------------------------------------------------------------------------------------------


#: The targets that run records written before :data:`JOB_TARGETS` (package 0.x before the
#: subpackages) hold, by the name they have now.
RECORDED_TARGETS = {
    "spinemets.nnunet:plan_and_preprocess": "plan_and_preprocess",
    "spinemets.cluster:train_fold": "train_fold",
    "spinemets.nnunet:train": "train",
    "spinemets.runner:run": "run",
}


def job_function(target: str) -> Callable[..., Any]:
    """The function a job's ``target`` names: a name of :data:`JOB_TARGETS`, one of
    :data:`RECORDED_TARGETS` (an older run record), or ``module:function``."""
    target = RECORDED_TARGETS.get(target, target)
    if target in JOB_TARGETS:
        return JOB_TARGETS[target]
    module, sep, name = target.partition(":")
    if not sep:
        raise unknown_choice("job target", target, JOB_TARGETS)
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise SpinemetsError(f"job target {target!r} cannot be imported: {exc}") from None


def call_target(target: str, kwargs: Mapping[str, Any]) -> Any:
    """Call the function ``target`` names (:func:`job_function`) with ``kwargs``: the body of every job."""
    return job_function(target)(**kwargs)


class StepCall(Checkpointable):
    """The pickled callable of one job: ``call_target(target, kwargs)``.

    Being :class:`~submitit.helpers.Checkpointable`, it is requeued by submitit (same job id,
    same call) when SLURM signals a timeout or preemption; the call resumes from its checkpoint.
    """

    def __init__(self, target: str, kwargs: Mapping[str, Any]):
        self.target = target
        self.kwargs = dict(kwargs)

    def __call__(self) -> Any:
        return call_target(self.target, self.kwargs)

    def __repr__(self) -> str:
        return f"StepCall({self.target!r}, {self.kwargs!r})"


def train_fold(stage: str, profile: str, configuration: str, fold: int | str, device: str | None = None,
               workspace: str | Path | None = None, num_gpus: int = 1) -> dict:
    """Train one (configuration, fold) of a stage: the body of a training job.

    Calls :func:`spinemets.training.nnunet.train` for exactly that configuration and fold, without the
    profile's closing selection (that is the ``finalize`` step's), so it resumes from the fold's
    latest checkpoint and skips a finished fold. Where the profile selects the best configuration
    (``paper``), the fold saves its validation probabilities (``--npz``), which the selection
    ensembles. ``num_gpus`` > 1 is nnU-Net's ``-num_gpus``.
    """
    options = nnunet.TrainingOptions(find_best=False, npz=get_profile(profile)["find_best"], num_gpus=num_gpus)
    return nnunet.train(stage, profile, configurations=[configuration], folds=[fold], device=device,
                        workspace=workspace, options=options)


#: The functions a job runs, by the name its run record (``run.json``) keeps: names that stay when
#: modules move, so that a run recorded before a move can still be resubmitted.
JOB_TARGETS: dict[str, Callable[..., Any]] = {
    "plan_and_preprocess": nnunet.plan_and_preprocess,
    "train_fold": train_fold,
    "train": nnunet.train,
    "run": runner.run,
}


# ---------------------------------------------------------------------------------------------
# The protocol as steps
# ---------------------------------------------------------------------------------------------


def protocol_steps(stages: str | Sequence[str], profile: str, workspace: str | Path | None = None,
                   configurations: Sequence[str] | None = None, folds: Sequence[int | str] | None = None,
                   device: str | None = None, num_gpus: int = 1) -> list[Step]:
    """The steps of training ``stages`` with a profile of :data:`spinemets.training.profiles.PROFILES`, in submission order.

    ``configurations`` and ``folds`` default to the profile's. The workspace path is made
    absolute (jobs may start in another folder). ``num_gpus`` > 1 is passed to the training steps
    as nnU-Net's ``-num_gpus``.
    """
    stages = [stages] if isinstance(stages, str) else list(stages)
    if not stages:
        raise SpinemetsError("no stage to train")
    get_profile(profile)
    ws = str(Path(workspace if workspace is not None else DEFAULT_WORKSPACE).resolve())
    extra = _num_gpus_kwargs(num_gpus)
    steps: list[Step] = []
    for stage in stages:
        entry = stage_plan(stage, profile)
        cfgs = list(configurations or entry["configurations"])
        stage_folds = [nnunet.parse_fold(f) for f in (folds or entry["folds"])]
        common = {"stage": stage, "profile": profile, "workspace": ws}
        plan = Step(f"{stage}/plan", "plan", stage, "plan_and_preprocess",
                    {**common, "configurations": cfgs})
        steps.append(plan)
        trains = []
        for cfg in cfgs:
            for fold in stage_folds:
                after = [plan.name]
                if cfg == "3d_cascade_fullres" and "3d_lowres" in cfgs:
                    after += [f"{stage}/3d_lowres/fold_{f}" for f in stage_folds]
                trains.append(Step(f"{stage}/{cfg}/fold_{fold}", "train", stage, "train_fold",
                                   {**common, "configuration": cfg, "fold": fold, "device": device, **extra},
                                   tuple(after), cfg, fold))
        steps += sorted(trains, key=lambda s: len(s.after))  # the cascade after the others
        steps.append(Step(f"{stage}/finalize", "finalize", stage, "train",
                          {**common, "configurations": cfgs, "folds": stage_folds, "device": device},
                          tuple(s.name for s in trains)))
    return steps


def _num_gpus_kwargs(num_gpus: int) -> dict:
    if int(num_gpus) < 1:
        raise SpinemetsError(f"num_gpus must be at least 1, not {num_gpus}")
    return {"num_gpus": int(num_gpus)} if int(num_gpus) > 1 else {}


def profile_resources(profile: str, options: JobOptions | None = None) -> dict[str, Resources]:
    """Resources per step kind: the training profile's (``resources`` of :data:`spinemets.training.profiles.PROFILES`;
    an unknown profile is an error) with the overrides of ``options`` (see :class:`JobOptions`).
    """
    opts = options or JobOptions()
    partition, gpus_per_job, time_min = opts.partition, opts.gpus_per_job, opts.time_min
    mem_gb, cpus_per_task, num_gpus = opts.mem_gb, opts.cpus_per_task, opts.num_gpus
    table = get_profile(profile)["resources"]
    out = {}
    for kind in KINDS:
        res = Resources(**table[kind])
        common = {k: v for k, v in (("partition", partition), ("time_min", time_min), ("mem_gb", mem_gb),
                                    ("cpus_per_task", cpus_per_task)) if v is not None}
        res = replace(res, **common)
        if gpus_per_job is not None and kind in GPU_KINDS:
            res = replace(res, gpus_per_job=int(gpus_per_job))
        if num_gpus is not None and kind == "train":
            res = replace(res, num_gpus=int(num_gpus), gpus_per_job=max(res.gpus_per_job, int(num_gpus)))
        for name in ("time_min", "cpus_per_task"):
            if getattr(res, name) < 1:
                raise SpinemetsError(f"{name} must be at least 1, not {getattr(res, name)}")
        if res.mem_gb <= 0 or res.gpus_per_job < 0:
            raise SpinemetsError(f"mem_gb must be positive and gpus_per_job not negative ({res})")
        out[kind] = res
    return out


# ---------------------------------------------------------------------------------------------
# Submitting
# ---------------------------------------------------------------------------------------------


def submit(stages: str | Sequence[str], profile: str = "paper", workspace: str | Path | None = None,
           configurations: Sequence[str] | None = None, folds: Sequence[int | str] | None = None,
           device: str | None = None, *, jobs: JobOptions | None = None) -> dict:
    """Submit the training of ``stages`` with ``profile`` as a graph of jobs; return the run record.

    One job per step of :func:`protocol_steps` (planning once per stage, one job per
    (stage, configuration, fold), one closing job per stage), with resources from
    :func:`profile_resources`. ``jobs`` says how (:class:`JobOptions`: executor, run folder,
    resource overrides); the run folder receives ``run.json`` and the job logs. With the
    ``slurm`` executor this returns once everything is queued; with ``local`` once it has run.
    """
    jobs = jobs or JobOptions()
    resources = profile_resources(profile, jobs)
    steps = protocol_steps(stages, profile, workspace, configurations, folds, device, resources["train"].num_gpus)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(jobs.folder) if jobs.folder is not None else Path("runs") / f"{profile}-{stamp}"
    meta = {"profile": profile, "stages": list(dict.fromkeys(s.stage for s in steps)),
            "workspace": steps[0].kwargs["workspace"]}
    return submit_steps(steps, folder, jobs.executor, resources, meta)


def run_steps(profile: str | Path, parameters: Mapping[str, Any] | None = None, root: str | Path | None = None,
              out_dir: str | Path | None = None, num_gpus: int = 1) -> tuple[list[Step], str]:
    """The steps of ``spinemets run --profile PROFILE`` as jobs; returns ``(steps, training profile)``.

    * ``run/prepare``: :func:`spinemets.run.runner.run` of the notebooks before the first training
      notebook (:data:`spinemets.run.runner.TRAINING_NOTEBOOK`): the cohort and the nnU-Net raw
      datasets. Executed into ``<out_dir>-prepare``; no book;
    * per training notebook, its stage's :func:`protocol_steps` with the notebook's own
      parameters (training profile, workspace, configurations, folds, device), planning after
      ``run/prepare``;
    * ``run/report``: :func:`spinemets.run.runner.run` of every notebook and the book, after every
      stage's ``finalize``. The training notebooks find their folds trained and the selection
      made, so they only show the curves; inference and evaluation run there.

    The profile's parameters and notebooks are checked here, before anything is submitted.
    """
    from spinemets.run.profiles import find_project_root, load_profile

    root = find_project_root(root)
    prof = load_profile(profile, root)
    out_dir = str(out_dir or runner.DEFAULT_OUT_DIR)
    plans = runner.plan_run(prof, root, None, parameters)
    names = [name for name, _, _ in plans]
    training = [i for i, (_, source, _) in enumerate(plans) if source.stem == runner.TRAINING_NOTEBOOK]
    if any(params.get("train_budget_min") is not None for _, _, params in plans):
        raise SpinemetsError("train_budget_min: jobs train for the profile's budget; it applies to local runs only")
    if not training:
        raise SpinemetsError(f"{prof.source}: profile {prof.name!r} has no training notebook "
                             f"({runner.TRAINING_NOTEBOOK}); nothing to submit as jobs")
    common = {"profile": str(prof.source), "parameters": dict(parameters or {}), "root": str(root)}
    # the notebooks before training get the overrides they declare (e.g. not a training notebook's folds)
    before = set().union(*(runner.declared_parameters(src) for _, src, _ in plans[:training[0]]))
    prepare = Step("run/prepare", "prepare", "run", "run",
                   {**common, "parameters": {k: v for k, v in common["parameters"].items() if k in before},
                    "notebooks": names[:training[0]], "out_dir": f"{out_dir}-prepare", "build_book": False,
                    "estimate": False})
    has_prepare = training[0] > 0
    steps = [prepare] if has_prepare else []
    trainers: list[str] = []
    finals = []
    for index in training:
        params = plans[index][2]
        stage = params.get("stage", "vertebrae")  # the notebook's own default
        trainers.append(params.get("profile", "demo"))
        workspace = Path(params.get("workspace") or DEFAULT_WORKSPACE)
        stage_steps = protocol_steps(stage, trainers[-1], workspace if workspace.is_absolute() else root / workspace,
                                     params.get("configurations"), params.get("folds"), params.get("device"),
                                     num_gpus)
        steps += [replace(s, after=(*s.after, prepare.name)) if s.kind == "plan" and has_prepare else s
                  for s in stage_steps]
        finals.append(stage_steps[-1].name)
    if len(set(trainers)) > 1:
        raise SpinemetsError(f"profile {prof.name!r}: the training notebooks use different training profiles "
                             f"{sorted(set(trainers))}; one run submits one")
    steps.append(Step("run/report", "report", "run", "run",
                      {**common, "out_dir": out_dir, "estimate": False}, tuple(finals)))
    return steps, trainers[0]


def submit_run(profile: str | Path, parameters: Mapping[str, Any] | None = None, root: str | Path | None = None,
               *, jobs: JobOptions | None = None) -> dict:
    """Submit a whole ``spinemets run`` (notebooks, training as one job per fold, report and book); return the record.

    The steps are :func:`run_steps`; resources come from the training profile with the overrides
    of ``jobs`` (as :func:`submit`). The run folder defaults to ``<root>/runs/<profile>-<UTC time>``.
    With ``slurm`` this returns once all is queued (watch it with :func:`status` or :func:`wait`);
    with ``local`` once it has run.
    """
    from spinemets.run.profiles import find_project_root

    jobs = jobs or JobOptions()
    root = find_project_root(root)
    requested = int(jobs.num_gpus) if jobs.num_gpus is not None else 1
    steps, trainer = run_steps(profile, parameters, root, num_gpus=requested)
    resources = profile_resources(trainer, jobs)
    name = Path(str(profile)).stem
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    folder = Path(jobs.folder) if jobs.folder is not None else root / "runs" / f"{name}-{stamp}"
    meta = {"profile": trainer, "run_profile": name, "stages": [s.stage for s in steps if s.kind == "plan"],
            "workspace": next(s.kwargs["workspace"] for s in steps if s.kind == "plan")}
    return submit_steps(steps, folder, jobs.executor, resources, meta)


def submit_steps(steps: Sequence[Step], folder: str | Path, executor: str = "slurm",
                 resources: Mapping[str, Resources] | None = None, meta: Mapping[str, Any] | None = None) -> dict:
    """Submit any graph of steps (in an order where every step follows those in its ``after``).

    ``resources`` maps step kinds to :class:`Resources` (default: ``Resources()`` for every kind).
    Writes ``folder/run.json`` (refuses a folder that already holds one: use :func:`resubmit`).
    Returns the record.
    """
    if executor not in EXECUTORS:
        raise unknown_choice("executor", executor, EXECUTORS)
    folder = Path(folder).resolve()
    if (folder / RECORD).exists():
        raise SpinemetsError(f"{folder / RECORD}: a run is already recorded there; use resubmit or another folder")
    _check_graph(steps)
    resources = dict(resources or {})
    record = {
        "format": 1,
        "created": _now(),
        "executor": executor,
        "folder": str(folder),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        **dict(meta or {}),
        "steps": [{**asdict(s), "after": list(s.after),
                   "resources": asdict(resources.get(s.kind, Resources())), "jobs": []} for s in steps],
    }
    folder.mkdir(parents=True, exist_ok=True)
    _save(folder, record)
    _submit_entries(folder, record, [e["name"] for e in record["steps"]])
    return record


def _check_graph(steps: Sequence[Step]) -> None:
    seen: set[str] = set()
    for step in steps:
        if step.name in seen:
            raise SpinemetsError(f"step {step.name!r} is listed twice")
        missing = [a for a in step.after if a not in seen]
        if missing:
            raise SpinemetsError(f"step {step.name!r} comes after {missing}, which are not listed before it")
        if step.target not in JOB_TARGETS and ":" not in step.target:
            raise SpinemetsError(f"step {step.name!r}: target {step.target!r} must be one of "
                                 f"{', '.join(JOB_TARGETS)} or look like 'module:function'")
        seen.add(step.name)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _save(folder: Path, record: dict) -> None:
    write_json(folder / RECORD, record)


def load_record(run_folder: str | Path) -> dict:
    """The run record ``run_folder/run.json``."""
    path = Path(run_folder) / RECORD
    if not path.exists():
        raise SpinemetsError(f"{path}: no run record; is {run_folder} a run folder written by spinemets?")
    return read_json(path, "run record")


def _submit_entries(folder: Path, record: dict, names: Sequence[str]) -> None:
    """Submit the steps ``names`` of the record, in record order; save the record after each submission.

    Consecutive steps with the same stage, kind, dependencies and resources go in one job array.
    A step depends (``afterok``) on the latest job of each step in its ``after`` unless that step
    is known to be completed (jobs that SLURM has purged from memory cannot be depended on).
    """
    wanted = set(names)
    entries = {e["name"]: e for e in record["steps"]}
    todo = [e for e in record["steps"] if e["name"] in wanted]
    if record["executor"] == "local":
        _run_local(folder, record, todo)
        return
    groups: list[list[dict]] = []
    keys: list[tuple] = []
    for entry in todo:
        key = (entry["stage"], entry["kind"], tuple(entry["after"]), json.dumps(entry["resources"], sort_keys=True))
        if keys and keys[-1] == key:
            groups[-1].append(entry)
        else:
            groups.append([entry])
            keys.append(key)
    for group in groups:
        parents = {a for e in group for a in e["after"]}
        deps = sorted({entries[p]["jobs"][-1]["id"] for p in parents
                       if p in wanted or not _completed(entries[p])}, key=_job_sort_key)
        jobs = _sbatch_group(folder, group, deps)
        for entry, job in zip(group, jobs):
            entry["jobs"].append({"id": str(job.job_id), "submitted": _now(),
                                  "log": str(job.paths.stdout), "err": str(job.paths.stderr)})
        _save(folder, record)
        log.info("submitted %s as job(s) %s", ", ".join(e["name"] for e in group), ", ".join(j.job_id for j in jobs))


def _completed(entry: dict) -> bool:
    return bool(entry["jobs"]) and entry["jobs"][-1].get("state") == "COMPLETED"


def _job_sort_key(job_id: str) -> tuple:
    head, _, task = job_id.partition("_")
    return int(head), int(task or -1)


def _sbatch_group(folder: Path, group: list[dict], deps: list[str]) -> list:
    res = Resources(**group[0]["resources"])
    ex = submitit.SlurmExecutor(folder=folder / LOGS, max_num_timeout=MAX_REQUEUES)
    params: dict[str, Any] = {"job_name": f"spinemets.{group[0]['stage']}.{group[0]['kind']}",
                              "time": int(res.time_min), "mem": f"{int(round(res.mem_gb * 1024))}M",
                              "cpus_per_task": int(res.cpus_per_task), "ntasks_per_node": 1}
    if res.partition:
        params["partition"] = res.partition
    if res.gpus_per_job:
        params["gpus_per_node"] = int(res.gpus_per_job)
    if deps:
        params["dependency"] = "afterok:" + ":".join(deps)
    ex.update_parameters(**params)
    calls = [StepCall(e["target"], e["kwargs"]) for e in group]
    try:
        if len(calls) == 1:
            return [ex.submit(calls[0])]
        with ex.batch():
            jobs = [ex.submit(c) for c in calls]
        return jobs
    except (OSError, FailedJobError) as exc:
        raise SpinemetsError(f"sbatch failed for {', '.join(e['name'] for e in group)}: {exc}") from None


def _run_local(folder: Path, record: dict, todo: list[dict]) -> None:
    """Run the steps one after the other in child processes (submitit's LocalExecutor); stop at the first failure."""
    ex = submitit.LocalExecutor(folder=folder / LOGS)
    for entry in todo:
        res = Resources(**entry["resources"])
        ex.update_parameters(timeout_min=int(res.time_min), gpus_per_node=int(res.gpus_per_job))
        job = ex.submit(StepCall(entry["target"], entry["kwargs"]))
        info = {"id": str(job.job_id), "submitted": _now(), "log": str(job.paths.stdout),
                "err": str(job.paths.stderr), "state": "RUNNING"}
        entry["jobs"].append(info)
        _save(folder, record)
        try:
            job.result()
            info["state"] = "COMPLETED"
        except Exception as exc:  # the job's own error, reported with its log
            info["state"] = "FAILED"
            info["reason"] = _job_error(info) or _last_line(str(exc))
        info["ended"] = _now()
        _save(folder, record)
        if info["state"] != "COMPLETED":
            raise SpinemetsError(f"step {entry['name']} failed: {info['reason']}; log: {info['err']}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------------------
# Watching and resubmitting
# ---------------------------------------------------------------------------------------------


def sacct_states(job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """SLURM's accounting for ``job_ids``: ``{job id: {"State", "ExitCode", "Reason", "Elapsed"}}``.

    Array ranges that ``sacct`` prints as one line (``12_[3-5]``, tasks not started yet) are
    expanded. Jobs that accounting does not know (yet) are absent. Raises
    :class:`SpinemetsError` when ``sacct`` is missing or fails (e.g. no accounting configured).
    """
    ids = sorted(set(job_ids), key=_job_sort_key)
    if not ids:
        return {}
    cmd = ["sacct", "-X", "--parsable2", "-o", "JobID,State,ExitCode,Reason,Elapsed", "-j", ",".join(ids)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise SpinemetsError("sacct not found: the job states come from SLURM's accounting; run this on the "
                             "cluster's login node") from None
    except subprocess.TimeoutExpired:
        raise SpinemetsError(f"sacct did not answer within 60 s: {' '.join(cmd)}") from None
    if proc.returncode != 0:
        raise SpinemetsError(f"sacct failed (exit {proc.returncode}): {proc.stderr.strip()} "
                             "(job states need SLURM accounting, slurmdbd)")
    info = SlurmInfoWatcher().read_info(proc.stdout)
    return {job: info[job] for job in ids if job in info}


def queue_states(job_ids: Iterable[str]) -> dict[str, dict[str, str]]:
    """The controller's view of those of ``job_ids`` still in the queue (``squeue``): ``{job id: {"State", "Reason"}}``.

    Accounting records a pending job's reason only when its state changes, and learns of a new
    job a moment after ``sbatch``; the queue knows both at once. ``{}`` when squeue fails.
    """
    wanted = set(job_ids)
    if not wanted:
        return {}
    try:
        proc = subprocess.run(["squeue", "-h", "-r", "--me", "-o", "%i|%T|%r"], capture_output=True, text=True,
                              timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return {}
    rows = (line.split("|", 2) for line in proc.stdout.splitlines() if line.count("|") == 2)
    return {job.strip(): {"State": state.strip(), "Reason": reason.strip()}
            for job, state, reason in rows if job.strip() in wanted}


def status(run_folder: str | Path) -> pd.DataFrame:
    """The state of every step of a run, one row per step (columns :data:`STATUS_COLUMNS`).

    ``status`` is ``pending``, ``running``, ``done``, ``failed``, ``cancelled``, ``blocked`` (pending
    on a dependency that failed: it will never start until resubmitted) or ``unknown`` (neither in
    the accounting nor in the queue); ``state`` is SLURM's own (``sacct``; ``squeue`` for the
    reason a job waits, and for a job that accounting does not list yet), ``attempt`` counts submissions of the
    step, ``reason`` says why a job waits or failed (with the last line of the error the job
    raised, where it raised one), ``log`` is the job's log file.
    """
    folder = Path(run_folder)
    record = load_record(folder)
    latest = {e["name"]: e["jobs"][-1] for e in record["steps"] if e["jobs"]}
    if record["executor"] == "slurm":
        ids = [job["id"] for job in latest.values()]
        accounting = sacct_states(ids)
        asks = [j for j in ids if j not in accounting or accounting[j].get("State", "").startswith("PENDING")]
        for job, queued in queue_states(asks).items():
            accounting[job] = {**accounting.get(job, {}), **queued}
    else:
        accounting = {job["id"]: {"State": job.get("state", "UNKNOWN"), "Reason": job.get("reason", "")}
                      for job in latest.values()}
    rows = []
    for entry in record["steps"]:
        job = latest.get(entry["name"])
        row = {"step": entry["name"], "kind": entry["kind"], "stage": entry["stage"],
               "configuration": entry["configuration"] or "",
               "fold": "" if entry["fold"] is None else str(entry["fold"]),
               "job": job["id"] if job else "", "attempt": len(entry["jobs"]),
               "state": "", "status": "not submitted", "reason": "", "elapsed": "", "log": ""}
        if job:
            row.update(_describe(job, accounting.get(job["id"])))
        rows.append(row)
    return pd.DataFrame(rows, columns=STATUS_COLUMNS)


def _describe(job: dict, acct: dict | None) -> dict:
    if acct is None:
        return {"state": "UNKNOWN", "status": "unknown", "reason": "not in SLURM's accounting",
                "log": job.get("err", job["log"])}
    state = acct.get("State", "UNKNOWN").split()[0].rstrip("+")  # "CANCELLED by 0", "CANCELLED+"
    status_ = STATUS_OF_STATE.get(state, "unknown")
    reason = acct.get("Reason", "") or ""
    if reason == "None" or status_ in ("done", "running"):
        reason = ""  # accounting keeps the last pending reason of finished jobs
    if status_ == "pending" and "DependencyNeverSatisfied" in reason:
        status_ = "blocked"
        reason = "a step it depends on did not complete (DependencyNeverSatisfied); resubmit the run"
    if status_ in ("failed", "cancelled"):
        error = _job_error(job)
        exit_code = acct.get("ExitCode", "")
        reason = "; ".join(p for p in (acct.get("State", state), f"exit {exit_code}" if exit_code else "", error) if p)
    log_file = job.get("err", job["log"]) if status_ in ("failed", "cancelled") else job["log"]
    return {"state": state, "status": status_, "reason": reason, "elapsed": acct.get("Elapsed", ""), "log": log_file}


def _job_error(job: dict) -> str:
    """The last line of the error a job raised (submitit's result pickle), or ``""``."""
    if job.get("reason"):
        return job["reason"]
    result = Path(job["log"]).with_name(Path(job["log"]).name.replace("_log.out", "_result.pkl"))
    try:
        outcome, payload = pickle_load(result)
    except Exception:  # no result: killed, cancelled or not started
        return ""
    return _last_line(str(payload)) if outcome == "error" else ""


def wait(run_folder: str | Path, poll_s: float = 30.0, timeout_s: float | None = None,
         progress: bool = True, unknown_grace_s: float = 120.0) -> pd.DataFrame:
    """Poll :func:`status` until every step is done; return the final table.

    Raises :class:`SpinemetsError` as soon as a step failed, was cancelled or is blocked behind a
    failed step, or has stayed unknown to SLURM for ``unknown_grace_s`` (accounting learns of a
    new job a moment after ``sbatch``), naming each with its reason and log file and saying how
    to send it again; also when ``timeout_s`` passes. A progress bar counts the steps done.
    """
    from tqdm.auto import tqdm

    folder = Path(run_folder)
    deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
    unknown_since: dict[str, float] = {}
    table = status(folder)
    bar = tqdm(total=len(table), desc=f"{folder.name}: steps done", unit="step", disable=not progress)
    try:
        while True:
            done = int((table["status"] == "done").sum())
            bar.update(done - bar.n)
            if done == len(table):
                return table
            now = time.monotonic()
            lost = {r.step for r in table.itertuples()
                    if r.status == "unknown" and now - unknown_since.setdefault(r.step, now) > unknown_grace_s}
            bad = table[table["status"].isin(("failed", "cancelled", "blocked", "not submitted"))
                        | table["step"].isin(lost)]
            if len(bad):
                lines = [f"{r.step}: {r.status} ({r.reason or r.state}); log: {r.log or '-'}" for r in bad.itertuples()]
                raise SpinemetsError(f"{folder}: {len(bad)} step(s) did not complete: " + " | ".join(lines)
                                     + f" | send them again with: spinemets jobs {folder} --resubmit")
            if deadline is not None and now > deadline:
                for line in table.to_string(index=False).splitlines():
                    log.error("%s", line)
                raise SpinemetsError(f"{folder}: not done after {timeout_s:g} s; "
                                     f"{len(table) - done} step(s) left (listed above)")
            time.sleep(poll_s)
            table = status(folder)
    finally:
        bar.close()


def resubmit(run_folder: str | Path) -> dict:
    """Send again the steps of a run that failed, were cancelled or are unknown, with every step that depends on them.

    Dependents that wait in the queue for a failed step (``blocked``) are cancelled first and
    submitted again with dependencies on the new jobs; steps that are done, running or pending
    on healthy dependencies are left alone. Training resumes from its latest checkpoint. Returns
    the updated record (each step's ``jobs`` lists all its submissions).
    """
    folder = Path(run_folder).resolve()
    record = load_record(folder)
    table = status(folder).set_index("step")
    redo = {name for name in table.index
            if table.at[name, "status"] in (*RESUBMIT, "not submitted")}
    for entry in record["steps"]:  # the record is in dependency order
        if any(a in redo for a in entry["after"]) and table.at[entry["name"], "status"] != "done":
            redo.add(entry["name"])
    if not redo:
        log.info("%s: nothing to resubmit", folder)
        return record
    live = [table.at[n, "job"] for n in redo if table.at[n, "status"] in ("pending", "blocked", "running")]
    if live and record["executor"] == "slurm":
        subprocess.run(["scancel", *live], capture_output=True, text=True)
    for entry in record["steps"]:  # completed parents need no dependency
        if entry["jobs"] and table.at[entry["name"], "status"] == "done":
            entry["jobs"][-1]["state"] = "COMPLETED"
    _submit_entries(folder, record, [e["name"] for e in record["steps"] if e["name"] in redo])
    return record
