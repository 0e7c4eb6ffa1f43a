"""Tests for distill_lab.matching: layer maps, the four head-matching modes, head importance and the
``AttentionDistillationLoss`` component, on synthetic maps (against independent references) and on tiny real
models (BERT, LLaMA with grouped-query attention) through ``AttentionCapture``."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import make_tiny_inputs, make_tiny_model

from distill_lab.attention import AttentionDistillationLoss
from distill_lab.capture import AttentionCapture
from distill_lab.losses import get_attention_loss
from distill_lab.matching import (
    Global,
    Headwise,
    Layerwise,
    Selective,
    entropy_head_importance,
    get_matching,
    gradient_head_importance,
    layer_map,
    pair_name,
    resolve_layer,
)

LOSSES = ("mse", "kl", "cosine")
MODES = ("layerwise", "headwise", "global", "selective")

# ---------------------------------------------------------------------------------------------- helpers


def rand_maps(heads: int, seed: int, batch: int = 2, length: int = 6, scale: float = 1.0) -> torch.Tensor:
    """Attention probabilities (batch, heads, length, length) in float64, rows summing to 1."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(
        torch.randn(batch, heads, length, length, generator=g, dtype=torch.float64) * scale, -1
    )


# the second example has two padded positions at the end
PAD_MASK = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
MASKS = [None, PAD_MASK]
MASK_IDS = ["nomask", "padded"]


def distil(loss, matching, pairs, student, teacher, mask=None, calibrate=True, **kwargs):
    """Run an ``AttentionDistillationLoss`` on {layer: map} dicts; calibrates first when asked."""
    component = AttentionDistillationLoss(loss=loss, matching=matching, layer_map=pairs, **kwargs)
    if calibrate:
        component.calibrate(student, teacher, mask)
    return component(student, teacher, mask)


def make_matching(mode: str, **options):
    if mode == "selective":
        options.setdefault("top_k", 2)
    return get_matching(mode, **options)


def close(a, b, tol=1e-10):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=tol
    )


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread for these tiny tensors: on a busy 2-core machine OpenMP's spinning worker threads
    make each tiny model call up to 50 times slower. Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------- tiny models


@pytest.fixture(scope="module")
def bert12(tmp_path_factory):
    """A tiny BERT sequence classifier with 12 layers (its attention modules are
    bert.encoder.layer.N.attention.self)."""
    return make_tiny_model("bert", tmp_path_factory.mktemp("bert12"), num_hidden_layers=12)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    """A tiny LLaMA causal LM with 4 layers (attention modules model.layers.N.self_attn)."""
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama4"), num_hidden_layers=4)


# ---------------------------------------------------------------------------------------------- 1. layer maps


@pytest.mark.parametrize(
    ("teacher", "student", "expected"),
    [
        (12, 4, [(2, 0), (5, 1), (8, 2), (11, 3)]),  # TinyBERT's 4-layer student
        (12, 6, [(1, 0), (3, 1), (5, 2), (7, 3), (9, 4), (11, 5)]),
        (4, 4, [(0, 0), (1, 1), (2, 2), (3, 3)]),
        (
            6,
            4,
            [(1, 0), (2, 1), (4, 2), (5, 3)],
        ),  # 1.5, 3, 4.5, 6 rounded half *up* (round() would give 3 for 4.5)
        (5, 2, [(2, 0), (4, 1)]),  # 2.5 -> 3
        (7, 1, [(6, 0)]),
    ],
)
def test_uniform_layer_map(teacher, student, expected):
    assert layer_map(teacher, student, "uniform") == expected
    assert layer_map(teacher, student) == expected  # the default spec


def test_last_layer_map():
    assert layer_map(12, 4, "last") == [(11, 3)]
    assert layer_map(3, 3, "last") == [(2, 2)]


def test_explicit_pairs_with_indices():
    assert layer_map(12, 6, [[6, 3], [11, 5]]) == [(6, 3), (11, 5)]
    assert layer_map(12, 6, [(-1, -1), (-12, 0)]) == [(11, 5), (0, 0)]
    assert layer_map(12, 6, [["-2", "1"]]) == [(10, 1)]  # numeric strings, as a config file gives them
    # one student layer may learn from several teacher layers
    assert layer_map(12, 6, [[1, 0], [2, 0]]) == [(1, 0), (2, 0)]


def test_explicit_pairs_with_module_names(bert12, llama4):
    # attention modules of the BERT classifier are bert.encoder.layer.N.attention.self
    pairs = layer_map(
        12,
        4,
        [
            ["encoder.layer.6.attention", "layers.1.self_attn"],
            ["encoder.layer.1", "model.layers.3.self_attn"],
            [-1, 0],
        ],
        teacher=bert12,
        student=llama4,
    )
    assert pairs == [(6, 1), (1, 3), (11, 0)]  # "encoder.layer.1" is layer 1, not 10 or 11
    assert (
        resolve_layer(
            "bert.encoder.layer.10.attention.self",
            12,
            [f"bert.encoder.layer.{i}.attention.self" for i in range(12)],
        )
        == 10
    )
    # a list of names works as well as the model
    names = [f"layers.{i}.self_attn" for i in range(4)]
    assert layer_map(4, 4, [["layers.2", "layers.0"]], teacher=names, student=names) == [(2, 0)]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ([[12, 0]], r"teacher layer 12 does not exist.*valid indices are 0\.\.11"),
        ([[-13, 0]], r"teacher layer -13 does not exist.*0\.\.11"),
        ([[0, 4]], r"student layer 4 does not exist.*the student has 4 layers.*0\.\.3"),
        ([[0.5, 0]], r"must be an index or a module name"),
        ([[True, 0]], r"must be an index or a module name"),
        ([[1, 2, 3]], r"\[teacher_layer, student_layer\] pairs"),
        (["ab"], r"\[teacher_layer, student_layer\] pairs"),
        ([], r"no pairs"),
        ([[1, 0], [1, 0]], r"repeats a pair"),
        ([[11, 0], [-1, 0]], r"repeats a pair"),  # the same pair once resolved
        ("middle", r"unknown layer_map 'middle'.*'uniform', 'last'"),
    ],
)
def test_layer_map_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        layer_map(12, 4, spec)


def test_layer_map_name_errors(bert12, llama4):
    with pytest.raises(
        ValueError, match=r"'encoder.layer.12' matches no attention modules\. Valid layers"
    ) as err:
        layer_map(12, 4, [["encoder.layer.12", 0]], teacher=bert12)
    # the listing names every valid layer with its index
    assert "0: bert.encoder.layer.0.attention.self" in str(err.value)
    assert "11: bert.encoder.layer.11.attention.self" in str(err.value)
    with pytest.raises(ValueError, match=r"'encoder' is ambiguous: it matches 12 attention modules"):
        layer_map(12, 4, [["encoder", 0]], teacher=bert12)
    with pytest.raises(ValueError, match=r"student layer name 'layers' is ambiguous: it matches 4"):
        layer_map(12, 4, [[0, "layers"]], student=llama4)
    with pytest.raises(
        ValueError, match=r"(?s)student layer name 'self_attn.q_proj' matches no.*0: model.layers.0.self_attn"
    ):
        layer_map(12, 4, [[0, "self_attn.q_proj"]], student=llama4)
    with pytest.raises(ValueError, match=r"is a name; pass the teacher model"):
        layer_map(12, 4, [["encoder.layer.6", 0]])


def test_layer_map_other_errors():
    with pytest.raises(ValueError, match=r"no deeper than its teacher \(6 > 4 layers\)"):
        layer_map(4, 6, "uniform")
    assert layer_map(4, 6, [[3, 5]]) == [(3, 5)]  # explicit pairs allow a deeper student
    with pytest.raises(ValueError, match="at least one attention layer"):
        layer_map(0, 2)
    assert pair_name((6, 3)) == "L6->3"


# ---------------------------------------------------------------------------------------------- 2. modes,
# synthetic maps


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_layerwise_equal_heads(loss, mask):
    s, t = rand_maps(4, 0), rand_maps(4, 1)
    total, details = distil(loss, "layerwise", [(3, 1)], {1: s}, {3: t}, mask)
    reference = get_attention_loss(loss)(s, t, mask)
    assert close(total, reference)
    assert set(details) == {"L3->1"}
    assert close(details["L3->1"], reference)
    assert total > 0


def test_layerwise_mse_by_hand():
    s, t = rand_maps(4, 0), rand_maps(4, 1)
    total, _ = distil("mse", "layerwise", [(0, 0)], {0: s}, {0: t})
    assert close(total, (s - t).square().mean())
    # with the padding mask: mean over valid (query, key) cells only
    total, _ = distil("mse", "layerwise", [(0, 0)], {0: s}, {0: t}, PAD_MASK)
    valid = (PAD_MASK[:, None, :, None] * PAD_MASK[:, None, None, :]).double().expand_as(s)
    assert close(total, ((s - t).square() * valid).sum() / valid.sum())


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_layerwise_groups_teacher_heads(loss, mask):
    s, t = rand_maps(4, 0), rand_maps(8, 1)
    total, _ = distil(loss, "layerwise", [(3, 1)], {1: s}, {3: t}, mask)
    grouped = t.view(2, 4, 2, 6, 6).mean(2)  # heads (0,1), (2,3), (4,5), (6,7) averaged
    assert torch.allclose(grouped[:, 1], (t[:, 2] + t[:, 3]) / 2)
    assert close(total, get_attention_loss(loss)(s, grouped, mask))


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("teacher_heads", [4, 8])
def test_headwise_default_map(loss, mask, teacher_heads):
    s, t = rand_maps(4, 0), rand_maps(teacher_heads, 1)
    layerwise, _ = distil(loss, "layerwise", [(3, 1)], {1: s}, {3: t}, mask)
    total, details = distil(loss, "headwise", [(3, 1)], {1: s}, {3: t}, mask)
    assert close(total, layerwise)
    assert set(details) == {"L3->1", "L3->1/h0", "L3->1/h1", "L3->1/h2", "L3->1/h3"}
    k = teacher_heads // 4
    fn = get_attention_loss(loss)
    per_head = [fn(s[:, [h]], t[:, h * k : (h + 1) * k].mean(1, keepdim=True), mask) for h in range(4)]
    for h in range(4):
        assert close(details[f"L3->1/h{h}"], per_head[h])
    assert close(details["L3->1"], torch.stack(per_head).mean())
    assert len({round(float(v), 8) for v in per_head}) == 4  # the heads really differ


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_headwise_explicit_head_map(loss, mask):
    s, t = rand_maps(4, 0), rand_maps(8, 1)
    matching = Headwise(head_map=[[5, 0], [[2, 3], 1]])
    total, details = distil(loss, matching, [(3, 1)], {1: s}, {3: t}, mask)
    fn = get_attention_loss(loss)
    h0 = fn(s[:, [0]], t[:, [5]], mask)
    h1 = fn(s[:, [1]], (t[:, [2]] + t[:, [3]]) / 2, mask)
    assert set(details) == {"L3->1", "L3->1/h0", "L3->1/h1"}
    assert close(details["L3->1/h0"], h0)
    assert close(details["L3->1/h1"], h1)
    assert close(total, (h0 + h1) / 2)


def test_headwise_per_layer_head_map():
    s1, s0 = rand_maps(4, 0), rand_maps(4, 2)
    t3, t0 = rand_maps(4, 1), rand_maps(4, 3)
    matching = get_matching("headwise", head_map={"L3->1": [[0, 1], [1, 0]]})
    total, details = distil("kl", matching, [(3, 1), (0, 0)], {1: s1, 0: s0}, {3: t3, 0: t0})
    fn = get_attention_loss("kl")
    assert set(details) == {"L3->1", "L3->1/h0", "L3->1/h1", "L0->0"} | {f"L0->0/h{h}" for h in range(4)}
    assert close(details["L3->1/h1"], fn(s1[:, [1]], t3[:, [0]]))
    assert close(details["L3->1/h0"], fn(s1[:, [0]], t3[:, [1]]))
    # a pair the mapping does not name uses head i with head i
    for h in range(4):
        assert close(details[f"L0->0/h{h}"], fn(s0[:, [h]], t0[:, [h]]))
    assert close(details["L0->0"], fn(s0, t0))
    assert close(total, (details["L3->1"] + details["L0->0"]) / 2)


def test_a_per_pair_head_map_from_the_command_line():
    """Hydra's override grammar takes no ">" in a dict key, so ``L3-1`` names the pair ``L3->1`` too."""
    assert Headwise({"L3-1": [[0, 1]], "L0->0": [[1, 0]]}).head_map == {"L3->1": [[0, 1]], "L0->0": [[1, 0]]}


@pytest.mark.parametrize(
    ("head_map", "message"),
    [
        ([[8, 0]], r"names head \[8\] that does not exist.*teacher has heads 0\.\.7 and the student 0\.\.3"),
        ([[0, 4]], r"names head 4 that does not exist"),
        ([[0, 1], [2, 1]], r"each student head at most once"),
        ([], r"each student head at most once"),
        ([[0, 1, 2]], r"\[teacher_head, student_head\] pairs"),
        ([[[], 0]], r"gives student head 0 no teacher head"),  # an average of no heads would be NaN
        ([["12", 0]], r"heads must be whole numbers"),  # not heads 1 and 2
        ([[1.5, 0]], r"heads must be whole numbers"),
        (
            {"L3->1": [[0, 0]]},
            r"names layer pairs \['L3->1'\] that the layer map does not have; its pairs are \['L0->0'\]",
        ),
    ],
)
def test_headwise_head_map_errors(head_map, message):
    component = AttentionDistillationLoss("mse", Headwise(head_map), [(0, 0)])
    with pytest.raises(ValueError, match=message):
        component.check(8, 4)
    with pytest.raises(ValueError, match=message):
        component({0: rand_maps(4, 0)}, {0: rand_maps(8, 1)})


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(("teacher_heads", "student_heads"), [(4, 4), (8, 4), (6, 4), (2, 3)])
def test_global(loss, mask, teacher_heads, student_heads):
    s, t = rand_maps(student_heads, 0), rand_maps(teacher_heads, 1)
    total, details = distil(loss, "global", [(3, 1)], {1: s}, {3: t}, mask)
    reference = get_attention_loss(loss)(s.mean(1, keepdim=True), t.mean(1, keepdim=True), mask)
    assert close(total, reference)
    assert set(details) == {"L3->1"}


@pytest.mark.parametrize("mode", ["layerwise", "headwise"])
def test_head_count_mismatch_suggests_global(mode):
    s, t = rand_maps(4, 0), rand_maps(6, 1)
    component = AttentionDistillationLoss("mse", mode, [(0, 0)])
    with pytest.raises(
        ValueError, match=r"teacher has 6 heads and the student 4.*matching=global.*matching=headwise"
    ):
        component({0: s}, {0: t})
    with pytest.raises(ValueError, match=r"matching=global"):
        component.check(6, 4)
    # a student with more heads than its teacher cannot be grouped either
    with pytest.raises(ValueError, match=r"matching=global"):
        component.check(4, 8)
    component.check(8, 4)  # a multiple is fine
    total, _ = AttentionDistillationLoss("mse", "global", [(0, 0)])({0: s}, {0: t})
    assert torch.isfinite(total) and total > 0


# ---------------------------------------------------------------------------------------------- 3.
# invariances


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_permuting_both_sides_leaves_losses_unchanged(mode, loss, mask):
    s, t = rand_maps(4, 0), rand_maps(4, 1, scale=3.0)
    perm = [2, 0, 3, 1]
    total, details = distil(loss, make_matching(mode), [(0, 0)], {0: s}, {0: t}, mask)
    total_p, details_p = distil(loss, make_matching(mode), [(0, 0)], {0: s[:, perm]}, {0: t[:, perm]}, mask)
    assert close(total, total_p)
    # per-head details move with the student heads: new head i is old head perm[i]
    relabel = {f"L0->0/h{i}": f"L0->0/h{perm[i]}" for i in range(4)} | {"L0->0": "L0->0"}
    assert {relabel[key] for key in details_p} == set(details)
    for key, value in details_p.items():
        assert close(value, details[relabel[key]])


@pytest.mark.parametrize("loss", LOSSES)
def test_permuting_teacher_heads_only(loss):
    s, t = rand_maps(4, 0), rand_maps(4, 1, scale=3.0)
    t_perm = t[:, [1, 2, 3, 0]]
    results = {}
    for mode in MODES:
        before, _ = distil(loss, make_matching(mode), [(0, 0)], {0: s}, {0: t})
        after, _ = distil(loss, make_matching(mode), [(0, 0)], {0: s}, {0: t_perm})
        results[mode] = (float(before), float(after))
    for mode in ("layerwise", "headwise"):
        before, after = results[mode]
        assert abs(before - after) > 1e-3 * before, (mode, before, after)
    assert close(*results["global"])
    # selective re-assigns heads on calibration, so it follows the teacher's heads wherever they are
    assert close(*results["selective"])


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("mode", MODES)
def test_zero_loss_when_student_equals_teacher(mode, loss, mask):
    t = rand_maps(4, 1, scale=3.0)
    s = t.clone()
    matching = make_matching(mode)
    total, details = distil(loss, matching, [(0, 0)], {0: s}, {0: t}, mask)
    assert abs(float(total)) < 1e-10
    assert all(abs(float(v)) < 1e-10 for v in details.values())
    if mode == "selective":
        assert matching.calibrated
        assert all(teacher == student for teacher, student in matching.selected["L0->0"])


def test_zero_loss_float32():
    t = rand_maps(4, 1, scale=3.0).float()
    for loss in LOSSES:
        for mode in MODES:
            total, _ = distil(loss, make_matching(mode), [(0, 0)], {0: t.clone()}, {0: t}, PAD_MASK)
            assert total.dtype == torch.float32
            assert abs(float(total)) < 1e-6, (loss, mode)


# ---------------------------------------------------------------------------------------------- 4. selective


def respect_padding(maps, mask):
    """Maps as a model makes them: no probability on padded keys."""
    if mask is None:
        return maps
    maps = maps * mask[:, None, None, :]
    return maps / maps.sum(-1, keepdim=True)


def sharp_teacher_and_copying_student(mask=None):
    """Teacher heads 1 and 3 sharp (near one-hot), 0 and 2 near uniform; student head 2 copies teacher
    head 1, student head 0 copies teacher head 3, student heads 1 and 3 are unrelated."""
    sharp = rand_maps(4, 10, scale=8.0)
    flat = rand_maps(4, 11, scale=0.05)
    teacher = respect_padding(torch.stack([flat[:, 0], sharp[:, 1], flat[:, 2], sharp[:, 3]], dim=1), mask)
    other = respect_padding(rand_maps(4, 12), mask)
    student = torch.stack([teacher[:, 3], other[:, 1], teacher[:, 1], other[:, 3]], dim=1)
    return student, teacher


def entropy_reference(maps, mask=None):
    entropy = -torch.special.xlogy(maps, maps).sum(-1)  # (B, H, L), 0 log 0 = 0
    if mask is None:
        return -entropy.mean(dim=(0, 2))
    rows = mask[:, None, :].double()
    return -(entropy * rows).sum(dim=(0, 2)) / rows.sum()


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
def test_entropy_head_importance(mask):
    _, teacher = sharp_teacher_and_copying_student(mask)
    importance = entropy_head_importance(teacher, mask)
    assert importance.shape == (4,)
    assert torch.allclose(importance, entropy_reference(teacher, mask))
    assert set(importance.topk(2).indices.tolist()) == {1, 3}
    # a one-hot head has zero entropy (no NaN from 0 * log 0) and the uniform head the most, log(L)
    one_hot = torch.zeros(1, 2, 3, 3)
    one_hot[..., 0] = 1.0
    one_hot[:, 1] = 1.0 / 3
    assert torch.allclose(
        entropy_head_importance(one_hot), torch.tensor([0.0, -torch.log(torch.tensor(3.0))])
    )


@pytest.mark.parametrize("mask", MASKS, ids=MASK_IDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_selective_picks_low_entropy_heads_and_their_copies(loss, mask):
    student, teacher = sharp_teacher_and_copying_student(mask)
    matching = Selective(top_k=2, importance="entropy")
    component = AttentionDistillationLoss(loss, matching, [(3, 1)])
    assert not matching.calibrated
    selected = component.calibrate({1: student}, {3: teacher}, mask)
    assert matching.calibrated
    assert sorted(selected["L3->1"]) == [(1, 2), (3, 0)]
    importance = torch.tensor(matching.importance["L3->1"], dtype=torch.float64)
    assert torch.allclose(importance, entropy_reference(teacher, mask), atol=1e-6)
    assert min(importance[1], importance[3]) > max(importance[0], importance[2])

    total, details = component({1: student}, {3: teacher}, mask)
    assert set(details) == {"L3->1", "L3->1/h0", "L3->1/h2"}  # only the assigned student heads
    assert abs(float(total)) < 1e-10  # the copies match exactly

    # on another batch the chosen pairs are kept and compared head to head
    other_student = respect_padding(rand_maps(4, 20), mask)
    total, details = component({1: other_student}, {3: teacher}, mask)
    fn = get_attention_loss(loss)
    h2 = fn(other_student[:, [2]], teacher[:, [1]], mask)
    h0 = fn(other_student[:, [0]], teacher[:, [3]], mask)
    assert close(details["L3->1/h2"], h2)
    assert close(details["L3->1/h0"], h0)
    assert close(total, (h0 + h2) / 2)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_selective_assignment_is_optimal(loss, seed):
    """The linear assignment minimises the summed calibration loss over all injective head assignments."""
    student, teacher = rand_maps(4, 100 + seed, scale=2.0), rand_maps(5, 200 + seed, scale=2.0)
    matching = Selective(top_k=3)
    AttentionDistillationLoss(loss, matching, [(0, 0)]).calibrate({0: student}, {0: teacher}, PAD_MASK)
    chosen = entropy_head_importance(teacher, PAD_MASK).topk(3).indices.tolist()
    pairs = matching.selected["L0->0"]
    assert sorted(t for t, _ in pairs) == sorted(chosen)
    assert len({s for _, s in pairs}) == 3  # distinct student heads
    fn = get_attention_loss(loss)
    cost = {(t, s): float(fn(student[:, [s]], teacher[:, [t]], PAD_MASK)) for t in chosen for s in range(4)}
    best = min(
        sum(cost[t, s] for t, s in zip(chosen, perm, strict=True))
        for perm in itertools.permutations(range(4), 3)
    )
    assert sum(cost[p] for p in pairs) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_selective_needs_calibration():
    s, t = rand_maps(4, 0), rand_maps(4, 1)
    component = AttentionDistillationLoss("mse", "selective", [(0, 0)])
    with pytest.raises(RuntimeError, match=r"not calibrated.*calibrate"):
        component({0: s}, {0: t})
    # a calibration that did not cover a layer pair is no calibration for it
    component = AttentionDistillationLoss("mse", Selective(top_k=2), [(0, 0), (1, 1)])
    component.matching.calibrate({0: s}, {0: t}, None, component.loss, [(0, 0)])
    with pytest.raises(RuntimeError, match="calibrate"):
        component({0: s, 1: s}, {0: t, 1: t})


def test_selective_explicit_pairs_need_no_calibration():
    s, t = rand_maps(4, 0), rand_maps(4, 1)
    matching = Selective(heads=[[0, 1], [2, 0]])
    component = AttentionDistillationLoss("kl", matching, [(3, 1)])
    total, details = component({1: s}, {3: t})
    fn = get_attention_loss("kl")
    h1, h0 = fn(s[:, [1]], t[:, [0]]), fn(s[:, [0]], t[:, [2]])
    assert set(details) == {"L3->1", "L3->1/h0", "L3->1/h1"}
    assert close(details["L3->1/h1"], h1)
    assert close(details["L3->1/h0"], h0)
    assert close(total, (h0 + h1) / 2)
    # calibrating changes nothing
    assert component.calibrate({1: rand_maps(4, 5)}, {3: t}) == {"L3->1": [(0, 1), (2, 0)]}


def test_selective_explicit_teacher_heads_are_assigned():
    student, teacher = sharp_teacher_and_copying_student()
    # teacher heads given by index: only their student heads are left to the assignment
    matching = Selective(heads=[3, 1])
    AttentionDistillationLoss("mse", matching, [(0, 0)]).calibrate({0: student}, {0: teacher})
    assert sorted(matching.selected["L0->0"]) == [(1, 2), (3, 0)]


@pytest.mark.parametrize(
    ("options", "teacher_heads", "student_heads", "message"),
    [
        ({"top_k": 3}, 4, 2, r"top_k=3: only 2 heads are available"),
        ({"top_k": 5}, 4, 8, r"top_k=5: only 4 heads are available"),
        ({"heads": [[0, 1], [1, 0], [2, 2]]}, 4, 2, r"top_k=3"),
        (
            {"heads": [[0, 1], [7, 0]]},
            4,
            4,
            r"names a head that does not exist: the teacher has heads 0\.\.3",
        ),
        ({"heads": [[0, 4]]}, 4, 4, r"names a head that does not exist.*student 0\.\.3"),
        ({"heads": [9]}, 4, 4, r"names a head that does not exist"),
        (
            {"heads": [[0, 1], [3, 1]]},
            4,
            4,
            r"matching.heads \[\[0, 1\], \[3, 1\]\] names a student head twice",
        ),
        ({"heads": [2, 2]}, 4, 4, r"matching.heads \[2, 2\] names a teacher head twice"),
    ],
)
def test_selective_head_errors(options, teacher_heads, student_heads, message):
    component = AttentionDistillationLoss("mse", Selective(**options), [(0, 0)])
    with pytest.raises(ValueError, match=message):
        component.check(teacher_heads, student_heads)
    s, t = {0: rand_maps(student_heads, 0)}, {0: rand_maps(teacher_heads, 1)}
    with pytest.raises(ValueError, match=message):
        component.calibrate(s, t)
    with pytest.raises(ValueError, match=message):
        component(s, t)


@pytest.mark.parametrize("heads", [[], [0, [1, 1]], ["0", "3"], [[0, 1, 2]], [True]])
def test_selective_heads_must_be_a_list_of_heads_or_of_pairs(heads):
    """An empty list (a stack of nothing at the first forward), a mix of heads and pairs (a failure at
    calibration) and heads that are no whole numbers are refused when the mode is built."""
    with pytest.raises(ValueError, match=r"matching.heads=.*non-empty list of teacher heads.*not a mix"):
        Selective(heads=heads)


def test_selective_option_errors():
    with pytest.raises(ValueError, match=r"unknown head importance 'magic'; valid: 'entropy', 'gradient'"):
        Selective(importance="magic")
    with pytest.raises(ValueError, match="unknown head importance"):
        get_matching("selective", top_k=2, importance="attention")
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        Selective(top_k=0)
    component = AttentionDistillationLoss("mse", Selective(top_k=2, importance="gradient"), [(0, 0)])
    with pytest.raises(ValueError, match=r"needs teacher_importance from gradient_head_importance"):
        component.calibrate({0: rand_maps(4, 0)}, {0: rand_maps(4, 1)})


# ---------------------------------------------------------------------------------------------- 5. gradient
# importance


def bert_query(model, layer: int) -> torch.nn.Parameter:
    return model.bert.encoder.layer[layer].attention.self.query.weight


def llama_query(model, layer: int) -> torch.nn.Parameter:
    return model.model.layers[layer].self_attn.q_proj.weight


def test_gradient_head_importance(tiny_model_factory):
    model = tiny_model_factory("bert", num_hidden_layers=3)
    inputs = make_tiny_inputs("bert", model.config) | {"labels": torch.tensor([0, 2])}
    # a frozen embedding must stay frozen afterwards, the rest trainable
    model.bert.embeddings.requires_grad_(False)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert not all(flags.values()) and any(flags.values())
    layers = [0, 2]
    with AttentionCapture(model, layers) as capture, torch.no_grad():  # works even under no_grad
        importance = gradient_head_importance(capture, inputs)
        # the model is as it was: the same requires_grad flags and no gradients anywhere
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())

        # reference 1: the same formula with autograd by hand
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            outputs, maps = capture(**inputs)
            grads = torch.autograd.grad(outputs.loss, [maps[i] for i in layers])
            for name, p in model.named_parameters():
                p.requires_grad_(flags[name])
    manual = {
        i: (maps[i] * g).sum(dim=(-1, -2)).abs().mean(0).detach() for i, g in zip(layers, grads, strict=True)
    }

    # reference 2 (Michel et al.): a gate xi[b, h] on each head's output, |dL/dxi| averaged over the batch,
    # with the model's own (sdpa) attention and no capture at all
    gates = torch.ones(2, 3, 4, requires_grad=True)  # (batch, layer, head)

    def gate_hook(layer):
        def hook(module, args, output):
            out, weights = output
            b, length, _ = out.shape
            gated = out.view(b, length, 4, -1) * gates[:, layer, None, :, None]
            return gated.reshape(b, length, -1), weights

        return hook

    handles = [
        model.bert.encoder.layer[i].attention.self.register_forward_hook(gate_hook(i)) for i in range(3)
    ]
    try:
        gate_grads = torch.autograd.grad(model(**inputs).loss, gates)[0].abs().mean(0)
    finally:
        for handle in handles:
            handle.remove()

    assert set(importance) == set(layers)
    for i in layers:
        assert importance[i].shape == (4,)
        assert (importance[i] >= 0).all() and importance[i].sum() > 0
        assert torch.allclose(importance[i], manual[i], rtol=1e-5, atol=1e-9)
        assert torch.allclose(importance[i], gate_grads[i], rtol=1e-3, atol=1e-7)
    assert len({round(float(x), 7) for x in importance[0]}) == 4  # heads differ: a real ranking
    # the references' own use of the model left no gradients either
    assert all(p.grad is None for p in model.parameters())


def test_gradient_head_importance_needs_a_loss(tiny_model_factory):
    model = tiny_model_factory("bert")
    inputs = make_tiny_inputs("bert", model.config)  # no labels
    with AttentionCapture(model, [0]) as capture:
        with pytest.raises(ValueError, match="needs a loss"):
            gradient_head_importance(capture, inputs)
        assert all(p.requires_grad for p in model.parameters())  # restored after the error too
        # a loss_fn stands in for labels
        importance = gradient_head_importance(capture, inputs, loss_fn=lambda out: out.logits[:, 1].sum())
    assert importance[0].shape == (4,) and importance[0].sum() > 0


def test_selective_with_gradient_importance(tiny_model_factory):
    teacher = tiny_model_factory("bert", num_hidden_layers=4, seed=1)
    student = tiny_model_factory("bert", num_hidden_layers=2, seed=2)
    inputs = make_tiny_inputs("bert", teacher.config)
    labels = torch.tensor([1, 0])
    pairs = layer_map(4, 2)
    with (
        AttentionCapture(teacher, [t for t, _ in pairs]) as t_cap,
        AttentionCapture(student, [s for _, s in pairs]) as s_cap,
    ):
        importance = gradient_head_importance(t_cap, inputs | {"labels": labels})
        with torch.no_grad():
            _, t_maps = t_cap(**inputs)
            _, s_maps = s_cap(**inputs)
    matching = Selective(top_k=2, importance="gradient")
    component = AttentionDistillationLoss("kl", matching, pairs)
    selected = component.calibrate(s_maps, t_maps, inputs["attention_mask"], teacher_importance=importance)
    for t_layer, s_layer in pairs:
        name = pair_name((t_layer, s_layer))
        assert sorted(t for t, _ in selected[name]) == sorted(importance[t_layer].topk(2).indices.tolist())
        assert matching.importance[name] == pytest.approx(importance[t_layer].tolist(), abs=1e-6)
        # the entropy ranking would be computed from the maps instead; the gradient one is what was used
    total, details = component(s_maps, t_maps, inputs["attention_mask"])
    assert torch.isfinite(total)
    assert {key for key in details if "/" not in key} == {"L1->0", "L3->1"}


# ---------------------------------------------------------------------------------------------- 6. end to end


def run_all_modes(teacher, student, inputs, pairs, query):
    """For every mode and loss: calibrate (selective), distil, backprop; returns {(mode, loss): total}."""
    mask = inputs["attention_mask"]
    with AttentionCapture(teacher, [t for t, _ in pairs]) as t_cap, torch.no_grad():
        _, t_maps = t_cap(**inputs)
    results = {}
    with AttentionCapture(student, [s for _, s in pairs]) as s_cap:
        for mode, loss in itertools.product(MODES, LOSSES):
            component = AttentionDistillationLoss(loss, make_matching(mode), pairs)
            if mode == "selective":
                with torch.no_grad():
                    _, calibration = s_cap(**inputs)
                component.calibrate(calibration, t_maps, mask)
            _, s_maps = s_cap(**inputs)
            total, details = component(s_maps, t_maps, mask)
            assert torch.isfinite(total) and total > 0, (mode, loss)
            assert {key for key in details if "/" not in key} == {pair_name(p) for p in pairs}
            assert all(torch.isfinite(v) and not v.requires_grad for v in details.values())
            if mode in ("headwise", "selective"):
                assert any("/h" in key for key in details)
            total.backward()
            for _, s_layer in pairs:
                grad = query(student, s_layer).grad
                assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, (
                    mode,
                    loss,
                    s_layer,
                )
            assert all(p.grad is None for p in teacher.parameters())
            student.zero_grad(set_to_none=True)
            results[mode, loss] = float(total.detach())
    return results


def test_end_to_end_bert(tiny_model_factory):
    teacher = tiny_model_factory("bert", num_hidden_layers=4, num_attention_heads=4, seed=1)
    student = tiny_model_factory("bert", num_hidden_layers=2, num_attention_heads=2, seed=2)
    inputs = make_tiny_inputs("bert", teacher.config)
    assert inputs["attention_mask"].min() == 0  # a padded batch
    pairs = layer_map(4, 2, "uniform")
    assert pairs == [(1, 0), (3, 1)]
    results = run_all_modes(teacher, student, inputs, pairs, bert_query)
    assert len(results) == 12


@pytest.mark.parametrize("padding", ["right", "left"])
def test_end_to_end_llama_gqa(tiny_model_factory, padding):
    teacher = tiny_model_factory(
        "llama", num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, seed=1
    )
    student = tiny_model_factory(
        "llama", num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, seed=2
    )
    inputs = make_tiny_inputs("llama", teacher.config)
    if padding == "left":
        inputs = {key: value.flip(-1) for key, value in inputs.items()}
    assert inputs["attention_mask"].min() == 0
    pairs = layer_map(4, 2)
    run_all_modes(teacher, student, inputs, pairs, llama_query)

    # the captured maps: 4 query heads on the teacher (2 key heads expanded), causal
    with AttentionCapture(teacher, [1]) as cap, torch.no_grad():
        _, maps = cap(**inputs)
    assert maps[1].shape == (2, 4, 8, 8)
    assert torch.all(maps[1][0].triu(1) == 0)


def test_layer_weights():
    t = {1: rand_maps(4, 1), 3: rand_maps(4, 3)}
    s = {0: rand_maps(4, 0), 1: rand_maps(4, 2)}
    pairs = [(1, 0), (3, 1)]
    total, details = distil("mse", "layerwise", pairs, s, t, layer_weights=[1.0, 3.0])
    assert close(total, (details["L1->0"] + 3 * details["L3->1"]) / 4)
    total_mean, details_mean = distil("mse", "layerwise", pairs, s, t)
    assert close(total_mean, (details_mean["L1->0"] + details_mean["L3->1"]) / 2)
    total_zero, _ = distil("mse", "layerwise", pairs, s, t, layer_weights=[0, 2])
    assert close(total_zero, details["L3->1"])
    with pytest.raises(ValueError, match=r"layer_weights has 3 entries for 2 layer pairs"):
        AttentionDistillationLoss(layer_map=pairs, layer_weights=[1, 2, 3])
    with pytest.raises(ValueError, match=r"non-negative with a positive sum"):
        AttentionDistillationLoss(layer_map=pairs, layer_weights=[1, -1])
    with pytest.raises(ValueError, match=r"non-negative with a positive sum"):
        AttentionDistillationLoss(layer_map=pairs, layer_weights=[0, 0])
    for weights in ([1, float("nan")], [1, float("inf")]):  # NaN in every loss, or the finite pair weighted 0
        with pytest.raises(ValueError, match=r"finite and non-negative"):
            AttentionDistillationLoss(layer_map=pairs, layer_weights=weights)
    with pytest.raises(ValueError, match="no pairs"):
        AttentionDistillationLoss(layer_map=[])


def test_layer_weights_follow_the_maps_device():
    """The component holds no parameters, so nothing moves it: its layer weights must follow the maps."""
    s, t = rand_maps(4, 0).float(), rand_maps(4, 1).float()
    component = AttentionDistillationLoss("mse", "layerwise", [(0, 0), (0, 1)], layer_weights=[1, 3])
    total, _ = component({0: s.to("meta"), 1: s.to("meta")}, {0: t.to("meta")})
    assert total.device.type == "meta" and total.shape == ()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_maps_with_a_cpu_component():
    s, t = rand_maps(4, 0).float(), rand_maps(4, 1).float()
    component = AttentionDistillationLoss("kl", "headwise", [(0, 0), (0, 1)], layer_weights=[1, 3])
    expected, _ = component({0: s, 1: s}, {0: t})
    total, _ = component({0: s.cuda(), 1: s.cuda()}, {0: t.cuda()})
    assert total.is_cuda and torch.allclose(total.cpu(), expected, atol=1e-6)


def test_sequence_length_mismatch():
    component = AttentionDistillationLoss("mse", "global", [(0, 0)])
    with pytest.raises(
        ValueError,
        match=r"differ in batch or sequence length.*teacher \(2, 4, 6, 6\), student \(2, 4, 5, 5\)",
    ):
        component({0: rand_maps(4, 0, length=5)}, {0: rand_maps(4, 1, length=6)})
    with pytest.raises(ValueError, match="sequence length"):
        component({0: rand_maps(4, 0, batch=3)}, {0: rand_maps(4, 1, batch=2)})


def test_missing_layer_is_named():
    component = AttentionDistillationLoss("mse", "layerwise", [(3, 1)])
    with pytest.raises(ValueError, match=r"no attention map for layer pair L3->1; was the layer captured"):
        component({0: rand_maps(4, 0)}, {3: rand_maps(4, 1)})
    with pytest.raises(ValueError, match=r"no attention map for layer pair L3->1"):
        component({1: rand_maps(4, 0)}, (None, None, None, None))


@pytest.mark.parametrize("mode", MODES)
def test_attentions_as_sequences(mode):
    """A tuple or list indexed by layer (as ``outputs.attentions``) works as a {layer: map} dict does."""
    t_list = [rand_maps(4, i) for i in range(4)]
    s_list = [rand_maps(4, 10 + i) for i in range(2)]
    pairs = [(1, 0), (3, 1)]
    from_dicts = distil(
        "cosine", make_matching(mode), pairs, dict(enumerate(s_list)), dict(enumerate(t_list)), PAD_MASK
    )
    from_seqs = distil("cosine", make_matching(mode), pairs, list(s_list), tuple(t_list), PAD_MASK)
    assert close(from_dicts[0], from_seqs[0])
    assert from_dicts[1].keys() == from_seqs[1].keys()


def test_attentions_from_model_outputs(tiny_model_factory):
    """``outputs.attentions`` of an eager model can be passed straight in (eval mode: no dropout to
    differ).

    The models run in float64: the KL of their near-uniform maps (~6e-5) cancels log-probabilities of ~2, so
    the float32 rounding of two ways to the same maps (the model's attention and the capture's) moved it by
    ~1e-5 relative, depending on the CPU's vector width. In float64 it moves by ~1e-12; a map that is not the
    same (another layer, or after dropout) moves it by far more than the compared 1e-9."""
    teacher = tiny_model_factory("bert", num_hidden_layers=4, seed=1).double()
    student = tiny_model_factory("bert", num_hidden_layers=2, num_attention_heads=2, seed=2).double()
    inputs = make_tiny_inputs("bert", teacher.config)
    teacher.set_attn_implementation("eager")
    student.set_attn_implementation("eager")
    with torch.no_grad():
        t_att = teacher(**inputs, output_attentions=True).attentions
        s_att = student(**inputs, output_attentions=True).attentions
    assert isinstance(t_att, tuple) and len(t_att) == 4
    pairs = layer_map(4, 2)
    component = AttentionDistillationLoss("kl", "layerwise", pairs)
    from_outputs, _ = component(s_att, t_att, inputs["attention_mask"])
    with (
        AttentionCapture(teacher, [1, 3]) as t_cap,
        AttentionCapture(student, [0, 1]) as s_cap,
        torch.no_grad(),
    ):
        _, t_maps = t_cap(**inputs)
        _, s_maps = s_cap(**inputs)
    from_capture, _ = component(s_maps, t_maps, inputs["attention_mask"])
    assert from_outputs.dtype == torch.float64
    assert torch.allclose(from_outputs, from_capture, rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------- 7. registries


def test_get_matching():
    assert isinstance(get_matching("layerwise"), Layerwise)
    assert isinstance(get_matching("global"), Global)
    assert get_matching("headwise", head_map=[[0, 0]]).head_map == [[0, 0]]
    selective = get_matching("selective", top_k=3, importance="gradient")
    assert (
        isinstance(selective, Selective)
        and selective.top_k == 3
        and selective.importance_method == "gradient"
    )
    assert get_matching("layerwise").per_head is False and get_matching("headwise").per_head is True
    with pytest.raises(
        ValueError, match=r"unknown matching 'nope'; valid choices: global, headwise, layerwise, selective"
    ):
        get_matching("nope")


def test_unknown_names_in_the_component():
    with pytest.raises(ValueError, match=r"unknown attention loss 'nope'; valid choices: cosine, kl, mse"):
        AttentionDistillationLoss(loss="nope")
    with pytest.raises(
        ValueError, match=r"unknown matching 'nope'; valid choices: global, headwise, layerwise, selective"
    ):
        AttentionDistillationLoss(matching="nope")
    component = AttentionDistillationLoss(loss="mse", matching="global", layer_map=[(3, 1), (0, 1)])
    assert component.teacher_layers == [0, 3] and component.student_layers == [1]
    assert component.calibrate({1: rand_maps(4, 0)}, {3: rand_maps(4, 1)}) is None  # nothing to calibrate
