"""Timing a call: CUDA events on a GPU, perf_counter on a CPU; and the card's two ceilings.

On a GPU every timed call is preceded by a write of a buffer several times the L2 size. That does what rotating
input copies would (no call finds its inputs in L2 left by the previous one) without holding extra copies of
gigabyte-sized 64k inputs, and it keeps the GPU busy while the CPU enqueues the call, so Python launch overhead
is not counted as kernel time. The events bracket the call only, not the flush. Reported: the median and the
20th/80th percentiles of the per-call times.

On a CPU the numbers are wall-clock seconds of whatever ran there (often the Triton interpreter): they say
nothing about the kernels' speed, and every output that shows them says so.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import numpy as np
import torch

from nsa.kernels.runtime import SideStream

FLUSH_L2_FACTOR = 4
MIN_FLUSH_BYTES = 256 * 2**20


@dataclasses.dataclass(frozen=True)
class TimerSettings:
    """How long to warm up and measure: calls go on until both the time and the count minimums are met."""

    warmup_ms: float
    rep_ms: float
    min_reps: int
    max_reps: int


GPU_TIMER = TimerSettings(warmup_ms=25.0, rep_ms=200.0, min_reps=10, max_reps=1000)
# The correctness check has already run the code once; the interpreter is slow, one more call is enough.
CPU_TIMER = TimerSettings(warmup_ms=0.0, rep_ms=100.0, min_reps=1, max_reps=5)


@dataclasses.dataclass(frozen=True)
class Timing:
    """Per-call milliseconds: median and spread over `reps` calls, measured by `timer`."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    timer: str


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def default_timer(device) -> TimerSettings:
    return GPU_TIMER if is_cuda(device) else CPU_TIMER


def time_call(fn: Callable[[], object], device, settings: TimerSettings | None = None, *,
              cuda_graph: bool = False) -> Timing:
    """Time `fn()` (everything it needs already set up) on `device`.

    With cuda_graph (decode steps: microseconds of GPU work behind more of Python and launch overhead, the way
    serving engines run them) fn is captured once in a CUDA graph and its replays are timed; a fn that cannot
    be captured is timed eagerly and the timer string says why.
    """
    settings = settings or default_timer(device)
    if is_cuda(device):
        return _time_cuda(fn, torch.device(device), settings, cuda_graph)
    return _time_cpu(fn, settings)


def _summary(times_ms, timer: str) -> Timing:
    median, p20, p80 = np.percentile(np.asarray(times_ms, dtype=np.float64), [50, 20, 80])
    return Timing(float(median), float(p20), float(p80), len(times_ms), timer)


def _time_cpu(fn, settings: TimerSettings) -> Timing:
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < settings.warmup_ms:
        fn()
    times = []
    while len(times) < settings.max_reps and (len(times) < settings.min_reps or sum(times) < settings.rep_ms):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _summary(times, "perf_counter (CPU: meaningless for kernel speed)")


def _captured(fn, device: torch.device):
    """(graph.replay, None) for fn captured in a CUDA graph, or (None, why) when it cannot be captured."""
    with SideStream(device) as side:  # warm-up off the default stream, as capture requires
        fn()
    side.join()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # e.g. a host synchronisation inside fn
        return None, f"{type(e).__name__}: {str(e)[:120]}"
    return graph.replay, None


def _time_cuda(fn, device: torch.device, settings: TimerSettings, cuda_graph: bool) -> Timing:
    timer = "cuda events, L2 flushed before each call"
    if cuda_graph:
        replay, why = _captured(fn, device)
        if replay is None:
            timer += f", eager (CUDA graph capture failed: {why})"
        else:
            fn, timer = replay, "cuda events over CUDA-graph replays, L2 flushed before each call"
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
    flush = torch.empty(max(MIN_FLUSH_BYTES, FLUSH_L2_FACTOR * l2_bytes), dtype=torch.int8, device=device)

    def timed_calls(count):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(count)]
        for start, end in events:
            flush.zero_()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]

    warm = timed_calls(1)  # the first call may compile or autotune: never measured
    while sum(warm) < settings.warmup_ms:
        warm += timed_calls(1)
    estimate = max(float(np.median(warm[-3:])), 1e-3)
    reps = int(min(settings.max_reps, max(settings.min_reps, settings.rep_ms / estimate)))
    return _summary(timed_calls(reps), timer)


def measure_ceilings(device) -> dict:
    """The card's measured roofline: a big bf16 matmul (TFLOP/s) and a big device-to-device copy (GB/s).

    Measured rather than read from a data sheet: clocks, power limits and the part (SXM/PCIe) differ between
    cards of the same name. On a CPU the sizes are small and the numbers only keep the code path exercised.
    """
    cuda = is_cuda(device)
    n = 8192 if cuda else 256
    copy_bytes = 2**30 if cuda else 2**24
    a, b = (torch.randn(n, n, device=device).to(torch.bfloat16) for _ in range(2))
    c = torch.empty(n, n, dtype=torch.bfloat16, device=device)
    matmul = time_call(lambda: torch.matmul(a, b, out=c), device)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device)
    return {
        "matmul_tflops": 2.0 * n**3 / (matmul.median_ms * 1e-3) / 1e12,
        "matmul": f"bf16 [{n}x{n}] @ [{n}x{n}], median of {matmul.reps} ({matmul.timer})",
        "copy_gbps": 2.0 * copy_bytes / (copy.median_ms * 1e-3) / 1e9,
        "copy": f"{copy_bytes / 2**20:.0f} MiB device-to-device copy, read + write counted, median of "
                f"{copy.reps} ({copy.timer})",
    }
