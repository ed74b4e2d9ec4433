"""How a fast result is judged against the reference: relative errors and selections that agree up to ties."""

from __future__ import annotations

import torch

from nsa.config import NSAConfig


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x has a NaN/inf (an unwritten, poisoned element fails)."""
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def selection_mismatches(block_indices: torch.Tensor, importance: torch.Tensor, config: NSAConfig, *,
                         seqlens, rtol: float = 1e-4) -> list[str]:
    """Why `block_indices` [B, T, Hkv, n] is not a valid selection for `importance` [B, T, Hkv, Ns].

    Valid means (SPEC 1.4): ascending, -1 padded, min(n, t//l' + 1) causal blocks, forced blocks present, and
    every chosen free block at least as important as every free block left out, up to `rtol` of the row's
    largest importance (two near-equal blocks may swap under rounding). `seqlens` gives each row's
    sequence-local position: a list of lengths per batch row (dense: [T] * B; varlen: the packed lengths of row 0).
    Returns human-readable problems, at most 10; empty when valid.
    """
    problems = []
    n, ls = config.slc_topn, config.slc_block
    bi, imp = block_indices.cpu().long(), importance.cpu().double()
    for b in range(bi.shape[0]):
        t_global = 0
        for length in seqlens[b]:
            for t in range(length):
                row = t_global + t
                current = t // ls
                want = min(n, current + 1)
                for h in range(bi.shape[2]):
                    chosen = bi[b, row, h]
                    where = f"b={b} row={row} (t={t}) kv head {h}: {chosen.tolist()}"
                    picked = chosen[:want]
                    if (chosen[want:] != -1).any() or (picked < 0).any() or (picked > current).any() \
                            or (picked[1:] <= picked[:-1]).any():
                        problems.append(f"{where}: want {want} ascending causal blocks then -1")
                    else:
                        forced = {j for j in range(current + 1)
                                  if j < config.init_blocks or current - j < config.local_blocks}
                        chosen_set = set(picked.tolist())
                        if not forced <= chosen_set:
                            problems.append(f"{where}: forced blocks {sorted(forced - chosen_set)} missing")
                        else:
                            row_imp = imp[b, row, h, :current + 1]
                            free_in = [j for j in chosen_set if j not in forced]
                            free_out = [j for j in range(current + 1) if j not in chosen_set]
                            if free_in and free_out:
                                tol = rtol * max(row_imp.max().item(), 1e-30)
                                worst_in = min(row_imp[j].item() for j in free_in)
                                best_out = max(row_imp[j].item() for j in free_out)
                                if worst_in < best_out - tol:
                                    problems.append(f"{where}: chose importance {worst_in:.6g} over {best_out:.6g}")
                    if len(problems) >= 10:
                        return problems
            t_global += length
    return problems


# Relative error a result may always have, by the dtype it was computed in (fp32 covers tf32-free sums).
ERROR_FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def allowed_error(ref: torch.Tensor, same_dtype_ref: torch.Tensor | None, dtype: torch.dtype,
                  factor: float = 2.0) -> float:
    """The error a kernel computing in `dtype` may have against `ref` (float64 or fp32 reference):
    `factor` times the error of the same computation done by PyTorch in that dtype, and never less than
    ERROR_FLOOR[dtype] (a fp32 PyTorch result can be exact to the last bit by luck)."""
    floor = ERROR_FLOOR[dtype]
    if same_dtype_ref is None:
        return floor
    return max(floor, factor * relative_error(same_dtype_ref, ref))


def assert_close(name: str, x: torch.Tensor, ref: torch.Tensor, allowed: float) -> float:
    """Raise AssertionError naming `name` unless relative_error(x, ref) <= allowed; returns the error."""
    err = relative_error(x, ref)
    if not err <= allowed:
        raise AssertionError(f"{name}: relative error {err:.3e} > allowed {allowed:.3e} "
                             f"(shape {tuple(x.shape)}, max abs diff {(x.double() - ref.double()).abs().max().item():.3e})")
    return err
