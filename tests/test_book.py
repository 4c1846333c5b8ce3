"""The notebooks' shape, the book's configuration and references, and a real book build."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import yaml

import bookpages
from spinemets import labels
from spinemets.evaluation import evaluate
from spinemets.report import results
from spinemets.run import runner
from spinemets.paths import Workspace

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
STEPS = ["01_dataset", "02_slicer", "03_training", "04_inference", "05_metrics", "06_external"]
COMMON_PARAMETERS = {"data_dir", "workspace", "profile", "device", "seed", "interactive"}


def _headings(nb) -> list[str]:
    found = []
    for cell in nb.cells:
        if cell.cell_type != "markdown":
            continue
        in_fence = False
        for line in cell.source.splitlines():
            if line.startswith("```"):
                in_fence = not in_fence
            elif not in_fence and re.match(r"^#{1,6} ", line):
                found.append(line.strip())
    return found


def test_every_step_has_its_notebook():
    assert [p.stem for p in NOTEBOOKS] == STEPS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_has_one_parameters_cell_and_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1 and tagged[0].cell_type == "code"
    declared = set(runner.declared_parameters(path))
    assert COMMON_PARAMETERS <= declared, f"missing {COMMON_PARAMETERS - declared}"
    assert re.search(r"^interactive = False\b", tagged[0].source, re.M)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, "commit notebooks without outputs"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_follows_the_cookbook_structure(path):
    nb = nbformat.read(path, as_version=4)
    heads = _headings(nb)
    assert heads[0].startswith("# ") and sum(h.startswith("# ") for h in heads) == 1, "one title"
    h2 = [h[3:] for h in heads if h.startswith("## ")]
    assert h2[:3] == ["Overview", "Prerequisites", "Imports"]
    assert h2[-2:] == ["Summary", "Resources and references"]
    assert len(h2) >= 7, "content sections between Imports and Summary"
    assert "### What's next?" in heads and heads.index("### What's next?") > heads.index("## Summary")
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Time to learn" in text
    # the Imports section is a code cell with imports only, right after its heading
    imports_at = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "## Imports" in c.source)
    imports = nb.cells[imports_at + 1]
    assert imports.cell_type == "code"
    assert all(line.startswith(("import ", "from ")) or not line.strip() for line in imports.source.splitlines())
    # every Overview item names a section of the notebook
    overview = next(c.source for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Overview"))
    for item in re.findall(r"^\d+\. \*\*(.+?)\*\*", overview, re.M):
        assert f"## {item}" in heads, f"Overview item {item!r} has no section"
    # a label the chapters can reference wherever the notebook lies (committed or executed copy)
    assert re.match(r"^\(nb-[a-z-]+\)=\n# ", nb.cells[0].source)


def _toc_files(node) -> list[str]:
    if isinstance(node, dict):
        own = [node[k] for k in ("root", "file") if k in node]
        return own + [f for v in node.values() for f in _toc_files(v)]
    if isinstance(node, list):
        return [f for v in node for f in _toc_files(v)]
    return []


def test_toc_lists_every_chapter_and_notebook():
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = _toc_files(toc)
    for step in STEPS:
        assert f"notebooks/{step}" in files
    for chapter in ["intro", "dataset", "methods", "metrics", "results", "reproducing", "cluster", "references"]:
        assert f"book/{chapter}" in files
    for name in files:
        assert any((REPO / f"{name}{suffix}").exists() for suffix in (".md", ".ipynb")), f"{name} missing"


def test_config_turns_notebook_execution_off_and_fails_on_errors():
    config = yaml.safe_load((REPO / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["sphinx"]["config"]["nb_execution_raise_on_error"] is True
    assert config["bibtex_bibfiles"] == ["book/references.bib"]
    assert config["only_build_toc_files"] is True
    assert not config["launch_buttons"].get("binderhub_url") and not config["launch_buttons"].get("thebe")
    page = (REPO / "book" / "results.md").read_text()
    assert "execution_mode: force" in page.split("---")[1], "the results page computes at build time"


def _bib_keys() -> set[str]:
    return set(re.findall(r"^@\w+\{([^,]+),", (REPO / "book" / "references.bib").read_text(), re.M))


def test_bibliography_has_the_works_the_book_builds_on():
    keys = _bib_keys()
    assert {"edelmers2024", "isensee2021nnunet", "maierhein2024metricsreloaded", "sekuboyina2021verse",
            "fedorov2012slicer", "foucart2023", "kirillov2019panoptic", "fisher2010sins",
            "wasserthal2023totalsegmentator"} <= keys
    bib = (REPO / "book" / "references.bib").read_text()
    assert "10.3390/diagnostics14212458" in bib and "10.20944/preprints202409.0633.v1" in bib


def test_every_citation_is_in_the_bibliography():
    texts = [p.read_text() for p in (REPO / "book").glob("*.md")]
    texts += [c.source for p in NOTEBOOKS for c in nbformat.read(p, as_version=4).cells]
    cited = {k.strip() for t in texts for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", t)
             for k in group.split(",")}
    assert cited, "the book cites its sources"
    assert cited <= _bib_keys(), f"unknown keys: {cited - _bib_keys()}"


def test_paper_results_are_cited_values():
    paper = results.read_paper_results(REPO / "book" / "data" / "paper_results.csv")
    assert paper["source"].str.contains("Edelmers et al. 2024").all()
    values = pd.concat([paper["value"], paper["low"], paper["high"]]).dropna()
    assert ((values > 0) & (values <= 1)).all()
    lytic = paper[(paper["class"] == "lytic")].set_index("metric")["value"]
    assert lytic.to_dict() == {"dice": 0.71, "f2": 0.68, "pq": 0.45}
    assert set(paper["metric"]) <= set(results.OUR_METRIC)


# ---------------------------------------------------------------------------------------------
# A real build: the repository's book, with a run whose evaluation tables the metrics module wrote
# ---------------------------------------------------------------------------------------------


def _write_labels(folder: Path, case: str, array: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((1.0, 1.0, 2.0))
    sitk.WriteImage(image, str(folder / f"{case}.nii.gz"))


def _fake_evaluated_run(root: Path) -> Path:
    """Reference and predicted label maps of three tiny cases, scored by spinemets.evaluation.metrics."""
    rng = np.random.default_rng(0)
    workspace = root / "workspace" / "test"
    vert_ids = labels.foreground_labels("vertebrae")
    for i in range(3):
        case = f"case{i}"
        vert = np.zeros((30, 12, 12), np.uint8)
        for j, name in enumerate(["T12", "L1", "L2"]):
            vert[j * 10 + 1: j * 10 + 9, 3:9, 3:9] = vert_ids[name]
        pred = vert.copy()
        pred[rng.integers(0, 30), :, :] = 0
        _write_labels(workspace / "ref" / "vertebrae", case, vert)
        _write_labels(workspace / "pred" / "vertebrae", case, pred)
        met = np.zeros((30, 12, 12), np.uint8)
        met[3:6, 4:7, 4:7] = 1
        met[20:22, 5:7, 5:7] = 2
        pmet = np.roll(met, i, axis=1)
        _write_labels(workspace / "ref" / "metastases", case, met)
        _write_labels(workspace / "pred" / "metastases", case, pmet)
    for stage in ("vertebrae", "metastases"):
        evaluate.evaluate_folders(workspace / "ref" / stage, workspace / "pred" / stage, stage,
                                 Workspace(workspace).evaluation(stage))
    cohort = root / "data" / "synthetic-test"
    cohort.mkdir(parents=True)
    (cohort / "cohort.csv").write_text("case_id,sex,age,metastasis_type,primary_site\ncase0,F,61,lytic,breast\n"
                                       "case1,M,70,mixed,prostate\ncase2,F,55,lytic,lung\n")
    out = root / "build" / "executed"
    out.mkdir(parents=True)
    (out / "provenance.json").write_text(json.dumps({
        "command": "spinemets run --profile demo", "status": "ok", "finished": "2026-01-01T00:00:00+00:00",
        "profile": {"name": "demo", "file": "profiles/demo.yaml", "cohort": "synthetic"},
        "notebooks": [{"notebook": "notebooks/01_dataset.ipynb",
                       "parameters": {"data_dir": "data/synthetic-test", "workspace": "workspace/test"}, "status": "ok"},
                      {"notebook": "notebooks/05_metrics.ipynb",
                       "parameters": {"workspace": "workspace/test", "device": "cpu"}, "status": "ok"}],
    }))
    return out


def test_book_builds_with_results_table_and_figures(tmp_path):
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("book", "notebooks", "profiles"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    out = _fake_evaluated_run(tmp_path)
    index = runner.build_run_book(tmp_path)  # `make book`; -n -W --keep-going: any warning fails the build
    assert index == tmp_path / "_build" / "html" / "index.html" and index.exists()
    record = json.loads((out / "provenance.json").read_text())
    assert record["status"] == "ok" and record["book"] == "_build/html/index.html" and record["book_built"]
    html = tmp_path / "_build" / "html"
    page = (html / "book" / "results.html").read_text()
    assert "<strong>demo</strong> profile" in page
    assert "synthetic cohort on a CPU" in page
    assert "<table" in page and "0.87–0.96" in page
    ours = results.compare_with_paper(results.read_paper_results(tmp_path / "book/data/paper_results.csv"),
                                      results.run_summaries(json.loads((out / "provenance.json").read_text()),
                                                            tmp_path))
    shown = [value for value in ours["ours"] if value != "–"]
    assert len(shown) >= 5, "our run's numbers are in the table"
    for value in shown:  # our numbers, not the paper's, are what the page must show
        assert value in page, value
    assert len(re.findall(r"<img [^>]*src=\"\.\./_images/", page)) == 4, \
        "per-vertebra Dice, the FROC beside published points and two box-plot figures"
    assert "Zhang et al. 2025" in page and "0.617" in page and "not a like-for-like comparison" in page
    assert "auc_froc_8fp" in page and "patient_sensitivity" in page  # this run's detection tables
    assert "Per vertebra (the paper" in page and page.count("<tr") > 25  # the 25-row per-vertebra table
    per_vertebra = _check_per_vertebra_table(html / "book" / "results.html")
    for name in ("T12", "L1", "L2"):  # the fake run's vertebrae: our mean with its bootstrap interval
        assert re.fullmatch(r"\d\.\d\d \(\d\.\d\d–\d\.\d\d\)", per_vertebra[name]["ours Dice (95 % CI)"]), name
        assert per_vertebra[name]["n"] == "3"
    assert per_vertebra["C1"]["ours Dice (95 % CI)"] == "–" and per_vertebra["C1"]["n"] == "0"
    assert "not yet" not in page, "the paper's tables are transcribed"
    lesions = {row[""]: row for row in bookpages.table_with_caption(html / "book" / "results.html", "Per lesion type")}
    assert [lesions[t]["paper Dice"] for t in ("lytic", "sclerotic")] == ["0.71", "0.61"]
    cohort = _check_cohort_table(html / "book" / "dataset.html")
    assert cohort["Lytic"]["this run"] == "2 (67 %)" and cohort["mixed"]["this run"] == "1 (33 %)"
    assert cohort["Female"]["this run"] == "–", "a synthetic cohort's drawn sex is not set beside the paper's"
    title, opening = bookpages.title_and_opening(html / "notebooks" / "03_training.html")
    assert title == "Training a stage" and "once per stage" in opening  # the committed notebook: both stages
    for page in ["intro", "dataset", "methods", "reproducing", "references"]:
        assert (html / "book" / f"{page}.html").exists()
    for step in STEPS:
        assert (html / "notebooks" / f"{step}.html").exists()
    references = (html / "book" / "references.html").read_text()
    assert "Diagnostics" in references and "Panoptic quality should be avoided" in references


def _check_per_vertebra_table(page: Path) -> dict[str, dict[str, str]]:
    """The results page's per-vertebra table: the paper's Dice, F2 and PQ of all 25 vertebrae as
    its Table 2 prints them (book/data/paper/table2_vertebrae.csv); its rows by vertebra."""
    rows = {row[""]: row for row in bookpages.table_with_caption(page, "Per vertebra")}
    assert list(rows) == list(labels.VERTEBRAE)
    table2 = pd.read_csv(REPO / "book" / "data" / "paper" / "table2_vertebrae.csv", dtype=str).set_index("vertebra")
    for name, printed in table2.iterrows():
        shown = [rows[name][f"paper {label}"] for label in ("Dice", "F2", "PQ")]
        assert shown == [printed["dice"], printed["fbeta"], printed["pq"]], name
    return rows


def _check_cohort_table(page: Path) -> dict[str, dict[str, str]]:
    """The data chapter's summary of the paper's Table 1 (38 rows, 19 lytic and 19 sclerotic, as
    its README says); its rows by value."""
    rows = {row[""]: row for row in bookpages.table_with_caption(page, "The paper's Table 1")}
    assert rows[""]["paper"] == "38"  # cases
    assert rows["Lytic"]["paper"] == rows["Sclerotic"]["paper"] == "19 (50 %)"
    assert rows["Breast"]["paper"] == "15 (39 %)"
    return rows


@pytest.mark.slow
def test_ci_book_shows_the_papers_tables_and_titles_each_page_for_its_stage(ci_run):
    """The ci run's book (conftest's ci_run): the paper's 25 per-vertebra values beside ours on the
    results page, Table 1's summary beside the run's cohort, and every page titled for itself: a
    notebook run once per stage has a page per stage whose title and first paragraph name that
    stage (and whose title does not name the other), and no two pages share a title."""
    html = ci_run / "_build" / "html"
    rows = _check_per_vertebra_table(html / "book" / "results.html")
    assert any(row["ours Dice (95 % CI)"] != "–" for row in rows.values()), "the run's own numbers are shown"
    page = (html / "book" / "results.html").read_text()
    # two box plots, the per-vertebra figure with the paper's values, the FROC beside the published points
    assert len(re.findall(r"<img [^>]*src=\"\.\./_images/", page)) == 4
    cohort = _check_cohort_table(html / "book" / "dataset.html")
    assert cohort[""]["this run"] not in ("", "–")  # the ci cohort's cases
    record = json.loads((ci_run / "build" / "executed" / "provenance.json").read_text())
    words = {"vertebrae": "vertebra", "metastases": "metasta"}
    staged = {entry["step"]: entry["parameters"]["stage"] for entry in record["notebooks"]
              if "stage" in entry["parameters"]}
    assert sorted(staged.values()) == sorted(words), "a notebook runs once per stage"
    for step, stage in staged.items():
        title, opening = bookpages.title_and_opening(html / "build" / "executed" / f"{step}.html")
        other = next(word for name, word in words.items() if name != stage)
        assert words[stage] in title.lower() and other not in title.lower(), (step, title)
        assert words[stage] in opening.lower(), (step, opening)
    titles = {}
    for path in sorted(html.rglob("*.html")):
        if path.relative_to(html).as_posix() in ("index.html", "genindex.html", "search.html") \
                or "_static" in path.parts:  # index.html: a redirect to the root page
            continue
        titles.setdefault(bookpages.title_and_opening(path)[0], []).append(path.relative_to(html).as_posix())
    assert all(len(pages) == 1 for pages in titles.values()), {t: p for t, p in titles.items() if len(p) > 1}
