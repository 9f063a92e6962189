"""Past capacity: a real `meshrpc serve` under an open-loop load (grpc-js, bench/overload_client.js).

The handler burns 4 ms of CPU, so capacity is about 200 calls/s; the load offers about
three times that between two calm phases.  Calls carry 200 ms deadlines, and liveness is
probed every 250 ms from a process of its own, on a new connection each time.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

from bench.overload import descriptor_set, load
from tests.helpers import ROOT, Served, free_port, metrics_text


def test_past_capacity_late_calls_never_run_shedding_comes_and_goes_and_health_answers(tmp_path: Path) -> None:
    metrics_port = free_port()
    env = {"BURN_MS": "4", "PYTHONPATH": str(ROOT), "MESHRPC_METRICS_PORT": str(metrics_port)}
    with Served("bench.overload_app:app", "--drain-delay", "0", env=env) as served:
        served.wait_serving()
        calm, overload, after = load(
            served.target,
            descriptor_set(tmp_path),
            [{"rate": 100, "seconds": 2}, {"rate": 700, "seconds": 4}, {"rate": 100, "seconds": 2}],
            pin=False,
        )
        scraped = metrics_text(metrics_port)
        served.signal(signal.SIGTERM)
        assert served.wait(20) == 0
    log = served.log
    # Below capacity: everything answered, nothing refused.
    assert calm["codes"] == {"OK": calm["sent"]}, calm
    # Past it: shedding started, goodput held up, and OK calls were not served at their deadline.
    assert overload["codes"].get("UNAVAILABLE", 0) > 0, overload
    assert overload["ok"] / overload["seconds"] >= 90, overload  # about half of capacity, or better
    assert overload["p50_ms"] is not None and overload["p50_ms"] < 100, overload  # FIFO past capacity: ~200
    # Shedding stopped with the load: the calm phase after is answered in full.
    assert after["codes"].get("UNAVAILABLE", 0) == 0 and after["ok"] >= 0.95 * after["sent"], after
    # Liveness answered throughout, each probe (a new connection, from a process of its
    # own, every 250 ms) within a second.
    assert len(overload["probes"]) >= 12, overload["probes"]
    for phase in (calm, overload, after):
        assert all(p["code"] == "OK" and p["ms"] < 1000 for p in phase["probes"]), phase["probes"]
    # No handler started after its call's deadline had passed.
    assert "late starts: 0" in log, log
    # Refused calls are counted by reason.
    refused = [line for line in scraped.splitlines() if line.startswith("meshrpc_server_refused")]
    assert any('reason="overload"' in line and not line.endswith(" 0.0") for line in refused), refused


def test_liveness_answers_while_a_backlog_of_cheap_calls_waits_in_grpcs_queue(tmp_path: Path) -> None:
    """A handler that does no work, offered several times what one process serves: the
    backlog waits in grpc's own queue, before Python sees it.  Liveness probes (each a new
    connection) must not wait in that queue: in one shared queue they waited behind it and
    some came back CANCELLED."""
    with Served(
        "bench.overload_app:app", "--drain-delay", "0", env={"BURN_MS": "0", "PYTHONPATH": str(ROOT)}
    ) as served:
        served.wait_serving()
        (flood, after) = load(
            served.target,
            descriptor_set(tmp_path),
            [{"rate": 9000, "seconds": 4}, {"rate": 300, "seconds": 3}],
            pin=False,
        )
        served.signal(signal.SIGTERM)
        assert served.wait(20) == 0
    # The server was past capacity: most calls expired waiting.
    assert flood["codes"].get("DEADLINE_EXCEEDED", 0) > flood["sent"] / 4, flood
    probes = flood["probes"] + after["probes"]
    assert len(probes) >= 20, probes
    failed = [p for p in probes if p["code"] != "OK" or p["ms"] >= 1000]
    assert not failed, failed


def test_sigterm_past_capacity_drains_and_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM while the server is three times past capacity: the drain runs as it does
    under a normal load (liveness keeps answering, no handler starts late, nothing fails
    with a server error) and the process exits 0, well inside its grace period."""
    env = {"BURN_MS": "4", "PYTHONPATH": str(ROOT)}
    runs: list[dict[str, Any]] = []
    with Served("bench.overload_app:app", "--drain-delay", "0", "--grace", "5", env=env) as served:
        served.wait_serving()
        loader = threading.Thread(
            target=lambda: runs.extend(
                load(served.target, descriptor_set(tmp_path), [{"rate": 700, "seconds": 4}], pin=False)
            )
        )
        loader.start()
        time.sleep(3)  # the load generator starts in about a second; then 2 s past capacity
        signalled, signalled_at = time.monotonic(), time.time() * 1000
        served.signal(signal.SIGTERM)
        code = served.wait(20)
        took = time.monotonic() - signalled
        loader.join(60)
    assert code == 0, served.log
    assert took < 5, took  # the handlers in flight take milliseconds: no waiting out the grace
    (run,) = runs
    assert run["ok"] > 100, run
    # Refused, expired or cut off by the stop; never a server error.
    assert set(run["codes"]) <= {"OK", "DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED"}, run["codes"]
    # Liveness answered until the stop (a probe sent as the process exits may meet a closed port).
    before_stop = [p for p in run["probes"] if p["at"] < signalled_at - 300]
    assert before_stop and all(p["code"] == "OK" and p["ms"] < 1000 for p in before_stop), run["probes"]
    assert "late starts: 0" in served.log, served.log
