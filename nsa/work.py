"""How much work a problem is: the FLOPs and the bytes an implementation must at least move.

Achieved TFLOP/s and GB/s only mean something when the count is the work NSA really does, not the dense
T^2 work it avoids. Per query at position t (0-based in its sequence) and per query head, NSA attends to

  compressed: the blocks i with i*d + l - 1 <= t, that is (t - l + 1) // d + 1 of them once t >= l - 1;
  selected:   every causal token while t // l' + 1 <= n, else n - 1 full blocks and the current block up to t;
  window:     min(w, t + 1) tokens,

and dense causal attention (the baselines) to t + 1 keys. Each attended key costs 2 * (Dk + Dv) FLOPs forward
(q.k and p.v); the backward is counted as 2.5x the forward (five matmuls against two), FlashAttention's
convention. The top-n selection itself (sorting block importances) is not counted: it is not matmul work.

Bytes are the least traffic the op needs: every input read once, every output written once (the backward reads
the inputs, the output and its gradient, and writes the inputs' gradients). A decode step reads, per sequence and
kv head, its compressed cache, its n selected blocks and its window (NSA) or its whole cache (dense); that ratio
is the 11.6x memory-traffic bound of issue 7 at T=64k.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from nsa.config import NSAConfig
from nsa.suites.problem import Problem

BACKWARD_FLOP_FACTOR = 2.5


@dataclasses.dataclass(frozen=True)
class Work:
    """FLOPs and minimum bytes of one call."""

    flops: float
    bytes: float


def branch_keys(positions: np.ndarray, config: NSAConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keys each query at `positions` attends to, per head, in NSA's compressed, selected and window branches."""
    t = positions.astype(np.int64)
    l, d, ls, n, w = config.cmp_block, config.cmp_stride, config.slc_block, config.slc_topn, config.window
    compressed = np.where(t >= l - 1, (t - l + 1) // d + 1, 0)
    selected = np.where(t // ls + 1 <= n, t + 1, (n - 1) * ls + t % ls + 1)
    window = np.minimum(w, t + 1)
    return compressed, selected, window


def keys_per_query(positions: np.ndarray, config: NSAConfig | None) -> np.ndarray:
    """Keys each query at `positions` attends to, per head: NSA's three branches, or dense causal (config None)."""
    if config is None:
        return positions.astype(np.int64) + 1
    compressed, selected, window = branch_keys(positions, config)
    return compressed + selected + window


def op_work(problem: Problem, config: NSAConfig | None) -> Work:
    """Work of `problem` for an implementation computing NSA with `config`, or dense causal attention (None)."""
    dk, dv, hq, hkv = problem.head_dim, problem.head_dim_v, problem.num_heads, problem.num_kv_heads
    itemsize = problem.torch_dtype.itemsize
    nsa = config is not None
    pairs = 0
    elements = 0  # elements moved: inputs read, outputs written
    for length in problem.sequence_lengths:
        if problem.op == "decode":
            queries = 1
            keys = int(keys_per_query(np.array([length - 1]), config)[0])
            pairs += keys
            kv_tokens = keys if nsa else length  # compressed, selected and window entries read
        else:
            queries = length
            pairs += int(keys_per_query(np.arange(length), config).sum())
            kv_tokens = length + (config.num_cmp_blocks(length) if nsa else 0)
        per_query = hq * (dk + dv) + (3 * hq if nsa else 0)  # q, o (and the three gates)
        elements += queries * per_query + kv_tokens * hkv * (dk + dv)
    flops = 2.0 * (dk + dv) * hq * pairs
    if problem.op == "bwd":  # inputs read and their gradients written; o and do read
        return Work(BACKWARD_FLOP_FACTOR * flops, float(itemsize * 2 * elements))
    return Work(flops, float(itemsize * elements))


@dataclasses.dataclass(frozen=True)
class KernelWork:
    """The useful work of one kernel in one step and what bounds it: `bound` "matmul" (amount in FLOPs), "gather"
    (bytes gathered from the selected blocks, mostly L2 hits, for which the card has no measured ceiling) or
    "copy" (bytes read and written)."""

    bound: str
    amount: float


def kernel_work(*, seqlen: int, num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
                config: NSAConfig, itemsize: int) -> dict[str, KernelWork]:
    """The work of each kernel of one `nsa.kernels.nsa_attention` step (B=1, one sequence of `seqlen` tokens), by
    the Triton kernel's name, for `nsa profile` to hold each kernel against its ceiling (docs/performance.md keeps
    the tables). A product over the pairs (query head, attended key) is 2 * D FLOPs a pair: the compressed and
    window forwards do QK and PV, their dk/dv kernels four products, their dq kernels three, the selection
    recomputes QK. The selected forward and dq gather each chosen block's K and V (l' tokens, whole blocks); the
    selected dk/dv runs four products over whole blocks for the G heads of every (position, block) entry (it
    gathers those q and dO rows, a quarter of the forward's bytes, and sits nearer the matmul ceiling than the
    gather one: 43% against 27% on an H200 at 64k, session 19); so do the inverted forward and dq of small groups
    (one block's K/V per program, the positions that chose it gathered), two and three products. The combination
    reads the three branch outputs and gates and writes o (backward: reads dO too, writes the gates' gradients and
    per branch an fp32 delta and lse a row, its gate folded in, from the lse it reads). Kernels not listed here (the
    inverted kernels' merges, sorts, torch ops) have no model."""
    ls = config.slc_block
    t = np.arange(seqlen, dtype=np.int64)
    compressed, _, window = branch_keys(t, config)
    cmp_pairs = num_heads * float(compressed.sum())
    win_pairs = num_heads * float(window.sum())
    entries = num_kv_heads * float(np.minimum(config.slc_topn, t // ls + 1).sum())  # (position, kv head, block)
    dk, dv, group = head_dim, head_dim_v, num_heads // num_kv_heads
    kv_gathered = entries * ls * (dk + dv) * itemsize
    slc_pairs = entries * group * ls  # (query head, key) pairs of the selected branch, whole blocks
    rows = float(seqlen * num_heads * itemsize)  # one element per (token, query head)

    def matmul(flops):
        return KernelWork("matmul", flops)

    return {
        "compressed_attention_fwd_kernel": matmul(2 * (dk + dv) * cmp_pairs),
        "select_blocks_fwd_kernel": matmul(2 * dk * cmp_pairs),
        "compressed_attention_bwd_dkdv_kernel": matmul(4 * (dk + dv) * cmp_pairs),
        "compressed_attention_bwd_dq_kernel": matmul(2 * (2 * dk + dv) * cmp_pairs),
        "window_attention_fwd_kernel": matmul(2 * (dk + dv) * win_pairs),
        "window_attention_bwd_dkdv_kernel": matmul(4 * (dk + dv) * win_pairs),
        "window_attention_bwd_dq_kernel": matmul(2 * (2 * dk + dv) * win_pairs),
        "selected_attention_fwd_kernel": KernelWork("gather", kv_gathered),
        "selected_attention_bwd_dq_kernel": KernelWork("gather", kv_gathered),
        "selected_attention_bwd_dkdv_kernel": matmul(4 * (dk + dv) * slc_pairs),
        "selected_attention_fwd_inverted_kernel": matmul(2 * (dk + dv) * slc_pairs),
        "selected_attention_bwd_dq_inverted_kernel": matmul(2 * (2 * dk + dv) * slc_pairs),
        "combine_fwd_kernel": KernelWork("copy", (4 * dv + 3) * rows),
        "combine_bwd_kernel": KernelWork("copy", (4 * dv + 6) * rows + 9 * 4.0 * seqlen * num_heads),
    }
