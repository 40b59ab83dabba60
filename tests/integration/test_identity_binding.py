"""Sender identity and identity binding: who a request is charged to, and which hosts a client
certificate may write for, over real mTLS on both receivers of the running service."""

from __future__ import annotations

import http.client
import ssl
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from tests.support import EXPORT, Proc, ServiceProcess, process_request

pytestmark = pytest.mark.integration


def now_ms() -> int:
    return time.time_ns() // 1_000_000


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    """A CA, a server certificate for 127.0.0.1/localhost, client certificates for node-a
    (DNS SAN) and node-c (CN only)."""
    ca = trustme.CA()
    out: dict[str, Any] = {"ca": ca, "ca_file": tmp_path / "ca.pem", "dir": tmp_path}
    ca.cert_pem.write_to_path(str(out["ca_file"]))
    for name, cert in (
        ("server", ca.issue_cert("127.0.0.1", "localhost")),
        ("node-a", ca.issue_cert("node-a", common_name="collector-a")),
        ("node-c", ca.issue_cert(common_name="node-c")),
    ):
        chain, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
        cert.private_key_pem.write_to_path(str(key))
        out[name] = (chain, key)
    return out


def _mtls_service(
    pki: dict[str, Any], factory: type[ServiceProcess], bind: bool, limits: dict[str, int]
) -> ServiceProcess:
    chain, key = pki["server"]
    tls = {"cert_file": str(chain), "key_file": str(key), "client_ca_file": str(pki["ca_file"]),
           "require_host_match": bind}  # fmt: skip
    return factory(
        pki["dir"] / "data",
        {"receiver": {"grpc": {"listen": "127.0.0.1:0", "tls": tls},
                      "http": {"listen": "127.0.0.1:0", "tls": tls}},
         "limits": limits},
    ).start()  # fmt: skip


def _grpc_export(
    svc: ServiceProcess, pki: dict[str, Any], client: str, procs: list[Proc]
) -> ms.ExportMetricsServiceResponse:
    chain, key = pki[client]
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["ca_file"].read_bytes(),
        private_key=key.read_bytes(),
        certificate_chain=chain.read_bytes(),
    )
    options = [("grpc.ssl_target_name_override", "localhost"),
               ("grpc.use_local_subchannel_pool", 1)]  # fmt: skip
    with grpc.secure_channel(f"127.0.0.1:{svc.grpc_port}", creds, options=options) as ch:
        call = ch.unary_unary(
            EXPORT,
            request_serializer=ms.ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ms.ExportMetricsServiceResponse.FromString,
        )
        response: ms.ExportMetricsServiceResponse = call(
            process_request(procs, now_ms()), timeout=10
        )
        return response


def _http_export(
    svc: ServiceProcess, pki: dict[str, Any], client: str, procs: list[Proc]
) -> ms.ExportMetricsServiceResponse:
    chain, key = pki[client]
    ctx = ssl.create_default_context(cafile=str(pki["ca_file"]))
    ctx.load_cert_chain(str(chain), str(key))
    conn = http.client.HTTPSConnection("127.0.0.1", svc.otlp_http_port, timeout=10, context=ctx)
    try:
        body = process_request(procs, now_ms()).SerializeToString()
        conn.request("POST", "/v1/metrics", body, {"Content-Type": "application/x-protobuf"})
        resp = conn.getresponse()
        answer = resp.read()
        assert resp.status == 200, answer
    finally:
        conn.close()
    return ms.ExportMetricsServiceResponse.FromString(answer)


def _keys(svc: ServiceProcess, path_glob: str) -> list[Any]:
    status, body = svc.api("GET", f"/api/v1/keys?path={path_glob}&limit=1000")
    assert status == 200, body
    return list(body["keys"])


@pytest.mark.parametrize("receiver", ["grpc", "http"])
def test_require_host_match_refuses_other_hosts(
    pki: dict[str, Any], service_factory: type[ServiceProcess], receiver: str
) -> None:
    """With require_host_match, a client whose certificate names node-a writes node-a's
    process (stored) but not node-b's: partial_success rejects its points, the message says
    the host did not match the certificate, and no key for node-b is stored."""
    svc = _mtls_service(pki, service_factory, bind=True, limits={})
    send = _grpc_export if receiver == "grpc" else _http_export
    response = send(
        svc,
        pki,
        "node-a",
        [Proc(1, "/opt/own/agent", host="node-a"), Proc(2, "/opt/forged/implant", host="node-b")],
    )
    assert response.partial_success.rejected_data_points > 0
    assert "host" in response.partial_success.error_message.lower()
    assert len(_keys(svc, "/opt/own/agent")) == 1
    assert _keys(svc, "/opt/forged/implant") == []


def test_certificate_identity_is_the_sender(
    pki: dict[str, Any], service_factory: type[ServiceProcess]
) -> None:
    """Under mTLS, new-key budgets are charged to the certificate (first DNS SAN, else CN),
    not to the address: two collectors on one address, each with its own certificate, each
    get their own per-sender budget (2 keys), over gRPC and OTLP/HTTP alike."""
    svc = _mtls_service(
        pki, service_factory, bind=False, limits={"new_keys_per_sender_per_hour": 2}
    )
    _grpc_export(svc, pki, "node-a", [Proc(i, f"/cert/a/{i}", host="node-a") for i in (1, 2)])
    _http_export(svc, pki, "node-a", [Proc(3, "/cert/a/3", host="node-a")])
    _http_export(svc, pki, "node-c", [Proc(i, f"/cert/c/{i}", host="node-c") for i in (1, 2)])
    _grpc_export(svc, pki, "node-c", [Proc(3, "/cert/c/3", host="node-c")])
    assert len(_keys(svc, "/cert/a/*")) == 2
    assert len(_keys(svc, "/cert/c/*")) == 2


def test_peer_address_without_port_is_the_sender(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """Without mTLS the sender is the peer's IP address without the port: new connections
    (new source ports) and the other receiver do not bring a fresh per-sender budget."""
    svc = service_factory(
        tmp_path / "data", {"limits": {"new_keys_per_sender_per_hour": 2}}
    ).start()
    for n in range(2):  # two gRPC connections
        with grpc.insecure_channel(
            f"127.0.0.1:{svc.grpc_port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as ch:
            ch.unary_unary(EXPORT)(
                process_request([Proc(n, f"/peer/{n}")], now_ms()).SerializeToString(),
                timeout=10,
            )
    conn = http.client.HTTPConnection("127.0.0.1", svc.otlp_http_port, timeout=10)
    try:
        conn.request("POST", "/v1/metrics",
                     process_request([Proc(5, "/peer/5")], now_ms()).SerializeToString(),
                     {"Content-Type": "application/x-protobuf"})  # fmt: skip
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert len(_keys(svc, "/peer/*")) == 2


def test_identity_parsing() -> None:
    """gRPC peer strings lose their port (IPv4, IPv6 bracketed or %-escaped); certificates
    give their first DNS SAN, else their CN; the host filter matches SANs and CN exactly."""
    from pathwatch.receiver._identity import (
        CertificateIdentity,
        grpc_identity,
        peer_address,
        sender_of,
        tls_identity,
    )

    assert peer_address("ipv4:10.0.0.5:43122") == "10.0.0.5"
    assert peer_address("ipv6:[::1]:5000") == "::1"
    assert peer_address("ipv6:%5B::1%5D:55420") == "::1"
    assert peer_address("unix:/run/p.sock") == "unix:/run/p.sock"
    auth = {"x509_pem_cert": [b"..."], "peer_dns": [b"node-a", b"node-a.lan"],
            "x509_common_name": [b"collector"]}  # fmt: skip
    identity = grpc_identity(auth)
    assert identity == CertificateIdentity(("node-a", "node-a.lan"), "collector")
    assert grpc_identity({}) is None
    assert sender_of(identity, "10.0.0.5") == "node-a"
    assert sender_of(CertificateIdentity((), "node-c"), "10.0.0.5") == "node-c"
    assert sender_of(None, "10.0.0.5") == "10.0.0.5"
    cert = {"subject": ((("commonName", "node-c"),),), "subjectAltName": (("IP Address", "1"),)}
    assert tls_identity(cert) == CertificateIdentity((), "node-c")
    accepts = identity.host_filter() if identity else None
    assert accepts is not None
    assert accepts("node-a") and accepts("NODE-A.lan") and accepts("collector")
    assert not accepts("node-b") and not accepts("node-a.lan.evil")
    assert not CertificateIdentity(("*.lan",), None).host_filter()("x.lan")
