"""The judges: relative errors and the selection checker must catch what they claim to catch."""

import torch

from nsa import NSAConfig, reference
from nsa.accuracy import allowed_error, relative_error, selection_mismatches
from nsa.problems import random_inputs

CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=4, window=8)


def _selection(seed=0):
    x = random_inputs(CFG, seqlens=[5, 70], num_heads=4, num_kv_heads=2, head_dim=8, dtype=torch.float64, seed=seed)
    cu = x.pop("cu_seqlens")
    idx = reference.select_blocks(x["q"], x["k_cmp"], CFG, cu_seqlens=cu)
    imp = reference.block_importance(x["q"], x["k_cmp"], CFG, cu_seqlens=cu)
    return idx, imp, [[5, 70]]


def test_reference_selection_is_valid():
    idx, imp, seqlens = _selection()
    assert selection_mismatches(idx, imp, CFG, seqlens=seqlens) == []


def test_a_less_important_block_is_caught():
    idx, imp, seqlens = _selection()
    row, h = 5 + 69, 1  # t = 69: current block 8; forced 0, 7, 8; one free slot among blocks 1..6
    forced = {0, 7, 8}
    (chosen_free,) = set(idx[0, row, h].tolist()) - forced
    worst = min(range(1, 7), key=lambda j: imp[0, row, h, j].item())
    assert worst != chosen_free and imp[0, row, h, worst] < imp[0, row, h, chosen_free]
    idx[0, row, h] = torch.tensor(sorted(forced | {worst}), dtype=torch.int32)
    problems = selection_mismatches(idx, imp, CFG, seqlens=seqlens)
    assert len(problems) == 1 and f"row={row} " in problems[0] and "less important" in problems[0]


def test_bad_padding_and_order_are_caught():
    idx, imp, seqlens = _selection()
    idx[0, 2, 0, 1] = 0  # t = 2 selects block 0 then -1 padding
    idx[0, 40, 1] = idx[0, 40, 1].flip(-1)
    problems = selection_mismatches(idx, imp, CFG, seqlens=seqlens)
    assert len(problems) == 2 and "row=2 " in problems[0] and "row=40 " in problems[1]


def test_relative_error_fails_nan_and_floor_applies():
    ref = torch.randn(10, dtype=torch.float64)
    bad = ref.clone()
    bad[3] = float("nan")
    assert relative_error(bad, ref) == float("inf")
    assert relative_error(ref, ref) == 0.0
    assert allowed_error(ref, ref.float(), torch.float32) == 2e-5  # the floor, not 2 x (tiny) float32 rounding
