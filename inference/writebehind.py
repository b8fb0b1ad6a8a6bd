"""The write-behind of a CachedGenerator: the blocks a request computed are stored by one
background thread after the answer (each block one atomic put_many); a failed publish costs a
later miss, never an answer. A mixin: it uses the generator's client, codec, stats and lock."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from kvproto.errors import KVCacheError
from kvproto.pending import Pending

from .blocks import LoadedPrefix, PrefixPlan, export_segment

log = logging.getLogger(__name__)


class WriteBehind:
    def _start_write_behind(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-publish")
        self._pending = Pending()
        self._inflight: set[bytes] = set()  # segment keys queued for publishing

    def _publish_new(self, plan: PrefixPlan, prefix: LoadedPrefix, cache) -> Future | None:
        """Queue the blocks (and tail) this request computed; each block is one atomic put_many."""
        segments = plan.segments()[prefix.blocks :]
        if prefix.tail:
            segments = segments[:-1]
        with self._stats_lock:  # another request already publishing a block: leave it to that one
            segments = [s for s in segments if s[0] not in self._inflight]
            self._inflight.update(s[0] for s in segments)
        if not segments:
            return None
        return self._pending.track(self._pool.submit(self._store_segments, cache, segments))

    def _store_segments(self, cache, segments: list[tuple[bytes, int, int]]) -> int:
        """The loader's lookup found these absent: they are written without asking again (a
        writer that raced us makes the node answer "existed": first writer wins)."""
        stored = 0
        try:
            for key, start, count in segments:
                self.client.put_many(export_segment(cache, key, start, count, self.codec))
                stored += 1
        except KVCacheError as exc:  # write-behind: a failed publish costs a later miss, never an answer
            log.warning("publishing KV blocks failed after %d of %d: %s", stored, len(segments), exc)
            with self._stats_lock:
                self.stats["publish_errors"] += 1
        except Exception as exc:  # noqa: BLE001 - a bug: raised (tests) or counted with its traceback
            if self.internal_errors == "raise":
                raise
            log.error("internal error while publishing KV blocks", exc_info=exc)
            with self._stats_lock:
                self.stats["internal_error"] += 1
        finally:
            with self._stats_lock:
                self._inflight.difference_update(key for key, _, _ in segments)
                self.stats["published_segments"] += stored
        return stored

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued publish has been stored (or has failed and been counted)."""
        self._pending.flush(timeout)

    def close(self) -> None:
        """Wait for the publishes under way, then stop the publishing thread."""
        self.flush()
        self._pool.shutdown(wait=True)
