"""The ``qk`` capture backend and the block-wise attention losses computed from queries and keys.

The reference is the ``probs`` backend (eager attention maps, itself tested against transformers' eager
attention in test_capture.py): values and gradients must agree for every loss and matching mode, on BERT
and on LLaMA with grouped-query attention, with padding, causal masks and blocks smaller than the sequence.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_inputs

from distill_lab.attention import AttentionDistillationLoss
from distill_lab.capture import AttentionCapture, QueryKey
from distill_lab.losses import AttentionLoss
from distill_lab.matching import Selective

LOSSES = ("kl", "mse", "cosine")
MODES = ("layerwise", "headwise", "global", "selective")


pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _run(
    teacher, student, inputs, backend, loss, mode, block_size, teacher_layers=(1, 3), student_layers=(0, 1)
):
    """Attention loss, its details and the student's gradients through one backend. The qk records keep no
    maps (``memory_budget=0``), so that the loss recomputes them block by block."""
    pairs = list(zip(teacher_layers, student_layers, strict=True))
    matching = Selective(heads=[[0, 1], [3, 0]]) if mode == "selective" else mode
    component = AttentionDistillationLoss(loss, matching, pairs, block_size=block_size)
    student.zero_grad(set_to_none=True)
    with (
        AttentionCapture(teacher, teacher_layers, backend, memory_budget=0) as tc,
        AttentionCapture(student, student_layers, backend, memory_budget=0) as sc,
    ):
        with torch.no_grad():
            _, teacher_maps = tc(**inputs)
        _, student_maps = sc(**inputs)
        value, details = component(student_maps, teacher_maps, inputs.get("attention_mask"))
        value.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return value.detach(), details, grads


@pytest.mark.parametrize("family", ["bert", "llama", "gpt2"])
def test_qk_records_give_the_probs_backend_maps(tiny_model_factory, family):
    model = tiny_model_factory(family, num_hidden_layers=3)
    inputs = make_tiny_inputs(family, model.config, batch_size=3, seq_len=11, num_padded=4)
    with AttentionCapture(model, [0, 2], "probs") as capture, torch.no_grad():
        reference_out, maps = capture(**inputs)
    # no kept maps (memory_budget=0): SDPA stays in place and the records recompute the probabilities
    with AttentionCapture(model, [0, 2], "qk", memory_budget=0) as capture, torch.no_grad():
        out, records = capture(**inputs)
        plain = model(**inputs)
    assert all(record.maps is None for record in records.values())
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)  # SDPA is left in place
    torch.testing.assert_close(out.logits, reference_out.logits, atol=1e-5, rtol=1e-5)
    for layer in (0, 2):
        record = records[layer]
        assert isinstance(record, QueryKey)
        assert record.shape == tuple(maps[layer].shape)
        assert record.key.shape[1] == getattr(
            model.config, "num_key_value_heads", model.config.num_attention_heads
        )
        # queries of real tokens: the same probabilities, whole or block by block
        real = inputs["attention_mask"].bool()[:, None, :, None].expand_as(maps[layer])
        full = record.probs()
        blocks = torch.cat([record.probs(slice(i, min(i + 4, 11))) for i in range(0, 11, 4)], dim=2)
        torch.testing.assert_close(full[real], maps[layer][real], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(blocks, full, atol=1e-7, rtol=1e-6)


def test_qk_records_are_pre_dropout(tiny_model_factory):
    model = tiny_model_factory("bert", num_hidden_layers=2, attention_probs_dropout_prob=0.5)
    inputs = make_tiny_inputs("bert", model.config)
    with AttentionCapture(model, [0], "qk") as capture, torch.no_grad():
        _, eval_records = capture(**inputs)
        model.train()
        _, train_records = capture(**inputs)
    torch.testing.assert_close(train_records[0].probs(), eval_records[0].probs())
    assert torch.allclose(train_records[0].probs().sum(-1), torch.ones(()))


# The two paths compute one function with different sums (whole maps, or scores block by block), so the
# models below run in float64. In float32 the KL and cosine of these near-uniform maps (~1e-4) cancel terms of
# size ~1 (log-probabilities ~2.6; a cosine ~1) that float32 rounds to ~1e-7: a difference of ~1e-3 relative,
# which the block size and the CPU's vector width move. In float64 the same cancellation leaves ~1e-12:
# QK_RTOL is a thousand times that, and a real difference (a mask, a scale, a row counted twice) is 1e-3 or
# more. A gradient whose exact value is 0 (a key bias: softmax ignores a constant per row) is rounding alone,
# so gradients are compared to QK_RTOL of their largest entry as well.
QK_RTOL = 1e-9


def _assert_same_gradients(grads: dict, ref_grads: dict) -> None:
    assert grads.keys() == ref_grads.keys()
    scale = max(grad.abs().max() for grad in ref_grads.values()).item()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=QK_RTOL * scale, rtol=QK_RTOL, msg=name)


@pytest.mark.parametrize("family", ["bert", "llama"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_qk_loss_and_gradients_equal_the_probs_path(tiny_model_factory, family, loss, mode):
    teacher = tiny_model_factory(family, num_hidden_layers=4, seed=1).double()
    student = tiny_model_factory(family, num_hidden_layers=2, seed=2).train().double()
    inputs = make_tiny_inputs(family, teacher.config, batch_size=3, seq_len=13, num_padded=5)
    ref_value, ref_details, ref_grads = _run(teacher, student, inputs, "probs", loss, mode, 256)
    assert ref_value > 0 and ref_grads and ref_value.dtype == torch.float64
    for block_size in (1, 5, 256):
        value, details, grads = _run(teacher, student, inputs, "qk", loss, mode, block_size)
        torch.testing.assert_close(value, ref_value, atol=0, rtol=QK_RTOL)
        assert details.keys() == ref_details.keys()
        for key in details:
            torch.testing.assert_close(details[key], ref_details[key], atol=0, rtol=QK_RTOL)
        _assert_same_gradients(grads, ref_grads)


def test_qk_causal_left_padding_and_blocks(tiny_model_factory):
    """GPT-2 with left padding: the queries of a block are positioned by the block, not the sequence end."""
    teacher = tiny_model_factory("gpt2", num_hidden_layers=2, seed=1).double()  # float64: see QK_RTOL
    student = tiny_model_factory("gpt2", num_hidden_layers=2, seed=2).train().double()
    inputs = make_tiny_inputs("gpt2", teacher.config, batch_size=2, seq_len=9, num_padded=0)
    inputs["attention_mask"][1, :3] = 0  # left padding
    ref = _run(teacher, student, inputs, "probs", "kl", "layerwise", 256, (0, 1), (0, 1))
    got = _run(teacher, student, inputs, "qk", "kl", "layerwise", 2, (0, 1), (0, 1))
    torch.testing.assert_close(got[0], ref[0], atol=0, rtol=QK_RTOL)
    _assert_same_gradients(got[2], ref[2])


def test_selective_calibrates_on_qk_records(tiny_model_factory):
    teacher = tiny_model_factory("bert", num_hidden_layers=4, seed=1)
    student = tiny_model_factory("bert", num_hidden_layers=2, seed=2)
    inputs = make_tiny_inputs("bert", teacher.config, batch_size=3, seq_len=10)
    chosen = {}
    for backend in ("probs", "qk"):
        component = AttentionDistillationLoss("kl", Selective(top_k=2), [(1, 0), (3, 1)])
        with (
            AttentionCapture(teacher, [1, 3], backend) as tc,
            AttentionCapture(student, [0, 1], backend) as sc,
        ):
            with torch.no_grad():
                _, teacher_maps = tc(**inputs)
                _, student_maps = sc(**inputs)
            chosen[backend] = component.calibrate(student_maps, teacher_maps, inputs["attention_mask"])
    assert chosen["qk"] == chosen["probs"] and len(chosen["qk"]["L1->0"]) == 2


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``fn`` runs."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def test_qk_loss_keeps_no_quadratic_state_for_the_backward():
    """Block-wise with checkpointing, the loss saves O(L) for the backward; the probs path saves O(L^2)."""
    torch.manual_seed(0)

    def saved(length: int, backend: str) -> int:
        q_s = torch.randn(1, 2, length, 8, requires_grad=True)
        k_s = torch.randn(1, 2, length, 8, requires_grad=True)
        q_t, k_t = torch.randn(1, 4, length, 8), torch.randn(1, 4, length, 8)
        student, teacher = QueryKey(q_s, k_s, 8**-0.5), QueryKey(q_t, k_t, 8**-0.5)
        component = AttentionDistillationLoss("kl", "layerwise", [(0, 0)], block_size=16)
        if backend == "probs":
            student, teacher = student.probs(), teacher.probs()
        return _saved_bytes(lambda: component({0: student}, {0: teacher})[0])

    qk_small, qk_large = saved(128, "qk"), saved(512, "qk")
    probs_small, probs_large = saved(128, "probs"), saved(512, "probs")
    assert qk_large / qk_small < 5  # 4x the length: about 4x the saved bytes (linear)
    assert probs_large / probs_small > 12  # about 16x (quadratic)
    assert qk_large < probs_large / 10


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("block_size", [3, 256])
def test_mse_scores_matches_tinybert_reference(causal, block_size):
    """TinyBERT's loss: MSE of pre-softmax scores, masked entries 0, mean over valid (query, key) elements."""
    g = torch.Generator().manual_seed(0)
    q_s, k_s = (
        torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64),
    )
    q_t, k_t = (
        torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 7, 8, generator=g, dtype=torch.float64),
    )
    q_s.requires_grad_()
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    additive = (1.0 - mask[:, None, None, :].double()) * torch.finfo(torch.float64).min
    student = QueryKey(q_s, k_s, 0.5, additive if not causal else None, causal=causal)
    teacher = QueryKey(q_t, k_t, 0.25, additive if not causal else None, causal=causal)
    component = AttentionDistillationLoss("mse_scores", "layerwise", [(0, 0)], block_size=block_size)
    value, _ = component({0: student}, {0: teacher}, mask)

    s = 0.5 * q_s @ k_s.repeat_interleave(2, 1).transpose(-1, -2)
    t = 0.25 * q_t @ k_t.transpose(-1, -2)
    allowed = mask.bool()[:, None, None, :].expand(2, 4, 7, 7)
    if causal:
        allowed = allowed & torch.ones(7, 7, dtype=torch.bool).tril()
    diff = torch.where(allowed, s - t, torch.zeros(()))  # masked entries are 0 on both sides
    valid = mask.bool()[:, None, :, None] & mask.bool()[:, None, None, :]  # valid queries x valid keys
    reference = (diff.square() * valid).sum() / valid.expand(2, 4, 7, 7).sum()
    torch.testing.assert_close(value, reference)
    (grad,) = torch.autograd.grad(value, q_s)
    (want,) = torch.autograd.grad(reference, q_s)
    torch.testing.assert_close(grad, want)


def test_mse_scores_needs_queries_and_keys():
    maps = torch.rand(1, 2, 3, 3).softmax(-1)
    with pytest.raises(ValueError, match="capture=qk"):
        AttentionDistillationLoss("mse_scores", "layerwise", [(0, 0)])({0: maps}, {0: maps})


AUTOCAST_CASES = [  # (loss, mode, gram): the block-wise path for every loss, and mse_scores' Gram-matrix path
    *((loss, mode, False) for loss in (*LOSSES, "mse_scores") for mode in ("layerwise", "global")),
    ("mse_scores", "layerwise", True),
    ("mse_scores", "global", True),
]


@pytest.mark.parametrize(("loss", "mode", "gram"), AUTOCAST_CASES)
def test_attention_losses_ignore_bf16_autocast(loss, mode, gram):
    """``trainer=gpu`` trains under bf16 autocast, which would run the products of queries and keys in bf16:
    on a student close to its teacher that rounding changes a loss by tens of percent (and cancels the Gram
    path's terms to 0). The losses from the same float32 queries and keys are the same with and without it."""
    torch.manual_seed(0)
    teacher = QueryKey(torch.randn(2, 4, 32, 8), torch.randn(2, 2, 32, 8), 8**-0.5)
    student = QueryKey(
        (teacher.query + 0.01 * torch.randn_like(teacher.query)).requires_grad_(),
        (teacher.key + 0.01 * torch.randn_like(teacher.key)).requires_grad_(),
        8**-0.5,
    )
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0
    component = AttentionDistillationLoss(loss, mode, [(0, 0)], block_size=16, fused=False, gram=gram or None)
    expected, _ = component({0: student}, {0: teacher}, mask)
    expected_grad = torch.autograd.grad(expected, student.query)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, _ = component({0: student}, {0: teacher}, mask)
        assert student.scores().dtype == torch.float32
    grad = torch.autograd.grad(value, student.query)[0]
    assert expected > 0
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-9)


def test_probs_capture_ignores_bf16_autocast():
    """The probs backend computes its maps inside the model's forward, where autocast is on under
    bf16-mixed."""
    from distill_lab.capture import _STATE, _record_and_attend

    class Recorder:
        backend = "probs"
        maps = {}

        def _record(self, layer, probs):
            self.maps[layer] = probs

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) * 3 for _ in range(3))
    module = torch.nn.Module().eval()
    module.is_causal = False
    setattr(module, _STATE, (Recorder(), 0))
    _, expected = _record_and_attend(module, q, k, v, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, probs = _record_and_attend(module, q, k, v, None)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)


def _kl_reference(
    student: QueryKey, teacher: QueryKey, mask: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over real query rows of ``T^2 KL(teacher_T || student_T)``, each side ``log_softmax`` of its own
    float64 scores over the real keys it may see (causal)."""
    total, rows = 0.0, 0
    batch, heads, length, _ = student.shape
    for b in range(batch):
        for h in range(heads):
            for q in range(length):
                if not mask[b, q]:
                    continue
                keys = mask[b].bool() & (torch.arange(length) <= q)
                log = [
                    torch.log_softmax(
                        (r.query[b, h, q].double() @ r.key[b, h].double().T * r.scaling)[keys] / temperature,
                        -1,
                    )
                    for r in (student, teacher)
                ]
                total = total + temperature**2 * (log[1].exp() * (log[1] - log[0])).sum()
                rows += 1
    return total / rows


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kl_from_records_is_exact_for_scores_far_apart(temperature):
    """Sharp attention (a score ~100 or more below the row's largest) gives probabilities below float32's
    range; KL taken from probabilities would floor the student's log there, with a wrong value and no
    gradient. From queries and keys the block-wise path takes exact log-probabilities."""
    torch.manual_seed(0)
    length = 9
    teacher = QueryKey(
        (torch.randn(2, 2, length, 4) * 12).double(),
        (torch.randn(2, 2, length, 4) * 12).double(),
        0.5,
        causal=True,
    )
    student = QueryKey(
        (torch.randn(2, 2, length, 4) * 12).double().requires_grad_(),
        (torch.randn(2, 2, length, 4) * 12).double().requires_grad_(),
        0.5,
        causal=True,
    )
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :2] = 0  # left padding
    gaps = (teacher.scores().amax(-1, keepdim=True) - teacher.scores()).masked_fill(
        ~torch.isfinite(teacher.scores()), 0
    )
    assert gaps.max() > 150
    component = AttentionDistillationLoss(
        AttentionLoss("kl", temperature=temperature), "layerwise", [(0, 0)], block_size=4, fused=False
    )
    value, _ = component({0: student}, {0: teacher}, mask)
    expected = _kl_reference(student, teacher, mask, temperature)
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    grads = torch.autograd.grad(value, (student.query, student.key))
    expected_grads = torch.autograd.grad(expected, (student.query, student.key))
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(
    ("loss", "gram", "records"),
    [("kl", None, True), ("mse", None, True), ("cosine", None, True), ("mse_scores", True, True),
     ("mse_scores", False, True), ("kl", None, False), ("mse", None, False)],
)  # fmt: skip
def test_no_gradient_reaches_the_teacher(loss, gram, records):
    """The teacher's maps, queries and keys are the target: whatever the path (block-wise from records, the
    Gram-matrix form of mse_scores, maps, a callable loss), the gradient reaches the student's side only."""
    generator = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(2, 4, 9, 8, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(4)
    ]
    qs, ks, qt, kt = tensors
    mask = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])
    for component in (
        AttentionDistillationLoss(loss, "layerwise", [(0, 0)], block_size=4, gram=gram),
        AttentionDistillationLoss(AttentionLoss(loss), "global", [(0, 0)], block_size=4),
        AttentionDistillationLoss(
            lambda s, t, m, per_head=False: (s - t).square().mean(), "layerwise", [(0, 0)]
        ),
    ):
        if loss == "mse_scores" and component.loss.__class__ is not AttentionLoss:
            continue
        for tensor in tensors:
            tensor.grad = None
        student, teacher = QueryKey(qs, ks, 8**-0.5), QueryKey(qt, kt, 8**-0.5)
        if not records:  # probability maps
            student, teacher = student.probs(), teacher.probs()
        value, _ = component({0: student}, {0: teacher}, mask)
        value.backward()
        assert qs.grad is not None and qs.grad.abs().sum() > 0
        assert qt.grad is None and kt.grad is None
