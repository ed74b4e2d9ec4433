"""Sliding-window attention (SPEC 1.6): each query attends to the w most recent tokens, itself included."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.inputs import resolve_scale, split_sequences
from nsa.reference.chunking import assemble, positions, row_chunks, rows_per_chunk, run_chunk


def window_attention_rows(q_rows, pos, k, v, config: NSAConfig, scale: float) -> torch.Tensor:
    """o_win [C, Hq, Dv] for query rows at positions `pos` of one sequence with keys/values k, v [S, Hkv, D]."""
    group = q_rows.shape[1] // k.shape[1]
    first = max(0, int(pos.min()) - config.window + 1)
    last = int(pos.max()) + 1
    key_pos = torch.arange(first, last, device=pos.device)
    keys = k[first:last].repeat_interleave(group, dim=1)
    values = v[first:last].repeat_interleave(group, dim=1)
    scores = torch.einsum("chd,shd->chs", q_rows, keys) * scale
    valid = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - config.window)
    probs = torch.softmax(scores.masked_fill(~valid[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("chs,she->che", probs, values)


def window_attention(q, k, v, config: NSAConfig, *, scale=None, cu_seqlens=None, chunk_size=None):
    """Sliding-window attention output o_win [B, T, Hq, Dv]; args as for `selected_attention`."""
    scale = resolve_scale(scale, q.shape[-1])
    sequences = split_sequences(config, q.shape[0], q.shape[1], cu_seqlens)
    # Rows per chunk are capped at w so that the key span (chunk + w - 1) stays linear in w.
    chunk = min(rows_per_chunk(8 * q.shape[2] * config.window, chunk_size), chunk_size or config.window)
    pieces = []
    for seq, t0, t1 in row_chunks(sequences, chunk):
        b = seq.batch
        o = run_chunk(window_attention_rows, q[b, seq.start + t0:seq.start + t1], positions(t0, t1, q.device),
                      k[b, seq.start:seq.end], v[b, seq.start:seq.end], config, scale)
        pieces.append((seq, o))
    return assemble(pieces, q.shape[0], v.new_empty(0, q.shape[2], v.shape[-1]))
