"""``DistillationTrainer``: attention distillation inside a ``transformers.Trainer`` script.

    L        = (1 - w) * L_output + w * L_attention + w_h * L_hidden
    L_output = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)

A ``Trainer`` subclass whose ``compute_loss`` runs :func:`distill_lab.step.distillation_step`, the function
the Lightning module's forward runs: the same capture, attention component, task output loss and objective,
so on equal weights and batches both paths give the same loss. The teacher is an attribute of the trainer,
never a submodule of the student: Trainer's optimizer, gradient clipping, DDP wrapper and checkpoints see
only the student. No Lightning, no Hydra.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import Trainer

from distill_lab.attention import AttentionDistillationLoss
from distill_lab.capture import BACKENDS, AttentionCapture, attention_width, num_attention_heads
from distill_lab.matching import layer_map
from distill_lab.objective import check_setting
from distill_lab.step import Objective, Step, distillation_step


def default_task(model: nn.Module):
    """The ``distill_lab.tasks`` task of ``model`` by its class name (a PEFT model's base model's):
    ``...ForSequenceClassification`` -> ``SequenceClassification`` and so on; an error asking for
    ``task=`` where the name says nothing, since a wrong task compares the wrong positions silently."""
    from distill_lab.tasks import get_task, task_name_of  # torchmetrics, loaded only when a trainer is built

    if (name := task_name_of(model)) is not None:
        return get_task(name)
    name = type(model.get_base_model() if hasattr(model, "get_base_model") else model).__name__
    raise ValueError(
        f"DistillationTrainer cannot tell the task of a {name}: pass task=, e.g. "
        "task=distill_lab.SequenceClassification() or task=distill_lab.CausalLM()"
    )


def default_attention_loss(teacher: nn.Module, student: nn.Module) -> AttentionDistillationLoss:
    """The CLI's default attention component (``loss=kl matching=layerwise layer_map=uniform``): KL between
    the maps of head-matched layers, student layer j taking teacher layer ``round((j + 1) N_t / N_s) - 1``."""
    pairs = layer_map(
        teacher.config.num_hidden_layers, student.config.num_hidden_layers, "uniform", teacher, student
    )
    return AttentionDistillationLoss("kl", "layerwise", pairs)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distils ``teacher`` into ``model`` (the student).

    Args:
        model: the student: a ``PreTrainedModel`` (or a PEFT model of one) whose attention the capture can
            record; Trainer trains, saves and wraps it as usual.
        args: the ``TrainingArguments``; gradient accumulation, ``bf16`` and DDP work as for any model.
        teacher: the frozen teacher: put in eval mode, its gradients off, moved to the student's device at
            the first step; it stays out of the optimizer and of every checkpoint.
        attention_loss: the attention component; None: the CLI's default, ``kl`` with ``layerwise``
            matching on the uniform layer map (:func:`default_attention_loss`).
        attention_weight, temperature, alpha: the objective's ``w`` in [0, 1], ``T`` > 0 and ``alpha`` in
            [0, 1] (the CLI's ``attention_weight=``, ``temperature=``, ``alpha=``).
        hidden_loss, hidden_weight: the hidden-state component (``HiddenStateLoss``) and its weight ``w_h``;
            its projections, if any, train with the student (another parameter group) but are not saved.
        task: the output loss (``distill_lab.tasks``); None: from the student's class (:func:`default_task`).
        capture: ``"qk"`` (the default) or ``"probs"``, as the CLI's ``capture=``.
        capture_memory_budget: the qk capture's memory budget per layer, as ``capture_memory_budget=``.
        **trainer_kwargs: the rest of ``Trainer``'s arguments (``train_dataset``, ``eval_dataset``,
            ``data_collator``, ``processing_class``, ``compute_metrics``, ``callbacks``...), by name.

    Logged (through ``Trainer.log``, so every ``report_to`` integration gets them), besides Trainer's own
    ``loss`` (the objective): ``output_loss``, ``attention_loss``, ``attention/L{t}->{s}`` per layer pair
    (``/h{i}`` per head for the modes that report heads) and, with a hidden-state loss, ``hidden_loss`` and
    ``hidden/...``; each the mean over the micro-batches since the last log. The integrations prefix them
    with ``train/``, so the dashboards show the Lightning module's keys. Evaluation adds
    ``eval_output_loss``, ``eval_attention_loss`` and the pairs' losses, weighted as the Lightning module's
    validation losses are.
    """

    loss_is_scaled_for_ga = False  # a per-batch mean: Trainer divides it by the accumulation steps

    def __init__(
        self,
        model: nn.Module | None = None,
        args=None,
        *,
        teacher: nn.Module | None = None,
        attention_loss: AttentionDistillationLoss | None = None,
        attention_weight: float = 0.3,
        temperature: float = 3.0,
        alpha: float = 0.3,
        hidden_loss: nn.Module | None = None,
        hidden_weight: float = 1.0,
        task=None,
        capture: str = "qk",
        capture_memory_budget: int | None = None,
        **trainer_kwargs,
    ) -> None:
        _check_arguments(model, teacher, capture, trainer_kwargs)
        for name, value in (("attention_weight", attention_weight), ("temperature", temperature)):
            check_setting(name, value)
        check_setting("alpha", alpha)
        if isinstance(hidden_weight, bool) or not isinstance(hidden_weight, int | float) or hidden_weight < 0:
            raise ValueError(f"hidden_weight={hidden_weight} must be 0 or more (the weight of L_hidden)")
        if attention_loss is None:
            attention_loss = default_attention_loss(teacher, model)
        widths = {"teacher": attention_width(teacher), "student": attention_width(model)}
        attention_loss.check(num_attention_heads(teacher), num_attention_heads(model), widths)
        if not getattr(attention_loss.matching, "calibrated", True):
            raise ValueError(
                f"matching={type(attention_loss.matching).__name__.lower()} chooses its heads on a "
                "calibration batch: call attention_loss.calibrate(...) before building the trainer, or "
                "give fixed heads"
            )
        self.teacher = teacher.eval().requires_grad_(False)
        self.attention_loss = attention_loss
        self.hidden_loss = hidden_loss
        self.objective = Objective(
            task if task is not None else default_task(model),
            attention_loss,
            attention_weight,
            temperature,
            alpha,
            hidden_loss,
            hidden_weight,
        )
        _fit_vocabularies(self.objective.task, teacher, model, trainer_kwargs.get("processing_class"))
        self.capture_backend, self.capture_memory_budget = capture, capture_memory_budget
        super().__init__(model=model, args=args, **trainer_kwargs)
        # the objective is the trainer's: no num_items_in_batch for the model, and the loss a batch mean
        self.model_accepts_loss_kwargs = False
        if self.args.n_gpu > 1:
            raise ValueError(
                f"DistillationTrainer does not run under torch.nn.DataParallel ({self.args.n_gpu} GPUs in "
                "one process): the replicas would record into one capture. Launch one process per GPU "
                "(torchrun --nproc-per-node N your_script.py), which Trainer runs with DDP."
            )
        projections = list(hidden_loss.parameters()) if hidden_loss is not None else []
        if projections and self.args.world_size > 1:
            raise ValueError(
                "hidden_loss has projections (the student's and teacher's widths differ), whose gradients "
                "DDP would not reduce across processes: use a student of the teacher's width, or one process"
            )
        self.teacher_capture = self._capture(self.teacher, attention_loss.teacher_layers)
        self.student_capture = self._capture(self.model, attention_loss.student_layers)
        self._teacher_device: torch.device | None = None
        self._train_sums: dict[str, Tensor] = {}  # the logged losses' sums since the last log
        self._train_count = 0
        self._eval_sums: dict[str, list[Tensor]] = {}  # weighted sums and weights of an evaluation

    def _capture(self, model: nn.Module, layers: list[int]) -> AttentionCapture:
        return AttentionCapture(model, layers, self.capture_backend, memory_budget=self.capture_memory_budget)

    # ------------------------------------------------------------------------------------------ the loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The objective on ``inputs``, from the teacher's and student's forwards (``distill_lab.step``).
        ``model`` is the student or Trainer's wrapper around it (DDP), whose forward then runs the student,
        so that its gradients are reduced; the capture records from the student's attention modules either
        way. ``num_items_in_batch`` is not used: the loss is the batch's mean, as the Lightning module's."""
        student = self.accelerator.unwrap_model(model)
        if student is not self.student_capture.model:  # Trainer replaced the model (a fresh model_init...)
            self.student_capture.detach()
            self.student_capture = self._capture(student, self.attention_loss.student_layers)
        self._place_teacher(inputs)
        with self.accelerator.autocast():  # the teacher is not prepared by accelerate: autocast both
            step = distillation_step(
                inputs,
                self.teacher_capture,
                self.student_capture,
                self.objective,
                hidden=self.hidden_loss is not None,
                student_forward=model if model is not student else None,
            )
        if student.training:
            self._add_train_step(step)
        else:
            self._add_eval_step(step, inputs)
        if return_outputs:
            return step.loss, {"loss": step.loss, "logits": step.student_logits}
        return step.loss

    def _place_teacher(self, inputs) -> None:
        """The teacher (and the hidden-state projections) on the batch's device, once: Trainer places the
        student, and where (a device map, DeepSpeed) is known only when batches arrive."""
        device = next((v.device for v in inputs.values() if isinstance(v, Tensor)), None)
        if device is None or device == self._teacher_device:
            return
        self.teacher.to(device)
        if self.hidden_loss is not None:
            self.hidden_loss.to(device)
        self._teacher_device = device

    # ------------------------------------------------------------------------------------------ logging

    @staticmethod
    def _logged(step: Step) -> dict[str, Tensor]:
        """The step's losses under the names they are logged by (Trainer's ``loss`` is the objective)."""
        logged = {"output_loss": step.output_loss, "attention_loss": step.attention_loss}
        logged.update({f"attention/{k}": v for k, v in step.details.items()})
        if step.hidden_loss is not None:
            logged["hidden_loss"] = step.hidden_loss
            logged.update({f"hidden/{k}": v for k, v in step.hidden_details.items()})
        return {k: v.detach().float() for k, v in logged.items()}

    def _add_train_step(self, step: Step) -> None:
        for name, value in self._logged(step).items():  # on the device: no wait for it per micro-batch
            self._train_sums[name] = self._train_sums.get(name, 0) + value
        self._train_count += 1

    def _add_eval_step(self, step: Step, batch) -> None:
        """Each loss weighted by what it averages over (the output loss: examples or labelled tokens; the
        attention losses: valid query rows, or valid keys for MSE; the hidden ones: valid tokens), as the
        Lightning module's validation weighs them: the means do not depend on how the set was batched."""
        mask = batch.get("attention_mask")
        weights = {"output": self.objective.task.output_count(batch)}
        weights["attention"] = self.attention_loss.elements(step.student_maps, mask)
        if self.hidden_loss is not None:
            weights["hidden"] = self.hidden_loss.elements(step.student_hidden, mask)
        for name, value in self._logged(step).items():
            weight = torch.as_tensor(weights[name.split("/")[0].removesuffix("_loss")], device=value.device)
            total, count = self._eval_sums.get(name, (0, 0))
            self._eval_sums[name] = (total + value * weight, count + weight)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Trainer's training logs (those with its ``loss``) get the parts' means since the last one,
        averaged over the processes as Trainer averages its ``loss``."""
        if "loss" in logs and self._train_count:
            names = sorted(self._train_sums)
            means = torch.stack([self._train_sums[n] for n in names]) / self._train_count
            means = self.accelerator.reduce(means, reduction="mean")
            logs.update({n: float(v) for n, v in zip(names, means.tolist(), strict=True)})
            self._train_sums, self._train_count = {}, 0
        super().log(logs, start_time)

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):  # fmt: skip
        """Trainer's loop, whose metrics then get the weighted means of the objective's parts
        (``eval_output_loss``, ``eval_attention_loss``, ``eval_attention/L{t}->{s}``...) over the whole set
        and every process."""
        self._eval_sums = {}
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix
        )
        if self._eval_sums:
            names = sorted(self._eval_sums)
            sums = torch.stack([torch.stack([self._eval_sums[n][i] for n in names]).float() for i in (0, 1)])
            sums = self.accelerator.reduce(sums, reduction="sum")
            means = (sums[0] / sums[1].clamp_min(1)).tolist()
            output.metrics.update({f"{metric_key_prefix}_{n}": v for n, v in zip(names, means, strict=True)})
            self._eval_sums = {}
        return output

    # ------------------------------------------------------------------------------------------ optimisation

    def create_optimizer(self, model=None):
        """Trainer's optimizer over the student, and the hidden-state projections (no part of the student)
        as another parameter group with the same settings."""
        optimizer = super().create_optimizer(model)
        projections = list(self.hidden_loss.parameters()) if self.hidden_loss is not None else []
        if projections and not any(p is projections[0] for g in optimizer.param_groups for p in g["params"]):
            device = next(self.model.parameters()).device
            self.hidden_loss.to(device)
            optimizer.add_param_group({"params": projections, "weight_decay": self.args.weight_decay})
        return optimizer


def _fit_vocabularies(task, teacher, student, processing_class) -> None:
    """A language model's output loss over the tokenizer's logits where teacher and student pad their
    embedding matrices to different sizes (``MaskedLM.fit_vocabularies``); without a tokenizer to say how
    many are real, an error rather than a shape mismatch at the first step."""
    if not hasattr(task, "fit_vocabularies"):
        return
    tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor's own tokenizer
    task.fit_vocabularies(teacher, student, tokenizer if hasattr(tokenizer, "__len__") else None)
    sizes = teacher.config.vocab_size, student.config.vocab_size
    if task.vocab_size is None and sizes[0] != sizes[1]:
        raise ValueError(
            f"the teacher's vocabulary has {sizes[0]} entries and the student's {sizes[1]}: pass their "
            "shared tokenizer as processing_class= so that the output loss compares its tokens' logits "
            "(models with different tokenizers cannot be distilled on their outputs)"
        )


def _check_arguments(model, teacher, capture: str, trainer_kwargs: dict) -> None:
    """What the trainer cannot work with, said before anything is built."""
    if model is None:
        raise ValueError(
            "DistillationTrainer needs the student as model= (model_init is not supported: the attention "
            "capture is attached to the student when the trainer is built)"
        )
    if teacher is None:
        raise ValueError("DistillationTrainer needs teacher=, the model to distil into model=")
    if teacher is model:
        raise ValueError("teacher= and model= are the same model: give the student its own copy")
    if any(module is teacher for module in model.modules()):
        raise ValueError(
            "the teacher is a submodule of the student: Trainer would train and save it; keep them apart"
        )
    if capture not in BACKENDS:
        raise ValueError(f"capture={capture!r} must be one of {', '.join(BACKENDS)}")
    for key in ("compute_loss_func", "model_init"):
        if trainer_kwargs.get(key) is not None:
            raise ValueError(
                f"DistillationTrainer computes its own loss from the teacher and the student: {key}= is not "
                "supported (subclass and override compute_loss to change the objective)"
            )
