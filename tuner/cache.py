"""Config caches: one JSON file per device, `{"meta": {...}, "entries": {"<family>|<bucket>": {...}}}`.

Lookup order, said once (used by `NSAParams.resolve` for every family whose params were not passed, and by
`nsa_decode` without params):

    explicit argument > $NSA_CONFIG_DIR > user cache ($XDG_CACHE_HOME/nsa/configs, else ~/.cache/nsa/configs)
    > shipped (nsa/tuner/configs) > the family's `default_params` heuristic.

The first of those folders whose file for this device has an entry for the family and shape wins. Within a
file the bucket must match exactly on everything but T (family, G, Dk, Dv, l, d, l', n, dtype); T is bucketed to the
nearest power of two, and when that T bucket is absent the entry with the nearest log2 T is used, if it lies within
a factor of MAX_T_RATIO (params tuned for 1k tokens say little about 64k: a partial cache falls back to the
heuristic there instead).

Decode (`nsa_decode`, the DECODE_FAMILIES) is looked up by `nsa.kernels.decode.resolve_params` and its keys carry
one more part before the dtype, `rows=R`: the rows of a step, B x n x Hkv (sequences x new tokens x kv heads),
bucketed like T. Rows, not B, because the rows are what the decode grid and its split heuristic scale with (B=1 and
B=16 want very different splits; so do 4 and 8 kv heads at one B). T is the cache's capacity, the size every
buffer and grid of a step comes from. An absent bucket takes the entry nearest in log2 T + log2 rows, each within
its factor (MAX_T_RATIO, MAX_ROWS_RATIO; ties to the larger rows, then the larger T). Training keys keep their
ten parts, so existing files load unchanged.

An entry holds the winning `params` and what the tuner saw: `ms` (its median), `default_ms` (the family default's),
`tried`, `rejected`, `pruned`, after a short search `start_ms` and `fields`, and `timed_as` (`entry_timing`): times
of CUDA-graph replays and of eager calls do not compare at short lengths, where the host paces an eager call.

A file that cannot be read, is not this format, or was written for another device warns once and is ignored;
an entry whose params the kernels reject warns once and is skipped. Loaded files and lookups are cached per
process (`clear_cache()` forgets them; the tuner calls it after each write).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import math
import os
import re
import tempfile
import warnings
from pathlib import Path

log = logging.getLogger("nsa.tuner")

FORMAT_VERSION = 1
SHIPPED_DIR = Path(__file__).resolve().parent / "configs"
ENV_DIR = "NSA_CONFIG_DIR"

# family -> (kernel module, params class). Imported lazily: nsa.kernels imports this module.
# FAMILIES are the fields of `nsa.kernels.NSAParams` (its `resolve` looks up each of them); decode has its own
# params and its own lookup, and keys with a rows part. ALL_FAMILIES is what the tuner searches and files hold.
FAMILIES = {
    "compression": ("nsa.kernels.compression", "CompressionParams"),
    "selection": ("nsa.kernels.selection", "SelectionParams"),
    "selected": ("nsa.kernels.selected_attention", "SelectedAttentionParams"),
    "window": ("nsa.kernels.window_attention", "WindowAttentionParams"),
    "combine": ("nsa.kernels.combine", "CombineParams"),
}
# The backward kernels of a family, searched (and timed) apart from its forward: an entry of `<family>_bwd` holds the
# same params class, and only its fields without the `fwd_` prefix are used (`with_backward`).
BACKWARD_FAMILIES = {"compression_bwd": "compression", "selected_bwd": "selected", "window_bwd": "window"}
DECODE_FAMILIES = {
    "decode": ("nsa.kernels.decode", "DecodeParams"),
}
ALL_FAMILIES = {**FAMILIES, **{name: FAMILIES[fwd] for name, fwd in BACKWARD_FAMILIES.items()}, **DECODE_FAMILIES}


def params_class(family: str):
    module, name = ALL_FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def entry_timing(family: str, entry: dict) -> str:
    """How an entry's `ms` was timed (`timed_as`): "cuda-graph" replays or "eager" calls. Entries written before
    it was recorded were timed eagerly, decode's as graphs."""
    return entry.get("timed_as") or ("cuda-graph" if family in DECODE_FAMILIES else "eager")


def with_backward(params, backward):
    """`params` (a family's forward winner or default) with the backward kernels' fields of `backward` (the
    `<family>_bwd` entry, same class), or `params` itself when there is no such entry."""
    if backward is None:
        return params
    return dataclasses.replace(params, **{f.name: getattr(backward, f.name) for f in dataclasses.fields(params)
                                          if not f.name.startswith("fwd_")})


# ----------------------------------------------------------------------------------------------------------------
# Device names
# ----------------------------------------------------------------------------------------------------------------

# (pattern on the lower-cased name, key): first match wins. Variants that differ in speed keep their own key.
DEVICE_ALIASES = (
    (r"^(cpu|interpreter|triton[- ]interpreter|cpu[- ]interpreter)$", "cpu-interpreter"),
    (r"\bgh200\b", "nvidia-gh200"),
    (r"\bh100\b.*\bpcie\b", "nvidia-h100-pcie"),
    (r"\bh100\b.*\bnvl\b", "nvidia-h100-nvl"),
    (r"\bh100\b", "nvidia-h100"),  # "NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM5 80GB", "H100-SXM", "NVIDIA H100"
    (r"\bh200\b", "nvidia-h200"),  # "NVIDIA H200", "NVIDIA H200 141GB HBM3e"
    (r"\ba100\b.*\bpcie\b", "nvidia-a100-pcie"),
    (r"\ba100\b", "nvidia-a100"),
)


def normalize_device_name(name: str) -> str:
    """One key per card model: the alias table, else the lower-cased name with runs of non-alphanumerics as '-'
    and an "nvidia-" prefix for NVIDIA cards."""
    low = name.strip().lower()
    for pattern, key in DEVICE_ALIASES:
        if re.search(pattern, low):
            return key
    slug = re.sub(r"[^a-z0-9]+", "-", low).strip("-")
    return slug or "unknown"


_device_keys: dict[str, str] = {}


def device_key(device=None) -> str:
    """The cache key of a torch device: its normalised CUDA name, or "cpu-interpreter" for a CPU."""
    import torch
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        return "cpu-interpreter"
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    cached = _device_keys.get(str(index))
    if cached is None:
        cached = _device_keys[str(index)] = normalize_device_name(torch.cuda.get_device_name(index))
    return cached


# ----------------------------------------------------------------------------------------------------------------
# Paths
# ----------------------------------------------------------------------------------------------------------------


def user_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "nsa" / "configs"


def config_path(device_key: str, root) -> Path:
    """The one place a device's cache file lives under a folder (writer and loader both use it)."""
    return Path(root) / f"{device_key}.json"


def search_dirs() -> list[tuple[str, Path]]:
    """(source name, folder) in lookup order."""
    dirs = []
    if os.environ.get(ENV_DIR):
        dirs.append((ENV_DIR, Path(os.environ[ENV_DIR])))
    dirs.append(("user", user_dir()))
    dirs.append(("shipped", SHIPPED_DIR))
    return dirs


# ----------------------------------------------------------------------------------------------------------------
# Buckets
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shape:
    """What a kernel family's params are tuned for."""

    seqlen: int
    group: int
    head_dim: int
    head_dim_v: int
    cmp_block: int
    cmp_stride: int
    slc_block: int
    slc_topn: int
    dtype: str  # compute dtype name, e.g. "bfloat16"
    rows: int | None = None  # decode only: rows of a step, B x n x Hkv (see the module doc)


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def t_bucket(seqlen: int) -> int:
    """Nearest power of two (in log2) to T (and to a decode step's rows)."""
    return 1 << max(0, round(math.log2(max(1, seqlen))))


def bucket_key(family: str, shape: Shape) -> str:
    """`family|T=..|G=..|Dk=..|Dv=..|l=..|d=..|ls=..|n=..|dtype`; decode families add `|rows=..` before the dtype."""
    rows = ""
    if family in DECODE_FAMILIES:
        if shape.rows is None:
            raise ValueError(f"a {family} bucket needs the shape's rows (B x n x Hkv)")
        rows = f"|rows={t_bucket(shape.rows)}"
    return (f"{family}|T={t_bucket(shape.seqlen)}|G={shape.group}|Dk={shape.head_dim}|Dv={shape.head_dim_v}"
            f"|l={shape.cmp_block}|d={shape.cmp_stride}|ls={shape.slc_block}|n={shape.slc_topn}{rows}|{shape.dtype}")


def _split_key(key: str) -> tuple[str, int, int | None] | None:
    """(key with T and rows removed, T, rows or None) or None when the key is not ours: ten parts, or eleven with
    `rows=` before the dtype; T and rows >= 1."""
    parts = key.split("|")
    rows = None
    if len(parts) == 11 and parts[9].startswith("rows="):
        rows, parts = parts[9][5:], parts[:9] + parts[10:]
    if len(parts) != 10 or not parts[1].startswith("T="):
        return None
    try:
        t, rows = int(parts[1][2:]), None if rows is None else int(rows)
    except ValueError:
        return None
    if t < 1 or (rows is not None and rows < 1):  # log2 of them must not raise in a lookup
        return None
    return "|".join(parts[:1] + parts[2:]), t, rows


MAX_T_RATIO = 4
MAX_ROWS_RATIO = 4


def nearest_entry(entries: dict, key: str) -> tuple[str, dict] | None:
    """The exact entry, else the one equal but for T (and rows) with the nearest log2 T (plus log2 rows) within a
    factor MAX_T_RATIO (and MAX_ROWS_RATIO); ties to the larger rows, then the larger T."""
    if key in entries:
        return key, entries[key]
    split = _split_key(key)
    if split is None:
        return None
    rest, t, rows = split
    best = None
    for other, entry in entries.items():
        split = _split_key(other)
        if split is None or split[0] != rest or (split[2] is None) != (rows is None):
            continue
        dt = abs(math.log2(split[1]) - math.log2(t))
        drows = 0.0 if rows is None else abs(math.log2(split[2]) - math.log2(rows))
        if dt > math.log2(MAX_T_RATIO) or drows > math.log2(MAX_ROWS_RATIO):
            continue
        dist = (dt + drows, -(split[2] or 0), -split[1])
        if best is None or dist < best[0]:
            best = (dist, other, entry)
    return None if best is None else (best[1], best[2])


# ----------------------------------------------------------------------------------------------------------------
# Loading (cached per process)
# ----------------------------------------------------------------------------------------------------------------

_files: dict[str, dict | None] = {}
_memos: dict[tuple, object] = {}
_warned: set[str] = set()


def clear_cache() -> None:
    _files.clear()
    _memos.clear()
    _warned.clear()


def memoized(key: tuple, compute):
    """compute(), once per `key` and cache directories for the process, forgotten by `clear_cache`: each
    `lookup`, and answers built from several lookups (`NSAParams.resolve`)."""
    memo = (*key, os.environ.get(ENV_DIR), os.environ.get("XDG_CACHE_HOME"))
    if memo not in _memos:
        _memos[memo] = compute()
    return _memos[memo]


def _warn_once(tag: str, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _log_once(tag: str, level: int, message: str) -> None:
    if tag not in _warned:
        _warned.add(tag)
        log.log(level, message)


def validate(data, device: str) -> str | None:
    """Why `data` is not a cache file for `device` (None when it is)."""
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict) or not isinstance(data.get("entries"),
                                                                                              dict):
        return 'not {"meta": {...}, "entries": {...}}'
    meta_device = data["meta"].get("device")
    if meta_device != device:
        return f"written for device {meta_device!r}, not {device!r}"
    for key, entry in data["entries"].items():
        split, family = _split_key(key), key.split("|")[0]
        if split is None or family not in ALL_FAMILIES or (split[2] is not None) != (family in DECODE_FAMILIES):
            return f"unknown entry key {key!r}"
        if not isinstance(entry, dict) or not isinstance(entry.get("params"), dict):
            return f"entry {key!r} has no params dict"
    return None


def load_file(path: Path, device: str) -> dict | None:
    """The file's contents when it is a valid cache for `device`; None (with one warning) when it is not."""
    path = Path(path)
    cache_key = f"{path}|{device}"
    if cache_key in _files:
        return _files[cache_key]
    data = None
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            problem = validate(data, device)
        except (OSError, ValueError) as e:
            problem = f"unreadable: {e}"
        if problem:
            _warn_once(f"file:{path}", f"nsa config cache {path} ignored: {problem}")
            data = None
    _files[cache_key] = data
    return data


def read_file(path, device: str | None = None) -> dict:
    """A cache file's contents for the tools that own one file (`nsa tune` resuming, `nsa cache merge`):
    ValueError naming the file and the reason when it is not a cache (for `device`, when given, else for the
    device its meta names). Lookups use `load_file`, which warns and ignores instead."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable: {e}") from e
    if device is None:
        meta = data.get("meta") if isinstance(data, dict) else None
        device = meta.get("device") if isinstance(meta, dict) else None
        if not isinstance(device, str):
            raise ValueError(f"{path}: its meta names no device")
    problem = validate(data, device)
    if problem:
        raise ValueError(f"{path}: {problem}")
    return data


def lookup(family: str, shape: Shape, device: str):
    """The cached params (a params dataclass) of `family` for `shape` on `device`, or None: see the module doc."""
    return memoized(("lookup", family, shape, device), lambda: _lookup(family, shape, device))


def _lookup(family: str, shape: Shape, device: str):
    key = bucket_key(family, shape)
    found, any_file = None, False
    for source, root in search_dirs():
        path = config_path(device, root)
        data = load_file(path, device)
        if data is None:
            continue
        any_file = True
        hit = nearest_entry(data["entries"], key)
        if hit is None:
            continue
        hit_key, entry = hit
        try:
            found = params_class(family)(**entry["params"])
        except (TypeError, ValueError) as e:
            _warn_once(f"entry:{path}:{hit_key}", f"nsa config cache {path}: entry {hit_key} ignored: {e}")
            continue
        near = "" if hit_key == key else f" (nearest T{'/rows' if shape.rows else ''} bucket for {key})"
        log.info("nsa config: %s from %s %s%s", hit_key, source, path, near)
        break
    if found is None:
        if any_file:
            _log_once(f"miss:{device}:{key}", logging.WARNING,
                      f"nsa config: no tuned entry for {key} on {device}; using the default heuristic")
        else:
            _log_once(f"nofile:{device}", logging.INFO,
                      f"nsa config: no config cache for {device}; using the default heuristics")
    return found


def in_use(device: str) -> list[tuple[str, Path, dict | None]]:
    """(source, path, contents or None) of every folder in lookup order, for `nsa tune --show`."""
    return [(source, config_path(device, root), load_file(config_path(device, root), device))
            for source, root in search_dirs()]


# ----------------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------------


def write_atomic(path: Path, data: dict) -> None:
    """Write JSON to a temp file beside `path`, then os.replace: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            ordered = {"meta": data["meta"], "entries": dict(sorted(data["entries"].items()))}
            json.dump(ordered, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    clear_cache()
