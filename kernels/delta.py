"""delta = rowsum(dO * O): the softmax backward's correction term, shared by the branches' backward passes.

For an attention output o = P V with P = softmax(S), dS = P * (dP - delta) with delta[h, t] = sum_e dO[t, h, e] *
O[t, h, e]. Every branch whose dk/dv kernel cannot compute delta itself (it walks keys, not query rows) reads it
from here: one pass over O and dO, memory-bound (at 64k, 64 heads, D=128, bf16: 2 GB read in 0.5 ms on an H200).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nsa.kernels.runtime import cdiv, head_dim_block, new_output, row_mask

# Elements of O per program: 64 rows (token, head) of 128 values at the paper's head dim.
ROW_ELEMENTS = 8192


@triton.jit
def attention_delta_kernel(O, DO, DELTA, num_rows, num_heads, stride_ot, stride_oh, stride_dot, stride_doh,
                           stride_deltah, HEAD_DIM_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta[h, t] = sum_e o[t, h, e] * do[t, h, e] in fp32; rows r = t * Hq + h, grid (rows / BLOCK_R,)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_DV)
    t = (offs_r // num_heads).to(tl.int64)
    h = offs_r % num_heads
    mask = row_mask(offs_r < num_rows, offs_d, HEAD_DIM_V, BLOCK_DV)
    o = tl.load(O + t[:, None] * stride_ot + h[:, None] * stride_oh + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + t[:, None] * stride_dot + h[:, None] * stride_doh + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + h * stride_deltah + t, delta, mask=offs_r < num_rows)


def attention_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """delta [Hq, total] float32 of o, do [total, Hq, Dv] (head dims contiguous, any float dtype)."""
    total, num_heads, head_dim_v = o.shape
    delta = new_output((num_heads, total), dtype=torch.float32, device=o.device)
    if total * num_heads == 0:
        return delta
    block_dv = head_dim_block(head_dim_v)
    block_r = max(1, min(128, ROW_ELEMENTS // block_dv))
    attention_delta_kernel[(cdiv(total * num_heads, block_r),)](
        o, do, delta, total * num_heads, num_heads, o.stride(0), o.stride(1), do.stride(0), do.stride(1),
        delta.stride(0), HEAD_DIM_V=head_dim_v, BLOCK_R=block_r, BLOCK_DV=block_dv)
    return delta
