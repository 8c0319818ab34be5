"""The MXINT8 LM head of `quantization: int4`: values exact in bf16, the 8-bit kernel for a few rows and a GEMM of
the same values for more, the tied embedding rounded with it."""

from __future__ import annotations

import torch
from torch import nn

from helix_serve.model.int8_head import MAX_ROWS, MXInt8Head, mxint8
from helix_serve.model.paged_llm import PagedCausalLM
from tests.model_factory import make_model


def test_mxint8_codes_share_a_power_of_two_scale_and_round_to_the_nearest_value():
    torch.manual_seed(0)
    weight = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different magnitudes
    weight[3, :32] = 0  # an all-zero group
    codes, scale = mxint8(weight)
    mantissa, _ = torch.frexp(scale)
    assert torch.all(mantissa == 0.5)  # powers of two
    assert codes.abs().max() <= 127 and torch.equal(codes, codes.round())
    groups = weight.view(48, 3, 32)
    assert torch.all((codes * scale - groups).abs() <= scale / 2)  # the nearest code
    amax = groups.abs().amax(-1, keepdim=True)
    assert torch.all((amax > 127 * scale / 2) | (amax == 0))  # and the finest scale that fits
    values = codes * scale
    assert torch.equal(values.to(torch.bfloat16).float(), values)  # exact in bf16
    assert torch.equal(codes[3, 0], torch.zeros(32))


def test_the_8bit_kernel_computes_the_rounded_head_and_the_gemm_agrees():
    torch.manual_seed(1)
    head = nn.Linear(64, 320, bias=False).to(torch.bfloat16)
    nn.init.normal_(head.weight, 0, 0.5)
    before = head.weight.detach().float().clone()
    mx = MXInt8Head(head)
    codes, scale = mxint8(before)
    assert torch.equal(head.weight.float(), (codes * scale).view(320, 64))  # rounded in place
    x = torch.randn(MAX_ROWS, 64).to(torch.bfloat16)
    exact = x.float() @ head.weight.float().t()
    got = mx(x)
    # The kernel rounds each half's output to bf16: a few units in the last place of the dot product's size.
    ulp = 2 ** -7 * (x.float().abs() @ head.weight.float().abs().t())
    assert got.dtype == torch.float32 and torch.all((got - exact).abs() <= ulp)
    gemm = (x @ head.weight.t()).float()
    assert torch.all((got - gemm).abs() <= ulp)
    for i in range(MAX_ROWS):  # each row's logits do not depend on the rows beside it
        assert torch.equal(mx(x[i: i + 1])[0], got[i])


def test_int4_models_use_the_8bit_head_for_few_rows_and_round_the_tied_embedding():
    hf = make_model("llama", 320, 64, 2, 4, 2, seed=3, tie=True)
    model = PagedCausalLM(hf, "int4")
    assert model.head8 is not None and model.embed_tokens.weight is model.lm_head.weight
    codes, scale = mxint8(model.embed_tokens.weight)
    assert torch.equal(model.embed_tokens.weight.float(), (codes * scale).view(320, 64))
    calls = []
    forward = model.head8.forward
    model.head8.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    hidden = torch.randn(MAX_ROWS + 2, 64)
    wide = model.compute_logits(hidden)  # the GEMM
    few = model.compute_logits(hidden[:MAX_ROWS])  # the 8-bit kernel
    assert calls == [MAX_ROWS]
    assert torch.allclose(few, wide[:MAX_ROWS], rtol=2 ** -7, atol=1e-3)
    assert PagedCausalLM(make_model("llama", 320, 64, 2, 4, 2, seed=3, tie=True), "none").head8 is None
