"""The maps backend: a pair's loss from its whole attention maps at once, with nothing recomputed.

It applies where the maps are at hand: probability maps (``capture=probs``), ``QueryKey`` records whose
capture kept the scores and probabilities it computed anyway (``AttentionCapture``'s memory budget), and,
for a loss callable of one's own (which sees whole maps), any records. Memory: the whole ``L x L`` maps,
which is why the capture keeps them only within its budget.
"""

from __future__ import annotations

import torch

from distill_lab.backends import PairContext, Terms, probs_of
from distill_lab.backends.blockwise import aligned_heads, block_terms, compares_scores
from distill_lab.capture import QueryKey


class MapsBackend:
    """Whole maps, compared at once."""

    setting = None
    title = "the whole-maps path"

    def problem(self, context: PairContext, insisted: bool) -> str | None:
        if not context.recorded:
            return "the maps exist only once a forward has run"
        if not hasattr(context.loss, "row_terms"):
            return None  # a loss callable of one's own compares whole maps, computed from records if need be
        if any(isinstance(r, QueryKey) and r.maps is None for r in context.sides):
            return (
                "the records hold queries and keys only (their maps exceed the capture's memory budget, or "
                "the capture ran on CUDA, where it keeps none by default)"
            )
        return None

    def terms(self, context: PairContext) -> Terms:
        student, teacher = context.sides
        if hasattr(context.loss, "row_terms") and any(isinstance(r, QueryKey) for r in context.sides):
            # kept maps: the block-wise path's computation in one block, on the records' own tensors
            rows = slice(0, student.shape[2])
            values, weights = block_terms(context, rows, compares_scores(context))
            return Terms(values, weights, aligned_heads(context))
        value, per_head = context.matching(
            probs_of(student), probs_of(teacher), context.attention_mask, context.loss, context.pair
        )
        if per_head is None:
            value = value.reshape(1)
            return Terms(value, torch.ones_like(value), None)
        heads = list(per_head)
        per = torch.stack([per_head[h] for h in heads])
        return Terms(per, torch.ones_like(per), heads)
