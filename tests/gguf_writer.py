"""Write a Llama checkpoint as a GGUF file the way llama.cpp's converter does (test helper).

Tensors get llama.cpp's names and its q/k row permutation (which transformers' loader undoes), the
config goes into `llama.*` keys and the byte-level BPE tokenizer into `tokenizer.ggml.*` keys, so
that the file exercises the same loading path as a GGUF downloaded from the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

LAYER_TENSORS = {  # HF name inside model.layers.N → llama.cpp name inside blk.N
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's permute: rotary halves interleaved within each head."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    config, state = model.config, {k: v.float().numpy() for k, v in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        for hf_name, cpp_name in LAYER_TENSORS.items():
            weights = state[f"model.layers.{i}.{hf_name}.weight"]
            if cpp_name == "attn_q":
                weights = llama_cpp_permute(weights, config.num_attention_heads)
            elif cpp_name == "attn_k":
                weights = llama_cpp_permute(weights, config.num_key_value_heads)
            out[f"blk.{i}.{cpp_name}.weight"] = weights
    return out


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer: PreTrainedTokenizerFast, chat_template: str | None) -> None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda item: item[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    if chat_template:
        writer.add_chat_template(chat_template)


def write_llama_gguf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, path: Path,
                     chat_template: str | None = None) -> Path:
    """Write `model` (fp32 tensors) and `tokenizer` to `path`."""
    config = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("helix-test-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    _add_tokenizer(writer, tokenizer, chat_template)
    for name, weights in _tensors(model).items():
        writer.add_tensor(name, np.ascontiguousarray(weights, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
