"""Caller identity: the sidecar's XFCC header in sidecar mode only, and the server's own mutual TLS."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import grpc
import pytest

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from meshrpc import testing
from meshrpc._caller import parse_xfcc
from tests.apps import sync_echo
from tests.sidecar import StandIn

# What an Istio sidecar forwards (APPEND_FORWARD): an element the caller forged, then its own.
XFCC = (
    "By=spiffe://cluster.local/ns/evil/sa/x;URI=spiffe://cluster.local/ns/shop/sa/admin,"
    'By=spiffe://cluster.local/ns/shop/sa/payments;Hash=4f1c;Subject="";'
    "URI=spiffe://cluster.local/ns/shop/sa/checkout"
)


class WhoCalls(echo_pb2_grpc.EchoServicer):
    async def Unary(self, request: Any, context: Any) -> echo_pb2.EchoReply:
        who = meshrpc.caller()
        if who is None:
            return echo_pb2.EchoReply(text="nobody")
        return echo_pb2.EchoReply(text=f"{who.source} {who.spiffe_id} {who.namespace} {who.service_account}")


app = meshrpc.App("who", services=[WhoCalls()])


async def ask(channel: grpc.aio.Channel, metadata: Any = None) -> str:
    reply = await echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(), metadata=metadata)
    return reply.text


async def test_sidecar_mode_trusts_the_last_xfcc_element_only() -> None:
    with StandIn(ready_status=200) as sidecar:
        async with testing.serve(app, mesh="istio-sidecar", sidecar_ready_url=sidecar.ready_url) as channel:
            assert await ask(channel, (("x-forwarded-client-cert", XFCC),)) == (
                "mesh spiffe://cluster.local/ns/shop/sa/checkout shop checkout"
            )
            assert await ask(channel) == "nobody"  # a plaintext peer: the sidecar sends no header
            assert await ask(channel, (("x-forwarded-client-cert", 'URI="unterminated'),)) == "nobody"


async def test_def_handlers_see_the_caller_too() -> None:
    with StandIn(ready_status=200) as sidecar:
        async with testing.serve(sync_echo.app, mesh="istio-sidecar", sidecar_ready_url=sidecar.ready_url) as channel:
            reply = await echo_pb2_grpc.EchoStub(channel).Unary(
                echo_pb2.EchoRequest(text="caller"), metadata=(("x-forwarded-client-cert", XFCC),)
            )
    assert reply.text == "spiffe://cluster.local/ns/shop/sa/checkout"


async def test_without_a_mesh_the_header_is_anyone_s_and_ignored() -> None:
    async with testing.serve(app, mesh="none") as channel:
        assert await ask(channel, (("x-forwarded-client-cert", XFCC),)) == "nobody"


def test_caller_outside_a_handler_is_none() -> None:
    assert meshrpc.caller() is None


def test_caller_principal_is_istio_s_form() -> None:
    caller = meshrpc.Caller(spiffe_id="spiffe://cluster.local/ns/shop/sa/checkout", source="mesh")
    assert caller.principal == "cluster.local/ns/shop/sa/checkout"
    assert (caller.trust_domain, caller.namespace, caller.service_account) == ("cluster.local", "shop", "checkout")
    odd = meshrpc.Caller(spiffe_id="spiffe://example.org/workload/7", source="tls")
    assert (odd.trust_domain, odd.namespace, odd.service_account) == ("example.org", None, None)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("By=a;URI=b", [[("by", "a"), ("uri", "b")]]),
        ('Hash="x,y;z=\\"q\\"";DNS=d', [[("hash", 'x,y;z="q"'), ("dns", "d")]]),
        ("URI=a,URI=b", [[("uri", "a")], [("uri", "b")]]),
        ("no-equals-sign", []),
        ('URI="open', []),
        ("URI=a;junk", []),
    ],
)
def test_parse_xfcc(header: str, expected: list[list[tuple[str, str]]]) -> None:
    assert parse_xfcc(header) == expected


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate with a SPIFFE id."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
             "-subj", "/CN=test-ca", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1"), ("client", "URI:spiffe://example.org/ns/shop/sa/checkout")):
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d


async def test_mutual_tls_gives_the_client_certificate_s_identity(pki: Path) -> None:
    settings = {
        "tls_cert_file": str(pki / "server.pem"),
        "tls_key_file": str(pki / "server.key"),
        "tls_client_ca_file": str(pki / "ca.pem"),
    }
    async with testing.running(app, **settings) as server:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(pki / "ca.pem").read_bytes(),
            private_key=(pki / "client.key").read_bytes(),
            certificate_chain=(pki / "client.pem").read_bytes(),
        )
        async with grpc.aio.secure_channel(server.target, credentials) as channel:
            assert await ask(channel) == "tls spiffe://example.org/ns/shop/sa/checkout shop checkout"
        without_cert = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(server.target, without_cert) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await ask(channel)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake is refused


async def test_tls_without_client_certificates_vouches_for_nobody(pki: Path) -> None:
    settings = {"tls_cert_file": str(pki / "server.pem"), "tls_key_file": str(pki / "server.key")}
    async with testing.running(app, **settings) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
        async with grpc.aio.secure_channel(server.target, credentials) as channel:
            assert await ask(channel) == "nobody"


def test_tls_settings_go_together(tmp_path: Path) -> None:
    with pytest.raises(meshrpc.ConfigError, match="set both or neither"):
        meshrpc.Config(tls_cert_file="cert.pem")
    with pytest.raises(meshrpc.ConfigError, match="need the server's own TLS"):
        meshrpc.Config(tls_client_ca_file="ca.pem")


async def test_an_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    with pytest.raises(meshrpc.ConfigError, match=r"tls_cert_file .*: cannot read .*nope\.pem"):
        async with testing.running(app, tls_cert_file=missing, tls_key_file=missing):
            pass
