"""How many bytes a request's KV cache takes: the paper's ``S_kv(l)``.

Two specs live here:

- :class:`KVSpec`, exact and integer-valued, describes a real model's cache as the engines and the
  connector lay it out. Full-attention layers grow linearly with the prompt (block by block);
  linear-attention layers keep one fixed-size recurrent state per request. So
  ``S_kv(l) = state_bytes + bytes_per_token * l``.
- :class:`PaperKVSpec`, float-valued, is the same model fitted to Table 5 of the paper (the 1T
  hybrid on 8×H200). The policy and the simulator use it to reproduce the case study.

A host block (:attr:`KVSpec.block_bytes`) holds ``tokens_per_block`` tokens of every full-attention
layer, laid out as TensorRT-LLM's pool row: ``[num_full_layers, kv_factor, num_kv_heads *
tokens_per_block * head_dim]`` elements, heads outermost inside a row (HND).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

from trtllm_prfaas.errors import ConfigError, InvalidRequestError

__all__ = [
    "MIB",
    "TABLE5",
    "KVSpec",
    "PaperKVSpec",
    "Table5Row",
    "paper_1t_kv_spec",
]

MIB = 1 << 20
_VALID_DTYPE_BYTES = (1, 2, 4)
_VALID_KV_FACTORS = (1, 2)


def _check_int(name: str, value: object, minimum: int) -> None:
    """Raise ConfigError naming ``name`` unless ``value`` is an int ``>= minimum`` (not bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"KVSpec.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ConfigError(f"KVSpec.{name} must be >= {minimum}, got {value}")


def _check_num_tokens(num_tokens: int) -> None:
    if num_tokens < 0:
        raise InvalidRequestError(f"num_tokens must be >= 0, got {num_tokens}")


@dataclass(frozen=True)
class KVSpec:
    """The KV cache geometry of one model on one tensor-parallel rank.

    ``num_kv_heads`` is the per-rank head count (TensorRT-LLM shards heads across TP ranks).
    ``kv_factor`` is 2 for K and V, 1 for MLA's joint latent. ``state_bytes`` is the size of all
    linear-attention recurrent states of one request, summed over layers (0 for a dense model).
    """

    num_full_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    dtype_bytes: int
    kv_factor: int = 2
    state_bytes: int = 0

    def __post_init__(self) -> None:
        for name in ("num_full_layers", "num_kv_heads", "head_dim", "tokens_per_block"):
            _check_int(name, getattr(self, name), 1)
        _check_int("dtype_bytes", self.dtype_bytes, 1)
        if self.dtype_bytes not in _VALID_DTYPE_BYTES:
            raise ConfigError(f"KVSpec.dtype_bytes must be one of {_VALID_DTYPE_BYTES}")
        _check_int("kv_factor", self.kv_factor, 1)
        if self.kv_factor not in _VALID_KV_FACTORS:
            raise ConfigError(
                f"KVSpec.kv_factor must be 1 (MLA) or 2 (K and V), got {self.kv_factor}"
            )
        _check_int("state_bytes", self.state_bytes, 0)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token adds across all full-attention layers."""
        return (
            self.num_full_layers
            * self.kv_factor
            * self.num_kv_heads
            * self.head_dim
            * self.dtype_bytes
        )

    @property
    def layer_block_bytes(self) -> int:
        """Bytes of one block of ONE layer: what ``save_kv_layer`` ships per block per layer."""
        return (
            self.kv_factor
            * self.num_kv_heads
            * self.tokens_per_block
            * self.head_dim
            * self.dtype_bytes
        )

    @property
    def block_bytes(self) -> int:
        """Bytes of one host block: ``tokens_per_block`` tokens across all full layers."""
        return self.bytes_per_token * self.tokens_per_block

    @property
    def block_shape(self) -> tuple[int, int, int]:
        """Element shape of one block, TensorRT-LLM's pool row: (layers, kv_factor, H*T*D)."""
        row = self.num_kv_heads * self.tokens_per_block * self.head_dim
        return (self.num_full_layers, self.kv_factor, row)

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold ``num_tokens`` tokens, the last one possibly partial."""
        _check_num_tokens(num_tokens)
        return -(-num_tokens // self.tokens_per_block)

    def num_full_blocks(self, num_tokens: int) -> int:
        """Full blocks in ``num_tokens`` tokens: the ones that can become prefix-cache blocks."""
        _check_num_tokens(num_tokens)
        return num_tokens // self.tokens_per_block

    def s_kv(self, num_tokens: int) -> int:
        """The paper's ``S_kv(l)`` in bytes: recurrent states plus ``l`` tokens of full-layer KV."""
        _check_num_tokens(num_tokens)
        return self.state_bytes + self.bytes_per_token * num_tokens


@dataclass(frozen=True)
class Table5Row:
    """One row of the paper's Table 5 (1T hybrid model, prefill on 8×H200)."""

    num_tokens: int
    kv_mib: float
    prefill_latency_s: float
    kv_gbps: float


TABLE5: tuple[Table5Row, ...] = (
    Table5Row(1024, 190.8, 0.44, 3.61),
    Table5Row(8 * 1024, 308.9, 0.72, 3.59),
    Table5Row(32 * 1024, 701.3, 1.84, 3.19),
    Table5Row(128 * 1024, 2316.3, 7.40, 2.62),
)


@dataclass(frozen=True)
class PaperKVSpec:
    """A float-valued ``S_kv`` and ``T_prefill`` model, for the policy and the simulator.

    ``s_kv_bytes(l) = fixed_bytes + bytes_per_token * l``. ``prefill_latency_s`` interpolates
    ``latency_points`` (sorted ``(num_tokens, seconds)``) piecewise linearly and extrapolates the
    end segments linearly. Pure functions of their argument; no state.
    """

    fixed_bytes: float
    bytes_per_token: float
    latency_points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if self.fixed_bytes < 0 or self.bytes_per_token <= 0:
            raise ConfigError("PaperKVSpec.fixed_bytes must be >= 0 and bytes_per_token > 0")
        xs = [x for x, _ in self.latency_points]
        if len(xs) < 2 or any(b <= a for a, b in pairwise(xs)):
            raise ConfigError("PaperKVSpec.latency_points needs >= 2 points, strictly increasing")

    def s_kv_bytes(self, l: float) -> float:  # noqa: E741 - the paper's symbol
        """KV bytes (recurrent states + full-layer KV) of an ``l``-token prefill."""
        _check_length(l)
        return self.fixed_bytes + self.bytes_per_token * l

    def prefill_latency_s(self, l: float) -> float:  # noqa: E741
        """Seconds to prefill ``l`` tokens on one instance, interpolated from the points."""
        _check_length(l)
        pts = self.latency_points
        i = 1
        while i < len(pts) - 1 and l > pts[i][0]:
            i += 1
        (x0, y0), (x1, y1) = pts[i - 1], pts[i]
        return y0 + (y1 - y0) * (l - x0) / (x1 - x0)

    def kv_throughput_gbps(self, l: float) -> float:  # noqa: E741
        """The paper's ``Φ_kv(l) = S_kv(l) / T_prefill(l)`` in Gbit/s (1e9 bit/s)."""
        return self.s_kv_bytes(l) * 8 / 1e9 / self.prefill_latency_s(l)


def _check_length(l: float) -> None:  # noqa: E741
    if l < 0:
        raise InvalidRequestError(f"prefill length must be >= 0, got {l}")


def _fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Ordinary least squares ``y = a + b*x``; returns ``(a, b)``."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sxy / sxx
    return mean_y - slope * mean_x, slope


def paper_1t_kv_spec(rows: Sequence[Table5Row] = TABLE5) -> PaperKVSpec:
    """The paper's 1T hybrid on 8×H200: ``S_kv`` fitted to Table 5, latency interpolated.

    The fit (bytes, 1K = 1024 tokens) gives about 172 MiB of fixed state plus about 16.7 KiB per
    token, and reproduces each Table 5 KV size within about 1.1%.
    """
    xs = [float(r.num_tokens) for r in rows]
    fixed, per_token = _fit_line(xs, [r.kv_mib * MIB for r in rows])
    points = tuple((float(r.num_tokens), r.prefill_latency_s) for r in rows)
    return PaperKVSpec(fixed_bytes=fixed, bytes_per_token=per_token, latency_points=points)
