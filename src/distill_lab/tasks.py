"""What the teacher and student are trained for: the model head, the output-distillation loss, the metrics.

A task is chosen with ``task=`` (``conf/task/``) and handed to the ``DistillationModule`` as a built object:

============================  ===============================  ============================================
task                          output loss                      validation metrics (student and teacher)
============================  ===============================  ============================================
``sequence_classification``   ``kd_loss`` on the logits        ``acc``, ``f1`` (macro), ``mcc``
  a regression head           ``regression_kd_loss``           ``pearson``, ``spearman``
``image_classification``      ``kd_loss`` on the logits        ``acc``, ``f1`` (macro), ``mcc``
``masked_lm``                 ``kd_loss`` on masked tokens     ``masked_acc``, ``perplexity`` (masked)
``causal_lm``                 ``kd_loss`` on next tokens       ``perplexity`` (every real next token)
``token_classification``      ``kd_loss`` on labelled tokens   ``precision``, ``recall``, ``f1`` (entities),
                                                               ``token_acc``
============================  ===============================  ============================================

``kd_loss`` is ``alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T)``, averaged over the labelled
positions (label -100 is ignored: the unmasked tokens of a masked LM, padding). A causal LM predicts token
t + 1 at position t, so its labels are shifted by one against the logits (the last position gets -100)
before the loss and the metrics, as the models' own ``loss`` does.

A sequence classifier with one output (``num_labels=1``: a regression head, STS-B's similarity scores) is
taught ``alpha * MSE(student, labels) + (1 - alpha) * MSE(student, teacher)``: no temperature (a score has no
distribution to soften).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassMatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from distill_lab.losses import kd_loss
from distill_lab.objective import regression_kd_loss

IGNORE_INDEX = -100
log = logging.getLogger(__name__)


def model_label_names(config) -> list[str] | None:
    """A classifier's class names in id order (its config's ``id2label``), or None where they are
    transformers' placeholders ``LABEL_0, LABEL_1, ...`` (a head given only ``num_labels``), which name no
    class."""
    names = [str(config.id2label[i]) for i in range(config.num_labels)] if config.id2label else []
    if not names or names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


class Perplexity(Metric):
    """``exp`` of the mean cross-entropy over the labelled positions (label -100 ignored), over every batch
    and process: ``exp`` of the model's own loss on the whole set.

    torchmetrics' ``Perplexity`` takes the log of softmax probabilities, so one target whose probability is
    below float32's smallest (a logit about 104 under its row's largest) made the whole epoch's perplexity
    ``inf``; and it drops the ignored positions by boolean indexing, a wait for the device per update. This
    takes ``cross_entropy`` (a log-softmax, finite) in float32 and counts the targets on the device."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, ignore_index: int = -100) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, logits: Tensor, labels: Tensor) -> None:
        """``logits`` (..., V), ``labels`` (...)."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        targets = labels.reshape(-1)
        self.total += F.cross_entropy(flat, targets, ignore_index=self.ignore_index, reduction="sum")
        self.count += (targets != self.ignore_index).sum()

    def compute(self) -> Tensor:
        return torch.exp(self.total / self.count)


class MatthewsCorrCoef(MulticlassMatthewsCorrCoef):
    """torchmetrics' multiclass Matthews correlation, except where it is undefined (a model that predicts one
    class only, or labels of one class: a zero denominator): 0, as scikit-learn and GLUE's scorer give it.
    torchmetrics gives a value from smoothed counts there on two classes (about -0.13 for a constant answer
    on a balanced set), which would rank a constant student apart from an equally useless random one.

    ``MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))`` over the confusion
    matrix: ``c`` its trace, ``s`` its sum, ``p_k``, ``t_k`` the predictions and labels of class k.
    """

    def compute(self) -> Tensor:
        confmat = self.confmat.double()
        predicted, actual, total = confmat.sum(0), confmat.sum(1), confmat.sum()
        denominator = (total**2 - (predicted**2).sum()) * (total**2 - (actual**2).sum())
        if denominator == 0:
            return torch.zeros((), device=confmat.device)
        return super().compute()


class Pearson(PearsonCorrCoef):
    """torchmetrics' Pearson correlation, with the direction it improves in stated (torchmetrics leaves it
    None, and the best checkpoint, the gap and the model card need it)."""

    higher_is_better = True


class SequenceClassification:
    """One label per example; logits ``(B, C)``, labels ``(B,)``: class ids, or with one output (``C = 1``,
    a regression head) float scores."""

    name = "sequence_classification"
    auto_class = AutoModelForSequenceClassification
    monitor, monitor_mode = "val/acc", "max"
    inputs = "text"
    data_module = "distill_lab.data.TextClassificationData"  # what its data options build (conf/data/)
    data_configs = ("synthetic", "local", "hf")
    # the teacher is measured on the validation set before training (distill_lab.teacher_check): at chance,
    # a classifier is teaching labels in another order than its own
    checks_teacher = True
    regression = True  # a head of one output (num_labels=1) is a regression head

    def output_loss(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        batch: Mapping[str, Tensor],
        temperature: float,
        alpha: float,
    ) -> Tensor:
        if self.regression and student_logits.shape[-1] == 1:
            return regression_kd_loss(student_logits, teacher_logits, batch.get("labels"), alpha)
        return kd_loss(student_logits, teacher_logits, batch.get("labels"), temperature, alpha)

    def metrics(self, prefix: str, num_labels: int) -> MetricCollection:
        if self.regression and num_labels == 1:
            return MetricCollection({"pearson": Pearson(), "spearman": SpearmanCorrCoef()}, prefix=prefix)
        # validate_args=False: the argument checks read the labels back from the device at every update (F1's
        # confusion counts, a torch.bincount, still wait for the device once per update)
        return MetricCollection(
            {
                "acc": MulticlassAccuracy(num_labels, average="micro", validate_args=False),
                "f1": MulticlassF1Score(num_labels, average="macro", validate_args=False),
                "mcc": MatthewsCorrCoef(num_labels, validate_args=False),
            },
            prefix=prefix,
        )

    def update(self, metrics: MetricCollection, logits: Tensor, batch: Mapping[str, Tensor]) -> None:
        if self.regression and logits.shape[-1] == 1:  # scores: (B,) predictions, in float32
            metrics.update(logits.squeeze(-1).float(), batch["labels"].float())
            return
        metrics.update(logits, batch["labels"])

    def output_count(self, batch: Mapping[str, Tensor]) -> int | Tensor:
        """What the output loss of ``batch`` averages over: its examples. The weight of the batch's loss in a
        mean over batches that equals the loss of their union."""
        return len(batch["labels"])

    def num_classes(self, config) -> int:
        """The size of the model's output distribution: its labels."""
        return config.num_labels

    def data_options(self, teacher) -> dict:
        """What the data module takes from the teacher: its class names, to number the data's classes as the
        teacher does (:func:`~distill_lab.data.class_ids`)."""
        options = {"model_labels": model_label_names(teacher.config)}
        if self.regression and teacher.config.num_labels == 1:  # float scores, no classes to number
            options["regression"] = True
        return options

    def check_data_config(self, data_cfg: Mapping) -> None:
        """What the ``data`` config alone can tell, before anything loads (the class is checked by
        ``run.py``)."""

    def check(self, teacher, data) -> None:
        """The teacher's head must fit the data's labels: a classifier is fine-tuned on its task first."""
        if teacher.config.num_labels != data.num_labels:
            raise ValueError(
                f"the teacher has {teacher.config.num_labels} labels but the data has {data.num_labels} "
                f"({data.label_names}); the teacher must be fine-tuned on this task."
            )


class ImageClassification(SequenceClassification):
    """Classification of images (ViT and other ``AutoModelForImageClassification`` models), attention over
    patches; batches carry ``pixel_values``."""

    name = "image_classification"
    auto_class = AutoModelForImageClassification
    inputs = "image"
    data_module = "distill_lab.data_images.ImageFolderData"
    data_configs = ("synthetic_images", "imagefolder")
    regression = False


class MaskedLM:
    """Masked-language-model distillation on raw text (MiniLM, TinyBERT's general distillation): the data
    masks tokens dynamically (labels hold the original ids there, -100 elsewhere); logits ``(B, L, V)``."""

    name = "masked_lm"
    auto_class = AutoModelForMaskedLM
    monitor, monitor_mode = "val/perplexity", "min"
    inputs = "text"
    data_module = "distill_lab.data_lm.LanguageModelingData"
    data_configs = ("lm_synthetic", "lm_local", "lm_hf")
    # token ids are the tokenizer's, not an order the data guessed: a teacher with another tokenizer is
    # refused by check() instead
    checks_teacher = False
    # the logits compared: all of them (None), or the first vocab_size where the two models' embedding
    # matrices are padded to different sizes past one tokenizer (fit_vocabularies)
    vocab_size: int | None = None

    def _labels(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The targets, aligned with the logits' positions."""
        return batch["labels"]

    def _positions(self, logits: Tensor, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.vocab_size is not None:  # a copy of (B, L, V) downstream: only where the sizes differ
            logits = logits[..., : self.vocab_size]
        return logits, self._labels(batch)

    def fit_vocabularies(self, teacher, student, tokenizer) -> None:
        """Teacher and student of one tokenizer whose embedding matrices are padded to different sizes
        (Qwen2.5's 152064 and 151936 rows over a tokenizer of 151665 tokens): the output loss, its
        cross-entropy and the metrics then take the first ``len(tokenizer)`` logits of each, the rows past it
        being padding that no token id reaches; said in a warning. Models of one size keep every logit. A
        model with fewer rows than the tokenizer has tokens is refused elsewhere (:meth:`check`,
        ``distill_lab.models.check_student``), and so is a student with a tokenizer of its own that is not
        the teacher's."""
        sizes = teacher.config.vocab_size, student.config.vocab_size
        padded = tokenizer is not None and sizes[0] != sizes[1] and min(sizes) >= len(tokenizer)
        self.vocab_size = len(tokenizer) if padded else None
        if padded:
            log.warning(
                "the teacher's vocabulary has %d entries and the student's %d, over the tokenizer's %d "
                "tokens: the output loss and the metrics compare the first %d logits of each (the rows past "
                "the tokenizer's are padding)", *sizes, len(tokenizer), len(tokenizer),
            )  # fmt: skip

    def output_count(self, batch: Mapping[str, Tensor]) -> Tensor:
        """What the output loss of ``batch`` averages over: its labelled positions (counted on the device)."""
        return (self._labels(batch) != IGNORE_INDEX).sum()

    def output_loss(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        batch: Mapping[str, Tensor],
        temperature: float,
        alpha: float,
    ) -> Tensor:
        student_logits, labels = self._positions(student_logits, batch)
        teacher_logits, _ = self._positions(teacher_logits, batch)
        return kd_loss(student_logits, teacher_logits, labels, temperature, alpha)

    def metrics(self, prefix: str, num_labels: int) -> MetricCollection:
        # validate_args=False as for classification; the accuracy still drops the ignored positions by boolean
        # indexing (a device sync per update)
        return MetricCollection(
            {
                "masked_acc": MulticlassAccuracy(
                    num_labels,
                    average="micro",
                    ignore_index=IGNORE_INDEX,
                    multidim_average="global",
                    validate_args=False,
                ),
                "perplexity": Perplexity(ignore_index=IGNORE_INDEX),
            },
            prefix=prefix,
        )

    def update(self, metrics: MetricCollection, logits: Tensor, batch: Mapping[str, Tensor]) -> None:
        logits, labels = self._positions(logits, batch)
        for name, metric in metrics.items(keep_base=True):
            if name.endswith("perplexity"):
                metric.update(logits, labels)
            else:  # accuracy over the labelled positions, (N, V) against (N,)
                metric.update(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    def num_classes(self, config) -> int:
        """The size of the model's output distribution: its vocabulary (the tokenizer's part of it where the
        two models are padded to different sizes, :meth:`fit_vocabularies`)."""
        return config.vocab_size if self.vocab_size is None else min(config.vocab_size, self.vocab_size)

    def data_options(self, teacher) -> dict:
        """Token ids are the tokenizer's: nothing to take from the teacher."""
        return {}

    def check_data_config(self, data_cfg: Mapping) -> None:
        """``data.mlm`` must be the task's: masking for ``masked_lm``, none for ``causal_lm``."""
        masked = self.name == "masked_lm"
        if data_cfg.get("mlm", masked) != masked:
            raise ValueError(
                f"task={self.name} needs data.mlm={str(masked).lower()}, got "
                f"data.mlm={str(data_cfg['mlm']).lower()}: {'masked' if masked else 'causal'} language "
                f"modelling {'masks tokens' if masked else 'predicts every next token, nothing masked'}"
            )

    def check(self, teacher, data) -> None:
        self.check_data_config({"mlm": data.mlm} if hasattr(data, "mlm") else {})
        if teacher.config.vocab_size < len(data.tokenizer):
            raise ValueError(
                f"the tokenizer has {len(data.tokenizer)} tokens but the teacher's vocabulary only "
                f"{teacher.config.vocab_size}: use the teacher's own tokenizer (teacher.name_or_path)."
            )


class CausalLM(MaskedLM):
    """Decoder language-model distillation on raw text (GPT-2, LLaMA, Qwen, Mistral): every real token is a
    target for the position before it; labels are the input ids with padding at -100."""

    name = "causal_lm"
    auto_class = AutoModelForCausalLM

    def _labels(self, batch: Mapping[str, Tensor]) -> Tensor:
        # position i predicts token i + 1: shift the labels (small) rather than slice the logits (B, L, V),
        # whose non-contiguous slice every flattening downstream would copy; the last position gets no target
        return F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE_INDEX)

    def metrics(self, prefix: str, num_labels: int) -> MetricCollection:
        return MetricCollection({"perplexity": Perplexity(ignore_index=IGNORE_INDEX)}, prefix=prefix)


class TokenClassification:
    """One tag per word (NER-style, BIO tags): each word's tag labels its first sub-token, every other token
    -100 (``distill_lab.data_tokens``); logits ``(B, L, C)``, labels ``(B, L)``. The output loss averages over
    the labelled tokens; the metrics are seqeval's entity precision, recall and F1
    (``distill_lab.entity_metrics``) and the accuracy over the labelled tokens."""

    name = "token_classification"
    auto_class = AutoModelForTokenClassification
    monitor, monitor_mode = "val/f1", "max"
    inputs = "text"
    data_module = "distill_lab.data_tokens.TokenClassificationData"
    data_configs = ("tokens_synthetic", "tokens_local", "tokens_hf")
    checks_teacher = False  # distill_lab.teacher_check measures one label per example
    # the tag names in id order, which the entity metrics read (B-/I- prefixes): the data's, matched to the
    # teacher's id2label, set by check()
    label_names: list[str] | None = None

    def output_loss(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        batch: Mapping[str, Tensor],
        temperature: float,
        alpha: float,
    ) -> Tensor:
        return kd_loss(student_logits, teacher_logits, batch["labels"], temperature, alpha)

    def output_count(self, batch: Mapping[str, Tensor]) -> Tensor:
        """What the output loss of ``batch`` averages over: its labelled tokens (counted on the device)."""
        return (batch["labels"] != IGNORE_INDEX).sum()

    def metrics(self, prefix: str, num_labels: int) -> MetricCollection:
        from distill_lab.entity_metrics import EntityScore  # seqeval, loaded only for this task

        names = self.label_names if self.label_names and len(self.label_names) == num_labels else None
        scores = {score: EntityScore(score, names) for score in ("precision", "recall", "f1")}
        accuracy = MulticlassAccuracy(
            num_labels,
            average="micro",
            ignore_index=IGNORE_INDEX,
            multidim_average="global",
            validate_args=False,
        )
        return MetricCollection({**scores, "token_acc": accuracy}, prefix=prefix)

    def update(self, metrics: MetricCollection, logits: Tensor, batch: Mapping[str, Tensor]) -> None:
        labels = batch["labels"]
        for name, metric in metrics.items(keep_base=True):
            if name.endswith("token_acc"):
                metric.update(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            else:
                metric.update(logits, labels)

    def num_classes(self, config) -> int:
        """The size of the model's output distribution: its tags."""
        return config.num_labels

    def data_options(self, teacher) -> dict:
        """The teacher's tag names, to number the data's tags as the teacher does."""
        return {"model_labels": model_label_names(teacher.config)}

    def check_data_config(self, data_cfg: Mapping) -> None:
        """Nothing the ``data`` config alone can tell (the class is checked by ``run.py``)."""

    def check(self, teacher, data) -> None:
        """The teacher's head must fit the data's tags; their names are kept for the entity metrics."""
        if teacher.config.num_labels != data.num_labels:
            raise ValueError(
                f"the teacher has {teacher.config.num_labels} labels but the data has {data.num_labels} tags "
                f"({data.label_names}); the teacher must be fine-tuned on this task."
            )
        self.label_names = list(data.label_names)


# how a transformers model class's name ends -> its task, for a model given without one
TASK_BY_CLASS_SUFFIX = {
    "ForSequenceClassification": "sequence_classification",
    "ForTokenClassification": "token_classification",
    "ForImageClassification": "image_classification",
    "ForMaskedLM": "masked_lm",
    "ForCausalLM": "causal_lm",
    "LMHeadModel": "causal_lm",  # GPT-2's
}


def task_name_of(model) -> str | None:
    """The task ``model``'s class name implies (a PEFT model's base model's), or None where it says none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return next((task for suffix, task in TASK_BY_CLASS_SUFFIX.items() if name.endswith(suffix)), None)


TASKS = {
    task.name: task
    for task in (SequenceClassification, ImageClassification, MaskedLM, CausalLM, TokenClassification)
}


def get_task(name: str):
    """The task called ``name``; an unknown name is an error that lists the valid ones."""
    try:
        return TASKS[name]()
    except KeyError:
        raise ValueError(f"unknown task {name!r}; valid: {', '.join(sorted(TASKS))}") from None
