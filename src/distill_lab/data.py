"""Text-classification data: dataset loaders, class numbering and the text-classification data module.

Loaders (:func:`hub_dataset`, :func:`local_files`, and the built-in offline task
:func:`~distill_lab.data_synthetic.synthetic_relations`) return a DatasetDict with ``train`` and
``validation`` splits. :func:`class_ids` numbers a classification dataset's classes (text and images alike).
:class:`TextClassificationData` takes a DatasetDict (or a zero-argument callable returning one, as Hydra's
``_partial_`` gives), validates its columns, maps labels to ids, tokenizes without padding and batches with
dynamic padding; what every data module shares is in ``distill_lab.data_module``.

This module also exports the names of those two modules that configs and code import from here.
"""

from __future__ import annotations

import csv
import glob
import logging
from collections.abc import Callable
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from distill_lab.data_module import EpochTagged, TrainValidationData, check_sizes
from distill_lab.data_synthetic import (
    NEGATION,
    NEGATIVE_WORDS,
    NEUTRAL_WORDS,
    POSITIVE_WORDS,
    SPECIAL_TOKENS,
    SYNTHETIC_WORDS,
    build_word_tokenizer,
    synthetic_relations,
)

__all__ = [
    "FILE_BUILDERS", "MODEL_COLUMNS", "NEGATION", "NEGATIVE_WORDS", "NEUTRAL_WORDS", "POSITIVE_WORDS",
    "SPECIAL_TOKENS", "SYNTHETIC_WORDS", "EpochTagged", "TextClassificationData", "TrainValidationData",
    "build_word_tokenizer", "check_both_splits", "check_sizes", "class_ids", "hub_dataset", "local_files",
    "synthetic_relations",
]  # fmt: skip

log = logging.getLogger(__name__)

FILE_BUILDERS: dict[str, tuple[str, dict]] = {  # extension -> (datasets builder, builder options)
    # a tab-separated file's quote characters are text (GLUE's .tsv files hold unbalanced '"'): no quoting
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
MODEL_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "labels")


def hub_dataset(
    path: str | None = None,
    name: str | None = None,
    train_split: str = "train",
    validation_split: str = "validation",
    **kwargs,
) -> DatasetDict:
    """Load a dataset from the Hugging Face Hub, e.g. ``hub_dataset("glue", "sst2")``.

    Args:
        path: Dataset repository on the Hub.
        name: Configuration name, if the dataset has several.
        train_split: Split to use for training.
        validation_split: Split to use for validation (e.g. ``validation_matched`` for MNLI).
        **kwargs: Passed on to :func:`datasets.load_dataset`.

    Returns:
        A DatasetDict with the two chosen splits renamed to ``train`` and ``validation``.

    Raises:
        RuntimeError: The dataset could not be loaded (no network, unknown name, ...).
        ValueError: ``path`` is not given (Hydra leaves an unset ``???`` out of a partial's arguments), or a
            chosen split does not exist.
    """
    if path is None:
        raise ValueError(
            "data.dataset.path is not set: name the Hub dataset, e.g. data.dataset.path=glue "
            "data.dataset.name=sst2 (or data=local with your own files)"
        )
    label = path if name is None else f"{path}/{name}"
    try:
        loaded = load_dataset(path, name, **kwargs)
    except Exception as err:
        raise RuntimeError(
            f"could not load dataset {label!r} from the Hugging Face Hub ({type(err).__name__}: {err}). "
            "For offline use, set data=local data.dataset.train_file=... data.dataset.validation_file=... "
            "(csv/tsv/json/jsonl/parquet), or data=synthetic for the built-in task."
        ) from err
    for role, split in (("train", train_split), ("validation", validation_split)):
        if split not in loaded:
            raise ValueError(
                f"dataset {label!r} has no split {split!r}; available splits: {list(loaded)}: set "
                f"data.dataset.{role}_split to one of them"
            )
    return DatasetDict(train=loaded[train_split], validation=loaded[validation_split])


def _load_file(path: str | Path) -> Dataset:
    path = Path(path)
    suffix = path.suffix.lower()
    supported = f"supported extensions: {sorted(FILE_BUILDERS)}"
    if suffix not in FILE_BUILDERS:
        raise ValueError(f"unsupported data file {str(path)!r}; {supported}")
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist ({supported})")
    builder, options = FILE_BUILDERS[suffix]
    try:
        # datasets reads data_files as glob patterns: train[v2].csv would name trainv.csv or train2.csv
        return load_dataset(builder, data_files=glob.escape(str(path)), split="train", **options)
    except Exception as err:  # datasets names neither the file nor, often, the cause (an empty file...)
        cause = err.__cause__ or err.__context__ or err
        raise ValueError(
            f"cannot read data file {str(path)!r} as {builder}: {type(cause).__name__}: {cause} (is it "
            f"empty, or not {suffix[1:]}?)"
        ) from err


def check_both_splits(sources: dict, kind: str, need: str, example: str) -> None:
    """Both splits' sources must be given: Hydra leaves an unset ``???`` out of a partial's arguments, so an
    option left out of the config arrives as None. ``sources`` maps split -> ``data.dataset.<split>_<kind>``;
    ``example`` (with ``{split}``) completes the message's example."""
    for split, source in sources.items():
        if source is None:
            raise ValueError(
                f"data.dataset.{split}_{kind} is not set: both splits need {need}, e.g. "
                f"data.dataset.{split}_{kind}={example.format(split=split)}"
            )


def local_files(
    train_file: str | Path | None = None, validation_file: str | Path | None = None
) -> DatasetDict:
    """Load ``train`` and ``validation`` splits from local .csv, .tsv, .json, .jsonl or .parquet files.

    Raises:
        ValueError: A file is not given (Hydra leaves an unset ``???`` out of a partial's arguments), does not
            exist or has an unsupported extension.
    """
    files = {"train": train_file, "validation": validation_file}
    check_both_splits(
        files, "file", "a file", f"{{split}}.csv (supported extensions: {sorted(FILE_BUILDERS)})"
    )
    return DatasetDict({split: _load_file(path) for split, path in files.items()})


def class_ids(
    raw: DatasetDict,
    label_column: str,
    model_labels: list[str] | None = None,
    match_label_names: bool = True,
    label_names: list[str] | None = None,
) -> tuple[list[str], dict]:
    """The class names of a classification dataset and the mapping from its raw label values to class ids,
    shared by text and image classification.

    - a ``ClassLabel`` (glue, an image folder's sub-folders): its own names and ids; a validation split with a
      ``ClassLabel`` must have the same classes.
    - strings: the train split's values, sorted (as numbers where all are whole numbers: ``"2"`` before
      ``"10"``), with a warning that names the mapping (:func:`sorted_numbering`); or in the order of
      ``label_names`` where it is given.
    - ints: the ids themselves, names ``"0"`` to the largest id in either split.

    Where the model (the teacher) names its classes, named classes (a ``ClassLabel`` or strings) are then
    mapped to the model's ids by name, ignoring case: MNLI's ``entailment, neutral, contradiction`` against a
    teacher whose ``id2label`` reads ``CONTRADICTION, NEUTRAL, ENTAILMENT`` swaps ids 0 and 2, where a
    positional reading would teach (and score) the student against swapped labels. Int labels carry no names
    and stay positional.

    Args:
        raw: ``train`` and ``validation`` splits, both with ``label_column`` (before any subsampling: a subset
            may miss a class).
        label_column: The label column (``data.label_column``).
        model_labels: The model's class names in id order (:func:`~distill_lab.tasks.model_label_names`), or
            None where the model has none (transformers' ``LABEL_0, LABEL_1, ...``).
        match_label_names: False takes the data's class ids as the model's (``data.match_label_names=false``:
            the same classes under other names, in the same order).
        label_names: The data's class names in id order (``data.label_names``), for named classes (strings,
            a ``ClassLabel``): the order of a teacher that names no classes. Matching by name, where it
            applies, then renumbers them as the model does.

    Returns:
        ``(names, ids)``: the class names in id order, and raw label value -> class id.

    Raises:
        ValueError: Labels of another type (float scores, multi-label lists), other classes in the validation
            split than in the train split, ids that are no class (e.g. -1), named classes the model does
            not have (a subset of the model's classes is numbered as the model numbers them, with a warning),
            or ``label_names`` that lack a class of the data or are given for int labels.
    """
    feature = raw["train"].features[label_column]
    dtype = getattr(feature, "dtype", None) or ""  # a list (multi-label) feature has none
    key = f"data.label_column={label_column!r}"
    if not (isinstance(feature, ClassLabel) or dtype in ("string", "large_string") or "int" in dtype):
        raise ValueError(
            f"{key} holds labels of type {feature} (first values: {raw['train'][:3][label_column]}); "
            "classification needs int, string or ClassLabel labels. Float labels that are whole numbers (a "
            "csv column with an empty cell reads as float) need a cast to int in the data; regression scores "
            "and multi-label lists are not supported"
        )
    train_values = set(raw["train"][label_column])
    validation_values = set(raw["validation"][label_column])
    if isinstance(feature, ClassLabel):  # e.g. glue: keep the dataset's own names
        names, label_ids = list(feature.names), {i: i for i in range(feature.num_classes)}
        other = raw["validation"].features[label_column]
        if isinstance(other, ClassLabel) and other.names != names:
            raise ValueError(
                f"{key}: the train and validation splits have different classes: {names} vs {other.names}; "
                "give both splits the same classes (for image folders, the same class sub-folders)"
            )
    elif dtype in ("string", "large_string"):
        numeric = all(v.strip().lstrip("-").isdigit() for v in train_values)
        names = sorted(train_values, key=lambda v: (int(v), v) if numeric else (0, v))
        label_ids = {name: i for i, name in enumerate(names)}
    else:
        if label_names is not None:
            raise ValueError(
                f"data.label_names={list(label_names)} names classes, but {key} holds int labels, which are "
                "the class ids themselves: leave data.label_names unset (null)"
            )
        names = [str(i) for i in range(max(train_values | validation_values) + 1)]
        label_ids = {i: i for i in range(len(names))}
    if unknown := validation_values - train_values:
        raise ValueError(f"validation labels {sorted(unknown)} of {key} do not occur in the train split")
    if invalid := train_values - set(label_ids):
        raise ValueError(f"{key} holds invalid labels {sorted(invalid)}")
    if label_names is not None:
        names, label_ids = _in_given_order(names, label_ids, label_names, key)
    if sorted_numbering(feature, names, model_labels, match_label_names, label_names):
        why = "as the teacher's config names no classes (id2label)"
        if model_labels is not None:
            why = "as data.match_label_names=false takes them as they are"
        log.warning(
            "%s: string labels numbered in sorted order %s, %s. If the teacher numbers them otherwise, give "
            "its order: data.label_names=[...] (the class names in the teacher's id order)",
            key, label_ids, why,
        )  # fmt: skip
    named = isinstance(feature, ClassLabel) or dtype in ("string", "large_string")
    if model_labels is not None and match_label_names and named:
        names, label_ids = _to_model_ids(names, label_ids, model_labels, key)
    return names, label_ids


def sorted_numbering(
    feature,
    names: list[str],
    model_labels: list[str] | None,
    match_label_names: bool,
    label_names: list[str] | None,
) -> bool:
    """Whether :func:`class_ids` numbers string labels by their sorted order, a guess at the teacher's ids:
    neither the teacher's names (``model_labels``, matched by name) nor ``data.label_names`` give the order,
    and the labels are not the ids themselves written as strings (``"0"`` to ``"<classes - 1>"``)."""
    strings = getattr(feature, "dtype", None) in ("string", "large_string")
    matched = model_labels is not None and match_label_names
    as_ids = names == [str(i) for i in range(len(names))]
    return strings and not matched and label_names is None and not as_ids


def _in_given_order(names: list[str], label_ids: dict, label_names: list[str], key: str) -> tuple[list, dict]:
    """The data's named classes renumbered in the order of ``data.label_names``."""
    given = [str(name) for name in label_names]
    if len(set(given)) != len(given):
        raise ValueError(f"data.label_names={given} names a class twice; name each class once")
    if absent := [name for name in names if name not in given]:
        raise ValueError(
            f"data.label_names={given} lacks the data's classes {absent} ({key}): list every class of the "
            f"data ({names}) in the teacher's id order"
        )
    return given, {value: given.index(names[i]) for value, i in label_ids.items()}


def _label_key(name) -> str:
    return str(name).strip().casefold()


def _to_model_ids(
    names: list[str], label_ids: dict, model_labels: list[str], key: str
) -> tuple[list[str], dict]:
    """The data's named classes renumbered as the model numbers them (its ``id2label``), matched by name."""
    model_ids = {_label_key(name): i for i, name in enumerate(model_labels)}
    if len(model_ids) != len(model_labels):
        raise ValueError(
            f"{key}: the teacher's id2label {list(model_labels)} names a class twice (ignoring case), so the "
            f"data's classes {names} cannot be matched to its ids by name; if the data's ids are the "
            "teacher's, set data.match_label_names=false, else fix the teacher config's id2label"
        )
    data_keys = [_label_key(name) for name in names]
    if not set(data_keys) <= set(model_ids):
        raise ValueError(
            f"{key}: the data's classes {names} are not the teacher's {list(model_labels)} (its config's "
            "id2label, compared by name, ignoring case). Give the teacher trained on these classes; if they "
            "are the same classes under other names, in the same id order, set data.match_label_names=false"
        )
    if absent := [name for name in model_labels if _label_key(name) not in data_keys]:
        # a subset of the teacher's classes is still numbered by name: the student keeps the teacher's head
        log.warning(
            "%s: the data has no class %s of the teacher's %s; the student keeps all %d of the teacher's "
            "classes",
            key, absent, list(model_labels), len(model_labels),
        )  # fmt: skip
    renumbered = [model_ids[k] for k in data_keys]
    return list(model_labels), {value: renumbered[i] for value, i in label_ids.items()}


def _tokenize(batch: dict, tokenizer, columns: tuple, label_ids: dict, max_length: int) -> dict:
    """Batched ``Dataset.map`` function: tokenize without padding and map labels to ids."""
    text_column, text_pair_column, label_column = columns
    pairs = batch[text_pair_column] if text_pair_column else None
    encoded = tokenizer(batch[text_column], pairs, truncation=True, max_length=max_length)
    features = {key: encoded[key] for key in MODEL_COLUMNS if key in encoded}
    features["labels"] = [label_ids[value] for value in batch[label_column]]
    return features


class TextClassificationData(TrainValidationData):
    """Tokenized, dynamically padded text-classification batches from a train/validation DatasetDict.

    Args:
        tokenizer: The tokenizer; may be assigned later through the attribute, but before :meth:`setup`.
        text_column: Column holding the text.
        text_pair_column: Column holding the second text of a pair (e.g. MNLI's hypothesis), or None.
        label_column: Column holding the labels: ints (or a ClassLabel) or strings.
        max_length: Sequences are truncated to this many tokens.
        model_labels, match_label_names: The teacher's class names (``run.py`` passes its ``id2label``) and
            whether the data's named classes are mapped to them by name: see :func:`class_ids`.
        label_names: The data's class names in the teacher's id order, for a teacher that names no classes
            (``data.label_names``; None: sorted order, with a warning): see :func:`class_ids`.
        check_teacher: Whether the run measures the teacher on the validation set before training and stops
            where it is at chance under labels numbered in sorted order (``distill_lab.teacher_check``).
        dataset, batch_size, eval_batch_size, num_workers, max_train_samples, max_eval_samples, seed: see
            :class:`TrainValidationData`.
    """

    def __init__(
        self,
        dataset: DatasetDict | Callable[[], DatasetDict],
        tokenizer: PreTrainedTokenizerBase | None = None,
        text_column: str = "text",
        text_pair_column: str | None = None,
        label_column: str = "label",
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
        model_labels: list[str] | None = None,
        match_label_names: bool = True,
        label_names: list[str] | None = None,
        check_teacher: bool = True,
    ) -> None:
        super().__init__(
            dataset, batch_size, eval_batch_size, num_workers, max_train_samples, max_eval_samples, seed
        )
        check_sizes({"max_length": max_length})
        if isinstance(label_names, str):  # data.label_names=neg would be one name, not a list
            raise ValueError(
                f"data.label_names={label_names!r} must be a list, e.g. data.label_names=[neg,pos]"
            )
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.max_length = max_length
        self.model_labels = model_labels
        self.match_label_names = match_label_names
        self.given_label_names = None if label_names is None else [str(name) for name in label_names]
        self.check_teacher = check_teacher
        self.label_names: list[str] | None = None
        self.label_ids: dict | None = None  # raw label value -> class id, set by setup()
        self.numbered_by_sort = False  # string labels numbered in sorted order (a guess), set by setup()

    @property
    def num_labels(self) -> int:
        """Number of classes, known after :meth:`setup`."""
        if self.label_names is None:
            raise RuntimeError("num_labels is known only after TextClassificationData.setup()")
        return len(self.label_names)

    def setup(self, stage: str | None = None) -> None:
        """Load, validate, subsample and tokenize the dataset (only the first call does any work).

        Raises:
            ValueError: No tokenizer is set, a split or column is missing, or the labels are unusable.
        """
        if self.splits is not None:
            return
        if self.tokenizer is None:
            raise ValueError("TextClassificationData has no tokenizer: set its `tokenizer` before setup()")
        special = self.tokenizer.num_special_tokens_to_add(pair=self.text_pair_column is not None)
        if self.max_length <= special + (self.text_pair_column is not None):
            # the tokenizer then keeps every token (it cannot truncate below its special tokens), silently
            raise ValueError(
                f"data.max_length={self.max_length} leaves no room for text: the tokenizer adds {special} "
                f"special tokens to each {'pair' if self.text_pair_column else 'text'}; give at least "
                f"{special + 2}"
            )
        raw = self.load_splits(
            {
                "text_column": self.text_column,
                "label_column": self.label_column,
                "text_pair_column": self.text_pair_column,
            },
            blank_is_empty=True,
        )
        options = (self.model_labels, self.match_label_names, self.given_label_names)
        # the whole dataset, before any subsampling
        self.label_names, label_ids = class_ids(raw, self.label_column, *options)
        self.label_ids = label_ids
        feature = raw["train"].features[self.label_column]
        self.numbered_by_sort = sorted_numbering(feature, self.label_names, *options)
        self.raw = raw = self.subsample(raw)
        columns = (self.text_column, self.text_pair_column, self.label_column)
        fn_kwargs = dict(
            tokenizer=self.tokenizer, columns=columns, label_ids=label_ids, max_length=self.max_length
        )
        self.splits = DatasetDict(
            {
                split: ds.map(_tokenize, batched=True, remove_columns=ds.column_names, fn_kwargs=fn_kwargs)
                for split, ds in raw.items()
            }
        )

    def collator(self, split: str) -> DataCollatorWithPadding:
        """Batches padded to the longest sequence in each."""
        return DataCollatorWithPadding(self.tokenizer)

    def example_texts(self, split: str = "validation", size: int = 8) -> list[str]:
        """Raw texts of the examples in :meth:`example_batch`; a pair is joined by the separator token."""
        self.setup()
        raw = self.raw[self._check_split(split)]
        rows = raw[: min(size, len(raw))]
        if self.text_pair_column is None:
            return rows[self.text_column]
        sep = self.tokenizer.sep_token or "|"
        pairs = zip(rows[self.text_column], rows[self.text_pair_column], strict=True)
        return [f"{a} {sep} {b}" for a, b in pairs]
