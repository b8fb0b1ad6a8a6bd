"""The context market's shared contract (docs/market.md): listing keys, manifests, signatures.

Pure functions, no I/O, imported by the node and the client alike.

- A **listing key** names one record of a published document as seen by another tenant:
  ``record key (34 bytes) ‖ b"@L" ‖ listing tag (8) ‖ load id (8)``. The record key comes first,
  so the ring places it where the publisher wrote the record (position = its first 8 bytes). The
  node resolves it to the publisher's key space only for a tenant the listing lets read; for
  anyone else it is a plain miss. The load id makes metering idempotent: every read of one
  request (retries, hedges, failover) carries the same id, and the node counts a record once
  per load id.
- A **manifest** is canonical JSON (sorted keys, no spaces) signed with the publisher's Ed25519
  key; it names every record with the SHA-256 of ``record key ‖ payload``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass

RECORD_KEY_BYTES = 34
MARK = b"@L"
TAG_BYTES = 8
LOAD_ID_BYTES = 8
LISTING_KEY_BYTES = RECORD_KEY_BYTES + len(MARK) + TAG_BYTES + LOAD_ID_BYTES
MANIFEST_VERSION = 1
LISTING_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VISIBILITIES = ("public", "granted")
MAX_MANIFEST_BYTES = 16 << 20


class ManifestError(ValueError):
    """A manifest that is malformed, unsigned, forged or for something else (one line)."""


def listing_tag(listing_id: str) -> bytes:
    return hashlib.sha256(b"listing/" + listing_id.encode()).digest()[:TAG_BYTES]


def listing_key(record_key: bytes, tag: bytes, load_id: bytes) -> bytes:
    return record_key + MARK + tag + load_id


def split_listing_key(key: bytes) -> tuple[bytes, bytes, bytes] | None:
    """(record key, tag, load id) of a listing key; None for any other key."""
    if len(key) != LISTING_KEY_BYTES or key[RECORD_KEY_BYTES : RECORD_KEY_BYTES + 2] != MARK:
        return None
    at = RECORD_KEY_BYTES + 2
    return key[:RECORD_KEY_BYTES], key[at : at + TAG_BYTES], key[at + TAG_BYTES :]


def record_digest(record_key: bytes, payload: bytes | memoryview) -> bytes:
    """The provenance digest of one record: SHA-256(record key ‖ payload)."""
    h = hashlib.sha256(record_key)
    h.update(payload)
    return h.digest()


def meter_id(*parts: bytes) -> bytes:
    """The idempotency id of a meter entry: the same event on any node has the same id."""
    return hashlib.sha256(b"\x00".join(parts)).digest()[:16]


def canonical(doc: dict) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass(frozen=True)
class Manifest:
    """A parsed, checked manifest (the signature is checked separately: ``verify``)."""

    listing: str
    publisher: str
    fingerprint: str
    namespace: bytes  # the publisher's h0: the buyer derives the document's block keys from it
    block_size: int
    layers: int
    tokens: int
    token_ids: tuple[int, ...]
    records: tuple[tuple[bytes, bytes, int], ...]  # (record key, SHA-256, tokens) per record
    price_per_1k_loaded: float
    price_per_1m_token_hours: float
    visibility: str
    raw: bytes

    @property
    def tag(self) -> bytes:
        return listing_tag(self.listing)

    def index_of(self) -> dict[bytes, int]:
        return {key: i for i, (key, _, _) in enumerate(self.records)}

    @property
    def full_blocks(self) -> int:
        """Blocks an audit can recompute (a partial tail block is not one)."""
        return len(self.token_ids) // self.block_size

    def audit_blocks_at(self, rate: float) -> int:
        """Blocks an audit of `rate` (a share of the full blocks) recomputes: at least one."""
        full = self.full_blocks
        return min(full, max(1, math.ceil(rate * full))) if rate > 0 and full else 0


def build_manifest(*, listing: str, publisher: str, fingerprint: str, namespace: bytes, block_size: int,
                   layers: int, token_ids: list[int], records: list[tuple[bytes, bytes, int]],
                   price_per_1k_loaded: float, price_per_1m_token_hours: float = 0.0,
                   visibility: str = "granted") -> bytes:
    doc = {
        "v": MANIFEST_VERSION, "listing": listing, "publisher": publisher, "fingerprint": fingerprint,
        "namespace": namespace.hex(), "block_size": block_size, "layers": layers, "tokens": len(token_ids),
        "token_ids": list(token_ids),
        "records": [[key.hex(), digest.hex(), tokens] for key, digest, tokens in records],
        "price": {"per_1k_loaded": price_per_1k_loaded, "per_1m_token_hours": price_per_1m_token_hours},
        "visibility": visibility,
    }
    raw = canonical(doc)
    parse_manifest(raw)  # the publisher learns of a bad field before anything is sent
    return raw


def _field(doc: dict, name: str, kind):
    value = doc.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"manifest field {name!r} missing or not {getattr(kind, '__name__', kind)}")
    return value


def _price(value, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ManifestError(f"price {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def parse_manifest(raw: bytes) -> Manifest:
    """The checked manifest, or ManifestError naming the first bad field."""
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_BYTES}")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != MANIFEST_VERSION:
        raise ManifestError(f"manifest version must be {MANIFEST_VERSION}")
    if canonical(doc) != raw:
        raise ManifestError("manifest is not in canonical form (sorted keys, no spaces)")
    listing = _field(doc, "listing", str)
    if not LISTING_ID.match(listing):
        raise ManifestError(f"listing id {listing!r}: 1-64 of [A-Za-z0-9._-], starting alphanumeric")
    try:
        namespace = bytes.fromhex(_field(doc, "namespace", str))
        fingerprint = _field(doc, "fingerprint", str)
        bytes.fromhex(fingerprint)
    except ValueError:
        raise ManifestError("manifest namespace/fingerprint must be hex") from None
    if len(namespace) != 32:
        raise ManifestError("manifest namespace must be 32 bytes")
    block_size, layers = _field(doc, "block_size", int), _field(doc, "layers", int)
    if block_size <= 0 or layers <= 0:
        raise ManifestError("block_size and layers must be positive")
    token_ids = _field(doc, "token_ids", list)
    if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= 0xFFFFFFFF for t in token_ids):
        raise ManifestError("token_ids must be uint32 integers")
    if _field(doc, "tokens", int) != len(token_ids) or not token_ids:
        raise ManifestError("tokens must equal the number of token_ids (at least one)")
    records = []
    for entry in _field(doc, "records", list):
        try:
            key, digest, tokens = bytes.fromhex(entry[0]), bytes.fromhex(entry[1]), entry[2]
        except (ValueError, TypeError, IndexError, KeyError):
            raise ManifestError("each record must be [key hex, sha256 hex, tokens]") from None
        if len(key) != RECORD_KEY_BYTES or len(digest) != 32 or not isinstance(tokens, int) or tokens < 0:
            raise ManifestError(f"record {entry[0][:16]}…: a 34-byte key, a 32-byte digest, tokens >= 0")
        records.append((key, digest, tokens))
    if not records or len({k for k, _, _ in records}) != len(records):
        raise ManifestError("records must be non-empty and distinct")
    price = _field(doc, "price", dict)
    visibility = _field(doc, "visibility", str)
    if visibility not in VISIBILITIES:
        raise ManifestError(f"visibility must be one of {', '.join(VISIBILITIES)}, got {visibility!r}")
    return Manifest(listing, _field(doc, "publisher", str), fingerprint, namespace, block_size, layers,
                    len(token_ids), tuple(token_ids), tuple(records),
                    _price(price.get("per_1k_loaded"), "per_1k_loaded"),
                    _price(price.get("per_1m_token_hours", 0.0), "per_1m_token_hours"), visibility, raw)


def sign(private_key, manifest: bytes) -> tuple[bytes, bytes]:
    """(signature, raw public key) of a manifest; `private_key` an Ed25519PrivateKey."""
    from cryptography.hazmat.primitives import serialization

    public = private_key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private_key.sign(manifest), public


def verify(manifest: bytes, signature: bytes, public_key: bytes) -> None:
    """ManifestError unless `signature` is `public_key`'s Ed25519 signature of `manifest`."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if not signature:
        raise ManifestError("manifest is not signed")
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, manifest)
    except (InvalidSignature, ValueError):
        raise ManifestError("manifest signature does not verify against the publisher's key") from None


KV_MAGIC = b"KVB1"  # inference.codec's record header: magic, version, dtype, codec, ?, layer, shape
KV_HEADER = struct.Struct("<4sHHBBH4I")


def block_tokens(payload: memoryview | bytes) -> int:
    """Tokens of a layer-0 KV record (inference.codec header), 0 for anything else."""
    if len(payload) < KV_HEADER.size or bytes(payload[:4]) != KV_MAGIC:
        return 0
    fields = KV_HEADER.unpack_from(payload)
    return fields[8] if fields[5] == 0 else 0  # shape [2, kv_heads, tokens, head_dim]
