"""Models that travel: a trained run as one archive with a model card, installed and predicted from.

It serves the commands ``spinemets export-model``, ``spinemets install-model`` and
``spinemets predict --model``.

**The archive** (:func:`export_model`) is one zip file per run, holding both stages or one:

* ``results/DatasetNNN_Name/...``: what nnU-Net's own export (``nnUNetv2_export_model_to_zip``,
  :func:`nnunetv2.model_sharing.model_export.export_pretrained_model`) writes for the selected
  configurations and folds (checkpoints, ``plans.json``, ``dataset.json``, the dataset
  fingerprint, the cross-validation summary and ``postprocessing.pkl`` where the selection made
  one, ``inference_information.json``), entry by entry under the same names, so that the folder
  is an ``nnUNet_results`` folder nnU-Net reads as its own. nnU-Net's export needs every fold's
  final validation (``validation/summary.json``) and ``progress.png``; a fold without a final
  validation (fold ``all`` of the project's trainers, where the validation cases would be the
  training cases) is exported with the same files where they exist, and the card says so
  (``export``). Beside each model folder: the domain record (``spinemets_domain.json``,
  :mod:`spinemets.domain`) and each fold's training record (``spinemets_training.json``).
* ``model_card.json`` (for programs) and ``MODEL_CARD.md`` (for people): what it was trained on
  (cohort kind, number of cases, dataset and licence; no case ID or other identifier), the
  protocol (profile, configurations, folds, epochs and iterations, nnU-Net, torch and spinemets
  versions), cross-validation and held-out results with their confidence intervals where the run
  has them, the domain it is meant for, intended use and limits (research only), the inference
  settings of the profile (so that a prediction with the model equals one with the profile), and
  the SHA-256 and size of every other file of the archive.

The archive is written under a temporary name and renamed when complete.

**Installing** (:func:`install_model`) checks the whole archive before anything is written:
every entry's name (no absolute path, no ``..``), its kind (no link or special file) and the
declared sizes (a bomb: more than :data:`MAX_UNPACKED_BYTES`, or more than
:data:`MAX_RATIO` times the archive's size) through :mod:`spinemets.fetch`'s checks of archives;
then the card: every file it lists present with its SHA-256, no file it does not list, nnU-Net's
expected files of each model (``plans.json``, ``dataset.json``, the fingerprint, each fold's
checkpoint, the postprocessing file and domain record the card names); then the versions (a
model exported with another nnU-Net major version is refused; any other difference of nnU-Net,
torch or spinemets is said in one warning). Only then is it unpacked, into a ``.partial-`` folder
of the models folder that is renamed into place. One bad thing gives one line and exit 2.

The models folder is ``$SPINEMETS_MODELS`` where set, else ``$XDG_DATA_HOME/spinemets/models``
(``~/.local/share/spinemets/models``); it is never inside a workspace.

**Predicting** (:func:`open_model`, used by :func:`spinemets.inference.predict` with ``model``):
an installed folder is checked against its card again (an edited file is refused); an archive is
checked as for installing and unpacked into a temporary folder for the run. The stages use the
card's models, postprocessing and domain records, and the card's inference settings.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping, Sequence

from spinemets import __version__
from spinemets import domain as domain_mod
from spinemets import labels as labels_mod
from spinemets.errors import SpinemetsError
from spinemets.fileio import PARTIAL_PREFIX, atomic_path, check_output_file, read_json, require_file
from spinemets.paths import Workspace, workspace_of
from spinemets.provenance import now, versions
from spinemets.training import nnunet
from spinemets.training.profiles import get_profile, profile_plans, stage_plan

log = logging.getLogger(__name__)

#: Bumped when the archive's layout or the card's meaning changes.
FORMAT = 1
KIND = "spinemets model"
CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
#: The folder of the archive that is an ``nnUNet_results`` folder.
RESULTS = "results"
MODELS_ENV = "SPINEMETS_MODELS"
#: An archive may unpack to at most this many bytes (the paper's protocol, four configurations x
#: five folds of both stages, is a few GB).
MAX_UNPACKED_BYTES = 32 * 2**30
#: ... and to at most this many times its own size: network weights hardly compress (the ci
#: model's archive unpacks to about 1.1 times its size), a bomb compresses a thousandfold.
MAX_RATIO = 50.0
MAX_ENTRIES = 10_000
#: The card's own file is read into memory; it is small.
MAX_CARD_BYTES = 16 * 2**20
SIDE_FILES = (domain_mod.RECORD,)
FOLD_SIDE_FILES = (nnunet.TRAINING_RECORD,)
INTENDED_USE = ("Research only: the reproduction of Edelmers et al. (2024) and method development on CT. "
                "Not a medical device; not for diagnosis, treatment or any decision about a patient.")
LIMITS = [
    "A model answers every CT with a segmentation; inputs unlike its training data (another body region, "
    "resolution or intensity range) are flagged by the domain check, whose record is in this archive, but "
    "are still predicted.",
    "Partial SINS points (location and bone lesion quality) are not a SINS score.",
    "The numbers below are those of the training run on its own data; they say nothing about another site's "
    "CTs until checked there.",
]
SYNTHETIC_NOTE = ("Synthetic cohort written by spinemets synth: no patient data; the model's numbers say "
                  "nothing about patients.")


# ---------------------------------------------------------------------------------------------
# Where models go


def models_folder(folder: str | Path | None = None) -> Path:
    """The models folder: ``folder``, else ``$SPINEMETS_MODELS``, else ``$XDG_DATA_HOME/spinemets/models``
    (``~/.local/share/spinemets/models``)."""
    if folder is not None:
        return Path(folder)
    if os.environ.get(MODELS_ENV):
        return Path(os.environ[MODELS_ENV])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "spinemets" / "models"


# ---------------------------------------------------------------------------------------------
# Export


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _selected_models(stage: str, profile: str, ws: Workspace) -> list[dict]:
    """The stage's models as inference uses them, with the cascade's previous stage added."""
    models = nnunet.trained_models(stage, profile, ws)
    out = list(models)
    for model in models:
        plans = read_json(Path(model["folder"]) / "plans.json", "nnU-Net plans")
        previous = plans.get("configurations", {}).get(model["configuration"], {}).get("previous_stage")
        if previous and not any(m["configuration"] == previous and m["trainer"] == model["trainer"] for m in out):
            folder = Path(model["folder"]).with_name(Path(model["folder"]).name.replace(model["configuration"], previous))
            out.append({**model, "folder": str(folder), "configuration": previous, "cascade_of": model["configuration"]})
    return out


def _plans_of(model: Mapping) -> str:
    """The plans name of a model folder (nnU-Net's ``TRAINER__PLANS__CONFIGURATION``)."""
    return Path(model["folder"]).name.split("__")[1]


def _validated(folder: Path, folds: Sequence) -> bool:
    """Whether nnU-Net's export can take these folds as they are (it needs each fold's final validation)."""
    return all((folder / f"fold_{f}" / "validation" / "summary.json").is_file()
               and (folder / f"fold_{f}" / "progress.png").is_file() for f in folds)


#: Files of nnU-Net's export that a shared model leaves out: ``debug.json`` records the training
#: machine's host name, its folders (which may name a site or a person) and the trainer's whole state,
#: and nnU-Net does not read it to predict.
LEFT_OUT = frozenset({"debug.json"})


def _nnunet_entries(ws: Workspace, dataset: str, models: list[dict], scratch: Path) -> tuple[dict[str, Path | bytes], str]:
    """The files of nnU-Net's export of these models: archive name (below :data:`RESULTS`) -> file or
    bytes; and how they were made."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model

    entries: dict[str, Path | bytes] = {}
    how = []
    groups: dict[tuple[str, str, tuple], list[str]] = {}
    for model in models:
        group = groups.setdefault((model["trainer"], _plans_of(model), tuple(model["folds"])), [])
        if model["configuration"] not in group:
            group.append(model["configuration"])
    for (trainer, plans, folds), configurations in groups.items():
        folders = [ws.results / dataset / f"{trainer}__{plans}__{c}" for c in configurations]
        if all(_validated(f, folds) for f in folders):
            target = scratch / f"{trainer}-{len(entries)}.zip"
            with ws.activated(), nnunet.captured_output(ws, "nnUNetv2_export_model_to_zip"), \
                    contextlib.redirect_stdout(_io.StringIO()):
                export_pretrained_model(dataset, str(target), configurations=tuple(configurations), trainer=trainer,
                                        plans_identifier=plans, folds=folds, strict=True)
            with zipfile.ZipFile(target) as zf:
                for name in zf.namelist():
                    if not name.endswith("/") and PurePosixPath(name).name not in LEFT_OUT:
                        entries[name] = zf.read(name)
            how.append(f"{trainer} {', '.join(configurations)}: nnU-Net's export_pretrained_model")
        else:
            for folder in folders:
                entries.update(_same_files_as_nnunet(ws, folder, folds))
            how.append(f"{trainer} {', '.join(configurations)}: the files nnU-Net's export takes, copied by spinemets "
                       "(nnU-Net's export needs each fold's final validation, which fold 'all' does not have)")
    return entries, "; ".join(how)


def _same_files_as_nnunet(ws: Workspace, folder: Path, folds: Sequence) -> dict[str, Path]:
    """For folds without a final validation: the files nnU-Net's export takes, where they exist."""
    if not folder.is_dir():
        raise SpinemetsError(f"{folder}: model folder not found; train it first")
    files = []
    for fold in folds:
        sub = folder / f"fold_{fold}"
        files += [sub / nnunet.CHECKPOINT_FINAL, sub / "progress.png",
                  sub / "network_architecture.pdf", sub / "validation" / "summary.json"]
    files += [folder / "plans.json", folder / "dataset_fingerprint.json", folder / "dataset.json"]
    for name in ("inference_information.json", "inference_information.txt"):
        files.append(folder.parent / name)
    for needed in (folder / "plans.json", folder / "dataset.json", folder / "dataset_fingerprint.json",
                   *(folder / f"fold_{f}" / nnunet.CHECKPOINT_FINAL for f in folds)):
        require_file(needed, "file of the trained model")
    return {p.relative_to(ws.results).as_posix(): p for p in files if p.is_file()}


def _training_summary(folder: Path, folds: Sequence) -> dict:
    """Epochs and iterations per fold, from the project's training records, else nnU-Net's checkpoint."""
    import torch

    out = {}
    for fold in folds:
        record = folder / f"fold_{fold}" / nnunet.TRAINING_RECORD
        if record.is_file():
            data = read_json(record, "training record")
            out[str(fold)] = {k: data.get(k) for k in ("epochs", "iterations", "elapsed_s", "budget_s", "device")}
        else:
            saved = torch.load(folder / f"fold_{fold}" / nnunet.CHECKPOINT_FINAL, map_location="cpu", weights_only=False)
            out[str(fold)] = {"epochs": saved.get("current_epoch"), "iterations": None, "elapsed_s": None,
                              "budget_s": None, "device": None}
    return out


def _cross_validation(ws: Workspace, dataset: str) -> dict | None:
    """nnU-Net's cross-validation result of the selection (mean foreground Dice of each candidate, of the
    selected one before and after its postprocessing), where the run made a selection. nnU-Net gives
    no interval for it."""
    info = read_json(ws.results / dataset / "inference_information.json", "nnU-Net's selection", missing=None)
    if not isinstance(info, dict) or "best_model_or_ensemble" not in info:
        return None
    best = info["best_model_or_ensemble"]
    return {"selected": best.get("selected_model_or_models"),
            "foreground_mean_dice": best.get("result_on_crossval_pre_pp"),
            "foreground_mean_dice_postprocessed": best.get("result_on_crossval_post_pp"),
            "candidates": info.get("all_results"), "folds": info.get("folds"),
            "source": "nnUNetv2_find_best_configuration (mean foreground Dice over the cross-validation cases; "
                      "no interval)"}


def _held_out(ws: Workspace, stage: str) -> dict | None:
    """The run's held-out evaluation: every aggregate row of ``summary.csv`` (no per-case row)."""
    import pandas as pd

    path = ws.evaluation(stage) / "summary.csv"
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    rows = [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in table.to_dict("records")]
    return {"rows": rows, "cases": int(table["n"].max()) if len(table) else 0,
            "source": "spinemets evaluate on the held-out cases (bootstrap 95 % intervals over cases)"}


def _profile_settings(profile: str) -> dict:
    prof = get_profile(profile)
    settings = {key: prof.get(key, default) for key, default in (("min_lesion_ml", 0.0), ("min_vertebra_ml", 0.0),
                                                                   ("repair_vertebra_order", False), ("min_confidence", 0.0),
                                                                   ("spine_only", False))}
    if "spine_margin_mm" in prof:  # otherwise predict's default
        settings["spine_margin_mm"] = prof["spine_margin_mm"]
    return settings


def default_name(profile: str, stages: Sequence[str]) -> str:
    return f"spinemets-{profile}-{'-'.join(stages)}"


def export_model(out: str | Path, profile: str = "demo", workspace=None, stages: Sequence[str] | None = None,
                 name: str | None = None, dataset: str | None = None, licence: str | None = None) -> Path:
    """Write the model archive of a trained run (see the module docstring); return its path.

    ``stages``: both by default. ``dataset`` and ``licence`` describe the training data in the
    card; for a synthetic cohort they default to the synthetic cohort's, for real data they are
    required (a card that cannot say what the model was trained on is not written).
    """
    ws = workspace_of(workspace)
    stages = list(stages or labels_mod.STAGE_NAMES)
    for stage in stages:
        labels_mod.check_stage(stage)
    out = check_output_file(Path(out), "model archive")
    if not out.name.lower().endswith(".zip"):
        raise SpinemetsError(f"{out}: a model archive is a .zip file; give a name ending in .zip")
    name = name or default_name(profile, stages)
    _check_name(name, out)
    prof = get_profile(profile)
    entries: dict[str, Path | bytes] = {}
    card_stages = {}
    cohorts = []
    with tempfile.TemporaryDirectory(prefix="spinemets-export-") as scratch:
        for stage in stages:
            dataset_name = ws.dataset_name(stage)
            models = _selected_models(stage, profile, ws)
            found, how = _nnunet_entries(ws, dataset_name, models, Path(scratch))
            entries.update({f"{RESULTS}/{k}": v for k, v in found.items()})
            first = Path(models[0]["folder"])
            record = domain_mod.training_domain(first, ws.raw / dataset_name)
            if record is None:
                raise SpinemetsError(f"{first}: no dataset fingerprint, so no domain record; the model folder is incomplete")
            for model in models:
                folder = Path(model["folder"])
                rel = f"{RESULTS}/{folder.relative_to(ws.results).as_posix()}"
                entries[f"{rel}/{domain_mod.RECORD}"] = (json.dumps(record, indent=2) + "\n").encode()
                for fold in model["folds"]:
                    side = folder / f"fold_{fold}" / nnunet.TRAINING_RECORD
                    if side.is_file():
                        entries[f"{rel}/fold_{fold}/{nnunet.TRAINING_RECORD}"] = side
            post = nnunet.selected_postprocessing(stage, profile, ws)
            post_rel = None
            if post is not None:
                post_rel = f"{RESULTS}/{Path(post).resolve().relative_to(ws.results.resolve()).as_posix()}" \
                    if ws.results.resolve() in Path(post).resolve().parents else f"{RESULTS}/{dataset_name}/postprocessing.pkl"
                entries.setdefault(post_rel, Path(post))
            dataset_json = read_json(first / "dataset.json", "dataset.json of the model")
            cohorts.append(record.get("cohort", "unknown"))
            card_stages[stage] = {
                "dataset": dataset_name,
                "labels": dataset_json.get("labels"),
                "models": [{"folder": f"{RESULTS}/{Path(m['folder']).relative_to(ws.results).as_posix()}",
                            "configuration": m["configuration"], "trainer": m["trainer"], "plans": _plans_of(m),
                            "folds": m["folds"], **({"cascade_of": m["cascade_of"]} if "cascade_of" in m else {}),
                            "training": _training_summary(Path(m["folder"]), m["folds"])}
                           for m in models],
                "postprocessing": post_rel,
                "domain": {"record": f"{RESULTS}/{first.relative_to(ws.results).as_posix()}/{domain_mod.RECORD}",
                           "summary": domain_mod.describe(record), "cohort": record.get("cohort"),
                           "training_cases": record.get("cases"),
                           "spacing_mm": record.get("spacing_mm"), "field_of_view_mm": record.get("field_of_view_mm"),
                           "intensity_hu": record.get("intensity_hu")},
                "cross_validation": _cross_validation(ws, dataset_name) if prof["find_best"] else None,
                "held_out": _held_out(ws, stage),
                "export": how,
            }
        cohort = cohorts[0] if len(set(cohorts)) == 1 else "mixed"
        if cohort == "synthetic":
            dataset = dataset or "synthetic cohort (spinemets synth)"
            licence = licence or "generated data, no third-party rights"
        elif not dataset or not licence:
            raise SpinemetsError(f"{out}: the models were trained on {cohort} data; say which dataset and under what "
                                 "licence (--dataset, --licence), so that the model card can")
        versions_now = versions()
        card = {
            "format": FORMAT, "kind": KIND, "name": name, "created": now(),
            "training_data": {"cohort": cohort, "dataset": dataset, "licence": licence,
                              "cases": {s: card_stages[s]["domain"]["training_cases"] for s in stages},
                              "identifiers": "none: the card and the archive hold counts and ranges only, no case ID",
                              **({"note": SYNTHETIC_NOTE} if cohort == "synthetic" else {})},
            "protocol": {"profile": profile, "description": prof.get("description"),
                         "plans": profile_plans(profile), "planner": prof.get("planner") or "nnU-Net's default",
                         "stages": {s: {"configurations": [m["configuration"] for m in card_stages[s]["models"]],
                                        "folds": card_stages[s]["models"][0]["folds"],
                                        "trainer": card_stages[s]["models"][0]["trainer"]} for s in stages},
                         "versions": {k: versions_now.get(k) for k in ("spinemets", "nnunetv2", "torch", "python")}},
            "inference": _profile_settings(profile),
            "intended_use": INTENDED_USE, "limits": LIMITS,
            "stages": card_stages,
        }
        files = {}
        for arc in sorted(entries):
            value = entries[arc]
            data_hash = hashlib.sha256(value).hexdigest() if isinstance(value, bytes) else sha256_file(value)
            size = len(value) if isinstance(value, bytes) else Path(value).stat().st_size
            files[arc] = {"sha256": data_hash, "bytes": size}
        markdown = render_card(card, files).encode()
        files[CARD_MD] = {"sha256": hashlib.sha256(markdown).hexdigest(), "bytes": len(markdown)}
        card["files"] = files
        with atomic_path(out) as tmp:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zf:
                zf.writestr(CARD_JSON, json.dumps(card, indent=2) + "\n")
                zf.writestr(CARD_MD, markdown)
                for arc in sorted(entries):
                    value = entries[arc]
                    if isinstance(value, bytes):
                        zf.writestr(arc, value)
                    else:
                        zf.write(value, arc)
    log.info("%s: model archive of %s (%s), %.1f MB", out, ", ".join(stages), profile, out.stat().st_size / 1e6)
    return out


def _check_name(name: str, where) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name or ""):
        raise SpinemetsError(f"{where}: model name {name!r}: use letters, digits, '.', '_' and '-' (at most 100)")


# ---------------------------------------------------------------------------------------------
# The card as Markdown


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render_card(card: Mapping, files: Mapping[str, Mapping] | None = None) -> str:
    """The model card as Markdown (``MODEL_CARD.md``)."""
    files = card.get("files", {}) if files is None else files
    data, protocol = card["training_data"], card["protocol"]
    lines = [f"# Model card: {card['name']}", "",
             f"A {KIND} archive (format {card['format']}), exported {card['created']}.", "",
             "## Intended use and limits", "", card["intended_use"], ""]
    lines += [f"- {limit}" for limit in card["limits"]]
    lines += ["", "## Training data", "",
              f"- Cohort: {data['cohort']}",
              f"- Dataset: {data['dataset']}",
              f"- Licence: {data['licence']}",
              "- Training cases: " + ", ".join(f"{s} {n}" for s, n in data["cases"].items()),
              f"- Identifiers: {data['identifiers']}"]
    if data.get("note"):
        lines.append(f"- Note: {data['note']}")
    v = protocol["versions"]
    lines += ["", "## Protocol", "",
              f"- Profile: `{protocol['profile']}` ({protocol.get('description') or ''})",
              f"- nnU-Net planner and plans: {protocol.get('planner')}, `{protocol.get('plans')}`",
              f"- Versions: spinemets {v.get('spinemets')}, nnU-Net {v.get('nnunetv2')}, torch {v.get('torch')}, "
              f"Python {v.get('python')}",
              f"- Inference settings: " + ", ".join(f"{k} {val}" for k, val in card["inference"].items()), "",
              "| stage | dataset | configuration | trainer | folds | epochs | iterations |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for stage, entry in card["stages"].items():
        for model in entry["models"]:
            epochs = ", ".join(_fmt(t.get("epochs")) for t in model["training"].values())
            its = ", ".join(_fmt(t.get("iterations")) for t in model["training"].values())
            lines.append(f"| {stage} | {entry['dataset']} | {model['configuration']} | {model['trainer']} | "
                         f"{', '.join(map(str, model['folds']))} | {epochs} | {its} |")
    lines += [""] + [f"- {stage} exported by: {entry['export']}" for stage, entry in card["stages"].items()]
    lines += ["", "## Results", ""]
    for stage, entry in card["stages"].items():
        cv = entry.get("cross_validation")
        lines.append(f"### {stage}")
        lines.append("")
        if cv:
            lines.append(f"Cross-validation (nnU-Net's selection): mean foreground Dice {_fmt(cv.get('foreground_mean_dice'))}.")
        else:
            lines.append("Cross-validation: none in this run (its profile trains without selection).")
        lines.append("")
        held = entry.get("held_out")
        if held:
            lines += [f"Held-out cases ({held['cases']}), mean over cases or pooled, with bootstrap 95 % intervals:", "",
                      "| class | metric | aggregate | value | 95 % CI | n |", "| --- | --- | --- | --- | --- | --- |"]
            for row in _headline_rows(stage, held["rows"]):
                interval = ("–" if row.get("ci_low") is None or row.get("ci_high") is None
                            else f"{_fmt(row['ci_low'])}–{_fmt(row['ci_high'])}")
                n = row.get("n")
                lines.append(f"| {row['class']} | {row['metric']} | {row['aggregate']} | {_fmt(row['value'])} | "
                             f"{interval} | {'–' if n is None else int(n)} |")
            lines.append("")
            lines.append(f"({len(held['rows'])} rows in all in `{CARD_JSON}`.)")
        else:
            lines.append("Held-out results: none in this run.")
        lines.append("")
    lines += ["## Intended domain", ""]
    for stage, entry in card["stages"].items():
        lines.append(f"- {stage}: {entry['domain']['summary']}; {_domain_ranges(entry['domain'])}")
    lines += ["", "Inputs outside it are predicted with a warning (the domain check of `spinemets predict`).", "",
              "## Files", "", "| file | bytes | SHA-256 |", "| --- | --- | --- |"]
    for name, meta in sorted(files.items()):
        if name == CARD_MD:
            continue
        lines.append(f"| `{name}` | {meta['bytes']} | `{meta['sha256']}` |")
    lines += ["", f"`{CARD_JSON}` lists these and the SHA-256 of this file.", ""]
    return "\n".join(lines)


def _domain_ranges(domain: Mapping) -> str:
    """Spacing, field of view (x, y, z) and whole-CT median HU ranges of a domain record, in words."""
    def per_axis(key: str, digits: int) -> str:
        rng = domain.get(key) or {}
        if not rng.get("min"):
            return "–"
        return " x ".join(f"{lo:.{digits}f}–{hi:.{digits}f}" for lo, hi in zip(rng["min"], rng["max"]))

    text = f"spacing {per_axis('spacing_mm', 2)} mm, field of view {per_axis('field_of_view_mm', 0)} mm (x, y, z)"
    median = (domain.get("intensity_hu") or {}).get("p50")
    if median:
        text += f", median HU {median['min']:.0f}–{median['max']:.0f}"
    return text


_HEADLINE_METRICS = ("dice", "lesion_fbeta", "lesion_recall", "lesion_precision", "identification_rate", "fp")


def _headline_rows(stage: str, rows: list[dict]) -> list[dict]:
    """The rows shown in the Markdown card: the summary classes (for the vertebrae, the mean Dice over
    vertebrae and the identification rate; not each vertebra) and the headline metrics."""
    if stage == "vertebrae":
        dice = [r for r in rows if r.get("metric") == "dice" and r.get("aggregate") == "mean"
                and r.get("value") is not None and r.get("class") != "all"]
        shown = [r for r in rows if r.get("class") == "all"]
        if dice:
            values = [float(r["value"]) for r in dice]
            shown.insert(0, {"class": "mean over vertebrae", "metric": "dice", "aggregate": "mean of class means",
                             "value": sum(values) / len(values), "ci_low": None, "ci_high": None, "n": len(values)})
        return shown
    return [r for r in rows if r.get("metric") in _HEADLINE_METRICS]


# ---------------------------------------------------------------------------------------------
# Checking an archive or an installed folder


@dataclass
class Model:
    """A verified model: its folder (installed, or unpacked for one run), its card, where it came from."""

    folder: Path
    card: dict
    source: Path
    version_notes: list[str] = field(default_factory=list)
    _temporary: object = None  # a TemporaryDirectory that holds an archive unpacked for one run

    @property
    def name(self) -> str:
        return self.card["name"]

    def record(self) -> dict:
        """What the provenance of a prediction says about the model."""
        return {"name": self.name, "source": str(self.source), "folder": str(self.folder),
                "card_sha256": hashlib.sha256((self.folder / CARD_JSON).read_bytes()).hexdigest(),
                "profile": self.card["protocol"]["profile"], "versions": self.card["protocol"]["versions"],
                "version_notes": self.version_notes}

    def settings(self) -> dict:
        """The inference settings of the card, in the form of a training profile's entries."""
        return dict(self.card["inference"])

    def stage_models(self, stage: str) -> list[dict]:
        """The stage's models as :func:`spinemets.training.nnunet.trained_models` gives them (the cascade's previous
        stage is loaded by its member, so it is left out here)."""
        entry = self._stage(stage)
        return [{"folder": str(self.folder / m["folder"]), "configuration": m["configuration"],
                 "trainer": m["trainer"], "folds": m["folds"]} for m in entry["models"] if "cascade_of" not in m]

    def postprocessing(self, stage: str) -> Path | None:
        rel = self._stage(stage)["postprocessing"]
        return None if rel is None else self.folder / rel

    def _stage(self, stage: str) -> dict:
        if stage not in self.card["stages"]:
            raise SpinemetsError(f"{self.source}: model {self.name!r} holds no {stage} stage "
                                 f"(it holds {', '.join(self.card['stages'])})")
        return self.card["stages"][stage]


def _parse_card(data: bytes, where) -> dict:
    try:
        card = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpinemetsError(f"{where}: {CARD_JSON} is not JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(card, dict) or card.get("kind") != KIND:
        raise SpinemetsError(f"{where}: {CARD_JSON} is not a spinemets model card")
    if card.get("format") != FORMAT:
        raise SpinemetsError(f"{where}: model card format {card.get('format')!r}; this spinemets reads format {FORMAT}")
    for key in ("name", "files", "stages", "protocol", "inference", "training_data"):
        if key not in card:
            raise SpinemetsError(f"{where}: {CARD_JSON} lacks {key!r}")
    _check_name(card["name"], where)
    if not isinstance(card["files"], dict) or not card["stages"]:
        raise SpinemetsError(f"{where}: {CARD_JSON} lists no files or no stage")
    for name, meta in card["files"].items():
        if not (isinstance(meta, dict) and isinstance(meta.get("sha256"), str) and isinstance(meta.get("bytes"), int)):
            raise SpinemetsError(f"{where}: {CARD_JSON}: entry {name!r} has no sha256 and bytes")
    for stage, entry in card["stages"].items():
        labels_mod.check_stage(stage)
        _check_expected_files(card, stage, entry, where)
    return card


def _check_expected_files(card: Mapping, stage: str, entry: Mapping, where) -> None:
    """nnU-Net's expected files of each model of a stage, and the card's own references, are listed."""
    listed = card["files"]
    needed = []
    for model in entry.get("models", []):
        folder = model["folder"]
        needed += [f"{folder}/plans.json", f"{folder}/dataset.json", f"{folder}/dataset_fingerprint.json"]
        needed += [f"{folder}/fold_{f}/{nnunet.CHECKPOINT_FINAL}" for f in model["folds"]]
    if entry.get("postprocessing"):
        needed.append(entry["postprocessing"])
    needed.append(entry.get("domain", {}).get("record"))
    for name in needed:
        if name not in listed:
            raise SpinemetsError(f"{where}: the {stage} model lacks {name} (an nnU-Net file the card must list)")


def _check_versions(card: Mapping, where) -> list[str]:
    """Refuse a model exported with another nnU-Net major version; return a note for each other difference."""
    built = card["protocol"].get("versions", {})
    here = versions()
    notes = []
    for key in ("nnunetv2", "torch", "spinemets"):
        if built.get(key) and here.get(key) and built[key] != here[key]:
            notes.append(f"{key} {built[key]} (model) vs {here[key]} (installed)")
    nn_built, nn_here = str(built.get("nnunetv2") or ""), str(here.get("nnunetv2") or "")
    if nn_built and nn_here and nn_built.split(".")[0] != nn_here.split(".")[0]:
        raise SpinemetsError(f"{where}: the model was exported with nnU-Net {nn_built}, this installation has "
                             f"{nn_here}: another major version cannot read it; install nnunetv2=={nn_built}")
    if notes:
        log.warning("WARNING: %s: versions differ from the model's: %s; its predictions may differ slightly from the "
                    "card's numbers", where, "; ".join(notes))
    return notes


def check_archive(archive: str | Path) -> dict:
    """Check a model archive completely without writing anything; return its card (see the module docstring)."""
    from spinemets.cohort.fetch import archive_entries

    archive = require_file(Path(archive), "model archive")
    if not zipfile.is_zipfile(archive):
        raise SpinemetsError(f"{archive}: not a zip file; a model archive is the .zip of spinemets export-model")
    entries = archive_entries(archive, max_bytes=MAX_UNPACKED_BYTES, max_ratio=MAX_RATIO, max_entries=MAX_ENTRIES)
    files = {PurePosixPath(n.replace("\\", "/")).as_posix(): n for n, _, is_dir in entries if not is_dir}
    if CARD_JSON not in files:
        raise SpinemetsError(f"{archive}: no {CARD_JSON}; not a spinemets model archive")
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo(files[CARD_JSON])
        if info.file_size > MAX_CARD_BYTES:
            raise SpinemetsError(f"{archive}: {CARD_JSON} is {info.file_size} bytes; a card is far smaller")
        try:
            card = _parse_card(zf.read(info), archive)
            listed = set(card["files"])
            for name in sorted(listed - set(files)):
                raise SpinemetsError(f"{archive}: {name} is listed in the model card but missing from the archive")
            for name in sorted(set(files) - listed - {CARD_JSON}):
                raise SpinemetsError(f"{archive}: {name} is in the archive but not in its model card; refusing it")
            for name, meta in sorted(card["files"].items()):
                digest, size = hashlib.sha256(), 0
                with zf.open(files[name]) as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
                        size += len(chunk)
                if size != meta["bytes"] or digest.hexdigest() != meta["sha256"]:
                    raise SpinemetsError(f"{archive}: {name} does not match its SHA-256 in the model card "
                                         "(edited or damaged); refusing the archive")
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise SpinemetsError(f"{archive}: cannot read the archive ({exc.__class__.__name__}: {exc})") from None
    return card


def check_folder(folder: str | Path) -> dict:
    """Check an installed (or unpacked) model folder against its card; return the card."""
    folder = Path(folder)
    card_file = require_file(folder / CARD_JSON, "model card")
    card = _parse_card(card_file.read_bytes(), folder)
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    for name in sorted(card["files"]):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            raise SpinemetsError(f"{path}: listed in the model card but missing (or a link)")
        meta = card["files"][name]
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            raise SpinemetsError(f"{path}: does not match its SHA-256 in the model card (edited or damaged)")
    extra = sorted(present - set(card["files"]) - {CARD_JSON})
    if extra:
        raise SpinemetsError(f"{folder / extra[0]}: not in the model card; a model folder holds only its card's files")
    return card


# ---------------------------------------------------------------------------------------------
# Install and open


def install_model(archive: str | Path, models: str | Path | None = None, name: str | None = None) -> Path:
    """Check ``archive`` completely, then unpack it into ``models/<name>`` (name: the card's); return the folder.

    An installed model with the same card is left as it is; another one under the name is an error.
    """
    from spinemets.cohort.fetch import extract_into

    archive = Path(archive)
    card = check_archive(archive)
    _check_versions(card, archive)
    name = name or card["name"]
    _check_name(name, archive)
    root = models_folder(models)
    _check_outside_workspace(root)
    target = root / name
    if target.exists():
        try:
            same = read_json(target / CARD_JSON, "model card") == card
        except SpinemetsError:
            same = False
        if same:
            check_folder(target)
            log.info("%s: already installed", target)
            return target
        raise SpinemetsError(f"{target}: another model is installed under this name; remove it or give --name")
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f"{PARTIAL_PREFIX}{name}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        extract_into(archive, staging)
        check_folder(staging)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: installed model %s", target, card["name"])
    return target


def _check_outside_workspace(root: Path) -> None:
    """A models folder is not inside a workspace (its ``results``, ``raw`` ... belong to a run)."""
    resolved = root.resolve()
    for parent in [resolved, *resolved.parents]:
        if all((parent / part).is_dir() for part in ("raw", "results")):
            raise SpinemetsError(f"{root}: lies inside the workspace {parent}; install models outside any workspace "
                                 f"(default: ${MODELS_ENV} or ~/.local/share/spinemets/models)")


def open_model(source: str | Path) -> Model:
    """A verified model from an installed folder, or from an archive unpacked into a temporary folder."""
    from spinemets.cohort.fetch import extract_into

    source = Path(source)
    if source.is_dir():
        card = check_folder(source)
        return Model(source, card, source, _check_versions(card, source))
    card = check_archive(source)
    notes = _check_versions(card, source)
    temporary = tempfile.TemporaryDirectory(prefix="spinemets-model-")
    folder = Path(temporary.name) / card["name"]
    folder.mkdir()
    extract_into(source, folder)
    check_folder(folder)
    return Model(folder, card, source, notes, temporary)


def installed_models(models: str | Path | None = None) -> list[dict]:
    """Name, profile, stages and creation time of each model in the models folder."""
    root = models_folder(models)
    out = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / CARD_JSON).is_file():
            continue
        card = read_json(folder / CARD_JSON, "model card")
        out.append({"name": folder.name, "profile": card.get("protocol", {}).get("profile"),
                    "stages": ", ".join(card.get("stages", {})), "created": card.get("created")})
    return out
