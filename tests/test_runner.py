"""The batch runner and its profiles: throwaway notebooks in a temporary project, executed for real."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from spinemets import cli

from spinemets.run import runner
from spinemets.errors import SpinemetsError
from spinemets.run.profiles import find_project_root, load_profile, notebook_parameters

REPO = Path(__file__).resolve().parents[1]


def _notebook(path: Path, parameters: str | None, body: str) -> Path:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells.append(new_markdown_cell("# A throwaway notebook"))
    if parameters is not None:
        cell = new_code_cell(parameters)
        cell.metadata["tags"] = ["parameters"]
        nb.cells.append(cell)
    nb.cells.append(new_code_cell(body))
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A tiny project: _toc.yml, profiles/tiny.yaml and two notebooks that pass a value along."""
    (tmp_path / "profiles").mkdir()
    (tmp_path / "_toc.yml").write_text(
        "format: jb-book\nroot: intro\nchapters:\n  - file: notebooks/a_write\n  - file: notebooks/b_read\n"
    )
    _notebook(tmp_path / "notebooks" / "a_write.ipynb", 'x = 1\nout = "result.txt"\nunused = 0',
              "from pathlib import Path\nPath(out).write_text(str(x * 2))\nprint('wrote', x * 2)")
    _notebook(tmp_path / "notebooks" / "b_read.ipynb", 'out = "result.txt"',
              "from pathlib import Path\nvalue = int(Path(out).read_text())\nassert value > 0\nprint('read', value)")
    profile = {
        "description": "two throwaway notebooks",
        "cohort": "synthetic",
        "parameters": {"out": "shared.txt", "device": "cpu"},
        "notebooks": [{"path": "notebooks/a_write.ipynb", "parameters": {"x": 3}}, "notebooks/b_read.ipynb"],
    }
    (tmp_path / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(profile))
    return tmp_path


def _outputs(path: Path) -> str:
    nb = nbformat.read(path, as_version=4)
    return "\n".join(str(o.get("text", "")) + str(o.get("evalue", "")) for c in nb.cells for o in c.get("outputs", []))


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["demo", "ci", "paper"])
def test_repository_profiles_load_and_match_their_notebooks(name):
    profile = load_profile(name, REPO)
    assert profile.name == name and profile.source == REPO / "profiles" / f"{name}.yaml"
    assert profile.notebooks, "a profile lists notebooks"
    for step in profile.notebooks:
        declared = runner.declared_parameters(REPO / step.path)
        # raises when the profile gives a notebook a parameter it does not declare
        params = notebook_parameters(profile, step, declared)
        assert params["profile"] == name
    assert profile.cohort == ("real" if name == "paper" else "synthetic")


def test_paper_profile_is_the_paper_protocol():
    profile = load_profile("paper", REPO)
    assert profile.parameters["device"] == "cuda"
    assert profile.parameters["configurations"] == ["2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres"]
    assert profile.parameters["folds"] == [0, 1, 2, 3, 4]
    demo = load_profile("demo", REPO)
    assert demo.parameters["device"] == "cpu"


def test_load_profile_by_path_and_errors(project, tmp_path):
    by_path = load_profile(project / "profiles" / "tiny.yaml")
    assert by_path.name == "tiny" and [s.stem for s in by_path.notebooks] == ["a_write", "b_read"]
    assert load_profile("tiny", project).notebooks == by_path.notebooks
    with pytest.raises(SpinemetsError, match=r"unknown profile 'nope'.*available profiles: tiny"):
        load_profile("nope", project)
    bad = tmp_path / "bad.yaml"
    bad.write_text("cohort: synthetic\nnotebooks: [a.ipynb]\nextra: 1\n")
    with pytest.raises(SpinemetsError, match=r"bad.yaml: unknown profile key\(s\) \['extra'\]"):
        load_profile(bad)
    bad.write_text("cohort: imaginary\nnotebooks: [a.ipynb]\n")
    with pytest.raises(SpinemetsError, match="'cohort' must be one of"):
        load_profile(bad)
    bad.write_text("cohort: real\nnotebooks: [\n")
    with pytest.raises(SpinemetsError, match="not valid YAML"):
        load_profile(bad)
    with pytest.raises(SpinemetsError, match="profile file not found"):
        load_profile(tmp_path / "missing.yaml")


def test_find_project_root_walks_up(project):
    assert find_project_root(project / "notebooks") == project.resolve()


@pytest.mark.parametrize("text, value", [
    ("8", 8), ("0.5", 0.5), ("[0, 1]", [0, 1]), ("true", True), ("False", False), ("yes", "yes"),
    ("data/zenodo", "data/zenodo"), ("null", None), ("", ""), ("3d_fullres", "3d_fullres"),
])
def test_parse_value_reads_yaml(text, value):
    assert runner.parse_value(text) == value


def test_parse_value_passes_non_strings():
    assert runner.parse_value([1, 2]) == [1, 2]


# ---------------------------------------------------------------------------------------------
# Running notebooks
# ---------------------------------------------------------------------------------------------


def test_run_executes_notebooks_in_order_with_parameters(project):
    out = runner.run("tiny", parameters={"x": "5"}, build_book=False, root=project)
    assert out == (project / "build" / "executed").resolve()
    a, b = out / "a_write.ipynb", out / "b_read.ipynb"
    # the override (5) beats the step parameter (3); the shared "out" reaches both notebooks
    assert (project / "shared.txt").read_text() == "10"
    assert "wrote 10" in _outputs(a) and "read 10" in _outputs(b)
    tags = [c.metadata.get("tags", []) for c in nbformat.read(a, as_version=4).cells]
    assert ["injected-parameters"] in tags
    record = json.loads((out / "provenance.json").read_text())
    assert record["status"] == "executed" and record["profile"]["name"] == "tiny"
    assert record["profile"]["cohort"] == "synthetic"
    assert [n["status"] for n in record["notebooks"]] == ["ok", "ok"]
    assert record["notebooks"][0]["parameters"] == {"x": 5, "out": "shared.txt"}
    assert record["notebooks"][1]["parameters"] == {"out": "shared.txt"}
    assert record["overrides"] == {"x": 5}
    assert {"python", "spinemets", "nnunetv2", "torch"} <= set(record["versions"])
    # the source notebooks are untouched: no outputs
    assert not _outputs(project / "notebooks" / "a_write.ipynb")


def test_run_selects_notebooks_by_name(project):
    out = runner.run("tiny", notebooks=["a_write"], build_book=False, root=project)
    assert sorted(p.name for p in out.glob("*.ipynb")) == ["a_write.ipynb"]
    with pytest.raises(SpinemetsError, match="is not in profile 'tiny'"):
        runner.run("tiny", notebooks=["zz"], build_book=False, root=project)


def test_failing_notebook_stops_the_run_and_keeps_its_executed_copy(project):
    _notebook(project / "notebooks" / "b_read.ipynb", 'out = "result.txt"',
              "raise ValueError('boom: the reference folder is empty')")
    _notebook(project / "notebooks" / "c_never.ipynb", "y = 0", "print('should not run')")
    with pytest.raises(SpinemetsError, match=r"b_read.ipynb: cell \d+ failed with ValueError: boom"):
        runner.run("tiny", notebooks=["a_write", "b_read", "notebooks/c_never.ipynb"], build_book=False,
                   root=project)
    out = project / "build" / "executed"
    assert "boom: the reference folder is empty" in _outputs(out / "b_read.ipynb")
    assert not (out / "c_never.ipynb").exists()
    record = json.loads((out / "provenance.json").read_text())
    assert record["status"] == "failed"
    assert [n["status"] for n in record["notebooks"]] == ["ok", "failed", "pending"]
    assert "boom" in record["notebooks"][1]["error"]


def test_cli_run_exits_non_zero_on_a_failing_notebook(project, monkeypatch, capsys):
    _notebook(project / "notebooks" / "a_write.ipynb", "x = 1\nout = 'r.txt'", "1 / 0")
    monkeypatch.chdir(project)
    assert cli.main(["run", "--profile", "tiny"]) == 2
    assert "ZeroDivisionError" in capsys.readouterr().err
    assert (project / "build" / "executed" / "a_write.ipynb").exists()


def test_undeclared_override_and_missing_parameters_cell_are_errors(project):
    with pytest.raises(SpinemetsError, match=r"\['nope'\] are not declared by any notebook"):
        runner.run("tiny", parameters={"nope": "1"}, build_book=False, root=project)
    assert not (project / "build" / "executed" / "a_write.ipynb").exists(), "nothing ran"
    _notebook(project / "notebooks" / "b_read.ipynb", None, "print(1)")
    with pytest.raises(SpinemetsError, match="b_read.ipynb: no cell tagged 'parameters'"):
        runner.run("tiny", build_book=False, root=project)


def test_undeclared_step_parameter_is_an_error(project):
    text = (project / "profiles" / "tiny.yaml").read_text().replace("x: 3", "typo: 3")
    (project / "profiles" / "tiny.yaml").write_text(text)
    with pytest.raises(SpinemetsError, match=r"parameter\(s\) \['typo'\] given for notebooks/a_write.ipynb"):
        runner.run("tiny", build_book=False, root=project)


def test_rerun_clears_executed_notebooks_of_the_previous_run(project):
    out = runner.run("tiny", build_book=False, root=project)
    keep = out / "notes.txt"
    keep.write_text("mine")
    runner.run("tiny", notebooks=["b_read"], build_book=False, root=project)
    assert sorted(p.name for p in out.glob("*.ipynb")) == ["b_read.ipynb"]
    assert keep.read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Book plumbing and the results page helpers
# ---------------------------------------------------------------------------------------------


def test_run_toc_points_at_executed_copies(project):
    out = project / "build" / "executed"
    out.mkdir(parents=True)
    nbformat.write(nbformat.read(project / "notebooks" / "a_write.ipynb", as_version=4), out / "a_write.ipynb")
    toc = yaml.safe_load(runner.run_toc(project.resolve(), out).read_text())
    assert toc["chapters"] == [{"file": "build/executed/a_write"}, {"file": "notebooks/b_read"}]
    assert toc["root"] == "intro"
    with pytest.raises(SpinemetsError, match="must lie inside the project root"):
        runner.run_toc(project.resolve(), project.parent / "elsewhere")


def test_run_folder_outside_the_project_is_refused_before_running(project, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    with pytest.raises(SpinemetsError, match="must lie inside the project root"):
        runner.run("tiny", out_dir=elsewhere, root=project)
    assert not list(elsewhere.iterdir())


def test_failed_book_build_is_an_error_recorded_in_the_provenance(project):
    # the tiny project's _toc.yml names a root page that does not exist: -W turns that into a failure
    with pytest.raises(SpinemetsError, match="the book build failed"):
        runner.run("tiny", root=project)
    out = project / "build" / "executed"
    record = json.loads((out / "provenance.json").read_text())
    assert record["status"] == "book build failed" and record["book"] is None
    assert [n["status"] for n in record["notebooks"]] == ["ok", "ok"]
    assert "build/executed/a_write" in (out / "_toc.yml").read_text()


def test_a_notebook_run_once_per_stage_gets_a_copy_per_stage_in_the_book(project):
    """One notebook, two runs (``stage`` per step): two executed copies, both in the table of
    contents in run order, titled by stage; the first keeps the notebook's label, the second gets its own."""
    nb = nbformat.read(project / "notebooks" / "b_read.ipynb", as_version=4)
    nb.cells[0].source = "(nb-read)=\n# Reading a stage"
    nb.cells[1].source = 'stage = "vertebrae"\nout = "result.txt"'
    nbformat.write(nb, project / "notebooks" / "b_read.ipynb")
    profile = yaml.safe_load((project / "profiles" / "tiny.yaml").read_text())
    profile["notebooks"] = [profile["notebooks"][0],
                            {"path": "notebooks/b_read.ipynb", "parameters": {"stage": "vertebrae"}},
                            {"path": "notebooks/b_read.ipynb", "parameters": {"stage": "metastases"}}]
    (project / "profiles" / "staged.yaml").write_text(yaml.safe_dump(profile))
    assert [name for name, _, _ in runner.dry_run("staged", root=project)] == [
        "a_write", "b_read_vertebrae", "b_read_metastases"]
    out = project / "build" / "executed"
    with pytest.raises(SpinemetsError, match="the book build failed"):  # the tiny project has no intro page
        runner.run("staged", root=project)
    first = nbformat.read(out / "b_read_vertebrae.ipynb", as_version=4).cells[0].source
    second = nbformat.read(out / "b_read_metastases.ipynb", as_version=4).cells[0].source
    assert first == "(nb-read)=\n# Reading a stage: vertebrae"
    assert second == "(nb-read-metastases)=\n# Reading a stage: metastases"
    toc = yaml.safe_load((out / "_toc.yml").read_text())
    assert toc["chapters"] == [{"file": "build/executed/a_write"}, {"file": "build/executed/b_read_vertebrae"},
                               {"file": "build/executed/b_read_metastases"}]
    record = json.loads((out / "provenance.json").read_text())
    assert [n["step"] for n in record["notebooks"]] == ["a_write", "b_read_vertebrae", "b_read_metastases"]
    assert record["notebooks"][2]["parameters"]["stage"] == "metastases"
    profile["notebooks"][2]["parameters"]["stage"] = "vertebrae"
    (project / "profiles" / "twice.yaml").write_text(yaml.safe_dump(profile))
    with pytest.raises(SpinemetsError, match=r"notebook\(s\) listed twice: \['b_read_vertebrae'\]"):
        load_profile("twice", project)


# ---------------------------------------------------------------------------------------------
# A notebook run once per stage: each copy titled and opened for its stage
# ---------------------------------------------------------------------------------------------

#: A word that names each stage in a title or a paragraph.
STAGE_WORDS = {"vertebrae": "vertebra", "metastases": "metasta"}


def _title_and_opening(nb) -> tuple[str, str]:
    """The page title (first ``# `` line) and the first paragraph below it, as the book shows them."""
    import re

    text = "\n\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    title = re.search(r"^# (.+)$", text, re.M)
    paragraphs = [p for p in re.split(r"\n\s*\n", text[title.end():]) if p.strip()]
    return title.group(1), paragraphs[0]


def test_stage_page_titles_and_opens_a_copy_for_its_own_stage():
    nb = new_notebook(cells=[new_markdown_cell("(nb-fit)=\n# Fitting a stage\n\nOne notebook, both stages."),
                             new_markdown_cell("Stage 1 fits the vertebrae."),
                             new_markdown_cell("Stage 2 fits the metastases."),
                             new_code_cell("x = 1"),
                             new_markdown_cell("## Later\n\nMore on metastases.")],
                      metadata={"spinemets": {"stage_titles": {"vertebrae": "Fitting the vertebra stage",
                                                               "metastases": "Fitting the metastasis stage"}}})
    nb.cells[1].metadata["tags"] = ["stage-vertebrae"]
    nb.cells[2].metadata["tags"] = ["stage-metastases"]
    nb.cells[4].metadata["tags"] = ["stage-metastases"]
    first = runner.stage_page(nbformat.from_dict(json.loads(json.dumps(nb))), "vertebrae", first=True)
    second = runner.stage_page(nbformat.from_dict(json.loads(json.dumps(nb))), "metastases", first=False)
    assert first.cells[0].source == "(nb-fit)=\n# Fitting the vertebra stage\n\nStage 1 fits the vertebrae."
    assert second.cells[0].source == "(nb-fit-metastases)=\n# Fitting the metastasis stage\n\nStage 2 fits the metastases."
    assert [c.source for c in first.cells[1:]] == ["x = 1"]  # the other stage's cells are gone
    assert [c.source for c in second.cells[1:]] == ["x = 1", "## Later\n\nMore on metastases."]
    # without titles or stage cells: the notebook's title with the stage, its opening kept
    plain = new_notebook(cells=[new_markdown_cell("(nb-fit)=\n# Fitting\n\nBoth stages.")])
    assert runner.stage_page(plain, "metastases", first=False).cells[0].source == (
        "(nb-fit-metastases)=\n# Fitting: metastases\n\nBoth stages.")


def test_every_notebook_run_once_per_stage_has_a_title_and_opening_for_each_stage():
    """The repository's profiles run 03_training once per stage: each copy's title and first
    paragraph name its own stage, and its title not the other's."""
    per_stage = {}
    for name in ("demo", "ci", "smoke", "paper"):
        for step in load_profile(name, REPO).notebooks:
            if "stage" in step.parameters:
                per_stage.setdefault(REPO / step.path, set()).add(step.parameters["stage"])
    assert per_stage, "a notebook runs once per stage"
    for path, stages in per_stage.items():
        nb = nbformat.read(path, as_version=4)
        assert set(nb.metadata["spinemets"]["stage_titles"]) == stages == set(STAGE_WORDS), path.name
        for stage in stages:
            title, opening = _title_and_opening(runner.stage_page(nbformat.read(path, as_version=4), stage))
            other = STAGE_WORDS[next(s for s in STAGE_WORDS if s != stage)]
            assert STAGE_WORDS[stage] in title.lower() and other not in title.lower(), (path.name, stage, title)
            assert STAGE_WORDS[stage] in opening.lower(), (path.name, stage, opening)


def test_book_of_a_run_needs_a_run_whose_notebooks_all_executed(tmp_path):
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: intro\n")
    (tmp_path / "profiles").mkdir()
    out = tmp_path / "build" / "executed"
    with pytest.raises(SpinemetsError, match="no run here"):
        runner.build_run_book(tmp_path)
    out.mkdir(parents=True)
    for status in ("running", "failed"):
        (out / "provenance.json").write_text(json.dumps({"status": status, "notebooks": []}))
        with pytest.raises(SpinemetsError, match=f"has not executed all its notebooks \\(status: {status}\\)"):
            runner.build_run_book(tmp_path)
    # an executed run's book: tests/test_book.py::test_book_builds_with_results_table_and_figures
