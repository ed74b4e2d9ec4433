"""The Compressor and the NativeSparseAttention module (SPEC section 3)."""

import importlib

import pytest
import torch

import nsa
from nsa import kernels
from nsa import NSAConfig, NativeSparseAttention
from nsa.kernels import runtime
from nsa.reference import Compressor

CFG = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=3, window=6)


def test_compressor_blocks_and_varlen():
    torch.manual_seed(0)
    comp = Compressor(CFG, 6, 12).double()
    x = torch.randn(2, 21, 3, 6, dtype=torch.float64)
    out = comp(x)
    assert out.shape == (2, CFG.num_cmp_blocks(21), 3, 6)
    # block i is phi(x[i*d : i*d+l] + pe), independent of the rest of the sequence
    torch.testing.assert_close(out[:, 2:3], comp(x[:, 8:16]))
    packed = comp(torch.cat([x[0, :5], x[1]])[None], torch.tensor([0, 5, 26], dtype=torch.int32))
    torch.testing.assert_close(packed[0], out[1])  # the 5-token sequence has no complete block


def test_module_trains_end_to_end():
    torch.manual_seed(0)
    layer = NativeSparseAttention(32, num_heads=4, num_kv_heads=2, head_dim=8, config=CFG).double()
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    y = layer(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_module_step_matches_forward():
    torch.manual_seed(1)
    layer = NativeSparseAttention(16, num_heads=2, num_kv_heads=1, head_dim=8, head_dim_v=4, config=CFG).double()
    x = torch.randn(2, 25, 16, dtype=torch.float64)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2)
        steps = [layer.step(x[:, :10], cache)] + [layer.step(x[:, t:t + 1], cache) for t in range(10, 25)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-10, atol=1e-10)


@pytest.mark.skipif(not runtime.interpreting(), reason="CPU tests run the kernels in TRITON_INTERPRET=1")
@pytest.mark.parametrize("page_size", [None, 8])
def test_module_steps_through_the_kernels_cache(page_size):
    """backend='kernels': new_cache gives an nsa.kernels.KVCache; prefill then token steps equal forward."""
    torch.manual_seed(3)
    layer = NativeSparseAttention(16, num_heads=4, num_kv_heads=2, head_dim=16, config=CFG, backend="kernels")
    x = torch.randn(2, 30, 16)
    with torch.no_grad():
        full = layer(x)
        with pytest.raises(ValueError, match="capacity"):
            layer.new_cache(2)
        cache = layer.new_cache(2, capacity=32, page_size=page_size)
        assert isinstance(cache, kernels.KVCache)
        steps = [layer.step(x[:, :21], cache)] + [layer.step(x[:, t:t + 1], cache) for t in range(21, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_module_varlen_matches_separate_sequences():
    torch.manual_seed(2)
    layer = NativeSparseAttention(16, num_heads=2, num_kv_heads=2, head_dim=4, config=CFG).double()
    a, b = torch.randn(1, 9, 16, dtype=torch.float64), torch.randn(1, 20, 16, dtype=torch.float64)
    packed = layer(torch.cat([a, b], 1), cu_seqlens=torch.tensor([0, 9, 29], dtype=torch.int32))
    torch.testing.assert_close(packed, torch.cat([layer(a), layer(b)], 1))


def test_module_rejects_bad_arguments():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        NativeSparseAttention(16, num_heads=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="backend"):
        NativeSparseAttention(16, num_heads=2, num_kv_heads=1, head_dim=4, backend="cuda")


@pytest.mark.parametrize("package", ["kernels", "reference", "tuner", "suites", "reports"])
def test_spec_packages_import(package):
    assert {"NSAConfig", "NativeSparseAttention"} <= set(nsa.__all__)
    module = importlib.import_module(f"nsa.{package}")
    assert module.__doc__
