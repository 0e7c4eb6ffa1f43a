"""The fused attention-MSE and attention-cosine Triton kernels against a float64 reference written here.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (small shapes); with one they run
compiled. Under the interpreter the bf16 test checks less and the determinism test is skipped (see
tests/test_kernels.py).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must be set before the kernels are first decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from distill_lab.kernels.attention_probs import attention_probs_rows  # noqa: E402
from distill_lab.losses import attention_cosine, attention_mse  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
LOSSES = ["mse", "cosine"]


def reference_probs(qs, ks, qt, kt, s_heads, t_heads, key_valid, a_s, a_t, causal):
    """Both sides' attention probabilities (B, P, Lq, Lk) in float64, 0 off the allowed keys."""
    qs, ks, qt, kt = (x.double() for x in (qs, ks, qt, kt))
    batch, _, q_len, _ = qs.shape
    k_len = ks.shape[2]
    ks = ks.repeat_interleave(qs.shape[1] // ks.shape[1], 1)
    kt = kt.repeat_interleave(qt.shape[1] // kt.shape[1], 1)
    allowed = key_valid.bool()[:, None, None, :].expand(batch, 1, q_len, k_len)
    if causal:
        rows = torch.arange(q_len, device=qs.device)[:, None] + (k_len - q_len)
        allowed = allowed & (torch.arange(k_len, device=qs.device)[None, :] <= rows)
    empty = ~allowed.any(-1, keepdim=True)

    def probs(q, k, scale, heads):
        scores = ((q @ k.transpose(-1, -2)) * scale)[:, heads.long()]
        scores = scores.masked_fill(~allowed, -math.inf).masked_fill(empty, 0.0)  # an empty row: any finite
        return torch.softmax(scores, -1).masked_fill(~allowed, 0.0)

    return probs(qs, ks, a_s, s_heads), probs(qt, kt, a_t, t_heads)


def reference_rows(loss, *args):
    """Per-row MSE sum or cosine distance in float64, by the definition; 0 for a row with no allowed key."""
    p_s, p_t = reference_probs(*args)
    if loss == "mse":
        return (p_s - p_t).square().sum(-1)
    has_keys = p_s.sum(-1) > 0
    norms = (p_s.norm(dim=-1) * p_t.norm(dim=-1)).where(has_keys, torch.ones((), dtype=p_s.dtype))
    return torch.where(has_keys, 1.0 - (p_s * p_t).sum(-1) / norms, 0.0)


def _inputs(
    q_len, k_len=None, heads_s=4, kv_s=2, heads_t=4, kv_t=2, d_s=8, d_t=12, batch=2, dtype=torch.float32
):
    k_len = k_len or q_len
    g = torch.Generator().manual_seed(0)
    qs = torch.randn(batch, heads_s, q_len, d_s, generator=g).to(DEVICE, dtype).requires_grad_()
    ks = torch.randn(batch, kv_s, k_len, d_s, generator=g).to(DEVICE, dtype).requires_grad_()
    qt = torch.randn(batch, heads_t, q_len, d_t, generator=g).to(DEVICE, dtype)
    kt = torch.randn(batch, kv_t, k_len, d_t, generator=g).to(DEVICE, dtype)
    key_valid = torch.ones(batch, k_len, dtype=torch.int32, device=DEVICE)
    if batch > 1 and k_len > 2:
        key_valid[-1, k_len // 2 + 1 :] = 0  # a padded example
    return qs, ks, qt, kt, key_valid


def _heads(*pairs):
    t = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=DEVICE)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=DEVICE)
    return s, t


def _check(loss, qs, ks, qt, kt, s_heads, t_heads, key_valid, a_s, a_t, causal, atol=2e-6, rtol=1e-5):
    """Values and the gradients of a random weighting of the rows, kernel against reference."""
    args = (qs, ks, qt, kt, s_heads, t_heads, key_valid, a_s, a_t)
    rows = attention_probs_rows(loss, *args, causal)
    ref = reference_rows(loss, *args, causal)
    assert rows.dtype == torch.float32 and rows.shape == ref.shape
    torch.testing.assert_close(rows.double(), ref, atol=atol, rtol=rtol)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = torch.autograd.grad((rows * weight).sum(), (qs, ks))
    want = torch.autograd.grad((ref * weight.double()).sum(), (qs, ks))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == qs.dtype
        torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=max(rtol, 1e-4))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("length", [1, 17, 70])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_gradients_match_the_reference(loss, length, causal):
    batch = 1 if length == 70 else 2  # 70 rows and keys cross the 64-wide blocks; one example keeps it quick
    qs, ks, qt, kt, key_valid = _inputs(length, batch=batch)
    if length == 70:
        key_valid[0, 50:] = 0
    s_heads, t_heads = _heads((3, 0), (1, 1), (0, 2), (2, 3))  # a permuted head map, GQA on both sides
    _check(loss, qs, ks, qt, kt, s_heads, t_heads, key_valid, 8**-0.5, 12**-0.5, causal)


@pytest.mark.parametrize("loss", LOSSES)
def test_fewer_queries_than_keys_odd_head_dims_and_a_head_subset(loss):
    """Lq < Lk (queries are the last Lq keys), head dims 5 vs 7, 2 of 4 student heads, MHA teacher."""
    qs, ks, qt, kt, key_valid = _inputs(6, 11, heads_s=4, kv_s=1, heads_t=2, kv_t=2, d_s=5, d_t=7)
    s_heads, t_heads = _heads((1, 3), (0, 1))
    for causal in (False, True):
        _check(loss, qs, ks, qt, kt, s_heads, t_heads, key_valid, 0.4, 0.3, causal)


@pytest.mark.parametrize("loss", LOSSES)
def test_rows_without_keys_identical_models_and_no_teacher_gradient(loss):
    qs, ks, qt, kt, key_valid = _inputs(9, heads_t=4, kv_t=2, d_t=8)
    key_valid[0] = 0  # an example with no real token: every row has no key, value 0, no NaN
    s_heads, t_heads = _heads((0, 0), (1, 1), (2, 2), (3, 3))
    qt, kt = qs.detach().clone().requires_grad_(), ks.detach().clone().requires_grad_()
    rows = attention_probs_rows(loss, qs, ks, qt, kt, s_heads, t_heads, key_valid, 0.3, 0.3)
    assert torch.isfinite(rows).all() and rows[0].abs().max() == 0
    assert rows.abs().max() < 1e-6  # the same queries and keys on both sides
    rows.sum().backward()
    assert torch.isfinite(qs.grad).all() and torch.isfinite(ks.grad).all()
    assert qs.grad[0].abs().max() == 0 and ks.grad[0].abs().max() == 0
    assert qt.grad is None and kt.grad is None  # the teacher is a constant


@pytest.mark.skipif(
    not HAS_CUDA,
    reason="the interpreter runs programs one at a time: only a GPU can show run-to-run differences",
)
@pytest.mark.parametrize("loss", LOSSES)
def test_backward_is_deterministic(loss):
    qs, ks, qt, kt, key_valid = _inputs(33)
    s_heads, t_heads = _heads((0, 0), (1, 1), (2, 2), (3, 3))
    grads = []
    for _ in range(2):
        rows = attention_probs_rows(loss, qs, ks, qt, kt, s_heads, t_heads, key_valid, 0.35, 0.3, True)
        grads.append(torch.autograd.grad(rows.sum(), (qs, ks)))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_inputs_accumulate_in_float32(loss):
    qs, ks, qt, kt, key_valid = _inputs(24, dtype=torch.bfloat16)
    s_heads, t_heads = _heads((0, 0), (1, 1), (2, 2), (3, 3))
    args = (qs, ks, qt, kt, s_heads, t_heads, key_valid, 8**-0.5, 12**-0.5)
    rows = attention_probs_rows(loss, *args, False)
    ref = reference_rows(loss, *args, False)
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    torch.testing.assert_close(rows.double(), ref, atol=2e-2, rtol=2e-2)  # bf16 tiles in the dot products
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = torch.autograd.grad((rows * weight).sum(), (qs, ks))
    want = torch.autograd.grad((ref * weight.double()).sum(), (qs, ks))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b.double(), atol=2e-2, rtol=5e-2)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("causal", [False, True])
def test_rows_combine_to_the_pytorch_losses(loss, causal):
    """Weighted as the docstring says, the rows give ``attention_mse`` / ``attention_cosine`` on the maps."""
    qs, ks, qt, kt, key_valid = _inputs(7, 10, d_t=8)
    key_valid[0, 2] = 0  # a padded key inside the queries' span: its query row drops out too
    s_heads, t_heads = _heads((0, 1), (1, 0), (2, 2), (3, 3))
    args = (qs, ks, qt, kt, s_heads, t_heads, key_valid, 0.35, 0.3)
    rows = attention_probs_rows(loss, *args, causal)
    q_len, k_len = qs.shape[2], ks.shape[2]
    valid = ((key_valid[:, k_len - q_len :] > 0) & (key_valid.sum(-1, keepdim=True) > 0)).float()[:, None, :]
    weights = valid * key_valid.sum(-1).float()[:, None, None] if loss == "mse" else valid  # MSE: valid keys
    fused = (rows * valid).sum() / weights.expand_as(rows).sum()
    p_s, p_t = reference_probs(*args, causal)
    plain = {"mse": attention_mse, "cosine": attention_cosine}[loss](p_s, p_t, key_valid)
    torch.testing.assert_close(fused.double(), plain, atol=1e-7, rtol=1e-5)


def test_an_unknown_loss_is_a_clear_error():
    qs, ks, qt, kt, key_valid = _inputs(3)
    s_heads, t_heads = _heads((0, 0))
    with pytest.raises(ValueError, match="mse"):
        attention_probs_rows("kl", qs, ks, qt, kt, s_heads, t_heads, key_valid, 0.3, 0.3)
