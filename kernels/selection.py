"""Block importance and top-n block selection (SPEC 1.3-1.4) in Triton, forward only (discrete, no gradient).

One program owns BLOCK_P query positions of one sequence and one kv head, with the HEADS query heads of its
group packed into the rows of the score tile (row r = position r // HEADS, head r % HEADS). It walks the
causal selection blocks in chunks of NPAD = max(16, next_pow2(n)) blocks and never materialises p_cmp or
the importance beyond one chunk:

1. scores of the chunk's compressed blocks (those starting inside its selection blocks, R = l'/d per block,
   laid out as NPAD x RPAD columns, RPAD = next_pow2(R)) for every head of the group, in fp32;
   p_cmp = exp(scale * q.k_cmp - lse) from the compression forward's lse, summed over the group's heads
   (columns r >= R are masked: wasted work only when l'/d is not a power of two; the paper's R = 4 is);
2. importance: a compressed block at offset o = r*d inside selection block j gives weight min(l, l'-o)/d to j
   and the rest, (l - min(l, l'-o))/d, to j+1 (l <= l', so never further). The spill to j+1 is shifted by one
   block inside the chunk by an exact `tl.gather` along the chunk (a copy between lanes, no arithmetic), and
   the chunk's last spill is carried over;
3. a running top-NPAD in registers: `best` [BLOCK_P, NPAD] integer keys sorted descending. A key packs the
   importance (non-negative float32, so its bits as an integer are monotone) above (2**B - 1 - j), B index
   bits, so one integer order ranks by importance, then by LOWER index. Forced blocks get a high word above
   every importance's, non-causal ones key -1. Each chunk's keys are sorted ascending and merged by an
   elementwise max with `best`, which is exactly the top NPAD of the union, a bitonic row that a
   log2(NPAD)-step merge sorts descending again. Keys are int64 (B = 31, the whole float) or, for 16-bit
   inputs, int32, which halves the sort's shuffles and compares: the importance scaled below 1/2 by a power of
   two, its float bits counted from 2**-32 (smaller ones tie at 0) and cut to the bits left beside B
   (`KeyLayout`: at least 12 mantissa bits, so only importances closer than 2.5e-4 relative may tie, well
   under the 16-bit inputs' own rounding).

Finally the first min(n, t//l' + 1) indices are sorted ascending and written, -1 after.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nsa.config import NSAConfig
from nsa.inputs import resolve_scale
from nsa.kernels import runtime
from nsa.kernels.compression import LOG2E, check_compression_inputs, compressed_attention_fwd
from nsa.kernels.compression import default_params as compression_default_params
from nsa.kernels.packing import PackedSequences

# Kernel constants (tl.constexpr: the only module globals a GPU kernel may read).
NO_BLOCK = tl.constexpr(2**29)  # placeholder for unchosen slots while sorting the output (pair sums fit int32)
_LOG2E = tl.constexpr(LOG2E)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------------


# Bitonic sorting along the last axis of a [ROWS, 2**LOG_N] tile. As in tl.sort, each compare-and-swap step
# views the rows as [ROWS, ., 2, 2**J] and exchanges the pairs along the size-2 axis, but the partner of each
# element is (pair sum) - element instead of tl.sort's xor_sum exchange: one size-2 reduction per step on the
# GPU either way, while the interpreter runs tl.sum as one numpy call but xor_sum as a Python loop per element
# (and pays per dimension of tl.sort's full hypercube view). Values must not overflow a pair sum: keys stay
# below 2**62 (int64) or 2**30 (int32), block indices at most 2**29. Written inline, without nested jit helpers:
# the interpreter pays for every device-function call.


@triton.jit
def _sort_rows(x, ROWS: tl.constexpr, LOG_N: tl.constexpr, DESCENDING: tl.constexpr, BITONIC: tl.constexpr):
    """Sort each row of x [ROWS, 2**LOG_N]; with BITONIC the rows are bitonic already and only the last merge
    (LOG_N compare-and-swap steps) runs."""
    N: tl.constexpr = 1 << LOG_N
    col = tl.arange(0, N)[None, :]
    for stage in tl.static_range(LOG_N if BITONIC else 1, LOG_N + 1):
        if stage < LOG_N:  # alternate the direction between runs of 2**stage
            flip = (col >> stage) & 1
        else:
            flip = DESCENDING
        for i in tl.static_range(stage):
            # Pairs at distance 2**(stage-1-i) (constexpr arithmetic inline: a constexpr can't be reassigned).
            pairs = tl.reshape(x, [ROWS, N >> (stage - i), 2, 1 << (stage - 1 - i)])
            partner = tl.reshape(tl.sum(pairs, 2, keep_dims=True) - pairs, [ROWS, N])
            right = (col >> (stage - 1 - i)) & 1  # the element is the right one of its pair
            # Ascending (flip 0): the pair's min goes left, its max right.
            x = tl.where((flip ^ right) == 1, tl.maximum(x, partner), tl.minimum(x, partner))
    return x


@triton.jit
def spill_weights(r, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr):
    """Weights of the compressed block at offset r*d in its selection block (SPEC 1.3): min(l, l' - r*d)/d to
    that block and the rest to the next one; 0 for padding columns r >= l'/d. Also used by decoding."""
    w_in = tl.minimum(CMP_BLOCK, SLC_BLOCK - r * CMP_STRIDE)
    real = r < SLC_BLOCK // CMP_STRIDE
    w_self = tl.where(real, w_in.to(tl.float32) / CMP_STRIDE, 0.0)
    w_next = tl.where(real, (CMP_BLOCK - w_in).to(tl.float32) / CMP_STRIDE, 0.0)
    return w_self, w_next


@triton.jit
def select_blocks_fwd_kernel(
        q, k, lse, out, cu_seqlens, cu_cmp,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_ot, stride_oh,
        scale_log2,
        G: tl.constexpr, CMP_BLOCK: tl.constexpr, CMP_STRIDE: tl.constexpr, SLC_BLOCK: tl.constexpr,
        TOPN: tl.constexpr, INIT_BLOCKS: tl.constexpr, LOCAL_BLOCKS: tl.constexpr, DK: tl.constexpr,
        BLOCK_P: tl.constexpr, HEADS: tl.constexpr, NUM_HEAD_CHUNKS: tl.constexpr, BLOCK_DK: tl.constexpr,
        NPAD: tl.constexpr, RPAD: tl.constexpr, LOG_NPAD: tl.constexpr,
        KEY_DTYPE: tl.constexpr, KEY_SCALE: tl.constexpr, KEY_FLOOR: tl.constexpr, KEY_DROP: tl.constexpr,
        INDEX_BITS: tl.constexpr, KEY_TOP: tl.constexpr, PRECISION: tl.constexpr):
    """block_indices [BLOCK_P positions, n] of one kv head of one sequence."""
    R: tl.constexpr = SLC_BLOCK // CMP_STRIDE  # compressed blocks starting in one selection block
    BLOCK_M: tl.constexpr = BLOCK_P * HEADS
    BLOCK_C: tl.constexpr = NPAD * RPAD
    tl.static_assert(NPAD >= TOPN)
    tl.static_assert(RPAD >= R)
    tl.static_assert(CMP_BLOCK <= SLC_BLOCK)
    tl.static_assert(NPAD == 1 << LOG_NPAD)
    INDEX_MASK: tl.constexpr = (1 << INDEX_BITS) - 1  # a key's low word INDEX_MASK - j: larger for a lower j

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
    w_self, w_next = spill_weights(tl.arange(0, RPAD), CMP_BLOCK, CMP_STRIDE, SLC_BLOCK)
    # Selection state, one row per position.
    offs_p = tl.arange(0, BLOCK_P)
    current = (p0 + offs_p) // SLC_BLOCK  # [BLOCK_P]: the block holding the position
    offs_j = tl.arange(0, NPAD)
    spill_from = tl.broadcast_to(tl.maximum(offs_j - 1, 0)[None, :], [BLOCK_P, NPAD])  # block j gets j-1's spill
    best = tl.full([BLOCK_P, NPAD], -1, dtype=KEY_DTYPE)
    carry = tl.zeros([BLOCK_P], dtype=tl.float32)

    if NUM_HEAD_CHUNKS == 1:  # the whole group fits one tile: keep q and lse in registers
        g_r = offs_r % HEADS
        row_ok = (pos_r < seqlen) & (g_r < G)
        head_r = hk * G + g_r
        q_tile = tl.load(q + tok_r[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :],
                         mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
        lse2 = tl.load(lse + head_r * stride_lh + tok_r, mask=row_ok, other=float("inf")) * _LOG2E

    p_last = tl.minimum(p0 + BLOCK_P, seqlen) - 1
    num_causal = p_last // SLC_BLOCK + 1
    for j0 in range(0, num_causal, NPAD):
        cmp_idx = (j0 + col_blk) * R + col_r
        col_ok = (col_r < R) & (cmp_idx < num_cmp)
        k_t = tl.load(k + (cmp_start + cmp_idx).to(tl.int64)[None, :] * stride_kt + hk * stride_kh
                      + offs_dk[:, None], mask=col_ok[None, :] & dk_ok[:, None], other=0.0)  # [BLOCK_DK, BLOCK_C]
        # Every column visible to every row (all chunks but the last one or two): no per-element compare and
        # select. Rows past the sequence or the group have lse +inf, so their p is 0 either way.
        whole = (R == RPAD) & (((j0 + NPAD) * R - 1) * CMP_STRIDE + (CMP_BLOCK - 1) <= p0)
        prob = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)  # p_cmp summed over the group's heads
        for hc in range(NUM_HEAD_CHUNKS):
            if NUM_HEAD_CHUNKS > 1:
                g_r = hc * HEADS + offs_r % HEADS
                row_ok = (pos_r < seqlen) & (g_r < G)
                head_r = hk * G + g_r
                q_tile = tl.load(q + tok_r[:, None] * stride_qt + head_r[:, None] * stride_qh + offs_dk[None, :],
                                 mask=row_ok[:, None] & dk_ok[None, :], other=0.0)
                lse2 = tl.load(lse + head_r * stride_lh + tok_r, mask=row_ok, other=float("inf")) * _LOG2E
            s = tl.dot(q_tile, k_t, input_precision=PRECISION) * scale_log2
            if whole:
                p = tl.exp2(s - lse2[:, None])  # [BLOCK_M, BLOCK_C]
            else:
                visible = col_ok[None, :] & (cmp_idx[None, :] * CMP_STRIDE + (CMP_BLOCK - 1) <= pos_r[:, None])
                p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            prob += tl.sum(tl.reshape(p, [BLOCK_P, HEADS, BLOCK_C]), 1)
        prob3 = tl.reshape(prob, [BLOCK_P, NPAD, RPAD])
        imp_self = tl.sum(prob3 * w_self[None, None, :], 2)  # [BLOCK_P, NPAD]
        spill = tl.sum(prob3 * w_next[None, None, :], 2)  # goes to the next block
        # A gather, exact: a product with a 0/1 shift matrix became a TF32 tl.dot on the GPU (Triton's
        # CombineBroadcastMulReducePattern), and a select-sum over [BLOCK_P, NPAD, NPAD] doubled the kernel's time.
        imp = imp_self + tl.where(offs_j[None, :] == 0, carry[:, None], tl.gather(spill, spill_from, 1))
        carry = tl.sum(tl.where(offs_j[None, :] == NPAD - 1, spill, 0.0), 1)

        blk = j0 + offs_j
        low = (~blk & INDEX_MASK).to(KEY_DTYPE)[None, :]  # INDEX_MASK - j (constexpr on the right: interpreter)
        high = tl.maximum((imp * KEY_SCALE).to(tl.int32, bitcast=True) - KEY_FLOOR, 0) >> KEY_DROP
        key = (high.to(KEY_DTYPE) << INDEX_BITS) | low
        forced = (blk[None, :] < INIT_BLOCKS) | (current[:, None] - blk[None, :] < LOCAL_BLOCKS)
        key = tl.where(forced, (tl.full([BLOCK_P, NPAD], KEY_TOP, KEY_DTYPE) << INDEX_BITS) | low, key)
        key = tl.where(blk[None, :] <= current[:, None], key, -1)
        # Ascending against descending: the elementwise max is the top NPAD of both, as one bitonic row.
        best = tl.maximum(best, _sort_rows(key, BLOCK_P, LOG_NPAD, 0, False))
        best = _sort_rows(best, BLOCK_P, LOG_NPAD, 1, True)

    count = tl.minimum(current + 1, TOPN)
    chosen = (~best & INDEX_MASK).to(tl.int32)  # j back from its low word INDEX_MASK - j
    chosen = tl.where(offs_j[None, :] < count[:, None], chosen, NO_BLOCK)
    chosen = _sort_rows(chosen, BLOCK_P, LOG_NPAD, 0, False)
    chosen = tl.where(chosen == NO_BLOCK, -1, chosen)
    tok_p = (seq_start + p0 + offs_p).to(tl.int64)
    tl.store(out + tok_p[:, None] * stride_ot + hk * stride_oh + offs_j[None, :], chosen,
             mask=((p0 + offs_p) < seqlen)[:, None] & (offs_j < TOPN)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launcher (packed tensors)
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SelectionParams:
    """Launch parameters of the block-selection kernel.

    A program owns `block_m` query positions of one kv head; its score tiles are block_m positions x `block_h`
    query heads of the group (rows = block_m * block_h >= 16, a GPU `tl.dot` requirement; a group takes
    cdiv(G, block_h) tiles per chunk, rows of heads beyond G are masked). With block_h >= G the group is one
    tile and q stays in registers across chunks. Its top-n state is [block_m, NPAD] int64, NPAD =
    max(16, next_pow2(n)) selection blocks per chunk (fixed by the config, not a parameter).

    Attributes:
        block_m: query positions per program, a power of two.
        block_h: query heads per score tile, a power of two.
        num_warps, num_stages: Triton launch options.
    """

    block_m: int = 8
    block_h: int = 16
    num_warps: int = 4
    num_stages: int = 1

    def __post_init__(self):
        runtime.check_launch_params(self, tiles=("",))


# What `nsa tune` searches (nsa.tuner.spaces builds candidates from these, prunes them by the device's limits):
# ranges of the fields above on a GPU, and a few tile sizes for the interpreter, which ignores warps and stages and
# pays per program (CI runs those). Stages > 1 prefetch the next chunk's k_cmp tile (cp.async) during the scores,
# sums and sort of this one; with 1 each chunk waits for its load.
SEARCH_SPACE = dict(block_m=[1, 2, 4, 8, 16, 32], num_warps=[2, 4, 8], num_stages=[1, 2, 3])
INTERPRETER_SEARCH_SPACE = dict(block_m=[8, 16])


def default_params(num_heads: int, num_kv_heads: int, head_dim: int, config: NSAConfig,
                   dtype: torch.dtype = torch.bfloat16) -> SelectionParams:
    """A sane default for the shape (the tuner searches better ones): the group's heads in one tile (up to 64);
    16-bit inputs: 256 rows and 4 warps for groups of 8 or more (16 positions x 16 heads: 5.6 -> 3.1 ms against
    128 rows and 8 warps on an H200, paper shape, T=32k), 128 rows for groups of 4 (32 positions: 25.2 -> 19.1 ms
    against 16 at 64k on an H200, the running top-n being most of the difference), else 64 rows (not measured);
    4 warps; fp32 (FMA-unit `ieee` dot): 16 rows. 2 stages, so the next chunk's k_cmp tile loads during this
    one's scores and sort (64k on an H200: 11.98 -> 11.44 ms at G=16, 19.2 -> 17.1 ms at G=4, tuned tiles).
    Larger tiles under the interpreter (it pays per program, not per element)."""
    group = num_heads // num_kv_heads
    heads = min(runtime.next_power_of_2(group), 64)
    if runtime.interpreting():
        rows, warps = max(256, heads), 4
    elif dtype == torch.float32:
        rows, warps = max(16, heads), 4
    elif heads >= 8 and head_dim <= 128:
        rows, warps = max(256, heads), 4
    elif heads == 4 and head_dim <= 128:
        rows, warps = 128, 4
    else:
        rows, warps = max(64, heads), 4
    return SelectionParams(block_m=rows // heads, block_h=heads, num_warps=warps, num_stages=2)


def chunk_width(config: NSAConfig) -> int:
    """NPAD: selection blocks per chunk and width of the running top-n."""
    return max(16, runtime.next_power_of_2(config.slc_topn))


def block_width(config: NSAConfig) -> int:
    """RPAD: score columns per selection block, its l'/d compressed blocks rounded up to a power of two."""
    return runtime.next_power_of_2(config.slc_block // config.cmp_stride)


class KeyLayout(NamedTuple):
    """How the top-n packs a block's importance above its index: key = (high << index_bits) | (2**index_bits - 1
    - j), high = max(bits(importance * scale) - floor, 0) >> drop, forced blocks high = top."""

    dtype: tl.dtype
    scale: float
    floor: int
    drop: int
    index_bits: int
    top: int

    @classmethod
    def choose(cls, config: NSAConfig, group: int, max_seqlen: int, dtype: torch.dtype) -> KeyLayout:
        """int32 for 16-bit inputs with at most 2**13 selection blocks (512k tokens at l' = 64), else int64 (the
        whole float32, exact). int32: a group's importance is at most G * l/d (each head's p_cmp sums to 1, each
        compressed block gives l/d to its selection blocks), so a power-of-two scale puts it below 1/2 without
        rounding; the float's bits from 2**-32 up (floor; smaller importances tie at 0, far under any row's
        largest, at least G * l/d over the row's blocks) take 31 binades, under 2**28; dropping index_bits - 2
        low bits leaves keys < 2**30, so a pair sum in the sort fits int32, and 25 - index_bits >= 12 mantissa
        bits: importances closer than 2.5e-4 relative may tie, a quarter of the 16-bit selection tolerance."""
        index_bits = max(1, (runtime.cdiv(max_seqlen, config.slc_block) - 1).bit_length())
        if dtype not in (torch.float16, torch.bfloat16) or index_bits > 13:
            return cls(tl.int64, 1.0, 0, 0, 31, 0x7F800000)  # top: +inf's bits, above any finite importance
        bound = math.ceil(group * config.cmp_block / config.cmp_stride)
        return cls(tl.int32, 2.0 ** -(bound.bit_length() + 1), (127 - 32) << 23, max(0, index_bits - 2), index_bits,
                   (1 << (30 - index_bits)) - 1)


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
    n = config.slc_topn
    out = runtime.new_output((total, num_kv_heads, n), dtype=torch.int32, device=q.device)
    if total == 0:
        return out
    if k_cmp.shape[0] == 0:  # no compressed keys: pass a valid pointer, every column is masked off
        k_cmp = torch.zeros((1, num_kv_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = lse.contiguous()
    heads_chunks = runtime.cdiv(group, params.block_h)
    keys = KeyLayout.choose(config, group, seqs.max_seqlen, q.dtype)
    grid = (runtime.cdiv(seqs.max_seqlen, params.block_m), seqs.num_seqs, num_kv_heads)
    select_blocks_fwd_kernel[grid](
        q, k_cmp, lse, out, seqs.cu_seqlens, seqs.cu_cmp,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse.stride(0), out.stride(0), out.stride(1),
        scale * LOG2E,
        G=group, CMP_BLOCK=config.cmp_block, CMP_STRIDE=config.cmp_stride, SLC_BLOCK=config.slc_block, TOPN=n,
        INIT_BLOCKS=config.init_blocks, LOCAL_BLOCKS=config.local_blocks, DK=head_dim, BLOCK_P=params.block_m,
        HEADS=params.block_h, NUM_HEAD_CHUNKS=heads_chunks, BLOCK_DK=runtime.head_dim_block(head_dim),
        NPAD=chunk_width(config), LOG_NPAD=chunk_width(config).bit_length() - 1,
        RPAD=block_width(config), KEY_DTYPE=keys.dtype, KEY_SCALE=keys.scale, KEY_FLOOR=keys.floor,
        KEY_DROP=keys.drop, INDEX_BITS=keys.index_bits, KEY_TOP=keys.top,
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
    dtype = runtime.compute_dtype(q.dtype)
    if params is None:
        params = default_params(num_heads, num_kv_heads, head_dim, config, dtype)
    elif not isinstance(params, SelectionParams):
        raise TypeError(f"params must be a SelectionParams, got {type(params).__name__}")
    with torch.no_grad():
        q_packed, k_packed = runtime.pack(q, dtype), runtime.pack(k_cmp, dtype)
        if lse is None:
            # The forward's output o is not needed, but its lse is; v_cmp only shapes o, so k_cmp stands in.
            cmp_params = compression_default_params(num_heads, num_kv_heads, head_dim, head_dim, dtype)
            _, lse_packed = compressed_attention_fwd(q_packed, k_packed, k_packed, seqs, config, scale, cmp_params)
        else:
            lse_packed = lse.transpose(0, 1).reshape(num_heads, batch * seqlen)
        out = select_blocks_fwd(q_packed, k_packed, lse_packed, seqs, config, scale, params)
    return out.reshape(batch, seqlen, num_kv_heads, config.slc_topn)
