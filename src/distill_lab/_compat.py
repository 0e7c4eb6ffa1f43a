"""The one door to Lightning's internals.

Resuming a run exactly where it stopped, and writing checkpoints at moments from which Lightning resumes on
the right batch, needs a few things Lightning keeps private: its loops' progress counters, the loggers' step,
the checkpoint a ``Trainer.save_checkpoint`` would write (as a dictionary, to rewrite before it is saved), the
structure of that checkpoint's ``"loops"`` state, some ``ModelCheckpoint`` methods, and a few trainer and
strategy attributes. Each is reached here, in a small function that says what it reaches and why no public API
does, and nowhere else in ``distill_lab`` (``tests/test_compat.py`` scans the package for it). A Lightning
release that renames or removes one breaks here: ``tests/test_compat.py`` checks every attribute of
:data:`REACHED` and every path of :data:`SAVED_LOOP_STATE` on real Lightning objects, and fails naming the one
that moved. ``pyproject.toml`` keeps ``lightning`` below its next minor release, where such changes land.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, NamedTuple

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import Strategy
    from torch import nn

# (Lightning class, attribute) for every private attribute, or internal object, reached below
REACHED: tuple[tuple[str, str], ...] = (
    ("Trainer", "fit_loop"),
    ("Trainer", "_checkpoint_connector"),
    ("Trainer", "_accelerator_connector"),
    ("_CheckpointConnector", "dump_checkpoint"),
    ("_AcceleratorConnector", "use_distributed_sampler"),
    ("_AcceleratorConnector", "is_distributed"),
    ("_FitLoop", "epoch_progress"),
    ("_FitLoop", "epoch_loop"),
    ("_FitLoop", "_data_fetcher"),
    ("_TrainingEpochLoop", "batch_progress"),
    ("_TrainingEpochLoop", "_batches_that_stepped"),
    ("_TrainingEpochLoop", "_should_check_val_fx"),
    ("_Progress", "current"),
    ("_BatchProgress", "current"),
    ("_BatchProgress", "is_last_batch"),
    ("_ProcessedTracker", "ready"),
    ("_ProcessedTracker", "started"),
    ("_ProcessedTracker", "processed"),
    ("_ProcessedTracker", "completed"),
    ("ModelCheckpoint", "_last_global_step_saved"),
    ("ModelCheckpoint", "_last_checkpoint_saved"),
    ("ModelCheckpoint", "_save_last_checkpoint"),
    ("ModelCheckpoint", "_monitor_candidates"),
    ("ModelCheckpoint", "_should_skip_saving_checkpoint"),
    ("Strategy", "_forward_redirection"),
    ("LightningModule", "_trainer"),
)

# where a checkpoint's loop state (``checkpoint["loops"]["fit_loop"][key]``) keeps the progress of a loop
SAVED_LOOP_STATE: dict[str, str] = {
    "train": "epoch_loop.batch_progress",
    "validation": "epoch_loop.val_loop.batch_progress",
    "optimizer": "epoch_loop.automatic_optimization.optim_progress",
}
COUNTS = ("ready", "started", "processed", "completed")


class Counts(NamedTuple):
    """A loop's counts of items (batches, epochs) in the epoch or validation under way, each raised as an
    item reaches that point: ``ready`` >= ``started`` >= ``processed`` >= ``completed``."""

    ready: int
    started: int
    processed: int
    completed: int


def _counts(tracker) -> Counts:
    return Counts(*(getattr(tracker, key) for key in COUNTS))


# ---------------------------------------------------------------------------------- the loops


def epoch_counts(trainer: L.Trainer) -> Counts:
    """The fit loop's epoch counts (``trainer.fit_loop.epoch_progress.current``).

    ``trainer.current_epoch`` says which epoch runs, not whether it has started or finished, which a
    checkpoint written between two epochs must tell apart; the loops' progress is the only record of that.
    """
    return _counts(trainer.fit_loop.epoch_progress.current)


def batch_counts(trainer: L.Trainer) -> Counts:
    """The training batches of the epoch under way (``trainer.fit_loop.epoch_loop.batch_progress.current``).

    Hooks receive ``batch_idx``, but ``state_dict`` and ``on_save_checkpoint`` do not, and only these counts
    say whether the batch under way has finished (``processed``) when a checkpoint is written.
    """
    return _counts(trainer.fit_loop.epoch_loop.batch_progress.current)


def is_last_batch(trainer: L.Trainer) -> bool:
    """Whether the training batch under way is its epoch's last (the fetcher has looked one batch ahead).

    Lightning exposes no other signal for it; ``trainer.num_training_batches`` is not enough for a loader
    whose length is unknown.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def logging_step(trainer: L.Trainer) -> int:
    """The step Lightning logs metrics at: the count of batches that have stepped, ``_batches_that_stepped``.

    It is not ``trainer.global_step``, which a validation inside an epoch runs one step ahead of, and no
    public attribute holds it.
    """
    return trainer.fit_loop.epoch_loop._batches_that_stepped


def set_logging_step(trainer: L.Trainer, step: int) -> None:
    """Sets :func:`logging_step`: Lightning adds one to it on restoring any checkpoint, as if every one were
    written after a step, and offers no way to restore one written during a step without that."""
    trainer.fit_loop.epoch_loop._batches_that_stepped = step


def validation_follows_batch(trainer: L.Trainer) -> bool:
    """Whether a validation runs after the training batch under way (``trainer.val_check_interval``, or the
    epoch's end), as the training loop itself decides it (``_should_check_val_fx`` on the loop's fetcher).

    Lightning has no public form of this decision, and repeating its rules (intervals in batches, steps or
    time, early stopping) here would drift from them.
    """
    fit_loop = trainer.fit_loop
    return fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher)


# ---------------------------------------------------------------------------------- checkpoints


def dump_checkpoint(trainer: L.Trainer) -> dict:
    """The checkpoint ``trainer.save_checkpoint`` would write now, as a dictionary, without writing it.

    ``save_checkpoint`` dumps and writes in one call and ends in a barrier that every process must reach; a
    checkpoint written by one process while the others may be anywhere, and rewritten before it is saved
    (:func:`set_saved_batch_progress`), needs the dump alone (``_checkpoint_connector.dump_checkpoint``).
    """
    return trainer._checkpoint_connector.dump_checkpoint()


def _saved_progress(checkpoint: dict, loop: str) -> dict:
    return checkpoint["loops"]["fit_loop"][SAVED_LOOP_STATE[loop]]


def set_saved_batch_progress(checkpoint: dict, loop: Literal["train", "validation"], **current: int) -> None:
    """Sets a checkpoint's saved batch counts of the epoch (``loop="train"``) or of the validation inside
    ``fit`` (``"validation"``) under way to ``current`` (some of :data:`COUNTS`), its totals by as much, and
    marks the batch as not the last.

    Lightning resumes a loop at the counts saved in ``checkpoint["loops"]``, which it assumes a checkpoint
    written after a finished batch; there is no public way to say where a checkpoint written elsewhere
    resumes.
    """
    progress = _saved_progress(checkpoint, loop)
    for key, value in current.items():
        progress["total"][key] -= progress["current"][key] - value
        progress["current"][key] = value
    progress["is_last_batch"] = False


def undo_saved_zero_grad(checkpoint: dict) -> None:
    """Takes one ``optimizer.zero_grad`` call back from a checkpoint's saved optimizer progress (totals and
    the current epoch's), for a checkpoint rewound to a batch before the call (see
    :func:`set_saved_batch_progress`)."""
    zero_grad = _saved_progress(checkpoint, "optimizer")["optimizer"]["zero_grad"]
    for counts in (zero_grad["total"], zero_grad["current"]):
        for key in ("ready", "started", "completed"):
            counts[key] -= 1


def should_skip_saving(callback: ModelCheckpoint, trainer: L.Trainer) -> bool:
    """Whether ``callback`` writes nothing now (``fast_dev_run``, outside ``fit``, the sanity check, or a
    checkpoint of this step already written), by ``ModelCheckpoint``'s own rule, which is not public."""
    return callback._should_skip_saving_checkpoint(trainer)


def save_last_checkpoint(callback: ModelCheckpoint, trainer: L.Trainer) -> None:
    """Writes ``callback``'s ``last.ckpt`` now (``_save_last_checkpoint``), under the name and with the
    metrics it would use on its own schedule. ``ModelCheckpoint`` writes it only from its hooks, and
    ``trainer.save_checkpoint`` would not update the callback's record of it (``last_model_path``)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


def saved_last_at(callback: ModelCheckpoint, step: int) -> bool:
    """Whether ``callback``'s latest checkpoint was written at optimizer step ``step`` and ``last.ckpt`` was
    written (its ``_last_global_step_saved`` and ``_last_checkpoint_saved``, which no public attribute
    mirrors: ``last_model_path`` is restored from a resumed run's checkpoint too)."""
    return callback._last_global_step_saved == step and bool(callback._last_checkpoint_saved)


# ---------------------------------------------------------------------------------- trainer, strategy


def uses_distributed_sampler(trainer: L.Trainer) -> bool:
    """Whether Lightning gives the training loader a ``DistributedSampler`` of its own: a distributed
    strategy with ``Trainer(use_distributed_sampler=True)``. The Trainer keeps neither the option nor the
    decision public (``_accelerator_connector``)."""
    connector = trainer._accelerator_connector
    return connector.use_distributed_sampler and connector.is_distributed


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    """The trainer ``module`` is attached to, or None: ``module.trainer`` raises when there is none."""
    return module._trainer


def forward_redirection(
    strategy: Strategy, wrapper: nn.Module, module: L.LightningModule, method: str, *args: Any
) -> Any:
    """``module.<method>(*args)`` called through ``wrapper``'s forward, as ``strategy`` calls the training
    and validation steps (FSDP gathers its shards only inside the wrapped forward). The strategy's
    ``_ForwardRedirection`` does it, and nothing public calls it for a method of one's own.
    """
    return strategy._forward_redirection(wrapper, module, method, *args)
