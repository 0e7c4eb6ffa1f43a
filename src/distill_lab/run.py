"""``train(cfg)``: check the config, build every part from it, distil, then evaluate and export.

This is the only module that instantiates configs. ``distill_lab.checks`` refuses a wrong configuration
before anything loads (and the few things that need the built models right after they are built);
``distill_lab.export`` evaluates the best checkpoint and writes the run's outputs.
"""

from __future__ import annotations

import logging
import netrc
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate as _hydra_instantiate
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from transformers import get_linear_schedule_with_warmup

from distill_lab import checks, export, lora
from distill_lab.capture import attention_width, num_attention_heads
from distill_lab.hidden import hidden_layer_map
from distill_lab.matching import layer_map
from distill_lab.models import check_student, load_preprocessor, position_limit
from distill_lab.resume import NAMED_DIR_OVERRIDES, finished_run, lock_run_dir, resolve_ckpt_path
from distill_lab.teacher_check import check_teacher

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 128  # data.max_length: null takes the smaller of this and the teacher's positions
RECORDS_DIR = ".hydra"  # Hydra's records of a run's command, which summarize and ckpt_path=auto read
# the frozen teacher is in eval mode on purpose (no dropout, no gradients): Lightning's warning about modules
# in eval mode at the start of training says nothing about a distillation run
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def train(cfg: DictConfig) -> dict:
    """Distil the configured teacher into the student; returns the final validation metrics (``val/acc``...).

    Writes to ``cfg.paths.output_dir``: ``config.yaml`` (resolved), ``results.json``, ``checkpoints/``,
    ``student/`` (``save_pretrained`` model and tokenizer) and ``attention_maps/``. With ``ckpt_path=auto``
    a rerun of an interrupted command resumes it in its own directory (``distill_lab.resume``).
    """
    # whether the directory was named: from Hydra, not read back from the .hydra/ files every rank writes
    named = _named_directory()
    checks.check_launched_directory(named)
    task = instantiate(cfg.task)
    checks.check_config(cfg, task)  # before anything is written, and before the teacher loads or trains
    check_optimizer(cfg)
    records = _hydra_records(cfg)  # this command's .hydra/ files, written where the run owns the directory
    if named is False:  # a new directory from Hydra's clock: locked, and the command recorded for reruns
        _claim_new_directory(Path(cfg.paths.output_dir), records)
    if (done := _finished_job(cfg, named, records)) is not None:
        return export.reuse_results(done)  # a rerun of a sweep: its finished jobs are not trained again
    ckpt_path, output_dir = _run_directory(cfg, named, records)  # its lock first: a second copy sees this one
    L.seed_everything(cfg.seed, workers=True)

    # the models and data: loading errors surface here, before anything trains
    teacher, preprocessor, data = _load(cfg, task)
    module = build_module(cfg, task, teacher, data)
    parameters = export.parameter_counts(teacher, module.student)
    trainer = _build_trainer(cfg, ckpt_path, output_dir)
    device = trainer.strategy.root_device.type
    checks.check_fused_kernel(cfg, module.attention_loss, device, teacher, module.student)
    if trainer.logger:
        trainer.logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)

    # the best checkpoint's evaluation, the export and the run's record
    best = export.best_checkpoint(trainer, module, output_dir)
    if isinstance(trainer.strategy, FSDPStrategy):
        # Lightning wraps a module in FSDP once: the wrapper of its root (embeddings and heads, outside the
        # per-block units) does not outlive fit, so the evaluation gets a fresh module, wrapped anew, that
        # takes its weights from the checkpoint
        module = build_module(cfg, task, instantiate(cfg.teacher), data)
    return export.evaluate_and_export(
        trainer, module, data, best, preprocessor=preprocessor, parameters=parameters,
        optimized_metric=cfg.optimized_metric, output_dir=output_dir,
        config=OmegaConf.to_container(cfg, resolve=True), command=_command(),
    )  # fmt: skip


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


# ------------------------------------------------------------------------------------------ the run directory


def _named_directory() -> bool | None:
    """Whether this run's directory was named on the command line (``hydra.run.dir=``, ``hydra.sweep.dir=``),
    from the live Hydra config; None outside ``@hydra.main`` (``train(cfg)`` called directly)."""
    if not HydraConfig.initialized():
        return None
    return any(str(o).startswith(NAMED_DIR_OVERRIDES) for o in HydraConfig.get().overrides.hydra)


def _command() -> list[str] | None:
    """This run's command-line overrides, as ``.hydra/overrides.yaml`` records them (for the model card);
    None outside ``@hydra.main``."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def _in_multirun() -> bool:
    """Whether this is a job of a Hydra multirun (``train.py -m ...``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _hydra_records(cfg: DictConfig) -> dict[str, str]:
    """Hydra's records of this command, ``{file name: YAML}``, as Hydra writes them to ``.hydra/``: the
    composed config (unresolved), the Hydra config and the overrides; none outside ``@hydra.main`` or on a
    rank above 0. Hydra itself writes none (``hydra.output_subdir: null`` in ``conf/hydra/default.yaml``): it
    would write them before this run could check its directory, over the records of a run it holds."""
    if not HydraConfig.initialized() or rank_zero_only.rank != 0:
        return {}
    return {
        "config.yaml": OmegaConf.to_yaml(cfg),
        "hydra.yaml": OmegaConf.to_yaml(HydraConfig.instance().cfg),
        "overrides.yaml": OmegaConf.to_yaml(HydraConfig.get().overrides.task),
    }


def _write_records(run_dir: Path, records: dict[str, str]) -> None:
    """``records`` (:func:`_hydra_records`) into ``run_dir/.hydra``, where this run owns ``run_dir``; once:
    written, they are emptied."""
    if records:
        (run_dir / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
        for name, text in records.items():
            (run_dir / RECORDS_DIR / name).write_text(text)
        records.clear()


def _claim_new_directory(run_dir: Path, records: dict[str, str]) -> None:
    """A directory that Hydra made from the clock: this run takes its lock and, where it holds no records yet
    (it is new), writes this command's there at once, for :func:`finished_run` and ``ckpt_path=auto`` to
    compare with other runs' (a directory that holds another run's gets them once this run owns it)."""
    if not records:
        return
    lock_run_dir(run_dir)  # RunDirectoryLocked: another live run's, and nothing is written
    if not (run_dir / RECORDS_DIR).exists():
        _write_records(run_dir, records)


def _finished_job(cfg: DictConfig, named: bool | None, records: dict[str, str]) -> Path | None:
    """The directory where this job of a rerun sweep already finished under the same configuration, if any
    (``ckpt_path=auto`` in a multirun)."""
    if cfg.get("ckpt_path") != "auto" or not _in_multirun():
        return None
    return finished_run(Path(cfg.paths.output_dir), OmegaConf.to_container(cfg, resolve=True), named)


def _run_directory(cfg: DictConfig, named: bool | None, records: dict[str, str]) -> tuple[str | None, Path]:
    """The checkpoint to resume (``ckpt_path``) and the directory the run writes to: the previous run's when
    resuming it, which becomes ``cfg.paths.output_dir``. Once the run owns its directories (their locks taken,
    a finished run refused), rank 0 writes this command's ``.hydra/`` records to the one Hydra gave it and the
    resolved ``config.yaml`` to the one it writes to."""
    config, own_dir = OmegaConf.to_container(cfg, resolve=True), Path(cfg.paths.output_dir)
    ckpt_path, output_dir = resolve_ckpt_path(cfg.get("ckpt_path"), own_dir, config, named)
    _write_records(own_dir, records)
    cfg.paths.output_dir = str(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:  # every process of a distributed run runs train(); one writes the files
        (output_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return ckpt_path, output_dir


# ------------------------------------------------------------------------------------------ building


def _load(cfg: DictConfig, task):
    """The teacher, its preprocessor (the tokenizer, or the image processor) and the data, set up for fit."""
    teacher = instantiate(cfg.teacher)
    if getattr(task, "regression", False):  # a regression head (num_labels=1) has metrics of its own
        checks.check_optimized_metric(cfg, task, teacher.config.num_labels)
    _default_max_length(cfg.data, teacher)
    checks.check_positions(teacher, "teacher", cfg.data.get("max_length"))
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
    check_teacher(task, teacher, data, cfg.trainer)  # a classifier at chance: labels in another order
    return teacher, preprocessor, data


def _default_max_length(data: DictConfig, teacher) -> None:
    """``data.max_length: null``, the text data options' default: the smaller of :data:`DEFAULT_MAX_LENGTH`
    and the teacher's position limit (its table of absolute positions, else its
    ``max_position_embeddings``), said in the log. A length that is set stays as it is, and is checked."""
    if "max_length" not in data or data.max_length is not None:
        return
    limit = position_limit(teacher) or getattr(teacher.config, "max_position_embeddings", None)
    data.max_length = min(DEFAULT_MAX_LENGTH, limit) if limit else DEFAULT_MAX_LENGTH
    if limit:
        log.info(
            "data.max_length=%d: the teacher takes %d positions, and the default is the smaller of %d and "
            "that (set data.max_length to choose)", data.max_length, limit, DEFAULT_MAX_LENGTH,
        )  # fmt: skip
    else:
        log.info("data.max_length=%d, the default (the teacher sets no limit)", data.max_length)


def check_optimizer(cfg: DictConfig) -> None:
    """The optimizer and its learning-rate schedule, built as the module builds them but on a stand-in
    parameter, before anything is loaded or written: a setting that torch refuses (a negative
    ``optimizer.weight_decay``, ``optimizer.betas`` past 1) stops the run here, naming the ``optimizer.``
    settings, instead of inside ``Trainer.fit``."""
    settings = {k: v for k, v in cfg.optimizer.items() if not str(k).startswith("_")}
    try:
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
        get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * 100), 100)
    except (ValueError, TypeError, InstantiationException) as err:
        named = ", ".join(f"optimizer.{k}={v}" for k, v in settings.items())
        raise ValueError(
            f"optimizer ({cfg.optimizer.get('_target_')}) refused its settings ({named}): {err}"
        ) from None


def build_module(cfg: DictConfig, task, teacher, data) -> L.LightningModule:
    """The student (derived from ``teacher`` or loaded) and the LightningModule of ``cfg.module`` that
    distils ``teacher`` into it. What exists only at run time is passed to the node: the models, the task,
    the layer pairs that ``layer_map=`` resolves to on them, the calibration batch and, with a hidden-state
    loss (``hidden=mse`` or ``cosine``), the pairs of ``hidden_layer_map=`` and the two models' widths. The
    same call builds the module of ``fit`` and the fresh one an FSDP evaluation needs."""
    student, lora_settings = _instantiate_student(cfg.student, teacher)
    check_student(student, teacher, getattr(data, "tokenizer", None), cfg.student.get("name_or_path"))
    checks.check_outputs(task, teacher, student, getattr(data, "tokenizer", None))
    checks.check_positions(student, "student", cfg.data.get("max_length"))
    pairs = layer_map(
        teacher.config.num_hidden_layers,
        student.config.num_hidden_layers,
        OmegaConf.to_object(cfg.layer_map) if OmegaConf.is_config(cfg.layer_map) else cfg.layer_map,
        teacher=teacher,
        student=student,
    )
    hidden = {}  # hidden=none: the module's hidden_loss stays null
    if cfg.get("hidden") is not None:
        spec = cfg.get("hidden_layer_map", "uniform")
        hidden_pairs = hidden_layer_map(
            teacher.config.num_hidden_layers,
            student.config.num_hidden_layers,
            OmegaConf.to_object(spec) if OmegaConf.is_config(spec) else spec,
        )
        widths = {"student_width": student.config.hidden_size, "teacher_width": teacher.config.hidden_size}
        hidden["hidden_loss"] = {"layer_map": hidden_pairs, **widths}
    if lora.enabled(lora_settings):  # after the checks and the layer map, which read the plain student
        student = lora.apply_lora(student, task=task.name, **lora_settings)
    module = instantiate(
        cfg.module,
        teacher=teacher,
        student=student,
        task=task,
        attention_loss={"layer_map": pairs},
        calibration_batch=data.example_batch("train", cfg.calibration_size),
        **hidden,
    )
    widths = {"teacher": attention_width(teacher), "student": attention_width(student)}
    module.attention_loss.check(num_attention_heads(teacher), num_attention_heads(student), widths)
    return module


def _instantiate_student(node: DictConfig, teacher) -> tuple:
    """The plain student of ``cfg.student`` and its ``lora`` settings (``distill_lab.lora``): the adapters
    are applied once the plain student has been checked and its layers named (a layer map of module names
    reads the plain student's)."""
    settings = OmegaConf.to_container(node, resolve=True)
    lora_settings = settings.pop("lora", None)
    return instantiate(settings, teacher=teacher), lora_settings


def _build_trainer(cfg: DictConfig, ckpt_path: str | None, output_dir: Path) -> L.Trainer:
    """The trainer with the configured callbacks and logger (a run resumed in its own directory continues its
    wandb run)."""
    resumed_here = ckpt_path is not None and Path(ckpt_path).resolve().is_relative_to(output_dir.resolve())
    logger = _build_logger(cfg.get("logger"), output_dir if resumed_here else None)
    return instantiate(cfg.trainer, callbacks=_build_callbacks(cfg.get("callbacks")), logger=logger)


def _wandb_run_id(run_dir: Path) -> str | None:
    """The id of the newest wandb run written under ``run_dir/wandb`` (``[offline-]run-<time>-<id>``), if
    any."""
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
    """The configured logger; a wandb run that resumes in ``resumed_dir`` continues that directory's wandb
    run."""
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
