"""The backends of the attention component and the one place that chooses among them.

``backends.choose`` honours ``fused``/``gram`` (True: insist, an error quoting the backend's own reason; None:
automatic; False: never), the set-up check ``AttentionDistillationLoss.check_setup`` raises the reason a
forward would give, the maps that a ``qk`` capture keeps within its memory budget are used with nothing
recomputed (and give the block-wise path's and the probs capture's values and gradients), and
``AttentionLoss.per_key`` is what both ``row_terms`` and ``elements`` read.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_inputs

import distill_lab.backends.blockwise as blockwise_module
from distill_lab.attention import AttentionDistillationLoss
from distill_lab.backends import BACKENDS, BackendUnavailable, PairContext, Terms, choose
from distill_lab.backends.blockwise import BlockwiseBackend
from distill_lab.backends.gram import GramBackend
from distill_lab.backends.maps import MapsBackend
from distill_lab.capture import AttentionCapture, QueryKey
from distill_lab.losses import AttentionLoss
from distill_lab.matching import Headwise, Selective
from distill_lab.records import masked_softmax

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _records(length=9, heads=4, seed=0, causal=False):
    gen = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(2, heads, length, 8, generator=gen) for _ in range(4)]
    student = QueryKey(tensors[0].requires_grad_(), tensors[1].requires_grad_(), 8**-0.5, causal=causal)
    return student, QueryKey(tensors[2], tensors[3], 8**-0.5, causal=causal)


def _kept(record: QueryKey) -> QueryKey:
    """The record with its maps kept, as the qk capture keeps them within its budget."""
    scores = record.scores()
    return QueryKey(record.query, record.key, record.scaling, causal=record.causal,
                    maps=(scores, masked_softmax(scores)))  # fmt: skip


def _context(component, student, teacher, mask=None) -> PairContext:
    return component._context((0, 0), {0: student}, {0: teacher}, mask, {})


# ---------------------------------------------------------------------------------------------- the choice


def test_an_insisted_backend_that_does_not_apply_raises_its_own_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    student, teacher = _records()
    component = AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=True)
    with pytest.raises(BackendUnavailable) as info:
        component({0: student}, {0: teacher})
    assert info.value.setting == "fused"
    assert info.value.reason == "they need a CUDA device, and this runs on cpu"
    assert str(info.value) == (
        "fused=True, but the fused attention kernel does not apply: they need a CUDA device, and this runs "
        "on cpu"
    )
    assert isinstance(info.value, ValueError)


def test_each_insisted_backend_must_apply():
    """``gram=True`` beside ``fused=True``: one loss cannot take both, and the one that does not apply says
    so."""
    student, teacher = _records()
    component = AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=True, gram=True)
    with pytest.raises(BackendUnavailable, match="gram=True, but .*only loss=mse_scores"):
        component({0: student}, {0: teacher})


@pytest.mark.parametrize(
    ("loss", "kept", "gram", "chosen"),
    [
        ("kl", True, None, MapsBackend),  # maps at hand: nothing to recompute
        ("kl", False, None, BlockwiseBackend),  # on a CPU the fused kernel is not automatic
        ("mse_scores", False, None, GramBackend),  # L = 40 outgrows half the compared width, 16
        ("mse_scores", False, False, BlockwiseBackend),  # switched off
        ("mse_scores", True, True, GramBackend),  # insisted, maps or not
    ],
)
def test_the_automatic_choice(loss, kept, gram, chosen):
    student, teacher = _records(length=40)
    if kept:
        student, teacher = _kept(student), _kept(teacher)
    component = AttentionDistillationLoss(loss, "layerwise", [(0, 0)], gram=gram)
    assert (
        type(choose(component.backends, _context(component, student, teacher), component.settings)) is chosen
    )


def test_without_float64_the_gram_path_gives_way():
    """An MPS device has no float64, in which the Gram path sums its terms: the choice passes it by."""
    student, teacher = _records(length=40)
    component = AttentionDistillationLoss("mse_scores", "layerwise", [(0, 0)])
    context = _context(component, student, teacher)
    context.device_type = "mps"
    assert GramBackend().problem(context, insisted=True) == (
        "the device has no float64, in which the Gram path sums its terms"
    )
    assert type(choose(component.backends, context, component.settings)) is BlockwiseBackend


def test_a_backend_is_one_class_in_its_own_module_and_one_registry_entry():
    modules = [backend.__module__ for backend in BACKENDS]
    assert modules == [
        "distill_lab.backends.maps", "distill_lab.backends.fused", "distill_lab.backends.gram",
        "distill_lab.backends.blockwise",
    ]  # fmt: skip

    class Constant:  # a backend of one's own, registered first: chosen wherever it applies
        setting, title = None, "a constant"

        def problem(self, context, insisted):
            return None if context.loss.name == "cosine" else "cosine only"

        def terms(self, context):
            values = torch.tensor([0.5, 1.5])
            return Terms(values, torch.ones(2), None)

    student, teacher = _records()
    for loss, constant in (("cosine", True), ("kl", False)):
        component = AttentionDistillationLoss(loss, "layerwise", [(0, 0)])
        component.backends.insert(0, Constant())
        value, _ = component({0: student}, {0: teacher})
        assert (value.item() == 1.0) is constant


# ---------------------------------------------------------------------------------------------- set-up check


@pytest.mark.parametrize(
    ("options", "device", "capture", "reason"),
    [
        (dict(fused=True), "cpu", "qk", "they need a CUDA device, and this runs on cpu"),
        (
            dict(fused=True),
            "cuda",
            "probs",
            "the kernels read queries and keys: both sides must be QueryKey records (capture=qk)",
        ),
        (
            dict(fused=True, loss="mse_scores"),
            "cuda",
            "qk",
            "only loss=kl, mse and cosine have fused kernels",
        ),
        (
            dict(fused=True, matching="global"),
            "cuda",
            "qk",
            "matching=global averages heads in layer pair L0->0",
        ),
        (dict(gram=True, loss="kl"), "cpu", "qk", "only loss=mse_scores has a Gram-matrix form"),
        (
            dict(gram=True, loss="mse_scores"),
            "cpu",
            "probs",
            "both sides must be QueryKey records (capture=qk)",
        ),
    ],
)
def test_check_setup_raises_the_backends_reason_before_a_forward(
    monkeypatch, options, device, capture, reason
):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    options = {"loss": "kl", "matching": "layerwise", **options}
    component = AttentionDistillationLoss(layer_map=[(0, 0)], **options)
    with pytest.raises(BackendUnavailable) as info:
        component.check_setup(device, capture, 4, 4)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    "options",
    [dict(fused=None), dict(fused=False), dict(fused=True, matching=Selective(top_k=2))],
    ids=["automatic", "off", "selective-before-calibration"],
)
def test_check_setup_passes_what_it_cannot_rule_out(options):
    """Automatic and switched-off settings insist on nothing; selective heads are known only once
    calibrated."""
    pytest.importorskip("triton")
    component = AttentionDistillationLoss("kl", layer_map=[(0, 0)], **{"matching": "layerwise", **options})
    component.check_setup("cuda", "qk", 4, 4)  # raises nothing


def test_check_setup_and_the_forward_quote_the_same_reason(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    component = AttentionDistillationLoss("kl", "layerwise", [(0, 0)], fused=True)
    with pytest.raises(BackendUnavailable) as before:
        component.check_setup("cpu", "qk", 4, 4)
    student, teacher = _records()
    with pytest.raises(BackendUnavailable) as during:
        component({0: student}, {0: teacher})
    assert str(before.value) == str(during.value)


# ---------------------------------------------------------------------------------------------- kept maps


def _train_step(teacher, student, inputs, loss, mode, budget, backend="qk"):
    matching = Headwise([[1, 0], [3, 2]]) if mode == "headwise" else mode
    component = AttentionDistillationLoss(loss, matching, [(1, 0), (3, 1)], block_size=4)
    student.zero_grad(set_to_none=True)
    with (
        AttentionCapture(teacher, [1, 3], backend, memory_budget=budget) as tc,
        AttentionCapture(student, [0, 1], backend, memory_budget=budget) as sc,
    ):
        with torch.no_grad():
            _, teacher_records = tc(**inputs)
        outputs, student_records = sc(**inputs)
        value, details = component(student_records, teacher_records, inputs["attention_mask"])
        (value + outputs.logits.square().mean()).backward()  # the layer's output and the loss both
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return value.detach(), details, grads, student_records


@pytest.mark.parametrize("mode", ["layerwise", "headwise", "global"])
@pytest.mark.parametrize("loss", ["kl", "mse", "cosine", "mse_scores"])
def test_kept_maps_give_the_recomputed_and_the_probs_paths(tiny_model_factory, loss, mode):
    """Within the budget the records keep the eager maps, which the loss uses as they are: the value, the
    details and the student's gradients (through the loss and through the layers' outputs) equal those of
    records that keep none (SDPA, block-wise recomputation) and of the probs capture.

    The three compute one function with different sums, so the models run in float64: in float32 the KL and
    cosine of these near-uniform maps (~1e-4) cancel terms of size ~1 that float32 rounds to ~1e-7, a
    difference of ~1e-3 relative that the CPU's vector width moves. In float64 it is ~1e-12: rtol 1e-9 is a
    thousand times that, and gradients are compared to 1e-9 of their largest entry too (a gradient whose
    exact value is 0, as a softmax ignores a constant per row, is rounding alone)."""
    teacher = tiny_model_factory("llama", num_hidden_layers=4, seed=1).double()
    student = tiny_model_factory("llama", num_hidden_layers=2, seed=2).train().double()
    inputs = make_tiny_inputs("llama", teacher.config, batch_size=3, seq_len=13, num_padded=5)
    kept = _train_step(teacher, student, inputs, loss, mode, None)
    assert all(record.maps is not None for record in kept[3].values())
    references = [_train_step(teacher, student, inputs, loss, mode, 0)]
    assert all(record.maps is None for record in references[0][3].values())
    if loss != "mse_scores":
        references.append(_train_step(teacher, student, inputs, loss, mode, None, backend="probs"))
    for value, details, grads, _ in references:
        assert value.dtype == torch.float64
        torch.testing.assert_close(kept[0], value, atol=0, rtol=1e-9)
        assert kept[1].keys() == details.keys()
        for key in details:
            torch.testing.assert_close(kept[1][key], details[key], atol=0, rtol=1e-9)
        assert kept[2].keys() == grads.keys()
        scale = max(grad.abs().max() for grad in grads.values()).item()
        for name in grads:
            torch.testing.assert_close(kept[2][name], grads[name], atol=1e-9 * scale, rtol=1e-9, msg=name)


def test_the_budget_is_decided_per_forward(tiny_model_factory, sdpa_calls):
    """The capture keeps a layer's maps when they fit, from the batch in hand: a short batch keeps them (no
    SDPA in the captured layer), a longer one runs SDPA and keeps queries and keys only."""
    model = tiny_model_factory("bert", num_hidden_layers=2)
    heads = model.config.num_attention_heads
    budget = 2 * 2 * heads * 10 * 10 * 4  # the scores and probabilities of 2 examples of length 10
    with AttentionCapture(model, [1], "qk", memory_budget=budget) as capture, torch.no_grad():
        for length, keeps in ((10, True), (11, False)):
            sdpa_calls.clear()
            inputs = make_tiny_inputs("bert", model.config, batch_size=2, seq_len=length, num_padded=2)
            outputs, records = capture(**inputs)
            assert (records[1].maps is not None) is keeps
            assert len(sdpa_calls) == (1 if keeps else 2)  # layer 0 is not captured: SDPA always
            torch.testing.assert_close(records[1].probs(), records[1].detach().probs(), rtol=0, atol=0)
            plain = model(**inputs).logits
            torch.testing.assert_close(outputs.logits, plain, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="memory_budget must be a number of bytes"):
        AttentionCapture(model, [1], "qk", memory_budget=-1)


def test_at_512_tokens_on_a_cpu_the_default_is_one_pass_without_recomputation(
    tiny_model_factory, monkeypatch
):
    """The CPU benchmark's shapes (batch 2, L = 512, 4 heads): the maps fit the default budget, the capture
    keeps them, and the loss uses them in one pass, with no block recomputed in the backward."""
    checkpoints = []
    real_checkpoint = blockwise_module.checkpoint
    monkeypatch.setattr(
        blockwise_module, "checkpoint", lambda *a, **k: checkpoints.append(1) or real_checkpoint(*a, **k)
    )
    teacher = tiny_model_factory("llama", num_hidden_layers=2, max_position_embeddings=512, seed=1)
    student = tiny_model_factory("llama", num_hidden_layers=1, max_position_embeddings=512, seed=2).train()
    inputs = make_tiny_inputs("llama", teacher.config, batch_size=2, seq_len=512, num_padded=100)
    component = AttentionDistillationLoss("kl", "layerwise", [(1, 0)])
    assert component.block_size < 512  # the records alone would take two blocks, recomputed
    with AttentionCapture(teacher, [1], "qk") as tc, AttentionCapture(student, [0], "qk") as sc:
        with torch.no_grad():
            _, teacher_records = tc(**inputs)
        _, student_records = sc(**inputs)
        assert teacher_records[1].maps is not None and student_records[0].maps is not None
        context = _context(component, student_records[0], teacher_records[1], inputs["attention_mask"])
        assert type(choose(component.backends, context, component.settings)) is MapsBackend
        value, _ = component(student_records, teacher_records, inputs["attention_mask"])
        value.backward()
    assert checkpoints == []
    with AttentionCapture(student, [0], "qk", memory_budget=0) as sc:  # none kept: blocks, recomputed
        _, records = sc(**inputs)
        component(records, teacher_records, inputs["attention_mask"])[0].backward()
    assert checkpoints == [1, 1]


# ---------------------------------------------------------------------------------------------- per_key


def test_per_key_is_what_row_terms_and_elements_read():
    """``per_key`` weighs a row by its valid keys in ``row_terms`` and counts keys in ``elements``: a loss
    that says otherwise is averaged over rows by both."""

    class RowMSE(AttentionLoss):
        per_key = False

    assert [AttentionLoss(n).per_key for n in ("mse", "mse_scores", "kl", "cosine")] == [
        True,
        True,
        False,
        False,
    ]
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    maps = torch.rand(2, 3, 6, 6).softmax(-1)
    for loss, rows_weigh in ((AttentionLoss("mse"), 6), (RowMSE("mse"), 1)):
        _, weights = loss.row_terms(maps, maps.flip(-1), mask)
        assert weights[0, 0, 0] == rows_weigh
        elements = AttentionDistillationLoss(loss, "layerwise", [(0, 0)]).elements({0: maps}, mask)
        assert elements == (6 * 6 + 4 * 4 if rows_weigh == 6 else 6 + 4)


def test_detach_keeps_maps_without_their_gradient():
    student, _ = _records()
    kept = _kept(student)
    detached = kept.detach()
    assert kept.maps[0].requires_grad and not any(m.requires_grad for m in detached.maps)
    assert not detached.query.requires_grad and detached.probs() is detached.maps[1]
