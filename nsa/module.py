"""`NativeSparseAttention`: a drop-in attention layer (SPEC section 3)."""

from __future__ import annotations

import torch
from torch import nn

from nsa.config import NSAConfig
from nsa import reference

BACKENDS = ("auto", "kernels", "reference")


class NativeSparseAttention(nn.Module):
    """Multi-head NSA layer: projections, compressors, per-head sigmoid gates, the attention, the output projection.

    Args:
        hidden_size: model width.
        num_heads, num_kv_heads: query heads Hq and kv heads Hkv (Hq a multiple of Hkv).
        head_dim: Dk; head_dim_v: Dv (default Dk).
        config: NSAConfig (the paper's values by default).
        compressor_hidden: hidden width of the compressors' MLPs (default 2 * head dim).
        backend: "kernels" (Triton, CUDA tensors), "reference" (plain PyTorch), or "auto": the kernels on CUDA
            tensors when they are available, the reference elsewhere.

    forward(x [B, T, hidden], cu_seqlens=None) -> [B, T, hidden] for training and prefill;
    new_cache(batch_size) and step(x [B, n, hidden], cache) for decoding, token by token.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 config: NSAConfig = NSAConfig(), *, head_dim_v: int | None = None,
                 compressor_hidden: int | None = None, bias: bool = False, backend: str = "auto"):
        super().__init__()
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.config, self.backend = config, backend
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.head_dim_v = head_dim, head_dim_v or head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * self.head_dim_v, bias=bias)
        self.gate_proj = nn.Linear(hidden_size, 3 * num_heads, bias=True)
        self.o_proj = nn.Linear(num_heads * self.head_dim_v, hidden_size, bias=bias)
        self.k_compressor = reference.Compressor(config, head_dim, compressor_hidden)
        self.v_compressor = reference.Compressor(config, self.head_dim_v, compressor_hidden)

    def _project(self, x):
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim_v)
        gates = torch.sigmoid(self.gate_proj(x)).view(batch, seqlen, 3, self.num_heads).unbind(dim=2)
        return q, k, v, gates

    def _attention_impl(self, x):
        if self.backend == "reference" or (self.backend == "auto" and not x.is_cuda):
            return reference.nsa_attention
        from nsa import kernels
        if not hasattr(kernels, "nsa_attention"):
            if self.backend == "kernels":
                raise RuntimeError("backend='kernels' but nsa.kernels.nsa_attention is not available")
            return reference.nsa_attention
        return kernels.nsa_attention

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, (g_cmp, g_slc, g_win) = self._project(x)
        k_cmp = self.k_compressor(k, cu_seqlens)
        v_cmp = self.v_compressor(v, cu_seqlens)
        o = self._attention_impl(x)(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, self.config, cu_seqlens=cu_seqlens)
        return self.o_proj(o.flatten(2))

    def new_cache(self, batch_size: int, *, dtype=None, device=None) -> reference.KVCache:
        """An empty KV cache for `batch_size` sequences, compressing with this layer's compressors."""
        weight = self.k_proj.weight
        return reference.KVCache(batch_size, self.num_kv_heads, self.head_dim, self.config,
                                 head_dim_v=self.head_dim_v, k_compressor=self.k_compressor,
                                 v_compressor=self.v_compressor, dtype=dtype or weight.dtype,
                                 device=device or weight.device)

    def step(self, x: torch.Tensor, cache: reference.KVCache) -> torch.Tensor:
        """Decode n new tokens per sequence: x [B, n, hidden] -> [B, n, hidden], appending them to `cache`."""
        q, k, v, (g_cmp, g_slc, g_win) = self._project(x)
        cache.append(k, v)
        o = reference.nsa_decode(q, cache, g_cmp, g_slc, g_win, self.config)
        return self.o_proj(o.flatten(2))
