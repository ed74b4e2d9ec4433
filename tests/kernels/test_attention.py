"""nsa.kernels.nsa_attention, the whole composition, against the reference (CPU interpreter and GPU)."""

import dataclasses

import pytest
import torch

from nsa import NSAConfig, reference
from nsa.accuracy import SELECTION_RTOL, allowed_error, assert_close, selection_mismatches
from nsa.kernels import nsa_attention, runtime
from nsa.kernels.attention import (NSAParams, combine, compression, selected_attention, selection,
                                   window_attention)
from nsa.kernels.packing import PackedSequences
from nsa.problems import random_inputs

NAMES = ("q", "k", "v", "k_cmp", "v_cmp", "g_cmp", "g_slc", "g_win")


def reference_given_selection(x, block_indices, config, cu_seqlens):
    """The reference output for a given selection: near-equal importances may legally swap blocks."""
    common = dict(cu_seqlens=cu_seqlens)
    o_cmp = reference.compressed_attention(x["q"], x["k_cmp"], x["v_cmp"], config, **common)
    o_slc = reference.selected_attention(x["q"], x["k"], x["v"], block_indices, config, **common)
    o_win = reference.window_attention(x["q"], x["k"], x["v"], config, **common)
    return reference.combine_branches(o_cmp, o_slc, o_win, x["g_cmp"], x["g_slc"], x["g_win"])


def check_against_reference(config, x, cu_seqlens, *, ref_dtype, grads=True, same_dtype_ref=True):
    """Kernel output, selection and gradients vs the reference computed in ref_dtype from the same inputs."""
    dtype = x["q"].dtype
    o, idx = nsa_attention(**x, config=config, cu_seqlens=cu_seqlens, return_block_indices=True)
    hi = {n: x[n].detach().to(ref_dtype).requires_grad_(grads) for n in NAMES}
    seqlens = [[x["q"].shape[1]]] * x["q"].shape[0] if cu_seqlens is None else [torch.diff(cu_seqlens).tolist()]
    importance = reference.block_importance(hi["q"].detach(), hi["k_cmp"].detach(), config, cu_seqlens=cu_seqlens)
    problems = selection_mismatches(idx, importance, config, seqlens=seqlens, rtol=SELECTION_RTOL[dtype])
    assert not problems, "\n".join(problems)
    ref = reference_given_selection(hi, idx, config, cu_seqlens)
    lo = None
    if same_dtype_ref:
        lo_x = {n: x[n].detach().requires_grad_(grads) for n in NAMES}
        lo = reference_given_selection(lo_x, idx, config, cu_seqlens)
    errors = {"o": assert_close("o", o, ref, allowed_error(ref, lo, runtime.compute_dtype(dtype)))}
    if grads:
        do = torch.randn_like(ref)
        got = torch.autograd.grad(o, [x[n] for n in NAMES], do.to(dtype))
        want = torch.autograd.grad(ref, [hi[n] for n in NAMES], do)
        low = torch.autograd.grad(lo, [lo_x[n] for n in NAMES], do.to(dtype)) if lo is not None else [None] * 8
        for name, g, w, gl in zip(NAMES, got, want, low):
            errors["d" + name] = assert_close("d" + name, g, w, allowed_error(w, gl, runtime.compute_dtype(dtype)))
    return errors


CPU_CASES = {
    "paper-like-G4": (NSAConfig(cmp_block=32, cmp_stride=16, slc_block=64, slc_topn=3, window=64),
                      dict(batch=1, seqlen=200, num_heads=4, num_kv_heads=1, head_dim=16)),
    "G1-varlen": (NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=4, window=24),
                  dict(seqlens=[7, 60, 33], num_heads=2, num_kv_heads=2, head_dim=16)),
    "G2-DkDv-B2": (NSAConfig(cmp_block=16, cmp_stride=16, slc_block=16, slc_topn=3, window=16, init_blocks=0,
                             local_blocks=1),
                   dict(batch=2, seqlen=45, num_heads=4, num_kv_heads=2, head_dim=32, head_dim_v=16)),
}


@pytest.fixture
def poisoned(monkeypatch):
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)


@pytest.mark.skipif(not runtime.interpreting(), reason="CPU tests run the kernels in TRITON_INTERPRET=1")
@pytest.mark.parametrize("case", CPU_CASES)
def test_matches_reference_in_interpreter(case, poisoned):
    config, sizes = CPU_CASES[case]
    x = random_inputs(config, **sizes, dtype=torch.float32, seed=11, requires_grad=True)
    cu = x.pop("cu_seqlens")
    check_against_reference(config, x, cu, ref_dtype=torch.float64, same_dtype_ref=False)


@pytest.mark.skipif(not runtime.interpreting(), reason="CPU tests run the kernels in TRITON_INTERPRET=1")
@pytest.mark.filterwarnings("ignore:invalid value encountered in log")  # the interpreter's log of a negative gate
def test_gates_of_zero_and_one_are_exact_and_a_negative_gate_is_nan(poisoned):
    """The backward folds each gate into its branch's lse (lse - log g, `combine.combine_bwd_for_branches`): gates
    of exactly 0 and 1 give the reference's gradients; a negative gate, outside SPEC's sigmoid range, gives NaN in
    the gradients it reaches rather than wrong numbers."""
    config, sizes = CPU_CASES["G1-varlen"]
    x = random_inputs(config, **sizes, dtype=torch.float32, seed=13, requires_grad=True)
    cu = x.pop("cu_seqlens")
    with torch.no_grad():
        x["g_cmp"][:, ::3] = 0.0  # every gate of some tokens, and one head's gate of others
        x["g_slc"][:, 1::4, 0] = 0.0
        x["g_win"][:, ::2] = 1.0
        x["g_win"][:, 5:9, 1] = 0.0
    check_against_reference(config, x, cu, ref_dtype=torch.float64, same_dtype_ref=False)
    with torch.no_grad():
        x["g_slc"][:, 40, 1] = -0.5
    dq, dg_slc = torch.autograd.grad(nsa_attention(**x, config=config, cu_seqlens=cu).sum(), [x["q"], x["g_slc"]])
    assert dq[:, 40, 1].isnan().all() and not dq[:, 40, 0].isnan().any() and not dg_slc.isnan().any()


@pytest.mark.skipif(not runtime.interpreting(), reason="CPU tests run the kernels in TRITON_INTERPRET=1")
@pytest.mark.parametrize("dq_inverted", [False, True], ids=["dq-gather", "dq-inverted"])
def test_one_node_backward_equals_the_branch_functions(dq_inverted, poisoned):
    """NSAAttentionFunction's backward (deltas from the combination, dq summed in the kernels) against the
    per-branch autograd Functions composed as autograd would sum them, in fp32."""
    config, sizes = CPU_CASES["paper-like-G4"]
    x = random_inputs(config, **sizes, dtype=torch.float32, seed=5, requires_grad=True)
    x.pop("cu_seqlens")
    params = NSAParams(selected=dataclasses.replace(
        selected_attention.default_params(config, 4, 1, 16, 16, dtype=torch.float32), dq_inverted=dq_inverted))
    o = nsa_attention(**x, config=config, params=params)
    do = torch.randn_like(o)
    got = torch.autograd.grad(o, [x[n] for n in NAMES], do)

    seqs = PackedSequences.build(config, 1, o.shape[1], o.device, None)
    params = params.resolve(config, 4, 1, 16, 16, torch.float32)
    q, k, v, k_cmp, v_cmp = (x[n][0] for n in NAMES[:5])
    gates = [x[n].reshape(-1) for n in NAMES[5:]]
    scale = 16 ** -0.5
    o_cmp, lse = compression.CompressedAttentionFunction.apply(q, k_cmp, v_cmp, seqs, config, scale,
                                                               params.compression)
    idx = selection.select_blocks_fwd(q, k_cmp, lse, seqs, config, scale, params.selection)
    o_slc, _ = selected_attention.SelectedAttentionFunction.apply(q, k, v, idx, seqs, config, scale, params.selected)
    o_win = window_attention.WindowAttentionFunction.apply(q, k, v, seqs, config, scale, params.window)
    want_o = combine.CombineFunction.apply(*(y.reshape(-1, 16) for y in (o_cmp, o_slc, o_win)), *gates,
                                           params.combine)
    want = torch.autograd.grad(want_o, [x[n] for n in NAMES], do.reshape(-1, 16))
    torch.testing.assert_close(o.reshape(-1, 16), want_o, rtol=0, atol=0)
    for name, g, w in zip(NAMES, got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=f"d{name}")


def test_rejects_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    config = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=2, window=8, local_blocks=1)
    x = random_inputs(config, batch=1, seqlen=20, num_heads=2, num_kv_heads=1, head_dim=16, seed=0)
    x.pop("cu_seqlens")
    with pytest.raises(ValueError, match="need CUDA tensors"):
        nsa_attention(**x, config=config)


def test_rejects_bad_shapes_before_launch():
    config = NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=2, window=8, local_blocks=1)
    x = random_inputs(config, batch=1, seqlen=40, num_heads=2, num_kv_heads=1, head_dim=16, seed=0)
    x.pop("cu_seqlens")
    x["k_cmp"] = x["k_cmp"][:, :-1]
    with pytest.raises(ValueError, match="k_cmp must have shape"):
        nsa_attention(**x, config=config)


GPU_CASES = [
    ("paper-G16", 64, 4, 128, 128),
    ("G4", 64, 16, 128, 128),
    ("G1", 16, 16, 128, 128),
    ("Dk192-Dv128", 16, 2, 192, 128),
]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("seqlen", [1000, 4096, 16384])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_matches_reference_on_gpu(case, dtype, seqlen, poisoned):
    _, hq, hkv, dk, dv = case
    if seqlen > 4096 and case[0] != "paper-G16":
        pytest.skip("long sequences run for the paper shape only (time)")
    config = NSAConfig()
    x = random_inputs(config, batch=1, seqlen=seqlen, num_heads=hq, num_kv_heads=hkv, head_dim=dk, head_dim_v=dv,
                      dtype=dtype, device="cuda", requires_grad=True)
    cu = x.pop("cu_seqlens")
    errors = check_against_reference(config, x, cu, ref_dtype=torch.float64)
    print(case[0], dtype, seqlen, {k: f"{v:.2e}" for k, v in errors.items()})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
def test_varlen_on_gpu(dtype, poisoned):
    config = NSAConfig()
    x = random_inputs(config, seqlens=[17, 1500, 64, 3000], num_heads=32, num_kv_heads=4, head_dim=128,
                      dtype=dtype, device="cuda", requires_grad=True)
    cu = x.pop("cu_seqlens")
    check_against_reference(config, x, cu, ref_dtype=torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("num_kv_heads", [4, 16], ids=["G16-gather", "G4-inverted"])
def test_no_host_sync(num_kv_heads, backward):
    """A dense batch's forward, and its backward, queue every kernel without waiting for the GPU: a host sync
    leaves the GPU idle while the host queues what follows (25.7 of a 240 ms step at 64k, G=4 on an H200, before
    the offsets and the inverted kernels' items stayed on the device; in the backward, the dk/dv items were
    counted by a sync until session 15)."""
    config = NSAConfig()
    x = random_inputs(config, batch=2, seqlen=4096, num_heads=64, num_kv_heads=num_kv_heads, head_dim=128,
                      dtype=torch.bfloat16, device="cuda", requires_grad=backward)
    x.pop("cu_seqlens")
    grad = torch.randn_like(x["q"])

    def step():
        out = nsa_attention(**x, config=config)
        if backward:
            out.backward(grad)

    step()  # compiles, reads the config cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_replays_in_a_cuda_graph():
    """Forward and backward captured in one CUDA graph (no host sync, above; static shapes) replay, on new input
    values, to the eager step's output and gradients bit for bit (no kernel uses atomics): a short sequence's
    step, which the host paces, can be graphed."""
    config = NSAConfig()
    shape = dict(batch=1, seqlen=2048, num_heads=64, num_kv_heads=4, head_dim=128, dtype=torch.bfloat16,
                 device="cuda", requires_grad=True)
    x = random_inputs(config, seed=0, **shape)
    x.pop("cu_seqlens")
    grad = torch.randn_like(x["q"])

    def step():
        out = nsa_attention(**x, config=config)
        return (out, *torch.autograd.grad(out, list(x.values()), grad))

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # outside the capture: compiles, reads the config cache, memoizes the offsets
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = random_inputs(config, seed=1, **shape)
    with torch.no_grad():
        for name, tensor in x.items():
            tensor.copy_(fresh[name])
        grad.normal_()
    graph.replay()
    eager = step()
    for name, got, want in zip(["o", *(f"d{name}" for name in x)], captured, eager):
        assert torch.equal(got, want), f"{name}: max |graph - eager| = {(got.float() - want.float()).abs().max():.3e}"
