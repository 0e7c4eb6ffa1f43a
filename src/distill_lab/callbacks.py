"""Lightning callbacks: teacher vs student attention heat maps on a fixed validation example, and a
``last.ckpt`` that is written on a step interval and at the end of training."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.trainer.states import TrainerFn  # noqa: E402

from distill_lab.capture import QueryKey  # noqa: E402
from distill_lab.matching import pair_name  # noqa: E402


def _probs(attention):
    return attention.probs() if isinstance(attention, QueryKey) else attention


def plot_attention_pairs(teacher_maps, student_maps, pairs, tokens=None, title=""):
    """A figure with one row per layer pair: teacher and student attention (head-averaged) side by side.

    Shape:
        teacher_maps, student_maps: {layer: (H, L, L)} for one example, padding already removed.
    """
    fig, axes = plt.subplots(len(pairs), 2, figsize=(7, 3.2 * len(pairs)), squeeze=False)
    for row, (t_layer, s_layer) in enumerate(pairs):
        for col, (who, maps, layer) in enumerate((("teacher", teacher_maps, t_layer), ("student", student_maps, s_layer))):
            ax = axes[row][col]
            ax.imshow(maps[layer].float().mean(0).cpu().numpy(), cmap="viridis", vmin=0.0)
            ax.set_title(f"{who} layer {layer} ({pair_name((t_layer, s_layer))})", fontsize=9)
            if tokens is not None and len(tokens) <= 40:
                ax.set_xticks(range(len(tokens)), tokens, rotation=90, fontsize=6)
                ax.set_yticks(range(len(tokens)), tokens, fontsize=6)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


class AttentionMapCallback(L.Callback):
    """After each validation epoch of training, draws the mapped layers' attention for a fixed validation example.

    Saves ``{dirpath}/epoch{N}.png`` and logs the image to a wandb or TensorBoard logger as
    ``attention_maps``. Validation outside ``fit`` (``trainer.validate``, e.g. the final evaluation of the best
    checkpoint) draws nothing: it belongs to no training epoch, and ``current_epoch`` would then name one that
    never ran.
    """

    def __init__(self, dirpath: str, example_index: int = 0) -> None:
        self.dirpath = Path(dirpath)
        self.example_index = example_index

    @torch.no_grad()
    def on_validation_epoch_end(self, trainer: L.Trainer, module) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.datamodule is None:
            return
        if trainer.state.fn != TrainerFn.FITTING:
            return
        batch = trainer.datamodule.example_batch("validation", self.example_index + 1)
        inputs = {k: v[self.example_index : self.example_index + 1].to(module.device) for k, v in batch.items() if k != "labels"}
        _, teacher_maps = module.teacher_capture(**inputs)
        was_training = module.student.training
        module.student.eval()
        _, student_maps = module.student_capture(**inputs)
        module.student.train(was_training)
        # the example's real tokens, wherever the padding is (right, or left as causal tokenizers often pad)
        mask = inputs.get("attention_mask")
        keep = mask[0].bool().cpu() if mask is not None else slice(None)

        def crop(attention):
            maps = _probs(attention)[0].cpu()
            return maps[:, keep][:, :, keep]

        teacher_maps = {k: crop(v) for k, v in teacher_maps.items()}
        student_maps = {k: crop(v) for k, v in student_maps.items()}
        tokens = None
        tokenizer = getattr(trainer.datamodule, "tokenizer", None)
        if tokenizer is not None and "input_ids" in inputs:
            tokens = tokenizer.convert_ids_to_tokens(inputs["input_ids"][0].cpu()[keep].tolist())
        epoch = trainer.current_epoch
        fig = plot_attention_pairs(
            teacher_maps, student_maps, module.attention_loss.layer_map, tokens, f"attention, epoch {epoch} (head mean)"
        )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"epoch{epoch}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="attention_maps", images=[str(path)], step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):  # tensorboard
                image = torch.from_numpy(plt.imread(path)[..., :3]).permute(2, 0, 1)
                logger.experiment.add_image("attention_maps", image, trainer.global_step)


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` steps *and* when training ends.

    Lightning's ``ModelCheckpoint(save_last=True, every_n_train_steps=N)`` writes ``last.ckpt`` on multiples of
    N only (at the end of training only if it never wrote one), so after a run of 64 steps with N = 5 the
    "last" checkpoint holds step 60 and resuming from it repeats four steps. Here the end of training always
    writes it too, so ``last.ckpt`` of a finished run is its final state.
    """

    def __init__(self, dirpath: str, every_n_train_steps: int = 100, **kwargs) -> None:
        super().__init__(dirpath=dirpath, save_top_k=0, save_last=True, every_n_train_steps=every_n_train_steps, **kwargs)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._last_global_step_saved != trainer.global_step or not self._last_checkpoint_saved:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
