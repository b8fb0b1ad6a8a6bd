"""The connector's settings (``kv_connector_extra_config``) and the model's identity in vLLM.

Every bad value fails the engine start with one line that names the key and what was wrong.
Defaults fit the embedded cluster (``inference.embedded``, ``make demo-vllm``): only where the
nodes are must be said, by ``nodes``, ``cluster_file`` or the ``KVCACHE_NODES`` variable.
"""

from __future__ import annotations

import glob
import hashlib
import math
import os
import struct
from dataclasses import dataclass
from typing import Any

from kvproto.keys import DEFAULT_BLOCK_SIZE, namespace

from ..fingerprint import FINGERPRINT_VERSION, canonical_json, config_fields, files_digest, tokenizer_digest

PREFIX = "kv_connector_extra_config"
NODES_ENV = "KVCACHE_NODES"
KNOWN = {"nodes", "cluster_file", "replication", "write_quorum", "token", "tls_ca", "tenant_salt", "block_size",
         "colocated", "verify", "timeout", "fingerprint", "save", "listings", "trust_file",
         "listings_refresh_seconds"}
_SALT_LEN = struct.Struct("<I")


class ConfigError(ValueError):
    """A bad connector setting: the message is the one line the operator sees."""


@dataclass(frozen=True)
class ConnectorConfig:
    nodes: tuple[str, ...] | str  # addresses, or the path of a cluster file
    replication: int = 2
    write_quorum: int = 1
    token: str | None = None
    tls_ca: str | None = None
    tenant_salt: bytes = b""
    block_size: int = DEFAULT_BLOCK_SIZE
    colocated: bool = True
    verify: bool = True
    timeout: float = 10.0
    fingerprint: str | None = None  # given by the operator instead of computed (big models, hub ids)
    save: bool = True  # publish new blocks (False: a reader that only loads)
    listings: bool = False  # also load prefixes from the context market's listings (docs/market.md)
    trust: tuple[tuple[str, bytes], ...] = ()  # publisher tenant -> Ed25519 key, from `trust_file`
    listings_refresh_seconds: float = 30.0

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None, vllm_block_size: int) -> "ConnectorConfig":
        extra = dict(extra or {})
        unknown = sorted(set(extra) - KNOWN)
        if unknown:
            raise ConfigError(f"{PREFIX}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KNOWN))})")
        nodes: tuple[str, ...] | str
        if "cluster_file" in extra:
            nodes = _file(extra, "cluster_file")
        else:
            raw = extra.get("nodes", os.environ.get(NODES_ENV))
            if raw is None:
                raise ConfigError(f"{PREFIX}: say where the store is: 'nodes' (host:port list), 'cluster_file', "
                                  f"or the {NODES_ENV} environment variable")
            items = raw.split(",") if isinstance(raw, str) else raw
            if not isinstance(items, (list, tuple)) or not items:
                raise ConfigError(f"{PREFIX}.nodes: a non-empty list of host:port, got {raw!r}")
            nodes = tuple(str(n).strip() for n in items)
            for node in nodes:
                host, sep, port = node.rpartition(":")
                if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                    raise ConfigError(f"{PREFIX}.nodes: {node!r} is not host:port")
        replication = _int(extra, "replication", 2, 1)
        if isinstance(nodes, tuple) and replication > len(nodes):
            replication = len(nodes)  # a smaller cluster keeps every record on every node
        block_size = _int(extra, "block_size", DEFAULT_BLOCK_SIZE, 1)
        if block_size % vllm_block_size:
            raise ConfigError(f"{PREFIX}.block_size: {block_size} is not a multiple of vLLM's block size "
                              f"{vllm_block_size} (use e.g. {vllm_block_size * max(1, block_size // vllm_block_size)})")
        tls_ca = extra.get("tls_ca")
        if tls_ca is not None and not os.path.isfile(str(tls_ca)):
            raise ConfigError(f"{PREFIX}.tls_ca: {tls_ca} does not exist")
        fingerprint = extra.get("fingerprint")
        if fingerprint is not None and not _is_hex(str(fingerprint), 64):
            raise ConfigError(f"{PREFIX}.fingerprint: 64 hex digits, got {fingerprint!r}")
        timeout = _seconds(extra, "timeout", 10.0, positive=True)
        listings = _bool(extra, "listings", False)
        trust = _trust(extra, listings)
        return cls(
            nodes=nodes, replication=replication, write_quorum=_int(extra, "write_quorum", 1, 1),
            token=extra.get("token"), tls_ca=tls_ca, tenant_salt=_string(extra, "tenant_salt", "").encode(),
            block_size=block_size, colocated=_bool(extra, "colocated", True), verify=_bool(extra, "verify", True),
            timeout=timeout, fingerprint=fingerprint, save=_bool(extra, "save", True), listings=listings,
            trust=trust, listings_refresh_seconds=_seconds(extra, "listings_refresh_seconds", 30.0, positive=False),
        )

    def client(self):
        from kvclient import Client

        return Client(list(self.nodes) if isinstance(self.nodes, tuple) else self.nodes,
                      replication=self.replication, write_quorum=self.write_quorum, timeout=self.timeout,
                      token=self.token, tls_ca=self.tls_ca, colocated=self.colocated,
                      verify_colocated=self.verify)


def request_salt(tenant_salt: bytes, cache_salt: str | None) -> bytes:
    """The tenant salt of a request: the operator's salt, with the request's `cache_salt` folded
    in (uint32 LE length of the tenant salt ‖ tenant salt ‖ UTF-8 cache salt; docs/key-spec.md)."""
    if not cache_salt:
        return tenant_salt
    return _SALT_LEN.pack(len(tenant_salt)) + tenant_salt + cache_salt.encode()


def request_namespace(fingerprint: str, tenant_salt: bytes, cache_salt: str | None) -> bytes:
    return namespace(fingerprint, request_salt(tenant_salt, cache_salt))


def vllm_identity(vllm_config: Any) -> dict[str, Any]:
    """The fingerprint identity of the model a vLLM engine serves (docs/key-spec.md, "vLLM").

    The fields of the transformers identity, plus ``engine``: KV written by vLLM is keyed apart from
    KV written by transformers for the same weights (different kernels, not bitwise equal)."""
    model_config, cache_config = vllm_config.model_config, vllm_config.cache_config
    model_dtype = str(model_config.dtype).removeprefix("torch.")
    cache_dtype = model_dtype if cache_config.cache_dtype == "auto" else str(cache_config.cache_dtype)
    architectures = getattr(model_config.hf_config, "architectures", None) or [type(model_config.hf_config).__name__]
    attention = getattr(getattr(vllm_config, "attention_config", None), "backend", None)
    from vllm.platforms import current_platform

    return {
        "fingerprint_version": FINGERPRINT_VERSION,
        "architecture": architectures[0],
        "config": config_fields(model_config.hf_text_config),
        "cache_dtype": cache_dtype,
        "tokenizer": _tokenizer_digest(model_config),
        "weights": "files:" + files_digest(_weight_files(model_config.model)),
        "engine": {
            "name": "vllm",
            "device": current_platform.device_type,
            "attention_backend": str(attention) if attention is not None else "auto",
            "quantization": model_config.quantization,
        },
    }


def vllm_fingerprint(vllm_config: Any) -> str:
    return hashlib.sha256(canonical_json(vllm_identity(vllm_config))).hexdigest()


def _weight_files(model: str) -> list[str]:
    if not os.path.isdir(model):
        raise ConfigError(f"fingerprint: model {model!r} is not a local directory; download it first or set "
                          f"{PREFIX}.fingerprint")
    files = sorted(glob.glob(os.path.join(model, "*.safetensors")))
    if not files:
        raise ConfigError(f"fingerprint: no *.safetensors files in {model}; set {PREFIX}.fingerprint")
    return files


def _tokenizer_digest(model_config: Any) -> str | None:
    if getattr(model_config, "skip_tokenizer_init", False):
        return None
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer,
                                              revision=getattr(model_config, "tokenizer_revision", None),
                                              trust_remote_code=model_config.trust_remote_code)
    return tokenizer_digest(tokenizer)


def _int(extra: dict, key: str, default: int, minimum: int) -> int:
    value = extra.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{PREFIX}.{key}: an integer >= {minimum}, got {value!r}")
    return value


def _bool(extra: dict, key: str, default: bool) -> bool:
    value = extra.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{PREFIX}.{key}: true or false, got {value!r}")
    return value


def _seconds(extra: dict, key: str, default: float, positive: bool) -> float:
    value = extra.get(key, default)
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value < 0 or (positive and value == 0):
        raise ConfigError(f"{PREFIX}.{key}: seconds {'>' if positive else '>='} 0, got {value!r}")
    return float(value)


def _trust(extra: dict, listings: bool) -> tuple[tuple[str, bytes], ...]:
    """The publishers whose listings the engine may load: `trust_file`, required with `listings`."""
    if "trust_file" not in extra:
        if listings:
            raise ConfigError(f"{PREFIX}.trust_file: required when listings is on (a file of 'TENANT HEXKEY' "
                              "lines: the publishers whose signed listings this engine may load)")
        return ()
    if not listings:
        raise ConfigError(f"{PREFIX}.trust_file: set listings to true to use it")
    path = _file(extra, "trust_file")
    from ..listings import load_trust

    try:
        trust = load_trust(path)
    except (OSError, ValueError) as exc:  # UnicodeDecodeError is a ValueError
        raise ConfigError(f"{PREFIX}.trust_file: {exc}") from None
    if not trust:
        raise ConfigError(f"{PREFIX}.trust_file: {path} names no publisher")
    return tuple(sorted(trust.items()))


def _file(extra: dict, key: str) -> str:
    path = _string(extra, key)
    if not os.path.isfile(path):
        raise ConfigError(f"{PREFIX}.{key}: {path} does not exist")
    return path


def _string(extra: dict, key: str, default: str | None = None) -> str:
    value = extra.get(key, default)
    if not isinstance(value, str):
        raise ConfigError(f"{PREFIX}.{key}: a string, got {value!r}")
    return value


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text.lower())
