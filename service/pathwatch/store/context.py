"""ContextIndex: where executables have run, so an alert can say what is usual.

Two small indexes, written once per new (cluster, path, host) and (cluster, name, path, host)
combination when the first-seen store creates a key:

- ``P cluster 0x00 path 0x00 host`` -> u64be ms first seen
- ``N cluster 0x00 name 0x00 path 0x00 host`` -> u64be ms first seen

`explain` reads them with prefix scans bounded by `scan_limit` entries, so an alert about a
ubiquitous name (python3 on every node) stays cheap. They grow with distinct combinations,
not with observations.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from pathwatch.store import keyspace as ks
from pathwatch.store.db import Batch, Database

_SEP = "\x00"


def _path_key(cluster: str, path: str, host: str) -> bytes:
    return b"P" + _SEP.join((cluster, path, host)).encode("utf-8", "surrogatepass")


def _name_key(cluster: str, name: str, path: str, host: str) -> bytes:
    return b"N" + _SEP.join((cluster, name, path, host)).encode("utf-8", "surrogatepass")


class ContextIndex:
    """Writes happen on the writer thread (`note`); reads from any thread (`explain`)."""

    def __init__(self, db: Database, cache_entries: int = 100_000, scan_limit: int = 5_000) -> None:
        self._db = db
        self._known: set[bytes] = set()
        self._cache_entries = cache_entries
        self._scan_limit = scan_limit

    def note_many(self, entries: list[tuple[str, str, str, str | None, int]], wb: Batch) -> None:
        """Record (once each) that path / name ran on host in cluster, for (cluster, host,
        path, name, first_ms) entries: one batched RocksDB multi-get for what memory does not
        already know, then puts for what is missing."""
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
        for key, raw in zip(candidates, self._db.get_many(candidates), strict=True):
            if raw is None:
                wb.put(key, ks.u64(wanted[key]))
        if len(self._known) + len(candidates) > self._cache_entries:
            self._known.clear()
        self._known.update(candidates)

    def _scan(self, prefix: bytes) -> list[tuple[list[str], int]]:
        out = []
        for raw, value in self._db.scan_prefix(prefix):
            out.append((raw[1:].decode("utf-8", "surrogatepass").split(_SEP), ks.from_u64(value)))
            if len(out) >= self._scan_limit:
                break
        return out

    def _path_hosts(self, prefix: bytes, before_ms: int, memo: ContextMemo | None) -> set[str]:
        """Hosts the (cluster, path) of `prefix` ran on before `before_ms`."""
        cached = memo.get((prefix, before_ms)) if memo is not None else None
        if cached is None:
            cached = {p[2] for p, first in self._scan(prefix) if first < before_ms}
            if memo is not None:
                memo[(prefix, before_ms)] = cached
        assert isinstance(cached, set)
        return cached

    def _name_paths(self, prefix: bytes, before_ms: int, memo: ContextMemo | None) -> _NameSummary:
        """For the (cluster, name) of `prefix`, before `before_ms`: the hosts it ran on, and
        paths it ran from with their host counts, most hosts first (ties by path)."""
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

        `memo` shares the prefix scans, summarised, between the alerts of one evaluation, which
        often name the same executable (a rollout, a worm): each (cluster, path) and (cluster,
        name) is read and counted once per evaluation, and each alert costs a lookup.
        """
        ctx: dict[str, Any] = {}
        if path is not None:
            prefix = b"P" + f"{cluster}{_SEP}{path}{_SEP}".encode("utf-8", "surrogatepass")
            hosts = self._path_hosts(prefix, before_ms, memo)
            ctx["path_seen_on_other_nodes"] = len(hosts) - (host in hosts)
        if name is not None:
            prefix = b"N" + f"{cluster}{_SEP}{name}{_SEP}".encode("utf-8", "surrogatepass")
            summary = self._name_paths(prefix, before_ms, memo)
            ctx["name_seen_on_other_nodes"] = len(summary.hosts) - (host in summary.hosts)
            ctx["name_usual_paths"] = [
                {"path": usual, "nodes": n} for usual, n in summary.top_paths if usual != path
            ][:5]
        return ctx


@dataclass(frozen=True, slots=True)
class _NameSummary:
    hosts: set[str]
    top_paths: list[tuple[str, int]]


# Summaries of prefix scans, keyed by (prefix, before_ms): one per evaluation.
ContextMemo = dict[tuple[bytes, int], object]
