"""Ring properties: balance, minimal movement on membership change, determinism across processes."""

import hashlib
import subprocess
import sys

from hypothesis import given, settings, strategies as st

from kvclient.ring import HashRing

NODES = [f"10.0.0.{i}:7070" for i in range(1, 6)]
KEYS = [hashlib.sha256(i.to_bytes(4, "little")).digest() for i in range(20000)]


def test_balance_within_ten_percent():
    ring = HashRing(NODES, vnodes=256)
    counts = {n: 0 for n in NODES}
    for key in KEYS:
        counts[ring.primary(key)] += 1
    mean = len(KEYS) / len(NODES)
    for node, count in counts.items():
        assert abs(count - mean) / mean <= 0.10, (node, count, mean)


def _moved(before: HashRing, after: HashRing, replication: int = 1) -> int:
    return sum(1 for k in KEYS if before.owners(k, replication) != after.owners(k, replication))


def test_join_and_leave_move_about_k_over_n():
    ring = HashRing(NODES, vnodes=128)
    joined = ring.with_nodes(NODES + ["10.0.0.9:7070"])
    left = ring.with_nodes(NODES[1:])
    k = len(KEYS)
    assert _moved(ring, joined) <= 1.2 * k / len(joined.nodes)
    assert _moved(ring, left) <= 1.2 * k / len(ring.nodes)


def test_replicas_are_distinct_and_primary_first():
    ring = HashRing(NODES)
    for key in KEYS[:500]:
        owners = ring.owners(key, 3)
        assert len(set(owners)) == 3 and owners[0] == ring.primary(key)
    assert len(ring.owners(KEYS[0], 99)) == len(NODES)


def test_deterministic_across_processes():
    code = (
        "import hashlib; from kvclient.ring import HashRing;"
        f"r=HashRing({NODES!r});"
        "print(','.join(r.primary(hashlib.sha256(i.to_bytes(4,'little')).digest()) for i in range(200)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    ring = HashRing(NODES)
    assert out == ",".join(ring.primary(k) for k in KEYS[:200])


@settings(max_examples=50, deadline=None)
@given(st.binary(min_size=1, max_size=64), st.integers(min_value=1, max_value=5))
def test_owners_stable_under_unrelated_removal(key, replication):
    """Removing a node that does not own a key never changes that key's owners."""
    ring = HashRing(NODES, vnodes=64)
    owners = ring.owners(key, replication)
    for node in NODES:
        if node not in owners and len(NODES) > replication:
            assert ring.with_nodes([n for n in NODES if n != node]).owners(key, replication) == owners
