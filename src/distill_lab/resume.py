"""Resuming an interrupted run: which checkpoint ``ckpt_path=auto`` continues from, where in the shuffled
training data the resumed run picks up, and the random state it continues with.

**Finding the previous run** (:func:`resolve_ckpt_path`). Hydra gives every invocation a new timestamped
``paths.output_dir`` (``outputs/DATE/TIME``), so "the same command, run again" has to find its earlier run
on disk. With ``ckpt_path=auto`` (the default):

1. If this run's own directory already holds a checkpoint (``hydra.run.dir=...`` named an existing
   directory, or ``train(cfg)`` was given one), that run is the previous one.
   Where its saved ``config.yaml`` differs from this run's configuration, the differences are logged as a
   warning (extending ``trainer.max_epochs`` this way is deliberate).
2. Otherwise, unless the directory was named on the command line (``hydra.run.dir=`` or
   ``hydra.sweep.dir=``: a new name asks for a new run there), the previous run is the most recently active
   run directory near this one whose ``.hydra/overrides.yaml`` lists the same overrides (in any order) and
   that holds a checkpoint. "Near" means siblings and cousins: ``<root>/*/*`` for Hydra's
   ``outputs/DATE/TIME`` (so a rerun after midnight still finds its run) and, for ``multirun/DATE/TIME/N``,
   the same job of an earlier sweep (``multirun/*/*/N``, any date too). The same overrides are not the same run when a ``conf/`` file changed in
   between: if that run's resolved ``config.yaml`` differs from this one's (its own paths aside), this run
   starts afresh and the log names the keys that differ.

A previous run that wrote ``results.json`` (the last thing ``train`` does) finished, and this run starts
afresh, unless it is this run's own directory (named again): that is an error. ``run.train`` first asks
:func:`finished_run` whether a job of a rerun sweep repeats a finished one under the same configuration, and
then returns that job's results without training. Only the latest matching run counts: an older unfinished run is not revived behind a newer finished
one. The checkpoint is the newer of ``checkpoints/last.ckpt`` (every ``checkpoint_every_n_steps`` steps and
at the end of training) and ``checkpoints/interrupted.ckpt`` (Ctrl-C or an exception). The resumed run
continues *in the previous run's directory*: its checkpoint callbacks keep tracking the best epoch across the
interruption (Lightning restores that state only for the same ``dirpath``), the logger starts a new version
beside the old one, and ``results.json`` and ``student/`` land where the run started. The directory Hydra
made for the rerun keeps only ``.hydra/`` and the log, which names the run it resumed. ``ckpt_path=null``
always starts afresh; any other value is a checkpoint path (or one of Lightning's names, ``last``...) and is
passed to ``Trainer.fit`` as it is, training in this run's own directory. Under DDP the processes that
Lightning launches for the other ranks (``LOCAL_RANK`` > 0, started after rank 0 chose) take rank 0's
choice, handed over in the ``DISTILL_LAB_RESUME`` environment variable, so that every rank restores the
same checkpoint and writes to the same directory. Processes that torchrun or srun start all run ``train.py``
side by side (:func:`started_by_a_launcher`), in one named directory (``run.py`` requires ``hydra.run.dir=``
there): the ranks above 0 make rank 0's choice themselves, from that directory's own checkpoints, which no
process changes before every process has started.

**One process per run directory** (:func:`lock_run_dir`): a run holds an ``fcntl.flock`` lock on
``<run dir>/.run.lock`` while its process lives (rank 0's, in a distributed run; the kernel drops it when the
process dies, SIGKILL included). ``ckpt_path=auto`` does not resume a run whose lock is held, which is a run
still going (a second copy of its command starts afresh in its own directory, and the log says why), and a
run whose own directory is locked (named with ``hydra.run.dir=``, or made by Hydra in the same second as
another's) stops with :class:`RunDirectoryLocked` before anything is loaded or written.

**Where in the data** (:class:`ResumableRandomSampler`, :class:`ResumableDistributedSampler` in a
distributed run, :func:`training_position`). A mid-epoch
checkpoint must resume on the batch after the last one trained, in the same order, or the resumed run
trains on different data than an uninterrupted one. Lightning 2.6 offers ``state_dict()`` on the
dataloader for this, but it does not work here: the loader's state is taken after the fetcher has already
prefetched the next batch (one batch too far), and it is never loaded back when ``configure_optimizers``
reads ``trainer.estimated_stepping_batches`` (which ours does; Lightning issue #20550) because that builds the
loader before the checkpoint's loop state is restored. So the position comes from the trainer's own loop
progress when the checkpoint is written, is saved by the data module (``TextClassificationData.state_dict``,
restored before any loader is built), and the sampler starts its epoch part-way through (in a distributed
run, each process's sampler its share of the epoch: the position counts the examples of one process's share).

**Random state** (:func:`rng_state`, :func:`set_rng_state`, used by ``callbacks.ResumeRandomState``):
Lightning checkpoints hold no random-number-generator state, so a resumed run would draw different dropout
masks than the uninterrupted one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DistributedSampler, RandomSampler

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RESUMABLE_CHECKPOINTS = ("last.ckpt", "interrupted.ckpt")
FINISHED_MARKER = "results.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
HYDRA_FILE = Path(".hydra") / "hydra.yaml"
NAMED_DIR_OVERRIDES = ("hydra.run.dir=", "hydra.sweep.dir=")
RANK_HANDOVER = "DISTILL_LAB_RESUME"
LOCK_FILE = ".run.lock"


# ---------------------------------------------------------------------------------------------- the run's lock


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the lock of the run directory this run would write to."""


_HELD_LOCKS: dict[Path, int] = {}  # run directory (resolved) -> the open lock file this process holds


def _lock_holder(run_dir: Path) -> str:
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
    """Hold ``run_dir/.run.lock`` (``fcntl.flock``) until this process ends, or raise :class:`RunDirectoryLocked`
    if another process holds it.

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
            f"{run_dir} is in use: {_lock_holder(run_dir)} is running there (it holds {run_dir / LOCK_FILE}), and "
            "two runs writing one directory would mix their checkpoints, logs and results. Wait for it to end, "
            "or choose another directory (hydra.run.dir=...). Hydra names a run's directory by the second it "
            "started: two commands started within one second get the same one."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[key] = fd


def _lock_free_or_log(run_dir: Path) -> bool:
    if is_locked(run_dir):
        log.info(
            "ckpt_path=auto: %s, the latest run with the same overrides, is still running (%s holds its lock); "
            "starting afresh instead of writing beside it", run_dir, _lock_holder(run_dir),
        )  # fmt: skip
        return False
    return True


# ---------------------------------------------------------------------------------------------- the checkpoint


def _newest_checkpoint(run_dir: Path) -> Path | None:
    """The newer (by modification time) of ``last.ckpt`` and ``interrupted.ckpt`` in ``run_dir/checkpoints``."""
    found = [p for name in RESUMABLE_CHECKPOINTS if (p := run_dir / CHECKPOINT_DIR / name).is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def _overrides(run_dir: Path) -> list[str] | None:
    """The run's Hydra overrides, sorted (the order of distinct keys does not change the config), or None."""
    try:
        overrides = yaml.safe_load((run_dir / OVERRIDES_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return sorted(str(o) for o in overrides) if isinstance(overrides, list) else None


def _named_on_command_line(run_dir: Path) -> bool:
    """Whether the run's directory came from a ``hydra.run.dir=`` or ``hydra.sweep.dir=`` override."""
    try:
        hydra = yaml.safe_load((run_dir / HYDRA_FILE).read_text())["hydra"]["overrides"]["hydra"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False
    return any(str(o).startswith(NAMED_DIR_OVERRIDES) for o in hydra or [])


def _leaves(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    return {prefix[:-1]: node}


def config_differences(run_dir: Path, config: dict) -> list[str] | None:
    """``["key: saved -> now", ...]`` between ``run_dir/config.yaml`` (the resolved config that run wrote when
    it started) and ``config`` (this run's, resolved), or None when the run saved none. Values naming a
    run's own directory (``paths.output_dir`` and what interpolates it) are compared relative to it."""
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None

    def relative(leaves: dict) -> dict:
        own = leaves.get("paths.output_dir")
        if not own:
            return leaves
        return {
            k: v.replace(str(own), "<output_dir>") if isinstance(v, str) else v for k, v in leaves.items()
        }

    before, now = relative(_leaves(saved)), relative(_leaves(config))
    missing = object()
    return [
        f"{key}: {before.get(key, '(unset)')!r} -> {now.get(key, '(unset)')!r}"
        for key in sorted(before.keys() | now.keys())
        if before.get(key, missing) != now.get(key, missing)
    ]


def _last_activity(run_dir: Path) -> int:
    files = [run_dir / CHECKPOINT_DIR / name for name in RESUMABLE_CHECKPOINTS] + [run_dir / FINISHED_MARKER]
    return max((p.stat().st_mtime_ns for p in files if p.is_file()), default=0)


def _nearby_runs(output_dir: Path) -> list[Path]:
    """Run directories beside ``output_dir`` (siblings) and one level up (cousins), and for a sweep's job
    (``multirun/DATE/TIME/N``) the jobs of every sweep (``multirun/*/*/*``), without ``output_dir``."""
    parent = output_dir.parent
    try:
        near = set(parent.iterdir()) | set(parent.parent.glob("*/*"))
        if output_dir.name.isdigit():  # Hydra numbers a sweep's jobs: earlier sweeps may be of another date
            near |= set(parent.parent.parent.glob("*/*/*"))
    except OSError:
        return []
    return [
        d
        for d in near
        if d.is_dir() and d.resolve() != output_dir.resolve() and (d / OVERRIDES_FILE).is_file()
    ]


def _refuse_finished(output_dir: Path) -> None:
    if (output_dir / FINISHED_MARKER).is_file():  # a directory named again (hydra.run.dir=, hydra.sweep.dir=)
        raise ValueError(
            f"{output_dir} holds a finished run ({FINISHED_MARKER}): training again there would pile a second "
            "run's checkpoints and logs onto the first's. Choose another hydra.run.dir (hydra.sweep.dir for a "
            "sweep), or delete the directory to train it again there"
        )


def _set_aside_checkpoints(output_dir: Path) -> None:
    """A fresh start in a directory that holds an unfinished run's checkpoints moves them to ``checkpoints.N``
    (the first free N): left in place, Lightning would version the new run's (``last-v1.ckpt``,
    ``best-v1.ckpt``) beside them, and a later ``ckpt_path=auto`` would resume the old run's."""
    checkpoints = output_dir / "checkpoints"
    if not any(checkpoints.glob("*.ckpt")):
        return
    n = 1
    while (aside := output_dir / f"checkpoints.{n}").exists():
        n += 1
    checkpoints.rename(aside)
    log.warning(
        "starting afresh in %s, which holds an earlier unfinished run's checkpoints: moved them to %s",
        output_dir,
        aside,
    )


def find_previous_run(
    output_dir: str | Path, config: dict | None = None, named: bool | None = None
) -> tuple[Path, Path, str] | None:
    """The interrupted run that ``output_dir``'s run continues, as ``(checkpoint, run_dir, reason)``, or None.
    Raises ValueError when ``output_dir`` itself holds a finished run.

    See the module docstring for the rules. ``config`` is this run's resolved configuration (compared with the
    previous run's ``config.yaml``; None compares nothing). ``named``: whether the directory was named on the
    command line (``hydra.run.dir=``), as the caller knows it from its live Hydra config; None reads it from the
    directory's ``.hydra/hydra.yaml``. ``reason`` says in words why this checkpoint was chosen.
    """
    output_dir = Path(output_dir)
    _refuse_finished(output_dir)
    if (own := _newest_checkpoint(output_dir)) is not None:
        if config is not None and (changed := config_differences(output_dir, config)):
            log.warning(
                "ckpt_path=auto: resuming the run in %s under a configuration that differs from the one it started "
                "with: %s", output_dir, "; ".join(changed),
            )  # fmt: skip
        return (
            own,
            output_dir,
            f"this run's directory {output_dir} holds an unfinished run (no {FINISHED_MARKER})",
        )
    overrides = _overrides(output_dir)
    if overrides is None or (_named_on_command_line(output_dir) if named is None else named):
        return None  # not a Hydra-made directory, or one named on purpose: nothing to look for elsewhere
    trained = [d for d in _nearby_runs(output_dir) if _overrides(d) == overrides and _newest_checkpoint(d)]
    if not trained:
        return None
    latest = max(trained, key=_last_activity)
    if (latest / FINISHED_MARKER).is_file():
        log.info(
            "ckpt_path=auto: the latest run with the same overrides, %s, finished; starting afresh", latest
        )
        return None
    if not _lock_free_or_log(latest):
        return None
    if config is not None and (changed := config_differences(latest, config)):
        log.warning(
            "ckpt_path=auto: %s ran the same overrides but under another configuration (a conf/ file changed); "
            "starting afresh instead of resuming it. Differences: %s", latest, "; ".join(changed),
        )  # fmt: skip
        return None
    checkpoint = _newest_checkpoint(latest)
    reason = (
        f"{latest} is the latest run with the same overrides as this one and it did not finish (no "
        f"{FINISHED_MARKER}); {checkpoint.name} is its newest checkpoint"
    )
    return checkpoint, latest, reason


def finished_run(
    output_dir: str | Path, config: dict | None = None, named: bool | None = None
) -> Path | None:
    """The finished run (one that wrote ``results.json``) that this run would repeat, or None: this run's own
    directory if it finished, else, for a directory Hydra made, the latest nearby run with the same overrides
    if that one finished (the same search as :func:`find_previous_run`). A run saved under another
    configuration (``config``, compared with its ``config.yaml``) is not the same run."""
    output_dir = Path(output_dir)
    candidate = output_dir
    if not (output_dir / FINISHED_MARKER).is_file():
        overrides = _overrides(output_dir)
        if overrides is None or (_named_on_command_line(output_dir) if named is None else named):
            return None
        runs = [
            d for d in _nearby_runs(output_dir)
            if _overrides(d) == overrides and (_newest_checkpoint(d) or (d / FINISHED_MARKER).is_file())
        ]  # fmt: skip
        if not runs:
            return None
        candidate = max(runs, key=_last_activity)
        if not (candidate / FINISHED_MARKER).is_file():
            return None
    if config is not None and config_differences(candidate, config):
        return None
    return candidate


def started_by_a_launcher() -> bool:
    """Whether torchrun or srun started this process as one of a distributed run's processes, each running
    ``train.py`` on its own, rather than Lightning's DDP launcher, which starts the ranks above 0 from rank 0
    after rank 0 chose where to resume (``DISTILL_LAB_RESUME``)."""
    if torch.distributed.is_available() and torch.distributed.is_torchelastic_launched():
        return True
    return int(os.environ.get("SLURM_NTASKS") or 1) > 1 and os.environ.get("SLURM_JOB_NAME") not in (
        "bash",
        "interactive",
    )


LIGHTNING_CKPT_NAMES = ("last", "hpc", "registry")  # what Trainer.fit(ckpt_path=...) takes besides a path


def _check_ckpt_path(ckpt_path: str | None) -> None:
    """A ``ckpt_path`` that names no checkpoint (a typo, a missing file) is an error now, not after the teacher
    and data have loaded. Remote paths (``s3://...``) are left to Lightning."""
    if (
        ckpt_path in (None, "auto")
        or str(ckpt_path).split(":")[0] in LIGHTNING_CKPT_NAMES
        or "://" in str(ckpt_path)
    ):
        return
    if not Path(ckpt_path).is_file():
        raise ValueError(
            f"ckpt_path={ckpt_path} is no checkpoint file. Give a checkpoint (e.g. <run>/checkpoints/last.ckpt), auto "
            "(resume the previous run of this command, the default) or null (start afresh)"
        )


def resolve_ckpt_path(
    ckpt_path: str | None, output_dir: str | Path, config: dict | None = None, named: bool | None = None
) -> tuple[str | None, Path]:
    """``(checkpoint for Trainer.fit, the directory this run writes to)`` for the ``ckpt_path`` option.

    ``"auto"`` resumes the previous run of the same command and configuration (``config``, resolved) in its own
    directory (:func:`find_previous_run`)
    or starts afresh in ``output_dir``, and records the choice in ``os.environ[DISTILL_LAB_RESUME]`` for the
    DDP ranks that Lightning launches later; ``None`` starts afresh; anything else is returned unchanged. A run
    of its own in ``output_dir`` (``None``, or a checkpoint from elsewhere) is refused where ``output_dir`` holds a
    finished run, and moves an unfinished run's checkpoints there aside (``checkpoints.1``...).

    A rank above 0 that torchrun or srun started (no hand-over) resolves ``"auto"`` to its directory's newest
    checkpoint, rank 0's choice in the named directory that such a run must have.

    Whatever the value, the process of rank 0 (the only one of a run that is not distributed) locks the
    directory it will write to (:func:`lock_run_dir`) and raises :class:`RunDirectoryLocked` when a live
    process holds ``output_dir`` already; the other ranks lock nothing. ``auto`` resumes no run whose process
    is alive.
    """
    output_dir = Path(output_dir)
    _check_ckpt_path(ckpt_path)
    if ckpt_path == "auto" and int(os.environ.get("LOCAL_RANK") or 0) > 0 and RANK_HANDOVER in os.environ:
        chosen = json.loads(os.environ[RANK_HANDOVER])  # a DDP rank that Lightning launched: rank 0 chose
        return chosen["ckpt_path"], Path(chosen["output_dir"])
    if rank_zero_only.rank > 0:  # another process of a distributed run: rank 0 holds the directory's lock
        if (
            ckpt_path == "auto"
        ):  # started beside rank 0 by torchrun or srun, in the directory rank 0 writes to
            _refuse_finished(output_dir)  # as rank 0 does, which finds this directory's newest checkpoint
            own = _newest_checkpoint(output_dir)
            return (None if own is None else str(own)), output_dir
        return ckpt_path, output_dir
    lock_run_dir(output_dir)
    if ckpt_path != "auto":
        # resuming this directory's run: a checkpoint file in it, or Lightning's "last", "hpc"... (no file)
        resumes_here = ckpt_path is not None and (
            not Path(ckpt_path).is_file()
            or (output_dir / "checkpoints").resolve() in Path(ckpt_path).resolve().parents
        )
        if not resumes_here:  # a run of its own here
            _refuse_finished(output_dir)
            _set_aside_checkpoints(output_dir)
        return ckpt_path, output_dir
    found = find_previous_run(output_dir, config, named)
    if found is not None and found[1] != output_dir:
        try:
            lock_run_dir(found[1])
        except RunDirectoryLocked:  # it started again between the look and the lock
            _lock_free_or_log(found[1])
            found = None
    if found is None:
        ckpt_path, run_dir = None, output_dir
    else:
        checkpoint, run_dir, reason = found
        ckpt_path = str(checkpoint)
        log.info("ckpt_path=auto: resuming from %s because %s", checkpoint, reason)
        if run_dir != output_dir:
            log.info("ckpt_path=auto: this run continues in %s (outputs, logs, checkpoints)", run_dir)
    os.environ[RANK_HANDOVER] = json.dumps({"ckpt_path": ckpt_path, "output_dir": str(run_dir)})
    return ckpt_path, run_dir


# ---------------------------------------------------------------------------------------------- the data order


class ResumableRandomSampler(RandomSampler):
    """A shuffled order that depends only on ``(seed, epoch)``, and can start part-way through an epoch.

    Epoch ``e`` visits ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e`` (the
    ``DistributedSampler`` convention; Lightning calls ``set_epoch`` before every epoch). Setting ``start``
    skips the first ``start`` examples of the next iteration only, without loading them, so a run resumed
    mid-epoch sees exactly the examples the interrupted run had not trained on, in the same order. ``len``
    stays the full epoch, as Lightning counts a resumed epoch's batches from its beginning.

    With ``tagged`` it yields ``(epoch, index)`` pairs instead of indices, for a dataset that hands a row its
    epoch (``data.EpochTagged``: masked-LM masks drawn from the epoch and the examples).

    It is the sampler of a run in one process; a distributed run takes :class:`ResumableDistributedSampler`.
    """

    def __init__(
        self, data_source, seed: int = 0, epoch: int = 0, start: int = 0, tagged: bool = False
    ) -> None:
        super().__init__(data_source)
        self.seed, self.epoch, self.start, self.tagged = seed, epoch, start, tagged

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        self.start, start = 0, self.start
        yield from _skip(order, start, self.epoch, self.tagged)


class ResumableDistributedSampler(DistributedSampler):
    """:class:`ResumableRandomSampler` for one process of a distributed run: process ``rank`` of
    ``num_replicas`` visits positions ``rank, rank + num_replicas, ...`` of the same seeded permutation of epoch
    ``e`` (``torch.randperm(n)`` seeded with ``seed + e``), padded at its end with its first examples to a
    multiple of ``num_replicas``, which is ``DistributedSampler(shuffle=True, seed=seed)``'s order exactly.
    ``start`` skips the first ``start`` examples of this process's share of the next iteration only; ``tagged``
    as there.

    Being a ``DistributedSampler``, Lightning keeps it: a ``RandomSampler`` it replaces under DDP with its own
    ``DistributedSampler``, which restarts a resumed epoch's order from its beginning (and is seeded by
    ``seed_everything``, not by the data's seed).
    """

    def __init__(
        self,
        dataset,
        num_replicas: int,
        rank: int,
        seed: int = 0,
        epoch: int = 0,
        start: int = 0,
        tagged: bool = False,
    ) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.epoch, self.start, self.tagged = epoch, start, tagged

    def __iter__(self):
        order = list(super().__iter__())
        self.start, start = 0, self.start
        yield from _skip(order, start, self.epoch, self.tagged)


def _skip(order: list[int], start: int, epoch: int, tagged: bool) -> list:
    if start:
        log.info(
            "the training data continues epoch %d at example %d of %d (so Lightning's warning that the "
            "dataloader is not resumable does not apply)",
            epoch,
            start,
            len(order),
        )
    return [(epoch, i) for i in order[start:]] if tagged else order[start:]


def training_position(trainer) -> tuple[int, int] | None:
    """``(epoch, batches)``: the epoch a run resumed from a checkpoint written now trains, and how many of
    its batches it skips; None outside ``fit``.

    Lightning resumes an epoch at its loop's ``processed`` batch count: a checkpoint written after a batch's
    optimizer step (step checkpoints, ``on_train_batch_end``) moves on to the next batch, one written while a
    step was under way (Ctrl-C, an exception) repeats that batch. An epoch whose batches are all processed, or
    a checkpoint between epochs, resumes at the start of the next epoch. One written inside a
    gradient-accumulation window resumes at the window's first batch (:func:`accumulation_window_start`).
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING:
        return None
    epochs = trainer.fit_loop.epoch_progress.current
    if epochs.started <= epochs.processed:  # between epochs (or before the first)
        return epochs.processed, 0
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if batches >= trainer.num_training_batches:
        return epochs.processed + 1, 0
    start = accumulation_window_start(trainer)
    return epochs.processed, batches if start is None else start


def accumulation_window_start(trainer) -> int | None:
    """The batch (of this epoch) where the gradient-accumulation window under way began, when a checkpoint
    written now would fall inside it; None otherwise.

    With ``accumulate_grad_batches`` = A, Lightning steps after batches A-1, 2A-1... of each epoch (and its last).
    A checkpoint written after some of a window's batches but before its step (Ctrl-C or an exception) holds
    none of their gradients: resumed at the batch it stopped on, the window's step would take the gradients
    of its last batches only. Such a checkpoint must resume at the window's first batch, replaying it whole.
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING or trainer.accumulate_grad_batches <= 1:
        return None
    epochs = trainer.fit_loop.epoch_progress.current
    batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
    if epochs.started <= epochs.processed or batches >= trainer.num_training_batches:
        return None
    into = batches % trainer.accumulate_grad_batches
    return batches - into if into else None


def rewind_to_batch(loops: dict, batch: int) -> None:
    """Rewrites a checkpoint's loop state (``checkpoint["loops"]``, written during this epoch's batch ``batch``
    or later) so that Lightning resumes the epoch at ``batch``: as it records a checkpoint written when that
    batch was about to start (its ``on_train_batch_start``), the optimizer's zeroing of the gradients, done
    on a window's first batch, undone with it. Optimizer steps stay as they are: none was taken since."""
    fit = loops["fit_loop"]
    _set_progress(
        fit["epoch_loop.batch_progress"], ready=batch + 1, started=batch, processed=batch, completed=batch
    )
    zero_grad = fit["epoch_loop.automatic_optimization.optim_progress"]["optimizer"]["zero_grad"]
    for counts in (zero_grad["total"], zero_grad["current"]):
        for key in ("ready", "started", "completed"):
            counts[key] -= 1


def restart_validation(loops: dict) -> None:
    """Rewrites the loop state of a checkpoint written during a validation inside ``fit`` so that Lightning
    resumes by running that validation again from its first batch, then trains on.

    As written, Lightning takes such a checkpoint for one written after the validation's last finished batch:
    it skips the batches before it and reports metrics of the rest only (or, stopped before the first batch,
    takes the validation for done). Recorded as stopped during its first batch, the validation restarts
    whole: the training batch before it is complete and the optimizer state untouched, since validation
    changes neither."""
    _set_progress(
        loops["fit_loop"]["epoch_loop.val_loop.batch_progress"], ready=1, started=1, processed=0, completed=0
    )


def _set_progress(progress: dict, **current: int) -> None:
    """Sets a saved loop's batch counts of the current run (epoch or validation) to ``current``, its totals by as
    much, and marks the batch as not the last."""
    for key, value in current.items():
        progress["total"][key] -= progress["current"][key] - value
        progress["current"][key] = value
    progress["is_last_batch"] = False


# ---------------------------------------------------------------------------------------------- random state


def rng_state() -> dict:
    """The state of every random number generator training draws from: torch (CPU and CUDA), numpy, Python.

    Tensors, lists and numbers only, so that ``torch.load(..., weights_only=True)`` (the default that
    Lightning's resume uses) reads the checkpoint.
    """
    name, keys, position, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned (the CUDA part only where this process uses CUDA)."""
    torch.set_rng_state(state["torch"])
    name, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
