"""Which teacher attention is compared with which student attention: layer maps and head matching modes.

Pure PyTorch. A *layer map* pairs teacher and student layers; a *matching mode* decides, for one layer pair,
how the teacher's heads are compared with the student's:

- ``Layerwise``: head i with head i; a teacher with k times the student's heads is averaged in contiguous
  groups of k.
- ``Headwise``: an explicit head map, one loss per head pair, reported per student head.
- ``Global``: both sides averaged over heads, then compared (any head counts).
- ``Selective``: only the ``top_k`` most important teacher heads, each assigned to the student head it is
  closest to on a calibration batch (a linear assignment), reported per student head.

``AttentionDistillationLoss`` puts a loss, a matching mode and a layer map together.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distill_lab.capture import AttentionCapture, QueryKey, attention_modules
from distill_lab.losses import AttentionLoss, averaged_elements, key_padding, mse_scores_gram_terms

LayerRef = int | str
LayerPair = tuple[int, int]
HeadPair = tuple[tuple[int, ...], int]  # (teacher heads averaged together, student head)


# ---------------------------------------------------------------------------------------------- layer maps


def _is_index(value) -> bool:
    """A whole number (a Python or numpy int, not a bool or a string) that can name a head or a layer."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _layer_names(names_or_model) -> list[str] | None:
    if names_or_model is None:
        return None
    if isinstance(names_or_model, nn.Module):
        return [name for name, _ in attention_modules(names_or_model)]
    return list(names_or_model)


def resolve_layer(
    ref: LayerRef, num_layers: int, names: Sequence[str] | None = None, side: str = "teacher"
) -> int:
    """A layer index (negative counts from the end) or a module name such as ``"encoder.layer.6.attention"``.

    A name matches an attention module when its dotted parts appear contiguously in the module's qualified
    name (so ``encoder.layer.6`` and ``bert.encoder.layer.6.attention.self`` both name layer 6 of a BERT).
    """
    if isinstance(ref, str) and ref.lstrip("-").isdigit():
        ref = int(ref)
    if isinstance(ref, bool) or not isinstance(ref, int | str):
        raise ValueError(f"{side} layer {ref!r} must be an index or a module name")
    if isinstance(ref, int):
        if not -num_layers <= ref < num_layers:
            raise ValueError(
                f"{side} layer {ref} does not exist: the {side} has {num_layers} layers, valid indices are "
                f"0..{num_layers - 1} (or negative from the end)."
            )
        return ref % num_layers
    if names is None:
        raise ValueError(f"{side} layer {ref!r} is a name; pass the {side} model to resolve it to an index")
    hits = [i for i, name in enumerate(names) if f".{ref}." in f".{name}."]
    if len(hits) != 1:
        listing = "\n  ".join(f"{i}: {name}" for i, name in enumerate(names))
        what = "matches no" if not hits else f"is ambiguous: it matches {len(hits)}"
        raise ValueError(f"{side} layer name {ref!r} {what} attention modules. Valid layers:\n  {listing}")
    return hits[0]


def layer_map(
    num_teacher_layers: int,
    num_student_layers: int,
    spec: str | Sequence[Sequence[LayerRef]] = "uniform",
    teacher=None,
    student=None,
) -> list[LayerPair]:
    """Pairs ``(teacher_layer, student_layer)``, 0-based, one per student layer that is distilled.

    Args:
        num_teacher_layers, num_student_layers: layer counts.
        spec: ``"uniform"`` (student layer j takes teacher layer ``round((j + 1) * N_t / N_s) - 1``: 12 -> 4
            gives 2, 5, 8, 11 as in TinyBERT), ``"last"`` (last to last), or explicit pairs such as
            ``[[6, 3], [11, 5]]`` whose entries are indices or module names.
        teacher, student: the models (or lists of their attention-module names) to resolve names against.
    """
    if num_teacher_layers < 1 or num_student_layers < 1:
        raise ValueError("both models need at least one attention layer")
    if isinstance(spec, str):
        if spec == "uniform":
            if num_student_layers > num_teacher_layers:
                raise ValueError(
                    f"layer_map='uniform' needs a student no deeper than its teacher ({num_student_layers} > "
                    f"{num_teacher_layers} layers); give explicit pairs instead."
                )
            # round half up, as TinyBERT's uniform strategy does (Python's round() is banker's rounding)
            return [
                (math.floor((j + 1) * num_teacher_layers / num_student_layers + 0.5) - 1, j)
                for j in range(num_student_layers)
            ]
        if spec == "last":
            return [(num_teacher_layers - 1, num_student_layers - 1)]
        raise ValueError(
            f"unknown layer_map {spec!r}; valid: 'uniform', 'last' or a list of [teacher, student] pairs"
        )
    teacher_names, student_names = _layer_names(teacher), _layer_names(student)
    pairs = []
    for pair in spec:
        if isinstance(pair, str) or len(pair) != 2:
            raise ValueError(f"layer_map entries must be [teacher_layer, student_layer] pairs; got {pair!r}")
        pairs.append(
            (
                resolve_layer(pair[0], num_teacher_layers, teacher_names, "teacher"),
                resolve_layer(pair[1], num_student_layers, student_names, "student"),
            )
        )
    if not pairs:
        raise ValueError("layer_map has no pairs: nothing would be distilled")
    if len(set(pairs)) != len(pairs):
        raise ValueError(f"layer_map repeats a pair: {pairs}")
    return pairs


def pair_name(pair: LayerPair) -> str:
    """The logging name of a layer pair, ``L{teacher}->{student}``."""
    return f"L{pair[0]}->{pair[1]}"


# ---------------------------------------------------------------------------------------------- matching modes


class Matching(Protocol):
    """Aligns one layer pair's teacher heads with the student's; ``per_head`` says whether it reports heads.

    ``align(student, teacher, pair)`` returns two stacks of equal shape ``(B, P, Lq, Lk)`` whose P entries
    are compared one to one, and the student head each entry reports as (None for modes that report no
    heads). It works on any block of query rows, which is what lets the losses run block by block.
    """

    per_head: bool

    def check_heads(
        self, num_teacher_heads: int, num_student_heads: int, pairs: Sequence[LayerPair]
    ) -> None: ...

    def align(
        self, student: Tensor, teacher: Tensor, pair: LayerPair
    ) -> tuple[Tensor, Tensor, list[int] | None]: ...

    def head_pairs(
        self, num_teacher_heads: int, num_student_heads: int, pair: LayerPair
    ) -> list[tuple[int, int]] | None:
        """``[(teacher_head, student_head), ...]`` when the alignment is a plain selection of single heads (which
        the fused kernel can compute), None when it averages heads."""


def compare(
    matching: Matching,
    student: Tensor,
    teacher: Tensor,
    attention_mask: Tensor | None,
    loss: Callable,
    pair: LayerPair,
) -> tuple[Tensor, dict[int, Tensor] | None]:
    """One layer pair's loss under a matching mode, and its per-head losses where the mode reports them."""
    s, t, heads = matching.align(student, teacher, pair)
    if heads is None:
        return loss(s, t, attention_mask), None
    per = loss(s, t, attention_mask, per_head=True)
    return per.mean(), {h: per[j] for j, h in enumerate(heads)}


def _grouped_head_pairs(num_teacher_heads: int, num_student_heads: int) -> list[HeadPair]:
    k = num_teacher_heads // num_student_heads
    return [(tuple(range(i * k, (i + 1) * k)), i) for i in range(num_student_heads)]


def _select_heads(
    student: Tensor, teacher: Tensor, heads: Sequence[HeadPair]
) -> tuple[Tensor, Tensor, list[int]]:
    """Stacks for head pairs: teacher head groups averaged, student heads selected."""
    t = torch.stack([teacher[:, list(group)].mean(1) for group, _ in heads], dim=1)
    student_heads = [h for _, h in heads]
    return student[:, student_heads], t, student_heads


def _head_count_error(mode: str, num_teacher_heads: int, num_student_heads: int) -> ValueError:
    return ValueError(
        f"matching={mode} compares head i of the student with head i of the teacher (or a contiguous group of "
        f"k teacher heads when the teacher has k times as many), but the teacher has {num_teacher_heads} heads "
        f"and the student {num_student_heads}. Use matching=global (heads averaged, any counts) or "
        "matching=headwise with an explicit head_map."
    )


class Layerwise:
    """Every mapped layer pair compares all heads, head i with head i (teacher groups of k averaged)."""

    per_head = False

    def check_heads(self, num_teacher_heads: int, num_student_heads: int, pairs: Sequence[LayerPair]) -> None:
        if num_teacher_heads % num_student_heads:
            raise _head_count_error("layerwise", num_teacher_heads, num_student_heads)

    def head_pairs(self, num_teacher_heads, num_student_heads, pair):
        return [(h, h) for h in range(num_student_heads)] if num_teacher_heads == num_student_heads else None

    def align(self, student, teacher, pair):
        if teacher.shape[1] != student.shape[1]:
            _, teacher, _ = _select_heads(
                student, teacher, _grouped_head_pairs(teacher.shape[1], student.shape[1])
            )
        return student, teacher, None

    __call__ = compare


class Headwise:
    """One loss per head pair of an explicit head map, averaged; per-head losses are reported.

    Args:
        head_map: ``None`` for head i with head i (or teacher groups of k, as ``Layerwise``); a list of
            ``[teacher_head, student_head]`` pairs for every layer pair, where ``teacher_head`` may be a list
            of heads to average; or a mapping from a layer-pair name (``"L6->3"``) to such a list.
    """

    per_head = True

    def __init__(self, head_map: Sequence | Mapping[str, Sequence] | None = None) -> None:
        if isinstance(head_map, Mapping):  # "L5-1" as "L5->1": Hydra's override grammar takes no ">" in a key
            head_map = {
                re.sub(r"^L(\d+)-(\d+)$", r"L\1->\2", str(key)): value for key, value in head_map.items()
            }
        self.head_map = head_map

    def _pairs_for(self, pair: LayerPair, num_teacher_heads: int, num_student_heads: int) -> list[HeadPair]:
        spec = self.head_map
        if isinstance(spec, Mapping):
            spec = spec.get(pair_name(pair))
        if spec is None:
            if num_teacher_heads % num_student_heads:
                raise _head_count_error("headwise", num_teacher_heads, num_student_heads)
            return _grouped_head_pairs(num_teacher_heads, num_student_heads)
        heads = []
        for entry in spec:
            if isinstance(entry, str) or len(entry) != 2:
                raise ValueError(
                    f"head_map entries must be [teacher_head, student_head] pairs; got {entry!r}"
                )
            group = (
                tuple(entry[0])
                if isinstance(entry[0], Iterable) and not isinstance(entry[0], str)
                else (entry[0],)
            )
            if not all(_is_index(h) for h in (*group, entry[1])):
                raise ValueError(
                    f"head_map for {pair_name(pair)}: heads must be whole numbers; got {entry!r}"
                )
            if not group:
                raise ValueError(
                    f"head_map for {pair_name(pair)} gives student head {entry[1]} no teacher head ({entry!r}): name "
                    "at least one teacher head to average, or leave the student head out"
                )
            heads.append((tuple(int(h) for h in group), int(entry[1])))
        for group, s in heads:
            bad_t = [h for h in group if not 0 <= h < num_teacher_heads]
            if bad_t or not 0 <= s < num_student_heads:
                raise ValueError(
                    f"head_map for {pair_name(pair)} names head {bad_t or s} that does not exist: the teacher has heads "
                    f"0..{num_teacher_heads - 1} and the student 0..{num_student_heads - 1}."
                )
        students = [s for _, s in heads]
        if len(set(students)) != len(students) or not heads:
            raise ValueError(
                f"head_map for {pair_name(pair)} must name each student head at most once; got {spec!r}"
            )
        return heads

    def check_heads(self, num_teacher_heads, num_student_heads, pairs):
        if isinstance(
            self.head_map, Mapping
        ):  # a key that names no pair would be ignored, and its map unused
            names = [pair_name(pair) for pair in pairs]
            if unknown := [key for key in self.head_map if key not in names]:
                raise ValueError(
                    f"matching.head_map names layer pairs {unknown} that the layer map does not have; its pairs "
                    f"are {names}"
                )
        for pair in pairs:
            self._pairs_for(pair, num_teacher_heads, num_student_heads)

    def head_pairs(self, num_teacher_heads, num_student_heads, pair):
        heads = self._pairs_for(pair, num_teacher_heads, num_student_heads)
        return [(group[0], s) for group, s in heads] if all(len(g) == 1 for g, _ in heads) else None

    def align(self, student, teacher, pair):
        return _select_heads(student, teacher, self._pairs_for(pair, teacher.shape[1], student.shape[1]))

    __call__ = compare


class Global:
    """Attention averaged over heads on both sides, then compared; works for any head counts."""

    per_head = False

    def check_heads(self, num_teacher_heads, num_student_heads, pairs) -> None:
        return None

    def head_pairs(self, num_teacher_heads, num_student_heads, pair):
        return None

    def align(self, student, teacher, pair):
        return student.mean(1, keepdim=True), teacher.mean(1, keepdim=True), None

    __call__ = compare


def entropy_head_importance(maps: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Importance of each head as its negative mean attention entropy over valid query rows.

    Sharply focused heads (low entropy) rank first; near-uniform heads, which carry little about how tokens
    relate, rank last.

    Shape:
        maps: (B, H, Lq, Lk) attention probabilities.
        attention_mask: (B, Lk), 1 for real tokens.
        Returns: (H,).
    """
    p = maps.to(torch.promote_types(maps.dtype, torch.float32))
    entropy = -torch.where(
        p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), torch.zeros_like(p)
    ).sum(-1)
    if attention_mask is None:
        return -entropy.mean(dim=(0, 2))
    rows = attention_mask.to(device=p.device, dtype=p.dtype)[:, None, -p.shape[2] :]
    return -(entropy * rows).sum(dim=(0, 2)) / rows.sum().clamp_min(1.0)


def gradient_head_importance(
    capture: AttentionCapture, inputs: Mapping[str, Tensor], loss_fn: Callable | None = None
) -> dict[int, Tensor]:
    """Gradient-based head importance (Michel et al., 2019) of the captured layers on one batch.

    A gate ``xi_h`` on head h's attention scales its output; ``I_h = E_x |dL/dxi_h|`` at ``xi = 1``, which
    equals ``E_x |sum_{q,k} A_h * dL/dA_h|``. ``L`` is the model's own loss on ``inputs`` (they must hold
    labels) unless ``loss_fn(outputs)`` is given. Parameters get no ``.grad``; the model should be in eval
    mode so that the captured maps are the ones its outputs used.

    Returns: ``{layer: (H,)}``.
    """
    params = list(capture.model.parameters())
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            outputs, maps = capture(**inputs)
            loss = loss_fn(outputs) if loss_fn is not None else getattr(outputs, "loss", None)
            if loss is None:
                raise ValueError(
                    "gradient head importance needs a loss: pass labels in the batch or a loss_fn"
                )
            layers = sorted(maps)
            grads = torch.autograd.grad(loss, [maps[i] for i in layers])
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return {
        i: (maps[i].detach() * g).sum(dim=(-1, -2)).abs().mean(0) for i, g in zip(layers, grads, strict=True)
    }


class Selective:
    """Distil only the ``top_k`` most important teacher heads of each layer pair.

    Importance is measured on a calibration batch (``calibrate``): ``"entropy"`` (see
    ``entropy_head_importance``) or ``"gradient"`` (``gradient_head_importance``, computed by the caller and
    passed in), or fixed by ``heads``: a list of teacher heads, or of ``[teacher_head, student_head]`` pairs
    which need no calibration at all. Each selected teacher head is assigned to a distinct student head by
    a linear assignment that minimises the loss between them on the calibration batch.

    After calibration ``selected`` maps each layer-pair name to its ``[(teacher_head, student_head), ...]``
    and ``importance`` to the teacher's per-head scores.
    """

    per_head = True

    def __init__(self, top_k: int = 4, importance: str = "entropy", heads: Sequence | None = None) -> None:
        if importance not in ("entropy", "gradient"):
            raise ValueError(f"unknown head importance {importance!r}; valid: 'entropy', 'gradient'")
        if heads is None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.top_k = top_k
        self.importance_method = importance
        self.heads = list(heads) if heads is not None else None
        if self.heads is not None:
            singles = all(_is_index(h) for h in self.heads)
            pairs = all(
                isinstance(h, Sequence)
                and not isinstance(h, str)
                and len(h) == 2
                and all(_is_index(x) for x in h)
                for h in self.heads
            )
            if not self.heads or not (singles or pairs):
                raise ValueError(
                    f"matching.heads={heads!r}: give a non-empty list of teacher heads to choose from ([0, 3, 5]) or "
                    "of [teacher_head, student_head] pairs ([[0, 0], [3, 1]]), not a mix"
                )
            self.heads = [int(h) if singles else [int(h[0]), int(h[1])] for h in self.heads]
        self.selected: dict[str, list[tuple[int, int]]] = {}
        self.importance: dict[str, list[float]] = {}
        self._fixed_pairs = self.heads is not None and all(not isinstance(h, int) for h in self.heads)
        if self._fixed_pairs:
            self.top_k = len(self.heads)

    def check_heads(self, num_teacher_heads, num_student_heads, pairs) -> None:
        available = min(num_teacher_heads, num_student_heads)
        k = len(self.heads) if self.heads is not None else self.top_k
        if k > available:
            raise ValueError(
                f"matching=selective with top_k={k}: only {available} heads are available (teacher {num_teacher_heads}, "
                f"student {num_student_heads}); each selected teacher head needs its own student head. Lower top_k."
            )
        if self.heads is not None:
            teacher_heads = [h if isinstance(h, int) else h[0] for h in self.heads]
            student_heads = [] if not self._fixed_pairs else [h[1] for h in self.heads]
            if any(not 0 <= h < num_teacher_heads for h in teacher_heads) or any(
                not 0 <= h < num_student_heads for h in student_heads
            ):
                raise ValueError(
                    f"matching.heads {self.heads} names a head that does not exist: the teacher has heads "
                    f"0..{num_teacher_heads - 1} and the student 0..{num_student_heads - 1}."
                )
            # a repeated student head would be taught twice with one set of gradients (the fused kernel keeps
            # one pair's); a repeated teacher head among the candidates would be assigned twice
            named = student_heads if self._fixed_pairs else teacher_heads
            if len(set(named)) != len(named):
                side = "student" if self._fixed_pairs else "teacher"
                raise ValueError(
                    f"matching.heads {self.heads} names a {side} head twice: each may appear once"
                )
            if self._fixed_pairs:
                for pair in pairs:
                    self.selected[pair_name(pair)] = [(int(t), int(s)) for t, s in self.heads]

    @property
    def calibrated(self) -> bool:
        return bool(self.selected)

    def calibrate(
        self,
        student_maps: Mapping[int, Tensor],
        teacher_maps: Mapping[int, Tensor],
        attention_mask: Tensor | None,
        loss: Callable,
        pairs: Sequence[LayerPair],
        teacher_importance: Mapping[int, Tensor] | None = None,
        compared: tuple[Mapping[int, Tensor], Mapping[int, Tensor]] | None = None,
    ) -> dict[str, list[tuple[int, int]]]:
        """Choose and assign heads on a calibration batch; returns ``selected``.

        The maps are probabilities (head importance is their entropy); ``compared`` are the student's and the
        teacher's maps that ``loss`` compares when they are something else (``mse_scores``: scores), by layer.
        """
        for t_layer, s_layer in pairs:  # top_k or heads that do not fit fail here as they would in forward
            self.check_heads(
                teacher_maps[t_layer].shape[1], student_maps[s_layer].shape[1], [(t_layer, s_layer)]
            )
        if self._fixed_pairs:
            return self.selected
        if self.importance_method == "gradient" and teacher_importance is None and self.heads is None:
            raise ValueError(
                "importance='gradient' needs teacher_importance from gradient_head_importance(...)"
            )
        for pair in pairs:
            t_layer, s_layer = pair
            teacher, student = teacher_maps[t_layer].detach(), student_maps[s_layer].detach()
            loss_student, loss_teacher = (
                (compared[0][s_layer], compared[1][t_layer]) if compared else (student, teacher)
            )
            if self.heads is not None:
                chosen = [int(h) for h in self.heads]
                scores = torch.zeros(teacher.shape[1])
            else:
                scores = (
                    (
                        teacher_importance[t_layer]
                        if teacher_importance is not None
                        else entropy_head_importance(teacher, attention_mask)
                    )
                    .float()
                    .cpu()
                )
                chosen = scores.topk(self.top_k).indices.tolist()
            num_student_heads = student.shape[1]
            cost = torch.stack(
                [
                    loss(
                        loss_student,
                        loss_teacher[:, [t]].expand(-1, num_student_heads, -1, -1),
                        attention_mask,
                        per_head=True,
                    )
                    for t in chosen
                ]
            )  # (k, H_student): loss of teacher head chosen[i] against student head j
            # imported here: the rest of the module (and the benchmark) runs without scipy
            from scipy.optimize import linear_sum_assignment

            rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
            self.selected[pair_name(pair)] = [(chosen[r], int(c)) for r, c in zip(rows, cols, strict=True)]
            self.importance[pair_name(pair)] = [round(float(x), 6) for x in scores]
        return self.selected

    def head_pairs(self, num_teacher_heads, num_student_heads, pair):
        heads = self.selected.get(pair_name(pair))
        if heads is None:
            raise RuntimeError(
                "matching=selective is not calibrated: call AttentionDistillationLoss.calibrate(...) on a calibration "
                "batch first, or give explicit [teacher_head, student_head] pairs in matching.heads."
            )
        return list(heads)

    def align(self, student, teacher, pair):
        heads = self.head_pairs(teacher.shape[1], student.shape[1], pair)
        return _select_heads(student, teacher, [((t,), s) for t, s in heads])

    __call__ = compare


MATCHING_MODES: dict[str, type] = {
    "layerwise": Layerwise,
    "headwise": Headwise,
    "global": Global,
    "selective": Selective,
}


def get_matching(name: str, **options) -> Matching:
    """A matching mode by name, e.g. ``get_matching("selective", top_k=4)``."""
    try:
        cls = MATCHING_MODES[name]
    except KeyError:
        raise ValueError(
            f"unknown matching {name!r}; valid choices: {', '.join(sorted(MATCHING_MODES))}"
        ) from None
    return cls(**options)


# ---------------------------------------------------------------------------------------------- the component


_SCORES_NEED_QK = (
    "loss=mse_scores compares pre-softmax attention scores, which probability maps do not carry: use capture=qk "
    "(AttentionCapture(..., backend='qk'))."
)


def _probs(attention: Tensor | QueryKey, rows: slice | None = None) -> Tensor:
    """Probabilities (B, H, rows, Lk) from a map or a ``QueryKey`` record."""
    if isinstance(attention, QueryKey):
        return attention.probs(rows)
    return attention if rows is None else attention[:, :, rows]


def _scores(attention: QueryKey, rows: slice | None = None) -> Tensor:
    return attention.scores(rows)


def _windowed(record: QueryKey) -> bool:
    """Whether a sliding window hides keys of these records: not where it spans every key (Mistral's 4096 at
    L = 2048), whose mask is then padding and causal structure alone."""
    return record.sliding_window is not None and record.sliding_window < record.shape[3]


def _padding_keys(record: QueryKey, masks: dict) -> tuple[bool, Tensor | None]:
    """Whether ``record``'s mask is key padding (with the layer's causal structure) at most, and the keys it
    lets through (None: no mask). Cached in ``masks`` by mask object, as all layers of a model share one."""
    if record.mask is None:
        return True, None
    cache_key = (id(record.mask), record.causal, record.shape[3])
    if cache_key not in masks:
        masks[cache_key] = (record.mask, key_padding(record.mask, record.shape[3], record.causal))
    keys = masks[cache_key][1]  # the mask is kept in the cache so that its id is not reused meanwhile
    return keys is not None, keys


def _detached(maps: Tensor | QueryKey) -> Tensor | QueryKey:
    """Teacher maps or records (with any maps they keep) that no gradient flows back into."""
    return maps.detach()


def _layer_maps(attentions, layer: int) -> Tensor | None:
    """One layer's maps from a {layer: maps} mapping (None when not captured) or a sequence indexed by layer."""
    return attentions.get(layer) if isinstance(attentions, Mapping) else attentions[layer]


class AttentionDistillationLoss(nn.Module):
    """The attention part of the objective: a loss, a matching mode and a layer map.

    Args:
        loss: a loss name (``"mse"``, ``"kl"``, ``"cosine"``, ``"mse_scores"``) or a callable
            ``loss(student, teacher, attention_mask, per_head=False)`` such as ``AttentionLoss("kl")``.
        matching: a mode name (``"layerwise"``, ``"headwise"``, ``"global"``, ``"selective"``) or a mode object.
        layer_map: ``[(teacher_layer, student_layer), ...]``, 0-based (see ``layer_map()``).
        layer_weights: one weight per pair; the loss over layers is ``sum(w * L_pair) / sum(w)``, the mean by
            default.
        block_size: query rows per block when the attentions are ``QueryKey`` records (the ``qk`` capture):
            each block's probabilities are computed, compared and dropped, and recomputed in the backward
            (activation checkpointing), so memory grows with ``block_size x L``, not ``L x L``.
        fused: the Triton kernels for ``QueryKey`` records (``distill_lab.kernels.attention_kl`` for
            ``loss=kl``, ``attention_probs`` for ``mse`` and ``cosine``): ``None`` uses them wherever they apply
            (CUDA, triton installed, a mode that pairs single heads, no sliding window or soft-capping), ``True``
            insists (an error where they do not apply), ``False`` never uses them.
        gram: the exact Gram-matrix path of ``loss=mse_scores`` (``mse_scores_gram_terms``: O(L D^2), no L x L
            work) for ``QueryKey`` records of bidirectional layers (no causal mask, sliding window or soft-capping;
            a key-padding mask at most): ``None`` uses it wherever it applies, ``True`` insists, ``False`` never.

    ``forward(student_attentions, teacher_attentions, attention_mask)`` takes per-layer maps (a mapping from
    layer index, as ``AttentionCapture`` returns, or a sequence indexed by layer, as ``outputs.attentions``),
    either probability tensors or ``QueryKey`` records, and returns ``(loss, details)``: ``details["L6->3"]`` per layer pair and, for head-reporting modes,
    ``details["L6->3/h0"]`` per student head, all detached.
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
                f"layer_weights has {len(layer_weights)} entries for {len(self.layer_map)} layer pairs {self.layer_map}"
            )
        weights = torch.tensor(layer_weights if layer_weights is not None else [1.0] * len(self.layer_map))
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(
                f"layer_weights must be finite and non-negative with a positive sum; got {layer_weights}"
            )
        self.register_buffer("layer_weights", weights / weights.sum(), persistent=False)
        self._head_indices: dict = {}  # (device, head pairs) -> the kernels' head index tensors, made once

    @property
    def teacher_layers(self) -> list[int]:
        return sorted({t for t, _ in self.layer_map})

    @property
    def student_layers(self) -> list[int]:
        return sorted({s for _, s in self.layer_map})

    def check(self, num_teacher_heads: int, num_student_heads: int) -> None:
        """Raise before training if the matching mode cannot pair these head counts."""
        self.matching.check_heads(num_teacher_heads, num_student_heads, self.layer_map)

    def elements(self, student_attentions, attention_mask: Tensor | None = None) -> int | Tensor:
        """How many elements each layer pair's loss on this batch averages over, per head (valid query rows, or
        their valid keys for the MSE losses; a loss callable of one's own is taken to average over rows): the
        weight of the batch's attention losses in a mean over batches that equals the loss over their union."""
        shape = _layer_maps(student_attentions, self.layer_map[0][1]).shape
        per_key = isinstance(self.loss, AttentionLoss) and self.loss.name in ("mse", "mse_scores")
        return averaged_elements(tuple(shape), attention_mask, per_key)

    def _kernel_problems(self, device_type: str | None, qk: bool) -> list[str]:
        """Why no fused kernel can run for this loss on ``device_type`` with query/key records (``qk``) or
        without; shared by the set-up check (:meth:`fused_problems`) and the per-layer dispatch."""
        reasons = []
        if not (isinstance(self.loss, AttentionLoss) and self.loss.name in ("kl", "mse", "cosine")):
            reasons.append("only loss=kl, mse and cosine have fused kernels")
        if not qk:
            reasons.append(
                "the kernels read queries and keys: both sides must be QueryKey records (capture=qk)"
            )
        elif device_type != "cuda" and not (self.fused and os.environ.get("TRITON_INTERPRET") == "1"):
            # automatic dispatch (fused=None) takes the kernel on CUDA only: Triton's CPU interpreter (how the
            # kernel tests run it) is far slower than the block-wise PyTorch path, so only fused=True asks for it
            reasons.append(f"they need a CUDA device, and this runs on {device_type}")
        if not reasons:
            from distill_lab.kernels._triton import triton  # imported only where it can run

            if triton is None:
                reasons.append("triton is not installed (pip install 'distill-lab[gpu]')")
        return reasons

    def fused_problems(
        self, device_type: str, capture: str, num_teacher_heads: int, num_student_heads: int
    ) -> list[str]:
        """Why the fused kernels cannot run for this objective on ``device_type`` with ``capture``, as far as it
        can be told before a forward (what a record may still rule out: sliding windows, soft-capping, a mask
        beyond padding and causal structure); empty where they can."""
        reasons = self._kernel_problems(device_type, capture == "qk")
        if getattr(self.matching, "calibrated", True) and all(  # selective pairs single heads once calibrated
            self.matching.head_pairs(num_teacher_heads, num_student_heads, p) is None for p in self.layer_map
        ):
            reasons.append(
                f"matching={type(self.matching).__name__.lower()} averages heads in every layer pair"
            )
        return reasons

    def calibrate(
        self,
        student_attentions,
        teacher_attentions,
        attention_mask: Tensor | None = None,
        teacher_importance: Mapping[int, Tensor] | None = None,
    ):
        """Let a mode that needs a calibration batch (``Selective``) choose its heads; returns its choice."""
        if not hasattr(self.matching, "calibrate"):
            return None
        with torch.no_grad():
            student_maps = {s: _layer_maps(student_attentions, s) for s in self.student_layers}
            teacher_maps = {t: _layer_maps(teacher_attentions, t) for t in self.teacher_layers}
            compared = None
            if getattr(self.loss, "on_scores", False):  # the heads are assigned on what the loss compares
                if not all(isinstance(r, QueryKey) for r in (*student_maps.values(), *teacher_maps.values())):
                    raise ValueError(_SCORES_NEED_QK)
                compared = tuple(
                    {i: _scores(r) for i, r in maps.items()} for maps in (student_maps, teacher_maps)
                )
            return self.matching.calibrate(
                {s: _probs(r) for s, r in student_maps.items()}, {t: _probs(r) for t, r in teacher_maps.items()},
                attention_mask, self.loss, self.layer_map, teacher_importance, compared,
            )  # fmt: skip

    def _block(
        self, student, teacher, attention_mask, pair, rows: slice, scores: bool
    ) -> tuple[Tensor, Tensor]:
        """Loss sums and weights per aligned head, (P,) each, over one block of query rows; the loss compares
        scores where ``scores``, else probabilities."""
        fetch = _scores if scores else _probs
        s, t, _ = self.matching.align(fetch(student, rows), fetch(teacher, rows), pair)
        q_len, k_len = student.shape[2], student.shape[3]
        values, weights = self.loss.row_terms(
            s, t, attention_mask, query_start=k_len - q_len + rows.start, scores=scores
        )
        return values.sum(dim=(0, 2)), weights.sum(dim=(0, 2))

    def _fused_heads(self, student, teacher, pair, masks: dict) -> list[tuple[int, int]] | None:
        """The head pairs for the fused kernel, or None where it does not apply (``fused=True``: an error)."""
        if self.fused is False:
            return None
        qk = isinstance(student, QueryKey) and isinstance(teacher, QueryKey)
        reasons = self._kernel_problems(student.query.device.type if qk else None, qk)
        if not reasons and any(_windowed(r) or r.softcap or r.bias is not None for r in (student, teacher)):
            reasons.append("sliding-window, soft-capped or position-biased attention is not supported")
        if not reasons and student.causal != teacher.causal:
            reasons.append("teacher and student differ in causality")
        heads = None if reasons else self.matching.head_pairs(teacher.shape[1], student.shape[1], pair)
        if heads is None and not reasons:
            reasons.append(f"matching={type(self.matching).__name__.lower()} averages heads here")
        if not reasons and not all(_padding_keys(r, masks)[0] for r in (student, teacher)):
            # the kernels apply key padding and the causal flag; any other mask (a bias, ...) would be lost
            reasons.append("the mask is more than key padding and causal structure")
        if reasons and self.fused:
            raise ValueError(
                f"fused=True, but the fused attention kernel does not apply: {'; '.join(reasons)}"
            )
        return None if reasons else heads

    def _fused_pair(
        self, student: QueryKey, teacher: QueryKey, attention_mask, heads, masks: dict
    ) -> tuple[Tensor, Tensor]:
        """Loss sums and weights per head pair, (P,) each, from the fused kernel of the loss, weighted as
        ``losses._row_terms`` weights rows: the softmax over the keys that both records' masks and
        ``attention_mask`` let through, the rows and MSE's key counts from ``attention_mask`` (None: all)."""
        from distill_lab.kernels.attention_kl import attention_kl_rows
        from distill_lab.kernels.attention_probs import attention_probs_rows

        batch, _, q_len, k_len = student.shape
        device = student.query.device
        given = torch.ones(batch, k_len, dtype=torch.bool, device=device)
        if attention_mask is not None:
            given = attention_mask.to(device) > 0
        keys = given
        for record in (
            student,
            teacher,
        ):  # the kernels apply one key mask: what each model's own mask hides too
            if (record_keys := _padding_keys(record, masks)[1]) is not None:
                keys = keys & record_keys.to(device)
        keys = keys.to(torch.int32).contiguous()
        index_key = (device, tuple(heads))
        if (
            index_key not in self._head_indices
        ):  # a host-to-device copy, which waits for the GPU: once, not per step
            self._head_indices[index_key] = (
                torch.tensor([s for _, s in heads], dtype=torch.int32, device=device),
                torch.tensor([t for t, _ in heads], dtype=torch.int32, device=device),
            )
        student_heads, teacher_heads = self._head_indices[index_key]
        inputs = (
            student.query, student.key, teacher.query, teacher.key, student_heads, teacher_heads,
            keys, student.scaling, teacher.scaling,
        )  # fmt: skip
        valid = given[:, k_len - q_len :] & (keys.sum(-1, keepdim=True) > 0)  # (B, Lq) query rows
        weights = valid[:, None, :].float()
        name = self.loss.name
        if name == "kl":
            temperature = self.loss.options.get("temperature", 1.0)
            rows = attention_kl_rows(*inputs, temperature, student.causal) * temperature**2
        else:
            rows = attention_probs_rows(name, *inputs, student.causal)
        values = rows * weights
        if name == "mse":  # a row's squared errors are averaged over the example's real keys
            weights = weights * given.sum(-1)[:, None, None]
        weights = weights.expand_as(rows)
        return values.sum(dim=(0, 2)), weights.sum(dim=(0, 2))

    def _gram_plan(self, student, teacher, pair, masks: dict):
        """For the Gram-matrix path: both sides' keys, zeroed where their masks hide them (a zero key scores 0,
        as mse_scores counts masked entries), and the mode's head weights ``(s_w, t_w, heads)``; None where the
        path does not apply or, automatically, does not pay (``gram=True``: an error where it does not apply)."""
        if self.gram is False:
            return None
        reasons = []
        if not (isinstance(self.loss, AttentionLoss) and self.loss.on_scores):
            reasons.append("only loss=mse_scores has a Gram-matrix form")
        elif not (isinstance(student, QueryKey) and isinstance(teacher, QueryKey)):
            reasons.append("both sides must be QueryKey records (capture=qk)")
        elif any(r.causal or _windowed(r) or r.softcap or r.bias is not None for r in (student, teacher)):
            reasons.append(
                "causal, sliding-window, soft-capped or position-biased scores are not a plain product of queries and keys"
            )
        if reasons:
            if self.gram:
                raise ValueError(
                    f"gram=True, but the Gram-matrix path of mse_scores does not apply: {'; '.join(reasons)}"
                )
            return None
        # every mode selects or averages heads, a linear map: aligning one-hot "maps" gives its head weights
        eyes = [torch.eye(r.shape[1], dtype=torch.float64)[None, :, None] for r in (student, teacher)]
        s_w, t_w, heads = self.matching.align(*eyes, pair)  # (1, P, 1, H) each
        # automatic choice: the Gram path costs O(L W^2) per entry against the block-wise O(L^2 W), W the
        # compared width (head size, times the heads an entry averages); below L ~ W/2 it does not pay
        width = sum(
            int((w != 0).sum(-1).max()) * r.query.shape[-1] for w, r in ((s_w, student), (t_w, teacher))
        )
        if self.gram is None and student.shape[3] < width / 2:
            return None
        padding = [_padding_keys(r, masks) for r in (student, teacher)]
        if not all(ok for ok, _ in padding):
            if self.gram:
                raise ValueError(
                    "gram=True, but the Gram-matrix path of mse_scores does not apply: the mask is more than key "
                    "padding (it varies over queries or heads, or adds a bias)"
                )
            return None
        keys = [
            r.key if k is None else r.key * k[:, None, :, None]
            for (_, k), r in zip(padding, (student, teacher), strict=True)
        ]
        return keys, s_w[0, :, 0], t_w[0, :, 0], heads

    def _blockwise(self, student, teacher, attention_mask, pair, masks: dict):
        """A layer pair's loss from ``QueryKey`` records: the fused kernel, the Gram-matrix path or, elsewhere,
        one block of query rows at a time. ``masks`` caches each record mask's check within one forward."""
        if not hasattr(self.loss, "row_terms"):  # a custom loss callable sees whole maps
            return self.matching(_probs(student), _probs(teacher), attention_mask, self.loss, pair)
        fused_heads = self._fused_heads(student, teacher, pair, masks)
        gram = None if fused_heads is not None else self._gram_plan(student, teacher, pair, masks)
        if fused_heads is not None:
            values, weights = self._fused_pair(student, teacher, attention_mask, fused_heads, masks)
            heads = [s for _, s in fused_heads] if self.matching.per_head else None
        elif gram is not None:
            keys, s_w, t_w, heads = gram
            values, weights = mse_scores_gram_terms(
                student.query, keys[0], teacher.query, keys[1], attention_mask,
                student_scaling=student.scaling, teacher_scaling=teacher.scaling, heads=(t_w, s_w),
            )  # fmt: skip
        else:
            q_len = student.shape[2]
            # scores where the loss compares them (mse_scores) or, for KL, wherever heads are compared one to one
            # (an average of heads is one of probabilities): exact log-probabilities, as the fused kernel's
            scores = getattr(self.loss, "on_scores", False) or (
                getattr(self.loss, "takes_scores", False)
                and all(isinstance(r, QueryKey) for r in (student, teacher))
                and self.matching.head_pairs(teacher.shape[1], student.shape[1], pair) is not None
            )
            values = weights = 0.0
            for start in range(0, q_len, self.block_size):
                rows = slice(start, min(start + self.block_size, q_len))
                block = (student, teacher, attention_mask, pair, rows, scores)
                if (
                    torch.is_grad_enabled() and q_len > self.block_size
                ):  # keep only the block's inputs, recompute
                    v, w = checkpoint(self._block, *block, use_reentrant=False)
                else:
                    v, w = self._block(*block)
                values, weights = values + v, weights + w
            _, _, heads = self.matching.align(
                _probs(student, slice(0, 0)), _probs(teacher, slice(0, 0)), pair
            )
        if heads is None:
            return values.sum() / weights.sum().clamp_min(1.0), None
        per = values / weights.clamp_min(1.0)
        return per.mean(), {h: per[j] for j, h in enumerate(heads)}

    def forward(self, student_attentions, teacher_attentions, attention_mask: Tensor | None = None):
        details: dict[str, Tensor] = {}
        losses = []
        masks: dict = {}  # a model builds one mask for all its layers: check it once (a host sync each)
        for pair in self.layer_map:
            t_layer, s_layer = pair
            student, teacher = (
                _layer_maps(student_attentions, s_layer),
                _layer_maps(teacher_attentions, t_layer),
            )
            if student is None or teacher is None:
                raise ValueError(
                    f"no attention map for layer pair {pair_name(pair)}; was the layer captured?"
                )
            teacher = _detached(teacher)  # the target, on every path (a custom loss callable too)
            if student.shape[0] != teacher.shape[0] or student.shape[-2:] != teacher.shape[-2:]:
                raise ValueError(
                    f"teacher and student attention maps for {pair_name(pair)} differ in batch or sequence length: "
                    f"teacher {tuple(teacher.shape)}, student {tuple(student.shape)}. Both models must see the same "
                    "tokens: use the teacher's tokenizer for the student."
                )
            self.check(teacher.shape[1], student.shape[1])
            if getattr(self.loss, "on_scores", False) and not (
                isinstance(student, QueryKey) and isinstance(teacher, QueryKey)
            ):
                raise ValueError(_SCORES_NEED_QK)
            if isinstance(student, QueryKey) or isinstance(teacher, QueryKey):
                value, per_head = self._blockwise(student, teacher, attention_mask, pair, masks)
            else:
                value, per_head = self.matching(student, teacher, attention_mask, self.loss, pair)
            losses.append(value)
            name = pair_name(pair)
            details[name] = value.detach()
            for head, head_value in (per_head or {}).items():
                details[f"{name}/h{head}"] = head_value.detach()
        total = (torch.stack(losses) * self.layer_weights.to(losses[0])).sum()  # the maps' device and dtype
        return total, details
