"""Shared fixtures: tiny random transformers models, saved and loaded back by path.

A model is built from its config class with tiny sizes (hidden 32, 3 layers, 4 heads, intermediate 37, vocab
100), saved with ``save_pretrained`` and loaded back with the Auto class, the same code path a hub name takes
(never touching the network). All dropout probabilities default to 0 so train-mode runs are deterministic;
pass e.g. ``attention_probs_dropout_prob=0.5`` to turn one on.

Reuse from any test file::

    def test_something(tiny_model_factory):
        model = tiny_model_factory("llama", num_hidden_layers=2)   # eval mode, GQA 4 query / 2 key heads
        inputs = make_tiny_inputs("llama", model.config)            # padded batch: input_ids, attention_mask
"""

from __future__ import annotations

import itertools
import os

# Without an NVIDIA driver, Triton kernels run on CPU tensors in its interpreter. Triton reads this when it is
# first imported (torch and lightning import it), so it is set before anything else.
if not os.path.exists("/proc/driver/nvidia"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    RobertaConfig,
    RobertaForSequenceClassification,
    ViTConfig,
    ViTForImageClassification,
)

FAMILIES = ("bert", "roberta", "gpt2", "llama", "vit")
TEXT_FAMILIES = ("bert", "roberta", "gpt2", "llama")
CAUSAL_FAMILIES = ("gpt2", "llama")
ENCODER_FAMILIES = ("bert", "roberta", "vit")

TINY_VOCAB = 100
TINY_LAYERS = 3
TINY_HEADS = 4

# family -> (config class, concrete model class, Auto class used to load it back, config kwargs)
_FAMILY_SPECS: dict[str, tuple[type, type, type, dict]] = {
    "bert": (
        BertConfig,
        BertForSequenceClassification,
        AutoModelForSequenceClassification,
        dict(
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=37,
            vocab_size=TINY_VOCAB,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
            num_labels=3,
        ),
    ),
    "roberta": (
        RobertaConfig,
        RobertaForSequenceClassification,
        AutoModelForSequenceClassification,
        dict(
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=37,
            vocab_size=TINY_VOCAB,
            # positions start at pad_token_id + 1 = 2, so this allows sequences up to 62 tokens
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            num_labels=3,
        ),
    ),
    "gpt2": (
        GPT2Config,
        GPT2LMHeadModel,
        AutoModelForCausalLM,
        dict(
            n_embd=32,
            n_layer=TINY_LAYERS,
            n_head=TINY_HEADS,
            n_inner=37,
            vocab_size=TINY_VOCAB,
            n_positions=64,
            attn_pdrop=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        ),
    ),
    "llama": (
        LlamaConfig,
        LlamaForCausalLM,
        AutoModelForCausalLM,
        dict(
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            num_key_value_heads=2,  # grouped-query attention: 2 query heads per key head
            intermediate_size=37,
            vocab_size=TINY_VOCAB,
            max_position_embeddings=64,
            attention_dropout=0.0,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
    ),
    "vit": (
        ViTConfig,
        ViTForImageClassification,
        AutoModelForImageClassification,
        dict(
            hidden_size=32,
            num_hidden_layers=TINY_LAYERS,
            num_attention_heads=TINY_HEADS,
            intermediate_size=37,
            image_size=16,
            patch_size=4,  # 16 patches + [CLS] = 17 tokens
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            num_labels=3,
        ),
    ),
}


def _spec(family: str) -> tuple[type, type, type, dict]:
    try:
        return _FAMILY_SPECS[family]
    except KeyError:
        raise ValueError(f"unknown tiny model family {family!r}; choose from {FAMILIES}") from None


def make_tiny_config(family: str, **config_overrides) -> PretrainedConfig:
    """The tiny config of ``family``; overrides may use the generic names (``num_hidden_layers`` also for GPT-2)."""
    config_class, _, _, defaults = _spec(family)
    attribute_map = getattr(config_class, "attribute_map", {}) or {}
    overrides = {attribute_map.get(key, key): value for key, value in config_overrides.items()}
    return config_class(**{**defaults, **overrides})


def make_tiny_model(family: str, path: str | Path, *, seed: int = 0, **config_overrides) -> PreTrainedModel:
    """Build a tiny random model of ``family``, ``save_pretrained`` it to ``path`` and load it back by path.

    Loading goes through ``AutoModelForSequenceClassification`` (bert, roberta), ``AutoModelForCausalLM``
    (gpt2, llama) or ``AutoModelForImageClassification`` (vit). The weights depend only on ``seed`` and the
    config. Returns the loaded model in eval mode, with transformers' default attention implementation (sdpa).
    """
    _, model_class, auto_class, _ = _spec(family)
    config = make_tiny_config(family, **config_overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    path = Path(path)
    model.save_pretrained(path)
    loaded = auto_class.from_pretrained(path)
    return loaded.eval()


def make_tiny_inputs(
    family: str,
    config: PretrainedConfig,
    *,
    batch_size: int = 2,
    seq_len: int = 8,
    num_padded: int = 3,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Model inputs for a tiny model of ``family``.

    Text families: ``input_ids`` (B, seq_len) drawn from ``3..vocab-1`` (clear of the special ids) and an
    ``attention_mask`` where the *last* example has ``num_padded`` trailing padding positions (their ids set to
    the pad token). Vision: ``pixel_values`` (B, channels, image_size, image_size).
    """
    generator = torch.Generator().manual_seed(seed)
    if family == "vit":
        shape = (batch_size, config.num_channels, config.image_size, config.image_size)
        return {"pixel_values": torch.randn(shape, generator=generator)}
    _spec(family)
    input_ids = torch.randint(3, config.vocab_size, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones(batch_size, seq_len, dtype=torch.long)
    if num_padded:
        attention_mask[-1, seq_len - num_padded :] = 0
        pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        input_ids[-1, seq_len - num_padded :] = pad_id
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.fixture
def tiny_model_factory(tmp_path: Path) -> Callable[..., PreTrainedModel]:
    """``factory(family, *, seed=0, **config_overrides) -> model``: ``make_tiny_model`` into a fresh subfolder
    of the test's ``tmp_path`` (so one test can build several models)."""
    counter = itertools.count()

    def factory(family: str, *, seed: int = 0, **config_overrides) -> PreTrainedModel:
        return make_tiny_model(family, tmp_path / f"{family}-{next(counter)}", seed=seed, **config_overrides)

    return factory
