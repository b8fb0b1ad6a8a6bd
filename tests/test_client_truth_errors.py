"""Errors that say what to do: each names the node (or file) and the cause."""

from __future__ import annotations

import subprocess

import pytest

from kvclient import Client
from kvproto.errors import Unavailable


def test_connection_refused_names_the_node_and_the_cause():
    with Client(["127.0.0.1:1"], replication=1, timeout=1) as client:
        with pytest.raises(Unavailable) as err:
            client.get(b"k" * 8)
    text = str(err.value)
    assert "127.0.0.1:1" in text and "connection refused" in text and "is the node running" in text


@pytest.mark.parametrize("nodes, message", [
    ("127.0.0.1", "node '127.0.0.1' has no port — write HOST:PORT, e.g. 127.0.0.1:7070"),
    ("http://127.0.0.1:7070", "no URL scheme (http://) — write HOST:PORT, e.g. 127.0.0.1:7070"),
    ("127.0.0.1:99999", "port '99999' is not a number from 1 to 65535"),
    ("/no/such/dir/cluster.json", "cluster file /no/such/dir/cluster.json does not exist"),
    ("clusterr.json", "cluster file clusterr.json does not exist"),
])
def test_bad_node_specs_say_what_to_write(nodes, message):
    with pytest.raises(ValueError) as err:
        Client(nodes)
    assert message in str(err.value)


def test_a_value_that_is_not_bytes_is_a_type_error_at_the_call(make_node):
    node = make_node()
    with Client([f"127.0.0.1:{node.port}"], replication=1) as client:
        with pytest.raises(TypeError, match="values are bytes.*got str.*encode"):
            client.put(b"k" * 8, "text")
        with pytest.raises(TypeError, match="keys are bytes"):
            client.put("k", b"v")
        with pytest.raises(TypeError, match="got int"):
            client.put_many([(b"k" * 8, 5)])


def _certificate(directory, name: str, san: str | None) -> tuple[str, str]:
    """The README's openssl line (with `san`), or a certificate naming only CN=example.org."""
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    extra = ["-addext", f"subjectAltName={san}"] if san else []
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=example.org", *extra],
        check=True, capture_output=True, timeout=60,
    )
    return str(cert), str(key)


def _failure(address: str, **creds) -> str:
    with Client([address], replication=1, timeout=2, **creds) as client:
        with pytest.raises(Unavailable) as err:
            client.get(b"k" * 8)
    return str(err.value)


def test_tls_errors_say_what_to_do(make_node, tmp_path):
    no_san, no_san_key = _certificate(tmp_path, "nosan", None)
    tls = make_node(tls_cert=no_san, tls_key=no_san_key)
    address = f"127.0.0.1:{tls.port}"
    text = _failure(address)  # a plaintext client against a TLS node
    assert address in text and "if it serves TLS, pass its CA" in text
    text = _failure(address, tls_ca=no_san)  # the certificate does not name 127.0.0.1
    assert address in text and "does not name 127.0.0.1" in text and "subjectAltName=IP:127.0.0.1" in text
    plain = make_node()
    text = _failure(f"127.0.0.1:{plain.port}", tls_ca=no_san)
    assert f"127.0.0.1:{plain.port}" in text and "speaks plaintext" in text
    # the README's line makes a certificate that works
    good, good_key = _certificate(tmp_path, "good", "DNS:localhost,IP:127.0.0.1")
    node = make_node(tls_cert=good, tls_key=good_key)
    with Client([f"127.0.0.1:{node.port}"], replication=1, timeout=2, tls_ca=good) as client:
        client.put(b"k" * 8, b"v")
        assert client.get(b"k" * 8) == b"v"
