"""A results folder: `results.csv` (one row per suite x problem x implementation, full precision) and
`environment.json` (the machine, the measured ceilings, the settings).

The CSV is rewritten whole, through a temporary file and an atomic rename, after every row: an interrupted run
loses at most the row in progress, and a rerun into the same folder skips the rows already there. Derived
columns (speedup against each baseline) are recomputed on every write from the measured ones.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

RESULTS_CSV = "results.csv"
ENVIRONMENT_JSON = "environment.json"

# What every row has, in this order; `speedup_vs_<baseline>` columns follow, one per baseline present.
COLUMNS = (
    "gpu", "suite", "problem", "impl", "baseline", "op", "dtype", "T", "batch", "Hq", "Hkv", "D", "Dv",
    "sequences", "seqlens", "config", "impl_config", "impl_detail",
    "verdict", "error", "checked", "max_rel_err", "allowed_rel_err",
    "ms", "ms_p20", "ms_p80", "reps", "timer",
    "tflop", "tflops", "frac_matmul_peak", "gbytes", "gbps", "frac_copy_bw", "peak_mem_gib",
)
KEY = ("suite", "problem", "impl")
# pass: matched its oracle and was timed; fail: did not match (not timed); error: raised; oom: out of memory;
# skip: not run (provider unavailable here, or the problem is outside what it implements).
VERDICTS = ("pass", "fail", "error", "oom", "skip")
SPEEDUP_PREFIX = "speedup_vs_"


def with_speedups(table: pd.DataFrame) -> pd.DataFrame:
    """`table` with a `speedup_vs_<b>` column per baseline b: b's ms / this row's ms on the same problem.

    Only rows that passed their check take part: a failed or missing row has no speedup, in either role.
    """
    table = table.drop(columns=[c for c in table.columns if c.startswith(SPEEDUP_PREFIX)])
    if table.empty:
        return table
    passed = table["verdict"] == "pass"
    ms = table["ms"].where(passed)
    keys = pd.MultiIndex.from_frame(table[["suite", "problem"]])
    for baseline in table.loc[table["baseline"].astype(bool), "impl"].unique():
        rows = table[passed & (table["impl"] == baseline)]
        baseline_ms = rows.set_index(["suite", "problem"])["ms"].reindex(keys).to_numpy()
        table[SPEEDUP_PREFIX + baseline] = baseline_ms / ms.to_numpy()
    return table


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ResultsStore:
    """The rows and environment of one results folder, loaded if it exists."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self.csv_path = self.folder / RESULTS_CSV
        self.environment_path = self.folder / ENVIRONMENT_JSON
        self.rows: list[dict] = []
        if self.csv_path.exists():
            table = pd.read_csv(self.csv_path, keep_default_na=False, na_values=[""])
            self.rows = table[[c for c in table.columns if not c.startswith(SPEEDUP_PREFIX)]].to_dict("records")
        self._done = {tuple(row[k] for k in KEY) for row in self.rows}

    def has(self, suite: str, problem: str, impl: str) -> bool:
        return (suite, problem, impl) in self._done

    def add(self, row: dict) -> None:
        """Append a row (it must have every column of COLUMNS) and rewrite the CSV."""
        self.extend([row])

    def extend(self, rows: list[dict]) -> None:
        """Append rows (each with every column of COLUMNS) and rewrite the CSV once."""
        for row in rows:
            missing = [c for c in COLUMNS if c not in row]
            if missing:
                raise ValueError(f"result row lacks columns {missing}")
        for row in rows:
            self.rows.append(row)
            self._done.add(tuple(row[k] for k in KEY))
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.csv_path, self.table().to_csv(index=False))

    def table(self) -> pd.DataFrame:
        """All rows with the derived speedup columns."""
        return with_speedups(pd.DataFrame(self.rows, columns=list(COLUMNS)))

    def environment(self) -> dict | None:
        if not self.environment_path.exists():
            return None
        return json.loads(self.environment_path.read_text())

    def write_environment(self, environment: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.environment_path, json.dumps(environment, indent=2, default=str) + "\n")


def merge_folders(target, sources) -> int:
    """Add the rows of the results folders `sources` to `target` (created if new; a row it has is kept): the
    parts of one job run on several cards of one kind, e.g. one op per GPU so that each problem's baselines
    still ran on the same card as nsa. Folders from another GPU are refused. The environment is the first
    folder's, and lists every part's environment (its card index and measured ceilings) under "parts".
    Returns the number of rows added."""
    store = ResultsStore(target)
    parts = [ResultsStore(folder) for folder in sources]
    for part in parts:
        if not part.csv_path.exists():
            raise FileNotFoundError(f"{part.folder} has no {RESULTS_CSV}")
    environments = [env for env in [store.environment(), *(p.environment() for p in parts)] if env]
    gpus = {env.get("gpu") for env in environments} | {row["gpu"] for p in [store, *parts] for row in p.rows}
    if len(gpus) > 1:
        raise ValueError(f"these folders hold results of different GPUs ({', '.join(sorted(map(str, gpus)))}): "
                         "a report compares implementations on one kind of card")
    new = {}
    for part in parts:
        for row in part.rows:
            key = tuple(row[k] for k in KEY)
            if not store.has(*key):
                new.setdefault(key, row)
    if environments:
        merged = dict(environments[0])
        merged["parts"] = merged.get("parts", []) + [
            {"folder": str(p.folder), **{k: v for k, v in (p.environment() or {}).items() if k != "parts"}}
            for p in parts]
        store.write_environment(merged)
    store.extend(list(new.values()))
    return len(new)
