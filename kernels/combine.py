"""Gated combination of the three branches (SPEC 1.7) in Triton: forward and backward.

o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, gates [R] and branch outputs [R, Dv] with R = tokens x heads
rows (a [B, T, Hq, Dv] tensor viewed as B*T*Hq rows). fp32 arithmetic, results in the inputs' dtype.
Backward in one pass: dg_x = rowsum(do * o_x) for the three branches, and either do_x = g_x * do (the gradients of
the branch outputs, for `combine_branches`) or, for `nsa_attention`'s backward, each branch's softmax terms with its
gate folded in, so that no do_x is written at all (`combine_bwd_for_branches`).
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
def _combine_bwd_branch(do, o_ptrs, g, do_ptrs, mask, WRITE_DO_X: tl.constexpr):
    """This column tile's rowsum(do * o_x) in fp32 ([tokens, heads] of [tokens, heads, columns] tiles); with
    WRITE_DO_X, store do_x = g * do."""
    o = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
    if WRITE_DO_X:
        tl.store(do_ptrs, (g[:, :, None] * do).to(do_ptrs.dtype.element_ty), mask=mask)
    return tl.sum(do * o, 2)


@triton.jit
def _store_folded_terms(lse, LSE_OUT, DELTA, g, dg, offs, row_valid):
    """One branch's softmax-backward terms with its gate folded in, at offs of [Hq, tokens] arrays (head-major, as
    the branches' lse). With p = exp(s - lse), do_x = g * do and delta = rowsum(do_x * o_x), a branch's backward
    needs p * do_x and p * (do_x . v - delta), which equal p' * do and p' * (do . v - delta') for p' = exp(s - lse')
    = g * p, lse' = lse - log(g) and delta' = rowsum(do * o_x) = dg_x: the branch kernels, unchanged, then read do
    itself. g = 0 gives lse' = +inf (p' = 0); a negative gate (outside SPEC's sigmoid range) gives NaN, so the
    gradients show it instead of being wrong."""
    lse_folded = tl.where(g == 0.0, float("inf"), lse - tl.log(tl.where(g == 0.0, 1.0, g)))
    tl.store(LSE_OUT + offs, lse_folded, mask=row_valid)
    tl.store(DELTA + offs, dg, mask=row_valid)


@triton.jit
def combine_bwd_kernel(DO, O_CMP, O_SLC, O_WIN, G_CMP, G_SLC, G_WIN, DO_CMP, DO_SLC, DO_WIN,
                       DG_CMP, DG_SLC, DG_WIN, LSE_CMP, LSE_SLC, LSE_WIN, LSES_OUT, DELTAS, num_tokens, num_heads,
                       stride_x, stride_h, HEAD_DIM_V: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr,
                       BLOCK_D: tl.constexpr, FOLD_GATES: tl.constexpr):
    """Grid (token tiles, head tiles) over rows r = token * num_heads + head; each program loops over the columns
    so the gate gradients need no atomics. Without FOLD_GATES it writes DO_x; with it, LSES_OUT and DELTAS
    [3, Hq, tokens] fp32 (strides stride_x, stride_h; the branches' LSE_x [Hq, tokens] share stride_h) get
    `_store_folded_terms` of each branch."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_valid = (offs_t < num_tokens)[:, None] & (offs_h < num_heads)[None, :]
    rows = offs_t[:, None] * num_heads + offs_h[None, :]
    g_cmp = tl.load(G_CMP + rows, mask=row_valid, other=0.0).to(tl.float32)
    g_slc = tl.load(G_SLC + rows, mask=row_valid, other=0.0).to(tl.float32)
    g_win = tl.load(G_WIN + rows, mask=row_valid, other=0.0).to(tl.float32)
    if FOLD_GATES:  # loaded before the columns, so their latency hides behind them
        head_major = offs_h[None, :] * stride_h + offs_t[:, None]
        lse_cmp = tl.load(LSE_CMP + head_major, mask=row_valid, other=0.0)
        lse_slc = tl.load(LSE_SLC + head_major, mask=row_valid, other=0.0)
        lse_win = tl.load(LSE_WIN + head_major, mask=row_valid, other=0.0)
    dg_cmp = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    dg_slc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    dg_win = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    row_offs = rows.to(tl.int64)[:, :, None] * HEAD_DIM_V
    for d0 in range(0, HEAD_DIM_V, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_valid[:, :, None] & (offs_d[None, None, :] < HEAD_DIM_V)
        offs = row_offs + offs_d[None, None, :]
        do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
        dg_cmp += _combine_bwd_branch(do, O_CMP + offs, g_cmp, DO_CMP + offs, mask, not FOLD_GATES)
        dg_slc += _combine_bwd_branch(do, O_SLC + offs, g_slc, DO_SLC + offs, mask, not FOLD_GATES)
        dg_win += _combine_bwd_branch(do, O_WIN + offs, g_win, DO_WIN + offs, mask, not FOLD_GATES)
    tl.store(DG_CMP + rows, dg_cmp.to(DG_CMP.dtype.element_ty), mask=row_valid)
    tl.store(DG_SLC + rows, dg_slc.to(DG_SLC.dtype.element_ty), mask=row_valid)
    tl.store(DG_WIN + rows, dg_win.to(DG_WIN.dtype.element_ty), mask=row_valid)
    if FOLD_GATES:
        _store_folded_terms(lse_cmp, LSES_OUT, DELTAS, g_cmp, dg_cmp, head_major, row_valid)
        _store_folded_terms(lse_slc, LSES_OUT + stride_x, DELTAS + stride_x, g_slc, dg_slc, head_major, row_valid)
        _store_folded_terms(lse_win, LSES_OUT + 2 * stride_x, DELTAS + 2 * stride_x, g_win, dg_win, head_major,
                            row_valid)


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


def _bwd_tiles(params: CombineParams, num_heads: int, folded: bool) -> tuple[int, int, int]:
    """A backward program's rows as (tokens, heads) and its columns. The plain backward takes block_r rows as they
    come (one row a "token"); the folded one at least 8 tokens (32 bytes of each head-major fp32 row it reads or
    writes) of up to 4 heads. At 64k tokens x 64 heads, Dv=128, bf16 on an H200 (session 22) that took 1.17 ms,
    against 1.67 for 8 tokens x 16 heads x 32 columns, 1.47 for 8 tokens x 1 head, 1.88 for block_r rows of one
    token (nine fp32 values of a row written or read alone) and 1.79 for the plain backward."""
    if not folded:
        return params.block_r, 1, params.block_d
    block_h = min(next_power_of_2(num_heads), 4)
    return max(8, params.block_r // block_h), block_h, params.block_d


def _launch_bwd(do, outputs, gates, params: CombineParams, douts=None, lses=None):
    """combine_bwd_kernel over row-flattened outputs [R, Dv] and gates [R]: the gate gradients, and with `douts`
    those written, with `lses` (folding the gates) the [3, Hq, tokens] lses and deltas returned beside them."""
    num_rows, head_dim_v = outputs[0].shape
    dgates = [new_output((num_rows,), dtype=gates[0].dtype, device=do.device) for _ in range(3)]
    folded, num_heads = None, 1
    if lses is not None:
        num_heads, tokens = lses[0].shape
        folded = [new_output((3, num_heads, tokens), dtype=torch.float32, device=do.device) for _ in range(2)]
    if num_rows == 0:
        return dgates, folded
    block_t, block_h, block_d = _bwd_tiles(params, num_heads, lses is not None)
    # Pointers a mode does not touch get the outputs' (any tensor will do).
    args = (*(douts or outputs), *dgates, *(lses or outputs), *(folded or outputs[:2]), num_rows // num_heads,
            num_heads, *(folded[0].stride()[:2] if lses is not None else (0, 0)))
    grid = (cdiv(num_rows // num_heads, block_t), cdiv(num_heads, block_h))
    combine_bwd_kernel[grid](do, *outputs, *gates, *args, HEAD_DIM_V=head_dim_v, BLOCK_T=block_t, BLOCK_H=block_h,
                             BLOCK_D=block_d, FOLD_GATES=lses is not None, num_warps=params.num_warps)
    return dgates, folded


def combine_bwd(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, params: CombineParams):
    """Gradients (do_cmp, do_slc, do_win [R, Dv], dg_cmp, dg_slc, dg_win [R]) of `combine_fwd`."""
    douts = [new_output(o_cmp.shape, dtype=o_cmp.dtype, device=o_cmp.device) for _ in range(3)]
    dgates, _ = _launch_bwd(do, (o_cmp, o_slc, o_win), (g_cmp, g_slc, g_win), params, douts=douts)
    return (*douts, *dgates)


def combine_bwd_for_branches(do, o_cmp, o_slc, o_win, g_cmp, g_slc, g_win, lse_cmp, lse_slc, lse_win,
                             params: CombineParams):
    """The gate gradients (dg_cmp, dg_slc, dg_win [R]) of `combine_fwd`, and what lets each branch's backward read
    do itself in place of its do_x = g_x * do (never written: 3 GB at 64k tokens, 64 heads, Dv=128, bf16): lses
    and deltas [3, Hq, tokens] fp32, the branches' lse and softmax-backward term with each gate folded in
    (`_store_folded_terms`), in the order cmp, slc, win. Rows R = tokens x Hq, token-major; lse_x [Hq, tokens]
    contiguous, as the branch forwards return them."""
    lses = (lse_cmp, lse_slc, lse_win)
    num_heads, tokens = lse_cmp.shape
    if num_heads * tokens != o_cmp.shape[0] or any(x.shape != lse_cmp.shape or not x.is_contiguous() for x in lses):
        raise ValueError(f"lses must be contiguous [Hq, tokens] with Hq * tokens = {o_cmp.shape[0]} rows, got "
                         f"{[tuple(x.shape) for x in lses]}")
    dgates, (lses_out, deltas) = _launch_bwd(do, (o_cmp, o_slc, o_win), (g_cmp, g_slc, g_win), params, lses=lses)
    return (*dgates, lses_out, deltas)


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
        return (*combine_bwd(do.contiguous(), *ctx.saved_tensors, ctx.params), None)


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


__all__ = ["combine_branches", "combine_fwd", "combine_bwd", "combine_bwd_for_branches", "CombineParams",
           "default_params", "combine_fwd_kernel", "combine_bwd_kernel"]
