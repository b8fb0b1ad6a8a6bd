"""Recency touches of co-located hits are batched: one Lookup per node per interval."""

from __future__ import annotations

import threading

from kvclient.recency import TouchBatcher


def _collector():
    sent: list[tuple[str, list[bytes]]] = []
    lock = threading.Lock()
    arrived = threading.Event()

    def send(node: str, keys: list[bytes]) -> None:
        with lock:
            sent.append((node, sorted(keys)))
        arrived.set()

    send.arrived = arrived
    return sent, send


def test_touches_are_batched_per_node_and_deduplicated() -> None:
    sent, send = _collector()
    batcher = TouchBatcher(send, interval=60)  # the interval never comes: flush() is what it runs
    for _ in range(50):
        batcher.add("a:1", [b"k1", b"k2"])
    batcher.add("b:1", [b"k3"])
    batcher.add("a:1", [b"k4"])
    assert sent == []  # nothing on the request path
    batcher.flush()
    assert sorted(sent) == [("a:1", [b"k1", b"k2", b"k4"]), ("b:1", [b"k3"])]
    batcher.close()


def test_a_full_batch_goes_early_and_close_flushes() -> None:
    sent, send = _collector()
    batcher = TouchBatcher(send, interval=60, max_keys=10)
    batcher.add("a:1", [bytes([i]) for i in range(10)])
    assert send.arrived.wait(10)  # the background thread sent it, long before the interval
    assert len(sent) == 1 and len(sent[0][1]) == 10
    batcher.add("a:1", [b"late"])
    batcher.close()
    assert sent[-1] == ("a:1", [b"late"])
    batcher.add("a:1", [b"after close"])  # ignored, no thread left behind
    assert sent[-1] == ("a:1", [b"late"])
