"""Teachers and students: loading Hugging Face models by hub name or local path, and deriving a student.

``load_teacher`` and ``load_student`` go through transformers' own ``from_pretrained``, so a hub name and a
local directory take the same path. ``derive_student`` builds a shallower (optionally narrower) copy of the
teacher's architecture and initialises it from the teacher's mapped layers where shapes allow, as DistilBERT
does, and randomly elsewhere.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer, PreTrainedModel

from distill_lab.capture import check_capturable, is_causal
from distill_lab.lora import with_lora
from distill_lab.matching import layer_map
from distill_lab.tasks import get_task

log = logging.getLogger(__name__)


def _auto_class(task: str):
    return get_task(task).auto_class


def _from_pretrained(
    role: str, name_or_path: str, task: str, num_labels: int | None, trust_remote_code: bool, **kwargs
):
    auto = _auto_class(task)
    if num_labels is not None:
        kwargs["num_labels"] = num_labels
    try:
        return auto.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as err:
        hint = (
            "it is neither a local directory with a saved model nor a model the hub could provide"
            if not Path(name_or_path).exists()
            else "the directory holds no loadable model"
        )
        raise ValueError(
            f"cannot load the {role} {role}.name_or_path={name_or_path!r}: {hint}. Give a hub name (with "
            f"network access) or a directory written by save_pretrained. ({type(err).__name__}: {err})"
        ) from err


def load_teacher(
    name_or_path: str,
    task: str = "sequence_classification",
    num_labels: int | None = None,
    builtin: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> PreTrainedModel:
    """The frozen teacher, in eval mode with gradients off.

    Args:
        name_or_path: a hub name (``textattack/bert-base-uncased-SST-2``) or a local directory.
        num_labels: checked against (or given to) the classification head.
        builtin: a built-in offline teacher (a name in ``distill_lab.builtin.BUILTIN_TEACHERS``, or ``"auto"``
            for the one of ``task``), trained into ``name_or_path`` first if
            nothing is saved there yet.
    """
    if builtin is not None:
        from distill_lab.builtin import builtin_for_task, builtin_task, train_builtin_teacher

        builtin = builtin_for_task(task) if builtin == "auto" else builtin
        if builtin_task(builtin) != task:
            raise ValueError(
                f"the built-in teacher {builtin!r} is trained for task={builtin_task(builtin)} and cannot "
                f"teach task={task}: give teacher=hf teacher.name_or_path=<a model trained for the task>"
            )
        if not (Path(name_or_path) / "config.json").exists():
            train_builtin_teacher(builtin, name_or_path)
    kwargs = {"revision": revision} if revision else {}
    teacher, info = _from_pretrained(
        "teacher", name_or_path, task, num_labels, trust_remote_code, output_loading_info=True, **kwargs
    )
    if info["missing_keys"]:
        # from_pretrained initialises what the checkpoint lacks at random (a classifier head on a base model,
        # an LM head on a classifier): such a teacher would teach noise
        missing = sorted(info["missing_keys"])
        raise ValueError(
            f"the teacher {name_or_path!r} is not trained for task={task}: loading it as "
            f"{type(teacher).__name__} leaves {len(missing)} weights random ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}). Fine-tune it on the task first, or choose the task it "
            "was trained for."
        )
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def load_student(
    name_or_path: str,
    teacher: PreTrainedModel | None = None,
    task: str = "sequence_classification",
    trust_remote_code: bool = False,
    lora: Mapping | None = None,
) -> PreTrainedModel:
    """A student by hub name or path, with the teacher's labels (their number and names: the exported student
    reads its predictions as the teacher does). A classification head saved for another number of labels
    is initialised afresh, with a warning. ``lora``: ``distill_lab.lora.with_lora``'s settings."""
    if teacher is None or not task.endswith("classification"):
        return with_lora(_from_pretrained("student", name_or_path, task, None, trust_remote_code), lora, task)
    labels = {"id2label": dict(teacher.config.id2label), "label2id": dict(teacher.config.label2id)}
    student, info = _from_pretrained(
        "student", name_or_path, task, teacher.config.num_labels, trust_remote_code, **labels,
        ignore_mismatched_sizes=True, output_loading_info=True,
    )  # fmt: skip
    if mismatched := [
        str(entry[0] if isinstance(entry, tuple) else entry) for entry in info.get("mismatched_keys", [])
    ]:
        log.warning(
            "the student %r was saved with a head for another number of labels than the teacher's %d: %s "
            "initialised afresh", name_or_path, teacher.config.num_labels, ", ".join(sorted(mismatched)),
        )  # fmt: skip
    return with_lora(student, lora, task)


def check_student(
    student: PreTrainedModel, teacher: PreTrainedModel, tokenizer=None, name_or_path: str | None = None
) -> None:
    """Refuse, before training, a student that cannot learn the teacher's attention: one whose attention is
    causal where the teacher's is bidirectional (or the other way round), whose input embeddings miss ids of
    the teacher's tokenizer (``tokenizer``), or whose own saved tokenizer (``name_or_path``) is another.

    Attention maps are compared position by position and the student reads the teacher's token ids, so both
    must tokenize alike; a causal student can put no weight on later tokens, which a bidirectional teacher's
    maps hold, so its attention loss could not approach 0.
    """
    kinds = {role: is_causal(model) for role, model in (("teacher", teacher), ("student", student))}
    if None not in kinds.values() and kinds["teacher"] != kinds["student"]:
        name = {True: "causal (each token sees only earlier ones)", False: "bidirectional"}
        raise ValueError(
            f"the teacher's attention ({type(teacher).__name__}) is {name[kinds['teacher']]} and the "
            f"student's ({type(student).__name__}) {name[kinds['student']]}: their attention maps cannot "
            "match. Distil into a student of the teacher's kind (student=from_teacher derives one)"
        )
    if tokenizer is None:
        return
    embeddings = student.get_input_embeddings()
    if embeddings is not None and embeddings.num_embeddings < len(tokenizer):
        raise ValueError(
            f"the student's input embeddings hold {embeddings.num_embeddings} token ids, the teacher's "
            f"tokenizer {len(tokenizer)}: the student must use the teacher's tokenizer and vocabulary"
        )
    if name_or_path is None or (Path(name_or_path).is_dir() and not _holds_tokenizer(Path(name_or_path))):
        return
    try:
        own = load_tokenizer(name_or_path)
    except ValueError as err:  # a hub student saved without a tokenizer: only loading tells
        log.info(
            "the student %r has no tokenizer of its own to compare with the teacher's (%s)", name_or_path, err
        )
        return
    theirs, ours = tokenizer.get_vocab(), own.get_vocab()
    if differ := sum(
        ours.get(token) != index for token, index in theirs.items()
    ):  # tokens of its own beyond: fine
        raise ValueError(
            f"student.name_or_path={name_or_path!r} has a tokenizer of its own that is not the teacher's "
            f"({differ} of the teacher's {len(theirs)} tokens are missing or have other ids): the student "
            "reads the teacher's token ids, and the attention maps are compared position by position. Use a "
            "student trained with the teacher's tokenizer, or student=from_teacher"
        )


def _holds_tokenizer(directory: Path) -> bool:
    """Whether a local model directory holds a saved tokenizer's files."""
    return any(f.name.startswith(TOKENIZER_FILES) for f in directory.iterdir())


TOKENIZER_FILES = (
    "tokenizer",
    "vocab",
    "merges",
    "spiece",
    "sentencepiece",
)  # how saved tokenizers' files start


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The tokenizer saved with a model (the teacher's: the student must see the same tokens).

    A tokenizer without a padding token (GPT-2, LLaMA) pads with its end-of-sequence token; the padded
    positions are masked out of every loss by the attention mask and labels of -100. ``revision`` (a hub
    branch, tag or commit) is the teacher's: its tokenizer at the same version.
    """
    directory = Path(name_or_path)
    if directory.is_dir() and not _holds_tokenizer(directory):
        # transformers would build a default tokenizer of a handful of tokens: every word unknown, silently
        raise ValueError(
            f"{name_or_path!r} holds no tokenizer (tokenizer.json, tokenizer_config.json, vocab files): save "
            "the model's tokenizer beside it with tokenizer.save_pretrained(directory)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {name_or_path!r}: {err}") from err
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_preprocessor(
    name_or_path: str,
    task: str = "sequence_classification",
    trust_remote_code: bool = False,
    revision: str | None = None,
):
    """What turns the task's raw inputs into model inputs: the teacher's tokenizer for text tasks, its image
    processor (resizing, normalisation) for image tasks; both at the teacher's ``revision``."""
    if get_task(task).inputs == "text":
        return load_tokenizer(name_or_path, trust_remote_code, revision)
    try:
        return AutoImageProcessor.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, revision=revision
        )
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load an image processor from {name_or_path!r}: an image teacher needs the image "
            "processor it was trained with (preprocessor_config.json, written by "
            f"processor.save_pretrained(directory) as the Hub's ViT models have it). {err}"
        ) from err


POSITION_TABLES = ("position_embeddings", "wpe", "embed_positions")  # BERT/RoBERTa, GPT-2, OPT/BART


def position_limit(model: nn.Module) -> int | None:
    """How many tokens a model with a learned table of absolute positions (BERT, RoBERTa, GPT-2) takes: the
    table's rows, less the offset of RoBERTa's positions past the padding index (514 rows, 512 tokens). None
    where positions are rotary or relative (LLaMA, T5) or the inputs are no tokens (ViT's patch positions are
    a parameter, not an embedding table): nothing caps the length there."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and name.rsplit(".", 1)[-1] in POSITION_TABLES:
            offset = (
                module.padding_idx + 1 if module.padding_idx is not None else getattr(module, "offset", 0)
            )
            return module.num_embeddings - offset
    return None


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def _per_layer_settings(config, sources: list[int], num_teacher_layers: int) -> None:
    """Shorten the config's per-layer lists (``layer_types`` of Qwen2, Gemma2/3, ModernBERT: sliding or full
    attention; ``no_rope_layers`` ...) to the student's layers, each entry taken from the teacher layer that
    the student layer starts from, so that a student layer attends as its teacher layer does. Any list or
    tuple with one entry per teacher layer counts; transformers refuses to save a config whose ``layer_types``
    has another length than ``num_hidden_layers``."""
    for key, value in vars(config).items():
        if isinstance(value, (list, tuple)) and len(value) == num_teacher_layers and key != "architectures":
            setattr(config, key, type(value)(value[t] for t in sources))
            log.info("student config: %s taken from the teacher's layers %s", key, sources)


def _narrow(config, num_heads: int | None, hidden_size: int | None, intermediate_size: int | None) -> None:
    """Give the student's config (a copy of the teacher's) ``num_heads`` heads, a ``hidden_size`` and an
    ``intermediate_size`` (feed-forward width), where set."""
    # a head size of its own (Gemma: 256 at any width) stays; one derived from the width (LLaMA, Qwen3's
    # configs store hidden / heads) is derived again from the student's
    head_dim = getattr(config, "head_dim", None)
    own_head_dim = head_dim is not None and head_dim != config.hidden_size // config.num_attention_heads
    if hidden_size is not None:
        config.hidden_size = hidden_size
    if num_heads is not None:
        config.num_attention_heads = num_heads
        if getattr(config, "num_key_value_heads", None) is not None:
            config.num_key_value_heads = min(config.num_key_value_heads, num_heads)
            while num_heads % config.num_key_value_heads:
                config.num_key_value_heads -= 1
    if head_dim is not None and not own_head_dim:
        config.head_dim = config.hidden_size // config.num_attention_heads
    if intermediate_size is not None:
        # the feed-forward width: BERT, LLaMA...; GPT-2; DistilBERT; T5; OPT
        widths = [
            key
            for key in ("intermediate_size", "n_inner", "hidden_dim", "d_ff", "ffn_dim")
            if hasattr(config, key)
        ]
        if not widths:
            raise ValueError(
                f"student.intermediate_size={intermediate_size}: the teacher's {type(config).__name__} names "
                "its feed-forward width by no key distill-lab knows (intermediate_size, n_inner, hidden_dim, "
                "d_ff, ffn_dim); leave student.intermediate_size null, or pass a student config of your own"
            )
        for key in widths:
            setattr(config, key, intermediate_size)
    if not own_head_dim and config.hidden_size % config.num_attention_heads:
        raise ValueError(
            f"the student's hidden_size {config.hidden_size} is not divisible by its "
            f"{config.num_attention_heads} heads"
        )


def _copy_teacher_tensors(student: PreTrainedModel, teacher: PreTrainedModel, source_layer: dict) -> None:
    """Copy into ``student`` every teacher tensor of the same shape, student layer j's from teacher layer
    ``source_layer[j]``; the rest keeps its random initialisation. The split is logged."""
    teacher_state = teacher.state_dict()
    copied, total = 0, 0
    with torch.no_grad():
        for key, param in student.state_dict().items():
            total += 1
            match = _LAYER_INDEX.search(key)
            source = key
            if match:
                layer = int(match.group(1))
                source = f"{key[: match.start()]}.{source_layer.get(layer, layer)}.{key[match.end() :]}"
            # a tensor only the teacher's first layer has (T5's relative-position bias) comes from there
            value = teacher_state.get(source, teacher_state.get(key))
            if value is not None and value.shape == param.shape:
                param.copy_(value)
                copied += 1
    log.info("student initialised from the teacher: %d of %d tensors copied, the rest random", copied, total)


def derive_student(
    teacher: PreTrainedModel,
    num_layers: int,
    num_heads: int | None = None,
    hidden_size: int | None = None,
    intermediate_size: int | None = None,
    init: str = "teacher",
    lora: Mapping | None = None,
) -> PreTrainedModel:
    """A student of the teacher's architecture with ``num_layers`` layers (and optionally fewer heads or a
    narrower hidden size).

    With ``init="teacher"``, student layer j starts from teacher layer ``layer_map(..., "uniform")[j]`` and
    the embeddings and head from the teacher's, wherever the tensor shapes agree; everything else keeps its
    random initialisation. ``init="random"`` skips the copy. The split is logged. ``lora``: LoRA settings
    (``distill_lab.lora.with_lora``), None for none.
    """
    check_capturable(teacher)  # one self-attention per layer, or no layer map could pair teacher and student
    config = copy.deepcopy(teacher.config)
    num_teacher_layers = config.num_hidden_layers
    if not 1 <= num_layers <= num_teacher_layers:
        raise ValueError(
            f"student.num_layers={num_layers} must be between 1 and the teacher's {num_teacher_layers} layers"
        )
    config.num_hidden_layers = num_layers
    source_layer = dict((s, t) for t, s in layer_map(num_teacher_layers, num_layers, "uniform"))
    _per_layer_settings(config, [source_layer[j] for j in range(num_layers)], num_teacher_layers)
    _narrow(config, num_heads, hidden_size, intermediate_size)
    if init not in ("teacher", "random"):
        raise ValueError(f"student.init={init!r}; valid: 'teacher', 'random'")
    student = type(teacher)(config)
    if init == "teacher":
        _copy_teacher_tensors(student, teacher, source_layer)
    student.train()
    return with_lora(student, lora)
