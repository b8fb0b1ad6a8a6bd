"""The co-located half of the Client: reading same-host nodes' LMDB maps instead of calling them.

A mixin of ``kvclient.client.Client`` (it uses the client's ring, connections and gRPC reads);
kept apart so that the cluster logic and the fast path each stay one module.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

from .colocated import ColocatedReader

log = logging.getLogger(__name__)
Batch = list[tuple[int, memoryview]]  # (index of the key, payload view)


class ColocatedReads:
    def reader(self, node: str) -> ColocatedReader | None:
        """The node's co-located reader, attached on first use; None where it is unsafe."""
        if not self.colocated:
            return None
        with self._lock:
            known = node in self._readers
            reader = self._readers.get(node)
        if not known:
            reader = ColocatedReader.attach(self.conn(node), self.timeout, self.verify_colocated)
            with self._lock:
                self._readers[node] = reader
        if reader is not None and not reader.still_valid():
            log.info("co-located files of %s changed; back to gRPC", node)
            with self._lock:
                self._readers[node] = None
            reader.close()
            return None
        return reader

    def read_into(self, keys: Sequence[bytes], sink: Callable[[Batch], None], verify: bool = True) -> list[bool]:
        """Hand the stored keys' payloads to `sink` in batches of (key index, payload view).

        A batch's views are valid until sink returns: keys with a co-located replica come as
        views of its memory map (no copy before the sink's), one batch per node and read
        transaction; the rest come over gRPC. `verify=False` skips the record checksum on the
        co-located path only, for payloads that carry (and the sink checks) their own.
        Returns which keys were found.
        """
        self.refresh()
        keys = list(keys)
        found = [False] * len(keys)
        readers, local, _ = self._local_groups(keys)
        for node, idx in local.items():
            reader = readers[node]
            with reader.views([keys[i] for i in idx], verify=verify) as views:
                batch = [(i, view) for i, view in zip(idx, views) if view is not None]
                if batch:
                    sink(batch)
                for i, _ in batch:
                    found[i] = True
        self.reads["colocated"] += sum(found)
        rest = [i for i in range(len(keys)) if not found[i]]
        if rest:
            values = self._get_many_grpc([keys[i] for i in rest])
            batch = [(i, memoryview(value)) for i, value in zip(rest, values) if value is not None]
            if batch:
                sink(batch)
            for i, _ in batch:
                found[i] = True
            self.reads["grpc"] += len(rest)
        return found

    def _local_groups(self, keys: list[bytes]) -> tuple[dict, dict[str, list[int]], list[bool]]:
        """(readers, key indices per co-located node, whether every owner of each key is local)."""
        readers = {node: self.reader(node) for node in self.ring.nodes} if self.colocated else {}
        local: dict[str, list[int]] = defaultdict(list)
        all_local = [False] * len(keys)
        if not any(readers.values()):
            return readers, local, all_local
        owner_of: dict[bytes, tuple[str | None, bool]] = {}  # a block's layer records share a position
        for i, key in enumerate(keys):
            spot = key[:8]
            if spot not in owner_of:
                owners = self.ring.owners(key, self.replication)
                node = next((n for n in owners if readers.get(n) is not None), None)
                owner_of[spot] = (node, all(readers.get(n) is not None for n in owners))
            node, all_local[i] = owner_of[spot]
            if node is not None:
                local[node].append(i)
        return readers, local, all_local
