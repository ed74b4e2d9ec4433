"""Triton sliding-window attention (SPEC 1.6) against the float64 reference: output, lse, dq, dk, dv.

CPU cases run the kernels in Triton's interpreter (TRITON_INTERPRET=1) in fp32; small tiles make every case
cross several query/key tiles, band edges and sequence ends. GPU cases (-m gpu) use fp16/bf16 at full size.
"""

import dataclasses
import inspect

import pytest
import torch

from nsa import NSAConfig
from nsa.accuracy import ERROR_FLOOR, allowed_error, assert_close
from nsa.kernels import runtime
from nsa.kernels.packing import PackedSequences
from nsa.kernels.window_attention import (WindowAttentionParams, default_params, window_attention,
                                          window_attention_bwd, window_attention_fwd)
from nsa.problems import random_inputs
from nsa.reference import window_attention as reference_window_attention

# Tiles of 16 positions/keys: many tiles per case, one position per head block where heads are packed.
SMALL = WindowAttentionParams(fwd_block_m=16, fwd_block_n=16, dkdv_block_m=16, dkdv_block_n=16,
                              dq_block_m=16, dq_block_n=16)
# Heads packed per program (rows = positions x heads), unequal tiles across the three kernels.
PACKED = WindowAttentionParams(fwd_block_m=4, fwd_block_n=16, fwd_block_h=4, dkdv_block_m=8, dkdv_block_n=32,
                               dkdv_block_h=2, dq_block_m=4, dq_block_n=32, dq_block_h=4)
# More heads per program than the group has (or a group they do not divide): masked head rows.
UNEVEN = WindowAttentionParams(fwd_block_m=4, fwd_block_n=16, fwd_block_h=4, dkdv_block_m=4, dkdv_block_n=16,
                               dkdv_block_h=4, dq_block_m=4, dq_block_n=16, dq_block_h=4)
# K/V tiles by TMA descriptors in the forward and by pointer loads in dq and dk/dv: the other way round from the
# defaults.
SWAPPED_LOADS = dict(fwd_tma=True, dq_tma=False, dkdv_tma=False)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)


def config(window: int) -> NSAConfig:
    return NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=3, window=window)


def reference_lse(q, k, cfg, scale, seqlens):
    """[Hq, Ttot] log-sum-exp of each query's window scores, float64, by brute force (small T only)."""
    q, k = q[0].double(), k[0].double()
    group = q.shape[1] // k.shape[1]
    out, start = [], 0
    for n in seqlens:
        qs, ks = q[start:start + n], k[start:start + n].repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", qs, ks) * scale
        t, s = torch.arange(n)[:, None], torch.arange(n)[None, :]
        inside = (s <= t) & (s > t - cfg.window)
        out.append(torch.logsumexp(scores.masked_fill(~inside, float("-inf")), dim=-1))
        start += n
    return torch.cat(out, dim=1)


def assert_grad_close(name, x, ref, magnitude):
    """Relative error within the fp32 floor; a gradient that is exactly zero (e.g. dq, dk with w = 1) is
    compared against `magnitude`, the norm of a gradient of the same problem that is not."""
    if ref.norm() > 0:
        assert_close(name, x, ref, ERROR_FLOOR[torch.float32])
    else:
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        assert x.norm() <= ERROR_FLOOR[torch.float32] * magnitude, f"{name}: {x.norm():.3e} should be ~0"


CASES = {
    # id: (window, batch, seqlen or None, seqlens or None, Hq, Hkv, Dk, Dv, params)
    "w16-G1-T100": (16, 1, 100, None, 2, 2, 32, 32, SMALL),
    "w1-G2-T45": (1, 1, 45, None, 4, 2, 32, 16, SMALL),
    "w40-G4-T130-packed": (40, 1, 130, None, 8, 2, 32, 16, PACKED),
    "w40-G2-B2-T37": (40, 2, 37, None, 4, 2, 16, 16, SMALL),
    "wT-G16-MQA-T77-packed": (200, 1, 77, None, 16, 1, 32, 16, PACKED),
    "w16-G16-Hkv2-T50-packed": (16, 1, 50, None, 32, 2, 16, 16, PACKED),
    "w40-MQA-G4-T90": (40, 1, 90, None, 4, 1, 32, 16, SMALL),
    "w23-G6-uneven-heads-Dk24-Dv40": (23, 1, 61, None, 6, 1, 24, 40, UNEVEN),
    "w16-G2-uneven-heads": (16, 1, 40, None, 4, 2, 16, 32, UNEVEN),
    "varlen-w16-G2": (16, 1, None, [1, 50, 0, 17, 64], 4, 2, 32, 16, SMALL),
    "varlen-w40-G4-packed": (40, 1, None, [37, 1, 70], 8, 2, 16, 16, PACKED),
    "w16-G2-default-params": (16, 1, 70, None, 4, 2, 32, 16, None),
    "varlen-w16-G2-swapped-loads": (16, 1, None, [1, 50, 0, 17, 64], 4, 2, 32, 16,
                                    dataclasses.replace(SMALL, **SWAPPED_LOADS)),
    "w40-G4-T130-packed-swapped-loads": (40, 1, 130, None, 8, 2, 32, 16, dataclasses.replace(PACKED, **SWAPPED_LOADS)),
    "w16-G2-uneven-heads-swapped-loads": (16, 1, 40, None, 4, 2, 16, 32, dataclasses.replace(UNEVEN, **SWAPPED_LOADS)),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_window_attention_matches_reference(case):
    window, batch, seqlen, seqlens, hq, hkv, dk, dv, params = CASES[case]
    cfg = config(window)
    seed = sorted(CASES).index(case)
    x = random_inputs(cfg, batch=batch, seqlen=seqlen, seqlens=seqlens, num_heads=hq, num_kv_heads=hkv,
                      head_dim=dk, head_dim_v=dv, seed=seed, requires_grad=True)
    q, k, v, cu = x["q"], x["k"], x["v"], x["cu_seqlens"]
    o = window_attention(q, k, v, cfg, cu_seqlens=cu, params=params)
    assert o.shape == (q.shape[0], q.shape[1], hq, dv) and o.dtype == torch.float32
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(100 + seed))
    grads = torch.autograd.grad(o, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    ref = reference_window_attention(q64, k64, v64, cfg, cu_seqlens=cu)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), do.double())

    assert_close("o", o, ref, ERROR_FLOOR[torch.float32])
    magnitude = ref_grads[2].norm()
    for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_grad_close(name, g, r, magnitude)


@pytest.mark.parametrize("case", ["varlen-w16-G2", "w40-G4-T130-packed"])
def test_lse(case):
    window, batch, seqlen, seqlens, hq, hkv, dk, dv, params = CASES[case]
    cfg = config(window)
    x = random_inputs(cfg, batch=batch, seqlen=seqlen, seqlens=seqlens, num_heads=hq, num_kv_heads=hkv,
                      head_dim=dk, head_dim_v=dv, seed=3)
    q, k, v = x["q"], x["k"], x["v"]
    scale = 0.3
    seqs = PackedSequences.build(cfg, q.shape[0], q.shape[1], q.device, x["cu_seqlens"])
    flat = [t.reshape(-1, t.shape[2], t.shape[3]).contiguous() for t in (q, k, v)]
    _, lse = window_attention_fwd(*flat, seqs, cfg, scale, params)
    assert lse.shape == (hq, q.shape[1]) and lse.dtype == torch.float32
    assert_close("lse", lse, reference_lse(q, k, cfg, scale, seqs.seqlens), ERROR_FLOOR[torch.float32])


def test_custom_scale_and_bf16_inputs():
    """Non-default scale; bf16 inputs run in fp32 in the interpreter and come back as bf16."""
    cfg = config(24)
    x = random_inputs(cfg, seqlen=40, num_heads=4, num_kv_heads=2, head_dim=16, seed=11)
    q, k, v = x["q"], x["k"], x["v"]
    o = window_attention(q, k, v, cfg, scale=0.7, params=SMALL)
    ref = reference_window_attention(q.double(), k.double(), v.double(), cfg, scale=0.7)
    assert_close("o", o, ref, ERROR_FLOOR[torch.float32])
    low = window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg, scale=0.7, params=SMALL)
    assert low.dtype == torch.bfloat16
    same_dtype = reference_window_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg, scale=0.7)
    assert_close("o bf16", low, ref, allowed_error(ref, same_dtype, torch.bfloat16))


def test_bad_inputs_are_clear_errors():
    cfg = config(16)
    x = random_inputs(cfg, seqlen=20, num_heads=4, num_kv_heads=2, head_dim=16, seed=0)
    q, k, v = x["q"], x["k"], x["v"]
    with pytest.raises(ValueError, match="multiple of kv heads"):
        window_attention(q[:, :, :3], k, v, cfg)
    with pytest.raises(ValueError, match="k must have shape"):
        window_attention(q, k[:, :10], v, cfg)
    with pytest.raises(ValueError, match="v must have shape"):
        window_attention(q, k, v[:, :, :1], cfg)
    with pytest.raises(TypeError, match="dtype"):
        window_attention(q, k.double(), v, cfg)
    with pytest.raises(TypeError, match="NSAConfig"):
        window_attention(q, k, v, 16)
    with pytest.raises(ValueError, match="cu_seqlens"):
        window_attention(q, k, v, cfg, cu_seqlens=torch.tensor([0, 5, 19], dtype=torch.int32))
    with pytest.raises(ValueError, match="scale"):
        window_attention(q, k, v, cfg, scale=-1.0)
    with pytest.raises(TypeError, match="WindowAttentionParams"):
        window_attention(q, k, v, cfg, params={"fwd_block_m": 16})


def test_dq_adds_into_a_given_gradient_and_one_more():
    """dq=: the branch's dq is added to that tensor in place; dq_add=: one more gradient is added as it is written
    (how nsa_attention sums the three branches' dq). Fresh random addends, so nothing passes by coincidence."""
    cfg = config(16)
    x = random_inputs(cfg, seqlen=50, num_heads=4, num_kv_heads=2, head_dim=32, seed=3)
    q, k, v = (x[name][0].contiguous() for name in ("q", "k", "v"))
    seqs = PackedSequences.build(cfg, 1, 50, q.device)
    scale = q.shape[-1] ** -0.5
    o, lse = window_attention_fwd(q, k, v, seqs, cfg, scale, SMALL)
    do = torch.randn_like(o)
    own, dk, dv = window_attention_bwd(do, q, k, v, o, lse, seqs, cfg, scale, SMALL)
    base, extra = torch.randn_like(q), torch.randn_like(q)
    dq, dk2, dv2 = window_attention_bwd(do, q, k, v, o, lse, seqs, cfg, scale, SMALL, dq=base.clone(), dq_add=extra)
    assert_close("dq", dq, own + base + extra, ERROR_FLOOR[torch.float32])
    assert torch.equal(dk2, dk) and torch.equal(dv2, dv)
    with pytest.raises(ValueError, match="dq_add must be laid out as dq"):
        window_attention_bwd(do, q, k, v, o, lse, seqs, cfg, scale, SMALL, dq=base.clone(), dq_add=extra[:, :2])


def test_cpu_tensors_without_the_interpreter_are_an_error(monkeypatch):
    cfg = config(16)
    x = random_inputs(cfg, seqlen=20, num_heads=2, num_kv_heads=1, head_dim=16, seed=0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA"):
        window_attention(x["q"], x["k"], x["v"], cfg)


def test_params_are_validated():
    with pytest.raises(ValueError, match="power of two"):
        WindowAttentionParams(fwd_block_m=24)
    with pytest.raises(ValueError, match=">= 16"):
        WindowAttentionParams(fwd_block_m=4, fwd_block_h=2)
    with pytest.raises(ValueError, match="num_stages"):
        WindowAttentionParams(dq_num_stages=0)


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["gpu-defaults", "interpreter-defaults"])
def test_default_params_are_valid(monkeypatch, interpret):
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    for hq, hkv, dk, dv, dtype in [(64, 4, 128, 128, torch.bfloat16), (16, 16, 64, 64, torch.float16),
                                   (6, 2, 192, 128, torch.float32), (3, 1, 256, 256, torch.bfloat16),
                                   (8, 2, 16, 16, None)]:
        p = default_params(hq, hkv, dk, dv, config(512), "cpu", dtype)
        for kernel in ("fwd", "dkdv", "dq"):
            assert (hq // hkv) % getattr(p, f"{kernel}_block_h") == 0
    if interpret == "0":  # G = 16: 8 heads share every K/V tile, 16 positions each
        assert default_params(64, 4, 128, 128).fwd_block_h == 8


def test_tma_rows_only_where_tma_can_read():
    """A descriptor of [block, D] tiles over [T, H * D] (or of [tokens, heads, D] boxes) for a contiguous,
    aligned K; None otherwise."""
    k = torch.randn(40, 2, 32)
    desc = runtime.tma_rows(k, 16, 32)
    assert desc is not None and list(desc.shape) == [40, 64] and list(desc.block_shape) == [16, 32]
    assert runtime.tma_rows(k, 16, 64) is None  # head dim padded to the block
    assert runtime.tma_rows(k.transpose(0, 1).contiguous().transpose(0, 1), 16, 32) is None  # not contiguous
    assert runtime.tma_rows(torch.randn(40 * 64 + 1)[1:].view(40, 2, 32), 16, 32) is None  # base not aligned
    assert runtime.tma_rows(torch.randn(40, 1, 5), 16, 5) is None  # rows of 20 bytes
    tiles = runtime.tma_head_tiles(k, 4, 2, 32)  # the same rules for [tokens, heads, D] boxes
    assert tiles is not None and list(tiles.shape) == [40, 2, 32] and list(tiles.block_shape) == [4, 2, 32]
    assert runtime.tma_head_tiles(k, 4, 2, 64) is None and runtime.tma_head_tiles(k[:, :, :16], 4, 2, 16) is None


def test_signature_matches_reference():
    """Same arguments as the reference stage (minus its chunking knob), plus keyword `params`."""
    ours = inspect.signature(window_attention).parameters
    ref = {n: p for n, p in inspect.signature(reference_window_attention).parameters.items() if n != "chunk_size"}
    assert list(ours) == list(ref) + ["params"]
    assert all(ours[n].kind == ref[n].kind for n in ref)
    assert ours["params"].kind == inspect.Parameter.KEYWORD_ONLY


# ----------------------------------------------------------------------------------------------------------------
# GPU: fp16/bf16 at full size against the reference in fp32 (run with `pytest -m gpu` on a CUDA machine)
# ----------------------------------------------------------------------------------------------------------------

GPU_CASES = {
    # id: (window, seqlen or None, seqlens or None, Hq, Hkv, Dk, Dv)
    "T16384-Hq64-Hkv4-D128-w512": (512, 16384, None, 64, 4, 128, 128),
    "T4096-G1-Hq16-D128-w512": (512, 4096, None, 16, 16, 128, 128),
    "T2048-G2-Hq8-D64-w512": (512, 2048, None, 8, 4, 64, 64),
    "T3000-G4-Dk192-Dv128-w300": (300, 3000, None, 8, 2, 192, 128),
    "varlen-G16-D128-w512": (512, None, [1, 1000, 4097, 513], 32, 2, 128, 128),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or runtime.interpreting(), reason="needs CUDA (not the interpreter)")
@pytest.mark.parametrize("tma", [True, False], ids=["tma", "pointers"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CASES), ids=list(GPU_CASES))
def test_window_attention_gpu(case, dtype, tma):
    """The default tiles, K/V tiles (and dk/dv's q/dO tiles) read by TMA (where the head dims allow) or by
    pointer loads."""
    window, seqlen, seqlens, hq, hkv, dk, dv = GPU_CASES[case]
    cfg = NSAConfig(window=window)
    seed = sorted(GPU_CASES).index(case)
    x = random_inputs(cfg, seqlen=seqlen, seqlens=seqlens, num_heads=hq, num_kv_heads=hkv, head_dim=dk,
                      head_dim_v=dv, dtype=dtype, device="cuda", seed=seed, requires_grad=True)
    q, k, v, cu = x["q"], x["k"], x["v"], x["cu_seqlens"]
    params = dataclasses.replace(default_params(hq, hkv, dk, dv), fwd_tma=tma, dq_tma=tma, dkdv_tma=tma)
    o = window_attention(q, k, v, cfg, cu_seqlens=cu, params=params)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(seed)).to(device="cuda", dtype=dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)

    def reference(tensors, grad_out):
        out = reference_window_attention(*tensors, cfg, cu_seqlens=cu)
        return (out, *torch.autograd.grad(out, tensors, grad_out))

    upcast = tuple(t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = reference(upcast, do.float())
    same = reference(tuple(t.detach().requires_grad_(True) for t in (q, k, v)), do)
    for name, got, r, s in zip(("o", "dq", "dk", "dv"), (o, *grads), ref, same):
        assert got.dtype == dtype
        assert_close(name, got, r, allowed_error(r, s, dtype))

