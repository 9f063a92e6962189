"""Instructions per RPC, counted by callgrind: a per-RPC figure the machine's noise cannot move.

    python bench/instructions.py [--calls 400] [--repeat 2] [--workload unary|stream] [--traceparent] [CONTENDER ...]

Each contender (bench/servers.py's, and `meshrpc serve bench.app:app` for the defaults)
runs under ``valgrind --tool=callgrind``. A fixed client (one connection, one call at a
time, from a process of its own, not counted) sends warm-up calls, the server's counters
are zeroed (``callgrind_control --zero``), then the same connection sends ``--calls``
unary SayHello calls (or SayHelloStream calls of 10 replies, ``--workload stream``) and
the counters are dumped before it closes: the server's instructions for exactly those
calls, every thread included, and none of a connection's setup or teardown.  With
``--traceparent`` every call (every contender's, raw's too) carries a sampled W3C
traceparent, as bench/bench.py's tracing contenders' calls do.  The figure is extra
instructions per RPC over raw grpc.aio, not a ratio: callgrind does not see the kernel,
which is a large share of raw's CPU.

``--concurrent C,M`` sends the warm-up and the counted calls with h2load instead, ``C``
connections of ``M`` calls in flight each (bench/bench.py's load is ``4,32``): the
instructions of calls served interleaved, as under load.  Each h2load run sets up its own
connections inside the count (``C`` of them per ``--calls``).  Overload shedding is off
unless ``MESHRPC_OVERLOAD_TARGET_DELAY`` is set: under valgrind every call runs some 50
times slower, so the shedder's 25 ms sampler lands on 50 times fewer calls than outside it.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BIN = Path(sys.executable).parent

from bench.bench import H2LOAD_DONE, TRACEPARENT, free_port, h2load  # noqa: E402
from bench.bench import WORKLOADS as LOADS  # noqa: E402

WARMUP = 200
CONCURRENT_WARMUP = 1000  # h2load's runs: a few hundred calls barely fill its streams

CONTENDERS = {
    "raw": [sys.executable, "-m", "bench.servers", "raw", "{port}"],
    "defaults": [str(BIN / "meshrpc"), "serve", "bench.app:app", "--host", "127.0.0.1", "--port", "{port}"],
    "middleware": [sys.executable, "-m", "bench.servers", "meshrpc-middleware", "{port}"],
    "production": [sys.executable, "-m", "bench.servers", "meshrpc-production", "{port}"],
    "tracing": [sys.executable, "-m", "bench.servers", "meshrpc-traced", "{port}"],
    # The same tracing through a TracerProvider the application built: the SDK's own spans.
    "tracing-user-provider": [sys.executable, "-m", "bench.servers", "meshrpc-traced-user-provider", "{port}"],
    # The production profile's telemetry inline in raw handlers (meshrpc's aggregates and
    # sampling, nothing else), and the SDK-only floor: the bars for "production".
    "lean": [sys.executable, "-m", "bench.servers", "raw-lean-production", "{port}"],
    "floor": [sys.executable, "-m", "bench.servers", "raw-production-floor", "{port}"],
    # The bars for "tracing": the contrib instrumentor, and the SDK's own floor with every
    # call traced (the least SDK work, inline in raw handlers).
    "contrib": [sys.executable, "-m", "bench.servers", "raw-otel-contrib", "{port}"],
    "tracing-floor": [sys.executable, "-m", "bench.servers", "raw-sdk-floor", "{port}"],
}


# One call of each workload, as the client sends it (bench/bench.py's two workloads).
WORKLOADS = {
    "unary": "stub.SayHello(p.HelloRequest(name='bench'), timeout=30, metadata=md)",
    "stream": "assert len(list(stub.SayHelloStream(p.HelloRequest(name='bench', count=10), timeout=30, metadata=md))) == 10",
}


class _Client:
    """The fixed client: one process (not counted), one connection for the warm-up and the
    counted calls, so the connection's setup and teardown stay out of the count."""

    def __init__(self, port: int, workload: str, traceparent: bool) -> None:
        metadata = (("traceparent", TRACEPARENT),) if traceparent else ()
        code = (
            "import grpc, sys\n"
            "from examples._generated.helloworld import helloworld_pb2 as p, helloworld_pb2_grpc as g\n"
            f"channel = grpc.insecure_channel('127.0.0.1:{port}')\n"
            "stub = g.GreeterStub(channel)\n"
            f"md = {metadata!r}\n"
            "for line in sys.stdin:\n"  # each line: how many calls to send now
            "    for _ in range(int(line)):\n"
            f"        {WORKLOADS[workload]}\n"
            "    print('done', flush=True)\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def send(self, count: int) -> None:
        """``count`` calls, one at a time; returns when the last has been answered."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{count}\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "done":
            raise RuntimeError(f"the client failed (exit code {self.proc.wait(timeout=60)})")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class _Load:
    """The concurrent client: h2load, ``clients`` connections of ``streams`` calls in flight
    each; every call of a run must come back with HTTP 200 (a gRPC error would too, so
    the server's answers are checked by the one-call client's kind of run, not here)."""

    def __init__(self, port: int, workload: str, traceparent: bool, clients: int, streams: int) -> None:
        load = LOADS[0] if workload == "unary" else LOADS[1]
        with tempfile.NamedTemporaryFile(prefix="meshrpc-instr-", suffix=".grpc", delete=False) as body:
            body.write(load.body())
        self.body = body.name
        self.call = (f"127.0.0.1:{port}", load.path, self.body, clients, streams)
        self.traceparent = traceparent

    def send(self, count: int) -> None:
        """``count`` calls; returns when h2load has had every answer."""
        out = subprocess.run(h2load(*self.call, count, self.traceparent), capture_output=True, text=True)
        done = H2LOAD_DONE.search(out.stdout)
        if done is None or int(done.group(1)) != count or int(done.group(2)) != count:
            raise RuntimeError(f"h2load did not complete every call:\n{out.stdout}{out.stderr}")

    def close(self) -> None:
        os.unlink(self.body)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("the server did not start under valgrind")


def instructions_per_call(
    contender: str,
    calls: int,
    workload: str = "unary",
    traceparent: bool = False,
    concurrent: tuple[int, int] | None = None,
) -> float:
    """The server's instructions per call (unary, or a server stream of 10 replies), warm,
    counted by callgrind; one call at a time, or ``concurrent`` (connections, calls in
    flight on each) through h2load."""
    port = free_port()
    command = [part.replace("{port}", str(port)) for part in CONTENDERS[contender]]
    # Shedding off (unless asked for): under valgrind everything runs some 50 times slower, so
    # even one call at a time looks queued to the overload check; the check itself still
    # runs on every call.
    env = {
        **os.environ,
        "MESHRPC_MESH": "none",
        "MESHRPC_LOG_LEVEL": "warning",
        "MESHRPC_OVERLOAD_TARGET_DELAY": os.environ.get("MESHRPC_OVERLOAD_TARGET_DELAY", "off"),
        # Exports run on a timer (metrics every 10 s, spans every 5 s): under valgrind a call
        # takes some 50 times longer, so a timed export would land in the counted window far
        # more often than per call under real load.  They are left out of the count here;
        # bench/bench.py measures them.
        "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
        "OTEL_BSP_SCHEDULE_DELAY": "3600000",
        "PYTHONPATH": str(ROOT),
    }
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        proc = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", "--dump-instr=no", *command],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_ready(port, proc)
            client: _Client | _Load = (
                _Client(port, workload, traceparent)
                if concurrent is None
                else _Load(port, workload, traceparent, *concurrent)
            )
            try:
                client.send(WARMUP if concurrent is None else CONCURRENT_WARMUP)
                subprocess.run(["callgrind_control", "--zero", str(proc.pid)], check=True, capture_output=True)
                client.send(calls)
                subprocess.run(["callgrind_control", "--dump", str(proc.pid)], check=True, capture_output=True)
            finally:
                client.close()
        finally:
            # The count is on disk once callgrind_control's dump has returned: nothing of the
            # server's shutdown is counted, so it is killed rather than stopped (a graceful
            # stop takes a server some 2 s, a minute and more under valgrind).
            proc.kill()
            proc.wait()
        # Only the dump asked for after the calls was written ("Trigger: dump").
        for dump in Path(tmp).glob("callgrind.out.*"):
            text = dump.read_text(errors="replace")
            if re.search(r"^desc: Trigger: dump", text, re.M):
                return _total(text) / calls
        raise RuntimeError("callgrind wrote no dump for the counted calls")


def _total(text: str) -> int:
    found = re.search(r"^summary:\s+(\d+)", text, re.M)
    if found is None:
        raise RuntimeError("no totals in the callgrind dump")
    return int(found.group(1))


def _concurrency(text: str) -> tuple[int, int]:
    try:
        clients, streams = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,M (two whole numbers), got {text!r}") from None
    if clients < 1 or streams < 1:
        raise argparse.ArgumentTypeError(f"C and M must be at least 1, got {text!r}")
    return clients, streams


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("contenders", nargs="*", default=list(CONTENDERS), help=f"of {', '.join(CONTENDERS)}")
    parser.add_argument("--calls", type=int, default=400, help="calls counted per run (default 400)")
    parser.add_argument("--repeat", type=int, default=2, help="runs per contender (default 2)")
    parser.add_argument(
        "--workload", choices=list(WORKLOADS), default="unary", help="unary SayHello, or SayHelloStream x10"
    )
    parser.add_argument(
        "--traceparent", action="store_true", help="every call carries a sampled traceparent (as in bench.py's tracing)"
    )
    parser.add_argument(
        "--concurrent",
        type=_concurrency,
        metavar="C,M",
        help="send with h2load, C connections of M calls in flight each (bench.py's load: 4,32)",
    )
    args = parser.parse_args()
    unknown = [c for c in args.contenders if c not in CONTENDERS]
    if unknown:
        parser.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    names = ["raw", *[c for c in args.contenders if c != "raw"]]
    runs: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeat):
        for name in names:  # alternated, so both runs of each see the same machine
            runs[name].append(instructions_per_call(name, args.calls, args.workload, args.traceparent, args.concurrent))
            print(f"{name}: {runs[name][-1]:,.0f} instructions per call", flush=True)
    raw = statistics.median(runs["raw"])
    what = "unary calls" if args.workload == "unary" else "server streams of 10 replies"
    carrying = ", each with a traceparent" if args.traceparent else ""
    if args.concurrent is not None:
        carrying += f", sent by h2load ({args.concurrent[0]} connections, {args.concurrent[1]} calls in flight on each)"
    print(f"\n{args.calls} {what}{carrying} counted per run, {args.repeat} runs each; median, and spread of the runs")
    print("| contender | instructions per RPC | over raw grpc.aio | spread |")
    print("|---|---|---|---|")
    for name in names:
        value = statistics.median(runs[name])
        spread = (max(runs[name]) - min(runs[name])) / value * 100 if value else 0.0
        print(f"| {name} | {value:,.0f} | {value - raw:+,.0f} ({(value - raw) / raw * 100:+.1f} %) | {spread:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
