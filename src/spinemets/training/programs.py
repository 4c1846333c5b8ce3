"""Running nnU-Net's programs: where their output goes, their process groups, and the CPU settings of training.

nnU-Net's console scripts are found beside this Python first (:func:`program_path`) and run with a
workspace's environment (:func:`run_nnunet`); their output goes to the console or, with
:data:`TOOL_OUTPUT_ENV` ``log``, into files under the workspace's ``logs/`` (:func:`captured_output`
for what nnU-Net prints in this process, :func:`log_block` to show a log's last lines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from spinemets.errors import SpinemetsError
from spinemets.paths import Workspace

log = logging.getLogger(__name__)




def program_path(name: str, install_hint: str = "is nnunetv2 installed?") -> str:
    """Path of a console script (nnU-Net's, or another tool's run like them): beside this Python first,
    then on PATH; ``install_hint`` ends the error when it is in neither."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise SpinemetsError(f"program {name} not found beside {sys.executable} or on PATH; {install_hint}")
    return found


#: Where the output of nnU-Net's programs (and of its in-process predictor) goes: ``console`` (the
#: default: as they print it) or ``log`` (only into files under :attr:`spinemets.paths.Workspace.logs`, or the
#: training log; the caller sees one line per program and, in a notebook, the last lines in a
#: collapsed block). The batch runner sets ``log`` for the notebooks it executes, so that the book
#: shows no tool logs; a value the user set wins.
TOOL_OUTPUT_ENV = "SPINEMETS_TOOL_OUTPUT"
TOOL_OUTPUTS = ("console", "log")


def tool_output() -> str:
    """The current :data:`TOOL_OUTPUT_ENV` setting (``console`` when unset)."""
    value = os.environ.get(TOOL_OUTPUT_ENV, "").strip().lower() or "console"
    if value not in TOOL_OUTPUTS:
        raise SpinemetsError(f"{TOOL_OUTPUT_ENV}={value!r}: must be one of {', '.join(TOOL_OUTPUTS)}")
    return value


def in_notebook() -> bool:
    """Whether this process is a notebook's kernel. A kernel has imported IPython already; a command
    has not, and does not pay for importing it here."""
    if "IPython" not in sys.modules:
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _shown_path(path: Path) -> str:
    """``path`` relative to the working folder where it lies below it (no machine-specific prefix on a page)."""
    with contextlib.suppress(ValueError):
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    return str(path)


def log_block(log_file: str | Path, title: str, lines: int = 30) -> None:
    """Show the last ``lines`` of a log file: collapsed (an HTML ``<details>`` block) in a notebook, as text elsewhere."""
    import html

    path = Path(log_file)
    text = path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""
    tail = text.splitlines()[-lines:]
    if not in_notebook():
        print("\n".join(tail))
        return
    from IPython.display import HTML, display

    display(HTML(f"<details class=\"spinemets-log\"><summary>log: {html.escape(title)} (last {len(tail)} lines of "
                 f"<code>{html.escape(_shown_path(path))}</code>)</summary><pre>{html.escape(chr(10).join(tail))}"
                 "</pre></details>"))


@contextlib.contextmanager
def captured_output(workspace: Workspace, name: str) -> Iterator[None]:
    """With :data:`TOOL_OUTPUT_ENV` ``log``: what nnU-Net prints in this process (its messages, warnings
    and progress bars) goes to ``logs/NAME.log`` of the workspace instead of the console or the notebook."""
    if tool_output() != "log":
        yield
        return
    workspace.logs.mkdir(parents=True, exist_ok=True)
    with open(workspace.logs / f"{name}.log", "a", encoding="utf-8") as fh, \
            contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
        yield


def run_nnunet(program: str, args: Sequence[str], workspace: Workspace, log_file: Path | None = None,
               extra_trainer_dirs: Sequence[str | Path] = (), env: Mapping[str, str] | None = None) -> None:
    """Run one nnU-Net program with the workspace environment; its output goes to the console (and ``log_file``).

    With :data:`TOOL_OUTPUT_ENV` ``log`` it goes only to ``log_file`` (default ``logs/PROGRAM.log`` of
    the workspace), and one line says how long the program took and where its output is.
    The program runs in its own process group: when it ends (or this call is interrupted), what
    is left of that group (data-loading workers of a killed training hold its output open) is
    terminated. A non-zero exit raises :class:`SpinemetsError` with the command and the last lines of its output.
    """
    cmd = [program_path(program), *map(str, args)]
    log.info("running %s", " ".join(cmd))
    environment = workspace.environment(extra_trainer_dirs, **dict(env or {}))
    environment.setdefault("PYTHONUNBUFFERED", "1")  # its lines as they come, not in blocks through the pipe
    quiet = tool_output() == "log"
    if quiet and log_file is None:
        log_file = workspace.logs / f"{program}.log"
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    tail: list[str] = []
    started = time.monotonic()
    handle = open(log_file, "a", encoding="utf-8") if log_file else contextlib.nullcontext()
    with handle as fh:
        if fh and quiet:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
        proc = subprocess.Popen(cmd, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)

        def relay():
            for line in proc.stdout:
                if not quiet:
                    sys.stdout.write(line)
                if fh:
                    fh.write(line)
                tail[:] = (tail + [line.rstrip()])[-15:]

        reader = threading.Thread(target=relay, daemon=True)
        reader.start()
        try:
            code = proc.wait()
        finally:
            _end_group(proc.pid)
            reader.join(timeout=10)
    if quiet and code == 0:
        print(f"{program}: done in {time.monotonic() - started:.0f} s; its output is in {_shown_path(log_file)}")
    if code != 0:
        for line in tail:
            log.error("%s: %s", program, line)
        where = log_file if log_file is not None else program
        raise SpinemetsError(f"{where}: {program} failed (exit {code}): {' '.join(cmd)}; its last lines are above"
                             + (f", all of it in {log_file}" if log_file is not None else ""))


def _end_group(pgid: int) -> None:
    """Terminate what is left of a finished program's process group (its orphaned workers)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)


def cpu_environment(wait_policy: str = "PASSIVE") -> dict[str, str]:
    """Settings for training on a CPU, unless the user set them.

    * ``OMP_WAIT_POLICY``: nnU-Net runs torch with one thread per core. ``PASSIVE`` (the default
      here): a thread that waits sleeps at once; with OpenMP's busy-waiting, a core taken by any
      other process stalls every parallel region (we measured 2 threads at 3.5x the time of 1
      thread on a busy 2-core machine; passive waiting removed the loss). ``ACTIVE``: waiting
      threads spin, which saves the wake-up of every parallel region: on an idle 2-core AVX2 CPU a
      demo iteration took 1.14 s instead of 1.38 s (vertebrae) and 0.165 s instead of 0.244 s
      (lesions), ``benchmarks/bench_train.py``. The demo profile, which trains one fold at a time
      on a machine of its own, asks for it (``omp_wait_policy`` of :data:`spinemets.training.profiles.PROFILES`).
    * ``nnUNet_n_proc_DA=1``: one data-loading worker; without augmentation it is idle most of the time.
    * ``nnUNet_def_n_proc``: the processes of nnU-Net's final validation (export of the
      predictions and probabilities); nnU-Net's default, 8, each a new Python importing torch,
      costs more start-up than the export of a few small cases on 2 cores.
    """
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", wait_policy),
            "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "1"),
            "nnUNet_def_n_proc": os.environ.get("nnUNet_def_n_proc", str(min(2, os.cpu_count() or 1)))}


def children_cpu_seconds() -> float:
    """User + system CPU seconds of the finished child processes (nnU-Net's programs and their workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime
