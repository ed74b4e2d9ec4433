"""The `nsa` command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path


def cmd_info(args) -> int:
    from nsa.machine import describe
    info = describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("python", "platform", "nsa", "torch", "triton", "cuda", "cuda_available"):
        print(f"{key:16} {info[key]}")
    if info["gpus"]:
        for gpu in info["gpus"]:
            details = ", ".join(f"{k}={v:.0f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in gpu.items() if k not in ("index", "name"))
            print(f"gpu {gpu['index']:<12} {gpu['name']} ({details})")
    else:
        print("gpu              none found (no NVIDIA GPU, driver or nvidia-ml-py)")
    print("flash attention implementations:")
    for label, version in info["flash_attention"].items():
        print(f"  {label:28} {version or 'not available'}")
    return 0


def cmd_suites(args) -> int:
    from nsa.suites import SUITES
    for suite in SUITES.values():
        print(f"{suite.name:8} {len(suite.problems):3} problems  ops {','.join(suite.ops):15} {suite.description}")
        if args.verbose:
            for problem in suite.problems:
                print(f"    {problem.key}")
    from nsa.suites.training import DESCRIPTION
    print(f"{'train':8} (nsa run --suite train) {DESCRIPTION}")
    return 0


def _device_type(device: str) -> str:
    import torch
    return torch.device(device).type


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _rerun_in_interpreter(args) -> int | None:
    """On a CPU, run this same command in a child process with TRITON_INTERPRET=1 and return its exit code.

    Triton decides at import whether kernels are interpreted, so the variable cannot be switched on in this
    process once it runs; a child with it set is the honest way. None when no rerun is needed.
    """
    if _device_type(args.device) != "cpu" or _interpreting():
        return None
    print("CPU: running again under the Triton interpreter (TRITON_INTERPRET=1)", flush=True)
    return subprocess.call([sys.executable, "-m", "nsa", *args.argv], env={**os.environ, "TRITON_INTERPRET": "1"})


def _print_verdicts(rows) -> None:
    import pandas as pd
    table = pd.DataFrame(rows)
    if table.empty:
        print("nothing to do: every row is already in the results, or no problem matched")
        return
    print(pd.crosstab([table["suite"], table["impl"]], table["verdict"]).to_string())
    for (impl, reason), skipped in table[table["verdict"] == "skip"].groupby(["impl", "error"]):
        print(f"skipped {impl} ({len(skipped)} rows): {reason}")
    for row in table[table["verdict"].isin(["fail", "error", "oom"])].itertuples():
        print(f"{row.verdict.upper()}: {row.suite} {row.impl} {row.problem}: {row.error}")


def _bench(args, suite_names, *, check_only=False, world=None) -> int:
    """Check (and unless check_only time) the suites; write results and the report unless check_only. With
    `world` (several ranks under torchrun, started) the problems are shared between the ranks (`run_sharded`) and
    rank 0 writes the results and the report."""
    from nsa.bench import CPU_TIMING_NOTE, BenchSettings, device_slug, open_store, run_sharded, run_suite
    from nsa.results import ResultsStore
    from nsa.reports import render_report
    from nsa.suites import get_providers, get_suite
    suites = [get_suite(name) for name in suite_names]
    providers = get_providers(args.providers)
    settings = BenchSettings(device=args.device, ops=tuple(args.ops) if args.ops else None, check_only=check_only,
                             check_max_tokens=args.check_tokens)
    main = world is None or world.is_main
    if _device_type(args.device) == "cpu" and not check_only and main:
        print(f"NOTE: {CPU_TIMING_NOTE}")
    out = None if check_only else Path(args.out or Path("nsa-results") / device_slug(args.device))
    if world is not None and world.size > 1 and not check_only:
        rows = run_sharded(suites, providers, out, settings, world)
        if not main:
            return 0  # rank 0 says how it went: a rank exiting non-zero first would make torchrun stop it
        store = ResultsStore(out)
        print(f"{world.size} ranks shared the problems (each problem's rows on one GPU)")
    else:
        store = None if check_only else open_store(out, args.device)
        rows = []
        for suite in suites:
            rows += run_suite(suite, providers, store, settings)
    _print_verdicts(rows)
    if store is not None and store.csv_path.exists():
        print(f"results: {store.csv_path}")
        print(f"report: {render_report(out).resolve()}")
    return 1 if any(row["verdict"] in ("fail", "error") for row in rows) else 0


def cmd_bench(args) -> int:
    code = _rerun_in_interpreter(args)
    if code is not None:
        return code
    from nsa.tuner.distributed import World
    world = World.from_env()  # under torchrun: one rank per GPU, the suite's problems shared between them
    if world.size == 1:
        return _bench(args, [args.suite])
    with world.started(args.device) as device:
        args.device = device
        return _bench(args, [args.suite], world=world)


def cmd_check(args) -> int:
    code = _rerun_in_interpreter(args)
    return code if code is not None else _bench(args, [args.suite], check_only=True)


def cmd_run(args) -> int:
    code = _rerun_in_interpreter(args)
    if code is not None:
        return code
    if args.suite and "train" in args.suite:  # issue 9: trains models, not a benchmark problem set
        from nsa.suites.training.cli import run_from_args
        return run_from_args(args)
    if _device_type(args.device) == "cpu":
        print("CPU run: the smoke suite, kernels in the Triton interpreter; timings here mean nothing")
        return _bench(args, args.suite or ["smoke"])
    from nsa.tuner.distributed import World
    from nsa.tuner.search import ensure_tuned
    world = World.from_env()  # under torchrun: the tune's candidates and the bench's problems shared
    with world.started(args.device) as device:
        args.device = device
        sharded = world if world.size > 1 else None
        status = ensure_tuned(device=device, world=sharded)
        if world.is_main:
            print(f"tune: {status}")
        return _bench(args, args.suite or ["paper"], world=sharded)


def cmd_profile(args) -> int:
    import torch

    from nsa.bench import device_name
    from nsa.config import NSAConfig
    from nsa.profile import format_gaps, format_table, profile_attention, step_tflop
    from nsa.suites.problem import DTYPE_LABELS, DTYPES
    from nsa.timing import measure_ceilings
    from nsa.work import kernel_work
    if _device_type(args.device) != "cuda":
        print("nsa profile: kernel times come from CUDA events; this machine has no CUDA GPU (on a CPU the "
              "interpreter's timings would say nothing)", file=sys.stderr)
        return 2
    dtype_name = {label: name for name, label in DTYPE_LABELS.items()}[args.dtype]
    dtype = DTYPES[dtype_name]
    profiled = profile_attention(seqlen=args.seqlen, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                 head_dim=args.head_dim, dtype=dtype, backward="bwd" in args.ops, steps=args.steps,
                                 device=args.device, gaps=args.gaps)
    times = profiled.kernels
    print(f"{device_name(args.device)}, torch {torch.__version__}: nsa_attention {'+'.join(args.ops)}, B=1, "
          f"T={args.seqlen}, {args.heads} query / {args.kv_heads} kv heads, D={args.head_dim}, "
          f"{args.dtype}, paper config (l=32, d=16, l'=64, n=16, w=512), mean of {args.steps} steps")
    ceilings = measure_ceilings(args.device)
    work = kernel_work(seqlen=args.seqlen, num_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.head_dim,
                       head_dim_v=args.head_dim, config=NSAConfig(), itemsize=dtype.itemsize)
    print(f"ceilings measured now: bf16 matmul {ceilings['matmul_tflops']:.0f} TFLOP/s, device copy "
          f"{ceilings['copy_gbps'] / 1e3:.2f} TB/s (the profile does not flush L2 between kernels)")
    print(format_table(times, work=work, ceilings=ceilings))
    tflop = step_tflop(seqlen=args.seqlen, num_heads=args.heads, num_kv_heads=args.kv_heads,
                       head_dim=args.head_dim, dtype=dtype_name, backward="bwd" in args.ops)
    if profiled.gpu_busy_ms < 0.99 * profiled.kernel_ms:
        print(f"the GPU was busy {profiled.gpu_busy_ms:.3f} ms per step: kernels on two streams overlapped")
    print(f"useful work {tflop:.2f} TFLOP per step (as nsa bench counts it): "
          f"{tflop / profiled.gpu_busy_ms * 1e3:.0f} TFLOP/s over the GPU's busy time")
    print(f"step {profiled.step_ms:.3f} ms (median of {args.steps}, CUDA events, L2 flushed): "
          f"{profiled.host_wait_ms:.3f} ms of it with no kernel running (the GPU waiting for the host)")
    if args.gaps:
        print(format_gaps(profiled.gaps, args.steps))
    if args.out:
        import pandas as pd
        rows = [(name, ms, *((work[name].bound, work[name].amount) if name in work else ("", None)))
                for name, ms in times]
        pd.DataFrame(rows, columns=["kernel", "ms_per_step", "bound", "work"]).to_csv(args.out, index=False)
        print(f"kernel times: {args.out}")
    return 0


def cmd_tune(args) -> int:
    from nsa.tuner.search import describe
    if args.show:
        print(describe(args.device))
        return 0
    code = _rerun_in_interpreter(args)
    if code is not None:
        return code
    from nsa.tuner.distributed import World
    from nsa.tuner import search
    world = World.from_env()  # under torchrun: one rank per GPU, the candidates shared between them
    if _device_type(args.device) == "cpu" and world.is_main:
        print("CPU tune: kernels in the Triton interpreter, timed by perf_counter; it exercises the tuner, the "
              "timings say nothing about a GPU")
    try:
        with world.started(args.device) as device:
            result = search.tune(args.suite, families=args.families, device=device, out=args.out,
                                 budget_s=args.budget_s, world=world, progress=world.is_main, retune=args.retune,
                                 match=args.match or (), fields=args.fields or ())
    except ValueError as e:  # fields no family searches, or a file at --out that is not this device's cache
        print(f"nsa tune: {e}", file=sys.stderr)
        return 1
    if not world.is_main:
        return 0  # rank 0 says how it went: a rank exiting non-zero first would make torchrun stop it
    if result.get("ranks", 1) > 1:
        print(f"{result['ranks']} ranks shared the candidates")
    print(f"cache: {result['path']}")
    for key in result["skipped"]:
        print(f"{key}: already tuned (skipped)")
    for key in result.get("untuned", ()):
        print(f"{key}: no cache holds it, so not refined (a tune without --fields covers it)")
    for row in result["done"]:
        rejected = ", ".join(f"{k} {v}" for k, v in row["rejected"].items()) or "none"
        if "ms" in row:
            # a short search keeps the cached entry's default_ms: None when it failed or was timed another way
            default = (f"{row['default_ms']:.4g} ms" if row["default_ms"] is not None
                       else "unknown" if "start_ms" in row else "failed")
            if "start_ms" in row:
                start = "failed" if row["start_ms"] is None else f"{row['start_ms']:.4g} ms"
                default = f"{default}; the cached params now {start}, {', '.join(row['fields'])} searched"
            # a short search's candidates can be pruned too (a field another field makes invalid): say so
            pruned = "".join(f", pruned {k}: {v}" for k, v in row["pruned"].items())
            confirmed = (f", the {row['confirmed']} fastest re-timed in {search.CONFIRM_ROUNDS} interleaved rounds"
                         if row.get("confirmed") else "")
            print(f"{row['key']}: {row['ms']:.4g} ms (default {default}), {row['tried']} tried, rejected: {rejected}"
                  f"{pruned}{confirmed}")
        else:
            print(f"{row['key']}: NO candidate passed ({rejected}); nothing cached")
        for error in row["errors"]:  # why candidates were rejected (the first few), whether or not one passed
            print(f"    {error}")
        for changed, ms, failure in row.get("candidates", ()):  # a --fields search: each candidate's time
            label = ", ".join(f"{k}={v}" for k, v in changed.items()) or "the cached params"
            print(f"    {label}: {failure if ms is None else f'{ms:.4g} ms'}")
        if "candidates" in row and row["pruned"].get("invalid"):
            print("    (invalid: the varied fields conflict with other cached fields, e.g. fwd_parts_16bit without "
                  "fwd_inverted; add those fields to --fields to search them together)")
    if result["stopped"]:
        print("budget spent: run the same command again to resume")
    elif not result.get("complete", True):
        print("some candidates were not evaluated (a rank stopped): run the same command again to resume")
    return 1 if any("ms" not in row for row in result["done"]) else 0


def cmd_cache_merge(args) -> int:
    from nsa.tuner.merge import merge_into
    try:
        path, data, merged = merge_into(args.files, args.out)
    except ValueError as e:  # not a cache file, or caches of different cards
        print(f"nsa cache merge: {e}", file=sys.stderr)
        return 1
    extra = " (and the file already there)" if len(merged) > len(args.files) else ""
    print(f"merged {len(args.files)} caches{extra} of {data['meta']['device']}: {len(data['entries'])} entries "
          f"into {path}")
    for key, entry in sorted(data["entries"].items()):
        print(f"  {key}: {entry.get('ms')} ms from {entry['source']['file']}")
    return 0


def cmd_report(args) -> int:
    from nsa.reports import render_report
    from nsa.results import merge_folders
    try:
        if args.add:
            added = merge_folders(args.results, args.add)
            print(f"added {added} rows from {len(args.add)} folders to {args.results}")
        print(f"report: {render_report(args.results).resolve()}")
    except (FileNotFoundError, ValueError) as e:
        print(f"nsa report: {e}", file=sys.stderr)
        return 1
    return 0


def _comma_list(choices=None):
    def parse(text):
        items = [item for item in text.split(",") if item]
        bad = [item for item in items if choices is not None and item not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(choices or ['names'])}")
        return items
    return parse


def _add_bench_options(parser, *, suite_required: bool, check_only: bool = False) -> None:
    import torch

    from nsa.checking import DEFAULT_MAX_TOKENS
    from nsa.suites import OPS, PROVIDERS, SUITES
    if suite_required:
        parser.add_argument("--suite", required=True, choices=list(SUITES), help="the suite to run")
    else:
        parser.add_argument("--suite", type=_comma_list([*SUITES, "train"]), metavar="NAME[,NAME...]",
                            help="suites to run (default: paper on a GPU, smoke on a CPU; train: the training suite)")
    parser.add_argument("--ops", type=_comma_list(OPS), metavar="OP[,OP...]",
                        help=f"only these ops ({', '.join(OPS)}; default: all of the suite's)")
    parser.add_argument("--providers", type=_comma_list(list(PROVIDERS)), metavar="NAME[,NAME...]",
                        help=f"implementations to run (default: all of {', '.join(PROVIDERS)})")
    if not check_only:
        parser.add_argument("--out", metavar="DIR", help="results folder (default: nsa-results/<device>); "
                            "rows already in it are kept and skipped, so a rerun resumes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available, else cpu: Triton interpreter)")
    parser.add_argument("--check-tokens", type=int, default=DEFAULT_MAX_TOKENS, metavar="N",
                        help="check problems longer than N tokens at N tokens, same config (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    import torch

    from nsa.suites import SUITES
    from nsa.suites.problem import DTYPE_LABELS
    parser = argparse.ArgumentParser(prog="nsa", description="Native Sparse Attention: tuned Triton kernels, "
                                     "correctness against a PyTorch reference, and reports against FlashAttention.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    info = sub.add_parser("info", help="describe this machine: GPU, torch/triton versions, FlashAttention variants",
                          description="Describe this machine: GPUs (through nvidia-ml-py), torch and triton "
                          "versions, and which FlashAttention implementations are importable.")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(func=cmd_info)

    suites = sub.add_parser("suites", help="list the benchmark suites", description="List the named suites: "
                            "their problems (op, sizes, config, dtype) and what each one is for.")
    suites.add_argument("-v", "--verbose", action="store_true", help="also list every problem's key")
    suites.set_defaults(func=cmd_suites)

    bench = sub.add_parser("bench", help="check and time one suite, write results and the report",
                           description="Run every problem of a suite with every provider: check it against its "
                           "oracle, time it only if it passed, write results.csv and environment.json to the "
                           "results folder (resuming), and render the report. On a CPU, timings mean nothing. "
                           "Under torchrun (`torchrun --nproc-per-node N -m nsa bench ...`) the problems are "
                           "shared between the GPUs (each problem's rows, baselines too, on one) and rank 0 writes "
                           "the one results folder and report.")
    _add_bench_options(bench, suite_required=True)
    bench.set_defaults(func=cmd_bench)

    run = sub.add_parser("run", help="the whole job: tune, check, bench, report",
                         description="On a GPU: tune the buckets no config cache holds, then check, time and "
                         "report the suites (default: paper). Under torchrun (`torchrun --nproc-per-node N -m nsa "
                         "run`) the GPUs share the tune's candidates and the bench's problems. Without a GPU: the "
                         "smoke suite, kernels in the Triton interpreter, whose timings mean nothing. Prints where "
                         "the report is.")
    _add_bench_options(run, suite_required=False)
    from nsa.suites.training.cli import add_train_options
    add_train_options(run)
    run.set_defaults(func=cmd_run)

    check_ = sub.add_parser("check", help="correctness verdicts of one suite, no timing",
                            description="Check every provider on every problem of a suite against its oracle and "
                            "print the verdicts; exit status 1 when any failed or raised.")
    _add_bench_options(check_, suite_required=True, check_only=True)
    check_.set_defaults(func=cmd_check)

    profile_ = sub.add_parser("profile", help="GPU time of each kernel of one nsa_attention step",
                              description="Profile nsa_attention (fwd, or fwd + bwd) on this GPU with torch.profiler "
                              "and print each kernel's GPU time per step and share, slowest first, with its useful "
                              "work (FLOPs, or bytes gathered or moved), its rate and its share of the card's "
                              "ceiling, measured first: where the time goes, for docs/performance.md. The kernels "
                              "read the tuned config cache.")
    profile_.add_argument("--seqlen", type=int, default=65536, help="tokens (default: %(default)s)")
    profile_.add_argument("--heads", type=int, default=64, help="query heads (default: %(default)s)")
    profile_.add_argument("--kv-heads", type=int, default=4, help="kv heads (default: %(default)s)")
    profile_.add_argument("--head-dim", type=int, default=128, help="head dim (default: %(default)s)")
    profile_.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_LABELS.values()),
                          help="input dtype (default: %(default)s)")
    profile_.add_argument("--ops", type=_comma_list(["fwd", "bwd"]), default=["fwd", "bwd"], metavar="fwd[,bwd]",
                          help="fwd alone, or fwd and bwd (default)")
    profile_.add_argument("--steps", type=int, default=3, help="profiled steps, after 2 warm-up (default: 3)")
    profile_.add_argument("--out", metavar="FILE.csv", help="also write the kernel times (and work) as CSV")
    profile_.add_argument("--gaps", action="store_true", help="also trace the host and list the longest gaps "
                          "between kernels with what the host was doing (the tracing slows the host)")
    profile_.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                          help="CUDA device (default: cuda)")
    profile_.set_defaults(func=cmd_profile)

    from nsa.tuner.cache import ALL_FAMILIES as FAMILIES
    tune = sub.add_parser("tune", help="search the kernels' params for this device into its config cache",
                          description="For each kernel family and shape bucket of a suite, check every candidate "
                          "of the search space against the reference, time the ones that pass, and write the "
                          "fastest to the device's config cache (atomically after each bucket; a rerun resumes). "
                          "On a CPU: the Triton interpreter with a CPU timer (exercises the machinery only). "
                          "Under torchrun (`torchrun --nproc-per-node N -m nsa tune ...`) each rank takes a share "
                          "of the candidates on its GPU and rank 0 writes the one cache.")
    tune.add_argument("--suite", default="smoke", choices=list(SUITES), help="problems to tune for (default: smoke)")
    tune.add_argument("--families", type=_comma_list(list(FAMILIES)), metavar="NAME[,NAME...]",
                      help=f"kernel families (default: all of {', '.join(FAMILIES)})")
    tune.add_argument("--budget-s", type=float, metavar="N", help="start no candidate that would end after N "
                      "seconds from the start (the longest candidate so far is the estimate); a later run resumes")
    tune.add_argument("--retune", action="store_true", help="tune the buckets the cache already holds too, and "
                      "replace their entries (after a search space grew or a kernel changed)")
    tune.add_argument("--match", type=_comma_list(), metavar="TEXT[,TEXT...]",
                      help="tune only the buckets whose key contains every TEXT, e.g. '|G=4|' or 'T=65536|' "
                      "(keys: nsa tune --show)")
    tune.add_argument("--fields", type=_comma_list(), metavar="NAME[=V/V...][,...]",
                      help="a short search: vary only these params fields (over their declared ranges, e.g. "
                      "fwd_tma,fwd_num_stages, or over given values of any field, e.g. dkdv_block_m=2/4/8), from "
                      "each bucket's cached params (the --out file's, else those of the caches in use), printing "
                      "every candidate's time; buckets no cache holds are left to a full tune")
    tune.add_argument("--out", metavar="DIR", help="folder of the cache file <device-key>.json (default: the user "
                      "cache, $XDG_CACHE_HOME/nsa/configs or ~/.cache/nsa/configs; tuner/configs to ship one)")
    tune.add_argument("--show", action="store_true", help="print the config caches in use for this device")
    tune.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                      help="torch device (default: cuda when available, else cpu: Triton interpreter)")
    tune.set_defaults(func=cmd_tune)

    cache_ = sub.add_parser("cache", help="config caches: merge the caches of one card",
                            description="Work on config cache files (see `nsa tune`).")
    actions = cache_.add_subparsers(dest="action", required=True, metavar="ACTION")
    merge = actions.add_parser("merge", help="merge caches of one card: the fastest entry per bucket",
                               description="Merge config caches tuned on the same card (one device key) in "
                               "different runs: for each bucket the entry with the smallest time wins, and keeps "
                               "its source (file, date, git sha, versions); but an entry from a short search "
                               "(--fields) that started from the other's params wins (that search timed both in "
                               "one run), and one timed as CUDA-graph replays beats an eager one. Caches of "
                               "different cards are refused (exit status 1). A file already at the output is "
                               "merged in too.")
    merge.add_argument("files", nargs="+", metavar="CACHE.json", help="cache files to merge")
    merge.add_argument("--out", metavar="DIR|FILE.json", help="where to write: a .json path, else the folder of "
                       "<device-key>.json (default: the user cache, $XDG_CACHE_HOME/nsa/configs)")
    merge.set_defaults(func=cmd_cache_merge)

    report = sub.add_parser("report", help="render the report of a results folder",
                            description="Render report.html and plots/*.png from a results folder's results.csv "
                            "and environment.json (nothing is measured).")
    report.add_argument("results", metavar="RESULTS_DIR", help="a folder written by nsa bench or nsa run")
    report.add_argument("--add", nargs="+", metavar="DIR", help="first add the rows of these results folders (the "
                        "parts of one job run on several cards of one kind, e.g. `--ops fwd` on one GPU and "
                        "`--ops bwd` on another) to RESULTS_DIR")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
