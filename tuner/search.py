"""`nsa tune`: search each kernel family's params per shape bucket, correctness first, into a config cache.

For each (family, bucket) of a suite's problems (fwd/bwd problems: the training families; decode problems: the
decode family, bucketed by the step's rows too), every candidate of `spaces.search_space` runs once and
is compared with the reference stage (float64 on CPU, fp32 on GPU); only then is it timed (nsa.timing: CUDA
events with L2 flushed on a GPU, perf_counter on a CPU; a decode step, and a training problem of up to
GRAPH_MAX_TOKENS tokens, as CUDA-graph replays: their kernels' time would otherwise hide behind the host's). A
wrong result, an exception (compile error), an OOM or a candidate slower than `candidate_timeout_s` is recorded
and skipped, never cached (the timeout is judged after the call returns: a hung kernel is not interrupted). Long
problems are checked at up to 8192 tokens per row (same config and shapes, as `nsa check` does) and timed at full
length. The timed objective is the family's forward kernel; for a `<family>_bwd` family, the family's forward and
backward with only the backward kernels' params varied (the forward at its default), checked on every gradient. On
a GPU the candidates within 5% of a bucket's fastest are then timed again in interleaved rounds, on one GPU
(`_confirm`), and ranked by the median of those. After each bucket the cache file is rewritten atomically;
buckets already in it are skipped, so an interrupted run resumes. With `fields`, a short search instead: only those
params fields vary, from each cached entry (see `tune`). The bucket in progress is kept candidate by candidate in a
shard file (as the ranks of a sharded run keep theirs): a budget or an interruption inside a long bucket loses at
most the candidate in progress.

Under torchrun (several GPUs, one process each) the candidates themselves are shared between the ranks and rank
0 writes the one cache, in the same format: see `_tune_sharded` and `nsa.tuner.distributed`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import logging
import subprocess
import time
from pathlib import Path

import torch

from nsa import reference
from nsa.accuracy import SELECTION_RTOL, allowed_error, relative_error, selection_mismatches
from nsa.checking import DEFAULT_MAX_TOKENS
from nsa.config import NSAConfig
from nsa.problems import random_inputs
from nsa.timing import TimerSettings, default_timer, is_cuda, time_call
from nsa.tuner import cache, spaces

log = logging.getLogger("nsa.tuner")

DEFAULT_CANDIDATE_TIMEOUT_S = 120.0
# Ranking candidates needs less than publishing a number: a quarter of nsa bench's GPU timing per candidate (a full
# tune times about two thousand), still the median of >= 5 L2-flushed calls.
GPU_TUNE_TIMER = TimerSettings(warmup_ms=10.0, rep_ms=50.0, min_reps=5, max_reps=250)
# Then the candidates within CONFIRM_MARGIN of a bucket's fastest (at most CONFIRM_MAX) are timed again in
# CONFIRM_ROUNDS interleaved rounds, on one GPU: single timings minutes apart (the card's clocks drift, and a
# sharded tune's candidates ran on different GPUs) moved a 64k bucket's medians by up to 8% on an H200 (session
# 19), more than the gains they chose between.
CONFIRM_MARGIN = 0.05
CONFIRM_MAX = 4
CONFIRM_ROUNDS = 3
# Training problems up to this many tokens are timed as CUDA-graph replays too: an eager step there is paced by
# the host (an H200's 1k step: 2.9 ms eager, 1.4 ms graphed, session 20), so eager timings ranked host noise.
# Longer steps stay eager: their kernels take tens of ms, and a graph would hold a second set of temporaries.
GRAPH_MAX_TOKENS = 16384


class Budget:
    """The seconds a tune may spend, counted from its start. A candidate starts only when the longest gap between
    two candidate starts so far (its evaluation, and a bucket's setup) still fits before the deadline: a run then
    ends near its budget with its results folded, rather than one long candidate (seconds at 128k) past it and
    into a caller's hard time limit. None: no limit."""

    def __init__(self, budget_s: float | None):
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.longest = 0.0
        self.last_start = None

    def start_next(self) -> bool:
        """Whether the next candidate fits; when it does, it counts as started now."""
        now = time.monotonic()
        if self.last_start is not None:
            self.longest = max(self.longest, now - self.last_start)
        if self.deadline is not None and now + self.longest > self.deadline:
            return False
        self.last_start = now
        return True


def _kernel(family: str):
    return importlib.import_module(cache.ALL_FAMILIES[family][0])


@dataclasses.dataclass
class Case:
    """One family on one problem: check(run_check(params)) says why it is wrong (None when right);
    run_time(params) is what gets timed (captured in a CUDA graph and replayed when cuda_graph)."""

    run_check: object
    check: object
    run_time: object
    cuda_graph: bool = False


def _gradients(fn, inputs, grad_out):
    """The gradients of sum(fn(*inputs) * grad_out) with respect to each input (fn's forward runs too)."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, grad_out)


def _close(ref, lo, dtype):
    allowed = allowed_error(ref, lo, dtype)

    def check(out):
        err = relative_error(out, ref)
        return None if err <= allowed else f"relative error {err:.3e} > allowed {allowed:.3e}"
    return check


def _stage(family: str, problem, device, *, with_check: bool):
    """(run(params) -> output, check(output) -> why it is wrong or None) on `problem`'s inputs (dense, seed 0);
    check is None unless with_check (the reference is only computed then)."""
    from nsa.kernels.runtime import compute_dtype
    from nsa.suites.problem import DTYPES
    if family in cache.DECODE_FAMILIES:
        return _decode_stage(problem, device, with_check=with_check)
    config: NSAConfig = problem.config
    dtype = DTYPES[problem.dtype]
    x = random_inputs(config, batch=problem.batch, seqlen=problem.seqlen, num_heads=problem.num_heads,
                      num_kv_heads=problem.num_kv_heads, head_dim=problem.head_dim, head_dim_v=problem.head_dim_v,
                      dtype=dtype, device=device, seed=0)
    ref_dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    hi = {name: t.to(ref_dtype) for name, t in x.items() if t is not None and t.is_floating_point()}
    cdt = compute_dtype(dtype)
    backward = family in cache.BACKWARD_FAMILIES
    family = cache.BACKWARD_FAMILIES.get(family, family)
    kernel = _kernel(family)

    def against_reference(kernel_fn, reference_fn, names, *extra):
        """The forward's output; for a backward family the gradients of `names` (forward and backward run)."""
        lo, hi_args = [x[n] for n in names], [hi[n] for n in names]
        if not backward:
            def run(p):
                return kernel_fn(*lo, *extra, config, params=p)
            if not with_check:
                return run, None
            return run, _close(reference_fn(*hi_args, *extra, config), reference_fn(*lo, *extra, config), cdt)
        shape = (problem.batch, problem.seqlen, problem.num_heads, problem.head_dim_v)
        grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)

        def run(p):
            return _gradients(lambda *t: kernel_fn(*t, *extra, config, params=p), lo, grad_out)
        if not with_check:
            return run, None
        exact = _gradients(lambda *t: reference_fn(*t, *extra, config), hi_args, grad_out.to(ref_dtype))
        same = _gradients(lambda *t: reference_fn(*t, *extra, config), lo, grad_out)
        checks = [(name, _close(e, s, cdt)) for name, e, s in zip(names, exact, same)]

        def check(grads):
            return next((f"d{name}: {why}" for (name, close), g in zip(checks, grads) if (why := close(g))), None)
        return run, check

    if family == "compression":
        return against_reference(kernel.compressed_attention, reference.compressed_attention, ("q", "k_cmp", "v_cmp"))
    if family == "selection":
        def run(p):
            return kernel.select_blocks(x["q"], x["k_cmp"], config, params=p)
        if not with_check:
            return run, None
        importance = reference.block_importance(hi["q"], hi["k_cmp"], config)
        seqlens = [[problem.seqlen]] * problem.batch

        def check(idx):
            bad = selection_mismatches(idx, importance, config, seqlens=seqlens, rtol=SELECTION_RTOL[dtype])
            return "; ".join(bad[:2]) or None
        return run, check
    if family == "selected":
        # The kernel's own default selection: realistic block lists at any T, and cheap.
        idx = _kernel("selection").select_blocks(x["q"], x["k_cmp"], config)
        return against_reference(kernel.selected_attention, reference.selected_attention, ("q", "k", "v"), idx)
    if family == "window":
        return against_reference(kernel.window_attention, reference.window_attention, ("q", "k", "v"))
    if family == "combine":
        gen = torch.Generator().manual_seed(1)
        shape = (problem.batch, problem.seqlen, problem.num_heads, problem.head_dim_v)
        outs = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
        gates = [x["g_cmp"], x["g_slc"], x["g_win"]]

        def run(p):
            return kernel.combine_branches(*outs, *gates, params=p)
        if not with_check:
            return run, None
        ref = reference.combine_branches(*(t.to(ref_dtype) for t in outs + gates))
        lo = reference.combine_branches(*outs, *gates)
        return run, _close(ref, lo, cdt)
    raise KeyError(f"unknown kernel family {family!r}; known: {', '.join(cache.ALL_FAMILIES)}")


def _decode_stage(problem, device, *, with_check: bool):
    """`_stage` of decode: nsa_decode over a kernels KVCache of the problem's tensors (`make_inputs`, seed 0),
    output (o, block_indices). The check is the reference's decode step (`nsa.reference.decode.decode_rows`) on the
    problem's reference cache: the selection must be valid for the reference importances
    (near-ties may swap in 16-bit on a GPU, SELECTION_RTOL), and o must match the reference output given the
    kernel's own selection, within twice the error of the same computation in the problem's dtype."""
    from nsa.inputs import resolve_scale
    from nsa.kernels import KVCache
    from nsa.kernels.runtime import compute_dtype
    from nsa.reference.decode import decode_rows
    from nsa.suites.problem import DTYPES, make_inputs
    config: NSAConfig = problem.config
    dtype = DTYPES[problem.dtype]
    x = make_inputs(problem, device=device, seed=0)
    kv = KVCache.from_tensors(x["k"], x["v"], x["k_cmp"], x["v_cmp"], config)
    gates = [x["g_cmp"], x["g_slc"], x["g_win"]]
    kernel = _kernel("decode")

    def run(p):
        return kernel.nsa_decode(x["q"], kv, *gates, config, params=p, return_block_indices=True)
    if not with_check:
        return run, None
    ref_dtype = torch.float64 if torch.device(device).type == "cpu" else torch.float32
    scale = resolve_scale(None, problem.head_dim)
    ref_cache = x["cache"]
    pos = torch.tensor([problem.seqlen - 1], device=device)  # every sequence holds T tokens, the new one last

    def reference_rows(b, t_dtype, block_indices=None):
        """Sequence b's decode row by the reference, from its cache, query and gates in t_dtype."""
        q, k, v, k_cmp, v_cmp = (t.to(t_dtype) for t in (x["q"][b], ref_cache.keys[b], ref_cache.values[b],
                                                          ref_cache.k_cmp[b], ref_cache.v_cmp[b]))
        return decode_rows(q, pos, k, v, k_cmp, v_cmp, *(g[b].to(t_dtype) for g in gates), config, scale,
                           block_indices=block_indices)

    def reference_output(block_indices, t_dtype):
        return torch.stack([reference_rows(b, t_dtype, block_indices[b].long())[0] for b in range(problem.batch)])

    importance = torch.stack([reference_rows(b, ref_dtype)[2] for b in range(problem.batch)])
    positions = pos.expand(problem.batch, 1)
    judged = {}  # selection -> verdict on o: candidates mostly agree on the selection, the reference runs once

    def check(out):
        o, block_indices = out
        bad = selection_mismatches(block_indices, importance, config, positions=positions,
                                   rtol=SELECTION_RTOL[dtype])
        if bad:
            return "; ".join(bad[:2])
        memo = (tuple(block_indices.shape), block_indices.cpu().numpy().tobytes())
        if memo not in judged:
            judged[memo] = _close(reference_output(block_indices, ref_dtype), reference_output(block_indices, dtype),
                                  compute_dtype(dtype))
        return judged[memo](o)
    return run, check


def build_case(family: str, problem, device, max_check_tokens: int = DEFAULT_MAX_TOKENS) -> Case:
    """The family on `problem`: checked against the reference at up to `max_check_tokens` tokens per row (the
    reference is slow and large at 64k; same config and shapes, as `nsa check` does), timed at full length."""
    small = problem.shortened(max_check_tokens)
    run_small, check = _stage(family, small, device, with_check=True)
    run_full = run_small if small == problem else _stage(family, problem, device, with_check=False)[0]
    return Case(run_check=run_small, check=check, run_time=run_full, cuda_graph=graph_timed(family, problem))


def graph_timed(family: str, problem) -> bool:
    """Whether the family's candidates on `problem` are timed as CUDA-graph replays (see GRAPH_MAX_TOKENS)."""
    return family in cache.DECODE_FAMILIES or problem.batch * problem.seqlen <= GRAPH_MAX_TOKENS


def timing_method(family: str, problem, device) -> str:
    """How the family's candidates on `problem` are timed on `device`, as each cache entry records it
    (`timed_as`): "cuda-graph" or "eager". Times of the two do not compare at short lengths."""
    return "cuda-graph" if is_cuda(device) and graph_timed(family, problem) else "eager"


def problem_shape(problem) -> cache.Shape:
    """The bucket shape of `problem`; a decode problem's rows are B x Hkv (one new token per sequence)."""
    from nsa.kernels.runtime import compute_dtype
    from nsa.suites.problem import DTYPES
    return cache.Shape(problem.seqlen, problem.num_heads // problem.num_kv_heads, problem.head_dim,
                       problem.head_dim_v, problem.config.cmp_block, problem.config.cmp_stride,
                       problem.config.slc_block, problem.config.slc_topn,
                       cache.dtype_name(compute_dtype(DTYPES[problem.dtype])),
                       rows=problem.batch * problem.num_kv_heads if problem.op == "decode" else None)


def buckets(suite, families) -> list[tuple[str, str, object]]:
    """(family, bucket key, representative problem) for the suite's problems, first one per key: fwd/bwd problems
    give the training families' buckets, decode problems the decode families'."""
    out, seen = [], set()
    for problem in suite.problems:
        if problem.op == "decode":
            wanted = [family for family in families if family in cache.DECODE_FAMILIES]
        elif problem.op in ("fwd", "bwd"):
            wanted = [family for family in families if family not in cache.DECODE_FAMILIES]
        else:
            continue
        if problem.seqlens is not None:  # tuned on the dense equivalent: same T bucket
            problem = dataclasses.replace(problem, seqlens=None, batch=1)
        for family in wanted:
            key = cache.bucket_key(family, problem_shape(problem))
            if key not in seen:
                seen.add(key)
                out.append((family, key, problem))
    return out


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def make_meta(device) -> dict:
    import triton
    dev = torch.device(device)
    meta = dict(device=cache.device_key(dev), format=cache.FORMAT_VERSION, triton=triton.__version__,
                torch=torch.__version__, git_sha=_git_sha(), search_space=spaces.space_hash(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta.update(device_name=props.name, compute_capability=f"{props.major}.{props.minor}",
                    sm_count=props.multi_processor_count)
    else:
        meta.update(device_name="cpu (Triton interpreter)", compute_capability=None, sm_count=None)
    return meta


def _read_existing(path: Path, device_key: str) -> dict:
    if not path.exists():
        return {}
    try:
        data = cache.read_file(path, device_key)
    except ValueError as e:
        raise ValueError(f"not a config cache for {device_key}: {e}; move it away or pick --out") from None
    if data["meta"].get("search_space") != spaces.space_hash():
        log.warning("tune: %s was searched over other spaces (hash %s, now %s); its buckets are kept and skipped: "
                    "delete them to search again", path, data["meta"].get("search_space"), spaces.space_hash())
    return data["entries"]


def _evaluate(case: Case, params, device, timeout_s: float):
    """(ms, None) when the candidate is right and timed, else (None, (kind, message))."""
    start = time.perf_counter()
    try:
        why = case.check(case.run_check(params))
        if why is not None:
            return None, ("wrong", why)
        ms = _time_candidate(case, params, device)
    except torch.cuda.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        return None, ("oom", str(e).splitlines()[0])
    except Exception as e:  # compile errors and launch failures: recorded, never cached
        return None, ("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if time.perf_counter() - start > timeout_s:
        return None, ("timeout", f"took {time.perf_counter() - start:.1f} s > {timeout_s:.0f} s")
    return ms, None


def _time_candidate(case: Case, params, device) -> float:
    """Median ms of `case` run with `params` (after its check), by the tuner's timer for the device."""
    timer = GPU_TUNE_TIMER if is_cuda(device) else default_timer(device)
    timing = time_call(lambda: case.run_time(params), device, timer, cuda_graph=case.cuda_graph)
    if "capture failed" in timing.timer:  # ranked against graphed candidates, this one carries the host's time
        log.warning("tune: %s timed eagerly: %s", params, timing.timer)
    return timing.median_ms


def _retimer(family: str, problem, cands: list, device, case=None):
    """time(i) -> ms of candidate i of a bucket on `case` (or its problem set up at the first call); None off
    a GPU, where the interpreter's timings rank nothing worth a second look."""
    if not is_cuda(device):
        return None
    made = [case] if case is not None else []

    def time_candidate(i: int) -> float:
        if not made:
            made.append(build_case(family, problem, device))
        return _time_candidate(made[0], cands[i], device)
    return time_candidate


def _confirm(outcomes: list, time_candidate, budget: Budget) -> tuple[list, int]:
    """(outcomes, how many were re-timed): the passing candidates within CONFIRM_MARGIN of the fastest, at most
    CONFIRM_MAX, timed again by `time_candidate(index)` in CONFIRM_ROUNDS interleaved rounds, each one's ms then
    the median of its rounds. Unchanged with fewer than two such candidates, without a timer, when the budget
    is spent, or when a round fails (the first timings stand)."""
    timed = sorted((ms, i) for i, (_, ms, failure) in enumerate(outcomes) if failure is None)
    close = [i for ms, i in timed if ms <= timed[0][0] * (1 + CONFIRM_MARGIN)][:CONFIRM_MAX] if timed else []
    if time_candidate is None or len(close) < 2 or not budget.start_next():
        return outcomes, 0
    rounds = {i: [] for i in close}
    try:
        for _ in range(CONFIRM_ROUNDS):
            for i in close:
                rounds[i].append(time_candidate(i))
    except Exception as e:  # out of memory beside another process, ...: keep the first timings
        log.warning("tune: re-timing the close candidates failed (%s: %s); the first timings stand",
                    type(e).__name__, e)
        torch.cuda.empty_cache()
        return outcomes, 0
    outcomes = list(outcomes)
    for i in close:
        params, _, failure = outcomes[i]
        outcomes[i] = (params, sorted(rounds[i])[CONFIRM_ROUNDS // 2], failure)
    return outcomes, len(close)


def _summarize(bkey: str, outcomes: list, pruned: dict, timed_as: str,
               refined: dict | None = None) -> tuple[dict, dict | None]:
    """(row, cache entry or None) of a bucket from its candidates' outcomes, in candidate order, each
    (params as a dict, ms or None, (kind, message) or None): the fastest right candidate wins (the first on a
    tie) and the first candidate, the default, gives default_ms; the entry records `timed_as`. With `refined` (a
    search of a few fields from the cached entry: {"fields", "default_ms"}) the first candidate is that entry
    and gives start_ms; the entry's default_ms is kept (None when it was timed another way) and the fields
    searched are recorded; the row lists every candidate as (the fields it changed, ms or None, failure kind or
    None): a short search is an A/B of those fields too."""
    best, first_ms, rejected, errors = None, None, {}, []
    for i, (params, ms, failure) in enumerate(outcomes):
        if failure is not None:
            kind, message = failure
            rejected[kind] = rejected.get(kind, 0) + 1
            errors.append(f"{kind}: {message[:200]} ({params})")
            continue
        if i == 0:
            first_ms = ms
        if best is None or ms < best[0]:
            best = (ms, params)
    row = dict(key=bkey, tried=len(outcomes), pruned=pruned, rejected=rejected, errors=errors[:5])
    if refined is not None:  # a few candidates: each one's time (or failure), by the fields it changed
        start = outcomes[0][0]
        row["candidates"] = [({k: v for k, v in params.items() if start.get(k) != v}, ms, failure and failure[0])
                             for params, ms, failure in outcomes]
    if best is None:
        log.warning("tune: %s: no candidate passed the reference check; nothing cached", bkey)
        return row, None
    entry = dict(params=best[1], ms=best[0], default_ms=first_ms, tried=len(outcomes), rejected=rejected,
                 pruned=pruned, timed_as=timed_as)
    if refined is not None:
        entry.update(default_ms=refined["default_ms"], start_ms=first_ms, fields=list(refined["fields"]))
    return {**row, **entry}, entry


def _decide(family: str, bkey: str, problem, cands: list, outcomes: list, pruned: dict, refined: dict | None, device,
            budget: Budget, case=None) -> tuple[dict, dict | None]:
    """(row, cache entry or None) of a bucket whose candidates all ran: the close ones re-timed (`_confirm`, on
    `case` or the problem set up anew), then `_summarize`d; the row counts the re-timed candidates."""
    outcomes, confirmed = _confirm(outcomes, _retimer(family, problem, cands, device, case), budget)
    row, entry = _summarize(bkey, outcomes, pruned, timing_method(family, problem, device), refined)
    row["confirmed"] = confirmed
    return row, entry


def shard_folder(path) -> Path:
    """Where the ranks of a sharded tune keep their finished candidates: `<device-key>.shards/` beside the cache
    file (the loader never reads it)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shards")


def tune(suite="smoke", *, families=None, device=None, out=None, budget_s: float | None = None,
         candidate_timeout_s: float = DEFAULT_CANDIDATE_TIMEOUT_S, progress: bool = True, world=None,
         skip=frozenset(), retune: bool = False, match=(), fields=()) -> dict:
    """Tune every (family, bucket) of `suite` on `device` into `out` (a folder; the user cache by default),
    except the bucket keys in `skip` and, unless `retune`, those the file already holds (a retuned bucket's
    entry is replaced: for a search space that grew, or a kernel that changed). With `match`, only the buckets
    whose key contains every one of those strings (e.g. "|G=4|" for one group size of the gqa suite).

    With `fields` (params field names, e.g. ("fwd_tma", "fwd_num_stages"), or "name=v1/v2" for given values of
    any params field, `spaces.field_space`), a short search: for every bucket of a family that searches some of
    those fields, the candidates are its cached params (the file's, or else those of the caches in use) with only
    those fields varied over their ranges (the cached params first);
    the winner goes into the file, keeping the entry's default_ms and recording start_ms (the cached params' time
    now) and the fields. For a flag a kernel gained, or one field of a tuned entry, at a few candidates a bucket
    instead of the whole space; into another folder, an A/B that leaves the caches in use alone. Buckets no cache
    holds are left to a full tune ("untuned").

    Returns {"path", "done": [rows of buckets tuned now], "skipped": [keys already in the file], "untuned":
    [keys `fields` passed over], "stopped": True when the budget ran out}. Each row: key, params, ms,
    default_ms, tried, rejected {kind: count}, errors (and start_ms, fields, candidates with `fields`).

    With `world` (a `nsa.tuner.distributed.World` of several ranks, started) the candidates are shared between
    the ranks, see `_tune_sharded`; so they are too when a shard folder of an interrupted sharded run is there.
    """
    from nsa.progress import progress_bar

    from nsa.suites import get_suite
    budget = Budget(budget_s)
    suite = get_suite(suite) if isinstance(suite, str) else suite
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    families = list(families or cache.ALL_FAMILIES)
    searched = {name for family in families for name in spaces.field_space(family, fields)}
    unsearched = {spaces.parse_field(field)[0] for field in fields} - searched
    if unsearched:
        raise ValueError(f"no family of {', '.join(families)} searches {', '.join(sorted(unsearched))} here (a "
                         "plain name must be in a kernel's declared search space: SEARCH_SPACE, "
                         "BACKWARD_SEARCH_SPACE, or the INTERPRETER_ ones on a CPU; name=v1/v2 may be any field "
                         "of a family's params)")
    key = cache.device_key(device)
    path = cache.config_path(key, out if out is not None else cache.user_dir())
    shards = shard_folder(path)
    if (world is not None and world.size > 1) or shards.exists():
        from nsa.tuner.distributed import World
        return _tune_sharded(suite, families, device, path, world or World(), budget=budget,
                             candidate_timeout_s=candidate_timeout_s, progress=progress, retune=retune,
                             skip=skip, match=match, fields=fields)
    from nsa.tuner.distributed import ShardLog, remove_shards
    entries = _read_existing(path, key)
    todo, skipped, untuned = _plan_buckets(suite, families, entries, device, retune=retune, skip=skip, match=match,
                                           fields=fields)
    result = dict(path=str(path), done=[], skipped=skipped, untuned=untuned, stopped=False)
    # The bucket in progress, one record per candidate: a run stopped inside it leaves the shard folder, and the
    # next run resumes through the sharded path (a world of one), redoing none of them.
    shard = ShardLog(shards, 0)
    bar = progress_bar(total=sum(len(t[3]) for t in todo), desc=f"tune {key}", unit="cand", enabled=progress)
    try:
        for family, bkey, problem, cands, pruned, refined in todo:
            bar.set_postfix_str(bkey)
            try:
                case = build_case(family, problem, device)
            except Exception as e:  # inputs or reference out of memory, a kernel error in the default selection
                log.warning("tune: %s: could not set up the problem: %s: %s", bkey, type(e).__name__, e)
                bar.update(len(cands))
                result["done"].append(dict(key=bkey, tried=0, pruned=pruned, rejected={"setup": 1},
                                           errors=[f"setup: {type(e).__name__}: {str(e)[:200]}"]))
                continue
            outcomes = []
            for i, params in enumerate(cands):
                if not budget.start_next():
                    result["stopped"] = True
                    log.warning("tune: budget spent; %s left for a later run (it resumes from its %d finished "
                                "candidates)", bkey, len(outcomes))
                    return result
                ms, failure = _evaluate(case, params, device, candidate_timeout_s)
                bar.update(1)
                shard.append(_record(bkey, i, params, ms, failure))
                outcomes.append((dataclasses.asdict(params), ms, failure))
            row, entry = _decide(family, bkey, problem, cands, outcomes, pruned, refined, device, budget, case)
            if entry is not None:
                entries[bkey] = entry
                cache.write_atomic(path, dict(meta=make_meta(device), entries=entries))
            remove_shards(shards)  # the bucket is decided: nothing of it to resume
            result["done"].append(row)
    finally:
        bar.close()
    return result


def _plan_buckets(suite, families, entries: dict, device, *, retune: bool, skip, match=(),
                  fields=()) -> tuple[list, list, list]:
    """(buckets to tune as (family, key, problem, candidates, pruned, refined), keys skipped, keys left untuned):
    every bucket of the suite's families whose key contains every string of `match`, except those in `skip` and,
    unless `retune`, those `entries` (the cache file's) already hold. With `fields` (see `tune`): the buckets of
    the families that search some of the fields, from their cached params (refined: {"fields", "default_ms"},
    else None) in `entries` or, failing that, in the first cache of the lookup order that holds the bucket (so a
    short search into another folder starts from the params in use); the others are left untuned."""
    in_use = [data["entries"] for _, _, data in cache.in_use(cache.device_key(device)) if data is not None] \
        if fields else []
    todo, skipped, untuned = [], [], []
    for family, bkey, problem in buckets(suite, families):
        space = spaces.field_space(family, fields) if fields else None
        if not all(text in bkey for text in match) or space == {}:
            continue
        if bkey in skip or (bkey in entries and not retune and not fields):
            skipped.append(bkey)
            continue
        start = refined = None
        if fields:
            cached = next((found[bkey] for found in (entries, *in_use) if bkey in found), None)
            try:
                start = None if cached is None else cache.params_class(family)(**cached["params"])
            except (TypeError, ValueError) as e:  # an entry lookups ignore too: a full tune replaces it
                log.warning("tune: %s: cached params not valid (%s); left to a full tune", bkey, e)
            if start is None:
                untuned.append(bkey)
                continue
            same_timing = cache.entry_timing(family, cached) == timing_method(family, problem, device)
            refined = dict(fields=list(space), default_ms=cached.get("default_ms") if same_timing else None)
        cands, pruned = spaces.search_space(family, problem_shape(problem), problem.config, problem.num_heads,
                                            problem.num_kv_heads, device=device, space=space, start=start)
        todo.append((family, bkey, problem, cands, pruned, refined))
    return todo, skipped, untuned


def _record(bkey: str, index: int, params, ms, failure) -> dict:
    """A shard file's record of one candidate, through JSON so the copy in memory equals the one read back."""
    return json.loads(json.dumps(dict(key=bkey, index=index, params=dataclasses.asdict(params), ms=ms,
                                      failure=failure)))


def _tune_sharded(suite, families, device, path: Path, world, *, budget: Budget, candidate_timeout_s, progress,
                  retune=False, skip=frozenset(), match=(), fields=()) -> dict:
    """`tune` over the ranks of `world`: the work is (family, bucket, candidate), shared round-robin.

    1. Every rank reads the shard files it can see (`shard_folder(path)`; hosts need not share a disk) and rank 0
       gathers them. Rank 0 reads the cache, and plans: every candidate of every bucket not in the cache, less
       those some shard already holds (records whose params differ from today's candidate, and setup failures,
       are redone).
    2. Each rank evaluates its share of the plan (`World.share`) on its GPU, appending every outcome to its own
       shard file as it finishes, so a rank that dies loses only the candidate in progress.
    3. Rank 0 gathers the outcomes and folds every bucket whose candidates are all known into the one cache file,
       through the single-GPU writer and `_summarize`: the same format and the same choice. When nothing is left
       the shard files are deleted; otherwise (a budget, a dead rank) they stay and the next run resumes.

    Returns `tune`'s dict (the same on every rank), plus "complete" (nothing left to do) and "ranks".
    """
    from nsa.progress import progress_bar

    from nsa.tuner.distributed import ShardLog, read_shards, remove_shards
    key = cache.device_key(device)
    shards = shard_folder(path)
    seen = world.all_gather(read_shards(shards))
    kept = {}  # rank 0's state between planning and folding: the cache's entries and the known outcomes

    def plan() -> dict:
        entries = _read_existing(path, key)
        todo, skipped, untuned = _plan_buckets(suite, families, entries, device, retune=retune, skip=skip,
                                               match=match, fields=fields)
        items, known = [], {}
        records = [record for rank_records in seen for record in rank_records]
        for b, (_, bkey, _, cands, _, _) in enumerate(todo):
            want = {i: _record(bkey, i, c, None, None)["params"] for i, c in enumerate(cands)}
            for record in records:  # a setup failure (inputs out of memory, ...) is not the candidate's: retried
                i, failure = record.get("index"), record.get("failure") or [None]
                same = record.get("key") == bkey and i in want and record.get("params") == want[i]
                if same and failure[0] != "setup":
                    known.setdefault((bkey, i), record)
            items += [(b, i) for i in range(len(cands)) if (bkey, i) not in known]
        kept.update(entries=entries, known=known)
        return dict(skipped=skipped, untuned=untuned, buckets=todo, items=items)

    work = world.on_main(plan)
    mine = world.share(work["items"])
    shard = ShardLog(shards, world.rank)
    made, stopped = [], False
    bar = progress_bar(total=len(mine), desc=f"tune {key} rank {world.rank}/{world.size}", unit="cand",
                       enabled=progress and world.is_main)
    current, case, setup_error = None, None, None
    try:
        for b, i in mine:
            if not budget.start_next():
                stopped = True
                log.warning("tune: rank %d: budget spent; %d candidates left for a later run (it resumes)",
                            world.rank, len(mine) - len(made))
                break
            family, bkey, problem, cands, _, _ = work["buckets"][b]
            if b != current:
                current, case, setup_error = b, None, None  # drop the last bucket's inputs first
                bar.set_postfix_str(bkey)
                try:
                    case = build_case(family, problem, device)
                except Exception as e:  # as in `tune`: recorded against each of this rank's candidates
                    log.warning("tune: %s: could not set up the problem: %s: %s", bkey, type(e).__name__, e)
                    setup_error = ("setup", f"{type(e).__name__}: {str(e)[:200]}")
            if setup_error is not None:
                ms, failure = None, setup_error
            else:
                ms, failure = _evaluate(case, cands[i], device, candidate_timeout_s)
            record = _record(bkey, i, cands[i], ms, failure)
            shard.append(record)
            made.append(record)
            bar.update(1)
    finally:
        bar.close()
    case = None
    gathered = world.gather((made, stopped))

    def fold() -> dict:
        entries, known = kept["entries"], kept["known"]
        for rank_made, _ in gathered:
            for record in rank_made:
                known.setdefault((record["key"], record["index"]), record)
        rows, complete, changed = [], True, False
        for family, bkey, problem, cands, pruned, refined in work["buckets"]:
            outcomes = [known.get((bkey, i)) for i in range(len(cands))]
            if any(o is None for o in outcomes):
                complete = False
                continue
            row, entry = _decide(family, bkey, problem, cands, [(o["params"], o["ms"], o["failure"]) for o in outcomes],
                                 pruned, refined, device, budget)
            rows.append(row)
            if entry is not None:
                entries[bkey], changed = entry, True
        if changed:
            cache.write_atomic(path, dict(meta=make_meta(device), entries=entries))
        return dict(path=str(path), done=rows, skipped=work["skipped"], untuned=work["untuned"],
                    stopped=any(rank_stopped for _, rank_stopped in gathered), complete=complete, ranks=world.size)

    result = world.on_main(fold)
    if result["complete"]:
        remove_shards(shards, world.rank)
        if world.is_main:
            remove_shards(shards)
    return result


def describe(device=None) -> str:
    """What lookups use on `device`: every folder in lookup order, and the entries of each file found."""
    key = cache.device_key(device)
    lines = [f"device key: {key}  (lookup: explicit params > ${cache.ENV_DIR} > user cache > shipped > default)"]
    for source, path, data in cache.in_use(key):
        if data is None:
            lines.append(f"  {source:15} {path}: {'invalid (ignored)' if path.exists() else 'none'}")
            continue
        meta = data["meta"]
        lines.append(f"  {source:15} {path}: {len(data['entries'])} entries (triton {meta.get('triton')}, torch "
                     f"{meta.get('torch')}, {meta.get('date')}, git {str(meta.get('git_sha'))[:10]})")
        for bkey, entry in sorted(data["entries"].items()):
            gain = ""
            if entry.get("ms") and entry.get("default_ms"):
                gain = f"  {entry['default_ms'] / entry['ms']:.2f}x vs default"
            params = ",".join(f"{k}={v}" for k, v in entry["params"].items())
            timing = cache.entry_timing(bkey.split("|")[0], entry)
            lines.append(f"    {bkey}: {entry.get('ms', float('nan')):.4g} ms ({timing}){gain}  {params}")
    return "\n".join(lines)


def covered_buckets(suite, device_key: str) -> tuple[list[str], list[str]]:
    """(keys of `suite`'s buckets some cache file in the lookup order holds exactly, keys none does)."""
    from nsa.suites import get_suite
    suite = get_suite(suite) if isinstance(suite, str) else suite
    files = [data["entries"] for _, _, data in cache.in_use(device_key) if data is not None]
    keys = list(dict.fromkeys(bkey for _, bkey, _ in buckets(suite, list(cache.ALL_FAMILIES))))
    have = [k for k in keys if any(k in entries for entries in files)]
    return have, [k for k in keys if k not in have]


def ensure_tuned(device=None, *, suite: str = "paper", budget_s: float = 1800.0, world=None) -> str:
    """What `nsa run` calls: report the config caches in use for `device`; on a GPU, first tune the buckets of
    `suite` that no cache holds into the user cache (within `budget_s`; a later run resumes), so a partial
    shipped cache is completed rather than trusted; with `world` (torchrun, started) the ranks share the
    candidates. On a CPU it never tunes."""
    key = cache.device_key(device)
    found = [(source, path, data) for source, path, data in cache.in_use(key) if data is not None]
    have, missing = covered_buckets(suite, key)
    files = "; ".join(f"{path} ({source}, {len(data['entries'])} entries)" for source, path, data in found)
    status = f"config cache for {key}: {files or 'none'}; {len(have)} of {len(have) + len(missing)} {suite} buckets"
    if not missing or torch.device(device or "cpu").type != "cuda":
        if not found and torch.device(device or "cpu").type != "cuda":
            return (f"no config cache for {key}: default params (CPU: nothing tuned here; "
                    f"`nsa tune --suite smoke` exercises the tuner)")
        return status
    result = tune(suite, device=device, budget_s=budget_s, skip=set(have), world=world,
                  progress=world is None or world.is_main)
    state = "budget spent, rerun to resume" if result["stopped"] else "complete"
    return f"{status}; tuned {len(result['done'])} more into {result['path']} ({state})"
