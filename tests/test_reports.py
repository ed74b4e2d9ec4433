"""Reports render from the results files alone: PNGs with the right series, an HTML page that shows them.

The results here are fabricated (no measuring): an `nsa` whose time grows like T, baselines like T^2, and a
`wrong` implementation that failed its check, which must appear in the verdicts and never in a plot.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from nsa.bench import base_row
from nsa.cli import main
from nsa.reports.render import load, render_plots, render_report
from nsa.results import ResultsStore
from nsa.suites import Provider, get_suite

GPU = "NVIDIA H200"


class Named(Provider):
    """Only what a results row records of a provider: its name, baseline flag and config (None: dense)."""

    def __init__(self, name, baseline):
        self.name, self.baseline = name, baseline

    def config(self, problem):
        return None if self.name.startswith("sdpa") else problem.config


FAKE_PROVIDERS = {"nsa": (Named("nsa", False), 3e-4), "sdpa-cudnn": (Named("sdpa-cudnn", True), 3e-5),
                  "sdpa-flash": (Named("sdpa-flash", True), 5e-5), "wrong": (Named("wrong", False), 1e-6)}


def fake_results(folder: Path, suite_names=("paper",)) -> Path:
    store = ResultsStore(folder)
    store.write_environment({"gpu": GPU, "device": "cuda", "machine": {"torch": "2.9.0", "gpus": []},
                             "ceilings": {"matmul_tflops": 800.0, "copy_gbps": 4000.0}, "note": None})
    for suite in map(get_suite, suite_names):
        for problem in suite.problems:
            for provider, scale in FAKE_PROVIDERS.values():
                row = base_row(GPU, suite, problem, provider)
                t = problem.seqlen * problem.batch
                ms = scale * t * (1 if provider.name == "nsa" else t / 1024) * (2.5 if problem.op == "bwd" else 1)
                if provider.name == "wrong":  # fast, and wrong: recorded as a failure, never timed
                    row.update(verdict="fail", error="relative error 3.1e-01 > allowed 1.0e-02", max_rel_err=0.31,
                               allowed_rel_err=0.01, checked="o 3.1e-01/1.0e-02 at T=8192")
                elif problem.seqlen == 131072 and provider.name == "sdpa-flash":
                    row.update(verdict="oom", error="timing: OutOfMemoryError: CUDA out of memory")
                else:
                    row.update(verdict="pass", ms=ms, ms_p20=0.97 * ms, ms_p80=1.04 * ms, reps=10, tflops=1.0,
                               checked="o 1e-3/4e-3 at T=8192")
                store.add(row)
    return folder


@pytest.fixture
def results(tmp_path):
    return fake_results(tmp_path / "h200")


def test_plots_exist_with_series_from_the_data(results):
    table, _ = load(results)
    plots = render_plots(table, results)
    files = {p["path"] for p in plots}
    for op in ("fwd", "bwd", "decode"):
        assert {f"plots/paper-{op}-time.png", f"plots/paper-{op}-speedup.png"} <= files
    for plot in plots:
        png = results / plot["path"]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert not any("wrong" in s for s in plot["series"]), "a failed implementation was plotted"
    series = {p["kind"] + " " + p["op"]: set(p["series"]) for p in plots}
    assert series["speedup fwd"] == {"nsa vs sdpa-cudnn", "nsa vs sdpa-flash"}
    # decode runs at B=1 and B=16: the batch tells its series apart, nothing else varies
    assert series["speedup decode"] == {f"nsa vs {b} B={n}" for b in ("sdpa-cudnn", "sdpa-flash") for n in (1, 16)}
    assert series["time fwd"] == {"nsa", "sdpa-cudnn", "sdpa-flash"}


def test_speedups_are_baseline_over_nsa(results):
    table, _ = load(results)
    row = table[(table["impl"] == "nsa") & (table["op"] == "fwd") & (table["T"] == 65536)].iloc[0]
    cudnn = table[(table["impl"] == "sdpa-cudnn") & (table["problem"] == row["problem"])].iloc[0]
    assert row["speedup_vs_sdpa-cudnn"] == pytest.approx(cudnn["ms"] / row["ms"])
    assert row["speedup_vs_sdpa-cudnn"] > 1
    wrong = table[table["impl"] == "wrong"]
    assert wrong["ms"].isna().all() and wrong.filter(like="speedup_vs_").isna().all().all()


def test_html_references_every_plot_and_lists_failures(results):
    page = render_report(results)
    text = page.read_text()
    pngs = sorted(p.relative_to(results).as_posix() for p in (results / "plots").glob("*.png"))
    assert pngs and all(f"src='{p}'" in text for p in pngs)
    for needed in (GPU, "Verdicts", "relative error 3.1e-01", "OutOfMemoryError", "matmul_tflops", "speedup"):
        assert needed in text


def test_report_command_rerenders(results, capsys):
    for _ in range(2):  # the second time over the first one's files
        assert main(["report", str(results)]) == 0
        assert "report.html" in capsys.readouterr().out
    assert len(list((results / "plots").glob("*.png"))) == 6


CHROMIUM = os.environ.get("NSA_CHROMIUM") or "/usr/bin/chromium"
HEADLESS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--virtual-time-budget=10000"]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no headless browser at {CHROMIUM} (Debian: chromium)")
def test_headless_chromium_shows_the_plots(results, tmp_path):
    from PIL import Image
    page = render_report(results)
    flags = HEADLESS + [f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    loaded = re.search(r'data-plots-loaded="(\d+)/(\d+)"', dom)
    assert loaded, "the page's load script did not run"
    assert loaded[1] == loaded[2] == str(len(list((results / "plots").glob("*.png"))))
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 200, "the screenshot looks blank: no plot rendered"


def test_report_add_merges_the_parts_of_one_card(tmp_path, capsys):
    fwd, bwd = fake_results(tmp_path / "fwd"), fake_results(tmp_path / "bwd")
    for store, op in ((ResultsStore(fwd), "fwd"), (ResultsStore(bwd), "bwd")):  # each part keeps one op
        store.rows = [row for row in store.rows if row["op"] == op]
        store.add(store.rows.pop())
    target = tmp_path / "paper"
    assert main(["report", str(target), "--add", str(fwd), str(bwd)]) == 0
    table, environment = load(target)
    assert set(table["op"]) == {"fwd", "bwd"}
    assert len(table) == len(ResultsStore(fwd).rows) + len(ResultsStore(bwd).rows)
    assert [part["folder"] for part in environment["parts"]] == [str(fwd), str(bwd)]
    assert "part " in (target / "report.html").read_text()
    assert main(["report", str(target), "--add", str(fwd)]) == 0  # again: nothing new
    assert "added 0 rows" in capsys.readouterr().out

    other = fake_results(tmp_path / "other")
    store = ResultsStore(other)
    store.write_environment({**store.environment(), "gpu": "NVIDIA H100 80GB HBM3"})
    assert main(["report", str(target), "--add", str(other)]) == 1
    assert "different GPUs" in capsys.readouterr().err
