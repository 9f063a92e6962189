"""What an adversarial client or a broken dependency can do to a ``meshrpc serve`` process.

Each test sends the real bytes (raw HTTP/2 frames where grpc's clients refuse to) or
real signals to a real server process on 127.0.0.1.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from examples._generated.echo import echo_pb2, echo_pb2_grpc
from tests.h2client import RawClient
from tests.helpers import Served, free_port, health_status
from tests.sidecar import StandIn

ECHO = "tests.apps.echo:app"
FORGED = b"\n2026-11-26T00:00:00.000 ERROR   meshrpc.server: forged line"
HOSTILE_IDS = [
    b"00-" + b"a" * 32 + FORGED + b"-" + b"b" * 16 + b"-01",  # traceparent with a newline
    b"\x1b[31mred\x1b[0m",  # ANSI escapes
    b"abc trace_id=0af7651916cd43dd8448eb211c80319c level=ERROR",  # fake key=value pairs
    b"f" * 6000,  # 6 KB
]


def stopped(served: Served) -> str:
    served.signal(signal.SIGTERM)
    assert served.wait(15) == 0, served.log
    return served.log


@pytest.mark.parametrize("access_log", ["text", "json"])
def test_client_text_never_forges_a_log_line(access_log: str) -> None:
    with Served(ECHO, "--drain-delay", "0", "--access-log", access_log) as served:
        served.wait_serving()
        client = RawClient(served.port)
        try:
            for value in HOSTILE_IDS:
                for header in (b"traceparent", b"x-b3-traceid", b"b3"):
                    body = echo_pb2.EchoRequest(text="log").SerializeToString()  # the handler logs a line
                    trailers = client.wait(client.open("/echo.Echo/Unary", [(header, value)], body))
                    assert trailers.get(b"grpc-status") == b"0"
            # A well-formed id still reaches the log, so the filter is not simply off.
            good = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            client.wait(client.open("/echo.Echo/Unary", [(b"traceparent", good)], body))
        finally:
            client.close()
        log = stopped(served)
    lines = log.splitlines()
    assert not any(line.startswith("2026-11-26T00:00:00.000") for line in lines)  # no forged line
    assert "forged line" not in log and "\x1b" not in log and "f" * 100 not in log
    assert "trace_id=0af7651916cd43dd8448eb211c80319c" in log
    assert not any("level=ERROR" in line for line in lines)
    access = [line.split("meshrpc.access: ", 1)[1] for line in lines if "meshrpc.access: " in line]
    assert len(access) == 3 * len(HOSTILE_IDS) + 1
    if access_log == "json":
        assert all(json.loads(line)["method"] == "/echo.Echo/Unary" for line in access)  # one object per line


@pytest.fixture(scope="module")
def echo() -> Iterator[Served]:
    with Served(ECHO, "--drain-delay", "0") as served:
        served.wait_serving()
        yield served


def unary(target: str, **fields: object) -> grpc.RpcError | echo_pb2.EchoReply:
    with grpc.insecure_channel(target) as channel:
        try:
            return echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(**fields), timeout=5)  # type: ignore[arg-type]
        except grpc.RpcError as exc:
            return exc


@pytest.mark.parametrize("returned", ["none", "dict", "str"])
def test_a_reply_of_the_wrong_type_is_internal_without_internals(echo: Served, returned: str) -> None:
    error = unary(echo.target, fail=f"return-{returned}")
    assert isinstance(error, grpc.RpcError)
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "Internal server error")  # type: ignore[attr-defined]
    kind = {"none": "NoneType", "dict": "dict", "str": "str"}[returned]
    assert f"/echo.Echo/Unary returned {kind} instead of a echo.EchoReply" in echo.log


def test_a_stream_yielding_none_is_internal(echo: Served) -> None:
    with grpc.insecure_channel(echo.target) as channel:
        replies = echo_pb2_grpc.EchoStub(channel).ServerStream(
            echo_pb2.EchoRequest(text="x", count=3, fail="yield-none"), timeout=5
        )
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for reply in replies:
                received.append(reply.text)
    assert received == ["x"]
    assert (info.value.code(), info.value.details()) == (grpc.StatusCode.INTERNAL, "Internal server error")  # type: ignore[attr-defined]
    assert "SerializeToString" not in info.value.details()  # type: ignore[attr-defined]


@pytest.mark.parametrize("raised", ["exit", "interrupt"])
def test_systemexit_in_a_handler_is_a_handler_bug_not_a_crash(echo: Served, raised: str) -> None:
    error = unary(echo.target, fail=raised)
    assert isinstance(error, grpc.RpcError)
    assert (error.code(), error.details()) == (grpc.StatusCode.INTERNAL, "Internal server error")  # type: ignore[attr-defined]
    assert echo.proc.poll() is None  # still running
    assert unary(echo.target, text="after").text == "after"  # type: ignore[union-attr]
    name = {"exit": "SystemExit: 3", "interrupt": "KeyboardInterrupt"}[raised]
    assert name in echo.log and "unhandled exception in /echo.Echo/Unary" in echo.log


def garbage(target: str, path: str, streaming: bool) -> grpc.RpcError:
    with grpc.insecure_channel(target) as channel:
        try:
            if streaming:
                list(channel.stream_stream(path)(iter([b"\xff\xff\xff\xff"]), timeout=5))
            else:
                channel.unary_unary(path)(b"\xff\xff\xff\xff", timeout=5)
        except grpc.RpcError as exc:
            return exc
    raise AssertionError(f"{path} accepted garbage")


@pytest.mark.parametrize(
    ("path", "streaming"),
    [
        ("/grpc.health.v1.Health/Check", False),
        ("/grpc.health.v1.Health/Watch", False),
        ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", True),
        ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", True),
    ],
)
def test_garbage_to_health_and_reflection_is_invalid_argument_and_quiet(
    echo: Served, path: str, streaming: bool
) -> None:
    before = len(echo.log)
    for _ in range(20):
        error = garbage(echo.target, path, streaming)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()  # type: ignore[attr-defined]
        assert "DecodeError" not in (error.details() or "")  # type: ignore[attr-defined]
    assert len(echo.log) - before < 200  # not a traceback (about 730 bytes) per request


def test_liveness_answers_while_stalled_clients_hold_the_limit() -> None:
    with Served(ECHO, "--drain-delay", "0", "--max-concurrent-rpcs", "2") as served:
        served.wait_serving()
        client = RawClient(served.port)
        try:
            # Two header-only client streams that never send a message, and slow calls behind them.
            for _ in range(2):
                client.open("/echo.Echo/ClientStream")
            for _ in range(10):
                client.open("/echo.Echo/Unary")  # headers only: no request ever arrives
            time.sleep(0.3)
            for name in ("liveness", "", "echo.Echo"):
                assert health_status(served.target, name, timeout=2) == "SERVING"
            error = unary(served.target, text="one too many")
            assert isinstance(error, grpc.RpcError)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "limit of 2 concurrent RPCs" in error.details()  # type: ignore[attr-defined]
        finally:
            client.close()
        time.sleep(0.3)
        assert unary(served.target, text="free again").text == "free again"  # type: ignore[union-attr]
        stopped(served)


def wait_for(served: Served, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in served.log:
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{served.log}"
        assert served.proc.poll() is None, served.log
        time.sleep(0.02)


def test_second_signal_cuts_a_long_lifespan_shutdown() -> None:
    with Served(ECHO, "--drain-delay", "0", "--shutdown-timeout", "60", env={"ECHO_SLOW_SHUTDOWN": "30"}) as served:
        served.wait_serving()
        served.signal(signal.SIGTERM)
        wait_for(served, "lifespan shutdown")
        time.sleep(0.2)
        sent = time.monotonic()
        served.signal(signal.SIGTERM)
        code = served.wait(10)
        took = time.monotonic() - sent
    assert code == 1
    assert took < 1.5, took
    assert "lifespan shutdown of app echo cut short by a second signal" in served.log


def test_lifespan_shutdown_is_bounded_by_its_timeout() -> None:
    with Served(ECHO, "--drain-delay", "0", "--shutdown-timeout", "0.5", env={"ECHO_SLOW_SHUTDOWN": "30"}) as served:
        served.wait_serving()
        sent = time.monotonic()
        served.signal(signal.SIGTERM)
        code = served.wait(10)
        took = time.monotonic() - sent
    assert code == 1 and took < 3, took
    assert "lifespan shutdown of app echo cut short by its 0.5s timeout" in served.log


def test_a_check_stuck_in_a_thread_does_not_keep_the_process_alive() -> None:
    args = ("--drain-delay", "0", "--grace", "1", "--health-check-timeout", "0.2", "--health-check-interval", "0.2")
    with Served(ECHO, *args, env={"ECHO_STUCK_THREAD": "60"}) as served:
        wait_for(served, "serving app echo")
        wait_for(served, "readiness check stuck-in-a-thread fails: timed out after 0.2s")
        assert health_status(served.target) == "NOT_SERVING"
        sent = time.monotonic()
        served.signal(signal.SIGTERM)
        code = served.wait(15)
        took = time.monotonic() - sent
    assert took < 0 + 1 + 4 + 3, took  # drain delay + grace + shutdown timeout + a few seconds
    assert code == 1  # the drain was clean, but work was abandoned at exit: configuration.md's promise
    assert "abandoned: thread asyncio_0" in served.log, served.log
    assert "shutdown complete, exit code 1" in served.log


class Babbler:
    """A TCP server on 127.0.0.1 that answers every connection with 100 KiB and no newline."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(b"A" * 100 * 1024)
                except OSError:
                    pass

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz/ready"

    def close(self) -> None:
        self.sock.close()


def test_a_long_reply_on_the_sidecar_port_is_no_sidecar_in_auto_mode(tmp_path: Path) -> None:
    babbler = Babbler()
    try:
        env = {
            "MESHRPC_MESH": "auto",
            "MESHRPC_POD_ANNOTATIONS_PATH": str(tmp_path / "none"),
            "MESHRPC_SIDECAR_READY_URL": babbler.url,
        }
        with Served(ECHO, "--drain-delay", "0", env=env) as served:
            served.wait_serving()
            log = stopped(served)
        assert "mesh mode none" in log and "not an HTTP answer" in log
        assert "Traceback" not in log
        sidecar_env = {**env, "MESHRPC_MESH": "istio-sidecar", "MESHRPC_SIDECAR_READY_TIMEOUT": "1"}
        with Served(ECHO, "--drain-delay", "0", env=sidecar_env) as waiting:
            code = waiting.wait(15)
        assert code == 1
        assert "the Istio sidecar was not ready after 1s" in waiting.log and "not an HTTP answer" in waiting.log
        assert "Traceback" not in waiting.log
    finally:
        babbler.close()


def test_one_broken_annotation_line_does_not_hide_the_sidecar(tmp_path: Path) -> None:
    annotations = tmp_path / "annotations"
    annotations.write_text('sidecar.istio.io/status="{\\"containers\\":[\\"istio-proxy\\"]}"\nthis line is broken\n')
    with StandIn(ready_status=503) as sidecar:
        env = {
            "MESHRPC_MESH": "auto",
            "MESHRPC_POD_ANNOTATIONS_PATH": str(annotations),
            "MESHRPC_SIDECAR_READY_URL": sidecar.ready_url,
        }
        with Served(ECHO, "--drain-delay", "0", env=env) as served:
            wait_for(served, "serving app echo")
            time.sleep(0.3)
            assert health_status(served.target) == "NOT_SERVING"  # waits for the sidecar
            sidecar.ready_status = 200
            served.wait_serving()
            log = stopped(served)
    assert "mesh mode istio-sidecar" in log
    assert 'skipping line 2 is not key="value"' in log
    assert "no annotations file" not in log


def test_unused_port_probe_is_quick() -> None:
    """Nothing on the sidecar port (the usual case without a mesh) costs no startup time."""
    env = {"MESHRPC_MESH": "auto", "MESHRPC_SIDECAR_READY_URL": f"http://127.0.0.1:{free_port()}/healthz/ready"}
    started = time.monotonic()
    with Served(ECHO, "--drain-delay", "0", env=env) as served:
        served.wait_serving()
        assert time.monotonic() - started < 10
        stopped(served)
