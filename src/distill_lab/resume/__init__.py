"""Resuming an interrupted run: which checkpoint ``ckpt_path=auto`` continues from, where in the shuffled
training data the resumed run picks up, and the random state it continues with.

One module per concern, each explaining its part:

- ``previous``: finding the previous run of the same command (:func:`resolve_ckpt_path`,
  :func:`find_previous_run`, :func:`finished_run`).
- ``lock``: one process per run directory (:func:`lock_run_dir`, :class:`RunDirectoryLocked`).
- ``handover``: every process of a distributed run takes rank 0's choice (:func:`started_by_a_launcher`).
- ``position``: where in the data, and in Lightning's loops, a resumed run continues (the resumable samplers,
  :func:`training_position`, the rewrites of a checkpoint's loop state).
- ``rng``: the random state (:func:`rng_state`, :func:`set_rng_state`, and the :class:`ResumeRandomState`
  callback that keeps it in every checkpoint).

Lightning's internals that resuming needs are reached through ``distill_lab._compat`` only.
"""

from distill_lab.resume.handover import RANK_HANDOVER, started_by_a_launcher
from distill_lab.resume.lock import LOCK_FILE, RunDirectoryLocked, is_locked, lock_run_dir
from distill_lab.resume.position import (
    ResumableDistributedSampler,
    ResumableRandomSampler,
    accumulation_window_start,
    restart_validation,
    rewind_to_batch,
    training_position,
)
from distill_lab.resume.previous import (
    CHECKPOINT_DIR,
    FINISHED_MARKER,
    NAMED_DIR_OVERRIDES,
    RESUMABLE_CHECKPOINTS,
    config_differences,
    find_previous_run,
    finished_run,
    resolve_ckpt_path,
)
from distill_lab.resume.rng import ResumeRandomState, rng_state, set_rng_state

__all__ = [
    "CHECKPOINT_DIR",
    "FINISHED_MARKER",
    "LOCK_FILE",
    "NAMED_DIR_OVERRIDES",
    "RANK_HANDOVER",
    "RESUMABLE_CHECKPOINTS",
    "ResumableDistributedSampler",
    "ResumableRandomSampler",
    "ResumeRandomState",
    "RunDirectoryLocked",
    "accumulation_window_start",
    "config_differences",
    "find_previous_run",
    "finished_run",
    "is_locked",
    "lock_run_dir",
    "resolve_ckpt_path",
    "restart_validation",
    "rewind_to_batch",
    "rng_state",
    "set_rng_state",
    "started_by_a_launcher",
    "training_position",
]
