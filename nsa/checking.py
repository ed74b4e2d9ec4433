"""The correctness gate: a provider's output (and, for bwd, its gradients) against its PyTorch oracle.

Per tensor, the allowed relative error is `nsa.accuracy.allowed_error`: twice the error of the same oracle
computed by PyTorch in the problem's dtype, never below the dtype's floor. The oracle runs in float64 on a CPU
and in fp32 on a GPU (chunked: nsa.reference and the dense oracle never hold a T x T tensor). Problems longer than
`max_tokens` per batch row are checked at that length, same config and shapes (`Problem.shortened`): the
oracle's cost grows faster than the kernels', and every length runs the same code paths past a few blocks.
The verdict says which length it checked.
"""

from __future__ import annotations

import dataclasses

import torch

from nsa.accuracy import allowed_error, relative_error
from nsa.suites.problem import Problem, cache_of, make_inputs
from nsa.suites.providers import Provider

DEFAULT_MAX_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A check's outcome: `passed`, the worst tensor's relative `error` and `allowed` error, `summary` (every
    tensor's error against its allowance, the length checked) and `detail`, what the provider ran."""

    passed: bool
    error: float
    allowed: float
    summary: str
    detail: str


def oracle_dtype(device) -> torch.dtype:
    return torch.float64 if torch.device(device).type == "cpu" else torch.float32


def check(provider: Provider, problem: Problem, *, device, max_tokens: int = DEFAULT_MAX_TOKENS,
          seed: int = 0) -> Verdict:
    """Run `provider` on random inputs of `problem` (shortened to `max_tokens`) and judge it against its oracle.

    Exceptions from the provider propagate: the caller records them (an error is not a wrong answer).
    """
    small = problem.shortened(max_tokens)
    backward = small.op == "bwd"
    x = make_inputs(small, device=device, seed=seed, requires_grad=backward)
    prepared = provider.prepare(small, x)
    out = prepared.run()
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out) if backward else None
    got = _results(out, x, provider.grad_names, grad_out)
    exact = _oracle(provider, small, _converted(x, oracle_dtype(device), small), grad_out)
    same_dtype = _oracle(provider, small, _converted(x, small.torch_dtype, small), grad_out)

    lines, worst = [], (0.0, 0.0, 1.0)  # (error / allowed, error, allowed)
    for name in exact:
        if got.get(name) is None:
            lines.append(f"{name} missing")
            worst = (float("inf"), float("inf"), 0.0)
            continue
        allowed = allowed_error(exact[name], same_dtype[name], small.torch_dtype)
        error = relative_error(got[name], exact[name])
        lines.append(f"{name} {error:.2e}/{allowed:.2e}")
        worst = max(worst, (error / allowed, error, allowed))
    where = f"T={small.seqlen}" + (f" (of {problem.seqlen})" if small is not problem else "")
    summary = f"{', '.join(lines)} at {where}, vs {oracle_dtype(device)} oracle"
    return Verdict(passed=worst[0] <= 1.0, error=worst[1], allowed=worst[2], summary=summary,
                   detail=prepared.detail)


def _results(out, x, grad_names, grad_out) -> dict:
    """{"o": out} and, given grad_out, "d<name>" gradients of the inputs `grad_names` (None where none flows)."""
    results = {"o": out}
    if grad_out is not None:
        grads = torch.autograd.grad(out, [x[n] for n in grad_names], grad_out, allow_unused=True)
        results.update({f"d{n}": g for n, g in zip(grad_names, grads)})
    return results


def _oracle(provider, problem, x, grad_out) -> dict:
    grad_out = None if grad_out is None else grad_out.to(x["q"].dtype)
    with torch.enable_grad():
        out = provider.reference(problem, x)
    return {name: t.detach() for name, t in _results(out, x, provider.grad_names, grad_out).items()
            if t is not None}


def _converted(x: dict, dtype: torch.dtype, problem: Problem) -> dict:
    """Detached copies of x's float tensors in `dtype` (gradients enabled as in x); a cache rebuilt over them."""
    out = {name: t.detach().to(dtype).requires_grad_(t.requires_grad) if torch.is_tensor(t) and t.is_floating_point()
           else t for name, t in x.items()}
    if "cache" in out:
        out["cache"] = cache_of(out, problem.config)
    return out
