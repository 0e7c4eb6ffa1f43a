"""``task=token_classification`` (NER-style): the token-level output loss against a float64 reference, word
tags aligned to first sub-tokens on a WordPiece tokenizer that splits words, the entity metrics against
seqeval called directly (and their distributed sync), ``train(cfg)`` on tiny BERT, RoBERTa, GPT-2 and LLaMA
taggers, and the CLI on the built-in data and teacher (slow).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import app_env, compose_config, make_tiny_config, run_to_end, train_py
from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value
from hydra.utils import instantiate
from seqeval.metrics import f1_score, precision_score, recall_score
from transformers import AutoModelForTokenClassification, BertTokenizerFast

from distill_lab.data_synthetic import build_word_tokenizer
from distill_lab.data_tokens import ENTITY_TAGS, ENTITY_WORDS, TokenClassificationData, synthetic_entities
from distill_lab.entity_metrics import EntityScore
from distill_lab.models import load_tokenizer, position_limit
from distill_lab.run import train
from distill_lab.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TAGS = len(ENTITY_TAGS)


# ------------------------------------------------------------------------------------------------ the loss


def _reference(student, teacher, labels, temperature, alpha):
    """alpha * CE + (1 - alpha) * T^2 * KL(teacher_T || student_T), token by token in float64, averaged over
    the labelled tokens."""
    ce = kl = 0.0
    count = 0
    for b, position in itertools.product(range(labels.shape[0]), range(labels.shape[1])):
        label = int(labels[b, position])
        if label == -100:
            continue
        s, t = student[b, position].double(), teacher[b, position].double()
        ce = ce - torch.log_softmax(s, -1)[label]
        p_t = torch.softmax(t / temperature, -1)
        kl = kl + (p_t * (torch.log(p_t) - torch.log_softmax(s / temperature, -1))).sum()
        count += 1
    return alpha * ce / count + (1 - alpha) * temperature**2 * kl / count


def test_output_loss_is_token_kd_over_labelled_tokens():
    task = get_task("token_classification")
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(3, 6, TAGS, generator=generator, dtype=torch.float64) * 3
    teacher = torch.randn(3, 6, TAGS, generator=generator, dtype=torch.float64) * 3
    labels = torch.randint(0, TAGS, (3, 6), generator=generator)
    labels[:, 0] = -100  # [CLS]
    labels[0, 2] = -100  # a word's second sub-token
    labels[2, 3:] = -100  # [SEP] and padding
    teacher[2, 4:] = float("nan")  # whatever stands at ignored positions takes no part
    student.requires_grad_(True)
    loss = task.output_loss(student, teacher, {"labels": labels}, 2.0, 0.3)
    leaf = student.detach().clone().requires_grad_(True)
    expected = _reference(leaf, teacher, labels, 2.0, 0.3)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(student.grad, leaf.grad, rtol=1e-10, atol=1e-12)
    assert not student.grad[labels == -100].any()
    assert int(task.output_count({"labels": labels})) == int((labels != -100).sum()) == 11

    # bf16 logits: computed in float32, against the reference of the bf16 values
    low = task.output_loss(student.detach().bfloat16(), teacher.bfloat16(), {"labels": labels}, 2.0, 0.3)
    assert low.dtype == torch.float32
    reference = _reference(student.detach().bfloat16(), teacher.bfloat16(), labels, 2.0, 0.3)
    torch.testing.assert_close(low.double(), reference, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- data alignment

WORDPIECE = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "alice", "visited", "wash", "##ing", "##ton"]
WORDPIECE += ["acme", "corp", "hired", "bo", "##b"]


def _wordpiece(tmp_path: Path, fast: bool = True):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDPIECE) + "\n")
    if fast:
        return BertTokenizerFast(str(vocab), do_lower_case=True)
    from transformers import BertTokenizerLegacy  # transformers 5's pure-Python WordPiece: no word_ids()

    return BertTokenizerLegacy(str(vocab), do_lower_case=True)


def _tagged(rows: list[tuple[list[str], list[str]]], names=ENTITY_TAGS) -> DatasetDict:
    features = Features({"tokens": Sequence(Value("string")), "ner_tags": Sequence(ClassLabel(names=names))})
    split = Dataset.from_dict(
        {"tokens": [w for w, _ in rows], "ner_tags": [[names.index(t) for t in tags] for _, tags in rows]},
        features=features,
    )
    return DatasetDict(train=split, validation=split)


ROWS = [
    (["alice", "visited", "washington"], ["B-PER", "O", "B-LOC"]),
    (["acme", "corp", "hired", "bob"], ["B-ORG", "I-ORG", "O", "B-PER"]),
]


def test_word_tags_label_the_first_sub_token_only(tmp_path):
    tokenizer = _wordpiece(tmp_path)
    data = TokenClassificationData(_tagged(ROWS), tokenizer, max_length=32)
    data.setup()
    first, second = data.splits["validation"]
    # washington -> wash ##ing ##ton, bob -> bo ##b: the words really are split
    assert tokenizer.convert_ids_to_tokens(first["input_ids"]) == [
        "[CLS]", "alice", "visited", "wash", "##ing", "##ton", "[SEP]",
    ]  # fmt: skip
    tag = {name: i for i, name in enumerate(ENTITY_TAGS)}
    assert first["labels"] == [-100, tag["B-PER"], tag["O"], tag["B-LOC"], -100, -100, -100]
    assert tokenizer.convert_ids_to_tokens(second["input_ids"])[-3:] == ["bo", "##b", "[SEP]"]
    assert second["labels"] == [-100, tag["B-ORG"], tag["I-ORG"], tag["O"], tag["B-PER"], -100, -100]
    batch = data.example_batch("validation", 2)  # padded: labels with -100
    assert batch["labels"].shape == batch["input_ids"].shape == (2, 7)
    assert batch["labels"][0].tolist() == first["labels"]

    # truncated inside a word: its first sub-token keeps the tag, the rest is gone
    short = TokenClassificationData(_tagged(ROWS), tokenizer, max_length=5)
    short.setup()
    assert short.splits["validation"][0]["labels"] == [-100, tag["B-PER"], tag["O"], tag["B-LOC"], -100]


def test_tags_are_numbered_as_the_teacher_numbers_them(tmp_path):
    tokenizer = _wordpiece(tmp_path)
    teacher_order = list(reversed(ENTITY_TAGS))  # I-ORG first
    data = TokenClassificationData(_tagged(ROWS), tokenizer, model_labels=teacher_order)
    data.setup()
    assert data.label_names == teacher_order
    assert data.splits["validation"][0]["labels"][1] == teacher_order.index("B-PER")

    ints = DatasetDict(
        {s: Dataset.from_dict({"tokens": [["alice"]], "ner_tags": [[1]]}) for s in ("train", "validation")}
    )
    with pytest.raises(ValueError, match=r"neither the data, data.label_names nor the teacher's config"):
        TokenClassificationData(ints, tokenizer).setup()
    named = TokenClassificationData(ints, tokenizer, label_names=["O", "B-PER"])
    named.setup()
    assert named.label_names == ["O", "B-PER"] and named.splits["train"][0]["labels"] == [-100, 1, -100]
    with pytest.raises(ValueError, match=r"holds tags \[1\] beyond the 1 tag names \['O'\]"):
        TokenClassificationData(ints, tokenizer, label_names=["O"]).setup()


def test_a_slow_tokenizer_is_refused(tmp_path):
    data = TokenClassificationData(_tagged(ROWS), _wordpiece(tmp_path, fast=False))
    with pytest.raises(
        ValueError, match=r"needs a fast tokenizer, whose word_ids\(\) align .*BertTokenizerLegacy"
    ):
        data.setup()


# ------------------------------------------------------------------------------------------------ metrics


def _predictions(seed: int, batch: int = 4, length: int = 9):
    """Logits that mostly agree with random BIO labels, with ignored positions (special tokens, later
    sub-tokens, padding)."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, TAGS, (batch, length), generator=generator)
    labels[:, 0] = -100
    labels[torch.rand(batch, length, generator=generator) < 0.2] = -100
    labels[-1, length // 2 :] = -100
    guess = torch.where(torch.rand(batch, length, generator=generator) < 0.7, labels.clamp_min(0), 0)
    logits = torch.nn.functional.one_hot(guess, TAGS).float() + 0.1 * torch.rand(batch, length, TAGS)
    return logits, labels


def _sequences(batches) -> tuple[list[list[str]], list[list[str]]]:
    """Reference and predicted tag names at the labelled tokens, sequence by sequence."""
    truth, predicted = [], []
    for logits, labels in batches:
        for row_logits, row_labels in zip(logits, labels, strict=True):
            keep = row_labels != -100
            if keep.any():
                truth.append([ENTITY_TAGS[i] for i in row_labels[keep].tolist()])
                predicted.append([ENTITY_TAGS[i] for i in row_logits.argmax(-1)[keep].tolist()])
    return truth, predicted


def test_entity_scores_are_seqevals_and_token_accuracy_counts_labelled_tokens():
    task = get_task("token_classification")
    task.label_names = list(ENTITY_TAGS)
    metrics = task.metrics("val/", TAGS)
    batches = [_predictions(seed) for seed in range(3)]
    for logits, labels in batches:
        task.update(metrics, logits, {"labels": labels})
    scores = {k: v.item() for k, v in metrics.compute().items()}
    truth, predicted = _sequences(batches)
    assert scores["val/f1"] == pytest.approx(f1_score(truth, predicted))
    assert scores["val/precision"] == pytest.approx(precision_score(truth, predicted))
    assert scores["val/recall"] == pytest.approx(recall_score(truth, predicted))
    assert 0.2 < scores["val/f1"] < 0.95  # neither trivial nor perfect: the comparison means something
    flat_truth, flat_predicted = sum(truth, []), sum(predicted, [])
    right = sum(a == b for a, b in zip(flat_truth, flat_predicted, strict=True))
    assert scores["val/token_acc"] == pytest.approx(right / len(flat_truth))
    assert set(metrics.keys(keep_base=False)) == {"val/precision", "val/recall", "val/f1", "val/token_acc"}


@pytest.mark.parametrize("second_has_data", [True, False])
def test_entity_scores_sync_by_concatenating_the_processes_sequences(second_has_data):
    """Two processes' states, gathered as ``dist_reduce_fx="cat"`` gathers them, score the union of their
    sequences; a process that saw no batch sends empty float tensors."""
    batches = [_predictions(seed, length=6 + seed) for seed in range(3)]  # other lengths per batch
    # synced below by hand, as a process of a distributed validation is before its compute()
    ours = EntityScore("f1", list(ENTITY_TAGS), sync_on_compute=False)
    theirs = EntityScore("f1", list(ENTITY_TAGS))
    ours.update(*batches[0])
    for batch in batches[1:] if second_has_data else []:
        theirs.update(*batch)
    assert ours._reductions.keys() == {"predictions", "targets", "lengths"}
    gathered = iter(
        torch.cat(getattr(theirs, name)) if getattr(theirs, name) else torch.tensor([])
        for name in ours._reductions
    )  # the order _sync_dist gathers the states in

    def all_gather(tensor, group=None):
        return [tensor, next(gathered)]

    ours.sync(dist_sync_fn=all_gather, distributed_available=lambda: True)
    expected = _sequences(batches if second_has_data else batches[:1])
    assert ours.sequences() == expected
    assert ours.compute().item() == pytest.approx(f1_score(*expected))


# ---------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tagged_files(tmp_path_factory):
    """The built-in NER sentences as jsonl files with int tags (a json file names no tags: the teacher's
    id2label does), and the word tokenizer over their words."""
    root = tmp_path_factory.mktemp("tokens")
    splits = synthetic_entities(num_train=48, num_validation=16, seed=3)
    files = {}
    for split, rows in splits.items():
        files[split] = root / f"{split}.jsonl"
        files[split].write_text(
            "".join(json.dumps({"tokens": r["tokens"], "ner_tags": r["ner_tags"]}) + "\n" for r in rows)
        )
    tokenizer = build_word_tokenizer(ENTITY_WORDS)
    return {"root": root, "files": files, "tokenizer": tokenizer}


def _teacher(family: str, root: Path, tokenizer) -> tuple[Path, int]:
    labels = dict(enumerate(ENTITY_TAGS))
    config = make_tiny_config(
        family, num_hidden_layers=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        num_labels=TAGS, id2label=labels, label2id={v: k for k, v in labels.items()},
    )  # fmt: skip
    if family == "llama":
        config.num_key_value_heads = 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForTokenClassification.from_config(config)
    path = root / f"teacher-{family}"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, min(64, position_limit(model) or 64)


@pytest.mark.parametrize("family", ["bert", "roberta", "gpt2", "llama"])
def test_token_classification_trains_end_to_end(tagged_files, tmp_path, family):
    teacher_dir, max_length = _teacher(family, tmp_path, tagged_files["tokenizer"])
    out = tmp_path / "run"
    files = tagged_files["files"]
    overrides = [
        "task=token_classification", "teacher=hf", f"teacher.name_or_path='{teacher_dir}'",
        "data=tokens_local", f"data.dataset.train_file='{files['train']}'",
        f"data.dataset.validation_file='{files['validation']}'", f"data.max_length={max_length}",
        "student.num_layers=1", "debug=fast", "trainer.limit_train_batches=2", "logger=csv",
        "fused_kernel=false",
    ]  # fmt: skip
    metrics = train(compose_config(overrides, out))
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "token_classification" and results["trained_steps"] == 2
    names = {"precision", "recall", "f1", "token_acc"}
    assert set(results["student"]) == set(results["teacher"]) == names
    assert set(metrics) >= {f"val/{name}" for name in names}
    assert set(results["attention_loss"]) == {"L1->0"} and results["attention_loss"]["L1->0"] > 0
    # the teacher's scores are seqeval's on its predictions over what validation saw
    cfg = compose_config(overrides, out)
    data = instantiate(cfg.data, tokenizer=load_tokenizer(str(teacher_dir)), model_labels=list(ENTITY_TAGS))
    teacher = AutoModelForTokenClassification.from_pretrained(teacher_dir).eval()
    batches = []
    with torch.no_grad():
        for batch in itertools.islice(data.val_dataloader(), cfg.trainer.limit_val_batches):
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            batches.append((teacher(**inputs).logits, batch["labels"]))
    truth, predicted = _sequences(batches)
    assert results["teacher"]["f1"] == pytest.approx(f1_score(truth, predicted), abs=1e-6)
    assert results["teacher"]["recall"] == pytest.approx(recall_score(truth, predicted), abs=1e-6)
    student = AutoModelForTokenClassification.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 1 and student.config.id2label == dict(enumerate(ENTITY_TAGS))


def test_the_eval_command_scores_a_tagger_as_seqeval_does(tagged_files, tmp_path):
    """``distill-lab-eval --task token_classification`` on a tagger and a jsonl split: seqeval's entity scores
    of the model's predictions at each word's first sub-token."""
    from distill_lab.evaluate import main

    teacher_dir, max_length = _teacher("bert", tmp_path, tagged_files["tokenizer"])
    split = tagged_files["files"]["validation"]
    out = tmp_path / "scores.json"
    main([
        "--student", str(teacher_dir), "--task", "token_classification", "--file", str(split),
        "--max-length", str(max_length), "--batch-size", "5", "--output", str(out), "--device", "cpu",
    ])  # fmt: skip
    scores = json.loads(out.read_text())["student"]
    model = AutoModelForTokenClassification.from_pretrained(teacher_dir).eval()
    tokenizer = load_tokenizer(str(teacher_dir))
    batches = []
    with torch.no_grad():
        for line in split.read_text().splitlines():
            row = json.loads(line)
            encoded = tokenizer(row["tokens"], is_split_into_words=True, return_tensors="pt")
            words, labels, seen = encoded.word_ids(), [], set()
            for word in words:  # the tag on each word's first sub-token
                labels.append(-100 if word is None or word in seen else row["ner_tags"][word])
                seen.add(word)
            batches.append((model(**encoded).logits, torch.tensor([labels])))
    truth, predicted = _sequences(batches)
    assert 0 < f1_score(truth, predicted) < 1  # a random tagger: some entities right, some wrong
    assert scores["f1"] == pytest.approx(f1_score(truth, predicted), abs=1e-6)
    assert scores["precision"] == pytest.approx(precision_score(truth, predicted), abs=1e-6)
    assert scores["recall"] == pytest.approx(recall_score(truth, predicted), abs=1e-6)


@pytest.mark.slow
def test_the_cli_distils_the_builtin_tagger_offline(tmp_path):
    """``python train.py task=token_classification``: the built-in tagger is trained on the built-in NER
    sentences, then distilled."""
    run_dir = tmp_path / "run"
    run_to_end(
        train_py("task=token_classification", "debug=fast", f"hydra.run.dir={run_dir}"), app_env(tmp_path)
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["teacher"]["f1"] > 0.8  # the built-in tagger finds the entities
    assert set(results["student"]) == {"precision", "recall", "f1", "token_acc"}
    assert (tmp_path / "cache" / "builtin-token_classification-v2" / "config.json").exists()
