"""The learnable compressor phi (SPEC section 3): one vector per compression block of keys or values."""

from __future__ import annotations

import torch
from torch import nn

from nsa.config import NSAConfig
from nsa.inputs import check_cu_seqlens, split_sequences


class Compressor(nn.Module):
    """k_cmp[i] = phi(k[i*d : i*d+l] + pe): an MLP over the flattened block plus a learned position embedding.

    One Compressor serves one tensor (keys or values) and is shared across kv heads.

    Args:
        config: gives the block size l (cmp_block) and stride d (cmp_stride).
        head_dim: D of the tensor it compresses.
        hidden_size: width of the MLP's hidden layer (default 2 * head_dim).

    Input [B, T, H, D] (or B = 1 with cu_seqlens), output [B, Tc, H, D] with Tc = config.num_cmp_blocks(T)
    (with cu_seqlens: each sequence's blocks, packed in order).
    """

    def __init__(self, config: NSAConfig, head_dim: int, hidden_size: int | None = None):
        super().__init__()
        self.config = config
        self.head_dim = head_dim
        hidden_size = hidden_size or 2 * head_dim
        self.pos_emb = nn.Parameter(torch.randn(config.cmp_block, head_dim) * 0.02)
        self.mlp = nn.Sequential(nn.Linear(config.cmp_block * head_dim, hidden_size), nn.GELU(),
                                 nn.Linear(hidden_size, head_dim))

    def _compress(self, x):
        """[T, H, D] -> [Tc, H, D]."""
        blocks = x.unfold(0, self.config.cmp_block, self.config.cmp_stride)  # [Tc, H, D, l]
        blocks = blocks.permute(0, 1, 3, 2) + self.pos_emb  # [Tc, H, l, D]
        return self.mlp(blocks.flatten(2))

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"Compressor expects [B, T, H, {self.head_dim}], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if cu_seqlens is not None:
            check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1], x.device)
        sequences = split_sequences(self.config, x.shape[0], x.shape[1], cu_seqlens)
        rows = [[] for _ in range(x.shape[0])]
        for seq in sequences:
            if seq.length >= self.config.cmp_block:
                rows[seq.batch].append(self._compress(x[seq.batch, seq.start:seq.end]))
        empty = x.new_empty(0, x.shape[2], self.head_dim)
        return torch.stack([torch.cat(r) if r else empty for r in rows])
