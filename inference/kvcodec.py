"""Codec `zstd-grouped` (record codec id 2): lossless KV compression with per-channel-group tables.

What the data says (`kvbench compress`, SmolLM2 bf16 KV): the mantissa is close to uniform, the
information is in the top of each value (sign, exponent and the first mantissa bits), and its
distribution depends on the channel (keys have outlier channels; values barely do). So each part
(K, then V, each [kv_heads, tokens, head_dim]) is split into
  * a *top field* (sign, exponent, first mantissa bit or two), mapped through a per-part table of
    the values present to one byte symbol, and coded either token-major in one stream or
    channel-major in groups of channels with similar histograms (k-means on the histograms), one
    zstd frame per group, so each group gets its own Huffman table;
  * the *low field* (the remaining mantissa bits), as byte planes, one zstd frame each.
zstd's Huffman stage (huff0) is the entropy coder; its LZ stage also catches repeated rows (layer 0
values are a function of the token alone) and runs in slowly rotating key channels. The encoder
tries a few layouts per part and keeps the smallest; the decoder is fixed and cheap: decode the
frames (optionally on several threads), put the group rows back, transpose, one table lookup and an
OR per value.

Payload v1 (little-endian): version u8 = 1, parts u8 = 2; per part a descriptor
  low_bits u8 | layout u8 (0 token-major, 1 channel groups) | symbols u16 | groups u16 |
  low planes u8 | 3 reserved bytes, then the table (symbols x u16: the top field of each symbol),
  for groups: groups x u16 sizes and channels x u16 channel order, then (frames) x u32 frame sizes;
then every part's frames in order. Pure functions, no I/O.
"""

from __future__ import annotations

import functools
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

VERSION = 1
PREAMBLE = struct.Struct("<BB")
PART = struct.Struct("<BBHHB3x")
TOKEN_MAJOR, CHANNEL_GROUPS = 0, 1
UINT = {2: np.uint16, 4: np.uint32}
# (bits of the whole value, bits of sign + exponent) per element size; bf16 and fp32 share 9
SIGN_EXP_BITS = {torch.bfloat16: 9, torch.float16: 6, torch.float32: 9}
MIN_GROUP_VALUES = 12_288  # a group's Huffman table costs ~30-60 bytes: keep groups large enough
MAX_GROUPS = 16
GROUPS_PENALTY = 0.01  # keep token-major unless groups save over 1% (values: ~0.3%, keys: ~5%)


class CorruptPayload(ValueError):
    """The compressed payload does not decode (the caller maps it to its record error)."""


@dataclass(frozen=True)
class Part:
    low_bits: int
    layout: int
    table: np.ndarray  # uint16 top-field value per symbol
    group_sizes: np.ndarray  # uint16, channel groups (empty for token-major)
    channel_order: np.ndarray  # uint16, channels in group order (empty for token-major)
    frames: list[bytes]

    def pack(self) -> tuple[bytes, list[bytes]]:
        low_planes = len(self.frames) - (len(self.group_sizes) if self.layout == CHANNEL_GROUPS else 1)
        head = PART.pack(self.low_bits, self.layout, len(self.table), len(self.group_sizes), low_planes)
        sizes = np.array([len(f) for f in self.frames], dtype="<u4")
        body = [self.table.astype("<u2"), self.group_sizes.astype("<u2"), self.channel_order.astype("<u2"), sizes]
        return head + b"".join(a.tobytes() for a in body), self.frames


# ---- encode -------------------------------------------------------------------------------------
def encode(raw: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, int, int, int], level: int = 1) -> bytes:
    """Compress the raw K‖V bytes of a record of `shape` [2, kv_heads, tokens, head_dim]."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    values = np.frombuffer(raw, dtype=UINT[itemsize]).reshape(shape)
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    heads, frames = [], []
    for part in values:
        head, part_frames = _best_part(part, itemsize * 8, SIGN_EXP_BITS[dtype], compressor).pack()
        heads.append(head)
        frames += part_frames
    return PREAMBLE.pack(VERSION, len(heads)) + b"".join(heads) + b"".join(frames)


def _best_part(part: np.ndarray, bits: int, sign_exp: int, compressor) -> Part:
    """The smallest of a few candidate layouts: top field of sign+exponent plus 1 or 2 mantissa bits,
    token-major or in channel groups; the top byte alone if the top field has over 256 values."""
    candidates = []
    for top_bits in (sign_exp + 1, sign_exp + 2):
        if top_bits >= bits:
            continue
        mapped = _symbols(part, bits - top_bits)
        if mapped is not None:
            candidates += _layouts(part, bits - top_bits, *mapped, compressor)
    if not candidates:  # over 256 distinct top fields: the top byte as is (byte planes)
        candidates = _layouts(part, bits - 8, *_symbols(part, bits - 8), compressor)
    return min(candidates, key=_cost)


def _cost(part: Part) -> float:
    """Stored bytes, with channel groups charged GROUPS_PENALTY more: they cost a transpose to decode."""
    size = sum(map(len, part.frames)) + 2 * len(part.table) + 2 * len(part.channel_order)
    return size * (1 + GROUPS_PENALTY) if part.layout == CHANNEL_GROUPS else size


def _symbols(part: np.ndarray, low_bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    top = part >> low_bits
    counts = np.bincount(top.ravel(), minlength=1)
    table = np.flatnonzero(counts).astype(np.uint16)
    if len(table) > 256:
        return None
    rank = np.zeros(len(counts), dtype=np.uint8)
    rank[table] = np.arange(len(table), dtype=np.uint8)
    return table, rank[top]


def _layouts(part: np.ndarray, low_bits: int, table: np.ndarray, symbols: np.ndarray, compressor) -> list[Part]:
    low = [compressor.compress(p) for p in _low_planes(part, low_bits)]
    empty = np.empty(0, dtype=np.uint16)
    out = [Part(low_bits, TOKEN_MAJOR, table, empty, empty, [compressor.compress(symbols.tobytes()), *low])]
    heads, tokens, head_dim = part.shape
    channels = heads * head_dim
    groups = min(MAX_GROUPS, channels, symbols.size // MIN_GROUP_VALUES)
    if groups >= 1 and tokens > 1:
        by_channel = np.ascontiguousarray(symbols.transpose(0, 2, 1)).reshape(channels, tokens)
        members = channel_groups(by_channel, len(table), groups)
        frames = [compressor.compress(by_channel[m].tobytes()) for m in members]
        sizes = np.array([len(m) for m in members], dtype=np.uint16)
        out.append(Part(low_bits, CHANNEL_GROUPS, table, sizes, np.concatenate(members).astype(np.uint16),
                        frames + low))
    return out


def _low_planes(part: np.ndarray, low_bits: int) -> list[bytes]:
    low = part & part.dtype.type((1 << low_bits) - 1)
    return [((low >> (8 * i)) & 0xFF).astype(np.uint8).tobytes() for i in range((low_bits + 7) // 8)]


def channel_groups(by_channel: np.ndarray, symbols: int, groups: int, rounds: int = 8) -> list[np.ndarray]:
    """Channels in `groups` clusters of similar symbol histograms (Lloyd's k-means under the cost
    of coding a channel with its cluster's distribution), started from the mean-symbol order."""
    channels, tokens = by_channel.shape
    index = np.arange(channels, dtype=np.int64)[:, None] * symbols
    hist = np.bincount((index + by_channel).ravel(), minlength=channels * symbols).reshape(channels, symbols)
    start = np.argsort(by_channel.mean(axis=1), kind="stable")
    label = np.empty(channels, dtype=np.int64)
    label[start] = np.arange(channels) * groups // channels
    for _ in range(rounds):
        totals = np.eye(groups)[label].T @ hist
        logp = np.log2((totals + 0.01) / (totals + 0.01).sum(axis=1, keepdims=True))
        new = np.argmin(-hist @ logp.T, axis=1)
        if np.array_equal(new, label):
            break
        label = new
    return [m for m in (np.flatnonzero(label == g) for g in range(groups)) if len(m)]


# ---- decode -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParsedPart:
    low_bits: int
    layout: int
    table: np.ndarray
    order: np.ndarray | None  # channel order (groups layout)
    frames: list[tuple[int, int, int]]  # (start, end, decoded size) in the payload


def decode(stored: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, int, int, int], threads: int = 1) -> np.ndarray:
    """The raw K‖V bytes (a uint8 array) of a payload made by `encode`; CorruptPayload if it does
    not decode to exactly that shape. `threads` > 1 decodes frames and parts in parallel."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    view = memoryview(stored).cast("B")
    try:
        parts = parse(view, shape)
        spans = [f for part in parts for f in part.frames]
        decoded = zstandard.ZstdDecompressor().multi_decompress_to_buffer(
            [view[a:b] for a, b, _ in spans], decompressed_sizes=struct.pack(f"<{len(spans)}Q", *(n for *_, n in spans)),
            threads=threads)
        if [len(decoded[i]) for i in range(len(spans))] != [n for *_, n in spans]:
            raise ValueError("a frame decoded to the wrong length")
    except (struct.error, ValueError, zstandard.ZstdError) as exc:
        raise CorruptPayload(f"cannot decode the payload: {exc}") from exc
    out = np.empty(shape, dtype=UINT[itemsize])
    jobs, first = [], 0
    for index, part in enumerate(parts):
        frames = [np.frombuffer(decoded[i], dtype=np.uint8) for i in range(first, first + len(part.frames))]
        jobs.append((out[index], part, frames))
        first += len(part.frames)
    if threads > 1:
        list(_pool(threads).map(lambda job: _assemble(*job), jobs))
    else:
        for job in jobs:
            _assemble(*job)
    return out.reshape(-1).view(np.uint8)


def parse(view: memoryview, shape: tuple[int, int, int, int]) -> list[ParsedPart]:
    """The part descriptors and frame spans of a payload (ValueError or struct.error if malformed)."""
    version, count = PREAMBLE.unpack_from(view)
    if version != VERSION or count != shape[0]:
        raise ValueError(f"payload v{version} with {count} parts")
    _, heads, tokens, head_dim = shape
    channels, values = heads * head_dim, heads * tokens * head_dim
    offset, heads_out = PREAMBLE.size, []
    for _ in range(count):
        low_bits, layout, symbols, groups, low_planes = PART.unpack_from(view, offset)
        offset += PART.size
        table = np.frombuffer(view, "<u2", symbols, offset)
        offset += 2 * symbols
        order = None
        if layout == CHANNEL_GROUPS:
            sizes = np.frombuffer(view, "<u2", groups, offset)
            order = np.frombuffer(view, "<u2", channels, offset + 2 * groups)
            offset += 2 * (groups + channels)
            if sizes.sum() != channels or not np.array_equal(np.sort(order), np.arange(channels)):
                raise ValueError("channel groups do not cover the channels")
            expect = [int(s) * tokens for s in sizes]
        elif layout == TOKEN_MAJOR and groups == 0:
            expect = [values]
        else:
            raise ValueError(f"unknown layout {layout}")
        if low_planes != (low_bits + 7) // 8 or not 1 <= symbols <= 256:
            raise ValueError("bad part descriptor")
        expect += [values] * low_planes
        sizes = np.frombuffer(view, "<u4", len(expect), offset)
        offset += 4 * len(expect)
        heads_out.append((low_bits, layout, table, order, list(zip(sizes.tolist(), expect))))
    parts = []
    for low_bits, layout, table, order, frames in heads_out:
        spans = []
        for size, n in frames:
            spans.append((offset, offset + size, n))
            offset += size
        parts.append(ParsedPart(low_bits, layout, table, order, spans))
    if offset != len(view):
        raise ValueError("payload length differs from its frames")
    return parts


def _assemble(out: np.ndarray, part: ParsedPart, frames: list[np.ndarray]) -> None:
    """One part [heads, tokens, head_dim] from its decoded frames, written into `out`."""
    heads, tokens, head_dim = out.shape
    low_planes = (part.low_bits + 7) // 8
    symbol_frames = frames[: len(frames) - low_planes]
    if part.layout == CHANNEL_GROUPS:
        rows = np.empty((heads * head_dim, tokens), dtype=np.uint8)
        rows[part.order] = np.concatenate(symbol_frames).reshape(-1, tokens)
        symbols = torch.from_numpy(rows).view(heads, head_dim, tokens).transpose(1, 2).contiguous().numpy()
    else:
        symbols = symbol_frames[0].reshape(out.shape)
    lut = part.table.astype(out.dtype) << out.dtype.type(part.low_bits)
    try:
        np.take(lut, symbols, out=out)
    except IndexError as exc:
        raise CorruptPayload("symbol outside the table") from exc
    for i, plane in enumerate(frames[len(symbol_frames):]):
        plane = plane.reshape(out.shape)
        np.bitwise_or(out, plane if i == 0 else plane.astype(out.dtype) << out.dtype.type(8 * i), out=out)


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="kvcodec")
