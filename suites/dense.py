"""Dense causal softmax attention in plain PyTorch: the oracle the FlashAttention-class baselines are checked against.

It is what those baselines compute (not NSA), written out the obvious way so their verdicts rest on the same
footing as ours: a float64/fp32 computation from the same inputs.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from nsa.inputs import resolve_scale

MAX_CHUNK_ELEMENTS = 2**26


def dense_attention(q, k, v, *, scale=None, cu_seqlens=None) -> torch.Tensor:
    """Causal attention, query i of Tq at position Tk - Tq + i (so one decode query sees every key).

    Args:
        q: [B, Tq, Hq, Dk]; k, v: [B, Tk, Hkv, Dk], [B, Tk, Hkv, Dv], Hq a multiple of Hkv (query head h reads
            kv head h // G).
        cu_seqlens: int32 [N+1] packed sequences (B = 1, Tq = Tk); each attends within itself only.
    Returns:
        o [B, Tq, Hq, Dv] in q's dtype. Work goes a chunk of query rows at a time (checkpointed under autograd),
        so memory stays at one chunk's [rows, Hq, Tk] scores, at most MAX_CHUNK_ELEMENTS.
    """
    scale = resolve_scale(scale, q.shape[-1])
    if cu_seqlens is None:
        return torch.stack([_causal(q[b], k[b], v[b], scale) for b in range(q.shape[0])])
    bounds = cu_seqlens.tolist()
    return torch.cat([_causal(q[0, s:e], k[0, s:e], v[0, s:e], scale) for s, e in zip(bounds[:-1], bounds[1:])])[None]


def _causal(q, k, v, scale):
    rows = max(1, MAX_CHUNK_ELEMENTS // (q.shape[1] * k.shape[0]))
    offset = k.shape[0] - q.shape[0]
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out = []
    for start in range(0, q.shape[0], rows):
        chunk = functools.partial(_chunk, first_position=offset + start, scale=scale)
        q_rows = q[start:start + rows]
        out.append(checkpoint(chunk, q_rows, k, v, use_reentrant=False) if grad else chunk(q_rows, k, v))
    return torch.cat(out)


def _chunk(q, k, v, *, first_position, scale):
    rows, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q = q.reshape(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("thgd,shd->hgts", q, k) * scale
    positions = torch.arange(first_position, first_position + rows, device=q.device)
    visible = torch.arange(k.shape[0], device=q.device)[None, :] <= positions[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("hgts,shd->thgd", probs, v).reshape(rows, num_heads, v.shape[-1])
