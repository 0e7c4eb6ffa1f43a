"""Fused attention-MSE and attention-cosine from queries and keys: Triton kernels and their autograd wrapper.

For one aligned head pair and one query row i, with probabilities ``p_s = softmax(a_s q_s K_s^T)`` (student)
and ``p_t = softmax(a_t q_t K_t^T)`` (teacher) over the row's allowed keys (key padding, causal structure):

    mse:     sum_k (p_s,k - p_t,k)^2
    cosine:  1 - <p_s, p_t> / (|p_s| |p_t|)

These are the per-row values of ``distill_lab.losses._row_terms`` for "mse" and "cosine". A row's
probabilities need both log-sum-exps first, so the forward makes two passes over key blocks: an online
log-sum-exp per side, then three row statistics (mse: ``sum (p_s - p_t)^2``, ``sum p_s (p_s - p_t)``;
cosine: ``sum p_s^2``, ``sum p_s p_t``, ``sum p_t^2``), accumulated directly so that a student close to its
teacher loses nothing to cancellation. Both are saved with the log-sum-exps for the backward.

Backward: with ``g_k = dL/dp_s,k`` the softmax gives ``dL/ds_k = p_s,k (g_k - D)``, ``D = sum_k p_s,k g_k``:

    mse:     g = 2 (p_s - p_t),   D = 2 sum p_s (p_s - p_t)
    cosine:  g = (<p_s, p_t> p_s / |p_s|^2 - p_t) / (|p_s| |p_t|),   D = 0 (the cosine is scale invariant)

so ``dL/ds = p_s (c_s p_s + c_t p_t + c_0)`` with three coefficients per row, known from the saved
statistics. The tiles are recomputed as in ``attention_kl``: one kernel accumulates dQ over key blocks,
another dK over query blocks, with no float atomics, so the result is deterministic. Gradients flow to the
student's queries and keys only; inputs may be bf16, every accumulation is float32 (a float32 side's dot
products in float32, not TF32). A row with no allowed key gives 0 and no gradient. Offsets that can reach a
tensor's full size are 64-bit, those within one head's (L, d) matrix 32-bit, as in ``attention_kl`` (whose
docstring says why).

The kernels need Triton and a CUDA device, or ``TRITON_INTERPRET=1`` (how the CPU tests run them). The
plain PyTorch path (``distill_lab.attention.AttentionDistillationLoss`` on ``QueryKey`` records) is
the reference and the fallback everywhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill_lab.kernels._triton import _interpreted, _kernel_layout, _meta, _to_heads, triton

LOSSES = ("mse", "cosine")

if triton is not None:
    import triton.language as tl

    from distill_lab.kernels._triton import (
        _NEG,
        _allowed,
        _key_block,
        _keys_end,
        _mm,
        _pair_heads,
        _queries_start,
        _query_tiles,
        _scores,
    )

    @triton.jit
    def _key_tiles(
        qs, qt, ks_base, kt_base, valid_ptr, offs_m, offs_n, offs_ds, offs_dt, sks_l, skt_l,
        LQ, LK, DS, DT, scale_s, scale_t, CAUSAL: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
    ):  # fmt: skip
        """Both sides' scores of a (query block, key block) tile, the allowed keys, and the student's keys."""
        key = offs_n[:, None] < LK
        ks_ptrs = ks_base + offs_n[:, None] * sks_l + offs_ds[None, :]
        kt_ptrs = kt_base + offs_n[:, None] * skt_l + offs_dt[None, :]
        s, ks = _scores(qs, ks_ptrs, key & (offs_ds[None, :] < DS), scale_s, IEEE_S)
        t, _ = _scores(qt, kt_ptrs, key & (offs_dt[None, :] < DT), scale_t, IEEE_T)
        return s, t, _allowed(offs_m, offs_n, valid_ptr, LQ, LK, CAUSAL), ks

    @triton.jit
    def _probabilities(s, t, ok, lse_s, lse_t):
        p_s = tl.where(ok, tl.exp(s - lse_s[:, None]), 0.0)
        p_t = tl.where(ok, tl.exp(t - lse_t[:, None]), 0.0)
        return p_s, p_t

    @triton.jit
    def _lse_step(m, total, x):
        """One key block of an online log-sum-exp (running max and sum); masked scores are -inf."""
        m_new = tl.maximum(m, tl.max(x, 1))
        return m_new, total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new[:, None]), 1)

    @triton.jit
    def _row_value(x, y, z, LOSS: tl.constexpr):
        """The row loss from its statistics (see ``_probs_fwd``); 0 for a row with no allowed key."""
        if LOSS == "mse":
            return x
        has_keys = x > 0  # sum p_s^2 >= 1 / (allowed keys) on a row with any
        norm = tl.sqrt(tl.where(has_keys, x * z, 1.0))
        return tl.where(has_keys, 1.0 - y / norm, 0.0)

    @triton.jit
    def _row_coefficients(STATS, G, rows, row, LOSS: tl.constexpr):
        """Per row: ``c_s, c_t, c_0`` of ``dL/ds = p_s (c_s p_s + c_t p_t + c_0)``, times its gradient
        (``STATS`` and ``G`` point at this pair's first row, ``rows`` count from there)."""
        g = tl.load(G + rows, mask=row, other=0.0)
        x = tl.load(STATS + 3 * rows, mask=row, other=0.0)
        y = tl.load(STATS + 3 * rows + 1, mask=row, other=0.0)
        if LOSS == "mse":  # g_k - D = 2 (p_s,k - p_t,k) - 2 sum p_s (p_s - p_t)
            return 2.0 * g, -2.0 * g, -2.0 * g * y
        z = tl.load(STATS + 3 * rows + 2, mask=row, other=0.0)
        has_keys = x > 0
        norm = tl.sqrt(tl.where(has_keys, x * z, 1.0))
        c_s = tl.where(has_keys, g * y / (norm * tl.where(has_keys, x, 1.0)), 0.0)
        c_t = tl.where(has_keys, -g / norm, 0.0)
        return c_s, c_t, 0.0 * g

    @triton.jit
    def _probs_fwd(
        QS, KS, QT, KT, SH, TH, VALID, OUT, LSE_S, LSE_T, STATS,
        sqs_b, sqs_h, sqs_l, sks_b, sks_h, sks_l, sqt_b, sqt_h, sqt_l, skt_b, skt_h, skt_l, sv_b,
        P, LQ, LK, DS, DT, GS, GT, scale_s, scale_t,
        LOSS: tl.constexpr, CAUSAL: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bp = tl.program_id(1)
        b, hs, ht = _pair_heads(SH, TH, pid_bp, P)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_ds = tl.arange(0, BLOCK_DS)
        offs_dt = tl.arange(0, BLOCK_DT)
        row = offs_m < LQ
        qs, qt = _query_tiles(
            QS, QT, b, hs, ht, offs_m, offs_ds, offs_dt, row, sqs_b, sqs_h, sqs_l, sqt_b, sqt_h, sqt_l, DS, DT
        )
        ks_base = KS + b * sks_b + (hs // GS) * sks_h
        kt_base = KT + b * skt_b + (ht // GT) * skt_h
        valid_ptr = VALID + b * sv_b
        # pass 1: each side's log-sum-exp over the allowed keys
        m_s = tl.full([BLOCK_M], _NEG, tl.float32)
        l_s = tl.zeros([BLOCK_M], tl.float32)
        m_t = tl.full([BLOCK_M], _NEG, tl.float32)
        l_t = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, _keys_end(pid_m, LQ, LK, CAUSAL, BLOCK_M), BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s, t, ok, _ = _key_tiles(
                qs, qt, ks_base, kt_base, valid_ptr, offs_m, offs_n, offs_ds, offs_dt, sks_l, skt_l,
                LQ, LK, DS, DT, scale_s, scale_t, CAUSAL, IEEE_S, IEEE_T,
            )  # fmt: skip
            m_s, l_s = _lse_step(m_s, l_s, tl.where(ok, s, float("-inf")))
            m_t, l_t = _lse_step(m_t, l_t, tl.where(ok, t, float("-inf")))
        has_keys = l_t > 0
        lse_s = tl.where(has_keys, m_s + tl.log(tl.where(has_keys, l_s, 1.0)), 0.0)
        lse_t = tl.where(has_keys, m_t + tl.log(tl.where(has_keys, l_t, 1.0)), 0.0)
        # pass 2: the row statistics (a row without keys has p = 0 everywhere, so all three stay 0)
        x = tl.zeros([BLOCK_M], tl.float32)
        y = tl.zeros([BLOCK_M], tl.float32)
        z = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, _keys_end(pid_m, LQ, LK, CAUSAL, BLOCK_M), BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s, t, ok, _ = _key_tiles(
                qs, qt, ks_base, kt_base, valid_ptr, offs_m, offs_n, offs_ds, offs_dt, sks_l, skt_l,
                LQ, LK, DS, DT, scale_s, scale_t, CAUSAL, IEEE_S, IEEE_T,
            )  # fmt: skip
            p_s, p_t = _probabilities(s, t, ok, lse_s, lse_t)
            if LOSS == "mse":
                diff = p_s - p_t
                x += tl.sum(diff * diff, 1)
                y += tl.sum(p_s * diff, 1)
            else:
                x += tl.sum(p_s * p_s, 1)
                y += tl.sum(p_s * p_t, 1)
                z += tl.sum(p_t * p_t, 1)
        rows0 = pid_bp.to(tl.int64) * LQ  # this pair's first row in the (B, P, Lq) outputs
        tl.store(OUT + rows0 + offs_m, _row_value(x, y, z, LOSS), mask=row)
        tl.store(LSE_S + rows0 + offs_m, lse_s, mask=row)
        tl.store(LSE_T + rows0 + offs_m, lse_t, mask=row)
        stats = STATS + 3 * rows0
        tl.store(stats + 3 * offs_m, x, mask=row)
        tl.store(stats + 3 * offs_m + 1, y, mask=row)
        tl.store(stats + 3 * offs_m + 2, z, mask=row)

    @triton.jit
    def _probs_bwd_dq(
        QS, KS, QT, KT, SH, TH, VALID, LSE_S, LSE_T, STATS, G, DQ,
        sqs_b, sqs_h, sqs_l, sks_b, sks_h, sks_l, sqt_b, sqt_h, sqt_l, skt_b, skt_h, skt_l, sv_b,
        P, LQ, LK, DS, DT, GS, GT, scale_s, scale_t,
        LOSS: tl.constexpr, CAUSAL: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    ):  # fmt: skip
        pid_m = tl.program_id(0)
        pid_bp = tl.program_id(1)
        b, hs, ht = _pair_heads(SH, TH, pid_bp, P)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_ds = tl.arange(0, BLOCK_DS)
        offs_dt = tl.arange(0, BLOCK_DT)
        row = offs_m < LQ
        qs, qt = _query_tiles(
            QS, QT, b, hs, ht, offs_m, offs_ds, offs_dt, row, sqs_b, sqs_h, sqs_l, sqt_b, sqt_h, sqt_l, DS, DT
        )
        rows0 = pid_bp.to(tl.int64) * LQ  # this pair's first row in the (B, P, Lq) row statistics
        lse_s = tl.load(LSE_S + rows0 + offs_m, mask=row, other=0.0)
        lse_t = tl.load(LSE_T + rows0 + offs_m, mask=row, other=0.0)
        c_s, c_t, c_0 = _row_coefficients(STATS + 3 * rows0, G + rows0, offs_m, row, LOSS)
        ks_base = KS + b * sks_b + (hs // GS) * sks_h
        kt_base = KT + b * skt_b + (ht // GT) * skt_h
        dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
        for start_n in range(0, _keys_end(pid_m, LQ, LK, CAUSAL, BLOCK_M), BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            s, t, ok, ks = _key_tiles(
                qs, qt, ks_base, kt_base, VALID + b * sv_b, offs_m, offs_n, offs_ds, offs_dt, sks_l, skt_l,
                LQ, LK, DS, DT, scale_s, scale_t, CAUSAL, IEEE_S, IEEE_T,
            )  # fmt: skip
            p_s, p_t = _probabilities(s, t, ok, lse_s, lse_t)
            ds = p_s * (c_s[:, None] * p_s + c_t[:, None] * p_t + c_0[:, None])
            dq += _mm(ds.to(ks.dtype), ks, IEEE_S)
        out = DQ + rows0 * DS + offs_m[:, None] * DS + offs_ds[None, :]
        tl.store(out, dq * scale_s, mask=row[:, None] & (offs_ds[None, :] < DS))

    @triton.jit
    def _probs_bwd_dk(
        QS, KS, QT, KT, SH, TH, VALID, LSE_S, LSE_T, STATS, G, DK,
        sqs_b, sqs_h, sqs_l, sks_b, sks_h, sks_l, sqt_b, sqt_h, sqt_l, skt_b, skt_h, skt_l, sv_b,
        P, LQ, LK, DS, DT, GS, GT, scale_s, scale_t,
        LOSS: tl.constexpr, CAUSAL: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DS: tl.constexpr, BLOCK_DT: tl.constexpr,
    ):  # fmt: skip
        pid_n = tl.program_id(0)
        pid_bp = tl.program_id(1)
        b, hs, ht = _pair_heads(SH, TH, pid_bp, P)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_ds = tl.arange(0, BLOCK_DS)
        offs_dt = tl.arange(0, BLOCK_DT)
        key = offs_n < LK
        ks, kt = _key_block(
            KS, KT, b, hs, ht, offs_n, offs_ds, offs_dt, key,
            sks_b, sks_h, sks_l, skt_b, skt_h, skt_l, GS, GT, DS, DT,
        )  # fmt: skip
        rows0 = pid_bp.to(tl.int64) * LQ  # this pair's first row in the (B, P, Lq) row statistics
        dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
        for start_m in range(_queries_start(pid_n, LQ, LK, CAUSAL, BLOCK_M, BLOCK_N), LQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row = offs_m < LQ
            qs, qt = _query_tiles(
                QS, QT, b, hs, ht, offs_m, offs_ds, offs_dt, row,
                sqs_b, sqs_h, sqs_l, sqt_b, sqt_h, sqt_l, DS, DT,
            )  # fmt: skip
            lse_s = tl.load(LSE_S + rows0 + offs_m, mask=row, other=0.0)
            lse_t = tl.load(LSE_T + rows0 + offs_m, mask=row, other=0.0)
            c_s, c_t, c_0 = _row_coefficients(STATS + 3 * rows0, G + rows0, offs_m, row, LOSS)
            s = _mm(qs, tl.trans(ks), IEEE_S) * scale_s
            t = _mm(qt, tl.trans(kt), IEEE_T) * scale_t
            ok = _allowed(offs_m, offs_n, VALID + b * sv_b, LQ, LK, CAUSAL)
            p_s, p_t = _probabilities(s, t, ok, lse_s, lse_t)
            ds = p_s * (c_s[:, None] * p_s + c_t[:, None] * p_t + c_0[:, None])
            dk += _mm(tl.trans(ds).to(qs.dtype), qs, IEEE_S)
        out = DK + pid_bp.to(tl.int64) * LK * DS + offs_n[:, None] * DS + offs_ds[None, :]
        tl.store(out, dk * scale_s, mask=key[:, None] & (offs_ds[None, :] < DS))


class _AttentionProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, loss, qs, ks, qt, kt, s_heads, t_heads, key_valid, scale_s, scale_t, causal):
        qs, ks, qt, kt = (_kernel_layout(x) for x in (qs, ks, qt, kt))
        batch, _, q_len, d_s = qs.shape
        k_len, d_t = ks.shape[2], qt.shape[3]
        pairs = s_heads.numel()
        out = torch.empty(batch, pairs, q_len, device=qs.device, dtype=torch.float32)
        lse_s, lse_t = torch.empty_like(out), torch.empty_like(out)
        stats = torch.empty(batch, pairs, q_len, 3, device=qs.device, dtype=torch.float32)
        meta = _meta(qs, ks, qt, kt, key_valid, pairs, q_len, k_len, d_s, d_t, scale_s, scale_t, causal)
        const = {**meta["const"], "LOSS": loss}
        grid = (triton.cdiv(q_len, meta["BLOCK_M"]), batch * pairs)
        _probs_fwd[grid](
            qs, ks, qt, kt, s_heads, t_heads, key_valid, out, lse_s, lse_t, stats, *meta["args"], **const
        )
        ctx.save_for_backward(qs, ks, qt, kt, s_heads, t_heads, key_valid, lse_s, lse_t, stats)
        ctx.meta, ctx.const = meta, const
        return out

    @staticmethod
    def backward(ctx, grad):
        qs, ks, qt, kt, s_heads, t_heads, key_valid, lse_s, lse_t, stats = ctx.saved_tensors
        meta, const = ctx.meta, ctx.const
        batch, _, q_len, d_s = qs.shape
        k_len = ks.shape[2]
        pairs = s_heads.numel()
        grad = grad.float().contiguous()
        dq = torch.empty(batch, pairs, q_len, d_s, device=qs.device, dtype=torch.float32)
        dk = torch.empty(batch, pairs, k_len, d_s, device=qs.device, dtype=torch.float32)
        common = (qs, ks, qt, kt, s_heads, t_heads, key_valid, lse_s, lse_t, stats, grad)
        query_blocks, key_blocks = triton.cdiv(q_len, meta["BLOCK_M"]), triton.cdiv(k_len, meta["BLOCK_N"])
        _probs_bwd_dq[(query_blocks, batch * pairs)](*common, dq, *meta["args"], **const)
        _probs_bwd_dk[(key_blocks, batch * pairs)](*common, dk, *meta["args"], **const)
        dq_heads, dk_heads = _to_heads(dq, dk, qs, ks, s_heads)
        return (None, dq_heads.to(qs.dtype), dk_heads.to(ks.dtype)) + (None,) * 8


def attention_probs_rows(
    loss: str,
    student_query: Tensor,
    student_key: Tensor,
    teacher_query: Tensor,
    teacher_key: Tensor,
    student_heads: Tensor,
    teacher_heads: Tensor,
    key_valid: Tensor,
    student_scale: float,
    teacher_scale: float,
    causal: bool = False,
) -> Tensor:
    """Row-wise MSE or cosine distance between aligned heads' attention probabilities, from Q and K.

    With ``p_s = softmax(student_scale * q_s K_s^T)`` and ``p_t = softmax(teacher_scale * q_t K_t^T)`` over
    a row's allowed keys, each row gives

        mse:     sum_k (p_s,k - p_t,k)^2
        cosine:  1 - <p_s, p_t> / (|p_s| |p_t|)

    the per-row value of ``losses._row_terms``. The caller weights the rows as ``_row_terms`` does, with
    ``valid`` (B, 1, Lq) true where the query's own position is a real token and ``n`` (B, 1, 1) the real
    tokens per example: ``attention_mse`` is ``sum(rows * valid) / sum((valid * n).expand_as(rows))`` and
    ``attention_cosine`` is ``sum(rows * valid) / sum(valid.expand_as(rows))``.

    Args:
        loss: ``"mse"`` or ``"cosine"``.
        causal: query row i (the last ``Lq`` of ``Lk`` positions) sees keys up to ``i + Lk - Lq``.

    Shape:
        student_query: (B, Hs, Lq, Ds); student_key: (B, Hs_kv, Lk, Ds), Hs a multiple of Hs_kv.
        teacher_query: (B, Ht, Lq, Dt); teacher_key: (B, Ht_kv, Lk, Dt).
        student_heads, teacher_heads: (P,) int32 on the device; pair p compares teacher head
            ``teacher_heads[p]`` with student head ``student_heads[p]`` (student heads distinct).
        key_valid: (B, Lk) int32, contiguous, 1 for real tokens.
        Returns: (B, P, Lq) float32, each query row's value (0 for a row with no allowed key); padded query
        rows get values too, which the caller drops. Differentiable with respect to the student's query and
        key.
    """
    if loss not in LOSSES:
        raise ValueError(f"attention_probs_rows: loss must be one of {LOSSES}, got {loss!r}")
    if triton is None:
        raise RuntimeError(
            "the fused attention-probability kernels need triton: pip install 'distill-lab[gpu]'"
        )
    student_query, student_key, teacher_query, teacher_key = _interpreted(
        student_query, student_key, teacher_query, teacher_key
    )
    return _AttentionProbs.apply(
        loss,
        student_query,
        student_key,
        teacher_query.detach(),
        teacher_key.detach(),
        student_heads,
        teacher_heads,
        key_valid,
        student_scale,
        teacher_scale,
        causal,
    )
