"""The random state a resumed run continues with.

Lightning checkpoints hold no random-number-generator state, so a resumed run would draw different dropout
masks than the uninterrupted one. :func:`rng_state` and :func:`set_rng_state` save and restore every generator
training draws from, and the :class:`ResumeRandomState` callback keeps them in every checkpoint.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from distill_lab import _compat
from distill_lab.resume.position import accumulation_window_start


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


class ResumeRandomState(L.Callback):
    """Saves the random number generators' state in every checkpoint and restores it when training resumes,
    so that a resumed run draws the same dropout masks as an uninterrupted one.

    The saved state is the one the next trained batch starts from: the current state for a checkpoint written
    between steps (step and epoch checkpoints; Lightning resumes with the next batch), the state at the start
    of the batch under way for one written during a step (Ctrl-C, an exception; Lightning repeats that batch).
    It is restored in ``on_train_start``, after the set-up and sanity validation that the resumed run does and
    the uninterrupted one did not. A checkpoint written inside a gradient-accumulation window saves the state
    at the window's first batch, which the resumed run repeats (:func:`accumulation_window_start`).

    In a distributed run every process has a state of its own (each draws for its own share of the batch, and
    how many numbers a draw takes can depend on the batch's shape), so a checkpoint holds every process's
    (``rng_states``, by rank; ``rng_state`` is rank 0's) and each process restores its own. A step or epoch
    checkpoint gathers them when it is written (every process writes it together); ``interrupted.ckpt`` is
    written by rank 0 alone, which cannot ask the others, so every process's state at the start of each batch
    is gathered when the batch starts: one small all-gather per batch in a DDP run, over a gloo (CPU) group so
    that it waits for no device, and none under FSDP, which writes no ``interrupted.ckpt``; and when a
    validation inside ``fit`` starts, for one written during it (which resumes by running it again, and draws
    nothing). One written between two steps (an exception in a callback after a step) holds rank 0's only.

    A checkpoint written during a step also keeps the loggers' step (Lightning's ``_batches_that_stepped``)
    as the repeated batch starts with it. Lightning assumes every checkpoint was written after a step and adds
    one when it restarts, so without this the resumed run would log every step one later than the
    uninterrupted run did; the saved value is put back when the first resumed batch starts.
    """

    LOGGING_STEP = "logging_step"
    PER_RANK = "rng_states"

    def __init__(self) -> None:
        # (batch ready count, random state of every process by rank, logging step) at a batch's start
        self._batch_start: tuple[int, list[dict], int] | None = None
        self._window_start: tuple[int, list[dict], int] | None = None  # of the accumulation window under way
        self._validation_start: list[dict] | None = None  # every process's, when a validation in fit began
        self._to_restore: dict | None = None
        self._logging_step: int | None = None
        self._gather_each_batch = False
        self._group = None  # the process group the states travel in (None: the default one)

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._gather_each_batch = trainer.world_size > 1 and not isinstance(trainer.strategy, FSDPStrategy)
        distributed = trainer.world_size > 1 and torch.distributed.is_initialized()
        if distributed and self._group is None and torch.distributed.get_backend() != "gloo":
            # the states are CPU objects: NCCL would copy them to the device and wait for it at every gather
            self._group = torch.distributed.new_group(backend="gloo")

    def _every_rank(self, trainer: L.Trainer, state: dict) -> list[dict]:
        """``state`` of every process, by rank (a collective: every process must call it)."""
        if trainer.world_size == 1:
            return [state]
        states = [None] * trainer.world_size
        torch.distributed.all_gather_object(states, state, group=self._group)
        return states

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if self._logging_step is not None:
            # the first batch of a run resumed from a checkpoint written mid-step
            _compat.set_logging_step(trainer, self._logging_step)
            self._logging_step = None
        states = self._every_rank(trainer, rng_state()) if self._gather_each_batch else [rng_state()]
        self._batch_start = (_compat.batch_counts(trainer).ready, states, _compat.logging_step(trainer))
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._window_start = self._batch_start

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # once per validation: what a run resumed from an interrupted.ckpt written during it restores in each
        # process
        if self._gather_each_batch and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validation_start = self._every_rank(trainer, rng_state())

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._validation_start = None

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        progress = _compat.batch_counts(trainer)
        under_way = (
            self._batch_start is not None and progress.processed < progress.ready == self._batch_start[0]
        )
        start = self._batch_start if under_way else None
        if accumulation_window_start(trainer) is not None and self._window_start is not None:
            start = self._window_start  # a resume replays the window (see checkpoints.InterruptedCheckpoint)
        if start is not None:
            states = start[1]
            checkpoint[self.LOGGING_STEP] = start[2]
        elif trainer.state.status == TrainerStatus.INTERRUPTED:
            # rank 0 alone (InterruptedCheckpoint): no gather; during a validation (which draws nothing),
            # every process's state as it began
            states = (
                self._validation_start if trainer.validating and self._validation_start else [rng_state()]
            )
        else:  # every process writes a step, epoch or best checkpoint together
            states = self._every_rank(trainer, rng_state())
        checkpoint["rng_state"] = states[0]
        if trainer.world_size > 1 and len(states) == trainer.world_size:
            checkpoint[self.PER_RANK] = states

    def on_load_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        states = checkpoint.get(self.PER_RANK)
        if states is not None and len(states) == trainer.world_size:
            self._to_restore = states[trainer.global_rank]
        else:
            # one process's state (another number of processes, or an older checkpoint): every process
            # takes it
            self._to_restore = checkpoint.get("rng_state")
        self._logging_step = checkpoint.get(self.LOGGING_STEP)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._to_restore is not None:
            set_rng_state(self._to_restore)
            self._to_restore = None
