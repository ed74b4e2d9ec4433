"""`nsa_attention` from the Triton kernels: the composition of every branch, with its own autograd.

Forward: compressed attention (o_cmp and its log-sum-exp) -> block selection from that log-sum-exp ->
selected-block attention and sliding-window attention -> gated combination. Backward: the combination's, then
each branch's Triton backward; the selection is discrete and gets no gradient. All of it is one autograd node
(`NSAAttentionFunction`), so the branches share what they would otherwise each compute again (see there).
"""

from __future__ import annotations

import dataclasses
import importlib

import torch

from nsa.config import NSAConfig
from nsa.inputs import check_attention_inputs
from nsa.kernels.packing import PackedSequences
from nsa.kernels.runtime import SideStream, check_kernel_inputs, compute_dtype, pack

# Modules by path: nsa.kernels re-exports functions named like two of them (selected_attention, window_attention).
combine = importlib.import_module("nsa.kernels.combine")
compression = importlib.import_module("nsa.kernels.compression")
selected_attention = importlib.import_module("nsa.kernels.selected_attention")
selection = importlib.import_module("nsa.kernels.selection")
window_attention = importlib.import_module("nsa.kernels.window_attention")


@dataclasses.dataclass(frozen=True)
class NSAParams:
    """Tunable parameters of every kernel family; a None field takes that family's default for the shape."""

    compression: compression.CompressionParams | None = None
    selection: selection.SelectionParams | None = None
    selected: selected_attention.SelectedAttentionParams | None = None
    window: window_attention.WindowAttentionParams | None = None
    combine: combine.CombineParams | None = None

    def resolve(self, config: NSAConfig, num_heads: int, num_kv_heads: int, head_dim: int, head_dim_v: int,
                dtype, *, seqlen: int | None = None, device=None) -> "NSAParams":
        """These params with every None filled: from this device's tuned config cache when `seqlen` and `device`
        are given and it has an entry for the shape (lookup order in `nsa.tuner.cache`), else the family's
        default for the shape and compute dtype. Memoized per process like the cache's lookups: it runs on the
        host path of every call, where its ten lookups and params dataclasses cost ~250 us (a CPU of our CI
        machines), a fifth of a 1k-token forward."""
        from nsa.tuner import cache
        key = cache.device_key(device) if seqlen is not None and device is not None else None
        shape = (config, num_heads, num_kv_heads, head_dim, head_dim_v, dtype, key and seqlen, key)
        return cache.memoized(("NSAParams.resolve", self, *shape), lambda: self._resolve(*shape))

    def _resolve(self, config, num_heads, num_kv_heads, head_dim, head_dim_v, dtype, seqlen, device_key):
        heads = (num_heads, num_kv_heads)
        defaults = dict(
            compression=lambda: compression.default_params(*heads, head_dim, head_dim_v, dtype=dtype),
            selection=lambda: selection.default_params(*heads, head_dim, config, dtype=dtype),
            selected=lambda: selected_attention.default_params(config, *heads, head_dim, head_dim_v, dtype=dtype),
            window=lambda: window_attention.default_params(*heads, head_dim, head_dim_v, config, dtype=dtype),
            combine=lambda: combine.default_params(head_dim_v))
        given = {name: getattr(self, name) for name in defaults if getattr(self, name) is not None}
        if device_key is None:
            return NSAParams(**{name: given.get(name) or make() for name, make in defaults.items()})
        from nsa.tuner import cache
        shape = cache.Shape(seqlen, num_heads // num_kv_heads, head_dim, head_dim_v, config.cmp_block,
                            config.cmp_stride, config.slc_block, config.slc_topn, cache.dtype_name(dtype))
        resolved = dict(given)
        for name, make in defaults.items():
            if name not in given:  # the forward fields of the family's entry, the backward ones of <name>_bwd's
                backward = next((b for b, fwd in cache.BACKWARD_FAMILIES.items() if fwd == name), None)
                resolved[name] = cache.with_backward(cache.lookup(name, shape, device_key) or make(),
                                                     backward and cache.lookup(backward, shape, device_key))
        return NSAParams(**resolved)


def nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config: NSAConfig, *, scale=None,
                  return_block_indices=False, cu_seqlens=None, params: NSAParams | None = None):
    """Native Sparse Attention with Triton kernels; same arguments and result as `nsa.reference.nsa_attention`.

    Args:
        q: [B, T, Hq, Dk] queries.
        k, v: [B, T, Hkv, Dk], [B, T, Hkv, Dv] keys/values of the selected and window branches.
        k_cmp, v_cmp: [B, Tc, Hkv, Dk], [B, Tc, Hkv, Dv] compressed keys/values, Tc = config.num_cmp_blocks(T)
            (with cu_seqlens: the sequences' entries packed in order).
        g_cmp, g_slc, g_win: [B, T, Hq] branch gates (already through a sigmoid, so in [0, 1]: the backward
            folds each gate into its branch's log-sum-exp as log g, so a negative gate turns the q, k and v
            gradients it reaches into NaN rather than wrong numbers).
        config: NSAConfig. scale: softmax scale, Dk ** -0.5 by default.
        return_block_indices: also return the selection.
        cu_seqlens: int32 [N+1] offsets of N packed sequences (B = 1), FlashAttention's convention.
        params: NSAParams, the kernels' tunable parameters (defaults per shape when None).
    All tensors float16, bfloat16 or float32 on one CUDA device (or CPU under TRITON_INTERPRET=1, where the
    kernels compute in float32); head dims up to 256, Dk and Dv may differ; any G = Hq / Hkv.
    Returns:
        o [B, T, Hq, Dv] in the inputs' dtype, differentiable in q, k, v, k_cmp, v_cmp and the three gates; with
        return_block_indices also block_indices [B, T, Hkv, n] int32 (ascending, -1 padded).
    Memory: O(T) in every branch; nothing of size T x T or T x Tc is stored.

    Example:
        >>> x = nsa.problems.random_inputs(NSAConfig(), seqlen=8192, num_heads=64, num_kv_heads=4, head_dim=128,
        ...                                dtype=torch.bfloat16, device="cuda")
        >>> o = nsa_attention(**x, config=NSAConfig())
    """
    shape = check_attention_inputs(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config, scale=scale,
                                   cu_seqlens=cu_seqlens)
    check_kernel_inputs(q, max(shape.head_dim, shape.head_dim_v))
    batch, seqlen, num_heads = q.shape[:3]
    seqs = PackedSequences.build(config, batch, seqlen, q.device, cu_seqlens)
    dtype = compute_dtype(q.dtype)
    params = (params or NSAParams()).resolve(config, num_heads, shape.num_kv_heads, shape.head_dim,
                                             shape.head_dim_v, dtype, seqlen=seqlen, device=q.device)
    q_, k_, v_, k_cmp_, v_cmp_ = (pack(x, dtype) for x in (q, k, v, k_cmp, v_cmp))
    gates = [g.to(dtype).reshape(-1).contiguous() for g in (g_cmp, g_slc, g_win)]

    o, block_indices = NSAAttentionFunction.apply(q_, k_, v_, k_cmp_, v_cmp_, *gates, seqs, config, shape.scale,
                                                  params)
    o = o.reshape(batch, seqlen, num_heads, shape.head_dim_v).to(q.dtype)
    if not return_block_indices:
        return o
    return o, block_indices.reshape(batch, seqlen, shape.num_kv_heads, config.slc_topn)


class NSAAttentionFunction(torch.autograd.Function):
    """Every branch and their gated sum on packed tensors (q, k, v, k_cmp, v_cmp [tokens, heads, dim] and gates
    [tokens * Hq], contiguous, compute dtype): o [tokens * Hq, Dv] and the block indices (no gradient).

    One node instead of one per branch, for the backward: the combination's backward, which reads dO and O_x
    already, folds each branch's gate into that branch's lse and delta (`combine.combine_bwd_for_branches`), so every
    branch reads dO itself (no dO_x = g_x * dO is written: 3 GB at 64k) and none makes its own pass for its delta;
    and the window dq kernel adds into the compressed branch's dq, where autograd would sum the branches'
    [tokens, Hq, Dk] tensors in more passes (64k backward 82.6 -> 79.9 ms on an H200, session 12). The selected
    branch's backward runs on a second stream beside the other two, and the window dq kernel adds its dq too (see
    `backward`).
    """

    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, seqs, config, scale, params: NSAParams):
        o_cmp, lse_cmp = compression.compressed_attention_fwd(q, k_cmp, v_cmp, seqs, config, scale, params.compression)
        block_indices = selection.select_blocks_fwd(q, k_cmp, lse_cmp, seqs, config, scale, params.selection)
        o_slc, lse_slc, ctx.schedule = selected_attention.selected_attention_fwd_for_bwd(
            q, k, v, block_indices, seqs, config, scale, params.selected)
        o_win, lse_win = window_attention.window_attention_fwd(q, k, v, seqs, config, scale, params.window)
        head_dim_v = v.shape[2]
        o = combine.combine_fwd(*(x.view(-1, head_dim_v) for x in (o_cmp, o_slc, o_win)), g_cmp, g_slc, g_win,
                                params.combine)
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, o_cmp, lse_cmp, o_slc, lse_slc, o_win,
                              lse_win, block_indices)
        ctx.seqs, ctx.config, ctx.scale, ctx.params = seqs, config, scale, params
        ctx.mark_non_differentiable(block_indices)
        ctx.set_materialize_grads(False)  # no zeros made (one more launch) for block_indices' gradient
        return o, block_indices

    @staticmethod
    def backward(ctx, do, _dblock_indices):
        (q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, o_cmp, lse_cmp, o_slc, lse_slc, o_win, lse_win,
         block_indices) = ctx.saved_tensors
        seqs, config, scale, params = ctx.seqs, ctx.config, ctx.scale, ctx.params
        head_dim_v = v.shape[2]
        do = do.contiguous()
        dg_cmp, dg_slc, dg_win, lses, deltas = combine.combine_bwd_for_branches(
            do, *(x.view(-1, head_dim_v) for x in (o_cmp, o_slc, o_win)), g_cmp, g_slc, g_win, lse_cmp, lse_slc,
            lse_win, params.combine)
        do = do.view(o_cmp.shape)  # every branch reads do itself: its gate is folded into lses and deltas
        # The selected branch (gather-bound) on a second stream, beside the compressed and window branches
        # (matmul-bound), so the GPU fills one's stalls with the other. Bwd -1.2 ms at 64k and -0.6 ms at 16k,
        # G=16, one H200 (session 15; the window forward beside the selected forward lost 0.5 ms at 64k, and a
        # high-priority side stream lost the gain). The selected dq kernel runs first there, so it is long done
        # when the window dq kernel, last on this stream, adds its dq as it writes (no pass over dq after the
        # join: 16k bwd -0.08 ms, session 21).
        with SideStream(q.device) as side:
            dq_slc, _ = selected_attention.selected_attention_bwd_dq(
                do, q, k, v, o_slc, lses[1], block_indices, seqs, config, scale, params.selected, ctx.schedule,
                delta=deltas[1])
            dq_slc_done = side.mark()
            dk_slc, dv_slc = selected_attention.selected_attention_bwd_dkdv(
                do, q, k, v, lses[1], deltas[1], block_indices, seqs, config, scale, params.selected)
        dq, dk_cmp, dv_cmp = compression.compressed_attention_bwd(
            do, q, k_cmp, v_cmp, o_cmp, lses[0], seqs, config, scale, params.compression, delta=deltas[0])
        side.wait(dq_slc_done)
        _, dk, dv = window_attention.window_attention_bwd(do, q, k, v, o_win, lses[2], seqs, config, scale,
                                                         params.window, delta=deltas[2], dq=dq, dq_add=dq_slc)
        side.join(dq_slc, dk_slc, dv_slc)
        return dq, dk.add_(dk_slc), dv.add_(dv_slc), dk_cmp, dv_cmp, dg_cmp, dg_slc, dg_win, None, None, None, None
