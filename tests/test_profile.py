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


def test_kernel_work_is_the_documented_count_at_64k():
    """The per-kernel work model at the paper shape, 64k tokens: the counts docs/performance.md's tables use."""
    from nsa import NSAConfig
    from nsa.work import kernel_work
    work = kernel_work(seqlen=65536, num_heads=64, num_kv_heads=4, head_dim=128, head_dim_v=128,
                       config=NSAConfig(), itemsize=2)
    tera = {name: round(w.amount / 1e12, 2) for name, w in work.items() if w.bound == "matmul"}
    assert tera == {"compressed_attention_fwd_kernel": 4.39, "select_blocks_fwd_kernel": 2.2,
                    "compressed_attention_bwd_dkdv_kernel": 8.79, "compressed_attention_bwd_dq_kernel": 6.59,
                    "window_attention_fwd_kernel": 1.1, "window_attention_bwd_dkdv_kernel": 2.19,
                    "window_attention_bwd_dq_kernel": 1.64, "selected_attention_bwd_dkdv_kernel": 4.37,
                    "selected_attention_fwd_inverted_kernel": 2.18, "selected_attention_bwd_dq_inverted_kernel": 3.27}
    # Whole blocks of 64 tokens of K and V (bf16, 2 x 128 dims, 32 KB), 16 per (position, kv head) from t = 960.
    assert work["selected_attention_fwd_kernel"].amount == (65536 - 15 * 64) * 4 * 16 * 64 * 512 + sum(
        (t // 64 + 1) * 4 * 64 * 512 for t in range(15 * 64))
    assert work["selected_attention_bwd_dq_kernel"].bound == "gather"
    assert work["combine_fwd_kernel"].bound == "copy"


def test_table_holds_each_modelled_kernel_against_its_ceiling():
    from nsa.work import KernelWork
    work = {"mm": KernelWork("matmul", 4e12), "slc": KernelWork("gather", 1e11), "cp": KernelWork("copy", 4e9)}
    times = [("mm", 10.0), ("slc", 10.0), ("cp", 1.0), ("sort", 0.5)]
    table = format_table(times, work=work, ceilings=dict(matmul_tflops=800.0, copy_gbps=4000.0)).splitlines()
    assert "of its ceiling" in table[0]
    assert table[1].split() == ["10.000", "46.5%", "4.00", "TFLOP", "400", "TFLOP/s", "50%", "of", "matmul", "mm"]
    assert table[2].split()[2:] == ["100.0", "GB", "10.0", "TB/s", "gathered", "slc"]
    assert table[3].split()[2:] == ["4.0", "GB", "4.0", "TB/s", "100%", "of", "copy", "cp"]
    assert table[4].split() == ["0.500", "2.3%", "sort"]  # no model: the columns left empty, aligned
    assert table[4].index("sort") == table[1].index("mm")


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


def test_cli_prints_the_kernels_against_the_ceilings_and_writes_the_work(monkeypatch, capsys, tmp_path):
    """The command's glue, without a GPU: the profile and the ceilings stubbed, the table and CSV checked."""
    import nsa.bench
    import nsa.cli
    import nsa.profile
    import nsa.timing
    monkeypatch.setattr(nsa.cli, "_device_type", lambda device: "cuda")
    monkeypatch.setattr(nsa.bench, "device_name", lambda device: "Test GPU")
    monkeypatch.setattr(nsa.timing, "measure_ceilings", lambda device: dict(matmul_tflops=800.0, copy_gbps=4000.0))
    kernels = [("compressed_attention_fwd_kernel", 2.0), ("sort", 0.1)]
    monkeypatch.setattr(nsa.profile, "profile_attention", lambda **kw: StepProfile(kernels, step_ms=2.5))
    out = tmp_path / "kernels.csv"
    assert main(["profile", "--device", "cpu", "--seqlen", "4096", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "ceilings measured now: bf16 matmul 800 TFLOP/s" in printed and "% of matmul" in printed
    import pandas as pd
    table = pd.read_csv(out)
    assert list(table.columns) == ["kernel", "ms_per_step", "bound", "work"]
    assert table.bound.tolist()[0] == "matmul" and table.work.isna().tolist() == [False, True]


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
