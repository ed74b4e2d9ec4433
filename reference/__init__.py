"""NSA in plain PyTorch: slow, obvious, and the oracle for every check (SPEC section 1).

Stage for stage it mirrors `nsa.kernels`: compression, selection, selected attention, window, decode.
"""

from nsa.reference.attention import combine_branches, nsa_attention
from nsa.reference.compression import compressed_attention
from nsa.reference.compressor import Compressor
from nsa.reference.decode import KVCache, nsa_decode
from nsa.reference.selected_attention import selected_attention
from nsa.reference.selection import block_importance, overlap_weights, select_blocks
from nsa.reference.window_attention import window_attention

__all__ = ["nsa_attention", "combine_branches", "compressed_attention", "select_blocks", "block_importance", "overlap_weights",
           "selected_attention", "window_attention", "Compressor", "KVCache", "nsa_decode"]
