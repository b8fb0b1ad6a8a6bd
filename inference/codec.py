"""The KV record payload: a fixed, versioned header + K bytes + V bytes (docs/key-spec.md, "Records").

One record holds one layer of one block: shape [2, kv_heads, tokens, head_dim] (K then V), raw
little-endian elements (bf16 as its raw 2 bytes). Pure functions, no I/O; never pickle.

Header (64 bytes, little-endian): magic b"KVB1" | version u16 | header size u16 | dtype u8 |
codec u8 | layer u16 | shape 4 x u32 | raw length u64 | stored length u64 | 20 reserved bytes.
The header size is a multiple of 16, so element data stays aligned.

The payload carries no checksum of its own: it is the payload of a store record
(``kvproto.record``), whose one digest covers key ‖ this header ‖ the data and is checked once
per hop. Version 1 headers (with an XXH3-64 in the reserved bytes) still parse; that field is
ignored (the store digest covers it).
"""

from __future__ import annotations

import math
import struct
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import zstandard


MAGIC = b"KVB1"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER = struct.Struct("<4sHHBBH4IQQ20x")
HEADER_SIZE = HEADER.size  # 64

CODEC_NONE = 0
CODEC_ZSTD_BYTEPLANE = 1
CODEC_ZSTD_GROUPED = 2  # inference/kvcodec.py; its payload carries its own format version


def _kvcodec():
    """inference.kvcodec, imported on first use: its compiled kernels pull in numba/llvmlite,
    whose module objects break vLLM's kernel scan at engine start (vLLM 0.32 CPU), so a process
    that never uses the codec never imports them."""
    from . import kvcodec

    return kvcodec


CODECS = {"none": CODEC_NONE, "zstd-byteplane": CODEC_ZSTD_BYTEPLANE, "zstd-grouped": CODEC_ZSTD_GROUPED}

DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_PLANE_COUNT = struct.Struct("<I")
_PLANE_SIZE = struct.Struct("<Q")

# store views are read-only and torch warns about that on every frombuffer: we only ever read them
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)

if sys.byteorder != "little":  # pragma: no cover - the wire format is little-endian raw memory
    raise ImportError("inference.codec needs a little-endian host")


class RecordError(ValueError):
    """A record that cannot be used; `reason` is the counted miss reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RecordHeader:
    dtype: torch.dtype
    codec: int
    layer: int
    shape: tuple[int, int, int, int]  # (2, kv_heads, tokens, head_dim)
    raw_length: int
    stored_length: int

    @property
    def tokens(self) -> int:
        return self.shape[2]


def encode(keys: torch.Tensor, values: torch.Tensor, layer: int, codec: str = "none") -> bytes:
    """One record from K and V of shape [kv_heads, tokens, head_dim] (any device, same dtype)."""
    if keys.shape != values.shape or keys.dim() != 3 or keys.dtype != values.dtype:
        raise ValueError(f"K {tuple(keys.shape)} and V {tuple(values.shape)} must be equal 3-d tensors")
    if keys.dtype not in DTYPE_CODES:
        raise ValueError(f"unsupported KV dtype {keys.dtype}")
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r} (have {sorted(CODECS)})")
    raw = _raw_bytes(keys) + _raw_bytes(values)
    shape = (2, *keys.shape)
    stored = compress_payload(raw, keys.dtype, shape, CODECS[codec])
    return pack_header(keys.dtype, CODECS[codec], layer, shape, len(raw), len(stored)) + stored


def compress_payload(raw: bytes, dtype: torch.dtype, shape: tuple[int, int, int, int], codec: int) -> bytes:
    """The stored form of the raw K‖V bytes under a codec id."""
    if codec == CODEC_ZSTD_GROUPED:
        return _kvcodec().encode(raw, dtype, shape)
    return _byteplane_compress(raw, _itemsize(dtype)) if codec == CODEC_ZSTD_BYTEPLANE else raw


def pack_header(dtype: torch.dtype, codec: int, layer: int, shape: tuple[int, int, int, int], raw_length: int,
                stored_length: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, HEADER_SIZE, DTYPE_CODES[dtype], codec, layer, *shape, raw_length,
                       stored_length)


def parse_header(record: bytes | memoryview) -> RecordHeader:
    view = memoryview(record)
    if len(view) < HEADER_SIZE:
        raise RecordError("bad_header", "record shorter than its header")
    magic, version, size, dtype_code, codec, layer, *rest = HEADER.unpack_from(view)
    shape, (raw_length, stored_length) = tuple(rest[:4]), rest[4:]
    if magic != MAGIC or version not in READABLE_VERSIONS or size != HEADER_SIZE:
        raise RecordError("bad_header", f"unknown record format {bytes(magic)!r} v{version}")
    if dtype_code not in DTYPES or codec not in CODECS.values():
        raise RecordError("bad_header", f"unknown dtype code {dtype_code} or codec {codec}")
    if len(view) - HEADER_SIZE != stored_length:
        raise RecordError("corrupt", f"payload is {len(view) - HEADER_SIZE} bytes, header says {stored_length}")
    dtype = DTYPES[dtype_code]
    if shape[0] != 2 or raw_length != math.prod(shape) * _ITEMSIZE[dtype]:
        raise RecordError("bad_header", f"shape {shape} does not match raw length {raw_length}")
    return RecordHeader(dtype, codec, layer, shape, raw_length, stored_length)


def raw_payload(record: bytes | memoryview, header: RecordHeader) -> memoryview:
    """The raw K‖V bytes of a record, as a view of `record` when it is stored uncompressed."""
    raw = decompress_payload(memoryview(record)[HEADER_SIZE:], header)
    if len(raw) != header.raw_length:
        raise RecordError("corrupt", "decoded length differs from the header")
    return raw


def decompress_payload(stored: memoryview, header: RecordHeader, threads: int = 1) -> memoryview:
    """The raw K‖V bytes of a stored payload (a view of it when uncompressed); `threads` > 1
    decodes a zstd-grouped payload's frames and parts in parallel."""
    if header.codec == CODEC_NONE:
        return stored
    if header.codec == CODEC_ZSTD_GROUPED:
        try:
            return memoryview(_kvcodec().decode(stored, header.dtype, header.shape, threads))
        except _kvcodec().CorruptPayload as exc:
            raise RecordError("corrupt", str(exc)) from exc
    return memoryview(_byteplane_decompress(stored, header))


def decode_into(
    record: bytes | memoryview,
    dest: torch.Tensor,
    header: RecordHeader | None = None,
    layer: int | None = None,
) -> RecordHeader:
    """Decode a record into a preallocated [2, kv_heads, tokens, head_dim] slot (K at [0], V at
    [1]; any device, any strides); `layer`, if given, is the layer it must have been stored for.

    Zero-copy until the destination: the payload is viewed with torch.frombuffer and copied once.
    """
    header, raw = fitting_payload(record, dest.dtype, tuple(dest.shape), layer, header)
    dest.copy_(torch.frombuffer(raw, dtype=header.dtype).view(header.shape))
    return header


def fitting_payload(record: bytes | memoryview, dtype: torch.dtype, shape: tuple[int, ...], layer: int | None = None,
                    header: RecordHeader | None = None) -> tuple[RecordHeader, memoryview]:
    """The raw K‖V bytes of a record that must hold `shape` of `dtype` (for `layer`, if given),
    or RecordError with the reason it does not fit."""
    header = header or parse_header(record)
    if layer is not None and header.layer != layer:
        raise RecordError("layer_mismatch", f"record of layer {header.layer} stored as layer {layer}")
    if header.dtype != dtype:
        raise RecordError("dtype_mismatch", f"record dtype {header.dtype}, model needs {dtype}")
    if header.shape != shape:
        raise RecordError("shape_mismatch", f"record shape {header.shape}, model needs {shape}")
    return header, raw_payload(record, header)


_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in DTYPE_CODES}


def _itemsize(dtype: torch.dtype) -> int:
    return _ITEMSIZE[dtype]


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().view(torch.uint8)
    return flat.numpy().tobytes()


def _byteplane_compress(raw: bytes, itemsize: int) -> bytes:
    """Byte-plane split (all first bytes, all second bytes, ...) then zstd per plane (lossless)."""
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(-1, itemsize).T
    compressor = zstandard.ZstdCompressor(level=3)
    frames = [compressor.compress(np.ascontiguousarray(plane).tobytes()) for plane in planes]
    table = _PLANE_COUNT.pack(itemsize) + b"".join(_PLANE_SIZE.pack(len(f)) for f in frames)
    return table + b"".join(frames)


def _byteplane_decompress(stored: memoryview, header: RecordHeader) -> bytes:
    try:
        (count,) = _PLANE_COUNT.unpack_from(stored)
        if count != _itemsize(header.dtype):
            raise RecordError("corrupt", f"{count} byte planes for {header.dtype}")
        offset = _PLANE_COUNT.size + count * _PLANE_SIZE.size
        n = header.raw_length // count
        planes = np.empty((count, n), dtype=np.uint8)
        decompressor = zstandard.ZstdDecompressor()
        for i in range(count):
            (size,) = _PLANE_SIZE.unpack_from(stored, _PLANE_COUNT.size + i * _PLANE_SIZE.size)
            plane = decompressor.decompress(stored[offset : offset + size], max_output_size=n)
            if len(plane) != n:
                raise RecordError("corrupt", "byte plane of the wrong length")
            planes[i] = np.frombuffer(plane, dtype=np.uint8)
            offset += size
    except (struct.error, zstandard.ZstdError) as exc:
        raise RecordError("corrupt", f"cannot decompress record: {exc}") from exc
    return planes.T.tobytes()
