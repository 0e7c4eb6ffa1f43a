"""Where in the data, and in Lightning's loops, a resumed run continues.

A mid-epoch checkpoint must resume on the batch after the last one trained, in the same order, or the resumed
run trains on different data than an uninterrupted one. Lightning 2.6 offers ``state_dict()`` on the
dataloader for this, but it does not work here: the loader's state is taken after the fetcher has already
prefetched the next batch (one batch too far), and it is never loaded back when ``configure_optimizers`` reads
``trainer.estimated_stepping_batches`` (which ours does; Lightning issue #20550) because that builds the
loader before the checkpoint's loop state is restored. So the position comes from the trainer's own loop
progress when the checkpoint is written (:func:`training_position`), is saved by the data module
(``data.TrainValidationData.state_dict``, restored before any loader is built), and the sampler
(:class:`ResumableRandomSampler`, :class:`ResumableDistributedSampler` in a distributed run) starts its epoch
part-way through (in a distributed run, each process's sampler its share of the epoch: the position counts the
examples of one process's share).

A checkpoint written where Lightning would resume on the wrong batch has its saved loop state rewritten before
it is saved: inside a gradient-accumulation window (:func:`accumulation_window_start`,
:func:`rewind_to_batch`) and during a validation (:func:`restart_validation`).
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import DistributedSampler, RandomSampler

from distill_lab import _compat

log = logging.getLogger(__name__)


class ResumableRandomSampler(RandomSampler):
    """A shuffled order that depends only on ``(seed, epoch)``, and can start part-way through an epoch.

    Epoch ``e`` visits ``torch.randperm(n)`` drawn from a generator seeded with ``seed + e`` (the
    ``DistributedSampler`` convention; Lightning calls ``set_epoch`` before every epoch). Setting ``start``
    skips the first ``start`` examples of the next iteration only, without loading them, so a run resumed
    mid-epoch sees exactly the examples the interrupted run had not trained on, in the same order. ``len``
    stays the full epoch, as Lightning counts a resumed epoch's batches from its beginning.

    With ``tagged`` it yields ``(epoch, index)`` pairs instead of indices, for a dataset that hands a row its
    epoch (``data_module.EpochTagged``: masked-LM masks drawn from the epoch and the examples).

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
    ``num_replicas`` visits positions ``rank, rank + num_replicas, ...`` of the same seeded permutation of
    epoch ``e`` (``torch.randperm(n)`` seeded with ``seed + e``), padded at its end with its first examples to
    a multiple of ``num_replicas``, which is ``DistributedSampler(shuffle=True, seed=seed)``'s order exactly.
    ``start`` skips the first ``start`` examples of this process's share of the next iteration only;
    ``tagged`` as there.

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
    epochs = _compat.epoch_counts(trainer)
    if epochs.started <= epochs.processed:  # between epochs (or before the first)
        return epochs.processed, 0
    batches = _compat.batch_counts(trainer).processed
    if batches >= trainer.num_training_batches:
        return epochs.processed + 1, 0
    start = accumulation_window_start(trainer)
    return epochs.processed, batches if start is None else start


def accumulation_window_start(trainer) -> int | None:
    """The batch (of this epoch) where the gradient-accumulation window under way began, when a checkpoint
    written now would fall inside it; None otherwise.

    With ``accumulate_grad_batches`` = A, Lightning steps after batches A-1, 2A-1... of each epoch (and its
    last). A checkpoint written after some of a window's batches but before its step (Ctrl-C or an exception)
    holds none of their gradients: resumed at the batch it stopped on, the window's step would take the
    gradients of its last batches only. Such a checkpoint must resume at the window's first batch, replaying
    it whole.
    """
    if trainer is None or trainer.state.fn != TrainerFn.FITTING or trainer.accumulate_grad_batches <= 1:
        return None
    epochs = _compat.epoch_counts(trainer)
    batches = _compat.batch_counts(trainer).processed
    if epochs.started <= epochs.processed or batches >= trainer.num_training_batches:
        return None
    into = batches % trainer.accumulate_grad_batches
    return batches - into if into else None


def rewind_to_batch(checkpoint: dict, batch: int) -> None:
    """Rewrites the loop state of a checkpoint (written during this epoch's batch ``batch`` or later) so that
    Lightning resumes the epoch at ``batch``: as it records a checkpoint written when that batch was about to
    start (its ``on_train_batch_start``), the optimizer's zeroing of the gradients, done on a window's first
    batch, undone with it. Optimizer steps stay as they are: none was taken since."""
    _compat.set_saved_batch_progress(
        checkpoint, "train", ready=batch + 1, started=batch, processed=batch, completed=batch
    )
    _compat.undo_saved_zero_grad(checkpoint)


def restart_validation(checkpoint: dict) -> None:
    """Rewrites the loop state of a checkpoint written during a validation inside ``fit`` so that Lightning
    resumes by running that validation again from its first batch, then trains on.

    As written, Lightning takes such a checkpoint for one written after the validation's last finished batch:
    it skips the batches before it and reports metrics of the rest only (or, stopped before the first batch,
    takes the validation for done). Recorded as stopped during its first batch, the validation restarts
    whole: the training batch before it is complete and the optimizer state untouched, since validation
    changes neither."""
    _compat.set_saved_batch_progress(checkpoint, "validation", ready=1, started=1, processed=0, completed=0)
