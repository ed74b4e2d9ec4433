"""Passkey retrieval (needle in a haystack), as in the NSA paper's Figure 5, for the byte LMs.

A passkey of random digits is written once, as a code comment, at a chosen depth of a stretch of held-out
source code; the example ends with the question, and the model must produce the digits. The key is framed by
`$`, a byte rare in Python source, so that a byte-level model can find it by content (the paper's wording
spans many BPE tokens; here the frame is one byte).

A tiny LM trained for minutes on code would never do this zero-shot, so training mixes such examples into its
batches: a fixed fraction of rows start with an example of random length (T/8 to T) and depth, filler from the
train split, and the answer digits' cross-entropy is added to the loss. Both models see the same examples.
The report says so: the probe measures whether each attention can *learn* long-range retrieval within the
budget, not an emergent ability.

Accuracy is exact match of the teacher-forced argmax at every answer digit, which equals greedy decoding's
exact match (greedy can only diverge after a first wrong digit) but needs one forward pass and no cache.
"""

from __future__ import annotations

import pandas as pd
import torch

from nsa.progress import progress_bar
from nsa.suites.training.corpus import ByteCorpus, generator
from nsa.suites.training.model import autocast

NEEDLE = "\n# pass key: ${key}$\n"
QUESTION = "\n# pass key? $"


def template_bytes(digits: int) -> int:
    """Bytes of a passkey example that are not filler (needle, question, answer)."""
    return len(NEEDLE.format(key="0" * digits)) + len(QUESTION) + digits


def make_example(stream: torch.Tensor, gen: torch.Generator, length: int, depth: float, digits: int):
    """One example of `length` input tokens: ([length + 1] int64 tokens, key). The needle starts after
    round(depth * filler) filler bytes, depth in [0, 1]; the key is the sequence's last `digits` bytes."""
    filler = length + 1 - template_bytes(digits)
    if filler < 0:
        raise ValueError(f"a passkey example of {length} tokens needs at least {template_bytes(digits) - 1}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = "".join(str(d) for d in torch.randint(0, 10, (digits,), generator=gen).tolist())
    start = int(torch.randint(0, len(stream) - filler, (1,), generator=gen))
    text = stream[start:start + filler]
    cut = round(depth * filler)
    pieces = [text[:cut], _encode(NEEDLE.format(key=key)), text[cut:], _encode(QUESTION + key)]
    return torch.cat(pieces).long(), key


def _encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode()), dtype=torch.uint8)


def mix_into(tokens: torch.Tensor, corpus: ByteCorpus, step: int, *, fraction: float, digits: int,
             seed: int) -> torch.Tensor:
    """Overwrite the start of a deterministic `fraction` of the rows of a training batch [B, T+1] with passkey
    examples of L input tokens (L uniform in [T/8, T], as the probe's sequences, which also start at position
    0; the row's own code follows the answer). Returns the answer mask [B, T] (False in untouched rows)."""
    batch, seqlen = tokens.shape[0], tokens.shape[1] - 1
    mask = torch.zeros(batch, seqlen, dtype=torch.bool)
    if fraction <= 0:
        return mask
    gen = generator(seed, step, 2)
    chosen = torch.rand(batch, generator=gen) < fraction
    shortest = min(seqlen, max(seqlen // 8, template_bytes(digits)))
    for row in chosen.nonzero().flatten().tolist():
        length = int(torch.randint(shortest, seqlen + 1, (1,), generator=gen))
        depth = float(torch.rand(1, generator=gen))
        tokens[row, :length + 1], _ = make_example(corpus.train, gen, length, depth, digits)
        mask[row, length - digits:length] = True
    return mask


@torch.no_grad()
def probe(model, corpus: ByteCorpus, *, lengths, depths, samples: int, digits: int, seed: int, device,
          batch_size: int = 8, dtype: str = "float32", progress: bool = False) -> pd.DataFrame:
    """Accuracy per (length, depth) on held-out filler: one row each with `samples`, `accuracy` (exact match of
    all digits) and `digit_accuracy` (fraction of digits right)."""
    was_training = model.training
    model.eval()
    rows = []
    cells = [(length, depth) for length in lengths for depth in depths]
    for cell, (length, depth) in enumerate(progress_bar(cells, desc="passkey probe", enabled=progress, leave=False)):
        gen = generator(seed, cell, 3)
        examples = [make_example(corpus.val, gen, length, depth, digits)[0] for _ in range(samples)]
        exact = digit_hits = 0
        for first in range(0, samples, batch_size):
            seqs = torch.stack(examples[first:first + batch_size]).to(device)
            with autocast(device, dtype):
                logits = model(seqs[:, :-1])[:, length - digits:]
            hits = logits.argmax(-1) == seqs[:, 1:][:, length - digits:]
            exact += int(hits.all(-1).sum())
            digit_hits += int(hits.sum())
        rows.append({"length": length, "depth": depth, "samples": samples, "accuracy": exact / samples,
                     "digit_accuracy": digit_hits / (samples * digits)})
    model.train(was_training)
    return pd.DataFrame(rows)
