"""The whole NSA attention (SPEC section 1) composed from the reference stages."""

from __future__ import annotations

from nsa.config import NSAConfig
from nsa.inputs import check_attention_inputs
from nsa.reference.compression import compressed_attention
from nsa.reference.selected_attention import selected_attention
from nsa.reference.selection import select_blocks
from nsa.reference.window_attention import window_attention


def combine_branches(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win (SPEC 1.7); gates [.., Hq], outputs [.., Hq, Dv]."""
    return g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_win[..., None] * o_win


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config: NSAConfig, *, scale=None,
                  return_block_indices=False, cu_seqlens=None, chunk_size=None):
    """Native Sparse Attention in plain PyTorch: the oracle for every correctness check.

    Args:
        q: [B, T, Hq, Dk] queries.
        k, v: [B, T, Hkv, Dk], [B, T, Hkv, Dv] keys/values of the selected and window branches.
        k_cmp, v_cmp: [B, Tc, Hkv, Dk], [B, Tc, Hkv, Dv] compressed keys/values, Tc = config.num_cmp_blocks(T)
            (with cu_seqlens: the sequences' entries packed in order).
        g_cmp, g_slc, g_win: [B, T, Hq] branch gates (already through a sigmoid).
        config: NSAConfig. scale: softmax scale, Dk ** -0.5 by default.
        return_block_indices: also return the selection.
        cu_seqlens: int32 [N+1] offsets of N packed sequences (B = 1), FlashAttention's convention.
        chunk_size: query rows evaluated at once; by default as many as fit 2**26 elements per stage.
    Returns:
        o [B, T, Hq, Dv] in the inputs' dtype, and with return_block_indices block_indices [B, T, Hkv, n] int32
        (ascending, -1 padded).

    Any device and dtype; autograd is PyTorch's own. Memory: work goes one sequence and one chunk of query rows
    at a time, so besides inputs and outputs (O(T)) the peak is one chunk's intermediates, at most about
    2**26 elements (512 MiB at float64) by default, never a T x T or an all-heads T x Tc tensor. With autograd
    each chunk is checkpointed, so the backward pass keeps only O(T) tensors too (T = 65536 with 64 heads fits).

    Example:
        >>> cfg = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=4, window=32)
        >>> q = torch.randn(1, 100, 8, 64, dtype=torch.float64)  # 8 query heads, 2 kv heads below
        >>> k, v = torch.randn(2, 1, 100, 2, 64, dtype=torch.float64)
        >>> k_cmp, v_cmp = torch.randn(2, 1, cfg.num_cmp_blocks(100), 2, 64, dtype=torch.float64)
        >>> g = torch.rand(3, 1, 100, 8, dtype=torch.float64)
        >>> o = nsa_attention(q, k, v, k_cmp, v_cmp, *g, cfg)
    """
    shape = check_attention_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config, scale=scale,
                                   cu_seqlens=cu_seqlens)
    common = dict(scale=shape.scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    o_cmp = compressed_attention(q, k_cmp, v_cmp, config, **common)
    block_indices = select_blocks(q, k_cmp, config, **common)
    o_slc = selected_attention(q, k, v, block_indices, config, **common)
    o_win = window_attention(q, k, v, config, **common)
    o = combine_branches(o_cmp, o_slc, o_win, g_cmp, g_slc, g_win)
    return (o, block_indices) if return_block_indices else o
