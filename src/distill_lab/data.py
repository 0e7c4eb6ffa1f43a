"""Text-classification data: dataset loaders, class numbering and the text-classification data module.

Loaders (:func:`hub_dataset`, :func:`local_files`, and the built-in offline task
:func:`~distill_lab.data_synthetic.synthetic_relations`) return a DatasetDict with ``train`` and
``validation`` splits. :func:`~distill_lab.labels.class_ids` numbers a classification dataset's classes
(text and images alike).
:class:`TextClassificationData` takes a DatasetDict (or a zero-argument callable returning one, as Hydra's
``_partial_`` gives), validates its columns, maps labels to ids, tokenizes without padding and batches with
dynamic padding; what every data module shares is in ``distill_lab.data_module``.

This module also exports the names of those two modules and ``class_ids`` that configs and code import from
here.
"""

from __future__ import annotations

import csv
import glob
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset, DatasetDict, load_dataset
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
from distill_lab.labels import check_scores, class_ids, sorted_numbering

__all__ = [
    "FILE_BUILDERS", "MODEL_COLUMNS", "NEGATION", "NEGATIVE_WORDS", "NEUTRAL_WORDS", "POSITIVE_WORDS",
    "SPECIAL_TOKENS", "SYNTHETIC_WORDS", "EpochTagged", "TextClassificationData", "TrainValidationData",
    "build_word_tokenizer", "check_both_splits", "check_sizes", "class_ids", "hub_dataset", "load_file",
    "local_files", "synthetic_relations",
]  # fmt: skip

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
    test_split: str | None = None,
    **kwargs,
) -> DatasetDict:
    """Load a dataset from the Hugging Face Hub, e.g. ``hub_dataset("glue", "sst2")``.

    Args:
        path: Dataset repository on the Hub.
        name: Configuration name, if the dataset has several.
        train_split: Split to use for training.
        validation_split: Split to use for validation (e.g. ``validation_matched`` for MNLI).
        test_split: A held-out split, evaluated once at the end of the run (None: none). Its labels must be
            real ones (GLUE's own ``test`` splits hold -1: use a split with labels).
        **kwargs: Passed on to :func:`datasets.load_dataset`.

    Returns:
        A DatasetDict with the chosen splits renamed to ``train``, ``validation`` (and ``test``).

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
    roles = {"train": train_split, "validation": validation_split, "test": test_split}
    roles = {role: split for role, split in roles.items() if split is not None}
    for role, split in roles.items():
        if split not in loaded:
            raise ValueError(
                f"dataset {label!r} has no split {split!r}; available splits: {list(loaded)}: set "
                f"data.dataset.{role}_split to one of them"
            )
    return DatasetDict({role: loaded[split] for role, split in roles.items()})


def load_file(path: str | Path) -> Dataset:
    """One split from a local .csv, .tsv, .json, .jsonl or .parquet file (the reader chosen by extension).

    Raises:
        ValueError: The file does not exist, has an unsupported extension or cannot be read.
    """
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
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
) -> DatasetDict:
    """Load ``train`` and ``validation`` splits, and a held-out ``test`` split where ``test_file`` is given,
    from local .csv, .tsv, .json, .jsonl or .parquet files.

    Raises:
        ValueError: A file is not given (Hydra leaves an unset ``???`` out of a partial's arguments), does not
            exist or has an unsupported extension.
    """
    files = {"train": train_file, "validation": validation_file}
    check_both_splits(
        files, "file", "a file", f"{{split}}.csv (supported extensions: {sorted(FILE_BUILDERS)})"
    )
    if test_file is not None:
        files["test"] = test_file
    return DatasetDict({split: load_file(path) for split, path in files.items()})


def _tokenize(batch: dict, tokenizer, columns: tuple, label_ids: dict, max_length: int) -> dict:
    """Batched ``Dataset.map`` function: tokenize without padding and map labels to ids."""
    text_column, text_pair_column, label_column = columns
    pairs = batch[text_pair_column] if text_pair_column else None
    encoded = tokenizer(batch[text_column], pairs, truncation=True, max_length=max_length)
    features = {key: encoded[key] for key in MODEL_COLUMNS if key in encoded}
    if label_ids is None:  # regression: the scores themselves
        features["labels"] = [float(value) for value in batch[label_column]]
    else:
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
        regression: The teacher has one output (``num_labels=1``, STS-B): the labels are numbers, taken as
            they are (float), and no classes are numbered (``run.py`` passes it from the teacher's head).
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
        regression: bool = False,
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
        self.regression = regression
        self.label_names: list[str] | None = None
        self.label_ids: dict | None = None  # raw label value -> class id, set by setup()
        self.numbered_by_sort = False  # string labels numbered in sorted order (a guess), set by setup()

    @property
    def num_labels(self) -> int:
        """Number of classes (1 for regression), known after :meth:`setup`."""
        if self.regression:
            return 1
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
        if self.regression:
            check_scores(raw, self.label_column)
            label_ids = None
        else:
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
