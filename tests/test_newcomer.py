"""What a newcomer meets in the first hour: errors that point at their code, dev defaults.

Every message here comes from a real `meshrpc` process.
"""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import time
from pathlib import Path

import grpc

from tests.helpers import BIN, ROOT, Served
from tests.test_cli_messages import serve_in

STREAM_RETURNS_ONE = """
import meshrpc
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc


class Greeter(helloworld_pb2_grpc.GreeterServicer):
    def SayHelloStream(self, request, context):
        return helloworld_pb2.HelloReply(message="one")  # should yield


app = meshrpc.App("oops", services=[Greeter()])
"""


def test_a_def_stream_returning_one_message_names_the_method(tmp_path: Path) -> None:
    (tmp_path / "oops.py").write_text(STREAM_RETURNS_ONE)
    with Served("oops:app", "--drain-delay", "0", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}) as served:
        served.wait_serving()
        from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc

        with grpc.insecure_channel(served.target) as channel:
            try:
                list(helloworld_pb2_grpc.GreeterStub(channel).SayHelloStream(helloworld_pb2.HelloRequest(), timeout=5))
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INTERNAL  # type: ignore[attr-defined]
        served.signal(signal.SIGTERM)
        served.wait(10)
    log = served.log
    assert (
        "/helloworld.Greeter/SayHelloStream streams its replies: Greeter.SayHelloStream must yield "
        "helloworld.HelloReply messages (or return an iterator of them), but it returned HelloReply" in log
    )
    assert "Traceback" not in log and "is not iterable" not in log


def test_reload_after_a_syntax_error_says_file_line_and_message_once(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text('import meshrpc\napp = meshrpc.App("x"\n')
    proc = subprocess.Popen(
        [str(BIN / "meshrpc"), "serve", "broken:app", "--reload", "--port", "0"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MESHRPC_MESH": "none"},
    )
    try:
        time.sleep(3)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    assert f"cannot import 'broken': {tmp_path / 'broken.py'}:2: SyntaxError: '(' was never closed" in err
    assert "Traceback" not in err and "runpy" not in err and "importlib" not in err


def test_missing_generated_code_suggests_protoc_and_hides_meshrpc_frames(tmp_path: Path) -> None:
    (tmp_path / "nogen.py").write_text("import meshrpc\nfrom orders import orders_pb2_grpc\n")
    result = serve_in(tmp_path, "nogen:app")
    assert result.returncode == 1
    assert "No module named 'orders' (imported by nogen.py:2)" in result.stderr
    assert "_discovery.py" not in result.stderr
    assert "python -m grpc_tools.protoc" in result.stderr


def test_a_sync_readiness_check_is_named(tmp_path: Path) -> None:
    (tmp_path / "checks.py").write_text(
        "import meshrpc\napp = meshrpc.App('checks')\n\n\n@app.readiness_check\ndef database():\n    return True\n"
    )
    result = serve_in(tmp_path, "checks:app")
    assert result.returncode == 1
    assert "readiness check database must be an 'async def' function" in result.stderr
    assert "<function" not in result.stderr


def test_a_bad_port_says_what_the_setting_wants() -> None:
    result = serve_in(ROOT, "examples.greeter.app:app", "--port", "abc")
    assert "invalid setting port (MESHRPC_PORT / --port): wants a whole number, got 'abc'" in result.stderr
    assert "invalid literal" not in result.stderr
    seconds = serve_in(ROOT, "examples.greeter.app:app", "--grace", "soon")
    assert "wants a number of seconds, got 'soon'" in seconds.stderr


def test_an_app_without_services_is_warned_about(tmp_path: Path) -> None:
    (tmp_path / "empty.py").write_text("import meshrpc\napp = meshrpc.App('empty', services=[])\n")
    with Served("empty:app", "--drain-delay", "0", cwd=tmp_path, env={"PYTHONPATH": str(ROOT)}) as served:
        served.wait_for("registers no services")
        served.signal(signal.SIGTERM)
        served.wait(10)
    assert "app empty registers no services: it serves health and reflection only" in served.log


def _serve_default_host(env: dict[str, str]) -> str:
    proc = subprocess.Popen(
        [str(BIN / "meshrpc"), "serve", "tests.apps.echo:app", "--port", "0", "--drain-delay", "0"],
        cwd=ROOT,
        stderr=subprocess.PIPE,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}, "MESHRPC_MESH": "none", **env},
    )
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "readiness SERVING" in line:  # after the address lines
            break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=15)
    return "".join(lines) + rest


def test_the_default_host_is_this_machine_and_every_address_in_a_pod() -> None:
    dev = _serve_default_host({})
    assert "serving app echo on 127.0.0.1:" in dev and "every address" not in dev.split("serving app")[1].split("\n")[0]
    assert "listening on this machine only (127.0.0.1)" in dev
    pod = _serve_default_host({"KUBERNETES_SERVICE_HOST": "10.96.0.1"})  # only read, never contacted
    assert "(listening on [::]:" in pod and "every address" in pod


def test_ctrl_c_at_a_terminal_skips_the_drain_delay_but_sigterm_keeps_it() -> None:
    def stop_after(sig: int) -> tuple[float, str]:
        controller, terminal = pty.openpty()  # the server's stdin is a terminal, as in a shell
        log = ROOT / "tests" / f".tty-{os.getpid()}-{sig}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [str(BIN / "meshrpc"), "serve", "tests.apps.echo:app", "--port", "0", "--drain-delay", "3"],
                cwd=ROOT,
                stdin=terminal,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "MESHRPC_MESH": "none"},
            )
            try:
                deadline = time.monotonic() + 15
                while "readiness SERVING" not in log.read_text():
                    assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
                    time.sleep(0.05)
                sent = time.monotonic()
                proc.send_signal(sig)
                proc.wait(15)
                took = time.monotonic() - sent
            finally:
                os.close(controller)
                os.close(terminal)
                if proc.poll() is None:
                    proc.kill()
        text = log.read_text()
        log.unlink()
        return took, text

    took, text = stop_after(signal.SIGINT)
    assert took < 2.0, text
    assert "received SIGINT at a terminal: stopping without the 3.0s drain delay" in text
    assert "serving new RPCs for 0.0s (drain delay)" in text
    took, text = stop_after(signal.SIGTERM)
    assert took >= 3.0, text  # a rolling update's SIGTERM still waits for endpoints and proxies
