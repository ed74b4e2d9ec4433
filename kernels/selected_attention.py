"""Selected-block attention (SPEC 1.5) in Triton: forward, backward, autograd and the public function.

Query position t (of its own sequence) and query head h attend, with a softmax, to the tokens s <= t of the
selection blocks j (tokens [j*l', (j+1)*l')) listed in block_indices[t, h // G] (ascending, -1 padded). All G
heads of a GQA group share the selection, so every K/V tile loaded feeds all G heads.

Forward and dq: block schedules. A program owns `block_t` consecutive query positions of one sequence x the G
heads of one kv head: its rows are r = p * G + g (position p, head g), padded to a power of two >= 16, so a small
group is never padded with idle heads up to the MMA size. Consecutive positions select mostly the same blocks,
so the program walks the UNION of its positions' selections, each block loaded once, rows masked to the
positions that selected it. The union is built before the launch with a few torch ops on the device (no host
sync): for every (tile of positions, kv head) the ascending list of distinct blocks, a bitmask per block of the
positions that chose it (bit p), and the list length (`build_block_schedule`). The kernel's loop is then a plain
`for` over (union entry, BLOCK_N slice of the block): scalar loads of the block id and its bitmask, no
reductions over index tiles in the loop (a merge-walk of the sorted lists inside the kernel would need a
cross-thread min-reduction per step). With block_t = 1 the schedule is block_indices itself.

Forward, inverted (fwd_inverted): the work goes by selected block instead of by position, so each K/V
block is loaded once for all the positions that chose it, and what is gathered is their q rows (G heads x Dk,
4 KB at the paper shape against the block's 32 KB of K/V). A program owns one (block, kv head) and a run of at
most INVERTED_ITEM_POSITIONS of its positions (`build_forward_items`: the same sort as the dk/dv index), in
steps of fwd_block_t positions x G heads; it writes each (position, head)'s attention to that one block,
normalised, with its lse, as a part (fp32; 16 bits with fwd_parts_16bit). A second kernel merges each
position's n parts (a softmax-weighted sum in slot order: deterministic) into o and lse. The fp32 parts of all
positions would take T x Hq x n x (Dv + 1) x 4 bytes (34 GB at 64k), so positions go in chunks of
INVERTED_PART_BYTES. It pays when the gathered K/V bytes dominate, most of all for small groups (see
docs/performance.md); the tuner decides. dq_inverted does the same for dq (parts of Dk values, summed per
position in slot order); delta = rowsum(dO * O) then comes from `nsa.kernels.delta` before it, since no
gather-dq kernel runs.

dk/dv: inverse index, no atomics. `build_inverse_index` sorts the (position, kv head, block) entries by
(sequence block, kv head) into CSR lists of query positions (ascending). A dkdv program owns one BLOCK_N slice of
one block of one kv head, keeps its K/V slice and its dK/dV accumulators in registers, and walks the list in
steps of `dkdv_block_t` positions x G heads (rows), recomputing p from the saved log-sum-exp. Lists are cut into
work items of at most `dkdv_chunk` positions so that very popular blocks (block 0 is selected by every query)
do not serialise the whole backward on one program: a block with one item writes dK/dV directly, a block with
several writes fp32 partial sums that a small kernel adds up in a fixed order (deterministic). Sizing the
items needs no host sync: their number and the slots are bounds known on the host (DKDV_UNSYNCED_PART_BYTES).

The softmax runs in base 2 (exp2 with scale * log2(e)) in fp32; `lse` is returned in natural-log units,
[Hq, total tokens]. delta = rowsum(dO * O) is computed by the dq kernel (it loads dO anyway) and consumed by the
dkdv kernel, which therefore runs after it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import torch
import triton
import triton.language as tl

from nsa.config import NSAConfig
from nsa.inputs import check_config, check_cu_seqlens, check_float_tensors, check_keys_values, resolve_scale
from nsa.kernels.delta import attention_delta
from nsa.kernels.packing import PackedSequences, device_offsets, segment_ids, segment_ids_on_host
from nsa.kernels.runtime import (MIN_DOT, cdiv, check_kernel_inputs, check_launch_params, compute_dtype,
                                 dot_precision, head_dim_block, key_value_sources, new_output, next_power_of_2, pack)

LOG2E = 1.4426950408889634
# Kernels may only read globals declared as constexpr.
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)
# Positions packed per fwd/dq program are flagged in an int32 bitmask.
MAX_BLOCK_T = 32
# Keys per program of the partial-sum reduction (a light, memory-bound kernel).
REDUCE_BLOCK_N = 16
# Keys per step of the one-program kernel that cuts the dk/dv lists into work items.
ITEMS_BLOCK = 1024
# Selections per program of the kernel that turns them into sort keys.
KEYS_BLOCK = 1024
# The inverted forward keeps a part (Dv outputs and an lse per head) per (position, kv head, slot): it
# takes the positions in chunks whose parts fit this many bytes (8k positions of the paper shape; at most 1/16 of
# the GPU's memory), and cuts a block's list of positions into work items of at most INVERTED_ITEM_POSITIONS.
# Chunks are large because each is a round of small launches (and each was a host sync until the items were
# counted on the device: 1 GiB chunks, 33 at 64k, left an H200 idle for 27 of 299 ms at G=4).
INVERTED_PART_BYTES = 2**32
INVERTED_ITEM_POSITIONS = 256
# The dk/dv work items and partial slots are sized by bounds known on the host, so the backward queues its kernels
# without waiting for the GPU; only where the bound's fp32 slots would pass this many bytes (the paper shape at 64k
# with the shipped H200 chunks: 256 MiB at G=16, 512 MiB at G=4; 4 GiB at G=1) does one host sync count them
# exactly. Items past the real ones carry PADDING_ITEM as their slot and return at once.
DKDV_UNSYNCED_PART_BYTES = 2**30
PADDING_ITEM = tl.constexpr(-2)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------
# The loop bodies are written out without @triton.jit helpers: every helper call costs milliseconds in the
# interpreter, which runs the CPU test suite. Head dims are contiguous (stride 1); columns past HEAD_DIM are masked.

@triton.jit
def selected_attention_fwd_kernel(
        Q, K, V, O, LSE, TILE_TOK0, TILE_SEQ, CU_SEQLENS, SCHED_BLOCKS, SCHED_MASKS, SCHED_COUNTS,
        qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lseh,
        stride_st, stride_sh, stride_mt, stride_mh, stride_mi, stride_ct, stride_ch,
        SLC_BLOCK: tl.constexpr, G: tl.constexpr, HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, SUBS: tl.constexpr, TMA: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """o and lse of BLOCK_T consecutive positions x the G heads of kv head hk; grid (tiles, Hkv).

    Rows r = p * G + g (position p of the tile, head g of the group), padded to BLOCK_R. Step `it` of the loop
    is union entry it // SUBS of the tile's schedule, key slice it % SUBS (BLOCK_N tokens) of that block; the
    scores kept are those of rows whose position selected the block (bit p of its mask), causal s <= t. With TMA,
    K and V are descriptors (`runtime.tma_rows`) and a key slice is one TMA copy; its rows past the slice's
    valid keys (another block, sequence, or zeros past the end) are finite and masked like the others.
    """
    tl.static_assert(BLOCK_T * G <= BLOCK_R)
    tl.static_assert(BLOCK_T <= 32)
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    tok0 = tl.load(TILE_TOK0 + tile)
    seq = tl.load(TILE_SEQ + tile)
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_end = tl.load(CU_SEQLENS + seq + 1)
    rows = tl.arange(0, BLOCK_R)
    tok_r = tok0 + rows // G
    row_valid = (rows < BLOCK_T * G) & (tok_r < seq_end)
    pos_r = tok_r - seq_start
    pos_last = tl.minimum(tok0 + BLOCK_T, seq_end) - 1 - seq_start
    bit_r = tl.minimum(rows // G, BLOCK_T - 1)  # padded rows must not shift past the mask width
    head_r = hk * G + rows % G
    tok_r = tok_r.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_k = offs_dk < HEAD_DIM_K
    col_v = offs_dv < HEAD_DIM_V
    q = tl.load(Q + tok_r[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :],
                mask=row_valid[:, None] & col_k[None, :], other=0.0)
    if not TMA:
        k_base = K + seq_start.to(tl.int64) * stride_kt + hk * stride_kh
        v_base = V + seq_start.to(tl.int64) * stride_vt + hk * stride_vh
    sched_blocks = SCHED_BLOCKS + tile.to(tl.int64) * stride_st + hk * stride_sh
    sched_masks = SCHED_MASKS + tile.to(tl.int64) * stride_mt + hk * stride_mh
    count = tl.load(SCHED_COUNTS + tile * stride_ct + hk * stride_ch)

    acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile leaves the state as is
    for it in range(0, count * SUBS):
        entry = it // SUBS
        block = tl.load(sched_blocks + entry)
        bits = tl.load(sched_masks + entry * stride_mi)
        offs_in = (it % SUBS) * BLOCK_N + offs_n
        key_pos = block * SLC_BLOCK + offs_in
        key_valid = (offs_in < SLC_BLOCK) & (key_pos <= pos_last)
        keep = row_valid & (((bits >> bit_r) & 1) != 0)
        mask = keep[:, None] & key_valid[None, :] & (key_pos[None, :] <= pos_r[:, None])
        if TMA:
            row = seq_start + block * SLC_BLOCK + (it % SUBS) * BLOCK_N
            k = K.load([row, hk * HEAD_DIM_K])
        else:
            key_off = key_pos.to(tl.int64)
            k = tl.load(k_base + key_off[:, None] * stride_kt + offs_dk[None, :],
                        mask=key_valid[:, None] & col_k[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(mask, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if TMA:
            v = V.load([row, hk * HEAD_DIM_V])
        else:
            v = tl.load(v_base + key_off[:, None] * stride_vt + offs_dv[None, :],
                        mask=key_valid[:, None] & col_v[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0  # always, for a valid selection; a row without keys gets o = 0, lse = -inf
    l_safe = tl.where(has_keys, l_i, 1.0)
    o = acc / l_safe[:, None]
    tl.store(O + tok_r[:, None] * stride_ot + head_r[:, None] * stride_oh + offs_dv[None, :],
             o.to(O.dtype.element_ty), mask=row_valid[:, None] & col_v[None, :])
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    tl.store(LSE + head_r * stride_lseh + tok_r, lse, mask=row_valid)


@triton.jit
def _work_item(item, ITEM_KEY, ITEM_BEGIN, ITEM_END, BLOCK_SEQ, CU_BLOCKS, CU_SEQLENS, num_kv_heads):
    """A block-owned program's work item: its run [begin, end) of entries, kv head, sequence-local block, and
    the block's sequence (start token, length). Once per program, so a helper is cheap in the interpreter too."""
    key = tl.load(ITEM_KEY + item)
    gblock = key // num_kv_heads
    seq = tl.load(BLOCK_SEQ + gblock)
    seq_start = tl.load(CU_SEQLENS + seq)
    return (tl.load(ITEM_BEGIN + item), tl.load(ITEM_END + item), key % num_kv_heads,
            gblock - tl.load(CU_BLOCKS + seq), seq_start, tl.load(CU_SEQLENS + seq + 1) - seq_start)


@triton.jit
def selected_attention_fwd_inverted_kernel(
        Q, K, V, O_PART, LSE_PART, ITEM_KEY, ITEM_BEGIN, ITEM_END, ENTRIES, BLOCK_SEQ, CU_BLOCKS, CU_SEQLENS,
        token0, entries_per_token, num_kv_heads, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_pe, stride_ph, stride_le,
        SLC_BLOCK: tl.constexpr, G: tl.constexpr, HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, SUBS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The attention of each (position, head) to ONE selected block, for the positions of one work item: the
    entries ENTRIES[begin:end] (flat (position, kv head, slot) indices from token0) that chose block `key //
    Hkv` of kv head `key % Hkv`; grid (items,). Rows r = i * G + g (entry i of the step, head g). Writes the
    block's normalised output and natural-log lse per (entry, head) to O_PART, LSE_PART, for the merge kernel.
    """
    tl.static_assert(BLOCK_T * G <= BLOCK_R)
    item = tl.program_id(0)
    begin, end, hk, block, seq_start, seqlen = _work_item(item, ITEM_KEY, ITEM_BEGIN, ITEM_END, BLOCK_SEQ, CU_BLOCKS,
                                                          CU_SEQLENS, num_kv_heads)
    rows = tl.arange(0, BLOCK_R)
    entry_r = rows // G
    g_r = rows % G
    head_r = hk * G + g_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_k = offs_dk < HEAD_DIM_K
    col_v = offs_dv < HEAD_DIM_V
    k_base = K + seq_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + seq_start.to(tl.int64) * stride_vt + hk * stride_vh
    for start in range(begin, end, BLOCK_T):
        row_valid = (rows < BLOCK_T * G) & (start + entry_r < end)
        ent = tl.load(ENTRIES + start + entry_r, mask=row_valid, other=0)
        tok_r = token0 + ent // entries_per_token
        pos_r = tok_r - seq_start
        q = tl.load(Q + tok_r.to(tl.int64)[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :],
                    mask=row_valid[:, None] & col_k[None, :], other=0.0)
        acc = tl.zeros([BLOCK_R, BLOCK_DV], dtype=tl.float32)
        l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
        m_i = tl.full([BLOCK_R], -1.0e30, dtype=tl.float32)  # finite: a fully masked slice leaves the state as is
        for sub in tl.static_range(SUBS):
            offs_in = sub * BLOCK_N + offs_n
            key_pos = block * SLC_BLOCK + offs_in
            key_valid = (offs_in < SLC_BLOCK) & (key_pos < seqlen)
            key_off = key_pos.to(tl.int64)
            k = tl.load(k_base + key_off[:, None] * stride_kt + offs_dk[None, :],
                        mask=key_valid[:, None] & col_k[None, :], other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            mask = row_valid[:, None] & key_valid[None, :] & (key_pos[None, :] <= pos_r[:, None])
            qk = tl.where(mask, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + key_off[:, None] * stride_vt + offs_dv[None, :],
                        mask=key_valid[:, None] & col_v[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
        has_keys = l_i > 0.0  # always: a selected block starts at or before the position
        l_safe = tl.where(has_keys, l_i, 1.0)
        ent64 = ent.to(tl.int64)
        tl.store(O_PART + ent64[:, None] * stride_pe + g_r[:, None] * stride_ph + offs_dv[None, :],
                 (acc / l_safe[:, None]).to(O_PART.dtype.element_ty), mask=row_valid[:, None] & col_v[None, :])
        lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
        tl.store(LSE_PART + ent64 * stride_le + g_r, lse, mask=row_valid)


@triton.jit
def selected_attention_fwd_merge_kernel(
        O, LSE, O_PART, LSE_PART, BLOCK_INDICES, token0,
        stride_ot, stride_oh, stride_lseh, stride_pe, stride_ph, stride_le, stride_bt, stride_bh,
        N: tl.constexpr, G: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_G: tl.constexpr,
        BLOCK_DV: tl.constexpr):
    """o, lse of one (position, kv head) from the inverted forward's per-block parts: a softmax-weighted sum over
    the n slots (empty ones skipped), in a fixed order; grid (positions from token0, Hkv)."""
    t = tl.program_id(0)
    hk = tl.program_id(1)
    num_kv_heads = tl.num_programs(1)
    tok = (token0 + t).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_dv = tl.arange(0, BLOCK_DV)
    g_ok = offs_g < G
    mask = g_ok[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], -1.0e30, dtype=tl.float32)
    ent0 = (t.to(tl.int64) * num_kv_heads + hk) * N
    for j in range(N):
        block = tl.load(BLOCK_INDICES + tok * stride_bt + hk * stride_bh + j)
        if block >= 0:
            lse_j = tl.load(LSE_PART + (ent0 + j) * stride_le + offs_g, mask=g_ok, other=float("-inf")) * _LOG2E
            o_j = tl.load(O_PART + (ent0 + j) * stride_pe + offs_g[:, None] * stride_ph + offs_dv[None, :],
                          mask=mask, other=0.0).to(tl.float32)
            m_new = tl.maximum(m_i, lse_j)
            alpha = tl.math.exp2(m_i - m_new)
            w = tl.math.exp2(lse_j - m_new)
            l_i = l_i * alpha + w
            acc = acc * alpha[:, None] + w[:, None] * o_j
            m_i = m_new
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    head = hk * G + offs_g
    tl.store(O + tok * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
             (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=mask)
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * _LN2, float("-inf"))
    tl.store(LSE + head * stride_lseh + tok, lse, mask=g_ok)


@triton.jit
def selected_attention_bwd_dq_inverted_kernel(
        Q, K, V, DO, LSE, DELTA, DQ_PART, ITEM_KEY, ITEM_BEGIN, ITEM_END, ENTRIES, BLOCK_SEQ, CU_BLOCKS, CU_SEQLENS,
        token0, entries_per_token, num_kv_heads, scale, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh, stride_lseh,
        stride_pe, stride_ph,
        SLC_BLOCK: tl.constexpr, G: tl.constexpr, HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, SUBS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dq_inverted: each (position, head)'s dq from ONE selected block, for the positions of one work item (as
    in the inverted forward); parts DQ_PART[entry, head] that `selected_attention_sum_parts_kernel` adds."""
    tl.static_assert(BLOCK_T * G <= BLOCK_R)
    item = tl.program_id(0)
    begin, end, hk, block, seq_start, seqlen = _work_item(item, ITEM_KEY, ITEM_BEGIN, ITEM_END, BLOCK_SEQ, CU_BLOCKS,
                                                          CU_SEQLENS, num_kv_heads)
    rows = tl.arange(0, BLOCK_R)
    entry_r = rows // G
    g_r = rows % G
    head_r = hk * G + g_r
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_k = offs_dk < HEAD_DIM_K
    col_v = offs_dv < HEAD_DIM_V
    k_base = K + seq_start.to(tl.int64) * stride_kt + hk * stride_kh
    v_base = V + seq_start.to(tl.int64) * stride_vt + hk * stride_vh
    for start in range(begin, end, BLOCK_T):
        row_valid = (rows < BLOCK_T * G) & (start + entry_r < end)
        ent = tl.load(ENTRIES + start + entry_r, mask=row_valid, other=0)
        tok_r = token0 + ent // entries_per_token
        pos_r = tok_r - seq_start
        tok64 = tok_r.to(tl.int64)
        q = tl.load(Q + tok64[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :],
                    mask=row_valid[:, None] & col_k[None, :], other=0.0)
        do = tl.load(DO + tok64[:, None] * stride_dot + head_r[:, None] * stride_doh + offs_dv[None, :],
                     mask=row_valid[:, None] & col_v[None, :], other=0.0)
        lse2 = tl.load(LSE + head_r * stride_lseh + tok64, mask=row_valid, other=0.0) * _LOG2E
        delta = tl.load(DELTA + head_r * stride_lseh + tok64, mask=row_valid, other=0.0)
        dq = tl.zeros([BLOCK_R, BLOCK_DK], dtype=tl.float32)
        for sub in tl.static_range(SUBS):
            offs_in = sub * BLOCK_N + offs_n
            key_pos = block * SLC_BLOCK + offs_in
            key_valid = (offs_in < SLC_BLOCK) & (key_pos < seqlen)
            key_off = key_pos.to(tl.int64)
            k = tl.load(k_base + key_off[:, None] * stride_kt + offs_dk[None, :],
                        mask=key_valid[:, None] & col_k[None, :], other=0.0)
            v = tl.load(v_base + key_off[:, None] * stride_vt + offs_dv[None, :],
                        mask=key_valid[:, None] & col_v[None, :], other=0.0)
            mask = row_valid[:, None] & key_valid[None, :] & (key_pos[None, :] <= pos_r[:, None])
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            p = tl.where(mask, tl.math.exp2(qk - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
        tl.store(DQ_PART + ent.to(tl.int64)[:, None] * stride_pe + g_r[:, None] * stride_ph + offs_dk[None, :],
                 (dq * scale).to(DQ_PART.dtype.element_ty), mask=row_valid[:, None] & col_k[None, :])


@triton.jit
def selected_attention_sum_parts_kernel(
        OUT, PART, BLOCK_INDICES, token0, stride_ot, stride_oh, stride_pe, stride_ph, stride_bt, stride_bh,
        N: tl.constexpr, G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
    """OUT[position, heads of kv head hk] = the sum of its parts over the selected slots, in slot order
    (deterministic); grid (positions from token0, Hkv)."""
    t = tl.program_id(0)
    hk = tl.program_id(1)
    tok = (token0 + t).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_g < G)[:, None] & (offs_d < HEAD_DIM)[None, :]
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    ent0 = (t.to(tl.int64) * tl.num_programs(1) + hk) * N
    for j in range(N):
        if tl.load(BLOCK_INDICES + tok * stride_bt + hk * stride_bh + j) >= 0:
            acc += tl.load(PART + (ent0 + j) * stride_pe + offs_g[:, None] * stride_ph + offs_d[None, :], mask=mask,
                           other=0.0).to(tl.float32)
    head = hk * G + offs_g
    tl.store(OUT + tok * stride_ot + head[:, None] * stride_oh + offs_d[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask)


@triton.jit
def selected_attention_bwd_dq_kernel(
        Q, K, V, O, DO, LSE, DELTA, DQ, TILE_TOK0, TILE_SEQ, CU_SEQLENS, SCHED_BLOCKS, SCHED_MASKS, SCHED_COUNTS,
        scale, qk_scale,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_dot,
        stride_doh, stride_dqt, stride_dqh, stride_lseh,
        stride_st, stride_sh, stride_mt, stride_mh, stride_mi, stride_ct, stride_ch,
        SLC_BLOCK: tl.constexpr, G: tl.constexpr, HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, SUBS: tl.constexpr, DELTA_GIVEN: tl.constexpr, TMA: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """dq of BLOCK_T positions x G heads, tiled and scheduled like the forward (K/V by TMA copies too); grid
    (tiles, Hkv).

    Unless DELTA_GIVEN (then read from DELTA), also writes delta = rowsum(dO * O) [Hq, total] fp32 for the dkdv
    kernel, launched after this one.
    """
    tl.static_assert(BLOCK_T * G <= BLOCK_R)
    tl.static_assert(BLOCK_T <= 32)
    tile = tl.program_id(0)
    hk = tl.program_id(1)
    tok0 = tl.load(TILE_TOK0 + tile)
    seq = tl.load(TILE_SEQ + tile)
    seq_start = tl.load(CU_SEQLENS + seq)
    seq_end = tl.load(CU_SEQLENS + seq + 1)
    rows = tl.arange(0, BLOCK_R)
    tok_r = tok0 + rows // G
    row_valid = (rows < BLOCK_T * G) & (tok_r < seq_end)
    pos_r = tok_r - seq_start
    pos_last = tl.minimum(tok0 + BLOCK_T, seq_end) - 1 - seq_start
    bit_r = tl.minimum(rows // G, BLOCK_T - 1)
    head_r = hk * G + rows % G
    tok_r = tok_r.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_k = offs_dk < HEAD_DIM_K
    col_v = offs_dv < HEAD_DIM_V
    mask_qk = row_valid[:, None] & col_k[None, :]
    mask_ov = row_valid[:, None] & col_v[None, :]
    q = tl.load(Q + tok_r[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :], mask=mask_qk,
                other=0.0)
    do = tl.load(DO + tok_r[:, None] * stride_dot + head_r[:, None] * stride_doh + offs_dv[None, :], mask=mask_ov,
                 other=0.0)
    if DELTA_GIVEN:
        delta = tl.load(DELTA + head_r * stride_lseh + tok_r, mask=row_valid, other=0.0)
    else:
        o = tl.load(O + tok_r[:, None] * stride_ot + head_r[:, None] * stride_oh + offs_dv[None, :], mask=mask_ov,
                    other=0.0)
        delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
        tl.store(DELTA + head_r * stride_lseh + tok_r, delta, mask=row_valid)
    lse2 = tl.load(LSE + head_r * stride_lseh + tok_r, mask=row_valid, other=0.0) * _LOG2E
    if not TMA:
        k_base = K + seq_start.to(tl.int64) * stride_kt + hk * stride_kh
        v_base = V + seq_start.to(tl.int64) * stride_vt + hk * stride_vh
    sched_blocks = SCHED_BLOCKS + tile.to(tl.int64) * stride_st + hk * stride_sh
    sched_masks = SCHED_MASKS + tile.to(tl.int64) * stride_mt + hk * stride_mh
    count = tl.load(SCHED_COUNTS + tile * stride_ct + hk * stride_ch)

    dq = tl.zeros([BLOCK_R, BLOCK_DK], dtype=tl.float32)
    for it in range(0, count * SUBS):
        entry = it // SUBS
        block = tl.load(sched_blocks + entry)
        bits = tl.load(sched_masks + entry * stride_mi)
        offs_in = (it % SUBS) * BLOCK_N + offs_n
        key_pos = block * SLC_BLOCK + offs_in
        key_valid = (offs_in < SLC_BLOCK) & (key_pos <= pos_last)
        keep = row_valid & (((bits >> bit_r) & 1) != 0)
        mask = keep[:, None] & key_valid[None, :] & (key_pos[None, :] <= pos_r[:, None])
        if TMA:
            row = seq_start + block * SLC_BLOCK + (it % SUBS) * BLOCK_N
            k = K.load([row, hk * HEAD_DIM_K])
            v = V.load([row, hk * HEAD_DIM_V])
        else:
            key_off = key_pos.to(tl.int64)
            k = tl.load(k_base + key_off[:, None] * stride_kt + offs_dk[None, :],
                        mask=key_valid[:, None] & col_k[None, :], other=0.0)
            v = tl.load(v_base + key_off[:, None] * stride_vt + offs_dv[None, :],
                        mask=key_valid[:, None] & col_v[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.where(mask, tl.math.exp2(qk - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    tl.store(DQ + tok_r[:, None] * stride_dqt + head_r[:, None] * stride_dqh + offs_dk[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=mask_qk)


@triton.jit
def selected_attention_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, DK_PART, DV_PART, ITEM_KEY, ITEM_BEGIN, ITEM_END, ITEM_SLOT, POSITIONS,
        BLOCK_SEQ, CU_BLOCKS, CU_SEQLENS, scale, qk_scale, num_kv_heads,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lseh, stride_pks, stride_pkt, stride_pvs, stride_pvt,
        SLC_BLOCK: tl.constexpr, G: tl.constexpr, HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr,
        BLOCK_DV: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dk, dv of key slice `sl` (BLOCK_N tokens) of one (block, kv head) from one work item: the positions
    POSITIONS[begin:end] (packed token indices, ascending) that selected the block; grid (work items, slices).

    The key is global block * Hkv + hk (blocks packed over sequences). Rows r = i * G + g: entry i of the
    current step of BLOCK_T list entries, head g. An item with slot -1 is its block's only one and writes dk/dv;
    one with slot PADDING_ITEM pads the grid to its host-known bound and returns; otherwise it writes its fp32
    partial sums to slot `slot` of DK_PART/DV_PART.
    """
    tl.static_assert(BLOCK_T * G <= BLOCK_R)
    item = tl.program_id(0)
    sl = tl.program_id(1)
    slot = tl.load(ITEM_SLOT + item)
    if slot == PADDING_ITEM:
        return
    begin, end, hk, block, seq_start, seqlen = _work_item(item, ITEM_KEY, ITEM_BEGIN, ITEM_END, BLOCK_SEQ, CU_BLOCKS,
                                                          CU_SEQLENS, num_kv_heads)
    offs_in = sl * BLOCK_N + tl.arange(0, BLOCK_N)
    in_block = offs_in < SLC_BLOCK
    key_pos = block * SLC_BLOCK + offs_in
    key_valid = in_block & (key_pos < seqlen)
    key_tok = seq_start.to(tl.int64) + key_pos
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_k = offs_dk < HEAD_DIM_K
    col_v = offs_dv < HEAD_DIM_V
    k = tl.load(K + key_tok[:, None] * stride_kt + hk * stride_kh + offs_dk[None, :],
                mask=key_valid[:, None] & col_k[None, :], other=0.0)
    v = tl.load(V + key_tok[:, None] * stride_vt + hk * stride_vh + offs_dv[None, :],
                mask=key_valid[:, None] & col_v[None, :], other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    rows = tl.arange(0, BLOCK_R)
    entry_r = rows // G
    head_r = hk * G + rows % G
    for start in range(begin, end, BLOCK_T):
        row_valid = (rows < BLOCK_T * G) & (start + entry_r < end)
        tok_r = tl.load(POSITIONS + start + entry_r, mask=row_valid, other=0)
        pos_r = tok_r - seq_start
        tok_r = tok_r.to(tl.int64)
        q = tl.load(Q + tok_r[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :],
                    mask=row_valid[:, None] & col_k[None, :], other=0.0)
        do = tl.load(DO + tok_r[:, None] * stride_dot + head_r[:, None] * stride_doh + offs_dv[None, :],
                     mask=row_valid[:, None] & col_v[None, :], other=0.0)
        lse2 = tl.load(LSE + head_r * stride_lseh + tok_r, mask=row_valid, other=0.0) * _LOG2E
        delta = tl.load(DELTA + head_r * stride_lseh + tok_r, mask=row_valid, other=0.0)
        # Transposed scores [keys, rows]: dv and dk then need no transpose of p or ds.
        qk_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale
        mask_t = key_valid[:, None] & row_valid[None, :] & (key_pos[:, None] <= pos_r[None, :])
        p_t = tl.where(mask_t, tl.math.exp2(qk_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    dk *= scale

    if slot < 0:
        tl.store(DK + key_tok[:, None] * stride_dkt + hk * stride_dkh + offs_dk[None, :], dk.to(DK.dtype.element_ty),
                 mask=key_valid[:, None] & col_k[None, :])
        tl.store(DV + key_tok[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :], dv.to(DV.dtype.element_ty),
                 mask=key_valid[:, None] & col_v[None, :])
    else:
        slot64 = slot.to(tl.int64)
        tl.store(DK_PART + slot64 * stride_pks + offs_in[:, None] * stride_pkt + offs_dk[None, :], dk,
                 mask=in_block[:, None] & col_k[None, :])
        tl.store(DV_PART + slot64 * stride_pvs + offs_in[:, None] * stride_pvt + offs_dv[None, :], dv,
                 mask=in_block[:, None] & col_v[None, :])


@triton.jit
def selected_attention_bwd_dkdv_reduce_kernel(
        DK, DV, DK_PART, DV_PART, KEY_SLOT0, KEY_SLOTS, BLOCK_SEQ, CU_BLOCKS, CU_SEQLENS, num_kv_heads,
        stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_pks, stride_pkt, stride_pvs, stride_pvt,
        SLC_BLOCK: tl.constexpr, HEAD_DIM_K: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """dk, dv of a (block, kv head) whose list was split over several work items: the sum of its partial slots
    in slot order (deterministic). Grid (blocks x Hkv, BLOCK_N-key slices); single-item keys return at once."""
    key = tl.program_id(0)
    sl = tl.program_id(1)
    num_slots = tl.load(KEY_SLOTS + key)
    if num_slots > 0:
        slot0 = tl.load(KEY_SLOT0 + key).to(tl.int64)
        gblock = key // num_kv_heads
        hk = key % num_kv_heads
        seq = tl.load(BLOCK_SEQ + gblock)
        block = gblock - tl.load(CU_BLOCKS + seq)
        seq_start = tl.load(CU_SEQLENS + seq)
        seqlen = tl.load(CU_SEQLENS + seq + 1) - seq_start
        offs_in = sl * BLOCK_N + tl.arange(0, BLOCK_N)
        key_pos = block * SLC_BLOCK + offs_in
        key_valid = (offs_in < SLC_BLOCK) & (key_pos < seqlen)
        key_tok = seq_start.to(tl.int64) + key_pos
        offs_dk = tl.arange(0, BLOCK_DK)
        offs_dv = tl.arange(0, BLOCK_DV)
        mask_k = key_valid[:, None] & (offs_dk < HEAD_DIM_K)[None, :]
        mask_v = key_valid[:, None] & (offs_dv < HEAD_DIM_V)[None, :]
        dk = tl.zeros([BLOCK_N, BLOCK_DK], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
        for i in range(0, num_slots):
            dk += tl.load(DK_PART + (slot0 + i) * stride_pks + offs_in[:, None] * stride_pkt + offs_dk[None, :],
                          mask=mask_k, other=0.0)
            dv += tl.load(DV_PART + (slot0 + i) * stride_pvs + offs_in[:, None] * stride_pvt + offs_dv[None, :],
                          mask=mask_v, other=0.0)
        tl.store(DK + key_tok[:, None] * stride_dkt + hk * stride_dkh + offs_dk[None, :], dk.to(DK.dtype.element_ty),
                 mask=mask_k)
        tl.store(DV + key_tok[:, None] * stride_dvt + hk * stride_dvh + offs_dv[None, :], dv.to(DV.dtype.element_ty),
                 mask=mask_v)


@triton.jit
def selected_attention_dkdv_items_kernel(
        OFFSETS, ITEM_KEY, ITEM_BEGIN, ITEM_END, ITEM_SLOT, KEY_SLOT0, KEY_SLOTS, NUM_SLOTS, num_keys, num_items,
        chunk, BLOCK: tl.constexpr):
    """The dk/dv work items from the CSR offsets, in one program: each key's list cut into pieces of at most
    `chunk` positions (at least one item per key), keys in order; a key with several items gets that many partial
    slots, consecutive. Items past the real ones, up to `num_items`, are padding (slot PADDING_ITEM); the total of
    slots goes to NUM_SLOTS. One launch instead of ~30 small torch ops, each a few microseconds of host time
    (the backward at 1k tokens is bound by the host)."""
    item_base = 0
    slot_base = 0
    for k0 in range(0, num_keys, BLOCK):
        keys = k0 + tl.arange(0, BLOCK)
        ok = keys < num_keys
        lo = tl.load(OFFSETS + keys, mask=ok, other=0).to(tl.int32)
        hi = tl.load(OFFSETS + keys + 1, mask=ok, other=0).to(tl.int32)
        items = tl.where(ok, tl.maximum(1, (hi - lo + chunk - 1) // chunk), 0)
        slots = tl.where(items > 1, items, 0)
        item0 = item_base + tl.cumsum(items, 0) - items
        slot0 = slot_base + tl.cumsum(slots, 0) - slots
        tl.store(KEY_SLOT0 + keys, slot0, mask=ok)
        tl.store(KEY_SLOTS + keys, slots, mask=ok)
        for part in range(0, tl.max(items, 0)):
            write = part < items
            begin = lo + part * chunk
            tl.store(ITEM_KEY + item0 + part, keys, mask=write)
            tl.store(ITEM_BEGIN + item0 + part, begin, mask=write)
            tl.store(ITEM_END + item0 + part, tl.minimum(begin + chunk, hi), mask=write)
            tl.store(ITEM_SLOT + item0 + part, tl.where(slots > 0, slot0 + part, -1), mask=write)
        item_base += tl.sum(items, 0)
        slot_base += tl.sum(slots, 0)
    for i0 in range(item_base, num_items, BLOCK):
        idx = i0 + tl.arange(0, BLOCK)
        pad = idx < num_items
        tl.store(ITEM_KEY + idx, 0, mask=pad)
        tl.store(ITEM_BEGIN + idx, 0, mask=pad)
        tl.store(ITEM_END + idx, 0, mask=pad)
        tl.store(ITEM_SLOT + idx, PADDING_ITEM, mask=pad)
    tl.store(NUM_SLOTS, slot_base)


@triton.jit
def selection_keys_kernel(BLOCK_INDICES, TOK_SEQ, CU_BLOCKS, KEYS, token0, num_entries, num_keys,
                          NUM_KV_HEADS: tl.constexpr, TOPN: tl.constexpr, BLOCK: tl.constexpr):
    """KEYS[e] = global block * Hkv + kv head of entry e of positions token0.. (`SortedSelections`), num_keys
    for an empty (-1) slot. One launch instead of ~16 small torch ops, each a few microseconds of host time."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = e < num_entries
    token = token0 + e // (NUM_KV_HEADS * TOPN)
    head = (e // TOPN) % NUM_KV_HEADS
    block = tl.load(BLOCK_INDICES + token0 * (NUM_KV_HEADS * TOPN) + e, mask=inside, other=-1)
    first = tl.load(CU_BLOCKS + tl.load(TOK_SEQ + token, mask=inside, other=0), mask=inside, other=0)
    key = tl.where(block >= 0, (first + block) * NUM_KV_HEADS + head, num_keys)
    tl.store(KEYS + e, key.to(tl.int32), mask=inside)


# ----------------------------------------------------------------------------------------------------------------
# Parameters
# ----------------------------------------------------------------------------------------------------------------

def _floor_pow2(x: int) -> int:
    return 1 << (max(1, x).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class SelectedAttentionParams:
    """Launch parameters of the selected-attention kernels (one source for forward, backward and the tuner).

    fwd and dq programs own `*_block_t` consecutive query positions x the G heads of one kv head: rows
    block_t * G, padded to a power of two >= 16. They walk the union of those positions' selected blocks in
    key tiles of `*_block_n` tokens (a block of l' tokens takes ceil(l' / block_n) tiles). A larger block_t
    shares each K/V load between more positions but processes more (partly masked) blocks when neighbouring
    positions select different blocks; block_t * G >= 16 costs nothing extra (those rows are padding otherwise).

    The dkdv program owns `dkdv_block_n` keys of one block of one kv head and steps over `dkdv_block_t`
    positions x G heads of the block's list at a time; a list longer than `dkdv_chunk` positions is split over
    several programs (partial sums reduced afterwards).

    `fwd_inverted` runs the forward the other way round (see the module doc): a program owns one selected
    block of one kv head and steps over `fwd_block_t` positions x G heads of the positions that chose it;
    `dq_inverted` does the same for dq (`dq_block_t` positions, `dq_block_n` keys per step). With
    `fwd_parts_16bit` / `dq_parts_16bit` the inverted kernels write their per-block output / dq parts in 16 bits
    (bfloat16 for bfloat16 inputs, else float16) instead of fp32, halving the parts' bytes; the lse parts and
    the merge stay fp32. Each part is then rounded once more before the fp32 merge. With `fwd_tma` / `dq_tma`
    the gathering (not inverted) kernels read each K/V key slice by one TMA copy where the GPU and layout allow
    (`runtime.tma_rows`), else by pointer loads.

    Attributes:
        fwd_block_t, fwd_block_n, fwd_num_warps, fwd_num_stages, fwd_inverted, fwd_parts_16bit, fwd_tma: forward
            kernel.
        dq_block_t, dq_block_n, dq_num_warps, dq_num_stages, dq_inverted, dq_parts_16bit, dq_tma: dq kernel (tiled
            like the forward).
        dkdv_block_t, dkdv_block_n, dkdv_chunk, dkdv_num_warps, dkdv_num_stages: dk/dv kernel.
    All tiles are powers of two; block_t <= 32 (fwd/dq: position bitmask), block_n >= 16 (GPU tl.dot).
    """

    fwd_block_t: int = 1
    fwd_block_n: int = 64
    fwd_num_warps: int = 4
    fwd_num_stages: int = 2
    fwd_inverted: bool = False
    fwd_parts_16bit: bool = False
    fwd_tma: bool = False
    dq_block_t: int = 1
    dq_block_n: int = 64
    dq_num_warps: int = 4
    dq_num_stages: int = 2
    dq_inverted: bool = False
    dq_parts_16bit: bool = False
    dq_tma: bool = False
    dkdv_block_t: int = 4
    dkdv_block_n: int = 64
    dkdv_chunk: int = 2048
    dkdv_num_warps: int = 4
    dkdv_num_stages: int = 2

    def __post_init__(self):
        check_launch_params(self, counts=("num_stages", "dkdv_chunk"), flags=("inverted", "parts_16bit", "tma"))
        for kernel in ("fwd", "dq"):
            if getattr(self, f"{kernel}_parts_16bit") and not getattr(self, f"{kernel}_inverted"):
                raise ValueError(f"SelectedAttentionParams.{kernel}_parts_16bit needs {kernel}_inverted (only the "
                                 "inverted kernels write parts)")
            if getattr(self, f"{kernel}_block_t") > MAX_BLOCK_T:
                raise ValueError(f"SelectedAttentionParams.{kernel}_block_t must be <= {MAX_BLOCK_T} (positions are "
                                 f"flagged in an int32 bitmask), got {getattr(self, f'{kernel}_block_t')}")
        for kernel in ("fwd", "dq", "dkdv"):
            if getattr(self, f"{kernel}_block_n") < MIN_DOT:
                raise ValueError(f"SelectedAttentionParams.{kernel}_block_n must be >= {MIN_DOT} (tl.dot on GPU), "
                                 f"got {getattr(self, f'{kernel}_block_n')}")


# What `nsa tune` searches (nsa.tuner.spaces builds candidates from these, prunes them by the device's limits):
# ranges of the fields above on a GPU, and a few tile sizes for the interpreter, which ignores warps and stages and
# pays per program (CI runs those).
SEARCH_SPACE = dict(fwd_block_t=[1, 2, 4, 8, 16], fwd_block_n=[16, 32, 64, 128], fwd_num_warps=[1, 4, 8],
                    fwd_num_stages=[1, 2, 3], fwd_inverted=[False, True], fwd_parts_16bit=[False, True],
                    fwd_tma=[False, True])
INTERPRETER_SEARCH_SPACE = dict(fwd_block_n=[16, 32], fwd_inverted=[False, True])
# The backward kernels (`selected_bwd`). Short list chunks could only pay at short lengths (from 2k the tuned
# 1024-4096 were best on an H200; at 1k the tuner took 256, within the spread of the old 4096), and they multiply
# the fp32 partial slots: the tuner's `dkdv_chunk_fits_length` predicate keeps them off long sequences. The dq
# kernel's stages are searched since its TMA slices: at 64k, G=16 on an H200 3 stages took the selected backward
# from 30.5-30.9 to 30.2 ms with TMA (and made it slower with pointer loads). Its 32-key slices on 1 warp, outside
# these ranges, beat the cached tile by 1-3% of the family at 16k and 64k (H200, a --fields search, session 21);
# adding them here would double a full tune of this family for that.
BACKWARD_SEARCH_SPACE = dict(dkdv_block_t=[2, 4, 8], dkdv_chunk=[64, 256, 1024, 4096], dkdv_num_stages=[2, 3],
                             dq_inverted=[False, True], dq_parts_16bit=[False, True], dq_num_warps=[2, 4],
                             dq_num_stages=[2, 3], dq_tma=[False, True])
INTERPRETER_BACKWARD_SEARCH_SPACE = dict(dkdv_chunk=[64, 4096], dq_inverted=[False, True])


def default_params(config: NSAConfig, num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
                   device=None, dtype=None) -> SelectedAttentionParams:
    """A sane untuned default: fwd/dq rows = max(16, G) (block_t = 16 // G positions, the rows a small group
    would otherwise pad), key tiles of min(64, l') tokens; dkdv steps of ~64 rows over 64-key slices on 4 warps
    with 3 stages (32 and 32 on 8 warps, 2 stages, for fp32 or head dims > 128, which would spill registers), a
    list chunk of 2 * n * l' positions (about twice a block's average list length). The dkdv sweep at 64k on an
    H200 (72 tilings, docs/performance.md) found 4 warps better than 8 in every tiling: 8 -> 4 warps took the
    selected backward from 45 to 33 ms at G=16 (64 rows) and from 87 to 68 ms at G=4 (32 rows). For 16-bit
    inputs, head dims <= 128 and groups of at most 4 heads, the forward and dq are inverted: at 64k on an H200
    the inverted forward took G=1 from 227 to 124 ms and G=4 from 115 to 93 ms (G=16: 43 -> 73 ms at best), the
    inverted dq the G=1 step from 519 to 448 ms and G=4's from 249 to 243 ms. Their parts are 16-bit: at G=4 that
    took the 64k step from 216 to 198 ms (H200), for one more rounding of each part at the inputs' precision.
    Gathering forward and dq tiles of 16 rows (16-bit, head dims <= 128) run on 1 and 2 warps: on 4, a step's 64
    keys are split across warps, so its row max and sum cross warps and p goes through shared memory to become
    the PV operand. At 64k, G=16 on an H200 (`nsa profile`) the forward kernel took 16.1 -> 14.8 ms on 1 warp and
    the dq kernel 17.4 -> 16.0 ms on 2 (G=8, also 16 rows, was not measured). K/V by pointer loads: TMA key slices
    (fwd_tma, dq_tma) are the tuner's to turn on. On an H200 they took the tuned forward kernel (16-key slices, 1
    warp) from 0.83 to 0.73 ms at 4k and 14.8 to 14.0 ms at 64k (G=16), a gathering 16k G=4 forward from 10.6 to
    8.9 ms, the dq kernel 0-2%; but this default's 64-key slices on 1 warp spill on sm_90 with TMA (untimed)."""
    group = num_heads // max(1, num_kv_heads)
    block_n = max(MIN_DOT, min(64, next_power_of_2(config.slc_block)))
    block_t = min(MAX_BLOCK_T, _floor_pow2(max(1, MIN_DOT // group)))
    heavy = dtype == torch.float32 or max(head_dim, head_dim_v) > 128
    dkdv_block_t = _floor_pow2(max(1, (32 if heavy else 64) // group))
    dkdv_block_n = min(block_n, 32) if heavy else block_n
    dkdv_chunk = max(dkdv_block_t, 2 * config.slc_topn * config.slc_block)
    dkdv_chunk = cdiv(dkdv_chunk, dkdv_block_t) * dkdv_block_t
    inverted = group <= (0 if heavy or dtype not in (torch.float16, torch.bfloat16) else 4)  # the groups measured
    narrow = not heavy and not inverted and _rows(block_t, group) == MIN_DOT  # a 16-row gathering tile
    return SelectedAttentionParams(
        fwd_block_t=block_t, fwd_block_n=block_n, fwd_num_warps=1 if narrow else 4, fwd_num_stages=2,
        fwd_inverted=inverted, fwd_parts_16bit=inverted, dq_block_t=block_t, dq_block_n=block_n,
        dq_num_warps=2 if narrow else 4, dq_num_stages=2,
        dq_inverted=inverted, dq_parts_16bit=inverted,
        dkdv_block_t=dkdv_block_t, dkdv_block_n=dkdv_block_n, dkdv_chunk=dkdv_chunk,
        dkdv_num_warps=8 if heavy and max(head_dim, head_dim_v) > 64 else 4, dkdv_num_stages=2 if heavy else 3)


# ----------------------------------------------------------------------------------------------------------------
# Index preprocessing (torch ops on the device; what depends on the lengths only is built on the host, memoized)
# ----------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class BlockSchedule:
    """What a fwd/dq program walks. Tiles are `block_t` consecutive positions of one sequence, over all sequences.

    Attributes:
        tile_tok0: int32 [tiles] packed index of each tile's first token.
        tile_seq: int32 [tiles] its sequence.
        blocks: int32 [tiles, Hkv, L] the union of the tile's selected blocks, ascending, first `counts` valid.
        masks: int32 [tiles, Hkv, L] bit p set when position p of the tile selected that block.
        counts: int32 [tiles, Hkv] union sizes.
    """

    block_t: int
    tile_tok0: torch.Tensor
    tile_seq: torch.Tensor
    blocks: torch.Tensor
    masks: torch.Tensor
    counts: torch.Tensor

    @property
    def num_tiles(self) -> int:
        return self.tile_tok0.shape[0]


@functools.lru_cache(maxsize=8)
def _tile_layout(seqlens: tuple[int, ...], block_t: int, device: torch.device):
    """The tiles of `block_t` positions of sequences of these lengths: tile_tok0, tile_seq (int32 [tiles]) and,
    for block_t > 1, each tile's token rows (int64 [tiles, block_t], clamped into range) and which of them lie past
    the sequence (bool). Host ints only, so built on the host once per shape and copied: a training loop over one
    shape runs none of it again. `device` is a tensor's, so it has its index. A few entries only (~13 bytes a
    token with their rows)."""
    tiles_per_seq = [cdiv(length, block_t) for length in seqlens]
    tile_seq = segment_ids_on_host(tiles_per_seq)
    seq_start = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
    cu_tiles = torch.tensor([0, *itertools.accumulate(tiles_per_seq)], dtype=torch.int32)
    tile_tok0 = seq_start[tile_seq] + (torch.arange(len(tile_seq), dtype=torch.int32) - cu_tiles[tile_seq]) * block_t
    layout = [tile_tok0, tile_seq.int(), None, None]
    if block_t > 1:
        tok = tile_tok0[:, None] + torch.arange(block_t, dtype=torch.int32)
        layout[2] = tok.clamp(max=max(seq_start[-1].item() - 1, 0)).long()
        layout[3] = tok >= seq_start[1:][tile_seq][:, None]
    return tuple(x if x is None else x.to(device, non_blocking=True) for x in layout)


def build_block_schedule(block_indices: torch.Tensor, seqs: PackedSequences, block_t: int) -> BlockSchedule:
    """The union of the selections of each tile of `block_t` positions, per kv head (torch ops, no host sync).

    Args:
        block_indices: int32 [total tokens, Hkv, n], ascending and -1 padded per row.
        seqs: the packed sequences; block_t: positions per tile (power of two <= 32).
    """
    total, num_kv_heads, n = block_indices.shape
    device = block_indices.device
    tile_tok0, tile_seq, rows, invalid = _tile_layout(seqs.seqlens, block_t, device)
    if block_t == 1:
        counts = (block_indices >= 0).sum(-1, dtype=torch.int32)
        masks = torch.ones(1, 1, 1, dtype=torch.int32, device=device).expand(total, num_kv_heads, n)
        return BlockSchedule(1, tile_tok0, tile_seq, block_indices, masks, counts)

    num_tiles = tile_tok0.shape[0]
    vals = block_indices[rows].masked_fill(invalid[:, :, None, None], -1)  # [tiles, block_t, Hkv, n]
    vals = vals.permute(0, 2, 1, 3).reshape(num_tiles, num_kv_heads, block_t * n)
    none = 1 << 30
    ordered, order = torch.sort(torch.where(vals >= 0, vals, none), dim=-1)
    bits = torch.bitwise_left_shift(torch.ones_like(order), order // n)  # int64: position p -> 1 << p
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[..., 1:] = ordered[..., 1:] != ordered[..., :-1]
    last = torch.ones_like(ordered, dtype=torch.bool)
    last[..., :-1] = ordered[..., :-1] != ordered[..., 1:]
    # A row lists a block at most once, so the bits of equal entries are distinct and their sum is their OR.
    running = bits.cumsum(-1)
    group_bits = running - torch.where(first, running - bits, 0).cummax(-1).values
    keep = last & (ordered != none)
    blocks, where = torch.sort(torch.where(keep, ordered, none), dim=-1)
    masks = group_bits.gather(-1, where)
    masks = torch.where(masks >= 1 << 31, masks - (1 << 32), masks).to(torch.int32)  # bit 31 as the sign bit
    blocks = torch.where(blocks == none, -1, blocks).to(torch.int32)
    return BlockSchedule(block_t, tile_tok0, tile_seq, blocks, masks, keep.sum(-1, dtype=torch.int32))


@dataclasses.dataclass(frozen=True)
class InverseIndex:
    """For each (block of a sequence, kv head) = key = global block * Hkv + hk, the query positions that selected it.

    Attributes:
        positions: int32 [entries] packed token indices, grouped by key, ascending within a key.
        offsets: int64 [keys + 1] CSR offsets into `positions`.
        block_seq: int32 [blocks] sequence of each global block; cu_blocks: int32 [N+1] block offsets.
        item_key, item_begin, item_end, item_slot: int32 [items] work items (ranges of a key's list of at most
            `chunk` positions; every key has at least one); slot -1 for a key's only item, else its partial slot;
            padding items (past the real ones, up to a host-known bound) have slot PADDING_ITEM.
        key_slot0, key_slots: int32 [keys] first partial slot and number of slots (0 for single-item keys).
        num_slots: partial slots to allocate (a bound unless counted exactly, at least the slots used).
    """

    positions: torch.Tensor
    offsets: torch.Tensor
    block_seq: torch.Tensor
    cu_blocks: torch.Tensor
    item_key: torch.Tensor
    item_begin: torch.Tensor
    item_end: torch.Tensor
    item_slot: torch.Tensor
    key_slot0: torch.Tensor
    key_slots: torch.Tensor
    num_slots: int

    @property
    def num_items(self) -> int:
        return self.item_key.shape[0]


@dataclasses.dataclass(frozen=True)
class SortedSelections:
    """The (position, kv head, slot) entries of block_indices[token0:token0 + count], flattened (entry e is
    position token0 + e // (Hkv * n)) and stably sorted by key = global block * Hkv + kv head (blocks packed over
    sequences): `order[i]` is the entry with the i-th smallest key, `sorted_keys[i]` its key; empty (-1) slots
    have key num_keys and sort last, and positions stay ascending within a key."""

    sorted_keys: torch.Tensor
    order: torch.Tensor
    num_keys: int
    block_seq: torch.Tensor
    cu_blocks: torch.Tensor


def sort_selections(block_indices: torch.Tensor, seqs: PackedSequences, config: NSAConfig, token0: int = 0,
                    count: int | None = None) -> SortedSelections:
    """`SortedSelections` of positions [token0, token0 + count) (all by default); device ops, no host sync."""
    total, num_kv_heads, n = block_indices.shape
    count = total - token0 if count is None else count
    device = block_indices.device
    blocks_per_seq = [cdiv(length, config.slc_block) for length in seqs.seqlens]
    cu_blocks = device_offsets(blocks_per_seq, device)
    num_keys = sum(blocks_per_seq) * num_kv_heads
    num_entries = count * num_kv_heads * n
    keys = torch.empty(num_entries, dtype=torch.int32, device=device)
    if num_entries:
        selection_keys_kernel[(cdiv(num_entries, KEYS_BLOCK),)](
            block_indices.contiguous(), segment_ids(seqs.seqlens, device), cu_blocks, keys, token0, num_entries,
            num_keys, NUM_KV_HEADS=num_kv_heads, TOPN=n, BLOCK=KEYS_BLOCK, num_warps=4)
    sorted_keys, order = torch.sort(keys, stable=True)
    return SortedSelections(sorted_keys, order, num_keys, segment_ids(blocks_per_seq, device), cu_blocks)


def max_inverse_items(num_entries: int, num_keys: int, chunk: int) -> tuple[int, int]:
    """Bounds on the (work items, partial slots) of an inverse index over `num_entries` selections (empty ones
    included) and `num_keys` keys: a key with c positions has max(1, ceil(c / chunk)) <= 1 + c // chunk items, and
    slots only when split (c > chunk), ceil(c / chunk) <= 2 * (c // chunk) of them."""
    return num_keys + num_entries // chunk, min(num_keys + num_entries // chunk, 2 * (num_entries // chunk))


def build_inverse_index(block_indices: torch.Tensor, seqs: PackedSequences, config: NSAConfig, chunk: int,
                        slot_bytes: int) -> InverseIndex:
    """CSR lists of the query positions that selected each (sequence block, kv head), and their work items.

    Device work throughout (a sort, then `selected_attention_dkdv_items_kernel`). Items and slots are counted by
    `max_inverse_items`, the real items first and the rest padding (slot PADDING_ITEM), unless the bound's slots of
    `slot_bytes` each pass DKDV_UNSYNCED_PART_BYTES: then one host sync reads the exact number of slots.
    """
    _, num_kv_heads, n = block_indices.shape
    device = block_indices.device
    sel = sort_selections(block_indices, seqs, config)
    num_keys = sel.num_keys
    positions = (sel.order // (num_kv_heads * n)).to(torch.int32)
    offsets = torch.searchsorted(sel.sorted_keys, torch.arange(num_keys + 1, dtype=torch.int32, device=device))
    num_items, num_slots = max_inverse_items(sel.sorted_keys.shape[0], num_keys, chunk) if num_keys else (0, 0)
    item_key, item_begin, item_end, item_slot = torch.empty(4, num_items, dtype=torch.int32, device=device)
    key_slot0, key_slots = torch.empty(2, num_keys, dtype=torch.int32, device=device)
    slots_used = torch.empty(1, dtype=torch.int32, device=device)
    selected_attention_dkdv_items_kernel[(1,)](
        offsets, item_key, item_begin, item_end, item_slot, key_slot0, key_slots, slots_used, num_keys, num_items,
        chunk, BLOCK=ITEMS_BLOCK, num_warps=4)
    if num_slots * slot_bytes > DKDV_UNSYNCED_PART_BYTES:
        num_slots = slots_used.item()  # the host sync
    return InverseIndex(positions, offsets, sel.block_seq, sel.cu_blocks, item_key, item_begin, item_end, item_slot,
                        key_slot0, key_slots, num_slots)


@dataclasses.dataclass(frozen=True)
class ForwardItems:
    """Work of the inverted forward over positions [token0, token0 + count): `entries` as in SortedSelections
    (int32, grouped by key), cut into items, each a run entries[begin:end] of one key of at most `item_len`
    positions; only keys some position selected get items, and after the real items come empty ones (begin =
    end) up to a bound known on the host."""

    entries: torch.Tensor
    item_key: torch.Tensor
    item_begin: torch.Tensor
    item_end: torch.Tensor
    block_seq: torch.Tensor
    cu_blocks: torch.Tensor

    @property
    def num_items(self) -> int:
        return self.item_key.shape[0]


def max_forward_items(num_entries: int, num_keys: int, item_len: int) -> int:
    """At most this many items cut runs of `num_entries` entries over `num_keys` keys into items of at most
    `item_len`: each run of r entries gives ceil(r / item_len) <= r / item_len + 1 items."""
    return num_entries // item_len + min(num_keys, num_entries)


def build_forward_items(block_indices: torch.Tensor, seqs: PackedSequences, config: NSAConfig, token0: int,
                        count: int, item_len: int) -> ForwardItems:
    """The inverted forward's items for positions [token0, token0 + count); device ops, no host sync.

    The item count is only known on the device, so there are `max_forward_items` items, the real ones first;
    the others are empty (begin = end) and their programs exit at once. Counting on the host (torch.nonzero)
    would cost a host sync per chunk, the GPU idle while the host queues the next launches.
    """
    sel = sort_selections(block_indices, seqs, config, token0, count)
    keys = sel.sorted_keys
    index = torch.arange(keys.shape[0], device=keys.device)
    # Where each entry's key begins: a binary search (cummax over a running index took 48 ms at 64k, G=4, H200).
    run_start = torch.searchsorted(keys, keys)
    starts = ((index - run_start) % item_len == 0) & (keys < sel.num_keys)
    bound = max_forward_items(keys.shape[0], sel.num_keys, item_len)
    # Item i is the i-th start: scatter each start's entry index to its rank, the other entries to a spare slot.
    starts_cum = starts.cumsum(0)
    rank = torch.where(starts, starts_cum - 1, bound)
    item_begin = torch.zeros(bound + 1, dtype=index.dtype, device=keys.device).scatter_(0, rank, index)[:bound]
    real = torch.arange(bound, device=keys.device) < starts_cum[-1:]  # the item count, kept on the device
    item_key = torch.where(real, keys[item_begin], 0)
    key_end = torch.searchsorted(keys, item_key, right=True)
    item_end = torch.where(real, torch.minimum(item_begin + item_len, key_end), item_begin)
    i32 = torch.int32
    return ForwardItems(sel.order.to(i32), item_key.to(i32), item_begin.to(i32), item_end.to(i32), sel.block_seq,
                        sel.cu_blocks)


# ----------------------------------------------------------------------------------------------------------------
# Launchers (packed tensors)
# ----------------------------------------------------------------------------------------------------------------

def _dims(q, k, v):
    group = q.shape[1] // k.shape[1]
    return group, head_dim_block(q.shape[2]), head_dim_block(v.shape[2])


def _rows(block_t: int, group: int) -> int:
    return max(MIN_DOT, next_power_of_2(block_t * group))


def selected_attention_fwd(q, k, v, block_indices, seqs: PackedSequences, config: NSAConfig, scale: float,
                           params: SelectedAttentionParams, schedule: BlockSchedule | None = None):
    """Forward on packed tensors.

    Args:
        q: [total, Hq, Dk]; k, v: [total, Hkv, Dk], [total, Hkv, Dv] (contiguous, one dtype).
        block_indices: int32 [total, Hkv, n] ascending, -1 padded, sequence-local block numbers.
        seqs, config, scale, params: packing offsets, NSA config, softmax scale, launch parameters.
        schedule: a prebuilt `build_block_schedule(block_indices, seqs, params.fwd_block_t)`, else built here.
    Returns:
        o [total, Hq, Dv] in q's dtype, lse [Hq, total] float32 (natural log).
    """
    total, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[2]
    group, block_dk, block_dv = _dims(q, k, v)
    o = new_output((total, num_heads, head_dim_v), dtype=q.dtype, device=q.device)
    lse = new_output((num_heads, total), dtype=torch.float32, device=q.device)
    if total == 0 or num_kv_heads == 0:
        return o, lse
    if params.fwd_inverted:
        _fwd_inverted(q, k, v, o, lse, block_indices, seqs, config, scale, params)
        return o, lse
    if schedule is None:
        schedule = build_block_schedule(block_indices, seqs, params.fwd_block_t)
    block_n = params.fwd_block_n
    s = schedule
    k_src, v_src = key_value_sources(k, v, block_n, block_dk, block_dv, params.fwd_tma)
    grid = (s.num_tiles, num_kv_heads)
    selected_attention_fwd_kernel[grid](
        q, k_src, v_src, o, lse, s.tile_tok0, s.tile_seq, seqs.cu_seqlens, s.blocks, s.masks, s.counts,
        scale * LOG2E,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0), o.stride(1),
        lse.stride(0), s.blocks.stride(0), s.blocks.stride(1), s.masks.stride(0), s.masks.stride(1),
        s.masks.stride(2), s.counts.stride(0), s.counts.stride(1),
        SLC_BLOCK=config.slc_block, G=group, HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_T=s.block_t,
        BLOCK_R=_rows(s.block_t, group),
        BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv, SUBS=cdiv(config.slc_block, block_n),
        TMA=k_src is not k, DOT_PRECISION=dot_precision(q.dtype), num_warps=params.fwd_num_warps,
        num_stages=params.fwd_num_stages)
    return o, lse


def _part_dtype(dtype: torch.dtype, parts_16bit: bool) -> torch.dtype:
    """The dtype of an inverted kernel's parts for inputs of `dtype`."""
    if not parts_16bit:
        return torch.float32
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float16


def _position_chunks(block_indices, seqs: PackedSequences, config: NSAConfig, num_heads: int, part_bytes: int):
    """(chunk, [(token0, count, items)]) for an inverted kernel whose parts take `part_bytes` per (position,
    head, slot): chunks of positions whose parts fit INVERTED_PART_BYTES, with their work items."""
    total, _, n = block_indices.shape
    budget = INVERTED_PART_BYTES
    if block_indices.is_cuda:
        budget = min(budget, torch.cuda.get_device_properties(block_indices.device).total_memory // 16)
    chunk = max(1, min(total, budget // (num_heads * n * part_bytes)))

    def chunks():
        for token0 in range(0, total, chunk):
            count = min(chunk, total - token0)
            yield token0, count, build_forward_items(block_indices, seqs, config, token0, count,
                                                     INVERTED_ITEM_POSITIONS)
    return chunk, chunks()


def _fwd_inverted(q, k, v, o, lse, block_indices, seqs: PackedSequences, config: NSAConfig, scale: float,
                  params: SelectedAttentionParams) -> None:
    """The forward with fwd_inverted: per chunk of positions, the per-block parts, then their merge into o, lse."""
    total, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[2]
    n = block_indices.shape[2]
    group, block_dk, block_dv = _dims(q, k, v)
    part_dtype = _part_dtype(q.dtype, params.fwd_parts_16bit)
    chunk, chunks = _position_chunks(block_indices, seqs, config, num_heads, head_dim_v * part_dtype.itemsize + 4)
    o_part = new_output((chunk * num_kv_heads * n, group, head_dim_v), dtype=part_dtype, device=q.device)
    lse_part = new_output((chunk * num_kv_heads * n, group), dtype=torch.float32, device=q.device)
    block_n = params.fwd_block_n
    for token0, count, items in chunks:
        if items.num_items:
            selected_attention_fwd_inverted_kernel[(items.num_items,)](
                q, k, v, o_part, lse_part, items.item_key, items.item_begin, items.item_end, items.entries,
                items.block_seq, items.cu_blocks, seqs.cu_seqlens, token0, num_kv_heads * n, num_kv_heads,
                scale * LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o_part.stride(0),
                o_part.stride(1), lse_part.stride(0),
                SLC_BLOCK=config.slc_block, G=group, HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v,
                BLOCK_T=params.fwd_block_t, BLOCK_R=_rows(params.fwd_block_t, group), BLOCK_N=block_n,
                BLOCK_DK=block_dk, BLOCK_DV=block_dv, SUBS=cdiv(config.slc_block, block_n),
                DOT_PRECISION=dot_precision(q.dtype), num_warps=params.fwd_num_warps,
                num_stages=params.fwd_num_stages)
        selected_attention_fwd_merge_kernel[(count, num_kv_heads)](
            o, lse, o_part, lse_part, block_indices, token0,
            o.stride(0), o.stride(1), lse.stride(0), o_part.stride(0), o_part.stride(1), lse_part.stride(0),
            block_indices.stride(0), block_indices.stride(1),
            N=n, G=group, HEAD_DIM_V=head_dim_v, BLOCK_G=next_power_of_2(group), BLOCK_DV=block_dv,
            num_warps=4)


def _dq_inverted(q, k, v, do, lse, delta, dq, block_indices, seqs: PackedSequences, config: NSAConfig,
                 scale: float, params: SelectedAttentionParams) -> None:
    """dq with dq_inverted: per chunk of positions, the per-block parts, then their sum into dq."""
    total, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[2]
    n = block_indices.shape[2]
    group, block_dk, block_dv = _dims(q, k, v)
    part_dtype = _part_dtype(q.dtype, params.dq_parts_16bit)
    chunk, chunks = _position_chunks(block_indices, seqs, config, num_heads, head_dim * part_dtype.itemsize)
    dq_part = new_output((chunk * num_kv_heads * n, group, head_dim), dtype=part_dtype, device=q.device)
    block_n = params.dq_block_n
    for token0, count, items in chunks:
        if items.num_items:
            selected_attention_bwd_dq_inverted_kernel[(items.num_items,)](
                q, k, v, do, lse, delta, dq_part, items.item_key, items.item_begin, items.item_end, items.entries,
                items.block_seq, items.cu_blocks, seqs.cu_seqlens, token0, num_kv_heads * n, num_kv_heads, scale,
                scale * LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
                do.stride(1), lse.stride(0), dq_part.stride(0), dq_part.stride(1),
                SLC_BLOCK=config.slc_block, G=group, HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v,
                BLOCK_T=params.dq_block_t, BLOCK_R=_rows(params.dq_block_t, group), BLOCK_N=block_n,
                BLOCK_DK=block_dk, BLOCK_DV=block_dv, SUBS=cdiv(config.slc_block, block_n),
                DOT_PRECISION=dot_precision(q.dtype), num_warps=params.dq_num_warps, num_stages=params.dq_num_stages)
        selected_attention_sum_parts_kernel[(count, num_kv_heads)](
            dq, dq_part, block_indices, token0, dq.stride(0), dq.stride(1), dq_part.stride(0), dq_part.stride(1),
            block_indices.stride(0), block_indices.stride(1),
            N=n, G=group, HEAD_DIM=head_dim, BLOCK_G=next_power_of_2(group), BLOCK_D=block_dk, num_warps=4)


def selected_attention_bwd(do, q, k, v, o, lse, block_indices, seqs: PackedSequences, config: NSAConfig,
                           scale: float, params: SelectedAttentionParams, schedule: BlockSchedule | None = None, *,
                           delta: torch.Tensor | None = None):
    """Backward on packed tensors: (dq, dk, dv) in the dtypes of q, k, v.

    Args as for `selected_attention_fwd`, plus do [total, Hq, Dv] and the forward's o and lse; `schedule` may be
    the forward's when params.dq_block_t == params.fwd_block_t. `selected_attention_bwd_dq`, then
    `selected_attention_bwd_dkdv`: two calls for a caller that uses dq before dk and dv are done.
    """
    dq, delta = selected_attention_bwd_dq(do, q, k, v, o, lse, block_indices, seqs, config, scale, params, schedule,
                                          delta=delta)
    dk, dv = selected_attention_bwd_dkdv(do, q, k, v, lse, delta, block_indices, seqs, config, scale, params)
    return dq, dk, dv


def selected_attention_bwd_dq(do, q, k, v, o, lse, block_indices, seqs: PackedSequences, config: NSAConfig,
                              scale: float, params: SelectedAttentionParams, schedule: BlockSchedule | None = None,
                              *, delta: torch.Tensor | None = None):
    """dq (q's dtype) and delta = rowsum(do * o) [Hq, total] fp32 (`delta` itself when given; else the dq kernel
    writes it as it goes). Args as for `selected_attention_bwd`."""
    total, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[2]
    group, block_dk, block_dv = _dims(q, k, v)
    device = q.device
    dq = new_output(q.shape, dtype=q.dtype, device=device)
    if total == 0 or num_kv_heads == 0:
        return dq, delta
    precision = dot_precision(q.dtype)
    ls = config.slc_block

    delta_given = delta is not None
    if params.dq_inverted:
        delta = attention_delta(o, do) if delta is None else delta
        _dq_inverted(q, k, v, do, lse, delta, dq, block_indices, seqs, config, scale, params)
    else:
        if delta is None:  # written by the dq kernel
            delta = new_output((num_heads, total), dtype=torch.float32, device=device)
        s = schedule if schedule is not None and schedule.block_t == params.dq_block_t else \
            build_block_schedule(block_indices, seqs, params.dq_block_t)
        if s.num_tiles:
            k_src, v_src = key_value_sources(k, v, params.dq_block_n, block_dk, block_dv, params.dq_tma)
            selected_attention_bwd_dq_kernel[(s.num_tiles, num_kv_heads)](
                q, k_src, v_src, o, do, lse, delta, dq, s.tile_tok0, s.tile_seq, seqs.cu_seqlens, s.blocks, s.masks,
                s.counts, scale, scale * LOG2E,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), o.stride(0),
                o.stride(1), do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
                s.blocks.stride(0), s.blocks.stride(1), s.masks.stride(0), s.masks.stride(1), s.masks.stride(2),
                s.counts.stride(0), s.counts.stride(1),
                SLC_BLOCK=ls, G=group, HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_T=s.block_t,
                BLOCK_R=_rows(s.block_t, group), BLOCK_N=params.dq_block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
                SUBS=cdiv(ls, params.dq_block_n), DELTA_GIVEN=delta_given, TMA=k_src is not k,
                DOT_PRECISION=precision,
                num_warps=params.dq_num_warps, num_stages=params.dq_num_stages)
    return dq, delta


def selected_attention_bwd_dkdv(do, q, k, v, lse, delta, block_indices, seqs: PackedSequences, config: NSAConfig,
                                scale: float, params: SelectedAttentionParams):
    """(dk, dv) in the dtypes of k, v: the dk/dv kernel over the inverse index, then the reduction of split lists.
    delta: rowsum(do * o) [Hq, total] fp32, as `selected_attention_bwd_dq` returns it."""
    total, _, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[1], v.shape[2]
    group, block_dk, block_dv = _dims(q, k, v)
    device = q.device
    dk = new_output(k.shape, dtype=k.dtype, device=device)
    dv = new_output(v.shape, dtype=v.dtype, device=device)
    if total == 0 or num_kv_heads == 0:
        return dk, dv
    precision = dot_precision(q.dtype)
    ls = config.slc_block

    inv = build_inverse_index(block_indices, seqs, config, params.dkdv_chunk, ls * (head_dim + head_dim_v) * 4)
    block_n = params.dkdv_block_n
    slices = cdiv(ls, block_n)
    dk_part = new_output((max(1, inv.num_slots), ls, head_dim), dtype=torch.float32, device=device)
    dv_part = new_output((max(1, inv.num_slots), ls, head_dim_v), dtype=torch.float32, device=device)
    if inv.num_items:
        selected_attention_bwd_dkdv_kernel[(inv.num_items, slices)](
            q, k, v, do, lse, delta, dk, dv, dk_part, dv_part, inv.item_key, inv.item_begin, inv.item_end,
            inv.item_slot, inv.positions, inv.block_seq, inv.cu_blocks, seqs.cu_seqlens, scale, scale * LOG2E,
            num_kv_heads,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0), do.stride(1),
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0), dk_part.stride(0),
            dk_part.stride(1), dv_part.stride(0), dv_part.stride(1),
            SLC_BLOCK=ls, G=group, HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_T=params.dkdv_block_t,
            BLOCK_R=_rows(params.dkdv_block_t, group), BLOCK_N=block_n, BLOCK_DK=block_dk, BLOCK_DV=block_dv,
            DOT_PRECISION=precision, num_warps=params.dkdv_num_warps, num_stages=params.dkdv_num_stages)
    if inv.num_slots:
        selected_attention_bwd_dkdv_reduce_kernel[(inv.key_slots.shape[0], cdiv(ls, REDUCE_BLOCK_N))](
            dk, dv, dk_part, dv_part, inv.key_slot0, inv.key_slots, inv.block_seq, inv.cu_blocks, seqs.cu_seqlens,
            num_kv_heads, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), dk_part.stride(0),
            dk_part.stride(1), dv_part.stride(0), dv_part.stride(1),
            SLC_BLOCK=ls, HEAD_DIM_K=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_N=REDUCE_BLOCK_N, BLOCK_DK=block_dk,
            BLOCK_DV=block_dv, num_warps=4)
    return dk, dv


def selected_attention_fwd_for_bwd(q, k, v, block_indices, seqs: PackedSequences, config: NSAConfig, scale: float,
                                   params: SelectedAttentionParams):
    """`selected_attention_fwd`'s o and lse, and the schedule for `selected_attention_bwd`: the dq kernel walks the
    forward's when it packs as many positions (with block_t = 1 the schedule is block_indices itself plus row
    counts, so keeping it costs next to nothing), else None."""
    schedule = None if params.fwd_inverted else build_block_schedule(block_indices, seqs, params.fwd_block_t)
    o, lse = selected_attention_fwd(q, k, v, block_indices, seqs, config, scale, params, schedule)
    return o, lse, schedule if params.dq_block_t == params.fwd_block_t else None


# ----------------------------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------------------------

class SelectedAttentionFunction(torch.autograd.Function):
    """Packed tensors in, o out; gradients to q, k, v (none to the discrete block indices)."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, seqs, config, scale, params):
        o, lse, ctx.schedule = selected_attention_fwd_for_bwd(q, k, v, block_indices, seqs, config, scale, params)
        ctx.save_for_backward(q, k, v, o, lse, block_indices)
        ctx.seqs, ctx.config, ctx.scale, ctx.params = seqs, config, scale, params
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse, block_indices = ctx.saved_tensors
        dq, dk, dv = selected_attention_bwd(do.contiguous(), q, k, v, o, lse, block_indices, ctx.seqs, ctx.config,
                                            ctx.scale, ctx.params, ctx.schedule)
        return dq, dk, dv, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, block_indices, config, cu_seqlens):
    check_config(config)
    check_float_tensors(dict(q=q, k=k, v=v), dict(q=4, k=4, v=4))
    if not isinstance(block_indices, torch.Tensor) or block_indices.dtype != torch.int32:
        raise TypeError(f"block_indices must be an int32 torch.Tensor, got "
                        f"{getattr(block_indices, 'dtype', type(block_indices).__name__)}")
    if block_indices.device != q.device:
        raise ValueError(f"block_indices is on {block_indices.device} but q is on {q.device}: "
                         "all inputs must be on one device")
    num_kv_heads, head_dim_v = check_keys_values(q, k, v)
    check_kernel_inputs(q, max(q.shape[3], head_dim_v))
    batch, seqlen = q.shape[:2]
    if block_indices.dim() != 4 or tuple(block_indices.shape[:3]) != (batch, seqlen, num_kv_heads) \
            or block_indices.shape[3] < 1:
        raise ValueError(f"block_indices must have shape ({batch}, {seqlen}, {num_kv_heads}, n) with n >= 1 "
                         f"(B, T, Hkv, n), got {tuple(block_indices.shape)}")
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, batch, seqlen, q.device)


def selected_attention(q, k, v, block_indices, config: NSAConfig, *, scale=None, cu_seqlens=None, params=None):
    """Selected-block attention o_slc (SPEC 1.5), Triton forward and backward.

    Query position t (within its sequence) and head h attend to the tokens s <= t of the selection blocks j
    (tokens [j*l', (j+1)*l')) listed in block_indices[..., t, h // G, :].

    Args:
        q: [B, T, Hq, Dk] queries; float16, bfloat16 or float32 (CUDA), any float dtype in the interpreter.
        k: [B, T, Hkv, Dk] keys; v: [B, T, Hkv, Dv] values; same dtype and device as q. Hq = G * Hkv.
        block_indices: int32 [B, T, Hkv, n] selected blocks per query and kv head, ascending, padded with -1
            (e.g. from `select_blocks`); every row must give its query at least one key. No gradient.
        config: the NSAConfig (its slc_block l' is used).
        scale: softmax scale, default Dk ** -0.5.
        cu_seqlens: int32 [N+1] offsets of packed variable-length sequences (B = 1), FlashAttention style.
        params: `SelectedAttentionParams` launch parameters, default `default_params(...)`.
    Returns:
        o_slc [B, T, Hq, Dv] in q's dtype; differentiable with respect to q, k, v.

    Example:
        >>> o = selected_attention(q, k, v, select_blocks(q, k_cmp, cfg), cfg)
    """
    _check_inputs(q, k, v, block_indices, config, cu_seqlens)
    scale = resolve_scale(scale, q.shape[-1])
    batch, seqlen, num_heads, head_dim = q.shape
    num_kv_heads, head_dim_v = k.shape[2], v.shape[3]
    dtype = compute_dtype(q.dtype)
    if params is None:
        params = default_params(config, num_heads, num_kv_heads, head_dim, head_dim_v, q.device, dtype)
    elif not isinstance(params, SelectedAttentionParams):
        raise TypeError(f"params must be a SelectedAttentionParams, got {type(params).__name__}")
    seqs = PackedSequences.build(config, batch, seqlen, q.device, cu_seqlens)
    packed = (pack(x, dtype) for x in (q, k, v))
    indices = pack(block_indices, block_indices.dtype)
    o, _ = SelectedAttentionFunction.apply(*packed, indices, seqs, config, scale, params)
    return o.reshape(batch, seqlen, num_heads, head_dim_v).to(q.dtype)
