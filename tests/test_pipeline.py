"""The whole product end to end: the ci profile of the same notebooks the demo runs, then the book.

Every notebook executes with papermill (synthetic cohort -> import -> both trainings ->
two-stage inference -> evaluation) in a copy of the project, and the book is built from the
executed notebooks with ``-n -W --keep-going``. Minutes on two cores.
"""

import json
import re
import shutil

import nbformat
import pytest

from spinemets import results, runner

from conftest import REPO

#: The executed copies: one per notebook, and one per stage of the training notebook.
STEPS = ["01_dataset", "02_slicer", "03_training_vertebrae", "03_training_metastases", "04_inference", "05_metrics",
         "06_external"]


@pytest.mark.slow
def test_ci_profile_runs_every_notebook_and_builds_the_book(tmp_path):
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy(REPO / name, tmp_path / name)
    for folder in ("book", "notebooks", "profiles"):
        shutil.copytree(REPO / folder, tmp_path / folder)
    out = runner.run("ci", root=tmp_path)
    provenance = json.loads((out / "provenance.json").read_text())
    assert [n["status"] for n in provenance["notebooks"]] == ["ok"] * len(STEPS)
    for step in STEPS:
        executed = nbformat.read(out / f"{step}.ipynb", as_version=4)
        code = [c for c in executed.cells if c.cell_type == "code"]
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in code)
        assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    html = tmp_path / "_build" / "html"
    page = (html / "book" / "results.html").read_text()
    assert "<strong>ci</strong> profile" in page and "synthetic cohort on a CPU" in page
    assert "<table" in page and "lytic" in page
    ours = results.compare_with_paper(results.read_paper_results(tmp_path / "book/data/paper_results.csv"),
                                      results.run_summaries(provenance, tmp_path))
    shown = [value for value in ours["ours"] if value != "–"]
    assert shown, "the run's own numbers are in the comparison"
    for value in shown:  # this run's numbers, not the paper's, are on the page
        assert value in page, value
    assert re.findall(r"<img [^>]*src=\"\.\./_images/", page), "the results page shows figures"
    for step in ("03_training_vertebrae", "03_training_metastases", "04_inference", "05_metrics", "06_external"):
        page = (html / "build" / "executed" / f"{step}.html").read_text()
        assert re.findall(r"<img ", page), f"{step} shows its figures"
    lesions = (tmp_path / "workspace" / "ci" / "predictions" / "lesions.csv").read_text().splitlines()
    assert lesions[0].startswith("case_id")
