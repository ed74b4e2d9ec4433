"""Triton kernels for NSA: training (fwd + bwd), prefill and decode (SPEC section 2).

One file per kernel family, each mirroring the reference stage of the same name: `compression`,
`selection`, `selected_attention`, `window_attention`, `combine`; `attention` composes them into
`nsa_attention` with its own autograd.
"""

from nsa.kernels.attention import NSAParams, nsa_attention
from nsa.kernels.combine import combine_branches
from nsa.kernels.compression import compressed_attention
from nsa.kernels.selected_attention import selected_attention
from nsa.kernels.selection import select_blocks
from nsa.kernels.window_attention import window_attention

__all__ = ["nsa_attention", "NSAParams", "compressed_attention", "select_blocks", "selected_attention",
           "window_attention", "combine_branches"]
