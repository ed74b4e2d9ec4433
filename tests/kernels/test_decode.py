"""nsa.kernels decoding (SPEC 1.9): KVCache, nsa_decode and nsa_prefill against the reference.

Decoding the newest n tokens of a cached sequence must give the last n rows of the full computation. Checked
on ragged batches (contiguous and paged caches with a shuffled page table), for one and several new tokens,
for sequences grown token by token across compression-block boundaries with real compressors, for prefill and
chunked prefill, and (GPU) for a step captured in a CUDA graph and replayed.
"""

import copy
import dataclasses

import pytest
import torch

from nsa import NSAConfig, reference
from nsa.accuracy import SELECTION_RTOL, allowed_error, assert_close, selection_mismatches
from nsa.inputs import resolve_scale
from nsa.kernels import DecodeParams, KVCache, nsa_attention, nsa_decode, nsa_prefill, runtime
from nsa.kernels.decode import default_params
from nsa.reference.decode import decode_rows

needs_interpreter = pytest.mark.skipif(not runtime.interpreting(),
                                       reason="CPU tests run the kernels in TRITON_INTERPRET=1")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)


def filled_caches(config, lengths, num_kv_heads, head_dim, head_dim_v, *, dtype, device, seed, page_size=None,
                  spare=0):
    """A kernels KVCache (paged with a shuffled page table when page_size is set) and the float64 tensors of
    each sequence (k, v, k_cmp, v_cmp), random, sequence b holding lengths[b] tokens."""
    gen = torch.Generator().manual_seed(seed)
    seqs = []
    for length in lengths:
        num_cmp = config.num_cmp_blocks(length)
        seqs.append(tuple(torch.randn(n, num_kv_heads, d, generator=gen, dtype=torch.float64)
                          for n, d in ((length, head_dim), (length, head_dim_v), (num_cmp, head_dim),
                                       (num_cmp, head_dim_v))))
    capacity = max(lengths) + spare
    table = None
    if page_size is not None:
        pages_per_seq = -(-capacity // page_size)
        order = torch.randperm(len(lengths) * pages_per_seq, generator=gen).to(torch.int32)
        table = order.view(len(lengths), pages_per_seq).to(device)
    cache = KVCache(len(lengths), num_kv_heads, head_dim, config, capacity=capacity, head_dim_v=head_dim_v,
                    dtype=dtype, device=device, page_size=page_size, block_table=table)
    packed = [torch.cat([s[i] for s in seqs]).to(device=device, dtype=dtype) for i in range(4)]
    cache.write_prompts(*packed, list(lengths))
    # The reference sees exactly what the cache stores.
    return cache, [tuple(x.to(dtype).double().to(device) for x in s) for s in seqs]


def reference_decode(q, seqs, gates, config, *, block_indices=None, dtype=torch.float64):
    """Reference rows of the last n tokens of each sequence, in `dtype`: (o, block_indices, importances, positions);
    with block_indices given, the output for that selection (near-ties may swap legally)."""
    n = q.shape[1]
    scale = resolve_scale(None, q.shape[-1])
    outs, chosen, importances, positions = [], [], [], []
    for b, seq in enumerate(seqs):
        k, v, k_cmp, v_cmp = (x.to(dtype) for x in seq)
        pos = torch.arange(k.shape[0] - n, k.shape[0], device=q.device)
        given = None if block_indices is None else block_indices[b].long()
        o, idx, imp = decode_rows(q[b].to(dtype), pos, k, v, k_cmp, v_cmp, *(g[b].to(dtype) for g in gates), config,
                                  scale, block_indices=given)
        outs.append(o)
        chosen.append(idx)
        importances.append(imp)
        positions.append(pos)
    return torch.stack(outs), torch.stack(chosen), importances, positions


def check_decode(q, cache, seqs, gates, config, *, params=None, exact_selection):
    """nsa_decode against the float64 reference: a valid selection (equal to the reference's when ties cannot
    matter), and the output within twice the error of the same-dtype reference given that selection."""
    o, idx = nsa_decode(q, cache, *gates, config, return_block_indices=True, params=params)
    assert o.shape == (*q.shape[:3], seqs[0][1].shape[-1]) and o.dtype == q.dtype and idx.dtype == torch.int32
    _, ref_idx, importances, positions = reference_decode(q, seqs, gates, config)
    for b, (imp, pos) in enumerate(zip(importances, positions)):
        problems = selection_mismatches(idx[b:b + 1], imp[None], config, positions=pos[None],
                                        rtol=SELECTION_RTOL[q.dtype])
        assert not problems, "\n".join(problems)
    if exact_selection:
        assert torch.equal(idx, ref_idx.to(idx.device))
    ref, _, _, _ = reference_decode(q, seqs, gates, config, block_indices=idx)
    same_dtype = None
    if q.dtype != torch.float32:
        same_dtype, _, _, _ = reference_decode(q, seqs, gates, config, block_indices=idx, dtype=q.dtype)
    assert_close("o", o, ref, allowed_error(ref, same_dtype, runtime.compute_dtype(q.dtype)))
    return o, idx


def random_queries(batch, n, num_heads, head_dim, *, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, n, num_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    gates = [torch.rand(batch, n, num_heads, generator=gen).to(device=device, dtype=dtype) for _ in range(3)]
    return q, gates


def cfg(l, d, ls, n, w, init=1, local=2):
    return NSAConfig(cmp_block=l, cmp_stride=d, slc_block=ls, slc_topn=n, window=w, init_blocks=init,
                     local_blocks=local)


CPU_CASES = {
    # id: (config, lengths, n new tokens, Hq, Hkv, Dk, Dv, page_size, dtype)
    "ragged-G2-n1": (cfg(16, 8, 16, 4, 32), [200, 37, 5], 1, 4, 2, 16, 16, None, torch.float32),
    "paged-G4-n3-speculative": (cfg(16, 8, 32, 3, 48), [150, 96], 3, 8, 2, 16, 16, 16, torch.float32),
    "MQA-G16-DkDv-init0-local1": (cfg(16, 16, 16, 5, 16, 0, 1), [131, 64], 1, 16, 1, 32, 16, 32, torch.float32),
    "MHA-fp16-paged": (cfg(8, 4, 16, 4, 24), [90, 17], 2, 2, 2, 16, 16, 8, torch.float16),
    "before-first-block": (cfg(32, 16, 64, 3, 64), [20, 31], 1, 4, 2, 16, 16, None, torch.float32),
    # l'/d = 3: a selection block's score columns padded to 4, tiles of 4 blocks
    "three-compressed-per-block": (cfg(32, 16, 48, 3, 64), [300, 130], 1, 4, 2, 16, 16, None, torch.float32),
}


@needs_interpreter
@pytest.mark.parametrize("case", CPU_CASES)
def test_decode_matches_reference(case):
    config, lengths, n, hq, hkv, dk, dv, page_size, dtype = CPU_CASES[case]
    seed = sorted(CPU_CASES).index(case)
    cache, seqs = filled_caches(config, lengths, hkv, dk, dv, dtype=dtype, device="cpu", seed=seed,
                                page_size=page_size, spare=7)
    q, gates = random_queries(len(lengths), n, hq, dk, dtype=dtype, device="cpu", seed=seed)
    check_decode(q, cache, seqs, gates, config, exact_selection=dtype == torch.float32)


@needs_interpreter
def test_decode_with_one_split_each_equals_many_splits():
    config = cfg(16, 8, 16, 4, 32)
    cache, seqs = filled_caches(config, [180, 60], 2, 16, 16, dtype=torch.float32, device="cpu", seed=3)
    q, gates = random_queries(2, 1, 4, 16, dtype=torch.float32, device="cpu", seed=3)
    one = DecodeParams(cmp_splits=1, cmp_block_n=16, importance_splits=1, importance_chunk=16, slc_splits=1,
                       win_splits=1, block_n=16, num_warps=1, num_stages=1)
    many = DecodeParams(cmp_splits=5, cmp_block_n=16, importance_splits=3, importance_chunk=32, slc_splits=3,
                        win_splits=3, block_n=16, num_warps=1, num_stages=1,
                        pdl=True)  # no PDL under the interpreter: accepted and ignored
    o1, i1 = check_decode(q, cache, seqs, gates, config, params=one, exact_selection=True)
    o2, i2 = check_decode(q, cache, seqs, gates, config, params=many, exact_selection=True)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-6)


@needs_interpreter
def test_exact_ties_go_to_the_lower_index():
    """k_cmp = 0: every visible compression block gets the same probability, so selection blocks with the same
    overlap pattern tie exactly and the rule alone decides."""
    config = cfg(16, 8, 16, 4, 16)
    cache, seqs = filled_caches(config, [230, 101], 2, 16, 16, dtype=torch.float32, device="cpu", seed=5)
    cache.k_cmp.zero_()
    seqs = [(k, v, torch.zeros_like(k_cmp), v_cmp) for k, v, k_cmp, v_cmp in seqs]
    q, gates = random_queries(2, 2, 4, 16, dtype=torch.float32, device="cpu", seed=5)
    check_decode(q, cache, seqs, gates, config, params=default_params(2, 2, 2, config, cache.capacity, "cpu"),
                 exact_selection=True)


@needs_interpreter
def test_a_spill_reaches_the_next_split():
    """One compressed block, the last of selection block 7, holds nearly all of p_cmp. It weighs 1 into block 7
    and 1 into block 8, the first block of the second importance split (8 blocks a split here), so both are
    selected: the spill crosses from one program's blocks to the next one's."""
    config = cfg(16, 8, 16, 5, 16)  # l'/d = 2: the second compressed block of each block spills half over
    cache, seqs = filled_caches(config, [230, 200], 1, 16, 16, dtype=torch.float32, device="cpu", seed=6)
    q, gates = random_queries(2, 1, 2, 16, dtype=torch.float32, device="cpu", seed=6)
    hot = 7 * 2 + 1
    for b, (k, v, k_cmp, v_cmp) in enumerate(seqs):
        k_cmp[hot, 0] = 4.0 * q[b, 0].sum(0).double()
        cache.k_cmp[b, hot, 0] = k_cmp[hot, 0].float()
    params = DecodeParams(cmp_splits=2, cmp_block_n=16, importance_splits=2, importance_chunk=4, slc_splits=1,
                          win_splits=1, block_n=16, num_warps=1, num_stages=1)
    _, idx = check_decode(q, cache, seqs, gates, config, params=params, exact_selection=True)
    assert all({7, 8} <= set(row.tolist()) for row in idx.flatten(0, 2))


def grow_and_compare(config, prompts, steps, *, dtype, device, num_heads=4, num_kv_heads=2, head_dim=16,
                     page_size=None, chunk=None):
    """Prefill ragged prompts, then decode `steps` tokens one at a time (or, with `chunk`, prefill chunks of
    that many tokens); every output row must equal that row of the reference nsa_attention over the whole
    sequence, whose compressed keys come from the same compressors (SPEC 1.9)."""
    torch.manual_seed(0)
    k_comp = reference.Compressor(config, head_dim).to(device=device, dtype=dtype)
    v_comp = reference.Compressor(config, head_dim).to(device=device, dtype=dtype)
    batch, total = len(prompts), max(prompts) + steps
    x = {name: torch.randn(batch, total, heads, head_dim, device=device, dtype=dtype)
         for name, heads in (("q", num_heads), ("k", num_kv_heads), ("v", num_kv_heads))}
    gates = [torch.rand(batch, total, num_heads, device=device, dtype=dtype) for _ in range(3)]
    cache = KVCache(batch, num_kv_heads, head_dim, config, capacity=total, k_compressor=k_comp,
                    v_compressor=v_comp, dtype=dtype, device=device, page_size=page_size)

    def tokens(b, start, end):
        return [x[name][b:b + 1, start:end] for name in ("q", "k", "v")] + [g[b:b + 1, start:end] for g in gates]

    with torch.no_grad():
        packed = [torch.cat(parts, dim=1) for parts in zip(*(tokens(b, 0, p) for b, p in enumerate(prompts)))]
        cu = torch.tensor([0] + [sum(prompts[:i + 1]) for i in range(batch)], dtype=torch.int32, device=device)
        q, k, v, *g = packed
        prompt_out = nsa_prefill(q, k, v, *g, cache, config, cu_seqlens=cu)
        outputs = list(prompt_out[0].split(prompts))
        n = chunk or 1
        for step in range(0, steps, n):
            new = [torch.cat(parts) for parts in zip(*(tokens(b, p + step, p + step + n)
                                                        for b, p in enumerate(prompts)))]
            q, k, v, *g = new
            o = nsa_prefill(q, k, v, *g, cache, config) if chunk else None
            if o is None:
                cache.append(k, v)
                o = nsa_decode(q, cache, *g, config)
            for b in range(batch):
                outputs[b] = torch.cat([outputs[b], o[b]])
        assert cache.lengths == [p + steps for p in prompts] == cache.sync_lengths()
        k_ref, v_ref = copy.deepcopy(k_comp).double(), copy.deepcopy(v_comp).double()
        for b, p in enumerate(prompts):
            length = p + steps
            seq = {name: x[name][b:b + 1, :length].double() for name in x}
            k_cmp, v_cmp = k_ref(seq["k"]), v_ref(seq["v"])
            ref = reference.nsa_attention(seq["q"], seq["k"], seq["v"], k_cmp, v_cmp,
                                          *(gg[b:b + 1, :length].double() for gg in gates), config)
            assert_close(f"sequence {b}", outputs[b], ref[0], allowed_error(ref, None, runtime.compute_dtype(dtype)))
            stored = cache.k_cmp[b, :config.num_cmp_blocks(length)].double()
            assert_close(f"k_cmp of sequence {b}", stored, k_cmp[0], 1e-5)


@needs_interpreter
@pytest.mark.parametrize("page_size", [None, 8], ids=["contiguous", "paged"])
def test_decode_grows_across_compression_blocks(page_size):
    # d = 8: ten steps complete at least one compression block in every sequence.
    grow_and_compare(cfg(16, 8, 16, 3, 24), [29, 40], 10, dtype=torch.float32, device="cpu", page_size=page_size)


@needs_interpreter
def test_chunked_prefill_equals_the_whole_prompt():
    grow_and_compare(cfg(16, 8, 16, 3, 24), [33, 50], 12, dtype=torch.float32, device="cpu", chunk=4)


@needs_interpreter
def test_prefill_equals_the_training_forward():
    config = cfg(16, 8, 16, 3, 24)
    torch.manual_seed(1)
    comp = reference.Compressor(config, 16)
    x = {name: torch.randn(2, 45, heads, 16) for name, heads in (("q", 4), ("k", 2), ("v", 2))}
    gates = [torch.rand(2, 45, 4) for _ in range(3)]
    cache = KVCache(2, 2, 16, config, capacity=64, k_compressor=comp, v_compressor=comp, dtype=torch.float32,
                    device="cpu")
    with torch.no_grad():
        o = nsa_prefill(x["q"], x["k"], x["v"], *gates, cache, config)
        want = nsa_attention(x["q"], x["k"], x["v"], comp(x["k"]), comp(x["v"]), *gates, config)
    assert torch.equal(o, want)
    assert cache.lengths == [45, 45] and cache.seqlens.tolist() == [45, 45]
    keys, values = cache.gather(torch.arange(45).expand(2, -1))
    assert torch.equal(keys, x["k"]) and torch.equal(values, x["v"])


def test_cache_validates_its_inputs():
    config = cfg(16, 8, 16, 3, 24)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(2, 2, 16, config, capacity=0, device="cpu")
    with pytest.raises(TypeError, match="dtype"):
        KVCache(2, 2, 16, config, capacity=8, dtype=torch.int32, device="cpu")
    with pytest.raises(ValueError, match="block_table"):
        KVCache(2, 2, 16, config, capacity=8, page_size=4, block_table=torch.zeros(3, 2, dtype=torch.int32),
                device="cpu")
    with pytest.raises(ValueError, match="num_pages"):
        KVCache(2, 2, 16, config, capacity=8, page_size=4, num_pages=3,
                block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32), device="cpu")
    cache = KVCache(2, 2, 16, config, capacity=8, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="expected k"):
        cache.append(torch.zeros(2, 1, 3, 16), torch.zeros(2, 1, 3, 16))
    with pytest.raises(ValueError, match="float32"):
        cache.append(torch.zeros(2, 1, 2, 16, dtype=torch.float16), torch.zeros(2, 1, 2, 16, dtype=torch.float16))
    with pytest.raises(ValueError, match="overflows"):
        cache.append(torch.zeros(2, 9, 2, 16), torch.zeros(2, 9, 2, 16))
    with pytest.raises(RuntimeError, match="compressors"):
        cache.append(torch.zeros(2, 1, 2, 16), torch.zeros(2, 1, 2, 16))


@needs_interpreter
def test_decode_rejects_bad_inputs():
    config = cfg(16, 8, 16, 3, 24)
    cache, _ = filled_caches(config, [20, 3], 2, 16, 16, dtype=torch.float32, device="cpu", seed=0)
    q, gates = random_queries(2, 1, 4, 16, dtype=torch.float32, device="cpu", seed=0)
    with pytest.raises(TypeError, match="nsa.kernels.KVCache"):
        nsa_decode(q, object(), *gates, config)
    with pytest.raises(ValueError, match="differs from the cache"):
        nsa_decode(q, cache, *gates, cfg(16, 8, 16, 4, 24))
    with pytest.raises(ValueError, match=r"q must be \[B=2"):
        nsa_decode(q[:1], cache, *(g[:1] for g in gates), config)
    with pytest.raises(ValueError, match="multiple"):
        nsa_decode(q[:, :, :3], cache, *(g[:, :, :3] for g in gates), config)
    with pytest.raises(ValueError, match="cache holds"):
        nsa_decode(q.half(), cache, *(g.half() for g in gates), config)
    with pytest.raises(ValueError, match="g_slc"):
        nsa_decode(q, cache, gates[0], gates[1][:, :, :2], gates[2], config)
    q4, gates4 = random_queries(2, 4, 4, 16, dtype=torch.float32, device="cpu", seed=0)
    with pytest.raises(ValueError, match="queried tokens"):
        nsa_decode(q4, cache, *gates4, config)
    with pytest.raises(TypeError, match="DecodeParams"):
        nsa_decode(q, cache, *gates, config, params={"cmp_splits": 2})
    with pytest.raises(ValueError, match="block_n"):
        DecodeParams(block_n=8)
    with pytest.raises(ValueError, match="power of two"):
        DecodeParams(importance_chunk=100)
    with pytest.raises(ValueError, match="pdl must be a bool"):
        DecodeParams(pdl=1)


# ----------------------------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------------------------

PAPER = NSAConfig(cmp_block=32, cmp_stride=16, slc_block=64, slc_topn=16, window=512)
GPU_CASES = {
    # id: (lengths, n, Hq, Hkv, page_size)
    "paper-G16-ragged-contiguous": ([16384, 4097, 700], 1, 64, 4, None),
    "paper-G16-paged-speculative": ([8192, 2000], 4, 64, 4, 64),
    "paper-G4-paged": ([12000, 513], 1, 16, 4, 256),
    "paper-G1": ([5000], 2, 4, 4, None),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", GPU_CASES)
def test_decode_matches_reference_on_gpu(case, dtype, pdl):
    lengths, n, hq, hkv, page_size = GPU_CASES[case]
    seed = sorted(GPU_CASES).index(case)
    cache, seqs = filled_caches(PAPER, lengths, hkv, 128, 128, dtype=dtype, device="cuda", seed=seed,
                                page_size=page_size, spare=100)
    q, gates = random_queries(len(lengths), n, hq, 128, dtype=dtype, device="cuda", seed=seed)
    params = dataclasses.replace(default_params(len(lengths), n, hkv, PAPER, cache.capacity, "cuda"), pdl=pdl)
    check_decode(q, cache, seqs, gates, PAPER, params=params, exact_selection=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grows_across_compression_blocks_on_gpu():
    grow_and_compare(cfg(32, 16, 64, 4, 128), [1000, 777], 40, dtype=torch.float32, device="cuda", page_size=64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
def test_cuda_graph_replay_equals_eager_steps(pdl):
    """append + nsa_decode captured once in a CUDA graph and replayed for 40 steps (crossing compression
    blocks) gives the outputs of the same steps run eagerly; with PDL too (the first decode kernel reads what
    the append before it wrote)."""
    config, dtype, batch, hq, hkv, dim = PAPER, torch.bfloat16, 3, 64, 4, 128
    torch.manual_seed(0)
    k_comp = reference.Compressor(config, dim).cuda().to(dtype)
    v_comp = reference.Compressor(config, dim).cuda().to(dtype)

    def new_cache():
        cache = KVCache(batch, hkv, dim, config, capacity=4096, k_compressor=k_comp, v_compressor=v_comp,
                        dtype=dtype, device="cuda", page_size=128)
        gen = torch.Generator(device="cuda").manual_seed(1)
        prompt = [torch.randn(batch, 2000, hkv, dim, device="cuda", generator=gen, dtype=dtype) for _ in range(2)]
        with torch.no_grad():
            cache.append(*prompt)
        return cache

    eager, graphed = new_cache(), new_cache()
    static = {"q": torch.randn(batch, 1, hq, dim, device="cuda", dtype=dtype),
              "k": torch.randn(batch, 1, hkv, dim, device="cuda", dtype=dtype),
              "v": torch.randn(batch, 1, hkv, dim, device="cuda", dtype=dtype),
              "g": torch.rand(3, batch, 1, hq, device="cuda", dtype=dtype)}

    params = dataclasses.replace(default_params(batch, 1, hkv, config, 4096, "cuda"), pdl=pdl)

    def step(cache):
        cache.append(static["k"], static["v"])
        return nsa_decode(static["q"], cache, *static["g"], config, params=params)

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile and warm up on a throwaway cache
            step(new_cache())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(graphed)
        for _ in range(40):
            for name in ("q", "k", "v"):
                static[name].normal_()
            static["g"].uniform_()
            want = step(eager)
            graph.replay()
            torch.testing.assert_close(out, want, rtol=0, atol=0)
    assert graphed.sync_lengths() == eager.lengths == [2040] * batch
    torch.testing.assert_close(graphed.k_cmp, eager.k_cmp, rtol=0, atol=0)
