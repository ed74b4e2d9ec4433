"""The NSA configuration: block sizes, top-n, window (SPEC section 1)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class NSAConfig:
    """Native Sparse Attention hyper-parameters, validated on construction.

    Defaults are the paper's values (arXiv 2502.11089, section 4.1).

    Attributes:
        cmp_block: l, tokens per compression block.
        cmp_stride: d, stride between consecutive compression blocks.
        slc_block: l', tokens per selection block.
        slc_topn: n, selection blocks each query attends to (forced ones included).
        window: w, sliding-window size, the current token included.
        init_blocks: leading selection blocks that are always selected.
        local_blocks: most recent selection blocks (the current one included) that are always selected.
    """

    cmp_block: int = 32
    cmp_stride: int = 16
    slc_block: int = 64
    slc_topn: int = 16
    window: int = 512
    init_blocks: int = 1
    local_blocks: int = 2

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"NSAConfig.{field.name} must be an int, got {value!r}")
        for name in ("cmp_block", "cmp_stride", "slc_block", "slc_topn", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"NSAConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("init_blocks", "local_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"NSAConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.cmp_block % self.cmp_stride:
            raise ValueError(
                f"NSAConfig: cmp_stride d={self.cmp_stride} must divide cmp_block l={self.cmp_block}")
        if self.slc_block % self.cmp_stride:
            raise ValueError(
                f"NSAConfig: cmp_stride d={self.cmp_stride} must divide slc_block l'={self.slc_block}")
        if self.cmp_block > self.slc_block:
            raise ValueError(
                f"NSAConfig: cmp_block l={self.cmp_block} must be <= slc_block l'={self.slc_block}")
        if self.slc_topn < self.init_blocks + self.local_blocks:
            raise ValueError(
                f"NSAConfig: slc_topn n={self.slc_topn} must be >= init_blocks + local_blocks "
                f"= {self.init_blocks} + {self.local_blocks}")

    def num_cmp_blocks(self, seqlen: int) -> int:
        """Tc: compression blocks of a sequence of `seqlen` tokens (blocks [i*d, i*d+l) inside it)."""
        if seqlen < self.cmp_block:
            return 0
        return (seqlen - self.cmp_block) // self.cmp_stride + 1

    def num_slc_blocks(self, seqlen: int) -> int:
        """Selection blocks [j*l', (j+1)*l') that start inside a sequence of `seqlen` tokens."""
        return -(-seqlen // self.slc_block)
