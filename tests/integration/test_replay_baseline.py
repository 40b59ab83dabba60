"""Replay of recorded OTLP files and baseline export/import, on real RocksDB data dirs.

The reference for replay is the store fed directly with the decoded requests (what the
receivers do); the reference for import is the data dir the baseline was exported from, or one
fed with both data sets through FirstSeenStore.apply.
"""

from __future__ import annotations

import gzip
import io
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from pathwatch.app import baseline as bl
from pathwatch.app import replay as rp
from pathwatch.app.service import Service, retention_of
from pathwatch.clock import DAY_MS, MINUTE_MS, FakeClock
from pathwatch.config.model import Config
from pathwatch.observations import ObservationBatch, merge_into
from pathwatch.receiver import Decoder
from pathwatch.store import KeyState, PresenceHistory, Retention
from pathwatch.store import keyspace as ks
from tests.support import RULE, Proc, process_request

NOW = 1_790_000_000_000 + 17_000  # fixed: a FakeClock keeps every run identical


class Dir:
    """A data dir opened the way the CLI opens a stopped one (Service.open_store)."""

    def __init__(self, path: Path, now: int = NOW) -> None:
        self.clock = FakeClock(now)
        self.service = Service(Config(data_dir=str(path)), self.clock)
        self.service.open_store()
        assert self.service.db is not None and self.service.firstseen is not None
        self.db = self.service.db
        self.store = self.service.firstseen
        self.retention = {r.id: retention_of(r, 256) for r in self.service.enabled_rules}
        self.decoder = Decoder(self.service.rules)

    def apply(self, requests: list[ms.ExportMetricsServiceRequest]) -> None:
        """Feed the store as the receiver and writer would: decode, merge, apply."""
        batch: ObservationBatch = {}
        for request in requests:
            result = self.decoder.decode(request.SerializeToString(), self.service.time_bounds())
            merge_into(batch, result.batch)
        self.store.apply(batch, self.retention, self.clock.now_ms())

    def replay(self, paths: list[Path], out: io.StringIO | None = None) -> rp.ReplayStats:
        return rp.replay(
            [str(p) for p in paths],
            self.decoder,
            self.store,
            self.retention,
            self.clock,
            self.service.time_bounds(),
            out,
        )

    def snapshot(self) -> dict[bytes, bytes | None]:
        """Every first-seen entry: records, both indexes, entity and context rows, the count."""
        out: dict[bytes, bytes | None] = {}
        for tag in (b"R", b"A", b"E", b"H", b"P", b"N"):
            out.update(self.db.scan_prefix(tag))
        count = ks.meta_key(f"keys:{RULE}")
        out[count] = self.db.get(count)
        return out

    def close(self) -> None:
        self.db.close()


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[list[Dir]]:
    opened: list[Dir] = []
    yield opened
    for d in opened:
        d.close()


def open_dir(dirs: list[Dir], tmp_path: Path, name: str) -> Dir:
    d = Dir(tmp_path / name)
    dirs.append(d)
    return d


def recording(
    offset_min: int = 0, pids: range = range(1, 5)
) -> list[ms.ExportMetricsServiceRequest]:
    """Twelve scrapes ten minutes apart on two nodes, plus one scrape 40 days old."""
    requests = []
    for i in range(12):
        at = NOW - (i * 10 + offset_min) * MINUTE_MS - 3_000
        procs = [Proc(p, f"/usr/bin/p{p}", host=f"node-{p % 2}") for p in pids if (i + p) % 3]
        requests.append(process_request(procs, at))
    requests.append(process_request([Proc(99, "/opt/ancient")], NOW - 40 * DAY_MS))
    return requests


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


GARBAGE = b"\xff\xff\xff not a request"


def write_recording(path: Path, fmt: str, requests: list[ms.ExportMetricsServiceRequest]) -> Path:
    """The requests in `fmt`, with one unusable request fourth."""
    if fmt.startswith("jsonl"):
        lines = [json_format.MessageToJson(r, indent=None).encode() for r in requests]
        lines.insert(3, b"this line is not JSON")
        data = b"\n".join(lines) + b"\n"
    else:
        frames = [r.SerializeToString() for r in requests]
        frames.insert(3, GARBAGE)
        prefix = (lambda n: struct.pack(">I", n)) if fmt.startswith("u32") else varint
        data = b"".join(prefix(len(f)) + f for f in frames)
    if fmt.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


# -- replay -----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "jsonl.gz", "varint", "varint.gz", "u32"])
def test_replay_equals_receiving_the_same_requests(
    tmp_path: Path, dirs: list[Dir], fmt: str
) -> None:
    """Replaying a recording (JSON lines, length-delimited protobuf, the file exporter's
    4-byte framing; plain or gzip) leaves exactly the store that receiving its requests
    would; the unusable request is counted and reported, and the replay goes on."""
    requests = recording()
    path = write_recording(tmp_path / f"rec.{fmt}", fmt, requests)
    replayed, direct = open_dir(dirs, tmp_path, "replayed"), open_dir(dirs, tmp_path, "direct")
    out = io.StringIO()
    stats = replayed.replay([path], out)
    direct.apply(requests)
    assert replayed.snapshot() == direct.snapshot()
    assert replayed.store.count_keys(RULE) == 4
    assert (stats.files, stats.requests, stats.bad_requests) == (1, 13, 1)
    assert stats.points_rejected == 4  # the 40-day-old scrape: past baseline + window + 1 day
    assert stats.keys_written == 4
    text = out.getvalue()
    assert ("line 4" if fmt.startswith("jsonl") else "message 4") in text
    assert "replayed 1 file(s): 13 requests (1 unusable)" in text.splitlines()[-1]


def test_replay_in_batches_across_files_with_a_progress_bar(
    tmp_path: Path, dirs: list[Dir], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several files and many small store writes give the same state as one write; on a
    terminal the progress bar is redrawn in place and ends with the summary line."""
    monkeypatch.setattr(rp, "FLUSH_KEYS", 2)
    early, late = recording(offset_min=120), recording(pids=range(3, 7))
    paths = [
        write_recording(tmp_path / "a.jsonl.gz", "jsonl.gz", early),
        write_recording(tmp_path / "b.varint", "varint", late),
    ]

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    class Ticking(FakeClock):
        def monotonic(self) -> float:
            self.advance(0.05)  # every look at the clock is 50 ms later: redraws are due
            return super().monotonic()

    replayed, direct = open_dir(dirs, tmp_path, "replayed"), open_dir(dirs, tmp_path, "direct")
    replayed.clock = Ticking(NOW)
    out = Terminal()
    stats = replayed.replay(paths, out)
    direct.apply(early)
    direct.apply(late)
    assert list(replayed.store.scan(RULE)) == list(direct.store.scan(RULE))
    assert (stats.files, stats.requests, stats.bad_requests) == (2, 26, 2)
    text = out.getvalue()
    assert "\r[" in text and "100.0%" in text
    assert text.endswith("req/s)\n") and "replayed 2 file(s)" in text


def test_replay_stops_a_file_at_broken_framing(tmp_path: Path, dirs: list[Dir]) -> None:
    """A length prefix running past the end of the file ends that file (counted, reported);
    what came before it is applied. A missing file fails before anything is written."""
    requests = recording()[:3]
    data = b"".join(varint(len(r.SerializeToString())) + r.SerializeToString() for r in requests)
    path = tmp_path / "cut.bin"
    path.write_bytes(data + varint(1000) + b"short")
    d = open_dir(dirs, tmp_path, "d")
    with pytest.raises(FileNotFoundError):
        d.replay([path, tmp_path / "missing.bin"])
    assert d.store.count_keys(RULE) == 0
    out = io.StringIO()
    stats = d.replay([path], out)
    assert (stats.requests, stats.bad_requests) == (3, 1)
    assert "ends inside the message" in out.getvalue()
    assert d.store.count_keys(RULE) > 0


# -- baseline ---------------------------------------------------------------------------


def export(d: Dir) -> bytes:
    """Every rule's keys, as `pathwatch baseline export` writes them."""
    buf = io.BytesIO()
    assert bl.export_baseline(d.db, buf, []) == d.store.count_keys(RULE)
    return buf.getvalue()


def test_export_import_reproduces_the_data_dir(tmp_path: Path, dirs: list[Dir]) -> None:
    """A baseline imported into an empty data dir gives the exporter's records, activity and
    expiry index entries, host/cluster and context rows and key count, entry for entry."""
    source = open_dir(dirs, tmp_path, "source")
    source.apply(recording())
    data = export(source)
    assert data[:2] == b"\x1f\x8b"
    assert gzip.decompress(data).startswith(b"PATHWATCH-BASELINE 1\n")
    target = open_dir(dirs, tmp_path, "target")
    assert bl.import_baseline(target.db, io.BytesIO(data), target.retention, NOW) == 4
    assert target.snapshot() == source.snapshot()
    assert target.store.key_count(RULE) == 4
    assert export(target) == data  # deterministic: the same state exports the same bytes


def test_importing_twice_changes_nothing(tmp_path: Path, dirs: list[Dir]) -> None:
    """Import is idempotent: a second import of the same file leaves every entry as is."""
    source = open_dir(dirs, tmp_path, "source")
    source.apply(recording())
    data = export(source)
    target = open_dir(dirs, tmp_path, "target")
    target.apply(recording(offset_min=7, pids=range(3, 9)))
    first = bl.import_baseline(target.db, io.BytesIO(data), target.retention, NOW)
    after_first = target.snapshot()
    second = bl.import_baseline(target.db, io.BytesIO(data), target.retention, NOW)
    assert first == second == 4
    assert target.snapshot() == after_first


def test_import_merges_like_receiving_both(tmp_path: Path, dirs: list[Dir]) -> None:
    """Importing into a data dir with its own keys (some shared) gives the same key records,
    key count, activity index and host first-seen as receiving both data sets."""
    mine, theirs = recording(offset_min=5, pids=range(3, 9)), recording(offset_min=200)
    source = open_dir(dirs, tmp_path, "source")
    source.apply(theirs)
    target = open_dir(dirs, tmp_path, "target")
    target.apply(mine)
    bl.import_baseline(target.db, io.BytesIO(export(source)), target.retention, NOW)
    both = open_dir(dirs, tmp_path, "both")
    both.apply(theirs)
    both.apply(mine)
    assert list(target.store.scan(RULE)) == list(both.store.scan(RULE))
    count = target.db.get(ks.meta_key(f"keys:{RULE}"))
    assert count is not None and int(count) == target.store.count_keys(RULE) == 8
    window = (NOW // MINUTE_MS - 24 * 60, NOW // MINUTE_MS + 1)
    assert sorted(target.store.active(RULE, *window)) == sorted(both.store.active(RULE, *window))
    for host in ("node-0", "node-1"):
        assert target.store.entity_first_seen("h", host) == both.store.entity_first_seen("h", host)


def test_export_of_selected_rules(tmp_path: Path, dirs: list[Dir]) -> None:
    """Only the named rules' keys are exported; an unknown rule exports none."""
    source = open_dir(dirs, tmp_path, "source")
    source.apply(recording())
    assert bl.export_baseline(source.db, io.BytesIO(), [RULE]) == 4
    assert bl.export_baseline(source.db, io.BytesIO(), ["no_such_rule"]) == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (gzip.compress(b"SOMETHING-ELSE 1\n"), "not a pathwatch baseline file"),
        (gzip.compress(b"PATHWATCH-BASELINE 2\n"), "version 2 is not supported"),
        (b"PATHWATCH-BASELINE 1\n", "not a pathwatch baseline file"),
        (b"", "not a pathwatch baseline file"),
        (gzip.compress(b"PATHWATCH-BASELINE 1\n"), "truncated"),
    ],
)
def test_foreign_or_damaged_files_are_refused(
    tmp_path: Path, dirs: list[Dir], data: bytes, message: str
) -> None:
    """A file with another header, another version, no gzip or no end record is refused
    with a ValueError that says so."""
    target = open_dir(dirs, tmp_path, "target")
    with pytest.raises(ValueError, match=message):
        bl.import_baseline(target.db, io.BytesIO(data), target.retention, NOW)
    assert target.store.count_keys(RULE) == 0


def test_a_cut_file_is_refused_after_merging_what_it_holds(tmp_path: Path, dirs: list[Dir]) -> None:
    """A baseline cut short raises ValueError; importing the whole file afterwards gives the
    complete state."""
    source = open_dir(dirs, tmp_path, "source")
    source.apply(recording())
    whole = gzip.decompress(export(source))
    target = open_dir(dirs, tmp_path, "target")
    with pytest.raises(ValueError, match="truncated"):
        bl.import_baseline(
            target.db, io.BytesIO(gzip.compress(whole[: len(whole) // 2])), target.retention, NOW
        )
    bl.import_baseline(target.db, io.BytesIO(gzip.compress(whole)), target.retention, NOW)
    assert target.snapshot() == source.snapshot()


# -- the merge, against a brute-force model ---------------------------------------------

_NOW_MIN = NOW // MINUTE_MS
_RETENTION = Retention(horizon_minutes=600, max_runs=256, index_minutes=120)
_minutes = st.sets(st.integers(_NOW_MIN - 700, _NOW_MIN + 5), max_size=40)


def _state(minutes: set[int]) -> KeyState:
    return KeyState(
        min(minutes) * MINUTE_MS + 1,
        max(minutes) * MINUTE_MS + 2,
        PresenceHistory.of_minutes(minutes),
    )


def _expand(history: PresenceHistory) -> set[int]:
    return {m for s, e in history.runs for m in range(s, e)}


@settings(max_examples=300, deadline=None)
@given(old=_minutes, imported=_minutes)
def test_merge_is_the_union_inside_the_horizon(old: set[int], imported: set[int]) -> None:
    """Merging keeps exactly the minutes either side saw inside the horizon, the earliest
    first_seen and the latest last_seen; merging again changes nothing; order does not
    matter."""
    horizon = _NOW_MIN - _RETENTION.horizon_minutes
    old_state = _state(old) if old else None
    if not imported:
        return
    merged = bl.merge_state(old_state, _state(imported), _RETENTION, NOW)
    if not any(m >= horizon for m in imported):
        assert merged is None
        return
    assert merged is not None
    assert _expand(merged.history) == {m for m in old | imported if m >= horizon}
    assert merged.first_seen_ms == min(old | imported) * MINUTE_MS + 1
    assert merged.last_seen_ms == max(old | imported) * MINUTE_MS + 2
    assert bl.merge_state(merged, _state(imported), _RETENTION, NOW) == merged
    if old_state is not None and any(m >= horizon for m in old):
        assert bl.merge_state(_state(imported), old_state, _RETENTION, NOW) == merged
