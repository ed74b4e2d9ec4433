"""Block importance and top-n selection (SPEC 1.3-1.4), shared by all query heads of a GQA group."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.inputs import resolve_scale, split_sequences
from nsa.reference.chunking import assemble, positions, row_chunks, rows_per_chunk
from nsa.reference.compression import compressed_probs_rows


def overlap_weights(num_cmp: int, num_slc: int, config: NSAConfig, *, dtype, device) -> torch.Tensor:
    """[Tc, Ns]: |[i*d, i*d+l) ∩ [j*l', (j+1)*l')| / d, how much compression block i counts for selection block j."""
    d, l, ls = config.cmp_stride, config.cmp_block, config.slc_block
    cmp_start = torch.arange(num_cmp, device=device)[:, None] * d
    slc_start = torch.arange(num_slc, device=device)[None, :] * ls
    overlap = torch.minimum(cmp_start + l, slc_start + ls) - torch.maximum(cmp_start, slc_start)
    return overlap.clamp(min=0).to(dtype) / d


def block_importance_rows(probs, pos, num_kv_heads: int, config: NSAConfig) -> torch.Tensor:
    """imp [C, Hkv, Ns] from p_cmp [C, Hq, Tc], summed over each group's heads; Ns covers the rows' causal blocks.

    Compression block i adds p_cmp * overlap / d to each selection block it overlaps. The sums are elementwise
    (index_add), not a matmul: a float32 matmul may run in TF32 on a GPU, too coarse for an oracle of rankings.
    """
    rows, num_heads, num_cmp = probs.shape
    num_slc = int(pos.max()) // config.slc_block + 1
    grouped = probs.reshape(rows, num_kv_heads, num_heads // num_kv_heads, num_cmp).sum(dim=2)
    weights = overlap_weights(num_cmp, num_slc, config, dtype=probs.dtype, device=probs.device)  # [Tc, Ns]
    imp = grouped.new_zeros(rows, num_kv_heads, num_slc)
    block = torch.arange(num_cmp, device=probs.device)
    for step in (0, 1):  # l <= l': block i meets selection blocks i*d // l' and at most the one after
        target = block * config.cmp_stride // config.slc_block + step
        inside = target < num_slc
        imp.index_add_(-1, target[inside], grouped[..., inside] * weights[block[inside], target[inside]])
    return imp


def select_blocks_rows(importance, pos, config: NSAConfig) -> torch.Tensor:
    """block_indices [C, Hkv, n] int32 from imp [C, Hkv, Ns]: forced blocks first, then by importance.

    Ties go to the lower block index; indices are sorted ascending and padded with -1.
    """
    rows, num_kv_heads, num_slc = importance.shape
    n = config.slc_topn
    current = (pos // config.slc_block)[:, None]  # [C, 1]
    block = torch.arange(num_slc, device=pos.device)[None, :]
    causal = block <= current
    forced = causal & ((block < config.init_blocks) | (current - block < config.local_blocks))
    score = importance.masked_fill(~causal[:, None, :], float("-inf"))
    score = score.masked_fill(forced[:, None, :], float("inf"))
    # A stable descending sort keeps equal scores in index order, so ties go to the lower index.
    order = torch.sort(score, dim=-1, descending=True, stable=True).indices[..., :n]
    count = torch.clamp(current + 1, max=n)[:, :, None]  # min(n, t // l' + 1) blocks chosen
    chosen = torch.where(torch.arange(order.shape[-1], device=pos.device) < count, order, num_slc)
    chosen = torch.sort(chosen, dim=-1).values
    chosen = torch.where(chosen == num_slc, -1, chosen)
    if chosen.shape[-1] < n:
        chosen = torch.cat([chosen, chosen.new_full((rows, num_kv_heads, n - chosen.shape[-1]), -1)], dim=-1)
    return chosen.to(torch.int32)


def select_blocks_from_keys_rows(q_rows, pos, k_cmp, config: NSAConfig, scale: float) -> torch.Tensor:
    """block_indices [C, Hkv, n] for some query rows of one sequence, from its compressed keys."""
    probs = compressed_probs_rows(q_rows, pos, k_cmp, config, scale)
    return select_blocks_rows(block_importance_rows(probs, pos, k_cmp.shape[1], config), pos, config)


def select_blocks(q, k_cmp, config: NSAConfig, *, scale=None, cu_seqlens=None, chunk_size=None):
    """block_indices [B, T, Hkv, n] int32: the selection blocks each query's group attends to.

    Args as for `nsa.reference.compressed_attention`. The selection is discrete and carries no gradient.
    """
    scale = resolve_scale(scale, q.shape[-1])
    sequences = split_sequences(config, q.shape[0], q.shape[1], cu_seqlens)
    num_slc = config.num_slc_blocks(q.shape[1])
    chunk = rows_per_chunk(4 * q.shape[2] * max(1, k_cmp.shape[1]) + 3 * k_cmp.shape[2] * num_slc, chunk_size)
    pieces = []
    with torch.no_grad():
        for seq, t0, t1 in row_chunks(sequences, chunk):
            b = seq.batch
            pieces.append((seq, select_blocks_from_keys_rows(
                q[b, seq.start + t0:seq.start + t1], positions(t0, t1, q.device),
                k_cmp[b, seq.cmp_start:seq.cmp_end], config, scale)))
    empty = torch.empty(0, k_cmp.shape[2], config.slc_topn, dtype=torch.int32, device=q.device)
    return assemble(pieces, q.shape[0], empty)


def block_importance(q, k_cmp, config: NSAConfig, *, scale=None, cu_seqlens=None, chunk_size=None):
    """imp [B, T, Hkv, Ns] float (SPEC 1.3), Ns = ceil(T / l'); zero on blocks not causal for the query.

    Materialises T x Ns per kv head: meant for checking selections, not for long sequences.
    """
    scale = resolve_scale(scale, q.shape[-1])
    sequences = split_sequences(config, q.shape[0], q.shape[1], cu_seqlens)
    num_slc = config.num_slc_blocks(q.shape[1])
    chunk = rows_per_chunk(4 * q.shape[2] * max(1, k_cmp.shape[1]) + 3 * k_cmp.shape[2] * num_slc, chunk_size)
    pieces = []
    with torch.no_grad():
        for seq, t0, t1 in row_chunks(sequences, chunk):
            b, pos = seq.batch, positions(t0, t1, q.device)
            probs = compressed_probs_rows(q[b, seq.start + t0:seq.start + t1], pos, k_cmp[b, seq.cmp_start:seq.cmp_end],
                                          config, scale)
            imp = block_importance_rows(probs, pos, k_cmp.shape[2], config)
            pieces.append((seq, torch.nn.functional.pad(imp, (0, num_slc - imp.shape[-1]))))
    return assemble(pieces, q.shape[0], q.new_empty(0, k_cmp.shape[2], num_slc))
