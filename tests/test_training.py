"""The train suite (issue 9) at micro sizes on a CPU: corpus, models, training with resume, passkey probe,
report files, the kernels-vs-reference check (Triton interpreter) and `nsa run --suite train`."""

import dataclasses
import json
import subprocess
import sys

import pandas as pd
import pytest
import torch

from nsa import NSAConfig
from nsa.suites.training import SIZES, Size, TrainConfig, run_train_suite
from nsa.suites.training import passkey
from nsa.suites.training.corpus import ByteCorpus
from nsa.suites.training.model import ModelConfig, build_model
from nsa.suites.training.train import train

MICRO_NSA = NSAConfig(cmp_block=8, cmp_stride=4, slc_block=8, slc_topn=4, window=16)
MICRO_MODEL = ModelConfig(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, max_seqlen=64,
                          nsa=MICRO_NSA)
MICRO_TRAIN = TrainConfig(steps=8, batch_size=2, seqlen=64, lr=3e-3, warmup=2, eval_every=4, eval_batches=1,
                          checkpoint_every=4, passkey_fraction=0.5, passkey_digits=3, skip_timing=1)
MICRO = Size("micro", MICRO_MODEL, MICRO_TRAIN, probe_lengths=(48, 64), probe_depths=(0.0, 1.0), probe_samples=3,
             probe_batch=3, corpus_bytes=300_000)


@pytest.fixture(scope="module")
def corpus():
    return ByteCorpus.load(max_bytes=300_000)


def test_corpus_is_deterministic_and_split(corpus):
    again = ByteCorpus.load(max_bytes=300_000)
    assert corpus.sha256 == again.sha256 and torch.equal(corpus.train, again.train)
    assert len(corpus.train) > 10 * len(corpus.val) > 0
    first = corpus.batch("train", 5, 3, 64, seed=1)
    assert first.shape == (3, 65) and first.dtype == torch.int64 and int(first.max()) < 256
    assert torch.equal(first, corpus.batch("train", 5, 3, 64, seed=1))
    assert not torch.equal(first, corpus.batch("train", 6, 3, 64, seed=1))
    assert b"import" in bytes(corpus.train[:200_000].tolist())


def test_sizes_reach_past_the_window():
    for size in SIZES.values():
        cfg, t = size.model.nsa, size.train.seqlen
        assert t >= 4 * cfg.slc_topn * cfg.slc_block and t > cfg.window and max(size.probe_lengths) == t
    assert SIZES["gpu"].model.nsa == NSAConfig() and SIZES["gpu"].train.seqlen >= 4096


@pytest.mark.parametrize("attention", ["dense", "nsa"])
def test_loss_decreases(attention, corpus, tmp_path):
    config = dataclasses.replace(MICRO_TRAIN, steps=12, passkey_fraction=0.0)
    model = build_model(dataclasses.replace(MICRO_MODEL, attention=attention), seed=0)
    log = train(model, corpus, config, tmp_path, device="cpu", progress=False)["log"]
    assert len(log) == 12 and log["lm_loss"].notna().all()
    assert log["lm_loss"].tail(3).mean() < log["lm_loss"].head(3).mean() - 0.3


def test_same_weights_from_the_same_seed():
    a, b = (build_model(dataclasses.replace(MICRO_MODEL, backend=backend), seed=3) for backend in ("auto", "reference"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    nsa, dense = (build_model(dataclasses.replace(MICRO_MODEL, attention=a), seed=0) for a in ("nsa", "dense"))
    assert nsa.num_params()["total"] > dense.num_params()["total"]  # gates and compressors, reported


def test_resume_after_interruption_continues_exactly(corpus, tmp_path):
    def model():
        return build_model(MICRO_MODEL, seed=0)

    whole = model()
    full = train(whole, corpus, MICRO_TRAIN, tmp_path / "whole", device="cpu", progress=False)
    interrupted = train(model(), corpus, MICRO_TRAIN, tmp_path / "cut", device="cpu", stop_at=3, progress=False)
    assert not interrupted["finished"] and len(interrupted["log"]) == 3 and "stopped" in interrupted["stopped"]
    resumed_model = model()
    resumed = train(resumed_model, corpus, MICRO_TRAIN, tmp_path / "cut", device="cpu", progress=False)
    assert resumed["finished"] and resumed["log"]["step"].tolist() == list(range(MICRO_TRAIN.steps))
    pd.testing.assert_series_equal(resumed["log"]["loss"], full["log"]["loss"])
    # equal up to rounding: the reference NSA's backward scatters (index_add), whose order is not fixed
    torch.testing.assert_close(resumed_model.state_dict(), whole.state_dict())
    with pytest.raises(ValueError, match="lr"):
        train(model(), corpus, dataclasses.replace(MICRO_TRAIN, lr=1e-4), tmp_path / "cut", device="cpu",
              progress=False)


def test_passkey_examples_and_probe(corpus):
    gen = torch.Generator().manual_seed(0)
    tokens, key = passkey.make_example(corpus.val, gen, 100, 0.5, 4)
    text = bytes(tokens.tolist()).decode("latin-1")
    assert len(tokens) == 101 and text.endswith(passkey.QUESTION + key) and f"${key}$" in text
    batch = corpus.batch("train", 0, 8, 64)
    mask = passkey.mix_into(batch, corpus, 0, fraction=0.5, digits=3, seed=0)
    rows = mask.any(1)
    assert 0 < int(rows.sum()) < 8 and (mask.sum(1)[rows] == 3).all()
    for row in rows.nonzero().flatten().tolist():
        answer = mask[row].nonzero().flatten()
        assert bytes(batch[row, answer + 1].tolist()).isdigit()  # targets are inputs shifted by one
    model = build_model(MICRO_MODEL, seed=0)
    table = passkey.probe(model, corpus, lengths=(48, 64), depths=(0.0, 0.5, 1.0), samples=2, digits=3, seed=0,
                          device="cpu")
    assert len(table) == 6 and set(table.columns) >= {"length", "depth", "accuracy", "digit_accuracy"}
    assert table["accuracy"].between(0, 1).all() and table["digit_accuracy"].between(0, 1).all()


def test_suite_writes_results_plots_and_page(tmp_path):
    summary = run_train_suite(MICRO, tmp_path, device="cpu", progress=False, log=lambda *_: None)
    for name in ("summary.json", "report.html", "losses.png", "passkey.png", "dense/log.csv", "nsa/passkey.csv"):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "summary.json").read_text())
    for result in saved["models"].values():
        assert result["steps_done"] == MICRO_TRAIN.steps and result["tokens_per_s"] > 0
        assert result["final_val_loss"] > 0 and 0 <= result["passkey_accuracy"] <= 1
    assert saved["models"]["nsa"]["attention_impl"] == "NSA, nsa.reference (PyTorch)"
    page = (tmp_path / "report.html").read_text()
    assert "losses.png" in page and "passkey.png" in page and "tokens/s" in page
    assert summary["compare_skipped"] and not summary["errors"]


def test_time_budget_holds_every_model_to_the_same_steps(tmp_path):
    summary = run_train_suite(MICRO, tmp_path, device="cpu", time_budget_s=1e-9, progress=False,
                              log=lambda *_: None)
    nsa, dense = summary["models"]["nsa"], summary["models"]["dense"]
    assert "time budget" in nsa["stopped"] and nsa["steps_done"] == dense["steps_done"] == 1
    assert not nsa["finished"] and (tmp_path / "nsa" / "checkpoint.pt").exists()


@pytest.mark.skipif(not __import__("nsa.kernels.runtime").kernels.runtime.interpreting(),
                    reason="the kernels on a CPU need TRITON_INTERPRET=1")
def test_kernels_match_the_reference_inside_the_model(tmp_path):
    micro = dataclasses.replace(MICRO, compare_steps=2, compare_batch=1)
    summary = run_train_suite(micro, tmp_path, device="cpu", models=(), progress=False, log=lambda *_: None)
    compare = summary["compare"]
    assert compare["passed"] and compare["max_rel_diff"] <= compare["rtol"] and not summary["errors"]
    table = pd.read_csv(tmp_path / "compare.csv")
    assert len(table) == 2 and table["loss_kernels"].notna().all()
    assert (tmp_path / "compare.png").exists() and "PASS" in (tmp_path / "report.html").read_text()


def test_nsa_run_suite_train_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "nsa", "run", "--suite", "train", "--steps", "2", "--models",
                           "dense", "--out", "out"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "report:" in done.stdout and "tokens/s" in done.stdout
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["size"] == "tiny" and list(summary["models"]) == ["dense"]
    bad = subprocess.run([sys.executable, "-m", "nsa", "run", "--suite", "train,smoke", "--out", "out"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 2 and "runs alone" in bad.stdout
