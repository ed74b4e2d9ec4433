"""Facts about how kernels run here, shared by every launcher."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels see: the input's, except float32 in the interpreter, whose bf16/fp16 maths is wrong."""
    if interpreting():
        return torch.float32
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"Triton kernels take float16, bfloat16 or float32 inputs, got {dtype}")
    return dtype


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (the selection's ranking depends on it)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Tests set this to True: launchers then allocate outputs filled with NaN, so an unwritten element fails.
POISON_OUTPUTS = False


def new_output(shape, *, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialised, or NaN-filled when POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)
