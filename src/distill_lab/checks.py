"""Configuration checks: each setting is validated here, once, and what the config alone can tell is wrong is
refused before a teacher is loaded, downloaded or trained (:func:`check_config`).

A few checks need what the config builds (the models' position tables and outputs, the device the trainer
runs on): :func:`check_positions`, :func:`check_outputs` and :func:`check_fused_kernel` take the built
objects. Nothing here instantiates a config; the parts that are built (the module, the attention component)
do not check these settings again.
"""

from __future__ import annotations

import logging
import os

import huggingface_hub
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from hydra.utils import get_object
from lightning.pytorch.strategies import FSDPStrategy
from omegaconf import DictConfig, OmegaConf

from distill_lab import lora
from distill_lab.backends import BackendUnavailable
from distill_lab.capture import num_attention_heads
from distill_lab.data import check_sizes
from distill_lab.hidden import LAYER_MAP_SPECS
from distill_lab.models import position_limit
from distill_lab.objective import OBJECTIVE_RANGES, check_setting
from distill_lab.resume import started_by_a_launcher
from distill_lab.tasks import TASKS

log = logging.getLogger(__name__)

# what each value of the objective and the schedule must be, and the rule as its error states it
RANGES = {
    **OBJECTIVE_RANGES,
    "warmup_ratio": (lambda v: 0 <= v < 1, "in [0, 1) (the share of the optimizer steps spent warming up)"),
}
SIZES = (
    "batch_size",
    "max_length",
    "num_workers",
    "eval_batch_size",
    "max_train_samples",
    "max_eval_samples",
)
ATTENTION_TEMPERATURE = (lambda v: v > 0, "above 0 (the attention KL's; temperature= is the output loss's)")


def check_config(cfg: DictConfig, task) -> None:
    """Everything the config alone can tell is wrong, in the order a user meets it: the metric the best
    checkpoint follows, the objective's settings, the data option against the task and the data sizes, the
    trainer's limits, and the settings that cannot go together (a capture a loss cannot use, a head
    importance a sharded teacher cannot give). ``task`` is the built ``cfg.task``. (Whether a launched
    process named its run directory, :func:`check_launched_directory`, is checked before the run directory
    is chosen.)"""
    check_optimized_metric(cfg, task)
    check_settings(cfg)
    check_data(cfg, task)
    check_trainer_limits(cfg.trainer)
    check_capture(cfg)
    check_hidden(cfg)
    check_head_importance(cfg)
    check_export(cfg.get("export"))
    check_lora(cfg)
    check_test_split(cfg)
    warn_if_nothing_trains(cfg.trainer)


def check_launched_directory(named: bool | None) -> None:
    """``named``: whether the run directory was named on the command line (None outside ``@hydra.main``).
    Processes that torchrun or srun start each compose their own config: Hydra's directory of the clock
    (``outputs/DATE/TIME``) can differ between them by a second, and then they would neither write to one run
    directory nor resume the same checkpoint. Such a run must name its directory."""
    if started_by_a_launcher() and named is False:
        raise ValueError(
            "this process is one of several that torchrun or srun started, and each composes its own run "
            "directory from the clock (outputs/DATE/TIME), which can differ between them: give them one, "
            "e.g. hydra.run.dir=outputs/my_run (under SLURM: hydra.run.dir=outputs/$SLURM_JOB_ID)"
        )


def check_optimized_metric(cfg: DictConfig, task, num_labels: int | None = None) -> None:
    """``optimized_metric`` (what the best checkpoint follows, what ``train.py`` returns to a sweeper) must be
    one of the student's validation metrics, and ``optimized_mode`` the direction in which it improves. Their
    names and directions do not depend on the number of classes, so this needs no teacher; but a regression
    head (one output) has metrics of its own, so once the teacher is loaded ``run.py`` checks again with its
    ``num_labels``: before that a regression metric (``val/pearson``) passes for a task that takes one."""
    heads = [2, 1] if getattr(task, "regression", False) else [2]
    if num_labels is not None:
        heads = [num_labels]
    better = {}
    for head in heads:
        metrics = task.metrics("val/", head).items(keep_base=False)
        better.update({name: metric.higher_is_better for name, metric in metrics})
    if cfg.optimized_metric not in better:
        head = " with a regression head (the teacher's num_labels=1)" if num_labels == 1 else ""
        raise ValueError(
            f"optimized_metric={cfg.optimized_metric} is not a validation metric of task={task.name}{head}: "
            f"choose one of {', '.join(better)}" + (" (and optimized_mode=max)" if num_labels == 1 else "")
        )
    mode = "max" if better[cfg.optimized_metric] else "min"
    if cfg.optimized_mode != mode:
        raise ValueError(
            f"optimized_mode={cfg.optimized_mode}, but {cfg.optimized_metric} is better when "
            f"{'higher' if mode == 'max' else 'lower'}: set optimized_mode={mode}"
        )


def check_settings(cfg: DictConfig) -> None:
    """The objective's weights and temperatures and the warm-up's share (:data:`RANGES`), as the user sets
    them (``attention_weight=``...; the module node takes them from there)."""
    ranges = dict(RANGES)
    if "temperature" in cfg.loss:  # the attention KL's own, beside the output loss's
        ranges["loss.temperature"] = ATTENTION_TEMPERATURE
    for key in ranges:
        check_setting(key, OmegaConf.select(cfg, key), ranges)
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not lr > 0):
        raise ValueError(f"optimizer.lr={lr} must be above 0 (the default is 5e-4)")
    budget = cfg.get("capture_memory_budget")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 0):
        raise ValueError(
            f"capture_memory_budget={budget} must be a number of bytes, 0 or more (0: never keep a layer's "
            "eager maps), or null for the default (64 MiB per captured layer off CUDA, 0 on CUDA)"
        )


def check_data(cfg: DictConfig, task) -> None:
    """The data option's kind against the task (a data module of another task's kind; your own module is
    yours to pair), the task's own requirements of the data config, and the data sizes."""
    data_class = get_object(cfg.data._target_)
    kinds = tuple({get_object(t.data_module) for t in TASKS.values()})
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
    # data.max_length: null is the default, chosen once the teacher is loaded (run.py)
    check_sizes(
        {k: cfg.data[k] for k in SIZES if k in cfg.data and not (k == "max_length" and cfg.data[k] is None)}
    )


def check_trainer_limits(trainer: DictConfig) -> None:
    """Trainer settings the run cannot end well with: no validation (it picks the best checkpoint and
    measures the results, so the run would train, then fail at its end) and no end of training (the
    learning-rate schedule decays over a finite number of steps)."""
    limit = trainer.get("limit_val_batches")
    if limit is not None and not isinstance(limit, bool) and limit == 0:
        raise ValueError(
            f"trainer.limit_val_batches={limit} turns validation off, but validation picks the best "
            "checkpoint and measures the results the run reports: keep some (e.g. "
            "trainer.limit_val_batches=0.1 for a tenth of the validation set, or data.max_eval_samples=200)"
        )
    if trainer.get("max_steps", -1) == -1 and trainer.get("max_epochs") == -1:
        raise ValueError(
            f"trainer.max_epochs={trainer.get('max_epochs')} with trainer.max_steps="
            f"{trainer.get('max_steps', -1)} never ends training, and the learning rate decays linearly to 0 "
            "over the run's steps: set trainer.max_epochs or trainer.max_steps"
        )


RELATION_LOSSES = {
    "distill_lab.relations.RelationLoss": "relation",
    "distill_lab.relations.MiniLMLoss": "minilm",
}


def check_capture(cfg: DictConfig) -> None:
    """``loss=mse_scores`` compares pre-softmax scores, and the relation losses queries, keys and values,
    which only the qk capture records; ``loss=relation`` compares relation heads, which no matching mode but
    the default pairs."""
    if cfg.loss.get("name") == "mse_scores" and cfg.capture != "qk":
        raise ValueError(
            f"loss=mse_scores compares pre-softmax scores and needs capture=qk, not capture={cfg.capture}"
        )
    relation = RELATION_LOSSES.get(cfg.loss.get("_target_"))
    if relation and cfg.capture != "qk":
        raise ValueError(
            f"loss={relation} compares the layers' queries, keys and values, which only capture=qk records; "
            f"not capture={cfg.capture}"
        )
    matching = str(cfg.matching.get("_target_", "")).rsplit(".", 1)[-1].lower()
    if relation == "relation" and matching != "layerwise" and not cfg.loss.get("attention"):
        raise ValueError(
            f"loss=relation splits both models' vectors into loss.relation_heads relation heads, so no "
            f"attention heads are matched: matching={matching} does not apply; leave matching=layerwise (or "
            "weigh attention KL in with loss.attention)"
        )


def check_hidden(cfg: DictConfig) -> None:
    """``hidden_weight`` (the objective's ``w_h``, 0 or more) and the form of ``hidden_layer_map`` (a named
    map or pairs of indices; whether the indices exist needs the models, which ``hidden_layer_map`` checks
    when the module is built)."""
    weight = cfg.get("hidden_weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight >= 0:
        raise ValueError(
            f"hidden_weight={weight} must be 0 or more (the weight of L_hidden with hidden=mse or cosine)"
        )
    spec = cfg.get("hidden_layer_map", "uniform")
    pairs = OmegaConf.to_object(spec) if OmegaConf.is_config(spec) else spec
    if isinstance(pairs, str) and pairs in LAYER_MAP_SPECS:
        return
    if (
        isinstance(pairs, list)
        and pairs
        and all(
            isinstance(p, list) and len(p) == 2 and all(type(i) is int and i >= 0 for i in p) for p in pairs
        )
    ):
        return
    raise ValueError(
        f"hidden_layer_map={spec} is not a map: use {' or '.join(LAYER_MAP_SPECS)}, or pairs of hidden-state "
        "indices [[t, s], ...] (0 is the embedding output, i the output of layer i), e.g. [[0, 0], [12, 4]]"
    )


def check_head_importance(cfg: DictConfig) -> None:
    """``matching.importance=gradient`` takes the teacher's gradients on the calibration batch, outside a
    training step, which a teacher sharded by FSDP cannot give; heads fixed in pairs (``matching.heads=
    [[t, s], ...]``) need no calibration."""
    heads = cfg.matching.get("heads")
    fixed = heads is not None and all(not isinstance(h, int) for h in heads)
    if cfg.matching.get("importance") == "gradient" and not fixed and _sharded(cfg.trainer):
        raise ValueError(
            "matching.importance=gradient needs the teacher's gradients outside a training step, which a "
            "teacher sharded by trainer=fsdp cannot give: use matching.importance=entropy, or fix the heads "
            "with matching.heads=[...]"
        )


def _sharded(trainer: DictConfig) -> bool:
    """Whether the trainer config asks for FSDP (``trainer=fsdp``'s strategy node, or ``strategy: fsdp``)."""
    strategy = trainer.get("strategy")
    if isinstance(strategy, str):
        return strategy.startswith("fsdp")
    if OmegaConf.is_dict(strategy) and "_target_" in strategy:
        target = get_object(strategy._target_)
        return isinstance(target, type) and issubclass(target, FSDPStrategy)
    return False


def check_export(export: DictConfig | None) -> None:
    """``export.push_to_hub=true`` uploads the student after the run: it needs a repository to upload to
    (``export.hub_model_id``, a valid hub id) and a token, both known before anything trains, so that a long
    run does not end in an upload that cannot happen."""
    if not export or not export.get("push_to_hub"):
        return
    repo_id = export.get("hub_model_id")
    if not repo_id:
        raise ValueError(
            "export.push_to_hub=true needs the repository to upload the student to: set "
            "export.hub_model_id=<user or organisation>/<name>"
        )
    try:
        validate_repo_id(str(repo_id))
    except HFValidationError as err:
        raise ValueError(f"export.hub_model_id={repo_id} is no hub repository id: {err}") from None
    if not (os.environ.get("HF_TOKEN") or huggingface_hub.get_token()):
        raise ValueError(
            "export.push_to_hub=true, but no Hugging Face token is set: set HF_TOKEN, or log in with "
            "`hf auth login`, before the run (or drop export.push_to_hub to keep the student local)"
        )


def check_lora(cfg: DictConfig) -> None:
    """``student.lora`` (``distill_lab.lora``): its settings, peft installed where ``r > 0``, no FSDP (whose
    shards would mix frozen and trained weights), and ``export.merge_lora`` only with adapters to merge."""
    settings = cfg.student.get("lora")
    merge = (cfg.get("export") or {}).get("merge_lora")
    if not lora.enabled(settings):
        if merge:
            raise ValueError(
                "export.merge_lora=true, but the student has no LoRA adapters to merge: set student.lora.r "
                "(e.g. student.lora.r=8), or drop export.merge_lora"
            )
        return
    lora.check_settings(**OmegaConf.to_container(settings, resolve=True))
    lora.require_peft()
    if _sharded(cfg.trainer):
        raise ValueError(
            "student.lora with trainer=fsdp is not supported: train a LoRA student with trainer=ddp (the "
            "frozen student is small next to the teacher), or drop student.lora"
        )
    if cfg.student.get("init") == "random":
        log.warning(
            "student.init=random with student.lora.r=%s: the student's weights stay frozen at their random "
            "start and only the adapters (and the task head) train", settings.r,
        )  # fmt: skip


def check_test_split(cfg: DictConfig) -> None:
    """A held-out test split is scored after the best checkpoint's validation, in a second evaluation of the
    sharded module, which FSDP does not run: refused with trainer=fsdp, before training."""
    dataset = cfg.data.get("dataset") or {}
    given = [k for k in ("test_file", "test_split", "test_dir") if dataset.get(k)]
    if given and _sharded(cfg.trainer):
        raise ValueError(
            f"data.dataset.{given[0]} with trainer=fsdp is not supported: score the exported student on it "
            "afterwards with distill-lab-eval, or train with trainer=ddp"
        )


def warn_if_nothing_trains(trainer: DictConfig) -> None:
    """A run of 0 epochs, steps or batches is allowed: a baseline before distillation. It is said once."""
    for key in ("max_epochs", "max_steps", "limit_train_batches"):
        if (value := trainer.get(key)) is not None and not isinstance(value, bool) and value == 0:
            log.warning(
                "trainer.%s=%s: nothing is trained; the results are the student's as built (a baseline "
                "before distillation), and results.json records \"trained_steps\": 0", key, value,
            )  # fmt: skip


def check_positions(model, role: str, max_length: int | None) -> None:
    """``data.max_length`` tokens must fit a model with a table of absolute positions (BERT's 512)."""
    limit = position_limit(model)
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(
            f"data.max_length={max_length}, but the {role} ({type(model).__name__}) has position embeddings "
            f"for {limit} tokens: set data.max_length={limit} or less"
        )


def check_outputs(task, teacher, student, tokenizer=None) -> None:
    """The output loss compares the two models' distributions entry by entry: the student's output must
    have the teacher's size (its labels, or its vocabulary). Language models of one tokenizer (``tokenizer``)
    whose vocabularies are padded to different sizes past it compare the tokenizer's part
    (``task.fit_vocabularies``, with a warning)."""
    if hasattr(task, "fit_vocabularies"):
        task.fit_vocabularies(teacher, student, tokenizer)
    if (size := task.num_classes(student.config)) != (wanted := task.num_classes(teacher.config)):
        what = (
            "the vocabulary"
            if task.inputs == "text" and not task.name.endswith("classification")
            else "the labels"
        )
        raise ValueError(
            f"the student's output has {size} entries but the teacher's {wanted} (task={task.name}: {what}): "
            "the student must use the teacher's tokenizer and vocabulary"
        )


def check_fused_kernel(cfg: DictConfig, attention_loss, device_type: str, teacher, student) -> None:
    """``fused_kernel=true`` insists on the Triton kernels: refused where they cannot run (the device, the
    capture, the matching mode, the heads), quoting the fused backend's own reason, before the first step."""
    try:
        attention_loss.check_setup(
            device_type, cfg.capture, num_attention_heads(teacher), num_attention_heads(student)
        )
    except BackendUnavailable as err:
        if err.setting != "fused":
            raise
        raise ValueError(
            f"fused_kernel=true, but the fused attention kernels cannot run here: {err.reason}. "
            "Use fused_kernel=null to take them wherever they apply, or fused_kernel=false."
        ) from None
