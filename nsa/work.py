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


def keys_per_query(positions: np.ndarray, config: NSAConfig | None) -> np.ndarray:
    """Keys each query at `positions` attends to, per head: NSA's three branches, or dense causal (config None)."""
    t = positions.astype(np.int64)
    if config is None:
        return t + 1
    l, d, ls, n, w = config.cmp_block, config.cmp_stride, config.slc_block, config.slc_topn, config.window
    compressed = np.where(t >= l - 1, (t - l + 1) // d + 1, 0)
    selected = np.where(t // ls + 1 <= n, t + 1, (n - 1) * ls + t % ls + 1)
    window = np.minimum(w, t + 1)
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
