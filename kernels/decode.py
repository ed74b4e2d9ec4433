"""Decoding (SPEC 1.9) in Triton: the newest n tokens of each cached sequence attend to everything before them.

Memory-bound by design. A *row* is one query token of one sequence and one kv head; its G query heads are the
rows of every score tile (padded to 16 for `tl.dot`), so each key/value byte is read once per GQA group. Work
is split across the machine when the batch is small (split-K), and every size the grid depends on comes from
the cache's capacity, never from the lengths on the device: no host synchronisation, so a step can be captured
in a CUDA graph. Five launches:

1. `compressed_partials_kernel` (grid: cmp_splits x rows): each split attends to its share of the compressed
   tokens the row sees, writes a partial (max, sum, unnormalised output) and the raw scores (fp32, log2 units)
   that selection reuses instead of recomputing q.k_cmp.
2. `block_importance_kernel` (grid: importance_splits x rows): merges the partials' log-sum-exp, turns the
   scores into p_cmp summed over the group's heads and weighs them into selection-block importances (the
   overlap weights of `nsa.kernels.selection`); forced blocks (initial, local) get +inf.
3. `top_blocks_kernel` (grid: rows): the top-n of the row held in registers, by Triton's bitonic top-k over
   int64 keys (importance bits, then the complemented block index: ties to the lower index); block_indices come
   out ascending, -1 padded. At T=64k on an H200 it took 4.6 us at B=1, where a digit-wise search for the n-th
   largest importance (rounds of counts reduced across warps) took 7.4 and a running bitonic top-n 16.
4. `sparse_partials_kernel` (grid: (slc_splits + win_splits) x rows): split-K over the selected blocks and over
   the sliding window, reading keys through the page table.
5. `merge_branches_kernel` (grid: rows x G): merges each branch's partials and applies the gates.

With `DecodeParams.pdl` (Hopper and later) the five kernels are launched with programmatic dependent launch:
each one's programs start while the previous kernel finishes and wait for its writes before their first load, so
the launch gaps between them, about 2 us each under a CUDA graph, overlap work. The whole step as one persistent
launch (one program per SM, a grid barrier between the phases) was slower at every length on an H200: B=1 64k
33 us against 25, since one program per SM leaves too few warps in flight (docs/performance.md, session 11).

Merges load all of a row's splits at once: a loop over splits would be a chain of dependent loads, about half a
microsecond each (the first version's merges made a 30 us floor at B=1 on an H200; see docs/performance.md).

A token at position p of sequence b sits at row p % page_size of page block_table[b, p // page_size].
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa.config import NSAConfig
from nsa.inputs import check_config, check_cu_seqlens, check_float_tensors, expect_shape, resolve_scale
from nsa.kernels import runtime
from nsa.kernels.attention import nsa_attention
from nsa.kernels.compression import LOG2E, _num_visible
from nsa.kernels.kv_cache import KVCache
from nsa.kernels.selection import block_width, spill_weights

_NEG_LARGE = tl.constexpr(-1.0e30)  # a running max that starts finite, so no (-inf) - (-inf)
# The top-n holds a row's importances in registers as int64 keys: up to 16 warps x 32 threads x 64 blocks.
MAX_TOPN_WARPS = 16
MAX_SELECTION_BLOCKS = MAX_TOPN_WARPS * 32 * 64
INDEX_BITS = tl.constexpr(16)  # a top-n key's low bits: the complemented block index (< MAX_SELECTION_BLOCKS)
INDEX_MASK = tl.constexpr((1 << INDEX_BITS.value) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_coords(row, NUM_QUERIES: tl.constexpr, NUM_KV_HEADS: tl.constexpr):
    """(sequence, query token, kv head) of a row: rows are ordered sequence-major, then token, then kv head."""
    return row // (NUM_KV_HEADS * NUM_QUERIES), (row // NUM_KV_HEADS) % NUM_QUERIES, row % NUM_KV_HEADS


@triton.jit
def _row_position(seqlens, row, NUM_QUERIES: tl.constexpr, NUM_KV_HEADS: tl.constexpr):
    """(sequence, query token, kv head, position) of a row; the n queries are the sequence's last n tokens."""
    seq, token, hk = _row_coords(row, NUM_QUERIES, NUM_KV_HEADS)
    pos = tl.load(seqlens + seq) - NUM_QUERIES + token
    return seq, token, hk, pos


@triton.jit
def _wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """With programmatic dependent launch (Hopper and later) a kernel's programs may start while the kernel before
    it in the stream still runs: wait here until that kernel's writes are visible, before any load, then let the
    next kernel's programs start (they wait likewise). What is hidden is the launch gap between two kernels."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _load_queries(q, seq, token, hk, stride_qb, stride_qt, stride_qh, G: tl.constexpr, DK: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr):
    """The group's G query heads [BLOCK_H, BLOCK_DK] (rows >= G are zero)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_dk = tl.arange(0, BLOCK_DK)
    ptrs = q + seq.to(tl.int64) * stride_qb + token * stride_qt + (hk * G + offs_h)[:, None] * stride_qh
    return tl.load(ptrs + offs_dk[None, :], mask=(offs_h < G)[:, None] & (offs_dk < DK)[None, :], other=0.0)


@triton.jit
def _softmax_step(acc, l_i, m_i, s, v_tile, PRECISION: tl.constexpr):
    """One online-softmax step: scores s [BLOCK_H, BLOCK_N] (log2 units, -inf where masked), values v_tile."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v_tile.dtype), v_tile, input_precision=PRECISION)
    return acc, l_i, m_new


@triton.jit
def _store_partial(part_o, part_m, part_l, split, row, num_rows, acc, l_i, m_i, G: tl.constexpr, DV: tl.constexpr,
                   BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Partial softmax state of one split: part_o [splits, rows, G, Dv], part_m/part_l [splits, rows, G]."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_dv = tl.arange(0, BLOCK_DV)
    base = (split * num_rows + row).to(tl.int64) * G
    tl.store(part_m + base + offs_h, m_i, mask=offs_h < G)
    tl.store(part_l + base + offs_h, l_i, mask=offs_h < G)
    tl.store(part_o + (base + offs_h)[:, None] * DV + offs_dv[None, :], acc,
             mask=(offs_h < G)[:, None] & (offs_dv < DV)[None, :])


@triton.jit
def _compressed_lse2(part_m, part_l, row, num_rows, G: tl.constexpr, SPLITS: tl.constexpr,
                     SPLITS_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """[BLOCK_H] log-sum-exp (log2 units) of the compressed branch, from its SPLITS partials (the first ones);
    +inf for a head that sees no compressed block. All splits in one load: no chain of dependent loads."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_h = tl.arange(0, BLOCK_H)
    at = (offs_s[:, None] * num_rows + row).to(tl.int64) * G + offs_h[None, :]
    ok = (offs_s < SPLITS)[:, None] & (offs_h < G)[None, :]
    m_s = tl.load(part_m + at, mask=ok, other=_NEG_LARGE)
    l_s = tl.load(part_l + at, mask=ok, other=0.0)
    m_all = tl.max(m_s, 0)
    l_all = tl.sum(l_s * tl.exp2(m_s - m_all[None, :]), 0)
    return tl.where(l_all > 0.0, m_all + tl.log2(tl.where(l_all > 0.0, l_all, 1.0)), float("inf"))


@triton.jit
def _merge_branch(part_o, part_m, part_l, first, row, head, num_rows, G: tl.constexpr, DV: tl.constexpr,
                  SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK_DV: tl.constexpr):
    """One head's output [BLOCK_DV] of a branch, merged from its splits [first, first + SPLITS) in one load
    (0 when the branch sees nothing)."""
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_ok = offs_s < SPLITS
    at = ((first + offs_s) * num_rows + row).to(tl.int64) * G + head
    m_s = tl.load(part_m + at, mask=s_ok, other=_NEG_LARGE)
    l_s = tl.load(part_l + at, mask=s_ok, other=0.0)
    o_s = tl.load(part_o + at[:, None] * DV + offs_dv[None, :], mask=s_ok[:, None] & (offs_dv < DV)[None, :],
                  other=0.0)
    weight = tl.exp2(m_s - tl.max(m_s, 0))
    total = tl.sum(l_s * weight, 0)
    return tl.sum(o_s * weight[:, None], 0) / tl.where(total > 0.0, total, 1.0)


@triton.jit
def compressed_partials_kernel(
        q, k_cmp, v_cmp, seqlens, scores, part_o, part_m, part_l,
        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
        stride_sr, stride_sh, num_rows, scale_log2,
        G: tl.constexpr, NUM_QUERIES: tl.constexpr, NUM_KV_HEADS: tl.constexpr, CMP_BLOCK: tl.constexpr,
        CMP_STRIDE: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr):
    """Split `program_id(0)` of the compressed attention of one row, and its raw scores."""
    _wait_for_previous_kernel(USE_PDL)
    split = tl.program_id(0)
    row = tl.program_id(1)
    seq, token, hk, pos = _row_position(seqlens, row, NUM_QUERIES, NUM_KV_HEADS)
    num_visible = _num_visible(pos, CMP_BLOCK, CMP_STRIDE)
    per_split = tl.cdiv(tl.cdiv(num_visible, BLOCK_N), SPLITS) * BLOCK_N
    lo = split * per_split
    hi = tl.minimum(lo + per_split, num_visible)

    q_tile = _load_queries(q, seq, token, hk, stride_qb, stride_qt, stride_qh, G, DK, BLOCK_H, BLOCK_DK)
    offs_h = tl.arange(0, BLOCK_H)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_cmp += seq.to(tl.int64) * stride_kb + hk * stride_kh
    v_cmp += seq.to(tl.int64) * stride_vb + hk * stride_vh
    scores += row.to(tl.int64) * stride_sr
    m_i = tl.full([BLOCK_H], _NEG_LARGE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k_t = tl.load(k_cmp + offs_n[None, :] * stride_kt + offs_dk[:, None],
                      mask=n_ok[None, :] & (offs_dk < DK)[:, None], other=0.0)
        s = tl.dot(q_tile, k_t, input_precision=PRECISION) * scale_log2
        s = tl.where(n_ok[None, :], s, float("-inf"))
        tl.store(scores + offs_h[:, None] * stride_sh + offs_n[None, :], s,
                 mask=(offs_h < G)[:, None] & n_ok[None, :])
        v_tile = tl.load(v_cmp + offs_n[:, None] * stride_vt + offs_dv[None, :],
                         mask=n_ok[:, None] & (offs_dv < DV)[None, :], other=0.0)
        acc, l_i, m_i = _softmax_step(acc, l_i, m_i, s, v_tile, PRECISION)
    _store_partial(part_o, part_m, part_l, split, row, num_rows, acc, l_i, m_i, G, DV, BLOCK_H, BLOCK_DV)


@triton.jit
def block_importance_kernel(
        scores, part_m, part_l, seqlens, importance,
        stride_sr, stride_sh, stride_ir, num_rows,
        G: tl.constexpr, NUM_QUERIES: tl.constexpr, NUM_KV_HEADS: tl.constexpr, CMP_BLOCK: tl.constexpr,
        CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr,
        CMP_SPLITS: tl.constexpr, CMP_SPLITS_PAD: tl.constexpr, SPLITS: tl.constexpr, BLOCK_H: tl.constexpr,
        CHUNK: tl.constexpr, RPAD: tl.constexpr, USE_PDL: tl.constexpr):
    """Importance of split `program_id(0)`'s share of the row's causal selection blocks."""
    _wait_for_previous_kernel(USE_PDL)
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE  # compressed blocks starting in one selection block
    BLOCK_C: tl.constexpr = CHUNK * RPAD
    split = tl.program_id(0)
    row = tl.program_id(1)
    _, _, _, pos = _row_position(seqlens, row, NUM_QUERIES, NUM_KV_HEADS)
    num_visible = _num_visible(pos, CMP_BLOCK, CMP_STRIDE)
    current = pos // SLC_BLOCK
    per_split = tl.cdiv(tl.cdiv(current + 1, CHUNK), SPLITS) * CHUNK
    lo = split * per_split
    hi = tl.minimum(lo + per_split, current + 1)
    if lo >= hi:
        return

    # p_cmp = exp2(score - lse2) with the compressed branch's log-sum-exp (log2 units; +inf: sees nothing).
    lse2 = _compressed_lse2(part_m, part_l, row, num_rows, G, CMP_SPLITS, CMP_SPLITS_PAD, BLOCK_H)
    offs_h = tl.arange(0, BLOCK_H)
    h_ok = offs_h < G
    scores += row.to(tl.int64) * stride_sr + offs_h[:, None] * stride_sh
    importance += row.to(tl.int64) * stride_ir
    # Column c: compressed block r = c % RPAD of selection block j0 + c // RPAD. A compressed block at offset r*d
    # weighs into its selection block and the rest into the next one, so block j sums its own compressed blocks'
    # self weights and block j-1's next weights: a second load of the scores shifted by R columns (cache hits),
    # where a [CHUNK, CHUNK] shift of the spills cost every thread registers for the whole tile.
    offs_c = tl.arange(0, BLOCK_C)
    col_r = offs_c % RPAD
    w_self, w_next = spill_weights(col_r, CMP_BLOCK, CMP_STRIDE, SLC_BLOCK)
    offs_j = tl.arange(0, CHUNK)
    for j0 in range(lo, hi, CHUNK):
        col_blk = j0 + offs_c // RPAD
        own = col_blk * R + col_r
        own_ok = (col_r < R) & (own < num_visible)
        s = tl.load(scores + own[None, :], mask=h_ok[:, None] & own_ok[None, :], other=float("-inf"))
        prev_ok = (w_next > 0.0) & (col_blk > 0) & (own - R < num_visible)
        s_prev = tl.load(scores + (own - R)[None, :], mask=h_ok[:, None] & prev_ok[None, :], other=float("-inf"))
        weighed = (tl.sum(tl.exp2(s - lse2[:, None]), 0) * w_self
                   + tl.sum(tl.exp2(s_prev - lse2[:, None]), 0) * w_next)
        imp = tl.sum(tl.reshape(weighed, [CHUNK, RPAD]), 1)
        blk = j0 + offs_j
        forced = (blk < INIT_BLOCKS) | (current - blk < LOCAL_BLOCKS)
        imp = tl.where(forced, float("inf"), imp)
        tl.store(importance + blk, imp, mask=blk < hi)


@triton.jit
def top_blocks_kernel(
        importance, seqlens, block_indices, stride_ir, stride_br,
        NUM_QUERIES: tl.constexpr, NUM_KV_HEADS: tl.constexpr, SLC_BLOCK: tl.constexpr, TOPN: tl.constexpr,
        TOPN_PAD: tl.constexpr, BLOCK_J: tl.constexpr, USE_PDL: tl.constexpr):
    """block_indices of one row: the top min(n, current + 1) blocks by importance (ties to the lower index),
    ascending, -1 padded. The whole row is one register tile of BLOCK_J blocks."""
    _wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0)
    _, _, _, pos = _row_position(seqlens, row, NUM_QUERIES, NUM_KV_HEADS)
    current = pos // SLC_BLOCK
    count = tl.minimum(current + 1, TOPN)
    offs = tl.arange(0, BLOCK_J)
    causal = offs <= current
    imp = tl.load(importance + row.to(tl.int64) * stride_ir + offs, mask=causal, other=0.0)
    # One total order, ties to the lower index: non-negative floats order like their bits as integers (forced
    # blocks: +inf), the complemented index below them; non-causal blocks are negative keys.
    bits = imp.to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(causal, (bits << INDEX_BITS) | (offs ^ INDEX_MASK), -1)
    top = tl.topk(key, TOPN_PAD)  # descending: the first `count` are the row's top
    rank = tl.arange(0, TOPN_PAD)
    taken = rank < count
    chosen = tl.sort(tl.where(taken, ((top & INDEX_MASK) ^ INDEX_MASK).to(tl.int32), 2147483647))
    tl.store(block_indices + row.to(tl.int64) * stride_br + rank, tl.where(taken, chosen, -1), mask=rank < TOPN)


@triton.jit
def _attend_positions(acc, l_i, m_i, q_tile, k_pages, v_pages, table, page_size, positions, valid, stride_kp,
                      stride_kt, stride_vp, stride_vt, scale_log2, DK: tl.constexpr, DV: tl.constexpr,
                      BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    """One online-softmax step over the tokens at `positions` [BLOCK_N] of one sequence where `valid` (`table`:
    its page-table row; k_pages, v_pages: at the kv head)."""
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    page = tl.load(table + positions // page_size, mask=valid, other=0).to(tl.int64)
    slot = positions % page_size
    k_t = tl.load(k_pages + page[None, :] * stride_kp + slot[None, :] * stride_kt + offs_dk[:, None],
                  mask=valid[None, :] & (offs_dk < DK)[:, None], other=0.0)
    s = tl.dot(q_tile, k_t, input_precision=PRECISION) * scale_log2
    s = tl.where(valid[None, :], s, float("-inf"))
    v_tile = tl.load(v_pages + page[:, None] * stride_vp + slot[:, None] * stride_vt + offs_dv[None, :],
                     mask=valid[:, None] & (offs_dv < DV)[None, :], other=0.0)
    return _softmax_step(acc, l_i, m_i, s, v_tile, PRECISION)


@triton.jit
def sparse_partials_kernel(
        q, k_pages, v_pages, block_table, seqlens, block_indices, part_o, part_m, part_l,
        stride_qb, stride_qt, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
        stride_bt, stride_br, page_size, num_rows, scale_log2,
        G: tl.constexpr, NUM_QUERIES: tl.constexpr, NUM_KV_HEADS: tl.constexpr, SLC_BLOCK: tl.constexpr,
        TOPN: tl.constexpr, WINDOW: tl.constexpr, CMP_SPLITS: tl.constexpr, SLC_SPLITS: tl.constexpr,
        WIN_SPLITS: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
        USE_PDL: tl.constexpr):
    """Split `program_id(0)` of the selected branch (the first SLC_SPLITS) or of the window branch (the rest)."""
    _wait_for_previous_kernel(USE_PDL)
    SLOTS: tl.constexpr = (TOPN + SLC_SPLITS - 1) // SLC_SPLITS  # selected blocks per selected split
    split = tl.program_id(0)
    row = tl.program_id(1)
    seq, token, hk, pos = _row_position(seqlens, row, NUM_QUERIES, NUM_KV_HEADS)
    q_tile = _load_queries(q, seq, token, hk, stride_qb, stride_qt, stride_qh, G, DK, BLOCK_H, BLOCK_DK)
    table = block_table + seq.to(tl.int64) * stride_bt
    k_pages += hk * stride_kh
    v_pages += hk * stride_vh
    m_i = tl.full([BLOCK_H], _NEG_LARGE, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    if split < SLC_SPLITS:
        # The split's blocks as one run of SLOTS * l' tokens, each token finding its block in the index row: no
        # loop-carried chain from one block's index to the next block's loads, so tiles pipeline.
        block_row = block_indices + row.to(tl.int64) * stride_br
        for t0 in range(0, SLOTS * SLC_BLOCK, BLOCK_N):
            offs_n = t0 + tl.arange(0, BLOCK_N)
            slot = split * SLOTS + offs_n // SLC_BLOCK
            in_split = (offs_n < SLOTS * SLC_BLOCK) & (slot < TOPN)
            blk = tl.load(block_row + slot, mask=in_split, other=-1)
            positions = blk * SLC_BLOCK + offs_n % SLC_BLOCK
            valid = in_split & (blk >= 0) & (positions <= pos)
            acc, l_i, m_i = _attend_positions(acc, l_i, m_i, q_tile, k_pages, v_pages, table, page_size, positions,
                                              valid, stride_kp, stride_kt, stride_vp, stride_vt, scale_log2, DK, DV,
                                              BLOCK_DK, BLOCK_DV, PRECISION)
    else:
        first = tl.maximum(pos - WINDOW + 1, 0)
        per_split = tl.cdiv(tl.cdiv(pos + 1 - first, BLOCK_N), WIN_SPLITS) * BLOCK_N
        start = first + (split - SLC_SPLITS) * per_split
        end = tl.minimum(start + per_split, pos + 1)
        for t0 in range(start, end, BLOCK_N):
            positions = t0 + tl.arange(0, BLOCK_N)
            acc, l_i, m_i = _attend_positions(acc, l_i, m_i, q_tile, k_pages, v_pages, table, page_size, positions,
                                              positions < end, stride_kp, stride_kt, stride_vp, stride_vt,
                                              scale_log2, DK, DV, BLOCK_DK, BLOCK_DV, PRECISION)
    _store_partial(part_o, part_m, part_l, CMP_SPLITS + split, row, num_rows, acc, l_i, m_i, G, DV, BLOCK_H,
                   BLOCK_DV)


@triton.jit
def merge_branches_kernel(
        part_o, part_m, part_l, g_cmp, g_slc, g_win, o,
        stride_gb, stride_gt, stride_gh, stride_ob, stride_ot, stride_oh, num_rows,
        G: tl.constexpr, NUM_QUERIES: tl.constexpr, NUM_KV_HEADS: tl.constexpr, DV: tl.constexpr,
        CMP_SPLITS: tl.constexpr, SLC_SPLITS: tl.constexpr, WIN_SPLITS: tl.constexpr, CMP_PAD: tl.constexpr,
        SLC_PAD: tl.constexpr, WIN_PAD: tl.constexpr, BLOCK_DV: tl.constexpr, USE_PDL: tl.constexpr):
    """o of one head of one row: g_cmp * o_cmp + g_slc * o_slc + g_win * o_win, each merged from its splits."""
    _wait_for_previous_kernel(USE_PDL)
    row = tl.program_id(0)
    g = tl.program_id(1)
    seq, token, hk = _row_coords(row, NUM_QUERIES, NUM_KV_HEADS)
    seq = seq.to(tl.int64)
    o_cmp = _merge_branch(part_o, part_m, part_l, 0, row, g, num_rows, G, DV, CMP_SPLITS, CMP_PAD, BLOCK_DV)
    o_slc = _merge_branch(part_o, part_m, part_l, CMP_SPLITS, row, g, num_rows, G, DV, SLC_SPLITS, SLC_PAD,
                          BLOCK_DV)
    o_win = _merge_branch(part_o, part_m, part_l, CMP_SPLITS + SLC_SPLITS, row, g, num_rows, G, DV, WIN_SPLITS,
                          WIN_PAD, BLOCK_DV)
    head = hk * G + g
    gate = seq * stride_gb + token * stride_gt + head * stride_gh
    out = (tl.load(g_cmp + gate).to(tl.float32) * o_cmp + tl.load(g_slc + gate).to(tl.float32) * o_slc
           + tl.load(g_win + gate).to(tl.float32) * o_win)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(o + seq * stride_ob + token * stride_ot + head * stride_oh + offs_dv, out.to(o.dtype.element_ty),
             mask=offs_dv < DV)


# ----------------------------------------------------------------------------------------------------------------
# Launch parameters
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeParams:
    """Launch parameters of one decode step (every size a power of two except the counts named *splits).

    Attributes:
        cmp_splits: programs sharing one row's compressed tokens (split-K).
        cmp_block_n: compressed tokens per tile.
        importance_splits: programs sharing one row's selection blocks when weighing importances.
        importance_chunk: selection blocks weighed per step of an importance program.
        slc_splits: programs sharing one row's n selected blocks (each takes ceil(n / slc_splits) blocks).
        win_splits: programs sharing one row's window.
        block_n: keys per tile in the selected and window branches.
        num_warps, num_stages: Triton launch options of the attention kernels.
        pdl: launch the five kernels with programmatic dependent launch (Hopper and later; ignored before), so
            each kernel's programs start during the previous kernel and wait for its writes.
    """

    cmp_splits: int = 8
    cmp_block_n: int = 64
    importance_splits: int = 8
    importance_chunk: int = 64
    slc_splits: int = 4
    win_splits: int = 4
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2
    pdl: bool = False

    def __post_init__(self):
        runtime.check_launch_params(self, counts=("num_stages", "splits"), flags=("pdl",))
        for name in ("cmp_block_n", "block_n"):
            if getattr(self, name) < runtime.MIN_DOT:
                raise ValueError(f"DecodeParams.{name} must be >= {runtime.MIN_DOT} (tl.dot on a GPU), got "
                                 f"{getattr(self, name)}")


# What `nsa tune` searches (nsa.tuner.spaces): the split-K of the launches, which is what depends on the GPU and
# the step's rows, and programmatic dependent launch. The launches run one after another, so the splits of each
# mostly act alone and the ranges stay short: 3 x 2 x 3 x 2 x 2 = 72 besides the default, fewer for short caches
# (the tuner cuts each split count to the cache's tiles of work). An H200 sweep at 64k found the splits of one
# launch within a few percent, and the key tiles, warps and stages below (64, 4, 2) best within the spread
# (session 11). The interpreter (no PDL): with the default (2 splits each) 3 candidates, one with a
# non-power-of-two split count (padded merges), checked against the reference like any candidate.
SEARCH_SPACE = dict(cmp_splits=[4, 16, 64], importance_splits=[4, 16], slc_splits=[2, 4, 16], win_splits=[2, 8],
                    pdl=[False, True])
INTERPRETER_SEARCH_SPACE = dict(cmp_splits=[1], importance_splits=[1], slc_splits=[1, 3])


def default_params(batch: int, num_queries: int, num_kv_heads: int, config: NSAConfig, capacity: int,
                   device) -> DecodeParams:
    """Splits that give about two programs per SM for the row count (the tuner searches better ones): a batch
    of one sequence and 4 kv heads spreads each row over many programs, a batch of 16 over a few. Under the
    interpreter (which pays per program) two splits each, enough to exercise the merges."""
    return default_params_for_rows(batch * num_queries * num_kv_heads, config, capacity, device)


def default_params_for_rows(rows: int, config: NSAConfig, capacity: int, device) -> DecodeParams:
    """`default_params` by the step's rows (B x n x Hkv), all it depends on: the tuner's untuned candidate."""
    if runtime.interpreting():
        return DecodeParams(cmp_splits=2, cmp_block_n=16, importance_splits=2, importance_chunk=16,
                            slc_splits=2, win_splits=2, block_n=16, num_warps=1, num_stages=1)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = max(1, 2 * sms // rows)
    return fit_splits(DecodeParams(cmp_splits=want, importance_splits=want, slc_splits=want, win_splits=want),
                      config, capacity)


def fit_splits(params: DecodeParams, config: NSAConfig, capacity: int) -> DecodeParams:
    """params with each launch's splits cut to the tiles of work that a full cache of `capacity` tokens has: a
    split past them is an idle program and one more partial to merge."""
    tiles = dict(cmp_splits=runtime.cdiv(config.num_cmp_blocks(capacity), params.cmp_block_n),
                 importance_splits=runtime.cdiv(config.num_slc_blocks(capacity), params.importance_chunk),
                 slc_splits=min(config.slc_topn, config.num_slc_blocks(capacity)),
                 win_splits=runtime.cdiv(min(config.window, capacity), params.block_n))
    return dataclasses.replace(params, **{name: min(getattr(params, name), max(1, count))
                                          for name, count in tiles.items()})


def resolve_params(q_shape, num_kv_heads: int, head_dim_v: int, config: NSAConfig, capacity: int, dtype,
                   device) -> DecodeParams:
    """What `nsa_decode` runs without params: the device's tuned entry for the step's bucket (T = the cache's
    capacity, rows = B x n x Hkv; lookup order and nearest-bucket rule in `nsa.tuner.cache`), else
    `default_params`. Host values only, no device read (a step stays capturable in a CUDA graph); a bad cache
    file warns once and is ignored by the lookup.

    q_shape: (B, n, Hq, Dk); dtype: the kernels' compute dtype."""
    from nsa.tuner import cache
    batch, num_queries, num_heads, head_dim = q_shape
    rows = batch * num_queries * num_kv_heads
    shape = cache.Shape(capacity, num_heads // num_kv_heads, head_dim, head_dim_v, config.cmp_block,
                        config.cmp_stride, config.slc_block, config.slc_topn, cache.dtype_name(dtype), rows=rows)
    return (cache.lookup("decode", shape, cache.device_key(device))
            or default_params_for_rows(rows, config, capacity, device))


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------


def nsa_decode_fwd(q, cache: KVCache, g_cmp, g_slc, g_win, config: NSAConfig, scale: float,
                   params: DecodeParams) -> tuple[torch.Tensor, torch.Tensor]:
    """o [B, n, Hq, Dv] and block_indices [B, n, Hkv, topn] int32 of the last n tokens of every sequence.

    q and the gates are [B, n, Hq(, Dk)] in the kernels' dtype; the cache is read as it is.
    """
    batch, num_queries, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = cache.num_kv_heads, cache.head_dim_v
    group = num_heads // num_kv_heads
    rows = batch * num_queries * num_kv_heads
    device = q.device
    splits = params.cmp_splits + params.slc_splits + params.win_splits
    part_o = torch.empty(splits, rows, group, head_dim_v, dtype=torch.float32, device=device)
    part_m = torch.empty(splits, rows, group, dtype=torch.float32, device=device)
    part_l = torch.empty(splits, rows, group, dtype=torch.float32, device=device)
    scores = torch.empty(rows, group, max(cache.cmp_capacity, 1), dtype=torch.float32, device=device)
    importance = torch.empty(rows, config.num_slc_blocks(cache.capacity), dtype=torch.float32, device=device)
    block_indices = runtime.new_output((batch, num_queries, num_kv_heads, config.slc_topn), dtype=torch.int32,
                                       device=device)
    o = runtime.new_output((batch, num_queries, num_heads, head_dim_v), dtype=q.dtype, device=device)
    k_pages, v_pages, k_cmp, v_cmp = (x.to(q.dtype) for x in (cache.k_pages, cache.v_pages, cache.k_cmp,
                                                                cache.v_cmp))
    block_h = max(runtime.MIN_DOT, runtime.next_power_of_2(group))
    sizes = dict(G=group, NUM_QUERIES=num_queries, NUM_KV_HEADS=num_kv_heads)
    tiles = dict(BLOCK_H=block_h, BLOCK_DK=runtime.head_dim_block(head_dim),
                 BLOCK_DV=runtime.head_dim_block(head_dim_v),
                 PRECISION=runtime.dot_precision(q.dtype), DK=head_dim, DV=head_dim_v)
    use_pdl = params.pdl and runtime.hopper_or_later(device)
    pdl = dict(USE_PDL=use_pdl, launch_pdl=use_pdl)
    launch = dict(num_warps=params.num_warps, num_stages=params.num_stages, **pdl)
    scale_log2 = scale * LOG2E

    compressed_partials_kernel[(params.cmp_splits, rows)](
        q, k_cmp, v_cmp, cache.seqlens, scores, part_o, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        v_cmp.stride(0), v_cmp.stride(1), v_cmp.stride(2), scores.stride(0), scores.stride(1), rows, scale_log2,
        CMP_BLOCK=config.cmp_block, CMP_STRIDE=config.cmp_stride, SPLITS=params.cmp_splits,
        BLOCK_N=params.cmp_block_n, **sizes, **tiles, **launch)
    block_importance_kernel[(params.importance_splits, rows)](
        scores, part_m, part_l, cache.seqlens, importance, scores.stride(0), scores.stride(1), importance.stride(0),
        rows, CMP_BLOCK=config.cmp_block, CMP_STRIDE=config.cmp_stride, SLC_BLOCK=config.slc_block,
        INIT_BLOCKS=config.init_blocks, LOCAL_BLOCKS=config.local_blocks, CMP_SPLITS=params.cmp_splits,
        CMP_SPLITS_PAD=runtime.next_power_of_2(params.cmp_splits), SPLITS=params.importance_splits, BLOCK_H=block_h,
        CHUNK=params.importance_chunk, RPAD=block_width(config), **sizes,
        num_warps=4, **pdl)
    topn_pad = runtime.next_power_of_2(config.slc_topn)
    block_j = max(runtime.next_power_of_2(importance.shape[1]), topn_pad)  # tl.topk takes at most the row
    # 8 warps from 1024 blocks: at T=64k (B=1) 4.6 us against 5.0 on 4 warps, on an H200; more for longer rows, so
    # that a thread holds at most 64 keys.
    top_blocks_kernel[(rows,)](
        importance, cache.seqlens, block_indices, importance.stride(0), config.slc_topn,
        NUM_QUERIES=num_queries, NUM_KV_HEADS=num_kv_heads, SLC_BLOCK=config.slc_block, TOPN=config.slc_topn,
        TOPN_PAD=topn_pad, BLOCK_J=block_j,
        num_warps=min(MAX_TOPN_WARPS, max(8 if block_j >= 1024 else 4, block_j // 512)), **pdl)
    sparse_partials_kernel[(params.slc_splits + params.win_splits, rows)](
        q, k_pages, v_pages, cache.block_table, cache.seqlens, block_indices, part_o, part_m, part_l,
        q.stride(0), q.stride(1), q.stride(2), k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), cache.block_table.stride(0), config.slc_topn,
        cache.page_size, rows, scale_log2,
        SLC_BLOCK=config.slc_block, TOPN=config.slc_topn, WINDOW=config.window, CMP_SPLITS=params.cmp_splits,
        SLC_SPLITS=params.slc_splits, WIN_SPLITS=params.win_splits, BLOCK_N=params.block_n, **sizes, **tiles,
        **launch)
    # As few warps as hold a branch's [splits, Dv] partials in 64 fp32 registers a thread: at B=16 (1024
    # programs, 2-4 splits) 4 warps each took two waves: step 97.8 -> 92.3 us at T=64k on an H200 with one warp
    # (docs/performance.md, session 10); 64 splits on one warp spilled.
    merge_pad = runtime.next_power_of_2(max(params.cmp_splits, params.slc_splits, params.win_splits))
    merge_warps = min(4, max(1, merge_pad * tiles["BLOCK_DV"] // (32 * 64)))
    merge_branches_kernel[(rows, group)](
        part_o, part_m, part_l, g_cmp, g_slc, g_win, o,
        g_cmp.stride(0), g_cmp.stride(1), g_cmp.stride(2), o.stride(0), o.stride(1), o.stride(2), rows,
        DV=head_dim_v, CMP_SPLITS=params.cmp_splits, SLC_SPLITS=params.slc_splits, WIN_SPLITS=params.win_splits,
        CMP_PAD=runtime.next_power_of_2(params.cmp_splits), SLC_PAD=runtime.next_power_of_2(params.slc_splits),
        WIN_PAD=runtime.next_power_of_2(params.win_splits), BLOCK_DV=tiles["BLOCK_DV"], **sizes,
        num_warps=merge_warps, **pdl)
    return o, block_indices


# ----------------------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------------------


def check_decode_inputs(q, cache, g_cmp, g_slc, g_win, config: NSAConfig) -> None:
    """Validate a decode step before any launch (no device synchronisation)."""
    check_config(config)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an nsa.kernels.KVCache, got {type(cache).__name__} (a reference "
                        f"nsa.reference.KVCache goes to nsa.reference.nsa_decode)")
    if config != cache.config:
        raise ValueError(f"config {config} differs from the cache's {cache.config}")
    check_float_tensors(dict(q=q, g_cmp=g_cmp, g_slc=g_slc, g_win=g_win), dict(q=4, g_cmp=3, g_slc=3, g_win=3))
    batch, num_queries, num_heads, head_dim = q.shape
    if batch != cache.batch_size or head_dim != cache.head_dim or num_heads % cache.num_kv_heads:
        raise ValueError(f"q must be [B={cache.batch_size}, n, Hq, {cache.head_dim}] with Hq a multiple of "
                         f"{cache.num_kv_heads} kv heads, got {tuple(q.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        expect_shape(name, g, (batch, num_queries, num_heads), "(B, n, Hq)")
    if q.device != cache.device:
        raise ValueError(f"q is on {q.device} but the cache is on {cache.device}")
    if q.dtype != cache.dtype:  # the kernels would otherwise convert the whole cache on every step
        raise ValueError(f"q is {q.dtype} but the cache holds {cache.dtype}")
    if config.num_slc_blocks(cache.capacity) > MAX_SELECTION_BLOCKS:
        raise ValueError(f"decode holds a row's selection blocks in registers: at most {MAX_SELECTION_BLOCKS}, "
                         f"the cache's capacity {cache.capacity} has {config.num_slc_blocks(cache.capacity)}")
    if min(cache.lengths) < num_queries:
        raise ValueError(f"every sequence must hold the {num_queries} queried tokens, got lengths {cache.lengths}")
    runtime.check_kernel_inputs(q, max(head_dim, cache.head_dim_v))


def nsa_decode(q, cache: KVCache, g_cmp, g_slc, g_win, config: NSAConfig, *, scale=None,
               return_block_indices=False, params: DecodeParams | None = None):
    """Attention of each sequence's newest n tokens, already appended to `cache`, over all of its tokens.

    Equal to the last n rows of `nsa_attention` over each sequence's S_b tokens (SPEC 1.9). n = 1 is plain
    decoding, a few tokens speculative decoding, and a longer chunk a prefill that attends to a cache (see
    `nsa_prefill`). Device work only (no host synchronisation): capturable in a CUDA graph together with
    `cache.append`.

    Args:
        q: [B, n, Hq, Dk] queries of the last n tokens of every sequence (float16, bfloat16 or float32).
        cache: an `nsa.kernels.KVCache` holding those tokens.
        g_cmp, g_slc, g_win: [B, n, Hq] branch gates.
        config: the cache's NSAConfig.
        scale: softmax scale, Dk ** -0.5 by default.
        return_block_indices: also return the selection.
        params: DecodeParams; when None, the device's tuned ones for this bucket, else `default_params(...)`
            (see `resolve_params`).
    Returns:
        o [B, n, Hq, Dv] in q's dtype (and block_indices [B, n, Hkv, topn] int32, ascending, -1 padded).

    Example:
        >>> cache.append(k_new, v_new)  # [B, 1, Hkv, D]
        >>> o = nsa_decode(q_new, cache, g_cmp, g_slc, g_win, cfg)  # [B, 1, Hq, Dv]
    """
    check_decode_inputs(q, cache, g_cmp, g_slc, g_win, config)
    scale = resolve_scale(scale, q.shape[-1])
    dtype = runtime.compute_dtype(q.dtype)
    if params is None:
        params = resolve_params(tuple(q.shape), cache.num_kv_heads, cache.head_dim_v, config, cache.capacity, dtype,
                                q.device)
    elif not isinstance(params, DecodeParams):
        raise TypeError(f"params must be a DecodeParams, got {type(params).__name__}")
    with torch.no_grad():
        o, block_indices = nsa_decode_fwd(q.to(dtype), cache, g_cmp.to(dtype), g_slc.to(dtype), g_win.to(dtype),
                                          config, scale, params)
    o = o.to(q.dtype)
    return (o, block_indices) if return_block_indices else o


def nsa_prefill(q, k, v, g_cmp, g_slc, g_win, cache: KVCache, config: NSAConfig, *, scale=None, cu_seqlens=None,
                decode_params: DecodeParams | None = None):
    """Append a prompt, or the next chunk of one, to `cache` and return its attention output.

    An empty cache takes whole prompts: their compressed keys/values come from the cache's compressors, the cache
    is filled, and o is the training forward `nsa_attention` on the same tokens (dense [B, T] prompts, or B = 1
    with FlashAttention's cu_seqlens, sequence i of the packed batch going to cache slot i). A cache that
    already holds tokens takes a chunk of n tokens per sequence that attends to the cache plus itself, through
    `nsa_decode` (so chunked prefill gives the rows the whole prompt would have).

    Args:
        q: [B, n, Hq, Dk]; k, v: [B, n, Hkv, Dk/Dv]; g_cmp, g_slc, g_win: [B, n, Hq].
        cache: an `nsa.kernels.KVCache` with compressors mapping [N, T, Hkv, D] to [N, Tc(T), Hkv, D] (as
            `nsa.reference.Compressor` does).
        config: the cache's NSAConfig.
        scale: softmax scale, Dk ** -0.5 by default.
        cu_seqlens: int32 [N+1] for packed prompts into an empty cache of N sequences.
        decode_params: DecodeParams of the chunk path.
    Returns:
        o [B, n, Hq, Dv] in q's dtype.

    Example:
        >>> cache = KVCache(B, Hkv, D, cfg, capacity=65536, k_compressor=kc, v_compressor=vc)
        >>> o = nsa_prefill(q, k, v, g_cmp, g_slc, g_win, cache, cfg)  # prompt in, cache filled
    """
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache must be an nsa.kernels.KVCache, got {type(cache).__name__}")
    if any(cache.lengths):
        if cu_seqlens is not None:
            raise ValueError("cu_seqlens is only for prompts into an empty cache; a chunk is [B, n, ...]")
        cache.append(k, v)
        return nsa_decode(q, cache, g_cmp, g_slc, g_win, config, scale=scale, params=decode_params)
    if cache.k_compressor is None or cache.v_compressor is None:
        raise RuntimeError("this cache has no compressors, so it cannot take prompts")
    if cu_seqlens is None:
        cache.check_tokens(k, v)
        lengths = [k.shape[1]] * k.shape[0]
        k_cmp, v_cmp = cache.k_compressor(k), cache.v_compressor(v)  # the whole batch in one call
    else:
        check_cu_seqlens(cu_seqlens, k.shape[0], k.shape[1], k.device)
        bounds = cu_seqlens.tolist()
        lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]

        def packed(compress, x):  # the compressors take no cu_seqlens: one packed sequence at a time
            return torch.cat([compress(x[:, start:end])[0] for start, end in zip(bounds[:-1], bounds[1:])])[None]
        k_cmp, v_cmp = packed(cache.k_compressor, k), packed(cache.v_compressor, v)
    k_cmp, v_cmp = k_cmp.to(k.dtype), v_cmp.to(v.dtype)
    o = nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config, scale=scale, cu_seqlens=cu_seqlens)
    cache.write_prompts(k.flatten(0, 1), v.flatten(0, 1), k_cmp.flatten(0, 1), v_cmp.flatten(0, 1), lengths)
    return o
