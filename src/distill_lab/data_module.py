"""What every data module shares: :class:`TrainValidationData` (a train/validation DatasetDict loaded once,
checked and subsampled; seeded loaders that a run resumed mid-epoch continues), :class:`EpochTagged` rows for
collators that draw random numbers, and :func:`check_sizes` for the data options that count something.

The task's modules build on it: text classification (``distill_lab.data``), language modelling
(``distill_lab.data_lm``), image classification (``distill_lab.data_images``).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader

from distill_lab import _compat
from distill_lab.resume import ResumableDistributedSampler, ResumableRandomSampler, training_position

SPLITS = ("train", "validation", "test")  # test: optional, held out, evaluated once at the end of a run


def check_sizes(options) -> None:
    """The data options that count something must be whole numbers in range: ``batch_size``, ``max_length``
    and, where set, ``eval_batch_size``, ``max_train_samples``, ``max_eval_samples`` at least 1,
    ``num_workers`` at least 0. Checked by the data modules and, from the config, before a run loads anything.

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


def _missing(split: Dataset, column: str, blank_is_empty: bool) -> int:
    """How many rows of ``split`` hold no value in ``column``: nulls and, with ``blank_is_empty``, strings
    that are empty or only whitespace (counted by Arrow, without reading the rows into Python)."""
    values = split.data.column(column)
    missing = values.null_count
    if blank_is_empty and (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
        missing += pc.sum(blank).as_py() or 0
    return missing


class EpochTagged(torch.utils.data.Dataset):
    """A dataset read through a sampler made with ``tagged=True`` (``resume.ResumableRandomSampler``), which
    yields ``(epoch, index)`` pairs: row ``index`` of ``dataset`` with ``{KEY: (epoch, index)}`` added, so
    that a collator can draw the batch's random numbers (masks) from its epoch and examples. They are then the
    same however the batch is fetched (in the main process or a worker) and in a resumed run, and new each
    epoch."""

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
        dataset: A DatasetDict with ``train`` and ``validation`` splits, and optionally a held-out ``test``
            split (never subsampled), or a zero-argument callable returning one (as Hydra's ``_partial_``
            gives; loaded lazily, once, in ``setup()``).
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

    def load_splits(self, columns: dict[str, str | None], blank_is_empty: bool = False) -> DatasetDict:
        """The dataset's ``train`` and ``validation`` splits, and its ``test`` split where it has one, each
        checked for ``columns`` (config key -> column name; None is skipped).

        Args:
            columns: config key -> column name.
            blank_is_empty: Whether a string that is empty or only whitespace counts as no value, as a null
                does (texts to classify: such an example has a label and nothing to learn it from; raw text
                for language models keeps its blank lines, which corpora use between paragraphs).

        Raises:
            ValueError: A split or a column is missing (the available ones are listed), a split is empty, or a
                column has empty values.
        """
        raw = self.dataset if isinstance(self.dataset, DatasetDict) else self.dataset()
        for split in ("train", "validation", *(["test"] if "test" in raw else [])):
            if split not in raw:
                raise ValueError(
                    f"dataset has no {split!r} split; available splits: {list(raw)}. A data module takes a "
                    "DatasetDict(train=..., validation=...): rename the splits, or load with "
                    "hub_dataset(..., train_split=..., validation_split=...), which renames them"
                )
            for key, column in columns.items():
                if column is not None and column not in raw[split].column_names:
                    raise ValueError(
                        f"data.{key}={column!r} not in {split} split; available columns: "
                        f"{raw[split].column_names}"
                    )
                if column is not None and (missing := _missing(raw[split], column, blank_is_empty)):
                    kinds = (
                        "an empty cell, null, or only whitespace"
                        if blank_is_empty
                        else "an empty cell or null"
                    )
                    raise ValueError(
                        f"data.{key}={column!r}: {missing} examples of the {split} split have no value there "
                        f"({kinds}); fill or drop them"
                    )
            if len(raw[split]) == 0:
                raise ValueError(
                    f"the {split} split holds no examples: give the data at least one row in each split"
                )
        return DatasetDict({split: raw[split] for split in raw if split in SPLITS})

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
        # worker seeds come from this generator, not from the global RNG: a resumed run starts loaders at
        # other moments than an uninterrupted one, and must not shift the dropout masks drawn after them
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
        """``{"num_replicas", "rank"}`` where Lightning would give the training loader a
        ``DistributedSampler`` (a distributed strategy, ``use_distributed_sampler`` on); None in one process
        or outside a trainer. Validation keeps Lightning's sampler: in dataset order, each process a share."""
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

    @property
    def has_test(self) -> bool:
        """Whether the dataset holds a held-out ``test`` split (``data.dataset.test_file``, ``test_split``,
        ``test_dir``), which the run evaluates once at its end; known after :meth:`setup`."""
        self.setup()
        return "test" in self.splits

    def test_dataloader(self) -> DataLoader:
        """Held-out test batches in dataset order (every example: no subset is drawn)."""
        if not self.has_test:
            raise ValueError(
                "the dataset has no 'test' split: set data.dataset.test_file (data=local, lm_local), "
                "data.dataset.test_split (data=hf, lm_hf) or data.dataset.test_dir (data=imagefolder)"
            )
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def _check_split(self, split: str) -> str:
        if split not in SPLITS or (split == "test" and not self.has_test):
            raise ValueError(
                f"no split {split!r}: a data module holds 'train' or 'validation', and 'test' where the data "
                "has one (data.dataset.test_file, test_split or test_dir)"
            )
        return split

    def example_collator(self, split: str) -> Callable[[list[dict]], dict[str, torch.Tensor]]:
        """``collator(split)``; a subclass whose collator draws random numbers (masks) gives a fresh one here,
        seeded from ``seed``, so that an example batch is the same on every call and leaves the training run's
        draws as they would be without it."""
        return self.collator(split)

    def state_dict(self) -> dict:
        """Where training is in the shuffled order, which Lightning saves in every checkpoint:
        ``{"train_position": [epoch, examples already trained in it]}`` (see ``resume.training_position``); in
        a distributed run the examples of each process's share, the same number in every process."""
        position = training_position(self.trainer)
        if position is None:
            return {}
        epoch, batches = position
        return {"train_position": [epoch, batches * self.batch_size]}

    def load_state_dict(self, state_dict: dict) -> None:
        """Let the next train loader start where the checkpoint's run stopped (Lightning restores the data
        module before it builds any loader)."""
        if "train_position" in state_dict:
            self._resume_at = tuple(state_dict["train_position"])
