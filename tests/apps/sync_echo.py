"""A servicer written for ``grpc.server(ThreadPoolExecutor(...))``: plain ``def`` methods, unchanged."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc

import meshrpc
from examples._generated.echo import echo_pb2, echo_pb2_grpc

threads: set[str] = set()  # the threads the handlers ran in


class SyncEcho(echo_pb2_grpc.EchoServicer):
    def Unary(self, request: echo_pb2.EchoRequest, context: grpc.ServicerContext) -> echo_pb2.EchoReply:
        threads.add(threading.current_thread().name)
        if request.sleep:
            time.sleep(request.sleep)
        if request.fail == "abort":
            context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        if request.fail == "crash":
            raise KeyError("secret")
        if request.fail == "set-code":
            context.set_code(grpc.StatusCode.FAILED_PRECONDITION)
            context.set_details("set, not raised")
            return echo_pb2.EchoReply()
        if request.text == "deadline":
            return echo_pb2.EchoReply(text=f"{context.time_remaining():.3f}")
        if request.text == "caller":
            who = meshrpc.caller()
            return echo_pb2.EchoReply(text=who.spiffe_id or "" if who else "nobody")
        if request.text == "until-cancelled":  # works until the RPC ends, as sync code polls for it
            deadline = time.monotonic() + 10
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return echo_pb2.EchoReply(text="stopped" if time.monotonic() < deadline else "never stopped")
        return echo_pb2.EchoReply(text=request.text, server=threading.current_thread().name)

    def ServerStream(self, request: echo_pb2.EchoRequest, context: Any) -> Iterator[echo_pb2.EchoReply]:
        for i in range(request.count):
            if request.sleep:
                time.sleep(request.sleep)
            yield echo_pb2.EchoReply(text=request.text, index=i)
        if request.fail == "abort":
            context.abort(grpc.StatusCode.OUT_OF_RANGE, "no more")

    def ClientStream(self, requests: Iterator[echo_pb2.EchoRequest], context: Any) -> echo_pb2.EchoReply:
        return echo_pb2.EchoReply(text=",".join(r.text for r in requests))

    def BidiStream(self, requests: Iterator[echo_pb2.EchoRequest], context: Any) -> Iterator[echo_pb2.EchoReply]:
        for i, request in enumerate(requests):
            if request.fail == "crash":
                raise RuntimeError("bidi broke")
            yield echo_pb2.EchoReply(text=request.text.upper(), index=i)


app = meshrpc.App("sync-echo", services=[SyncEcho()])
