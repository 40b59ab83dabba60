"""The benchmark's workload: where requests come from, deterministically.

- `Fleet`: a steady-state fleet. Nodes keep their processes (same pids and paths, so the same
  keys recur every scrape) with a small churn of new pids; every node scrapes every
  `interval_s` of simulated time; requests come in time order, round after round.
- `HistoryPlan`: `keys` distinct keys spread over `days` of history, `active` of them observed
  in the last hour (a fraction with no earlier observation: the keys the rule must report).
  It is arithmetic on a key index, so the DuckDB reference loads exactly the observations that
  were sent.

Everything here is pure: the load generator, the parse-only baseline and the DuckDB loader
rebuild the same requests from the same spec. The request shape is in bench.otlp.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

from bench.otlp import (
    DAY_MS,
    EXECUTABLES,
    HOUR_MS,
    MINUTE_MS,
    POINTS_PER_RESOURCE,
    Export,
    Process,
    ScrapeBlocks,
    node_cluster,
    node_host,
    resource_metrics_head,
)

# -- the steady-state fleet -------------------------------------------------------------------


@dataclass(frozen=True)
class FleetSpec:
    nodes: int = 1000
    processes: int = 200  # per node, so per request
    interval_s: float = 10.0
    churn: float = 0.005  # share of a node's processes replaced by a new pid at each scrape
    start_ms: int = 0  # simulated time of the first scrape
    variants: int = 16

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Fleet:
    """Scrapes of `nodes` nodes, round after round, in simulated-time order (endless)."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self._blocks = ScrapeBlocks(spec.variants)
        self._tail_len = len(self._blocks.at(0)[0])
        self._next_pid = [1000] * spec.nodes
        self._slots: list[list[tuple[bytes, int]]] = [
            [self._spawn(n, j) for j in range(spec.processes)] for n in range(spec.nodes)
        ]
        self._churn_debt = [0.0] * spec.nodes

    def _spawn(self, node: int, slot: int) -> tuple[bytes, int]:
        """A new process in `slot` of `node`: (its ResourceMetrics head, its value variant)."""
        pid = self._next_pid[node]
        self._next_pid[node] += 3
        exe = (slot * 31 + node) % len(EXECUTABLES)
        proc = Process(node_host(node), node_cluster(node), pid, max(1, pid - 1 - slot % 5), exe)
        return resource_metrics_head(proc.resource(), self._tail_len), pid % self.spec.variants

    def requests(self) -> Iterator[Export]:
        spec = self.spec
        step_ms = int(spec.interval_s * 1000)
        stagger_ms = step_ms / spec.nodes
        scrape = 0
        while True:
            for node in range(spec.nodes):
                time_ms = spec.start_ms + scrape * step_ms + int(node * stagger_ms)
                slots = self._slots[node]
                if scrape:
                    self._churn_debt[node] += spec.churn * spec.processes
                    while self._churn_debt[node] >= 1.0:
                        self._churn_debt[node] -= 1.0
                        slot = (scrape * 7 + node) % spec.processes
                        slots[slot] = self._spawn(node, slot)
                tails = self._blocks.at(time_ms * 1_000_000)
                payload = b"".join([part for head, v in slots for part in (head, tails[v])])
                yield Export(
                    payload, len(slots), len(slots) * POINTS_PER_RESOURCE, 0, time_ms, node
                )
            scrape += 1


# -- the stored history -----------------------------------------------------------------------


@dataclass(frozen=True)
class HistorySpec:
    keys: int = 10_000_000
    active: int = 200_000
    new_fraction: float = 0.01  # of the active keys: observed in the window only
    nodes: int = 1000
    processes: int = 200
    days: int = 30
    short_days: int = 7  # the first stage's history length
    now_ms: int = 0  # anchor: evaluation ticks are at and just before this minute
    variants: int = 16

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Scrape(NamedTuple):
    """One request of the plan: keys `first + s` for each slot s, all observed at `time_ms`."""

    time_ms: int
    first: int
    slots: range
    new_keys: int


class HistoryPlan:
    """`keys` keys in requests of `processes`, stored in two stages that add up to the history.

    Key i belongs to request r = i // processes, on node r % nodes, with pid
    1000 + (r // nodes) * processes + i % processes (unique per node). The first R_A requests
    hold the active keys; in each, the first `new_per_request` slots are new keys (no earlier
    observation), the others are known: seen 2-2.5 h before `now_ms` (baseline) and again in the
    window. The other requests are history only, one scrape each, spread over `days` before the
    window, newest first.

    - Stage 0: the active keys' baseline scrapes; their window scrapes 30-50 min before `now_ms`,
      where only the first half of the active requests include their new slots; the history of
      the newest `short_days`.
    - Stage 1: the second half of the active requests again, 10-25 min before `now_ms`, now with
      their new slots; the rest of the history (a backfill: pathwatch keys observations by event
      time, so arrival order does not matter).

    So an evaluation after either stage sees (almost) the same 200 k active keys, and each
    stage's first evaluation reports a fresh set of new keys: the costs at the two history
    lengths compare like for like.
    """

    def __init__(self, spec: HistorySpec) -> None:
        if spec.active > spec.keys:
            raise ValueError("active keys cannot exceed keys")
        self.spec = spec
        p = spec.processes
        self.active_requests = max(1, spec.active // p)
        self.requests_total = max(self.active_requests + 1, spec.keys // p)
        self.new_per_request = round(p * spec.new_fraction)
        self._half = self.active_requests // 2
        self._span_ms = spec.days * DAY_MS - 6 * HOUR_MS
        history_requests = self.requests_total - self.active_requests
        short = (spec.short_days * DAY_MS - 3 * HOUR_MS) * history_requests // self._span_ms
        self._stage_split = self.active_requests + min(history_requests, short + 1)
        self._blocks = ScrapeBlocks(spec.variants)
        self._tail_len = len(self._blocks.at(0)[0])

    @property
    def keys(self) -> int:
        return self.requests_total * self.spec.processes

    @property
    def active_keys(self) -> int:
        return self.active_requests * self.spec.processes

    def expected_new(self, stage: int) -> int:
        """Keys the rule reports after `stage`: active, with no baseline observation."""
        return (self._half if stage == 0 else self.active_requests) * self.new_per_request

    @property
    def tick_ms(self) -> int:
        """The latest evaluation tick; ticks up to 8 minutes earlier see the same window."""
        return self.spec.now_ms - self.spec.now_ms % MINUTE_MS

    def stage_keys(self, stage: int) -> int:
        """Distinct keys first stored by `stage` (0 or 1)."""
        p, ra = self.spec.processes, self.active_requests
        late_new = (ra - self._half) * self.new_per_request
        if stage == 0:
            return ra * p - late_new + (self._stage_split - ra) * p
        return late_new + (self.requests_total - self._stage_split) * p

    def stage_days(self, stage: int) -> int:
        return self.spec.short_days if stage == 0 else self.spec.days

    def process(self, index: int) -> Process:
        spec = self.spec
        request, slot = divmod(index, spec.processes)
        node = request % spec.nodes
        pid = 1000 + (request // spec.nodes) * spec.processes + slot
        exe = (slot * 31 + node + request // spec.nodes) % len(EXECUTABLES)
        return Process(node_host(node), node_cluster(node), pid, max(1, pid - 1 - slot % 5), exe)

    def scrapes(self, stage: int) -> Iterator[Scrape]:
        spec = self.spec
        p, now, ra, half = spec.processes, spec.now_ms, self.active_requests, self._half
        new, every, known = self.new_per_request, range(p), range(self.new_per_request, p)
        if stage == 0:
            for r in range(ra):
                t = now - 150 * MINUTE_MS + r * 30 * MINUTE_MS // ra
                yield Scrape(t, r * p, known, len(known))
            for r in range(ra):
                t = now - 50 * MINUTE_MS + r * 20 * MINUTE_MS // ra
                yield Scrape(t, r * p, every, new) if r < half else Scrape(t, r * p, known, 0)
            requests = range(ra, self._stage_split)
        else:
            for r in range(half, ra):
                t = now - 25 * MINUTE_MS + (r - half) * 15 * MINUTE_MS // (ra - half)
                yield Scrape(t, r * p, every, new)
            requests = range(self._stage_split, self.requests_total)
        history_requests = self.requests_total - ra
        for r in requests:
            t = now - 3 * HOUR_MS - (r - ra) * self._span_ms // history_requests
            yield Scrape(t, r * p, every, p)

    def export(self, scrape: Scrape) -> Export:
        tails = self._blocks.at(scrape.time_ms * 1_000_000)
        parts = []
        for slot in scrape.slots:
            proc = self.process(scrape.first + slot)
            parts.append(resource_metrics_head(proc.resource(), self._tail_len))
            parts.append(tails[proc.pid % self.spec.variants])
        n = len(scrape.slots)
        return Export(b"".join(parts), n, n * POINTS_PER_RESOURCE, scrape.new_keys, scrape.time_ms)

    def observations(self, stage: int) -> Iterator[tuple[tuple[str, ...], int]]:
        """(key, minute) of every resource the stage sends: the reference's input rows."""
        for scrape in self.scrapes(stage):
            minute = scrape.time_ms // MINUTE_MS
            for slot in scrape.slots:
                yield self.process(scrape.first + slot).key(), minute
