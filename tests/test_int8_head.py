"""The 8-bit LM head of `quantization: int4`: close to the head it replaces, each pass on the kernel measured
faster for its width."""

from __future__ import annotations

import torch
from torch import nn

from helix_serve.model.int8_head import PROBE_ROWS, Int8Head, fastest_int8_rows


def _head() -> nn.Linear:
    torch.manual_seed(0)
    layer = nn.Linear(64, 1000, bias=False)
    layer.weight.data.normal_(0, 0.05)
    return layer


def test_logits_are_the_heads_up_to_int8_rounding():
    layer = _head()
    head = Int8Head(layer, max_rows=2)
    x = torch.randn(5, 64)
    exact = layer(x)
    for rows in (1, 2, 5):  # int8 kernel up to max_rows, the dequantized bf16 weight beyond
        out = head(x[:rows])
        assert out.dtype == torch.float32 and out.shape == (rows, 1000)
        assert (out - exact[:rows]).abs().max() < 0.02 * exact.abs().max()
        assert (out.argmax(-1) == exact[:rows].argmax(-1)).float().mean() >= 0.8
    torch.testing.assert_close(head(x[:2]), head.int8(x[:2]).float())
    torch.testing.assert_close(head(x), head.dense(x).float())


def test_the_crossing_is_measured_on_this_cpu():
    head = Int8Head(_head(), max_rows=0)
    assert head(torch.randn(1, 64)).shape == (1, 1000)  # 0: every pass on the bf16 GEMM
    assert fastest_int8_rows(head) in (0, *PROBE_ROWS)


def test_an_int4_target_reads_its_lm_head_at_8_bits(llama_pair):
    from tests.helpers import make_engine

    engine = make_engine((llama_pair[0], None), draft_model=None, quantization="int4", draft_cost_ratio=0.1,
                         verify_cost_ratio=0.1)
    target = engine.pair.target
    assert isinstance(target.int8_head, Int8Head)
    hidden = torch.randn(3, target.hidden_size)
    torch.testing.assert_close(target.compute_logits(hidden), target.int8_head(hidden))
    assert make_engine(llama_pair, draft_model=None).pair.target.int8_head is None  # none: as loaded
