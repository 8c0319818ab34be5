"""A Llama/Qwen2-family causal LM whose attention runs over the paged KV pool.

The weights are the transformers model's own modules (embeddings, projections, MLPs, norms, rotary
embedding with its configured scaling, LM head); only attention is replaced, so numerics match
transformers' forward and every architecture detail (biases, GQA, tied embeddings) comes from the config.
The q/k/v projections and the MLP's gate/up projections each run as one fused GEMM: at decode sizes a
forward is mostly per-op overhead, and the originals become views of the fused weights (no extra memory,
transformers' own forward still works).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helix_serve.model.attention import AttentionMetadata, paged_attention
from helix_serve.model.int4 import Int4Linear, choose_dense_rows, int4_available, quantizable, use_dense_rows
from helix_serve.model.int8_head import MAX_ROWS as HEAD8_MAX_ROWS
from helix_serve.model.int8_head import MXInt8Head
from helix_serve.model.rope import RopeTable, rotate
from helix_serve.model.row_padding import pad_rows, widths_for

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


@dataclass(frozen=True, slots=True)
class ModelShape:
    """What the KV pool needs to know about a model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_model_len: int


@dataclass(slots=True)
class KVCache:
    """One model's preallocated block pool: [layers, num_blocks, block_size, kv_heads, head_dim] for K and V."""

    k: torch.Tensor
    v: torch.Tensor

    @classmethod
    def allocate(
        cls, shape: ModelShape, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ) -> KVCache:
        dims = (shape.num_layers, num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        return cls(k=torch.zeros(dims, dtype=dtype, device=device), v=torch.zeros(dims, dtype=dtype, device=device))

    @property
    def num_bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


def fuse_linears(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear for several that read the same input; the originals' weights become views of its rows."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    has_bias = [lin.bias is not None for lin in linears]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias), device="meta")  # no throwaway init
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if any(has_bias):
        biases = [lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features) for lin in linears]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight = nn.Parameter(fused.weight[start:end], requires_grad=False)
        if lin.bias is not None:
            lin.bias = nn.Parameter(fused.bias[start:end], requires_grad=False)
        start = end
    return fused


# Up to this many rows, CPU fp32 projections run weight-major (see `linear`); prefill-sized inputs use F.linear.
WEIGHT_MAJOR_MAX_ROWS = 256


def linear(x: torch.Tensor, layer: nn.Module, widths: Sequence[int] = ()) -> torch.Tensor:
    """`layer(x)`, computed as (W @ xᵀ)ᵀ for the few rows of decode and verify passes on CPU in fp32, over x padded
    to `widths[rows]` rows (row_padding.py: the width the GEMM tiles well, measured at load; () pads nothing).

    torch's CPU fp32 GEMM with a handful of rows costs far more than one row (it re-reads the weight per row
    block); with the weight as the left operand it streams the weight once. Measured on the 2-vCPU EPYC (AVX2):
    the 30 layers' projections of SmolLM2-135M (425 MB, cold) take 35–39 ms for one row through F.linear, 23–25
    ms for two rows weight-major, 29 ms for five. A 1024-token prefill is faster through F.linear (2.7 vs 3.1 s),
    hence the row limit. The output is a transposed view; the ops after it accept any strides.
    """
    if type(layer) is Int4Linear:  # its forward directly: nn.Module's call machinery is ~1.5 µs of ~25 at one row
        return layer.forward(x)
    rows = x.shape[0]
    if not isinstance(layer, nn.Linear) or x.device.type != "cpu" or x.dtype != torch.float32 \
            or rows > WEIGHT_MAJOR_MAX_ROWS:
        return layer(x)
    # xᵀ must be a transposed view of a row-major x: the previous projection's output is itself a transposed
    # view, and as the right operand that layout ran the GEMM at half speed (two rows: 155 vs 91 ms per forward).
    out = torch.mm(layer.weight, pad_rows(x.contiguous(), widths).t())[:, :rows].t()
    return out if layer.bias is None else out + layer.bias


@dataclass(frozen=True, slots=True)
class DecoderLayerWeights:
    """One decoder layer's pieces as plain attributes: nn.Module attribute lookups cost ~1 µs each, and a
    forward makes hundreds of them."""

    input_norm: torch.Tensor
    qkv: nn.Module  # nn.Linear, or Int4Linear with quantization int4
    o: nn.Module
    post_norm: torch.Tensor
    gate_up: nn.Module
    down: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]
    scale: float


class PagedCausalLM(nn.Module):
    """Forward pass over a flat varlen batch of tokens, reading and writing K/V in a `KVCache`."""

    def __init__(self, hf_model: nn.Module, quantization: str = "none", int4_dense_rows: int | str = 0):
        """int4_dense_rows (int4 only): passes of at least this many rows run the 4-bit projections as a bf16 GEMM
        of the same weights (model/int4.py); "auto": from where that is faster, measured now; 0: never."""
        super().__init__()
        config = hf_model.config
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture {config.model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if quantization not in ("none", "int4"):  # "auto" is resolved by the loader, which knows the file
            raise ValueError(f"unknown quantization {quantization!r}; expected none or int4")
        if quantization == "int4" and (reason := int4_available(hf_model.device)):
            raise ValueError(reason)
        self.quantization = quantization
        self.hf_model = hf_model  # owns the weights; kept for reference forwards and generate()
        inner = hf_model.model
        self.embed_tokens, self.layers, self.norm = inner.embed_tokens, inner.layers, inner.norm
        self.rotary_emb, self.lm_head = inner.rotary_emb, hf_model.lm_head
        self.rope = RopeTable(self.rotary_emb)
        # With int4 the head (and a tied embedding) becomes MXINT8, read at 8 bits for a few rows (int8_head.py).
        self.head8 = MXInt8Head(self.lm_head) if quantization == "int4" and quantizable(self.lm_head) \
            and self.lm_head.bias is None else None
        attn = self.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        qkv_proj = [fuse_linears([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
                    for layer in self.layers]
        gate_up_proj = [fuse_linears([layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in self.layers]
        self.qk_size = attn.q_proj.out_features + attn.k_proj.out_features
        self.hidden_size = config.hidden_size
        self.rms_eps = self.norm.variance_epsilon
        # With int4 the projections run from 4-bit copies; their loaded weights (transformers' reference
        # forward) stay as loaded.
        int4 = quantization == "int4"
        self.projections = project = nn.ModuleList(  # 4 per layer: qkv, o, gate_up, down
            Int4Linear(lin, dense=int4_dense_rows != 0) if int4 and quantizable(lin) else lin
            for layer, qkv, gate_up in zip(self.layers, qkv_proj, gate_up_proj)
            for lin in (qkv, layer.self_attn.o_proj, gate_up, layer.mlp.down_proj)
        )
        # The widths its fp32 weight-major GEMMs compute a pass at (row_padding.py): the projections', and the LM
        # head's (with int4 too, beyond the 8-bit kernel's few rows), timed on this layer shape.
        self.row_widths = widths_for([lin.weight.shape for lin in (qkv_proj[0], self.layers[0].self_attn.o_proj,
                                                                   gate_up_proj[0], self.layers[0].mlp.down_proj)],
                                     self.device, self.dtype)
        quantized = [p for p in self.projections if isinstance(p, Int4Linear)]
        if int4_dense_rows == "auto":
            int4_dense_rows = choose_dense_rows(quantized) if quantized else 0
        self.int4_dense_rows = use_dense_rows(quantized, int4_dense_rows) if quantized else 0  # what runs
        self.weights = [
            DecoderLayerWeights(
                input_norm=layer.input_layernorm.weight, qkv=project[4 * i], o=project[4 * i + 1],
                post_norm=layer.post_attention_layernorm.weight, gate_up=project[4 * i + 2],
                down=project[4 * i + 3], act=layer.mlp.act_fn, scale=layer.self_attn.scaling,
            )
            for i, layer in enumerate(self.layers)
        ]
        self.shape = ModelShape(
            num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=attn.head_dim,
            vocab_size=self.lm_head.out_features,
            max_model_len=config.max_position_embeddings,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def lm_head_format(self) -> str:
        """What the LM head's weights are: "mxint8" (int8_head.py) or the model's dtype."""
        return "mxint8" if self.head8 is not None else str(self.dtype).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def forward(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache) -> torch.Tensor:
        """[T] token ids → [T, hidden] final hidden states."""
        return self.forward_with_features(input_ids, meta, kv)[0]

    def forward_with_features(self, input_ids: torch.Tensor, meta: AttentionMetadata, kv: KVCache,
                              capture_layers: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[T] token ids → ([T, hidden] final hidden states, [T, len(capture_layers) * hidden] or None).

        Capture index i is the residual stream entering layer i (transformers' `hidden_states[i]`; i ==
        num_layers is the last layer's output before the final norm): what an EAGLE head reads.
        """
        if list(capture_layers) != sorted(set(capture_layers)) or any(not 0 <= i <= len(self.weights)
                                                                        for i in capture_layers):
            raise ValueError(f"capture_layers {capture_layers} must be distinct, ascending, in [0, {len(self.weights)}]")
        hidden = self.embed_tokens(input_ids)
        captured = []
        cos, sin = self.rope(meta.positions, hidden.dtype, meta.max_context)
        cos, sin = cos[:, None], sin[:, None]  # [T, 1, head_dim], broadcast over heads
        for i, w in enumerate(self.weights):
            if i in capture_layers:
                captured.append(hidden)
            hidden = hidden + self._attention(i, w, self._rms_norm(w.input_norm, hidden), cos, sin, meta, kv)
            x = self._rms_norm(w.post_norm, hidden)
            gate, up = linear(x, w.gate_up, self.row_widths).chunk(2, dim=-1)
            hidden = hidden + linear(w.act(gate) * up, w.down, self.row_widths)
        if len(self.weights) in capture_layers:
            captured.append(hidden)
        features = torch.cat(captured, dim=-1) if captured else None
        return self._rms_norm(self.norm.weight, hidden), features

    def _rms_norm(self, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # One fused op instead of the module's seven (upcast, pow, mean, rsqrt, mul, downcast, mul).
        return F.rms_norm(x, (self.hidden_size,), weight, self.rms_eps)

    def _attention(self, i: int, w: DecoderLayerWeights, x, cos, sin, meta: AttentionMetadata, kv: KVCache):
        num_tokens, head_dim = x.shape[0], self.shape.head_dim
        qkv = linear(x, w.qkv, self.row_widths)
        # RoPE rotates the query and key heads together: one set of ops for both.
        qk = qkv[:, : self.qk_size].view(num_tokens, -1, head_dim)
        qk = rotate(qk, cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        v = qkv[:, self.qk_size :].view(num_tokens, -1, head_dim)
        out = paged_attention(q, k, v, kv.k[i], kv.v[i], meta, w.scale)
        return linear(out.reshape(num_tokens, -1), w.o, self.row_widths)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head on the selected positions only, in fp32 for sampling."""
        if self.head8 is None:
            return linear(hidden, self.lm_head, self.row_widths).float()
        if hidden.shape[0] <= HEAD8_MAX_ROWS:
            return self.head8(hidden)
        # The same MXINT8 values as a GEMM in the model's dtype, on the bf16 activations the 8-bit kernel reads.
        return linear(hidden.to(torch.bfloat16).to(hidden.dtype), self.lm_head, self.row_widths).float()
