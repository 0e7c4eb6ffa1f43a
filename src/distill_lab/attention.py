"""The attention component of the objective: a loss, a matching mode and a layer map, over captured layers.

``AttentionDistillationLoss`` walks the layer map, checks and aligns each pair's captured attention, asks
``distill_lab.backends.choose`` how to compute the pair (whole maps, the fused kernels, the Gram path of
``mse_scores``, or blocks of query rows) and weighs the pairs' losses; it reports each pair's loss and,
for modes that report heads, each student head's. It also calibrates a matching mode that needs a
calibration batch (``Selective``) and tells how many elements a batch's loss averages over (``elements``).
Pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from distill_lab.backends import BACKENDS, PairContext, Terms, choose, insisted_on, probs_of
from distill_lab.capture import QueryKey
from distill_lab.losses import AttentionLoss, averaged_elements
from distill_lab.matching import LayerPair, Matching, get_matching, pair_name

_SCORES_NEED_QK = (
    "loss=mse_scores compares pre-softmax attention scores, which probability maps do not carry: use "
    "capture=qk (AttentionCapture(..., backend='qk'))."
)


def _layer_maps(attentions, layer: int) -> Tensor | QueryKey | None:
    """One layer's maps from a {layer: maps} mapping (None where not captured) or a sequence by layer."""
    return attentions.get(layer) if isinstance(attentions, Mapping) else attentions[layer]


def reduce_terms(terms: Terms) -> tuple[Tensor, dict[int, Tensor] | None]:
    """A pair's loss from its terms, and its per-head losses where the mode reports heads."""
    if terms.heads is None:
        return terms.values.sum() / terms.weights.sum().clamp_min(1.0), None
    per = terms.values / terms.weights.clamp_min(1.0)
    return per.mean(), {h: per[j] for j, h in enumerate(terms.heads)}


class AttentionDistillationLoss(nn.Module):
    """The attention part of the objective: a loss, a matching mode and a layer map.

    Args:
        loss: a loss name (``"mse"``, ``"kl"``, ``"cosine"``, ``"mse_scores"``) or a callable
            ``loss(student, teacher, attention_mask, per_head=False)`` such as ``AttentionLoss("kl")``.
        matching: a mode name (``"layerwise"``, ``"headwise"``, ``"global"``, ``"selective"``) or a mode
            object.
        layer_map: ``[(teacher_layer, student_layer), ...]``, 0-based (see ``layer_map()``).
        layer_weights: one weight per pair; the loss over layers is ``sum(w * L_pair) / sum(w)``, the mean
            by default.
        block_size: query rows per block where ``QueryKey`` records hold no maps (the ``qk`` capture beyond
            its memory budget) and neither the fused kernels nor the Gram path apply: each block's
            probabilities are computed, compared and dropped, and recomputed in the backward (activation
            checkpointing) where there is more than one block, so memory grows with ``block_size x L``, not
            ``L x L``.
        fused: the Triton kernels for ``QueryKey`` records (``distill_lab.kernels.attention_kl`` for
            ``loss=kl``, ``attention_probs`` for ``mse`` and ``cosine``): ``None`` uses them wherever they
            apply (CUDA, triton installed, a mode that pairs single heads, no sliding window or
            soft-capping), ``True`` insists (an error quoting why they do not apply), ``False`` never.
        gram: the exact Gram-matrix path of ``loss=mse_scores`` (O(L D^2), no L x L work) for ``QueryKey``
            records of bidirectional layers (no causal mask, sliding window or soft-capping; a key-padding
            mask at most): ``None`` uses it wherever it applies and pays, ``True`` insists, ``False`` never.

    ``forward(student_attentions, teacher_attentions, attention_mask)`` takes per-layer maps (a mapping
    from layer index, as ``AttentionCapture`` returns, or a sequence indexed by layer, as
    ``outputs.attentions``), either probability tensors or ``QueryKey`` records, and returns ``(loss,
    details)``: ``details["L6->3"]`` per layer pair and, for head-reporting modes, ``details["L6->3/h0"]``
    per student head, all detached. Which backend computes a pair is chosen per pair and forward by
    ``distill_lab.backends.choose``; the maps that a ``qk`` capture kept (within its memory budget) are used
    as they are, with nothing recomputed.
    """

    def __init__(
        self,
        loss: str | Callable = "kl",
        matching: str | Matching = "layerwise",
        layer_map: Sequence[Sequence[int]] = ((0, 0),),
        layer_weights: Sequence[float] | None = None,
        block_size: int = 256,
        fused: bool | None = None,
        gram: bool | None = None,
    ) -> None:
        super().__init__()
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.fused = fused
        self.gram = gram
        self.loss = AttentionLoss(loss) if isinstance(loss, str) else loss
        self.matching = get_matching(matching) if isinstance(matching, str) else matching
        self.layer_map = [(int(t), int(s)) for t, s in layer_map]
        if not self.layer_map:
            raise ValueError("layer_map has no pairs: nothing would be distilled")
        if layer_weights is not None and len(layer_weights) != len(self.layer_map):
            raise ValueError(
                f"layer_weights has {len(layer_weights)} entries for {len(self.layer_map)} layer pairs "
                f"{self.layer_map}"
            )
        weights = torch.tensor(layer_weights if layer_weights is not None else [1.0] * len(self.layer_map))
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"layer_weights must be finite and non-negative with a positive sum; got {layer_weights}"
            )
        self.register_buffer("layer_weights", weights / weights.sum(), persistent=False)
        self.backends = [backend() for backend in BACKENDS]

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for t, _ in self.layer_map})

    @property
    def student_layers(self) -> list[int]:
        return sorted({s for _, s in self.layer_map})

    @property
    def settings(self) -> dict[str, bool | None]:
        """The backend settings: ``{"fused": ..., "gram": ...}``, True to insist, False to switch off."""
        return {"fused": self.fused, "gram": self.gram}

    def check(
        self, num_teacher_heads: int, num_student_heads: int, widths: Mapping[str, int] | None = None
    ) -> None:
        """Raise before training if the matching mode cannot pair these head counts or, for a pair loss (the
        relation losses), if the loss cannot compare models of these head counts and ``widths`` (``{"teacher":
        D_t, "student": D_s}``, all heads' features of a token)."""
        if hasattr(self.loss, "check_models"):
            self.loss.check_models(
                num_teacher_heads, num_student_heads, widths, self.matching, self.layer_map
            )
        else:
            self.matching.check_heads(num_teacher_heads, num_student_heads, self.layer_map)

    def check_setup(
        self, device_type: str, capture: str, num_teacher_heads: int, num_student_heads: int
    ) -> None:
        """Raise ``backends.BackendUnavailable`` (a ``ValueError``) before training where an insisted backend
        (``fused=True``, ``gram=True``) cannot compute some layer pair on ``device_type`` with ``capture``
        (``"qk"`` or ``"probs"``), as far as it can be told before a forward; its ``reason`` is the
        backend's own, which a forward would give too. What only records can rule out (a sliding window, a
        soft cap, a mask beyond padding and causal structure) is left to the forward."""
        loss = self.loss
        if hasattr(loss, "pair_loss"):  # a relation loss checks its relations; its attention part, if any,
            loss.check_setup(capture, device_type, self.fused)  # is checked below as any attention loss
            if (loss := loss.attention) is None:
                return
        for pair in self.layer_map:
            context = PairContext(
                loss, self.matching, pair, num_teacher_heads, num_student_heads,
                qk=capture == "qk", device_type=device_type, block_size=self.block_size,
            )  # fmt: skip
            insisted_on(self.backends, context, self.settings)

    def elements(self, student_attentions, attention_mask: Tensor | None = None) -> int | Tensor:
        """How many elements each layer pair's loss on this batch averages over, per head (valid query rows,
        or their valid keys for a ``per_key`` loss, the MSE losses; a loss callable of one's own is taken to
        average over rows): the weight of the batch's attention losses in a mean over batches that equals the
        loss over their union."""
        shape = _layer_maps(student_attentions, self.layer_map[0][1]).shape
        per_key = getattr(self.loss, "per_key", False)
        return averaged_elements(tuple(shape), attention_mask, per_key)

    def calibrate(
        self,
        student_attentions,
        teacher_attentions,
        attention_mask: Tensor | None = None,
        teacher_importance: Mapping[int, Tensor] | None = None,
    ):
        """Let a mode that needs a calibration batch (``Selective``) choose its heads; returns its choice."""
        loss = getattr(self.loss, "attention", self.loss)  # a relation loss's attention part (MiniLM's)
        if not hasattr(self.matching, "calibrate") or loss is None:
            return None
        with torch.no_grad():
            student_maps = {s: _layer_maps(student_attentions, s) for s in self.student_layers}
            teacher_maps = {t: _layer_maps(teacher_attentions, t) for t in self.teacher_layers}
            compared = None
            if getattr(loss, "on_scores", False):  # the heads are assigned on what the loss compares
                if not all(isinstance(r, QueryKey) for r in (*student_maps.values(), *teacher_maps.values())):
                    raise ValueError(_SCORES_NEED_QK)
                compared = tuple(
                    {i: r.scores() for i, r in maps.items()} for maps in (student_maps, teacher_maps)
                )
            return self.matching.calibrate(
                {s: probs_of(r) for s, r in student_maps.items()},
                {t: probs_of(r) for t, r in teacher_maps.items()},
                attention_mask, loss, self.layer_map, teacher_importance, compared,
            )  # fmt: skip

    def _context(
        self, pair: LayerPair, student_attentions, teacher_attentions, attention_mask, masks: dict
    ) -> PairContext:
        """A layer pair's captured attention, checked, the teacher's detached (the target, on every path)."""
        t_layer, s_layer = pair
        student = _layer_maps(student_attentions, s_layer)
        teacher = _layer_maps(teacher_attentions, t_layer)
        if student is None or teacher is None:
            raise ValueError(f"no attention map for layer pair {pair_name(pair)}; was the layer captured?")
        teacher = teacher.detach()  # a map or a record: no gradient flows back into the target
        if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
            raise ValueError(
                f"teacher and student attention maps for {pair_name(pair)} differ in batch or sequence "
                f"length: teacher {tuple(teacher.shape)}, student {tuple(student.shape)}. Both models must "
                "see the same tokens: use the teacher's tokenizer for the student."
            )
        self.check(teacher.shape[1], student.shape[1])
        qk = isinstance(student, QueryKey) and isinstance(teacher, QueryKey)
        if getattr(self.loss, "on_scores", False) and not qk:
            raise ValueError(_SCORES_NEED_QK)
        device = student.query.device if isinstance(student, QueryKey) else student.device
        return PairContext(
            self.loss, self.matching, pair, teacher.shape[1], student.shape[1], qk=qk,
            device_type=device.type, block_size=self.block_size, student=student, teacher=teacher,
            attention_mask=attention_mask, masks=masks,
        )  # fmt: skip

    def forward(self, student_attentions, teacher_attentions, attention_mask: Tensor | None = None):
        details: dict[str, Tensor] = {}
        losses = []
        masks: dict = {}  # a model builds one mask for all its layers: check it once (a host sync each)
        for pair in self.layer_map:
            context = self._context(pair, student_attentions, teacher_attentions, attention_mask, masks)
            name = pair_name(pair)
            if hasattr(self.loss, "pair_loss"):  # the relation losses: the pair's loss and its named parts
                value, parts = self.loss.pair_loss(context, self.settings)
            else:
                backend = choose(self.backends, context, self.settings)
                value, per_head = reduce_terms(backend.terms(context))
                parts = {f"h{head}": head_value for head, head_value in (per_head or {}).items()}
            losses.append(value)
            details[name] = value.detach()
            details.update({f"{name}/{part}": part_value.detach() for part, part_value in parts.items()})
        total = (torch.stack(losses) * self.layer_weights.to(losses[0])).sum()  # the maps' device and dtype
        return total, details
