"""Where vLLM's paged KV cache keeps each token's K and V: read from the attention backend itself.

A layer's cache is one tensor whose shape and interior order belong to the attention backend and
even to the CPU's instruction set (the CPU backend keeps K transposed inside each (block, head),
then V; AMX builds pack differently; CUDA backends put K and V first). Nothing here assumes one:
``PagedLayout.probe`` writes known values through the layer's own cache-write op
(``impl.do_kv_cache_update``) into the null block (block 0, which vLLM never gives a request) and
reads back where each (K or V, head, token, dim) element landed. The result is an index map
between one block of the cache and the canonical record layout ``[2, kv_heads, tokens, head_dim]``
(docs/key-spec.md §4), used by ``gather`` (save) and ``scatter`` (load) on any device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_BITS = 7  # small integers 0..127 are exact in float32, float16 and bfloat16
_SENTINEL = -1.0
NULL_BLOCK = 0


class LayoutError(RuntimeError):
    """The backend's cache layout could not be read (an unsupported backend or cache dtype)."""


@dataclass
class PagedLayout:
    block_dim: int  # the dimension of the layer's cache tensor that indexes blocks
    source: torch.Tensor  # int64 [2*heads*block*head_dim]: flat position in a block of each canonical element
    block_size: int
    kv_heads: int
    head_dim: int

    def __post_init__(self) -> None:
        self.strides = self._affine()

    def _affine(self) -> list[tuple[int, tuple[int, int, int]]] | None:
        """Per half (K, V): (offset, (head, token, dim) strides) when the block holds that half as
        a strided array (every backend seen so far: the CPU one keeps K as [head][dim][token]);
        then loads are strided copies instead of element gathers. None otherwise."""
        shape = (2, self.kv_heads, self.block_size, self.head_dim)
        where = self.source.view(shape).cpu()
        halves = []
        for half in where:
            base = int(half[0, 0, 0])
            steps = tuple(int(half[tuple(1 if i == axis else 0 for i in range(3))]) - base if half.shape[axis] > 1
                          else 0 for axis in range(3))
            grid = torch.meshgrid(*(torch.arange(n) for n in half.shape), indexing="ij")
            if not torch.equal(half, base + sum(g * st for g, st in zip(grid, steps))):
                return None
            halves.append((base, steps))
        return halves

    @property
    def canonical_size(self) -> int:
        return 2 * self.kv_heads * self.block_size * self.head_dim

    def scatter_record(self, kv_cache: torch.Tensor, block_ids: list[int], record: torch.Tensor,
                       per_record: int, skip: int = 0) -> None:
        """Write a canonical record (flat, on the CPU) covering `per_record` vLLM blocks into the
        blocks `block_ids` (its blocks `skip` and on): strided copies where the backend keeps K and V
        as strided arrays, else ``scatter``."""
        kv = record.view(2, self.kv_heads, per_record * self.block_size, self.head_dim)
        if self.strides is not None and kv_cache.select(self.block_dim, 0).is_contiguous():
            size = (self.kv_heads, self.block_size, self.head_dim)
            for j, block in enumerate(block_ids, start=skip):
                flat = kv_cache.select(self.block_dim, block).reshape(-1)
                for half, (offset, steps) in enumerate(self.strides):
                    dst = flat.as_strided(size, steps, flat.storage_offset() + offset)
                    dst.copy_(kv[half, :, j * self.block_size:(j + 1) * self.block_size], non_blocking=True)
            return
        ids = torch.tensor(block_ids, dtype=torch.int64, device=kv_cache.device)
        self.scatter(kv_cache, ids, kv[:, :, skip * self.block_size:].to(kv_cache.device))

    @classmethod
    def probe(cls, layer: torch.nn.Module, kv_cache: torch.Tensor, num_blocks: int, block_size: int,
              kv_heads: int, head_dim: int) -> "PagedLayout":
        if kv_cache.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise LayoutError(f"KV cache dtype {kv_cache.dtype} is not supported by the record format "
                              "(float32, float16, bfloat16)")
        dims = [d for d, size in enumerate(kv_cache.shape) if size == num_blocks]
        if len(dims) != 1:
            raise LayoutError(f"cannot tell the block dimension of a KV cache of shape {tuple(kv_cache.shape)} "
                              f"({num_blocks} blocks)")
        block_dim = dims[0]
        block = kv_cache.select(block_dim, NULL_BLOCK)
        saved = block.clone()
        device = kv_cache.device
        count = 2 * kv_heads * block_size * head_dim
        canonical = torch.arange(count, device=device).view(2, kv_heads, block_size, head_dim)
        slots = torch.arange(NULL_BLOCK * block_size, (NULL_BLOCK + 1) * block_size, device=device, dtype=torch.int64)
        found = torch.zeros(block.numel(), dtype=torch.int64, device=device)
        written = torch.ones(block.numel(), dtype=torch.bool, device=device)
        try:
            shift = 0
            while (1 << shift) < count:
                digits = ((canonical >> shift) & ((1 << _BITS) - 1)).to(kv_cache.dtype)
                block.fill_(_SENTINEL)
                # the op takes [tokens, heads, head_dim]; canonical is [K|V, heads, tokens, head_dim]
                key = digits[0].transpose(0, 1).contiguous()
                value = digits[1].transpose(0, 1).contiguous()
                layer.impl.do_kv_cache_update(layer, key, value, kv_cache, slots)
                got = block.reshape(-1).to(torch.float32)
                written &= got != _SENTINEL
                found |= got.clamp(min=0).to(torch.int64) << shift
                shift += _BITS
        except (AttributeError, NotImplementedError, RuntimeError, TypeError) as exc:
            raise LayoutError(f"the attention backend's cache write could not be probed: {exc}") from exc
        finally:
            block.copy_(saved)
        positions = written.nonzero().flatten()
        values = found[positions]
        if positions.numel() != count or not torch.equal(torch.sort(values).values,
                                                         torch.arange(count, device=device)):
            raise LayoutError(f"the backend's cache block does not hold each of the {count} K/V elements once")
        source = torch.empty(count, dtype=torch.int64, device=device)
        source[values] = positions
        return cls(block_dim, source, block_size, kv_heads, head_dim)

    def gather(self, kv_cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
        """The KV of `block_ids` (in order) as one canonical [2, kv_heads, n*block, head_dim] tensor."""
        n = block_ids.numel()
        blocks = kv_cache.index_select(self.block_dim, block_ids).movedim(self.block_dim, 0).reshape(n, -1)
        # index_select over same-sized integers: a bit copy, and far faster than float fancy indexing
        flat = blocks.view(_BITS_OF[blocks.element_size()]).index_select(1, self.source).view(kv_cache.dtype)
        flat = flat.view(n, 2, self.kv_heads, self.block_size, self.head_dim)
        return flat.permute(1, 2, 0, 3, 4).reshape(2, self.kv_heads, n * self.block_size, self.head_dim)

    def scatter(self, kv_cache: torch.Tensor, block_ids: torch.Tensor, kv: torch.Tensor) -> None:
        """Write canonical [2, kv_heads, n*block, head_dim] `kv` into the blocks `block_ids`."""
        n = block_ids.numel()
        values = kv.view(2, self.kv_heads, n, self.block_size, self.head_dim).permute(2, 0, 1, 3, 4).reshape(n, -1)
        blocks = kv_cache.index_select(self.block_dim, block_ids).movedim(self.block_dim, 0)
        shape = blocks.shape
        blocks = blocks.reshape(n, -1)  # a copy: index_select made one
        as_int = _BITS_OF[blocks.element_size()]
        blocks.view(as_int).index_copy_(1, self.source, values.to(kv_cache.dtype).view(as_int))
        kv_cache.index_copy_(self.block_dim, block_ids, blocks.view(shape).movedim(0, self.block_dim))


_BITS_OF = {2: torch.int16, 4: torch.int32}
