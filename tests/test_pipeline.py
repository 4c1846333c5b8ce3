"""The whole product end to end: the ci profile of the same notebooks the demo runs, then the book.

Every notebook executes with papermill (synthetic cohort -> import -> both trainings ->
two-stage inference -> evaluation -> external check) in a copy of the project, and the book is
built from the executed notebooks with ``-n -W --keep-going``: the session fixture ``ci_run``
(tests/conftest.py), which the other tests that need trained models or a built book share.
"""

import json
import re

import nbformat
import pytest

from spinemets.report import results

from spinemets.run import runner

import browser
from conftest import require_niivue_cache
from test_viewer import _chromium_or_skip

#: The executed copies: one per notebook, and one per stage of the training notebook.
STEPS = ["01_dataset", "02_slicer", "03_training_vertebrae", "03_training_metastases", "04_inference", "05_metrics",
         "06_external"]


@pytest.mark.slow
def test_ci_profile_runs_every_notebook_and_builds_the_book(ci_run):
    tmp_path = ci_run  # the session's one ci run (tests/conftest.py)
    require_niivue_cache()
    out = tmp_path / runner.DEFAULT_OUT_DIR
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
    # clean pages: nnU-Net's messages and progress bars are in log files, at most in a collapsed block
    noise = re.compile(r"Searching for class|Inspecting module|only supported for cuda devices|"
                       r"Fingerprint extraction|\d+%\|[^|]*\|\s*\d+/\d+|Using device:|"
                       r"#{5,} *\n|Epoch \d+|train_loss")
    for page_file in sorted(html.rglob("*.html")):
        text = re.sub(r"<details class=\"spinemets-log\">.*?</details>", "", page_file.read_text(), flags=re.S)
        found = noise.search(text)
        assert found is None, f"{page_file.relative_to(html)} shows a tool log: {text[found.start() - 80:found.end() + 80]!r}"
    training = (html / "build" / "executed" / "03_training_vertebrae.html").read_text()
    assert '<details class="spinemets-log">' in training and "Training done." in training
    logs = tmp_path / "workspace" / "ci" / "logs"
    assert (logs / "nnUNetv2_plan_and_preprocess.log").read_text().startswith("$ ")
    assert (logs / "nnUNetPredictor.log").exists()
    # the 3-D viewer of the inference page, vendored into the book, draws offline in headless Chromium
    inference_page = html / "build" / "executed" / "04_inference.html"
    assert (html / "_static" / "niivue" / "niivue.umd.js").is_file()
    assert inference_page.read_text().count('class="niivue-viewer"') >= 1
    exe = _chromium_or_skip()
    found = browser.check_viewer(inference_page, executable=exe, timeout=180)
    assert found["console_errors"] == [] and found["messages"] == [], found
    assert found["viewers"] >= 1 and found["nonblank"] and found["differs"], found
    lesions = (tmp_path / "workspace" / "ci" / "predictions" / "lesions.csv").read_text().splitlines()
    assert lesions[0].startswith("case_id")
