"""Several GPUs, one process each, under torchrun: which rank this is, its device, and the few messages.

`torchrun --nproc-per-node N -m nsa tune ...` (`--nnodes M` and a rendezvous endpoint for several hosts) starts
one process per GPU and sets RANK, WORLD_SIZE and LOCAL_RANK; `World.from_env()` reads them (a plain `nsa tune`
is a world of one). Rank k works on cuda:LOCAL_RANK. Ranks exchange only small Python objects (the work plan,
finished results), so the process group is gloo on every device: no NCCL communicator, no GPU memory, and the
CPU test path is the GPU one. Its timeout is long because a rank that finishes its share early waits in the
final gather for the slowest one; when a rank dies, torchrun stops the others, it is not a hang.

Finished work is not kept in memory alone: each rank appends it to its own shard file (`ShardLog`) as it goes,
so when a rank dies the others' work survives on disk and a rerun skips it. Hosts need not share a filesystem:
at the start every rank reads the shard files it can see and rank 0 gathers them all.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
from pathlib import Path

log = logging.getLogger("nsa.tuner")

# A rank done with its share waits for the slowest in the final gather; a long tune may be hours unbalanced.
TIMEOUT = datetime.timedelta(hours=24)


class World:
    """This process's place among torchrun's: rank, size, local rank (its GPU on this host)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0):
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} outside a world of {size}")
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self._group = False

    @classmethod
    def from_env(cls, environ=None) -> "World":
        """From torchrun's RANK, WORLD_SIZE and LOCAL_RANK; a world of one when they are not set."""
        env = os.environ if environ is None else environ
        size = int(env.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        rank = int(env["RANK"])
        return cls(rank, size, int(env.get("LOCAL_RANK", rank)))

    def __repr__(self) -> str:
        return f"World(rank={self.rank}, size={self.size}, local_rank={self.local_rank})"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """This rank's device: in a world of several, cuda:LOCAL_RANK for any CUDA `device` (an index given is
        replaced); else `device` as it is."""
        import torch
        dev = torch.device(device)
        if dev.type != "cuda" or self.size == 1:
            return str(dev)
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise RuntimeError(f"local rank {self.local_rank} has no GPU: this host has {count}; start at most "
                               f"{count} processes per node")
        return f"cuda:{self.local_rank}"

    @contextlib.contextmanager
    def started(self, device: str):
        """Join the process group (gloo) and pin this rank's GPU for the block; yields this rank's device. A
        process group the caller already started is used as it is (and left to the caller)."""
        import torch
        import torch.distributed as dist
        mine = self.device(device)
        if torch.device(mine).type == "cuda" and torch.device(mine).index is not None:
            torch.cuda.set_device(torch.device(mine))  # Triton launches on the current device
        if self.size == 1 or dist.is_initialized():
            self._group = self.size > 1
            yield mine
            return
        dist.init_process_group("gloo", rank=self.rank, world_size=self.size, timeout=TIMEOUT)
        self._group = True
        try:
            yield mine
        finally:
            self._group = False
            dist.destroy_process_group()

    # -- messages: identity in a world of one ------------------------------------------------------------------

    def _check(self) -> None:
        if self.size > 1 and not self._group:
            raise RuntimeError("World.started() must be entered before ranks exchange messages")

    def broadcast(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.size == 1:
            return obj
        self._check()
        import torch.distributed as dist
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        self._check()
        import torch.distributed as dist
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def gather(self, obj) -> list | None:
        """Every rank's `obj` in rank order on rank 0; None elsewhere."""
        if self.size == 1:
            return [obj]
        self._check()
        import torch.distributed as dist
        out = [None] * self.size if self.is_main else None
        dist.gather_object(obj, out, dst=0)
        return out

    def on_main(self, fn):
        """fn() run on rank 0, its value on every rank. If it raises there, every rank raises (rank 0 its own
        exception, the others a RuntimeError quoting it), rather than waiting for a message that never comes."""
        if self.size == 1:
            return fn()
        value, error = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as e:
                error = e
        value, message = self.broadcast((value, None if error is None else f"{type(error).__name__}: {error}"))
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"rank 0 failed: {message}")
        return value

    def share(self, items: list) -> list:
        """This rank's items: round-robin over `items` (the same list on every rank)."""
        return items[self.rank::self.size]


# ----------------------------------------------------------------------------------------------------------------
# Shard files: each rank's finished work, one JSON object a line
# ----------------------------------------------------------------------------------------------------------------


class ShardLog:
    """Rank k's finished work in `<folder>/rank<k>.jsonl`: one record appended (one write, flushed) per item as
    it finishes, so a killed process loses at most the item in progress. Records of earlier runs stay."""

    def __init__(self, folder, rank: int):
        self.path = Path(folder) / f"rank{rank}.jsonl"

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(record) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()


def read_shards(folder) -> list[dict]:
    """Every record of every shard file in `folder` (rank order, then file order). A line that does not parse
    (the tail of a process killed mid-write) is skipped."""
    records = []
    folder = Path(folder)
    if not folder.is_dir():
        return records
    for path in sorted(folder.glob("rank*.jsonl")):
        try:
            lines = path.read_text().splitlines()
        except OSError as e:
            log.warning("shards: %s unreadable (%s); its work will be redone", path, e)
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def remove_shards(folder, rank: int | None = None) -> None:
    """Delete rank `rank`'s shard file, or (None) every shard file and then the folder when it is empty."""
    folder = Path(folder)
    paths = [ShardLog(folder, rank).path] if rank is not None else list(folder.glob("rank*.jsonl"))
    for path in paths:
        path.unlink(missing_ok=True)
    if rank is None:
        with contextlib.suppress(OSError):
            folder.rmdir()
