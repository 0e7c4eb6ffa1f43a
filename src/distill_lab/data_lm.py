"""Raw-text data for language-model distillation (``task=masked_lm`` and ``task=causal_lm``).

:class:`LanguageModelingData` takes a DatasetDict with ``train`` and ``validation`` splits and a text column
(the same loaders as classification: :func:`~distill_lab.data.hub_dataset`,
:func:`~distill_lab.data.local_files`, or :func:`synthetic_text` offline), tokenizes it with the teacher's
tokenizer, and either pads each text (truncated to ``max_length``) or packs the token stream into blocks of
``max_length``. Batches come from transformers' ``DataCollatorForLanguageModeling``:

- masked LM: tokens are masked dynamically, anew in every training batch (BERT's 80/10/10 rule,
  ``mlm_probability`` of the tokens); ``labels`` hold the original ids at masked positions and -100 elsewhere.
  A training batch's masks are drawn from the seed, the epoch and the batch's examples alone, so they are new
  each epoch, and the same in a resumed run and whatever ``num_workers``. The validation split is masked
  once, with a fixed seed, so its metrics compare across epochs and runs.
- causal LM: ``labels`` are the input ids, -100 at padding (``attention_mask`` 0) only: a tokenizer whose
  padding token is its eos token (GPT-2, LLaMA) keeps the targets of the real eos tokens in the text. The
  task shifts them by one.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable
from itertools import chain

import torch
from datasets import DatasetDict
from transformers import (
    DataCollatorForLanguageModeling,
    DataCollatorForTokenClassification,
    PreTrainedTokenizerBase,
)

from distill_lab.data_module import EpochTagged, TrainValidationData, check_sizes
from distill_lab.data_synthetic import synthetic_relations


def synthetic_text(num_train: int = 4000, num_validation: int = 500, seed: int = 0) -> DatasetDict:
    """The built-in task's sentences as raw text (column ``text``), for offline language-model runs."""
    splits = synthetic_relations(num_train=num_train, num_validation=num_validation, seed=seed)
    return DatasetDict({name: split.select_columns(["text"]) for name, split in splits.items()})


class _CausalLMCollator(DataCollatorForLanguageModeling):
    """``DataCollatorForLanguageModeling(mlm=False)`` with labels -100 where ``attention_mask`` is 0. The
    transformers collator sets -100 wherever a token equals the padding id, which for a tokenizer with
    pad = eos also drops the target of every real eos token."""

    def torch_call(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().torch_call(examples)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


class _EpochMaskedCollator(DataCollatorForLanguageModeling):
    """``DataCollatorForLanguageModeling(mlm=True)`` for training rows read through
    :class:`~distill_lab.data_module.EpochTagged`: each batch is masked with random numbers seeded by ``seed``
    and the batch's ``(epoch, index)`` pairs.

    The transformers collator's own ``seed`` gives a generator whose running state decides the masks: a
    resumed run starts it over (and so masks the rest of the run unlike the uninterrupted one), each worker
    process holds a copy of its own, and every process of a distributed run draws the same sequence. Here the
    masks are a function of the examples and the epoch; the global generator is left as it was.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, mlm_probability: float, seed: int) -> None:
        super().__init__(
            tokenizer, mlm=True, mlm_probability=mlm_probability
        )  # no seed: it draws from torch's
        self.draw_seed = seed

    def torch_call(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        tags = [example.pop(EpochTagged.KEY) for example in examples]
        digest = hashlib.blake2b(repr((self.draw_seed, tags)).encode(), digest_size=8).digest()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int.from_bytes(digest, "little"))
            return super().torch_call(examples)


class LanguageModelingData(TrainValidationData):
    """Tokenized raw text, masked (``mlm=True``) or as next-token targets (``mlm=False``).

    Args:
        tokenizer: The teacher's tokenizer (it needs a mask token for ``mlm=True`` and a padding token).
        mlm: Masked (True) or causal (False) language modelling.
        mlm_probability: Share of tokens masked for ``mlm=True``.
        text_column: Column holding the text.
        max_length: Texts are truncated to this many tokens, or packed into blocks of this length.
        pack: Concatenate the tokenized texts and cut them into blocks of ``max_length`` (no padding), 1000
            texts at a time (as transformers' ``run_mlm`` and ``run_clm`` do): the incomplete block at the end
            of each 1000 is dropped, at most ``max_length - 1`` tokens of 1000 texts.
        dataset, batch_size, eval_batch_size, num_workers, max_train_samples, max_eval_samples, seed: see
            :class:`~distill_lab.data_module.TrainValidationData` (the seed also draws the masks).
    """

    def __init__(
        self,
        dataset: DatasetDict | Callable[[], DatasetDict],
        tokenizer: PreTrainedTokenizerBase | None = None,
        mlm: bool = True,
        mlm_probability: float = 0.15,
        text_column: str = "text",
        max_length: int = 128,
        pack: bool = False,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset, batch_size, eval_batch_size, num_workers, max_train_samples, max_eval_samples, seed
        )
        check_sizes({"max_length": max_length})
        if mlm and not 0 < mlm_probability <= 1:
            raise ValueError(
                f"data.mlm_probability={mlm_probability} must be in (0, 1]: the share of tokens masked (0.15 "
                "is BERT's)"
            )
        self.tokenizer = tokenizer
        self.mlm = mlm
        self.mlm_probability = mlm_probability
        self.text_column = text_column
        self.max_length = max_length
        self.pack = pack

    @property
    def epoch_tagged(self) -> bool:
        """Masked LM: the training rows carry their epoch and index, which the masks are drawn from."""
        return self.mlm

    def _check_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise ValueError("LanguageModelingData has no tokenizer: set its `tokenizer` before setup()")
        if self.mlm and self.tokenizer.mask_token is None:
            raise ValueError(
                f"task=masked_lm needs a tokenizer with a mask token; {type(self.tokenizer).__name__} has "
                "none (a decoder model's tokenizer? use task=causal_lm)"
            )
        if self.tokenizer.pad_token is None:
            raise ValueError(
                "the tokenizer has no padding token: set tokenizer.pad_token (e.g. to its eos token)"
            )

    def setup(self, stage: str | None = None) -> None:
        """Load, check, subsample, tokenize (and pack) the texts; mask the validation split once."""
        if self.splits is not None:
            return
        self._check_tokenizer()
        if self.tokenizer.padding_side != "right":
            # the labels (-100 at padding, shifted by the causal task) and the validation masks cut back to
            # each text's length assume padding on the right: this module pads there, with a copy (the
            # teacher's tokenizer, saved with the student, keeps its side, e.g. LLaMA's left padding for
            # generation)
            self.tokenizer = copy.copy(self.tokenizer)
            self.tokenizer.padding_side = "right"
        self.raw = raw = self.subsample(self.load_splits({"text_column": self.text_column}))
        splits = DatasetDict(
            {
                split: ds.map(self._tokenize, batched=True, remove_columns=ds.column_names).filter(
                    lambda ids: len(ids) > 0, input_columns="input_ids"
                )
                for split, ds in raw.items()
            }
        )
        if self.pack:
            splits = splits.map(self._pack, batched=True)
        for split, rows in splits.items():
            if len(rows) == 0:
                raise ValueError(
                    f"the {split} split holds no examples after tokenization"
                    + (f" and packing into blocks of data.max_length={self.max_length} tokens: it has fewer "
                       "tokens than one block; lower data.max_length or set data.pack=false" if self.pack else
                       f" (data.text_column={self.text_column!r} holds no text that the tokenizer keeps)")
                )  # fmt: skip
        if self.mlm:  # fixed masks for validation (and test): the same positions every epoch and run
            for split in [s for s in ("validation", "test") if s in splits]:
                splits[split] = splits[split].map(
                    self._mask_once,
                    batched=True,
                    batch_size=256,
                    with_indices=True,
                    remove_columns=["special_tokens_mask"],
                )
        self.splits = splits

    def _tokenize(self, batch: dict) -> dict:
        encoded = self.tokenizer(
            batch[self.text_column],
            truncation=not self.pack,
            max_length=None if self.pack else self.max_length,
            return_special_tokens_mask=self.mlm,
        )
        return {k: encoded[k] for k in ("input_ids", "attention_mask", "special_tokens_mask") if k in encoded}

    def _pack(self, batch: dict) -> dict:
        """Concatenated token streams cut into full blocks of ``max_length``."""
        blocks = {}
        for key, values in batch.items():
            stream = list(chain.from_iterable(values))
            usable = len(stream) // self.max_length * self.max_length
            blocks[key] = [stream[i : i + self.max_length] for i in range(0, usable, self.max_length)]
        return blocks

    def _mask_once(self, batch: dict, indices: list[int]) -> dict:
        # one seed per map batch, from the seed and the batch's first row: reproducible, and not the same
        # masks again for every batch of rows (a collator seeded with the seed alone would repeat them)
        collator = DataCollatorForLanguageModeling(
            self.tokenizer,
            mlm=True,
            mlm_probability=self.mlm_probability,
            seed=self.seed * 1_000_003 + indices[0],
        )
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        masked = collator(rows)
        lengths = [len(ids) for ids in batch["input_ids"]]
        # the collator pads to the batch's longest text (right side): cut each row back to its length
        return {
            "input_ids": [row[:n].tolist() for row, n in zip(masked["input_ids"], lengths, strict=True)],
            "attention_mask": [
                row[:n].tolist() for row, n in zip(masked["attention_mask"], lengths, strict=True)
            ],
            "labels": [row[:n].tolist() for row, n in zip(masked["labels"], lengths, strict=True)],
        }

    def collator(self, split: str):
        """Masked LM: training batches are masked as they are drawn, from their epoch and examples
        (:class:`_EpochMaskedCollator`); validation and test batches, masked in ``setup``, are padded (labels
        -100)."""
        if split != "train" and self.mlm:
            return DataCollatorForTokenClassification(self.tokenizer)
        if self.mlm:
            return _EpochMaskedCollator(self.tokenizer, self.mlm_probability, self.seed)
        return self._language_modeling_collator()

    def example_collator(self, split: str):
        """For rows read without an epoch (``example_batch("train")``, the calibration batch): a collator
        seeded with ``seed``, so that the batch is masked the same on every call."""
        if split != "train" and self.mlm:
            return self.collator(split)
        return self._language_modeling_collator()

    def _language_modeling_collator(self) -> DataCollatorForLanguageModeling:
        collator = DataCollatorForLanguageModeling if self.mlm else _CausalLMCollator
        return collator(self.tokenizer, mlm=self.mlm, mlm_probability=self.mlm_probability, seed=self.seed)
