"""The exact model: every acknowledged (key, minute), and what pathwatch must answer for it.

Only what an Export acknowledged enters the model (a request that was never acknowledged is
retried until it is, or its keys are set aside as uncertain). From that, by brute force over
every key, the model says what a tick records, following the documented semantics of the
parity rule with every timestamp trusted (`receiver.max_baseline_lateness: 0s`):

- on time: a key is new at tick T when it has a minute in [T-1h, T) and none in
  [T-30d, T-1h); its alert id is derived from (rule, key, first minute in the window);
- late: a minute written after a tick at or after it had run, within the activity index's
  reach before that tick (window + 3 days) and in a write that starts a run, is listed for the
  next tick,
  which alerts each onset (a run of minutes starting after a gap) that is new at its own
  hourly tick and that tick's record did not already name, marked late, with the on-time id;
- an id already recorded is never recorded again (stream and schedule deduplication), nor
  twice by one tick (its on-time alert wins over a late one with the same id).

Call `expect` and `apply` only while no export is in flight (the harness quiesces its
senders around every tick), so the model knows exactly what the tick saw.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pathwatch.alerts.event import alert_id
from soak.otlp import Key

RULE = "kubernetes_process_running_from_new_path"
WINDOW = 60  # minutes
BASELINE = 30 * 24 * 60
HOUR = 60
REACH = WINDOW + 3 * 24 * 60  # the activity index's reach (app.service.INDEX_EXTRA_MINUTES)
_FIELDS = (
    "host",
    "k8s.cluster.name",
    "k8s.node.name",
    "process.pid",
    "process.executable.path",
    "process.executable.name",
)


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    key: Key | None  # None: an event that names no key (a summary)
    tick: int  # minute of the tick whose window holds the onset
    late: bool

    def describe(self) -> str:
        key = "/".join(self.key) if self.key else "(no key)"
        return f"{self.id} tick {iso_minute(self.tick)}{' late' if self.late else ''} {key}"


def iso_minute(minute: int) -> str:
    return datetime.fromtimestamp(minute * 60, tz=UTC).strftime("%Y-%m-%dT%H:%M:00Z")


def parse_minute(text: str) -> int:
    return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()) // 60


def alert_of(body: dict[str, Any]) -> Alert:
    """An alert as the API returns it, reduced to what the model predicts."""
    fields = body.get("fields") or {}
    key = tuple(str(fields[f]) for f in _FIELDS) if all(f in fields for f in _FIELDS) else None
    late = bool(body.get("late"))
    tick = parse_minute(body["tick"] if late else body["time"])
    return Alert(str(body.get("id")), key, tick, late)  # type: ignore[arg-type]


@dataclass
class Comparison:
    missing: list[Alert]  # expected, not recorded
    unexpected: list[Alert]  # recorded, not expected
    skipped: int  # alerts of keys with uncertain observations, not compared


@dataclass
class PresenceCheck:
    keys: int
    lost: list[tuple[Key, int]]  # acknowledged (key, minute) not stored
    phantom: list[tuple[Key, int]]  # stored, never acknowledged
    first_seen_wrong: list[tuple[Key, int, int]]  # key, acknowledged, stored (ms)


class Model:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.minutes: dict[Key, set[int]] = {}
        self.first_ms: dict[Key, int] = {}
        self.uncertain: set[Key] = set()
        self.observations = 0  # acknowledged (key, minute) pairs
        self.watermark = -1  # minute of the latest tick run: earlier minutes written are late
        self.late_since: dict[Key, int] = {}  # listed for the next tick: earliest late minute
        self.recorded: dict[int, set[Key]] = {}  # tick -> keys its record names
        self.alert_ids: set[str] = set()
        self.alerts: dict[str, Alert] = {}  # every alert recorded, by id: what must be delivered

    # -- ingest (sender threads) ------------------------------------------------------------

    def acknowledge(self, observations: dict[Key, tuple[int, set[int]]]) -> None:
        """An Export answered OK: its observations are durable."""
        with self.lock:
            for key, (first, minutes) in observations.items():
                history = self.minutes.setdefault(key, set())
                new = minutes - history
                if new:
                    history |= new
                    # Listed for the next tick: minutes before the latest tick, within the
                    # activity index's reach before it, when one of them starts a run.
                    late = [m for m in new if self.watermark - REACH <= m < self.watermark]
                    if any(m - 1 not in history for m in late):
                        self.late_since[key] = min([*late, self.late_since.get(key, late[0])])
                    self.observations += len(new)
                if first < self.first_ms.get(key, first + 1):
                    self.first_ms[key] = first

    def set_aside(self, observations: Iterable[Key]) -> None:
        """An Export never answered: it may or may not be stored; its keys are not compared."""
        with self.lock:
            self.uncertain.update(observations)

    # -- ticks (harness main thread, senders quiesced) ---------------------------------------

    def expect(self, tick: int) -> list[Alert]:
        """What the tick at minute `tick` records when it runs now."""
        ws, bs = tick - WINDOW, tick - BASELINE
        on_time: list[Alert] = []
        for key, minutes in self.minutes.items():
            first = min((m for m in minutes if ws <= m < tick), default=None)
            if first is not None and not any(bs <= m < ws for m in minutes):
                on_time.append(Alert(alert_id(RULE, key, first), key, tick, False))
        on_keys = {a.key for a in on_time}
        late: list[Alert] = []
        for key, since in self.late_since.items():
            minutes = self.minutes[key]
            for start in sorted(m for m in minutes if m >= since and m - 1 not in minutes):
                own = (start // HOUR + 1) * HOUR  # the first hourly tick after the minute
                if own > tick:
                    break
                own_ws = own - WINDOW
                if any(own_ws <= m < start for m in minutes):
                    continue  # the occurrence started earlier in the same window
                if any(own - BASELINE <= m < own_ws for m in minutes):
                    continue
                named = on_keys if own == tick else self.recorded.get(own, set())
                if key not in named:
                    late.append(Alert(alert_id(RULE, key, start), key, own, True))
        # One alert per id: a tick at any minute and a late onset of an hourly tick can name
        # the same occurrence; the on-time one is recorded.
        named = {a.id for a in on_time}
        late = [a for a in late if a.id not in named]
        return [a for a in on_time + late if a.id not in self.alert_ids]

    def apply(self, tick: int, recorded: list[Alert]) -> None:
        """The tick ran and recorded `recorded` (what the service answered, right or wrong)."""
        self.recorded[tick] = {a.key for a in recorded if a.key is not None}
        self.alert_ids.update(a.id for a in recorded)
        for a in recorded:
            self.alerts.setdefault(a.id, a)
        self.watermark = max(self.watermark, tick)
        self.late_since.clear()

    def compare(self, expected: list[Alert], actual: list[Alert]) -> Comparison:
        def comparable(alerts: list[Alert]) -> Counter[Alert]:
            return Counter(a for a in alerts if a.key not in self.uncertain)

        want, have = comparable(expected), comparable(actual)
        skipped = sum(1 for a in actual if a.key in self.uncertain)
        return Comparison(
            sorted((want - have).elements(), key=lambda a: a.id),
            sorted((have - want).elements(), key=lambda a: a.id),
            skipped,
        )

    # -- the final state ---------------------------------------------------------------------

    def check_presence(self, stored: dict[Key, tuple[int, set[int]]]) -> PresenceCheck:
        """Compare stored presence (after a clean stop) with every acknowledged minute."""
        lost: list[tuple[Key, int]] = []
        phantom: list[tuple[Key, int]] = []
        wrong_first: list[tuple[Key, int, int]] = []
        for key, minutes in self.minutes.items():
            if key in self.uncertain:
                continue
            first, have = stored.get(key, (None, set()))
            lost += [(key, m) for m in sorted(minutes - have)]
            phantom += [(key, m) for m in sorted(have - minutes)]
            if first is not None and first != self.first_ms[key]:
                wrong_first.append((key, self.first_ms[key], first))
        for key, (_, have) in stored.items():
            if key not in self.minutes and key not in self.uncertain:
                phantom += [(key, m) for m in sorted(have)]
        return PresenceCheck(len(stored), lost, phantom, wrong_first)
