"""Validation of attention inputs, shared by the reference and the kernels.

Every public entry point calls `check_attention_inputs` before any work, so a bad shape, dtype or device
mix is a clear ValueError/TypeError naming the problem, never a failure deep inside a kernel.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from nsa.config import NSAConfig

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclasses.dataclass(frozen=True)
class Sequence:
    """One sequence of a batch: tokens [start, end) of batch row `batch`, compressed entries [cmp_start, cmp_end)."""

    batch: int
    start: int
    end: int
    cmp_start: int
    cmp_end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """Sizes of a checked problem. `sequences` lists every sequence (B of them, or N with cu_seqlens)."""

    batch: int
    seqlen: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_v: int
    scale: float
    sequences: tuple[Sequence, ...]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def check_config(config) -> None:
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be an nsa.NSAConfig, got {type(config).__name__}")


def check_float_tensors(named: dict, ndims: dict) -> None:
    """Each named value is a torch.Tensor with ndims[name] dimensions and a floating dtype, and all share the
    dtype and device of the first (FlashAttention's rule: one dtype, one device)."""
    for name, x in named.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != ndims[name]:
            raise ValueError(f"{name} must have {ndims[name]} dimensions, got shape {tuple(x.shape)}")
    first_name, first = next(iter(named.items()))
    for name, x in named.items():
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor (float16, bfloat16, float32, float64), got {x.dtype}")
        if x.dtype != first.dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}: "
                            "all inputs must share one dtype")
        if x.device != first.device:
            raise ValueError(f"{name} is on {x.device} but {first_name} is on {first.device}: "
                             "all inputs must be on one device")


def expect_shape(name, x, shape, meaning) -> None:
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} ({meaning}), got {tuple(x.shape)}")


def check_keys_values(q, k, v) -> tuple[int, int]:
    """k [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] fit q [B, T, Hq, Dk] with Hq a multiple of Hkv; returns (Hkv, Dv)."""
    batch, seqlen, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[2], v.shape[3]
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query heads Hq={num_heads} must be a multiple of kv heads Hkv={num_kv_heads}")
    if head_dim < 1 or head_dim_v < 1:
        raise ValueError(f"head dims must be >= 1, got Dk={head_dim}, Dv={head_dim_v}")
    expect_shape("k", k, (batch, seqlen, num_kv_heads, head_dim), "B, T, Hkv, Dk")
    expect_shape("v", v, (batch, seqlen, num_kv_heads, head_dim_v), "B, T, Hkv, Dv")
    return num_kv_heads, head_dim_v


def split_sequences(config: NSAConfig, batch: int, seqlen: int, cu_seqlens=None) -> tuple[Sequence, ...]:
    """The sequences of a batch, and where each one's compressed entries lie (SPEC section 2, varlen)."""
    if cu_seqlens is None:
        tc = config.num_cmp_blocks(seqlen)
        return tuple(Sequence(b, 0, seqlen, 0, tc) for b in range(batch))
    bounds = cu_seqlens.tolist()
    out, cmp_start = [], 0
    for start, end in zip(bounds[:-1], bounds[1:]):
        tc = config.num_cmp_blocks(end - start)
        out.append(Sequence(0, start, end, cmp_start, cmp_start + tc))
        cmp_start += tc
    return tuple(out)


def check_cu_seqlens(cu_seqlens, batch: int, seqlen: int, device) -> None:
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of N+1 offsets, got dtype {cu_seqlens.dtype} "
                         f"and shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}")
    if batch != 1:
        raise ValueError(f"with cu_seqlens the batch size must be 1 (sequences packed along T), got B={batch}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != seqlen:
        raise ValueError(f"cu_seqlens must start at 0 and end at T={seqlen}, got {bounds[0]} ... {bounds[-1]}")
    if any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
        raise ValueError("cu_seqlens must be non-decreasing")


def check_attention_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config, *, scale=None,
                           cu_seqlens=None) -> AttentionShape:
    """Validate the inputs of `nsa_attention` (SPEC sections 1-2) and return their sizes.

    Raises TypeError for a wrong type or dtype and ValueError for a wrong shape, device or value.
    """
    check_config(config)
    named = dict(q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp, g_cmp=g_cmp, g_slc=g_slc, g_win=g_win)
    check_float_tensors(named, {name: 3 if name.startswith("g_") else 4 for name in named})
    batch, seqlen, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = check_keys_values(q, k, v)
    for name in ("g_cmp", "g_slc", "g_win"):
        expect_shape(name, named[name], (batch, seqlen, num_heads), "B, T, Hq")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch, seqlen, q.device)
    sequences = split_sequences(config, batch, seqlen, cu_seqlens)
    num_cmp = sequences[-1].cmp_end if cu_seqlens is not None else config.num_cmp_blocks(seqlen)
    check_compressed(k_cmp, v_cmp, config, batch, num_cmp, num_kv_heads, head_dim, head_dim_v)
    scale = resolve_scale(scale, head_dim)
    return AttentionShape(batch, seqlen, num_heads, num_kv_heads, head_dim, head_dim_v, scale, sequences)


def check_compressed(k_cmp, v_cmp, config: NSAConfig, batch: int, num_cmp: int, num_kv_heads: int, head_dim: int,
                     head_dim_v: int) -> None:
    """k_cmp [B, Tc, Hkv, Dk] and v_cmp [B, Tc, Hkv, Dv] hold the Tc compression blocks of the sequences."""
    expect_shape("k_cmp", k_cmp, (batch, num_cmp, num_kv_heads, head_dim),
                 f"B, Tc, Hkv, Dk with Tc={num_cmp} compression blocks for l={config.cmp_block}, d={config.cmp_stride}")
    expect_shape("v_cmp", v_cmp, (batch, num_cmp, num_kv_heads, head_dim_v), "B, Tc, Hkv, Dv")


def resolve_scale(scale, head_dim: int) -> float:
    """The softmax scale: Dk ** -0.5 unless given; must be a positive finite number."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    return float(scale)
