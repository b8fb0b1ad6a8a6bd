"""Bearer-token authentication and tenant key spaces.

The tokens file holds one ``TOKEN TENANT`` pair per line (``#`` starts a comment). A call carries
``authorization: Bearer <token>``; the node maps the token to its tenant and keeps each tenant's
records under ``tenant_prefix(tenant)``, so a tenant that computes another tenant's keys still
reads, probes and deletes only its own space: absent and forbidden answer the same.

The cluster's peer token (``--peer-token-file``, one token, the same on every node) is the
nodes' own credential for their agents' calls to each other (``kvstore.peers``): it acts on the
raw key space (every tenant's prefix ‖ key) for Put, Get, Lookup and Scan only, and is no
tenant's token. ``KeySpaces`` tells the agents which stored bytes are a tenant prefix and which
the client's key (what its ring placement and record digest are computed from).
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import logging
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc

from kvproto.errors import Unauthenticated

log = logging.getLogger(__name__)
T = TypeVar("T")

PREFIX_BYTES = 16
MIN_TOKEN_CHARS = 16


def tenant_prefix(tenant: str) -> bytes:
    """The key-space prefix of a tenant: 16 bytes of SHA-256(b"tenant/" ‖ name)."""
    return hashlib.sha256(b"tenant/" + tenant.encode()).digest()[:PREFIX_BYTES]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _token_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """(line number, fields) of every line with fields, ``#`` comments cut."""
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if fields:
            yield number, fields


def _printable(token: str) -> bool:
    return token.isascii() and token.isprintable()


def _read_text(path: str, source: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{source}: not UTF-8 text") from exc


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, str]:
    """token -> tenant from the file's text; ValueError (one line, with the line number) if bad."""
    tokens: dict[str, str] = {}
    for number, fields in _token_lines(text):
        if len(fields) != 2:
            raise ValueError(f"{source} line {number}: expected 'TOKEN TENANT', got {len(fields)} fields")
        token, tenant = fields
        if not _printable(token):
            raise ValueError(f"{source} line {number}: token must be printable ASCII")
        if tokens.get(token, tenant) != tenant:
            raise ValueError(f"{source} line {number}: token already given to tenant {tokens[token]!r}")
        if len(token) < MIN_TOKEN_CHARS:
            log.warning("%s line %d: token shorter than %d characters", source, number, MIN_TOKEN_CHARS)
        tokens[token] = tenant
    if not tokens:
        raise ValueError(f"{source}: no 'TOKEN TENANT' lines (auth on would refuse every call)")
    return tokens


def read_tokens(path: str) -> dict[str, str]:
    """token -> tenant of the tokens file at `path` (``parse_tokens``)."""
    source = f"auth tokens file {path}"
    return parse_tokens(_read_text(path, source), source)


class Authenticator:
    """Maps a call's bearer token to its tenant; refuses calls without a known token."""

    def __init__(self, tokens: dict[str, str]) -> None:
        # Compare digests (equal length) of every known token, never stopping early, so the time
        # taken does not tell how much of a guessed token was right.
        self._entries = [(_digest(token), tenant) for token, tenant in tokens.items()]
        self._peer: bytes | None = None
        self.tenants = sorted(set(tokens.values()))

    @classmethod
    def from_file(cls, path: str) -> "Authenticator":
        auth = cls(read_tokens(path))
        log.info("auth on: %d tenants from %s", len(auth.tenants), path)
        return auth

    def with_peer_token(self, token: str) -> Authenticator:
        """The same tenants, and the cluster's peer token for node-to-node calls (the servicer's
        copy: the data plane and the market keep one that knows tenants only)."""
        other = copy.copy(self)
        other._peer = _digest(token)
        return other

    def tenant_of(self, token: str) -> str | None:
        return self._tenant_of_digest(_digest(token))

    def _tenant_of_digest(self, digest: bytes) -> str | None:
        found = None
        for known, tenant in self._entries:
            if hmac.compare_digest(digest, known):
                found = tenant
        return found

    def _identify(self, context: grpc.ServicerContext) -> tuple[str | None, bool]:
        """(tenant, is it the peer token) of the call's token: one digest, compared with every
        tenant's and the peer's each time, so the time tells neither."""
        digest = _digest(bearer_token(context))
        tenant = self._tenant_of_digest(digest)
        peer = self._peer is not None and hmac.compare_digest(digest, self._peer)
        return tenant, peer

    def tenant(self, context: grpc.ServicerContext) -> str:
        tenant, peer = self._identify(context)
        if tenant is None:
            raise Unauthenticated(PEER_ONLY if peer else "unknown token")
        return tenant

    def key_prefix(self, context: grpc.ServicerContext) -> bytes:
        return tenant_prefix(self.tenant(context))

    def key_space(self, context: grpc.ServicerContext) -> bytes | None:
        """The caller's tenant prefix, or None for the cluster's peer token (the raw key space:
        only the RPCs the agents make may take it, the servicer decides which)."""
        tenant, peer = self._identify(context)
        if tenant is not None:
            return tenant_prefix(tenant)
        if peer:
            return None
        raise Unauthenticated("unknown token")


PEER_ONLY = "the cluster's peer token may call Put, Get, Lookup and Scan only"


def bearer_token(context: grpc.ServicerContext) -> str:
    """The token of the call's one ``authorization: Bearer`` header (Unauthenticated if none)."""
    values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
    if len(values) != 1:
        raise Unauthenticated("missing bearer token" if not values else "more than one authorization header")
    value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization must be 'Bearer <token>'")
    return token.strip()


def read_peer_token(path: str, tenant_tokens: dict[str, str]) -> str:
    """The cluster's peer token from its file (one token; ``#`` starts a comment); ValueError
    (one line naming --peer-token-file) if it is missing, short, or a tenant's token."""
    flag = f"--peer-token-file {path}"
    try:
        text = _read_text(path, flag)
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ValueError(f"{flag}: {exc.strerror or exc}") from exc
    fields = [word for _, words in _token_lines(text) for word in words]
    if len(fields) != 1:
        raise ValueError(f"{flag}: expected one token, found {len(fields)}")
    token = fields[0]
    if not _printable(token):
        raise ValueError(f"{flag}: the token must be printable ASCII")
    if len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"{flag}: the token has {len(token)} characters, it needs at least {MIN_TOKEN_CHARS}")
    if token in tenant_tokens:
        raise ValueError(f"{flag}: the token is tenant {tenant_tokens[token]!r}'s token in --auth-tokens; the "
                         f"peer token reads every tenant's records and must be the cluster's own")
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o): whoever holds the peer token reads every tenant's "
                    "records; chmod 600 it", flag, mode & 0o777)
    return token


@dataclass(frozen=True)
class KeySpaces:
    """How the node's agents read a stored key: tenant prefix ‖ the key the client placed.

    Clients hash and digest their own keys; an auth node stores them under the tenant's 16-byte
    prefix. `prefixes` is None on a node without auth (one space, ``b""``). On an auth node a
    stored key under no prefix of its tokens file (a tenant since removed, records from before
    auth) is readable by no client of this node: ``split`` says None and the agents leave it.
    """

    prefixes: frozenset[bytes] | None = None

    @classmethod
    def of(cls, tenants: list[str] | None) -> KeySpaces:
        return cls(None if tenants is None else frozenset(tenant_prefix(t) for t in tenants))

    @property
    def roots(self) -> list[bytes]:
        """The prefix of every key space the agents work in."""
        return [b""] if self.prefixes is None else sorted(self.prefixes)

    def split(self, stored: bytes) -> tuple[bytes, bytes] | None:
        """(tenant prefix, client key) of a stored key; None if under no known tenant."""
        if self.prefixes is None:
            return b"", stored
        head = stored[:PREFIX_BYTES]
        return (head, stored[PREFIX_BYTES:]) if head in self.prefixes and len(stored) > PREFIX_BYTES else None

    def by_tenant(self, items: Iterable[tuple[bytes, T]]) -> dict[bytes, list[tuple[bytes, T]]]:
        """(client key, value) pairs of (stored key, value) pairs, by tenant prefix (storage
        writes and deletes each tenant's apart, in its ledger); unknown tenants' left out."""
        out: dict[bytes, list[tuple[bytes, T]]] = defaultdict(list)
        for stored, value in items:
            if (split := self.split(stored)) is not None:
                out[split[0]].append((split[1], value))
        return out


NO_AUTH = KeySpaces()  # a node without auth: one key space, stored keys are the clients'
