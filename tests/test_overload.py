"""Past capacity: a real `meshrpc serve` under an open-loop load (grpc-js, bench/overload_client.js).

The handler burns 4 ms of CPU, so capacity is about 200 calls/s; the load offers about
three times that between two calm phases.  Calls carry 200 ms deadlines, and liveness is
probed every 250 ms on a connection of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.request
from pathlib import Path

from bench.overload import descriptor_set
from tests.helpers import NODE_CLIENTS, ROOT, Served, free_port

CLIENT = ROOT / "bench" / "overload_client.js"


def load(target: str, protos: Path, phases: list[dict[str, float]]) -> list[dict]:  # type: ignore[type-arg]
    plan = {"deadline_ms": 200, "probe_every_ms": 250, "phases": phases}
    result = subprocess.run(
        ["node", str(CLIENT), target, str(protos), json.dumps(plan)],
        env={**os.environ, "NODE_PATH": str(NODE_CLIENTS / "node_modules")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    runs: list[dict] = json.loads(result.stdout)  # type: ignore[type-arg]
    return runs


def test_past_capacity_late_calls_never_run_shedding_comes_and_goes_and_health_answers(tmp_path: Path) -> None:
    metrics_port = free_port()
    env = {"BURN_MS": "4", "PYTHONPATH": str(ROOT), "MESHRPC_METRICS_PORT": str(metrics_port)}
    with Served("bench.overload_app:app", "--drain-delay", "0", env=env) as served:
        served.wait_serving()
        calm, overload, after = load(
            served.target,
            descriptor_set(tmp_path),
            [{"rate": 100, "seconds": 2}, {"rate": 700, "seconds": 4}, {"rate": 100, "seconds": 2}],
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            scraped = response.read().decode()
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
    # Liveness answered throughout, each probe within a second.
    for phase in (calm, overload, after):
        assert all(p["code"] == "OK" and p["ms"] < 1000 for p in phase["probes"]), phase["probes"]
    # No handler started after its call's deadline had passed.
    assert "late starts: 0" in log, log
    # Refused calls are counted by reason.
    refused = [line for line in scraped.splitlines() if line.startswith("meshrpc_server_refused")]
    assert any('reason="overload"' in line and not line.endswith(" 0.0") for line in refused), refused
