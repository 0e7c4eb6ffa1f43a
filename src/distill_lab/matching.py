"""Which teacher attention is compared with which student attention: layer maps and head matching modes.

Pure PyTorch. A *layer map* pairs teacher and student layers; a *matching mode* decides, for one layer pair,
how the teacher's heads are compared with the student's:

- ``Layerwise``: head i with head i; a teacher with k times the student's heads is averaged in contiguous
  groups of k.
- ``Headwise``: an explicit head map, one loss per head pair, reported per student head.
- ``Global``: both sides averaged over heads, then compared (any head counts).
- ``Selective``: only the ``top_k`` most important teacher heads, each assigned to the student head it is
  closest to on a calibration batch (a linear assignment), reported per student head.

``Selective`` and head importance live in ``distill_lab.selective``; ``distill_lab.attention``'s
``AttentionDistillationLoss`` puts a loss, a matching mode and a layer map together.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from distill_lab.capture import attention_modules

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
            gives 2, 5, 8, 11 as in TinyBERT), ``"last"`` (last to last), ``"minilmv2"`` (the student's last
            layer from ``minilmv2_teacher_layer``: the teacher's last, an upper-middle one for a teacher of
            more than 12 layers), or explicit pairs such as
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
        if spec == "minilmv2":
            return [(minilmv2_teacher_layer(num_teacher_layers), num_student_layers - 1)]
        raise ValueError(
            f"unknown layer_map {spec!r}; valid: 'uniform', 'last', 'minilmv2' or a list of [teacher, "
            "student] pairs"
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


def minilmv2_teacher_layer(num_teacher_layers: int) -> int:
    """The teacher layer, 0-based, that teaches the student's last layer in MiniLMv2: the last one of a
    base-size teacher (12 layers or fewer), and an upper-middle one of a larger teacher, 7/8 of its depth
    (the 21st of 24 layers, as MiniLMv2 distils BERT-large and RoBERTa-large): the last layers of a large
    teacher hold what a small student cannot follow."""
    if num_teacher_layers <= 12:
        return num_teacher_layers - 1
    return math.floor(num_teacher_layers * 7 / 8 + 0.5) - 1


def pair_name(pair: LayerPair) -> str:
    """The logging name of a layer pair, ``L{teacher}->{student}``."""
    return f"L{pair[0]}->{pair[1]}"


# ------------------------------------------------------------------------------------------- matching modes


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
        """``[(teacher_head, student_head), ...]`` when the alignment is a plain selection of single heads
        (which the fused kernel can compute), None when it averages heads."""


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
        f"matching={mode} compares head i of the student with head i of the teacher (or a contiguous group "
        f"of k teacher heads when the teacher has k times as many), but the teacher has {num_teacher_heads} "
        f"heads and the student {num_student_heads}. Use matching=global (heads averaged, any counts) or "
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
                    f"head_map for {pair_name(pair)} gives student head {entry[1]} no teacher head "
                    f"({entry!r}): name at least one teacher head to average, or leave the student head out"
                )
            heads.append((tuple(int(h) for h in group), int(entry[1])))
        for group, s in heads:
            bad_t = [h for h in group if not 0 <= h < num_teacher_heads]
            if bad_t or not 0 <= s < num_student_heads:
                raise ValueError(
                    f"head_map for {pair_name(pair)} names head {bad_t or s} that does not exist: the "
                    f"teacher has heads 0..{num_teacher_heads - 1} and the student "
                    f"0..{num_student_heads - 1}."
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
                    f"matching.head_map names layer pairs {unknown} that the layer map does not have; its "
                    f"pairs are {names}"
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


# Selective builds on the primitives above; it is imported here, after them, so that either module may be
# imported first
from distill_lab.selective import (  # noqa: E402, F401 (exported here with the other modes)
    Selective,
    entropy_head_importance,
    gradient_head_importance,
)

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
