"""Distillation losses: attention maps (MSE, KL, cosine) and outputs (soft-target KD).

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
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# log of the smallest positive float32: where the student gives zero probability to a key that the teacher
# does not, KL is infinite; clamping the student's log-probability here keeps it finite (and large).
_LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _validity(
    shape: tuple[int, ...],
    device: torch.device,
    attention_mask: Tensor | None,
    query_start: int | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Key validity ``(B, 1, 1, Lk)``, row validity ``(B, 1, Lq)`` and valid keys per row ``(B, 1, Lq)`` for maps
    of ``shape`` (B, H, Lq, Lk).

    With ``Lq < Lk`` (a decoder with cached keys) the queries are the last ``Lq`` positions of the mask.
    """
    if attention_mask is None:
        return None, None, None
    batch, _, q_len, k_len = shape
    if attention_mask.dim() != 2 or attention_mask.shape != (batch, k_len):
        raise ValueError(
            f"attention_mask must have shape (batch, key_length) = ({batch}, {k_len}) to match attention maps "
            f"of shape {tuple(shape)}; got {tuple(attention_mask.shape)}."
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
    log_p = torch.where(positive, torch.log(torch.where(positive, p, torch.ones_like(p))), -math.inf)
    empty = ~positive.any(-1, keepdim=True)
    log_p = log_p.masked_fill(empty, 0.0)  # keeps log_softmax finite; the caller handles empty rows
    return torch.log_softmax(log_p / temperature, dim=-1), empty.squeeze(-1)


def _log_softmax_scores(
    scores: Tensor, key_valid: Tensor | None, temperature: float
) -> tuple[Tensor, Tensor]:
    """``log softmax(scores / T)`` over the valid keys, and which rows have no valid key: the exact
    log-probabilities, where those taken from probabilities stop at the smallest positive float32 (a score
    about 87 below the row's largest)."""
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid, -math.inf)
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    scores = scores.masked_fill(empty, 0.0)  # keeps log_softmax finite; the caller handles empty rows
    return torch.log_softmax(scores / temperature, dim=-1), empty.squeeze(-1)


def _row_terms(
    kind: str,
    student: Tensor,
    teacher: Tensor,
    attention_mask: Tensor | None,
    temperature: float = 1.0,
    query_start: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-row loss sums ``(B, H, Lq)`` and the number of elements each row stands for ``(B, H, Lq)``.

    The loss is ``values.sum() / weights.sum()``: for MSE a row's value is its sum of squared differences
    over the valid keys and its weight the number of valid keys; for KL and cosine a row's value is the row
    loss and its weight 1. Invalid rows have value and weight 0. ``kl_scores`` is KL from masked scores
    (``-inf`` where masked) instead of probabilities.
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
            sq = sq.masked_fill(~key_valid, 0.0)
        values = sq.sum(-1)
        weights = (n_keys.to(dtype) if n_keys is not None else ones * s.shape[-1]).expand_as(values)
    elif kind in ("kl", "kl_scores"):
        log_softmax = _log_probs if kind == "kl" else _log_softmax_scores
        log_t, t_empty = log_softmax(t, key_valid, temperature)
        log_s, s_empty = log_softmax(s, key_valid, temperature)
        # a student row with no mass on the valid keys has zero mass wherever the teacher has some; where the
        # student's probability is zero (or, from probabilities, below float32's range) its log is floored
        log_s = log_s.masked_fill(s_empty.unsqueeze(-1), _LOG_TINY)
        log_s = (
            log_s.clamp_min(_LOG_TINY)
            if kind == "kl"
            else log_s.masked_fill(torch.isneginf(log_s), _LOG_TINY)
        )
        p_t = log_t.exp()
        log_t = torch.where(p_t > 0, log_t, torch.zeros_like(log_t))  # 0 * (-inf) would be NaN
        values = (p_t * (log_t - log_s)).sum(-1) * temperature**2
        weights = (~t_empty).to(dtype)  # a row where the teacher has no mass on valid keys has no target
    elif kind == "cosine":
        if key_valid is not None:
            s, t = s.masked_fill(~key_valid, 0.0), t.masked_fill(~key_valid, 0.0)
        dot = (s * t).sum(-1)
        norms = (s.square().sum(-1) * t.square().sum(-1)).clamp_min(1e-16).sqrt()
        values = 1.0 - dot / norms
        weights = ones.expand_as(values)
    else:  # pragma: no cover - guarded by get_attention_loss
        raise ValueError(f"unknown attention loss kind {kind!r}")

    if row_valid is not None:
        weights = weights * row_valid.to(dtype)
        values = torch.where(weights > 0, values, torch.zeros_like(values))
    return values, weights


def averaged_elements(shape: tuple[int, ...], attention_mask: Tensor | None, per_key: bool) -> int | Tensor:
    """How many elements one head's loss over maps of ``shape`` (B, H, Lq, Lk) averages over: the valid query
    rows (KL, cosine), or with ``per_key`` their valid keys (MSE: ``(b, valid q, valid k)``). The weight of a
    batch's attention loss in a mean over batches that equals the loss over their union (but for rows where the
    teacher has no mass, which KL leaves out: none with ordinary masks)."""
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
    return _reduce(*_row_terms("mse", student, teacher, attention_mask), per_head)


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
    return _reduce(*_row_terms("kl", student, teacher, attention_mask, temperature), per_head)


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
    return _reduce(*_row_terms("cosine", student, teacher, attention_mask), per_head)


# a score at or below this is a masked position (transformers adds the dtype's minimum, or -inf)
_MASKED_SCORE = -1e30


def _zero_masked(scores: Tensor) -> Tensor:
    return torch.where(scores > _MASKED_SCORE, scores, torch.zeros_like(scores))


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
    return _reduce(*_row_terms("mse", _zero_masked(student), _zero_masked(teacher), attention_mask), per_head)


def key_padding(mask: Tensor, k_len: int, causal: bool = False) -> Tensor | None:
    """The keys a key-padding mask lets through, or None when ``mask`` is more than key padding (and, with
    ``causal``, the causal structure).

    Such a mask is the same for every head and, but for the causal structure (query i of the last Lq sees keys
    up to ``i + Lk - Lq``), for every query row; it holds nothing but "attend" (True, or 0 when additive) and
    "masked" (False, or a score at or below -1e30): no sliding window, no bias. Deciding this reads the whole
    mask and waits for it on the host once.

    Shape:
        mask: (B, 1 or H, Lq or 1, >= Lk), boolean (True: attend) or additive float, as the model built it.
        Returns: (B, Lk) boolean, True for the keys that are not padding.
    """
    mask = mask[..., :k_len]
    allowed = mask if mask.dtype == torch.bool else mask > _MASKED_SCORE
    keys = allowed.any(dim=2).any(dim=1)  # (B, Lk)
    expected = keys[:, None, None, :]
    if causal and allowed.shape[2] > 1:
        q_len = allowed.shape[2]
        expected = expected & torch.ones(q_len, k_len, dtype=torch.bool, device=mask.device).tril(
            k_len - q_len
        )
    padding_only = (allowed == expected).all()
    if mask.dtype != torch.bool:
        padding_only = padding_only & (mask.masked_fill(~allowed, 0.0) == 0).all()
    return keys if bool(padding_only) else None


def _mix_heads(
    query: Tensor,
    key: Tensor,
    weights: Tensor,
    scaling: float,
    rows: Tensor | None,
    keys: Tensor | None,
    dtype,
) -> tuple[Tensor, Tensor]:
    """``X`` (B, P, Lq, m*D), ``Y`` (B, P, Lk, m*D) in ``dtype``: ``X_p Y_p^T = scaling * sum_h weights[p, h] q_h k_h^T``.

    Each entry takes its m (the most any entry mixes) largest-weight heads side by side along D, padded with
    zero-weight heads; invalid query rows of ``X`` and keys of ``Y`` are zeroed.
    """
    count = int((weights != 0).sum(-1).max())
    index = weights.abs().topk(count, dim=-1).indices  # (P, m)
    w = weights.gather(-1, index).to(device=query.device, dtype=dtype) * scaling
    index = index.to(query.device)
    groups = (
        query.shape[1] // key.shape[1]
    )  # grouped-query attention: query head h reads key head h // groups
    x = query[:, index].to(dtype) * w[:, :, None, None]  # (B, P, m, Lq, D)
    y = key[:, torch.div(index, groups, rounding_mode="floor")].to(dtype)  # (B, P, m, Lk, D)
    x, y = x.transpose(2, 3).flatten(-2), y.transpose(2, 3).flatten(-2)
    if rows is not None:
        x, y = x * rows[:, None, :, None].to(dtype), y * keys[:, None, :, None].to(dtype)
    return x, y


def _without_autocast(fn: Callable) -> Callable:
    """``fn`` with autocast off on its first argument's device: under bf16 autocast its products of queries and
    keys would run in bf16, and rounding the inputs of terms that nearly cancel loses the loss entirely."""

    @functools.wraps(fn)
    def wrapper(first: Tensor, *args, **kwargs):
        with torch.autocast(first.device.type, enabled=False):
            return fn(first, *args, **kwargs)

    return wrapper


@_without_autocast
def mse_scores_gram_terms(
    student_query: Tensor,
    student_key: Tensor,
    teacher_query: Tensor,
    teacher_key: Tensor,
    attention_mask: Tensor | None = None,
    *,
    student_scaling: float = 1.0,
    teacher_scaling: float = 1.0,
    heads: Sequence[tuple[int, int]] | tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact ``attention_mse_scores`` sums of a bidirectional layer from queries and keys, O(L D^2): no L x L map.

    With ``X = a Q`` (``a`` the scaling, padding query rows zeroed) and ``Y = K`` (padding keys zeroed), a head's
    masked score map is ``X Y^T``, and with ``<A, B> = sum(A * B)``

        ``||X_t Y_t^T - X_s Y_s^T||_F^2 = <X_t^T X_t, Y_t^T Y_t> - 2 <X_t^T X_s, Y_t^T Y_s> + <X_s^T X_s, Y_s^T Y_s>``,

    Gram matrices over positions (D_t x D_s for a head pair), so teacher and student may differ in head size.
    An entry that averages heads is ``sum_h w_h X_h Y_h^T``: the heads' ``w_h X_h`` and ``Y_h`` side by side
    along D, which makes the cost O(L (H D)^2) for ``matching=global``.
    Keys that the model masks beyond ``attention_mask`` must be zeroed in ``*_key`` by the caller: a zero key
    scores 0, which is how a masked entry counts.

    Computed in float32 (float64 for float64 inputs). The three terms nearly cancel when the student matches
    the teacher: the error is a few 1e-7 of ``||X_t Y_t^T||_F^2`` (not of the loss), so a loss of 1e-5 of the
    mean squared score is good to a few percent (the block-wise path: to float32 rounding). The gradients do
    not suffer this: their error scales with the score difference, within a small factor of the block-wise
    path's. A (b, entry) sum that rounds below 0 is clamped to 0, its gradient kept.

    Args:
        heads: the P entries compared: None averages all heads on both sides (``matching=global``); a list of
            ``(teacher_head, student_head)`` pairs (``Matching.head_pairs``); or weight matrices
            ``(teacher (P, H_t), student (P, H_s))``, entry p comparing ``sum_h w[p, h] * scores_h`` of each side.

    Shape:
        student_query, teacher_query: (B, H, Lq, D_s or D_t); student_key, teacher_key: (B, H_kv, Lk, D_s or
            D_t), H a multiple of H_kv.
        attention_mask: (B, Lk), 1 for real tokens; queries are its last Lq positions.
        Returns: ``(values, weights)``, (P,) each: the sum of squared score differences over (b, valid q,
        valid k) and the number of those elements, as ``AttentionLoss.row_terms`` summed over b and q gives.
    """
    batch, _, q_len, _ = student_query.shape
    k_len = student_key.shape[2]
    for name, x, y in (("student", student_query, student_key), ("teacher", teacher_query, teacher_key)):
        if x.shape[0] != batch or x.shape[2] != q_len or y.shape[2] != k_len or x.shape[1] % y.shape[1]:
            raise ValueError(
                f"{name} queries {tuple(x.shape)} and keys {tuple(y.shape)} do not fit (B, H, {q_len}, D) and "
                f"(B, H_kv, {k_len}, D) with B = {batch} and H a multiple of H_kv."
            )
    num_teacher, num_student = teacher_query.shape[1], student_query.shape[1]
    if heads is None:
        t_w, s_w = (torch.full((1, h), 1.0 / h, dtype=torch.float64) for h in (num_teacher, num_student))
    elif isinstance(heads, tuple) and isinstance(heads[0], Tensor):
        t_w, s_w = heads
    else:
        t_w = torch.eye(num_teacher, dtype=torch.float64)[[t for t, _ in heads]]
        s_w = torch.eye(num_student, dtype=torch.float64)[[s for _, s in heads]]
    if t_w.shape != (len(s_w), num_teacher) or s_w.shape != (len(t_w), num_student):
        raise ValueError(
            f"head weights {tuple(t_w.shape)}, {tuple(s_w.shape)} must be (P, {num_teacher}), (P, {num_student})"
        )
    dtype, device = (
        torch.promote_types(_compute_dtype(student_query), teacher_query.dtype),
        student_query.device,
    )
    keys, rows, n_keys = _validity((batch, 1, q_len, k_len), device, attention_mask)
    if attention_mask is not None:
        count = (rows * n_keys).sum().to(dtype)
        keys, rows = keys[:, 0, 0], rows[:, 0]
    else:
        count = torch.tensor(float(batch * q_len * k_len), dtype=dtype, device=device)
    x_t, y_t = _mix_heads(
        teacher_query.detach(), teacher_key.detach(), t_w.cpu(), teacher_scaling, rows, keys, dtype
    )
    x_s, y_s = _mix_heads(student_query, student_key, s_w.cpu(), student_scaling, rows, keys, dtype)

    def inner(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:  # <A^T B, C^T D> per (b, p)
        return (a.transpose(-1, -2) @ b * (c.transpose(-1, -2) @ d)).sum(dim=(-1, -2))

    values = inner(x_t, x_t, y_t, y_t) - 2 * inner(x_t, x_s, y_t, y_s) + inner(x_s, x_s, y_s, y_s)
    # rounding can leave a tiny negative sum; clamp the value only, as the gradient is accurate there
    values = values + (values.clamp_min(0.0) - values).detach()
    return values.sum(0), count.expand(values.shape[1])


ATTENTION_LOSSES: dict[str, Callable[..., Tensor]] = {
    "mse": attention_mse,
    "kl": attention_kl,
    "cosine": attention_cosine,
    "mse_scores": attention_mse_scores,
}


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
        return _row_terms(kind, student, teacher, attention_mask, query_start=query_start, **self.options)

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


def _soft_kl(s: Tensor, t: Tensor, temperature: float) -> Tensor:
    """KL(softmax(t / T) || softmax(s / T)) per row, (N, C) -> (N,)."""
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    p_t = log_pt.exp()
    # 0 * log 0 = 0 where the teacher gives a class no mass; a NaN teacher stays NaN (and is caught as non-finite)
    return torch.where(p_t == 0, torch.zeros_like(p_t), p_t * (log_pt - log_ps)).sum(-1)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None = None,
    temperature: float = 3.0,
    alpha: float = 0.3,
) -> Tensor:
    """Output distillation: hard-label cross-entropy plus soft-target KL (Hinton et al., 2015).

    ``alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))``,
    each averaged over the positions whose label is not -100. With ``labels=None`` it is the
    ``T^2 * KL`` term alone, averaged over all positions. A batch with no labelled position gives 0.

    Shape:
        student_logits, teacher_logits: (..., C).
        labels: (...), class indices, -100 for positions to ignore.
        Returns: a scalar.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}; both models need the same label set or vocabulary."
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    dtype = _compute_dtype(student_logits)
    num_classes = student_logits.shape[-1]
    s = student_logits.to(dtype).reshape(-1, num_classes)
    t = teacher_logits.to(dtype).reshape(-1, num_classes)
    soft = temperature**2
    if labels is None:
        return soft * _soft_kl(s, t, temperature).mean()
    labels = labels.reshape(-1).to(s.device)
    if labels.shape[0] != s.shape[0]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(student_logits.shape)}"
        )
    valid = labels != -100
    count = valid.sum().clamp_min(1).to(dtype)
    ce = F.cross_entropy(s, labels, ignore_index=-100, reduction="sum") / count
    # ignored positions take no part: their teacher logits are replaced before the softmax (a NaN there must not
    # reach the gradients) and their KL is dropped; masks rather than boolean indexing, which would make the
    # host wait for the device at every step
    t = torch.where(valid[:, None], t, torch.zeros_like(t))
    kl = _soft_kl(s, t, temperature)
    kl_term = torch.where(valid, kl, torch.zeros_like(kl)).sum() / count
    return alpha * ce + (1.0 - alpha) * soft * kl_term


def distillation_objective(
    output_loss: Tensor, attention_loss: Tensor, attention_weight: float = 0.3
) -> Tensor:
    """``L = (1 - w) * L_output + w * L_attention`` with ``w = attention_weight`` in [0, 1]."""
    if not 0.0 <= attention_weight <= 1.0:
        raise ValueError(f"attention_weight must be in [0, 1], got {attention_weight}")
    return (1.0 - attention_weight) * output_loss + attention_weight * attention_loss
