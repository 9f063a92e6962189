"""The docs' figures, each drawn from a real run: ``python tools/figures.py rollout|lifecycle``.

    rollout    the Envoy rolling update of tests/test_rollout.py, with and without the
               drain delay: calls per 100 ms per replica, failed calls, SIGTERM, D, D+G
    lifecycle  a real `meshrpc serve` with a slow RPC across SIGTERM: readiness, liveness,
               accepting and in flight over t0 .. D .. D+G
    (the performance chart is written by `python bench/bench.py --write-doc`)

Each SVG's caption names the date, the machine and the command that made it.  Figures
are made again by their command, never edited by hand.  ``--tiny`` makes a quick one
(the test suite's check that each generator still runs) into ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
FIGURES = ROOT / "docs" / "figures"


def caption(command: str) -> str:
    model = "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores, {model}, Python {platform.python_version()}; "
        f"made by: {command}"
    )


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("svg")  # no display, and the same output everywhere
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.hashsalt": "meshrpc", "svg.fonttype": "none", "font.size": 9})  # stable ids, text as text
    return plt


def _save(fig: Any, path: Path, text: str) -> None:
    fig.text(0.01, 0.005, text, fontsize=7, color="#555555", ha="left", va="bottom")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="svg", metadata={"Date": None})
    print(path)


def performance(tables: Sequence[tuple[str, Sequence[tuple[str, float, float]]]], path: Path, command: str) -> None:
    """Bars of each contender's ratio to raw grpc.aio (requests/s and CPU per RPC), per workload."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(tables), figsize=(5.2 * len(tables), 0.42 * len(tables[0][1]) + 1.6), squeeze=False)
    for ax, (workload, rows) in zip(axes[0], tables, strict=True):
        names = [name for name, _, _ in rows][::-1]
        rps = [r for _, r, _ in rows][::-1]
        cpu = [c for _, _, c in rows][::-1]
        y = range(len(names))
        ax.barh([i + 0.2 for i in y], rps, height=0.38, label="requests/s vs raw (higher is better)", color="#2b6cb0")
        ax.barh([i - 0.2 for i in y], cpu, height=0.38, label="CPU per RPC vs raw (lower is better)", color="#dd8452")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_yticks(list(y), names)
        ax.set_title(workload)
        ax.set_xlabel("ratio to raw grpc.aio in the same run")
        for i, (r, c) in enumerate(zip(rps, cpu, strict=True)):
            ax.text(r + 0.01, i + 0.2, f"{r:.2f}", va="center", fontsize=7)
            ax.text(c + 0.01, i - 0.2, f"{c:.2f}", va="center", fontsize=7)
    axes[0][0].legend(loc="lower left", bbox_to_anchor=(0, 1.08), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    _save(fig, path, caption(command))


# -- rollout ---------------------------------------------------------------------------


def record_rollout() -> dict[str, Any]:
    """Two real rolling updates through Envoy (tests/rollout.py): with and without the drain delay."""
    import tempfile

    from tests.rollout import rolling_update

    runs = []
    for drain_delay in (1.5, 0.0):
        with tempfile.TemporaryDirectory() as workdir:
            rollout = asyncio.run(rolling_update(Path(workdir), drain_delay=drain_delay))
        # Calls counted per 10 ms, replica and status: what the figure needs, and small to keep.
        counted = collections.Counter(
            (round(t, 2), rollout.labels.get(server, server), status) for t, server, status in rollout.load.events
        )
        runs.append(
            {
                "drain_delay": rollout.drain_delay,
                "grace": rollout.grace,
                "sigterms": rollout.sigterms,
                "events": [[t, replica, status, n] for (t, replica, status), n in sorted(counted.items())],
            }
        )
    return {"runs": runs}


def draw_rollout(record: dict[str, Any], path: Path, command: str) -> None:
    """Calls per 100 ms per replica, failed calls in red, and SIGTERM, D and D+G on the time axis."""
    plt = _pyplot()
    runs = record["runs"]
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3.1 * len(runs) + 0.6), squeeze=False)
    # Old replicas in blues, dashed; new ones in greens and purples, solid: each line stays visible.
    colors = {"old a": "#1f77b4", "old b": "#17becf", "new a": "#2ca02c", "new b": "#9467bd"}
    styles = {"old a": "--", "old b": ":", "new a": "-", "new b": "-"}
    for ax, run in zip(axes[:, 0], runs, strict=True):
        # Each panel ends with its own load: no empty stretch after the last call.
        end = max((event[0] for event in run["events"]), default=1.0) + 0.1
        bins = max(1, int(end / 0.1) + 1)
        ok: dict[str, list[int]] = {}
        failed = [0] * bins
        for t, replica, status, *count in run["events"]:  # [t, replica, status, how many]
            slot = min(int(t / 0.1), bins - 1)
            n = count[0] if count else 1
            if status == "OK":
                ok.setdefault(replica, [0] * bins)[slot] += n
            else:
                failed[slot] += n
        times = [i * 0.1 for i in range(bins)]
        for replica in sorted(ok, key=lambda r: (not r.startswith("old"), r)):
            ax.step(
                times,
                ok[replica],
                where="post",
                label=f"answered by {replica}",
                color=colors.get(replica),
                linestyle=styles.get(replica, "-"),
                linewidth=1.4,
            )
        if any(failed):
            ax.bar(times, failed, width=0.1, align="edge", color="#d62728", label="failed calls", zorder=3)
        delay, grace = run["drain_delay"], run["grace"]
        for index, (t, replica) in enumerate(run["sigterms"]):
            ax.axvline(t, color="black", linewidth=0.9)
            # Labels at two heights, so two SIGTERMs close together stay readable.
            height = 0.97 - 0.12 * (index % 2)
            ax.text(t, height, f" SIGTERM {replica}", transform=ax.get_xaxis_transform(), fontsize=7, va="top")
            if delay:
                ax.axvline(t + delay, color="black", linewidth=0.8, linestyle="--")
        ax.text(
            0.06,
            0.3,
            "one replica at first: Envoy admits\nthe other after its first health check",
            transform=ax.get_yaxis_transform(),
            fontsize=6.5,
            color="#555555",
        )
        total = sum(sum(counts) for counts in ok.values())
        lost = sum(failed)
        shortened = " (shortened from the default 5 s to keep the run short)" if 0 < delay < 5 else ""
        name = "with the drain delay" if delay else "without a drain delay"
        ax.set_title(
            f"{name}: D = {delay:g} s{shortened}, grace G = {grace:g} s; {total} calls answered, {lost} failed",
            fontsize=9,
            loc="left",
        )
        ax.set_ylabel("calls per 100 ms")
        ax.set_xlim(0, end)
        ax.legend(loc="upper right", fontsize=7, ncol=5, frameon=False, bbox_to_anchor=(1, 1.25))
    axes[-1, 0].set_xlabel(
        "seconds since the load started; two replicas behind Envoy, each replaced in turn\n"
        "(solid line: SIGTERM to a replica; dashed: its drain delay D ends and it stops accepting calls)"
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    _save(fig, path, caption(command))


# -- lifecycle -------------------------------------------------------------------------


def record_lifecycle(drain_delay: float = 1.0, grace: float = 4.0, slow: float = 3.0) -> dict[str, Any]:
    """A real `meshrpc serve` with one slow RPC across SIGTERM, probed from outside every 50 ms."""
    import re
    import signal
    import threading
    from datetime import datetime

    import grpc

    from examples._generated.echo import echo_pb2, echo_pb2_grpc
    from tests.helpers import Served, health_status

    samples: list[tuple[float, str, str, bool]] = []
    slow_call: dict[str, float] = {}
    args = ("--drain-delay", str(drain_delay), "--grace", str(grace))
    with Served("tests.apps.echo:app", *args) as served:
        served.wait_serving()
        start = time.time()
        stop = threading.Event()

        def probe() -> None:
            while not stop.is_set() and time.time() - start < 30:
                readiness = health_status(served.target, timeout=0.3)
                liveness = health_status(served.target, "liveness", timeout=0.3)
                with grpc.insecure_channel(served.target) as channel:  # a new client, as after the GOAWAY
                    try:
                        echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="x"), timeout=0.3)
                        accepting = True
                    except grpc.RpcError:
                        accepting = False
                samples.append((time.time() - start, readiness, liveness, accepting))
                time.sleep(0.05)

        def call_slowly() -> None:
            with grpc.insecure_channel(served.target) as channel:
                slow_call["start"] = time.time() - start
                echo_pb2_grpc.EchoStub(channel).Unary(echo_pb2.EchoRequest(text="slow", sleep=slow), timeout=30)
                slow_call["end"] = time.time() - start

        prober, caller = threading.Thread(target=probe), threading.Thread(target=call_slowly)
        prober.start()
        time.sleep(0.5)
        caller.start()
        time.sleep(0.5)
        served.signal(signal.SIGTERM)
        sigterm = time.time() - start
        caller.join(30)
        served.wait(30)
        stop.set()
        prober.join(30)
        log = served.log

    def logged(phrase: str) -> float | None:
        for line in log.splitlines():
            if phrase in line:
                stamp = re.match(r"^(\S+)", line)
                if stamp:
                    return datetime.fromisoformat(stamp.group(1)).timestamp() - start
        return None

    return {
        "drain_delay": drain_delay,
        "grace": grace,
        "sigterm": sigterm,
        "t0": logged("drain t0:"),
        "goaway": logged("no new RPCs (GOAWAY)"),
        "stopped": logged("server stopped"),
        "slow_call": [slow_call.get("start"), slow_call.get("end")],
        "samples": samples,
    }


def draw_lifecycle(record: dict[str, Any], path: Path, command: str) -> None:
    """Readiness, liveness, accepting and in flight over t0 .. D .. D+G, as probed from outside."""
    plt = _pyplot()
    samples = record["samples"]
    times = [s[0] for s in samples]
    t0 = record["t0"] if record["t0"] is not None else record["sigterm"]
    delay, grace = record["drain_delay"], record["grace"]
    start, end = record["slow_call"]
    tracks = [
        ("readiness SERVING", [1 if s[1] == "SERVING" else 0 for s in samples]),
        ("liveness SERVING", [1 if s[2] == "SERVING" else 0 for s in samples]),
        ("accepting new RPCs", [1 if s[3] else 0 for s in samples]),
        (
            "slow RPC in flight",
            [1 if start is not None and start <= t and (end is None or t < end) else 0 for t in times],
        ),
    ]
    fig, ax = plt.subplots(figsize=(9, 3.6))
    left = times[0] if times else 0.0
    for row, (name, values) in enumerate(tracks):
        base = (len(tracks) - 1 - row) * 1.5
        ax.fill_between(times, [base] * len(values), [base + 0.9 * v for v in values], step="post", alpha=0.6)
        ax.text(left + 0.05, base + 0.93, name, fontsize=8, va="bottom")
    if times:
        # Liveness is probed from outside on new connections, which the server refuses from
        # GOAWAY on; until then it answers SERVING, whatever readiness says.
        ax.text(
            t0 + delay + 0.1,
            1.5 * (len(tracks) - 2) + 0.45,
            "probes open new connections:\nrefused once GOAWAY is sent",
            fontsize=6.5,
            color="#555555",
        )
    ax.set_ylim(-0.2, 1.5 * len(tracks) + 0.2)
    marks = [(t0, "t0: SIGTERM", "-"), (t0 + delay, "t0+D: GOAWAY", "--"), (t0 + delay + grace, "t0+D+G", ":")]
    if record["stopped"] is not None:
        marks.append((record["stopped"], "stopped", "-."))
    for t, label, style in marks:
        ax.axvline(t, color="black", linewidth=0.8, linestyle=style)
        ax.text(t, 1.0, f" {label}", transform=ax.get_xaxis_transform(), fontsize=7, va="bottom", rotation=0)
    ax.set_yticks([])
    ax.set_xlabel(f"seconds   (drain delay D = {delay:g} s, grace G = {grace:g} s; probed every 50 ms from outside)")
    fig.tight_layout(rect=(0, 0.05, 1, 0.93))
    _save(fig, path, caption(command))


# -- the command -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("figure", choices=["rollout", "lifecycle"])
    parser.add_argument("--record", type=Path, help="draw from this recorded run (JSON) instead of a new one")
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder for the SVG and the JSON record")
    args = parser.parse_args(argv)
    command = "python tools/figures.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if args.record is not None:
        record = json.loads(args.record.read_text())
    else:
        record = record_rollout() if args.figure == "rollout" else record_lifecycle()
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.figure}.json").write_text(json.dumps(record, separators=(",", ":")) + "\n")
    draw = draw_rollout if args.figure == "rollout" else draw_lifecycle
    draw(record, args.out / f"{args.figure}.svg", command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
