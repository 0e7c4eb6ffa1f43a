"""Lightning callbacks: teacher vs student attention heat maps on a fixed validation example, a
``last.ckpt`` that is written on a step interval and at the end of training, and what makes a run survive
interruption: an ``interrupted.ckpt`` on Ctrl-C or an exception, no checkpoint with non-finite weights, and the
random state saved and restored (see ``distill_lab.resume``)."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus  # noqa: E402
from torch import Tensor  # noqa: E402

from distill_lab.capture import QueryKey  # noqa: E402
from distill_lab.guards import describe_names, non_finite_parameters  # noqa: E402
from distill_lab.matching import pair_name  # noqa: E402
from distill_lab.resume import (  # noqa: E402
    accumulation_window_start,
    restart_validation,
    rewind_to_batch,
    rng_state,
    set_rng_state,
)

log = logging.getLogger(__name__)


def plot_attention_pairs(teacher_maps, student_maps, pairs, tokens=None, title=""):
    """A figure with one row per layer pair: teacher and student attention (head-averaged) side by side, on one
    colour scale per pair (0 to the larger of the two maps' largest weight, shown by the row's colour bar), so
    that their brightness compares.

    Shape:
        teacher_maps, student_maps: {layer: (H, L, L)} for one example, padding already removed.
    """
    fig, axes = plt.subplots(
        len(pairs), 2, figsize=(7.6, 3.2 * len(pairs)), squeeze=False, layout="constrained"
    )
    for row, (t_layer, s_layer) in enumerate(pairs):
        shown = [
            maps[layer].float().mean(0).cpu().numpy()
            for maps, layer in ((teacher_maps, t_layer), (student_maps, s_layer))
        ]
        top = max(float(m.max()) for m in shown) or 1.0
        for col, (who, layer) in enumerate((("teacher", t_layer), ("student", s_layer))):
            ax = axes[row][col]
            image = ax.imshow(shown[col], cmap="viridis", vmin=0.0, vmax=top)
            ax.set_title(f"{who} layer {layer} ({pair_name((t_layer, s_layer))})", fontsize=9)
            if tokens is not None and len(tokens) <= 40:
                ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
                ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
        fig.colorbar(image, ax=axes[row].tolist(), fraction=0.046, pad=0.02)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def example_attention(attention, index: int) -> Tensor:
    """One example's attention probabilities (H, Lq, Lk), from a probability tensor or a ``QueryKey`` record
    (recomputed for that example alone, not for the whole batch)."""
    if not isinstance(attention, QueryKey):
        return attention[index]
    row = slice(index, index + 1)
    mask = attention.mask
    if mask is not None and mask.shape[0] > 1:
        mask = mask[row]
    return dataclasses.replace(
        attention, query=attention.query[row], key=attention.key[row], mask=mask
    ).probs()[0]


class AttentionMapCallback(L.Callback):
    """After each validation epoch of training, draws the mapped layers' attention for a fixed validation example.

    The example is row ``example_index`` of the first validation batch (of rank 0 in a distributed run, which is
    the same example: validation is not shuffled and rank 0's share starts with the first one). The maps come
    from that validation step itself, so the callback runs no forward of its own: under FSDP a forward needs
    every process to take part.

    Saves ``{dirpath}/epoch{N}-step{S}.png`` (``S`` the optimizer steps taken) and logs the image to a wandb or TensorBoard logger as
    ``attention_maps``. Validation outside ``fit`` (``trainer.validate``, e.g. the final evaluation of the best
    checkpoint) draws nothing: it belongs to no training epoch, and ``current_epoch`` would then name one that
    never ran.
    """

    def __init__(self, dirpath: str, example_index: int = 0) -> None:
        if example_index < 0:
            raise ValueError(f"callbacks.attention_maps.example_index must be >= 0, got {example_index}")
        self.dirpath = Path(dirpath)
        self.example_index = example_index
        self._example = None

    def setup(self, trainer: L.Trainer, module, stage: str) -> None:
        batch_size = getattr(trainer.datamodule, "eval_batch_size", None)
        if batch_size is not None and self.example_index >= batch_size:
            raise ValueError(
                f"callbacks.attention_maps.example_index={self.example_index} is not a row of a validation batch of "
                f"{batch_size}: choose an index below data.eval_batch_size"
            )

    def _draws(self, trainer: L.Trainer) -> bool:
        return (
            not trainer.sanity_checking and trainer.is_global_zero and trainer.state.fn == TrainerFn.FITTING
        )

    @torch.no_grad()
    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or not self._draws(trainer) or outputs is None:
            return
        index = self.example_index
        if index >= outputs.teacher_logits.shape[0]:  # a validation set smaller than one batch
            log.warning(
                "callbacks.attention_maps.example_index=%d: the validation set has only %d examples; drawing the first",
                index, outputs.teacher_logits.shape[0],
            )  # fmt: skip
            index = 0
        # the example's real tokens, wherever the padding is (right, or left as causal tokenizers often pad)
        mask = batch.get("attention_mask")
        keep = mask[index].bool().cpu() if mask is not None else slice(None)

        def crop(attention):
            maps = example_attention(attention, index).cpu()
            return maps[:, keep][:, :, keep]

        tokens = None
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is not None and "input_ids" in batch:
            tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][index].cpu()[keep].tolist())
        teacher = {k: crop(v) for k, v in outputs.teacher_maps.items()}
        student = {k: crop(v) for k, v in outputs.student_maps.items()}
        self._example = teacher, student, tokens

    def on_validation_epoch_end(self, trainer: L.Trainer, module) -> None:
        if self._example is None:
            return
        teacher_maps, student_maps, tokens = self._example
        self._example = None
        epoch = trainer.current_epoch
        fig = plot_attention_pairs(
            teacher_maps,
            student_maps,
            module.attention_loss.layer_map,
            tokens,
            f"attention, epoch {epoch} (head mean)",
        )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        # one file per validation: several run in an epoch under trainer.val_check_interval
        path = self.dirpath / f"epoch{epoch}-step{trainer.global_step}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        # the step this validation's scalars are logged at: Lightning logs with the count of batches that have
        # stepped, which is raised only after a validation that runs inside the epoch (global_step is already 1 up)
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="attention_maps", images=[str(path)], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # tensorboard
                image = torch.from_numpy(plt.imread(path)[..., :3]).permute(2, 0, 1)
                logger.experiment.add_image("attention_maps", image, step)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps *and* when training ends.

    Lightning's ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` writes ``last.ckpt`` on multiples of
    N only (at the end of training only if it never wrote one), so after a run of 64 steps with N = 5 the
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
        self._deferred_to: str | None = (
            None  # "validation_end" or "epoch_end": where a due step checkpoint waits
        )

    def on_train_batch_end(
        self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        epoch_loop = trainer.fit_loop.epoch_loop
        progress = epoch_loop.batch_progress
        if progress.is_last_batch or progress.current.ready >= trainer.num_training_batches:
            wait_for = "epoch_end"
        elif epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher):
            wait_for = "validation_end"
        else:
            super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
            return
        if self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0:
            self._deferred_to = wait_for

    def _save_deferred(self, trainer: L.Trainer, now: str) -> None:
        if self._deferred_to != now:
            return
        self._deferred_to = None
        if not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_validation_end(trainer, module)
        self._save_deferred(trainer, "validation_end")

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, module)
        self._save_deferred(trainer, "epoch_end")

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step or not self._last_checkpoint_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


# ---------------------------------------------------------------------------------------------- surviving interruption


class FiniteCheckpoints(L.Callback):
    """Refuses to write a checkpoint whose trainable weights are not finite, so every checkpoint on disk can
    be resumed.

    The module stops on a non-finite loss before the update (``DistillationModule._stop_if_not_finite``),
    but a finite loss can still give non-finite gradients whose update leaves NaN weights; a step checkpoint
    written right after that update would then replace the last good ``last.ckpt``. The check runs only when
    a checkpoint is written (all parameters, once per save), and raises ``FloatingPointError`` naming the step
    and the parameters, which stops the run with the previous checkpoints untouched.
    """

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        if bad := non_finite_parameters(module):
            raise FloatingPointError(
                f"non-finite weights at step {trainer.global_step} in {describe_names(bad)}, "
                "probably from non-finite gradients in the last update; no checkpoint was written, the ones on disk "
                "hold the last finite weights. Lower optimizer.lr or check the data of this step."
            )


class InterruptedCheckpoint(L.Callback):
    """Writes ``{dirpath}/{filename}.ckpt`` when training stops on an exception, Ctrl-C included, so that the
    run can resume from where it stopped (``ckpt_path=auto`` takes it when it is newer than ``last.ckpt``).

    Unlike Lightning's ``OnExceptionCheckpoint`` it writes nothing on a non-finite stop (a
    ``FloatingPointError``: see ``DistillationModule.training_step`` and :class:`FiniteCheckpoints`) nor while
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
    """

    def __init__(self, dirpath: str, filename: str = "interrupted") -> None:
        self.dirpath = Path(dirpath)
        self.filename = filename
        self._sigint = None  # the SIGINT handler a step under way replaced, to hold Ctrl-C back until it ends
        self._deferring = False
        self._interrupted = False  # a Ctrl-C came during the step under way

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
            # The other processes may be anywhere, e.g. waiting in a gradient all-reduce: nothing here may wait
            # for them (trainer.save_checkpoint ends in a barrier). Every DDP process holds the whole model, so
            # rank 0 writes it alone; FSDP's shards would need every process to gather them.
            if isinstance(trainer.strategy, FSDPStrategy):
                log.warning(
                    "not writing %s: under FSDP it needs every process; last.ckpt is the newest",
                    self.ckpt_path,
                )
                return
            if not trainer.is_global_zero:
                return
        checkpoint = trainer._checkpoint_connector.dump_checkpoint()  # what trainer.save_checkpoint writes
        if (start := accumulation_window_start(trainer)) is not None:
            # inside a gradient-accumulation window: its gradients are not in the checkpoint, so the resumed run
            # replays the window from its first batch (the data module and ResumeRandomState record the same)
            rewind_to_batch(checkpoint["loops"], start)
            log.info(
                "stopped inside a gradient-accumulation window: %s resumes at its first batch, %d",
                self.ckpt_path,
                start,
            )
        elif trainer.validating:
            # as written, Lightning would resume after the validation's last finished batch (or take it for done)
            restart_validation(checkpoint["loops"])
            log.info("stopped during a validation: %s resumes by running it again", self.ckpt_path)
        trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.ckpt_path)
        log.info(
            "%s stopped training at step %d; saved %s",
            type(exception).__name__,
            trainer.global_step,
            self.ckpt_path,
        )


class ResumeRandomState(L.Callback):
    """Saves the random number generators' state in every checkpoint and restores it when training resumes,
    so that a resumed run draws the same dropout masks as an uninterrupted one.

    The saved state is the one the next trained batch starts from: the current state for a checkpoint written
    between steps (step and epoch checkpoints; Lightning resumes with the next batch), the state at the start
    of the batch under way for one written during a step (Ctrl-C, an exception; Lightning repeats that batch).
    It is restored in ``on_train_start``, after the set-up and sanity validation that the resumed run does and
    the uninterrupted one did not. A checkpoint written inside a gradient-accumulation window saves the state
    at the window's first batch, which the resumed run repeats (``resume.accumulation_window_start``).

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
        self._window_start: tuple[int, list[dict], int] | None = (
            None  # of the gradient-accumulation window under way
        )
        self._validation_start: list[dict] | None = (
            None  # every process's state when a validation in fit began
        )
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
        epoch_loop = trainer.fit_loop.epoch_loop
        if (
            self._logging_step is not None
        ):  # the first batch of a run resumed from a checkpoint written mid-step
            epoch_loop._batches_that_stepped, self._logging_step = self._logging_step, None
        states = self._every_rank(trainer, rng_state()) if self._gather_each_batch else [rng_state()]
        self._batch_start = (
            epoch_loop.batch_progress.current.ready,
            states,
            epoch_loop._batches_that_stepped,
        )
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self._window_start = self._batch_start

    def on_validation_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # once per validation: what a run resumed from an interrupted.ckpt written during it restores in each process
        if self._gather_each_batch and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validation_start = self._every_rank(trainer, rng_state())

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._validation_start = None

    def on_save_checkpoint(self, trainer: L.Trainer, module: L.LightningModule, checkpoint: dict) -> None:
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        under_way = (
            self._batch_start is not None and progress.processed < progress.ready == self._batch_start[0]
        )
        start = self._batch_start if under_way else None
        if accumulation_window_start(trainer) is not None and self._window_start is not None:
            start = self._window_start  # a resume replays the accumulation window (see InterruptedCheckpoint)
        if start is not None:
            states = start[1]
            checkpoint[self.LOGGING_STEP] = start[2]
        elif (
            trainer.state.status == TrainerStatus.INTERRUPTED
        ):  # rank 0 alone (InterruptedCheckpoint): no gather
            # during a validation (which draws nothing), every process's state as it began
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
        else:  # one process's state (another number of processes, or an older checkpoint): every process takes it
            self._to_restore = checkpoint.get("rng_state")
        self._logging_step = checkpoint.get(self.LOGGING_STEP)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._to_restore is not None:
            set_rng_state(self._to_restore)
            self._to_restore = None
