"""`nsa profile`: where the time of one `nsa_attention` step goes on this GPU, kernel by kernel.

The step is the one the benchmarks time (the kernels read the tuned config cache as `nsa_attention` does):
forward, and with "bwd" the backward from a fixed random output gradient. torch.profiler records the CUDA
kernels of a few steps after two warm-up steps; each kernel's GPU time is summed over its launches and divided
by the steps. Kernels overlap little (one stream), so the times add up to about the step's GPU time; L2 is not
flushed between kernels, so they run a little faster than in `nsa bench`. The step itself is also timed as the
benchmark times it (CUDA events, L2 flushed): what it takes beyond the kernels' sum is the GPU waiting for the
host (synchronisations, launches). docs/performance.md keeps the tables.
"""

from __future__ import annotations

import collections
import dataclasses

import torch

from nsa.config import NSAConfig


def kernel_times(events, steps: int) -> list[tuple[str, float]]:
    """(kernel name, ms per step) of the CUDA events of a profile of `steps` steps, slowest first."""
    totals = collections.Counter()
    for event in events:
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1000.0 / steps
    return totals.most_common()


@dataclasses.dataclass(frozen=True)
class StepProfile:
    """One profiled step: `kernels` as from `kernel_times`, and the step's median time `step_ms`."""

    kernels: list[tuple[str, float]]
    step_ms: float

    @property
    def kernel_ms(self) -> float:
        return sum(ms for _, ms in self.kernels)

    @property
    def host_wait_ms(self) -> float:
        """The step's time not covered by kernels: the GPU waiting for the host (about: the kernels ran without
        L2 flushes, the step with)."""
        return max(0.0, self.step_ms - self.kernel_ms)


def profile_attention(*, seqlen: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype=torch.bfloat16,
                      backward: bool = True, steps: int = 3, config: NSAConfig | None = None,
                      device="cuda") -> StepProfile:
    """`kernel_times` of `nsa.kernels.nsa_attention` (B=1, random inputs, seed 0) on a CUDA `device`, and the
    median of `steps` timed steps."""
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
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
    timing = time_call(step, device, TimerSettings(warmup_ms=0.0, rep_ms=0.0, min_reps=steps, max_reps=steps))
    return StepProfile(kernel_times(prof.events(), steps), timing.median_ms)


def step_tflop(*, seqlen: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype: str = "bfloat16",
               backward: bool = True, config: NSAConfig | None = None) -> float:
    """The useful work of one profiled step in TFLOP, as the benchmark counts it (`nsa.work.op_work`)."""
    from nsa.suites.problem import Problem
    from nsa.work import op_work
    config = config or NSAConfig()
    ops = ("fwd", "bwd") if backward else ("fwd",)
    return sum(op_work(Problem(op, seqlen, 1, num_heads, num_kv_heads, head_dim, head_dim, config, dtype),
                       config).flops for op in ops) / 1e12


def format_table(times: list[tuple[str, float]], most: int = 20) -> str:
    """The `most` slowest kernels: ms per step, share of the total, name (shortened); then the total."""
    total = sum(ms for _, ms in times)
    lines = [f"{'ms/step':>10} {'share':>6}  kernel"]
    for name, ms in times[:most]:
        lines.append(f"{ms:10.3f} {100 * ms / total if total else 0:5.1f}%  {name[:100]}")
    if len(times) > most:
        rest = sum(ms for _, ms in times[most:])
        lines.append(f"{rest:10.3f} {100 * rest / total if total else 0:5.1f}%  ({len(times) - most} more kernels)")
    lines.append(f"{total:10.3f} 100.0%  total GPU time per step")
    return "\n".join(lines)
