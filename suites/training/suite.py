"""The `train` suite: NSA and dense attention LMs trained alike, probed for passkey retrieval, reported.

The sizes ("tiny" for a CPU, "gpu") are declared in `config.py`.
Outputs (all under one folder; a rerun resumes from the checkpoints): <model>/checkpoint.pt, <model>/log.csv,
<model>/passkey.csv, compare.csv, summary.json, losses.png, passkey.png, compare.png, report.html.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import traceback
from pathlib import Path

import torch

from nsa.suites.training import passkey
from nsa.suites.training.compare import compare_backends
from nsa.suites.training.config import MODELS, Size, TrainConfig, get_size
from nsa.suites.training.corpus import ByteCorpus
from nsa.suites.training.model import ModelConfig, build_model
from nsa.suites.training.train import throughput, train

# Per backend, the kernels-vs-reference check takes no new step after this many seconds.
COMPARE_BUDGET_S = 60.0


def _device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _attention_impl(model_config: ModelConfig, device) -> str:
    if model_config.attention == "dense":
        return "torch SDPA (causal)"
    uses_kernels = model_config.backend == "kernels" or (model_config.backend == "auto"
                                                         and torch.device(device).type == "cuda")
    return "NSA, nsa.kernels (Triton)" if uses_kernels else "NSA, nsa.reference (PyTorch)"


def _final(log, column: str, last: int = 10) -> float:
    values = log[column].dropna() if column in log else []
    return float(values.tail(last).mean()) if len(values) else float("nan")


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def run_train_suite(size: str | Size = "tiny", out=None, *, device=None, steps: int | None = None,
                    compare_steps: int | None = None, models=MODELS, time_budget_s: float | None = None,
                    corpus_bytes: int | None = None, stop_at: int | None = None, progress: bool = True,
                    log=print) -> dict:
    """Train, probe and report each model of `models` at `size`; returns the summary (also summary.json).

    Args:
        size: "tiny", "gpu" or a Size. out: the output folder (created; a rerun into it resumes).
        device: torch device (default cuda when available). steps: override the size's step count.
        compare_steps: kernels-vs-reference steps (default: the size's, 0 for tiny; on a CPU the kernels need
            TRITON_INTERPRET=1, which `nsa run` sets).
        time_budget_s: per model, stop training (checkpointed) once this much training time is spent; the
            models after one that stopped so are held to its step count (same data, same schedule so far).
        corpus_bytes: read at most this many bytes of the corpus (default: the size's).
        stop_at: stop each model once it has done that many steps (an interruption, for tests).
    """
    size = get_size(size) if isinstance(size, str) else size
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out or "nsa-results/train")
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(size.train, **({} if steps is None else {"steps": steps}),
                                 time_budget_s=time_budget_s)
    corpus = ByteCorpus.load(max_bytes=corpus_bytes or size.corpus_bytes)
    log(f"corpus: {corpus.num_files} files of {corpus.root}, {len(corpus.train):,} train / {len(corpus.val):,} "
        f"val bytes")
    summary = {"size": size.name, "device": str(device), "device_name": _device_name(device),
               "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
               "corpus": corpus.describe(), "models": {},
               "settings": {"model": dataclasses.asdict(size.model), "train": dataclasses.asdict(config),
                            "probe": {"lengths": size.probe_lengths, "depths": size.probe_depths,
                                      "samples": size.probe_samples, "digits": config.passkey_digits}},
               "setup": _setup_text(size, config),
               "passkey_note": _passkey_text(size, config),
               "note": None if device.type == "cuda" else "CPU run: tokens/s here say nothing about a GPU, and "
               "a model this small trained this briefly shows the pipeline works, not what NSA can learn."}
    from nsa.machine import describe
    summary["machine"] = describe()
    summary["errors"] = {}
    for name in models:
        try:
            result = _train_and_probe(name, size, config, corpus, out, device, stop_at, progress, log)
            summary["models"][name] = result
            if result["stopped"] and "time budget" in result["stopped"]:
                stop_at = result["steps_done"]
                log(f"the next models stop at step {stop_at} too: all see the same data and schedule")
        except Exception:  # noqa: BLE001 (one model's failure must not lose the other's results)
            summary["errors"][name] = traceback.format_exc()
            log(f"{name}: FAILED\n{summary['errors'][name]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    compare_steps = size.compare_steps if compare_steps is None else compare_steps
    if compare_steps and (device.type == "cuda" or _interpreting()):
        try:
            _write_report(summary, out, log)  # what is done so far survives a compare that runs too long
            result = compare_backends(size.model, config, corpus, steps=compare_steps, device=device,
                                      batch_size=size.compare_batch, time_budget_s=COMPARE_BUDGET_S,
                                      progress=progress)
            table = result.pop("table")
            table.to_csv(out / "compare.csv", index=False)
            summary["compare"] = result
            log(f"kernels vs reference: {'PASS' if result['passed'] else 'FAIL'}, largest relative loss "
                f"difference {result['max_rel_diff']:.3g} over {len(table)} steps (tolerance {result['rtol']:g}); "
                f"{result['seconds_kernels']:.3g} s kernels, {result['seconds_reference']:.3g} s reference")
        except Exception:  # noqa: BLE001
            summary["errors"]["compare"] = traceback.format_exc()
            log(f"kernels vs reference: FAILED\n{summary['errors']['compare']}")
    elif compare_steps:
        summary["compare_skipped"] = "the kernels need a GPU, or TRITON_INTERPRET=1 on a CPU"
    else:
        summary["compare_skipped"] = "compare_steps is 0 (the default on a CPU; the tiny run is the reference's)"
    summary["report"] = str(_write_report(summary, out, log))
    return summary


def _write_report(summary: dict, out: Path, log) -> Path:
    from nsa.suites.training import report  # matplotlib: only when a report is drawn
    (out / report.SUMMARY_JSON).write_text(json.dumps(_jsonable(summary), indent=1, default=str))
    page = report.render(out)
    log(f"report: {page.resolve()}")
    return page


def _train_and_probe(name, size: Size, config: TrainConfig, corpus, out: Path, device, stop_at, progress,
                     log) -> dict:
    """Train model `name` (resuming), probe it, write its passkey.csv; its summary entry."""
    model_config = dataclasses.replace(size.model, attention=name)
    model = build_model(model_config, seed=config.seed).to(device)
    impl = _attention_impl(model_config, device)
    log(f"{name}: {impl}, {model.num_params()['total']:,} parameters, {config.steps} steps of "
        f"{config.batch_size} x {config.seqlen} tokens")
    identity = {k: str(v) for k, v in dataclasses.asdict(model_config).items()}
    result = train(model, corpus, config, out / name, device=device, stop_at=stop_at, progress=progress,
                   desc=f"train {name}", model_identity=identity)
    history = result["log"]
    summary = {"attention_impl": impl, "params": model.num_params(), "steps_done": len(history),
               "finished": result["finished"], "stopped": result["stopped"],
               "final_train_loss": _final(history, "lm_loss"), "final_val_loss": _final(history, "val_loss", last=1),
               "tokens_per_s": throughput(history, config.skip_timing),
               "train_seconds": float(history["step_s"].sum()) if len(history) else 0.0}
    log(f"{name}: trained, {summary['tokens_per_s']:,.0f} tokens/s; passkey probe")
    table = passkey.probe(model, corpus, lengths=size.probe_lengths, depths=size.probe_depths,
                          samples=size.probe_samples, digits=config.passkey_digits, seed=config.seed + 1,
                          device=device, batch_size=size.probe_batch, dtype=config.dtype, progress=progress)
    table.to_csv(out / name / "passkey.csv", index=False)
    summary.update(passkey_accuracy=float(table["accuracy"].mean()),
                   passkey_digit_accuracy=float(table["digit_accuracy"].mean()))
    _log_model(log, name, summary)
    return summary


def _interpreting() -> bool:
    from nsa.kernels.runtime import interpreting
    return interpreting()


def _log_model(log, name: str, result: dict) -> None:
    stopped = f" ({result['stopped']})" if result["stopped"] else ""
    log(f"{name}: {result['steps_done']} steps{stopped}, final train loss {result['final_train_loss']:.4f}, val "
        f"loss {result['final_val_loss']:.4f}, {result['tokens_per_s']:,.0f} tokens/s, passkey accuracy "
        f"{result['passkey_accuracy']:.2f} (digits {result['passkey_digit_accuracy']:.2f})")


def _setup_text(size: Size, config: TrainConfig) -> str:
    m, c = size.model, size.model.nsa
    return (f"Byte-level decoder-only LMs, {m.num_layers} layers, width {m.hidden_size}, {m.num_heads} query / "
            f"{m.num_kv_heads} kv heads of {m.head_dim}, learned absolute positions, tied embeddings; the only "
            f"difference is the attention: NativeSparseAttention (l={c.cmp_block} d={c.cmp_stride} "
            f"l'={c.slc_block} n={c.slc_topn} w={c.window}) or dense causal SDPA with the same projections. "
            f"{config.steps} AdamW steps of {config.batch_size} x {config.seqlen} tokens of Python's stdlib source "
            f"(lr {config.lr:g}, warm-up {config.warmup}, cosine), {config.dtype}, seed {config.seed}, the same "
            f"batches for both. Final train loss: mean LM loss of the last 10 steps; val loss: held-out files. "
            f"tokens/s: training steps after the first {config.skip_timing}, data preparation excluded.")


def _passkey_text(size: Size, config: TrainConfig) -> str:
    return (f"{config.passkey_fraction:.0%} of the training rows start with a passkey example: {config.passkey_digits} "
            f"random digits framed by '$', written once as a code comment at a uniform random depth of L tokens "
            f"of code (L uniform in T/8..T, T={config.seqlen}), the question at the end; the answer digits' "
            f"cross-entropy is added to the loss (weight {config.passkey_weight:g}). Both models see the same "
            f"examples. The probe uses held-out code as filler, {size.probe_samples} examples per cell; accuracy is "
            f"exact match of all digits (argmax, teacher forced, which equals greedy decoding's exact match).")
