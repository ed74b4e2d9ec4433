"""Triton compressed attention (SPEC 1.2) against the float64 reference: output, lse, dq, dk_cmp, dv_cmp.

CPU cases run the kernels in Triton's interpreter (TRITON_INTERPRET=1) in fp32; small tiles make every case
cross several query/key tiles, the causal frontier of the compression blocks and sequence ends. GPU cases
(-m gpu) use fp16/bf16 at full size.
"""

import dataclasses
import inspect

import pytest
import torch

from nsa import NSAConfig
from nsa.accuracy import ERROR_FLOOR, allowed_error, assert_close
from nsa.kernels import runtime
from nsa.kernels.compression import (CompressionParams, compressed_attention, compressed_attention_fwd,
                                     default_params, dkdv_splits)
from nsa.kernels.packing import PackedSequences
from nsa.problems import random_inputs
from nsa.reference import compressed_attention as reference_compressed_attention
from nsa.suites.catalog import GPU_CHECK_SHAPES

# 16-row tiles of 16 keys: several query and key tiles per case, masked and unmasked steps.
SMALL = CompressionParams(fwd_block_m=16, fwd_block_n=16, fwd_block_h=1, dkdv_block_m=16, dkdv_block_n=16,
                          dkdv_block_h=1, dq_block_m=16, dq_block_n=16, dq_block_h=1)
# Heads packed per tile (rows = positions x heads), unequal tiles across the three kernels.
PACKED = CompressionParams(fwd_block_m=4, fwd_block_n=16, fwd_block_h=4, dkdv_block_m=8, dkdv_block_n=32,
                           dkdv_block_h=2, dq_block_m=4, dq_block_n=32, dq_block_h=4)
# Head tiles that do not divide the group, or exceed it: masked head rows.
UNEVEN = CompressionParams(fwd_block_m=4, fwd_block_n=16, fwd_block_h=4, dkdv_block_m=8, dkdv_block_n=16,
                           dkdv_block_h=2, dq_block_m=4, dq_block_n=16, dq_block_h=4)

# dk/dv query tiles cut into runs, fp32 partials summed: 3 runs; more runs than some key tiles have query tiles.
SPLIT3 = dataclasses.replace(SMALL, dkdv_splits=3)
PACKED_SPLIT8 = dataclasses.replace(PACKED, dkdv_splits=8)
# The dq kernel's K/V tiles by pointer loads instead of TMA descriptors (GPUs before Hopper, padded head dims).
POINTERS = dict(dq_tma=False)
# The dk/dv kernel's q and dO tiles by TMA copies of [positions, heads, D] boxes: the box crosses sequence ends,
# and with a head chunk that does not divide the group, into the next group's heads (or past the last head).
DKDV_TMA = dict(dkdv_tma=True)
# The dk/dv runs cut at the same positions for every key tile: key tiles whose first query tile lies past a
# run's end get empty runs (zero partials); with l8d4 and 16 keys a key tile starts 64 positions (8 query
# tiles) after the previous one, 3 key tiles at T=150.
POSITION_SPLITS = dict(dkdv_position_splits=True)

PAPER_LIKE = NSAConfig(cmp_block=32, cmp_stride=16, slc_block=64, slc_topn=4)
EQUAL = NSAConfig(cmp_block=16, cmp_stride=16, slc_block=16, slc_topn=4)
OVERLAP = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topn=4)


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)


CASES = {
    # id: (config, batch, seqlen or None, seqlens or None, Hq, Hkv, Dk, Dv, params)
    "l16d16-G2-B2-T100": (EQUAL, 2, 100, None, 4, 2, 32, 32, SMALL),
    "l8d4-G1-T77": (OVERLAP, 1, 77, None, 2, 2, 16, 16, SMALL),
    "l32d16-G4-T150-Dk32-Dv16-packed": (PAPER_LIKE, 1, 150, None, 8, 2, 32, 16, PACKED),
    "l8d4-G16-MQA-T61-packed": (OVERLAP, 1, 61, None, 16, 1, 16, 16, PACKED),
    "l8d4-MQA-G4-T90": (OVERLAP, 1, 90, None, 4, 1, 32, 16, SMALL),
    "l8d4-G3-uneven-Dk24-Dv40": (OVERLAP, 1, 70, None, 6, 2, 24, 40, UNEVEN),
    "l16d16-G2-uneven": (EQUAL, 1, 64, None, 4, 2, 16, 16, UNEVEN),
    "varlen-l8d4-G2": (OVERLAP, 1, None, [5, 50, 0, 17, 64], 4, 2, 32, 16, SMALL),
    "varlen-l32d16-G4-packed": (PAPER_LIKE, 1, None, [31, 100, 32, 47], 8, 2, 16, 16, PACKED),
    "T<l-l16d16": (EQUAL, 2, 10, None, 4, 2, 16, 16, SMALL),
    "varlen-all-shorter-than-l": (EQUAL, 1, None, [3, 15, 1], 2, 1, 16, 16, SMALL),
    "l8d4-G2-Dk192-Dv128": (OVERLAP, 1, 40, None, 4, 2, 192, 128, SMALL),
    "l32d16-G2-default-params": (PAPER_LIKE, 1, 130, None, 4, 2, 32, 16, None),
    "l16d16-G2-B2-T100-dkdv-split3": (EQUAL, 2, 100, None, 4, 2, 32, 32, SPLIT3),
    "varlen-l32d16-G4-packed-dkdv-split8": (PAPER_LIKE, 1, None, [31, 100, 32, 47], 8, 2, 16, 16, PACKED_SPLIT8),
    "varlen-l8d4-G2-pointers": (OVERLAP, 1, None, [5, 50, 0, 17, 64], 4, 2, 32, 16,
                                dataclasses.replace(SMALL, **POINTERS)),
    "l32d16-G4-T150-Dk32-Dv16-packed-pointers": (PAPER_LIKE, 1, 150, None, 8, 2, 32, 16,
                                                 dataclasses.replace(PACKED, **POINTERS)),
    "varlen-l32d16-G4-packed-dkdv-split8-tma": (PAPER_LIKE, 1, None, [31, 100, 32, 47], 8, 2, 32, 16,
                                                dataclasses.replace(PACKED_SPLIT8, **DKDV_TMA)),
    "l8d4-G3-uneven-dkdv-tma": (OVERLAP, 1, 70, None, 6, 2, 16, 32, dataclasses.replace(UNEVEN, **DKDV_TMA)),
    "l16d16-G2-B2-T100-dkdv-split3-positions": (EQUAL, 2, 100, None, 4, 2, 32, 32,
                                                dataclasses.replace(SPLIT3, **POSITION_SPLITS)),
    "varlen-l8d4-G3-uneven-dkdv-split8-positions-tma": (OVERLAP, 1, None, [5, 150, 0, 17, 64], 6, 2, 16, 32,
                                                        dataclasses.replace(UNEVEN, dkdv_splits=8, **DKDV_TMA,
                                                                            **POSITION_SPLITS)),
}


def problem(case, seed, requires_grad=True):
    cfg, batch, seqlen, seqlens, hq, hkv, dk, dv, params = CASES[case]
    x = random_inputs(cfg, batch=batch, seqlen=seqlen, seqlens=seqlens, num_heads=hq, num_kv_heads=hkv,
                      head_dim=dk, head_dim_v=dv, seed=seed, requires_grad=requires_grad)
    return cfg, params, x["q"], x["k_cmp"], x["v_cmp"], x["cu_seqlens"]


def reference_lse(q, k_cmp, cfg, scale, seqlens):
    """[Hq, Ttot] float64 log-sum-exp over each query's visible compression blocks (+inf where none)."""
    q, k_cmp = q[0].double(), k_cmp[0].double()
    group = q.shape[1] // k_cmp.shape[1]
    out, start, cmp_start = [], 0, 0
    for n in seqlens:
        tc = cfg.num_cmp_blocks(n)
        keys = k_cmp[cmp_start:cmp_start + tc].repeat_interleave(group, dim=1)
        scores = torch.einsum("thd,shd->hts", q[start:start + n], keys) * scale
        visible = torch.arange(tc)[None, :] * cfg.cmp_stride + cfg.cmp_block - 1 <= torch.arange(n)[:, None]
        lse = torch.logsumexp(scores.masked_fill(~visible, float("-inf")), dim=-1)
        out.append(torch.where(visible.any(-1), lse, float("inf")))
        start, cmp_start = start + n, cmp_start + tc
    return torch.cat(out, dim=1)


def assert_grad_close(name, x, ref, magnitude):
    """Relative error within the fp32 floor; an all-zero reference gradient (nothing visible) must come out as 0."""
    if ref.norm() > 0:
        assert_close(name, x, ref, ERROR_FLOOR[torch.float32])
    else:
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
        assert x.norm() <= ERROR_FLOOR[torch.float32] * max(magnitude, 1.0), f"{name}: {x.norm():.3e} should be 0"


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_compressed_attention_matches_reference(case):
    seed = sorted(CASES).index(case)
    cfg, params, q, k_cmp, v_cmp, cu = problem(case, seed)
    o = compressed_attention(q, k_cmp, v_cmp, cfg, cu_seqlens=cu, params=params)
    assert o.shape == (*q.shape[:3], v_cmp.shape[3]) and o.dtype == torch.float32
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(100 + seed))
    grads = torch.autograd.grad(o, (q, k_cmp, v_cmp), do)

    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in (q, k_cmp, v_cmp))
    ref = reference_compressed_attention(q64, k64, v64, cfg, cu_seqlens=cu)
    ref_grads = (torch.autograd.grad(ref, (q64, k64, v64), do.double()) if k64.shape[1]
                 else (torch.zeros_like(q64), k64, v64))

    if ref.norm() > 0:
        assert_close("o", o, ref, ERROR_FLOOR[torch.float32])
    else:
        assert torch.equal(o, torch.zeros_like(o)), "o must be 0 where no compression block is visible"
    magnitude = ref_grads[0].norm().item()
    for name, g, r in zip(("dq", "dk_cmp", "dv_cmp"), grads, ref_grads):
        assert g.shape == r.shape
        assert_grad_close(name, g, r, magnitude)


@pytest.mark.parametrize("case", ["varlen-l8d4-G2", "l32d16-G4-T150-Dk32-Dv16-packed", "T<l-l16d16"])
def test_lse(case):
    cfg, params, q, k_cmp, v_cmp, cu = problem(case, 3, requires_grad=False)
    scale = 0.3
    seqs = PackedSequences.build(cfg, q.shape[0], q.shape[1], q.device, cu)
    o, lse = compressed_attention(q, k_cmp, v_cmp, cfg, scale=scale, cu_seqlens=cu, params=params, return_lse=True)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert not lse.requires_grad
    packed = lse.transpose(0, 1).reshape(q.shape[2], -1)
    ref = reference_lse(q.reshape(1, -1, *q.shape[2:]), k_cmp.reshape(1, -1, *k_cmp.shape[2:]), cfg, scale,
                        seqs.seqlens)
    blind = torch.isinf(ref)
    assert torch.equal(torch.isinf(packed), blind) and (packed[blind] > 0).all(), "+inf exactly where nothing is seen"
    if (~blind).any():
        assert_close("lse", packed[~blind], ref[~blind], ERROR_FLOOR[torch.float32])
    # The packed launcher gives the same lse.
    flat = [t.reshape(-1, t.shape[2], t.shape[3]).contiguous() for t in (q, k_cmp, v_cmp)]
    _, lse_packed = compressed_attention_fwd(*flat, seqs, cfg, scale, params or default_params(
        q.shape[2], k_cmp.shape[2], q.shape[3], v_cmp.shape[3], torch.float32))
    assert torch.equal(lse_packed, packed)


def test_gradient_of_lse_is_not_defined_but_o_trains():
    cfg, params, q, k_cmp, v_cmp, cu = problem("l8d4-MQA-G4-T90", 5)
    o, lse = compressed_attention(q, k_cmp, v_cmp, cfg, params=params, return_lse=True)
    assert lse.grad_fn is None
    (o.square().sum()).backward()
    for name, t in (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, name


def test_signature_matches_reference():
    ours = inspect.signature(compressed_attention).parameters
    ref = inspect.signature(reference_compressed_attention).parameters
    shared = [name for name in ref if name != "chunk_size"]  # the reference's memory knob has no kernel meaning
    assert list(ours)[:len(shared)] == shared
    assert {"params", "return_lse"} <= set(ours)
    for name in ("q", "k_cmp", "v_cmp", "config", "scale", "cu_seqlens", "params", "return_lse", "Returns"):
        assert name in compressed_attention.__doc__


def test_params_validation():
    with pytest.raises(ValueError, match="power of two"):
        CompressionParams(fwd_block_m=12)
    with pytest.raises(ValueError, match=">= 16"):
        CompressionParams(fwd_block_m=2, fwd_block_h=4)
    with pytest.raises(ValueError, match="num_stages"):
        CompressionParams(dq_num_stages=0)
    assert CompressionParams(dkdv_splits=3).dkdv_splits == 3  # a count: any int >= 1
    with pytest.raises(ValueError, match="dkdv_splits"):
        CompressionParams(dkdv_splits=0)
    for group in (1, 2, 3, 16, 64):
        p = default_params(group * 2, 2, 128, 128)
        assert p.fwd_block_m * p.fwd_block_h >= 16


def test_dkdv_splits_are_lowered_to_fit_the_partials(monkeypatch):
    """The fp32 dk/dv partials of all splits stay under DKDV_PARTIAL_BYTES; at least one split always runs."""
    compression = inspect.getmodule(default_params)
    params = CompressionParams(dkdv_splits=8)
    per_split = 4095 * 4 * (128 + 128) * 4  # paper shape at 64k: 16.8 MB
    assert dkdv_splits(params, (4095, 4, 128), 128) == 8
    monkeypatch.setattr(compression, "DKDV_PARTIAL_BYTES", 3 * per_split)
    assert dkdv_splits(params, (4095, 4, 128), 128) == 3
    monkeypatch.setattr(compression, "DKDV_PARTIAL_BYTES", per_split // 2)
    assert dkdv_splits(params, (4095, 4, 128), 128) == 1


@pytest.mark.parametrize("bad", ["k_cmp-length", "heads", "dtype", "v_cmp-heads", "rank", "cu_seqlens-batch",
                                 "config", "scale", "params", "float64"])
def test_bad_inputs(bad):
    cfg = OVERLAP
    x = random_inputs(cfg, batch=2, seqlen=40, num_heads=4, num_kv_heads=2, head_dim=16, seed=0)
    q, k_cmp, v_cmp = x["q"], x["k_cmp"], x["v_cmp"]
    kwargs = {}
    error = ValueError
    if bad == "k_cmp-length":
        k_cmp = k_cmp[:, :-1]
    elif bad == "heads":
        q = q[:, :, :3]
    elif bad == "dtype":
        v_cmp, error = v_cmp.half(), TypeError
    elif bad == "v_cmp-heads":
        v_cmp = v_cmp[:, :, :1]
    elif bad == "rank":
        q = q[0]
    elif bad == "cu_seqlens-batch":
        kwargs["cu_seqlens"] = torch.tensor([0, 20, 40], dtype=torch.int32)
    elif bad == "config":
        cfg, error = "paper", TypeError
    elif bad == "scale":
        kwargs["scale"] = -1.0
    elif bad == "params":
        kwargs["params"], error = {"fwd_block_m": 16}, TypeError
    elif bad == "float64":
        q, k_cmp, v_cmp = q.double(), k_cmp.double(), v_cmp.double()
        if runtime.interpreting():
            pytest.skip("the interpreter computes float64 inputs in fp32")
        error = TypeError
    with pytest.raises(error):
        compressed_attention(q, k_cmp, v_cmp, cfg, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# GPU (fp16/bf16 at full size); the reference runs on the GPU in float32 from the same inputs, upcast.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CHECK_SHAPES), ids=list(GPU_CHECK_SHAPES))
@pytest.mark.parametrize("dkdv_splits, tma", [(1, True), (4, False)], ids=["dkdv-whole-tma", "dkdv-split4-pointers"])
def test_compressed_attention_gpu(case, dtype, dkdv_splits, tma):
    """Both kernels of the backward with TMA tiles, or both with pointer loads."""
    seqlen, seqlens, hq, hkv, d = GPU_CHECK_SHAPES[case]
    cfg = NSAConfig()  # l=32, d=16, l'=64, n=16
    x = random_inputs(cfg, batch=1, seqlen=seqlen, seqlens=seqlens, num_heads=hq, num_kv_heads=hkv, head_dim=d,
                      dtype=dtype, device="cuda", seed=11, requires_grad=True)
    q, k_cmp, v_cmp, cu = x["q"], x["k_cmp"], x["v_cmp"], x["cu_seqlens"]
    params = dataclasses.replace(default_params(hq, hkv, d, d, dtype), dkdv_splits=dkdv_splits, dq_tma=tma,
                                 dkdv_tma=tma)
    o = compressed_attention(q, k_cmp, v_cmp, cfg, cu_seqlens=cu, params=params)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(12)).to(device="cuda", dtype=dtype)
    grads = torch.autograd.grad(o, (q, k_cmp, v_cmp), do)

    def run_reference(dt):
        ins = [t.detach().to(dt).requires_grad_(True) for t in (q, k_cmp, v_cmp)]
        out = reference_compressed_attention(*ins, cfg, cu_seqlens=cu)
        return (out, *torch.autograd.grad(out, ins, do.to(dt)))

    ref = run_reference(torch.float32)
    same = run_reference(dtype)
    for name, got, r, s in zip(("o", "dq", "dk_cmp", "dv_cmp"), (o, *grads), ref, same):
        assert got.dtype == dtype
        assert_close(name, got, r, allowed_error(r, s, dtype))
