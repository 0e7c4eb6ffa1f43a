"""Distillation losses: attention maps (MSE, KL, cosine), and the output loss and objective (soft-target KD,
``distillation_objective``), which ``distill_lab.objective`` defines.

Pure PyTorch. Every attention loss takes the student's map first and the teacher's second, both attention
probabilities whose rows sum to 1 (``attention_mse_scores``: pre-softmax scores), and an optional padding
mask. The teacher's is the target: no gradient flows into it. A masked position is excluded both as a
query row and as a key column. Losses are computed in float32 (or float64 when given float64) whatever the
input dtype, so bf16 maps neither overflow nor lose the small differences that distillation is about.

Each attention loss is written as per-row terms plus a weight per row (see ``_row_terms``), so the same code
gives the mean over everything or the mean per head, which head-wise matching logs.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from distill_lab.objective import _compute_dtype, distillation_objective, kd_loss  # noqa: F401 (re-exported)

# log of the smallest positive float32: where the student gives zero probability to a key that the teacher
# does not, KL is infinite; clamping the student's log-probability here keeps it finite (and large).
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def _validity(
    shape: tuple[int, ...],
    device: torch.device,
    attention_mask: Tensor | None,
    query_start: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Key validity ``(B, 1, 1, Lk)``, row validity ``(B, 1, Lq)`` and valid keys per row ``(B, 1, Lq)`` for
    maps of ``shape`` (B, H, Lq, Lk).

    With ``Lq < Lk`` (a decoder with cached keys) the queries are the last ``Lq`` positions of the mask.
    """
    if attention_mask is None:
        return None, None, None
    batch, _, q_len, k_len = shape
    if attention_mask.dim() != 2 or attention_mask.shape != (batch, k_len):
        raise ValueError(
            f"attention_mask must have shape (batch, key_length) = ({batch}, {k_len}) to match attention "
            f"maps of shape {tuple(shape)}; got {tuple(attention_mask.shape)}."
        )
    keys = attention_mask.to(device=device, dtype=torch.bool)
    n_keys = keys.sum(-1, keepdim=True)  # (B, 1)
    start = k_len - q_len if query_start is None else query_start
    rows = keys[:, start : start + q_len] & (n_keys > 0)  # (B, Lq)
    return keys[:, None, None, :], rows[:, None, :], n_keys[:, :, None].expand(batch, 1, q_len)


def _log_probs(p: Tensor, key_valid: Tensor | None, temperature: float) -> tuple[Tensor, Tensor]:
    """``log softmax(log(p) / T)`` over the valid keys, and which rows have no positive probability there.

    Zero probabilities become ``-inf`` scores (so they stay zero at any temperature) through a double
    ``where``, which keeps the gradient finite at exact zeros (causal maps are full of them).
    """
    positive = p > 0
    if key_valid is not None:
        positive = positive & key_valid
    log_p = torch.where(positive, torch.log(torch.where(positive, p, 1.0)), -math.inf)
    empty = ~positive.any(-1, keepdim=True)
    log_p = torch.where(empty, 0.0, log_p)  # keeps log_softmax finite; the caller handles empty rows
    return torch.log_softmax(_scaled(log_p, temperature), dim=-1), empty.squeeze(-1)


def _scaled(x: Tensor, temperature: float) -> Tensor:
    return x if temperature == 1.0 else x / temperature


def _log_softmax_scores(
    scores: Tensor, key_valid: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """``log softmax(scores / T)`` over the valid keys, and which rows have no valid key: the exact
    log-probabilities, where those taken from probabilities stop at the smallest positive float32 (a score
    about 87 below the row's largest)."""
    if key_valid is not None:
        scores = torch.where(key_valid, scores, -math.inf)
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    scores = torch.where(empty, 0.0, scores)  # keeps log_softmax finite; the caller handles empty rows
    return torch.log_softmax(_scaled(scores, temperature), dim=-1), empty.squeeze(-1)


def _row_terms(
    kind: str,
    student: Tensor,
    teacher: Tensor,
    attention_mask: Tensor | None,
    temperature: float = 1.0,
    query_start: int | None = None,
    *,
    per_key: bool,
) -> tuple[Tensor, Tensor]:
    """Per-row loss sums ``(B, H, Lq)`` and the number of elements each row stands for ``(B, H, Lq)``.

    The loss is ``values.sum() / weights.sum()``: for MSE a row's value is its sum of squared differences
    over the valid keys, for KL and cosine the row loss. A row weighs 1 or, ``per_key`` (the MSE losses,
    averaged over keys too), its number of valid keys; invalid rows have value and weight 0, and so, for KL,
    do rows where the teacher has no mass. ``kl_scores`` is KL from masked scores (``-inf`` where masked)
    instead of probabilities.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher attention maps differ in shape: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)}. Match heads first (see distill_lab.matching) and use one tokenizer "
            "for both models so that sequence lengths agree."
        )
    if student.dim() != 4:
        raise ValueError(
            f"attention maps must be (batch, heads, query, key); got shape {tuple(student.shape)}"
        )
    dtype = _compute_dtype(student)
    s, t = student.to(dtype), teacher.to(dtype).detach()  # the teacher is the target: no gradient reaches it
    key_valid, row_valid, n_keys = _validity(s.shape, s.device, attention_mask, query_start)
    ones = torch.ones((), dtype=dtype, device=s.device)

    if kind == "mse":
        sq = (s - t).square()
        if key_valid is not None:
            sq = torch.where(key_valid, sq, 0.0)
        values = sq.sum(-1)
        weights = ones.expand_as(values)
    elif kind in ("kl", "kl_scores"):
        log_softmax = _log_probs if kind == "kl" else _log_softmax_scores
        log_t, t_empty = log_softmax(t, key_valid, temperature)
        log_s, s_empty = log_softmax(s, key_valid, temperature)
        # a student row with no mass on the valid keys has zero mass wherever the teacher has some; where the
        # student's probability is zero (or, from probabilities, below float32's range) its log is floored
        floored = s_empty.unsqueeze(-1) | (log_s < _LOG_TINY if kind == "kl" else torch.isneginf(log_s))
        log_s = torch.where(floored, _LOG_TINY, log_s)
        p_t = log_t.exp()
        log_t = torch.where(p_t > 0, log_t, 0.0)  # 0 * (-inf) would be NaN
        values = (p_t * (log_t - log_s)).sum(-1) * temperature**2
        weights = (~t_empty).to(dtype)  # a row where the teacher has no mass on valid keys has no target
    elif kind == "cosine":
        if key_valid is not None:
            s, t = torch.where(key_valid, s, 0.0), torch.where(key_valid, t, 0.0)
        dot = (s * t).sum(-1)
        norms = (s.square().sum(-1) * t.square().sum(-1)).clamp_min(1e-16).sqrt()
        values = 1.0 - dot / norms
        weights = ones.expand_as(values)
    else:  # pragma: no cover - guarded by get_attention_loss
        raise ValueError(f"unknown attention loss kind {kind!r}")

    if per_key:
        weights = weights * (n_keys.to(dtype) if n_keys is not None else ones * s.shape[-1])
    if row_valid is not None:
        weights = weights * row_valid.to(dtype)
        values = torch.where(weights > 0, values, torch.zeros_like(values))
    return values, weights


def averaged_elements(shape: tuple[int, ...], attention_mask: Tensor | None, per_key: bool) -> int | Tensor:
    """How many elements one head's loss over maps of ``shape`` (B, H, Lq, Lk) averages over: the valid query
    rows (KL, cosine), or with ``per_key`` their valid keys (MSE: ``(b, valid q, valid k)``). The weight of
    a batch's attention loss in a mean over batches that equals the loss over their union (but for rows
    where the teacher has no mass, which KL leaves out: none with ordinary masks)."""
    _, rows, n_keys = _validity(
        shape, attention_mask.device if attention_mask is not None else None, attention_mask
    )
    if rows is None:
        return shape[0] * shape[2] * (shape[3] if per_key else 1)
    return (rows * n_keys).sum() if per_key else rows.sum()


def _reduce(values: Tensor, weights: Tensor, per_head: bool) -> Tensor:
    if per_head:
        return values.sum(dim=(0, 2)) / weights.sum(dim=(0, 2)).clamp_min(1.0)
    return values.sum() / weights.sum().clamp_min(1.0)


def attention_mse(
    student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None, *, per_head: bool = False
) -> Tensor:
    """Mean squared error between attention maps.

    ``mean over (b, h, valid q, valid k) of (student - teacher)^2``.

    Shape:
        student, teacher: (B, H, Lq, Lk) attention probabilities, rows sum to 1.
        attention_mask: (B, Lk), 1 for real tokens; queries are its last Lq positions.
        Returns: a scalar, or (H,) with ``per_head=True`` (the same mean taken per head).
    """
    return _reduce(*_row_terms("mse", student, teacher, attention_mask, per_key=True), per_head)


def attention_kl(
    student: Tensor,
    teacher: Tensor,
    attention_mask: Tensor | None = None,
    temperature: float = 1.0,
    *,
    per_head: bool = False,
) -> Tensor:
    """KL divergence from the teacher's attention rows to the student's, at a temperature.

    Per valid row: ``T^2 * KL(t_T || s_T)`` with ``p_T = softmax(log(p) / T)`` over the valid keys (T = 1
    renormalises over the valid keys and otherwise leaves ``p`` as it is); then the mean over (b, h, valid q).
    Zero probabilities are exact zeros at any temperature and never give NaN; a key where the student has
    zero mass and the teacher does not gives a large finite value.

    Shape:
        student, teacher: (B, H, Lq, Lk) attention probabilities, rows sum to 1.
        attention_mask: (B, Lk), 1 for real tokens; queries are its last Lq positions.
        Returns: a scalar, or (H,) with ``per_head=True``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return _reduce(*_row_terms("kl", student, teacher, attention_mask, temperature, per_key=False), per_head)


def attention_cosine(
    student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None, *, per_head: bool = False
) -> Tensor:
    """Cosine distance between attention rows.

    Per valid row: ``1 - cos(student_row, teacher_row)`` over the valid keys; mean over (b, h, valid q).

    Shape:
        student, teacher: (B, H, Lq, Lk) attention probabilities, rows sum to 1.
        attention_mask: (B, Lk), 1 for real tokens; queries are its last Lq positions.
        Returns: a scalar, or (H,) with ``per_head=True``.
    """
    return _reduce(*_row_terms("cosine", student, teacher, attention_mask, per_key=False), per_head)


# a score at or below this is a masked position (transformers adds the dtype's minimum, or -inf)
MASKED_SCORE = -1e30


def _zero_masked(scores: Tensor) -> Tensor:
    return torch.where(scores > MASKED_SCORE, scores, torch.zeros_like(scores))


def attention_mse_scores(
    student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None, *, per_head: bool = False
) -> Tensor:
    """TinyBERT's attention loss: mean squared error between pre-softmax attention *scores*.

    Masked positions (scores at or below -1e30, as transformers' masks leave them) count as 0 on both sides,
    as TinyBERT sets them; the mean is over (b, h, valid q, valid k). Scores are not probabilities, so this
    loss needs the queries and keys (``capture=qk``), not probability maps.

    Shape:
        student, teacher: (B, H, Lq, Lk) masked attention scores (``QueryKey.scores()``).
        attention_mask: (B, Lk), 1 for real tokens; queries are its last Lq positions.
        Returns: a scalar, or (H,) with ``per_head=True``.
    """
    terms = _row_terms("mse", _zero_masked(student), _zero_masked(teacher), attention_mask, per_key=True)
    return _reduce(*terms, per_head)


ATTENTION_LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": attention_mse, "kl": attention_kl, "cosine": attention_cosine, "mse_scores": attention_mse_scores,
}  # fmt: skip


def get_attention_loss(name: str) -> Callable[..., Tensor]:
    """The attention loss function registered under ``name`` (see ``ATTENTION_LOSSES``)."""
    try:
        return ATTENTION_LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown attention loss {name!r}; valid choices: {', '.join(sorted(ATTENTION_LOSSES))}"
        ) from None


class AttentionLoss(nn.Module):
    """An attention loss by name with its options bound, e.g. ``AttentionLoss("kl", temperature=2.0)``."""

    def __init__(self, name: str, **options) -> None:
        super().__init__()
        self.name = name
        self.options = options
        self.fn = functools.partial(get_attention_loss(name), **options)
        if name == "kl" and not options.get("temperature", 1.0) > 0:  # every path, the fused kernel's too
            raise ValueError(f"temperature must be positive, got {options['temperature']}")

    def forward(
        self, student: Tensor, teacher: Tensor, attention_mask: Tensor | None = None, per_head: bool = False
    ) -> Tensor:
        return self.fn(student, teacher, attention_mask, per_head=per_head)

    def row_terms(
        self,
        student: Tensor,
        teacher: Tensor,
        attention_mask: Tensor | None = None,
        query_start: int | None = None,
        scores: bool = False,
    ) -> tuple[Tensor, Tensor]:
        """Per-row loss sums and weights (B, H, Lq) for a block of query rows starting at key position
        ``query_start``: the loss over many blocks is ``sum(values) / sum(weights)`` over all of them.

        ``scores``: the inputs are masked pre-softmax scores (``-inf`` where masked), which ``mse_scores``
        compares and from which KL takes exact log-probabilities (``takes_scores``)."""
        if scores and not self.takes_scores:
            raise ValueError(f"loss={self.name} compares probabilities, not scores")
        if self.on_scores:
            student, teacher = _zero_masked(student), _zero_masked(teacher)
        kind = "mse" if self.on_scores else "kl_scores" if scores else self.name
        options = dict(query_start=query_start, per_key=self.per_key, **self.options)
        return _row_terms(kind, student, teacher, attention_mask, **options)

    @property
    def per_key(self) -> bool:
        """Whether the loss is a mean over keys as well as query rows (the MSE losses): a row then weighs as
        many elements as it has valid keys, in ``row_terms`` and in ``AttentionDistillationLoss.elements``."""
        return self.name in ("mse", "mse_scores")

    @property
    def on_scores(self) -> bool:
        """Whether the loss compares pre-softmax scores (``mse_scores``) rather than probabilities."""
        return self.name == "mse_scores"

    @property
    def takes_scores(self) -> bool:
        """Whether ``row_terms`` can take scores where they are at hand: ``mse_scores`` needs them, KL takes
        its log-probabilities from them exactly."""
        return self.name in ("mse_scores", "kl")

    def extra_repr(self) -> str:
        return ", ".join([repr(self.name)] + [f"{k}={v}" for k, v in self.options.items()])


_ELSEWHERE = {"relation_kl": "relations", "hidden_mse": "hidden", "hidden_cosine": "hidden"}


def __getattr__(name: str):
    """The relation and hidden-state losses live in ``distill_lab.relations`` and ``distill_lab.hidden``,
    which build on this module: imported from there on first use."""
    if name in _ELSEWHERE:
        return getattr(importlib.import_module(f"distill_lab.{_ELSEWHERE[name]}"), name)
    raise AttributeError(f"module 'distill_lab.losses' has no attribute {name!r}")
