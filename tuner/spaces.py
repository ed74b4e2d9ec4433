"""Search spaces: declared ranges of each family's kernel params, pruned by named predicates.

A candidate is the family's `default_params` for the shape with the declared fields replaced (fields not
declared keep their default). A family searches its forward kernel's fields; `<family>_bwd` (BACKWARD_FAMILIES)
searches the same params class's backward fields, from the same default. Candidates the params dataclass itself
rejects (powers of two, tl.dot's 16) are dropped and counted as "invalid"; the predicates prune forward tiles
only (a backward tile that does not fit fails to compile, and is recorded as an error).

Decode searches the split-K of its launches, which is what depends on the GPU and the step's rows; its launches
run one after another, so the splits of each mostly act alone, and the ranges stay short (a product of them).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import itertools
import json

import torch
import triton

from nsa.config import NSAConfig
from nsa.tuner.cache import ALL_FAMILIES, BACKWARD_FAMILIES, Shape, params_class

# Declared ranges per family (GPU). Each field must be a field of the family's params dataclass.
SPACES = {
    "compression": dict(fwd_block_m=[8, 16, 32, 64, 128], fwd_block_n=[16, 32, 64, 128], fwd_num_warps=[4, 8],
                        fwd_num_stages=[1, 2, 3]),
    "selection": dict(block_m=[1, 2, 4, 8, 16, 32], num_warps=[2, 4, 8]),
    "selected": dict(fwd_block_t=[1, 2, 4, 8, 16], fwd_block_n=[16, 32, 64, 128], fwd_num_warps=[4, 8],
                     fwd_num_stages=[1, 2, 3]),
    "window": dict(fwd_block_m=[16, 32, 64, 128], fwd_block_n=[16, 32, 64, 128], fwd_num_warps=[4, 8],
                   fwd_num_stages=[1, 2, 3]),
    "combine": dict(block_r=[8, 16, 32, 64], num_warps=[2, 4, 8]),
    # Backward kernels (timed with their family's forward at its default, which every candidate shares). Short
    # products: the dk/dv and dq kernels of a family run one after the other and mostly act alone.
    # The H200 tune picked the smallest key tile (32) of 32/64/128 at every length: more dk/dv programs for the
    # triangular load. dkdv_splits gives more programs without shrinking the tile.
    "compression_bwd": dict(dkdv_block_n=[16, 32, 64], dkdv_num_warps=[4, 8], dkdv_splits=[1, 2, 4, 8]),
    "selected_bwd": dict(dkdv_block_t=[2, 4, 8], dkdv_chunk=[1024, 4096]),
    "window_bwd": dict(dkdv_block_m=[8, 16, 32], dq_block_m=[8, 16, 32]),
    # 3 x 2 x 3 x 2 = 36 besides the default, fewer for short caches (splits_fit_tiles): a whole paper-suite
    # decode tune stays a few minutes. An H200 sweep at 64k found the splits of one launch within a few percent.
    "decode": dict(cmp_splits=[4, 16, 64], importance_splits=[4, 16], slc_splits=[2, 4, 16], win_splits=[2, 8]),
}

# The interpreter ignores warps and stages and pays per program: a few tile sizes only (CI runs these).
INTERPRETER_SPACES = {
    "compression": dict(fwd_block_n=[16, 64]),
    "selection": dict(block_m=[8, 16]),
    "selected": dict(fwd_block_n=[16, 32]),
    "window": dict(fwd_block_n=[32, 64]),
    "combine": dict(block_r=[16, 64]),
    "compression_bwd": dict(dkdv_block_n=[16, 64], dkdv_splits=[2]),
    "selected_bwd": dict(dkdv_chunk=[64, 4096]),
    "window_bwd": dict(dkdv_block_n=[16, 64]),
    # With the default (2 splits each): 3 candidates, one with a non-power-of-two split count (padded merges).
    "decode": dict(cmp_splits=[1], importance_splits=[1], slc_splits=[1, 3]),
}


def space_hash() -> str:
    """Identifies the declared spaces and predicates (stored in a cache's meta)."""
    text = json.dumps([SPACES, INTERPRETER_SPACES, [name for name, _, _ in PREDICATES]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_for(family: str, shape: Shape, config: NSAConfig, num_heads: int, num_kv_heads: int, device=None):
    """The family's untuned default for the shape (what NSAParams.resolve, or nsa_decode, falls back to; decode's
    depends on the device's SM count: `device`, the current CUDA device by default)."""
    dtype = getattr(torch, shape.dtype)
    family = BACKWARD_FAMILIES.get(family, family)  # a backward search starts from the family's default
    kernels = {f: importlib.import_module(module) for f, (module, _) in ALL_FAMILIES.items()}
    heads = (num_heads, num_kv_heads)
    if family == "decode":
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        return kernels[family].default_params_for_rows(shape.rows, config, shape.seqlen, device)
    dk, dv = shape.head_dim, shape.head_dim_v
    if family == "compression":
        return kernels[family].default_params(*heads, dk, dv, dtype=dtype)
    if family == "selection":
        return kernels[family].default_params(*heads, dk, config, dtype=dtype)
    if family == "selected":
        return kernels[family].default_params(config, *heads, dk, dv, dtype=dtype)
    if family == "window":
        return kernels[family].default_params(*heads, dk, dv, config, dtype=dtype)
    return kernels[family].default_params(dv)


# ----------------------------------------------------------------------------------------------------------------
# Pruning predicates: (name, reason, keep(params, shape, device_props, config) -> bool); device_props None off
# GPU.
# ----------------------------------------------------------------------------------------------------------------


def _rows(params, shape: Shape) -> int:
    if hasattr(params, "cmp_splits"):  # decode: the group's heads, padded to tl.dot's 16 by the launcher
        return max(16, triton.next_power_of_2(shape.group))
    if hasattr(params, "fwd_block_t"):
        return max(16, triton.next_power_of_2(params.fwd_block_t * shape.group))
    if hasattr(params, "fwd_block_m"):
        return params.fwd_block_m * params.fwd_block_h
    if hasattr(params, "block_h"):
        return params.block_m * params.block_h
    return params.block_r


def _block_n(params) -> int:
    return getattr(params, "fwd_block_n", 16)


def _bytes(shape: Shape) -> int:
    return torch.empty(0, dtype=getattr(torch, shape.dtype)).element_size()


def _smem_ok(params, shape, props, config) -> bool:
    if props is None or not hasattr(params, "fwd_block_n"):
        return True
    limit = getattr(props, "shared_memory_per_block_optin", 0) or 227 * 1024
    dk, dv = (triton.next_power_of_2(max(16, d)) for d in (shape.head_dim, shape.head_dim_v))
    stages = getattr(params, "fwd_num_stages", 1)
    need = (_rows(params, shape) * dk + stages * params.fwd_block_n * (dk + dv)) * _bytes(shape)
    return need <= limit


def _registers_ok(params, shape, props, config) -> bool:
    if props is None or not hasattr(params, "fwd_block_n"):
        return True
    dv = triton.next_power_of_2(max(16, shape.head_dim_v))
    threads = 32 * params.fwd_num_warps
    # fp32 accumulator rows x Dv plus the rows x block_n score tile, per thread; 255 registers is the ceiling.
    per_thread = _rows(params, shape) * (dv + params.fwd_block_n) / threads
    return per_thread <= 192


def _decode_splits_fit(params, shape: Shape, props, config: NSAConfig) -> bool:
    """Every split of every decode launch gets at least one tile of work in a full cache of T tokens."""
    if not hasattr(params, "cmp_splits"):
        return True
    tiles = (triton.cdiv(config.num_cmp_blocks(shape.seqlen), params.cmp_block_n),
             triton.cdiv(config.num_slc_blocks(shape.seqlen), params.importance_chunk),
             min(config.slc_topn, config.num_slc_blocks(shape.seqlen)),
             triton.cdiv(min(config.window, shape.seqlen), params.block_n))
    splits = (params.cmp_splits, params.importance_splits, params.slc_splits, params.win_splits)
    return all(s <= max(1, t) for s, t in zip(splits, tiles))


PREDICATES = (
    ("dot_dims", "tl.dot on a GPU needs M, N >= 16 (rows = positions x heads, and block_n)",
     lambda p, s, d, c: (not hasattr(p, "fwd_block_n") or p.fwd_block_n >= 16) and
     (hasattr(p, "block_r") or _rows(p, s) >= 16)),
    ("heads_fit_group", "more heads per tile than the group (rounded to a power of two) is pure masked padding",
     lambda p, s, d, c: getattr(p, "fwd_block_h", getattr(p, "block_h", 1))
     <= max(1, triton.next_power_of_2(s.group))),
    ("block_n_fits_selection_block", "a selected-attention key tile larger than l' only loads masked keys",
     lambda p, s, d, c: not hasattr(p, "fwd_block_t")
     or p.fwd_block_n <= max(16, triton.next_power_of_2(s.slc_block))),
    ("combine_covers_row", "combine's block_d is the row width (Dv rounded up); other widths only loop or mask",
     lambda p, s, d, c: not hasattr(p, "block_r") or p.block_d == min(256, triton.next_power_of_2(s.head_dim_v))),
    ("shared_memory", "q tile plus stages x K/V tiles must fit the device's shared memory per block",
     _smem_ok),
    ("registers", "accumulator + score tile above ~192 fp32 registers per thread spills",
     _registers_ok),
    ("splits_fit_tiles", "a decode split with no tile of work in a full cache is an idle program and a partial "
     "to merge", _decode_splits_fit),
)


def device_properties(device):
    dev = torch.device(device)
    return torch.cuda.get_device_properties(dev) if dev.type == "cuda" else None


def search_space(family: str, shape: Shape, config: NSAConfig, num_heads: int, num_kv_heads: int, *, device="cpu",
                 interpreter: bool | None = None, space: dict | None = None):
    """(candidates, pruned): the default first, then every combination of the declared ranges that builds a
    valid params object and passes every predicate; pruned counts the rest by predicate name."""
    from nsa.kernels.runtime import interpreting
    interpreter = interpreting() if interpreter is None else interpreter
    space = space if space is not None else (INTERPRETER_SPACES if interpreter else SPACES)[family]
    cls = params_class(family)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(space) - names
    if unknown:
        raise ValueError(f"search space of {family} names fields {sorted(unknown)} that {cls.__name__} lacks")
    default = default_for(family, shape, config, num_heads, num_kv_heads, device)
    props = device_properties(device)
    candidates, seen, pruned = [default], {default}, {}
    for values in itertools.product(*space.values()):
        fields = dict(zip(space, values))
        try:
            cand = dataclasses.replace(default, **fields)
        except (TypeError, ValueError):
            pruned["invalid"] = pruned.get("invalid", 0) + 1
            continue
        if cand in seen:
            continue
        for name, _, keep in PREDICATES:
            if not keep(cand, shape, props, config):
                pruned[name] = pruned.get(name, 0) + 1
                break
        else:
            seen.add(cand)
            candidates.append(cand)
    return candidates, pruned
