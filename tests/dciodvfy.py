"""David Clunie's DICOM validator ``dciodvfy`` (Debian package ``dicom3tools``) for the DICOM objects the tests write.

:func:`check_valid` runs it on one file: any line starting with ``Error`` fails the test, and so
does any ``Warning`` line that the writing module does not explain (its ``DCIODVFY_WARNINGS``,
listed in its docstring). Without ``dciodvfy`` the test is skipped with the reason, and fails
instead when ``SPINEMETS_REQUIRE_DCIODVFY=1`` (set by ``.ci/run``, which installs it).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import skip_or_fail

REQUIRE = "SPINEMETS_REQUIRE_DCIODVFY"


def dciodvfy() -> str:
    """The path of ``dciodvfy``; skips the test (or fails it, when required) without it."""
    found = shutil.which("dciodvfy")
    if found is None:
        skip_or_fail("dciodvfy (Debian package dicom3tools) is not installed: apt-get install -y dicom3tools", REQUIRE)
    return found


def check_valid(path: str | Path, explained: tuple[str, ...] = ()) -> list[str]:
    """Run ``dciodvfy`` on ``path``; fail on any error, or on a warning that contains none of
    ``explained``. Returns the output lines."""
    done = subprocess.run([dciodvfy(), str(path)], capture_output=True, text=True, timeout=60)
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("Error")]
    assert not errors, f"dciodvfy finds errors in {path}:\n" + "\n".join(lines)
    unexplained = [ln for ln in lines if ln.startswith("Warning") and not any(e in ln for e in explained)]
    assert not unexplained, f"dciodvfy warnings for {path} that the module does not explain:\n" + "\n".join(unexplained)
    return lines
