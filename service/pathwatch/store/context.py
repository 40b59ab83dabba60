"""ContextIndex: where executables have run, so an alert can say what is usual.

Written once per new (cluster, path, host) and (cluster, name, path, host) combination when the
first-seen store creates a key, in the same write batch:

- ``P cluster 0x00 path 0x00 host`` -> u64be first seen ms [+ u64be checked ms]
- ``N cluster 0x00 name 0x00 path 0x00 host`` -> the same
- ``C`` counts, kept exact in the same batches that add and remove ``P`` / ``N`` entries, so
  "seen on N nodes" never depends on how many rows a scan may read:

  - ``Cp cluster 0x00 path`` -> u64be hosts with a ``P`` entry, and ``Cq cluster 0x00 path 0x00
    first:u64be host`` -> empty, the same hosts by first-seen time;
  - ``Cm cluster 0x00 name 0x00 path`` / ``Cn ... 0x00 first host``: hosts per ``N`` path;
  - ``Ch cluster 0x00 name 0x00 host`` -> u64be first ms + u32be ``N`` paths on that host, with
    ``Co cluster 0x00 name`` / ``Cr ... 0x00 first host``: distinct hosts per name.

  "Hosts before T" is the count minus the time-ordered entries at or after T: a scan of what
  arrived since T, not of every host.

Entries leave through `sweep`: one whose checked time is older than the retention horizon is
kept (and its checked time renewed) while a stored key of a context rule still holds its
(cluster, host, path), and deleted otherwise, together with its counts.

A data dir from a release without counts is counted once by `rebuild_counts` (the keyspace
sweep calls it); until then `explain` reads the old bounded scans.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pathwatch.store import keyspace as ks
from pathwatch.store.db import Batch, Database

_SEP = "\x00"
SEP_BYTES = _SEP.encode()  # between the parts of a P or N key (cluster first)
_COUNTED = ks.meta_key("context:counted")
_REFS = struct.Struct(">QI")
_BATCH = 10_000

# Counted sets: (count kind, time kind) under the C tag.
_PATH = (b"Cp", b"Cq")  # scope (cluster, path): hosts
_NAME_PATH = (b"Cm", b"Cn")  # scope (cluster, name, path): hosts
_NAME_HOST = (b"Co", b"Cr")  # scope (cluster, name): hosts
_ENTITY = b"Ch"  # (cluster, name, host) -> first ms + number of N paths

# For (cluster, host): the paths and (name, path) pairs that stored keys still hold; None when
# the store cannot tell (then entries are kept).
Liveness = Callable[[set[tuple[str, str]]], dict[tuple[str, str], "LiveContext | None"]]


@dataclass(frozen=True, slots=True)
class LiveContext:
    paths: frozenset[str]
    names: frozenset[tuple[str, str]]


def _enc(*parts: str) -> bytes:
    return _SEP.join(parts).encode("utf-8", "surrogatepass")


def _dec(raw: bytes) -> list[str]:
    return raw.decode("utf-8", "surrogatepass").split(_SEP)


def _path_key(cluster: str, path: str, host: str) -> bytes:
    return b"P" + _enc(cluster, path, host)


def _name_key(cluster: str, name: str, path: str, host: str) -> bytes:
    return b"N" + _enc(cluster, name, path, host)


def checked_of(value: bytes) -> int:
    """When a P/N/H value was last confirmed: its second u64, or its first seen (older
    releases wrote that alone)."""
    return ks.from_u64(value[8:16]) if len(value) >= 16 else ks.from_u64(value)


def with_checked(value: bytes, checked_ms: int) -> bytes:
    return value[:8] + ks.u64(checked_ms)


class _Tally:
    """Count deltas and time-index writes of one write batch; `flush` before its commit."""

    def __init__(self) -> None:
        self.deltas: dict[bytes, int] = {}

    def change(
        self, wb: Batch, kinds: tuple[bytes, bytes], scope: bytes, host: str, first: int, sign: int
    ) -> None:
        count_kind, time_kind = kinds
        tkey = time_kind + scope + b"\x00" + ks.u64(first) + host.encode("utf-8", "surrogatepass")
        if sign > 0:
            wb.put(tkey, b"")
        else:
            wb.delete(tkey)
        ckey = count_kind + scope
        self.deltas[ckey] = self.deltas.get(ckey, 0) + sign

    def flush(self, db: Database, wb: Batch) -> None:
        keys = [k for k, d in self.deltas.items() if d]
        for key, raw in zip(keys, db.get_many(keys), strict=True):
            n = (ks.from_u64(raw) if raw else 0) + self.deltas[key]
            if n > 0:
                wb.put(key, ks.u64(n))
            else:
                wb.delete(key)
        self.deltas.clear()


class ContextIndex:
    """Writes happen on the writer thread (`note_many`, `sweep`, `rebuild_counts`); reads
    from any thread (`explain`)."""

    def __init__(self, db: Database, cache_entries: int = 100_000, scan_limit: int = 5_000) -> None:
        self._db = db
        self._known: set[bytes] = set()
        self._cache_entries = cache_entries
        self._scan_limit = scan_limit  # only for a data dir not counted yet
        self._counted: bool | None = None
        self._cursor: dict[bytes, bytes] = {}

    # -- writes (writer thread) --------------------------------------------------------------

    @property
    def counted(self) -> bool:
        """True once the C counts cover every P/N entry (any thread; cached once true)."""
        if not self._counted:
            self._counted = self._db.get(_COUNTED) is not None
        return self._counted

    def note_many(self, entries: list[tuple[str, str, str, str | None, int]], wb: Batch) -> None:
        """Record (once each) that path / name ran on host in cluster, for (cluster, host,
        path, name, first_ms) entries: one batched RocksDB multi-get for what memory does not
        already know, then puts for what is missing, with their counts."""
        wanted: dict[bytes, int] = {}
        for cluster, host, path, name, first_ms in entries:
            keys = [_path_key(cluster, path, host)]
            if name is not None:
                keys.append(_name_key(cluster, name, path, host))
            for key in keys:
                if key not in self._known:
                    wanted[key] = min(first_ms, wanted.get(key, first_ms))
        if not wanted:
            return
        candidates = list(wanted)
        added: list[tuple[bytes, int]] = []
        for key, raw in zip(candidates, self._db.get_many(candidates), strict=True):
            if raw is None:
                wb.put(key, ks.u64(wanted[key]))
                added.append((key, wanted[key]))
        if added and self._counting(wb):
            self._count_added(added, wb)
        if len(self._known) + len(candidates) > self._cache_entries:
            self._known.clear()
        self._known.update(candidates)

    def forget(self) -> None:
        """Drop what memory believes is written: after a commit that failed, entries noted
        for it must be written again by the next one."""
        self._known.clear()
        self._counted = None

    def _counting(self, wb: Batch) -> bool:
        """Whether writes keep counts: yes once counted, or from the start on an empty index."""
        if self.counted:
            return True
        for tag in (b"P", b"N"):
            for _ in self._db.scan_prefix(tag, values=False):
                return False
        wb.put(_COUNTED, b"1")
        self._counted = True
        return True

    def _count_added(self, added: Iterable[tuple[bytes, int]], wb: Batch) -> None:
        """Counts for new P/N entries (`added`: RocksDB key, first ms), into `wb`."""
        tally = _Tally()
        entities: dict[bytes, tuple[int, int]] = {}
        for key, first in added:
            parts = _dec(key[1:])
            if key[:1] == b"P":
                cluster, path, host = parts
                tally.change(wb, _PATH, _enc(cluster, path), host, first, 1)
            else:
                cluster, name, path, host = parts
                tally.change(wb, _NAME_PATH, _enc(cluster, name, path), host, first, 1)
                ekey = _ENTITY + _enc(cluster, name, host)
                low, refs = entities.get(ekey, (first, 0))
                entities[ekey] = (min(low, first), refs + 1)
        self._entities_changed(entities, wb, tally)
        tally.flush(self._db, wb)

    def _entities_changed(
        self, changes: dict[bytes, tuple[int, int]], wb: Batch, tally: _Tally
    ) -> None:
        """Apply (first ms, delta of N paths) to (cluster, name, host) entities: a host enters
        the name's count with its first path and leaves it with its last."""
        keys = list(changes)
        for ekey, raw in zip(keys, self._db.get_many(keys), strict=True):
            first, delta = changes[ekey]
            cluster, name, host = _dec(ekey[2:])
            scope = _enc(cluster, name)
            if raw is None:
                old_first, refs = first, 0
            else:
                old_first, refs = _REFS.unpack(raw[: _REFS.size])
            refs += delta
            if refs <= 0:
                wb.delete(ekey)
                if raw is not None:
                    tally.change(wb, _NAME_HOST, scope, host, old_first, -1)
                continue
            new_first = min(old_first, first) if delta > 0 else old_first
            if raw is None:
                tally.change(wb, _NAME_HOST, scope, host, new_first, 1)
            elif new_first != old_first:
                tally.change(wb, _NAME_HOST, scope, host, old_first, -1)
                tally.change(wb, _NAME_HOST, scope, host, new_first, 1)
            wb.put(ekey, _REFS.pack(max(0, new_first), refs))

    def recount(self) -> int:
        """Count again from scratch after P/N entries were written without their counts (a
        baseline import merges rows directly). Writer thread only."""
        wb = Batch()
        wb.delete(_COUNTED)
        self._db.commit(wb)
        self._counted = None
        return self.rebuild_counts()

    def rebuild_counts(self) -> int:
        """Count every P/N entry from scratch (a data dir from a release without counts), in
        batches of 10,000; returns the entries counted. Writer thread only: no P/N write may
        happen meanwhile. Idempotent: an interrupted rebuild starts over."""
        if self.counted:
            return 0
        self._db.delete_range(b"C", b"D")
        done = 0
        for tag in (b"P", b"N"):
            chunk: list[tuple[bytes, int]] = []
            for key, value in self._db.scan_prefix(tag):
                chunk.append((key, ks.from_u64(value)))
                if len(chunk) >= _BATCH:
                    done += self._commit_counts(chunk)
                    chunk = []
            done += self._commit_counts(chunk)
        wb = Batch()
        wb.put(_COUNTED, b"1")
        self._db.commit(wb)
        self._counted = True
        return done

    def _commit_counts(self, chunk: list[tuple[bytes, int]]) -> int:
        wb = Batch()
        self._count_added(chunk, wb)
        self._db.commit(wb)
        return len(chunk)

    def sweep(
        self,
        now_ms: int,
        stale_before_ms: int,
        live: Liveness,
        in_time: Callable[[], bool],
    ) -> dict[str, int]:
        """Check P and N entries last confirmed before `stale_before_ms`: those whose (cluster,
        host, path[, name]) no stored key holds any more are deleted with their counts, the
        others are confirmed at `now_ms`. Batches of 10,000; stops when `in_time()` turns
        false and resumes there on the next call. Returns deletions per tag."""
        if not self.counted:
            self.rebuild_counts()
        out = {"P": 0, "N": 0}
        for tag in (b"P", b"N"):
            lower = self._cursor.get(tag, tag)
            chunk: list[tuple[bytes, bytes]] = []
            finished = True
            for read, (key, value) in enumerate(self._db.scan(lower, ks.prefix_end(tag)), 1):
                if checked_of(value) < stale_before_ms:
                    chunk.append((key, value))
                if len(chunk) >= _BATCH or read % (10 * _BATCH) == 0:
                    out[tag.decode()] += self._check(chunk, now_ms, live)
                    chunk = []
                    if not in_time():
                        self._cursor[tag] = key + b"\x00"
                        finished = False
                        break
            out[tag.decode()] += self._check(chunk, now_ms, live)
            if finished:
                self._cursor.pop(tag, None)
            else:
                break
        return out

    def _check(self, chunk: list[tuple[bytes, bytes]], now_ms: int, live: Liveness) -> int:
        if not chunk:
            return 0
        parsed = [(key, value, _dec(key[1:])) for key, value in chunk]
        groups = {(p[0], p[-1]) for _, _, p in parsed}
        alive = live(groups)
        wb = Batch()
        tally = _Tally()
        entities: dict[bytes, tuple[int, int]] = {}
        deleted = 0
        for key, value, parts in parsed:
            ctx = alive.get((parts[0], parts[-1]))
            if ctx is None or (
                parts[1] in ctx.paths if len(parts) == 3 else (parts[1], parts[2]) in ctx.names
            ):
                wb.put(key, with_checked(value, now_ms))
                continue
            wb.delete(key)
            self._known.discard(key)
            deleted += 1
            first = ks.from_u64(value)
            if len(parts) == 3:
                cluster, path, host = parts
                tally.change(wb, _PATH, _enc(cluster, path), host, first, -1)
            else:
                cluster, name, path, host = parts
                tally.change(wb, _NAME_PATH, _enc(cluster, name, path), host, first, -1)
                ekey = _ENTITY + _enc(cluster, name, host)
                entities[ekey] = (first, entities.get(ekey, (first, 0))[1] - 1)
        self._entities_changed(entities, wb, tally)
        tally.flush(self._db, wb)
        self._db.commit(wb)
        return deleted

    # -- reads (any thread) ------------------------------------------------------------------

    def _count_before(self, kinds: tuple[bytes, bytes], scope: bytes, before_ms: int) -> int:
        """Members of a counted set first seen before `before_ms`: the count, minus the
        time-ordered entries at or after it (those since `before_ms` only)."""
        count_kind, time_kind = kinds
        raw = self._db.get(count_kind + scope)
        total = ks.from_u64(raw) if raw else 0
        prefix = time_kind + scope + b"\x00"
        since = self._db.scan(prefix + ks.u64(before_ms), ks.prefix_end(prefix), values=False)
        return total - sum(1 for _ in since)

    def _first_of(self, key: bytes) -> int | None:
        raw = self._db.get(key)
        return ks.from_u64(raw) if raw else None

    def _scan(self, prefix: bytes) -> list[tuple[list[str], int]]:
        out = []
        for raw, value in self._db.scan_prefix(prefix):
            out.append((_dec(raw[1:]), ks.from_u64(value)))
            if len(out) >= self._scan_limit:
                break
        return out

    def _path_count(self, cluster: str, path: str, before_ms: int, memo: ContextMemo | None) -> int:
        scope = _enc(cluster, path)
        cached = memo.get((b"Cp" + scope, before_ms)) if memo is not None else None
        if cached is None:
            cached = self._count_before(_PATH, scope, before_ms)
            if memo is not None:
                memo[(b"Cp" + scope, before_ms)] = cached
        assert isinstance(cached, int)
        return cached

    def _name_counts(
        self, cluster: str, name: str, before_ms: int, memo: ContextMemo | None
    ) -> tuple[int, list[tuple[str, int]]]:
        """Hosts `name` ran on in `cluster` before `before_ms`, and its paths with their host
        counts, most hosts first (ties by path), at most 6."""
        scope = _enc(cluster, name)
        cached = memo.get((b"Co" + scope, before_ms)) if memo is not None else None
        if cached is None:
            hosts = self._count_before(_NAME_HOST, scope, before_ms)
            per_path: list[tuple[str, int]] = []
            prefix = _NAME_PATH[0] + scope + b"\x00"
            for raw, _ in self._db.scan_prefix(prefix, values=False):
                path = raw[len(prefix) :].decode("utf-8", "surrogatepass")
                n = self._count_before(_NAME_PATH, raw[2:], before_ms)
                if n > 0:
                    per_path.append((path, n))
            top = sorted(per_path, key=lambda item: (-item[1], item[0]))[:6]
            cached = (hosts, top)
            if memo is not None:
                memo[(b"Co" + scope, before_ms)] = cached
        assert isinstance(cached, tuple)
        return cached

    def _legacy_path_hosts(
        self, cluster: str, path: str, before_ms: int, memo: ContextMemo | None
    ) -> set[str]:
        prefix = b"P" + _enc(cluster, path) + b"\x00"
        cached = memo.get((prefix, before_ms)) if memo is not None else None
        if cached is None:
            cached = {p[2] for p, first in self._scan(prefix) if first < before_ms}
            if memo is not None:
                memo[(prefix, before_ms)] = cached
        assert isinstance(cached, set)
        return cached

    def _legacy_name_paths(
        self, cluster: str, name: str, before_ms: int, memo: ContextMemo | None
    ) -> _NameSummary:
        prefix = b"N" + _enc(cluster, name) + b"\x00"
        cached = memo.get((prefix, before_ms)) if memo is not None else None
        if cached is None:
            pairs = {(p[2], p[3]) for p, first in self._scan(prefix) if first < before_ms}
            per_path: Counter[str] = Counter(path for path, _ in pairs)
            top = sorted(per_path.items(), key=lambda item: (-item[1], item[0]))[:6]
            cached = _NameSummary({host for _, host in pairs}, top)
            if memo is not None:
                memo[(prefix, before_ms)] = cached
        assert isinstance(cached, _NameSummary)
        return cached

    def explain(
        self,
        cluster: str,
        host: str,
        path: str | None,
        name: str | None,
        before_ms: int,
        memo: ContextMemo | None = None,
    ) -> dict[str, Any]:
        """What ran where before `before_ms` (the window start): for the alert's `context`.
        Exact at any cluster size once counted (see the module docstring).

        `memo` shares the counts between the alerts of one evaluation, which often name the
        same executable (a rollout, a worm): each (cluster, path) and (cluster, name) is
        counted once per evaluation, and each alert costs a point read or two.
        """
        if not self.counted:
            return self._legacy_explain(cluster, host, path, name, before_ms, memo)
        ctx: dict[str, Any] = {}
        if path is not None:
            hosts = self._path_count(cluster, path, before_ms, memo)
            own = self._first_of(_path_key(cluster, path, host))
            ctx["path_seen_on_other_nodes"] = hosts - (own is not None and own < before_ms)
        if name is not None:
            hosts, top = self._name_counts(cluster, name, before_ms, memo)
            own = self._first_of(_ENTITY + _enc(cluster, name, host))
            ctx["name_seen_on_other_nodes"] = hosts - (own is not None and own < before_ms)
            ctx["name_usual_paths"] = [
                {"path": usual, "nodes": n} for usual, n in top if usual != path
            ][:5]
        return ctx

    def _legacy_explain(
        self,
        cluster: str,
        host: str,
        path: str | None,
        name: str | None,
        before_ms: int,
        memo: ContextMemo | None,
    ) -> dict[str, Any]:
        """`explain` over scans bounded by `scan_limit` rows: until the counts are built."""
        ctx: dict[str, Any] = {}
        if path is not None:
            hosts = self._legacy_path_hosts(cluster, path, before_ms, memo)
            ctx["path_seen_on_other_nodes"] = len(hosts) - (host in hosts)
        if name is not None:
            summary = self._legacy_name_paths(cluster, name, before_ms, memo)
            ctx["name_seen_on_other_nodes"] = len(summary.hosts) - (host in summary.hosts)
            ctx["name_usual_paths"] = [
                {"path": usual, "nodes": n} for usual, n in summary.top_paths if usual != path
            ][:5]
        return ctx


@dataclass(frozen=True, slots=True)
class _NameSummary:
    hosts: set[str]
    top_paths: list[tuple[str, int]]


# Summaries of counts, keyed by (scope, before_ms): one per evaluation.
ContextMemo = dict[tuple[bytes, int], object]
