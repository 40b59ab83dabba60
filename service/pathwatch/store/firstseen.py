"""FirstSeenStore: per rule and key, first/last seen and the presence history, plus two indexes.

- the activity index (``A``) lists, per hour, the keys observed in that hour: evaluation reads only
  the hours its window touches, so its cost follows the active keys, not the stored ones;
- the onset index (``G``) lists, per minute, the keys whose presence starts a run there after a
  gap of at least the rule's baseline minus its window (or starts their history): only such a
  key can be new at a tick, so evaluation reads the window's onsets, not its active keys;
- the expiry index (``E``) lists, per day, the keys whose last observation fell on that day: the
  expiry sweep reads only days past the retention horizon.

All writes go through one thread (the IngestWriter), which is what makes the read-modify-write of
a record safe without locks; reads may come from any thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from bisect import bisect_right
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from pathwatch.clock import MINUTE_MS
from pathwatch.observations import Extension, KeyTuple, Mark, ObservationBatch, RuleKey, Sighting
from pathwatch.store import durable
from pathwatch.store import keyspace as ks
from pathwatch.store.codec import (
    KeyState,
    RecordFormatError,
    decode_key,
    decode_state,
    encode_key,
    encode_state,
    first_seen_of,
    plain_record_bounds,
    with_last_run_end,
)
from pathwatch.store.context import ContextIndex, LiveContext, checked_of, with_checked
from pathwatch.store.db import Batch, Database, StoreError
from pathwatch.store.extend import (
    LOG_PREFIX,
    Pending,
    PendingExtensions,
    encode_entry,
    item_of,
    log_key,
    rule_key_of,
    rule_of,
)
from pathwatch.store.guard import LimitHit, NewKeyGuard
from pathwatch.store.presence import PresenceHistory, new_onsets

log = structlog.get_logger(component="store")

_NO_HISTORY = PresenceHistory()
MAX_REFUSED_LISTED = 1000  # refused keys listed per rule and hour (the rest are counted)

MINUTES_PER_HOUR = 60
MINUTES_PER_DAY = 1440


@dataclass(frozen=True, slots=True)
class Retention:
    """How long a rule's data is kept: `horizon_minutes` of history, at most `max_runs` runs."""

    horizon_minutes: int
    max_runs: int = 256
    index_minutes: int = 3 * MINUTES_PER_DAY
    # Stream mode: report a key whose first new minute m has no observation in
    # [m - baseline, m + window) in its stored history.
    stream: bool = False
    window_minutes: int = 60
    baseline_minutes: int = 30 * MINUTES_PER_DAY
    # Onset index: runs starting at least this long after the previous run's end are listed
    # (baseline - window for a rule; 0: no onset index).
    onset_gap_minutes: int = 0
    # A minute whose end lies more than this before the write is untrusted: it can make the
    # key new but never counts as baseline (receiver.max_baseline_lateness; 0 trusts all).
    lateness_ms: int = 0


@dataclass(frozen=True, slots=True)
class OnsetCoverage:
    """The onset index of a rule lists every onset of at least `gap_minutes` at or after
    `from_minute` (written since the gap was configured)."""

    gap_minutes: int
    from_minute: int


def trusted_onsets(state: KeyState, min_gap: int, floor: int) -> set[int]:
    """Onsets of a key holding untrusted minutes: starts (at or after `floor`) of its runs and
    of its trusted runs that follow the previous *trusted* minute by at least `min_gap` (or
    have none before them). Untrusted minutes never shorten a gap, so a backdated point cannot
    keep a key out of the onset index."""
    trusted = state.history.without(state.untrusted)
    ends = [e for _, e in trusted.runs]
    out: set[int] = set()
    for start in {s for s, _ in state.history.runs} | {s for s, _ in trusted.runs}:
        if start < floor:
            continue
        i = bisect_right(ends, start) - 1
        if i < 0 or start - ends[i] >= min_gap:
            out.add(start)
    return out


def index_writes(
    wb: Batch,
    rule: str,
    encoded_key: bytes,
    old: KeyState | None,
    state: KeyState,
    retention: Retention,
    now_min: int,
) -> None:
    """The onset and expiry index entries for a record rewritten from `old` to `state`."""
    if retention.onset_gap_minutes > 0:
        floor = now_min - retention.index_minutes
        gap = retention.onset_gap_minutes
        old_hist = old.history if old is not None else PresenceHistory()
        if state.untrusted.runs or (old is not None and old.untrusted.runs):
            onsets = trusted_onsets(state, gap, floor)
            if old is not None:
                onsets -= trusted_onsets(old, gap, floor)
        else:
            onsets = set(new_onsets(old_hist, state.history, gap, floor))
        for minute in onsets:
            wb.put(ks.onset_key(rule, minute, encoded_key), b"")
    expiry_write(wb, rule, encoded_key, None if old is None else old.last_seen_ms,
                 state.last_seen_ms)  # fmt: skip


def expiry_write(
    wb: Batch, rule: str, encoded_key: bytes, old_last_ms: int | None, last_ms: int
) -> None:
    """The expiry index entry of a key whose last_seen moved from `old_last_ms` (None: a new
    key) to `last_ms`: one per day its last_seen reaches."""
    last_day = last_ms // (MINUTES_PER_DAY * MINUTE_MS)
    if old_last_ms is None or old_last_ms // (MINUTES_PER_DAY * MINUTE_MS) != last_day:
        wb.put(ks.expiry_key(rule, last_day, encoded_key), b"")


def activity_writes(
    wb: Batch,
    rule: str,
    encoded_key: bytes,
    hours: Iterable[int],
    stored: PresenceHistory,
    first_value: bytes,
    index_floor: int,
) -> None:
    """The activity index entries for a key newly observed in `hours`: one per hour from
    `index_floor` on that its stored history (`stored`) has no minute in. The value is
    first_seen at write time (empty while the key holds untrusted minutes): a real
    observation, so a key whose value lies in a baseline was observed there (see
    active_except_first_seen)."""
    for hour in hours:
        if hour >= index_floor and not stored.observed(
            hour * MINUTES_PER_HOUR, (hour + 1) * MINUTES_PER_HOUR
        ):
            wb.put(ks.activity_key(rule, hour, encoded_key), first_value)


def _extended(
    old: KeyState | None, found: list[Pending], horizon: int, max_runs: int
) -> KeyState | None:
    """`old` with the logged minutes `found` when they continue its last run as one run (the
    fold's common case, `FirstSeenStore._fold_extensions`), or None for anything else: no
    record, untrusted minutes, a gap or overlap, minutes out of order, a history to trim, or a
    first_seen the minutes would move."""
    if old is None or old.untrusted.runs or not found:
        return None
    runs = old.history.runs
    if not runs or runs[0][0] < horizon or len(runs) > max(1, max_runs):
        return None
    continued = _continued(runs[-1][1], old.first_seen_ms, old.last_seen_ms, found)
    if continued is None:
        return None
    end, last_ms = continued
    history = PresenceHistory((*runs[:-1], (runs[-1][0], end)))
    return KeyState(old.first_seen_ms, last_ms, history, old.untrusted)


def _continued(
    end: int, first_ms: int, last_ms: int, found: list[Pending]
) -> tuple[int, int] | None:
    """The last run's new end and last_seen when the logged minutes `found` continue a last
    run ending at `end` as one run and move no first_seen; None otherwise (`_extended`)."""
    for p in sorted(found, key=lambda p: p.a) if len(found) > 1 else found:
        if p.more or p.a != end or p.first_ms < first_ms:
            return None
        end = p.b + 1
        last_ms = max(last_ms, p.last_ms)
    return end, last_ms


@dataclass(frozen=True, slots=True)
class StreamHit:
    """A key that just started a new occurrence: its state after the write, first minute."""

    rule_id: str
    key: KeyTuple
    state: KeyState
    first_minute: int


@dataclass(frozen=True, slots=True)
class ApplyResult:
    keys_written: int
    keys_created: int
    keys_refused: int = 0
    limit_hits: tuple[LimitHit, ...] = ()
    stream_hits: tuple[StreamHit, ...] = ()
    # Every key of the batch that the store holds after the write (written, or already
    # holding the batch's minutes), with its state: what `durable_entries` checks marks
    # against. Not the key cache, which a batch larger than `cache_keys` overflows.
    states: Mapping[tuple[str, KeyTuple], KeyState] = field(default_factory=dict)
    # New minutes of keys that arrived late: beyond the trusted lateness, and inside windows
    # of ticks that had already run (written to the late keyspace for the next tick).
    late_untrusted: int = 0
    late_after_tick: int = 0
    # Minutes logged instead of written (store/extend.py), and the DurableResources entries
    # of their resources (per extension: the value and the fingerprints that take it, their
    # kept keys unchanged: `DurableResources.refresh`); extension resources that took the
    # full path, as marks.
    keys_extended: int = 0
    extended: tuple[tuple[int, tuple[int, ...]], ...] = ()
    extension_marks: tuple[Mark, ...] = ()


class FirstSeenStore:
    """First-seen state over a Database. See the module docstring for the write discipline."""

    def __init__(
        self,
        db: Database,
        cache_keys: int = 100_000,
        guard: NewKeyGuard | None = None,
        host_field: Mapping[str, int] | None = None,
        cluster_field: Mapping[str, int] | None = None,
    ) -> None:
        self._db = db
        self._guard = guard or NewKeyGuard()
        # Per rule, the position of the host / cluster in its key tuple, where it has one.
        self._host_field = dict(host_field or {})
        self._cluster_field = dict(cluster_field or {})
        self._entities: dict[bytes, int] = {}
        self._counts: dict[str, int] = {}
        self.context = ContextIndex(db)
        # Per rule, positions of (cluster, host, path, name) for the context index, where the
        # key has at least the cluster, the host and the path.
        self._context_fields: dict[str, tuple[int, int, int, int | None]] = {}
        # (rule, key) -> (RocksDB key, state): the processes seen lately, which recur every
        # scrape. Bounded by cache_keys; a miss costs one RocksDB read.
        self._cache: dict[tuple[str, KeyTuple], tuple[bytes, KeyState]] = {}
        self._cache_keys = max(0, cache_keys)
        self._late_seq = 0
        # Bumped after every commit that listed late minutes (writer thread, under the tick
        # watermarks' lock): a tick that read the late keyspace and finds it unchanged under
        # that lock knows every entry it read is still as it read it (`late_unchanged`).
        self.late_generation = 0
        self._refused_listed: dict[tuple[str, int], int] = {}
        # Minutes logged and not folded into their records yet (store/extend.py).
        self.pending = PendingExtensions()
        self.keys_folded_short = 0  # keys `fold` wrote through `_fold_extensions`
        self._pending_loaded = False

    # -- writes (IngestWriter thread only) -------------------------------------------------

    def apply(
        self,
        batch: ObservationBatch,
        retention: Mapping[str, Retention],
        now_ms: int,
        sender_of: Callable[[RuleKey], str] | None = None,
        watermarks: Mapping[str, int] | None = None,
        extensions: Sequence[Extension] = (),
        folding: bool = False,
    ) -> ApplyResult:
        """Merge `batch` into the stored records in one atomic, durable write.

        `extensions` bring minutes that directly follow a stored minute of their keys: those
        arriving on time are logged, not written into records (store/extend.py); the others
        join the batch. A key of the batch with logged minutes is judged against its record
        plus those minutes (what a record rewritten for each would hold), and if it is written,
        they are written with it. With `folding`, the batch names keys whose logged minutes
        are to be written now, as the writes they stand for.

        Minutes already recorded cost a cache or RocksDB read and no write. `sender_of` names
        who sent a key (new-key budgets are charged to it). `watermarks` holds, per rule, the
        latest tick whose evaluation may already have read the store: a new minute before it
        is late for its tick and is listed for the next one (the late keyspace). Raises
        StoreError (retryable) when RocksDB refuses the write; then nothing of the batch was
        applied and the cache is left as it was before the call.
        """
        wb = Batch()
        written = created = refused = 0
        late_untrusted = late_after_tick = 0
        listed_late = False
        # Per key, minutes known to have arrived on time (logged ones): never late.
        exempt: dict[RuleKey, set[int]] = {}
        logged: dict[int, list[bytes]] = {}
        extended: list[tuple[int, tuple[int, ...]]] = []
        extension_marks: list[Mark] = []
        if extensions:
            batch = self._split(batch, extensions, retention, now_ms, watermarks or {},
                                logged, extended, extension_marks, exempt)  # fmt: skip
        refused_hour = now_ms // 3_600_000
        hits: list[LimitHit] = []
        streamed: list[StreamHit] = []
        new_per_rule: dict[str, int] = {}
        notes: list[tuple[str, str, str, str | None, int]] = []
        new_entities: dict[bytes, int] = {}
        staged: list[tuple[tuple[str, KeyTuple], bytes, KeyState]] = []
        held: dict[tuple[str, KeyTuple], KeyState] = {}
        items = [(rk, s) for rk, s in batch.items() if rk[0] in retention]
        absorbed: list[bytes] = []
        lookup = self.pending.lookup if len(self.pending) else None
        # Snapshot the cache first: remembering one key below may evict another key of this
        # same batch, which must then still be found (not taken for a new key).
        entries = [self._cache.get(rk) for rk, _ in items]
        rkeys = [
            e[0] if e is not None else ks.record_key(rk[0], encode_key(rk[1]))
            for e, (rk, _) in zip(entries, items, strict=True)
        ]
        missing = [k for e, k in zip(entries, rkeys, strict=True) if e is None]
        loaded = dict(zip(missing, self._db.get_many(missing), strict=True))
        now_min = now_ms // MINUTE_MS
        for (rule_key, given), rkey, entry in zip(items, rkeys, entries, strict=True):
            rule, key = rule_key
            sighting = given
            ret = retention[rule]
            old = entry[1] if entry is not None else None
            replaced = False
            if old is None and (raw := loaded.get(rkey)) is not None:
                try:
                    old = decode_state(raw)
                except RecordFormatError as exc:
                    self._quarantine(wb, rule, rkey, raw, str(exc), now_ms)
                    replaced = True
            # Logged minutes (store/extend.py): indexes are written against the record
            # (`stored`), every decision is taken against the record plus the logged minutes.
            stored = old
            item = item_of(rule_key) if lookup is not None else b""
            found = lookup(item) if lookup is not None else None
            logged_minutes: list[int] = []
            if found:
                logged_minutes = [m for p in found for m in p.minutes()]
                if folding:
                    sighting = Sighting(set(logged_minutes), min(p.first_ms for p in found),
                                        max(p.last_ms for p in found))  # fmt: skip
                    exempt.setdefault(rule_key, set()).update(logged_minutes)
                    logged_minutes = []
                else:
                    old = self._overlaid(stored, found)
            # Points inside minutes already recorded change nothing that evaluation reads; not
            # rewriting for them is what keeps writes at one per key per minute, not per scrape.
            # (So last_seen trails the latest point by less than a minute; first_seen is exact.)
            # Minutes whose end lies more than the trusted lateness before now: untrusted.
            late_before = (now_ms - ret.lateness_ms) // MINUTE_MS if ret.lateness_ms else -1
            on_time_known = exempt.get(rule_key, ())
            has_late = sighting.first_ms < late_before * MINUTE_MS
            if (
                old is not None
                and old.first_seen_ms <= sighting.first_ms
                and old.history.contains_all(sighting.minutes)
                and not (
                    old.untrusted.runs
                    and any(
                        (m >= late_before or m in on_time_known)
                        and old.untrusted.observed(m, m + 1)
                        for m in sighting.minutes
                    )
                )
            ):
                if stored is not None:
                    self._remember(rule_key, rkey, stored)
                held[rule_key] = old
                if found and folding:
                    absorbed.append(item)  # the record holds them already
                continue
            horizon = now_min - ret.horizon_minutes
            minutes = [m for m in sighting.minutes if m >= horizon]
            if not minutes:
                continue
            if old is None and not replaced:
                pos = self._host_field.get(rule)
                host = key[pos] if pos is not None else ""
                sender = sender_of(rule_key) if sender_of is not None else ""
                verdict = self._guard.admit(rule, host, now_ms, sender)
                if verdict is not True:
                    refused += 1
                    if isinstance(verdict, LimitHit):
                        hits.append(verdict)
                    self._list_refused(wb, rule, refused_hour, rkey, sender, sighting.first_ms)
                    continue
            old_hist = old.history if old else _NO_HISTORY
            grown = old_hist.with_minutes(minutes)
            hist = grown.trimmed(horizon, ret.max_runs)
            untrusted = old.untrusted if old else _NO_HISTORY
            if has_late or untrusted.runs:
                fresh_late = [
                    m
                    for m in minutes
                    if m < late_before
                    and m not in on_time_known
                    and not old_hist.observed(m, m + 1)
                ]
                late_untrusted += len(fresh_late)
                on_time = PresenceHistory.of_minutes(
                    m for m in minutes if m >= late_before or m in on_time_known
                )
                untrusted = untrusted.with_minutes(fresh_late).without(on_time)
                if untrusted.runs:
                    # Gaps that trimming joined were never observed: never trusted either.
                    untrusted = untrusted.union(hist.without(grown)).trimmed(horizon, ret.max_runs)
            after: list[int] = []
            mark_before = 0
            if watermarks and sighting.first_ms < watermarks.get(rule, 0):
                mark_before = watermarks[rule] // MINUTE_MS
                after = [
                    m
                    for m in minutes
                    if m < mark_before
                    and m not in on_time_known
                    and not old_hist.observed(m, m + 1)
                ]
                late_after_tick += len(after)
            if old is None:
                self._note_entities(rule, key, sighting.first_ms, new_entities, wb)
                fields = self._context_fields.get(rule)
                if fields is not None:
                    c, h, p, n = fields
                    name = key[n] if n is not None else None
                    notes.append((key[c], key[h], key[p], name, sighting.first_ms))
            first_ms = min(old.first_seen_ms, sighting.first_ms) if old else sighting.first_ms
            last_ms = max(old.last_seen_ms, sighting.last_ms) if old else sighting.last_ms
            state = KeyState(first_ms, last_ms, hist, untrusted)
            if after:
                onset = self._late_onset(state, after, mark_before - ret.index_minutes)
                if onset is not None:
                    self._list_late(wb, rule, rkey, onset, now_ms)
                    listed_late = True
            encoded_key = rkey[len(ks.record_prefix(rule)) :]
            wb.put(rkey, encode_state(state))
            # The activity index skips a key by its first_seen only while it is trusted.
            first_value = ks.u64(first_ms) if not untrusted.runs else b""
            activity_writes(
                wb, rule, encoded_key, {m // MINUTES_PER_HOUR for m in [*minutes, *logged_minutes]},
                stored.history if stored is not None else _NO_HISTORY, first_value,
                (now_min - ret.index_minutes) // MINUTES_PER_HOUR,
            )  # fmt: skip
            index_writes(wb, rule, encoded_key, stored, state, ret, now_min)
            staged.append((rule_key, rkey, state))
            if found:
                absorbed.append(item)
            if ret.stream:
                fresh = [m for m in minutes if not old_hist.observed(m, m + 1)]
                m0 = min(fresh, default=None)
                if (
                    m0 is not None
                    and not old_hist.observed(m0, m0 + ret.window_minutes)
                    and not (
                        old is not None and old.trusted_observed(m0 - ret.baseline_minutes, m0)
                    )
                ):
                    streamed.append(StreamHit(rule, key, state, m0))
            written += 1
            if old is None and not replaced:
                created += 1
                new_per_rule[rule] = new_per_rule.get(rule, 0) + 1
        if notes:
            self.context.note_many(notes, wb)
        counts = {r: self.key_count(r) + n for r, n in new_per_rule.items()}
        for r, n in counts.items():
            wb.put(ks.meta_key(f"keys:{r}"), str(n).encode())
        seq = self.pending.seq
        for time_ms, logged_items in logged.items():
            seq += 1
            wb.put(log_key(seq), encode_entry(time_ms, logged_items))
        try:
            self._db.commit(wb)
        except StoreError:
            # A commit that failed in its WAL sync may still have applied: read the key
            # counts again from the store rather than trust the ones kept here; and what the
            # context index noted for it may not be there.
            self._counts.clear()
            self.context.forget()
            raise
        finally:
            if listed_late:  # also when the commit failed: it may have applied all the same
                self.late_generation += 1
        self._counts.update(counts)
        if absorbed:
            self.pending.discard(absorbed)
        if logged:
            for time_ms, logged_items in logged.items():
                self.pending.add_many(logged_items, time_ms // MINUTE_MS, time_ms)
            self.pending.seq = seq
        for rule_key, rkey, state in staged:
            self._remember(rule_key, rkey, state)
            held[rule_key] = state
        if len(self._entities) + len(new_entities) > 200_000:
            self._entities.clear()  # bounded; a miss costs one RocksDB read
        self._entities.update(new_entities)
        return ApplyResult(
            written,
            created,
            refused,
            tuple(hits),
            tuple(streamed),
            held,
            late_untrusted,
            late_after_tick,
            sum(len(v) for v in logged.values()),
            tuple(extended),
            tuple(extension_marks),
        )

    def _split(
        self,
        batch: ObservationBatch,
        extensions: Sequence[Extension],
        retention: Mapping[str, Retention],
        now_ms: int,
        watermarks: Mapping[str, int],
        logged: dict[int, list[bytes]],
        extended: list[tuple[int, tuple[int, ...]]],
        marks: list[Mark],
        exempt: dict[RuleKey, set[int]],
    ) -> ObservationBatch:
        """Sort `extensions` into minutes to log (`logged`, by timestamp) and observations
        for the full write (returned with `batch`). A minute is logged when, for every rule of
        its resource, it arrived on time and after the rule's latest evaluated tick; the
        receiver vouched that the minute before is stored and trusted (DurableResources).
        A key that is also written in full by this batch takes its minute in that write."""
        out: ObservationBatch | None = None
        rules = {r.encode() for r in retention}
        for ext in extensions:
            time_ms = ext.time_ms
            minute = time_ms // MINUTE_MS
            # Every point of an extension carries its one timestamp: per rule, it is on time
            # and after the latest tick for all of its resources or for none.
            late = {
                rule.encode()
                for rule, ret in retention.items()
                if (ret.lateness_ms and minute < (now_ms - ret.lateness_ms) // MINUTE_MS)
                or time_ms < watermarks.get(rule, 0)
            }
            value = durable.encode(minute * MINUTE_MS, True)
            if not late:
                resources = ext.resources
                extended.append((value, tuple([fp for fp, _ in resources])))
                # rule_of inlined: this runs for every key of every scrape at 60 s
                logged.setdefault(time_ms, []).extend(
                    [
                        k
                        for _, keys in resources
                        for k in keys
                        if k[1 : k.index(b"\x00", 1)] in rules
                    ]
                )
                continue
            on_time: list[int] = []
            for fingerprint, keys in ext.resources:
                if not any(rule_of(k) in late for k in keys):
                    on_time.append(fingerprint)
                    logged.setdefault(time_ms, []).extend(k for k in keys if rule_of(k) in rules)
                    continue
                if out is None:
                    out = dict(batch)
                rule_keys = tuple(map(rule_key_of, keys))
                for rk in rule_keys:
                    had = out.get(rk)
                    s = Sighting(set(had.minutes), had.first_ms, had.last_ms) if had else Sighting()
                    out[rk] = s
                    s.add(time_ms)
                marks.append(Mark(fingerprint, minute, time_ms, rule_keys))
            if on_time:
                extended.append((value, tuple(on_time)))
        if out is None:
            out = batch
        if logged and out:
            written = {item_of(rk): rk for rk in out}
            for time_ms, logged_items in list(logged.items()):
                kept: list[bytes] = []
                for item in logged_items:
                    both_rk = written.get(item)
                    if both_rk is None:
                        kept.append(item)
                        continue
                    full = out[both_rk]
                    both = out[both_rk] = Sighting(set(full.minutes), full.first_ms, full.last_ms)
                    both.add(time_ms)
                    exempt.setdefault(both_rk, set()).add(time_ms // MINUTE_MS)
                if kept:
                    logged[time_ms] = kept
                else:
                    del logged[time_ms]
        return out

    # -- minute extensions: recovery, fold, overlay ------------------------------------------

    def load_pending(self) -> int:
        """Read the extension log back into memory (once per process); returns the minutes it
        held. The writer calls it before its first write; offline readers before reading."""
        if self._pending_loaded:
            return 0
        self._pending_loaded = True
        return self.pending.load(self._db.scan_prefix(LOG_PREFIX))

    def fold(
        self,
        limit: int,
        retention: Mapping[str, Retention],
        now_ms: int,
        watermarks: Mapping[str, int] | None = None,
    ) -> ApplyResult | None:
        """Write up to `limit` keys' logged minutes into their records (starting a fold cycle
        when none runs); once a cycle is done, delete the log entries it covered. None when
        nothing was pending. Writer thread only; StoreError leaves everything pending."""
        pending = self.pending
        if not pending.folding:
            if not pending.fresh:
                if not len(pending) and pending.seq > pending.cleared:
                    # Every logged minute went into records with a full write of its key.
                    self._db.delete_range(log_key(0), log_key(pending.seq + 1))
                    pending.cleared = pending.seq
                return None
            pending.start_cycle()
        chunk = pending.take(limit)
        result = None
        if chunk:
            try:
                simple, rest = self._fold_extensions(chunk, retention, now_ms)
                if rest:
                    batch: ObservationBatch = {rule_key: Sighting() for rule_key in rest}
                    result = self.apply(
                        batch, retention, now_ms, watermarks=watermarks, folding=True
                    )
            except StoreError:
                pending.settle(False)
                raise
            pending.settle(True)
            if simple:
                written = simple + (result.keys_written if result is not None else 0)
                result = (
                    ApplyResult(written, 0)
                    if result is None
                    else dataclasses.replace(result, keys_written=written)
                )
        done = pending.cycle_done()
        if done is not None:
            self._db.delete_range(log_key(0), log_key(done + 1))
        return result

    def _fold_extensions(
        self, chunk: Mapping[bytes, Pending], retention: Mapping[str, Retention], now_ms: int
    ) -> tuple[int, list[RuleKey]]:
        """Fold the keys of `chunk` whose logged minutes simply extend their record's last run
        (what logging them promised: the common case) in one commit of their own; returns how
        many, and the others' rule keys, for `apply`.

        Such a fold is the write `apply(folding=True)` makes, without its general machinery:
        the record's last run ends where the logged minutes start, they form one run, the key
        has no untrusted minute and nothing to trim. Then the write starts no run (no onset,
        no late listing, no stream hit: the minute before is observed and trusted), creates
        no key and moves neither first_seen nor anything but the last run's end, last_seen,
        the activity hours it reaches and the expiry day (`index_writes`)."""
        lookup = self.pending.lookup
        cache = self._cache
        prefixes = {rule: ks.record_prefix(rule) for rule in retention}
        rest: list[RuleKey] = []
        candidates: list[tuple[bytes, RuleKey, bytes, KeyState | None, Retention]] = []
        missing: list[bytes] = []
        for item in chunk:
            rule_key = rule_key_of(item)
            ret = retention.get(rule_key[0])
            if ret is None:
                rest.append(rule_key)
                continue
            entry = cache.get(rule_key)
            if entry is not None:
                candidates.append((item, rule_key, entry[0], entry[1], ret))
                continue
            rkey = prefixes[rule_key[0]] + encode_key(rule_key[1])
            missing.append(rkey)
            candidates.append((item, rule_key, rkey, None, ret))
        loaded = dict(zip(missing, self._db.get_many(missing), strict=True)) if missing else {}
        wb = Batch()
        now_min = now_ms // MINUTE_MS
        staged: list[tuple[RuleKey, bytes, KeyState]] = []
        folded: list[bytes] = []
        for item, rule_key, rkey, cached, ret in candidates:
            old = cached
            raw = loaded.get(rkey) if old is None else None
            if raw is not None:
                # A record that is not cached: extended in its bytes when it is a plain one
                # (what the fold meets at 60 s: running processes, read from RocksDB).
                bounds = plain_record_bounds(raw)
                if bounds is not None:
                    rule = rule_key[0]
                    encoded_key = rkey[len(prefixes[rule]) :]
                    if self._fold_plain(wb, rule, rkey, encoded_key, raw, bounds, lookup(item),
                                        ret, now_min):  # fmt: skip
                        folded.append(item)
                    else:
                        rest.append(rule_key)
                    continue
                with contextlib.suppress(RecordFormatError):  # else apply quarantines it
                    old = decode_state(raw)
            state = _extended(old, lookup(item), now_min - ret.horizon_minutes, ret.max_runs)
            if old is None or state is None:
                rest.append(rule_key)
                continue
            rule = rule_key[0]
            encoded_key = rkey[len(prefixes[rule]) :]
            wb.put(rkey, encode_state(state))
            folded_hours = range(
                old.history.runs[-1][1] // MINUTES_PER_HOUR,
                (state.history.runs[-1][1] - 1) // MINUTES_PER_HOUR + 1,
            )
            activity_writes(
                wb, rule, encoded_key, folded_hours, old.history, ks.u64(state.first_seen_ms),
                (now_min - ret.index_minutes) // MINUTES_PER_HOUR,
            )  # fmt: skip
            index_writes(wb, rule, encoded_key, old, state, ret, now_min)
            staged.append((rule_key, rkey, state))
            folded.append(item)
        if folded:
            self._db.commit(wb)
            # Only keys already cached are refreshed: a folded key's next minutes are logged,
            # not written, so caching the others would only evict keys that `apply` reads.
            for rule_key, rkey, state in staged:
                if rule_key in cache:
                    cache[rule_key] = (rkey, state)
            self.pending.discard(folded)
            self.keys_folded_short += len(folded)
        return len(folded), rest

    @staticmethod
    def _fold_plain(
        wb: Batch,
        rule: str,
        rkey: bytes,
        encoded_key: bytes,
        raw: bytes,
        bounds: tuple[int, int, int, int, int],
        found: list[Pending],
        ret: Retention,
        now_min: int,
    ) -> bool:
        """`_extended` and the writes `_fold_extensions` makes for it, on a plain record's
        bytes (`plain_record_bounds`) without decoding it; False when the short path does not
        cover the key. The same bytes: the test compares the two databases."""
        n, first_ms, last_ms, start, end = bounds
        if not found or start < now_min - ret.horizon_minutes or n > max(1, ret.max_runs):
            return False
        continued = _continued(end, first_ms, last_ms, found)
        if continued is None:
            return False
        new_end, new_last = continued
        wb.put(rkey, with_last_run_end(raw, new_end, new_last))
        # The stored history's last minute is end - 1 and every other run ends before it: an
        # hour from end's on holds a stored minute only if it holds that one.
        hours = range(end // MINUTES_PER_HOUR, (new_end - 1) // MINUTES_PER_HOUR + 1)
        activity_writes(
            wb, rule, encoded_key, hours, PresenceHistory(((end - 1, end),)), ks.u64(first_ms),
            (now_min - ret.index_minutes) // MINUTES_PER_HOUR,
        )  # fmt: skip
        # index_writes: no run starts, so no onset; the expiry day when last_seen's moves.
        expiry_write(wb, rule, encoded_key, last_ms, new_last)
        return True

    def fold_all(self, retention: Mapping[str, Retention], now_ms: int) -> None:
        """Fold everything logged so far (before reading records behind the store's back)."""
        while self.pending.unfolded:
            self.fold(10_000, retention, now_ms)

    @staticmethod
    def _overlaid(state: KeyState | None, found: list[Pending]) -> KeyState:
        """`state` with the key's logged minutes (`found`, looked up before it was read)."""
        minutes = [m for p in found for m in p.minutes()]
        first = min(p.first_ms for p in found)
        last = max(p.last_ms for p in found)
        added = PresenceHistory.of_minutes(minutes)
        if state is None:
            return KeyState(first, last, added)
        return KeyState(
            min(state.first_seen_ms, first),
            max(state.last_seen_ms, last),
            state.history.union(added),
            state.untrusted.without(added) if state.untrusted.runs else state.untrusted,
        )

    def _quarantine(
        self, wb: Batch, rule: str, rkey: bytes, raw: bytes, reason: str, now_ms: int
    ) -> None:
        """Set an unreadable record aside (``Q``) in the same write that starts the key anew:
        ingest goes on, the key can alert again, and an operator can inspect the bytes."""
        encoded = rkey[len(ks.record_prefix(rule)) :]
        value = {"reason": reason, "at_ms": now_ms, "record": raw.hex()}
        wb.put(ks.quarantine_key(rule, encoded), json.dumps(value).encode())
        log.error(
            "unreadable key record quarantined; the key starts a new history",
            rule=rule,
            key=list(decode_key(encoded)),
            reason=reason,
        )

    def quarantined(self, limit: int = 1000) -> list[dict[str, object]]:
        """Quarantined records, for the API (any thread)."""
        out: list[dict[str, object]] = []
        for raw, value in self._db.scan_prefix(ks.QUARANTINE_PREFIX):
            rule, _, encoded = raw[1:].partition(b"\x00")
            info = json.loads(value)
            out.append({"rule": rule.decode(), "key": list(decode_key(encoded)), **info})
            if len(out) >= limit:
                break
        return out

    @staticmethod
    def _late_onset(state: KeyState, late: list[int], floor: int) -> int | None:
        """The minute to list for the next tick's late check, or None: the earliest of `late`
        (new minutes inside windows of ticks that already ran) at or after `floor` (the
        activity index's reach before the latest tick: no tick older than that can be
        evaluated), when one of them starts a run. A late minute that only extends a run can
        start no occurrence: listing it would only make the next tick re-read the key."""
        reachable = [m for m in late if m >= floor]
        if not any(not state.history.observed(m - 1, m) for m in reachable):
            return None
        return min(reachable)

    def _list_late(self, wb: Batch, rule: str, rkey: bytes, minute: int, now_ms: int) -> None:
        """List the key for the next tick's late check, keeping the earliest late minute. The
        value changes with every write (a sequence number), so a tick deletes only entries it
        saw unchanged (see `consume_late`)."""
        zkey = ks.late_key(rule, rkey[len(ks.record_prefix(rule)) :])
        existing = self._db.get(zkey)
        if existing:
            minute = min(minute, ks.late_minute(existing))
        self._late_seq += 1
        wb.put(zkey, ks.late_value(minute, (now_ms << 16) + (self._late_seq & 0xFFFF)))

    def _list_refused(
        self, wb: Batch, rule: str, hour: int, rkey: bytes, sender: str, first_ms: int
    ) -> None:
        """List a key a new-key cap refused (at most MAX_REFUSED_LISTED per rule and hour)."""
        slot = (rule, hour)
        listed = self._refused_listed.get(slot, 0)
        if listed >= MAX_REFUSED_LISTED:
            return
        if len(self._refused_listed) > 1024:
            self._refused_listed = {k: v for k, v in self._refused_listed.items() if k[1] == hour}
        self._refused_listed[slot] = listed + 1
        encoded = rkey[len(ks.record_prefix(rule)) :]
        value = json.dumps({"sender": sender, "first_ms": first_ms}).encode()
        wb.put(ks.refused_key(rule, hour, encoded), value)

    # -- late and refused keys (read by the tick runner) -----------------------------------

    def late_entries(self, rule: str) -> list[tuple[bytes, bytes]]:
        """The late keyspace of `rule`: (RocksDB key, value) pairs, oldest write order aside."""
        return list(self._db.scan_prefix(ks.late_prefix(rule)))

    def late_unchanged(
        self, entries: Iterable[tuple[bytes, bytes]], generation: int | None = None
    ) -> list[bytes]:
        """Of `entries` read before, the RocksDB keys whose value is still the same (no write
        since): those a tick may delete. Call under the watermark fence.

        `generation`: `late_generation` as read before the entries were: when no commit has
        listed late minutes since, every entry is unchanged and none is read again."""
        pairs = list(entries)
        if generation is not None and generation == self.late_generation:
            return [k for k, _ in pairs]
        now = self._db.get_many([k for k, _ in pairs])
        return [k for (k, v), cur in zip(pairs, now, strict=True) if cur == v]

    def decode_late(self, rule: str, raw_key: bytes, value: bytes) -> tuple[KeyTuple, int]:
        return self.late_key(rule, raw_key), ks.late_minute(value)

    @staticmethod
    def late_key(rule: str, raw_key: bytes) -> KeyTuple:
        """The key of a late entry (its RocksDB key)."""
        return decode_key(raw_key[len(ks.late_prefix(rule)) :])

    @staticmethod
    def late_since(value: bytes) -> int:
        """The earliest late minute of a late entry (its value)."""
        return ks.late_minute(value)

    def late_states(
        self, rule: str, entries: Iterable[tuple[bytes, int]]
    ) -> Iterator[tuple[bytes, int, KeyState]]:
        """For (late entry's RocksDB key, minute) pairs: (that key, the minute, the key's state
        as `get` reads it) for each key still stored, in the order given. Records are read in
        batches and the key is not decoded unless it has logged minutes to overlay (callers
        that need it use `late_key`). Raises RecordFormatError on an unreadable record, as
        `get` does."""
        late_len = len(ks.late_prefix(rule))
        prefix = ks.record_prefix(rule)
        chunk: list[tuple[bytes, int]] = []
        for entry in entries:
            chunk.append(entry)
            if len(chunk) >= 1024:
                yield from self._late_chunk(rule, chunk, late_len, prefix)
                chunk = []
        yield from self._late_chunk(rule, chunk, late_len, prefix)

    def _late_chunk(
        self, rule: str, chunk: list[tuple[bytes, int]], late_len: int, prefix: bytes
    ) -> Iterator[tuple[bytes, int, KeyState]]:
        # Logged minutes are looked up before the records are read (as in `get`): a fold in
        # between then finds them in the record instead, never in neither.
        found: dict[bytes, list[Pending]] = {}
        if len(self.pending):
            for raw_key, _ in chunk:
                hits = self.pending.lookup(item_of((rule, decode_key(raw_key[late_len:]))))
                if hits:
                    found[raw_key] = hits
        raws = self._db.get_many([prefix + raw_key[late_len:] for raw_key, _ in chunk])
        for (raw_key, minute), raw in zip(chunk, raws, strict=True):
            logged = found.get(raw_key)
            state = None if raw is None else decode_state(raw)
            if logged:
                yield raw_key, minute, self._overlaid(state, logged)
            elif state is not None:
                yield raw_key, minute, state

    def refused_entries(self, rule: str) -> list[tuple[bytes, KeyTuple, dict[str, object]]]:
        """Keys the new-key caps refused and no tick has listed yet: (RocksDB key, key, info)."""
        prefix = ks.refused_prefix(rule)
        out = []
        for raw, value in self._db.scan_prefix(prefix):
            try:
                info = json.loads(value)
            except ValueError:
                info = {}
            out.append((raw, decode_key(raw[len(prefix) + 4 :]), info))
        return out

    def _note_entities(
        self, rule: str, key: KeyTuple, first_ms: int, pending: dict[bytes, int], wb: Batch
    ) -> None:
        """Record the first observation of the key's host and cluster, once each."""
        for kind, positions in (("h", self._host_field), ("c", self._cluster_field)):
            pos = positions.get(rule)
            if pos is None:
                continue
            ekey = ks.entity_key(kind, key[pos])
            known = pending.get(ekey) or self._entities.get(ekey)
            if known is None:
                raw = self._db.get(ekey)
                known = ks.from_u64(raw) if raw else None
                if known is not None:
                    self._entities[ekey] = known
            if known is None or first_ms < known:
                pending[ekey] = first_ms
                wb.put(ekey, ks.u64(first_ms))

    @staticmethod
    def durable_entries(
        marks: Iterable[Mark], states: Mapping[tuple[str, KeyTuple], KeyState]
    ) -> list[durable.Entry]:
        """DurableResources entries for `marks` whose keys the store holds at the mark's
        minute, judged by `states` (ApplyResult.states of the commit that made them durable):
        a mark whose key is not there or not stored for that minute (refused, beyond the
        horizon) gives no entry. Writer thread only, right after that commit.

        The entry keeps the resource's keys (for the next minute's extension, store/extend.py)
        only when every key was also observed the minute before: a running process. One-off
        resources (a backfill, a short job) cost no memory for keys."""
        out: list[durable.Entry] = []
        for mark in marks:
            floor = mark.minute * MINUTE_MS
            running = True
            for rule_key in mark.keys:
                state = states.get(rule_key)
                if state is None or not state.history.observed(mark.minute, mark.minute + 1):
                    break
                if state.untrusted.observed(mark.minute, mark.minute + 1):
                    break  # an on-time point of that minute must still reach the store
                floor = max(floor, state.first_seen_ms)
                running = running and state.history.observed(mark.minute - 1, mark.minute)
            else:
                if floor <= mark.earliest_ms:
                    value = durable.encode(floor, bool(mark.keys))
                    kept = tuple(map(item_of, mark.keys)) if running else ()
                    out.append((mark.fingerprint, value, kept))
        return out

    def set_context_fields(self, rule: str, key_fields: tuple[str, ...]) -> None:
        """Feed the context index from `rule`'s keys (they must hold cluster, host, path)."""
        want = ("k8s.cluster.name", "host.name", "process.executable.path")
        if all(f in key_fields for f in want):
            c, h, p = (key_fields.index(f) for f in want)
            n = (
                key_fields.index("process.executable.name")
                if "process.executable.name" in key_fields
                else None
            )
            self._context_fields[rule] = (c, h, p, n)

    def forget_cached(self) -> None:
        """Drop every in-memory copy of stored state (key records, key counts, host and
        cluster first-seen, context entries): after records were rewritten behind this
        store's back (a baseline import, on the writer thread)."""
        self._cache.clear()
        self._counts.clear()
        self._entities.clear()
        self.context.forget()

    @property
    def cached_keys(self) -> int:
        return len(self._cache)

    def key_count(self, rule: str) -> int:
        """Keys stored for `rule`, kept exact in the same write batches that add and remove."""
        count = self._counts.get(rule)
        if count is None:
            raw = self._db.get(ks.meta_key(f"keys:{rule}"))
            count = self._counts[rule] = int(raw) if raw else 0
        return count

    def entity_first_seen(self, kind: str, name: str) -> int | None:
        """Unix ms of the first observation of host (kind "h") or cluster ("c") `name`."""
        raw = self._db.get(ks.entity_key(kind, name))
        return ks.from_u64(raw) if raw else None

    def _remember(self, rule_key: tuple[str, KeyTuple], rkey: bytes, state: KeyState) -> None:
        if self._cache_keys == 0:
            return
        cache = self._cache
        cache.pop(rule_key, None)
        cache[rule_key] = (rkey, state)
        if len(cache) > self._cache_keys:
            # Evict the oldest tenth at once: dicts keep insertion order, so this is LRU-ish
            # and amortises eviction cost over many inserts.
            for stale in list(cache.keys())[: max(1, self._cache_keys // 10)]:
                del cache[stale]

    def expire(self, rule: str, retention: Retention, now_ms: int) -> int:
        """Delete keys of `rule` unseen for longer than the horizon; trim old index hours.

        Returns the number of keys deleted. Writer thread only. (The keyspace sweep calls
        `expire_rule`, which also counts the expiry-index entries.)
        """
        return self.expire_rule(rule, retention, now_ms)[0]

    # -- the onset index's coverage ----------------------------------------------------------

    def onset_coverage(self, rule: str) -> OnsetCoverage | None:
        raw = self._db.get(ks.meta_key(f"onsets:{rule}"))
        if raw is None:
            return None
        gap, start = raw.decode().split()
        return OnsetCoverage(int(gap), int(start))

    def prepare_onsets(self, rule: str, gap_minutes: int, from_minute: int) -> OnsetCoverage:
        """Record that the onset index of `rule` is kept with `gap_minutes` from now on.

        When it already was (same gap), nothing changes. Otherwise onsets are complete only for
        minutes that no earlier write can have covered: `from_minute` (the caller passes now plus
        the accepted clock skew), or every minute when the rule has no stored key yet (a new
        data dir). Until a window starts at `from_minute`, evaluation uses the activity index.
        """
        known = self.onset_coverage(rule)
        if known is not None and known.gap_minutes == gap_minutes:
            return known
        start = 0 if self.count_keys_bounded(rule, 1) == 0 else from_minute
        coverage = OnsetCoverage(gap_minutes, start)
        wb = Batch()
        wb.put(ks.meta_key(f"onsets:{rule}"), f"{gap_minutes} {start}".encode())
        self._db.commit(wb)
        return coverage

    # -- reads (any thread) ----------------------------------------------------------------

    def get(self, rule: str, key: KeyTuple) -> KeyState | None:
        found = self.pending.lookup(item_of((rule, key))) if len(self.pending) else []
        raw = self._db.get(ks.record_key(rule, encode_key(key)))
        state = None if raw is None else decode_state(raw)
        return self._overlaid(state, found) if found else state

    def active(
        self, rule: str, start_min: int, end_min: int
    ) -> Iterator[tuple[KeyTuple, KeyState]]:
        """Keys with an activity-index entry in the hours that ``[start_min, end_min)`` touches.

        A superset of the keys observed in that range: callers check the history.
        """
        return self.active_except_first_seen(rule, start_min, end_min, 0, 0)

    def active_except_first_seen(
        self, rule: str, start_min: int, end_min: int, skip_from_min: int, skip_to_min: int
    ) -> Iterator[tuple[KeyTuple, KeyState]]:
        """`active`, leaving out keys first seen in ``[skip_from_min, skip_to_min)``.

        Evaluation passes the baseline, whose keys cannot be new. The activity index stores
        each key's first_seen as of the entry's write, which was a real observation: when it
        falls in the range the key is skipped without reading its record (exact, because
        observations are never removed inside the retention horizon). Otherwise the record's
        header decides, before the key or history is decoded.
        """
        skip = (skip_from_min * MINUTE_MS, skip_to_min * MINUTE_MS)
        first_hour = start_min // MINUTES_PER_HOUR
        last_hour = (end_min - 1) // MINUTES_PER_HOUR
        prefix_len = len(ks.activity_bound(rule, 0)) - 4
        seen: set[bytes] = set()
        chunk: list[bytes] = []
        lo, hi = skip
        for raw, value in self._db.scan(
            ks.activity_bound(rule, first_hour), ks.activity_bound(rule, last_hour + 1)
        ):
            _, encoded = ks.split_indexed(prefix_len, raw)
            if encoded in seen:
                continue
            seen.add(encoded)
            if lo < hi and len(value) == 8 and lo <= ks.from_u64(value) < hi:
                continue
            chunk.append(encoded)
            if len(chunk) >= 1024:
                yield from self._load(rule, chunk, skip)
                chunk = []
        yield from self._load(rule, chunk, skip)

    def _load(
        self, rule: str, encoded: list[bytes], skip: tuple[int, int]
    ) -> Iterator[tuple[KeyTuple, KeyState]]:
        prefix = ks.record_prefix(rule)
        lo, hi = skip
        # Logged minutes are looked up before the records are read (store/extend.py).
        found: dict[bytes, tuple[KeyTuple, list[Pending]]] = {}
        if len(self.pending):
            for enc in encoded:
                key = decode_key(enc)
                hits = self.pending.lookup(item_of((rule, key)))
                if hits:
                    found[enc] = (key, hits)
        for enc, raw in zip(encoded, self._db.get_many([prefix + e for e in encoded]), strict=True):
            if raw is None:
                continue
            try:
                if lo < hi and lo <= first_seen_of(raw) < hi:
                    continue
                state = decode_state(raw)
            except RecordFormatError as exc:
                # Quarantined by the writer at the key's next observation; until then it is
                # left out of evaluation rather than failing the whole rule.
                log.error("unreadable key record skipped", rule=rule, reason=str(exc))
                continue
            hit = found.get(enc)
            if hit is not None:
                key, hits = hit
                yield key, self._overlaid(state, hits)
            else:
                yield decode_key(enc), state

    def new_candidates(
        self, rule: str, start_min: int, end_min: int, gap_minutes: int
    ) -> Iterator[tuple[KeyTuple, KeyState]] | None:
        """Keys with an onset in ``[start_min, end_min)`` of at least `gap_minutes`: every key
        whose earliest observation in ``[start_min - gap_minutes, end_min)`` lies in
        ``[start_min, end_min)`` is among them (callers check the history). None when the onset
        index cannot answer (kept with a longer gap, or not yet complete for that range)."""
        coverage = self.onset_coverage(rule)
        if (
            coverage is None
            or gap_minutes <= 0
            or coverage.gap_minutes > gap_minutes
            or start_min < coverage.from_minute
        ):
            return None
        return self._onsets(rule, start_min, end_min)

    def _onsets(
        self, rule: str, start_min: int, end_min: int
    ) -> Iterator[tuple[KeyTuple, KeyState]]:
        prefix_len = len(ks.onset_bound(rule, 0)) - 4
        seen: set[bytes] = set()
        chunk: list[bytes] = []
        for raw, _ in self._db.scan(
            ks.onset_bound(rule, start_min), ks.onset_bound(rule, end_min), values=False
        ):
            _, encoded = ks.split_indexed(prefix_len, raw)
            if encoded not in seen:
                seen.add(encoded)
                chunk.append(encoded)
            if len(chunk) >= 1024:
                yield from self._load(rule, chunk, (0, 0))
                chunk = []
        yield from self._load(rule, chunk, (0, 0))

    def scan(self, rule: str) -> Iterator[tuple[KeyTuple, KeyState]]:
        """Every stored key of `rule` (a full scan: for `inspect`, never for evaluation)."""
        prefix = ks.record_prefix(rule)
        for raw, value in self._db.scan_prefix(prefix):
            key = decode_key(raw[len(prefix) :])
            state = decode_state(value)
            found = self.pending.lookup(item_of((rule, key))) if len(self.pending) else []
            yield key, self._overlaid(state, found) if found else state

    def count_keys(self, rule: str) -> int:
        return sum(1 for _ in self._db.scan_prefix(ks.record_prefix(rule), values=False))

    def count_keys_bounded(self, rule: str, limit: int) -> int:
        """Stored keys of `rule`, counting no further than `limit`."""
        n = 0
        for _ in self._db.scan_prefix(ks.record_prefix(rule), values=False):
            n += 1
            if n >= limit:
                break
        return n

    # -- the keyspace sweep (writer thread only) --------------------------------------------

    def expire_rule(self, rule: str, retention: Retention, now_ms: int) -> tuple[int, int]:
        """`expire`: returns (keys deleted, expiry-index entries deleted). Batches of 10,000.

        A record that cannot be read keeps its expiry-index entry (and so is looked at again
        by the next sweep): the writer quarantines it at its next observation.
        """
        now_min = now_ms // MINUTE_MS
        cutoff_day = (now_min - retention.horizon_minutes) // MINUTES_PER_DAY
        lower = ks.expiry_bound(rule, 0)
        upper = ks.expiry_bound(rule, cutoff_day)
        prefix_len = len(ks.expiry_bound(rule, 0)) - 4
        wb = Batch()
        deleted = index_deleted = 0
        count_key = ks.meta_key(f"keys:{rule}")
        remaining = self.key_count(rule)
        for raw, _ in self._db.scan(lower, upper, values=False):
            day, encoded = ks.split_indexed(prefix_len, raw)
            rkey = ks.record_prefix(rule) + encoded
            value = self._db.get(rkey)
            if value is not None:
                try:
                    state = decode_state(value)
                except RecordFormatError as exc:
                    log.error("unreadable key record not expired", rule=rule, reason=str(exc))
                    continue
                if state.last_seen_ms // (
                    MINUTES_PER_DAY * MINUTE_MS
                ) <= day and not self.pending.lookup(item_of((rule, decode_key(encoded)))):
                    # (A key with logged minutes was seen lately: its fold writes a new entry.)
                    wb.delete(rkey)
                    self._cache.pop((rule, decode_key(encoded)), None)
                    deleted += 1
                    remaining = max(0, remaining - 1)
            wb.delete(raw)
            index_deleted += 1
            if wb.count >= 10_000:
                wb.put(count_key, str(remaining).encode())
                self._db.commit(wb)
                self._counts[rule] = remaining
                wb = Batch()
        wb.put(count_key, str(remaining).encode())
        self._db.commit(wb)
        self._counts[rule] = remaining
        index_floor = (now_min - retention.index_minutes) // MINUTES_PER_HOUR
        self._db.delete_range(ks.activity_bound(rule, 0), ks.activity_bound(rule, index_floor))
        self._db.delete_range(
            ks.onset_bound(rule, 0), ks.onset_bound(rule, index_floor * MINUTES_PER_HOUR)
        )
        return deleted, index_deleted

    def context_liveness(
        self, groups: set[tuple[str, str]]
    ) -> dict[tuple[str, str], LiveContext | None]:
        """For (cluster, host) pairs: the paths and (name, path) pairs that stored keys of the
        context rules hold (one prefix scan per pair and rule). None for every pair when a
        context rule's key does not start with the host or the cluster, so that its keys
        cannot be found by prefix: then the caller keeps the entries."""
        plans: list[tuple[str, tuple[int, int, int, int | None], tuple[int, ...]]] = []
        for rule, fields in self._context_fields.items():
            c, h, _, _ = fields
            lead: list[int] = []
            for pos in range(2):
                if pos not in (c, h):
                    break
                lead.append(pos)
            if not lead:
                return dict.fromkeys(groups)
            plans.append((rule, fields, tuple(lead)))
        out: dict[tuple[str, str], LiveContext | None] = {}
        for cluster, host in groups:
            paths: set[str] = set()
            names: set[tuple[str, str]] = set()
            for rule, (c, h, p, n), positions in plans:
                values = tuple(host if pos == h else cluster for pos in positions)
                plen = len(ks.record_prefix(rule))
                prefix = ks.record_prefix(rule) + encode_key(values)
                for raw, _ in self._db.scan_prefix(prefix, values=False):
                    key = decode_key(raw[plen:])
                    if key[c] == cluster and key[h] == host:
                        paths.add(key[p])
                        if n is not None:
                            names.add((key[n], key[p]))
            out[(cluster, host)] = LiveContext(frozenset(paths), frozenset(names))
        return out

    def _entity_alive(self, kind: str, name: str) -> bool:
        """Whether a host ("h") or cluster ("c") may still have stored keys: true when one is
        found, or when some rule keeps the field where no prefix finds it (then it is kept)."""
        positions = self._host_field if kind == "h" else self._cluster_field
        unsure = False
        for rule, pos in positions.items():
            if pos == 0:
                prefix = ks.record_prefix(rule) + encode_key((name,))
                for _ in self._db.scan_prefix(prefix, values=False):
                    return True
            elif kind == "c" and rule in self._context_fields:
                # The context index holds the cluster while a context rule's key does.
                prefix = b"P" + name.encode("utf-8", "surrogatepass") + b"\x00"
                for _ in self._db.scan_prefix(prefix, values=False):
                    return True
            else:
                unsure = True
        return unsure

    def sweep_entities(
        self, now_ms: int, stale_before_ms: int, start: bytes, in_time: Callable[[], bool]
    ) -> tuple[int, bytes | None]:
        """Check host and cluster first-seen entries (``H``) from `start` whose last check is
        older than `stale_before_ms`: delete those with no stored key left, confirm the others
        at `now_ms`. Returns (deleted, where to resume or None when the keyspace is done)."""
        wb = Batch()
        deleted = 0
        resume: bytes | None = None
        for read, (ekey, value) in enumerate(self._db.scan(start, b"I"), 1):
            if checked_of(value) < stale_before_ms:
                kind, _, name = ekey[1:].partition(b"\x00")
                if self._entity_alive(kind.decode(), name.decode("utf-8", "surrogatepass")):
                    wb.put(ekey, with_checked(value, now_ms))
                else:
                    wb.delete(ekey)
                    self._entities.pop(ekey, None)
                    deleted += 1
            if read % 10_000 == 0:
                self._db.commit(wb)
                wb = Batch()
                if not in_time():
                    resume = ekey + b"\x00"
                    break
        self._db.commit(wb)
        return deleted, resume

    def forget_rule(self, rule: str) -> None:
        """Drop what memory holds of `rule` after the sweep removed its keyspaces."""
        self._counts.pop(rule, None)
        self._cache = {k: v for k, v in self._cache.items() if k[0] != rule}
        self._context_fields.pop(rule, None)
