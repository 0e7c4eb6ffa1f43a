"""The distillation recipes (``experiment=tinybert_general``, ``tinybert_task``, ``minilm``, ``minilmv2``) run
offline end to end in a smoke run (``debug=fast``), each distilling what its method distils; and the two
stages of TinyBERT's task distillation (``distill_lab.stages``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from conftest import compose_config
from lightning.pytorch.utilities.parsing import AttributeDict

from distill_lab.builtin import builtin_for_task, train_builtin_teacher
from distill_lab.run import train
from distill_lab.stages import TwoStageDistillation


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """The built-in teachers of the masked-LM and classification tasks, trained for one epoch (a smoke run
    needs a teacher, not a good one), where the recipes' ``teacher=builtin`` finds them."""
    root = tmp_path_factory.mktemp("recipes-cache")
    for task in ("masked_lm", "sequence_classification"):
        train_builtin_teacher(
            builtin_for_task(task), root / f"builtin-{task}-v2", max_epochs=1, target=None, attempts=1
        )
    return root


def run_recipe(name: str, output_dir: Path, cache: Path, *overrides: str) -> list[dict]:
    """``python train.py experiment=<name> debug=fast`` in-process; the rows of its CSV log."""
    cfg = compose_config([f"experiment={name}", "debug=fast", "logger=csv", *overrides], output_dir, cache)
    train(cfg)
    with open(output_dir / "csv" / "version_0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def training_rows(rows: list[dict]) -> list[dict]:
    return [{k: float(v) for k, v in r.items() if v} for r in rows if r.get("train/loss")]


def columns(rows: list[dict], prefix: str) -> set[str]:
    return {c for c in rows[0] if c.startswith(prefix)}


@pytest.mark.slow
def test_tinybert_general_distils_attention_scores_hidden_states_and_embeddings(cache, tmp_path):
    """Attention-score MSE on both uniform pairs, hidden states on the embedding output and both layers
    through a projection (the student is half the teacher's width), and no output loss: the loss is the
    attention loss plus the hidden loss."""
    rows = run_recipe("tinybert_general", tmp_path / "run", cache)
    assert columns(rows, "train/hidden/") == {
        "train/hidden/L0->0",
        "train/hidden/L2->1",
        "train/hidden/L4->2",
    }
    assert columns(rows, "train/attention/L") == {"train/attention/L1->0", "train/attention/L3->1"}
    steps = training_rows(rows)
    assert len(steps) == 4
    for step in steps:
        assert step["train/loss"] == pytest.approx(step["train/attention_loss"] + step["train/hidden_loss"])
    assert all(math.isfinite(s["train/loss"]) for s in steps)


@pytest.mark.slow
def test_tinybert_task_switches_from_the_intermediate_stage_to_the_predictions(cache, tmp_path):
    """The first half of the steps train attention and hidden states with the output loss off; the second
    half the output loss alone (the soft targets: alpha 0)."""
    steps = training_rows(run_recipe("tinybert_task", tmp_path / "run", cache))
    assert [s["train/stage"] for s in steps] == [0.0, 0.0, 1.0, 1.0]  # debug=fast: 4 steps
    for step in steps[:2]:
        assert step["train/loss"] == pytest.approx(step["train/attention_loss"] + step["train/hidden_loss"])
    for step in steps[2:]:
        assert step["train/loss"] == pytest.approx(step["train/output_loss"])


@pytest.mark.slow
def test_minilm_distils_the_last_layers_attention_and_value_relation(cache, tmp_path):
    rows = run_recipe("minilm", tmp_path / "run", cache)
    assert columns(rows, "train/attention/L") == {
        "train/attention/L3->1", "train/attention/L3->1/attention", "train/attention/L3->1/vv",
    }  # fmt: skip
    for step in training_rows(rows):
        parts = step["train/attention/L3->1/attention"] + step["train/attention/L3->1/vv"]
        assert step["train/attention/L3->1"] == pytest.approx(parts, rel=1e-5)
        assert step["train/loss"] == pytest.approx(step["train/attention_loss"])  # no output loss


@pytest.mark.slow
def test_minilmv2_distils_three_relations_into_a_student_with_other_heads(cache, tmp_path):
    """The student has 2 heads and width 32, the teacher 4 heads and width 64: the relations split both
    into the teacher's 4 relation heads."""
    out = tmp_path / "run"
    rows = run_recipe("minilmv2", out, cache)
    assert columns(rows, "train/attention/L") == {
        "train/attention/L3->1", *(f"train/attention/L3->1/{k}" for k in ("qq", "kk", "vv")),
    }  # fmt: skip
    for step in training_rows(rows):
        parts = sum(step[f"train/attention/L3->1/{k}"] for k in ("qq", "kk", "vv"))
        assert step["train/attention/L3->1"] == pytest.approx(parts, rel=1e-5)
    assert '"num_attention_heads": 2' in (out / "student" / "config.json").read_text()


def test_the_intermediate_share_must_leave_both_stages_some_steps():
    for share in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="intermediate_share must be in"):
            TwoStageDistillation(share)


def test_the_stage_follows_the_optimizer_step_so_a_resumed_run_is_in_its_stage():
    """The stage is a function of the step: a run resumed at step 7 of 10 (share 0.5) is in the prediction
    stage from its first batch, with the weights set for it."""

    class Module:
        def __init__(self):
            self.hparams = AttributeDict(attention_weight=0.3, hidden_weight=2.0)
            self.logged = {}

        def log(self, name, value):
            self.logged[name] = value

    class Trainer:
        estimated_stepping_batches = 10
        global_step = 7

    module, trainer, stages = Module(), Trainer(), TwoStageDistillation(0.5)
    stages.on_fit_start(trainer, module)
    stages.on_train_batch_start(trainer, module, None, 0)
    assert (module.hparams.attention_weight, module.hparams.hidden_weight) == (0.0, 0.0)
    assert module.logged["train/stage"] == 1.0
    module, trainer.global_step = Module(), 4  # a fresh run: the intermediate stage, then the switch
    stages.on_fit_start(trainer, module)
    stages.on_train_batch_start(trainer, module, None, 0)
    assert (module.hparams.attention_weight, module.hparams.hidden_weight) == (1.0, 2.0)
    assert module.logged["train/stage"] == 0.0
    trainer.global_step = 5
    stages.on_train_batch_start(trainer, module, None, 5)
    assert (module.hparams.attention_weight, module.hparams.hidden_weight) == (0.0, 0.0)
