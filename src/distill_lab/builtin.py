"""The built-in offline teachers, one per task, trained on first use and cached with ``save_pretrained``.

The text task (``distill_lab.data.synthetic_relations``) is sentiment with negation: one sentiment word whose
polarity flips when the word before it is "not", among neutral words and stray "not"s. Its label is a
relation between two tokens, so a model must attend from one to the other to solve it, which makes it a
fair small test of attention distillation. Its teacher is a 4-layer BERT (hidden 64) trained here in about
half a minute on 2 CPU cores to about 99% validation accuracy; afterwards it is an ordinary model directory that ``load_teacher`` reads
through ``from_pretrained`` like any other. The language-model teachers learn the same sentences as raw text,
the image teacher the orientation of stripes.

``BUILTIN_TEACHERS`` holds them all (name -> task, model configuration, trainer): a new built-in teacher is one
entry there, with one of the trainers below or a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from transformers import BertConfig, LlamaConfig, PretrainedConfig, ViTConfig

from distill_lab.data import TextClassificationData, build_word_tokenizer, synthetic_relations
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
    """A built-in teacher: the task it is trained for, its model's configuration (the sizes; the trainer adds
    the vocabulary or the labels of its data) and the function that trains and saves it,
    ``train(name, output_dir, max_epochs=..., lr=..., batch_size=..., seed=...)`` -> its validation metric."""

    task: str
    config: Callable[..., PretrainedConfig]
    train: Callable[..., float]


def _fit_and_save(
    name: str, model, preprocessor, data, output_dir: str | Path, max_epochs: int, lr: float,
    evaluate: Callable[[], float], metric: str, done: Callable[[float], bool] = lambda value: False,
) -> float:
    """AdamW with a one-cycle schedule and gradient clipping on the model's own loss, ``evaluate()`` after
    each epoch (stopping early once ``done``), then ``save_pretrained`` of model and preprocessor with
    ``teacher_metrics.txt``. Returns the last evaluation."""
    start = time.perf_counter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = max_epochs * len(data.train_dataloader())
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    log.info("training the built-in '%s' teacher (cached afterwards in %s)", name, output_dir)
    for epoch in range(max_epochs):
        model.train()
        for batch in data.train_dataloader():
            model(**batch).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        value = evaluate()
        log.info("teacher epoch %d: validation %s %.3f", epoch + 1, metric, value)
        if done(value):
            break
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    preprocessor.save_pretrained(output_dir)
    (output_dir / "teacher_metrics.txt").write_text(f"validation_{metric}={value:.4f}\n")
    log.info("built-in teacher ready in %.0f s: validation %s %.3f", time.perf_counter() - start, metric, value)
    return value


def train_builtin_classifier_teacher(
    name: str,
    output_dir: str | Path,
    max_epochs: int = 12,
    lr: float = 1e-3,
    batch_size: int = 32,
    seed: int = 0,
    target_accuracy: float = 0.98,
) -> float:
    """Train the built-in text classifier (``relations``): a 4-layer BERT on the built-in sentiment-with-negation
    sentences, saved with its tokenizer.

    Trains until the validation accuracy reaches ``target_accuracy`` (the negation relation is picked up
    after a plateau whose length varies with the seed) or for ``max_epochs``. Returns the validation
    accuracy, also saved as ``teacher_metrics.txt``.
    """
    teacher = BUILTIN_TEACHERS[name]
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer()
    data = TextClassificationData(synthetic_relations(seed=seed), tokenizer=tokenizer, batch_size=batch_size, seed=seed)
    data.setup("fit")
    config = teacher.config(vocab_size=len(tokenizer), num_labels=data.num_labels, pad_token_id=tokenizer.pad_token_id)
    model = get_task(teacher.task).auto_class.from_config(config)
    return _fit_and_save(
        name, model, tokenizer, data, output_dir, max_epochs, lr,
        lambda: evaluate(model, data.val_dataloader(), teacher.task)["acc"], "accuracy",
        done=lambda value: value >= target_accuracy,
    )


def train_builtin_lm_teacher(
    name: str, output_dir: str | Path, max_epochs: int = 4, lr: float = 2e-3, batch_size: int = 64, seed: int = 0
) -> float:
    """Train a built-in language-model teacher on the built-in sentences and save it with its tokenizer.

    ``relations-mlm`` is a 4-layer BERT masked LM, ``relations-clm`` a 4-layer LLaMA-style causal LM with
    grouped-query attention (4 query heads, 2 key/value heads) and RoPE; both learn the sentences' word order
    and the negation pattern in a minute or two on 2 CPU cores. Returns the validation perplexity, also saved
    as ``teacher_metrics.txt``.
    """
    from distill_lab.data_lm import LanguageModelingData, synthetic_text

    teacher = BUILTIN_TEACHERS[name]
    causal = teacher.task == "causal_lm"
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer()
    data = LanguageModelingData(synthetic_text(seed=seed), tokenizer, mlm=not causal, batch_size=batch_size, seed=seed)
    data.setup("fit")
    ids = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    if causal:
        ids.update(bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id)
    model = get_task(teacher.task).auto_class.from_config(teacher.config(**ids))
    return _fit_and_save(
        name, model, tokenizer, data, output_dir, max_epochs, lr,
        lambda: evaluate(model, data.val_dataloader(), teacher.task)["perplexity"], "perplexity",
    )


def train_builtin_vit_teacher(
    name: str, output_dir: str | Path, max_epochs: int = 3, lr: float = 1e-3, batch_size: int = 32, seed: int = 0
) -> float:
    """Train the built-in image teacher: a ViT (32 x 32 images, 8 x 8 patches) on the built-in stripes images
    (``distill_lab.data_images.synthetic_stripes``), saved with its image processor. Returns the validation
    accuracy, also saved as ``teacher_metrics.txt``."""
    from transformers import ViTImageProcessor

    from distill_lab.data_images import ImageFolderData, synthetic_stripes

    teacher = BUILTIN_TEACHERS[name]
    torch.manual_seed(seed)
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    data = ImageFolderData(synthetic_stripes(seed=seed), processor, batch_size=batch_size, seed=seed)
    data.setup("fit")
    labels = dict(enumerate(data.label_names))
    config = teacher.config(num_labels=data.num_labels, id2label=labels, label2id={v: k for k, v in labels.items()})
    model = get_task(teacher.task).auto_class.from_config(config)
    return _fit_and_save(
        name, model, processor, data, output_dir, max_epochs, lr,
        lambda: evaluate(model, data.val_dataloader(), teacher.task)["acc"], "accuracy",
    )


BUILTIN_TEACHERS = {  # name -> BuiltinTeacher; teacher=builtin picks the one of its task
    "relations": BuiltinTeacher(
        "sequence_classification", partial(BertConfig, **TEACHER_CONFIG), train_builtin_classifier_teacher
    ),
    "relations-mlm": BuiltinTeacher("masked_lm", partial(BertConfig, **TEACHER_CONFIG), train_builtin_lm_teacher),
    "relations-clm": BuiltinTeacher(
        "causal_lm",
        partial(LlamaConfig, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=64, attention_dropout=0.0),
        train_builtin_lm_teacher,
    ),
    "stripes-vit": BuiltinTeacher(
        "image_classification",
        partial(ViTConfig, image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=128, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        train_builtin_vit_teacher,
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
        f"there is no built-in teacher for task={task} (built-in teachers exist for {', '.join(tasks)}): give "
        "teacher=hf teacher.name_or_path=<a model trained for the task>"
    )


def train_builtin_teacher(name: str, output_dir: str | Path, **options) -> float:
    """Train the built-in teacher ``name`` with its own trainer and save it to ``output_dir``; returns its
    validation metric (accuracy or perplexity), also saved as ``teacher_metrics.txt``.

    ``options`` go to the trainer: ``max_epochs``, ``lr``, ``batch_size`` and ``seed`` for every teacher (each
    has its own defaults), ``target_accuracy`` for ``relations``; one the trainer does not take is a TypeError.
    """
    return _teacher(name).train(name, output_dir, **options)


@torch.no_grad()
def evaluate(model, dataloader, task: str) -> dict[str, float]:
    """The validation metrics of ``task`` (``distill_lab.tasks``: those a distillation run reports, e.g. ``acc``
    and ``f1``, or ``perplexity``) of ``model`` over ``dataloader``."""
    task = get_task(task)
    metrics = task.metrics("", task.num_classes(model.config)).to(model.device)
    model.eval()
    for batch in dataloader:
        batch = {k: v.to(model.device) for k, v in batch.items()}
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits  # the metrics need no loss
        task.update(metrics, logits, batch)
    return {name: float(value) for name, value in metrics.compute().items()}


def evaluate_accuracy(model, dataloader) -> float:
    """A classifier's validation accuracy over ``dataloader``."""
    return evaluate(model, dataloader, "sequence_classification")["acc"]
