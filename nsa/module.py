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
    new_cache(batch_size, capacity=...) and step(x [B, n, hidden], cache) for decoding: the prompt, then a token
    (or a few) at a time. With the kernels the cache is an `nsa.kernels.KVCache` (fixed capacity, optionally
    paged) and a step is capturable in a CUDA graph; with the reference, an `nsa.reference.KVCache`.
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

    def _uses_kernels(self, device: torch.device) -> bool:
        if self.backend == "reference" or (self.backend == "auto" and device.type != "cuda"):
            return False
        from nsa import kernels
        if not hasattr(kernels, "nsa_attention"):
            if self.backend == "kernels":
                raise RuntimeError("backend='kernels' but nsa.kernels.nsa_attention is not available")
            return False
        return True

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v, (g_cmp, g_slc, g_win) = self._project(x)
        k_cmp = self.k_compressor(k, cu_seqlens)
        v_cmp = self.v_compressor(v, cu_seqlens)
        if self._uses_kernels(x.device):
            from nsa.kernels import nsa_attention
        else:
            nsa_attention = reference.nsa_attention
        o = nsa_attention(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, self.config, cu_seqlens=cu_seqlens)
        return self.o_proj(o.flatten(2))

    def new_cache(self, batch_size: int, *, capacity: int | None = None, dtype=None, device=None,
                  page_size: int | None = None):
        """An empty KV cache for `batch_size` sequences, compressing with this layer's compressors: an
        `nsa.kernels.KVCache` of `capacity` tokens per sequence (paged with `page_size`) where the kernels run,
        else an `nsa.reference.KVCache` (which grows without a capacity)."""
        weight = self.k_proj.weight
        dtype, device = dtype or weight.dtype, torch.device(device or weight.device)
        sizes = dict(head_dim_v=self.head_dim_v, k_compressor=self.k_compressor, v_compressor=self.v_compressor,
                     dtype=dtype, device=device)
        if not self._uses_kernels(device):
            return reference.KVCache(batch_size, self.num_kv_heads, self.head_dim, self.config, **sizes)
        if capacity is None:
            raise ValueError("new_cache: the kernels' cache needs capacity= (the most tokens one sequence holds)")
        from nsa.kernels import KVCache
        return KVCache(batch_size, self.num_kv_heads, self.head_dim, self.config, capacity=capacity,
                       page_size=page_size, **sizes)

    def step(self, x: torch.Tensor, cache) -> torch.Tensor:
        """Decode n new tokens per sequence: x [B, n, hidden] -> [B, n, hidden], appending them to `cache` (the
        first step into an empty kernels cache is the prompt's prefill)."""
        q, k, v, (g_cmp, g_slc, g_win) = self._project(x)
        if isinstance(cache, reference.KVCache):
            cache.append(k, v)
            o = reference.nsa_decode(q, cache, g_cmp, g_slc, g_win, self.config)
        else:
            from nsa.kernels import nsa_prefill
            o = nsa_prefill(q, k, v, g_cmp, g_slc, g_win, cache, self.config)
        return self.o_proj(o.flatten(2))
