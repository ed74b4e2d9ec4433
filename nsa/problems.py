"""Random NSA problems: inputs of given sizes, for tests, the tuner and benchmarks."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig


def random_inputs(config: NSAConfig, *, batch: int = 1, seqlen: int | None = None, num_heads: int,
                  num_kv_heads: int, head_dim: int, head_dim_v: int | None = None, seqlens=None,
                  dtype=torch.float32, device="cpu", seed: int | None = None, requires_grad: bool = False) -> dict:
    """Fresh random inputs of `nsa_attention`, as a dict of its argument names (plus `cu_seqlens`).

    Either a dense batch (`batch`, `seqlen`) or packed variable-length sequences (`seqlens`, a list of lengths).
    Queries/keys are unit normal, gates uniform in (0, 1) like sigmoid outputs, compressed keys/values normal.
    """
    gen = torch.Generator(device="cpu")
    gen.manual_seed(torch.seed() if seed is None else seed)
    head_dim_v = head_dim_v or head_dim
    if seqlens is not None:
        batch, seqlen = 1, sum(seqlens)
        bounds = [0]
        for n in seqlens:
            bounds.append(bounds[-1] + n)
        cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=device)
        num_cmp = sum(config.num_cmp_blocks(n) for n in seqlens)
    else:
        cu_seqlens = None
        num_cmp = config.num_cmp_blocks(seqlen)

    def normal(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    def uniform(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    out = dict(q=normal(batch, seqlen, num_heads, head_dim), k=normal(batch, seqlen, num_kv_heads, head_dim),
               v=normal(batch, seqlen, num_kv_heads, head_dim_v), k_cmp=normal(batch, num_cmp, num_kv_heads, head_dim),
               v_cmp=normal(batch, num_cmp, num_kv_heads, head_dim_v), g_cmp=uniform(batch, seqlen, num_heads),
               g_slc=uniform(batch, seqlen, num_heads), g_win=uniform(batch, seqlen, num_heads))
    if requires_grad:
        for x in out.values():
            x.requires_grad_(True)
    out["cu_seqlens"] = cu_seqlens
    return out
