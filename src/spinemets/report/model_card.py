"""The model card of the run a book shows: what ``spinemets export-model`` would write for it
(:mod:`spinemets.training.sharing`), for the results page."""

from __future__ import annotations

import json
import logging
import tempfile
import zipfile
from pathlib import Path
from typing import Mapping

from spinemets.errors import SpinemetsError
from spinemets.report.results import run_parameter, run_workspace
from spinemets.training.sharing import CARD_JSON, CARD_MD, export_model

log = logging.getLogger(__name__)

def run_card(provenance: Mapping | None, root: str | Path | None = None) -> tuple[dict, str] | None:
    """The model card (JSON and Markdown) that ``spinemets export-model`` writes for the run the book shows:
    exported into a temporary folder, read back, removed. None when the run has no workspace or no
    trained models. Data that is not synthetic and has no stated dataset or licence is shown as such."""
    workspace = run_workspace(provenance, root)
    profile = run_parameter(provenance, "profile") if provenance else None
    if workspace is None or profile is None or not (Path(workspace) / "results").is_dir():
        return None
    unstated = "not stated (spinemets export-model --dataset ... --licence ... states it)"
    with tempfile.TemporaryDirectory(prefix="spinemets-card-") as scratch:
        try:
            archive = export_model(Path(scratch) / "model.zip", profile=profile, workspace=workspace)
        except SpinemetsError as exc:
            if "--dataset, --licence" not in str(exc):
                log.warning("no model card for the book: %s", exc)
                return None
            archive = export_model(Path(scratch) / "model.zip", profile=profile, workspace=workspace,
                                   dataset=unstated, licence=unstated)
        with zipfile.ZipFile(archive) as zf:
            card = json.loads(zf.read(CARD_JSON))
            markdown = zf.read(CARD_MD).decode()
        card["archive_bytes"] = archive.stat().st_size
    return card, markdown


def card_html(markdown: str, levels: int = 2) -> str:
    """A card's Markdown as HTML with its headings moved ``levels`` down, for a section of a page (the
    book renders a cell's Markdown output as CommonMark, without tables)."""
    from markdown_it import MarkdownIt

    moved = "\n".join("#" * levels + line if line.startswith("#") else line for line in markdown.splitlines())
    return f'<div class="spinemets-model-card">{MarkdownIt("commonmark").enable("table").render(moved)}</div>'
