"""The reference model: a small decoder-only hybrid-attention transformer in PyTorch on CPU.

Kimi-Linear style: most layers are gated linear attention (a fixed-size recurrent state per
request), every few layers is full GQA attention with RoPE whose KV lives in ONE pool tensor of
TensorRT-LLM's layout::

    pool: (num_blocks, num_full_layers, 2, num_kv_heads * tokens_per_block * head_dim)
    inside a row: heads, tokens, head_dim (HND)

and the linear layers' states live apart from it::

    states: (num_state_slots, num_linear_layers, linear_num_heads, head_dim, head_dim)   float32

Weights come from the seed (no downloads) or a safetensors file. ``HybridModel.forward`` runs
one engine iteration over a list of ``SequenceChunk`` (prefill chunks and decode tokens together)
and calls the connector's layer hooks around every decoder layer. All arithmetic goes through
``kernels`` so a token's bits do not depend on how the batch was formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch
from torch import nn

from trtllm_prfaas.engines import kernels
from trtllm_prfaas.engines.batch import ForwardBatch, SequenceChunk
from trtllm_prfaas.engines.tokenizer import EOS_ID, VOCAB_SIZE
from trtllm_prfaas.errors import ConfigError
from trtllm_prfaas.kv.spec import KVSpec

__all__ = ["HybridModel", "LayerKind", "ModelConfig", "SequenceChunk"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LayerKind(Enum):
    LINEAR = "L"
    FULL = "F"


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the reference model. ``layer_pattern`` repeats over the layers ('L'/'F')."""

    num_layers: int = 8
    layer_pattern: str = "LLLF"  # 3 linear : 1 full, as in Kimi Linear
    hidden_size: int = 128
    num_heads: int = 2  # full attention: query heads
    num_kv_heads: int = 1  # full attention: KV heads (GQA group of 2)
    head_dim: int = 32
    linear_num_heads: int = 4  # linear attention: heads, state (head_dim x head_dim) each
    mlp_hidden_size: int = 256
    vocab_size: int = VOCAB_SIZE  # a served tokenizer's, to run the stack over it
    eos_id: int = EOS_ID  # generation stops at this id (TensorRT-LLM: SamplingParams.end_id)
    max_seq_len: int = 32768
    tokens_per_block: int = 32
    attention_tile_blocks: int = 8  # full attention reads keys 8 blocks (256 tokens) at a time
    dtype: str = "float32"
    seed: int = 0
    rope_theta: float = 10000.0
    model_id: str = "prfaas-reference-hybrid"
    # Scales the init of full attention's q/k/v/o weights. At 1.0 a random model attends almost
    # uniformly over long contexts, so its tokens barely depend on the full-attention KV; the
    # test preset raises it so that a misplaced KV block changes tokens, not only bytes.
    attention_init_gain: float = 1.0

    def __post_init__(self) -> None:
        checks = {
            "num_layers": self.num_layers >= 1,
            "layer_pattern": bool(self.layer_pattern) and set(self.layer_pattern) <= {"L", "F"},
            "num_kv_heads": self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,
            "head_dim": self.head_dim >= 2 and self.head_dim % 2 == 0,
            "hidden_size": self.hidden_size >= 1,
            "linear_num_heads": self.linear_num_heads >= 1,
            "vocab_size": self.vocab_size >= VOCAB_SIZE,
            "eos_id": 0 <= self.eos_id < self.vocab_size,
            "max_seq_len": self.max_seq_len >= 2,
            "tokens_per_block": self.tokens_per_block >= 1,
            "attention_tile_blocks": self.attention_tile_blocks >= 1,
            "dtype": self.dtype in _DTYPES,
            "attention_init_gain": self.attention_init_gain > 0,
        }
        for name, ok in checks.items():
            if not ok:
                raise ConfigError(f"ModelConfig.{name} is invalid: {getattr(self, name)!r}")

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        pattern = self.layer_pattern
        return tuple(LayerKind(pattern[i % len(pattern)]) for i in range(self.num_layers))

    @property
    def num_full_layers(self) -> int:
        return sum(kind is LayerKind.FULL for kind in self.layer_kinds)

    @property
    def num_linear_layers(self) -> int:
        return self.num_layers - self.num_full_layers

    @property
    def state_shape(self) -> tuple[int, int, int, int]:
        """Recurrent state of one request: (num_linear_layers, heads, d_k, d_v)."""
        return (self.num_linear_layers, self.linear_num_heads, self.head_dim, self.head_dim)

    @property
    def kv_spec(self) -> KVSpec:
        """Byte sizes of this model's KV (pool rows) and recurrent states (float32)."""
        dtype_bytes = torch.empty((), dtype=self.torch_dtype).element_size()
        state_bytes = math.prod(self.state_shape) * 4
        return KVSpec(
            self.num_full_layers,
            self.num_kv_heads,
            self.head_dim,
            self.tokens_per_block,
            dtype_bytes,
            2,
            state_bytes,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def block_row_elems(self) -> int:
        """Elements in one (block, layer, K-or-V) row of the pool."""
        return self.num_kv_heads * self.tokens_per_block * self.head_dim


LayerHook = Callable[[int], None]


def _no_hook(layer_idx: int) -> None:
    return None


class FullAttention(nn.Module):
    """GQA with RoPE; K and V are written to, and read from, the paged pool."""

    def __init__(self, cfg: ModelConfig, pool_layer: int) -> None:
        super().__init__()
        self.cfg, self.pool_layer = cfg, pool_layer
        self.wq = nn.Parameter(torch.empty(cfg.num_heads * cfg.head_dim, cfg.hidden_size))
        self.wk = nn.Parameter(torch.empty(cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size))
        self.wv = nn.Parameter(torch.empty(cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size))
        self.wo = nn.Parameter(torch.empty(cfg.hidden_size, cfg.num_heads * cfg.head_dim))

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        cfg = self.cfg
        q = kernels.linear(x, self.wq).view(-1, cfg.num_heads, cfg.head_dim)
        k = kernels.linear(x, self.wk).view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = kernels.linear(x, self.wv).view(-1, cfg.num_kv_heads, cfg.head_dim)
        q = kernels.apply_rope(q, batch.cos, batch.sin)
        k = kernels.apply_rope(k, batch.cos, batch.sin)
        key_cache, value_cache = batch.kv_views(self.pool_layer)
        key_cache[batch.slot_blocks, :, batch.slot_offsets] = k  # (N, KVH, D) into the pool
        value_cache[batch.slot_blocks, :, batch.slot_offsets] = v
        out = torch.empty_like(q)
        for group in batch.attention_groups:  # (row indices, chunk indices) sharing one call
            rows, chunks = group
            qg = q[rows].view(len(chunks), -1, cfg.num_heads, cfg.head_dim)
            pos = torch.stack([batch.chunks[c].positions for c in chunks])
            tables = batch.block_tables(chunks)
            attn = kernels.paged_attention(
                qg, pos, key_cache, value_cache, tables, cfg.attention_tile_blocks
            )
            out[rows] = attn.reshape(-1, cfg.num_heads, cfg.head_dim)
        return kernels.linear(out.view(x.shape[0], -1), self.wo)


class LinearAttention(nn.Module):
    """Gated linear attention with a scalar decay per head; state (H, d_k, d_v) per request."""

    def __init__(self, cfg: ModelConfig, state_layer: int) -> None:
        super().__init__()
        self.cfg, self.state_layer = cfg, state_layer
        inner = cfg.linear_num_heads * cfg.head_dim
        self.wq = nn.Parameter(torch.empty(inner, cfg.hidden_size))
        self.wk = nn.Parameter(torch.empty(inner, cfg.hidden_size))
        self.wv = nn.Parameter(torch.empty(inner, cfg.hidden_size))
        self.wg = nn.Parameter(torch.empty(cfg.linear_num_heads, cfg.hidden_size))
        self.g_bias = nn.Parameter(torch.empty(cfg.linear_num_heads))
        self.wo = nn.Parameter(torch.empty(cfg.hidden_size, inner))

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        cfg = self.cfg
        heads, dim, seg = cfg.linear_num_heads, cfg.head_dim, batch.segments
        # Recurrences run in float32 whatever the model dtype (as Kimi Linear keeps its states).
        q = kernels.linear(x, self.wq).float().view(-1, heads, dim) * dim**-0.5
        k = kernels.linear(x, self.wk).float().view(-1, heads, dim) * dim**-0.5
        v = kernels.linear(x, self.wv).float().view(-1, heads, dim)
        log_decay = -nn.functional.softplus(
            kernels.linear(x, self.wg).float() + self.g_bias.float()
        )
        states = batch.states[:, self.state_layer]
        out, final = kernels.linear_attention_segments(
            seg.scatter(q),
            seg.scatter(k),
            seg.scatter(v),
            seg.scatter(log_decay[..., None])[..., 0],
            states[seg.first_slots],
            seg.chain,
        )
        states[seg.last_slots] = final[seg.last_segment]
        y = seg.gather(out).reshape(x.shape[0], heads * dim).to(x.dtype)
        return kernels.linear(y, self.wo)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mixer: nn.Module) -> None:
        super().__init__()
        self.norm1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.norm2 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.mixer = mixer
        self.w_up = nn.Parameter(torch.empty(2 * cfg.mlp_hidden_size, cfg.hidden_size))
        self.w_down = nn.Parameter(torch.empty(cfg.hidden_size, cfg.mlp_hidden_size))

    def forward(self, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        x = x + self.mixer(kernels.rms_norm(x, self.norm1), batch)
        gate, up = kernels.linear(kernels.rms_norm(x, self.norm2), self.w_up).chunk(2, dim=-1)
        return x + kernels.linear(nn.functional.silu(gate) * up, self.w_down)  # SwiGLU


class HybridModel(nn.Module):
    """Embedding, hybrid blocks, final norm, LM head. Stateless: KV and states are passed in."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        layers: list[nn.Module] = []
        full_index = linear_index = 0
        for kind in cfg.layer_kinds:
            if kind is LayerKind.FULL:
                layers.append(Block(cfg, FullAttention(cfg, full_index)))
                full_index += 1
            else:
                layers.append(Block(cfg, LinearAttention(cfg, linear_index)))
                linear_index += 1
        self.layers = nn.ModuleList(layers)
        self.norm_f = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lm_head = nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size))
        inv_freq = 1.0 / cfg.rope_theta ** (
            torch.arange(0, cfg.head_dim, 2).double() / cfg.head_dim
        )
        angles = torch.outer(torch.arange(cfg.max_seq_len).double(), inv_freq)
        self.rope_cos = angles.cos().to(cfg.torch_dtype)  # (max_seq_len, head_dim/2)
        self.rope_sin = angles.sin().to(cfg.torch_dtype)
        self.init_weights()
        self.to(cfg.torch_dtype)
        self.requires_grad_(False)

    def init_weights(self) -> None:
        """Deterministic from ``cfg.seed``: same seed, same bits, on every machine."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        for name, param in sorted(self.named_parameters()):
            if "norm" in name:
                param.data.fill_(1.0)
            elif name.endswith("g_bias"):
                # softplus(-3..-5) ~ 0.05..0.007 per token: decays spanning ~20 to ~150 tokens.
                param.data.copy_(-torch.linspace(3.0, 5.0, param.numel()))
            else:
                fan_in = param.shape[-1]
                std = 1.0 if name == "embed" else 1.0 / math.sqrt(fan_in)
                param.data.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float32) * std)
        for module in self.modules():
            if isinstance(module, FullAttention) and self.cfg.attention_init_gain != 1.0:
                for weight in (module.wq, module.wk, module.wv, module.wo):
                    weight.data.mul_(self.cfg.attention_init_gain)

    def load_safetensors(self, path: Path) -> None:
        """Load weights saved by ``save_safetensors`` (names and shapes must match)."""
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        missing = {n for n, _ in self.named_parameters()} - set(tensors)
        if missing:
            raise ConfigError(f"weights file {path} lacks parameters: {sorted(missing)[:5]}")
        for name, param in self.named_parameters():
            if tuple(tensors[name].shape) != tuple(param.shape):
                raise ConfigError(f"weights file {path}: {name} has shape {tensors[name].shape}")
            param.data.copy_(tensors[name].to(param.dtype))

    def save_safetensors(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({n: p.detach().contiguous() for n, p in self.named_parameters()}, str(path))

    @torch.inference_mode()
    def forward(  # type: ignore[override]
        self,
        chunks: list[SequenceChunk],
        pool: torch.Tensor,
        states: torch.Tensor,
        before_layer: LayerHook = _no_hook,
        after_layer: LayerHook = _no_hook,
    ) -> torch.Tensor:
        """One iteration: compute ``chunks``, update pool and states, return the logits of each
        chunk's last token, shape (len(chunks), vocab). The hooks get the decoder layer index."""
        batch = ForwardBatch(self.cfg, chunks, pool, states, self.rope_cos, self.rope_sin)
        x = self.embed[batch.token_ids]  # (N, C)
        for layer_idx, block in enumerate(self.layers):
            before_layer(layer_idx)
            x = block(x, batch)
            after_layer(layer_idx)
        last = kernels.rms_norm(x[batch.last_rows], self.norm_f)
        return kernels.linear(last, self.lm_head).float()
