"""Implementations the suites run, registered by name (tritonbench's providers): ours, and the baselines.

A provider says whether it can run here (a guarded import: a missing package makes it unavailable, never an
import error), which problems it takes, how to set a problem up outside the timed call (`prepare`), and what
PyTorch computation its result must match (`reference`). Every prepared call carries `detail`, the exact
implementation and version that ran, which goes into every result row.

Registered: `nsa` (nsa.kernels, ours), `reference` (nsa.reference, only where cheap), and the baselines in
`nsa.suites.baselines`: `sdpa-flash`, `sdpa-cudnn`, `flash-attn`, `fla-nsa`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import subprocess
from pathlib import Path
from typing import Callable

import torch

from nsa.config import NSAConfig
from nsa.suites.problem import Problem

# The attention's tensor inputs, in nsa_attention's argument order; a bwd differentiates all of them.
NSA_INPUTS = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win")
# The reference is timed only up to this many tokens (B * T) for fwd/bwd: beyond, it is slow and says nothing.
REFERENCE_MAX_TOKENS = 4096


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A problem set up for one provider: `run()` is the timed call; it returns the output [B, Tq, Hq, Dv]."""

    run: Callable[[], torch.Tensor]
    detail: str


class Provider:
    """One implementation of the ops. Subclasses set the class attributes and override the methods they need.

    Attributes:
        name: registry key, the `impl` column of results.
        baseline: results report every provider's speedup against each baseline.
        ops: the ops it implements.
        grad_names: inputs whose gradients a bwd computes and the check compares.
    """

    name: str = ""
    baseline: bool = False
    ops: tuple[str, ...] = ("fwd", "bwd", "decode")
    grad_names: tuple[str, ...] = NSA_INPUTS

    def unavailable(self, device) -> str | None:
        """Why it cannot run on `device` at all (missing package, no GPU), or None when it can."""
        return None

    def unsupported(self, problem: Problem) -> str | None:
        """Why it does not take `problem`, or None when it does."""
        return None if problem.op in self.ops else f"{self.name} has no {problem.op}"

    def config(self, problem: Problem) -> NSAConfig | None:
        """The NSA config it computes with (None: dense causal attention); the work count follows it."""
        return problem.config

    def prepare(self, problem: Problem, x: dict) -> Prepared:
        """Everything but the timed call: layouts, lookups, trial calls. `x` is `make_inputs(problem, ...)`."""
        raise NotImplementedError

    def reference(self, problem: Problem, x: dict) -> torch.Tensor:
        """The result `prepare(problem, x).run()` must match, computed by PyTorch from x (any dtype)."""
        raise NotImplementedError


PROVIDERS: dict[str, Provider] = {}


def register(provider: Provider) -> Provider:
    """Add `provider` to the registry under its name (a later registration of the same name replaces it)."""
    PROVIDERS[provider.name] = provider
    return provider


def get_providers(names=None) -> list[Provider]:
    """The registered providers called `names` (all of them by default), in the given order."""
    if names is None:
        return list(PROVIDERS.values())
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise KeyError(f"unknown providers {unknown}; known: {', '.join(PROVIDERS)}")
    return [PROVIDERS[n] for n in names]


@functools.cache
def nsa_version() -> str:
    """This package's version, with the git commit (and "-dirty") when it runs from its own checkout (an
    editable install); an installed copy has no commit to report."""
    import nsa
    checkout = Path(nsa.__file__).resolve().parent.parent
    rev = ""
    if (checkout / ".git").exists():
        try:
            rev = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=10"], capture_output=True,
                                 text=True, cwd=checkout, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{nsa.__version__}+g{rev}" if rev else nsa.__version__


def _attention_call(fn, problem: Problem, x: dict) -> Callable[[], torch.Tensor]:
    """`fn` (nsa_attention or nsa_decode, same signatures in the kernels and the reference) bound to x."""
    if problem.op == "decode":
        args = [x["q"], x["cache"], x["g_cmp"], x["g_slc"], x["g_win"], problem.config]
        return lambda: fn(*args)
    args = [x[n] for n in NSA_INPUTS] + [problem.config]
    return lambda: fn(*args, cu_seqlens=x["cu_seqlens"])


def _function_name(problem: Problem) -> str:
    return "nsa_decode" if problem.op == "decode" else "nsa_attention"


def reference_result(problem: Problem, x: dict) -> torch.Tensor:
    """nsa.reference on x: the oracle of every NSA implementation."""
    from nsa import reference
    return _attention_call(getattr(reference, _function_name(problem)), problem, x)()


class NSAKernels(Provider):
    """nsa.kernels: `nsa_attention` for fwd/bwd, `nsa_decode` for decode over an `nsa.kernels.KVCache` of the
    problem's tensors: (q [B, 1, Hq, Dk], cache, g_cmp, g_slc, g_win, config)."""

    name = "nsa"

    def unavailable(self, device):
        try:
            from nsa.kernels import runtime
        except Exception as e:  # a half-written kernel module must not stop the other providers
            return f"nsa.kernels does not import: {type(e).__name__}: {e}"
        if torch.device(device).type == "cpu" and not runtime.interpreting():
            return "nsa.kernels on CPU tensors needs the Triton interpreter (TRITON_INTERPRET=1)"
        return None

    def unsupported(self, problem):
        fn = _function_name(problem)
        if getattr(importlib.import_module("nsa.kernels"), fn, None) is None:
            return f"nsa.kernels.{fn} does not exist yet"
        return None

    def prepare(self, problem, x):
        import triton

        from nsa import kernels
        from nsa.kernels import runtime
        fn = _function_name(problem)
        where = ", Triton interpreter" if runtime.interpreting() else ""
        if problem.op == "decode":  # the kernels read their own cache type, here over x's tensors
            x = dict(x, cache=kernels.KVCache.from_tensors(x["k"], x["v"], x["k_cmp"], x["v_cmp"], problem.config))
        return Prepared(_attention_call(getattr(kernels, fn), problem, x),
                        f"nsa.kernels.{fn} (nsa {nsa_version()}, triton {triton.__version__}{where})")

    reference = staticmethod(reference_result)


class NSAReference(Provider):
    """nsa.reference, timed only where it is cheap (it is the oracle, not a contender)."""

    name = "reference"

    def unsupported(self, problem):
        if problem.op != "decode" and problem.batch * problem.seqlen > REFERENCE_MAX_TOKENS:
            return f"the reference is timed only up to {REFERENCE_MAX_TOKENS} tokens"
        return None

    def prepare(self, problem, x):
        from nsa import reference
        fn = _function_name(problem)
        return Prepared(_attention_call(getattr(reference, fn), problem, x),
                        f"nsa.reference.{fn} (nsa {nsa_version()}, torch {torch.__version__})")

    reference = staticmethod(reference_result)


register(NSAKernels())
register(NSAReference())
