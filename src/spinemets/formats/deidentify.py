"""De-identification: pseudonymous case IDs, whose private mapping stays beside the source data.

:func:`pseudonymize` maps original case identifiers (folder or file names of a clinical export,
which may carry names or record numbers) to pseudonyms ``sm-0001``, ``sm-0002`` ... through a
private CSV mapping (columns ``original,pseudonym``) kept beside the source data
(:func:`mapping_path`), never in an output folder. New identifiers are numbered in sorted order
after the highest pseudonym already in the mapping, so a rerun on the same data gives the same
pseudonyms (the numbers reveal that sort order, nothing else: no hash of an identifier, which a
short ID would let anyone reverse by trying them all). ``spinemets scan --pseudonymize`` uses it;
the book's dataset chapter (section De-identification) gives the rules every output follows.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Iterable

from spinemets.errors import SpinemetsError
from spinemets.fileio import require_file, write_csv

log = logging.getLogger(__name__)

#: File name of the private mapping from original identifiers to pseudonyms.
PSEUDONYM_FILE = ".spinemets-pseudonyms.csv"
PSEUDONYM_PREFIX = "sm-"


def mapping_path(source_dir: str | Path) -> Path:
    """Where the private pseudonym mapping of the data in ``source_dir`` lives: beside that data."""
    return Path(source_dir) / PSEUDONYM_FILE


def read_mapping(path: str | Path) -> dict[str, str]:
    """Read a pseudonym mapping CSV (``original,pseudonym``); a missing file is an empty mapping."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    require_file(path, "pseudonym mapping")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames != ["original", "pseudonym"]:
            raise SpinemetsError(f"{path}: not a pseudonym mapping (expected the columns original,pseudonym)")
        mapping = {row["original"]: row["pseudonym"] for row in reader}
    if len(set(mapping.values())) != len(mapping):
        raise SpinemetsError(f"{path}: pseudonym mapping gives one pseudonym to several identifiers")
    return mapping


def pseudonymize(
    identifiers: Iterable[str], mapping_file: str | Path, out_dir: str | Path | None = None
) -> dict[str, str]:
    """Return ``{original: pseudonym}`` for ``identifiers``, extending the private mapping file.

    Pseudonyms are ``sm-`` plus a zero-padded number (``sm-0001``); identifiers already in
    ``mapping_file`` keep theirs, new ones are numbered in sorted order after the highest number
    in use. The file is rewritten (atomically) only when it gains entries. ``out_dir``, when
    given, is the folder outputs go to: the mapping file may not lie inside it.
    """
    mapping_file = Path(mapping_file)
    if out_dir is not None and mapping_file.resolve().is_relative_to(Path(out_dir).resolve()):
        raise SpinemetsError(
            f"{mapping_file}: the pseudonym mapping must stay beside the source data, not inside the output folder {out_dir}"
        )
    wanted = [str(i) for i in identifiers]
    mapping = read_mapping(mapping_file)
    new = sorted(set(wanted) - set(mapping))
    if new:
        start = 1 + max((_pseudonym_number(p) for p in mapping.values()), default=0)
        for offset, original in enumerate(new):
            mapping[original] = f"{PSEUDONYM_PREFIX}{start + offset:04d}"
        rows = [{"original": k, "pseudonym": v} for k, v in sorted(mapping.items(), key=lambda kv: (_pseudonym_number(kv[1]), kv[1]))]
        write_csv(mapping_file, rows, ["original", "pseudonym"])
        log.info("added %d pseudonym(s) to %s", len(new), mapping_file)
    return {original: mapping[original] for original in wanted}


def _pseudonym_number(pseudonym: str) -> int:
    digits = pseudonym[len(PSEUDONYM_PREFIX):] if pseudonym.startswith(PSEUDONYM_PREFIX) else ""
    return int(digits) if digits.isdigit() else 0
