"""The app in process: every config option composes and instantiates, and ``distill_lab.run.train(cfg)`` on a
tiny random teacher (saved by path) for every loss and matching mode, the exported student, the frozen
teacher, causal teachers (LLaMA with grouped-query attention, GPT-2), errors before training, and resuming.

Runs use ``debug=fast`` (4 training steps on batches of 8) and ``logger=csv``. They also set
``fused_kernel=false`` so that the block-wise PyTorch path is what they test on any machine (on a GPU
``fused_kernel=null`` would take the Triton kernel, which ``test_kernels.py`` checks against that path).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import shutil
from pathlib import Path

import datasets
import lightning as L
import pytest
import torch
import yaml
from conftest import CONF_DIR, FSDP_ON_CPU, compose_config, make_image_task, make_text_task, make_tiny_model
from hydra.errors import InstantiationException, MissingConfigException
from hydra.utils import get_class, instantiate
from omegaconf import OmegaConf
from transformers import AutoImageProcessor, AutoModelForSequenceClassification, AutoTokenizer

from distill_lab.attention import AttentionDistillationLoss
from distill_lab.data import TextClassificationData, build_word_tokenizer
from distill_lab.data_images import ImageFolderData
from distill_lab.data_lm import LanguageModelingData
from distill_lab.hidden import HiddenStateLoss
from distill_lab.losses import AttentionLoss
from distill_lab.matching import MATCHING_MODES
from distill_lab.models import load_tokenizer
from distill_lab.records import QueryKey
from distill_lab.run import _build_logger, train
from distill_lab.tasks import TASKS

pytestmark = pytest.mark.usefixtures("torch_single_thread", "offline")

# every option of every config group, discovered from conf/ (an option added there is tested here)
GROUP_OPTIONS = sorted(
    (group.name, option.stem)
    for group in CONF_DIR.iterdir()
    if group.is_dir()
    for option in group.glob("*.yaml")
)
# the attention-map losses; the relation losses (loss=relation, loss=minilm) compare no maps head by head, and
# are run end to end in tests/test_relations.py and tests/test_recipes.py
RELATION_LOSSES = ("minilm", "relation")
LOSSES = sorted(o for g, o in GROUP_OPTIONS if g == "loss" and o not in RELATION_LOSSES)
MODES = sorted(o for g, o in GROUP_OPTIONS if g == "matching")
BASE = ["student=from_teacher", "student.num_layers=2", "debug=fast", "logger=csv", "fused_kernel=false"]
PAIRS = ["L1->0", "L3->1"]  # the uniform map of 4 teacher layers onto 2 student layers


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """No network, no wandb account, and the datasets cache in a temporary directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_API_KEY", raising=False)
        mp.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # read at import time
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf-datasets"))
        yield


@pytest.fixture(scope="module")
def image_task(tmp_path_factory, offline):
    """A 4-layer ViT teacher (2 labels) and image folders of horizontal and vertical stripes."""
    return make_image_task(tmp_path_factory.mktemp("image-task"))


@pytest.fixture(scope="module")
def task(tmp_path_factory, offline):
    """A 4-layer, 4-head BERT teacher (2 labels) and train/validation CSVs, shared by the module's runs."""
    return make_text_task(tmp_path_factory.mktemp("task"))


class TeacherProbe(L.Callback):
    """Records, during a real ``train(cfg)`` run, what the module's teacher and optimizer look like.

    Added through the config (``+callbacks.teacher_probe._target_=test_run.TeacherProbe``), as a user's own
    callback would be; its observations land in ``TeacherProbe.records[key]``.
    """

    records: dict[str, dict] = {}

    def __init__(self, key: str) -> None:
        self.record = TeacherProbe.records.setdefault(key, {"train": [], "validation": []})

    def on_train_start(self, trainer, module) -> None:
        optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        teacher_ids = {id(p) for p in module.teacher.parameters()}
        self.record["optimizer_tensors"] = len(optimized)
        self.record["optimizer_numel"] = sum(p.numel() for p in optimized)
        self.record["optimizer_has_teacher"] = any(id(p) in teacher_ids for p in optimized)
        self.record["student_tensors"] = len(list(module.student.parameters()))
        self.record["student_numel"] = sum(p.numel() for p in module.student.parameters())

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.record["train"].append(
            (
                module.teacher.training,
                module.student.training,
                any(p.requires_grad for p in module.teacher.parameters()),
            )
        )

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.record["validation"].append((module.teacher.training, module.student.training))

    def on_train_end(self, trainer, module) -> None:
        self.record["teacher_training_after_fit"] = module.teacher.training
        self.record["teacher_state"] = {k: v.detach().clone() for k, v in module.teacher.state_dict().items()}


def run_app(task: dict, output_dir: Path, *overrides: str) -> dict:
    """``train(cfg)`` on the task with the fast settings; returns its metrics."""
    return train(compose_config([*task["overrides"], *BASE, *overrides], output_dir))


def read_metrics_csv(output_dir: Path) -> list[dict]:
    with open(output_dir / "csv" / "version_0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def default_run(task, tmp_path_factory):
    """One run (loss=kl matching=layerwise) with the probe, shared by the export and frozen-teacher tests."""
    out = tmp_path_factory.mktemp("default-run")
    TeacherProbe.records.pop("default", None)
    metrics = run_app(
        task,
        out,
        "+callbacks.teacher_probe._target_=test_run.TeacherProbe",
        "+callbacks.teacher_probe.key=default",
    )
    return {"metrics": metrics, "out": out, "probe": TeacherProbe.records["default"]}


# ------------------------------------------------------------------------------------------ 1. config options


def _raw_leaves(node, prefix: str = "") -> dict:
    """Dotted key -> raw (unresolved) value of every leaf of a plain container."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix: node}
    leaves = {}
    for key, value in items:
        leaves.update(_raw_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return leaves


def _assert_option_applied(cfg, group: str, option: str, overridden: set[str]) -> int:
    """Every value the option file sets is what the composed config holds (raw, interpolations unresolved)."""
    path = CONF_DIR / group / f"{option}.yaml"
    text = path.read_text()
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    spec.pop("defaults", None)
    package = "" if "@package _global_" in text else group
    composed = OmegaConf.to_container(cfg, resolve=False)
    checked = 0
    for key, value in _raw_leaves(spec).items():
        full = f"{package}.{key}" if package else key
        if full in overridden or (full.startswith("hydra.") and "hydra" not in composed):
            continue  # hydra.* keys (an experiment's sweep) live in the Hydra config: checked with it
        node = composed
        for part in full.split("."):
            node = node[int(part)] if isinstance(node, list) else node[part]
        assert node == value, f"{group}={option}: {full} is {node!r}, the option file says {value!r}"
        checked += 1
    return checked


DATA_OPTIONS = sorted(o for g, o in GROUP_OPTIONS if g == "data")


@pytest.mark.parametrize("option", DATA_OPTIONS)
def test_every_data_option_takes_the_subset_and_loader_keys_as_plain_overrides(option, tmp_path):
    """``data.max_train_samples=100`` (as the README writes it) works for every data option: the keys are in
    each file (a key missing there would need ``+data.``), and its class takes them."""
    import inspect

    keys = {"max_train_samples": 100, "max_eval_samples": 20, "eval_batch_size": 16, "num_workers": 0}
    cfg = compose_config([f"data={option}", *(f"data.{k}={v}" for k, v in keys.items())], tmp_path)
    assert {k: cfg.data[k] for k in keys} == keys
    assert set(keys) <= set(inspect.signature(get_class(cfg.data._target_)).parameters)


def run_time_lengths(data) -> dict:
    """``data.max_length: null`` (the default of data options for your own and hub text) is chosen by the run
    from the teacher's positions (``run._default_max_length``), as run.py passes the tokenizer: given here."""
    return {"max_length": 64} if "max_length" in data and data.max_length is None else {}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_config_option_composes_and_instantiates(
    task, image_task, tmp_path, monkeypatch, group, option
):
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    # the built-in teacher's cache already holds a model, so teacher=builtin loads it instead of training one
    shutil.copytree(task["teacher"], cache / "builtin-sequence_classification-v2")
    fills = {  # values the option files leave to the user (???)
        "teacher.name_or_path": task["teacher"],
        "student.name_or_path": task["teacher"],
        "data.dataset.train_file": task["train_file"],
        "data.dataset.validation_file": task["validation_file"],
        "data.dataset.path": "glue",
        "data.dataset.train_dir": image_task["train_dir"],
        "data.dataset.validation_dir": image_task["validation_dir"],
    }
    overrides = [f"{group}={option}"]
    is_hydra = group == "hydra"
    cfg = compose_config(overrides, out, cache, return_hydra_config=is_hydra)
    node = cfg if is_hydra else cfg.get(group)
    missing = set(OmegaConf.missing_keys(node)) if node is not None and not is_hydra else set()  # full keys
    assert missing <= set(fills), (
        f"{group}={option} needs values the test does not know: {missing - set(fills)}"
    )
    if missing:
        overrides += [f"{k}='{fills[k]}'" for k in sorted(missing)]
        cfg = compose_config(overrides, out, cache)
    checked = _assert_option_applied(
        cfg, group, option, overridden=missing | {"paths.output_dir", "paths.cache_dir"}
    )
    if not is_hydra:
        assert cfg.paths.output_dir == str(out)
    node = cfg.hydra if is_hydra else cfg.get(group)
    tokenizer = build_word_tokenizer()

    if group == "loss" and option in RELATION_LOSSES:  # pair losses, over queries, keys and values
        loss = instantiate(node)
        assert type(loss).__name__ == {"relation": "RelationLoss", "minilm": "MiniLMLoss"}[option]
        assert cfg.layer_map == loss.layer_map == {"relation": "minilmv2", "minilm": "last"}[option]
        component = AttentionDistillationLoss(loss, layer_map=[(0, 0)])
        generator = torch.Generator().manual_seed(0)
        query, key, value = (torch.randn(2, 4, 5, 8, generator=generator) for _ in range(3))
        record, other = QueryKey(query, key, 8**-0.5, value=value), QueryKey(key, query, 8**-0.5, value=query)
        assert float(component({0: record}, {0: record})[0]) == pytest.approx(0.0, abs=1e-6)
        assert float(component({0: other}, {0: record})[0]) > 1e-3
    elif group == "loss":
        loss = instantiate(node)
        assert isinstance(loss, AttentionLoss) and loss.name == option
        probs = torch.softmax(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(0)), -1)
        other = torch.softmax(torch.randn(2, 4, 5, 5, generator=torch.Generator().manual_seed(1)), -1)
        assert float(loss(probs, probs)) == pytest.approx(0.0, abs=1e-6)
        assert float(loss(other, probs)) > 1e-3
    elif group == "hidden":  # built with the pairs and widths that run.build_module passes
        if option == "none":
            assert node is None and cfg.module.hidden_loss is None
            return
        hidden = instantiate(node, layer_map=[(0, 0), (4, 2)], student_width=16, teacher_width=32)
        assert isinstance(hidden, HiddenStateLoss) and hidden.name == option and len(hidden.projections) == 2
        states = tuple(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(i)) for i in range(5))
        same = HiddenStateLoss(option, [(0, 0), (4, 4)], 32, 32)
        assert float(same(states, states)[0]) == pytest.approx(0.0, abs=1e-6)
        assert float(same(states[::-1], states)[0]) > 1e-3
    elif group == "matching":
        matching = instantiate(node)
        assert type(matching) is MATCHING_MODES[option]
        matching.check_heads(4, 4, [(1, 0), (3, 1)])  # the tiny teacher's heads pair with an equal student
    elif group == "trainer":
        if option in ("gpu", "fsdp") and not torch.cuda.is_available():
            with pytest.raises(InstantiationException, match="No supported gpu backend"):
                instantiate(node)  # composes; only a machine without a GPU refuses it
            if option == "fsdp":  # its strategy builds without one (test_ddp.py checks its settings)
                assert type(instantiate(node.strategy)).__name__ == "FSDPStrategy"
            return
        trainer = instantiate(node)
        assert isinstance(trainer, L.Trainer)
        assert trainer.default_root_dir == str(out) and trainer.max_epochs == node.max_epochs
        assert trainer.gradient_clip_val == node.gradient_clip_val
        assert trainer.accumulate_grad_batches == node.accumulate_grad_batches
        if option == "ddp":
            assert type(trainer.strategy).__name__ == "DDPStrategy" and trainer.num_devices == 2
            assert trainer.strategy._ddp_kwargs == {"find_unused_parameters": True}
        if option == "fsdp":
            assert type(trainer.strategy).__name__ == "FSDPStrategy"
        if option == "cpu":
            assert trainer.accelerator.__class__.__name__ == "CPUAccelerator"
    elif group == "logger":
        if option == "none":
            assert node is None and _build_logger(node) is False
            return
        built = instantiate(node, offline=True) if option == "wandb" else instantiate(node)
        assert type(built) is get_class(node._target_)
        assert Path(built.save_dir) == out
        if option == "wandb":
            assert built._offline
            assert _build_logger(node)._offline  # no WANDB_API_KEY: run.py makes it offline by itself
        else:
            assert built.name == option
    elif group == "callbacks":
        callbacks = {name: instantiate(c) for name, c in node.items() if c}
        assert callbacks and all(type(c) is get_class(node[n]._target_) for n, c in callbacks.items())
        for name, callback in callbacks.items():
            if hasattr(callback, "dirpath"):
                assert Path(callback.dirpath).parent == out, name
        best = callbacks["best_checkpoint"]
        assert best.monitor == cfg.optimized_metric == "val/acc" and best.mode == "max"
    elif group == "data" and option in ("imagefolder", "synthetic_images"):
        data = instantiate(node, image_processor=AutoImageProcessor.from_pretrained(image_task["teacher"]))
        assert isinstance(data, ImageFolderData)
        data.setup("fit")
        assert data.label_names == ["horizontal", "vertical"]
        batch = next(iter(data.train_dataloader()))
        images = 24 if option == "imagefolder" else node.dataset.num_train
        assert batch["pixel_values"].shape == (min(node.batch_size, images), 3, 32, 32)
    elif group == "data" and option.startswith("lm_"):
        data = instantiate(node, tokenizer=tokenizer, **run_time_lengths(node))
        assert isinstance(data, LanguageModelingData) and data.mlm  # task=causal_lm sets data.mlm=false
        if option == "lm_hf":
            with pytest.raises(RuntimeError, match="data=local"):
                data.setup("fit")
            return
        data.setup("fit")
        batch = next(iter(data.train_dataloader()))
        masked = batch["labels"] != -100
        assert masked.any() and (batch["input_ids"][masked] == tokenizer.mask_token_id).float().mean() > 0.5
    elif group == "data" and option.startswith("tokens_"):
        from distill_lab.data_tokens import ENTITY_TAGS, TokenClassificationData

        data = instantiate(node, tokenizer=tokenizer, **run_time_lengths(node))
        assert isinstance(data, TokenClassificationData)  # loading waits for setup()
        if option != "tokens_synthetic":  # the hub offline, and the task's csv files hold no words and tags
            error = RuntimeError if option == "tokens_hf" else ValueError
            with pytest.raises(error, match="data=local" if option == "tokens_hf" else "data.tokens_column="):
                data.setup("fit")
            return
        data.setup("fit")
        assert data.label_names == list(ENTITY_TAGS)
        batch = next(iter(data.train_dataloader()))
        assert (
            batch["labels"].shape == batch["input_ids"].shape and batch["labels"].shape[0] == node.batch_size
        )
    elif group == "data":
        data = instantiate(node, tokenizer=tokenizer, **run_time_lengths(node))
        assert isinstance(data, TextClassificationData)  # loading waits for setup()
        if option == "hf":
            with pytest.raises(RuntimeError, match="data=local"):
                data.setup("fit")
            return
        data.setup("fit")
        assert data.num_labels == 2 and data.label_names == ["0", "1"]
        batch = next(iter(data.train_dataloader()))
        assert batch["input_ids"].shape[0] == node.batch_size and set(batch["labels"].tolist()) <= {0, 1}
    elif group == "teacher":
        teacher = instantiate(node)
        saved = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert teacher.config.num_hidden_layers == 4
        for key, value in saved.state_dict().items():
            assert torch.equal(teacher.state_dict()[key], value), key
        if option == "builtin":
            assert not (
                cache / "builtin-sequence_classification-v2" / "teacher_metrics.txt"
            ).exists()  # loaded, not trained
    elif group == "student":
        teacher = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
        student = instantiate(node, teacher=teacher)
        assert type(student) is type(teacher) and student.config.num_labels == 2
        expected_layers = node.num_layers if option == "from_teacher" else teacher.config.num_hidden_layers
        assert student.config.num_hidden_layers == expected_layers
    elif group == "module":  # built with what exists only at run time, as run.build_module passes it
        teacher = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
        student = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
        module = instantiate(
            node, teacher=teacher, student=student, task=instantiate(cfg.task),
            attention_loss={"layer_map": [(1, 0), (3, 1)]}, calibration_batch={"input_ids": torch.ones(2, 3)},
        )  # fmt: skip
        module.teacher_capture.detach(), module.student_capture.detach()
        assert type(module) is get_class(node._target_) and module.teacher is teacher
        assert module.attention_loss.layer_map == [(1, 0), (3, 1)]
        assert module.attention_loss.block_size == cfg.attention_block_size
        assert module.attention_loss.loss.name == cfg.loss.name
        assert type(module.attention_loss.matching) is get_class(cfg.matching._target_)
        optimizer = module.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
        assert optimizer.defaults["lr"] == cfg.optimizer.lr
        for key in ("attention_weight", "hidden_weight", "temperature", "alpha", "warmup_ratio", "capture"):
            assert module.hparams[key] == cfg[key], key
        assert module.hidden_loss is None  # hidden=none, the default
        assert torch.equal(module.calibration_batch["input_ids"], torch.ones(2, 3))
    elif group == "paths":  # compose_config replaced both paths; compose without it to see the option's own
        from hydra import compose, initialize_config_dir

        monkeypatch.setenv("DISTILL_LAB_CACHE", str(cache))
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            plain = compose("config", overrides=[f"paths={option}"])
        assert _assert_option_applied(plain, group, option, overridden=set()) == 2
        assert plain.paths.cache_dir == str(cache)  # DISTILL_LAB_CACHE moves the built-in teacher's cache
        assert OmegaConf.to_container(plain.paths)["output_dir"] == "${hydra:runtime.output_dir}"
    elif group == "task":
        built = instantiate(cfg.task)
        assert built.name == option and type(built) is TASKS[option]
        assert cfg.optimized_metric == built.monitor and cfg.optimized_mode == built.monitor_mode
        assert cfg.teacher.task == option  # the teacher is loaded with the task's head
        expected_data = {
            "masked_lm": "lm_synthetic",
            "causal_lm": "lm_synthetic",
            "image_classification": "synthetic_images",
            "token_classification": "tokens_synthetic",
        }
        if option in expected_data:  # the task brings data of its kind
            assert (
                cfg.data._target_
                == OmegaConf.load(CONF_DIR / "data" / f"{expected_data[option]}.yaml")._target_
            )
        if option in ("masked_lm", "causal_lm"):
            assert cfg.data.mlm is (option == "masked_lm")
    elif group in ("debug", "experiment", "hydra", "launcher", "hparams_search"):
        spec_hydra = OmegaConf.load(CONF_DIR / group / f"{option}.yaml").get("hydra")
        assert (
            checked > 0 or spec_hydra
        )  # compose only; their values were checked above (or are Hydra's, below)
        if spec_hydra and not is_hydra:  # what the option sets for Hydra (a sweep, a launcher) reaches Hydra
            with_hydra = compose_config(overrides, out, cache, return_hydra_config=True)
            for key, value in _raw_leaves(OmegaConf.to_container(spec_hydra, resolve=False)).items():
                assert OmegaConf.select(
                    with_hydra.hydra, key, throw_on_resolution_failure=False
                ) == value or (
                    isinstance(value, str) and "${" in value  # interpolations resolve at run time
                ), key
            if group == "launcher":
                plugin = {"joblib": "JoblibLauncher", "slurm": "SlurmLauncher"}[option]
                assert with_hydra.hydra.launcher._target_.endswith(plugin)
            if group == "hparams_search":
                assert with_hydra.hydra.sweeper._target_.endswith("OptunaSweeper")
    else:
        pytest.fail(f"config group {group!r} is new: teach this test how to instantiate {group}={option}")


def test_config_groups_are_all_covered():
    groups = {g for g, _ in GROUP_OPTIONS}
    assert {"loss", "matching", "teacher", "student", "data", "trainer", "logger", "callbacks"} <= groups
    assert {"kl", "mse", "cosine"} <= set(LOSSES) and set(MODES) == {
        "layerwise",
        "headwise",
        "global",
        "selective",
    }


def test_unknown_option_is_a_hydra_error_listing_the_options(tmp_path):
    with pytest.raises(MissingConfigException) as info:
        compose_config(["loss=nope"], tmp_path)
    message = str(info.value)
    assert "Could not find 'loss/nope'" in message
    assert all(name in message for name in LOSSES)
    with pytest.raises(MissingConfigException, match="matching/nope"):
        compose_config(["matching=nope"], tmp_path)


# --------------------------------------------------------------------------------------- 2. every combination


@pytest.mark.parametrize("matching", MODES)
@pytest.mark.parametrize("loss", LOSSES)
def test_train_every_loss_and_matching(task, tmp_path, loss, matching):
    out = tmp_path / "run"
    top_k = ["matching.top_k=2"] if matching == "selective" else []
    metrics = run_app(task, out, f"loss={loss}", f"matching={matching}", *top_k)
    assert 0.0 <= metrics["val/acc"] <= 1.0 and 0.0 <= metrics["val/teacher_acc"] <= 1.0
    assert set(metrics) == {
        "val/acc", "val/f1", "val/mcc", "val/teacher_acc", "val/teacher_f1", "val/teacher_mcc",
    }  # fmt: skip

    results = json.loads((out / "results.json").read_text())
    assert (
        results["student"]["acc"] == metrics["val/acc"]
        and results["teacher"]["acc"] == metrics["val/teacher_acc"]
    )
    assert results["gap"]["acc"] == pytest.approx(results["teacher"]["acc"] - results["student"]["acc"])
    params = results["parameters"]
    assert params["teacher"] > params["student"] > 0
    assert (
        params["compression"] == pytest.approx(params["teacher"] / params["student"])
        and params["compression"] > 1
    )
    speed = results["inference"]
    assert speed["speedup"] > 0 and speed["teacher_examples_per_s"] > 0
    assert speed["speedup"] == pytest.approx(
        speed["student_examples_per_s"] / speed["teacher_examples_per_s"]
    )
    assert set(results["attention_loss"]) == set(PAIRS)
    assert results["optimized_metric"] == "acc"
    assert all(math.isfinite(v) and v >= 0 for v in results["attention_loss"].values())
    assert results["layer_map"] == [[1, 0], [3, 1]]
    if matching == "selective":
        assert set(results["selected_heads"]) == set(PAIRS)
        for pairs in results["selected_heads"].values():
            assert len(pairs) == 2
            assert len({t for t, _ in pairs}) == 2 and len({s for _, s in pairs}) == 2  # distinct heads
            assert all(0 <= t < 4 and 0 <= s < 4 for t, s in pairs)
    else:
        assert results["selected_heads"] is None
    assert results["best_checkpoint"] == str(out / "checkpoints" / "best.ckpt")

    saved = (out / "config.yaml").read_text()
    assert "${" not in saved  # resolved
    saved_cfg = OmegaConf.create(saved)
    assert saved_cfg.loss.name == loss and saved_cfg.matching._target_.endswith(
        MATCHING_MODES[matching].__name__
    )
    assert saved_cfg.paths.output_dir == str(out) and saved_cfg.trainer.default_root_dir == str(out)
    assert (out / "checkpoints" / "best.ckpt").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (out / "student" / "config.json").is_file() and (out / "student" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (out / "attention_maps").glob("*.png")) == ["epoch0-step4.png"]

    rows = read_metrics_csv(out)
    steps = [r for r in rows if r["train/loss"]]
    assert [int(r["step"]) for r in steps] == [0, 1, 2, 3]  # debug=fast: 4 steps, logged every step
    head_columns = {c for c in rows[0] if c.startswith("train/attention/L1->0/h")}
    if matching in ("headwise", "selective"):  # the modes that report per student head
        assert len(head_columns) == (4 if matching == "headwise" else 2)
    else:
        assert not head_columns


def test_probs_capture_matches_the_qk_default(task, tmp_path):
    """capture=probs (eager maps, the reference) and the default capture=qk give the same first step.

    The runs are in float64: the student starts as copies of teacher layers, so its first attention losses
    (~4e-9) cancel log-probabilities of ~2.6, which float32 rounds to ~1e-7: there the two captures' losses
    were rounding alone (6e-9 against 1.2e-8), and only an absolute 1e-7 compared them. In float64 the same
    cancellation leaves ~1e-7 of these losses (u = 1.1e-16 times 2.6 / 4e-9), so rel=1e-5 compares them."""
    first = {}
    for capture in ("qk", "probs"):
        run_app(
            task, tmp_path / capture, "matching=headwise", f"capture={capture}", "trainer.precision=64-true"
        )
        first[capture] = read_metrics_csv(tmp_path / capture)[0]
    for key in ("train/loss", "train/output_loss", "train/attention/L1->0/h2", "train/attention/L3->1"):
        assert float(first["qk"][key]) == pytest.approx(float(first["probs"][key]), rel=1e-5, abs=0), key


class MicroBatchLosses(L.Callback):
    """Records the objective of every training micro-batch (Lightning hands ``on_train_batch_end`` the loss
    divided by ``accumulate_grad_batches``)."""

    records: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        MicroBatchLosses.records.append(float(outputs["loss"]) * trainer.accumulate_grad_batches)


def test_accumulated_steps_log_the_mean_of_their_micro_batches(task, tmp_path):
    """Under accumulate_grad_batches=2 each logged step's losses are the means over its two micro-batches
    (the objective its update minimised), not the last micro-batch's; the parts keep their relation to the
    total."""
    MicroBatchLosses.records = []
    run_app(task, tmp_path, "matching=headwise", "trainer.accumulate_grad_batches=2",
            "+callbacks.micro_batches._target_=test_run.MicroBatchLosses")  # fmt: skip
    micro = MicroBatchLosses.records
    steps = [r for r in read_metrics_csv(tmp_path) if r["train/loss"]]
    assert len(micro) == 4 and [int(r["step"]) for r in steps] == [0, 1]  # debug=fast: 4 batches, 2 updates
    # the second update's micro-batches differ (the first's barely: the student starts as the teacher's
    # layers), so its mean and its last micro-batch can be told apart
    assert abs(micro[2] - micro[3]) > 1e-4 * abs(micro[3])
    for row, window in zip(steps, (micro[:2], micro[2:]), strict=True):
        assert float(row["train/loss"]) == pytest.approx(sum(window) / 2, rel=1e-6)
        total = 0.7 * float(row["train/output_loss"]) + 0.3 * float(row["train/attention_loss"])
        assert float(row["train/loss"]) == pytest.approx(total, rel=1e-5)
        pairs = [float(row[f"train/attention/{pair}"]) for pair in PAIRS]
        assert float(row["train/attention_loss"]) == pytest.approx(sum(pairs) / len(pairs), rel=1e-5)
        heads = [float(row[f"train/attention/L3->1/h{h}"]) for h in range(4)]
        assert float(row["train/attention/L3->1"]) == pytest.approx(sum(heads) / len(heads), rel=1e-5)


def test_each_validation_of_an_epoch_keeps_its_attention_map(task, tmp_path):
    """Two validations in one epoch (trainer.val_check_interval=2 of 4 batches) leave two images, named by
    epoch and step; one file per epoch kept only the last."""
    run_app(task, tmp_path, "trainer.val_check_interval=2")
    assert sorted(p.name for p in (tmp_path / "attention_maps").glob("*.png")) == [
        "epoch0-step2.png",
        "epoch0-step4.png",
    ]


def test_steps_after_the_last_validation_are_named_as_left_out_of_the_export(task, tmp_path, caplog):
    """max_steps=6 with a validation at the end of each 4-batch epoch: steps 5 and 6 are never validated, so
    the export (the best validated checkpoint) leaves them out, and the run says so."""
    with caplog.at_level(logging.WARNING, logger="distill_lab.export"):
        run_app(task, tmp_path, "trainer.max_epochs=2", "trainer.max_steps=6")
    assert "the last 2 optimizer steps (after the validation at step 4) were never validated" in caplog.text
    assert json.loads((tmp_path / "results.json").read_text())["trained_steps"] == 6
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="distill_lab.export"):
        run_app(task, tmp_path / "whole", "trainer.max_epochs=2", "trainer.max_steps=8")
    assert "never validated" not in caplog.text


# ---------------------------------------------------------------------------------------------- 3. export


def test_exported_student_reloads_and_equals_the_best_checkpoint(task, default_run):
    out = default_run["out"]
    student_dir = out / "student"
    model = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    config_text = (student_dir / "config.json").read_text()
    assert "distill_lab" not in config_text  # no capture attention implementation leaks into the export
    assert model.config._attn_implementation not in ("distill_lab_capture", "distill_lab_qk")
    assert model.config.num_hidden_layers == 2 and model.config.num_labels == 2
    assert tokenizer("good not bad")["input_ids"] == build_word_tokenizer()("good not bad")["input_ids"]

    checkpoint = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    state = checkpoint["state_dict"]
    assert state and not any(k.startswith("teacher.") for k in state)  # the frozen teacher is left out
    student_state = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
    reference = AutoModelForSequenceClassification.from_pretrained(student_dir).eval()
    reference.load_state_dict(student_state, strict=True)

    data = TextClassificationData(
        datasets.DatasetDict(
            train=datasets.Dataset.from_csv(task["train_file"]),
            validation=datasets.Dataset.from_csv(task["validation_file"]),
        ),
        tokenizer=tokenizer,
        batch_size=16,
    )
    batch = {k: v for k, v in next(iter(data.val_dataloader())).items() if k != "labels"}
    assert (batch["attention_mask"] == 0).any()  # the batch is padded
    with torch.no_grad():
        exported, best = model(**batch).logits, reference(**batch).logits
    torch.testing.assert_close(exported, best, rtol=0, atol=1e-5)
    # and the checkpoint is not simply the initial student: 4 steps moved its weights
    teacher = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
    assert not torch.equal(student_state["classifier.weight"], teacher.state_dict()["classifier.weight"])
    assert checkpoint["teacher_scores"]["val/teacher_acc"] == default_run["metrics"]["val/teacher_acc"]


def test_an_overridden_optimized_metric_is_followed_and_recorded(task, tmp_path):
    """``optimized_metric=val/f1``: the best checkpoint follows F1, ``train`` returns it, and ``results.json``
    names it for ``summarize``."""
    out = tmp_path / "run"
    cfg = compose_config([*task["overrides"], *BASE, "optimized_metric=val/f1"], out)
    metrics = train(cfg)
    assert metrics[cfg.optimized_metric] == metrics["val/f1"]
    assert json.loads((out / "results.json").read_text())["optimized_metric"] == "f1"
    callbacks = torch.load(out / "checkpoints" / "best.ckpt", weights_only=False)["callbacks"]
    best = [
        state for state in callbacks.values() if str(state.get("best_model_path", "")).endswith("best.ckpt")
    ]
    assert len(best) == 1 and best[0]["monitor"] == "val/f1"


def test_optimizer_holds_exactly_the_student_parameters(default_run):
    probe = default_run["probe"]
    assert probe["optimizer_has_teacher"] is False
    assert probe["optimizer_tensors"] == probe["student_tensors"]
    assert probe["optimizer_numel"] == probe["student_numel"]
    results = json.loads((default_run["out"] / "results.json").read_text())
    assert probe["student_numel"] == results["parameters"]["student"]


# ------------------------------------------------------------------------------------------ 4. frozen teacher


def test_teacher_stays_frozen_and_in_eval_mode(task, default_run):
    probe = default_run["probe"]
    assert len(probe["train"]) == 4 and len(probe["validation"]) >= 2
    assert all(not teacher_training for teacher_training, _, _ in probe["train"])
    assert all(student_training for _, student_training, _ in probe["train"])
    assert not any(teacher_grad for _, _, teacher_grad in probe["train"])
    assert all(not teacher_training for teacher_training, _ in probe["validation"])
    assert probe["teacher_training_after_fit"] is False
    saved = AutoModelForSequenceClassification.from_pretrained(task["teacher"]).state_dict()
    assert probe["teacher_state"].keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(probe["teacher_state"][key], value), key


# ----------------------------------------------------------------------------------------- 5. causal teachers


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_causal_teachers_train_headwise(tmp_path, family):
    task = make_text_task(tmp_path / "task", family=family)
    out = tmp_path / "run"
    metrics = run_app(task, out, "loss=kl", "matching=headwise")
    assert 0.0 <= metrics["val/acc"] <= 1.0
    rows = read_metrics_csv(out)
    assert {"train/attention/L1->0", "train/attention/L1->0/h0", "train/attention/L3->1/h3"} <= set(rows[0])
    first = rows[0]
    heads = [float(first[f"train/attention/L1->0/h{h}"]) for h in range(4)]
    assert all(math.isfinite(v) and v >= 0 for v in heads)
    assert float(first["train/attention/L1->0"]) == pytest.approx(sum(heads) / 4, rel=1e-4, abs=1e-9)
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.model_type == family and student.config.num_hidden_layers == 2
    if family == "llama":
        assert student.config.num_key_value_heads == 2  # grouped-query attention kept


# ---------------------------------------------------------------------------------------------- 6. errors


NO_TEACHER = "teacher.name_or_path=/nonexistent/teacher"
ERRORS = {
    "layer-out-of-range": (
        ["layer_map=[[9,0]]"],
        r"teacher layer 9 does not exist.*valid indices are 0\.\.3",
    ),
    "student-layer-out-of-range": (
        ["layer_map=[[3,5]]"],
        r"student layer 5 does not exist.*valid indices are 0\.\.1",
    ),
    "heads-do-not-divide": (
        ["student.num_heads=3", "student.hidden_size=24", "matching=layerwise"],
        r"teacher has 4 heads and the student 3.*matching=global.*matching=headwise",
    ),
    "missing-column": (
        ["data.text_column=sentence"],
        r"data\.text_column='sentence'.*available columns: \['text', 'label'\]",
    ),
    "top-k-too-large": (["matching=selective", "matching.top_k=10"], r"top_k=10.*Lower top_k"),
    "student-deeper-than-teacher": (["student.num_layers=5"], r"student\.num_layers=5"),
    "optimized-metric-unknown": (
        ["optimized_metric=val/accuracy"],
        r"optimized_metric=val/accuracy is not a validation metric of task=sequence_classification: choose "
        r"one of val/acc, val/f1",
    ),
    "optimized-metric-checked-before-the-teacher-loads": (
        ["optimized_metric=val/accuracy", "teacher.name_or_path=/nonexistent/teacher"],
        r"optimized_metric=val/accuracy is not a validation metric",
    ),
    "optimized-mode-against-the-metric": (
        ["optimized_metric=val/f1", "optimized_mode=min"],
        r"optimized_mode=min, but val/f1 is better when higher: set optimized_mode=max",
    ),
    # what the config alone tells: refused before the teacher is loaded (it does not exist here)
    "alpha-out-of-range": (
        ["alpha=1.5", NO_TEACHER],
        r"alpha=1\.5 must be in \[0, 1\] \(the cross-entropy's share",
    ),
    "temperature-zero": (["temperature=0", NO_TEACHER], r"^temperature=0 must be above 0"),
    "attention-kl-temperature-negative": (
        ["loss.temperature=-1", NO_TEACHER],
        r"loss\.temperature=-1 must be above 0 \(the attention KL's; temperature= is",
    ),
    "attention-weight-out-of-range": (
        ["attention_weight=-0.1", NO_TEACHER],
        r"attention_weight=-0\.1 must be in \[0, 1\]",
    ),
    "warmup-ratio-one": (["warmup_ratio=1", NO_TEACHER], r"warmup_ratio=1 must be in \[0, 1\)"),
    "hidden-weight-negative": (
        ["hidden=mse", "hidden_weight=-1", NO_TEACHER],
        r"hidden_weight=-1 must be 0 or more \(the weight of L_hidden",
    ),
    "hidden-layer-map-unknown": (
        ["hidden=mse", "hidden_layer_map=uniformly", NO_TEACHER],
        r"hidden_layer_map=uniformly is not a map: use uniform or last, or pairs",
    ),
    "hidden-layer-map-pair-out-of-range": (
        ["hidden=cosine", "hidden_layer_map=[[5,0]]"],
        r"hidden_layer_map pair \[5, 0\] .* the teacher's are 0\.\.4 and the student's 0\.\.2",
    ),
    "capture-memory-budget-negative": (
        ["capture_memory_budget=-1", NO_TEACHER],
        r"capture_memory_budget=-1 must be a number of bytes, 0 or more",
    ),
    "ckpt-path-typo": (["ckpt_path=auot", NO_TEACHER], r"ckpt_path=auot is no checkpoint file.*auto.*null"),
    "validation-off": (
        ["trainer.limit_val_batches=0", NO_TEACHER],
        r"trainer\.limit_val_batches=0 turns validation off.*limit_val_batches=0\.1",
    ),
    "training-without-end": (
        ["trainer.max_epochs=-1", "trainer.max_steps=-1", NO_TEACHER],
        r"trainer\.max_epochs=-1 with trainer\.max_steps=-1 never ends training",
    ),
    "head-map-of-no-layer-pair": (
        ["matching=headwise", "matching.head_map={L9-0: [[0, 0]]}"],
        r"matching\.head_map names layer pairs \['L9->0'\]",
    ),
    "batch-size-zero": (
        ["data.batch_size=0", NO_TEACHER],
        r"data\.batch_size=0 must be a whole number of at least 1",
    ),
    "eval-batch-size-zero": (
        ["data.eval_batch_size=0", NO_TEACHER],
        r"data\.eval_batch_size=0 must be .* at least 1 \(or null: data\.batch_size\)",
    ),
    "task-and-data-of-other-kinds": (
        ["task=masked_lm", NO_TEACHER],
        r"task=masked_lm takes data=lm_synthetic \| lm_local \| lm_hf, but the data config builds "
        r"TextClassificationData",
    ),
    "image-task-on-text-data": (
        ["task=image_classification", NO_TEACHER],
        r"task=image_classification takes data=synthetic_images \| imagefolder, but .* builds "
        r"TextClassificationData",
    ),
    "max-length-past-the-teachers-positions": (  # the tiny BERT's table has 64 positions
        ["data.max_length=65"],
        r"data\.max_length=65, but the teacher \(BertForSequenceClassification\) has position embeddings for "
        r"64 tokens: set data\.max_length=64 or less",
    ),
    "unknown-capture": (["capture=flash"], r"unknown capture backend 'flash'; valid choices: .*qk"),
    "fused-kernel-without-qk": (
        ["fused_kernel=true", "capture=probs", "matching=global"],
        r"fused_kernel=true, but .*both sides must be QueryKey records \(capture=qk\)"
        r".*matching=global averages heads.*fused_kernel=null",
    ),
    "mse-scores-needs-qk": (
        ["loss=mse_scores", "capture=probs"],
        r"loss=mse_scores .*needs capture=qk, not capture=probs",
    ),
    "gradient-importance-under-fsdp": (
        [
            *FSDP_ON_CPU,
            "matching=selective",
            "matching.importance=gradient",
        ],
        r"matching\.importance=gradient.*trainer=fsdp.*matching\.importance=entropy",
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_configuration_errors_fail_before_training(task, tmp_path, case):
    overrides, message = ERRORS[case]
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        run_app(task, out, *overrides)
    assert not (out / "checkpoints").exists() and not (out / "results.json").exists()


HF_STUDENT = ["student=hf", "debug=fast", "logger=csv", "fused_kernel=false"]


@pytest.fixture(scope="module")
def students(task, tmp_path_factory):
    """Students that ``task``'s BERT teacher cannot teach, each saved with a tokenizer, and one it can."""
    root = tmp_path_factory.mktemp("students")
    gpt2 = make_text_task(root / "gpt2", family="gpt2", num_layers=2)["teacher"]  # the teacher's tokenizer
    other = make_text_task(root / "other", num_layers=2)["teacher"]
    words = build_word_tokenizer().get_vocab()
    reordered = sorted((w for w in words if not w.startswith("[")), key=lambda w: words[w], reverse=True)
    build_word_tokenizer(reordered).save_pretrained(other)  # the same words (and vocabulary size), other ids
    small = root / "small"  # no tokenizer: the embeddings tell
    make_tiny_model("bert", small, num_hidden_layers=2, num_attention_heads=4, vocab_size=12, num_labels=2)
    build_word_tokenizer().save_pretrained(small)
    (small / "tokenizer.json").unlink()
    (small / "tokenizer_config.json").unlink()
    three = make_text_task(root / "three", num_layers=2, num_labels=3)["teacher"]  # a head for 3 labels
    return {"gpt2": gpt2, "other": other, "small": str(small), "three": three}


@pytest.mark.parametrize(
    ("student", "message"),
    [
        ("gpt2", r"the teacher's attention \(BertForSequenceClassification\) is bidirectional and the "
                 r"student's \(GPT2ForSequenceClassification\) causal.*cannot match.*student=from_teacher"),
        ("other", r"student\.name_or_path=.* has a tokenizer of its own that is not the teacher's \(\d+ of "
                  r"the teacher's \d+ tokens are missing or have other ids\)"),
        ("small", r"the student's input embeddings hold 12 token ids, the teacher's tokenizer \d+"),
    ],
)  # fmt: skip
def test_a_student_that_cannot_learn_the_teachers_attention_is_refused_before_training(
    task, students, tmp_path, student, message
):
    """A causal student of a bidirectional teacher, or one that reads other token ids than the teacher's
    tokenizer gives, would train without an error and learn nothing it could use."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train(
            compose_config(
                [*task["overrides"], *HF_STUDENT, f"student.name_or_path='{students[student]}'"], out
            )
        )
    assert not (out / "checkpoints").exists()


def test_a_student_whose_tokenizer_adds_tokens_to_the_teachers_is_accepted(task, tmp_path):
    """The check compares ids of the teacher's tokens: a student tokenizer with the same ids and tokens of its
    own beyond them reads the teacher's ids as the teacher does."""
    from distill_lab.data import SYNTHETIC_WORDS
    from distill_lab.models import check_student

    student_dir = make_text_task(tmp_path / "student", num_layers=2)["teacher"]
    build_word_tokenizer([*SYNTHETIC_WORDS, "extra"]).save_pretrained(student_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
    student = AutoModelForSequenceClassification.from_pretrained(student_dir)
    check_student(student, teacher, load_tokenizer(task["teacher"]), student_dir)  # no error


def test_a_student_saved_with_another_number_of_labels_gets_a_fresh_head(task, students, tmp_path, caplog):
    """A student checkpoint whose classifier has 3 labels, for a 2-label teacher: the head is initialised
    afresh (transformers would refuse the checkpoint) and the log says so; the exported student has 2."""
    import logging

    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="distill_lab.models"):
        train(
            compose_config(
                [*task["overrides"], *HF_STUDENT, f"student.name_or_path='{students['three']}'"], out
            )
        )
    assert "saved with a head for another number of labels than the teacher's 2" in caplog.text
    assert "classifier.weight" in caplog.text
    exported = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert exported.config.num_labels == 2 and exported.classifier.weight.shape[0] == 2


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"attention_weight": 1.5}, "attention_weight must be in [0, 1], got 1.5"),
        ({"alpha": -0.1}, "alpha must be in [0, 1], got -0.1"),
        ({"temperature": 0.0}, "temperature must be positive, got 0.0"),
    ],
)
def test_the_module_refuses_objective_settings_out_of_range(tmp_path, option, message):
    """Used without train.py, the module leaves the objective's settings to the functional losses, which
    refuse a value out of range at the first step (train.py checks them in the config, before anything loads:
    see test_configuration_errors_fail_before_training)."""
    from conftest import make_tiny_inputs

    from distill_lab.module import DistillationModule

    teacher = make_tiny_model("bert", tmp_path / "teacher")
    student = make_tiny_model("bert", tmp_path / "student", seed=1)
    attention_loss = AttentionDistillationLoss("kl", "layerwise", [(0, 0)])
    module = DistillationModule(teacher, student, attention_loss, torch.optim.SGD, **option)
    batch = {**make_tiny_inputs("bert", teacher.config), "labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError) as info:
        module(batch)
    assert str(info.value) == message


def test_weighted_mean_weighs_each_value_by_its_batch_and_keeps_nan():
    """The validation losses' average: each batch's value counts as many times as its rows (a batch of repeats
    only, weight 0, not at all), and a NaN loss makes the mean NaN instead of being dropped."""
    from distill_lab.module import WeightedMean

    mean = WeightedMean()
    for value, weight in ((1.0, 3.0), (5.0, 1.0), (100.0, 0.0)):
        mean.update(torch.tensor(value, dtype=torch.bfloat16), weight)
    assert mean.compute().item() == pytest.approx((1.0 * 3 + 5.0) / 4)
    mean.update(torch.tensor(float("nan")), 2.0)
    assert math.isnan(mean.compute().item())
    mean.reset()
    mean.update(torch.tensor(2.0), 1.0)
    assert mean.compute().item() == 2.0


def test_a_student_with_another_vocabulary_fails_before_training(tmp_path):
    """student=hf on a language-model task: the output loss compares the two distributions token by token, so
    a student with fewer vocabulary entries than the teacher's tokenizer has tokens is refused when the run is
    set up, not at the first step's shape mismatch. (More entries than tokens are padding, accepted:
    ``tests/test_padded_vocab.py``.)"""
    from transformers import AutoModelForMaskedLM

    task = make_text_task(tmp_path / "task", task="masked_lm")
    config = AutoModelForMaskedLM.from_pretrained(task["teacher"]).config
    config.vocab_size -= 8
    config.num_hidden_layers = 2
    AutoModelForMaskedLM.from_config(config).save_pretrained(tmp_path / "student")
    out = tmp_path / "run"
    overrides = [
        *task["overrides"],
        "student=hf",
        f"student.name_or_path='{tmp_path / 'student'}'",
        "debug=fast",
        "logger=csv",
    ]
    with pytest.raises(ValueError) as info:
        train(compose_config(overrides, out))
    assert str(info.value) == (
        f"the student's input embeddings hold {config.vocab_size} token ids, the teacher's tokenizer "
        f"{config.vocab_size + 8}: the student must use the teacher's tokenizer and vocabulary"
    )
    assert not (out / "checkpoints").exists()


def test_max_length_past_a_students_positions_fails_before_training(task, tmp_path):
    """student=hf whose table of absolute positions is shorter than the teacher's (32 against 64): a
    ``data.max_length`` that the teacher takes but the student does not is refused at set-up, naming the
    student, not at the first batch's index error."""
    from transformers import AutoModelForSequenceClassification

    config = AutoModelForSequenceClassification.from_pretrained(task["teacher"]).config
    config.max_position_embeddings, config.num_hidden_layers = 32, 2
    AutoModelForSequenceClassification.from_config(config).save_pretrained(tmp_path / "student")
    out = tmp_path / "run"
    student = ["student=hf", f"student.name_or_path='{tmp_path / 'student'}'"]
    with pytest.raises(ValueError) as info:
        train(
            compose_config(
                [*task["overrides"], *student, "debug=fast", "logger=csv", "data.max_length=48"], out
            )
        )
    assert str(info.value) == (
        "data.max_length=48, but the student (BertForSequenceClassification) has position embeddings for 32 "
        "tokens: set data.max_length=32 or less"
    )
    assert not (out / "checkpoints").exists()


def test_fused_kernel_true_without_cuda_fails_before_training(task, tmp_path, monkeypatch):
    """Outside Triton's interpreter (which the test session turns on for the kernel tests),
    ``fused_kernel=true`` on a CPU run is refused when the run is set up, naming the config key, not at the
    first forward."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "run"
    with pytest.raises(
        ValueError, match=r"fused_kernel=true, but .*need a CUDA device, and this runs on cpu"
    ):
        run_app(task, out, "fused_kernel=true")
    assert not (out / "checkpoints").exists()


def test_attention_map_example_is_one_row_of_the_validation_step(tmp_path):
    """The callback draws row ``example_index`` of the first validation batch from the step's own records,
    recomputing a ``QueryKey`` record's probabilities for that row alone; an index past the validation batch
    is refused when the run is set up."""
    from types import SimpleNamespace

    from distill_lab.callbacks import AttentionMapCallback, example_attention
    from distill_lab.capture import QueryKey

    gen = torch.Generator().manual_seed(0)
    query, key = torch.randn(3, 4, 6, 8, generator=gen), torch.randn(3, 2, 6, 8, generator=gen)
    keys = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]], dtype=torch.bool)
    record = QueryKey(query, key, 8**-0.5, keys[:, None, None, :].expand(3, 1, 6, 6))
    for index in range(3):
        torch.testing.assert_close(example_attention(record, index), record.probs()[index])
    trainer = SimpleNamespace(datamodule=SimpleNamespace(eval_batch_size=8))
    AttentionMapCallback(str(tmp_path), example_index=7).setup(trainer, None, "fit")
    with pytest.raises(ValueError, match=r"example_index=8.*validation batch of 8"):
        AttentionMapCallback(str(tmp_path), example_index=8).setup(trainer, None, "fit")
    # the README's override composes (no leading +) and reaches the callback
    cfg = compose_config(["callbacks.attention_maps.example_index=3"], tmp_path / "run")
    assert instantiate(cfg.callbacks.attention_maps).example_index == 3


def test_unloadable_teacher_is_named(task, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"teacher\.name_or_path=.*empty"):
        run_app(task, out, f"teacher.name_or_path='{empty}'")
    assert not (out / "checkpoints").exists()


def test_teacher_with_other_labels_must_be_fine_tuned_on_the_task(tmp_path):
    task = make_text_task(tmp_path / "task", num_labels=3)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"has 3 labels but the data has 2.*must be fine-tuned on this task"):
        run_app(task, out)
    assert not (out / "checkpoints").exists()


def _teacher_always_predicting(teacher_dir: Path, label: int, id2label: dict[int, str]) -> None:
    """Rewrite a saved classifier so that it predicts ``label`` for every input, under the given label
    names."""
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.classifier.bias.copy_(
            torch.where(torch.arange(model.config.num_labels) == label, 100.0, -100.0)
        )
    model.config.id2label, model.config.label2id = id2label, {v: k for k, v in id2label.items()}
    model.save_pretrained(teacher_dir)


def test_data_labels_are_numbered_by_the_teachers_label_names(tmp_path):
    """MNLI-style: string labels whose sorted order ("negative" 0, "positive" 1) is not the teacher's id2label
    (POSITIVE 0, NEGATIVE 1). A teacher that always answers POSITIVE scores 1.0 on all-positive validation
    data when the labels follow its names, and 0.0 when they are read by position
    (data.match_label_names=false): below chance, an error before training that names the sorted mapping,
    unless data.check_teacher=false; other names are an error before training."""
    task = make_text_task(tmp_path / "task")
    _teacher_always_predicting(Path(task["teacher"]), 0, {0: "POSITIVE", 1: "NEGATIVE"})
    names = {0: "negative", 1: "positive"}
    for split in ("train", "validation"):
        with open(task[f"{split}_file"], newline="") as f:
            rows = list(csv.DictReader(f))
        rows = [r | {"label": names[int(r["label"])]} for r in rows if split == "train" or r["label"] == "1"]
        with open(task[f"{split}_file"], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows)
    by_name = run_app(task, tmp_path / "by-name")
    assert by_name["val/teacher_acc"] == 1.0
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "by-name" / "student")
    assert exported.config.id2label == {0: "POSITIVE", 1: "NEGATIVE"}
    out = tmp_path / "by-position"
    with pytest.raises(
        ValueError, match=r"numbered in sorted order \{'negative': 0, 'positive': 1\}, as data\.match_label"
    ):
        run_app(task, out, "data.match_label_names=false")
    assert not (out / "checkpoints").exists()
    unchecked = run_app(
        task, tmp_path / "unchecked", "data.match_label_names=false", "data.check_teacher=false"
    )
    assert unchecked["val/teacher_acc"] == 0.0

    _teacher_always_predicting(Path(task["teacher"]), 0, {0: "POS", 1: "NEG"})
    out = tmp_path / "other-names"
    with pytest.raises(
        ValueError,
        match=r"the data's classes \['negative', 'positive'\] are not the teacher's \['POS', 'NEG'\]",
    ):
        run_app(task, out)
    assert not (out / "checkpoints").exists()


def test_tokenizer_of_the_teacher_is_used(task):
    assert load_tokenizer(task["teacher"]).get_vocab() == build_word_tokenizer().get_vocab()


# ---------------------------------------------------------------------------------------------- 7. resume


def test_wandb_goes_online_with_the_key_that_wandb_login_saved(tmp_path, monkeypatch):
    """``wandb login`` saves the key in the netrc file, not in the environment: with a key there for the wandb
    host, a run logs online as wandb would; without one, with a key for another host, or under
    WANDB_MODE=offline, it writes an offline run."""
    for name in ("WANDB_API_KEY", "NETRC", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    node = compose_config(["logger=wandb"], tmp_path / "run").logger
    assert _build_logger(node)._offline
    saved = tmp_path / ".netrc"
    saved.write_text(f"machine api.wandb.ai\n  login user\n  password {'k' * 40}\n")
    saved.chmod(0o600)
    assert not _build_logger(node)._offline
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert _build_logger(node)._offline
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")  # the key is another host's
    assert _build_logger(node)._offline
    monkeypatch.delenv("WANDB_BASE_URL")
    monkeypatch.setenv("NETRC", str(saved.rename(tmp_path / "netrc-elsewhere")))
    assert not _build_logger(node)._offline
    # an entry for the host without a key, or a file that cannot be parsed (wandb finds no key either):
    # offline
    for text in ("machine api.wandb.ai\n  login user\n", 'garbage "unterminated\n'):
        (tmp_path / "netrc-elsewhere").write_text(text)
        assert _build_logger(node)._offline, text


def test_a_finished_run_is_not_trained_again_in_its_own_directory(task, tmp_path):
    """A command rerun with the directory of its finished run (hydra.run.dir=...) stops before anything is
    loaded, instead of piling a second run's checkpoints (best-v1.ckpt...) and logs onto the first's."""
    out = tmp_path / "named"
    run_app(task, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    with pytest.raises(
        ValueError, match=r"named holds a finished run \(results\.json\).*Choose another hydra\.run\.dir"
    ):
        run_app(task, out)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_finished_sweep_job_is_found_as_a_rerun_would_find_it(tmp_path):
    """finished_run: the run a rerun would repeat, if it finished under the same configuration: the job's
    own directory, or the same job (same overrides) of an earlier sweep, unless a newer copy of it is
    unfinished."""
    from test_resume import _fake_run

    from distill_lab.resume import finished_run

    root, job = tmp_path / "multirun" / "2026-01-01", ["loss=kl", "seed=1"]
    earlier = _fake_run(root, "10-00-00/0", job, {"checkpoints/last.ckpt": 100, "results.json": 101})
    _fake_run(root, "10-00-00/1", ["loss=mse", "seed=1"], {"checkpoints/last.ckpt": 300, "results.json": 301})
    rerun = _fake_run(root, "11-00-00/0", job[::-1], {})
    (earlier / "config.yaml").write_text(
        yaml.safe_dump({"paths": {"output_dir": str(earlier)}, "alpha": 0.3})
    )
    assert finished_run(rerun) == earlier and finished_run(earlier) == earlier
    assert finished_run(rerun, {"paths": {"output_dir": str(rerun)}, "alpha": 0.3}) == earlier
    assert finished_run(rerun, {"paths": {"output_dir": str(rerun)}, "alpha": 0.5}) is None  # conf/ edited
    newer = _fake_run(root, "10-30-00/0", job, {"checkpoints/last.ckpt": 200})  # a later copy, interrupted
    assert finished_run(rerun) is None
    (newer / "results.json").touch()
    os.utime(newer / "results.json", (250, 250))
    assert finished_run(rerun) == newer
    named = _fake_run(root, "12-00-00/0", job, {}, hydra=[f"hydra.sweep.dir={root}/12-00-00"])
    assert finished_run(named) is None  # a sweep directory named anew asks for new runs


def test_resumed_run_continues_its_wandb_run(task, tmp_path, monkeypatch, caplog):
    """``ckpt_path=auto`` resuming in the interrupted run's directory continues its wandb run (same id, both
    offline run directories there, and both in the printed `wandb sync` command: the newest alone holds only
    the resumed part of the history); a fresh run elsewhere starts a new one."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    out = tmp_path / "run"
    run_app(task, out, "logger=wandb", "trainer.max_epochs=1")
    (out / "results.json").unlink()  # as an interrupted run leaves it: checkpoints, no results
    with caplog.at_level(logging.INFO, logger="distill_lab.export"):
        run_app(task, out, "logger=wandb", "trainer.max_epochs=2")  # the same command: resumes here
    runs = sorted(p.name for p in (out / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({name.rsplit("-", 1)[1] for name in runs}) == 1, runs
    sync = " ".join(str(out / "wandb" / name) for name in runs)
    assert f"upload the run with: wandb sync {sync}" in caplog.text
    assert torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 2
    other = tmp_path / "other"
    run_app(task, other, "logger=wandb", "trainer.max_epochs=1", "ckpt_path=null")
    (fresh,) = (other / "wandb").glob("offline-run-*")
    assert fresh.name.rsplit("-", 1)[1] != runs[0].rsplit("-", 1)[1]


def test_resume_from_last_checkpoint_continues(task, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    run_app(task, first, "trainer.max_epochs=1")
    last = first / "checkpoints" / "last.ckpt"
    before = torch.load(last, map_location="cpu", weights_only=False)
    step_before = before["global_step"]
    assert step_before == 4 and before["epoch"] == 1  # last.ckpt is written at the end: one epoch completed
    run_app(task, second, "trainer.max_epochs=2", f"ckpt_path='{last}'")
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["global_step"] == 8 > step_before and resumed["epoch"] == 2
    logged = [int(r["step"]) for r in read_metrics_csv(second) if r["train/loss"]]
    assert logged == [4, 5, 6, 7]  # the second run trained only the second epoch
    assert (
        resumed["teacher_scores"]
        == torch.load(last, map_location="cpu", weights_only=False)["teacher_scores"]
    )


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_debug_fast_shortens_an_experiment_too(tmp_path, experiment):
    """``debug`` comes last in the defaults list (as in the lightning-hydra-template): ``experiment=X
    debug=fast`` is X's recipe in a smoke run, one epoch of a few batches, not X's full length."""
    cfg = compose_config([f"experiment={experiment}", "debug=fast"], tmp_path)
    fast = OmegaConf.load(CONF_DIR / "debug" / "fast.yaml")
    assert cfg.trainer.max_epochs == fast.trainer.max_epochs == 1
    assert cfg.trainer.limit_train_batches == fast.trainer.limit_train_batches
    assert cfg.data.max_train_samples == fast.data.max_train_samples


def test_a_run_that_trains_nothing_says_so(task, tmp_path, caplog, capsys):
    """``trainer.max_epochs=0`` evaluates the student as built (a baseline before distillation): allowed, but
    the log warns before anything runs, results.json records ``trained_steps`` 0 and the printed table says
    that the student was not trained. A run that trains records its optimizer steps."""
    import logging

    with caplog.at_level(logging.WARNING, logger="distill_lab.checks"):
        run_app(task, tmp_path / "baseline", "trainer.max_epochs=0")
    assert "trainer.max_epochs=0: nothing is trained; the results are the student's as built" in caplog.text
    assert json.loads((tmp_path / "baseline" / "results.json").read_text())["trained_steps"] == 0
    assert "the student was not trained (0 steps)" in capsys.readouterr().out
    run_app(task, tmp_path / "trained")
    assert json.loads((tmp_path / "trained" / "results.json").read_text())["trained_steps"] == 4  # debug=fast
    assert "not trained" not in capsys.readouterr().out


def test_the_best_checkpoints_evaluation_is_logged_under_best_not_as_another_validation(task, tmp_path):
    """The loggers' val/ curves hold the validations of training only (one per epoch here); the evaluation of
    the best checkpoint that results.json reports comes once, under best/, at the last step."""
    out = tmp_path / "run"
    run_app(task, out, "trainer.max_epochs=2", "trainer.limit_val_batches=null")
    rows = read_metrics_csv(out)
    validations = [r for r in rows if r.get("val/acc")]
    assert [int(r["epoch"]) for r in validations] == [0, 1]
    (best,) = [r for r in rows if r.get("best/acc")]
    results = json.loads((out / "results.json").read_text())
    assert float(best["best/acc"]) == pytest.approx(results["student"]["acc"])
    assert float(best["best/attention/L3->1"]) == pytest.approx(results["attention_loss"]["L3->1"], rel=1e-5)
    assert int(best["step"]) == max(int(r["step"]) for r in rows)


def test_throughput_is_measured_with_the_models_taking_turns():
    """Teacher and student are timed by ``torch.utils.benchmark`` in turns, round by round (not one after the
    other), so a change of the machine's load slows both alike; each model is in eval mode, gets no labels,
    and runs every batch in each pass. The result is each model's median and spread of examples/s."""
    from distill_lab.export import measure_throughput

    calls = []

    class Recorder(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name, self.weight = name, torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask):
            calls.append((self.name, self.training))

    batch = {
        "input_ids": torch.zeros(3, 5, dtype=torch.long),
        "attention_mask": torch.ones(3, 5),
        "labels": torch.zeros(3),
    }
    speeds = measure_throughput(
        {"teacher": Recorder("teacher"), "student": Recorder("student")},
        [batch] * 2,
        min_run_time=0.02,
        rounds=3,
    )
    assert all(not training for _, training in calls)
    turns = [name for i, (name, _) in enumerate(calls) if i == 0 or calls[i - 1][0] != name]
    assert turns == ["teacher", "student"] * 3
    assert all(sum(1 for n, _ in calls if n == name) % 2 == 0 for name in ("teacher", "student"))
    assert set(speeds) == {"teacher", "student"}
    for speed in speeds.values():
        assert speed["median"] > 0 and speed["iqr"] >= 0 and speed["examples_per_pass"] == 6
        assert speed["runs"] >= 3  # at least one timed block per round
