"""A test app with every RPC kind and every way a handler can end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc

log = logging.getLogger("echo")
SERVER_ID = f"pid-{os.getpid()}"
STATUS_ERRORS = {cls.code.name: cls for cls in meshrpc.StatusError.__subclasses__()}


failed_once: set[str] = set()


async def behave(request: echo_pb2.EchoRequest) -> None:
    if request.fail.startswith("return-") or request.fail == "yield-none":
        return  # misbehaviours the handlers themselves act out
    if request.fail == "swallow-cancel":  # a handler that catches its cancellation and returns
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(request.sleep)
        return
    if request.fail == "stubborn":  # one that ignores every cancellation for request.sleep seconds
        end = time.monotonic() + request.sleep
        while time.monotonic() < end:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.05)
        return
    if request.sleep:
        if request.sleep >= 1:  # tests wait for this line instead of guessing when the call arrived
            log.info("handler sleeps %gs", request.sleep)
        await asyncio.sleep(request.sleep)
    if request.fail.startswith("once:"):  # "once:CODE:key": fail the first call with this key only
        _, code, key = request.fail.split(":", 2)
        if key not in failed_once:
            failed_once.add(key)
            raise STATUS_ERRORS[code](f"failing {key} once")
        return
    if request.fail == "crash":
        raise RuntimeError("secret internal detail /srv/db password=hunter2")
    if request.fail == "crash-text":  # an exception whose text is the client's
        raise ValueError(f"cannot use {request.text}")
    if request.fail == "exit":
        raise SystemExit(3)
    if request.fail == "interrupt":
        raise KeyboardInterrupt
    if request.fail:
        raise STATUS_ERRORS[request.fail](f"asked to fail with {request.fail}")


def reply(text: str, index: int = 0, peer: str = "") -> echo_pb2.EchoReply:
    return echo_pb2.EchoReply(text=text, index=index, server=SERVER_ID, peer=peer)


class Echo(echo_pb2_grpc.EchoServicer, meshrpc.Service):
    async def Unary(self, request: echo_pb2.EchoRequest, context: Any) -> echo_pb2.EchoReply:
        await behave(request)
        if request.text == "log":
            log.warning("handling a logged call")
        if request.text == "metadata":  # what the caller sent, for propagation tests
            sent = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
            return reply(json.dumps(sent, sort_keys=True))
        if request.text == "deadline":
            return reply(f"{context.time_remaining():.6f}")
        wrong: Any = {"none": None, "dict": {"text": "x"}, "str": "x"}.get(request.fail.removeprefix("return-"), ...)
        if request.fail.startswith("return-"):
            return wrong  # a handler bug: not an EchoReply
        return reply(request.text, peer=context.peer())

    async def ServerStream(self, request: echo_pb2.EchoRequest, context: Any) -> AsyncIterator[echo_pb2.EchoReply]:
        for i in range(request.count):
            if request.text == "until-drain" and self.draining.is_set():
                return
            yield reply(request.text, i) if request.fail != "yield-none" or i == 0 else None  # type: ignore[misc]
            if request.sleep:
                await asyncio.sleep(request.sleep)
        if request.fail:
            await behave(echo_pb2.EchoRequest(fail=request.fail))

    async def ClientStream(self, requests: AsyncIterator[echo_pb2.EchoRequest], context: Any) -> echo_pb2.EchoReply:
        texts = []
        async for request in requests:
            await behave(request)
            texts.append(request.text)
        return reply(",".join(texts))

    async def BidiStream(
        self, requests: AsyncIterator[echo_pb2.EchoRequest], context: Any
    ) -> AsyncIterator[echo_pb2.EchoReply]:
        i = 0
        async for request in requests:
            await behave(request)
            yield reply(request.text, i)
            i += 1


events: list[str] = []


@contextlib.asynccontextmanager
async def lifespan(app: meshrpc.App) -> AsyncIterator[None]:
    events.append("startup")
    log.info("lifespan startup")
    if os.environ.get("ECHO_FAIL_STARTUP"):
        raise ConnectionRefusedError("database at 127.0.0.1:1 refused the connection")
    yield
    log.info("lifespan shutdown")
    events.append("shutdown")
    if os.environ.get("ECHO_FAIL_SHUTDOWN"):
        raise RuntimeError("shutdown failed on purpose")
    if os.environ.get("ECHO_SLOW_SHUTDOWN"):  # seconds the shutdown takes
        await asyncio.sleep(float(os.environ["ECHO_SLOW_SHUTDOWN"]))


app = meshrpc.App("echo", services=[Echo()], lifespan=lifespan)

if os.environ.get("ECHO_STUCK_THREAD"):  # a readiness check whose thread outlives the server

    @app.readiness_check(name="stuck-in-a-thread")
    async def stuck_in_a_thread() -> bool:
        await asyncio.to_thread(time.sleep, float(os.environ["ECHO_STUCK_THREAD"]))
        return True
