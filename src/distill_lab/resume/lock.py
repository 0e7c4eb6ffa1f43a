"""One process per run directory.

A run holds an ``fcntl.flock`` lock on ``<run dir>/.run.lock`` while its process lives (rank 0's, in a
distributed run; the kernel drops it when the process dies, SIGKILL included). ``ckpt_path=auto`` does not
resume a run whose lock is held, which is a run still going (a second copy of its command starts afresh in its
own directory, and the log says why), and a run whose own directory is locked (named with ``hydra.run.dir=``,
or made by Hydra's clock in the same microsecond as another's) stops with :class:`RunDirectoryLocked` before
anything is loaded or written, Hydra's ``.hydra/`` records included (``distill_lab.run`` writes them once the
run holds its directory).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_FILE = ".run.lock"


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the lock of the run directory this run would write to."""


_HELD_LOCKS: dict[Path, int] = {}  # run directory (resolved) -> the open lock file this process holds


def lock_holder(run_dir: Path) -> str:
    """Who holds ``run_dir``'s lock, in words: the process id its lock file names, or "another process"."""
    try:
        pid = (run_dir / LOCK_FILE).read_text().strip()
    except OSError:
        pid = ""
    return f"process {pid}" if pid else "another process"


def is_locked(run_dir: str | Path) -> bool:
    """Whether another process holds ``run_dir``'s lock (a lock this process holds does not count)."""
    run_dir = Path(run_dir)
    if run_dir.resolve() in _HELD_LOCKS:
        return False
    try:
        fd = os.open(run_dir / LOCK_FILE, os.O_RDONLY)
    except OSError:  # no lock file: no run has locked it
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # releases the lock if it was taken
    return False


def lock_run_dir(run_dir: str | Path) -> None:
    """Hold ``run_dir/.run.lock`` (``fcntl.flock``) until this process ends, or raise
    :class:`RunDirectoryLocked` if another process holds it.

    The kernel releases the lock when its holder dies, however it dies (SIGKILL included), so a killed run's
    directory can be resumed at once; a directory locked is one a live process is writing to. This process
    taking a lock it already holds is a no-op (``train`` called again in one process, e.g. after a crash).
    The lock file holds the holder's process id, which the error names.
    """
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD_LOCKS:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise RunDirectoryLocked(
            f"{run_dir} is in use: {lock_holder(run_dir)} is running there (it holds {run_dir / LOCK_FILE}), "
            "and two runs writing one directory would mix their checkpoints, logs and results. Wait for it "
            "to end, or choose another directory (hydra.run.dir=...). Nothing was written there."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[key] = fd
