"""Several ranks under torchrun, on CPU: gloo, 2 processes, kernels in the Triton interpreter.

The sharded tune gives the single-process cache (same buckets, same format, valid entries), survives a rank
killed midway (a rerun evaluates only what no shard holds), the sharded bench writes one results folder and
report, and `nsa cache merge` keeps the fastest entry per bucket with its source and refuses other cards.
"""

import csv
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from nsa.kernels import runtime
from nsa.suites import get_suite
from nsa.tuner import cache, search, spaces
from nsa.tuner.distributed import ShardLog, World, read_shards, remove_shards
from nsa.tuner.merge import DeviceMismatch, merge

kernels_run = pytest.mark.skipif(not runtime.interpreting(), reason="needs TRITON_INTERPRET=1 (CPU ranks)")
FAMILIES = ["compression", "window", "combine"]  # 7 candidates in the interpreter: both ranks get several
DEVICE = "cpu-interpreter"

# Run by torchrun in each rank: logs every candidate it evaluates; with DIE >= 0, rank 1 dies (os._exit, no
# cleanup) as it starts its evaluation number DIE, once rank 0 has finished at least one candidate.
HELPER = """
import dataclasses, json, os, sys, time
from pathlib import Path
from nsa.tuner import search

log_path, shard0, die = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
rank, real, calls = int(os.environ["RANK"]), search._evaluate, []


def evaluate(case, params, device, timeout_s):
    if rank == 1 and len(calls) == die:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (shard0.exists() and shard0.read_text().count("\\n")):
            time.sleep(0.05)
        os._exit(3)
    calls.append(params)
    out = real(case, params, device, timeout_s)
    with open(log_path, "a") as f:
        f.write(json.dumps([type(params).__name__, dataclasses.asdict(params)]) + "\\n")
    return out


search._evaluate = evaluate
from nsa.cli import main
sys.exit(main(sys.argv[4:]))
"""


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(cache.ENV_DIR, raising=False)
    cache.clear_cache()
    yield
    cache.clear_cache()


def torchrun(tmp_path, *args, timeout=300):
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 ARGS`, outside the checkout."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg"), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)


def family_of(class_name: str) -> str:
    return next(f for f, (_, name) in cache.FAMILIES.items() if name == class_name)


def evaluated(log_path) -> set:
    """(family, params as JSON) of every candidate a helper run logged."""
    if not log_path.exists():
        return set()
    return {(family_of(name), json.dumps(params, sort_keys=True))
            for name, params in map(json.loads, log_path.read_text().splitlines())}


def test_world_from_env_and_round_robin_shares():
    assert World.from_env({}).size == 1 and World.from_env({"WORLD_SIZE": "1"}).is_main
    world = World.from_env({"WORLD_SIZE": "3", "RANK": "2", "LOCAL_RANK": "0"})
    assert (world.rank, world.size, world.local_rank, world.is_main) == (2, 3, 0, False)
    items = list(range(8))
    shares = [World(r, 3).share(items) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]] and sorted(sum(shares, [])) == items
    assert world.device("cpu") == "cpu"
    with pytest.raises(RuntimeError, match="started"):
        world.broadcast(1)
    one = World()
    assert one.broadcast(5) == 5 and one.gather(5) == [5] and one.all_gather(5) == [5] and one.on_main(lambda: 7) == 7


def test_shard_log_appends_and_skips_a_torn_line(tmp_path):
    ShardLog(tmp_path, 0).append({"key": "a", "index": 0})
    ShardLog(tmp_path, 1).append({"key": "a", "index": 1})
    ShardLog(tmp_path, 0).append({"key": "b", "index": 0})
    with open(ShardLog(tmp_path, 1).path, "a") as f:
        f.write('{"key": "b", "ind')  # a process killed mid-write
    assert [(r["key"], r["index"]) for r in read_shards(tmp_path)] == [("a", 0), ("b", 0), ("a", 1)]
    remove_shards(tmp_path, 1)
    assert len(read_shards(tmp_path)) == 2
    remove_shards(tmp_path)
    assert not tmp_path.exists() or not list(tmp_path.glob("rank*"))


@kernels_run
def test_tune_two_ranks_rank_killed_then_resumed_equals_one_process(tmp_path):
    one = search.tune("smoke", families=FAMILIES, device="cpu", out=tmp_path / "one", progress=False)
    single = json.loads(open(one["path"]).read())
    out = tmp_path / "two"
    path, shards = cache.config_path(DEVICE, out), search.shard_folder(cache.config_path(DEVICE, out))
    (tmp_path / "helper.py").write_text(HELPER)
    argv = ["tune", "--suite", "smoke", "--families", ",".join(FAMILIES), "--device", "cpu", "--out", out]

    # Rank 1 dies after one candidate: torchrun stops rank 0; what both finished is in their shard files.
    first = torchrun(tmp_path, "helper.py", tmp_path / "run1.log", shards / "rank0.jsonl", 1, *argv)
    assert first.returncode != 0, first.stdout + first.stderr
    assert not path.exists()
    records = read_shards(shards)
    ranks = {p.name for p in shards.glob("rank*.jsonl") if p.read_text().strip()}
    assert ranks == {"rank0.jsonl", "rank1.jsonl"}, first.stdout + first.stderr
    saved = {(r["key"].split("|")[0], json.dumps(r["params"], sort_keys=True)) for r in records}
    assert saved and all(r["ms"] > 0 and r["failure"] is None for r in records)

    # The rerun evaluates exactly what no shard holds, then rank 0 writes the one cache and drops the shards.
    second = torchrun(tmp_path, "helper.py", tmp_path / "run2.log", shards / "rank0.jsonl", -1, *argv)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "2 ranks shared the candidates" in second.stdout
    redone = evaluated(tmp_path / "run2.log")
    assert not redone & saved
    total = sum(row["tried"] for row in one["done"])
    assert len(redone | saved) == total and len(redone) < total
    assert not shards.exists()

    sharded = json.loads(path.read_text())
    assert list(sharded) == ["meta", "entries"] and set(sharded["meta"]) == set(single["meta"])
    assert sharded["meta"]["device"] == DEVICE and set(sharded["entries"]) == set(single["entries"])
    for key, entry in sharded["entries"].items():
        ref = single["entries"][key]
        assert set(entry) == set(ref)
        assert {f: entry[f] for f in ("tried", "pruned", "rejected")} == {f: ref[f] for f in ("tried", "pruned",
                                                                                              "rejected")}
        assert entry["ms"] > 0 and entry["default_ms"] >= entry["ms"]
        cache.params_class(key.split("|")[0])(**entry["params"])  # params the kernels accept
    # Params differ only where CPU timing noise picks another candidate: each is one of the bucket's candidates.
    candidates = evaluated(tmp_path / "run2.log") | saved
    assert all((k.split("|")[0], json.dumps(e["params"], sort_keys=True)) in candidates
               for k, e in sharded["entries"].items())


@kernels_run
def test_sharded_tune_resumes_in_one_process(tmp_path):
    """Shards left by a sharded run are taken in by a plain `tune` (a world of one), not redone; stale records
    (other params) and setup failures are."""
    out = tmp_path / "out"
    path = cache.config_path(DEVICE, out)
    (family, bkey, problem), = search.buckets(get_suite("smoke"), ["combine"])
    cands, _ = spaces.search_space(family, search.problem_shape(problem), problem.config, problem.num_heads,
                                   problem.num_kv_heads, device="cpu")
    shard = ShardLog(search.shard_folder(path), 1)
    shard.append(search._record(bkey, 0, cands[0], None, ("setup", "OutOfMemoryError: inputs")))
    shard.append(search._record(bkey, 1, cands[1], 0.001, None))  # "finished" by a rank of an earlier run
    shard.append(search._record(bkey, 2, dataclasses.replace(cands[2], num_warps=8), 0.001, None))  # stale
    result = search.tune("smoke", families=["combine"], device="cpu", out=out, progress=False)
    assert result["complete"] and not search.shard_folder(path).exists()
    entry = json.loads(path.read_text())["entries"][bkey]
    assert entry["params"] == dataclasses.asdict(cands[1]) and entry["ms"] == 0.001 and entry["tried"] == len(cands)
    assert entry["default_ms"] > entry["ms"] and entry["rejected"] == {}  # the default was evaluated this time


@kernels_run
def test_bench_two_ranks_one_results_folder_and_report(tmp_path):
    from nsa.bench import BenchSettings, pending
    from nsa.suites import get_providers
    out = tmp_path / "results"
    run = torchrun(tmp_path, "-m", "nsa", "bench", "--suite", "smoke", "--ops", "fwd", "--providers",
                   "nsa,reference", "--device", "cpu", "--out", out)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 ranks shared the problems" in run.stdout and (out / "report.html").exists()
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    expected = pending(get_suite("smoke"), get_providers(["nsa", "reference"]), None,
                       BenchSettings(device="cpu", ops=("fwd",)))
    assert [(r["problem"], r["impl"]) for r in rows] == expected  # one process's order
    assert all(r["verdict"] == "pass" and float(r["ms"]) > 0 for r in rows)
    assert not (out / "shards").exists()


def write(path, entries, device=DEVICE, **meta):
    cache.write_atomic(path, {"meta": {"device": device, "date": "d", **meta}, "entries": entries})
    return path


def entry(block_r, ms):
    return {"params": {"block_r": block_r, "block_d": 16, "num_warps": 4}, "ms": ms, "default_ms": 2.0}


KEY_A = "combine|T=128|G=2|Dk=16|Dv=16|l=16|d=8|ls=16|n=3|float32"
KEY_B = "combine|T=1024|G=2|Dk=16|Dv=16|l=16|d=8|ls=16|n=3|float32"


def test_merge_keeps_fastest_entry_with_its_source(tmp_path):
    a = write(tmp_path / "a.json", {KEY_A: entry(16, 1.0), KEY_B: entry(32, 5.0)}, git_sha="aaa", triton="3.7")
    b = write(tmp_path / "b.json", {KEY_A: entry(64, 2.0), KEY_B: entry(128, 4.0)}, git_sha="bbb", triton="3.7")
    merged = merge([a, b])
    assert merged["meta"]["device"] == DEVICE and merged["meta"]["triton"] == "3.7"
    assert merged["meta"]["git_sha"] is None  # the sources disagree
    assert [m["file"] for m in merged["meta"]["merged_from"]] == [str(a), str(b)]
    assert merged["entries"][KEY_A]["params"]["block_r"] == 16 and merged["entries"][KEY_A]["source"]["file"] == str(a)
    assert merged["entries"][KEY_B]["params"]["block_r"] == 128
    assert merged["entries"][KEY_B]["source"]["git_sha"] == "bbb"
    # A merged file merged again keeps each entry's first source; an untimed entry loses to a timed one.
    path = write(tmp_path / "m.json", merged["entries"])
    c = write(tmp_path / "c.json", {KEY_A: {"params": entry(8, 0)["params"]}})
    again = merge([c, path])
    assert again["entries"][KEY_A]["source"]["file"] == str(a)
    # A graph-timed entry beats an eager one, even a faster one: at short lengths their times do not compare.
    graphed = write(tmp_path / "g.json", {KEY_A: {**entry(32, 1.5), "timed_as": "cuda-graph"}})
    assert merge([a, graphed])["entries"][KEY_A]["params"]["block_r"] == 32


def test_merge_prefers_a_short_search_to_the_entry_it_started_from(tmp_path):
    """A --fields search re-times the params it starts from in its own run; its winner replaces them even when the
    older entry's time, from another run, is lower. Siblings (searches of one start over the same fields) and
    searches over other fields compare by time."""
    old = write(tmp_path / "old.json", {KEY_A: entry(16, 1.0)})
    searched = {**entry(32, 1.1), "fields": ["block_r"], "start_ms": 1.2}
    new = write(tmp_path / "new.json", {KEY_A: searched})
    for order in ([old, new], [new, old]):
        assert merge(order)["entries"][KEY_A]["params"]["block_r"] == 32
    sibling = write(tmp_path / "sibling.json", {KEY_A: {**entry(64, 1.05), "fields": ["block_r"]}})
    assert merge([new, sibling])["entries"][KEY_A]["params"]["block_r"] == 64
    other_fields = {**entry(32, 0.9), "fields": ["num_warps"]}  # block_r differs outside its fields
    other = write(tmp_path / "other.json", {KEY_A: {**other_fields, "params": {**other_fields["params"],
                                                                               "num_warps": 8}}})
    assert merge([new, other])["entries"][KEY_A]["params"]["num_warps"] == 8  # by time: 0.9 < 1.1


def test_cli_cache_merge_writes_one_cache_and_refuses_other_cards(tmp_path, capsys):
    from nsa.cli import main
    a = write(tmp_path / "a.json", {KEY_A: entry(16, 3.0)})
    b = write(tmp_path / "b.json", {KEY_A: entry(64, 2.0), KEY_B: entry(32, 1.0)})
    out = tmp_path / "out"
    write(cache.config_path(DEVICE, out), {KEY_B: entry(256, 0.5)})  # already there: merged in, not lost
    assert main(["cache", "merge", str(a), str(b), "--out", str(out)]) == 0
    assert "and the file already there" in capsys.readouterr().out
    data = cache.read_file(cache.config_path(DEVICE, out), DEVICE)
    assert data["entries"][KEY_A]["params"]["block_r"] == 64 and data["entries"][KEY_B]["params"]["block_r"] == 256

    h100 = write(tmp_path / "h100.json", {KEY_A: entry(16, 0.1)}, device="nvidia-h100")
    with pytest.raises(DeviceMismatch, match="different cards"):
        merge([a, h100])
    target = tmp_path / "never.json"
    assert main(["cache", "merge", str(a), str(h100), "--out", str(target)]) == 1
    assert "refusing to merge caches of different cards" in capsys.readouterr().err and not target.exists()
    (tmp_path / "bad.json").write_text("{nope")
    assert main(["cache", "merge", str(a), str(tmp_path / "bad.json"), "--out", str(target)]) == 1
    assert "unreadable" in capsys.readouterr().err and not target.exists()


def test_bench_shares_whole_problems_so_baselines_share_the_card():
    from nsa.bench import share_by_problem
    items = [(s, f"p{p}", impl) for s in (0, 1) for p in range(5) for impl in ("nsa", "sdpa-cudnn", "sdpa-flash")]
    shares = [share_by_problem(items, World(rank, 3)) for rank in range(3)]
    assert sorted(item for share in shares for item in share) == sorted(items)  # each row exactly once
    for share in shares:
        problems = {item[:2] for item in share}
        assert len(share) == 3 * len(problems)  # every provider of a problem on the rank that has it
    assert [len({item[:2] for item in share}) for share in shares] == [4, 3, 3]  # 10 problems round-robin


@kernels_run
def test_sharded_tune_honours_skip_retune_and_match(tmp_path):
    """`nsa run` under torchrun tunes through the sharded path with ensure_tuned's skip; a world of one whose
    shard folder exists takes that path too."""
    path = cache.config_path("cpu-interpreter", tmp_path)
    search.shard_folder(path).mkdir(parents=True)
    skipped_key = cache.bucket_key("window", search.problem_shape(get_suite("smoke").problems[0]))
    result = search.tune("smoke", families=["window", "combine"], device="cpu", out=tmp_path, progress=False,
                         world=World(), skip={skipped_key})
    assert result["skipped"] == [skipped_key] and [row["key"].split("|")[0] for row in result["done"]] == ["combine"]
    search.shard_folder(path).mkdir(exist_ok=True)  # removed when the first run completed
    again = search.tune("smoke", families=["combine"], device="cpu", out=tmp_path, progress=False, world=World(),
                        retune=True)
    assert len(again["done"]) == 1 and not again["skipped"]
    search.shard_folder(path).mkdir(exist_ok=True)
    matched = search.tune("smoke", families=["window", "combine"], device="cpu", out=tmp_path, progress=False,
                          world=World(), retune=True, match=("window|",))
    assert [row["key"].split("|")[0] for row in matched["done"]] == ["window"] and not matched["skipped"]
