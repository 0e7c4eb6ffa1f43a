"""What a run leaves behind once it has trained: the best checkpoint's evaluation, the exported student, the
models' throughput, ``results.json`` and the printed summary.

:func:`evaluate_and_export` does it all, after ``Trainer.fit``, in every process of a distributed run (the
evaluation and gathering a sharded student need them all); rank 0 alone writes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from huggingface_hub import HfApi
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from rich.console import Console
from rich.table import Table
from torch.utils import benchmark

from distill_lab import __version__, lora, model_card
from distill_lab.held_out import held_out_scores
from distill_lab.models import count_parameters

log = logging.getLogger(__name__)

RESULTS = "results.json"
THROUGHPUT_SECONDS = 1.0  # timing per model (export.throughput_seconds), split over the rounds


def parameter_counts(teacher: torch.nn.Module, student: torch.nn.Module) -> dict:
    """The two models' sizes and their ratio; counted before ``fit``, as a sharded strategy leaves each
    process a part of every tensor."""
    # a LoRA student counts as the model its adapters merge into: the adapters are no weights it runs with
    size = lora.merged_parameter_count(student) if lora.is_peft_model(student) else count_parameters(student)
    counts = {"teacher": count_parameters(teacher), "student": size}
    return counts | {"compression": counts["teacher"] / counts["student"]}


def best_checkpoint(trainer: L.Trainer, module: L.LightningModule, output_dir: Path) -> str | None:
    """The checkpoint the final evaluation and the export take: the best validated one. Warns when optimizer
    steps came after the last validation (the export leaves them out). Under FSDP without a checkpoint
    callback the trained weights are saved to ``checkpoints/final.ckpt`` first (every process takes part), as
    the evaluation needs a module wrapped anew that takes its weights from a checkpoint."""
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    validated = getattr(module, "validated_step", None)
    if best and validated is not None and trainer.global_step > validated:
        log.warning(
            "the last %d optimizer steps (after the validation at step %d) were never validated: student/ "
            "and results.json are the best validated checkpoint's, without them. To have the final weights "
            "validated, make trainer.max_steps a multiple of trainer.val_check_interval (or of the batches "
            "of an epoch).", trainer.global_step - validated, validated,
        )  # fmt: skip
    if not best and isinstance(trainer.strategy, FSDPStrategy):
        best = str(output_dir / "checkpoints" / "final.ckpt")
        trainer.save_checkpoint(best)
    return best or None


def evaluate(trainer: L.Trainer, module: L.LightningModule, data, best: str | None) -> dict[str, float]:
    """The validation metrics of ``best`` (the module's weights as they are if None). This evaluation is no
    point of the validation curve (it would show an epoch that never ran, with an earlier epoch's numbers):
    the loggers get its values under ``best/`` instead, at the last step."""
    loggers, trainer.loggers = trainer.loggers, []
    try:
        final = trainer.validate(module, datamodule=data, ckpt_path=best, verbose=False)[0]
    finally:
        trainer.loggers = loggers
    for each in loggers:
        each.log_metrics(
            {f"best/{k.removeprefix('val/')}": v for k, v in final.items()}, step=trainer.global_step
        )
        each.save()
    return final


@torch.no_grad()
def measure_throughput(
    models: dict, batches, min_run_time: float = THROUGHPUT_SECONDS, rounds: int = 2
) -> dict[str, dict]:
    """Examples per second of each model's forward over ``batches`` (one pass: every batch once), by name,
    timed by ``torch.utils.benchmark.Timer.blocked_autorange``: it warms up while choosing how many passes
    make one timed block (enough that the timer's own cost is negligible), synchronises CUDA, and times
    blocks until ``min_run_time / rounds`` seconds are spent. The models take turns, round by round, so that a
    machine whose load changes meanwhile slows each alike; each model's rounds are then merged.

    Returns:
        ``{name: {"median", "iqr", "runs", "examples_per_pass"}}``: the median and the interquartile range
        of the examples per second over the timed runs (a run is one pass, a block's mean), their count, and
        the examples in one pass.
    """
    inputs, runs = {}, {name: [] for name in models}
    for name, model in models.items():
        model.eval()
        device = next(model.parameters()).device
        inputs[name] = [{k: v.to(device) for k, v in b.items() if k != "labels"} for b in batches]
    examples = sum(next(iter(b.values())).shape[0] for b in batches)
    for _ in range(rounds):
        for name, model in models.items():
            timer = benchmark.Timer(
                stmt="for batch in batches: model(**batch)",
                globals={"model": model, "batches": inputs[name]},
                num_threads=torch.get_num_threads(),  # the Timer's default is one thread
            )
            runs[name].append(timer.blocked_autorange(min_run_time=min_run_time / rounds))
    speeds = {}
    for name, measured in runs.items():
        (merged,) = benchmark.Measurement.merge(measured)
        per_s = torch.tensor([examples / t for t in merged.times], dtype=torch.float64)
        low, median, high = torch.quantile(per_s, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
        speeds[name] = {
            "median": float(median),
            "iqr": float(high - low),
            "runs": len(per_s),
            "examples_per_pass": examples,
        }
    return speeds


def whole_student(trainer: L.Trainer, sharded_student: torch.nn.Module) -> torch.nn.Module:
    """A copy of the FSDP-sharded student, whole, on rank 0's CPU (the shard elsewhere). Every process must
    call this: gathering the full state dict is a collective."""
    state = trainer.strategy.lightning_module_state_dict()  # whole tensors on rank 0, empty on the others
    if not trainer.is_global_zero:
        return sharded_student
    prefix = "student."
    student = type(sharded_student)(sharded_student.config)
    student.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    if getattr(sharded_student, "generation_config", None) is not None:
        student.generation_config = sharded_student.generation_config
    return student.eval()


def evaluate_and_export(
    trainer: L.Trainer,
    module: L.LightningModule,
    data,
    best: str | None,
    *,
    preprocessor,
    parameters: dict,
    optimized_metric: str,
    output_dir: Path,
    config: dict,
    command: list[str] | None = None,
) -> dict[str, float]:
    """Evaluate ``best``, save the student, the preprocessor and the model card to ``output_dir/student``,
    time both models, write ``results.json``, print the summary and, with ``export.push_to_hub``, upload the
    student; returns the metrics ``train`` returns (to a sweeper). ``config`` is the run's resolved config
    and ``command`` its command-line overrides, both for the card. Every process calls this; rank 0 alone
    writes, and the others return their metrics after the evaluation."""
    final = evaluate(trainer, module, data, best)
    test = held_out_scores(trainer, module, data)  # on best's weights, just loaded; None without a test split
    metric_names = [k.removeprefix("val/") for k in module.val_metrics.keys(keep_base=False)]
    student_scores = {
        k.removeprefix("val/"): v for k, v in final.items() if k.removeprefix("val/") in metric_names
    }
    # both models back on their own attention: the export must not name the capture's implementation, and the
    # throughput must not time the teacher with its capture (eager maps or recorded queries) attached
    module.student_capture.detach()
    module.teacher_capture.detach()
    sharded = isinstance(trainer.strategy, FSDPStrategy)
    # every process holds a shard: gather the whole student (all take part) for rank 0 to save
    student = whole_student(trainer, module.student) if sharded else module.student
    if not trainer.is_global_zero:
        return {f"val/{k}": v for k, v in student_scores.items()} | module.teacher_scores
    student_dir = output_dir / "student"
    settings = config.get("export") or {}
    adapters = None
    if lora.is_peft_model(student):  # the adapter in student/, its frozen base in student/base (lora.py)
        merge = bool(settings.get("merge_lora"))
        adapters = lora.save_lora_student(student, student_dir, merge=merge, preprocessor=preprocessor)
    else:
        student.save_pretrained(student_dir)
    preprocessor.save_pretrained(student_dir)
    if sharded:  # the teacher exists only as shards across the processes: nothing to time on one device
        log.info(
            "inference speed not measured under FSDP: the teacher is sharded; the student is in %s",
            student_dir,
        )
    seconds = settings.get("throughput_seconds") or THROUGHPUT_SECONDS
    inference, throughput = (
        (None, None) if sharded else inference_speed(module.teacher, student, data, seconds)
    )
    results = {
        "task": module.task.name,
        "optimized_metric": optimized_metric.removeprefix("val/"),  # what summarize ranks the runs by
        "student": student_scores,
        "teacher": {k.removeprefix("val/teacher_"): v for k, v in module.teacher_scores.items()},
        "parameters": parameters,
        "inference": inference,
        "throughput": throughput,  # each model's median and spread (IQR) of examples/s
        "attention_loss": {
            k.removeprefix("val/attention/"): v for k, v in final.items() if k.startswith("val/attention/")
        },
        "layer_map": [list(p) for p in module.attention_loss.layer_map],
        "selected_heads": getattr(module.attention_loss.matching, "selected", None) or None,
        "best_checkpoint": best,
        "student_dir": str(student_dir),
        "trained_steps": trainer.global_step,  # optimizer steps; 0: the student as built, untrained
    }
    if getattr(module, "hidden_loss", None) is not None:  # hidden=mse or cosine: recorded as the attention's
        prefix = "val/hidden/"
        results["hidden_loss"] = {k.removeprefix(prefix): v for k, v in final.items() if k.startswith(prefix)}
        results["hidden_layer_map"] = [list(p) for p in module.hidden_loss.layer_map]
    if test is not None:  # the held-out split's scores of the best checkpoint
        results["test"] = test
    if adapters is not None:
        results["lora"] = adapters
    results.update(_gap(results, module.val_metrics))
    (output_dir / RESULTS).write_text(json.dumps(results, indent=2))
    layers = {"teacher": module.teacher.config.num_hidden_layers, "student": student.config.num_hidden_layers}
    repo_id = settings["hub_model_id"] if settings.get("push_to_hub") else None
    model_card.write_card(
        student_dir, results, config, layers=layers, command=command, version=__version__, repo_id=repo_id
    )
    print_summary(results)
    close_logger(trainer.logger)
    if repo_id:
        push_student(student_dir, repo_id, private=settings.get("private"))
    return returned_metrics(results)


def push_student(student_dir: Path, repo_id: str, *, private: bool | None = None) -> None:
    """Upload ``student_dir`` (weights, preprocessor, model card) to the hub model repository ``repo_id``,
    made if it does not exist; the token is ``huggingface_hub``'s own (``HF_TOKEN`` or ``hf auth login``),
    checked before training (``checks.check_export``)."""
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=str(student_dir),
        repo_type="model",
        commit_message="Upload the student distilled by distill-lab",
    )
    log.info("student uploaded to https://huggingface.co/%s", repo_id)


def inference_speed(
    teacher: torch.nn.Module, student: torch.nn.Module, data, seconds: float = THROUGHPUT_SECONDS
) -> tuple[dict[str, float], dict[str, dict]]:
    """Both models' throughput on four validation batches (:func:`measure_throughput`, ``seconds`` of timing
    per model): the summary (the medians' examples per second and the student's speed-up, the ratio of the
    medians) and each model's median and spread."""
    batches = [data.example_batch("validation", data.eval_batch_size)] * 4
    speeds = measure_throughput({"teacher": teacher, "student": student}, batches, seconds)
    summary = {
        "teacher_examples_per_s": speeds["teacher"]["median"],
        "student_examples_per_s": speeds["student"]["median"],
        "speedup": speeds["student"]["median"] / speeds["teacher"]["median"],
    }
    return summary, speeds


def _gap(results: dict, val_metrics) -> dict:
    """How far the student is behind, positive when worse: teacher - student for accuracy, the reverse for
    perplexity; with each metric's direction."""
    higher = {
        name.removeprefix("val/"): bool(metric.higher_is_better)
        for name, metric in val_metrics.items(keep_base=False)
    }
    gap = {
        k: (results["teacher"][k] - v) * (1 if higher.get(k, True) else -1)
        for k, v in results["student"].items()
        if k in results["teacher"]
    }
    return {"higher_is_better": higher, "gap": gap}


def print_summary(results: dict) -> None:
    """The results as a table: each metric of teacher and student (validation, and the held-out test where
    there is one), their sizes and inference speeds."""
    table = Table(title="distillation result")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    for name in results["student"]:
        table.add_row(
            name, f"{results['teacher'].get(name, float('nan')):.4f}", f"{results['student'][name]:.4f}"
        )
    test = results.get("test")
    for name in (test or {}).get("student", {}):
        table.add_row(
            f"test {name}", f"{test['teacher'].get(name, float('nan')):.4f}", f"{test['student'][name]:.4f}"
        )
    p, s = results["parameters"], results["inference"]
    table.add_row("parameters", f"{p['teacher']:,}", f"{p['student']:,}")
    table.add_row("compression", "", f"{p['compression']:.2f}x")
    if s is not None:  # not measured under FSDP
        spread = results.get("throughput")
        shown = {  # the median, and the spread where it was recorded
            role: f"{s[f'{role}_examples_per_s']:,.0f}"
            + (f" (IQR {spread[role]['iqr']:,.0f})" if spread else "")
            for role in ("teacher", "student")
        }
        table.add_row("examples/s", shown["teacher"], shown["student"])
        table.add_row("inference speed-up", "", f"{s['speedup']:.2f}x")
    captions = [f"test: the held-out split's {test['examples']} examples"] if test else []
    if not results["trained_steps"]:
        captions.append("the student was not trained (0 steps): its scores as built")
    table.caption = "; ".join(captions) or None
    Console().print(table)


def close_logger(logger) -> None:
    """Say how to upload an offline wandb run, and close the run: Lightning leaves it open, and the next job
    of a multirun in this process would log into it."""
    if logger and getattr(logger, "_offline", False):
        # a resumed run continues its wandb run in a folder of its own: the history is split over all of them
        folder = Path(logger.experiment.dir).parent
        parts = sorted(folder.parent.glob(f"offline-run-*-{logger.experiment.id}")) or [folder]
        log.info("wandb ran offline; upload the run with: wandb sync %s", " ".join(str(p) for p in parts))
    if isinstance(logger, WandbLogger):
        logger.experiment.finish()


def returned_metrics(results: dict) -> dict[str, float]:
    """What ``train`` returns (to a sweeper): the student's final validation metrics and the teacher's."""
    metrics = {f"val/{k}": v for k, v in results["student"].items()}
    metrics.update({f"val/teacher_{k}": v for k, v in results["teacher"].items()})
    return metrics


def reuse_results(done: Path) -> dict[str, float]:
    """A sweep job that already finished (in ``done``, under the same overrides and configuration) is not
    trained again: its results are returned (to the sweeper) as they are, and stay where they are, as a
    resumed job's results land in its first directory."""
    log.info(
        "ckpt_path=auto: this job finished in %s under the same overrides and configuration; its results are "
        "reused, nothing is trained (ckpt_path=null trains it again)", done,
    )  # fmt: skip
    return returned_metrics(json.loads((done / RESULTS).read_text()))
