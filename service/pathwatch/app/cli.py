"""The `pathwatch` command: serve, check-config, evaluate, inspect, redrive."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import signal
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from types import FrameType
from typing import Any

from pathwatch import __version__
from pathwatch.config import Config, ConfigError, load_config
from pathwatch.config.load import env_variables

EXIT_CONFIG = 2
EXIT_RUNTIME = 1
_M_ARENA_MAX = -8  # mallopt parameter number, from glibc's malloc.h


def _load(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("PATHWATCH_CONFIG")
    config = load_config(path, os.environ)
    if getattr(args, "data_dir", None):
        import dataclasses

        config = dataclasses.replace(config, data_dir=args.data_dir)
    return config


def limit_malloc_arenas() -> None:
    """Use at most two glibc malloc arenas unless MALLOC_ARENA_MAX says otherwise.

    glibc gives threads that allocate at once arenas of their own (up to 8 per core); the gRPC
    workers, the writer and RocksDB's threads then leave memory fragmented across them, which
    shows as RSS. Two arenas keep it down at a small cost in lock contention. Must run before
    threads start; a no-op where libc is not glibc.
    """
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 2)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathwatch.app.service import Service
    from pathwatch.store.db import StoreError
    from pathwatch.telemetry.logging import configure_logging

    limit_malloc_arenas()
    config = _load(args)
    configure_logging(config.log.level, config.log.format)
    service = Service(config)
    stop = threading.Event()
    interrupts = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts > 1:
            os._exit(130)  # second Ctrl-C: the operator wants out now
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        service.start()
    except (StoreError, OSError, ValueError) as exc:
        print(f"pathwatch: cannot start: {exc}", file=sys.stderr)
        service.shutdown(5)
        return EXIT_RUNTIME
    while not stop.wait(1.0):
        pass
    service.shutdown(args.shutdown_timeout)
    return 0


def _cmd_check_config(args: argparse.Namespace) -> int:
    from pathwatch.alerts.sinks import build_sink
    from pathwatch.app.service import check_access
    from pathwatch.clock import SystemClock
    from pathwatch.rules import resolve_rules

    config = _load(args)
    try:
        for sink in config.sinks:
            build_sink(sink, SystemClock())
        check_access(config)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    from pathwatch.receiver.decode import ACCELERATED

    rules = resolve_rules(config.rules)
    enabled = [r.id for r in rules if r.enabled]
    fast_path = "C accelerator" if ACCELERATED else "pure Python"
    print(
        f"config OK: data_dir={config.data_dir}, {len(enabled)} enabled rule(s) "
        f"({', '.join(enabled) or 'none'}), {len(config.sinks)} sink(s); "
        f"receiver fast path: {fast_path}"
    )
    return 0


def _open_offline(config: Config, *, create: bool = False):  # type: ignore[no-untyped-def]
    """A stopped data dir, opened in this process. Only backfills may create one: reading
    commands (inspect, evaluate, redrive) on a path that holds no data dir say so."""
    from pathwatch.app.service import Service

    if not create and not os.path.isdir(config.data_dir):
        raise ConfigError(
            f"data_dir: {config.data_dir!r} does not exist (no pathwatch data there); pass "
            "--config with the service's configuration or --data-dir"
        )
    service = Service(config)
    service.open_store()
    # Minutes the service logged and had not folded yet go into their records first, so
    # that what this command reads or writes is the whole state (store/extend.py).
    assert service.firstseen is not None
    if service.firstseen.load_pending():
        service.firstseen.fold_all(service.retention, service.clock.now_ms())
    return service


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathwatch.alerts.event import parse_rfc3339, risk_event
    from pathwatch.engine import evaluate

    config = _load(args)
    service = _open_offline(config)
    try:
        rule = next((r for r in service.rules if r.id == args.rule), None)
        if rule is None:
            print(
                f"pathwatch: unknown rule {args.rule!r} "
                f"(rules: {', '.join(r.id for r in service.rules)})",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        try:
            at = parse_rfc3339(args.at)
        except ValueError as exc:
            print(f"pathwatch: --at {args.at!r}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if at % 60_000:
            print("pathwatch: --at must be a whole minute", file=sys.stderr)
            return EXIT_CONFIG
        assert service.firstseen is not None
        result = evaluate(rule, at, service.firstseen)
        for finding in result.findings:
            print(risk_event(finding).to_json())
        print(
            f"{len(result.findings)} alert(s), {result.excluded} excluded, "
            f"{result.candidates} candidate key(s)",
            file=sys.stderr,
        )
    finally:
        if service.db is not None:
            service.db.close()
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pathwatch.app.inspect import key_view, search_keys

    config = _load(args)
    service = _open_offline(config)
    try:
        rule = next((r for r in service.rules if r.id == args.rule), None)
        if rule is None:
            print(f"pathwatch: unknown rule {args.rule!r}", file=sys.stderr)
            return EXIT_CONFIG
        assert service.firstseen is not None
        if args.key:
            values = dict(kv.split("=", 1) for kv in args.key)
            missing = [f for f in rule.key_fields if f not in values]
            if missing:
                print(
                    f"pathwatch: --key needs every key field; missing: {', '.join(missing)}",
                    file=sys.stderr,
                )
                return EXIT_CONFIG
            key = tuple(values[f] for f in rule.key_fields)
            state = service.firstseen.get(rule.id, key)
            if state is None:
                print("key not found", file=sys.stderr)
                return EXIT_RUNTIME
            print(json.dumps(key_view(rule, key, state)))
            return 0
        shown = 0
        for view in search_keys(service.firstseen, rule, args.path, args.name):
            print(json.dumps(view))
            shown += 1
            if shown >= args.limit:
                print(f"(stopped at --limit {args.limit})", file=sys.stderr)
                break
        print(f"{shown} key(s)", file=sys.stderr)
    finally:
        if service.db is not None:
            service.db.close()
    return 0


API_TOKEN_ENV = "PATHWATCH_API_TOKEN"  # the admin API's bearer token, for --api


def _api(
    url: str, method: str = "GET", body: Any = None, timeout: float = 600.0
) -> tuple[int, Any]:
    """Call a running pathwatch's admin API (with the bearer token from $PATHWATCH_API_TOKEN
    when set); returns (0, response) or (exit code, None) after printing why."""
    request = urllib.request.Request(url, data=body, method=method)
    token = os.environ.get(API_TOKEN_ENV, "").strip()
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None:
        request.add_header("Content-Type", "application/octet-stream")
        size = len(body) if isinstance(body, bytes) else os.fstat(body.fileno()).st_size
        request.add_header("Content-Length", str(size))  # the API takes no chunked bodies
    try:
        return 0, urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        hint = f" (set {API_TOKEN_ENV})" if exc.code == 401 else ""
        print(f"pathwatch: {exc.code}: {exc.read().decode().strip()}{hint}", file=sys.stderr)
    except urllib.error.URLError as exc:
        print(f"pathwatch: cannot reach {url}: {exc.reason}", file=sys.stderr)
    return EXIT_RUNTIME, None


def _cmd_redrive(args: argparse.Namespace) -> int:
    if args.api:
        url = args.api.rstrip("/") + "/api/v1/deadletters/redrive"
        if args.sink:
            url += f"?sink={args.sink}"
        code, response = _api(url, "POST", timeout=30)
        if code:
            return code
        with response:
            print(response.read().decode().strip())
        return 0
    config = _load(args)
    names = [s.name for s in config.sinks]
    if args.sink and args.sink not in names:
        print(
            f"pathwatch: unknown sink {args.sink!r} (sinks: {', '.join(names) or 'none'})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    service = _open_offline(config)
    try:
        assert service.alerts is not None
        moved = service.alerts.redrive(args.sink, names)
    finally:
        if service.db is not None:
            service.db.close()
    print(f"{moved} dead letter(s) moved back to the outbox; they are delivered on the next start")
    return 0


def _open_for_backfill(args: argparse.Namespace) -> tuple[Config, Any]:
    """A stopped data dir opened for replay or baseline import. The new-key flood guards are
    off: a backfill legitimately creates many keys per host within one wall-clock hour, and
    no summary alert could be raised for what they would refuse."""
    import dataclasses

    config = _load(args)
    limits = dataclasses.replace(
        config.limits,
        new_keys_per_host_per_hour=0,
        new_keys_per_sender_per_hour=0,
        new_keys_per_hour=0,
    )
    config = dataclasses.replace(config, limits=limits)
    return config, _open_offline(config, create=True)


def _cmd_replay(args: argparse.Namespace) -> int:
    from pathwatch.app.replay import replay
    from pathwatch.app.service import retention_of
    from pathwatch.receiver.decode import Decoder

    config, service = _open_for_backfill(args)
    try:
        assert service.firstseen is not None
        retention = {
            r.id: retention_of(r, config.store.max_runs_per_key) for r in service.enabled_rules
        }
        decoder = Decoder(
            service.rules, config.receiver.max_key_field_bytes, config.receiver.resource_cache
        )
        try:
            stats = replay(
                args.files,
                decoder,
                service.firstseen,
                retention,
                service.clock,
                service.time_bounds(),
                sys.stderr,
            )
        except OSError as exc:
            print(f"pathwatch: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
    finally:
        if service.db is not None:
            service.db.close()
    return EXIT_RUNTIME if stats.bad_requests and not stats.requests else 0


def _baseline_over_api(args: argparse.Namespace) -> int:
    """`baseline export|import --api URL`: against a running pathwatch (moving a cluster
    between shards: export from the old one with --cluster, import into the new one)."""
    from urllib.parse import urlencode

    base = args.api.rstrip("/") + "/api/v1/baseline"
    if args.action == "export":
        query = [("cluster", args.cluster)] if args.cluster else []
        query += [("rule", r) for r in args.rule or []]
        code, response = _api(base + ("?" + urlencode(query) if query else ""))
        if code:
            return code
        with response:
            keys = response.headers.get("X-Pathwatch-Keys", "?")
            if args.file == "-":
                sys.stdout.buffer.write(response.read())
            else:
                partial = args.file + ".partial"
                with open(partial, "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(partial, args.file)
        print(f"{keys} key(s) exported", file=sys.stderr)
        return 0
    data = sys.stdin.buffer.read() if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    try:
        code, response = _api(base, "POST", data)
    finally:
        if not isinstance(data, bytes):
            data.close()
    if code:
        return code
    with response:
        merged = json.loads(response.read())["imported"]
    print(f"{merged} key(s) merged from {args.file} into {args.api}", file=sys.stderr)
    return 0


def _cmd_baseline(args: argparse.Namespace) -> int:
    from pathwatch.app.baseline import export_baseline, import_baseline
    from pathwatch.app.service import retention_of

    if args.api:
        return _baseline_over_api(args)
    if args.cluster:
        print("pathwatch: --cluster needs --api (a running pathwatch)", file=sys.stderr)
        return EXIT_CONFIG

    config, service = _open_for_backfill(args)
    try:
        known = {r.id for r in service.rules}
        unknown = [r for r in args.rule or [] if r not in known]
        if unknown:
            print(
                f"pathwatch: unknown rule(s) {', '.join(unknown)} "
                f"(rules: {', '.join(sorted(known))})",
                file=sys.stderr,
            )
            return EXIT_CONFIG
        if args.action == "export":
            if args.file == "-":
                count = export_baseline(service.db, sys.stdout.buffer, args.rule or [])
            else:
                partial = args.file + ".partial"
                with open(partial, "wb") as out:
                    count = export_baseline(service.db, out, args.rule or [])
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(partial, args.file)
            print(f"{count} key(s) exported", file=sys.stderr)
            return 0
        retention = {
            r.id: retention_of(r, config.store.max_runs_per_key)
            for r in service.enabled_rules
            if not args.rule or r.id in args.rule
        }
        try:
            if args.file == "-":
                count = import_baseline(
                    service.db, sys.stdin.buffer, retention, service.clock.now_ms()
                )
            else:
                with open(args.file, "rb") as inp:
                    count = import_baseline(service.db, inp, retention, service.clock.now_ms())
        except (OSError, ValueError) as exc:
            print(f"pathwatch: {args.file}: {exc}", file=sys.stderr)
            return EXIT_RUNTIME
        assert service.firstseen is not None
        service.firstseen.context.recount()  # imported context rows came without counts
        print(f"{count} key(s) merged from {args.file}", file=sys.stderr)
        return 0
    finally:
        if service.db is not None:
            service.db.close()


def _cmd_demo(args: argparse.Namespace) -> int:
    from pathwatch.app.demo import run_demo

    return run_demo(sys.stdout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pathwatch",
        description="Alerts when a Kubernetes process runs from a never-seen executable path.",
        epilog="Environment overrides: "
        + ", ".join(env_variables())
        + "; PATHWATCH_CONFIG names the file.",
    )
    parser.add_argument("--version", action="version", version=f"pathwatch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        # The one-line help doubles as the description of the subcommand's own --help page.
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".")

    def with_config(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
        return p

    serve = with_config(command("serve", help="run the service"))
    serve.add_argument(
        "--shutdown-timeout",
        type=float,
        default=20.0,
        help="seconds allowed for a clean shutdown (default 20)",
    )
    serve.set_defaults(func=_cmd_serve)
    with_config(command("check-config", help="validate the configuration and exit")).set_defaults(
        func=_cmd_check_config
    )
    ev = with_config(
        command(
            "evaluate",
            help="evaluate a rule on a stopped data dir; prints risk events as JSON lines",
        )
    )
    ev.add_argument(
        "--rule", default="kubernetes_process_running_from_new_path", help="the rule's id"
    )
    ev.add_argument("--at", required=True, help="evaluation time, RFC 3339, a whole minute")
    ev.add_argument("--data-dir", help="override data_dir")
    ev.add_argument(
        "--dry-run",
        action="store_true",
        help="accepted for symmetry with the API's dry_run: evaluating a stopped data dir "
        "never records a tick nor delivers anything",
    )
    ev.set_defaults(func=_cmd_evaluate)
    ins = with_config(command("inspect", help="show stored keys (stopped data dir)"))
    ins.add_argument(
        "--rule", default="kubernetes_process_running_from_new_path", help="the rule's id"
    )
    ins.add_argument(
        "--key", action="append", metavar="FIELD=VALUE", help="one key: give every key field once"
    )
    ins.add_argument("--path", help="glob on process.executable.path")
    ins.add_argument("--name", help="glob on process.executable.name")
    ins.add_argument("--limit", type=int, default=100, help="at most this many keys (100)")
    ins.add_argument("--data-dir", help="override data_dir")
    ins.set_defaults(func=_cmd_inspect)
    command(
        "demo",
        help="simulate a small cluster, plant an intrusion, print the alert (about a second)",
    ).set_defaults(func=_cmd_demo)
    rd = with_config(command("redrive", help="move dead letters back to the outbox"))
    rd.add_argument("--sink", help="only this sink (default: all)")
    rd.add_argument(
        "--api", metavar="URL", help="a running pathwatch's admin URL, e.g. http://localhost:8080"
    )
    rd.add_argument("--data-dir", help="override data_dir (stopped service)")
    rd.set_defaults(func=_cmd_redrive)
    rp = with_config(
        command(
            "replay",
            help="feed recorded OTLP metrics files (the collector's file exporter: JSON lines "
            "or protobuf, plain or gzip) into a stopped data dir",
        )
    )
    rp.add_argument("files", nargs="+", metavar="FILE", help="OTLP metrics files to replay")
    rp.add_argument("--data-dir", help="override data_dir")
    rp.set_defaults(func=_cmd_replay)
    bl = with_config(
        command("baseline", help="export or import first-seen state (stopped data dir)")
    )
    bl.add_argument(
        "action", choices=("export", "import"), help="export to FILE or import from FILE"
    )
    bl.add_argument("file", metavar="FILE", help="the baseline file; - for stdout / stdin")
    bl.add_argument(
        "--rule", action="append", metavar="ID", help="only this rule (repeatable; default: all)"
    )
    bl.add_argument("--data-dir", help="override data_dir")
    bl.add_argument(
        "--api",
        metavar="URL",
        help="a running pathwatch's admin URL instead of a stopped data dir (token from "
        f"${API_TOKEN_ENV})",
    )
    bl.add_argument(
        "--cluster", metavar="NAME", help="export only this cluster's state (with --api)"
    )
    bl.set_defaults(func=_cmd_baseline)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from pathwatch.store.db import DataDirInUse, StoreError

    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"pathwatch: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except DataDirInUse as exc:
        print(f"pathwatch: {exc}; stop it first, or use the HTTP API", file=sys.stderr)
        return EXIT_RUNTIME
    except StoreError as exc:
        print(f"pathwatch: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    return code
