"""The backward's delta = rowsum(dO * O) kernel against torch."""

import pytest
import torch

from nsa.kernels.delta import attention_delta
from nsa.kernels.runtime import interpreting

DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not interpreting(), reason="needs TRITON_INTERPRET=1 or a GPU")


@pytest.mark.parametrize("total, heads, head_dim", [(37, 3, 40), (130, 64, 128), (1, 1, 16), (0, 4, 32)])
def test_delta_is_the_row_sum(total, heads, head_dim):
    gen = torch.Generator().manual_seed(total)
    o, do = (torch.randn(total, heads, head_dim, generator=gen).to(DEVICE) for _ in range(2))
    delta = attention_delta(o, do)
    assert delta.shape == (heads, total) and delta.dtype == torch.float32
    expected = (o.double() * do.double()).sum(-1).t()
    torch.testing.assert_close(delta.double(), expected, rtol=1e-5, atol=1e-5)
