"""LoRA students: low-rank adapters on a frozen student, through ``peft``.

With ``student.lora.r > 0`` the student's weights stay frozen and only the adapters (and the task head, a
classifier that may start from scratch) train. A LoRA layer computes

    h = W x + (alpha / r) * B A dropout(x)        A: (r, d_in), B: (d_out, r), B = 0 at the start

so the adapters start as the identity of the student as built. The default targets are the linear layers of
the student's self-attention blocks (found through ``distill_lab.capture.attention_modules``, not by a table
of names), so the attention loss's gradient reaches the adapters of the layers it compares.

Pure PyTorch and ``peft``: no Lightning, no Hydra. ``apply_lora`` is what a script calls before handing the
student to any trainer::

    student = apply_lora(student, r=8)            # a peft.PeftModel; only the adapters and the head train

``save_lora_student`` writes what a run exports: the adapter, the frozen base it applies to (``base/``) and,
optionally, the merged model (``merged/``).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn
from transformers.pytorch_utils import Conv1D

from distill_lab.capture import attention_modules

INSTALL_HINT = "pip install 'peft>=0.13'"
BASE_DIR = "base"  # student/base: the frozen student the adapter applies to
MERGED_DIR = "merged"  # student/merged: the adapter merged into it, a plain transformers model
ADAPTER = "default"  # peft's name of the one adapter
# distill-lab's task -> peft's task type (the PeftModel subclass and the AutoPeftModel class that loads it);
# tasks without one (masked LM, image classification) get a plain PeftModel, loaded by AutoPeftModel
TASK_TYPES = {
    "sequence_classification": "SEQ_CLS",
    "token_classification": "TOKEN_CLS",
    "causal_lm": "CAUSAL_LM",
}
CLASSIFIER_NAMES = ("classifier", "score")  # the heads peft's SEQ_CLS and TOKEN_CLS train whatever the config
ADAPTED_LAYERS = (nn.Linear, Conv1D)  # what a default target is: GPT-2's projections are Conv1D


def require_peft():
    """The ``peft`` module, or an error that says how to install it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError(f"a LoRA student (student.lora.r > 0) needs peft: {INSTALL_HINT}") from err
    return peft


def is_peft_model(model) -> bool:
    """Whether ``model`` is a ``peft.PeftModel`` (told by its classes, without importing peft)."""
    return any(
        cls.__name__ == "PeftModel" and cls.__module__.startswith("peft") for cls in type(model).__mro__
    )


def enabled(lora) -> bool:
    """Whether a ``student.lora`` node (a mapping, or None) asks for LoRA: ``r`` set and above 0."""
    return bool(lora) and lora.get("r") is not None and lora.get("r") != 0


def check_settings(r, alpha=None, dropout=0.0, target_modules=None, modules_to_save=None) -> None:
    """Refuse ``student.lora`` settings that cannot make adapters, naming the key: ``r`` a whole number, 0 or
    more (0 and None: no LoRA); ``alpha`` above 0 (None: ``r``); ``dropout`` in [0, 1); ``target_modules`` and
    ``modules_to_save`` None, a list of names, or (``target_modules``) one regular expression."""
    if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
        raise ValueError(
            f"student.lora.r={r} must be a whole number, 0 or more: the adapters' rank (8 or 16 is usual); "
            "null or 0 trains the whole student without LoRA"
        )
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, int | float) or alpha <= 0):
        raise ValueError(
            f"student.lora.alpha={alpha} must be above 0 (the scale is alpha / r), or null for r"
        )
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise ValueError(f"student.lora.dropout={dropout} must be in [0, 1)")
    for key, value in (("target_modules", target_modules), ("modules_to_save", modules_to_save)):
        if value is None or (key == "target_modules" and isinstance(value, str)):
            continue
        if isinstance(value, str) or not all(isinstance(v, str) for v in value):
            raise ValueError(
                f"student.lora.{key}={value} must be a list of module names, e.g. [q_proj, v_proj]"
                + (", or one regular expression over the full names" if key == "target_modules" else "")
            )
    if isinstance(target_modules, str):
        try:
            re.compile(target_modules)
        except re.error as err:
            raise ValueError(
                f"student.lora.target_modules={target_modules!r} is no regular expression: {err}"
            ) from None


def matches(name: str, targets: str | list[str]) -> bool:
    """Whether the module ``name`` is one of ``targets`` as peft reads them: a regular expression matching the
    full name, or a list of names, each the full name or its last dotted parts."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith(f".{t}") for t in targets)


def _attention_blocks(model: nn.Module) -> list[str]:
    """The name of each layer's self-attention block: the outermost module above (or at) its innermost
    attention module whose class name ends in ``Attention``. BERT's ``BertAttention`` holds the query, key
    and value projections (in ``BertSelfAttention``) and the output projection; LLaMA's ``LlamaAttention``
    and GPT-2's ``GPT2Attention`` hold all four themselves."""
    modules = dict(model.named_modules())
    blocks = []
    for name, _ in attention_modules(model):
        parts = name.split(".")
        prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        blocks.append(next(p for p in prefixes if type(modules[p]).__name__.endswith("Attention")))
    return blocks


def attention_targets(model: nn.Module) -> list[str]:
    """The default ``target_modules``: every linear layer (``nn.Linear``, GPT-2's ``Conv1D``) of the model's
    self-attention blocks, named by the block's own name and their path inside it (``attention.self.query``,
    ``attention.output.dense``; ``self_attn.q_proj`` ... ``self_attn.o_proj``; ``attn.c_attn``,
    ``attn.c_proj``), or by their full names where such a short name would also match a module outside.

    Shape:
        Returns: names of the layers of one block, the same for every layer.
    """
    modules = dict(model.named_modules())
    full, short = [], []
    for block in _attention_blocks(model):
        for child, module in modules[block].named_modules():
            if child and isinstance(module, ADAPTED_LAYERS):
                full.append(f"{block}.{child}")
                short.append(f"{block.rsplit('.', 1)[-1]}.{child}")
    if not full:
        raise ValueError(
            f"{type(model).__name__}'s attention blocks hold no linear layers to adapt: name them with "
            "student.lora.target_modules"
        )
    short = sorted(set(short), key=short.index)
    adapted = {name for name, module in modules.items() if isinstance(module, ADAPTED_LAYERS)}
    return short if {n for n in adapted if matches(n, short)} == set(full) else full


def task_head(model: nn.Module) -> list[str]:
    """The default ``modules_to_save``: the model's task head, trained in full beside the adapters. It is
    each top-level module with weights other than the backbone (``base_model_prefix``) and the output
    embeddings: a classifier (``classifier``, ``score``) that may start at random; not a language model's
    head, which the input embeddings tie or a pretrained model brings."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, child in model.named_children()
        if child is not backbone
        and any(True for _ in child.parameters())
        and not (output is not None and any(m is output for m in child.modules()))
    ]


def _layer_names(model: nn.Module) -> str:
    """The last names of the model's adaptable layers, for an error that says what there is."""
    names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, ADAPTED_LAYERS)})
    return ", ".join(names)


def _task_of(model: nn.Module, task: str | None) -> str | None:
    if task is not None:
        return task
    from distill_lab.tasks import task_name_of  # loads torchmetrics: only for a task not given

    return task_name_of(model)


def apply_lora(
    student: nn.Module,
    r: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    target_modules: str | list[str] | None = None,
    modules_to_save: list[str] | None = None,
    task: str | None = None,
):
    """Wrap ``student`` in LoRA adapters: a ``peft.PeftModel`` whose base weights are frozen.

    Args:
        student: a transformers model (not already a PeftModel).
        r: the adapters' rank, above 0.
        alpha: the adapters' scale is ``alpha / r``; None: ``r`` (scale 1).
        dropout: dropout on the adapters' input.
        target_modules: the layers to adapt as peft names them (a list of names or name endings, or a regular
            expression over full names); None: :func:`attention_targets`.
        modules_to_save: modules trained in full and saved with the adapter; None: :func:`task_head`, [] none.
            Sequence and token classification train their head whatever this says (peft's task types).
        task: a distill-lab task name (``sequence_classification``...); None: read from the class name. It
            picks peft's task type, and so the ``AutoPeftModelFor...`` class that reloads the adapter.

    Returns:
        The ``PeftModel``; its forward takes the student's inputs and returns its outputs.
    """
    peft = require_peft()
    # lists as plain lists (a config's are ListConfig, which peft does not take for one)
    target_modules, modules_to_save = (
        list(v) if isinstance(v, Sequence) and not isinstance(v, str) else v
        for v in (target_modules, modules_to_save)
    )
    check_settings(r, alpha, dropout, target_modules, modules_to_save)
    if not r:
        raise ValueError(f"apply_lora: r={r}, but LoRA needs a rank above 0")
    if is_peft_model(student):
        raise ValueError(f"{type(student).__name__} already holds adapters: give apply_lora the plain model")
    targets = attention_targets(student) if target_modules is None else target_modules
    names = [n for n, _ in student.named_modules() if n]
    adapted = [n for n, m in student.named_modules() if matches(n, targets)]
    if not adapted:
        raise ValueError(
            f"student.lora.target_modules={targets} names no module of {type(student).__name__}; its linear "
            f"layers are: {_layer_names(student)}"
        )
    saved = task_head(student) if modules_to_save is None else list(modules_to_save)
    if missing := [s for s in saved if not any(matches(n, [s]) for n in names)]:
        top = ", ".join(n for n, _ in student.named_children())
        raise ValueError(
            f"student.lora.modules_to_save names {missing}, which {type(student).__name__} does not have; "
            f"its top-level modules are: {top}"
        )
    task_type = TASK_TYPES.get(_task_of(student, task))
    if task_type in ("SEQ_CLS", "TOKEN_CLS"):  # peft adds these heads itself: not named twice in the config
        saved = [s for s in saved if s not in CLASSIFIER_NAMES]
    modules = dict(student.named_modules())
    config = peft.LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else r,
        lora_dropout=dropout,
        target_modules=targets,
        modules_to_save=saved or None,
        task_type=task_type,
        # Conv1D (GPT-2's) stores its weight as (in, out); peft would otherwise warn and flip the setting
        fan_in_fan_out=all(isinstance(modules[n], Conv1D) for n in adapted),
    )
    with warnings.catch_warnings():  # transformers' deprecation, met inside peft: nothing a user can change
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return peft.get_peft_model(student, config)


def with_lora(student: nn.Module, settings: Mapping | None, task: str | None = None) -> nn.Module:
    """``student`` wrapped by :func:`apply_lora` with ``settings`` (a ``student.lora`` node: ``r``, ``alpha``,
    ``dropout``, ``target_modules``, ``modules_to_save``), or as it is where they ask for none (None, or ``r``
    null or 0). What the config's student targets do with their ``lora`` argument, for a ``cfg.student``
    instantiated on its own; ``train`` applies the settings itself, once the plain student is checked."""
    return apply_lora(student, task=task, **dict(settings)) if enabled(settings) else student


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merged_parameter_count(model: nn.Module) -> int:
    """The parameters of the model the adapters merge into (what ``merged/`` holds): the PeftModel's without
    the adapters and without the frozen originals of the modules trained in full."""
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if ".lora_" not in name and ".original_module." not in name
    )


def lora_record(model) -> dict:
    """A PeftModel's LoRA settings and sizes, for ``results.json`` and the model card."""
    config = model.peft_config[ADAPTER]
    targets = config.target_modules
    return {
        "r": config.r,
        "alpha": config.lora_alpha,
        "dropout": config.lora_dropout,
        "target_modules": sorted(targets) if isinstance(targets, set | list) else targets,
        "modules_to_save": sorted(set(config.modules_to_save or [])),
        "trainable_parameters": trainable_parameters(model),
    }


def save_lora_student(model, directory: str | Path, *, merge: bool = False, preprocessor=None) -> dict:
    """Write a PeftModel student to ``directory``: the adapter (``adapter_config.json``,
    ``adapter_model.safetensors``: the adapters and the modules trained in full), the frozen base it applies
    to in ``directory/base`` (``save_pretrained``; the adapter config names it by its absolute path) and, with
    ``merge``, the adapters merged into the base in ``directory/merged``, a plain transformers model (with
    ``preprocessor``, the tokenizer or image processor, beside it). ``model`` itself is left as it is.

    Returns :func:`lora_record` with the directories written.
    """
    directory = Path(directory)
    base_dir = directory / BASE_DIR
    # unloading drops the adapters without merging them: the base weights, which training left as they were
    copy.deepcopy(model).unload().save_pretrained(base_dir)
    config = model.peft_config[ADAPTER]
    given = config.base_model_name_or_path
    config.base_model_name_or_path = str(base_dir.resolve())
    try:
        model.save_pretrained(directory)
    finally:
        config.base_model_name_or_path = given
    record = lora_record(model) | {"base_dir": str(base_dir), "merged_dir": None}
    if merge:
        merged_dir = directory / MERGED_DIR
        copy.deepcopy(model).merge_and_unload().save_pretrained(merged_dir)
        if preprocessor is not None:
            preprocessor.save_pretrained(merged_dir)
        record["merged_dir"] = str(merged_dir)
    return record
