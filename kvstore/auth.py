"""Bearer-token authentication and tenant key spaces.

The tokens file holds one ``TOKEN TENANT`` pair per line (``#`` starts a comment). A call carries
``authorization: Bearer <token>``; the node maps the token to its tenant and keeps each tenant's
records under ``tenant_prefix(tenant)``, so a tenant that computes another tenant's keys still
reads, probes and deletes only its own space: absent and forbidden answer the same.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import grpc

from kvproto.errors import Unauthenticated

log = logging.getLogger(__name__)

PREFIX_BYTES = 16
MIN_TOKEN_CHARS = 16


def tenant_prefix(tenant: str) -> bytes:
    """The key-space prefix of a tenant: 16 bytes of SHA-256(b"tenant/" ‖ name)."""
    return hashlib.sha256(b"tenant/" + tenant.encode()).digest()[:PREFIX_BYTES]


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str = "tokens file") -> dict[str, str]:
    """token -> tenant from the file's text; ValueError (one line, with the line number) if bad."""
    tokens: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2:
            raise ValueError(f"{source} line {number}: expected 'TOKEN TENANT', got {len(fields)} fields")
        token, tenant = fields
        if not token.isascii() or not token.isprintable():
            raise ValueError(f"{source} line {number}: token must be printable ASCII")
        if tokens.get(token, tenant) != tenant:
            raise ValueError(f"{source} line {number}: token already given to tenant {tokens[token]!r}")
        if len(token) < MIN_TOKEN_CHARS:
            log.warning("%s line %d: token shorter than %d characters", source, number, MIN_TOKEN_CHARS)
        tokens[token] = tenant
    if not tokens:
        raise ValueError(f"{source}: no 'TOKEN TENANT' lines (auth on would refuse every call)")
    return tokens


class Authenticator:
    """Maps a call's bearer token to its tenant; refuses calls without a known token."""

    def __init__(self, tokens: dict[str, str]) -> None:
        # Compare digests (equal length) of every known token, never stopping early, so the time
        # taken does not tell how much of a guessed token was right.
        self._entries = [(_digest(token), tenant) for token, tenant in tokens.items()]
        self.tenants = sorted(set(tokens.values()))

    @classmethod
    def from_file(cls, path: str) -> "Authenticator":
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"auth tokens file {path}: not UTF-8 text") from exc
        auth = cls(parse_tokens(text, f"auth tokens file {path}"))
        log.info("auth on: %d tenants from %s", len(auth.tenants), path)
        return auth

    def tenant_of(self, token: str) -> str | None:
        digest = _digest(token)
        found = None
        for known, tenant in self._entries:
            if hmac.compare_digest(digest, known):
                found = tenant
        return found

    def tenant(self, context: grpc.ServicerContext) -> str:
        values = [v for k, v in (context.invocation_metadata() or ()) if k == "authorization"]
        if len(values) != 1:
            raise Unauthenticated("missing bearer token" if not values else "more than one authorization header")
        value = values[0] if isinstance(values[0], str) else values[0].decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("authorization must be 'Bearer <token>'")
        tenant = self.tenant_of(token.strip())
        if tenant is None:
            raise Unauthenticated("unknown token")
        return tenant

    def key_prefix(self, context: grpc.ServicerContext) -> bytes:
        return tenant_prefix(self.tenant(context))
