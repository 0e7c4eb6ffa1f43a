"""Triton helpers shared by the fused attention kernels (``attention_kl``, ``attention_probs``).

The ``@triton.jit`` helpers load tiles and compute masked scores inside the kernels; the Python helpers lay
out the inputs, choose block sizes and launch options (``_meta``) and map per-pair gradients back to the
student's heads (``_to_heads``). Offsets that can reach a tensor's full size are 64-bit, those within one
head's (L, d) matrix 32-bit (``_kernel_layout``); ``attention_kl``'s docstring says why.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional (the gpu extra)
    triton = None

# a finite "minus infinity" for running maxima, so exp(m_old - m_new) never sees inf - inf; a constexpr, since
# compiled kernels (unlike the interpreter) may read no other module global
_NEG = tl.constexpr(-1.0e30) if triton is not None else -1.0e30


if triton is not None:

    @triton.jit
    def _mm(a, b, IEEE: tl.constexpr):
        """``a @ b``; in full float32 where ``IEEE`` (a float32 side, see ``_ieee``), else as the GPU's tensor
        cores take the inputs."""
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _scores(q, k_ptrs, kv_mask, scale, IEEE: tl.constexpr):
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        return _mm(q, tl.trans(k), IEEE) * scale, k

    @triton.jit
    def _allowed(offs_m, offs_n, valid_ptr, LQ, LK, CAUSAL: tl.constexpr):
        valid = tl.load(valid_ptr + offs_n, mask=offs_n < LK, other=0) != 0
        ok = valid[None, :] & (offs_m[:, None] < LQ)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None] + (LK - LQ))
        return ok

    @triton.jit
    def _keys_end(pid_m, LQ, LK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
        """One past the last key that query block ``pid_m`` may see: under a causal mask its last row ``m``
        sees keys up to ``m + LK - LQ``, so the key blocks beyond are masked whole and are not visited (half
        the work of a causal model); ``LK`` otherwise."""
        if CAUSAL:
            return tl.minimum((pid_m + 1) * BLOCK_M + (LK - LQ), LK)
        return LK

    @triton.jit
    def _queries_start(pid_n, LQ, LK, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The first query block that sees a key of key block ``pid_n``: under a causal mask row ``m`` sees
        key ``n`` when ``m >= n - (LK - LQ)``, so the query blocks before it are not visited; 0 otherwise."""
        if CAUSAL:
            return tl.maximum(pid_n * BLOCK_N - (LK - LQ), 0) // BLOCK_M * BLOCK_M
        return 0

    @triton.jit
    def _pair_heads(SH, TH, pid_bp, P):
        """This program's example and the student and teacher heads of its pair (grid axis 1: B x P), 64-bit:
        they scale the strides of whole tensors (see the module docstring)."""
        pair = pid_bp % P
        return (pid_bp // P).to(tl.int64), tl.load(SH + pair).to(tl.int64), tl.load(TH + pair).to(tl.int64)

    @triton.jit
    def _key_block(
        KS, KT, b, hs, ht, offs_n, offs_ds, offs_dt, key,
        sks_b, sks_h, sks_l, skt_b, skt_h, skt_l, GS, GT, DS, DT,
    ):  # fmt: skip
        """The student's and the teacher's keys of this program's key block (zero beyond L and d); GQA maps
        query head h to key head h // G."""
        ks = tl.load(
            KS + b * sks_b + (hs // GS) * sks_h + offs_n[:, None] * sks_l + offs_ds[None, :],
            mask=key[:, None] & (offs_ds[None, :] < DS),
            other=0.0,
        )
        kt = tl.load(
            KT + b * skt_b + (ht // GT) * skt_h + offs_n[:, None] * skt_l + offs_dt[None, :],
            mask=key[:, None] & (offs_dt[None, :] < DT),
            other=0.0,
        )
        return ks, kt

    @triton.jit
    def _query_tiles(
        QS, QT, b, hs, ht, offs_m, offs_ds, offs_dt, row, sqs_b, sqs_h, sqs_l, sqt_b, sqt_h, sqt_l, DS, DT
    ):
        """The student's and the teacher's query rows of this program's block (zero beyond L and d)."""
        qs = tl.load(
            QS + b * sqs_b + hs * sqs_h + offs_m[:, None] * sqs_l + offs_ds[None, :],
            mask=row[:, None] & (offs_ds[None, :] < DS),
            other=0.0,
        )
        qt = tl.load(
            QT + b * sqt_b + ht * sqt_h + offs_m[:, None] * sqt_l + offs_dt[None, :],
            mask=row[:, None] & (offs_dt[None, :] < DT),
            other=0.0,
        )
        return qs, qt


def _block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(n)))


def _kernel_layout(x: Tensor) -> Tensor:
    """``x`` (B, H, L, d) as the kernels read it: unit stride along d, and each head's (L, d) matrix spanning
    fewer than 2^31 elements, so that the kernels' 32-bit offsets within it cannot wrap (the gradients'
    (L, d) matrices then fit too). Otherwise a contiguous copy, where a head's rows lie d apart; an error
    beyond that, at 2^31 / d rows (16M at d = 128)."""
    length, dim = x.shape[-2:]
    if x.stride(-1) == 1 and max((length - 1) * x.stride(-2) + dim, length * dim) < 2**31:
        return x
    if length * dim >= 2**31:
        raise ValueError(
            f"the fused attention kernels take at most 2^31 elements per head, got L={length}, d={dim}"
        )
    return x.contiguous()


def _ieee(x: Tensor) -> bool:
    """Whether the dot products of the side with inputs ``x`` run in full float32
    (``input_precision="ieee"``): float32 inputs would otherwise be rounded to TF32 by the GPU's tensor cores.
    Decided per side, so a float32 teacher keeps float32 scores beside a bf16 student, whose 16-bit products
    are exact either way."""
    return x.dtype == torch.float32


def _to_heads(dq: Tensor, dk: Tensor, qs: Tensor, ks: Tensor, s_heads: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair gradients (B, P, L, D) back to the student's query heads and key heads, float32.

    Pairs name distinct student heads: scatter them back, then sum each key head's query-head group (GQA)."""
    batch, heads_s, q_len, d_s = qs.shape
    heads_kv, k_len = ks.shape[1], ks.shape[2]
    dq_heads = qs.new_zeros(batch, heads_s, q_len, d_s, dtype=torch.float32)
    dk_heads = qs.new_zeros(batch, heads_s, k_len, d_s, dtype=torch.float32)
    index = s_heads.long()
    dq_heads[:, index] = dq
    dk_heads[:, index] = dk
    return dq_heads, dk_heads.view(batch, heads_kv, heads_s // heads_kv, k_len, d_s).sum(2)


def _meta(qs, ks, qt, kt, key_valid, pairs, q_len, k_len, d_s, d_t, scale_s, scale_t, causal) -> dict:
    # a tile row of the wider head is `row` bytes; pipelined key loads take about 2 * stages * BLOCK_N * row
    # of shared memory. Up to 256 bytes (bf16 at head size 128, float32 at 64) three stages of 64 fit; float32
    # at 128 would ask for 192 KB so, beyond an A100's 163 KB per block, and gets two stages (128 KB); float32
    # at 256 blocks of 32 (benchmarks/RESULTS.md; tests/test_kernels_compile.py checks each kernel against
    # both GPUs' limits)
    row = max(qs.element_size(), qt.element_size()) * _block(max(d_s, d_t), 256)
    cap = 64 if row <= 512 else 32
    block_m, block_n = _block(q_len, cap), _block(k_len, cap)
    args = (
        qs.stride(0), qs.stride(1), qs.stride(2), ks.stride(0), ks.stride(1), ks.stride(2),
        qt.stride(0), qt.stride(1), qt.stride(2), kt.stride(0), kt.stride(1), kt.stride(2),
        key_valid.stride(0), pairs, q_len, k_len, d_s, d_t,
        qs.shape[1] // ks.shape[1], qt.shape[1] // kt.shape[1], scale_s, scale_t,
    )  # fmt: skip
    const = dict(
        CAUSAL=bool(causal),
        IEEE_S=_ieee(qs),
        IEEE_T=_ieee(qt),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_DS=_block(d_s, 256),
        BLOCK_DT=_block(d_t, 256),
        num_stages=3 if row <= 256 else 2,
    )
    return {"args": args, "const": const, "BLOCK_M": block_m, "BLOCK_N": block_n}


def _interpreted(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The inputs as the kernels take them: under Triton's CPU interpreter, which gets 16-bit dot products
    wrong, 16-bit tiles are upcast to float32 (the same values); unchanged elsewhere."""
    if os.environ.get("TRITON_INTERPRET") == "1" and tensors[0].dtype != torch.float32:
        return tuple(x.float() for x in tensors)
    return tensors
