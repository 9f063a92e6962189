"""Hardening, round two: what a hostile client or careless code does to a real ``meshrpc serve``.

Each test drives a real server process on 127.0.0.1 with real clients, raw HTTP/2
frames where grpc's clients refuse to send the bytes, and real signals.
"""

from __future__ import annotations

import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc
from tests.h2client import RawClient
from tests.helpers import Served, free_port, health_status, metrics_text, run
from tests.helpers import meshrpc as meshrpc_cli
from tests.sidecar import StandIn

HOSTILE = "tests.apps.hostile:app"
ECHO = "tests.apps.echo:app"


def call(
    target: str, metadata: tuple[tuple[str, str], ...] = (), **fields: object
) -> grpc.RpcError | echo_pb2.EchoReply:
    with grpc.insecure_channel(target) as channel:
        try:
            return echo_pb2_grpc.EchoStub(channel).Unary(  # type: ignore[no-any-return]
                echo_pb2.EchoRequest(**fields),  # type: ignore[arg-type]
                metadata=metadata,
                timeout=5,
            )
        except grpc.RpcError as exc:
            return exc


def stream(
    target: str, metadata: tuple[tuple[str, str], ...] = (), **fields: object
) -> tuple[list[int], grpc.RpcError | None]:
    received: list[int] = []
    with grpc.insecure_channel(target) as channel:
        try:
            for reply in echo_pb2_grpc.EchoStub(channel).ServerStream(
                echo_pb2.EchoRequest(**fields),  # type: ignore[arg-type]
                metadata=metadata,
                timeout=5,
            ):
                received.append(reply.index)
        except grpc.RpcError as exc:
            return received, exc
    return received, None


def internal_without_internals(result: object) -> None:
    assert isinstance(result, grpc.RpcError), result
    assert (result.code(), result.details()) == (grpc.StatusCode.INTERNAL, "Internal server error")  # type: ignore[attr-defined]


def exits(served: Served, timeout: float = 15.0) -> int:
    served.signal(signal.SIGTERM)
    return served.wait(timeout)


@pytest.fixture(scope="module")
def hostile() -> Iterator[Served]:
    with Served(HOSTILE, "--drain-delay", "0", "--access-log", "text") as served:
        served.wait_serving()
        yield served


# -- 1. a header value that is not UTF-8 ------------------------------------------------


def test_a_header_that_is_not_utf8_is_answered_and_logged_briefly(hostile: Served) -> None:
    """The trace-id log filter read the metadata, grpc logged "Invalid encoding", the filter
    ran again: a RecursionError per request, no answer, megabytes of log, health starved."""
    before = len(hostile.log)
    client = RawClient(hostile.port, timeout=5)
    body = echo_pb2.EchoRequest(text="log").SerializeToString()  # the handler logs a line too
    started = time.monotonic()
    try:
        streams = [client.open("/echo.Echo/Unary", [(b"x-foo", b"caf\xe9")], body) for _ in range(30)]
        statuses = [client.wait(s).get(b"grpc-status") for s in streams]
    finally:
        client.close()
    assert statuses == [b"0"] * 30
    assert time.monotonic() - started < 3
    assert health_status(hostile.target, "liveness") == "SERVING"
    grown = hostile.log[before:]
    assert "RecursionError" not in grown
    assert len(grown) < 30 * 1200, len(grown)  # a few lines per request, not a traceback storm
    assert grown.count("Invalid encoding") <= 30 * 3
    assert "Traceback" not in grown  # grpc's own line about it is kept to one line
    assert grown.count("handling a logged call") == 30


# -- 2 and 6. interceptors --------------------------------------------------------------


@pytest.mark.parametrize("raised", ["raise", "exit", "interrupt", "raise-in-handler"])
def test_what_an_interceptor_raises_is_internal_and_the_server_lives(hostile: Served, raised: str) -> None:
    result = call(hostile.target, (("x-interceptor", raised),), text="hi")
    internal_without_internals(result)
    assert "ICSECRET" not in str(result)
    assert hostile.proc.poll() is None
    assert call(hostile.target, text="after").text == "after"  # type: ignore[union-attr]
    assert "interceptor Raising failed for /echo.Echo/Unary" in hostile.log


# -- 10. middleware misuse ---------------------------------------------------------------


def test_a_middleware_that_never_calls_next_is_named_not_the_handler(hostile: Served) -> None:
    internal_without_internals(call(hostile.target, (("x-middleware", "skip"),), text="hi"))
    received, error = stream(hostile.target, (("x-middleware", "skip"),), text="s", count=3)
    assert received == []
    internal_without_internals(error)  # not OK with no messages
    log = hostile.log
    assert (
        "middleware reads_metadata returned without calling call_next or raising a status for /echo.Echo/Unary" in log
    )
    assert "for /echo.Echo/ServerStream" in log
    assert "/echo.Echo/Unary returned NoneType" not in log


def test_a_second_call_next_is_refused_and_the_handler_runs_once(hostile: Served) -> None:
    received, error = stream(hostile.target, (("x-middleware", "twice"),), text="s", count=3)
    assert received == [0, 1, 2]  # once, not [0, 1, 2, 0, 1, 2]
    internal_without_internals(error)
    internal_without_internals(call(hostile.target, (("x-middleware", "twice"),), text="hi"))
    assert "middleware reads_metadata called call_next twice for /echo.Echo/ServerStream" in hostile.log


# -- 9. error details too large for a trailer --------------------------------------------


def test_details_that_cannot_fit_are_dropped_and_the_status_kept(hostile: Served) -> None:
    result = call(hostile.target, text="details:200")  # about 22 KB of BadRequest
    assert isinstance(result, grpc.RpcError)
    assert (result.code(), result.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "bad fields")  # type: ignore[attr-defined]
    kept = meshrpc.error_details(result)
    assert [type(d).__name__ for d in kept] == ["ErrorInfo"]  # the small one stays; the one too big goes
    assert "/echo.Echo/Unary: 1 of the 2 error details of its INVALID_ARGUMENT are dropped" in hostile.log
    # Details that fit are untouched.
    small = call(hostile.target, text="details:3")
    assert [type(d).__name__ for d in meshrpc.error_details(small)] == ["ErrorInfo", "BadRequest"]  # type: ignore[arg-type]


def test_a_huge_status_message_is_cut_not_turned_into_resource_exhausted(hostile: Served) -> None:
    result = call(hostile.target, text="message:9000")
    assert isinstance(result, grpc.RpcError)
    assert result.code() == grpc.StatusCode.FAILED_PRECONDITION  # type: ignore[attr-defined]
    details = result.details()  # type: ignore[attr-defined]
    assert details.startswith("mmmm") and details.endswith("…") and 1000 < len(details) < 2100
    assert "the status message of its FAILED_PRECONDITION (9000 characters) is cut" in hostile.log


# -- 12. refused calls are observed ---------------------------------------------------------


def test_refused_calls_get_access_log_lines() -> None:
    with Served(HOSTILE, "--drain-delay", "0", "--access-log", "text", "--max-concurrent-rpcs", "1") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            slow = stub.Unary.future(echo_pb2.EchoRequest(text="slow", sleep=1.0), timeout=5)
            time.sleep(0.3)
            refused = call(served.target, text="one too many")
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[union-attr]
            assert slow.result().text == "slow"
            garbage = channel.unary_unary("/echo.Echo/Unary")
            with pytest.raises(grpc.RpcError) as info:
                garbage(b"\xff\xff\xff\xff", timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        exits(served)
    access = [line for line in served.log.splitlines() if "meshrpc.access:" in line]
    statuses = sorted(re.search(r"status=(\w+)", line).group(1) for line in access)  # type: ignore[union-attr]
    assert statuses == ["INVALID_ARGUMENT", "OK", "RESOURCE_EXHAUSTED"], access


# -- 7. exception text written into the log ------------------------------------------------

FORGED = "\n2026-11-26T00:00:00.000 ERROR   meshrpc.server: forged line \x1b[31mred"


def test_exception_text_cannot_forge_a_log_line(hostile: Served) -> None:
    internal_without_internals(call(hostile.target, text=FORGED, fail="crash-text"))
    log = hostile.log
    assert not any(line.startswith("2026-11-26T00:00:00.000") for line in log.splitlines())
    assert "\x1b" not in log
    assert "ValueError: cannot use \\n2026-11-26T00:00:00.000 ERROR   meshrpc.server: forged line \\x1b[31mred" in log


# -- 3. readiness checks that exit -----------------------------------------------------------


@pytest.mark.parametrize(("how", "shown"), [("exit", "SystemExit: 4"), ("interrupt", "KeyboardInterrupt")])
def test_a_check_that_exits_only_fails(how: str, shown: str) -> None:
    args = ("--drain-delay", "0", "--health-check-interval", "0.2")
    with Served(HOSTILE, *args, env={"HOSTILE_CHECK": how}) as served:
        deadline = time.monotonic() + 10
        while "readiness check exits fails" not in served.log:
            assert served.proc.poll() is None, served.log
            assert time.monotonic() < deadline, served.log
            time.sleep(0.05)
        time.sleep(0.5)  # a few more rounds
        assert served.proc.poll() is None
        assert health_status(served.target) == "NOT_SERVING"
        assert health_status(served.target, "liveness") == "SERVING"
        assert exits(served) == 0
    assert f"readiness check exits fails: raised {shown}" in served.log


# -- 4. a stop during a startup that swallows its cancellation -------------------------------


@pytest.mark.parametrize("kind", ["swallow", "stuck"])
def test_a_stop_during_a_stubborn_startup_never_serves_and_is_bounded(kind: str) -> None:
    env = {"HOSTILE_STARTUP": "swallow" if kind == "swallow" else "stuck"}
    args = ("--drain-delay", "1", "--grace", "1", "--shutdown-timeout", "1")
    with Served(HOSTILE, *args, env=env) as served:
        deadline = time.monotonic() + 10
        while "slow startup begins" not in served.log:
            assert time.monotonic() < deadline, served.log
            time.sleep(0.02)
        sent = time.monotonic()
        code = exits(served, 20)
        took = time.monotonic() - sent
    log = served.log
    assert "stop requested during startup: stopping" in log
    assert "startup swallowed a cancellation" in log
    assert "readiness SERVING" not in log and "serving app" not in log
    assert took < meshrpc.Config(drain_delay=1, grace=1, shutdown_timeout=1).exit_budget, took
    if kind == "stuck":
        assert code == 1 and "ignored its cancellation for 1s: abandoned" in log
    else:
        assert code == 0


# -- 8 and 13. exits, their codes, counts and names -------------------------------------------


def final_code(log: str) -> int:
    found = re.findall(r"shutdown complete, exit code (\d+)", log)
    assert len(found) == 1, log
    return int(found[0])


def test_cancelled_count_includes_handlers_that_swallow_cancellation() -> None:
    with Served(ECHO, "--drain-delay", "0", "--grace", "0.5") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            calls = [stub.Unary.future(echo_pb2.EchoRequest(sleep=5), timeout=10) for _ in range(3)]
            calls.append(stub.Unary.future(echo_pb2.EchoRequest(sleep=5, fail="swallow-cancel"), timeout=10))
            time.sleep(0.5)
            code = exits(served)
            for future in calls:
                future.exception()
    assert "server stopped, 4 RPCs cancelled" in served.log, served.log
    assert code == final_code(served.log) == 0


def test_a_stubborn_handler_is_named_and_the_exit_fits_the_pods_grace_period() -> None:
    settings = {"drain_delay": 0.0, "grace": 0.5, "shutdown_timeout": 0.5}
    with Served(ECHO, "--drain-delay", "0", "--grace", "0.5", "--shutdown-timeout", "0.5") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stuck = echo_pb2_grpc.EchoStub(channel).Unary.future(
                echo_pb2.EchoRequest(sleep=30, fail="stubborn"), timeout=40
            )
            time.sleep(0.3)
            sent = time.monotonic()
            code = exits(served, 20)
            took = time.monotonic() - sent
            stuck.cancel()
    log = served.log
    budget = meshrpc.Config(**settings).exit_budget
    assert took < budget + 0.5, (took, budget)  # the watchdog's bound, with the signal's delivery
    assert "/echo.Echo/Unary" in log.split("abandoned")[-1], log  # the RPC by name, not a coroutine's repr
    assert "cython" not in log
    assert code == 1
    assert re.search(r"shutdown complete, exit code 1|exiting now", log), log
    # The kubelet's SIGKILL comes only after that budget: the grace period the manifests write.
    out = meshrpc_cli("routes", ECHO, "--drain-delay", "0", "--grace", "0.5", env={"MESHRPC_SHUTDOWN_TIMEOUT": "0.5"})
    assert out.returncode == 0, out.stderr
    deployment = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
    grace_period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_period >= budget + 1 and took < grace_period  # the process ended, and logged it, before the SIGKILL


def test_the_default_grace_period_outlasts_the_watchdog() -> None:
    out = meshrpc_cli("routes")
    deployment = next(d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment")
    grace_period = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace_period >= meshrpc.Config().exit_budget + 1


def test_a_second_signal_logs_the_exit_code_it_exits_with() -> None:
    with Served(ECHO, "--drain-delay", "20", "--grace", "20") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stuck = echo_pb2_grpc.EchoStub(channel).Unary.future(
                echo_pb2.EchoRequest(sleep=30, fail="stubborn"), timeout=40
            )
            time.sleep(0.3)
            served.signal(signal.SIGTERM)
            time.sleep(0.3)
            served.signal(signal.SIGINT)
            code = served.wait(10)
            stuck.cancel()
    log = served.log
    if "exiting now" not in log:  # the runner finished first: its line tells the code
        assert final_code(log) == code
    assert code == 1


# -- 5. the metrics port --------------------------------------------------------------------


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no thread count")


def test_idle_metrics_connections_cost_no_threads_and_never_starve_grpc_or_scrapes() -> None:
    port = free_port()
    env = {"MESHRPC_METRICS_PORT": str(port)}
    with Served("examples.greeter.app:app", "--drain-delay", "0", env=env) as served:
        served.wait_serving()
        before = threads_of(served.proc.pid)
        idle = []
        try:
            for _ in range(300):
                sock = socket.create_connection(("127.0.0.1", port), timeout=2)
                sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
                idle.append(sock)
            time.sleep(0.3)
            assert threads_of(served.proc.pid) <= before + 2
            assert health_status(served.target, "liveness") == "SERVING"
            assert "process_cpu_seconds_total" in metrics_text(port, timeout=3)
            open_fds = len(list(Path(f"/proc/{served.proc.pid}/fd").iterdir()))
            assert open_fds < 150, open_fds  # idle connections past the cap were closed
        finally:
            for sock in idle:
                sock.close()
        assert exits(served) == 0


# -- 11. sidecar settings -------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/healthz", "http://[::1/x", "http:///healthz"])
def test_an_invalid_sidecar_url_is_a_config_error(url: str) -> None:
    result = meshrpc_cli("serve", ECHO, "--port", "0", env={"MESHRPC_SIDECAR_READY_URL": url}, timeout=20)
    assert result.returncode != 0
    assert "sidecar_ready_url" in result.stderr and "MESHRPC_SIDECAR_READY_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_quit_sidecar_uses_the_setting() -> None:
    with StandIn() as sidecar:
        script = "import asyncio, meshrpc; print(asyncio.run(meshrpc.quit_sidecar()))"
        result = run(sys.executable, "-c", script, env={"MESHRPC_SIDECAR_QUIT_URL": sidecar.quit_url})
    assert result.stdout.strip() == "True", result.stderr
    assert sidecar.requests == ["POST /quitquitquit"]


def test_readiness_says_it_waits_for_the_sidecar() -> None:
    with StandIn(ready_status=503) as sidecar:
        env = {"MESHRPC_MESH": "istio-sidecar", "MESHRPC_SIDECAR_READY_URL": sidecar.ready_url}
        with Served(ECHO, "--drain-delay", "0", env=env) as served:
            deadline = time.monotonic() + 10
            while "serving app echo" not in served.log:
                assert time.monotonic() < deadline, served.log
                time.sleep(0.05)
            assert health_status(served.target) == "NOT_SERVING"
            sidecar.ready_status = 200
            served.wait_serving()
            assert exits(served) == 0
    log = served.log
    assert "readiness NOT_SERVING (waiting for the sidecar)" in log
    assert log.index("waiting for the sidecar)") < log.index("readiness SERVING")
