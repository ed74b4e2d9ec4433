"""The report of a results folder: PNG plots, pandas tables and one HTML page, from the files alone.

Nothing is measured here: everything comes from `results.csv` and `environment.json`, so a report can be
re-rendered anywhere (`nsa report DIR`). Plot series come from the data: one figure pair (time, speedup) per
suite and op, one line per implementation and per combination of the fields that vary in it (batch, heads,
config letters, ...). Only rows whose check passed are plotted; the others are listed with their errors.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import ScalarFormatter

from nsa.results import ENVIRONMENT_JSON, RESULTS_CSV, SPEEDUP_PREFIX, VERDICTS, with_speedups

REPORT_HTML = "report.html"
PLOTS_DIR = "plots"
# Fields that tell series of one suite and op apart (T is the x axis), with their short names in labels.
SERIES_FIELDS = {"batch": "B", "Hq": "Hq", "Hkv": "Hkv", "D": "D", "Dv": "Dv", "sequences": "seqs", "dtype": ""}
TABLE_COLUMNS = ("suite", "problem", "impl", "verdict", "ms", "ms_p20", "ms_p80", "tflops", "frac_matmul_peak",
                 "gbps", "frac_copy_bw", "peak_mem_gib", "impl_config", "impl_detail", "checked", "error")


def load(folder) -> tuple[pd.DataFrame, dict]:
    """The results table (speedups recomputed) and the environment of a results folder."""
    folder = Path(folder)
    if not (folder / RESULTS_CSV).exists():
        raise FileNotFoundError(f"{folder} has no {RESULTS_CSV}: run `nsa bench` or `nsa run` into it first")
    table = pd.read_csv(folder / RESULTS_CSV, keep_default_na=False, na_values=[""])
    environment = json.loads((folder / ENVIRONMENT_JSON).read_text()) if (folder / ENVIRONMENT_JSON).exists() else {}
    return with_speedups(table), environment


def _field_text(value, short: str) -> str:
    if pd.isna(value):
        return ""
    if isinstance(value, float) and value.is_integer():  # ints read back from a CSV column with blanks
        value = int(value)
    return f"{short}={value}" if short else str(value)


def _config_letters(text: str) -> dict:
    """{"l": "32", "d": "16", ...} from a config label; {} for a non-NSA one ("dense causal attention")."""
    tokens = text.split()
    return dict(t.split("=", 1) for t in tokens) if tokens and all("=" in t for t in tokens) else {}


def series_labels(frame: pd.DataFrame, config_column: str) -> pd.Series:
    """Per row, what sets its series apart within `frame`: the fields and the letters of `config_column` that
    take more than one value there. A blank field is a value (a dense batch has no packed `sequences`); a blank
    config letter is not (a dense baseline has no l', yet runs the same work whatever the NSA config)."""
    fields = [(short, frame[field], frame[field].nunique(dropna=False)) for field, short in SERIES_FIELDS.items()]
    letters = pd.DataFrame([_config_letters(str(c)) for c in frame[config_column]], index=frame.index)
    fields += [(name, letters[name], letters[name].nunique()) for name in letters.columns]
    texts = [column.map(lambda v, name=name: _field_text(v, name)) for name, column, count in fields if count > 1]
    if not texts:
        return pd.Series("", index=frame.index)
    return pd.concat(texts, axis=1).agg(lambda row: " ".join(t for t in row if t), axis=1)


def _tokens_label(t: int) -> str:
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)


def _new_axes(title: str, ylabel: str, seqlens):
    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.set_title(title)
    ax.set_xlabel("T (tokens per sequence; packed: total)")
    ax.set_ylabel(ylabel)
    ax.set_xscale("log", base=2)
    ticks = sorted(set(int(t) for t in seqlens))
    ax.set_xticks(ticks, [_tokens_label(t) for t in ticks])
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def _series(frame: pd.DataFrame):
    """(impl, label) groups of `frame` in natural order (l'=32 before l'=128)."""
    def natural(key):
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", " ".join(key))]
    return sorted(frame.groupby(["impl", "label"]), key=lambda group: natural(group[0]))


def _points(rows: pd.DataFrame, columns) -> pd.DataFrame:
    """One point per T: rows of one series that differ only in what this implementation ignores (a dense
    baseline across NSA configs) are the same work measured again; their median is plotted."""
    return rows.groupby("T")[list(columns)].median().sort_index()


def _finish(fig, ax, path: Path) -> None:
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path)


def plot_times(frame: pd.DataFrame, title: str, path: Path) -> list[str]:
    """Median ms vs T, log-log, one line per (impl, series) with a p20-p80 band. Returns the series plotted."""
    fig, ax = _new_axes(title, "ms per call (median, p20-p80 band)", frame["T"])
    ax.set_yscale("log")
    names = []
    for (impl, label), rows in _series(frame):
        points = _points(rows, ("ms", "ms_p20", "ms_p80"))
        name = f"{impl} {label}".strip()
        line, = ax.plot(points.index, points["ms"], marker="o", label=name)
        ax.fill_between(points.index, points["ms_p20"], points["ms_p80"], color=line.get_color(), alpha=0.2)
        names.append(name)
    _finish(fig, ax, path)
    return names


def plot_speedups(frame: pd.DataFrame, title: str, path: Path) -> list[str]:
    """Speedup of each non-baseline implementation against each baseline vs T. Returns the series plotted."""
    fig, ax = _new_axes(title, "speedup (baseline ms / ms), log scale", frame["T"])
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.axhline(1.0, color="black", linewidth=1)
    names = []
    for column in [c for c in frame.columns if c.startswith(SPEEDUP_PREFIX)]:
        baseline = column[len(SPEEDUP_PREFIX):]
        for (impl, label), rows in _series(frame[frame[column].notna()]):
            points = _points(rows, (column,))
            name = f"{impl} vs {baseline} {label}".strip()
            ax.plot(points.index, points[column], marker="o", label=name)
            names.append(name)
    _finish(fig, ax, path)
    return names


def render_plots(table: pd.DataFrame, folder: Path) -> list[dict]:
    """Every (suite, op)'s time and speedup PNGs under folder/plots; one dict per PNG (path, title, series)."""
    (folder / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    passed = table[(table["verdict"] == "pass") & table["ms"].notna()]
    plots = []
    for (suite, op), frame in passed.groupby(["suite", "op"], sort=False):
        frame = frame.assign(label=series_labels(frame, "impl_config"))
        contenders = frame[~frame["baseline"].astype(bool)]
        has_speedups = contenders.filter(like=SPEEDUP_PREFIX).notna().any().any()
        for kind, plot, data in (("speedup", plot_speedups, contenders), ("time", plot_times, frame)):
            if kind == "speedup" and not has_speedups:
                continue
            path = folder / PLOTS_DIR / f"{suite}-{op}-{kind}.png"
            title = f"{suite}: {op} {kind} vs T"
            plots.append({"suite": suite, "op": op, "kind": kind, "path": path.relative_to(folder).as_posix(),
                          "title": title, "series": plot(data, title, path)})
    return plots


# Shown for each non-baseline implementation beside its speedups, with their column names.
CONTENDER_METRICS = {"tflops": "TFLOP/s", "frac_matmul_peak": "of matmul peak", "frac_copy_bw": "of copy bw",
                     "peak_mem_gib": "peak GiB"}


def summary_table(frame: pd.DataFrame) -> pd.DataFrame:
    """One suite and op, one row per problem (by what varies among its problems, and T): the median ms of every
    implementation, then each non-baseline's speedups, TFLOP/s, fractions of the ceilings and peak memory."""
    index = ["series", "T"]
    passed = frame[frame["verdict"] == "pass"].assign(series=series_labels(frame, "config"))
    if passed.empty:
        return pd.DataFrame()
    ms = passed.pivot_table(index=index, columns="impl", values="ms", aggfunc="first")
    ms.columns = [f"ms {impl}" for impl in ms.columns]
    metrics = {c: "x " + c[len(SPEEDUP_PREFIX):] for c in passed.columns if c.startswith(SPEEDUP_PREFIX)}
    metrics.update(CONTENDER_METRICS)
    contenders = passed[~passed["baseline"].astype(bool)]
    values = contenders.melt(id_vars=index + ["impl"], value_vars=list(metrics)).dropna(subset=["value"])
    if values.empty:
        return ms
    extra = values.pivot_table(index=index, columns=["impl", "variable"], values="value", aggfunc="first")
    order = list(metrics)
    extra = extra[sorted(extra.columns, key=lambda c: (c[0], order.index(c[1])))]
    extra.columns = [f"{impl} {metrics[variable]}" for impl, variable in extra.columns]
    return ms.join(extra)


def _html_table(frame: pd.DataFrame, **kwargs) -> str:
    return frame.to_html(float_format=lambda v: f"{v:.4g}", na_rep="", border=0, classes="results", **kwargs)


def _environment_html(environment: dict) -> str:
    machine = environment.get("machine", {})
    rows = [(k, machine.get(k)) for k in ("python", "platform", "nsa", "torch", "triton", "cuda", "cuda_available")]
    rows += [("nsa version", environment.get("nsa_version")), ("device", environment.get("device")),
             ("created", environment.get("created"))]
    for gpu in machine.get("gpus", []):
        rows.append((f"gpu {gpu.get('index')}", ", ".join(f"{k}={v}" for k, v in gpu.items() if k != "index")))
    for label, version in machine.get("flash_attention", {}).items():
        rows.append((label, version or "not available"))
    for key, value in environment.get("ceilings", {}).items():
        rows.append((f"ceiling: {key}", f"{value:.4g}" if isinstance(value, float) else value))
    for part in environment.get("parts", []):  # folders merged by `nsa report --add`: each ran on its own card
        ceilings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in part.get("ceilings", {}).items())
        rows.append((f"part {part.get('folder')}", f"device={part.get('device')}, created={part.get('created')}, "
                     f"{ceilings}"))
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return f"<table class='env'>{body}</table>"


PAGE_STYLE = """body{font-family:sans-serif;margin:2em;max-width:1400px}
table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
table.env td,table.env th{text-align:left}.note{background:#fff3cd;padding:0.8em;border:1px solid #e0c060}
.fail{color:#b00}img{max-width:49%;border:1px solid #ddd;margin:0.5em 0.5% 0.5em 0}"""
# Marks the body with how many plots loaded (data-plots-loaded="ok/total"): a headless browser can check it.
PAGE_SCRIPT = """window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.plotsLoaded = loaded + '/' + images.length;
});"""


def render_html(table: pd.DataFrame, environment: dict, plots: list[dict]) -> str:
    """The page: note, verdict counts, plots and a summary per suite and op, failures, all rows, environment."""
    gpu = environment.get("gpu") or (table["gpu"].iloc[0] if len(table) else "unknown device")
    parts = [f"<h1>NSA report: {html.escape(str(gpu))}</h1>"]
    if environment.get("note"):
        parts.append(f"<p class='note'><b>Note:</b> {html.escape(environment['note'])}</p>")
    verdicts = pd.crosstab(table["impl"], table["verdict"]).reindex(columns=list(VERDICTS), fill_value=0)
    parts += ["<h2>Verdicts</h2>", "<p>Every row was checked against its oracle before it was timed; only passes "
              "are timed and plotted. Failures and skips are listed below the plots.</p>", _html_table(verdicts)]
    for (suite, op), frame in table.groupby(["suite", "op"], sort=False):
        parts.append(f"<h2>{html.escape(suite)}: {html.escape(op)}</h2>")
        for plot in (p for p in plots if (p["suite"], p["op"]) == (suite, op)):
            parts.append(f"<img src='{html.escape(plot['path'])}' alt='{html.escape(plot['title'])}'>")
        summary = summary_table(frame)
        if len(summary):
            parts.append(_html_table(summary))
    bad = table[table["verdict"].isin(["fail", "error", "oom"])]
    if len(bad):
        parts += [f"<h2 class='fail'>Failures, errors, out of memory ({len(bad)} rows)</h2>",
                  _html_table(bad[["suite", "problem", "impl", "verdict", "error", "checked"]], index=False)]
    skipped = table[table["verdict"] == "skip"].groupby(["impl", "error"]).size().rename("rows").reset_index()
    if len(skipped):
        parts += ["<h2>Skipped</h2>", _html_table(skipped, index=False)]
    parts += [f"<h2>All rows</h2><details><summary>{len(table)} rows (the full-precision numbers are in "
              f"{RESULTS_CSV})</summary>", _html_table(table[list(TABLE_COLUMNS)], index=False), "</details>",
              "<h2>Environment</h2>", _environment_html(environment)]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>NSA report: {html.escape(str(gpu))}</title>"
            f"<style>{PAGE_STYLE}</style></head><body>{''.join(parts)}<script>{PAGE_SCRIPT}</script></body></html>\n")


def render_report(folder) -> Path:
    """Render folder/report.html and folder/plots/*.png from folder's results; returns the page's path."""
    folder = Path(folder)
    table, environment = load(folder)
    plots = render_plots(table, folder)
    page = folder / REPORT_HTML
    page.write_text(render_html(table, environment, plots))
    return page
