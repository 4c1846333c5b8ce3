"""Figures of the training and inference chapters (matplotlib; every function returns the figure).

* :func:`training_curves`: the analogue of the paper's Figures 1-2 from nnU-Net's checkpoint
  logging (``torch.load(checkpoint)["logging"]``: per epoch ``train_losses``, ``val_losses``,
  ``mean_fg_dice`` (pseudo-Dice of the validation patches, mean over foreground labels),
  ``ema_fg_dice`` (its exponential moving average, ``ema = 0.9 ema + 0.1 dice``), ``lrs``, and
  epoch start/end timestamps).
* :func:`prediction_overlays`: one row per predicted case: CT slices with the vertebra and lesion
  labels drawn over them, coloured from :mod:`spinemets.labels`.
* :func:`render_3d`: maximum-label projections (coronal and sagittal) of the predicted label maps.
* :func:`render_surfaces`: surface renderings of the vertebrae (coloured by level) and the lesions,
  like the paper's Figures 3-4 (marching cubes, offscreen, deterministic).
* :func:`error_analysis` (with :func:`choose_error_cases`): one case, large, with its missed and false
  lesions and its shifted vertebra labels annotated.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError
from spinemets.training.nnunet import CHECKPOINTS
from spinemets.paths import workspace_of
from spinemets.training.profiles import profile_plans, stage_plan

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
    ws = workspace_of(workspace)
    base = ws.results / ws.dataset_name(stage)
    if profile is not None:
        entry = stage_plan(stage, profile)
        models = [ws.model_folder(stage, c, entry["trainer"], plans=profile_plans(profile))
                  for c in entry["configurations"]]
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


def choose_error_cases(per_case, metric: str = "lesion_fbeta") -> dict[str, str]:
    """The cases for error analysis, chosen from a lesion stage's per-case table (``per_case.csv``:
    ``case, class, metric, value``): ``worst`` and ``median`` by the mean over classes of ``metric``
    (lesion-level F2 by default; cases where it is undefined are left out). Ties go to the first
    case in name order; one case is both where only one is defined; empty when none is."""
    table = per_case[per_case["metric"] == metric].dropna(subset=["value"])
    if table.empty:
        return {}
    score = table.groupby("case")["value"].mean().sort_index(kind="stable")
    ranked = score.sort_values(kind="stable")
    return {"worst": str(ranked.index[0]), "median": str(ranked.index[(len(ranked) - 1) // 2])}


def error_analysis(case: str, predictions: str | Path, reference: Mapping[str, str | Path], image: str | Path | None = None,
                   title: str | None = None):
    """One case, large: where the lesion stage missed (FN), what it found that is not there (FP), and
    which vertebra labels are shifted.

    ``predictions`` is the output folder of :func:`spinemets.inference.predict.predict` (``CASE/vertebrae.nii.gz``,
    ``CASE/metastases.nii.gz``); ``reference`` maps each stage to its reference label map of the case;
    ``image`` is the CT. Left and middle: sagittal and coronal views of the CT (the mean over the
    spine's slab) with the reference lesions outlined (solid) and the predicted ones (dashed); each
    missed lesion is circled and named (class, volume, vertebra), each false one boxed. Right: the
    predicted vertebrae, each reference level named at its centre, in red with its predicted label
    where they differ. Matching is the lesion metrics' (:func:`spinemets.evaluation.metrics.lesion_errors`).
    ``title`` (default: the case) heads the counts in the figure's title. Returns the figure and the table of lesions (a DataFrame) it annotates.
    """
    import matplotlib.pyplot as plt
    import pandas as pd
    import SimpleITK as sitk

    from spinemets.evaluation import metrics

    predictions = Path(predictions)
    pred_v = _read(predictions / case / "vertebrae.nii.gz")
    pred_l = _read(predictions / case / "metastases.nii.gz")
    ref_l = _read(Path(reference["metastases"]))
    ref_v = _read(Path(reference["vertebrae"])) if reference.get("vertebrae") else None
    if ref_l.shape != pred_l.shape or (ref_v is not None and ref_v.shape != pred_v.shape):
        raise SpinemetsError(f"{case}: the reference and predicted label maps differ in shape")
    spacing = tuple(reversed(sitk.ReadImage(str(predictions / case / "metastases.nii.gz")).GetSpacing()))
    ct = _read(Path(image)).astype(np.float32) if image else np.zeros(pred_v.shape, np.float32)
    host = ref_v if ref_v is not None else pred_v
    lesions = pd.DataFrame(metrics.lesion_errors(ref_l, pred_l, spacing, host), columns=metrics.LESION_ERROR_COLUMNS)
    spine = np.argwhere(host > 0)
    lo, hi = (spine.min(axis=0), spine.max(axis=0) + 1) if len(spine) else (np.zeros(3, int), np.array(host.shape))
    views = {"sagittal": 2, "coronal": 1}  # the axis each view averages over
    fig, axes = plt.subplots(1, 3, figsize=(13, 6.5), constrained_layout=True)
    z_aspect = spacing[0] / spacing[1]
    outcome_style = {"FN": ("tab:red", "o", "missed"), "FP": ("orange", "s", "false")}
    for ax, (name, axis) in zip(axes[:2], views.items()):
        keep = [slice(None)] * 3
        keep[axis] = slice(int(lo[axis]), int(hi[axis]))
        slab = tuple(keep)
        ax.imshow(ct[slab].mean(axis=axis), origin="lower", cmap="gray", vmin=-200, vmax=1200,
                  aspect=spacing[0] / spacing[2 if axis == 1 else 1])
        for array, style in ((ref_l, "solid"), (pred_l, "dashed")):
            for value, cls in labels_mod.label_names("metastases").items():
                if value and (array[slab] == value).any():
                    ax.contour((array[slab] == value).any(axis=axis), levels=[0.5], origin="lower",
                               colors=[labels_mod.colour("metastases", cls)], linewidths=1.4, linestyles=style)
        for _, row in lesions[lesions["outcome"] != "TP"].iterrows():
            colour, marker, word = outcome_style[row["outcome"]]
            col = row["y"] if axis == 2 else row["x"]
            ax.plot(col, row["z"], marker=marker, markersize=22, markerfacecolor="none", markeredgecolor=colour,
                    markeredgewidth=2)
            ax.annotate(f"{word} {row['class']} {row['volume_ml']:.2f} mL" + (f" ({row['vertebra']})" if row["vertebra"] else ""),
                        (col, row["z"]), xytext=(14, 10), textcoords="offset points", color=colour, fontsize=8,
                        bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.85, "lw": 0})
        ax.set_title(f"{name}: lesions, reference solid, predicted dashed", fontsize=10)
        ax.axis("off")
    ax = axes[2]
    cx = int((lo[2] + hi[2]) // 2)
    ax.imshow(ct[:, :, cx], origin="lower", cmap="gray", vmin=-200, vmax=1200, aspect=z_aspect)
    ax.imshow(_label_rgba(pred_v.max(axis=2), "vertebrae", 0.6), origin="lower", aspect=z_aspect)
    shifted = 0
    if ref_v is not None:
        centres = metrics.centroids(ref_v, max(labels_mod.label_names("vertebrae")) + 1)
        for row in metrics.vertebra_shifts(ref_v, pred_v):
            level = next(v for v, n in labels_mod.label_names("vertebrae").items() if n == row["reference"])
            z, y = centres[level][0], centres[level][1]
            wrong = row["predicted"] != row["reference"]
            shifted += wrong
            text = f"{row['reference']} → {row['predicted'] or 'missed'}" if wrong else row["reference"]
            ax.annotate(text, (y, z), xytext=(30, 0), textcoords="offset points", fontsize=7, va="center",
                        color="tab:red" if wrong else "white", arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.6},
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "alpha": 0.85, "lw": 0} if wrong else None,
                        fontweight="bold" if wrong else "normal")
    ax.set_title("predicted vertebrae; reference levels" + (f" ({shifted} wrong)" if ref_v is not None else ""),
                 fontsize=10)
    ax.axis("off")
    counts = lesions["outcome"].value_counts()
    fig.suptitle(f"{title or case}: {counts.get('TP', 0)} lesions found, {counts.get('FN', 0)} missed, "
                 f"{counts.get('FP', 0)} false", fontsize=12)
    return fig, lesions


def prediction_overlays(predictions: str | Path, images: str | Path | None = None, cases: Sequence[str] | None = None,
                        max_cases: int = 4):
    """Per case: a mid-sagittal and a mid-coronal CT slice with predicted vertebrae and lesions over them.

    ``predictions`` is the output folder of :func:`spinemets.inference.predict.predict`; ``images`` the
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


def three_planes(ct, vertebrae=None, lesions=None, *, case: str = "", centre=None):
    """Axial, sagittal and coronal slices of a CT, with its label maps over them: the notebooks' first look at a case.

    ``ct``, ``vertebrae`` and ``lesions`` are SimpleITK images on one grid (the label maps optional).
    The slices pass through ``centre`` (z, y, x voxel indices); by default through the axial slice with
    the most lesion voxels (vertebra voxels where there is no lesion) and the middle of that slice's
    label, or through the middle of the volume without labels. Vertebrae are coloured by level, lesions
    by type with a yellow outline; the CT is shown in :data:`CT_WINDOW`, with the voxel spacing's aspect.
    Panel titles are ``CASE: axial`` and so on. Returns the figure.
    """
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    volume = sitk.GetArrayFromImage(ct)
    vert = None if vertebrae is None else sitk.GetArrayFromImage(vertebrae)
    met = None if lesions is None else sitk.GetArrayFromImage(lesions)
    if centre is None:
        target = met if met is not None and met.any() else vert
        if target is None or not target.any():
            centre = tuple(n // 2 for n in volume.shape)
        else:
            z = int(np.argmax((target > 0).sum(axis=(1, 2))))
            y, x = np.round(np.argwhere(target[z] > 0).mean(axis=0)).astype(int)
            centre = (z, int(y), int(x))
    z, y, x = centre
    sx, sy, sz = ct.GetSpacing()
    planes = {"axial": (np.s_[z], sy / sx), "sagittal": (np.s_[::-1, :, x], sz / sy),
              "coronal": (np.s_[::-1, y, :], sz / sx)}
    fig, axes = plt.subplots(1, 3, figsize=(13, 5))
    for ax, (name, (index, aspect)) in zip(axes, planes.items()):
        ax.imshow(volume[index], aspect=aspect, **CT_WINDOW)
        if vert is not None:
            ax.imshow(vert[index], cmap=label_colormap("vertebrae", 0.35), vmin=0, vmax=25, aspect=aspect,
                      interpolation="nearest")
        if met is not None:
            ax.imshow(met[index], cmap=label_colormap("metastases", 0.9), vmin=0, vmax=2, aspect=aspect,
                      interpolation="nearest")
            if (met[index] > 0).any():
                ax.contour(met[index] > 0, levels=[0.5], colors="yellow", linewidths=1.2)
        ax.set_title(f"{case}: {name}" if case else name)
        ax.axis("off")
    fig.tight_layout()
    return fig


def dice_per_vertebra(rows, vertebrae: Sequence[str] | None = None, title: str = "Dice per vertebra"):
    """Each vertebra's per-case Dice as a box with the cases as points, the vertebrae in anatomical order.

    ``rows``: a table with ``vertebra`` and ``dice`` columns (the external check's ``dice.csv``), or the
    vertebra stage's ``per_case.csv`` (its ``dice`` rows: ``class`` the vertebra, ``value`` the Dice).
    ``vertebrae``: the vertebrae on the x axis (default: those of :data:`spinemets.labels.VERTEBRAE`
    with a value). Missing values (NaN) are left out; the points are spread sideways by rank, so the
    figure is deterministic. Returns the figure.
    """
    import matplotlib.pyplot as plt
    import pandas as pd

    frame = pd.DataFrame(rows)
    if "metric" in frame:
        frame = frame[frame["metric"] == "dice"].rename(columns={"class": "vertebra", "value": "dice"})
    frame = frame.dropna(subset=["dice"])
    present = set(frame["vertebra"])
    order = list(vertebrae) if vertebrae is not None else [v for v in labels_mod.VERTEBRAE if v in present]
    groups = [np.sort(frame.loc[frame["vertebra"] == v, "dice"].to_numpy(dtype=float)) for v in order]
    fig, ax = plt.subplots(figsize=(11, 3.8), constrained_layout=True)
    ax.boxplot(groups, positions=range(len(order)), widths=0.6, showfliers=False, medianprops={"color": "black"})
    for i, values in enumerate(groups):
        offsets = np.linspace(-0.2, 0.2, values.size) if values.size > 1 else np.zeros(values.size)
        ax.scatter(i + offsets, values, s=8, color="0.25", zorder=3)
    ax.set_xticks(range(len(order)), order)
    ax.set(title=title, ylabel="Dice", ylim=(-0.02, 1.02), xlim=(-0.6, len(order) - 0.4))
    return fig


def per_vertebra_dice(table, per_case=None, *, paper_range: tuple[float, float] | None = None,
                      title: str = "Dice per vertebra: ours and the paper's"):
    """Per-vertebra Dice, ours against the paper's, on one axis (vertebrae C1 ... Sacrum on x).

    ``table`` is :func:`spinemets.report.results.per_vertebra_table` (its ``paper Dice``, ``ours Dice`` and
    ``n`` columns, one row per vertebra in anatomical order); ``per_case`` (the vertebra stage's
    ``per_case.csv``, optional) adds our per-case Dice as small grey points, spread sideways by
    their rank (no randomness, so the figure is deterministic). Our mean is a black dot, the paper's
    value (its Table 2) a red diamond; a vertebra without a value shows no marker. ``paper_range`` (low, high), the
    range over vertebrae that the paper reports, is drawn as a red band. One x tick per row of ``table``.
    """
    import matplotlib.pyplot as plt

    names = [str(v) for v in table.index]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(9, 3.6), constrained_layout=True)
    if per_case is not None and not per_case.empty:
        dice = per_case[(per_case["metric"] == "dice")].dropna(subset=["value"])
        labelled = False
        for i, name in enumerate(names):
            values = np.sort(dice.loc[dice["class"] == name, "value"].to_numpy(dtype=float))
            if values.size:
                offsets = np.linspace(-0.25, 0.25, values.size) if values.size > 1 else np.zeros(1)
                ax.scatter(i + offsets, values, s=8, color="0.6", zorder=1,
                           label=None if labelled else "ours, per case")
                labelled = True
    if paper_range is not None and all(np.isfinite(paper_range)):
        ax.axhspan(float(paper_range[0]), float(paper_range[1]), color="tab:red", alpha=0.12, zorder=0,
                   label=f"Edelmers et al. 2024: range over vertebrae ({paper_range[0]:.2f}–{paper_range[1]:.2f})")
    ours = table["ours Dice"].to_numpy(dtype=float)
    paper = table["paper Dice"].to_numpy(dtype=float)
    if np.isfinite(ours).any():
        ax.scatter(x[np.isfinite(ours)], ours[np.isfinite(ours)], s=28, color="black", zorder=3,
                   label="ours, mean over cases")
    if np.isfinite(paper).any():
        ax.scatter(x[np.isfinite(paper)], paper[np.isfinite(paper)], s=40, marker="D", facecolor="none", edgecolor="tab:red", linewidth=1.5, zorder=4,
                   label="Edelmers et al. 2024 (Table 2)")
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=90)
    ax.set(xlim=(-0.6, len(names) - 0.4), ylim=(-0.02, 1.02), ylabel="Dice", title=title)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no per-vertebra Dice to show", transform=ax.transAxes, ha="center", va="center")
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


#: Named views of :func:`render_surfaces`: (elevation, azimuth) in degrees of matplotlib's 3-D axes
#: whose x, y, z are the patient's LPS axes (x to the patient's left, y to the back, z to the head).
SURFACE_VIEWS: dict[str, tuple[float, float]] = {
    "anterior": (0.0, -90.0),
    "posterior": (0.0, 90.0),
    "left lateral": (0.0, 0.0),
    "right lateral": (0.0, 180.0),
    "anterior oblique": (15.0, -60.0),
}


def _label_volume(source, spacing=None) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A label map as (array z-y-x in LPS order, spacing x-y-z in mm) from a path, a SimpleITK image,
    an ``(array, spacing)`` pair or a bare array (with ``spacing``, else 1 mm)."""
    import SimpleITK as sitk

    if isinstance(source, (str, Path)):
        source = sitk.ReadImage(str(source))
    if isinstance(source, sitk.Image):
        if source.GetDimension() != 3:
            raise SpinemetsError(f"a 3-D label map is needed, got {source.GetDimension()}-D")
        source = sitk.DICOMOrient(source, "LPS")
        return sitk.GetArrayFromImage(source), tuple(float(s) for s in source.GetSpacing())
    if isinstance(source, tuple) and len(source) == 2 and not np.isscalar(source[1]) and np.ndim(source[0]) == 3:
        source, spacing = source
    array = np.asarray(source)
    if array.ndim != 3:
        raise SpinemetsError(f"a 3-D label map is needed, got an array of shape {array.shape}")
    spacing = (1.0, 1.0, 1.0) if spacing is None else tuple(float(s) for s in spacing)
    if len(spacing) != 3 or min(spacing) <= 0:
        raise SpinemetsError(f"spacing must be three positive numbers (x, y, z in mm), got {spacing}")
    return array, spacing


def _surface(mask: np.ndarray, spacing_zyx: np.ndarray, step: int,
             offset=(0, 0, 0)) -> tuple[np.ndarray, np.ndarray]:
    """Triangles (n, 3, 3) in mm as (x, y, z) and their unit normals, of a boolean mask (cropped to
    itself): marching cubes at 0.5 on the lightly smoothed mask, padded so that it closes. A mask of a
    few voxels is upsampled first, so that even one voxel gives a small closed blob."""
    from scipy import ndimage
    from skimage import measure

    where = np.argwhere(mask)
    lo, hi = where.min(axis=0), where.max(axis=0) + 1
    crop = mask[tuple(slice(a, b) for a, b in zip(lo, hi))]
    spacing = spacing_zyx.astype(float)
    factor = 1
    if crop.sum() < 64:
        factor = 3
        crop = crop.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
        spacing = spacing / factor
        step = 1
    field = ndimage.gaussian_filter(np.pad(crop, 2 * step).astype(np.float32), 0.6 * min(step, 2) if factor == 1
                                    else 1.0)
    if field.max() <= 0.5:  # smoothed away: take the padded mask itself
        field = np.pad(crop, 2 * step).astype(np.float32)
    for attempt in dict.fromkeys((step, 1)):  # a mask thinner than the step has no surface at that step
        try:
            verts, faces, _, _ = measure.marching_cubes(field, 0.5, spacing=tuple(spacing), step_size=attempt,
                                                        allow_degenerate=False)
            break
        except (RuntimeError, ValueError):
            continue
    else:  # no surface at any step (cannot happen for a non-empty padded mask; kept safe)
        return np.zeros((0, 3, 3)), np.zeros((0, 3))
    # back to the full grid, in mm (an upsampled voxel j lies at (j - (factor - 1) / 2) / factor)
    verts = verts + (np.asarray(offset) + lo - (2 * step + (factor - 1) / 2) / factor) * spacing_zyx
    tri = verts[faces][:, :, ::-1]  # (z, y, x) -> (x, y, z)
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(normals, axis=1, keepdims=True)
    keep = length[:, 0] > 0
    return tri[keep], normals[keep] / length[keep]


def _lambert(rgb, normals: np.ndarray, light: np.ndarray, alpha: float,
             ambient: float = 0.35) -> np.ndarray:
    """Face colours (n, 4): the base colour shaded by |n . l| (two-sided) from a fixed light."""
    intensity = ambient + (1 - ambient) * np.abs(normals @ light)
    colours = np.empty((len(normals), 4))
    colours[:, :3] = np.clip(np.asarray(rgb, float)[None, :] * intensity[:, None], 0, 1)
    colours[:, 3] = alpha
    return colours


def _view_light(elev: float, azim: float) -> np.ndarray:
    """A light from the viewer's side, a little above and to the left of the camera."""
    e, a = np.radians(elev + 25.0), np.radians(azim - 30.0)
    light = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
    return light / np.linalg.norm(light)


@dataclass(frozen=True)
class SurfaceStyle:
    """The rendering options of :func:`render_surfaces`: ``views`` (names of :data:`SURFACE_VIEWS` or
    ``(elevation, azimuth)`` pairs, one panel each), ``max_faces`` (triangles of all meshes together),
    ``title``, ``vertebra_alpha`` (opacity of the vertebrae), ``label_every`` (every n-th level named)
    and ``dpi``."""

    views: tuple = ("anterior", "left lateral")
    max_faces: int = 60_000
    title: str | None = None
    vertebra_alpha: float = 0.45
    label_every: int = 4
    dpi: int = 150


def render_surfaces(vertebrae, lesions=None, *, spacing=None, style: SurfaceStyle | None = None):
    """Surface rendering of the vertebrae (coloured by level) and the lesions (lytic, sclerotic) of a case,
    like the paper's Figures 3-4; one panel per view. Offscreen and deterministic: the same inputs give
    the same PNG bytes with the Agg backend and ``savefig(..., metadata={"Software": None})``.

    ``vertebrae`` and ``lesions`` are label maps: a path (NIfTI, NRRD: anything SimpleITK reads), a
    SimpleITK image, an ``(array, spacing)`` pair or a bare array z-y-x (then ``spacing``, x-y-z in mm,
    applies; default 1 mm). Both must lie on the same grid. Vertebra labels 1-25 (C1 ... Sacrum), lesion
    labels 1 lytic, 2 sclerotic; colours of :mod:`spinemets.labels` (those of :func:`label_colormap`).

    Orientation: images are reoriented to LPS, so arrays are z-y-x with x toward the patient's left,
    y toward the back and z toward the head; the 3-D axes show x, y, z in mm. ``views`` are names of
    :data:`SURFACE_VIEWS` or ``(elevation, azimuth)`` pairs: ``"anterior"`` looks at the patient's front
    with the head up and the patient's right on the left of the image (radiological convention),
    ``"left lateral"`` at the patient's left side with the front on the left of the image.

    Each label is meshed by marching cubes (scikit-image) on its lightly smoothed mask, in mm; the
    step size grows until all meshes together have at most ``max_faces`` triangles (every view draws the
    same meshes). A lesion of a few voxels is upsampled before meshing so it is still drawn. Faces are
    shaded (Lambert) from a light beside the camera. Vertebrae are drawn semi-transparent
    (``vertebra_alpha``) and the lesions opaque on top of them, so a lesion inside bone is visible.
    Every ``label_every``-th level (and the top- and bottommost) is named beside the first panel.

    Each mesh is one ``Poly3DCollection`` with ``spinemets_label = (stage, value)`` and
    ``spinemets_colour`` (its unshaded RGB) set on it. The options named here are those of ``style``
    (:class:`SurfaceStyle`).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    style = style or SurfaceStyle()
    views, max_faces, title = style.views, style.max_faces, style.title
    vertebra_alpha, label_every, dpi = style.vertebra_alpha, style.label_every, style.dpi
    vert, vspacing = _label_volume(vertebrae, spacing)
    les, lspacing = (None, None) if lesions is None else _label_volume(lesions, spacing)
    if les is not None and les.shape != vert.shape:
        raise SpinemetsError(f"vertebrae {vert.shape} and lesions {les.shape} are not on the same grid")
    vnames = labels_mod.label_names("vertebrae")
    mnames = labels_mod.label_names("metastases")
    from scipy import ndimage

    masks = []  # (stage, value, mask cropped to its box, spacing z-y-x, offset of the box)
    for stage, array, sp, names in (("vertebrae", vert, vspacing, vnames), ("metastases", les, lspacing, mnames)):
        if array is None:
            continue
        array = np.where((array > 0) & (array <= max(names)), array, 0).astype(np.int32)
        for value, box in enumerate(ndimage.find_objects(array), start=1):
            if box is not None:
                masks.append((stage, value, array[box] == value, np.array(sp[::-1]), [b.start for b in box]))
        if stage == "vertebrae":
            n_vertebrae = len(masks)

    # Step size from the surface voxel count (about two triangles per boundary voxel and step^2).
    boundary = sum(int((m & ~ndimage.binary_erosion(m)).sum()) for _, _, m, _, _ in masks)
    step = max(1, int(np.ceil(np.sqrt(2.0 * boundary / max(max_faces, 1)))))
    while True:
        meshes = [(stage, value, *_surface(m, sp, step if stage == "vertebrae" else max(1, step - 1), offset))
                  for stage, value, m, sp, offset in masks]
        total = sum(len(tri) for *_, tri, _ in meshes)
        if total <= max_faces or step >= 8:
            break
        step += 1
    meshes = [mesh for mesh in meshes if len(mesh[3])]

    unknown = [v for v in views if (isinstance(v, str) and v not in SURFACE_VIEWS)
               or (not isinstance(v, str) and len(v) != 2)]
    if unknown or not views:
        raise SpinemetsError(f"views: unknown {unknown or 'none given'}; known: {', '.join(SURFACE_VIEWS)} "
                             f"or (elevation, azimuth) pairs")
    views = [SURFACE_VIEWS[v] if isinstance(v, str) else tuple(map(float, v)) for v in views]
    if meshes:
        points = np.concatenate([tri.reshape(-1, 3) for *_, tri, _ in meshes])
        lo, hi = points.min(axis=0), points.max(axis=0)
    else:
        lo, hi = np.zeros(3), np.array(vert.shape[::-1], float) * np.array(vspacing)
    extent = np.maximum(hi - lo, 1.0)
    lo, hi = lo - 0.02 * extent, hi + 0.02 * extent
    extent = hi - lo
    height = 6.0  # inches; each panel is a square of side ``square`` (3-D axes keep a square box)
    square = height - 0.75
    widths = []
    for elev, azim in views:
        a = np.radians(azim)
        across = abs(np.sin(a)) * extent[0] + abs(np.cos(a)) * extent[1]
        up = abs(np.cos(np.radians(elev))) * extent[2] + abs(np.sin(np.radians(elev))) * max(extent[0], extent[1])
        widths.append(square * float(np.clip(across / max(up, across), 0.22, 1.0)) + 0.75)
    width = sum(widths) + 0.2
    fig = plt.figure(figsize=(width, height), dpi=dpi)
    axes = []
    for i, (elev, azim) in enumerate(views):
        centre = 0.1 + sum(widths[:i]) + (widths[i] - 0.75) / 2
        ax = fig.add_axes(((centre - square / 2) / width, 0.4 / height, square / width, square / height),
                          projection="3d", computed_zorder=False)
        ax.view_init(elev=elev, azim=azim)
        ax.set_proj_type("ortho")
        light = _view_light(elev, azim)
        for stage, value, tri, normals in meshes:
            name = (vnames if stage == "vertebrae" else mnames)[value]
            rgb = labels_mod.colour(stage, name)
            alpha = vertebra_alpha if stage == "vertebrae" else 1.0
            coll = Poly3DCollection(tri, facecolors=_lambert(rgb, normals, light, alpha), edgecolors="none",
                                    linewidths=0, zorder=1 if stage == "vertebrae" else 2)
            coll.spinemets_label = (stage, value)
            coll.spinemets_colour = tuple(rgb)
            ax.add_collection3d(coll)
        ax.set_xlim(lo[0], hi[0])
        ax.set_ylim(lo[1], hi[1])
        ax.set_zlim(lo[2], hi[2])
        ax.set_box_aspect(tuple(extent), zoom=0.92)
        ax.set_axis_off()
        ax.patch.set_visible(False)  # panels overlap: no background hiding the neighbour
        names = {SURFACE_VIEWS[k]: k for k in SURFACE_VIEWS}
        fig.text(centre / width, 1 - 0.45 / height, names.get((elev, azim), f"elev {elev:g}, azim {azim:g}"),
                 ha="center", va="top", fontsize=10)
        axes.append(ax)
    if n_vertebrae:
        levels = [(value, tri) for stage, value, tri, _ in meshes if stage == "vertebrae"]
        shown = {levels[0][0], levels[-1][0]} | {v for v, _ in levels if (v - 1) % max(label_every, 1) == 0}
        ax, (elev, azim) = axes[0], views[0]
        # Beside the spine, on the image's right-hand side of the first view.
        right = np.array([-np.sin(np.radians(azim)), np.cos(np.radians(azim)), 0.0])
        edge = lo + (hi - lo) * (right > 0)
        for value, tri in levels:
            if value in shown:
                centre = tri.reshape(-1, 3).mean(axis=0)
                position = np.where(np.abs(right) > 0.5, edge + right * 0.04 * extent, centre)
                ax.text(*position, vnames[value], fontsize=7, ha="left", va="center", zorder=3,
                        color="0.15")
    else:
        fig.text(0.5, 0.5, "no vertebrae labelled", ha="center", va="center", fontsize=11, color="0.3")
    handles = [Patch(facecolor=labels_mod.colour("metastases", n), label=n) for n in labels_mod.LESION_TYPES]
    if n_vertebrae:
        regions = {}
        for _, value, *_ in masks[:n_vertebrae]:
            region = labels_mod.REGION_OF_VERTEBRA[vnames[value]]
            regions.setdefault(region, labels_mod.colour("vertebrae", vnames[value]))
        handles = [Patch(facecolor=c, alpha=max(vertebra_alpha, 0.6), label=r) for r, c in regions.items()] + handles
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11, y=1 - 0.12 / height)
    return fig


