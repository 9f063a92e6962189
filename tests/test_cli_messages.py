"""What the terminal shows a newcomer: errors that name the cause, logs that read right.

Every message is checked through a real ``meshrpc`` subprocess, as a user sees it.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import grpc
import pytest

from examples._generated.echo import echo_pb2, echo_pb2_grpc
from tests.helpers import BIN, ROOT, Served, free_port, meshrpc

ECHO = "tests.apps.echo:app"


def serve_in(directory: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``meshrpc serve`` that is expected to stop by itself (an error before serving)."""
    return subprocess.run(
        [str(BIN / "meshrpc"), "serve", *args],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=30,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT), "MESHRPC_MESH": "none", **(env or {})},
    )


def test_missing_module_inside_the_app_is_named_with_its_import_chain(tmp_path: Path) -> None:
    (tmp_path / "shop_app.py").write_text("import meshrpc\nfrom shop import shop_pb2_grpc\n")
    result = serve_in(tmp_path, "shop_app:app")
    assert result.returncode == 1
    assert "No module named 'shop'" in result.stderr
    assert "importing 'shop_app' failed" in result.stderr and "shop_app.py:2" in result.stderr
    assert "cannot import module 'shop_app'" not in result.stderr
    missing = serve_in(tmp_path, "nothere_app:app")
    assert "cannot import module 'nothere_app': no module 'nothere_app'" in missing.stderr


def test_not_an_app_uses_the_right_article(tmp_path: Path) -> None:
    (tmp_path / "notapp.py").write_text("app = 3\nthing = 'x'\n")
    assert "notapp:app is an int, not a meshrpc.App" in serve_in(tmp_path, "notapp:app").stderr
    assert "notapp:thing is a str, not a meshrpc.App" in serve_in(tmp_path, "notapp:thing").stderr


def test_lifespan_startup_failure_logs_its_traceback() -> None:
    result = serve_in(ROOT, ECHO, "--port", "0", env={"ECHO_FAIL_STARTUP": "1"})
    assert result.returncode == 1
    assert "lifespan startup of app echo failed" in result.stderr
    assert "Traceback (most recent call last)" in result.stderr
    assert 'raise ConnectionRefusedError("database at 127.0.0.1:1 refused the connection")' in result.stderr


@pytest.mark.parametrize(
    ("args", "env"),
    [(("--log-level", "verbose"), {}), ((), {"MESHRPC_LOG_LEVEL": "verbose"})],
)
def test_bad_log_level_is_a_clear_error(args: tuple[str, ...], env: dict[str, str]) -> None:
    result = serve_in(ROOT, ECHO, *args, env=env)
    assert result.returncode == 1
    assert "invalid setting log_level (MESHRPC_LOG_LEVEL / --log-level)" in result.stderr
    assert "'verbose'" in result.stderr and "Traceback" not in result.stderr


def test_log_level_in_any_case_and_grpc_noise_silenced() -> None:
    with Served(ECHO, "--log-level", "DEBUG", "--drain-delay", "0") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="hi"), timeout=5)
        served.signal(signal.SIGTERM)
        assert served.wait(15) == 0
    assert "DEBUG" in served.log  # debug lines are shown
    assert "Loaded running loop" not in served.log  # but not grpc's per-RPC ones


def test_app_logging_configuration_is_kept(tmp_path: Path) -> None:
    (tmp_path / "jsonapp.py").write_text(
        textwrap.dedent(
            """
            import json, logging, sys
            import meshrpc
            from examples.greeter.app import Greeter

            class Json(logging.Formatter):
                def format(self, record):
                    return json.dumps({"level": record.levelname, "msg": record.getMessage()})

            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(Json())
            logging.getLogger().addHandler(handler)
            app = meshrpc.App("jsonapp", services=[Greeter()])
            """
        )
    )
    with Served("jsonapp:app", "--drain-delay", "0", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}) as served:
        served.wait_serving()
        served.signal(signal.SIGTERM)
        assert served.wait(15) == 0
    lines = [json.loads(line) for line in served.log.splitlines() if line.startswith("{")]
    assert any(line["msg"].startswith("serving app jsonapp on") for line in lines), served.log
    assert all(line.startswith("{") for line in served.log.splitlines() if line.strip()), served.log


def test_log_config_file_and_no_log_config(tmp_path: Path) -> None:
    config = {
        "version": 1,
        "formatters": {"plain": {"format": "CUSTOM %(levelname)s %(message)s"}},
        "handlers": {"err": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"}},
        "root": {"level": "INFO", "handlers": ["err"]},
    }
    (tmp_path / "logging.json").write_text(json.dumps(config))
    with Served(ECHO, "--drain-delay", "0", "--log-config", str(tmp_path / "logging.json")) as served:
        served.wait_serving()
        served.signal(signal.SIGTERM)
        assert served.wait(15) == 0
    assert "CUSTOM INFO serving app echo on" in served.log
    # No log line says the port: this one is given.
    with Served(ECHO, "--drain-delay", "0", "--no-log-config", port=free_port()) as quiet:
        quiet.wait_serving()
        quiet.signal(signal.SIGTERM)
        assert quiet.wait(15) == 0
    assert "serving app echo" not in quiet.log  # logging left to the app, which set none up
    broken = serve_in(ROOT, ECHO, "--log-config", str(tmp_path / "missing.json"))
    assert broken.returncode == 1 and "cannot apply --log-config" in broken.stderr


def test_app_run_logs_to_the_terminal(tmp_path: Path) -> None:
    (tmp_path / "runme.py").write_text(
        "from tests.apps.echo import app\nimport sys\nsys.exit(app.run(host='127.0.0.1', port=int(sys.argv[1]), mesh='none', drain_delay=0.0))\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "python"), str(tmp_path / "runme.py"), str(port)],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        from tests.helpers import health_status

        for _ in range(300):
            if health_status(f"127.0.0.1:{port}", timeout=0.2) == "SERVING":
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0
    assert f"serving app echo on 127.0.0.1:{port}" in err
    assert "received SIGINT: draining (Ctrl-C again to stop now)" in err


def test_port_in_use_is_one_clear_line() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve_in(ROOT, ECHO, "--host", "127.0.0.1", "--port", str(port))
        shared = serve_in(ROOT, ECHO, "--host", "127.0.0.1", "--port", str(port), "--reuse-port")
    assert result.returncode == 1
    assert f"meshrpc: error: cannot listen on 127.0.0.1:{port}: the port is in use" in result.stderr
    assert "add_port" not in result.stderr and "Address already in use" not in result.stderr  # no grpc core line
    assert shared.returncode == 1
    assert "set reuse_port" not in shared.stderr and "does not share it" in shared.stderr


def test_bad_host_is_not_called_in_use() -> None:
    result = serve_in(ROOT, ECHO, "--host", "999.1.1.1", "--port", str(free_port()))
    assert result.returncode == 1
    assert "'999.1.1.1' is not an address or host name" in result.stderr and "in use" not in result.stderr
    foreign = serve_in(ROOT, ECHO, "--host", "192.0.2.1", "--port", str(free_port()))  # TEST-NET: never ours
    assert "the host is not an address of this machine" in foreign.stderr


def test_startup_line_has_an_address_to_paste() -> None:
    port = free_port()
    with Served(ECHO, "--host", "[::]", "--drain-delay", "0", port=port) as served:  # the last --host wins
        served.wait_serving()
        served.signal(signal.SIGTERM)
        assert served.wait(15) == 0
    assert f"serving app echo on 127.0.0.1:{port} (listening on [::]:{port}, every address)" in served.log


def test_drain_log_counts_what_was_in_flight_and_what_was_cut() -> None:
    with Served(ECHO, "--drain-delay", "0.3", "--grace", "0.5") as served:
        served.wait_serving()
        with grpc.insecure_channel(served.target) as channel:
            stub = echo_pb2_grpc.EchoStub(channel)
            calls = [stub.Unary.future(echo_pb2.EchoRequest(text="slow", sleep=5), timeout=10) for _ in range(3)]
            time.sleep(0.5)
            served.signal(signal.SIGTERM)
            codes = [call.exception().code() for call in calls]  # type: ignore[union-attr]
        assert served.wait(15) == 0
    assert set(codes) <= {grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE}, codes  # cut at D+G
    assert "3 RPCs in flight; serving new RPCs for 0.3s" in served.log
    assert "3 RPCs in flight get 0.5s (grace)" in served.log
    assert "server stopped, 3 RPCs cancelled" in served.log


def test_unknown_flag_prints_the_subcommand_usage() -> None:
    result = meshrpc("serve", "--bogus")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: meshrpc serve")
    assert "unrecognized arguments: --bogus" in result.stderr
    routes = meshrpc("routes", "--bogus")
    assert routes.stderr.startswith("usage: meshrpc routes")


def test_abbreviated_flags_are_refused() -> None:
    result = meshrpc("serve", ECHO, "--por", "1")
    assert result.returncode == 2
    assert "unrecognized arguments: --por 1" in result.stderr


def test_misspelt_and_empty_variables() -> None:
    result = serve_in(ROOT, ECHO, "--port", "70000", env={"MESHRPC_PROT": "8080"})
    assert "meshrpc: warning: MESHRPC_PROT is not a meshrpc setting and is ignored; did you mean MESHRPC_PORT?" in (
        result.stderr
    )
    empty = serve_in(ROOT, ECHO, env={"MESHRPC_PORT": ""})
    assert empty.returncode == 1
    assert "invalid setting port (MESHRPC_PORT / --port): the value is empty" in empty.stderr


def test_reload_restarts_on_a_change_and_keeps_the_port(tmp_path: Path) -> None:
    app_file = tmp_path / "hot.py"
    source = textwrap.dedent(
        """
        import meshrpc
        from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc

        class Greeter(helloworld_pb2_grpc.GreeterServicer):
            async def SayHello(self, request, context):
                return helloworld_pb2.HelloReply(message="VERSION")

        app = meshrpc.App("hot", services=[Greeter()])
        """
    )
    app_file.write_text(source.replace("VERSION", "one"))
    # A given port: the restarted server must bind the same one.
    with Served("hot:app", "--reload", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}, port=free_port()) as served:
        served.wait_serving()

        def say() -> str:
            from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc

            with grpc.insecure_channel(served.target) as channel:
                stub = helloworld_pb2_grpc.GreeterStub(channel)
                try:
                    reply = stub.SayHello(helloworld_pb2.HelloRequest(name="x"), timeout=1)
                except grpc.RpcError as exc:
                    return exc.code().name
                return str(reply.message)

        assert say() == "one"
        app_file.write_text(source.replace("VERSION", "two"))
        for _ in range(200):  # 10 s at most
            if say() == "two":
                break
            time.sleep(0.05)
        assert say() == "two", served.log
        served.signal(signal.SIGINT)
        served.wait(20)
    assert "hot.py changed: restarting" in served.log
    assert served.log.count("serving app hot on") == 2
    assert "drain delay" in served.log and "for 0.0s (drain delay)" in served.log
