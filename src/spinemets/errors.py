"""The one exception type that the command line turns into a clear message and a non-zero exit.

Every message starts with what it is about, then a colon: the file or folder (``PATH: what is
wrong``), or, for a bad option value, the option (``--profile: unknown profile 'x'; choose one
of ...``).
"""

from __future__ import annotations

from typing import Iterable


class SpinemetsError(Exception):
    """Bad input or a failed step, described for a person: which file, and what is wrong with it."""


def unknown_choice(what: str, value, choices: Iterable[str], option: str | None = None) -> SpinemetsError:
    """The one message for a value outside its choices: ``--OPTION: unknown WHAT 'x'; choose one of a, b``."""
    subject = option or f"--{what.split()[-1]}"
    return SpinemetsError(f"{subject}: unknown {what} {value!r}; choose one of {', '.join(map(str, choices))}")


def one_line(text) -> str:
    """``text`` (or an exception's message) with its line breaks and runs of white space folded into one space."""
    return " ".join(str(text).split())
