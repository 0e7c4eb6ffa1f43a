"""Lightning callbacks: teacher vs student attention heat maps on a fixed validation example. The checkpoint
callbacks are in ``distill_lab.checkpoints``, the random state's in ``distill_lab.resume.rng``."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402
from torch import Tensor  # noqa: E402

from distill_lab import _compat  # noqa: E402
from distill_lab.capture import QueryKey  # noqa: E402
from distill_lab.matching import pair_name  # noqa: E402

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
    return attention.examples(slice(index, index + 1)).probs()[0]


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
