"""Every invalid config, shape, dtype or device mix raises a clear error naming the problem."""

import pytest
import torch

from nsa import NSAConfig
from nsa.problems import random_inputs
from nsa.reference import nsa_attention

CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=3, window=8)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(cmp_block=32, cmp_stride=12), ValueError, "must divide cmp_block"),
    (dict(cmp_block=32, cmp_stride=16, slc_block=40), ValueError, "must divide slc_block"),
    (dict(cmp_block=128, cmp_stride=16, slc_block=64), ValueError, "must be <= slc_block"),
    (dict(slc_topn=2, init_blocks=1, local_blocks=2), ValueError, "slc_topn"),
    (dict(window=0), ValueError, "window"),
    (dict(cmp_stride=-1), ValueError, "cmp_stride"),
    (dict(init_blocks=-1), ValueError, "init_blocks"),
    (dict(slc_topn=2.0), TypeError, "slc_topn"),
    (dict(window=True), TypeError, "window"),
])
def test_invalid_configs(kwargs, error, words):
    with pytest.raises(error, match=words):
        NSAConfig(**kwargs)


def test_paper_defaults():
    cfg = NSAConfig()
    assert (cfg.cmp_block, cfg.cmp_stride, cfg.slc_block, cfg.slc_topn, cfg.window) == (32, 16, 64, 16, 512)
    assert (cfg.init_blocks, cfg.local_blocks) == (1, 2)
    assert [cfg.num_cmp_blocks(t) for t in (0, 31, 32, 47, 48, 65536)] == [0, 0, 1, 1, 2, 4095]
    with pytest.raises(Exception):
        cfg.window = 3  # frozen


def _inputs(**over):
    x = random_inputs(CFG, batch=2, seqlen=20, num_heads=4, num_kv_heads=2, head_dim=8, seed=0)
    x.pop("cu_seqlens")
    x.update(over)
    return x


def _bad(name, fn):
    x = _inputs()
    x[name] = fn(x[name])
    return x


CASES = {
    "k_cmp wrong length": (_bad("k_cmp", lambda t: t[:, :-1]), ValueError, "k_cmp must have shape"),
    "v_cmp wrong length": (_bad("v_cmp", lambda t: torch.cat([t, t[:, :1]], 1)), ValueError, "v_cmp must have shape"),
    "heads not a multiple": (_bad("q", lambda t: t[:, :, :3]), ValueError, "multiple of kv heads"),
    "k head dim": (_bad("k", lambda t: t[..., :4]), ValueError, "k must have shape"),
    "v_cmp head dim": (_bad("v_cmp", lambda t: t[..., :4]), ValueError, "v_cmp must have shape"),
    "k seqlen": (_bad("k", lambda t: t[:, :10]), ValueError, "k must have shape"),
    "gate shape": (_bad("g_slc", lambda t: t[:, :, :2]), ValueError, "g_slc must have shape"),
    "q 3-D": (_bad("q", lambda t: t[0]), ValueError, "q must have 4 dimensions"),
    "not a tensor": (_bad("v", lambda t: t.numpy()), TypeError, "v must be a torch.Tensor"),
    "mixed dtypes": (_bad("k", lambda t: t.double()), TypeError, "k has dtype torch.float64"),
    "integer dtype": (_bad("q", lambda t: t.to(torch.int32)), TypeError, "q must be a floating tensor"),
    "mixed devices": (_bad("v", lambda t: t.to("meta")), ValueError, "v is on meta"),
}


@pytest.mark.parametrize("case", CASES)
def test_invalid_inputs(case):
    x, error, words = CASES[case]
    with pytest.raises(error, match=words):
        nsa_attention(**x, config=CFG)


@pytest.mark.parametrize("cu, words", [
    ([0, 5, 20], "batch size must be 1"),
])
def test_cu_seqlens_needs_batch_one(cu, words):
    with pytest.raises(ValueError, match=words):
        nsa_attention(**_inputs(), config=CFG, cu_seqlens=torch.tensor(cu, dtype=torch.int32))


@pytest.mark.parametrize("cu, dtype, words", [
    ([0, 5, 19], torch.int32, "end at T=20"),
    ([0, 12, 5, 20], torch.int32, "non-decreasing"),
    ([0, 20], torch.int64, "int32"),
])
def test_bad_cu_seqlens(cu, dtype, words):
    x = random_inputs(CFG, seqlens=[20], num_heads=2, num_kv_heads=1, head_dim=8, seed=1)
    x.pop("cu_seqlens")
    with pytest.raises(ValueError, match=words):
        nsa_attention(**x, config=CFG, cu_seqlens=torch.tensor(cu, dtype=dtype))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), "x"])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match="scale"):
        nsa_attention(**_inputs(), config=CFG, scale=scale)


def test_config_must_be_an_nsa_config():
    with pytest.raises(TypeError, match="config must be an nsa.NSAConfig"):
        nsa_attention(**_inputs(), config={"window": 8})
