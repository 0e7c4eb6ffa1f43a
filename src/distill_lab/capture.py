"""Attention capture: per-layer attention probabilities out of any Hugging Face transformers model.

Why not ``output_attentions=True``: under transformers 5.x's default ``sdpa`` attention it returns no
attentions at all, and under ``eager`` the probabilities *after* dropout, so a student would be taught
dropout noise. Instead the model's attention implementation is switched to one registered here through
``AttentionInterface`` (with a matching ``AttentionMaskInterface`` entry, without which it would receive no
mask). In the captured layers it computes eager attention in float32, records the probabilities *before*
dropout and computes the layer's output from the same tensor, so gradients flow from the attention loss into
the student's queries and keys; every other layer runs SDPA (eager attention where the model soft-caps its
scores). The ``qk`` backend records queries and keys instead (``QueryKey``): with SDPA where the layer's
maps would exceed its memory budget, with eager attention whose maps the record keeps where they fit. A
requested layer that records nothing raises an error instead of passing silently.

Usage::

    capture = AttentionCapture(model, layers=[2, 5, 8, 11])
    outputs, maps = capture(input_ids=ids, attention_mask=mask)   # maps[5]: (B, H, L, L) float32
    capture.detach()                                              # or use it as a context manager
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from distill_lab.records import QueryKey, masked_softmax, repeat_heads

CAPTURE_ATTENTION = "distill_lab_capture"  # the probs backend: eager attention, maps recorded
QK_ATTENTION = "distill_lab_qk"  # the qk backend: SDPA attention, queries and keys recorded
BACKENDS = ("probs", "qk")
_STATE = "_distill_lab_capture"  # attribute set on captured attention modules: (capture, layer index)
# the qk backend's default memory budget off CUDA: bytes one captured layer's kept scores and probabilities
# may take (on CUDA the default is 0: SDPA and the fused kernels are the fast path there)
DEFAULT_MEMORY_BUDGET = 64 * 2**20

# keyword arguments a model may pass its attention function, beyond query, key, value, mask, scaling, dropout:
# those the capture applies (the rest of the record's mask: causality, window, soft cap, T5's bias) and those
# that do not change what attention computes. Any other (DeepSeek-V3.2's sparse `indices`, attention `sinks`,
# packed-sequence boundaries) would be dropped, and with it part of the model's attention: an error instead.
_APPLIED_ARGUMENTS = frozenset({"is_causal", "sliding_window", "softcap", "position_bias"})
_NEUTRAL_ARGUMENTS = frozenset({
    "position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value", "layer_idx",
    "deterministic", "return_dict", "output_attentions", "output_hidden_states", "output_router_logits",
    "num_items_in_batch", "max_length_q", "max_length_k", "logits_to_keep",
    # model inputs that a model's forward hands on in its **kwargs (LLaMA's classifier, given a batch that a
    # BERT-style tokenizer made, passes token_type_ids down to every attention call)
    "token_type_ids", "labels", "special_tokens_mask", "inputs_embeds", "pixel_values", "return_loss",
})  # fmt: skip
# where encoder-decoder models keep cross-attention built from their self-attention class
CROSS_ATTENTION_NAMES = frozenset(
    {"crossattention", "cross_attention", "cross_attn", "encoder_attn", "encdecattention"}
)


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The self-attention modules of a transformers model, in layer order, with their qualified names.

    An attention module is the innermost module whose class name ends in ``Attention`` (``BertSelfAttention``,
    ``GPT2Attention``, ``LlamaAttention``, ``ViTSelfAttention``); cross-attention modules are left out, known
    by their class (``...CrossAttention``), their ``is_cross_attention`` flag or, where the class is the
    self-attention's own (BART's ``encoder_attn``, T5's ``EncDecAttention``), by their place in the model.
    """
    found = []
    for name, module in model.named_modules():
        cls = type(module).__name__
        if not cls.endswith("Attention") or "Cross" in cls or getattr(module, "is_cross_attention", False):
            continue
        if any(part.lower() in CROSS_ATTENTION_NAMES for part in name.split(".")):
            continue
        if any(
            type(child).__name__.endswith("Attention")
            for _, child in module.named_modules()
            if child is not module
        ):
            continue
        found.append((name, module))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention modules that distill-lab recognises (innermost modules "
            "whose class name ends in 'Attention')."
        )
    return found


def check_capturable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's :func:`attention_modules`, refusing a model whose attention modules are not one per layer
    (as layer maps and derived students assume): encoder-decoders (T5, BART), layers that share one module
    (ALBERT) and hybrid models whose other layers have no attention (Qwen3-Next)."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model: distill-lab distils encoders (BERT, RoBERTa, ViT, T5's "
            "encoder alone, T5EncoderModel) and decoders (GPT-2, LLaMA-family), whose layers each hold one "
            "self-attention"
        )
    layers = getattr(config, "num_hidden_layers", None)
    modules = attention_modules(model)
    if layers is not None and len(modules) != layers:
        raise ValueError(
            f"{name} has {len(modules)} self-attention modules for its {layers} layers (layers that share "
            "one module, as ALBERT's do, or layers without attention in a hybrid model), so layer i is not "
            "attention module i and no layer map can name the layers distill-lab captures: this architecture "
            "is not supported"
        )
    return modules


def is_causal(model: nn.Module) -> bool | None:
    """Whether the model's self-attention is causal (each position sees only earlier ones: GPT-2, LLaMA) or
    bidirectional (BERT, ViT), from its attention modules' ``is_causal`` flags; None where they do not say
    (no flag, or layers that differ)."""
    flags = {getattr(module, "is_causal", None) for _, module in attention_modules(model)}
    return flags.pop() if len(flags) == 1 and None not in flags else None


def num_attention_heads(model: nn.Module) -> int:
    """Query heads per layer, read from the model's config."""
    config = getattr(model, "config", None)
    for key in ("num_attention_heads", "n_head", "num_heads"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot read the number of attention heads from the config of {type(model).__name__}")


def attention_width(model: nn.Module) -> int:
    """All heads' query features of a token (heads x head size), read from the model's config: the width
    of the vectors the relation losses compare (keys and values are as wide once grouped heads are
    expanded)."""
    config = getattr(model, "config", None)
    heads = num_attention_heads(model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads * head_dim


def _record_and_attend(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, Tensor | None]:
    """The attention function registered for both backends.

    ``probs``: eager attention in float32, the pre-dropout probabilities recorded and the output computed
    from them. ``qk``: the queries and keys recorded as a ``QueryKey``, the output from SDPA or, where the
    layer's maps fit the capture's memory budget, from eager attention whose scores and probabilities the
    record keeps (one softmax serves the output and the loss). Uncaptured layers run SDPA, but soft-capped
    ones (Gemma 2), which SDPA cannot run: they, captured or not, run eager attention in float32.

    Shape:
        query: (B, H, Lq, D) after any rotary embedding; key, value: (B, H_kv, Lk, D), H a multiple of H_kv.
        attention_mask: (B, 1, Lq, Lk) additive float or boolean mask, or None.
        Returns: output (B, Lq, H, D) and, for the probs backend, the probabilities (B, H, Lq, Lk).
    """
    state = getattr(module, _STATE, None)
    _check_arguments(module, kwargs)
    softcap = kwargs.get("softcap")
    if state is None and softcap is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    is_causal = kwargs.get("is_causal")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)  # as SDPA decides
    record = QueryKey(
        query, key, scaling if scaling is not None else query.shape[-1] ** -0.5, attention_mask,
        bool(is_causal), softcap, kwargs.get("sliding_window") or getattr(module, "sliding_window", None),
        kwargs.get("position_bias"), value=value,
    )  # fmt: skip
    capture, layer = state if state is not None else (None, None)
    qk = capture is not None and capture.backend == "qk"
    keep = qk and keeps_maps(record, capture.memory_budget)
    if qk and not keep:
        capture._record(layer, record)
        if softcap is None:
            return sdpa_attention_forward(
                module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
            )
    # eager attention: the probs backend's captured layers, the qk backend's within its memory budget, and
    # soft-capped layers (Gemma 2), which SDPA cannot run
    scores, empty = record.masked_scores(None)
    probs = masked_softmax(scores, empty)
    if keep:
        record.maps = (scores, probs)
        capture._record(layer, record)
    elif capture is not None and capture.backend == "probs":
        capture._record(layer, probs)
    value = repeat_heads(value, query.shape[1] // value.shape[1])
    weights = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, probs


def keeps_maps(record: QueryKey, memory_budget: int | None) -> bool:
    """Whether the qk backend computes a captured layer's attention eagerly and keeps its maps: whether its
    scores and probabilities fit ``memory_budget`` (None: ``DEFAULT_MEMORY_BUDGET`` off CUDA, 0 on CUDA)."""
    if memory_budget is None:
        memory_budget = 0 if record.query.device.type == "cuda" else DEFAULT_MEMORY_BUDGET
    batch, heads, q_len, _ = record.query.shape
    size = max(record.query.element_size(), 4)  # float32, or float64 for a float64 model
    return 2 * batch * heads * q_len * record.key.shape[2] * size <= memory_budget


def _check_arguments(module: nn.Module, kwargs: dict) -> None:
    """Refuse what the model asks of its attention that the capture would silently leave out."""
    unknown = [
        name for name, value in kwargs.items()
        if value is not None and name not in _APPLIED_ARGUMENTS and name not in _NEUTRAL_ARGUMENTS
    ]  # fmt: skip
    if unknown:
        sinks = " (attention sinks)" if {"s_aux", "sinks"} & set(unknown) else ""
        raise NotImplementedError(
            f"{type(module).__name__} passes its attention {', '.join(sorted(unknown))}{sinks}, which "
            "distill-lab's capture does not apply: the captured attention would differ from the model's. "
            "This architecture is not supported yet; open an issue naming it"
        )


def _tensors(record: Tensor | QueryKey) -> tuple[Tensor, ...]:
    return (record.query, record.key) if isinstance(record, QueryKey) else (record,)


def _register() -> None:
    AttentionInterface.register(CAPTURE_ATTENTION, _record_and_attend)
    AttentionMaskInterface.register(CAPTURE_ATTENTION, eager_mask)
    AttentionInterface.register(QK_ATTENTION, _record_and_attend)
    AttentionMaskInterface.register(QK_ATTENTION, sdpa_mask)


class AttentionCapture:
    """Records the pre-dropout attention of the chosen layers of a transformers model.

    Args:
        model: a transformers ``PreTrainedModel`` whose attention goes through ``AttentionInterface``
            (BERT, RoBERTa, GPT-2, LLaMA-family, ViT and most current architectures).
        layers: 0-based indices of the layers to capture, in the order of ``attention_modules(model)``.
        backend: ``"probs"`` (the default, and the reference) runs eager attention in the captured layers
            and records the probability maps, (B, H, Lq, Lk) in float32 (float64 for a float64 model),
            grouped key heads expanded to H. ``"qk"`` records each captured layer's queries and keys as a
            ``QueryKey``: beyond ``memory_budget`` the layer keeps SDPA and the losses recompute the
            probabilities block by block, so no ``L x L`` map outlives a block; within it the layer runs eager
            attention and the record keeps its scores and probabilities, which the losses use as they are.
        memory_budget: for ``"qk"``, the most bytes one captured layer's kept scores and probabilities may
            take (``2 x B x H x Lq x Lk`` elements, float32), decided per forward from the batch's shape.
            None: ``DEFAULT_MEMORY_BUDGET`` (64 MiB) off CUDA, where eager maps are the fastest path, and 0 on
            CUDA, where SDPA and the fused kernels are; 0 never keeps maps.

    Calling the capture runs the model and returns ``(outputs, maps)``, ``maps[layer]`` a tensor or a
    ``QueryKey``; ``distill_lab.attention.AttentionDistillationLoss`` takes either. A decoder runs with
    ``use_cache=False`` unless the call says otherwise: a loss reuses no key/value cache, and a teacher's
    would stay alive through the student's forward and the losses.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Iterable[int],
        backend: str = "probs",
        memory_budget: int | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown capture backend {backend!r}; valid choices: {', '.join(BACKENDS)}")
        if memory_budget is not None and memory_budget < 0:
            raise ValueError(f"memory_budget must be a number of bytes, 0 or more; got {memory_budget}")
        self.backend = backend
        self.memory_budget = memory_budget
        self.implementation = QK_ATTENTION if backend == "qk" else CAPTURE_ATTENTION
        self.model = model
        self.layers = sorted(set(int(i) for i in layers))
        self.modules = check_capturable(model)
        # a config's use_cache (BERT's too) matters only where the forward takes it: decoders. A peft wrapper
        # (a LoRA student) hands its keyword arguments on to the model it wraps, whose forward tells
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._no_cache = bool(getattr(getattr(model, "config", None), "use_cache", False)) and (
            "use_cache" in inspect.signature(inner.forward).parameters
        )
        self.num_layers = len(self.modules)
        if taken := [name for name, module in self.modules if hasattr(module, _STATE)]:
            raise ValueError(
                f"{type(model).__name__} is already being captured (its attention modules {taken[:3]} record "
                "for another AttentionCapture): detach that one first, one capture per model"
            )
        bad = [i for i in self.layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"{type(model).__name__} has {self.num_layers} attention layers (valid indices "
                f"0..{self.num_layers - 1}); cannot capture layer(s) {bad}."
            )
        if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
            raise ValueError(
                f"{type(model).__name__} does not route attention through transformers' AttentionInterface, "
                "so its attention maps cannot be captured before dropout. Use a model class that does (most "
                "current architectures) or open an issue naming the architecture."
            )
        self._maps: dict[int, Tensor | QueryKey] = {}
        self._previous = model.config._attn_implementation
        _register()
        model.set_attn_implementation(self.implementation)
        for i in self.layers:
            setattr(self.modules[i][1], _STATE, (self, i))

    def _record(self, layer: int, record: Tensor | QueryKey) -> None:
        self._maps[layer] = record

    def __call__(self, *args, **kwargs):
        return self.through(None, *args, **kwargs)

    def through(self, forward: Callable | None, *args, **kwargs):
        """``forward(*args, **kwargs)`` and the maps it recorded, as calling the capture returns them, where
        ``forward`` runs the captured model from outside: a wrapper around it (``DistributedDataParallel``,
        whose forward must run for the gradients to be reduced). None: the model itself. The records come
        from the model's attention modules, whichever module's forward reaches them."""
        self._maps = {}
        if self._no_cache:
            kwargs.setdefault("use_cache", False)
        outputs = (forward if forward is not None else self.model)(*args, **kwargs)
        maps, self._maps = self._maps, {}
        missing = [i for i in self.layers if i not in maps]
        if missing:
            raise RuntimeError(
                f"layers {missing} of {type(self.model).__name__} produced no attention map: its attention "
                f"did not go through the '{self.implementation}' implementation (was set_attn_implementation "
                "changed after the capture was attached?)."
            )
        if torch.is_grad_enabled() and self.model.training:
            dead = [i for i in self.layers if not any(t.requires_grad for t in _tensors(maps[i]))]
            if dead:  # the attention loss would train nothing there, and nothing would say so
                raise RuntimeError(
                    f"the attention of layers {dead} of {type(self.model).__name__} carries no gradient, so "
                    "an attention loss cannot train them. Activation checkpointing with use_reentrant=True "
                    "runs the layers outside autograd: use "
                    "activation_checkpointing_enable(activation_checkpointing_kwargs={'use_reentrant': "
                    "False}). Otherwise every parameter up to those layers is frozen."
                )
        return outputs, maps

    def detach(self) -> None:
        """Restore the model's own attention implementation and stop recording."""
        for _, module in self.modules:
            if hasattr(module, _STATE):
                delattr(module, _STATE)
        if self.model.config._attn_implementation == self.implementation:
            self.model.set_attn_implementation(self._previous or "sdpa")

    def __enter__(self) -> AttentionCapture:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()
