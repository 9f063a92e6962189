"""Soak: does a server's memory stay flat over 200k RPCs, cancellations and deadline expiries?

    python bench/soak.py [--rpcs 200000]

For raw grpc.aio and for `meshrpc serve`, one after the other: a warm-up, then two
halves.  Each half is mostly unary calls from h2load, plus streams a Python client
cancels after two replies and streams whose deadline expires mid-stream (both kinds
leave the server to clean up a handler it did not finish).  The server's resident
memory (VmRSS) is read after the warm-up, after the first half and at the end.  A
bounded script, not a test: it prints a table and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench import WORKLOADS, contenders, free_port, pinned, rss_mb, stop, wait_ready  # noqa: E402
from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc  # noqa: E402

WARM_UP = 10_000  # RPCs before the first reading (a tenth of --rpcs when that is less)
ABANDONED_SHARE = 0.05  # of each half: cancelled streams, and as many deadline-expired ones


async def abandon_streams(target: str, count: int) -> tuple[int, int]:
    """``count`` streams cancelled after two replies and ``count`` whose deadline expires; what each ended as."""
    cancelled = expired = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = helloworld_pb2_grpc.GreeterStub(channel)
        request = helloworld_pb2.HelloRequest(name="soak", count=1000)

        async def cancel_one() -> None:
            nonlocal cancelled
            call = stub.SayHelloStream(request)
            got = 0
            async for _ in call:
                got += 1
                if got == 2:
                    call.cancel()
                    cancelled += 1
                    break

        async def expire_one() -> None:
            nonlocal expired
            try:
                async for _ in stub.SayHelloStream(request, timeout=0.002):
                    pass
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    expired += 1

        for start in range(0, count, 50):  # 50 at a time: concurrent, and bounded
            batch = min(50, count - start)
            await asyncio.gather(*(cancel_one() for _ in range(batch)), *(expire_one() for _ in range(batch)))
    return cancelled, expired


def unary_load(target: str, count: int, body: str) -> None:
    command = [
        "h2load", "-n", str(count), "-c", "4", "-m", "32",
        "-H", "content-type: application/grpc", "-H", "te: trailers",
        "-d", body, f"http://{target}/helloworld.Greeter/SayHello",
    ]  # fmt: skip
    out = subprocess.run(pinned(1, command), capture_output=True, text=True, timeout=600).stdout
    done = re.search(r"(\d+) done, (\d+) succeeded", out)
    if not done or int(done.group(2)) != count:
        raise SystemExit(f"h2load did not complete every request:\n{out}")


def soak(name: str, command: list[str], env: dict[str, str], rpcs: int, body: str) -> list[float]:
    warm_up = min(WARM_UP, rpcs // 10)
    port = free_port()
    command = [a.replace(str(0xDEAD), str(port)) for a in command]
    server = subprocess.Popen(pinned(0, command), cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    target = f"127.0.0.1:{port}"
    try:
        wait_ready(target, WORKLOADS[0])
        unary_load(target, warm_up, body)
        asyncio.run(abandon_streams(target, min(200, warm_up // 10)))
        marks = [rss_mb(server.pid)]
        half = (rpcs - warm_up) // 2
        abandoned = int(half * ABANDONED_SHARE)
        for _ in range(2):
            unary_load(target, half - 2 * abandoned, body)
            cancelled, expired = asyncio.run(abandon_streams(target, abandoned))
            print(f"{name}: half done, {cancelled} cancelled and {expired} expired streams", file=sys.stderr)
            marks.append(rss_mb(server.pid))
        return marks
    finally:
        stop(server)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rpcs", type=int, default=200_000, help="RPCs per server, warm-up included (default 200000)")
    args = parser.parse_args(argv)
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")
    if args.rpcs < 1000:
        raise SystemExit("--rpcs must be at least 1000")
    field = {c.name: c for c in contenders(0xDEAD)}
    with tempfile.NamedTemporaryFile(suffix=".grpc", delete=False) as body:
        body.write(WORKLOADS[0].body())
    rows = []
    try:
        for name in ("raw grpc.aio", "meshrpc (defaults)"):
            contender = field[name]
            start, middle, end = soak(name, contender.command, contender.env, args.rpcs, body.name)
            rows.append((name, start, middle, end))
    finally:
        os.unlink(body.name)
    print(
        f"{args.rpcs} RPCs per server ({ABANDONED_SHARE:.0%} cancelled and {ABANDONED_SHARE:.0%} deadline-expired streams)"
    )
    print()
    print("| server | RSS after warm-up (MB) | middle | end | growth after warm-up |")
    print("|---|---:|---:|---:|---:|")
    for name, start, middle, end in rows:
        print(f"| {name} | {start:.1f} | {middle:.1f} | {end:.1f} | {end - start:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
