"""Tests for distill_lab.data: synthetic task, word tokenizer, loaders and the Lightning data module."""

from __future__ import annotations

import logging
from itertools import chain

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
import transformers
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, models, pre_tokenizers

from distill_lab.data import (
    NEGATION,
    NEGATIVE_WORDS,
    POSITIVE_WORDS,
    SYNTHETIC_WORDS,
    TextClassificationData,
    build_word_tokenizer,
    hub_dataset,
    local_files,
    synthetic_relations,
)
from distill_lab.data_images import ImageFolderData
from distill_lab.data_lm import LanguageModelingData, synthetic_text

W_WORDS = tuple(f"w{i}" for i in range(24))
W0 = 5 + len(SYNTHETIC_WORDS)  # id of "w0"


@pytest.fixture(scope="module")
def tokenizer():
    # the built-in task's words, then w0..w23 for the hand-made files below
    return build_word_tokenizer((*SYNTHETIC_WORDS, *W_WORDS))


@pytest.fixture(scope="module")
def synthetic():
    return synthetic_relations(num_train=400, num_validation=100, seed=3)


def _frame(n: int = 6, offset: int = 0) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sentence": [
                " ".join(f"w{(i + j) % 24}" for j in range(2 + i)) for i in range(offset, offset + n)
            ],
            "label": [i % 2 for i in range(offset, offset + n)],
        }
    )


def _negation_label(words: list[str]) -> int:
    """The label re-derived from the text: the one sentiment word's polarity, flipped by a 'not' right before
    it."""
    (position,) = [i for i, w in enumerate(words) if w in POSITIVE_WORDS + NEGATIVE_WORDS]
    polarity = int(words[position] in POSITIVE_WORDS)
    return 1 - polarity if position > 0 and words[position - 1] == NEGATION else polarity


def test_synthetic_relations_is_deterministic_balanced_and_correct():
    data = synthetic_relations(num_train=1000, num_validation=200, seed=7)
    again = synthetic_relations(num_train=1000, num_validation=200, seed=7)
    other = synthetic_relations(num_train=1000, num_validation=200, seed=8)
    assert set(data) == {"train", "validation"}
    assert data["train"].column_names == ["text", "label"]
    assert len(data["train"]) == 1000 and len(data["validation"]) == 200
    assert (
        data["train"]["text"] == again["train"]["text"] and data["train"]["label"] == again["train"]["label"]
    )
    assert data["train"]["text"] != other["train"]["text"]
    for split in ("train", "validation"):
        labels = data[split]["label"]
        assert 0.42 <= sum(labels) / len(labels) <= 0.58
        for text, label in zip(data[split]["text"], labels, strict=True):
            words = text.split()
            assert 8 <= len(words) <= 16
            assert set(words) <= set(SYNTHETIC_WORDS)
            assert label == _negation_label(words)


def test_synthetic_labels_need_the_relation_not_the_bag_of_words():
    """The best bag-of-words rule (polarity, flipped when any 'not' is present) stays far from 100%."""
    data = synthetic_relations(num_train=2000, num_validation=10, seed=1)["train"]
    negated = distracted = 0
    bag_correct = 0
    for text, label in zip(data["text"], data["label"], strict=True):
        words = text.split()
        polarity = int(any(w in POSITIVE_WORDS for w in words))
        flipped = label != polarity
        negated += flipped
        distracted += NEGATION in words and not flipped
        for rule in ((1 - polarity) if NEGATION in words else polarity,):
            bag_correct += rule == label
    assert 0.25 <= negated / len(data) <= 0.35  # negation_rate 0.3
    assert distracted > 0.25 * len(data)  # a "not" that negates nothing is common
    assert bag_correct / len(data) < 0.8


def test_synthetic_train_and_validation_differ():
    data = synthetic_relations(num_train=300, num_validation=300, seed=0)
    assert data["train"]["text"] != data["validation"]["text"]
    overlap = set(data["train"]["text"]) & set(data["validation"]["text"])
    assert len(overlap) < 5  # sequences of 8-16 words essentially never collide


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="negation_rate"):
        synthetic_relations(negation_rate=1.5)
    with pytest.raises(ValueError, match="min_length"):
        synthetic_relations(min_length=10, max_length=5)
    with pytest.raises(ValueError, match="repeat"):
        build_word_tokenizer(["w0", "w0"])


def test_word_tokenizer_round_trips_through_auto_tokenizer(tmp_path, tokenizer):
    assert len(tokenizer) == 5 + len(SYNTHETIC_WORDS) + 24
    assert [tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id] == [0, 1, 2]
    assert [tokenizer.sep_token_id, tokenizer.mask_token_id] == [3, 4]
    tokenizer.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    texts, pairs = ["w0 w5 w23", "w1 unknown"], ["w2", "w3 w4"]
    for args in ((texts,), (texts, pairs)):
        assert loaded(*args)["input_ids"] == tokenizer(*args)["input_ids"]
    single = loaded("w0 w5 w23")["input_ids"]
    assert single == [2, W0, W0 + 5, W0 + 23, 3]
    assert loaded.convert_ids_to_tokens(single) == ["[CLS]", "w0", "w5", "w23", "[SEP]"]
    assert loaded("w9 zzz")["input_ids"][2] == loaded.unk_token_id
    pair = loaded("w0", "w1")
    assert pair["input_ids"] == [2, W0, 3, W0 + 1, 3] and pair["token_type_ids"] == [0, 0, 0, 1, 1]
    assert (loaded.pad_token, loaded.mask_token, loaded.model_max_length) == ("[PAD]", "[MASK]", 64)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_local_files_reads_every_format(tmp_path, monkeypatch, suffix):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    frames = {"train": _frame(6), "validation": _frame(3, offset=10)}
    paths = {}
    for split, frame in frames.items():
        paths[split] = tmp_path / f"{split}{suffix}"
        if suffix in (".csv", ".tsv"):
            frame.to_csv(paths[split], sep="," if suffix == ".csv" else "\t", index=False)
        elif suffix in (".json", ".jsonl"):
            frame.to_json(paths[split], orient="records", lines=True)
        else:
            frame.to_parquet(paths[split], index=False)
    data = local_files(paths["train"], str(paths["validation"]))
    assert isinstance(data, DatasetDict) and set(data) == {"train", "validation"}
    for split, frame in frames.items():
        assert data[split].column_names == ["sentence", "label"]
        assert data[split]["sentence"] == frame["sentence"].tolist()
        assert data[split]["label"] == frame["label"].tolist()


def test_local_file_names_are_not_glob_patterns(tmp_path, monkeypatch):
    """A file name with glob characters is that file: datasets would read train[v2].csv as the pattern that
    matches trainv.csv and train2.csv, and silently train on those."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    named, decoy = tmp_path / "train[v2].csv", tmp_path / "trainv.csv"
    _frame(6).to_csv(named, index=False)
    _frame(2, offset=50).to_csv(decoy, index=False)
    data = local_files(named, named)
    assert data["train"]["sentence"] == _frame(6)["sentence"].tolist()


def test_local_files_rejects_unknown_extension_and_missing_file(tmp_path):
    train = tmp_path / "train.csv"
    _frame().to_csv(train, index=False)
    (tmp_path / "dev.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"dev\.xlsx.*\.csv.*\.parquet"):
        local_files(train, tmp_path / "dev.xlsx")
    with pytest.raises(ValueError, match=r"missing\.csv.*does not exist"):
        local_files(train, tmp_path / "missing.csv")


def test_hub_dataset_failure_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # the env vars are read at import time
    with pytest.raises((RuntimeError, ValueError), match="no-such-org/no-such-dataset") as info:
        hub_dataset("no-such-org/no-such-dataset", "cfg")
    assert "data=local" in str(info.value)


def test_data_module_tokenizes_and_pads_dynamically(synthetic, tokenizer):
    dm = TextClassificationData(lambda: synthetic, tokenizer, max_length=128, batch_size=16, seed=1)
    dm.setup()
    dm.setup()  # idempotent
    assert dm.num_labels == 2 and dm.label_names == ["0", "1"]
    assert set(dm.splits["train"].column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    batches = list(dm.train_dataloader())
    assert sum(len(b["labels"]) for b in batches) == 400
    for batch in batches[:5]:
        lengths = batch["attention_mask"].sum(dim=1)
        assert batch["input_ids"].shape[1] == lengths.max() < 128  # padded to the longest in the batch
        assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == (16,)
        assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    val = next(iter(dm.val_dataloader()))
    assert val["labels"].tolist() == synthetic["validation"]["label"][:16]  # not shuffled


def test_train_dataloader_shuffle_is_seeded(synthetic, tokenizer):
    def first_labels(seed):
        dm = TextClassificationData(synthetic, tokenizer, batch_size=32, seed=seed)
        dm.setup()
        return next(iter(dm.train_dataloader()))["input_ids"].tolist()

    assert first_labels(0) == first_labels(0)
    assert first_labels(0) != first_labels(1)


def test_truncation_to_max_length(synthetic, tokenizer):
    dm = TextClassificationData(synthetic, tokenizer, max_length=6)
    dm.setup()
    batch = dm.example_batch("train", 4)
    assert batch["input_ids"].shape == (4, 6)
    assert (batch["input_ids"][:, -1] == tokenizer.sep_token_id).all()


def test_example_batch_and_texts(synthetic, tokenizer):
    dm = TextClassificationData(synthetic, tokenizer)
    batch = dm.example_batch(size=5)  # sets itself up
    assert batch["input_ids"].shape[0] == 5 and batch["attention_mask"].shape == batch["input_ids"].shape
    texts = dm.example_texts("validation", 5)
    assert texts == synthetic["validation"]["text"][:5]
    for row, text in zip(batch["input_ids"], texts, strict=True):
        ids = row[row != tokenizer.pad_token_id].tolist()
        assert ids == tokenizer(text)["input_ids"]
    assert dm.example_batch(size=10_000)["input_ids"].shape[0] == 100


def test_text_pairs(tokenizer):
    rows = {"premise": ["w0 w1", "w2", "w3 w4 w5"], "hypothesis": ["w6", "w7 w8", "w9"], "label": [0, 2, 1]}
    data = DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict(rows))
    dm = TextClassificationData(
        data, tokenizer, text_column="premise", text_pair_column="hypothesis", batch_size=3
    )
    dm.setup()
    assert dm.num_labels == 3
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"][0].tolist() == [2, W0, W0 + 1, 3, W0 + 6, 3, 0]
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 1, 1, 0]
    assert batch["labels"].tolist() == [0, 2, 1]
    assert dm.example_texts(size=1) == ["w0 w1 [SEP] w6"]


def test_string_labels_are_mapped_to_sorted_ids(tokenizer):
    train = Dataset.from_dict({"text": ["w0", "w1", "w2", "w3"], "label": ["pos", "neg", "neutral", "pos"]})
    val = Dataset.from_dict({"text": ["w4", "w5"], "label": ["neutral", "pos"]})
    dm = TextClassificationData(DatasetDict(train=train, validation=val), tokenizer)
    dm.setup()
    assert dm.label_names == ["neg", "neutral", "pos"] and dm.num_labels == 3
    assert dm.splits["train"]["labels"] == [2, 0, 1, 2]
    assert dm.splits["validation"]["labels"] == [1, 2]


def test_unseen_validation_labels_are_rejected(tokenizer):
    train = Dataset.from_dict({"text": ["w0", "w1"], "label": ["a", "b"]})
    val = Dataset.from_dict({"text": ["w2"], "label": ["c"]})
    dm = TextClassificationData(DatasetDict(train=train, validation=val), tokenizer)
    with pytest.raises(ValueError, match="'c'.*train"):
        dm.setup()


def test_int_label_names_cover_train_and_validation(tokenizer):
    train = Dataset.from_dict({"text": ["w0", "w1", "w2"], "label": [0, 3, 1]})
    val = Dataset.from_dict({"text": ["w2"], "label": [1]})
    dm = TextClassificationData(DatasetDict(train=train, validation=val), tokenizer)
    dm.setup()
    assert dm.label_names == ["0", "1", "2", "3"]


def test_missing_column_error_names_column_split_and_available(tokenizer):
    rows = {"sentence2": ["w0", "w1"], "label": [0, 1], "idx": [0, 1]}
    data = DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict(rows))
    with pytest.raises(ValueError) as info:
        TextClassificationData(data, tokenizer, text_column="sentence").setup()
    message = str(info.value)
    assert "data.text_column='sentence'" in message and "train split" in message
    assert "['sentence2', 'label', 'idx']" in message
    for key, kwargs in [
        ("data.label_column='y'", {"text_column": "sentence2", "label_column": "y"}),
        ("data.text_pair_column='hyp'", {"text_column": "sentence2", "text_pair_column": "hyp"}),
    ]:
        with pytest.raises(ValueError, match=key):
            TextClassificationData(data, tokenizer, **kwargs).setup()


def test_missing_tokenizer_is_a_clear_error(synthetic, tokenizer):
    dm = TextClassificationData(synthetic)
    with pytest.raises(ValueError, match="tokenizer"):
        dm.setup()
    with pytest.raises(RuntimeError, match="setup"):
        _ = dm.num_labels
    dm.tokenizer = tokenizer  # run.py assigns it after loading the teacher's tokenizer
    dm.setup()
    assert dm.num_labels == 2


def test_subsampling_is_deterministic(synthetic, tokenizer):
    def subsample(seed):
        dm = TextClassificationData(
            synthetic, tokenizer, max_train_samples=50, max_eval_samples=20, seed=seed
        )
        dm.setup()
        return dm

    first, again, other = subsample(0), subsample(0), subsample(1)
    assert (len(first.splits["train"]), len(first.splits["validation"])) == (50, 20)
    assert first.splits["train"]["input_ids"] == again.splits["train"]["input_ids"]
    assert first.splits["train"]["input_ids"] != other.splits["train"]["input_ids"]
    assert set(first.example_texts("train", 50)) <= set(synthetic["train"]["text"])


def test_tiny_bert_forward_on_a_training_batch(synthetic, tokenizer):
    dm = TextClassificationData(synthetic, tokenizer, batch_size=8)
    dm.setup()
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        num_labels=dm.num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    batch = next(iter(dm.train_dataloader()))
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (8, 2)
    assert torch.isfinite(out.loss)


def test_class_label_names_are_kept(tokenizer):
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    rows = {"text": ["w0", "w1", "w2"], "label": [1, 0, 1]}
    ds = Dataset.from_dict(rows, features=features)
    dm = TextClassificationData(DatasetDict(train=ds, validation=ds), tokenizer)
    dm.setup()
    assert dm.label_names == ["neg", "pos"]
    assert dm.splits["train"]["labels"] == [1, 0, 1]


def _eos_padded_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A GPT-2-style word tokenizer (no special tokens added) whose padding token is its eos token, id 0."""
    vocab = {token: i for i, token in enumerate(("<eos>", "<unk>", *SYNTHETIC_WORDS))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.pad_token = tokenizer.eos_token  # as for GPT-2 and LLaMA
    return tokenizer


@pytest.mark.parametrize("pack", [False, True])
def test_causal_lm_labels_keep_a_real_eos_when_pad_is_eos(pack):
    """Labels are -100 at padding (attention_mask 0) only, not at every token equal to the padding id."""
    texts = Dataset.from_dict(
        {"text": ["the movie <eos> was good <eos>", "bad <eos>", "it is <eos> not fine"] * 4}
    )
    data = LanguageModelingData(
        DatasetDict(train=texts, validation=texts),
        _eos_padded_tokenizer(),
        mlm=False,
        max_length=5,
        pack=pack,
        batch_size=3,
    )
    data.setup()
    eos = data.tokenizer.eos_token_id
    assert data.tokenizer.pad_token_id == eos == 0
    batches = [*data.train_dataloader(), *data.val_dataloader(), data.example_batch("train", 3)]
    real_eos = padding = 0
    for batch in batches:
        real = batch["attention_mask"] == 1
        assert torch.equal(batch["labels"][real], batch["input_ids"][real])
        assert (batch["labels"][~real] == -100).all()
        real_eos += int((batch["input_ids"][real] == eos).sum())
        padding += int((~real).sum())
    assert real_eos >= 12  # every text holds an eos, and each keeps its label
    assert (padding == 0) == pack  # padded batches do have padding, packed blocks none


def test_masked_lm_calibration_batch_leaves_the_training_masks_alone():
    """example_batch("train") masks with a collator of its own: the run's training masks are the same whether
    or not a calibration batch was drawn first, and the calibration batch depends on the seed alone."""

    def run(calibrate: bool, seed: int = 3):
        data = LanguageModelingData(
            synthetic_text(num_train=96, num_validation=16), build_word_tokenizer(), batch_size=16, seed=seed
        )
        calibration = data.example_batch("train", 24) if calibrate else None
        rng = torch.get_rng_state()
        epochs = [[(b["input_ids"], b["labels"]) for b in data.train_dataloader()] for _ in range(2)]
        assert torch.equal(
            torch.get_rng_state(), rng
        )  # the masks come from the seeded collator, not the global RNG
        return data, calibration, epochs

    data, calibration, epochs = run(calibrate=True)
    _, _, uncalibrated = run(calibrate=False)
    for with_calibration, without in zip(chain(*epochs), chain(*uncalibrated), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(with_calibration, without, strict=True))
    assert (calibration["labels"] != -100).sum() > 0  # masked, as a training batch is
    for again in (
        data.example_batch("train", 24),
        run(calibrate=True)[1],
    ):  # after training batches, another module
        assert torch.equal(again["input_ids"], calibration["input_ids"]) and torch.equal(
            again["labels"], calibration["labels"]
        )
    assert not torch.equal(run(calibrate=True, seed=4)[1]["labels"], calibration["labels"])


NEG_POS = datasets.ClassLabel(names=["neg", "pos"])
# label kind -> (train labels, validation labels, their ClassLabel features or None, label names or the error)
LABEL_CASES = {
    "class_label": ([1, 0, 1], [0, 1], (NEG_POS, NEG_POS), ["neg", "pos"]),
    "string": (["pos", "neg", "neutral", "pos"], ["neutral", "pos"], None, ["neg", "neutral", "pos"]),
    "int": ([0, 3, 1], [1, 3], None, ["0", "1", "2", "3"]),
    "float": ([0.0, 1.0, 1.0], [1.0, 0.0], None, r"data\.label_column='label'.*float"),
    "unseen_validation_label": (
        ["a", "b"],
        ["b", "c"],
        None,
        r"validation labels \['c'\] of data\.label_column='label' do not occur in the train split",
    ),
    "negative_int": ([0, -1, 1], [1, 0], None, r"data\.label_column='label' holds invalid labels \[-1\]"),
    "other_validation_classes": (  # e.g. a validation folder with other class sub-folders
        [1, 0],
        [0, 1],
        (NEG_POS, datasets.ClassLabel(names=["neg", "neutral"])),
        r"different classes: \['neg', 'pos'\] vs \['neg', 'neutral'\]",
    ),
}


def _labelled_data(kind: str, train_labels: list, validation_labels: list, class_labels) -> DatasetDict:
    """The labels beside texts (``kind="text"``) or beside 4 x 4 images (``kind="image"``)."""
    splits = {}
    for i, (split, labels) in enumerate((("train", train_labels), ("validation", validation_labels))):
        if kind == "text":
            rows, features = (
                {"text": [f"w{k}" for k in range(len(labels))]},
                {"text": datasets.Value("string")},
            )
        else:
            rows = {"image": [np.full((4, 4, 3), 40 * k, dtype=np.uint8) for k in range(len(labels))]}
            features = {"image": datasets.Image()}
        label = class_labels[i] if class_labels else Dataset.from_dict({"label": labels}).features["label"]
        splits[split] = Dataset.from_dict(
            rows | {"label": labels}, features=datasets.Features(features | {"label": label})
        )
    return DatasetDict(splits)


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_text_and_image_data_map_labels_alike(tokenizer, case):
    """Text and image classification share one label mapping: the same label kinds, names, ids and errors."""
    train_labels, validation_labels, class_labels, expected = LABEL_CASES[case]
    processor = transformers.ViTImageProcessorPil(size={"height": 4, "width": 4})
    modules = [
        TextClassificationData(
            _labelled_data("text", train_labels, validation_labels, class_labels), tokenizer, batch_size=8
        ),
        ImageFolderData(
            _labelled_data("image", train_labels, validation_labels, class_labels), processor, batch_size=8
        ),
    ]
    for data in modules:
        if isinstance(expected, str):
            with pytest.raises(ValueError, match=expected):
                data.setup()
            continue
        data.setup()
        assert data.label_names == expected
        ids = (
            validation_labels if class_labels else [expected.index(str(label)) for label in validation_labels]
        )
        assert next(iter(data.val_dataloader()))["labels"].tolist() == ids


MNLI = datasets.ClassLabel(names=["entailment", "neutral", "contradiction"])  # glue's order
MNLI_TEACHER = ["CONTRADICTION", "NEUTRAL", "ENTAILMENT"]  # an MNLI classifier's id2label in another order


def _both_modules(tokenizer, data_args: tuple, **options) -> list:
    processor = transformers.ViTImageProcessorPil(size={"height": 4, "width": 4})
    return [
        TextClassificationData(_labelled_data("text", *data_args), tokenizer, batch_size=8, **options),
        ImageFolderData(_labelled_data("image", *data_args), processor, batch_size=8, **options),
    ]


@pytest.mark.parametrize("kind", ["class_label", "string"])
def test_named_classes_are_numbered_as_the_teacher_numbers_them(tokenizer, kind):
    """The data's class names are matched to the teacher's id2label by name, ignoring case: a validation
    example of class "entailment" (glue id 0) gets the teacher's id of ENTAILMENT, 2, and the names follow the
    teacher's order."""
    names = ["entailment", "neutral", "contradiction"]
    train, validation = [0, 1, 2, 0], [2, 0, 1, 0]
    if kind == "class_label":
        data_args = (train, validation, (MNLI, MNLI))
    else:  # strings, "Entailment" in other case
        data_args = ([names[i].title() for i in train], [names[i].title() for i in validation], None)
    for data in _both_modules(tokenizer, data_args, model_labels=MNLI_TEACHER):
        data.setup()
        assert data.label_names == MNLI_TEACHER
        teacher_ids = [MNLI_TEACHER.index(names[i].upper()) for i in validation]
        assert teacher_ids == [0, 2, 1, 2]
        assert next(iter(data.val_dataloader()))["labels"].tolist() == teacher_ids


def test_classes_unknown_to_the_teacher_are_an_error_unless_matching_is_off(tokenizer):
    """Other class names than the teacher's are refused, naming both lists and the way out;
    data.match_label_names=false takes the data's ids as they are."""
    data_args = ([1, 0, 1], [0, 1], (NEG_POS, NEG_POS))
    for data in _both_modules(tokenizer, data_args, model_labels=["NEGATIVE", "POSITIVE"]):
        with pytest.raises(ValueError) as info:
            data.setup()
        message = str(info.value)
        assert "the data's classes ['neg', 'pos'] are not the teacher's ['NEGATIVE', 'POSITIVE']" in message
        assert "data.match_label_names=false" in message
    for data in _both_modules(
        tokenizer, data_args, model_labels=["NEGATIVE", "POSITIVE"], match_label_names=False
    ):
        data.setup()
        assert data.label_names == ["neg", "pos"]
        assert next(iter(data.val_dataloader()))["labels"].tolist() == [0, 1]


@pytest.mark.parametrize("kind", ["class_label", "string"])
def test_data_with_some_of_the_teachers_classes_is_numbered_by_name_with_a_warning(tokenizer, kind, caplog):
    """Data that holds only some of the teacher's classes (a binary subset of MNLI, a small file that lacks
    the rare class) is numbered by name as the full set is, keeps the teacher's classes, and says which are
    absent."""
    two = datasets.ClassLabel(names=["contradiction", "entailment"])
    if kind == "class_label":
        data_args = ([0, 1, 1], [1, 0], (two, two))
    else:
        data_args = (["contradiction", "entailment", "entailment"], ["entailment", "contradiction"], None)
    for data in _both_modules(tokenizer, data_args, model_labels=MNLI_TEACHER):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="distill_lab.data"):
            data.setup()
        assert data.label_names == MNLI_TEACHER and data.num_labels == 3
        assert next(iter(data.val_dataloader()))["labels"].tolist() == [2, 0]  # ENTAILMENT, CONTRADICTION
        assert "the data has no class ['NEUTRAL'] of the teacher's" in caplog.text


def test_a_teacher_naming_a_class_twice_is_an_error_unless_matching_is_off(tokenizer):
    """An id2label with the same name twice (here in another case) cannot number the data's classes by name:
    the error says so instead of calling the classes different."""
    data_args = ([1, 0, 1], [0, 1], (NEG_POS, NEG_POS))
    for data in _both_modules(tokenizer, data_args, model_labels=["pos", "POS"]):
        with pytest.raises(ValueError, match=r"the teacher's id2label \['pos', 'POS'\] names a class twice"):
            data.setup()
    for data in _both_modules(tokenizer, data_args, model_labels=["pos", "POS"], match_label_names=False):
        data.setup()
        assert next(iter(data.val_dataloader()))["labels"].tolist() == [0, 1]


def test_int_labels_and_unnamed_teachers_stay_positional(tokenizer):
    """Int labels carry no names to match, and a teacher with transformers' placeholder names (LABEL_0, ...)
    names no class: ids are taken as they are."""
    for data in _both_modules(tokenizer, ([1, 0, 1], [0, 1], None), model_labels=["POSITIVE", "NEGATIVE"]):
        data.setup()
        assert data.label_names == ["0", "1"]
        assert next(iter(data.val_dataloader()))["labels"].tolist() == [0, 1]
    from distill_lab.tasks import model_label_names

    assert model_label_names(transformers.BertConfig(num_labels=3)) is None
    named = transformers.BertConfig(id2label=dict(enumerate(MNLI_TEACHER)))
    assert model_label_names(named) == MNLI_TEACHER


@pytest.mark.parametrize(
    ("labels", "kind"),
    [([0.0, 1.0, 0.5], "Value('float64')"), ([[0], [1, 0], [1]], "List(Value('int64'))")],
    ids=["float", "multi_label"],
)
def test_float_and_list_labels_are_a_clear_error(tokenizer, labels, kind):
    """Regression scores or multi-label lists are refused with the column, its type, its first values and the
    label kinds classification takes."""
    rows = {"text": ["w0", "w1", "w2"], "label": labels}
    data = DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict(rows))
    with pytest.raises(ValueError) as info:
        TextClassificationData(data, tokenizer).setup()
    message = str(info.value)
    assert f"data.label_column='label' holds labels of type {kind} (first values: {labels})" in message
    assert "classification needs int, string or ClassLabel labels" in message
    assert "whole numbers" in message and "cast" in message  # 0.0/1.0 from a csv column with an empty cell


@pytest.mark.parametrize(
    ("option", "missing", "given"),
    [
        ("local", "validation_file", "train_file"),
        ("local", "train_file", "validation_file"),
        ("lm_local", "validation_file", "train_file"),
        ("imagefolder", "validation_dir", "train_dir"),
    ],
)
def test_a_split_left_out_of_the_config_is_named(tmp_path, option, missing, given):
    """Hydra leaves an unset ``???`` out of a partial's arguments: the loader names the option to set, instead
    of a TypeError about a missing positional argument."""
    from conftest import compose_config

    from distill_lab.run import instantiate

    cfg = compose_config([f"data={option}", f"data.dataset.{given}='{tmp_path}'"], tmp_path / "out")
    loader = instantiate(cfg.data.dataset)
    with pytest.raises(
        ValueError, match=rf"data\.dataset\.{missing} is not set: .*data\.dataset\.{missing}="
    ):
        loader()


@pytest.mark.parametrize("option", ["hf", "lm_hf"])
def test_a_hub_dataset_left_out_of_the_config_is_named(tmp_path, option):
    from conftest import compose_config

    from distill_lab.run import instantiate

    loader = instantiate(compose_config([f"data={option}"], tmp_path / "out").data.dataset)
    with pytest.raises(ValueError, match=r"data\.dataset\.path is not set: .*data\.dataset\.path=glue"):
        loader()


def test_a_missing_split_names_the_option_that_picks_it(monkeypatch, tokenizer):
    rows = {"text": ["w0 w1", "w2"], "label": [0, 1]}
    loaded = DatasetDict(train=Dataset.from_dict(rows), test=Dataset.from_dict(rows))
    monkeypatch.setattr("distill_lab.data.load_dataset", lambda *args, **kwargs: loaded)
    message = (
        r"dataset 'org/set' has no split {!r}; available splits: \['train', 'test'\]: "
        r"set data\.dataset\.{}_split"
    )
    with pytest.raises(ValueError, match=message.format("validation", "validation")):
        hub_dataset("org/set")
    with pytest.raises(ValueError, match=message.format("training", "train")):
        hub_dataset("org/set", train_split="training")
    assert hub_dataset("org/set", validation_split="test")["validation"]["text"] == rows["text"]
    # a DatasetDict of one's own: the data module needs exactly these two split names
    with pytest.raises(
        ValueError,
        match=r"dataset has no 'validation' split; available splits: \['train', 'test'\]"
        r".*DatasetDict\(train=.*validation=",
    ):
        TextClassificationData(loaded, tokenizer).setup()
    data = TextClassificationData(synthetic_relations(num_train=8, num_validation=4), tokenizer)
    with pytest.raises(ValueError, match=r"no split 'test'.*'train' or 'validation'"):
        data.example_batch("test")
    with pytest.raises(ValueError, match=r"no split 'test'.*'train' or 'validation'"):
        data.example_texts("test")


@pytest.mark.parametrize(
    ("module", "option", "message"),
    [
        (TextClassificationData, {"batch_size": 0}, "data.batch_size=0 must be a whole number of at least 1"),
        (ImageFolderData, {"num_workers": -1}, "data.num_workers=-1 must be a whole number of at least 0"),
        (
            LanguageModelingData,
            {"max_train_samples": 0},
            "data.max_train_samples=0 must be a whole number of at least 1 (or null: every example)",
        ),
        (LanguageModelingData, {"max_length": 0}, "data.max_length=0 must be a whole number of at least 1"),
        (
            TextClassificationData,
            {"batch_size": 8.5},
            "data.batch_size=8.5 must be a whole number of at least 1",
        ),
    ],
)
def test_sizes_out_of_range_are_refused_when_the_module_is_built(module, option, message):
    """Every data module checks its counts when it is built, naming the config key, not at the first batch."""
    with pytest.raises(ValueError) as info:
        module(DatasetDict(), **option)
    assert str(info.value) == message


def test_a_tsv_reads_quote_characters_as_text(tmp_path):
    """A tab-separated file's '"' is text: a cell that starts with one (GLUE's .tsv files hold such) neither
    swallows the rows after it into one field nor drops its quote."""
    rows = ['"the movie\t1', "it was good\t0", 'bad plot ok"\t0', 'a "fine" actor\t1']
    for split in ("train", "validation"):
        (tmp_path / f"{split}.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n")
    splits = local_files(tmp_path / "train.tsv", tmp_path / "validation.tsv")
    assert splits["train"]["text"] == ['"the movie', "it was good", 'bad plot ok"', 'a "fine" actor']
    assert splits["train"]["label"] == [1, 0, 0, 1]


def test_empty_data_is_refused_naming_the_file_or_split(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text("text,label\n")
    (tmp_path / "rows.csv").write_text("text,label\ngood,1\nbad,0\n")
    for empty in ("empty.csv", "header.csv"):  # datasets' own errors name no file
        with pytest.raises(ValueError, match=rf"cannot read data file '.*{empty}' as csv: .*is it empty"):
            local_files(tmp_path / "rows.csv", tmp_path / empty)
    no_rows = DatasetDict(
        train=Dataset.from_dict({"text": ["good"], "label": [1]}),
        validation=Dataset.from_dict({"text": [], "label": []}),
    )
    with pytest.raises(ValueError, match="the validation split holds no examples"):
        TextClassificationData(no_rows, build_word_tokenizer()).setup()


def test_language_model_batches_pad_on_the_right_whatever_the_tokenizers_side():
    """A tokenizer that pads on the left (LLaMA's, Gemma's) would make the causal task predict a text's first
    token from padding and cut the masked-LM validation texts to their padding: the data module pads on the
    right, with a copy, and the teacher's tokenizer keeps its side (it is saved with the student)."""
    for mlm in (False, True):
        tokenizer = build_word_tokenizer()
        tokenizer.padding_side = "left"
        texts = Dataset.from_dict({"text": ["good", "the movie was not bad", "it is fine"]})
        data = LanguageModelingData(
            DatasetDict(train=texts, validation=texts), tokenizer, mlm=mlm, batch_size=3
        )
        data.setup()
        assert tokenizer.padding_side == "left" and data.tokenizer.padding_side == "right"
        for batch in (next(iter(data.train_dataloader())), next(iter(data.val_dataloader()))):
            mask = batch["attention_mask"]
            assert (
                mask[:, 1:] <= mask[:, :-1]
            ).all() and not mask.all()  # real tokens first, padding after them
            assert (batch["labels"][mask == 0] == -100).all()
        if mlm:  # each validation row keeps its text (cut back to its length after masking)
            assert [len(ids) for ids in data.splits["validation"]["input_ids"]] == [3, 7, 5]


def test_language_model_splits_with_no_examples_are_refused():
    texts = Dataset.from_dict({"text": ["good movie", "bad plot"]})
    packed = LanguageModelingData(
        DatasetDict(train=texts, validation=texts), build_word_tokenizer(), pack=True, max_length=50
    )
    with pytest.raises(
        ValueError,
        match=r"the train split holds no examples after tokenization and packing into blocks of "
        r"data\.max_length=50",
    ):
        packed.setup()
    with pytest.raises(ValueError, match=r"data\.mlm_probability=0 must be in \(0, 1\]"):
        LanguageModelingData(
            DatasetDict(train=texts, validation=texts), build_word_tokenizer(), mlm_probability=0
        )


def test_empty_values_are_refused_naming_the_column_and_string_digits_sort_as_numbers(tmp_path):
    """A null text, pair or label names its column and split (it failed inside the tokenizer or a sort);
    labels that are whole numbers written as strings are numbered as numbers ("2" is class 2, not after
    "10")."""
    tokenizer = build_word_tokenizer()
    good = Dataset.from_dict({"text": ["good", "bad", "fine"], "label": ["0", "1", "2"]})
    for column, values in (("text", ["good", None, "fine"]), ("label", ["0", None, "2"])):
        broken = good.remove_columns(column).add_column(column, values)
        with pytest.raises(
            ValueError,
            match=rf"data\.{column}_column='{column}': 1 examples of the validation split have no value",
        ):
            TextClassificationData(DatasetDict(train=good, validation=broken), tokenizer).setup()
    labels = [str(i) for i in range(12)]
    digits = Dataset.from_dict({"text": ["good"] * 12, "label": labels})
    data = TextClassificationData(DatasetDict(train=digits, validation=digits), tokenizer)
    data.setup()
    assert data.label_names == labels and data.splits["train"]["labels"] == list(range(12))


@pytest.mark.parametrize(("pair", "max_length"), [(False, 2), (True, 4)])
def test_a_max_length_that_leaves_no_room_for_text_is_refused(pair, max_length):
    """At or below the special tokens' count (plus one per text of a pair) the tokenizer cannot truncate and
    keeps every token, silently: refused, naming the count."""
    columns = {"text": ["good movie was fine"], "label": [1], "hypothesis": ["it is bad"]}
    splits = DatasetDict(train=Dataset.from_dict(columns), validation=Dataset.from_dict(columns))
    data = TextClassificationData(
        splits, build_word_tokenizer(), max_length=max_length, text_pair_column="hypothesis" if pair else None
    )
    with pytest.raises(
        ValueError,
        match=rf"data\.max_length={max_length} leaves no room for text: "
        rf"the tokenizer adds {3 if pair else 2} special",
    ):
        data.setup()
    data = TextClassificationData(
        splits,
        build_word_tokenizer(),
        max_length=max_length + 1,
        text_pair_column="hypothesis" if pair else None,
    )
    data.setup()
    assert len(data.splits["train"]["input_ids"][0]) == max_length + 1  # truncated to max_length


def test_epoch_tagged_rows_read_a_batch_at_once_as_one_by_one():
    """``EpochTagged.__getitems__`` (what the DataLoader calls for a batch) gives the rows ``__getitem__``
    gives."""
    from distill_lab.data import EpochTagged

    tagged = EpochTagged(Dataset.from_dict({"input_ids": [[2, 5, 3], [2, 3], [2, 7, 8, 3]]}))
    keys = [(1, 2), (1, 0)]
    assert tagged.__getitems__(keys) == [tagged[key] for key in keys]
    assert tagged[(1, 2)] == {"input_ids": [2, 7, 8, 3], EpochTagged.KEY: (1, 2)}
