"""Benchmark: the same bare greeter handlers (bench/app.py) through raw grpc.aio and meshrpc.

    python bench/bench.py [--requests N] [--rounds R] [--clients C] [--streams M]

Each contender runs as its own server process (pinned to CPU 0 when taskset is
there); h2load (Debian's nghttp2-client) sends unary gRPC calls from CPU 1.
Rounds alternate the contenders so that machine noise hits all of them alike;
the table gives medians of requests/s and server CPU time per RPC, and each
contender's ratio to raw grpc.aio: the median, over the rounds, of its figure
over raw's in the same round; under the table, each round's ratio, the spread
behind each median.
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

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Contender:
    name: str
    command: list[str]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    # Requests carry a sampled traceparent, as in a mesh where the caller is traced.
    traceparent: bool = True


def contenders(port: int) -> list[Contender]:
    py = sys.executable
    meshrpc = str(Path(py).parent / "meshrpc")

    def server(name: str) -> list[str]:
        return [py, "-m", "bench.servers", name, str(port)]

    return [
        Contender("raw grpc.aio", server("raw")),
        Contender(
            "meshrpc (defaults)",
            [meshrpc, "serve", "bench.app:app", "--host", "127.0.0.1", "--port", str(port)],
            {"MESHRPC_MESH": "none", "MESHRPC_LOG_LEVEL": "warning"},
        ),
        Contender("meshrpc + middleware", server("meshrpc-middleware")),
        # Compared contenders run next to each other, in either direction of a round.
        Contender("meshrpc + tracing", server("meshrpc-traced")),
        # The SDK's floor under the same load: the least tracing work, inline in raw handlers.
        Contender("raw + SDK floor", server("raw-sdk-floor")),
        Contender("raw + otel contrib", server("raw-otel-contrib")),
        # New traces only (no incoming traceparent): the sampler decides, 1 in 10.
        Contender("meshrpc production", server("meshrpc-production"), traceparent=False),
        Contender("raw + prod. floor", server("raw-production-floor"), traceparent=False),
        # meshrpc's telemetry techniques inline in raw handlers: what any design using them costs.
        Contender("raw + lean prod.", server("raw-lean-production"), traceparent=False),
        Contender("grpclib", server("grpclib")),
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


TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    path: str
    request: helloworld_pb2.HelloRequest

    def body(self) -> bytes:
        message = self.request.SerializeToString()
        return b"\x00" + len(message).to_bytes(4, "big") + message


WORKLOADS = [
    Workload("unary SayHello", "/helloworld.Greeter/SayHello", helloworld_pb2.HelloRequest(name="bench")),
    Workload(
        "server-streaming SayHelloStream x10",
        "/helloworld.Greeter/SayHelloStream",
        helloworld_pb2.HelloRequest(name="bench", count=10),
    ),
]


def wait_ready(target: str, workload: Workload, timeout: float = 20.0) -> None:
    """Wait until the server answers, and check that it answers the workload correctly.

    h2load counts HTTP statuses, not gRPC ones: a server failing every call with a
    gRPC error would look fast.  So each contender's answer is checked once here.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(target) as channel:
                stub = helloworld_pb2_grpc.GreeterStub(channel)
                if workload.path.endswith("/SayHello"):
                    replies = [stub.SayHello(workload.request, timeout=2)]
                else:
                    replies = list(stub.SayHelloStream(workload.request, timeout=2))
        except grpc.RpcError as exc:
            # Not up yet, or a first call slower than its 2 s on a busy machine: try again.
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):  # type: ignore[attr-defined]
                raise SystemExit(f"server at {target} fails the workload: {exc}") from None
            time.sleep(0.1)
            continue
        expected = workload.request.count or 1
        if len(replies) != expected or not replies[0].message.startswith("Hello, bench!"):
            raise SystemExit(f"server at {target} answered {replies!r}, expected {expected} greetings")
        return
    raise SystemExit(f"server at {target} did not answer within {timeout}s")


@dataclasses.dataclass
class Result:
    rps: float
    cpu_us_per_rpc: float
    rss_mb: float


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@dataclasses.dataclass(frozen=True)
class Started:
    """A contender's server, up and warm for the whole run, stopped (SIGSTOP) between its rounds."""

    contender: Contender
    server: subprocess.Popen[bytes]
    target: str


def h2load(
    target: str, path: str, body_file: str, clients: int, streams: int, requests: int, traceparent: bool
) -> list[str]:
    """h2load sending ``requests`` gRPC calls of ``path`` (the request in ``body_file``) to
    ``target``: ``clients`` connections of ``streams`` calls in flight each."""
    return [
        "h2load",
        "-n",
        str(requests),
        "-c",
        str(clients),
        "-m",
        str(streams),
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        # In a mesh every request arrives with trace headers; tracers must extract them.
        *(("-H", f"traceparent: {TRACEPARENT}") if traceparent else ()),
        "-d",
        body_file,
        f"http://{target}{path}",
    ]


# What h2load reports of its calls: how many were done, and how many of those succeeded
# (HTTP 200; a gRPC error comes with HTTP 200 too).
H2LOAD_DONE = re.compile(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded")


def h2load_command(
    started: Started, workload: Workload, body_file: str, args: argparse.Namespace, requests: int
) -> list[str]:
    """h2load sending ``requests`` calls of ``workload`` to ``started``'s server."""
    return h2load(
        started.target,
        workload.path,
        body_file,
        args.clients,
        args.streams,
        requests,
        started.contender.traceparent,
    )


def warm_up(started: Started, workload: Workload, body_file: str, args: argparse.Namespace, requests: int) -> None:
    subprocess.run(pinned(1, h2load_command(started, workload, body_file, args, requests)), capture_output=True)


def start(contender: Contender, workload: Workload, body_file: str, args: argparse.Namespace) -> Started:
    """The contender's server, checked, warmed up with ``--warm-up`` calls, and stopped until its first round."""
    port = free_port()
    command = [a.replace(str(0xDEAD), str(port)) for a in contender.command]
    server = subprocess.Popen(
        pinned(0, command), cwd=ROOT, env={**os.environ, **contender.env}, stdout=subprocess.DEVNULL
    )
    started = Started(contender, server, f"127.0.0.1:{port}")
    try:
        wait_ready(started.target, workload)
        # The SDK's batch processor and the garbage collector settle over the first tens of
        # thousands of spans: warmed up once, so that every round measures a settled server.
        warm_up(started, workload, body_file, args, args.warm_up)
    except BaseException:
        stop(server)
        raise
    server.send_signal(signal.SIGSTOP)
    return started


def run_round(started: Started, workload: Workload, body_file: str, args: argparse.Namespace) -> Result:
    """One round of ``--requests`` calls against a started server (continued for it, stopped after)."""
    server = started.server
    server.send_signal(signal.SIGCONT)
    try:
        # A short warm-up: the other contenders' rounds have had the CPU's caches since.
        warm_up(started, workload, body_file, args, max(args.requests // 10, 100))
        h2load = h2load_command(started, workload, body_file, args, args.requests)
        before = cpu_seconds(server.pid)
        out = subprocess.run(pinned(1, h2load), capture_output=True, text=True, timeout=300).stdout
        used = cpu_seconds(server.pid) - before
        done = H2LOAD_DONE.search(out)
        rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
        if not (done and rps) or done.group(1) != done.group(2) or int(done.group(2)) != args.requests:
            raise SystemExit(f"h2load did not complete every request for {started.contender.name}:\n{out}")
        return Result(float(rps.group(1)), used / args.requests * 1e6, rss_mb(server.pid))
    finally:
        server.send_signal(signal.SIGSTOP)


def stop(server: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM, as Kubernetes stops a pod; SIGKILL if the server is still there after ``timeout`` s."""
    server.send_signal(signal.SIGTERM)
    server.send_signal(signal.SIGCONT)  # a server stopped between its rounds
    try:
        server.wait(timeout)
    except subprocess.TimeoutExpired:
        server.kill()


def sdk_floor(iterations: int = 20_000) -> float:
    """µs of CPU the OpenTelemetry SDK itself needs per traced RPC, on the servers' CPU.

    What any server-side tracer must do per RPC: extract the incoming traceparent and
    start and end a SERVER span carrying the RPC semantic-convention attributes, into
    a batch processor.  Measured in a child process pinned like the servers.
    """
    code = f"""
import os, time
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
class NoOp(SpanExporter):
    def export(self, spans): return SpanExportResult.SUCCESS
provider = TracerProvider(); provider.add_span_processor(BatchSpanProcessor(NoOp()))
tracer = provider.get_tracer("floor")
carrier = {{"traceparent": "{TRACEPARENT}"}}
attrs = {{"rpc.system": "grpc", "rpc.service": "helloworld.Greeter", "rpc.method": "SayHello",
          "server.address": "127.0.0.1", "server.port": 50051, "client.address": "127.0.0.1", "client.port": 5555}}
def once():
    parent = propagate.extract(carrier)
    span = tracer.start_span("helloworld.Greeter/SayHello", context=parent, kind=trace.SpanKind.SERVER, attributes=attrs)
    span.set_attribute("rpc.grpc.status_code", 0)
    span.end()
for _ in range(2000): once()
start = time.process_time()
for _ in range({iterations}): once()
print((time.process_time() - start) / {iterations} * 1e6)
provider.shutdown()
"""
    out = subprocess.run(pinned(0, [sys.executable, "-c", code]), capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def floor_lines(cpu_ratio: dict[str, float], base_cpu: float, loop_floor: float | None) -> list[str]:
    """meshrpc's telemetry cost against the SDK's own, both measured over raw grpc.aio in this run.

    ``cpu_ratio`` is each contender's CPU per RPC over raw's (the median of same-round
    ratios); ``base_cpu`` raw's median CPU per RPC, to put the ratios in µs.
    """
    lines = []
    for meshrpc, floor in (("meshrpc + tracing", "raw + SDK floor"), ("meshrpc production", "raw + prod. floor")):
        if meshrpc in cpu_ratio and floor in cpu_ratio:
            over, floor_over = (cpu_ratio[meshrpc] - 1) * base_cpu, (cpu_ratio[floor] - 1) * base_cpu
            # A short run's CPU figures come in coarse steps: the floor may measure no cost at all.
            against = (
                f"{over / floor_over:.2f}x the SDK's own floor under the same load"
                if floor_over > 0
                else "the SDK's own floor measured no cost over raw in this run"
            )
            lines.append(
                f"{meshrpc}: {over:.1f} us CPU per RPC over raw grpc.aio, {against} ({floor}: {floor_over:.1f} us)."
            )
    if loop_floor is not None:
        lines.append(
            f"The same floor in a hot loop, without the server around it: {loop_floor:.1f} us "
            "(extract a traceparent, start and end a server span with the RPC attributes, batch processor)."
        )
    return ["", *lines] if lines else []


def round_lines(per_round: dict[str, list[float]]) -> list[str]:
    """Each contender's throughput over raw's, round by round (``per_round``, raw's own
    left out): the spread behind each median.

    On a noisy machine single rounds differ by more than the contenders do; a median says
    which side of a line a contender is on only when most of its rounds are.
    """
    if not per_round or len(next(iter(per_round.values()))) < 2:
        return []
    lines = ["", "Each round's req/s over raw grpc.aio's, in round order:"]
    for name, ratios in per_round.items():
        lines.append(f"- {name}: {' '.join(f'{x:.3f}' for x in ratios)} (from {min(ratios):.3f} to {max(ratios):.3f})")
    return lines


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return f"{os.cpu_count()} cores, {model}, Python {sys.version.split()[0]}, grpcio {grpc.__version__}"


def run_all(
    field: list[Contender], workloads: list[Workload], args: argparse.Namespace, floor: float | None
) -> tuple[list[str], list[tuple[str, list[tuple[str, float, float]]]]]:
    """Every round of every workload; the tables and the figure's ratios."""
    tables: list[str] = []
    charts: list[tuple[str, list[tuple[str, float, float]]]] = []
    for workload in workloads:
        with tempfile.NamedTemporaryFile(suffix=".grpc", delete=False) as body:
            body.write(workload.body())
        results: dict[str, list[Result]] = {}
        running: list[Started] = []
        try:
            # Every server is started once and kept (stopped while the others run): a round
            # is then one h2load run per contender, back to back, so that the machine's
            # drift lands on the contenders compared in it alike.
            for contender in field:
                running.append(start(contender, workload, body.name, args))
            for round_no in range(args.rounds):
                # Alternate the order each round, so drift in the machine's load hits everyone alike.
                order = running if round_no % 2 == 0 else list(reversed(running))
                for started in order:
                    result = run_round(started, workload, body.name, args)
                    results.setdefault(started.contender.name, []).append(result)
                    print(
                        f"{workload.name} round {round_no + 1}: {started.contender.name:<20} {result.rps:>9.0f} req/s "
                        f"{result.cpu_us_per_rpc:>7.1f} us CPU/RPC",
                        file=sys.stderr,
                    )
        finally:
            for started in running:
                stop(started.server)
            os.unlink(body.name)
        base_cpu = median([r.cpu_us_per_rpc for r in results[field[0].name]])
        lines = [
            f"{workload.name}: {args.requests} calls x {args.rounds} rounds, h2load -c {args.clients} -m {args.streams}",
            "",
            f"| {'contender':<20} | {'req/s (median)':>14} | {'vs raw':>6} | {'CPU us/RPC':>10} | {'CPU vs raw':>10} "
            f"| {'RSS MB':>6} |",
            f"|{'-' * 22}|{'-' * 16}:|{'-' * 7}:|{'-' * 11}:|{'-' * 11}:|{'-' * 7}:|",
        ]
        cpu_ratio: dict[str, float] = {}
        ratios: list[tuple[str, float, float]] = []
        per_round: dict[str, list[float]] = {}
        baseline = results[field[0].name]
        for contender in field:
            mine = results[contender.name]
            rps = median([r.rps for r in mine])
            cpu = median([r.cpu_us_per_rpc for r in mine])
            rss = median([r.rss_mb for r in mine])
            # Paired: each round's figure over raw's in the same round, then the median of
            # those ratios, so that the machine's drift between rounds cancels out.
            rounds = [r.rps / b.rps for r, b in zip(mine, baseline, strict=True)]
            rps_vs = median(rounds)
            if contender is not field[0]:
                per_round[contender.name] = rounds
            cpu_vs = cpu_ratio[contender.name] = median(
                [r.cpu_us_per_rpc / b.cpu_us_per_rpc for r, b in zip(mine, baseline, strict=True)]
            )
            ratios.append((contender.name, rps_vs, cpu_vs))
            lines.append(
                f"| {contender.name:<20} | {rps:>14.0f} | {rps_vs:>6.3f} | {cpu:>10.1f} | {cpu_vs:>10.3f} "
                f"| {rss:>6.1f} |"
            )
        lines += floor_lines(cpu_ratio, base_cpu, floor)
        lines += round_lines(per_round)
        tables.append("\n".join(lines))
        charts.append((workload.name, ratios))
    return tables, charts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=30_000, help="calls per round (default 30000)")
    # The SDK's batch processor and the garbage collector settle over the first tens of
    # thousands of spans: each server is warmed up once, before the first round.
    parser.add_argument(
        "--warm-up", type=int, default=30_000, help="calls to each server before the first round (default 30000)"
    )
    # An even count: each contender runs as often before raw as after it.
    parser.add_argument("--rounds", type=int, default=4, help="rounds per contender, alternating (default 4)")
    parser.add_argument("--clients", type=int, default=4, help="h2load connections (default 4)")
    parser.add_argument("--streams", type=int, default=32, help="concurrent streams per connection (default 32)")
    parser.add_argument("--only", help="comma-separated contender names to run (default: all)")
    parser.add_argument("--workload", choices=["unary", "stream", "both"], default="both")
    parser.add_argument("--write-doc", type=Path, help="also write the tables into this Markdown file")
    args = parser.parse_args(argv)
    if not shutil.which("h2load"):
        raise SystemExit("h2load not found: apt-get install nghttp2-client")

    field = contenders(0xDEAD)
    if args.only:
        wanted = {n.strip() for n in args.only.split(",")}
        field = [c for c in field if c.name in wanted or c is field[0]]
    workloads = {"unary": WORKLOADS[:1], "stream": WORKLOADS[1:], "both": WORKLOADS}[args.workload]
    floor = sdk_floor() if any(c.name == "meshrpc + tracing" for c in field) else None
    tables, charts = run_all(field, workloads, args, floor)
    report = "\n\n".join(tables)
    print(report)
    if args.write_doc:
        stamp = f"Measured {time.strftime('%Y-%m-%d')} on {machine()}."
        text = args.write_doc.read_text() if args.write_doc.exists() else ""
        begin, end = "<!-- bench: generated by bench/bench.py --write-doc -->", "<!-- /bench -->"
        head, _, rest = text.partition(begin)
        _, _, tail = rest.partition(end)
        from tools.figures import performance

        command = "python bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        chart = args.write_doc.parent / "figures" / "performance.svg"
        performance(charts, chart, command)
        image = (
            f"![Ratios to raw grpc.aio, from the run of the tables below]({chart.relative_to(args.write_doc.parent)})"
        )
        args.write_doc.write_text(f"{head}{begin}\n{stamp}\n\n{image}\n\n{report}\n{end}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
