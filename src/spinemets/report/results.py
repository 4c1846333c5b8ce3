"""The book's pages that set a run beside the paper (``book/results.md``, ``book/dataset.md``).

:func:`run_dir` finds the run (the folder :func:`spinemets.run.runner.run` executed the notebooks
into, named by :data:`spinemets.run.runner.RUN_DIR_ENV` during the book build), :func:`read_provenance`
reads what produced it, :func:`run_summaries` and :func:`run_per_case` read the tables the
evaluation wrote into the run's workspace (:meth:`spinemets.paths.Workspace.evaluation`), and
:func:`compare_with_paper`, :func:`per_vertebra_table` and :func:`per_lesion_type_table` set them
beside the paper's values (:func:`read_paper_results`: its Tables 2 and 3 as transcribed in
``book/data/paper/``, and ``book/data/paper_results.csv``), :func:`with_intervals` with our
bootstrap intervals. :func:`cohort_beside_paper` sets the paper's Table 1 (:func:`read_paper_cohort`)
beside the cohort a run used (:func:`run_cohort`). This module serves the book; the command that
produces what it shows is ``spinemets run`` (``spinemets book`` builds the book again).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple

import pandas as pd

from spinemets.errors import SpinemetsError
from spinemets.fileio import read_json
from spinemets.labels import STAGE_NAMES
from spinemets.run.profiles import find_project_root
from spinemets.run.runner import DEFAULT_OUT_DIR, PROVENANCE, RUN_DIR_ENV
from spinemets.paths import workspace_of

PAPER_RESULTS = "book/data/paper_results.csv"


def run_dir(root: str | Path | None = None) -> Path:
    """The run the book shows: :data:`RUN_DIR_ENV` when set, else ``build/executed`` of the project."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV])
    return find_project_root(root) / DEFAULT_OUT_DIR


def read_provenance(folder: str | Path) -> dict | None:
    """The ``provenance.json`` of a run folder, or None when the folder holds no run."""
    return read_json(Path(folder) / PROVENANCE, "run provenance", missing=None)


def run_parameter(provenance: Mapping, name: str) -> Any:
    """The value of parameter ``name`` in the last notebook of a run that was given it (None if none)."""
    value = None
    for entry in provenance.get("notebooks", []):
        if name in entry.get("parameters", {}):
            value = entry["parameters"][name]
    return value


def run_workspace(provenance: Mapping | None, root: str | Path | None = None) -> Path | None:
    """The ``workspace`` parameter of a run as a path (relative ones are relative to the project root)."""
    workspace = run_parameter(provenance, "workspace") if provenance else None
    if workspace is None:
        return None
    return Path(workspace) if Path(workspace).is_absolute() else find_project_root(root) / workspace


def run_summaries(provenance: Mapping | None, root: str | Path | None = None) -> dict[str, pd.DataFrame | None]:
    """The evaluation summaries of a run per stage (None where the run has none). The run's
    ``workspace`` parameter is relative to the project root unless absolute."""
    workspace = run_workspace(provenance, root)
    return {stage: None if workspace is None else read_summary(workspace_of(workspace).evaluation(stage))
            for stage in STAGE_NAMES}


def run_per_case(provenance: Mapping | None, stage: str, root: str | Path | None = None) -> pd.DataFrame | None:
    """A stage's ``per_case.csv`` (case, class, metric, value) of a run, or None."""
    workspace = run_workspace(provenance, root)
    if workspace is None:
        return None
    path = workspace_of(workspace).evaluation(stage) / "per_case.csv"
    return pd.read_csv(path) if path.is_file() else None


def provenance_statement(provenance: Mapping | None) -> str:
    """One Markdown paragraph saying which profile produced the book's numbers and what they mean."""
    if not provenance:
        return ("**No pipeline run is included in this build.** The table shows the paper's published "
                "values only. Run `spinemets run --profile demo` (synthetic cohort, CPU) or "
                "`spinemets run --profile paper` (public cohort, GPU) to add ours.")
    prof = provenance.get("profile", {})
    device = run_parameter(provenance, "device") or "unknown device"
    finished = provenance.get("finished") or provenance.get("started") or "unknown time"
    status = provenance.get("status", "?")
    text = (f"These numbers were produced by the **{prof.get('name', '?')}** profile "
            f"(`{prof.get('file', '?')}`) on **{str(device).upper()}**, run finished {finished}"
            + ("." if status in ("executed", "ok") else f", **status: {status}**.")
            + (f" Command: `{provenance['command']}`." if provenance.get("command") else ""))
    if prof.get("cohort") == "synthetic":
        text += (" **They come from a synthetic cohort"
                 + (" on a CPU" if str(device).lower() == "cpu" else "")
                 + ": they show that the pipeline runs end to end and learns, and say nothing about "
                 "performance on patients. They are not comparable with the paper's values.**")
    else:
        text += " They come from the public cohort of the paper."
    return text


def run_training(provenance: Mapping | None, root: str | Path | None = None) -> list[dict]:
    """What each trained fold of a run's workspace reached (the project's trainers'
    ``spinemets_training.json``): one dict per stage, configuration and fold, in stage order."""
    workspace = run_workspace(provenance, root)
    if workspace is None:
        return []
    from spinemets.training.nnunet import TRAINING_RECORD

    ws, rows = workspace_of(workspace), []
    for stage in STAGE_NAMES:
        for path in sorted((ws.results / ws.dataset_name(stage)).glob(f"*/fold_*/{TRAINING_RECORD}")):
            record = read_json(path, "training record", missing=None)
            if record:
                rows.append({"stage": stage, "model": path.parent.parent.name.split("__")[-1],
                             "fold": path.parent.name[len("fold_"):], **record})
    return rows


def training_statement(records: list[dict]) -> str:
    """One Markdown paragraph: how many iterations each stage trained, how long, on what CPU, and
    whether the numbers hold on any CPU (a fixed iteration count) or on this machine only (a
    wall-clock budget, ``--train-budget``)."""
    if not records:
        return ("This run's models carry no training record: their trainer keeps none (nnU-Net's own trainers, "
                "as in the paper profile), or they were trained before records were kept.")
    parts = []
    for rec in records:
        budget = (f", this run used a time budget of {rec['budget_s']:.0f} s" if rec.get("budget_s")
                  else " (a fixed iteration count)")
        seed = f", seed {rec['seed']}" if rec.get("seed") is not None else ""
        parts.append(f"{rec['stage']} ({rec['model']}, fold {rec['fold']}): {rec['iterations']} iterations{budget}"
                     f"{seed}, {rec['elapsed_s']:.0f} s, {rec['seconds_per_iteration']:.2f} s per iteration")
    cpus = {(r.get("device", "cpu"), (r.get("cpu") or {}).get("model", "?"), (r.get("cpu") or {}).get("torch_capability", "?"),
             (r.get("cpu") or {}).get("threads", "?"), bool(r.get("bf16_autocast"))) for r in records}
    where = "; ".join(
        f"{model}, torch kernels {cap}, {threads} threads, bfloat16 autocast {'on' if bf16 else 'off'}"
        if device == "cpu" else f"{device.upper()} (host CPU {model})"
        for device, model, cap, threads, bf16 in sorted(cpus, key=str))
    if any(r.get("budget_s") for r in records):
        closing = ("This run used a time budget (`--train-budget`): a faster CPU trains more iterations in the same "
                   "time, so these numbers hold for this machine only.")
    elif all(r.get("seed") is not None for r in records):
        closing = ("Each stage trained a fixed number of iterations with a fixed seed: the numbers are the same on any "
                   "CPU up to floating-point differences, and only the time differs. Two runs on one machine give "
                   "identical tables; between CPU kinds (AVX-512 or AVX2) the rounding differs, and in float32 the "
                   "demo's Dice values agreed within 0.03, its lesion-level F2 within 0.09 (a few of its 78 "
                   "held-out lesions found or missed)")
        closing += (". This run used bfloat16 autocast, which moves the numbers further (up to 0.15)." if any(
            r.get("bf16_autocast") for r in records) else ".")
    else:
        closing = ("Each stage trained a fixed number of iterations: any CPU trains the same amount, only the time "
                   "differs; without a seed, two runs differ by their random draws.")
    return "**Training.** " + "; ".join(parts) + f". **Trained on:** {where}. " + closing


def stage1_statement(provenance: Mapping | None, root: str | Path | None = None) -> str:
    """One Markdown sentence naming the stage-1 model of the run's held-out predictions (their
    ``provenance.json``): the run's own trained vertebra model, or TotalSegmentator's public model
    (``predict --vertebrae totalsegmentator``); "" when the run has no predictions."""
    workspace = run_workspace(provenance, root)
    if workspace is None:
        return ""
    record = read_json(workspace_of(workspace).predictions / PROVENANCE, "prediction provenance", missing=None)
    if not record:
        return ""
    source = (record.get("parameters") or {}).get("vertebrae") or "trained"
    models = (record.get("models") or {}).get("vertebrae") or []
    if source != "trained" and models:
        model = models[0]
        return (f"**Stage 1 (vertebrae):** {model.get('model', 'TotalSegmentator')}, task `{model.get('task', 'total')}`, "
                f"{model.get('mode', '')} model, its public weights (not trained in this run); its labels of "
                f"{model.get('roi_subset', 'the vertebrae')} mapped onto ours. The vertebra rows below score its "
                "labels, not a model of this run.")
    described = ", ".join(f"{m.get('configuration', '?')} ({m.get('trainer', '?')}, fold{'s' if len(m.get('folds', [])) > 1 else ''} "
                          f"{', '.join(map(str, m.get('folds', [])))})" for m in models) or "its trained model"
    return f"**Stage 1 (vertebrae):** this run's trained nnU-Net model: {described}."


def read_paper_results(path: str | Path | None = None, tables: str | Path | None = None) -> pd.DataFrame:
    """The paper's reported values: one row per stage, class and metric with either a ``value`` or a
    ``low``-``high`` range, its ``configuration`` and its ``source``.

    The values come from two places: ``book/data/paper_results.csv`` (``path``; values the paper
    states in its text, such as the range of Dice over vertebrae) and the paper's Table 2 (per
    vertebra) and Table 3 (per lesion type) as transcribed in ``book/data/paper/`` (``tables``;
    default: the folder ``paper`` beside ``path``), see :func:`read_paper_table`.
    """
    path = Path(path) if path is not None else find_project_root() / PAPER_RESULTS
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise SpinemetsError(f"{path}: paper results file not found") from None
    missing = {"stage", "configuration", "class", "metric", "value", "low", "high", "source"} - set(frame.columns)
    if missing:
        raise SpinemetsError(f"{path}: missing column(s) {sorted(missing)}")
    tables = Path(tables) if tables is not None else path.parent / "paper"
    rows = [frame]
    for table in PAPER_TABLES.values():
        values = read_paper_table(table.number, tables)
        long = values.melt(id_vars=table.key, var_name="metric", value_name="value").rename(columns={table.key: "class"})
        rows.append(long.assign(stage=table.stage, configuration=table.configuration,
                                metric=long["metric"].map(PAPER_METRIC), low=float("nan"), high=float("nan"),
                                source=paper_source(table.number)))
    return pd.concat(rows, ignore_index=True)[list(frame.columns)]


class _PaperTable(NamedTuple):
    number: int
    file: str
    stage: str
    key: str  # the column naming the class
    configuration: str  # the paper's configuration the table reports, as its caption names it


#: The paper's per-class tables as transcribed in ``book/data/paper/`` (columns: key, dice, fbeta, pq).
PAPER_TABLES: dict[int, _PaperTable] = {
    2: _PaperTable(2, "table2_vertebrae.csv", "vertebrae", "vertebra", "3d_fullres"),
    3: _PaperTable(3, "table3_metastases.csv", "metastases", "type", "3d_cascade_fullres"),
}
#: The paper metric (:data:`OUR_METRIC`'s keys) of each column of its Tables 2 and 3.
PAPER_METRIC = {"dice": "dice", "fbeta": "f2", "pq": "pq"}
#: The folder of the paper's tables, relative to the project root.
PAPER_TABLES_DIR = "book/data/paper"


def paper_source(table: int | None = None) -> str:
    """The citation of a value of the paper (of its Table ``table``, where given)."""
    where = f", Table {table}" if table else ""
    return (f"Edelmers et al. 2024{where} (preprint doi:10.20944/preprints202409.0633.v1; "
            "Diagnostics 14(21):2458, doi:10.3390/diagnostics14212458)")


def read_paper_table(number: int, folder: str | Path | None = None) -> pd.DataFrame:
    """The paper's Table 2 (per vertebra, C1 ... Sacrum in label order) or Table 3 (per lesion type)
    as transcribed in ``book/data/paper/``: the class column and ``dice``, ``fbeta``, ``pq``, checked
    to hold every class of its stage once and values between 0 and 1."""
    from spinemets.labels import LESION_TYPES, VERTEBRAE

    table = PAPER_TABLES[number]
    folder = Path(folder) if folder is not None else find_project_root() / PAPER_TABLES_DIR
    path = folder / table.file
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise SpinemetsError(f"{path}: the paper's Table {number} not found") from None
    columns = [table.key, *PAPER_METRIC]
    if list(frame.columns) != columns:
        raise SpinemetsError(f"{path}: columns {list(frame.columns)}, expected {columns}")
    classes = list(VERTEBRAE if table.stage == "vertebrae" else LESION_TYPES)
    if sorted(frame[table.key]) != sorted(classes):
        raise SpinemetsError(f"{path}: classes {list(frame[table.key])}, expected each of {classes} once")
    values = frame[list(PAPER_METRIC)].apply(pd.to_numeric, errors="coerce")
    if values.isna().any().any() or not ((values >= 0) & (values <= 1)).all().all():
        raise SpinemetsError(f"{path}: every value must be a number between 0 and 1")
    return frame.set_index(table.key).reindex(classes).reset_index()


#: Our metric (in ``summary.csv`` of :func:`spinemets.evaluation.evaluate.evaluate_folders`) for each paper metric.
OUR_METRIC = {"dice": "dice", "f2": "fbeta", "pq": "pq"}


def read_summary(folder: str | Path) -> pd.DataFrame | None:
    """A stage's ``summary.csv`` (columns class, metric, aggregate, value, ci_low, ci_high, n, n_nan),
    or None when the folder has none."""
    path = Path(folder) / "summary.csv"
    return pd.read_csv(path) if path.is_file() else None


def compare_with_paper(paper: pd.DataFrame, summaries: Mapping[str, pd.DataFrame | None]) -> pd.DataFrame:
    """The paper's values beside ours, as display strings.

    For a paper value of one class, ours is the mean over cases of the matching metric
    (:data:`OUR_METRIC`; the paper's F2 is compared with our voxel-level F-beta, beta = 2) with its
    bootstrap 95 % interval. For a paper range over all vertebrae, ours is the range of the
    per-vertebra means (vertebrae present in at least one reference) and their mean. Missing runs
    or classes show "–". Rows of single vertebrae are left to :func:`per_vertebra_table`.
    """
    from spinemets.labels import VERTEBRAE

    rows = []
    for rec in paper.to_dict("records"):
        if rec["stage"] == "vertebrae" and rec["class"] in VERTEBRAE:
            continue  # single vertebrae belong to per_vertebra_table (the paper's Table 2)
        summary = summaries.get(rec["stage"])
        ours, n = "–", "–"
        metric = OUR_METRIC.get(rec["metric"], rec["metric"])
        if summary is not None:
            means = summary[(summary["aggregate"] == "mean") & (summary["metric"] == metric)]
            if pd.notna(rec["value"]):
                hit = means[(means["class"] == rec["class"]) & means["value"].notna()]
                if not hit.empty:
                    h = hit.iloc[0]
                    ours, n = f"{h['value']:.2f} ({h['ci_low']:.2f}–{h['ci_high']:.2f})", str(int(h["n"]))
            else:
                per_class = means[(means["class"] != "all") & (means["n"] > 0)].dropna(subset=["value"])
                if not per_class.empty:
                    ours = (f"{per_class['value'].min():.2f}–{per_class['value'].max():.2f} "
                            f"(mean {per_class['value'].mean():.2f})")
                    n = f"{len(per_class)} vertebrae"
        paper_text = f"{rec['value']:.2f}" if pd.notna(rec["value"]) else f"{rec['low']:.2f}–{rec['high']:.2f}"
        rows.append({"stage": rec["stage"], "class": rec["class"], "metric": _METRIC_LABEL.get(rec["metric"], rec["metric"]),
                     "paper": paper_text, "paper configuration": rec["configuration"], "ours": ours, "n": n})
    return pd.DataFrame(rows, columns=["stage", "class", "metric", "paper", "paper configuration", "ours", "n"])


_METRIC_LABEL = {"dice": "Dice", "f2": "F2", "pq": "PQ"}


# ---------------------------------------------------------------------------------------------
# Per vertebra (the paper's Table 2) and per lesion type, paper beside ours
# ---------------------------------------------------------------------------------------------

#: Paper metrics of the per-vertebra and per-lesion-type tables, in column order, with their labels.
TABLE_METRICS: tuple[tuple[str, str], ...] = (("dice", "Dice"), ("f2", "F2"), ("pq", "PQ"))


def _paper_values(paper: pd.DataFrame, stage: str, classes) -> pd.DataFrame:
    """The paper's single values of ``stage`` as a class x paper-metric frame (NaN where the paper
    file has none); rows in the order of ``classes``."""
    rows = paper[(paper["stage"] == stage) & paper["class"].isin(list(classes)) & paper["value"].notna()]
    wide = rows.pivot_table(index="class", columns="metric", values="value", aggfunc="first")
    return wide.reindex(index=list(classes), columns=[m for m, _ in TABLE_METRICS])


def _our_means(per_case: pd.DataFrame | None, classes) -> tuple[pd.DataFrame, pd.Series]:
    """Mean over cases of each paper metric's counterpart (:data:`OUR_METRIC`) per class, skipping
    NaN, and the number of cases with a finite Dice per class (0 where none)."""
    columns = [m for m, _ in TABLE_METRICS]
    if per_case is None or per_case.empty:
        return (pd.DataFrame(float("nan"), index=list(classes), columns=columns),
                pd.Series(0, index=list(classes), dtype=int))
    data = per_case[per_case["class"].isin(list(classes))]
    data = data.assign(value=pd.to_numeric(data["value"], errors="coerce"))
    means = pd.DataFrame(index=list(classes), columns=columns, dtype=float)
    for paper_metric in columns:
        ours = data[data["metric"] == OUR_METRIC[paper_metric]].groupby("class")["value"].mean()
        means[paper_metric] = ours.reindex(list(classes))
    dice = data[data["metric"] == OUR_METRIC["dice"]].dropna(subset=["value"])
    n = dice.groupby("class")["case"].nunique().reindex(list(classes)).fillna(0).astype(int)
    return means, n


def per_vertebra_table(paper: pd.DataFrame, per_case: pd.DataFrame | None) -> pd.DataFrame:
    """The paper's Table 2 beside ours: one row per vertebra, C1 ... Sacrum in label order (25 rows).

    Columns ``paper Dice``, ``paper F2``, ``paper PQ`` (the paper file's single values of stage
    ``vertebrae`` for that vertebra; NaN where it has none), ``ours Dice``, ``ours F2``, ``ours PQ``
    (the mean over cases of our per-vertebra Dice, voxel-level F-beta and PQ of the vertebra stage's
    ``per_case.csv``, NaN values skipped) and ``n`` (cases with a finite Dice for that vertebra). A
    vertebra absent from all our cases has NaN, never 0, and n = 0. Numbers, not strings:
    format them for display.
    """
    from spinemets.labels import VERTEBRAE

    return _side_by_side(pd.DataFrame(index=pd.Index(VERTEBRAE, name="vertebra")), paper, per_case, "vertebrae")


def per_lesion_type_table(paper: pd.DataFrame, per_case: pd.DataFrame | None) -> pd.DataFrame:
    """The metastasis stage per lesion type (lytic, sclerotic), paper beside ours, like
    :func:`per_vertebra_table`: columns ``paper configuration``, ``paper Dice/F2/PQ``, ``ours
    Dice/F2/PQ`` (mean over cases of the metastasis stage's ``per_case.csv``) and ``n``."""
    from spinemets.labels import LESION_TYPES

    rows = paper[(paper["stage"] == "metastases") & paper["class"].isin(LESION_TYPES)]
    configuration = rows.groupby("class")["configuration"].agg(lambda s: ", ".join(sorted(set(s.dropna()))))
    table = pd.DataFrame(index=pd.Index(LESION_TYPES, name="lesion type"))
    table["paper configuration"] = configuration.reindex(LESION_TYPES).fillna("")
    return _side_by_side(table, paper, per_case, "metastases")


def _side_by_side(table: pd.DataFrame, paper: pd.DataFrame, per_case: pd.DataFrame | None, stage: str) -> pd.DataFrame:
    """``table`` (indexed by class) with the paper's and our Dice/F2/PQ columns and ``n`` added."""
    classes = list(table.index)
    paper_values = _paper_values(paper, stage, classes)
    ours, n = _our_means(per_case, classes)
    for source, values in (("paper", paper_values), ("ours", ours)):
        for metric, label in TABLE_METRICS:
            table[f"{source} {label}"] = values[metric].astype(float)
    table["n"] = n
    return table


def paper_has_per_vertebra_values(paper: pd.DataFrame) -> bool:
    """Whether the paper file holds any single per-vertebra value (stage vertebrae, class a vertebra)."""
    from spinemets.labels import VERTEBRAE

    return bool(((paper["stage"] == "vertebrae") & paper["class"].isin(VERTEBRAE) & paper["value"].notna()).any())


def with_intervals(table: pd.DataFrame, summary: pd.DataFrame | None) -> pd.DataFrame:
    """:func:`per_vertebra_table` or :func:`per_lesion_type_table` for display: the paper's values
    with two decimals, ours as "mean (low–high)" with the bootstrap 95 % interval of the stage's
    ``summary.csv`` (its mean-over-cases rows of the class and metric), the mean alone where the
    summary has no interval, "–" where we have no value; other columns as they are."""
    intervals = {}
    if summary is not None:
        means = summary[summary["aggregate"] == "mean"]
        intervals = {(r["class"], r["metric"]): (r["ci_low"], r["ci_high"]) for r in means.to_dict("records")}
    shown = pd.DataFrame(index=table.index)
    for column in table.columns:
        source, _, label = column.partition(" ")
        metric = next((m for m, lab in TABLE_METRICS if lab == label), None)
        if source not in ("paper", "ours") or metric is None:
            shown[column] = table[column]
            continue
        texts = []
        for name, value in table[column].items():
            if pd.isna(value):
                texts.append("–")
                continue
            low, high = intervals.get((name, OUR_METRIC[metric]), (float("nan"), float("nan")))
            texts.append(f"{value:.2f} ({low:.2f}–{high:.2f})" if source == "ours" and pd.notna(low) and pd.notna(high)
                         else f"{value:.2f}")
        shown[column] = texts
    return shown.rename(columns={f"ours {label}": f"ours {label} (95 % CI)" for _, label in TABLE_METRICS})


# ---------------------------------------------------------------------------------------------
# The cohort: the paper's Table 1 beside the cohort of a run
# ---------------------------------------------------------------------------------------------

#: The paper's Table 1 as transcribed (one row per listed patient row), relative to the project root.
PAPER_COHORT = "book/data/paper/table1_cohort.csv"
#: Its columns, and the ``cohort.csv`` column (the synthetic cohort's, :data:`spinemets.cohort.synth.COHORT_COLUMNS`) of each.
PAPER_COHORT_COLUMNS = {"sex": "sex", "age": "age", "metastasis_type": "metastasis_type",
                        "primary_site_as_printed": "primary_site"}
_CHARACTERISTICS = (("sex", "sex"), ("metastasis_type", "type of metastasis"), ("primary_site", "primary site"))
_SEX = {"f": "female", "m": "male"}  # the synthetic cohort writes F and M


def read_paper_cohort(path: str | Path | None = None) -> pd.DataFrame:
    """The paper's Table 1 (``book/data/paper/table1_cohort.csv``): one row per row the paper prints,
    with the columns of a ``cohort.csv`` (sex, age, metastasis_type, primary_site; the site as printed)."""
    path = Path(path) if path is not None else find_project_root() / PAPER_COHORT
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise SpinemetsError(f"{path}: the paper's Table 1 not found") from None
    missing = {"row", *PAPER_COHORT_COLUMNS} - set(frame.columns)
    if missing:
        raise SpinemetsError(f"{path}: missing column(s) {sorted(missing)}")
    return frame[list(PAPER_COHORT_COLUMNS)].rename(columns=PAPER_COHORT_COLUMNS)


def run_cohort(provenance: Mapping | None, root: str | Path | None = None) -> tuple[pd.DataFrame | None, Path | None]:
    """The ``cohort.csv`` of the lesion cases a run used, and its path: the data notebook's
    ``stage_data`` folder of the metastasis stage where given, else its ``data_dir`` (relative
    paths are relative to the project root). (None, path) where that folder has no ``cohort.csv``,
    (None, None) without a run."""
    if not provenance:
        return None, None
    folder = (run_parameter(provenance, "stage_data") or {}).get("metastases") or run_parameter(provenance, "data_dir")
    if folder is None:
        return None, None
    folder = Path(folder) if Path(folder).is_absolute() else find_project_root(root) / folder
    path = folder / "cohort.csv"
    return (pd.read_csv(path) if path.is_file() else None), path


def _counts(cohort: pd.DataFrame, column: str) -> dict[str, tuple[str, str]]:
    """lower-case value -> (the value as first written, "n (%)"), most frequent first, ties by value."""
    if column not in cohort.columns:
        return {}
    text = cohort[column].dropna().astype(str).str.strip()
    if column == "sex":
        text = text.map(lambda v: _SEX.get(v.lower(), v).capitalize())
    keys = text.str.lower()
    counts = sorted(keys.value_counts().items(), key=lambda item: (-item[1], item[0]))
    return {key: (text[keys == key].iloc[0], f"{n} ({100 * n / len(cohort):.0f} %)") for key, n in counts}


def _age(cohort: pd.DataFrame) -> str:
    age = pd.to_numeric(cohort.get("age", pd.Series(dtype=float)), errors="coerce").dropna()
    if age.empty:
        return "–"
    return f"{age.mean():.1f} ± {age.std():.1f} ({age.min():g}–{age.max():g})"


def cohort_beside_paper(paper: pd.DataFrame, cohort: pd.DataFrame | None, synthetic: bool) -> pd.DataFrame:
    """The paper's Table 1 summarised (cases; sex, type of metastasis and primary site as n (%);
    age as mean ± SD (range)) beside the same summary of a run's ``cohort.csv``: one row per
    characteristic and value, columns ``paper`` and ``this run``. Values are compared
    case-insensitively (``F``/``M`` read as female/male). For a ``synthetic`` cohort only the
    number of cases and the types of metastasis are shown: its sex, age and site are drawn, not
    observed. "–" where a cohort has no such value, or no cohort.
    """
    rows = [("cases", "", str(len(paper)), str(len(cohort)) if cohort is not None else "–"),
            ("age (years)", "mean ± SD (range)", _age(paper), _age(cohort) if cohort is not None and not synthetic else "–")]
    for column, label in _CHARACTERISTICS:
        ours = _counts(cohort, column) if cohort is not None and (column == "metastasis_type" or not synthetic) else {}
        theirs = _counts(paper, column)
        for key in [*theirs, *(k for k in ours if k not in theirs)]:
            shown = (theirs.get(key) or ours[key])[0]
            rows.append((label, shown, theirs.get(key, ("", "–"))[1], ours.get(key, ("", "–"))[1]))
    table = pd.DataFrame(rows, columns=["characteristic", "value", "paper", "this run"])
    return table.set_index(["characteristic", "value"])


# ---------------------------------------------------------------------------------------------
# Lesion detection: our FROC beside published operating points
# ---------------------------------------------------------------------------------------------

PUBLISHED_FROC = "book/data/published_froc.csv"
#: The detection tables of the lesion stage (:mod:`spinemets.evaluation.detection`) a run's evaluation holds.
DETECTION_TABLES = {"froc": "froc.csv", "froc_summary": "froc_summary.csv", "bands": "lesion_bands.csv",
                    "patients": "patients.csv"}


def read_published_froc(path: str | Path | None = None) -> pd.DataFrame:
    """Published operating points of bone-metastasis detection on CT (``book/data/published_froc.csv``):
    one row per study with its bibliography ``key``, ``label``, ``sensitivity`` (a fraction),
    ``fp_per_case``, ``cohort``, ``definition`` and ``doi``."""
    path = Path(path) if path is not None else find_project_root() / PUBLISHED_FROC
    try:
        frame = pd.read_csv(path)
    except FileNotFoundError:
        raise SpinemetsError(f"{path}: published FROC points file not found") from None
    missing = {"key", "label", "sensitivity", "fp_per_case", "cohort", "definition", "doi"} - set(frame.columns)
    if missing:
        raise SpinemetsError(f"{path}: missing column(s) {sorted(missing)}")
    bad = frame[~frame["sensitivity"].between(0, 1) | ~(frame["fp_per_case"] >= 0)]
    if not bad.empty:
        raise SpinemetsError(f"{path}: sensitivity must be a fraction in [0, 1] and fp_per_case >= 0 "
                             f"(rows of {', '.join(bad['label'].astype(str))})")
    return frame


def run_detection(provenance: Mapping | None, root: str | Path | None = None) -> dict[str, pd.DataFrame] | None:
    """The lesion stage's detection tables of a run (keys of :data:`DETECTION_TABLES`), or None
    when the run's evaluation has none (a run evaluated before they existed, or no run)."""
    workspace = run_workspace(provenance, root)
    if workspace is None:
        return None
    folder = workspace_of(workspace).evaluation("metastases")
    if not all((folder / name).is_file() for name in DETECTION_TABLES.values()):
        return None
    return {key: pd.read_csv(folder / name) for key, name in DETECTION_TABLES.items()}


def froc_beside_published(froc: pd.DataFrame | None, published: pd.DataFrame, cls: str = "any") -> pd.DataFrame:
    """Each published operating point beside our sensitivity at the same false positives per case.

    Ours is the sensitivity of class ``cls`` ("any": type ignored) at the lowest threshold of our
    FROC (``froc.csv``) whose false positives per case stay within the published rate
    (:func:`spinemets.evaluation.detection.sensitivity_at`); NaN without our curve. Columns: study,
    ``FP per case``, ``published sensitivity``, ``ours``, ``our threshold``, cohort, definition.
    """
    import numpy as np

    from spinemets.evaluation.detection import Froc, sensitivity_at, threshold_for

    rows = []
    curve = None
    if froc is not None:
        mine = froc[froc["class"] == cls]
        if not mine.empty:
            n_ref, n_cases = int(mine["n_reference"].iloc[0]), int(mine["n_cases"].iloc[0])
            curve = Froc(mine["threshold"].to_numpy(float), mine["tp"].to_numpy(np.int64),
                         mine["fp"].to_numpy(np.int64), n_ref, n_cases)
    for rec in published.to_dict("records"):
        rate = float(rec["fp_per_case"])
        ours = float(sensitivity_at(curve, [rate])[0]) if curve is not None else float("nan")
        threshold = threshold_for(curve, rate) if curve is not None else float("nan")
        rows.append({"study": rec["label"], "FP per case": rate, "published sensitivity": float(rec["sensitivity"]),
                     "ours": ours, "our threshold": threshold, "cohort": rec["cohort"],
                     "definition": rec["definition"]})
    return pd.DataFrame(rows, columns=["study", "FP per case", "published sensitivity", "ours", "our threshold",
                                       "cohort", "definition"])
