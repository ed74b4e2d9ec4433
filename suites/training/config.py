"""The train suite's settings, declared: the training config and the named sizes (what `nsa run --suite train
--size NAME` runs). Kept free of pandas and matplotlib so that the command line can list them cheaply.

- "tiny": a CPU run of a couple of minutes with the reference NSA (2 layers, width 64, T=256, l=16 d=8 l'=16
  n=4 w=64, so T = 4 n l' and the selected and compressed branches reach past the window).
- "gpu": one H100/H200 in a few minutes with `nsa.kernels` (4 layers, width 512, 8 query / 2 kv heads of 128,
  the head dim the kernels' GPU tests cover; T=4096 = 4 n l' with the paper's l=32 d=16 l'=64 n=16 w=512, bf16
  autocast), plus the kernels-vs-reference check inside the same model over the first steps.
"""

from __future__ import annotations

import dataclasses
import math

from nsa.config import NSAConfig
from nsa.suites.training.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the numbers of a run (time_budget_s only decides when it stops).

    Attributes:
        steps, batch_size, seqlen: optimizer steps, sequences per step, tokens per sequence (T).
        lr, warmup, min_lr_ratio: peak learning rate, linear warm-up steps, cosine floor as a fraction of lr.
        weight_decay, grad_clip: AdamW decay of matrices (not of norms, biases), global gradient-norm clip.
        seed: model weights and data order.
        dtype: "float32", or "bfloat16" (autocast on CUDA; fp32 weights and optimizer).
        passkey_fraction, passkey_digits, passkey_weight: rows of each batch replaced by passkey examples,
            digits of a key, weight of the answer digits' cross-entropy added to the loss.
        eval_every, eval_batches: validation loss every so many steps (and at the end), over that many batches.
        checkpoint_every: steps between checkpoints (one is always written when the run stops).
        skip_timing: first steps left out of tokens/s (compilation, warm-up).
        time_budget_s: stop (checkpointed, resumable) once this call's training time passes it; None: no limit.
    """

    steps: int = 60
    batch_size: int = 4
    seqlen: int = 256
    lr: float = 2e-3
    warmup: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    dtype: str = "float32"
    passkey_fraction: float = 0.25
    passkey_digits: int = 4
    passkey_weight: float = 1.0
    eval_every: int = 20
    eval_batches: int = 2
    checkpoint_every: int = 20
    skip_timing: int = 3
    time_budget_s: float | None = None

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def identity(self) -> dict:
        """The fields a checkpoint must agree with to be resumed (all but time_budget_s)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "time_budget_s"}


DESCRIPTION = ("trainability: byte-level LMs on Python's stdlib source, NSA vs dense attention of the same "
               "size; loss curves, tokens/s, passkey retrieval heat map, kernels vs reference in the model "
               "(sizes: tiny for a CPU, gpu)")
MODELS = ("nsa", "dense")  # NSA first: under a time budget, dense is held to the steps NSA reached


@dataclasses.dataclass(frozen=True)
class Size:
    """A named size: the model, the training, the probe and the kernels-vs-reference check."""

    name: str
    model: ModelConfig
    train: TrainConfig
    probe_lengths: tuple[int, ...]
    probe_depths: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    probe_samples: int = 8
    probe_batch: int = 8
    compare_steps: int = 0
    compare_batch: int = 2
    corpus_bytes: int | None = None


SIZES = {
    "tiny": Size("tiny", ModelConfig(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16,
                                     max_seqlen=256,
                                     nsa=NSAConfig(cmp_block=16, cmp_stride=8, slc_block=16, slc_topn=4, window=64)),
                 TrainConfig(steps=150, batch_size=4, seqlen=256, lr=3e-3, warmup=10, eval_every=30,
                             eval_batches=2, checkpoint_every=50, passkey_fraction=0.5, passkey_digits=4),
                 probe_lengths=(128, 192, 256), probe_samples=8, compare_steps=0, corpus_bytes=8_000_000),
    "gpu": Size("gpu", ModelConfig(num_layers=4, hidden_size=512, num_heads=8, num_kv_heads=2, head_dim=128,
                                   max_seqlen=4096, nsa=NSAConfig()),
                TrainConfig(steps=400, batch_size=8, seqlen=4096, lr=1.5e-3, warmup=40, dtype="bfloat16",
                            eval_every=50, eval_batches=4, checkpoint_every=100, skip_timing=5,
                            passkey_fraction=0.5, passkey_digits=5),
                probe_lengths=(512, 1024, 2048, 4096), probe_samples=24, probe_batch=8, compare_steps=8,
                compare_batch=2),
}


def get_size(name: str) -> Size:
    try:
        return SIZES[name]
    except KeyError:
        raise KeyError(f"no train size {name!r}; known sizes: {', '.join(SIZES)}") from None


