"""Per-GPU search of the kernels' tunable parameters into config caches the kernels read at run time.

`nsa.tuner.cache` (file format, device keys, lookup order), `nsa.tuner.spaces` (search spaces and pruning),
`nsa.tuner.search` (the search, `nsa tune`). Importing this package imports no kernels.
"""

from nsa.tuner.cache import clear_cache, config_path, device_key, lookup, normalize_device_name


def tune(*args, **kwargs):
    from nsa.tuner.search import tune as _tune
    return _tune(*args, **kwargs)


def ensure_tuned(device=None, **kwargs) -> str:
    from nsa.tuner.search import ensure_tuned as _ensure
    return _ensure(device, **kwargs)


__all__ = ["clear_cache", "config_path", "device_key", "ensure_tuned", "lookup", "normalize_device_name", "tune"]
