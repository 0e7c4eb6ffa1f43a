"""The exact Gram-matrix path of ``loss=mse_scores`` (``mse_scores_gram_terms``) for bidirectional layers.

Reference: TinyBERT's loss written out below in float64 with full ``L x L`` score maps (padded keys scored 0
on both sides, mean over valid queries x valid keys, teacher head groups averaged as the matching mode says),
and the block-wise path (``gram=False``) that it replaces. Values, per-head details and the student's query
and key gradients must agree for every matching mode, with padding (a fully padded example included), L = 1,
grouped-query attention, teacher and student of different head counts and sizes, and bf16 inputs; causal
records and masks that are more than key padding keep the block-wise path.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_inputs

import distill_lab.backends as backends_module
import distill_lab.backends.gram as gram_module
from distill_lab.attention import AttentionDistillationLoss
from distill_lab.backends.gram import mse_scores_gram_terms
from distill_lab.capture import AttentionCapture, QueryKey
from distill_lab.matching import Headwise, Selective

F64 = torch.float64
HEAD_MAP = [[[0, 1], 2], [3, 0]]  # a teacher pair averaged against student head 2, teacher head 3 against 0
MODES = {
    "layerwise": lambda: "layerwise",
    "headwise": lambda: Headwise(HEAD_MAP),
    "global": lambda: "global",
    "selective": lambda: Selective(heads=[[0, 1], [3, 0]]),
}
# (batch, length, attention mask rows or None): trailing padding and a fully padded example; L = 1; no mask
CASES = {
    "padded": (3, 17, [[1] * 17, [1] * 12 + [0] * 5, [0] * 17]),
    "length1": (2, 1, [[1], [0]]),
    "unmasked": (2, 5, None),
}


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _record(
    gen, batch, length, heads, kv_heads, dim, attention_mask, mask_format="bool", dtype=F64
) -> QueryKey:
    """A bidirectional layer's record with the key-padding mask a BERT builds, (B, 1, L, L)."""
    query = torch.randn(batch, heads, length, dim, generator=gen, dtype=F64).to(dtype).requires_grad_()
    key = torch.randn(batch, kv_heads, length, dim, generator=gen, dtype=F64).to(dtype).requires_grad_()
    mask = None
    if attention_mask is not None:
        mask = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length).clone()
        if mask_format == "additive":
            mask = (~mask).to(dtype) * torch.finfo(dtype).min
    return QueryKey(query, key, dim**-0.5, mask)


def _records(case, teacher_heads=8, mask_format="bool", dtype=F64, seed=0):
    """Teacher (H_t heads of size 8) and student (4 heads of size 6 on 2 key heads) records, and the mask."""
    batch, length, rows = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    attention_mask = None if rows is None else torch.tensor(rows)
    teacher = _record(gen, batch, length, teacher_heads, teacher_heads, 8, attention_mask, mask_format, dtype)
    student = _record(gen, batch, length, 4, 2, 6, attention_mask, mask_format, dtype)
    return student, teacher, attention_mask


def _entries(mode, teacher_heads, student_heads=4) -> list[tuple[torch.Tensor, torch.Tensor, int | None]]:
    """The compared entries as (teacher head weights, student head weights, reported student head)."""
    t_eye, s_eye = torch.eye(teacher_heads, dtype=F64), torch.eye(student_heads, dtype=F64)
    if mode == "global":
        return [(t_eye.mean(0), s_eye.mean(0), None)]
    if mode == "layerwise":
        k = teacher_heads // student_heads
        return [(t_eye[i * k : (i + 1) * k].mean(0), s_eye[i], None) for i in range(student_heads)]
    if mode == "headwise":
        return [(t_eye[t if isinstance(t, list) else [t]].mean(0), s_eye[s], s) for t, s in HEAD_MAP]
    return [(t_eye[t], s_eye[s], s) for t, s in [(0, 1), (3, 0)]]


def _reference(student: QueryKey, teacher: QueryKey, attention_mask, entries) -> tuple[torch.Tensor, dict]:
    """TinyBERT's loss in float64 from full score maps: the mean over entries of each entry's mean over
    (b, valid q, valid k) of the squared difference of the head-weighted scores, padded keys scored 0."""
    batch, _, length, _ = student.shape
    keys = torch.ones(batch, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = keys & keys.any(-1, keepdim=True)
    valid = (rows[:, :, None] & keys[:, None, :]).to(F64)  # (B, Lq, Lk)

    def scores(record):
        q, k = record.query.to(F64), record.key.to(F64)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return record.scaling * q @ k.transpose(-1, -2) * keys[:, None, None, :]

    s, t = scores(student), scores(teacher)
    per = []
    for t_w, s_w, _ in entries:
        diff = torch.einsum("h,bhqk->bqk", t_w, t) - torch.einsum("h,bhqk->bqk", s_w, s)
        per.append((diff.square() * valid).sum() / valid.sum().clamp_min(1.0))
    per = torch.stack(per)
    return per.mean(), {h: per[j] for j, (_, _, h) in enumerate(entries) if h is not None}


def _component_run(student, teacher, attention_mask, mode, gram, block_size=5):
    component = AttentionDistillationLoss(
        "mse_scores", MODES[mode](), [(0, 0)], block_size=block_size, gram=gram
    )
    value, details = component({0: student}, {0: teacher}, attention_mask)
    grads = torch.autograd.grad(value, [student.query, student.key])
    return value, details, grads


@pytest.fixture
def gram_calls(monkeypatch) -> list[int]:
    """Counts the calls of the Gram-matrix path from ``AttentionDistillationLoss``."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return mse_scores_gram_terms(*args, **kwargs)

    monkeypatch.setattr(gram_module, "mse_scores_gram_terms", spy)
    return calls


@pytest.mark.parametrize("mask_format", ["bool", "additive"])
@pytest.mark.parametrize("teacher_heads", [4, 8])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mode", list(MODES))
def test_gram_path_equals_reference_and_blockwise(gram_calls, mode, case, teacher_heads, mask_format):
    student, teacher, attention_mask = _records(case, teacher_heads, mask_format)
    want, want_details = _reference(student, teacher, attention_mask, _entries(mode, teacher_heads))
    want_grads = torch.autograd.grad(want, [student.query, student.key])

    value, details, grads = _component_run(student, teacher, attention_mask, mode, gram=True)
    assert gram_calls == [1]
    torch.testing.assert_close(value, want)
    for head, head_value in want_details.items():
        torch.testing.assert_close(details[f"L0->0/h{head}"], head_value)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad, want_grad)

    chunked, chunked_details, chunked_grads = _component_run(
        student, teacher, attention_mask, mode, gram=False
    )
    assert gram_calls == [1]
    torch.testing.assert_close(value, chunked)
    assert details.keys() == chunked_details.keys()
    for key in details:
        torch.testing.assert_close(details[key], chunked_details[key])
    for grad, chunked_grad in zip(grads, chunked_grads, strict=True):
        torch.testing.assert_close(grad, chunked_grad)


@pytest.mark.parametrize("mode", ["layerwise", "headwise", "global"])
def test_gram_path_from_bf16_inputs(mode):
    """bf16 queries and keys are computed in float32: close to the float64 reference of the same bf16
    values."""
    student, teacher, attention_mask = _records("padded", 8, "bool", dtype=torch.bfloat16)
    want, _ = _reference(student, teacher, attention_mask, _entries(mode, 8))
    want_grads = torch.autograd.grad(want, [student.query, student.key])
    value, _, grads = _component_run(student, teacher, attention_mask, mode, gram=True)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=0.0)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        assert grad.dtype == torch.bfloat16
        torch.testing.assert_close(grad, want_grad, rtol=1e-2, atol=1e-3)  # both rounded to bf16
    chunked, _, _ = _component_run(student, teacher, attention_mask, mode, gram=False)
    torch.testing.assert_close(value, chunked, rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("heads", [None, [(0, 1), (3, 3), (2, 0)]])
def test_gram_terms_direct(heads):
    """The pure function: per-entry sums and element counts, for the head average and for head pairs."""
    student, teacher, attention_mask = _records("padded", 4, "bool")
    values, weights = mse_scores_gram_terms(
        student.query, student.key, teacher.query, teacher.key, attention_mask,
        student_scaling=student.scaling, teacher_scaling=teacher.scaling, heads=heads,
    )  # fmt: skip
    eye = torch.eye(4, dtype=F64)
    entries = [(eye.mean(0), eye.mean(0), None)] if heads is None else [(eye[t], eye[s], s) for t, s in heads]
    assert values.shape == weights.shape == (len(entries),)
    assert (
        weights == 17 * 17 + 12 * 12
    ).all()  # valid queries x valid keys; the padded example counts nothing
    for j, entry in enumerate(entries):
        want, _ = _reference(student, teacher, attention_mask, [entry])
        torch.testing.assert_close(values[j] / weights[j], want)


@pytest.mark.parametrize("mode", ["layerwise", "global"])
def test_identical_scores_give_zero(mode):
    """Identical inputs give exactly 0. Inputs that differ but give the same scores (queries and keys rotated
    alike) leave what the three traces fail to cancel: tiny next to the squared scores, and never negative."""
    gen = torch.Generator().manual_seed(3)
    batch, heads, length, dim = 2, 4, 33, 16
    query = torch.randn(batch, heads, length, dim, generator=gen, dtype=F64) * 3
    key = torch.randn(batch, 2, length, dim, generator=gen, dtype=F64) * 3
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 20:] = 0
    mask = attention_mask.bool()[:, None, None, :].expand(batch, 1, length, length)
    teacher = QueryKey(query.float(), key.float(), dim**-0.5, mask)
    same = QueryKey(query.float().requires_grad_(), key.float().requires_grad_(), dim**-0.5, mask)
    value, _, grads = _component_run(same, teacher, attention_mask, mode, gram=True)
    assert value == 0 and all((grad == 0).all() for grad in grads)

    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    rotated = QueryKey(
        (query @ rotation).float().requires_grad_(),
        (key @ rotation).float().requires_grad_(),
        dim**-0.5,
        mask,
    )
    value, _, grads = _component_run(rotated, teacher, attention_mask, mode, gram=True)
    exact = QueryKey(
        *(x.detach().double().requires_grad_() for x in (rotated.query, rotated.key)), dim**-0.5, mask
    )
    want, _, want_grads = _component_run(exact, teacher, attention_mask, mode, gram=False)
    scale = teacher.scores().masked_fill(~mask, 0.0).square().mean()  # the mean squared score, about 60
    assert want < 1e-12 * scale  # the float32 rounding of the rotated inputs
    assert 0 <= value < 2e-6 * scale  # summed in float32 the traces would leave a few 1e-7 of the squares
    torch.testing.assert_close(value.double(), want, rtol=1e-6, atol=1e-14 * scale)  # in float64: exact
    for grad, want_grad in zip(grads, want_grads, strict=True):  # the gradients keep float32 accuracy
        torch.testing.assert_close(grad.double(), want_grad, atol=1e-6, rtol=0.0)


@pytest.mark.parametrize(
    ("mode", "case", "takes_gram"),
    [
        ("layerwise", "padded", True),  # compared width 6 + 8: L = 17 is past half of it
        ("layerwise", "unmasked", False),  # L = 5 is not
        ("global", "padded", False),  # averaged heads, width 4 x 6 + 8 x 8 = 88: not at L = 17
    ],
)
def test_automatic_choice_takes_the_gram_path_where_the_sequence_outgrows_the_compared_width(
    gram_calls, mode, case, takes_gram
):
    student, teacher, attention_mask = _records(case, 8)
    value, _, _ = _component_run(student, teacher, attention_mask, mode, gram=None)
    assert gram_calls == ([1] if takes_gram else [])
    chunked, _, _ = _component_run(student, teacher, attention_mask, mode, gram=False)
    torch.testing.assert_close(value, chunked)


def _causal_pair(gen):
    query = torch.randn(2, 4, 7, 8, generator=gen, dtype=F64, requires_grad=True)
    key = torch.randn(2, 4, 7, 8, generator=gen, dtype=F64, requires_grad=True)
    student = QueryKey(query, key, 0.5, causal=True)
    teacher_query, teacher_key = (torch.randn(2, 4, 7, 8, generator=gen, dtype=F64) for _ in range(2))
    teacher = QueryKey(teacher_query, teacher_key, 0.25, causal=True)
    return student, teacher


def test_causal_records_keep_the_blockwise_path(gram_calls):
    student, teacher = _causal_pair(torch.Generator().manual_seed(0))
    value, _, grads = _component_run(student, teacher, None, "layerwise", gram=None)
    chunked, _, chunked_grads = _component_run(student, teacher, None, "layerwise", gram=False)
    assert gram_calls == []
    torch.testing.assert_close(value, chunked)
    for grad, chunked_grad in zip(grads, chunked_grads, strict=True):
        torch.testing.assert_close(grad, chunked_grad)
    with pytest.raises(ValueError, match="gram=True.*causal"):
        _component_run(student, teacher, None, "layerwise", gram=True)


@pytest.mark.parametrize(
    "make_mask",
    [
        lambda keys: keys[:, None, None, :] & torch.ones(7, 7, dtype=torch.bool).tril(),  # causal, unflagged
        lambda keys: torch.where(keys, torch.tensor(0.5, dtype=F64), -1e300)[:, None, None, :].expand(
            2, 1, 7, 7
        ),  # a bias
        lambda keys: keys[:, None, None, :].repeat(1, 4, 7, 1).index_fill_(1, torch.tensor([2]), False),
    ],
    ids=["query_dependent", "additive_bias", "head_dependent"],
)
def test_masks_beyond_key_padding_keep_the_blockwise_path(gram_calls, make_mask):
    gen = torch.Generator().manual_seed(1)
    attention_mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    mask = make_mask(attention_mask.bool())
    student, teacher = _causal_pair(gen)
    student, teacher = (QueryKey(r.query, r.key, r.scaling, mask) for r in (student, teacher))
    value, _, _ = _component_run(student, teacher, attention_mask, "headwise", gram=None)
    chunked, _, _ = _component_run(student, teacher, attention_mask, "headwise", gram=False)
    assert gram_calls == []
    torch.testing.assert_close(value, chunked)
    with pytest.raises(ValueError, match="gram=True.*more than key padding"):
        _component_run(student, teacher, attention_mask, "headwise", gram=True)


def test_gram_true_needs_mse_scores():
    student, teacher, attention_mask = _records("padded", 4)
    component = AttentionDistillationLoss("kl", "layerwise", [(0, 0)], gram=True)
    with pytest.raises(ValueError, match="gram=True.*only loss=mse_scores"):
        component({0: student}, {0: teacher}, attention_mask)


@pytest.mark.parametrize("mode", ["layerwise", "headwise", "global"])
def test_gram_path_on_a_tiny_bert(tiny_model_factory, gram_calls, mode, monkeypatch):
    """End to end through the qk capture: a 4-layer teacher with heads of 8 and a 2-layer student with heads
    of 6; the Gram path gives the block-wise path's loss, details and parameter gradients."""
    teacher = tiny_model_factory("bert", num_hidden_layers=4, seed=1)
    student = tiny_model_factory("bert", num_hidden_layers=2, hidden_size=24, seed=2).train()
    inputs = make_tiny_inputs("bert", teacher.config, batch_size=3, seq_len=13, num_padded=5)
    mask_checks = []
    real_key_padding = backends_module.key_padding

    def counted(*args, **kwargs):
        mask_checks.append(1)
        return real_key_padding(*args, **kwargs)

    monkeypatch.setattr(backends_module, "key_padding", counted)
    results = {}
    for gram in (True, False):
        component = AttentionDistillationLoss(
            "mse_scores", MODES[mode](), [(1, 0), (3, 1)], block_size=4, gram=gram
        )
        student.zero_grad(set_to_none=True)
        with AttentionCapture(teacher, [1, 3], "qk") as tc, AttentionCapture(student, [0, 1], "qk") as sc:
            with torch.no_grad():
                _, teacher_records = tc(**inputs)
            _, student_records = sc(**inputs)
            assert not teacher_records[1].query.requires_grad and student_records[0].query.requires_grad
            value, details = component(student_records, teacher_records, inputs["attention_mask"])
            value.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        results[gram] = value.detach(), details, grads
    assert len(gram_calls) == 2  # one per layer pair, from the gram=True run
    assert mask_checks == [
        1,
        1,
    ]  # each model's one mask, checked once (not per layer pair); gram=False: never
    assert all(p.grad is None for p in teacher.parameters())
    (value, details, grads), (chunked, chunked_details, chunked_grads) = results[True], results[False]
    assert value > 0 and grads
    torch.testing.assert_close(value, chunked, rtol=1e-5, atol=0.0)
    assert details.keys() == chunked_details.keys()
    for key in details:
        torch.testing.assert_close(details[key], chunked_details[key], rtol=1e-5, atol=0.0)
    assert grads.keys() == chunked_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], chunked_grads[name], rtol=1e-4, atol=1e-7)


def test_selective_assigns_heads_on_the_scores_that_mse_scores_compares():
    """Student head 0 has the teacher head's probabilities but scores shifted by 10 in every row (a softmax
    does not see a per-row constant); student head 1 has the teacher's scores times 1.05. On probabilities
    head 0 is the match, on scores, which mse_scores trains, head 1 is."""
    torch.manual_seed(0)
    batch, length, dim = 2, 6, 4
    query = torch.cat([torch.randn(batch, 1, length, dim), torch.zeros(batch, 1, length, 1)], -1)
    key = torch.cat(
        [torch.randn(batch, 1, length, dim), torch.ones(batch, 1, length, 1)], -1
    )  # last: constant
    teacher = QueryKey(torch.cat([query, torch.randn_like(query)], 1), torch.cat([key, key], 1), 1.0)
    shifted = query.clone()
    shifted[..., -1] = 10.0  # adds 10 to every score of the row
    student = QueryKey(torch.cat([shifted, 1.05 * query], 1), torch.cat([key, key], 1), 1.0)
    torch.testing.assert_close(student.probs()[:, 0], teacher.probs()[:, 0])
    for loss, match in (("mse", 0), ("mse_scores", 1)):
        component = AttentionDistillationLoss(loss, Selective(heads=[0]), [(0, 0)])
        assert component.calibrate({0: student}, {0: teacher}) == {"L0->0": [(0, match)]}, loss


NEAR_MODES = {  # modes that compare each student head with its own teacher head, or all heads averaged
    "layerwise": (lambda: "layerwise", [(i, i, None) for i in range(4)]),
    "headwise": (lambda: Headwise([[0, 0], [3, 3]]), [(0, 0, 0), (3, 3, 3)]),
    "global": (lambda: "global", None),
}


@pytest.mark.parametrize("gram", [True, None])
@pytest.mark.parametrize("mode", list(NEAR_MODES))
def test_gram_value_is_exact_when_the_student_nearly_equals_its_teacher(gram_calls, mode, gram):
    """Near convergence (student = teacher + 1e-4 noise, L = 100) the loss is 1e-8 of the squared scores, and
    the three Gram terms cancel to that: summed in float32 they would leave a value tens of percent off. The
    logged value (and each head's) is within 1e-4 of a float64 reference, the gradients close to it, whether
    the Gram path is asked for or chosen."""
    gen = torch.Generator().manual_seed(0)
    batch, length = 2, 100
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[1, 70:] = 0
    teacher = _record(gen, batch, length, 4, 4, 8, attention_mask, dtype=torch.float32)
    teacher = QueryKey(teacher.query.detach(), teacher.key.detach(), teacher.scaling, teacher.mask)

    def nearby(x):
        return (x + 1e-4 * torch.randn(x.shape, generator=gen, dtype=F64).float()).requires_grad_()

    student = QueryKey(nearby(teacher.query), nearby(teacher.key), teacher.scaling, teacher.mask)
    exact = QueryKey(*(x.detach().double().requires_grad_() for x in (student.query, student.key)),
                     student.scaling, student.mask)  # fmt: skip
    exact_teacher = QueryKey(teacher.query.double(), teacher.key.double(), teacher.scaling, teacher.mask)
    matching, pairs = NEAR_MODES[mode]
    eye = torch.eye(4, dtype=F64)
    entries = _entries("global", 4) if pairs is None else [(eye[t], eye[s], h) for t, s, h in pairs]
    want, want_details = _reference(exact, exact_teacher, attention_mask, entries)
    want_grads = torch.autograd.grad(want, [exact.query, exact.key])
    scale = teacher.scores().masked_fill(~teacher.mask, 0.0).square().mean()
    assert want < 1e-7 * scale  # the student is that close

    component = AttentionDistillationLoss("mse_scores", matching(), [(0, 0)], gram=gram)
    value, details = component({0: student}, {0: teacher}, attention_mask)
    grads = torch.autograd.grad(value, [student.query, student.key])
    assert gram_calls == [1]
    torch.testing.assert_close(value.double(), want, rtol=1e-4, atol=0.0)
    assert len(details) == 1 + len(want_details)
    for head, head_value in want_details.items():
        torch.testing.assert_close(details[f"L0->0/h{head}"].double(), head_value, rtol=1e-4, atol=0.0)
    for grad, want_grad in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-3, atol=1e-3 * want_grad.abs().max())
