"""The named suites: what issue 6 asks of each, valid problems, unique keys, inputs of the right shapes."""

import pytest
import torch

from nsa.cli import main
from nsa.suites import FLA_CONFIG, OPS, PAPER_CONFIG, SUITES, Problem, get_suite, make_inputs

K = 1024


def test_every_suite_is_listed_by_the_command(capsys):
    assert main(["suites"]) == 0
    out = capsys.readouterr().out
    assert set(SUITES) == {"paper", "gqa", "blocks", "varlen", "decode", "peer", "smoke"}
    for name, suite in SUITES.items():
        assert name in out and suite.description in out


def test_verbose_listing_names_every_problem(capsys):
    main(["suites", "--verbose"])
    out = capsys.readouterr().out
    assert all(p.key in out for s in SUITES.values() for p in s.problems)


@pytest.mark.parametrize("name", list(SUITES))
def test_problems_are_valid_and_keys_unique(name):
    suite = get_suite(name)
    keys = [p.key for p in suite.problems]
    assert suite.problems and len(set(keys)) == len(keys)
    for p in suite.problems:
        assert p.op in OPS and p.num_heads % p.num_kv_heads == 0
        assert sum(p.sequence_lengths) == p.seqlen * (p.batch if p.seqlens is None else 1)


def test_paper_suite_is_the_papers_setting():
    paper = get_suite("paper")
    assert {(p.batch, p.num_heads, p.num_kv_heads, p.head_dim, p.config, p.dtype) for p in paper.problems
            if p.op != "decode"} == {(1, 64, 4, 128, PAPER_CONFIG, "bfloat16")}
    for op in ("fwd", "bwd"):
        assert sorted(p.seqlen for p in paper.problems if p.op == op) == [K * 2**i for i in range(8)]
    assert {(p.batch, p.seqlen) for p in paper.problems if p.op == "decode"} >= {(1, 64 * K), (16, 64 * K)}
    assert (PAPER_CONFIG.cmp_block, PAPER_CONFIG.cmp_stride, PAPER_CONFIG.slc_block, PAPER_CONFIG.slc_topn,
            PAPER_CONFIG.window) == (32, 16, 64, 16, 512)


def test_axis_suites_cover_what_issue_6_names():
    assert {p.group_size for p in get_suite("gqa").problems} == {1, 2, 4, 8, 16}
    blocks = {(p.config.slc_block, p.config.slc_topn) for p in get_suite("blocks").problems}
    assert blocks == {(ls, n) for ls in (32, 64, 128) for n in (8, 16, 32)}
    assert all(p.seqlens for p in get_suite("varlen").problems)
    assert {p.op for p in get_suite("decode").problems} == {"decode"}
    assert {p.config for p in get_suite("peer").problems} == {FLA_CONFIG}


def test_smoke_is_tiny():
    smoke = get_suite("smoke")
    assert set(smoke.ops) == {"fwd", "bwd", "decode"} and any(p.seqlens for p in smoke.problems)
    for p in smoke.problems:
        assert p.seqlen <= 256 and p.num_heads <= 4 and p.dtype == "float32"


def test_bad_problems_are_refused():
    with pytest.raises(ValueError, match="op"):
        Problem(op="sideways", seqlen=8)
    with pytest.raises(ValueError, match="multiple"):
        Problem(op="fwd", seqlen=8, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="packed"):
        Problem(op="decode", seqlen=8, seqlens=(3, 5))
    with pytest.raises(KeyError, match="known suites"):
        get_suite("nope")


@pytest.mark.parametrize("problem", get_suite("smoke").problems, ids=lambda p: p.key)
def test_inputs_have_the_documented_shapes(problem):
    x = make_inputs(problem, device="cpu", seed=0)
    b, hq, hkv, d = problem.batch, problem.num_heads, problem.num_kv_heads, problem.head_dim
    tq = 1 if problem.op == "decode" else problem.seqlen
    assert x["q"].shape == (b, tq, hq, d) and x["g_win"].shape == (b, tq, hq)
    assert x["k"].shape == (b, problem.seqlen, hkv, d) and x["q"].dtype == torch.float32
    rows = problem.seqlens or (problem.seqlen,)  # k_cmp rows: one sequence per batch row, or all packed in one
    assert x["k_cmp"].shape[1] == sum(problem.config.num_cmp_blocks(n) for n in rows)
    if problem.op == "decode":
        assert x["cache"].seqlens == [problem.seqlen] * b


def test_shortened_problems_keep_their_structure():
    p = Problem.packed("fwd", (5000, 3000, 2000), num_heads=4, num_kv_heads=1, head_dim=16, head_dim_v=16)
    assert p.shortened(8192).seqlens == (5000, 3000, 192)
    assert p.shortened(20000) is p
    dense = get_suite("paper").problems[-1]
    assert dense.shortened(8192).seqlen == 8192 and dense.shortened(8192).config == dense.config
