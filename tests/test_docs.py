"""The snippets a newcomer copies work as written, in a fresh directory of their own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from tests.helpers import BIN, ROOT


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
