"""The `train` suite (issue 9): do NSA models train as well as dense ones, and can they retrieve?

Small byte-level LMs on Python's stdlib source, NSA vs dense causal attention of the same size, with loss
curves, tokens/s, a passkey-retrieval heat map and, on a GPU, the kernels against the reference inside the same
model. `nsa run --suite train` runs it; `run_train_suite` is the function behind it (imported on first use:
it needs pandas and matplotlib, which listing the suite does not).
"""

from nsa.suites.training.config import DESCRIPTION, MODELS, SIZES, Size, TrainConfig, get_size

__all__ = ["DESCRIPTION", "MODELS", "SIZES", "Size", "TrainConfig", "get_size", "run_train_suite"]


def __getattr__(name):
    if name == "run_train_suite":
        from nsa.suites.training.suite import run_train_suite
        return run_train_suite
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
