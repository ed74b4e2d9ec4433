"""A small decoder-only byte LM whose attention is pluggable: NSA or dense causal attention of the same size.

Both variants share everything but the attention layer: embeddings, learned absolute positions, pre-norm
blocks, MLPs, the tied output head, and the q/k/v/o widths (Hq, Hkv, head dim). Positions are learned absolute
embeddings because `nsa.NativeSparseAttention` projects q and k itself and offers no rotary hook; giving the
dense model the same embeddings keeps the comparison about the attention alone. NSA's extra parameters (the
branch gates and the two compressors per layer) are counted and reported, not hidden.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from nsa import NativeSparseAttention, NSAConfig
from nsa.suites.training.corpus import VOCAB_SIZE

ATTENTIONS = ("nsa", "dense")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Sizes of the LM. `attention` is "nsa" or "dense"; `backend` is passed to NativeSparseAttention."""

    num_layers: int = 2
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    mlp_ratio: int = 4
    max_seqlen: int = 256
    nsa: NSAConfig = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=4, window=64)
    attention: str = "nsa"
    backend: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")


class DenseAttention(nn.Module):
    """Causal softmax attention with NativeSparseAttention's projections (GQA: kv heads repeated), through
    torch's scaled_dot_product_attention (FlashAttention or cuDNN on a GPU, the math path on a CPU)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seqlen, _ = x.shape
        q = self.q_proj(x).view(batch, seqlen, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seqlen, self.num_kv_heads, self.head_dim).transpose(1, 2)
        group = self.num_heads // self.num_kv_heads
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(o.transpose(1, 2).flatten(2))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        width = config.hidden_size
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        if config.attention == "nsa":
            self.attn = NativeSparseAttention(width, config.num_heads, config.num_kv_heads, config.head_dim,
                                              config.nsa, backend=config.backend)
        else:
            self.attn = DenseAttention(width, config.num_heads, config.num_kv_heads, config.head_dim)
        self.mlp = nn.Sequential(nn.Linear(width, config.mlp_ratio * width), nn.GELU(),
                                 nn.Linear(config.mlp_ratio * width, width))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ByteLM(nn.Module):
    """Decoder-only LM over bytes: forward(tokens [B, T] int64) -> logits [B, T, 256]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(VOCAB_SIZE, config.hidden_size)
        self.pos = nn.Embedding(config.max_seqlen, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = nn.LayerNorm(config.hidden_size)
        self.apply(self._init)
        # GPT-2's scaling of the residual projections keeps the residual stream's variance flat in depth.
        for block in self.blocks:
            for linear in (block.attn.o_proj, block.mlp[2]):
                nn.init.normal_(linear.weight, std=0.02 / (2 * config.num_layers) ** 0.5)

    @staticmethod
    def _init(module):
        # One initialisation for both variants (NSA's internal projections and compressor MLPs included).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seqlen = tokens.shape[1]
        if seqlen > self.config.max_seqlen:
            raise ValueError(f"sequence of {seqlen} tokens is longer than max_seqlen={self.config.max_seqlen}")
        x = self.embed(tokens) + self.pos(torch.arange(seqlen, device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.norm(x), self.embed.weight)

    def num_params(self) -> dict:
        """Parameter counts: total, and the attention layers' share (NSA's gates and compressors included)."""
        total = sum(p.numel() for p in self.parameters())
        attention = sum(p.numel() for b in self.blocks for p in b.attn.parameters())
        return {"total": total, "attention": attention}


def build_model(config: ModelConfig, *, seed: int) -> ByteLM:
    """The model, on the CPU, with weights drawn from torch's generator seeded by `seed`: the same config and
    seed give the same weights (the kernels-vs-reference comparison builds its two copies this way)."""
    torch.manual_seed(seed)
    return ByteLM(config)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def autocast(device, dtype: str):
    """bf16 autocast on CUDA for dtype "bfloat16" (fp32 master weights); plain fp32 everywhere else."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if torch.device(device).type == "cuda" and dtype == "bfloat16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
