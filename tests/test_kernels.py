"""The fused attention-KL Triton kernel against a float64 reference written here.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors (small shapes); with one, the same
tests run them compiled. The interpreter upcasts bf16 inputs and runs programs one at a time, so there the
bf16 test checks the wrapper's dtypes, and the determinism test, which could not fail there, runs only on a
GPU: ``test_kernels_use_no_atomics`` stands in for it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:  # must be set before the kernels are first decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

from distill_lab.attention import AttentionDistillationLoss  # noqa: E402
from distill_lab.capture import QueryKey  # noqa: E402
from distill_lab.kernels._triton import _kernel_layout, _meta  # noqa: E402
from distill_lab.kernels.attention_kl import attention_kl_rows  # noqa: E402
from distill_lab.matching import Headwise  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"


def reference_rows(qs, ks, qt, kt, s_heads, t_heads, key_valid, a_s, a_t, temperature, causal):
    """Row-wise KL(softmax(t/T) || softmax(s/T)) in float64, by the definition, over allowed keys."""
    qs, ks, qt, kt = (x.double() for x in (qs, ks, qt, kt))
    batch, heads_s, length, _ = qs.shape
    ks = ks.repeat_interleave(heads_s // ks.shape[1], 1)
    kt = kt.repeat_interleave(qt.shape[1] // kt.shape[1], 1)
    s = (qs @ ks.transpose(-1, -2)) * a_s / temperature
    t = (qt @ kt.transpose(-1, -2)) * a_t / temperature
    allowed = key_valid.bool()[:, None, None, :].expand(batch, 1, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=qs.device).tril()
    s = s.masked_fill(~allowed, -math.inf)[:, s_heads.long()]
    t = t.masked_fill(~allowed, -math.inf)[:, t_heads.long()]
    out = torch.zeros(s.shape[:3], dtype=torch.float64, device=qs.device)
    for b in range(s.shape[0]):
        for p in range(s.shape[1]):
            for i in range(length):
                ok = allowed[b, 0, i]
                if not ok.any():
                    continue
                log_s = torch.log_softmax(s[b, p, i, ok], -1)
                log_t = torch.log_softmax(t[b, p, i, ok], -1)
                out[b, p, i] = (log_t.exp() * (log_t - log_s)).sum()
    return out


def kl_term_sizes(qs, ks, qt, kt, s_heads, t_heads, key_valid, a_s, a_t, temperature, causal):
    """Per row, in float64, the sizes of the three terms that the kernel's row KL cancels,
    ``sum_k p_t,k (t_k - s_k) - lse(t) + lse(s)``: ``sum_k p_t,k |t_k - s_k| + |lse(t)| + |lse(s)|`` over the
    allowed keys (0 for a row without)."""
    qs, ks, qt, kt = (x.double() for x in (qs, ks, qt, kt))
    batch, heads_s, length, _ = qs.shape
    ks = ks.repeat_interleave(heads_s // ks.shape[1], 1)
    kt = kt.repeat_interleave(qt.shape[1] // kt.shape[1], 1)
    allowed = key_valid.bool()[:, None, None, :].expand(batch, 1, length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=qs.device).tril()
    s = ((qs @ ks.transpose(-1, -2)) * a_s / temperature)[:, s_heads.long()].masked_fill(~allowed, -math.inf)
    t = ((qt @ kt.transpose(-1, -2)) * a_t / temperature)[:, t_heads.long()].masked_fill(~allowed, -math.inf)
    p_t = torch.softmax(t, -1).nan_to_num(0.0)
    sizes = (p_t * (t - s).nan_to_num(0.0).abs()).sum(-1) + torch.logsumexp(t, -1).abs()
    sizes = sizes + torch.logsumexp(s, -1).abs()
    return sizes.nan_to_num(0.0, posinf=0.0)


def _inputs(
    length, heads_s=4, kv_s=2, heads_t=4, kv_t=2, d_s=8, d_t=12, batch=2, dtype=torch.float32, seed=0
):
    g = torch.Generator().manual_seed(seed)
    qs = torch.randn(batch, heads_s, length, d_s, generator=g).to(DEVICE, dtype).requires_grad_()
    ks = torch.randn(batch, kv_s, length, d_s, generator=g).to(DEVICE, dtype).requires_grad_()
    qt = torch.randn(batch, heads_t, length, d_t, generator=g).to(DEVICE, dtype)
    kt = torch.randn(batch, kv_t, length, d_t, generator=g).to(DEVICE, dtype)
    key_valid = torch.ones(batch, length, dtype=torch.int32, device=DEVICE)
    if batch > 1 and length > 2:
        key_valid[-1, length // 2 + 1 :] = 0  # a padded example
    return qs, ks, qt, kt, key_valid


def _heads(*pairs):
    t = torch.tensor([p[0] for p in pairs], dtype=torch.int32, device=DEVICE)
    s = torch.tensor([p[1] for p in pairs], dtype=torch.int32, device=DEVICE)
    return s, t


@pytest.mark.parametrize("length", [1, 17, 40, 150])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_gradients_match_the_reference(length, causal, temperature):
    # 150 rows and keys make three 64-wide blocks: a causal query block skips the key blocks past its last
    # row, and a key block the query blocks before its first key; one example keeps it quick
    qs, ks, qt, kt, key_valid = _inputs(length, batch=1 if length == 150 else 2)
    if length == 150:
        key_valid[0, 120:] = 0
    s_heads, t_heads = _heads((3, 0), (1, 1), (0, 2), (2, 3))  # a permuted head map, GQA on both sides
    a_s, a_t = 8**-0.5, 12**-0.5
    rows = attention_kl_rows(qs, ks, qt, kt, s_heads, t_heads, key_valid, a_s, a_t, temperature, causal)
    ref = reference_rows(qs, ks, qt, kt, s_heads, t_heads, key_valid, a_s, a_t, temperature, causal)
    assert rows.dtype == torch.float32 and rows.shape == ref.shape
    # A row's KL cancels three terms of total size S (kl_term_sizes), which float32 rounds to within a few u
    # of their sizes in whatever order the kernel sums keys and dimensions (at most 1.8 u S here, with ATen's,
    # numpy's and OpenBLAS's vector code on or off): 8 u S bounds the error, not a fraction of the KL itself.
    sizes = kl_term_sizes(qs, ks, qt, kt, s_heads, t_heads, key_valid, a_s, a_t, temperature, causal)
    error, bound = (rows.double() - ref).abs(), 8 * 2.0**-24 * sizes
    assert (error <= bound).all(), (
        f"error {error.max():.3g}, {(error / bound).nan_to_num(0.0).max():.2f} of 8 u S"
    )
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = torch.autograd.grad((rows * weight).sum(), (qs, ks))
    want = torch.autograd.grad((ref * weight.double()).sum(), (qs, ks))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-6, rtol=1e-4)


def test_rows_without_keys_and_identical_models():
    qs, ks, qt, kt, key_valid = _inputs(9, heads_t=4, kv_t=2, d_t=8)
    key_valid[0] = 0  # an example with no real token: every row has no key, KL 0, no NaN
    s_heads, t_heads = _heads((0, 0), (1, 1), (2, 2), (3, 3))
    rows = attention_kl_rows(qs, ks, qs.detach(), ks.detach(), s_heads, t_heads, key_valid, 0.3, 0.3)
    assert torch.isfinite(rows).all() and rows[0].abs().max() == 0
    assert rows.abs().max() < 1e-5  # the same queries and keys on both sides
    rows.sum().backward()
    assert torch.isfinite(qs.grad).all() and torch.isfinite(ks.grad).all()


def test_kernels_use_no_atomics():
    """Deterministic backward by construction: no kernel accumulates with atomics (dQ and dK each have
    their own kernel, reducing over key and query blocks in a fixed order)."""
    import inspect

    from distill_lab.kernels import attention_kl, attention_probs

    for module in (attention_kl, attention_probs):
        assert "tl.atomic" not in inspect.getsource(module), module.__name__


@pytest.mark.skipif(
    not HAS_CUDA,
    reason="the interpreter runs programs one at a time: only a GPU can show run-to-run differences",
)
def test_backward_is_deterministic():
    qs, ks, qt, kt, key_valid = _inputs(33)
    s_heads, t_heads = _heads((0, 0), (1, 1), (2, 2), (3, 3))
    grads = []
    for _ in range(2):
        rows = attention_kl_rows(qs, ks, qt, kt, s_heads, t_heads, key_valid, 0.35, 0.3, 1.0, True)
        grads.append(torch.autograd.grad(rows.sum(), (qs, ks)))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_bf16_inputs_accumulate_in_float32():
    qs, ks, qt, kt, key_valid = _inputs(24, dtype=torch.bfloat16)
    s_heads, t_heads = _heads((0, 0), (1, 1), (2, 2), (3, 3))
    rows = attention_kl_rows(qs, ks, qt, kt, s_heads, t_heads, key_valid, 8**-0.5, 12**-0.5, 1.0, False)
    ref = reference_rows(qs, ks, qt, kt, s_heads, t_heads, key_valid, 8**-0.5, 12**-0.5, 1.0, False)
    assert rows.dtype == torch.float32 and torch.isfinite(rows).all()
    torch.testing.assert_close(rows.double(), ref, atol=2e-2, rtol=2e-2)  # bf16 tiles in the dot products
    dq, dk = torch.autograd.grad(rows.sum(), (qs, ks))
    assert dq.dtype == torch.bfloat16 and torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("loss", ["kl", "mse", "cosine"])
@pytest.mark.parametrize("matching", ["layerwise", "headwise", "selective"])
def test_fused_component_equals_the_block_path(matching, loss, causal):
    """AttentionDistillationLoss with fused=True (this kernel for KL, ``attention_probs`` for MSE and cosine)
    gives the block-wise PyTorch path's value, per-head details and gradients."""
    from distill_lab.losses import AttentionLoss
    from distill_lab.matching import Selective

    qs, ks, qt, kt, key_valid = _inputs(21, d_t=8)
    records = {}
    for fused in (True, False):
        q, k = qs.detach().clone().requires_grad_(), ks.detach().clone().requires_grad_()
        # the mask the model builds: key padding (and causal structure), which the block-wise path applies
        mask = key_valid.bool()[:, None, None, :].expand(-1, 1, 21, -1)
        if causal:
            mask = mask & torch.ones(21, 21, dtype=torch.bool, device=DEVICE).tril()
        student = QueryKey(q, k, 8**-0.5, mask, causal=causal)
        teacher = QueryKey(qt, kt, 8**-0.5, mask, causal=causal)
        mode = {
            "layerwise": "layerwise",
            "headwise": Headwise([[2, 0], [0, 1], [3, 3]]),
            "selective": Selective(heads=[[1, 2], [3, 0]]),
        }[matching]
        attention_loss = (
            AttentionLoss("kl", temperature=2.0) if loss == "kl" else AttentionLoss(loss)
        )  # as configured
        component = AttentionDistillationLoss(attention_loss, mode, [(0, 0)], block_size=8, fused=fused)
        component.check(4, 4)
        value, details = component({0: student}, {0: teacher}, key_valid)
        value.backward()
        records[fused] = (value.detach(), details, q.grad, k.grad)
    fused, plain = records[True], records[False]
    assert fused[0] > 0
    torch.testing.assert_close(fused[0], plain[0], atol=1e-6, rtol=1e-5)
    assert fused[1].keys() == plain[1].keys()
    for key in fused[1]:
        torch.testing.assert_close(fused[1][key], plain[1][key], atol=1e-6, rtol=1e-5)
    for a, b in zip(fused[2:], plain[2:], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("loss", ["kl", "mse", "cosine"])
def test_fused_kernels_apply_the_records_padding_without_an_attention_mask(loss, causal):
    """Called without ``attention_mask``, the loss still takes the keys that the models' own masks hide out of
    the softmax (the block-wise path applies each record's mask), and counts every query row, as the
    block-wise path does."""
    qs, ks, qt, kt, key_valid = _inputs(13, d_t=8)
    assert not key_valid.bool().all()  # an example with padding
    mask = key_valid.bool()[:, None, None, :].expand(-1, 1, 13, -1)
    if causal:
        mask = mask & torch.ones(13, 13, dtype=torch.bool, device=DEVICE).tril()
    values = []
    for fused in (True, False):
        student, teacher = (
            QueryKey(qs, ks, 8**-0.5, mask, causal=causal),
            QueryKey(qt, kt, 8**-0.5, mask, causal=causal),
        )
        component = AttentionDistillationLoss(loss, "layerwise", [(0, 0)], block_size=8, fused=fused)
        values.append(component({0: student}, {0: teacher}, None)[0])
    torch.testing.assert_close(values[0], values[1], atol=1e-6, rtol=1e-5)


def test_a_sliding_window_that_spans_every_key_keeps_the_fused_kernel():
    """A window at least as long as the keys hides nothing (Mistral's 4096 at shorter lengths): the fused
    kernel runs and equals the block-wise path. A shorter window is refused by fused=True, as the kernels
    apply no window."""
    qs, ks, qt, kt, key_valid = _inputs(21, d_t=8)
    mask = (
        key_valid.bool()[:, None, None, :].expand(-1, 1, 21, -1)
        & torch.ones(21, 21, dtype=torch.bool, device=DEVICE).tril()
    )
    values = []
    for fused in (True, False):
        student = QueryKey(qs, ks, 8**-0.5, mask, causal=True, sliding_window=21)
        teacher = QueryKey(qt, kt, 8**-0.5, mask, causal=True, sliding_window=4096)
        values.append(
            AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=fused)(
                {0: student}, {0: teacher}, key_valid
            )[0]
        )
    torch.testing.assert_close(values[0], values[1], atol=1e-6, rtol=1e-5)
    window = mask & torch.ones(21, 21, dtype=torch.bool, device=DEVICE).triu(-7)
    student = QueryKey(qs, ks, 8**-0.5, window, causal=True, sliding_window=8)
    teacher = QueryKey(qt, kt, 8**-0.5, window, causal=True, sliding_window=8)
    with pytest.raises(ValueError, match="sliding-window"):
        AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=True)(
            {0: student}, {0: teacher}, key_valid
        )


def test_fused_kernels_refuse_a_mask_beyond_padding_and_causal_structure():
    """The kernels apply key padding and the causal flag only: a record whose mask adds a bias (ALiBi-like)
    keeps the block-wise path (fused=True: an error), so the bias is never silently dropped."""
    qs, ks, qt, kt, key_valid = _inputs(9, d_t=8)
    bias = torch.where(key_valid.bool(), 0.5, float("-inf"))[:, None, None, :].expand(-1, 1, 9, -1)
    student, teacher = QueryKey(qs, ks, 8**-0.5, bias), QueryKey(qt, kt, 8**-0.5, bias)
    with pytest.raises(ValueError, match="more than key padding and causal structure"):
        AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=True)(
            {0: student}, {0: teacher}, key_valid
        )
    padding = torch.where(key_valid.bool(), 0.0, float("-inf"))[:, None, None, :].expand(-1, 1, 9, -1)
    fused, _ = AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=True)(
        {0: QueryKey(qs, ks, 8**-0.5, padding)}, {0: QueryKey(qt, kt, 8**-0.5, padding)}, key_valid
    )
    plain, _ = AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=False)(
        {0: QueryKey(qs, ks, 8**-0.5, padding)}, {0: QueryKey(qt, kt, 8**-0.5, padding)}, key_valid
    )
    torch.testing.assert_close(fused, plain, atol=1e-6, rtol=1e-5)  # an additive padding mask is accepted


def test_fused_true_where_it_cannot_apply_is_a_clear_error():
    qs, ks, qt, kt, key_valid = _inputs(8, heads_t=8, kv_t=4)
    component = AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=True)  # 8 -> 4 heads: averaged
    with pytest.raises(ValueError, match="averages heads"):
        component({0: QueryKey(qs, ks, 0.3)}, {0: QueryKey(qt, kt, 0.3)}, key_valid)
    component = AttentionDistillationLoss("mse_scores", "layerwise", [(0, 0)], fused=True)
    with pytest.raises(ValueError, match="only loss=kl, mse and cosine"):
        component({0: QueryKey(qs, ks, 0.3)}, {0: QueryKey(qs.detach(), ks.detach(), 0.3)}, key_valid)


def _far_apart(x, storage, dim, stride, offset):
    """``x`` copied into ``storage`` from ``offset`` on, dimension ``dim`` ``stride`` elements apart and
    the others packed, as a view (a leaf that requires grad where ``x`` does)."""
    strides, packed = [stride] * x.dim(), 1
    for d in reversed(range(x.dim())):
        if d != dim:
            strides[d], packed = packed, packed * x.shape[d]
    view = storage.as_strided(x.shape, strides, offset)
    view.copy_(x.detach())
    return view.requires_grad_(x.requires_grad)


# each case puts one dimension of all four inputs 2^30 elements apart, so the last example or head starts 2^31
# elements into the buffer; or their rows 2^24 apart, so that a head's 129 rows span more than 2^31 elements,
# which the wrapper copies (the kernels' offsets within one head's rows are 32-bit)
FAR_APART = {
    "batch": (0, 2**30, dict(batch=3)),
    "heads": (1, 2**30, dict(batch=1, heads=3)),
    "rows": (2, 2**24, dict(batch=1, length=129)),
}


def check_far_apart(case):
    """Every fused kernel, forward and backward, on inputs whose offsets pass 2^31 elements, against the same
    inputs packed; run in a child process by ``test_offsets_past_2_31_elements`` (a wrapped 32-bit offset
    reads outside the buffer, which may crash the process)."""
    from distill_lab.kernels.attention_probs import attention_probs_rows

    dim, stride, sizes = FAR_APART[case]
    batch, heads, length = sizes.get("batch", 2), sizes.get("heads", 2), sizes.get("length", 9)
    try:  # 8 GiB of address space; only the pages written here are ever touched (a GPU allocates it all)
        storage = torch.empty(2**31 + 2**16, device=DEVICE)
    except (RuntimeError, MemoryError) as error:
        print(f"SKIP: no 8 GiB buffer here ({error})")
        return
    packed = _inputs(
        length, heads_s=heads, kv_s=heads, heads_t=heads, kv_t=heads, d_s=16, d_t=16, batch=batch
    )
    far = [_far_apart(x, storage, dim, stride, 4096 * i) for i, x in enumerate(packed[:4])] + [packed[4]]
    s_heads, t_heads = _heads(*[(heads - 1 - h, h) for h in range(heads)])
    for loss in ("kl", "mse", "cosine"):
        results = []
        for qs, ks, qt, kt, key_valid in (packed, far):
            args = (qs, ks, qt, kt, s_heads, t_heads, key_valid, 0.25, 0.3)
            rows = (
                attention_kl_rows(*args, 1.0, True)
                if loss == "kl"
                else attention_probs_rows(loss, *args, True)
            )
            results.append((rows, *torch.autograd.grad(rows.sum(), (qs, ks))))
        for want, got in zip(*results, strict=True):
            torch.testing.assert_close(
                got, want, atol=1e-6, rtol=1e-5, msg=lambda m, loss=loss: f"{case}, {loss}: {m}"
            )
    print("OK")


@pytest.mark.parametrize("case", list(FAR_APART))
def test_offsets_past_2_31_elements(case):
    """Offsets into whole tensors are 64-bit: the kernels give the same rows and gradients when the inputs'
    last example, head or rows lie 2^31 elements or more into their buffer (as in B=16, 64 heads, L=32k,
    D=128) as when they are packed. On CPU the 8 GiB buffer is address space only: only the pages written
    are ever touched. (The outputs' offsets, which the wrappers allocate, are checked in
    tests/test_kernels_compile.py.)"""
    code = f"import test_kernels; test_kernels.check_far_apart({case!r})"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=600
    )
    output = done.stdout + done.stderr
    if "SKIP:" in done.stdout:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), (
        f"exit {done.returncode}\n{output[-4000:]}"
    )


def test_layout_keeps_offsets_within_a_head_32_bit():
    """The kernels' offsets within one head's (L, d) matrix are 32-bit: a head whose rows span 2^31
    elements or more is copied (to rows d apart), and one whose L x d reaches 2^31 is refused."""
    packed = torch.empty(2, 4, 300, 64, device="meta")
    heads_inner = torch.empty(2, 300, 4, 64, device="meta").transpose(1, 2)  # (B, L, H, d) as models make it
    assert _kernel_layout(packed) is packed and _kernel_layout(heads_inner) is heads_inner
    wide = torch.empty(2**17, 1, 1, 2**14 + 64, device="meta").permute(1, 2, 0, 3)[
        ..., :64
    ]  # rows 2^14 + 64 apart
    copied = _kernel_layout(wide)
    assert copied.is_contiguous() and copied.shape == wide.shape
    assert _kernel_layout(packed.transpose(-1, -2)).is_contiguous()  # d not unit-stride
    with pytest.raises(ValueError, match="2\\^31 elements per head"):
        _kernel_layout(torch.empty(1, 1, 2**24, 128, device="meta"))


@pytest.mark.parametrize(
    "student, teacher",
    [("bfloat16", "bfloat16"), ("float32", "float32"), ("bfloat16", "float32"), ("float32", "bfloat16")],
)
def test_each_float32_side_gets_ieee_dot_products(student, teacher):
    """The launch's dot-product precision is chosen per side: IEEE (full float32) for a float32 side, which
    TF32 would round, whatever the other side's dtype (e.g. a float32 teacher beside a bf16 student)."""
    s_dtype, t_dtype = getattr(torch, student), getattr(torch, teacher)
    qs, ks = (torch.empty(2, 4, 40, 64, device="meta", dtype=s_dtype) for _ in range(2))
    qt, kt = (torch.empty(2, 4, 40, 64, device="meta", dtype=t_dtype) for _ in range(2))
    key_valid = torch.empty(2, 40, device="meta", dtype=torch.int32)
    const = _meta(qs, ks, qt, kt, key_valid, 4, 40, 40, 64, 64, 0.125, 0.125, True)["const"]
    assert {k: v for k, v in const.items() if k.startswith("IEEE")} == {
        "IEEE_S": student == "float32",
        "IEEE_T": teacher == "float32",
    }
