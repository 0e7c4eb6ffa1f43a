"""The console scripts: ``distill-lab [group=option ...]`` trains; ``distill-lab-summarize DIR`` summarises
a sweep.

``distill-lab`` takes what ``python train.py`` takes in a checkout (Hydra overrides such as ``loss=kl
matching=headwise``, ``-m`` for a sweep, ``--help``, ``--cfg job`` ...) and works from any directory. Its
configs are the checkout's top-level ``conf/`` where the package runs from a checkout (an editable install,
``PYTHONPATH=src``), else the copy of ``conf/`` that the wheel carries inside the package.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path

import hydra
from omegaconf import DictConfig

PACKAGE_DIR = Path(__file__).resolve().parent

INTERRUPTED = (
    "\nStopped by Ctrl-C outside training (loading, the built-in teacher's training, the export). Run the "
    "same command again: a distillation run resumes from its newest checkpoint, a built-in teacher trains "
    "from its start."
)
INTERRUPTED_TRAINING = (
    "\nStopped by Ctrl-C during training, which saved checkpoints/interrupted.ckpt in the run's directory. "
    "Run the same command again to resume from there."
)
TERMINATED = (
    "\nStopped by SIGTERM. A run that was training saved checkpoints/interrupted.ckpt in its directory. Run "
    "the same command again: a distillation run resumes from its newest checkpoint, a built-in teacher "
    "trains from its start."
)
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130 and 143, as a shell's


class Terminated(SystemExit):
    """SIGTERM outside ``Trainer.fit`` (a ``SystemExit``: Hydra reports it as no error of the job)."""


def _terminate(signum, frame) -> None:
    """The SIGTERM handler outside Lightning's entry points. Inside them Lightning's own handler runs first
    and calls this one: it stops the loop at the end of the batch (``SIGTERMException``), after which
    ``checkpoints.InterruptedCheckpoint`` saves, so nothing is raised here in the middle of a step."""
    if signal.getsignal(signal.SIGTERM) is _terminate:
        raise Terminated(EXIT_TERMINATED)


def _exit_status(stop: SystemExit) -> tuple[int, str] | None:
    """The exit status and message of a run stopped by a signal, or None for another ``SystemExit``."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException  # Lightning's stop on SIGTERM

    if isinstance(stop, Terminated | SIGTERMException):
        return EXIT_TERMINATED, TERMINATED
    # Lightning ends a Ctrl-C during fit with sys.exit(1), raised while it handles the KeyboardInterrupt
    if stop.code == 1 and isinstance(stop.__context__, KeyboardInterrupt):
        return EXIT_INTERRUPTED, INTERRUPTED_TRAINING
    return None


def config_dir() -> Path:
    """The directory of the Hydra configs: the checkout's ``conf/`` where this package is a checkout's
    ``src/distill_lab``, else ``conf/`` inside the installed package (see ``pyproject.toml``)."""
    checkout = PACKAGE_DIR.parents[1]
    if PACKAGE_DIR.parent.name == "src" and (checkout / "conf" / "config.yaml").is_file():
        return checkout / "conf"
    return PACKAGE_DIR / "conf"


def _train(cfg: DictConfig) -> float | None:
    """The Hydra task: one run; returns the metric a sweeper optimises."""
    from distill_lab.run import train

    metrics = train(cfg)
    return metrics.get(cfg.optimized_metric)


# Hydra names the job after the module of its task function: ``hydra.job.name`` names the run's log
# (train.log) and a SLURM job. "train" keeps the names that ``python train.py`` has always given.
_train.__module__ = "train"


def main(config_path: str | Path | None = None) -> None:
    """``distill-lab``: the overrides on the command line (``sys.argv``), as ``python train.py`` takes them.

    Args:
        config_path: The configs' directory; by default :func:`config_dir` (``train.py`` passes the
            ``conf/`` beside it).

    Ctrl-C (SIGINT) ends the command with exit status 130 and SIGTERM with 143, as a shell reports a
    process the signal ended, so that ``timeout``, a SLURM preemption or Kubernetes sees a run that did not
    finish; with a message saying what a rerun does, not a traceback. During training (``Trainer.fit``) the
    run first saves ``checkpoints/interrupted.ckpt`` at the end of the step under way.
    """
    # imported before Hydra configures logging, as train.py always has: Lightning then keeps its own
    # console handler, and its messages go to stderr
    import distill_lab.run  # noqa: F401

    app = hydra.main(version_base="1.3", config_path=str(config_path or config_dir()), config_name="config")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        with _sweep_record_kept_on_failure(sys.argv[1:]):
            app(_train)()
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except SystemExit as stop:
        if (stopped := _exit_status(stop)) is None:
            raise
        print(stopped[1], file=sys.stderr)
        sys.exit(stopped[0])


@contextlib.contextmanager
def _sweep_record_kept_on_failure(argv: list[str]):
    """A ``-m`` sweep aimed at an existing sweep directory (``hydra.sweep.dir=`` on the command line) that
    fails, e.g. refused in a job that finished there under other settings, leaves that sweep's
    ``multirun.yaml`` as it was. Hydra's sweeper writes the file before the first job starts, and a job's
    refusal comes later (``distill_lab.resume``); a sweep that runs keeps Hydra's new record."""
    record = _named_sweep_record(argv)
    before = record.read_bytes() if record is not None and record.is_file() else None
    try:
        yield
    except BaseException as err:
        if before is not None and not (isinstance(err, SystemExit) and err.code in (0, None)):
            record.write_bytes(before)
        raise


def _named_sweep_record(argv: list[str]) -> Path | None:
    """``<dir>/multirun.yaml`` of a sweep (``-m``, ``--multirun``) whose directory the command line names
    (``hydra.sweep.dir=<dir>``), else None: a directory named by the clock is a new one."""
    if not {"-m", "--multirun"} & set(argv):
        return None
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "hydra.sweep.dir" and value:
            return Path(value) / "multirun.yaml"
    return None


def summarize(argv: list[str] | None = None) -> None:
    """``distill-lab-summarize DIR [--metric NAME]``: the table and chart of a multirun (see
    :mod:`distill_lab.summarize`; ``python -m distill_lab.summarize`` is the same command)."""
    from distill_lab.summarize import main as summarize_main

    summarize_main(argv)
