"""What produced an output: the one builder of the provenance every output folder carries.

:func:`provenance` gives the common part of every record (what produced it, the command line,
when, and the versions of the packages that decide the numbers); each step adds its own fields
(parameters, models, timings ...). Nothing here reads an input header, so no patient data can
reach a record.
"""

from __future__ import annotations

import datetime as _dt
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

#: Packages whose versions go into every record.
VERSIONED = ("spinemets", "nnunetv2", "torch", "SimpleITK", "numpy", "papermill", "jupyter-book")


def versions() -> dict[str, str | None]:
    """Versions of Python and of the packages in :data:`VERSIONED` (None when not installed)."""
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


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
