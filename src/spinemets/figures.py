"""Figures of the training and inference chapters (matplotlib; every function returns the figure).

* :func:`training_curves`: the analogue of the paper's Figures 1-2 from nnU-Net's checkpoint
  logging (``torch.load(checkpoint)["logging"]``: per epoch ``train_losses``, ``val_losses``,
  ``mean_fg_dice`` (pseudo-Dice of the validation patches, mean over foreground labels),
  ``ema_fg_dice`` (its exponential moving average, ``ema = 0.9 ema + 0.1 dice``), ``lrs``, and
  epoch start/end timestamps).
* :func:`prediction_overlays`: one row per predicted case: CT slices with the vertebra and lesion
  labels drawn over them, coloured from :mod:`spinemets.labels`.
* :func:`render_3d`: maximum-label projections (coronal and sagittal) of the predicted label maps,
  a static stand-in for a 3-D view.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from . import labels as labels_mod
from .errors import SpinemetsError
from .nnunet import CHECKPOINTS

#: The CT display window of every figure (HU): bone and soft tissue both readable.
CT_WINDOW = {"cmap": "gray", "vmin": -250, "vmax": 1250}


def read_logging(fold_folder: str | Path) -> dict:
    """nnU-Net's per-epoch logging of one fold folder (final checkpoint, else latest, else best).

    Returns the ``logging`` dict with lists of equal length (one entry per finished epoch) plus
    ``epoch_seconds`` (end minus start timestamp) and ``checkpoint`` (the file read).
    """
    import torch

    folder = Path(fold_folder)
    for name in CHECKPOINTS:
        path = folder / name
        if path.exists():
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
            break
    else:
        raise SpinemetsError(f"{folder}: no nnU-Net checkpoint ({', '.join(CHECKPOINTS)})")
    logging = {k: list(v) for k, v in checkpoint["logging"].items()}
    n = min(len(v) for k, v in logging.items() if k in ("train_losses", "val_losses", "mean_fg_dice"))
    logging = {k: v[:n] for k, v in logging.items()}
    starts, ends = logging.get("epoch_start_timestamps", []), logging.get("epoch_end_timestamps", [])
    logging["epoch_seconds"] = [float(e - s) for s, e in zip(starts, ends)]
    logging["checkpoint"] = str(path)
    return logging


def _fold_folders(stage: str, workspace, profile: str | None) -> list[Path]:
    from . import nnunet

    ws = workspace if isinstance(workspace, nnunet.Workspace) else nnunet.Workspace(workspace or nnunet.DEFAULT_WORKSPACE)
    base = ws.results / ws.dataset_name(stage)
    if profile is not None:
        entry = nnunet.stage_plan(stage, profile)
        models = [ws.model_folder(stage, c, entry["trainer"]) for c in entry["configurations"]]
    else:
        models = sorted(p for p in base.glob("*__*__*") if p.is_dir())
    folds = [f for m in models for f in sorted(m.glob("fold_*")) if any((f / c).exists() for c in CHECKPOINTS)]
    if not folds:
        raise SpinemetsError(f"{base}: no trained {stage} model with a checkpoint; train the stage first")
    return folds


def training_curves(stage: str = "vertebrae", workspace=None, profile: str | None = None,
                    folders: Sequence[str | Path] | None = None):
    """Loss and pseudo-Dice per epoch for every trained configuration and fold of a stage.

    Left: training and validation loss (nnU-Net's Dice + cross-entropy, lower is better; it is
    negative because nnU-Net adds the negative soft Dice). Right: pseudo-Dice of the validation
    patches and its moving average. ``folders`` (fold folders) overrides the search of the
    workspace's results; ``profile`` limits the search to that profile's trainer and configurations.
    """
    import matplotlib.pyplot as plt

    folds = [Path(f) for f in folders] if folders else _fold_folders(stage, workspace, profile)
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for i, folder in enumerate(folds):
        log = read_logging(folder)
        epochs = np.arange(1, len(log["train_losses"]) + 1)
        name = f"{folder.parent.name.split('__')[-1]} {folder.name}"
        c = colours(i % 10)
        ax_loss.plot(epochs, log["train_losses"], color=c, label=f"{name} train")
        ax_loss.plot(epochs, log["val_losses"], color=c, ls="--", label=f"{name} validation")
        ax_dice.plot(epochs, log["mean_fg_dice"], color=c, alpha=0.45, label=f"{name} pseudo-Dice")
        ax_dice.plot(epochs, log["ema_fg_dice"], color=c, lw=2, label=f"{name} moving average")
    ax_loss.set(xlabel="epoch", ylabel="loss (Dice + CE)", title=f"{stage}: loss")
    ax_dice.set(xlabel="epoch", ylabel="pseudo-Dice (validation patches)", ylim=(0, 1), title=f"{stage}: pseudo-Dice")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _label_rgba(array: np.ndarray, stage: str, alpha: float = 0.55) -> np.ndarray:
    names = labels_mod.label_names(stage)
    lut = np.zeros((max(names) + 1, 4))
    for value, name in names.items():
        if value:
            lut[value] = (*labels_mod.colour(stage, name), alpha)
    return lut[np.clip(array, 0, max(names))]


def label_colormap(stage: str, alpha: float = 0.55):
    """A matplotlib colour map of a stage's labels (background transparent), for ``imshow`` with
    ``vmin=0, vmax=<largest label>`` and ``interpolation="nearest"``; colours of :mod:`spinemets.labels`."""
    from matplotlib.colors import ListedColormap

    names = labels_mod.label_names(stage)
    return ListedColormap(_label_rgba(np.arange(max(names) + 1), stage, alpha))


def _read(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _case_image(images: Path | Sequence[Path] | None, case: str) -> Path | None:
    if images is None:
        return None
    for folder in [images] if isinstance(images, Path) else images:
        for name in (f"{case}_0000.nii.gz", f"{case}.nii.gz", f"{case}.nrrd", f"{case}/ct.nrrd"):
            if (Path(folder) / name).exists():
                return Path(folder) / name
    return None


def prediction_overlays(predictions: str | Path, images: str | Path | None = None, cases: Sequence[str] | None = None,
                        max_cases: int = 4):
    """Per case: a mid-sagittal and a mid-coronal CT slice with predicted vertebrae and lesions over them.

    ``predictions`` is the output folder of :func:`spinemets.inference.predict`; ``images`` the
    folder of the CTs (``CASE_0000.nii.gz``, ``CASE.nrrd`` or ``CASE/ct.nrrd``), or a list of such
    folders; without it the
    label maps are drawn alone. Slices are taken through the centre of the predicted spine.
    """
    import matplotlib.pyplot as plt

    predictions = Path(predictions)
    images = ([Path(i) for i in images] if isinstance(images, (list, tuple)) else Path(images)) if images else None
    cases = list(cases) if cases else sorted(p.name for p in predictions.iterdir() if (p / "vertebrae.nii.gz").exists())
    cases = cases[:max_cases]
    if not cases:
        raise SpinemetsError(f"{predictions}: no predicted cases (CASE/vertebrae.nii.gz)")
    fig, axes = plt.subplots(len(cases), 2, figsize=(6, 4.5 * len(cases)), squeeze=False, constrained_layout=True)
    for row, case in enumerate(cases):
        vert = _read(predictions / case / "vertebrae.nii.gz")
        les = _read(predictions / case / "metastases.nii.gz")
        ct_path = _case_image(images, case)
        ct = _read(ct_path) if ct_path else np.zeros_like(vert, dtype=float)
        where = np.argwhere(vert > 0)
        cz, cy, cx = (where.mean(axis=0).astype(int) if len(where) else np.array(vert.shape) // 2)
        for col, (index, title) in enumerate((((slice(None), slice(None), cx), "sagittal"),
                                              ((slice(None), cy, slice(None)), "coronal"))):
            ax = axes[row, col]
            ax.imshow(ct[index], origin="lower", aspect="auto", **CT_WINDOW)
            ax.imshow(_label_rgba(vert[index], "vertebrae", 0.35), origin="lower", aspect="auto")
            ax.imshow(_label_rgba(les[index], "metastases", 0.9), origin="lower", aspect="auto")
            ax.set_title(f"{case}: {title}", fontsize=9)
            ax.axis("off")
    return fig


def render_3d(predictions: str | Path, cases: Sequence[str] | None = None, max_cases: int = 4):
    """Coronal and sagittal maximum-label projections of the predicted vertebrae with the lesions on top."""
    import matplotlib.pyplot as plt

    predictions = Path(predictions)
    cases = list(cases) if cases else sorted(p.name for p in predictions.iterdir() if (p / "vertebrae.nii.gz").exists())
    cases = cases[:max_cases]
    if not cases:
        raise SpinemetsError(f"{predictions}: no predicted cases (CASE/vertebrae.nii.gz)")
    fig, axes = plt.subplots(1, 2 * len(cases), figsize=(2.6 * len(cases), 5), squeeze=False, constrained_layout=True)
    for i, case in enumerate(cases):
        vert = _read(predictions / case / "vertebrae.nii.gz")
        les = _read(predictions / case / "metastases.nii.gz")
        for j, axis in enumerate((1, 2)):
            ax = axes[0, 2 * i + j]
            ax.imshow(_label_rgba(vert.max(axis=axis), "vertebrae", 0.9), origin="lower", aspect="auto")
            ax.imshow(_label_rgba(les.max(axis=axis), "metastases", 1.0), origin="lower", aspect="auto")
            ax.set_title(f"{case} {'coronal' if axis == 1 else 'sagittal'}", fontsize=8)
            ax.axis("off")
    return fig
