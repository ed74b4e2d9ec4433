"""Selected-block attention kernels (SPEC 1.5) against the float64 reference: output and dq, dk, dv.

CPU cases run the Triton kernels in the interpreter (TRITON_INTERPRET=1) in fp32 on the same block indices as
the reference; `gpu` cases run bf16/fp16 at long sequences against an fp32 reference on the GPU.
"""

import dataclasses
import importlib
import itertools

import pytest
import torch

import nsa.kernels.runtime as runtime
from nsa import NSAConfig
from nsa.accuracy import ERROR_FLOOR, allowed_error, assert_close
from nsa.kernels.packing import PackedSequences, device_offsets, segment_ids
from nsa.kernels.runtime import interpreting
from nsa.kernels.selected_attention import (SelectedAttentionParams, build_block_schedule, build_forward_items,
                                            build_inverse_index, default_params, max_forward_items,
                                            max_inverse_items, selected_attention, selected_attention_fwd)
from nsa.problems import random_inputs
from nsa.reference import select_blocks
from nsa.reference import selected_attention as reference_selected_attention

needs_interpreter = pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                                       reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def cfg(slc_block, topn, **kw):
    """A valid config with selection blocks of `slc_block` tokens (compression blocks fit inside them)."""
    cmp_block = min(16, slc_block)
    return NSAConfig(cmp_block=cmp_block, cmp_stride=cmp_block // 2, slc_block=slc_block, slc_topn=topn, window=32,
                     **kw)


def random_selection(seqlens, num_kv_heads, config, seed, *, batch=None, min_count=1):
    """Random valid block indices [B, T, Hkv, n]: for each row 1..min(n, t//l'+1) distinct causal blocks, ascending,
    -1 padded (fewer than a real selection may choose; some blocks end up selected by nobody).

    `seqlens` lists packed sequences (B = 1), or with `batch` one length repeated over a dense batch.
    """
    gen = torch.Generator().manual_seed(seed)
    n, ls = config.slc_topn, config.slc_block
    rows = []
    for length in seqlens * (batch or 1):
        t = torch.arange(length)
        current = t // ls
        num_blocks = int(current.max()) + 1 if length else 1
        score = torch.rand(length, num_kv_heads, num_blocks, generator=gen)
        score = score.masked_fill(torch.arange(num_blocks)[None, None, :] > current[:, None, None], -1.0)
        order = torch.sort(score, dim=-1, descending=True).indices[..., :n]
        most = torch.clamp(current + 1, max=n)[:, None]
        count = min_count + (torch.rand(length, num_kv_heads, generator=gen) * (most - min_count + 1)).long()
        count = torch.minimum(count, most)
        chosen = torch.where(torch.arange(order.shape[-1]) < count[..., None], order, 1 << 30)
        chosen = torch.sort(chosen, dim=-1).values
        chosen = torch.where(chosen == 1 << 30, -1, chosen)
        rows.append(torch.nn.functional.pad(chosen, (0, n - chosen.shape[-1]), value=-1))
    out = torch.cat(rows) if rows else torch.empty(0, num_kv_heads, n, dtype=torch.long)
    return out.reshape(batch or 1, -1, num_kv_heads, n).to(torch.int32)


def fixed_selection(seqlens, num_kv_heads, config, which, *, batch=None):
    """Hand-made selections: "sink" (block 0 only: one long list), "local" (own block only: diagonal masking)."""
    rows = []
    for length in seqlens * (batch or 1):
        t = torch.arange(length)
        first = torch.zeros_like(t) if which == "sink" else t // config.slc_block
        row = torch.full((length, num_kv_heads, config.slc_topn), -1, dtype=torch.int32)
        row[:, :, 0] = first[:, None]
        rows.append(row)
    return torch.cat(rows).reshape(batch or 1, -1, num_kv_heads, config.slc_topn)


def check_against_reference(config, *, num_heads, num_kv_heads, head_dim, head_dim_v, selection, seed, params=None,
                            batch=1, seqlen=None, seqlens=None, allowed=ERROR_FLOOR[torch.float32]):
    x = random_inputs(config, batch=batch, seqlen=seqlen, seqlens=seqlens, num_heads=num_heads,
                      num_kv_heads=num_kv_heads, head_dim=head_dim, head_dim_v=head_dim_v, seed=seed)
    cu = x["cu_seqlens"]
    lengths = seqlens or [seqlen]
    if selection == "reference":
        block_indices = select_blocks(x["q"], x["k_cmp"], config, cu_seqlens=cu)
    elif selection == "random":
        block_indices = random_selection(lengths, num_kv_heads, config, seed, batch=None if seqlens else batch)
    else:
        block_indices = fixed_selection(lengths, num_kv_heads, config, selection, batch=None if seqlens else batch)
    q, k, v = (x[name].to(DEVICE).requires_grad_(True) for name in ("q", "k", "v"))
    do = torch.randn(q.shape[:3] + (head_dim_v,), generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    cu_dev = cu.to(DEVICE) if cu is not None else None
    o = selected_attention(q, k, v, block_indices.to(DEVICE), config, cu_seqlens=cu_dev, params=params)
    grads = torch.autograd.grad(o, (q, k, v), do)

    q64, k64, v64 = (x[name].double().requires_grad_(True) for name in ("q", "k", "v"))
    o_ref = reference_selected_attention(q64, k64, v64, block_indices, config, cu_seqlens=cu)
    grads_ref = torch.autograd.grad(o_ref, (q64, k64, v64), do.cpu().double())
    assert_close("o", o.cpu(), o_ref, allowed)
    for name, g, g_ref in zip(("dq", "dk", "dv"), grads, grads_ref):
        assert_close(name, g.cpu(), g_ref, allowed)


def P(**kw):
    """Params with 16-token key tiles (cheap in the interpreter) and the given overrides."""
    base = dict(fwd_block_n=16, dq_block_n=16, dkdv_block_n=16)
    base.update(kw)
    return SelectedAttentionParams(**base)


# id: (config, shape kwargs, selection, params)
CASES = {
    # Selections from the reference; T not a multiple of l'; dkdv lists split into chunks of 8 positions.
    "ref-l16-G2-bt4-T80-D32x16": (cfg(16, 4), dict(seqlen=80, num_heads=4, num_kv_heads=2, head_dim=32, head_dim_v=16),
                                  "reference", P(fwd_block_t=4, dq_block_t=2, dkdv_block_t=2, dkdv_chunk=8)),
    # G = 1 (MHA), one position per program: rows padded from 1 to 16, schedule = the indices themselves.
    "ref-l16-G1-bt1-T40": (cfg(16, 3), dict(seqlen=40, num_heads=2, num_kv_heads=2, head_dim=16, head_dim_v=16),
                           "reference", P(fwd_block_t=1, dq_block_t=1, dkdv_block_t=8)),
    # l' = 32, G = 4, default chunking (no split); batch of 2.
    "ref-l32-G4-bt2-B2-T70": (cfg(32, 3), dict(batch=2, seqlen=70, num_heads=4, num_kv_heads=1, head_dim=16,
                                               head_dim_v=32), "reference", P(fwd_block_t=2, dq_block_t=4)),
    # MQA with G = 16, l' = 64 walked in four 16-key slices, dk/dv slices of 32 keys.
    "ref-l64-G16-mqa-T150": (cfg(64, 3), dict(seqlen=150, num_heads=16, num_kv_heads=1, head_dim=16, head_dim_v=16),
                             "reference", P(fwd_block_t=2, fwd_block_n=32, dq_block_t=4, dkdv_block_t=1,
                                            dkdv_block_n=32, dkdv_chunk=64)),
    # n larger than the blocks available, random selections of 1..min(n, t//l'+1) blocks, G = 3 (rows 3*bt).
    "rand-l16-n8-G3-bt8-T64-D24x40": (cfg(16, 8), dict(seqlen=64, num_heads=6, num_kv_heads=2, head_dim=24,
                                                       head_dim_v=40), "random",
                                      P(fwd_block_t=8, dq_block_t=8, dkdv_block_t=4, dkdv_chunk=16)),
    # Varlen, one sequence shorter than l' and one empty; reference selection per sequence.
    "varlen-ref-l16-G4-bt4": (cfg(16, 4), dict(seqlens=[37, 9, 0, 50], num_heads=4, num_kv_heads=1, head_dim=32,
                                               head_dim_v=16), "reference",
                              P(fwd_block_t=4, dq_block_t=4, dkdv_block_t=4, dkdv_chunk=12)),
    # Every position selects block 0 only: one list of T positions split over many programs (partial sums).
    "sink-l16-G2-T60": (cfg(16, 3, init_blocks=0, local_blocks=0),
                        dict(seqlen=60, num_heads=2, num_kv_heads=1, head_dim=16, head_dim_v=16), "sink",
                        P(fwd_block_t=16, dq_block_t=16, dkdv_block_t=8, dkdv_chunk=8)),
    # Own block only: every key is on the causal diagonal; T < l'.
    "local-l32-G2-T20": (cfg(32, 3), dict(seqlen=20, num_heads=4, num_kv_heads=2, head_dim=16, head_dim_v=16),
                         "local", P(fwd_block_t=32, dq_block_t=4, dkdv_block_t=16)),
    # K/V key slices by TMA copies (head dims equal to their blocks): tiles that run into the next sequence or past
    # the tensor's end; 32-key tiles over blocks of 16 keys (each tile holds the next block's keys, masked) and
    # l' = 64 walked in two slices.
    "tma-varlen-ref-l16-G4-bt4-bn32": (cfg(16, 4), dict(seqlens=[37, 9, 0, 50], num_heads=4, num_kv_heads=1,
                                                        head_dim=32, head_dim_v=16), "reference",
                                       P(fwd_block_t=4, fwd_block_n=32, fwd_tma=True, dq_block_t=2, dq_block_n=32,
                                         dq_tma=True, dkdv_chunk=12)),
    "tma-ref-l64-G16-mqa-T150": (cfg(64, 3), dict(seqlen=150, num_heads=16, num_kv_heads=1, head_dim=16,
                                                  head_dim_v=16), "reference",
                                 P(fwd_block_t=2, fwd_block_n=32, fwd_tma=True, dq_block_t=1, dq_block_n=32,
                                   dq_tma=True)),
    # The inverted forward and dq: blocks own the work. With the chunk and item sizes of `small_inverted_chunks`:
    # several chunks of positions, popular blocks cut into several items, l' = 64 walked in four slices, G = 3;
    # forward and dq inverted together and each alone.
    "inverted-ref-l64-G16-mqa-T150": (cfg(64, 3), dict(seqlen=150, num_heads=16, num_kv_heads=1, head_dim=16,
                                                       head_dim_v=16), "reference",
                                      P(fwd_inverted=True, fwd_block_t=2, fwd_block_n=16, dq_inverted=True,
                                        dq_block_t=1, dq_block_n=32)),
    "inverted-rand-l16-n8-G3-T64-D24x40": (cfg(16, 8), dict(seqlen=64, num_heads=6, num_kv_heads=2, head_dim=24,
                                                            head_dim_v=40), "random", P(fwd_inverted=True, fwd_block_t=8)),
    "inverted-varlen-ref-l16-G4": (cfg(16, 4), dict(seqlens=[37, 9, 0, 50], num_heads=4, num_kv_heads=1,
                                                    head_dim=32, head_dim_v=16), "reference",
                                   P(fwd_inverted=True, fwd_block_t=4, dq_inverted=True, dq_block_t=4)),
    "inverted-dq-sink-l16-G2-B2-T60": (cfg(16, 3, init_blocks=0, local_blocks=0),
                                       dict(batch=2, seqlen=60, num_heads=2, num_kv_heads=1, head_dim=16,
                                            head_dim_v=16), "sink", P(dq_inverted=True, dq_block_t=16)),
}


@pytest.fixture
def small_inverted_chunks(monkeypatch):
    """Parts of 20 kB (chunks of 2 to 49 positions in the cases above) and items of 5 positions: at T <= 150,
    what the real sizes do at 64k (many chunks, long lists cut into several items)."""
    module = importlib.import_module("nsa.kernels.selected_attention")  # the package exports the function too
    monkeypatch.setattr(module, "INVERTED_ITEM_POSITIONS", 5)
    monkeypatch.setattr(module, "INVERTED_PART_BYTES", 20_000)


@needs_interpreter
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_reference(case, monkeypatch, small_inverted_chunks):
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)
    config, shape, selection, params = CASES[case]
    seed = sum(map(ord, case))
    check_against_reference(config, selection=selection, seed=seed, params=params, **shape)


@needs_interpreter
@pytest.mark.parametrize("case", ["inverted-ref-l64-G16-mqa-T150", "inverted-varlen-ref-l16-G4"])
def test_16bit_parts_match_reference(case, monkeypatch, small_inverted_chunks):
    """The inverted kernels with 16-bit parts (float16 for the interpreter's fp32): one more rounding per part,
    so the float16 error floor."""
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)
    config, shape, selection, params = CASES[case]
    params = dataclasses.replace(params, fwd_inverted=True, fwd_parts_16bit=True, dq_inverted=True,
                                 dq_parts_16bit=True)
    check_against_reference(config, selection=selection, seed=sum(map(ord, case)), params=params,
                            allowed=ERROR_FLOOR[torch.float16], **shape)


@needs_interpreter
def test_default_params_varlen_random(monkeypatch):
    """Default params (as a user gets them) on random selections over packed sequences."""
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)
    check_against_reference(cfg(16, 5), seqlens=[33, 16], num_heads=8, num_kv_heads=2, head_dim=16, head_dim_v=16,
                            selection="random", seed=7)


@needs_interpreter
@pytest.mark.parametrize("inverted", [False, True], ids=["gather", "inverted"])
def test_forward_lse_is_the_log_normaliser(monkeypatch, inverted):
    """The launcher's lse [Hq, total] (natural log) equals logsumexp of the kept scores, by brute force."""
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)
    config = cfg(16, 3)
    seqlens = [45, 7]
    x = random_inputs(config, seqlens=seqlens, num_heads=4, num_kv_heads=2, head_dim=16, seed=11)
    bi = random_selection(seqlens, 2, config, seed=11)[0]
    seqs = PackedSequences.build(config, 1, sum(seqlens), DEVICE, x["cu_seqlens"])
    q, k, v = (x[name][0] for name in ("q", "k", "v"))
    scale = 0.3
    _, lse = selected_attention_fwd(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), bi.to(DEVICE), seqs, config, scale,
                                    P(fwd_block_t=4, fwd_inverted=inverted))
    expected = torch.empty(4, sum(seqlens), dtype=torch.float64)
    start = 0
    for length in seqlens:
        for t in range(length):
            for h in range(4):
                keys = [s for b in bi[start + t, h // 2].tolist() if b >= 0
                        for s in range(b * 16, min(b * 16 + 16, t + 1))]
                scores = k[start + torch.tensor(keys), h // 2].double() @ q[start + t, h].double() * scale
                expected[h, start + t] = torch.logsumexp(scores, 0)
        start += length
    assert_close("lse", lse.cpu(), expected, ERROR_FLOOR[torch.float32])


# ----------------------------------------------------------------------------------------------------------------
# The index preprocessing, against brute force (pure torch, fast)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block_t", [1, 4, 32])
def test_block_schedule_is_the_union(block_t):
    config = cfg(16, 6)
    seqlens = [70, 5, 0, 131]
    bi = random_selection(seqlens, 2, config, seed=block_t)[0]
    seqs = PackedSequences.build(config, 1, sum(seqlens), "cpu", torch.tensor([0, 70, 75, 75, 206], dtype=torch.int32))
    s = build_block_schedule(bi, seqs, block_t)
    starts = [0, 70, 75, 75]
    expected_tiles = [(st + p0, i) for i, (st, n) in enumerate(zip(starts, seqlens)) for p0 in range(0, n, block_t)]
    assert [(int(a), int(b)) for a, b in zip(s.tile_tok0, s.tile_seq)] == expected_tiles
    for tile, (tok0, seq) in enumerate(expected_tiles):
        end = starts[seq] + seqlens[seq]
        for hk in range(2):
            union = {}
            for p in range(min(block_t, end - tok0)):
                for b in bi[tok0 + p, hk].tolist():
                    if b >= 0:
                        union[b] = union.get(b, 0) | (1 << p)
            count = int(s.counts[tile, hk])
            got_blocks = s.blocks[tile, hk, :count].tolist()
            got_masks = [m & 0xFFFFFFFF for m in s.masks[tile, hk, :count].tolist()]
            assert got_blocks == sorted(union), (tile, hk)
            assert got_masks == [union[b] for b in sorted(union)], (tile, hk)


def test_shape_layouts_are_built_once():
    """Offsets, segment ids and tiles depend on host ints only: a second call with the same lengths reuses them."""
    assert device_offsets([3, 0, 2], "cpu").tolist() == [0, 3, 3, 5]
    assert device_offsets((3, 0, 2), torch.device("cpu")) is device_offsets([3, 0, 2], "cpu")
    assert segment_ids([2, 0, 1], "cpu").tolist() == [0, 0, 2] and segment_ids([], "cpu").numel() == 0
    config = cfg(16, 4)
    cu = torch.tensor([0, 50, 50, 59], dtype=torch.int32)
    first, second = (build_block_schedule(random_selection([50, 0, 9], 2, config, seed=s)[0],
                                          PackedSequences.build(config, 1, 59, "cpu", cu), 4) for s in (0, 1))
    assert first.tile_tok0 is second.tile_tok0 and first.tile_seq is second.tile_seq


@pytest.mark.parametrize("counted", [False, True], ids=["bounds", "counted"])
@pytest.mark.parametrize("seqlens, chunk", [([50, 0, 9, 40], 1), ([50, 0, 9, 40], 5), ([50, 0, 9, 40], 1000),
                                            ([3000, 2500, 700], 7)], ids=["chunk1", "chunk5", "chunk1000",
                                                                          "keys-past-one-step"])
def test_inverse_index_lists_every_selection(seqlens, chunk, counted):
    """Items by a host bound (real items first, then padding), slots by a host bound too, or counted exactly by a
    host sync when the bound's slots would take too many bytes: the same lists and real items either way. The
    last case has more keys (1167) than the items kernel takes in one step (ITEMS_BLOCK), so its running counts
    carry over."""
    config = cfg(16, 4)
    cu = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=torch.int32)
    bi = random_selection(seqlens, 3, config, seed=chunk)[0]
    seqs = PackedSequences.build(config, 1, sum(seqlens), "cpu", cu)
    num_keys = sum(-(-n // 16) for n in seqlens) * 3
    bound_items, bound_slots = max_inverse_items(sum(seqlens) * 3 * 4, num_keys, chunk)
    inv = build_inverse_index(bi, seqs, config, chunk, slot_bytes=2**40 if counted else 1)
    real = inv.item_slot != -2
    num_real = int(real.sum())
    assert bool(real[:num_real].all())  # the real items come first
    assert inv.num_items == bound_items and num_real <= bound_items
    assert inv.num_slots == (int(inv.key_slots.sum()) if counted else bound_slots) >= int(inv.key_slots.sum())
    blocks_per_seq = [-(-n // 16) for n in seqlens]
    first_block = [sum(blocks_per_seq[:i]) for i in range(len(seqlens))]
    expected = {}
    for seq, (start, n) in enumerate(zip(cu.tolist(), seqlens)):
        for t in range(start, start + n):
            for hk in range(3):
                for b in bi[t, hk].tolist():
                    if b >= 0:
                        expected.setdefault((first_block[seq] + b) * 3 + hk, []).append(t)
    assert inv.offsets.shape[0] == num_keys + 1
    for key in range(num_keys):
        got = inv.positions[inv.offsets[key]:inv.offsets[key + 1]].tolist()
        assert got == expected.get(key, []), key
    # Work items tile each list in order, in pieces of at most `chunk`; every key has one, split keys own slots.
    covered = {}
    for key, begin, end, slot in zip(*(x[:num_real].tolist() for x in (inv.item_key, inv.item_begin, inv.item_end,
                                                                       inv.item_slot))):
        assert 0 <= end - begin <= chunk
        covered.setdefault(key, []).append((begin, end, slot))
    assert sorted(covered) == list(range(num_keys))
    for key, pieces in covered.items():
        assert pieces[0][0] == inv.offsets[key] and pieces[-1][1] == inv.offsets[key + 1]
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        if len(pieces) == 1:
            assert pieces[0][2] == -1 and inv.key_slots[key] == 0
        else:
            assert [p[2] for p in pieces] == list(range(inv.key_slot0[key], inv.key_slot0[key] + len(pieces)))
            assert inv.key_slots[key] == len(pieces)
    slots = sorted(slot for pieces in covered.values() for *_, slot in pieces if slot >= 0)
    assert slots == list(range(int(inv.key_slots.sum())))  # each partial slot owned by one item


@pytest.mark.parametrize("token0, count, item_len", [(0, 99, 1), (10, 45, 3), (55, 44, 1000)])
def test_forward_items_cover_each_entry_once(token0, count, item_len):
    config = cfg(16, 4)
    seqlens = [50, 0, 9, 40]
    cu = torch.tensor([0, 50, 50, 59, 99], dtype=torch.int32)
    bi = random_selection(seqlens, 3, config, seed=item_len)[0]
    seqs = PackedSequences.build(config, 1, sum(seqlens), "cpu", cu)
    items = build_forward_items(bi, seqs, config, token0, count, item_len)
    entries = count * 3 * 4
    num_keys = sum(-(-n // 16) for n in seqlens) * 3
    # As many items as the bound (counted on the device, no host sync): the real ones, then empty ones.
    assert items.num_items == max_forward_items(entries, num_keys, item_len)
    seen = []
    for key, begin, end in zip(*(x.tolist() for x in (items.item_key, items.item_begin, items.item_end))):
        assert 0 <= end - begin <= item_len
        for e in items.entries[begin:end].tolist():
            tok, hk, slot = token0 + e // 12, e // 4 % 3, e % 4
            seq = int(torch.searchsorted(cu[1:], torch.tensor(tok), right=True))
            assert (int(items.cu_blocks[seq]) + int(bi[tok, hk, slot])) * 3 + hk == key
            seen.append(e)
    chosen = (bi[token0:token0 + count] >= 0).flatten().nonzero().flatten().tolist()
    assert sorted(seen) == chosen


# ----------------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------------

def _small_inputs():
    config = cfg(16, 3)
    x = random_inputs(config, batch=1, seqlen=20, num_heads=4, num_kv_heads=2, head_dim=16, seed=0)
    return config, x["q"], x["k"], x["v"], random_selection([20], 2, config, seed=0, batch=1)


@pytest.mark.parametrize("what, error", [
    ("block_indices int64", TypeError), ("block_indices shape", ValueError), ("heads", ValueError),
    ("k dtype", TypeError), ("v length", ValueError), ("cu_seqlens batch", ValueError), ("params", TypeError),
    ("scale", ValueError), ("config", TypeError),
])
def test_bad_input(what, error):
    config, q, k, v, bi = _small_inputs()
    kwargs = {}
    if what == "block_indices int64":
        bi = bi.long()
    elif what == "block_indices shape":
        bi = bi[:, :, :1]
    elif what == "heads":
        q = torch.cat([q, q[:, :, :1]], dim=2)
    elif what == "k dtype":
        k = k.double()
    elif what == "v length":
        v = v[:, :-1]
    elif what == "cu_seqlens batch":
        q, k, v, bi = (torch.cat([x, x]) for x in (q, k, v, bi))
        kwargs["cu_seqlens"] = torch.tensor([0, 20], dtype=torch.int32)
    elif what == "params":
        kwargs["params"] = {"fwd_block_t": 2}
    elif what == "scale":
        kwargs["scale"] = -1.0
    elif what == "config":
        config = {"slc_block": 16}
    with pytest.raises(error):
        selected_attention(q, k, v, bi, config, **kwargs)


@pytest.mark.parametrize("field, value", [("fwd_block_t", 3), ("dq_block_t", 64), ("fwd_block_n", 8),
                                          ("dkdv_chunk", 0), ("dkdv_num_warps", 6), ("fwd_num_stages", 0),
                                          ("fwd_inverted", 1), ("dq_inverted", "yes"), ("fwd_parts_16bit", 1),
                                          ("dq_parts_16bit", True), ("fwd_tma", 1), ("dq_tma", "no")])
def test_bad_params(field, value):
    """Bad values, and 16-bit parts without the inverted kernel that writes them."""
    with pytest.raises(ValueError, match=field):
        SelectedAttentionParams(**{field: value})


@pytest.mark.parametrize("group", [1, 2, 3, 4, 16, 64])
def test_default_params_pack_positions_up_to_the_dot_size(group):
    """Positions are packed only into rows a small group would otherwise pad: block_t * G <= max(16, G)."""
    p = default_params(NSAConfig(), 4 * group, 4, 128, 128)
    for block_t in (p.fwd_block_t, p.dq_block_t):
        assert block_t * group <= max(16, group) and (block_t == 1 or 2 * block_t * group > 16)
    assert NSAConfig().slc_block % p.fwd_block_n == 0


@pytest.mark.parametrize("group", [1, 2, 4, 8, 16])
def test_default_params_invert_small_groups_in_16_bits(group):
    """The block-owned forward and dq, with 16-bit parts, for G <= 4 (where they were measured faster), 16-bit
    inputs and head dims <= 128 only; fp32 and large heads keep the gather kernels."""
    p = default_params(NSAConfig(), 4 * group, 4, 128, 128, dtype=torch.bfloat16)
    assert p.fwd_inverted == p.dq_inverted == p.fwd_parts_16bit == p.dq_parts_16bit == (group <= 4)
    for dtype, dim in ((torch.float32, 128), (torch.float16, 192), (None, 128)):
        p = default_params(NSAConfig(), 4 * group, 4, dim, dim, dtype=dtype)
        assert not (p.fwd_inverted or p.dq_inverted or p.fwd_parts_16bit or p.dq_parts_16bit)


# ----------------------------------------------------------------------------------------------------------------
# GPU: bf16 / fp16 at long sequences (run with `pytest -m gpu` on a CUDA machine)
# ----------------------------------------------------------------------------------------------------------------

GPU_SHAPES = {  # id: (T, Hq, Hkv)
    "T16384-Hq64-Hkv4-G16": (16384, 64, 4),
    "T8192-Hq16-Hkv16-G1": (8192, 16, 16),
    "T8192-Hq64-Hkv16-G4": (8192, 64, 16),
    "T4096-Hq8-Hkv4-G2": (4096, 8, 4),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs a CUDA GPU (no interpreter)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("inverted, parts_16bit, tma", [(False, False, False), (False, False, True),
                                                        (True, False, False), (True, True, False)],
                         ids=["gather", "gather-tma", "inverted", "inverted-16bit-parts"])
def test_gpu_low_precision(shape, dtype, inverted, parts_16bit, tma, monkeypatch):
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)
    seqlen, num_heads, num_kv_heads = GPU_SHAPES[shape]
    config = NSAConfig()  # l' = 64, n = 16
    x = random_inputs(config, batch=1, seqlen=seqlen, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=128,
                      dtype=dtype, device="cuda", seed=seqlen + num_heads + num_kv_heads)
    block_indices = select_blocks(x["q"].float(), x["k_cmp"].float(), config)
    q, k, v = (x[name].requires_grad_(True) for name in ("q", "k", "v"))
    do = torch.randn_like(q[..., :v.shape[-1]])
    params = default_params(config, num_heads, num_kv_heads, 128, 128, dtype=dtype)
    params = dataclasses.replace(params, fwd_inverted=inverted, dq_inverted=inverted, fwd_parts_16bit=parts_16bit,
                                 dq_parts_16bit=parts_16bit, fwd_tma=tma, dq_tma=tma)
    o = selected_attention(q, k, v, block_indices, config, params=params)
    grads = torch.autograd.grad(o, (q, k, v), do)

    def reference(cast):
        inputs = [x[name].detach().to(cast).requires_grad_(True) for name in ("q", "k", "v")]
        out = reference_selected_attention(*inputs, block_indices, config, chunk_size=512)
        return (out, *torch.autograd.grad(out, inputs, do.to(cast)))

    ref32 = reference(torch.float32)
    ref_low = reference(dtype)
    for name, got, exact, same in zip(("o", "dq", "dk", "dv"), (o, *grads), ref32, ref_low):
        assert_close(name, got, exact, allowed_error(exact, same, dtype))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or interpreting(), reason="needs a CUDA GPU (no interpreter)")
def test_gpu_varlen_fp32(monkeypatch):
    """fp32 on the GPU (ieee dots) over packed sequences, against float64."""
    monkeypatch.setattr(runtime, "POISON_OUTPUTS", True)
    config = NSAConfig()
    x = random_inputs(config, seqlens=[3000, 40, 1500], num_heads=8, num_kv_heads=2, head_dim=64, head_dim_v=32,
                      device="cuda", seed=3)
    cu = x["cu_seqlens"]
    block_indices = select_blocks(x["q"], x["k_cmp"], config, cu_seqlens=cu)
    q, k, v = (x[name].requires_grad_(True) for name in ("q", "k", "v"))
    do = torch.randn_like(q[..., :32])
    o = selected_attention(q, k, v, block_indices, config, cu_seqlens=cu)
    grads = torch.autograd.grad(o, (q, k, v), do)
    inputs = [x[name].detach().double().requires_grad_(True) for name in ("q", "k", "v")]
    out = reference_selected_attention(*inputs, block_indices, config, cu_seqlens=cu)
    refs = (out, *torch.autograd.grad(out, inputs, do.double()))
    for name, got, exact in zip(("o", "dq", "dk", "dv"), (o, *grads), refs):
        assert_close(name, got, exact, ERROR_FLOOR[torch.float32])
