"""The connector's settings and salts (no engine): one-line errors, defaults, the cache_salt rule."""

from __future__ import annotations

import pytest

from inference.vllm import kv_transfer_config
from inference.vllm.config import ConfigError, ConnectorConfig, request_namespace, request_salt
from kvproto.keys import namespace

FP = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"


def test_defaults_need_only_the_nodes(monkeypatch):
    monkeypatch.delenv("KVCACHE_NODES", raising=False)
    config = ConnectorConfig.from_extra({"nodes": ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]}, 128)
    assert (config.replication, config.block_size, config.colocated, config.verify) == (2, 256, True, True)
    assert ConnectorConfig.from_extra({"nodes": "a:1,b:2"}, 16).nodes == ("a:1", "b:2")
    assert ConnectorConfig.from_extra({"nodes": ["a:1"]}, 16).replication == 1  # capped at the cluster size
    monkeypatch.setenv("KVCACHE_NODES", "h:9")
    assert ConnectorConfig.from_extra({}, 16).nodes == ("h:9",)


@pytest.mark.parametrize("extra, words", [
    ({}, "say where the store is"),
    ({"nodes": ["nohost"]}, "'nohost' is not host:port"),
    ({"nodes": ["a:99999"]}, "is not host:port"),
    ({"nodes": []}, "non-empty list"),
    ({"nodes": ["a:1"], "replication": 0}, "replication: an integer >= 1"),
    ({"nodes": ["a:1"], "replication": "2"}, "replication: an integer >= 1"),
    ({"nodes": ["a:1"], "block_size": 200}, "not a multiple of vLLM's block size 128"),
    ({"nodes": ["a:1"], "colocated": "yes"}, "colocated: true or false"),
    ({"nodes": ["a:1"], "tls_ca": "/no/such/ca.pem"}, "tls_ca: /no/such/ca.pem does not exist"),
    ({"cluster_file": "/no/such.json"}, "cluster_file: /no/such.json does not exist"),
    ({"nodes": ["a:1"], "fingerprint": "abc"}, "fingerprint: 64 hex digits"),
    ({"nodes": ["a:1"], "timeout": -1}, "timeout: seconds > 0"),
    ({"nodes": ["a:1"], "replicas": 2}, "unknown key 'replicas'"),
])
def test_bad_settings_fail_in_one_line(monkeypatch, extra, words):
    monkeypatch.delenv("KVCACHE_NODES", raising=False)
    with pytest.raises(ConfigError) as info:
        ConnectorConfig.from_extra(extra, 128)
    message = str(info.value)
    assert words in message and "\n" not in message and message.startswith(("kv_connector_extra_config", "fp"))


def test_cache_salt_is_folded_into_the_tenant_salt():
    assert request_salt(b"tenant-a", None) == b"tenant-a"
    assert request_salt(b"tenant-a", "") == b"tenant-a"
    assert request_salt(b"tenant-a", "s") == b"\x08\x00\x00\x00tenant-as"
    # unambiguous: the tenant salt's length comes first
    assert request_salt(b"ab", "c") != request_salt(b"a", "bc")
    assert request_namespace(FP, b"", None) == namespace(FP, b"")
    assert request_namespace(FP, b"", "s") != request_namespace(FP, b"", None)
    # the key-spec vector (docs/key-spec.md §5)
    assert request_namespace(FP, b"tenant-a", "user-1").hex() == (
        "2a670c4ab5062d7b578728803affaf8c0cee3bfb1a80be28824281c3cad51580")


def test_transfer_config_names_the_connector():
    config = kv_transfer_config(["127.0.0.1:7000"], replication=1)
    assert config["kv_connector"] == "KVStoreConnector"
    assert config["kv_connector_module_path"] == "inference.vllm.connector"
    assert config["kv_load_failure_policy"] == "recompute"
    assert config["kv_connector_extra_config"] == {"nodes": ["127.0.0.1:7000"], "replication": 1}
