"""The baselines: FlashAttention-class dense attention (torch SDPA's flash and cuDNN backends, the flash-attn
package) and the peer NSA of fla-core (`parallel_nsa`).

Dense baselines compute causal attention over all T keys from the same q, k, v (the gates and compressed
tensors are not theirs), checked against `nsa.suites.dense.dense_attention`. fla-core runs at its own config
(FLA_CONFIG: l = l' = d = 64 with its built-in mean-pooled compression, n = 16, w = 512), whatever the
problem's config, and is checked against nsa.reference at that config fed the same mean pooling.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util

import torch
import torch.nn.functional as F

from nsa.inputs import split_sequences
from nsa.suites.catalog import FLA_CONFIG
from nsa.suites.dense import dense_attention
from nsa.suites.providers import Prepared, Provider, register


def _dist_version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "version unknown"


def _first(result):
    """Some FlashAttention versions return (out, lse): keep the output."""
    return result[0] if isinstance(result, tuple) else result


def _needs_cuda(device, what: str) -> str | None:
    return None if torch.device(device).type == "cuda" else f"{what} needs a CUDA GPU"


class DenseBaseline(Provider):
    """Dense causal attention over q, k, v; checked against the plain-PyTorch dense attention."""

    baseline = True
    grad_names = ("q", "k", "v")

    def config(self, problem):
        return None

    def reference(self, problem, x):
        return dense_attention(x["q"], x["k"], x["v"], cu_seqlens=x.get("cu_seqlens"))


class TorchSDPA(DenseBaseline):
    """torch.nn.functional.scaled_dot_product_attention restricted to one backend.

    GQA goes through `enable_gqa` where the backend takes it; otherwise the kv heads are repeated once in
    setup (outside the timed call; the bwd time then includes the repeat's backward, a sum over each group).
    The detail says which.
    """

    def __init__(self, name: str, backend: str):
        self.name, self.backend = name, backend

    def unavailable(self, device):
        from torch.nn.attention import SDPBackend
        if not hasattr(SDPBackend, self.backend):
            return f"torch {torch.__version__} has no SDPA {self.backend} backend"
        if self.backend == "CUDNN_ATTENTION":
            return _needs_cuda(device, "cuDNN SDPA")
        if torch.device(device).type == "cuda" and not torch.backends.cuda.is_flash_attention_available():
            return f"torch {torch.__version__} was built without SDPA flash attention"
        return None

    def unsupported(self, problem):
        if problem.seqlens is not None:
            return "torch SDPA takes no packed variable-length batch"
        return super().unsupported(problem)

    def prepare(self, problem, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, self.backend)
        q, k, v = (x[n].transpose(1, 2) for n in ("q", "k", "v"))  # [B, H, T, D] views of [B, T, H, D]
        causal = problem.op != "decode"  # a decode query is the last position: it sees every key

        def attend(k, v, gqa):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa).transpose(1, 2)

        if problem.group_size == 1:
            gqa, how = False, "MHA"
        else:
            try:
                with torch.no_grad():
                    attend(k, v, True)
                gqa, how = True, "GQA via enable_gqa"
            except RuntimeError:
                k = k.repeat_interleave(problem.group_size, dim=1)
                v = v.repeat_interleave(problem.group_size, dim=1)
                gqa, how = False, "GQA by kv heads repeated in setup"
        where = "CUDA" if q.is_cuda else "CPU"
        return Prepared(lambda: attend(k, v, gqa), f"torch {torch.__version__} SDPA {self.backend} ({where}), {how}")


# Importable FlashAttention entry points, best first on Hopper: (module, label, distribution).
FLASH_ATTN_MODULES = (("flash_attn_interface", "FA3 interface", "flash-attn-3"),
                      ("flash_attn.cute", "FA cute DSL", "flash-attn"),
                      ("flash_attn", "FA2 API", "flash-attn"))


class FlashAttn(DenseBaseline):
    """The flash-attn package: the FA3 interface, flash_attn.cute or the FA2 API, the first that imports."""

    name = "flash-attn"

    def _module(self):
        for module, label, dist in FLASH_ATTN_MODULES:
            try:
                mod = importlib.import_module(module)
            except Exception:  # ImportError or a broken CUDA extension: try the next one
                continue
            if hasattr(mod, "flash_attn_func"):
                return mod, f"{module} ({label}, {dist} {_dist_version(dist)})"
        return None, "none of " + ", ".join(m for m, _, _ in FLASH_ATTN_MODULES) + " imports"

    def unavailable(self, device):
        if reason := _needs_cuda(device, "flash-attn"):
            return reason
        mod, label = self._module()
        return None if mod else label

    def prepare(self, problem, x):
        mod, label = self._module()
        q, k, v = x["q"], x["k"], x["v"]
        if problem.seqlens is not None:
            cu, longest = x["cu_seqlens"], max(problem.seqlens)
            fn = mod.flash_attn_varlen_func
            return Prepared(lambda: _first(fn(q[0], k[0], v[0], cu, cu, longest, longest, causal=True))[None],
                            f"{label} flash_attn_varlen_func")
        if problem.op == "decode" and hasattr(mod, "flash_attn_with_kvcache"):
            fn = mod.flash_attn_with_kvcache
            return Prepared(lambda: _first(fn(q, k, v, causal=True)), f"{label} flash_attn_with_kvcache")
        fn = mod.flash_attn_func
        causal = problem.op != "decode"
        return Prepared(lambda: _first(fn(q, k, v, causal=causal)), f"{label} flash_attn_func")


def mean_pooled(x: torch.Tensor, config, cu_seqlens=None) -> torch.Tensor:
    """Compressed entries as fla-core makes them: the mean of each block [i*d, i*d + l) of x [B, T, H, D],
    per sequence (packed like k_cmp when cu_seqlens is given)."""
    blocks = [_block_means(x[s.batch, s.start:s.end], config)
              for s in split_sequences(config, x.shape[0], x.shape[1], cu_seqlens)]
    if cu_seqlens is None:
        return torch.stack(blocks)
    return torch.cat(blocks)[None]


def _block_means(x: torch.Tensor, config) -> torch.Tensor:
    if x.shape[0] < config.cmp_block:
        return x.new_zeros(0, *x.shape[1:])
    return x.unfold(0, config.cmp_block, config.cmp_stride).mean(dim=-1)


class FlaParallelNSA(Provider):
    """fla-core's `parallel_nsa` (fla.ops.nsa) at its own config, FLA_CONFIG; gates and q, k, v are its inputs."""

    name = "fla-nsa"
    baseline = True
    ops = ("fwd", "bwd")
    grad_names = ("q", "k", "v", "g_cmp", "g_slc", "g_win")

    def config(self, problem):
        return FLA_CONFIG

    def unavailable(self, device):
        if torch.device(device).type != "cuda":
            return "fla-core parallel_nsa needs a CUDA GPU"
        try:
            importlib.import_module("fla.ops.nsa").parallel_nsa
        except Exception as e:
            return f"fla.ops.nsa.parallel_nsa does not import: {type(e).__name__}: {e}"
        if FLA_CONFIG.window and importlib.util.find_spec("flash_attn") is None:
            # fla-core (0.6.0) computes the sliding-window branch with flash_attn_func, and calls None without it
            return "fla-core parallel_nsa runs its sliding window through the flash-attn package, not installed here"
        return None

    def prepare(self, problem, x):
        parallel_nsa = importlib.import_module("fla.ops.nsa").parallel_nsa
        cu = x["cu_seqlens"].long() if x["cu_seqlens"] is not None else None
        cfg = FLA_CONFIG
        return Prepared(lambda: parallel_nsa(x["q"], x["k"], x["v"], g_cmp=x["g_cmp"], g_slc=x["g_slc"],
                                             g_swa=x["g_win"], block_counts=cfg.slc_topn, block_size=cfg.slc_block,
                                             window_size=cfg.window, cu_seqlens=cu),
                        f"fla-core {_dist_version('fla-core')} fla.ops.nsa.parallel_nsa")

    def reference(self, problem, x):
        from nsa.reference import nsa_attention
        cu = x["cu_seqlens"]
        k_cmp, v_cmp = (mean_pooled(x[n], FLA_CONFIG, cu) for n in ("k", "v"))
        return nsa_attention(x["q"], x["k"], x["v"], k_cmp, v_cmp, x["g_cmp"], x["g_slc"], x["g_win"], FLA_CONFIG,
                             cu_seqlens=cu)


register(TorchSDPA("sdpa-flash", "FLASH_ATTENTION"))
register(TorchSDPA("sdpa-cudnn", "CUDNN_ATTENTION"))
register(FlashAttn())
register(FlaParallelNSA())
