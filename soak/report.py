"""The final report: the run's identity (seed, commit, machine) and one table with verdicts."""

from __future__ import annotations

import itertools
import os
import platform
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from soak.harness import Outcome, Soak, median
from soak.senders import SenderStats

MB = 1_000_000
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Row:
    measurement: str
    result: str
    verdict: str = ""


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _n(value: float) -> str:
    return f"{round(value):,}"


def _mb(value: float) -> str:
    return f"{value / MB:,.1f} MB"


def commit() -> str:
    """The checked-out commit, and whether the working tree differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.splitlines()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"{head}" + (f" (+{len(dirty)} modified files)" if dirty else "")


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return (
        f"{os.cpu_count()} cores, {model}, {memory / 2**30:.1f} GiB RAM, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}"
    )


def _sum_stats(stats: list[SenderStats]) -> SenderStats:
    total = SenderStats()
    for s in stats:
        total.exports += s.exports
        total.history_exports += s.history_exports
        total.resources += s.resources
        total.points += s.points
        total.failed_attempts.update(s.failed_attempts)
        total.refused += s.refused
        total.rejected_points += s.rejected_points
        total.untracked_points += s.untracked_points
        total.abandoned += s.abandoned
        total.latencies += s.latencies
    return total


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def duplicates(out: Outcome) -> tuple[int, int]:
    """Repeated deliveries of one id: (after a kill -9 between them, within one process).
    Within one process an id is delivered once: the second figure must be 0."""
    after_kill = same_process = 0
    for times in out.delivered.values():
        for earlier, later in itertools.pairwise(times):
            if any(earlier < k < later for k in out.kills):
                after_kill += 1
            else:
                same_process += 1
    return after_kill, same_process


def rows(soak: Soak) -> tuple[list[Row], bool]:
    out, model, s = soak.out, soak.model, soak.settings
    stats = _sum_stats([sender.stats for sender in soak.senders])
    failed = ", ".join(f"{code} {n:,}" for code, n in stats.failed_attempts.most_common())
    by_kind = Counter(t.kind for t in out.ticks)
    missing = sum(len(t.missing) for t in out.ticks)
    unexpected = sum(len(t.unexpected) for t in out.ticks)
    late = sum(t.late for t in out.ticks)
    alerts = len(model.alerts)
    presence = out.presence
    lost = len(presence.lost) if presence else -1
    phantom = len(presence.phantom) if presence else -1
    first_wrong = len(presence.first_seen_wrong) if presence else -1
    undelivered = out.expected_ids - out.delivered.keys()
    stray = out.delivered.keys() - out.expected_ids
    after_kill, same_process = duplicates(out)
    restarts = out.restart_s
    moments = ", ".join(f"{n} during {m}" for m, n in out.kills_by_moment.most_common())
    table = [
        Row("load: senders x hosts x tracked processes, round every",
            f"{s.senders} x {s.hosts} x {s.processes}, {s.interval_s:g} s (churn "
            f"{s.churn:.0%}/round, host churn {s.host_churn:.0%}/round)"),
        Row("exports acknowledged (stamped in the past: history)",
            f"{_n(stats.exports)} ({_n(stats.history_exports)})"),
        Row("resources / data points acknowledged",
            f"{_n(stats.resources)} / {_n(stats.points)}"),
        Row("Export latency p50 / p99 / max (acknowledged attempts)",
            f"{_percentile(stats.latencies, 0.5) * 1000:.0f} / "
            f"{_percentile(stats.latencies, 0.99) * 1000:.0f} / "
            f"{max(stats.latencies, default=0) * 1000:.0f} ms"),
        Row("failed attempts (retried until acknowledged)", failed or "none"),
        Row("points rejected for a missing key field (kernel threads, by design)",
            _n(stats.untracked_points)),
        Row("exports refused / other points rejected / abandoned at the end",
            f"{stats.refused} / {stats.rejected_points} / {stats.abandoned}",
            _verdict(stats.refused == 0 and stats.rejected_points == 0)),
        Row("acknowledged observations (key, minute) / keys",
            f"{_n(model.observations)} / {_n(len(model.minutes))}"
            + (f" ({len(model.uncertain)} keys uncertain, not compared)" if model.uncertain
               else "")),
        Row("kill -9", f"{len(out.kills)} ({moments or 'none'})"),
        Row("evaluations cut by kill -9 before answering (tick committed before the kill)",
            f"{out.evaluations_cut} ({out.cut_but_recorded})"),
        Row("service exits nobody asked for", str(out.unexpected_exits),
            _verdict(out.unexpected_exits == 0)),
        Row("restart to /readyz 200: first start; after kill -9 min / median / max",
            f"{out.first_start_s:.2f} s; " + (
                f"{min(restarts):.2f} / {median(restarts):.2f} / {max(restarts):.2f} s "
                f"({len(restarts)})" if restarts else "-")),
        Row("ticks compared: past (API) / scheduler / final",
            f"{by_kind['past']} / {by_kind['scheduler']} / {by_kind['final']}"
            + (f" ({out.past_skipped} past ticks skipped at the hour)" if out.past_skipped
               else "")),
        Row("alerts recorded (late: onsets found after their tick ran)",
            f"{_n(alerts)} ({_n(late)} late)"),
        Row("wrong alerts: missing / unexpected", f"{missing} / {unexpected}",
            _verdict(missing == 0 and unexpected == 0)),
        Row("lost observations / phantom minutes / wrong first_seen",
            f"{lost} / {phantom} / {first_wrong}",
            _verdict(lost == 0 and phantom == 0 and first_wrong == 0)),
        Row("alert ids delivered (2xx) / recorded; undelivered; dead letters",
            f"{_n(len(out.expected_ids & out.delivered.keys()))} / {_n(len(out.expected_ids))};"
            f" {len(undelivered)}; {out.deadletters}",
            _verdict(not undelivered and out.deadletters == 0)),
        Row("deliveries of ids no tick recorded; bad signatures",
            f"{len(stray)}; {out.bad_signatures}",
            _verdict(not stray and out.bad_signatures == 0)),
        Row("webhook requests (503 answered on purpose)",
            f"{_n(out.webhook_requests)} ({_n(out.webhook_503)})"),
        Row("duplicate deliveries: after a kill -9 (at-least-once) / within one process",
            f"{after_kill} / {same_process}", _verdict(same_process == 0)),
        Row("service RSS: max VmRSS / max VmHWM / at the end",
            f"{_mb(out.samples.rss_max)} / {_mb(out.samples.hwm_max)} / "
            f"{_mb(out.samples.rss_last)}"),
        Row("data dir: after first start / max / at the end / after clean stop",
            f"{_mb(out.samples.disk_first)} / {_mb(out.samples.disk_max)} / "
            f"{_mb(out.samples.disk_last)} / {_mb(out.disk_after_stop)}"),
        Row("clean stop (SIGTERM to exit)", f"{out.stop_s:.2f} s"),
        Row("checkpoints skipped (quiesce timed out) / scheduler ticks late",
            f"{out.quiesce_timeouts} / {len(out.scheduler_late)}"),
        Row("error lines in the service log", str(out.error_line_count)),
    ]  # fmt: skip
    passed = all(r.verdict != "FAIL" for r in table)
    return table, passed


def render(table: list[Row]) -> str:
    header = Row("measurement", "result", "")
    widths = [max(len(getattr(r, f)) for r in [header, *table]) for f in Row.__annotations__]

    def line(r: Row) -> str:
        cells = (r.measurement, r.result, r.verdict)
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return "\n".join([line(header), "-" * (sum(widths) + 4), *(line(r) for r in table)])


def print_report(soak: Soak) -> bool:
    out = soak.out
    table, passed = rows(soak)
    print()
    print(f"== pathwatch soak: {soak.settings.duration_s:g} s, seed {out.seed} ==")
    print(f"commit:   {commit()}")
    print(f"machine:  {machine()}")
    print(f"run:      {out.seconds:.0f} s in all (load, then final ticks, deliveries, checks)")
    print()
    print(render(table))
    details = []
    for t in out.ticks:
        for label, alerts in (("missing", t.missing), ("unexpected", t.unexpected)):
            details += [f"  {label} at {t.kind} tick: {a.describe()}" for a in alerts[:20]]
    if out.presence is not None:
        details += [f"  lost: {'/'.join(k)} minute {m}" for k, m in out.presence.lost[:20]]
        details += [f"  phantom: {'/'.join(k)} minute {m}" for k, m in out.presence.phantom[:20]]
    details += [f"  undelivered: {i}" for i in sorted(out.expected_ids - out.delivered.keys())[:20]]
    start = min((t for times in out.delivered.values() for t in times), default=0.0)
    kills = ", ".join(f"{k - start:.2f}" for k in out.kills)
    repeated = [(i, times) for i, times in sorted(out.delivered.items()) if len(times) > 1]
    for alert_id, times in repeated[:10]:
        at = ", ".join(f"{t - start:.2f}" for t in times)
        details.append(f"  delivered more than once: {alert_id} at {at} s (kills at {kills} s)")
    details += [f"  service log: {line}" for line in out.error_lines]
    if details:
        print()
        print("details:")
        print("\n".join(details))
    print()
    print(f"result:   {'PASS' if passed else 'FAIL'} (repeat the choices with --seed {out.seed})")
    return passed
