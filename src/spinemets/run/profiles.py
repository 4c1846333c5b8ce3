"""Run profiles: which notebooks the batch runner executes, with which papermill parameters.

A profile is a YAML file. ``load_profile("demo")`` reads ``profiles/demo.yaml`` of the project
(the folder holding ``_toc.yml`` and ``profiles/``, see :func:`find_project_root`);
``load_profile("path/to/mine.yaml")`` reads that file. The file looks like this::

    description: Synthetic cohort on a CPU ...
    cohort: synthetic            # synthetic | real: what the numbers of the book come from
    parameters:                  # shared: given to every notebook that declares them
      data_dir: data/synthetic
      workspace: workspace/demo
      device: cpu
    notebooks:                   # executed in this order
      - path: notebooks/01_dataset.ipynb
        parameters: {cases: 24}  # this notebook only; must be declared by it
      - path: notebooks/03_training.ipynb
        parameters: {stage: vertebrae}  # a notebook run once per stage: 03_training_vertebrae

Relative paths, of notebooks and in parameters, are relative to the project root, which is also
the working directory the notebooks run in.

A run profile and a training profile are one concept with one lookup: the run profile's
``profile`` parameter names its entry in :data:`spinemets.training.profiles.PROFILES` (what is trained,
the inference clean-up, the job resources per step kind); an unknown name is an error here,
when the YAML file is loaded, not hours later.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from spinemets.errors import SpinemetsError
from spinemets.fileio import require_file
from spinemets.errors import one_line

PROFILE_DIR = "profiles"
COHORTS = ("synthetic", "real")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_KEYS = {"description", "cohort", "parameters", "notebooks"}


@dataclass(frozen=True)
class NotebookStep:
    """One notebook of a profile: its path (as written in the profile) and its own parameters."""

    path: str
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return Path(self.path).stem

    @property
    def name(self) -> str:
        """The step's name, and its executed copy's: the notebook's stem, with the stage where the
        step gives one (one notebook run once per stage: ``03_training_vertebrae``)."""
        stage = self.parameters.get("stage")
        return f"{self.stem}_{stage}" if stage else self.stem


@dataclass(frozen=True)
class Profile:
    """A loaded profile. ``source`` is the YAML file it came from."""

    name: str
    source: Path
    description: str
    cohort: str
    parameters: dict[str, Any]
    notebooks: tuple[NotebookStep, ...]


def find_project_root(start: str | Path | None = None) -> Path:
    """The project root: the first of ``start`` (default: the working directory) and its parents
    that holds both ``_toc.yml`` and ``profiles/``; failing that, the source checkout this package
    was installed from (editable installs). Raises :class:`SpinemetsError` when neither exists.
    """
    here = Path(start or Path.cwd()).resolve()
    candidates = [here, *here.parents, Path(__file__).resolve().parents[3]]
    for folder in candidates:
        if (folder / "_toc.yml").is_file() and (folder / PROFILE_DIR).is_dir():
            return folder
    raise SpinemetsError(
        f"no project root found from {here}: expected a folder with _toc.yml and {PROFILE_DIR}/ "
        "(run from a clone of the spinemets repository)"
    )


def available_profiles(root: str | Path | None = None) -> list[str]:
    """Names of the profiles in the project's ``profiles/`` folder."""
    folder = find_project_root(root) / PROFILE_DIR
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_profile(name_or_path: str | Path, root: str | Path | None = None) -> Profile:
    """Load a profile by name (``profiles/<name>.yaml`` of the project root) or from a YAML path.

    A value that names an existing file, or ends in ``.yaml``/``.yml``, is a path; anything else
    is a name. Unknown names, unreadable files and malformed profiles raise
    :class:`SpinemetsError` naming the file and what is wrong.
    """
    text = str(name_or_path)
    if Path(text).is_file() or text.endswith((".yaml", ".yml")) or "/" in text:
        path = require_file(Path(text), "profile file")
    else:
        if not _NAME.match(text):
            raise SpinemetsError(f"{text!r} is neither a profile name nor a path to a profile YAML file")
        path = find_project_root(root) / PROFILE_DIR / f"{text}.yaml"
        if not path.is_file():
            known = ", ".join(available_profiles(root)) or "none"
            raise SpinemetsError(f"{path}: unknown profile {text!r}; available profiles: {known}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpinemetsError(f"{path}: profile is not valid YAML ({one_line(exc)})") from None
    return _parse(data, path)


def _parse(data: Any, path: Path) -> Profile:
    if not isinstance(data, dict):
        raise SpinemetsError(f"{path}: a profile must be a mapping with the keys {sorted(_KEYS)}")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise SpinemetsError(f"{path}: unknown profile key(s) {unknown}; known keys: {sorted(_KEYS)}")
    cohort = data.get("cohort")
    if cohort not in COHORTS:
        raise SpinemetsError(f"{path}: 'cohort' must be one of {list(COHORTS)}, not {cohort!r}")
    shared = _mapping(data.get("parameters"), path, "parameters")
    entries = data.get("notebooks")
    if not isinstance(entries, list) or not entries:
        raise SpinemetsError(f"{path}: 'notebooks' must be a non-empty list of {{path, parameters}} entries")
    steps = []
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise SpinemetsError(f"{path}: notebook entry {i + 1} must have a 'path'")
        extra = sorted(set(entry) - {"path", "parameters"})
        if extra:
            raise SpinemetsError(f"{path}: notebook entry {entry['path']!r} has unknown key(s) {extra}")
        steps.append(NotebookStep(entry["path"], _mapping(entry.get("parameters"), path, entry["path"])))
    from spinemets.training.profiles import PROFILES as TRAINING_PROFILES  # the one registry of training profiles

    for where, params in [("parameters", shared), *((step.path, step.parameters) for step in steps)]:
        name = params.get("profile")
        if name is not None and name not in TRAINING_PROFILES:
            raise SpinemetsError(f"{path}: {where}: unknown training profile {name!r}; "
                                 f"choose one of {', '.join(TRAINING_PROFILES)}")
    names = [s.name for s in steps]
    duplicated = sorted({s for s in names if names.count(s) > 1})
    if duplicated:
        raise SpinemetsError(f"{path}: notebook(s) listed twice: {duplicated} (a notebook run twice needs a "
                             "different 'stage' parameter each time)")
    return Profile(name=path.stem, source=path.resolve(), description=str(data.get("description", "")).strip(),
                   cohort=cohort, parameters=shared, notebooks=tuple(steps))


def _mapping(value: Any, path: Path, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise SpinemetsError(f"{path}: parameters of {what} must be a mapping of names to values")
    return dict(value)


def notebook_parameters(
    profile: Profile, step: NotebookStep, declared: set[str], overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The papermill parameters of one notebook: shared profile parameters, then the step's own,
    then ``overrides``, each kept only when the notebook declares it (``declared``, the names in
    its ``parameters`` cell). A step parameter the notebook does not declare is an error (a typo
    in the profile would otherwise be ignored silently).
    """
    undeclared = sorted(set(step.parameters) - declared)
    if undeclared:
        raise SpinemetsError(
            f"{profile.source}: parameter(s) {undeclared} given for {step.path}, which declares only "
            f"{sorted(declared)} in its 'parameters' cell"
        )
    merged = {**profile.parameters, **step.parameters, **dict(overrides or {})}
    return {name: value for name, value in merged.items() if name in declared}
