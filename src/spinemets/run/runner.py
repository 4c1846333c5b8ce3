"""The batch runner: execute the notebooks of a profile with papermill, then build the book.

``run("demo")`` (the command ``spinemets run --profile demo``) does, in order:

1. loads the profile (:mod:`spinemets.run.profiles`) and works out each notebook's parameters:
   shared profile parameters, the notebook's own, then the overrides given to :func:`run`, each
   kept only where the notebook declares it in its cell tagged ``parameters``;
2. executes the notebooks one after the other with papermill, in the project root as working
   directory, into ``build/executed/<same name>.ipynb``. A failing notebook stops the run with a
   :class:`SpinemetsError` (a non-zero exit on the command line); its executed copy, with the
   error in it, is kept;
3. writes ``build/executed/provenance.json`` (command, profile, parameters, status and duration
   of every notebook, package versions), after every notebook, so a failed run has one too;
4. builds the book with ``jupyter-book build -n -W --keep-going --all`` from a copy of
   ``_toc.yml`` (``build/executed/_toc.yml``) in which each executed notebook replaces its
   committed original. The committed ``_toc.yml`` names the committed notebooks, so a fresh
   clone builds a complete book without any run. The results page (``book/results.md``) finds the
   run through the environment variable :data:`RUN_DIR_ENV`, which is set for the book build only.

A notebook run once per stage (``03_training``) gets an executed copy per stage, each made the page
of its stage by :func:`stage_page` (its title and opening paragraph). :func:`build_run_book`
(``spinemets book``, ``make book``) builds the book again from a finished run without executing
anything. The results page itself is served by :mod:`spinemets.report.results`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import yaml

from spinemets.errors import SpinemetsError
from spinemets.fileio import atomic_path, read_json, write_json, write_text
from spinemets.run.profiles import NotebookStep, Profile, find_project_root, load_profile, notebook_parameters
from spinemets.provenance import now, provenance
from spinemets.training.profiles import cpu_bf16_setting, planned_iterations, stage_budget, stage_plan

log = logging.getLogger(__name__)

DEFAULT_OUT_DIR = "build/executed"
PROVENANCE = "provenance.json"
RUN_TOC = "_toc.yml"
#: Environment variable naming the run folder, set for the book build (read by book/results.md).
RUN_DIR_ENV = "SPINEMETS_RUN_DIR"
#: The notebook that trains a stage (its ``stage`` parameter says which), run once per stage;
#: :func:`spinemets.run.cluster.run_steps` turns those runs into jobs.
TRAINING_NOTEBOOK = "03_training"


# ---------------------------------------------------------------------------------------------
# Running the notebooks
# ---------------------------------------------------------------------------------------------


def run(
    profile: str | Path | Profile,
    parameters: Mapping[str, Any] | None = None,
    notebooks: Iterable[str | Path] | None = None,
    out_dir: str | Path = DEFAULT_OUT_DIR,
    build_book: bool = True,
    root: str | Path | None = None,
    estimate: bool = True,
) -> Path:
    """Execute the notebooks of ``profile`` in order and build the book; return the run folder.

    ``parameters`` override notebook parameters for every notebook that declares them; string
    values are read as YAML (``"8"`` -> 8, ``"[0, 1]"`` -> a list, ``"true"`` -> True), as they
    come from ``-p NAME VALUE`` on the command line. An override that no selected notebook declares
    is an error. ``notebooks`` selects a subset of the profile's notebooks (by stem, e.g.
    ``"01_dataset"``, or path) or, for paths not in the profile, adds notebooks that get the
    shared parameters. ``out_dir`` (relative to the project root) receives the executed notebooks
    and ``provenance.json``; ``root`` is the project root (default: :func:`find_project_root`).
    """
    root = find_project_root(root)
    prof = profile if isinstance(profile, Profile) else load_profile(profile, root)
    out = _inside(root, out_dir)
    if build_book:
        _relative_to_root(root, out)  # fail now, not after hours of notebooks
    plans = plan_run(prof, root, notebooks, parameters)
    out.mkdir(parents=True, exist_ok=True)
    clear_run(out)
    record = _provenance(root, prof, {k: parse_value(v) for k, v in dict(parameters or {}).items()}, plans, out)
    expected = run_estimate(prof, plans, build_book) if estimate else None
    if expected:
        record["estimate"] = expected
        for entry in record["notebooks"]:
            entry["expected_s"] = round(expected["steps"].get(entry["step"], 0.0), 1)
    write_json(out / PROVENANCE, record)
    copies: dict[Path, int] = {}
    run_started = time.monotonic()
    for index, (entry, (name, source, params)) in enumerate(zip(record["notebooks"], plans), start=1):
        started = time.monotonic()
        target = out / f"{name}.ipynb"
        try:
            with _step_progress(name, index, len(plans), expected, time.monotonic() - run_started):
                execute_notebook(source, target, params, cwd=root, progress_bar=not expected)
            if name != source.stem:  # one notebook run once per stage: tell its copies apart in the book
                copies[source] = copies.get(source, 0) + 1
                _mark_copy(target, name[len(source.stem) + 1:], first=copies[source] == 1)
        except SpinemetsError as exc:
            entry.update(status="failed", seconds=round(time.monotonic() - started, 1), error=str(exc))
            _finish(out, record, "failed")
            raise
        entry.update(status="ok", seconds=round(time.monotonic() - started, 1))
        write_json(out / PROVENANCE, record)
    _finish(out, record, "executed")
    if build_book:
        try:
            with _step_progress("book", len(plans) + 1, len(plans) + 1, expected, time.monotonic() - run_started):
                record["book"] = _rel(root, build(root, out))
        except SpinemetsError:
            _finish(out, record, "book build failed")
            raise
        _finish(out, record, "ok")
    return out


def dry_run(profile: str | Path | Profile, parameters: Mapping[str, Any] | None = None,
            root: str | Path | None = None) -> list[tuple[str, Path, dict[str, Any]]]:
    """What :func:`run` would execute, checked as it checks it, without running anything:
    (step name, notebook file, papermill parameters) per notebook run (``spinemets run --dry-run``)."""
    root = find_project_root(root)
    prof = profile if isinstance(profile, Profile) else load_profile(profile, root)
    return plan_run(prof, root, None, parameters)


def plan_run(
    profile: Profile, root: Path, notebooks: Iterable[str | Path] | None = None,
    parameters: Mapping[str, Any] | None = None,
) -> list[tuple[str, Path, dict[str, Any]]]:
    """(step name, notebook file, papermill parameters) of each notebook run, checked before anything runs.

    Raises :class:`SpinemetsError` for a missing notebook, one without a ``parameters`` cell, a
    profile parameter the notebook does not declare, and an override no notebook declares.
    """
    overrides = {name: parse_value(value) for name, value in dict(parameters or {}).items()}
    steps = select_steps(profile, notebooks)
    sources = [_source(root, step) for step in steps]
    declared = [declared_parameters(src) for src in sources]
    known = set().union(*declared)
    unused = sorted(set(overrides) - known)
    if unused:
        raise SpinemetsError(
            f"parameter(s) {unused} are not declared by any notebook of profile {profile.name!r}; "
            f"declared: {sorted(known)}"
        )
    return [(step.name, src, notebook_parameters(profile, step, names, overrides))
            for step, src, names in zip(steps, sources, declared)]


def _finish(out: Path, record: dict, status: str) -> None:
    record.update(status=status, finished=now())
    write_json(out / PROVENANCE, record)


def parse_value(value: Any) -> Any:
    """A command-line parameter value: strings are read as YAML, other values pass unchanged.

    Only ``true``/``false`` (any case) become booleans; YAML 1.1's ``yes``/``no``/``on``/``off``
    stay strings.
    """
    if not isinstance(value, str):
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
        return value
    return value if parsed is None and value.strip().lower() not in ("null", "none", "~") else parsed


def select_steps(profile: Profile, notebooks: Iterable[str | Path] | None) -> list[NotebookStep]:
    """The profile's notebooks, or the ones named in ``notebooks`` (by stem or path), in the given order."""
    if notebooks is None:
        return list(profile.notebooks)
    # by stem, path, or (a notebook run once per stage) step name
    known = {key: step for step in profile.notebooks for key in (step.stem, step.name, Path(step.path).as_posix())}
    chosen = []
    for item in notebooks:
        key = Path(str(item)).as_posix() if str(item).endswith(".ipynb") else str(item)
        if key in known:
            chosen.append(known[key])
        elif key.endswith(".ipynb"):
            chosen.append(NotebookStep(key))
        else:
            raise SpinemetsError(
                f"notebook {str(item)!r} is not in profile {profile.name!r} "
                f"({', '.join(s.stem for s in profile.notebooks)}) and is not a path to a .ipynb file"
            )
    if not chosen:
        raise SpinemetsError("no notebooks selected")
    return chosen


def _source(root: Path, step: NotebookStep) -> Path:
    path = Path(step.path)
    path = path if path.is_absolute() else root / path
    if not path.is_file():
        raise SpinemetsError(f"{path}: notebook not found")
    return path


def _inside(root: Path, folder: str | Path) -> Path:
    folder = Path(folder)
    return (folder if folder.is_absolute() else root / folder).resolve()


def declared_parameters(notebook: str | Path) -> set[str]:
    """Names assigned in the notebook's cell tagged ``parameters`` (papermill's own parser).

    A notebook without such a cell is an error: papermill could not inject anything into it.
    """
    import nbformat
    import papermill

    path = Path(notebook)
    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as exc:  # nbformat raises several types for damaged files
        raise SpinemetsError(f"{path}: not a readable notebook ({exc})") from None
    if not any("parameters" in cell.get("metadata", {}).get("tags", []) for cell in nb.cells):
        raise SpinemetsError(f"{path}: no cell tagged 'parameters'; papermill cannot pass parameters to it")
    return set(papermill.inspect_notebook(str(path)))


def run_estimate(prof: Profile, plans: list, build_book: bool) -> dict | None:
    """Measure this machine for a few seconds and print the run's expected time per step and in all.

    Each training step with a fixed number of iterations is timed: a few real training iterations
    of its stage's network here (:func:`spinemets.training.estimate.time_training_iterations`); one with a
    wall-clock budget (``--train-budget``) takes its budget. Returns ``{"machine", "training",
    "steps": {step: seconds}}`` for the provenance, or None where the profile has no reference
    times (:mod:`spinemets.training.estimate`) or a training step has neither (nnU-Net's own trainers).
    """
    from spinemets.training import estimate

    steps = [name for name, _, _ in plans]
    if prof.name not in estimate.REFERENCE["steps"]:
        return None
    training: dict = {}
    for name, _, params in plans:
        if "stage" in params and name.startswith(TRAINING_NOTEBOOK):
            training[name] = training_work(params["stage"], params.get("profile", "demo"),
                                           params.get("train_budget_min"))
    if not estimate.has_reference(prof.name, steps, training):
        return None
    machine = estimate.measure_machine()
    timed: dict = {}
    for name, work in training.items():
        if isinstance(work, dict):
            key = (work["stage"], work["configuration"])
            if key not in timed:
                timed[key] = estimate.time_training_iterations(work["spec"], work["classes"],
                                                               bf16_setting=work.get("bf16_setting"))
            work.update(timed[key])
            del work["spec"]
    expected = estimate.estimate_run(prof.name, steps, training, machine, book=build_book)
    lines = estimate.format_estimate(expected, machine, training)
    for line in lines:
        print(line, flush=True)
    return {"machine": machine, "training": training, "steps": {k: round(v, 1) for k, v in expected.items()}}


def training_work(stage: str, profile: str, train_budget_min=None):
    """What one training step will do, for the estimate: its wall-clock budget in seconds (a
    number: ``--train-budget``, or a profile with ``budget_s``), or its fixed work (a dict: stage,
    configuration and its plans ``spec``, output ``classes``, ``iterations``, ``epochs``,
    ``val_iterations``), or None where the trainer is not one of the project's or the configuration
    is not one the project adds (nnU-Net plans it: not known before planning)."""
    from spinemets import labels
    from spinemets.training.trainers import spinemets_trainers

    budget = stage_budget(stage, profile, train_budget_min)
    if budget:
        return float(budget)
    entry = stage_plan(stage, profile)
    iterations = planned_iterations(stage, profile)
    configurations = [c for c in entry["configurations"] if c in entry.get("extra_configurations", {})]
    if iterations is None or len(configurations) != len(entry["configurations"]) or len(configurations) != 1:
        return None
    cls = getattr(spinemets_trainers, entry["trainer"])
    cfg = configurations[0]
    n_folds = len(entry["folds"])
    return {"stage": stage, "configuration": cfg, "spec": entry["extra_configurations"][cfg],
            "bf16_setting": cpu_bf16_setting(profile),
            "classes": len(labels.labels(stage)), "iterations": iterations * n_folds,
            "epochs": int(cls.EPOCHS) * n_folds, "val_iterations": int(cls.VAL_ITERATIONS)}


@contextlib.contextmanager
def _step_progress(name: str, index: int, count: int, expected: dict | None, elapsed_s: float):
    """Around one notebook: a line with the step's expected time and the run's time left, then a
    bar that counts the step's seconds against its expected time (the terminal only; not the book)."""
    if not expected:
        yield
        return
    steps = expected["steps"]
    names = list(steps)
    left = sum(steps[n] for n in names[names.index(name):]) if name in steps else 0.0
    print(f"[{index}/{count}] {name}: expected ~{steps.get(name, 0) / 60:.1f} min; run so far "
          f"{elapsed_s / 60:.1f} min, about {left / 60:.1f} min left", flush=True)
    from tqdm.auto import tqdm

    total = max(1, int(round(steps.get(name, 1))))
    start = time.monotonic()
    stop = threading.Event()
    bar = thread = None
    if sys.stderr.isatty():  # a bar redrawn every second only where it is seen, not in a log file
        bar = tqdm(total=total, desc=name, unit="s", bar_format="{desc}: {bar} {n_fmt}/{total_fmt} s "
                   "[{elapsed}, about {remaining} left]", leave=False)

        def tick():
            while not stop.wait(1.0):
                bar.n = min(total, int(time.monotonic() - start))
                bar.refresh()

        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
    outcome = "failed after"
    try:
        yield
        outcome = "done in"
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=5)
            bar.close()
        print(f"[{index}/{count}] {name}: {outcome} {(time.monotonic() - start) / 60:.1f} min", flush=True)


#: The environment of the kernels that execute a run's notebooks, where the user has not set these:
#: nnU-Net's output goes to log files beside the run's outputs (``spinemets.training.programs.TOOL_OUTPUT_ENV``)
#: and no progress bars are drawn into the pages (the runner's own progress stays on the terminal).
NOTEBOOK_ENVIRONMENT = {"SPINEMETS_TOOL_OUTPUT": "log", "TQDM_DISABLE": "1"}


@contextlib.contextmanager
def _notebook_environment() -> Iterator[None]:
    added = {k: v for k, v in NOTEBOOK_ENVIRONMENT.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def execute_notebook(source: Path, target: Path, parameters: Mapping[str, Any], cwd: Path,
                     progress_bar: bool = True) -> Path:
    """Execute one notebook with papermill into ``target``; a failure raises :class:`SpinemetsError`.

    The executed notebook is written as it runs and kept when a cell fails, with the error output
    in the failing cell. Its kernel gets :data:`NOTEBOOK_ENVIRONMENT`.
    """
    import nbformat
    import papermill
    from papermill.exceptions import PapermillExecutionError

    kernel = nbformat.read(source, as_version=4).metadata.get("kernelspec", {}).get("name", "python3")
    log.info("executing %s -> %s", source.name, target)
    try:
        with _notebook_environment():
            papermill.execute_notebook(
                str(source), str(target), parameters=dict(parameters), cwd=str(cwd), kernel_name=kernel,
                progress_bar=progress_bar, log_output=False, report_mode=False,
            )
    except PapermillExecutionError as exc:
        raise SpinemetsError(
            f"{source}: cell {exc.exec_count} failed with {exc.ename}: {exc.evalue}; "
            f"the executed notebook, with the error, is {target}"
        ) from None
    except Exception as exc:  # kernel died, could not start, ...
        raise SpinemetsError(
            f"{source}: execution failed ({type(exc).__name__}: {exc}); what ran is in {target}"
        ) from None
    return target


def clear_run(out: Path) -> list[Path]:
    """Remove what an earlier run left in ``out``: executed notebooks (those papermill wrote),
    the generated table of contents and the provenance. Other files are left alone."""
    import nbformat

    removed = []
    for path in sorted(out.glob("*.ipynb")):
        try:
            is_ours = "papermill" in nbformat.read(path, as_version=4).metadata
        except Exception:
            is_ours = False
        if is_ours:
            path.unlink()
            removed.append(path)
    for name in (RUN_TOC, PROVENANCE):
        if (out / name).exists():
            (out / name).unlink()
            removed.append(out / name)
    return removed


def _relative_to_root(root: Path, folder: Path) -> Path:
    """``folder`` relative to the project root; an error when it lies outside (Sphinx reads only the root)."""
    try:
        return Path(folder).resolve().relative_to(root)
    except ValueError:
        raise SpinemetsError(
            f"{folder}: the run folder must lie inside the project root {root} for the book to include it"
        ) from None


def _rel(root: Path, path: Path) -> str:
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _provenance(root: Path, prof: Profile, overrides: dict, plans: list, out: Path) -> dict:
    record = provenance(
        "spinemets.run.runner.run",
        profile={"name": prof.name, "file": _rel(root, prof.source), "cohort": prof.cohort,
                 "description": prof.description},
        overrides=overrides,
        notebooks=[{"notebook": _rel(root, src), "executed": _rel(root, out / f"{name}.ipynb"), "step": name,
                    "parameters": params, "status": "pending"} for name, src, params in plans],
        finished=None, status="running", book=None,
    )
    record["started"] = record["created"]
    return record


# ---------------------------------------------------------------------------------------------
# Building the book
# ---------------------------------------------------------------------------------------------


def run_toc(root: Path, out: Path) -> Path:
    """Write ``out/_toc.yml``: the project's ``_toc.yml`` with every notebook that has an executed
    copy in ``out`` pointing at that copy. Returns the file written."""
    toc_path = root / "_toc.yml"
    try:
        toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SpinemetsError(f"{toc_path}: cannot read the table of contents ({exc})") from None
    out_rel = _relative_to_root(root, out)
    # The run's record says, in run order, which committed notebook each executed copy comes from;
    # a copy it does not list stands for the notebook of its own name.
    record = read_json(out / PROVENANCE, "run provenance", missing={})
    runs = record.get("notebooks", []) if isinstance(record, dict) else []
    source = {Path(n.get("executed", "")).stem: Path(n.get("notebook", "")).stem for n in runs}
    rank = {stem: i for i, stem in enumerate(source)}
    executed: dict[str, list[str]] = {}  # committed notebook stem -> its executed copies, in run order
    for path in sorted(out.glob("*.ipynb"), key=lambda p: (rank.get(p.stem, len(rank)), p.name)):
        executed.setdefault(source.get(path.stem, path.stem), []).append((out_rel / path.stem).as_posix())

    def swap(node):
        if isinstance(node, dict):
            node = {k: swap(v) for k, v in node.items()}
            target = node.get("file") or node.get("root")
            key = "file" if "file" in node else "root"
            if isinstance(target, str) and Path(target).stem in executed:
                node[key] = executed[Path(target).stem][0]
            return node
        if isinstance(node, list):
            items = []
            for item in node:
                items.append(swap(item))
                target = item.get("file") if isinstance(item, dict) else None
                if isinstance(target, str):  # a notebook run once per stage: an entry per further copy
                    items += [{**item, "file": copy} for copy in executed.get(Path(target).stem, [])[1:]]
            return items
        return node

    path = out / RUN_TOC
    write_text(path, "# Generated by spinemets.run.runner from _toc.yml; do not edit.\n"
               + yaml.safe_dump(swap(toc), sort_keys=False))
    return path


#: The tag of a markdown cell that belongs to one stage (``stage-vertebrae``) of a notebook run once per stage.
STAGE_TAG = "stage-"


def _cell_stages(cell) -> set[str]:
    return {tag[len(STAGE_TAG):] for tag in cell.get("metadata", {}).get("tags", []) if tag.startswith(STAGE_TAG)}


def stage_page(nb, stage: str, first: bool = True):
    """The executed copy of a notebook run once per stage, made the page of ``stage`` (in place; returns ``nb``).

    - The title (the first ``# `` line of the first markdown cell) becomes the notebook's own title
      for the stage, ``metadata.spinemets.stage_titles[stage]``; a notebook without one gets
      ``TITLE: stage``.
    - Markdown cells tagged ``stage-OTHER`` (:data:`STAGE_TAG`) are dropped; the stage's own
      cells directly after the first cell replace the text below the title (the notebook's opening
      for both stages), so that the page opens with its stage's own paragraph; its other own
      cells stay where they are.
    - Every copy but the first gets its own label (``(nb-training)=`` -> ``(nb-training-metastases)=``),
      so that cross-references find the first and no label is doubled.
    """
    import re

    titles = nb.metadata.get("spinemets", {}).get("stage_titles", {})
    nb.cells = [cell for cell in nb.cells if not _cell_stages(cell) or stage in _cell_stages(cell)]
    at = next((i for i, cell in enumerate(nb.cells) if cell.cell_type == "markdown"), None)
    if at is None:
        return nb
    head = nb.cells[at]
    opening = []
    while (at + 1 < len(nb.cells) and nb.cells[at + 1].cell_type == "markdown"
           and stage in _cell_stages(nb.cells[at + 1])):
        opening.append(nb.cells.pop(at + 1).source.strip())
    title = re.search(r"^# (.+)$", head.source, flags=re.M)
    text = head.source
    if title:
        new_title = f"# {titles[stage]}" if stage in titles else f"{title.group(0)}: {stage}"
        below = "\n\n".join(opening) if opening else text[title.end():].strip("\n")
        text = text[:title.start()] + new_title + ("\n\n" + below if below else "")
    if not first:
        text = re.sub(r"^\((nb-[a-z-]+)\)=$", lambda m: f"({m.group(1)}-{stage})=", text, count=1, flags=re.M)
    head.source = text
    return nb


def _mark_copy(path: Path, stage: str, first: bool) -> None:
    """Make the executed copy ``path`` of a notebook run once per stage the page of its stage (:func:`stage_page`)."""
    import nbformat

    nb = stage_page(nbformat.read(path, as_version=4), stage, first)
    with atomic_path(path) as tmp:
        nbformat.write(nb, tmp)


def jupyter_book_command() -> list[str]:
    """The ``jupyter-book`` executable of this environment."""
    beside = Path(sys.executable).with_name("jupyter-book")
    found = str(beside) if beside.exists() else shutil.which("jupyter-book")
    if not found:
        raise SpinemetsError("jupyter-book is not installed in this environment (pip install jupyter-book==1.0.4.post1)")
    return [found]


def build(root: str | Path | None = None, run_dir: str | Path | None = None) -> Path:
    """Build the book with ``-n -W --keep-going --all``; return ``_build/html/index.html``.

    With ``run_dir``, the book is built from that run's table of contents (:func:`run_toc`) and
    the results page reads that run. Without it, the committed ``_toc.yml`` is used. A failed
    build raises :class:`SpinemetsError` with the end of jupyter-book's output.
    """
    root = find_project_root(root)
    command = [*jupyter_book_command(), "build", str(root), "-n", "-W", "--keep-going", "--all"]
    env = dict(os.environ)
    if run_dir is not None:
        out = _inside(root, run_dir)
        command += ["--toc", str(run_toc(root, out))]
        env[RUN_DIR_ENV] = str(out)
    log.info("building the book: %s", " ".join(command))
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        for line in (result.stdout + result.stderr).strip().splitlines()[-30:]:
            log.error("jupyter-book: %s", line)
        raise SpinemetsError(f"{root}: the book build failed (jupyter-book exit {result.returncode}); "
                             "the last lines of its output are above")
    return root / "_build" / "html" / "index.html"


#: Run statuses after which every notebook has executed (a book can be built from the run).
EXECUTED_STATUSES = ("executed", "ok", "book build failed")


def build_run_book(root: str | Path | None = None, out_dir: str | Path = DEFAULT_OUT_DIR) -> Path:
    """Build the book again from a finished run in ``out_dir``, executing no notebook and training
    nothing (``spinemets book``, ``make book``); return ``_build/html/index.html``.

    The run's ``provenance.json`` must say that every notebook executed (:data:`EXECUTED_STATUSES`);
    it then records the book, the time it was built and the status ``ok`` (or ``book build failed``).
    """
    root = find_project_root(root)
    out = _inside(root, out_dir)
    record = read_json(out / PROVENANCE, "run provenance", missing=None)
    if record is None:
        raise SpinemetsError(f"{out}: no run here (no {PROVENANCE}); run the notebooks first "
                             "(spinemets run --profile demo)")
    if record.get("status") not in EXECUTED_STATUSES:
        raise SpinemetsError(f"{out}: the run has not executed all its notebooks (status: {record.get('status')}); "
                             "run them first (spinemets run --profile NAME)")
    try:
        index = build(root, out)
    except SpinemetsError:
        record.update(status="book build failed", book_built=now())
        write_json(out / PROVENANCE, record)
        raise
    record.update(status="ok", book=_rel(root, index), book_built=now())
    write_json(out / PROVENANCE, record)
    return index


# ---------------------------------------------------------------------------------------------
# The results page
# ---------------------------------------------------------------------------------------------
