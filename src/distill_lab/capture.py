"""Attention capture: per-layer attention probabilities out of any Hugging Face transformers model.

Why not ``output_attentions=True``: under transformers 5.x's default ``sdpa`` attention it returns no
attentions at all (only a warning), and under ``eager`` it returns the probabilities *after* attention
dropout in train mode, so a student would be taught dropout noise. Instead, the captured model's attention
implementation is switched to one registered here through transformers' ``AttentionInterface`` (with a
matching ``AttentionMaskInterface`` entry, without which the function would receive no mask). In the layers
being captured it computes eager attention in float32, records the probabilities *before* dropout and uses
the same tensor for the layer's output, so gradients flow from the attention loss into the student's
queries and keys. Every other layer runs SDPA as before (eager attention where the model soft-caps its
scores, which SDPA cannot do). The ``qk`` backend records the captured layers' queries and keys instead
(see ``QueryKey``): with SDPA where their maps would exceed its memory budget, and with eager attention,
whose scores and probabilities the record keeps for the loss, where they fit. A requested layer that
records nothing (a model whose attention does not go through ``AttentionInterface``) raises an error
instead of passing silently.

Usage::

    capture = AttentionCapture(model, layers=[2, 5, 8, 11])
    outputs, maps = capture(input_ids=ids, attention_mask=mask)   # maps[5]: (B, H, L, L) float32
    capture.detach()                                              # or use it as a context manager
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

CAPTURE_ATTENTION = "distill_lab_capture"  # the probs backend: eager attention, maps recorded
QK_ATTENTION = "distill_lab_qk"  # the qk backend: SDPA attention, queries and keys recorded
BACKENDS = ("probs", "qk")
_STATE = "_distill_lab_capture"  # attribute set on captured attention modules: (capture, layer index)
# the qk backend's default memory budget off CUDA: bytes one captured layer's kept scores and probabilities may
# take (on CUDA the default is 0: SDPA and the fused kernels are the fast path there)
DEFAULT_MEMORY_BUDGET = 64 * 2**20

# keyword arguments a model may pass its attention function, beyond query, key, value, mask, scaling, dropout:
# those the capture applies (the rest of the record's mask: causality, window, soft cap, T5's bias) and those
# that do not change what attention computes. Any other (DeepSeek-V3.2's sparse `indices`, attention `sinks`,
# packed-sequence boundaries) would be dropped, and with it part of the model's attention: an error instead.
_APPLIED_ARGUMENTS = frozenset({"is_causal", "sliding_window", "softcap", "position_bias"})
_NEUTRAL_ARGUMENTS = frozenset({
    "position_ids", "cache_position", "use_cache", "past_key_values", "past_key_value", "layer_idx", "deterministic",
    "return_dict", "output_attentions", "output_hidden_states", "output_router_logits", "num_items_in_batch",
    "max_length_q", "max_length_k", "logits_to_keep",
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
    """The model's :func:`attention_modules`, refusing a model whose attention modules are not one per layer,
    which layer maps, layer indices and derived students all assume: encoder-decoder models (T5, BART: the
    decoder's self-attention follows the encoder's, under one layer count), layers that share one module
    (ALBERT) and hybrid models whose other layers have no attention (Qwen3-Next's linear-attention layers),
    where layer i would not be attention module i."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} is an encoder-decoder model: distill-lab distils encoders (BERT, RoBERTa, ViT, T5's encoder "
            "alone, T5EncoderModel) and decoders (GPT-2, LLaMA-family), whose layers each hold one self-attention"
        )
    layers = getattr(config, "num_hidden_layers", None)
    modules = attention_modules(model)
    if layers is not None and len(modules) != layers:
        raise ValueError(
            f"{name} has {len(modules)} self-attention modules for its {layers} layers (layers that share one module, "
            "as ALBERT's do, or layers without attention in a hybrid model), so layer i is not attention module i "
            "and no layer map can name the layers distill-lab captures: this architecture is not supported"
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


@dataclass
class QueryKey:
    """One layer's queries and keys: enough to recompute its attention probabilities, block by block.

    This is what the ``qk`` backend records instead of an ``L x L`` map. ``probs(rows)`` gives the
    probabilities of a block of query rows in float32, with the layer's own mask (or causal structure).

    Shape:
        query: (B, H, Lq, D) after any rotary embedding; key: (B, H_kv, Lk, D), H a multiple of H_kv.
        mask: (B, 1 or H, Lq, Lk) as the model built it (additive float or boolean), or None.

    ``causal`` and ``sliding_window`` describe the layer itself; when ``mask`` is given it is what the scores
    use, and ``causal`` applies only where the model built no mask. ``bias`` is a per-layer additive score
    bias (T5's relative positions), ``(B or 1, H, Lq, Lk)``. ``maps`` holds the whole layer's ``(scores,
    probabilities)`` where the capture computed them anyway (eager attention within its memory budget):
    ``scores`` and ``probs`` then return them instead of computing them again.

    The scores are computed in float32 even under ``torch.autocast``: a bf16 product of queries and keys
    rounds the scores, which roughly doubles a small KL between near-equal maps.
    """

    query: Tensor
    key: Tensor
    scaling: float
    mask: Tensor | None = None
    causal: bool = False
    softcap: float | None = None
    sliding_window: int | None = None
    bias: Tensor | None = None
    maps: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The shape of the probabilities this stands for: (B, H, Lq, Lk)."""
        return (*self.query.shape[:3], self.key.shape[2])

    def detach(self) -> QueryKey:
        """The same record, with no gradient flowing back through it (a teacher's: the target)."""
        maps = None if self.maps is None else tuple(m.detach() for m in self.maps)
        return dataclasses.replace(self, query=self.query.detach(), key=self.key.detach(), maps=maps)

    def scores(self, rows: slice | None = None) -> Tensor:
        """Masked attention scores (B, H, rows, Lk) in float32 (float64 for float64 inputs)."""
        if self.maps is not None:
            return self.maps[0] if rows is None else self.maps[0][:, :, rows]
        rows = rows or slice(0, self.query.shape[2])
        query = self.query[:, :, rows]
        key = self.key
        groups = query.shape[1] // key.shape[1]
        if groups > 1:  # grouped-query attention: each key head serves `groups` query heads
            key = key.repeat_interleave(groups, dim=1)
        dtype = torch.promote_types(query.dtype, torch.float32)
        with torch.autocast(query.device.type, enabled=False):
            scores = torch.matmul(query.to(dtype), key.to(dtype).transpose(-1, -2)) * self.scaling
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        if self.bias is not None:
            bias = self.bias if self.bias.shape[2] == 1 else self.bias[:, :, rows]
            scores = scores + bias[..., : key.shape[2]].to(dtype)
        q_len, k_len = self.query.shape[2], key.shape[2]
        if self.mask is not None:
            mask = self.mask[..., :k_len] if self.mask.shape[2] == 1 else self.mask[:, :, rows, :k_len]
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, -math.inf)
            else:
                scores = scores + mask.to(dtype)
        elif self.causal and q_len > 1:
            positions = torch.arange(rows.start, rows.start + scores.shape[2], device=scores.device) + (
                k_len - q_len
            )
            allowed = torch.arange(k_len, device=scores.device)[None, :] <= positions[:, None]
            scores = scores.masked_fill(~allowed, -math.inf)
        return scores

    def probs(self, rows: slice | None = None) -> Tensor:
        """Attention probabilities (B, H, rows, Lk), before dropout, in float32 (float64 for float64); a row
        that may see no key (a padded query under a boolean mask) is all zeros, as SDPA gives it, not NaN."""
        if self.maps is not None:
            return self.maps[1] if rows is None else self.maps[1][:, :, rows]
        return _softmax(self.scores(rows))


def _softmax(scores: Tensor) -> Tensor:
    """Probabilities from masked scores; a row with no allowed key is all zeros."""
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    # float32 under autocast too: autocast runs softmax in float32
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


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

    ``probs``: eager attention in float32; the pre-dropout probabilities are recorded and are the tensor
    the output is computed from. ``qk``: the layer's queries and keys are recorded as a ``QueryKey``; the
    output comes from SDPA as usual or, where the layer's maps fit the capture's memory budget, from eager
    attention whose scores and probabilities the record keeps (one softmax serves the output and the loss).
    Layers that are not captured run SDPA, except soft-capped ones (Gemma 2), which SDPA cannot run: they,
    captured or not, run eager attention in float32.

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
    record = QueryKey(
        query,
        key,
        scaling if scaling is not None else query.shape[-1] ** -0.5,
        attention_mask,
        # as SDPA decides: the call's flag, else the module's, else causal
        bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)),
        softcap,
        kwargs.get("sliding_window") or getattr(module, "sliding_window", None),
        kwargs.get("position_bias"),
    )
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
    scores = record.scores()
    probs = _softmax(scores)
    if keep:
        capture._record(layer, dataclasses.replace(record, maps=(scores, probs)))
    elif capture is not None and capture.backend == "probs":
        capture._record(layer, probs)
    groups = query.shape[1] // value.shape[1]
    if groups > 1:
        value = value.repeat_interleave(groups, dim=1)
    weights = nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, probs


def keeps_maps(record: QueryKey, memory_budget: int | None) -> bool:
    """Whether the qk backend computes a captured layer's attention eagerly and keeps its maps: whether its
    scores and probabilities fit ``memory_budget`` (None: ``DEFAULT_MEMORY_BUDGET`` off CUDA, 0 on CUDA)."""
    if memory_budget is None:
        memory_budget = 0 if record.query.device.type == "cuda" else DEFAULT_MEMORY_BUDGET
    batch, heads, q_len, k_len = record.shape
    size = torch.promote_types(record.query.dtype, torch.float32).itemsize
    return 2 * batch * heads * q_len * k_len * size <= memory_budget


def _check_arguments(module: nn.Module, kwargs: dict) -> None:
    """Refuse what the model asks of its attention that the capture would silently leave out."""
    unknown = [
        name for name, value in kwargs.items()
        if value is not None and name not in _APPLIED_ARGUMENTS and name not in _NEUTRAL_ARGUMENTS
    ]  # fmt: skip
    if unknown:
        sinks = " (attention sinks)" if {"s_aux", "sinks"} & set(unknown) else ""
        raise NotImplementedError(
            f"{type(module).__name__} passes its attention {', '.join(sorted(unknown))}{sinks}, which distill-lab's "
            "capture does not apply: the captured attention would differ from the model's. This architecture is "
            "not supported yet; open an issue naming it"
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
    ``QueryKey``; ``distill_lab.matching.AttentionDistillationLoss`` takes either. A decoder is run with
    ``use_cache=False`` unless the call says otherwise: a loss reuses no key/value cache, and a teacher's would
    stay alive through the student's forward and the losses (at long lengths, a copy of every layer's keys and
    values).
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
        # a config's use_cache (BERT's too) matters only where the forward takes it: decoders
        self._no_cache = bool(getattr(getattr(model, "config", None), "use_cache", False)) and (
            "use_cache" in inspect.signature(model.forward).parameters
        )
        self.num_layers = len(self.modules)
        if taken := [name for name, module in self.modules if hasattr(module, _STATE)]:
            raise ValueError(
                f"{type(model).__name__} is already being captured (its attention modules {taken[:3]} record for "
                "another AttentionCapture): detach that one first, one capture per model"
            )
        bad = [i for i in self.layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(
                f"{type(model).__name__} has {self.num_layers} attention layers (valid indices 0..{self.num_layers - 1}); "
                f"cannot capture layer(s) {bad}."
            )
        if not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
            raise ValueError(
                f"{type(model).__name__} does not route attention through transformers' AttentionInterface, so its "
                "attention maps cannot be captured before dropout. Use a model class that does (most current "
                "architectures) or open an issue naming the architecture."
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
        self._maps = {}
        if self._no_cache:
            kwargs.setdefault("use_cache", False)
        outputs = self.model(*args, **kwargs)
        maps, self._maps = self._maps, {}
        missing = [i for i in self.layers if i not in maps]
        if missing:
            raise RuntimeError(
                f"layers {missing} of {type(self.model).__name__} produced no attention map: its attention did not go "
                f"through the '{self.implementation}' implementation (was set_attn_implementation changed after the "
                "capture was attached?)."
            )
        if torch.is_grad_enabled() and self.model.training:
            dead = [i for i in self.layers if not any(t.requires_grad for t in _tensors(maps[i]))]
            if dead:  # the attention loss would train nothing there, and nothing would say so
                raise RuntimeError(
                    f"the attention of layers {dead} of {type(self.model).__name__} carries no gradient, so an "
                    "attention loss cannot train them. Activation checkpointing with use_reentrant=True runs the "
                    "layers outside autograd: use activation_checkpointing_enable(activation_checkpointing_kwargs="
                    "{'use_reentrant': False}). Otherwise every parameter up to those layers is frozen."
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
