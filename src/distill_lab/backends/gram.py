"""The Gram backend: ``loss=mse_scores`` of a bidirectional layer from Gram matrices, O(L D^2) per entry.

TinyBERT's loss, the mean squared difference of pre-softmax scores, is a Frobenius norm of
``X_t Y_t^T - X_s Y_s^T``, which Gram matrices over positions give without an ``L x L`` map
(``mse_scores_gram_terms``). It applies to ``QueryKey`` records of layers whose scores are a plain product of
queries and keys (no causal mask, sliding window, soft cap or bias) under a key-padding mask at most; an
automatic choice takes it where the sequence outgrows the compared width, below which the block-wise path
costs less.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from distill_lab.backends import PairContext, Terms, padding_keys, windowed
from distill_lab.losses import AttentionLoss, _compute_dtype, _validity


def _mix_heads(
    query: Tensor,
    key: Tensor,
    weights: Tensor,
    scaling: float,
    rows: Tensor | None,
    keys: Tensor | None,
    dtype,
) -> tuple[Tensor, Tensor]:
    """``X`` (B, P, Lq, m*D), ``Y`` (B, P, Lk, m*D) in ``dtype``, with
    ``X_p Y_p^T = scaling * sum_h weights[p, h] q_h k_h^T``.

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
    """``fn`` with autocast off on its first argument's device: under bf16 autocast its products of queries
    and keys would run in bf16, and rounding the inputs of terms that nearly cancel loses the loss."""

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
    """Exact ``attention_mse_scores`` sums of a bidirectional layer from queries and keys, O(L D^2): no L x L
    map.

    With ``X = a Q`` (``a`` the scaling, padding query rows zeroed) and ``Y = K`` (padding keys zeroed), a
    head's masked score map is ``X Y^T``, and with ``<A, B> = sum(A * B)``

        ``||X_t Y_t^T - X_s Y_s^T||_F^2
            = <X_t^T X_t, Y_t^T Y_t> - 2 <X_t^T X_s, Y_t^T Y_s> + <X_s^T X_s, Y_s^T Y_s>``,

    Gram matrices over positions (D_t x D_s for a head pair), so teacher and student may differ in head size.
    An entry that averages heads is ``sum_h w_h X_h Y_h^T``: the heads' ``w_h X_h`` and ``Y_h`` side by side
    along D, which makes the cost O(L (H D)^2) for ``matching=global``. Keys that the model masks beyond
    ``attention_mask`` must be zeroed in ``*_key`` by the caller: a zero key scores 0, which is how a masked
    entry counts.

    The three terms nearly cancel when the student matches its teacher (a loss of 1e-8 of the squared scores
    at a 1e-4 difference): in float32 what they fail to cancel, a few 1e-7 of the squared scores, would be
    most of the loss. So ``X`` and ``Y`` are taken to float64 (exactly: float32 and bf16 values fit) and the
    Gram matrices, their inner products and the gradients are computed there; the value and the gradients
    are then good to float32 rounding however close the student is. The cost: 2.5-3.5 times the float32
    time of this path on a 2-core AVX2 CPU (one thread, L 512-2048, head size 64-128); on data-center GPUs
    (A100, H100) float64 runs at half the float32 rate, on consumer GPUs at 1/30-1/60 (not measured);
    memory stays O(L D), for the float64 copies of ``X`` and ``Y``. A (b, entry) sum that rounds below 0
    is clamped to 0, its gradient kept.

    Args:
        heads: the P entries compared: None averages all heads on both sides (``matching=global``); a list
            of ``(teacher_head, student_head)`` pairs (``Matching.head_pairs``); or weight matrices
            ``(teacher (P, H_t), student (P, H_s))``, entry p comparing ``sum_h w[p, h] * scores_h`` of each
            side.

    Shape:
        student_query, teacher_query: (B, H, Lq, D_s or D_t); student_key, teacher_key: (B, H_kv, Lk, D_s
            or D_t), H a multiple of H_kv.
        attention_mask: (B, Lk), 1 for real tokens; queries are its last Lq positions.
        Returns: ``(values, weights)``, (P,) each, in float32 (float64 for float64 inputs): the sum of
        squared score differences over (b, valid q, valid k) and the number of those elements, as
        ``AttentionLoss.row_terms`` summed over b and q gives.
    """
    batch, _, q_len, _ = student_query.shape
    k_len = student_key.shape[2]
    for name, x, y in (("student", student_query, student_key), ("teacher", teacher_query, teacher_key)):
        if x.shape[0] != batch or x.shape[2] != q_len or y.shape[2] != k_len or x.shape[1] % y.shape[1]:
            raise ValueError(
                f"{name} queries {tuple(x.shape)} and keys {tuple(y.shape)} do not fit (B, H, {q_len}, D) "
                f"and (B, H_kv, {k_len}, D) with B = {batch} and H a multiple of H_kv."
            )
    t_w, s_w = _entry_weights(heads, teacher_query.shape[1], student_query.shape[1])
    dtype = torch.promote_types(_compute_dtype(student_query), teacher_query.dtype)
    device = student_query.device
    keys, rows, n_keys = _validity((batch, 1, q_len, k_len), device, attention_mask)
    if attention_mask is not None:
        count = (rows * n_keys).sum().to(dtype)
        keys, rows = keys[:, 0, 0], rows[:, 0]
    else:
        count = torch.tensor(float(batch * q_len * k_len), dtype=dtype, device=device)
    exact = torch.float64  # the Gram products, in which the terms cancel (see above)
    x_t, y_t = _mix_heads(
        teacher_query.detach(), teacher_key.detach(), t_w.cpu(), teacher_scaling, rows, keys, exact
    )
    x_s, y_s = _mix_heads(student_query, student_key, s_w.cpu(), student_scaling, rows, keys, exact)
    values = _GramDistance.apply(x_t, y_t, x_s, y_s)  # (B, P)
    return values.sum(0).to(dtype), count.expand(values.shape[1])


def _entry_weights(heads, num_teacher: int, num_student: int) -> tuple[Tensor, Tensor]:
    """The compared entries' head weights, ``(teacher (P, H_t), student (P, H_s))``, from ``heads`` as
    ``mse_scores_gram_terms`` takes it."""
    if heads is None:
        t_w, s_w = (torch.full((1, h), 1.0 / h, dtype=torch.float64) for h in (num_teacher, num_student))
    elif isinstance(heads, tuple) and isinstance(heads[0], Tensor):
        t_w, s_w = heads
    else:
        t_w = torch.eye(num_teacher, dtype=torch.float64)[[t for t, _ in heads]]
        s_w = torch.eye(num_student, dtype=torch.float64)[[s for _, s in heads]]
    if t_w.shape != (len(s_w), num_teacher) or s_w.shape != (len(t_w), num_student):
        raise ValueError(
            f"head weights {tuple(t_w.shape)}, {tuple(s_w.shape)} must be (P, {num_teacher}), "
            f"(P, {num_student})"
        )
    return t_w, s_w


def _gram(a: Tensor, b: Tensor) -> Tensor:
    return a.transpose(-1, -2) @ b


class _GramDistance(torch.autograd.Function):
    """``||X_t Y_t^T - X_s Y_s^T||_F^2`` per leading index from Gram matrices, differentiable in the student's
    ``X_s`` and ``Y_s``, with the gradients written out,

        ``d/dX_s = 2 (X_s (Y_s^T Y_s) - X_t (Y_t^T Y_s))``,
        ``d/dY_s = 2 (Y_s (X_s^T X_s) - Y_t (X_t^T X_s))``,

    so that, like the value, they are exactly 0 for a student whose inputs equal the teacher's (the same
    products of the same numbers), not a rounding residue. A value that rounds below 0 is clamped to 0, its
    gradient kept."""

    @staticmethod
    def forward(ctx, x_t: Tensor, y_t: Tensor, x_s: Tensor, y_s: Tensor) -> Tensor:
        xts, xss, yts, yss = _gram(x_t, x_s), _gram(x_s, x_s), _gram(y_t, y_s), _gram(y_s, y_s)
        values = (_gram(x_t, x_t) * _gram(y_t, y_t)).sum(dim=(-1, -2))
        values = values - 2 * (xts * yts).sum(dim=(-1, -2)) + (xss * yss).sum(dim=(-1, -2))
        ctx.save_for_backward(x_t, y_t, x_s, y_s, xts, xss, yts, yss)
        return values.clamp_min(0.0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x_t, y_t, x_s, y_s, xts, xss, yts, yss = ctx.saved_tensors
        scale = 2 * grad[..., None, None]
        grad_x = scale * (x_s @ yss - x_t @ yts) if ctx.needs_input_grad[2] else None
        grad_y = scale * (y_s @ xss - y_t @ xts) if ctx.needs_input_grad[3] else None
        return None, None, grad_x, grad_y


def _head_weights(context: PairContext) -> tuple[Tensor, Tensor, list[int] | None]:
    """The mode's head weights ``(student (P, H_s), teacher (P, H_t))`` and reported heads: every mode selects
    or averages heads, a linear map, so aligning one-hot "maps" gives them."""
    eyes = [torch.eye(r.shape[1], dtype=torch.float64)[None, :, None] for r in context.sides]
    s_w, t_w, heads = context.matching.align(*eyes, context.pair)  # (1, P, 1, H) each
    return s_w[0, :, 0], t_w[0, :, 0], heads


class GramBackend:
    """``mse_scores`` from Gram matrices of queries and keys, in float64."""

    setting = "gram"
    title = "the Gram-matrix path of mse_scores"

    def problem(self, context: PairContext, insisted: bool) -> str | None:
        if not (isinstance(context.loss, AttentionLoss) and context.loss.on_scores):
            return "only loss=mse_scores has a Gram-matrix form"
        if not context.qk:
            return "both sides must be QueryKey records (capture=qk)"
        if context.device_type == "mps":
            return "the device has no float64, in which the Gram path sums its terms"
        if not context.recorded:
            return None
        student, teacher = context.sides
        if any(r.causal or windowed(r) or r.softcap or r.bias is not None for r in (student, teacher)):
            return (
                "causal, sliding-window, soft-capped or position-biased scores are not a plain product of "
                "queries and keys"
            )
        if not insisted:
            # O(L W^2) per entry against the block-wise O(L^2 W), W the compared width (head size, times the
            # heads an entry averages): below L ~ W/2 it does not pay
            s_w, t_w, _ = _head_weights(context)
            width = sum(
                int((w != 0).sum(-1).max()) * r.query.shape[-1] for w, r in ((s_w, student), (t_w, teacher))
            )
            if student.shape[3] < width / 2:
                return f"at L = {student.shape[3]}, under half the compared width {width}, it costs more"
        if not all(padding_keys(r, context.masks)[0] for r in (student, teacher)):
            return "the mask is more than key padding (it varies over queries or heads, or adds a bias)"
        return None

    def terms(self, context: PairContext) -> Terms:
        student, teacher = context.sides
        s_w, t_w, heads = _head_weights(context)
        # keys zeroed where the records' masks hide them: a zero key scores 0, as mse_scores counts masked
        # entries
        keys = []
        for record in (student, teacher):
            hidden = padding_keys(record, context.masks)[1]
            keys.append(record.key if hidden is None else record.key * hidden[:, None, :, None])
        values, weights = mse_scores_gram_terms(
            student.query, keys[0], teacher.query, keys[1], context.attention_mask,
            student_scaling=student.scaling, teacher_scaling=teacher.scaling, heads=(t_w, s_w),
        )  # fmt: skip
        return Terms(values, weights, heads)
