"""What keeps a run's weights and schedule sound: a stop before the update of a non-finite loss and right
after an update that made the weights non-finite, and the configured learning rate for a run resumed from a
checkpoint that used another.

Both are callbacks that every fit of ``DistillationModule`` registers itself (its ``configure_callbacks``),
whatever ``callbacks=`` holds: unlike the attention maps, they are no option a user may drop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from distill_lab.checkpoint_files import DOCUMENTED_CHECKPOINTS, newest_valid_checkpoint

log = logging.getLogger(__name__)


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity (the frozen teacher cannot turn so)."""
    return [name for name, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def all_finite(module: torch.nn.Module) -> bool:
    """Whether every trainable parameter of ``module`` is finite: one wait for the device."""
    checks = [torch.isfinite(p).all() for p in module.parameters() if p.requires_grad]
    return bool(torch.stack(checks).all()) if checks else True


def last_finite_checkpoint(trainer: L.Trainer) -> str:
    """Where the weights before a non-finite stop are, in words for its message: the readable checkpoint
    with the most trained steps in the directories of ``trainer``'s callbacks (``last.ckpt``,
    ``interrupted.ckpt``, ``best.ckpt``; none is ever written with non-finite weights) or the one this fit
    resumed from, and how to go on from it; or that none exists."""
    directories = {
        Path(d) for c in trainer.callbacks if isinstance(d := getattr(c, "dirpath", None), str | Path)
    }
    candidates = [d / name for d in sorted(directories) for name in DOCUMENTED_CHECKPOINTS]
    if trainer.ckpt_path and Path(trainer.ckpt_path).is_file():
        candidates.append(Path(trainer.ckpt_path))
    if (found := newest_valid_checkpoint(candidates)) is None:
        return (
            "no checkpoint holds earlier weights (none was written before this step; "
            "checkpoint_every_n_steps sets how often one is): lower optimizer.lr and start again"
        )
    path, step = found
    return (
        f"the last finite weights are in {path} (step {step}): lower optimizer.lr and go on from them with "
        f"ckpt_path={path}"
    )


def describe_names(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class StopOnNonFiniteLoss(L.Callback):
    """Stops on a non-finite loss before the update, naming the step and the part that went non-finite (the
    output loss, layer pairs), and on non-finite weights right after the update that made them (a finite loss
    can have non-finite gradients), naming the parameters. Either message names the checkpoint that holds
    the last finite weights, or says that none exists (:func:`last_finite_checkpoint`).

    Checked once per optimizer step, after backward: one wait for the device per step, and under DDP or FSDP
    one decision for all processes (a loss that is non-finite on one of them has made every process's
    averaged gradients so), so they all stop together. The update never happens and no checkpoint of it is
    written (``InterruptedCheckpoint`` skips a ``FloatingPointError``), so the newest checkpoint on disk holds
    the last good weights.

    The losses are the module's ``since_update``: ``(logged losses, batch index)`` of each micro-batch since
    the last update, ``train/loss``, ``train/output_loss``, ``train/attention_loss`` and
    ``train/attention/<pair>`` among the logged losses. Lightning calls this hook before the module's own,
    which logs and clears them.

    The weights are checked at the end of each batch that took an optimizer step, one more wait for the
    device per step and one decision for all processes. Lightning calls the checkpoint callbacks' hooks after
    this one's, so the step checkpoint due after that update is never written.
    """

    def __init__(self) -> None:
        self._checked_step: int | None = None  # the optimizer step whose weights were checked last

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._checked_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if trainer.global_step == self._checked_step:  # no update since (gradient accumulation)
            return
        self._checked_step = trainer.global_step
        finite = all_finite(getattr(pl_module, "student", pl_module))
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise _non_finite_weights(trainer, pl_module, batch_idx)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        micro_batches = getattr(pl_module, "since_update", None)
        if not micro_batches:
            return
        finite = bool(torch.stack([logged["train/loss"] for logged, _ in micro_batches]).isfinite().all())
        if not trainer.strategy.reduce_boolean_decision(finite, all=True):
            raise _non_finite_loss(trainer, getattr(pl_module, "student", pl_module), micro_batches)


def _non_finite_loss(trainer: L.Trainer, student: torch.nn.Module, micro_batches: list) -> FloatingPointError:
    """The error that names the step, this process's first non-finite micro-batch and its non-finite parts."""
    where = f"non-finite loss at step {trainer.global_step} (epoch {trainer.current_epoch}"
    bad_here = [(logged, i) for logged, i in micro_batches if not torch.isfinite(logged["train/loss"])]
    if not bad_here:
        return FloatingPointError(
            f"{where}) in another process. Training stopped before this step's update; "
            f"{last_finite_checkpoint(trainer)}."
        )
    logged, batch_idx = bad_here[0]
    attention = logged["train/attention_loss"]
    pairs = {
        k.removeprefix("train/attention/"): v for k, v in logged.items() if k.startswith("train/attention/")
    }
    parts = {"output loss": logged["train/output_loss"]}
    parts.update({f"layer pair {k}": v for k, v in pairs.items() if "/" not in k})  # not heads ("L3->1/h0")
    bad = [f"{name} = {v.item()}" for name, v in parts.items() if not torch.isfinite(v)]
    if not bad:  # every part is finite, their weighted sum is not
        bad = [
            f"the weighted sum of output loss {parts['output loss'].item()} and attention loss "
            f"{attention.item()}"
        ]
    weights = non_finite_parameters(student)
    cause = (
        f"; the student's weights were already non-finite ({describe_names(weights)}): the previous "
        "update made them so"
        if weights
        else ""
    )
    return FloatingPointError(
        f"{where}, batch {batch_idx}): {', '.join(bad)}{cause}. Training stopped before this step's update; "
        f"{last_finite_checkpoint(trainer)}. Or check the data of this batch."
    )


def _non_finite_weights(trainer: L.Trainer, module: L.LightningModule, batch_idx: int) -> FloatingPointError:
    """The error that names the step, the batch and the parameters the update of this step made non-finite
    (this process's; none where another process's are)."""
    bad = non_finite_parameters(module)
    where = f"in {describe_names(bad)}" if bad else "in another process"
    return FloatingPointError(
        f"non-finite weights at step {trainer.global_step} {where}, after the update of epoch "
        f"{trainer.current_epoch}, batch {batch_idx} (its loss was finite: non-finite gradients). Training "
        f"stopped there and no checkpoint was written of these weights; {last_finite_checkpoint(trainer)}. "
        "Or check the data of this batch."
    )


class RescaleResumedLearningRate(L.Callback):
    """A run resumed under another ``optimizer.lr`` than its checkpoint's trains on at the configured rate.

    Lightning restores the checkpoint's optimizer and schedule, whose base rate is the one the run started
    with, so a changed ``optimizer.lr`` (e.g. lowered after a non-finite loss) would have no effect. The
    configured rate is the optimizer's ``defaults["lr"]``, which loading its state leaves as it was built. The
    schedule keeps its position (warm-up, linear decay); only its base rate changes.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            configured = scheduler.optimizer.defaults["lr"]
            if all(base == configured for base in scheduler.base_lrs):
                continue
            log.warning(
                "optimizer.lr=%g, and the checkpoint's run used %s: training on at %g times the rates of its "
                "schedule",
                configured, ", ".join(f"{base:g}" for base in sorted(set(scheduler.base_lrs))),
                configured / scheduler.base_lrs[0],
            )  # fmt: skip
            for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
                group["lr"] *= configured / base
                group["initial_lr"] = configured
            scheduler.base_lrs = [configured] * len(scheduler.base_lrs)
