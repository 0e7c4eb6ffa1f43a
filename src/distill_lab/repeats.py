"""The repeats of a distributed validation: which rows of a batch are examples a process is the first to see.

Under DDP and FSDP, Lightning's ``DistributedSampler`` pads the validation set to a multiple of the process
count by repeating its first examples at the end. Counted as they come, those examples would weigh twice in
the validation metrics and losses; ``DistillationModule.validation_step`` takes them over the rows that
:func:`unrepeated_rows` keeps, so that every validation example counts once, as in one process.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from distill_lab.capture import QueryKey


def batch_size(batch: Mapping[str, Tensor]) -> int | None:
    """The examples in ``batch`` (of token ids or pixels); None for a batch of neither."""
    inputs = batch.get("input_ids", batch.get("pixel_values"))
    return inputs.shape[0] if inputs is not None else None


def unrepeated_rows(loader, batch_idx: int, rows: int | None) -> Tensor | None:
    """Which rows of validation batch ``batch_idx`` of ``loader`` are examples this process is the first to
    see (a boolean mask on the CPU), or None when all are. Process ``r`` takes every ``world``-th example from
    position ``r``, so its row ``j`` is a repeat exactly when ``r + j * world`` reaches the set's size."""
    sampler = getattr(loader, "sampler", None)
    if (
        rows is None
        or not isinstance(sampler, torch.utils.data.DistributedSampler)
        or sampler.shuffle
        or sampler.drop_last
    ):
        return None
    size = len(sampler.dataset)
    if size % sampler.num_replicas == 0:
        return None
    positions = sampler.rank + (batch_idx * loader.batch_size + torch.arange(rows)) * sampler.num_replicas
    real = positions < size  # only a process's last batch can hold a repeat
    return None if bool(real.all()) else real


def select_rows(batch: Mapping[str, Tensor], keep: Tensor) -> dict[str, Tensor]:
    """The rows ``keep`` (a boolean mask) of every per-example tensor of ``batch``."""
    return {k: v[keep] for k, v in batch.items() if isinstance(v, Tensor) and len(v) == len(keep)}


def select_map_rows(maps: Mapping, keep: Tensor) -> dict:
    """The rows ``keep`` of captured attention (``{layer: probabilities or QueryKey record}``); a record's
    mask or bias that is shared by the batch (first dimension 1) stays whole."""
    return {layer: m.examples(keep) if isinstance(m, QueryKey) else m[keep] for layer, m in maps.items()}


def select_hidden_rows(hidden_states: tuple[Tensor, ...] | None, keep: Tensor) -> tuple[Tensor, ...] | None:
    """The rows ``keep`` of every tensor of a model's ``outputs.hidden_states`` (None stays None)."""
    return None if hidden_states is None else tuple(h[keep] for h in hidden_states)
