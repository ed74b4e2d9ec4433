"""The decoding KV cache of the kernels: a batch of sequences of different lengths, contiguous or paged.

Token s of sequence b lives in row s % page_size of page block_table[b, s // page_size] of `k_pages` /
`v_pages` [num_pages, page_size, Hkv, D] (FlashAttention's `flash_attn_with_kvcache` paging). A contiguous cache
is the same thing with one page of `capacity` tokens per sequence, so the kernels have one addressing path.

The compressed keys/values k_cmp, v_cmp [B, cmp_capacity, Hkv, D] grow by one entry when a token completes a
compression block (tokens [i*d, i*d+l)). Lengths live on the device (`seqlens`, int32 [B]) and `append` never
reads them back: it compresses every block the new tokens *could* complete and sends the writes of blocks that
did not complete to a scratch row. One decode step is therefore free of host synchronisation and can be
captured in a CUDA graph; the price is running the compressors on B * (floor((n-1)/d) + 1) blocks per append
instead of only the completed ones (one block per sequence for plain decoding).
"""

from __future__ import annotations

import torch

from nsa.config import NSAConfig
from nsa.inputs import FLOAT_DTYPES, check_config


def num_cmp_blocks(seqlens: torch.Tensor, config: NSAConfig) -> torch.Tensor:
    """Tc of each length (a device tensor in, a device tensor out): (S - l) // d + 1, or 0 when S < l."""
    full = seqlens - config.cmp_block
    return torch.where(full >= 0, torch.div(full, config.cmp_stride, rounding_mode="floor") + 1, 0)


class KVCache:
    """Keys, values and compressed keys/values of a batch of sequences, on one device, for `nsa_decode`.

    Args:
        batch_size, num_kv_heads, head_dim: sizes; head_dim_v defaults to head_dim.
        config: the NSAConfig the cache is compressed for.
        capacity: most tokens one sequence may hold.
        k_compressor, v_compressor: callables mapping blocks [N, l, Hkv, D] to [N, 1, Hkv, D] (for example
            `nsa.reference.Compressor` modules), or None for a cache that is only read (see `from_tensors`).
        dtype, device: of every stored tensor.
        page_size: tokens per page for a paged cache; None for a contiguous one.
        num_pages, block_table: a paged cache's pool size and int32 [B, pages per sequence] table; by default
            sequence b owns pages b * P .. (b+1) * P - 1, P = ceil(capacity / page_size). A serving engine
            may pass its own table (every entry < num_pages, no page shared by two sequences).
        pages: existing pools (k_pages, v_pages) to use instead of allocating new ones (no copy).

    Attributes:
        k_pages, v_pages: [num_pages, page_size, Hkv, D].
        block_table: int32 [B, pages per sequence].
        k_cmp, v_cmp: [B, cmp_capacity, Hkv, D] views (the scratch row excluded).
        seqlens: int32 [B] on the device.
        lengths: host copy of seqlens, kept by this object's methods without reading the device. After
            replaying a captured step, call `sync_lengths()`.
    """

    def __init__(self, batch_size: int, num_kv_heads: int, head_dim: int, config: NSAConfig, *, capacity: int,
                 k_compressor=None, v_compressor=None, head_dim_v: int | None = None, dtype=torch.bfloat16,
                 device="cuda", page_size: int | None = None, num_pages: int | None = None,
                 block_table: torch.Tensor | None = None, pages: tuple[torch.Tensor, torch.Tensor] | None = None):
        check_config(config)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"KVCache dtype must be floating, got {dtype}")
        sizes = dict(batch_size=batch_size, num_kv_heads=num_kv_heads, head_dim=head_dim, capacity=capacity,
                     head_dim_v=head_dim_v or head_dim, page_size=page_size or capacity)
        for name, value in sizes.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"KVCache {name} must be an int >= 1, got {value!r}")
        self.config = config
        self.num_kv_heads, self.head_dim, self.head_dim_v = num_kv_heads, head_dim, sizes["head_dim_v"]
        self.k_compressor, self.v_compressor = k_compressor, v_compressor
        device = torch.device(device)

        self.page_size = sizes["page_size"]
        pages_per_seq = -(-capacity // self.page_size)
        if block_table is None:
            block_table = torch.arange(batch_size * pages_per_seq, dtype=torch.int32, device=device)
            block_table = block_table.view(batch_size, pages_per_seq)
        else:
            if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 \
                    or block_table.dim() != 2 or block_table.shape[0] != batch_size:
                raise ValueError(f"block_table must be int32 [B={batch_size}, pages per sequence], got "
                                 f"{getattr(block_table, 'dtype', None)} {tuple(getattr(block_table, 'shape', ()))}")
            pages_per_seq = block_table.shape[1]
            block_table = block_table.to(device).contiguous()
        low, high = int(block_table.min()), int(block_table.max())  # read back once, at construction
        num_pages = high + 1 if num_pages is None else num_pages
        if low < 0 or high >= num_pages:
            raise ValueError(f"block_table entries must lie in [0, num_pages={num_pages})")
        self.block_table = block_table
        self.capacity = pages_per_seq * self.page_size

        shapes = ((num_pages, self.page_size, num_kv_heads, head_dim),
                  (num_pages, self.page_size, num_kv_heads, self.head_dim_v))
        if pages is None:
            pages = tuple(torch.zeros(shape, dtype=dtype, device=device) for shape in shapes)
        elif tuple(tuple(x.shape) for x in pages) != shapes or any(
                x.dtype != dtype or x.device != device or not x.is_contiguous() for x in pages):
            raise ValueError(f"pages must be contiguous {dtype} tensors on {device} of shapes {shapes}")
        self.k_pages, self.v_pages = pages
        self.cmp_capacity = config.num_cmp_blocks(self.capacity)
        # One scratch row past cmp_capacity: the target of blocks that `append` compressed but did not complete.
        self._k_cmp = torch.zeros(batch_size, self.cmp_capacity + 1, num_kv_heads, head_dim, dtype=dtype,
                                  device=device)
        self._v_cmp = torch.zeros(batch_size, self.cmp_capacity + 1, num_kv_heads, self.head_dim_v, dtype=dtype,
                                  device=device)
        self.seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)
        self.lengths = [0] * batch_size

    @classmethod
    def from_tensors(cls, k, v, k_cmp, v_cmp, config: NSAConfig, *, k_compressor=None, v_compressor=None):
        """A full contiguous cache over k, v [B, T, Hkv, D] (no copy: the cache's pages are views of them) and
        k_cmp, v_cmp [B, Tc(T), Hkv, D] (copied), every sequence holding T tokens."""
        batch, seqlen, num_kv_heads, head_dim = k.shape
        num_cmp = config.num_cmp_blocks(seqlen)
        want = ((batch, seqlen, num_kv_heads, v.shape[-1]), (batch, num_cmp, num_kv_heads, head_dim),
                (batch, num_cmp, num_kv_heads, v.shape[-1]))
        if k.dim() != 4 or (tuple(v.shape), tuple(k_cmp.shape), tuple(v_cmp.shape)) != want:
            raise ValueError(f"from_tensors expects k [B, T, Hkv, Dk], v [B, T, Hkv, Dv], k_cmp, v_cmp "
                             f"[B, Tc={num_cmp}, Hkv, D], got {tuple(k.shape)}, {tuple(v.shape)}, "
                             f"{tuple(k_cmp.shape)}, {tuple(v_cmp.shape)}")
        cache = cls(batch, num_kv_heads, head_dim, config, capacity=seqlen, head_dim_v=v.shape[-1],
                    k_compressor=k_compressor, v_compressor=v_compressor, dtype=k.dtype, device=k.device,
                    pages=(k.contiguous(), v.contiguous()))
        cache._k_cmp[:, :num_cmp] = k_cmp
        cache._v_cmp[:, :num_cmp] = v_cmp
        cache.seqlens.fill_(seqlen)
        cache.lengths = [seqlen] * batch
        return cache

    @property
    def batch_size(self) -> int:
        return self.block_table.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.k_pages.dtype

    @property
    def device(self) -> torch.device:
        return self.k_pages.device

    @property
    def k_cmp(self) -> torch.Tensor:
        return self._k_cmp[:, :self.cmp_capacity]

    @property
    def v_cmp(self) -> torch.Tensor:
        return self._v_cmp[:, :self.cmp_capacity]

    def sync_lengths(self) -> list[int]:
        """Refresh the host lengths from the device (one synchronisation), e.g. after CUDA-graph replays."""
        self.lengths = self.seqlens.tolist()
        return self.lengths

    def token_rows(self, positions: torch.Tensor, sequences: slice = slice(None)) -> torch.Tensor:
        """Rows of the flattened pages [num_pages * page_size] holding positions [B', m] of the sequences
        `sequences` (all B by default): int64 [B', m]."""
        positions = positions.long()
        pages = torch.gather(self.block_table[sequences].long(), 1, positions // self.page_size)
        return pages * self.page_size + positions % self.page_size

    def gather(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values at positions [B, m] (each below capacity): [B, m, Hkv, Dk], [B, m, Hkv, Dv]."""
        rows = self.token_rows(positions).flatten()
        batch, m = positions.shape
        k = self.k_pages.flatten(0, 1).index_select(0, rows).view(batch, m, self.num_kv_heads, self.head_dim)
        v = self.v_pages.flatten(0, 1).index_select(0, rows).view(batch, m, self.num_kv_heads, self.head_dim_v)
        return k, v

    def check_tokens(self, k: torch.Tensor, v: torch.Tensor) -> int:
        """Validate new tokens k [B, n, Hkv, Dk], v [B, n, Hkv, Dv]; returns n."""
        want = (self.batch_size, k.shape[1] if k.dim() == 4 else -1, self.num_kv_heads)
        if k.dim() != 4 or v.dim() != 4 or tuple(k.shape) != want + (self.head_dim,) \
                or tuple(v.shape) != want + (self.head_dim_v,) or k.shape[1] < 1:
            raise ValueError(f"expected k [B={self.batch_size}, n>=1, {self.num_kv_heads}, {self.head_dim}] and v "
                             f"[B, n, {self.num_kv_heads}, {self.head_dim_v}], got {tuple(k.shape)}, {tuple(v.shape)}")
        if k.dtype != self.dtype or v.dtype != self.dtype or k.device != self.device or v.device != self.device:
            raise ValueError(f"k/v must be {self.dtype} on {self.device}, got {k.dtype}/{v.dtype} on "
                             f"{k.device}/{v.device}")
        n = k.shape[1]
        if max(self.lengths) + n > self.capacity:
            raise ValueError(f"appending {n} tokens overflows the cache: lengths {self.lengths}, capacity "
                             f"{self.capacity}")
        return n

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append n new tokens to every sequence (k [B, n, Hkv, Dk], v [B, n, Hkv, Dv]) and compress the blocks
        they complete. Device work only: no host synchronisation, capturable in a CUDA graph."""
        n = self.check_tokens(k, v)
        if self.k_compressor is None or self.v_compressor is None:
            raise RuntimeError("this cache has no compressors, so it cannot grow (see KVCache.from_tensors)")
        config = self.config
        steps = torch.arange(n, device=self.device)
        rows = self.token_rows(self.seqlens[:, None] + steps).flatten()
        self.k_pages.flatten(0, 1).index_copy_(0, rows, k.flatten(0, 1))
        self.v_pages.flatten(0, 1).index_copy_(0, rows, v.flatten(0, 1))

        old, new = num_cmp_blocks(self.seqlens, config), num_cmp_blocks(self.seqlens + n, config)
        candidates = old[:, None] + torch.arange((n - 1) // config.cmp_stride + 1, device=self.device)  # [B, m]
        positions = candidates[:, :, None] * config.cmp_stride + torch.arange(config.cmp_block, device=self.device)
        positions = positions.clamp(max=self.capacity - 1).flatten(1)  # blocks past capacity never complete
        block_k, block_v = self.gather(positions)
        shape = (-1, config.cmp_block, self.num_kv_heads)
        new_k = self.k_compressor(block_k.reshape(*shape, self.head_dim))
        new_v = self.v_compressor(block_v.reshape(*shape, self.head_dim_v))
        target = torch.where(candidates < new[:, None], candidates, self.cmp_capacity)
        target = (target + torch.arange(self.batch_size, device=self.device)[:, None] * (self.cmp_capacity + 1))
        self._k_cmp.flatten(0, 1).index_copy_(0, target.flatten(), new_k.flatten(0, 1).to(self.dtype))
        self._v_cmp.flatten(0, 1).index_copy_(0, target.flatten(), new_v.flatten(0, 1).to(self.dtype))
        self.seqlens += n
        self.lengths = [length + n for length in self.lengths]

    def write_prompts(self, k: torch.Tensor, v: torch.Tensor, k_cmp: torch.Tensor, v_cmp: torch.Tensor,
                      lengths: list[int]) -> None:
        """Fill an empty cache with prompts packed along dim 0 (k [sum(lengths), Hkv, Dk], k_cmp
        [sum Tc(length), Hkv, Dk], ...), sequence b taking the b-th length. Used by prefill."""
        if any(self.lengths):
            raise ValueError("write_prompts needs an empty cache")
        if len(lengths) != self.batch_size or max(lengths) > self.capacity:
            raise ValueError(f"expected {self.batch_size} prompt lengths of at most {self.capacity}, got {lengths}")
        token, entry = 0, 0
        for b, length in enumerate(lengths):
            rows = self.token_rows(torch.arange(length, device=self.device)[None], slice(b, b + 1))[0]
            self.k_pages.flatten(0, 1).index_copy_(0, rows, k[token:token + length].to(self.dtype))
            self.v_pages.flatten(0, 1).index_copy_(0, rows, v[token:token + length].to(self.dtype))
            num_cmp = self.config.num_cmp_blocks(length)
            self._k_cmp[b, :num_cmp] = k_cmp[entry:entry + num_cmp]
            self._v_cmp[b, :num_cmp] = v_cmp[entry:entry + num_cmp]
            token, entry = token + length, entry + num_cmp
        self.seqlens.copy_(torch.tensor(lengths, dtype=torch.int32))
        self.lengths = list(lengths)
