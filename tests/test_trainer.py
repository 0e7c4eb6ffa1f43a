"""``DistillationTrainer``: the transformers ``Trainer`` path against the Lightning module's loss, training,
the frozen teacher kept out of the optimizer and the checkpoints, gradient accumulation, bf16 on CPU, a DDP
wrapper, the logged keys, the errors before training, and the documented script."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import make_text_task, make_tiny_inputs, make_tiny_model
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForSequenceClassification, TrainingArguments

from distill_lab import (
    AttentionDistillationLoss,
    CausalLM,
    DistillationModule,
    DistillationTrainer,
    HiddenStateLoss,
    SequenceClassification,
    hidden_layer_map,
    kd_loss,
    layer_map,
)

REPO = Path(__file__).resolve().parents[1]
PAIRS = ["attention/L1->0", "attention/L3->1"]  # the uniform map of a 4-layer teacher onto 2 layers
LOGGED = ["loss", "output_loss", "attention_loss", *PAIRS]


def models(family: str, root: Path, *, teacher_seed: int = 0) -> tuple:
    """A 4-layer teacher and a 2-layer student of ``family``, with peaked attention (a wide initialisation)
    so the attention losses are far from 0."""
    teacher = make_tiny_model(family, root / "teacher", seed=teacher_seed, num_hidden_layers=4,
                              initializer_range=0.3)  # fmt: skip
    student = make_tiny_model(family, root / "student", seed=1, num_hidden_layers=2, initializer_range=0.3)
    return teacher, student


def batch(family: str, config, batch_size: int = 4, num_padded: int = 3, seed: int = 0) -> dict:
    """A padded batch with labels: classes for BERT, the input ids (padding at -100) for a causal LM."""
    inputs = make_tiny_inputs(family, config, batch_size=batch_size, num_padded=num_padded, seed=seed)
    if family == "bert":
        inputs["labels"] = torch.arange(batch_size) % config.num_labels
    else:
        inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def rows(inputs: dict) -> list[dict]:
    """The batch as a dataset of examples (Trainer's default collator stacks them back)."""
    return [{k: v[i] for k, v in inputs.items()} for i in range(len(inputs["input_ids"]))]


def arguments(output_dir: Path, **overrides) -> TrainingArguments:
    settings = dict(
        report_to=[], use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_pin_memory=False, learning_rate=1e-2, lr_scheduler_type="constant", seed=0,
    )  # fmt: skip
    return TrainingArguments(str(output_dir), **{**settings, **overrides})


# ---------------------------------------------------------------------------------------------- one loss


@pytest.mark.parametrize("family", ["bert", "llama", "bert-hidden"])
def test_the_loss_its_parts_and_gradients_equal_the_lightning_module_s(tmp_path, family):
    """Same weights, same padded batch: the Trainer's loss, its logged parts (per layer pair) and the
    student's gradients are the Lightning module's. The Trainer gets no attention loss (the CLI's default,
    kl/layerwise/uniform) and no task (LLaMA: causal LM from the class); the module gets both explicitly.
    ``bert-hidden`` adds TinyBERT's hidden-state MSE (equal widths: no projections)."""
    family, hidden = family.split("-")[0], family.endswith("hidden")
    teacher, student = models(family, tmp_path)
    module_teacher, module_student = copy.deepcopy(teacher), copy.deepcopy(student)  # before any capture
    task = SequenceClassification() if family == "bert" else CausalLM()
    attention = AttentionDistillationLoss("kl", "layerwise", layer_map(4, 2, "uniform"))
    options = {}
    if hidden:
        options = {
            "hidden_weight": 0.5,
            "hidden_loss": HiddenStateLoss("mse", hidden_layer_map(4, 2), 32, 32),
        }
    module = DistillationModule(
        module_teacher, module_student, attention, torch.optim.SGD, task=task, **options
    )
    if hidden:
        options["hidden_loss"] = HiddenStateLoss("mse", hidden_layer_map(4, 2), 32, 32)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=arguments(tmp_path / "out"), **options)
    inputs = batch(family, student.config)
    module.train()
    trainer.model.train()

    expected = module(inputs)
    loss = trainer.compute_loss(trainer.model, inputs)
    torch.testing.assert_close(loss, expected.loss, rtol=1e-6, atol=1e-7)
    trainer.log({"loss": loss.item()})  # Trainer's training log: the parts join it
    logged = trainer.state.log_history[-1]
    assert logged["output_loss"] == pytest.approx(float(expected.output_loss), rel=1e-6)
    assert logged["attention_loss"] == pytest.approx(float(expected.attention_loss), rel=1e-6)
    assert sorted(k for k in logged if k.startswith("attention/")) == PAIRS
    for pair in PAIRS:
        assert logged[pair] == pytest.approx(float(expected.details[pair.split("/")[1]]), rel=1e-6)
    assert expected.attention_loss > 0.05  # peaked maps: the attention term is not negligible
    if hidden:
        assert logged["hidden_loss"] == pytest.approx(float(expected.hidden_loss), rel=1e-6)
        assert {k for k in logged if k.startswith("hidden/")} == {
            f"hidden/{k}" for k in expected.hidden_details
        }
        assert len(expected.hidden_details) == 3 and expected.hidden_loss > 0

    loss.backward()
    expected.loss.backward()
    for (name, mine), theirs in zip(student.named_parameters(), module_student.parameters(), strict=True):
        if theirs.grad is not None:
            torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """BERT distilled for 8 steps on 8 padded examples, a checkpoint at step 8, then evaluated."""
    root = tmp_path_factory.mktemp("trained")
    teacher, student = models("bert", root)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    inputs = batch("bert", student.config, batch_size=8)
    args = arguments(root / "out", max_steps=8, per_device_train_batch_size=4, per_device_eval_batch_size=8,
                     save_strategy="steps", save_steps=8)  # fmt: skip
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=rows(inputs),
                                  eval_dataset=rows(inputs))  # fmt: skip
    trainer.train()
    metrics = trainer.evaluate()
    return dict(trainer=trainer, teacher=teacher, student=student, inputs=inputs, metrics=metrics,
                teacher_before=teacher_before, student_before=student_before, root=root)  # fmt: skip


def test_a_few_steps_lower_the_loss(trained):
    losses = [log["loss"] for log in trained["trainer"].state.log_history if "loss" in log]
    assert len(losses) == 8
    assert all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) / 2 < 0.8 * sum(losses[:2]) / 2, losses


def test_each_training_log_holds_the_parts_of_its_loss(trained):
    """Every training log has the objective's parts and the pairs' losses, and Trainer's ``loss`` is their
    objective: ``0.7 * output_loss + 0.3 * attention_loss``."""
    logs = [log for log in trained["trainer"].state.log_history if "loss" in log]
    for log in logs:
        assert set(LOGGED) <= set(log)
        assert log["loss"] == pytest.approx(0.7 * log["output_loss"] + 0.3 * log["attention_loss"], rel=1e-5)
        assert log["attention_loss"] == pytest.approx((log[PAIRS[0]] + log[PAIRS[1]]) / 2, rel=1e-5)


def test_the_teacher_stays_frozen_outside_the_optimizer_and_the_checkpoint(trained):
    trainer, teacher, student = trained["trainer"], trained["teacher"], trained["student"]
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, trained["teacher_before"][name]), name
    assert any(not torch.equal(v, trained["student_before"][k]) for k, v in student.state_dict().items())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}
    assert optimized == {id(p) for p in student.parameters()}
    assert not any(module is teacher for module in trainer.model.modules())
    saved = load_file(trained["root"] / "out" / "checkpoint-8" / "model.safetensors")
    assert set(saved) == set(student.state_dict())  # the 2-layer student's keys only: no layer.2 or .3
    assert not any(".layer.2." in k or ".layer.3." in k for k in saved)
    for name, value in saved.items():
        assert torch.equal(value, student.state_dict()[name]), name


def test_evaluation_reports_the_loss_and_its_parts(trained):
    """One evaluation batch: ``eval_output_loss`` is ``kd_loss`` on float64 logits of the plain forwards,
    and ``eval_loss`` the objective of the parts."""
    metrics, inputs = trained["metrics"], trained["inputs"]
    assert {"eval_loss", "eval_output_loss", "eval_attention_loss", *(f"eval_{p}" for p in PAIRS)} <= set(
        metrics
    )
    with torch.no_grad():
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        student_logits = trained["student"].eval()(**model_inputs).logits.double()
        teacher_logits = trained["teacher"](**model_inputs).logits.double()
    reference = kd_loss(student_logits, teacher_logits, inputs["labels"], 3.0, 0.3)
    assert metrics["eval_output_loss"] == pytest.approx(float(reference), rel=1e-5)
    objective = 0.7 * metrics["eval_output_loss"] + 0.3 * metrics["eval_attention_loss"]
    assert metrics["eval_loss"] == pytest.approx(objective, rel=1e-5)


# ---------------------------------------------------------------------------------------------- accumulation


def _one_step(root: Path, per_device: int, accumulation: int, **options) -> tuple[dict, dict, int]:
    """One SGD step on four equal-length examples: the student's weights after it, the training log, and
    the number of processes (``tests/trainer_ddp_worker.py`` runs it under torchrun)."""
    teacher, student = models("bert", root)
    inputs = batch("bert", student.config, batch_size=4, num_padded=0)
    args = arguments(
        root / "out", max_steps=1, per_device_train_batch_size=per_device, optim="sgd",
        gradient_accumulation_steps=accumulation, learning_rate=0.5, max_grad_norm=0.0, **options,
    )  # fmt: skip
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=rows(inputs))
    trainer.train()
    weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
    return weights, trainer.state.log_history[0], args.world_size


def test_two_accumulated_half_batches_update_as_one_batch(tmp_path):
    """Four equal-length examples, one SGD step: two accumulated micro-batches of two make the update of one
    batch of four (each loss is a mean over examples and query rows, and the halves weigh the same), and the
    logged parts are the micro-batches' mean."""
    whole, whole_log, _ = _one_step(tmp_path / "whole", 4, 1)
    halves, halves_log, _ = _one_step(tmp_path / "halves", 2, 2)
    initial = make_tiny_model(
        "bert", tmp_path / "initial", seed=1, num_hidden_layers=2, initializer_range=0.3
    )
    moved = max((whole[k] - v).abs().max().item() for k, v in initial.state_dict().items())
    assert moved > 1e-3  # the step changed the weights
    for name, value in whole.items():
        torch.testing.assert_close(halves[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for key in LOGGED:
        assert halves_log[key] == pytest.approx(whole_log[key], rel=1e-5), key


# ---------------------------------------------------------------------------------------------- bf16, DDP


@pytest.mark.slow
def test_two_ddp_processes_update_as_one_process_on_the_whole_batch(tmp_path):
    """``torchrun --nproc_per_node=2``: Trainer runs the student under DDP (gloo on CPU), two examples per
    process; the step's update is one process's on all four, and the logged parts are averaged over the
    processes (``tests/trainer_ddp_worker.py``)."""
    from conftest import app_env

    whole, whole_log, _ = _one_step(tmp_path / "whole", 4, 1)
    out = tmp_path / "ddp"
    out.mkdir()
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(Path(__file__).with_name("trainer_ddp_worker.py")), str(out),
    ]  # fmt: skip
    done = subprocess.run(command, env=app_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    log = json.loads((out / "log.json").read_text())
    assert log["world_size"] == 2
    ddp = torch.load(out / "weights.pt", weights_only=True)
    for name, value in whole.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for key in LOGGED:
        assert log[key] == pytest.approx(whole_log[key], rel=1e-5), key


def test_bf16_on_cpu_runs_close_to_float32(tmp_path):
    """``bf16=True`` on CPU: both models run under autocast (the student's logits come out bf16), the loss
    is finite and within bf16's precision of float32's; two steps train, and both models keep the weights'
    dtype as loaded."""
    teacher, student = models("bert", tmp_path)
    inputs = batch("bert", student.config)
    full = DistillationTrainer(model=student, teacher=teacher, args=arguments(tmp_path / "fp32"))
    full.model.train()
    loss32 = full.compute_loss(full.model, inputs).detach()
    full.student_capture.detach()  # one capture per model: the next trainer captures the same models
    full.teacher_capture.detach()
    args = arguments(tmp_path / "bf16", bf16=True, max_steps=2, per_device_train_batch_size=4)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=rows(inputs))
    trainer.model.train()
    loss16, outputs = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    assert outputs["logits"].dtype == torch.bfloat16
    assert torch.isfinite(loss16) and loss16 != loss32
    torch.testing.assert_close(loss16.float(), loss32, rtol=3e-2, atol=1e-2)
    trainer.train()
    assert all(math.isfinite(log["loss"]) for log in trainer.state.log_history if "loss" in log)
    assert {p.dtype for p in (*student.parameters(), *teacher.parameters())} == {torch.float32}


def test_the_student_is_captured_through_a_ddp_wrapper(tmp_path):
    """``compute_loss`` given Trainer's DDP wrapper runs the student through it (its forward, which DDP needs
    to reduce gradients) and captures the student's attention: the loss and gradients of the bare model."""
    teacher, student = models("bert", tmp_path)
    inputs = batch("bert", student.config)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=arguments(tmp_path / "out"))
    student.train()
    bare = trainer.compute_loss(student, inputs)
    bare.backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters()}
    student.zero_grad()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(student)
        calls = []
        wrapped.register_forward_pre_hook(lambda *_: calls.append(1))
        loss = trainer.compute_loss(wrapped, inputs)
        loss.backward()
    finally:
        dist.destroy_process_group()
    assert calls == [1]
    torch.testing.assert_close(loss, bare, rtol=1e-6, atol=1e-7)
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"attention_weight": 1.5}, r"attention_weight=1.5 must be in \[0, 1\]"),
        ({"alpha": -0.1}, r"alpha=-0.1 must be in \[0, 1\]"),
        ({"temperature": 0}, "temperature=0 must be above 0"),
        ({"hidden_weight": -1}, "hidden_weight=-1 must be 0 or more"),
        ({"teacher": None}, "needs teacher="),
        ({"capture": "eager"}, "capture='eager' must be one of probs, qk"),
        ({"compute_loss_func": lambda *a, **k: 0}, "compute_loss_func= is not supported"),
        ({"swap": True}, r"needs a student no deeper than its teacher \(4 > 2 layers\)"),
        ({"task": None, "student_class": True}, "cannot tell the task of a BertModel: pass task="),
    ],
)
def test_bad_arguments_are_refused_before_training(tmp_path, change, message):
    teacher, student = models("bert", tmp_path)
    change = dict(change)
    if change.pop("swap", False):
        teacher, student = student, teacher
    if change.pop("student_class", False):
        student = student.bert  # a bare encoder: no head to tell the task by
    kwargs = {"model": student, "teacher": teacher, "args": arguments(tmp_path / "out"), **change}
    with pytest.raises(ValueError, match=message):
        DistillationTrainer(**kwargs)


def test_the_trainer_loads_no_lightning_hydra_or_omegaconf():
    code = (
        "import sys\n"
        "from distill_lab import DistillationTrainer\n"
        "heavy = [m for m in ('lightning', 'hydra', 'omegaconf') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------------------------------- the script


def test_the_documented_script_distils_and_saves_the_student(tmp_path):
    """``experiments/trainer_script.py``'s ``distil``, which docs/trainer.md and the README show as is, on a
    tiny teacher and the built-in sentences: the student alone is saved and reloads, and the evaluation has
    the parts."""
    from distill_lab.data_synthetic import synthetic_relations

    path = REPO / "experiments" / "trainer_script.py"
    text = path.read_text()
    shown = re.search(r"from transformers import .*?    return trainer.evaluate\(\)\n", text, re.S).group(0)
    assert shown in (REPO / "docs" / "trainer.md").read_text()
    assert shown in (REPO / "README.md").read_text()
    assert len(shown.splitlines()) <= 26
    spec = importlib.util.spec_from_file_location("trainer_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    task = make_text_task(tmp_path / "task", num_layers=4)
    data = synthetic_relations(num_train=32, num_validation=16)
    metrics = script.distil(task["teacher"], data, str(tmp_path / "out"), max_steps=3)
    assert {"eval_loss", "eval_output_loss", "eval_attention_loss"} <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in ("eval_loss", "eval_output_loss"))
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    assert student.config.num_hidden_layers == 2
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_hidden_state_projections_train_in_the_optimizer_and_stay_out_of_the_student(tmp_path):
    """A narrower student (16 wide, the teacher 32): the hidden-state loss's projections are a parameter
    group of Trainer's optimizer and change with a step; the saved student holds none of them."""
    teacher = make_tiny_model("bert", tmp_path / "teacher", num_hidden_layers=4, initializer_range=0.3)
    student = make_tiny_model("bert", tmp_path / "student", seed=1, num_hidden_layers=2, hidden_size=16)
    hidden = HiddenStateLoss("mse", hidden_layer_map(4, 2), 16, 32)
    before = [p.detach().clone() for p in hidden.parameters()]
    inputs = batch("bert", student.config)
    args = arguments(tmp_path / "out", max_steps=1, per_device_train_batch_size=4)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=rows(inputs),
                                  hidden_loss=hidden)  # fmt: skip
    trainer.train()
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in hidden.parameters()} <= optimized
    assert all(not torch.equal(p, b) for p, b in zip(hidden.parameters(), before, strict=True))
    trainer.save_model()
    assert set(load_file(tmp_path / "out" / "model.safetensors")) == set(student.state_dict())


# ---------------------------------------------------------------------------------------------- vocabularies


def test_padded_vocabularies_compare_the_tokenizers_logits_and_need_the_tokenizer(tmp_path, caplog):
    """A causal-LM teacher whose embedding matrix is padded past the shared tokenizer's size: with the
    tokenizer as ``processing_class`` the output loss is KD over its first ``len(tokenizer)`` logits (the
    causal shift, padding at -100); without it, an error before training names both sizes."""
    from distill_lab.data import build_word_tokenizer

    tokenizer = build_word_tokenizer()
    size = len(tokenizer)
    teacher = make_tiny_model("llama", tmp_path / "teacher", vocab_size=64, pad_token_id=0)
    student = make_tiny_model("llama", tmp_path / "student", seed=1, vocab_size=size, num_hidden_layers=2)
    with pytest.raises(ValueError, match="vocabulary has 64 entries and the student's 26: pass their"):
        DistillationTrainer(model=student, teacher=teacher, args=arguments(tmp_path / "none"))
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=arguments(tmp_path / "out"), processing_class=tokenizer
    )
    assert f"the teacher's vocabulary has 64 entries and the student's {size}" in caplog.text
    inputs = make_tiny_inputs("llama", student.config, batch_size=3)
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    trainer.model.eval()
    trainer.compute_loss(trainer.model, inputs)
    with torch.no_grad():
        s = student(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1, :size]
        t = teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits[:, :-1, :size]
    labels = inputs["labels"][:, 1:].reshape(-1)
    keep = labels != -100
    expected = kd_loss(s.reshape(-1, size)[keep], t.reshape(-1, size)[keep], labels[keep], 3.0, 0.3)
    (total, count) = trainer._eval_sums["output_loss"]
    torch.testing.assert_close(total / count, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- LoRA


def test_a_lora_student_trains_its_adapters_and_saves_an_adapter_that_reloads(tmp_path):
    """``apply_lora`` before the trainer: the attention loss's gradient reaches the adapters of the captured
    layers, a few steps change only the adapters and the head (the base stays frozen), and ``save_model``
    writes the adapter, which peft reloads onto the base to give the trained student's logits."""
    from peft import PeftModel

    from distill_lab import apply_lora

    teacher, base = models("bert", tmp_path)
    student = apply_lora(base, r=4, alpha=8)
    data = rows(batch("bert", base.config, batch_size=8))
    args = arguments(tmp_path / "out", max_steps=3, per_device_train_batch_size=4)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data)
    inputs = batch("bert", base.config)
    trainer.model.train()
    attention_only = trainer.objective.attention_loss(*_maps(trainer, inputs), inputs["attention_mask"])[0]
    attention_only.backward()
    adapters = {n: p.grad for n, p in student.named_parameters() if "lora_" in n}
    assert adapters and any(g is not None and g.abs().sum() > 0 for g in adapters.values())
    assert all(p.grad is None for p in student.parameters() if not p.requires_grad)
    student.zero_grad(set_to_none=True)

    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    trainer.train()
    trainer.save_model()
    changed = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)  # the base is frozen
    assert any("lora_" in n for n in changed) and (tmp_path / "out" / "adapter_config.json").exists()
    student.eval()
    probe = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        expected = student(**probe).logits
        fresh = make_tiny_model("bert", tmp_path / "base-again", seed=1, num_hidden_layers=2,
                                initializer_range=0.3)  # fmt: skip
        reloaded = PeftModel.from_pretrained(fresh, tmp_path / "out").eval()
        torch.testing.assert_close(reloaded(**probe).logits, expected, rtol=1e-5, atol=1e-6)


def _maps(trainer, inputs) -> tuple[dict, dict]:
    """The student's (with gradients) and the teacher's captured attention on ``inputs``."""
    forward = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.no_grad():
        teacher_maps = trainer.teacher_capture(**forward)[1]
    return trainer.student_capture(**forward)[1], teacher_maps
