"""Sliding-window attention (SPEC 1.6) in Triton: forward and backward.

Query t of a sequence attends to the tokens s of the same sequence with max(0, t - w + 1) <= s <= t (w tokens,
t included); query head h reads kv head h // G. Tensors are packed ([total tokens, H, D], see `packing.py`).

Tiling. A program's rows are BLOCK_M query positions x BLOCK_H query heads of one GQA group (row r is
position r // BLOCK_H, head r % BLOCK_H), so each K/V tile loaded feeds BLOCK_H heads, and for a large group the
band of keys a tile needs (w + BLOCK_M - 1) stays close to w. Loops only visit the key (or query) tiles that
intersect the band: tiles wholly inside it run unmasked, the boundary tiles (the window's lower edge, the
diagonal and sequence ends) run the same inner function with MASK=True.

Backward: a preprocess computes delta = rowsum(o * do); the dkdv kernel owns one key tile of one kv head and
loops over the group's query heads and the query tiles of its band (no atomics); the dq kernel mirrors the
forward. The softmax runs in base 2 (exp2 with scale * log2(e)); `lse` is returned in natural-log units.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa.config import NSAConfig
from nsa.inputs import check_config, check_cu_seqlens, check_float_tensors, check_keys_values, resolve_scale
from nsa.kernels.delta import attention_delta
from nsa.kernels.packing import PackedSequences
from nsa.kernels.runtime import (cdiv, check_kernel_inputs, check_launch_params, compute_dtype, dot_precision,
                                 head_dim_block, interpreting, key_value_sources, new_output, pack, row_mask,
                                 query_tile_sources, store_or_add)

LOG2E = 1.4426950408889634
_LOG2E = tl.constexpr(LOG2E)  # the same, for use inside kernels


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

@triton.jit
def _key_band(m0, seqlen, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles for query positions [m0, m0 + BLOCK_M): masked [start, full_lo), full [full_lo, full_hi),
    masked [full_hi, end). A full tile has every key inside the window of every query position."""
    first = tl.maximum(m0 - window + 1, 0)
    end = tl.minimum(m0 + BLOCK_M, seqlen)
    start = (first // BLOCK_N) * BLOCK_N
    # First tile whose keys are all >= (last position) - w + 1; first tile not wholly at or below m0.
    gap = tl.maximum(m0 + BLOCK_M - window - start, 0)
    full_lo = start + tl.cdiv(gap, BLOCK_N) * BLOCK_N
    full_hi = start + ((m0 + 1 - start) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(full_lo, full_hi)
    return start, full_lo, full_hi, end


@triton.jit
def _query_band(n0, seqlen, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query tiles (from n0, step BLOCK_M) that see keys [n0, n0 + BLOCK_N): masked [n0, full_lo), full
    [full_lo, full_hi), masked [full_hi, end). A full tile's positions all see every key of the tile."""
    end = tl.minimum(n0 + BLOCK_N - 1 + window, seqlen)
    full_lo = n0 + tl.cdiv(BLOCK_N - 1, BLOCK_M) * BLOCK_M
    full_hi = n0 + ((tl.minimum(n0 + window, seqlen) - n0) // BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(full_lo, full_hi)
    return full_lo, full_hi, end


@triton.jit
def _load_rows(ptrs, row_valid, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile; rows masked by `row_valid` only when CHECK_ROWS, zeros past HEAD_DIM."""
    if CHECK_ROWS:
        return tl.load(ptrs, mask=row_mask(row_valid, offs_d, HEAD_DIM, BLOCK_D), other=0.0)
    elif BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def _key_rows(src, start_n, keys, key_valid, row0, col, stride_t, offs_d, HEAD_DIM: tl.constexpr,
              BLOCK_D: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """Keys [start_n, start_n + BLOCK_N) of one kv head: a TMA copy of the descriptor src's tile at
    (row0 + start_n, col), or pointer loads from src at that head's key 0 (rows past the sequence zeroed when
    MASK). A TMA tile may hold the next sequence's keys: the caller masks them, they are finite."""
    if TMA:
        return src.load([row0 + start_n, col])
    else:
        return _load_rows(src + keys.to(tl.int64)[:, None] * stride_t + offs_d[None, :], key_valid, offs_d,
                          HEAD_DIM, BLOCK_D, MASK)


@triton.jit
def _key_value_tiles(k_src, v_src, start_n, offs_n, seqlen, row0, k_col, v_col, stride_kt, stride_vt, offs_dk, offs_dv,
                     HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DK: tl.constexpr,
                     BLOCK_DV: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr):
    """The key positions start_n + offs_n and their K and V tiles (`_key_rows` of each source)."""
    keys = start_n + offs_n
    key_valid = keys < seqlen
    k = _key_rows(k_src, start_n, keys, key_valid, row0, k_col, stride_kt, offs_dk, HEAD_DIM_K, BLOCK_DK, MASK, TMA)
    v = _key_rows(v_src, start_n, keys, key_valid, row0, v_col, stride_vt, offs_dv, HEAD_DIM_V, BLOCK_DV, MASK, TMA)
    return keys, k, v


@triton.jit
def _key_sources(K, V, seq_start, hk, stride_kt, stride_kh, stride_vt, stride_vh, HEAD_DIM_K: tl.constexpr,
                 HEAD_DIM_V: tl.constexpr, TMA: tl.constexpr):
    """What `_key_rows` reads for kv head hk: (k source, v source, row0, k column, v column)."""
    if TMA:
        return K, V, seq_start.to(tl.int32), hk * HEAD_DIM_K, hk * HEAD_DIM_V
    else:
        return (K + seq_start * stride_kt + hk * stride_kh, V + seq_start * stride_vt + hk * stride_vh,
                0, 0, 0)


@triton.jit
def _window_fwd_inner(acc, l_i, m_i, q, pos, k_src, v_src, row0, k_col, v_col, stride_kt, stride_vt, seqlen,
                      window, qk_scale, lo, hi, offs_n, offs_dk, offs_dv,
                      HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Online softmax over key tiles [lo, hi) (step BLOCK_N) of the sources from `_key_sources`."""
    for start_n in range(lo, hi, BLOCK_N):
        keys, k, v = _key_value_tiles(k_src, v_src, start_n, offs_n, seqlen, row0, k_col, v_col, stride_kt, stride_vt,
                                      offs_dk, offs_dv, HEAD_DIM_K, HEAD_DIM_V, BLOCK_DK, BLOCK_DV, MASK, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASK:
            inside = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)
            qk = tl.where(inside, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_tile(CU_SEQLENS, num_kv_heads, group, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr):
    """The query tile of this program (grid: tiles, sequences x kv heads x head blocks of the group): its first
    position m0, the sequence's start token (int64) and length, the kv head and head block."""
    pid = tl.program_id(1)
    head_blocks = tl.cdiv(group, BLOCK_H)
    seq = pid // (head_blocks * num_kv_heads)
    seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    return (tl.program_id(0) * BLOCK_M, seq_start, (tl.load(CU_SEQLENS + seq + 1) - seq_start).to(tl.int32),
            (pid // head_blocks) % num_kv_heads, pid % head_blocks)


@triton.jit
def _query_rows(m0, seqlen, hk, hb, group, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, EVEN_HEADS: tl.constexpr):
    """The rows of a query tile (row r = position r // BLOCK_H, head r % BLOCK_H of head block hb): positions,
    query heads, which rows are real."""
    offs_r = tl.arange(0, BLOCK_M * BLOCK_H)
    pos = m0 + offs_r // BLOCK_H
    head_in_group = hb * BLOCK_H + offs_r % BLOCK_H
    row_valid = pos < seqlen
    if not EVEN_HEADS:
        row_valid = row_valid & (head_in_group < group)
    return pos, hk * group + head_in_group, row_valid


@triton.jit
def window_attention_fwd_kernel(
        Q, K, V, O, LSE, CU_SEQLENS, qk_scale, window, num_kv_heads, group,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lseh,
        HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_HEADS: tl.constexpr,
        TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (query tiles of the longest sequence, sequences x kv heads x head blocks of the group). With TMA, K
    and V are descriptors (`runtime.tma_rows`)."""
    m0, seq_start, seqlen, hk, hb = _query_tile(CU_SEQLENS, num_kv_heads, group, BLOCK_M, BLOCK_H)
    if m0 >= seqlen:
        return

    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos, head, row_valid = _query_rows(m0, seqlen, hk, hb, group, BLOCK_M, BLOCK_H, EVEN_HEADS)

    q_ptrs = Q + (seq_start + pos)[:, None] * stride_qt + head[:, None] * stride_qh + offs_dk[None, :]
    q = tl.load(q_ptrs, mask=row_mask(row_valid, offs_dk, HEAD_DIM_K, BLOCK_DK), other=0.0)
    k_src, v_src, row0, k_col, v_col = _key_sources(K, V, seq_start, hk, stride_kt, stride_kh, stride_vt, stride_vh,
                                                    HEAD_DIM_K, HEAD_DIM_V, TMA)

    acc = tl.zeros([BLOCK_M * BLOCK_H, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M * BLOCK_H], dtype=tl.float32)
    # A finite floor: a row whose keys in a boundary tile are all masked keeps alpha = 1 and p = 0.
    m_i = tl.full([BLOCK_M * BLOCK_H], -1.0e30, dtype=tl.float32)

    start, full_lo, full_hi, end = _key_band(m0, seqlen, window, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _window_fwd_inner(acc, l_i, m_i, q, pos, k_src, v_src, row0, k_col, v_col, stride_kt,
                                      stride_vt, seqlen, window, qk_scale, start, full_lo, offs_n, offs_dk, offs_dv,
                                      HEAD_DIM_K, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, True, TMA, DOT_PRECISION)
    acc, l_i, m_i = _window_fwd_inner(acc, l_i, m_i, q, pos, k_src, v_src, row0, k_col, v_col, stride_kt,
                                      stride_vt, seqlen, window, qk_scale, full_lo, full_hi, offs_n, offs_dk, offs_dv,
                                      HEAD_DIM_K, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, False, TMA, DOT_PRECISION)
    acc, l_i, m_i = _window_fwd_inner(acc, l_i, m_i, q, pos, k_src, v_src, row0, k_col, v_col, stride_kt,
                                      stride_vt, seqlen, window, qk_scale, full_hi, end, offs_n, offs_dk, offs_dv,
                                      HEAD_DIM_K, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, True, TMA, DOT_PRECISION)

    # Every valid row sees at least its own key, so l_i > 0 there; padding rows are guarded and not stored.
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    o_ptrs = O + (seq_start + pos)[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_mask(row_valid, offs_dv, HEAD_DIM_V, BLOCK_DV))
    lse = (m_i + tl.math.log2(l_safe)) / _LOG2E
    tl.store(LSE + head * stride_lseh + seq_start + pos, lse, mask=row_valid)


@triton.jit
def _window_bwd_dkdv_inner(dk, dv, k, v, keys, q_src, do_src, lse_ptr, delta_ptr, stride_qt, stride_qh,
                           stride_dot, stride_doh, stride_lseh, head_in_group, group, seqlen, window, qk_scale,
                           lo, hi, offs_r, offs_dk, offs_dv, tok0, head0,
                           HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
                           EVEN_HEADS: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr,
                           DOT_PRECISION: tl.constexpr):
    """Accumulate dk, dv [BLOCK_N, D] over query tiles [lo, hi) (step BLOCK_M) of the heads `head_in_group`.
    q_src/do_src point at (token 0, head 0 of the group), or with TMA are descriptors of [BLOCK_M, BLOCK_H, D]
    boxes (`runtime.tma_head_tiles`) read at (token tok0 + position, head head0), whose rows past the sequence or
    the group hold finite values of other tokens or heads (or zeros) and get p = 0 from their lse.
    lse_ptr/delta_ptr point at (head 0 of the group, token 0)."""
    CHECK_ROWS: tl.constexpr = MASK or not EVEN_HEADS
    ROWS: tl.constexpr = BLOCK_M * BLOCK_H
    for start_m in range(lo, hi, BLOCK_M):
        pos = start_m + offs_r // BLOCK_H
        row_valid = pos < seqlen
        if not EVEN_HEADS:
            row_valid = row_valid & (head_in_group < group)
        if TMA:
            q = tl.reshape(q_src.load([tok0 + start_m, head0, 0]), [ROWS, BLOCK_DK])
            do = tl.reshape(do_src.load([tok0 + start_m, head0, 0]), [ROWS, BLOCK_DV])
        else:
            pos64 = pos.to(tl.int64)
            q = _load_rows(q_src + pos64[:, None] * stride_qt + head_in_group[:, None] * stride_qh
                           + offs_dk[None, :], row_valid, offs_dk, HEAD_DIM_K, BLOCK_DK, CHECK_ROWS)
            do = _load_rows(do_src + pos64[:, None] * stride_dot + head_in_group[:, None] * stride_doh
                            + offs_dv[None, :], row_valid, offs_dv, HEAD_DIM_V, BLOCK_DV, CHECK_ROWS)
        lse_ptrs = lse_ptr + head_in_group * stride_lseh + pos
        delta_ptrs = delta_ptr + head_in_group * stride_lseh + pos
        if CHECK_ROWS:
            # lse = +inf on invalid rows makes their probabilities exactly 0.
            lse2 = tl.load(lse_ptrs, mask=row_valid, other=float("inf")) * _LOG2E
            delta = tl.load(delta_ptrs, mask=row_valid, other=0.0)
        else:
            lse2 = tl.load(lse_ptrs) * _LOG2E
            delta = tl.load(delta_ptrs)
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)  # [BLOCK_N, rows]
        p_t = tl.math.exp2(qk_t * qk_scale - lse2[None, :])
        if MASK:
            inside = (keys[:, None] <= pos[None, :]) & (keys[:, None] > pos[None, :] - window) & row_valid[None, :]
            p_t = tl.where(inside, p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def window_attention_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS, scale, qk_scale, window, num_kv_heads, group,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lseh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh,
        HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_HEADS: tl.constexpr,
        TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (key tiles of the longest sequence, sequences x kv heads). LSE and DELTA share strides [Hq, Ttot].
    With TMA, Q and DO are descriptors of query tiles (`_window_bwd_dkdv_inner`)."""
    pid_n = tl.program_id(0)
    pid = tl.program_id(1)
    hk = pid % num_kv_heads
    seq = pid // num_kv_heads
    seq_start = tl.load(CU_SEQLENS + seq).to(tl.int64)
    seqlen = (tl.load(CU_SEQLENS + seq + 1) - seq_start).to(tl.int32)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return

    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_M * BLOCK_H)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    keys = n0 + offs_n
    key_valid = keys < seqlen
    k = tl.load(K + (seq_start + keys)[:, None] * stride_kt + hk * stride_kh + offs_dk[None, :],
                mask=row_mask(key_valid, offs_dk, HEAD_DIM_K, BLOCK_DK), other=0.0)
    v = tl.load(V + (seq_start + keys)[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                mask=row_mask(key_valid, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    if TMA:
        q_src, do_src = Q, DO
    else:
        q_src = Q + seq_start * stride_qt + hk * group * stride_qh
        do_src = DO + seq_start * stride_dot + hk * group * stride_doh
    tok0 = seq_start.to(tl.int32)
    lse_ptr = LSE + hk * group * stride_lseh + seq_start
    delta_ptr = DELTA + hk * group * stride_lseh + seq_start
    full_lo, full_hi, end = _query_band(n0, seqlen, window, BLOCK_M, BLOCK_N)
    for h0 in range(0, group, BLOCK_H):
        head_in_group = h0 + offs_r % BLOCK_H
        dk, dv = _window_bwd_dkdv_inner(dk, dv, k, v, keys, q_src, do_src, lse_ptr, delta_ptr, stride_qt,
                                        stride_qh, stride_dot, stride_doh, stride_lseh, head_in_group, group,
                                        seqlen, window, qk_scale, n0, full_lo, offs_r, offs_dk, offs_dv, tok0,
                                        hk * group + h0, HEAD_DIM_K, HEAD_DIM_V, BLOCK_M, BLOCK_H, BLOCK_DK,
                                        BLOCK_DV, EVEN_HEADS, True, TMA, DOT_PRECISION)
        dk, dv = _window_bwd_dkdv_inner(dk, dv, k, v, keys, q_src, do_src, lse_ptr, delta_ptr, stride_qt,
                                        stride_qh, stride_dot, stride_doh, stride_lseh, head_in_group, group,
                                        seqlen, window, qk_scale, full_lo, full_hi, offs_r, offs_dk, offs_dv, tok0,
                                        hk * group + h0, HEAD_DIM_K, HEAD_DIM_V, BLOCK_M, BLOCK_H, BLOCK_DK,
                                        BLOCK_DV, EVEN_HEADS, False, TMA, DOT_PRECISION)
        dk, dv = _window_bwd_dkdv_inner(dk, dv, k, v, keys, q_src, do_src, lse_ptr, delta_ptr, stride_qt,
                                        stride_qh, stride_dot, stride_doh, stride_lseh, head_in_group, group,
                                        seqlen, window, qk_scale, full_hi, end, offs_r, offs_dk, offs_dv, tok0,
                                        hk * group + h0, HEAD_DIM_K, HEAD_DIM_V, BLOCK_M, BLOCK_H, BLOCK_DK,
                                        BLOCK_DV, EVEN_HEADS, True, TMA, DOT_PRECISION)

    dk = dk * scale
    tl.store(DK + (seq_start + keys)[:, None] * stride_dkt + hk * stride_dkh + offs_dk[None, :],
             dk.to(DK.dtype.element_ty), mask=row_mask(key_valid, offs_dk, HEAD_DIM_K, BLOCK_DK))
    tl.store(DV + (seq_start + keys)[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=row_mask(key_valid, offs_dv, HEAD_DIM_V, BLOCK_DV))


@triton.jit
def _window_bwd_dq_inner(dq, q, do, lse2, delta, pos, k_src, v_src, row0, k_col, v_col, stride_kt, stride_vt,
                         seqlen, window, qk_scale, lo, hi, offs_n, offs_dk, offs_dv,
                         HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Accumulate dq / scale [rows, BLOCK_DK] over key tiles [lo, hi) (step BLOCK_N)."""
    for start_n in range(lo, hi, BLOCK_N):
        keys, k, v = _key_value_tiles(k_src, v_src, start_n, offs_n, seqlen, row0, k_col, v_col, stride_kt, stride_vt,
                                      offs_dk, offs_dv, HEAD_DIM_K, HEAD_DIM_V, BLOCK_DK, BLOCK_DV, MASK, TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        p = tl.math.exp2(qk * qk_scale - lse2[:, None])
        if MASK:
            inside = (keys[None, :] <= pos[:, None]) & (keys[None, :] > pos[:, None] - window)
            p = tl.where(inside, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def window_attention_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, DQ_ADD, CU_SEQLENS, scale, qk_scale, window, num_kv_heads, group,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lseh,
        stride_dqt, stride_dqh,
        HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, EVEN_HEADS: tl.constexpr,
        ACCUMULATE: tl.constexpr, ADD: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid and TMA as the forward's. LSE and DELTA share strides [Hq, Ttot]. With ACCUMULATE, dq is added to DQ
    (the other branches' share of the gradient), which costs one read instead of a separate pass summing them; with
    ADD, DQ_ADD (DQ's strides) is added too."""
    m0, seq_start, seqlen, hk, hb = _query_tile(CU_SEQLENS, num_kv_heads, group, BLOCK_M, BLOCK_H)
    if m0 >= seqlen:
        return

    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    pos, head, row_valid = _query_rows(m0, seqlen, hk, hb, group, BLOCK_M, BLOCK_H, EVEN_HEADS)

    q = tl.load(Q + (seq_start + pos)[:, None] * stride_qt + head[:, None] * stride_qh + offs_dk[None, :],
                mask=row_mask(row_valid, offs_dk, HEAD_DIM_K, BLOCK_DK), other=0.0)
    do = tl.load(DO + (seq_start + pos)[:, None] * stride_dot + head[:, None] * stride_doh + offs_dv[None, :],
                 mask=row_mask(row_valid, offs_dv, HEAD_DIM_V, BLOCK_DV), other=0.0)
    lse2 = tl.load(LSE + head * stride_lseh + seq_start + pos, mask=row_valid, other=float("inf")) * _LOG2E
    delta = tl.load(DELTA + head * stride_lseh + seq_start + pos, mask=row_valid, other=0.0)
    k_src, v_src, row0, k_col, v_col = _key_sources(K, V, seq_start, hk, stride_kt, stride_kh, stride_vt, stride_vh,
                                                    HEAD_DIM_K, HEAD_DIM_V, TMA)
    dq = tl.zeros([BLOCK_M * BLOCK_H, BLOCK_DK], dtype=tl.float32)

    start, full_lo, full_hi, end = _key_band(m0, seqlen, window, BLOCK_M, BLOCK_N)
    dq = _window_bwd_dq_inner(dq, q, do, lse2, delta, pos, k_src, v_src, row0, k_col, v_col, stride_kt,
                              stride_vt, seqlen, window, qk_scale, start, full_lo, offs_n, offs_dk, offs_dv,
                              HEAD_DIM_K, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, True, TMA, DOT_PRECISION)
    dq = _window_bwd_dq_inner(dq, q, do, lse2, delta, pos, k_src, v_src, row0, k_col, v_col, stride_kt,
                              stride_vt, seqlen, window, qk_scale, full_lo, full_hi, offs_n, offs_dk, offs_dv,
                              HEAD_DIM_K, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, False, TMA, DOT_PRECISION)
    dq = _window_bwd_dq_inner(dq, q, do, lse2, delta, pos, k_src, v_src, row0, k_col, v_col, stride_kt,
                              stride_vt, seqlen, window, qk_scale, full_hi, end, offs_n, offs_dk, offs_dv,
                              HEAD_DIM_K, HEAD_DIM_V, BLOCK_N, BLOCK_DK, BLOCK_DV, True, TMA, DOT_PRECISION)
    dq_offs = (seq_start + pos)[:, None] * stride_dqt + head[:, None] * stride_dqh + offs_dk[None, :]
    dq_mask = row_mask(row_valid, offs_dk, HEAD_DIM_K, BLOCK_DK)
    dq = dq * scale
    if ADD:
        dq += tl.load(DQ_ADD + dq_offs, mask=dq_mask, other=0.0).to(tl.float32)
    store_or_add(DQ + dq_offs, dq, dq_mask, ACCUMULATE)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WindowAttentionParams:
    """Launch parameters of the window kernels (one source for forward, backward and the tuner).

    Each kernel's rows are `*_block_m` query positions x `*_block_h` query heads of one GQA group (the heads
    share every K/V tile the program loads); `*_block_n` keys per inner step. All tiles are powers of two; the
    dot dimensions rows = block_m * block_h and block_n must be >= 16 (a GPU `tl.dot` requirement).

    Attributes:
        fwd_block_m, fwd_block_n, fwd_block_h, fwd_num_warps, fwd_num_stages: forward kernel.
        dkdv_block_m, dkdv_block_n, dkdv_block_h, dkdv_num_warps, dkdv_num_stages: dk/dv kernel; its program
            owns dkdv_block_n keys and steps over dkdv_block_m positions x dkdv_block_h heads at a time.
        dq_block_m, dq_block_n, dq_block_h, dq_num_warps, dq_num_stages: dq kernel (tiled like the forward).
        fwd_tma, dq_tma: the forward's and the dq kernel's K/V tiles read by TMA copies (tensor descriptors)
            where the GPU and layout allow (`runtime.tma_rows`), else by pointer loads. The dq kernel gained
            2-4% from them on an H200 at every length measured; the forward gained 6-12% from 16k tokens but
            lost 20-30% at 4k in one call (session 16; the session-17 tune chose TMA at 4k), so its flag is off
            unless tuned on.
        dkdv_tma: the dk/dv kernel's q and dO tiles read by TMA copies of [dkdv_block_m, dkdv_block_h, D] boxes
            where the GPU and layout allow (`runtime.tma_head_tiles`), else by pointer loads. On an H200 the
            default 16-bit tile gained 5-7% of the window's fwd + bwd from 2k to 128k with them (its sm_90 spills
            520 -> 16 bytes; session 18); fp32 keeps pointer loads, as for dq.
    """

    # Field defaults: default_params() for 16-bit inputs, head dim 128 and G = 1.
    fwd_block_m: int = 128
    fwd_block_n: int = 64
    fwd_block_h: int = 1
    fwd_num_warps: int = 8
    fwd_num_stages: int = 3
    dkdv_block_m: int = 32
    dkdv_block_n: int = 64
    dkdv_block_h: int = 1
    dkdv_num_warps: int = 8
    dkdv_num_stages: int = 2
    dq_block_m: int = 64
    dq_block_n: int = 64
    dq_block_h: int = 1
    dq_num_warps: int = 8
    dq_num_stages: int = 3
    fwd_tma: bool = False
    dq_tma: bool = True
    dkdv_tma: bool = True

    def __post_init__(self):
        check_launch_params(self, tiles=("fwd_", "dkdv_", "dq_"), flags=("_tma",))


def _heads_per_program(group: int, rows: int) -> int:
    """Heads packed per program: the largest power of two dividing G and at most rows // 16 (>= 16 positions)."""
    block_h = 1
    while group % (2 * block_h) == 0 and 2 * block_h <= rows // 16:
        block_h *= 2
    return block_h


# (rows = block_m * block_h, block_n, num_warps, num_stages) per kernel, by the larger head dim (16-bit inputs).
# Chosen from sm_90 compiles without register spills (ptxas -v); the tuner searches around them. Head dim 128's
# dk/dv runs on 4 warps, as every H200 paper-suite tune from 4k to 128k chose: its 64 keys are the M side of the
# MMA, half a warpgroup's on 8 warps (the window dk/dv kernel 11.3 -> 6.4 ms at 64k).
_DEFAULT_TILES = {
    64: dict(fwd=(128, 64, 8, 3), dkdv=(32, 128, 8, 2), dq=(128, 64, 8, 2)),
    128: dict(fwd=(128, 64, 8, 3), dkdv=(32, 64, 4, 2), dq=(64, 64, 8, 3)),
    256: dict(fwd=(64, 32, 8, 2), dkdv=(32, 32, 8, 2), dq=(32, 32, 4, 2)),
}
# fp32 runs exact ("ieee") dots on CUDA cores, whose operands live in registers: small tiles, and pointer loads in
# the dq kernel too (TMA tiles land in shared memory; their copy to registers made the fp32 kernels spill on sm_90).
_DEFAULT_TILES_FP32 = {
    64: dict(fwd=(64, 32, 8, 2), dkdv=(32, 32, 8, 2), dq=(32, 32, 8, 2)),
    128: dict(fwd=(32, 16, 8, 2), dkdv=(16, 32, 8, 2), dq=(32, 16, 8, 2)),
    256: dict(fwd=(16, 32, 8, 2), dkdv=(16, 16, 8, 2), dq=(16, 16, 8, 2)),
}


# The interpreter pays per program and per loop step, not per element: large tiles.
_INTERPRETER_TILES = dict(fwd=(64, 64, 4, 1), dkdv=(64, 64, 4, 1), dq=(64, 64, 4, 1))


# What `nsa tune` searches (nsa.tuner.spaces builds candidates from these, prunes them by the device's limits):
# ranges of the fields above on a GPU, and a few tile sizes for the interpreter, which ignores warps and stages and
# pays per program (CI runs those).
SEARCH_SPACE = dict(fwd_block_m=[16, 32, 64, 128], fwd_block_n=[16, 32, 64, 128], fwd_num_warps=[4, 8],
                    fwd_num_stages=[1, 2, 3], fwd_tma=[False, True])
INTERPRETER_SEARCH_SPACE = dict(fwd_block_n=[32, 64])
# The backward kernels (`window_bwd`). The dk/dv key tile is the M side of its products: 64 keys on 8 warps
# leave each warpgroup's MMA half empty, which 4 warps (or 128 keys) avoid. The H200 paper-suite tune chose 64
# keys on 4 warps from 4k to 128k (the dk/dv kernel 11.3 -> 6.4 ms at 64k; docs/performance.md).
BACKWARD_SEARCH_SPACE = dict(dkdv_block_m=[8, 16, 32], dkdv_block_n=[64, 128], dkdv_num_warps=[4, 8],
                             dq_block_m=[8, 16, 32], dkdv_tma=[False, True])
INTERPRETER_BACKWARD_SEARCH_SPACE = dict(dkdv_block_n=[16, 64])


def default_params(num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int, config: NSAConfig = None,
                   device=None, dtype: torch.dtype | None = None) -> WindowAttentionParams:
    """A sane default for the shape (the tuner searches better ones). The group's heads are packed into each
    program (the largest power of two dividing G, keeping >= 16 positions), so a K/V tile feeds them all.
    `dtype` is the compute dtype (16-bit when None); `config` and `device` are accepted for a uniform call
    across kernel families and do not change the choice yet."""
    group = num_heads // num_kv_heads
    dmax = max(head_dim, head_dim_v)
    if interpreting():
        tiles = _INTERPRETER_TILES
    else:
        table = _DEFAULT_TILES_FP32 if dtype == torch.float32 else _DEFAULT_TILES
        tiles = table[64 if dmax <= 64 else 128 if dmax <= 128 else 256]
    fields = {}
    for kernel, (rows, block_n, num_warps, num_stages) in tiles.items():
        block_h = _heads_per_program(group, rows)
        fields.update({f"{kernel}_block_m": rows // block_h, f"{kernel}_block_n": block_n,
                       f"{kernel}_block_h": block_h, f"{kernel}_num_warps": num_warps,
                       f"{kernel}_num_stages": num_stages})
    if dtype == torch.float32 and not interpreting():
        fields.update(dq_tma=False, dkdv_tma=False)
    return WindowAttentionParams(**fields)


def _head_tiles(q: torch.Tensor, v: torch.Tensor) -> tuple[int, int]:
    return head_dim_block(q.shape[-1]), head_dim_block(v.shape[-1])


def window_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSequences,
                         config: NSAConfig, scale: float, params: WindowAttentionParams):
    """Forward on packed tensors q [Ttot, Hq, Dk], k [Ttot, Hkv, Dk], v [Ttot, Hkv, Dv] (contiguous).

    Returns o [Ttot, Hq, Dv] (q's dtype) and lse [Hq, Ttot] float32 (natural log of each row's softmax sum).
    """
    total, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[2]
    group = num_heads // num_kv_heads
    o = new_output((total, num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    lse = new_output((num_heads, total), dtype=torch.float32, device=q.device)
    if total == 0 or seqs.max_seqlen == 0:
        return o, lse
    block_dk, block_dv = _head_tiles(q, v)
    bm, bn, bh = params.fwd_block_m, params.fwd_block_n, params.fwd_block_h
    k_src, v_src = key_value_sources(k, v, bn, block_dk, block_dv, params.fwd_tma)
    grid = (cdiv(seqs.max_seqlen, bm), seqs.num_seqs * num_kv_heads * cdiv(group, bh))
    window_attention_fwd_kernel[grid](
        q, k_src, v_src, o, lse, seqs.cu_seqlens, scale * LOG2E, config.window, num_kv_heads, group,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        lse.stride(0),
        HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=bm, BLOCK_N=bn, BLOCK_H=bh, BLOCK_DK=block_dk,
        BLOCK_DV=block_dv, EVEN_HEADS=group % bh == 0, TMA=k_src is not k, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=params.fwd_num_warps, num_stages=params.fwd_num_stages)
    return o, lse


def window_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                         lse: torch.Tensor, seqs: PackedSequences, config: NSAConfig, scale: float,
                         params: WindowAttentionParams, *, delta: torch.Tensor | None = None,
                         dq: torch.Tensor | None = None, dq_add: torch.Tensor | None = None):
    """Backward on packed tensors (shapes as `window_attention_fwd`; do like o). Returns dq, dk, dv.

    delta: rowsum(do * o) [Hq, Ttot] fp32 when the caller has it (else computed here). dq: a gradient of q
    (contiguous, q's dtype) that this branch's dq is added to in place and returned (else a new tensor). dq_add:
    one more gradient of q (likewise) that the dq kernel adds in as it writes, instead of a pass of its own.
    """
    total, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[2]
    group = num_heads // num_kv_heads
    accumulate = dq is not None
    dq = new_output(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    if dq_add is not None and (dq_add.shape != dq.shape or dq_add.stride() != dq.stride()):
        raise ValueError(f"window_attention_bwd: dq_add must be laid out as dq {tuple(dq.shape)} "
                         f"(strides {dq.stride()}), got {tuple(dq_add.shape)} (strides {dq_add.stride()})")
    dk = new_output(k.shape, dtype=k.dtype, device=k.device)
    dv = new_output(v.shape, dtype=v.dtype, device=v.device)
    if total == 0 or seqs.max_seqlen == 0:
        return dq, dk, dv
    block_dk, block_dv = _head_tiles(q, v)
    precision = dot_precision(q.dtype)

    delta = attention_delta(o, do) if delta is None else delta

    common = (scale, scale * LOG2E, config.window, num_kv_heads, group,
              q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
              do.stride(0), do.stride(1), lse.stride(0))
    bm, bn, bh = params.dkdv_block_m, params.dkdv_block_n, params.dkdv_block_h
    q_src, do_src = query_tile_sources(q, do, bm, bh, block_dk, block_dv, params.dkdv_tma)
    window_attention_bwd_dkdv_kernel[(cdiv(seqs.max_seqlen, bn), seqs.num_seqs * num_kv_heads)](
        q_src, k, v, do_src, lse, delta, dk, dv, seqs.cu_seqlens, *common,
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=bm, BLOCK_N=bn, BLOCK_H=bh, BLOCK_DK=block_dk,
        BLOCK_DV=block_dv, EVEN_HEADS=group % bh == 0, TMA=q_src is not q, DOT_PRECISION=precision,
        num_warps=params.dkdv_num_warps, num_stages=params.dkdv_num_stages)

    bm, bn, bh = params.dq_block_m, params.dq_block_n, params.dq_block_h
    k_src, v_src = key_value_sources(k, v, bn, block_dk, block_dv, params.dq_tma)
    grid = (cdiv(seqs.max_seqlen, bm), seqs.num_seqs * num_kv_heads * cdiv(group, bh))
    window_attention_bwd_dq_kernel[grid](
        q, k_src, v_src, do, lse, delta, dq, dq if dq_add is None else dq_add, seqs.cu_seqlens, *common,
        dq.stride(0), dq.stride(1), HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_M=bm, BLOCK_N=bn, BLOCK_H=bh,
        BLOCK_DK=block_dk, BLOCK_DV=block_dv, EVEN_HEADS=group % bh == 0, ACCUMULATE=accumulate,
        ADD=dq_add is not None, TMA=k_src is not k, DOT_PRECISION=precision, num_warps=params.dq_num_warps,
        num_stages=params.dq_num_stages)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------

class WindowAttentionFunction(torch.autograd.Function):
    """Packed window attention with the Triton backward; inputs [Ttot, H, D] in the compute dtype."""

    @staticmethod
    def forward(ctx, q, k, v, seqs: PackedSequences, config: NSAConfig, scale: float,
                params: WindowAttentionParams):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = window_attention_fwd(q, k, v, seqs, config, scale, params)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.seqs, ctx.config, ctx.scale, ctx.params = seqs, config, scale, params
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = window_attention_bwd(do.contiguous(), q, k, v, o, lse, ctx.seqs, ctx.config, ctx.scale,
                                          ctx.params)
        return dq, dk, dv, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, config, cu_seqlens):
    check_config(config)
    check_float_tensors(dict(q=q, k=k, v=v), dict(q=4, k=4, v=4))
    _, head_dim_v = check_keys_values(q, k, v)
    check_kernel_inputs(q, max(q.shape[3], head_dim_v))
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, q.shape[0], q.shape[1], q.device)


def window_attention(q, k, v, config: NSAConfig, *, scale=None, cu_seqlens=None, params=None):
    """Sliding-window attention (SPEC 1.6) with Triton kernels: query t sees keys max(0, t - w + 1) <= s <= t.

    Args:
        q: [B, T, Hq, Dk] queries (float16, bfloat16 or float32; CUDA, or CPU under TRITON_INTERPRET=1).
        k: [B, T, Hkv, Dk] keys, v: [B, T, Hkv, Dv] values, same dtype and device; Hq = G * Hkv, query head h
            reads kv head h // G. Head dims up to 256, Dk and Dv may differ.
        config: NSAConfig; only `window` (w, tokens including the current one) is used.
        scale: softmax scale, Dk ** -0.5 by default.
        cu_seqlens: int32 [N+1] offsets of N packed sequences (B = 1); windows never cross a sequence boundary.
        params: WindowAttentionParams; `default_params(...)` for the shape when None.
    Returns:
        o_win [B, T, Hq, Dv] in q's dtype; differentiable with respect to q, k and v.

    Example:
        >>> cfg = NSAConfig(window=512)
        >>> q = torch.randn(1, 4096, 64, 128, device="cuda", dtype=torch.bfloat16)
        >>> k, v = torch.randn(2, 1, 4096, 4, 128, device="cuda", dtype=torch.bfloat16)
        >>> o = window_attention(q, k, v, cfg)  # [1, 4096, 64, 128]
    """
    _check_inputs(q, k, v, config, cu_seqlens)
    scale = resolve_scale(scale, q.shape[-1])
    batch, seqlen, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[2], v.shape[3]
    cdt = compute_dtype(q.dtype)
    if params is None:
        params = default_params(num_heads, num_kv_heads, head_dim, head_dim_v, config, q.device, cdt)
    elif not isinstance(params, WindowAttentionParams):
        raise TypeError(f"params must be a WindowAttentionParams, got {type(params).__name__}")
    seqs = PackedSequences.build(config, batch, seqlen, q.device, cu_seqlens)
    o = WindowAttentionFunction.apply(pack(q, cdt), pack(k, cdt), pack(v, cdt), seqs, config, scale, params)
    return o.reshape(batch, seqlen, num_heads, head_dim_v).to(q.dtype)


__all__ = ["window_attention", "window_attention_fwd", "window_attention_bwd", "WindowAttentionParams",
           "default_params", "window_attention_fwd_kernel", "window_attention_bwd_dkdv_kernel",
           "window_attention_bwd_dq_kernel"]
