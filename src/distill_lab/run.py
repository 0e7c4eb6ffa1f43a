"""``train(cfg)``: builds every part from the Hydra config, distils, evaluates and writes the run's outputs.

This is the only module that instantiates configs. Everything that can be wrong with a configuration (an
unknown layer, head counts a matching mode cannot pair, a missing data column, a teacher that cannot be
loaded) is checked here before the first training step.
"""

from __future__ import annotations

import json
import logging
import netrc
import os
import time
import warnings
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import get_object
from hydra.utils import instantiate as _hydra_instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from distill_lab.attention import AttentionDistillationLoss
from distill_lab.capture import num_attention_heads
from distill_lab.data import check_sizes
from distill_lab.matching import layer_map
from distill_lab.models import check_student, count_parameters, load_preprocessor, position_limit
from distill_lab.module import DistillationModule
from distill_lab.resume import NAMED_DIR_OVERRIDES, finished_run, resolve_ckpt_path, started_by_a_launcher
from distill_lab.tasks import TASKS

log = logging.getLogger(__name__)
# the frozen teacher is in eval mode on purpose (no dropout, no gradients): Lightning's warning about modules in
# eval mode at the start of training says nothing about a distillation run
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def instantiate(cfg, *args, **kwargs):
    """Hydra's ``instantiate``, except that a ``ValueError`` raised by the target (distill-lab's errors for a
    wrong configuration: a teacher that cannot be loaded, a student deeper than its teacher...) propagates as
    itself, not wrapped in an ``InstantiationException`` whose message is its ``repr``."""
    try:
        return _hydra_instantiate(cfg, *args, **kwargs)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def _wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest wandb run written under ``run_dir/wandb`` (``[offline-]run-<time>-<id>``), if any."""
    runs = [p.name for p in (Path(run_dir) / "wandb").glob("*run-*-*") if p.is_dir()]
    return max(runs, key=lambda name: name.split("run-", 1)[1]).rsplit("-", 1)[1] if runs else None


def wandb_logged_in() -> bool:
    """Whether wandb has an API key without asking for one: ``WANDB_API_KEY``, or the key that ``wandb login``
    saved in the netrc file (``NETRC``, else ``~/.netrc``) for the wandb host (``WANDB_BASE_URL``, else
    api.wandb.ai), as wandb itself looks them up."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (OSError, netrc.NetrcParseError):  # no netrc file, or one wandb could not read either
        return False
    return bool(entry and entry[2])  # (login, account, password): the key is the password


def _build_logger(cfg: DictConfig | None, resumed_dir: Path | None = None):
    """The configured logger; a wandb run that resumes in ``resumed_dir`` continues that directory's wandb run."""
    if not cfg:
        return False
    extra = {}
    if cfg.get("_target_", "").endswith("WandbLogger"):
        if cfg.get("offline") is None:
            # no API key (or WANDB_MODE=offline): write an offline run that `wandb sync` can upload later
            offline = not wandb_logged_in() or os.environ.get("WANDB_MODE") in ("offline", "disabled")
            cfg = OmegaConf.merge(cfg, {"offline": offline})
        if resumed_dir is not None and cfg.get("id") is None and (run_id := _wandb_run_id(resumed_dir)):
            log.info("wandb: continuing run %s of %s", run_id, resumed_dir)
            extra = {"id": run_id, "resume": "allow"}
    return instantiate(cfg, **extra)


def _build_callbacks(cfg: DictConfig | None) -> list:
    return [instantiate(c) for c in (cfg or {}).values() if c]


@torch.no_grad()
def measure_throughput(models: dict, batches, repeats: int = 5) -> dict[str, float]:
    """Examples per second of each model's forward over ``batches``, by name: the best of ``repeats`` passes,
    the models taking turns pass by pass, so that a machine whose load changes meanwhile slows each alike."""
    best = dict.fromkeys(models, float("inf"))
    inputs = {}
    devices = {name: next(model.parameters()).device for name, model in models.items()}
    for name, model in models.items():
        model.eval()
        inputs[name] = [{k: v.to(devices[name]) for k, v in b.items() if k != "labels"} for b in batches]
        model(**inputs[name][0])  # warm-up
    for _ in range(repeats):
        for name, model in models.items():
            if devices[name].type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for batch in inputs[name]:
                model(**batch)
            if devices[name].type == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], time.perf_counter() - start)
    examples = sum(next(iter(b.values())).shape[0] for b in batches)
    return {name: examples / seconds for name, seconds in best.items()}


def _whole_student(trainer: L.Trainer, sharded_student: torch.nn.Module) -> torch.nn.Module:
    """A copy of the FSDP-sharded student, whole, on rank 0's CPU (the shard elsewhere). Every process must call
    this: gathering the full state dict is a collective."""
    state = trainer.strategy.lightning_module_state_dict()  # whole tensors on rank 0, empty on the others
    if not trainer.is_global_zero:
        return sharded_student
    prefix = "student."
    student = type(sharded_student)(sharded_student.config)
    student.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
    if getattr(sharded_student, "generation_config", None) is not None:
        student.generation_config = sharded_student.generation_config
    return student.eval()


def _print_summary(results: dict) -> None:
    table = Table(title="distillation result")
    table.add_column("")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    for name in results["student"]:
        table.add_row(
            name, f"{results['teacher'].get(name, float('nan')):.4f}", f"{results['student'][name]:.4f}"
        )
    p, s = results["parameters"], results["inference"]
    table.add_row("parameters", f"{p['teacher']:,}", f"{p['student']:,}")
    table.add_row("compression", "", f"{p['compression']:.2f}x")
    if s is not None:  # not measured under FSDP
        table.add_row(
            "examples/s", f"{s['teacher_examples_per_s']:,.0f}", f"{s['student_examples_per_s']:,.0f}"
        )
        table.add_row("inference speed-up", "", f"{s['speedup']:.2f}x")
    if not results["trained_steps"]:
        table.caption = "the student was not trained (0 steps): its scores as built"
    Console().print(table)


def _build_module(cfg: DictConfig, task, teacher, data) -> DistillationModule:
    """The student (derived from ``teacher`` or loaded), the attention objective (layer pairs, loss, matching
    mode; head counts checked now) and the Lightning module that holds them."""
    student = instantiate(cfg.student, teacher=teacher)
    check_student(student, teacher, getattr(data, "tokenizer", None), cfg.student.get("name_or_path"))
    if (size := task.num_classes(student.config)) != (wanted := task.num_classes(teacher.config)):
        # the output loss compares the two distributions entry by entry: a vocabulary of another size
        raise ValueError(
            f"the student's output has {size} entries but the teacher's {wanted} (task={task.name}: "
            f"{'the vocabulary' if task.inputs == 'text' and not task.name.endswith('classification') else 'the labels'}"
            "): the student must use the teacher's tokenizer and vocabulary"
        )
    pairs = layer_map(
        teacher.config.num_hidden_layers,
        student.config.num_hidden_layers,
        OmegaConf.to_object(cfg.layer_map) if OmegaConf.is_config(cfg.layer_map) else cfg.layer_map,
        teacher=teacher,
        student=student,
    )
    attention_loss = AttentionDistillationLoss(
        loss=instantiate(cfg.loss),
        matching=instantiate(cfg.matching),
        layer_map=pairs,
        layer_weights=cfg.get("layer_weights"),
        block_size=cfg.attention_block_size,
        fused=cfg.fused_kernel,
    )
    attention_loss.check(num_attention_heads(teacher), num_attention_heads(student))
    if getattr(attention_loss.loss, "on_scores", False) and cfg.capture != "qk":
        raise ValueError(
            f"loss=mse_scores compares pre-softmax scores and needs capture=qk, not capture={cfg.capture}"
        )
    return DistillationModule(
        teacher,
        student,
        attention_loss,
        optimizer=instantiate(cfg.optimizer),
        attention_weight=cfg.attention_weight,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        warmup_ratio=cfg.warmup_ratio,
        calibration_batch=data.example_batch("train", cfg.calibration_size),
        head_importance=cfg.matching.get("importance"),
        capture=cfg.capture,
        task=task,
    )


def _check_optimized_metric(cfg: DictConfig, task) -> None:
    """``optimized_metric`` (what the best checkpoint follows, what ``train.py`` returns to a sweeper) must be
    one of the student's validation metrics, and ``optimized_mode`` the direction in which it improves. Their
    names and directions do not depend on the number of classes, so this needs no teacher."""
    metrics = task.metrics("val/", 2)
    better = {name: metric.higher_is_better for name, metric in metrics.items(keep_base=False)}
    if cfg.optimized_metric not in better:
        raise ValueError(
            f"optimized_metric={cfg.optimized_metric} is not a validation metric of task={task.name}: choose one "
            f"of {', '.join(better)}"
        )
    mode = "max" if better[cfg.optimized_metric] else "min"
    if cfg.optimized_mode != mode:
        raise ValueError(
            f"optimized_mode={cfg.optimized_mode}, but {cfg.optimized_metric} is better when "
            f"{'higher' if mode == 'max' else 'lower'}: set optimized_mode={mode}"
        )


def _check_settings(cfg: DictConfig, task) -> None:
    """What the config alone can tell is wrong, checked before a teacher is loaded, downloaded or trained: the
    objective's weights and temperature, the data option's kind against the task, and the data sizes."""
    ranges = {
        "attention_weight": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "alpha": (lambda v: 0 <= v <= 1, "in [0, 1] (the cross-entropy's share of the output loss)"),
        "temperature": (lambda v: v > 0, "above 0 (1 leaves the logits as they are; 2 to 4 is usual)"),
        "warmup_ratio": (
            lambda v: 0 <= v < 1,
            "in [0, 1) (the share of the optimizer steps spent warming up)",
        ),
    }
    if "temperature" in cfg.loss:  # the attention KL's own, beside the output loss's
        ranges["loss.temperature"] = (
            lambda v: v > 0,
            "above 0 (the attention KL's; temperature= is the output loss's)",
        )
    for key, (valid, rule) in ranges.items():
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not valid(value):
            raise ValueError(f"{key}={value} must be {rule}")
    data_class = get_object(cfg.data._target_)
    kinds = tuple({get_object(t.data_module) for t in TASKS.values()})  # your own module is yours to pair
    if (
        isinstance(data_class, type)
        and issubclass(data_class, kinds)
        and not issubclass(data_class, get_object(task.data_module))
    ):
        raise ValueError(
            f"task={task.name} takes data={' | '.join(task.data_configs)}, but the data config builds "
            f"{data_class.__name__}: choose a data option of the task"
        )
    task.check_data_config(cfg.data)
    check_sizes(cfg.data)
    _check_trainer_limits(cfg.trainer)
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if (value := cfg.trainer.get(key)) is not None and not isinstance(value, bool) and value == 0:
            log.warning(
                "trainer.%s=%s: nothing is trained; the results are the student's as built (a baseline before "
                "distillation), and results.json records \"trained_steps\": 0", key, value,
            )  # fmt: skip


def _check_trainer_limits(trainer: DictConfig) -> None:
    """Trainer settings the run cannot end well with, refused before anything loads: no validation (it picks
    the best checkpoint and measures the results, so the run would train, then fail at its end) and no end of
    training (the learning-rate schedule decays over a finite number of steps)."""
    limit = trainer.get("limit_val_batches")
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        raise ValueError(
            f"trainer.limit_val_batches={limit} turns validation off, but validation picks the best checkpoint and "
            "measures the results the run reports: keep some (e.g. trainer.limit_val_batches=0.1 for a tenth of "
            "the validation set, or data.max_eval_samples=200)"
        )
    if trainer.get("max_steps", -1) == -1 and trainer.get("max_epochs") == -1:
        raise ValueError(
            f"trainer.max_epochs={trainer.get('max_epochs')} with trainer.max_steps={trainer.get('max_steps', -1)} "
            "never ends training, and the learning rate decays linearly to 0 over the run's steps: set "
            "trainer.max_epochs or trainer.max_steps"
        )


def _check_positions(model, role: str, max_length: int | None) -> None:
    """``data.max_length`` tokens must fit a model with a table of absolute positions (BERT's 512)."""
    limit = position_limit(model)
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(
            f"data.max_length={max_length}, but the {role} ({type(model).__name__}) has position embeddings for "
            f"{limit} tokens: set data.max_length={limit} or less"
        )


def _named_directory() -> bool | None:
    """Whether this run's directory was named on the command line (``hydra.run.dir=``, ``hydra.sweep.dir=``),
    from the live Hydra config; None outside ``@hydra.main`` (``train(cfg)`` called directly)."""
    if not HydraConfig.initialized():
        return None
    return any(str(o).startswith(NAMED_DIR_OVERRIDES) for o in HydraConfig.get().overrides.hydra)


def _check_launched_directory(named: bool | None) -> None:
    """Processes that torchrun or srun start each compose their own config: Hydra's directory of the clock
    (``outputs/DATE/TIME``) can differ between them by a second, and then they would neither write to one run
    directory nor resume the same checkpoint. Such a run must name its directory."""
    if started_by_a_launcher() and named is False:
        raise ValueError(
            "this process is one of several that torchrun or srun started, and each composes its own run directory "
            "from the clock (outputs/DATE/TIME), which can differ between them: give them one, e.g. "
            "hydra.run.dir=outputs/my_run (under SLURM: hydra.run.dir=outputs/$SLURM_JOB_ID)"
        )


def _in_multirun() -> bool:
    """Whether this is a job of a Hydra multirun (``train.py -m ...``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _returned_metrics(results: dict) -> dict:
    """What ``train`` returns (to a sweeper): the student's final validation metrics and the teacher's."""
    metrics = {f"val/{k}": v for k, v in results["student"].items()}
    metrics.update({f"val/teacher_{k}": v for k, v in results["teacher"].items()})
    return metrics


def _reuse_results(done: Path) -> dict:
    """A sweep job that already finished (in ``done``, under the same overrides and configuration) is not
    trained again: its results are returned (to the sweeper) as they are, and stay where they are, as a resumed
    job's results land in its first directory."""
    log.info(
        "ckpt_path=auto: this job finished in %s under the same overrides and configuration; its results are "
        "reused, nothing is trained (ckpt_path=null trains it again)", done,
    )  # fmt: skip
    return _returned_metrics(json.loads((done / "results.json").read_text()))


def train(cfg: DictConfig) -> dict:
    """Distil the configured teacher into the student; returns the final validation metrics (``val/acc``...).

    Writes to ``cfg.paths.output_dir``: ``config.yaml`` (resolved), ``results.json``, ``checkpoints/``,
    ``student/`` (``save_pretrained`` model and tokenizer) and ``attention_maps/``. With ``ckpt_path=auto``
    a rerun of an interrupted command resumes it in its own directory (``distill_lab.resume``).
    """
    named = (
        _named_directory()
    )  # known from Hydra, not read back from the .hydra/ files that every rank writes
    _check_launched_directory(named)
    config, own_dir = OmegaConf.to_container(cfg, resolve=True), Path(cfg.paths.output_dir)
    if (
        cfg.get("ckpt_path") == "auto"
        and _in_multirun()
        and (done := finished_run(own_dir, config, named)) is not None
    ):
        return _reuse_results(
            done
        )  # a rerun of an interrupted sweep: its finished jobs are not trained again
    ckpt_path, output_dir = resolve_ckpt_path(cfg.get("ckpt_path"), own_dir, config, named)
    cfg.paths.output_dir = str(output_dir)  # the previous run's directory when resuming it
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # every process of a distributed run runs train(); one writes the files
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)

    # the task, models and data: loading errors surface here, before anything trains
    task = instantiate(cfg.task)
    _check_optimized_metric(cfg, task)  # before the teacher, which may be trained or downloaded first
    _check_settings(cfg, task)
    teacher = instantiate(cfg.teacher)
    _check_positions(teacher, "teacher", cfg.data.get("max_length"))
    preprocessor = load_preprocessor(
        cfg.teacher.name_or_path,
        task.name,
        trust_remote_code=cfg.teacher.get("trust_remote_code", False),
        revision=cfg.teacher.get("revision"),
    )
    data = instantiate(
        cfg.data,
        **{"image_processor" if task.inputs == "image" else "tokenizer": preprocessor},
        **task.data_options(teacher),
    )
    data.setup("fit")
    try:
        task.check(teacher, data)
    except ValueError as err:
        raise ValueError(f"teacher.name_or_path={cfg.teacher.name_or_path!r}: {err}") from None
    module = _build_module(cfg, task, teacher, data)
    student, attention_loss = module.student, module.attention_loss
    pairs = attention_loss.layer_map
    _check_positions(student, "student", cfg.data.get("max_length"))

    parameters = {  # counted now: a sharded strategy leaves each process a part of every tensor
        "teacher": count_parameters(teacher),
        "student": count_parameters(student),
        "compression": count_parameters(teacher) / count_parameters(student),
    }

    resumed_here = ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(output_dir.resolve())
    logger = _build_logger(cfg.get("logger"), output_dir if resumed_here else None)
    trainer = instantiate(cfg.trainer, callbacks=_build_callbacks(cfg.get("callbacks")), logger=logger)
    if (
        isinstance(trainer.strategy, FSDPStrategy)
        and cfg.matching.get("importance") == "gradient"
        and not getattr(attention_loss.matching, "calibrated", True)
    ):
        raise ValueError(
            "matching.importance=gradient needs the teacher's gradients outside a training step, which a teacher "
            "sharded by trainer=fsdp cannot give: use matching.importance=entropy, or fix the heads with "
            "matching.heads=[...]"
        )
    if cfg.fused_kernel and (
        problems := attention_loss.fused_problems(
            trainer.strategy.root_device.type,
            cfg.capture,
            num_attention_heads(teacher),
            num_attention_heads(student),
        )
    ):
        raise ValueError(
            f"fused_kernel=true, but the fused attention kernels cannot run here: {'; '.join(problems)}. "
            "Use fused_kernel=null to take them wherever they apply, or fused_kernel=false."
        )
    if logger:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)

    # final evaluation of the best checkpoint, the export, and the run's record
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    if best and module.validated_step is not None and trainer.global_step > module.validated_step:
        log.warning(
            "the last %d optimizer steps (after the validation at step %d) were never validated: student/ and "
            "results.json are the best validated checkpoint's, without them. To have the final weights validated, "
            "make trainer.max_steps a multiple of trainer.val_check_interval (or of the batches of an epoch).",
            trainer.global_step - module.validated_step, module.validated_step,
        )  # fmt: skip
    sharded = isinstance(trainer.strategy, FSDPStrategy)
    if sharded:
        # Lightning wraps a module in FSDP once: the wrapper of its root (embeddings and heads, outside the
        # per-block units) does not outlive fit, so the evaluation gets a fresh module, wrapped anew, that
        # takes its weights from the checkpoint
        if not best:  # no checkpoint callback: keep the trained weights in one (every process takes part)
            best = str(output_dir / "checkpoints" / "final.ckpt")
            trainer.save_checkpoint(best)
        module = _build_module(cfg, task, instantiate(cfg.teacher), data)
        student, attention_loss = module.student, module.attention_loss
    # the best checkpoint's evaluation is no point of the validation curve (it would show an epoch that never ran,
    # with an earlier epoch's numbers): the loggers get its values under best/ instead
    loggers, trainer.loggers = trainer.loggers, []
    try:
        final = trainer.validate(module, datamodule=data, ckpt_path=best or None, verbose=False)[0]
    finally:
        trainer.loggers = loggers
    for each in loggers:
        each.log_metrics(
            {f"best/{k.removeprefix('val/')}": v for k, v in final.items()}, step=trainer.global_step
        )
        each.save()
    metric_names = [k.removeprefix("val/") for k in module.val_metrics.keys(keep_base=False)]
    # both models back on their own attention: the export must not name the capture's implementation, and the
    # throughput below must not time the teacher with its capture (eager maps or recorded queries) attached
    module.student_capture.detach()
    module.teacher_capture.detach()
    if sharded:  # every process holds a shard: gather the whole student (all take part) for rank 0 to save
        student = _whole_student(trainer, student)
    if not trainer.is_global_zero:  # rank 0 alone exports the student, times the models, writes results.json
        metrics = {k: v for k, v in final.items() if k.removeprefix("val/") in metric_names}
        return metrics | module.teacher_scores
    student_dir = output_dir / "student"
    student.save_pretrained(student_dir)
    preprocessor.save_pretrained(student_dir)

    if sharded:  # the teacher exists only as shards across the processes: nothing to time on one device
        log.info(
            "inference speed not measured under FSDP: the teacher is sharded; the student is in %s",
            student_dir,
        )
        inference = None
    else:
        batches = [
            data.example_batch("validation", cfg.data.get("eval_batch_size") or cfg.data.batch_size)
        ] * 4
        speeds = measure_throughput({"teacher": teacher, "student": student}, batches)
        teacher_speed, student_speed = speeds["teacher"], speeds["student"]
        inference = {
            "teacher_examples_per_s": teacher_speed,
            "student_examples_per_s": student_speed,
            "speedup": student_speed / teacher_speed,
        }
    results = {
        "task": task.name,
        "optimized_metric": cfg.optimized_metric.removeprefix("val/"),  # what summarize ranks the runs by
        "student": {
            k.removeprefix("val/"): v for k, v in final.items() if k.removeprefix("val/") in metric_names
        },
        "teacher": {k.removeprefix("val/teacher_"): v for k, v in module.teacher_scores.items()},
        "parameters": parameters,
        "inference": inference,
        "attention_loss": {
            k.removeprefix("val/attention/"): v for k, v in final.items() if k.startswith("val/attention/")
        },
        "layer_map": [list(p) for p in pairs],
        "selected_heads": getattr(attention_loss.matching, "selected", None) or None,
        "best_checkpoint": best or None,
        "student_dir": str(student_dir),
        "trained_steps": trainer.global_step,  # optimizer steps; 0: the student as built, untrained
    }
    # how far the student is behind, positive when worse: teacher - student for accuracy, the reverse for perplexity
    results["higher_is_better"] = {
        name.removeprefix("val/"): bool(metric.higher_is_better)
        for name, metric in module.val_metrics.items(keep_base=False)
    }
    results["gap"] = {
        k: (results["teacher"][k] - v) * (1 if results["higher_is_better"].get(k, True) else -1)
        for k, v in results["student"].items()
        if k in results["teacher"]
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    _print_summary(results)
    if logger and getattr(logger, "_offline", False):
        # a resumed run continues its wandb run in a folder of its own: the history is split over all of them
        folder = Path(logger.experiment.dir).parent
        parts = sorted(folder.parent.glob(f"offline-run-*-{logger.experiment.id}")) or [folder]
        log.info("wandb ran offline; upload the run with: wandb sync %s", " ".join(str(p) for p in parts))
    if isinstance(logger, WandbLogger):
        # Lightning leaves the wandb run open; the next job of a multirun in this process would log into it
        logger.experiment.finish()
    return _returned_metrics(results)
