"""Model-pair loading from local HF directories, and refusal of incompatible pairs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from helix_serve.device import preferred_cpu_dtype
from helix_serve.model.loader import IncompatiblePairError, load_model_pair, resolve_dtype
from tests.model_factory import make_model, make_tokenizer

CPU = torch.device("cpu")


def test_loads_pair_with_shared_tokenizer(llama_pair):
    target, draft = llama_pair
    pair = load_model_pair(str(target), str(draft), CPU, "float32")
    assert pair.draft.shape.num_layers < pair.target.shape.num_layers
    assert pair.target.shape.num_kv_heads == 2 and pair.target.num_heads == 4  # GQA
    assert pair.target.dtype == torch.float32


def test_incompatible_vocabularies_are_refused_naming_both(llama_pair, tmp_path):
    target, _ = llama_pair
    other_tok = make_tokenizer(vocab_size=280)
    other = tmp_path / "other-draft"
    make_model("llama", len(other_tok), 32, 1, 2, 1, seed=3).save_pretrained(other)
    other_tok.save_pretrained(other)
    with pytest.raises(IncompatiblePairError) as err:
        load_model_pair(str(target), str(other), CPU)
    assert str(target) in str(err.value) and str(other) in str(err.value)


def test_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    with pytest.raises(ValueError, match="gpt2"):
        load_model_pair(str(path), None, CPU)


def test_dtype_resolution():
    native_bf16, avx2_only = {"avx2", "avx512f", "avx512_bf16"}, {"avx", "avx2", "fma"}
    for checkpoint_dtype in (torch.bfloat16, torch.float16, torch.float32, None):
        assert resolve_dtype("auto", checkpoint_dtype, CPU, native_bf16) == torch.bfloat16
        assert resolve_dtype("auto", checkpoint_dtype, CPU, avx2_only) == torch.float32  # bf16 would be emulated
    assert resolve_dtype("auto", torch.bfloat16, CPU, {"amx_bf16", "amx_tile"}) == torch.bfloat16
    assert resolve_dtype("auto", torch.float16, torch.device("cuda")) == torch.float16
    assert resolve_dtype("fp32", torch.bfloat16, CPU, native_bf16) == torch.float32
    assert resolve_dtype("bf16", None, CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("int3", None, CPU)


def test_bf16_checkpoint_on_cpu_loads_in_the_cpu_s_dtype(tmp_path, llama_pair):
    target, _ = llama_pair
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    make_tokenizer().save_pretrained(tmp_path / "bf16")
    pair = load_model_pair(str(tmp_path / "bf16"), None, CPU)
    assert pair.target.dtype == preferred_cpu_dtype() and pair.draft is None  # bf16 only where it is native
    assert load_model_pair(str(tmp_path / "bf16"), None, CPU, "bfloat16").target.dtype == torch.bfloat16
