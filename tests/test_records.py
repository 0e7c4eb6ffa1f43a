"""A ``QueryKey`` record's examples: taking some rows of a batch's record (the DDP/FSDP validation's own rows,
the example the attention-map callback draws) gives that example's attention, whether the capture kept the
layer's maps (within its memory budget) or only its queries and keys."""

import pytest
import torch
from conftest import make_tiny_inputs, make_tiny_model

from distill_lab.callbacks import example_attention
from distill_lab.capture import AttentionCapture
from distill_lab.repeats import select_map_rows


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_examples_of_a_record_are_the_examples_attention(tmp_path, family):
    model = make_tiny_model(family, tmp_path / family)
    inputs = make_tiny_inputs(family, model.config, batch_size=3, seq_len=7, num_padded=2)
    records = {}
    for budget in (0, None):  # 0: queries and keys only; None: the maps are kept (CPU default: 64 MiB)
        with AttentionCapture(model, [0], "qk", memory_budget=budget) as capture, torch.no_grad():
            records[budget] = capture(**inputs)[1][0]
    assert records[0].maps is None and records[None].maps is not None
    # the kept maps come from the layer's own eager softmax, the reference from the record's queries and
    # keys: both float32 softmaxes over 7 keys of products of 8-wide heads, equal to a few float32 ulps of
    # probabilities <= 1, so rtol 1e-5 / atol 1e-6 holds whatever order the CPU kernels sum in
    whole = records[0].probs()
    for record in records.values():
        for index in range(3):  # not only the first: kept maps must be taken at the example's row
            torch.testing.assert_close(example_attention(record, index), whole[index], rtol=1e-5, atol=1e-6)
        keep = torch.tensor([True, False, True])
        taken = select_map_rows({0: record}, keep)[0]
        assert taken.shape[0] == 2
        torch.testing.assert_close(taken.probs(), whole[keep], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(taken.scores(), record.scores()[keep])
