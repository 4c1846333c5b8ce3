"""Every path of a run, in one place: the workspace layout (:class:`Workspace`).

nnU-Net reads three folders from environment variables (``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``) and finds trainers outside its package through
``nnUNet_extTrainer``. :class:`Workspace` derives them from one root folder
(``root/raw``, ``root/preprocessed``, ``root/results``); a variable the user has already set
wins. The variables are handed to the nnU-Net commands the project starts
(:meth:`Workspace.environment`) or set for the duration of a ``with`` block
(:meth:`Workspace.activated`) and restored afterwards; nothing is written to ``os.environ``
otherwise. ``nnUNet_extTrainer`` lists :data:`TRAINER_DIR` (the project's trainers) before any
folders the user listed. Paths are read when used; nothing happens at import.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from spinemets import labels as labels_mod

#: The project's nnU-Net trainers, found by nnU-Net through ``nnUNet_extTrainer``.
TRAINER_DIR = Path(__file__).resolve().parent / "training" / "trainers"
DEFAULT_WORKSPACE = Path("workspace")
PLANS = "nnUNetPlans"



_FOLDER_VARS = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "preprocessed", "nnUNet_results": "results"}


@dataclass(frozen=True)
class Workspace:
    """Every path of a run, under one root: the one place the workspace layout is written down.

    ========================  ============================================================
    ``raw``                   nnU-Net's raw datasets (``<root>/raw``, or ``nnUNet_raw``)
    ``preprocessed``          nnU-Net's preprocessed data (``<root>/preprocessed``)
    ``results``               trained models and their selection (``<root>/results``)
    ``manifest``              the cohort's manifest (``<root>/manifest.csv``, ``spinemets scan``)
    ``predictions``           what ``spinemets predict`` writes (``<root>/predictions/CASE/...``)
    ``evaluation(stage)``     what ``spinemets evaluate`` writes (``<root>/evaluation/<stage>``)
    ``test_images(stage)``    the held-out CTs of a stage's raw dataset (``imagesTs``)
    ``test_labels(stage)``    their reference label maps (``labelsTs``)
    ========================  ============================================================

    For the three nnU-Net folders, the environment variables ``nnUNet_raw``,
    ``nnUNet_preprocessed`` and ``nnUNet_results``, where the user set them, take precedence.
    The executed notebooks of a run go to the run folder of :func:`spinemets.run.runner.run`.
    """

    root: Path = DEFAULT_WORKSPACE

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root).resolve())

    def _folder(self, var: str) -> Path:
        value = os.environ.get(var)
        return Path(value).resolve() if value else self.root / _FOLDER_VARS[var]

    @property
    def raw(self) -> Path:
        return self._folder("nnUNet_raw")

    @property
    def preprocessed(self) -> Path:
        return self._folder("nnUNet_preprocessed")

    @property
    def results(self) -> Path:
        return self._folder("nnUNet_results")

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.csv"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    @property
    def logs(self) -> Path:
        """The output of nnU-Net's programs when it goes to files (:data:`spinemets.training.programs.TOOL_OUTPUT_ENV`)."""
        return self.root / "logs"

    def evaluation(self, stage: str) -> Path:
        labels_mod.check_stage(stage)
        return self.root / "evaluation" / stage

    def test_images(self, stage: str) -> Path:
        return self.raw / self.dataset_name(stage) / "imagesTs"

    def test_labels(self, stage: str) -> Path:
        return self.raw / self.dataset_name(stage) / "labelsTs"

    def held_out_cases(self, stage: str) -> list[str]:
        """The case IDs of a stage's held-out CTs (``imagesTs``), sorted; [] without any."""
        folder = self.test_images(stage)
        return sorted(p.name[: -len("_0000.nii.gz")] for p in folder.glob("*_0000.nii.gz")) if folder.is_dir() else []

    def held_out_images(self) -> list[Path]:
        """The folders of the held-out CTs to predict: the vertebra dataset's ``imagesTs``, and the
        metastasis dataset's too when it holds other cases (the stages' data come from different
        datasets, e.g. vertebrae from TotalSegmentator's and lesions from the Zenodo release)."""
        folders = [self.test_images("vertebrae")]
        if self.held_out_cases("metastases") and self.held_out_cases("metastases") != self.held_out_cases("vertebrae"):
            folders.append(self.test_images("metastases"))
        return folders

    def variables(self, extra_trainer_dirs: Sequence[str | Path] = ()) -> dict[str, str]:
        """The nnU-Net variables only: the three folders and ``nnUNet_extTrainer``."""
        trainer_dirs = [str(TRAINER_DIR), *map(str, extra_trainer_dirs)]
        user = os.environ.get("nnUNet_extTrainer")
        if user:
            trainer_dirs += [p for p in user.split(os.pathsep) if p and p not in trainer_dirs]
        return {
            "nnUNet_raw": str(self.raw),
            "nnUNet_preprocessed": str(self.preprocessed),
            "nnUNet_results": str(self.results),
            "nnUNet_extTrainer": os.pathsep.join(trainer_dirs),
        }

    def environment(self, extra_trainer_dirs: Sequence[str | Path] = (), **overrides: str) -> dict[str, str]:
        """A full environment for a child process: the current one plus :meth:`variables` and ``overrides``."""
        env = dict(os.environ)
        env.update(self.variables(extra_trainer_dirs))
        env.update({k: str(v) for k, v in overrides.items()})
        return env

    @contextlib.contextmanager
    def activated(self, extra_trainer_dirs: Sequence[str | Path] = ()) -> Iterator["Workspace"]:
        """Set the nnU-Net variables in ``os.environ`` for the ``with`` block; restore them afterwards."""
        new = self.variables(extra_trainer_dirs)
        old = {k: os.environ.get(k) for k in new}
        os.environ.update(new)
        try:
            yield self
        finally:
            for key, value in old.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def dataset_name(self, stage: str, dataset_id: int | None = None) -> str:
        """``DatasetNNN_Name`` of a stage (default id from :data:`spinemets.labels.STAGES`)."""
        info = labels_mod.STAGES[stage] if stage in labels_mod.STAGES else labels_mod.labels(stage)
        dataset_id = info["dataset_id"] if dataset_id is None else int(dataset_id)
        return f"Dataset{dataset_id:03d}_{info['dataset_name']}"

    def plans_file(self, stage: str, dataset_id: int | None = None, plans: str = PLANS) -> Path:
        return self.preprocessed / self.dataset_name(stage, dataset_id) / f"{plans}.json"

    def model_folder(self, stage: str, configuration: str, trainer: str, dataset_id: int | None = None,
                     plans: str = PLANS) -> Path:
        """nnU-Net's training output folder ``results/DatasetNNN/TRAINER__PLANS__CONFIGURATION``."""
        return self.results / self.dataset_name(stage, dataset_id) / f"{trainer}__{plans}__{configuration}"


def workspace_of(workspace: Workspace | str | Path | None) -> Workspace:
    """The :class:`Workspace` of ``workspace``: itself, or the workspace rooted at a path (default
    :data:`DEFAULT_WORKSPACE`). The one coercion every function that takes "a workspace or its folder" uses."""
    if isinstance(workspace, Workspace):
        return workspace
    return Workspace(DEFAULT_WORKSPACE if workspace is None else Path(workspace))


#: File name of the detection map beside a predicted label map (``CASE/metastases.nii.gz``).
CONFIDENCE_NAME = "metastases_confidence.nii.gz"


#: File name of the vertebra map beside a predicted label map.
VERTEBRAE_NAME = "vertebrae.nii.gz"
