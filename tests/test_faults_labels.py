"""Silently wrong labels: string labels in the reverse order of the teacher's ids, labels numbered by sorted
order, and texts that hold only whitespace.

The teacher here is no random one: a tiny BERT fine-tuned in the fixture (under a second) on sentences whose
label is the polarity of their one sentiment word, 0 for negative and 1 for positive, with no names in its
config. The data calls the classes ``favorable`` and ``unfavorable``, whose sorted order (favorable 0) is
the reverse of the teacher's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pytest
import torch
from conftest import app_env, compose_config, make_tiny_config, run_to_end, train_py
from datasets import Dataset, DatasetDict
from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

from distill_lab.data import TextClassificationData, build_word_tokenizer, synthetic_relations
from distill_lab.run import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")

NAMES = {0: "unfavorable", 1: "favorable"}  # the teacher's ids; sorted order would number them the other way
BASE = ["student=from_teacher", "student.num_layers=2", "debug=fast", "logger=csv", "fused_kernel=false"]
REVERSED = "{'favorable': 0, 'unfavorable': 1}"


def _sentences(num_train: int, num_validation: int, seed: int = 0) -> DatasetDict:
    """The built-in sentences without negation: the label is the sentiment word's polarity."""
    return synthetic_relations(
        num_train,
        num_validation,
        min_length=4,
        max_length=8,
        negation_rate=0.0,
        distractor_rate=0.0,
        seed=seed,
    )


@pytest.fixture(scope="module")
def trained_task(tmp_path_factory):
    """A tiny BERT classifier trained to 1.0 validation accuracy (ids 0 negative, 1 positive; no label names),
    saved with its tokenizer, and csv files of other sentences with the labels written as ``NAMES``."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        root = tmp_path_factory.mktemp("labels-task")
        tokenizer = build_word_tokenizer()
        config = make_tiny_config(
            "bert", num_hidden_layers=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            num_labels=2,
        )  # fmt: skip
        train_split = _sentences(256, 64)["train"]
        encoded = tokenizer(list(train_split["text"]), padding=True, return_tensors="pt")
        labels = torch.tensor(list(train_split["label"]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = BertForSequenceClassification(config)
            optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
            for _ in range(60):
                rows = torch.randint(0, len(labels), (32,))
                batch = {key: value[rows] for key, value in encoded.items()}
                loss = model(**batch, labels=labels[rows]).loss
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        teacher_dir = root / "teacher"
        model.save_pretrained(teacher_dir)
        tokenizer.save_pretrained(teacher_dir)
        files = {}
        for split, rows in _sentences(64, 48, seed=1).items():
            frame = rows.to_pandas()
            frame["label"] = frame["label"].map(NAMES)
            files[split] = root / f"{split}.csv"
            frame[["text", "label"]].to_csv(files[split], index=False)
        overrides = [
            "teacher=hf", f"teacher.name_or_path='{teacher_dir}'", "data=local",
            f"data.dataset.train_file='{files['train']}'",
            f"data.dataset.validation_file='{files['validation']}'", "data.max_length=32",
        ]  # fmt: skip
        yield {"dir": root, "teacher": teacher_dir, "files": files, "overrides": overrides}


def _teacher_accuracy(task: dict) -> float:
    """The teacher's accuracy on the validation file under its own ids (``NAMES``)."""
    tokenizer = build_word_tokenizer()
    model = AutoModelForSequenceClassification.from_pretrained(task["teacher"]).eval()
    rows = Dataset.from_csv(str(task["files"]["validation"]))
    with torch.no_grad():
        predicted = model(**tokenizer(list(rows["text"]), padding=True, return_tensors="pt")).logits.argmax(
            -1
        )
    ids = {name: i for i, name in NAMES.items()}
    return float((predicted == torch.tensor([ids[v] for v in rows["label"]])).float().mean())


def test_string_labels_in_the_reverse_order_of_the_teacher_stop_before_training(trained_task, tmp_path):
    """The teacher scores 1.0 under its own ids; with the labels numbered in sorted order it would score 0.0,
    and teach the student the reverse: an error before training that shows the mapping used and the key
    that sets the order. With that key the same run trains, and the teacher scores 1.0 in it."""
    assert _teacher_accuracy(trained_task) == 1.0
    out = tmp_path / "sorted"
    with pytest.raises(ValueError) as info:
        train(compose_config([*trained_task["overrides"], *BASE], out))
    message = str(info.value)
    assert "the teacher scores 0.0000 accuracy on 16 validation examples" in message
    assert f"numbered in sorted order {REVERSED}" in message
    assert "data.label_names=[unfavorable,favorable]" in message  # the order the teacher's answers show
    assert "data.check_teacher=false" in message
    assert not (out / "checkpoints").exists()

    named = train(
        compose_config(
            [*trained_task["overrides"], *BASE, "data.label_names=[unfavorable,favorable]"],
            tmp_path / "named",
        )
    )
    assert named["val/teacher_acc"] == 1.0


@pytest.mark.slow
def test_reverse_order_labels_through_the_cli_fail_before_anything_trains(trained_task, tmp_path):
    """The issue's case through ``python train.py``: exit status non-zero (it was 0, with teacher accuracy
    0.0000), the mapping and the way out on stderr, no checkpoint and no results."""
    run_dir = tmp_path / "run"
    result = run_to_end(
        train_py(*trained_task["overrides"], *BASE, f"hydra.run.dir={run_dir}"), app_env(tmp_path), fails=True
    )
    assert f"numbered in sorted order {REVERSED}" in result.stderr
    assert "data.label_names=[unfavorable,favorable]" in result.stderr
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "results.json").exists()


def _data(train_labels: list, validation_labels: list, **options) -> TextClassificationData:
    splits = {
        split: Dataset.from_dict({"text": ["good movie"] * len(labels), "label": labels})
        for split, labels in (("train", train_labels), ("validation", validation_labels))
    }
    return TextClassificationData(DatasetDict(splits), build_word_tokenizer(), **options)


def _warnings(caplog, data: TextClassificationData) -> str:
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill_lab.labels"):
        data.setup()
    return caplog.text


def test_string_labels_numbered_by_sorted_order_are_warned_naming_the_mapping(caplog):
    """Sorted order is a guess wherever the teacher's names do not number the classes: a warning names the
    mapping and the key. Labels matched to the teacher's names, given in ``data.label_names``, or written as
    the ids themselves ("0", "1") are numbered as stated, without a warning."""
    labels = (["unfavorable", "favorable", "favorable"], ["favorable", "unfavorable"])
    text = _warnings(caplog, _data(*labels))
    assert f"string labels numbered in sorted order {REVERSED}" in text
    assert "data.label_names=[...]" in text
    text = _warnings(caplog, _data(*labels, model_labels=["FAVORABLE", "X"], match_label_names=False))
    assert f"numbered in sorted order {REVERSED}" in text and "data.match_label_names=false" in text

    given = _data(*labels, label_names=["unfavorable", "favorable"])
    assert "sorted order" not in _warnings(caplog, given)
    assert given.label_names == ["unfavorable", "favorable"]
    assert next(iter(given.val_dataloader()))["labels"].tolist() == [1, 0]
    assert "sorted order" not in _warnings(caplog, _data(*labels, model_labels=["UNFAVORABLE", "FAVORABLE"]))
    assert "sorted order" not in _warnings(caplog, _data(["1", "0"], ["0", "1"]))
    assert "numbered in sorted order {'1': 0, '2': 1}" in _warnings(caplog, _data(["1", "2"], ["2"]))

    with pytest.raises(ValueError, match=r"data\.label_names=\['unfavorable'\] lacks the data's classes"):
        _data(*labels, label_names=["unfavorable"]).setup()


@pytest.mark.parametrize("blank", ["", "   ", "\t \n"], ids=["empty", "spaces", "whitespace"])
@pytest.mark.parametrize("column", ["text", "hypothesis"])
def test_whitespace_only_texts_are_refused_like_empty_ones(blank, column):
    """A text (or a pair's second text) that is empty or only whitespace is refused as an empty cell is,
    naming the column, the split and the count."""
    rows = {"text": ["good movie", "bad plot"], "hypothesis": ["it is", "it was"], "label": [1, 0]}
    broken = dict(rows, **{column: [rows[column][0], blank]})
    splits = DatasetDict(train=Dataset.from_dict(rows), validation=Dataset.from_dict(broken))
    data = TextClassificationData(splits, build_word_tokenizer(), text_pair_column="hypothesis")
    key = "text_pair_column" if column == "hypothesis" else "text_column"
    with pytest.raises(
        ValueError,
        match=rf"data\.{key}='{column}': 1 examples of the validation split have no value there \(an empty "
        r"cell, null, or only whitespace\); fill or drop them",
    ):
        data.setup()


def _confusion(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows)


@pytest.mark.parametrize(
    ("confusion", "at_chance"),
    [
        ([[0, 8], [8, 0]], True),  # the reverse order
        ([[2, 0], [0, 2]], False),  # right on 4 examples: little data, but no other order comes close
        ([[125, 125], [125, 125]], True),  # a random teacher on 500 examples
        ([[11, 5], [6, 10]], False),  # 0.66 on 32 examples: above chance by more than the noise
        ([[9, 7], [7, 9]], True),  # 0.56 on 32 examples: within the noise of chance
        ([[90, 0], [10, 0]], False),  # a constant answer, the majority class of an imbalanced set
        ([[0, 90], [0, 10]], True),  # a constant answer, the minority class
        ([[0, 0], [0, 16]], False),  # a validation set of one class, answered right
        ([[0, 0], [16, 0]], True),  # ... answered in the other order
        ([[0, 10, 0], [10, 0, 0], [0, 0, 10]], True),  # 3 classes, two swapped: 1/3
    ],
)
def test_chance_rule(confusion, at_chance):
    """At or below chance: accuracy within two standard errors of a uniform guess on that many examples, and
    not clearly above every other order of the classes (a tiny set answered right is not flagged)."""
    from distill_lab.teacher_check import teacher_at_chance

    assert teacher_at_chance(_confusion(confusion)).at_chance is at_chance


def test_random_teacher_with_int_labels_is_measured_and_warned_not_refused(tmp_path, caplog):
    """Ids given by the data (int labels) are not the library's guess: a teacher at chance on them (the test
    suite's random teachers) is a warning that names the mapping, and the run trains."""
    from conftest import make_text_task

    task = make_text_task(tmp_path / "task", num_layers=2)
    task_overrides = [*task["overrides"], *BASE, "trainer.limit_train_batches=1"]
    with caplog.at_level(logging.WARNING, logger="distill_lab.teacher_check"):
        metrics = train(compose_config(task_overrides, Path(tmp_path / "run")))
    assert "val/acc" in metrics
    assert "at or below chance" in caplog.text and "{0: 0, 1: 1}" in caplog.text


def test_the_measurement_sees_what_validation_sees():
    """As many batches as ``trainer.limit_val_batches`` lets validation see: all, a count or a fraction."""
    from distill_lab.teacher_check import _max_batches

    assert [_max_batches(limit, 10) for limit in (None, 1.0, 3, 30, 0.25, 0.01, 0, 0.0)] == [
        10, 10, 3, 10, 2, 1, 0, 0,
    ]  # fmt: skip
