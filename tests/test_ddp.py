"""Distributed training: ``trainer=ddp`` on CPU (two gloo processes) against one process; ``trainer=fsdp``.

The equivalence tests drive ``DistillationModule`` with a real Lightning ``Trainer`` built from
``conf/trainer/<option>.yaml`` with its strategy as configured (FSDP, which Lightning runs only on GPUs,
through a subclass that lets it run on CPU), on a tiny BERT teacher and a randomly initialised 2-layer
student. Two processes each get one contiguous half of every global batch of 8 (Lightning's own sampler would
shuffle the examples); one process gets the whole batch. The data makes the halves exactly comparable: every
pair of neighbouring examples holds 12 + 9 real tokens, so each half (and each micro-batch of 2 under gradient
accumulation) has as many attention rows, and the token-weighted attention losses average to the full batch's.
The optimizer is SGD with momentum and weight decay: it turns a gradient into a weight change linearly (Adam's
first step is ``lr * sign(g)``, which magnifies rounding in near-zero gradients), and like AdamW it skips a
parameter whose gradient is ``None`` but decays one whose gradient is zero, so the distinction between an
unused parameter and a zero gradient shows in the weights.

The module runs as a script here (``python tests/test_ddp.py spec.json``): Lightning's DDP launcher starts
rank 1 by running the same command again.
"""

from __future__ import annotations

import contextlib
import functools
import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import torch
import yaml
from conftest import (
    CPU_DDP,
    FSDP_ON_CPU,
    REPO_ROOT,
    TrainRun,
    app_env,
    callback_overrides,
    compose_config,
    make_text_task,
    run_to_end,
    train_py,
)
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import OmegaConf
from test_resume import RUN, Crash, PoisonLoss, assert_same_result, train_losses, validation_history
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification

from distill_lab.data import synthetic_relations

pytestmark = pytest.mark.usefixtures("torch_single_thread")

GLOBAL_BATCH = 8
STEPS = 2
SEQ_LEN = 12
LENGTHS = (12, 9)  # real tokens of examples 2i and 2i + 1
SCENARIOS = {
    # the default objective: every student parameter gets a gradient
    "all-used": dict(attention_weight=0.3, layer_map=[[1, 0], [3, 1]]),
    # attention only, on student layer 0 only: the module's objective still multiplies the output loss by
    # 0, so the head and layer 1 get zero gradients (present, and decayed by the optimizer)
    "zero-weight": dict(attention_weight=1.0, layer_map=[[1, 0]]),
    # the same with an objective that drops its zero-weighted term: the head, layer 1 and layer 0's value,
    # output and feed-forward weights are then unused (no gradient at all), which plain DDP refuses
    "unused": dict(attention_weight=1.0, layer_map=[[1, 0]], drop_zero_terms=True),
}


# ---------------------------------------------------------------------------------------------- the worker


class Recorder(L.Callback):
    """Each rank's losses, the (synchronised) student gradients before every optimizer step, the final student
    and teacher weights and what the optimizer holds, saved to ``<out>/rank<r>.pt``."""

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self.record: dict = {"losses": [], "grads": []}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.record["losses"].append(float(outputs["loss"]))

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        if isinstance(trainer.strategy, FSDPStrategy):
            return  # each rank holds a shard of each gradient
        grads = {n: p.grad for n, p in module.student.named_parameters()}
        self.record["grads"].append({n: g if g is None else g.detach().clone() for n, g in grads.items()})

    def on_train_end(self, trainer, module) -> None:
        with _whole_parameters(trainer):
            for side in ("student", "teacher"):
                self.record[f"{side}_weights"] = {
                    n.replace("_fsdp_wrapped_module.", ""): p.detach().clone()
                    for n, p in getattr(module, side).named_parameters()
                }
        optimizer = trainer.optimizers[0]
        optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
        student = {id(p) for p in module.student.parameters()}
        with_state = {id(p) for p in optimizer.state}
        self.record["optimizer_holds_only_student"] = optimized <= student and with_state <= student
        units = [m for m in trainer.strategy.model.modules() if isinstance(m, FullyShardedDataParallel)]
        self.record["fsdp_units"] = sorted(type(m.module).__name__ for m in units)
        self.record["world_size"] = trainer.world_size
        self.record["strategy"] = type(trainer.strategy).__name__
        torch.save(self.record, self.out / f"rank{trainer.global_rank}.pt")


def _whole_parameters(trainer):
    """Under FSDP each rank holds a shard of every parameter: gather them (all ranks take part)."""
    if isinstance(trainer.strategy, FSDPStrategy):
        return FullyShardedDataParallel.summon_full_params(trainer.strategy.model)
    return contextlib.nullcontext()


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` on CPU processes (gloo), for the smoke test only.

    Lightning refuses FSDP without a GPU (an exact-type check, which a subclass passes) and wraps the module
    with ``device_id=None``, which torch's FSDP reads as "no accelerator"; given ``device_id=cpu`` torch
    shards on CPU. Everything else (auto-wrap policy, mixed precision, optimizer setup, checkpoints) is
    Lightning's.
    """

    def _setup_model(self, model):
        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):  # wrapped by an earlier fit
            return super()._setup_model(model)
        return FullyShardedDataParallel(
            module=model, cpu_offload=self.cpu_offload, mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs,
        )  # fmt: skip

    def lightning_module_state_dict(self):
        """Whole tensors on rank 0, as Lightning's, but without ``offload_to_cpu``: torch's FSDP copies an
        unsharded CPU parameter "to the CPU" by aliasing storage it then frees, and the clone crashes."""
        from torch.distributed.fsdp import FullStateDictConfig, StateDictType

        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FullyShardedDataParallel.state_dict_type(self.model, StateDictType.FULL_STATE_DICT, config):
            return self.model.state_dict()


def fixed_examples() -> list[dict]:
    """``STEPS`` global batches of ``GLOBAL_BATCH`` examples, ``SEQ_LEN`` tokens, right padding."""
    generator = torch.Generator().manual_seed(0)
    examples = []
    for i in range(STEPS * GLOBAL_BATCH):
        mask = (torch.arange(SEQ_LEN) < LENGTHS[i % 2]).long()
        input_ids = torch.randint(5, 25, (SEQ_LEN,), generator=generator) * mask  # [PAD] is 0
        label = torch.randint(0, 2, (), generator=generator)
        examples.append({"input_ids": input_ids, "attention_mask": mask, "labels": label})
    return examples


class SlicedBatches(L.LightningDataModule):
    """Rank r of w trains on slice r of every global batch, in micro-batches of ``global / w / accumulation``
    (the trainer's ``use_distributed_sampler=False`` keeps Lightning from adding its own sampler)."""

    def train_dataloader(self) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        share = GLOBAL_BATCH // world
        examples = fixed_examples()
        mine = [
            examples[step * GLOBAL_BATCH + rank * share + i] for step in range(STEPS) for i in range(share)
        ]
        return DataLoader(mine, batch_size=share // self.trainer.accumulate_grad_batches, shuffle=False)


def _without_zero_terms(output_loss, attention_loss, attention_weight):
    """``distillation_objective`` as it would be if it dropped a term of weight 0 (scenario "unused")."""
    if attention_weight == 1.0:
        return attention_loss
    return (1.0 - attention_weight) * output_loss + attention_weight * attention_loss


def fit(spec: dict) -> None:
    """Train ``STEPS`` optimizer steps as ``spec`` says; every rank saves its record to ``spec["out"]``."""
    import distill_lab.module
    import distill_lab.step
    from distill_lab.attention import AttentionDistillationLoss

    teacher = AutoModelForSequenceClassification.from_pretrained(spec["teacher"])
    student = AutoModelForSequenceClassification.from_pretrained(spec["student"])
    attention_loss = AttentionDistillationLoss("kl", "layerwise", spec["layer_map"], block_size=5)
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=0.1)
    module = distill_lab.module.DistillationModule(
        teacher,
        student,
        attention_loss,
        optimizer,
        attention_weight=spec["attention_weight"],
        warmup_ratio=0.0,
    )
    cfg = compose_config([f"trainer={spec['trainer']}"], spec["out"])
    kwargs = dict(spec.get("trainer_kwargs", {}))
    if kwargs.get("strategy") == "fsdp-on-cpu":  # the config's FSDPStrategy, on two CPU processes
        strategy = OmegaConf.merge(cfg.trainer.strategy, {"_target_": f"{__name__}.CPUFSDPStrategy"})
        kwargs.update(strategy=instantiate(strategy), accelerator="cpu", devices=2)
    trainer = instantiate(
        cfg.trainer, callbacks=[Recorder(spec["out"])], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_steps=STEPS, limit_val_batches=0,
        num_sanity_val_steps=0, use_distributed_sampler=False, **kwargs,
    )  # fmt: skip
    objective = (
        mock.patch.object(distill_lab.step, "distillation_objective", _without_zero_terms)
        if spec.get("drop_zero_terms")
        else contextlib.nullcontext()
    )
    with objective:
        trainer.fit(module, datamodule=SlicedBatches())


# ---------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """A 4-layer BERT teacher and a randomly initialised 2-layer student, saved by path."""
    from distill_lab.models import derive_student

    root = tmp_path_factory.mktemp("ddp-models")
    # a wider initialisation than BERT's 0.02 gives peaked attention, so the attention loss is not ~0
    task = make_text_task(root / "task", initializer_range=0.3)
    teacher = AutoModelForSequenceClassification.from_pretrained(task["teacher"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        student = derive_student(teacher, 2, init="random")
    student.save_pretrained(root / "student")
    return {"teacher": task["teacher"], "student": str(root / "student")}


def launch(spec: dict, out: Path, *, fails: bool = False) -> subprocess.CompletedProcess:
    """Run ``fit(spec)`` as ``python tests/test_ddp.py spec.json`` (the DDP launcher starts the other ranks),
    which must succeed, or with ``fails=True`` fail (``run_to_end``)."""
    out.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "out": str(out)}
    (out / "spec.json").write_text(json.dumps(spec))
    command = [sys.executable, __file__, str(out / "spec.json")]
    return run_to_end(command, app_env(out, PYTHONWARNINGS="ignore"), fails=fails)


def run_ranks(spec: dict, out: Path) -> list[dict]:
    launch(spec, out)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def run_one_process(spec: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    fit({**spec, "trainer": "cpu", "out": str(out)})
    return torch.load(out / "rank0.pt")


def step_losses(ranks: list[dict], accumulate: int = 1) -> torch.Tensor:
    """The loss of each optimizer step on the whole global batch: the mean over ranks of the sum over
    micro-batches (Lightning hands ``on_train_batch_end`` the loss divided by ``accumulate_grad_batches``)."""
    losses = torch.tensor([r["losses"] for r in ranks], dtype=torch.float64)  # (ranks, steps * accumulate)
    return losses.view(len(ranks), STEPS, accumulate).sum(-1).mean(0)


def assert_same_training(one: dict, ranks: list[dict], accumulate: int = 1, rtol=1e-5, atol=1e-6) -> None:
    """Same loss per step, same gradients before each optimizer step (on every rank), same final weights."""
    torch.testing.assert_close(step_losses(ranks, accumulate), step_losses([one]), rtol=rtol, atol=atol)
    for rank in ranks:
        assert len(rank["grads"]) == len(one["grads"]) == STEPS
        for step, (expected, got) in enumerate(zip(one["grads"], rank["grads"], strict=True)):
            assert expected.keys() == got.keys()
            for name, grad in expected.items():
                if grad is None:
                    assert got[name] is None, f"step {step}: {name} has a gradient here, none in one process"
                else:
                    torch.testing.assert_close(
                        got[name], grad, rtol=rtol, atol=atol, msg=f"step {step}: {name}"
                    )
        for name, weight in one["student_weights"].items():
            torch.testing.assert_close(rank["student_weights"][name], weight, rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------- trainer=ddp


def test_ddp_config_is_lightning_ddp_that_tolerates_unused_parameters(tmp_path):
    cfg = compose_config(["trainer=ddp", "trainer.accelerator=cpu"], tmp_path)  # two processes on any machine
    trainer = instantiate(cfg.trainer, logger=False, enable_progress_bar=False)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    assert trainer.strategy._ddp_kwargs == {"find_unused_parameters": True}
    assert trainer.accumulate_grad_batches == 1 and cfg.trainer.accumulate_grad_batches == 1


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ddp_processes_train_like_one_process_on_the_global_batch(models, tmp_path, scenario):
    """Two gloo processes, each on half of every batch of 8, take the same two optimizer steps as one process
    on the whole batch: the same loss, the same (all-reduced, then clipped) gradients, the same weights."""
    spec = {**models, **SCENARIOS[scenario]}
    one = run_one_process(spec, tmp_path / "one")
    ranks = run_ranks({**spec, "trainer": "ddp"}, tmp_path / "ddp")
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0]["strategy"] == "DDPStrategy"
    assert_same_training(one, ranks)
    grads = one["grads"][0]
    if scenario == "all-used":
        assert all(g is not None and g.any() for g in grads.values())
    elif scenario == "zero-weight":  # the head gets a gradient of zeros: SGD's weight decay still moves it
        assert grads["classifier.weight"] is not None and not grads["classifier.weight"].any()
    else:  # no gradient at all for the head, layer 1 and layer 0 past its attention scores
        unused = {n for n, g in grads.items() if g is None}
        assert {"classifier.weight", "bert.pooler.dense.weight",
                "bert.encoder.layer.1.attention.self.query.weight",
                "bert.encoder.layer.0.attention.self.value.weight"} <= unused  # fmt: skip
        assert "bert.encoder.layer.0.attention.self.query.weight" not in unused
        initial = AutoModelForSequenceClassification.from_pretrained(models["student"]).state_dict()
        for name in unused:  # an unused parameter is left alone (no weight decay), on every rank
            for record in (one, *ranks):
                torch.testing.assert_close(record["student_weights"][name], initial[name], rtol=0, atol=0)


@pytest.mark.slow
def test_plain_ddp_refuses_unused_parameters(models, tmp_path):
    """Why conf/trainer/ddp.yaml sets find_unused_parameters: without it, the second step fails."""
    spec = {**models, **SCENARIOS["unused"], "trainer": "ddp", "trainer_kwargs": {"strategy": "ddp"}}
    result = launch(spec, tmp_path, fails=True)
    assert "parameters that were not used in producing the loss" in result.stderr  # Lightning's wording
    assert not (tmp_path / "rank0.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["all-used", "unused"])
def test_ddp_with_gradient_accumulation_trains_like_one_process(models, tmp_path, scenario):
    """accumulate_grad_batches=2 on two processes (micro-batches of 2) equals one process on batches of 8."""
    spec = {**models, **SCENARIOS[scenario]}
    one = run_one_process(spec, tmp_path / "one")
    accumulated = {**spec, "trainer_kwargs": {"accumulate_grad_batches": 2}}
    assert_same_training(one, [run_one_process(accumulated, tmp_path / "one-accumulated")], accumulate=2)
    assert_same_training(one, run_ranks({**accumulated, "trainer": "ddp"}, tmp_path / "ddp"), accumulate=2)


def train_py_command(tmp_path: Path, *overrides: str) -> tuple[list[str], dict, Path]:
    """``python train.py`` on a tiny text task (two processes with trainer=ddp or fsdp): command, environment
    and run directory."""
    task = make_text_task(tmp_path / "task")
    out = tmp_path / "run"
    command = train_py(
        *task["overrides"], "student.num_layers=2", "debug=fast", "data.max_train_samples=32", "logger=csv",
        "fused_kernel=false", f"hydra.run.dir='{out}'", f"paths.cache_dir='{tmp_path / 'cache'}'", *overrides,
    )  # fmt: skip
    return command, app_env(tmp_path, PYTHONWARNINGS="ignore"), out


def run_train_py(tmp_path: Path, *overrides: str) -> tuple[Path, subprocess.CompletedProcess]:
    """Runs ``train_py_command`` to the end, which must succeed; returns the run directory and the result."""
    command, env, out = train_py_command(tmp_path, *overrides)
    return out, run_to_end(command, env)


@pytest.mark.slow
def test_train_py_with_trainer_ddp_writes_the_run_outputs_once(tmp_path):
    """``python train.py trainer=ddp``: Lightning starts rank 1 in the same run directory; the data is split
    between the two processes and rank 0 alone writes config.yaml, results.json and the exported student. The
    31 validation examples, which Lightning's sampler pads to 32 by repeating the first, are each counted
    once: the reported accuracies are those of one process over the whole validation set."""
    out, result = run_train_py(tmp_path, *CPU_DDP, "data.max_eval_samples=31")

    assert (out / "train_ddp_process_1.log").is_file()  # rank 1 ran, in rank 0's run directory
    assert result.stdout.count("distillation result") == 1  # the summary printed after results.json: once
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["student"]["acc"] <= 1.0 and results["inference"]["speedup"] > 0
    assert "${" not in (out / "config.yaml").read_text()
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2
    # 32 examples in batches of 8 over two processes: 2 steps per epoch (4 in one process)
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 2
    assert str(out / "checkpoints" / "best.ckpt") == results["best_checkpoint"]

    from distill_lab.builtin import evaluate
    from distill_lab.data import TextClassificationData, local_files
    from distill_lab.models import load_tokenizer

    config = yaml.safe_load((out / "config.yaml").read_text())
    files = {k: config["data"]["dataset"][k] for k in ("train_file", "validation_file")}
    data = TextClassificationData(
        local_files(**files),
        load_tokenizer(str(out / "student")),
        max_eval_samples=31,
        seed=config["data"]["seed"],
    )
    data.setup()
    assert len(data.splits["validation"]) == 31
    teacher = AutoModelForSequenceClassification.from_pretrained(tmp_path / "task" / "teacher")
    for role, model in (("student", student), ("teacher", teacher)):
        scores = evaluate(model, data.val_dataloader(), "sequence_classification")
        assert results[role]["acc"] == pytest.approx(scores["acc"], abs=1e-6), role


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "eval_batch_size"), [("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)])
def test_validation_on_two_processes_counts_each_example_once(tmp_path, strategy, eval_batch_size):
    """31 validation examples on two processes: Lightning's sampler pads the set to 32, so rank 1's last batch
    ends with the first example again: all of it in batches of one (its metric update of no rows crashed the
    run), half of it in batches of two (its losses averaged the repeat in). The metrics and the attention
    losses that results.json reports (the final validation's ``val/attention/*``) are those of one process
    over the 31 examples. Every example is cut to 6 tokens, so no batch holds padding and a batch's loss is
    the mean of its examples' whatever the batching. The runs train nothing (``trainer.max_epochs=0``): both
    validate the same student, initialised from the seed. Under FSDP every process runs the forward on its
    whole batch, and the losses and metrics are taken again over its own rows from that forward's logits and
    attention. The hidden-state losses (``hidden=mse``, through the projections of a student half the
    teacher's width) follow the same rows. So do the scores of a held-out test split of 31 examples
    (``data.dataset.test_file``), which the DDP runs score at their end (FSDP refuses one: test_evaluate)."""
    test_file = tmp_path / "test.csv"
    synthetic_relations(num_train=1, num_validation=31, seed=5)["validation"].to_pandas()[
        ["text", "label"]
    ].to_csv(test_file, index=False)
    common = [
        "data.max_eval_samples=31", f"data.eval_batch_size={eval_batch_size}", "data.max_length=6",
        "trainer.limit_val_batches=null", "trainer.max_epochs=0", "student.init=random",
        "callbacks.attention_maps=null", "hidden=mse", "student.hidden_size=16",
        *([f"data.dataset.test_file='{test_file}'"] if strategy == "ddp" else []),  # not under FSDP
    ]  # fmt: skip
    ddp, _ = run_train_py(tmp_path / "ddp", *(CPU_DDP if strategy == "ddp" else FSDP_ON_CPU), *common)
    one, _ = run_train_py(tmp_path / "one", *common)
    reported, expected = (json.loads((d / "results.json").read_text()) for d in (ddp, one))
    assert reported["student"] == pytest.approx(expected["student"], abs=1e-6)
    if strategy == "ddp":
        assert reported["test"]["examples"] == expected["test"]["examples"] == 31
        for role in ("student", "teacher"):
            assert reported["test"][role] == pytest.approx(expected["test"][role], abs=1e-6), role
    for losses in ("attention_loss", "hidden_loss"):
        assert sorted(reported[losses]) == sorted(expected[losses]) and expected[losses], losses
        for pair, value in expected[losses].items():
            assert reported[losses][pair] == pytest.approx(value, rel=1e-5), (losses, pair)


@pytest.mark.slow
def test_ctrl_c_in_one_ddp_process_saves_and_stops_without_waiting_for_the_other(tmp_path):
    """SIGINT to rank 0 alone, while rank 1 goes on into the next gradient all-reduce: rank 0 writes
    ``interrupted.ckpt`` without a barrier (every DDP process holds the whole model) and the run ends."""
    command, env, out = train_py_command(
        tmp_path, *CPU_DDP, "trainer.max_epochs=500", "trainer.limit_train_batches=null",
        "callbacks.attention_maps=null", "callbacks.last_checkpoint.every_n_train_steps=2",
    )  # fmt: skip
    run = TrainRun(command, env=env, log=tmp_path / "run.log")
    run.wait_for_checkpoint(min_step=2, last=out / "checkpoints" / "last.ckpt")
    assert run.process.poll() is None, "the run ended before it could be interrupted"
    run.interrupt()  # rank 0 only: Lightning started rank 1 as a child process
    returncode, output = run.wait(120), run.output()  # both processes ended: the interrupted run did not hang
    assert returncode != 0 and "KeyboardInterrupt" in output, output[-3000:]
    state = torch.load(out / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] >= 2 and not any(k.startswith("teacher.") for k in state["state_dict"])
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


@pytest.mark.slow
def test_non_finite_loss_in_one_ddp_process_stops_every_process_before_the_update(tmp_path):
    """A NaN loss on rank 1 alone: both processes decide together after backward and raise the named
    FloatingPointError, instead of rank 0 going on into the next collective; no checkpoint holds the step."""
    command, env, out = train_py_command(
        tmp_path, *CPU_DDP, *callback_overrides("poison", PoisonLoss, part="output", step=1, rank=1),
        "callbacks.attention_maps=null", "checkpoint_every_n_steps=1",
    )  # fmt: skip
    result = run_to_end(command, env, timeout=300, fails=True)
    output = result.stdout + result.stderr
    assert "non-finite loss at step 1 (epoch 0, batch 1): output loss = nan" in output  # rank 1's own message
    assert "non-finite loss at step 1 (epoch 0) in another process" in output  # rank 0's
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints == ["last.ckpt"]  # no interrupted.ckpt of the stopped step
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 1


DDP_EPOCHS, DDP_STEPS_PER_EPOCH = 3, 4  # 64 examples in batches of 8 on each of two processes
DDP_RESUMES = {  # (hook, step, checkpoint_every_n_steps, what the rerun resumes from, its step)
    # a SIGKILL after the step checkpoint of step 5 (epoch 1, after its first batch);
    # the crash only stops the run
    "killed-after-a-step-checkpoint": ("on_train_batch_start", 6, 5, "last.ckpt", 5),
    # an exception during step 5 (epoch 1, batch 1): interrupted.ckpt, written by rank 0 alone,
    # repeats that batch
    "exception-during-a-step": ("on_before_backward", 5, 100, "interrupted.ckpt", 5),
    # an exception in epoch 1's validation, after its last step (8): interrupted.ckpt resumes
    # by running it again
    "exception-during-a-validation": ("on_validation_start", 8, 100, "interrupted.ckpt", 8),
    # in both, the two processes' random states differ when the checkpoint is written
    # (as they do at most steps)
}


@pytest.fixture(scope="module")
def ddp_resume_task(tmp_path_factory):
    """The tiny task of ``test_resume`` (dropout on, 64 training examples, batches of 8, 3 epochs) under
    ``trainer=ddp`` on two CPU processes, and its uninterrupted run's directory."""
    root = tmp_path_factory.mktemp("ddp-resume")
    task = make_text_task(root / "task", hidden_dropout_prob=0.1)
    overrides = [*task["overrides"], *RUN, *CPU_DDP, f"paths.cache_dir='{root / 'cache'}'"]
    reference = root / "reference"
    run_to_end(train_py(*overrides, f"hydra.run.dir='{reference}'"), app_env(root, PYTHONWARNINGS="ignore"))
    return root, overrides, reference


@pytest.mark.slow
@pytest.mark.parametrize("case", list(DDP_RESUMES))
def test_a_ddp_run_resumed_mid_epoch_ends_as_the_uninterrupted_one(ddp_resume_task, tmp_path, case):
    """Two processes stopped in epoch 1 and rerun: each continues its share of the epoch's seeded order at the
    batch after the checkpoint (not from the epoch's start, as Lightning's own DistributedSampler would), with
    its own random state (restored from the checkpoint, which holds every process's), so the run ends with the
    uninterrupted run's weights, results, validation history and logged losses."""
    root, overrides, reference = ddp_resume_task
    hook, step, every, checkpoint, resumed_step = DDP_RESUMES[case]
    out = tmp_path / "run"
    command = train_py(*overrides, f"hydra.run.dir='{out}'", f"checkpoint_every_n_steps={every}")
    env = app_env(tmp_path, PYTHONWARNINGS="ignore")
    crashed = run_to_end(
        [*command, *callback_overrides("crash", Crash, hook=hook, step=step)], env, fails=True
    )
    assert f"test crash in {hook} at step {step}" in crashed.stdout + crashed.stderr
    if checkpoint == "last.ckpt":
        (out / "checkpoints" / "interrupted.ckpt").unlink()  # as a SIGKILL leaves the run
    state = torch.load(out / "checkpoints" / checkpoint, map_location="cpu", weights_only=True)
    assert state["global_step"] == resumed_step
    epoch, batches = divmod(resumed_step, DDP_STEPS_PER_EPOCH)  # where the next batch starts
    assert state["TextClassificationData"] == {
        "train_position": [epoch, batches * 8]
    }  # examples of each process
    rank0, rank1 = state["rng_states"]  # each process's own random state
    assert not torch.equal(rank0["torch"], rank1["torch"]) and torch.equal(
        rank0["torch"], state["rng_state"]["torch"]
    )

    result = run_to_end(command, env)
    assert (
        f"Restored all states from the checkpoint at {out / 'checkpoints' / checkpoint}"
        in result.stdout + result.stderr
    )
    assert_same_result(out, reference)  # the best checkpoint's evaluation and export
    last, reference_last = (
        torch.load(d / "checkpoints" / "last.ckpt", map_location="cpu") for d in (out, reference)
    )
    assert last["global_step"] == reference_last["global_step"] == DDP_EPOCHS * DDP_STEPS_PER_EPOCH
    for name, weight in reference_last["state_dict"].items():  # the final weights
        torch.testing.assert_close(last["state_dict"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert validation_history(out) == validation_history(reference)
    losses, reference_losses = train_losses(out, version=1), train_losses(reference)
    assert sorted(losses) == list(range(resumed_step, DDP_EPOCHS * DDP_STEPS_PER_EPOCH))
    assert losses == pytest.approx({s: reference_losses[s] for s in losses}, rel=1e-6, abs=1e-9)


def torchrun(*overrides: str) -> list[str]:
    """``torchrun --standalone --nproc_per_node=2 train.py *overrides``: two processes that each
    run train.py."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(REPO_ROOT / "train.py"),
        *overrides,
    ]  # fmt: skip


@pytest.mark.slow
def test_under_torchrun_every_process_resumes_the_same_checkpoint_with_the_same_command(
    ddp_resume_task, tmp_path
):
    """torchrun starts both processes, each running train.py with ckpt_path=auto: without a named run
    directory (each process would compose its own from the clock) they stop before anything is loaded; with
    one, a run stopped by an exception during step 5 is resumed by the same command in both processes from
    rank 0's interrupted.ckpt, and ends as the uninterrupted run (Lightning's own DDP launcher) does."""
    root, overrides, reference = ddp_resume_task
    env = app_env(tmp_path, PYTHONWARNINGS="ignore")
    unnamed = subprocess.run(
        torchrun(*overrides), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert unnamed.returncode != 0
    assert "one of several that torchrun or srun started" in unnamed.stdout + unnamed.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))

    out = tmp_path / "run"
    command = torchrun(*overrides, f"hydra.run.dir='{out}'")
    run_to_end(
        [*command, *callback_overrides("crash", Crash, hook="on_before_backward", step=5)], env, fails=True
    )
    assert (
        torch.load(out / "checkpoints" / "interrupted.ckpt", map_location="cpu", weights_only=True)[
            "global_step"
        ]
        == 5
    )
    result = run_to_end(command, env)
    assert f"resuming from {out / 'checkpoints' / 'interrupted.ckpt'}" in result.stdout + result.stderr
    assert_same_result(out, reference)
    losses, reference_losses = train_losses(out, version=1), train_losses(reference)
    assert sorted(losses) == list(range(5, DDP_EPOCHS * DDP_STEPS_PER_EPOCH))
    assert losses == pytest.approx({s: reference_losses[s] for s in losses}, rel=1e-6, abs=1e-9)


# ---------------------------------------------------------------------------------------------- trainer=fsdp


def test_fsdp_config_builds_lightning_fsdp_with_the_expected_settings(tmp_path, tiny_model_factory):
    from lightning.pytorch.plugins.precision import FSDPPrecision
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    cfg = compose_config(["trainer=fsdp"], tmp_path)
    node = cfg.trainer
    assert node.accelerator == "gpu" and node.precision == "bf16-mixed" and node.gradient_clip_val is None
    strategy = instantiate(node.strategy)  # the strategy alone builds without a GPU
    assert type(strategy) is FSDPStrategy
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy._state_dict_type == "full"
    assert (
        strategy.kwargs["use_orig_params"] is True
    )  # frozen teacher and trained student share the root unit
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    blocks = {"bert": "BertLayer", "llama": "LlamaDecoderLayer", "gpt2": "GPT2Block", "vit": "ViTLayer"}
    for family, block in blocks.items():
        model = tiny_model_factory(family)
        wrapped = [type(m).__name__ for m in model.modules() if policy(m, recurse=False, nonwrapped_numel=0)]
        assert wrapped == [block] * 3, family  # one unit per transformer block, nothing else
    mixed = FSDPPrecision(node.precision).mixed_precision_config
    assert mixed.param_dtype == mixed.reduce_dtype == torch.bfloat16
    if not torch.cuda.is_available():  # the trainer composes; only a machine without a GPU refuses it
        with pytest.raises(Exception, match="No supported gpu backend|requires a GPU"):
            instantiate(node, logger=False)


@pytest.mark.slow
@pytest.mark.parametrize(("precision", "tolerance"), [("32-true", 1e-5), ("bf16-mixed", 2e-2)])
def test_fsdp_on_two_cpu_processes_trains_like_one_process(models, tmp_path, precision, tolerance):
    """trainer=fsdp's strategy (through ``CPUFSDPStrategy``, two gloo processes) shards teacher and student
    block by block, trains only the student, and takes the same steps as one process on the whole batch
    (float32: to rounding; bf16-mixed: to bf16's precision). The config does not clip gradients under FSDP,
    so neither does the reference."""
    spec = {**models, **SCENARIOS["all-used"]}
    one = run_one_process({**spec, "trainer_kwargs": {"gradient_clip_val": None}}, tmp_path / "one")
    fsdp = {**spec, "trainer": "fsdp", "trainer_kwargs": {"strategy": "fsdp-on-cpu", "precision": precision}}
    ranks = run_ranks(fsdp, tmp_path / "fsdp")
    assert [r["strategy"] for r in ranks] == ["CPUFSDPStrategy"] * 2 and ranks[0]["world_size"] == 2
    # the root unit (embeddings and heads of both models) and one unit per block: 4 teacher, 2 student
    assert ranks[0]["fsdp_units"] == sorted(["DistillationModule"] + ["BertLayer"] * 6)
    losses = step_losses(ranks)
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, step_losses([one]), rtol=tolerance, atol=tolerance)
    teacher = AutoModelForSequenceClassification.from_pretrained(models["teacher"]).state_dict()
    for rank in ranks:
        assert rank["optimizer_holds_only_student"]  # the teacher has no optimizer state
        assert rank["student_weights"].keys() == one["student_weights"].keys()
        for name, weight in one["student_weights"].items():
            got = rank["student_weights"][name]
            torch.testing.assert_close(got, weight, rtol=tolerance, atol=tolerance, msg=name)
        for name, weight in rank["teacher_weights"].items():  # frozen
            torch.testing.assert_close(weight, teacher[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_train_py_with_trainer_fsdp_evaluates_and_exports_the_whole_student(tmp_path):
    """``python train.py trainer=fsdp`` end to end on two CPU processes (``CPUFSDPStrategy``), with selective
    matching, whose calibration needs whole parameters: every part that touches the sharded models runs on all
    processes, and the checkpoint and the exported student hold whole tensors."""
    out, result = run_train_py(tmp_path, *FSDP_ON_CPU, "matching=selective", "matching.top_k=2")

    assert result.stdout.count("distillation result") == 1
    results = json.loads((out / "results.json").read_text())
    assert results["inference"] is None  # the teacher exists only in shards: not timed
    assert results["parameters"]["teacher"] == sum(  # counted before sharding
        p.numel()
        for p in AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "task" / "teacher"
        ).parameters()
    )
    assert sorted(results["selected_heads"]) == [pair for pair in results["attention_loss"]]  # calibrated
    [image] = (out / "attention_maps").glob("epoch0-step*.png")  # one validation, at the epoch's end
    assert image.stat().st_size > 1000

    # the checkpoint holds whole student tensors, and the export equals it
    best = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert best["global_step"] == 2 and "selected_heads" in best
    student = AutoModelForSequenceClassification.from_pretrained(out / "student")
    exported = student.state_dict()
    saved = {k.removeprefix("student."): v for k, v in best["state_dict"].items() if k.startswith("student.")}
    assert saved.keys() == exported.keys() and not any(k.startswith("teacher.") for k in best["state_dict"])
    for name, weight in saved.items():
        torch.testing.assert_close(exported[name], weight, rtol=0, atol=0, msg=name)
    initial = AutoModelForSequenceClassification.from_pretrained(tmp_path / "task" / "teacher").state_dict()
    assert not torch.equal(exported["classifier.weight"], initial["classifier.weight"])  # trained


@pytest.mark.slow
def test_an_exception_under_fsdp_writes_no_interrupted_checkpoint(tmp_path):
    """An exception in the FSDP processes writes no ``interrupted.ckpt`` (gathering the shards needs every
    process, which an exception may have left anywhere): ``last.ckpt`` stays the newest checkpoint, the one
    ``ckpt_path=auto`` resumes from."""
    from distill_lab.resume import find_previous_run

    command, env, out = train_py_command(
        tmp_path, *FSDP_ON_CPU, *callback_overrides("crash", Crash, hook="on_train_batch_start", step=1),
        "callbacks.attention_maps=null", "checkpoint_every_n_steps=1",
    )  # fmt: skip
    result = run_to_end(command, env, timeout=300, fails=True)
    output = result.stdout + result.stderr
    assert "test crash in on_train_batch_start at step 1" in output, output[-3000:]
    checkpoints = out / "checkpoints"
    assert f"not writing {checkpoints / 'interrupted.ckpt'}: under FSDP it needs every process" in output
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt"]
    state = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["global_step"] == 1 and not (out / "results.json").exists()
    assert find_previous_run(out)[0] == checkpoints / "last.ckpt"


if __name__ == "__main__":  # a worker started by launch(); the DDP launcher starts rank 1 by running it again
    torch.set_num_threads(1)
    fit(json.loads(Path(sys.argv[1]).read_text()))
