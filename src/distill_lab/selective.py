"""Selective matching: distil only the most important teacher heads, each assigned to a student head.

Head importance is measured on a calibration batch, from the teacher's attention entropy
(``entropy_head_importance``) or from gradients (``gradient_head_importance``, Michel et al., 2019); the
chosen teacher heads are assigned to distinct student heads by a linear assignment on the loss between them.
``distill_lab.matching`` exports these names with the other matching modes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from distill_lab.capture import AttentionCapture
    from distill_lab.matching import LayerPair


def entropy_head_importance(maps: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Importance of each head as its negative mean attention entropy over valid query rows.

    Sharply focused heads (low entropy) rank first; near-uniform heads, which carry little about how tokens
    relate, rank last.

    Shape:
        maps: (B, H, Lq, Lk) attention probabilities.
        attention_mask: (B, Lk), 1 for real tokens.
        Returns: (H,).
    """
    p = maps.to(torch.promote_types(maps.dtype, torch.float32))
    entropy = -torch.where(
        p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)
    ).sum(-1)
    if attention_mask is None:
        return -entropy.mean(dim=(0, 2))
    rows = attention_mask.to(device=p.device, dtype=p.dtype)[:, None, -p.shape[2] :]
    return -(entropy * rows).sum(dim=(0, 2)) / rows.sum().clamp_min(1.0)


def gradient_head_importance(
    capture: AttentionCapture, inputs: Mapping[str, Tensor], loss_fn: Callable | None = None
) -> dict[int, Tensor]:
    """Gradient-based head importance (Michel et al., 2019) of the captured layers on one batch.

    A gate ``xi_h`` on head h's attention scales its output; ``I_h = E_x |dL/dxi_h|`` at ``xi = 1``, which
    equals ``E_x |sum_{q,k} A_h * dL/dA_h|``. ``L`` is the model's own loss on ``inputs`` (they must hold
    labels) unless ``loss_fn(outputs)`` is given. Parameters get no ``.grad``; the model should be in eval
    mode so that the captured maps are the ones its outputs used.

    Returns: ``{layer: (H,)}``.
    """
    params = list(capture.model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs, maps = capture(**inputs)
            loss = loss_fn(outputs) if loss_fn is not None else getattr(outputs, "loss", None)
            if loss is None:
                raise ValueError(
                    "gradient head importance needs a loss: pass labels in the batch or a loss_fn"
                )
            layers = sorted(maps)
            grads = torch.autograd.grad(loss, [maps[i] for i in layers])
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return {
        i: (maps[i].detach() * g).sum(dim=(-1, -2)).abs().mean(0) for i, g in zip(layers, grads, strict=True)
    }


class Selective:
    """Distil only the ``top_k`` most important teacher heads of each layer pair.

    Importance is measured on a calibration batch (``calibrate``): ``"entropy"`` (see
    ``entropy_head_importance``) or ``"gradient"`` (``gradient_head_importance``, computed by the caller and
    passed in), or fixed by ``heads``: a list of teacher heads, or of ``[teacher_head, student_head]`` pairs
    which need no calibration at all. Each selected teacher head is assigned to a distinct student head by
    a linear assignment that minimises the loss between them on the calibration batch.

    After calibration ``selected`` maps each layer-pair name to its ``[(teacher_head, student_head), ...]``
    and ``importance`` to the teacher's per-head scores.
    """

    per_head = True

    def __init__(self, top_k: int = 4, importance: str = "entropy", heads: Sequence | None = None) -> None:
        if importance not in ("entropy", "gradient"):
            raise ValueError(f"unknown head importance {importance!r}; valid: 'entropy', 'gradient'")
        if heads is None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = top_k
        self.importance_method = importance
        self.heads = list(heads) if heads is not None else None
        if self.heads is not None:
            singles = all(_is_index(h) for h in self.heads)
            pairs = all(
                isinstance(h, Sequence)
                and not isinstance(h, str)
                and len(h) == 2
                and all(_is_index(x) for x in h)
                for h in self.heads
            )
            if not self.heads or not (singles or pairs):
                raise ValueError(
                    f"matching.heads={heads!r}: give a non-empty list of teacher heads to choose from "
                    "([0, 3, 5]) or of [teacher_head, student_head] pairs ([[0, 0], [3, 1]]), not a mix"
                )
            self.heads = [int(h) if singles else [int(h[0]), int(h[1])] for h in self.heads]
        self.selected: dict[str, list[tuple[int, int]]] = {}
        self.importance: dict[str, list[float]] = {}
        self._fixed_pairs = self.heads is not None and all(not isinstance(h, int) for h in self.heads)
        if self._fixed_pairs:
            self.top_k = len(self.heads)

    def check_heads(self, num_teacher_heads, num_student_heads, pairs) -> None:
        available = min(num_teacher_heads, num_student_heads)
        k = len(self.heads) if self.heads is not None else self.top_k
        if k > available:
            raise ValueError(
                f"matching=selective with top_k={k}: only {available} heads are available (teacher "
                f"{num_teacher_heads}, student {num_student_heads}); each selected teacher head needs its "
                "own student head. Lower top_k."
            )
        if self.heads is not None:
            teacher_heads = [h if isinstance(h, int) else h[0] for h in self.heads]
            student_heads = [] if not self._fixed_pairs else [h[1] for h in self.heads]
            if any(not 0 <= h < num_teacher_heads for h in teacher_heads) or any(
                not 0 <= h < num_student_heads for h in student_heads
            ):
                raise ValueError(
                    f"matching.heads {self.heads} names a head that does not exist: the teacher has heads "
                    f"0..{num_teacher_heads - 1} and the student 0..{num_student_heads - 1}."
                )
            # a repeated student head would be taught twice with one set of gradients (the fused kernel keeps
            # one pair's); a repeated teacher head among the candidates would be assigned twice
            named = student_heads if self._fixed_pairs else teacher_heads
            if len(set(named)) != len(named):
                side = "student" if self._fixed_pairs else "teacher"
                raise ValueError(
                    f"matching.heads {self.heads} names a {side} head twice: each may appear once"
                )
            if self._fixed_pairs:
                for pair in pairs:
                    self.selected[pair_name(pair)] = [(int(t), int(s)) for t, s in self.heads]

    @property
    def calibrated(self) -> bool:
        return bool(self.selected)

    def calibrate(
        self,
        student_maps: Mapping[int, Tensor],
        teacher_maps: Mapping[int, Tensor],
        attention_mask: Tensor | None,
        loss: Callable,
        pairs: Sequence[LayerPair],
        teacher_importance: Mapping[int, Tensor] | None = None,
        compared: tuple[Mapping[int, Tensor], Mapping[int, Tensor]] | None = None,
    ) -> dict[str, list[tuple[int, int]]]:
        """Choose and assign heads on a calibration batch; returns ``selected``.

        The maps are probabilities (head importance is their entropy); ``compared`` are the student's and the
        teacher's maps that ``loss`` compares when they are something else (``mse_scores``: scores), by layer.
        """
        for t_layer, s_layer in pairs:  # top_k or heads that do not fit fail here as they would in forward
            self.check_heads(
                teacher_maps[t_layer].shape[1], student_maps[s_layer].shape[1], [(t_layer, s_layer)]
            )
        if self._fixed_pairs:
            return self.selected
        if self.importance_method == "gradient" and teacher_importance is None and self.heads is None:
            raise ValueError(
                "importance='gradient' needs teacher_importance from gradient_head_importance(...)"
            )
        for pair in pairs:
            t_layer, s_layer = pair
            teacher, student = teacher_maps[t_layer].detach(), student_maps[s_layer].detach()
            loss_student, loss_teacher = (
                (compared[0][s_layer], compared[1][t_layer]) if compared else (student, teacher)
            )
            if self.heads is not None:
                chosen = [int(h) for h in self.heads]
                scores = torch.zeros(teacher.shape[1])
            else:
                scores = (
                    (
                        teacher_importance[t_layer]
                        if teacher_importance is not None
                        else entropy_head_importance(teacher, attention_mask)
                    )
                    .float()
                    .cpu()
                )
                chosen = scores.topk(self.top_k).indices.tolist()
            num_student_heads = student.shape[1]
            cost = torch.stack(
                [
                    loss(
                        loss_student,
                        loss_teacher[:, [t]].expand(-1, num_student_heads, -1, -1),
                        attention_mask,
                        per_head=True,
                    )
                    for t in chosen
                ]
            )  # (k, H_student): loss of teacher head chosen[i] against student head j
            # imported here: the rest of the module (and the benchmark) runs without scipy
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
            self.selected[pair_name(pair)] = [(chosen[r], int(c)) for r, c in zip(rows, cols, strict=True)]
            self.importance[pair_name(pair)] = [round(float(x), 6) for x in scores]
        return self.selected

    def head_pairs(self, num_teacher_heads, num_student_heads, pair):
        heads = self.selected.get(pair_name(pair))
        if heads is None:
            raise RuntimeError(
                "matching=selective is not calibrated: call AttentionDistillationLoss.calibrate(...) on a "
                "calibration batch first, or give explicit [teacher_head, student_head] pairs in "
                "matching.heads."
            )
        return list(heads)

    def align(self, student, teacher, pair):
        heads = self.head_pairs(teacher.shape[1], student.shape[1], pair)
        return _select_heads(student, teacher, [((t,), s) for t, s in heads])

    def __call__(self, *args, **kwargs):
        return compare(self, *args, **kwargs)


# the layer-map and matching primitives, imported last: distill_lab.matching imports this module after
# defining them, so either module may be imported first
from distill_lab.matching import _is_index, _select_heads, compare, pair_name  # noqa: E402
