"""The built-in offline teachers, one per task, trained on first use and cached with ``save_pretrained``.

The text task (``distill_lab.data_synthetic.synthetic_relations``) is sentiment with negation: one sentiment
word whose polarity flips when the word before it is "not", among neutral words and stray "not"s. Its label is
a relation between two tokens, so a model must attend from one to the other to solve it, which makes it a fair
small test of attention distillation. Its teacher is a 4-layer BERT (hidden 64) trained here in about half a
minute on 2 CPU cores to about 99% validation accuracy; afterwards it is an ordinary model directory that
``load_teacher`` reads through ``from_pretrained`` like any other. The language-model teachers learn the same
sentences as raw text, the image teacher the orientation of stripes.

``BUILTIN_TEACHERS`` holds them all (name -> task, model configuration, data, training options): a new
built-in teacher is one entry there. ``train_builtin_teacher`` trains any of them the same way.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, LlamaConfig, PretrainedConfig, ViTConfig

from distill_lab.data import TextClassificationData
from distill_lab.data_synthetic import build_word_tokenizer, synthetic_relations
from distill_lab.tasks import get_task

log = logging.getLogger(__name__)

TEACHER_CONFIG = dict(  # the BERT of the text classifier and the masked LM
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    intermediate_size=128,
    max_position_embeddings=64,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)


@dataclass(frozen=True)
class BuiltinTeacher:
    """A built-in teacher.

    Attributes:
        task: the task it is trained for (``distill_lab.tasks``); its monitor is the metric it is trained to.
        config: the model's configuration (its sizes), completed with what ``data`` returns.
        data: ``data(batch_size=..., seed=...)`` -> (data module, set up for fitting; its tokenizer or image
            processor, saved with the model; the configuration entries the data fixes: vocabulary, labels).
        options: the training options and their defaults: ``max_epochs``, ``lr``, ``batch_size``, ``seed``,
            ``target``, the validation metric at which training stops early (None: train every epoch), and
            ``attempts``: how many seeds (``seed``, ``seed + 1``, ...) are tried until one reaches ``target``.
    """

    task: str
    config: Callable[..., PretrainedConfig]
    data: Callable[..., tuple[Any, Any, dict]]
    options: Mapping[str, Any]


def _relations_classification(batch_size: int, seed: int):
    """The built-in sentences with their sentiment labels, through the built-in word tokenizer."""
    tokenizer = build_word_tokenizer()
    data = TextClassificationData(
        synthetic_relations(seed=seed), tokenizer=tokenizer, batch_size=batch_size, seed=seed
    )
    data.setup("fit")
    return (
        data,
        tokenizer,
        dict(vocab_size=len(tokenizer), num_labels=data.num_labels, pad_token_id=tokenizer.pad_token_id),
    )


def _relations_text(batch_size: int, seed: int, causal: bool):
    """The built-in sentences as raw text, masked (``causal=False``) or for next-token prediction."""
    from distill_lab.data_lm import LanguageModelingData, synthetic_text

    tokenizer = build_word_tokenizer()
    data = LanguageModelingData(
        synthetic_text(seed=seed), tokenizer, mlm=not causal, batch_size=batch_size, seed=seed
    )
    data.setup("fit")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if causal:
        ids.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    return data, tokenizer, ids


def _stripes(batch_size: int, seed: int):
    """The built-in stripes images (``distill_lab.data_images.synthetic_stripes``), 32 x 32, labelled by the
    stripes' orientation."""
    from transformers import ViTImageProcessor

    from distill_lab.data_images import ImageFolderData, synthetic_stripes

    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    data = ImageFolderData(synthetic_stripes(seed=seed), processor, batch_size=batch_size, seed=seed)
    data.setup("fit")
    labels = dict(enumerate(data.label_names))
    return (
        data,
        processor,
        dict(num_labels=data.num_labels, id2label=labels, label2id={v: k for k, v in labels.items()}),
    )


def _entities(batch_size: int, seed: int):
    """The built-in NER sentences (``distill_lab.data_tokens.synthetic_entities``) through a word tokenizer
    over their words; the tag names become the model's ``id2label``."""
    from distill_lab.data_tokens import ENTITY_WORDS, TokenClassificationData, synthetic_entities

    tokenizer = build_word_tokenizer(ENTITY_WORDS)
    data = TokenClassificationData(synthetic_entities(seed=seed), tokenizer, batch_size=batch_size, seed=seed)
    data.setup("fit")
    labels = dict(enumerate(data.label_names))
    return (
        data,
        tokenizer,
        dict(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            num_labels=data.num_labels,
            id2label=labels,
            label2id={v: k for k, v in labels.items()},
        ),  # fmt: skip
    )


BUILTIN_TEACHERS = {  # name -> BuiltinTeacher; teacher=builtin picks the one of its task
    # a 4-layer BERT classifier; the negation relation is picked up after a plateau whose length varies with
    # the seed (and with the library versions: the same seed picks it up by epoch 8 or never): many epochs
    # with an early stop, and a second seed where the first has not picked it up
    "relations": BuiltinTeacher(
        "sequence_classification",
        partial(BertConfig, **TEACHER_CONFIG),
        _relations_classification,
        dict(max_epochs=20, lr=1e-3, batch_size=32, seed=0, target=0.98, attempts=2),
    ),
    # a 4-layer BERT masked LM and a 4-layer LLaMA-style causal LM (grouped-query attention, 4 query heads and
    # 2 key/value heads, RoPE): both learn the sentences' word order and negation pattern in a minute or two
    "relations-mlm": BuiltinTeacher(
        "masked_lm",
        partial(BertConfig, **TEACHER_CONFIG),
        partial(_relations_text, causal=False),
        dict(max_epochs=4, lr=2e-3, batch_size=64, seed=0, target=None, attempts=1),
    ),
    "relations-clm": BuiltinTeacher(
        "causal_lm",
        partial(
            LlamaConfig,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            attention_dropout=0.0,
        ),
        partial(_relations_text, causal=True),
        dict(max_epochs=4, lr=2e-3, batch_size=64, seed=0, target=None, attempts=1),
    ),
    # a ViT on 32 x 32 images in 8 x 8 patches
    "stripes-vit": BuiltinTeacher(
        "image_classification",
        partial(
            ViTConfig,
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=128,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        ),
        _stripes,
        dict(max_epochs=3, lr=1e-3, batch_size=32, seed=0, target=None, attempts=1),
    ),
    # a 4-layer BERT tagger of the built-in NER sentences: entity F1 0.96 in two or three epochs of 63 steps
    # (a few seconds an epoch on one CPU core), 0.97 where it stops improving
    "entities": BuiltinTeacher(
        "token_classification",
        partial(BertConfig, **TEACHER_CONFIG),
        _entities,
        dict(max_epochs=4, lr=1e-3, batch_size=32, seed=0, target=0.96, attempts=1),
    ),
}


def _teacher(name: str) -> BuiltinTeacher:
    try:
        return BUILTIN_TEACHERS[name]
    except KeyError:
        raise ValueError(f"unknown built-in teacher {name!r}; valid: {', '.join(BUILTIN_TEACHERS)}") from None


def builtin_task(name: str) -> str:
    """The task the built-in teacher ``name`` is trained for."""
    return _teacher(name).task


def builtin_for_task(task: str) -> str:
    """The built-in teacher of ``task`` (``teacher=builtin`` picks it by ``task=``)."""
    for name, teacher in BUILTIN_TEACHERS.items():
        if teacher.task == task:
            return name
    tasks = sorted(teacher.task for teacher in BUILTIN_TEACHERS.values())
    raise ValueError(
        f"there is no built-in teacher for task={task} (built-in teachers exist for {', '.join(tasks)}): "
        "give teacher=hf teacher.name_or_path=<a model trained for the task>"
    )


def train_builtin_teacher(name: str, output_dir: str | Path, **options) -> float:
    """Train the built-in teacher ``name`` and save it to ``output_dir`` (model, tokenizer or image processor,
    and ``teacher_metrics.txt`` with its validation metrics); returns the validation metric its task monitors
    (accuracy or perplexity).

    AdamW with a one-cycle schedule and gradient clipping on the model's own loss, an evaluation after each
    epoch. ``options`` override the teacher's own (``BuiltinTeacher.options``): ``max_epochs``, ``lr``,
    ``batch_size``, ``seed``, ``target``, the validation metric at which training stops early (accuracy
    at least, perplexity at most), and ``attempts``: a run that ends short of ``target`` is followed by one
    from another initialisation (``seed + 1``, ...; the data stay), up to ``attempts`` runs; the best is kept.
    An option not among them is a TypeError.
    """
    teacher = _teacher(name)
    if unknown := sorted(set(options) - set(teacher.options)):
        raise TypeError(
            f"train_builtin_teacher({name!r}) got unknown options {', '.join(unknown)}; valid: "
            f"{', '.join(teacher.options)}"
        )
    options = {**teacher.options, **options}
    task = get_task(teacher.task)
    metric, higher_is_better = task.monitor.removeprefix("val/"), task.monitor_mode == "max"
    target = options["target"]

    def reached(value: float) -> bool:
        return target is not None and (value >= target if higher_is_better else value <= target)

    start = time.perf_counter()
    log.info("training the built-in '%s' teacher (cached afterwards in %s)", name, output_dir)
    torch.manual_seed(options["seed"])
    data, preprocessor, fixed = teacher.data(batch_size=options["batch_size"], seed=options["seed"])
    best = None
    for seed in range(options["seed"], options["seed"] + options["attempts"]):
        torch.manual_seed(seed)  # the data stay; the initialisation changes
        candidate = task.auto_class.from_config(teacher.config(**fixed))
        candidate_scores = _fit(
            candidate, data, options["max_epochs"], options["lr"], teacher.task, metric, reached
        )
        value = candidate_scores[metric]
        if best is None or (value > best if higher_is_better else value < best):
            best, model, scores = value, candidate, candidate_scores
        if target is None or reached(value):
            break
        log.info(
            "seed %d ended at validation %s %.3f, short of %s: initialising with seed %d",
            seed,
            metric,
            value,
            target,
            seed + 1,
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output_dir.parent) as staging:
        model.save_pretrained(staging)
        preprocessor.save_pretrained(staging)
        Path(staging, "teacher_metrics.txt").write_text(
            "".join(f"validation_{k}={v:.4f}\n" for k, v in scores.items())
        )
        # config.json last: load_teacher takes a directory with one for a finished teacher
        for file in sorted(Path(staging).iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(file, output_dir / file.name)
    log.info(
        "built-in teacher ready in %.0f s: validation %s %.3f",
        time.perf_counter() - start,
        metric,
        scores[metric],
    )
    return scores[metric]


def _fit(
    model, data, max_epochs: int, lr: float, task: str, metric: str, stop: Callable[[float], bool]
) -> dict:
    """Train ``model`` on its own loss for up to ``max_epochs``, evaluating after each epoch and stopping once
    ``stop(validation metric)``; returns the last evaluation."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    train = data.train_dataloader()
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=max_epochs * len(train), pct_start=0.1
    )
    for epoch in range(max_epochs):
        model.train()
        train.sampler.set_epoch(epoch)  # each epoch its own order (and masks), as Lightning does
        for batch in train:
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        scores = evaluate(model, data.val_dataloader(), task)
        log.info("teacher epoch %d: validation %s %.3f", epoch + 1, metric, scores[metric])
        if stop(scores[metric]):
            break
    return scores


@torch.no_grad()
def evaluate(model, dataloader, task: str) -> dict[str, float]:
    """The validation metrics of ``task`` (``distill_lab.tasks``: those a distillation run reports, e.g.
    ``acc`` and ``f1``, or ``perplexity``) of ``model`` over ``dataloader``."""
    task = get_task(task)
    if hasattr(task, "label_names"):  # token classification: the entity metrics read the tag names
        from distill_lab.tasks import model_label_names

        task.label_names = model_label_names(model.config)
    metrics = task.metrics("", task.num_classes(model.config)).to(model.device)
    model.eval()
    for batch in dataloader:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # the metrics need no loss
        task.update(metrics, logits, batch)
    return {name: float(value) for name, value in metrics.compute().items()}
