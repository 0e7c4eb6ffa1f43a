"""The exported student's model card and the upload to the hub: the card's content built from a run's record,
a tiny run end to end that writes ``student/README.md`` and uploads ``student/`` (``huggingface_hub``'s
``HfApi`` replaced at its methods, so nothing leaves the machine), and the configuration errors of the upload
before anything trains.
"""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from conftest import compose_config, make_text_task
from huggingface_hub import ModelCard

import distill_lab
from distill_lab.model_card import card_text, hub_id
from distill_lab.run import train

pytestmark = pytest.mark.usefixtures("torch_single_thread")
BASE = ["student=from_teacher", "student.num_layers=2", "debug=fast", "logger=csv", "fused_kernel=false"]
PUSH = ["export.push_to_hub=true", "export.hub_model_id=someone/tiny-student"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A 4-layer BERT teacher and its CSVs, with the hub and wandb offline."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("WANDB_MODE", "offline")
        yield make_text_task(tmp_path_factory.mktemp("task"))


@pytest.fixture
def uploads(monkeypatch):
    """``HfApi.create_repo`` and ``upload_folder`` replaced by recorders: the calls' arguments, and the files
    the folder held when it was uploaded."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        files = sorted(p.name for p in Path(kwargs["folder_path"]).iterdir())
        calls.append(("upload_folder", {**kwargs, "files": files}))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    return calls


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


RESULTS = {
    "task": "sequence_classification",
    "student": {"acc": 0.875, "f1": 0.8125},
    "teacher": {"acc": 0.9375, "f1": 0.9},
    "higher_is_better": {"acc": True, "f1": True},
    "parameters": {"teacher": 4_000_000, "student": 1_000_000, "compression": 4.0},
    "layer_map": [[5, 2], [11, 5]],
    "selected_heads": None,
    "trained_steps": 1200,
}
CONFIG = {
    "teacher": {"name_or_path": "textattack/bert-base-uncased-SST-2"},
    "data": {
        "dataset": {
            "_target_": "distill_lab.data.hub_dataset",
            "_partial_": True,
            "path": "glue",
            "name": "sst2",
        },
        "max_train_samples": 2000,
    },
    "loss": {"_target_": "distill_lab.losses.AttentionLoss", "name": "kl", "temperature": 1.0},
    "matching": {"_target_": "distill_lab.matching.Headwise"},
    "attention_weight": 0.3,
    "alpha": 0.25,
    "temperature": 3.0,
    "layer_map": "uniform",
}


def test_the_card_names_teacher_objective_layer_pairs_metrics_command_and_version():
    command = ["experiment=sst2_tinybert", "alpha=0.25"]
    text = card_text(RESULTS, CONFIG, layers={"teacher": 12, "student": 6}, command=command, version="1.2.3")
    meta = front_matter(text)
    assert meta["library_name"] == "transformers"
    assert {"distillation", "knowledge-distillation", "distill-lab"} <= set(meta["tags"])
    assert meta["base_model"] == "textattack/bert-base-uncased-SST-2"
    assert meta["pipeline_tag"] == "text-classification" and meta["datasets"] == ["glue"]
    assert ModelCard(text).data.base_model == meta["base_model"]  # the hub's own parser reads it alike
    body = text.split("---\n", 2)[2]
    assert "**Base (teacher):** textattack/bert-base-uncased-SST-2" in body
    assert (
        "12 layers, 4,000,000 parameters" in body and "6 layers, 1,000,000 parameters (4.00x fewer)" in body
    )
    assert "`hub_dataset` (path=glue, name=sst2); max_train_samples=2000" in body
    rows = (
        "| attention_weight | 0.3 |", "| alpha | 0.25 |", "| temperature | 3.0 |", "| layer_map | uniform |",
        "| loss | kl (temperature=1.0) |", "| matching | headwise |",
    )  # fmt: skip
    for row in rows:
        assert row in body, row
    assert "| layer pairs | teacher 5 -> student 2, teacher 11 -> student 5 |" in body
    assert (
        "| acc (higher is better) | 0.9375 | 0.8750 |" in body
        and "| f1 (higher is better) | 0.9000 |" in body
    )
    assert "after 1200 optimizer steps" in body
    assert "python train.py experiment=sst2_tinybert alpha=0.25" in body
    assert "distill_lab version: 1.2.3" in body
    assert 'AutoModelForSequenceClassification.from_pretrained("path/to/student")' in body


def test_a_local_teacher_and_local_data_give_no_hub_ids_and_no_paths(tmp_path):
    """A teacher saved on disk is no base model on the hub; the card names local files, never their paths."""
    (tmp_path / "teacher").mkdir()
    config = CONFIG | {
        "teacher": {"name_or_path": str(tmp_path / "teacher")},
        "data": {"dataset": {"_target_": "distill_lab.data.local_files", "train_file": "/home/me/train.csv"}},
    }
    results = RESULTS | {"task": "causal_lm"}
    text = card_text(results, config, layers={"teacher": 4, "student": 2}, command=None, version="0")
    meta = front_matter(text)
    assert "base_model" not in meta and "datasets" not in meta and meta["pipeline_tag"] == "text-generation"
    assert "a local model (`teacher`)" in text and "train_file=train.csv" in text and "/home/me" not in text
    assert "`distill_lab.run.train(cfg)` from Python" in text
    assert hub_id("bert-base-uncased") == "bert-base-uncased" and hub_id(str(tmp_path / "teacher")) is None


def test_a_run_writes_the_card_and_uploads_the_student(task, tmp_path, monkeypatch, uploads):
    """A tiny run end to end: ``student/README.md`` reports what ``results.json`` records, and with
    ``export.push_to_hub=true`` the student folder, card included, is uploaded to the named model repo."""
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    out = tmp_path / "run"
    train(compose_config([*task["overrides"], *BASE, *PUSH], out))
    results = json.loads((out / "results.json").read_text())
    text = (out / "student" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "transformers" and "distillation" in meta["tags"]
    assert "base_model" not in meta  # the tiny teacher is a local directory
    pairs = ", ".join(f"teacher {t} -> student {s}" for t, s in results["layer_map"])
    assert f"| layer pairs | {pairs} |" in text and pairs == "teacher 1 -> student 0, teacher 3 -> student 1"
    assert (
        f"| acc (higher is better) | {results['teacher']['acc']:.4f} | {results['student']['acc']:.4f} |"
        in text
    )
    assert "4 layers" in text and "2 layers" in text and f"{results['parameters']['student']:,}" in text
    assert f"distill_lab version: {distill_lab.__version__}" in text
    assert 'AutoModelForSequenceClassification.from_pretrained("someone/tiny-student")' in text
    assert [name for name, _ in uploads] == ["create_repo", "upload_folder"]
    created, uploaded = uploads[0][1], uploads[1][1]
    assert created["repo_id"] == "someone/tiny-student" and created["repo_type"] == "model"
    assert uploaded["repo_id"] == "someone/tiny-student" and uploaded["repo_type"] == "model"
    assert uploaded["folder_path"] == str(out / "student")
    assert {"README.md", "config.json", "model.safetensors"} <= set(uploaded["files"])


@pytest.mark.parametrize(
    ("overrides", "token", "message"),
    [
        (PUSH, None, r"export\.push_to_hub=true, but no Hugging Face token is set: set HF_TOKEN"),
        (["export.push_to_hub=true"], "hf_x", r"export\.push_to_hub=true needs .*export\.hub_model_id="),
        ([*PUSH, "export.hub_model_id=not/a/repo"], "hf_x", r"export\.hub_model_id=not/a/repo is no hub"),
    ],
    ids=["no-token", "no-repo", "bad-repo"],
)
def test_push_to_hub_settings_that_cannot_upload_fail_before_training(
    task, tmp_path, monkeypatch, uploads, overrides, token, message
):
    """No token (neither HF_TOKEN nor a saved login), no repository or an invalid one: the run stops before
    the teacher loads, not after training, and nothing is uploaded."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # no `hf auth login` either
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(compose_config([*task["overrides"], *BASE, *overrides], out))
    assert not (out / "checkpoints").exists() and not (out / "student").exists() and uploads == []


def test_the_model_index_holds_the_students_validation_and_test_scores():
    """The front matter's ``model-index`` (the hub's form: task type, dataset name/type/config/split, metric
    type/value) holds each student score, validation and held-out test, and reads back through
    ``huggingface_hub``'s own parsers (``ModelCard``, ``metadata_load``)."""
    from huggingface_hub import metadata_load

    results = RESULTS | {
        "student": {"acc": 0.875, "f1": 0.8125, "mcc": float("nan")},  # not finite: left out
        "test": {"student": {"acc": 0.8, "mcc": 0.6}, "teacher": {"acc": 0.9, "mcc": 0.7}, "examples": 872},
    }
    config = CONFIG | {
        "data": {**CONFIG["data"], "dataset": {**CONFIG["data"]["dataset"], "test_split": "test"}}
    }
    config["data"]["dataset"]["validation_split"] = "validation"
    text = card_text(
        results, config, layers={"teacher": 12, "student": 6}, command=[], version="1", repo_id="me/tiny"
    )
    (index,) = front_matter(text)["model-index"]
    assert index["name"] == "tiny"
    # the hub groups the metrics of one task and dataset split into one result
    found = {
        (r["dataset"]["split"], m["type"]): (m["value"], r) for r in index["results"] for m in r["metrics"]
    }
    assert set(found) == {
        ("validation", "accuracy"),
        ("validation", "f1"),
        ("test", "accuracy"),
        ("test", "matthews_correlation"),
    }
    assert found["validation", "accuracy"][0] == 0.875 and found["test", "matthews_correlation"][0] == 0.6
    result = found["test", "accuracy"][1]
    assert result["task"] == {"type": "text-classification"}
    assert result["dataset"] == {"name": "glue (sst2)", "type": "glue", "config": "sst2", "split": "test"}
    parsed = ModelCard(text).data.eval_results
    assert len(parsed) == 4 and {(r.dataset_split, r.metric_type, r.metric_value) for r in parsed} == {
        ("validation", "accuracy", 0.875), ("validation", "f1", 0.8125), ("test", "accuracy", 0.8),
        ("test", "matthews_correlation", 0.6),
    }  # fmt: skip
    assert metadata_load_from(text, metadata_load)["model-index"][0]["name"] == "tiny"
    assert "| held-out test | teacher | student |" in text and "| mcc | 0.7000 | 0.6000 |" in text
    assert "(872 examples)" in text


def metadata_load_from(text: str, metadata_load) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "README.md"
        path.write_text(text)
        return metadata_load(path)


def test_local_data_is_named_by_its_files_in_the_model_index():
    config = CONFIG | {
        "data": {
            "dataset": {"_target_": "distill_lab.data.local_files", "validation_file": "/home/me/dev.csv"}
        }
    }
    text = card_text(RESULTS, config, layers={"teacher": 4, "student": 2}, command=None, version="0")
    (index,) = front_matter(text)["model-index"]
    assert index["name"] == "distill-lab-student" and "/home/me" not in text
    dataset = index["results"][0]["dataset"]
    assert dataset == {"name": "dev.csv", "type": "local_files", "split": "validation"}
