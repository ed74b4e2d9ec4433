"""The kernels against the reference inside the same model: same weights, same batches, a few steps each.

Two copies of the NSA LM are built from one seed, one with backend="kernels" (Triton) and one with
backend="reference" (plain PyTorch), and trained side by side on identical batches. Step 0's loss differs only
by the forward numerics; later steps also carry the small differences of the gradients. The check is that the
losses agree within a tolerance per dtype over the first steps; the selection is discrete, so a near-tie may
flip a block, which moves a loss by far less than the tolerance at these sizes.
"""

from __future__ import annotations

import dataclasses

import pandas as pd

from nsa.suites.training.corpus import ByteCorpus
from nsa.progress import progress_bar
from nsa.suites.training.model import ModelConfig, build_model
from nsa.suites.training.config import TrainConfig
from nsa.suites.training.train import make_optimizer, train_step

# Largest allowed |loss_kernels - loss_reference| / loss_reference per step, by the training dtype.
LOSS_RTOL = {"float32": 2e-3, "bfloat16": 2e-2}


def compare_backends(model_config: ModelConfig, config: TrainConfig, corpus: ByteCorpus, *, steps: int, device,
                     batch_size: int | None = None, time_budget_s: float | None = None,
                     progress: bool = True) -> dict:
    """Train the kernels' and the reference's copy of one NSA model `steps` steps on the same batches.

    time_budget_s: per backend, take no new step after this many seconds (the slow reference at long T); the
    comparison then covers the steps both did.
    Returns {"table": DataFrame(step, loss_kernels, loss_reference, rel_diff), "max_rel_diff", "rtol",
    "passed", "seconds_kernels", "seconds_reference", "batch_size", "dtype"}.
    """
    config = dataclasses.replace(config, batch_size=batch_size or config.batch_size)
    runs = {}
    for backend in ("kernels", "reference"):
        cfg = dataclasses.replace(model_config, attention="nsa", backend=backend)
        model = build_model(cfg, seed=config.seed).to(device)
        optimizer = make_optimizer(model, config)
        rows, spent = [], 0.0
        for step in progress_bar(range(steps), desc=f"compare {backend}", enabled=progress, leave=False):
            if time_budget_s is not None and spent > time_budget_s:
                break
            rows.append(train_step(model, optimizer, corpus, config, step, device))
            spent += rows[-1]["step_s"]
        runs[backend] = rows
        del model, optimizer
    done = min(len(rows) for rows in runs.values())
    table = pd.DataFrame({"step": range(done), "loss_kernels": [r["loss"] for r in runs["kernels"][:done]],
                          "loss_reference": [r["loss"] for r in runs["reference"][:done]]})
    table["rel_diff"] = (table["loss_kernels"] - table["loss_reference"]).abs() / table["loss_reference"].abs()
    rtol = LOSS_RTOL[config.dtype]
    worst = float(table["rel_diff"].max(skipna=False))  # a NaN loss fails
    return {"table": table, "max_rel_diff": worst, "rtol": rtol, "passed": bool(worst <= rtol),
            "batch_size": config.batch_size, "dtype": config.dtype,
            "seconds_kernels": sum(r["step_s"] for r in runs["kernels"][:done]),
            "seconds_reference": sum(r["step_s"] for r in runs["reference"][:done])}
