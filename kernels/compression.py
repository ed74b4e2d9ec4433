"""Compressed-attention branch (SPEC 1.2) in Triton: forward and backward.

Query t attends to compression block i only when the whole block is in its past, i*d + l - 1 <= t.

Tiling: a query tile is BLOCK_P consecutive positions x HEADS query heads of one GQA group (rows ordered
position-major, row r = (position r // HEADS, head r % HEADS)), so one tile of compressed keys of a kv head
serves every head of its group; the group's G heads take cdiv(G, HEADS) tiles. The causal frontier is per
position, so with few positions per tile nearly every key tile is unmasked (loop splitting: full key tiles
go through the inner function with MASK=False, the diagonal ones with MASK=True).

Backward (flash-style recomputation from the saved log-sum-exp):
  * delta = rowsum(do * o) (`nsa.kernels.delta`);
  * `compressed_attention_bwd_dkdv_kernel`: a program owns dkdv_block_n compressed keys of one kv head and
    loops over its group's heads and the query tiles that can see them: dk_cmp, dv_cmp without atomics. The
    first key tiles are seen by nearly every position and the last by few (a triangle), so with dkdv_splits > 1
    each key tile's query tiles are cut into that many runs, one program each, whose fp32 partial sums are
    added afterwards (in a fixed order: the result does not depend on scheduling);
  * `compressed_attention_bwd_dq_kernel`: the query tiles of the forward, dq.

The log-sum-exp `lse` [Hq, total tokens] float32 is in natural-log units: p_cmp = exp(scale * q.k_cmp - lse).
A row that sees no compressed block gets o = 0 and lse = +inf, so exp(s - lse) = 0 for every score s.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa.config import NSAConfig
from nsa.inputs import check_compressed, check_config, check_cu_seqlens, check_float_tensors, resolve_scale
from nsa.kernels import runtime
from nsa.kernels.delta import attention_delta
from nsa.kernels.packing import PackedSequences

LOG2E = 1.4426950408889634
# Module constants a kernel reads must be tl.constexpr on the GPU.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _num_visible(pos, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr):
    """Compression blocks wholly in the past of position `pos`: i*d + l - 1 <= pos (0 when pos < l - 1)."""
    # Guarded: Triton's integer division truncates toward zero, so a negative numerator must not reach it.
    return tl.where(pos >= CMP_BLOCK - 1, (pos - (CMP_BLOCK - 1)) // CMP_STRIDE + 1, 0)


@triton.jit
def _fwd_inner(acc, l_i, m_i, q_tile, pos, k, v, cmp_start, num_cmp, n0, stride_kt, stride_vt, offs_dk, offs_dv,
               dk_ok, dv_ok, scale_log2, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
               BLOCK_N: tl.constexpr, MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over compressed keys [n0, n0 + BLOCK_N) (k, v point at the kv head). Pointer
    loads: TMA tiles, as the dq kernel's, were no faster here on an H200 and slower at 4k (docs/performance.md)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < num_cmp
    k_t = tl.load(k + (cmp_start + offs_n)[None, :] * stride_kt + offs_dk[:, None],
                  mask=n_ok[None, :] & dk_ok[:, None], other=0.0)  # [BLOCK_DK, BLOCK_N]
    s = tl.dot(q_tile, k_t, input_precision=PRECISION) * scale_log2  # log2 units
    if MASK:
        visible = offs_n[None, :] * CMP_STRIDE + (CMP_BLOCK - 1) <= pos[:, None]
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))  # m_i starts finite, so no -inf - -inf
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_tile = tl.load(v + (cmp_start + offs_n)[:, None] * stride_vt + offs_dv[None, :],
                     mask=n_ok[:, None] & dv_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DV]
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _query_tile(cu_seqlens, cu_cmp, BLOCK_P: tl.constexpr, NUM_HEAD_CHUNKS: tl.constexpr):
    """The query tile of this program in the forward's tiling (grid: tiles, sequences, kv heads x head chunks;
    late tiles of a sequence see the most keys, so they start first): its first position p0, the sequence's
    start token and length, its compressed entries' offset and count, the kv head and head chunk."""
    pid_s = tl.program_id(1)
    seq_start = tl.load(cu_seqlens + pid_s)
    cmp_start = tl.load(cu_cmp + pid_s)
    return ((tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_P, seq_start,
            tl.load(cu_seqlens + pid_s + 1) - seq_start, cmp_start, tl.load(cu_cmp + pid_s + 1) - cmp_start,
            tl.program_id(2) // NUM_HEAD_CHUNKS, tl.program_id(2) % NUM_HEAD_CHUNKS)


@triton.jit
def _query_rows(p0, seq_start, seqlen, hk, hc, G: tl.constexpr, BLOCK_P: tl.constexpr, HEADS: tl.constexpr):
    """The rows of a query tile (position-major: row r = position r // HEADS, head r % HEADS of chunk hc):
    positions in the sequence, query heads, which rows are real, token indices (int64)."""
    offs_r = tl.arange(0, BLOCK_P * HEADS)
    pos = p0 + offs_r // HEADS
    g = hc * HEADS + offs_r % HEADS
    return pos, hk * G + g, (pos < seqlen) & (g < G), (seq_start + pos).to(tl.int64)


@triton.jit
def compressed_attention_fwd_kernel(
        q, k, v, o, lse, cu_seqlens, cu_cmp,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
        scale_log2,
        G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        BLOCK_P: tl.constexpr, HEADS: tl.constexpr, NUM_HEAD_CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """o, lse for a tile of BLOCK_P positions x HEADS query heads of one sequence and one GQA group."""
    BLOCK_M: tl.constexpr = BLOCK_P * HEADS
    p0, seq_start, seqlen, cmp_start, num_cmp, hk, hc = _query_tile(cu_seqlens, cu_cmp, BLOCK_P, NUM_HEAD_CHUNKS)
    if p0 >= seqlen:
        return
    pos, head, row_ok, tok = _query_rows(p0, seq_start, seqlen, hk, hc, G, BLOCK_P, HEADS)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < DK
    dv_ok = offs_dv < DV
    q_tile = tl.load(q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_dk[None, :],
                     mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
    k += hk * stride_kh
    v += hk * stride_vh

    p_last = tl.minimum(p0 + BLOCK_P, seqlen) - 1
    n_vis = _num_visible(p_last, CMP_BLOCK, CMP_STRIDE)  # keys any row of the tile sees
    n_full = _num_visible(p0, CMP_BLOCK, CMP_STRIDE)  # keys every row of the tile sees
    n_full = (n_full // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for n0 in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, pos, k, v, cmp_start, num_cmp, n0, stride_kt, stride_vt,
                                   offs_dk, offs_dv, dk_ok, dv_ok, scale_log2, CMP_BLOCK, CMP_STRIDE, BLOCK_N,
                                   False, PRECISION)
    for n0 in range(n_full, n_vis, BLOCK_N):
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q_tile, pos, k, v, cmp_start, num_cmp, n0, stride_kt, stride_vt,
                                   offs_dk, offs_dv, dk_ok, dv_ok, scale_log2, CMP_BLOCK, CMP_STRIDE, BLOCK_N,
                                   True, PRECISION)

    sees_any = l_i > 0.0
    out = acc / tl.where(sees_any, l_i, 1.0)[:, None]
    tl.store(o + tok[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
             out.to(o.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    row_lse = tl.where(sees_any, (m_i + tl.log2(tl.where(sees_any, l_i, 1.0))) * _LN2, float("inf"))
    tl.store(lse + head * stride_lh + tok, row_lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k_tile, v_tile, offs_n, q, do, lse, delta, tok0, p0, seqlen, head_base, hc,
                    stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, offs_dk, offs_dv, dk_ok, dv_ok,
                    scale_log2, G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr,
                    BLOCK_P: tl.constexpr, HEADS: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                    MASK: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dk, dv [BLOCK_N, D] of one key tile over one query tile (positions p0 .. p0 + BLOCK_P). With
    TMA, q and do are descriptors of [BLOCK_P, HEADS, D] tiles (`runtime.tma_head_tiles`): rows outside the tile's
    sequence or group hold other tokens' or heads' values (or zeros), finite, and get p = 0 from their lse."""
    BLOCK_M: tl.constexpr = BLOCK_P * HEADS
    offs_r = tl.arange(0, BLOCK_M)
    pos = p0 + offs_r // HEADS
    g = hc * HEADS + offs_r % HEADS
    head = head_base + g
    row_ok = (pos < seqlen) & (g < G)
    tok = (tok0 + pos).to(tl.int64)
    if TMA:
        q_tile = tl.reshape(q.load([tok0 + p0, head_base + hc * HEADS, 0]), [BLOCK_M, BLOCK_DK])
        do_tile = tl.reshape(do.load([tok0 + p0, head_base + hc * HEADS, 0]), [BLOCK_M, BLOCK_DV])
    else:
        q_tile = tl.load(q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_dk[None, :],
                         mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
        do_tile = tl.load(do + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :],
                          mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    # Rows outside the problem get lse = +inf, hence p = 0 and no contribution.
    lse2 = tl.load(lse + head * stride_lh + tok, mask=row_ok, other=float("inf")) * _LOG2E
    row_delta = tl.load(delta + head * stride_lh + tok, mask=row_ok, other=0.0)
    s_t = tl.dot(k_tile, tl.trans(q_tile), input_precision=PRECISION) * scale_log2  # [BLOCK_N, BLOCK_M]
    p_t = tl.exp2(s_t - lse2[None, :])
    if MASK:
        visible = offs_n[:, None] * CMP_STRIDE + (CMP_BLOCK - 1) <= pos[None, :]
        p_t = tl.where(visible, p_t, 0.0)
    dv += tl.dot(p_t.to(do_tile.dtype), do_tile, input_precision=PRECISION)
    dp_t = tl.dot(v_tile, tl.trans(do_tile), input_precision=PRECISION)
    ds_t = p_t * (dp_t - row_delta[None, :])
    dk += tl.dot(ds_t.to(q_tile.dtype), q_tile, input_precision=PRECISION)
    return dk, dv


@triton.jit
def compressed_attention_bwd_dkdv_kernel(
        q, k, v, do, lse, delta, dk, dv, cu_seqlens, cu_cmp,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lh,
        stride_dks, stride_dkt, stride_dkh, stride_dvs, stride_dvt, stride_dvh,
        scale, scale_log2,
        G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        BLOCK_P: tl.constexpr, HEADS: tl.constexpr, NUM_HEAD_CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr,
        SPLITS: tl.constexpr, POSITION_SPLITS: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
        TMA: tl.constexpr, PRECISION: tl.constexpr):
    """dk_cmp, dv_cmp for BLOCK_N compressed keys of one kv head: loops over the G heads and the query tiles (the
    split-th of SPLITS runs of them; dk, dv are then [SPLITS, ...] float32 partials, indexed by stride_dks). The
    runs cut this key tile's query tiles in equal parts, or with POSITION_SPLITS the sequence's positions at the
    same places for every key tile. With TMA, q and do are descriptors of query tiles (`_bwd_dkdv_inner`)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    hk = tl.program_id(2) // SPLITS
    split = tl.program_id(2) % SPLITS
    seq_start = tl.load(cu_seqlens + pid_s)
    seqlen = tl.load(cu_seqlens + pid_s + 1) - seq_start
    cmp_start = tl.load(cu_cmp + pid_s)
    num_cmp = tl.load(cu_cmp + pid_s + 1) - cmp_start
    n0 = pid_n * BLOCK_N
    if n0 >= num_cmp:
        return

    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < num_cmp
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < DK
    dv_ok = offs_dv < DV
    cmp_rows = (cmp_start + offs_n).to(tl.int64)
    k_tile = tl.load(k + cmp_rows[:, None] * stride_kt + hk * stride_kh + offs_dk[None, :],
                     mask=n_ok[:, None] & dk_ok[None, :], other=0.0)
    v_tile = tl.load(v + cmp_rows[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                     mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    acc_dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    acc_dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query tiles start at the first position that sees key n0; positions >= t_full see the whole key tile.
    t_first = n0 * CMP_STRIDE + CMP_BLOCK - 1
    t_full = (tl.minimum(n0 + BLOCK_N, num_cmp) - 1) * CMP_STRIDE + CMP_BLOCK - 1
    num_tiles = tl.cdiv(seqlen - t_first, BLOCK_P)
    diag_end = tl.minimum(tl.cdiv(t_full - t_first, BLOCK_P), num_tiles)  # tiles that need the causal mask
    full_end = tl.maximum(diag_end, (seqlen - t_first) // BLOCK_P)  # then tiles wholly inside the sequence
    if POSITION_SPLITS:
        # The programs of one split, adjacent in launch order, then stream the same q and dO tiles (their
        # t_first differ by whole tiles when BLOCK_P divides BLOCK_N * CMP_STRIDE), so L2 serves all but one read.
        offset = (t_first - (CMP_BLOCK - 1)) // BLOCK_P  # this key tile's first query tile, counted from key 0's
        per_split = tl.cdiv(tl.cdiv(seqlen - (CMP_BLOCK - 1), BLOCK_P), SPLITS)
        lo = tl.maximum(split * per_split - offset, 0)
        hi = tl.minimum((split + 1) * per_split - offset, num_tiles)
    else:
        per_split = tl.cdiv(num_tiles, SPLITS)
        lo = split * per_split  # this program's run of query tiles: [lo, hi)
        hi = tl.minimum(lo + per_split, num_tiles)
    head_base = hk * G
    for hc in range(NUM_HEAD_CHUNKS):
        for i in range(lo, tl.minimum(diag_end, hi)):
            acc_dk, acc_dv = _bwd_dkdv_inner(
                acc_dk, acc_dv, k_tile, v_tile, offs_n, q, do, lse, delta, seq_start, t_first + i * BLOCK_P, seqlen,
                head_base, hc, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, offs_dk, offs_dv, dk_ok,
                dv_ok, scale_log2, G, CMP_BLOCK, CMP_STRIDE, BLOCK_P, HEADS, BLOCK_DK, BLOCK_DV, True, TMA,
                PRECISION)
        for i in range(tl.maximum(diag_end, lo), tl.minimum(full_end, hi)):
            acc_dk, acc_dv = _bwd_dkdv_inner(
                acc_dk, acc_dv, k_tile, v_tile, offs_n, q, do, lse, delta, seq_start, t_first + i * BLOCK_P, seqlen,
                head_base, hc, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, offs_dk, offs_dv, dk_ok,
                dv_ok, scale_log2, G, CMP_BLOCK, CMP_STRIDE, BLOCK_P, HEADS, BLOCK_DK, BLOCK_DV, False, TMA,
                PRECISION)
        for i in range(tl.maximum(full_end, lo), hi):  # the sequence's last, partial tile
            acc_dk, acc_dv = _bwd_dkdv_inner(
                acc_dk, acc_dv, k_tile, v_tile, offs_n, q, do, lse, delta, seq_start, t_first + i * BLOCK_P, seqlen,
                head_base, hc, stride_qt, stride_qh, stride_dot, stride_doh, stride_lh, offs_dk, offs_dv, dk_ok,
                dv_ok, scale_log2, G, CMP_BLOCK, CMP_STRIDE, BLOCK_P, HEADS, BLOCK_DK, BLOCK_DV, True, TMA,
                PRECISION)

    tl.store(dk + split * stride_dks + cmp_rows[:, None] * stride_dkt + hk * stride_dkh + offs_dk[None, :],
             (acc_dk * scale).to(dk.dtype.element_ty), mask=n_ok[:, None] & dk_ok[None, :])
    tl.store(dv + split * stride_dvs + cmp_rows[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :],
             acc_dv.to(dv.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])


@triton.jit
def _bwd_dq_inner(acc, q_tile, do_tile, lse2, row_delta, pos, k, v, cmp_start, num_cmp, n0, k_col, v_col, stride_kt,
                  stride_vt, offs_dk, offs_dv, dk_ok, dv_ok, scale_log2, CMP_BLOCK: tl.constexpr,
                  CMP_STRIDE: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Accumulate dq (without the scale) over compressed keys [n0, n0 + BLOCK_N): k, v point at the kv head, or
    with TMA are descriptors read at columns k_col, v_col (their rows past the sequence's keys are not visible)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < num_cmp
    if TMA:
        k_tile = k.load([cmp_start + n0, k_col])
        v_t = tl.trans(v.load([cmp_start + n0, v_col]))
    else:
        k_tile = tl.load(k + (cmp_start + offs_n)[:, None] * stride_kt + offs_dk[None, :],
                         mask=n_ok[:, None] & dk_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_DK]
        v_t = tl.load(v + (cmp_start + offs_n)[None, :] * stride_vt + offs_dv[:, None],
                      mask=n_ok[None, :] & dv_ok[:, None], other=0.0)  # [BLOCK_DV, BLOCK_N]
    s = tl.dot(q_tile, tl.trans(k_tile), input_precision=PRECISION) * scale_log2
    p = tl.exp2(s - lse2[:, None])
    if MASK:
        visible = offs_n[None, :] * CMP_STRIDE + (CMP_BLOCK - 1) <= pos[:, None]
        p = tl.where(visible, p, 0.0)
    dp = tl.dot(do_tile, v_t, input_precision=PRECISION)
    ds = p * (dp - row_delta[:, None])
    acc += tl.dot(ds.to(k_tile.dtype), k_tile, input_precision=PRECISION)
    return acc


@triton.jit
def compressed_attention_bwd_dq_kernel(
        q, k, v, do, lse, delta, dq, cu_seqlens, cu_cmp,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lh,
        stride_dqt, stride_dqh,
        scale, scale_log2,
        G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
        BLOCK_P: tl.constexpr, HEADS: tl.constexpr, NUM_HEAD_CHUNKS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr, PRECISION: tl.constexpr):
    """dq for a tile of BLOCK_P positions x HEADS query heads (the forward's tiling and TMA)."""
    BLOCK_M: tl.constexpr = BLOCK_P * HEADS
    p0, seq_start, seqlen, cmp_start, num_cmp, hk, hc = _query_tile(cu_seqlens, cu_cmp, BLOCK_P, NUM_HEAD_CHUNKS)
    if p0 >= seqlen:
        return
    pos, head, row_ok, tok = _query_rows(p0, seq_start, seqlen, hk, hc, G, BLOCK_P, HEADS)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk_ok = offs_dk < DK
    dv_ok = offs_dv < DV
    q_tile = tl.load(q + tok[:, None] * stride_qt + head[:, None] * stride_qh + offs_dk[None, :],
                     mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
    do_tile = tl.load(do + tok[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :],
                      mask=row_ok[:, None] & dv_ok[None, :], other=0.0)
    lse2 = tl.load(lse + head * stride_lh + tok, mask=row_ok, other=float("inf")) * _LOG2E
    row_delta = tl.load(delta + head * stride_lh + tok, mask=row_ok, other=0.0)
    if not TMA:
        k += hk * stride_kh
        v += hk * stride_vh

    p_last = tl.minimum(p0 + BLOCK_P, seqlen) - 1
    n_vis = _num_visible(p_last, CMP_BLOCK, CMP_STRIDE)
    n_full = (_num_visible(p0, CMP_BLOCK, CMP_STRIDE) // BLOCK_N) * BLOCK_N
    acc = tl.zeros([BLOCK_M, BLOCK_DK], dtype=tl.float32)
    for n0 in range(0, n_full, BLOCK_N):
        acc = _bwd_dq_inner(acc, q_tile, do_tile, lse2, row_delta, pos, k, v, cmp_start, num_cmp, n0, hk * DK,
                            hk * DV, stride_kt, stride_vt, offs_dk, offs_dv, dk_ok, dv_ok, scale_log2, CMP_BLOCK,
                            CMP_STRIDE, BLOCK_N, False, TMA, PRECISION)
    for n0 in range(n_full, n_vis, BLOCK_N):
        acc = _bwd_dq_inner(acc, q_tile, do_tile, lse2, row_delta, pos, k, v, cmp_start, num_cmp, n0, hk * DK,
                            hk * DV, stride_kt, stride_vt, offs_dk, offs_dv, dk_ok, dv_ok, scale_log2, CMP_BLOCK,
                            CMP_STRIDE, BLOCK_N, True, TMA, PRECISION)
    tl.store(dq + tok[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_dk[None, :],
             (acc * scale).to(dq.dtype.element_ty), mask=row_ok[:, None] & dk_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launchers (packed tensors)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CompressionParams:
    """Launch parameters of the compressed-attention kernels (one source for forward, backward and the tuner).

    Each kernel's query tile is `*_block_m` positions x `*_block_h` query heads of one GQA group (rows =
    block_m * block_h, position-major; the heads share every compressed K/V tile the program loads; a group
    takes cdiv(G, block_h) tiles, rows of heads beyond G are masked). `*_block_n` compressed keys per inner
    step. All tiles are powers of two; rows and block_n must be >= 16 (a GPU `tl.dot` requirement).

    Attributes:
        fwd_block_m, fwd_block_n, fwd_block_h, fwd_num_warps, fwd_num_stages: forward kernel.
        dkdv_block_m, dkdv_block_n, dkdv_block_h, dkdv_num_warps, dkdv_num_stages: dk/dv kernel; its program
            owns dkdv_block_n compressed keys of one kv head and steps over dkdv_block_m positions x
            dkdv_block_h heads at a time.
        dkdv_splits: programs per key tile, each taking one run of its query tiles (any int >= 1; above 1 the
            fp32 partials, splits x the size of dk_cmp and dv_cmp, are summed after the kernel).
        dkdv_position_splits: the runs cut the sequence's positions at the same places for every key tile (so
            the programs of a run, which the GPU runs together, read the same q and dO tiles: one read from
            memory, the rest from L2) instead of cutting each key tile's own query tiles in equal parts (balanced
            programs, but each streams different tiles). On an H200 (session 19) it paid at 64k (the compressed
            backward 33.8 -> 32.1 ms with 16 splits and dkdv_tma) and lost at 16k (2.68 -> 2.81 ms), where the
            tuner's cache has it off.
        dq_block_m, dq_block_n, dq_block_h, dq_num_warps, dq_num_stages: dq kernel (tiled like the forward).
        dq_tma: the dq kernel's compressed K/V tiles read by TMA copies (tensor descriptors) where the GPU and
            layout allow (`runtime.tma_rows`), else by pointer loads.
        dkdv_tma: the dk/dv kernel's q and dO tiles read by TMA copies of [dkdv_block_m, dkdv_block_h, D] boxes
            where the GPU and layout allow (`runtime.tma_head_tiles`), else by pointer loads. Off unless tuned on:
            at the default 128-key tile its sm_90 spills grew 48 -> 120 bytes and the paper shape lost 1-6% from
            4k on an H200 (session 18), where the window's dk/dv kernel, which had spilled 520 bytes, gained.
    """

    fwd_block_m: int = 16
    fwd_block_n: int = 64
    fwd_block_h: int = 4
    fwd_num_warps: int = 4
    fwd_num_stages: int = 2
    dkdv_block_m: int = 16
    dkdv_block_n: int = 32
    dkdv_block_h: int = 4
    dkdv_num_warps: int = 4
    dkdv_num_stages: int = 1
    dkdv_splits: int = 1
    dq_block_m: int = 16
    dq_block_n: int = 32
    dq_block_h: int = 4
    dq_num_warps: int = 4
    dq_num_stages: int = 2
    dq_tma: bool = True
    dkdv_tma: bool = False
    dkdv_position_splits: bool = False

    def __post_init__(self):
        runtime.check_launch_params(self, counts=("num_stages", "splits"), tiles=("fwd_", "dkdv_", "dq_"),
                                    flags=("_tma", "_position_splits"))


def heads_per_tile(group: int, rows: int) -> int:
    """Query heads per tile: the whole group (rounded up to a power of two) when it fits `rows`, else `rows`."""
    return min(runtime.next_power_of_2(group), rows)


# What `nsa tune` searches (nsa.tuner.spaces builds candidates from these, prunes them by the device's limits):
# ranges of the fields above on a GPU, and a few tile sizes for the interpreter, which ignores warps and stages and
# pays per program (CI runs those).
SEARCH_SPACE = dict(fwd_block_m=[8, 16, 32, 64, 128], fwd_block_n=[16, 32, 64, 128], fwd_num_warps=[4, 8],
                    fwd_num_stages=[1, 2, 3])
INTERPRETER_SEARCH_SPACE = dict(fwd_block_n=[16, 64])
# The backward kernels (`compression_bwd`). Without splits the H200 tune picked the smallest key tile (more
# programs for the triangular load); with splits the large key tiles win (a sweep at 64k in docs/performance.md).
BACKWARD_SEARCH_SPACE = dict(dkdv_block_n=[64, 128], dkdv_num_warps=[4, 8], dkdv_splits=[1, 4, 8],
                             dkdv_num_stages=[2, 3], dkdv_tma=[False, True], dkdv_position_splits=[False, True])
# dk/dv partials of all splits together (fp32) stay under this; larger dkdv_splits are lowered to fit.
DKDV_PARTIAL_BYTES = 2**30
INTERPRETER_BACKWARD_SEARCH_SPACE = dict(dkdv_block_n=[16, 64], dkdv_splits=[2])


def default_params(num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
                   dtype: torch.dtype = torch.bfloat16) -> CompressionParams:
    """A sane default for the shape (the tuner searches better ones): the group's heads packed into each tile.

    For 16-bit inputs and head dims <= 128: forward 128 rows x 32 keys (8 warps), dq 64 rows x 64 keys
    (4 warps): the fastest of a coordinate sweep on an H200 (paper shape, T=32k, triton 3.6). dkdv 64 rows x 128
    keys, 8 warps, 3 stages, 8 splits: the fastest of 108 tilings swept at 64k on an H200 (see
    docs/performance.md). Head dims above 128 halve the rows; fp32 (its `ieee` tl.dot runs on FMA units) uses
    16 x 16 tiles and pointer loads (as the window kernels). Under the interpreter, large tiles (it pays per
    program and per step, not per element).
    """
    group = num_heads // num_kv_heads
    if runtime.interpreting():
        h = heads_per_tile(group, 16)
        return CompressionParams(fwd_block_m=128 // h, fwd_block_n=64, fwd_block_h=h, dkdv_block_m=128 // h,
                                 dkdv_block_n=64, dkdv_block_h=h, dq_block_m=128 // h, dq_block_n=64, dq_block_h=h)
    if dtype == torch.float32:
        h = heads_per_tile(group, 16)
        return CompressionParams(fwd_block_m=16 // h, fwd_block_n=16, fwd_block_h=h, fwd_num_warps=4,
                                 fwd_num_stages=1, dkdv_block_m=16 // h, dkdv_block_n=16, dkdv_block_h=h,
                                 dkdv_num_warps=4, dkdv_num_stages=1, dq_block_m=16 // h, dq_block_n=16,
                                 dq_block_h=h, dq_num_warps=4, dq_num_stages=1, dq_tma=False)
    big = max(head_dim, head_dim_v) > 128
    fwd_rows, dkdv_rows, dq_rows = (64, 16, 32) if big else (128, 64, 64)
    fwd_h, dkdv_h, dq_h = (heads_per_tile(group, r) for r in (fwd_rows, dkdv_rows, dq_rows))
    return CompressionParams(
        fwd_block_m=fwd_rows // fwd_h, fwd_block_n=32, fwd_block_h=fwd_h, fwd_num_warps=4 if big else 8,
        fwd_num_stages=2 if big else 3,
        dkdv_block_m=dkdv_rows // dkdv_h, dkdv_block_n=32 if big else 128, dkdv_block_h=dkdv_h,
        dkdv_num_warps=4 if big else 8, dkdv_num_stages=1 if big else 3, dkdv_splits=1 if big else 8,
        dq_block_m=dq_rows // dq_h, dq_block_n=32 if big else 64, dq_block_h=dq_h, dq_num_warps=4,
        dq_num_stages=2)


def dkdv_splits(params: CompressionParams, k_cmp_shape, head_dim_v: int) -> int:
    """params.dkdv_splits, lowered so that the fp32 partials of dk_cmp and dv_cmp fit DKDV_PARTIAL_BYTES."""
    num_cmp, num_kv_heads, head_dim = k_cmp_shape
    per_split = num_cmp * num_kv_heads * (head_dim + head_dim_v) * 4
    return max(1, min(params.dkdv_splits, DKDV_PARTIAL_BYTES // max(1, per_split)))


def compressed_attention_fwd(q, k_cmp, v_cmp, seqs: PackedSequences, config: NSAConfig, scale: float,
                             params: CompressionParams):
    """Compressed attention on packed sequences.

    Args:
        q: [Ttot, Hq, Dk]; k_cmp: [Ctot, Hkv, Dk]; v_cmp: [Ctot, Hkv, Dv] (contiguous in the last dim).
        seqs: the sequences' token and compressed-entry offsets.
    Returns:
        o [Ttot, Hq, Dv] in q's dtype, lse [Hq, Ttot] float32 (natural log; +inf on rows that see no block).
    """
    total, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k_cmp.shape[1], v_cmp.shape[2]
    group = num_heads // num_kv_heads
    o = runtime.new_output((total, num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    lse = runtime.new_output((num_heads, total), dtype=torch.float32, device=q.device)
    if total == 0:
        return o, lse
    if k_cmp.shape[0] == 0:  # every sequence is shorter than l: nothing to see
        o.zero_()
        lse.fill_(float("inf"))
        return o, lse
    heads_chunks = runtime.cdiv(group, params.fwd_block_h)
    grid = (runtime.cdiv(seqs.max_seqlen, params.fwd_block_m), seqs.num_seqs, num_kv_heads * heads_chunks)
    compressed_attention_fwd_kernel[grid](
        q, k_cmp, v_cmp, o, lse, seqs.cu_seqlens, seqs.cu_cmp,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), v_cmp.stride(0), v_cmp.stride(1),
        o.stride(0), o.stride(1), lse.stride(0),
        scale * LOG2E,
        G=group, CMP_BLOCK=config.cmp_block, CMP_STRIDE=config.cmp_stride, DK=head_dim, DV=head_dim_v,
        BLOCK_P=params.fwd_block_m, HEADS=params.fwd_block_h, NUM_HEAD_CHUNKS=heads_chunks,
        BLOCK_N=params.fwd_block_n, BLOCK_DK=runtime.head_dim_block(head_dim),
        BLOCK_DV=runtime.head_dim_block(head_dim_v),
        PRECISION=runtime.dot_precision(q.dtype), num_warps=params.fwd_num_warps, num_stages=params.fwd_num_stages)
    return o, lse


def compressed_attention_bwd(do, q, k_cmp, v_cmp, o, lse, seqs: PackedSequences, config: NSAConfig, scale: float,
                             params: CompressionParams, *, delta=None):
    """Gradients of `compressed_attention_fwd` by recomputation from its lse.

    Args:
        do: [Ttot, Hq, Dv] gradient of o; q, k_cmp, v_cmp, o, lse: as for and from the forward.
        delta: rowsum(do * o) [Hq, Ttot] fp32 when the caller has it (else computed here).
    Returns:
        dq [Ttot, Hq, Dk], dk_cmp [Ctot, Hkv, Dk], dv_cmp [Ctot, Hkv, Dv], in the inputs' dtype.
    """
    total, num_heads, head_dim = q.shape
    num_cmp, num_kv_heads, head_dim_v = v_cmp.shape
    group = num_heads // num_kv_heads
    dq = runtime.new_output(q.shape, dtype=q.dtype, device=q.device)
    dk = runtime.new_output(k_cmp.shape, dtype=k_cmp.dtype, device=q.device)
    dv = runtime.new_output(v_cmp.shape, dtype=v_cmp.dtype, device=q.device)
    if total == 0:
        return dq, dk, dv
    if num_cmp == 0:
        return dq.zero_(), dk, dv
    do, lse = do.contiguous(), lse.contiguous()
    delta = attention_delta(o, do) if delta is None else delta

    shared = dict(G=group, CMP_BLOCK=config.cmp_block, CMP_STRIDE=config.cmp_stride, DK=head_dim, DV=head_dim_v,
                  BLOCK_DK=runtime.head_dim_block(head_dim), BLOCK_DV=runtime.head_dim_block(head_dim_v),
                  PRECISION=runtime.dot_precision(q.dtype))
    strides = (q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), v_cmp.stride(0), v_cmp.stride(1),
               do.stride(0), do.stride(1), lse.stride(0))
    splits = dkdv_splits(params, k_cmp.shape, head_dim_v)
    if splits == 1:
        dk_out, dv_out = dk[None], dv[None]
    else:  # every (split, key row) is written, zeros where a split has no query tile for the key tile
        dk_out = runtime.new_output((splits, *k_cmp.shape), dtype=torch.float32, device=q.device)
        dv_out = runtime.new_output((splits, *v_cmp.shape), dtype=torch.float32, device=q.device)
    q_src, do_src = runtime.query_tile_sources(q, do, params.dkdv_block_m, params.dkdv_block_h, shared["BLOCK_DK"],
                                               shared["BLOCK_DV"], params.dkdv_tma)
    grid = (runtime.cdiv(seqs.max_cmp, params.dkdv_block_n), seqs.num_seqs, num_kv_heads * splits)
    compressed_attention_bwd_dkdv_kernel[grid](
        q_src, k_cmp, v_cmp, do_src, lse, delta, dk_out, dv_out, seqs.cu_seqlens, seqs.cu_cmp, *strides,
        *dk_out.stride()[:3], *dv_out.stride()[:3], scale, scale * LOG2E,
        BLOCK_P=params.dkdv_block_m, HEADS=params.dkdv_block_h,
        NUM_HEAD_CHUNKS=runtime.cdiv(group, params.dkdv_block_h), BLOCK_N=params.dkdv_block_n, SPLITS=splits,
        POSITION_SPLITS=params.dkdv_position_splits, TMA=q_src is not q, num_warps=params.dkdv_num_warps,
        num_stages=params.dkdv_num_stages, **shared)
    if splits > 1:
        dk.copy_(dk_out.sum(0))
        dv.copy_(dv_out.sum(0))
    heads_chunks = runtime.cdiv(group, params.dq_block_h)
    k_src, v_src = runtime.key_value_sources(k_cmp, v_cmp, params.dq_block_n, shared["BLOCK_DK"], shared["BLOCK_DV"],
                                             params.dq_tma)
    grid = (runtime.cdiv(seqs.max_seqlen, params.dq_block_m), seqs.num_seqs, num_kv_heads * heads_chunks)
    compressed_attention_bwd_dq_kernel[grid](
        q, k_src, v_src, do, lse, delta, dq, seqs.cu_seqlens, seqs.cu_cmp, *strides,
        dq.stride(0), dq.stride(1), scale, scale * LOG2E,
        BLOCK_P=params.dq_block_m, HEADS=params.dq_block_h, NUM_HEAD_CHUNKS=heads_chunks,
        BLOCK_N=params.dq_block_n, TMA=k_src is not k_cmp, num_warps=params.dq_num_warps,
        num_stages=params.dq_num_stages, **shared)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------


class CompressedAttentionFunction(torch.autograd.Function):
    """o, lse = compressed attention of packed q, k_cmp, v_cmp; lse carries no gradient."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, seqs, config, scale, params):
        o, lse = compressed_attention_fwd(q, k_cmp, v_cmp, seqs, config, scale, params)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse)
        ctx.seqs, ctx.config, ctx.scale, ctx.params = seqs, config, scale, params
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k_cmp, v_cmp, o, lse = ctx.saved_tensors
        dq, dk, dv = compressed_attention_bwd(do, q, k_cmp, v_cmp, o, lse, ctx.seqs, ctx.config, ctx.scale,
                                              ctx.params)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def check_compression_inputs(q, k_cmp, config: NSAConfig, cu_seqlens, v_cmp=None):
    """Validate q [B, T, Hq, Dk], k_cmp [B, Tc, Hkv, Dk] (and v_cmp [B, Tc, Hkv, Dv]) before any launch.

    Returns:
        PackedSequences of the batch. Raises TypeError / ValueError naming the problem.
    """
    check_config(config)
    named = dict(q=q, k_cmp=k_cmp) if v_cmp is None else dict(q=q, k_cmp=k_cmp, v_cmp=v_cmp)
    check_float_tensors(named, dict.fromkeys(named, 4))
    batch, seqlen, num_heads, head_dim = q.shape
    num_kv_heads = k_cmp.shape[2]
    head_dim_v = head_dim if v_cmp is None else v_cmp.shape[3]
    runtime.check_kernel_inputs(q, max(head_dim, head_dim_v))
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"query heads Hq={num_heads} must be a multiple of kv heads Hkv={num_kv_heads}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch, seqlen, q.device)
    seqs = PackedSequences.build(config, batch, seqlen, q.device, cu_seqlens)
    num_cmp = int(seqs.cu_cmp[-1]) if cu_seqlens is not None else config.num_cmp_blocks(seqlen)
    check_compressed(k_cmp, k_cmp if v_cmp is None else v_cmp, config, batch, num_cmp, num_kv_heads, head_dim,
                     head_dim_v)
    return seqs


def compressed_attention(q, k_cmp, v_cmp, config: NSAConfig, *, scale=None, cu_seqlens=None, params=None,
                         return_lse=False):
    """Compressed-attention output o_cmp (SPEC 1.2), Triton forward and backward.

    Query t attends, with softmax weights, to the compression blocks i with i*d + l - 1 <= t; a query that sees
    none gets o_cmp = 0.

    Args:
        q: [B, T, Hq, Dk] queries (float16, bfloat16 or float32; CUDA, or CPU under TRITON_INTERPRET=1).
        k_cmp: [B, Tc, Hkv, Dk] compressed keys, Tc = config.num_cmp_blocks(T) (packed per sequence with cu_seqlens).
        v_cmp: [B, Tc, Hkv, Dv] compressed values.
        config: the NSAConfig (l = cmp_block, d = cmp_stride).
        scale: softmax scale, Dk ** -0.5 by default.
        cu_seqlens: int32 [N+1] offsets of packed sequences (B = 1), or None for a dense batch.
        params: CompressionParams (tiles, warps), `default_params(...)` for the shape when None.
        return_lse: also return the log-sum-exp.
    Returns:
        o_cmp [B, T, Hq, Dv] in q's dtype; with return_lse, (o_cmp, lse) where lse is [B, Hq, T] float32,
        natural log of the softmax denominator of scale * q.k_cmp (+inf where no block is visible), no gradient.

    Example:
        >>> o = compressed_attention(q, k_cmp, v_cmp, NSAConfig())  # q: [2, 4096, 64, 128] bf16 on CUDA
    """
    seqs = check_compression_inputs(q, k_cmp, config, cu_seqlens, v_cmp)
    scale = resolve_scale(scale, q.shape[-1])
    batch, seqlen, num_heads, head_dim = q.shape
    dtype = runtime.compute_dtype(q.dtype)
    if params is None:
        params = default_params(num_heads, k_cmp.shape[2], head_dim, v_cmp.shape[3], dtype)
    elif not isinstance(params, CompressionParams):
        raise TypeError(f"params must be a CompressionParams, got {type(params).__name__}")
    packed = (runtime.pack(x, dtype) for x in (q, k_cmp, v_cmp))
    o, lse = CompressedAttentionFunction.apply(*packed, seqs, config, scale, params)
    o = o.reshape(batch, seqlen, num_heads, v_cmp.shape[3]).to(q.dtype)
    if not return_lse:
        return o
    return o, lse.reshape(num_heads, batch, seqlen).transpose(0, 1).contiguous()
