"""`nsa cache merge`: one cache from several runs on the same card, the fastest entry per bucket.

Caches of one card model (one device key) tuned on different hosts, days or suites are merged entry by entry:
for each bucket the entry with the smallest measured `ms` wins (an entry without a time loses to any timed one;
on a tie the earlier file wins), except that an entry from a short search (`nsa tune --fields`) that started from
the other's params beats it (`_searched_from`: that search timed both in one run, where two runs' times differ by
their hosts' spread), and one timed as CUDA-graph replays beats one timed eagerly (see `cache.entry_timing`):
their times do not compare. Each merged entry keeps where it came from in its `source`
(the file and its meta: date, git sha, triton, torch, search space, card name); an entry that already has a
`source` (from an earlier merge) keeps it. The merged meta is an ordinary cache meta: each field the sources agree
on, else None, the date of the merge, and `merged_from` listing the files. Caches of different cards are refused:
their timings say nothing about each other.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

from nsa.tuner import cache

# Meta fields a merged cache keeps when every source has the same value (else None).
SHARED_META = ("format", "device_name", "compute_capability", "sm_count", "triton", "torch", "git_sha",
               "search_space")
SOURCE_META = ("date", "git_sha", "triton", "torch", "search_space", "device_name")


class DeviceMismatch(ValueError):
    """The caches were written for different cards."""


def _rank(key: str, entry: dict) -> tuple[int, float]:
    """Smaller is better: an entry timed as CUDA-graph replays first (at short lengths an eager time is mostly
    the host's, lower times of the two do not compare), then the smaller ms (none: infinite)."""
    ms = entry.get("ms")
    eager = cache.entry_timing(key.split("|")[0], entry) == "eager"
    return int(eager), float(ms) if isinstance(ms, (int, float)) and math.isfinite(ms) else math.inf


def _searched_from(entry: dict, other: dict) -> bool:
    """`entry` came from a short search over its `fields` that started from `other`'s params (or could have: the
    two agree on every other field), so that search timed `other`'s params too, in the same run."""
    fields = entry.get("fields")
    mine, theirs = entry.get("params"), other.get("params")
    if not fields or mine is None or theirs is None:
        return False
    return all(mine.get(name) == theirs.get(name) for name in set(mine) | set(theirs) if name not in fields)


def _better(key: str, entry: dict, current: dict) -> bool:
    """Whether `entry` replaces `current` in the merge: the one searched from the other, else by `_rank`."""
    forward, backward = _searched_from(entry, current), _searched_from(current, entry)
    if forward != backward:
        return forward
    return _rank(key, entry) < _rank(key, current)


def merge(paths) -> dict:
    """The merged cache (`{"meta", "entries"}`) of the files at `paths`; ValueError when one is not a cache,
    DeviceMismatch when they are not all for the same device key."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("nothing to merge")
    datas = [cache.read_file(path) for path in paths]
    devices = {data["meta"]["device"] for data in datas}
    if len(devices) > 1:
        listing = ", ".join(f"{path} is {data['meta']['device']}" for path, data in zip(paths, datas))
        raise DeviceMismatch(f"refusing to merge caches of different cards ({listing}): tune each card on its own")
    entries: dict[str, dict] = {}
    for path, data in zip(paths, datas):
        meta = data["meta"]
        source = dict(file=str(path), **{field: meta.get(field) for field in SOURCE_META})
        for key, entry in data["entries"].items():
            entry = dict(entry)
            entry.setdefault("source", source)
            if key not in entries or _better(key, entry, entries[key]):
                entries[key] = entry
    metas = [data["meta"] for data in datas]
    meta = dict(device=devices.pop())
    for field in SHARED_META:
        values = {repr(m.get(field)) for m in metas}
        meta[field] = metas[0].get(field) if len(values) == 1 else None
    meta["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    meta["merged_from"] = [dict(file=str(path), date=m.get("date"), entries=len(data["entries"]))
                           for path, m, data in zip(paths, metas, datas)]
    return dict(meta=meta, entries=entries)


def output_path(out, device: str) -> Path:
    """Where `nsa cache merge --out` writes: a path ending in .json as is, else `<out>/<device-key>.json`
    (the user cache when `out` is None)."""
    if out is not None and str(out).endswith(".json"):
        return Path(out)
    return cache.config_path(device, out if out is not None else cache.user_dir())


def merge_into(paths, out=None) -> tuple[Path, dict, list[Path]]:
    """Merge `paths` and write the result (atomically, with the one cache writer) to `output_path(out, ...)`.
    A file already there that is not among `paths` is merged too, last, so nothing in it is lost.
    Returns (path written, merged data, the inputs as merged)."""
    paths = [Path(p) for p in paths]
    device = cache.read_file(paths[0])["meta"]["device"] if paths else None
    target = output_path(out, device)
    resolved = {p.resolve() for p in paths}
    if target.exists() and target.resolve() not in resolved:
        paths.append(target)
    data = merge(paths)
    cache.write_atomic(target, data)
    return target, data, paths
