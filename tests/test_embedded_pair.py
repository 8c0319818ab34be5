"""The small Shakespeare pair loads with transformers and with Helix, and Helix greedy equals transformers greedy."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helix_serve.config import TOY_DRAFT, TOY_TARGET, EngineConfig
from helix_serve.engine.llm_engine import LLMEngine
from helix_serve.engine.sampling_params import SamplingParams

PROMPTS = ["ROMEO:\nBut soft, what light", "First Citizen:\nBefore we proceed", "Enter HAMLET.\n\nHAMLET:\n"]


@pytest.fixture(scope="module")
def engine():
    # Configured step costs: which K the planner picks must not hang on timing a 5.8M-parameter model on a busy
    # machine; these tests are about what speculation emits, and planned K must draft for them to mean anything.
    return LLMEngine(EngineConfig(TOY_TARGET, TOY_DRAFT, device="cpu", dtype="float32", draft_cost_ratio=0.1,
                                  verify_cost_ratio=0.02))


def test_transformers_loads_both_models():
    for path in (TOY_TARGET, TOY_DRAFT):
        model = AutoModelForCausalLM.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        assert model.config.model_type == "llama" and len(tokenizer) == model.config.vocab_size


@pytest.mark.parametrize("k", [None, 4])
def test_helix_greedy_equals_transformers_greedy(engine, k):
    tokenizer = AutoTokenizer.from_pretrained(TOY_TARGET)
    reference_model = AutoModelForCausalLM.from_pretrained(TOY_TARGET, dtype=torch.float32).eval()
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=48, ignore_eos=True, num_speculative_tokens=k))
    for prompt, out in zip(PROMPTS, outputs):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = reference_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48,
                                           min_new_tokens=48, do_sample=False, pad_token_id=0)
        assert out.token_ids == ref[0, ids.shape[1]:].tolist()
    assert sum(o.stats["num_accepted"] for o in outputs) > 0  # the draft is useful on its own corpus
