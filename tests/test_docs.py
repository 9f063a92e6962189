"""The snippets a newcomer copies work as written, in a fresh directory of their own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.helpers import BIN, ROOT, free_port


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def test_readme_app_and_testing_page_pass_in_a_fresh_project(tmp_path: Path) -> None:
    readme = ROOT / "README.md"
    (tmp_path / "proto" / "helloworld").mkdir(parents=True)
    shutil.copy(ROOT / "proto" / "helloworld" / "helloworld.proto", tmp_path / "proto" / "helloworld")
    protoc_block = readme.read_text().split("<!-- protoc-command -->")[1].split("<!-- /protoc-command -->")[0]
    (protoc,) = [line for line in protoc_block.splitlines() if line.startswith("python -m grpc_tools.protoc")]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    generated = subprocess.run(protoc, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert generated.returncode == 0, generated.stderr
    assert (tmp_path / "helloworld" / "helloworld_pb2_grpc.py").is_file()
    assert (tmp_path / "helloworld" / "helloworld_pb2.pyi").is_file()

    (app,) = [b for b in blocks(readme, "python") if b.startswith("# app.py")]
    (tmp_path / "app.py").write_text(app)
    testing_page = ROOT / "docs" / "testing.md"
    (config,) = blocks(testing_page, "toml")
    (tmp_path / "pyproject.toml").write_text(config)
    (test,) = [b for b in blocks(testing_page, "python") if b.startswith("# test_app.py")]
    (tmp_path / "test_app.py").write_text(test)

    result = subprocess.run(
        [str(BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout


async def test_middleware_page_examples_work(tmp_path: Path) -> None:
    import importlib.util

    import grpc
    import pytest

    import meshrpc
    from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc
    from examples.greeter.app import Greeter
    from meshrpc import testing

    (source,) = [
        b for b in blocks(ROOT / "docs" / "middleware.md", "python") if b.startswith("# middleware_examples.py")
    ]
    (tmp_path / "middleware_examples.py").write_text(source)
    spec = importlib.util.spec_from_file_location("middleware_examples", tmp_path / "middleware_examples.py")
    assert spec is not None and spec.loader is not None
    examples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(examples)

    timing = examples.Timing()
    app = meshrpc.App("greeter", services=[Greeter()], middleware=[timing, examples.auth, examples.tenant])
    request = helloworld_pb2.HelloRequest(name="doc")
    async with testing.serve(app) as channel:
        stub = helloworld_pb2_grpc.GreeterStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as no_token:
            await stub.SayHello(request)
        with pytest.raises(grpc.aio.AioRpcError) as no_tenant:
            await stub.SayHello(request, metadata=(("authorization", "Bearer s3cret"),))
        ok = await stub.SayHello(request, metadata=(("authorization", "Bearer s3cret"), ("x-tenant", "acme")))
    assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert no_tenant.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ok.message == "Hello, doc!"
    path = "/helloworld.Greeter/SayHello"
    assert timing.seen == [(path, "UNAUTHENTICATED"), (path, "INVALID_ARGUMENT"), (path, "OK")]


def _marked(text: str, name: str) -> str:
    return text.split(f"<!-- {name} -->")[1].split(f"<!-- /{name} -->")[0]


def test_readme_quickstart_and_client_in_a_fresh_virtual_environment(tmp_path: Path) -> None:
    """README's first command in a copy of the clone with a new venv, then its client commands."""
    import signal
    import time

    readme = (ROOT / "README.md").read_text()
    quickstart = re.search(r"## Quickstart.*?```bash\n(.*?)\n```", readme, flags=re.S)
    assert quickstart is not None
    command = quickstart.group(1)
    install, _, serve = command.rpartition(" && ")
    assert serve.startswith("meshrpc serve ")
    clone = tmp_path / "meshrpc"
    archive = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in archive.decode().split("\0"):
        if name and not name.startswith(("tests/", "docs/", "bench/", "tools/")) and (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(BIN)))
    installed = subprocess.run(
        ["bash", "-c", f"{install} -q"], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    venv_bin = clone / ".venv" / "bin"
    port = str(free_port())  # the README says 50051; any free one here
    server = subprocess.Popen(
        ["bash", "-c", f"exec {venv_bin}/{serve.replace('50051', port)}"],
        cwd=clone,
        env={**env, "MESHRPC_MESH": "none", "MESHRPC_DRAIN_DELAY": "0"},
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        for line in server.stderr:
            if "readiness SERVING" in line:
                break
        else:
            raise AssertionError("the quickstart's server never became ready")
        outputs = []
        for line in _marked(readme, "client-commands").splitlines():
            if not line.startswith("meshrpc "):
                continue
            shown = line.split("    #")[0].replace("50051", port)
            result = subprocess.run(
                ["bash", "-c", f"{venv_bin}/{shown}"], cwd=clone, env=env, capture_output=True, text=True, timeout=30
            )
            outputs.append((shown, result))
        by_verb = {shown.split()[1] + ("-fail" if "'{}'" in shown else ""): r for shown, r in outputs}
        assert by_verb["health"].stdout.strip() == "SERVING"
        assert "helloworld.Greeter" in by_verb["list"].stdout.split()
        assert "rpc SayHello" in by_verb["describe"].stdout
        calls = [r for shown, r in outputs if shown.split()[1] == "call" and "'{}'" not in shown]
        assert '"message": "Hello, Ada!"' in calls[0].stdout
        assert '"message": "Hello, Ada! (2/2)"' in calls[1].stdout
        failed = by_verb["call-fail"]
        assert (
            failed.returncode == 1 and "INVALID_ARGUMENT" in failed.stderr and "google.rpc.BadRequest" in failed.stderr
        )
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
        time.sleep(0)


def test_the_log_lines_the_quickstart_quotes_are_what_the_server_writes() -> None:
    import signal

    from tests.helpers import Served

    quoted = _marked((ROOT / "docs" / "quickstart.md").read_text(), "quoted-log")
    lines = [line for line in quoted.splitlines() if line.startswith("... ")]
    assert len(lines) >= 4
    env = {k: v for k, v in os.environ.items() if k not in ("MESHRPC_MESH", "KUBERNETES_SERVICE_HOST")}
    with Served("examples.greeter.app:app", env={"MESHRPC_MESH": "auto", **env}) as served:
        served.wait_for("readiness SERVING")
        served.signal(signal.SIGTERM)
        served.wait(20)
        port = served.port
    real = served.log.splitlines()
    for line in lines:
        pattern = ".*?".join(re.escape(part) for part in line.replace("50051", str(port)).split("..."))
        assert any(re.fullmatch(pattern, r) for r in real), f"not in the server's log: {line}"
