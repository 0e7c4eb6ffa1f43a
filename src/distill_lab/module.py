"""The Lightning module: a frozen teacher, a student, and the distillation objective.

    L = (1 - w) * L_output + w * L_attention
    L_output = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

The module receives built objects (models, the attention-loss component, an optimizer factory); ``run.py``
builds them from the config.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import NamedTuple

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel
from torchmetrics import Metric
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from distill_lab.attention import AttentionDistillationLoss
from distill_lab.capture import AttentionCapture, QueryKey
from distill_lab.losses import distillation_objective
from distill_lab.matching import gradient_head_importance, pair_name
from distill_lab.resume import describe_names, non_finite_parameters
from distill_lab.tasks import SequenceClassification

log = logging.getLogger(__name__)

TEACHER_PREFIX = "teacher."


class Step(NamedTuple):
    """What one forward of teacher and student gives: the objective and its parts, logits, attention records."""

    loss: Tensor
    output_loss: Tensor
    attention_loss: Tensor
    details: dict[str, Tensor]  # per layer pair (and head), detached
    student_logits: Tensor
    teacher_logits: Tensor
    student_maps: dict  # {layer: probabilities or QueryKey record}, as AttentionCapture returns them
    teacher_maps: dict


def _batch_size(batch: Mapping[str, Tensor]) -> int | None:
    inputs = batch.get("input_ids", batch.get("pixel_values"))
    return inputs.shape[0] if inputs is not None else None


def _rows(batch: Mapping[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """The rows ``keep`` (a boolean mask) of every per-example tensor of ``batch``."""
    return {k: v[keep] for k, v in batch.items() if isinstance(v, Tensor) and len(v) == len(keep)}


def _map_rows(maps: Mapping, keep: Tensor) -> dict:
    """The rows ``keep`` of captured attention (``{layer: probabilities or QueryKey record}``); a record's mask
    or bias that is shared by the batch (first dimension 1) stays whole."""

    def rows(x: Tensor | None) -> Tensor | None:
        return x if x is None or x.shape[0] != len(keep) else x[keep]

    return {
        layer: dataclasses.replace(m, query=m.query[keep], key=m.key[keep], mask=rows(m.mask), bias=rows(m.bias))
        if isinstance(m, QueryKey) else m[keep]
        for layer, m in maps.items()
    }  # fmt: skip


class WeightedMean(Metric):
    """The mean of values, each weighted (by what its batch's mean averages over), over every process when
    computed. torchmetrics' ``MeanMetric`` drops the weights under ``nan_strategy="disable"``, and its other
    strategies drop NaN values or raise on them, at a wait for the device per update; a NaN loss here makes the
    mean NaN, as it should."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, value: Tensor, weight: float | Tensor) -> None:
        self.total += value.detach().float() * weight
        self.weight += weight

    def compute(self) -> Tensor:
        return self.total / self.weight


class DistillationModule(L.LightningModule):
    """Distils ``teacher`` into ``student`` through their outputs and attention maps.

    Args:
        teacher: frozen (eval mode, no gradients, never in the optimizer, left out of checkpoints).
        student: the model being trained.
        attention_loss: the attention component (loss, matching mode, layer map).
        optimizer: a factory ``optimizer(params) -> torch.optim.Optimizer`` (a ``functools.partial``).
        attention_weight, temperature, alpha: the objective's ``w``, ``T`` and ``alpha``.
        warmup_ratio: share of the steps with a linear learning-rate warm-up; then linear decay to 0.
        calibration_batch: a batch for modes that choose heads on data (``matching=selective``).
        head_importance: ``"gradient"`` computes the teacher's gradient head importance on that batch.
        capture: ``"qk"`` (SDPA everywhere, attention losses from queries and keys) or ``"probs"`` (eager
            attention maps in the captured layers, the reference); see ``distill_lab.capture``.
        task: what the models are trained for (``distill_lab.tasks``): the output loss and the validation
            metrics; sequence classification by default.
    """

    def __init__(
        self,
        teacher: PreTrainedModel,
        student: PreTrainedModel,
        attention_loss: AttentionDistillationLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        attention_weight: float = 0.3,
        temperature: float = 3.0,
        alpha: float = 0.3,
        warmup_ratio: float = 0.1,
        calibration_batch: Mapping[str, Tensor] | None = None,
        head_importance: str | None = None,
        capture: str = "qk",
        task=None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            ignore=["teacher", "student", "attention_loss", "optimizer", "calibration_batch", "task"]
        )
        if not 0.0 <= attention_weight <= 1.0:
            raise ValueError(f"attention_weight must be in [0, 1], got {attention_weight}")
        if not 0.0 <= alpha <= 1.0:  # kd_loss checks both too, but only at the first step
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if temperature <= 0:
            raise ValueError(f"temperature must be above 0, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.attention_loss = attention_loss
        self.optimizer_factory = optimizer
        self.calibration_batch = calibration_batch
        self.teacher_capture = AttentionCapture(teacher, attention_loss.teacher_layers, capture)
        self.student_capture = AttentionCapture(student, attention_loss.student_layers, capture)
        self.task = task if task is not None else SequenceClassification()
        num_classes = self.task.num_classes(student.config)
        self.val_metrics = self.task.metrics("val/", num_classes)
        self.teacher_metrics = self.task.metrics("val/teacher_", num_classes)
        # the validation losses over the whole set: each batch's mean weighs what it averages over (the output
        # loss: examples, or a language model's labelled tokens; the attention losses: valid query rows, or their
        # valid keys for MSE), so the result does not depend on how the examples were batched or shared between
        # processes; val/loss is then the objective of those two means. Not Lightning's averaging of logged values:
        # it weighs batch sizes, synced as a mean of integers, which rounds down when the processes counted
        # different numbers of examples (DDP, the repeats left out)
        names = [
            "output_loss",
            "attention_loss",
            *(f"attention/{pair_name(p)}" for p in attention_loss.layer_map),
        ]
        self.val_losses = torch.nn.ModuleDict({name: WeightedMean() for name in names})
        self.teacher_scores: dict[str, float] = {}
        self.strict_loading = False  # checkpoints leave the frozen teacher out
        self._since_update: list = []  # (logged losses, batch index) of the micro-batches since the last update
        self.validated_step: int | None = None  # the optimizer steps taken at the last validation inside fit

    # ------------------------------------------------------------------------------------------ lifecycle

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # dropout stays off in the teacher whatever Lightning toggles
        return self

    def on_fit_start(self) -> None:
        self.calibrate()

    def calibrate(self) -> None:
        """Let a matching mode that chooses heads on data (selective) do so, once, on the calibration batch."""
        matching = self.attention_loss.matching
        if not hasattr(matching, "calibrate") or getattr(matching, "calibrated", True):
            return
        if self.calibration_batch is None:
            raise ValueError(f"matching={type(matching).__name__.lower()} needs a calibration batch")
        batch = {k: v.to(self.device) for k, v in self.calibration_batch.items()}
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        importance = None
        if self.hparams.head_importance == "gradient":
            # the gradient reaches attention probabilities only where the layer computes its output from them
            self.teacher_capture.detach()
            with AttentionCapture(self.teacher, self.attention_loss.teacher_layers, "probs") as probe:
                importance = gradient_head_importance(probe, batch)
            self.teacher_capture = AttentionCapture(
                self.teacher, self.attention_loss.teacher_layers, self.hparams.capture
            )
        teacher_maps, student_maps = self._gathered("_attention_maps", inputs)
        self.attention_loss.calibrate(student_maps, teacher_maps, inputs.get("attention_mask"), importance)

    @torch.no_grad()
    def _attention_maps(self, inputs: Mapping[str, Tensor]) -> tuple[dict, dict]:
        return self.teacher_capture(**inputs)[1], self.student_capture(**inputs)[1]

    def _gathered(self, method: str, *args):
        """``self.<method>(*args)`` where the parameters are whole. FSDP gathers its shards only inside the
        wrapped module's forward, so under FSDP the call goes through it, as Lightning's own steps do, and every
        process must make it; otherwise it is a plain call."""
        trainer = self._trainer
        wrapper = trainer.strategy.model if trainer is not None else None
        if isinstance(wrapper, FullyShardedDataParallel):
            return trainer.strategy._forward_redirection(wrapper, self, method, *args)
        return getattr(self, method)(*args)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(TEACHER_PREFIX)]:
            del state[key]
        checkpoint["teacher_scores"] = self.teacher_scores
        selected = getattr(self.attention_loss.matching, "selected", None)
        if selected:
            checkpoint["selected_heads"] = selected

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.teacher_scores = checkpoint.get("teacher_scores", {})
        if "selected_heads" in checkpoint:
            self.attention_loss.matching.selected = {
                k: [tuple(p) for p in v] for k, v in checkpoint["selected_heads"].items()
            }

    # ------------------------------------------------------------------------------------------ steps

    def forward(self, batch: Mapping[str, Tensor]) -> Step:
        """Teacher (no grad) and student on one batch: the loss and its parts, the logits and the attentions."""
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher_out, teacher_maps = self.teacher_capture(**inputs)
        student_out, student_maps = self.student_capture(**inputs)
        return self._objective(batch, student_out.logits, teacher_out.logits, student_maps, teacher_maps)

    def _objective(
        self, batch: Mapping[str, Tensor], student_logits, teacher_logits, student_maps, teacher_maps
    ) -> Step:
        """The loss and its parts from the two models' outputs on ``batch`` (their forwards already run)."""
        output_loss = self.task.output_loss(
            student_logits, teacher_logits, batch, self.hparams.temperature, self.hparams.alpha
        )
        attention_loss, details = self.attention_loss(student_maps, teacher_maps, batch.get("attention_mask"))
        loss = distillation_objective(output_loss, attention_loss, self.hparams.attention_weight)
        return Step(
            loss, output_loss, attention_loss, details, student_logits, teacher_logits, student_maps, teacher_maps
        )  # fmt: skip

    def training_step(self, batch, batch_idx):
        loss, output_loss, attention_loss, details, *_ = self(batch)
        logged = {
            "train/loss": loss,
            "train/output_loss": output_loss,
            "train/attention_loss": attention_loss,
        }
        logged.update({f"train/attention/{k}": v for k, v in details.items()})
        # kept until the update: checked for finiteness and logged there (no wait for the device here)
        self._since_update.append(({k: v.detach() for k, v in logged.items()}, batch_idx))
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        micro_batches, self._since_update = self._since_update, []
        if not micro_batches:
            return
        self._stop_if_not_finite(micro_batches)
        self._log_update(micro_batches)

    def _log_update(self, micro_batches: list) -> None:
        """Log the losses of one optimizer update: under ``trainer.accumulate_grad_batches`` the mean over the
        micro-batches whose gradients it sums (each weighs the same in that sum, whatever its size), not the
        last micro-batch's values alone, which is all Lightning would log of values logged per batch."""
        mean = micro_batches[0][
            0
        ]  # one micro-batch (no accumulation): its values, no kernel per logged value
        if len(micro_batches) > 1:
            mean = {k: torch.stack([logged[k] for logged, _ in micro_batches]).mean() for k in mean}
        progress = ("train/loss", "train/output_loss", "train/attention_loss")
        self.log_dict({k: mean[k] for k in progress}, prog_bar=True)
        self.log_dict({k: v for k, v in mean.items() if k not in progress})

    def _stop_if_not_finite(self, micro_batches: list) -> None:
        """Stop on a non-finite loss before the update, naming the step and the part that went non-finite (the
        output loss, layer pairs). Checked once per optimizer step, after backward: one wait for the device
        per step, and under DDP or FSDP one decision for all processes (a loss that is non-finite on one of them
        has made every process's averaged gradients so), so they all stop together. The update never happens
        and no checkpoint of it is written (``callbacks.InterruptedCheckpoint`` skips a ``FloatingPointError``),
        so the newest checkpoint on disk holds the last good weights."""
        finite = bool(torch.stack([logged["train/loss"] for logged, _ in micro_batches]).isfinite().all())
        if self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        where = f"non-finite loss at step {self.global_step} (epoch {self.current_epoch}"
        bad_here = [(logged, i) for logged, i in micro_batches if not torch.isfinite(logged["train/loss"])]
        if not bad_here:
            raise FloatingPointError(
                f"{where}) in another process. Training stopped before this step's update; the newest checkpoint "
                "holds the last good weights."
            )
        logged, batch_idx = bad_here[0]
        attention = logged["train/attention_loss"]
        pairs = {
            k.removeprefix("train/attention/"): v
            for k, v in logged.items()
            if k.startswith("train/attention/")
        }
        parts = {"output loss": logged["train/output_loss"]}
        parts.update(
            {f"layer pair {k}": v for k, v in pairs.items() if "/" not in k}
        )  # not the heads ("L3->1/h0")
        bad = [f"{name} = {v.item()}" for name, v in parts.items() if not torch.isfinite(v)]
        if not bad:  # every part is finite, their weighted sum is not
            bad = [
                f"the weighted sum of output loss {parts['output loss'].item()} and attention loss {attention.item()}"
            ]
        weights = non_finite_parameters(self.student)
        cause = (
            f"; the student's weights were already non-finite ({describe_names(weights)}): the previous update made them so"
            if weights
            else ""
        )
        raise FloatingPointError(
            f"{where}, batch {batch_idx}): {', '.join(bad)}{cause}. Training stopped before this step's update; the "
            "newest checkpoint holds the last good weights. Lower optimizer.lr, or check the data of this batch."
        )

    def validation_step(self, batch, batch_idx) -> Step | None:
        # the metrics and losses count every validation example once, as in one process (see _unrepeated_rows)
        real = self._unrepeated_rows(batch_idx, _batch_size(batch))
        if real is not None and not isinstance(self.trainer.strategy, FSDPStrategy):
            # DDP: the forward of this process's own examples only (no collective runs inside this step)
            batch, real = _rows(batch, real), None
            if not _batch_size(batch):  # every row a repeat: nothing to count
                return None
        step = own = self(batch)
        if real is not None:
            # FSDP: every process runs the forward on its whole batch (each joins the others' parameter gathers);
            # the losses and metrics are then taken over its own rows, from that forward's logits and attention
            # (which needs no parameter, so no other process)
            batch = _rows(batch, real)
            if real.any():
                maps = (_map_rows(step.student_maps, real), _map_rows(step.teacher_maps, real))
                own = self._objective(batch, step.student_logits[real], step.teacher_logits[real], *maps)
            else:  # every row a repeat: the losses below weigh nothing
                own = step._replace(
                    student_logits=step.student_logits[real], teacher_logits=step.teacher_logits[real]
                )
        attention_loss, details = own.attention_loss, own.details
        student_logits, teacher_logits = own.student_logits, own.teacher_logits
        if len(student_logits):  # a metric update of no rows fails
            self.task.update(self.val_metrics, student_logits, batch)
            if not self.teacher_scores and not self.trainer.sanity_checking:
                self.task.update(self.teacher_metrics, teacher_logits, batch)
        output_weight = attention_weight = 0  # where every row is a repeat: the batch's losses weigh nothing
        if len(student_logits):  # (under FSDP the records are then the whole batch's, the mask of no row)
            output_weight = self.task.output_count(batch)
            attention_weight = self.attention_loss.elements(own.student_maps, batch.get("attention_mask"))
        for name, mean in self.val_losses.items():
            if name == "output_loss":
                mean.update(own.output_loss, output_weight)
            else:
                mean.update(
                    attention_loss if name == "attention_loss" else details[name.removeprefix("attention/")],
                    attention_weight,
                )
        # callbacks.AttentionMapCallback draws from it (no forward of its own, which FSDP would need every process
        # to join)
        return step

    def _unrepeated_rows(self, batch_idx: int, rows: int | None) -> Tensor | None:
        """Which rows of validation batch ``batch_idx`` are examples this process is the first to see, or None
        when all are. Under DDP, Lightning's ``DistributedSampler`` pads the validation set to a multiple of the
        process count by repeating its first examples at the end; process ``r`` takes every ``world``-th example
        from position ``r``, so its row ``j`` is a repeat exactly when ``r + j * world`` reaches the set's size."""
        loader = self.trainer.val_dataloaders
        sampler = getattr(loader, "sampler", None)
        if (
            rows is None
            or not isinstance(sampler, torch.utils.data.DistributedSampler)
            or sampler.shuffle
            or sampler.drop_last
        ):
            return None
        size = len(sampler.dataset)
        if size % sampler.num_replicas == 0:
            return None
        positions = sampler.rank + (batch_idx * loader.batch_size + torch.arange(rows)) * sampler.num_replicas
        real = positions < size  # on the CPU: only a process's last batch can hold a repeat
        return None if bool(real.all()) else real.to(self.device)

    def on_validation_epoch_end(self) -> None:
        # over every process's share of the validation set under DDP and FSDP: the metrics sync themselves, so
        # every process logs the same values (sync_dist averages equal values, and Lightning warns without it)
        means = {f"val/{name}": mean.compute() for name, mean in self.val_losses.items()}
        means["val/loss"] = distillation_objective(
            means["val/output_loss"], means["val/attention_loss"], self.hparams.attention_weight
        )
        self.log_dict(means, sync_dist=True)
        self.log_dict(self.val_metrics.compute(), prog_bar=True, sync_dist=True)
        for metric in (*self.val_losses.values(), self.val_metrics):
            metric.reset()
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.validated_step = self.global_step
        if not self.teacher_scores and not self.trainer.sanity_checking:
            # the teacher is frozen: measure it once, then keep showing it so the gap is always visible
            self.teacher_scores = {k: float(v) for k, v in self.teacher_metrics.compute().items()}
            self.teacher_metrics.reset()
        if self.teacher_scores:
            self.log_dict(self.teacher_scores, sync_dist=True)

    # ------------------------------------------------------------------------------------------ optimisation

    def on_train_start(self) -> None:
        """A run resumed under another ``optimizer.lr`` than its checkpoint's trains on at the configured rate.

        Lightning restores the checkpoint's optimizer and schedule, whose base rate is the one the run started
        with, so a changed ``optimizer.lr`` (e.g. lowered after a non-finite loss) would have no effect. The
        schedule keeps its position (warm-up, linear decay); only its base rate changes."""
        scheduler = self.lr_schedulers()
        configured = self.optimizer_factory([torch.nn.Parameter(torch.zeros(()))]).defaults["lr"]
        if scheduler is None or all(base == configured for base in scheduler.base_lrs):
            return
        log.warning(
            "optimizer.lr=%g, and the checkpoint's run used %s: training on at %g times the rates of its schedule",
            configured, ", ".join(f"{base:g}" for base in sorted(set(scheduler.base_lrs))),
            configured / scheduler.base_lrs[0],
        )  # fmt: skip
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, strict=True):
            group["lr"] *= configured / base
            group["initial_lr"] = configured
        scheduler.base_lrs = [configured] * len(scheduler.base_lrs)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory([p for p in self.student.parameters() if p.requires_grad])
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
