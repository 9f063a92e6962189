"""Benchmark: the same SayHello handler through raw grpc.aio and through meshrpc.

    python bench/bench.py [--requests N] [--rounds R] [--clients C] [--streams M]

Each contender runs as its own server process (pinned to CPU 0 when taskset is
there); h2load (Debian's nghttp2-client) sends unary gRPC calls from CPU 1.
Rounds alternate the contenders so that machine noise hits all of them alike;
the table gives medians of requests/s and server CPU time per RPC, and each
contender's ratio to raw grpc.aio measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from examples._generated.helloworld import helloworld_pb2, helloworld_pb2_grpc  # noqa: E402

PATH = "/helloworld.Greeter/SayHello"
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    command: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)


def contenders(port: int) -> list[Contender]:
    py = sys.executable
    meshrpc = str(Path(py).parent / "meshrpc")
    return [
        Contender("raw grpc.aio", [py, "-m", "bench.raw_server", str(port)]),
        Contender(
            "meshrpc (defaults)",
            [meshrpc, "serve", "examples.greeter.app:app", "--host", "127.0.0.1", "--port", str(port)],
            {"MESHRPC_MESH": "none", "MESHRPC_LOG_LEVEL": "warning"},
        ),
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(cpu: int, command: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu), *command]
    return command


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def grpc_body() -> bytes:
    message = helloworld_pb2.HelloRequest(name="bench").SerializeToString()
    return b"\x00" + len(message).to_bytes(4, "big") + message


def wait_ready(target: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(target) as channel:
                reply = helloworld_pb2_grpc.GreeterStub(channel).SayHello(
                    helloworld_pb2.HelloRequest(name="bench"), timeout=1
                )
            assert reply.message == "Hello, bench!", reply
            return
        except grpc.RpcError:
            time.sleep(0.1)
    raise SystemExit(f"server at {target} did not answer within {timeout}s")


@dataclasses.dataclass
class Result:
    rps: float
    cpu_us_per_rpc: float


def run_round(contender: Contender, body_file: str, args: argparse.Namespace) -> Result:
    port = free_port()
    command = [a.replace(str(0xDEAD), str(port)) for a in contender.command]
    server = subprocess.Popen(
        pinned(0, command), cwd=ROOT, env={**os.environ, **contender.env}, stdout=subprocess.DEVNULL
    )
    try:
        target = f"127.0.0.1:{port}"
        wait_ready(target)
        h2load = [
            "h2load",
            "-n",
            str(args.requests),
            "-c",
            str(args.clients),
            "-m",
            str(args.streams),
            "-H",
            "content-type: application/grpc",
            "-H",
            "te: trailers",
            "-d",
            body_file,
            f"http://{target}{PATH}",
        ]
        # warm-up, then the measured run
        subprocess.run(pinned(1, [*h2load[:2], str(max(args.requests // 10, 100)), *h2load[3:]]), capture_output=True)
        before = cpu_seconds(server.pid)
        out = subprocess.run(pinned(1, h2load), capture_output=True, text=True, timeout=300).stdout
        used = cpu_seconds(server.pid) - before
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
        rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
        if not (done and rps) or done.group(1) != done.group(2) or int(done.group(2)) != args.requests:
            raise SystemExit(f"h2load did not complete every request for {contender.name}:\n{out}")
        return Result(float(rps.group(1)), used / args.requests * 1e6)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=50_000, help="calls per round (default 50000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per contender, alternating (default 5)")
    parser.add_argument("--clients", type=int, default=4, help="h2load connections (default 4)")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams per connection (default 32)")
    args = parser.parse_args(argv)
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    with tempfile.NamedTemporaryFile(suffix=".grpc", delete=False) as body:
        body.write(grpc_body())
    results: dict[str, list[Result]] = {}
    field = contenders(0xDEAD)
    for round_no in range(args.rounds):
        order = field if round_no % 2 == 0 else list(reversed(field))
        for contender in order:
            result = run_round(contender, body.name, args)
            results.setdefault(contender.name, []).append(result)
            print(
                f"round {round_no + 1}: {contender.name:<22} {result.rps:>9.0f} req/s "
                f"{result.cpu_us_per_rpc:>7.1f} us CPU/RPC",
                file=sys.stderr,
            )
    os.unlink(body.name)

    base = statistics.median(r.rps for r in results[field[0].name])
    base_cpu = statistics.median(r.cpu_us_per_rpc for r in results[field[0].name])
    print(f"SayHello, {args.requests} calls x {args.rounds} rounds, h2load -c {args.clients} -m {args.streams}")
    print(f"{'contender':<22} {'req/s (median)':>15} {'ratio':>6} {'CPU us/RPC':>11} {'CPU ratio':>9}")
    for contender in field:
        rps = statistics.median(r.rps for r in results[contender.name])
        cpu = statistics.median(r.cpu_us_per_rpc for r in results[contender.name])
        print(f"{contender.name:<22} {rps:>15.0f} {rps / base:>6.3f} {cpu:>11.1f} {cpu / base_cpu:>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
