"""The Lightning module: a frozen teacher, a student, and the distillation objective.

    L = (1 - w) * L_output + w * L_attention + w_h * L_hidden
    L_output = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

The module receives built objects (models, the attention-loss component, the optional hidden-state
component, an optimizer factory): ``run.py`` builds it from the config's ``module`` node (``conf/module/``).
It does distillation only; what keeps a run sound (stopping on a non-finite loss, the learning rate of a
resumed run) are callbacks of ``guards.py`` that it registers, which rows of a distributed validation
batch are repeats is ``repeats.py``'s to say, and the held-out test's step is ``held_out.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import lightning as L
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import PreTrainedModel, get_linear_schedule_with_warmup

from distill_lab import _compat
from distill_lab.attention import AttentionDistillationLoss
from distill_lab.capture import AttentionCapture
from distill_lab.guards import RescaleResumedLearningRate, StopOnNonFiniteLoss
from distill_lab.held_out import HeldOutTest
from distill_lab.hidden import HiddenStateLoss
from distill_lab.losses import distillation_objective
from distill_lab.matching import gradient_head_importance, pair_name
from distill_lab.repeats import batch_size, select_hidden_rows, select_map_rows, select_rows, unrepeated_rows
from distill_lab.step import Objective, Step, distillation_step
from distill_lab.tasks import SequenceClassification
from distill_lab.weighted_mean import WeightedMean

TEACHER_PREFIX = "teacher."


class DistillationModule(HeldOutTest, L.LightningModule):
    """Distils ``teacher`` into ``student`` through their outputs and attention maps.

    Args:
        teacher: frozen (eval mode, no gradients, never in the optimizer, left out of checkpoints).
        student: the model being trained.
        attention_loss: the attention component (loss, matching mode, layer map).
        hidden_loss: the hidden-state component (``distill_lab.hidden.HiddenStateLoss``), or None: none, and
            the models are run without ``output_hidden_states`` (the states cost memory). Its projections
            train with the student and are kept in checkpoints, not in the student.
        optimizer: a factory ``optimizer(params) -> torch.optim.Optimizer`` (a ``functools.partial``).
        attention_weight, temperature, alpha: the objective's ``w``, ``T`` and ``alpha``.
        hidden_weight: the objective's ``w_h``, the hidden-state loss's weight (with ``hidden_loss``).
        warmup_ratio: share of the steps with a linear learning-rate warm-up; then linear decay to 0.
        calibration_batch: a batch for modes that choose heads on data (``matching=selective``); any mapping
            of tensors (a ``DictConfig`` of them, as Hydra's ``instantiate`` passes it, too).
        head_importance: ``"gradient"`` computes the teacher's gradient head importance on that batch.
        capture: ``"qk"`` (SDPA everywhere, attention losses from queries and keys) or ``"probs"`` (eager
            attention maps in the captured layers, the reference); see ``distill_lab.capture``.
        capture_memory_budget: with ``capture="qk"``, the most bytes one captured layer's eager scores and
            probabilities may take for the loss to use them as they are (None: the capture's default, 64 MiB
            off CUDA and 0 on CUDA); beyond it the layer runs SDPA and keeps queries and keys only.
        task: what the models are trained for (``distill_lab.tasks``): the output loss and the validation
            metrics; sequence classification by default.

    The settings are not checked here: ``distill_lab.checks`` checks the config before anything is built, and
    the functional losses (``kd_loss``, ``distillation_objective``) refuse values out of range when they run.
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
        capture_memory_budget: int | None = None,
        hidden_loss: HiddenStateLoss | None = None,
        hidden_weight: float = 1.0,
    ) -> None:
        super().__init__()
        ignored = ["teacher", "student", "attention_loss", "hidden_loss", "optimizer", "calibration_batch"]
        self.save_hyperparameters(ignore=[*ignored, "task"])
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student
        self.attention_loss = attention_loss
        self.hidden_loss = hidden_loss
        self.optimizer_factory = optimizer
        self.calibration_batch = dict(calibration_batch) if calibration_batch is not None else None
        self.teacher_capture = self._capture(teacher, attention_loss.teacher_layers)
        self.student_capture = self._capture(student, attention_loss.student_layers)
        self.task = task if task is not None else SequenceClassification()
        num_classes = self.task.num_classes(student.config)
        self.val_metrics = self.task.metrics("val/", num_classes)
        self.teacher_metrics = self.task.metrics("val/teacher_", num_classes)
        # the validation losses over the whole set: each batch's mean weighs what it averages over (the
        # output loss: examples, or a language model's labelled tokens; the attention losses: valid query
        # rows, or their valid keys for MSE; the hidden-state losses: valid tokens), so the result does not
        # depend on how the examples were batched or shared between processes; val/loss is then the objective
        # of those means. Not Lightning's averaging of logged values: it weighs batch sizes, synced as a mean
        # of integers, which rounds down when the processes counted different numbers of examples (DDP, the
        # repeats left out)
        names = [
            "output_loss",
            "attention_loss",
            *(f"attention/{pair_name(p)}" for p in attention_loss.layer_map),
        ]
        if hidden_loss is not None:
            names += ["hidden_loss", *(f"hidden/{name}" for name in hidden_loss.pair_names)]
        self.val_losses = torch.nn.ModuleDict({name: WeightedMean() for name in names})
        self.teacher_scores: dict[str, float] = {}
        self.strict_loading = False  # checkpoints leave the frozen teacher out
        # (logged losses, batch index) of the micro-batches since the last update: logged at the update, and
        # checked for finiteness before it (guards.StopOnNonFiniteLoss)
        self.since_update: list[tuple[dict[str, Tensor], int]] = []
        self.validated_step: int | None = None  # the optimizer steps taken at the last validation inside fit

    # ------------------------------------------------------------------------------------------ lifecycle

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # dropout stays off in the teacher whatever Lightning toggles
        return self

    def _capture(self, model: PreTrainedModel, layers: list[int]) -> AttentionCapture:
        return AttentionCapture(
            model, layers, self.hparams.capture, memory_budget=self.hparams.capture_memory_budget
        )

    def configure_callbacks(self) -> list[L.Callback]:
        """The guards every fit needs, whatever callbacks the trainer was given: a stop before the update of
        a non-finite loss, and the configured learning rate for a resumed run (see ``distill_lab.guards``).
        A guard the trainer already holds (given, or added by an earlier fit or validation) is kept."""
        trainer = _compat.attached_trainer(self)
        held = {type(c) for c in (trainer.callbacks if trainer is not None else [])}
        guards = (StopOnNonFiniteLoss(), RescaleResumedLearningRate())
        return [guard for guard in guards if not any(issubclass(t, type(guard)) for t in held)]

    def on_fit_start(self) -> None:
        self.calibrate()

    def calibrate(self) -> None:
        """Let a matching mode that chooses heads on data (selective) do so, once, on the calibration
        batch."""
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
            self.teacher_capture = self._capture(self.teacher, self.attention_loss.teacher_layers)
        teacher_maps, student_maps = self._gathered("_attention_maps", inputs)
        self.attention_loss.calibrate(student_maps, teacher_maps, inputs.get("attention_mask"), importance)

    @torch.no_grad()
    def _attention_maps(self, inputs: Mapping[str, Tensor]) -> tuple[dict, dict]:
        return self.teacher_capture(**inputs)[1], self.student_capture(**inputs)[1]

    def _gathered(self, method: str, *args):
        """``self.<method>(*args)`` where the parameters are whole. FSDP gathers its shards only inside the
        wrapped module's forward, so under FSDP the call goes through it, as Lightning's own steps do, and
        every process must make it; otherwise it is a plain call."""
        trainer = _compat.attached_trainer(self)
        wrapper = trainer.strategy.model if trainer is not None else None
        if isinstance(wrapper, FullyShardedDataParallel):
            return _compat.forward_redirection(trainer.strategy, wrapper, self, method, *args)
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
        """Teacher (no grad) and student on one batch: the loss and its parts, the logits and the
        attentions (``distill_lab.step``, which ``DistillationTrainer`` runs too)."""
        hidden = self.hidden_loss is not None
        return distillation_step(batch, self.teacher_capture, self.student_capture, self._objective, hidden)

    def _objective(
        self,
        batch: Mapping[str, Tensor],
        student_logits,
        teacher_logits,
        student_maps,
        teacher_maps,
        student_hidden=None,
        teacher_hidden=None,
    ) -> Step:
        """The loss and its parts from the two models' outputs on ``batch`` (their forwards already run)."""
        objective = Objective(
            self.task,
            self.attention_loss,
            self.hparams.attention_weight,
            self.hparams.temperature,
            self.hparams.alpha,
            self.hidden_loss,
            self.hparams.hidden_weight,
        )
        logits, maps = (student_logits, teacher_logits), (student_maps, teacher_maps)
        return objective(batch, *logits, *maps, student_hidden, teacher_hidden)

    def training_step(self, batch, batch_idx):
        step = self(batch)
        logged = {
            "train/loss": step.loss,
            "train/output_loss": step.output_loss,
            "train/attention_loss": step.attention_loss,
        }
        logged.update({f"train/attention/{k}": v for k, v in step.details.items()})
        if step.hidden_loss is not None:
            logged["train/hidden_loss"] = step.hidden_loss
            logged.update({f"train/hidden/{k}": v for k, v in step.hidden_details.items()})
        # kept until the update: checked for finiteness and logged there (no wait for the device here)
        self.since_update.append(({k: v.detach() for k, v in logged.items()}, batch_idx))
        return step.loss

    def on_before_optimizer_step(self, optimizer) -> None:
        micro_batches, self.since_update = self.since_update, []
        if micro_batches:  # guards.StopOnNonFiniteLoss has checked them (callbacks run before this hook)
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

    def validation_step(self, batch, batch_idx) -> Step | None:
        # the metrics and losses count every validation example once, as in one process (see repeats.py)
        real = unrepeated_rows(self.trainer.val_dataloaders, batch_idx, batch_size(batch))
        real = real.to(self.device) if real is not None else None
        if real is not None and not isinstance(self.trainer.strategy, FSDPStrategy):
            # DDP: the forward of this process's own examples only (no collective runs inside this step)
            batch, real = select_rows(batch, real), None
            if not batch_size(batch):  # every row a repeat: nothing to count
                return None
        step = own = self(batch)
        if real is not None:
            # FSDP: every process runs the forward on its whole batch (each joins the others' parameter
            # gathers); the losses and metrics are then taken over its own rows, from that forward's logits
            # and attention (which needs no parameter, so no other process)
            batch = select_rows(batch, real)
            if real.any():
                maps = (select_map_rows(step.student_maps, real), select_map_rows(step.teacher_maps, real))
                hidden = (
                    select_hidden_rows(step.student_hidden, real),
                    select_hidden_rows(step.teacher_hidden, real),
                )
                own = self._objective(
                    batch, step.student_logits[real], step.teacher_logits[real], *maps, *hidden
                )
            else:  # every row a repeat: the losses below weigh nothing
                own = step._replace(
                    student_logits=step.student_logits[real], teacher_logits=step.teacher_logits[real]
                )
        if len(own.student_logits):  # a metric update of no rows fails
            self.task.update(self.val_metrics, own.student_logits, batch)
            if not self.teacher_scores and not self.trainer.sanity_checking:
                self.task.update(self.teacher_metrics, own.teacher_logits, batch)
        self._update_val_losses(own, batch)
        # callbacks.AttentionMapCallback draws from it (no forward of its own, which FSDP would need every
        # process to join)
        return step

    def _update_val_losses(self, own: Step, batch: Mapping[str, Tensor]) -> None:
        """Each validation loss of the step into its weighted mean, weighed by what it averages over."""
        mask = batch.get("attention_mask")
        weights = {"output": 0, "attention": 0, "hidden": 0}  # every row a repeat: the losses weigh nothing
        if len(own.student_logits):  # (under FSDP the records are then the whole batch's, the mask of no row)
            weights["output"] = self.task.output_count(batch)
            weights["attention"] = self.attention_loss.elements(own.student_maps, mask)
            if self.hidden_loss is not None:
                weights["hidden"] = self.hidden_loss.elements(own.student_hidden, mask)
        for name, mean in self.val_losses.items():
            if name.endswith("_loss"):
                part = name.removesuffix("_loss")
                mean.update(getattr(own, name), weights[part])
            else:
                part, pair = name.split("/", 1)
                mean.update((own.details if part == "attention" else own.hidden_details)[pair], weights[part])

    def on_validation_epoch_end(self) -> None:
        # over every process's share of the validation set under DDP and FSDP: the metrics sync themselves, so
        # every process logs the same values (sync_dist averages equal values, and Lightning warns without it)
        means = {f"val/{name}": mean.compute() for name, mean in self.val_losses.items()}
        hidden = {}
        if self.hidden_loss is not None:
            hidden = {"hidden_loss": means["val/hidden_loss"], "hidden_weight": self.hparams.hidden_weight}
        means["val/loss"] = distillation_objective(
            means["val/output_loss"], means["val/attention_loss"], self.hparams.attention_weight, **hidden
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

    def configure_optimizers(self):
        # the hidden-state projections train with the student (they are no part of it: not exported)
        projections = list(self.hidden_loss.parameters()) if self.hidden_loss is not None else []
        trained = [p for p in (*self.student.parameters(), *projections) if p.requires_grad]
        optimizer = self.optimizer_factory(trained)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(self.hparams.warmup_ratio * total), total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
