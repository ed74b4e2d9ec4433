"""The train suite's report: loss curves and passkey heat maps (PNG) and one HTML page, from its files alone.

Everything is read from the output folder (summary.json, <model>/log.csv, <model>/passkey.csv, compare.csv),
so the page can be re-rendered without training again; plot series come from the models found there.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from nsa.reports.render import PAGE_STYLE

SUMMARY_JSON = "summary.json"
REPORT_HTML = "report.html"
LOSS_PNG = "losses.png"
PASSKEY_PNG = "passkey.png"
COMPARE_PNG = "compare.png"


def _smooth(values: pd.Series, steps: int) -> pd.Series:
    window = max(1, steps // 25)
    return values.rolling(window, min_periods=1).mean()


def plot_losses(logs: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """Training LM loss (smoothed, raw faint) and validation loss vs step, one colour per model."""
    fig = Figure(figsize=(8, 5), dpi=110, layout="constrained")
    ax = fig.subplots()
    for name, log in logs.items():
        line, = ax.plot(log["step"] + 1, _smooth(log["lm_loss"], len(log)), label=f"{name} train (smoothed)")
        ax.plot(log["step"] + 1, log["lm_loss"], color=line.get_color(), alpha=0.2, linewidth=0.8)
        if "val_loss" in log:
            val = log.dropna(subset=["val_loss"])
            ax.plot(val["step"] + 1, val["val_loss"], color=line.get_color(), linestyle="--", marker="o",
                    label=f"{name} val")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("next-byte cross-entropy (nats)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path)


def plot_passkey(tables: dict[str, pd.DataFrame], path: Path, title: str) -> None:
    """One heat map per model: exact-match accuracy by context length (x) and needle depth (y)."""
    fig = Figure(figsize=(4.5 * max(1, len(tables)) + 1, 4.2), dpi=110, layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, max(1, len(tables))))
    image = None
    for ax, (name, table) in zip(axes, tables.items()):
        grid = table.pivot_table(index="depth", columns="length", values="accuracy")
        image = ax.imshow(grid.to_numpy(), vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(grid.shape[1]), [str(c) for c in grid.columns])
        ax.set_yticks(range(grid.shape[0]), [f"{d:.0%}" for d in grid.index])
        for (i, j), value in np.ndenumerate(grid.to_numpy()):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
        ax.set_title(f"{name}: mean {table['accuracy'].mean():.2f}")
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="passkey accuracy (exact match)")
    fig.suptitle(title)
    fig.savefig(path)


def plot_compare(table: pd.DataFrame, path: Path, title: str) -> None:
    fig = Figure(figsize=(7, 4), dpi=110, layout="constrained")
    ax = fig.subplots()
    ax.plot(table["step"] + 1, table["loss_kernels"], marker="o", label="nsa.kernels")
    ax.plot(table["step"] + 1, table["loss_reference"], marker="x", linestyle="--", label="nsa.reference")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("training objective")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.savefig(path)


def _table(frame: pd.DataFrame, **kwargs) -> str:
    return frame.to_html(float_format=lambda v: f"{v:.4g}", na_rep="", border=0, classes="results", **kwargs)


def _models_table(summary: dict) -> pd.DataFrame:
    rows = []
    for name, result in summary["models"].items():
        rows.append({"model": name, "attention": result["attention_impl"], "params": result["params"]["total"],
                     "attention params": result["params"]["attention"], "steps": result["steps_done"],
                     "final train loss": result["final_train_loss"], "final val loss": result["final_val_loss"],
                     "tokens/s": result["tokens_per_s"], "train s": result["train_seconds"],
                     "passkey accuracy": result["passkey_accuracy"],
                     "passkey digit accuracy": result["passkey_digit_accuracy"],
                     "stopped": result["stopped"] or ""})
    return pd.DataFrame(rows)


def render(folder) -> Path:
    """Write folder/losses.png, folder/passkey.png (and compare.png) and folder/report.html; the page's path."""
    folder = Path(folder)
    summary = json.loads((folder / SUMMARY_JSON).read_text())
    names = list(summary["models"])
    logs = {n: pd.read_csv(folder / n / "log.csv") for n in names if (folder / n / "log.csv").exists()}
    probes = {n: pd.read_csv(folder / n / "passkey.csv") for n in names if (folder / n / "passkey.csv").exists()}
    size = summary["size"]
    where = f"{size}, {summary['device_name']}"
    parts = [f"<h1>NSA train suite: {html.escape(where)}</h1>"]
    if summary.get("note"):
        parts.append(f"<p class='note'><b>Note:</b> {html.escape(summary['note'])}</p>")
    for name, error in summary.get("errors", {}).items():
        parts.append(f"<h2 class='fail'>{html.escape(name)} failed</h2><pre>{html.escape(error)}</pre>")
    parts += ["<h2>Models</h2>", f"<p>{html.escape(summary['setup'])}</p>", _table(_models_table(summary), index=False)]
    if logs:
        plot_losses(logs, folder / LOSS_PNG, f"train suite ({where}): loss")
        parts += ["<h2>Loss curves</h2>", f"<img src='{LOSS_PNG}' alt='loss curves'>"]
    if probes:
        plot_passkey(probes, folder / PASSKEY_PNG, f"passkey retrieval ({where})")
        parts += ["<h2>Passkey retrieval</h2>", f"<p>{html.escape(summary['passkey_note'])}</p>",
                  f"<img src='{PASSKEY_PNG}' alt='passkey heat map'>"]
    compare = summary.get("compare")
    if compare and (folder / "compare.csv").exists():
        table = pd.read_csv(folder / "compare.csv")
        plot_compare(table, folder / COMPARE_PNG, "NSA model: kernels vs reference, same weights and batches")
        verdict = "PASS" if compare["passed"] else "FAIL"
        parts += ["<h2>Kernels vs reference inside the model</h2>",
                  f"<p><b>{verdict}</b>: largest relative loss difference {compare['max_rel_diff']:.3g} over "
                  f"{len(table)} steps (tolerance {compare['rtol']:g}, {compare['dtype']}, batch "
                  f"{compare['batch_size']}); step seconds kernels {compare['seconds_kernels']:.3g}, reference "
                  f"{compare['seconds_reference']:.3g}.</p>", f"<img src='{COMPARE_PNG}' alt='kernels vs reference'>",
                  _table(table, index=False)]
    elif summary.get("compare_skipped"):
        parts += ["<h2>Kernels vs reference inside the model</h2>",
                  f"<p>Not run: {html.escape(summary['compare_skipped'])}</p>"]
    parts += ["<h2>Settings</h2>", f"<pre>{html.escape(json.dumps(summary['settings'], indent=1))}</pre>",
              "<h2>Corpus</h2>", f"<pre>{html.escape(json.dumps(summary['corpus'], indent=1))}</pre>",
              "<h2>Machine</h2>", f"<pre>{html.escape(json.dumps(summary['machine'], indent=1))}</pre>"]
    page = folder / REPORT_HTML
    page.write_text(f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>NSA train suite: "
                    f"{html.escape(where)}</title><style>{PAGE_STYLE}</style></head><body>{''.join(parts)}"
                    "</body></html>\n")
    return page
