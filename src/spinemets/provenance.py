"""What produced an output: the one builder of the provenance every output folder carries.

:func:`provenance` gives the common part of every record (what produced it, the command line,
when, and the versions of the packages that decide the numbers); each step adds its own fields
(parameters, models, timings ...). Nothing here reads an input header, so no patient data can
reach a record.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import sys
from pathlib import Path
from typing import Any

#: Packages whose versions go into every record.
VERSIONED = ("spinemets", "nnunetv2", "torch", "SimpleITK", "numpy", "papermill", "jupyter-book")


def versions() -> dict[str, str | None]:
    """Versions of Python and of the packages in :data:`VERSIONED` (None when not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    installed = _dist_info_versions()
    for name in VERSIONED:
        found[name] = installed.get(_normalized(name)) or _metadata_version(name)
    return found


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _dist_info_versions() -> dict[str, str]:
    """``{normalized name: version}`` read off the ``NAME-VERSION.dist-info`` folder names on ``sys.path``
    (the wheel format's naming), first found first, as Python's import finds packages: a folder listing,
    where :mod:`importlib.metadata` would cost a command a tenth of its start-up."""
    out: dict[str, str] = {}
    for entry in sys.path:
        try:
            names = os.listdir(entry or ".")
        except OSError:
            continue
        for folder in names:
            stem = folder[: -len(".dist-info")] if folder.endswith(".dist-info") else ""
            if stem.count("-") == 1:
                name, version = stem.split("-")
                out.setdefault(_normalized(name), version)
    return out


def _metadata_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def command() -> str:
    """The command line of this process, quoted as a shell would need it."""
    argv = [Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python", *sys.argv[1:]]
    return " ".join(shlex.quote(a) for a in argv)


def now() -> str:
    """The current UTC time, ISO 8601 to the second."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance(produced_by: str, **fields: Any) -> dict:
    """``{"produced_by", "command", "created", "versions", **fields}``: the record of one output."""
    return {"produced_by": produced_by, "command": command(), "created": now(), "versions": versions(), **fields}
