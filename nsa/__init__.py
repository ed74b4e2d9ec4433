"""nsa: fast, tuned and verified Native Sparse Attention (arXiv 2502.11089) on the GPU at hand.

Subpackages: `nsa.reference` (plain PyTorch oracle), `nsa.kernels` (Triton), `nsa.tuner`, `nsa.suites`,
`nsa.reports`. The contract they share is the project's SPEC.md.
"""

from pathlib import Path

# From a checkout's root (`python -m nsa`, `torchrun -m nsa`) Python imports this folder rather than the installed
# package, and the other subpackages are folders beside it (pyproject's package-dir maps nsa.kernels to
# kernels/, ...): let them resolve there too. An installed copy has no pyproject.toml beside it.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "kernels" / "__init__.py").is_file():
    __path__.append(str(_checkout))
del Path, _checkout

from nsa.config import NSAConfig  # noqa: E402

__version__ = "0.1.0"

from nsa.module import NativeSparseAttention  # noqa: E402  (needs NSAConfig above)

__all__ = ["NSAConfig", "NativeSparseAttention", "__version__"]
