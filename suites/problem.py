"""One benchmark problem: an op (fwd, bwd or decode) at given sizes, config and dtype, and its inputs.

Problems are small frozen values so suites can be declared as plain tuples, compared, and named by a stable key
(the key is what a resumed run uses to skip rows it already measured).
"""

from __future__ import annotations

import dataclasses
import zlib

import torch

from nsa.config import NSAConfig
from nsa.problems import random_inputs
from nsa.reference import KVCache

OPS = ("fwd", "bwd", "decode")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_LABELS = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def config_label(config: NSAConfig) -> str:
    """The config in the paper's letters, e.g. "l=32 d=16 l'=64 n=16 w=512" (forced blocks only when not default)."""
    label = (f"l={config.cmp_block} d={config.cmp_stride} l'={config.slc_block} n={config.slc_topn} "
             f"w={config.window}")
    if (config.init_blocks, config.local_blocks) != (1, 2):
        label += f" init={config.init_blocks} local={config.local_blocks}"
    return label


@dataclasses.dataclass(frozen=True)
class Problem:
    """An NSA op at one size.

    Attributes:
        op: "fwd" (forward), "bwd" (backward of the forward's output, gradients of every input) or "decode"
            (one new token per sequence against a cache of `seqlen` tokens, the new one included).
        seqlen: T. Tokens per sequence; with `seqlens`, the total of the packed sequences.
        batch: B. Sequences (1 with `seqlens`).
        num_heads, num_kv_heads: Hq and Hkv (Hq a multiple of Hkv).
        head_dim, head_dim_v: Dk and Dv.
        config: the NSAConfig.
        dtype: "bfloat16", "float16" or "float32".
        seqlens: packed variable-length sequences (FlashAttention's varlen layout, B = 1), or None.
    """

    op: str
    seqlen: int
    batch: int = 1
    num_heads: int = 64
    num_kv_heads: int = 4
    head_dim: int = 128
    head_dim_v: int = 128
    config: NSAConfig = NSAConfig()
    dtype: str = "bfloat16"
    seqlens: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"Problem.op must be one of {OPS}, got {self.op!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"Problem.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if min(self.seqlen, self.batch, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim_v) < 1:
            raise ValueError(f"Problem sizes must be >= 1: {self}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.seqlens is not None:
            if self.op == "decode" or self.batch != 1 or sum(self.seqlens) != self.seqlen or min(self.seqlens) < 1:
                raise ValueError(f"packed seqlens need op fwd/bwd, batch 1 and seqlen = sum(seqlens): {self}")

    @classmethod
    def packed(cls, op: str, seqlens, **sizes) -> Problem:
        """A variable-length problem: the sequences `seqlens` packed into one row."""
        seqlens = tuple(seqlens)
        return cls(op=op, seqlen=sum(seqlens), batch=1, seqlens=seqlens, **sizes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def group_size(self) -> int:
        """G = Hq / Hkv, query heads per kv head."""
        return self.num_heads // self.num_kv_heads

    @property
    def sequence_lengths(self) -> tuple[int, ...]:
        """The length of every sequence: B times T, or the packed lengths."""
        return self.seqlens if self.seqlens is not None else (self.seqlen,) * self.batch

    @property
    def key(self) -> str:
        """A stable, readable id, unique among problems that differ in any field (the resume key)."""
        parts = [self.op, f"T{self.seqlen}", f"B{self.batch}", f"H{self.num_heads}x{self.num_kv_heads}",
                 f"D{self.head_dim}" + (f"v{self.head_dim_v}" if self.head_dim_v != self.head_dim else ""),
                 config_label(self.config).replace(" ", ",").replace("'", "s"), DTYPE_LABELS[self.dtype]]
        if self.seqlens is not None:
            parts.append(f"varlen{len(self.seqlens)}-{zlib.crc32(repr(self.seqlens).encode()):08x}")
        return "-".join(parts)

    def shortened(self, max_tokens: int) -> Problem:
        """The same problem with at most `max_tokens` tokens per batch row (used to check long problems).

        Dense and decode problems get T = min(T, max_tokens); packed ones keep their leading sequences that fit
        (the last one cut to fit), so the sequence structure at the start is kept.
        """
        if self.seqlen <= max_tokens:
            return self
        if self.seqlens is None:
            return dataclasses.replace(self, seqlen=max_tokens)
        kept, total = [], 0
        for n in self.seqlens:
            kept.append(min(n, max_tokens - total))
            total += kept[-1]
            if total == max_tokens:
                break
        return Problem.packed(self.op, kept, **_sizes(self))


def _sizes(problem: Problem) -> dict:
    return {f.name: getattr(problem, f.name) for f in dataclasses.fields(problem)
            if f.name not in ("op", "seqlen", "batch", "seqlens")}


def make_inputs(problem: Problem, *, device, seed: int, requires_grad: bool = False) -> dict:
    """Random inputs of `problem`, in its dtype, as a dict of `nsa_attention` argument names.

    fwd/bwd: q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, cu_seqlens (see `nsa.problems.random_inputs`).
    decode: q [B, 1, Hq, Dk] and gates [B, 1, Hq] of the newest token; k, v [B, T, Hkv, D] and k_cmp, v_cmp
    [B, Tc, Hkv, D] of the whole cache (the newest token included); `cache`, a reference KVCache whose entries
    are views of those tensors (for implementations that take a cache object).
    """
    sizes = dict(num_heads=problem.num_heads, num_kv_heads=problem.num_kv_heads, head_dim=problem.head_dim,
                 head_dim_v=problem.head_dim_v, dtype=problem.torch_dtype, device=device, seed=seed)
    if problem.op != "decode":
        return random_inputs(problem.config, batch=problem.batch, seqlen=problem.seqlen, seqlens=problem.seqlens,
                             requires_grad=requires_grad, **sizes)
    return _decode_inputs(problem, **sizes)


def _decode_inputs(problem: Problem, *, num_heads, num_kv_heads, head_dim, head_dim_v, dtype, device, seed):
    # Drawn directly rather than through random_inputs, which would also make T queries per sequence.
    gen = torch.Generator(device="cpu").manual_seed(seed)
    batch, seqlen, num_cmp = problem.batch, problem.seqlen, problem.config.num_cmp_blocks(problem.seqlen)

    def draw(sample, *shape):
        return sample(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    x = dict(q=draw(torch.randn, batch, 1, num_heads, head_dim),
             k=draw(torch.randn, batch, seqlen, num_kv_heads, head_dim),
             v=draw(torch.randn, batch, seqlen, num_kv_heads, head_dim_v),
             k_cmp=draw(torch.randn, batch, num_cmp, num_kv_heads, head_dim),
             v_cmp=draw(torch.randn, batch, num_cmp, num_kv_heads, head_dim_v),
             g_cmp=draw(torch.rand, batch, 1, num_heads), g_slc=draw(torch.rand, batch, 1, num_heads),
             g_win=draw(torch.rand, batch, 1, num_heads))
    x["cache"] = cache_of(x, problem.config)
    return x


def cache_of(x: dict, config: NSAConfig) -> KVCache:
    """A reference KVCache holding x's k, v, k_cmp, v_cmp (views, no copy); never extended, so no compressors."""
    batch, _, num_kv_heads, head_dim = x["k"].shape

    def no_compressor(block):
        raise RuntimeError("benchmark caches are filled directly and never extended")

    cache = KVCache(batch, num_kv_heads, head_dim, config, k_compressor=no_compressor, v_compressor=no_compressor,
                    head_dim_v=x["v"].shape[-1], dtype=x["k"].dtype, device=x["k"].device)
    cache.keys, cache.values = list(x["k"].unbind(0)), list(x["v"].unbind(0))
    cache.k_cmp, cache.v_cmp = list(x["k_cmp"].unbind(0)), list(x["v_cmp"].unbind(0))
    return cache
