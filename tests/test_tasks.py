"""Tasks beyond text classification: masked LM, causal LM and image classification.

The output losses and metrics against float64 references written here and against the models' own ``loss``;
the raw-text and image-folder data modules; and ``train(cfg)`` end to end on tiny random BERT, RoBERTa
(masked LM), GPT-2, LLaMA with grouped-query attention (causal LM) and ViT (images), each loaded by path.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, compose_config, make_image_task, make_text_task, make_tiny_config
from datasets import Dataset, DatasetDict
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import UnidentifiedImageError
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
)

from distill_lab.data import TextClassificationData, build_word_tokenizer, synthetic_relations
from distill_lab.data_images import ImageFolderData, image_folders
from distill_lab.data_lm import LanguageModelingData, synthetic_text
from distill_lab.models import load_teacher, load_tokenizer
from distill_lab.run import train
from distill_lab.tasks import TASKS, get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _kd_reference(student, teacher, labels, temperature, alpha):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T) over labelled positions, float64."""
    s, t = student.double().reshape(-1, student.shape[-1]), teacher.double().reshape(-1, teacher.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != -100
    s, t, labels = s[keep], t[keep], labels[keep]
    ce = -torch.log_softmax(s, -1)[torch.arange(len(labels)), labels].mean()
    log_t, log_s = torch.log_softmax(t / temperature, -1), torch.log_softmax(s / temperature, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return alpha * ce + (1 - alpha) * temperature**2 * kl


# -------------------------------------------------------------------------------------------- losses, metrics


def test_causal_lm_loss_and_perplexity_are_next_token(tmp_path):
    """Position t predicts token t + 1; padding is ignored; perplexity is exp of the model's own loss."""
    config = make_tiny_config("llama", pad_token_id=0)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(3, config.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 2:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    student = torch.randn(3, 9, config.vocab_size, dtype=torch.float64)
    with torch.no_grad():
        out = model(**batch)
    task = get_task("causal_lm")
    value = task.output_loss(student, out.logits, batch, temperature=2.0, alpha=0.3)
    reference = _kd_reference(student[:, :-1], out.logits[:, :-1], labels[:, 1:], 2.0, 0.3)
    torch.testing.assert_close(value.double(), reference, rtol=1e-6, atol=1e-9)
    metrics = task.metrics("val/", config.vocab_size)
    task.update(metrics, out.logits, batch)
    assert float(metrics.compute()["val/perplexity"]) == pytest.approx(math.exp(out.loss.item()), rel=1e-4)


def test_perplexity_stays_finite_where_a_targets_probability_underflows():
    """exp of the mean cross-entropy over the labelled positions, over updates, float64 reference; a target
    whose probability is below float32's smallest (torchmetrics' Perplexity took its log: inf) counts its
    finite loss."""
    task = get_task("causal_lm")
    metrics = task.metrics("val/", 5)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 4, 5, generator=g), torch.randn(1, 6, 5, generator=g)]
    logits[0][1, 2] = torch.tensor([0.0, 110.0, 0.0, 0.0, 0.0])  # target 0 at about exp(-110): 0 in float32
    labels = [torch.tensor([[1, 2, 3, -100], [4, 4, 3, 0]]), torch.tensor([[2, 2, 1, 0, -100, -100]])]
    total, count = 0.0, 0
    for x, y in zip(logits, labels, strict=True):
        batch = {"labels": y}
        task.update(metrics, x, batch)
        shifted = y[:, 1:].reshape(-1)
        keep = shifted != -100
        log_p = torch.log_softmax(x[:, :-1].double().reshape(-1, 5), -1)[keep]
        total -= log_p[torch.arange(int(keep.sum())), shifted[keep]].sum().item()
        count += int(keep.sum())
        assert int(task.output_count(batch)) == int(keep.sum())
    perplexity = float(metrics.compute()["val/perplexity"])
    assert math.isfinite(perplexity) and perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


def _padded(examples: list[dict]) -> dict:
    """Right-padded batch of ``{"input_ids", "labels"}`` examples (pad id 0, label -100)."""
    length = max(len(e["input_ids"]) for e in examples)
    pad = [length - len(e["input_ids"]) for e in examples]
    return {
        "input_ids": torch.tensor([e["input_ids"] + [0] * n for e, n in zip(examples, pad, strict=True)]),
        "attention_mask": torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * n for e, n in zip(examples, pad, strict=True)]
        ),
        "labels": torch.tensor([e["input_ids"] + [-100] * n for e, n in zip(examples, pad, strict=True)]),
    }


@pytest.mark.parametrize("loss", ["kl", "mse"])
def test_validation_losses_do_not_depend_on_how_the_set_is_batched(tmp_path, loss):
    """A language model's val/output_loss weighs each labelled token once and the attention losses each valid
    row (KL) or (row, key) entry (MSE): in batches of 1, 2 or 4, in any order, they equal the losses of the
    whole set as one batch, and val/loss their objective. (Each batch weighing its examples gave a 3-token
    text the weight of a 40-token one.)

    The models run in float64: in float32 the KL of two near-uniform maps (1.4e-4) is a sum whose terms
    cancel, and each batch's padded length and the CPU's vector width order its sums, which moved it by
    1.2e-5 relative on an AVX-512 CPU. What remains is the metrics' float32 accumulation of positive terms,
    bounded by the unit roundoff ``u`` (see the tolerances below)."""
    import functools

    import lightning as L

    from distill_lab.attention import AttentionDistillationLoss
    from distill_lab.module import DistillationModule

    config = make_tiny_config("gpt2", pad_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(config)
        student = AutoModelForCausalLM.from_config(
            make_tiny_config("gpt2", pad_token_id=0, num_hidden_layers=1)
        )
    teacher, student = teacher.double(), student.double()
    g = torch.Generator().manual_seed(1)
    examples = [
        {"input_ids": torch.randint(3, config.vocab_size, (n,), generator=g).tolist()} for n in (40, 3, 9, 2)
    ]

    def validate(order, batch_size):
        component = AttentionDistillationLoss(loss, "layerwise", [(1, 0)])
        module = DistillationModule(
            teacher, student, component, functools.partial(torch.optim.AdamW), task=get_task("causal_lm")
        )
        loader = torch.utils.data.DataLoader(
            [examples[i] for i in order], batch_size=batch_size, collate_fn=_padded
        )
        trainer = L.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        metrics = trainer.validate(module, loader, verbose=False)[0]
        module.teacher_capture.detach(), module.student_capture.detach()
        return metrics

    whole = validate([0, 1, 2, 3], 4)
    # Each loss metric (module.WeightedMean) rounds a batch's float64 loss to float32, multiplies it by its
    # count, sums at most 4 batches and divides once: within 6u of the exact mean (3u for one batch), and
    # val/loss adds two products and a sum: 13u bounds the difference, and 16u leaves room for the float64
    # losses' own error (about 1e-13 relative).
    u = 2.0**-24
    loss_tolerance = 16 * u
    # val/perplexity is float32 throughout (tasks.Perplexity): the n labelled tokens' cross-entropies (the
    # same float32 values in any batching) are positive, so their sum in any order is within (n - 1)u of the
    # exact sum, their mean m within nu, and exp(m) within (nm + 2)u (exp: an ulp); twice that between orders.
    tokens = sum(len(e["input_ids"]) - 1 for e in examples)
    perplexity_tolerance = 2 * (tokens * math.log(whole["val/perplexity"]) + 2) * u
    assert whole["val/loss"] == pytest.approx(
        0.7 * whole["val/output_loss"] + 0.3 * whole["val/attention_loss"], rel=1e-6
    )
    assert whole["val/attention_loss"] == pytest.approx(whole["val/attention/L1->0"], rel=1e-6)
    for order, batch_size in (([0, 1, 2, 3], 1), ([0, 1, 2, 3], 2), ([0, 2, 1, 3], 2), ([3, 1, 0, 2], 3)):
        batched = validate(order, batch_size)
        for name in (
            "val/loss",
            "val/output_loss",
            "val/attention_loss",
            "val/attention/L1->0",
            "val/perplexity",
        ):
            tolerance = perplexity_tolerance if name == "val/perplexity" else loss_tolerance
            assert batched[name] == pytest.approx(whole[name], rel=tolerance), (name, order, batch_size)


def test_masked_lm_loss_and_metrics_cover_only_masked_tokens():
    config = make_tiny_config("bert")
    model = AutoModelForMaskedLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config.vocab_size, (2, 11), generator=generator)
    labels = torch.full_like(ids, -100)
    chosen = torch.rand(ids.shape, generator=generator) < 0.3
    chosen[0, 0] = True
    labels[chosen] = ids[chosen]
    batch = {
        "input_ids": ids.masked_fill(chosen, 4),
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
    }
    with torch.no_grad():
        out = model(**batch)
    student = out.logits + torch.randn(out.logits.shape, generator=generator)
    task = get_task("masked_lm")
    value = task.output_loss(student, out.logits, batch, temperature=3.0, alpha=0.5)
    torch.testing.assert_close(
        value.double(), _kd_reference(student, out.logits, labels, 3.0, 0.5), rtol=1e-5, atol=1e-7
    )
    # unmasked positions do not count: changing their logits changes nothing
    moved = student.clone()
    moved[~chosen] += 5.0
    assert float(task.output_loss(moved, out.logits, batch, 3.0, 0.5)) == pytest.approx(
        float(value), rel=1e-6
    )
    metrics = task.metrics("val/", config.vocab_size)
    assert not metrics["masked_acc"].validate_args  # no argument checks (a device sync) per validation step
    task.update(metrics, out.logits, batch)
    result = metrics.compute()
    accuracy = (out.logits.argmax(-1)[chosen] == ids[chosen]).double().mean()
    assert float(result["val/masked_acc"]) == pytest.approx(float(accuracy))
    assert float(result["val/perplexity"]) == pytest.approx(math.exp(out.loss.item()), rel=1e-4)


@pytest.mark.parametrize("name", ["sequence_classification", "image_classification"])
def test_classification_metrics_are_accuracy_and_macro_f1_over_every_update(name):
    """Accumulated over batches, against counts by hand; the metrics skip their argument checks (a device
    sync per validation step) without changing a value."""
    generator = torch.Generator().manual_seed(3)
    classes = 4
    task = get_task(name)
    metrics = task.metrics("val/", classes)
    assert all(not metric.validate_args for metric in metrics.values())
    all_logits, all_labels = [], []
    for size in (5, 8, 3):
        logits = torch.randn(size, classes, generator=generator)
        labels = torch.randint(0, classes, (size,), generator=generator)
        labels[:classes] = torch.arange(classes)[:size]  # every class among the labels
        task.update(metrics, logits, {"labels": labels})
        all_logits.append(logits)
        all_labels.append(labels)
    pairs = list(zip(torch.cat(all_logits).argmax(-1).tolist(), torch.cat(all_labels).tolist(), strict=True))
    accuracy = sum(p == t for p, t in pairs) / len(pairs)
    f1 = []
    for c in range(classes):
        tp = sum(p == c and t == c for p, t in pairs)
        fp = sum(p == c and t != c for p, t in pairs)
        fn = sum(p != c and t == c for p, t in pairs)
        f1.append(2 * tp / (2 * tp + fp + fn))
    result = metrics.compute()
    assert float(result["val/acc"]) == pytest.approx(accuracy, rel=1e-6)
    assert float(result["val/f1"]) == pytest.approx(sum(f1) / classes, rel=1e-6)
    assert 0.0 < accuracy < 1.0 and len(set(f1)) > 1  # not a degenerate case


def test_unknown_task_and_teacher_without_the_task_head_are_clear_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"unknown task 'translation'; valid: causal_lm, image_classification"
    ):
        get_task("translation")
    text = make_text_task(tmp_path / "cls")  # a sequence classifier
    with pytest.raises(ValueError, match=r"not trained for task=masked_lm.*weights random.*Fine-tune it"):
        load_teacher(text["teacher"], task="masked_lm")
    with pytest.raises(
        ValueError,
        match="built-in teacher .relations. is trained for task=sequence_classification and cannot teach "
        "task=causal_lm",
    ):
        load_teacher(str(tmp_path / "cache"), task="causal_lm", builtin="relations")


# ---------------------------------------------------------------------------------------------- data


def _lm_data(mlm: bool, **kwargs) -> LanguageModelingData:
    options = dict(batch_size=16, max_train_samples=64, max_eval_samples=32, seed=0)
    data = LanguageModelingData(
        synthetic_text(num_train=200, num_validation=64),
        build_word_tokenizer(),
        mlm=mlm,
        **(options | kwargs),
    )
    data.setup()
    return data


def test_masked_lm_data_masks_dynamically_for_training_and_once_for_validation():
    data = _lm_data(mlm=True)
    tokenizer = data.tokenizer
    special = set(tokenizer.all_special_ids)
    first = list(data.train_dataloader())
    masked = torch.cat([(b["labels"] != -100).flatten() for b in first])
    real = torch.cat([b["attention_mask"].flatten().bool() for b in first])
    assert 0.08 < masked.sum() / real.sum() < 0.25  # about 15% of the tokens
    for batch in first:
        chosen = batch["labels"] != -100
        assert not any(int(t) in special for t in batch["labels"][chosen])  # [CLS], [SEP], [PAD] never masked
        assert (batch["input_ids"][chosen] == tokenizer.mask_token_id).float().mean() > 0.5  # 80/10/10
    # dynamic: new masks every epoch (test_masked_lm_training_masks_depend_on_seed_epoch_and_examples_alone)
    val_a, val_b = list(data.val_dataloader()), list(data.val_dataloader())
    for a, b in zip(val_a, val_b, strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])  # fixed
        assert ((a["labels"] != -100) & (a["attention_mask"] == 0)).sum() == 0


def _training_epoch(data: LanguageModelingData, epoch: int) -> tuple[list[dict], dict[int, torch.Tensor]]:
    """The batches of ``data``'s training epoch ``epoch`` and, by example, the positions masked in it."""
    loader = data.train_dataloader()
    loader.sampler.set_epoch(epoch)  # as Lightning does before every epoch
    order = [index for _, index in loader.sampler]  # the sampler yields (epoch, index) for the masks
    batches = list(loader)
    rows = [row for batch in batches for row in batch["labels"] != -100]
    return batches, {index: row.nonzero().flatten() for index, row in zip(order, rows, strict=True)}


def _assert_same_batches(batches: list[dict], expected: list[dict]) -> None:
    assert len(batches) == len(expected)
    for batch, reference in zip(batches, expected, strict=True):
        assert batch.keys() == reference.keys()
        assert all(torch.equal(batch[key], reference[key]) for key in batch)


def test_masked_lm_training_masks_depend_on_seed_epoch_and_examples_alone():
    """A training batch's masks are drawn from the data seed, the epoch and the batch's examples: each epoch
    masks an example anew; a loader resumed mid-epoch (from a checkpoint's ``train_position``) and loaders
    with worker processes mask exactly as the uninterrupted loader in the main process; the global random
    state is left as it was (the dropout masks must not depend on the data's draws)."""
    data = _lm_data(mlm=True)
    rng = torch.get_rng_state()
    epochs = [_training_epoch(data, epoch) for epoch in range(2)]
    assert torch.equal(torch.get_rng_state(), rng)
    (epoch0, masked0), (epoch1, masked1) = epochs
    assert masked0.keys() == masked1.keys() and len(masked0) == 64
    moved = sum(not torch.equal(masked0[i], masked1[i]) for i in masked0)
    assert moved > 48  # masked elsewhere in epoch 1 (about 2 of 14 tokens: the same positions twice is rare)
    _assert_same_batches(_training_epoch(data, 1)[0], epoch1)  # the same epoch again: the same masks

    resumed = _lm_data(mlm=True)
    resumed.load_state_dict({"train_position": [1, 32]})  # epoch 1 after its first two batches of 16
    _assert_same_batches(list(resumed.train_dataloader()), epoch1[2:])
    for workers in (1, 2):  # each worker process draws as the main process does
        _assert_same_batches(_training_epoch(_lm_data(mlm=True, num_workers=workers), 1)[0], epoch1)
    _, other_seed = _training_epoch(_lm_data(mlm=True, seed=1), 0)
    assert sum(not torch.equal(masked0[i], other_seed[i]) for i in masked0 if i in other_seed) > 0


def test_validation_masks_do_not_repeat_across_map_batches():
    """The validation split is masked in batches of 256 rows; identical texts must still get independent masks
    (a collator reseeded per batch would give row i and row i + 256 the same positions)."""
    text = " ".join(["the movie was good"] * 10)
    texts = Dataset.from_dict({"text": [text] * 600})
    data = LanguageModelingData(
        DatasetDict(train=texts, validation=texts), build_word_tokenizer(), max_length=64
    )
    data.setup()
    labels = data.splits["validation"]["labels"]
    repeats = sum(labels[i] == labels[i + 256] for i in range(300))
    assert repeats < 10  # about 40 maskable tokens: two independent masks agree with probability ~1e-5
    again = LanguageModelingData(
        DatasetDict(train=texts, validation=texts), build_word_tokenizer(), max_length=64
    )
    again.setup()
    assert again.splits["validation"]["labels"] == labels  # and reproducible


def test_causal_lm_data_labels_are_the_inputs_with_padding_ignored():
    data = _lm_data(mlm=False)
    batch = next(iter(data.val_dataloader()))
    pad = batch["attention_mask"] == 0
    assert pad.any()
    assert (
        torch.equal(batch["labels"][~pad], batch["input_ids"][~pad]) and (batch["labels"][pad] == -100).all()
    )


def test_packing_cuts_the_token_stream_into_full_blocks():
    data = _lm_data(mlm=False, pack=True, max_length=16)
    lengths = {len(ids) for ids in data.splits["train"]["input_ids"]}
    assert lengths == {16}
    tokens = sum(len(data.tokenizer(t)["input_ids"]) for t in data.raw["train"]["text"])
    assert len(data.splits["train"]) == tokens // 16


def test_lm_data_errors():
    texts = DatasetDict(
        train=Dataset.from_dict({"body": ["good movie"]}), validation=Dataset.from_dict({"body": ["bad"]})
    )
    with pytest.raises(
        ValueError, match=r"data.text_column='text' not in train split; available columns: \['body'\]"
    ):
        LanguageModelingData(texts, build_word_tokenizer()).setup()
    tokenizer = build_word_tokenizer()
    tokenizer.mask_token = None
    with pytest.raises(ValueError, match="task=masked_lm needs a tokenizer with a mask token"):
        LanguageModelingData(texts, tokenizer, text_column="body").setup()
    tokenizer = build_word_tokenizer()
    tokenizer.pad_token = None
    with pytest.raises(ValueError, match="the tokenizer has no padding token"):
        LanguageModelingData(texts, tokenizer, mlm=False, text_column="body").setup()
    data = LanguageModelingData(texts, build_word_tokenizer(), text_column="body")
    data.setup()
    small = AutoModelForMaskedLM.from_config(make_tiny_config("bert", vocab_size=10))
    with pytest.raises(
        ValueError, match=r"the tokenizer has \d+ tokens but the teacher's vocabulary only 10"
    ):
        get_task("masked_lm").check(small, data)
    with pytest.raises(ValueError, match=r"task=causal_lm needs data\.mlm=false, got data\.mlm=true"):
        get_task("causal_lm").check(small, data)  # masked inputs with next-token targets: refused
    causal = LanguageModelingData(texts, build_word_tokenizer(), mlm=False, text_column="body")
    with pytest.raises(ValueError, match=r"task=masked_lm needs data\.mlm=true, got data\.mlm=false"):
        get_task("masked_lm").check(small, causal)


def test_image_folder_data(tmp_path):
    task = make_image_task(tmp_path, per_class=4)
    data = ImageFolderData(
        image_folders(task["train_dir"], task["validation_dir"]),
        AutoImageProcessor.from_pretrained(task["teacher"]),
        batch_size=3,
    )
    data.setup()
    assert data.label_names == ["horizontal", "vertical"] and data.num_labels == 2
    batches = list(data.val_dataloader())
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 1]
    assert batches[0]["pixel_values"].shape[1:] == (3, 32, 32) and batches[0]["labels"].tolist() == [0, 0, 1]
    assert batches[0]["pixel_values"].min() >= -1.0 and batches[0]["pixel_values"].max() <= 1.0  # normalised
    (tmp_path / "validation" / "diagonal").mkdir()
    (tmp_path / "train" / "horizontal" / "0.png").rename(tmp_path / "validation" / "diagonal" / "0.png")
    with pytest.raises(ValueError, match="different classes"):
        ImageFolderData(
            image_folders(task["train_dir"], task["validation_dir"]), data.image_processor
        ).setup()
    with pytest.raises(ValueError, match="train_dir='/nope' is not a directory"):
        image_folders("/nope", task["validation_dir"])


def test_a_file_that_is_no_image_is_named_at_its_first_batch(tmp_path):
    """Images are decoded batch by batch (the README says so): a file that is not an image stops the first
    batch that holds it, with an error that names the file."""
    task = make_image_task(tmp_path, per_class=2)
    bad = Path(task["train_dir"]) / "horizontal" / "saved-page.png"
    bad.write_bytes(b"<html>not an image</html>")
    data = ImageFolderData(
        image_folders(task["train_dir"], task["validation_dir"]),
        AutoImageProcessor.from_pretrained(task["teacher"]),
        batch_size=8,
    )
    data.setup()
    with pytest.raises(UnidentifiedImageError, match=re.escape(str(bad))):
        next(iter(data.train_dataloader()))


def test_image_folder_names_are_not_glob_patterns(tmp_path):
    """A folder named with glob characters is that folder, not the pattern datasets would make of it
    (images[1] matching images1)."""
    task = make_image_task(tmp_path / "images[1]", per_class=2)
    make_image_task(tmp_path / "images1", per_class=1)  # the folder the pattern images[1] would match
    assert (tmp_path / "images1" / "train").is_dir()
    folders = image_folders(task["train_dir"], task["validation_dir"])
    assert folders["train"].num_rows == 4 and folders["train"].features["label"].names == [
        "horizontal",
        "vertical",
    ]


# ---------------------------------------------------------------------------------------------- end to end


CASES = [("masked_lm", "bert"), ("masked_lm", "roberta"), ("causal_lm", "gpt2"), ("causal_lm", "llama")]


@pytest.mark.parametrize(("task_name", "family"), CASES, ids=[f"{t}-{f}" for t, f in CASES])
def test_language_model_tasks_train_end_to_end(tmp_path, task_name, family):
    task = make_text_task(tmp_path / "task", family, task=task_name)
    out = tmp_path / "run"
    overrides = [
        *task["overrides"],
        "student.num_layers=2",
        "debug=fast",
        "logger=csv",
        "matching=headwise",
        "fused_kernel=false",
    ]
    metrics = train(compose_config(overrides, out))
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == task_name
    expected = {"masked_acc", "perplexity"} if task_name == "masked_lm" else {"perplexity"}
    assert set(results["student"]) == set(results["teacher"]) == expected
    # the gap is how far the student is behind, positive when worse, in each metric's own direction
    assert results["higher_is_better"] == {"perplexity": False} | (
        {"masked_acc": True} if "masked_acc" in expected else {}
    )
    for name, better in results["higher_is_better"].items():
        behind = (
            results["teacher"][name] - results["student"][name]
            if better
            else results["student"][name] - results["teacher"][name]
        )
        assert results["gap"][name] == pytest.approx(behind)
    assert math.isfinite(metrics["val/perplexity"]) and metrics["val/perplexity"] > 1.0
    assert set(results["attention_loss"]) >= {"L1->0", "L3->1"}
    assert "best.ckpt" in results["best_checkpoint"]
    student = get_task(task_name).auto_class.from_pretrained(out / "student").eval()
    assert student.config.num_hidden_layers == 2
    # the export is the best checkpoint's student: its perplexity on the validation set is the reported one
    cfg = compose_config(overrides, out)
    data = instantiate(cfg.data, tokenizer=load_tokenizer(str(out / "student")))
    data.setup()
    losses, counts = [], []
    with torch.no_grad():
        for batch in itertools.islice(
            data.val_dataloader(), cfg.trainer.limit_val_batches
        ):  # what validation saw
            labels = batch["labels"] if task_name == "masked_lm" else batch["labels"][:, 1:]
            n = int((labels != -100).sum())
            losses.append(student(**batch).loss.item() * n)
            counts.append(n)
    assert results["student"]["perplexity"] == pytest.approx(math.exp(sum(losses) / sum(counts)), rel=1e-3)


def test_image_classification_trains_end_to_end(tmp_path):
    task = make_image_task(tmp_path / "task")
    out = tmp_path / "run"
    train(
        compose_config(
            [*task["overrides"], "student.num_layers=2", "debug=fast", "logger=csv", "loss=mse"], out
        )
    )
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "image_classification" and set(results["student"]) == {"acc", "f1", "mcc"}
    assert set(results["attention_loss"]) == {"L1->0", "L3->1"} and all(
        v > 0 for v in results["attention_loss"].values()
    )
    assert (out / "student" / "preprocessor_config.json").exists()
    assert sorted(p.name for p in (out / "attention_maps").glob("*.png")) == ["epoch0-step3.png"]  # 3 batches


TASK_OPTIONS = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))


def test_every_task_has_a_config_option():
    assert set(TASK_OPTIONS) == set(TASKS)
    config = OmegaConf.load(CONF_DIR / "config.yaml")  # the task file alone sets what is optimised
    assert OmegaConf.is_missing(config, "optimized_metric") and OmegaConf.is_missing(config, "optimized_mode")


@pytest.mark.parametrize("option", TASK_OPTIONS)
def test_every_task_option_optimises_its_tasks_monitor(option):
    """``optimized_metric``/``optimized_mode`` (what the best checkpoint follows and ``train.py`` returns to
    sweepers) are composed by Hydra before any task object exists, so each task file repeats its task's
    ``monitor``/``monitor_mode``; here they must agree, and the monitor must be a metric the task logs."""
    spec = OmegaConf.load(CONF_DIR / "task" / f"{option}.yaml")
    task = get_task(spec.task.name)
    assert task.name == option
    assert (spec.optimized_metric, spec.optimized_mode) == (task.monitor, task.monitor_mode)
    assert task.monitor in task.metrics("val/", 7).keys(keep_base=False) and task.monitor_mode in (
        "min",
        "max",
    )


@pytest.mark.parametrize("option", TASK_OPTIONS)
def test_optuna_search_optimises_in_the_tasks_direction(option, tmp_path):
    cfg = compose_config(["hparams_search=optuna", f"task={option}"], tmp_path, return_hydra_config=True)
    direction = {"max": "maximize", "min": "minimize"}[get_task(option).monitor_mode]
    assert cfg.hydra.sweeper.direction == direction


def test_every_task_has_one_builtin_teacher():
    from distill_lab.builtin import BUILTIN_TEACHERS, builtin_for_task, builtin_task

    assert sorted(teacher.task for teacher in BUILTIN_TEACHERS.values()) == sorted(TASKS)
    for task_name in TASKS:
        assert builtin_task(builtin_for_task(task_name)) == task_name
    with pytest.raises(ValueError, match="unknown built-in teacher 'chess'; valid: relations, relations-mlm"):
        builtin_task("chess")


DEFAULTS = {  # the built-in teachers' own max_epochs, lr, batch_size, attempts
    "relations": (20, 1e-3, 32, 2),
    "relations-mlm": (4, 2e-3, 64, 1),
    "relations-clm": (4, 2e-3, 64, 1),
    "stripes-vit": (3, 1e-3, 32, 1),
}


@pytest.mark.parametrize("name", sorted(DEFAULTS))
def test_builtin_teacher_options_reach_its_training(tmp_path, monkeypatch, name):
    """``train_builtin_teacher`` trains every built-in teacher with the options it is asked for, keeps each
    one's defaults otherwise, stops early at ``target`` in the direction of its task's metric, and refuses an
    option it does not know."""
    from distill_lab import builtin

    seen, stops = [], []

    def record(model, data, max_epochs, lr, task, metric, stop):
        seen.append((max_epochs, lr, data.batch_size, torch.initial_seed()))
        stops.append(stop)
        assert task == builtin.builtin_task(name) and "val/" + metric == get_task(task).monitor
        assert type(model) is type(get_task(task).auto_class.from_config(model.config))
        return {metric: 0.5}

    monkeypatch.setattr(builtin, "_fit", record)
    assert builtin.train_builtin_teacher(name, tmp_path) == 0.5
    options = dict(max_epochs=2, lr=0.01, batch_size=8, seed=5, target=7.0, attempts=1)
    assert builtin.train_builtin_teacher(name, tmp_path, **options) == 0.5
    *defaults, attempts = DEFAULTS[name]  # 0.5 is short of the classifier's 98%: each seed is tried
    assert seen == [(*defaults, seed) for seed in range(attempts)] + [(2, 0.01, 8, 5)]
    stops = [stops[0], stops[-1]]  # the defaults' stop, the options'
    lower_is_better = get_task(builtin.builtin_task(name)).monitor_mode == "min"
    assert (stops[1](6.9), stops[1](7.1)) == ((True, False) if lower_is_better else (False, True))
    if name == "relations":  # trains until 98% accuracy unless told otherwise
        assert (stops[0](0.98), stops[0](0.97)) == (True, False)
    else:  # trains every epoch
        assert not stops[0](0.0) and not stops[0](1e9)
    metric = get_task(builtin.builtin_task(name)).monitor.removeprefix("val/")
    assert (tmp_path / "teacher_metrics.txt").read_text() == f"validation_{metric}=0.5000\n"
    with pytest.raises(
        TypeError,
        match="unknown options target_accuracy; valid: max_epochs, lr, batch_size, seed, target, attempts",
    ):
        builtin.train_builtin_teacher(name, tmp_path, target_accuracy=0.9)


@pytest.mark.parametrize(
    ("accuracies", "kept"), [([0.99], 0), ([0.9, 0.99], 1), ([0.95, 0.9, 0.97], 2), ([0.95, 0.9], 0)]
)
def test_a_builtin_teacher_short_of_its_target_is_retrained_from_the_next_seed(
    tmp_path, monkeypatch, accuracies, kept
):
    """A run that ends short of ``target`` is followed by one from the next initialisation seed, on the same
    data, until one reaches it or ``attempts`` runs are spent; the best run is saved and reported."""
    from distill_lab import builtin

    runs = []

    def fit(model, data, max_epochs, lr, task, metric, stop):
        runs.append((torch.initial_seed(), id(data), model))
        return {metric: accuracies[len(runs) - 1]}

    monkeypatch.setattr(builtin, "_fit", fit)
    attempts = len(accuracies) if accuracies[-1] < 0.98 else 3
    best = builtin.train_builtin_teacher("relations", tmp_path, seed=4, target=0.98, attempts=attempts)
    assert best == accuracies[kept] and len(runs) == len(accuracies)
    assert [seed for seed, _, _ in runs] == list(range(4, 4 + len(runs))) and len(
        {d for _, d, _ in runs}
    ) == 1
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    for key, value in runs[kept][2].state_dict().items():
        assert torch.equal(saved.state_dict()[key], value), key
    assert (tmp_path / "teacher_metrics.txt").read_text() == f"validation_acc={accuracies[kept]:.4f}\n"


def test_builtin_teacher_training_visits_a_new_order_each_epoch():
    """``_fit`` sets the training sampler's epoch as Lightning does: every epoch its own shuffled order (and
    masked-LM masks), not the first epoch's again."""
    from distill_lab import builtin

    data = TextClassificationData(
        synthetic_relations(num_train=48, num_validation=8), build_word_tokenizer(), batch_size=16
    )
    data.setup()
    model = AutoModelForSequenceClassification.from_config(
        make_tiny_config("bert", vocab_size=len(data.tokenizer))
    )
    seen, forward = [], model.forward
    model.forward = lambda **batch: seen.append(batch["input_ids"]) or forward(**batch)
    builtin._fit(
        model, data, max_epochs=2, lr=1e-3, task="sequence_classification", metric="acc", stop=lambda _: False
    )
    first, second = seen[:3], seen[4:7]  # each epoch: 3 training batches, then 1 validation batch
    assert len(seen) == 8 and not all(
        a.shape == b.shape and torch.equal(a, b) for a, b in zip(first, second, strict=True)
    )
    pad = data.tokenizer.pad_token_id
    orders = [
        [tuple(t for t in row.tolist() if t != pad) for batch in epoch for row in batch]
        for epoch in (first, second)
    ]
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]  # the same examples, reordered


@pytest.mark.parametrize(("task_name", "family"), [("masked_lm", "bert"), ("causal_lm", "llama")])
def test_builtin_teachers_are_evaluated_with_the_tasks_metrics(task_name, family):
    """A built-in language-model teacher is scored by its task's metrics: perplexity is exp of the mean
    cross-entropy over every labelled token (the model's own loss weighted by its tokens), masked accuracy the
    share of masked tokens predicted."""
    from distill_lab.builtin import evaluate

    data = _lm_data(mlm=task_name == "masked_lm", batch_size=8)
    config = make_tiny_config(
        family, vocab_size=len(data.tokenizer), pad_token_id=data.tokenizer.pad_token_id
    )
    torch.manual_seed(0)
    model = get_task(task_name).auto_class.from_config(config).eval()
    total = count = right = 0.0
    with torch.no_grad():
        for batch in data.val_dataloader():
            out = model(**batch)
            labels = batch["labels"][:, 1:] if task_name == "causal_lm" else batch["labels"]
            n = int((labels != -100).sum())
            total += out.loss.item() * n
            count += n
            right += int((out.logits.argmax(-1) == batch["labels"])[batch["labels"] != -100].sum())
    result = evaluate(model, data.val_dataloader(), task_name)
    assert set(result) == ({"masked_acc", "perplexity"} if task_name == "masked_lm" else {"perplexity"})
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    if task_name == "masked_lm":
        assert result["masked_acc"] == pytest.approx(right / count)


def test_builtin_classifier_accuracy_is_the_share_of_right_labels():
    from distill_lab.builtin import evaluate

    data = TextClassificationData(
        synthetic_relations(num_train=16, num_validation=40), build_word_tokenizer(), batch_size=16
    )
    data.setup()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(
        make_tiny_config("bert", vocab_size=len(data.tokenizer), num_labels=2)
    )
    right = seen = 0
    with torch.no_grad():
        for batch in data.val_dataloader():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            right += int((logits.argmax(-1) == batch["labels"]).sum())
            seen += len(batch["labels"])
    assert seen == 40 and 0 < right < seen
    scores = evaluate(model, data.val_dataloader(), "sequence_classification")
    assert set(scores) == {"acc", "f1", "mcc"} and scores["acc"] == pytest.approx(right / seen)


@pytest.mark.slow
@pytest.mark.parametrize("task_name", ["masked_lm", "causal_lm"])
def test_builtin_language_model_teachers(tmp_path, task_name):
    """``teacher=builtin`` picks the task's own built-in teacher, trains it once, and loads it through
    ``from_pretrained``; a built-in teacher of another task is refused."""
    from distill_lab.builtin import builtin_for_task, evaluate, train_builtin_teacher

    name = builtin_for_task(task_name)
    out = tmp_path / name
    perplexity = train_builtin_teacher(name, out, max_epochs=1)
    assert f"validation_perplexity={perplexity:.4f}" in (out / "teacher_metrics.txt").read_text()
    vocabulary = len(build_word_tokenizer())
    assert 1.0 < perplexity < vocabulary / 2  # learned something: far below a uniform guess over the words
    teacher = load_teacher(str(out), task=task_name, builtin="auto")  # cached: loaded, not retrained
    assert type(teacher) is type(get_task(task_name).auto_class.from_pretrained(out))
    data = _lm_data(mlm=task_name == "masked_lm")
    assert math.isfinite(evaluate(teacher, data.val_dataloader(), task_name)["perplexity"])
    with pytest.raises(
        ValueError, match=f"trained for task={task_name} and cannot teach task=sequence_classification"
    ):
        load_teacher(str(out), task="sequence_classification", builtin=name)


@pytest.mark.slow
def test_builtin_image_teacher_learns_the_stripes(tmp_path):
    from distill_lab.builtin import builtin_for_task, train_builtin_teacher

    assert builtin_for_task("image_classification") == "stripes-vit"
    accuracy = train_builtin_teacher("stripes-vit", tmp_path / "vit", max_epochs=1)
    assert accuracy > 0.9  # the orientation of stripes is easy: one epoch suffices
    teacher = load_teacher(str(tmp_path / "vit"), task="image_classification", builtin="auto")
    assert teacher.config.id2label == {0: "horizontal", 1: "vertical"}
    assert (tmp_path / "vit" / "preprocessor_config.json").exists()
