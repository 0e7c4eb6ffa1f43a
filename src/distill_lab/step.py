"""One distillation step: the teacher's forward (no gradients), the student's, and the objective on both.

    L        = (1 - w) * L_output + w * L_attention + w_h * L_hidden
    L_output = the task's output loss (``kd_loss`` on its positions)

The Lightning module (``distill_lab.module``) and the ``transformers.Trainer`` subclass
(``distill_lab.trainer``) both call :func:`distillation_step`, so the two training paths compute the same loss
from the same batch by construction. Pure PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from distill_lab.capture import AttentionCapture
from distill_lab.objective import distillation_objective


class Step(NamedTuple):
    """What one forward of teacher and student gives: the objective and its parts, the logits, the attention
    records, and with a hidden-state loss its part and the models' hidden states."""

    loss: Tensor
    output_loss: Tensor
    attention_loss: Tensor
    details: dict[str, Tensor]  # per layer pair (and head), detached
    student_logits: Tensor
    teacher_logits: Tensor
    student_maps: dict  # {layer: probabilities or QueryKey record}, as AttentionCapture returns them
    teacher_maps: dict
    hidden_loss: Tensor | None = None  # None without a hidden-state loss
    hidden_details: dict[str, Tensor] | None = None  # per hidden-state pair, detached
    student_hidden: tuple[Tensor, ...] | None = None  # outputs.hidden_states, with a hidden-state loss
    teacher_hidden: tuple[Tensor, ...] | None = None


@dataclass
class Objective:
    """The objective's components and weights: ``objective(batch, student_logits, teacher_logits,
    student_maps, teacher_maps, student_hidden, teacher_hidden) -> Step``.

    Args:
        task: the output loss's owner (``distill_lab.tasks``): ``task.output_loss(student_logits,
            teacher_logits, batch, temperature, alpha)``.
        attention_loss: the attention component (``AttentionDistillationLoss``).
        attention_weight, temperature, alpha: the objective's ``w``, ``T`` and ``alpha``.
        hidden_loss: the hidden-state component, or None: no hidden-state term.
        hidden_weight: ``w_h``, with ``hidden_loss``.

    Shape:
        batch: the model inputs and ``labels``; ``attention_mask`` (B, L) where the batch is padded.
        student_logits, teacher_logits: the models' logits, (B, C) or (B, L, V).
        student_maps, teacher_maps: ``{layer: (B, H, L, L) probabilities or QueryKey}``.
    """

    task: object
    attention_loss: nn.Module
    attention_weight: float = 0.3
    temperature: float = 3.0
    alpha: float = 0.3
    hidden_loss: nn.Module | None = None
    hidden_weight: float = 1.0

    def __call__(
        self,
        batch: Mapping[str, Tensor],
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_maps,
        teacher_maps,
        student_hidden=None,
        teacher_hidden=None,
    ) -> Step:
        mask = batch.get("attention_mask")
        output_loss = self.task.output_loss(
            student_logits, teacher_logits, batch, self.temperature, self.alpha
        )
        attention_loss, details = self.attention_loss(student_maps, teacher_maps, mask)
        hidden_loss = hidden_details = None
        hidden = {}  # distillation_objective's hidden-state term, where there is one
        if self.hidden_loss is not None:
            hidden_loss, hidden_details = self.hidden_loss(student_hidden, teacher_hidden, mask)
            hidden = {"hidden_loss": hidden_loss, "hidden_weight": self.hidden_weight}
        loss = distillation_objective(output_loss, attention_loss, self.attention_weight, **hidden)
        logits, maps = (student_logits, teacher_logits), (student_maps, teacher_maps)
        states = (hidden_loss, hidden_details, student_hidden, teacher_hidden)
        return Step(loss, output_loss, attention_loss, details, *logits, *maps, *states)


def distillation_step(
    batch: Mapping[str, Tensor],
    teacher_capture: AttentionCapture,
    student_capture: AttentionCapture,
    objective: Callable[..., Step],
    hidden: bool = False,
    student_forward: Callable | None = None,
) -> Step:
    """Teacher (no grad) and student on one batch, then ``objective`` on their outputs.

    Args:
        batch: the model inputs and ``labels`` (which the models are not given: the task's output loss is
            the objective's, not the models' own).
        teacher_capture, student_capture: captures on the two models' captured layers.
        objective: ``objective(batch, student_logits, teacher_logits, student_maps, teacher_maps,
            student_hidden, teacher_hidden) -> Step`` (an :class:`Objective`).
        hidden: run both models with ``output_hidden_states`` and hand the states to the objective.
        student_forward: what runs the student, where it is not the captured model itself: a wrapper whose
            forward calls it (DDP's, which must run for the gradients to be reduced across processes). The
            capture records from the student's attention modules either way.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if hidden:
        inputs["output_hidden_states"] = True
    with torch.no_grad():
        teacher_out, teacher_maps = teacher_capture(**inputs)
    student_out, student_maps = student_capture.through(student_forward, **inputs)
    states = (student_out.hidden_states, teacher_out.hidden_states) if hidden else (None, None)
    return objective(batch, student_out.logits, teacher_out.logits, student_maps, teacher_maps, *states)
