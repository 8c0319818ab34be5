"""The rotary table holds the rotary module's own values bit for bit, and grows as positions need."""

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, rotate_half

from helix_serve.model import rope
from helix_serve.model.rope import RopeTable, rotate


def _module(rope_parameters: dict) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=4096,
                         rope_parameters={"rope_theta": 10000.0, **rope_parameters})
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope_parameters", [{"rope_type": "default"}, {"rope_type": "linear", "factor": 2.0}])
def test_table_lookup_equals_the_module_bit_for_bit(dtype, rope_parameters, monkeypatch):
    monkeypatch.setattr(rope, "FIRST_ROWS", 16)  # grown twice below
    module = _module(rope_parameters)
    table = RopeTable(module)
    half = 8
    for positions in ([0], [5, 6, 7], [40, 3, 17], [33]):
        at = torch.tensor(positions)
        cos, signed_sin = table(at, dtype, max(positions) + 1)
        want_cos, want_sin = module(torch.empty(0, dtype=dtype), at[None])
        assert torch.equal(cos, want_cos[0])
        assert torch.equal(signed_sin, torch.cat((-want_sin[0, :, :half], want_sin[0, :, half:]), -1))
    assert table.tables[(dtype, torch.device("cpu"))][0].shape[0] == 64  # 16 → 32 → 64 rows for position 40
    # [B, T] positions without a bound (the training path) look up the same rows
    grid = torch.tensor([[1, 2], [40, 41]])
    assert torch.equal(table(grid, dtype)[0], table(grid.flatten(), dtype)[0].view(2, 2, -1))


def test_rotate_is_rope():
    module = _module({"rope_type": "default"})
    x = torch.randn(5, 3, 16)
    positions = torch.arange(10, 15)
    cos, sin = module(x, positions[None])
    expected = x * cos[0, :, None] + rotate_half(x) * sin[0, :, None]
    got = rotate(x, *(t[:, None] for t in RopeTable(module)(positions, x.dtype, 15)))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_dynamic_rope_types_are_computed_per_call():
    """Their frequencies follow the longest position of the call: a table would freeze one choice."""
    module = _module({"rope_type": "dynamic", "factor": 2.0})
    table = RopeTable(module)
    assert table.per_call
    cos, _ = table(torch.tensor([3, 4]), torch.float32, 5)
    assert not table.tables and torch.equal(cos, module(torch.empty(0), torch.tensor([[3, 4]]))[0][0])
