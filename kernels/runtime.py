"""Facts about how kernels run here, shared by every launcher."""

from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


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


# Set by the compile-only check (tests/compile_sm90.py): launches compile for a CUDA device of this compute
# capability and do not run, so the kernels take CPU tensors and nothing is computed.
COMPILE_ONLY_CAPABILITY: tuple[int, int] | None = None


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def hopper_or_later(device) -> bool:
    """A CUDA device of compute capability 9.0 (Hopper) or later (the compile-only target when one is set), not
    the interpreter: what programmatic dependent launch and TMA copies need."""
    if COMPILE_ONLY_CAPABILITY is not None:
        return COMPILE_ONLY_CAPABILITY[0] >= 9
    device = torch.device(device)
    if device.type != "cuda" or interpreting():
        return False
    return _capability(torch.cuda.current_device() if device.index is None else device.index)[0] >= 9


def _tma_readable(x: torch.Tensor, block_d: int) -> bool:
    """Whether TMA copies can read x [Ttot, H, D] in tiles of whole head dims: Hopper or later (or the
    interpreter, so CPU tests run the same kernel code), a head dim not padded to block_d, a contiguous x, 16-byte
    aligned (TMA's rule for the base and the strides)."""
    dim = x.shape[2]
    readable = interpreting() or hopper_or_later(x.device)
    return (readable and dim == block_d and x.is_contiguous() and x.data_ptr() % 16 == 0
            and (dim * x.element_size()) % 16 == 0)


def tma_rows(x: torch.Tensor, block_rows: int, block_d: int) -> TensorDescriptor | None:
    """x [Ttot, H, D] as a tensor descriptor of [block_rows, D] tiles over its [Ttot, H * D] view (a kernel reads
    head h's rows at column h * D), or None where TMA copies cannot read it (`_tma_readable`)."""
    total, heads, dim = x.shape
    if not _tma_readable(x, block_d):
        return None
    return TensorDescriptor.from_tensor(x.view(total, heads * dim), [block_rows, dim])


def tma_head_tiles(x: torch.Tensor, block_t: int, block_h: int, block_d: int) -> TensorDescriptor | None:
    """x [Ttot, H, D] as a tensor descriptor of [block_t, block_h, D] tiles (consecutive tokens x consecutive
    heads, which a kernel reshapes to the position-major rows of its query tile), or None where TMA copies cannot
    read it (`_tma_readable`). Tokens past Ttot and heads past H read as zeros."""
    if not _tma_readable(x, block_d):
        return None
    return TensorDescriptor.from_tensor(x, [block_t, block_h, x.shape[2]])


def key_value_sources(k: torch.Tensor, v: torch.Tensor, block_n: int, block_dk: int, block_dv: int, tma: bool):
    """The K and V arguments of a kernel that walks tiles of block_n keys: TMA descriptors (`tma_rows`) when
    `tma` and both allow them, else k and v themselves (pointer loads). The kernel's TMA flag is
    `k_src is not k`."""
    if tma:
        k_desc, v_desc = tma_rows(k, block_n, block_dk), tma_rows(v, block_n, block_dv)
        if k_desc is not None and v_desc is not None:
            return k_desc, v_desc
    return k, v


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs (the selection's ranking depends on it)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Tests set this to True: launchers then allocate outputs filled with NaN (integers: -2, never a valid block index
# or the -1 padding), so an unwritten element fails.
POISON_OUTPUTS = False


def new_output(shape, *, dtype, device) -> torch.Tensor:
    """An output buffer: uninitialised, or poisoned when POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan") if dtype.is_floating_point else -2, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_kernel_inputs(x: torch.Tensor, max_head_dim: int) -> None:
    """What only the kernels require, beyond nsa.inputs' checks: a CUDA device (or the interpreter), a dtype
    they take, head dims up to 256."""
    if x.device.type != "cuda" and not interpreting() and COMPILE_ONLY_CAPABILITY is None:
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {x.device}")
    compute_dtype(x.dtype)
    if max_head_dim > 256:
        raise ValueError(f"Triton kernels take head dims up to 256, got {max_head_dim}")


def pack(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, H, D] -> contiguous [B*T, H, D] in the kernels' dtype (differentiable)."""
    return x.to(dtype).reshape(x.shape[0] * x.shape[1], *x.shape[2:]).contiguous()


# tl.dot's smallest dimension on a GPU (the interpreter accepts smaller ones, the GPU compile fails).
MIN_DOT = 16


# Host-side sizes. triton.cdiv and triton.next_power_of_2 are constexpr functions: a call from Python costs 2-4 us
# (it unwraps constexprs), and a training step's launchers make about 40 of them (22 forward, 19 backward).
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of non-negative ints."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0, as triton.next_power_of_2)."""
    return 0 if n == 0 else 1 << (n - 1).bit_length()


def head_dim_block(dim: int) -> int:
    """BLOCK_D for a head dim: the next power of two, at least MIN_DOT."""
    return max(MIN_DOT, next_power_of_2(dim))


@triton.jit
def row_mask(row_valid, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """[rows, BLOCK_D] load/store mask: valid rows, and columns < HEAD_DIM when BLOCK_D pads the head dim (a mask
    constant along the row keeps the accesses vectorised)."""
    if BLOCK_D == HEAD_DIM:
        return row_valid[:, None]
    else:
        return row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)


@triton.jit
def store_or_add(ptrs, value, mask, ACCUMULATE: tl.constexpr):
    """Store fp32 `value` in ptrs' dtype; with ACCUMULATE, added to what ptrs hold (another branch's share of a
    gradient, summed there instead of by a separate pass)."""
    if ACCUMULATE:
        value += tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


def query_tile_sources(q: torch.Tensor, do: torch.Tensor, block_t: int, block_h: int, block_dk: int, block_dv: int,
                       tma: bool):
    """The Q and DO arguments of a dk/dv kernel that steps over query tiles of block_t positions x block_h heads:
    TMA descriptors of those boxes (`tma_head_tiles`) when `tma` and both allow them, else q and do themselves.
    The kernel's TMA flag is `q_src is not q`."""
    if tma:
        q_desc, do_desc = tma_head_tiles(q, block_t, block_h, block_dk), tma_head_tiles(do, block_t, block_h, block_dv)
        if q_desc is not None and do_desc is not None:
            return q_desc, do_desc
    return q, do


def check_launch_params(params, *, counts=("num_stages",), tiles=(), flags=()) -> None:
    """Validate a kernel-params dataclass: fields whose names end in one of `flags` are bools, those ending in
    one of `counts` ints >= 1, every other field a power of two; for each kernel prefix in `tiles` ("fwd_", ""
    ...), the rows of its score tile (block_m * block_h) and its block_n (when it has one) are at least MIN_DOT."""
    name = type(params).__name__
    for field in dataclasses.fields(params):
        value = getattr(params, field.name)
        if flags and field.name.endswith(tuple(flags)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}.{field.name} must be a bool, got {value!r}")
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}.{field.name} must be an int >= 1, got {value!r}")
        if not field.name.endswith(tuple(counts)) and value & (value - 1):
            raise ValueError(f"{name}.{field.name} must be a power of two, got {value!r}")
    for kernel in tiles:
        rows = getattr(params, f"{kernel}block_m") * getattr(params, f"{kernel}block_h")
        block_n = getattr(params, f"{kernel}block_n", MIN_DOT)
        if rows < MIN_DOT or block_n < MIN_DOT:
            raise ValueError(f"{name}: tl.dot on a GPU needs {kernel}block_m * {kernel}block_h >= {MIN_DOT} and "
                             f"{kernel}block_n >= {MIN_DOT}, got {rows} and {block_n}")


@functools.lru_cache(maxsize=None)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


class SideStream:
    """Work queued inside `with SideStream(device) as side:` goes to a second stream of a CUDA device, after
    everything the current stream queued before; `side.join(*outputs)` makes the current stream wait for it and
    marks the outputs as used there (for the caching allocator). `mark = side.mark()` inside the block and
    `side.wait(mark)` after it make the current stream wait only for the side work queued before the mark (the
    outputs it uses early still go to `join`). Elsewhere (the interpreter) a no-op."""

    def __init__(self, device: torch.device):
        self.enabled = device.type == "cuda"
        self.device = device

    def __enter__(self):
        if self.enabled:
            self.main = torch.cuda.current_stream(self.device)
            self.side = _side_stream(self.device)
            self.side.wait_stream(self.main)
            self.context = torch.cuda.stream(self.side)
            self.context.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.context.__exit__(*exc)

    def mark(self) -> torch.cuda.Event | None:
        if not self.enabled:
            return None
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def wait(self, mark: torch.cuda.Event | None) -> None:
        if self.enabled:
            self.main.wait_event(mark)

    def join(self, *outputs: torch.Tensor) -> None:
        if self.enabled:
            self.main.wait_stream(self.side)
            for x in outputs:
                x.record_stream(self.main)
