"""Every kernel works on packed sequences: a dense batch [B, T, ...] is viewed as B sequences of T tokens.

One code path serves dense and variable-length inputs: tensors are flattened to [total tokens, H, D] and
sequence i owns tokens [cu_seqlens[i], cu_seqlens[i+1]) and compressed entries [cu_cmp[i], cu_cmp[i+1]).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from nsa.config import NSAConfig


@dataclasses.dataclass(frozen=True)
class PackedSequences:
    """Offsets of N packed sequences (FlashAttention's cu_seqlens convention), on the tensors' device.

    Attributes:
        cu_seqlens: int32 [N+1] token offsets.
        cu_cmp: int32 [N+1] offsets of each sequence's compressed entries (Tc of its length).
        max_seqlen: longest sequence, for grid sizes.
        max_cmp: most compressed entries of one sequence.
        seqlens: host copy of the lengths (no device sync needed after construction).
    """

    cu_seqlens: torch.Tensor
    cu_cmp: torch.Tensor
    max_seqlen: int
    max_cmp: int
    seqlens: tuple[int, ...]

    @property
    def num_seqs(self) -> int:
        return len(self.seqlens)

    @staticmethod
    def build(config: NSAConfig, batch: int, seqlen: int, device, cu_seqlens: torch.Tensor | None = None):
        """From a dense [B, T] batch (cu_seqlens None) or from FlashAttention-style cu_seqlens (B = 1)."""
        if cu_seqlens is None:
            lengths = [seqlen] * batch
        else:
            bounds = cu_seqlens.tolist()
            lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
        num_cmp = [config.num_cmp_blocks(n) for n in lengths]
        return PackedSequences(device_offsets(lengths, device), device_offsets(num_cmp, device),
                               max(lengths, default=0), max(num_cmp, default=0), tuple(lengths))


def device_offsets(sizes, device) -> torch.Tensor:
    """int32 [len(sizes) + 1]: the running offsets 0, s0, s0 + s1, ... of host ints `sizes`, on `device`.

    Memoized per (sizes, device), so a training loop over one shape copies nothing after its first step; the
    tensor is shared between callers, who only read it. The copy is non-blocking: `torch.tensor(...,
    device="cuda")` synchronises the stream (waits for every queued kernel) for these few bytes, and the GPU then
    idles while the host queues the next launches. A non-blocking copy from pageable memory is staged before the
    call returns, so the host list may go at once.
    """
    return _device_offsets(tuple(sizes), memo_device(device))


@functools.lru_cache(maxsize=64)
def _device_offsets(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    out = [0]
    for size in sizes:
        out.append(out[-1] + size)
    return torch.tensor(out, dtype=torch.int32).to(device, non_blocking=True)


def segment_ids(sizes, device) -> torch.Tensor:
    """int32 [sum(sizes)]: for each index, the segment s of `sizes` holding it (empty segments hold none), on
    `device`. Host ints only, so built on the host and memoized like `device_offsets` (shared, read only); a few
    entries only, as each holds 4 bytes a token (variable-length batches rarely repeat their lengths)."""
    return _segment_ids(tuple(sizes), memo_device(device))


@functools.lru_cache(maxsize=8)
def _segment_ids(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return segment_ids_on_host(sizes).int().to(device, non_blocking=True)


def segment_ids_on_host(sizes) -> torch.Tensor:
    """int64 [sum(sizes)] on the host, not memoized: `segment_ids` for host code that indexes with it."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))


def memo_device(device) -> torch.device:
    """The device as a memo key: a CUDA device without an index is the current one, which may change."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
