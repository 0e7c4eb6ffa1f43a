"""The fused backend: KL, MSE and cosine straight from queries and keys, in Triton kernels.

``distill_lab.kernels.attention_kl`` (KL) and ``attention_probs`` (MSE, cosine) stream over key blocks, so
no ``L x L`` tile outlives a block, and recompute the tiles in their backward. They pair single heads
(no head averaging), apply key padding and the causal flag (no sliding window, soft cap or bias), and run on
CUDA; an automatic choice takes them there only (Triton's CPU interpreter, which the tests use, is far slower
than the block-wise path), ``fused=True`` also under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from distill_lab.backends import PairContext, Terms, padding_keys, windowed
from distill_lab.losses import AttentionLoss
from distill_lab.matching import pair_name

KERNEL_LOSSES = ("kl", "mse", "cosine")


class FusedBackend:
    """The Triton kernel of the loss, per pair of single heads."""

    setting = "fused"
    title = "the fused attention kernel"

    def __init__(self) -> None:
        self._head_indices: dict = {}  # (device, head pairs) -> the kernels' head index tensors, made once

    def problem(self, context: PairContext, insisted: bool) -> str | None:
        """Every reason that can be told here, joined; what only records tell (a window, a soft cap, a bias,
        a mask beyond padding) is asked once nothing else stands in the way."""
        reasons = []
        loss = context.loss
        if not (isinstance(loss, AttentionLoss) and loss.name in KERNEL_LOSSES):
            reasons.append("only loss=kl, mse and cosine have fused kernels")
        if not context.qk:
            reasons.append(
                "the kernels read queries and keys: both sides must be QueryKey records (capture=qk)"
            )
        elif context.device_type != "cuda" and not (insisted and os.environ.get("TRITON_INTERPRET") == "1"):
            reasons.append(f"they need a CUDA device, and this runs on {context.device_type}")
        else:
            from distill_lab.kernels._triton import triton  # imported only where it can run

            if triton is None:
                reasons.append("triton is not installed (pip install 'distill-lab[gpu]')")
        # a selective mode pairs single heads once calibrated, which a set-up check may come before
        if getattr(context.matching, "calibrated", True) and context.head_pairs() is None:
            mode = type(context.matching).__name__.lower()
            reasons.append(f"matching={mode} averages heads in layer pair {pair_name(context.pair)}")
        if not reasons and context.recorded:
            reasons += _record_problems(context)[:1]
        return "; ".join(reasons) or None

    def terms(self, context: PairContext) -> Terms:
        """Loss sums and weights per head pair from the kernel of the loss, weighted as ``row_terms`` weights
        rows: the softmax over the keys that both records' masks and ``attention_mask`` let through, the rows
        and a per-key loss's key counts from ``attention_mask`` (None: all)."""
        from distill_lab.kernels.attention_kl import attention_kl_rows
        from distill_lab.kernels.attention_probs import attention_probs_rows

        student, teacher = context.sides
        heads = context.head_pairs()
        batch, _, q_len, k_len = student.shape
        device = student.query.device
        given = torch.ones(batch, k_len, dtype=torch.bool, device=device)
        if context.attention_mask is not None:
            given = context.attention_mask.to(device) > 0
        keys = given
        for record in (student, teacher):  # the kernels apply one key mask: what each model's own hides too
            if (record_keys := padding_keys(record, context.masks)[1]) is not None:
                keys = keys & record_keys.to(device)
        keys = keys.to(torch.int32).contiguous()
        student_heads, teacher_heads = self._indices(device, heads)
        inputs = (
            student.query, student.key, teacher.query, teacher.key, student_heads, teacher_heads,
            keys, student.scaling, teacher.scaling,
        )  # fmt: skip
        valid = given[:, k_len - q_len :] & (keys.sum(-1, keepdim=True) > 0)  # (B, Lq) query rows
        weights = valid[:, None, :].float()
        loss = context.loss
        if loss.name == "kl":
            temperature = loss.options.get("temperature", 1.0)
            rows = attention_kl_rows(*inputs, temperature, student.causal) * temperature**2
        else:
            rows = attention_probs_rows(loss.name, *inputs, student.causal)
        values = rows * weights
        if loss.per_key:  # a row's squared errors are averaged over the example's real keys
            weights = weights * given.sum(-1)[:, None, None]
        weights = weights.expand_as(rows)
        reported = [s for _, s in heads] if context.matching.per_head else None
        return Terms(values.sum(dim=(0, 2)), weights.sum(dim=(0, 2)), reported)

    def _indices(self, device: torch.device, heads: list[tuple[int, int]]) -> tuple[Tensor, Tensor]:
        """The student's and the teacher's head indices on ``device``: a host-to-device copy, which waits for
        the GPU, so made once per head pairs, not per step."""
        key = (device, tuple(heads))
        if key not in self._head_indices:
            self._head_indices[key] = (
                torch.tensor([s for _, s in heads], dtype=torch.int32, device=device),
                torch.tensor([t for t, _ in heads], dtype=torch.int32, device=device),
            )
        return self._head_indices[key]


def _record_problems(context: PairContext) -> list[str]:
    """What the records rule out: the kernels apply key padding and the causal flag, nothing else."""
    student, teacher = context.sides
    if any(windowed(r) or r.softcap or r.bias is not None for r in (student, teacher)):
        return ["sliding-window, soft-capped or position-biased attention is not supported"]
    if student.causal != teacher.causal:
        return ["teacher and student differ in causality"]
    if not all(padding_keys(r, context.masks)[0] for r in (student, teacher)):
        return ["the mask is more than key padding and causal structure"]  # a bias would be lost
    return []
