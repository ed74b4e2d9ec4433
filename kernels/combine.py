"""Gated combination of the three branches (SPEC 1.7) in Triton: forward and backward.

o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, gates [R] and branch outputs [R, Dv] with R = tokens x heads
rows (a [B, T, Hq, Dv] tensor viewed as B*T*Hq rows). fp32 arithmetic, results in the inputs' dtype.
Backward in one pass: do_x = g_x * do and dg_x = sum_d do * o_x for the three branches, and on request each
branch's softmax-backward term delta_x = rowsum(do_x * o_x), which spares every branch's backward a pass over o_x
and do_x of its own.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa.inputs import check_float_tensors, expect_shape
from nsa.kernels.runtime import (cdiv, check_kernel_inputs, check_launch_params, compute_dtype, new_output,
                                 next_power_of_2)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def combine_fwd_kernel(O_CMP, O_SLC, O_WIN, G_CMP, G_SLC, G_WIN, O, num_rows,
                       HEAD_DIM_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Grid (row tiles, column tiles); all tensors contiguous, rows of HEAD_DIM_V elements."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_valid = offs_r < num_rows
    mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM_V)
    offs = offs_r.to(tl.int64)[:, None] * HEAD_DIM_V + offs_d[None, :]
    g_cmp = tl.load(G_CMP + offs_r, mask=row_valid, other=0.0).to(tl.float32)
    g_slc = tl.load(G_SLC + offs_r, mask=row_valid, other=0.0).to(tl.float32)
    g_win = tl.load(G_WIN + offs_r, mask=row_valid, other=0.0).to(tl.float32)
    o = g_cmp[:, None] * tl.load(O_CMP + offs, mask=mask, other=0.0).to(tl.float32)
    o += g_slc[:, None] * tl.load(O_SLC + offs, mask=mask, other=0.0).to(tl.float32)
    o += g_win[:, None] * tl.load(O_WIN + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(O + offs, o.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _combine_bwd_branch(do, o_ptrs, g, do_ptrs, mask):
    """Store do_x = g * do for one branch; return this column tile's rowsum(do * o_x) and rowsum(do_x * o_x) in
    fp32, do_x rounded as stored: the delta then matches the dO_x that the branch's kernels multiply with (g_x *
    dg_x, unrounded, gave 10-25% larger errors in dq and dk_cmp against float64 at 2k-4k tokens in bf16, H200)."""
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    do_x = (g[:, None] * do).to(do_ptrs.dtype.element_ty)
    tl.store(do_ptrs, do_x, mask=mask)
    return tl.sum(do * o, 1), tl.sum(do_x.to(tl.float32) * o, 1)


@triton.jit
def _store_delta(DELTA, delta, offs_r, num_heads, stride_delta, row_valid):
    """delta [Hq, tokens] (head-major, as the branches' lse) of rows r = token * Hq + head."""
    tl.store(DELTA + (offs_r % num_heads) * stride_delta + offs_r // num_heads, delta, mask=row_valid)


@triton.jit
def combine_bwd_kernel(DO, O_CMP, O_SLC, O_WIN, G_CMP, G_SLC, G_WIN, DO_CMP, DO_SLC, DO_WIN,
                       DG_CMP, DG_SLC, DG_WIN, DELTAS, num_rows, num_heads, stride_dx, stride_dh,
                       HEAD_DIM_V: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                       WRITE_DELTAS: tl.constexpr):
    """Grid (row tiles,); each program loops over the columns so the gate gradients need no atomics.
    With WRITE_DELTAS, DELTAS [3, Hq, tokens] fp32 gets each branch's delta (strides stride_dx, stride_dh)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_valid = offs_r < num_rows
    g_cmp = tl.load(G_CMP + offs_r, mask=row_valid, other=0.0).to(tl.float32)
    g_slc = tl.load(G_SLC + offs_r, mask=row_valid, other=0.0).to(tl.float32)
    g_win = tl.load(G_WIN + offs_r, mask=row_valid, other=0.0).to(tl.float32)
    dg_cmp = tl.zeros([BLOCK_R], dtype=tl.float32)
    dg_slc = tl.zeros([BLOCK_R], dtype=tl.float32)
    dg_win = tl.zeros([BLOCK_R], dtype=tl.float32)
    delta_cmp = tl.zeros([BLOCK_R], dtype=tl.float32)
    delta_slc = tl.zeros([BLOCK_R], dtype=tl.float32)
    delta_win = tl.zeros([BLOCK_R], dtype=tl.float32)
    row_offs = offs_r.to(tl.int64)[:, None] * HEAD_DIM_V
    for d0 in range(0, HEAD_DIM_V, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM_V)
        offs = row_offs + offs_d[None, :]
        do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
        dg, delta = _combine_bwd_branch(do, O_CMP + offs, g_cmp, DO_CMP + offs, mask)
        dg_cmp, delta_cmp = dg_cmp + dg, delta_cmp + delta
        dg, delta = _combine_bwd_branch(do, O_SLC + offs, g_slc, DO_SLC + offs, mask)
        dg_slc, delta_slc = dg_slc + dg, delta_slc + delta
        dg, delta = _combine_bwd_branch(do, O_WIN + offs, g_win, DO_WIN + offs, mask)
        dg_win, delta_win = dg_win + dg, delta_win + delta
    tl.store(DG_CMP + offs_r, dg_cmp.to(DG_CMP.dtype.element_ty), mask=row_valid)
    tl.store(DG_SLC + offs_r, dg_slc.to(DG_SLC.dtype.element_ty), mask=row_valid)
    tl.store(DG_WIN + offs_r, dg_win.to(DG_WIN.dtype.element_ty), mask=row_valid)
    if WRITE_DELTAS:
        _store_delta(DELTAS, delta_cmp, offs_r, num_heads, stride_dh, row_valid)
        _store_delta(DELTAS + stride_dx, delta_slc, offs_r, num_heads, stride_dh, row_valid)
        _store_delta(DELTAS + 2 * stride_dx, delta_win, offs_r, num_heads, stride_dh, row_valid)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class CombineParams:
    """Launch parameters of the combine kernels: a program covers block_r rows (token x head) and block_d
    columns (the forward grids over column tiles, the backward loops over them); powers of two."""

    block_r: int = 32
    block_d: int = 128
    num_warps: int = 4

    def __post_init__(self):
        check_launch_params(self, counts=())


# What `nsa tune` searches (nsa.tuner.spaces builds candidates from these, prunes them by the device's limits):
# ranges of the fields above on a GPU, and a few tile sizes for the interpreter, which ignores warps and stages and
# pays per program (CI runs those).
SEARCH_SPACE = dict(block_r=[8, 16, 32, 64], num_warps=[2, 4, 8])
INTERPRETER_SEARCH_SPACE = dict(block_r=[16, 64])


def default_params(head_dim_v: int) -> CombineParams:
    """About 4096 elements per program: a whole row (up to 256) of block_r rows."""
    block_d = min(256, next_power_of_2(head_dim_v))
    return CombineParams(block_r=max(1, 4096 // block_d), block_d=block_d, num_warps=4)


def combine_fwd(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, params: CombineParams) -> torch.Tensor:
    """o [R, Dv] from branch outputs [R, Dv] and gates [R], all contiguous and of one dtype."""
    num_rows, head_dim_v = o_cmp.shape
    o = new_output((num_rows, head_dim_v), dtype=o_cmp.dtype, device=o_cmp.device)
    if num_rows == 0 or head_dim_v == 0:
        return o
    grid = (cdiv(num_rows, params.block_r), cdiv(head_dim_v, params.block_d))
    combine_fwd_kernel[grid](o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, o, num_rows, HEAD_DIM_V=head_dim_v,
                             BLOCK_R=params.block_r, BLOCK_D=params.block_d, num_warps=params.num_warps)
    return o


def combine_bwd(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, params: CombineParams, *,
                num_heads: int | None = None):
    """Gradients (do_cmp, do_slc, do_win [R, Dv], dg_cmp, dg_slc, dg_win [R]) of `combine_fwd`, then deltas: with
    `num_heads` (rows R = tokens x num_heads, token-major), [3, Hq, tokens] fp32 rowsum(do_x * o_x) of the
    branches in the order cmp, slc, win; else None."""
    num_rows, head_dim_v = o_cmp.shape
    douts = [new_output((num_rows, head_dim_v), dtype=o_cmp.dtype, device=o_cmp.device) for _ in range(3)]
    dgates = [new_output((num_rows,), dtype=g_cmp.dtype, device=g_cmp.device) for _ in range(3)]
    deltas = None
    if num_heads is not None:
        deltas = new_output((3, num_heads, num_rows // max(1, num_heads)), dtype=torch.float32, device=o_cmp.device)
    if num_rows == 0:
        return (*douts, *dgates, deltas)
    if head_dim_v == 0:
        return (*douts, *(g.zero_() for g in dgates), deltas if deltas is None else deltas.zero_())
    combine_bwd_kernel[(cdiv(num_rows, params.block_r),)](
        do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, *douts, *dgates, do if deltas is None else deltas, num_rows,
        num_heads or 1, *(deltas.stride()[:2] if deltas is not None else (0, 0)), HEAD_DIM_V=head_dim_v,
        BLOCK_R=params.block_r, BLOCK_D=params.block_d, WRITE_DELTAS=deltas is not None, num_warps=params.num_warps)
    return (*douts, *dgates, deltas)


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------

class CombineFunction(torch.autograd.Function):
    """Gated sum on row-flattened tensors (outputs [R, Dv], gates [R]) in the compute dtype."""

    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, params: CombineParams):
        inputs = [x.contiguous() for x in (o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)]
        ctx.save_for_backward(*inputs)
        ctx.params = params
        return combine_fwd(*inputs, params)

    @staticmethod
    def backward(ctx, do):
        grads = combine_bwd(do.contiguous(), *ctx.saved_tensors, ctx.params)[:6]
        return (*grads, None)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------

def _check_inputs(outputs: dict, gates: dict):
    named = {**outputs, **gates}
    check_float_tensors(named, {name: 4 if name.startswith("o_") else 3 for name in named})
    o_cmp = outputs["o_cmp"]
    check_kernel_inputs(o_cmp, max_head_dim=0)  # any Dv: rows are tiled by BLOCK_D
    for name, x in outputs.items():
        expect_shape(name, x, o_cmp.shape, "B, T, Hq, Dv")
    for name, x in gates.items():
        expect_shape(name, x, o_cmp.shape[:3], "B, T, Hq")


def combine_branches(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, *, params=None):
    """Gated sum of the branch outputs (SPEC 1.7): o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win.

    Args:
        o_cmp, o_slc, o_win: [B, T, Hq, Dv] outputs of the compressed, selected and window branches.
        g_cmp, g_slc, g_win: [B, T, Hq] gates (already through a sigmoid).
            All six share one dtype (float16, bfloat16 or float32) and device (CUDA, or CPU under
            TRITON_INTERPRET=1).
        params: CombineParams; `default_params(Dv)` when None.
    Returns:
        o [B, T, Hq, Dv] in the inputs' dtype (computed in fp32); differentiable with respect to all six inputs.

    Example:
        >>> o_cmp, o_slc, o_win = torch.randn(3, 2, 1024, 16, 64, device="cuda", dtype=torch.bfloat16)
        >>> g_cmp, g_slc, g_win = torch.rand(3, 2, 1024, 16, device="cuda", dtype=torch.bfloat16)
        >>> o = combine_branches(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)  # [2, 1024, 16, 64]
    """
    outputs = dict(o_cmp=o_cmp, o_slc=o_slc, o_win=o_win)
    gates = dict(g_cmp=g_cmp, g_slc=g_slc, g_win=g_win)
    _check_inputs(outputs, gates)
    shape = o_cmp.shape
    if params is None:
        params = default_params(shape[-1])
    elif not isinstance(params, CombineParams):
        raise TypeError(f"params must be a CombineParams, got {type(params).__name__}")
    cdt = compute_dtype(o_cmp.dtype)
    rows = shape[0] * shape[1] * shape[2]
    flat_outputs = [x.reshape(rows, shape[3]).to(cdt).contiguous() for x in outputs.values()]
    flat_gates = [g.reshape(rows).to(cdt).contiguous() for g in gates.values()]
    o = CombineFunction.apply(*flat_outputs, *flat_gates, params)
    return o.reshape(shape).to(o_cmp.dtype)


__all__ = ["combine_branches", "combine_fwd", "combine_bwd", "CombineParams", "default_params",
           "combine_fwd_kernel", "combine_bwd_kernel"]
