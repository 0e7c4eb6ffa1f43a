"""The teacher measured on the validation set before training: a classifier at or below chance there is
teaching labels in another order than its own, or is not trained for the task.

String labels for a teacher that names no classes are numbered in sorted order, a guess (``distill_lab.data``
warns of it). ``favorable`` and ``unfavorable`` sort in the reverse of a teacher's 0 (unfavorable) and 1
(favorable): such a run used to train to the end, the teacher at accuracy 0.0 and the student taught the
reverse. :func:`check_teacher` stops it before training with the mapping used and the key that sets the
order. Where the ids come from the data itself (int labels, a ``ClassLabel``, the teacher's own names, or
``data.label_names``) the order is stated, not guessed: a teacher at chance is then a warning, since it may
be meant (a random teacher in a test) and no other order is any more likely right.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MAX_ORDERED_CLASSES = 7  # other orders are tried up to this many classes (7! = 5040 permutations)


class Verdict(NamedTuple):
    """The teacher's accuracy on ``examples`` validation examples under the order used, the chance level,
    the best other order of the classes (``order[data id] = teacher id``, None where not tried) and its
    accuracy, and whether the accuracy is at or below chance."""

    examples: int
    accuracy: float
    chance: float
    other_order: tuple[int, ...] | None
    other_accuracy: float | None
    at_chance: bool


def teacher_at_chance(confusion: Tensor) -> Verdict:
    """Whether a teacher's answers (``confusion[label, prediction]``, counts) are at or below chance.

    Chance is a uniform guess over the C classes, 1 / C. Its accuracy on n examples spreads by
    ``sqrt(p (1 - p) / n)``; two of those are the tolerance, so that a small validation set does not pass a
    teacher that is at chance by luck. Yet on a handful of examples a teacher right on all of them is within
    that tolerance too: so the accuracy must also fail to beat every other order of the classes by the same
    margin. On two classes the two conditions come to an accuracy below 1/2 + one standard error.

    Not the majority-class rate: on a validation set of one class it is 1.0, which no teacher beats, while a
    teacher right there in the order used and wrong in the other is plainly not at chance. A constant answer
    is judged as it should be all the same: the majority class of an imbalanced set beats the other orders
    (which give it a rarer class), the minority class does not.

    Shape:
        confusion: (C, C) counts, rows the labels (data ids), columns the teacher's answers.
    """
    counts = confusion.double()
    examples = int(counts.sum())
    classes = counts.shape[0]
    accuracy = float(counts.trace()) / examples
    chance = 1.0 / classes
    tolerance = 2 * math.sqrt(chance * (1 - chance) / examples)
    other_order = other_accuracy = None
    if classes <= MAX_ORDERED_CLASSES:
        rows = torch.arange(classes)
        identity = tuple(range(classes))
        orders = (order for order in itertools.permutations(identity) if order != identity)
        scored = ((float(counts[rows, list(order)].sum()) / examples, order) for order in orders)
        other_accuracy, other_order = max(scored)
    below = accuracy <= chance + tolerance
    beaten = other_accuracy is None or accuracy < other_accuracy + tolerance
    return Verdict(examples, accuracy, chance, other_order, other_accuracy, below and beaten)


@torch.no_grad()
def measure(teacher, loader, num_labels: int, max_batches: int | None, device: torch.device) -> Tensor:
    """The teacher's confusion counts (labels x answers) over the first ``max_batches`` batches of
    ``loader`` (all where None), in eval mode, on ``device``."""
    confusion = torch.zeros(num_labels * num_labels, dtype=torch.long)
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        labels = batch["labels"]
        inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
        answers = teacher(**inputs).logits.argmax(-1).cpu()
        confusion += torch.bincount(labels * num_labels + answers, minlength=num_labels * num_labels)
    return confusion.view(num_labels, num_labels)


def _max_batches(limit: int | float | None, batches: int) -> int:
    """The batches Lightning's ``limit_val_batches`` validates: all (None, 1.0), a count, or a fraction."""
    if limit is None or (isinstance(limit, float) and limit >= 1.0):
        return batches
    if isinstance(limit, float):
        return max(int(batches * limit), 1) if limit > 0 else 0
    return min(int(limit), batches)


def _device(accelerator: str | None, devices) -> torch.device:
    """Where the run puts the teacher: this process's GPU where the trainer would use one (the entry of
    ``trainer.devices`` for this rank where it lists them), else the CPU."""
    if accelerator not in ("auto", "gpu", "cuda", None) or not torch.cuda.is_available():
        return torch.device("cpu")
    rank = int(os.environ.get("LOCAL_RANK", 0))
    if isinstance(devices, str) and "," in devices:  # "1,3"
        devices = [int(d) for d in devices.split(",") if d.strip()]
    if isinstance(devices, Sequence) and not isinstance(devices, str):
        return torch.device("cuda", int(devices[rank % len(devices)]))
    return torch.device("cuda", rank)


def check_teacher(task, teacher, data, trainer: Mapping | None = None) -> None:
    """Measure a classifier teacher on the validation set (as many batches as ``trainer.limit_val_batches``
    lets validation see) and stop, or warn, where it is at or below chance (:func:`teacher_at_chance`).

    Args:
        task: The task (``distill_lab.tasks``); only those whose ``checks_teacher`` is set are measured.
        teacher: The teacher, as loaded.
        data: Its data module, set up: ``label_ids``, ``label_names``, ``val_dataloader()``; where it says
            ``numbered_by_sort`` the error names ``data.label_names``, and ``check_teacher=False`` skips it.
        trainer: The trainer's settings (``cfg.trainer``): ``limit_val_batches``, ``accelerator`` and
            ``devices`` say how much of the validation set to measure, and where.

    Raises:
        ValueError: The teacher is at or below chance and the labels were numbered in sorted order.
    """
    if not getattr(task, "checks_teacher", False) or not getattr(data, "check_teacher", True):
        return
    if getattr(data, "regression", False):  # scores, not classes: there is no chance level nor class order
        return
    trainer = trainer or {}
    loader = data.val_dataloader()
    max_batches = _max_batches(trainer.get("limit_val_batches"), len(loader))
    if max_batches == 0:
        log.info("the teacher is not measured before training: trainer.limit_val_batches=0 validates nothing")
        return
    home = next(teacher.parameters()).device
    movable = getattr(teacher, "hf_device_map", None) is None  # one placed across devices stays where it is
    device = _device(trainer.get("accelerator", "auto"), trainer.get("devices")) if movable else home
    training = teacher.training
    teacher.eval()
    if movable:
        teacher.to(device)
    try:
        confusion = measure(teacher, loader, teacher.config.num_labels, max_batches, device)
    finally:
        teacher.train(training)
        if movable:
            teacher.to(home)
    verdict = teacher_at_chance(confusion)
    log.info(
        "the teacher before training: accuracy %.4f on %d validation examples (chance %.4f)",
        verdict.accuracy, verdict.examples, verdict.chance,
    )  # fmt: skip
    if not verdict.at_chance:
        return
    if getattr(data, "numbered_by_sort", False):
        raise ValueError(_sorted_message(verdict, data))
    log.warning(
        "the teacher scores %.4f accuracy on %d validation examples, at or below chance for %d classes "
        "(%.4f), with the labels numbered %s: is it trained for this task, with these labels in this order?",
        verdict.accuracy, verdict.examples, len(data.label_names), verdict.chance, _shown(data.label_ids),
    )  # fmt: skip


def _sorted_message(verdict: Verdict, data) -> str:
    names = list(data.label_names)
    why = "as the teacher's config names no classes (id2label)"
    if getattr(data, "model_labels", None) is not None:
        why = "as data.match_label_names=false takes them as they are"
    message = (
        f"the teacher scores {verdict.accuracy:.4f} accuracy on {verdict.examples} validation examples, at "
        f"or below chance for {len(names)} classes ({verdict.chance:.4f}), so it would teach the student "
        f"wrong labels. The data's string labels were numbered in sorted order {_shown(data.label_ids)}, "
        f"{why}: a guess at the teacher's order. "
    )
    if verdict.other_order is not None and verdict.other_accuracy > verdict.accuracy:
        in_teacher_order = [names[verdict.other_order.index(i)] for i in range(len(names))]
        message += (
            f"Its answers fit data.label_names=[{','.join(in_teacher_order)}] (accuracy "
            f"{verdict.other_accuracy:.4f}): set that key to the class names in the teacher's id order. "
        )
    else:
        message += "Set data.label_names=[...] to the class names in the teacher's id order. "
    return (
        message + "If the teacher is meant to be at chance (an untrained one), set data.check_teacher=false"
    )


def _shown(label_ids: dict, most: int = 20) -> str:
    """``{label: id, ...}``, cut after ``most`` entries."""
    if len(label_ids) <= most:
        return str(label_ids)
    head = ", ".join(f"{k!r}: {v}" for k, v in itertools.islice(label_ids.items(), most))
    return f"{{{head}, ... ({len(label_ids)} labels)}}"
