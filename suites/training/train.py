"""The training loop: AdamW, fixed seeds, loss and tokens/s per step, checkpoints that make a rerun resume.

Why it is built this way:
- The batch of step s depends on (seed, s) alone (see `ByteCorpus.batch`), and the learning rate is a pure
  function of s, so a run that resumes from the checkpoint of step s continues exactly where it stopped: the
  only state is the model, the optimizer and the log, all in one atomically written file.
- tokens/s counts the training step (forward, backward, optimizer; data preparation excluded), synchronised
  by reading the loss each step, and leaves out the first steps, where Triton compiles and caches warm up.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from nsa.suites.training import passkey
from nsa.progress import progress_bar
from nsa.suites.training.config import TrainConfig
from nsa.suites.training.corpus import ByteCorpus
from nsa.suites.training.model import autocast

CHECKPOINT = "checkpoint.pt"
LOG_CSV = "log.csv"


def make_optimizer(model, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.95))


def training_batch(corpus: ByteCorpus, config: TrainConfig, step: int):
    """(tokens [B, T+1], answer mask [B, T]) of step `step`: code windows, some replaced by passkey examples."""
    tokens = corpus.batch("train", step, config.batch_size, config.seqlen, seed=config.seed)
    mask = passkey.mix_into(tokens, corpus, step, fraction=config.passkey_fraction, digits=config.passkey_digits,
                            seed=config.seed)
    return tokens, mask


def losses(model, tokens, mask, config: TrainConfig, device):
    """(objective, lm loss, passkey loss or None): mean next-byte cross-entropy over every target, plus
    passkey_weight times the mean over the answer digits."""
    with autocast(device, config.dtype):
        logits = model(tokens[:, :-1])
    per_token = F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten(), reduction="none")
    lm = per_token.mean()
    if not mask.any():
        return lm, lm, None
    answer = per_token[mask.flatten()].mean()
    return lm + config.passkey_weight * answer, lm, answer


def train_step(model, optimizer, corpus, config: TrainConfig, step: int, device) -> dict:
    """One optimizer step; returns its log row (losses, lr, gradient norm, seconds, tokens)."""
    tokens, mask = training_batch(corpus, config, step)
    tokens, mask = tokens.to(device), mask.to(device)
    start = time.perf_counter()
    for group in optimizer.param_groups:
        group["lr"] = config.lr_at(step)
    objective, lm, answer = losses(model, tokens, mask, config, device)
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    row = {"step": step, "loss": objective.item(), "lm_loss": lm.item(),
           "passkey_loss": float("nan") if answer is None else answer.item(), "grad_norm": grad_norm.item()}
    row.update(lr=config.lr_at(step), step_s=time.perf_counter() - start, tokens=config.batch_size * config.seqlen)
    return row


@torch.no_grad()
def validation_loss(model, corpus: ByteCorpus, config: TrainConfig, device) -> float:
    """Mean next-byte cross-entropy on held-out code (no passkeys), the same batches every time."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(config.eval_batches):
        tokens = corpus.batch("val", i, config.batch_size, config.seqlen, seed=config.seed).to(device)
        with autocast(device, config.dtype):
            logits = model(tokens[:, :-1])
        total += F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).item()
    model.train(was_training)
    return total / config.eval_batches


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(folder, model, optimizer, identity: dict) -> tuple[int, list[dict]]:
    """Restore model and optimizer from folder/checkpoint.pt if there is one; (next step, log rows)."""
    path = Path(folder) / CHECKPOINT
    if not path.exists():
        return 0, []
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["identity"] != identity:
        changed = sorted(k for k in {**identity, **state["identity"]} if state["identity"].get(k) != identity.get(k))
        raise ValueError(f"{path} was written by a run with other settings ({', '.join(changed)}); "
                         "use another output folder or delete it")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"], state["log"]


def train(model, corpus: ByteCorpus, config: TrainConfig, folder, *, device, model_identity: dict | None = None,
          stop_at: int | None = None, progress: bool = True, desc: str = "train") -> dict:
    """Train `model` (already on `device`) for config.steps steps, resuming from folder/checkpoint.pt.

    stop_at: return (checkpointed) once that many steps are done, as an interruption would; the suite uses it to
        hold a model to the steps another one reached within its time budget, the tests to interrupt.
    Returns {"log": DataFrame of step rows, "finished": bool, "stopped": reason or None}; the log is also
    written to folder/log.csv.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(model, config)
    identity = {**{f"train.{k}": v for k, v in config.identity().items()},
                **{f"model.{k}": v for k, v in (model_identity or {}).items()}}
    start, log = load_checkpoint(folder, model, optimizer, identity)
    model.train()
    stopped, spent = None, 0.0  # the time budget is per call: a rerun continues with a fresh one

    def checkpoint(step):
        _save(folder / CHECKPOINT, {"identity": identity, "step": step, "log": log, "model": model.state_dict(),
                                    "optimizer": optimizer.state_dict()})
        pd.DataFrame(log).to_csv(folder / LOG_CSV, index=False)

    bar = progress_bar(range(start, config.steps), desc=desc, initial=start, total=config.steps, enabled=progress)
    for step in bar:
        row = train_step(model, optimizer, corpus, config, step, device)
        spent += row["step_s"]
        last = step + 1 == config.steps
        if stop_at is not None and step + 1 >= stop_at and not last:
            stopped = f"stopped at step {stop_at} as asked"
        elif config.time_budget_s is not None and spent > config.time_budget_s and not last:
            stopped = f"time budget of {config.time_budget_s:g} s spent at step {step + 1}/{config.steps}"
        if (step + 1) % config.eval_every == 0 or last or stopped:
            row["val_loss"] = validation_loss(model, corpus, config, device)
        log.append(row)
        bar.set_postfix(loss=f"{row['lm_loss']:.3f}", refresh=False)
        if stopped or last or (step + 1) % config.checkpoint_every == 0:
            checkpoint(step + 1)
        if stopped:
            break
    bar.close()
    if start == config.steps:  # already finished: the log is in the checkpoint
        pd.DataFrame(log).to_csv(folder / LOG_CSV, index=False)
    return {"log": pd.DataFrame(log), "finished": len(log) == config.steps, "stopped": stopped}


def throughput(log: pd.DataFrame, skip: int) -> float:
    """Training tokens per second over the logged steps after the first `skip` ones (all of them when there are
    no more; NaN for an empty log)."""
    timed = log[log["step"] >= skip] if len(log) > skip else log
    return float(timed["tokens"].sum() / timed["step_s"].sum()) if len(timed) else float("nan")
