"""Word-labelled text for token classification (``task=token_classification``, NER-style).

:class:`TokenClassificationData` takes a DatasetDict with ``train`` and ``validation`` splits whose rows are
pre-split words (``tokens``) and one tag per word (``ner_tags``), the layout of conll2003 on the hub: local
json/jsonl files through :func:`~distill_lab.data.local_files`, a hub dataset through
:func:`~distill_lab.data.hub_dataset`, or :func:`synthetic_entities` offline. Words are tokenized with the
teacher's (fast) tokenizer as ``is_split_into_words=True``; each word's tag goes to its FIRST sub-token, and
the word's other sub-tokens and the special tokens get -100, which the loss and the metrics ignore.

The tags are numbered as the teacher numbers them (:func:`tag_ids`): by name against its ``id2label`` where it
names them, else in the data's own order.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from transformers import DataCollatorForTokenClassification, PreTrainedTokenizerBase

from distill_lab.data_module import TrainValidationData, check_sizes
from distill_lab.data_synthetic import NEUTRAL_WORDS, SYNTHETIC_WORDS
from distill_lab.labels import _to_model_ids

IGNORE_INDEX = -100
MODEL_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")

# the built-in NER task: BIO (IOB2) tags of persons, locations and organisations
ENTITY_TAGS: tuple[str, ...] = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG")
PERSONS: tuple[str, ...] = ("alice", "bob", "carol", "dave", "erin")
SURNAMES: tuple[str, ...] = ("smith", "jones", "brown")  # after a first name: I-PER
LOCATIONS: tuple[str, ...] = ("paris", "london", "berlin", "rome", "oslo")
ORGANISATIONS: tuple[str, ...] = ("acme", "globex", "initech", "umbrella")
ORGANISATION_SUFFIXES: tuple[str, ...] = ("corp", "inc")  # after an organisation: I-ORG
# a person after "mr", a location after "in": the tag is a relation to the word before, as in the built-in
# classification task
AMBIGUOUS: tuple[str, ...] = ("jordan", "georgia", "chad")
CUES = {"mr": "PER", "in": "LOC"}
FILLERS: tuple[str, ...] = (*NEUTRAL_WORDS, "met", "visited", "said", "with", "and", "from", "today", *CUES)
ENTITY_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        (*SYNTHETIC_WORDS, *FILLERS, *PERSONS, *SURNAMES, *LOCATIONS, *ORGANISATIONS, *ORGANISATION_SUFFIXES,
         *AMBIGUOUS)
    )
)  # fmt: skip


def _entity(rng: random.Random) -> tuple[list[str], list[str]]:
    """One entity's words and tags."""
    kind = rng.choice(("PER", "LOC", "ORG", "AMBIGUOUS"))
    if kind == "AMBIGUOUS":
        cue = rng.choice(sorted(CUES))
        return [cue, rng.choice(AMBIGUOUS)], ["O", f"B-{CUES[cue]}"]
    words = {"PER": PERSONS, "LOC": LOCATIONS, "ORG": ORGANISATIONS}[kind]
    following = {"PER": SURNAMES, "ORG": ORGANISATION_SUFFIXES}.get(kind)
    entity = [rng.choice(words)]
    if following and rng.random() < 0.5:
        entity.append(rng.choice(following))
    return entity, [f"B-{kind}"] + [f"I-{kind}"] * (len(entity) - 1)


def _entity_split(num: int, rng: random.Random) -> Dataset:
    rows = {"tokens": [], "ner_tags": []}
    for _ in range(num):
        words, tags = [], []
        for _ in range(rng.randint(1, 3)):  # filler, an entity, filler...
            filler = [rng.choice(FILLERS) for _ in range(rng.randint(1, 4))]
            entity, entity_tags = _entity(rng)
            words += filler + entity
            tags += ["O"] * len(filler) + entity_tags
        rows["tokens"].append(words)
        rows["ner_tags"].append([ENTITY_TAGS.index(tag) for tag in tags])
    features = Features(
        {"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=list(ENTITY_TAGS)))}
    )
    return Dataset.from_dict(rows, features=features)


def synthetic_entities(num_train: int = 2000, num_validation: int = 300, seed: int = 0) -> DatasetDict:
    """The built-in offline NER task: sentences of filler words with one to three entities (persons,
    locations, organisations of one or two words), BIO-tagged. The words "jordan", "georgia" and "chad" are
    a person after "mr" and a location after "in" (which also stand as filler elsewhere): their tag is a
    relation to the word before, which a model finds with attention.

    Returns:
        A DatasetDict with ``train`` and ``validation`` splits and columns ``tokens`` (list of words) and
        ``ner_tags`` (a ``ClassLabel`` id per word, names :data:`ENTITY_TAGS`), as conll2003 has them.
    """
    sizes = {"train": num_train, "validation": num_validation}
    return DatasetDict({s: _entity_split(n, random.Random(f"{seed}/{s}")) for s, n in sizes.items()})


def tag_ids(
    raw: DatasetDict,
    tags_column: str,
    model_labels: list[str] | None = None,
    match_label_names: bool = True,
    label_names: list[str] | None = None,
) -> tuple[list[str], dict]:
    """The tag names in id order and the mapping from the data's tag values to ids.

    - ``ClassLabel`` tags (conll2003 on the hub): the feature's names, or ``label_names`` where given.
    - int tags (a json file's ids): ``label_names`` (``data.label_names``), else the teacher's names
      (``model_labels``), each id standing for the name at its place.
    - string tags (``"B-PER"``): numbered by ``label_names``, else the teacher's names.

    Named tags (a ``ClassLabel``, ``label_names``) are then renumbered as the teacher numbers them, matched by
    name (ignoring case), unless ``match_label_names`` is false.

    Raises:
        ValueError: Tags that are not lists of ids or names, ids or names outside the names, or no names at
            all (neither the data, ``data.label_names`` nor the teacher's config names them: the entity
            metrics read the B-/I- prefixes of the names).
    """
    key = f"data.tags_column={tags_column!r}"
    inner = getattr(raw["train"].features[tags_column], "feature", None)
    dtype = getattr(inner, "dtype", None) or ""
    given = None if label_names is None else [str(name) for name in label_names]
    if isinstance(inner, ClassLabel):
        names = given or list(inner.names)
    elif "int" in dtype or dtype in ("string", "large_string"):
        names = given or model_labels
    else:
        raise ValueError(
            f"{key} holds {raw['train'].features[tags_column]}: token classification needs one int or string "
            "tag per word (a list per example, as conll2003's ner_tags)"
        )
    if names is None:
        raise ValueError(
            f"{key}: neither the data, data.label_names nor the teacher's config (id2label) names the tags: "
            "set data.label_names=[O,B-PER,I-PER,...], the tag names in id order"
        )
    named = dtype.endswith("string")  # tags written as names, else ids (a ClassLabel's too)
    ids = {name: i for i, name in enumerate(names)} if named else {i: i for i in range(len(names))}
    values = {tag for split in raw.values() for tags in split[tags_column] for tag in tags}
    if unknown := values - set(ids):
        raise ValueError(
            f"{key} holds tags {sorted(unknown, key=str)[:10]} beyond the {len(names)} tag names {names}"
        )
    if model_labels is not None and match_label_names and names is not model_labels:
        return _to_model_ids(list(names), ids, model_labels, key)
    return list(names), ids


def _align(batch: dict, tokenizer, columns: tuple[str, str], ids: dict, max_length: int) -> dict:
    """Batched ``Dataset.map`` function: tokenize the words, each word's tag on its first sub-token."""
    tokens_column, tags_column = columns
    encoded = tokenizer(
        batch[tokens_column], is_split_into_words=True, truncation=True, max_length=max_length
    )
    labels = []
    for row, tags in enumerate(batch[tags_column]):
        pairs = _pairs(encoded.word_ids(row))
        labels.append([IGNORE_INDEX if w is None or w == before else ids[tags[w]] for w, before in pairs])
    features = {key: encoded[key] for key in MODEL_COLUMNS if key in encoded}
    features["labels"] = labels
    return features


def _pairs(words: list[int | None]):
    """Each sub-token's word with the word of the sub-token before it (None before the first)."""
    return zip(words, [None, *words[:-1]], strict=True)


class TokenClassificationData(TrainValidationData):
    """Tokenized, dynamically padded token-classification batches (labels padded with -100).

    Args:
        tokenizer: The teacher's tokenizer, a fast one (its ``word_ids()`` align the words' tags); may be
            assigned later, before :meth:`setup`.
        tokens_column, tags_column: The columns of the words and of their tags.
        max_length: Sequences are truncated to this many tokens (the words past it are dropped).
        model_labels, match_label_names, label_names: The teacher's tag names (``run.py`` passes its
            ``id2label``), whether the data's named tags are mapped to them by name, and the data's tag names
            in id order (``data.label_names``): see :func:`tag_ids`.
        dataset, batch_size, eval_batch_size, num_workers, max_train_samples, max_eval_samples, seed: see
            :class:`~distill_lab.data_module.TrainValidationData`.
    """

    def __init__(
        self,
        dataset: DatasetDict | Callable[[], DatasetDict],
        tokenizer: PreTrainedTokenizerBase | None = None,
        tokens_column: str = "tokens",
        tags_column: str = "ner_tags",
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
    ) -> None:
        super().__init__(
            dataset, batch_size, eval_batch_size, num_workers, max_train_samples, max_eval_samples, seed
        )
        check_sizes({"max_length": max_length})
        if isinstance(label_names, str):
            raise ValueError(
                f"data.label_names={label_names!r} must be a list, e.g. data.label_names=[O,B-PER,I-PER]"
            )
        self.tokenizer = tokenizer
        self.tokens_column, self.tags_column = tokens_column, tags_column
        self.max_length = max_length
        self.model_labels, self.match_label_names, self.given_label_names = (
            model_labels,
            match_label_names,
            label_names,
        )
        self.label_names: list[str] | None = None  # tag names in the teacher's id order, set by setup()
        self.label_ids: dict | None = None  # the data's tag value -> id, set by setup()

    @property
    def num_labels(self) -> int:
        """Number of tags, known after :meth:`setup`."""
        if self.label_names is None:
            raise RuntimeError("num_labels is known only after TokenClassificationData.setup()")
        return len(self.label_names)

    def setup(self, stage: str | None = None) -> None:
        """Load, check, subsample and tokenize the dataset (only the first call does any work).

        Raises:
            ValueError: No tokenizer, a slow one, a missing split or column, or unusable tags.
        """
        if self.splits is not None:
            return
        if self.tokenizer is None:
            raise ValueError("TokenClassificationData has no tokenizer: set its `tokenizer` before setup()")
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(
                "task=token_classification needs a fast tokenizer, whose word_ids() align each word's tag "
                f"to its first sub-token; the teacher's is {type(self.tokenizer).__name__}, a slow one. Save "
                "the teacher with its fast tokenizer (tokenizer.json, AutoTokenizer.from_pretrained(..., "
                "use_fast=True).save_pretrained(directory))"
            )
        raw = self.load_splits({"tokens_column": self.tokens_column, "tags_column": self.tags_column})
        self.label_names, self.label_ids = tag_ids(
            raw, self.tags_column, self.model_labels, self.match_label_names, self.given_label_names
        )
        self.raw = raw = self.subsample(raw)
        options = dict(
            tokenizer=self.tokenizer,
            columns=(self.tokens_column, self.tags_column),
            ids=self.label_ids,
            max_length=self.max_length,
        )
        try:
            self.splits = DatasetDict(
                {
                    split: ds.map(_align, batched=True, remove_columns=ds.column_names, fn_kwargs=options)
                    for split, ds in raw.items()
                }
            )
        except (AssertionError, ValueError) as err:
            if "add_prefix_space" not in str(err):
                raise
            raise ValueError(
                f"the teacher's tokenizer ({type(self.tokenizer).__name__}) takes pre-split words only when "
                "loaded with add_prefix_space=True (GPT-2's, RoBERTa's byte-level BPE): save it so, "
                "AutoTokenizer.from_pretrained(..., add_prefix_space=True).save_pretrained(directory)"
            ) from err

    def collator(self, split: str) -> DataCollatorForTokenClassification:
        """Batches padded to the longest sequence in each, the labels with -100."""
        return DataCollatorForTokenClassification(self.tokenizer, label_pad_token_id=IGNORE_INDEX)

    def example_texts(self, split: str = "validation", size: int = 8) -> list[str]:
        """The words of the examples in :meth:`example_batch`, joined by spaces."""
        self.setup()
        raw = self.raw[self._check_split(split)]
        return [" ".join(words) for words in raw[: min(size, len(raw))][self.tokens_column]]
