"""Hidden-state distillation: ``hidden_mse`` and ``hidden_cosine`` against float64 references written here
(padding, bf16, gradients), ``hidden_layer_map``, ``HiddenStateLoss`` and its projections, the objective's
hidden term in ``DistillationModule`` on tiny BERT, GPT-2 and LLaMA (GQA) pairs with a narrower student, and
``hidden=`` in-process through the app (logged keys, checkpoint, export, resume)."""

from __future__ import annotations

import csv
import functools
import json

import lightning as L
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


# ------------------------------------------------------------------------------------------------ the module

# family -> the task its tiny models (tests/conftest.py) are trained for
MODULE_FAMILIES = {"bert": "sequence_classification", "gpt2": "causal_lm", "llama": "causal_lm"}
HIDDEN_PAIRS = [(0, 0), (2, 1), (3, 2)]  # hidden_layer_map(3, 2): uniform


def _module(tiny_model_factory, family: str, hidden: str | None = "mse", hidden_weight: float = 0.5):
    """A 3-layer teacher 32 wide and a 2-layer student 16 wide of ``family``, distilled through both
    attention pairs and, with ``hidden``, the uniform hidden-state map through projections."""
    from distill_lab.attention import AttentionDistillationLoss
    from distill_lab.module import DistillationModule
    from distill_lab.tasks import get_task

    teacher = tiny_model_factory(family)
    student = tiny_model_factory(family, seed=1, hidden_size=16, num_hidden_layers=2, intermediate_size=24)
    pairs = hidden_layer_map(teacher.config.num_hidden_layers, student.config.num_hidden_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)  # the projections' initialisation
        hidden_loss = HiddenStateLoss(hidden, pairs, 16, 32) if hidden else None
    return DistillationModule(
        teacher, student, AttentionDistillationLoss("kl", "layerwise", [(1, 0), (2, 1)]),
        functools.partial(torch.optim.SGD, lr=0.1), task=get_task(MODULE_FAMILIES[family]),
        hidden_loss=hidden_loss, hidden_weight=hidden_weight,
    )  # fmt: skip


def _batch(family: str, config, **kwargs) -> dict:
    from conftest import make_tiny_inputs

    batch = make_tiny_inputs(family, config, **kwargs)
    if MODULE_FAMILIES[family] == "sequence_classification":
        batch["labels"] = torch.arange(len(batch["input_ids"])) % config.num_labels
    else:  # the padded positions are no target
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


@pytest.mark.parametrize("family", list(MODULE_FAMILIES))
def test_a_training_step_adds_the_hidden_term_and_trains_the_projections(tiny_model_factory, family):
    """One step's loss is ``(1 - w) L_output + w L_attention + w_h L_hidden`` with ``L_hidden`` computed
    here from the models' own hidden states in float64 (padded, and causal for GPT-2 and LLaMA); the
    projections get gradients and the teacher none."""
    module = _module(tiny_model_factory, family)
    assert module.hidden_loss.layer_map == HIDDEN_PAIRS
    batch = _batch(family, module.teacher.config)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    step = module(batch)
    with torch.no_grad():
        student = module.student(**inputs, output_hidden_states=True).hidden_states
        teacher = module.teacher(**inputs, output_hidden_states=True).hidden_states
    assert len(step.student_hidden) == 3 and len(step.teacher_hidden) == 4
    mask = batch["attention_mask"]
    expected = {}
    for j, (t, s) in enumerate(HIDDEN_PAIRS):
        projection = module.hidden_loss.projections[j]
        projected = student[s].double() @ projection.weight.double().T + projection.bias.double()
        expected[f"L{t}->{s}"] = reference_mse(projected, teacher[t], mask)
    assert set(step.hidden_details) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(step.hidden_details[name].double(), value, rtol=1e-4, atol=1e-6)
    hidden = sum(expected.values()) / 3
    total = 0.7 * step.output_loss.double() + 0.3 * step.attention_loss.double() + 0.5 * hidden
    torch.testing.assert_close(step.loss.double(), total, rtol=1e-5, atol=1e-6)
    assert float(hidden.detach()) > 1e-2 and float(step.attention_loss.detach()) > 0  # every term counts
    step.loss.backward()
    for projection in module.hidden_loss.projections:
        assert projection.weight.grad is not None and projection.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in module.teacher.parameters())
    module.teacher_capture.detach(), module.student_capture.detach()


def test_without_a_hidden_loss_no_hidden_states_are_asked_for(tiny_model_factory):
    """``hidden_loss=None`` (hidden=none): the models run as before, without ``output_hidden_states`` (the
    states cost memory), and the objective is the two-term one."""
    module = _module(tiny_model_factory, "gpt2", hidden=None)
    calls = []
    for model in (module.teacher, module.student):
        model.register_forward_pre_hook(lambda _, args, kwargs: calls.append(kwargs), with_kwargs=True)
    step = module(_batch("gpt2", module.teacher.config))
    assert len(calls) == 2 and not any("output_hidden_states" in kwargs for kwargs in calls)
    assert step.hidden_loss is None and step.student_hidden is None and "hidden_loss" not in module.val_losses
    torch.testing.assert_close(step.loss, 0.7 * step.output_loss + 0.3 * step.attention_loss)
    module.teacher_capture.detach(), module.student_capture.detach()


def test_validation_weighs_each_batch_by_its_valid_tokens(tiny_model_factory):
    """val/hidden_loss over two batches padded differently equals the loss of their union in one batch (each
    batch's mean weighs its valid tokens), and val/loss includes the hidden term."""
    import lightning as L

    module = _module(tiny_model_factory, "bert")
    first = _batch("bert", module.teacher.config, num_padded=1)
    second = _batch("bert", module.teacher.config, num_padded=6, seed=1)
    union = {k: torch.cat([first[k], second[k]]) for k in first}

    def validate(batches):
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        return trainer.validate(module, loader, verbose=False)[0]

    split, whole = validate([first, second]), validate([union])
    keys = ["val/hidden_loss", *(f"val/hidden/L{t}->{s}" for t, s in HIDDEN_PAIRS), "val/loss"]
    for key in keys:
        assert split[key] == pytest.approx(whole[key], rel=1e-5), key
    means = [float(module(batch).hidden_loss.detach()) for batch in (first, second)]
    tokens = [int(batch["attention_mask"].sum()) for batch in (first, second)]  # 15 and 10
    weighted = (means[0] * tokens[0] + means[1] * tokens[1]) / sum(tokens)
    assert whole["val/hidden_loss"] == pytest.approx(weighted, rel=1e-5)
    assert abs(sum(means) / 2 - weighted) > 1e-4 * weighted  # which the mean of the batches' means is not
    total = (
        0.7 * whole["val/output_loss"] + 0.3 * whole["val/attention_loss"] + 0.5 * whole["val/hidden_loss"]
    )
    assert whole["val/loss"] == pytest.approx(total, rel=1e-6)
    module.teacher_capture.detach(), module.student_capture.detach()


def test_the_hidden_states_follow_a_distributed_validations_row_selection(tiny_model_factory):
    """Under FSDP the step's losses are taken over a process's own rows of the whole batch's forward: the
    hidden-state loss of the selected rows' states is the loss of a forward of those rows alone."""
    from distill_lab.repeats import select_hidden_rows, select_map_rows, select_rows

    module = _module(tiny_model_factory, "llama")
    batch = _batch("llama", module.teacher.config, batch_size=3, num_padded=2)
    keep = torch.tensor([True, False, True])
    with torch.no_grad():
        step = module(batch)
        alone = module(select_rows(batch, keep))
        maps = (select_map_rows(step.student_maps, keep), select_map_rows(step.teacher_maps, keep))
        hidden = (
            select_hidden_rows(step.student_hidden, keep),
            select_hidden_rows(step.teacher_hidden, keep),
        )
        own = module._objective(
            select_rows(batch, keep), step.student_logits[keep], step.teacher_logits[keep], *maps, *hidden
        )
    assert select_hidden_rows(None, keep) is None
    torch.testing.assert_close(own.hidden_loss, alone.hidden_loss, rtol=1e-5, atol=1e-6)
    for name, value in alone.hidden_details.items():
        torch.testing.assert_close(own.hidden_details[name], value, rtol=1e-5, atol=1e-6)
    assert abs(float(step.hidden_loss) - float(alone.hidden_loss)) > 1e-4  # the selection mattered
    assert module.hidden_loss.elements(hidden[0], select_rows(batch, keep)["attention_mask"]) == 8 + 6
    module.teacher_capture.detach(), module.student_capture.detach()


# --------------------------------------------------------------------------------------------------- the app

# a 2-layer student 16 wide (random) of the 4-layer BERT teacher 32 wide: hidden pairs (0, 0), (2, 1), (4, 2)
HIDDEN_RUN = [
    "student=from_teacher", "student.num_layers=2", "student.hidden_size=16", "debug=fast", "logger=csv",
    "fused_kernel=false", "hidden=mse", "hidden_weight=0.5",
]  # fmt: skip
APP_PAIRS = ["L0->0", "L2->1", "L4->2"]


@pytest.fixture(scope="module")
def app_task(tmp_path_factory, torch_single_thread):
    """No network or wandb account, the datasets cache in a temporary directory, and a 4-layer BERT teacher
    with its train/validation CSVs."""
    import datasets
    from conftest import make_text_task

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield make_text_task(tmp_path_factory.mktemp("hidden-task"))


class ProjectionProbe(L.Callback):
    """What the module holds when training starts: its projections and whether the optimizer trains them."""

    records: dict[str, dict] = {}

    def __init__(self, key: str) -> None:
        self.key = key

    def on_train_start(self, trainer, module) -> None:
        optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        ProjectionProbe.records[self.key] = {
            "projections": {k: v.detach().clone() for k, v in module.hidden_loss.state_dict().items()},
            "trained": [id(p) in optimized for p in module.hidden_loss.parameters()],
            "student_trained": all(id(p) in optimized for p in module.student.parameters()),
        }


def _run(task: dict, out, *overrides: str) -> dict:
    from conftest import callback_overrides, compose_config

    from distill_lab.run import train

    probe = callback_overrides("probe", ProjectionProbe, key=out.name)
    return train(compose_config([*task["overrides"], *HIDDEN_RUN, *probe, *overrides], out))


def _rows(out) -> list[dict]:
    with open(out / "csv" / "version_0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_run_with_hidden_states_logs_them_and_keeps_the_projections_out_of_the_export(app_task, tmp_path):
    """hidden=mse through the app: train/hidden/L{t}->{s} and val/hidden/... are logged, with the objective
    holding its three terms; the projections train with the student and are in the checkpoints, a resumed
    run reloads them, and the exported student holds none of them."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    first = tmp_path / "first"
    _run(app_task, first)
    rows = _rows(first)
    steps = [r for r in rows if r["train/loss"]]
    assert len(steps) == 4
    for row in steps:
        pairs = [float(row[f"train/hidden/{pair}"]) for pair in APP_PAIRS]
        assert float(row["train/hidden_loss"]) == pytest.approx(sum(pairs) / 3, rel=1e-5)
        parts = (float(row[k]) for k in ("train/output_loss", "train/attention_loss", "train/hidden_loss"))
        out, att, hid = parts
        assert float(row["train/loss"]) == pytest.approx(0.7 * out + 0.3 * att + 0.5 * hid, rel=1e-5)
        assert hid > 0.5 * float(row["train/loss"])  # a random student 16 wide is far from the teacher
    (val,) = [r for r in rows if r["val/hidden_loss"]]
    assert float(val["val/hidden_loss"]) == pytest.approx(
        sum(float(val[f"val/hidden/{pair}"]) for pair in APP_PAIRS) / 3, rel=1e-5
    )
    expected = sum(w * float(val[k]) for w, k in ((0.7, "val/output_loss"), (0.3, "val/attention_loss"),
                                                  (0.5, "val/hidden_loss")))  # fmt: skip
    assert float(val["val/loss"]) == pytest.approx(expected, rel=1e-5)

    probe = ProjectionProbe.records["first"]
    assert probe["trained"] == [True] * 6 and probe["student_trained"]  # 3 pairs: weight and bias each
    state = torch.load(first / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)[
        "state_dict"
    ]
    saved = {k.removeprefix("hidden_loss."): v for k, v in state.items() if k.startswith("hidden_loss.")}
    assert sorted(saved) == sorted(f"projections.{j}.{p}" for j in range(3) for p in ("weight", "bias"))
    assert saved["projections.0.weight"].shape == (32, 16)
    assert any(not torch.equal(saved[k], v) for k, v in probe["projections"].items())  # trained

    exported = load_file(first / "student" / "model.safetensors")
    student_state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    assert set(exported) <= set(student_state) and not any("projection" in k for k in exported)
    student = AutoModelForSequenceClassification.from_pretrained(first / "student")
    assert student.config.hidden_size == 16 and student.config.num_hidden_layers == 2
    card = (first / "student" / "README.md").read_text()
    assert "attention_weight * L_attention + hidden_weight * L_hidden" in card
    assert "| hidden | mse (hidden_weight=0.5, hidden_layer_map=uniform) |" in card
    results = json.loads((first / "results.json").read_text())
    assert results["hidden_layer_map"] == [[0, 0], [2, 1], [4, 2]]
    (best,) = [r for r in rows if r["best/hidden_loss"]]  # the best checkpoint's evaluation, as results.json
    assert results["hidden_loss"] == {p: pytest.approx(float(best[f"best/hidden/{p}"])) for p in APP_PAIRS}
    assert results["parameters"]["student"] == sum(p.numel() for p in student.parameters())

    second = tmp_path / "second"
    _run(app_task, second, "trainer.max_epochs=2", f"ckpt_path='{first / 'checkpoints' / 'last.ckpt'}'")
    for key, value in ProjectionProbe.records["second"]["projections"].items():
        assert torch.equal(value, saved[key]), key  # resumed with the checkpoint's projections
    assert [int(r["step"]) for r in _rows(second) if r["train/hidden_loss"]] == [4, 5, 6, 7]
