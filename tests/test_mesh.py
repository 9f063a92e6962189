"""Mesh awareness: mode detection, waiting for the sidecar, quitting it, connection ageing."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from meshrpc import _mesh, testing
from tests.apps.echo import Echo
from tests.envoy import Envoy, sidecar_status_config
from tests.helpers import Served, free_port, health_status
from tests.sidecar import StandIn

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

SIDECAR_ANNOTATIONS = (
    'kubectl.kubernetes.io/default-container="app"\n'
    'proxy.istio.io/config="holdApplicationUntilProxyStarts: true\\n"\n'
    'sidecar.istio.io/status="{\\"initContainers\\":[\\"istio-init\\"],\\"containers\\":[\\"istio-proxy\\"]}"\n'
)
AMBIENT_ANNOTATIONS = 'ambient.istio.io/redirection="enabled"\n'
PLAIN_ANNOTATIONS = 'kubernetes.io/config.seen="2026-11-25T10:00:00Z"\n'


def config(tmp_path: Path, text: str | None, **changes: object) -> meshrpc.Config:
    path = tmp_path / "annotations"
    if text is not None:
        path.write_text(text)
    nowhere = f"http://127.0.0.1:{free_port()}/healthz/ready"
    return meshrpc.Config(pod_annotations_path=str(path), sidecar_ready_url=nowhere, **changes)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        (SIDECAR_ANNOTATIONS, "istio-sidecar"),
        (AMBIENT_ANNOTATIONS, "ambient"),
        (PLAIN_ANNOTATIONS, "none"),
        ("", "none"),
    ],
    ids=["sidecar", "ambient", "plain", "empty"],
)
async def test_auto_mode_from_annotations(tmp_path: Path, text: str, mode: str) -> None:
    info = await _mesh.detect(config(tmp_path, text))
    assert info.mode == mode
    assert str(tmp_path / "annotations") in info.reason


async def test_malformed_annotations_warn_and_fall_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="meshrpc.mesh"):
        info = await _mesh.detect(config(tmp_path, "this is not key=value\x00\n"))
    assert info.mode == "none"
    assert 'skipping line 1 is not key="value"' in caplog.text


async def test_one_broken_annotation_line_keeps_the_valid_ones(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = SIDECAR_ANNOTATIONS + "broken line without a value\n" + 'other="\\x"\n'
    with caplog.at_level(logging.WARNING, logger="meshrpc.mesh"):
        info = await _mesh.detect(config(tmp_path, text))
    assert info.mode == "istio-sidecar"  # the sidecar's annotation still counts
    assert "annotation sidecar.istio.io/status" in info.reason
    assert 'skipping line 4 is not key="value"' in caplog.text
    assert "skipping line 5 has a bad escape" in caplog.text
    assert "no annotations file" not in caplog.text


async def test_no_file_probes_the_sidecar(tmp_path: Path) -> None:
    assert (await _mesh.detect(config(tmp_path, None))).mode == "none"
    with StandIn(ready_status=503) as sidecar:
        cfg = config(tmp_path, None).replace(sidecar_ready_url=sidecar.ready_url)
        info = await _mesh.detect(cfg)
    assert info.mode == "istio-sidecar" and "answers HTTP 503" in info.reason  # a sidecar that is starting
    with StandIn(ready_status=404) as other:
        info = await _mesh.detect(config(tmp_path, None).replace(sidecar_ready_url=other.ready_url))
    assert info.mode == "none" and "answers HTTP 404" in info.reason  # something else on that port


async def test_explicit_mode_wins(tmp_path: Path) -> None:
    info = await _mesh.detect(config(tmp_path, SIDECAR_ANNOTATIONS, mesh="none"))
    assert (info.mode, info.reason) == ("none", "set by configuration (mesh=none)")


async def watch_statuses(channel: grpc.aio.Channel, service: str, seen: list[int]) -> None:
    async for reply in health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=service)):
        seen.append(reply.status)


async def test_readiness_waits_for_the_sidecar() -> None:
    with StandIn(ready_status=503) as sidecar:
        app = meshrpc.App("sidecar-wait", services=[Echo()])
        server_task = asyncio.ensure_future(
            app.serve(
                meshrpc.Config(
                    host="127.0.0.1", port=0, mesh="istio-sidecar", sidecar_ready_url=sidecar.ready_url, drain_delay=0
                )
            )
        )
        for _ in range(200):
            if app.server is not None and app.server.port:
                break
            await asyncio.sleep(0.01)
        assert app.server is not None
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as channel:
            await asyncio.sleep(0.3)
            readiness: list[int] = []
            liveness: list[int] = []
            watchers = [
                asyncio.ensure_future(watch_statuses(channel, "", readiness)),
                asyncio.ensure_future(watch_statuses(channel, "liveness", liveness)),
            ]
            await asyncio.sleep(0.5)
            assert readiness == [NOT_SERVING] and liveness == [SERVING]
            assert sum(r == "GET /healthz/ready" for r in sidecar.requests) >= 2
            sidecar.ready_status = 200
            for _ in range(100):
                if readiness[-1:] == [SERVING]:
                    break
                await asyncio.sleep(0.05)
            assert readiness == [NOT_SERVING, SERVING]
            app.stop()
            assert await server_task == 0
            await asyncio.gather(*watchers, return_exceptions=True)


async def test_lifespan_can_await_the_sidecar() -> None:
    order: list[str] = []
    with StandIn(ready_status=503) as sidecar:

        @contextlib.asynccontextmanager
        async def lifespan(app: meshrpc.App) -> AsyncIterator[None]:
            order.append("lifespan waits")
            await app.wait_for_proxy()
            order.append("proxy ready")
            yield

        app = meshrpc.App("lifespan-wait", services=[Echo()], lifespan=lifespan)

        async def make_ready() -> None:
            await asyncio.sleep(0.5)
            order.append("sidecar up")
            sidecar.ready_status = 200

        helper = asyncio.ensure_future(make_ready())
        async with testing.running(app, mesh="istio-sidecar", sidecar_ready_url=sidecar.ready_url) as server:
            assert await health_pb2_grpc.HealthStub(server.channel).Check(health_pb2.HealthCheckRequest())
        await helper
    assert order == ["lifespan waits", "sidecar up", "proxy ready"]


def test_sidecar_timeout_exits_nonzero_with_the_reason(tmp_path: Path) -> None:
    with (
        StandIn(ready_status=503) as sidecar,
        Served(
            "tests.apps.echo:app",
            "--sidecar-ready-timeout",
            "1.5",
            env={"MESHRPC_MESH": "istio-sidecar", "MESHRPC_SIDECAR_READY_URL": sidecar.ready_url},
        ) as served,
    ):
        code = served.wait(20)
    assert code == 1
    assert "mesh mode istio-sidecar (set by configuration (mesh=istio-sidecar))" in served.log
    assert f"the Istio sidecar was not ready after 1.5s: GET {sidecar.ready_url}" in served.log
    assert "last answer: HTTP 503" in served.log


def test_readiness_follows_a_real_envoy(tmp_path: Path) -> None:
    status_port, admin_port = free_port(), free_port()
    url = f"http://127.0.0.1:{status_port}/healthz/ready"
    with Served(
        "tests.apps.echo:app", env={"MESHRPC_MESH": "istio-sidecar", "MESHRPC_SIDECAR_READY_URL": url}
    ) as served:
        deadline = time.monotonic() + 15
        while health_status(served.target, "liveness") != "SERVING":
            assert time.monotonic() < deadline, served.log
            time.sleep(0.05)
        time.sleep(1.0)
        assert health_status(served.target) == "NOT_SERVING"  # no Envoy yet
        envoy = Envoy(sidecar_status_config(status_port, admin_port), tmp_path, admin_port)
        try:
            envoy.wait_ready()
            started = time.monotonic()
            served.wait_serving(timeout=10)
            assert time.monotonic() - started < 3
        finally:
            envoy.close()
    assert "sidecar ready after" in served.log


async def test_quit_sidecar_posts_quitquitquit() -> None:
    with StandIn() as sidecar:
        assert await meshrpc.quit_sidecar(sidecar.quit_url) is True
    assert sidecar.requests == ["POST /quitquitquit"]
    assert await meshrpc.quit_sidecar(f"http://127.0.0.1:{free_port()}/quitquitquit", timeout=1) is False


async def test_drain_never_quits_the_sidecar() -> None:
    with StandIn(ready_status=200) as sidecar:
        async with testing.running(
            meshrpc.App("no-quit", services=[Echo()]), mesh="istio-sidecar", sidecar_ready_url=sidecar.ready_url
        ) as server:
            await server.stop()
    assert not any(r.startswith("POST") for r in sidecar.requests)


def test_connection_age_defaults() -> None:
    config = meshrpc.Config()
    assert _mesh.connection_age(config, "none") == 300.0
    assert _mesh.connection_age(config, "ambient") == 300.0
    assert _mesh.connection_age(config, "istio-sidecar") is None
    assert _mesh.connection_age(config.replace(max_connection_age=60), "istio-sidecar") == 60


async def test_connection_ageing_without_mesh_moves_clients_without_errors() -> None:
    app = meshrpc.App("ageing", services=[Echo()])
    async with testing.running(app, mesh="none", max_connection_age=0.5, max_connection_age_grace=1) as server:
        stub = echo_pb2_grpc.EchoStub(server.channel)
        peers = set()
        end = time.monotonic() + 3
        calls = 0
        while time.monotonic() < end:
            reply = await stub.Unary(echo_pb2.EchoRequest(text="x"), timeout=5)
            peers.add(reply.peer)
            calls += 1
            await asyncio.sleep(0.01)
    # The server sent GOAWAY after the age: the client reconnected (new source ports),
    # and not one call failed on the way.
    assert len(peers) >= 3, peers
    assert calls > 50


def test_serve_logs_the_mode(tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    annotations.write_text(AMBIENT_ANNOTATIONS)
    with Served(
        "tests.apps.echo:app", env={"MESHRPC_MESH": "auto", "MESHRPC_POD_ANNOTATIONS_PATH": str(annotations)}
    ) as served:
        served.wait_serving()
    assert "mesh mode ambient (annotation ambient.istio.io/redirection=enabled in" in served.log
