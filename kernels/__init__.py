"""Triton kernels for NSA: training (fwd + bwd), prefill and decode (SPEC section 2).

One file per kernel family, each mirroring the reference stage of the same name: `compression`,
`selection`, `selected_attention`, `window_attention`, `combine`; `attention` composes them into
`nsa_attention` with its own autograd; `delta` is the backward's rowsum(dO * O), shared by the branches.
Inference: `kv_cache` (a batched, optionally paged cache) and `decode` (`nsa_decode` for one or a few new tokens
per sequence, `nsa_prefill` for prompts and prompt chunks).
"""

from nsa.kernels.attention import NSAParams, nsa_attention
from nsa.kernels.combine import combine_branches
from nsa.kernels.compression import compressed_attention
from nsa.kernels.decode import DecodeParams, nsa_decode, nsa_prefill
from nsa.kernels.kv_cache import KVCache
from nsa.kernels.selected_attention import selected_attention
from nsa.kernels.selection import select_blocks
from nsa.kernels.window_attention import window_attention

__all__ = ["nsa_attention", "NSAParams", "nsa_decode", "nsa_prefill", "KVCache", "DecodeParams",
           "compressed_attention", "select_blocks", "selected_attention", "window_attention", "combine_branches"]
