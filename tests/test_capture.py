"""Tests for distill_lab.capture: pre-dropout attention maps out of tiny random transformers models."""

from __future__ import annotations

import pytest
import torch
from conftest import CAUSAL_FAMILIES, FAMILIES, TEXT_FAMILIES, make_tiny_config, make_tiny_inputs
from torch import nn

from distill_lab.capture import (
    _STATE,
    CAPTURE_ATTENTION,
    AttentionCapture,
    _record_and_attend,
    attention_modules,
    num_attention_heads,
)

ATOL = 1e-5
# innermost self-attention module of layer i, by family
ATTENTION_NAMES = {
    "bert": "bert.encoder.layer.{}.attention.self",
    "roberta": "roberta.encoder.layer.{}.attention.self",
    "gpt2": "transformer.h.{}.attn",
    "llama": "model.layers.{}.self_attn",
    "vit": "vit.layers.{}.attention",
}


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they slow these tests ~4x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _valid_queries(family: str, inputs: dict, maps: torch.Tensor) -> torch.Tensor:
    """(B, Lq) bool: the query positions that are not padding."""
    if family in TEXT_FAMILIES:
        return inputs["attention_mask"].bool()
    return torch.ones(maps.shape[0], maps.shape[2], dtype=torch.bool)


def _eager_reference(model, inputs: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Logits and ``output_attentions`` of the same model under transformers' own eager attention."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(previous)
    return out.logits, out.attentions


def _usable_attentions(attentions) -> bool:
    return attentions is not None and len(attentions) > 0 and all(a is not None for a in attentions)


# ----------------------------------------------------------------------------------------------------------
# 1. maps: shape, dtype, normalisation, equality with eager output_attentions, logits unchanged
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_maps_match_eager_reference_and_logits_unchanged(family, tiny_model_factory):
    model = tiny_model_factory(family)
    config = model.config
    inputs = make_tiny_inputs(family, config)
    assert config._attn_implementation == "sdpa"
    layers = [0, 2]

    with torch.no_grad():
        plain_logits = model(**inputs).logits
        with AttentionCapture(model, layers) as capture:
            outputs, maps = capture(**inputs)
    ref_logits, ref_attentions = _eager_reference(model, inputs)

    assert sorted(maps) == layers
    batch = next(iter(inputs.values())).shape[0]
    seq = 17 if family == "vit" else inputs["input_ids"].shape[1]
    heads = config.num_attention_heads
    if family == "llama":
        assert config.num_key_value_heads == 2 < heads  # GQA: maps still have one map per *query* head
    for layer in layers:
        m = maps[layer]
        assert m.shape == (batch, heads, seq, seq)
        assert m.dtype == torch.float32
        valid = _valid_queries(family, inputs, m)  # (B, L)
        row_sums = m.sum(-1).transpose(1, 2)  # (B, L, H)
        torch.testing.assert_close(row_sums[valid], torch.ones_like(row_sums[valid]), atol=ATOL, rtol=0)
        if family in TEXT_FAMILIES:  # padded keys get exactly zero weight
            key_pad = ~inputs["attention_mask"].bool()
            assert key_pad.any()
            assert (m.permute(0, 3, 1, 2)[key_pad] == 0).all()
        if family in CAUSAL_FAMILIES:
            assert (torch.triu(m, diagonal=1) == 0).all()
        else:  # bidirectional: valid keys above the diagonal do get weight
            assert (torch.triu(m[0], diagonal=1) > 0).any()
        torch.testing.assert_close(m, ref_attentions[layer], atol=ATOL, rtol=0)

    torch.testing.assert_close(outputs.logits, plain_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(outputs.logits, ref_logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_causal_maps_without_attention_mask(family, tiny_model_factory):
    model = tiny_model_factory(family, num_hidden_layers=2)
    inputs = make_tiny_inputs(family, model.config, num_padded=0)
    del inputs["attention_mask"]
    with AttentionCapture(model, [1]) as capture, torch.no_grad():
        _, maps = capture(**inputs)
    _, ref = _eager_reference(model, inputs)
    assert (torch.triu(maps[1], diagonal=1) == 0).all()
    torch.testing.assert_close(maps[1].sum(-1), torch.ones(maps[1].shape[:-1]), atol=ATOL, rtol=0)
    torch.testing.assert_close(maps[1], ref[1], atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_causal_maps_with_left_padding(family, tiny_model_factory):
    """Left padding leaves the padded queries with no allowed key: their rows stay finite (uniform, as in
    eager), and the rows of valid queries are causal, normalised and equal to eager."""
    model = tiny_model_factory(family, num_hidden_layers=2)
    inputs = make_tiny_inputs(family, model.config, num_padded=0)
    inputs["attention_mask"][1, :3] = 0
    with AttentionCapture(model, [0, 1]) as capture, torch.no_grad():
        _, maps = capture(**inputs)
    _, ref = _eager_reference(model, inputs)
    valid = inputs["attention_mask"].bool()
    for layer, m in maps.items():
        assert torch.isfinite(m).all()
        torch.testing.assert_close(m, ref[layer], atol=ATOL, rtol=0)
        rows = m.transpose(1, 2)[valid]  # (valid queries, H, L)
        torch.testing.assert_close(rows.sum(-1), torch.ones(rows.shape[:-1]), atol=ATOL, rtol=0)
        assert (torch.triu(m[0], diagonal=1) == 0).all()
        assert (m[1, :, 3:, :3] == 0).all()  # valid queries give padded keys no weight
        assert (torch.triu(m[1, :, 3:, 3:], diagonal=1) == 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_a_decoder_builds_no_key_value_cache_unless_asked(family, tiny_model_factory):
    """A loss reuses no cache: a decoder runs with use_cache=False (its config's default is True), so the
    teacher's keys and values are not kept through the student's forward; a caller's own use_cache wins, and
    models whose forward takes no use_cache (BERT, ViT) get none."""
    model = tiny_model_factory(family, num_hidden_layers=2)
    inputs = make_tiny_inputs(family, model.config)
    with AttentionCapture(model, [0, 1], "qk") as capture, torch.no_grad():
        outputs, _ = capture(**inputs)
        assert getattr(outputs, "past_key_values", None) is None
        if family in CAUSAL_FAMILIES:
            assert model.config.use_cache  # the exported student keeps its config's default for generation
            assert capture(**inputs, use_cache=True)[0].past_key_values is not None


def test_bfloat16_model_gives_float32_maps(tiny_model_factory):
    model = tiny_model_factory("llama", num_hidden_layers=2).to(torch.bfloat16)
    inputs = make_tiny_inputs("llama", model.config)
    with AttentionCapture(model, [0, 1]) as capture, torch.no_grad():
        outputs, maps = capture(**inputs)
    assert outputs.logits.dtype == torch.bfloat16
    for m in maps.values():
        assert m.dtype == torch.float32
        valid = inputs["attention_mask"].bool()
        row_sums = m.sum(-1).transpose(1, 2)[valid]
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# 2. maps are taken before attention dropout
# ----------------------------------------------------------------------------------------------------------


def test_maps_are_pre_dropout(tiny_model_factory):
    p = 0.5
    model = tiny_model_factory("bert", attention_probs_dropout_prob=p)  # hidden dropout stays 0
    inputs = make_tiny_inputs("bert", model.config)
    valid = inputs["attention_mask"].bool()

    with torch.no_grad(), AttentionCapture(model, [0, 1]) as capture:
        _, eval_maps = capture(**inputs)
        model.train()
        torch.manual_seed(0)
        _, train_maps = capture(**inputs)

    # layer 0 sees the same input in both modes, so its map must be identical: dropout is not in it
    torch.testing.assert_close(train_maps[0], eval_maps[0], atol=ATOL, rtol=0)
    for m in train_maps.values():
        row_sums = m.sum(-1).transpose(1, 2)[valid]
        torch.testing.assert_close(row_sums, torch.ones_like(row_sums), atol=ATOL, rtol=0)
    # dropout did act on the layer's output: layer 1's input (hence map) differs from eval mode
    assert not torch.allclose(train_maps[1], eval_maps[1], atol=ATOL)

    # the trap avoided: eager output_attentions in train mode returns post-dropout weights
    assert model.training
    torch.manual_seed(0)
    _, eager_train = _eager_reference(model, inputs)
    dropped = eager_train[0]
    row_sums = dropped.sum(-1).transpose(1, 2)[valid]
    assert (row_sums - 1).abs().max() > 0.1
    assert (dropped == 0).any()
    # ... and they are the pre-dropout map, zeroed or scaled by 1 / (1 - p)
    kept = dropped != 0
    torch.testing.assert_close(dropped[kept], eval_maps[0][kept] / (1 - p), atol=ATOL, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# 3. gradients flow from a loss on the maps into the captured layer's queries and keys
# ----------------------------------------------------------------------------------------------------------


def _qk_weights(family: str, model, layer: int) -> tuple[nn.Parameter, nn.Parameter]:
    if family == "bert":
        attn = model.bert.encoder.layer[layer].attention.self
        return attn.query.weight, attn.key.weight
    attn = model.model.layers[layer].self_attn
    return attn.q_proj.weight, attn.k_proj.weight


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_gradient_flows_to_query_and_key(family, tiny_model_factory):
    model = tiny_model_factory(family).train()
    inputs = make_tiny_inputs(family, model.config)
    layer = 1
    with AttentionCapture(model, [layer]) as capture:
        _, maps = capture(**inputs)
        assert maps[layer].requires_grad
        maps[layer].pow(2).sum().backward()

    for weight in _qk_weights(family, model, layer):
        assert weight.grad is not None
        assert weight.grad.abs().sum() > 0
    # layers above the captured one do not influence its map
    for weight in _qk_weights(family, model, layer + 1):
        assert weight.grad is None or (weight.grad == 0).all()


def test_captured_probabilities_drive_the_layer_output(tiny_model_factory):
    """The recorded map is the very tensor used for the layer output: a loss on the logits reaches it."""
    model = tiny_model_factory("bert")
    inputs = make_tiny_inputs("bert", model.config)
    with AttentionCapture(model, [1]) as capture:
        outputs, maps = capture(**inputs)
        maps[1].retain_grad()
        outputs.logits.sum().backward()
    assert maps[1].grad is not None
    assert maps[1].grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# 4. the sdpa trap: output_attentions=True under the default sdpa gives nothing usable; capture still works
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_sdpa_output_attentions_trap(family, tiny_model_factory):
    model = tiny_model_factory(family, num_hidden_layers=2)
    inputs = make_tiny_inputs(family, model.config)
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        out = model(**inputs, output_attentions=True)
    # transformers 5.x: sdpa cannot return probabilities, so attentions come back empty / None (with a
    # logged warning, emitted once per process, hence not asserted here)
    assert not _usable_attentions(getattr(out, "attentions", None))

    with AttentionCapture(model, [0, 1]) as capture, torch.no_grad():
        _, maps = capture(**inputs)
    assert sorted(maps) == [0, 1]
    assert all(m.shape[1] == model.config.num_attention_heads for m in maps.values())
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------
# 5. detach and the context manager restore the previous attention implementation
# ----------------------------------------------------------------------------------------------------------


def test_detach_restores_implementation_and_stops_recording(tiny_model_factory):
    model = tiny_model_factory("llama")
    inputs = make_tiny_inputs("llama", model.config)
    capture = AttentionCapture(model, [0, 2])
    assert model.config._attn_implementation == CAPTURE_ATTENTION
    with torch.no_grad():
        capture(**inputs)
    capture.detach()

    assert model.config._attn_implementation == "sdpa"
    assert all(not hasattr(module, _STATE) for _, module in attention_modules(model))
    with torch.no_grad():
        model(**inputs)
    assert capture._maps == {}
    with pytest.raises(RuntimeError, match=r"layers \[0, 2\].*produced no attention map"):
        capture(**inputs)
    capture.detach()  # idempotent
    assert model.config._attn_implementation == "sdpa"


def test_context_manager_restores_eager_even_on_error(tiny_model_factory):
    model = tiny_model_factory("bert")
    model.set_attn_implementation("eager")
    with pytest.raises(KeyError), AttentionCapture(model, [1]):
        assert model.config._attn_implementation == CAPTURE_ATTENTION
        raise KeyError("boom")
    assert model.config._attn_implementation == "eager"
    assert all(not hasattr(module, _STATE) for _, module in attention_modules(model))


def test_changing_implementation_under_capture_raises(tiny_model_factory):
    model = tiny_model_factory("gpt2")
    inputs = make_tiny_inputs("gpt2", model.config)
    with AttentionCapture(model, [1]) as capture:
        model.set_attn_implementation("sdpa")
        with pytest.raises(RuntimeError, match="set_attn_implementation"):
            capture(**inputs)
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------------------------
# 6. only the requested layers are computed eagerly
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_only_requested_layers_are_captured(family, tiny_model_factory, sdpa_calls):
    model = tiny_model_factory(family, num_hidden_layers=4)
    inputs = make_tiny_inputs(family, model.config)
    modules = [module for _, module in attention_modules(model)]
    with AttentionCapture(model, [2]) as capture, torch.no_grad():
        assert [hasattr(module, _STATE) for module in modules] == [False, False, True, False]
        assert getattr(modules[2], _STATE) == (capture, 2)
        outputs, maps = capture(**inputs)
    with torch.no_grad():
        plain_logits = model(**inputs).logits

    assert list(maps) == [2]
    assert maps[2].shape[1] == model.config.num_attention_heads
    # the three other layers went through SDPA, the captured one did not
    assert len(sdpa_calls) == 3
    assert all(module is not modules[2] for module in sdpa_calls)
    torch.testing.assert_close(outputs.logits, plain_logits, atol=ATOL, rtol=0)


def test_duplicate_and_unsorted_layers(tiny_model_factory):
    model = tiny_model_factory("vit")
    inputs = make_tiny_inputs("vit", model.config)
    with AttentionCapture(model, (2, 0, 2)) as capture, torch.no_grad():
        assert capture.layers == [0, 2]
        _, maps = capture(**inputs)
    assert sorted(maps) == [0, 2]


# ----------------------------------------------------------------------------------------------------------
# 7. errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [3, -1, 100])
def test_layer_out_of_range(bad, tiny_model_factory):
    model = tiny_model_factory("bert")
    with pytest.raises(ValueError, match=r"valid indices 0\.\.2\b") as info:
        AttentionCapture(model, [0, bad])
    assert f"[{bad}]" in str(info.value)
    # nothing was attached
    assert model.config._attn_implementation == "sdpa"
    assert all(not hasattr(module, _STATE) for _, module in attention_modules(model))


def test_no_attention_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="no attention modules"):
        attention_modules(model)
    with pytest.raises(ValueError, match="no attention modules"):
        AttentionCapture(model, [0])


def test_model_without_attention_interface():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    with pytest.raises(ValueError, match="AttentionInterface"):
        AttentionCapture(Plain(), [0])


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "vit"])
def test_num_attention_heads_from_config(family):
    config = make_tiny_config(family, num_attention_heads=8)
    holder = nn.Module()
    holder.config = config
    assert num_attention_heads(holder) == 8


def test_num_attention_heads_without_config():
    with pytest.raises(ValueError, match="number of attention heads"):
        num_attention_heads(nn.Linear(2, 2))


# ----------------------------------------------------------------------------------------------------------
# 8. attention_modules
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_modules_in_layer_order(family, tiny_model_factory):
    model = tiny_model_factory(family, num_hidden_layers=4)
    found = attention_modules(model)
    assert len(found) == model.config.num_hidden_layers == 4
    assert [name for name, _ in found] == [ATTENTION_NAMES[family].format(i) for i in range(4)]
    named = dict(model.named_modules())
    assert all(named[name] is module for name, module in found)
    # innermost: no child is itself an attention module
    for _, module in found:
        assert not any(
            type(child).__name__.endswith("Attention") for child in module.modules() if child is not module
        )


def test_attention_modules_skip_cross_attention(tiny_model_factory):
    model = tiny_model_factory("gpt2", add_cross_attention=True)
    names = [name for name, _ in attention_modules(model)]
    assert names == [ATTENTION_NAMES["gpt2"].format(i) for i in range(3)]


# ----------------------------------------------------------------------------------------------------------
# the attention function itself, on branches the tiny models do not reach
# ----------------------------------------------------------------------------------------------------------


class _Recorder:
    backend = "probs"
    memory_budget = None  # the qk backend's default

    def __init__(self):
        self.maps = {}

    def _record(self, layer, probs):
        self.maps[layer] = probs


def _fake_module(is_causal: bool) -> tuple[nn.Module, _Recorder]:
    module = nn.Module()
    module.is_causal = is_causal
    recorder = _Recorder()
    setattr(module, _STATE, (recorder, 7))
    return module.eval(), recorder


def _manual_attention(q, k, v, allowed, scaling):
    scores = (q @ k.transpose(-1, -2)) * scaling
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = scores.softmax(-1)
    return (probs @ v).transpose(1, 2), probs


def test_attend_causal_without_mask_and_gqa():
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 8)  # 3 new queries ...
    k = torch.randn(2, 2, 5, 8)  # ... over 5 keys (2 cached): queries are the last 3 positions
    v = torch.randn(2, 2, 5, 8)
    module, recorder = _fake_module(is_causal=True)
    out, probs = _record_and_attend(module, q, k, v, None)
    assert recorder.maps[7] is probs
    allowed = torch.ones(3, 5, dtype=torch.bool).tril(2)
    k_rep, v_rep = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    ref_out, ref_probs = _manual_attention(q, k_rep, v_rep, allowed, 8**-0.5)
    torch.testing.assert_close(probs, ref_probs)
    torch.testing.assert_close(out, ref_out)
    assert out.shape == (2, 3, 4, 8)


def test_attend_bool_mask_and_scaling_match_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    mask = torch.rand(2, 1, 6, 6) > 0.3
    mask[..., 0] = True  # no fully masked row
    module, recorder = _fake_module(is_causal=False)
    out, probs = _record_and_attend(module, q, k, v, mask, scaling=0.2)
    expected = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.2)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=ATOL, rtol=0)
    assert (probs[~mask.expand_as(probs)] == 0).all()


def test_attend_softcap():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8) * 3 for _ in range(3))
    module, _ = _fake_module(is_causal=False)
    _, probs = _record_and_attend(module, q, k, v, None, scaling=1.0, softcap=2.0)
    expected = (torch.tanh((q @ k.transpose(-1, -2)) / 2.0) * 2.0).softmax(-1)
    torch.testing.assert_close(probs, expected)


def test_attend_uncaptured_module_uses_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    module = nn.Module().eval()
    module.is_causal = False
    out, weights = _record_and_attend(module, q, k, v, None)
    assert weights is None
    expected = nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=ATOL, rtol=0)


def test_attend_follows_sdpa_causality_and_the_calls_sliding_window():
    """A module without ``is_causal`` is causal where SDPA takes it to be (no mask, no flag), the call's
    ``is_causal`` wins over the module's, and a window passed with the call (Mistral) is recorded."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    module = nn.Module().eval()
    recorder = _Recorder()
    setattr(module, _STATE, (recorder, 0))
    out, probs = _record_and_attend(module, q, k, v, None)
    expected = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expected.transpose(1, 2), atol=ATOL, rtol=0)
    lower = torch.ones(4, 4, dtype=torch.bool).tril()
    assert (probs[..., ~lower] == 0).all() and (probs[..., lower] > 0).all()
    module.is_causal = True
    _, probs = _record_and_attend(module, q, k, v, None, is_causal=False)
    assert (probs > 0).all()
    recorder.backend = "qk"
    _record_and_attend(module, q, k, v, None, sliding_window=3)
    assert recorder.maps[0].sliding_window == 3 and recorder.maps[0].causal


def test_attend_adds_the_position_bias_of_t5_style_layers():
    """A relative-position bias passed with the call (T5) enters the scores, as in the model's own
    attention."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 5, 8) for _ in range(3))
    bias = torch.randn(1, 2, 5, 5)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, ..., 3:] = False
    module, recorder = _fake_module(is_causal=False)
    out, probs = _record_and_attend(module, q, k, v, mask, scaling=1.0, position_bias=bias)
    scores = (q @ k.transpose(-1, -2) + bias).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(probs, scores.softmax(-1))
    torch.testing.assert_close(out, (scores.softmax(-1) @ v).transpose(1, 2))
    recorder.backend = "qk"
    _record_and_attend(module, q, k, v, mask, scaling=1.0, position_bias=bias)
    record = recorder.maps[7]
    torch.testing.assert_close(record.probs(slice(1, 4)), scores.softmax(-1)[:, :, 1:4])


def _tiny_t5_encoder():
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, dropout_rate=0.0)
    return T5EncoderModel(config).eval()


@pytest.mark.parametrize("backend", ["probs", "qk"])
def test_t5_maps_include_the_relative_position_bias(backend):
    """T5's layers add a learned relative-position bias to their scores: the captured maps equal the model's
    own eager attentions, and the model's output does not change under the capture."""
    model = _tiny_t5_encoder()
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0
    model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    model.set_attn_implementation("sdpa")
    with AttentionCapture(model, layers=[0, 1], backend=backend) as capture, torch.no_grad():
        out, maps = capture(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state, atol=ATOL, rtol=0)
    for layer in (0, 1):
        probs = maps[layer] if backend == "probs" else maps[layer].probs()
        valid = mask.bool()[
            :, None, :, None
        ]  # padded query rows differ (eager's all-masked rows are uniform)
        torch.testing.assert_close(probs * valid, reference.attentions[layer] * valid, atol=ATOL, rtol=0)


def test_attention_modules_skip_cross_attention_of_encoder_decoders():
    """BART's ``encoder_attn`` and T5's ``EncDecAttention`` share their class with self-attention."""
    from transformers import BartConfig, BartModel, T5Config, T5Model

    bart = BartModel(
        BartConfig(
            vocab_size=50,
            d_model=16,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=16,
            decoder_ffn_dim=16,
        )
    )
    assert [name for name, _ in attention_modules(bart)] == [
        "encoder.layers.0.self_attn",
        "decoder.layers.0.self_attn",
    ]
    t5 = T5Model(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    assert [name for name, _ in attention_modules(t5)] == [
        "encoder.block.0.layer.0.SelfAttention",
        "decoder.block.0.layer.0.SelfAttention",
    ]


@pytest.mark.parametrize("backend", ["probs", "qk"])
def test_reentrant_checkpointing_is_refused_not_silently_untrained(backend, tiny_model_factory):
    """Reentrant activation checkpointing runs the layers without autograd: the recorded attention has no
    gradient, and the attention loss would train nothing. The capture says so; non-reentrant checkpointing
    keeps the gradient."""
    model = tiny_model_factory("bert").train()
    inputs = make_tiny_inputs("bert", model.config)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with AttentionCapture(model, layers=[1], backend=backend) as capture:
        with pytest.raises(
            RuntimeError,
            match=r"layers \[1\].*carries no gradient.*"
            r"activation_checkpointing_kwargs=\{'use_reentrant': False\}",
        ):
            capture(**inputs)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        _, maps = capture(**inputs)
        record = maps[1] if backend == "probs" else maps[1].query
        assert record.requires_grad
        with torch.no_grad():  # a teacher's forward, or validation: nothing to train, nothing refused
            capture(**inputs)


@pytest.mark.parametrize("backend", ["probs", "qk"])
def test_soft_capped_models_run_eager_attention_under_the_capture(backend):
    """Gemma 2 soft-caps its scores, which SDPA cannot do: under the capture those layers, captured or not,
    run eager attention, so the model's output is its own eager output and the maps are its eager
    attentions."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        max_position_embeddings=32,
    )
    model = Gemma2ForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    ids = torch.randint(0, 64, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    with AttentionCapture(model, layers=[0, 1], backend=backend) as capture, torch.no_grad():
        out, maps = capture(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    assert torch.isfinite(out.logits).all()  # padded queries that may see no key give zeros, not NaN
    torch.testing.assert_close(out.logits[real], reference.logits[real], atol=ATOL, rtol=0)
    real = real[:, None, :, None]
    for layer in (0, 1):
        probs = maps[layer] if backend == "probs" else maps[layer].probs()
        assert backend == "probs" or maps[layer].softcap == 5.0
        torch.testing.assert_close(probs * real, reference.attentions[layer] * real, atol=ATOL, rtol=0)


def test_attention_arguments_the_capture_would_drop_are_refused():
    """GPT-OSS hands its attention learned sinks (``s_aux``): the capture does not apply them, so the captured
    maps and the model's outputs would silently differ from the model's own. Any argument the capture
    neither applies nor knows to be neutral is refused at the first forward, in captured and uncaptured
    layers alike."""
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=50, hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_local_experts=2, num_experts_per_tok=1, sliding_window=6,
    )  # fmt: skip
    model = GptOssForCausalLM(config).eval()
    for backend in ("qk", "probs"):
        for layers in ([0], [1]):
            sinks = r"GptOssAttention passes its attention s_aux \(attention sinks\), which"
            with (
                AttentionCapture(model, layers=layers, backend=backend) as capture,
                pytest.raises(NotImplementedError, match=sinks),
            ):
                capture(input_ids=torch.tensor([[3, 4, 5, 6]]))
    # neutral arguments (position_ids, use_cache) and an applied one (sliding_window) pass
    from transformers import MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=3,
    )).eval()  # fmt: skip
    with AttentionCapture(mistral, layers=[0], backend="qk") as capture:
        _, maps = capture(input_ids=torch.tensor([[3, 4, 5, 6, 7]]))
    assert maps[0].sliding_window == 3


@pytest.mark.parametrize("kind", ["bart", "t5", "albert"])
def test_models_without_one_self_attention_per_layer_are_refused(kind):
    """Encoder-decoders (the decoder's self-attention follows the encoder's under one layer count) and shared
    layers (ALBERT: one module for every layer) cannot be named by a layer map: refused by the capture and by
    derive_student, rather than captured from the wrong layer."""
    from transformers import AlbertConfig, AlbertModel, BartConfig, BartModel, T5Config, T5Model

    from distill_lab.models import derive_student

    if kind == "bart":
        model = BartModel(
            BartConfig(
                vocab_size=50,
                d_model=16,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=16,
                decoder_ffn_dim=16,
            )
        )
        message = "BartModel is an encoder-decoder model"
    elif kind == "t5":
        model = T5Model(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=16, num_layers=2, num_heads=2))
        message = "T5Model is an encoder-decoder model"
    else:
        model = AlbertModel(
            AlbertConfig(
                vocab_size=50,
                embedding_size=16,
                hidden_size=16,
                num_hidden_layers=4,
                num_attention_heads=2,
                intermediate_size=16,
            )
        )
        message = r"AlbertModel has 1 self-attention modules for its 4 layers"
    for backend in ("qk", "probs"):
        with pytest.raises(ValueError, match=message):
            AttentionCapture(model, layers=[0], backend=backend)
    with pytest.raises(ValueError, match=message):
        derive_student(model, num_layers=1)


def test_a_model_is_captured_by_one_capture_at_a_time(tiny_model_factory):
    """A second capture on a captured model would take over its modules and, on detach, remove the first
    one's; it is refused. After the first detaches, a new capture works and the model gets its own
    implementation back."""
    model = tiny_model_factory("bert")
    inputs = make_tiny_inputs("bert", model.config)
    first = AttentionCapture(model, layers=[0], backend="qk")
    with pytest.raises(ValueError, match="is already being captured"):
        AttentionCapture(model, layers=[1], backend="probs")
    _, maps = first(**inputs)
    assert list(maps) == [0]
    first.detach()
    assert model.config._attn_implementation == "sdpa"
    with AttentionCapture(model, layers=[1], backend="probs") as second:
        assert list(second(**inputs)[1]) == [1]
    assert model.config._attn_implementation == "sdpa"


def _architecture(name: str):
    """A tiny random model (base class, no head) of architecture ``name``, in eval mode."""
    import transformers as T

    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4
    )
    gqa = dict(common, num_key_value_heads=2, pad_token_id=0)
    configs = {
        "distilbert": lambda: T.DistilBertConfig(vocab_size=64, dim=32, hidden_dim=40, n_layers=2, n_heads=4),
        "electra": lambda: T.ElectraConfig(**common, embedding_size=32),
        "modernbert": lambda: T.ModernBertConfig(
            **common, pad_token_id=0, local_attention=4, global_attn_every_n_layers=2
        ),
        "opt": lambda: T.OPTConfig(
            vocab_size=64,
            hidden_size=32,
            ffn_dim=40,
            num_hidden_layers=2,
            num_attention_heads=4,
            word_embed_proj_dim=32,
        ),
        "gpt_neox": lambda: T.GPTNeoXConfig(**common),
        "qwen2": lambda: T.Qwen2Config(**gqa, use_sliding_window=True, sliding_window=4, max_window_layers=1),
        "qwen3": lambda: T.Qwen3Config(**gqa, head_dim=8),
        "mistral": lambda: T.MistralConfig(**gqa, sliding_window=4),
        "gemma2": lambda: T.Gemma2Config(**gqa, head_dim=8, sliding_window=4),
        "gemma3": lambda: T.Gemma3TextConfig(**gqa, head_dim=8, sliding_window=4),
        "phi3": lambda: T.Phi3Config(**gqa),
        "olmo2": lambda: T.Olmo2Config(**gqa),
        "smollm3": lambda: T.SmolLM3Config(**gqa),
        "deit": lambda: T.DeiTConfig(
            image_size=8,
            patch_size=4,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=40,
        ),
    }
    torch.manual_seed(0)
    return T.AutoModel.from_config(configs[name]()).eval()


@pytest.mark.parametrize("backend", ["probs", "qk"])
@pytest.mark.parametrize(
    "name",
    ["distilbert", "electra", "modernbert", "opt", "gpt_neox", "qwen2", "qwen3", "mistral", "gemma2",
     "gemma3", "phi3", "olmo2", "smollm3", "deit"],
)  # fmt: skip
def test_more_architectures_capture_their_own_attention(name, backend):
    """Beyond the families the other tests use: encoders, decoders with grouped-query attention, sliding
    windows (Qwen2, Mistral, Gemma 2/3, ModernBERT's local layers) and soft-capping (Gemma 2). Each
    captures the maps its own eager attention returns, on the real rows of a right-padded batch, and its
    output does not change under the capture."""
    model = _architecture(name)
    if name == "deit":
        inputs = {"pixel_values": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
        valid = torch.ones(2, 1, 6, 1, dtype=torch.bool)  # 4 patches, the CLS and distillation tokens
    else:
        ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        valid = mask.bool()[:, None, :, None]
    own = model.config._attn_implementation  # sdpa, or eager where the model has no SDPA path (Gemma 2)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        reference = model(**inputs, output_attentions=True)
    model.set_attn_implementation(own)
    with AttentionCapture(model, layers=[0, 1], backend=backend) as capture, torch.no_grad():
        out, maps = capture(**inputs)
    assert model.config._attn_implementation == own
    hidden = valid[:, 0]  # (B, L, 1): the real positions
    torch.testing.assert_close(
        out.last_hidden_state * hidden, reference.last_hidden_state * hidden, atol=ATOL, rtol=1e-4
    )
    for layer in (0, 1):
        probs = maps[layer] if backend == "probs" else maps[layer].probs()
        torch.testing.assert_close(
            probs * valid, reference.attentions[layer].float() * valid, atol=ATOL, rtol=0
        )


def test_model_inputs_handed_on_to_the_attention_are_not_refused():
    """A LLaMA classifier passes the batch's token_type_ids (from a BERT-style tokenizer) down to every
    attention call in its kwargs: an argument that changes nothing there is accepted."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0,
    )).eval()  # fmt: skip
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        own = model(input_ids=ids, token_type_ids=torch.zeros_like(ids)).logits
    with AttentionCapture(model, layers=[0, 1], backend="qk") as capture, torch.no_grad():
        out, maps = capture(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    torch.testing.assert_close(out.logits, own)
    assert sorted(maps) == [0, 1]
