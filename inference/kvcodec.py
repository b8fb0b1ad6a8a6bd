"""Codec `zstd-grouped` (record codec id 2): lossless KV compression with per-channel-group tables.

What the data says (`kvbench compress`, SmolLM2 bf16 KV): the information is in the top of each
value (sign, exponent and the first mantissa bits), and its distribution depends on the channel
(keys have outlier channels; values barely do); the mantissa below that is uniform to within 0.1%
except where whole rows repeat (layer-0 values are a function of the token alone). So each part
(K, then V, each [kv_heads, tokens, head_dim]) is split into
  * a *top field* (sign, exponent, first mantissa bit or two), mapped through a per-part table of
    the values present to one byte symbol, and coded either token-major in one stream or
    channel-major in groups of channels with similar histograms (k-means on the histograms), one
    zstd frame per group, so each group gets its own Huffman table (zstd's huff0);
  * the *low field* (the remaining `low_bits` mantissa bits): its whole bytes as byte planes and the
    rest bit-packed, stored raw (a copy to decode) unless zstd saves over LOW_ZSTD_GAIN (repeated rows).
The encoder tries a few layouts per part and keeps the smallest; the decoder is one zstd pass over
the symbol frames and one fused loop (inference/kvcodec_kernel.py) that gathers each symbol, looks
it up and ORs in its low bits; `threads` > 1 decodes K and V at once (both release the GIL).

Payload v2 (little-endian): version u8 = 2, parts u8 = 2; per part a descriptor
  low_bits u8 | layout u8 (0 token-major, 1 channel groups) | symbols u16 | groups u16 |
  low coding u8 (0 raw, 1 zstd) | 3 reserved bytes, then the table (symbols x u16: the top field of
  each symbol), for groups: groups x u16 sizes and channels x u16 channel order, then (frames) x u32
  frame sizes; then every part's frames in order: the symbol frames, low_bits // 8 byte planes (one
  byte a value, lowest first), and if low_bits % 8 = r > 0 the r bits above them packed LSB-first,
  8 values in r bytes, plus one zero byte. Payload v1 (low field as zstd byte planes, the descriptor's
  byte after `groups` their count) still decodes. Pure functions, no I/O.
"""

from __future__ import annotations

import functools
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import zstandard

from .kvcodec_kernel import lookup, or_fields, rows_to_tokens

VERSION = 2
READABLE_VERSIONS = (1, 2)
PREAMBLE = struct.Struct("<BB")
PART = struct.Struct("<BBHHB3x")
TOKEN_MAJOR, CHANNEL_GROUPS = 0, 1
LOW_RAW, LOW_ZSTD = 0, 1
UINT = {2: np.uint16, 4: np.uint32}
# (bits of the whole value, bits of sign + exponent) per element size; bf16 and fp32 share 9
SIGN_EXP_BITS = {torch.bfloat16: 9, torch.float16: 6, torch.float32: 9}
MIN_GROUP_VALUES = 12_288  # a group's Huffman table costs ~30-60 bytes: keep groups large enough
MAX_GROUPS = 16
GROUPS_PENALTY = 0.01  # keep token-major unless groups save over 1% (values: ~0.3%, keys: ~5%)
LOW_ZSTD_GAIN = 0.9  # zstd the low field only where it saves >10% (repeated rows), else a raw copy


class CorruptPayload(ValueError):
    """The compressed payload does not decode (the caller maps it to its record error)."""


@dataclass(frozen=True)
class Part:
    low_bits: int
    layout: int
    table: np.ndarray  # uint16 top-field value per symbol
    group_sizes: np.ndarray  # uint16, channel groups (empty for token-major)
    channel_order: np.ndarray  # uint16, channels in group order (empty for token-major)
    symbol_frames: list[bytes]
    low_coding: int
    low_frames: list[bytes]

    def pack(self) -> tuple[bytes, list[bytes]]:
        head = PART.pack(self.low_bits, self.layout, len(self.table), len(self.group_sizes), self.low_coding)
        frames = self.symbol_frames + self.low_frames
        sizes = np.array([len(f) for f in frames], dtype="<u4")
        body = [self.table.astype("<u2"), self.group_sizes.astype("<u2"), self.channel_order.astype("<u2"), sizes]
        return head + b"".join(a.tobytes() for a in body), frames


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
    if not candidates:  # over 256 distinct top fields: the top byte as is
        candidates = _layouts(part, bits - 8, *_symbols(part, bits - 8), compressor)
    return min(candidates, key=_cost)


def _cost(part: Part) -> float:
    """Stored bytes, with channel groups charged GROUPS_PENALTY more: they cost a gather to decode."""
    size = sum(map(len, part.symbol_frames + part.low_frames)) + 2 * len(part.table) + 2 * len(part.channel_order)
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
    low_coding, low = _low_frames(part, low_bits, compressor)
    empty = np.empty(0, dtype=np.uint16)
    out = [Part(low_bits, TOKEN_MAJOR, table, empty, empty, [compressor.compress(symbols.tobytes())], low_coding, low)]
    heads, tokens, head_dim = part.shape
    channels = heads * head_dim
    groups = min(MAX_GROUPS, channels, symbols.size // MIN_GROUP_VALUES)
    if groups >= 1 and tokens > 1:
        by_channel = np.ascontiguousarray(symbols.transpose(0, 2, 1)).reshape(channels, tokens)
        members = channel_groups(by_channel, len(table), groups)
        frames = [_one_frame([by_channel[m].tobytes() for m in members], compressor)]
        sizes = np.array([len(m) for m in members], dtype=np.uint16)
        out.append(Part(low_bits, CHANNEL_GROUPS, table, sizes, np.concatenate(members).astype(np.uint16),
                        frames, low_coding, low))
    return out


def _one_frame(blocks: list[bytes], compressor) -> bytes:
    """One zstd frame with each of `blocks` starting a new zstd block, so each gets its own
    Huffman table (as separate frames would) and the decoder makes one call into one buffer."""
    stream = compressor.compressobj(size=sum(map(len, blocks)))
    out = []
    for block in blocks:
        out += [stream.compress(block), stream.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)]
    return b"".join(out) + stream.flush(zstandard.COMPRESSOBJ_FLUSH_FINISH)


def _low_frames(part: np.ndarray, low_bits: int, compressor) -> tuple[int, list[bytes]]:
    """The low field as its pieces (low_fields), zstd'd only where that pays."""
    low = part.ravel()
    streams = []
    for bits, shift in low_fields(low_bits):
        field = ((low >> shift) & ((1 << bits) - 1)).astype(np.uint8)
        streams.append(field.tobytes() if bits == 8 else pack_fields(field, bits))
    packed = [compressor.compress(s) for s in streams]
    if sum(map(len, packed)) < LOW_ZSTD_GAIN * sum(map(len, streams)):
        return LOW_ZSTD, packed
    return LOW_RAW, streams


def low_fields(low_bits: int) -> list[tuple[int, int]]:
    """(bits, shift) of each stored piece of a `low_bits` low field: whole byte planes from the
    bottom, then 4-, 2- and 1-bit fields (as low_bits needs), each packed 8 // bits a byte (pack_fields)."""
    fields, shift = [], 0
    for bits in [8] * (low_bits // 8) + [b for b in (4, 2, 1) if low_bits % 8 & b]:
        fields.append((bits, shift))
        shift += bits
    return fields


def pack_fields(values: np.ndarray, bits: int) -> bytes:
    """`values` (uint8, each < 2**bits) packed 8 // bits a byte, the first in the lowest bits."""
    per = 8 // bits
    padded = np.zeros(-(-len(values) // per) * per, dtype=np.uint8)
    padded[: len(values)] = values
    packed = np.zeros(len(padded) // per, dtype=np.uint8)
    for q, column in enumerate(padded.reshape(-1, per).T):
        packed |= column << np.uint8(q * bits)
    return packed.tobytes()


def field_size(count: int, bits: int) -> int:
    return -(-count // (8 // bits)) if bits < 8 else count


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
    symbol_frames: list[tuple[int, int, int]]  # (start, end, decoded size) in the payload
    low_frames: list[tuple[int, int, int]]  # byte planes, then the packed rest
    low_zstd: bool
    low_fields: list[tuple[int, int]]  # (bits, shift) of each low frame (8: a byte plane)


def decode(stored: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, int, int, int], threads: int = 1,
           out: np.ndarray | None = None) -> np.ndarray:
    """The raw K‖V bytes (a uint8 array) of a payload made by `encode` (v1 or v2), written into `out`
    (contiguous, of the raw size) if given; CorruptPayload if it does not decode to exactly that
    shape. `threads` > 1 decodes K and V in parallel."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    view = memoryview(stored).cast("B")
    try:
        parts = parse(view, shape)
    except (struct.error, ValueError) as exc:
        raise CorruptPayload(f"cannot decode the payload: {exc}") from exc
    if out is None:
        out = np.empty(shape, dtype=UINT[itemsize])
    else:
        out = out.reshape(-1).view(UINT[itemsize]).reshape(shape)  # raises unless contiguous and of that size
    jobs = [(view, out[index], part) for index, part in enumerate(parts)]
    if threads > 1:
        list(_pool(threads).map(lambda job: _decode_part(*job), jobs))
    else:
        for job in jobs:
            _decode_part(*job)
    return out.reshape(-1).view(np.uint8)


def _decode_part(view: memoryview, out: np.ndarray, part: ParsedPart) -> None:
    """One part [heads, tokens, head_dim] from its frames, written into `out`."""
    heads, tokens, head_dim = out.shape
    decompressor = zstandard.ZstdDecompressor()
    try:
        symbols = _frames(view, part.symbol_frames, decompressor)
        low = [_frames(view, [f], decompressor if part.low_zstd else None) for f in part.low_frames]
    except (ValueError, zstandard.ZstdError) as exc:
        raise CorruptPayload(f"cannot decode the payload: {exc}") from exc
    if int(symbols.max()) >= len(part.table):
        raise CorruptPayload("symbol outside the table")
    if part.layout == CHANNEL_GROUPS:
        row = np.empty(heads * head_dim, dtype=np.int64)
        row[part.order] = np.arange(heads * head_dim)
        by_token = np.empty_like(symbols)
        rows_to_tokens(by_token, symbols, row, tokens, head_dim)
        symbols = by_token
    lut = np.zeros(256, dtype=out.dtype)
    lut[: len(part.table)] = part.table.astype(out.dtype) << out.dtype.type(part.low_bits)
    planes = [f for f, (bits, _) in zip(low, part.low_fields) if bits == 8]
    flat = out.reshape(-1)
    lookup(flat, symbols, lut, np.stack(planes) if planes else np.empty((0, flat.size), dtype=np.uint8))
    for packed, (bits, shift) in zip(low, part.low_fields):
        if bits < 8:
            or_fields(flat, packed, bits, shift)


def _frames(view: memoryview, spans: list[tuple[int, int, int]], decompressor) -> np.ndarray:
    """The frames' bytes, decompressed (or as stored when `decompressor` is None), concatenated."""
    if decompressor is None and len(spans) == 1:
        (a, b, n), = spans
        if b - a != n:
            raise ValueError("a raw frame has the wrong length")
        return np.frombuffer(view[a:b], dtype=np.uint8)
    out, offset = np.empty(sum(n for *_, n in spans), dtype=np.uint8), 0
    for a, b, n in spans:
        data = decompressor.decompress(view[a:b])
        if len(data) != n:
            raise ValueError("a frame decoded to the wrong length")
        out[offset : offset + n] = np.frombuffer(data, dtype=np.uint8)
        offset += n
    return out


def parse(view: memoryview, shape: tuple[int, int, int, int]) -> list[ParsedPart]:
    """The part descriptors and frame spans of a payload (ValueError or struct.error if malformed)."""
    version, count = PREAMBLE.unpack_from(view)
    if version not in READABLE_VERSIONS or count != shape[0]:
        raise ValueError(f"payload v{version} with {count} parts")
    _, heads, tokens, head_dim = shape
    channels, values = heads * head_dim, heads * tokens * head_dim
    offset, heads_out = PREAMBLE.size, []
    for _ in range(count):
        low_bits, layout, symbols, groups, low_field = PART.unpack_from(view, offset)
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
            expect = [values] if version == 2 else [int(s) * tokens for s in sizes]
        elif layout == TOKEN_MAJOR and groups == 0:
            expect = [values]
        else:
            raise ValueError(f"unknown layout {layout}")
        if not 1 <= symbols <= 256 or not 0 < low_bits < 32:
            raise ValueError("bad part descriptor")
        if version == 1:  # low_field: the count of zstd byte planes
            if low_field != (low_bits + 7) // 8:
                raise ValueError("bad part descriptor")
            low = [values] * low_field
        else:  # low_field: raw or zstd
            if low_field not in (LOW_RAW, LOW_ZSTD):
                raise ValueError("bad low-field coding")
            low = [field_size(values, bits) for bits, _ in low_fields(low_bits)]
        sizes = np.frombuffer(view, "<u4", len(expect) + len(low), offset)
        offset += 4 * len(sizes)
        heads_out.append((version, low_bits, layout, table, order, low_field, list(zip(sizes.tolist(), expect + low))))
    parts = []
    for version, low_bits, layout, table, order, low_field, frames in heads_out:
        spans = []
        for size, n in frames:
            spans.append((offset, offset + size, n))
            offset += size
        fields = [(8, 8 * i) for i in range(low_field)] if version == 1 else low_fields(low_bits)
        cut = len(frames) - len(fields)
        parts.append(ParsedPart(low_bits, layout, table, order, spans[:cut], spans[cut:],
                                version == 1 or low_field == LOW_ZSTD, fields))
    if offset != len(view):
        raise ValueError("payload length differs from its frames")
    return parts


@functools.lru_cache(maxsize=4)
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(threads, thread_name_prefix="kvcodec")
