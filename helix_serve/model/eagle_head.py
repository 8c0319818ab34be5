"""An EAGLE-3-style draft head that reads the target's own hidden states.

One Llama decoder layer. `fc` fuses three of the target's residual streams (low, middle, high layer:
`PagedCausalLM.forward_with_features`) into one feature; entry t of the head pairs the feature of position t
with the embedding of token t+1 (the target's own embedding, not stored here) and outputs a stand-in for
the feature of position t+1, whose LM head row predicts token t+2. Chained drafting feeds that output back
as the next entry's feature (it skips `fc`: it already has the fused width). The LM head covers a
sub-vocabulary (`vocab_ids`: row i is target id vocab_ids[i], model/vocab_map.py).

Attention reads the 2H concatenation [norm(embedding), norm(feature)] as EAGLE-3 does rather than a 2H → H
projection first: q/k/v then see the token and the feature through separate weights at the cost of a wider
qkv GEMM (1.1M parameters instead of 0.66M + another 0.66M projection), and the residual stream stays the
feature alone, so the output is directly the next feature.

Two attention paths share every weight (`qkv_rope`, `finish`): over the paged pool (AttentionMetadata, like
the target) for the engine, and a dense one for training, where the K/V of a training-time-test step sit
beside those of the steps before it (distill/eagle_trainer.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from helix_serve.model.attention import AttentionMetadata, paged_attention
from helix_serve.model.int4 import Int4Linear, quantizable, use_dense_rows
from helix_serve.model.paged_llm import KVCache, ModelShape, linear
from helix_serve.model.rope import RopeTable, rotate
from helix_serve.model.row_padding import widths_for

CONFIG_FILE = "eagle_config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True, slots=True)
class EagleConfig:
    """Everything needed to rebuild a head; saved as JSON beside its weights."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_eps: float
    rope_parameters: dict
    max_position_embeddings: int
    capture_layers: tuple[int, ...]  # the target's residual streams fused by fc (inputs of these layers)
    vocab_ids: tuple[int, ...]  # sub-vocabulary: LM head row i is target token id vocab_ids[i]
    target_vocab_size: int

    @classmethod
    def for_target(cls, config, capture_layers: tuple[int, ...], vocab_ids: list[int]) -> EagleConfig:
        """A head shaped like one decoder layer of the target with `config` (a transformers config)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.hidden_size, config.num_attention_heads, config.num_key_value_heads, head_dim,
                   config.intermediate_size, config.rms_norm_eps, dict(config.rope_parameters),
                   config.max_position_embeddings, tuple(capture_layers), tuple(vocab_ids), config.vocab_size)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> EagleConfig:
        raw = json.loads(text)
        return cls(**{**raw, "capture_layers": tuple(raw["capture_layers"]), "vocab_ids": tuple(raw["vocab_ids"])})

    def llama_config(self) -> LlamaConfig:
        """For transformers' rotary embedding (same RoPE, scaling included, as the target)."""
        return LlamaConfig(hidden_size=self.hidden_size, num_attention_heads=self.num_heads,
                           num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim,
                           max_position_embeddings=self.max_position_embeddings,
                           rope_parameters=dict(self.rope_parameters))


class EagleHead(nn.Module):
    """fc → one decoder layer over [embedding, feature] → norm → sub-vocabulary LM head."""

    def __init__(self, config: EagleConfig, embed_tokens: nn.Embedding):
        super().__init__()
        c = config
        self.config = c
        self.embed_tokens = [embed_tokens]  # a list: the target's, shared, so neither trained nor saved here
        hidden, num_q, num_kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        self.fc = nn.Linear(len(c.capture_layers) * hidden, hidden, bias=False)
        self.embed_norm = nn.Parameter(torch.ones(hidden))
        self.feature_norm = nn.Parameter(torch.ones(hidden))
        self.qkv = nn.Linear(2 * hidden, num_q + 2 * num_kv, bias=False)
        self.o = nn.Linear(num_q, hidden, bias=False)
        self.post_norm = nn.Parameter(torch.ones(hidden))
        self.gate_up = nn.Linear(hidden, 2 * c.intermediate_size, bias=False)
        self.down = nn.Linear(c.intermediate_size, hidden, bias=False)
        self.final_norm = nn.Parameter(torch.ones(hidden))
        self.lm_head = nn.Linear(hidden, len(c.vocab_ids), bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(c.llama_config())
        self.rope = RopeTable(self.rotary_emb)
        self.scale = c.head_dim ** -0.5
        self.register_buffer("row_to_target", torch.tensor(c.vocab_ids), persistent=False)
        self.row_widths: tuple[int, ...] = ()  # the widths its engine passes compute at (`load`, row_padding.py)

    @property
    def shape(self) -> ModelShape:
        """What its KV pool needs: one layer of the target's kv heads."""
        c = self.config
        return ModelShape(1, c.num_kv_heads, c.head_dim, len(c.vocab_ids), c.max_position_embeddings)

    @property
    def dtype(self) -> torch.dtype:
        """Its activations' dtype (a norm weight's: the projections may be 4-bit codes, quantize_int4)."""
        return self.final_norm.dtype

    @property
    def device(self) -> torch.device:
        return self.final_norm.device

    def init_from_target(self, target_lm_head: torch.Tensor, target_norm: torch.Tensor) -> None:
        """Start the LM head and final norm from the target's rows: the output feature then only has to
        look like the target's own, which the top layer already does."""
        with torch.no_grad():
            self.lm_head.weight.copy_(target_lm_head[self.row_to_target.to(target_lm_head.device)])
            self.final_norm.copy_(target_norm)

    def _norm(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.config.hidden_size,), weight, self.config.rms_eps)

    def fuse(self, target_features: torch.Tensor) -> torch.Tensor:
        """[..., 3H] captured target states → [..., H] the head's feature input."""
        return self._linear(target_features.to(self.dtype), self.fc)

    def qkv_rope(self, features: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor,
                 bound: int | None = None):
        """[..., H] features, [...] target token ids, [...] positions (all below `bound`, when given) → rotated q
        [..., heads, D], k, v [..., kv_heads, D]."""
        c = self.config
        embed = self.embed_tokens[0](token_ids).to(self.dtype)
        x = torch.cat((self._norm(self.embed_norm, embed), self._norm(self.feature_norm, features)), dim=-1)
        qkv = self._linear(x, self.qkv).unflatten(-1, (-1, c.head_dim))  # [..., heads + 2 * kv_heads, D]
        cos, sin = self.rope(positions, x.dtype, bound)
        qk = rotate(qkv[..., : c.num_heads + c.num_kv_heads, :], cos.unsqueeze(-2), sin.unsqueeze(-2))  # together
        return qk[..., : c.num_heads, :], qk[..., c.num_heads :, :], qkv[..., c.num_heads + c.num_kv_heads :, :]

    def finish(self, features: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """The layer after attention: [..., heads * D] attention output → [..., H] output feature (pre-norm)."""
        hidden = features + self._linear(attn_out, self.o)
        gate, up = self._linear(self._norm(self.post_norm, hidden), self.gate_up).chunk(2, dim=-1)
        return hidden + self._linear(F.silu(gate) * up, self.down)

    def forward(self, features: torch.Tensor, token_ids: torch.Tensor, meta: AttentionMetadata,
                kv: KVCache) -> torch.Tensor:
        """One paged step: [T, H] features, [T] target ids of the next tokens → [T, H] output features."""
        q, k, v = self.qkv_rope(features, token_ids, meta.positions, meta.max_context)
        out = paged_attention(q, k, v, kv.k[0], kv.v[0], meta, self.scale)
        return self.finish(features, out.flatten(-2))

    def quantize_int4(self, dense_rows: int = 0) -> None:
        """Its projections and LM head as 4-bit weights (model/int4.py), as the target's run under `quantization:
        int4`: a drafting pass then streams a quarter of the bytes; passes of at least `dense_rows` rows (when
        > 0) run a bf16 copy of them, as the target's do. Its q is whatever this head computes, so rejection
        sampling stays exact; only how often it is right may move."""
        quantized = []
        for name in ("fc", "qkv", "o", "gate_up", "down", "lm_head"):
            if quantizable(layer := getattr(self, name)):
                quantized.append(Int4Linear(layer, dense=dense_rows > 0))
                setattr(self, name, quantized[-1])
        use_dense_rows(quantized, dense_rows)

    def _linear(self, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        """paged_llm's decode-friendly `linear` for the engine's [T, in] rows; plain F.linear for training batches."""
        return linear(x, layer, self.row_widths) if x.dim() == 2 else layer(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, H] → [N, V_sub] fp32 logits over the sub-vocabulary."""
        return self._linear(self._norm(self.final_norm, hidden), self.lm_head).float()

    def save(self, out_dir: Path) -> None:
        """bf16 safetensors + the JSON config (the target's embedding is not part of the head)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in self.state_dict().items()
                   if not k.startswith("rotary_emb.")}
        save_file(tensors, out_dir / WEIGHTS_FILE, metadata={"format": "helix-eagle"})
        (out_dir / CONFIG_FILE).write_text(self.config.to_json())

    @classmethod
    def load(cls, path: Path, embed_tokens: nn.Embedding, dtype: torch.dtype | None = None) -> EagleHead:
        """A saved head on `embed_tokens`' device, in `dtype` (default: the embedding's)."""
        path = Path(path)
        head = cls(EagleConfig.from_json((path / CONFIG_FILE).read_text()), embed_tokens)
        state = load_file(path / WEIGHTS_FILE)
        missing, unexpected = head.load_state_dict(state, strict=False)
        if unexpected or any(not k.startswith("rotary_emb.") for k in missing):
            raise ValueError(f"{path}: not an EAGLE head of this shape (missing {missing}, unexpected {unexpected})")
        head.to(device=embed_tokens.weight.device, dtype=dtype or embed_tokens.weight.dtype)
        head.rotary_emb = LlamaRotaryEmbedding(head.config.llama_config()).to(head.device)  # inv_freq stays fp32
        head.rope = RopeTable(head.rotary_emb)
        shapes = [getattr(head, name).weight.shape for name in ("fc", "qkv", "o", "gate_up", "down")]
        head.row_widths = widths_for(shapes, head.device, head.dtype)
        return head.eval()


def is_eagle_head(path: str | Path) -> bool:
    """Whether `path` is a directory holding a saved head."""
    return (Path(path) / CONFIG_FILE).is_file()
