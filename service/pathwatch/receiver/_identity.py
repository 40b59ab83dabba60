"""Who sent a request: the name new-key budgets are charged to, and the hosts it may speak for.

Under mTLS the sender is its client certificate (first DNS SAN, else CN), which a peer cannot
change by reconnecting from another port or address; otherwise it is the peer's IP address
without the port, so one client's connections share one budget.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

HostFilter = Callable[[str], bool]


@dataclass(frozen=True, slots=True)
class CertificateIdentity:
    """The names a verified client certificate carries: its DNS SANs in order, and its CN."""

    dns_names: tuple[str, ...]
    common_name: str | None

    @property
    def sender(self) -> str:
        """The first DNS SAN, else the CN ("" when the certificate has neither)."""
        if self.dns_names:
            return self.dns_names[0]
        return self.common_name or ""

    def host_filter(self) -> HostFilter:
        """Accepts a host.name equal (ignoring case) to one of the DNS SANs or the CN.
        Exact names only: a wildcard SAN would let one node speak for many."""
        names = {n.casefold() for n in (*self.dns_names, self.common_name or "") if n}
        names = {n for n in names if "*" not in n}
        return lambda host: host.casefold() in names


def peer_address(peer: str) -> str:
    """The address part of a gRPC peer string, without the port: "ipv4:10.0.0.5:43122" ->
    "10.0.0.5", "ipv6:[::1]:5000" (or its %5B-escaped form) -> "::1"; other kinds
    ("unix:/run/x.sock") are returned whole."""
    text = unquote(peer)
    kind, sep, rest = text.partition(":")
    if not sep:
        return text
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        if rest.startswith("["):
            return rest[1:].partition("]")[0]
        return rest.rpartition(":")[0] or rest
    return text


def _text(values: Iterable[Any]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def grpc_identity(auth_context: Mapping[str, Sequence[Any]]) -> CertificateIdentity | None:
    """The verified client certificate of a gRPC call (its `context.auth_context()`), or None
    without one."""
    if not auth_context.get("x509_pem_cert"):
        return None
    names = tuple(_text(auth_context.get("peer_dns") or ()))
    cn = _text(auth_context.get("x509_common_name") or ())
    return CertificateIdentity(names, cn[0] if cn else None)


def tls_identity(peer_cert: Mapping[str, Any] | None) -> CertificateIdentity | None:
    """The verified client certificate of a TLS socket (`SSLSocket.getpeercert()`), or None."""
    if not peer_cert:
        return None
    names = tuple(str(v) for kind, v in peer_cert.get("subjectAltName", ()) if kind == "DNS")
    cn = None
    for rdn in peer_cert.get("subject", ()):
        for attr, value in rdn:
            if attr == "commonName" and cn is None:
                cn = str(value)
    return CertificateIdentity(names, cn)


def sender_of(identity: CertificateIdentity | None, address: str) -> str:
    """The name to charge new-key budgets to: the certificate's, else the peer address."""
    if identity is not None and identity.sender:
        return identity.sender
    return address
