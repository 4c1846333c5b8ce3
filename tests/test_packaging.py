"""The repository's promises: the same dependencies for pip and conda, and the README's two commands."""

import re
import subprocess
import sys
import tomllib

import yaml

from conftest import REPO


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
    assert re.search(r"^make install-test$", ci, re.M) and "exec unshare -n sh -c 'ip link set lo up && exec make test'" in ci
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)


def test_console_script_answers():
    out = subprocess.run([sys.executable, "-m", "spinemets.cli", "--help"], capture_output=True, text=True, check=True)
    for command in ("synth", "scan", "import", "evaluate", "train", "predict", "run", "fetch", "convert", "jobs"):
        assert command in out.stdout
