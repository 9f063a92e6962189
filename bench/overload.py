"""Past capacity with an open-loop load: goodput, latency and health, meshrpc against raw grpc.aio.

    python bench/overload.py [--burn-ms 1] [--seconds 6] [--sync] [--figure docs/figures/overload.svg]

Each server runs pinned to CPU 0 and the load generator (grpc-js, bench/overload_client.js)
to CPU 1. Every call has a 200 ms deadline. First each server's capacity C is found: the
highest rate whose p99 of OK calls stays under 100 ms. Then, for each server in turn, the
same phases: 0.8C, 1.5C, 3C and back to 0.5C (C being raw grpc.aio's, so both face the
same load). Goodput is calls answered OK (within their deadline), per second.

Liveness is probed every 250 ms from a process of its own (also on CPU 1), each probe on
a new connection with a 1 s deadline for connecting and answering, as the kubelet's gRPC
probe dials the pod anew each period: a probe is on time even when the load generator
falls behind, and it measures what a restart decision would see.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
NODE_MODULES = ROOT / "tests" / "node" / "node_modules"
CLIENT = ROOT / "bench" / "overload_client.js"
BIN = Path(sys.executable).parent
PHASES = (("0.8C", 0.8), ("1.5C", 1.5), ("3C", 3.0), ("0.5C", 0.5))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descriptor_set(directory: Path) -> Path:
    from google.protobuf import descriptor_pb2

    from examples._generated.helloworld import helloworld_pb2

    files = descriptor_pb2.FileDescriptorSet()
    files.file.add().ParseFromString(helloworld_pb2.DESCRIPTOR.serialized_pb)
    path = directory / "protos.pb"
    path.write_bytes(files.SerializeToString())
    return path


class Server:
    """One contender in a process of its own, pinned to CPU 0."""

    def __init__(self, kind: str, burn_ms: float, sync: bool, log: Path) -> None:
        self.port = free_port()
        env = {**os.environ, "BURN_MS": str(burn_ms), "MESHRPC_MESH": "none", "PYTHONPATH": str(ROOT)}
        if sync:
            env["BURN_SYNC"] = "1"
        if kind == "raw grpc.aio":
            command = [sys.executable, "-m", "bench.overload_app", str(self.port)]
        else:
            command = [str(BIN / "meshrpc"), "serve", "bench.overload_app:app", "--host", "127.0.0.1",
                       "--port", str(self.port), "--drain-delay", "0", "--log-level", "warning"]  # fmt: skip
            if kind == "meshrpc, shedding off":
                command += ["--overload-target-delay", "off"]
        self.log = log
        self.proc = subprocess.Popen(
            ["taskset", "-c", "0", *command], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log.open("w")
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        for _ in range(200):
            try:
                with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=0.5)
                return
            except grpc.RpcError:
                time.sleep(0.05)
        raise RuntimeError(f"server on {self.port} did not start: {self.log.read_text()}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        text = self.log.read_text()
        late = [line for line in text.splitlines() if line.startswith("late starts:")]
        return int(late[-1].split(":")[1]) if late else -1


PROBE_EVERY = 0.25  # seconds between liveness probes
PROBE_TIMEOUT = 1.0  # for connecting and answering


def probe(target: str, seconds: float) -> list[dict[str, Any]]:
    """Liveness probes for ``seconds``, one at a time, each on a new connection: when each
    was sent (ms since the epoch), how long it took, and its status."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    probes = []
    request = health_pb2.HealthCheckRequest(service="liveness")
    end = time.monotonic() + seconds
    due = time.monotonic()
    while due < end:
        time.sleep(max(0.0, due - time.monotonic()))
        at, began = time.time() * 1000, time.monotonic()
        # A new connection per probe, not the channel cache of grpc's Python layer.
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            try:
                health_pb2_grpc.HealthStub(channel).Check(request, timeout=PROBE_TIMEOUT, wait_for_ready=True)
                code, details = "OK", ""
            except grpc.RpcError as exc:
                code, details = exc.code().name, exc.details()  # type: ignore[attr-defined]
        probes.append({"at": at, "ms": (time.monotonic() - began) * 1000, "code": code, "details": details})
        due = max(due + PROBE_EVERY, time.monotonic())
    return probes


def load(target: str, protos: Path, phases: list[dict[str, float]], pin: bool = True) -> list[dict[str, Any]]:
    """The open-loop ``phases`` against ``target``, and liveness probed throughout (both from
    CPU 1 when ``pin``): per phase, what the load generator saw and the probes sent in it."""
    plan = {"deadline_ms": 200, "phases": phases}
    seconds = sum(p["seconds"] for p in phases)
    on_cpu_1 = ["taskset", "-c", "1"] if pin else []
    prober = subprocess.Popen(
        [*on_cpu_1, sys.executable, str(Path(__file__).resolve()), "--probe", target, "--seconds", str(seconds + 1)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        result = subprocess.run(
            [*on_cpu_1, "node", str(CLIENT), target, str(protos), json.dumps(plan)],
            env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=True,
        )
        probes: list[dict[str, Any]] = json.loads(prober.communicate(timeout=60)[0])
    finally:
        if prober.poll() is None:  # the load generator failed: no prober left behind
            prober.kill()
            prober.wait()
    runs: list[dict[str, Any]] = json.loads(result.stdout)
    # Each probe counts in the phase it was sent in (or, between two, the one before).
    for index, run in enumerate(runs):
        later = runs[index + 1]["began_at"] if index + 1 < len(runs) else float("inf")
        begins = run["began_at"] if index else float("-inf")
        run["probes"] = [p for p in probes if begins <= p["at"] < later]
    return runs


def capacity(kind: str, args: argparse.Namespace, protos: Path, workdir: Path) -> float:
    """The highest rate with p99 of OK calls under 100 ms and nothing failed (2 s steps)."""
    server = Server(kind, args.burn_ms, args.sync, workdir / "capacity.log")
    try:
        rate, best = args.start_rate, 0.0
        while rate < 100_000:
            (run,) = load(f"127.0.0.1:{server.port}", protos, [{"rate": rate, "seconds": 2}])
            healthy = run["p99_ms"] is not None and run["p99_ms"] < 100 and run["ok"] >= 0.98 * run["sent"]
            if not healthy:
                break
            best = rate
            rate = int(rate * 1.15) + 10
        return best
    finally:
        server.stop()


def measure(kind: str, c: float, args: argparse.Namespace, protos: Path, workdir: Path) -> dict[str, Any]:
    server = Server(kind, args.burn_ms, args.sync, workdir / f"{kind.split()[0]}.log")
    try:
        phases = [{"rate": int(c * factor), "seconds": args.seconds} for _, factor in PHASES]
        runs = load(f"127.0.0.1:{server.port}", protos, phases)
    finally:
        late = server.stop()
    return {"kind": kind, "late_starts": late, "phases": runs}


def table(c: float, results: list[dict[str, Any]], seconds: float) -> str:
    lines = [
        f"capacity C = {c:g} calls/s (raw grpc.aio, p99 < 100 ms); each phase {seconds:g} s; 200 ms deadlines",
        "| server | offered (sent) | goodput | p50 / p99 of OK (ms) | refused (UNAVAILABLE) | DEADLINE_EXCEEDED | "
        "probes answered < 1 s (max ms) | late starts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for (name, _), run in zip(PHASES, result["phases"], strict=True):
            goodput = run["ok"] / run["seconds"] / c
            probes = run["probes"]
            answered = sum(1 for p in probes if p["code"] == "OK" and p["ms"] < 1000)
            worst = max((p["ms"] for p in probes), default=0)
            p50 = f"{run['p50_ms']:.0f}" if run["p50_ms"] is not None else "-"
            p99 = f"{run['p99_ms']:.0f}" if run["p99_ms"] is not None else "-"
            lines.append(
                f"| {result['kind']} | {name} ({run['sent'] / run['seconds'] / c:.2f}C) | {goodput:.2f}C | {p50} / {p99} | "
                f"{run['codes'].get('UNAVAILABLE', 0)} | {run['codes'].get('DEADLINE_EXCEEDED', 0)} | "
                f"{answered}/{len(probes)} ({worst:.0f}) | "
                + (f"{result['late_starts']} in all |" if name == PHASES[0][0] else "|")
            )
    return "\n".join(lines)


def figure(c: float, results: list[dict[str, Any]], path: Path, command: str) -> None:
    import matplotlib

    matplotlib.use("svg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "meshrpc", "svg.fonttype": "none", "font.size": 9})
    fig, ax = plt.subplots(figsize=(7, 3.6))
    offered = [factor for _, factor in PHASES[:3]]
    for result, style in zip(results, ("o-", "s--", "^:"), strict=False):
        goodput = [run["ok"] / run["seconds"] / c for run in result["phases"][:3]]
        ax.plot(offered, goodput, style, label=result["kind"])
    ax.plot([0, 1, 3.2], [0, 1, 1], color="#bbbbbb", linewidth=0.8, label="ideal: all of the offered load, up to C")
    ax.set_xlabel("offered load (multiples of capacity C)")
    ax.set_ylabel("goodput: OK calls within 200 ms, / C")
    ax.set_xlim(0, 3.2)
    ax.set_ylim(0, 1.1)
    ax.legend(fontsize=8, frameon=False, loc="lower left")
    ax.set_title(
        f"past capacity (C = {c:g}/s, a {results[0].get('burn_ms', 1):g} ms CPU handler)", fontsize=9, loc="left"
    )
    fig.text(0.01, 0.005, f"made by: {command}", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, format="svg", metadata={"Date": None})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--burn-ms", type=float, default=1.0, help="CPU the handler burns per call (default 1 ms)")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per phase (default 6)")
    parser.add_argument("--sync", action="store_true", help="'def' handlers (in the thread pool) instead of async")
    parser.add_argument("--start-rate", type=int, default=200, help="first rate tried when finding capacity")
    parser.add_argument("--capacity", type=float, help="skip the search: use this C")
    parser.add_argument("--figure", type=Path, help="write the goodput figure here (SVG)")
    parser.add_argument("--json", type=Path, help="write the raw results here")
    parser.add_argument("--probe", metavar="TARGET", help=argparse.SUPPRESS)  # the prober's own process
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.seconds)))
        return 0
    assert shutil.which("node") and (NODE_MODULES / "@grpc" / "grpc-js").is_dir(), (
        "needs node and tests/node/node_modules: npm install --prefix tests/node"
    )
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        protos = descriptor_set(workdir)
        c = args.capacity or capacity("raw grpc.aio", args, protos, workdir)
        print(f"capacity C = {c:g} calls/s", flush=True)
        results = []
        for kind in ("raw grpc.aio", "meshrpc serve", "meshrpc, shedding off"):
            results.append(measure(kind, c, args, protos, workdir))
            results[-1]["burn_ms"] = args.burn_ms
        print(table(c, results, args.seconds))
        if args.json:
            args.json.write_text(json.dumps({"capacity": c, "results": results}, indent=1))
        if args.figure:
            figure(c, results, args.figure, "python bench/overload.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
