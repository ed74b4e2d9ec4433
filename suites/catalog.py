"""The named suites: declarative problem sets shared by `nsa bench`, `nsa run`, `nsa check` and the tests.

Shapes follow issue 6: the paper's setting (B=1, 64 query / 4 kv heads, D=128, l=32, d=16, l'=64, n=16, w=512,
bf16) swept over T, then one axis at a time (GQA ratio, block sizes, packed lengths, decode batch), plus the
fla-core peer's own config and a tiny CPU `smoke` suite.
"""

from __future__ import annotations

import dataclasses
import itertools

from nsa.config import NSAConfig
from nsa.suites.problem import Problem

PAPER_CONFIG = NSAConfig(cmp_block=32, cmp_stride=16, slc_block=64, slc_topn=16, window=512)
# fla-core's parallel_nsa: mean-pooled compression with l = d = l' = its block_size (64), n = 16, w = 512; it
# forces the first, the current and the previous block, which is init_blocks=1, local_blocks=2 here.
FLA_CONFIG = NSAConfig(cmp_block=64, cmp_stride=64, slc_block=64, slc_topn=16, window=512)
PAPER_SHAPE = dict(num_heads=64, num_kv_heads=4, head_dim=128, head_dim_v=128, dtype="bfloat16")
# 1k .. 64k, and 128k, which runs where memory allows (an out-of-memory row is recorded as such).
PAPER_SEQLENS = tuple(1024 * 2**i for i in range(8))
# Full-size shapes the kernel families' GPU tests check at the paper config: the paper's heads, MHA, an odd T with
# G=2, and a packed batch. id: (seqlen or None, packed seqlens or None, Hq, Hkv, D).
GPU_CHECK_SHAPES = {
    "paper-T16384-Hq64-Hkv4-D128": (16384, None, 64, 4, 128),
    "paper-T4096-G1-H8-D128": (4096, None, 8, 8, 128),
    "paper-T4093-G2-H16-D128": (4093, None, 16, 8, 128),
    "paper-varlen-G16-D128": (None, [1000, 31, 4097, 2000], 32, 2, 128),
}


@dataclasses.dataclass(frozen=True)
class Suite:
    """A named tuple of problems; `description` is what `nsa suites` prints."""

    name: str
    description: str
    problems: tuple[Problem, ...]

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.op for p in self.problems))


def _sweep(ops, seqlens, **fields) -> tuple[Problem, ...]:
    return tuple(Problem(op=op, seqlen=t, **fields) for op, t in itertools.product(ops, seqlens))


def _paper() -> Suite:
    shape = dict(PAPER_SHAPE, config=PAPER_CONFIG)
    problems = _sweep(("fwd", "bwd"), PAPER_SEQLENS, **shape)
    problems += tuple(Problem(op="decode", seqlen=t, batch=b, **shape)
                      for b, t in itertools.product((1, 16), PAPER_SEQLENS))
    return Suite("paper", "the paper's setting (B=1, Hq/Hkv 64/4, D=128, l=32 d=16 l'=64 n=16 w=512, bf16): "
                 "fwd and bwd for T 1k..128k, decode at B=1 and 16", problems)


def _gqa() -> Suite:
    problems = ()
    for group in (1, 2, 4, 8, 16):
        shape = dict(PAPER_SHAPE, num_kv_heads=64 // group, config=PAPER_CONFIG)
        problems += _sweep(("fwd", "bwd"), (4096, 16384, 65536), **shape)
    return Suite("gqa", "GQA ratio G = Hq/Hkv in 1, 2, 4, 8, 16 at Hq=64 (paper config), fwd and bwd, "
                 "T 4k/16k/64k", problems)


def _blocks() -> Suite:
    problems = ()
    for slc_block, topn in itertools.product((32, 64, 128), (8, 16, 32)):
        config = dataclasses.replace(PAPER_CONFIG, slc_block=slc_block, slc_topn=topn)
        problems += _sweep(("fwd", "bwd"), (16384, 65536), **PAPER_SHAPE, config=config)
    return Suite("blocks", "selection block l' in 32, 64, 128 and top-n in 8, 16, 32 (paper shape), fwd and bwd, "
                 "T 16k/64k", problems)


def _varlen() -> Suite:
    packings = (
        (1024,) * 64,  # many short documents
        (8192,) * 8,
        # halving lengths down to odd ones: every sequence ends mid-block, one is shorter than a block
        (32768, 16384, 8192, 4096, 2048, 1024, 512, 256, 128, 64, 63, 1),
    )
    problems = tuple(Problem.packed(op, lengths, **PAPER_SHAPE, config=PAPER_CONFIG)
                     for lengths, op in itertools.product(packings, ("fwd", "bwd")))
    return Suite("varlen", "packed variable-length batches of 64k tokens (64 x 1k, 8 x 8k, halving lengths "
                 "32k..1 with odd ends), paper shape, fwd and bwd", problems)


def _decode() -> Suite:
    problems = tuple(Problem(op="decode", seqlen=t, batch=b, **PAPER_SHAPE, config=PAPER_CONFIG)
                     for b, t in itertools.product((1, 4, 16, 64), (4096, 16384, 65536, 131072)))
    return Suite("decode", "one decode step, paper shape, batch 1/4/16/64 against caches of 4k..128k tokens",
                 problems)


def _peer() -> Suite:
    problems = _sweep(("fwd", "bwd"), PAPER_SEQLENS[:-1], **PAPER_SHAPE, config=FLA_CONFIG)
    return Suite("peer", "fla-core's own config (l=l'=d=64, n=16, w=512), paper shape, fwd and bwd, T 1k..64k: "
                 "nsa and parallel_nsa on the same work", problems)


def _smoke() -> Suite:
    # Small enough for the Triton interpreter on a CPU in seconds; still several blocks, a window shorter than
    # T, odd packed lengths and GQA (2 query heads per kv head).
    shape = dict(num_heads=2, num_kv_heads=1, head_dim=16, head_dim_v=16, dtype="float32",
                 config=NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=3, window=32))
    problems = (Problem(op="fwd", seqlen=128, **shape), Problem(op="bwd", seqlen=128, **shape),
                Problem.packed("fwd", (45, 83), **shape), Problem(op="decode", seqlen=100, batch=2, **shape))
    return Suite("smoke", "tiny fp32 problems for a CPU (Triton interpreter): T <= 128, 2 query / 1 kv heads, "
                 "D=16, fwd, bwd, varlen, decode", problems)


SUITES: dict[str, Suite] = {s.name: s for s in (_paper(), _gqa(), _blocks(), _varlen(), _decode(), _peer(),
                                                  _smoke())}


def get_suite(name: str) -> Suite:
    """The suite called `name`; a KeyError that lists the known names otherwise."""
    try:
        return SUITES[name]
    except KeyError:
        raise KeyError(f"no suite {name!r}; known suites: {', '.join(SUITES)}") from None
