"""Checkpoint callbacks that make a run resumable: ``last.ckpt`` on a step interval and at the end of
training (:class:`LastCheckpoint`), ``interrupted.ckpt`` on Ctrl-C or an exception
(:class:`InterruptedCheckpoint`), and no checkpoint with non-finite weights (:class:`FiniteCheckpoints`).

Where a resumed run continues (which checkpoint, which batch, which random state) is ``distill_lab.resume``'s;
these callbacks write the checkpoints it reads, at moments from which Lightning resumes on the right batch.
Each of them makes the trainer's saves atomic (``checkpoint_files.use_atomic_saves``: a temporary file beside
the checkpoint, fsync, rename), so that no checkpoint name ever holds a partial file, ``best.ckpt`` included.
"""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn

from distill_lab import _compat
from distill_lab.checkpoint_files import use_atomic_saves
from distill_lab.guards import describe_names, non_finite_parameters
from distill_lab.resume import accumulation_window_start, restart_validation, rewind_to_batch

log = logging.getLogger(__name__)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps *and* when training ends.

    Lightning's ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` writes ``last.ckpt`` on multiples
    of N only (at the end of training only if it never wrote one), so after a run of 64 steps with N = 5 the
    "last" checkpoint holds step 60 and resuming from it repeats four steps. Here the end of training always
    writes it too, so ``last.ckpt`` of a finished run is its final state.

    A step checkpoint due on an epoch's last batch is written at the end of the epoch (``on_train_epoch_end``,
    after its validation and the best checkpoint's, which Lightning calls first), and one due on a batch
    that a mid-epoch validation follows (``trainer.val_check_interval``) at the end of that validation.
    Written in ``on_train_batch_end``, as Lightning 2.6 writes it, a resume takes that validation for done
    (and the epoch for finished, on its last batch): it never runs, its metrics are never logged and the
    best checkpoint never sees it. Written after it, the checkpoint holds the best checkpoint's record of it
    and Lightning resumes with the next batch or epoch.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, **kwargs) -> None:
        super().__init__(
            dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps, **kwargs
        )
        self._step_interval = every_n_train_steps or 0
        # "validation_end" or "epoch_end": where a due step checkpoint waits
        self._deferred_to: str | None = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, module, stage)
        use_atomic_saves(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if (
            _compat.is_last_batch(trainer)
            or _compat.batch_counts(trainer).ready >= trainer.num_training_batches
        ):
            wait_for = "epoch_end"
        elif _compat.validation_follows_batch(trainer):
            wait_for = "validation_end"
        else:
            super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
            return
        if self._step_interval >= 1 and trainer.global_step % self._step_interval == 0:
            self._deferred_to = wait_for

    def _save_deferred(self, trainer: L.Trainer, now: str) -> None:
        if self._deferred_to != now:
            return
        self._deferred_to = None
        if not _compat.should_skip_saving(self, trainer):
            _compat.save_last_checkpoint(self, trainer)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_validation_end(trainer, module)
        self._save_deferred(trainer, "validation_end")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, module)
        self._save_deferred(trainer, "epoch_end")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not _compat.saved_last_at(self, trainer.global_step):
            _compat.save_last_checkpoint(self, trainer)


class FiniteCheckpoints(L.Callback):
    """Refuses to write a checkpoint whose trainable weights are not finite, so every checkpoint on disk can
    be resumed.

    The module stops on a non-finite loss before the update (``guards.StopOnNonFiniteLoss``),
    but a finite loss can still give non-finite gradients whose update leaves NaN weights; a step checkpoint
    written right after that update would then replace the last good ``last.ckpt``. The check runs only when
    a checkpoint is written (all parameters, once per save), and raises ``FloatingPointError`` naming the step
    and the parameters, which stops the run with the previous checkpoints untouched.
    """

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        use_atomic_saves(trainer)

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        if bad := non_finite_parameters(module):
            raise FloatingPointError(
                f"non-finite weights at step {trainer.global_step} in {describe_names(bad)}, "
                "probably from non-finite gradients in the last update; no checkpoint was written, the ones "
                "on disk hold the last finite weights. Lower optimizer.lr or check the data of this step."
            )


class InterruptedCheckpoint(L.Callback):
    """Writes ``{dirpath}/{filename}.ckpt`` when training stops on an exception, Ctrl-C included, so that the
    run can resume from where it stopped (``ckpt_path=auto`` takes it when it is newer than ``last.ckpt``).

    Unlike Lightning's ``OnExceptionCheckpoint`` it writes nothing on a non-finite stop (a
    ``FloatingPointError``: see ``guards.StopOnNonFiniteLoss`` and :class:`FiniteCheckpoints`) nor while
    the trainable weights are non-finite: resuming there would replay the failing step, and the last good
    ``last.ckpt`` must stay the newest checkpoint. One written during a validation inside ``fit`` resumes by
    running that validation again (``resume.restart_validation``). Only exceptions during ``fit`` count (the
    final validation of the best checkpoint holds no training state worth saving). It is deliberately not an
    ``OnExceptionCheckpoint``: with one present Lightning turns ``fit(ckpt_path=None)`` into ``"last"`` and
    resumes from this directory's newest checkpoint, and ``ckpt_path=null`` must mean a fresh start.

    A Ctrl-C during a training step is taken when the step ends (a second one stops at once). Python raises
    the KeyboardInterrupt wherever the program is: inside the optimizer's update it would leave some
    parameters (and their Adam moments) updated and others not, a state the uninterrupted run never had. The
    step finishes, this checkpoint holds its result, and the resumed run starts with the next batch.

    Nothing is written for an exception before training began (while ``fit`` sets up or restores a
    checkpoint): such a checkpoint would hold the freshly built state at step 0 in place of the run's
    progress. When writing it fails too (a full disk), the exception that stopped the run stays the one
    raised, and this failure is added to it as a note.
    """

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self._sigint = None  # the SIGINT handler a step under way replaced, to hold Ctrl-C back until it ends
        self._deferring = False
        self._interrupted = False  # a Ctrl-C came during the step under way
        self._training = False  # this fit has restored its checkpoint and reached its training loop

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        use_atomic_saves(trainer)
        self._training = False

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._training = True

    def _defer_interrupt(self, signum, frame) -> None:
        if self._interrupted:  # a second Ctrl-C: stop now
            self._stop_deferring()
            raise KeyboardInterrupt
        self._interrupted = True
        log.warning("Ctrl-C: stopping when this training step ends (press Ctrl-C again to stop now)")

    def _stop_deferring(self) -> None:
        if self._deferring and signal.getsignal(signal.SIGINT) == self._defer_interrupt:
            # (not where Lightning has since set its own, to ignore Ctrl-C while it shuts down)
            signal.signal(
                signal.SIGINT, self._sigint if self._sigint is not None else signal.default_int_handler
            )
        self._deferring, self._sigint = False, None

    def on_train_batch_start(
        self, trainer: L.Trainer, module: L.LightningModule, batch, batch_idx: int
    ) -> None:
        if threading.current_thread() is threading.main_thread() and not self._deferring:
            self._sigint = signal.signal(signal.SIGINT, self._defer_interrupt)
            self._deferring = True

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        self._stop_deferring()
        if self._interrupted:
            self._interrupted = False
            raise KeyboardInterrupt  # between steps: the checkpoint holds this step's result

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._stop_deferring()

    @property
    def ckpt_path(self) -> str:
        return str(self.dirpath / f"{self.filename}.ckpt")

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._stop_deferring()
        if trainer.state.fn != TrainerFn.FITTING:
            return
        if not self._training:
            # set-up failed (a wrong setting, a checkpoint that did not load): nothing trained, and a
            # checkpoint of the freshly built state would replace the interrupted.ckpt of a run with steps
            log.info(
                "%s stopped fit before training began: no %s written",
                type(exception).__name__,
                self.ckpt_path,
            )
            return
        if isinstance(exception, FloatingPointError):
            log.warning(
                "a non-finite stop writes no %s; the last good checkpoint is the newest", self.ckpt_path
            )
            return
        if bad := non_finite_parameters(module):
            log.warning(
                "not writing %s: the weights are non-finite (%s)", self.ckpt_path, describe_names(bad)
            )
            return
        if trainer.world_size > 1:
            # The other processes may be anywhere, e.g. waiting in a gradient all-reduce: nothing here may
            # wait for them (trainer.save_checkpoint ends in a barrier). Every DDP process holds the whole
            # model, so rank 0 writes it alone; FSDP's shards would need every process to gather them.
            if isinstance(trainer.strategy, FSDPStrategy):
                log.warning(
                    "not writing %s: under FSDP it needs every process; last.ckpt is the newest",
                    self.ckpt_path,
                )
                return
            if not trainer.is_global_zero:
                return
        checkpoint = _compat.dump_checkpoint(trainer)  # what trainer.save_checkpoint writes
        if (start := accumulation_window_start(trainer)) is not None:
            # inside a gradient-accumulation window: its gradients are not in the checkpoint, so the resumed
            # run replays the window from its first batch (the data module and ResumeRandomState record the
            # same)
            rewind_to_batch(checkpoint, start)
            log.info(
                "stopped inside a gradient-accumulation window: %s resumes at its first batch, %d",
                self.ckpt_path,
                start,
            )
        elif trainer.validating:
            # as written, Lightning would resume after the validation's last finished batch (or take it for
            # done)
            restart_validation(checkpoint)
            log.info("stopped during a validation: %s resumes by running it again", self.ckpt_path)
        try:
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.ckpt_path)
        except Exception as err:  # e.g. the full disk that stopped the run: the first error is the one raised
            log.error("saving %s failed too: %r", self.ckpt_path, err)
            exception.add_note(
                f"saving {self.ckpt_path} failed too ({type(err).__name__}: {err}); the other checkpoints "
                "are as they were"
            )
            return
        log.info(
            "%s stopped training at step %d; saved %s",
            type(exception).__name__,
            trainer.global_step,
            self.ckpt_path,
        )
