"""A real one-node SLURM cluster with accounting, started and stopped by the tests.

:class:`OneNodeSlurm` writes ``slurm.conf`` and ``slurmdbd.conf`` into a fresh folder and starts,
each as a child process whose PID it keeps: ``munged`` (on its own socket, with the key the
``munge`` package installed), MariaDB (own data folder, on 127.0.0.1 only), ``slurmdbd``,
``slurmctld`` and ``slurmd``. It waits for the node to be ``idle`` and for the accounting to
answer. :meth:`OneNodeSlurm.stop` cancels the cluster's jobs and stops those processes, by PID,
whatever state the start reached. No daemon of the host is touched: ports are picked free, the
munge socket and every state, spool, log and PID file live in the folder.

The configuration is cgroup-free (``proctrack/linuxproc``, ``task/none``), runs as root, and gives
the node the machine's CPUs and 90 % of its memory (``slurmd -C``).

:func:`unavailable_reason` says why SLURM cannot run here (not root, or programs missing; the
CI installs them with ``scripts/install_slurm.sh``), or ``None``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

#: Programs the cluster needs, and the Debian package of each (scripts/install_slurm.sh installs them).
PROGRAMS = {
    "munged": "munge", "slurmctld": "slurm-wlm", "slurmd": "slurm-wlm", "sbatch": "slurm-wlm",
    "sacct": "slurm-wlm", "slurmdbd": "slurmdbd", "mariadbd": "mariadb-server", "mariadb-install-db": "mariadb-server",
}
MUNGE_KEY = Path("/etc/munge/munge.key")
CLUSTER_NAME = "spinemetstest"


def _which(program: str) -> str | None:
    return shutil.which(program) or next(
        (str(p) for p in (Path("/usr/sbin") / program, Path("/usr/bin") / program) if p.exists()), None)


def unavailable_reason() -> str | None:
    """Why a one-node SLURM cannot be started here, or ``None`` when it can."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a one-node SLURM needs root (slurmd, munged and slurmctld run as root/munge)"
    missing = sorted({pkg for prog, pkg in PROGRAMS.items() if _which(prog) is None})
    if missing:
        return f"SLURM is not installed (missing Debian packages: {' '.join(missing)}); run scripts/install_slurm.sh"
    if not MUNGE_KEY.exists():
        return f"{MUNGE_KEY} not found (installed by the munge package); run scripts/install_slurm.sh"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (created by the munge package); run scripts/install_slurm.sh"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_resources() -> tuple[int, int]:
    """CPUs and 90 % of the memory in MB that ``slurmd -C`` reports for this machine."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return int(fields["CPUs"]), int(int(fields["RealMemory"]) * 0.9)


class OneNodeSlurm:
    """A one-node SLURM cluster with slurmdbd accounting in ``root`` (see the module docstring).

    ``env`` is the environment every client call needs (``SLURM_CONF``); ``cpus`` the node's CPUs.
    Use as a context manager or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="spinemets-slurm-"))
        self.root.chmod(0o755)  # munged runs as 'munge' and must reach its socket folder
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.cpus, self.memory_mb = _node_resources()
        self.processes: dict[str, subprocess.Popen] = {}

    # -- configuration ----------------------------------------------------------------------

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "log", "run", "db"):
            (r / sub).mkdir(exist_ok=True)
        munge_dir = r / "munge"
        munge_dir.mkdir(exist_ok=True)
        shutil.chown(munge_dir, "munge", "munge")
        munge_dir.chmod(0o755)
        self.munge_socket = munge_dir / "munge.socket"
        self.db_socket = r / "run" / "mariadb.sock"
        self.ports = {name: _free_port() for name in ("ctld", "slurmd", "dbd", "mysql")}
        auth = f"AuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
        self.conf.write_text(
            f"ClusterName={CLUSTER_NAME}\n"
            "SlurmctldHost=localhost\n"
            f"SlurmctldPort={self.ports['ctld']}\nSlurmdPort={self.ports['slurmd']}\n"
            "SlurmUser=root\nSlurmdUser=root\n" + auth +
            "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_Core_Memory\nDefMemPerCPU=1000\n"
            "MailProg=/bin/true\nReturnToService=2\nKillWait=5\nMinJobAge=600\nInactiveLimit=0\n"
            "SchedulerParameters=sched_interval=2\n"
            f"StateSaveLocation={r / 'state'}\nSlurmdSpoolDir={r / 'spool'}\n"
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}\nSlurmdPidFile={r / 'run' / 'slurmd.pid'}\n"
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}\nSlurmdLogFile={r / 'log' / 'slurmd.log'}\n"
            "MpiDefault=none\n"
            "AccountingStorageType=accounting_storage/slurmdbd\nAccountingStorageHost=localhost\n"
            # the accounting connection authenticates through the munge socket named here
            f"AccountingStoragePass={self.munge_socket}\n"
            f"AccountingStoragePort={self.ports['dbd']}\nJobAcctGatherType=jobacct_gather/linux\n"
            f"NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN\n"
            "PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP\n",
            encoding="utf-8")
        dbd = r / "slurmdbd.conf"  # found beside slurm.conf
        dbd.write_text(
            auth + "DbdHost=localhost\nDbdAddr=127.0.0.1\n"
            f"DbdPort={self.ports['dbd']}\nSlurmUser=root\n"
            f"LogFile={r / 'log' / 'slurmdbd.log'}\nPidFile={r / 'run' / 'slurmdbd.pid'}\n"
            "StorageType=accounting_storage/mysql\nStorageHost=127.0.0.1\n"
            f"StoragePort={self.ports['mysql']}\nStorageUser=root\nStorageLoc=slurm_acct_db\n",
            encoding="utf-8")
        dbd.chmod(0o600)

    # -- processes --------------------------------------------------------------------------

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> None:
        log = open(self.root / "log" / f"{name}.console", "ab")
        self.processes[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                                start_new_session=True, user=user, group=user)
        log.close()

    def _wait(self, what: str, check, timeout: float = 180.0, process: str | None = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process and self.processes[process].poll() is not None:
                raise RuntimeError(f"{process} exited ({self.processes[process].returncode}) while waiting for "
                                   f"{what}; see {self.root / 'log'}")
            if check():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}; see {self.root / 'log'}")

    def _ok(self, cmd: list[str]) -> bool:
        return subprocess.run(cmd, env=self.env, capture_output=True).returncode == 0

    def _out(self, cmd: list[str]) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True).stdout.strip()

    def start(self) -> "OneNodeSlurm":
        """Write the configuration and start the daemons; return when the node is idle and accounting answers."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        r = self.root
        self._write_config()
        munge = self.root / "munge"
        self._spawn("munged", [_which("munged"), "-F", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={MUNGE_KEY}",
                               f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                               f"--seed-file={munge / 'munged.seed'}"], user="munge")
        self._wait("munged", lambda: self.munge_socket.exists(), 60, "munged")
        subprocess.run([_which("mariadb-install-db"), "--user=root", f"--datadir={r / 'db'}",
                        "--auth-root-authentication-method=normal", "--skip-test-db"],
                       check=True, capture_output=True)
        self._spawn("mariadbd", [_which("mariadbd"), "--no-defaults", "--user=root", f"--datadir={r / 'db'}",
                                 f"--socket={self.db_socket}", "--bind-address=127.0.0.1",
                                 f"--port={self.ports['mysql']}", f"--pid-file={r / 'run' / 'mariadb.pid'}",
                                 "--skip-grant-tables", "--innodb-buffer-pool-size=64M",
                                 f"--log-error={r / 'log' / 'mariadb.log'}"])
        self._wait("MariaDB", lambda: self.db_socket.exists() and self._port_open(self.ports["mysql"]), 180, "mariadbd")
        self._spawn("slurmdbd", [_which("slurmdbd"), "-D"])
        self._wait("slurmdbd", lambda: self._port_open(self.ports["dbd"]), 180, "slurmdbd")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
        self._wait("slurmctld", lambda: self._ok(["scontrol", "ping"]), 180, "slurmctld")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-N", "localhost", "-f", str(self.conf)])
        self._wait("node idle", lambda: self._out(["sinfo", "-h", "-n", "localhost", "-o", "%T"]) == "idle", 180, "slurmd")
        self._wait("accounting", lambda: self._ok(["sacct", "-n", "-X", "-S", "now-1hour"]), 180, "slurmdbd")

    @staticmethod
    def _port_open(port: int) -> bool:
        with socket.socket() as s:
            s.settimeout(0.5)
            return s.connect_ex(("127.0.0.1", port)) == 0

    def stop(self) -> None:
        """Cancel the cluster's jobs, then stop the daemons by PID (TERM, then KILL after 10 s)."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self._out(["squeue", "-h", "-o", "%i"]):
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "slurmdbd", "mariadbd", "munged"):
            proc = self.processes.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)

    def __enter__(self) -> "OneNodeSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of every daemon log, for failure messages."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"== {path.name}\n" + "\n".join(text))
        return "\n".join(parts)



# ---------------------------------------------------------------------------------------------
# Small real payloads for the jobs of the tests (imported by the jobs: tests/ is on PYTHONPATH)
# ---------------------------------------------------------------------------------------------


def count_steps(out: str, total: int, step_s: float, barrier: str | None = None, peers: int = 1) -> int:
    """Count to ``total``, one checkpoint file per step, resuming from the last checkpoint.

    Appends the step it started from to ``out/starts.txt`` and writes ``out/interval.json``
    (wall-clock start and end) when it finishes. With ``barrier``, it first registers in that
    folder and waits (up to 120 s) until ``peers`` jobs have registered: it can only pass when
    that many jobs run at the same time.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    checkpoint = folder / "checkpoint.json"
    step = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    with open(folder / "starts.txt", "a", encoding="utf-8") as fh:
        fh.write(f"{step}\n")
    if barrier:
        Path(barrier).mkdir(parents=True, exist_ok=True)
        (Path(barrier) / folder.name).touch()
        deadline = time.monotonic() + 120
        while len(list(Path(barrier).iterdir())) < peers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(list(Path(barrier).iterdir()))} of {peers} jobs ran side by side")
            time.sleep(0.2)
    while step < total:
        time.sleep(step_s)
        step += 1
        tmp = checkpoint.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step}))
        os.replace(tmp, checkpoint)
    (folder / "interval.json").write_text(json.dumps({"start": started, "end": time.time()}))
    return step


def gather(outs: list[str], out: str) -> int:
    """The closing step: sum the counts of ``outs`` into ``out/summary.json``; fail if one is missing."""
    started = time.time()
    counts = {Path(o).name: json.loads((Path(o) / "checkpoint.json").read_text())["step"] for o in outs}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "summary.json").write_text(json.dumps({"counts": counts, "start": started}))
    return sum(counts.values())


def fail(message: str) -> None:
    """A job that raises."""
    raise ValueError(message)
