"""The tuner on CPU (TRITON_INTERPRET=1): search, correctness gate, cache write/reload/lookup, resume, overrides."""

import dataclasses
import importlib
import json
import logging
from pathlib import Path

import pytest
import torch

from nsa import NSAConfig
from nsa.kernels import NSAParams, runtime
from nsa.kernels.combine import CombineParams
from nsa.tuner import cache, search, spaces

window_module = importlib.import_module("nsa.kernels.window_attention")
kernels_run = pytest.mark.skipif(not runtime.interpreting() and not torch.cuda.is_available(),
                                 reason="needs TRITON_INTERPRET=1 (CPU) or a GPU")
SMOKE_SHAPE = cache.Shape(128, 2, 16, 16, 16, 8, 16, 3, "float32")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No real user cache, env override or shipped file: each test sees only what it writes."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(cache.ENV_DIR, raising=False)
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "shipped")
    cache.clear_cache()
    yield
    cache.clear_cache()


def write_cache(root, entries, device="cpu-interpreter"):
    path = cache.config_path(device, root)
    cache.write_atomic(path, {"meta": {"device": device}, "entries": entries})
    return path


def combine_entry(block_r):
    return {"params": dataclasses.asdict(CombineParams(block_r=block_r, block_d=16, num_warps=4)), "ms": 1.0,
            "default_ms": 2.0}


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "nvidia-h100"), ("NVIDIA H100 SXM5 80GB", "nvidia-h100"), ("H100-SXM", "nvidia-h100"),
    ("NVIDIA H100", "nvidia-h100"), ("NVIDIA H100 PCIe", "nvidia-h100-pcie"), ("NVIDIA H200", "nvidia-h200"),
    ("NVIDIA H200 141GB HBM3e", "nvidia-h200"), ("cpu", "cpu-interpreter"), ("NVIDIA GH200 480GB", "nvidia-gh200"),
    ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090"),
])
def test_device_name_aliases(name, key):
    assert cache.normalize_device_name(name) == key


def test_device_key_cpu_and_config_path(tmp_path):
    assert cache.device_key("cpu") == "cpu-interpreter"
    assert cache.config_path("nvidia-h100", tmp_path) == tmp_path / "nvidia-h100.json"


def test_bucket_key_rounds_t_to_nearest_power_of_two():
    assert cache.t_bucket(128) == 128 and cache.t_bucket(100) == 128 and cache.t_bucket(6000) == 8192
    assert cache.bucket_key("window", SMOKE_SHAPE) == "window|T=128|G=2|Dk=16|Dv=16|l=16|d=8|ls=16|n=3|float32"


def test_search_space_default_first_and_named_pruning():
    config = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=3, window=32)
    cands, pruned = spaces.search_space("combine", SMOKE_SHAPE, config, 2, 1, interpreter=False,
                                        space=dict(block_r=[16, 32], block_d=[16, 32]))
    assert cands[0] == spaces.default_for("combine", SMOKE_SHAPE, config, 2, 1)
    assert {c.block_d for c in cands[1:]} == {16} and pruned == {"combine_covers_row": 2}
    assert all(reason for _, reason, _ in spaces.PREDICATES)
    gpu, gpu_pruned = spaces.search_space("selected", SMOKE_SHAPE, config, 2, 1, interpreter=False)
    assert gpu_pruned.get("block_n_fits_selection_block") and all(c.fwd_block_n <= 16 for c in gpu)
    with pytest.raises(ValueError, match="lacks"):
        spaces.search_space("combine", SMOKE_SHAPE, config, 2, 1, space=dict(nope=[1]))


def test_selection_score_tiles_that_spill_are_pruned_on_a_gpu(monkeypatch):
    """The selection's fp32 score tile (rows x 16 blocks x 4 compressed blocks at the paper config) over 192 per
    thread: 512 rows on 4 warps and 256 on 2 are pruned, 512 on 8 and 256 on 4 kept; off GPU nothing is."""
    paper = cache.Shape(65536, 16, 128, 128, 32, 16, 64, 16, "bfloat16")
    config = NSAConfig()
    space = dict(block_m=[16, 32], num_warps=[2, 4, 8])
    monkeypatch.setattr(spaces, "device_properties", lambda device: object())
    cands, pruned = spaces.search_space("selection", paper, config, 64, 4, interpreter=False, space=space)
    assert {(c.block_m * c.block_h, c.num_warps) for c in cands} == {(256, 4), (256, 8), (512, 8)}
    assert pruned == {"registers": 3}
    monkeypatch.setattr(spaces, "device_properties", lambda device: None)
    assert len(spaces.search_space("selection", paper, config, 64, 4, interpreter=False, space=space)[0]) == 6


@pytest.mark.parametrize("seqlen,kept", [(1024, {64, 256, 1024, 2048, 4096}), (4096, {256, 1024, 2048, 4096}),
                                          (65536, {1024, 2048, 4096})])
def test_short_dkdv_chunks_only_for_short_sequences(seqlen, kept):
    """The selected backward's list chunks below min(1024, T/16) are pruned (2048 is the paper's default)."""
    shape = cache.Shape(seqlen, 16, 128, 128, 32, 16, 64, 16, "bfloat16")
    cands, pruned = spaces.search_space("selected_bwd", shape, NSAConfig(), 64, 4, interpreter=False,
                                        space=dict(dkdv_chunk=[64, 256, 1024, 4096]))
    assert {c.dkdv_chunk for c in cands} == kept
    assert pruned.get("dkdv_chunk_fits_length", 0) == 5 - len(kept)


def test_close_candidates_are_retimed_in_interleaved_rounds():
    """The candidates within 5% of the fastest are timed again, round by round in turn, and each takes the
    median of its rounds: here the second-fastest by its first timing wins. Others keep their first timing."""
    outcomes = [({"a": 0}, 10.0, None), ({"a": 1}, 9.8, None), ({"a": 2}, 9.9, None), ({"a": 3}, 12.0, None),
                ({"a": 4}, None, ("wrong", "mismatch"))]
    rounds = {0: [10.0, 10.1, 9.9], 1: [10.5, 10.4, 10.6], 2: [9.7, 9.6, 9.8]}
    calls = []

    def time_candidate(i):
        calls.append(i)
        return rounds[i][sum(c == i for c in calls) - 1]

    confirmed, n = search._confirm(outcomes, time_candidate, search.Budget(None))
    assert n == 3 and calls == [1, 2, 0] * search.CONFIRM_ROUNDS
    assert [ms for _, ms, _ in confirmed] == [10.0, 10.5, 9.7, 12.0, None]
    row, entry = search._summarize("k", confirmed, {}, "cuda-graph")
    assert entry["params"] == {"a": 2} and entry["default_ms"] == 10.0 and entry["timed_as"] == "cuda-graph"
    # Unchanged: no timer (off a GPU), a single close candidate, a spent budget, a failing round.
    assert search._confirm(outcomes, None, search.Budget(None)) == (outcomes, 0)
    assert search._confirm(outcomes[1:2] + outcomes[3:], time_candidate, search.Budget(None)) == (
        outcomes[1:2] + outcomes[3:], 0)
    assert search._confirm(outcomes, time_candidate, search.Budget(0.0)) == (outcomes, 0)

    def failing(i):
        raise RuntimeError("out of memory")
    assert search._confirm(outcomes, failing, search.Budget(None)) == (outcomes, 0)


def test_retimer_sets_the_problem_up_once_and_only_on_a_gpu(monkeypatch):
    from nsa.timing import Timing
    built, timed = [], []

    class Case:
        cuda_graph = False

        def run_time(self, params):
            timed.append(params)

    monkeypatch.setattr(search, "build_case", lambda family, problem, device: built.append(family) or Case())
    monkeypatch.setattr(search, "time_call", lambda fn, device, settings, cuda_graph: fn() or Timing(
        float(len(timed)), 0.0, 0.0, 1, "fake"))
    assert search._retimer("window", "problem", ["p0", "p1"], "cpu") is None
    time_candidate = search._retimer("window", "problem", ["p0", "p1"], "cuda")
    assert built == [] and [time_candidate(1), time_candidate(0)] == [1.0, 2.0]
    assert built == ["window"] and timed == ["p1", "p0"]
    search._retimer("window", "problem", ["p0"], "cuda", Case())(0)  # a bucket's own case is reused
    assert built == ["window"]


def test_position_splits_only_with_several_splits():
    """With one dk/dv split both ways of cutting the runs are one kernel's work: that candidate is kept once."""
    shape = cache.Shape(65536, 16, 128, 128, 32, 16, 64, 16, "bfloat16")
    cands, pruned = spaces.search_space("compression_bwd", shape, NSAConfig(), 64, 4, interpreter=False,
                                        space=dict(dkdv_splits=[1, 8], dkdv_position_splits=[False, True]))
    assert {(c.dkdv_splits, c.dkdv_position_splits) for c in cands} == {(1, False), (8, False), (8, True)}
    assert pruned == {"position_splits_once": 1}


@kernels_run
def test_tune_smoke_tiny_space_writes_checked_entries(tmp_path):
    result = search.tune("smoke", families=["window", "combine"], device="cpu", out=tmp_path, progress=False)
    data = json.loads((tmp_path / "cpu-interpreter.json").read_text())
    assert list(data) == ["meta", "entries"]
    meta = data["meta"]
    for field in ("device", "device_name", "compute_capability", "sm_count", "triton", "torch", "git_sha", "date",
                  "search_space"):
        assert field in meta
    assert meta["device"] == "cpu-interpreter" and meta["search_space"] == spaces.space_hash()
    keys = {f"{family}|T=128|G=2|Dk=16|Dv=16|l=16|d=8|ls=16|n=3|float32" for family in ("window", "combine")}
    assert set(data["entries"]) == keys and {row["key"] for row in result["done"]} == keys
    for entry in data["entries"].values():
        assert entry["ms"] > 0 and entry["default_ms"] >= entry["ms"] and entry["rejected"] == {}


@kernels_run
def test_long_problems_checked_shortened_timed_in_full():
    from nsa.suites import get_suite
    problem = get_suite("smoke").problems[0]
    case = search.build_case("window", problem, "cpu", max_check_tokens=64)
    params = spaces.default_for("window", search.problem_shape(problem), problem.config, 2, 1)
    assert case.run_check(params).shape[1] == 64 and case.run_time(params).shape[1] == 128
    assert case.check(case.run_check(params)) is None


def test_short_training_problems_and_decode_are_graph_timed(monkeypatch, caplog):
    from nsa.suites import get_suite
    from nsa.timing import Timing
    paper = {(p.op, p.seqlen, p.batch): p for p in get_suite("paper").problems}
    assert search.graph_timed("window", paper["fwd", 1024, 1])
    assert search.graph_timed("window_bwd", paper["bwd", 16384, 1])
    assert not search.graph_timed("window_bwd", paper["bwd", 32768, 1])
    assert search.graph_timed("decode", paper["decode", 131072, 16])
    assert search.timing_method("window", paper["fwd", 1024, 1], "cpu") == "eager"  # the interpreter: all eager
    assert cache.entry_timing("decode", {}) == "cuda-graph" and cache.entry_timing("window", {}) == "eager"
    case = search.Case(run_check=None, check=None, run_time=lambda params: None, cuda_graph=True)
    monkeypatch.setattr(search, "time_call", lambda fn, device, settings, cuda_graph: Timing(
        1.0, 1.0, 1.0, 5, "cuda events, eager (CUDA graph capture failed: RuntimeError: sync)"))
    with caplog.at_level("WARNING", logger="nsa.tuner"):
        assert search._time_candidate(case, "p0", "cuda") == 1.0
    assert "p0 timed eagerly" in caplog.text and "capture failed" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", list(cache.ALL_FAMILIES))
def test_every_family_of_a_short_problem_is_captured_for_timing(family):
    """On a GPU the tuner times short problems as CUDA-graph replays: each family's timed call (a `_bwd` family's
    forward and backward) must capture, else its candidates would be timed eagerly, with the host's time."""
    from nsa.suites import get_suite
    from nsa.timing import TimerSettings, time_call
    problem = next(p for p in get_suite("smoke").problems if (p.op == "decode") == (family in cache.DECODE_FAMILIES))
    assert search.graph_timed(family, problem)
    case = search.build_case(family, problem, "cuda")
    heads = (problem.num_heads, problem.num_kv_heads)
    params = spaces.default_for(family, search.problem_shape(problem), problem.config, *heads)
    quick = TimerSettings(warmup_ms=1.0, rep_ms=5.0, min_reps=3, max_reps=20)
    timing = time_call(lambda: case.run_time(params), "cuda", quick, cuda_graph=case.cuda_graph)
    assert timing.timer.startswith("cuda events over CUDA-graph replays"), timing.timer


@kernels_run
def test_wrong_candidate_rejected_and_never_cached(tmp_path, monkeypatch):
    real = window_module.window_attention

    def wrong_for_wide_tiles(q, k, v, config, **kw):
        out = real(q, k, v, config, **kw)
        return out + 1.0 if kw["params"].fwd_block_n == 64 else out  # the interpreter default is 64

    monkeypatch.setattr(window_module, "window_attention", wrong_for_wide_tiles)
    result = search.tune("smoke", families=["window"], device="cpu", out=tmp_path, progress=False)
    (row,) = result["done"]
    assert row["rejected"] == {"wrong": 1} and "relative error" in row["errors"][0]
    entry = json.loads((tmp_path / "cpu-interpreter.json").read_text())["entries"][row["key"]]
    assert entry["params"]["fwd_block_n"] == 32 and entry["default_ms"] is None

    monkeypatch.setattr(window_module, "window_attention", lambda *a, **kw: real(*a, **kw) * 2)
    out2 = tmp_path / "all-wrong"
    result = search.tune("smoke", families=["window"], device="cpu", out=out2, progress=False)
    assert result["done"][0]["rejected"] == {"wrong": 2} and "ms" not in result["done"][0]
    assert not (out2 / "cpu-interpreter.json").exists()


@kernels_run
def test_resume_after_interruption(tmp_path, monkeypatch):
    real = search._evaluate

    def interrupt_on_combine(case, params, device, timeout_s):
        if isinstance(params, CombineParams):
            raise KeyboardInterrupt
        return real(case, params, device, timeout_s)

    monkeypatch.setattr(search, "_evaluate", interrupt_on_combine)
    with pytest.raises(KeyboardInterrupt):
        search.tune("smoke", families=["window", "combine"], device="cpu", out=tmp_path, progress=False)
    path = tmp_path / "cpu-interpreter.json"
    first = json.loads(path.read_text())["entries"]
    assert [k.split("|")[0] for k in first] == ["window"]
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp file behind

    monkeypatch.setattr(search, "_evaluate", real)
    result = search.tune("smoke", families=["window", "combine"], device="cpu", out=tmp_path, progress=False)
    assert [k.split("|")[0] for k in result["skipped"]] == ["window"]
    assert [row["key"].split("|")[0] for row in result["done"]] == ["combine"]
    entries = json.loads(path.read_text())["entries"]
    assert set(entries) == set(first) | {result["done"][0]["key"]}
    assert entries[next(iter(first))] == first[next(iter(first))]


def interrupt_then_resume(tmp_path, monkeypatch, **tune_kw):
    """Stop a window tune into tmp_path at its second candidate (KeyboardInterrupt), then run it again: (the
    first candidate, whether the cache file existed at the stop, the candidates the second run evaluated, its
    result). The stop must leave the shard folder."""
    real, calls = search._evaluate, []

    def stop_at_the_second(case, params, device, timeout_s):
        calls.append(params)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(case, params, device, timeout_s)

    monkeypatch.setattr(search, "_evaluate", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        search.tune("smoke", families=["window"], device="cpu", out=tmp_path, progress=False, **tune_kw)
    path = tmp_path / "cpu-interpreter.json"
    assert search.shard_folder(path).is_dir()
    first, existed = calls[0], path.exists()
    calls.clear()
    monkeypatch.setattr(search, "_evaluate", lambda *a: (calls.append(a[1]), real(*a))[1])
    result = search.tune("smoke", families=["window"], device="cpu", out=tmp_path, progress=False, **tune_kw)
    return first, existed, calls, result


@kernels_run
def test_resume_inside_a_bucket_redoes_no_candidate(tmp_path, monkeypatch):
    """A run stopped after the first candidate of a bucket keeps it (a shard file); the next run evaluates only
    the others and writes the bucket, then leaves no shard folder behind."""
    first, existed, calls, result = interrupt_then_resume(tmp_path, monkeypatch)
    path = tmp_path / "cpu-interpreter.json"
    assert not existed and calls and first not in calls
    assert [row["key"].split("|")[0] for row in result["done"]] == ["window"]
    assert result["done"][0]["tried"] == len(calls) + 1
    assert list(json.loads(path.read_text())["entries"]) == [result["done"][0]["key"]]
    assert not search.shard_folder(path).exists()


def test_budget_starts_no_candidate_that_would_end_past_it(monkeypatch):
    """The longest gap between candidate starts so far is the estimate: once a 4 s candidate was seen, one starting
    at 6 s (ends by 10 s) fits a 10 s budget and one at 8 s does not, so the run ends inside its budget."""
    clock = [100.0]
    monkeypatch.setattr(search.time, "monotonic", lambda: clock[0])
    budget = search.Budget(10.0)
    starts = []
    for step in (1.0, 4.0, 1.0, 2.0, 1.0):
        if not budget.start_next():
            break
        starts.append(clock[0] - 100.0)
        clock[0] += step
    assert starts == [0.0, 1.0, 5.0, 6.0]
    assert search.Budget(None).start_next()


def test_write_reload_lookup_nearest_bucket(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "env"))
    far = dataclasses.replace(SMOKE_SHAPE, seqlen=8192)
    write_cache(tmp_path / "env", {cache.bucket_key("combine", dataclasses.replace(SMOKE_SHAPE, seqlen=512)):
                                   combine_entry(64), cache.bucket_key("combine", far): combine_entry(32)})
    with caplog.at_level(logging.INFO, logger="nsa.tuner"):
        assert cache.lookup("combine", SMOKE_SHAPE, "cpu-interpreter") == CombineParams(64, 16, 4)
    assert any("nearest T bucket" in r.message for r in caplog.records)
    assert cache.lookup("combine", dataclasses.replace(SMOKE_SHAPE, seqlen=5000), "cpu-interpreter").block_r == 32
    # More than MAX_T_RATIO from every tuned T: the heuristic, not params tuned for another length.
    assert cache.lookup("combine", dataclasses.replace(SMOKE_SHAPE, seqlen=65536), "cpu-interpreter") is None
    # Everything but T must match: another group size misses, with one warning per key.
    other = dataclasses.replace(SMOKE_SHAPE, group=4)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nsa.tuner"):
        assert cache.lookup("combine", other, "cpu-interpreter") is None
        cache._memos.clear()
        assert cache.lookup("combine", other, "cpu-interpreter") is None
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_corrupt_or_foreign_file_warns_once_and_is_ignored(tmp_path):
    user = cache.user_dir()
    user.mkdir(parents=True)
    cache.config_path("cpu-interpreter", user).write_text("{not json")
    with pytest.warns(RuntimeWarning, match="ignored"):
        assert cache.lookup("combine", SMOKE_SHAPE, "cpu-interpreter") is None
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache._memos.clear()
        assert cache.lookup("combine", SMOKE_SHAPE, "cpu-interpreter") is None
    cache.clear_cache()
    write_cache(user, {cache.bucket_key("combine", SMOKE_SHAPE): combine_entry(64)}, device="nvidia-h100")
    cache.config_path("nvidia-h100", user).rename(cache.config_path("cpu-interpreter", user))
    with pytest.warns(RuntimeWarning, match="written for device 'nvidia-h100'"):
        assert cache.lookup("combine", SMOKE_SHAPE, "cpu-interpreter") is None
    cache.clear_cache()
    bad = combine_entry(64)
    bad["params"]["block_r"] = 3  # not a power of two: the params class rejects it
    write_cache(user, {cache.bucket_key("combine", SMOKE_SHAPE): bad})
    with pytest.warns(RuntimeWarning, match="entry"):
        assert cache.lookup("combine", SMOKE_SHAPE, "cpu-interpreter") is None


def test_lookup_order_explicit_env_user_shipped_default(tmp_path, monkeypatch):
    key = cache.bucket_key("combine", SMOKE_SHAPE)
    config = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=3, window=32)

    def resolved(params=NSAParams()):
        cache.clear_cache()
        return params.resolve(config, 2, 1, 16, 16, torch.float32, seqlen=128, device="cpu").combine.block_r

    default = resolved()
    assert default == 256
    write_cache(cache.SHIPPED_DIR, {key: combine_entry(8)})
    assert resolved() == 8
    write_cache(cache.user_dir(), {key: combine_entry(16)})
    assert resolved() == 16
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "env"))
    write_cache(tmp_path / "env", {key: combine_entry(32)})
    assert resolved() == 32
    assert resolved(NSAParams(combine=CombineParams(block_r=128, block_d=16))) == 128
    # Without seqlen/device (old callers) resolve never reads a cache.
    assert NSAParams().resolve(config, 2, 1, 16, 16, torch.float32).combine.block_r == default
    # Resolved params are memoized per process (a step's host path) until clear_cache, as the lookups are; a
    # cache write in this process clears them.
    def again():
        return NSAParams().resolve(config, 2, 1, 16, 16, torch.float32, seqlen=128, device="cpu")

    first = again()
    assert again() is first and first.combine.block_r == 32
    write_cache(tmp_path / "env", {key: combine_entry(64)})
    assert again().combine.block_r == 64


@kernels_run
def test_nsa_attention_runs_with_cached_params(tmp_path, monkeypatch):
    from nsa import reference
    from nsa.kernels import nsa_attention
    from nsa.problems import random_inputs
    config = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=3, window=32)
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path))
    write_cache(tmp_path, {cache.bucket_key("combine", SMOKE_SHAPE): combine_entry(16)})
    x = random_inputs(config, seqlen=128, num_heads=2, num_kv_heads=1, head_dim=16, seed=0)
    x.pop("cu_seqlens")
    o = nsa_attention(**x, config=config)
    ref = reference.nsa_attention(**{k: t.double() for k, t in x.items()}, config=config)
    assert (o.double() - ref).abs().max() < 1e-4


def test_ensure_tuned_on_cpu_only_reports(tmp_path):
    assert "no config cache for cpu-interpreter" in search.ensure_tuned("cpu")
    write_cache(cache.user_dir(), {cache.bucket_key("combine", SMOKE_SHAPE): combine_entry(16)})
    assert "1 entries" in search.ensure_tuned("cpu")
    have, missing = search.covered_buckets("smoke", "cpu-interpreter")
    assert cache.bucket_key("combine", SMOKE_SHAPE) in have and missing and not set(have) & set(missing)
    assert f"{len(have)} of {len(have) + len(missing)} smoke buckets" in search.ensure_tuned("cpu", suite="smoke")
    assert "user" in search.describe("cpu") and "combine|T=128" in search.describe("cpu")


def test_cli_tune_show(capsys):
    from nsa.cli import main
    assert main(["tune", "--show", "--device", "cpu"]) == 0
    assert "device key: cpu-interpreter" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Decode: its own family, keys with the step's rows (B x n x Hkv), timed as CUDA-graph replays
# ----------------------------------------------------------------------------------------------------------------

decode_module = importlib.import_module("nsa.kernels.decode")
SMOKE_CONFIG = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=3, window=32)
# The untuned decode params (and so the candidates) depend on the device; these tests pin the interpreter's.
interpreter_only = pytest.mark.skipif(not runtime.interpreting(), reason="needs TRITON_INTERPRET=1")
INTERPRETER_DECODE = decode_module.DecodeParams(cmp_splits=2, cmp_block_n=16, importance_splits=2,
                                                importance_chunk=16, slc_splits=2, win_splits=2, block_n=16,
                                                num_warps=1, num_stages=1)


def decode_problem():
    from nsa.suites import get_suite
    (problem,) = [p for p in get_suite("smoke").problems if p.op == "decode"]
    return problem  # B=2, T=100, Hq/Hkv 2/1: rows 2


def decode_entry(**fields):
    return {"params": dataclasses.asdict(dataclasses.replace(INTERPRETER_DECODE, **fields)), "ms": 1.0,
            "default_ms": 2.0}


def double_cache(x):
    """A float64 reference cache of the problem's tensors."""
    from nsa.suites.problem import cache_of
    return cache_of({name: x[name].double() for name in ("k", "v", "k_cmp", "v_cmp")}, SMOKE_CONFIG)


def decode_shape(seqlen=128, rows=2):
    return dataclasses.replace(SMOKE_SHAPE, seqlen=seqlen, rows=rows)


def test_decode_keys_carry_rows_and_training_keys_stay_as_they_were():
    assert cache.bucket_key("decode", decode_shape(rows=12)) == \
        "decode|T=128|G=2|Dk=16|Dv=16|l=16|d=8|ls=16|n=3|rows=16|float32"
    assert cache.bucket_key("window", decode_shape()) == cache.bucket_key("window", SMOKE_SHAPE)
    with pytest.raises(ValueError, match="rows"):
        cache.bucket_key("decode", SMOKE_SHAPE)
    good = {cache.bucket_key("combine", SMOKE_SHAPE): combine_entry(16),
            cache.bucket_key("decode", decode_shape()): decode_entry()}
    assert cache.validate({"meta": {"device": "d"}, "entries": good}, "d") is None
    window_key = cache.bucket_key("window", SMOKE_SHAPE)
    for bad in (window_key.replace("|float32", "|rows=2|float32"), window_key.replace("window", "decode"),
                cache.bucket_key("decode", decode_shape()).replace("rows=2", "rows=0")):
        assert "unknown entry key" in cache.validate({"meta": {"device": "d"}, "entries": {bad: decode_entry()}}, "d")
    shipped = cache.config_path("nvidia-h200", Path(cache.__file__).parent / "configs")
    entries = cache.read_file(shipped, "nvidia-h200")["entries"]  # the shipped cache still loads
    for key, entry in entries.items():  # and every entry still builds its params (new fields take defaults)
        cache.params_class(key.split("|")[0])(**entry["params"])
    assert {key.split("|")[0] for key in entries} == set(cache.ALL_FAMILIES)


def test_decode_lookup_nearest_rows_then_t(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path))
    write_cache(tmp_path, {cache.bucket_key("decode", decode_shape(rows=4)): decode_entry(slc_splits=1),
                           cache.bucket_key("decode", decode_shape(rows=64)): decode_entry(slc_splits=3)})

    def slc_splits(rows, seqlen=128):
        found = cache.lookup("decode", decode_shape(seqlen, rows), "cpu-interpreter")
        return found and found.slc_splits
    # B=1 and B=16 of 4 kv heads are separate buckets; within a factor 4 the nearest rows wins, a tie the larger.
    assert [slc_splits(r) for r in (4, 8, 16, 32, 256)] == [1, 1, 3, 3, 3]
    assert slc_splits(1024) is None and slc_splits(4, seqlen=4096) is None  # beyond the rows / T factor
    assert slc_splits(3, seqlen=256) == 1  # rows 3 -> bucket 4, T within a factor


@interpreter_only
def test_decode_search_space_default_is_what_nsa_decode_runs():
    problem = decode_problem()
    shape = search.problem_shape(problem)
    assert shape.rows == 2 and shape.seqlen == 100
    cands, pruned = spaces.search_space("decode", shape, SMOKE_CONFIG, 2, 1)
    untuned = decode_module.resolve_params((2, 1, 2, 16), 1, 16, SMOKE_CONFIG, 100, torch.float32, "cpu")
    assert cands[0] == untuned == decode_module.default_params(2, 1, 1, SMOKE_CONFIG, 100, "cpu") == \
        INTERPRETER_DECODE
    assert len(cands) == 3 and pruned == {}
    # The GPU ranges at T=100 (one compressed / importance tile, n=3 selected blocks, 2 window tiles) ask for more
    # splits than there is work: cut to the tiles, they leave 2 selected x 1 window x 2 launch choices (plus the
    # default), none idle. At 64k, most of the ranges are searched as they are.
    gpu, gpu_pruned = spaces.search_space("decode", shape, SMOKE_CONFIG, 2, 1, interpreter=False)
    assert gpu_pruned == {} and len(gpu) == len(set(gpu)) <= 1 + 2 * 2
    assert {(p.cmp_splits, p.importance_splits, p.win_splits) for p in gpu[1:]} == {(1, 1, 2)}
    assert {p.slc_splits for p in gpu[1:]} == {2, 3}
    long = dataclasses.replace(shape, seqlen=65536)
    gpu, _ = spaces.search_space("decode", long, SMOKE_CONFIG, 2, 1, interpreter=False)
    assert 1 < len(gpu) <= 1 + 3 * 2 * 3 * 2


def test_decode_buckets_only_from_decode_problems():
    from nsa.suites import get_suite
    rows = search.buckets(get_suite("smoke"), list(cache.ALL_FAMILIES))
    decode = [(family, key, problem.op) for family, key, problem in rows if family == "decode"]
    assert decode == [("decode", "decode|T=128|G=2|Dk=16|Dv=16|l=16|d=8|ls=16|n=3|rows=2|float32", "decode")]
    assert all(problem.op != "decode" for family, _, problem in rows if family != "decode")
    paper = [key for _, key, _ in search.buckets(get_suite("paper"), ["decode"])]
    assert len(paper) == 16 and {k.split("|")[9] for k in paper} == {"rows=4", "rows=64"}  # B=1 and B=16


@interpreter_only
def test_tune_decode_smoke_checked_graph_timed_and_covered(tmp_path, monkeypatch):
    graph_flags, real_time_call = [], search.time_call

    def recording_time_call(fn, device, *args, **kw):
        graph_flags.append(kw.get("cuda_graph"))
        return real_time_call(fn, device, *args, **kw)

    monkeypatch.setattr(search, "time_call", recording_time_call)
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path))
    result = search.tune("smoke", families=["decode"], device="cpu", out=tmp_path, progress=False)
    (row,) = result["done"]
    assert row["rejected"] == {} and row["tried"] == 3 and graph_flags == [True] * 3
    entry = json.loads((tmp_path / "cpu-interpreter.json").read_text())["entries"][row["key"]]
    assert decode_module.DecodeParams(**entry["params"]) and entry["default_ms"] >= entry["ms"] > 0
    have, missing = search.covered_buckets("smoke", "cpu-interpreter")
    assert have == [row["key"]] and row["key"] not in missing
    assert "decode|T=128" in search.describe("cpu")


@interpreter_only
def test_wrong_decode_candidates_rejected(tmp_path, monkeypatch):
    real = decode_module.nsa_decode

    def wrong(*args, params, **kw):
        o, idx = real(*args, params=params, **kw)
        if params.slc_splits == 3:
            return o + 1.0, idx
        if params.slc_splits == 1:
            return o, torch.full_like(idx, -1)  # a selection that misses every block
        return o, idx

    monkeypatch.setattr(decode_module, "nsa_decode", wrong)
    result = search.tune("smoke", families=["decode"], device="cpu", out=tmp_path, progress=False)
    (row,) = result["done"]
    assert row["rejected"] == {"wrong": 2}
    assert any("relative error" in e for e in row["errors"]) and any("causal blocks" in e for e in row["errors"])
    assert row["params"] == dataclasses.asdict(INTERPRETER_DECODE)


@interpreter_only
def test_nsa_decode_runs_with_cached_params_and_ignores_a_corrupt_cache(tmp_path, monkeypatch):
    from nsa import reference
    from nsa.kernels import KVCache, nsa_decode
    from nsa.suites.problem import make_inputs
    problem = decode_problem()
    x = make_inputs(problem, device="cpu", seed=0)
    kv = KVCache.from_tensors(x["k"], x["v"], x["k_cmp"], x["v_cmp"], SMOKE_CONFIG)
    gates = (x["g_cmp"], x["g_slc"], x["g_win"])
    used, real_fwd = [], decode_module.nsa_decode_fwd

    def recording_fwd(*args):
        used.append(args[-1])
        return real_fwd(*args)

    monkeypatch.setattr(decode_module, "nsa_decode_fwd", recording_fwd)
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path / "env"))
    tuned = decode_entry(cmp_splits=1, importance_splits=1, slc_splits=3, win_splits=1)
    write_cache(tmp_path / "env", {cache.bucket_key("decode", decode_shape()): tuned})
    o = nsa_decode(x["q"], kv, *gates, SMOKE_CONFIG)
    assert dataclasses.asdict(used[-1]) == tuned["params"]
    ref = reference.nsa_decode(x["q"].double(), double_cache(x), *(g.double() for g in gates), SMOKE_CONFIG)
    assert (o.double() - ref).abs().max() < 1e-4
    # A corrupt file warns once and the step runs on the heuristic.
    cache.config_path("cpu-interpreter", tmp_path / "env").write_text("{not json")
    cache.clear_cache()
    with pytest.warns(RuntimeWarning, match="ignored"):
        nsa_decode(x["q"], kv, *gates, SMOKE_CONFIG)
    assert used[-1] == INTERPRETER_DECODE


@kernels_run
def test_backward_family_checks_every_gradient_and_only_its_fields_are_used(tmp_path, monkeypatch):
    compression_module = importlib.import_module("nsa.kernels.compression")
    real = compression_module.compressed_attention_bwd

    def wrong_dk_for_narrow_tiles(*args):
        dq, dk, dv = real(*args)
        return (dq, dk * 2, dv) if args[-1].dkdv_block_n == 16 else (dq, dk, dv)

    monkeypatch.setattr(compression_module, "compressed_attention_bwd", wrong_dk_for_narrow_tiles)
    result = search.tune("smoke", families=["compression", "compression_bwd"], device="cpu", out=tmp_path,
                         progress=False)
    rows = {row["key"].split("|")[0]: row for row in result["done"]}
    assert rows["compression"]["rejected"] == {}  # forward candidates all keep the default backward tiles
    assert rows["compression_bwd"]["rejected"] == {"wrong": 1}
    assert rows["compression_bwd"]["errors"][0].startswith("wrong: dk_cmp: relative error")
    entries = json.loads((tmp_path / "cpu-interpreter.json").read_text())["entries"]
    assert entries[cache.bucket_key("compression_bwd", SMOKE_SHAPE)]["params"]["dkdv_block_n"] == 64

    # resolve: forward fields from the family's entry, backward fields from <family>_bwd's
    fwd = dataclasses.replace(spaces.default_for("compression", SMOKE_SHAPE, NSAConfig(), 2, 1), fwd_block_n=16,
                              dkdv_block_n=16)
    bwd = dataclasses.replace(fwd, fwd_block_n=64, dkdv_block_n=32, dq_num_warps=8)
    write_cache(tmp_path, {cache.bucket_key(name, SMOKE_SHAPE): {"params": dataclasses.asdict(p), "ms": 1.0}
                           for name, p in (("compression", fwd), ("compression_bwd", bwd))})
    cache.clear_cache()
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path))
    config = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=3, window=32)
    got = NSAParams().resolve(config, 2, 1, 16, 16, torch.float32, seqlen=128, device="cpu").compression
    assert (got.fwd_block_n, got.dkdv_block_n, got.dq_num_warps) == (16, 32, 8)


@kernels_run
def test_retune_replaces_entries_the_cache_holds(tmp_path, capsys):
    first = search.tune("smoke", families=["combine"], device="cpu", out=tmp_path, progress=False)
    again = search.tune("smoke", families=["combine"], device="cpu", out=tmp_path, progress=False)
    assert len(first["done"]) == 1 and again["done"] == [] and again["skipped"] == [first["done"][0]["key"]]
    argv = ["tune", "--suite", "smoke", "--families", "combine", "--device", "cpu", "--out", str(tmp_path),
            "--retune"]
    from nsa.cli import main
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert first["done"][0]["key"] in out and "already tuned" not in out
    entries = json.loads((tmp_path / "cpu-interpreter.json").read_text())["entries"]
    assert list(entries) == [first["done"][0]["key"]]


@kernels_run
def test_match_tunes_only_the_buckets_whose_key_contains_it(tmp_path, capsys):
    done = search.tune("smoke", families=["combine", "window"], device="cpu", out=tmp_path, progress=False,
                       match=("combine|", "T=128|"))
    assert [row["key"].split("|")[0] for row in done["done"]] == ["combine"] and done["skipped"] == []
    none = search.tune("smoke", families=["combine"], device="cpu", out=tmp_path, progress=False, match=("G=4|",))
    assert none["done"] == [] and none["skipped"] == []
    from nsa.cli import main
    argv = ["tune", "--suite", "smoke", "--families", "combine,window", "--device", "cpu", "--out", str(tmp_path),
            "--match", "combine|"]
    assert main(argv) == 0
    assert "already tuned" in capsys.readouterr().out  # the combine bucket, and nothing of the window's
    entries = json.loads((tmp_path / "cpu-interpreter.json").read_text())["entries"]
    assert [key.split("|")[0] for key in entries] == ["combine"]


@kernels_run
def test_fields_search_only_those_fields_from_the_cached_params(tmp_path, capsys, monkeypatch):
    """A short search: only the named fields vary, from each cached entry; families that do not search them and
    buckets the cache lacks are left alone; the entry keeps its default_ms and records start_ms."""
    search.tune("smoke", families=["window", "combine"], device="cpu", out=tmp_path, progress=False)
    path = tmp_path / "cpu-interpreter.json"
    data = json.loads(path.read_text())
    window_key = next(key for key in data["entries"] if key.startswith("window|"))
    combine_entry_before = next(e for key, e in data["entries"].items() if key.startswith("combine|"))
    cached = data["entries"][window_key]
    cached["params"].update(fwd_block_n=32, fwd_num_stages=2)  # the fields not searched keep these values
    cached.update(default_ms=123.0, note="set by hand")
    cache.write_atomic(path, data)

    result = search.tune("smoke", families=["window", "combine"], device="cpu", out=tmp_path, progress=False,
                         fields=("fwd_block_n",))
    (row,) = result["done"]
    assert row["key"] == window_key and row["tried"] == 2 and row["fields"] == ["fwd_block_n"]
    assert [changed for changed, _, _ in row["candidates"]] == [{}, {"fwd_block_n": 64}]
    assert row["candidates"][0][1] == row["start_ms"] and all(ms > 0 for _, ms, _ in row["candidates"])
    entries = json.loads(path.read_text())["entries"]
    entry = entries[window_key]
    assert entry["default_ms"] == 123.0 and entry["start_ms"] > 0 and "note" not in entry
    assert entry["params"]["fwd_num_stages"] == 2 and entry["params"]["fwd_block_n"] in (32, 64)
    assert next(e for key, e in entries.items() if key.startswith("combine|")) == combine_entry_before
    monkeypatch.setenv(cache.ENV_DIR, str(tmp_path))
    assert entry["timed_as"] == "eager" and f"{window_key}: {entry['ms']:.4g} ms (eager)" in search.describe("cpu")

    entry["timed_as"] = "cuda-graph"  # as a GPU's short bucket: its default_ms does not compare with eager times
    cache.write_atomic(path, dict(meta=data["meta"], entries=entries))
    search.tune("smoke", families=["window"], device="cpu", out=tmp_path, progress=False, fields=("fwd_block_n",))
    entries = json.loads(path.read_text())["entries"]
    assert entries[window_key]["default_ms"] is None and entries[window_key]["timed_as"] == "eager"

    del entries[window_key]
    cache.write_atomic(path, dict(meta=data["meta"], entries=entries))
    again = search.tune("smoke", families=["window"], device="cpu", out=tmp_path, progress=False,
                        fields=("fwd_block_n",))
    assert again["done"] == [] and again["untuned"] == [window_key]
    with pytest.raises(ValueError, match="searches fwd_tma"):  # not in the interpreter's window space
        search.tune("smoke", families=["window"], device="cpu", out=tmp_path, progress=False, fields=("fwd_tma",))
    from nsa.cli import main
    argv = ["tune", "--suite", "smoke", "--families", "window", "--device", "cpu", "--out", str(tmp_path)]
    assert main([*argv, "--fields", "fwd_block_n"]) == 0
    assert "no cache holds it, so not refined" in capsys.readouterr().out
    assert main([*argv, "--fields", "dkdv_block_n"]) == 1
    assert "searches dkdv_block_n" in capsys.readouterr().err

    # From the caches in use when the file lacks the bucket: an A/B into another folder.
    search.tune("smoke", families=["window"], device="cpu", progress=False)  # into the user cache
    elsewhere = search.tune("smoke", families=["window"], device="cpu", out=tmp_path / "ab", progress=False,
                            fields=("fwd_block_n",))
    assert [row["key"] for row in elsewhere["done"]] == [window_key] and elsewhere["done"][0]["start_ms"] > 0
    assert list(json.loads((tmp_path / "ab" / "cpu-interpreter.json").read_text())["entries"]) == [window_key]
    assert main([*argv, "--fields", "fwd_block_n"]) == 0  # the CLI prints each candidate's time
    out = capsys.readouterr().out
    assert "the cached params: " in out and "fwd_block_n=" in out
    # Given values, for a field outside the interpreter's declared space.
    assert main([*argv, "--fields", "fwd_num_stages=1/2"]) == 0
    out = capsys.readouterr().out
    assert "fwd_num_stages searched), 2 tried" in out and "    fwd_num_stages=" in out


def test_field_space_takes_declared_ranges_or_given_values():
    """--fields items: a plain name searches its declared range; name=v1/v2 those values, for a field of the
    family's params that its kernels use (fwd_* in the forward family, the rest in its _bwd family)."""
    assert spaces.parse_field("fwd_tma") == ("fwd_tma", None)
    assert spaces.parse_field("dkdv_block_m=2/4/8") == ("dkdv_block_m", [2, 4, 8])
    assert spaces.parse_field("fwd_tma=true/False") == ("fwd_tma", [True, False])
    with pytest.raises(ValueError, match="ints or true/false"):
        spaces.parse_field("fwd_block_n=wide")
    fields = ("dkdv_block_m=2/4", "dkdv_tma", "fwd_num_warps=4", "fwd_tma")
    assert spaces.field_space("compression_bwd", fields, interpreter=False) == {"dkdv_block_m": [2, 4],
                                                                               "dkdv_tma": [False, True]}
    assert spaces.field_space("compression", fields, interpreter=False) == {"fwd_num_warps": [4]}
    assert spaces.field_space("combine", ("dkdv_block_m=2/4",), interpreter=False) == {}
    with pytest.raises(ValueError, match="searches no_such_field"):
        search.tune("smoke", families=["window"], device="cpu", progress=False, fields=("no_such_field=1",))


def test_tune_cli_says_what_a_bucket_pruned(monkeypatch, capsys):
    """A short search can prune candidates (a varied field that another cached field makes invalid): the summary
    line counts them, so '1 tried' is not mistaken for a search of one candidate."""
    from nsa.cli import main
    from nsa.tuner import search
    row = dict(key="selected|T=65536|G=4", ms=26.25, default_ms=37.9, start_ms=26.25, fields=["fwd_inverted"],
               tried=1, rejected={}, pruned={"invalid": 2}, errors=[], candidates=[({}, 26.25, None)])
    monkeypatch.setattr(search, "tune", lambda *a, **k: dict(path="cache.json", skipped=[], untuned=[], done=[row],
                                                             stopped=False))
    assert main(["tune", "--suite", "smoke", "--device", "cpu", "--fields", "fwd_inverted"]) == 0
    out = capsys.readouterr().out
    assert "1 tried, rejected: none, pruned invalid: 2" in out and "add those fields to --fields" in out
    # A bucket with a winner still says why its other candidates failed (an H200 search of session 19 printed
    # only "error" for tiles past the shared memory).
    error = "error: OutOfResources: out of resource: shared memory ({'dkdv_block_t': 16})"
    row.update(tried=2, rejected={"error": 1}, errors=[error],
               candidates=[({}, 26.25, None), ({"dkdv_block_t": 16}, None, "error")])
    assert main(["tune", "--suite", "smoke", "--device", "cpu", "--fields", "dkdv_block_t"]) == 0
    out = capsys.readouterr().out
    assert "rejected: error 1" in out and f"    {error}" in out and "dkdv_block_t=16: error" in out
    row.update(confirmed=2)
    assert main(["tune", "--suite", "smoke", "--device", "cpu", "--fields", "dkdv_block_t"]) == 0
    assert "the 2 fastest re-timed in 3 interleaved rounds" in capsys.readouterr().out


@kernels_run
def test_fields_search_stopped_inside_a_bucket_resumes(tmp_path, monkeypatch):
    """A short search stopped after its first candidate resumes through the shard records like a full one, and
    still records start_ms from the candidate evaluated before the stop."""
    search.tune("smoke", families=["window"], device="cpu", out=tmp_path, progress=False)
    _, _, calls, result = interrupt_then_resume(tmp_path, monkeypatch, fields=("fwd_block_n",))
    (row,) = result["done"]
    assert len(calls) == 1 and row["tried"] == 2 and row["start_ms"] > 0 and row["fields"] == ["fwd_block_n"]
    assert not search.shard_folder(tmp_path / "cpu-interpreter.json").exists()


def test_spaces_are_declared_beside_each_kernel_and_split_forward_from_backward():
    for family in cache.ALL_FAMILIES:
        fields = {f.name for f in dataclasses.fields(cache.params_class(family))}
        has_fwd_prefix = any(name.startswith("fwd_") for name in fields)
        for interpreter in (False, True):
            declared = spaces.declared_space(family, interpreter)
            assert declared and set(declared) <= fields, (family, interpreter)
            if family in cache.BACKWARD_FAMILIES:  # with_backward takes only the fields without fwd_
                assert not any(name.startswith("fwd_") for name in declared), family
            elif has_fwd_prefix:  # the forward tune must leave the backward fields at their defaults
                assert all(name.startswith("fwd_") for name in declared), family
