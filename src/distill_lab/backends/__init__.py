"""How one layer pair's attention loss is computed: the backends, and the one place that chooses among them.

Each way of computing a pair's loss is a backend object in a module of its own:

- ``maps``: the whole maps at once, no recomputation: probability maps (``capture=probs``), the maps that
  the ``qk`` capture kept within its memory budget, or any records for a loss callable of one's own;
- ``fused``: the Triton kernels from queries and keys (CUDA), no ``L x L`` tile outliving a block;
- ``gram``: ``mse_scores`` from Gram matrices of queries and keys, O(L D^2), no ``L x L`` work at all;
- ``blockwise``: blocks of query rows recomputed from queries and keys, again in the backward.

A backend answers ``problem(context, insisted)``: why it does not apply to a pair (a reason, quoted by every
error about it) or None; and ``terms(context)``: the pair's loss sums and weights per aligned entry.
``choose`` is the only place that picks one: an insisted backend (``fused=True``, ``gram=True``) must apply,
else a ``BackendUnavailable`` quotes its reason; otherwise the first that applies, in the order of
``BACKENDS``, among those not switched off (``False``). Adding a backend is a module defining its class and
one entry in ``BACKENDS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from distill_lab.capture import QueryKey
from distill_lab.losses import MASKED_SCORE
from distill_lab.matching import LayerPair, Matching


@dataclass
class PairContext:
    """One layer pair as the backends see it: the objective's loss and matching mode, the head counts and,
    once a forward has recorded them, both sides' attention (before it, a set-up check asks what it can).

    ``qk``: both sides are (or will be, ``capture=qk``) ``QueryKey`` records. ``masks`` caches, within one
    forward, each record mask's check (``padding_keys``), as all layers of a model share one mask.
    """

    loss: Callable
    matching: Matching
    pair: LayerPair
    num_teacher_heads: int
    num_student_heads: int
    qk: bool
    device_type: str | None
    block_size: int = 256
    student: Tensor | QueryKey | None = None
    teacher: Tensor | QueryKey | None = None
    attention_mask: Tensor | None = None
    masks: dict = field(default_factory=dict)

    @property
    def recorded(self) -> bool:
        """Whether the attention is at hand (a forward), not only its description (a set-up check)."""
        return self.student is not None

    @property
    def sides(self) -> tuple[Tensor | QueryKey, Tensor | QueryKey]:
        return self.student, self.teacher

    def head_pairs(self) -> list[tuple[int, int]] | None:
        """The mode's ``(teacher_head, student_head)`` pairs here, None where it averages heads."""
        return self.matching.head_pairs(self.num_teacher_heads, self.num_student_heads, self.pair)


class Terms(NamedTuple):
    """A pair's loss as sums and weights per aligned entry, (P,) each: the pair's loss is ``sum(values) /
    sum(weights)``, or for a mode that reports heads the mean of ``values / weights``, entry j reporting as
    student head ``heads[j]``."""

    values: Tensor
    weights: Tensor
    heads: list[int] | None


class Backend(Protocol):
    """A way of computing a layer pair's terms. ``setting`` names the ``AttentionDistillationLoss`` argument
    that insists on it (True) or switches it off (False), None where no setting does; ``title`` names it in
    errors."""

    setting: str | None
    title: str

    def problem(self, context: PairContext, insisted: bool) -> str | None:
        """Why the backend does not apply here, or None. ``insisted``: the caller asks for it (an automatic
        choice may also refuse where it applies but does not pay)."""

    def terms(self, context: PairContext) -> Terms: ...


class BackendUnavailable(ValueError):
    """An insisted backend that does not apply; ``reason`` is the backend's own."""

    def __init__(self, backend: Backend, reason: str) -> None:
        self.setting, self.reason = backend.setting, reason
        super().__init__(f"{backend.setting}=True, but {backend.title} does not apply: {reason}")


def insisted_on(
    backends: Sequence[Backend], context: PairContext, settings: Mapping[str, bool | None]
) -> list[Backend]:
    """The backends ``settings`` insist on (``True``) for this pair; raises ``BackendUnavailable`` with the
    backend's own reason where one does not apply. Before a forward (a context without records) this is all
    that can be told: which backend an automatic choice takes depends on the records."""
    insisted = [b for b in backends if b.setting is not None and settings.get(b.setting) is True]
    for backend in insisted:
        if (reason := backend.problem(context, insisted=True)) is not None:
            raise BackendUnavailable(backend, reason)
    return insisted


def choose(backends: Sequence[Backend], context: PairContext, settings: Mapping[str, bool | None]) -> Backend:
    """The backend that computes this pair: every insisted one must apply (the first of them is taken), else
    the first, in order, that applies and is not switched off."""
    if insisted := insisted_on(backends, context, settings):
        return insisted[0]
    reasons = []
    for backend in backends:
        if backend.setting is not None and settings.get(backend.setting) is False:
            continue
        if (reason := backend.problem(context, insisted=False)) is None:
            return backend
        reasons.append(f"{backend.title}: {reason}")
    raise ValueError(f"no way to compute layer pair {context.pair}: {'; '.join(reasons)}")


# ---------------------------------------------------------------------------------------------- records


def probs_of(attention: Tensor | QueryKey, rows: slice | None = None) -> Tensor:
    """Probabilities (B, H, rows, Lk) from a map or a ``QueryKey`` record."""
    if isinstance(attention, QueryKey):
        return attention.probs(rows)
    return attention if rows is None else attention[:, :, rows]


def windowed(record: QueryKey) -> bool:
    """Whether a sliding window hides keys of these records: not where it spans every key (Mistral's 4096 at
    L = 2048), whose mask is then padding and causal structure alone."""
    return record.sliding_window is not None and record.sliding_window < record.shape[3]


def key_padding(mask: Tensor, k_len: int, causal: bool = False) -> Tensor | None:
    """The keys a key-padding mask lets through, or None when ``mask`` is more than key padding (and, with
    ``causal``, the causal structure).

    Such a mask is the same for every head and, but for the causal structure (query i of the last Lq sees
    keys up to ``i + Lk - Lq``), for every query row; it holds nothing but "attend" (True, or 0 when
    additive) and "masked" (False, or a score at or below -1e30): no sliding window, no bias. Deciding this
    reads the whole mask and waits for it on the host once.

    Shape:
        mask: (B, 1 or H, Lq or 1, >= Lk), boolean (True: attend) or additive float, as the model built it.
        Returns: (B, Lk) boolean, True for the keys that are not padding.
    """
    mask = mask[..., :k_len]
    allowed = mask if mask.dtype == torch.bool else mask > MASKED_SCORE
    keys = allowed.any(dim=2).any(dim=1)  # (B, Lk)
    expected = keys[:, None, None, :]
    if causal and allowed.shape[2] > 1:
        q_len = allowed.shape[2]
        lower = torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(k_len - q_len)
        expected = expected & lower
    padding_only = (allowed == expected).all()
    if mask.dtype != torch.bool:
        padding_only = padding_only & (mask.masked_fill(~allowed, 0.0) == 0).all()
    return keys if bool(padding_only) else None


def padding_keys(record: QueryKey, masks: dict) -> tuple[bool, Tensor | None]:
    """Whether ``record``'s mask is key padding (with the layer's causal structure) at most, and the keys it
    lets through (None: no mask). Cached in ``masks`` by mask object, as all layers of a model share one."""
    if record.mask is None:
        return True, None
    cache_key = (id(record.mask), record.causal, record.shape[3])
    if cache_key not in masks:
        masks[cache_key] = (record.mask, key_padding(record.mask, record.shape[3], record.causal))
    keys = masks[cache_key][1]  # the mask is kept in the cache so that its id is not reused meanwhile
    return keys is not None, keys


# the registry, imported last (each backend module builds on the definitions above); its order is the
# automatic preference: maps already computed first, then the kernels, the Gram path, the block-wise path
from distill_lab.backends.blockwise import BlockwiseBackend  # noqa: E402
from distill_lab.backends.fused import FusedBackend  # noqa: E402
from distill_lab.backends.gram import GramBackend  # noqa: E402
from distill_lab.backends.maps import MapsBackend  # noqa: E402

BACKENDS: tuple[type, ...] = (MapsBackend, FusedBackend, GramBackend, BlockwiseBackend)
