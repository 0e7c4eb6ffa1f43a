"""What keeps a run's weights and schedule sound: a stop before the update of a non-finite loss, and the
configured learning rate for a run resumed from a checkpoint that used another.

Both are callbacks that every fit of ``DistillationModule`` registers itself (its ``configure_callbacks``),
whatever ``callbacks=`` holds: unlike the attention maps, they are no option a user may drop.
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


def non_finite_parameters(module: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters holding a NaN or an infinity (the frozen teacher cannot turn so)."""
    return [name for name, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]


def describe_names(names: list[str], limit: int = 3) -> str:
    """``a, b, c and 4 more``."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class StopOnNonFiniteLoss(L.Callback):
    """Stops on a non-finite loss before the update, naming the step and the part that went non-finite (the
    output loss, layer pairs).

    Checked once per optimizer step, after backward: one wait for the device per step, and under DDP or FSDP
    one decision for all processes (a loss that is non-finite on one of them has made every process's
    averaged gradients so), so they all stop together. The update never happens and no checkpoint of it is
    written (``InterruptedCheckpoint`` skips a ``FloatingPointError``), so the newest checkpoint on disk holds
    the last good weights.

    The losses are the module's ``since_update``: ``(logged losses, batch index)`` of each micro-batch since
    the last update, ``train/loss``, ``train/output_loss``, ``train/attention_loss`` and
    ``train/attention/<pair>`` among the logged losses. Lightning calls this hook before the module's own,
    which logs and clears them.
    """

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
            f"{where}) in another process. Training stopped before this step's update; the newest "
            "checkpoint holds the last good weights."
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
        "the newest checkpoint holds the last good weights. Lower optimizer.lr, or check the data of this "
        "batch."
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
