"""Reference decoding (SPEC 1.9): a KV cache of ragged sequences and the attention of its newest tokens."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.inputs import FLOAT_DTYPES, resolve_scale
from nsa.reference.attention import combine_branches
from nsa.reference.compression import compressed_attention_rows, compressed_probs_rows
from nsa.reference.selected_attention import selected_attention_rows
from nsa.reference.selection import block_importance_rows, select_blocks_rows
from nsa.reference.window_attention import window_attention_rows


class KVCache:
    """Keys, values and compressed keys/values of a batch of sequences of different lengths.

    Sequence b holds keys[b] [S_b, Hkv, Dk], values[b] [S_b, Hkv, Dv] and k_cmp[b], v_cmp[b]
    [Tc(S_b), Hkv, D]. When a token completes compression block i (tokens [i*d, i*d+l)), the compressors
    are applied to that block and the compressed cache grows by one entry; `pending(b)` gives the tokens of
    the block that is still filling.

    Args:
        batch_size, num_kv_heads, head_dim, head_dim_v: sizes (head_dim_v defaults to head_dim).
        config: the NSAConfig.
        k_compressor, v_compressor: callables mapping one block [1, l, Hkv, D] to [1, 1, Hkv, D], such as
            `nsa.reference.Compressor` modules.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, config: NSAConfig, *,
                 k_compressor, v_compressor, head_dim_v: int | None = None, dtype=torch.float32, device="cpu"):
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"KVCache dtype must be floating, got {dtype}")
        if min(batch_size, num_kv_heads, head_dim) < 1:
            raise ValueError(f"KVCache sizes must be >= 1, got batch_size={batch_size}, "
                             f"num_kv_heads={num_kv_heads}, head_dim={head_dim}")
        self.config = config
        self.num_kv_heads, self.head_dim, self.head_dim_v = num_kv_heads, head_dim, head_dim_v or head_dim
        self.k_compressor, self.v_compressor = k_compressor, v_compressor

        def empty(dim):
            return [torch.empty(0, num_kv_heads, dim, dtype=dtype, device=device) for _ in range(batch_size)]

        self.keys, self.values = empty(head_dim), empty(self.head_dim_v)
        self.k_cmp, self.v_cmp = empty(head_dim), empty(self.head_dim_v)

    @property
    def batch_size(self) -> int:
        return len(self.keys)

    @property
    def seqlens(self) -> list[int]:
        return [k.shape[0] for k in self.keys]

    def pending(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of sequence b's next compression block that have arrived (fewer than l)."""
        start = self.k_cmp[b].shape[0] * self.config.cmp_stride
        return self.keys[b][start:], self.values[b][start:]

    def extend(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append tokens k [n, Hkv, Dk], v [n, Hkv, Dv] to sequence b, compressing every block they complete."""
        want_k = (k.shape[0], self.num_kv_heads, self.head_dim)
        if k.dim() != 3 or tuple(k.shape) != want_k or tuple(v.shape) != want_k[:2] + (self.head_dim_v,):
            raise ValueError(f"extend expects k [n, {self.num_kv_heads}, {self.head_dim}] and v "
                             f"[n, {self.num_kv_heads}, {self.head_dim_v}], got {tuple(k.shape)}, {tuple(v.shape)}")
        if k.dtype != self.keys[b].dtype or v.dtype != k.dtype or k.device != self.keys[b].device:
            raise ValueError(f"extend: k/v must be {self.keys[b].dtype} on {self.keys[b].device}, "
                             f"got {k.dtype}/{v.dtype} on {k.device}")
        self.keys[b] = torch.cat([self.keys[b], k])
        self.values[b] = torch.cat([self.values[b], v])
        l, d = self.config.cmp_block, self.config.cmp_stride
        for i in range(self.k_cmp[b].shape[0], self.config.num_cmp_blocks(self.keys[b].shape[0])):
            block = slice(i * d, i * d + l)
            self.k_cmp[b] = torch.cat([self.k_cmp[b], self.k_compressor(self.keys[b][None, block])[0]])
            self.v_cmp[b] = torch.cat([self.v_cmp[b], self.v_compressor(self.values[b][None, block])[0]])

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k [B, n, Hkv, Dk], v [B, n, Hkv, Dv]: n new tokens to every sequence."""
        if k.dim() != 4 or k.shape[0] != self.batch_size or v.dim() != 4 or v.shape[:2] != k.shape[:2]:
            raise ValueError(f"append expects k [B={self.batch_size}, n, Hkv, Dk] and v [B, n, Hkv, Dv], "
                             f"got {tuple(k.shape)}, {tuple(v.shape)}")
        for b in range(self.batch_size):
            self.extend(b, k[b], v[b])


def decode_rows(q_rows, pos, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, config: NSAConfig, scale: float, *,
                block_indices=None):
    """One sequence's rows at positions `pos` ([C]) over its keys k, v [S, Hkv, D] and compressed k_cmp, v_cmp:
    (o [C, Hq, Dv], block_indices [C, Hkv, n] int32, importance [C, Hkv, Ns]). q_rows [C, Hq, Dk], gates [C, Hq].

    With block_indices given, o is the output for that selection: how a fast kernel's output is judged when its
    selection legally swaps near-tied blocks (the importance says whether it did)."""
    probs = compressed_probs_rows(q_rows, pos, k_cmp, config, scale)
    importance = block_importance_rows(probs, pos, k.shape[1], config)
    if block_indices is None:
        block_indices = select_blocks_rows(importance, pos, config)
    o = combine_branches(compressed_attention_rows(q_rows, pos, k_cmp, v_cmp, config, scale),
                         selected_attention_rows(q_rows, pos, k, v, block_indices, config, scale),
                         window_attention_rows(q_rows, pos, k, v, config, scale), g_cmp, g_slc, g_win)
    return o, block_indices.to(torch.int32), importance


def nsa_decode(q, cache: KVCache, g_cmp, g_slc, g_win, config: NSAConfig, *, scale=None,
               return_block_indices=False):
    """Attention of each sequence's newest tokens, already appended to `cache`, over all of its tokens.

    Args:
        q: [B, n, Hq, Dk] queries of the last n tokens of every sequence (n = 1 for plain decoding, a few for
            speculative decoding). g_cmp, g_slc, g_win: [B, n, Hq].
    Returns:
        o [B, n, Hq, Dv] (and block_indices [B, n, Hkv, topn] int32), equal to the last n rows of
        `nsa_attention` over each sequence's S_b tokens.
    """
    if q.dim() != 4 or q.shape[0] != cache.batch_size or q.shape[2] % cache.num_kv_heads \
            or q.shape[3] != cache.head_dim:
        raise ValueError(f"q must be [B={cache.batch_size}, n, Hq, {cache.head_dim}] with Hq a multiple of "
                         f"{cache.num_kv_heads}, got {tuple(q.shape)}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_win", g_win)):
        if tuple(g.shape) != tuple(q.shape[:3]):
            raise ValueError(f"{name} must have shape {tuple(q.shape[:3])} (B, n, Hq), got {tuple(g.shape)}")
    n = q.shape[1]
    if min(cache.seqlens) < n:
        raise ValueError(f"every sequence must hold the {n} queried tokens, got lengths {cache.seqlens}")
    scale = resolve_scale(scale, q.shape[-1])
    outputs, selections = [], []
    for b, (k, v, k_cmp, v_cmp) in enumerate(zip(cache.keys, cache.values, cache.k_cmp, cache.v_cmp)):
        pos = torch.arange(k.shape[0] - n, k.shape[0], device=q.device)
        o, block_indices, _ = decode_rows(q[b], pos, k, v, k_cmp, v_cmp, g_cmp[b], g_slc[b], g_win[b], config,
                                          scale)
        outputs.append(o)
        selections.append(block_indices)
    o = torch.stack(outputs)
    return (o, torch.stack(selections)) if return_block_indices else o
