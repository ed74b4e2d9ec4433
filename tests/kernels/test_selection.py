"""Triton block selection (SPEC 1.3-1.4) against the float64 reference.

Two checks: exact equality with `nsa.reference.select_blocks` where ties cannot matter (random fp32 problems,
whose distinct importances differ far beyond rounding, and constructed exact ties, which both sides break
towards the lower index by rule), and in every case `nsa.accuracy.selection_mismatches` against the float64
importance (a valid selection up to ties within rounding). GPU cases (-m gpu) use fp16/bf16 at full size with a
vectorised version of that checker (tested here against the original).
"""

import inspect

import pytest
import torch
import triton.language as tl

from nsa import NSAConfig
from nsa.accuracy import SELECTION_RTOL, selection_mismatches
from nsa.kernels import runtime, selection
from nsa.kernels.compression import compressed_attention
from nsa.kernels.selection import SelectionParams, default_params, select_blocks
from nsa.problems import random_inputs
from nsa.reference import block_importance
from nsa.reference import select_blocks as reference_select_blocks
from nsa.suites.catalog import GPU_CHECK_SHAPES


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)


def cfg(l, d, ls, n, init=1, local=2):
    return NSAConfig(cmp_block=l, cmp_stride=d, slc_block=ls, slc_topn=n, window=16, init_blocks=init,
                     local_blocks=local)


# Few positions per program: many programs, chunks and tile edges per case.
SMALL = SelectionParams(block_m=16, block_h=1)
PACKED = SelectionParams(block_m=8, block_h=4)
UNEVEN = SelectionParams(block_m=8, block_h=2)  # splits a group of 3 (or 16) into several head tiles

CASES = {
    # id: (config, batch, seqlen or None, seqlens or None, Hq, Hkv, Dk, params)
    "l16d16ls16-n4-G2-B2-T100": (cfg(16, 16, 16, 4), 2, 100, None, 4, 2, 16, None),
    "l8d4ls16-n4-G1-T200": (cfg(8, 4, 16, 4), 1, 200, None, 2, 2, 16, SMALL),
    "l32d16ls64-n3-G4-T300-init0-local1": (cfg(32, 16, 64, 3, 0, 1), 1, 300, None, 8, 2, 32, PACKED),
    "l8d4ls16-n5-init2-local3-G3-uneven": (cfg(8, 4, 16, 5, 2, 3), 1, 230, None, 6, 2, 24, UNEVEN),
    "l16d16ls16-n16-more-than-blocks": (cfg(16, 16, 16, 16), 1, 100, None, 4, 2, 16, SMALL),
    "l4d4ls8-n20-npad32-G2": (cfg(4, 4, 8, 20), 1, 300, None, 4, 2, 16, None),
    "l8d4ls24-R6-n4-G2": (cfg(8, 4, 24, 4), 1, 250, None, 4, 2, 16, SMALL),
    # Chunks wholly visible to their rows (no causal mask), and no local blocks to hide a masking error.
    "l4d2ls8-n6-G4-local0-whole-chunks": (cfg(4, 2, 8, 6, 1, 0), 1, 280, None, 8, 2, 16, PACKED),
    "l8d4ls16-G16-MQA-packed": (cfg(8, 4, 16, 4), 1, 150, None, 16, 1, 16, PACKED),
    "l8d4ls16-G16-Hkv2-head-tiles": (cfg(8, 4, 16, 4), 1, 90, None, 32, 2, 16, UNEVEN),
    "l8d4ls16-MQA-G4": (cfg(8, 4, 16, 4), 1, 180, None, 4, 1, 16, SMALL),
    "T<l-l16d16ls16": (cfg(16, 16, 16, 4), 2, 10, None, 4, 2, 16, SMALL),
    "varlen-l8d4ls16-init2-local3": (cfg(8, 4, 16, 5, 2, 3), 1, None, [5, 140, 0, 33, 7], 4, 2, 16, SMALL),
    "varlen-l32d16ls64-G4-n3": (cfg(32, 16, 64, 3), 1, None, [300, 31, 129], 8, 2, 16, None),
}


def problem(case, seed):
    config, batch, seqlen, seqlens, hq, hkv, dk, params = CASES[case]
    x = random_inputs(config, batch=batch, seqlen=seqlen, seqlens=seqlens, num_heads=hq, num_kv_heads=hkv,
                      head_dim=dk, seed=seed)
    lengths = [seqlens] if seqlens is not None else [[seqlen]] * batch
    return config, params, x["q"], x["k_cmp"], x["v_cmp"], x["cu_seqlens"], lengths


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_select_blocks_matches_reference(case):
    config, params, q, k_cmp, _, cu, lengths = problem(case, sorted(CASES).index(case))
    idx = select_blocks(q, k_cmp, config, cu_seqlens=cu, params=params)
    assert idx.shape == (*q.shape[:2], k_cmp.shape[2], config.slc_topn) and idx.dtype == torch.int32
    ref = reference_select_blocks(q.double(), k_cmp.double(), config, cu_seqlens=cu)
    imp = block_importance(q.double(), k_cmp.double(), config, cu_seqlens=cu)
    assert selection_mismatches(idx, imp, config, seqlens=lengths) == []
    assert torch.equal(idx, ref), f"{(idx != ref).any(-1).sum().item()} rows differ from the reference"


NARROW_KEY_CASES = ["l8d4ls16-n4-G1-T200", "l4d2ls8-n6-G4-local0-whole-chunks", "varlen-l8d4ls16-init2-local3",
                    "l4d4ls8-n20-npad32-G2"]


@pytest.mark.parametrize("case", NARROW_KEY_CASES)
def test_int32_keys_select_within_the_16bit_tolerance(case, monkeypatch):
    """The int32 key layout (16-bit inputs on a GPU) forced onto the interpreter's float32 maths: the truncated
    importance may only swap blocks within the 16-bit tolerance, and exact ties still go to the lower index."""
    config, params, q, k_cmp, _, cu, lengths = problem(case, 3)
    choose = selection.KeyLayout.choose
    group = q.shape[2] // k_cmp.shape[2]
    assert choose(config, group, q.shape[1], torch.bfloat16).dtype == tl.int32
    monkeypatch.setattr(selection.KeyLayout, "choose",
                        classmethod(lambda cls, cfg, g, max_seqlen, dtype: choose(cfg, g, max_seqlen, torch.bfloat16)))
    idx = select_blocks(q, k_cmp, config, cu_seqlens=cu, params=params)
    imp = block_importance(q.double(), k_cmp.double(), config, cu_seqlens=cu)
    assert selection_mismatches(idx, imp, config, seqlens=lengths, rtol=SELECTION_RTOL[torch.bfloat16]) == []
    k_cmp = torch.zeros_like(k_cmp)
    idx = select_blocks(q, k_cmp, config, cu_seqlens=cu, params=params)
    assert torch.equal(idx, reference_select_blocks(q.double(), k_cmp.double(), config, cu_seqlens=cu))


def test_key_layout():
    choose, paper = selection.KeyLayout.choose, NSAConfig()  # l/d = 2, l' = 64
    # 64k tokens, G=16: 1024 blocks (10 index bits); importance <= 32, scaled by 2**-7; 15 mantissa bits kept.
    assert choose(paper, 16, 65536, torch.bfloat16) == (tl.int32, 2.0**-7, 95 << 23, 8, 10, 2**20 - 1)
    assert choose(paper, 16, 65537, torch.float16)[3:5] == (9, 11)
    assert choose(paper, 4, 2**19, torch.bfloat16)[:5] == (tl.int32, 2.0**-5, 95 << 23, 11, 13)
    assert choose(paper, 4, 2**19 + 1, torch.bfloat16) == (tl.int64, 1.0, 0, 0, 31, 0x7F800000)  # 2**13 + 1
    assert choose(paper, 16, 4096, torch.float32).dtype == tl.int64  # fp32: exact keys
    for group in (1, 3, 16, 64):  # the scaled bound stays below 1/2, the top above every other high word
        layout = choose(paper, group, 65536, torch.bfloat16)
        bound = group * paper.cmp_block / paper.cmp_stride
        assert bound * layout.scale < 0.5
        largest = (torch.tensor([bound * layout.scale]).view(torch.int32).item() - layout.floor) >> layout.drop
        assert largest < layout.top and (layout.top << layout.index_bits) < 2**30


@pytest.mark.parametrize("case", ["l8d4ls16-n4-G1-T200", "l16d16ls16-n4-G2-B2-T100"])
def test_exact_ties_go_to_the_lower_index(case):
    """k_cmp = 0: every visible compression block gets the same probability, so selection blocks with the same
    overlap pattern tie exactly (in fp32 and float64 alike) and the rule alone decides."""
    config, params, q, k_cmp, _, cu, lengths = problem(case, 7)
    k_cmp = torch.zeros_like(k_cmp)
    idx = select_blocks(q, k_cmp, config, cu_seqlens=cu, params=params)
    assert torch.equal(idx, reference_select_blocks(q.double(), k_cmp.double(), config, cu_seqlens=cu))


@pytest.mark.parametrize("case", ["varlen-l32d16ls64-G4-n3", "l8d4ls16-MQA-G4"])
def test_given_lse_matches_computed(case):
    config, params, q, k_cmp, v_cmp, cu, _ = problem(case, 9)
    scale = 0.2
    _, lse = compressed_attention(q, k_cmp, v_cmp, config, scale=scale, cu_seqlens=cu, return_lse=True)
    with_lse = select_blocks(q, k_cmp, config, scale=scale, cu_seqlens=cu, lse=lse, params=params)
    without = select_blocks(q, k_cmp, config, scale=scale, cu_seqlens=cu, params=params)
    assert torch.equal(with_lse, without)
    assert torch.equal(without, reference_select_blocks(q.double(), k_cmp.double(), config, scale=scale,
                                                        cu_seqlens=cu))


def test_signature_matches_reference():
    ours = inspect.signature(select_blocks).parameters
    ref = inspect.signature(reference_select_blocks).parameters
    shared = [name for name in ref if name != "chunk_size"]  # the reference's memory knob has no kernel meaning
    assert list(ours)[:len(shared)] == shared
    assert {"params", "lse"} <= set(ours)
    for name in ("q", "k_cmp", "config", "scale", "cu_seqlens", "lse", "params", "Returns"):
        assert name in select_blocks.__doc__


def test_params_validation():
    with pytest.raises(ValueError, match="power of two"):
        SelectionParams(block_m=6)
    with pytest.raises(ValueError, match=">= 16"):
        SelectionParams(block_m=2, block_h=4)
    for group in (1, 2, 3, 16, 64):
        p = default_params(group * 2, 2, 128, NSAConfig())
        assert p.block_m * p.block_h >= 16


@pytest.mark.parametrize("bad", ["k_cmp-length", "heads", "lse-shape", "lse-dtype", "dtype", "params"])
def test_bad_inputs(bad):
    config = cfg(8, 4, 16, 4)
    x = random_inputs(config, batch=2, seqlen=40, num_heads=4, num_kv_heads=2, head_dim=16, seed=0)
    q, k_cmp = x["q"], x["k_cmp"]
    kwargs, error = {}, ValueError
    if bad == "k_cmp-length":
        k_cmp = k_cmp[:, 1:]
    elif bad == "heads":
        k_cmp = torch.cat([k_cmp, k_cmp[:, :, :1]], dim=2)
    elif bad == "lse-shape":
        kwargs["lse"] = torch.zeros(2, 40, 4)
    elif bad == "lse-dtype":
        kwargs["lse"] = torch.zeros(2, 4, 40, dtype=torch.float64)
    elif bad == "dtype":
        k_cmp, error = k_cmp.half(), TypeError
    elif bad == "params":
        kwargs["params"], error = "fast", TypeError
    with pytest.raises(error):
        select_blocks(q, k_cmp, config, **kwargs)


def test_checker_catches_corrupted_selections():
    config, params, q, k_cmp, _, cu, lengths = problem("l8d4ls16-n4-G1-T200", 4)
    imp = block_importance(q.double(), k_cmp.double(), config, cu_seqlens=cu)
    good = select_blocks(q, k_cmp, config, cu_seqlens=cu, params=params)
    assert selection_mismatches(good, imp, config, seqlens=lengths) == []
    row = 150  # blocks 0..9 causal, 4 chosen
    forced = {0, 8, 9}  # init_blocks=1, local_blocks=2
    chosen = good[0, row, 0].tolist()
    free_out = [j for j in range(10) if j not in chosen]
    imp_row = imp[0, row, 0]
    worst_out = min(free_out, key=lambda j: imp_row[j].item())
    best_in = max(set(chosen) - forced, key=lambda j: imp_row[j].item())
    assert imp_row[best_in] > imp_row[worst_out] * (1 + 1e-3), "the case needs a clear ranking to corrupt"
    corrupted = {
        "padding": chosen[:-1] + [-1],
        "unsorted": chosen[::-1],
        "non-causal": chosen[:-1] + [20],
        "forced-missing": sorted(set(chosen) - {0} | {free_out[0]}),
        "worse-block": sorted(set(chosen) - {best_in} | {worst_out}),
    }
    for name, values in corrupted.items():
        bad = good.clone()
        bad[0, row, 0] = torch.tensor(values, dtype=torch.int32)
        assert len(selection_mismatches(bad, imp, config, seqlens=lengths)) == 1, name


# ----------------------------------------------------------------------------------------------------------------
# GPU (fp16/bf16 at full size); the importance reference runs on the GPU in float64 from the upcast inputs.
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(GPU_CHECK_SHAPES), ids=list(GPU_CHECK_SHAPES))
def test_select_blocks_gpu(case, dtype):
    seqlen, seqlens, hq, hkv, d = GPU_CHECK_SHAPES[case]
    config = NSAConfig()  # l=32, d=16, l'=64, n=16
    x = random_inputs(config, batch=1, seqlen=seqlen, seqlens=seqlens, num_heads=hq, num_kv_heads=hkv,
                      head_dim=d, dtype=dtype, device="cuda", seed=21)
    q, k_cmp, v_cmp, cu = x["q"], x["k_cmp"], x["v_cmp"], x["cu_seqlens"]
    lengths = [seqlens] if seqlens is not None else [[seqlen]]
    _, lse = compressed_attention(q, k_cmp, v_cmp, config, cu_seqlens=cu, return_lse=True)
    idx = select_blocks(q, k_cmp, config, cu_seqlens=cu, lse=lse)
    assert idx.dtype == torch.int32 and idx.shape == (1, q.shape[1], hkv, config.slc_topn)
    imp = block_importance(q.double(), k_cmp.double(), config, cu_seqlens=cu)
    problems = selection_mismatches(idx, imp, config, seqlens=lengths, rtol=SELECTION_RTOL[dtype])
    assert not problems, "\n".join(problems)
    # Without a given lse, the same selection.
    assert torch.equal(select_blocks(q, k_cmp, config, cu_seqlens=cu), idx)
