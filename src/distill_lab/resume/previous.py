"""Finding the run a command continues: which checkpoint ``ckpt_path=auto`` resumes, and in which directory.

Hydra gives every invocation a new timestamped ``paths.output_dir`` (``outputs/DATE/TIME``), so "the same
command, run again" has to find its earlier run on disk. With ``ckpt_path=auto`` (the default):

1. If this run's own directory already holds a checkpoint (``hydra.run.dir=...`` named an existing
   directory, or ``train(cfg)`` was given one), that run is the previous one.
   Where its saved ``config.yaml`` differs from this run's configuration, the differences are logged as a
   warning (extending ``trainer.max_epochs`` this way is deliberate).
2. Otherwise, unless the directory was named on the command line (``hydra.run.dir=`` or
   ``hydra.sweep.dir=``: a new name asks for a new run there), the previous run is the most recently active
   run directory near this one whose ``.hydra/overrides.yaml`` lists the same overrides (in any order) and
   that holds a checkpoint. "Near" means siblings and cousins: ``<root>/*/*`` for Hydra's
   ``outputs/DATE/TIME`` (so a rerun after midnight still finds its run) and, for ``multirun/DATE/TIME/N``,
   the same job of an earlier sweep (``multirun/*/*/N``, any date too). The same overrides are not the same
   run when a ``conf/`` file changed in between: if that run's resolved ``config.yaml`` differs from this
   one's (its own paths aside), this run starts afresh and the log names the keys that differ.

A previous run that wrote ``results.json`` (the last thing ``train`` does) finished, and this run starts
afresh, unless it is this run's own directory (named again): that is an error. ``run.train`` first asks
:func:`finished_run` whether a job of a rerun sweep repeats a finished one under the same configuration, and
then returns that job's results without training. Only the latest matching run counts: an older unfinished run
is not revived behind a newer finished one. The checkpoint is the one with the most trained steps, of
``checkpoints/last.ckpt`` (every ``checkpoint_every_n_steps`` steps and at the end of training),
``checkpoints/interrupted.ckpt`` (Ctrl-C or an exception) and ``checkpoints/best.ckpt``, that can be read (the
one written last of equals): not the newest file, which may hold fewer steps, nor one cut short (a copy or a
save that failed part-way), which is named in a warning and skipped for the next; the log names the
checkpoint, its step and why. The resumed run continues *in the previous run's directory*: its checkpoint
callbacks keep tracking the best epoch across the interruption (Lightning restores that state only for the
same ``dirpath``), the logger starts a new version beside the old one, and ``results.json`` and ``student/``
land where the run started. The directory Hydra made for the rerun keeps only ``.hydra/`` and the log, which
names the run it resumed. ``ckpt_path=null`` always starts afresh; any other value is a checkpoint path (or
one of Lightning's names, ``last``...) and is passed to ``Trainer.fit`` as it is, training in this run's own
directory.

A run locks the directory it writes to, and ``auto`` resumes no run that is still going (``resume.lock``); the
processes of a distributed run all take rank 0's choice (``resume.handover``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import yaml

from distill_lab.checkpoint_files import (
    DOCUMENTED_CHECKPOINTS,
    UnreadableCheckpoint,
    checkpoint_step,
    readable_checkpoints,
)
from distill_lab.resume.handover import hand_over, handed_over, is_rank_zero
from distill_lab.resume.lock import RunDirectoryLocked, is_locked, lock_holder, lock_run_dir

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
RESUMABLE_CHECKPOINTS = DOCUMENTED_CHECKPOINTS
FINISHED_MARKER = "results.json"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
HYDRA_FILE = Path(".hydra") / "hydra.yaml"
NAMED_DIR_OVERRIDES = ("hydra.run.dir=", "hydra.sweep.dir=")
LIGHTNING_CKPT_NAMES = ("last", "hpc", "registry")  # what Trainer.fit(ckpt_path=...) takes besides a path


def _lock_free_or_log(run_dir: Path) -> bool:
    """Whether no live process holds ``run_dir``, which ``auto`` would resume; logs why not if one does."""
    if is_locked(run_dir):
        log.info(
            "ckpt_path=auto: %s, the latest run with the same overrides, is still running (%s holds its "
            "lock); starting afresh instead of writing beside it", run_dir, lock_holder(run_dir),
        )  # fmt: skip
        return False
    return True


def _has_checkpoint(run_dir: Path) -> bool:
    """Whether ``run_dir/checkpoints`` holds a file under a resumable name (read or not)."""
    return any((run_dir / CHECKPOINT_DIR / name).is_file() for name in RESUMABLE_CHECKPOINTS)


def _checkpoints(run_dir: Path) -> list[tuple[Path, int]]:
    """``[(checkpoint, step), ...]``: the checkpoints of ``run_dir/checkpoints`` (``last.ckpt``,
    ``interrupted.ckpt``, ``best.ckpt``) that can be read, the most trained first (of equals, the one written
    last); each one that cannot is named in a warning."""
    return readable_checkpoints(
        (run_dir / CHECKPOINT_DIR / name for name in RESUMABLE_CHECKPOINTS), context="ckpt_path=auto: "
    )


def _newest_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint of ``run_dir`` that ``auto`` resumes: the first of :func:`_checkpoints`, or None."""
    found = _checkpoints(run_dir)
    return found[0][0] if found else None


def _why_this_checkpoint(found: list[tuple[Path, int]]) -> str:
    """``"last.ckpt, at step 160, has the most trained steps (interrupted.ckpt: step 0)"``."""
    (checkpoint, step), others = found[0], found[1:]
    steps = f" (of {', '.join(f'{p.name}: step {s}' for p, s in others)})" if others else ""
    return f"{checkpoint.name}, at step {step}, is its readable checkpoint with the most trained steps{steps}"


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
    """Raises ValueError when ``output_dir`` holds a finished run: a directory named again
    (``hydra.run.dir=``, ``hydra.sweep.dir=``)."""
    if (output_dir / FINISHED_MARKER).is_file():
        raise ValueError(
            f"{output_dir} holds a finished run ({FINISHED_MARKER}): training again there would pile a "
            "second run's checkpoints and logs onto the first's. Choose another hydra.run.dir "
            "(hydra.sweep.dir for a sweep), or delete the directory to train it again there"
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


class PreviousRun(NamedTuple):
    """The run that ``ckpt_path=auto`` continues: its checkpoint, its directory, why, and the checkpoint's
    trained step."""

    checkpoint: Path
    run_dir: Path
    reason: str
    step: int


def find_previous_run(
    output_dir: str | Path, config: dict | None = None, named: bool | None = None
) -> PreviousRun | None:
    """The interrupted run that ``output_dir``'s run continues, as ``(checkpoint, run_dir, reason, step)``,
    or None. Raises ValueError when ``output_dir`` itself holds a finished run.

    See the module docstring for the rules. ``config`` is this run's resolved configuration (compared with the
    previous run's ``config.yaml``; None compares nothing). ``named``: whether the directory was named on the
    command line (``hydra.run.dir=``), as the caller knows it from its live Hydra config; None reads it from
    the directory's ``.hydra/hydra.yaml``. ``reason`` says in words why this checkpoint was chosen, ``step``
    is its trained step.
    """
    output_dir = Path(output_dir)
    _refuse_finished(output_dir)
    if own := _checkpoints(output_dir):
        if config is not None and (changed := config_differences(output_dir, config)):
            log.warning(
                "ckpt_path=auto: resuming the run in %s under a configuration that differs from the one it "
                "started with: %s", output_dir, "; ".join(changed),
            )  # fmt: skip
        reason = (
            f"this run's directory {output_dir} holds an unfinished run (no {FINISHED_MARKER}); "
            f"{_why_this_checkpoint(own)}"
        )
        return PreviousRun(own[0][0], output_dir, reason, own[0][1])
    overrides = _overrides(output_dir)
    if overrides is None or (_named_on_command_line(output_dir) if named is None else named):
        return None  # not a Hydra-made directory, or one named on purpose: nothing to look for elsewhere
    trained = [d for d in _nearby_runs(output_dir) if _overrides(d) == overrides and _has_checkpoint(d)]
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
            "ckpt_path=auto: %s ran the same overrides but under another configuration (a conf/ file "
            "changed); starting afresh instead of resuming it. Differences: %s", latest, "; ".join(changed),
        )  # fmt: skip
        return None
    if not (found := _checkpoints(latest)):
        log.warning(
            "ckpt_path=auto: %s, the latest run with the same overrides, holds no checkpoint that can be "
            "read; starting afresh", latest,
        )  # fmt: skip
        return None
    reason = (
        f"{latest} is the latest run with the same overrides as this one and it did not finish (no "
        f"{FINISHED_MARKER}); {_why_this_checkpoint(found)}"
    )
    return PreviousRun(found[0][0], latest, reason, found[0][1])


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
            if _overrides(d) == overrides and (_has_checkpoint(d) or (d / FINISHED_MARKER).is_file())
        ]  # fmt: skip
        if not runs:
            return None
        candidate = max(runs, key=_last_activity)
        if not (candidate / FINISHED_MARKER).is_file():
            return None
    if config is not None and config_differences(candidate, config):
        return None
    return candidate


def _check_ckpt_path(ckpt_path: str | None) -> None:
    """A ``ckpt_path`` that names no checkpoint (a typo, a missing file, a file cut short) is an error now,
    not after the teacher and data have loaded. Remote paths (``s3://...``) are left to Lightning."""
    if (
        ckpt_path in (None, "auto")
        or str(ckpt_path).split(":")[0] in LIGHTNING_CKPT_NAMES
        or "://" in str(ckpt_path)
    ):
        return
    if not Path(ckpt_path).is_file():
        raise ValueError(
            f"ckpt_path={ckpt_path} is no checkpoint file. Give a checkpoint (e.g. "
            "<run>/checkpoints/last.ckpt), auto (resume the previous run of this command, the default) or "
            "null (start afresh)"
        )
    try:
        checkpoint_step(ckpt_path)
    except UnreadableCheckpoint as err:
        raise ValueError(
            f"ckpt_path={err}. Give another checkpoint (e.g. the run's best.ckpt or interrupted.ckpt), auto "
            "(the previous run's readable checkpoint with the most trained steps) or null (start afresh)"
        ) from None


def resolve_ckpt_path(
    ckpt_path: str | None, output_dir: str | Path, config: dict | None = None, named: bool | None = None
) -> tuple[str | None, Path]:
    """``(checkpoint for Trainer.fit, the directory this run writes to)`` for the ``ckpt_path`` option.

    ``"auto"`` resumes the previous run of the same command and configuration (``config``, resolved) in its
    own directory (:func:`find_previous_run`) or starts afresh in ``output_dir``, and records the choice in
    ``os.environ[DISTILL_LAB_RESUME]`` for the DDP ranks that Lightning launches later; ``None`` starts
    afresh; anything else is returned unchanged. A run of its own in ``output_dir`` (``None``, or a checkpoint
    from elsewhere) is refused where ``output_dir`` holds a finished run, and moves an unfinished run's
    checkpoints there aside (``checkpoints.1``...).

    A rank above 0 that torchrun or srun started (no hand-over) resolves ``"auto"`` to its directory's newest
    checkpoint, rank 0's choice in the named directory that such a run must have.

    Whatever the value, the process of rank 0 (the only one of a run that is not distributed) locks the
    directory it will write to (:func:`lock_run_dir`) and raises :class:`RunDirectoryLocked` when a live
    process holds ``output_dir`` already; the other ranks lock nothing. ``auto`` resumes no run whose process
    is alive.
    """
    output_dir = Path(output_dir)
    _check_ckpt_path(ckpt_path)
    if ckpt_path == "auto" and (chosen := handed_over()) is not None:
        return chosen  # a DDP rank that Lightning launched: rank 0 chose
    if not is_rank_zero():  # another process of a distributed run: rank 0 holds the directory's lock
        return _beside_rank_zero(ckpt_path, output_dir)
    if (ckpt_path == "auto" or not _resumes_here(ckpt_path, output_dir)) and not is_locked(output_dir):
        _refuse_finished(output_dir)  # before the lock: a refused command leaves even .run.lock as it was
    lock_run_dir(output_dir)
    if ckpt_path != "auto":
        return _given(ckpt_path, output_dir)
    found = find_previous_run(output_dir, config, named)
    if found is not None and found[1] != output_dir:
        try:
            lock_run_dir(found[1])
        except RunDirectoryLocked:  # it started again between the look and the lock
            _lock_free_or_log(found[1])
            found = None
    if found is None:
        ckpt_path, run_dir = None, output_dir
        _set_aside_checkpoints(output_dir)  # files under a checkpoint's name that cannot be read
    else:
        checkpoint, run_dir, reason, _ = found
        ckpt_path = str(checkpoint)
        log.info("ckpt_path=auto: resuming from %s because %s", checkpoint, reason)  # reason: the step too
        if run_dir != output_dir:
            log.info("ckpt_path=auto: this run continues in %s (outputs, logs, checkpoints)", run_dir)
    hand_over(ckpt_path, run_dir)
    return ckpt_path, run_dir


def _beside_rank_zero(ckpt_path: str | None, output_dir: Path) -> tuple[str | None, Path]:
    """``resolve_ckpt_path`` in a process of a distributed run above rank 0 that has no hand-over: started
    beside rank 0 by torchrun or srun, in the directory rank 0 writes to, it resolves ``"auto"`` as rank 0
    does there, to that directory's newest checkpoint (``resume.handover``)."""
    if ckpt_path == "auto":
        _refuse_finished(output_dir)
        own = _newest_checkpoint(output_dir)
        return (None if own is None else str(own)), output_dir
    return ckpt_path, output_dir


def _resumes_here(ckpt_path: str | None, output_dir: Path) -> bool:
    """Whether a ``ckpt_path`` other than ``"auto"`` resumes ``output_dir``'s own run: a checkpoint file in
    it, or Lightning's "last", "hpc"... which name no file."""
    return ckpt_path is not None and (
        not Path(ckpt_path).is_file()
        or (output_dir / "checkpoints").resolve() in Path(ckpt_path).resolve().parents
    )


def _given(ckpt_path: str | None, output_dir: Path) -> tuple[str | None, Path]:
    """``resolve_ckpt_path`` for a ``ckpt_path`` other than ``"auto"``: resuming this directory's run (a
    checkpoint file in it, or Lightning's "last", "hpc"... which name no file) or a run of its own here,
    which a finished run refuses and an unfinished run's checkpoints make room for."""
    if not _resumes_here(ckpt_path, output_dir):
        _refuse_finished(output_dir)
        _set_aside_checkpoints(output_dir)
    return ckpt_path, output_dir
