"""Access control shared by the receiver and the admin API: bearer tokens and TLS files.

Both re-read their files when the files change (checked by mtime and size, at most once a
second), so a rotated token or certificate takes effect without a restart. Tokens are compared
in constant time and never logged.
"""

from __future__ import annotations

import hmac
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(component="access")

_CHECK_INTERVAL_S = 1.0


class AccessConfigError(ValueError):
    """A token or certificate setting cannot be used (missing file, empty value)."""


def _stamp(path: str) -> tuple[int, int] | None:
    """(mtime, size) of `path`, None while it does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


class _Watched:
    """Says whether any of `paths` changed since the last look (rate-limited to one look a
    second). A file that disappears is a change, and so is its return: the caller's reload
    then fails, is reported once, and keeps what works."""

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._stamps: list[tuple[int, int] | None] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def changed(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._stamps is not None and now - self._checked < _CHECK_INTERVAL_S:
                return False
            self._checked = now
            stamps = [_stamp(p) for p in self._paths]
            if stamps == self._stamps:
                return False
            self._stamps = stamps
            return True


class BearerToken:
    """The token clients must present as ``Authorization: Bearer <token>``.

    From `value`, `file` (re-read when it changes) or the environment variable `env`; all
    None means no authentication. Raises AccessConfigError when a source is given but empty.
    A token file that later disappears or is emptied keeps the last good token in force: a
    warning names the file and `on_reload_failure` (set by the listener, e.g. to count it) is
    called once per such change.
    """

    def __init__(self, value: str | None, file: str | None, env: str | None, where: str) -> None:
        self._file = file
        self._where = where
        self._token: bytes | None = None
        self._watch = _Watched([file]) if file else None
        self.on_reload_failure: Callable[[], None] | None = None
        if value:
            self._token = value.encode()
        elif env:
            text = os.environ.get(env, "").strip()
            if not text:
                raise AccessConfigError(
                    f"{where}_env: environment variable {env} is empty or unset"
                )
            self._token = text.encode()
        elif file:
            self._token = self._read()

    @property
    def enabled(self) -> bool:
        return self._token is not None

    @property
    def listener(self) -> str:
        """The listener's config path, e.g. "receiver.grpc" (a metric label)."""
        return self._where.removesuffix(".auth.bearer_token")

    def _read(self) -> bytes:
        assert self._file is not None
        try:
            with open(self._file, "rb") as fh:
                token = fh.read().strip()
        except OSError as exc:
            raise AccessConfigError(f"bearer token file {self._file}: {exc.strerror}") from exc
        if not token:
            raise AccessConfigError(f"bearer token file {self._file} is empty")
        return token

    def _reload(self) -> None:
        try:
            self._token = self._read()
        except AccessConfigError as exc:
            # Keep the previous token rather than lock everyone out (or let everyone in)
            # mid-rotation; say so, since a token nobody can rotate away is a risk too.
            log.warning(
                "cannot reload the bearer token file; keeping the last good token",
                listener=self.listener,
                file=self._file,
                error=str(exc),
            )
            if self.on_reload_failure is not None:
                self.on_reload_failure()
            return
        log.info("reloaded the bearer token file", listener=self.listener, file=self._file)

    def accepts(self, authorization: str | None) -> bool:
        """True when no token is configured or `authorization` carries it (constant time)."""
        if self._token is None:
            return True
        if self._watch is not None and self._watch.changed():
            self._reload()
        if not authorization:
            return False
        scheme, _, presented = authorization.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(presented.strip().encode(), self._token)


@dataclass(frozen=True)
class TlsFiles:
    """Server certificate, key and optional client CA (mTLS when set)."""

    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    where: str = "tls"

    def read(self) -> tuple[bytes, bytes, bytes | None]:
        try:
            with open(self.cert_file, "rb") as c, open(self.key_file, "rb") as k:
                cert, key = c.read(), k.read()
            ca = None
            if self.client_ca_file:
                with open(self.client_ca_file, "rb") as fh:
                    ca = fh.read()
        except OSError as exc:
            raise AccessConfigError(
                f"{self.where}: cannot read {exc.filename}: {exc.strerror}"
            ) from exc
        return cert, key, ca

    def watcher(self) -> _Watched:
        return _Watched([p for p in (self.cert_file, self.key_file, self.client_ca_file) if p])

    def server_context(self) -> ssl.SSLContext:
        self.read()  # names the missing or unreadable file
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert_file, self.key_file)
            if self.client_ca_file:
                ctx.load_verify_locations(self.client_ca_file)
                ctx.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise AccessConfigError(f"{self.where}: cannot load certificate or key: {exc}") from exc
        return ctx


def tls_files(cert: str | None, key: str | None, ca: str | None, where: str) -> TlsFiles | None:
    if not cert and not key:
        if ca:
            raise AccessConfigError(f"{where}.client_ca_file needs cert_file and key_file")
        return None
    if not cert or not key:
        raise AccessConfigError(f"{where}: cert_file and key_file go together")
    return TlsFiles(cert, key, ca, where)
