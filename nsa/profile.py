"""`nsa profile`: where the time of one `nsa_attention` step goes on this GPU, kernel by kernel.

The step is the one the benchmarks time (the kernels read the tuned config cache as `nsa_attention` does):
forward, and with "bwd" the backward from a fixed random output gradient. torch.profiler records the CUDA
kernels of a few steps after two warm-up steps; each kernel's GPU time is summed over its launches and divided
by the steps. The backward's selected branch runs on a second stream beside the others, so kernels can overlap:
the GPU's busy time is the union of the kernels' intervals, at most their sum. L2 is not flushed between kernels,
so they run a little faster than in `nsa bench`. The step itself is also timed as the benchmark times it (CUDA
events, L2 flushed): what it takes beyond the busy time is the GPU waiting for the host (synchronisations,
launches). With `gaps`, the profiler also traces the host, and each gap in which no kernel ran is listed with
what the host was doing before the next kernel's launch (its open CPU ops, the CUDA runtime calls in the gap):
where a short sequence's step goes. docs/performance.md keeps the tables.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
import warnings

import torch

from nsa.config import NSAConfig


def kernel_times(events, steps: int) -> list[tuple[str, float]]:
    """(kernel name, ms per step) of the CUDA events of a profile of `steps` steps, slowest first."""
    totals = collections.Counter()
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1000.0 / steps
    return totals.most_common()


def busy_ms(events, steps: int) -> float:
    """The GPU's busy time per step: the length of the union of the CUDA events' intervals (kernels of two streams
    overlap), in ms."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    total, covered_to = 0.0, float("-inf")
    for start, end in spans:
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total / 1000.0 / steps


# Gaps between kernels shorter than this are launch latency, not the host holding the GPU up.
MIN_GAP_US = 15.0


@dataclasses.dataclass(frozen=True)
class HostGap:
    """The GPU idle between two kernels (no kernel running), and what the host was doing before the second one's launch:
    the CPU ops open at the launch (outermost first) and the CUDA runtime calls that overlap the gap up to that
    launch (us, longest first)."""

    gap_us: float
    after: str
    before: str
    host_ops: tuple[str, ...]
    runtime_calls: tuple[tuple[str, float], ...]


def host_gaps(trace_events: list[dict], min_us: float = MIN_GAP_US) -> list[HostGap]:
    """The gaps of at least `min_us` in which no kernel ran (on any stream), between the kernel that ended last
    and the next one to start, in a Chrome trace's events (torch.profiler with CPU and CUDA activities), longest
    first. Kernels are matched to their launches by correlation id."""
    kernels = sorted((e for e in trace_events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    runtime = [e for e in trace_events if e.get("cat") == "cuda_runtime"]
    launches = {e["args"]["correlation"]: e for e in runtime if "correlation" in e.get("args", {})}
    cpu_ops = [e for e in trace_events if e.get("cat") == "cpu_op" and "dur" in e]
    gaps = []
    last = None  # of the kernels started so far, the one that ends last
    for kernel in kernels:
        idle_from = last["ts"] + last["dur"] if last else kernel["ts"]
        if kernel["ts"] - idle_from >= min_us:
            launch = launches.get(kernel.get("args", {}).get("correlation", -1), kernel)
            open_ops = sorted((op for op in cpu_ops if op["ts"] <= launch["ts"] <= op["ts"] + op["dur"]),
                              key=lambda op: op["ts"])
            calls = collections.Counter()
            for call in runtime:  # a sync that the gap ends started before it
                if call["ts"] + call.get("dur", 0.0) >= idle_from and call["ts"] <= launch["ts"]:
                    calls[call["name"]] += call.get("dur", 0.0)
            gaps.append(HostGap(kernel["ts"] - idle_from, last["name"], kernel["name"],
                                tuple(op["name"] for op in open_ops), tuple(calls.most_common())))
        if last is None or kernel["ts"] + kernel["dur"] > idle_from:
            last = kernel
    return sorted(gaps, key=lambda g: -g.gap_us)


def format_gaps(gaps: list[HostGap], steps: int, most: int = 10) -> str:
    """Their sum per step, then the `most` longest: gap, the kernels around it, the host's innermost ops."""
    if not gaps:
        return f"no gaps between kernels (over {MIN_GAP_US:.0f} us): the GPU did not wait for the host"
    lines = [f"{sum(g.gap_us for g in gaps) / steps / 1000:.3f} ms per step in {len(gaps) / max(steps, 1):.1f} gaps "
             "between kernels (the profiler's host tracing slows the host: upper bounds); the longest:"]
    for g in gaps[:most]:
        calls = ", ".join(f"{name} {us:.0f} us" for name, us in g.runtime_calls[:2])
        lines.append(f"{g.gap_us:9.1f} us  {g.after[:40]} -> {g.before[:40]}")
        lines.append(f"{'':13}host: {' > '.join(op[:40] for op in g.host_ops[-3:]) or '-'}"
                     + (f"; {calls}" if calls else ""))
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class StepProfile:
    """One profiled step: `kernels` as from `kernel_times`, the step's median time `step_ms`, and with host
    tracing the `gaps` between kernels (`host_gaps`, over all profiled steps)."""

    kernels: list[tuple[str, float]]
    step_ms: float
    gaps: list[HostGap] = dataclasses.field(default_factory=list)
    busy_ms: float | None = None  # the union of the kernels' intervals per step; their sum when not given

    @property
    def kernel_ms(self) -> float:
        return sum(ms for _, ms in self.kernels)

    @property
    def gpu_busy_ms(self) -> float:
        return self.kernel_ms if self.busy_ms is None else self.busy_ms

    @property
    def host_wait_ms(self) -> float:
        """The step's time in which no kernel ran: the GPU waiting for the host (about: the kernels ran without
        L2 flushes, the step with)."""
        return max(0.0, self.step_ms - self.gpu_busy_ms)


def profile_attention(*, seqlen: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype=torch.bfloat16,
                      backward: bool = True, steps: int = 3, config: NSAConfig | None = None,
                      device="cuda", gaps: bool = False) -> StepProfile:
    """`kernel_times` of `nsa.kernels.nsa_attention` (B=1, random inputs, seed 0) on a CUDA `device`, the
    median of `steps` timed steps, and with `gaps` the host's trace read by `host_gaps`."""
    from torch.profiler import ProfilerActivity, profile

    from nsa.kernels import nsa_attention
    from nsa.problems import random_inputs
    from nsa.timing import TimerSettings, time_call
    if torch.device(device).type != "cuda":
        raise ValueError(f"nsa profile times CUDA kernels; {device!r} is not a CUDA device")
    config = config or NSAConfig()
    x = random_inputs(config, seqlen=seqlen, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                      dtype=dtype, device=device, requires_grad=backward, seed=0)
    x.pop("cu_seqlens")
    leaves = [t for t in x.values() if t is not None and t.requires_grad]
    grad_out = torch.randn(1, seqlen, num_heads, head_dim, generator=torch.Generator().manual_seed(1)).to(
        device=device, dtype=dtype)

    def step():
        o = nsa_attention(**x, config=config)
        if backward:
            torch.autograd.grad(o, leaves, grad_out)

    for _ in range(2):  # compiles, autotuned nothing: the config cache decides
        step()
    torch.cuda.synchronize(device)
    activities = [ProfilerActivity.CUDA] + ([ProfilerActivity.CPU] if gaps else [])
    with warnings.catch_warnings():  # one recording cycle: torch's note that a cycle's end clears events is noise
        warnings.filterwarnings("ignore", message=".*Profiler clears events")
        with profile(activities=activities) as prof:
            for _ in range(steps):
                step()
            torch.cuda.synchronize(device)
    found = []
    if gaps:
        fd, path = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(path)
            with open(path) as f:
                found = host_gaps(json.load(f)["traceEvents"])
        finally:
            os.remove(path)
    timing = time_call(step, device, TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=steps, max_reps=steps))
    events = prof.events()
    return StepProfile(kernel_times(events, steps), timing.median_ms, found, busy_ms(events, steps))


def step_tflop(*, seqlen: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: str = "bfloat16",
               backward: bool = True, config: NSAConfig | None = None) -> float:
    """The useful work of one profiled step in TFLOP, as the benchmark counts it (`nsa.work.op_work`)."""
    from nsa.suites.problem import Problem
    from nsa.work import op_work
    config = config or NSAConfig()
    ops = ("fwd", "bwd") if backward else ("fwd",)
    return sum(op_work(Problem(op, seqlen, 1, num_heads, num_kv_heads, head_dim, head_dim, config, dtype),
                       config).flops for op in ops) / 1e12


def _against_ceiling(work, ms: float, ceilings: dict | None) -> str:
    """A kernel's work, its rate and the share of its ceiling (`nsa.work.KernelWork`; ceilings as
    `nsa.timing.measure_ceilings` returns them), as three columns of WORK_COLUMNS characters."""
    rate = work.amount / (ms * 1e-3) / 1e12  # per second, in units of 1e12
    if work.bound == "matmul":
        amount, speed = f"{work.amount / 1e12:.2f} TFLOP", f"{rate:.0f} TFLOP/s"
        share = f"{100 * rate / ceilings['matmul_tflops']:.0f}% of matmul" if ceilings else ""
    else:
        amount, speed = f"{work.amount / 1e9:.1f} GB", f"{rate:.1f} TB/s"
        share = "gathered" if work.bound == "gather" else (
            f"{100e3 * rate / ceilings['copy_gbps']:.0f}% of copy" if ceilings else "")
    return f"{amount:>14} {speed:>14} {share:>14}"


WORK_COLUMNS = 14 * 3 + 2


def format_table(times: list[tuple[str, float]], most: int = 20, work: dict | None = None,
                 ceilings: dict | None = None) -> str:
    """The `most` slowest kernels: ms per step, share of the total, name (shortened); then the total. With `work`
    (`nsa.work.kernel_work`), each modelled kernel's work, rate and share of its ceiling too (`ceilings`, the
    card's measured matmul and copy rates; "gathered" for the selected blocks' gathers, which have none)."""
    total = sum(ms for _, ms in times)
    blank = " " * (WORK_COLUMNS + 1) if work else ""  # rows without a model (and the totals) leave them empty
    head = f"{'work':>14} {'rate':>14} {'of its ceiling':>14} " if work else ""
    lines = [f"{'ms/step':>10} {'share':>6}  {head}kernel"]
    for name, ms in times[:most]:
        cols = _against_ceiling(work[name], ms, ceilings) + " " if work and name in work and ms > 0 else blank
        lines.append(f"{ms:10.3f} {100 * ms / total if total else 0:5.1f}%  {cols}{name[:100]}")
    if len(times) > most:
        rest = sum(ms for _, ms in times[most:])
        lines.append(f"{rest:10.3f} {100 * rest / total if total else 0:5.1f}%  {blank}"
                     f"({len(times) - most} more kernels)")
    lines.append(f"{total:10.3f} 100.0%  {blank}total GPU time per step")
    return "\n".join(lines)
