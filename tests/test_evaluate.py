"""Held-out evaluation: a run with a test split scores its best checkpoint there (``results.json["test"]``),
``distill-lab-eval`` scores saved models on a split with the same numbers, the GLUE-style metrics (MCC,
Pearson, Spearman) against independent references, a regression head (``num_labels=1``) end to end with its
output loss against a float64 reference, and the throughput's median and spread from
``torch.utils.benchmark``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import datasets
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import REPO_ROOT, app_env, compose_config, make_text_task
from scipy import stats
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distill_lab.data import synthetic_relations
from distill_lab.evaluate import main, parser, score
from distill_lab.objective import regression_kd_loss
from distill_lab.run import train
from distill_lab.tasks import get_task

pytestmark = pytest.mark.usefixtures("torch_single_thread", "offline")
BASE = ["student=from_teacher", "student.num_layers=2", "debug=fast", "logger=csv", "fused_kernel=false"]
TEST_ROWS = 24


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("WANDB_MODE", "offline")
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


def write_test_file(task: dict, rows: int = TEST_ROWS, seed: int = 7) -> str:
    """A held-out CSV of ``rows`` sentences drawn with another seed than the train and validation files."""
    path = f"{task['dir']}/test.csv"
    split = synthetic_relations(num_train=rows, num_validation=1, seed=seed)["train"]
    split.to_pandas()[["text", "label"]].to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, offline):
    """One tiny run with ``data.dataset.test_file``: its task, output directory and ``results.json``."""
    task = make_text_task(tmp_path_factory.mktemp("task"))
    task["test_file"] = write_test_file(task)
    out = tmp_path_factory.mktemp("run")
    overrides = [*task["overrides"], *BASE, f"data.dataset.test_file='{task['test_file']}'"]
    train(compose_config(overrides, out))
    return task, out, json.loads((out / "results.json").read_text())


def matthews_corrcoef(labels, predictions) -> float:
    """MCC from the confusion counts: ``(c s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2) (s^2 - sum t_k^2))``,
    0 where the denominator is (one class predicted, or labelled), as scikit-learn and GLUE give it."""
    labels, predictions = [int(v) for v in labels], [int(v) for v in predictions]
    classes = sorted(set(labels) | set(predictions))
    s = len(labels)
    c = sum(p == t for p, t in zip(predictions, labels, strict=True))
    p_k = [predictions.count(k) for k in classes]
    t_k = [labels.count(k) for k in classes]
    numerator = c * s - sum(p * t for p, t in zip(p_k, t_k, strict=True))
    denominator = (s * s - sum(p * p for p in p_k)) * (s * s - sum(t * t for t in t_k))
    return 0.0 if denominator == 0 else numerator / denominator**0.5


def macro_f1(labels, predictions) -> float:
    """The mean over the classes that occur (labelled or predicted) of ``2 tp / (2 tp + fp + fn)``."""
    pairs = list(zip([int(v) for v in predictions], [int(v) for v in labels], strict=True))
    classes = sorted({k for pair in pairs for k in pair})
    f1 = []
    for k in classes:
        tp = sum(p == k and t == k for p, t in pairs)
        wrong = sum((p == k) != (t == k) for p, t in pairs)  # fp + fn
        f1.append(2 * tp / (2 * tp + wrong))
    return sum(f1) / len(f1)


@torch.no_grad()
def scores_by_hand(model_dir: str, tokenizer_dir: str, test_file: str) -> dict[str, float]:
    """Accuracy, macro F1 and MCC of a saved classifier on a CSV, from its own tokenizer call."""
    frame = pd.read_csv(test_file)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    encoded = tokenizer(
        list(frame["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt"
    )
    predictions = model(**encoded).logits.argmax(-1).numpy()
    labels = frame["label"].to_numpy()
    return {
        "acc": float((predictions == labels).mean()),
        "f1": macro_f1(labels, predictions),
        "mcc": matthews_corrcoef(labels, predictions),
    }


# ---------------------------------------------------------------------------------------------- the run


def test_a_run_scores_its_best_checkpoint_on_the_test_file(run):
    """``results.json["test"]``: student (the exported best checkpoint) and teacher on every test example,
    equal to an evaluation written here (the models' own tokenizer call, the metrics by hand)."""
    task, out, results = run
    test = results["test"]
    assert test["examples"] == TEST_ROWS
    assert set(test["student"]) == set(test["teacher"]) == {"acc", "f1", "mcc"}
    student = scores_by_hand(str(out / "student"), task["teacher"], task["test_file"])
    teacher = scores_by_hand(task["teacher"], task["teacher"], task["test_file"])
    for name in ("acc", "f1", "mcc"):
        assert test["student"][name] == pytest.approx(student[name], abs=1e-6), name
        assert test["teacher"][name] == pytest.approx(teacher[name], abs=1e-6), name
    # the validation scores stay the validation set's (another set: they need not agree)
    assert set(results["student"]) == {"acc", "f1", "mcc"}
    # the loggers get the test scores as one point at the last step
    rows = list(pd.read_csv(out / "csv" / "version_0" / "metrics.csv").to_dict("records"))
    logged = [r for r in rows if not pd.isna(r.get("test/acc"))]
    assert len(logged) == 1 and logged[0]["test/acc"] == pytest.approx(test["student"]["acc"])


def test_a_run_without_a_test_split_records_no_test(run, tmp_path):
    """``data.dataset.test_file`` is null by default: nothing is evaluated, ``results.json`` has no
    ``test``; the throughput's median and spread are recorded for both models, with the medians as the
    ``inference`` keys that were there before."""
    task, _, _ = run
    train(compose_config([*task["overrides"], *BASE, "trainer.limit_train_batches=1"], tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert "test" not in results
    inference, throughput = results["inference"], results["throughput"]
    for role in ("teacher", "student"):
        assert throughput[role]["median"] == inference[f"{role}_examples_per_s"] > 0
        assert throughput[role]["iqr"] >= 0 and throughput[role]["runs"] >= 2
        assert throughput[role]["examples_per_pass"] == 4 * 8  # four validation batches of debug=fast's 8
    assert inference["speedup"] == pytest.approx(
        throughput["student"]["median"] / throughput["teacher"]["median"]
    )


# ---------------------------------------------------------------------------------------------- the command


def eval_args(task: dict, out, *extra: str) -> list[str]:
    return [
        "--student", str(out / "student"), "--teacher", task["teacher"], "--task", "sequence_classification",
        "--file", task["test_file"], "--text-column", "text", "--label-column", "label",
        "--batch-size", "5", "--max-length", "64", *extra,
    ]  # fmt: skip


def test_the_eval_command_gives_the_runs_test_scores(run, tmp_path, capsys):
    """``distill-lab-eval`` on the exported student and the teacher: the numbers of ``results.json["test"]``
    (other batches: a batch of 5 pads otherwise than the run's 8), printed and written with ``--output``."""
    task, out, results = run
    main(eval_args(task, out, "--output", str(tmp_path / "scores.json")))
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["examples"] == TEST_ROWS and scores["task"] == "sequence_classification"
    for role in ("student", "teacher"):
        assert scores[role] == pytest.approx(results["test"][role], abs=1e-6)
    printed = capsys.readouterr().out
    assert "mcc" in printed and f"{scores['student']['acc']:.4f}" in printed


def test_the_eval_command_scores_one_model_alone(run):
    task, out, results = run
    args = eval_args(task, out)
    args = args[:2] + args[4:]  # no --teacher
    scores = score(parser().parse_args(args))
    assert "teacher" not in scores
    assert scores["student"] == pytest.approx(results["test"]["student"], abs=1e-6)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--file", "/nonexistent/test.csv"], r"data file '/nonexistent/test\.csv' does not exist"),
        (["--text-column", "sentence"], r"--text-column 'sentence' is not a column of --file .*test\.csv; "),
        (["--student", "/nonexistent/student"], r"cannot load --student '/nonexistent/student'"),
        (["--dataset", "glue"], r"exactly one of --file, --dataset .*not --file and --dataset"),
    ],
    ids=["missing-file", "missing-column", "missing-model", "two-sources"],
)
def test_the_eval_command_names_a_bad_argument(run, capsys, change, message):
    import re

    task, out, _ = run
    with pytest.raises(SystemExit) as exited:
        main([*eval_args(task, out), *change])  # a later option wins over the same one before it
    assert exited.value.code == 2
    assert re.search(message, capsys.readouterr().err.replace("\n", " "))


@pytest.mark.slow
def test_python_m_distill_lab_evaluate_runs_as_a_command(run, tmp_path):
    task, out, results = run
    command = [sys.executable, "-m", "distill_lab.evaluate", *eval_args(task, out)]
    command += ["--output", str(tmp_path / "scores.json")]
    env = app_env(tmp_path, PYTHONPATH=str(REPO_ROOT / "src"))
    subprocess.run(command, cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["student"] == pytest.approx(results["test"]["student"], abs=1e-6)


# ---------------------------------------------------------------------------------------------- metrics


def test_mcc_over_several_updates_equals_the_formula():
    generator = torch.Generator().manual_seed(5)
    task = get_task("sequence_classification")
    metrics = task.metrics("val/", 3)
    logits = torch.randn(29, 3, generator=generator)
    labels = torch.randint(0, 3, (29,), generator=generator)
    logits[torch.arange(29), labels] += 0.7  # better than chance, not right everywhere
    for part in (slice(0, 10), slice(10, 11), slice(11, 29)):
        task.update(metrics, logits[part], {"labels": labels[part]})
    expected = matthews_corrcoef(labels.numpy(), logits.argmax(-1).numpy())
    assert 0.05 < abs(expected) < 0.95  # not a degenerate case
    # the reference itself: on two classes MCC is the Pearson correlation of the 0/1 answers and labels
    binary_labels, binary_answers = [0, 1, 1, 0, 1, 1, 0], [0, 1, 0, 0, 1, 1, 1]
    assert matthews_corrcoef(binary_labels, binary_answers) == pytest.approx(
        stats.pearsonr(binary_labels, binary_answers)[0]
    )
    assert float(metrics.compute()["val/mcc"]) == pytest.approx(expected, rel=1e-5)


def test_a_regression_head_is_scored_by_pearson_and_spearman_as_scipy_scores_it():
    generator = torch.Generator().manual_seed(6)
    task = get_task("sequence_classification")
    metrics = task.metrics("test/", 1)
    assert set(metrics.keys()) == {"test/pearson", "test/spearman"}
    scores = torch.randn(23, 1, generator=generator)
    labels = 2 * scores[:, 0] + torch.randn(23, generator=generator) * 2
    for part in (slice(0, 7), slice(7, 23)):
        task.update(metrics, scores[part], {"labels": labels[part]})
    result = metrics.compute()
    x, y = scores[:, 0].double().numpy(), labels.double().numpy()
    assert float(result["test/pearson"]) == pytest.approx(stats.pearsonr(x, y)[0], rel=1e-5)
    assert float(result["test/spearman"]) == pytest.approx(stats.spearmanr(x, y)[0], rel=1e-5)


def regression_reference(student, teacher, labels, alpha):
    """``alpha * mean((s - y)^2) + (1 - alpha) * mean((s - t)^2)``, one example at a time, in float64."""
    s, t, y = (v.double().reshape(-1) for v in (student, teacher, labels))
    to_labels = sum((s[i] - y[i]) ** 2 for i in range(len(s))) / len(s)
    to_teacher = sum((s[i] - t[i]) ** 2 for i in range(len(s))) / len(s)
    return alpha * to_labels + (1 - alpha) * to_teacher


@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_the_regression_output_loss_and_its_gradient_equal_a_float64_reference(batch, alpha):
    generator = torch.Generator().manual_seed(batch)
    student = torch.randn(batch, 1, dtype=torch.float64, generator=generator, requires_grad=True)
    teacher = torch.randn(batch, 1, dtype=torch.float64, generator=generator)
    labels = torch.rand(batch, dtype=torch.float64, generator=generator) * 5
    loss = regression_kd_loss(student, teacher, labels, alpha)
    (grad,) = torch.autograd.grad(loss, student)
    reference_student = student.detach().clone().requires_grad_(True)
    expected = regression_reference(reference_student, teacher, labels, alpha)
    (expected_grad,) = torch.autograd.grad(expected, reference_student)
    assert loss.dtype == torch.float64 and float(loss) == pytest.approx(float(expected), rel=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    # the task's output loss is it for one output, whatever the temperature
    task_loss = get_task("sequence_classification").output_loss(
        student, teacher, {"labels": labels}, temperature=4.0, alpha=alpha
    )
    assert float(task_loss) == pytest.approx(float(expected), rel=1e-12)
    # without labels: the teacher term alone
    alone = regression_kd_loss(student, teacher)
    assert float(alone) == pytest.approx(float(regression_reference(student, teacher, labels, 0.0)))


def test_the_regression_output_loss_takes_bf16_scores_in_float32():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(6, 1, generator=generator).bfloat16().requires_grad_(True)
    teacher = torch.randn(6, 1, generator=generator).bfloat16()
    labels = torch.rand(6, generator=generator)
    loss = regression_kd_loss(student, teacher, labels, 0.3)
    assert loss.dtype == torch.float32
    expected = regression_reference(student.detach(), teacher, labels, 0.3)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    s, t, y = (v.double().reshape(-1) for v in (student.detach(), teacher, labels))
    expected_grad = (0.3 * 2 * (s - y) + 0.7 * 2 * (s - t)) / 6
    torch.testing.assert_close(student.grad.double().reshape(-1), expected_grad, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match=r"student and teacher scores differ in shape"):
        regression_kd_loss(student, torch.zeros(6, 2))


# ---------------------------------------------------------------------------------------------- regression


@pytest.fixture(scope="module")
def regression_task(tmp_path_factory, offline):
    """A tiny BERT teacher with one output and CSVs of float scores (STS-B's kind of labels)."""
    task = make_text_task(tmp_path_factory.mktemp("regression"), num_labels=1)
    rng = np.random.default_rng(0)
    for key in ("train_file", "validation_file"):
        frame = pd.read_csv(task[key])
        frame["label"] = frame["label"] * 4 + rng.uniform(0, 1, len(frame))
        frame.to_csv(task[key], index=False)
    task["test_file"] = f"{task['dir']}/test.csv"
    pd.read_csv(task["validation_file"]).head(12).to_csv(task["test_file"], index=False)
    return task


def test_a_regression_head_distils_end_to_end(regression_task, tmp_path):
    """``num_labels=1`` with float labels: the run trains on the regression output loss, follows val/pearson,
    and reports Pearson and Spearman on validation and test, the test scores as scipy computes them on the
    exported student's predictions."""
    task = regression_task
    overrides = [
        *task["overrides"], *BASE, "optimized_metric=val/pearson", "optimized_mode=max",
        f"data.dataset.test_file='{task['test_file']}'",
    ]  # fmt: skip
    metrics = train(compose_config(overrides, tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(metrics) == {"val/pearson", "val/spearman", "val/teacher_pearson", "val/teacher_spearman"}
    assert results["optimized_metric"] == "pearson" and results["higher_is_better"]["spearman"] is True
    assert results["test"]["examples"] == 12
    frame = pd.read_csv(task["test_file"])
    tokenizer = AutoTokenizer.from_pretrained(task["teacher"])
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    assert student.config.num_labels == 1
    with torch.no_grad():
        encoded = tokenizer(list(frame["text"]), padding=True, return_tensors="pt")
        predicted = student(**encoded).logits[:, 0].double().numpy()
    expected = {
        "pearson": stats.pearsonr(predicted, frame["label"])[0],
        "spearman": stats.spearmanr(predicted, frame["label"])[0],
    }
    # torchmetrics accumulates Pearson's moments in float32 over the batches; a tiny random student's scores
    # spread little, so the correlation carries a few float32 roundings more than scipy's float64
    assert results["test"]["student"] == pytest.approx(expected, rel=1e-3)


def test_a_regression_teacher_needs_a_regression_metric_before_training(regression_task, tmp_path):
    """The default optimized_metric (val/acc) is no metric of a one-output head: refused once the teacher is
    loaded, naming the metrics to choose, before any data is read or anything trains."""
    with pytest.raises(ValueError, match=r"optimized_metric=val/acc .*regression head.*val/pearson"):
        train(compose_config([*regression_task["overrides"], *BASE], tmp_path))
    assert not (tmp_path / "checkpoints").exists()


def test_float_labels_still_need_a_regression_teacher(run, tmp_path):
    """A classifier teacher (two outputs) with float labels: the error names the way to regression."""
    task, _, _ = run
    files = {}
    for key in ("train_file", "validation_file"):
        frame = pd.read_csv(task[key])
        frame["label"] = frame["label"] + 0.5
        files[key] = tmp_path / f"{key}.csv"
        frame.to_csv(files[key], index=False)
    overrides = [
        *task["overrides"], *BASE, f"data.dataset.train_file='{files['train_file']}'",
        f"data.dataset.validation_file='{files['validation_file']}'",
    ]  # fmt: skip
    with pytest.raises(ValueError, match=r"regression scores \(STS-B\) need a teacher with one output"):
        train(compose_config(overrides, tmp_path / "out"))


def test_test_labels_unknown_to_the_train_split_are_refused(run, tmp_path):
    task, _, _ = run
    frame = pd.read_csv(task["test_file"])
    frame.loc[0, "label"] = 7
    frame.to_csv(tmp_path / "test.csv", index=False)
    overrides = [*task["overrides"], *BASE, f"data.dataset.test_file='{tmp_path / 'test.csv'}'"]
    with pytest.raises(ValueError, match=r"test labels \[7\] of data.label_column='label' do not occur"):
        train(compose_config(overrides, tmp_path / "out"))


@pytest.mark.parametrize(
    ("labels", "predictions"),
    [([0, 1, 1, 0, 1, 0], [0, 0, 0, 0, 0, 0]), ([1, 1, 1, 1], [1, 1, 0, 1]), ([2, 2, 2], [2, 2, 2])],
    ids=["constant-answer", "one-class-labels", "one-class-everything"],
)
def test_mcc_is_zero_where_it_is_undefined(labels, predictions):
    """A zero denominator (one predicted class, or one labelled class): 0, not torchmetrics' smoothed value
    (about -0.13 for the constant answer here)."""
    task = get_task("sequence_classification")
    metrics = task.metrics("", 3)
    logits = torch.nn.functional.one_hot(torch.tensor(predictions), 3).float()
    task.update(metrics, logits, {"labels": torch.tensor(labels)})
    assert float(metrics.compute()["mcc"]) == matthews_corrcoef(labels, predictions) == 0.0


# ---------------------------------------------------------------------------------------------- the data


def test_the_data_modules_take_a_test_split_whole_and_in_order(tmp_path, monkeypatch):
    """A ``test`` split (from ``local_files(test_file=)``, ``hub_dataset(test_split=)`` or one's own
    DatasetDict) is tokenized like validation, never subsampled, batched in order; a masked-LM test split is
    masked once, the same on every load. Without one, asking for it names the keys that give it."""
    from datasets import DatasetDict

    from distill_lab.data import TextClassificationData, build_word_tokenizer, hub_dataset, local_files
    from distill_lab.data_lm import LanguageModelingData

    tokenizer = build_word_tokenizer()
    splits = synthetic_relations(num_train=16, num_validation=8, seed=0)
    held_out = synthetic_relations(num_train=10, num_validation=1, seed=3)["train"]
    for name, split in (*splits.items(), ("test", held_out)):
        split.to_pandas()[["text", "label"]].to_csv(tmp_path / f"{name}.csv", index=False)
    loaded = local_files(tmp_path / "train.csv", tmp_path / "validation.csv", tmp_path / "test.csv")
    assert list(loaded) == ["train", "validation", "test"] and loaded["test"]["text"] == held_out["text"]
    monkeypatch.setattr(
        "distill_lab.data.load_dataset", lambda *a, **k: DatasetDict(**splits, heldout=held_out)
    )
    assert hub_dataset("org/set", test_split="heldout")["test"]["text"] == held_out["text"]
    with pytest.raises(ValueError, match=r"no split 'dev'.*set data\.dataset\.test_split"):
        hub_dataset("org/set", test_split="dev")

    data = TextClassificationData(loaded, tokenizer, batch_size=4, max_eval_samples=2)
    assert data.has_test
    rows = [batch for batch in data.test_dataloader()]
    assert [len(b["labels"]) for b in rows] == [4, 4, 2]  # all 10, in order, not max_eval_samples' 2
    assert torch.cat([b["labels"] for b in rows]).tolist() == held_out["label"]
    assert data.example_batch("test", 3)["input_ids"].shape[0] == 3

    text = DatasetDict({k: v.select_columns(["text"]) for k, v in loaded.items()})
    masks = []
    for _ in range(2):
        lm = LanguageModelingData(text, tokenizer, mlm=True, max_length=16, batch_size=4, seed=1)
        masks.append(torch.cat([b["labels"].flatten() for b in lm.test_dataloader()]))
    assert torch.equal(masks[0], masks[1]) and (masks[0] != -100).any() and (masks[0] == -100).any()

    plain = TextClassificationData(splits, tokenizer)
    assert not plain.has_test
    with pytest.raises(ValueError, match=r"no 'test' split: set data\.dataset\.test_file"):
        plain.test_dataloader()


def test_a_test_split_under_fsdp_is_refused_before_training(run, tmp_path):
    """FSDP cannot run the second evaluation of the sharded module that scores a test split: the config is
    refused before anything loads, naming the key and the way round it."""
    task, _, _ = run
    overrides = [
        *task["overrides"], *BASE, "trainer=fsdp", f"data.dataset.test_file='{task['validation_file']}'",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="data.dataset.test_file with trainer=fsdp is not supported: score"):
        train(compose_config(overrides, tmp_path / "out"))
    assert not (tmp_path / "out" / "checkpoints").exists()
