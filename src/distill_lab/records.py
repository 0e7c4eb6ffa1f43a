"""What the ``qk`` capture records of a layer: its queries and keys (``QueryKey``), from which the losses
compute the layer's masked scores and attention probabilities, whole or a block of query rows at a time,
or take the maps the capture kept. Pure PyTorch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class QueryKey:
    """One layer's queries and keys, which the ``qk`` backend records: enough to recompute its attention
    probabilities, in float32, block by block (``probs(rows)``), with the layer's own mask.

    Shape:
        query: (B, H, Lq, D) after any rotary embedding; key: (B, H_kv, Lk, D), H a multiple of H_kv.
        mask: (B, 1 or H, Lq, Lk) as the model built it (additive float or boolean), or None.

    ``causal`` and ``sliding_window`` describe the layer itself; when ``mask`` is given it is what the scores
    use, and ``causal`` applies only where the model built no mask. ``bias`` is a per-layer additive score
    bias (T5's relative positions), ``(B or 1, H, Lq, Lk)``. ``maps`` holds the whole layer's ``(scores,
    probabilities)`` where the capture computed them anyway (eager attention within its memory budget):
    ``scores`` and ``probs`` then return them instead of computing them again. ``value``: the layer's values
    after their projection, (B, H_kv, Lk, D_v), which the relation losses compare (``vectors("value")``).

    The scores are computed in float32 even under ``torch.autocast``: a bf16 product of queries and keys
    rounds the scores, which roughly doubles a small KL between near-equal maps.
    """

    query: Tensor
    key: Tensor
    scaling: float
    mask: Tensor | None = None
    causal: bool = False
    softcap: float | None = None
    sliding_window: int | None = None
    bias: Tensor | None = None
    maps: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)
    value: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the probabilities this stands for: (B, H, Lq, Lk)."""
        return (*self.query.shape[:3], self.key.shape[2])

    def detach(self) -> QueryKey:
        """The same record, with no gradient flowing back through it (a teacher's: the target)."""
        maps = None if self.maps is None else tuple(m.detach() for m in self.maps)
        value = None if self.value is None else self.value.detach()
        return dataclasses.replace(
            self, query=self.query.detach(), key=self.key.detach(), maps=maps, value=value
        )

    def examples(self, keep: Tensor | slice) -> QueryKey:
        """The record of the batch's examples ``keep`` (a boolean mask or a slice of the batch): queries,
        keys, kept maps and a per-example mask or bias taken at those rows; a mask or bias that the batch
        shares (first dimension 1) stays whole."""
        batch = self.query.shape[0]

        def rows(x: Tensor | None) -> Tensor | None:
            return x if x is None or x.shape[0] != batch else x[keep]

        maps = None if self.maps is None else tuple(m[keep] for m in self.maps)
        return dataclasses.replace(
            self,
            query=self.query[keep],
            key=self.key[keep],
            mask=rows(self.mask),
            bias=rows(self.bias),
            maps=maps,
            value=None if self.value is None else self.value[keep],
        )

    def vectors(self, kind: str) -> Tensor:
        """All heads' queries, keys or values of each token side by side, as MiniLMv2's relations take them:
        ``kind`` is ``"query"``, ``"key"`` or ``"value"``; grouped key and value heads are expanded to the
        query heads they serve first, so a model with grouped-query attention gives ``H x D`` features too.

        Shape:
            Returns: (B, L, H * D) (``H * D_v`` for values).
        """
        if kind not in ("query", "key", "value"):
            raise ValueError(f"kind must be 'query', 'key' or 'value'; got {kind!r}")
        x = getattr(self, kind)
        if x is None:
            raise ValueError(
                "this record holds no values: it was not made by AttentionCapture(..., backend='qk')"
            )
        x = repeat_heads(x, self.query.shape[1] // x.shape[1])
        batch, heads, length, dim = x.shape
        return x.transpose(1, 2).reshape(batch, length, heads * dim)

    def scores(self, rows: slice | None = None) -> Tensor:
        """Masked attention scores (B, H, rows, Lk) in float32 (float64 for float64 inputs)."""
        if self.maps is not None:
            return self.maps[0] if rows is None else self.maps[0][:, :, rows]
        return self.masked_scores(rows)[0]

    def probs(self, rows: slice | None = None) -> Tensor:
        """Attention probabilities (B, H, rows, Lk), before dropout, in float32 (float64 for float64); a row
        that may see no key (a padded query under a boolean mask) is all zeros, as SDPA gives it, not NaN."""
        if self.maps is not None:
            return self.maps[1] if rows is None else self.maps[1][:, :, rows]
        return masked_softmax(*self.masked_scores(rows))

    def masked_scores(self, rows: slice | None) -> tuple[Tensor, Tensor | bool | None]:
        """The masked scores and the rows that may see no key, as far as the mask alone tells (False: none;
        None: not known without the scores)."""
        query = self.query if rows is None else self.query[:, :, rows]
        rows = rows or slice(0, self.query.shape[2])
        # grouped-query attention: each key head serves `groups` query heads
        key = repeat_heads(self.key, query.shape[1] // self.key.shape[1])
        dtype = torch.promote_types(query.dtype, torch.float32)
        if torch.is_autocast_enabled(query.device.type):
            with torch.autocast(query.device.type, enabled=False):
                scores = _product(query, key, self.scaling, dtype)
        else:
            scores = _product(query, key, self.scaling, dtype)
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.bias is not None:
            bias = self.bias if self.bias.shape[2] == 1 else self.bias[:, :, rows]
            scores = scores + bias[..., : key.shape[2]].to(dtype)
        q_len, k_len = self.query.shape[2], key.shape[2]
        empty = False if self.bias is None else None
        if self.mask is not None:
            mask = self.mask
            if mask.shape[2] > 1 and scores.shape[2] < mask.shape[2]:
                mask = mask[:, :, rows]
            mask = mask if mask.shape[3] == k_len else mask[..., :k_len]
            if mask.dtype == torch.bool:  # added as 0 and -inf: an addition's backward is free
                scores = scores + torch.where(mask, 0.0, -math.inf).to(dtype)
                empty = _empty_rows(mask) if empty is False else None
            else:
                scores = scores + mask.to(dtype)
                empty = torch.isneginf(mask).all(-1, keepdim=True) if empty is False else None
        elif self.causal and q_len > 1:
            start = rows.start + k_len - q_len
            positions = torch.arange(start, start + scores.shape[2], device=scores.device)
            allowed = torch.arange(k_len, device=scores.device)[None, :] <= positions[:, None]
            scores = scores + torch.where(allowed, 0.0, -math.inf).to(dtype)
            empty = None if q_len > k_len else empty
        return scores, empty


def _product(query: Tensor, key: Tensor, scaling: float, dtype: torch.dtype) -> Tensor:
    """``scaling * query @ key^T`` in ``dtype``, the scaling applied on the (L, D) side."""
    return torch.matmul(query.to(dtype) * scaling, key.to(dtype).transpose(-1, -2))


def repeat_heads(x: Tensor, groups: int) -> Tensor:
    """``x`` (B, H, L, D) with each head repeated ``groups`` times in a row, as ``repeat_interleave`` along
    the heads gives it (a key head for each query head it serves), through a broadcast view and one copy."""
    if groups == 1:
        return x
    batch, heads, length, dim = x.shape
    return x[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def _empty_rows(mask: Tensor) -> Tensor | bool:
    """The rows of a boolean mask that let no key through, (..., rows, 1); False where none is (told at once
    on a CPU, where asking costs no wait for a device)."""
    has_key = mask.any(-1, keepdim=True)
    if mask.device.type == "cpu" and bool(has_key.all()):
        return False
    return ~has_key


def masked_softmax(scores: Tensor, empty: Tensor | bool | None = None) -> Tensor:
    """Probabilities from masked scores; a row with no allowed key (``empty``, (..., rows, 1); None: found
    from the scores) is all zeros. Where no row is empty the softmax is all there is to it: known from the
    mask, or checked on a CPU, where asking costs no wait for a device."""
    if empty is None:
        empty = torch.isneginf(scores).all(-1, keepdim=True)
    if empty is False or (scores.device.type == "cpu" and not bool(empty.any())):
        return torch.softmax(scores, dim=-1)  # float32 under autocast too: autocast runs softmax in float32
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
