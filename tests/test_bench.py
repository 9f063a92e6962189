"""The benchmark script keeps working (a smoke run, not a timed test: no figure is asserted)."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT


def test_benchmark_runs_every_contender() -> None:
    result = subprocess.run(
        [sys.executable, "bench/bench.py", "--requests", "300", "--rounds", "1", "--clients", "2", "--streams", "4"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout.splitlines()
    assert table[1].split()[:2] == ["contender", "req/s"]
    rows = {line.split("  ")[0].strip(): line.split() for line in table[2:]}
    assert "raw grpc.aio" in rows and "meshrpc (defaults)" in rows
    assert rows["raw grpc.aio"][-3] == "1.000"  # the baseline's own ratio
