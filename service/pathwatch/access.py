"""Access control shared by the receiver and the admin API: bearer tokens and TLS files.

Both re-read their files when the files change (checked by mtime and size, at most once a
second), so a rotated token or certificate takes effect without a restart. Tokens are compared
in constant time and never logged.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import ssl
import threading
import time
from dataclasses import dataclass

_CHECK_INTERVAL_S = 1.0


class AccessConfigError(ValueError):
    """A token or certificate setting cannot be used (missing file, empty value)."""


def _stamp(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_mtime_ns, st.st_size


class _Watched:
    """Calls `load` again when any of `paths` changed since the last call (rate-limited)."""

    def __init__(self, paths: list[str]) -> None:
        self._paths = paths
        self._stamps: list[tuple[int, int]] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def changed(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if self._stamps is not None and now - self._checked < _CHECK_INTERVAL_S:
                return False
            self._checked = now
            try:
                stamps = [_stamp(p) for p in self._paths]
            except OSError:
                return False  # mid-rotation (file replaced): keep what works, look again soon
            if stamps == self._stamps:
                return False
            self._stamps = stamps
            return True


class BearerToken:
    """The token clients must present as ``Authorization: Bearer <token>``.

    From `value`, `file` (re-read when it changes) or the environment variable `env`; all
    None means no authentication. Raises AccessConfigError when a source is given but empty.
    """

    def __init__(self, value: str | None, file: str | None, env: str | None, where: str) -> None:
        self._file = file
        self._token: bytes | None = None
        self._watch = _Watched([file]) if file else None
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

    def accepts(self, authorization: str | None) -> bool:
        """True when no token is configured or `authorization` carries it (constant time)."""
        if self._token is None:
            return True
        if self._watch is not None and self._watch.changed():
            # Keep the previous token rather than lock everyone out mid-rotation.
            with contextlib.suppress(AccessConfigError):
                self._token = self._read()
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
