"""Teacher and student of one tokenizer whose embedding matrices are padded to different sizes (Qwen2.5's
152064 and 151936 rows): accepted, with a warning; the output loss and the metrics take the first
``len(tokenizer)`` logits of each. The loss against a float64 reference over those logits (padding, the
causal shift, gradients, bf16), and ``train(cfg)`` end to end for a masked and a causal LM; a student with a
tokenizer of its own is still refused as before.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_config, make_text_task
from hydra.utils import instantiate

from distill_lab.data import build_word_tokenizer
from distill_lab.models import load_tokenizer
from distill_lab.run import train
from distill_lab.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOKENS = len(build_word_tokenizer())  # the built-in word tokenizer: 5 special tokens and 21 words
PADDED = 64  # the tokenizer's size rounded up to a multiple of 64, as Qwen and others pad their embeddings


def _reference(student, teacher, labels, temperature, alpha):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), float64, over the labelled positions of
    the first TOKENS logits of each model."""
    s = student.double()[..., :TOKENS].reshape(-1, TOKENS)
    t = teacher.double()[..., :TOKENS].reshape(-1, TOKENS)
    labels = labels.reshape(-1)
    keep = labels != -100
    s, t, labels = s[keep], t[keep], labels[keep]
    ce = -torch.log_softmax(s, -1)[torch.arange(len(labels)), labels].mean()
    log_t, log_s = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return alpha * ce + (1 - alpha) * temperature**2 * kl


def _models(padded: str):
    sizes = {"teacher": TOKENS, "student": TOKENS, padded: PADDED}
    return sizes, *(
        SimpleNamespace(config=SimpleNamespace(vocab_size=sizes[r])) for r in ("teacher", "student")
    )


@pytest.mark.parametrize("padded", ["teacher", "student"])
@pytest.mark.parametrize("task_name", ["masked_lm", "causal_lm"])
def test_output_loss_compares_the_tokenizers_logits(task_name, padded, caplog):
    task = get_task(task_name)
    sizes, teacher, student = _models(padded)
    with caplog.at_level(logging.WARNING, logger="distill_lab.tasks"):
        task.fit_vocabularies(teacher, student, build_word_tokenizer())
    assert (
        f"the teacher's vocabulary has {sizes['teacher']} entries and the student's {sizes['student']}, over "
        f"the tokenizer's {TOKENS} tokens: the output loss and the metrics compare the first {TOKENS} logits"
    ) in caplog.text
    assert task.vocab_size == TOKENS
    assert task.num_classes(teacher.config) == task.num_classes(student.config) == TOKENS

    generator = torch.Generator().manual_seed(0)
    s = torch.randn(3, 7, sizes["student"], generator=generator, dtype=torch.float64)
    t = torch.randn(3, 7, sizes["teacher"], generator=generator, dtype=torch.float64)
    s[..., TOKENS:] += 30.0  # padding rows that would take every bit of the mass if they were compared
    t[..., TOKENS:] += 30.0
    labels = torch.randint(5, TOKENS, (3, 7), generator=generator)
    labels[2, 4:] = -100  # padding
    if task_name == "masked_lm":
        labels[0, ::2] = -100  # unmasked tokens
    s.requires_grad_(True)
    loss = task.output_loss(s, t, {"labels": labels}, 2.0, 0.4)
    # the causal LM's position i predicts token i + 1: shifted labels, the last position without a target
    targets = labels if task_name == "masked_lm" else torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    reference_s = s.detach().clone().requires_grad_(True)
    reference = _reference(reference_s, t, targets, 2.0, 0.4)
    torch.testing.assert_close(loss, reference, rtol=1e-10, atol=1e-12)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(s.grad, reference_s.grad, rtol=1e-10, atol=1e-12)
    assert not s.grad[..., TOKENS:].any()  # the student's padding rows are not trained
    assert task.output_count({"labels": labels}) == int((targets != -100).sum())

    # bf16 logits: computed in float32 against the reference of the bf16 values
    low = task.output_loss(s.detach().bfloat16(), t.bfloat16(), {"labels": labels}, 2.0, 0.4)
    expected = _reference(s.detach().bfloat16(), t.bfloat16(), targets, 2.0, 0.4)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), expected, rtol=1e-5, atol=1e-5)

    # perplexity (and masked accuracy) over the first TOKENS logits, exp of the reference cross-entropy
    metrics = task.metrics("val/", task.num_classes(student.config))
    task.update(metrics, s.detach(), {"labels": labels})
    scores = metrics.compute()
    assert scores["val/perplexity"].item() == pytest.approx(
        math.exp(_reference(s.detach(), t, targets, 1.0, 1.0).item()), rel=1e-5
    )
    if task_name == "masked_lm":
        keep = targets != -100
        right = (s.detach()[..., :TOKENS].argmax(-1) == targets)[keep].float().mean()
        assert scores["val/masked_acc"].item() == pytest.approx(right.item())


def test_models_of_one_size_keep_every_logit():
    """Equal vocabularies (padded alike, or not at all) compare every logit, as before."""
    task = get_task("causal_lm")
    same = SimpleNamespace(config=SimpleNamespace(vocab_size=PADDED))
    task.fit_vocabularies(same, same, build_word_tokenizer())
    assert task.vocab_size is None and task.num_classes(same.config) == PADDED


# ---------------------------------------------------------------------------------------------- end to end

RUN = ["student=hf", "debug=fast", "logger=csv", "fused_kernel=false", "trainer.limit_train_batches=2"]


@pytest.mark.parametrize(
    ("task_name", "family", "padded"), [("masked_lm", "bert", "teacher"), ("causal_lm", "llama", "student")]
)
def test_a_run_with_padded_vocabularies_trains_on_the_tokenizers_logits(
    tmp_path, caplog, task_name, family, padded
):
    sizes = {"teacher": TOKENS, "student": TOKENS, padded: PADDED}
    task = make_text_task(tmp_path / "task", family, task=task_name, vocab_size=sizes["teacher"])
    student = make_text_task(
        tmp_path / "student", family, num_layers=2, task=task_name, vocab_size=sizes["student"], seed=1
    )["teacher"]
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="distill_lab.tasks"):
        metrics = train(compose_config([*task["overrides"], *RUN, f"student.name_or_path='{student}'"], out))
    assert (
        f"the teacher's vocabulary has {sizes['teacher']} entries and the student's {sizes['student']}, over "
        f"the tokenizer's {TOKENS} tokens"
    ) in caplog.text
    results = json.loads((out / "results.json").read_text())
    assert math.isfinite(metrics["val/perplexity"]) and results["trained_steps"] == 2
    # the teacher's perplexity is exp of its cross-entropy over the tokenizer's logits, on what validation saw
    cfg = compose_config([*task["overrides"], *RUN, f"student.name_or_path='{student}'"], out)
    data = instantiate(cfg.data, tokenizer=load_tokenizer(task["teacher"]))
    teacher = get_task(task_name).auto_class.from_pretrained(task["teacher"]).eval()
    total = count = 0.0
    with torch.no_grad():
        for batch in itertools.islice(data.val_dataloader(), cfg.trainer.limit_val_batches):
            logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits[..., :TOKENS]
            labels = batch["labels"]
            if task_name == "causal_lm":
                logits, labels = logits[:, :-1], labels[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, TOKENS).double(), labels.reshape(-1), reduction="sum"
            ).item()
            count += int((labels != -100).sum())
    assert results["teacher"]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    exported = get_task(task_name).auto_class.from_pretrained(out / "student")
    assert exported.config.vocab_size == sizes["student"]  # the student keeps its own rows


def test_a_padded_student_with_a_tokenizer_of_its_own_is_still_refused(tmp_path):
    task = make_text_task(tmp_path / "task", "llama", task="causal_lm")
    student = make_text_task(
        tmp_path / "student", "llama", num_layers=2, task="causal_lm", vocab_size=PADDED
    )["teacher"]
    words = build_word_tokenizer().get_vocab()
    reordered = sorted((w for w in words if not w.startswith("[")), key=lambda w: words[w], reverse=True)
    build_word_tokenizer(reordered).save_pretrained(student)  # the same words, other ids
    with pytest.raises(
        ValueError,
        match=r"student\.name_or_path=.* has a tokenizer of its own that is not the teacher's \(\d+ of the "
        r"teacher's \d+ tokens are missing or have other ids\)",
    ):
        train(
            compose_config([*task["overrides"], *RUN, f"student.name_or_path='{student}'"], tmp_path / "run")
        )
