"""The block-wise backend: a pair's loss from queries and keys, one block of query rows at a time.

Each block's scores or probabilities, ``(B, H, block_size, Lk)``, are computed from the ``QueryKey``
records, compared and dropped; where there is more than one block and a gradient is wanted, each block is
recomputed in the backward (activation checkpointing), so memory grows with ``block_size x L``, not
``L x L``. The reference for the fused kernels and the Gram path, and the fallback wherever they do not
apply.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from distill_lab.backends import PairContext, Terms, probs_of
from distill_lab.capture import QueryKey


def compares_scores(context: PairContext) -> bool:
    """Whether the loss takes scores here: where it compares them (``mse_scores``) or, for KL, wherever both
    sides are records and heads are compared one to one (an average of heads is one of probabilities), from
    which it takes exact log-probabilities, as the fused kernel does."""
    loss = context.loss
    if getattr(loss, "on_scores", False):
        return True
    return (
        getattr(loss, "takes_scores", False)
        and all(isinstance(r, QueryKey) for r in context.sides)
        and context.head_pairs() is not None
    )


def block_terms(context: PairContext, rows: slice, scores: bool) -> tuple[Tensor, Tensor]:
    """Loss sums and weights per aligned entry, (P,) each, over one block of query rows; the loss compares
    scores where ``scores``, else probabilities."""
    student, teacher = context.sides

    def fetch(record):
        return record.scores(rows) if scores else probs_of(record, rows)

    s, t, _ = context.matching.align(fetch(student), fetch(teacher), context.pair)
    q_len, k_len = student.shape[2], student.shape[3]
    values, weights = context.loss.row_terms(
        s, t, context.attention_mask, query_start=k_len - q_len + rows.start, scores=scores
    )
    return values.sum(dim=(0, 2)), weights.sum(dim=(0, 2))


def aligned_heads(context: PairContext) -> list[int] | None:
    """The student head each aligned entry reports as (None for modes that report no heads), from the mode's
    alignment of no rows."""
    empty = slice(0, 0)
    student, teacher = context.sides
    return context.matching.align(probs_of(student, empty), probs_of(teacher, empty), context.pair)[2]


class BlockwiseBackend:
    """Blocks of ``block_size`` query rows from ``QueryKey`` records, recomputed in the backward."""

    setting = None
    title = "the block-wise path"

    def problem(self, context: PairContext, insisted: bool) -> str | None:
        if not hasattr(context.loss, "row_terms"):
            return "a loss callable of one's own compares whole maps"
        if not context.qk and not (context.recorded and any(isinstance(r, QueryKey) for r in context.sides)):
            return "it recomputes blocks from queries and keys: QueryKey records (capture=qk)"
        return None

    def terms(self, context: PairContext) -> Terms:
        scores = compares_scores(context)
        q_len, size = context.student.shape[2], context.block_size
        values = weights = 0.0
        for start in range(0, q_len, size):
            rows = slice(start, min(start + size, q_len))
            if torch.is_grad_enabled() and q_len > size:  # keep only the block's inputs, recompute
                v, w = checkpoint(block_terms, context, rows, scores, use_reentrant=False)
            else:
                v, w = block_terms(context, rows, scores)
            values, weights = values + v, weights + w
        return Terms(values, weights, aligned_heads(context))
