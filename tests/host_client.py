"""One host's client for tests/test_cluster_hosts.py, run inside that host's network namespace
(`ip netns exec NS python -m tests.host_client --etcd ...`, with $KVCACHE_HOST_ID set to its host).

It reads one JSON command per line on stdin and answers one JSON line on stdout, so the test can
measure the host's link between two steps. Keys and values are derived from (name, index): any
host can write or check a record without shipping its bytes. An error is answered as
{"error": traceback}, never by hanging.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import threading
import time
import traceback

from kvclient import Client
from kvproto.host import HOST_ID_ENV, host_id


def key(name: str, i: int) -> bytes:
    return hashlib.sha256(f"hosts/{name}/{i}".encode()).digest()


def value(name: str, i: int, size: int) -> bytes:
    return random.Random(f"hosts/{name}/{i}").randbytes(size)


class HostClient:
    def __init__(self, etcd: str, cluster: str, timeout: float) -> None:
        self.etcd, self.cluster, self.timeout = etcd, cluster, timeout
        self.kv = Client(etcd=etcd, cluster=cluster, timeout=timeout)

    def ready(self, nodes: int, wait: float = 20.0) -> dict:
        """Until the ring has `nodes` nodes, all ready, and the edge tier knows this host's node."""
        deadline = time.monotonic() + wait
        while True:
            members = self.kv.membership.view.members
            if (len(self.kv.ring.nodes) == nodes and all(m.state == "ready" for m in members.values())
                    and self.kv.edge.local is not None):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"ring {self.kv.ring.nodes} states {[m.state for m in members.values()]}")
            time.sleep(0.02)
        return {"ring": list(self.kv.ring.nodes), "local": self.kv.edge.local, "host": host_id(),
                "replication": self.kv.replication}

    def owners(self, name: str, count: int) -> dict:
        return {"owners": [self.kv.ring.owners(key(name, i), self.kv.replication) for i in range(count)]}

    def put(self, name: str, indices: list[int], size: int) -> dict:
        self.kv.put_many([(key(name, i), value(name, i, size)) for i in indices])
        self.kv.flush(30)
        return {"written": len(indices)}

    def read(self, name: str, indices: list[int], size: int) -> dict:
        before = dict(self.kv.reads)
        got = self.kv.get_many([key(name, i) for i in indices])
        return {"colocated": self.kv.reads["colocated"] - before["colocated"],
                "remote": self.kv.reads["remote"] - before["remote"],
                "missing": sum(v is None for v in got),
                "wrong": sum(v is not None and v != value(name, i, size) for i, v in zip(indices, got)),
                "attached": self.kv.local.attached()}

    def flush(self) -> dict:
        self.kv.flush(30)
        return {"kept": self.kv.edge.kept, "skipped": self.kv.edge.skipped}

    def probe(self, node: str, as_host: str) -> dict:
        """Would a client that calls itself `as_host` read `node` through its map? (A direct
        client of that one node, not the ring: the answer is the co-located check's alone.)"""
        old = os.environ.get(HOST_ID_ENV)
        os.environ[HOST_ID_ENV] = as_host
        try:
            with Client([node], timeout=self.timeout) as direct:
                info = direct.conn(node).local_info(self.timeout)
                deadline = time.monotonic() + self.timeout
                while node not in direct.local.attached() and time.monotonic() < deadline:
                    direct.reader(node)  # starts the attach, waits for it a little
                return {"attached": direct.local.attached().get(node), "node_host": info.host_id,
                        "readable": os.access(os.path.join(info.data_path, "data.mdb"), os.R_OK)}
        finally:
            if old is None:
                os.environ.pop(HOST_ID_ENV, None)
            else:
                os.environ[HOST_ID_ENV] = old

    def loop(self, name: str, count: int, size: int, victim: str, max_s: float, after_drop_s: float) -> dict:
        """Read every key, round after round, until `after_drop_s` past the victim leaving the
        ring. Its own client without the edge tier: reads go to ring owners, the victim too,
        instead of this host's edge copies. Answers a {"looping": ...} line after the first round."""
        items = {key(name, i): value(name, i, size) for i in range(count)}
        keys = list(items)
        rounds: list[float] = []  # monotonic end of each round (the test's clock too)
        reads = failed = 0
        errors: list[str] = []
        dropped: list[float] = []  # when this client's ring lost the victim (a 10 ms poll)
        with Client(etcd=self.etcd, cluster=self.cluster, timeout=self.timeout, edge=False) as kv:
            if victim not in kv.ring.nodes:
                raise RuntimeError(f"{victim} not in the ring {kv.ring.nodes} at the start")
            start = time.monotonic()

            def watch() -> None:
                while victim in kv.ring.nodes and time.monotonic() - start < max_s:
                    time.sleep(0.01)
                if victim not in kv.ring.nodes:
                    dropped.append(time.monotonic())

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            while True:
                for at in range(0, len(keys), 64):
                    batch = keys[at : at + 64]
                    try:
                        got = kv.get_many(batch)
                        failed += sum(v != items[k] for k, v in zip(batch, got))
                    except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                        failed += len(batch)
                        errors.append(repr(exc))
                    reads += len(batch)
                now = time.monotonic()
                rounds.append(now)
                if len(rounds) == 1:
                    print(json.dumps({"looping": now}), flush=True)
                if (dropped and now - dropped[0] >= after_drop_s) or now - start > max_s:
                    break
            watcher.join(1.0)
            ring = list(kv.ring.nodes)
        return {"reads": reads, "failed": failed, "errors": errors[:3], "rounds": rounds,
                "dropped_at": dropped[0] if dropped else None, "ring": ring}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--etcd", required=True)
    ap.add_argument("--cluster", default="hosts")
    ap.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args(argv)
    client = HostClient(args.etcd, args.cluster, args.timeout)
    print(json.dumps({"started": host_id()}), flush=True)
    try:
        for line in sys.stdin:
            command = json.loads(line)
            try:
                out = getattr(client, command.pop("op"))(**command)
            except Exception:  # noqa: BLE001 - the test shows it
                out = {"error": traceback.format_exc()}
            print(json.dumps(out), flush=True)
    finally:
        client.kv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
