"""Self-attention relations (MiniLM, MiniLMv2): how a layer relates each token's queries, keys or values to
every other token's, compared between teacher and student without an ``L x L`` matrix in memory.

A relation of a layer splits all heads' vectors of one kind, concatenated per token, into ``r`` *relation
heads* of size ``D / r`` and takes, per relation head, ``softmax(X_h X_h^T / sqrt(D / r))`` over the valid
keys: the same computation as attention from queries and keys, with the vectors as both. So a relation is
a ``QueryKey`` record whose keys are its queries, and its loss is computed by the attention backends: block
by block (``distill_lab.backends.blockwise``) or by the fused KL kernel on CUDA, never a whole map at once.
Because both sides are split into the same ``r`` heads, the teacher and student may differ in head count
and width.

- ``relation_kl``: the functional loss.
- ``RelationLoss`` (``loss=relation``): MiniLMv2, the query-query, key-key and value-value relations.
- ``MiniLMLoss`` (``loss=minilm``): MiniLM, attention KL plus the value-value relation with the teacher's
  heads.

Both are pair losses of ``AttentionDistillationLoss``: it walks the layer map and hands each layer pair's
``QueryKey`` records (which the ``qk`` capture makes, values included) to ``pair_loss``. Pure PyTorch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from distill_lab.losses import AttentionLoss
from distill_lab.matching import LayerPair
from distill_lab.records import QueryKey

RELATIONS = {"qq": "query", "kk": "key", "vv": "value"}  # a relation's name -> the vectors it relates


def relation_record(vectors: Tensor, relation_heads: int, causal: bool = False, side: str = "") -> QueryKey:
    """The relation of ``vectors`` as a ``QueryKey`` record whose keys are its queries: ``relation_heads``
    heads of size ``D / relation_heads``, scaled by ``1 / sqrt(D / relation_heads)``.

    Shape:
        vectors: (B, L, D), D divisible by ``relation_heads``.
        Returns: a record of shape (B, relation_heads, L, L).
    """
    if vectors.dim() != 3:
        raise ValueError(f"relation vectors must be (batch, length, features); got {tuple(vectors.shape)}")
    batch, length, width = vectors.shape
    if relation_heads < 1 or width % relation_heads:
        raise ValueError(
            f"relation_heads={relation_heads} must divide the {side + ' ' if side else ''}width {width} (all "
            f"heads' features of a token side by side): choose a common divisor of both models' widths"
        )
    size = width // relation_heads
    heads = vectors.reshape(batch, length, relation_heads, size).transpose(1, 2)
    return QueryKey(heads, heads, size**-0.5, causal=causal)


def relation_terms(
    student: QueryKey,
    teacher: QueryKey,
    attention_mask: Tensor | None,
    temperature: float,
    block_size: int = 256,
    fused: bool | None = None,
    pair: LayerPair = (0, 0),
    backends: Sequence | None = None,
) -> tuple[Tensor, Tensor]:
    """The relation KL of two relation records (``relation_record``) as a sum over valid query rows and their
    number: the loss is ``values / weights``, and sums over blocks or batches add. Computed by the fused KL
    kernel where it applies (``fused``: None where it does, True insists, False never), else block by
    block."""
    from distill_lab.backends import PairContext, choose
    from distill_lab.backends.blockwise import BlockwiseBackend
    from distill_lab.backends.fused import FusedBackend
    from distill_lab.matching import get_matching

    heads = student.query.shape[1]
    context = PairContext(
        AttentionLoss("kl", temperature=temperature), get_matching("layerwise"), pair, heads, heads, qk=True,
        device_type=student.query.device.type, block_size=block_size, student=student, teacher=teacher,
        attention_mask=attention_mask,
    )  # fmt: skip
    backends = backends if backends is not None else (FusedBackend(), BlockwiseBackend())
    terms = choose(backends, context, {"fused": fused}).terms(context)
    return terms.values.sum(), terms.weights.sum()


def relation_kl(
    student: Tensor,
    teacher: Tensor,
    attention_mask: Tensor | None = None,
    *,
    relation_heads: int,
    causal: bool = False,
    temperature: float = 1.0,
    block_size: int = 256,
    fused: bool | None = None,
) -> Tensor:
    """KL divergence between the teacher's and the student's self-attention relations (MiniLMv2).

    Each side is split into ``r = relation_heads`` heads of size ``D / r``; a head's relation is
    ``R_h = softmax(X_h X_h^T / sqrt(D / r))`` over the valid keys (padding excluded, and ``j <= i`` when
    ``causal``). Per valid query row ``T^2 * KL(teacher_T || student_T)``, the relation logits divided by
    ``T``; the loss is the mean over (b, relation head, valid query). Computed ``block_size`` query rows at a
    time (recomputed in the backward) or by the fused KL kernel on CUDA (``fused``), never a whole ``L x L``
    relation.

    Shape:
        student: (B, L, D_s), teacher: (B, L, D_t): one kind of vector per token (all heads' queries, keys or
            values side by side); D_s and D_t may differ, each divisible by ``relation_heads``.
        attention_mask: (B, L), 1 for real tokens.
        Returns: a scalar.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student and teacher vectors differ in batch or length: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)}; both models must see the same tokens"
        )
    records = (
        relation_record(student, relation_heads, causal, "student"),
        relation_record(teacher.detach(), relation_heads, causal, "teacher"),
    )
    values, weights = relation_terms(*records, attention_mask, temperature, block_size, fused)
    return values / weights.clamp_min(1.0)


def _relation_weights(relations, attention: float = 0.0) -> dict[str, float]:
    """``{"qq": w, ...}`` from a mapping of weights or a list of names (weight 1 each), checked: at least one
    positive weight, unless ``attention`` weighs attention KL in."""
    if isinstance(relations, str):
        relations = [relations]
    weights = dict(relations) if isinstance(relations, Mapping) else {name: 1.0 for name in relations}
    if unknown := sorted(set(weights) - set(RELATIONS)):
        raise ValueError(f"loss.relations: unknown relation(s) {unknown}; valid: qq, kk, vv")
    weights = {name: float(w) for name, w in weights.items() if w}
    if any(w < 0 for w in weights.values()) or not (weights or attention > 0):
        raise ValueError(f"loss.relations needs non-negative weights, at least one positive; got {relations}")
    return weights


def _records(context) -> tuple[QueryKey, QueryKey]:
    """The pair's records, both ``QueryKey`` with values (the ``qk`` capture's)."""
    student, teacher = context.sides
    if not all(isinstance(r, QueryKey) and r.value is not None for r in (student, teacher)):
        raise ValueError(_NEEDS_QK)
    return student, teacher


_NEEDS_QK = (
    "the relation losses compare queries, keys and values, which only the qk capture records: set capture=qk "
    "(AttentionCapture(..., backend='qk'))"
)


class RelationLoss(nn.Module):
    """MiniLMv2's loss (``loss=relation``): for each layer pair, the KL between teacher and student
    relations of the chosen kinds, weighted and summed, and optionally attention KL beside them:

        ``L_pair = a * KL(A_t || A_s) + sum_k w_k * relation_kl(S_k, T_k)``,  k in (qq, kk, vv)

    with default weights ``w_k = 1`` (MiniLMv2's sum) and ``a = 0``.

    Args:
        relations: ``{"qq": w, "kk": w, "vv": w}`` or a list of names (weight 1 each).
        relation_heads: the heads both sides are split into; None: the teacher's attention heads. It must
            divide both models' widths (heads x head size); head counts and widths may otherwise differ.
        temperature: the relation logits are divided by it, the KL multiplied by its square.
        layer_map: the layer map this loss is meant for (the config's top-level ``layer_map`` follows it
            unless set): ``minilmv2``, the teacher's last layer (an upper-middle one for a large teacher)
            to the student's last.
        attention: ``a``, the weight of attention KL (at ``temperature``) beside the relations, computed as
            ``loss=kl`` computes it, heads paired by the matching mode; 0 leaves it out, and then no
            matching mode but ``layerwise`` (which pairs nothing here) is accepted.

    The relations are computed as the component's settings say: ``block_size`` query rows at a time, or by
    the fused KL kernel on CUDA (``fused``).

    A layer pair's parts are reported as ``L6->3/qq`` and so on.
    """

    per_key = False
    on_scores = False

    def __init__(
        self,
        relations: Mapping[str, float] | Sequence[str] = ("qq", "kk", "vv"),
        relation_heads: int | None = None,
        temperature: float = 1.0,
        layer_map: str | None = "minilmv2",
        attention: float = 0.0,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"loss.temperature must be positive, got {temperature}")
        if relation_heads is not None and relation_heads < 1:
            raise ValueError(
                f"loss.relation_heads must be positive (or null: the teacher's heads); got {relation_heads}"
            )
        self.relations = _relation_weights(relations, attention)
        self.relation_heads = relation_heads
        self.temperature = temperature
        self.layer_map = layer_map
        if not attention >= 0:
            raise ValueError(f"loss.attention must be 0 or more (the attention KL's weight); got {attention}")
        self.attention_weight = float(attention)
        self.attention = AttentionLoss("kl", temperature=temperature) if attention else None
        self._backends = self._attention_backends = None

    def heads(self, num_teacher_heads: int) -> int:
        return self.relation_heads or num_teacher_heads

    def check_models(
        self,
        num_teacher_heads: int,
        num_student_heads: int,
        widths: Mapping[str, int] | None = None,
        matching=None,
        pairs: Sequence[LayerPair] = (),
    ) -> None:
        """Refuse, before training, a ``relation_heads`` that does not divide both models' widths
        (``{"teacher": D_t, "student": D_s}``: all heads' features of a token). The head counts may differ
        for the relations; the attention part, if any, needs heads the matching mode can pair."""
        if self.attention is None and matching is not None and type(matching).__name__ != "Layerwise":
            mode = type(matching).__name__.lower()
            raise ValueError(
                f"loss=relation splits both models' vectors into relation heads, so no attention heads are "
                f"matched: matching={mode} does not apply; leave matching=layerwise (or weigh attention KL "
                "in with loss.attention)"
            )
        if self.attention is not None and matching is not None:
            matching.check_heads(num_teacher_heads, num_student_heads, pairs)
        r = self.heads(num_teacher_heads)
        bad = {side: width for side, width in (widths or {}).items() if width % r}
        if bad:
            common = [
                d for d in range(1, min(widths.values()) + 1) if all(w % d == 0 for w in widths.values())
            ]
            sides = " and ".join(f"{side} width {width}" for side, width in bad.items())
            raise ValueError(
                f"loss.relation_heads={r} does not divide the {sides} (heads x head size); relation heads "
                f"that divide both models' widths: {common}"
            )

    def check_setup(self, capture: str, device_type: str, fused: bool | None) -> None:
        """Refuse, before training, a capture that records no values, and an insisted fused kernel
        (``fused=True``) that cannot compute the relations on ``device_type``."""
        from distill_lab.backends import PairContext, insisted_on
        from distill_lab.backends.fused import FusedBackend
        from distill_lab.matching import get_matching

        if capture != "qk":
            raise ValueError(f"capture={capture}: {_NEEDS_QK}")
        context = PairContext(
            AttentionLoss("kl"), get_matching("layerwise"), (0, 0), 1, 1, qk=True, device_type=device_type
        )
        insisted_on([FusedBackend()], context, {"fused": fused})

    def _relation(self, context, kind: str, relation_heads: int, fused: bool | None) -> Tensor:
        from distill_lab.backends.blockwise import BlockwiseBackend
        from distill_lab.backends.fused import FusedBackend

        if self._backends is None:
            self._backends = (FusedBackend(), BlockwiseBackend())
        student, teacher = _records(context)
        records = [
            relation_record(record.vectors(RELATIONS[kind]), relation_heads, record.causal, side)
            for record, side in ((student, "student"), (teacher, "teacher"))
        ]
        values, weights = relation_terms(
            *records, context.attention_mask, self.temperature, context.block_size, fused, context.pair,
            self._backends,
        )  # fmt: skip
        return values / weights.clamp_min(1.0)

    def pair_loss(self, context, settings=None) -> tuple[Tensor, dict[str, Tensor]]:
        """One layer pair's loss and its parts, ``{"qq": ..., ...}``."""
        r, fused = self.heads(context.num_teacher_heads), (settings or {}).get("fused")
        parts = {} if self.attention is None else {"attention": self._attention(context, settings)}
        parts.update({kind: self._relation(context, kind, r, fused) for kind in self.relations})
        weights = {"attention": self.attention_weight, **self.relations}
        return sum(weights[kind] * value for kind, value in parts.items()), parts

    def _attention(self, context, settings) -> Tensor:
        """The attention KL of the pair, computed by the attention backends as ``loss=kl``'s is (kept maps,
        the fused kernel or blocks)."""
        from dataclasses import replace

        from distill_lab.attention import reduce_terms
        from distill_lab.backends import BACKENDS, choose

        if self._attention_backends is None:
            self._attention_backends = [backend() for backend in BACKENDS]
        attention = replace(context, loss=self.attention)
        backend = choose(self._attention_backends, attention, settings or {})
        return reduce_terms(backend.terms(attention))[0]

    def extra_repr(self) -> str:
        heads, temperature = self.relation_heads, self.temperature
        return f"relations={self.relations}, relation_heads={heads}, temperature={temperature}"


class MiniLMLoss(RelationLoss):
    """MiniLM's loss (``loss=minilm``): per layer pair, attention KL plus the value-value relation KL, both
    with the teacher's heads:

        ``L_pair = KL(A_t || A_s) + value_weight * relation_kl(V_s, V_t, relation_heads=H_t)``

    The attention part is computed as ``loss=kl`` is, by the matching mode (MiniLM compares head i with head
    i, ``matching=layerwise``, so the student needs the teacher's head count); the value relation splits both
    sides' values into the teacher's number of heads. Meant for the last layer pair (``layer_map: last``).
    Parts are reported as ``L6->3/attention`` and ``L6->3/vv``.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        value_weight: float = 1.0,
        layer_map: str | None = "last",
    ) -> None:
        if value_weight < 0:
            raise ValueError(f"loss.value_weight must be non-negative, got {value_weight}")
        super().__init__({"vv": value_weight}, None, temperature, layer_map, attention=1.0)

    def check_models(
        self,
        num_teacher_heads: int,
        num_student_heads: int,
        widths: Mapping[str, int] | None = None,
        matching=None,
        pairs: Sequence[LayerPair] = (),
    ) -> None:
        """MiniLM compares attention head by head: the student needs the teacher's head count; then the
        base checks (the value relation's heads divide both widths, the matching mode pairs the heads)."""
        if num_student_heads != num_teacher_heads:
            raise ValueError(
                "loss=minilm compares the student's attention with the teacher's head by head, but the "
                f"teacher has {num_teacher_heads} heads and the student {num_student_heads}: give the "
                f"student the teacher's heads (student.num_heads={num_teacher_heads}), or use "
                "loss=relation, which takes any head counts"
            )
        super().check_models(num_teacher_heads, num_student_heads, widths, matching, pairs)
