"""The reference against a deliberately naive per-query implementation written here, in float64."""

import zlib

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nsa import NSAConfig
from nsa.problems import random_inputs
from nsa.reference import nsa_attention


def naive_nsa(q, k, v, k_cmp, v_cmp, g_cmp, g_slc, g_win, cfg, scale, seqlens=None):
    """SPEC section 1 one query and one head at a time, with Python loops and lists: obviously right, very slow."""
    B, T, Hq, _ = q.shape
    Hkv, Dv = k.shape[2], v.shape[3]
    G = Hq // Hkv
    l, d, ls, n, w = cfg.cmp_block, cfg.cmp_stride, cfg.slc_block, cfg.slc_topn, cfg.window
    out = torch.zeros(B, T, Hq, Dv, dtype=q.dtype)
    chosen_out = torch.full((B, T, Hkv, n), -1, dtype=torch.int32)
    seqlens = seqlens or [T]
    for b in range(B):
        start, cmp_start = 0, 0
        for length in seqlens:
            num_cmp = 0 if length < l else (length - l) // d + 1
            for t in range(length):
                row = start + t
                visible = [i for i in range(num_cmp) if i * d + l - 1 <= t]
                probs = []
                for h in range(Hq):
                    hk = h // G
                    if visible:
                        s = torch.stack([scale * q[b, row, h] @ k_cmp[b, cmp_start + i, hk] for i in visible])
                        p = torch.softmax(s, 0)
                        o_cmp = sum(p[m] * v_cmp[b, cmp_start + i, hk] for m, i in enumerate(visible))
                    else:
                        p, o_cmp = [], torch.zeros(Dv, dtype=q.dtype)
                    probs.append(dict(zip(visible, p)))
                    out[b, row, h] += g_cmp[b, row, h] * o_cmp
                current = t // ls
                for hk in range(Hkv):
                    importance = {}
                    for j in range(current + 1):
                        total = 0.0
                        for h in range(hk * G, hk * G + G):
                            for i in visible:
                                overlap = max(0, min(i * d + l, (j + 1) * ls) - max(i * d, j * ls))
                                total += float(probs[h][i]) * overlap / d
                        importance[j] = total
                    forced = [j for j in range(current + 1) if j < cfg.init_blocks or current - j < cfg.local_blocks]
                    rest = sorted((j for j in range(current + 1) if j not in forced), key=lambda j: (-importance[j], j))
                    chosen = sorted(forced + rest[:min(n, current + 1) - len(forced)])
                    chosen_out[b, row, hk, :len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
                    slc_keys = [s for j in chosen for s in range(j * ls, min((j + 1) * ls, t + 1))]
                    win_keys = list(range(max(0, t - w + 1), t + 1))
                    for h in range(hk * G, hk * G + G):
                        for keys, gate in ((slc_keys, g_slc), (win_keys, g_win)):
                            s = torch.stack([scale * q[b, row, h] @ k[b, start + s_, hk] for s_ in keys])
                            p = torch.softmax(s, 0)
                            out[b, row, h] += gate[b, row, h] * sum(p[m] * v[b, start + s_, hk]
                                                                    for m, s_ in enumerate(keys))
            start += length
            cmp_start += num_cmp
    return out, chosen_out


CONFIGS = {
    "l16-d8-l'16": NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=3, window=24),
    "l=d=l'": NSAConfig(cmp_block=16, cmp_stride=16, slc_block=16, slc_topn=4, window=16),
    "l8-d4-l'16": NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topn=4, window=20),
    "init0-local1": NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=3, window=8, init_blocks=0,
                              local_blocks=1),
    "init2-local3": NSAConfig(cmp_block=8, cmp_stride=8, slc_block=8, slc_topn=6, window=12, init_blocks=2,
                              local_blocks=3),
    "no-forced": NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=2, window=4, init_blocks=0,
                           local_blocks=0),
    "n-exceeds-blocks": NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, slc_topn=10, window=8),
}

# (name, Hq, Hkv, Dk, Dv, T or seqlens)
SHAPES = [
    ("G1", 2, 2, 8, 8, 53),
    ("G2", 4, 2, 8, 8, 48),
    ("G4", 4, 1, 8, 6, 37),
    ("G16", 16, 1, 4, 4, 40),
    ("MQA-G3", 3, 1, 8, 8, 29),
    ("T<l", 2, 1, 8, 8, 5),
    ("varlen", 4, 2, 8, 12, [5, 37, 20]),
]


def _check(cfg, Hq, Hkv, Dk, Dv, lengths, seed, batch=2):
    varlen = isinstance(lengths, list)
    x = random_inputs(cfg, batch=1 if varlen else batch, seqlen=None if varlen else lengths,
                      seqlens=lengths if varlen else None, num_heads=Hq, num_kv_heads=Hkv, head_dim=Dk,
                      head_dim_v=Dv, dtype=torch.float64, seed=seed)
    cu = x.pop("cu_seqlens")
    o, idx = nsa_attention(**x, config=cfg, return_block_indices=True, cu_seqlens=cu)
    want_o, want_idx = naive_nsa(**x, cfg=cfg, scale=Dk ** -0.5, seqlens=lengths if varlen else None)
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(o, want_o, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_reference_matches_naive(cfg_name, shape):
    _, Hq, Hkv, Dk, Dv, lengths = shape
    _check(CONFIGS[cfg_name], Hq, Hkv, Dk, Dv, lengths, seed=zlib.crc32(f"{cfg_name}-{shape[0]}".encode()))


def test_chunking_does_not_change_the_result():
    cfg = CONFIGS["l16-d8-l'16"]
    x = random_inputs(cfg, batch=2, seqlen=70, num_heads=4, num_kv_heads=2, head_dim=8, dtype=torch.float64, seed=3)
    x.pop("cu_seqlens")
    whole = nsa_attention(**x, config=cfg, return_block_indices=True)
    for chunk in (1, 7, 64):
        chunked = nsa_attention(**x, config=cfg, return_block_indices=True, chunk_size=chunk)
        torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
        assert torch.equal(chunked[1], whole[1])


def test_ties_go_to_the_lower_block():
    # Identical compressed keys give every visible compression block the same weight, so blocks with equal
    # overlap tie exactly; with l = d = l' each block's importance is 1/visible, all equal.
    cfg = NSAConfig(cmp_block=8, cmp_stride=8, slc_block=8, slc_topn=3, window=4, init_blocks=0, local_blocks=1)
    x = random_inputs(cfg, batch=1, seqlen=64, num_heads=2, num_kv_heads=1, head_dim=8, dtype=torch.float64, seed=0)
    x.pop("cu_seqlens")
    x["k_cmp"] = x["k_cmp"][:, :1].expand_as(x["k_cmp"]).contiguous()
    _, idx = nsa_attention(**x, config=cfg, return_block_indices=True)
    assert idx[0, 63, 0].tolist() == [0, 1, 7]  # local block 7, then the two lowest of the tied blocks 0..6


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_reference_matches_naive_on_random_configs(data):
    d = data.draw(st.sampled_from([2, 4, 8]), label="d")
    ls = d * data.draw(st.integers(1, 4), label="l'/d")
    l = d * data.draw(st.integers(1, ls // d), label="l/d")
    init = data.draw(st.integers(0, 2), label="init")
    local = data.draw(st.integers(0, 2), label="local")
    n = data.draw(st.integers(max(1, init + local), init + local + 3), label="n")
    cfg = NSAConfig(cmp_block=l, cmp_stride=d, slc_block=ls, slc_topn=n, window=data.draw(st.integers(1, 20)),
                    init_blocks=init, local_blocks=local)
    Hkv = data.draw(st.integers(1, 2), label="Hkv")
    G = data.draw(st.integers(1, 3), label="G")
    if data.draw(st.booleans(), label="varlen"):
        lengths = data.draw(st.lists(st.integers(0, 30), min_size=1, max_size=3), label="seqlens")
        if sum(lengths) == 0:
            lengths = [1]
    else:
        lengths = data.draw(st.integers(1, 40), label="T")
    _check(cfg, G * Hkv, Hkv, 4, data.draw(st.sampled_from([4, 6])), lengths, seed=data.draw(st.integers(0, 2**31 - 1)),
           batch=data.draw(st.integers(1, 2)))
