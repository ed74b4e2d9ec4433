"""Triton gated combination (SPEC 1.7) against the float64 reference: output and all six gradients."""

import inspect

import pytest
import torch

from nsa.accuracy import ERROR_FLOOR, allowed_error, assert_close
from nsa.kernels import runtime
from nsa.kernels.combine import (CombineParams, combine_branches, combine_bwd, combine_bwd_for_branches,
                                 default_params)
from nsa.reference import combine_branches as reference_combine_branches

NAMES = ("o_cmp", "o_slc", "o_win", "g_cmp", "g_slc", "g_win")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)


def inputs(batch, seqlen, heads, dim, *, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    outs = [torch.randn(batch, seqlen, heads, dim, generator=gen) for _ in range(3)]
    gates = [torch.rand(batch, seqlen, heads, generator=gen) for _ in range(3)]
    return [x.to(device=device, dtype=dtype).requires_grad_(True) for x in outs + gates]


CASES = {
    # id: (B, T, Hq, Dv, params)
    "B1-T100-H4-D16-default": (1, 100, 4, 16, None),
    "B2-T37-H3-D20-tiles16x8": (2, 37, 3, 20, CombineParams(block_r=16, block_d=8)),
    "B1-T1-H1-D40-default": (1, 1, 1, 40, None),
    "B1-T50-H2-D64-tiles4x64": (1, 50, 2, 64, CombineParams(block_r=4, block_d=64, num_warps=2)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_combine_matches_reference(case):
    batch, seqlen, heads, dim, params = CASES[case]
    seed = sorted(CASES).index(case)
    x = inputs(batch, seqlen, heads, dim, seed=seed)
    o = combine_branches(*x, params=params)
    assert o.shape == (batch, seqlen, heads, dim) and o.dtype == torch.float32
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(50 + seed))
    grads = torch.autograd.grad(o, x, do)

    x64 = [t.detach().double().requires_grad_(True) for t in x]
    ref = reference_combine_branches(*x64)
    ref_grads = torch.autograd.grad(ref, x64, do.double())
    assert_close("o", o, ref, ERROR_FLOOR[torch.float32])
    for name, g, r in zip(NAMES, grads, ref_grads):
        assert g.shape == r.shape and g.dtype == torch.float32
        assert_close(f"d{name}", g, r, ERROR_FLOOR[torch.float32])


@pytest.mark.filterwarnings("ignore:invalid value encountered in log")  # the interpreter's log of the negative gate
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_backward_for_branches_folds_each_gate(dtype):
    """combine_bwd_for_branches: the gate gradients of combine_bwd, deltas = rowsum(do * o_x) and lses = lse_x -
    log(g_x) [3, Hq, tokens] (head-major); a zero gate gives lse = +inf (p = 0), a negative one NaN; and p' * do,
    p' * (do . v - delta') equal p * do_x, p * (do_x . v - delta) for one made-up row of scores."""
    tokens, heads, dim = 37, 3, 20
    x = [t.detach() for t in inputs(1, tokens, heads, dim, seed=3, dtype=dtype)]
    rows = [t.reshape(tokens * heads, -1).contiguous() for t in x[:3]] + [g.reshape(-1).contiguous() for g in x[3:]]
    rows[3][:4] = torch.tensor([0.0, -0.5, 1.0, 1e-3], dtype=dtype)  # token 0's heads, token 1's head 0
    lses = [torch.randn(heads, tokens, generator=torch.Generator().manual_seed(5 + i)) for i in range(3)]
    do = torch.randn(tokens * heads, dim, generator=torch.Generator().manual_seed(4)).to(dtype)
    params = CombineParams(block_r=16, block_d=8)
    *dgates, lses_out, deltas = combine_bwd_for_branches(do, *rows, *lses, params)
    for got, want in zip(dgates, combine_bwd(do, *rows, params)[3:]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert lses_out.shape == deltas.shape == (3, heads, tokens) and deltas.dtype == lses_out.dtype == torch.float32
    for branch in range(3):
        o_x, g_x = rows[branch].double(), rows[3 + branch].double()
        want_delta = (do.double() * o_x).sum(-1).reshape(tokens, heads).t()
        torch.testing.assert_close(deltas[branch].double(), want_delta, rtol=1e-5, atol=1e-5)
        g_x = g_x.reshape(tokens, heads).t()
        want_lse = torch.where(g_x == 0, float("inf"), lses[branch].double() - g_x.log())
        torch.testing.assert_close(lses_out[branch].double(), want_lse, rtol=1e-6, atol=1e-6, equal_nan=True)
    assert lses_out[0, 0, 0] == float("inf") and lses_out[0, 1, 0].isnan() and lses_out[0, 2, 0] == lses[0][2, 0]

    row, gen = 3, torch.Generator().manual_seed(6)  # token 1, head 0: gate 1e-3
    v, s = torch.randn(6, dim, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    p, p_folded = (s - float(lses[0][0, 1])).exp(), (s - float(lses_out[0, 0, 1])).exp()
    do_row = do[row].double()
    do_x = float(rows[3][row]) * do_row
    delta = float((do_x * rows[0][row].double()).sum())
    torch.testing.assert_close(p_folded[:, None] * do_row, p[:, None] * do_x, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(p_folded * (v @ do_row - float(deltas[0, 0, 1])), p * (v @ do_x - delta), rtol=1e-5,
                               atol=1e-8)
    with pytest.raises(ValueError, match="lses must be contiguous"):
        combine_bwd_for_branches(do, *rows, lses[0], lses[1].t(), lses[2], params)


def test_bf16_inputs_come_back_bf16():
    x = inputs(1, 30, 2, 16, seed=7)
    ref = reference_combine_branches(*[t.detach().double() for t in x])
    low = [t.detach().bfloat16() for t in x]
    o = combine_branches(*low)
    assert o.dtype == torch.bfloat16
    assert_close("o bf16", o, ref, allowed_error(ref, reference_combine_branches(*low), torch.bfloat16))


def test_bad_inputs_are_clear_errors():
    x = inputs(1, 10, 2, 8, seed=0)
    with pytest.raises(ValueError, match="o_slc must have shape"):
        combine_branches(x[0], x[1][:, :5], *x[2:])
    with pytest.raises(ValueError, match="g_win must have shape"):
        combine_branches(*x[:5], x[5][..., :1])
    with pytest.raises(ValueError, match="4 dimensions"):
        combine_branches(x[0][0], *x[1:])
    with pytest.raises(TypeError, match="dtype"):
        combine_branches(*x[:3], x[3].double(), *x[4:])
    with pytest.raises(TypeError, match="torch.Tensor"):
        combine_branches(*x[:5], 0.5)
    with pytest.raises(TypeError, match="CombineParams"):
        combine_branches(*x, params=(32, 128))
    with pytest.raises(ValueError, match="power of two"):
        CombineParams(block_r=12)


def test_cpu_tensors_without_the_interpreter_are_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        combine_branches(*inputs(1, 4, 1, 8, seed=0))


def test_defaults_and_signature():
    assert default_params(128).block_d == 128 and default_params(192).block_d == 256
    ours = inspect.signature(combine_branches).parameters
    ref = inspect.signature(reference_combine_branches).parameters
    assert list(ours) == list(ref) + ["params"]
    assert ours["params"].kind == inspect.Parameter.KEYWORD_ONLY


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or runtime.interpreting(), reason="needs CUDA (not the interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(1, 16384, 64, 128), (2, 1000, 6, 192)], ids=["T16384-H64-D128", "B2-T1000-H6-D192"])
def test_combine_gpu(shape, dtype):
    x = inputs(*shape, seed=1, dtype=dtype, device="cuda")
    o = combine_branches(*x)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2)).to(device="cuda", dtype=dtype)
    grads = torch.autograd.grad(o, x, do)

    def reference(tensors, grad_out):
        out = reference_combine_branches(*tensors)
        return (out, *torch.autograd.grad(out, tensors, grad_out))

    ref = reference([t.detach().float().requires_grad_(True) for t in x], do.float())
    same = reference([t.detach().requires_grad_(True) for t in x], do)
    for name, got, r, s in zip(("o",) + tuple(f"d{n}" for n in NAMES), (o, *grads), ref, same):
        assert got.dtype == dtype
        assert_close(name, got, r, allowed_error(r, s, dtype))
