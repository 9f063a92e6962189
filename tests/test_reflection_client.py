"""`meshrpc list|describe|call`: the built-in client, through real servers' reflection."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT, Served, meshrpc
from tests.test_caller import pki  # noqa: F401  (the fixture: a CA and a server certificate)

GREETER = "examples.greeter.app:app"


@pytest.fixture(scope="module")
def greeter() -> Iterator[Served]:
    with Served(GREETER, "--drain-delay", "0") as served:
        served.wait_serving()
        yield served


@pytest.fixture(scope="module")
def echo() -> Iterator[Served]:
    with Served("tests.apps.echo:app", "--drain-delay", "0") as served:
        served.wait_serving()
        yield served


def test_list_and_describe(greeter: Served) -> None:
    listed = meshrpc("list", greeter.target)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["grpc.health.v1.Health", "helloworld.Greeter"]  # reflection itself hidden
    methods = meshrpc("list", greeter.target, "helloworld.Greeter")
    assert methods.stdout.split() == ["helloworld.Greeter/SayHello", "helloworld.Greeter/SayHelloStream"]
    described = meshrpc("describe", greeter.target, "helloworld.Greeter/SayHello")
    assert described.returncode == 0, described.stderr
    text = described.stdout
    assert "rpc SayHello ( .helloworld.HelloRequest ) returns ( .helloworld.HelloReply );" in text
    assert "string name = 1;" in text and "int32 count = 2;" in text and "string message = 1;" in text
    service = meshrpc("describe", greeter.target, "helloworld.Greeter").stdout
    assert "returns ( stream .helloworld.HelloReply );" in service
    assert "message HelloReply" in meshrpc("describe", greeter.target, "helloworld.HelloReply").stdout


def test_unary_and_stream_calls_speak_json(greeter: Served) -> None:
    unary = meshrpc("call", greeter.target, "helloworld.Greeter/SayHello", "-d", '{"name": "Ada"}')
    assert unary.returncode == 0, unary.stderr
    assert json.loads(unary.stdout) == {"message": "Hello, Ada!"}
    stream = meshrpc("call", greeter.target, "helloworld.Greeter/SayHelloStream", "-d", '{"name": "Ada", "count": 2}')
    replies = [json.loads(part) for part in stream.stdout.replace("}\n{", "}\x00{").split("\x00")]
    assert [r["message"] for r in replies] == ["Hello, Ada! (1/2)", "Hello, Ada! (2/2)"]


def test_a_failed_call_prints_its_status_and_decoded_details(greeter: Served) -> None:
    failed = meshrpc("call", greeter.target, "helloworld.Greeter/SayHello", "-d", "{}")
    assert failed.returncode == 1 and failed.stdout == ""
    assert "Code: INVALID_ARGUMENT" in failed.stderr and "Message: name must not be empty" in failed.stderr
    assert "Details: google.rpc.BadRequest" in failed.stderr and '"field": "name"' in failed.stderr


def test_metadata_and_deadline(echo: Served) -> None:
    sent = meshrpc("call", echo.target, "echo.Echo/Unary", "-d", '{"text": "metadata"}', "-H", "x-team: payments")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(json.loads(sent.stdout)["text"])["x-team"] == "payments"
    late = meshrpc("call", echo.target, "echo.Echo/Unary", "-d", '{"sleep": 2}', "--timeout", "0.3")
    assert late.returncode == 1 and "Code: DEADLINE_EXCEEDED" in late.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (
            ("helloworld.Greeter/Nope",),
            "service helloworld.Greeter has no method 'Nope'; it has: SayHello, SayHelloStream",
        ),
        (("nope.Nope/X",), "has no service 'nope.Nope'; it has: grpc.health.v1.Health, helloworld.Greeter"),
        (("helloworld.Greeter/SayHello", "-d", "{name"), "-d is not JSON"),
        (("helloworld.Greeter/SayHello", "-d", '{"nam": "x"}'), "-d is not a valid helloworld.HelloRequest"),
        (("helloworld.Greeter/SayHello", "-H", "novalue"), "-H 'novalue' is not 'NAME: VALUE'"),
    ],
)
def test_bad_input_is_one_clear_line(greeter: Served, args: tuple[str, ...], said: str) -> None:
    result = meshrpc("call", greeter.target, *args)
    assert result.returncode == 2 and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_an_unreachable_server_is_said_quickly() -> None:
    result = meshrpc("list", "127.0.0.1:1", "--connect-timeout", "0.5")
    assert result.returncode == 2 and "cannot connect to 127.0.0.1:1" in result.stderr


def test_works_against_a_raw_grpc_aio_server_with_reflection() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.apps.raw_reflection"], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        target = f"127.0.0.1:{proc.stdout.readline().strip()}"
        assert meshrpc("list", target).stdout.split() == ["helloworld.Greeter"]
        called = meshrpc("call", target, "helloworld.Greeter/SayHello", "-d", '{"name": "Bo"}')
        assert json.loads(called.stdout) == {"message": "raw hello, Bo"}
        failed = meshrpc("call", target, "helloworld.Greeter/SayHello")
        assert failed.returncode == 1 and "Code: INVALID_ARGUMENT" in failed.stderr and "name is empty" in failed.stderr
    finally:
        proc.kill()
        proc.wait(5)


def test_tls(pki: Path) -> None:  # noqa: F811
    args = ("--drain-delay", "0", "--tls-cert-file", str(pki / "server.pem"), "--tls-key-file", str(pki / "server.key"))
    with Served(GREETER, *args) as served:
        served.wait_for("serving app greeter")
        call = ("call", served.target, "helloworld.Greeter/SayHello", "-d", '{"name": "T"}')
        ok = meshrpc(*call, "--cacert", str(pki / "ca.pem"))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {"message": "Hello, T!"}
        plaintext = meshrpc(*call, "--connect-timeout", "1")
        assert plaintext.returncode == 2


def test_a_server_without_reflection_is_said_so() -> None:
    with Served(GREETER, "--drain-delay", "0", "--no-reflection") as served:
        served.wait_serving()
        for args in (("list", served.target), ("call", served.target, "helloworld.Greeter/SayHello")):
            result = meshrpc(*args)
            assert result.returncode == 2, result.stderr
            assert "does not answer server reflection: UNIMPLEMENTED" in result.stderr
