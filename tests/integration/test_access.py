"""Access: bearer tokens and TLS/mTLS on the OTLP receiver and the admin API."""

from __future__ import annotations

import shutil
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as ms

from tests.support import EXPORT, Proc, ServiceProcess, export, process_request, wait_until

pytestmark = pytest.mark.integration

TOKEN = "s3cr3t-ingest-token"
API_TOKEN = "another-token-for-the-api"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_receiver_bearer_token(tmp_path: Path, service_factory: type[ServiceProcess]) -> None:
    """Without the token, or with a wrong one, Export is UNAUTHENTICATED; with it, accepted.
    The token never appears in the logs."""
    svc = service_factory(
        tmp_path / "data",
        {"receiver": {"grpc": {"listen": "127.0.0.1:0",
                               "auth": {"bearer_token_env": "PATHWATCH_INGEST_TOKEN"}}}},
        env={"PATHWATCH_INGEST_TOKEN": TOKEN},
    ).start()  # fmt: skip
    request = process_request([Proc(1, "/bin/a")], now_ms())
    with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
        call = ch.unary_unary(
            EXPORT,
            request_serializer=ms.ExportMetricsServiceRequest.SerializeToString,
            response_deserializer=ms.ExportMetricsServiceResponse.FromString,
        )
        for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)]):
            with pytest.raises(grpc.RpcError) as err:
                call(request, metadata=metadata, timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        call(request, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=5)
    svc.stop()
    assert not any(TOKEN in line for line in svc.lines)


def _get(url: str, token: str | None = None, ctx: ssl.SSLContext | None = None) -> int:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10, context=ctx) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_api_bearer_token_leaves_probes_open(
    tmp_path: Path, service_factory: type[ServiceProcess]
) -> None:
    """/api/ needs the token (401 with WWW-Authenticate otherwise); /healthz, /readyz and
    /metrics stay open; with protect_probes they need it too."""
    token_file = tmp_path / "api-token"
    token_file.write_text(API_TOKEN + "\n")
    svc = service_factory(
        tmp_path / "data",
        {"http": {"listen": "127.0.0.1:0", "auth": {"bearer_token_file": str(token_file)}}},
    ).start()
    base = f"http://127.0.0.1:{svc.http_port}"
    assert _get(base + "/api/v1/rules") == 401
    assert _get(base + "/api/v1/rules", "wrong") == 401
    assert _get(base + "/api/v1/rules", API_TOKEN) == 200
    for probe in ("/healthz", "/readyz", "/metrics"):
        assert _get(base + probe) == 200
    try:
        urllib.request.urlopen(base + "/api/v1/alerts", timeout=5)
    except urllib.error.HTTPError as exc:
        assert exc.headers["WWW-Authenticate"].startswith("Bearer")
    # rotation: a new token in the file is picked up without a restart
    token_file.write_text("rotated-token\n")
    time.sleep(1.1)
    assert _get(base + "/api/v1/rules", "rotated-token") == 200
    assert _get(base + "/api/v1/rules", API_TOKEN) == 401
    svc.stop()

    svc2 = service_factory(
        tmp_path / "data2",
        {"http": {"listen": "127.0.0.1:0", "protect_probes": True,
                  "auth": {"bearer_token": API_TOKEN}}},
    ).start()  # fmt: skip
    base = f"http://127.0.0.1:{svc2.http_port}"
    assert _get(base + "/metrics") == 401
    assert _get(base + "/metrics", API_TOKEN) == 200


def _reload_failures(svc: ServiceProcess, listener: str) -> float:
    _, text = svc.api("GET", "/metrics")
    for line in str(text).splitlines():
        if line.startswith(f'pathwatch_token_reload_failures_total{{listener="{listener}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_broken_token_file_keeps_the_last_good_token_and_says_so(
    tmp_path: Path, service_factory: type[ServiceProcess], damage: str
) -> None:
    """A receiver token file that is deleted or emptied leaves the last good token in force
    (the receiver is neither locked nor opened), logs a warning naming the file and counts
    pathwatch_token_reload_failures_total{listener}; a file rewritten with a new token then
    takes effect and the old token stops working."""
    token_file = tmp_path / "ingest-token"
    token_file.write_text(TOKEN + "\n")
    svc = service_factory(
        tmp_path / "data",
        {"receiver": {"grpc": {"listen": "127.0.0.1:0",
                               "auth": {"bearer_token_file": str(token_file)}}}},
    ).start()  # fmt: skip
    request = process_request([Proc(1, "/bin/a")], now_ms())

    def status(token: str) -> grpc.StatusCode:
        with grpc.insecure_channel(f"127.0.0.1:{svc.grpc_port}") as ch:
            call = ch.unary_unary(
                EXPORT,
                request_serializer=ms.ExportMetricsServiceRequest.SerializeToString,
                response_deserializer=ms.ExportMetricsServiceResponse.FromString,
            )
            try:
                call(request, metadata=[("authorization", f"Bearer {token}")], timeout=5)
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]
            return grpc.StatusCode.OK

    assert status(TOKEN) == grpc.StatusCode.OK
    if damage == "deleted":
        token_file.unlink()
    else:
        token_file.write_text("")
    # The file is looked at again (at most once a second) when a request comes in.
    wait_until(lambda: status(TOKEN) == grpc.StatusCode.OK
               and _reload_failures(svc, "receiver.grpc") >= 1, timeout=10)  # fmt: skip
    assert status("") == grpc.StatusCode.UNAUTHENTICATED
    warnings = [line for line in svc.lines if "keeping the last good token" in line]
    assert warnings and str(token_file) in warnings[0]
    assert '"level": "warning"' in warnings[0]

    token_file.write_text("rotated-ingest-token\n")
    wait_until(lambda: status("rotated-ingest-token") == grpc.StatusCode.OK, timeout=10)
    assert status(TOKEN) == grpc.StatusCode.UNAUTHENTICATED
    assert _reload_failures(svc, "receiver.grpc") == 1
    assert not any("rotated-ingest-token" in line or TOKEN in line for line in svc.lines)


def _write_pair(cert: trustme.LeafCert, directory: Path, name: str) -> tuple[Path, Path]:
    c, k = directory / f"{name}.pem", directory / f"{name}.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(c))
    cert.private_key_pem.write_to_path(str(k))
    return c, k


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    server_cert, server_key = _write_pair(
        ca.issue_cert("127.0.0.1", "localhost"), tmp_path, "server"
    )
    client_cert, client_key = _write_pair(
        ca.issue_cert("collector", common_name="collector"), tmp_path, "client"
    )
    return {"ca": ca, "ca_file": ca_file, "cert": server_cert, "key": server_key,
            "client_cert": client_cert, "client_key": client_key, "dir": tmp_path}  # fmt: skip


def test_grpc_mtls_and_certificate_reload(
    pki: dict[str, Any], service_factory: type[ServiceProcess]
) -> None:
    """The receiver speaks TLS and requires a client certificate from the CA; a rotated
    server certificate is served to new connections without a restart."""
    tls = {"cert_file": str(pki["cert"]), "key_file": str(pki["key"]),
           "client_ca_file": str(pki["ca_file"])}  # fmt: skip
    svc = service_factory(
        pki["dir"] / "data", {"receiver": {"grpc": {"listen": "127.0.0.1:0", "tls": tls}}}
    ).start()
    root = pki["ca_file"].read_bytes()
    request = process_request([Proc(1, "/bin/a")], now_ms())

    def send(with_client_cert: bool) -> grpc.StatusCode:
        creds = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=pki["client_key"].read_bytes() if with_client_cert else None,
            certificate_chain=pki["client_cert"].read_bytes() if with_client_cert else None,
        )
        with grpc.secure_channel(
            f"127.0.0.1:{svc.grpc_port}",
            creds,
            options=[("grpc.ssl_target_name_override", "localhost")],
        ) as ch:
            call = ch.unary_unary(
                EXPORT,
                request_serializer=ms.ExportMetricsServiceRequest.SerializeToString,
                response_deserializer=ms.ExportMetricsServiceResponse.FromString,
            )
            try:
                call(request, timeout=5)
                return grpc.StatusCode.OK
            except grpc.RpcError as exc:
                return exc.code()  # type: ignore[no-any-return]

    assert send(with_client_cert=True) == grpc.StatusCode.OK
    assert send(with_client_cert=False) == grpc.StatusCode.UNAVAILABLE  # handshake refused
    with pytest.raises(grpc.RpcError):
        export(svc.grpc_port, request, timeout=3)  # plaintext is refused

    # Rotate: a certificate from a new CA; new connections must present it.
    ca2 = trustme.CA()
    new_cert, new_key = _write_pair(ca2.issue_cert("127.0.0.1", "localhost"), pki["dir"], "new")
    shutil.copy(new_key, pki["key"])
    shutil.copy(new_cert, pki["cert"])
    time.sleep(1.2)
    root = ca2.cert_pem.bytes()
    assert send(with_client_cert=True) == grpc.StatusCode.OK


def test_https_admin_api_with_reload(
    pki: dict[str, Any], service_factory: type[ServiceProcess]
) -> None:
    """The admin API serves HTTPS with the configured certificate and reloads it on change."""
    tls = {"cert_file": str(pki["cert"]), "key_file": str(pki["key"])}
    svc = service_factory(
        pki["dir"] / "data", {"http": {"listen": "127.0.0.1:0", "tls": tls}}
    ).start()
    ctx = ssl.create_default_context(cafile=str(pki["ca_file"]))
    url = f"https://127.0.0.1:{svc.http_port}/readyz"
    assert _get(url, ctx=ctx) == 200
    with pytest.raises(OSError):  # plain HTTP to the TLS port: the connection is dropped
        urllib.request.urlopen(f"http://127.0.0.1:{svc.http_port}/readyz", timeout=5).read()
    ca2 = trustme.CA()
    new_cert, new_key = _write_pair(ca2.issue_cert("127.0.0.1"), pki["dir"], "new")
    shutil.copy(new_key, pki["key"])
    shutil.copy(new_cert, pki["cert"])
    time.sleep(1.2)
    ctx2 = ssl.create_default_context()
    ca2.configure_trust(ctx2)
    assert _get(url, ctx=ctx2) == 200
    with pytest.raises(urllib.error.URLError):
        _get(url, ctx=ctx)  # the old CA no longer verifies the new certificate


def test_check_config_names_missing_tls_file(tmp_path: Path) -> None:
    """A TLS file that does not exist stops check-config with the setting named."""
    import subprocess
    import sys

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"receiver: {{grpc: {{tls: {{cert_file: {tmp_path}/nope.pem, "
                   f"key_file: {tmp_path}/nope.key}}}}}}\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-m", "pathwatch", "check-config", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 2
    assert "receiver.grpc.tls" in out.stderr and "nope.pem" in out.stderr
