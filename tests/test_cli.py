"""The real command line in subprocesses: ``python train.py loss=kl matching=headwise`` with wandb (offline,
its run file read back), a Hydra multirun summarised by ``python -m distill_lab.summarize``, wrong overrides,
and Ctrl-C followed by ``ckpt_path=...``.

Every run points the app at a tiny random teacher and a small CSV task (``conftest.make_text_task``) and uses
``debug=fast``, so a run takes seconds; the subprocesses start Python, torch and transformers, hence ``slow``.
"""

from __future__ import annotations

import csv
import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TrainRun, app_env, make_text_task, run_to_end, train_py
from transformers import AutoModelForSequenceClassification

pytestmark = pytest.mark.slow

FAST = ["debug=fast", "student=from_teacher", "student.num_layers=2"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return make_text_task(tmp_path_factory.mktemp("cli-task"))


def cli(
    tmp_path: Path, *args: str, module: str | None = None, timeout: float = 600, fails: bool = False
) -> subprocess.CompletedProcess:
    """``python train.py *args``, or ``python -m module *args``, through ``run_to_end`` with the app's
    environment kept in ``tmp_path``."""
    command = [sys.executable, "-m", module, *args] if module else train_py(*args)
    return run_to_end(command, app_env(tmp_path), timeout=timeout, fails=fails)


def read_wandb_history(run_file: Path) -> list[dict]:
    """The history rows (``wandb.log`` calls) of an offline run file.

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each with a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last); the payloads are ``wandb_internal_pb2.Record``.
    """
    from wandb.proto import wandb_internal_pb2

    data = run_file.read_bytes()
    magic, version, _ = struct.unpack("<4sHB", data[:7])
    assert magic == b":W&B", f"{run_file} is not a wandb run file"
    block, offset, pending, payloads = 32768, 7, b"", []
    while offset + 7 <= len(data):
        if block - offset % block < 7:  # a block's tail too short for a header is padding
            offset += block - offset % block
            continue
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if kind == 0 and length == 0:
            offset += block - offset % block
            continue
        chunk = data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            payloads.append(pending)
    rows = []
    for payload in payloads:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    "/".join(item.nested_key) or item.key: json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


# ----------------------------------------------------------------------------------------- the README command


def test_cli_kl_headwise_with_offline_wandb(task, tmp_path):
    run_dir = tmp_path / "run"
    proc = cli(
        tmp_path, "loss=kl", "matching=headwise", *task["overrides"], *FAST, f"hydra.run.dir={run_dir}"
    )
    output = proc.stdout + proc.stderr
    assert (
        "in eval mode at the start of training" not in output
    )  # the frozen teacher's eval mode is on purpose

    # the run directory: Hydra's record, the resolved config, results, checkpoint, export, attention maps
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "loss=kl" in overrides and "matching=headwise" in overrides
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["loss"]["_target_"].endswith("AttentionLoss") and config["loss"]["name"] == "kl"
    assert config["matching"]["_target_"].endswith("Headwise")
    results = json.loads((run_dir / "results.json").read_text())
    assert set(results["attention_loss"]) >= {"L1->0", "L3->1"}
    assert {"acc", "f1"} <= set(results["student"]) and {"acc", "f1"} <= set(results["teacher"])
    assert Path(results["best_checkpoint"]).exists()
    student = AutoModelForSequenceClassification.from_pretrained(run_dir / "student")
    assert student.config.num_hidden_layers == 2
    assert sorted(p.name for p in (run_dir / "attention_maps").glob("*.png")) == ["epoch0-step4.png"]
    assert "distillation result" in output and "compression" in output

    # wandb ran offline (no key), said how to upload, and its run file holds the per-layer and per-head keys
    assert "wandb sync" in output
    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    history = read_wandb_history(run_files[0])
    keys = {k for row in history for k in row}
    expected = {"train/loss", "train/output_loss", "train/attention_loss", "val/acc", "val/f1"}
    expected |= {f"train/attention/{pair}" for pair in ("L1->0", "L3->1")}
    expected |= {f"train/attention/{pair}/h{h}" for pair in ("L1->0", "L3->1") for h in range(4)}
    assert expected <= keys, sorted(expected - keys)
    steps = [row for row in history if "train/loss" in row]
    assert len(steps) == 4  # debug=fast: four training steps, each logged
    for row in steps:  # the pair keys are the attention loss's parts: it is their mean
        pairs = [row[f"train/attention/{p}"] for p in ("L1->0", "L3->1")]
        assert row["train/attention_loss"] == pytest.approx(sum(pairs) / 2, rel=1e-5)
        heads = [row[f"train/attention/L1->0/h{h}"] for h in range(4)]
        assert row["train/attention/L1->0"] == pytest.approx(sum(heads) / 4, rel=1e-5)
        assert row["train/loss"] == pytest.approx(
            0.7 * row["train/output_loss"] + 0.3 * row["train/attention_loss"], rel=1e-5
        )
    # the attention-map image is logged at the step of the validation that drew it
    (validation,) = [row["trainer/global_step"] for row in history if "val/acc" in row]
    (image,) = [row["trainer/global_step"] for row in history if "attention_maps/filenames" in row]
    assert image == validation


# ---------------------------------------------------------------------------------------------- sweeps


def test_multirun_sweep_and_summary(task, tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = (
        "-m", "loss=mse,kl", "matching=layerwise,global", *task["overrides"], *FAST, "logger=csv",
        "callbacks.attention_maps=null", f"hydra.sweep.dir={sweep_dir}",
    )  # fmt: skip
    cli(tmp_path, *command)
    runs = sorted(p.parent for p in sweep_dir.glob("*/results.json"))
    assert [p.name for p in runs] == ["0", "1", "2", "3"]
    combos = {tuple(yaml.safe_load((p / ".hydra" / "overrides.yaml").read_text())[:2]) for p in runs}
    assert combos == {
        (f"loss={loss}", f"matching={m}") for loss in ("mse", "kl") for m in ("layerwise", "global")
    }
    for run in runs:  # each combination trained its own student, with the loss it was given
        config = yaml.safe_load((run / "config.yaml").read_text())
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        assert f"loss={config['loss']['name']}" in overrides

    summary = cli(tmp_path, str(sweep_dir), module="distill_lab.summarize")
    table = [line for line in summary.stdout.splitlines() if line.startswith("|")]
    assert table[0].startswith("| run | loss | matching |") and len(table) == 2 + 4
    accuracies = {}
    for run in runs:
        results = json.loads((run / "results.json").read_text())
        accuracies[run.name] = results["student"]["acc"]
        row = next(line for line in table[2:] if line.startswith(f"| {run.name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[3]) == pytest.approx(results["student"]["acc"], abs=1e-4)
        assert float(cells[5]) == pytest.approx(results["gap"]["acc"], abs=1e-4)
    order = [line.split("|")[1].strip() for line in table[2:]]
    assert [accuracies[r] for r in order] == sorted(accuracies.values(), reverse=True)  # best first
    assert (sweep_dir / "summary.md").exists() and (sweep_dir / "summary.png").stat().st_size > 1000

    # the sweep interrupted in its last job (killed after its last checkpoint, before results.json), then
    # rerun: the finished jobs are not trained again (their files untouched), the last one resumes and
    # finishes
    last = json.loads((runs[3] / "results.json").read_text())
    (runs[3] / "results.json").unlink()
    stamps = {  # what the runs wrote (Hydra rewrites .hydra/ and appends to train.log in a job's directory)
        p: p.stat().st_mtime_ns
        for run in runs[:3] for p in run.rglob("*")
        if p.is_file() and ".hydra" not in p.parts and p.name != "train.log"
    }  # fmt: skip
    rerun = cli(tmp_path, *command)
    log = rerun.stdout + rerun.stderr
    assert log.count("its results are reused, nothing is trained") == 3
    assert f"resuming from {runs[3] / 'checkpoints'}" in log
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((runs[3] / "results.json").read_text())
    assert again["student"] == pytest.approx(last["student"]) and again["teacher"] == pytest.approx(
        last["teacher"]
    )


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["loss=huber"], r"Could not find 'loss/huber'.*Available options.*cosine.*kl.*mse"),
        (["layer_map=[[9,0],[3,1]]"], r"teacher layer 9 does not exist.*0\.\.3"),
        (
            ["data.text_column=sentence"],
            r"data\.text_column='sentence' not in train split; available columns: \['text', 'label'\]",
        ),
    ],
    ids=["unknown-loss", "missing-layer", "missing-column"],
)
def test_cli_errors_name_the_key_before_training(task, tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    args = [*task["overrides"], *FAST, "logger=csv", *overrides, f"hydra.run.dir={run_dir}"]
    proc = cli(tmp_path, *args, timeout=300, fails=True)
    assert re.search(message, proc.stderr, re.S), proc.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists()


# ------------------------------------------------------------------------------------------ Ctrl-C and resume


def test_ctrl_c_leaves_a_checkpoint_that_resumes(task, tmp_path):
    """SIGINT mid-training: Lightning stops gracefully, ``interrupted.ckpt`` holds the state at that step,
    and ``ckpt_path=`` continues from it to the configured end.

    Every step is logged (``log_every_n_steps=1``): the resumed run trains 9 to 16 steps, and Lightning logs
    a step when its count of stepped batches + 1 is a multiple of ``log_every_n_steps``; a run resumed in the
    middle of a step also counts the repeated batch once more. With the default of 10, an interruption during
    step 39 (or 79...) resumed into steps 39-47, counted 41-49, and logged none of them.
    """
    first = tmp_path / "first"
    long_run = [
        *task["overrides"],
        "student=from_teacher",
        "student.num_layers=2",
        "logger=csv",
        "data.batch_size=8",
        "trainer.max_epochs=200",
        "trainer.num_sanity_val_steps=0",
        "trainer.log_every_n_steps=1",
        "callbacks.attention_maps=null",
        "callbacks.last_checkpoint.every_n_train_steps=5",
    ]
    run = TrainRun(
        train_py(*long_run, f"hydra.run.dir={first}"), env=app_env(tmp_path), log=tmp_path / "first.log"
    )
    run.wait_for_checkpoint(min_step=5, last=first / "checkpoints" / "last.ckpt")
    assert run.process.poll() is None, "the run ended before it could be interrupted"
    run.interrupt()
    returncode, output = run.wait(120), run.output()
    assert returncode != 0 and "KeyboardInterrupt" in output, output[-3000:]
    assert not (first / "results.json").exists()  # an interrupted run reports nothing as final

    interrupted = first / "checkpoints" / "interrupted.ckpt"
    state = torch.load(interrupted, map_location="cpu", weights_only=False)
    step = state["global_step"]
    assert 5 <= step < 200 * 8
    assert not any(k.startswith("teacher.") for k in state["state_dict"])
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())

    # resume to the end of the epoch after the interrupted one
    epochs = step // 8 + 2
    second = tmp_path / "second"
    cli(
        tmp_path,
        *long_run,
        f"trainer.max_epochs={epochs}",
        f"ckpt_path='{interrupted}'",
        f"hydra.run.dir={second}",
    )
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == epochs * 8  # the configured end, counted from the interrupted step on
    metrics_csv = (second / "csv" / "version_0" / "metrics.csv").read_text()
    logged = [int(row["step"]) for row in csv.DictReader(metrics_csv.splitlines()) if row.get("train/loss")]
    # the second run did not start again from step 0, and logged each step it trained once
    assert logged and min(logged) >= step, (
        f"interrupted at step {step}, resumed to {epochs * 8}:\n{metrics_csv[:2000]}"
    )
    assert len(logged) == len(set(logged)) == epochs * 8 - step, metrics_csv[:2000]
    results = json.loads((second / "results.json").read_text())  # the resumed run finished and reported
    assert (
        Path(results["best_checkpoint"]).parent == second / "checkpoints"
        and 0.0 <= results["student"]["acc"] <= 1.0
    )


def test_parallel_launcher_and_optuna_search(task, tmp_path):
    """launcher=joblib runs a sweep's jobs in worker processes; hparams_search=optuna samples the objective's
    weights and records the best trial, fed by the value train.py returns."""
    common = [*task["overrides"], *FAST, "logger=csv", "callbacks.attention_maps=null"]
    parallel = tmp_path / "parallel"
    proc = cli(tmp_path, "-m", "launcher=joblib", "loss=mse,kl", *common, f"hydra.sweep.dir={parallel}")
    assert "Joblib" in proc.stdout + proc.stderr
    assert sorted(p.parent.name for p in parallel.glob("*/results.json")) == ["0", "1"]

    search = tmp_path / "search"
    cli(
        tmp_path,
        "-m",
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.sampler.n_startup_trials=3",
        *common,
        f"hydra.sweep.dir={search}",
    )
    trials = sorted(search.glob("*/results.json"))
    assert len(trials) == 3
    sampled = [yaml.safe_load((p.parent / "config.yaml").read_text()) for p in trials]
    assert len({c["attention_weight"] for c in sampled}) == 3 and all(
        0.0 <= c["attention_weight"] <= 0.9 for c in sampled
    )
    best = yaml.safe_load((search / "optimization_results.yaml").read_text())
    accuracies = [json.loads(p.read_text())["student"]["acc"] for p in trials]
    assert best["best_value"] == pytest.approx(max(accuracies), abs=1e-6)
    assert set(best["best_params"]) == {"attention_weight", "temperature", "alpha"}
