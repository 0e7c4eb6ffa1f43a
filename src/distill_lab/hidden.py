"""Hidden-state distillation (TinyBERT): the student's hidden states pulled towards the teacher's.

``L_hidden`` is the weighted mean over layer pairs ``(t, s)`` of ``loss(H_s W_h, H_t)``, where ``H_i`` is
hidden state ``i`` as ``outputs.hidden_states`` orders them (0: the embedding output, ``i``: the output of
layer ``i``, 1-based), ``loss`` is MSE or cosine over the valid tokens, and ``W_h`` is a learned
``nn.Linear(student_width, teacher_width)`` per pair where the widths differ (none where they are equal).
The projections belong to :class:`HiddenStateLoss`: they train with the student and are kept in checkpoints,
but are no part of the student, so the exported model holds none of them.

Pure PyTorch. As in ``distill_lab.losses``, the student comes first and the teacher second; the teacher is
the target (detached), and the losses are computed in float32 (float64 for float64 inputs) whatever the
input dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYER_MAP_SPECS = ("uniform", "last")


def _prepared(student: Tensor, teacher: Tensor, attention_mask: Tensor | None):
    """Both sides in the computation dtype (the teacher detached) and the valid tokens ``(B, L)`` (None:
    all), after checking the shapes."""
    if student.dim() != 3 or student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher hidden states must both be (batch, length, width) with the same shape; got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} (a narrower student needs a "
            "projection to the teacher's width first: HiddenStateLoss adds one)"
        )
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(student.shape[:2]):
        raise ValueError(
            f"attention_mask must have shape (batch, length) = {tuple(student.shape[:2])} to match hidden "
            f"states of shape {tuple(student.shape)}; got {tuple(attention_mask.shape)}"
        )
    dtype = torch.promote_types(student.dtype, torch.float32)
    valid = None if attention_mask is None else attention_mask.to(device=student.device, dtype=torch.bool)
    return student.to(dtype), teacher.detach().to(dtype), valid


def _token_mean(per_token: Tensor, valid: Tensor | None, scale: int = 1) -> Tensor:
    """The mean of ``per_token`` (B, L) over the valid tokens, divided by ``scale``; 0 where none is valid.
    Masked by selection, not multiplication, so a non-finite padded position takes no part."""
    if valid is None:
        return per_token.sum() / max(per_token.numel() * scale, 1)
    total = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
    return total / (valid.sum() * scale).clamp_min(1).to(per_token.dtype)


def hidden_mse(student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean squared error between hidden states over the valid tokens.

    ``sum_{b, valid i, d} (student[b, i, d] - teacher[b, i, d])^2 / (n_valid * D)``; 0 when no token is
    valid.

    Shape:
        student, teacher: (B, L, D) hidden states of one width (project the student's first).
        attention_mask: (B, L), 1 for real tokens; None: every token is valid.
        Returns: a scalar.
    """
    s, t, valid = _prepared(student, teacher, attention_mask)
    return _token_mean((s - t).pow(2).sum(-1), valid, s.shape[-1])


def hidden_cosine(student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """One minus the cosine similarity of each token's hidden states, averaged over the valid tokens.

    ``sum_{b, valid i} (1 - cos(student[b, i], teacher[b, i])) / n_valid``; 0 when no token is valid. The
    cosine ignores the scale of the vectors, only their direction is matched.

    Shape:
        student, teacher: (B, L, D) hidden states of one width (project the student's first).
        attention_mask: (B, L), 1 for real tokens; None: every token is valid.
        Returns: a scalar.
    """
    s, t, valid = _prepared(student, teacher, attention_mask)
    return _token_mean(1.0 - F.cosine_similarity(s, t, dim=-1, eps=1e-8), valid)


HIDDEN_LOSSES: dict[str, Callable[..., Tensor]] = {"mse": hidden_mse, "cosine": hidden_cosine}


def hidden_layer_map(
    num_teacher_layers: int, num_student_layers: int, spec: str | Sequence[Sequence[int]] = "uniform"
) -> list[tuple[int, int]]:
    """Pairs ``(teacher, student)`` of hidden-state indices: 0 is the embedding output, ``i`` the output of
    layer ``i`` (1-based), as ``outputs.hidden_states`` orders them.

    Args:
        num_teacher_layers, num_student_layers: the models' ``num_hidden_layers`` (``Nt``, ``Ns``).
        spec: ``"uniform"`` (TinyBERT's): ``(0, 0)`` and student layer ``m`` (1..Ns) with teacher layer
            ``round_half_up(m * Nt / Ns)``, e.g. 12 -> 4 gives (0, 0), (3, 1), (6, 2), (9, 3), (12, 4);
            ``"last"``: ``[(Nt, Ns)]``; or explicit pairs ``[[t, s], ...]`` with ``t`` in 0..Nt and ``s`` in
            0..Ns.

    Raises:
        ValueError: an unknown spec, a pair out of range, or a student deeper than its teacher under
            ``"uniform"``.
    """
    nt, ns = int(num_teacher_layers), int(num_student_layers)
    if nt < 1 or ns < 1:
        raise ValueError(f"both models need at least one layer; got teacher {nt}, student {ns}")
    if isinstance(spec, str):
        if spec == "last":
            return [(nt, ns)]
        if spec != "uniform":
            raise ValueError(
                f"hidden_layer_map={spec!r} is not a known map: use {' or '.join(LAYER_MAP_SPECS)}, or "
                "pairs of hidden-state indices [[t, s], ...] (0 is the embedding output)"
            )
        if ns > nt:
            raise ValueError(
                f"hidden_layer_map=uniform maps each student layer onto a distinct teacher layer, but the "
                f"student has {ns} layers and the teacher {nt}: give explicit pairs [[t, s], ...]"
            )
        return [(0, 0)] + [((2 * m * nt + ns) // (2 * ns), m) for m in range(1, ns + 1)]
    pairs = [tuple(p) for p in spec]
    if not pairs:
        raise ValueError("hidden_layer_map has no pairs: nothing would be distilled")
    for pair in pairs:
        if (
            len(pair) != 2
            or any(isinstance(i, bool) or not isinstance(i, int) for i in pair)
            or not (0 <= pair[0] <= nt and 0 <= pair[1] <= ns)
        ):
            raise ValueError(
                f"hidden_layer_map pair {list(pair)} is not [teacher, student] hidden-state indices in "
                f"range: the teacher's are 0..{nt} and the student's 0..{ns} (0 is the embedding output, "
                "i the output of layer i)"
            )
    return [(int(t), int(s)) for t, s in pairs]


class HiddenStateLoss(nn.Module):
    """The hidden-state part of the objective: a loss over layer pairs, through learned projections.

    Args:
        name: ``"mse"`` (:func:`hidden_mse`) or ``"cosine"`` (:func:`hidden_cosine`).
        layer_map: ``[(teacher, student), ...]`` hidden-state indices (see :func:`hidden_layer_map`).
        student_width, teacher_width: the models' ``hidden_size``. Where they differ, each pair gets its own
            ``nn.Linear(student_width, teacher_width)`` (TinyBERT's ``W_h``) applied to the student's hidden
            state; where they are equal, none.
        layer_weights: one weight per pair; the loss over pairs is ``sum(w * L_pair) / sum(w)``, the mean by
            default.

    ``forward(student_hidden_states, teacher_hidden_states, attention_mask)`` takes the models'
    ``outputs.hidden_states`` (run with ``output_hidden_states=True``) and returns ``(loss, details)``, with
    ``details["L12->4"]`` per pair, detached.

    Shape:
        student_hidden_states: a tuple of (B, L, student_width), one per hidden-state index.
        teacher_hidden_states: a tuple of (B, L, teacher_width).
        attention_mask: (B, L), 1 for real tokens; None: every token is valid.
    """

    def __init__(
        self,
        name: str,
        layer_map: Sequence[Sequence[int]],
        student_width: int,
        teacher_width: int,
        layer_weights: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if name not in HIDDEN_LOSSES:
            raise ValueError(f"unknown hidden-state loss {name!r}; valid choices: {', '.join(HIDDEN_LOSSES)}")
        self.name = name
        self.loss = HIDDEN_LOSSES[name]
        self.layer_map = [(int(t), int(s)) for t, s in layer_map]
        if not self.layer_map:
            raise ValueError("layer_map has no pairs: nothing would be distilled")
        self.student_width, self.teacher_width = int(student_width), int(teacher_width)
        if layer_weights is not None and len(layer_weights) != len(self.layer_map):
            raise ValueError(
                f"layer_weights has {len(layer_weights)} entries for {len(self.layer_map)} hidden-state "
                f"pairs {self.layer_map}"
            )
        weights = torch.tensor(
            [float(w) for w in layer_weights] if layer_weights is not None else [1.0] * len(self.layer_map)
        )
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"layer_weights must be finite and non-negative with a positive sum; got {layer_weights}"
            )
        self.register_buffer("layer_weights", weights / weights.sum(), persistent=False)
        widths_differ = self.student_width != self.teacher_width
        self.projections = nn.ModuleList(
            nn.Linear(self.student_width, self.teacher_width) for _ in self.layer_map if widths_differ
        )

    @property
    def pair_names(self) -> list[str]:
        return [f"L{t}->{s}" for t, s in self.layer_map]

    def elements(self, student_hidden_states, attention_mask: Tensor | None = None) -> int | Tensor:
        """How many tokens each pair's loss on this batch averages over (the valid ones): the weight of the
        batch's hidden-state losses in a mean over batches that equals the loss over their union."""
        if attention_mask is not None:
            return attention_mask.sum()
        batch, length = self._states(student_hidden_states, "student")[0].shape[:2]
        return batch * length

    def _states(self, states, role: str):
        if states is None:
            raise ValueError(
                f"no hidden states from the {role}: run the model with output_hidden_states=True "
                "(DistillationModule does so when it has a hidden_loss)"
            )
        return states

    def _pair(self, states, index: int, role: str, pair: tuple[int, int]) -> Tensor:
        if not 0 <= index < len(states):
            raise ValueError(
                f"hidden-state pair L{pair[0]}->{pair[1]}: the {role} has hidden states 0..{len(states) - 1} "
                f"(0 is the embedding output), not {index}"
            )
        return states[index]

    def forward(
        self, student_hidden_states, teacher_hidden_states, attention_mask: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        student_states = self._states(student_hidden_states, "student")
        teacher_states = self._states(teacher_hidden_states, "teacher")
        losses, details = [], {}
        for j, (pair, name) in enumerate(zip(self.layer_map, self.pair_names, strict=True)):
            student = self._pair(student_states, pair[1], "student", pair)
            teacher = self._pair(teacher_states, pair[0], "teacher", pair)
            if student.shape[-1] != self.student_width or teacher.shape[-1] != self.teacher_width:
                raise ValueError(
                    f"hidden-state pair {name}: the student's hidden states are {student.shape[-1]} wide and "
                    f"the teacher's {teacher.shape[-1]}, but the loss was built for student_width="
                    f"{self.student_width} and teacher_width={self.teacher_width}"
                )
            if len(self.projections):
                student = self.projections[j](student)
            value = self.loss(student, teacher, attention_mask)
            losses.append(value)
            details[name] = value.detach()
        total = (torch.stack(losses) * self.layer_weights.to(losses[0])).sum()
        return total, details

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layer_map={self.layer_map}"
