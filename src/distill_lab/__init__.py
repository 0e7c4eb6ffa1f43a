"""distill-lab: attention-based knowledge distillation for Hugging Face transformers.

The names a library user needs, importable from the package::

    from distill_lab import AttentionCapture, AttentionDistillationLoss, kd_loss, layer_map

They are imported on first use (PEP 562), so ``import distill_lab.losses`` stays pure PyTorch: the Lightning
module and the tasks load Lightning and torchmetrics only when they are asked for, and the benchmarks, which
run where neither Hydra nor wandb is installed, import only what they use.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("distill-lab")
except PackageNotFoundError:  # the source tree on the path without an install (PYTHONPATH=src)
    __version__ = "0+unknown"

# public name -> the module that defines it
_EXPORTS = {
    # capture: attention maps, or queries and keys, of chosen layers
    "AttentionCapture": "capture",
    "QueryKey": "records",
    # the attention component: layer pairs, matching mode, loss, and how each pair is computed
    "AttentionDistillationLoss": "attention",
    # functional losses
    "AttentionLoss": "losses",
    "attention_cosine": "losses",
    "attention_kl": "losses",
    "attention_mse": "losses",
    "attention_mse_scores": "losses",
    "distillation_objective": "losses",
    "kd_loss": "losses",
    # hidden states: TinyBERT's hidden-state loss, its layer map and projections
    "HiddenStateLoss": "hidden",
    "hidden_cosine": "hidden",
    "hidden_layer_map": "hidden",
    "hidden_mse": "hidden",
    # self-attention relations (MiniLM, MiniLMv2)
    "MiniLMLoss": "relations",
    "RelationLoss": "relations",
    "relation_kl": "relations",
    # layer maps and matching modes
    "Global": "matching",
    "Headwise": "matching",
    "Layerwise": "matching",
    "Selective": "matching",
    "get_matching": "matching",
    "layer_map": "matching",
    "pair_name": "matching",
    # models
    "derive_student": "models",
    "apply_lora": "lora",
    # training
    "DistillationModule": "module",
    "DistillationTrainer": "trainer",
    "CausalLM": "tasks",
    "ImageClassification": "tasks",
    "MaskedLM": "tasks",
    "SequenceClassification": "tasks",
    "TokenClassification": "tasks",
    "get_task": "tasks",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'distill_lab' has no attribute {name!r}")
    value = getattr(import_module(f"distill_lab.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
