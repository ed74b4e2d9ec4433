"""Compressed-attention branch (SPEC 1.2): each query attends to the compression blocks wholly in its past."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.inputs import resolve_scale, split_sequences
from nsa.reference.chunking import assemble, positions, row_chunks, rows_per_chunk, run_chunk


def compressed_probs_rows(q_rows, pos, k_cmp, config: NSAConfig, scale: float) -> torch.Tensor:
    """p_cmp for some query rows of one sequence.

    Args:
        q_rows: [C, Hq, Dk] queries at positions `pos` ([C], int64) of one sequence.
        k_cmp: [Tc, Hkv, Dk] that sequence's compressed keys.
    Returns:
        [C, Hq, Tc] softmax weights; zero on blocks not yet complete, all zero for a query that sees none.
    """
    group = q_rows.shape[1] // k_cmp.shape[1]
    keys = k_cmp.repeat_interleave(group, dim=1)  # query head h reads kv head h // G
    scores = torch.einsum("chd,shd->chs", q_rows, keys) * scale
    block_end = torch.arange(k_cmp.shape[0], device=pos.device) * config.cmp_stride + config.cmp_block - 1
    visible = (block_end[None, :] <= pos[:, None])[:, None, :]  # [C, 1, Tc]
    sees_any = visible.any(dim=-1, keepdim=True)
    # A row with no visible block gets finite dummy scores, then zero weights: no NaN, even in the gradient.
    scores = torch.where(sees_any, scores.masked_fill(~visible, float("-inf")), torch.zeros_like(scores))
    return torch.softmax(scores, dim=-1) * visible


def compressed_attention_rows(q_rows, pos, k_cmp, v_cmp, config: NSAConfig, scale: float) -> torch.Tensor:
    """o_cmp [C, Hq, Dv] for some query rows of one sequence (see `compressed_probs_rows`)."""
    probs = compressed_probs_rows(q_rows, pos, k_cmp, config, scale)
    group = q_rows.shape[1] // k_cmp.shape[1]
    return torch.einsum("chs,she->che", probs, v_cmp.repeat_interleave(group, dim=1))


def compressed_attention(q, k_cmp, v_cmp, config: NSAConfig, *, scale=None, cu_seqlens=None, chunk_size=None):
    """Compressed-attention output o_cmp [B, T, Hq, Dv].

    Args:
        q: [B, T, Hq, Dk]; k_cmp, v_cmp: [B, Tc, Hkv, Dk], [B, Tc, Hkv, Dv] (packed per sequence with cu_seqlens).
        config: the NSAConfig. scale: softmax scale, Dk ** -0.5 by default.
        cu_seqlens: int32 [N+1] offsets of packed sequences (B = 1), or None.
        chunk_size: query rows evaluated at once (default: from the memory budget).
    """
    scale = resolve_scale(scale, q.shape[-1])
    sequences = split_sequences(config, q.shape[0], q.shape[1], cu_seqlens)
    chunk = rows_per_chunk(4 * q.shape[2] * max(1, k_cmp.shape[1]), chunk_size)
    pieces = []
    for seq, t0, t1 in row_chunks(sequences, chunk):
        b = seq.batch
        o = run_chunk(compressed_attention_rows, q[b, seq.start + t0:seq.start + t1], positions(t0, t1, q.device),
                      k_cmp[b, seq.cmp_start:seq.cmp_end], v_cmp[b, seq.cmp_start:seq.cmp_end], config, scale)
        pieces.append((seq, o))
    return assemble(pieces, q.shape[0], v_cmp.new_empty(0, q.shape[2], v_cmp.shape[-1]))
