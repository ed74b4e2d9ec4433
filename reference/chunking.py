"""Query-chunked evaluation shared by the reference stages.

Every reference stage computes the rows of one sequence at a time, a chunk of query positions at a time, so
that no T x T tensor (nor T x Tc for all heads at once) ever exists. Under autograd each chunk is
checkpointed: its intermediates are recomputed in the backward pass instead of being kept for all chunks.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from nsa.inputs import Sequence

# Elements one chunk's intermediates may take: 2**26 is 512 MiB at float64, 256 MiB at float32.
CHUNK_BUDGET_ELEMENTS = 1 << 26


def rows_per_chunk(elements_per_row: int, chunk_size: int | None) -> int:
    """Query rows per chunk: `chunk_size` if given, else as many as fit CHUNK_BUDGET_ELEMENTS."""
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        return chunk_size
    return max(1, CHUNK_BUDGET_ELEMENTS // max(1, elements_per_row))


def row_chunks(sequences: tuple[Sequence, ...], chunk: int):
    """Yield (sequence, t0, t1): rows [t0, t1) of each sequence, positions counted from the sequence start."""
    for seq in sequences:
        for t0 in range(0, seq.length, chunk):
            yield seq, t0, min(seq.length, t0 + chunk)


def run_chunk(fn, *args):
    """fn(*args), checkpointed when autograd will need its intermediates."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def assemble(pieces: list[tuple[Sequence, torch.Tensor]], batch: int, empty_row: torch.Tensor) -> torch.Tensor:
    """Concatenate per-chunk rows back into [B, T, ...], in the order `row_chunks` produced them.

    `empty_row` is a [0, ...] tensor giving the trailing shape, dtype and device for an empty batch row.
    """
    rows = [[] for _ in range(batch)]
    for seq, piece in pieces:
        rows[seq.batch].append(piece)
    return torch.stack([torch.cat(r, dim=0) if r else empty_row for r in rows], dim=0)


def positions(t0: int, t1: int, device) -> torch.Tensor:
    """Query positions [t0, t1) within their sequence, as an int64 tensor."""
    return torch.arange(t0, t1, device=device)
