"""Self-attention relations (MiniLM, MiniLMv2): ``relation_kl`` against a float64 reference written here,
the fused kernel's relations against the block-wise path, the values in the ``qk`` capture, the
``RelationLoss`` and ``MiniLMLoss`` components on tiny BERT, GPT-2 and LLaMA (GQA) pairs of unequal head
counts and widths, their checks before training, the config and one run of the app.

The reference computes, per example b, relation head h and valid query row i, the relation logits
``x_i . x_j / sqrt(D / r)`` over the keys j that row may see (not padding; j <= i when causal), divided by
T, and ``T^2 * KL(softmax(teacher) || softmax(student))``, one row at a time, then the mean over the rows.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
from collections.abc import Callable

import datasets
import pytest
import torch
from conftest import compose_config, make_text_task, make_tiny_inputs
from hydra.utils import instantiate
from omegaconf import OmegaConf

from distill_lab import checks
from distill_lab.attention import AttentionDistillationLoss
from distill_lab.capture import AttentionCapture, attention_width
from distill_lab.losses import AttentionLoss
from distill_lab.matching import Selective, layer_map, minilmv2_teacher_layer
from distill_lab.records import QueryKey
from distill_lab.relations import MiniLMLoss, RelationLoss, relation_kl
from distill_lab.run import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# float64 against float64: the two paths differ only in the order of their sums
RTOL64 = 1e-10


# ---------------------------------------------------------------------------------------------- reference


def allowed_keys(attention_mask: torch.Tensor | None, batch: int, length: int, causal: bool) -> torch.Tensor:
    """(B, L, L): whether query row i of example b may see key j; a padded row sees nothing."""
    valid = torch.ones(batch, length, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    allowed = valid[:, None, :] & valid[:, :, None]
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool).tril()
    return allowed


def reference_relation_kl(student, teacher, attention_mask, relation_heads, causal=False, temperature=1.0):
    """MiniLMv2's relation KL by its definition, one (example, relation head, query row) at a time, in
    float64; differentiable with respect to ``student``."""
    student, teacher = student.double(), teacher.double()
    batch, length, width_s = student.shape
    size_s, size_t = width_s // relation_heads, teacher.shape[-1] // relation_heads
    allowed = allowed_keys(attention_mask, batch, length, causal)
    total, rows = student.new_zeros(()), 0
    for b in range(batch):
        for h in range(relation_heads):
            xs = student[b, :, h * size_s : (h + 1) * size_s]
            xt = teacher[b, :, h * size_t : (h + 1) * size_t]
            for i in range(length):
                keys = allowed[b, i]
                if not keys.any():
                    continue
                log_s = torch.log_softmax(xs[keys] @ xs[i] / math.sqrt(size_s) / temperature, -1)
                log_t = torch.log_softmax(xt[keys] @ xt[i] / math.sqrt(size_t) / temperature, -1)
                total = total + temperature**2 * (log_t.exp() * (log_t - log_s)).sum()
                rows += 1
    return total / rows


def vectors(batch, length, width, *, seed, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(batch, length, width, generator=g, dtype=torch.float64)).to(dtype)


def padded_mask(batch: int, length: int) -> torch.Tensor:
    """The first example whole, the second padded at the end, a third (if any) padded at the start."""
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3 :] = 0
    if batch > 2:
        mask[2, :2] = 0
    return mask


# ---------------------------------------------------------------------------------------------- relation_kl

SHAPES = {  # (batch, length, D_s, D_t, relation_heads)
    "unequal": (3, 7, 12, 16, 4),
    "odd": (2, 5, 6, 9, 3),
}


@pytest.mark.parametrize("block_size", [256, 3])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_relation_kl_and_its_gradient_equal_the_reference(shape, padded, causal, temperature, block_size):
    batch, length, width_s, width_t, r = SHAPES[shape]
    student = vectors(batch, length, width_s, seed=1, scale=1.5).requires_grad_()
    teacher = vectors(batch, length, width_t, seed=2, scale=1.5)
    mask = padded_mask(batch, length) if padded else None
    got = relation_kl(
        student, teacher, mask, relation_heads=r, causal=causal, temperature=temperature,
        block_size=block_size, fused=False,
    )  # fmt: skip
    want = reference_relation_kl(student, teacher, mask, r, causal, temperature)
    assert got.dtype == torch.float64 and want > 1e-3
    torch.testing.assert_close(got, want, atol=0, rtol=RTOL64)
    (grad,) = torch.autograd.grad(got, student)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(grad, want_grad, atol=RTOL64 * want_grad.abs().max().item(), rtol=RTOL64)
    if padded:  # a padded token is neither a row nor a key: its vector does not matter
        assert grad[padded_mask(batch, length) == 0].abs().max() == 0


def test_relation_kl_in_bf16_is_computed_in_float32():
    student = vectors(2, 9, 16, seed=3, dtype=torch.bfloat16).requires_grad_()
    teacher = vectors(2, 9, 24, seed=4, dtype=torch.bfloat16)
    mask = padded_mask(2, 9)
    got = relation_kl(student, teacher, mask, relation_heads=4, causal=True, block_size=4, fused=False)
    # the reference on the same bf16 numbers: what is left is float32's rounding of the scores and sums
    exact = student.detach().double().requires_grad_()
    want = reference_relation_kl(exact, teacher, mask, 4, causal=True)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)
    (grad,) = torch.autograd.grad(got, student)
    (want_grad,) = torch.autograd.grad(want, exact)
    assert grad.dtype == torch.bfloat16
    # the gradient is rounded to bf16 (8 bits of mantissa) on its way back to the input
    torch.testing.assert_close(grad.double(), want_grad, atol=1e-2 * want_grad.abs().max().item(), rtol=1e-2)


def test_equal_relations_give_zero():
    student = vectors(2, 6, 12, seed=5).requires_grad_()
    mask = padded_mask(2, 6)
    same = relation_kl(student, student.detach().clone(), mask, relation_heads=4, causal=True)
    assert same.abs().item() < 1e-14
    # a relation depends only on each head's Gram matrix scaled by 1/sqrt(D / r): a teacher whose heads are
    # the student's rotated, padded with zeros to size 4 and scaled to make up for sqrt(4 / 3) has the same
    # relations at another width (the heads are contiguous slices of the features)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)).double())
    heads = student.detach().reshape(2, 6, 4, 3) @ rotation
    teacher = torch.cat([heads, torch.zeros(2, 6, 4, 1, dtype=heads.dtype)], -1) * (4 / 3) ** 0.25
    wider = relation_kl(student, teacher.reshape(2, 6, 16), mask, relation_heads=4, causal=True)
    assert wider.abs().item() < 1e-12
    swapped = teacher[:, :, [1, 0, 2, 3]].reshape(2, 6, 16)  # head h is compared with head h only
    assert relation_kl(student, swapped, mask, relation_heads=4, causal=True) > 1e-2


def test_the_teacher_gets_no_gradient():
    student = vectors(2, 5, 8, seed=6).requires_grad_()
    teacher = vectors(2, 5, 12, seed=7).requires_grad_()
    relation_kl(student, teacher, padded_mask(2, 5), relation_heads=4, block_size=2).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().max() > 0


def test_an_example_without_real_tokens_adds_nothing():
    student, teacher = vectors(3, 6, 8, seed=8), vectors(3, 6, 8, seed=9)
    mask = padded_mask(3, 6)
    empty = mask.clone()
    empty[1] = 0
    got = relation_kl(student, teacher, empty, relation_heads=2, causal=True)
    keep = torch.tensor([0, 2])
    want = relation_kl(student[keep], teacher[keep], mask[keep], relation_heads=2, causal=True)
    assert torch.isfinite(got)
    torch.testing.assert_close(got, want, atol=0, rtol=RTOL64)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(relation_heads=5), "relation_heads=5 must divide the student width 12"),
        (
            dict(relation_heads=3, teacher=vectors(2, 5, 16, seed=0)),
            "relation_heads=3 must divide the teacher",
        ),
        (dict(relation_heads=0), "relation_heads=0"),
        (dict(teacher=vectors(3, 5, 16, seed=0)), "differ in batch or length"),
        (dict(teacher=vectors(2, 6, 16, seed=0)), "differ in batch or length"),
        (dict(temperature=0.0), "temperature must be positive"),
        (dict(temperature=-1.0), "temperature must be positive"),
    ],
)
def test_relation_kl_refuses_bad_input(change, message):
    arguments = dict(student=vectors(2, 5, 12, seed=0), teacher=vectors(2, 5, 16, seed=1), relation_heads=4)
    with pytest.raises(ValueError, match=message):
        relation_kl(**{**arguments, **change})


# ---------------------------------------------------------------------------------------------- fused kernel

FUSED_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("causal", [False, True])
def test_fused_relations_equal_the_block_wise_path(causal, monkeypatch):
    """``fused=True``: the attention-KL kernel computes the relations (Triton's interpreter on a CPU, which
    tests/conftest.py switches on without an NVIDIA driver), equal to the block-wise path."""
    pytest.importorskip(
        "triton", reason="the fused relations run in a Triton kernel; triton is not installed"
    )
    from distill_lab.kernels import attention_kl

    if FUSED_DEVICE == "cpu":
        assert os.environ.get("TRITON_INTERPRET") == "1"
    calls, kernel = [], attention_kl.attention_kl_rows
    monkeypatch.setattr(
        attention_kl, "attention_kl_rows", lambda *args: calls.append(args[-1]) or kernel(*args)
    )
    mask = padded_mask(2, 6).to(FUSED_DEVICE)
    teacher = vectors(2, 6, 16, seed=11, dtype=torch.float32, scale=1.5).to(FUSED_DEVICE)
    results = {}
    for fused in (True, False):
        student = vectors(2, 6, 8, seed=10, dtype=torch.float32, scale=1.5).to(FUSED_DEVICE).requires_grad_()
        loss = relation_kl(
            student,
            teacher,
            mask,
            relation_heads=2,
            causal=causal,
            temperature=2.0,
            fused=fused,
            block_size=4,
        )
        results[fused] = (loss, torch.autograd.grad(loss, student)[0])
    (loss, grad), (want, want_grad) = results[True], results[False]
    assert calls == [causal]  # the kernel computed the fused loss, with the causal flag; the other did not
    assert loss.dtype == torch.float32 and want > 1e-3
    torch.testing.assert_close(loss, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, want_grad, atol=1e-6 * want_grad.abs().max().item(), rtol=1e-4)
    assert grad[mask == 0].abs().max() == 0


# ---------------------------------------------------------------------------------------------- the capture

FAMILIES = ("bert", "gpt2", "llama")


def value_projection(model, family: str, layer: int) -> tuple[torch.nn.Module, Callable]:
    """A layer's value projection module and how its output becomes all heads' values side by side:
    (B, L, H * D), grouped key/value heads repeated for the query heads they serve."""
    config = model.config
    if family == "bert":
        return model.bert.encoder.layer[layer].attention.self.value, lambda out: out
    if family == "gpt2":  # one projection for queries, keys and values, in that order
        return model.transformer.h[layer].attn.c_attn, lambda out: out[..., 2 * config.n_embd :]
    groups = config.num_attention_heads // config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads

    def expand(out):
        heads = out.unflatten(-1, (config.num_key_value_heads, head_dim)).repeat_interleave(groups, dim=2)
        return heads.flatten(2)

    return model.model.layers[layer].self_attn.v_proj, expand


@pytest.mark.parametrize("family", FAMILIES)
def test_the_qk_capture_records_the_values(tiny_model_factory, family):
    model = tiny_model_factory(family)
    inputs = make_tiny_inputs(family, model.config, batch_size=2, seq_len=7, num_padded=2)
    module, to_values = value_projection(model, family, 1)
    outputs = []
    handle = module.register_forward_hook(lambda m, args, out: outputs.append(out.detach()))
    heads = model.config.num_attention_heads
    assert attention_width(model) == heads * (model.config.hidden_size // heads) == 32
    try:
        for budget in (0, None):  # SDPA in place, and eager attention keeping the maps
            outputs.clear()
            with AttentionCapture(model, [1, 2], "qk", memory_budget=budget) as capture, torch.no_grad():
                _, records = capture(**inputs)
            record = records[1]
            assert (record.maps is None) == (budget == 0)
            assert record.value.shape == record.key.shape  # (B, H_kv, L, D): 2 key/value heads for LLaMA
            assert record.value.shape[1] == (2 if family == "llama" else 4)
            (projected,) = outputs
            torch.testing.assert_close(record.vectors("value"), to_values(projected), atol=0, rtol=0)
            assert record.vectors("query").shape == (2, 7, 32)
            assert record.vectors("key").shape == (2, 7, 32)  # grouped keys expanded too
            if family == "bert":  # no rotary embedding: the queries are the projection's output
                with torch.no_grad():
                    hidden = model(**inputs, output_hidden_states=True).hidden_states[1]  # into layer 1
                    query = model.bert.encoder.layer[1].attention.self.query(hidden)
                torch.testing.assert_close(record.vectors("query"), query, atol=1e-6, rtol=1e-5)
            # a record of some of the examples keeps their values (DDP and FSDP select rows so)
            kept = record.examples(torch.tensor([False, True]))
            torch.testing.assert_close(kept.vectors("value"), record.vectors("value")[1:], atol=0, rtol=0)
    finally:
        handle.remove()
    assert records[2].value is not None and not torch.equal(records[2].value, record.value)


def test_the_attention_width_is_heads_times_head_size(tiny_model_factory):
    """A model whose heads are not ``hidden_size / heads`` wide (LLaMA's ``head_dim``): the width that the
    checks divide is that of the vectors the relations compare."""
    model = tiny_model_factory("llama", num_hidden_layers=1, head_dim=16)  # 4 heads of 16, hidden 32
    inputs = make_tiny_inputs("llama", model.config, batch_size=2, seq_len=5)
    with AttentionCapture(model, [0], "qk") as capture, torch.no_grad():
        _, records = capture(**inputs)
    assert attention_width(model) == 64
    assert {records[0].vectors(kind).shape for kind in ("query", "key", "value")} == {(2, 5, 64)}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_value_relation_trains_the_value_projection(tiny_model_factory, family):
    teacher = tiny_model_factory(family, seed=1)
    student = tiny_model_factory(family, seed=2, num_hidden_layers=2).train()
    inputs = make_tiny_inputs(family, teacher.config, batch_size=2, seq_len=7, num_padded=2)
    with (
        AttentionCapture(teacher, [2], "qk", memory_budget=0) as tc,
        AttentionCapture(student, [1], "qk", memory_budget=0) as sc,
    ):
        with torch.no_grad():
            _, teacher_records = tc(**inputs)
        _, student_records = sc(**inputs)
        student_values, teacher_values = (
            student_records[1].vectors("value"),
            teacher_records[2].vectors("value"),
        )
        causal = family != "bert"
        loss = relation_kl(
            student_values, teacher_values, inputs["attention_mask"], relation_heads=4, causal=causal
        )
        loss.backward()
    assert loss > 0
    value, _ = value_projection(student, family, 1)
    assert value.weight.grad.abs().max() > 0
    # the layer's values do not depend on its queries
    if family == "gpt2":  # one projection for queries, keys and values: (features, 3 x width) columns
        assert value.weight.grad[:, : 2 * student.config.n_embd].abs().max() == 0
    else:
        attention = student.bert.encoder.layer[1].attention.self if family == "bert" else None
        query = attention.query if attention else student.model.layers[1].self_attn.q_proj
        assert query.weight.grad is None
    assert not any(p.grad is not None for p in teacher.parameters())


# ---------------------------------------------------------------------------------------------- the losses

NARROW_STUDENT = {  # 2 heads of 8 features: width 16 against the teacher's 32
    "bert": dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=16),
    "gpt2": dict(num_hidden_layers=2, num_attention_heads=2, hidden_size=16),
    "llama": dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=16),
}
PAIRS = [(1, 0), (2, 1)]


def captured(teacher, student, inputs, teacher_layers, student_layers, memory_budget=0):
    """Both models' ``qk`` records of the layers; the student's keep their graph."""
    with (
        AttentionCapture(teacher, teacher_layers, "qk", memory_budget=memory_budget) as tc,
        AttentionCapture(student, student_layers, "qk", memory_budget=memory_budget) as sc,
    ):
        with torch.no_grad():
            _, teacher_records = tc(**inputs)
        _, student_records = sc(**inputs)
    return student_records, teacher_records


@pytest.fixture(params=FAMILIES)
def narrow_pair(request, tiny_model_factory):
    """A float64 teacher (4 heads, width 32) and a narrower student (2 heads, width 16) of one family, and
    a padded batch."""
    family = request.param
    teacher = tiny_model_factory(family, seed=1).double()
    student = tiny_model_factory(family, seed=2, **NARROW_STUDENT[family]).double().train()
    inputs = make_tiny_inputs(family, teacher.config, batch_size=3, seq_len=7, num_padded=3)
    return family, teacher, student, inputs


@pytest.mark.parametrize("relation_heads", [4, 2])
def test_relation_loss_is_the_weighted_sum_of_the_reference_relations(narrow_pair, relation_heads):
    family, teacher, student, inputs = narrow_pair
    mask = inputs["attention_mask"]
    causal = family != "bert"  # GPT-2's and LLaMA's records carry their causal structure
    component = AttentionDistillationLoss(
        RelationLoss(relation_heads=relation_heads), layer_map=PAIRS, block_size=3
    )
    students, teachers = captured(teacher, student, inputs, [1, 2], [0, 1])
    assert all(students[s].causal == causal for s in (0, 1))
    total, details = component(students, teachers, mask)
    expected_keys = {f"L{t}->{s}{part}" for t, s in PAIRS for part in ("", "/qq", "/kk", "/vv")}
    assert set(details) == expected_keys
    reference = 0.0
    for t, s in PAIRS:
        pair = 0.0
        for kind, vector in (("qq", "query"), ("kk", "key"), ("vv", "value")):
            want = reference_relation_kl(
                students[s].vectors(vector), teachers[t].vectors(vector), mask, relation_heads, causal
            )
            direct = relation_kl(
                students[s].vectors(vector), teachers[t].vectors(vector), mask,
                relation_heads=relation_heads, causal=causal, block_size=3,
            )  # fmt: skip
            torch.testing.assert_close(details[f"L{t}->{s}/{kind}"], want.detach(), atol=0, rtol=RTOL64)
            torch.testing.assert_close(details[f"L{t}->{s}/{kind}"], direct.detach(), atol=0, rtol=RTOL64)
            pair = pair + want
        torch.testing.assert_close(details[f"L{t}->{s}"], pair.detach(), atol=0, rtol=RTOL64)
        reference = reference + pair / len(PAIRS)  # the pairs' mean
    torch.testing.assert_close(total, reference, atol=0, rtol=RTOL64)
    params = [p for p in student.parameters() if p.requires_grad]
    got = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(reference, params, allow_unused=True)
    scale = max(w.abs().max().item() for w in want if w is not None)
    assert scale > 0
    for name, a, b in zip(
        [n for n, p in student.named_parameters() if p.requires_grad], got, want, strict=True
    ):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=RTOL64 * scale, rtol=1e-8, msg=name)


def test_relation_weights_weigh_the_kinds(tiny_model_factory):
    teacher = tiny_model_factory("llama", seed=1).double()
    student = tiny_model_factory("llama", seed=2, **NARROW_STUDENT["llama"]).double()
    inputs = make_tiny_inputs("llama", teacher.config, batch_size=2, seq_len=6)
    students, teachers = captured(teacher, student, inputs, [2], [1], memory_budget=None)
    mask = inputs["attention_mask"]
    loss = RelationLoss(relations={"qq": 1.0, "vv": 0.5}, relation_heads=2, temperature=2.0)
    total, details = AttentionDistillationLoss(loss, layer_map=[(2, 1)])(students, teachers, mask)
    assert set(details) == {"L2->1", "L2->1/qq", "L2->1/vv"}  # no key-key relation
    parts = {
        kind: relation_kl(
            students[1].vectors(vector), teachers[2].vectors(vector), mask, relation_heads=2, causal=True,
            temperature=2.0,
        )
        for kind, vector in (("qq", "query"), ("vv", "value"))
    }  # fmt: skip
    torch.testing.assert_close(total, parts["qq"] + 0.5 * parts["vv"], atol=0, rtol=RTOL64)
    # a list of names weighs each 1, MiniLMv2's plain sum
    total, _ = AttentionDistillationLoss(
        RelationLoss(relations=["qq", "vv"], relation_heads=2, temperature=2.0), layer_map=[(2, 1)]
    )(students, teachers, mask)
    torch.testing.assert_close(total, parts["qq"] + parts["vv"], atol=0, rtol=RTOL64)


def test_a_few_steps_on_the_relation_loss_lower_it(tiny_model_factory):
    teacher = tiny_model_factory("bert", seed=1)
    student = tiny_model_factory("bert", seed=2, **NARROW_STUDENT["bert"]).train()
    inputs = make_tiny_inputs("bert", teacher.config, batch_size=4, seq_len=8)
    component = AttentionDistillationLoss(RelationLoss(), layer_map=[(2, 1)])  # the teacher's 4 heads
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        students, teachers = captured(teacher, student, inputs, [2], [1])
        loss, _ = component(students, teachers, inputs["attention_mask"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("family", FAMILIES)
def test_minilm_is_attention_kl_plus_the_weighted_value_relation(tiny_model_factory, family):
    teacher = tiny_model_factory(family, seed=1).double()
    narrower = dict(hidden_size=16, num_hidden_layers=2)  # the teacher's 4 heads, of 4 features, not 8
    student = tiny_model_factory(family, seed=2, **narrower).double()
    inputs = make_tiny_inputs(family, teacher.config, batch_size=3, seq_len=7)
    mask = inputs["attention_mask"]
    students, teachers = captured(teacher, student, inputs, [2], [1])
    component = AttentionDistillationLoss(MiniLMLoss(temperature=2.0, value_weight=0.5), layer_map=[(2, 1)])
    total, details = component(students, teachers, mask)
    assert set(details) == {"L2->1", "L2->1/attention", "L2->1/vv"}
    attention, _ = AttentionDistillationLoss(AttentionLoss("kl", temperature=2.0), layer_map=[(2, 1)])(
        students, teachers, mask
    )
    values = reference_relation_kl(
        students[1].vectors("value"), teachers[2].vectors("value"), mask, 4, family != "bert", 2.0
    )
    torch.testing.assert_close(details["L2->1/attention"], attention.detach(), atol=0, rtol=RTOL64)
    torch.testing.assert_close(details["L2->1/vv"], values.detach(), atol=0, rtol=RTOL64)
    torch.testing.assert_close(total, attention + 0.5 * values, atol=0, rtol=RTOL64)
    params = [p for p in student.parameters()]
    got = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(attention + 0.5 * values, params, allow_unused=True)
    scale = max(w.abs().max().item() for w in want if w is not None)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=RTOL64 * scale, rtol=1e-8)


def test_relation_loss_weighs_attention_kl_in_beside_the_relations(narrow_pair):
    """``loss.attention=a`` adds attention KL, computed as ``loss=kl`` computes it with the heads the matching
    mode pairs (``global`` here: the student has 2 heads, the teacher 4), to the weighted relations."""
    family, teacher, student, inputs = narrow_pair
    mask = inputs["attention_mask"]
    students, teachers = captured(teacher, student, inputs, [1, 2], [0, 1])
    loss = RelationLoss({"qq": 1.0, "vv": 0.5}, relation_heads=4, temperature=2.0, attention=0.25)
    component = AttentionDistillationLoss(loss, matching="global", layer_map=PAIRS)
    total, details = component(students, teachers, mask)
    attention, attention_details = AttentionDistillationLoss(
        AttentionLoss("kl", temperature=2.0), matching="global", layer_map=PAIRS
    )(students, teachers, mask)
    causal = family != "bert"
    expected = 0.0
    for t, s in PAIRS:
        name = f"L{t}->{s}"
        relations = {
            kind: reference_relation_kl(
                students[s].vectors(vector), teachers[t].vectors(vector), mask, 4, causal, 2.0
            )
            for kind, vector in (("qq", "query"), ("vv", "value"))
        }
        assert set(details) >= {name, f"{name}/attention", f"{name}/qq", f"{name}/vv"}
        torch.testing.assert_close(details[f"{name}/attention"], attention_details[name], atol=0, rtol=RTOL64)
        pair = 0.25 * attention_details[name] + relations["qq"] + 0.5 * relations["vv"]
        torch.testing.assert_close(details[name], pair.detach(), atol=0, rtol=RTOL64)
        expected = expected + pair / len(PAIRS)
    torch.testing.assert_close(total, expected, atol=0, rtol=RTOL64)
    with pytest.raises(ValueError, match="matching=global does not apply"):
        AttentionDistillationLoss(RelationLoss(), matching="global", layer_map=PAIRS).check(4, 2)


def test_minilm_calibrates_a_selective_mode_on_its_attention_kl(tiny_model_factory):
    """MiniLM's attention part is computed as ``loss=kl`` is, by the matching mode: ``matching=selective``
    chooses and assigns the heads on the attention KL, as it does for ``loss=kl``."""
    teacher = tiny_model_factory("bert", seed=1).double()
    student = tiny_model_factory("bert", seed=2, hidden_size=16, num_hidden_layers=2).double()
    inputs = make_tiny_inputs("bert", teacher.config, batch_size=3, seq_len=7)
    mask = inputs["attention_mask"]
    students, teachers = captured(teacher, student, inputs, [2], [1])
    minilm = AttentionDistillationLoss(MiniLMLoss(temperature=2.0), Selective(top_k=2), [(2, 1)])
    kl = AttentionDistillationLoss(AttentionLoss("kl", temperature=2.0), Selective(top_k=2), [(2, 1)])
    chosen = kl.calibrate(students, teachers, mask)
    assert minilm.calibrate(students, teachers, mask) == chosen
    _, details = minilm(students, teachers, mask)
    attention, _ = kl(students, teachers, mask)
    torch.testing.assert_close(details["L2->1/attention"], attention.detach(), atol=0, rtol=RTOL64)


@pytest.mark.parametrize("student_heads", [2, 3, 8])
def test_minilm_refuses_a_student_without_the_teachers_head_count(student_heads):
    """MiniLM compares attention head i with head i (``matching=layerwise``): the student needs the
    teacher's head count, refused before training with the matching mode's message."""
    component = AttentionDistillationLoss(MiniLMLoss(), layer_map=[(2, 1)])
    component.check(4, 4, {"teacher": 32, "student": 16})  # the teacher's heads, narrower: accepted
    with pytest.raises(ValueError, match=rf"teacher has 4 heads and the student {student_heads}"):
        component.check(4, student_heads, {"teacher": 32, "student": 8 * student_heads})


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_the_components_fused_relations_equal_its_block_wise_ones(tiny_model_factory, family, monkeypatch):
    """``fused=True`` on a causal, padded pair of unequal head counts and widths: the kernel computes each
    relation (and MiniLM's attention), with the component's value, details and gradients those of the
    block-wise path."""
    pytest.importorskip(
        "triton", reason="the fused relations run in a Triton kernel; triton is not installed"
    )
    from distill_lab.kernels import attention_kl

    calls, kernel = [], attention_kl.attention_kl_rows
    monkeypatch.setattr(
        attention_kl, "attention_kl_rows", lambda *args: calls.append(args[-1]) or kernel(*args)
    )
    teacher = tiny_model_factory(family, seed=1).to(FUSED_DEVICE)
    narrow = tiny_model_factory(family, seed=2, **NARROW_STUDENT[family]).to(FUSED_DEVICE)
    same_heads = tiny_model_factory(family, seed=2, hidden_size=16, num_hidden_layers=2).to(FUSED_DEVICE)
    inputs = make_tiny_inputs(family, teacher.config, batch_size=2, seq_len=6)
    inputs = {k: v.to(FUSED_DEVICE) for k, v in inputs.items()}
    for loss, student in (
        (RelationLoss(relation_heads=4, temperature=2.0), narrow),
        (MiniLMLoss(), same_heads),
    ):
        results = {}
        for fused in (True, False):
            calls.clear()
            students, teachers = captured(teacher, student, inputs, [2], [1])
            component = AttentionDistillationLoss(loss, layer_map=[(2, 1)], fused=fused)
            total, details = component(students, teachers, inputs["attention_mask"])
            grads = torch.autograd.grad(total, [p for p in student.parameters()], allow_unused=True)
            results[fused] = (total, details, grads, list(calls))
        (total, details, grads, fused_calls), (want, want_details, want_grads, plain_calls) = results.values()
        # one kernel call per part (each relation, MiniLM's attention), causal; none with fused=False
        assert fused_calls == [True] * sum("/" in key for key in details) and plain_calls == []
        torch.testing.assert_close(total, want, atol=1e-6, rtol=1e-5)
        assert details.keys() == want_details.keys()
        for key in details:
            torch.testing.assert_close(details[key], want_details[key], atol=1e-6, rtol=1e-5)
        scale = max(g.abs().max().item() for g in want_grads if g is not None)
        for a, b in zip(grads, want_grads, strict=True):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-3)


# ---------------------------------------------------------------------------------------------- checks


@pytest.mark.parametrize(
    ("relation_heads", "heads", "widths", "message"),
    [
        (3, (4, 2), (32, 16), r"relation_heads=3 does not divide the teacher width 32 and student width 16"),
        (None, (5, 2), (40, 16), r"relation_heads=5 does not divide the student width 16"),
        (8, (4, 2), (32, 12), r"relation_heads=8 does not divide the student width 12"),
    ],
)
def test_relation_heads_that_do_not_divide_a_width_are_refused_before_training(
    relation_heads, heads, widths, message
):
    teacher_width, student_width = widths
    common = [d for d in range(1, student_width + 1) if teacher_width % d == 0 and student_width % d == 0]
    component = AttentionDistillationLoss(RelationLoss(relation_heads=relation_heads), layer_map=[(2, 1)])
    with pytest.raises(ValueError, match=message) as error:
        component.check(*heads, {"teacher": teacher_width, "student": student_width})
    assert f"relation heads that divide both models' widths: {common}" in str(error.value)
    # what does divide both is accepted, whatever the head counts
    component = AttentionDistillationLoss(RelationLoss(relation_heads=common[-1]), layer_map=[(2, 1)])
    component.check(*heads, {"teacher": teacher_width, "student": student_width})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(relations={"qk": 1.0}), r"unknown relation\(s\) \['qk'\]"),
        (dict(relations={"qq": -1.0, "vv": 1.0}), "non-negative weights"),
        (dict(relations={"qq": 0.0}), "at least one positive"),
        (dict(relation_heads=0), "relation_heads must be positive"),
        (dict(temperature=0.0), "temperature must be positive"),
    ],
)
def test_relation_loss_refuses_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        RelationLoss(**options)


def test_relation_setup_needs_the_qk_capture_and_an_insisted_kernel_a_device(monkeypatch):
    for loss in (RelationLoss(), MiniLMLoss()):
        component = AttentionDistillationLoss(loss, layer_map=[(2, 1)])
        component.check_setup("cpu", "qk", 4, 4)
        with pytest.raises(ValueError, match="set capture=qk"):
            component.check_setup("cpu", "probs", 4, 4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    component = AttentionDistillationLoss(RelationLoss(), layer_map=[(2, 1)], fused=True)
    with pytest.raises(ValueError, match="fused=True.*need a CUDA device"):
        component.check_setup("cpu", "qk", 4, 2)


def test_minilmv2_layer_map():
    assert layer_map(12, 4, "minilmv2") == [(11, 3)]
    assert layer_map(24, 6, "minilmv2") == [(20, 5)]
    assert layer_map(6, 3, "minilmv2") == [(5, 2)]
    # the last layer up to 12 layers, then 7/8 of the depth rounded half up
    expected = {1: 0, 12: 11, 13: 10, 16: 13, 24: 20, 32: 27, 36: 31, 48: 41}
    assert {n: minilmv2_teacher_layer(n) for n in expected} == expected


# ---------------------------------------------------------------------------------------------- the config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["loss=relation"], "minilmv2"),
        (["loss=minilm"], "last"),
        (["loss=kl"], "uniform"),
        ([], "uniform"),
        (["loss=relation", "layer_map=uniform"], "uniform"),
        (["loss=minilm", "layer_map=[[3,1]]"], [[3, 1]]),
    ],
)
def test_the_layer_map_follows_the_loss_unless_set(tmp_path, overrides, expected):
    cfg = compose_config(overrides, tmp_path)
    assert OmegaConf.to_container(cfg, resolve=True)["layer_map"] == expected


def test_the_relation_configs_instantiate_their_losses(tmp_path):
    relation = instantiate(compose_config(["loss=relation"], tmp_path).loss)
    assert type(relation) is RelationLoss and relation.relations == {"qq": 1.0, "kk": 1.0, "vv": 1.0}
    assert relation.relation_heads is None and relation.heads(12) == 12 and relation.temperature == 1.0
    options = ["loss=relation", "~loss.relations.kk", "loss.relation_heads=8", "loss.temperature=2"]
    relation = instantiate(compose_config(options, tmp_path).loss)
    assert relation.relations == {"qq": 1.0, "vv": 1.0} and relation.heads(12) == 8
    minilm = instantiate(compose_config(["loss=minilm", "loss.value_weight=0.25"], tmp_path).loss)
    assert type(minilm) is MiniLMLoss and minilm.relations == {"vv": 0.25} and minilm.heads(6) == 6


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=relation", "capture=probs"], "loss=relation .* only capture=qk records; not capture=probs"),
        (["loss=minilm", "capture=probs"], "loss=minilm .* only capture=qk records; not capture=probs"),
        (
            ["loss=relation", "matching=headwise"],
            "matching=headwise does not apply; leave matching=layerwise",
        ),
        (["loss=relation", "matching=global"], "matching=global does not apply"),
    ],
)
def test_check_capture_refuses_what_the_relation_losses_cannot_use(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        checks.check_capture(compose_config(overrides, tmp_path))
    checks.check_capture(compose_config([overrides[0]], tmp_path))  # the defaults: capture=qk, layerwise
    checks.check_capture(compose_config(["loss=minilm", "matching=headwise"], tmp_path))


# ---------------------------------------------------------------------------------------------- the app


@pytest.mark.slow
def test_the_app_distils_relations_into_a_narrower_student_with_fewer_heads(tmp_path, monkeypatch):
    """``loss=relation`` end to end on the built-in task (synthetic data, the built-in teacher's cache
    filled with a tiny 4-layer BERT so that none is trained): a student of 2 heads and width 16 learns the
    relations of the teacher's 4 heads of width 32, last layer to last layer (``layer_map: minilmv2``)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    cache, out = tmp_path / "cache", tmp_path / "run"
    task = make_text_task(tmp_path / "task")  # 4 layers, 4 heads, width 32
    shutil.copytree(task["teacher"], cache / "builtin-sequence_classification-v2")
    overrides = [
        "loss=relation", "student.num_heads=2", "student.hidden_size=16", "debug=fast", "logger=csv",
        "fused_kernel=false",
    ]  # fmt: skip
    train(compose_config(overrides, out, cache))
    assert not (cache / "builtin-sequence_classification-v2" / "teacher_metrics.txt").exists()  # not trained
    results = json.loads((out / "results.json").read_text())
    assert results["layer_map"] == [[3, 1]]
    assert math.isfinite(results["attention_loss"]["L3->1"]) and results["attention_loss"]["L3->1"] > 0
    student = json.loads((out / "student" / "config.json").read_text())
    shape = (student["num_attention_heads"], student["hidden_size"], student["num_hidden_layers"])
    assert shape == (2, 16, 2)
    with open(out / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [r for r in rows if r.get("train/loss")]
    assert len(steps) == 4
    for kind in ("qq", "kk", "vv"):
        values = [float(r[f"train/attention/L3->1/{kind}"]) for r in steps]
        assert all(math.isfinite(v) and v > 0 for v in values), kind
    for r in steps:  # the pair's loss is the sum of its relations (weights 1)
        parts = sum(float(r[f"train/attention/L3->1/{kind}"]) for kind in ("qq", "kk", "vv"))
        assert float(r["train/attention/L3->1"]) == pytest.approx(parts, rel=1e-5)
    validations = [float(r["val/attention_loss"]) for r in rows if r.get("val/attention_loss")]
    assert validations and all(math.isfinite(v) and v > 0 for v in validations)
    # a relation_heads that divides only the teacher's width is refused before training
    with pytest.raises(ValueError, match=r"relation_heads=32 does not divide the student width 16"):
        train(compose_config([*overrides, "loss.relation_heads=32"], tmp_path / "refused", cache))
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_relations_from_probability_maps_are_refused_naming_the_qk_capture():
    """Probability maps (``capture=probs``) and records without values hold no vectors to relate: the
    forward says which capture records them instead of failing inside the loss."""
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(2, 4, 5, 8, generator=generator) for _ in range(3))
    component = AttentionDistillationLoss(RelationLoss(), layer_map=[(0, 0)])
    probs = torch.softmax(query @ key.transpose(-1, -2), -1)
    without_values = QueryKey(query, key, 8**-0.5)
    for student in (probs, without_values):
        with pytest.raises(ValueError, match="only the qk capture records: set capture=qk"):
            component({0: student}, {0: QueryKey(query, key, 8**-0.5, value=value)})
