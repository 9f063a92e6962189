"""The App: what a meshrpc service is made of, and how to run it."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import typing
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from ._config import Config, from_env
from ._errors import AppError
from ._health import ReadinessCheck
from ._interceptors import check_interceptors
from ._middleware import Middleware, check_middleware
from ._service import ServiceSpec, attach, describe

if TYPE_CHECKING:
    from ._server import Server

Lifespan = Callable[["App"], AbstractAsyncContextManager[Any]]
C = TypeVar("C", bound=ReadinessCheck)
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


class App:
    """A gRPC application: its name, services, configuration and lifespan.

    ``lifespan`` is called with the app and returns an async context manager
    (``contextlib.asynccontextmanager`` works): the code before its ``yield``
    runs before the server reports ready, the code after it once the server
    has stopped.

    ``middleware`` (meshrpc's own, see [`Call`][meshrpc.Call]) and ``interceptors``
    (standard ``grpc.aio.ServerInterceptor`` objects) see the RPCs of the app's
    services, in list order; interceptors run first.  Health and reflection are
    left out, since probes and grpcurl carry no credentials, unless
    ``intercept_builtins`` is true.
    """

    def __init__(
        self,
        name: str,
        services: Iterable[object] = (),
        *,
        config: Config | None = None,
        lifespan: Lifespan | None = None,
        middleware: Iterable[Middleware] = (),
        interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
        intercept_builtins: bool = False,
    ) -> None:
        if not _NAME.match(name):
            raise AppError(
                f"app name {name!r} must be a Kubernetes name: lowercase letters, digits and '-', "
                "starting with a letter, at most 63 characters"
            )
        self.name = name
        self.config = config if config is not None else Config()
        self.lifespan = lifespan
        self.middleware: tuple[Middleware, ...] = check_middleware(middleware)
        self.interceptors: tuple[grpc.aio.ServerInterceptor, ...] = check_interceptors(interceptors)
        self.intercept_builtins = intercept_builtins
        self._checks: dict[str, ReadinessCheck] = {}
        self._idle: asyncio.Event | None = None  # draining while not served: never set
        self._server: Server | None = None
        self._last: Server | None = None  # the last serving's, whose draining event stays readable
        specs: list[ServiceSpec] = []
        for servicer in services:
            specs.extend(describe(servicer))
            attach(servicer, self)
        seen: set[str] = set()
        for spec in specs:
            if spec.name in seen:
                raise AppError(f"service {spec.name} is registered twice in app {name!r}")
            seen.add(spec.name)
        self.services: tuple[ServiceSpec, ...] = tuple(specs)

    def __repr__(self) -> str:
        return f"App({self.name!r}, services=[{', '.join(s.name for s in self.services)}])"

    @property
    def draining(self) -> asyncio.Event:
        """Set when the server starts to drain; long-running handlers can await it.

        The event of the serving in progress, or of the last one; before any, an event
        that is never set.
        """
        if self._server is not None:
            return self._server.draining
        if self._last is not None:
            return self._last.draining
        if self._idle is None:
            self._idle = asyncio.Event()
        return self._idle

    @property
    def server(self) -> Server | None:
        """The [`Server`][meshrpc.Server] serving the app now (its port, health and state), or None."""
        return self._server

    @typing.overload
    def readiness_check(self, check: C, *, name: str | None = None) -> C: ...

    @typing.overload
    def readiness_check(self, check: None = None, *, name: str | None = None) -> Callable[[C], C]: ...

    def readiness_check(self, check: C | None = None, *, name: str | None = None) -> C | Callable[[C], C]:
        """Register an async readiness check (usable as a decorator, with or without arguments).

        It is polled every ``health_check_interval`` with ``health_check_timeout``;
        returning False, raising or timing out makes readiness NOT_SERVING (and is
        logged) until the check passes again.
        """

        def register(fn: C) -> C:
            is_async: bool = inspect.iscoroutinefunction(fn)
            if not is_async:
                shown = getattr(fn, "__qualname__", None) or repr(fn)
                raise AppError(f"readiness check {shown} must be an 'async def' function")
            key: str = name or getattr(fn, "__qualname__", None) or repr(fn)
            if key in self._checks:
                raise AppError(f"readiness check {key!r} is registered twice")
            self._checks[key] = fn
            return fn

        return register(check) if check is not None else register

    @property
    def readiness_checks(self) -> dict[str, ReadinessCheck]:
        return dict(self._checks)

    async def serve(self, config: Config | None = None, *, install_signal_handlers: bool = False) -> int:
        """Serve until stopped (`stop`, or a signal when handlers are installed).

        Returns the exit code: 0 after a clean drain, 1 when the lifespan's shutdown failed.
        """
        from ._server import Server

        server = Server(self, config if config is not None else self.config)
        self._server = self._last = server
        try:
            return await server.serve(install_signal_handlers=install_signal_handlers)
        finally:
            self._server = None

    def stop(self, *, force: bool = False) -> None:
        """Start the same drain a SIGTERM starts; ``force`` skips what is left of it."""
        if self._server is not None:
            self._server.request_stop(force=force)

    async def wait_for_proxy(self) -> None:
        """Wait until the mesh's local proxy is ready (returns at once without a sidecar).

        Use it in the lifespan before outbound calls: the sidecar may start after the app.
        """
        if self._server is None:
            raise AppError("wait_for_proxy() works only while the app is being served")
        await self._server.proxy_ready()

    def run(self, **overrides: Any) -> int:
        """Serve in a new event loop with signal handling; return the exit code.

        Settings: the app's config, then ``MESHRPC_*`` variables, then ``overrides``.
        """
        from . import _logging, _runner

        config = self.config.replace(**{**from_env(os.environ), **overrides})
        _logging.configure(config.log_level)  # as `meshrpc serve` does; an existing set-up is kept
        return _runner.run(self.serve(config, install_signal_handlers=True))
