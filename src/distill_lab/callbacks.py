"""Lightning callbacks: teacher vs student attention heat maps on a fixed validation example (the
checkpoint callbacks are in ``distill_lab.checkpoints``), and, until it moves to ``distill_lab.resume``, the
random state saved and restored."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import FSDPStrategy  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus  # noqa: E402
from torch import Tensor  # noqa: E402

from distill_lab import _compat  # noqa: E402
from distill_lab.capture import QueryKey  # noqa: E402
from distill_lab.matching import pair_name  # noqa: E402
from distill_lab.resume import accumulation_window_start, rng_state, set_rng_state  # noqa: E402

log = logging.getLogger(__name__)


def plot_attention_pairs(teacher_maps, student_maps, pairs, tokens=None, title=""):
    """A figure with one row per layer pair: teacher and student attention (head-averaged) side by side, on
    one colour scale per pair (0 to the larger of the two maps' largest weight, shown by the row's colour
    bar), so that their brightness compares.

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
    """After each validation epoch of training, draws the mapped layers' attention for a fixed validation
    example.

    The example is row ``example_index`` of the first validation batch (of rank 0 in a distributed run, which
    is the same example: validation is not shuffled and rank 0's share starts with the first one). The maps
    come from that validation step itself, so the callback runs no forward of its own: under FSDP a forward
    needs every process to take part.

    Saves ``{dirpath}/epoch{N}-step{S}.png`` (``S`` the optimizer steps taken) and logs the image to a wandb
    or TensorBoard logger as ``attention_maps``. Validation outside ``fit`` (``trainer.validate``, e.g. the
    final evaluation of the best checkpoint) draws nothing: it belongs to no training epoch, and
    ``current_epoch`` would then name one that never ran.
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
                f"callbacks.attention_maps.example_index={self.example_index} is not a row of a validation "
                f"batch of {batch_size}: choose an index below data.eval_batch_size"
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
                "callbacks.attention_maps.example_index=%d: the validation set has only %d examples; drawing "
                "the first",
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
        # stepped, which is raised only after a validation that runs inside the epoch (global_step is already
        # 1 up)
        step = _compat.logging_step(trainer)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="attention_maps", images=[str(path)], step=step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # tensorboard
                image = torch.from_numpy(plt.imread(path)[..., :3]).permute(2, 0, 1)
                logger.experiment.add_image("attention_maps", image, step)


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
        if (
            self._logging_step is not None
        ):  # the first batch of a run resumed from a checkpoint written mid-step
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
        else:
            # one process's state (another number of processes, or an older checkpoint): every process
            # takes it
            self._to_restore = checkpoint.get("rng_state")
        self._logging_step = checkpoint.get(self.LOGGING_STEP)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._to_restore is not None:
            set_rng_state(self._to_restore)
            self._to_restore = None
