"""Text-classification data: dataset loaders, a built-in offline task and a Lightning data module.

Loaders (:func:`hub_dataset`, :func:`local_files`, :func:`synthetic_relations`) return a DatasetDict with
``train`` and ``validation`` splits. :class:`TextClassificationData` takes one (or a zero-argument callable
returning one, as Hydra's ``_partial_`` gives), validates its columns, maps labels to ids (:func:`class_ids`),
tokenizes without padding and batches with dynamic padding.
"""

from __future__ import annotations

import csv
import glob
import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning
import torch
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from distill_lab import _compat
from distill_lab.resume import ResumableDistributedSampler, ResumableRandomSampler, training_position

log = logging.getLogger(__name__)

# the built-in task's vocabulary: sentiment words, neutral filler and the negation that flips a sentiment word
POSITIVE_WORDS: tuple[str, ...] = ("good", "great", "fine", "nice", "happy", "best")
NEGATIVE_WORDS: tuple[str, ...] = ("bad", "awful", "poor", "sad", "worst", "ugly")
NEUTRAL_WORDS: tuple[str, ...] = ("the", "a", "movie", "plot", "actor", "it", "was", "is")
NEGATION = "not"
SYNTHETIC_WORDS: tuple[str, ...] = (*POSITIVE_WORDS, *NEGATIVE_WORDS, *NEUTRAL_WORDS, NEGATION)
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
FILE_BUILDERS: dict[str, tuple[str, dict]] = {  # extension -> (datasets builder, builder options)
    # a tab-separated file's quote characters are text (GLUE's .tsv files hold unbalanced '"'): no quoting
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
MODEL_COLUMNS: tuple[str, ...] = ("input_ids", "attention_mask", "token_type_ids", "labels")


def _negation_split(
    num: int,
    min_length: int,
    max_length: int,
    negation_rate: float,
    distractor_rate: float,
    rng: random.Random,
) -> Dataset:
    texts, labels = [], []
    for _ in range(num):
        words = [rng.choice(NEUTRAL_WORDS) for _ in range(rng.randint(min_length, max_length))]
        position = rng.randrange(1, len(words))
        sentiment = rng.choice(POSITIVE_WORDS + NEGATIVE_WORDS)
        words[position] = sentiment
        label = int(sentiment in POSITIVE_WORDS)
        if rng.random() < negation_rate:
            words[position - 1] = NEGATION
            label = 1 - label
        free = [k for k in range(len(words)) if k not in (position - 1, position)]
        if free and rng.random() < distractor_rate:  # a "not" elsewhere negates nothing
            words[rng.choice(free)] = NEGATION
        texts.append(" ".join(words))
        labels.append(label)
    return Dataset.from_dict({"text": texts, "label": labels})


def synthetic_relations(
    num_train: int = 4000,
    num_validation: int = 500,
    min_length: int = 8,
    max_length: int = 16,
    negation_rate: float = 0.3,
    distractor_rate: float = 0.5,
    seed: int = 0,
) -> DatasetDict:
    """The built-in offline task: sentiment with negation, a label that depends on a relation between tokens.

    Each example is ``min_length`` to ``max_length`` neutral words with one sentiment word (positive or
    negative, at random). The label is the word's polarity, flipped when the word right before it is "not"
    (probability ``negation_rate``); with probability ``distractor_rate`` another "not" stands elsewhere and
    negates nothing. Neither the words present nor the presence of "not" settle the label: a model has to
    relate the sentiment word to its left neighbour, which is what attention does. A bag of words tops out
    near 75% accuracy; a 4-layer BERT reaches about 99%.

    Args:
        num_train, num_validation: split sizes.
        min_length, max_length: sequence length in words (at least 3).
        negation_rate, distractor_rate: probabilities in [0, 1].
        seed: the same seed gives the same dataset; train and validation use separate seed streams.

    Returns:
        A DatasetDict with ``train`` and ``validation`` splits and columns ``text`` (str) and ``label`` (int).
    """
    if not 3 <= min_length <= max_length:
        raise ValueError(f"need 3 <= min_length <= max_length, got {min_length} and {max_length}")
    if not (0.0 <= negation_rate <= 1.0 and 0.0 <= distractor_rate <= 1.0):
        raise ValueError(
            f"negation_rate and distractor_rate must be in [0, 1], got {negation_rate}, {distractor_rate}"
        )
    sizes = {"train": num_train, "validation": num_validation}
    return DatasetDict(  # each split draws from its own seed stream
        {
            split: _negation_split(
                n, min_length, max_length, negation_rate, distractor_rate, random.Random(f"{seed}/{split}")
            )
            for split, n in sizes.items()
        }
    )


def build_word_tokenizer(
    words: Sequence[str] = SYNTHETIC_WORDS, model_max_length: int = 64
) -> PreTrainedTokenizerFast:
    """A BERT-style word-level tokenizer over ``words`` (by default the built-in task's vocabulary).

    Ids 0-4 are ``[PAD] [UNK] [CLS] [SEP] [MASK]``, followed by the words. Text is split on whitespace and
    framed as ``[CLS] a [SEP]`` or ``[CLS] a [SEP] b [SEP]`` (with token type ids 0 and 1).

    Args:
        words: the vocabulary, after the special tokens; duplicates are an error.
        model_max_length: Maximum sequence length recorded in the tokenizer.

    Returns:
        A fast tokenizer that round-trips through ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    tokens = (*SPECIAL_TOKENS, *words)
    if len(set(tokens)) != len(tokens):
        raise ValueError("build_word_tokenizer: the words repeat or clash with the special tokens")
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=model_max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],  # BERT-style segment ids
    )


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
            "data.dataset.path is not set: name the Hub dataset, e.g. data.dataset.path=glue data.dataset.name=sst2 "
            "(or data=local with your own files)"
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
            f"cannot read data file {str(path)!r} as {builder}: {type(cause).__name__}: {cause} (is it empty, or not "
            f"{suffix[1:]}?)"
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
    raw: DatasetDict, label_column: str, model_labels: list[str] | None = None, match_label_names: bool = True
) -> tuple[list[str], dict]:
    """The class names of a classification dataset and the mapping from its raw label values to class ids,
    shared by text and image classification.

    - a ``ClassLabel`` (glue, an image folder's sub-folders): its own names and ids; a validation split with a
      ``ClassLabel`` must have the same classes.
    - strings: the train split's values, sorted (as numbers where all are whole numbers: ``"2"`` before ``"10"``).
    - ints: the ids themselves, names ``"0"`` to the largest id in either split.

    Where the model (the teacher) names its classes, named classes (a ``ClassLabel`` or strings) are then mapped
    to the model's ids by name, ignoring case: MNLI's ``entailment, neutral, contradiction`` against a teacher
    whose ``id2label`` reads ``CONTRADICTION, NEUTRAL, ENTAILMENT`` swaps ids 0 and 2, where a positional
    reading would teach (and score) the student against swapped labels. Int labels carry no names and stay
    positional.

    Args:
        raw: ``train`` and ``validation`` splits, both with ``label_column`` (before any subsampling: a subset may
            miss a class).
        label_column: The label column (``data.label_column``).
        model_labels: The model's class names in id order (:func:`~distill_lab.tasks.model_label_names`), or
            None where the model has none (transformers' ``LABEL_0, LABEL_1, ...``).
        match_label_names: False takes the data's class ids as the model's (``data.match_label_names=false``:
            the same classes under other names, in the same order).

    Returns:
        ``(names, ids)``: the class names in id order, and raw label value -> class id.

    Raises:
        ValueError: Labels of another type (float scores, multi-label lists), other classes in the validation
            split than in the train split, ids that are no class (e.g. -1), or named classes the model does not
            have (a subset of the model's classes is numbered as the model numbers them, with a warning).
    """
    feature = raw["train"].features[label_column]
    dtype = getattr(feature, "dtype", None) or ""  # a list (multi-label) feature has none
    key = f"data.label_column={label_column!r}"
    if not (isinstance(feature, ClassLabel) or dtype in ("string", "large_string") or "int" in dtype):
        raise ValueError(
            f"{key} holds labels of type {feature} (first values: {raw['train'][:3][label_column]}); classification "
            "needs int, string or ClassLabel labels. Float labels that are whole numbers (a csv column with an empty "
            "cell reads as float) need a cast to int in the data; regression scores and multi-label lists are not "
            "supported"
        )
    train_values = set(raw["train"][label_column])
    validation_values = set(raw["validation"][label_column])
    if isinstance(feature, ClassLabel):  # e.g. glue: keep the dataset's own names
        names, label_ids = list(feature.names), {i: i for i in range(feature.num_classes)}
        other = raw["validation"].features[label_column]
        if isinstance(other, ClassLabel) and other.names != names:
            raise ValueError(
                f"{key}: the train and validation splits have different classes: {names} vs {other.names}; give "
                "both splits the same classes (for image folders, the same class sub-folders)"
            )
    elif dtype in ("string", "large_string"):
        numeric = all(v.strip().lstrip("-").isdigit() for v in train_values)
        names = sorted(train_values, key=lambda v: (int(v), v) if numeric else (0, v))
        label_ids = {name: i for i, name in enumerate(names)}
    else:
        names = [str(i) for i in range(max(train_values | validation_values) + 1)]
        label_ids = {i: i for i in range(len(names))}
    if unknown := validation_values - train_values:
        raise ValueError(f"validation labels {sorted(unknown)} of {key} do not occur in the train split")
    if invalid := train_values - set(label_ids):
        raise ValueError(f"{key} holds invalid labels {sorted(invalid)}")
    named = isinstance(feature, ClassLabel) or dtype in ("string", "large_string")
    if model_labels is not None and match_label_names and named:
        names, label_ids = _to_model_ids(names, label_ids, model_labels, key)
    return names, label_ids


def _label_key(name) -> str:
    return str(name).strip().casefold()


def _to_model_ids(
    names: list[str], label_ids: dict, model_labels: list[str], key: str
) -> tuple[list[str], dict]:
    """The data's named classes renumbered as the model numbers them (its ``id2label``), matched by name."""
    model_ids = {_label_key(name): i for i, name in enumerate(model_labels)}
    if len(model_ids) != len(model_labels):
        raise ValueError(
            f"{key}: the teacher's id2label {list(model_labels)} names a class twice (ignoring case), so the data's "
            f"classes {names} cannot be matched to its ids by name; if the data's ids are the teacher's, set "
            "data.match_label_names=false, else fix the teacher config's id2label"
        )
    data_keys = [_label_key(name) for name in names]
    if not set(data_keys) <= set(model_ids):
        raise ValueError(
            f"{key}: the data's classes {names} are not the teacher's {list(model_labels)} (its config's id2label, "
            "compared by name, ignoring case). Give the teacher trained on these classes; if they are the same "
            "classes under other names, in the same id order, set data.match_label_names=false"
        )
    if absent := [name for name in model_labels if _label_key(name) not in data_keys]:
        # a subset of the teacher's classes is still numbered by name: the student keeps the teacher's head
        log.warning(
            "%s: the data has no class %s of the teacher's %s; the student keeps all %d of the teacher's classes",
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


def check_sizes(options) -> None:
    """The data options that count something must be whole numbers in range: ``batch_size``, ``max_length`` and,
    where set, ``eval_batch_size``, ``max_train_samples``, ``max_eval_samples`` at least 1, ``num_workers`` at
    least 0. Checked by the data modules and, from the config, before a run loads anything.

    Args:
        options: The data options (a ``data`` config or a data module's arguments); absent keys are skipped.

    Raises:
        ValueError: Naming the ``data.`` key, its value and what it takes.
    """
    required = {"batch_size": 1, "max_length": 1, "num_workers": 0}
    optional = {
        "eval_batch_size": "data.batch_size",
        "max_train_samples": "every example",
        "max_eval_samples": "every example",
    }
    for key in (*required, *optional):
        if key not in options or (key in optional and options[key] is None):
            continue
        value, least = options[key], required.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            null = f" (or null: {optional[key]})" if key in optional else ""
            raise ValueError(f"data.{key}={value} must be a whole number of at least {least}{null}")


class EpochTagged(torch.utils.data.Dataset):
    """A dataset read through a sampler made with ``tagged=True`` (``resume.ResumableRandomSampler``), which
    yields ``(epoch, index)`` pairs: row ``index`` of ``dataset`` with ``{KEY: (epoch, index)}`` added, so that a
    collator can draw the batch's random numbers (masks) from its epoch and examples. They are then the same
    however the batch is fetched (in the main process or a worker) and in a resumed run, and new each epoch."""

    KEY = "epoch_and_index"

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        return {**self.dataset[index], self.KEY: (epoch, index)}

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[dict]:
        """A batch's rows in one read of the dataset (the ``DataLoader`` takes this over ``__getitem__``)."""
        rows = self.dataset.__getitems__([index for _, index in keys])
        return [{**row, self.KEY: tuple(key)} for row, key in zip(rows, keys, strict=True)]


class TrainValidationData(lightning.LightningDataModule):
    """What every data module shares: a train/validation DatasetDict loaded once, checked and subsampled;
    seeded loaders that a run resumed mid-epoch continues (``distill_lab.resume``); ``example_batch``.

    A subclass prepares ``self.splits`` in ``setup()`` (with :meth:`load_splits` and :meth:`subsample`) and
    turns rows into a batch in ``collator(split)``. One whose training collator draws random numbers sets
    ``epoch_tagged``: its training rows then carry their ``(epoch, index)`` (:class:`EpochTagged`), for the
    collator to draw from them rather than from a generator's running state.

    Args:
        dataset: A DatasetDict with ``train`` and ``validation`` splits, or a zero-argument callable returning
            one (as Hydra's ``_partial_`` gives; loaded lazily, once, in ``setup()``).
        batch_size: Training batch size.
        eval_batch_size: Validation batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        max_train_samples, max_eval_samples: If set, a seeded random subset of this many examples.
        seed: Seed for subsampling and shuffling (and whatever else a subclass draws, e.g. masks).
    """

    epoch_tagged = False

    def __init__(
        self,
        dataset: DatasetDict | Callable[[], DatasetDict],
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_sizes(
            dict(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                 max_train_samples=max_train_samples, max_eval_samples=max_eval_samples)
        )  # fmt: skip
        self.dataset = dataset
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_samples = {"train": max_train_samples, "validation": max_eval_samples}
        self.seed = seed
        self.raw: DatasetDict | None = None
        self.splits: DatasetDict | None = None
        self._resume_at: tuple[int, int] | None = None  # (epoch, examples) from a checkpoint

    def load_splits(self, columns: dict[str, str | None]) -> DatasetDict:
        """The dataset's ``train`` and ``validation`` splits, each checked for ``columns`` (config key ->
        column name; None is skipped).

        Raises:
            ValueError: A split or a column is missing (the available ones are listed), a split is empty, or a
                column has empty values.
        """
        raw = self.dataset if isinstance(self.dataset, DatasetDict) else self.dataset()
        for split in ("train", "validation"):
            if split not in raw:
                raise ValueError(
                    f"dataset has no {split!r} split; available splits: {list(raw)}. A data module takes a "
                    "DatasetDict(train=..., validation=...): rename the splits, or load with hub_dataset(..., "
                    "train_split=..., validation_split=...), which renames them"
                )
            for key, column in columns.items():
                if column is not None and column not in raw[split].column_names:
                    raise ValueError(
                        f"data.{key}={column!r} not in {split} split; available columns: {raw[split].column_names}"
                    )
                if column is not None and (
                    missing := raw[split].data.column(column).null_count
                ):  # Arrow's count
                    raise ValueError(
                        f"data.{key}={column!r}: {missing} examples of the {split} split have no value there (an "
                        "empty cell or null); fill or drop them"
                    )
            if len(raw[split]) == 0:
                raise ValueError(
                    f"the {split} split holds no examples: give the data at least one row in each split"
                )
        return DatasetDict(train=raw["train"], validation=raw["validation"])

    def subsample(self, raw: DatasetDict) -> DatasetDict:
        """A seeded random subset of each split where ``max_train_samples`` / ``max_eval_samples`` ask."""
        for split, limit in self.max_samples.items():
            if limit is not None and limit < len(raw[split]):
                raw[split] = raw[split].shuffle(seed=self.seed).select(range(limit))
        return raw

    def collator(self, split: str) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        self.setup()
        dataset, sampler = self.splits[split], None
        if shuffle:  # a seeded order per epoch, which a run resumed mid-epoch continues
            epoch, start = self._resume_at or (0, 0)
            self._resume_at = None
            if tagged := self.epoch_tagged:
                dataset = EpochTagged(dataset)
            position = dict(seed=self.seed, epoch=epoch, start=start, tagged=tagged)
            if (shards := self._distributed_shards()) is not None:  # this process's share of the same order
                sampler = ResumableDistributedSampler(dataset, **shards, **position)
            else:
                sampler = ResumableRandomSampler(dataset, **position)
        # worker seeds come from this generator, not from the global RNG: a resumed run starts loaders at other
        # moments than an uninterrupted one, and must not shift the dropout masks drawn after them
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            generator=generator,
            collate_fn=self.collator(split),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _distributed_shards(self) -> dict | None:
        """``{"num_replicas", "rank"}`` where Lightning would give the training loader a ``DistributedSampler``
        (a distributed strategy, ``use_distributed_sampler`` on); None in one process or outside a trainer.
        Validation keeps Lightning's sampler: in dataset order, each process a share."""
        trainer = self.trainer
        if trainer is None or not _compat.uses_distributed_sampler(trainer):
            return None
        return dict(trainer.distributed_sampler_kwargs)

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded) training batches."""
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in dataset order."""
        return self._loader("validation", self.eval_batch_size, shuffle=False)

    def example_batch(self, split: str = "validation", size: int = 8) -> dict[str, torch.Tensor]:
        """One batch of the first ``size`` examples of ``split`` (for calibration and plots), collated by
        :meth:`example_collator`."""
        self.setup()
        ds = self.splits[self._check_split(split)]
        return self.example_collator(split)([ds[i] for i in range(min(size, len(ds)))])

    @staticmethod
    def _check_split(split: str) -> str:
        if split not in ("train", "validation"):
            raise ValueError(f"no split {split!r}: a data module holds 'train' or 'validation'")
        return split

    def example_collator(self, split: str) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """``collator(split)``; a subclass whose collator draws random numbers (masks) gives a fresh one here,
        seeded from ``seed``, so that an example batch is the same on every call and leaves the training run's
        draws as they would be without it."""
        return self.collator(split)

    def state_dict(self) -> dict:
        """Where training is in the shuffled order, which Lightning saves in every checkpoint:
        ``{"train_position": [epoch, examples already trained in it]}`` (see ``resume.training_position``); in a
        distributed run the examples of each process's share, the same number in every process."""
        position = training_position(self.trainer)
        if position is None:
            return {}
        epoch, batches = position
        return {"train_position": [epoch, batches * self.batch_size]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Let the next train loader start where the checkpoint's run stopped (Lightning restores the data module
        before it builds any loader)."""
        if "train_position" in state_dict:
            self._resume_at = tuple(state_dict["train_position"])


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
    ) -> None:
        super().__init__(
            dataset, batch_size, eval_batch_size, num_workers, max_train_samples, max_eval_samples, seed
        )
        check_sizes({"max_length": max_length})
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.label_column = label_column
        self.max_length = max_length
        self.model_labels = model_labels
        self.match_label_names = match_label_names
        self.label_names: list[str] | None = None

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
                f"data.max_length={self.max_length} leaves no room for text: the tokenizer adds {special} special "
                f"tokens to each {'pair' if self.text_pair_column else 'text'}; give at least {special + 2}"
            )
        raw = self.load_splits(
            {
                "text_column": self.text_column,
                "label_column": self.label_column,
                "text_pair_column": self.text_pair_column,
            }
        )
        self.label_names, label_ids = class_ids(  # the whole dataset, before any subsampling
            raw, self.label_column, self.model_labels, self.match_label_names
        )
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
