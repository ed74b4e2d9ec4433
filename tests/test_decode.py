"""SPEC 1.9: decoding a token from the cache equals the last row of the full computation."""

import pytest
import torch

from nsa import NSAConfig
from nsa.reference import Compressor, KVCache, nsa_attention, nsa_decode

CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=3, window=6)
HQ, HKV, DK, DV = 4, 2, 8, 6


def _compressors(seed):
    torch.manual_seed(seed)
    return Compressor(CFG, DK, 16).double(), Compressor(CFG, DV, 16).double()


def _full(q, k, v, gates, kc, vc):
    """nsa_attention over whole sequences, compressed with the same compressors as the cache."""
    k_cmp, v_cmp = kc(k), vc(v)
    return nsa_attention(q, k, v, k_cmp, v_cmp, *gates, config=CFG, return_block_indices=True)


@pytest.mark.parametrize("prompt_lens", [[0, 0], [3, 11, 1]], ids=["from-empty", "ragged"])
def test_decode_token_by_token_matches_full(prompt_lens):
    kc, vc = _compressors(0)
    B, steps = len(prompt_lens), 30  # grows every sequence across several compression blocks
    gen = torch.Generator().manual_seed(1)
    total = [p + steps for p in prompt_lens]
    seqs = [dict(q=torch.randn(1, n, HQ, DK, generator=gen, dtype=torch.float64),
                 k=torch.randn(1, n, HKV, DK, generator=gen, dtype=torch.float64),
                 v=torch.randn(1, n, HKV, DV, generator=gen, dtype=torch.float64),
                 g=torch.rand(3, 1, n, HQ, generator=gen, dtype=torch.float64)) for n in total]
    cache = KVCache(B, HKV, DK, CFG, head_dim_v=DV, k_compressor=kc, v_compressor=vc, dtype=torch.float64)
    for b, p in enumerate(prompt_lens):
        cache.extend(b, seqs[b]["k"][0, :p], seqs[b]["v"][0, :p])
    with torch.no_grad():
        full = [_full(s["q"], s["k"], s["v"], s["g"], kc, vc) for s in seqs]
        for step in range(steps):
            pos = [p + step for p in prompt_lens]
            cache.append(torch.stack([s["k"][0, t:t + 1] for s, t in zip(seqs, pos)]),
                         torch.stack([s["v"][0, t:t + 1] for s, t in zip(seqs, pos)]))
            q = torch.stack([s["q"][0, t:t + 1] for s, t in zip(seqs, pos)])
            gates = [torch.stack([s["g"][i, 0, t:t + 1] for s, t in zip(seqs, pos)]) for i in range(3)]
            o, idx = nsa_decode(q, cache, *gates, CFG, return_block_indices=True)
            for b, t in enumerate(pos):
                torch.testing.assert_close(o[b, 0], full[b][0][0, t], rtol=1e-10, atol=1e-10)
                assert torch.equal(idx[b, 0], full[b][1][0, t])
        for b, n in enumerate(total):
            assert cache.seqlens[b] == n and cache.k_cmp[b].shape[0] == CFG.num_cmp_blocks(n)
            pending_k, _ = cache.pending(b)
            assert pending_k.shape[0] == n - CFG.num_cmp_blocks(n) * CFG.cmp_stride


def test_speculative_decode_of_several_tokens():
    kc, vc = _compressors(2)
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 40, HQ, DK, generator=gen, dtype=torch.float64), torch.randn(1, 40, HKV, DK, generator=gen, dtype=torch.float64)
    v, g = torch.randn(1, 40, HKV, DV, generator=gen, dtype=torch.float64), torch.rand(3, 1, 40, HQ, generator=gen, dtype=torch.float64)
    cache = KVCache(1, HKV, DK, CFG, head_dim_v=DV, k_compressor=kc, v_compressor=vc, dtype=torch.float64)
    with torch.no_grad():
        cache.append(k, v)
        o = nsa_decode(q[:, -3:], cache, *g[:, :, -3:], CFG)
        torch.testing.assert_close(o, _full(q, k, v, g, kc, vc)[0][:, -3:], rtol=1e-10, atol=1e-10)


def test_decode_rejects_bad_shapes():
    kc, vc = _compressors(0)
    cache = KVCache(2, HKV, DK, CFG, head_dim_v=DV, k_compressor=kc, v_compressor=vc, dtype=torch.float64)
    with pytest.raises(ValueError, match="append expects"):
        cache.append(torch.zeros(3, 1, HKV, DK, dtype=torch.float64), torch.zeros(3, 1, HKV, DV, dtype=torch.float64))
    with pytest.raises(ValueError, match="extend expects"):
        cache.extend(0, torch.zeros(1, HKV, DV, dtype=torch.float64), torch.zeros(1, HKV, DV, dtype=torch.float64))
    with pytest.raises(ValueError, match="must hold the 1 queried"):
        nsa_decode(torch.zeros(2, 1, HQ, DK, dtype=torch.float64), cache, *torch.zeros(3, 2, 1, HQ), CFG)
