"""GPU benchmarks through pytest-benchmark: `pytest -m gpu --benchmark-only` (or `tox -e gpu -- --benchmark-only`).

The paper suite's headline problems (T = 8k and 64k; decode at B = 16), each with ours and every baseline that is
available. A case is checked against its oracle first, and a wrong result fails the test rather than producing a
number. Setup happens outside the timed call. pytest-benchmark times a callable that ends in
torch.cuda.synchronize(), so its statistics cover the GPU work; the CUDA-event median of `nsa.timing` (L2 flushed
before each call, decode steps replayed from a CUDA graph: the number `nsa bench` reports) goes into each
benchmark's extra_info beside them.
"""

import pytest
import torch

from nsa.bench import timed_call
from nsa.checking import check
from nsa.suites import PROVIDERS, get_suite
from nsa.timing import time_call

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [p for p in get_suite("paper").problems if p.seqlen in (8192, 65536) and (p.op != "decode" or p.batch == 16)]
PROVIDER_NAMES = ("nsa", "sdpa-cudnn", "sdpa-flash", "flash-attn", "fla-nsa")


@pytest.mark.parametrize("provider_name", PROVIDER_NAMES)
@pytest.mark.parametrize("problem", CASES, ids=lambda p: p.key)
def test_paper_problem(benchmark, problem, provider_name):
    provider = PROVIDERS[provider_name]
    reason = provider.unavailable("cuda") or provider.unsupported(problem)
    if reason:
        pytest.skip(reason)
    verdict = check(provider, problem, device="cuda")
    assert verdict.passed, verdict.summary
    call, detail = timed_call(provider, problem, "cuda", seed=0)

    def synchronized():
        call()
        torch.cuda.synchronize()

    benchmark.group = problem.key
    events = time_call(call, "cuda", cuda_graph=problem.op == "decode")
    benchmark.extra_info.update(problem=problem.key, impl=provider.name, detail=detail, checked=verdict.summary,
                                cuda_events_median_ms=events.median_ms, timer=events.timer)
    benchmark.pedantic(synchronized, rounds=10, warmup_rounds=2, iterations=1)
