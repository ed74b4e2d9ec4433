"""The benchmark runner on a CPU with fake providers: skip, check, fail, error, time, CSV, resume; and the
pieces it stands on (provider registry, real baselines on CPU, work counts, timers)."""

import dataclasses

import pandas as pd
import pytest
import torch

from nsa import NSAConfig
from nsa.bench import BenchSettings, open_store, run_suite
from nsa.checking import check
from nsa.reports.render import load, render_plots
from nsa.results import COLUMNS, ResultsStore
from nsa.suites import PROVIDERS, Prepared, Problem, Provider, Suite, get_providers, make_inputs, register
from nsa.suites.baselines import mean_pooled
from nsa.suites.dense import dense_attention
from nsa.timing import TimerSettings, measure_ceilings, time_call
from nsa.work import keys_per_query, op_work

CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=3, window=16)
SHAPE = dict(num_heads=4, num_kv_heads=2, head_dim=8, head_dim_v=8, dtype="float32", config=CFG)
TINY = Suite("tiny", "fake", (Problem(op="fwd", seqlen=40, **SHAPE), Problem(op="bwd", seqlen=33, **SHAPE),
                              Problem(op="decode", seqlen=20, batch=2, **SHAPE)))
FAST = BenchSettings(device="cpu", timer=TimerSettings(warmup_ms=0, rep_ms=0, min_reps=2, max_reps=2))


class Dense(Provider):
    """Dense causal attention by the oracle itself: always right, cheap."""

    baseline = True
    grad_names = ("q", "k", "v")

    def __init__(self, name="fake-dense", scale=1.0):
        self.name, self.scale, self.prepared = name, scale, 0

    def config(self, problem):
        return None

    def prepare(self, problem, x):
        self.prepared += 1
        return Prepared(lambda: dense_attention(x["q"], x["k"], x["v"]) * self.scale, f"fake x{self.scale}")

    def reference(self, problem, x):
        return dense_attention(x["q"], x["k"], x["v"])


class Raising(Dense):
    def prepare(self, problem, x):
        raise RuntimeError("kernel exploded")


class Missing(Dense):
    def unavailable(self, device):
        return "fake package not installed"


class Interrupted(Dense):
    """Right, but the run is interrupted (Ctrl-C) when it reaches problem `at`."""

    def __init__(self, at):
        super().__init__("fake-dense")
        self.at = at

    def prepare(self, problem, x):
        if problem.key == self.at:
            raise KeyboardInterrupt
        return super().prepare(problem, x)


def run(tmp_path, providers, suite=TINY):
    store = open_store(tmp_path / "results", "cpu")
    run_suite(suite, providers, store, FAST, progress=False)
    return pd.read_csv(store.csv_path)


def test_right_wrong_raising_and_missing_providers(tmp_path):
    table = run(tmp_path, [Dense(), Dense("fake-wrong", scale=1.5), Raising("fake-raising"), Missing("fake-gone")])
    by_impl = {impl: rows for impl, rows in table.groupby("impl")}
    assert set(by_impl["fake-dense"]["verdict"]) == {"pass"} and by_impl["fake-dense"]["ms"].gt(0).all()
    wrong = by_impl["fake-wrong"]
    assert set(wrong["verdict"]) == {"fail"} and wrong["ms"].isna().all()
    assert wrong["error"].str.contains("relative error").all() and wrong["max_rel_err"].gt(0.4).all()
    assert set(by_impl["fake-raising"]["verdict"]) == {"error"}
    assert by_impl["fake-raising"]["error"].str.contains("kernel exploded").all()
    assert set(by_impl["fake-gone"]["verdict"]) == {"skip"}
    assert (by_impl["fake-gone"]["error"] == "fake package not installed").all()


class Contender(Dense):
    baseline = False


def test_a_wrong_provider_is_never_plotted(tmp_path):
    run(tmp_path, [Dense(), Contender("fake-wrong", scale=1.5), Contender("fake-ours")])
    table, _ = load(tmp_path / "results")
    plots = render_plots(table, tmp_path / "results")
    series = [s for p in plots for s in p["series"]]
    assert series and not any("fake-wrong" in s for s in series)
    assert any(s.startswith("fake-ours vs fake-dense") for s in series)


def test_csv_has_the_columns_and_full_precision(tmp_path):
    table = run(tmp_path, [Dense()])
    required = {"gpu", "suite", "impl", "op", "T", "batch", "Hq", "Hkv", "D", "ms", "ms_p20", "ms_p80", "tflops",
                "frac_matmul_peak", "frac_copy_bw", "peak_mem_gib", "verdict", "error", "impl_detail",
                "speedup_vs_fake-dense"}
    assert required <= set(table.columns) and list(table.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert (table["speedup_vs_fake-dense"] == 1.0).all()
    assert (table["impl_detail"] == "fake x1.0").all() and (table["gpu"].str.startswith("cpu")).all()
    store = ResultsStore(tmp_path / "results")
    assert [r["ms"] for r in store.rows] == table["ms"].tolist()  # floats survive the CSV bit for bit
    text = (tmp_path / "results" / "results.csv").read_text()
    assert repr(float(table["tflops"].iloc[0])) in text


def test_an_interrupted_run_resumes_without_remeasuring(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, [Interrupted(at=TINY.problems[1].key)])
    first = pd.read_csv(tmp_path / "results" / "results.csv")
    assert first["problem"].tolist() == [TINY.problems[0].key]
    again = Dense()
    table = run(tmp_path, [again])
    assert again.prepared == 2 * 2  # two problems left, each prepared by its check and its timing
    assert table["problem"].tolist() == [p.key for p in TINY.problems]
    assert table["ms"].iloc[0] == first["ms"].iloc[0]


def test_results_of_another_device_are_not_mixed(tmp_path):
    store = ResultsStore(tmp_path)
    store.write_environment({"gpu": "NVIDIA H100 80GB HBM3"})
    with pytest.raises(ValueError, match="H100"):
        open_store(tmp_path, "cpu")


def test_registry(monkeypatch):
    names = [p.name for p in get_providers()]
    assert names[:6] == ["nsa", "reference", "sdpa-flash", "sdpa-cudnn", "flash-attn", "fla-nsa"]
    assert {p.name for p in get_providers() if p.baseline} == {"sdpa-flash", "sdpa-cudnn", "flash-attn", "fla-nsa"}
    monkeypatch.setitem(PROVIDERS, "fake-dense", None)
    fake = register(Dense())
    assert get_providers(["fake-dense"]) == [fake]
    with pytest.raises(KeyError, match="known"):
        get_providers(["no-such"])
    for name in ("sdpa-cudnn", "flash-attn", "fla-nsa"):
        assert "CUDA" in PROVIDERS[name].unavailable("cpu")


def test_fla_nsa_without_flash_attn_is_unavailable(monkeypatch):
    """fla-core 0.6.0 imports without flash-attn but then calls None for its sliding window: say so up front."""
    import importlib
    import types
    real_import, real_find_spec = importlib.import_module, importlib.util.find_spec
    monkeypatch.setattr(importlib, "import_module", lambda name, *a: types.SimpleNamespace(parallel_nsa=print)
                        if name == "fla.ops.nsa" else real_import(name, *a))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn"
                        else real_find_spec(name, *a))
    assert "flash-attn package" in PROVIDERS["fla-nsa"].unavailable("cuda")


@pytest.mark.parametrize("problem", TINY.problems, ids=lambda p: p.op)
def test_sdpa_flash_on_cpu_passes_its_check(problem):
    provider = PROVIDERS["sdpa-flash"]
    assert provider.unavailable("cpu") is None
    verdict = check(provider, problem, device="cpu")
    assert verdict.passed, verdict.summary
    detail = provider.prepare(problem, make_inputs(problem, device="cpu", seed=0)).detail
    assert detail.startswith(f"torch {torch.__version__} SDPA FLASH_ATTENTION") and "GQA via enable_gqa" in detail


def test_reference_checks_against_itself_in_float64():
    verdict = check(PROVIDERS["reference"], TINY.problems[1], device="cpu")
    assert verdict.passed and "dk_cmp" in verdict.summary and "float64" in verdict.summary


def test_mean_pooling_like_fla():
    k = torch.arange(2 * 10 * 1 * 1, dtype=torch.float64).reshape(2, 10, 1, 1)
    cfg = NSAConfig(cmp_block=4, cmp_stride=4, slc_block=4, slc_topn=3, window=4)
    assert mean_pooled(k, cfg)[0, :, 0, 0].tolist() == [1.5, 5.5]
    packed = mean_pooled(k[:1], cfg, torch.tensor([0, 3, 10], dtype=torch.int32))
    assert packed[0, :, 0, 0].tolist() == [4.5]  # the first sequence has no full block; the second one block


def test_work_counts_match_brute_force():
    cfg = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=3, window=10)
    for t in range(60):
        compressed = sum(1 for i in range(cfg.num_cmp_blocks(60)) if i * 4 + 8 - 1 <= t)
        current = t // 8
        blocks = list(range(current + 1))[-3:] if current + 1 > 3 else list(range(current + 1))
        selected = sum(min(8, t + 1 - j * 8) for j in blocks)
        assert keys_per_query(torch.tensor([t]).numpy(), cfg)[0] == compressed + selected + min(10, t + 1)
    dense = dataclasses.replace(TINY.problems[0], seqlen=100)
    assert op_work(dense, None).flops == 2 * 16 * 4 * 100 * 101 / 2


def test_decode_traffic_bound_is_issue_7s():
    problem = Problem(op="decode", seqlen=65536, batch=16)
    nsa, dense = op_work(problem, problem.config), op_work(problem, None)
    assert dense.bytes / nsa.bytes == pytest.approx(11.6, abs=0.05)


def test_cpu_timer_and_ceilings():
    timing = time_call(lambda: torch.ones(100).sum(), "cpu", TimerSettings(0, 1, 3, 50))
    assert 3 <= timing.reps <= 50 and 0 < timing.p20_ms <= timing.median_ms <= timing.p80_ms
    ceilings = measure_ceilings("cpu")
    assert ceilings["matmul_tflops"] > 0 and ceilings["copy_gbps"] > 0


@pytest.mark.parametrize("op", ["fwd", "decode"])
def test_nsa_provider_calls_the_kernels_once_they_exist(monkeypatch, op):
    from nsa import kernels
    from nsa.bench import measure
    provider = PROVIDERS["nsa"]
    real = {name: getattr(kernels, name) for name in ("nsa_attention", "nsa_decode")}
    for name in real:
        monkeypatch.delattr(kernels, name)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    problem = next(p for p in TINY.problems if p.op == op)
    assert "does not exist yet" in measure(TINY, problem, provider, FAST, None)["error"]
    # back in place: the row must say it ran nsa.kernels, in the interpreter, and pass the check
    for name, fn in real.items():
        monkeypatch.setattr(kernels, name, fn, raising=False)
    row = measure(TINY, problem, provider, FAST, None)
    assert row["verdict"] == "pass" and row["ms"] > 0, row["error"]
    assert row["impl_detail"].startswith("nsa.kernels.nsa_") and "interpreter" in row["impl_detail"]
