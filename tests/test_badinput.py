"""Run every case of the bad-input corpus (tests/badinput/*.yaml).

Each case must raise :class:`SpinemetsError` whose message contains the case's ``error``, leave no
temporary (``.partial-``) file and none of the outputs it lists; through the command line it must
exit non-zero and print that message.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from badinput.builders import BUILDERS, Context
from spinemets.errors import SpinemetsError
from spinemets.io import PARTIAL_PREFIX

CORPUS = Path(__file__).resolve().parent / "badinput"
CASE_KEYS = {"id", "area", "builder", "args", "error"}


def load_cases() -> list[dict]:
    cases = []
    for path in sorted(CORPUS.glob("*.yaml")):
        for case in yaml.safe_load(path.read_text(encoding="utf-8")) or []:
            cases.append({"args": {}, **case, "file": path.name})
    return cases


CASES = load_cases()


def test_corpus_is_well_formed():
    ids = [c["id"] for c in CASES]
    assert len(ids) == len(set(ids)), "case ids must be unique"
    for case in CASES:
        assert CASE_KEYS <= set(case), f"{case['file']}: {case.get('id')} lacks {CASE_KEYS - set(case)}"
        assert case["builder"] in BUILDERS, f"{case['id']}: unknown builder {case['builder']!r}"
        assert isinstance(case["error"], str) and case["error"].strip(), f"{case['id']}: empty error"
    areas = {c["area"] for c in CASES}
    assert {"fetch", "dicom", "import", "evaluate"} <= areas
    assert sum(c["area"] in ("fetch", "dicom") for c in CASES) >= 12


@contextlib.contextmanager
def prepared(case: dict, tmp_path: Path):
    with contextlib.ExitStack() as stack:
        yield BUILDERS[case["builder"]](Context(tmp_path, stack), **case["args"])


def _leftovers(tmp_path: Path, absent: list[Path]) -> list[Path]:
    return list(tmp_path.rglob(f"{PARTIAL_PREFIX}*")) + [p for p in absent if p.exists()]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_api(case, tmp_path):
    with prepared(case, tmp_path) as prep:
        with pytest.raises(SpinemetsError) as err:
            prep.call()
    assert case["error"] in str(err.value)
    assert _leftovers(tmp_path, prep.absent) == []


def _cli() -> Path | None:
    exe = Path(sys.executable).with_name("spinemets")
    found = exe if exe.exists() else shutil.which("spinemets")
    return Path(found) if found else None


@functools.lru_cache(maxsize=None)
def _cli_has(command: str) -> bool:
    exe = _cli()
    if exe is None:
        return False
    done = subprocess.run([str(exe), command, "--help"], capture_output=True, text=True, timeout=120)
    return done.returncode == 0


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_cli(case, tmp_path):
    with prepared(case, tmp_path) as prep:
        if prep.argv is None:
            pytest.skip("no command-line form for this case (the CLI's retry waits would make it slow)")
        assert _cli_has(prep.argv[0]), f"the spinemets command line has no '{prep.argv[0]}' command"
        done = subprocess.run([str(_cli()), *prep.argv], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert case["error"] in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert _leftovers(tmp_path, prep.absent) == []
