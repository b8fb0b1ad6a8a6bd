"""Durable hints from the client side: a write that missed an owner leaves a hint record on an
owner that took it (``kvproto.hints``), whose node delivers it (``kvstore.hints``) when the
missed owner answers again, long after this client is gone. The in-memory ``HintQueue`` still
delivers sooner while this client lives; the node's copy is what survives it."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

from kvproto.errors import KVCacheError
from kvproto.hints import VALUE, hint_key

log = logging.getLogger(__name__)


def leave_hints(conn: Callable, timeout: float, missed: str, keys: Sequence[bytes], outcomes: dict[str, object],
                owners: Callable[[bytes], Sequence[str]]) -> int:
    """Put hint records for `keys` owed to `missed` on the first owner of each that stored it;
    returns how many were left. A failure here is logged: the hint queue and repair remain."""
    took = {n for n, o in outcomes.items() if not isinstance(o, KVCacheError)}
    by_node: dict[str, list[tuple[bytes, bytes]]] = defaultdict(list)
    for key in keys:
        holder = next((n for n in owners(key) if n in took and n != missed), None)
        hint = hint_key(missed, key)
        if holder is not None and hint is not None:
            by_node[holder].append((hint, VALUE))
    left = 0
    for node, items in by_node.items():
        try:
            conn(node).put(items, timeout)
            left += len(items)
        except KVCacheError as exc:
            log.warning("durable hints for %s not left on %s: %s", missed, node, exc)
    return left
