"""The output loss and the objective: soft-target knowledge distillation (Hinton et al.) and the weighted sum
of the objective's terms. Pure PyTorch; ``distill_lab.losses`` re-exports both beside the attention losses.

    L        = (1 - w) * L_output + w * L_attention + w_h * L_hidden
    L_output = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T)
    L_output = alpha * MSE(student, labels) + (1 - alpha) * MSE(student, teacher)   (a regression head)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# what each setting of the objective must be, and the rule as its error states it (``distill_lab.checks``
# checks the config's values against it, ``DistillationTrainer`` its arguments)
OBJECTIVE_RANGES = {
    "attention_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1] (the cross-entropy's share of the output loss)"),
    "temperature": (lambda v: v > 0, "above 0 (1 leaves the logits as they are; 2 to 4 is usual)"),
}


def check_setting(name: str, value, ranges=OBJECTIVE_RANGES) -> None:
    """Raise a ``ValueError`` naming ``name=value`` and its rule where ``value`` is not a number in its
    range (``ranges[name]``: a test and the rule in words)."""
    valid, rule = ranges[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
        raise ValueError(f"{name}={value} must be {rule}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _soft_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) per row, (N, C) -> (N,)."""
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    p_t = log_pt.exp()
    # 0 * log 0 = 0 where the teacher gives a class no mass; a NaN teacher stays NaN (and is caught as
    # non-finite)
    return torch.where(p_t == 0, torch.zeros_like(p_t), p_t * (log_pt - log_ps)).sum(-1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 3.0,
    alpha: float = 0.3,
) -> Tensor:
    """Output distillation: hard-label cross-entropy plus soft-target KL (Hinton et al., 2015).

    ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    each averaged over the positions whose label is not -100. With ``labels=None`` it is the
    ``T^2 * KL`` term alone, averaged over all positions. A batch with no labelled position gives 0.

    Shape:
        student_logits, teacher_logits: (..., C).
        labels: (...), class indices, -100 for positions to ignore.
        Returns: a scalar.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; both models need the same label set or vocabulary."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = _compute_dtype(student_logits)
    num_classes = student_logits.shape[-1]
    s = student_logits.to(dtype).reshape(-1, num_classes)
    t = teacher_logits.to(dtype).reshape(-1, num_classes)
    soft = temperature**2
    if labels is None:
        return soft * _soft_kl(s, t, temperature).mean()
    labels = labels.reshape(-1).to(s.device)
    if labels.shape[0] != s.shape[0]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape "
            f"{tuple(student_logits.shape)}"
        )
    valid = labels != -100
    count = valid.sum().clamp_min(1).to(dtype)
    ce = F.cross_entropy(s, labels, ignore_index=-100, reduction="sum") / count
    # ignored positions take no part: their teacher logits are replaced before the softmax (a NaN there must
    # not reach the gradients) and their KL is dropped; masks rather than boolean indexing, which would make
    # the host wait for the device at every step
    t = torch.where(valid[:, None], t, torch.zeros_like(t))
    kl = _soft_kl(s, t, temperature)
    kl_term = torch.where(valid, kl, torch.zeros_like(kl)).sum() / count
    return alpha * ce + (1.0 - alpha) * soft * kl_term


def regression_kd_loss(
    student_scores: Tensor, teacher_scores: Tensor, labels: Tensor | None = None, alpha: float = 0.3
) -> Tensor:
    """Output distillation for a regression head (one output, e.g. STS-B's similarity score):

    ``alpha * MSE(student, labels) + (1 - alpha) * MSE(student, teacher)``, each a mean over the examples.
    A score has no distribution to soften, so there is no temperature. With ``labels=None`` it is the
    teacher term alone. Computed in float32 at least (float64 stays float64).

    Shape:
        student_scores, teacher_scores: (B, 1) or (B,).
        labels: (B,), float targets.
        Returns: a scalar.
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"student and teacher scores differ in shape: {tuple(student_scores.shape)} vs "
            f"{tuple(teacher_scores.shape)}; both models need a regression head (num_labels=1)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    dtype = _compute_dtype(student_scores)
    s, t = student_scores.to(dtype).reshape(-1), teacher_scores.to(dtype).reshape(-1)
    teacher_term = F.mse_loss(s, t)
    if labels is None:
        return teacher_term
    labels = labels.to(device=s.device, dtype=dtype).reshape(-1)
    if labels.shape != s.shape:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match scores of shape "
            f"{tuple(student_scores.shape)}"
        )
    return alpha * F.mse_loss(s, labels) + (1.0 - alpha) * teacher_term


def distillation_objective(
    output_loss: Tensor,
    attention_loss: Tensor,
    attention_weight: float = 0.3,
    *,
    hidden_loss: Tensor | None = None,
    hidden_weight: float = 0.0,
) -> Tensor:
    """``L = (1 - w) * L_output + w * L_attention + w_h * L_hidden`` with ``w = attention_weight`` in [0, 1]
    and ``w_h = hidden_weight`` >= 0; without ``hidden_loss`` the last term is left out."""
    if not 0.0 <= attention_weight <= 1.0:
        raise ValueError(f"attention_weight must be in [0, 1], got {attention_weight}")
    if not hidden_weight >= 0.0:
        raise ValueError(f"hidden_weight must be 0 or more, got {hidden_weight}")
    loss = (1.0 - attention_weight) * output_loss + attention_weight * attention_loss
    return loss if hidden_loss is None else loss + hidden_weight * hidden_loss
