"""What machine this is: GPUs (through nvidia-ml-py), library versions, which FlashAttention implementations run.

Used by `nsa info` and by the reports' environment block.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def gpus() -> list[dict]:
    """Each visible NVIDIA GPU's identity and state from NVML; empty without a GPU or nvidia-ml-py."""
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception:  # no library, no driver or no GPU: all mean "no NVIDIA GPU here"
        return []
    try:
        out = []
        driver = pynvml.nvmlSystemGetDriverVersion()
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = {"index": i, "name": pynvml.nvmlDeviceGetName(h), "driver": driver}
            queries = {
                "memory_gib": lambda: pynvml.nvmlDeviceGetMemoryInfo(h).total / 2**30,
                "sm_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "max_sm_clock_mhz": lambda: pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "mem_clock_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_MEM),
                "power_limit_w": lambda: pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000,
                "temperature_c": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            }
            for key, query in queries.items():
                try:
                    info[key] = query()
                except pynvml.NVMLError:  # some fields are unsupported on some cards; leave them out
                    pass
            out.append(info)
        return out
    finally:
        pynvml.nvmlShutdown()


def flash_attention_implementations() -> dict[str, str | None]:
    """Which FlashAttention-class implementations can be imported, with their versions (None: not importable)."""
    found = {}
    for label, module, dist in (("flash-attn (FA2 API)", "flash_attn", "flash-attn"),
                                ("flash-attn FA3 interface", "flash_attn_interface", "flash-attn-3"),
                                ("flash-attn cute", "flash_attn.cute", "flash-attn"),
                                ("fla-core parallel_nsa", "fla.ops.nsa", "fla-core")):
        try:
            importlib.import_module(module)
            found[label] = _version(dist) or "importable"
        except Exception:  # ImportError, or a broken CUDA extension: either way it cannot be used
            found[label] = None
    try:
        import torch
        cuda = torch.cuda.is_available()
        found["torch SDPA flash"] = torch.__version__ if cuda and torch.backends.cuda.is_flash_attention_available() else None
        found["torch SDPA cuDNN"] = torch.__version__ if cuda and torch.backends.cudnn.is_available() else None
    except ImportError:
        pass
    return found


def describe() -> dict:
    """Everything `nsa info` prints, as a dict."""
    import torch
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nsa": _version("nsa"),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda,
        "gpus": gpus(),
        "flash_attention": flash_attention_implementations(),
    }
