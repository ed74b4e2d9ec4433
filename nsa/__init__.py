"""nsa: fast, tuned and verified Native Sparse Attention (arXiv 2502.11089) on the GPU at hand.

Subpackages: `nsa.reference` (plain PyTorch oracle), `nsa.kernels` (Triton), `nsa.tuner`, `nsa.suites`,
`nsa.reports`. The contract they share is the project's SPEC.md.
"""

from nsa.config import NSAConfig

__version__ = "0.1.0"

from nsa.module import NativeSparseAttention  # noqa: E402  (needs NSAConfig above)

__all__ = ["NSAConfig", "NativeSparseAttention", "__version__"]
