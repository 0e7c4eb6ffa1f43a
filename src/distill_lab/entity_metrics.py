"""Entity-level precision, recall and F1 of token classification, by ``seqeval`` (conlleval's rules on BIO
tags), as a torchmetrics ``Metric`` that a distributed validation syncs.

An entity is a maximal run of tags ``B-X I-X ...`` (conlleval also starts one at a stray ``I-X``); one counts
as right only where its type and both ends match the reference's. Per sequence only the labelled tokens
count (label -100 is ignored: padding, special tokens, a word's later sub-tokens), in order: the words' tags.
"""

from __future__ import annotations

import torch
from seqeval.metrics import f1_score, precision_score, recall_score
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

SCORES = {"precision": precision_score, "recall": recall_score, "f1": f1_score}


class EntityScore(Metric):
    """seqeval's micro-averaged entity ``precision``, ``recall`` or ``f1`` over every update and process.

    The state is every sequence's predicted and reference tag ids at its labelled tokens, flattened, with the
    sequences' lengths: lists of tensors that a distributed sync concatenates (``dist_reduce_fx="cat"``), so
    :meth:`compute` scores the whole set's sequences as one process would. The tag names (``label_names``,
    the teacher's ``id2label`` in id order) are read at :meth:`compute`; without them the ids are named
    ``"0"``, ``"1"``..., which seqeval takes for no entity.

    Args:
        score: ``"precision"``, ``"recall"`` or ``"f1"``.
        label_names: The tag names in id order (``O``, ``B-PER``, ``I-PER``...).
        ignore_index: The label of tokens that are no word's first sub-token.
        kwargs: torchmetrics' own (``sync_on_compute``, ``process_group``...).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self, score: str = "f1", label_names: list[str] | None = None, ignore_index: int = -100, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if score not in SCORES:
            raise ValueError(f"score={score!r}; valid: {', '.join(SCORES)}")
        self.score, self.label_names, self.ignore_index = score, label_names, ignore_index
        self.add_state("predictions", default=[], dist_reduce_fx="cat")
        self.add_state("targets", default=[], dist_reduce_fx="cat")
        self.add_state("lengths", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """``logits`` (B, L, C), ``labels`` (B, L)."""
        keep = labels != self.ignore_index
        self.predictions.append(logits.argmax(-1)[keep])
        self.targets.append(labels[keep])
        self.lengths.append(keep.sum(-1))

    def sequences(self) -> tuple[list[list[str]], list[list[str]]]:
        """The reference and predicted tag names of every sequence updated (synced where distributed)."""
        if isinstance(self.lengths, list) and not self.lengths:
            return [], []
        # .long(): a process that saw no batch sends an empty float tensor, which the concatenation promotes
        lengths = dim_zero_cat(self.lengths).long().tolist()
        names = self.label_names
        tags = [
            [names[i] if names is not None else str(i) for i in dim_zero_cat(state).long().tolist()]
            for state in (self.targets, self.predictions)
        ]
        split: tuple[list, list] = ([], [])
        start = 0
        for length in lengths:
            if length:  # a sequence without a labelled token holds no entity
                for out, flat in zip(split, tags, strict=True):
                    out.append(flat[start : start + length])
            start += length
        return split

    def compute(self) -> Tensor:
        truth, predicted = self.sequences()
        if not truth:
            return torch.tensor(0.0)
        return torch.tensor(float(SCORES[self.score](truth, predicted, zero_division=0)))
