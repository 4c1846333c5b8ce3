"""The machinery of the command-line fuzzer (tests/test_fuzz.py): run, check, read back, record.

A fuzz *case* is one ``spinemets`` command line over inputs written into a fresh folder. This
module runs it in-process (:func:`run_cli`) and checks the invariant every case must keep
(:func:`check_case`):

1. ``main(argv)`` returns 0 and an independent reader confirms the output (the case's
   ``reference`` callable), or it returns 2 and stderr holds exactly one line
   ``spinemets: error: PATH: what is wrong`` whose PATH is one of the case's paths (for a bad
   option value, ``--OPTION: what is wrong``, naming an option of the command line). Other stderr
   lines may only be log lines or progress bars; a ``Traceback``, an escaped exception or any
   other exit status is a failure.
2. Either way: no ``.partial-`` entry is left anywhere in the case folder, nothing outside the
   output path changes (the inputs are byte-identical), and after a failure an output path that
   did not exist before does not exist (a command that keeps complete results for its next try,
   like fetch's verified files after a network failure, says what it may keep:
   ``Case.kept_after_failure``).

The reference readers here do not go through SimpleITK wherever another reader exists (the
command itself reads with SimpleITK): pynrrd for NRRD and ``.seg.nrrd`` (decoded by
:func:`decode_segmentation`, which applies the import rules of the book's data chapter on its
own), nibabel for NIfTI; MHA files and DICOM series are read with SimpleITK. A reader raises
:class:`Invalid` when the *input* breaks a rule of the project (so that exit status 0 is wrong)
and :class:`Mismatch` when the output differs from what the input says.

:class:`Survey` counts the generated and passed cases per command and keeps, per failure
signature, the smallest examples; :func:`write_report` stores them as JSON under /tmp.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import hashlib
import io
import json
import os
import re
import signal
import stat
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ERROR_PREFIX = "spinemets: error: "
PARTIAL_PREFIX = ".partial-"
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
STATS_PATH = Path("/tmp/spinemets_fuzz_stats.json")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_SPACE_TO_RAS = {
    "left-posterior-superior": LPS_TO_RAS,
    "right-anterior-superior": np.eye(3),
    "left-anterior-superior": np.diag([-1.0, 1.0, 1.0]),
}
_LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
_PROGRESS_LINE = re.compile(r"\d+%\||\[\d\d:\d\d|\d+(\.\d+)?[kMG]?(B|it|case)/s")


class Invalid(Exception):
    """The input breaks a rule of the project: the command must refuse it (exit status 2)."""


class Mismatch(Exception):
    """The command's output differs from what an independent reader makes of the input."""


class CaseTimeout(BaseException):
    """A case ran longer than its limit (a BaseException, so that ``except Exception`` cannot hide it)."""


# ---------------------------------------------------------------------------------------------
# running the command line


@dataclass
class Outcome:
    """What one in-process run of ``spinemets.cli.main`` gave."""

    rc: int | None
    stdout: str
    stderr: str
    escaped: str | None  # "Type: message\n<last frames>" of an exception that left main()
    seconds: float
    warnings: list[str] = field(default_factory=list)  # Python warnings the run emitted (a user sees them)
    native_stderr: str = ""  # what C/C++ code (ITK, GDCM) wrote to file descriptor 2 during the run


def run_cli(argv: list[str], cwd: Path, timeout_s: float = 90.0) -> Outcome:
    """Run ``main(argv)`` in ``cwd`` with stdout and stderr captured; argparse exits become return codes.

    Python warnings, and what native code (ITK, GDCM) writes to file descriptor 2, are recorded
    apart: they are reported beside the failures (a user of the command would see them on
    stderr) without counting against the invariant.
    """
    import tempfile
    import warnings

    from spinemets.cli import main

    out, err = io.StringIO(), io.StringIO()
    rc, escaped = None, None
    old_cwd = os.getcwd()
    start = time.monotonic()

    def _alarm(signum, frame):
        raise CaseTimeout(f"the case ran longer than {timeout_s:g} s")

    previous = signal.signal(signal.SIGALRM, _alarm)
    native = tempfile.TemporaryFile()
    sys.stderr.flush()
    saved_fd = os.dup(2)
    os.dup2(native.fileno(), 2)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                rc = main(list(argv))
            except SystemExit as exc:
                rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - every escape is a finding
        frames = traceback.extract_tb(exc.__traceback__)
        where = "; ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-3:])
        escaped = f"{type(exc).__name__}: {str(exc)[:300]}\n  at {where}"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(old_cwd)
        os.dup2(saved_fd, 2)
        os.close(saved_fd)
    native.seek(0)
    native_text = native.read().decode("utf-8", "replace")
    native.close()
    seen = [f"{w.category.__name__}: {str(w.message)[:160]} ({Path(w.filename).name}:{w.lineno})" for w in caught]
    return Outcome(rc, out.getvalue(), err.getvalue(), escaped, time.monotonic() - start, sorted(set(seen)),
                   native_text)


# ---------------------------------------------------------------------------------------------
# snapshots of a case folder


def snapshot(root: Path, exclude: list[Path]) -> dict[str, tuple]:
    """Every entry below ``root`` except ``exclude`` (and what lies below them): kind and content hash.

    Links are recorded as links (their target text), never followed, so a dangling link is an
    entry like any other.
    """
    skip = {os.path.normpath(str(p)) for p in exclude}
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            if os.path.normpath(path) in skip:
                if name in dirnames:
                    dirnames.remove(name)
                continue
            rel = os.path.relpath(path, root)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                entries[rel] = ("link", os.readlink(path))
            elif stat.S_ISDIR(mode):
                entries[rel] = ("dir",)
            elif not stat.S_ISREG(mode):
                entries[rel] = ("special", stat.S_IFMT(mode))
            else:
                try:
                    with open(path, "rb") as fh:
                        entries[rel] = ("file", hashlib.sha256(fh.read()).hexdigest())
                except OSError as exc:
                    entries[rel] = ("unreadable", type(exc).__name__)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return entries


def fifos_below(root: Path) -> list[Path]:
    """Named pipes below ``root`` (a case may use one where a file is expected)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        found += [Path(dirpath, n) for n in filenames if stat.S_ISFIFO(os.lstat(os.path.join(dirpath, n)).st_mode)]
    return found


@contextlib.contextmanager
def feeding(fifos: list[Path], data: bytes = b"not an image, a manifest or a mapping\n"):
    """While the block runs, answer every reader of each named pipe with ``data`` and an end of file,
    so that a command that reads a pipe where a file is expected gets garbage instead of hanging."""
    stop = threading.Event()

    def feed(path: Path) -> None:
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # no reader yet (ENXIO), or the pipe is gone
                stop.wait(0.005)
                continue
            try:
                os.write(fd, data)
            except OSError:
                pass
            finally:
                os.close(fd)
            stop.wait(0.05)

    threads = [threading.Thread(target=feed, args=(p,), daemon=True) for p in fifos]
    for thread in threads:
        thread.start()
    try:
        yield
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=5)


def partial_leftovers(root: Path) -> list[str]:
    """Entries below ``root`` whose name starts with ``.partial-``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        found += [os.path.relpath(os.path.join(dirpath, n), root) for n in dirnames + filenames
                  if n.startswith(PARTIAL_PREFIX)]
    return sorted(found)


def _diff(before: dict, after: dict, limit: int = 4) -> str:
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    parts = []
    for key in changed[:limit]:
        was, now = before.get(key), after.get(key)
        what = "appeared" if was is None else "vanished" if now is None else "changed"
        parts.append(f"{key!r} {what}")
    return ", ".join(parts) + (f" (+{len(changed) - limit} more)" if len(changed) > limit else "")


# ---------------------------------------------------------------------------------------------
# a case and the invariant


@dataclass
class Case:
    """One command line over the inputs written into ``root``.

    ``out`` is the command's output path; ``given`` holds further path strings that belong to
    the case (paths written into a manifest, link targets ...; the absolute paths of ``argv``
    count too, option names and values do not); ``url_prefix`` is the address of
    a local server the case talks to (its URLs count as the case's paths); ``reference(case)``
    checks the output of a successful run and raises :class:`Invalid` or :class:`Mismatch`.
    """

    command: str
    root: Path
    argv: list[str]
    out: Path
    reference: Callable[["Case"], None]
    given: set[str] = field(default_factory=set)
    url_prefix: str | None = None
    notes: dict = field(default_factory=dict)
    #: For a command that may keep complete results after a failure (fetch keeps verified files
    #: for the next try): returns why what is left in a new ``out`` is not acceptable, or None.
    kept_after_failure: Callable[["Case"], str | None] | None = None

    def is_case_path(self, text: str, existed: set[str] = frozenset()) -> bool:
        """Whether ``text`` names a path of this case: a given path or one below it, an entry of
        the case folder (now, or ``existed`` before the run, relative), or a URL of its server.

        A path holding control characters may be named in escaped form (``\\t``, ``\\n``,
        ``\\x7f``), which is how it fits on one line.
        """
        if not text:
            return False
        plain = _unescape(text)
        if plain != text and self.is_case_path(plain, existed):
            return True
        given = self.given | {a for a in self.argv if os.path.isabs(a)}  # path arguments, not option names
        if text in given:
            return True
        if self.url_prefix and text.startswith(self.url_prefix):
            return True
        root = os.path.normpath(str(self.root))
        norm = os.path.normpath(text if os.path.isabs(text) else os.path.join(root, text))
        if not (norm == root or norm.startswith(root + os.sep)):
            return False
        if os.path.lexists(norm) or os.path.relpath(norm, root) in existed:
            return True
        bases = [os.path.normpath(g) for g in given if os.path.isabs(g)]
        return any(norm.startswith(b + os.sep) for b in bases if b != root)


_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|[tnr\\])")


def _unescape(text: str) -> str:
    """``text`` with backslash escapes of control characters (``\\t``, ``\\n``, ``\\xHH``, ``\\\\``) undone."""
    def one(match: re.Match) -> str:
        code = match.group(1)
        return {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}.get(code) or chr(int(code[1:], 16))

    return _ESCAPE.sub(one, text)


@dataclass
class Result:
    """The verdict on one case: ``problems`` is empty when the invariant held."""

    case: Case
    outcome: Outcome
    problems: list[str]

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def signature(self) -> str:
        """A short key for grouping failures: the first problem, with case-specific text removed."""
        if not self.problems:
            return "passed"
        text = self.problems[0]
        text = text.replace(str(self.case.root), "<case>")
        if self.case.url_prefix:
            text = text.replace(self.case.url_prefix, "<server>")
        text = re.sub(r"\.partial-[0-9a-f]{8}-", ".partial-…-", text)
        text = re.sub(r"(.)\1{15,}", r"\1…", text)  # the long names some cases use
        text = re.sub(r"0x[0-9a-f]+|\b\d+(\.\d+)?\b", "N", text)
        text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", text)
        return f"{self.case.command}: {text[:160]}"


def error_line_problem(case: Case, stderr: str, existed: set[str] = frozenset()) -> str | None:
    """What is wrong with stderr after exit status 2, or None when it holds one proper error line."""
    lines = re.split(r"\r\n|\r|\n", stderr)
    errors = [ln for ln in lines if ln.startswith(ERROR_PREFIX)]
    if len(errors) != 1:
        return f"rc 2 with {len(errors)} error lines"
    stray = [ln for ln in lines if ln.strip() and not ln.startswith(ERROR_PREFIX)
             and not _LOG_LINE.match(ln) and not _PROGRESS_LINE.search(ln)]
    if stray:
        return f"stray stderr line after the error (a multi-line message?): {stray[0][:120]!r}"
    rest = errors[0][len(ERROR_PREFIX):]
    option = re.match(r"(--[a-z][a-z0-9-]*): ", rest)
    if option and any(a == option.group(1) or a.startswith(option.group(1) + "=") for a in case.argv):
        return None  # a bad option value names the option the user gave
    for match in re.finditer(": ", rest):
        if case.is_case_path(rest[: match.start()], existed):
            return None
    return f"error line does not start with a path of the case: {errors[0][:200]!r}"


def check_case(case: Case, timeout_s: float = 90.0) -> Result:
    """Run the case and check the invariant (see the module docstring)."""
    out_existed = os.path.lexists(case.out)
    before = snapshot(case.root, [case.out])
    with feeding(fifos_below(case.root)):
        outcome = run_cli(case.argv, case.root, timeout_s)
    problems: list[str] = []
    if outcome.escaped:
        problems.append(f"exception escaped main(): {outcome.escaped}")
    elif "Traceback" in outcome.stderr:
        tail = [ln for ln in outcome.stderr.splitlines() if ln.strip()][-1:]
        problems.append(f"Traceback on stderr (rc {outcome.rc}): {tail[0][:200] if tail else ''}")
    elif outcome.rc == 0:
        try:
            case.reference(case)
        except Invalid as exc:
            problems.append(f"rc 0 on invalid input: {exc}")
        except Mismatch as exc:
            problems.append(f"rc 0 but the output is wrong: {exc}")
        except Exception as exc:  # noqa: BLE001 - a reference reader that cannot read the output
            problems.append(f"rc 0 but the output cannot be read back: {type(exc).__name__}: {str(exc)[:200]}")
    elif outcome.rc == 2:
        problem = error_line_problem(case, outcome.stderr, set(before))
        if problem:
            problems.append(problem)
    else:
        line = next((ln for ln in outcome.stderr.splitlines() if ln.startswith(ERROR_PREFIX)), "")
        problems.append(f"exit status {outcome.rc}: {line[:200]!r}")
    leftovers = partial_leftovers(case.root)
    if leftovers:
        problems.append(f"{PARTIAL_PREFIX} entries left behind: {leftovers[:3]}")
    after = snapshot(case.root, [case.out])
    created = _created_parents(case, before, after)
    kept = (outcome.rc == 2 and not out_existed and os.path.lexists(case.out)
            and case.kept_after_failure is not None and case.kept_after_failure(case) is None)
    if created and outcome.rc != 0 and not kept:  # a kept output keeps the folders above it
        problems.append(f"rc {outcome.rc} left the new parent folder(s) of --out behind: {created[:2]}")
    for rel in created:
        del after[rel]
    if after != before:
        problems.append(f"inputs changed or something was written outside --out: {_diff(before, after)}")
    if outcome.rc == 2 and not out_existed and os.path.lexists(case.out):
        why = (case.kept_after_failure(case) if case.kept_after_failure is not None
               else "half-written output or an empty folder")
        if why:
            problems.append(f"the output path exists after a failure ({why})")
    return Result(case, outcome, problems)


def _created_parents(case: Case, before: dict, after: dict) -> list[str]:
    """Folders on the way to --out that the run created (making the parents of an output is allowed)."""
    created = []
    parent = Path(os.path.normpath(str(case.out))).parent
    root = Path(os.path.normpath(str(case.root)))
    while parent != root and root in parent.parents:
        rel = os.path.relpath(parent, root)
        if after.get(rel) == ("dir",) and rel not in before:
            created.append(rel)
        parent = parent.parent
    return created


# ---------------------------------------------------------------------------------------------
# counting


class Survey:
    """Generated and passed cases of one command, and the failures grouped by signature."""

    def __init__(self, command: str, keep: int = 3):
        self.command = command
        self.generated = 0
        self.passed = 0
        self.keep = keep
        self.failures: dict[str, dict] = {}
        self.warnings: dict[str, dict] = {}
        self.native: dict[str, dict] = {}
        self.started = time.monotonic()
        self._digest = hashlib.sha256()  # of every recipe, in order: equal digests, equal cases

    def add(self, recipe, result: Result) -> None:
        self.generated += 1
        self._digest.update(repr(recipe).encode("utf-8", "surrogateescape") + b"\n")
        for warning in result.outcome.warnings:
            entry = self.warnings.setdefault(re.sub(r"\d+", "N", warning), {"count": 0, "recipe": repr(recipe)})
            entry["count"] += 1
        native = [ln.strip() for ln in result.outcome.native_stderr.splitlines() if ln.strip()]
        if native:
            key = re.sub(r"0x[0-9a-f]+|\d+", "N", native[0].replace(str(result.case.root), "<case>"))[:160]
            entry = self.native.setdefault(key, {"count": 0, "recipe": repr(recipe), "lines": native[:6]})
            entry["count"] += 1
        if result.passed:
            self.passed += 1
            return
        entry = self.failures.setdefault(result.signature, {"count": 0, "examples": []})
        entry["count"] += 1
        example = {
            "recipe": repr(recipe),
            "argv": [a.replace(str(result.case.root), "<case>") for a in result.case.argv],
            "rc": result.outcome.rc,
            "problems": [p.replace(str(result.case.root), "<case>") for p in result.problems],
            "stderr_tail": _stderr_tail(result),
            "notes": result.case.notes,
        }
        entry["examples"].append(example)
        entry["examples"].sort(key=lambda e: len(e["recipe"]))
        del entry["examples"][self.keep:]

    def summary(self) -> dict:
        return {"generated": self.generated, "passed": self.passed, "failed": self.generated - self.passed,
                "seconds": round(time.monotonic() - self.started, 1), "recipes_sha256": self._digest.hexdigest(),
                "failure_classes": {k: v for k, v in sorted(self.failures.items(), key=lambda kv: -kv[1]["count"])},
                "python_warnings": self.warnings, "native_stderr": self.native}

    def report(self, limit: int = 12) -> str:
        lines = [f"{self.command}: {self.generated - self.passed} of {self.generated} generated cases broke the invariant"]
        for signature, entry in sorted(self.failures.items(), key=lambda kv: -kv[1]["count"])[:limit]:
            example = entry["examples"][0]
            lines.append(f"  [{entry['count']}x] {signature}")
            lines.append(f"      recipe: {example['recipe'][:300]}")
            lines.append(f"      argv: {' '.join(example['argv'])[:300]}")
            lines.append(f"      rc {example['rc']}: {example['problems'][0][:300]}")
        if len(self.failures) > limit:
            lines.append(f"  ... and {len(self.failures) - limit} more failure classes (see {STATS_PATH})")
        return "\n".join(lines)


def _stderr_tail(result: Result) -> list[str]:
    text = result.outcome.stderr.replace(str(result.case.root), "<case>")
    lines = [ln for ln in re.split(r"\r\n|\r|\n", text) if ln.strip() and not _PROGRESS_LINE.search(ln)]
    tail = lines[-4:]
    if result.outcome.escaped:
        tail.append("escaped: " + result.outcome.escaped.replace(str(result.case.root), "<case>"))
    return tail


def write_report(survey: Survey, run: str, path: Path = STATS_PATH) -> None:
    """Merge one command's survey into the JSON report under /tmp (keyed by run and command)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        data = {}
    data.setdefault(run, {})[survey.command] = survey.summary()
    totals = {"generated": 0, "passed": 0}
    for name, entry in data[run].items():
        if name != "total":
            totals["generated"] += entry["generated"]
            totals["passed"] += entry["passed"]
    data[run]["total"] = totals
    path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# NRRD files as editable text headers


class NrrdText:
    """An NRRD file split into its header lines and its data bytes, to edit the header as text.

    Fields are ``name: value`` lines, key/value pairs ``key:=value`` lines (3D Slicer keeps its
    segment metadata there); the data follow the first empty line.
    """

    def __init__(self, lines: list[str], data: bytes):
        self.lines = lines
        self.data = data

    @classmethod
    def read(cls, path: Path) -> "NrrdText":
        raw = Path(path).read_bytes()
        end = raw.index(b"\n\n")
        return cls(raw[:end].decode("latin-1").split("\n"), raw[end + 2:])

    def write(self, path: Path) -> None:
        Path(path).write_bytes("\n".join(self.lines).encode("latin-1", "replace") + b"\n\n" + self.data)

    def header_length(self) -> int:
        return len("\n".join(self.lines).encode("latin-1", "replace")) + 1

    def _index(self, name: str, sep: str) -> int | None:
        for i, line in enumerate(self.lines):
            if line.startswith(name + sep):
                return i
        return None

    def field(self, name: str) -> str | None:
        return self._get(name, ": ")

    def set_field(self, name: str, value: str | None) -> None:
        """Replace a field (or add it before the key/value pairs); ``None`` deletes it."""
        first_kv = next((j for j, ln in enumerate(self.lines) if ":=" in ln), len(self.lines))
        self._set(name, ": ", value, first_kv)

    def keyvalue(self, key: str) -> str | None:
        return self._get(key, ":=")

    def set_keyvalue(self, key: str, value: str | None) -> None:
        """Replace a key/value pair (or append it); ``None`` deletes it."""
        self._set(key, ":=", value, len(self.lines))

    def _get(self, name: str, sep: str) -> str | None:
        i = self._index(name, sep)
        return None if i is None else self.lines[i][len(name) + len(sep):]

    def _set(self, name: str, sep: str, value: str | None, insert_at: int) -> None:
        i = self._index(name, sep)
        if value is None:
            if i is not None:
                del self.lines[i]
        elif i is not None:
            self.lines[i] = f"{name}{sep}{value}"
        else:
            self.lines.insert(insert_at, f"{name}{sep}{value}")

    def keys(self) -> list[str]:
        return [ln.split(":=", 1)[0] for ln in self.lines if ":=" in ln]

    def vectors(self) -> tuple[list[str | None], list[float] | None]:
        """The space directions (``None`` for a ``none`` axis) and origin, parsed from the text."""
        dirs = []
        for token in (self.field("space directions") or "").split():
            dirs.append(None if token == "none" else token)
        origin = self.field("space origin")
        return dirs, origin

    @staticmethod
    def parse_vector(token: str) -> list[float]:
        return [float(v) for v in token.strip("()").split(",")]

    @staticmethod
    def format_vector(values) -> str:
        return "(" + ",".join(repr(float(v)) if not float(v).is_integer() else str(int(v)) if abs(v) < 1e15
                              else repr(float(v)) for v in values) + ")"


NRRD_TYPES = {"int8": "int8", "uint8": "uint8", "int16": "int16", "uint16": "uint16", "int32": "int32",
              "uint32": "uint32", "int64": "int64", "uint64": "uint64", "float32": "float", "float64": "double"}


def replace_nrrd_data(doc: NrrdText, array: np.ndarray, compress: bool | None = None) -> None:
    """Give ``doc`` new voxel data (``array`` in NRRD axis order, fastest first), keeping the geometry text."""
    array = np.asarray(array)
    dtype = array.dtype.newbyteorder("<") if array.dtype.itemsize > 1 else array.dtype
    raw = np.asarray(array, dtype=dtype).tobytes(order="F")
    if compress is None:
        compress = doc.field("encoding") == "gzip"
    doc.set_field("type", NRRD_TYPES[array.dtype.name])
    doc.set_field("dimension", str(array.ndim))
    doc.set_field("sizes", " ".join(str(s) for s in array.shape))
    doc.set_field("encoding", "gzip" if compress else "raw")
    doc.set_field("endian", "little" if array.dtype.itemsize > 1 else None)
    doc.data = gzip.compress(raw, mtime=0) if compress else raw


# ---------------------------------------------------------------------------------------------
# reference readers


@dataclass
class Grid:
    """Voxel grid in RAS: ``matrix`` columns are the axis vectors (spacing included), ``origin`` the first voxel."""

    shape: tuple[int, ...]
    matrix: np.ndarray
    origin: np.ndarray

    def check_sane(self, what: str) -> None:
        """Raise :class:`Invalid` unless the grid is finite, non-degenerate and orthogonal."""
        if not (np.isfinite(self.matrix).all() and np.isfinite(self.origin).all()):
            raise Invalid(f"{what}: non-finite voxel geometry")
        spacing = np.linalg.norm(self.matrix, axis=0)
        if (spacing <= 0).any() or not np.isfinite(1.0 / spacing).all():
            raise Invalid(f"{what}: zero voxel spacing")
        unit = self.matrix / spacing
        if not np.allclose(unit.T @ unit, np.eye(3), atol=1e-4):
            raise Invalid(f"{what}: axis directions are not orthogonal")
        if 0 in self.shape:
            raise Invalid(f"{what}: an axis has size 0")

    def same_as(self, other: "Grid", what: str) -> None:
        """Raise :class:`Mismatch` unless both grids have one shape, spacing, directions and origin."""
        if tuple(self.shape) != tuple(other.shape):
            raise Mismatch(f"{what}: shape {tuple(other.shape)} instead of {tuple(self.shape)}")
        if not np.allclose(self.matrix, other.matrix, atol=1e-4, rtol=1e-5):
            raise Mismatch(f"{what}: axes {np.round(other.matrix, 4).tolist()} instead of "
                           f"{np.round(self.matrix, 4).tolist()}")
        if not np.allclose(self.origin, other.origin, atol=1e-3, rtol=1e-6):
            raise Mismatch(f"{what}: origin {np.round(other.origin, 4).tolist()} instead of "
                           f"{np.round(self.origin, 4).tolist()}")


def read_nrrd(path: Path, what: str) -> tuple[np.ndarray, dict]:
    """pynrrd's array (NRRD axis order) and header; an unreadable file is :class:`Invalid`."""
    import nrrd

    try:
        with _quiet_warnings():
            return nrrd.read(str(path))
    except Exception as exc:  # noqa: BLE001 - pynrrd raises several types for damaged files
        raise Invalid(f"{what}: pynrrd cannot read it ({type(exc).__name__}: {str(exc)[:120]})") from None


def nrrd_grid(header: dict, shape: tuple[int, ...], what: str) -> Grid:
    """The RAS grid of the domain axes of an NRRD header (``none`` axes, such as layers, skipped)."""
    space = header.get("space")
    if space not in _SPACE_TO_RAS:
        raise Invalid(f"{what}: space {space!r} is not one the reference reader interprets")
    directions = header.get("space directions")
    if directions is None:
        raise Invalid(f"{what}: no space directions")
    directions = np.asarray(directions, dtype=float)
    domain = [i for i, row in enumerate(directions) if not np.isnan(row).all()]
    if len(domain) != 3 or directions.shape[1] != 3:
        raise Invalid(f"{what}: {len(domain)} spatial axes of {directions.shape[1]} components; expected 3-D")
    origin = header.get("space origin")
    if origin is None:
        raise Invalid(f"{what}: no space origin")
    frame = _SPACE_TO_RAS[space]
    matrix = frame @ directions[domain].T
    grid = Grid(tuple(int(shape[i]) for i in domain), matrix, frame @ np.asarray(origin, dtype=float))
    return grid


def read_nifti(path: Path, what: str) -> tuple[np.ndarray, Grid]:
    """nibabel's voxel array (x, y, z, unscaled when no scaling is set) and RAS grid."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        array = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=float)
    except Exception as exc:  # noqa: BLE001
        raise Invalid(f"{what}: nibabel cannot read it ({type(exc).__name__}: {str(exc)[:120]})") from None
    if array.ndim != 3:
        raise Invalid(f"{what}: {array.ndim}-D voxel array")
    return array, Grid(array.shape, affine[:3, :3], affine[:3, 3])


def read_with_sitk(path: Path, what: str, series: bool = False, series_uid: str | None = None
                   ) -> tuple[np.ndarray, Grid]:
    """SimpleITK's view of an MHA file or DICOM series (the one, or ``series_uid``), as an (x, y, z)
    array and RAS grid."""
    import SimpleITK as sitk

    try:
        if series:
            reader = sitk.ImageSeriesReader()
            uids = reader.GetGDCMSeriesIDs(str(path))
            if series_uid is None and len(uids) != 1:
                raise Invalid(f"{what}: {len(uids)} DICOM series")
            if series_uid is not None and series_uid not in uids:
                raise Invalid(f"{what}: no DICOM series {series_uid}")
            reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(path), series_uid or uids[0]))
            image = reader.Execute()
        else:
            image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise Invalid(f"{what}: SimpleITK cannot read it ({str(exc).strip().splitlines()[-1][:120]})") from None
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise Invalid(f"{what}: not a 3-D scalar image")
    array = sitk.GetArrayFromImage(image).transpose(2, 1, 0)
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    return array, Grid(array.shape, matrix, LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=float))


def read_image_reference(path: Path, what: str, series_uid: str | None = None) -> tuple[np.ndarray, Grid]:
    """Voxels (x, y, z) and grid of an image file by its suffix: pynrrd, nibabel or SimpleITK (MHA, DICOM)."""
    path = Path(path)
    name = path.name.lower()
    if path.is_dir():
        return read_with_sitk(path, what, series=True, series_uid=series_uid)
    if not path.is_file():
        raise Invalid(f"{what}: no such file (or a dangling link)")
    if name.endswith(".nrrd"):
        array, header = read_nrrd(path, what)
        if array.ndim != 3:
            raise Invalid(f"{what}: {array.ndim}-D voxel array")
        return array, nrrd_grid(header, array.shape, what)
    if name.endswith((".nii", ".nii.gz")):
        return read_nifti(path, what)
    return read_with_sitk(path, what)


def check_ct(array: np.ndarray, grid: Grid, what: str) -> None:
    """A CT must be a 3-D numeric volume with finite voxels on a sane grid."""
    if array.ndim != 3 or array.size == 0:
        raise Invalid(f"{what}: not a non-empty 3-D volume")
    if array.dtype.kind not in "iuf":
        raise Invalid(f"{what}: voxel type {array.dtype}")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise Invalid(f"{what}: {int((~np.isfinite(array)).sum())} non-finite voxel(s)")
    grid.check_sane(what)


def same_voxels(expected: np.ndarray, got: np.ndarray, what: str) -> None:
    if expected.shape != got.shape:
        raise Mismatch(f"{what}: shape {got.shape} instead of {expected.shape}")
    if not np.array_equal(np.asarray(expected), np.asarray(got)):
        diff = int(np.sum(np.asarray(expected) != np.asarray(got)))
        raise Mismatch(f"{what}: {diff} voxel(s) differ from the source")


# ---------------------------------------------------------------------------------------------
# segment names, by the project's label tables


def _normalise(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def label_of_name(name: str, stage: str) -> int | None:
    """Label value of a segment or label name by the stage's table (a few common spellings), or None."""
    from spinemets.labels import STAGES

    table = STAGES[stage]["labels"]
    key = _normalise(name)
    if stage == "vertebrae":
        for label, value in table.items():
            if value and key in (label.lower(), f"vertebra {label.lower()}", f"vertebrae {label.lower()}"):
                return value
        return None
    key = re.sub(r"\s*\d+$", "", key)
    if key in ("lytic", "osteolytic"):
        return table["lytic"]
    if key in ("sclerotic", "blastic", "osteoblastic", "osteosclerotic"):
        return table["sclerotic"]
    return None


def resolve_name(name: str, stage: str, mapping: dict | None, what: str) -> int | None:
    """Label of a segment name: the user mapping first (exact, then normalised), then the table; 0 = ignored."""
    if mapping:
        for key, target in mapping.items():
            if isinstance(key, str) and (key == name or _normalise(key) == _normalise(name)):
                if target is None:
                    return 0
                label = label_of_name(str(target), stage)
                if label is None:
                    raise Invalid(f"{what}: mapping sends {name!r} to {target!r}, not a label of {stage}")
                return label
    label = label_of_name(name, stage)
    if label is None:
        raise Invalid(f"{what}: segment name {name!r} is not a {stage} label")
    return label


# ---------------------------------------------------------------------------------------------
# 3D Slicer segmentations, decoded with pynrrd


def read_segments(header: dict, n_layers: int, what: str) -> list[dict]:
    """The segments of a ``.seg.nrrd`` header, checked: unique IDs, a Name, a positive LabelValue, a Layer that exists."""
    indices = sorted({int(m.group(1)) for key in header for m in [re.match(r"Segment(\d+)_", key)] if m})
    if not indices:
        return []
    segments, ids = [], set()
    for n in indices:
        fields = {key[len(f"Segment{n}_"):]: value for key, value in header.items()
                  if key.startswith(f"Segment{n}_")}
        seg_id, name = fields.get("ID"), fields.get("Name")
        if seg_id:  # an ID may be missing (the segment is still its layer and label value), not doubled
            if seg_id in ids:
                raise Invalid(f"{what}: segment ID {seg_id!r} is used twice")
            ids.add(seg_id)
        if name is None or not name.strip():
            raise Invalid(f"{what}: segment {n} has no name")
        try:
            label_value = int(fields["LabelValue"])
            layer = int(fields.get("Layer", "0"))
        except (KeyError, ValueError):
            raise Invalid(f"{what}: segment {n} has no integer LabelValue/Layer") from None
        if label_value <= 0:
            raise Invalid(f"{what}: segment {n} has label value {label_value}")
        if not 0 <= layer < n_layers:
            raise Invalid(f"{what}: segment {n} lies in layer {layer} of {n_layers}")
        segments.append({"id": seg_id, "name": name, "labelValue": label_value, "layer": layer})
    keys = [(s["layer"], s["labelValue"]) for s in segments]
    if len(set(keys)) != len(keys):
        raise Invalid(f"{what}: two segments share one (layer, label value)")
    return segments


def decode_segmentation(path: Path, target: Grid, stage: str, mapping: dict | None, what: str) -> np.ndarray:
    """Label map (x, y, z, uint8) of a ``.seg.nrrd`` on the grid ``target``, by the book's import rules.

    Segments are (layer, label value) pairs named by ``Segment{N}_*`` header keys; the file may be
    cropped and is placed by the offset of its origin; every segment voxel must fall inside the
    target; where labels overlap the smaller segment wins (equal size: the higher label).
    """
    if not Path(path).is_file():
        raise Invalid(f"{what}: no such file (or a dangling link)")
    voxels, header = read_nrrd(path, what)
    if voxels.ndim == 3:
        layers = voxels[np.newaxis]
    elif voxels.ndim == 4:
        directions = np.asarray(header.get("space directions", []), dtype=float)
        if directions.ndim != 2 or not np.isnan(directions[0]).all():
            raise Invalid(f"{what}: 4-D voxels whose first axis is not the layer axis")
        layers = voxels
    else:
        raise Invalid(f"{what}: {voxels.ndim}-D voxels")
    if layers.dtype.kind not in "iu":
        raise Invalid(f"{what}: voxel type {layers.dtype}; label values are integers")
    grid = nrrd_grid(header, voxels.shape, what)
    grid.check_sane(what)
    if not np.allclose(grid.matrix, target.matrix, rtol=1e-3, atol=1e-3):
        raise Invalid(f"{what}: voxel axes differ from the grid it belongs to")
    offset = np.linalg.solve(target.matrix, grid.origin - target.origin)
    if not np.allclose(offset, np.round(offset), atol=1e-2):
        raise Invalid(f"{what}: origin lies between voxels of the grid it belongs to")
    offset = np.round(offset).astype(int)
    segments = read_segments(header, layers.shape[0], what)
    if not segments and layers.any():
        raise Invalid(f"{what}: labelled voxels but no segment metadata (a plain label map under a .seg.nrrd name?)")
    per_label: dict[int, np.ndarray] = {}
    for segment in segments:
        label = resolve_name(segment["name"], stage, mapping, what)
        if not label:
            continue
        mask = layers[segment["layer"]] == segment["labelValue"]
        per_label[label] = per_label[label] | mask if label in per_label else mask
    out = np.zeros(target.shape, dtype=np.uint8)
    union = np.logical_or.reduce(list(per_label.values())) if per_label else None
    if union is not None and union.any():
        idx = np.argwhere(union)
        lo, hi = idx.min(axis=0) + offset, idx.max(axis=0) + offset
        if (lo < 0).any() or (hi >= np.array(target.shape)).any():
            raise Invalid(f"{what}: segment voxels outside the grid it belongs to")
        for label in sorted(per_label, key=lambda lab: (-int(per_label[lab].sum()), lab)):
            out[tuple((np.argwhere(per_label[label]) + offset).T)] = label
    return out


@contextlib.contextmanager
def _quiet_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def load_yaml_mapping(path: Path) -> dict | None:
    """The mapping file as the reference understands it; anything but a plain mapping is :class:`Invalid`."""
    import yaml

    if not Path(path).is_file():
        raise Invalid(f"{path}: mapping file is not a regular file")
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001
        raise Invalid(f"{path}: mapping file unreadable ({type(exc).__name__})") from None
    if not isinstance(data, dict):
        raise Invalid(f"{path}: mapping file is not a mapping")
    for key, value in data.items():
        if not isinstance(key, (str, int)) or isinstance(key, bool):
            raise Invalid(f"{path}: mapping key {key!r}")
        if value is not None and not isinstance(value, str):
            raise Invalid(f"{path}: mapping value {value!r}")
    return data


def print_line(text: str) -> None:
    """Write a line to the real stdout (past pytest's capture), for the per-command counts."""
    sys.__stdout__.write(text + "\n")
    sys.__stdout__.flush()
