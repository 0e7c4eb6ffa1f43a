"""Fused attention-KL from queries and keys: Triton kernels (forward and backward) and their autograd wrapper.

For one aligned head pair and one query row i, with scores ``s = a_s q_s K_s^T / T`` (student) and
``t = a_t q_t K_t^T / T`` (teacher) over the row's allowed keys (key padding, causal structure):

    KL(softmax(t) || softmax(s)) = sum_k p_t,k (t_k - s_k) - lse(t) + lse(s)

The forward streams over key blocks with an online softmax for the teacher (running max, sum and the
weighted difference) and a running log-sum-exp for the student, so no ``L x L`` tile outlives a block; it
saves one log-sum-exp per row and side. The backward recomputes both tiles, with
``dKL/ds_k = p_s,k - p_t,k``: one kernel accumulates dQ over key blocks, another dK over query blocks, so no
float atomics are needed and the result is deterministic. Gradients flow to the student's queries and keys
only. Inputs may be bf16; every accumulation is float32, and a side with float32 inputs gets float32 (IEEE)
dot products, never TF32 (``_triton._ieee``).

Offsets that can reach a tensor's full size are 64-bit. Triton's program ids and integer arguments are 32-bit,
so a product such as ``b * stride_b`` or ``pid * Lq * D`` wraps once a tensor has 2^31 elements or more
(B=16, 64 head pairs, L=32k, D=128 makes 2^32, realistic for long-context distillation), and the kernel then
reads and writes wherever the wrapped offset points. So the example, head and pair indices are 64-bit, and so
is every offset they scale. The offsets within one head's (L, d) matrix (of the inputs and of the gradients)
stay 32-bit, since the wrapper sees that each such matrix spans fewer than 2^31 elements (``_kernel_layout``):
64-bit row offsets cost these kernels up to 40 more registers per thread, and spills.

The kernels need Triton and a CUDA device, or ``TRITON_INTERPRET=1`` (how the CPU tests run them). The
plain PyTorch path (``distill_lab.attention.AttentionDistillationLoss`` on ``QueryKey`` records) is
the reference and the fallback everywhere else.
"""

from __future__ import annotations

import torch
from torch import Tensor

from distill_lab.kernels._triton import _interpreted, _kernel_layout, _meta, _to_heads, triton

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
    def _kl_fwd(
        QS, KS, QT, KT, SH, TH, VALID, KL, LSE_S, LSE_T,
        sqs_b, sqs_h, sqs_l, sks_b, sks_h, sks_l, sqt_b, sqt_h, sqt_l, skt_b, skt_h, skt_l, sv_b,
        P, LQ, LK, DS, DT, GS, GT, scale_s, scale_t,
        CAUSAL: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
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
        m_t = tl.full([BLOCK_M], _NEG, tl.float32)
        l_t = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M], tl.float32)
        m_s = tl.full([BLOCK_M], _NEG, tl.float32)
        l_s = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, _keys_end(pid_m, LQ, LK, CAUSAL, BLOCK_M), BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key = offs_n[:, None] < LK
            s, _ = _scores(
                qs,
                ks_base + offs_n[:, None] * sks_l + offs_ds[None, :],
                key & (offs_ds[None, :] < DS),
                scale_s,
                IEEE_S,
            )
            t, _ = _scores(
                qt,
                kt_base + offs_n[:, None] * skt_l + offs_dt[None, :],
                key & (offs_dt[None, :] < DT),
                scale_t,
                IEEE_T,
            )
            ok = _allowed(offs_m, offs_n, VALID + b * sv_b, LQ, LK, CAUSAL)
            s = tl.where(ok, s, float("-inf"))
            t = tl.where(ok, t, float("-inf"))
            m_t_new = tl.maximum(m_t, tl.max(t, 1))
            alpha = tl.exp(m_t - m_t_new)
            p_t = tl.exp(t - m_t_new[:, None])
            acc = acc * alpha + tl.sum(p_t * tl.where(ok, t - s, 0.0), 1)
            l_t = l_t * alpha + tl.sum(p_t, 1)
            m_t = m_t_new
            m_s_new = tl.maximum(m_s, tl.max(s, 1))
            l_s = l_s * tl.exp(m_s - m_s_new) + tl.sum(tl.exp(s - m_s_new[:, None]), 1)
            m_s = m_s_new
        has_keys = l_t > 0
        lse_t = tl.where(has_keys, m_t + tl.log(l_t), 0.0)
        lse_s = tl.where(has_keys, m_s + tl.log(l_s), 0.0)
        kl = tl.where(has_keys, acc / tl.where(has_keys, l_t, 1.0) - lse_t + lse_s, 0.0)
        rows0 = pid_bp.to(tl.int64) * LQ  # this pair's first row in the (B, P, Lq) outputs
        tl.store(KL + rows0 + offs_m, kl, mask=row)
        tl.store(LSE_S + rows0 + offs_m, lse_s, mask=row)
        tl.store(LSE_T + rows0 + offs_m, lse_t, mask=row)

    @triton.jit
    def _kl_bwd_dq(
        QS, KS, QT, KT, SH, TH, VALID, LSE_S, LSE_T, G, DQ,
        sqs_b, sqs_h, sqs_l, sks_b, sks_h, sks_l, sqt_b, sqt_h, sqt_l, skt_b, skt_h, skt_l, sv_b,
        P, LQ, LK, DS, DT, GS, GT, scale_s, scale_t,
        CAUSAL: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
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
        g = tl.load(G + rows0 + offs_m, mask=row, other=0.0)
        ks_base = KS + b * sks_b + (hs // GS) * sks_h
        kt_base = KT + b * skt_b + (ht // GT) * skt_h
        dq = tl.zeros([BLOCK_M, BLOCK_DS], tl.float32)
        for start_n in range(0, _keys_end(pid_m, LQ, LK, CAUSAL, BLOCK_M), BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            key = offs_n[:, None] < LK
            s, ks = _scores(
                qs,
                ks_base + offs_n[:, None] * sks_l + offs_ds[None, :],
                key & (offs_ds[None, :] < DS),
                scale_s,
                IEEE_S,
            )
            t, _ = _scores(
                qt,
                kt_base + offs_n[:, None] * skt_l + offs_dt[None, :],
                key & (offs_dt[None, :] < DT),
                scale_t,
                IEEE_T,
            )
            ok = _allowed(offs_m, offs_n, VALID + b * sv_b, LQ, LK, CAUSAL)
            p_s = tl.where(ok, tl.exp(s - lse_s[:, None]), 0.0)
            p_t = tl.where(ok, tl.exp(t - lse_t[:, None]), 0.0)
            ds = (p_s - p_t) * g[:, None]
            dq += _mm(ds.to(ks.dtype), ks, IEEE_S)
        out = DQ + rows0 * DS + offs_m[:, None] * DS + offs_ds[None, :]
        tl.store(out, dq * scale_s, mask=row[:, None] & (offs_ds[None, :] < DS))

    @triton.jit
    def _kl_bwd_dk(
        QS, KS, QT, KT, SH, TH, VALID, LSE_S, LSE_T, G, DK,
        sqs_b, sqs_h, sqs_l, sks_b, sks_h, sks_l, sqt_b, sqt_h, sqt_l, skt_b, skt_h, skt_l, sv_b,
        P, LQ, LK, DS, DT, GS, GT, scale_s, scale_t,
        CAUSAL: tl.constexpr, IEEE_S: tl.constexpr, IEEE_T: tl.constexpr,
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
        qs_base = QS + b * sqs_b + hs * sqs_h
        qt_base = QT + b * sqt_b + ht * sqt_h
        rows0 = pid_bp.to(tl.int64) * LQ  # this pair's first row in the (B, P, Lq) row statistics
        dk = tl.zeros([BLOCK_N, BLOCK_DS], tl.float32)
        for start_m in range(_queries_start(pid_n, LQ, LK, CAUSAL, BLOCK_M, BLOCK_N), LQ, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            row = offs_m < LQ
            qs = tl.load(
                qs_base + offs_m[:, None] * sqs_l + offs_ds[None, :],
                mask=row[:, None] & (offs_ds[None, :] < DS),
                other=0.0,
            )
            qt = tl.load(
                qt_base + offs_m[:, None] * sqt_l + offs_dt[None, :],
                mask=row[:, None] & (offs_dt[None, :] < DT),
                other=0.0,
            )
            lse_s = tl.load(LSE_S + rows0 + offs_m, mask=row, other=0.0)
            lse_t = tl.load(LSE_T + rows0 + offs_m, mask=row, other=0.0)
            g = tl.load(G + rows0 + offs_m, mask=row, other=0.0)
            s = _mm(qs, tl.trans(ks), IEEE_S) * scale_s
            t = _mm(qt, tl.trans(kt), IEEE_T) * scale_t
            ok = _allowed(offs_m, offs_n, VALID + b * sv_b, LQ, LK, CAUSAL)
            p_s = tl.where(ok, tl.exp(s - lse_s[:, None]), 0.0)
            p_t = tl.where(ok, tl.exp(t - lse_t[:, None]), 0.0)
            ds = (p_s - p_t) * g[:, None]
            dk += _mm(tl.trans(ds).to(qs.dtype), qs, IEEE_S)
        out = DK + pid_bp.to(tl.int64) * LK * DS + offs_n[:, None] * DS + offs_ds[None, :]
        tl.store(out, dk * scale_s, mask=key[:, None] & (offs_ds[None, :] < DS))


class _AttentionKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qs, ks, qt, kt, s_heads, t_heads, key_valid, scale_s, scale_t, causal):
        qs, ks, qt, kt = (_kernel_layout(x) for x in (qs, ks, qt, kt))
        batch, _, q_len, d_s = qs.shape
        k_len, d_t = ks.shape[2], qt.shape[3]
        pairs = s_heads.numel()
        kl = torch.empty(batch, pairs, q_len, device=qs.device, dtype=torch.float32)
        lse_s, lse_t = torch.empty_like(kl), torch.empty_like(kl)
        meta = _meta(qs, ks, qt, kt, key_valid, pairs, q_len, k_len, d_s, d_t, scale_s, scale_t, causal)
        grid = (triton.cdiv(q_len, meta["BLOCK_M"]), batch * pairs)
        _kl_fwd[grid](
            qs, ks, qt, kt, s_heads, t_heads, key_valid, kl, lse_s, lse_t, *meta["args"], **meta["const"]
        )
        ctx.save_for_backward(qs, ks, qt, kt, s_heads, t_heads, key_valid, lse_s, lse_t)
        ctx.meta = meta
        return kl

    @staticmethod
    def backward(ctx, grad):
        qs, ks, qt, kt, s_heads, t_heads, key_valid, lse_s, lse_t = ctx.saved_tensors
        meta = ctx.meta
        batch, _, q_len, d_s = qs.shape
        k_len = ks.shape[2]
        pairs = s_heads.numel()
        grad = grad.float().contiguous()
        dq = torch.empty(batch, pairs, q_len, d_s, device=qs.device, dtype=torch.float32)
        dk = torch.empty(batch, pairs, k_len, d_s, device=qs.device, dtype=torch.float32)
        common = (qs, ks, qt, kt, s_heads, t_heads, key_valid, lse_s, lse_t, grad)
        _kl_bwd_dq[(triton.cdiv(q_len, meta["BLOCK_M"]), batch * pairs)](
            *common, dq, *meta["args"], **meta["const"]
        )
        _kl_bwd_dk[(triton.cdiv(k_len, meta["BLOCK_N"]), batch * pairs)](
            *common, dk, *meta["args"], **meta["const"]
        )
        dq_heads, dk_heads = _to_heads(dq, dk, qs, ks, s_heads)
        return dq_heads.to(qs.dtype), dk_heads.to(ks.dtype), None, None, None, None, None, None, None, None


def attention_kl_rows(
    student_query: Tensor,
    student_key: Tensor,
    teacher_query: Tensor,
    teacher_key: Tensor,
    student_heads: Tensor,
    teacher_heads: Tensor,
    key_valid: Tensor,
    student_scale: float,
    teacher_scale: float,
    temperature: float = 1.0,
    causal: bool = False,
) -> Tensor:
    """Row-wise ``KL(softmax(t / T) || softmax(s / T))`` for aligned head pairs, straight from Q and K.

    Shape:
        student_query: (B, Hs, Lq, Ds); student_key: (B, Hs_kv, Lk, Ds), Hs a multiple of Hs_kv.
        teacher_query: (B, Ht, Lq, Dt); teacher_key: (B, Ht_kv, Lk, Dt).
        student_heads, teacher_heads: (P,) int32 on the device; pair p compares teacher head
            ``teacher_heads[p]`` with student head ``student_heads[p]`` (student heads distinct).
        key_valid: (B, Lk) int32, 1 for real tokens.
        Returns: (B, P, Lq) float32, the KL of each query row (0 for a row with no allowed key), without the
        ``T^2`` factor; differentiable with respect to the student's query and key.
    """
    if triton is None:
        raise RuntimeError("the fused attention-KL kernel needs triton: pip install 'distill-lab[gpu]'")
    student_query, student_key, teacher_query, teacher_key = _interpreted(
        student_query, student_key, teacher_query, teacher_key
    )
    return _AttentionKL.apply(
        student_query,
        student_key,
        teacher_query.detach(),
        teacher_key.detach(),
        student_heads,
        teacher_heads,
        key_valid,
        student_scale / temperature,
        teacher_scale / temperature,
        causal,
    )
