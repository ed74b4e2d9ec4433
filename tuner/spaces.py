"""Search spaces: the field ranges each kernel module declares beside its params (SEARCH_SPACE,
BACKWARD_SEARCH_SPACE, and smaller INTERPRETER_ ones), pruned by named predicates from the device's limits.

A candidate is the family's `default_params` for the shape with the declared fields replaced (fields not
declared keep their default). A family searches its forward kernel's fields; `<family>_bwd` (BACKWARD_FAMILIES)
searches the same params class's backward fields, from the same default. Candidates the params dataclass itself
rejects (powers of two, tl.dot's 16) are dropped and counted as "invalid"; the predicates prune forward tiles
(a backward tile that does not fit fails to compile, and is recorded as an error) and the selected dk/dv list
chunks too short for the sequence.
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


def declared_space(family: str, interpreter: bool) -> dict:
    """The field ranges the family's kernel module declares beside its params: SEARCH_SPACE, or
    BACKWARD_SEARCH_SPACE for a `<family>_bwd`; the INTERPRETER_ ones under the Triton interpreter."""
    module = importlib.import_module(ALL_FAMILIES[family][0])
    name = "BACKWARD_SEARCH_SPACE" if family in BACKWARD_FAMILIES else "SEARCH_SPACE"
    return getattr(module, f"INTERPRETER_{name}" if interpreter else name)


def parse_field(field: str) -> tuple[str, list | None]:
    """A `--fields` item: "name" (the declared range) or "name=v1/v2/..." (those values: ints, or true/false)."""
    name, sep, text = field.partition("=")
    if not sep:
        return name, None
    values = []
    for item in text.split("/"):
        if item.lower() in ("true", "false"):
            values.append(item.lower() == "true")
        else:
            try:
                values.append(int(item))
            except ValueError:
                raise ValueError(f"--fields {field}: values are ints or true/false, separated by '/'") from None
    return name, values


def _owns(family: str, name: str) -> bool:
    """Whether `family` times the params field `name`: a forward family and its `_bwd` family share one params
    class, the forward kernel's fields (fwd_*) belong to the first and the others to the second."""
    if family in BACKWARD_FAMILIES:
        return not name.startswith("fwd_")
    if f"{family}_bwd" in ALL_FAMILIES:
        return name.startswith("fwd_")
    return True


def field_space(family: str, fields, interpreter: bool | None = None) -> dict:
    """The ranges of those of `fields` that the family searches (empty when it searches none): a plain name takes
    its declared range, where the family declares one; "name=v1/v2" takes those values for any field of the
    family's params that its kernels use (`_owns`; one outside the declared space too, e.g. a tile size for a
    one-off A/B)."""
    from nsa.kernels.runtime import interpreting
    declared = declared_space(family, interpreting() if interpreter is None else interpreter)
    names = {f.name for f in dataclasses.fields(params_class(family))}
    space = {}
    for field in fields:
        name, values = parse_field(field)
        if values is None and name in declared:
            space[name] = declared[name]
        elif values is not None and name in names and _owns(family, name):
            space[name] = values
    return space


def space_hash() -> str:
    """Identifies the declared spaces and predicates (stored in a cache's meta)."""
    declared = [{family: declared_space(family, interpreter) for family in ALL_FAMILIES} for interpreter in (0, 1)]
    text = json.dumps([*declared, [name for name, _, _ in PREDICATES]], sort_keys=True)
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
    if props is None:
        return True
    if isinstance(params, params_class("selection")):
        # The fp32 score tile, rows x (chunk of selection blocks x their compressed blocks), per thread. On an
        # H200 at 64k every selection candidate above 192 was slower than the best (21.1 ms): 512 rows on 4 warps
        # 26.4 ms, 256 rows on 2 warps 40-56 ms, 512 rows on 2 warps 710-890 ms.
        from nsa.kernels.selection import block_width, chunk_width
        columns = chunk_width(config) * block_width(config)
        return _rows(params, shape) * columns / (32 * params.num_warps) <= 192
    if not hasattr(params, "fwd_block_n"):
        return True
    dv = triton.next_power_of_2(max(16, shape.head_dim_v))
    threads = 32 * params.fwd_num_warps
    # fp32 accumulator rows x Dv plus the rows x block_n score tile, per thread; 255 registers is the ceiling.
    per_thread = _rows(params, shape) * (dv + params.fwd_block_n) / threads
    return per_thread <= 192


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
    ("registers", "accumulator + score tile (selection: score tile) above ~192 fp32 registers per thread spills",
     _registers_ok),
    ("tma_flag_once_when_inverted", "the inverted selected kernels read K/V without TMA: their candidates keep the "
     "TMA flag off only, not a second, identical candidate with it on",
     lambda p, s, d, c: not any(getattr(p, f"{k}_inverted", False) and getattr(p, f"{k}_tma", False)
                                for k in ("fwd", "dq"))),
    ("position_splits_once", "with one dk/dv split both ways of cutting the runs are the same kernel work: keep "
     "the candidate with position splits off",
     lambda p, s, d, c: not getattr(p, "dkdv_position_splits", False) or p.dkdv_splits > 1),
    ("dkdv_chunk_fits_length", "a selected dk/dv list chunk under min(1024, T/16) positions cuts the lists into "
     "more items and fp32 partial slots than a long sequence gains from (64 KB a slot at the paper shape)",
     lambda p, s, d, c: not hasattr(p, "dkdv_chunk") or p.dkdv_chunk >= min(1024, s.seqlen // 16)),
)


def device_properties(device):
    dev = torch.device(device)
    return torch.cuda.get_device_properties(dev) if dev.type == "cuda" else None


def search_space(family: str, shape: Shape, config: NSAConfig, num_heads: int, num_kv_heads: int, *, device="cpu",
                 interpreter: bool | None = None, space: dict | None = None, start=None):
    """(candidates, pruned): `start` (the default when None) first, then every combination of the declared
    ranges (or of `space`) applied to it that builds a valid params object and passes every predicate; pruned
    counts the rest by predicate name."""
    from nsa.kernels.runtime import interpreting
    interpreter = interpreting() if interpreter is None else interpreter
    space = space if space is not None else declared_space(family, interpreter)
    cls = params_class(family)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(space) - names
    if unknown:
        raise ValueError(f"search space of {family} names fields {sorted(unknown)} that {cls.__name__} lacks")
    first = start if start is not None else default_for(family, shape, config, num_heads, num_kv_heads, device)
    props = device_properties(device)
    candidates, seen, pruned = [first], {first}, {}
    for values in itertools.product(*space.values()):
        fields = dict(zip(space, values))
        try:
            cand = dataclasses.replace(first, **fields)
            if family == "decode":
                # Each split count cut to the cache's tiles of work, so a short cache searches the splits it can
                # use: at 8k the importance has 2 chunks, and ranges that start at 4 would leave only the default.
                cand = importlib.import_module(ALL_FAMILIES[family][0]).fit_splits(cand, config, shape.seqlen)
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
