"""A byte-level text corpus that is on every machine with Python: the standard library's own source.

Why this corpus: it installs offline with the interpreter (no download, no data set licence to check), it is
real text with long-range structure (imports, definitions used far below, matching brackets and indentation),
and byte-level tokens need no tokenizer to train. Files are read in sorted order of their path relative to the
stdlib root and split into train/val by a hash of that path, so the split is the same on every run and does
not move when a file is added elsewhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
import zlib
from pathlib import Path

import torch

VOCAB_SIZE = 256  # bytes
FILE_SEPARATOR = b"\n\n"
VAL_EVERY = 20  # about one file in 20 is held out (by path hash)


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def source_files(root: Path) -> list[Path]:
    """Every .py file under `root`, third-party packages excluded, in sorted relative-path order."""
    files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_val_file(relative_path: str) -> bool:
    return zlib.crc32(relative_path.encode()) % VAL_EVERY == 0


@dataclasses.dataclass
class ByteCorpus:
    """Train and val byte streams (uint8 tensors) and where they came from.

    Batches are drawn by `batch(split, step, ...)` from a generator seeded by (seed, step) alone, so the batch
    of any step is known without replaying earlier ones: a resumed run sees exactly the data it would have seen.
    """

    train: torch.Tensor
    val: torch.Tensor
    root: str
    num_files: int
    sha256: str

    @classmethod
    def load(cls, root: Path | None = None, *, max_bytes: int | None = None) -> ByteCorpus:
        """Read the corpus (about 30 MB of CPython 3.11's stdlib). `max_bytes` caps it, keeping the split's
        proportions: val gets 1/VAL_EVERY of the cap, train the rest, each filled in file order (the last file
        cut to fit)."""
        root = Path(root) if root is not None else stdlib_root()
        files = source_files(root)
        if not files:
            raise FileNotFoundError(f"no .py files under {root}: the train suite needs Python's stdlib source "
                                    "(some distributions ship only .pyc; install the python3 source package)")
        room = {"train": float("inf"), "val": float("inf")}
        if max_bytes is not None:
            room = {"val": max_bytes // VAL_EVERY, "train": max_bytes - max_bytes // VAL_EVERY}
        parts = {"train": [], "val": []}
        digest, used = hashlib.sha256(), 0
        for path in files:
            split = "val" if is_val_file(path.relative_to(root).as_posix()) else "train"
            if room[split] <= 0:
                if all(r <= 0 for r in room.values()):
                    break
                continue
            data = (path.read_bytes() + FILE_SEPARATOR)[:room[split] if room[split] != float("inf") else None]
            parts[split].append(data)
            room[split] -= len(data)
            digest.update(data)
            used += 1

        def tensor(chunks):
            return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

        return cls(tensor(parts["train"]), tensor(parts["val"]), str(root), used, digest.hexdigest())

    def stream(self, split: str) -> torch.Tensor:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train if split == "train" else self.val

    def batch(self, split: str, step: int, batch_size: int, seqlen: int, *, seed: int = 0) -> torch.Tensor:
        """[batch_size, seqlen + 1] int64 windows of the stream (inputs are [:, :-1], targets [:, 1:])."""
        data = self.stream(split)
        if len(data) <= seqlen + 1:
            raise ValueError(f"the {split} split has {len(data)} bytes, fewer than seqlen + 1 = {seqlen + 1}")
        gen = generator(seed, step, 0 if split == "train" else 1)
        starts = torch.randint(0, len(data) - seqlen - 1, (batch_size,), generator=gen)
        return torch.stack([data[s:s + seqlen + 1] for s in starts.tolist()]).long()

    def describe(self) -> dict:
        return {"root": self.root, "files": self.num_files, "train_bytes": len(self.train),
                "val_bytes": len(self.val), "sha256": self.sha256}


def generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator determined by (seed, step, stream) alone."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 8 + stream)
