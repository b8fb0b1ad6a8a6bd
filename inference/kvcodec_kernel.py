"""The decode loops of `zstd-grouped` (inference/kvcodec.py), compiled by numba. Each is a plain
contiguous loop that LLVM vectorizes (the table lookup runs at ~0.2 ns a value here; numpy's
take, transpose and bit-unpack passes take ~4x that, measured). Callers validate every length and
index first: bounds checks are off. Compiled on first use and cached beside this file; they
release the GIL, so K and V decode in parallel on threads."""

from __future__ import annotations

import numba
import numpy as np

TILE = 16  # tokens per tile of the transpose: 16 source bytes a row, 16 rows of the output a tile


@numba.njit(cache=True, nogil=True, boundscheck=False)
def rows_to_tokens(dst: np.ndarray, src: np.ndarray, row: np.ndarray, tokens: int, head_dim: int) -> None:
    """dst[(h*tokens + t)*head_dim + d] = src[row[h*head_dim + d]*tokens + t]: channel-major symbol
    rows (in group order) to the token-major layout of the output."""
    heads = len(row) // head_dim
    full = tokens - tokens % TILE
    for h in range(heads):
        for t0 in range(0, full, TILE):
            for d in range(head_dim):
                r = np.uint64(row[h * head_dim + d] * tokens + t0)
                o = np.uint64((h * tokens + t0) * head_dim + d)
                for k in range(TILE):
                    dst[o + np.uint64(k * head_dim)] = src[r + np.uint64(k)]
        for d in range(head_dim):
            for t in range(full, tokens):
                dst[(h * tokens + t) * head_dim + d] = src[row[h * head_dim + d] * tokens + t]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def lookup(out: np.ndarray, symbols: np.ndarray, lut: np.ndarray, planes: np.ndarray) -> None:
    """out[i] = lut[symbols[i]] | planes[p][i] << 8p for every byte plane p."""
    if planes.shape[0] == 0:
        for i in range(len(out)):
            out[i] = lut[symbols[i]]
        return
    for i in range(len(out)):
        out[i] = lut[symbols[i]] | planes[0, i]
    for p in range(1, planes.shape[0]):
        plane = planes[p]
        for i in range(len(out)):
            out[i] |= np.uint32(plane[i]) << np.uint32(8 * p)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def or_fields(out: np.ndarray, packed: np.ndarray, bits: int, shift: int) -> None:
    """out[i] |= field i % per of packed[i // per] << shift, per = 8 // bits values a byte (bits 1, 2
    or 4; kvcodec.pack_fields), unrolled for each width (a loop over the fields does not vectorize)."""
    per = 8 // bits
    full = len(out) // per
    sh = np.uint32(shift)
    if bits == 4:
        for k in range(full):
            p = np.uint32(packed[k])
            out[2 * k] |= (p & np.uint32(15)) << sh
            out[2 * k + 1] |= (p >> np.uint32(4)) << sh
    elif bits == 2:
        for k in range(full):
            p = np.uint32(packed[k])
            out[4 * k] |= (p & np.uint32(3)) << sh
            out[4 * k + 1] |= ((p >> np.uint32(2)) & np.uint32(3)) << sh
            out[4 * k + 2] |= ((p >> np.uint32(4)) & np.uint32(3)) << sh
            out[4 * k + 3] |= (p >> np.uint32(6)) << sh
    else:
        for k in range(full):
            p = np.uint32(packed[k])
            for q in range(8):
                out[8 * k + q] |= ((p >> np.uint32(q)) & np.uint32(1)) << sh
    mask = np.uint32((1 << bits) - 1)
    for i in range(full * per, len(out)):
        out[i] |= ((np.uint32(packed[i // per]) >> np.uint32((i % per) * bits)) & mask) << sh
