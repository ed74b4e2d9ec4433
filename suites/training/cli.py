"""`nsa run --suite train`: the options it adds to `nsa run` and the function that runs it."""

from __future__ import annotations

import argparse
from pathlib import Path

from nsa.suites.training.config import MODELS, SIZES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0, got {text}")
    return value


def _models(text: str) -> tuple[str, ...]:
    names = tuple(n for n in text.split(",") if n)
    if not names or any(n not in MODELS for n in names):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of {', '.join(MODELS)}")
    return names


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The options of the train suite (ignored by the benchmark suites)."""
    group = parser.add_argument_group("train suite (--suite train)")
    group.add_argument("--size", choices=list(SIZES), help="tiny (a CPU, minutes, the reference NSA) or gpu "
                       "(T=4096, paper config, nsa.kernels); default: gpu on CUDA, tiny elsewhere")
    group.add_argument("--steps", type=_positive_int, metavar="N", help="training steps (default: the size's)")
    group.add_argument("--compare-steps", type=_positive_int, metavar="N", help="steps of the kernels-vs-reference "
                       "check inside the NSA model (default: the size's; 0 skips it)")
    group.add_argument("--models", type=_models, default=MODELS, metavar="NAME[,NAME...]",
                       help=f"models to train (default: {','.join(MODELS)})")
    group.add_argument("--time-budget-s", type=float, metavar="S", help="per model, stop training (resumable) "
                       "after S seconds of training steps")


def run_from_args(args) -> int:
    """Run the train suite from `nsa run`'s parsed arguments; the exit status (1 when a model or the
    kernels-vs-reference check failed or raised)."""
    from nsa.bench import device_slug
    from nsa.suites.training.suite import run_train_suite

    if len(args.suite) > 1:
        print("nsa run: --suite train runs alone (it trains models; the others benchmark kernels)")
        return 2
    size = args.size or ("gpu" if args.device.startswith("cuda") else "tiny")
    out = Path(args.out) if args.out else Path("nsa-results") / device_slug(args.device) / "train"
    summary = run_train_suite(size, out, device=args.device, steps=args.steps, compare_steps=args.compare_steps,
                              models=args.models, time_budget_s=args.time_budget_s)
    compare = summary.get("compare")
    return 1 if summary["errors"] or (compare is not None and not compare["passed"]) else 0
