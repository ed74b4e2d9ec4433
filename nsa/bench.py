"""Running a suite: every problem with every provider, checked, then timed, one results row each.

A row's life: skipped with its reason (provider unavailable here, or problem outside what it implements);
else checked against its oracle (`nsa.checking`), and only a pass is timed (`nsa.timing`): a wrong answer is
recorded as `fail` with its error and never gets a time, so it can never be plotted as fast. Exceptions are
recorded (`error`, or `oom` for out-of-memory, as the 128k problems may be), never raised, so one broken
implementation does not stop the others. Rows go to a `ResultsStore` as they are made; rows already in it are
skipped, which is how an interrupted run resumes. Under torchrun `run_sharded` shares the rows between GPUs.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import platform
import re
import shutil
from pathlib import Path

import torch

from nsa.checking import DEFAULT_MAX_TOKENS, check
from nsa.results import COLUMNS, ResultsStore
from nsa.suites import Suite, config_label, make_inputs
from nsa.suites.problem import Problem
from nsa.suites.providers import Provider, nsa_version
from nsa.progress import progress_bar
from nsa.timing import TimerSettings, default_timer, is_cuda, measure_ceilings, time_call
from nsa.work import op_work

CPU_TIMING_NOTE = ("timings on a CPU (Triton interpreter or plain PyTorch) mean nothing about kernel speed; "
                   "this run only shows that the harness works end to end")
ERROR_CHARS = 400


@dataclasses.dataclass(frozen=True)
class BenchSettings:
    """How to run: the device, which ops, checks only or checks and timings, the checked length, the timer."""

    device: str
    ops: tuple[str, ...] | None = None
    check_only: bool = False
    check_max_tokens: int = DEFAULT_MAX_TOKENS
    timer: TimerSettings | None = None


def device_name(device) -> str:
    """The `gpu` column: the CUDA device's name, or "cpu (<processor>)"."""
    if is_cuda(device):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()})"


def device_slug(device) -> str:
    """A folder-friendly device name: "NVIDIA H200" -> "nvidia-h200"."""
    name = device_name(device) if is_cuda(device) else "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device) -> dict:
    """What the report's environment block shows: machine, versions, device, ceilings (measured here, once)."""
    from nsa.machine import describe
    return {"machine": describe(), "device": str(device), "gpu": device_name(device), "nsa_version": nsa_version(),
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "ceilings": measure_ceilings(device),
            "note": None if is_cuda(device) else CPU_TIMING_NOTE}


def open_store(folder, device) -> ResultsStore:
    """The results folder for a run on `device`: its environment written (ceilings measured) when new; a folder
    that holds another device's results is refused rather than mixed."""
    store = ResultsStore(folder)
    env = store.environment()
    if env is None:
        store.write_environment(environment(device))
    elif env.get("gpu") != device_name(device):
        raise ValueError(f"{folder} holds results from {env.get('gpu')!r}, not {device_name(device)!r}: "
                         "choose another output folder")
    return store


def base_row(gpu: str, suite: Suite, problem: Problem, provider: Provider) -> dict:
    """A results row with what is known before running: device, problem and provider columns; the rest None."""
    row = dict.fromkeys(COLUMNS)
    impl_config = provider.config(problem)
    row.update(gpu=gpu, suite=suite.name, problem=problem.key, impl=provider.name, baseline=provider.baseline,
               op=problem.op, dtype=problem.dtype, T=problem.seqlen, batch=problem.batch, Hq=problem.num_heads,
               Hkv=problem.num_kv_heads, D=problem.head_dim, Dv=problem.head_dim_v,
               sequences=len(problem.seqlens) if problem.seqlens else None,
               seqlens=" ".join(map(str, problem.seqlens)) if problem.seqlens else "",
               config=config_label(problem.config),
               impl_config=config_label(impl_config) if impl_config else "dense causal attention",
               impl_detail="", error="", checked="")
    return row


def _failure(exc: BaseException, stage: str) -> tuple[str, str]:
    verdict = "oom" if isinstance(exc, torch.cuda.OutOfMemoryError) else "error"
    message = " ".join(f"{stage}: {type(exc).__name__}: {exc}".split())
    return verdict, message[:ERROR_CHARS]


def _free(device) -> None:
    gc.collect()
    if is_cuda(device):
        torch.cuda.empty_cache()


def timed_call(provider: Provider, problem: Problem, device, seed: int):
    """The timed closure at full size, and the implementation detail: fwd/decode call the op; bwd runs the
    forward once here and times the backward of its output (retain_graph, so it can repeat)."""
    backward = problem.op == "bwd"
    x = make_inputs(problem, device=device, seed=seed, requires_grad=backward)
    prepared = provider.prepare(problem, x)
    if not backward:
        return prepared.run, prepared.detail
    out = prepared.run()
    grad_out = torch.randn_like(out)
    leaves = [x[n] for n in provider.grad_names]
    return (lambda: torch.autograd.grad(out, leaves, grad_out, retain_graph=True, allow_unused=True),
            prepared.detail)


def _peak_memory_gib(call, device, before: int) -> float | None:
    """GPU memory at the peak of one call, over `before`, what was allocated before its inputs were made (so
    the inputs, and for bwd the forward's saved tensors, count)."""
    if not is_cuda(device):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def measure(suite: Suite, problem: Problem, provider: Provider, settings: BenchSettings, ceilings: dict | None,
            seed: int = 0) -> dict:
    """One result row: skip, check, and (unless check_only or the check failed) time `provider` on `problem`.

    `ceilings` (from `measure_ceilings`) turn the achieved rates into fractions of the card's; None leaves them out.
    """
    device = settings.device
    row = base_row(device_name(device), suite, problem, provider)
    reason = provider.unavailable(device) or provider.unsupported(problem)
    if reason:
        row.update(verdict="skip", error=reason)
        return row
    try:
        verdict = check(provider, problem, device=device, max_tokens=settings.check_max_tokens, seed=seed)
    except Exception as e:
        row["verdict"], row["error"] = _failure(e, "check")
        return row
    finally:
        _free(device)
    row.update(verdict="pass" if verdict.passed else "fail", checked=verdict.summary, max_rel_err=verdict.error,
               allowed_rel_err=verdict.allowed, impl_detail=verdict.detail)
    if not verdict.passed:
        row["error"] = f"relative error {verdict.error:.3e} > allowed {verdict.allowed:.3e}"
    if not verdict.passed or settings.check_only:
        return row
    call = None
    try:
        before = torch.cuda.memory_allocated(device) if is_cuda(device) else 0
        call, row["impl_detail"] = timed_call(provider, problem, device, seed)
        peak = _peak_memory_gib(call, device, before)
        timing = time_call(call, device, settings.timer or default_timer(device), cuda_graph=problem.op == "decode")
    except Exception as e:
        row["verdict"], row["error"] = _failure(e, "timing")
        return row
    finally:
        del call  # the closure holds the inputs: drop it before freeing the cache
        _free(device)
    work = op_work(problem, provider.config(problem))
    seconds = timing.median_ms * 1e-3
    row.update(ms=timing.median_ms, ms_p20=timing.p20_ms, ms_p80=timing.p80_ms, reps=timing.reps,
               timer=timing.timer, tflop=work.flops / 1e12, tflops=work.flops / seconds / 1e12,
               gbytes=work.bytes / 1e9, gbps=work.bytes / seconds / 1e9, peak_mem_gib=peak)
    if ceilings:
        row.update(frac_matmul_peak=row["tflops"] / ceilings["matmul_tflops"],
                   frac_copy_bw=row["gbps"] / ceilings["copy_gbps"])
    return row


def pending(suite: Suite, providers: list[Provider], store: ResultsStore | None, settings: BenchSettings) -> list:
    """(problem key, provider name) of every row of `suite` that `run_suite` would make, in its order."""
    return [(problem.key, provider.name) for problem in suite.problems
            if settings.ops is None or problem.op in settings.ops for provider in providers
            if store is None or not store.has(suite.name, problem.key, provider.name)]


def run_suite(suite: Suite, providers: list[Provider], store: ResultsStore | None, settings: BenchSettings, *,
              progress: bool = True, only=None) -> list[dict]:
    """Measure every (problem, provider) of `suite` not yet in `store`, adding each row as it is made.

    Returns the rows made by this call (rows found in the store are left as they are). Without a store
    nothing is kept or skipped (`nsa check`). `only`, a set of (problem key, provider name), restricts the run
    to those rows (a rank's share). Progress goes to stderr (`nsa.progress`).
    """
    problems = [p for p in suite.problems if settings.ops is None or p.op in settings.ops]
    if only is not None:
        only = set(only)
        problems = [p for p in problems if any((p.key, provider.name) in only for provider in providers)]
    ceilings = None
    if not settings.check_only:
        ceilings = (store.environment() or {}).get("ceilings") if store else None
        ceilings = ceilings or measure_ceilings(settings.device)
    made = []
    with progress_bar(total=len(problems) * len(providers), desc=suite.name, unit="row", enabled=progress) as bar:
        for problem in problems:
            for provider in providers:
                bar.set_postfix_str(f"{provider.name} {problem.key}", refresh=False)
                mine = only is None or (problem.key, provider.name) in only
                if mine and (store is None or not store.has(suite.name, problem.key, provider.name)):
                    row = measure(suite, problem, provider, settings, ceilings)
                    made.append(row)
                    if store is not None:
                        store.add(row)
                bar.update()
    return made


# ----------------------------------------------------------------------------------------------------------------
# Several GPUs: one process each under torchrun
# ----------------------------------------------------------------------------------------------------------------

SHARDS_DIR = "shards"


def _shard_rows(root: Path) -> list[dict]:
    """Every row of every rank's results folder under `root`."""
    if not root.is_dir():
        return []
    return [row for folder in sorted(root.glob("rank*")) for row in ResultsStore(folder).rows]


def _fold(store: ResultsStore, suites: list[Suite], providers: list[Provider], rows: list[dict]) -> list[dict]:
    """Add to `store` the rows it lacks, in the order a one-process run makes them; returns those added."""
    order = {(suite.name, problem.key, provider.name): n for n, (suite, problem, provider) in
             enumerate((s, p, v) for s in suites for p in s.problems for v in providers)}
    added = []
    for row in sorted(rows, key=lambda r: order.get((r["suite"], r["problem"], r["impl"]), len(order))):
        if not store.has(row["suite"], row["problem"], row["impl"]):
            store.add(row)
            added.append(row)
    return added


def share_by_problem(items: list, world) -> list:
    """This rank's share of the planned rows (suite index, problem key, provider): whole problems round-robin,
    so that each problem's baselines run on the same card as its nsa row (the speedups compare them)."""
    problems = list(dict.fromkeys(tuple(item[:2]) for item in items))
    mine = set(world.share(problems))
    return [item for item in items if tuple(item[:2]) in mine]


def run_sharded(suites: list[Suite], providers: list[Provider], folder, settings: BenchSettings, world, *,
                progress: bool = True) -> list[dict]:
    """`run_suite` for several suites shared between the ranks of `world` (`nsa.tuner.distributed.World`,
    started; `settings.device` is this rank's), into one results folder.

    Rank 0 opens `folder` (its environment, ceilings included, is measured there once) and plans every row not
    yet in it; whole problems are shared round-robin (`share_by_problem`). Each rank writes its rows as it makes them to its own results
    folder, `folder/shards/rank<k>` (same environment), so a rank that dies loses only the row in progress.
    At the end rank 0 adds every rank's rows to `folder` in the order one process would have made them. When no
    row is left the shard folders are deleted; otherwise the next run, with any number of ranks, takes their
    rows in first. Returns the rows made (or taken in from shards) by this run, every rank's, on every rank.
    """
    folder = Path(folder)
    root = folder / SHARDS_DIR
    env = world.on_main(lambda: open_store(folder, settings.device).environment())
    seen = world.all_gather(_shard_rows(root))  # hosts need not share a disk: each reads what it sees
    kept = {}

    def plan() -> list:
        store = ResultsStore(folder)
        kept.update(store=store, added=_fold(store, suites, providers, [r for rows in seen for r in rows]))
        return [(s, key, impl) for s, suite in enumerate(suites)
                for key, impl in pending(suite, providers, store, settings)]

    items = world.on_main(plan)
    mine = share_by_problem(items, world)
    shard = ResultsStore(root / f"rank{world.rank}")
    if shard.environment() is None:
        shard.write_environment(env)
    made = []
    for s, suite in enumerate(suites):
        only = {(key, impl) for t, key, impl in mine if t == s}
        if only:
            made += run_suite(suite, providers, shard, settings, progress=progress and world.is_main, only=only)
    gathered = world.gather(made)

    def fold():
        store = kept["store"]
        added = kept["added"] + _fold(store, suites, providers, [r for rows in gathered for r in rows])
        return added, all(store.has(suites[s].name, key, impl) for s, key, impl in items)

    rows, complete = world.on_main(fold)
    if complete:
        shutil.rmtree(shard.folder, ignore_errors=True)
        if world.is_main:
            shutil.rmtree(root, ignore_errors=True)
    return rows
