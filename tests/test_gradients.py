"""Gradients of the reference: torch.autograd.gradcheck on tiny float64 problems."""

import pytest
import torch

from nsa import NSAConfig
from nsa.problems import random_inputs
from nsa.reference import nsa_attention

CFG = NSAConfig(cmp_block=4, cmp_stride=2, slc_block=4, slc_topn=3, window=5)


@pytest.mark.parametrize("chunk_size", [None, 3], ids=["one-chunk", "checkpointed-chunks"])
@pytest.mark.parametrize("heads", [(2, 1), (2, 2)], ids=["G2", "G1"])
def test_gradcheck(heads, chunk_size):
    x = random_inputs(CFG, batch=1, seqlen=13, num_heads=heads[0], num_kv_heads=heads[1], head_dim=4, head_dim_v=3,
                      dtype=torch.float64, seed=7, requires_grad=True)
    x.pop("cu_seqlens")
    names = list(x)

    def f(*tensors):
        return nsa_attention(*tensors, config=CFG, chunk_size=chunk_size)

    assert torch.autograd.gradcheck(f, tuple(x[n] for n in names), eps=1e-6, atol=1e-7)


def test_gradcheck_varlen():
    x = random_inputs(CFG, seqlens=[3, 9], num_heads=2, num_kv_heads=1, head_dim=4, dtype=torch.float64, seed=8,
                      requires_grad=True)
    cu = x.pop("cu_seqlens")
    assert torch.autograd.gradcheck(lambda *t: nsa_attention(*t, config=CFG, cu_seqlens=cu), tuple(x.values()),
                                    eps=1e-6, atol=1e-7)


def test_selection_gets_no_gradient_but_compressor_inputs_do():
    x = random_inputs(CFG, batch=1, seqlen=16, num_heads=2, num_kv_heads=1, head_dim=4, dtype=torch.float64, seed=9,
                      requires_grad=True)
    x.pop("cu_seqlens")
    o, idx = nsa_attention(**x, config=CFG, return_block_indices=True)
    assert not idx.requires_grad
    grads = torch.autograd.grad(o.square().sum(), list(x.values()))
    for name, g in zip(x, grads):
        assert g.abs().sum() > 0, f"no gradient reaches {name}"
