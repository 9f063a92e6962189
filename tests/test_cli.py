"""The meshrpc command, driven as a user drives it: real processes, real clients."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from examples._generated.echo import echo_pb2, echo_pb2_grpc
from tests.helpers import BIN, ROOT, Served, buf, free_port, grpcurl, meshrpc, run

GREETER = "examples.greeter.app:app"


@pytest.fixture(scope="module")
def greeter() -> Served:
    with Served(GREETER) as served:
        served.wait_serving()
        yield served  # type: ignore[misc]


def test_serve_logs_one_startup_line(greeter: Served) -> None:
    lines = [line for line in greeter.log.splitlines() if "serving app greeter on" in line]
    assert len(lines) == 1
    assert f"127.0.0.1:{greeter.port}" in lines[0] and "helloworld.Greeter" in lines[0]


def test_grpcurl_lists_and_describes(greeter: Served) -> None:
    listed = run(grpcurl(), "-plaintext", greeter.target, "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == [
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
        "helloworld.Greeter",
    ]
    described = run(grpcurl(), "-plaintext", greeter.target, "describe", "helloworld.Greeter")
    assert "rpc SayHelloStream ( .helloworld.HelloRequest ) returns ( stream .helloworld.HelloReply );" in (
        described.stdout
    )
    message = run(grpcurl(), "-plaintext", greeter.target, "describe", "helloworld.HelloRequest")
    assert "int32 count = 2;" in message.stdout


def test_grpcurl_calls_methods_through_reflection(greeter: Served) -> None:
    hello = run(grpcurl(), "-plaintext", "-d", '{"name": "Ada"}', greeter.target, "helloworld.Greeter/SayHello")
    assert json.loads(hello.stdout) == {"message": "Hello, Ada!"}
    stream = run(
        grpcurl(),
        "-plaintext",
        "-d",
        '{"name": "Ada", "count": 2}',
        greeter.target,
        "helloworld.Greeter/SayHelloStream",
    )
    assert stream.stdout.count("Hello, Ada!") == 2
    invalid = run(grpcurl(), "-plaintext", "-d", "{}", greeter.target, "helloworld.Greeter/SayHello")
    assert invalid.returncode != 0
    assert "InvalidArgument" in invalid.stderr and "name must not be empty" in invalid.stderr


def test_buf_curl_uses_reflection_v1(greeter: Served) -> None:
    url = f"http://{greeter.target}"
    listed = run(buf(), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--list-services", url)
    assert listed.returncode == 0, listed.stderr
    assert "helloworld.Greeter" in listed.stdout.split()
    called = run(
        buf(),
        "curl",
        "--protocol",
        "grpc",
        "--http2-prior-knowledge",
        "--reflect-protocol",
        "grpc-v1",
        "-d",
        '{"name": "Grace"}',
        f"{url}/helloworld.Greeter/SayHello",
    )
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout) == {"message": "Hello, Grace!"}


def test_health_command_exit_codes(greeter: Served) -> None:
    ok = meshrpc("health", greeter.target)
    assert (ok.returncode, ok.stdout.strip()) == (0, "SERVING")
    live = meshrpc("health", greeter.target, "--service", "liveness")
    assert (live.returncode, live.stdout.strip()) == (0, "SERVING (liveness)")
    unknown = meshrpc("health", greeter.target, "--service", "no.Such")
    assert unknown.returncode == 1 and unknown.stdout.startswith("UNKNOWN")
    down = meshrpc("health", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert down.returncode == 2 and down.stdout.startswith("UNREACHABLE")


def test_port_in_use_is_a_clear_error(greeter: Served) -> None:
    second = meshrpc("serve", GREETER, "--host", "127.0.0.1", "--port", str(greeter.port), env={"MESHRPC_MESH": "none"})
    assert second.returncode == 1
    assert f"meshrpc: error: cannot listen on 127.0.0.1:{greeter.port}" in second.stderr
    assert "Traceback" not in second.stderr


def test_sigterm_lets_a_slow_rpc_finish_and_exits_zero() -> None:
    with Served("tests.apps.echo:app", "--drain-delay", "0", "--grace", "10") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            future = stub.Unary.future(echo_pb2.EchoRequest(text="slow", sleep=1.5))
            time.sleep(0.3)
            served.signal(signal.SIGTERM)
            assert future.result(timeout=10).text == "slow"
        assert served.wait(15) == 0
    assert "lifespan shutdown" in served.log
    assert "shutdown complete, exit code 0" in served.log


def test_failing_lifespan_shutdown_exits_nonzero() -> None:
    with Served("tests.apps.echo:app", "--drain-delay", "0", env={"ECHO_FAIL_SHUTDOWN": "1"}) as served:
        served.wait_serving()
        served.signal(signal.SIGTERM)
        assert served.wait(15) == 1
    assert "lifespan shutdown of app echo failed" in served.log


def test_app_found_from_environment_and_pyproject(tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(
        textwrap.dedent(
            """
            import meshrpc
            from examples.greeter.app import Greeter
            app = meshrpc.App("svc", services=[Greeter()])
            """
        )
    )

    def serve_in(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        # A host that is no address makes serve stop when it binds, right after loading the app.
        return subprocess.run(
            [str(BIN / "meshrpc"), "serve", "--host", "999.1.1.1", "--mesh", "none"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        )

    (tmp_path / "pyproject.toml").write_text('[tool.meshrpc]\napp = "svc:nothere"\n')
    from_pyproject = serve_in({})
    assert "meshrpc: error: module 'svc' (" in from_pyproject.stderr
    assert "svc.py) has no attribute 'nothere'" in from_pyproject.stderr
    from_env = serve_in({"MESHRPC_APP": "svc:app"})  # the environment wins over pyproject.toml
    assert "cannot listen on 999.1.1.1:50051: '999.1.1.1' is not an address" in from_env.stderr
    (tmp_path / "pyproject.toml").unlink()
    nothing = serve_in({})
    assert nothing.returncode == 1
    assert "no app given" in nothing.stderr and "[tool.meshrpc]" in nothing.stderr and "MESHRPC_APP" in nothing.stderr
    assert "Traceback" not in nothing.stderr + from_env.stderr + from_pyproject.stderr


def test_grpc_js_client(greeter: Served) -> None:
    """Node's grpc-js speaks HTTP/2 with its own stack: unary, errors and streams all work."""
    from google.rpc import status_pb2

    from tests.helpers import NODE_CLIENTS

    googleapis = Path(status_pb2.__file__).parent.parent.parent  # where google/rpc/*.proto are installed
    result = run("node", str(NODE_CLIENTS / "client.js"), greeter.target, str(ROOT / "proto"), str(googleapis))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["hello"] == {"message": "Hello, Node!"}
    # The BadRequest detail, decoded by grpc-js's client from grpc-status-details-bin.
    assert seen["invalid"] == {
        "code": grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "details": "name must not be empty",
        "statusDetails": [
            {
                "type": "google.rpc.BadRequest",
                "value": {"fieldViolations": [{"field": "name", "description": "must not be empty"}]},
            }
        ],
    }
    assert seen["stream"] == {"messages": [f"Hello, Node! ({i}/3)" for i in (1, 2, 3)], "code": 0}
