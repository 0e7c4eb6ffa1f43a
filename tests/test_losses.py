"""Tests for ``distill_lab.losses``: attention losses (MSE, KL, cosine), output KD and the combined objective.

Every loss is checked against a naive float64 reference written below with per-row loops that does not use
any of the library's helpers. Attention maps are random softmaxed scores; a padding mask ``(B, Lk)`` marks
real tokens with 1, and a padded position is excluded both as a query row and as a key column. Queries are the
last ``Lq`` key positions (``Lq < Lk`` is a decoder with cached keys).

Convention shared by the library and the KL reference: an exact zero probability is a ``-inf`` score, a
constant, so it stays zero at any temperature and its gradient is 0 (the one-sided derivative there is
``1/S`` at T = 1 and infinite for T > 1, so there is no better choice).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from distill_lab.losses import (
    AttentionLoss,
    attention_cosine,
    attention_kl,
    attention_mse,
    distillation_objective,
    get_attention_loss,
    kd_loss,
)

torch.manual_seed(0)
SEED = 1234
F64 = torch.float64
LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # the library's floor for a student's log-probability

LIB = {"mse": attention_mse, "kl": attention_kl, "cosine": attention_cosine}


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: intra-op threads only add synchronisation (about 10 ms an op on a busy
    2-core machine, against 10 us on one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def gen() -> torch.Generator:
    """A freshly seeded generator per test, so that no result depends on which tests ran before."""
    return torch.Generator().manual_seed(SEED)


# ---------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------


def make_mask(batch: int, k_len: int, lengths: list[int] | None, side: str = "right") -> torch.Tensor | None:
    """``(B, Lk)`` long mask with ``lengths[b]`` real tokens, padded on ``side``; None without lengths."""
    if lengths is None:
        return None
    assert len(lengths) == batch
    mask = torch.zeros(batch, k_len, dtype=torch.long)
    for b, n in enumerate(lengths):
        if side == "right":
            mask[b, :n] = 1
        else:
            mask[b, k_len - n :] = 1
    return mask


def random_maps(shape, gen, mask=None, causal=False, scale=2.0) -> torch.Tensor:
    """Float64 attention probabilities ``(B, H, Lq, Lk)``; queries are the last Lq key positions.

    Scores are set to -inf at padded keys and (causal) above the diagonal before the softmax, so those entries
    are exactly 0. Rows with no allowed key (padded queries under causal left padding) are uniform.
    """
    _, _, q_len, k_len = shape
    scores = torch.randn(shape, generator=gen, dtype=F64) * scale
    allowed = torch.ones(shape, dtype=torch.bool)
    if causal:
        q_pos = torch.arange(q_len)[:, None] + (k_len - q_len)
        allowed = allowed & (torch.arange(k_len)[None, :] <= q_pos)
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    scores = scores.masked_fill(~allowed, -math.inf)
    scores = scores.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return torch.softmax(scores, dim=-1)


def masked_region(shape, mask) -> torch.Tensor:
    """True at every (b, h, q, k) that is a padded query row or a padded key column."""
    _, _, q_len, k_len = shape
    keys = mask.bool()
    rows = keys[:, k_len - q_len :]
    return ~(rows[:, None, :, None] & keys[:, None, None, :]).expand(shape)


def add_garbage(maps, mask, gen, scale=1.0) -> torch.Tensor:
    """Overwrite the masked region with random non-negative junk (rows no longer sum to 1 there)."""
    if mask is None:
        return maps
    junk = torch.rand(maps.shape, generator=gen, dtype=maps.dtype) * scale
    return torch.where(masked_region(maps.shape, mask), junk, maps)


def make_pair(shape, lengths, side, causal, gen, garbage=True):
    """Independent student and teacher maps (float64) and their mask, junk in the masked region."""
    mask = make_mask(shape[0], shape[-1], lengths, side)
    student = random_maps(shape, gen, mask, causal)
    teacher = random_maps(shape, gen, mask, causal)
    if garbage:
        student, teacher = add_garbage(student, mask, gen), add_garbage(teacher, mask, gen)
    return student, teacher, mask


# ---------------------------------------------------------------------------------------------------------
# Naive float64 references
# ---------------------------------------------------------------------------------------------------------


def valid_positions(mask, b: int, q_len: int, k_len: int) -> tuple[list[int], torch.Tensor]:
    """Valid query rows of example b and its valid key indices."""
    keys = list(range(k_len)) if mask is None else [k for k in range(k_len) if mask[b, k] != 0]
    queries = [q for q in range(q_len) if (k_len - q_len + q) in keys]
    return queries, torch.tensor(keys, dtype=torch.long)


def ref_mse(student, teacher, mask=None):
    """Mean of (s - t)^2 over every (batch, head, valid query, valid key) element."""
    s, t = student.to(F64), teacher.to(F64)
    batch, heads, q_len, k_len = s.shape
    total, count = s.new_zeros(()), 0
    for b in range(batch):
        queries, keys = valid_positions(mask, b, q_len, k_len)
        for h in range(heads):
            for q in queries:
                diff = s[b, h, q, keys] - t[b, h, q, keys]
                total = total + (diff * diff).sum()
                count += len(keys)
    return total / max(count, 1)


def ref_tempered_log(p, temperature):
    """Which entries of the row ``p`` are positive, and ``log softmax(log(p) / T)`` over those entries."""
    positive = p > 0
    scores = torch.log(p[positive]) / temperature
    return positive, scores - torch.logsumexp(scores, dim=0)


def ref_kl_row(s_row, t_row, temperature, clamp=False):
    """``T^2 * KL(t_T || s_T)`` for one row (already restricted to the valid keys), skipping t_T == 0 terms.

    With ``clamp`` the student's log-probability is floored at LOG_TINY (what the library does where the
    student has zero mass and the teacher does not); without it such a row gives +inf.
    """
    t_pos, log_t = ref_tempered_log(t_row, temperature)
    s_pos, log_s_pos = ref_tempered_log(s_row, temperature)
    log_s = torch.full_like(s_row, -math.inf)
    log_s[s_pos] = log_s_pos
    log_s_on_t = log_s[t_pos]
    if clamp:
        log_s_on_t = log_s_on_t.clamp_min(LOG_TINY)
    return temperature**2 * (log_t.exp() * (log_t - log_s_on_t)).sum()


def ref_kl(student, teacher, mask=None, temperature=1.0, clamp=False):
    """Mean of the row KL over (batch, head, valid query); a row whose teacher has no mass on the valid
    keys has no target and is left out."""
    s, t = student.to(F64), teacher.to(F64)
    batch, heads, q_len, k_len = s.shape
    total, count = s.new_zeros(()), 0
    for b in range(batch):
        queries, keys = valid_positions(mask, b, q_len, k_len)
        for h in range(heads):
            for q in queries:
                t_row = t[b, h, q, keys]
                if not (t_row > 0).any():
                    continue
                total = total + ref_kl_row(s[b, h, q, keys], t_row, temperature, clamp)
                count += 1
    return total / max(count, 1)


def ref_cosine(student, teacher, mask=None):
    """Mean over valid rows of 1 - cos(s_row, t_row), rows restricted to the valid keys."""
    s, t = student.to(F64), teacher.to(F64)
    batch, heads, q_len, k_len = s.shape
    total, count = s.new_zeros(()), 0
    for b in range(batch):
        queries, keys = valid_positions(mask, b, q_len, k_len)
        for h in range(heads):
            for q in queries:
                s_row, t_row = s[b, h, q, keys], t[b, h, q, keys]
                cos = (s_row * t_row).sum() / (
                    torch.sqrt((s_row * s_row).sum()) * torch.sqrt((t_row * t_row).sum())
                )
                total = total + (1.0 - cos)
                count += 1
    return total / max(count, 1)


REF = {"mse": ref_mse, "kl": ref_kl, "cosine": ref_cosine}


def ref_kd(student_logits, teacher_logits, labels, temperature, alpha):
    """``alpha * CE + (1 - alpha) * T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged per position."""
    num_classes = student_logits.shape[-1]
    s = student_logits.to(F64).reshape(-1, num_classes)
    t = teacher_logits.to(F64).reshape(-1, num_classes)
    flat_labels = None if labels is None else labels.reshape(-1)
    ce_terms, kl_terms = [], []
    for i in range(s.shape[0]):
        if flat_labels is not None and flat_labels[i] == -100:
            continue
        p_t = torch.exp(t[i] / temperature) / torch.exp(t[i] / temperature).sum()
        p_s = torch.exp(s[i] / temperature) / torch.exp(s[i] / temperature).sum()
        kl_terms.append((p_t * (torch.log(p_t) - torch.log(p_s))).sum())
        if flat_labels is not None:
            p = torch.exp(s[i]) / torch.exp(s[i]).sum()
            ce_terms.append(-torch.log(p[flat_labels[i]]))
    if not kl_terms:
        return s.new_zeros(())
    kl = temperature**2 * torch.stack(kl_terms).mean()
    if flat_labels is None:
        return kl
    return alpha * torch.stack(ce_terms).mean() + (1.0 - alpha) * kl


# ---------------------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------------------

LOSS_CASES = [
    pytest.param("mse", {}, id="mse"),
    pytest.param("kl", {"temperature": 1.0}, id="kl-T1"),
    pytest.param("kl", {"temperature": 2.5}, id="kl-T2.5"),
    pytest.param("cosine", {}, id="cosine"),
]

# shape (B, H, Lq, Lk), lengths (None: no mask), padding side
MAP_CASES = [
    pytest.param((3, 5, 17, 17), None, "right", id="3x5x17"),
    pytest.param((3, 5, 17, 17), [17, 9, 4], "right", id="3x5x17-pad"),
    pytest.param((1, 1, 1, 1), None, "right", id="1x1x1"),
    pytest.param((1, 1, 1, 1), [1], "right", id="1x1x1-mask"),
    pytest.param((2, 3, 7, 7), None, "right", id="2x3x7"),
    pytest.param((2, 3, 7, 7), [7, 3], "left", id="2x3x7-leftpad"),
    pytest.param((2, 2, 4, 9), [9, 6], "left", id="2x2x4of9-cached-leftpad"),
]

TOL = {
    F64: {"rtol": 1e-10, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-7},
}


def ref_loss(name, student, teacher, mask, kw, **extra):
    return REF[name](student, teacher, mask, **kw, **extra)


# ---------------------------------------------------------------------------------------------------------
# 1. Values against the float64 reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("shape", "lengths", "side"), MAP_CASES)
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_attention_loss_matches_reference(name, kw, shape, lengths, side, causal, dtype, gen):
    student, teacher, mask = make_pair(shape, lengths, side, causal, gen)
    student, teacher = student.to(dtype), teacher.to(dtype)
    if causal:  # the upper triangle of the valid region is exactly zero
        region = torch.ones(shape, dtype=torch.bool) if mask is None else ~masked_region(shape, mask)
        upper = torch.ones(shape[-2:], dtype=torch.bool).triu(shape[-1] - shape[-2] + 1)
        assert shape[-1] == 1 or (student[region & upper] == 0).all()
    got = LIB[name](student, teacher, mask, **kw)
    assert got.shape == ()
    assert got.dtype == dtype
    expected = ref_loss(name, student, teacher, mask, kw)  # on the very values given, upcast to float64
    assert torch.isfinite(got)
    torch.testing.assert_close(got.to(F64), expected, **TOL[dtype])
    if shape != (1, 1, 1, 1):
        assert expected > 1e-4  # independent maps: a non-trivial value was compared


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_low_precision_maps_are_finite_float32_and_match_reference(name, kw, causal, dtype, gen):
    shape, lengths = (3, 5, 17, 17), [17, 9, 4]
    student, teacher, mask = make_pair(shape, lengths, "right", causal, gen)
    student, teacher = student.to(dtype), teacher.to(dtype)
    got = LIB[name](student, teacher, mask, **kw)
    assert got.dtype == torch.float32
    assert torch.isfinite(got)
    expected = ref_loss(name, student.to(F64), teacher.to(F64), mask, kw)  # on the rounded maps
    torch.testing.assert_close(got.to(F64), expected, rtol=1e-5, atol=1e-7)
    per_head = LIB[name](student, teacher, mask, per_head=True, **kw)
    assert per_head.dtype == torch.float32 and torch.isfinite(per_head).all()


@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_bf16_causal_maps_give_no_nan_in_value_or_gradient(name, kw, gen):
    shape, lengths = (2, 3, 9, 9), [9, 5]
    student, teacher, mask = make_pair(shape, lengths, "left", causal=True, gen=gen)
    for m in (None, mask):
        s = student.to(torch.bfloat16).requires_grad_(True)
        t = teacher.to(torch.bfloat16)
        assert (s == 0).sum() > s.numel() // 4  # many exact zeros
        loss = LIB[name](s, t, m, **kw)
        loss.backward()
        assert torch.isfinite(loss)
        assert s.grad is not None and s.grad.dtype == torch.bfloat16
        assert torch.isfinite(s.grad).all()
        assert s.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------
# 2. Gradients
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_gradcheck_attention_loss(name, kw, causal, gen):
    """gradcheck perturbs every entry, zeros too, and KL is not differentiable at a zero student entry, so
    for KL the causal (zero-filled) map is the teacher's and the student's map is strictly positive."""
    shape = (2, 2, 5, 5)
    mask = make_mask(2, 5, [5, 3], "right")
    student = add_garbage(random_maps(shape, gen, mask, causal=causal and name != "kl"), mask, gen)
    teacher = add_garbage(random_maps(shape, gen, mask, causal=causal), mask, gen)
    if name == "kl":
        assert (student[~masked_region(shape, mask)] > 1e-4).all()
    s = student.clone().requires_grad_(True)

    def fn(x):
        return LIB[name](x, teacher, mask, **kw)

    assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-6, rtol=1e-4)


GRAD_CASES = [
    pytest.param((3, 5, 17, 17), [17, 9, 4], "right", False, id="3x5x17-pad"),
    pytest.param((2, 3, 7, 7), [7, 3], "left", True, id="2x3x7-leftpad-causal"),
    pytest.param((2, 2, 4, 9), [9, 6], "left", True, id="2x2x4of9-cached-causal"),
]


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("shape", "lengths", "side", "causal"), GRAD_CASES)
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_gradient_matches_reference_autograd(name, kw, shape, lengths, side, causal, dtype, gen):
    """Library gradient w.r.t. the student map equals autograd through the reference, zero entries included
    (both treat an exact zero as a constant -inf score) and zero on the masked region."""
    student, teacher, mask = make_pair(shape, lengths, side, causal, gen)
    student, teacher = student.to(dtype), teacher.to(dtype)
    s_lib = student.clone().requires_grad_(True)
    (g_lib,) = torch.autograd.grad(LIB[name](s_lib, teacher, mask, **kw), s_lib)
    s_ref = student.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref_loss(name, s_ref, teacher, mask, kw), s_ref)
    assert g_lib.dtype == dtype
    assert torch.isfinite(g_lib).all()
    scale = g_ref.abs().max().item()
    tol = {"rtol": 1e-9, "atol": 1e-12 * scale} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-6 * scale}
    torch.testing.assert_close(g_lib, g_ref, **tol)
    assert (g_lib[masked_region(shape, mask)] == 0).all()
    if name == "kl" and causal:
        assert (g_lib[student == 0] == 0).all()


@pytest.mark.parametrize("labels_kind", ["some-ignored", "none"])
def test_gradcheck_kd_loss(labels_kind, gen):
    s = torch.randn(2, 3, 5, generator=gen, dtype=F64).requires_grad_(True)
    t = torch.randn(2, 3, 5, generator=gen, dtype=F64).requires_grad_(True)
    labels = None
    if labels_kind == "some-ignored":
        labels = torch.tensor([[0, -100, 4], [2, 3, -100]])

    def fn(x, y):
        return kd_loss(x, y, labels, temperature=2.5, alpha=0.3)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_kd_loss_gradient_matches_reference_autograd(dtype, gen):
    student = torch.randn(3, 4, 6, generator=gen, dtype=F64).to(dtype)
    teacher = torch.randn(3, 4, 6, generator=gen, dtype=F64).mul(3).to(dtype)
    labels = torch.randint(0, 6, (3, 4), generator=gen)
    labels[0, 1] = labels[2, 3] = -100
    s_lib = student.clone().requires_grad_(True)
    (g_lib,) = torch.autograd.grad(kd_loss(s_lib, teacher, labels, 2.0, 0.4), s_lib)
    s_ref = student.clone().requires_grad_(True)
    (g_ref,) = torch.autograd.grad(ref_kd(s_ref, teacher, labels, 2.0, 0.4), s_ref)
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == F64 else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(g_lib, g_ref, **tol)
    assert (g_lib[0, 1] == 0).all() and (g_lib[2, 3] == 0).all()  # ignored positions get no gradient


# ---------------------------------------------------------------------------------------------------------
# 3. Invariances and edge cases
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths", [None, [7, 3, 5], [7, 0, 2]], ids=["nopad", "pad", "pad-empty"])
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_identical_maps_give_zero(name, kw, lengths, causal, dtype, gen):
    shape = (3, 2, 7, 7)
    maps, _, mask = make_pair(shape, lengths, "right", causal, gen)
    maps = maps.to(dtype)
    loss = LIB[name](maps, maps.clone(), mask, **kw)
    assert torch.isfinite(loss)
    assert loss.abs() < 1e-7
    per_head = LIB[name](maps, maps.clone(), mask, per_head=True, **kw)
    assert (per_head.abs() < 1e-7).all()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_padded_batch_is_weighted_mean_of_unpadded_examples(name, kw, causal, side, gen):
    """Each example alone, unpadded, then combined with weights: valid elements (MSE) or valid rows."""
    heads, length, lengths = 3, 17, [17, 9, 4]
    student, teacher, mask = make_pair((3, heads, length, length), lengths, side, causal, gen)
    losses, weights = [], []
    for b, n in enumerate(lengths):
        keep = slice(0, n) if side == "right" else slice(length - n, length)
        s_b, t_b = student[b : b + 1, :, keep, keep], teacher[b : b + 1, :, keep, keep]
        torch.testing.assert_close(s_b.sum(-1), torch.ones(1, heads, n, dtype=F64))  # a proper map
        losses.append(LIB[name](s_b, t_b, **kw))
        weights.append(heads * n * n if name == "mse" else heads * n)
    expected = sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights)
    got = LIB[name](student, teacher, mask, **kw)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    # with equal lengths the padded batch is the plain batch
    same = make_mask(3, length, [length] * 3)
    torch.testing.assert_close(LIB[name](student, teacher, same, **kw), LIB[name](student, teacher, **kw))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_garbage_in_masked_region_changes_neither_loss_nor_gradient(name, kw, causal, gen):
    shape = (3, 2, 8, 8)
    student, teacher, mask = make_pair(shape, [8, 5, 2], "left", causal, gen, garbage=False)
    results = []
    for garbage in (False, True):
        s = add_garbage(student, mask, gen, scale=3.0) if garbage else student
        t = add_garbage(teacher, mask, gen, scale=3.0) if garbage else teacher
        assert garbage == (not torch.equal(s, student))
        s = s.clone().requires_grad_(True)
        loss = LIB[name](s, t, mask, **kw)
        (grad,) = torch.autograd.grad(loss, s)
        results.append((loss, grad))
    (clean, g_clean), (dirty, g_dirty) = results
    torch.testing.assert_close(dirty, clean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g_dirty, g_clean, rtol=1e-12, atol=1e-14)
    assert (g_dirty[masked_region(shape, mask)] == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_fully_padded_example_contributes_nothing(name, kw, causal, gen):
    shape = (3, 2, 7, 7)
    student, teacher, mask = make_pair(shape, [7, 0, 4], "right", causal, gen)
    s = student.clone().requires_grad_(True)
    loss = LIB[name](s, teacher, mask, **kw)
    loss.backward()
    keep = [0, 2]
    without = LIB[name](student[keep], teacher[keep], mask[keep], **kw)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, without, rtol=1e-12, atol=1e-14)
    assert torch.isfinite(s.grad).all() and (s.grad[1] == 0).all()
    assert torch.isfinite(LIB[name](student, teacher, mask, per_head=True, **kw)).all()

    # a batch with no real token at all: 0, no NaN, zero gradient
    s = student.clone().requires_grad_(True)
    empty = torch.zeros_like(mask)
    loss = LIB[name](s, teacher, empty, **kw)
    loss.backward()
    assert loss == 0
    assert torch.isfinite(s.grad).all() and (s.grad == 0).all()
    per_head = LIB[name](student, teacher, empty, per_head=True, **kw)
    assert per_head.shape == (2,) and (per_head == 0).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("lengths", [None, [7, 5]], ids=["nopad", "pad"])
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_per_head(name, kw, lengths, causal, gen):
    heads = 4
    student, teacher, mask = make_pair((2, heads, 7, 7), lengths, "left", causal, gen)
    per_head = LIB[name](student, teacher, mask, per_head=True, **kw)
    assert per_head.shape == (heads,)
    # masks are per example, so every head has the same count and the mean of heads is the scalar loss
    torch.testing.assert_close(
        per_head.mean(), LIB[name](student, teacher, mask, **kw), rtol=1e-12, atol=1e-14
    )
    for h in range(heads):
        expected = ref_loss(name, student[:, h : h + 1], teacher[:, h : h + 1], mask, kw)
        torch.testing.assert_close(per_head[h], expected, rtol=1e-10, atol=1e-12)
    assert len(set(per_head.tolist())) == heads  # really per head, not one value repeated


@pytest.mark.parametrize(
    "mask_dtype", [torch.bool, torch.int32, torch.float32], ids=["bool", "int32", "float"]
)
@pytest.mark.parametrize(("name", "kw"), LOSS_CASES)
def test_mask_dtype_does_not_matter(name, kw, mask_dtype, gen):
    student, teacher, mask = make_pair((3, 2, 6, 6), [6, 4, 1], "right", False, gen)
    expected = LIB[name](student, teacher, mask, **kw)
    torch.testing.assert_close(
        LIB[name](student, teacher, mask.to(mask_dtype), **kw), expected, rtol=0, atol=0
    )


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_student_zero_where_teacher_positive_is_finite(temperature):
    teacher = torch.tensor([[[[0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]]]], dtype=F64)
    student = torch.tensor([[[[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]]], dtype=F64)
    s = student.clone().requires_grad_(True)
    loss = attention_kl(s, teacher, temperature=temperature)
    loss.backward()
    assert torch.isfinite(loss)
    assert loss > 10  # large: each zero costs about -t_T * LOG_TINY
    assert math.isinf(ref_kl(student, teacher, temperature=temperature).item())  # mathematically infinite
    expected = ref_kl(student, teacher, temperature=temperature, clamp=True)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    assert torch.isfinite(s.grad).all()
    for dtype in (torch.float32, torch.bfloat16):
        low = attention_kl(student.to(dtype), teacher.to(dtype), temperature=temperature)
        assert torch.isfinite(low) and low > 10


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_student_without_mass_on_valid_keys_is_large_and_padding_independent(temperature):
    """A student row whose mass is all on padded keys has zero mass wherever the teacher has mass: like a
    single zero, it costs about -LOG_TINY per unit of teacher mass, however many padded keys there are."""
    values = []
    for pad in (2, 6):
        k_len = 3 + pad
        mask = torch.tensor([[1] * 3 + [0] * pad])
        teacher = torch.zeros(1, 1, k_len, k_len, dtype=F64)
        teacher[..., :3] = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
        student = teacher.clone()
        student[0, 0, 1] = 0.0
        student[0, 0, 1, 3:] = 1.0 / pad  # row 1: no mass on a valid key
        s = student.clone().requires_grad_(True)
        loss = attention_kl(s, teacher, mask, temperature=temperature)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
        expected = ref_kl(student, teacher, mask, temperature=temperature, clamp=True)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        values.append(loss)
    assert values[0] > 10
    torch.testing.assert_close(values[0], values[1], rtol=1e-12, atol=0)


def test_kl_row_where_teacher_has_no_mass_on_valid_keys_is_left_out(gen):
    student, teacher, mask = make_pair((1, 2, 5, 5), [4], "right", False, gen, garbage=False)
    teacher = teacher.clone()
    teacher[0, 0, 2] = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0], dtype=F64)  # all mass on the padded key
    loss = attention_kl(student, teacher, mask)
    expected = ref_kl(student, teacher, mask)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    n_rows = 2 * 4 - 1
    total = sum(
        ref_kl_row(student[0, h, q, :4], teacher[0, h, q, :4], 1.0)
        for h in range(2)
        for q in range(4)
        if (h, q) != (0, 2)
    )
    torch.testing.assert_close(loss, total / n_rows, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_kl_nonpositive_temperature_raises(temperature, gen):
    maps = random_maps((1, 1, 3, 3), gen)
    with pytest.raises(ValueError, match="temperature"):
        attention_kl(maps, maps, temperature=temperature)
    with pytest.raises(ValueError, match="temperature must be positive"):
        AttentionLoss(
            "kl", temperature=temperature
        )  # when it is made: before any path (the fused kernel's too)


@pytest.mark.parametrize("name", ["mse", "kl", "cosine"])
def test_shape_mismatch_raises(name, gen):
    a = random_maps((2, 3, 5, 5), gen)
    for b in (random_maps((2, 2, 5, 5), gen), random_maps((2, 3, 6, 6), gen), random_maps((1, 3, 5, 5), gen)):
        with pytest.raises(ValueError, match="differ in shape"):
            LIB[name](a, b)
        with pytest.raises(ValueError, match="differ in shape"):
            LIB[name](b, a)


@pytest.mark.parametrize("name", ["mse", "kl", "cosine"])
def test_wrong_mask_shape_raises(name, gen):
    maps = random_maps((2, 3, 5, 5), gen)
    bad_masks = [
        torch.ones(2, 6),  # wrong length
        torch.ones(3, 5),  # wrong batch
        torch.ones(5),  # 1-D
        torch.ones(2, 1, 5),  # 3-D
        torch.ones(2, 1, 1, 5),  # the 4-D broadcast form
    ]
    for mask in bad_masks:
        with pytest.raises(ValueError, match="attention_mask"):
            LIB[name](maps, maps, mask)


@pytest.mark.parametrize("name", ["mse", "kl", "cosine"])
def test_maps_that_are_not_4d_raise(name, gen):
    maps = random_maps((1, 2, 4, 4), gen)
    with pytest.raises(ValueError, match=r"\(batch, heads, query, key\)"):
        LIB[name](maps[0], maps[0])


# ---------------------------------------------------------------------------------------------------------
# 4. Registry, module wrapper, objective
# ---------------------------------------------------------------------------------------------------------


def test_get_attention_loss():
    assert get_attention_loss("mse") is attention_mse
    assert get_attention_loss("kl") is attention_kl
    assert get_attention_loss("cosine") is attention_cosine
    with pytest.raises(ValueError, match="nope") as info:
        get_attention_loss("nope")
    message = str(info.value)
    for choice in ("cosine", "kl", "mse"):
        assert choice in message


@pytest.mark.parametrize("lengths", [None, [6, 3]], ids=["nopad", "pad"])
def test_attention_loss_module_binds_options(lengths, gen):
    student, teacher, mask = make_pair((2, 3, 6, 6), lengths, "right", True, gen)
    module = AttentionLoss("kl", temperature=2.0)
    expected = attention_kl(student, teacher, mask, temperature=2.0)
    torch.testing.assert_close(module(student, teacher, mask), expected, rtol=0, atol=0)
    assert not torch.allclose(expected, attention_kl(student, teacher, mask))  # the temperature was used
    torch.testing.assert_close(
        module(student, teacher, mask, per_head=True),
        attention_kl(student, teacher, mask, temperature=2.0, per_head=True),
        rtol=0,
        atol=0,
    )
    assert "'kl'" in repr(module) and "temperature=2.0" in repr(module)
    for name in ("mse", "cosine"):
        torch.testing.assert_close(
            AttentionLoss(name)(student, teacher, mask), LIB[name](student, teacher, mask)
        )
    with pytest.raises(ValueError, match="valid choices"):
        AttentionLoss("nope")


def test_distillation_objective():
    out = torch.tensor(2.0, dtype=F64, requires_grad=True)
    att = torch.tensor(5.0, dtype=F64, requires_grad=True)
    total = distillation_objective(out, att, 0.3)
    torch.testing.assert_close(total, 0.7 * out.detach() + 0.3 * att.detach(), rtol=1e-15, atol=0)
    total.backward()
    assert out.grad.item() == pytest.approx(0.7) and att.grad.item() == pytest.approx(0.3)
    assert distillation_objective(out, att, 0.0).item() == 2.0
    assert distillation_objective(out, att, 1.0).item() == 5.0
    assert distillation_objective(out, att).item() == pytest.approx(0.7 * 2.0 + 0.3 * 5.0)  # default 0.3
    for bad in (-0.01, 1.01, 2.0):
        with pytest.raises(ValueError, match="attention_weight"):
            distillation_objective(out, att, bad)


# ---------------------------------------------------------------------------------------------------------
# 5. Output distillation (kd_loss)
# ---------------------------------------------------------------------------------------------------------


def make_labels(shape, num_classes, kind, gen):
    if kind == "none":
        return None
    labels = torch.randint(0, num_classes, shape, generator=gen)
    if kind == "some-ignored":
        flat = labels.view(-1)
        flat[::3] = -100
    return labels


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
@pytest.mark.parametrize("labels_kind", ["none", "all-labelled", "some-ignored"])
@pytest.mark.parametrize("shape", [(4, 7), (2, 5, 11)], ids=["2d", "3d"])
def test_kd_loss_matches_reference(shape, labels_kind, temperature, alpha, dtype, gen):
    student = (torch.randn(shape, generator=gen, dtype=F64) * 2).to(dtype)
    teacher = (torch.randn(shape, generator=gen, dtype=F64) * 2).to(dtype)
    labels = make_labels(shape[:-1], shape[-1], labels_kind, gen)
    got = kd_loss(student, teacher, labels, temperature=temperature, alpha=alpha)
    assert got.shape == () and got.dtype == dtype
    expected = ref_kd(student, teacher, labels, temperature, alpha)
    torch.testing.assert_close(got.to(F64), expected, **TOL[dtype])
    assert expected > 1e-3


def test_kd_loss_defaults_and_identical_logits(gen):
    student = torch.randn(3, 5, 9, generator=gen, dtype=F64)
    teacher = torch.randn(3, 5, 9, generator=gen, dtype=F64)
    labels = make_labels((3, 5), 9, "some-ignored", gen)
    torch.testing.assert_close(kd_loss(student, teacher, labels), ref_kd(student, teacher, labels, 3.0, 0.3))
    assert kd_loss(student, student.clone()).abs() < 1e-12  # labels=None: only the KL term
    kd_only = kd_loss(student, student.clone(), labels, alpha=0.0)
    assert kd_only.abs() < 1e-12


def test_kd_loss_low_precision_is_finite_float32(gen):
    student = torch.randn(2, 6, 50, generator=gen) * 8
    teacher = torch.randn(2, 6, 50, generator=gen) * 8
    labels = make_labels((2, 6), 50, "some-ignored", gen)
    for dtype in (torch.bfloat16, torch.float16):
        s, t = student.to(dtype).requires_grad_(True), teacher.to(dtype)
        got = kd_loss(s, t, labels, temperature=2.0, alpha=0.5)
        got.backward()
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert torch.isfinite(s.grad).all()
        expected = ref_kd(s.detach().to(F64), t.to(F64), labels, 2.0, 0.5)
        torch.testing.assert_close(got.to(F64), expected, rtol=1e-5, atol=1e-6)


def test_kd_loss_all_labels_ignored_is_zero(gen):
    student = torch.randn(2, 4, 5, generator=gen).requires_grad_(True)
    teacher = torch.randn(2, 4, 5, generator=gen)
    labels = torch.full((2, 4), -100)
    loss = kd_loss(student, teacher, labels)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert torch.isfinite(student.grad).all() and (student.grad == 0).all()


@pytest.mark.parametrize("labels_kind", ["all-labelled", "some-ignored"])
def test_kd_loss_alpha_one_is_cross_entropy(labels_kind, gen):
    student = torch.randn(3, 4, 7, generator=gen)
    teacher = torch.randn(3, 4, 7, generator=gen)
    labels = make_labels((3, 4), 7, labels_kind, gen)
    got = kd_loss(student, teacher, labels, temperature=4.0, alpha=1.0)
    expected = F.cross_entropy(student.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # the teacher no longer matters
    torch.testing.assert_close(kd_loss(student, teacher * 5, labels, temperature=4.0, alpha=1.0), got)


def test_kd_loss_invalid_arguments_raise(gen):
    student = torch.randn(2, 3, 5, generator=gen)
    teacher = torch.randn(2, 3, 5, generator=gen)
    labels = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="differ in shape"):
        kd_loss(student, teacher[..., :4], labels)
    for alpha in (-0.1, 1.5):
        with pytest.raises(ValueError, match="alpha"):
            kd_loss(student, teacher, labels, alpha=alpha)
    for temperature in (0.0, -2.0):
        with pytest.raises(ValueError, match="temperature"):
            kd_loss(student, teacher, labels, temperature=temperature)
    with pytest.raises(ValueError, match="labels"):
        kd_loss(student, teacher, torch.zeros(2, 4, dtype=torch.long))


def test_kd_loss_nan_teacher_propagates_but_ignored_positions_do_not_count():
    """A NaN teacher at a labelled position must surface as a NaN loss (the run stops on it), while
    positions with label -100 (and a teacher that puts zero mass on a class) contribute nothing."""
    student = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 5, dtype=torch.float64)
    labels = torch.tensor([1, -100, 4])
    broken = teacher.clone()
    broken[0, 2] = float("nan")
    assert torch.isnan(kd_loss(student, broken, labels))
    broken = teacher.clone()
    broken[1] = float("nan")  # only at the ignored position
    value = kd_loss(student, broken, labels)
    torch.testing.assert_close(value, kd_loss(student[[0, 2]], teacher[[0, 2]], labels[[0, 2]]))
    value.backward()
    assert torch.isfinite(student.grad).all() and (student.grad[1] == 0).all()
    peaked = teacher.clone()
    peaked[:, 0] = -1e4  # exp underflows: the teacher gives class 0 exactly zero mass
    assert torch.isfinite(kd_loss(student, peaked, labels, temperature=1.0))


@pytest.mark.parametrize("name", ["mse", "cosine"])
def test_row_terms_refuse_scores_for_losses_on_probabilities(name):
    """MSE and cosine compare probabilities: scores handed to them would be compared as if they were some."""
    scores = torch.randn(1, 2, 3, 3)
    assert not AttentionLoss(name).takes_scores and AttentionLoss("kl").takes_scores
    with pytest.raises(ValueError, match=f"loss={name} compares probabilities, not scores"):
        AttentionLoss(name).row_terms(scores, scores, scores=True)


def test_the_functional_losses_send_no_gradient_to_the_teacher(gen):
    """Called directly (not through AttentionDistillationLoss, which detaches the teacher itself), each loss
    and the Gram-matrix terms of mse_scores treat the teacher as a target: its tensors get no gradient."""
    from distill_lab.backends.gram import mse_scores_gram_terms
    from distill_lab.losses import attention_mse_scores

    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    for loss in (attention_mse, attention_kl, attention_cosine, attention_mse_scores):
        student = random_maps((2, 3, 6, 6), gen).requires_grad_()
        teacher = random_maps((2, 3, 6, 6), gen).requires_grad_()
        loss(student, teacher, mask).backward()
        assert student.grad is not None and teacher.grad is None, loss.__name__
    qs, ks, qt, kt = (torch.randn(2, 3, 6, 4, generator=gen, dtype=F64, requires_grad=True) for _ in range(4))
    values, _ = mse_scores_gram_terms(qs, ks, qt, kt, mask)
    values.sum().backward()
    assert qs.grad is not None and ks.grad is not None and qt.grad is None and kt.grad is None
