"""Selected-block attention (SPEC 1.5): each query attends to the tokens of its group's selected blocks."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.inputs import resolve_scale, split_sequences
from nsa.reference.chunking import assemble, positions, row_chunks, rows_per_chunk, run_chunk


def selected_attention_rows(q_rows, pos, k, v, block_indices, config: NSAConfig, scale: float) -> torch.Tensor:
    """o_slc [C, Hq, Dv] for some query rows of one sequence.

    Args:
        q_rows: [C, Hq, Dk] queries at positions `pos` ([C], int64).
        k, v: [S, Hkv, Dk], [S, Hkv, Dv] the sequence's keys and values.
        block_indices: [C, Hkv, n] int32 selected blocks, -1 for padding.
    """
    rows, num_heads, head_dim = q_rows.shape
    num_kv_heads = k.shape[1]
    ls = config.slc_block
    tokens = block_indices.long()[..., None] * ls + torch.arange(ls, device=pos.device)  # [C, Hkv, n, l']
    valid = (block_indices[..., None] >= 0) & (tokens <= pos[:, None, None, None])
    tokens = tokens.clamp(0, k.shape[0] - 1).flatten(2)  # padding points at a real token, masked below
    valid = valid.flatten(2)
    head = torch.arange(num_kv_heads, device=pos.device)[None, :, None]
    keys = k.transpose(0, 1)[head, tokens]  # [C, Hkv, n*l', Dk]
    values = v.transpose(0, 1)[head, tokens]
    queries = q_rows.reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("chgd,chmd->chgm", queries, keys) * scale
    probs = torch.softmax(scores.masked_fill(~valid[:, :, None, :], float("-inf")), dim=-1)
    return torch.einsum("chgm,chme->chge", probs, values).reshape(rows, num_heads, v.shape[-1])


def selected_attention(q, k, v, block_indices, config: NSAConfig, *, scale=None, cu_seqlens=None, chunk_size=None):
    """Selected-block attention output o_slc [B, T, Hq, Dv].

    Args:
        q: [B, T, Hq, Dk]; k, v: [B, T, Hkv, Dk], [B, T, Hkv, Dv].
        block_indices: [B, T, Hkv, n] int32 from `select_blocks` (ascending, -1 padded).
        config, scale, cu_seqlens, chunk_size: as for `nsa.reference.compressed_attention`.
    """
    scale = resolve_scale(scale, q.shape[-1])
    sequences = split_sequences(config, q.shape[0], q.shape[1], cu_seqlens)
    keys_per_row = config.slc_topn * config.slc_block
    chunk = rows_per_chunk(keys_per_row * (2 * k.shape[2] * (k.shape[-1] + v.shape[-1]) + 3 * q.shape[2]), chunk_size)
    pieces = []
    for seq, t0, t1 in row_chunks(sequences, chunk):
        b, rows = seq.batch, slice(seq.start + t0, seq.start + t1)
        o = run_chunk(selected_attention_rows, q[b, rows], positions(t0, t1, q.device), k[b, seq.start:seq.end],
                      v[b, seq.start:seq.end], block_indices[b, rows], config, scale)
        pieces.append((seq, o))
    return assemble(pieces, q.shape[0], v.new_empty(0, q.shape[2], v.shape[-1]))
