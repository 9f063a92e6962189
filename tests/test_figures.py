"""Each figure generator still runs, on a tiny recorded input (the real runs take minutes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import ROOT

ROLLOUT = {
    "runs": [
        {
            "drain_delay": 1.5,
            "grace": 5.0,
            "sigterms": [[1.0, "old a"]],
            "events": [[0.05, "old a", "OK"], [0.15, "new a", "OK"], [1.2, "old a", "OK"], [2.7, "new a", "OK"]],
        },
        {
            "drain_delay": 0.0,
            "grace": 5.0,
            "sigterms": [[1.0, "old a"]],
            "events": [[0.05, "old a", "OK"], [1.05, "", "UNAVAILABLE"], [1.3, "new a", "OK"]],
        },
    ]
}
LIFECYCLE = {
    "drain_delay": 1.0,
    "grace": 4.0,
    "sigterm": 1.0,
    "t0": 1.0,
    "goaway": 2.0,
    "stopped": 3.5,
    "slow_call": [0.5, 3.5],
    "samples": [
        [0.1, "SERVING", "SERVING", True],
        [1.1, "NOT_SERVING", "SERVING", True],
        [2.1, "UNKNOWN", "UNKNOWN", False],
    ],
}


def test_rollout_and_lifecycle_figures_draw_from_a_record(tmp_path: Path) -> None:
    for name, record, words in (
        ("rollout", ROLLOUT, ["SIGTERM old a", "failed calls", "1 failed", "0 failed"]),
        ("lifecycle", LIFECYCLE, ["readiness SERVING", "t0+D: GOAWAY", "slow RPC in flight"]),
    ):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(record))
        result = subprocess.run(
            [sys.executable, "tools/figures.py", name, "--record", str(path), "--out", str(tmp_path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        svg = (tmp_path / f"{name}.svg").read_text()
        assert svg.startswith("<?xml") and "made by: python tools/figures.py" in svg
        for word in words:
            assert word in svg, f"{word!r} missing from {name}.svg"


def test_performance_chart_draws_the_ratios(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from tools.figures import performance

    path = tmp_path / "performance.svg"
    performance([("unary SayHello", [("raw grpc.aio", 1.0, 1.0), ("meshrpc (defaults)", 0.98, 1.02)])], path, "bench")
    svg = path.read_text()
    assert "meshrpc (defaults)" in svg and "0.98" in svg and "made by: bench" in svg


def test_lifecycle_recording_reads_the_phases_of_a_real_drain() -> None:
    """The recording half of the lifecycle figure, on a short drain (the rollout's is tests/test_rollout.py)."""
    sys.path.insert(0, str(ROOT))
    from tools.figures import record_lifecycle

    record = record_lifecycle(drain_delay=0.3, grace=2.0, slow=0.8)
    t0, goaway, stopped = record["t0"], record["goaway"], record["stopped"]
    assert t0 is not None and goaway is not None and stopped is not None
    # GOAWAY after the drain delay; the server may stop in the same millisecond when nothing is left in flight
    assert t0 < goaway <= stopped and abs(goaway - t0 - 0.3) < 0.2
    start, end = record["slow_call"]
    assert start < t0 < end <= stopped + 0.1  # the slow RPC was in flight across SIGTERM and finished
    readiness = [sample[1] for sample in record["samples"]]
    assert readiness[0] == "SERVING" and "NOT_SERVING" in readiness
