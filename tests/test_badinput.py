"""Run every case of the bad-input corpus (tests/badinput/*.yaml).

Each case must raise :class:`SpinemetsError` whose message contains the case's ``error``, leave no
temporary (``.partial-``) file and none of the outputs it lists; through the command line it must
exit non-zero and print that message.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import fuzzing
from badinput.builders import BUILDERS, Context
from spinemets.errors import SpinemetsError
from spinemets.fileio import PARTIAL_PREFIX

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


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_bad_input_cli(case, tmp_path):
    """Every case through the command line's ``main``, in this process (as the fuzzer runs it):
    a non-zero exit, the message on stderr, no traceback, no escaped exception, no leftovers."""
    with prepared(case, tmp_path) as prep:
        if prep.argv is None:
            pytest.skip("no command-line form for this case (the CLI's retry waits would make it slow)")
        done = fuzzing.run_cli(prep.argv, cwd=Path.cwd(), timeout_s=120)
    assert done.escaped is None, done.escaped
    assert done.rc not in (0, None), (done.rc, done.stderr)
    assert case["error"] in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert _leftovers(tmp_path, prep.absent) == []


#: Each area of the corpus also runs as a real process, with its first case that has a
#: command-line form: the installed ``spinemets`` program's exit status and stderr, as a shell sees
#: them (the in-process runs above check the same messages for every case).
AREAS = sorted({c["area"] for c in CASES})


@pytest.mark.parametrize("area", AREAS)
def test_bad_input_through_the_installed_program(area, tmp_path):
    exe = _cli()
    assert exe is not None, "the spinemets program is not installed beside this Python or on PATH"
    for n, case in enumerate(c for c in CASES if c["area"] == area):
        folder = tmp_path / str(n)
        folder.mkdir()
        with prepared(case, folder) as prep:
            if prep.argv is None:
                continue
            done = subprocess.run([str(exe), *prep.argv], capture_output=True, text=True, timeout=120)
        break
    else:
        pytest.skip(f"no case of area {area} has a command-line form")
    assert done.returncode == 2, (case["id"], done.returncode, done.stderr)
    assert case["error"] in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1].startswith("spinemets: error: ") and "Traceback" not in done.stderr
    assert _leftovers(folder, prep.absent) == []
