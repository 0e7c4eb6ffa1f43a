"""Hidden-state distillation: ``hidden_mse`` and ``hidden_cosine`` against float64 references written here
(padding, bf16, gradients), ``hidden_layer_map``, ``HiddenStateLoss`` and its projections, the objective's
hidden term in ``DistillationModule`` on tiny BERT, GPT-2 and LLaMA (GQA) pairs with a narrower student, and
``hidden=`` in-process through the app (logged keys, checkpoint, export, resume)."""

from __future__ import annotations

import pytest
import torch

from distill_lab.hidden import HiddenStateLoss, hidden_cosine, hidden_layer_map, hidden_mse
from distill_lab.losses import distillation_objective

SHAPES = [(2, 8, 16), (3, 5, 17)]


def _inputs(shape, *, dtype=torch.float64, seed=0, padded=True):
    """Student and teacher hidden states of ``shape`` and a mask padding the last 2 tokens of the last
    example and the first token of the first (None when not ``padded``)."""
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    teacher = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    mask = None
    if padded:
        mask = torch.ones(shape[:2], dtype=torch.long)
        mask[-1, -2:] = 0
        mask[0, 0] = 0
    return student, teacher, mask


def reference_mse(student, teacher, mask):
    """Token by token in float64: the squared differences of the valid tokens over their number times D."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    batch, length, width = student.shape
    for b in range(batch):
        for i in range(length):
            if mask is None or mask[b, i]:
                diff = student[b, i].double() - teacher[b, i].double()
                total = total + (diff * diff).sum()
                count += 1
    return total / (count * width) if count else total


def reference_cosine(student, teacher, mask):
    """Token by token in float64: 1 - s.t / (|s| |t|), averaged over the valid tokens."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    batch, length, _ = student.shape
    for b in range(batch):
        for i in range(length):
            if mask is None or mask[b, i]:
                s, t = student[b, i].double(), teacher[b, i].double()
                total = total + 1 - (s * t).sum() / (s.pow(2).sum().sqrt() * t.pow(2).sum().sqrt())
                count += 1
    return total / count if count else total


LOSSES = {"mse": (hidden_mse, reference_mse), "cosine": (hidden_cosine, reference_cosine)}


# ------------------------------------------------------------------------------------ the functional losses


@pytest.mark.parametrize("padded", [True, False], ids=["padded", "unpadded"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", LOSSES)
def test_hidden_losses_equal_the_reference_with_their_gradients(name, shape, padded):
    loss, reference = LOSSES[name]
    student, teacher, mask = _inputs(shape, padded=padded)
    student.requires_grad_(True)
    ours, expected = loss(student, teacher, mask), reference(student, teacher, mask)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(ours, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    if mask is not None:  # padded tokens take no part, in the loss or its gradient
        assert (grad[mask == 0] == 0).all() and (grad[mask == 1].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("name", LOSSES)
def test_the_teacher_is_the_target_and_gets_no_gradient(name):
    loss, _ = LOSSES[name]
    student, teacher, mask = _inputs(SHAPES[0])
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    value = loss(student, teacher, mask)
    student_grad, teacher_grad = torch.autograd.grad(value, (student, teacher), allow_unused=True)
    assert student_grad is not None and teacher_grad is None


@pytest.mark.parametrize("name", LOSSES)
def test_bf16_inputs_are_compared_in_float32(name):
    """bf16 hidden states give a float32 loss: the reference on the same (bf16-rounded) values in float64,
    to float32's precision, and gradients that match the reference's."""
    loss, reference = LOSSES[name]
    student, teacher, mask = _inputs(SHAPES[1], dtype=torch.bfloat16)
    student.requires_grad_(True)
    ours = loss(student, teacher, mask)
    assert ours.dtype == torch.float32
    exact = student.detach().double().requires_grad_(True)
    expected = reference(exact, teacher.double(), mask)
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(ours, student)
    (expected_grad,) = torch.autograd.grad(expected, exact)
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-2, atol=1e-4)  # bf16's 8 bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("name", LOSSES)
def test_identical_inputs_give_zero(name, dtype):
    loss, _ = LOSSES[name]
    student, _, mask = _inputs(SHAPES[1], dtype=dtype)
    assert abs(float(loss(student, student.clone(), mask))) < 1e-6


@pytest.mark.parametrize("name", LOSSES)
def test_a_batch_with_no_valid_token_gives_zero_not_nan(name):
    loss, _ = LOSSES[name]
    student, teacher, _ = _inputs(SHAPES[0])
    student.requires_grad_(True)
    value = loss(student, teacher, torch.zeros(SHAPES[0][:2], dtype=torch.long))
    assert float(value.detach()) == 0.0
    (grad,) = torch.autograd.grad(value, student)
    assert (grad == 0).all()
    empty = torch.zeros(0, 4, 8)
    assert float(loss(empty, empty)) == 0.0  # no example at all


def test_the_cosine_ignores_scale_and_the_mse_does_not():
    student, teacher, mask = _inputs(SHAPES[0])
    assert float(hidden_cosine(3.0 * teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-12)
    assert float(hidden_cosine(-teacher, teacher, mask)) == pytest.approx(2.0)
    assert float(hidden_mse(3.0 * teacher, teacher, mask)) == pytest.approx(
        float(reference_mse(2.0 * teacher, torch.zeros_like(teacher), mask))
    )


@pytest.mark.parametrize("name", LOSSES)
def test_shape_mismatches_are_refused_clearly(name):
    loss, _ = LOSSES[name]
    student, teacher, mask = _inputs(SHAPES[0])
    with pytest.raises(ValueError, match=r"student \(2, 8, 8\) and teacher \(2, 8, 16\).*projection"):
        loss(student[..., :8], teacher, mask)
    with pytest.raises(
        ValueError, match=r"attention_mask must have shape \(batch, length\) = \(2, 8\).*\(2, 7\)"
    ):
        loss(student, teacher, mask[:, :7])
    with pytest.raises(ValueError, match=r"\(batch, length, width\)"):
        loss(student[0], teacher[0])


# ---------------------------------------------------------------------------------------------- layer map


@pytest.mark.parametrize(
    ("teacher", "student", "spec", "pairs"),
    [
        (12, 4, "uniform", [(0, 0), (3, 1), (6, 2), (9, 3), (12, 4)]),  # TinyBERT's
        (4, 2, "uniform", [(0, 0), (2, 1), (4, 2)]),
        (3, 2, "uniform", [(0, 0), (2, 1), (3, 2)]),  # 1.5 rounds half up
        (6, 6, "uniform", [(i, i) for i in range(7)]),
        (12, 4, "last", [(12, 4)]),
        (12, 4, [[0, 0], [12, 4]], [(0, 0), (12, 4)]),
        (12, 4, [(8, 2)], [(8, 2)]),
    ],
)
def test_hidden_layer_map(teacher, student, spec, pairs):
    assert hidden_layer_map(teacher, student, spec) == pairs


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("uniformly", r"hidden_layer_map='uniformly' is not a known map: use uniform or last"),
        ([[13, 1]], r"pair \[13, 1\] is not .* the teacher's are 0\.\.12 and the student's 0\.\.4"),
        ([[0, 0], [3, 5]], r"pair \[3, 5\] is not .* 0\.\.12 .* 0\.\.4"),
        ([[-1, 0]], r"pair \[-1, 0\]"),
        ([[1, 2, 3]], r"pair \[1, 2, 3\]"),
        ([], r"no pairs"),
    ],
)
def test_hidden_layer_map_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        hidden_layer_map(12, 4, spec)


def test_uniform_refuses_a_student_deeper_than_its_teacher():
    with pytest.raises(ValueError, match=r"the student has 6 layers and the teacher 4: give explicit pairs"):
        hidden_layer_map(4, 6)
    assert hidden_layer_map(4, 6, [[4, 6]]) == [(4, 6)]


# ------------------------------------------------------------------------------------ the component


def _states(batch=2, length=6, width=16, layers=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, width, generator=generator) for _ in range(layers + 1))


def test_unequal_widths_get_a_trained_projection_per_pair():
    """A student 16 wide against a teacher 32 wide: one Linear(16, 32) per pair, applied before the loss,
    whose training (the student fixed) lowers the loss; the details are the pairs' losses."""
    torch.manual_seed(0)
    loss = HiddenStateLoss("mse", [(0, 0), (2, 1), (4, 2)], student_width=16, teacher_width=32)
    assert [tuple(p.weight.shape) for p in loss.projections] == [(32, 16)] * 3
    student = _states(width=16, layers=2)
    mix = torch.randn(16, 32, generator=torch.Generator().manual_seed(1)) / 4
    teacher = tuple(student[min(t // 2, 2)] @ mix for t in range(5))  # a linear map of the student's states
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    value, details = loss(student, teacher, mask)
    assert list(details) == ["L0->0", "L2->1", "L4->2"] and not any(v.requires_grad for v in details.values())
    for j, (t, s) in enumerate(loss.layer_map):
        expected = reference_mse(loss.projections[j](student[s]).detach(), teacher[t], mask)
        torch.testing.assert_close(details[f"L{t}->{s}"].double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(value, torch.stack(list(details.values())).mean())
    optimizer = torch.optim.SGD(loss.parameters(), lr=2.0)
    first = float(value.detach())
    for _ in range(30):
        optimizer.zero_grad()
        loss(student, teacher, mask)[0].backward()
        optimizer.step()
    assert float(loss(student, teacher, mask)[0].detach()) < 0.1 * first
    assert loss.elements(student, mask) == 10 and loss.elements(student) == 12


def test_equal_widths_have_no_projection_and_layer_weights_weigh_the_pairs():
    loss = HiddenStateLoss("cosine", [(1, 1), (3, 2)], 16, 16, layer_weights=[1.0, 3.0])
    assert not list(loss.parameters())
    student, teacher = _states(layers=2), _states(layers=3, seed=1)
    value, details = loss(student, teacher)
    for t, s in loss.layer_map:
        torch.testing.assert_close(
            details[f"L{t}->{s}"].double(),
            reference_cosine(student[s], teacher[t], None),
            rtol=1e-5,
            atol=1e-7,
        )
    torch.testing.assert_close(value, 0.25 * details["L1->1"] + 0.75 * details["L3->2"])


def test_the_component_names_what_is_missing():
    loss = HiddenStateLoss("mse", [(3, 2)], 16, 16)
    student, teacher = _states(layers=2), _states(layers=3, seed=1)
    with pytest.raises(
        ValueError, match=r"no hidden states from the student: run the model with output_hidden"
    ):
        loss(None, teacher)
    with pytest.raises(ValueError, match=r"no hidden states from the teacher"):
        loss(student, None)
    with pytest.raises(ValueError, match=r"pair L3->2: the teacher has hidden states 0\.\.2 .*not 3"):
        loss(student, teacher[:3])
    with pytest.raises(ValueError, match=r"student's hidden states are 8 wide .* student_width=16"):
        loss(_states(width=8, layers=2), teacher)
    with pytest.raises(ValueError, match=r"unknown hidden-state loss 'l1'; valid choices: mse, cosine"):
        HiddenStateLoss("l1", [(0, 0)], 16, 16)
    with pytest.raises(ValueError, match=r"layer_weights has 1 entries for 2"):
        HiddenStateLoss("mse", [(0, 0), (1, 1)], 16, 16, layer_weights=[1.0])


def test_the_objective_adds_the_hidden_term():
    out, att, hid = torch.tensor(2.0), torch.tensor(5.0), torch.tensor(7.0)
    assert float(distillation_objective(out, att, 0.3, hidden_loss=hid, hidden_weight=0.5)) == pytest.approx(
        0.7 * 2.0 + 0.3 * 5.0 + 0.5 * 7.0
    )
    assert float(distillation_objective(out, att, 0.3, hidden_loss=hid, hidden_weight=0.0)) == pytest.approx(
        0.7 * 2.0 + 0.3 * 5.0
    )
    assert float(distillation_objective(out, att, 0.3)) == pytest.approx(0.7 * 2.0 + 0.3 * 5.0)
    for bad in (-0.1, float("nan")):
        with pytest.raises(ValueError, match=r"hidden_weight must be 0 or more"):
            distillation_objective(out, att, 0.3, hidden_loss=hid, hidden_weight=bad)
