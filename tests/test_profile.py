"""`nsa profile`: kernel times summed per name and per step, the table, and a plain refusal without a GPU."""

import types

import torch

from nsa.cli import main
from nsa.profile import StepProfile, busy_ms, format_gaps, format_table, host_gaps, kernel_times

CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU


def event(name, us, device_type=CUDA, start=0.0):
    return types.SimpleNamespace(name=name, device_time_total=us, device_type=device_type,
                                 time_range=types.SimpleNamespace(start=start, end=start + us))


def test_kernel_times_sum_launches_per_step_and_skip_host_events():
    events = [event("dkdv", 3000), event("fwd", 1000), event("dkdv", 3000), event("aten::mm", 999, CPU)]
    assert kernel_times(events, steps=2) == [("dkdv", 3.0), ("fwd", 0.5)]


def test_table_lists_the_slowest_then_the_rest_and_the_total():
    times = [(f"k{i}", float(10 - i)) for i in range(5)]
    table = format_table(times, most=3).splitlines()
    assert table[1].split() == ["10.000", "25.0%", "k0"]
    assert "(2 more kernels)" in table[-2] and table[-1].split()[:2] == ["40.000", "100.0%"]


def test_step_time_beyond_the_kernels_is_host_wait():
    profiled = StepProfile([("dkdv", 3.0), ("fwd", 0.5)], step_ms=4.25)
    assert profiled.kernel_ms == 3.5 and profiled.host_wait_ms == 0.75
    assert StepProfile([("fwd", 2.0)], step_ms=1.9).host_wait_ms == 0.0  # L2 flushes make no negative wait


def test_busy_time_is_the_union_of_kernels_on_two_streams():
    """The backward's selected branch runs beside the others: overlapping kernels count once in the busy time,
    which the host wait is measured against."""
    events = [event("cmp", 3000, start=0), event("slc", 1000, start=500), event("slc", 1000, start=2500),
              event("win", 500, start=4000), event("aten::mm", 9000, CPU, start=0)]
    assert busy_ms(events, steps=1) == 4.0  # [0, 3500] and [4000, 4500]
    profiled = StepProfile(kernel_times(events, steps=1), step_ms=5.0, busy_ms=busy_ms(events, steps=1))
    assert profiled.kernel_ms == 5.5 and profiled.host_wait_ms == 1.0


def test_refuses_without_a_gpu(capsys):
    assert main(["profile", "--device", "cpu", "--seqlen", "1024"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_step_work_is_the_benchmarks_count():
    from nsa import NSAConfig
    from nsa.profile import step_tflop
    from nsa.suites.problem import Problem
    from nsa.work import op_work
    config = NSAConfig()
    fwd = op_work(Problem("fwd", 4096), config).flops
    bwd = op_work(Problem("bwd", 4096), config).flops
    assert step_tflop(seqlen=4096, num_heads=64, num_kv_heads=4, head_dim=128) == (fwd + bwd) / 1e12
    assert step_tflop(seqlen=4096, num_heads=64, num_kv_heads=4, head_dim=128, backward=False) == fwd / 1e12


def test_gaps_between_kernels_name_what_the_host_did():
    """Two gaps: one after a host sync (a runtime call in it, the next launch inside a CPU op), one too short."""
    trace = [
        dict(cat="kernel", name="combine_bwd", ts=0.0, dur=10.0, args=dict(correlation=1)),
        dict(cat="kernel", name="dkdv", ts=300.0, dur=50.0, args=dict(correlation=2)),
        dict(cat="kernel", name="reduce", ts=355.0, dur=5.0, args=dict(correlation=3)),
        dict(cat="cuda_runtime", name="cudaStreamSynchronize", ts=5.0, dur=20.0, args=dict(correlation=9)),
        dict(cat="cuda_runtime", name="cudaLaunchKernel", ts=280.0, dur=8.0, args=dict(correlation=2)),
        dict(cat="cuda_runtime", name="cudaLaunchKernel", ts=290.0, dur=8.0, args=dict(correlation=3)),
        dict(cat="cpu_op", name="NSAAttentionFunctionBackward", ts=0.0, dur=400.0),
        dict(cat="cpu_op", name="aten::arange", ts=270.0, dur=15.0),
        dict(cat="cpu_op", name="aten::sort", ts=100.0, dur=20.0),
        dict(cat="python_function", name="ignored", ts=0.0, dur=1000.0),
    ]
    gaps = host_gaps(trace)
    assert [(g.gap_us, g.after, g.before) for g in gaps] == [(290.0, "combine_bwd", "dkdv")]
    assert gaps[0].host_ops == ("NSAAttentionFunctionBackward", "aten::arange")
    assert gaps[0].runtime_calls == (("cudaStreamSynchronize", 20.0), ("cudaLaunchKernel", 8.0))
    text = format_gaps(gaps, steps=2).splitlines()
    assert text[0].startswith("0.145 ms per step in 0.5 gaps") and "combine_bwd -> dkdv" in text[1]
    assert "NSAAttentionFunctionBackward > aten::arange; cudaStreamSynchronize 20 us" in text[2]


def test_gaps_count_only_time_with_no_kernel_on_any_stream():
    """A kernel of the side stream inside a longer one of the main stream: the GPU idles from the end of the
    longer one, not of the one that started last."""
    trace = [dict(cat="kernel", name="compressed_dkdv", ts=0.0, dur=100.0, args=dict(correlation=1)),
             dict(cat="kernel", name="selected_dq", ts=10.0, dur=40.0, args=dict(correlation=2)),
             dict(cat="kernel", name="window_dq", ts=130.0, dur=10.0, args=dict(correlation=3)),
             dict(cat="kernel", name="add", ts=141.0, dur=10.0, args=dict(correlation=4))]
    gaps = host_gaps(trace)
    assert [(g.gap_us, g.after, g.before) for g in gaps] == [(30.0, "compressed_dkdv", "window_dq")]
    assert format_gaps([], steps=3) == "no gaps between kernels (over 15 us): the GPU did not wait for the host"
