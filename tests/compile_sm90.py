"""Compile, without a GPU, the kernels that the shipped config caches select and the defaults take, for the GPU
each cache was tuned on: `python tests/compile_sm90.py [CACHE.json ...]` (run by test_compile_sm90.py).

Run without TRITON_INTERPRET. Triton's active driver is replaced by one that names the GPU (compute capability
from the cache's meta), and every launch goes through JITFunction's warm-up path: it compiles to a cubin and
launches nothing. The launchers' host code runs on small CPU tensors (`runtime.COMPILE_ONLY_CAPABILITY`) and
nothing is computed, so inputs only need valid shapes and indices. A kernel that the interpreter runs but the
GPU compiler rejects (a tl.dot under 16, a constexpr reassigned in a loop) or that asks for more shared memory
than the GPU has fails here; so does a product of fp32 tensors rounded to TF32 (none of ours asks for one, but
Triton turns sum(a[:, :, None] * b[None, :, :], 1) into a TF32 tl.dot on its own). Prints one line per family
and params; exits 1 after any failure.
`--part I/N` does every N-th check from the I-th (0-based), for N processes in parallel.

Each kernel's size (registers, bytes of register spills, SASS instructions, read with Triton's cuobjdump) is
checked against sm90_kernel_sizes.json, recorded with the same Triton: a kernel whose spills grow by more than
64 bytes or whose SASS grows by more than 30% fails, a cheap sign of a slower kernel (session 12's exact shift in
the selection doubled its SASS and its time at G=4 on an H200, and no GPU had timed it). After a change that
was timed on a GPU, record the new sizes with `--write-sizes` (one process, every check).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import NamedTuple

import torch
import triton
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

REPO = Path(__file__).resolve().parents[1]
SEQLEN = 256  # tokens per training call: their kernels' constexprs do not depend on T
SHARED_MEMORY = {(9, 0): 227 * 1024, (8, 0): 163 * 1024}  # opt-in shared memory per block
TF32_PRODUCT = re.compile(r"tt\.dot .*inputPrecision = tf32 : tensor<[0-9x]+xf32>")  # fp32 operands, TF32 products
SIZES = Path(__file__).with_name("sm90_kernel_sizes.json")
SPILL_SLACK, SASS_GROWTH = 64, 1.3
RESOURCES = re.compile(rb"REG:(\d+) STACK:(\d+)")
SASS_INSTRUCTION = re.compile(rb"/\*[0-9a-f]{4,}\*/\s+\S")  # an instruction's address, then its text

# Kernels whose outputs host code then indexes with get a valid value in place of the one not computed: the
# selections' sort keys all say "empty slot" (num_keys).
PLACEHOLDER_OUTPUTS = {"selection_keys_kernel": lambda _indices, _tok_seq, _cu_blocks, keys, _token0, _entries,
                       num_keys: keys.fill_(num_keys)}

runtime = importlib.import_module("nsa.kernels.runtime")
cache = importlib.import_module("nsa.tuner.cache")
from nsa.config import NSAConfig  # noqa: E402
from nsa.kernels import (KVCache, combine_branches, compressed_attention, nsa_decode, select_blocks,  # noqa: E402
                         selected_attention, window_attention)
from nsa.kernels.combine import combine_bwd_for_branches, default_params as combine_default_params  # noqa: E402


class CompileOnlyDriver:
    """What JITFunction asks of the active driver when it compiles."""

    def __init__(self, capability):
        self.target = GPUTarget("cuda", capability[0] * 10 + capability[1], 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


class Kernel(NamedTuple):
    name: str
    warps: int
    shared: int
    tf32_products: int
    cubin: bytes

    def size(self) -> tuple[int, int, int]:
        """(registers, stack bytes (register spills), SASS instructions), read with the cuobjdump Triton ships."""
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(self.cubin)
            f.flush()
            usage, sass = (subprocess.check_output([knobs.nvidia.cuobjdump.path, *flags, f.name],
                                                   stderr=subprocess.DEVNULL)
                           for flags in (["--dump-resource-usage"], ["-sass"]))
        registers, stack = (int(v) for v in RESOURCES.search(usage).groups())
        return registers, stack, len(SASS_INSTRUCTION.findall(sass))


class Compiled:
    """Every kernel compiled since the last `take`."""

    def __init__(self):
        self.kernels = []
        self._run = JITFunction.run
        recorder = self

        def compile_only(jit_fn, *args, grid, warmup, **kwargs):
            kernel = recorder._run(jit_fn, *args, grid=grid, warmup=True, **kwargs)
            recorder.kernels.append(Kernel(jit_fn.fn.__name__, kernel.metadata.num_warps, kernel.metadata.shared,
                                           len(TF32_PRODUCT.findall(kernel.asm["ttir"])), kernel.asm["cubin"]))
            if jit_fn.fn.__name__ in PLACEHOLDER_OUTPUTS:
                PLACEHOLDER_OUTPUTS[jit_fn.fn.__name__](*args)
            return kernel

        JITFunction.run = compile_only

    def take(self):
        kernels, self.kernels = self.kernels, []
        return kernels


def parse_key(key: str) -> dict:
    """family|T=..|G=..|Dk=..|Dv=..|l=..|d=..|ls=..|n=..|(rows=..|)dtype as a dict (family, G, Dk, ... dtype)."""
    parts = key.split("|")
    fields = dict(part.split("=", 1) for part in parts[1:-1])
    return dict(family=parts[0], dtype=getattr(torch, parts[-1]), **{k: int(v) for k, v in fields.items()})


def run_family(family: str, shape: dict, params) -> None:
    """One call of the family's public function (forward and backward for a `_bwd` family and for combine, which
    has no separate backward family) at SEQLEN tokens, 4 kv heads."""
    dtype, group, dk, dv = shape["dtype"], shape["G"], shape["Dk"], shape["Dv"]
    config = NSAConfig(cmp_block=shape["l"], cmp_stride=shape["d"], slc_block=shape["ls"], slc_topn=shape["n"])
    kv_heads, heads, t = 4, 4 * group, SEQLEN
    grad = family.endswith("_bwd") or family == "combine"

    def x(*size):
        return torch.randn(*size, dtype=dtype).requires_grad_(grad)

    if family == "decode":
        # The cache's capacity is the bucket's T: the top-n's tile spans it. Uninitialised (nothing is computed).
        batch, t = max(1, shape["rows"] // kv_heads), shape["T"]
        tc = config.num_cmp_blocks(t)
        kv = KVCache.from_tensors(*(torch.empty(batch, n, kv_heads, d, dtype=dtype)
                                    for n, d in ((t, dk), (t, dv), (tc, dk), (tc, dv))), config)
        gates = [torch.rand(batch, 1, heads, dtype=dtype) for _ in range(3)]
        nsa_decode(x(batch, 1, heads, dk), kv, *gates, config, params=params)
        return
    q = x(1, t, heads, dk)
    if family.startswith("compression"):
        tc = config.num_cmp_blocks(t)
        out = compressed_attention(q, x(1, tc, kv_heads, dk), x(1, tc, kv_heads, dv), config, params=params)
    elif family == "selection":
        tc = config.num_cmp_blocks(t)
        select_blocks(q, x(1, tc, kv_heads, dk), config, lse=torch.zeros(1, heads, t), params=params)
        return
    elif family.startswith("selected"):
        # The first blocks each query can see: ascending, causal, -1 padded.
        slot = torch.arange(config.slc_topn)
        current = torch.arange(t)[:, None] // config.slc_block
        indices = torch.where(slot <= current, slot, -1).to(torch.int32)
        indices = indices[None, :, None, :].expand(1, t, kv_heads, config.slc_topn).contiguous()
        out = selected_attention(q, x(1, t, kv_heads, dk), x(1, t, kv_heads, dv), indices, config, params=params)
    elif family.startswith("window"):
        out = window_attention(q, x(1, t, kv_heads, dk), x(1, t, kv_heads, dv), config, params=params)
    elif family == "combine":
        gates = [torch.rand(1, t, heads, dtype=dtype) for _ in range(3)]
        outs = [x(1, t, heads, dv) for _ in range(3)]
        # nsa_attention's backward takes the variant that folds the gates into the branches' lse.
        combine_bwd_for_branches(torch.randn(t * heads, dv, dtype=dtype), *(o.detach().reshape(-1, dv) for o in outs),
                                 *(g.reshape(-1) for g in gates), *(torch.zeros(heads, t) for _ in range(3)),
                                 params or combine_default_params(dv))
        out = combine_branches(*outs, *gates, params=params)
    else:
        raise ValueError(f"unknown family {family}")
    if grad:
        out.backward(torch.randn_like(out))


def check(label: str, family: str, shape: dict, params, compiled: Compiled, limit: int, sizes: dict) -> bool:
    """Compile one family's kernels; False after printing why when one fails. `sizes` maps label -> kernel ->
    recorded (registers, stack, SASS); this label's measured sizes are written into it."""
    try:
        run_family(family, shape, params)
    except Exception:
        print(f"FAIL {label}: {traceback.format_exc(limit=-3)}")
        compiled.take()
        return False
    kernels = compiled.take()
    over = [(k.name, k.shared) for k in kernels if k.shared > limit]
    if over:
        print(f"FAIL {label}: shared memory over {limit} bytes: {over}")
        return False
    tf32 = [k.name for k in kernels if k.tf32_products]
    if tf32:
        print(f"FAIL {label}: fp32 products rounded to TF32 in {tf32}")
        return False
    measured = {}
    for k in kernels:  # a kernel launched twice (chunks, split launches) is kept at its largest
        measured[k.name] = [max(a, b) for a, b in zip(measured.get(k.name, (0, 0, 0)), k.size())]
    recorded, sizes[label] = sizes.get(label, {}), measured
    grown = [f"{name}: spills {stack} B (recorded {recorded[name][1]}), SASS {sass} (recorded {recorded[name][2]})"
             for name, (_, stack, sass) in measured.items() if name in recorded
             and (stack > recorded[name][1] + SPILL_SLACK or sass > recorded[name][2] * SASS_GROWTH)]
    if grown:
        print(f"FAIL {label}: kernels grew ({'; '.join(grown)}): time them on a GPU, then `--write-sizes`")
        return False
    print(f"ok   {label}: " + ", ".join(f"{k}({w}w, {s // 1024} KB, {r}r, {st} B spilled, {n} SASS)"
                                      for k, w, s, (r, st, n) in
                                      ((k.name, k.warps, k.shared, measured[k.name]) for k in kernels)))
    return True


# The defaults' branches: inverted (G <= 4) and gathering kernels in 16 bits, and the fp32 tiles.
DEFAULT_SHAPES = [dict(G=g, Dk=128, Dv=128, l=32, d=16, ls=64, n=16, dtype=dtype)
                  for g, dtype in ((1, torch.bfloat16), (4, torch.bfloat16), (16, torch.bfloat16),
                                   (16, torch.float32))]


def main(paths, part: int = 0, parts: int = 1, write_sizes: bool = False) -> int:
    ok, index = True, -1
    recorded = json.loads(SIZES.read_text()) if SIZES.exists() else {}
    if recorded.get("triton") != triton.__version__:  # other compilers, other sizes: nothing to compare
        print(f"note: {SIZES.name} was recorded with Triton {recorded.get('triton')}, this is {triton.__version__}: "
              "sizes not compared")
        recorded = {}
    sizes = {} if write_sizes else recorded.get("kernels", {})

    def mine() -> bool:
        nonlocal index
        index += 1
        return index % parts == part

    for path in paths:
        data = json.loads(Path(path).read_text())
        major, minor = (int(v) for v in str(data["meta"]["compute_capability"]).split("."))
        capability = (major, minor)
        driver.set_active(CompileOnlyDriver(capability))
        runtime.COMPILE_ONLY_CAPABILITY = capability
        limit = SHARED_MEMORY.get(capability, 99 * 1024)
        compiled = Compiled()
        seen = set()
        for key, entry in sorted(data["entries"].items()):
            shape = parse_key(key)
            family = shape["family"]
            params_class = cache.params_class(family)
            params = params_class(**entry["params"])
            if family == "decode":
                dedup = key
            elif family.endswith("_bwd"):
                dedup = (family, json.dumps(entry["params"], sort_keys=True), shape["G"], shape["Dk"], shape["Dv"])
            else:
                dedup = (family, json.dumps(entry["params"], sort_keys=True), shape["G"], shape["Dk"], shape["Dv"],
                         shape["l"], shape["d"], shape["ls"], shape["n"])
            if dedup in seen:
                continue
            seen.add(dedup)
            if not mine():
                continue
            ok &= check(f"{Path(path).name} {key}", family, shape, params, compiled, limit, sizes)
        # The defaults (what runs without a cache entry), forward and backward of every training family.
        for shape in DEFAULT_SHAPES:
            for family in ("compression_bwd", "selection", "selected_bwd", "window_bwd", "combine"):
                if not mine():
                    continue
                label = f"default {family} G={shape['G']} {shape['dtype']}"
                ok &= check(label, family, shape, None, compiled, limit, sizes)
    if write_sizes:  # one line per label, so a diff shows which kernels moved
        rows = ",\n".join(f"  {json.dumps(label)}: {json.dumps(sizes[label], sort_keys=True)}" for label in sorted(sizes))
        SIZES.write_text(f'{{\n "triton": "{triton.__version__}",\n "kernels": {{\n{rows}\n }}\n}}\n')
    return 0 if ok else 1


if __name__ == "__main__":
    if runtime.interpreting():
        sys.exit("run without TRITON_INTERPRET: the kernels must compile, not be interpreted")
    args = sys.argv[1:]
    part, parts = 0, 1
    write_sizes = "--write-sizes" in args
    args = [a for a in args if a != "--write-sizes"]
    if args[:1] == ["--part"]:
        part, parts = (int(v) for v in args[1].split("/"))
        args = args[2:]
    if write_sizes and parts > 1:
        sys.exit("--write-sizes records every check: run it in one process, without --part")
    sys.exit(main(args or sorted(str(p) for p in (REPO / "tuner" / "configs").glob("*.json")), part, parts,
                  write_sizes))
