"""Block importance and top-n block selection (SPEC 1.3-1.4) in Triton, forward only (discrete, no gradient).

One program owns BLOCK_P query positions of one sequence and one kv head, with the HEADS query heads of its
group packed into the rows of the score tile (row r = position r // HEADS, head r % HEADS). It walks the
causal selection blocks in chunks of NPAD = max(16, next_pow2(n)) blocks and never materialises p_cmp or
the importance beyond one chunk:

1. scores of the chunk's compressed blocks (those starting inside its selection blocks, R = l'/d per block,
   laid out as NPAD x RPAD columns, RPAD = next_pow2(R)) for every head of the group, in fp32;
   p_cmp = exp(scale * q.k_cmp - lse) from the compression forward's lse, summed over the group's heads;
2. importance: a compressed block at offset o = r*d inside selection block j gives weight min(l, l'-o)/d to j
   and the rest, (l - min(l, l'-o))/d, to j+1 (l <= l', so never further). The spill to j+1 is shifted by one
   block inside the chunk with an exact broadcast-compare-sum ([BLOCK_P, NPAD, NPAD] adds of zeros, negligible
   next to the G * BLOCK_P * NPAD * RPAD * Dk score products), and the chunk's last spill is carried over;
3. a running top-NPAD in registers: `best` [BLOCK_P, NPAD] int64 keys sorted descending. A key packs the
   importance (non-negative float32, so its bits as an integer are monotone) above (2**31 - 1 - j), so one
   integer order ranks by importance, then by LOWER index. Forced blocks get the bits of +inf, non-causal ones
   key -1. Each chunk's keys are sorted ascending and merged by an elementwise max with `best`, which is
   exactly the top NPAD of the union (bitonic merge), then `best` is sorted descending again.

Finally the first min(n, t//l' + 1) indices are sorted ascending and written, -1 after.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from nsa.config import NSAConfig
from nsa.inputs import resolve_scale
from nsa.kernels import runtime
from nsa.kernels.compression import (LOG2E, check_compression_inputs, compressed_attention_fwd, head_dim_block,
                                     pack)
from nsa.kernels.compression import default_params as compression_default_params
from nsa.kernels.packing import PackedSequences

INDEX_BIAS = 2**31 - 1  # key low word: INDEX_BIAS - j, larger for lower j
INF_BITS = 0x7F800000  # float32 +inf as int32: above any finite importance


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def select_blocks_fwd_kernel(
        q, k, lse, out, cu_seqlens, cu_cmp,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_ot, stride_oh,
        scale_log2,
        G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr,
        TOPN: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, DK: tl.constexpr,
        BLOCK_P: tl.constexpr, HEADS: tl.constexpr, NUM_HEAD_CHUNKS: tl.constexpr, BLOCK_DK: tl.constexpr,
        NPAD: tl.constexpr, RPAD: tl.constexpr, PRECISION: tl.constexpr):
    """block_indices [BLOCK_P positions, n] of one kv head of one sequence."""
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE  # compressed blocks starting in one selection block
    BLOCK_M: tl.constexpr = BLOCK_P * HEADS
    BLOCK_C: tl.constexpr = NPAD * RPAD
    tl.static_assert(NPAD >= TOPN)
    tl.static_assert(RPAD >= R)
    tl.static_assert(CMP_BLOCK <= SLC_BLOCK)

    pid_p = tl.num_programs(0) - 1 - tl.program_id(0)  # late tiles have the most blocks: start them first
    pid_s = tl.program_id(1)
    hk = tl.program_id(2)
    seq_start = tl.load(cu_seqlens + pid_s)
    seqlen = tl.load(cu_seqlens + pid_s + 1) - seq_start
    cmp_start = tl.load(cu_cmp + pid_s)
    num_cmp = tl.load(cu_cmp + pid_s + 1) - cmp_start
    p0 = pid_p * BLOCK_P
    if p0 >= seqlen:
        return

    # Rows of the score tile: (position, head of the group).
    offs_r = tl.arange(0, BLOCK_M)
    pos_r = p0 + offs_r // HEADS
    tok_r = (seq_start + pos_r).to(tl.int64)
    offs_dk = tl.arange(0, BLOCK_DK)
    dk_ok = offs_dk < DK
    # Columns of the score tile: compressed block (j0 + c // RPAD) * R + c % RPAD.
    offs_c = tl.arange(0, BLOCK_C)
    col_blk = offs_c // RPAD
    col_r = offs_c % RPAD
    # Weights of a compressed block at offset r*d in its selection block: to that block and to the next one.
    offs_rr = tl.arange(0, RPAD)
    w_in = tl.minimum(CMP_BLOCK, SLC_BLOCK - offs_rr * CMP_STRIDE)
    w_self = tl.where(offs_rr < R, w_in.to(tl.float32) / CMP_STRIDE, 0.0)
    w_next = tl.where(offs_rr < R, (CMP_BLOCK - w_in).to(tl.float32) / CMP_STRIDE, 0.0)
    # Selection state, one row per position.
    offs_p = tl.arange(0, BLOCK_P)
    current = (p0 + offs_p) // SLC_BLOCK  # [BLOCK_P]: the block holding the position
    offs_j = tl.arange(0, NPAD)
    shift = ((offs_j[:, None] + 1) == offs_j[None, :]).to(tl.float32)  # [k, j]: block k spills into j = k+1
    best = tl.full([BLOCK_P, NPAD], -1, dtype=tl.int64)
    carry = tl.zeros([BLOCK_P], dtype=tl.float32)

    if NUM_HEAD_CHUNKS == 1:  # the whole group fits one tile: keep q and lse in registers
        g_r = offs_r % HEADS
        row_ok = (pos_r < seqlen) & (g_r < G)
        head_r = hk * G + g_r
        q_tile = tl.load(q + tok_r[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :],
                         mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
        lse2 = tl.load(lse + head_r * stride_lh + tok_r, mask=row_ok, other=float("inf")) * LOG2E

    p_last = tl.minimum(p0 + BLOCK_P, seqlen) - 1
    num_causal = p_last // SLC_BLOCK + 1
    for j0 in range(0, num_causal, NPAD):
        cmp_idx = (j0 + col_blk) * R + col_r
        col_ok = (col_r < R) & (cmp_idx < num_cmp)
        k_t = tl.load(k + (cmp_start + cmp_idx).to(tl.int64)[None, :] * stride_kt + hk * stride_kh
                      + offs_dk[:, None], mask=col_ok[None, :] & dk_ok[:, None], other=0.0)  # [BLOCK_DK, BLOCK_C]
        visible = col_ok[None, :] & (cmp_idx[None, :] * CMP_STRIDE + (CMP_BLOCK - 1) <= pos_r[:, None])
        prob = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # p_cmp summed over the group's heads
        for hc in range(NUM_HEAD_CHUNKS):
            if NUM_HEAD_CHUNKS > 1:
                g_r = hc * HEADS + offs_r % HEADS
                row_ok = (pos_r < seqlen) & (g_r < G)
                head_r = hk * G + g_r
                q_tile = tl.load(q + tok_r[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :],
                                 mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
                lse2 = tl.load(lse + head_r * stride_lh + tok_r, mask=row_ok, other=float("inf")) * LOG2E
            s = tl.dot(q_tile, k_t, input_precision=PRECISION) * scale_log2
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)  # [BLOCK_M, BLOCK_C]
            prob += tl.sum(tl.reshape(p, [BLOCK_P, HEADS, BLOCK_C]), 1)
        prob3 = tl.reshape(prob, [BLOCK_P, NPAD, RPAD])
        imp_self = tl.sum(prob3 * w_self[None, None, :], 2)  # [BLOCK_P, NPAD]
        spill = tl.sum(prob3 * w_next[None, None, :], 2)  # goes to the next block
        imp = imp_self + tl.sum(spill[:, :, None] * shift[None, :, :], 1)
        imp += tl.where(offs_j[None, :] == 0, carry[:, None], 0.0)
        carry = tl.sum(tl.where(offs_j[None, :] == NPAD - 1, spill, 0.0), 1)

        blk = j0 + offs_j
        low = (INDEX_BIAS - blk).to(tl.int64)[None, :]
        key = (imp.to(tl.int32, bitcast=True).to(tl.int64) << 32) | low
        forced = (blk[None, :] < INIT_BLOCKS) | (current[:, None] - blk[None, :] < LOCAL_BLOCKS)
        key = tl.where(forced, (tl.full([BLOCK_P, NPAD], INF_BITS, tl.int64) << 32) | low, key)
        key = tl.where(blk[None, :] <= current[:, None], key, -1)
        best = tl.maximum(best, tl.sort(key, 1))  # ascending against descending: the top NPAD of both
        best = tl.sort(best, 1, descending=True)

    count = tl.minimum(current + 1, TOPN)
    chosen = (INDEX_BIAS - (best & 0xFFFFFFFF)).to(tl.int32)
    chosen = tl.where(offs_j[None, :] < count[:, None], chosen, INDEX_BIAS)
    chosen = tl.sort(chosen, 1)
    chosen = tl.where(chosen == INDEX_BIAS, -1, chosen)
    tok_p = (seq_start + p0 + offs_p).to(tl.int64)
    tl.store(out + tok_p[:, None] * stride_ot + hk * stride_oh + offs_j[None, :], chosen,
             mask=((p0 + offs_p) < seqlen)[:, None] & (offs_j < TOPN)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launcher (packed tensors)
# ----------------------------------------------------------------------------------------------------------------


def _pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


@dataclasses.dataclass(frozen=True)
class SelectionParams:
    """Launch parameters of the block-selection kernel.

    Attributes:
        BLOCK_P: query positions per program (a power of two); their top-n state is [BLOCK_P, NPAD] int64.
        HEADS: query heads of the group per score tile, a power of two <= next_pow2(G); BLOCK_P * HEADS >= 16
            rows. With HEADS >= G the whole group is one tile and q stays in registers across chunks.
        num_warps, num_stages: Triton launch options.
    The chunk width NPAD = max(16, next_pow2(n)) selection blocks follows from the config, not from the params.
    """

    BLOCK_P: int = 8
    HEADS: int = 16
    num_warps: int = 4
    num_stages: int = 1

    def check(self, group: int) -> None:
        """ValueError unless the params are legal for GQA group size `group`."""
        if not (_pow2(self.BLOCK_P) and _pow2(self.HEADS)):
            raise ValueError(f"SelectionParams: BLOCK_P and HEADS must be powers of two, got {self.BLOCK_P}, "
                             f"{self.HEADS}")
        if self.HEADS > triton.next_power_of_2(group):
            raise ValueError(f"SelectionParams: HEADS={self.HEADS} exceeds the group size G={group}")
        if self.BLOCK_P * self.HEADS < 16:
            raise ValueError(f"SelectionParams: tl.dot needs BLOCK_P * HEADS >= 16, got {self.BLOCK_P * self.HEADS}")
        if not _pow2(self.num_warps) or self.num_stages < 1:
            raise ValueError(f"SelectionParams: bad num_warps={self.num_warps} / num_stages={self.num_stages}")


def default_params(num_heads: int, num_kv_heads: int, head_dim: int, config: NSAConfig,
                   device=None) -> SelectionParams:
    """All heads of a group in one tile (up to 64), about 64-128 rows per program."""
    group = num_heads // num_kv_heads
    heads = min(triton.next_power_of_2(group), 64)
    rows = 256 if runtime.interpreting() else (128 if heads >= 8 else 64)
    return SelectionParams(BLOCK_P=max(1, rows // heads), HEADS=heads, num_warps=4, num_stages=1)


def chunk_width(config: NSAConfig) -> int:
    """NPAD: selection blocks per chunk and width of the running top-n."""
    return max(16, triton.next_power_of_2(config.slc_topn))


def select_blocks_fwd(q, k_cmp, lse, seqs: PackedSequences, config: NSAConfig, scale: float,
                      params: SelectionParams) -> torch.Tensor:
    """Top-n selection blocks of packed sequences.

    Args:
        q: [Ttot, Hq, Dk]; k_cmp: [Ctot, Hkv, Dk]; lse: [Hq, Ttot] float32 from `compressed_attention_fwd`
            with the same q, k_cmp, scale.
    Returns:
        block_indices [Ttot, Hkv, n] int32: ascending, -1 padded.
    """
    total, num_heads, head_dim = q.shape
    num_kv_heads = k_cmp.shape[1]
    group = num_heads // num_kv_heads
    params.check(group)
    n = config.slc_topn
    shape = (total, num_kv_heads, n)
    if runtime.POISON_OUTPUTS:
        out = torch.full(shape, -2, dtype=torch.int32, device=q.device)
    else:
        out = torch.empty(shape, dtype=torch.int32, device=q.device)
    if total == 0:
        return out
    if k_cmp.shape[0] == 0:  # no compressed keys: pass a valid pointer, every column is masked off
        k_cmp = torch.zeros((1, num_kv_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = lse.contiguous()
    heads_chunks = triton.cdiv(group, params.HEADS)
    grid = (triton.cdiv(seqs.max_seqlen, params.BLOCK_P), seqs.num_seqs, num_kv_heads)
    select_blocks_fwd_kernel[grid](
        q, k_cmp, lse, out, seqs.cu_seqlens, seqs.cu_cmp,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E,
        G=group, CMP_BLOCK=config.cmp_block, CMP_STRIDE=config.cmp_stride, SLC_BLOCK=config.slc_block, TOPN=n,
        INIT_BLOCKS=config.init_blocks, LOCAL_BLOCKS=config.local_blocks, DK=head_dim, BLOCK_P=params.BLOCK_P,
        HEADS=params.HEADS, NUM_HEAD_CHUNKS=heads_chunks, BLOCK_DK=head_dim_block(head_dim),
        NPAD=chunk_width(config), RPAD=triton.next_power_of_2(config.slc_block // config.cmp_stride),
        PRECISION=runtime.dot_precision(q.dtype), num_warps=params.num_warps, num_stages=params.num_stages)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------


def select_blocks(q, k_cmp, config: NSAConfig, *, scale=None, cu_seqlens=None, lse=None, params=None):
    """block_indices [B, T, Hkv, n] int32: the selection blocks each query's group attends to (SPEC 1.3-1.4).

    Importance of selection block j for query t and kv head hk: the compression probabilities p_cmp of the
    group's G heads, summed, each compression block weighted by its overlap with block j over d. Blocks
    0..init_blocks-1 and the local_blocks most recent ones are always chosen, the rest by descending importance
    (ties to the lower index) until min(n, t//l' + 1) blocks; indices ascending, -1 padded. No gradient.

    Args:
        q: [B, T, Hq, Dk] queries (float16, bfloat16 or float32; CUDA, or CPU under TRITON_INTERPRET=1).
        k_cmp: [B, Tc, Hkv, Dk] compressed keys (packed per sequence with cu_seqlens).
        config: the NSAConfig.
        scale: softmax scale, Dk ** -0.5 by default.
        cu_seqlens: int32 [N+1] offsets of packed sequences (B = 1), or None.
        lse: [B, Hq, T] float32 log-sum-exp of the compressed attention of the same q, k_cmp and scale (as
            returned by `compressed_attention(..., return_lse=True)`); computed here when None.
        params: SelectionParams, `default_params(...)` when None.
    Returns:
        block_indices [B, T, Hkv, n] int32.

    Example:
        >>> o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, cfg, return_lse=True)
        >>> idx = select_blocks(q, k_cmp, cfg, lse=lse)  # [B, T, Hkv, cfg.slc_topn]
    """
    seqs = check_compression_inputs(q, k_cmp, config, cu_seqlens)
    scale = resolve_scale(scale, q.shape[-1])
    batch, seqlen, num_heads, head_dim = q.shape
    num_kv_heads = k_cmp.shape[2]
    if lse is not None:
        if not isinstance(lse, torch.Tensor):
            raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
        if tuple(lse.shape) != (batch, num_heads, seqlen) or lse.dtype != torch.float32:
            raise ValueError(f"lse must be float32 of shape {(batch, num_heads, seqlen)} (B, Hq, T), got "
                             f"{lse.dtype} {tuple(lse.shape)}")
        if lse.device != q.device:
            raise ValueError(f"lse is on {lse.device} but q is on {q.device}")
    if params is None:
        params = default_params(num_heads, num_kv_heads, head_dim, config, q.device)
    dtype = runtime.compute_dtype(q.dtype)
    with torch.no_grad():
        q_packed, k_packed = pack(q, dtype), pack(k_cmp, dtype)
        if lse is None:
            # The forward's output o is not needed, but its lse is; v_cmp only shapes o, so k_cmp stands in.
            cmp_params = compression_default_params(num_heads, num_kv_heads, head_dim, head_dim, config, q.device)
            _, lse_packed = compressed_attention_fwd(q_packed, k_packed, k_packed, seqs, config, scale, cmp_params)
        else:
            lse_packed = lse.transpose(0, 1).reshape(num_heads, batch * seqlen)
        out = select_blocks_fwd(q_packed, k_packed, lse_packed, seqs, config, scale, params)
    return out.reshape(batch, seqlen, num_kv_heads, config.slc_topn)
